// The raw implementation of the storage seam (`Image`): a sparse file whose bytes are the
// disk's. Allocation is the file system's own (seekData / seekHole), TRIM punches
// holes, WRITE_ZEROES zeroes a range in place (FALLOC_FL_ZERO_RANGE) or punches it. There
// is no chain: a raw image is always one layer, has no parent, and cannot be given one.

import Image
import Locking
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// A raw image's failure.
public enum RawError: ImageFailure, Equatable {
    case io(path: String, errno: Errno)
    case readOnly(path: String)
    case outOfRange(path: String, offset: UInt64, length: UInt64, size: UInt64)
    case wouldBlock
    case notPublished(path: String)
    case zeroingNotFast(path: String)
    /// Snapshots, clones and parents need a format with chains.
    case noChains(path: String, operation: String)

    public var failureKind: ImageFailureKind {
        switch self {
        case .io: return .io
        case .readOnly: return .readOnly
        case .outOfRange: return .outOfRange
        case .wouldBlock: return .wouldBlock
        case .notPublished: return .notPublished
        case .zeroingNotFast: return .zeroingNotFast
        case .noChains: return .chain
        }
    }

    public var errno: Errno? {
        if case .io(_, let e) = self { return e }
        return nil
    }

    public var description: String {
        switch self {
        case .io(let p, let e): return "\(p): \(e)"
        case .readOnly(let p): return "\(p) is open read-only"
        case .outOfRange(let p, let o, let n, let s): return "\(p): \(n) bytes at \(o) pass the end of the disk (\(s) bytes)"
        case .wouldBlock: return "the data is not in the page cache"
        case .notPublished(let p): return "\(p): the write was not made visible (its gate failed)"
        case .zeroingNotFast(let p): return "\(p): zeroing would have to write zeros"
        case .noChains(let p, let op): return "\(p): a raw image has no chain, so it cannot \(op)"
        }
    }
}

/// One open raw file: also the `MappableFile` its read plans lend pages from.
public final class RawImage: DiskImage, MappableFile, @unchecked Sendable {
    // Unchecked: `fd`, `path`, `virtualSize` and `writable` never change after init; the
    // mapping is behind a Mutex and `closed` is atomic.
    public let path: String
    let fd: Int32
    public let virtualSize: UInt64
    public let writable: Bool
    private let closed = Atomic<Bool>(false)
    /// One read-only shared mapping of the whole file, made on first use and kept while
    /// the object lives (closing the descriptor leaves it valid). The file does not grow
    /// while it is open for I/O (`grow` is for images no one serves).
    private let mapping = Mutex<UnsafeRawPointer?>(nil)

    init(path: String, writable: Bool) throws(RawError) {
        self.path = path
        self.writable = writable
        let fd = Glibc.open(path, (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC)
        guard fd >= 0 else { throw .io(path: path, errno: Errno(rawValue: Glibc.errno)) }
        var st = stat()
        guard fstat(fd, &st) == 0 else {
            let e = Errno(rawValue: Glibc.errno)
            _ = Glibc.close(fd)
            throw .io(path: path, errno: e)
        }
        self.fd = fd
        virtualSize = UInt64(st.st_size)
    }

    deinit {
        close()
        mapping.withLock { if let m = $0 { munmap(UnsafeMutableRawPointer(mutating: m), Int(virtualSize)) } }
    }

    public var depth: Int { 1 }
    public var layerPaths: [String] { [path] }
    public func setAllocationBarrier(_ on: Bool) {}

    public func close() {
        if closed.exchange(true, ordering: .acquiringAndReleasing) { return }
        _ = Glibc.close(fd)
    }

    func check(_ offset: UInt64, _ length: UInt64) throws(RawError) {
        guard offset <= virtualSize, length <= virtualSize - offset else {
            throw .outOfRange(path: path, offset: offset, length: length, size: virtualSize)
        }
    }

    // MARK: allocation

    /// The data (true) and hole (false) extents of `[offset, offset+length)`, in order.
    func extents(_ offset: UInt64, _ length: UInt64) throws(RawError) -> [(data: Bool, range: Range<UInt64>)] {
        let end = offset + length
        var out: [(Bool, Range<UInt64>)] = []
        var pos = offset
        while pos < end {
            let data = lseek(fd, off_t(pos), seekData)
            if data < 0 {
                guard Glibc.errno == ENXIO else { throw .io(path: path, errno: Errno(rawValue: Glibc.errno)) }
                out.append((false, pos..<end))  // no data from here to the end of the file
                break
            }
            let d = min(UInt64(data), end)
            if d > pos { out.append((false, pos..<d)) }
            guard d < end else { break }
            let hole = lseek(fd, off_t(d), seekHole)
            guard hole >= 0 else { throw .io(path: path, errno: Errno(rawValue: Glibc.errno)) }
            let h = min(UInt64(hole), end)
            out.append((true, d..<h))
            pos = h
        }
        return out
    }

    public func allocationRuns(offset: UInt64, length: UInt64) throws -> [(allocated: Bool, length: UInt64)] {
        let n = min(length, virtualSize - min(offset, virtualSize))
        return try extents(offset, n).map { ($0.data, UInt64($0.range.count)) }
    }

    public func leafDataRuns(offset: UInt64, length: UInt64) throws -> [Range<UInt64>] {
        let n = min(length, virtualSize - min(offset, virtualSize))
        return try extents(offset, n).filter(\.data).map(\.range)
    }

    public func leafHoldsAll(offset: UInt64, length: UInt64) -> Bool {
        guard length > 0 else { return true }
        let hole = lseek(fd, off_t(offset), seekHole)
        return hole >= 0 && UInt64(hole) >= offset + length
    }

    /// A hole is filled by the file system at the write: no lookup needed (SEEK_HOLE
    /// costs a walk of the file's extents).
    public func writesInPlace(offset: UInt64, length: UInt64) -> Bool { true }

    public func leafLacksAll(offset: UInt64, length: UInt64) -> Bool {
        guard length > 0 else { return true }
        let data = lseek(fd, off_t(offset), seekData)
        return data < 0 || UInt64(data) >= offset + length
    }

    // MARK: reads

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64, cachedOnly: Bool,
                     holes: inout [Range<Int>]) throws {
        holes.removeAll(keepingCapacity: true)
        try check(offset, UInt64(buffer.count))
        for e in try extents(offset, UInt64(buffer.count)) {
            let a = Int(e.range.lowerBound - offset), b = Int(e.range.upperBound - offset)
            let piece = UnsafeMutableRawBufferPointer(rebasing: buffer[a..<b])
            if e.data {
                try pread(into: piece, at: e.range.lowerBound, cachedOnly: cachedOnly)
            } else {
                piece.initializeMemory(as: UInt8.self, repeating: 0)
                holes.append(a..<b)
            }
        }
    }

    func pread(into b: UnsafeMutableRawBufferPointer, at offset: UInt64, cachedOnly: Bool) throws(RawError) {
        var done = 0
        while done < b.count {
            var iov = iovec(iov_base: b.baseAddress! + done, iov_len: b.count - done)
            // RWF_NOWAIT: fail with EAGAIN instead of waiting for the disk.
            let n = c_preadv2(fd, &iov, 1, Int(offset) + done, cachedOnly ? 0x08 : 0)
            if n < 0 {
                if Glibc.errno == EINTR { continue }
                if cachedOnly && (Glibc.errno == EAGAIN || Glibc.errno == EOPNOTSUPP) { throw .wouldBlock }
                throw .io(path: path, errno: Errno(rawValue: Glibc.errno))
            }
            if n == 0 {
                // Past the end of the file (it was cut short under us): zeros.
                UnsafeMutableRawBufferPointer(rebasing: b[done...]).initializeMemory(as: UInt8.self, repeating: 0)
                return
            }
            if cachedOnly && n < b.count - done { throw .wouldBlock }
            done += n
        }
    }

    public func plan(offset: UInt64, length: Int) throws -> ReadPlan {
        try check(offset, UInt64(length))
        var p = ReadPlan()
        for e in try extents(offset, UInt64(length)) {
            if e.data { p.appendData(self, offset: e.range.lowerBound, count: e.range.count) } else { p.appendZeros(e.range.count) }
        }
        return p
    }

    public func mapped(offset: UInt64, count: Int) -> UnsafeRawBufferPointer? {
        #if os(Linux)
        let (end, over) = offset.addingReportingOverflow(UInt64(max(count, 0)))
        guard count > 0, !over, end <= virtualSize, virtualSize <= UInt64(Int.max) else { return nil }
        let base: UnsafeRawPointer? = mapping.withLock { m in
            if let m { return m }
            guard let p = mmap(nil, Int(virtualSize), PROT_READ, MAP_SHARED, fd, 0), p != MAP_FAILED else { return nil }
            m = UnsafeRawPointer(p)
            return m
        }
        guard let base else { return nil }
        // Fault the pages in now, on this (I/O) thread (MADV_POPULATE_READ, Linux 5.14).
        let start = Int(offset) & ~4095
        guard madvise(UnsafeMutableRawPointer(mutating: base + start), Int(end) - start, 22) == 0 else { return nil }
        return UnsafeRawBufferPointer(start: base + Int(offset), count: count)
        #else
        return nil
        #endif
    }

    // MARK: writes

    public func write(_ data: UnsafeRawBufferPointer, at offset: UInt64, beforeVisible: (() throws -> Void)?) throws {
        guard writable else { throw RawError.readOnly(path: path) }
        try check(offset, UInt64(data.count))
        // A raw write is visible the moment it lands: the gate runs first.
        if let beforeVisible {
            do { try beforeVisible() } catch { throw RawError.notPublished(path: path) }
        }
        var done = 0
        while done < data.count {
            let n = Glibc.pwrite(fd, data.baseAddress! + done, data.count - done, off_t(offset) + off_t(done))
            if n < 0 && Glibc.errno == EINTR { continue }
            guard n > 0 else { throw RawError.io(path: path, errno: Errno(rawValue: n < 0 ? Glibc.errno : EIO)) }
            done += n
        }
    }

    public func writeZeroes(offset: UInt64, length: UInt64, punch: Bool, fastOnly: Bool) throws {
        guard writable else { throw RawError.readOnly(path: path) }
        try check(offset, length)
        guard length > 0 else { return }
        // PUNCH_HOLE|KEEP_SIZE returns the space; ZERO_RANGE|KEEP_SIZE keeps it allocated.
        let mode: Int32 = punch ? 0x02 | 0x01 : 0x10 | 0x01
        if c_fallocate(fd, mode, Int(offset), Int(length)) == 0 { return }
        let e = Glibc.errno
        guard e == EOPNOTSUPP || e == ENOSYS || e == EINVAL else { throw RawError.io(path: path, errno: Errno(rawValue: e)) }
        guard !fastOnly else { throw RawError.zeroingNotFast(path: path) }
        let zeros = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(min(length, 1 << 20)), alignment: 4096)
        defer { zeros.deallocate() }
        zeros.initializeMemory(as: UInt8.self, repeating: 0)
        var pos = offset
        while pos < offset + length {
            let n = Int(min(UInt64(zeros.count), offset + length - pos))
            try write(UnsafeRawBufferPointer(rebasing: zeros[0..<n]), at: pos, beforeVisible: nil)
            pos += UInt64(n)
        }
    }

    public func flush() throws {
        guard writable else { return }
        guard fdatasync(fd) == 0 else { throw RawError.io(path: path, errno: Errno(rawValue: Glibc.errno)) }
    }
}

/// lseek's SEEK_DATA and SEEK_HOLE (Linux; not exported by the Glibc module).
let seekData: Int32 = 3
let seekHole: Int32 = 4

@_silgen_name("preadv2")
private func c_preadv2(_ fd: Int32, _ iov: UnsafePointer<iovec>, _ count: Int32, _ offset: Int, _ flags: Int32) -> Int

@_silgen_name("fallocate")
private func c_fallocate(_ fd: Int32, _ mode: Int32, _ offset: Int, _ length: Int) -> Int32
