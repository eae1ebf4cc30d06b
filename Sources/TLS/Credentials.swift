import CGnuTLS
import Foundation

/// Server credentials: an X.509 certificate and key (and optional PSK), shared by sessions.
public final class ServerCredentials: @unchecked Sendable {
    let x509: gnutls_certificate_credentials_t
    public let priority: String
    /// PEM of the certificate clients should trust (the CA that signed ours).
    public let trustAnchorPEM: String
    /// The first DNS subject alternative name of the server certificate.
    public let subject: String

    /// The default priority: TLS 1.3 and 1.2 (ECDHE with AES-GCM among the 1.2 suites).
    public static let defaultPriority = "NORMAL:-VERS-ALL:+VERS-TLS1.3:+VERS-TLS1.2"

    public init(certsDirectory dir: String, priority: String = ServerCredentials.defaultPriority) throws(GnuTLSError) {
        var c: gnutls_certificate_credentials_t?
        try check(gnutls_certificate_allocate_credentials(&c), "gnutls_certificate_allocate_credentials")
        x509 = c!
        try check(gnutls_certificate_set_x509_key_file(x509, dir + "/server-cert.pem", dir + "/server-key.pem",
                                                       GNUTLS_X509_FMT_PEM), "loading \(dir)/server-cert.pem and server-key.pem")
        // Check the priority string now, so a typo fails at start-up.
        var p: gnutls_priority_t?
        var errPos: UnsafePointer<CChar>?
        try check(gnutls_priority_init(&p, priority, &errPos), "priority string '\(priority)'")
        gnutls_priority_deinit(p)
        self.priority = priority
        let caPath = dir + "/ca-cert.pem"
        trustAnchorPEM = (try? String(contentsOfFile: caPath, encoding: .utf8))
            ?? ((try? String(contentsOfFile: dir + "/server-cert.pem", encoding: .utf8)) ?? "")
        subject = (try? CertificateFactory.firstDNSName(pemFile: dir + "/server-cert.pem")) ?? ""
    }

    deinit { gnutls_certificate_free_credentials(x509) }
}
