// Export tokens at rest: the SR keeps a token's SHA-256 digest, never its secret, so a
// copy of metadata.db (a backup, a support bundle) grants nothing.

import CGnuTLS

enum TokenDigest {
    /// The lower-case hex SHA-256 of `secret` (GnuTLS's hash; already linked for TLS).
    static func of(_ secret: String) -> String {
        var out = [UInt8](repeating: 0, count: 32)
        let bytes = Array(secret.utf8)
        let rc = bytes.withUnsafeBytes { b in out.withUnsafeMutableBytes { gnutls_hash_fast(GNUTLS_DIG_SHA256, b.baseAddress, b.count, $0.baseAddress) } }
        precondition(rc == 0, "gnutls_hash_fast(SHA-256) failed: \(rc)")
        let hex: [UInt8] = Array("0123456789abcdef".utf8)
        var s = [UInt8](); s.reserveCapacity(64)
        for x in out { s.append(hex[Int(x >> 4)]); s.append(hex[Int(x & 15)]) }
        return String(decoding: s, as: UTF8.self)
    }

    /// Compares two strings in time that depends only on their lengths.
    static func equal(_ a: String, _ b: String) -> Bool {
        let x = Array(a.utf8), y = Array(b.utf8)
        guard x.count == y.count else { return false }
        var d: UInt8 = 0
        for i in x.indices { d |= x[i] ^ y[i] }
        return d == 0
    }
}
