// Export and import over HTTP, as xapi serves them (seed 000), on a listener of its own:
//
//   GET /export_raw_vdi?vdi=U[&format=raw|vhd][&base=B][&task_id=T]
//   PUT /import_raw_vdi?vdi=U[&format=raw|vhd][&chunked=true][&task_id=T]
//
// Authorised by an export token bound to that VDI (`?token=`, `Authorization: Bearer`, or
// basic auth with the token as the password); a read-only token exports only. Each
// transfer is a task (its uuid in the `task-id` header; `task_id=` adopts one made with
// `Task.create`). Exports carry Content-Length, and a stable one (a snapshot or read-only
// VDI exported whole) answers `Range:` with 206. The disk is read and written on NIO's
// blocking pool, a bounded chunk at a time, so memory stays bounded and a slow client
// slows only its own transfer (the writer waits for the socket).

import Foundation
import HTTPTypes
import Hummingbird
import HummingbirdCore
import HummingbirdTLS
import Logging
import NIOCore
import NIOPosix
import NIOSSL
import Storage
import Locking

public final class HTTPTransferServer: Sendable {
    /// The hosted SRs: a transfer goes to the one holding its VDI.
    let pool: Pool
    /// The default SR (its task table is the pool's).
    var sr: SR { pool.primary }
    let logger: Logger
    /// Bytes of an import's body handed to the disk at a time.
    static let chunk = 4 << 20
    /// Bytes per read of an export (each holds four such buffers, reused).
    static let exportChunk = 1 << 20

    let identity = TLSIdentity()

    /// Reads the certificate and key again (SIGHUP): new HTTPS connections use them,
    /// transfers under way keep their sessions. Throws (keeping the old ones) if they
    /// cannot be read.
    public func reloadCertificates(from dir: String) throws {
        try identity.load(from: dir)
    }

    public init(pool: Pool, logger: Logger) {
        self.pool = pool
        self.logger = logger
    }

    /// Binds `host:port` and serves in the background; returns the bound port, or throws
    /// if the address cannot be bound. With `certsDirectory`, HTTPS with its
    /// `server-cert.pem` and `server-key.pem` (the NBD listener's).
    public func start(host: String, port: Int, certsDirectory: String? = nil) throws -> Int {
        var server = HTTPServerBuilder.http1()
        if let dir = certsDirectory {
            try identity.load(from: dir)
            let (chain, key) = identity.current
            var tls = TLSConfiguration.makeServerConfiguration(certificateChain: chain, privateKey: key)
            // Each handshake takes the identity loaded last (`reloadCertificates`).
            tls.sslContextCallback = { [identity] _, promise in
                var o = NIOSSLContextConfigurationOverride()
                (o.certificateChain, o.privateKey) = identity.current
                promise.succeed(o)
            }
            server = try .tls(.http1(), tlsConfiguration: tls)
        }
        let router = Router()
        router.get("export_raw_vdi") { [self] req, _ in try await export(req) }
        router.head("export_raw_vdi") { [self] req, _ in try await export(req, headOnly: true) }
        router.put("import_raw_vdi") { [self] req, _ in try await importVDI(req) }
        router.get("metrics") { [pool] _, _ in
            let text = try await NIOThreadPool.singleton.runIfActive { MetricsExport.scrape(pool) }
            return Response(status: .ok, headers: [.contentType: "text/plain; version=0.0.4; charset=utf-8"],
                            body: ResponseBody(byteBuffer: ByteBuffer(bytes: text)))
        }
        let bound = BoundPort()
        let app = Application(
            router: router,
            server: server,
            configuration: .init(address: .hostname(host, port: port), serverName: "vdinbd"),
            onServerRunning: { channel in bound.set(.success(channel.localAddress?.port ?? port)) },
            logger: logger)
        Task {
            do {
                try await app.runService(gracefulShutdownSignals: [])
            } catch {
                bound.set(.failure(error))
            }
        }
        return try bound.wait()
    }

    // MARK: export

    func export(_ req: Request, headOnly: Bool = false) async throws -> Response {
        let q = req.uri.queryParameters
        let vdi = q["vdi"].map(String.init) ?? ""
        if let refused = authorise(req, vdi: vdi, writing: false) { return refused }
        let format = q["format"].map(String.init) ?? "raw"
        let base = q["base"].map(String.init).flatMap { $0.isEmpty ? nil : $0 }
        let stream: ExportStream
        do {
            stream = try await NIOThreadPool.singleton.runIfActive { [pool] in try pool.route(vdi).openExport(vdi, format: format, base: base) }
        } catch {
            return failure(error, "export of \(vdi)")
        }
        let length = stream.length
        var headers: HTTPFields = [.contentType: stream.format.contentType]
        var status = HTTPResponse.Status.ok
        var range = 0..<length
        if stream.stable {
            headers[.acceptRanges] = "bytes"
            headers[.eTag] = stream.etag
            let ifRange = req.headers[.ifRange]
            if ifRange == nil || ifRange == stream.etag {
                switch ByteRange.parse(req.headers[.range], length: length) {
                case .none: break
                case .range(let r):
                    range = r.lowerBound..<(r.upperBound + 1)
                    status = .partialContent
                    headers[.contentRange] = "bytes \(r.lowerBound)-\(r.upperBound)/\(length)"
                case .unsatisfiable:
                    stream.close()
                    return Response(status: .rangeNotSatisfiable, headers: [.contentRange: "bytes */\(length)"])
                }
            }
        }
        let name = "VDI.export \(stream.uuid) (\(stream.format.name)\(base.map { ", base \($0)" } ?? ""))"
        let task = sr.tasks.begin(name: name, adopting: q["task_id"].map(String.init))
        task.setOther("total_bytes", String(range.count))
        headers[HTTPField.Name("task-id")!] = task.uuid
        headers[.contentLength] = String(range.count)
        if headOnly {
            stream.close()
            sr.tasks.finish(task, result: "")
            return Response(status: status, headers: headers)
        }
        let tasks = sr.tasks, logger = self.logger, span = range
        let body = ResponseBody(contentLength: Int(span.count)) { writer in
            defer { stream.close() }
            let pump = ExportPump(stream: stream, span: span, chunk: Self.exportChunk)
            var sent: UInt64 = 0
            do {
                try await pump.run(&writer, checkCancelled: { try task.checkCancelled() }) { done in
                    sent = done
                    task.setOther("bytes_done", String(done))
                    task.setProgress(Double(done) / Double(max(1, span.count)))
                }
                try await writer.finish(nil)
                tasks.finish(task, result: String(span.count))
            } catch {
                logger.info("HTTP export of \(stream.uuid) ended at \(span.lowerBound + sent) of \(span.upperBound): \(error)")
                tasks.finish(task, error: error as? StorageError ?? StorageError.vdiIOError(uuid: stream.uuid, detail: "the client went away: \(error)"))
                throw error
            }
        }
        logger.info("HTTP export of \(stream.uuid) as \(stream.format.name): bytes \(range.lowerBound)-\(range.upperBound) of \(length), task \(task.uuid)")
        return Response(status: status, headers: headers, body: body)
    }

    // MARK: import

    func importVDI(_ req: Request) async throws -> Response {
        let q = req.uri.queryParameters
        let vdi = q["vdi"].map(String.init) ?? ""
        if let refused = authorise(req, vdi: vdi, writing: true) {
            var body = req.body.makeAsyncIterator()
            await drain(&body)
            return refused
        }
        let format = q["format"].map(String.init) ?? "raw"
        let chunked = q["chunked"].map { $0 == "true" } ?? false
        let task = sr.tasks.begin(name: "VDI.import \(vdi) (\(format)\(chunked ? ", chunked" : ""))",
                                  adopting: q["task_id"].map(String.init))
        let taskHeader: HTTPFields = [HTTPField.Name("task-id")!: task.uuid]
        let session: ImportSession
        do {
            session = try await NIOThreadPool.singleton.runIfActive { [pool] in
                try pool.route(vdi).beginImport(vdi, format: format, chunked: chunked, task: task)
            }
        } catch {
            sr.tasks.finish(task, error: error)
            var body = req.body.makeAsyncIterator()
            await drain(&body)
            return failure(error, "import into \(vdi)", headers: taskHeader)
        }
        if let l = req.headers[.contentLength].flatMap(UInt64.init) {
            session.expectedLength = l
            task.setOther("total_bytes", String(l))
        }
        var body = req.body.makeAsyncIterator()
        do {
            try await ImportPump(session: session, chunk: Self.chunk).run(&body)
        } catch {
            session.abort()
            let e: StorageError = error as? StorageError ?? .importError(reason: "the upload was cut: \(error)")
            sr.tasks.finish(task, error: e)
            logger.info("HTTP import into \(vdi) refused after \(session.consumed) bytes: \(error)")
            // What is left of the body is read and dropped, so the client reads the answer.
            await drain(&body)
            return failure(e, "import into \(vdi)", headers: taskHeader)
        }
        sr.tasks.finish(task, result: "")
        logger.info("HTTP import into \(vdi): \(session.consumed) bytes, task \(task.uuid)")
        return Response(status: .ok, headers: taskHeader, body: ResponseBody(byteBuffer: ByteBuffer(string: task.uuid + "\n")))
    }

    // MARK: answers

    /// Reads and drops what is left of a refused upload: a client still sending its body
    /// reads no answer until it has sent it (curl's `Expect: 100-continue` spares the
    /// upload; a plain client would otherwise stall).
    func drain(_ body: inout RequestBody.AsyncIterator) async {
        while true {
            do {
                guard try await body.next() != nil else { return }
            } catch {
                return
            }
        }
    }

    /// Nil when the request's token allows it; else the refusal to send.
    func authorise(_ req: Request, vdi: String, writing: Bool) -> Response? {
        guard !vdi.isEmpty else { return plain(.badRequest, "vdi= is required") }
        guard let token = HTTPAuth.token(query: req.uri.queryParameters["token"].map(String.init),
                                         authorization: req.headers[.authorization]) else {
            return plain(.unauthorized, "an export token is required: ?token=, Authorization: Bearer, or basic auth with the token as the password",
                         headers: [.wwwAuthenticate: "Basic realm=\"vdinbd\", Bearer"])
        }
        switch pool.route(vdi).resolve(token: token, vdi: vdi) {
        case .failure(let why):
            logger.info("HTTP \(req.method) \(req.uri.path) for \(vdi) refused: \(why)")
            return plain(.unauthorized, "\(why)", headers: [.wwwAuthenticate: "Basic realm=\"vdinbd\", Bearer"])
        case .success(let g):
            if writing && (g.readOnly || g.mode == .scratch) {
                return plain(.forbidden, "this token is read-only: it exports \(vdi) and cannot import into it")
            }
            return nil
        }
    }

    func failure(_ error: Error, _ what: String, headers: HTTPFields = [:]) -> Response {
        let e = error as? StorageError ?? StorageError.vdiIOError(uuid: "", detail: "\(error)")
        logger.info("HTTP \(what) failed: \(e)")
        return plain(e.httpStatus, e.description, headers: headers)
    }

    func plain(_ status: HTTPResponse.Status, _ text: String, headers: HTTPFields = [:]) -> Response {
        var h = headers
        h[.contentType] = "text/plain; charset=utf-8"
        return Response(status: status, headers: h, body: ResponseBody(byteBuffer: ByteBuffer(string: text + "\n")))
    }
}

/// The HTTPS listener's certificate chain and key, replaced whole on reload.
final class TLSIdentity: Sendable {
    private let pair = Mutex<([NIOSSLCertificateSource], NIOSSLPrivateKeySource)?>(nil)

    func load(from dir: String) throws {
        let chain = try NIOSSLCertificate.fromPEMFile(dir + "/server-cert.pem").map { NIOSSLCertificateSource.certificate($0) }
        let key = try NIOSSLPrivateKey(file: dir + "/server-key.pem", format: .pem)
        pair.withLock { $0 = (chain, .privateKey(key)) }
    }

    var current: ([NIOSSLCertificateSource], NIOSSLPrivateKeySource) { pair.withLock { $0! } }
}

/// The outcome of binding, handed from the server's task to `start`.
final class BoundPort: Sendable {
    private let result = Mutex<Result<Int, Error>?>(nil)
    private let ready = DispatchSemaphore(value: 0)

    /// The first outcome stands.
    func set(_ r: Result<Int, Error>) {
        let first = result.withLock { old in
            guard old == nil else { return false }
            old = r
            return true
        }
        if first { ready.signal() }
    }

    func wait() throws -> Int {
        ready.wait()
        ready.signal()  // for any later waiter
        return try result.withLock { $0! }.get()
    }
}
