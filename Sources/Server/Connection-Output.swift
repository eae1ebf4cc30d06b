// Writing replies: one writer per connection, so chunks never interleave; queued replies
// leave in as few calls as the transport allows.

import DequeModule
import Dispatch
import NIOCore

extension Connection {
    static let coalesceLimit = 256 * 1024
    /// Replies handed to one sendmsg (under IOV_MAX, 1024): a flood of small replies
    /// leaves in few calls.
    static let gatherLimit = 512
    /// Reads up to this size may be served from the page cache on the connection queue.
    static let inlineReadLimit: UInt32 = 64 * 1024
    /// Writes up to this size into space the leaf holds may be done on the connection queue.
    static let inlineWriteLimit = 64 * 1024

    func send(_ buf: ByteBuffer) {
        guard !isClosed else { return }
        outboundBytes += buf.readableBytes
        outbound.append(.buffer(buf))
        tailTakesSmallReplies = false
        scheduleFlush()
    }

    /// Queues a reply made of pieces (a mapped read), in order.
    func send(pieces: [Outgoing]) {
        guard !isClosed else { return }
        for p in pieces { outboundBytes += p.readableBytes }
        outbound.append(contentsOf: pieces)
        tailTakesSmallReplies = false
        scheduleFlush()
    }

    /// The most small replies share one buffer.
    static let smallRepliesLimit = 64 * 1024

    /// Queues a small reply (a write's, an error): it is encoded straight onto the end of
    /// the queue's last buffer when that buffer holds only such replies, so a burst of them
    /// costs no allocation each and leaves as one piece.
    func sendSmall(_ encode: (inout ByteBuffer) -> Void) {
        guard !isClosed else { return }
        // The last buffer is ours alone, unless it is the one GnuTLS must be offered again
        // unchanged.
        if tailTakesSmallReplies, let last = outbound.indices.last, !(last == 0 && retryingWrite),
           outbound[last].readableBytes < Self.smallRepliesLimit, let added = outbound[last].append(encode) {
            outboundBytes += added
        } else {
            var b = ByteBuffer()
            b.reserveCapacity(1024)
            encode(&b)
            outboundBytes += b.readableBytes
            outbound.append(.buffer(b))
            tailTakesSmallReplies = true
        }
        scheduleFlush()
    }

    private func scheduleFlush() {
        guard !flushScheduled, writeSuspended else { return }
        flushScheduled = true
        queue.async { [self] in
            flushScheduled = false
            if writeSuspended { flushOutbound() }
        }
    }

    /// How many queued pieces one gathered write takes: up to `gatherLimit` of them and
    /// `coalesceLimit` bytes, always at least one, and a large piece with the header
    /// before it.
    func gatherCount() -> Int {
        var n = 1, bytes = outbound[0].readableBytes
        while n < min(outbound.count, Self.gatherLimit),
              bytes + outbound[n].readableBytes <= Self.coalesceLimit || bytes < 4096 {
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
        // Intake may have stopped for the queued replies: the machine says when it may go on.
        defer {
            if readSuspended, !isClosed, machine?.mayTake(queuedReplyBytes: outboundBytes) == true { resumeIntake() }
        }
        // Plain sockets take queued small replies in one sendmsg, without copying them; a
        // large reply goes in a call of its own, as with TLS below.
        while !outbound.isEmpty, let r = transport.writeGathered(outbound.prefix(gatherCount())) {
            switch r {
            case .wrote(var n):
                outboundBytes -= n
                while let first = outbound.first, n >= first.readableBytes {
                    n -= first.readableBytes
                    var sent = outbound.removeFirst()
                    sent.recycle(into: replyBuffers)
                }
                if n > 0 { outbound[0].moveReaderIndex(forwardBy: n) }
            case .wouldBlock:
                armWriteSource()
                return
            case .failed(let why):
                close(reason: "write failed: \(why)")
                return
            }
        }
        // TLS: small replies are merged into one buffer, so a burst is one record.
        while var first = outbound.first {
            if !retryingWrite && outbound.count > 1, case .buffer(var head) = first, head.readableBytes < Self.coalesceLimit {
                var merged = 1
                while merged < outbound.count, case .buffer(var next) = outbound[merged],
                      head.readableBytes + next.readableBytes <= Self.coalesceLimit {
                    head.writeBuffer(&next)
                    merged += 1
                }
                if merged > 1 {
                    outbound.removeSubrange(1..<merged)
                    first = .buffer(head)
                    outbound[0] = first
                }
            }
            var wouldBlock = false
            var failed: String?
            while first.readableBytes > 0 {
                let r = first.withUnsafeReadableBytes { transport.write($0) }
                switch r {
                case .wrote(let n):
                    first.moveReaderIndex(forwardBy: n)
                    outboundBytes -= n
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
                armWriteSource()
                return
            }
            retryingWrite = false
            outbound.removeFirst()
            first.recycle(into: replyBuffers)
        }
        // TLS records gathered for one send: out before the writer rests.
        switch transport.flushPending() {
        case .wrote: break
        case .wouldBlock:
            armWriteSource()
            return
        case .failed(let why):
            close(reason: "write failed: \(why)")
            return
        }
        if !writeSuspended, let ws = writeSource {
            writeSuspended = true
            ws.suspend()
        }
        if isClosed { finishClose() }
    }

    /// The socket refused more: write again when it is writable.
    func armWriteSource() {
        guard writeSuspended, let ws = writeSource else { return }
        writeSuspended = false
        ws.resume()
    }
}
