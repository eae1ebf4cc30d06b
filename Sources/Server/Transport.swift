import Foundation
import NIOCore
import TLS
#if canImport(Glibc)
import Glibc
#endif

enum TransportRead {
    case bytes(Int)
    case wouldBlock
    case eof
    case failed(String)
}

enum TransportWrite {
    case wrote(Int)
    case wouldBlock
    case failed(String)
}

/// The byte stream under the NBD protocol: plain sockets, or TLS after STARTTLS. The
/// connection above swaps it and never knows which it has.
protocol Transport: AnyObject {
    func read(into buffer: UnsafeMutableRawBufferPointer) -> TransportRead
    func write(_ buffer: UnsafeRawBufferPointer) -> TransportWrite
    /// Writes several buffers with one call and no copy (sendmsg); nil if this transport
    /// cannot (TLS, where merged buffers make one record instead).
    func writeGathered<C: Collection<Outgoing>>(_ buffers: C) -> TransportWrite?
    /// Decrypted bytes already waiting (a TLS record read in full); the socket may then not signal.
    var hasBufferedInput: Bool { get }
    /// Sends what the transport itself still holds (TLS records gathered for one send):
    /// `.wrote(0)` once nothing is left, `.wouldBlock` to retry when writable.
    func flushPending() -> TransportWrite
}

final class PlainTransport: Transport {
    let fd: Int32
    init(fd: Int32) { self.fd = fd }

    func read(into buffer: UnsafeMutableRawBufferPointer) -> TransportRead {
        while true {
            let n = Glibc.read(fd, buffer.baseAddress, buffer.count)
            if n > 0 { return .bytes(n) }
            if n == 0 { return .eof }
            if errno == EINTR { continue }
            if errno == EAGAIN || errno == EWOULDBLOCK { return .wouldBlock }
            return .failed(String(cString: strerror(errno)))
        }
    }

    func write(_ buffer: UnsafeRawBufferPointer) -> TransportWrite {
        while true {
            let n = send(fd, buffer.baseAddress, buffer.count, Int32(MSG_NOSIGNAL))
            if n >= 0 { return .wrote(n) }
            if errno == EINTR { continue }
            if errno == EAGAIN || errno == EWOULDBLOCK { return .wouldBlock }
            return .failed(String(cString: strerror(errno)))
        }
    }

    func writeGathered<C: Collection<Outgoing>>(_ buffers: C) -> TransportWrite? {
        var iov: [iovec] = []
        iov.reserveCapacity(buffers.count)
        // The pointers stay valid: `buffers` is borrowed unchanged for the whole call.
        for b in buffers {
            b.withUnsafeReadableBytes { iov.append(iovec(iov_base: UnsafeMutableRawPointer(mutating: $0.baseAddress), iov_len: $0.count)) }
        }
        return iov.withUnsafeMutableBufferPointer { v in
            var msg = msghdr()
            msg.msg_iov = v.baseAddress
            msg.msg_iovlen = v.count
            while true {
                let n = sendmsg(fd, &msg, Int32(MSG_NOSIGNAL))
                if n >= 0 { return .wrote(n) }
                if errno == EINTR { continue }
                if errno == EAGAIN || errno == EWOULDBLOCK { return .wouldBlock }
                return .failed(String(cString: strerror(errno)))
            }
        }
    }

    var hasBufferedInput: Bool { false }

    func flushPending() -> TransportWrite { .wrote(0) }
}

/// TLS over the same socket, after STARTTLS.
final class TLSTransport: Transport {
    let session: TLSSession
    init(session: TLSSession) { self.session = session }

    func read(into buffer: UnsafeMutableRawBufferPointer) -> TransportRead {
        do {
            guard let n = try session.read(into: buffer) else { return .wouldBlock }
            return n == 0 ? .eof : .bytes(n)
        } catch {
            return .failed("\(error)")
        }
    }

    func write(_ buffer: UnsafeRawBufferPointer) -> TransportWrite {
        do {
            guard let n = try session.write(buffer) else { return .wouldBlock }
            return .wrote(n)
        } catch {
            return .failed("\(error)")
        }
    }

    func writeGathered<C: Collection<Outgoing>>(_ buffers: C) -> TransportWrite? { nil }

    var hasBufferedInput: Bool { session.pendingBytes > 0 }

    func flushPending() -> TransportWrite {
        do {
            return try session.flushOutput() ? .wrote(0) : .wouldBlock
        } catch {
            return .failed("\(error)")
        }
    }
}
