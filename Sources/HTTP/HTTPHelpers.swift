// What the HTTP handlers decide from a request before touching a disk: the token it
// carries, the byte range it asks for, and the status an SR failure answers with.

import Foundation
import HTTPTypes
import Storage

enum HTTPAuth {
    /// The token of a request: `?token=`, `Authorization: Bearer T`, or basic auth with
    /// the token as the password (`curl -u :T`; the user name is ignored).
    static func token(query: String?, authorization: String?) -> String? {
        if let q = query, !q.isEmpty { return q }
        guard let a = authorization?.trimmingCharacters(in: .whitespaces) else { return nil }
        let parts = a.split(separator: " ", maxSplits: 1).map(String.init)
        guard parts.count == 2 else { return nil }
        switch parts[0].lowercased() {
        case "bearer":
            return parts[1].trimmingCharacters(in: .whitespaces)
        case "basic":
            guard let d = Data(base64Encoded: parts[1].trimmingCharacters(in: .whitespaces)),
                  let s = String(data: d, encoding: .utf8), let colon = s.firstIndex(of: ":") else { return nil }
            let pw = String(s[s.index(after: colon)...])
            return pw.isEmpty ? nil : pw
        default:
            return nil
        }
    }
}

/// One byte range of `Range: bytes=...` (a single range; several are answered whole).
enum ByteRange: Equatable {
    case none
    case range(ClosedRange<UInt64>)
    case unsatisfiable

    static func parse(_ header: String?, length: UInt64) -> ByteRange {
        guard let h = header?.trimmingCharacters(in: .whitespaces), h.lowercased().hasPrefix("bytes=") else { return .none }
        let spec = h.dropFirst("bytes=".count)
        guard !spec.contains(","), let dash = spec.firstIndex(of: "-") else { return .none }
        let a = spec[..<dash].trimmingCharacters(in: .whitespaces), b = spec[spec.index(after: dash)...].trimmingCharacters(in: .whitespaces)
        if a.isEmpty {
            // The last b bytes.
            guard let n = UInt64(b), n > 0 else { return .unsatisfiable }
            guard length > 0 else { return .unsatisfiable }
            return .range((length - min(n, length))...(length - 1))
        }
        guard let lo = UInt64(a) else { return .none }
        guard lo < length else { return .unsatisfiable }
        if b.isEmpty { return .range(lo...(length - 1)) }
        guard let hi = UInt64(b), hi >= lo else { return .none }
        return .range(lo...min(hi, length - 1))
    }
}

extension StorageError {
    /// The HTTP status that answers this failure.
    var httpStatus: HTTPResponse.Status {
        switch self {
        case .uuidInvalid, .vdiMissing, .handleInvalid: return .notFound
        case .vdiReadonly: return .forbidden
        case .valueNotSupported, .importError, .vdiIncompatibleType: return .badRequest
        case .vdiTooSmall: return .contentTooLarge
        case .vdiInUse, .operationNotAllowed: return .conflict
        case .taskCancelled: return .init(code: 499, reasonPhrase: "Client Closed Request")
        default: return .internalServerError
        }
    }
}
