import CGnuTLS
import Foundation

/// Server credentials: an X.509 certificate and key, optionally a PSK file and a CA to
/// verify client certificates against. Immutable once made; sessions retain the object
/// they started with, so a reload (SIGHUP) never disturbs a running session.
public final class ServerCredentials: @unchecked Sendable {
    // Unchecked: the GnuTLS credential handles are C pointers, made in init and never
    // changed; GnuTLS lets sessions on any thread share one credentials structure.
    let x509: gnutls_certificate_credentials_t
    let psk: gnutls_psk_server_credentials_t?
    public let priority: String
    public let verifyPeer: Bool
    /// PEM of the certificate clients should trust (the CA that signed ours).
    public let trustAnchorPEM: String
    /// The first DNS subject alternative name of the server certificate.
    public let subject: String

    /// The default priority: TLS 1.3 and 1.2, AEAD ciphers only, and the server's order
    /// decides: AES-128-GCM first. Clients built on GnuTLS or OpenSSL ask for AES-256-GCM
    /// first; the 128-bit key is the suite TLS 1.3 makes mandatory, and with AES-NI it
    /// costs both ends about a fifth less per byte (bulk reads over TLS are what backups do).
    public static let defaultPriority =
        "NORMAL:-VERS-ALL:+VERS-TLS1.3:+VERS-TLS1.2:-CIPHER-ALL:+AES-128-GCM:+AES-256-GCM:+CHACHA20-POLY1305:+AES-128-CCM:+AES-256-CCM:%SERVER_PRECEDENCE"
    /// What a PSK file adds to the priority (the key exchanges qemu and nbdkit use).
    static let pskPriority = ":+ECDHE-PSK:+DHE-PSK:+PSK"

    /// - Parameters:
    ///   - certsDirectory: holds `server-cert.pem`, `server-key.pem` and (for clients and
    ///     `verifyPeer`) `ca-cert.pem`.
    ///   - pskFile: a psktool file (`username:hexkey` lines), as qemu-nbd and nbdkit read.
    public init(certsDirectory dir: String, priority: String = ServerCredentials.defaultPriority,
                pskFile: String? = nil, verifyPeer: Bool = false) throws(GnuTLSError) {
        var c: gnutls_certificate_credentials_t?
        try check(gnutls_certificate_allocate_credentials(&c), "gnutls_certificate_allocate_credentials")
        x509 = c!
        var pskCreds: gnutls_psk_server_credentials_t?
        do throws(GnuTLSError) {
            try check(gnutls_certificate_set_x509_key_file(x509, dir + "/server-cert.pem", dir + "/server-key.pem",
                                                           GNUTLS_X509_FMT_PEM), "loading \(dir)/server-cert.pem and server-key.pem")
            if verifyPeer {
                let n = gnutls_certificate_set_x509_trust_file(x509, dir + "/ca-cert.pem", GNUTLS_X509_FMT_PEM)
                try check(n, "loading \(dir)/ca-cert.pem to verify clients")
                if n == 0 { throw GnuTLSError(-1, "\(dir)/ca-cert.pem holds no certificate to verify clients") }
            }
            if let f = pskFile {
                guard FileManager.default.isReadableFile(atPath: f) else { throw GnuTLSError(-64, "PSK file \(f) is not readable") }
                try check(gnutls_psk_allocate_server_credentials(&pskCreds), "gnutls_psk_allocate_server_credentials")
                try check(gnutls_psk_set_server_credentials_file(pskCreds, f), "loading PSK file \(f)")
            }
            let full = pskFile == nil ? priority : priority + Self.pskPriority
            // Check the priority string now, so a typo fails at start-up.
            var p: gnutls_priority_t?
            var errPos: UnsafePointer<CChar>?
            try check(gnutls_priority_init(&p, full, &errPos), "priority string '\(full)'")
            gnutls_priority_deinit(p)
            self.priority = full
        } catch {
            gnutls_certificate_free_credentials(x509)
            if let p = pskCreds { gnutls_psk_free_server_credentials(p) }
            throw error
        }
        psk = pskCreds
        self.verifyPeer = verifyPeer
        let caPath = dir + "/ca-cert.pem"
        trustAnchorPEM = (try? String(contentsOfFile: caPath, encoding: .utf8))
            ?? ((try? String(contentsOfFile: dir + "/server-cert.pem", encoding: .utf8)) ?? "")
        subject = (try? CertificateFactory.firstDNSName(pemFile: dir + "/server-cert.pem")) ?? ""
    }

    deinit {
        gnutls_certificate_free_credentials(x509)
        if let p = psk { gnutls_psk_free_server_credentials(p) }
    }
}
