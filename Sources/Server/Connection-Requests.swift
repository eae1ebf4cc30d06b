// Running transmission requests: validated once, executed on the I/O queue, answered on
// the connection queue.

import DequeModule
import Dispatch
import Foundation
import NBD
import NIOCore
import Storage
import Locking

extension Connection {
    /// A decoded request, through the transmission machine: refused, run, or the end of input.
    func handle(_ decoded: DecodedRequest) {
        guard machine != nil, let h = handle else { return }
        lastRequest = .now()
        switch machine!.receive(decoded) {
        case .refuse(let e, let to, let message, let why):
            logger.info("\(why)")
            reply(error: e, to: to, message: message)
        case .execute(let v, let to, let bytes):
            execute(v, to: to, bytes: bytes, handle: h)
        case .stopReading:
            pauseReading()
        case .close(let reason):
            close(reason: reason)
        }
    }

    /// Runs a request the machine counted in flight; `end(bytes:)` (or, done inline,
    /// `doneInline(bytes:)`) tells it the reply is queued.
    func execute(_ v: ValidatedRequest, to r: ReplyTo, bytes: Int, handle h: VDIHandle) {
        switch v {
        case .disconnect:
            return  // the machine answers it
        case .read(_, let offset, let length, let df):
            // Fast path: small reads whose data is all in the page cache are answered right
            // here, without two queue hops. preadv2(RWF_NOWAIT) never waits for the disk;
            // anything else (a miss, an error) goes the normal way on the I/O queue.
            if length <= Self.inlineReadLimit {
                let started = DispatchTime.now().uptimeNanoseconds
                if let reply = try? Replies.read(h, r, offset: offset, length: length, df: df, cachedOnly: true, pool: replyBuffers) {
                    send(reply)
                    metrics?.done(.read, bytes: Int(length), started: started)
                    return doneInline(bytes: bytes)
                }
            }
            run(r, bytes: bytes, what: Work(.read, offset, UInt64(length)), chunked: r.framing != nil) {
                // Large reads go straight from the files' page cache, without a copy of ours.
                if length >= Self.mappedReadMinimum,
                   let pieces = try Replies.readMapped(h, r, offset: offset, length: length, df: df) {
                    return .pieces(pieces)
                }
                return .buffer(try Replies.read(h, r, offset: offset, length: length, df: df, pool: self.replyBuffers))
            }
        case .write(_, let offset, let payload, let fua):
            // Fast path: a small write into space the leaf holds, whose change-log bits are
            // durable, is a pwrite into the page cache: done right here, without two queue
            // hops. Anything else (an allocation, a log commit, a snapshot under way, an
            // error) goes the normal way on the I/O queue.
            if !fua && payload.readableBytes <= Self.inlineWriteLimit {
                let started = DispatchTime.now().uptimeNanoseconds
                if (try? payload.withUnsafeReadableBytes { try h.writeNow($0, at: offset) }) == true {
                    reply(error: nil, to: r)
                    metrics?.done(.write, bytes: payload.readableBytes, started: started)
                    return doneInline(bytes: bytes)
                }
            }
            // No thread waits while the change log syncs: the write resumes after it.
            runAsync(r, bytes: bytes, what: Work(.write, offset, UInt64(payload.readableBytes))) {
                [ioQueue] finish in
                h.write(length: payload.readableBytes, at: offset, on: ioQueue,
                        withBytes: { body in try payload.withUnsafeReadableBytes(body) }) { error in
                    if let error { return finish(.failure(error)) }
                    if fua {
                        do { try h.flush() } catch { return finish(.failure(error)) }
                    }
                    finish(.success(.none))
                }
            }
        case .flush:
            run(r, bytes: 0, what: Work(.flush, 0, 0)) {
                try h.flush()
                return .none
            }
        case .trim(_, let offset, let length, let fua):
            run(r, bytes: 0, what: Work(.trim, offset, length)) {
                try h.writeZeroes(offset: offset, length: length, punch: true, fastOnly: false)
                if fua { try h.flush() }
                return .none
            }
        case .writeZeroes(_, let offset, let length, let fua, let noHole, let fastZero):
            run(r, bytes: 0, what: Work(.writeZeroes, offset, length), fastZero: fastZero) {
                try h.writeZeroes(offset: offset, length: length, punch: !noHole, fastOnly: fastZero)
                if fua { try h.flush() }
                return .none
            }
        case .cache(_, let offset, let length):
            // Every read goes to the page cache already; CACHE only checks the range.
            run(r, bytes: 0, what: Work(.cache, offset, length)) { .none }
        case .blockStatus(_, let offset, let length, let reqOne, let contexts):
            run(r, bytes: 0, what: Work(.blockStatus, offset, length), chunked: true) {
                .buffer(try Replies.blockStatus(h, r, offset: offset, length: length, reqOne: reqOne, contexts: contexts) {
                    try self.server.pool.route(h.uuid).changedBlocks(from: $0, to: h.uuid)
                })
            }
        }
    }

    /// Runs `body` on the I/O queue, then sends its reply (or a plain OK/error) from the
    /// connection queue. `chunked`: errors go back as a structured error chunk.
    func run(_ to: ReplyTo, bytes: Int, what: Work, chunked: Bool = false, fastZero: Bool = false,
             _ body: @escaping @Sendable () throws -> Reply) {
        runAsync(to, bytes: bytes, what: what, chunked: chunked, fastZero: fastZero) { finish in
            do { finish(.success(try body())) } catch { finish(.failure(error)) }
        }
    }

    /// `run` for a body that finishes later, on any thread, by calling `finish` once.
    func runAsync(_ to: ReplyTo, bytes: Int, what: Work, chunked: Bool = false, fastZero: Bool = false,
                  _ body: @escaping @Sendable (_ finish: @escaping @Sendable (Result<Reply, Error>) -> Void) -> Void) {
        NBDMetrics.inFlight.increment()
        runners.submit(on: ioQueue) { [self] in
            body { [self] result in
                completions.add(on: queue) { [self] in
                    complete(result, to: to, bytes: bytes, what: what, chunked: chunked, fastZero: fastZero)
                }
            }
        }
    }

    /// Reads from this size on are sent from the files' page cache (`Replies.readMapped`).
    static let mappedReadMinimum: UInt32 = 128 * 1024

    /// Sends a request's reply (or error) on the connection queue.
    func complete(_ result: Result<Reply, Error>, to: ReplyTo, bytes: Int, what: Work, chunked: Bool, fastZero: Bool) {
        switch result {
        case .failure(let f):
            var e = nbdError(for: f)
            // NBD spec: ENOTSUP only answers a FAST_ZERO request.
            if e == .enotsup && !fastZero { e = .einval }
            if e == .enotsup { logger.debug("cookie \(to.cookie): \(what): \(f)") } else {
                logger.error("cookie \(to.cookie): \(what) failed: \(f)")
            }
            reply(error: e, to: to, message: chunked ? "\(f)" : nil)
        case .success(.buffer(let r)):
            send(r)
        case .success(.pieces(let p)):
            send(pieces: p)
        case .success(.none):
            reply(error: nil, to: to)
        }
        metrics?.done(what.kind, bytes: what.kind == .read || what.kind == .write ? bytes : 0, started: what.started)
        end(bytes: bytes)
    }

    /// A request run on the I/O queue has its reply queued: what the machine says follows.
    func end(bytes: Int) {
        NBDMetrics.inFlight.decrement()
        guard machine != nil else { return }
        switch machine!.completed(bytes: bytes) {
        case .takeMore: resumeIntake()
        case .wait: break
        case .close(let reason): close(reason: reason)
        case .release: finishClose()
        }
    }

    /// A request answered on the connection queue, within intake (which goes on by itself).
    func doneInline(bytes: Int) {
        _ = machine!.completed(bytes: bytes)
    }

    /// A reply without data: simple, unless extended headers make every reply a chunk, or a
    /// `message` asks for a structured error chunk (READ and BLOCK_STATUS errors).
    func reply(error: ErrorValue?, to: ReplyTo, message: String? = nil) {
        if let e = error { NBDMetrics.error(e) }
        sendSmall { b in
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
        }
    }

}

/// What a request does, for log lines; formatted only when one is written.
struct Work: CustomStringConvertible, Sendable {
    let kind: CommandKind
    let offset: UInt64
    let length: UInt64
    /// When the request was taken up (for its latency).
    let started: UInt64
    init(_ kind: CommandKind, _ offset: UInt64, _ length: UInt64) {
        self.kind = kind
        self.offset = offset
        self.length = length
        started = DispatchTime.now().uptimeNanoseconds
    }
    var description: String { length == 0 ? "\(kind.name)" : "\(kind.name) at \(offset)+\(length)" }
}

/// Requests finished on I/O threads, waiting for the connection queue. One queue hop
/// carries every completion that arrives while it is pending, so a burst of small
/// requests costs one wake-up of the connection, not one each.
final class Completions: Sendable {
    private struct State {
        var pending: [@Sendable () -> Void] = []
        var spare: [@Sendable () -> Void] = []
        var scheduled = false
    }
    private let state = Mutex(State())

    func add(on queue: DispatchQueue, _ work: @escaping @Sendable () -> Void) {
        let schedule = state.withLock { s in
            s.pending.append(work)
            defer { s.scheduled = true }
            return !s.scheduled
        }
        if schedule { queue.async { self.drain() } }
    }

    private func drain() {
        var batch: [@Sendable () -> Void] = state.withLock { s in
            var batch = s.spare
            swap(&batch, &s.pending)
            s.scheduled = false
            return batch
        }
        for work in batch { work() }
        batch.removeAll(keepingCapacity: true)
        state.withLock { $0.spare = batch }
    }
}

/// Requests waiting for the I/O queue. Up to `width` runners take them in turn, so a
/// flood of small requests wakes a few threads rather than one per request, while slow
/// ones (a page-cache miss) still run side by side.
final class Runners: Sendable {
    private struct State {
        var jobs = Deque<@Sendable () -> Void>()
        var running = 0
    }
    private let state = Mutex(State())
    let width: Int

    init(width: Int) { self.width = width }

    func submit(on queue: DispatchQueue, _ job: @escaping @Sendable () -> Void) {
        let start = state.withLock { s in
            s.jobs.append(job)
            // Another runner only when the backlog outgrows those running: a stream of quick
            // requests keeps one busy instead of waking a thread for each, while requests that
            // wait for the disk pile up and bring more, up to `width`.
            let start = s.running < width && (s.running == 0 || s.jobs.count > s.running)
            if start { s.running += 1 }
            return start
        }
        if start { queue.async { self.run() } }
    }

    private func run() {
        while let job = state.withLock({ s -> (@Sendable () -> Void)? in
            guard let job = s.jobs.popFirst() else {
                s.running -= 1
                return nil
            }
            return job
        }) {
            job()
        }
    }
}
