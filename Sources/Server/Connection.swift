// Design notes: one client connection.
//
// Everything about a connection — its socket events, its inbound buffer, the handshake
// state machine and the reply writer — runs on its own serial queue. Disk I/O never runs
// there: each validated request goes to the shared I/O queue, and its reply comes back to
// the connection queue to be written, so replies go out whole and in completion order.
// When the in-flight limit (requests or bytes) is reached the read source is suspended
// until replies drain: back-pressure instead of an unbounded queue.

import Dispatch
import Foundation
import Logging
import NBD
import NIOCore
import Storage
import TLS
#if canImport(Glibc)
import Glibc
#endif

/// Where a request's reply goes and how it is framed (nil: simple replies only).
struct ReplyTo {
    let cookie: UInt64
    let framing: ChunkFraming?
}

final class Connection: @unchecked Sendable {
    enum Phase {
        case clientFlags
        case optionHaggling
        case tlsHandshake(TLSSession)
        case transmission
        case closed
    }

    var isClosed: Bool { if case .closed = phase { return true }; return false }
    var inTransmission: Bool { if case .transmission = phase { return true }; return false }

    let id: Int
    let fd: Int32
    let peer: String
    let queue: DispatchQueue
    unowned let server: NBDServer
    var logger: Logger
    var transport: Transport
    var phase: Phase = .clientFlags
    var handshake: HandshakeStateMachine
    var inbound = ByteBuffer()
    var outbound: [ByteBuffer] = []
    var readSource: DispatchSourceRead?
    var writeSource: DispatchSourceWrite?
    var readSuspended = false
    var writeSuspended = true
    var sourcesLeft = 0

    var transmission: TransmissionState?
    var handle: VDIHandle?
    var requestDecoder = RequestDecoder()
    var inFlight = 0
    var inFlightBytes = 0
    var disconnectRequested = false
    var handshakeTimer: DispatchSourceTimer?
    var idleTimer: DispatchSourceTimer?
    var lastRequest = DispatchTime.now()
    lazy var resolver = SRExportResolver(sr: server.sr)

    init(id: Int, fd: Int32, server: NBDServer) {
        self.id = id
        self.fd = fd
        self.server = server
        self.peer = peerName(fd)
        self.queue = DispatchQueue(label: "vdinbd.conn.\(id)")
        self.transport = PlainTransport(fd: fd)
        self.handshake = HandshakeStateMachine(tlsPolicy: server.config.tlsPolicy)
        var l = server.logger
        l[metadataKey: "conn"] = "\(id)"
        l[metadataKey: "peer"] = "\(peerName(fd))"
        self.logger = l
    }

    func start() {
        queue.async { [self] in
            setNonBlocking(fd)
            var one: Int32 = 1
            setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
            let rs = DispatchSource.makeReadSource(fileDescriptor: fd, queue: queue)
            rs.setEventHandler { [weak self] in self?.readable() }
            rs.setCancelHandler { [weak self] in self?.sourceCancelled() }
            let ws = DispatchSource.makeWriteSource(fileDescriptor: fd, queue: queue)
            ws.setEventHandler { [weak self] in self?.flushOutbound() }
            ws.setCancelHandler { [weak self] in self?.sourceCancelled() }
            readSource = rs
            writeSource = ws
            sourcesLeft = 2
            rs.resume()
            let t = DispatchSource.makeTimerSource(queue: queue)
            t.schedule(deadline: .now() + server.config.handshakeTimeout)
            t.setEventHandler { [weak self] in
                guard let self, !self.inTransmission else { return }
                self.close(reason: "handshake timed out")
            }
            t.resume()
            handshakeTimer = t
            var greeting = ByteBuffer()
            encodeGreeting(HandshakeStateMachine.serverFlags, into: &greeting)
            send(greeting)
            logger.debug("connected")
        }
    }

    // MARK: reading

    func readable() {
        guard !isClosed else { return }
        if case .tlsHandshake(let session) = phase {
            continueTLSHandshake(session)
            return
        }
        var gotEOF = false
        // Read what is there now, up to a bound, then process.
        for _ in 0..<16 {
            var result = TransportRead.wouldBlock
            inbound.writeWithUnsafeMutableBytes(minimumWritableBytes: 256 * 1024) { ptr in
                result = transport.read(into: ptr)
                if case .bytes(let n) = result { return n }
                return 0
            }
            switch result {
            case .bytes: continue
            case .wouldBlock: break
            case .eof: gotEOF = true
            case .failed(let why):
                close(reason: "read failed: \(why)")
                return
            }
            break
        }
        process()
        if gotEOF && !isClosed {
            if inFlight > 0 {
                disconnectRequested = true
                pauseReading()
            } else {
                close(reason: "client closed the connection")
            }
        }
    }

    func process() {
        do {
            loop: while !isClosed {
                switch phase {
                case .clientFlags:
                    var d = ClientFlagsDecoder()
                    guard let flags = try d.decode(buffer: &inbound) else { break loop }
                    let actions = handshake.receive(clientFlags: flags)
                    if handshake.state == .optionHaggling { phase = .optionHaggling }
                    perform(actions)
                case .optionHaggling:
                    var d = OptionDecoder()
                    guard let opt = try d.decode(buffer: &inbound) else { break loop }
                    logger.debug("option \(opt.option)")
                    perform(handshake.receive(option: opt, resolver: resolver))
                case .transmission:
                    if disconnectRequested { break loop }
                    if inFlight >= server.config.maxInFlightRequests || inFlightBytes >= server.config.maxInFlightBytes {
                        pauseReading()
                        break loop
                    }
                    guard let r = try requestDecoder.decode(buffer: &inbound) else { break loop }
                    handle(r)
                case .closed, .tlsHandshake:
                    break loop
                }
            }
        } catch {
            close(reason: "protocol error: \(error)")
            return
        }
        // Replies made while decoding this batch (inline reads, errors) leave in one write.
        if !outbound.isEmpty && writeSuspended && !isClosed { flushOutbound() }
        if inbound.readableBytes == 0 && inbound.capacity > 4 << 20 {
            // A big WRITE grew the buffer: give the memory back while the client idles.
            inbound = ByteBuffer()
        } else {
            inbound.discardReadBytes()
        }
    }

    func pauseReading() {
        guard !readSuspended, let rs = readSource else { return }
        rs.suspend()
        readSuspended = true
    }

    func resumeReading() {
        guard readSuspended, let rs = readSource, !isClosed else { return }
        readSuspended = false
        rs.resume()
        // Bytes may already be buffered from before the pause, here or inside TLS.
        if transport.hasBufferedInput { readable() } else { process() }
    }

    // MARK: handshake

    func perform(_ actions: [HandshakeAction]) {
        for a in actions {
            switch a {
            case .send(let reply):
                var b = ByteBuffer()
                reply.encode(into: &b)
                if reply.type.rawValue & 0x8000_0000 != 0 {
                    logger.info("\(reply.option) refused: \(reply.type) \(String(decoding: reply.data, as: UTF8.self))")
                }
                send(b)
            case .sendExportNameReply(let size, let flags, let noZeroes):
                var b = ByteBuffer()
                encodeExportNameReply(size: size, flags: flags, noZeroes: noZeroes, into: &b)
                send(b)
            case .enterTransmission(let ts):
                enterTransmission(ts)
            case .close(let reason):
                close(reason: reason)
                return
            case .startTLS:
                startTLS()
                return
            }
        }
    }

    func startTLS() {
        guard let creds = server.tlsCredentials else {
            var b = ByteBuffer()
            OptionReply.error(.startTLS, .errPolicy, "TLS is not configured").encode(into: &b)
            send(b)
            return
        }
        // NBD spec: the client sends nothing after STARTTLS until it has the reply.
        guard inbound.readableBytes == 0 else {
            close(reason: "data after NBD_OPT_STARTTLS before its reply")
            return
        }
        var b = ByteBuffer()
        OptionReply(option: .startTLS, type: .ack).encode(into: &b)
        send(b)
        flushOutbound()
        guard outbound.isEmpty else {
            close(reason: "could not send the STARTTLS reply")
            return
        }
        do {
            let session = try TLSSession(fd: fd, credentials: creds)
            phase = .tlsHandshake(session)
            continueTLSHandshake(session)
        } catch {
            close(reason: "TLS setup failed: \(error)")
        }
    }

    func continueTLSHandshake(_ session: TLSSession) {
        do {
            switch try session.handshake() {
            case .done:
                transport = TLSTransport(session: session)
                handshake.tlsEstablished()
                resolver.grants = [:]
                phase = .optionHaggling
                inbound.clear()
                logger.info("TLS established (\(session.protocolVersion)\(session.pskUsername.map { ", PSK user \($0)" } ?? ""))")
                if !writeSuspended, let ws = writeSource { writeSuspended = true; ws.suspend() }
                if session.pendingBytes > 0 { readable() }
            case .wouldBlock(let wantsWrite):
                if wantsWrite, writeSuspended, let ws = writeSource {
                    writeSuspended = false
                    ws.resume()
                }
            }
        } catch {
            close(reason: "TLS handshake failed: \(error)")
        }
    }

    func enterTransmission(_ ts: TransmissionState) {
        let export = ts.export
        guard let vdi = resolver.grants[export.name]?.vdi.uuid else {
            close(reason: "export \(export.name) was not resolved")
            return
        }
        do {
            handle = try server.sr.attach(vdi)
        } catch {
            logger.error("cannot attach VDI \(vdi): \(error)")
            close(reason: "attach failed")
            return
        }
        transmission = ts
        requestDecoder.extended = ts.extendedHeaders
        phase = .transmission
        handshakeTimer?.cancel()
        handshakeTimer = nil
        if let idle = server.config.idleTimeout {
            let t = DispatchSource.makeTimerSource(queue: queue)
            t.schedule(deadline: .now() + idle, repeating: .seconds(1))
            t.setEventHandler { [weak self] in
                guard let self, self.inFlight == 0, !self.isClosed else { return }
                if DispatchTime.now() > self.lastRequest + idle { self.close(reason: "idle timeout") }
            }
            t.resume()
            idleTimer = t
        }
        logger.info("export \(vdi) attached (\(export.readOnly ? "read-only" : "read-write"), \(export.size) bytes, \(ts.extendedHeaders ? "extended headers" : ts.structuredReplies ? "structured replies" : "simple replies")\(ts.metaContexts.isEmpty ? "" : ", contexts " + ts.metaContexts.map(\.name).joined(separator: ",")))")
    }

    // MARK: transmission

    func handle(_ decoded: DecodedRequest) {
        guard let ts = transmission, let h = handle else { return }
        lastRequest = .now()
        switch decoded {
        case .oversizedWrite(let r):
            logger.info("cookie \(r.cookie): \(r.command) of \(r.length) bytes exceeds the maximum: NBD_EINVAL")
            reply(error: .einval, to: ReplyTo(cookie: r.cookie, framing: ts.framing(requestOffset: r.offset)))
            return
        case .request(let r):
            switch RequestValidator.validate(r, ts) {
            case .failure(let e):
                logger.info("cookie \(r.cookie): \(r.command) offset \(r.offset) length \(r.length) refused: \(e)")
                // NBD spec: with structured replies a READ never gets a simple reply.
                let to = ReplyTo(cookie: r.cookie, framing: ts.framing(requestOffset: r.offset))
                reply(error: e, to: to, message: r.command == .read && to.framing != nil ? "\(e)" : nil)
            case .success(let v):
                execute(v, handle: h)
            }
        }
    }

    func execute(_ v: ValidatedRequest, handle h: VDIHandle) {
        guard let ts = transmission else { return }
        func to(_ cookie: UInt64, _ offset: UInt64) -> ReplyTo { ReplyTo(cookie: cookie, framing: ts.framing(requestOffset: offset)) }
        switch v {
        case .disconnect:
            disconnectRequested = true
            pauseReading()
            if inFlight == 0 { close(reason: "client sent NBD_CMD_DISC") }
        case .read(let cookie, let offset, let length, let df):
            let r = to(cookie, offset)
            // Fast path: small reads whose data is all in the page cache are answered right
            // here, without two queue hops. preadv2(RWF_NOWAIT) never waits for the disk;
            // anything else (a miss, an error) goes the normal way on the I/O queue.
            if length <= Self.inlineReadLimit,
               let reply = try? Replies.read(h, r, offset: offset, length: length, df: df, cachedOnly: true) {
                send(reply)
                return
            }
            run(r, bytes: Int(length), what: "read at \(offset)+\(length)", chunked: r.framing != nil) {
                try Replies.read(h, r, offset: offset, length: length, df: df)
            }
        case .write(let cookie, let offset, let payload, let fua):
            // No thread waits while the change log syncs: the write resumes after it.
            runAsync(to(cookie, offset), bytes: payload.readableBytes, what: "write at \(offset)+\(payload.readableBytes)") {
                [server] finish in
                h.write(length: payload.readableBytes, at: offset, on: server.ioQueue,
                        withBytes: { body in try payload.withUnsafeReadableBytes(body) }) { error in
                    if let error { return finish(.failure(error)) }
                    if fua {
                        do { try h.flush() } catch { return finish(.failure(error)) }
                    }
                    finish(.success(nil))
                }
            }
        case .flush(let cookie):
            run(to(cookie, 0), bytes: 0, what: "flush") {
                try h.flush()
                return nil
            }
        case .trim(let cookie, let offset, let length, let fua):
            run(to(cookie, offset), bytes: 0, what: "trim at \(offset)+\(length)") {
                try h.writeZeroes(offset: offset, length: length, punch: true, fastOnly: false)
                if fua { try h.flush() }
                return nil
            }
        case .writeZeroes(let cookie, let offset, let length, let fua, let noHole, let fastZero):
            run(to(cookie, offset), bytes: 0, what: "write zeroes at \(offset)+\(length)", fastZero: fastZero) {
                try h.writeZeroes(offset: offset, length: length, punch: !noHole, fastOnly: fastZero)
                if fua { try h.flush() }
                return nil
            }
        case .cache(let cookie, let offset, let length):
            // Every read goes to the page cache already; CACHE only checks the range.
            run(to(cookie, offset), bytes: 0, what: "cache at \(offset)+\(length)") { nil }
        case .blockStatus(let cookie, let offset, let length, let reqOne, let contexts):
            let r = to(cookie, offset)
            run(r, bytes: 0, what: "block status at \(offset)+\(length)", chunked: true) {
                try Replies.blockStatus(h, r, offset: offset, length: length, reqOne: reqOne, contexts: contexts) {
                    try self.server.sr.changedBlocks(from: $0, to: h.uuid)
                }
            }
        }
    }

    /// Runs `body` on the I/O queue, then sends its reply (or a plain OK/error) from the
    /// connection queue. `chunked`: errors go back as a structured error chunk.
    func run(_ to: ReplyTo, bytes: Int, what: String, chunked: Bool = false, fastZero: Bool = false,
             _ body: @escaping () throws -> ByteBuffer?) {
        runAsync(to, bytes: bytes, what: what, chunked: chunked, fastZero: fastZero) { finish in
            do { finish(.success(try body())) } catch { finish(.failure(error)) }
        }
    }

    /// `run` for a body that finishes later, on any thread, by calling `finish` once.
    func runAsync(_ to: ReplyTo, bytes: Int, what: String, chunked: Bool = false, fastZero: Bool = false,
                  _ body: @escaping (_ finish: @escaping (Result<ByteBuffer?, Error>) -> Void) -> Void) {
        begin(bytes: bytes)
        server.ioQueue.async { [self] in
            body { [self] result in
                queue.async { [self] in complete(result, to: to, bytes: bytes, what: what, chunked: chunked, fastZero: fastZero) }
            }
        }
    }

    /// Sends a request's reply (or error) on the connection queue.
    func complete(_ result: Result<ByteBuffer?, Error>, to: ReplyTo, bytes: Int, what: String, chunked: Bool, fastZero: Bool) {
        switch result {
        case .failure(let f):
            var e = nbdError(for: f)
            // NBD spec: ENOTSUP only answers a FAST_ZERO request.
            if e == .enotsup && !fastZero { e = .einval }
            if e == .enotsup { logger.debug("cookie \(to.cookie): \(what): \(f)") } else {
                logger.error("cookie \(to.cookie): \(what) failed: \(f)")
            }
            reply(error: e, to: to, message: chunked ? "\(f)" : nil)
        case .success(let r?):
            send(r)
        case .success(nil):
            reply(error: nil, to: to)
        }
        end(bytes: bytes)
    }

    func begin(bytes: Int) {
        inFlight += 1
        inFlightBytes += bytes
    }

    func end(bytes: Int) {
        inFlight -= 1
        inFlightBytes -= bytes
        if isClosed {
            if inFlight == 0 { finishClose() }
            return
        }
        if disconnectRequested {
            if inFlight == 0 { close(reason: "client disconnected") }
            return
        }
        if readSuspended { resumeReading() }
    }

    /// A reply without data: simple, unless extended headers make every reply a chunk, or a
    /// `message` asks for a structured error chunk (READ and BLOCK_STATUS errors).
    func reply(error: ErrorValue?, to: ReplyTo, message: String? = nil) {
        var b = ByteBuffer()
        switch (to.framing, error) {
        case (.extended?, nil):
            encodeDoneChunk(to.framing!, cookie: to.cookie, into: &b)
        case (.extended?, let e?):
            encodeErrorChunk(to.framing!, cookie: to.cookie, error: e, message: message ?? "", into: &b)
        case (.structured?, let e?) where message != nil:
            encodeErrorChunk(.structured, cookie: to.cookie, error: e, message: message!, into: &b)
        default:
            encodeSimpleReply(error: error, cookie: to.cookie, into: &b)
        }
        send(b)
    }

    // MARK: writing

    /// Replies that complete in one burst go out together: the flush runs once per turn of
    /// the queue, and a burst costs one write (one sendmsg of them all, or one TLS record).
    var flushScheduled = false
    /// The first outbound buffer was partly refused (EAGAIN): GnuTLS wants it retried unchanged.
    var retryingWrite = false
    static let coalesceLimit = 256 * 1024
    /// Replies handed to one sendmsg (well under IOV_MAX).
    static let gatherLimit = 64
    /// Reads up to this size may be served from the page cache on the connection queue.
    static let inlineReadLimit: UInt32 = 64 * 1024

    func send(_ buf: ByteBuffer) {
        guard !isClosed else { return }
        outbound.append(buf)
        guard !flushScheduled, writeSuspended else { return }
        flushScheduled = true
        queue.async { [self] in
            flushScheduled = false
            if writeSuspended { flushOutbound() }
        }
    }

    /// How many queued replies one gathered write takes: up to `gatherLimit` of them and
    /// `coalesceLimit` bytes, and always at least one.
    func gatherCount() -> Int {
        var n = 1, bytes = outbound[0].readableBytes
        while n < min(outbound.count, Self.gatherLimit), bytes + outbound[n].readableBytes <= Self.coalesceLimit {
            bytes += outbound[n].readableBytes
            n += 1
        }
        return n
    }

    func flushOutbound() {
        if case .tlsHandshake(let session) = phase {
            continueTLSHandshake(session)
            return
        }
        // Plain sockets take queued small replies in one sendmsg, without copying them; a
        // large reply goes in a call of its own, as with TLS below.
        while !outbound.isEmpty, let r = transport.writeGathered(outbound.prefix(gatherCount())) {
            switch r {
            case .wrote(var n):
                while let first = outbound.first, n >= first.readableBytes {
                    n -= first.readableBytes
                    outbound.removeFirst()
                }
                if n > 0 { outbound[0].moveReaderIndex(forwardBy: n) }
            case .wouldBlock:
                if writeSuspended, let ws = writeSource {
                    writeSuspended = false
                    ws.resume()
                }
                return
            case .failed(let why):
                close(reason: "write failed: \(why)")
                return
            }
        }
        // TLS: small replies are merged into one buffer, so a burst is one record.
        while var first = outbound.first {
            if !retryingWrite && outbound.count > 1 && first.readableBytes < Self.coalesceLimit {
                var merged = 1
                while merged < outbound.count, first.readableBytes + outbound[merged].readableBytes <= Self.coalesceLimit {
                    var next = outbound[merged]
                    first.writeBuffer(&next)
                    merged += 1
                }
                if merged > 1 {
                    outbound.removeSubrange(1..<merged)
                    outbound[0] = first
                }
            }
            var wouldBlock = false
            var failed: String?
            while first.readableBytes > 0 {
                let r = first.withUnsafeReadableBytes { transport.write($0) }
                switch r {
                case .wrote(let n): first.moveReaderIndex(forwardBy: n)
                case .wouldBlock: wouldBlock = true
                case .failed(let why): failed = why
                }
                if wouldBlock || failed != nil { break }
            }
            if let why = failed {
                close(reason: "write failed: \(why)")
                return
            }
            if wouldBlock {
                retryingWrite = true
                outbound[0] = first
                if writeSuspended, let ws = writeSource {
                    writeSuspended = false
                    ws.resume()
                }
                return
            }
            retryingWrite = false
            outbound.removeFirst()
        }
        if !writeSuspended, let ws = writeSource {
            writeSuspended = true
            ws.suspend()
        }
        if isClosed { finishClose() }
    }

    // MARK: closing

    var closeReason = ""

    func close(reason: String) {
        guard !isClosed else { return }
        phase = .closed
        closeReason = reason
        handshakeTimer?.cancel()
        handshakeTimer = nil
        idleTimer?.cancel()
        idleTimer = nil
        logger.info("closing: \(reason)")
        flushPendingThenShutdown()
    }

    /// Gives queued replies (an ABORT's ACK, error replies) one chance to leave, then shuts down.
    func flushPendingThenShutdown() {
        var buffers = outbound
        outbound = []
        for i in buffers.indices {
            while buffers[i].readableBytes > 0 {
                let r = buffers[i].withUnsafeReadableBytes { transport.write($0) }
                guard case .wrote(let n) = r else { break }
                buffers[i].moveReaderIndex(forwardBy: n)
            }
        }
        finishClose()
    }

    var finished = false

    func finishClose() {
        guard !finished else { return }
        if inFlight > 0 {
            // Replies still to come: `end(bytes:)` calls back here once they are in, so the
            // handle outlives its I/O.
            disconnectRequested = true
            return
        }
        finished = true
        if let h = handle {
            handle = nil
            server.sr.detach(h)
        }
        if readSuspended, let rs = readSource { rs.resume(); readSuspended = false }
        if writeSuspended, let ws = writeSource { ws.resume(); writeSuspended = false }
        // The socket is shut down only once both sources are gone (`sourceCancelled`): a
        // shutdown now would make epoll report a hang-up while they are still registered,
        // and libdispatch's epoll backend can then leave a stale registration behind for
        // this descriptor number, so a later socket given the same number never signals.
        readSource?.cancel()
        writeSource?.cancel()
    }

    func sourceCancelled() {
        sourcesLeft -= 1
        if sourcesLeft == 0 {
            shutdown(fd, Int32(SHUT_RDWR))
            Glibc.close(fd)
            readSource = nil
            writeSource = nil
            server.connectionClosed(self)
        }
    }
}
