// Design notes: reading the socket and taking requests.
//
// The cost of a request must not depend on how many are queued behind it: NBD sets no
// limit on outstanding requests, and simple clients send thousands back to back. So:
//
// - The socket is read only while requests can be taken. When a limit is reached (requests
//   or bytes in flight, or replies waiting for the socket) the read source is suspended and
//   the client is held by TCP back-pressure, not by our memory. Intake resumes when a reply
//   completes or drains, and the source only once the buffered input is used up.
// - Write payloads never alias the input buffer: the decoder gathers each into a buffer of
//   its own, and reads a large one straight from the socket into place. So between reads
//   the input buffer holds at most a partial header, and making room for the next read
//   moves a few bytes, whatever is in flight. (Payload slices of the input made every
//   compaction copy all input behind them: quadratic in the backlog.)
//
// What one connection holds, at most:
//   input buffer      readChunk (256 KiB) + a partial header; during option haggling, one
//                     option (Limits.maxOptionLength, 64 KiB)
//   gathered payload  the write being received: its length, ≤ Limits.maxPayload (32 MiB)
//   in flight         maxInFlightRequests (256) requests and maxInFlightBytes (128 MiB) of
//                     payloads and read lengths, plus the one request that crossed it
//   replies queued    maxQueuedReplyBytes (4 MiB) before intake stops, plus the replies of
//                     requests already in flight

import Dispatch
import NBD
import NIOCore

extension Connection {
    /// The most one socket read puts into the input buffer.
    static let readChunk = 256 * 1024
    /// Reads per socket event, so one busy client cannot hold the queue for long.
    static let readsPerEvent = 16
    /// A payload still missing this many bytes is read straight into its own buffer.
    static let directPayloadMinimum = 64 * 1024

    /// Why intake stopped.
    enum IntakeStop {
        /// Every whole request is taken; more must be read.
        case needBytes
        /// A limit is reached; the read source is suspended.
        case atLimit
        /// Closed, disconnecting, or in the TLS handshake.
        case stopped
    }

    func readable() {
        guard !isClosed else { return }
        if case .tlsHandshake(let session) = phase {
            continueTLSHandshake(session)
            return
        }
        for _ in 0..<Self.readsPerEvent {
            guard !readSuspended, !isClosed, machine?.isTaking ?? true else { return }
            if case .tlsHandshake = phase { return }
            switch readSome() {
            case .bytes:
                // Input is at its most right after a read: measured here, not per request.
                peakInputBytes = max(peakInputBytes, inbound.readableBytes + requestDecoder.payloadBytesHeld)
                guard intake() == .needBytes else { return }
            case .wouldBlock:
                return
            case .eof:
                inputEnded()
                return
            case .failed(let why):
                close(reason: "read failed: \(why)")
                return
            }
        }
        // Out of turns with input left: the socket signals again by itself, but bytes
        // GnuTLS has already decrypted do not make it readable.
        if transport.hasBufferedInput { queue.async { [weak self] in self?.readable() } }
    }

    /// One read from the transport, into the payload being gathered when it still misses
    /// a lot and nothing else is buffered, else into the input buffer.
    func readSome() -> TransportRead {
        var result = TransportRead.wouldBlock
        if inTransmission, inbound.readableBytes == 0, requestDecoder.payloadBytesNeeded >= Self.directPayloadMinimum {
            requestDecoder.receivePayload { window in
                result = transport.read(into: window)
                if case .bytes(let n) = result { return n }
                return 0
            }
            return result
        }
        // Only a partial header (or option) is left here, so this moves a few bytes.
        if inbound.readableBytes == 0 { inbound.clear() } else { inbound.discardReadBytes() }
        inbound.writeWithUnsafeMutableBytes(minimumWritableBytes: Self.readChunk) { ptr in
            result = transport.read(into: UnsafeMutableRawBufferPointer(rebasing: ptr.prefix(Self.readChunk)))
            if case .bytes(let n) = result { return n }
            return 0
        }
        return result
    }

    /// The client closed its side: finish what is in flight, then close.
    func inputEnded() {
        stopTaking(reason: "client closed the connection")
    }

    /// Decodes and starts every whole request buffered, up to the limits. Replies made
    /// meanwhile (inline reads, errors) wait for the flush `send` schedules, so they leave
    /// together with those that complete in the same turn of the queue.
    @discardableResult
    func intake() -> IntakeStop {
        do {
            while !isClosed {
                switch phase {
                case .clientFlags:
                    var d = ClientFlagsDecoder()
                    guard let flags = try d.decode(buffer: &inbound) else { return .needBytes }
                    let actions = handshake.receive(clientFlags: flags)
                    if handshake.state == .optionHaggling { phase = .optionHaggling }
                    perform(actions)
                case .optionHaggling:
                    var d = OptionDecoder()
                    guard let opt = try d.decode(buffer: &inbound) else { return .needBytes }
                    logger.debug("option \(opt.option)")
                    perform(handshake.receive(option: opt, resolver: resolver))
                case .transmission:
                    guard let m = machine, m.isTaking else { return .stopped }
                    guard m.mayTake(queuedReplyBytes: outboundBytes) else {
                        pauseReading()
                        return .atLimit
                    }
                    guard let r = try requestDecoder.decode(buffer: &inbound) else { return .needBytes }
                    handle(r)
                case .closed, .tlsHandshake:
                    return .stopped
                }
            }
        } catch {
            close(reason: "protocol error: \(error)")
        }
        return .stopped
    }

    func pauseReading() {
        guard !readSuspended, let rs = readSource else { return }
        rs.suspend()
        readSuspended = true
    }

    /// A request finished or replies drained: take what is buffered, and once that is used
    /// up read the socket again.
    func resumeIntake() {
        guard readSuspended, !isClosed, machine?.isTaking ?? true, let rs = readSource else { return }
        guard intake() == .needBytes, readSuspended else { return }
        readSuspended = false
        rs.resume()
        // Bytes GnuTLS has decrypted already: the socket may not signal for them.
        if transport.hasBufferedInput { readable() }
    }
}
