import CGnuTLS

/// A GnuTLS return code, as `Errno` wraps errno.
public struct GnuTLSError: Error, Equatable, Sendable, CustomStringConvertible {
    public var code: Int32
    /// What we were doing.
    public var call: String
    public init(_ code: Int32, _ call: String) {
        self.code = code
        self.call = call
    }
    public var isFatal: Bool { gnutls_error_is_fatal(code) != 0 }
    public var description: String { "\(call): \(String(cString: gnutls_strerror(code)))" }
    /// `GNUTLS_E_AGAIN`
    public static let again: Int32 = -28
    /// `GNUTLS_E_INTERRUPTED`
    public static let interrupted: Int32 = -52
    /// GNUTLS_E_PUSH_ERROR
    public static let pushError: Int32 = -53
}

@inline(__always)
func check(_ rc: Int32, _ call: String) throws(GnuTLSError) {
    if rc < 0 { throw GnuTLSError(rc, call) }
}
