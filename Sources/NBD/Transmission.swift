// Validate once at the edge: a request either becomes a ValidatedRequest, which backends
// trust, or an error value for the client.

import NIOCore

/// What was negotiated for the connection, fixed when transmission starts.
public struct TransmissionState: Sendable {
    public var export: ExportDescription
    public var flags: TransmissionFlags
    public init(export: ExportDescription) {
        self.export = export
        self.flags = export.transmissionFlags
    }
}

public enum ValidatedRequest: Sendable {
    case read(cookie: UInt64, offset: UInt64, length: UInt32)
    case write(cookie: UInt64, offset: UInt64, payload: ByteBuffer, fua: Bool)
    case flush(cookie: UInt64)
    case disconnect

    public var cookie: UInt64? {
        switch self {
        case .read(let c, _, _), .write(let c, _, _, _), .flush(let c): return c
        case .disconnect: return nil
        }
    }
}

public enum RequestValidator {
    public static func validate(_ r: Request, _ s: TransmissionState) -> Result<ValidatedRequest, ErrorValue> {
        let size = s.export.size
        func inRange() -> Bool { r.offset <= size && UInt64(r.length) <= size - r.offset }
        let known: CommandFlags = [.fua, .noHole, .df, .reqOne, .fastZero]
        guard known.isSuperset(of: r.flags) else { return .failure(.einval) }
        switch r.command {
        case .read:
            guard r.flags.subtracting([.fua, .df]).isEmpty else { return .failure(.einval) }
            guard r.length <= Limits.maxPayload else { return .failure(r.flags.contains(.df) ? .eoverflow : .einval) }
            guard inRange() else { return .failure(.einval) }
            return .success(.read(cookie: r.cookie, offset: r.offset, length: r.length))
        case .write:
            guard !s.export.readOnly else { return .failure(.eperm) }
            guard r.flags.subtracting([.fua]).isEmpty else { return .failure(.einval) }
            guard r.length <= Limits.maxPayload else { return .failure(.einval) }
            guard inRange() else { return .failure(.enospc) }
            return .success(.write(cookie: r.cookie, offset: r.offset, payload: r.payload, fua: r.flags.contains(.fua)))
        case .flush:
            guard r.offset == 0, r.length == 0 else { return .failure(.einval) }
            return .success(.flush(cookie: r.cookie))
        case .disc:
            return .success(.disconnect)
        default:
            return .failure(.einval)
        }
    }
}
