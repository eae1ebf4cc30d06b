import Foundation
import Synchronization

/// The readers-writer lock between a VDI's I/O (shared) and the operations that change its
/// chain or change log under it (exclusive). Its storage is allocated once, so its address
/// never moves (a `pthread_rwlock_t` stored in a Swift property may). A waiting writer is
/// preferred: steady reads cannot starve a quiesce. So a holder of the shared side must
/// never take it again (it would wait behind the writer that waits for it).
final class Gate: @unchecked Sendable {
    private let lock: UnsafeMutablePointer<pthread_rwlock_t>

    init() {
        lock = .allocate(capacity: 1)
        var attr = pthread_rwlockattr_t()
        pthread_rwlockattr_init(&attr)
        pthread_rwlockattr_setkind_np(&attr, Int32(PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP))
        pthread_rwlock_init(lock, &attr)
        pthread_rwlockattr_destroy(&attr)
    }

    deinit {
        pthread_rwlock_destroy(lock)
        lock.deallocate()
    }

    @inline(__always) func lockShared() { pthread_rwlock_rdlock(lock) }
    @inline(__always) func tryLockShared() -> Bool { pthread_rwlock_tryrdlock(lock) == 0 }
    @inline(__always) func lockExclusive() { pthread_rwlock_wrlock(lock) }
    @inline(__always) func unlock() { pthread_rwlock_unlock(lock) }
}

/// While a VDI's leaf is merged into its parent with clients writing: the ranges written,
/// zeroed or trimmed since the merge began, in 2 MiB units, so the final pass (with I/O
/// held off) copies only those again.
///
/// A range is marked only once its data is visible to reads through the handle (written,
/// or parked), never before: the merge's catch-up takes the marks and then reads, so a
/// write marked first and landing after that read would be taken, copied stale, and lost.
final class ChangeTracker: Sendable {
    static let unit: UInt64 = 2 << 20
    private let units = Mutex<Set<UInt64>>([])

    func mark(_ offset: UInt64, _ length: UInt64) {
        guard length > 0 else { return }
        let first = offset / Self.unit, last = (offset + length - 1) / Self.unit
        units.withLock { s in for u in first...last { s.insert(u) } }
    }

    /// The marked ranges, merged and sorted, clipped to `size`; the set is emptied.
    func take(size: UInt64) -> [Range<UInt64>] {
        let all = units.withLock { s -> [UInt64] in defer { s.removeAll() }; return s.sorted() }
        var out: [Range<UInt64>] = []
        for u in all {
            let r = (u * Self.unit)..<min((u + 1) * Self.unit, size)
            guard !r.isEmpty else { continue }
            if let last = out.last, last.upperBound == r.lowerBound { out[out.count - 1] = last.lowerBound..<r.upperBound } else { out.append(r) }
        }
        return out
    }

    var count: Int { units.withLock { $0.count } }
}
