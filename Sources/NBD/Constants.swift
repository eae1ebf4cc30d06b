// Wire constants of the NBD protocol (NetworkBlockDevice/nbd doc/proto.md), named as the
// document names them. Codes that come from the peer are raw-value structs so that an
// unknown value still decodes and gets the reply the spec asks for.

/// `NBDMAGIC`
public let nbdMagic: UInt64 = 0x4E42_444D_4147_4943
/// `IHAVEOPT`
public let iHaveOpt: UInt64 = 0x4948_4156_454F_5054
/// Option reply magic.
public let optionReplyMagic: UInt64 = 0x0003_E889_0455_65A9
/// `NBD_REQUEST_MAGIC`
public let requestMagic: UInt32 = 0x2560_9513
/// `NBD_SIMPLE_REPLY_MAGIC`
public let simpleReplyMagic: UInt32 = 0x6744_6698
/// `NBD_STRUCTURED_REPLY_MAGIC`
public let structuredReplyMagic: UInt32 = 0x668E_33EF
/// `NBD_EXTENDED_REQUEST_MAGIC` (the extended headers extension)
public let extendedRequestMagic: UInt32 = 0x21E4_1C71
/// `NBD_EXTENDED_REPLY_MAGIC` (the extended headers extension)
public let extendedReplyMagic: UInt32 = 0x6E8A_278C

/// Named limits.
public enum Limits {
    /// Longest option payload we read (nbdkit uses a similar bound).
    public static let maxOptionLength = 64 * 1024
    /// `NBD_MAX_STRING`: export names and other strings.
    public static let maxStringLength = 4096
    /// How many options one client may send before we give up on it.
    public static let maxOptions = 256
    /// The largest READ/WRITE we serve (advertised as the maximum block size).
    public static let maxPayload: UInt32 = 32 * 1024 * 1024
    public static let minimumBlockSize: UInt32 = 512
    public static let preferredBlockSize: UInt32 = 64 * 1024
}

/// Handshake flags sent by the server.
public struct HandshakeFlags: OptionSet, Sendable {
    public var rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    /// `NBD_FLAG_FIXED_NEWSTYLE`
    public static let fixedNewstyle = HandshakeFlags(rawValue: 1 << 0)
    /// `NBD_FLAG_NO_ZEROES`
    public static let noZeroes = HandshakeFlags(rawValue: 1 << 1)
}

/// Client flags sent in reply to the handshake.
public struct ClientFlags: OptionSet, Sendable {
    public var rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    /// `NBD_FLAG_C_FIXED_NEWSTYLE`
    public static let fixedNewstyle = ClientFlags(rawValue: 1 << 0)
    /// `NBD_FLAG_C_NO_ZEROES`
    public static let noZeroes = ClientFlags(rawValue: 1 << 1)
    public static let known: ClientFlags = [.fixedNewstyle, .noZeroes]
}

/// Transmission flags.
public struct TransmissionFlags: OptionSet, Sendable {
    public var rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    /// `NBD_FLAG_HAS_FLAGS`
    public static let hasFlags = TransmissionFlags(rawValue: 1 << 0)
    /// `NBD_FLAG_READ_ONLY`
    public static let readOnly = TransmissionFlags(rawValue: 1 << 1)
    /// `NBD_FLAG_SEND_FLUSH`
    public static let sendFlush = TransmissionFlags(rawValue: 1 << 2)
    /// `NBD_FLAG_SEND_FUA`
    public static let sendFUA = TransmissionFlags(rawValue: 1 << 3)
    /// `NBD_FLAG_ROTATIONAL`
    public static let rotational = TransmissionFlags(rawValue: 1 << 4)
    /// `NBD_FLAG_SEND_TRIM`
    public static let sendTrim = TransmissionFlags(rawValue: 1 << 5)
    /// `NBD_FLAG_SEND_WRITE_ZEROES`
    public static let sendWriteZeroes = TransmissionFlags(rawValue: 1 << 6)
    /// `NBD_FLAG_SEND_DF`
    public static let sendDF = TransmissionFlags(rawValue: 1 << 7)
    /// `NBD_FLAG_CAN_MULTI_CONN`
    public static let canMultiConn = TransmissionFlags(rawValue: 1 << 8)
    /// `NBD_FLAG_SEND_CACHE`
    public static let sendCache = TransmissionFlags(rawValue: 1 << 10)
    /// `NBD_FLAG_SEND_FAST_ZERO`
    public static let sendFastZero = TransmissionFlags(rawValue: 1 << 11)
}

/// `NBD_OPT_*`
public struct Option: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
    public var rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    /// `NBD_OPT_EXPORT_NAME`
    public static let exportName = Option(rawValue: 1)
    /// `NBD_OPT_ABORT`
    public static let abort = Option(rawValue: 2)
    /// `NBD_OPT_LIST`
    public static let list = Option(rawValue: 3)
    /// `NBD_OPT_STARTTLS`
    public static let startTLS = Option(rawValue: 5)
    /// `NBD_OPT_INFO`
    public static let info = Option(rawValue: 6)
    /// `NBD_OPT_GO`
    public static let go = Option(rawValue: 7)
    /// `NBD_OPT_STRUCTURED_REPLY`
    public static let structuredReply = Option(rawValue: 8)
    /// `NBD_OPT_LIST_META_CONTEXT`
    public static let listMetaContext = Option(rawValue: 9)
    /// `NBD_OPT_SET_META_CONTEXT`
    public static let setMetaContext = Option(rawValue: 10)
    /// `NBD_OPT_EXTENDED_HEADERS`
    public static let extendedHeaders = Option(rawValue: 11)

    public var description: String {
        switch self {
        case .exportName: return "NBD_OPT_EXPORT_NAME"
        case .abort: return "NBD_OPT_ABORT"
        case .list: return "NBD_OPT_LIST"
        case .startTLS: return "NBD_OPT_STARTTLS"
        case .info: return "NBD_OPT_INFO"
        case .go: return "NBD_OPT_GO"
        case .structuredReply: return "NBD_OPT_STRUCTURED_REPLY"
        case .listMetaContext: return "NBD_OPT_LIST_META_CONTEXT"
        case .setMetaContext: return "NBD_OPT_SET_META_CONTEXT"
        case .extendedHeaders: return "NBD_OPT_EXTENDED_HEADERS"
        default: return "unknown option (\(rawValue))"
        }
    }
}

/// `NBD_REP_*` option reply types.
public struct OptionReplyType: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
    public var rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    static let err: UInt32 = 1 << 31
    /// `NBD_REP_ACK`
    public static let ack = OptionReplyType(rawValue: 1)
    /// `NBD_REP_SERVER`
    public static let server = OptionReplyType(rawValue: 2)
    /// `NBD_REP_INFO`
    public static let info = OptionReplyType(rawValue: 3)
    /// `NBD_REP_META_CONTEXT`
    public static let metaContext = OptionReplyType(rawValue: 4)
    /// `NBD_REP_ERR_UNSUP`
    public static let errUnsup = OptionReplyType(rawValue: err | 1)
    /// `NBD_REP_ERR_POLICY`
    public static let errPolicy = OptionReplyType(rawValue: err | 2)
    /// `NBD_REP_ERR_INVALID`
    public static let errInvalid = OptionReplyType(rawValue: err | 3)
    /// `NBD_REP_ERR_PLATFORM`
    public static let errPlatform = OptionReplyType(rawValue: err | 4)
    /// `NBD_REP_ERR_TLS_REQD`
    public static let errTLSReqd = OptionReplyType(rawValue: err | 5)
    /// `NBD_REP_ERR_UNKNOWN`
    public static let errUnknown = OptionReplyType(rawValue: err | 6)
    /// `NBD_REP_ERR_SHUTDOWN`
    public static let errShutdown = OptionReplyType(rawValue: err | 7)
    /// `NBD_REP_ERR_BLOCK_SIZE_REQD`
    public static let errBlockSizeReqd = OptionReplyType(rawValue: err | 8)
    /// `NBD_REP_ERR_TOO_BIG`
    public static let errTooBig = OptionReplyType(rawValue: err | 9)
    /// `NBD_REP_ERR_EXT_HEADER_REQD`
    public static let errExtHeaderReqd = OptionReplyType(rawValue: err | 10)

    public var description: String {
        switch self {
        case .ack: return "NBD_REP_ACK"
        case .server: return "NBD_REP_SERVER"
        case .info: return "NBD_REP_INFO"
        case .metaContext: return "NBD_REP_META_CONTEXT"
        case .errUnsup: return "NBD_REP_ERR_UNSUP"
        case .errPolicy: return "NBD_REP_ERR_POLICY"
        case .errInvalid: return "NBD_REP_ERR_INVALID"
        case .errPlatform: return "NBD_REP_ERR_PLATFORM"
        case .errTLSReqd: return "NBD_REP_ERR_TLS_REQD"
        case .errUnknown: return "NBD_REP_ERR_UNKNOWN"
        case .errShutdown: return "NBD_REP_ERR_SHUTDOWN"
        case .errBlockSizeReqd: return "NBD_REP_ERR_BLOCK_SIZE_REQD"
        case .errTooBig: return "NBD_REP_ERR_TOO_BIG"
        case .errExtHeaderReqd: return "NBD_REP_ERR_EXT_HEADER_REQD"
        default: return "unknown reply type (0x\(String(rawValue, radix: 16)))"
        }
    }
}

/// `NBD_INFO_*`
public struct InfoType: RawRepresentable, Hashable, Sendable {
    public var rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    /// `NBD_INFO_EXPORT`
    public static let export = InfoType(rawValue: 0)
    /// `NBD_INFO_NAME`
    public static let name = InfoType(rawValue: 1)
    /// `NBD_INFO_DESCRIPTION`
    public static let description = InfoType(rawValue: 2)
    /// `NBD_INFO_BLOCK_SIZE`
    public static let blockSize = InfoType(rawValue: 3)
}

/// `NBD_CMD_*`
public struct Command: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
    public var rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    /// `NBD_CMD_READ`
    public static let read = Command(rawValue: 0)
    /// `NBD_CMD_WRITE`
    public static let write = Command(rawValue: 1)
    /// `NBD_CMD_DISC`
    public static let disc = Command(rawValue: 2)
    /// `NBD_CMD_FLUSH`
    public static let flush = Command(rawValue: 3)
    /// `NBD_CMD_TRIM`
    public static let trim = Command(rawValue: 4)
    /// `NBD_CMD_CACHE`
    public static let cache = Command(rawValue: 5)
    /// `NBD_CMD_WRITE_ZEROES`
    public static let writeZeroes = Command(rawValue: 6)
    /// `NBD_CMD_BLOCK_STATUS`
    public static let blockStatus = Command(rawValue: 7)

    public var description: String {
        switch self {
        case .read: return "NBD_CMD_READ"
        case .write: return "NBD_CMD_WRITE"
        case .disc: return "NBD_CMD_DISC"
        case .flush: return "NBD_CMD_FLUSH"
        case .trim: return "NBD_CMD_TRIM"
        case .cache: return "NBD_CMD_CACHE"
        case .writeZeroes: return "NBD_CMD_WRITE_ZEROES"
        case .blockStatus: return "NBD_CMD_BLOCK_STATUS"
        default: return "unknown command (\(rawValue))"
        }
    }
}

/// `NBD_CMD_FLAG_*`
public struct CommandFlags: OptionSet, Sendable {
    public var rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    /// `NBD_CMD_FLAG_FUA`
    public static let fua = CommandFlags(rawValue: 1 << 0)
    /// `NBD_CMD_FLAG_NO_HOLE`
    public static let noHole = CommandFlags(rawValue: 1 << 1)
    /// `NBD_CMD_FLAG_DF`
    public static let df = CommandFlags(rawValue: 1 << 2)
    /// `NBD_CMD_FLAG_REQ_ONE`
    public static let reqOne = CommandFlags(rawValue: 1 << 3)
    /// `NBD_CMD_FLAG_FAST_ZERO`
    public static let fastZero = CommandFlags(rawValue: 1 << 4)
    /// `NBD_CMD_FLAG_PAYLOAD_LEN` (extended headers): *length* is that of a payload.
    public static let payloadLen = CommandFlags(rawValue: 1 << 5)
}

/// The spec's error values, `NBD_E*`.
public struct ErrorValue: RawRepresentable, Hashable, Sendable, Error, CustomStringConvertible {
    public var rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    /// `NBD_EPERM`
    public static let eperm = ErrorValue(rawValue: 1)
    /// `NBD_EIO`
    public static let eio = ErrorValue(rawValue: 5)
    /// `NBD_ENOMEM`
    public static let enomem = ErrorValue(rawValue: 12)
    /// `NBD_EINVAL`
    public static let einval = ErrorValue(rawValue: 22)
    /// `NBD_ENOSPC`
    public static let enospc = ErrorValue(rawValue: 28)
    /// `NBD_EOVERFLOW`
    public static let eoverflow = ErrorValue(rawValue: 75)
    /// `NBD_ENOTSUP`
    public static let enotsup = ErrorValue(rawValue: 95)
    /// `NBD_ESHUTDOWN`
    public static let eshutdown = ErrorValue(rawValue: 108)

    public var description: String {
        switch self {
        case .eperm: return "NBD_EPERM"
        case .eio: return "NBD_EIO"
        case .enomem: return "NBD_ENOMEM"
        case .einval: return "NBD_EINVAL"
        case .enospc: return "NBD_ENOSPC"
        case .eoverflow: return "NBD_EOVERFLOW"
        case .enotsup: return "NBD_ENOTSUP"
        case .eshutdown: return "NBD_ESHUTDOWN"
        default: return "NBD error \(rawValue)"
        }
    }
}

/// Structured reply chunk types, `NBD_REPLY_TYPE_*`.
public struct ReplyType: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
    public var rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    /// `NBD_REPLY_TYPE_NONE`
    public static let none = ReplyType(rawValue: 0)
    /// `NBD_REPLY_TYPE_OFFSET_DATA`
    public static let offsetData = ReplyType(rawValue: 1)
    /// `NBD_REPLY_TYPE_OFFSET_HOLE`
    public static let offsetHole = ReplyType(rawValue: 2)
    /// `NBD_REPLY_TYPE_BLOCK_STATUS`
    public static let blockStatus = ReplyType(rawValue: 5)
    /// `NBD_REPLY_TYPE_BLOCK_STATUS_EXT` (extended headers: 64-bit extents)
    public static let blockStatusExt = ReplyType(rawValue: 6)
    /// `NBD_REPLY_TYPE_ERROR`
    public static let error = ReplyType(rawValue: 1 << 15 | 1)
    /// `NBD_REPLY_TYPE_ERROR_OFFSET`
    public static let errorOffset = ReplyType(rawValue: 1 << 15 | 2)
    public var description: String {
        switch self {
        case .none: return "NBD_REPLY_TYPE_NONE"
        case .offsetData: return "NBD_REPLY_TYPE_OFFSET_DATA"
        case .offsetHole: return "NBD_REPLY_TYPE_OFFSET_HOLE"
        case .blockStatus: return "NBD_REPLY_TYPE_BLOCK_STATUS"
        case .blockStatusExt: return "NBD_REPLY_TYPE_BLOCK_STATUS_EXT"
        case .error: return "NBD_REPLY_TYPE_ERROR"
        case .errorOffset: return "NBD_REPLY_TYPE_ERROR_OFFSET"
        default: return "unknown reply type (\(rawValue))"
        }
    }
}

/// `NBD_REPLY_FLAG_DONE`
public let replyFlagDone: UInt16 = 1

/// Block status flags of the `base:allocation` context.
public struct AllocationState: OptionSet, Sendable, Hashable {
    public var rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    /// `NBD_STATE_HOLE`
    public static let hole = AllocationState(rawValue: 1 << 0)
    /// `NBD_STATE_ZERO`
    public static let zero = AllocationState(rawValue: 1 << 1)
}

/// The meta context every export offers.
public let baseAllocationContext = "base:allocation"
