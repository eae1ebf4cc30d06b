// Design notes: one client connection.
//
// Everything about a connection — its socket events, its input buffer, the handshake
// state machine and the reply writer — runs on its own serial queue. Disk I/O never runs
// there: each validated request goes to the shared I/O queue, and its reply comes back to
// the connection queue to be written, so replies go out whole and in completion order.
//
// The files: this one holds the state, the handshake and closing; `Connection-Input`
// reads the socket and takes requests (with the limits that bound what a connection
// buffers); `Connection-Requests` runs them; `Connection-Output` writes replies.

import DequeModule
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

final class Connection: @unchecked Sendable {
    // Unchecked: every var is touched on `queue` only (the connection's serial queue runs
    // its socket sources, timers and completions); other threads reach it by `queue.async`.
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
    /// Read once: an unowned reference costs a checked retain on every use.
    let ioQueue: DispatchQueue
    let replyBuffers: ReplyBufferPool
    let limits: ServerConfig.Limits
    var logger: Logger
    var transport: Transport
    var phase: Phase = .clientFlags
    var handshake: HandshakeStateMachine
    var inbound = ByteBuffer()
    var outbound = Deque<Outgoing>()
    /// Bytes in `outbound`: replies made but not yet taken by the socket.
    var outboundBytes = 0
    var readSource: DispatchSourceRead?
    var writeSource: DispatchSourceWrite?
    var readSuspended = false
    var writeSuspended = true
    var sourcesLeft = 0

    /// The transmission phase's state: what is in flight, whether requests are still taken.
    var machine: TransmissionMachine?
    var handle: VDIHandle?
    /// Request counters for the export attached (set on entering transmission).
    var metrics: RequestMetrics?
    /// The token this connection attached with (its attachment's key).
    var grant: SR.ExportGrant?
    var requestDecoder = RequestDecoder()
    let completions = Completions()
    let runners = Runners(width: 16)
    var handshakeTimer: DispatchSourceTimer?
    var idleTimer: DispatchSourceTimer?
    var lastRequest = DispatchTime.now()
    /// The most input held at once (the input buffer and the payload being gathered), for
    /// the close log line: the bound in `Connection-Input` is checked against it.
    var peakInputBytes = 0
    /// Replies that complete in one burst go out together: the flush runs once per turn of
    /// the queue (see `send`).
    var flushScheduled = false
    /// The last buffer in `outbound` was made by `sendSmall` and may take more small replies.
    var tailTakesSmallReplies = false
    /// The first outbound buffer was partly refused (EAGAIN): GnuTLS wants it retried unchanged.
    var retryingWrite = false
    var closeReason = ""
    var finished = false
    lazy var resolver = SRExportResolver(pool: server.pool)
    /// The SR the connection attached through (its VDI may migrate to another since).
    var attachedSR: SR?

    init(id: Int, fd: Int32, server: NBDServer) {
        self.id = id
        self.fd = fd
        self.server = server
        self.ioQueue = server.ioQueue
        self.replyBuffers = server.replyBuffers
        self.limits = server.config.limits
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
                NBDMetrics.refusedTimeout.increment()
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

    // MARK: handshake

    func perform(_ actions: [HandshakeAction]) {
        for a in actions {
            switch a {
            case .send(let reply):
                var b = ByteBuffer()
                reply.encode(into: &b)
                if reply.type.rawValue & 0x8000_0000 != 0 {
                    if let more = server.clientLog.admit() {
                        logger.info("\(reply.option) refused: \(reply.type) \(String(decoding: reply.data, as: UTF8.self))\(more)")
                    }
                    NBDMetrics.refusedOption.increment()
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
                NBDMetrics.tlsHandshakes.increment()
                resolver.grants = [:]
                phase = .optionHaggling
                inbound.clear()
                inbound.reserveCapacity(Self.readChunk + 64)
                logger.info("TLS established (\(session.protocolVersion), \(session.cipherName)\(session.pskUsername.map { ", PSK user \($0)" } ?? ""))")
                // The handshake's last flight may still wait in the gather buffer.
                flushOutbound()
                if session.pendingBytes > 0 { readable() }
            case .wouldBlock(let wantsWrite):
                if wantsWrite { armWriteSource() }
            }
        } catch {
            NBDMetrics.tlsFailures.increment()
            close(reason: "TLS handshake failed: \(error)")
        }
    }

    func enterTransmission(_ ts: TransmissionState) {
        let export = ts.export
        guard let granted = resolver.grants[export.name]?.vdi else {
            close(reason: "export \(export.name) was not resolved")
            return
        }
        let vdi = granted.uuid
        let g = resolver.grants[export.name]
        do {
            let (h, sr) = try server.pool.attach(vdi, in: resolver.srs[export.name] ?? server.pool.route(vdi),
                                                 familyHint: granted.family, grant: g)
            handle = h
            attachedSR = sr
            grant = g
            metrics = RequestMetrics(export: vdi)
        } catch {
            logger.error("cannot attach VDI \(vdi): \(error)")
            close(reason: "attach failed")
            return
        }
        machine = TransmissionMachine(negotiated: ts, limits: limits)
        requestDecoder.extended = ts.extendedHeaders
        phase = .transmission
        handshakeTimer?.cancel()
        handshakeTimer = nil
        if let idle = server.config.idleTimeout {
            let t = DispatchSource.makeTimerSource(queue: queue)
            t.schedule(deadline: .now() + idle, repeating: .seconds(1))
            t.setEventHandler { [weak self] in
                guard let self, self.machine?.inFlight == 0, !self.isClosed else { return }
                if DispatchTime.now() > self.lastRequest + idle { self.close(reason: "idle timeout") }
            }
            t.resume()
            idleTimer = t
        }
        logger.info("export \(vdi) attached (\(export.readOnly ? "read-only" : "read-write"), \(export.size) bytes, \(ts.extendedHeaders ? "extended headers" : ts.structuredReplies ? "structured replies" : "simple replies")\(ts.metaContexts.isEmpty ? "" : ", contexts " + ts.metaContexts.map(\.name).joined(separator: ",")))")
    }

    // MARK: closing

    /// Takes no more requests (a revoked token, a shutdown, the client's end of input):
    /// closes once what is in flight is answered.
    func stopTaking(reason: String) {
        guard !isClosed else { return }
        guard machine != nil else { return close(reason: reason) }
        pauseReading()
        if case .close(let r) = machine!.stopTaking(reason: reason) { close(reason: r) }
    }

    func close(reason: String) {
        guard !isClosed else { return }
        let attached = inTransmission
        phase = .closed
        _ = machine?.close()
        closeReason = reason
        handshakeTimer?.cancel()
        handshakeTimer = nil
        idleTimer?.cancel()
        idleTimer = nil
        // A connection that never attached is logged within the server's rate (a client
        // may open them at will); one that did is always logged.
        if attached {
            logger.info("closing: \(reason) (at most \(peakInputBytes) bytes of input held)")
        } else if let more = server.clientLog.admit() {
            logger.info("closing before attaching: \(reason)\(more)")
        }
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
        outboundBytes = 0
        _ = transport.flushPending()
        finishClose()
    }

    func finishClose() {
        // Replies still to come: `end(bytes:)` calls back here once they are in, so the
        // handle outlives its I/O.
        guard !finished, (machine?.inFlight ?? 0) == 0 else { return }
        finished = true
        if let h = handle {
            handle = nil
            server.pool.detach(h, grant: grant, attachedTo: attachedSR ?? server.sr)
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
