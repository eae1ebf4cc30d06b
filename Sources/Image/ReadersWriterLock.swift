import Foundation

/// A readers-writer lock whose storage is allocated once, so its address never moves (a
/// `pthread_rwlock_t` stored in a Swift property may). A waiting writer is preferred:
/// steady readers cannot starve it. So a holder of the shared side must never take it
/// again (it would wait behind the writer that waits for it).
public final class ReadersWriterLock: @unchecked Sendable {
    // Unchecked: the pthread lock is the synchronisation.
    private let lock: UnsafeMutablePointer<pthread_rwlock_t>

    public init() {
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

    @inline(__always) public func lockShared() { pthread_rwlock_rdlock(lock) }
    @inline(__always) public func tryLockShared() -> Bool { pthread_rwlock_tryrdlock(lock) == 0 }
    @inline(__always) public func lockExclusive() { pthread_rwlock_wrlock(lock) }
    @inline(__always) public func unlock() { pthread_rwlock_unlock(lock) }
}
