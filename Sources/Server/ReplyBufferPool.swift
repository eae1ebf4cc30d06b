// Large read replies reuse their buffers. A 1 MiB reply is a 2 MiB allocation (ByteBuffer
// rounds capacities up to a power of two); sixteen in flight pass glibc's trim threshold,
// so freed buffers went back to the kernel and every new one was faulted in again: a
// tenth of the server's CPU on sequential TLS reads. Buffers come back once their reply
// has left, and the pool empties itself after a quiet spell so an idle server keeps no
// more than it did.

import Dispatch
import Foundation
import NIOCore
import Locking

final class ReplyBufferPool: Sendable {
    /// Smaller buffers are cheap to allocate and not kept.
    static let minimumCapacity = 128 * 1024

    let maxBytes: Int
    /// How long the pool keeps buffers nobody has asked for.
    let idleLifetime: DispatchTimeInterval
    private struct State {
        var free: [ByteBuffer] = []
        var freeBytes = 0
        var lastTake = DispatchTime.now()
    }
    private let state = Mutex(State())

    init(maxBytes: Int = 32 << 20, idleLifetime: DispatchTimeInterval = .seconds(2)) {
        self.maxBytes = maxBytes
        self.idleLifetime = idleLifetime
    }

    /// An empty buffer of at least `capacity` bytes.
    func take(capacity: Int) -> ByteBuffer {
        guard capacity >= Self.minimumCapacity else {
            var b = ByteBuffer()
            b.reserveCapacity(capacity)
            return b
        }
        let reused: ByteBuffer? = state.withLock { s in
            s.lastTake = .now()
            guard let i = s.free.lastIndex(where: { $0.capacity >= capacity }) else { return nil }
            let b = s.free.remove(at: i)
            s.freeBytes -= b.capacity
            return b
        }
        return reused ?? ByteBufferAllocator().buffer(capacity: capacity)
    }

    /// Takes back a buffer whose reply has been sent, leaving `buffer` empty. Passed in
    /// place so that the pool holds the only reference: emptying a shared buffer would
    /// allocate a fresh one, which is what the pool is here to avoid.
    func give(_ buffer: inout ByteBuffer) {
        guard buffer.capacity >= Self.minimumCapacity else { return }
        buffer.clear()
        let b = buffer
        buffer = ByteBuffer()
        state.withLock { s in
            if s.freeBytes + b.capacity <= maxBytes {
                s.freeBytes += b.capacity
                s.free.append(b)
            }
        }
    }

    /// Drops every buffer if none was taken for `idleLifetime` (called on a timer).
    func trimIfIdle() {
        let dropped: [ByteBuffer] = state.withLock { s in
            var dropped: [ByteBuffer] = []
            if DispatchTime.now() > s.lastTake + idleLifetime, !s.free.isEmpty {
                swap(&dropped, &s.free)
                s.freeBytes = 0
            }
            return dropped
        }
        _ = dropped  // released here, outside the lock
    }

    var bytesHeld: Int {
        state.withLock { $0.freeBytes }
    }
}
