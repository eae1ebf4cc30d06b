// The transmission phase as a value state machine, beside the handshake's: it takes
// decoded requests, the completions of the requests it started and the end of the
// client's input, keeps what is in flight against the limits, and returns what the
// connection must do. It never does I/O: the connection carries out its answers (run a
// request, write a refusal, stop or resume reading, close, let go of the export), and the
// tests drive it without sockets.

/// Where a request's reply goes and how it is framed (nil: simple replies only).
public struct ReplyTo: Sendable, Equatable {
    public let cookie: UInt64
    public let framing: ChunkFraming?
    public init(cookie: UInt64, framing: ChunkFraming?) {
        self.cookie = cookie
        self.framing = framing
    }
}

public struct TransmissionMachine: Sendable {
    /// What one connection may have outstanding before it stops reading: NBD sets no limit
    /// on outstanding requests, so the server holds the client back in TCP by not reading
    /// (the bound this gives is in the Server's `Connection-Input`). The server's settings.
    public struct Limits: Sendable, Equatable {
        public var maxInFlightRequests: Int
        public var maxInFlightBytes: Int
        /// Replies made but not yet taken by the socket: a client that sends without
        /// reading is held by TCP, not by our memory.
        public var maxQueuedReplyBytes: Int
        public init(maxInFlightRequests: Int = 256, maxInFlightBytes: Int = 128 * 1024 * 1024,
                    maxQueuedReplyBytes: Int = 4 * 1024 * 1024) {
            self.maxInFlightRequests = maxInFlightRequests
            self.maxInFlightBytes = maxInFlightBytes
            self.maxQueuedReplyBytes = maxQueuedReplyBytes
        }
    }

    public enum State: Sendable, Equatable {
        /// Taking requests.
        case open
        /// Taking no more (NBD_CMD_DISC, the client's end of input, a revoked token, a
        /// shutdown): the connection closes with `reason` once nothing is in flight.
        case draining(reason: String)
        /// The connection is closing: it lets go of the export once nothing is in flight.
        case closed
    }

    /// The answer to a request.
    public enum Action: Sendable {
        /// Run it; its reply goes to `to`. It is in flight, holding `bytes`, until
        /// `completed(bytes:)`.
        case execute(ValidatedRequest, ReplyTo, bytes: Int)
        /// Answer with `error` now and run nothing; `message` goes in a structured error
        /// chunk, `why` to the log.
        case refuse(ErrorValue, ReplyTo, message: String?, why: String)
        /// Take no more requests; the rest follows from `completed(bytes:)`.
        case stopReading
        case close(reason: String)
    }

    /// What follows a completion, or the end of taking requests.
    public enum Next: Sendable, Equatable {
        /// Take the requests buffered, and read the socket again.
        case takeMore
        /// Requests are still in flight: nothing to do until they complete.
        case wait
        case close(reason: String)
        /// Closed and nothing in flight: let go of the export.
        case release
    }

    public let negotiated: TransmissionState
    public let limits: Limits
    public private(set) var state: State = .open
    public private(set) var inFlight = 0
    public private(set) var inFlightBytes = 0

    public init(negotiated: TransmissionState, limits: Limits) {
        self.negotiated = negotiated
        self.limits = limits
    }

    public var isTaking: Bool { state == .open }

    /// Whether another request may be taken, with `queuedReplyBytes` of replies not yet
    /// taken by the socket.
    public func mayTake(queuedReplyBytes: Int) -> Bool {
        isTaking && inFlight < limits.maxInFlightRequests && inFlightBytes < limits.maxInFlightBytes
            && queuedReplyBytes < limits.maxQueuedReplyBytes
    }

    func replyTo(_ cookie: UInt64, _ offset: UInt64) -> ReplyTo {
        ReplyTo(cookie: cookie, framing: negotiated.framing(requestOffset: offset))
    }

    public mutating func receive(_ decoded: DecodedRequest) -> Action {
        switch decoded {
        case .oversizedWrite(let r):
            return .refuse(.einval, replyTo(r.cookie, r.offset), message: nil,
                           why: "cookie \(r.cookie): \(r.command) of \(r.length) bytes exceeds the maximum: NBD_EINVAL")
        case .request(let r):
            switch RequestValidator.validate(r, negotiated) {
            case .failure(let e):
                let to = replyTo(r.cookie, r.offset)
                // NBD spec: with structured replies a READ never gets a simple reply.
                return .refuse(e, to, message: r.command == .read && to.framing != nil ? "\(e)" : nil,
                               why: "cookie \(r.cookie): \(r.command) offset \(r.offset) length \(r.length) refused: \(e)")
            case .success(.disconnect):
                switch stopTaking(reason: "client sent NBD_CMD_DISC") {
                case .close(let reason): return .close(reason: reason)
                default: return .stopReading
                }
            case .success(let v):
                let (to, bytes): (ReplyTo, Int)
                switch v {
                case .read(let c, let o, let l, _): (to, bytes) = (replyTo(c, o), Int(l))
                case .write(let c, let o, let p, _): (to, bytes) = (replyTo(c, o), p.readableBytes)
                case .flush(let c): (to, bytes) = (replyTo(c, 0), 0)
                case .trim(let c, let o, _, _), .writeZeroes(let c, let o, _, _, _, _), .cache(let c, let o, _),
                     .blockStatus(let c, let o, _, _, _):
                    (to, bytes) = (replyTo(c, o), 0)
                case .disconnect: fatalError("handled above")
                }
                inFlight += 1
                inFlightBytes += bytes
                return .execute(v, to, bytes: bytes)
            }
        }
    }

    /// A request `receive` started has its reply (or error) queued.
    public mutating func completed(bytes: Int) -> Next {
        precondition(inFlight > 0, "a completion with nothing in flight")
        inFlight -= 1
        inFlightBytes -= bytes
        switch state {
        case .open: return .takeMore
        case .draining(let reason): return inFlight == 0 ? .close(reason: reason) : .wait
        case .closed: return inFlight == 0 ? .release : .wait
        }
    }

    /// Takes no more requests: closes now if none is in flight, else once the last completes.
    public mutating func stopTaking(reason: String) -> Next {
        guard state == .open else { return .wait }
        if inFlight == 0 { return .close(reason: reason) }
        state = .draining(reason: reason)
        return .wait
    }

    /// The connection closes: the export may go once nothing is in flight.
    public mutating func close() -> Next {
        state = .closed
        return inFlight == 0 ? .release : .wait
    }
}
