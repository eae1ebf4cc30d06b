// Validate once at the edge: a request either becomes a ValidatedRequest, which backends
// trust, or an error value for the client.

import NIOCore

/// A meta context chosen with `NBD_OPT_SET_META_CONTEXT`.
public struct MetaContext: Sendable, Equatable {
    public var id: UInt32
    public var name: String
    public init(id: UInt32, name: String) {
        self.id = id
        self.name = name
    }
}

/// What was negotiated for the connection, fixed when transmission starts.
public struct TransmissionState: Sendable, Equatable {
    public var export: ExportDescription
    public var flags: TransmissionFlags
    /// Structured replies, either negotiated alone or implied by extended headers.
    public var structuredReplies: Bool
    /// `NBD_OPT_EXTENDED_HEADERS`: 32-byte request and reply headers, 64-bit lengths.
    public var extendedHeaders: Bool
    public var metaContexts: [MetaContext]
    public init(export: ExportDescription, structuredReplies: Bool = false, extendedHeaders: Bool = false,
                metaContexts: [MetaContext] = []) {
        self.export = export
        self.structuredReplies = structuredReplies || extendedHeaders
        self.extendedHeaders = extendedHeaders
        self.metaContexts = metaContexts
        self.flags = export.transmissionFlags(structuredReplies: self.structuredReplies)
    }

    /// How a reply to a request at `offset` is framed; nil when only simple replies are allowed.
    public func framing(requestOffset offset: UInt64) -> ChunkFraming? {
        if extendedHeaders { return .extended(requestOffset: offset) }
        return structuredReplies ? .structured : nil
    }
}

public enum ValidatedRequest: Sendable {
    case read(cookie: UInt64, offset: UInt64, length: UInt32, df: Bool)
    case write(cookie: UInt64, offset: UInt64, payload: ByteBuffer, fua: Bool)
    case flush(cookie: UInt64)
    /// Effect lengths are 64-bit: with extended headers a client may trim or zero, say, a
    /// whole disk in one request.
    case trim(cookie: UInt64, offset: UInt64, length: UInt64, fua: Bool)
    case writeZeroes(cookie: UInt64, offset: UInt64, length: UInt64, fua: Bool, noHole: Bool, fastZero: Bool)
    case cache(cookie: UInt64, offset: UInt64, length: UInt64)
    case blockStatus(cookie: UInt64, offset: UInt64, length: UInt64, reqOne: Bool, contexts: [MetaContext])
    case disconnect
}

public enum RequestValidator {
    public static func validate(_ r: Request, _ s: TransmissionState) -> Result<ValidatedRequest, ErrorValue> {
        let size = s.export.size
        let inRange = r.offset <= size && r.length <= size - r.offset
        var known: CommandFlags = [.fua, .noHole, .df, .reqOne, .fastZero]
        if s.extendedHeaders { known.insert(.payloadLen) }
        guard known.isSuperset(of: r.flags) else { return .failure(.einval) }
        // Extended headers: WRITE must carry PAYLOAD_LEN; no other command takes a payload
        // here (the decoder has already consumed any that was sent).
        if s.extendedHeaders && r.flags.contains(.payloadLen) != (r.command == .write) { return .failure(.einval) }
        let flags = r.flags.subtracting(.payloadLen)
        func only(_ allowed: CommandFlags) -> Bool { flags.subtracting(allowed).isEmpty }
        let fua = r.flags.contains(.fua)
        switch r.command {
        case .read:
            guard only([.fua, .df]) else { return .failure(.einval) }
            let df = r.flags.contains(.df)
            // NBD spec: DF without structured replies is a client error.
            if df && !s.structuredReplies { return .failure(.einval) }
            guard r.length <= UInt64(Limits.maxPayload) else { return .failure(df ? .eoverflow : .einval) }
            guard r.length > 0, inRange else { return .failure(.einval) }
            return .success(.read(cookie: r.cookie, offset: r.offset, length: UInt32(r.length), df: df))
        case .write:
            guard !s.export.readOnly else { return .failure(.eperm) }
            guard only([.fua]), r.length <= UInt64(Limits.maxPayload), r.length > 0 else { return .failure(.einval) }
            guard inRange else { return .failure(.enospc) }
            return .success(.write(cookie: r.cookie, offset: r.offset, payload: r.payload, fua: fua))
        case .flush:
            guard r.offset == 0, r.length == 0, only([]) else { return .failure(.einval) }
            return .success(.flush(cookie: r.cookie))
        case .trim:
            guard !s.export.readOnly else { return .failure(.eperm) }
            guard only([.fua]), r.length > 0, inRange else { return .failure(.einval) }
            return .success(.trim(cookie: r.cookie, offset: r.offset, length: r.length, fua: fua))
        case .writeZeroes:
            guard !s.export.readOnly else { return .failure(.eperm) }
            guard only([.fua, .noHole, .fastZero]), r.length > 0 else { return .failure(.einval) }
            guard inRange else { return .failure(.enospc) }
            return .success(.writeZeroes(cookie: r.cookie, offset: r.offset, length: r.length, fua: fua,
                                         noHole: r.flags.contains(.noHole), fastZero: r.flags.contains(.fastZero)))
        case .cache:
            guard only([]), r.length > 0, inRange else { return .failure(.einval) }
            return .success(.cache(cookie: r.cookie, offset: r.offset, length: r.length))
        case .blockStatus:
            guard s.structuredReplies, !s.metaContexts.isEmpty else { return .failure(.einval) }
            guard only([.reqOne]), r.length > 0, inRange else { return .failure(.einval) }
            return .success(.blockStatus(cookie: r.cookie, offset: r.offset, length: r.length,
                                         reqOne: r.flags.contains(.reqOne), contexts: s.metaContexts))
        case .disc:
            return .success(.disconnect)
        default:
            return .failure(.einval)
        }
    }
}
