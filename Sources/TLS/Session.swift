import CGnuTLS
#if canImport(Glibc)
import Glibc
#endif

/// One server-side TLS session over a non-blocking socket. GnuTLS reads and writes the
/// socket itself; every call may answer "would block", and the caller retries when the
/// socket is ready, as GnuTLS's non-blocking mode asks.
public final class TLSSession {
    let session: gnutls_session_t
    let credentials: ServerCredentials

    public enum Progress: Equatable {
        case done
        /// Retry when the socket is readable (or writable, if `wantsWrite`).
        case wouldBlock(wantsWrite: Bool)
    }

    public init(fd: Int32, credentials: ServerCredentials) throws(GnuTLSError) {
        var s: gnutls_session_t?
        try check(gnutls_init(&s, UInt32(GNUTLS_SERVER) | UInt32(GNUTLS_NONBLOCK)), "gnutls_init")
        session = s!
        self.credentials = credentials
        var errPos: UnsafePointer<CChar>?
        try check(gnutls_priority_set_direct(session, credentials.priority, &errPos), "gnutls_priority_set_direct")
        try check(gnutls_credentials_set(session, GNUTLS_CRD_CERTIFICATE, UnsafeMutableRawPointer(credentials.x509)),
                  "gnutls_credentials_set")
        if let psk = credentials.psk {
            try check(gnutls_credentials_set(session, GNUTLS_CRD_PSK, UnsafeMutableRawPointer(psk)), "gnutls_credentials_set PSK")
        }
        if credentials.verifyPeer {
            gnutls_certificate_server_set_request(session, GNUTLS_CERT_REQUIRE)
            // Verified during the handshake against the CA: a bad client certificate fails it.
            gnutls_session_set_verify_cert(session, nil, 0)
        } else {
            gnutls_certificate_server_set_request(session, GNUTLS_CERT_IGNORE)
        }
        gnutls_transport_set_int2(session, fd, fd)
    }

    deinit { gnutls_deinit(session) }

    public func handshake() throws(GnuTLSError) -> Progress {
        let rc = gnutls_handshake(session)
        if rc == 0 { return .done }
        if rc == GnuTLSError.again || rc == GnuTLSError.interrupted || gnutls_error_is_fatal(rc) == 0 {
            return .wouldBlock(wantsWrite: gnutls_record_get_direction(session) == 1)
        }
        throw GnuTLSError(rc, "TLS handshake")
    }

    /// Bytes read (> 0), 0 at a clean end of stream, nil when it would block.
    public func read(into buffer: UnsafeMutableRawBufferPointer) throws(GnuTLSError) -> Int? {
        let n = gnutls_record_recv(session, buffer.baseAddress, buffer.count)
        if n >= 0 { return n }
        if n == Int(GnuTLSError.again) || n == Int(GnuTLSError.interrupted) { return nil }
        // A peer that closes without close_notify ends the stream too.
        if n == -110 { return 0 }  // GNUTLS_E_PREMATURE_TERMINATION
        throw GnuTLSError(Int32(n), "TLS read")
    }

    /// Bytes written, nil when it would block (then call again with the same data).
    public func write(_ buffer: UnsafeRawBufferPointer) throws(GnuTLSError) -> Int? {
        let n = gnutls_record_send(session, buffer.baseAddress, buffer.count)
        if n >= 0 { return n }
        if n == Int(GnuTLSError.again) || n == Int(GnuTLSError.interrupted) { return nil }
        throw GnuTLSError(Int32(n), "TLS write")
    }

    public var pendingBytes: Int { gnutls_record_check_pending(session) }

    /// The PSK identity the client used, if it used one.
    public var pskUsername: String? {
        gnutls_psk_server_get_username(session).map { String(cString: $0) }
    }

    public var protocolVersion: String {
        gnutls_protocol_get_name(gnutls_protocol_get_version(session)).map { String(cString: $0) } ?? "?"
    }

    public func bye() { _ = gnutls_bye(session, GNUTLS_SHUT_WR) }
}
