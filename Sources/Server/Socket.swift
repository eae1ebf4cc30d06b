import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// A socket-level failure, with the call and errno.
public struct SocketError: Error, CustomStringConvertible, Sendable {
    public var call: String
    public var errno: Int32
    public var description: String { "\(call): \(String(cString: strerror(errno)))" }
}

func setNonBlocking(_ fd: Int32) {
    let flags = fcntl(fd, F_GETFL)
    _ = fcntl(fd, F_SETFL, flags | O_NONBLOCK)
}

/// Binds and listens on a TCP address ("127.0.0.1", "::1", "0.0.0.0").
func listenTCP(host: String, port: Int) throws -> (fd: Int32, port: Int) {
    var hints = addrinfo()
    hints.ai_family = AF_UNSPEC
    hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
    hints.ai_flags = AI_PASSIVE | AI_NUMERICHOST
    var res: UnsafeMutablePointer<addrinfo>?
    let rc = getaddrinfo(host, String(port), &hints, &res)
    guard rc == 0, let ai = res else {
        throw SocketError(call: "getaddrinfo(\(host)): \(String(cString: gai_strerror(rc)))", errno: EINVAL)
    }
    defer { freeaddrinfo(res) }
    let fd = socket(ai.pointee.ai_family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
    guard fd >= 0 else { throw SocketError(call: "socket", errno: errno) }
    var one: Int32 = 1
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
    guard bind(fd, ai.pointee.ai_addr, ai.pointee.ai_addrlen) == 0 else {
        let e = errno
        close(fd)
        throw SocketError(call: "bind \(host):\(port)", errno: e)
    }
    guard listen(fd, 128) == 0 else {
        let e = errno
        close(fd)
        throw SocketError(call: "listen", errno: e)
    }
    var actual = port
    var sin6 = sockaddr_in6()
    var len = socklen_t(MemoryLayout<sockaddr_in6>.size)
    let got = withUnsafeMutablePointer(to: &sin6) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) == 0 }
    }
    if got {
        // sin_port and sin6_port sit at the same offset.
        actual = Int(UInt16(bigEndian: sin6.sin6_port))
    }
    setNonBlocking(fd)
    return (fd, actual)
}

/// Binds and listens on a Unix stream socket with the given mode, made as `<path>.new` and
/// renamed to `path` once it listens: whoever sees the path can connect (no ECONNREFUSED
/// between bind and listen), and a stale socket there is replaced without a moment with no
/// socket. `beforePublishing` runs just before the rename (the server prints its banner
/// there, so a script that waits for the socket finds the banner written).
public func listenUnix(path: String, mode: mode_t, beforePublishing: () -> Void = {}) throws -> Int32 {
    let staging = path + ".new"
    // Only a socket is replaced (a stale one, left by a killed server): never a file
    // that a mistyped --control-socket names.
    for p in [path, staging] {
        var st = stat()
        if lstat(p, &st) == 0 && st.st_mode & S_IFMT != S_IFSOCK {
            throw SocketError(call: "\(p) exists and is not a socket; not replacing it", errno: EEXIST)
        }
    }
    unlink(staging)  // a server killed between its bind and its rename
    let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
    guard fd >= 0 else { throw SocketError(call: "socket", errno: errno) }
    var addr = sockaddr_un()
    addr.sun_family = sa_family_t(AF_UNIX)
    let bytes = Array(staging.utf8)
    guard bytes.count < MemoryLayout.size(ofValue: addr.sun_path) else {
        close(fd)
        let most = MemoryLayout.size(ofValue: addr.sun_path) - 1 - (staging.utf8.count - path.utf8.count)
        throw SocketError(call: "socket path too long (\(path.utf8.count) bytes, \(most) at most): \(path)", errno: ENAMETOOLONG)
    }
    withUnsafeMutableBytes(of: &addr.sun_path) { raw in
        for (i, b) in bytes.enumerated() { raw[i] = b }
        raw[bytes.count] = 0
    }
    // Create it with the right mode from the start: no window where others could connect.
    let old = umask(0o777 & ~mode)
    let rc = withUnsafePointer(to: &addr) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
    }
    umask(old)
    guard rc == 0 else {
        let e = errno
        close(fd)
        throw SocketError(call: "bind \(staging)", errno: e)
    }
    chmod(staging, mode)
    guard listen(fd, 64) == 0 else {
        let e = errno
        close(fd); unlink(staging)
        throw SocketError(call: "listen", errno: e)
    }
    beforePublishing()
    guard rename(staging, path) == 0 else {
        let e = errno
        close(fd); unlink(staging)
        throw SocketError(call: "rename \(staging) to \(path)", errno: e)
    }
    setNonBlocking(fd)
    return fd
}

func peerName(_ fd: Int32) -> String {
    var ss = sockaddr_storage()
    var len = socklen_t(MemoryLayout<sockaddr_storage>.size)
    var host = [CChar](repeating: 0, count: Int(NI_MAXHOST))
    var serv = [CChar](repeating: 0, count: Int(NI_MAXSERV))
    let ok = withUnsafeMutablePointer(to: &ss) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { sp -> Bool in
            getpeername(fd, sp, &len) == 0
                && getnameinfo(sp, len, &host, socklen_t(host.count), &serv, socklen_t(serv.count), NI_NUMERICHOST | NI_NUMERICSERV) == 0
        }
    }
    return ok ? "\(String(cString: host)):\(String(cString: serv))" : "unix"
}
