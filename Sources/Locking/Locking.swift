// The locks every target uses, from one place.
//
// A normal build uses the standard library's `Synchronization.Mutex` and `Atomic`,
// re-exported here. A ThreadSanitizer build (`-Xswiftc -DVDINBD_TSAN`, as
// `Tools/stress --tsan` makes) gets a `Mutex` with the same interface over a
// `pthread_mutex_t`: the standard one hands a contended lock over through futex calls in
// its own library, which ThreadSanitizer cannot see, so every access it guards under
// contention would be reported as a race. With this one the reports that remain are real.

#if VDINBD_TSAN
@_exported import struct Synchronization.Atomic
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// `Synchronization.Mutex`'s interface over a `pthread_mutex_t` (ThreadSanitizer builds only).
public struct Mutex<Value: ~Copyable>: ~Copyable {
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>
    private let value: UnsafeMutablePointer<Value>

    public init(_ initialValue: consuming sending Value) {
        mutex = .allocate(capacity: 1)
        precondition(pthread_mutex_init(mutex, nil) == 0, "pthread_mutex_init")
        value = .allocate(capacity: 1)
        value.initialize(to: initialValue)
    }

    deinit {
        value.deinitialize(count: 1)
        value.deallocate()
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
    }

    public borrowing func withLock<Result: ~Copyable, E: Error>(
        _ body: (inout sending Value) throws(E) -> sending Result
    ) throws(E) -> sending Result {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body(&value.pointee)
    }
}

// Unchecked: the value is reached only inside `withLock`, with the mutex held.
extension Mutex: @unchecked Sendable where Value: ~Copyable {}
#else
@_exported import Synchronization
#endif
