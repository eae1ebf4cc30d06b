import Foundation
import Logging
#if canImport(Glibc)
import Glibc
#endif

/// JSON-RPC 2.0 over a Unix stream socket, one JSON object per line each way.
/// Requests run one at a time on one thread of its own: admin operations are few and must
/// not race. The thread waits with poll(2) rather than Dispatch sources: every client that
/// exits hangs up its socket, and libdispatch's epoll backend can leave a stale
/// registration behind for a hung-up descriptor, so a later socket given the same number
/// would never signal (a `vdictl` call that waits forever).
public final class ControlServer: @unchecked Sendable {
    // Unchecked: the descriptor tables and buffers belong to the poll thread alone;
    // requests run on per-client queues and touch only `api` (Sendable) and the reply's fd.
    let api: ControlAPI
    let path: String
    let logger: Logger
    var listenFD: Int32 = -1
    /// A pipe whose read end wakes the thread to stop.
    var wakeFDs: [Int32] = [-1, -1]
    /// Bytes read from each client and not yet a whole line (the thread's own).
    var buffers: [Int32: Data] = [:]
    /// Each client's requests run in order on its own queue, so a long request (a scan
    /// that waits for the collector, a snapshot's syncs) holds up only its own client;
    /// the poll thread only reads.
    var queues: [Int32: DispatchQueue] = [:]
    /// Descriptors passed with each client's bytes (SCM_RIGHTS), with the position in its
    /// stream of the first byte they came with: they belong to the line holding that byte.
    var passed: [Int32: [(pos: Int, fd: Int32)]] = [:]
    /// Bytes received from each client / the stream position of its buffer's first byte.
    var received: [Int32: Int] = [:]
    var lineStart: [Int32: Int] = [:]
    /// Longest request line accepted.
    static let maxLine = 1 << 20
    /// The user ids whose processes may use the socket (SO_PEERCRED), on top of its mode.
    let allowedUIDs: Set<uid_t>
    /// Refusals logged so far (the first few each, then one line per 100).
    var refusals = 0

    /// `allowedUIDs` defaults to the server's own uid and root.
    public init(api: ControlAPI, path: String, logger: Logger, allowedUIDs: Set<uid_t>? = nil) {
        self.api = api
        self.path = path
        self.logger = logger
        self.allowedUIDs = allowedUIDs ?? [getuid(), 0]
    }

    /// The peer's uid and pid as the kernel saw them at connect (nil if it cannot say).
    static func peer(_ fd: Int32) -> (uid: uid_t, pid: pid_t)? {
        // struct ucred (pid, uid, gid), which Glibc's module shows only under _GNU_SOURCE.
        var cred: (pid: Int32, uid: UInt32, gid: UInt32) = (0, 0, 0)
        var len = socklen_t(MemoryLayout<(Int32, UInt32, UInt32)>.size)
        guard getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) == 0, len == 12 else { return nil }
        return (cred.uid, cred.pid)
    }

    /// Answers a peer whose uid is not allowed with one JSON-RPC error, logs it, and
    /// closes; true if it was refused.
    func refuseIfNotAllowed(_ fd: Int32) -> Bool {
        let who = Self.peer(fd)
        if let who, allowedUIDs.contains(who.uid) { return false }
        let detail = who.map { "uid \($0.uid) (pid \($0.pid)) may not use this control socket; allowed: \(allowedUIDs.sorted().map(String.init).joined(separator: ", ")) (--control-allow-uid)" }
            ?? "the peer's credentials cannot be read"
        refusals += 1
        if refusals <= 5 || refusals % 100 == 0 {
            logger.warning("control: refused a client: \(detail)\(refusals > 5 ? " (\(refusals) refusals so far)" : "")")
        }
        respond(fd, RPCResponse(result: nil, error: RPCError(code: -32001, message: "Permission denied", data: .string(detail)), id: nil))
        // Closed a moment later, not at once: a client that writes its request before it
        // reads (vdictl does) would get EPIPE instead of the answer. Nothing it sends is read.
        shutdown(fd, Int32(SHUT_WR))
        DispatchQueue.global().asyncAfter(deadline: .now() + 1) { _ = Glibc.close(fd) }
        return true
    }

    public func start(listenFD fd: Int32) {
        listenFD = fd
        _ = pipe(&wakeFDs)
        for f in wakeFDs { _ = fcntl(f, F_SETFD, FD_CLOEXEC) }
        let t = Thread { [self] in run() }
        t.name = "vdinbd.control"
        t.start()
        logger.info("control socket at \(path)")
    }

    /// Removes the socket at once and tells the thread to close everything; it does so
    /// after the request it may be running (shutdown must not wait for a long one).
    public func stop() {
        unlink(path)
        var b: UInt8 = 1
        _ = write(wakeFDs[1], &b, 1)
    }

    func run() {
        while true {
            let clients = Array(buffers.keys)
            var fds = [pollfd(fd: wakeFDs[0], events: Int16(POLLIN), revents: 0),
                       pollfd(fd: listenFD, events: Int16(POLLIN), revents: 0)]
            fds += clients.map { pollfd(fd: $0, events: Int16(POLLIN), revents: 0) }
            if poll(&fds, nfds_t(fds.count), -1) < 0 {
                if errno == EINTR { continue }
                logger.error("control socket poll: \(String(cString: strerror(errno)))")
                return
            }
            if fds[0].revents != 0 {
                for c in clients { drop(c) }
                buffers = [:]
                Glibc.close(listenFD)
                return
            }
            if fds[1].revents != 0 { acceptAll() }
            for (i, c) in clients.enumerated() where fds[i + 2].revents != 0 { readable(c) }
        }
    }

    func acceptAll() {
        while true {
            let fd = accept(listenFD, nil, nil)
            if fd < 0 {
                if errno == EINTR || errno == ECONNABORTED { continue }
                return
            }
            _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
            if refuseIfNotAllowed(fd) { continue }
            _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
            buffers[fd] = Data()
            queues[fd] = DispatchQueue(label: "vdinbd.control.client")
        }
    }

    func readable(_ fd: Int32) {
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            var fds: [Int32] = []
            let n = chunk.withUnsafeMutableBytes { receive(fd, $0, fds: &fds) }
            if !fds.isEmpty { passed[fd, default: []] += fds.map { (received[fd, default: 0], $0) } }
            if n > 0 {
                buffers[fd, default: Data()].append(contentsOf: chunk[0..<n])
                received[fd, default: 0] += n
                continue
            }
            if n < 0 && errno == EINTR { continue }
            if n < 0 && errno == EAGAIN { break }
            // EOF or an error: answer what is complete, then close.
            serveLines(fd)
            drop(fd)
            return
        }
        serveLines(fd)
        if let d = buffers[fd], d.count > Self.maxLine {
            queues[fd]?.async { [self] in
                respond(fd, RPCResponse(result: nil, error: .invalidRequest("request line longer than \(Self.maxLine) bytes"), id: nil))
            }
            drop(fd)
        }
    }

    /// One recvmsg: bytes into `buf`, passed descriptors (close-on-exec) into `fds`.
    func receive(_ fd: Int32, _ buf: UnsafeMutableRawBufferPointer, fds: inout [Int32]) -> Int {
        let space = ControlFD.space(count: 8)
        let control = UnsafeMutableRawBufferPointer.allocate(byteCount: space, alignment: 8)
        defer { control.deallocate() }
        var iov = iovec(iov_base: buf.baseAddress, iov_len: buf.count)
        return withUnsafeMutablePointer(to: &iov) { iovp in
            var msg = msghdr()
            msg.msg_iov = iovp
            msg.msg_iovlen = 1
            msg.msg_control = control.baseAddress
            msg.msg_controllen = space
            let n = recvmsg(fd, &msg, Int32(MSG_CMSG_CLOEXEC))
            if n >= 0 { fds = ControlFD.parse(UnsafeRawBufferPointer(rebasing: control[0..<Int(msg.msg_controllen)])) }
            return n
        }
    }

    /// Answers every whole line buffered for `fd`.
    func serveLines(_ fd: Int32) {
        while let data = buffers[fd], let nl = data.firstIndex(of: 0x0A) {
            let line = data[data.startIndex..<nl]
            buffers[fd] = Data(data[(nl + 1)...])
            let start = lineStart[fd, default: 0]
            let end = start + (nl - data.startIndex) + 1
            lineStart[fd] = end
            let mine = (passed[fd] ?? []).filter { $0.pos < end }.map(\.fd)
            passed[fd] = (passed[fd] ?? []).filter { $0.pos >= end }
            if line.allSatisfy({ $0 == 0x20 || $0 == 0x0D || $0 == 0x09 }) {
                for f in mine { Glibc.close(f) }
                continue
            }
            let request = Data(line)
            queues[fd]?.async { [self] in
                respond(fd, api.handle(line: request, fds: mine))
                for f in mine { Glibc.close(f) }
            }
        }
    }

    func respond(_ fd: Int32, _ r: RPCResponse) {
        guard var out = Self.fastEncode(r) ?? (try? JSONEncoder().encode(r)) else { return }
        out.append(0x0A)
        // Wait for the client to read when its buffer is full (bounded by a timeout).
        out.withUnsafeBytes { raw in
            var done = 0
            while done < raw.count {
                let n = send(fd, raw.baseAddress! + done, raw.count - done, Int32(MSG_NOSIGNAL))
                if n > 0 { done += n; continue }
                if n < 0 && errno == EINTR { continue }
                guard n < 0 && errno == EAGAIN else { return }
                var p = pollfd(fd: fd, events: Int16(POLLOUT), revents: 0)
                guard poll(&p, 1, 10_000) == 1 else { return }
            }
        }
    }

    /// A large plain string result (a changed-block bitmap of a 2 TiB disk is 5.5 MB of
    /// base64) is framed by hand: it needs no escaping, and the generic encoder is slow.
    static func fastEncode(_ r: RPCResponse) -> Data? {
        guard r.error == nil, let id = try? JSONEncoder().encode(r.id ?? .null) else { return nil }
        func frame(_ body: (inout Data) -> Void, count: Int) -> Data {
            var d = Data(capacity: count + 64)
            d.append(contentsOf: #"{"jsonrpc":"2.0","result":""#.utf8)
            body(&d)
            d.append(contentsOf: #"","id":"#.utf8)
            d.append(id)
            d.append(UInt8(ascii: "}"))
            return d
        }
        switch r.result {
        case .ascii(let b)?:
            return frame({ d in b.withUnsafeBufferPointer { d.append($0) } }, count: b.count)
        case .string(var s)? where s.utf8.count > 65536
            && s.withUTF8({ $0.allSatisfy { $0 >= 0x20 && $0 != 0x22 && $0 != 0x5C && $0 < 0x80 } }):
            return frame({ d in s.withUTF8 { d.append($0) } }, count: s.utf8.count)
        default:
            return nil
        }
    }

    /// Stops reading the client; its descriptor closes once its queued requests are answered.
    func drop(_ fd: Int32) {
        guard buffers.removeValue(forKey: fd) != nil else { return }
        for p in passed.removeValue(forKey: fd) ?? [] { Glibc.close(p.fd) }
        received[fd] = nil
        lineStart[fd] = nil
        if let q = queues.removeValue(forKey: fd) { q.async { _ = Glibc.close(fd) } } else { Glibc.close(fd) }
    }
}

/// A blocking client for `vdictl` and tests.
public final class ControlClient {
    let fd: Int32
    var nextID = 1
    var pending = Data()

    public init(path: String) throws {
        fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw RPCError(code: -32000, message: "socket: \(String(cString: strerror(errno)))") }
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: addr.sun_path) else {
            Glibc.close(fd)
            throw RPCError(code: -32000, message: "socket path too long: \(path)")
        }
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in
            for (i, b) in bytes.enumerated() { raw[i] = b }
        }
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard rc == 0 else {
            let e = String(cString: strerror(errno))
            Glibc.close(fd)
            throw RPCError(code: -32000, message: "cannot connect to \(path): \(e) (is vdinbd running?)")
        }
    }

    deinit { Glibc.close(fd) }

    /// Calls a method; returns its result or throws the RPCError.
    /// `passing`: a descriptor sent with the request (SCM_RIGHTS) for `VDI.export` and
    /// `VDI.import`.
    public func call(_ method: String, _ params: [JSONValue], passing passed: Int32? = nil) throws -> JSONValue {
        let req = RPCRequest(method: method, params: params, id: nextID)
        nextID += 1
        var data = try JSONEncoder().encode(req)
        data.append(0x0A)
        try data.withUnsafeBytes { raw in
            var done = 0
            if let pass = passed {
                done = try ControlFD.send(fd, raw, passing: pass)
            }
            while done < raw.count {
                let n = send(fd, raw.baseAddress! + done, raw.count - done, Int32(MSG_NOSIGNAL))
                guard n > 0 else { throw RPCError(code: -32000, message: "send: \(String(cString: strerror(errno)))") }
                done += n
            }
        }
        var chunk = [UInt8](repeating: 0, count: 1 << 20)
        // Look for the newline only in what each read adds (a bitmap reply is megabytes).
        var newline = pending.firstIndex(of: 0x0A)
        while newline == nil {
            let n = read(fd, &chunk, chunk.count)
            guard n > 0 else { throw RPCError(code: -32000, message: "control socket closed") }
            let start = pending.endIndex
            pending.append(contentsOf: chunk[0..<n])
            newline = pending[start...].firstIndex(of: 0x0A)
        }
        let nl = newline!
        let line = pending[pending.startIndex..<nl]
        pending = Data(pending[(nl + 1)...])
        let resp = try JSONDecoder().decode(RPCResponse.self, from: line)
        if let e = resp.error { throw e }
        return resp.result ?? .null
    }
}

/// SCM_RIGHTS control messages, laid out as Linux's CMSG_* macros do.
enum ControlFD {
    static let header = MemoryLayout<cmsghdr>.size
    static func align(_ n: Int) -> Int { (n + MemoryLayout<Int>.size - 1) & ~(MemoryLayout<Int>.size - 1) }
    static func space(count: Int) -> Int { align(header) + align(count * 4) }

    /// The descriptors in a received control buffer.
    static func parse(_ control: UnsafeRawBufferPointer) -> [Int32] {
        var out: [Int32] = []
        var at = 0
        while at + header <= control.count {
            let h = control.loadUnaligned(fromByteOffset: at, as: cmsghdr.self)
            let len = Int(h.cmsg_len)
            guard len >= header, at + len <= control.count else { break }
            if h.cmsg_level == SOL_SOCKET && h.cmsg_type == Int32(SCM_RIGHTS) {
                for k in 0..<((len - align(header)) / 4) {
                    out.append(control.loadUnaligned(fromByteOffset: at + align(header) + 4 * k, as: Int32.self))
                }
            }
            at += align(len)
        }
        return out
    }

    /// Sends the first bytes of `raw` with `fd` attached; returns how many were sent.
    static func send(_ sock: Int32, _ raw: UnsafeRawBufferPointer, passing fd: Int32) throws -> Int {
        let space = space(count: 1)
        let control = UnsafeMutableRawBufferPointer.allocate(byteCount: space, alignment: 8)
        defer { control.deallocate() }
        control.initializeMemory(as: UInt8.self, repeating: 0)
        var h = cmsghdr()
        h.cmsg_len = numericCast(align(header) + 4)
        h.cmsg_level = SOL_SOCKET
        h.cmsg_type = Int32(SCM_RIGHTS)
        control.storeBytes(of: h, toByteOffset: 0, as: cmsghdr.self)
        control.storeBytes(of: fd, toByteOffset: align(header), as: Int32.self)
        var iov = iovec(iov_base: UnsafeMutableRawPointer(mutating: raw.baseAddress), iov_len: raw.count)
        let n = withUnsafeMutablePointer(to: &iov) { iovp -> Int in
            var msg = msghdr()
            msg.msg_iov = iovp
            msg.msg_iovlen = 1
            msg.msg_control = control.baseAddress
            msg.msg_controllen = space
            return sendmsg(sock, &msg, Int32(MSG_NOSIGNAL))
        }
        guard n > 0 else { throw RPCError(code: -32000, message: "sendmsg: \(String(cString: strerror(errno)))") }
        return n
    }
}
