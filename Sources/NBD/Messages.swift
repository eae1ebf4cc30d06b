import NIOCore

/// Errors for bytes that can never become valid. Each closes the connection.
public enum NBDProtocolError: Error, Equatable, Sendable, CustomStringConvertible {
    case badOptionMagic(UInt64)
    case badRequestMagic(UInt32)
    case optionTooLong(option: Option, length: UInt32)
    case unknownClientFlags(UInt32)
    case clientNotFixedNewstyle
    case tooManyOptions
    case malformedOption(Option, reason: String)
    /// Extended headers: a payload over the maximum (the spec asks for a hard disconnect).
    case payloadTooLarge(UInt64)

    public var description: String {
        switch self {
        case .badOptionMagic(let m): return "bad option magic 0x\(String(m, radix: 16))"
        case .badRequestMagic(let m): return "bad request magic 0x\(String(m, radix: 16))"
        case .optionTooLong(let o, let l): return "\(o) with \(l) bytes of data is too long"
        case .unknownClientFlags(let f): return "unknown client flags 0x\(String(f, radix: 16))"
        case .clientNotFixedNewstyle: return "client does not speak fixed newstyle"
        case .tooManyOptions: return "too many options"
        case .malformedOption(let o, let r): return "malformed \(o): \(r)"
        case .payloadTooLarge(let n): return "request payload of \(n) bytes exceeds the maximum"
        }
    }
}

// MARK: handshake

/// What the server sends first: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
public func encodeGreeting(_ flags: HandshakeFlags, into buf: inout ByteBuffer) {
    buf.writeInteger(nbdMagic)
    buf.writeInteger(iHaveOpt)
    buf.writeInteger(flags.rawValue)
}

/// Decodes the client's 32-bit flags.
public struct ClientFlagsDecoder: NIOSingleStepByteToMessageDecoder {
    public typealias InboundOut = ClientFlags
    public init() {}
    public mutating func decode(buffer: inout ByteBuffer) throws -> ClientFlags? {
        guard let raw = buffer.readInteger(as: UInt32.self) else { return nil }
        return ClientFlags(rawValue: raw)
    }
    public mutating func decodeLast(buffer: inout ByteBuffer, seenEOF: Bool) throws -> ClientFlags? {
        try decode(buffer: &buffer)
    }
}

/// One option request from the client.
public struct OptionRequest: Equatable, Sendable {
    public var option: Option
    public var data: [UInt8]
    public init(option: Option, data: [UInt8]) {
        self.option = option
        self.data = data
    }
}

/// Decodes `IHAVEOPT` option requests. Needs the whole option before returning it.
public struct OptionDecoder: NIOSingleStepByteToMessageDecoder {
    public typealias InboundOut = OptionRequest
    public init() {}
    public mutating func decode(buffer: inout ByteBuffer) throws -> OptionRequest? {
        guard let (magic, opt, len) = buffer.getMultipleIntegers(at: buffer.readerIndex, as: (UInt64, UInt32, UInt32).self)
        else { return nil }
        guard magic == iHaveOpt else { throw NBDProtocolError.badOptionMagic(magic) }
        guard len <= Limits.maxOptionLength else {
            throw NBDProtocolError.optionTooLong(option: Option(rawValue: opt), length: len)
        }
        guard buffer.readableBytes >= 16 + Int(len) else { return nil }
        buffer.moveReaderIndex(forwardBy: 16)
        let data = buffer.readBytes(length: Int(len))!
        return OptionRequest(option: Option(rawValue: opt), data: data)
    }
    public mutating func decodeLast(buffer: inout ByteBuffer, seenEOF: Bool) throws -> OptionRequest? {
        try decode(buffer: &buffer)
    }
}

/// An option reply: magic, option, reply type, length, data.
public struct OptionReply: Equatable, Sendable {
    public var option: Option
    public var type: OptionReplyType
    public var data: [UInt8]
    public init(option: Option, type: OptionReplyType, data: [UInt8] = []) {
        self.option = option
        self.type = type
        self.data = data
    }

    /// An error reply whose data is a human-readable message, as the spec allows.
    public static func error(_ option: Option, _ type: OptionReplyType, _ message: String) -> OptionReply {
        OptionReply(option: option, type: type, data: Array(message.utf8.prefix(Limits.maxStringLength)))
    }

    /// `NBD_REP_INFO` with `NBD_INFO_EXPORT`.
    public static func infoExport(_ option: Option, size: UInt64, flags: TransmissionFlags) -> OptionReply {
        var b = ByteBuffer()
        b.writeInteger(InfoType.export.rawValue)
        b.writeInteger(size)
        b.writeInteger(flags.rawValue)
        return OptionReply(option: option, type: .info, data: b.readBytes(length: b.readableBytes)!)
    }

    /// `NBD_REP_INFO` with `NBD_INFO_BLOCK_SIZE`.
    public static func infoBlockSize(_ option: Option, minimum: UInt32, preferred: UInt32, maximum: UInt32) -> OptionReply {
        var b = ByteBuffer()
        b.writeInteger(InfoType.blockSize.rawValue)
        b.writeMultipleIntegers(minimum, preferred, maximum)
        return OptionReply(option: option, type: .info, data: b.readBytes(length: b.readableBytes)!)
    }

    /// `NBD_REP_INFO` with `NBD_INFO_NAME`.
    public static func infoName(_ option: Option, name: String) -> OptionReply {
        var b = ByteBuffer()
        b.writeInteger(InfoType.name.rawValue)
        b.writeBytes(Array(name.utf8.prefix(Limits.maxStringLength)))
        return OptionReply(option: option, type: .info, data: b.readBytes(length: b.readableBytes)!)
    }

    public func encode(into buf: inout ByteBuffer) {
        buf.writeMultipleIntegers(optionReplyMagic, option.rawValue, type.rawValue, UInt32(data.count))
        buf.writeBytes(data)
    }
}

/// The reply to `NBD_OPT_EXPORT_NAME`: size, flags, and 124 zeros unless `NO_ZEROES`.
public func encodeExportNameReply(size: UInt64, flags: TransmissionFlags, noZeroes: Bool, into buf: inout ByteBuffer) {
    buf.writeInteger(size)
    buf.writeInteger(flags.rawValue)
    if !noZeroes { buf.writeRepeatingByte(0, count: 124) }
}

/// The data of `NBD_OPT_INFO`/`NBD_OPT_GO`: an export name and the info types wanted.
public struct InfoRequest: Equatable, Sendable {
    public var exportName: String
    public var requests: [InfoType]

    public static func parse(_ option: Option, _ data: [UInt8]) throws -> InfoRequest {
        var b = ByteBuffer(bytes: data)
        guard let nameLen = b.readInteger(as: UInt32.self), nameLen <= Limits.maxStringLength,
              let name = b.readBytes(length: Int(nameLen)), let n = b.readInteger(as: UInt16.self),
              b.readableBytes == Int(n) * 2
        else { throw NBDProtocolError.malformedOption(option, reason: "length fields do not match the data") }
        var reqs: [InfoType] = []
        for _ in 0..<n { reqs.append(InfoType(rawValue: b.readInteger(as: UInt16.self)!)) }
        guard let s = String(validatingUTF8: name.map { CChar(bitPattern: $0) } + [0]) else {
            throw NBDProtocolError.malformedOption(option, reason: "export name is not UTF-8")
        }
        return InfoRequest(exportName: s, requests: reqs)
    }
}

// MARK: transmission

/// A request header (and, for writes, its payload).
public struct Request: Sendable {
    public var flags: CommandFlags
    public var command: Command
    public var cookie: UInt64
    public var offset: UInt64
    /// Payload length of a WRITE, effect length otherwise (64 bits with extended headers).
    public var length: UInt64
    /// The payload: a WRITE's data, or whatever an extended request sent with
    /// `NBD_CMD_FLAG_PAYLOAD_LEN`; empty otherwise and for writes we refuse unread.
    public var payload: ByteBuffer

    public init(flags: CommandFlags, command: Command, cookie: UInt64, offset: UInt64, length: UInt64,
                payload: ByteBuffer = ByteBuffer()) {
        self.flags = flags
        self.command = command
        self.cookie = cookie
        self.offset = offset
        self.length = length
        self.payload = payload
    }

    /// The compact 28-byte header, or with `extended` the 32-byte one (the client side, for tests).
    public func encode(into buf: inout ByteBuffer, extended: Bool = false) {
        if extended {
            buf.writeMultipleIntegers(extendedRequestMagic, flags.rawValue, command.rawValue, cookie, offset, length)
        } else {
            buf.writeMultipleIntegers(requestMagic, flags.rawValue, command.rawValue, cookie, offset, UInt32(truncatingIfNeeded: length))
        }
        var p = payload
        buf.writeBuffer(&p)
    }
}

/// What the request decoder yields.
public enum DecodedRequest: Sendable {
    case request(Request)
    /// A WRITE longer than we accept: its payload is skipped, and the client gets an error.
    case oversizedWrite(Request)
}

/// Decodes requests. A WRITE comes out whole, with its payload; a WRITE over the maximum
/// payload is drained without being buffered and then reported, so the stream stays framed.
///
/// Payloads never alias the input buffer: once a header is in, its payload is gathered into
/// a buffer of its own, sized exactly, and the input is consumed as the payload's bytes
/// arrive. So the caller's buffer holds at most a partial header between calls, compacting
/// it costs a few bytes however many writes are in flight, and a caller may read a large
/// payload from the socket straight into its place (`receivePayload`) with no copy through
/// the input buffer. (A slice would share the input's storage: every later compaction of
/// that buffer would copy all input queued behind the write, so the cost per request would
/// grow with the backlog.)
public struct RequestDecoder: NIOSingleStepByteToMessageDecoder {
    public typealias InboundOut = DecodedRequest
    public var maxPayload: UInt32
    var skipRemaining: Int = 0

    public init(maxPayload: UInt32 = Limits.maxPayload) { self.maxPayload = maxPayload }

    /// The oversized write whose payload is being drained; reported once it is all read,
    /// since clients match no reply to a request they are still sending.
    var oversized: Request?

    /// The request whose payload is being gathered: its header is consumed, and
    /// `payload.readableBytes < length` until it is whole.
    var gathering: Request?

    /// Extended headers were negotiated: requests have 32-byte headers and 64-bit lengths.
    public var extended = false

    /// Bytes the request being gathered still needs (0 when none is).
    public var payloadBytesNeeded: Int {
        guard let g = gathering else { return 0 }
        return Int(g.length) - g.payload.readableBytes
    }

    /// The size of the payload being gathered (its buffer is allocated whole), 0 when none is.
    public var payloadBytesHeld: Int { gathering.map { Int($0.length) } ?? 0 }

    /// Lets the caller write payload bytes straight into the request being gathered (a
    /// socket read into place). `body` gets the missing part and returns how many bytes it
    /// wrote there; the next `decode` returns the request once it is whole.
    public mutating func receivePayload(_ body: (UnsafeMutableRawBufferPointer) -> Int) {
        guard var g = gathering else { return }
        gathering = nil  // keeps the payload's storage uniquely referenced while it is written
        let need = Int(g.length) - g.payload.readableBytes
        g.payload.writeWithUnsafeMutableBytes(minimumWritableBytes: need) { ptr in
            min(need, max(0, body(UnsafeMutableRawBufferPointer(rebasing: ptr[0..<need]))))
        }
        gathering = g
    }

    public mutating func decode(buffer: inout ByteBuffer) throws -> DecodedRequest? {
        while skipRemaining > 0 {
            guard buffer.readableBytes > 0 else { return nil }
            let n = min(skipRemaining, buffer.readableBytes)
            buffer.moveReaderIndex(forwardBy: n)
            skipRemaining -= n
        }
        if let o = oversized {
            oversized = nil
            return .oversizedWrite(o)
        }
        if gathering == nil {
            switch try decodeHeader(buffer: &buffer) {
            case .needMore: return nil
            case .decoded(let r): return r
            case .skipping: return try decode(buffer: &buffer)
            case .gathering: break
            }
        }
        // The payload: taken out while it is written, so its storage is never shared and
        // the write appends in place.
        guard var g = gathering else { return nil }
        gathering = nil
        let need = Int(g.length) - g.payload.readableBytes
        let n = min(need, buffer.readableBytes)
        if n > 0 {
            buffer.readWithUnsafeReadableBytes { src in
                g.payload.writeBytes(UnsafeRawBufferPointer(rebasing: src[0..<n]))
                return n
            }
        }
        if n == need { return .request(g) }
        gathering = g
        return nil
    }

    private enum HeaderStep {
        case needMore
        case decoded(DecodedRequest)
        /// An oversized write's payload is to be drained, then reported.
        case skipping
        /// A payload follows: `gathering` holds the request.
        case gathering
    }

    private mutating func decodeHeader(buffer: inout ByteBuffer) throws -> HeaderStep {
        // Compact: 28 bytes ending in a 32-bit length; extended: 32, ending in a 64-bit one.
        let headerLength = extended ? 32 : 28
        guard buffer.readableBytes >= headerLength,
              let (magic, flags, type, cookie, offset) = buffer.getMultipleIntegers(
                  at: buffer.readerIndex, as: (UInt32, UInt16, UInt16, UInt64, UInt64).self)
        else { return .needMore }
        guard magic == (extended ? extendedRequestMagic : requestMagic) else { throw NBDProtocolError.badRequestMagic(magic) }
        let length = extended ? buffer.getInteger(at: buffer.readerIndex + 24, as: UInt64.self)!
            : UInt64(buffer.getInteger(at: buffer.readerIndex + 24, as: UInt32.self)!)
        let req = Request(flags: CommandFlags(rawValue: flags), command: Command(rawValue: type), cookie: cookie,
                          offset: offset, length: length)
        buffer.moveReaderIndex(forwardBy: headerLength)
        // Compact requests carry a payload only on WRITE; extended ones when they say so.
        let hasPayload = extended ? req.flags.contains(.payloadLen) : req.command == .write
        guard hasPayload else { return .decoded(.request(req)) }
        if req.length > UInt64(maxPayload) {
            guard !extended else { throw NBDProtocolError.payloadTooLarge(req.length) }
            skipRemaining = Int(req.length)
            oversized = req
            return .skipping
        }
        gathering = req
        gathering!.payload = ByteBufferAllocator().buffer(capacity: Int(req.length))
        return .gathering
    }

    public mutating func decodeLast(buffer: inout ByteBuffer, seenEOF: Bool) throws -> DecodedRequest? {
        try decode(buffer: &buffer)
    }
}

/// The data of `NBD_OPT_LIST_META_CONTEXT`/`NBD_OPT_SET_META_CONTEXT`.
public struct MetaContextRequest: Equatable, Sendable {
    public var exportName: String
    public var queries: [String]

    public static func parse(_ option: Option, _ data: [UInt8]) throws -> MetaContextRequest {
        var b = ByteBuffer(bytes: data)
        func string() throws -> String {
            guard let n = b.readInteger(as: UInt32.self), n <= Limits.maxStringLength, let bytes = b.readBytes(length: Int(n)),
                  let s = String(validatingUTF8: bytes.map { CChar(bitPattern: $0) } + [0]), s.utf8.count == bytes.count
            else { throw NBDProtocolError.malformedOption(option, reason: "bad string in the request") }
            return s
        }
        let name = try string()
        guard let count = b.readInteger(as: UInt32.self), count <= 1024 else {
            throw NBDProtocolError.malformedOption(option, reason: "bad query count")
        }
        var queries: [String] = []
        for _ in 0..<count { queries.append(try string()) }
        guard b.readableBytes == 0 else { throw NBDProtocolError.malformedOption(option, reason: "trailing bytes") }
        return MetaContextRequest(exportName: name, queries: queries)
    }
}

extension OptionReply {
    /// `NBD_REP_META_CONTEXT`: a context id and its name.
    public static func metaContext(_ option: Option, id: UInt32, name: String) -> OptionReply {
        var b = ByteBuffer()
        b.writeInteger(id)
        b.writeString(name)
        return OptionReply(option: option, type: .metaContext, data: b.readBytes(length: b.readableBytes)!)
    }
}

/// How reply chunks are framed: structured (20-byte header) or, after
/// `NBD_OPT_EXTENDED_HEADERS`, extended (32-byte header carrying the request's offset and a
/// 64-bit length).
public enum ChunkFraming: Sendable, Equatable {
    case structured
    case extended(requestOffset: UInt64)

    /// Header bytes before a chunk's payload.
    public var headerLength: Int {
        switch self {
        case .structured: return 20
        case .extended: return 32
        }
    }
}

/// A reply chunk header; the payload follows.
public func encodeChunkHeader(_ framing: ChunkFraming = .structured, flags: UInt16, type: ReplyType, cookie: UInt64,
                              length: UInt32, into buf: inout ByteBuffer) {
    switch framing {
    case .structured:
        buf.writeMultipleIntegers(structuredReplyMagic, flags, type.rawValue, cookie, length)
    case .extended(let requestOffset):
        buf.writeMultipleIntegers(extendedReplyMagic, flags, type.rawValue, cookie, requestOffset, UInt64(length))
    }
}

/// `NBD_REPLY_TYPE_OFFSET_HOLE`
public func encodeHoleChunk(_ framing: ChunkFraming = .structured, cookie: UInt64, offset: UInt64, length: UInt32, done: Bool,
                            into buf: inout ByteBuffer) {
    encodeChunkHeader(framing, flags: done ? replyFlagDone : 0, type: .offsetHole, cookie: cookie, length: 12, into: &buf)
    buf.writeMultipleIntegers(offset, length)
}

/// `NBD_REPLY_TYPE_OFFSET_DATA` header; `length` bytes of data must follow.
public func encodeDataChunkHeader(_ framing: ChunkFraming = .structured, cookie: UInt64, offset: UInt64, length: UInt32,
                                  done: Bool, into buf: inout ByteBuffer) {
    encodeChunkHeader(framing, flags: done ? replyFlagDone : 0, type: .offsetData, cookie: cookie, length: 8 + length, into: &buf)
    buf.writeInteger(offset)
}

/// `NBD_REPLY_TYPE_ERROR` with a message, always the last chunk.
public func encodeErrorChunk(_ framing: ChunkFraming = .structured, cookie: UInt64, error: ErrorValue, message: String,
                             into buf: inout ByteBuffer) {
    let msg = Array(message.utf8.prefix(Limits.maxStringLength))
    encodeChunkHeader(framing, flags: replyFlagDone, type: .error, cookie: cookie, length: 6 + UInt32(msg.count), into: &buf)
    buf.writeInteger(error.rawValue)
    buf.writeInteger(UInt16(msg.count))
    buf.writeBytes(msg)
}

/// `NBD_REPLY_TYPE_NONE` with the done flag: a successful reply with no payload.
public func encodeDoneChunk(_ framing: ChunkFraming = .structured, cookie: UInt64, into buf: inout ByteBuffer) {
    encodeChunkHeader(framing, flags: replyFlagDone, type: .none, cookie: cookie, length: 0, into: &buf)
}

/// A block status chunk for one context: `NBD_REPLY_TYPE_BLOCK_STATUS` (32-bit extents) or,
/// with extended headers, `NBD_REPLY_TYPE_BLOCK_STATUS_EXT` (a count, then 64-bit extents).
public func encodeBlockStatusChunk(_ framing: ChunkFraming = .structured, cookie: UInt64, contextID: UInt32,
                                   extents: [(length: UInt64, flags: UInt32)], done: Bool, into buf: inout ByteBuffer) {
    let flags = done ? replyFlagDone : 0
    switch framing {
    case .structured:
        encodeChunkHeader(framing, flags: flags, type: .blockStatus, cookie: cookie, length: 4 + 8 * UInt32(extents.count), into: &buf)
        buf.writeInteger(contextID)
        for e in extents { buf.writeMultipleIntegers(UInt32(e.length), e.flags) }
    case .extended:
        encodeChunkHeader(framing, flags: flags, type: .blockStatusExt, cookie: cookie, length: 8 + 16 * UInt32(extents.count),
                          into: &buf)
        buf.writeMultipleIntegers(contextID, UInt32(extents.count))
        for e in extents { buf.writeMultipleIntegers(e.length, UInt64(e.flags)) }
    }
}

/// A simple reply header; read data follows it.
public func encodeSimpleReply(error: ErrorValue?, cookie: UInt64, into buf: inout ByteBuffer) {
    buf.writeMultipleIntegers(simpleReplyMagic, error?.rawValue ?? 0, cookie)
}
