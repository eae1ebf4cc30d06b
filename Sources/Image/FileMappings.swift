// Read-only shared mappings of an image file that may grow (VHD and qcow2 files append),
// for reads that lend page-cache pages instead of copying: one place for what each
// format's file would otherwise map the same way.

import Locking
#if canImport(Glibc)
import Glibc
#endif

/// Mappings made on first use and kept until this object goes (closing the descriptor
/// leaves them valid). Each reserves twice the file's length then (at least 1 GiB); when
/// the file has grown past the newest, a larger one is added and the older ones stay for
/// the pointers already handed out. Only bytes inside the file are ever handed out (past
/// its end a mapping raises SIGBUS), so a file mapped this way must never shrink.
public final class FileMappings: Sendable {
    private struct State {
        var maps: [(base: UnsafeRawPointer, length: Int)] = []
        var knownLength: UInt64 = 0
    }
    // The pointers are only ever read through and unmapped at deinit.
    private let state = Mutex(State())

    public init() {}

    /// `count` bytes at `offset` of the file open as `fd`, or nil (past its end, or the
    /// mapping failed). With `populate`, the pages are faulted in now, on the calling
    /// (I/O) thread, so whoever sends from them does not wait for the disk
    /// (MADV_POPULATE_READ, Linux 5.14).
    public func map(fd: Int32, offset: UInt64, count: Int, populate: Bool = true) -> UnsafeRawBufferPointer? {
        #if os(Linux)
        let (end, over) = offset.addingReportingOverflow(UInt64(max(count, 0)))
        guard count > 0, !over, end <= UInt64(Int.max) else { return nil }
        let base: UnsafeRawPointer? = state.withLock { m in
            if end > m.knownLength {
                var st = stat()
                guard fstat(fd, &st) == 0 else { return nil }
                m.knownLength = UInt64(st.st_size)
                if end > m.knownLength { return nil }
            }
            if let last = m.maps.last, UInt64(last.length) >= end { return last.base }
            let length = max(Int(m.knownLength) * 2, 1 << 30)
            guard let p = mmap(nil, length, PROT_READ, MAP_SHARED, fd, 0), p != MAP_FAILED else { return nil }
            m.maps.append((UnsafeRawPointer(p), length))
            return UnsafeRawPointer(p)
        }
        guard let base else { return nil }
        if !populate { return UnsafeRawBufferPointer(start: base + Int(offset), count: count) }
        let start = Int(offset) & ~4095
        guard madvise(UnsafeMutableRawPointer(mutating: base + start), Int(end) - start, 22) == 0 else { return nil }
        return UnsafeRawBufferPointer(start: base + Int(offset), count: count)
        #else
        return nil
        #endif
    }

    deinit {
        #if os(Linux)
        for m in state.withLock({ $0.maps }) { munmap(UnsafeMutableRawPointer(mutating: m.base), m.length) }
        #endif
    }
}
