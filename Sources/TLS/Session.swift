import CGnuTLS
#if canImport(Glibc)
import Glibc
#endif

/// One server-side TLS session over a non-blocking socket. GnuTLS reads the socket
/// itself; every call may answer "would block", and the caller retries when the socket is
/// ready, as GnuTLS's non-blocking mode asks.
///
/// Sending goes through `OutputGather`: GnuTLS hands over one record (at most 16 KiB) per
/// push, and the records gather into sends of up to 256 KiB. A 1 MiB read reply then costs
/// 4 send calls instead of 64, and the peer gets fewer, larger segments. The caller
/// flushes (`flushOutput`) when it has no more to write for now.
public final class TLSSession {
    let session: gnutls_session_t
    let credentials: ServerCredentials
    let fd: Int32
    let gather: OutputGather

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
        self.fd = fd
        self.gather = OutputGather(fd: fd)
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
        // Reads use GnuTLS's own recv on the descriptor; sends go to the gather buffer.
        gnutls_transport_set_ptr2(session, UnsafeMutableRawPointer(bitPattern: Int(fd)),
                                  Unmanaged.passUnretained(gather).toOpaque())
        gnutls_transport_set_push_function(session) { ptr, data, length in
            let g = Unmanaged<OutputGather>.fromOpaque(ptr!).takeUnretainedValue()
            return g.push(data, length)
        }
    }

    deinit { gnutls_deinit(session) }

    public func handshake() throws(GnuTLSError) -> Progress {
        let rc = gnutls_handshake(session)
        // Handshake messages must reach the peer before we wait for its answer.
        let flushed = (try? gather.flush()) ?? false
        // Done: anything still buffered leaves with the next flush of output.
        if rc == 0 { return .done }
        if rc == GnuTLSError.again || rc == GnuTLSError.interrupted || gnutls_error_is_fatal(rc) == 0 {
            return .wouldBlock(wantsWrite: !flushed || gnutls_record_get_direction(session) == 1)
        }
        throw GnuTLSError(rc, "TLS handshake")
    }

    /// Sends what the gather buffer holds: true when it is empty, false when the socket
    /// would block (retry when it is writable).
    public func flushOutput() throws(GnuTLSError) -> Bool {
        do { return try gather.flush() } catch { throw GnuTLSError(GnuTLSError.pushError, "TLS send: \(String(cString: strerror(error.errno)))") }
    }

    /// Ciphertext waiting for the socket.
    public var hasPendingOutput: Bool { gather.count > 0 }

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

    public func bye() {
        _ = gnutls_bye(session, GNUTLS_SHUT_WR)
        _ = try? gather.flush()
    }

    /// The negotiated cipher, for the log ("AES-128-GCM").
    public var cipherName: String {
        gnutls_cipher_get_name(gnutls_cipher_get(session)).map { String(cString: $0) } ?? "?"
    }
}

/// Records GnuTLS has sealed, waiting to leave in one send. GnuTLS pushes one record per
/// call; this takes it whole or not at all (EAGAIN, and GnuTLS offers the same record
/// again), so no record is ever split between the buffer and a refusal.
final class OutputGather {
    struct SendError: Error { var errno: Int32 }

    static let capacity = 256 * 1024
    let fd: Int32
    private let storage = UnsafeMutableRawBufferPointer.allocate(byteCount: OutputGather.capacity, alignment: 16)
    private var start = 0
    private var end = 0

    init(fd: Int32) { self.fd = fd }
    deinit { storage.deallocate() }

    var count: Int { end - start }

    /// GnuTLS's push: buffers the record, sending what is buffered first if it does not
    /// fit. A refusal sets errno to EAGAIN (GnuTLS's default errno function reads it).
    func push(_ data: UnsafeRawPointer?, _ length: Int) -> Int {
        guard let data, length > 0 else { return 0 }
        if end + length > Self.capacity {
            do {
                _ = try flush()
            } catch {
                errno = error.errno
                return -1
            }
            if end + length > Self.capacity && start > 0 {
                storage.baseAddress!.copyMemory(from: storage.baseAddress! + start, byteCount: count)
                end -= start
                start = 0
            }
            if end + length > Self.capacity {
                guard count == 0 else {
                    errno = EAGAIN  // the socket takes no more for now
                    return -1
                }
                // Larger than the whole buffer (never a TLS record): straight to the socket.
                let n = Glibc.send(fd, data, length, Int32(MSG_NOSIGNAL))
                return n
            }
        }
        (storage.baseAddress! + end).copyMemory(from: data, byteCount: length)
        end += length
        return length
    }

    /// Sends the buffer: true when empty, false when the socket would block.
    func flush() throws(SendError) -> Bool {
        while start < end {
            let n = Glibc.send(fd, storage.baseAddress! + start, end - start, Int32(MSG_NOSIGNAL))
            if n > 0 {
                start += n
                continue
            }
            if n < 0 && errno == EINTR { continue }
            if n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) { return false }
            throw SendError(errno: n < 0 ? errno : EPIPE)
        }
        start = 0
        end = 0
        return true
    }
}
