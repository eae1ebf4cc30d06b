import Dispatch
import Foundation
import Logging
import NBD
import Storage
import TLS
#if canImport(Glibc)
import Glibc
#endif

public struct ServerConfig: Sendable {
    public var listen: [(host: String, port: Int)] = [("127.0.0.1", 10809)]
    public var tlsPolicy: TLSPolicy = .off
    public var maxConnections = 256
    public var handshakeTimeout: DispatchTimeInterval = .seconds(30)
    /// Close a connection with nothing in flight after this long without a request (nil: never).
    public var idleTimeout: DispatchTimeInterval?
    public var limits = Limits()
    /// What one connection may have outstanding: the transmission machine's limits.
    public typealias Limits = TransmissionMachine.Limits
    /// Needed unless `tlsPolicy` is `.off`.
    public var tlsCredentials: ServerCredentials?
    public init() {}
}

/// Accepts NBD clients and runs their connections.
public final class NBDServer: @unchecked Sendable {
    // Unchecked: the listeners, connections and shutdown state are touched on `queue` only,
    // the credentials under `credentialsLock`; the rest are lets.
    public let config: ServerConfig
    /// The SRs whose VDIs this server exports.
    public let pool: Pool
    /// The default SR.
    public var sr: SR { pool.primary }
    let logger: Logger
    let queue = DispatchQueue(label: "vdinbd.accept")
    /// Disk I/O runs here, never on a connection's queue.
    let ioQueue = DispatchQueue(label: "vdinbd.io", qos: .userInitiated, attributes: .concurrent)
    /// Buffers of large read replies, shared by every connection.
    let replyBuffers = ReplyBufferPool()
    var poolTimer: DispatchSourceTimer?
    var listeners: [(fd: Int32, source: DispatchSourceRead)] = []
    var connections: [Int: Connection] = [:]
    var nextID = 1
    public private(set) var boundEndpoints: [NBDEndpoint] = []
    /// What a shutdown calls, once, when the last connection has gone or its time is up
    /// (on `queue`, like everything else here).
    var shutdownDone: (@Sendable () -> Void)?
    /// The rate of log lines clients can cause (closes before attaching, refused options, refusals at the limit).
    let clientLog = LogLimiter(perSecond: 10)

    private var credentials: ServerCredentials?
    private let credentialsLock = NSLock()

    /// The credentials new TLS sessions use.
    public var tlsCredentials: ServerCredentials? {
        credentialsLock.lock(); defer { credentialsLock.unlock() }
        return credentials
    }

    /// Swaps the credentials for new sessions (SIGHUP); running sessions keep theirs.
    public func reloadCredentials(_ c: ServerCredentials) {
        credentialsLock.lock(); defer { credentialsLock.unlock() }
        credentials = c
    }

    public init(config: ServerConfig, pool: Pool, logger: Logger) {
        self.credentials = config.tlsCredentials
        self.config = config
        self.pool = pool
        self.logger = logger
    }

    /// A server of one SR.
    public convenience init(config: ServerConfig, sr: SR, logger: Logger) {
        // One SR: nothing to clash with.
        self.init(config: config, pool: try! Pool([sr]), logger: logger)
    }

    /// Closes the connections that attached with any of `digests` (revoked tokens).
    func closeConnections(usingTokens digests: Set<String>) {
        queue.async { [self] in
            for c in connections.values {
                c.queue.async {
                    guard let g = c.grant, digests.contains(g.digest) else { return }
                    c.stopTaking(reason: "its export token was revoked")
                }
            }
        }
    }

    public func start() throws {
        for s in pool.srs { s.onTokensRevoked = { [weak self] digests in self?.closeConnections(usingTokens: digests) } }
        let t = DispatchSource.makeTimerSource(queue: queue)
        t.schedule(deadline: .now() + 1, repeating: .seconds(1))
        t.setEventHandler { [replyBuffers] in replyBuffers.trimIfIdle() }
        t.resume()
        poolTimer = t
        for l in config.listen {
            let (fd, port) = try listenTCP(host: l.host, port: l.port)
            let src = DispatchSource.makeReadSource(fileDescriptor: fd, queue: queue)
            src.setEventHandler { [weak self] in self?.acceptAll(fd) }
            src.setCancelHandler { Glibc.close(fd) }
            src.resume()
            listeners.append((fd, src))
            boundEndpoints.append(NBDEndpoint(address: l.host, port: port))
            logger.info("NBD listening on \(l.host):\(port) (TLS \(config.tlsPolicy))")
        }
    }

    func acceptAll(_ lfd: Int32) {
        while true {
            let fd = accept(lfd, nil, nil)
            if fd < 0 {
                if errno == EINTR { continue }
                if errno != EAGAIN && errno != EWOULDBLOCK { logger.warning("accept: \(String(cString: strerror(errno)))") }
                return
            }
            _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
            if connections.count >= config.maxConnections {
                if let more = clientLog.admit() {
                    logger.warning("connection limit \(config.maxConnections) reached: refusing \(peerName(fd))\(more)")
                }
                NBDMetrics.refusedLimit.increment()
                Glibc.close(fd)
                continue
            }
            let c = Connection(id: nextID, fd: fd, server: self)
            nextID += 1
            connections[c.id] = c
            NBDMetrics.connections.increment()
            c.start()
        }
    }

    func connectionClosed(_ c: Connection) {
        queue.async { [self] in
            if connections.removeValue(forKey: c.id) != nil { NBDMetrics.connections.decrement() }
            if connections.isEmpty {
                // Hand freed read/write buffers back to the system while nobody is connected.
                _ = c_malloc_trim(0)
                finishShutdown()
            }
        }
    }

    /// Stops accepting, lets connections finish what is in flight, then calls `done`.
    public func shutdown(timeout: DispatchTimeInterval = .seconds(10), done: @escaping @Sendable () -> Void) {
        queue.async { [self] in
            for l in listeners { l.source.cancel() }
            listeners = []
            if connections.isEmpty { done(); return }
            shutdownDone = done
            for c in connections.values {
                c.queue.async { c.stopTaking(reason: "server shutting down") }
            }
            queue.asyncAfter(deadline: .now() + timeout) { [self] in finishShutdown() }
        }
    }

    func finishShutdown() {
        let done = shutdownDone
        shutdownDone = nil
        done?()
    }

    public var connectionCount: Int { queue.sync { connections.count } }
}

/// Bounds how much freed memory glibc keeps. By default glibc gives each thread that
/// allocates its own arena (Dispatch spreads work over many threads) and, after the first
/// large free, raises its mmap and trim thresholds so that freed request buffers stay in
/// the heaps for good: 100-180 MiB of RSS after a few fio runs. Two arenas, buffers over
/// 4 MiB mapped and unmapped, and at most 16 MiB free at the top of a heap keep it under
/// 40 MiB with no measurable cost to 1 MiB or 4 KiB throughput. Called once at start-up.
public func limitAllocatorRetention() {
    _ = c_mallopt(-8, 2)  // M_ARENA_MAX
    _ = c_mallopt(-3, 4 << 20)  // M_MMAP_THRESHOLD (a fixed value also stops the adjustment)
    _ = c_mallopt(-1, 16 << 20)  // M_TRIM_THRESHOLD
}

/// glibc's mallopt (not exported by the Glibc module).
@_silgen_name("mallopt")
func c_mallopt(_ param: Int32, _ value: Int32) -> Int32

/// glibc's malloc_trim (not exported by the Glibc module).
@_silgen_name("malloc_trim")
func c_malloc_trim(_ pad: Int) -> Int32
