// Writes acknowledged before their change-log bits are durable.
//
// With CBT on, a write into a 64 KiB block whose bit is not yet on stable storage (the
// first write to it after a snapshot) must not reach the VHD until the log has synced.
// Holding the client's reply for that sync costs a device flush per batch of writes.
// Instead, when the leaf already holds every sector the write covers (so writing it later
// changes no allocation), its data is copied here ("parked") and acknowledged at once: an
// NBD write without FUA is promised durable only after a FLUSH. The data reaches the VHD
// once its bits are durable. Until then:
//  - a read sees parked data over what the chain holds;
//  - a later write, zeroing or trim overlapping a parked write runs after it is written;
//  - FLUSH, snapshot, CBT changes and close wait until nothing is parked.
// Parked writes are written strictly in arrival order, by one pump at a time. A thread
// that must wait makes the bits durable and pumps itself, so no wait depends on another
// thread being free.

import CBT
import Foundation
import Locking


final class ParkedWrites: @unchecked Sendable {
    // Unchecked: everything but `pending` (an Atomic) is touched with `cond` locked, a
    // condition variable that writes waiting for room sleep on.
    struct Entry {
        let seq: UInt64
        let offset: UInt64
        let data: [UInt8]
        /// Its bits are durable (or the log failed: `failure`); it may be written.
        var ready = false
        var failure: CBTError?
        var end: UInt64 { offset + UInt64(data.count) }
        func overlaps(_ o: UInt64, _ l: UInt64) -> Bool { o < end && offset < o + l }
    }

    /// Most bytes parked per VDI; a write past it waits for the log as before.
    static let byteLimit = 8 << 20

    private let cond = NSCondition()
    /// Parked entries in arrival order: `entries[head...]`.
    private var entries: [Entry] = []
    private var head = 0
    /// `entries.count - head`, readable without the lock: every read and write of the VDI
    /// asks whether anything is parked, and almost always nothing is.
    private let pending = Atomic<Int>(0)
    private var bytes = 0
    private var nextSeq: UInt64 = 1
    /// Every entry with a lower sequence number has been written.
    private var appliedBelow: UInt64 = 1
    private var pumping = false
    /// Work waiting for entries up to a sequence number to be written.
    private var waiters: [(seq: UInt64, run: () -> Void)] = []
    /// The first failure writing parked data; the next flush reports it.
    private var writeFailure: DiskError?
    /// Writes parked since the handle opened (for tests and the log).
    private(set) var parkedCount = 0
    /// While positive, nothing new is parked: an exclusive section is waiting for the
    /// parked writes to drain, and must not chase new ones under a steady write load.
    private var heldOff = 0

    func holdOff() { cond.lock(); heldOff += 1; cond.unlock() }
    func resume() { cond.lock(); heldOff -= 1; cond.unlock() }

    var isEmpty: Bool { pending.load(ordering: .acquiring) == 0 }

    /// Parks a copy of the write's data; nil if the byte limit would be passed. The copy is
    /// made under the lock, so entries stay in sequence order.
    func park(offset: UInt64, length: Int, copy: (UnsafeMutableRawBufferPointer) throws -> Void) rethrows -> UInt64? {
        cond.lock(); defer { cond.unlock() }
        guard heldOff == 0, bytes + length <= Self.byteLimit else { return nil }
        let data = try [UInt8](unsafeUninitializedCapacity: length) { buf, n in
            try copy(UnsafeMutableRawBufferPointer(buf))
            n = length
        }
        bytes += length
        let seq = nextSeq
        nextSeq += 1
        entries.append(Entry(seq: seq, offset: offset, data: data))
        pending.add(1, ordering: .releasing)
        parkedCount += 1
        return seq
    }

    /// The sequence number of the last parked entry overlapping the range, if any.
    func lastOverlapping(_ offset: UInt64, _ length: UInt64) -> UInt64? {
        if pending.load(ordering: .acquiring) == 0 { return nil }
        cond.lock(); defer { cond.unlock() }
        guard head < entries.count else { return nil }
        for e in entries[head...].reversed() where e.overlaps(offset, length) { return e.seq }
        return nil
    }

    /// Runs `body` once every entry up to `seq` is written (at once if they are).
    func after(_ seq: UInt64, _ body: @escaping () -> Void) {
        cond.lock()
        if appliedBelow > seq { cond.unlock(); return body() }
        waiters.append((seq, body))
        cond.unlock()
    }

    /// The parked entries overlapping a range, oldest first (for reads to lay over the chain's bytes).
    func overlapping(_ offset: UInt64, _ length: UInt64) -> [Entry] {
        if pending.load(ordering: .acquiring) == 0 { return [] }
        cond.lock(); defer { cond.unlock() }
        guard head < entries.count else { return [] }
        return entries[head...].filter { $0.overlaps(offset, length) }
    }

    func markReady(_ seq: UInt64, failure: CBTError?) {
        cond.lock(); defer { cond.unlock() }
        guard let i = entries[head...].firstIndex(where: { $0.seq == seq }) else { return }
        entries[i].ready = true
        entries[i].failure = entries[i].failure ?? failure
    }

    /// Writes ready entries in order with `apply` until the head is not ready; returns
    /// at once if another thread is pumping.
    func pump(_ apply: (Entry) throws(DiskError) -> Void) {
        cond.lock()
        if pumping { cond.unlock(); return }
        pumping = true
        var due: [() -> Void] = []
        while head < entries.count, entries[head].ready {
            let e = entries[head]
            cond.unlock()
            var failure: DiskError?
            do { try apply(e) } catch { failure = error }
            cond.lock()
            if let failure, writeFailure == nil { writeFailure = failure }
            head += 1
            pending.subtract(1, ordering: .releasing)
            bytes -= e.data.count
            appliedBelow = e.seq + 1
            if head > 64 && head * 2 > entries.count {
                entries.removeFirst(head)
                head = 0
            }
            if !waiters.isEmpty {
                let (now, later) = (waiters.filter { $0.seq < appliedBelow }, waiters.filter { $0.seq >= appliedBelow })
                waiters = later
                due += now.map(\.run)
            }
            cond.broadcast()
        }
        pumping = false
        cond.broadcast()
        cond.unlock()
        for run in due { run() }
    }

    /// Blocks until every entry parked before the call is written. `makeDurable` syncs the
    /// change log (all bits set so far), so the wait needs no other thread's commit; the
    /// caller then pumps itself when no one else is.
    func waitAllWritten(makeDurable: () -> CBTError?, apply: (Entry) throws(DiskError) -> Void) {
        cond.lock()
        let target = nextSeq - 1
        let pending = appliedBelow <= target
        cond.unlock()
        guard pending else { return }
        let failure = makeDurable()
        cond.lock()
        for i in head..<entries.count where entries[i].seq <= target && !entries[i].ready {
            entries[i].ready = true
            entries[i].failure = failure
        }
        cond.unlock()
        while true {
            pump(apply)
            cond.lock()
            if appliedBelow > target { cond.unlock(); return }
            if pumping { cond.wait() }
            cond.unlock()
        }
    }

    /// The first failure writing parked data since the last call.
    func takeWriteFailure() -> DiskError? {
        cond.lock(); defer { cond.unlock() }
        defer { writeFailure = nil }
        return writeFailure
    }
}
