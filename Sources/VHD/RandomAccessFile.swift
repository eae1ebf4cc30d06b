import Image
import SystemPackage
import Locking
#if canImport(Glibc)
import Glibc
#endif

/// The only door from the VHD code to storage. Everything else in this target is pure.
public protocol RandomAccessFile: MappableFile {
    var path: String { get }
    /// Reads exactly `buffer.count` bytes; bytes past the end of the file read as zero.
    func read(into buffer: UnsafeMutableRawBufferPointer, atAbsoluteOffset offset: UInt64) throws(VHDError)
    func writeAll(_ buffer: UnsafeRawBufferPointer, toAbsoluteOffset offset: UInt64) throws(VHDError)
    /// Reads only if the whole range is in the page cache (never waits for the disk);
    /// false when it would have to.
    func readIfCached(into buffer: UnsafeMutableRawBufferPointer, atAbsoluteOffset offset: UInt64) throws(VHDError) -> Bool
    func length() throws(VHDError) -> UInt64
    func truncate(toLength: UInt64) throws(VHDError)
    /// Makes written data durable (fdatasync).
    func synchronize() throws(VHDError)
    /// Deallocates the range so it reads as zeros; false where the file system cannot.
    func punchHole(offset: UInt64, length: UInt64) -> Bool
    func close()
    /// The file's bytes `[offset, offset+count)` in memory, faulted in (waiting for the
    /// disk if need be), valid while the file object lives; nil where the file cannot be
    /// mapped or the range is not inside it.
    func mapped(offset: UInt64, count: Int) -> UnsafeRawBufferPointer?
}

extension RandomAccessFile {
    public func mapped(offset: UInt64, count: Int) -> UnsafeRawBufferPointer? { nil }
    /// `mapped` without faulting the pages in first (for tables looked up here and there).
    public func mapped(offset: UInt64, count: Int, populate: Bool) -> UnsafeRawBufferPointer? {
        if let p = self as? PosixFile { return p.map(offset: offset, count: count, populate: populate) }
        return mapped(offset: offset, count: count)
    }
}

extension RandomAccessFile {
    public func read(at offset: UInt64, count: Int) throws(VHDError) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        try typed(path) { try out.withUnsafeMutableBytes { b in try read(into: b, atAbsoluteOffset: offset) } }
        return out
    }
    public func write(_ bytes: [UInt8], at offset: UInt64) throws(VHDError) {
        try typed(path) { try bytes.withUnsafeBytes { b in try writeAll(b, toAbsoluteOffset: offset) } }
    }
}

/// A `RandomAccessFile` over a POSIX file descriptor.
public final class PosixFile: RandomAccessFile, @unchecked Sendable {
    // Unchecked: the descriptor and path never change and pread/pwrite need no lock; the
    // mapping is made and grown under its own lock (FileMappings); `closed` is atomic.
    public let path: String
    let fd: FileDescriptor
    /// Set by the first `close()`: a second one must not close a descriptor number the
    /// process has since handed to another file or socket.
    private let closed = Atomic<Bool>(false)

    public init(path: String, writable: Bool, create: Bool = false, exclusive: Bool = false) throws(VHDError) {
        self.path = path
        var opts: FileDescriptor.OpenOptions = [.closeOnExec]
        if create { opts.insert(.create) }
        if exclusive { opts.insert(.exclusiveCreate) }
        do {
            fd = try FileDescriptor.open(FilePath(path), writable ? .readWrite : .readOnly, options: opts,
                                         permissions: create ? [.ownerReadWrite, .groupRead] : nil, retryOnInterrupt: true)
        } catch let e as Errno {
            throw .io(path: path, errno: e)
        } catch {
            throw .io(path: path, errno: .ioError)
        }
    }

    /// The offset as a file offset, when the whole range fits one (an offset read from a
    /// crafted header may be anything up to 2^64).
    @inline(__always) func fileOffset(_ offset: UInt64, _ count: Int) throws(VHDError) -> Int64 {
        guard offset <= UInt64(Int64.max) - UInt64(count) else { throw .io(path: path, errno: .invalidArgument) }
        return Int64(offset)
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, atAbsoluteOffset offset: UInt64) throws(VHDError) {
        let start = try fileOffset(offset, buffer.count)
        var done = 0
        while done < buffer.count {
            let n: Int
            do {
                n = try fd.read(fromAbsoluteOffset: start + Int64(done),
                                into: UnsafeMutableRawBufferPointer(rebasing: buffer[done...]), retryOnInterrupt: true)
            } catch let e as Errno {
                throw .io(path: path, errno: e)
            } catch { throw .io(path: path, errno: .ioError) }
            if n == 0 {
                // Past EOF: a sparse tail reads as zeros, as the kernel would show a hole.
                UnsafeMutableRawBufferPointer(rebasing: buffer[done...]).initializeMemory(as: UInt8.self, repeating: 0)
                return
            }
            done += n
        }
    }

    public func readIfCached(into buffer: UnsafeMutableRawBufferPointer, atAbsoluteOffset offset: UInt64) throws(VHDError) -> Bool {
        #if os(Linux)
        let start = try fileOffset(offset, buffer.count)
        var iov = iovec(iov_base: buffer.baseAddress, iov_len: buffer.count)
        while true {
            // RWF_NOWAIT: fail with EAGAIN instead of waiting for the disk.
            let n = c_preadv2(fd.rawValue, &iov, 1, Int(start), 0x08)
            if n == buffer.count { return true }
            if n >= 0 { return false }  // short: part of it is not cached (or past EOF)
            if errno == EINTR { continue }
            if errno == EAGAIN || errno == EOPNOTSUPP { return false }
            throw .io(path: path, errno: Errno(rawValue: errno))
        }
        #else
        return false
        #endif
    }

    public func writeAll(_ buffer: UnsafeRawBufferPointer, toAbsoluteOffset offset: UInt64) throws(VHDError) {
        let start = try fileOffset(offset, buffer.count)
        do {
            _ = try fd.writeAll(toAbsoluteOffset: start, buffer)
        } catch let e as Errno {
            throw .io(path: path, errno: e)
        } catch { throw .io(path: path, errno: .ioError) }
    }

    public func length() throws(VHDError) -> UInt64 {
        do {
            return UInt64(try fd.seek(offset: 0, from: .end))
        } catch let e as Errno { throw .io(path: path, errno: e) } catch { throw .io(path: path, errno: .ioError) }
    }

    public func truncate(toLength length: UInt64) throws(VHDError) {
        if ftruncate(fd.rawValue, off_t(length)) != 0 { throw .io(path: path, errno: Errno(rawValue: errno)) }
    }

    public func synchronize() throws(VHDError) {
        if fdatasync(fd.rawValue) != 0 { throw .io(path: path, errno: Errno(rawValue: errno)) }
    }

    public func punchHole(offset: UInt64, length: UInt64) -> Bool {
        #if os(Linux)
        // FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        return c_fallocate(fd.rawValue, 0x02 | 0x01, Int(offset), Int(length)) == 0
        #else
        return false
        #endif
    }

    public func close() {
        if closed.exchange(true, ordering: .acquiringAndReleasing) { return }
        try? fd.close()
    }

    /// Read-only shared mappings of the file (VHD files never shrink).
    private let mappings = FileMappings()

    public func mapped(offset: UInt64, count: Int) -> UnsafeRawBufferPointer? {
        map(offset: offset, count: count, populate: true)
    }

    func map(offset: UInt64, count: Int, populate: Bool) -> UnsafeRawBufferPointer? {
        mappings.map(fd: fd.rawValue, offset: offset, count: count, populate: populate)
    }
}

/// An in-memory `RandomAccessFile`, for tests, fuzzing and building images in memory.
/// Sparse, as a file system's files are: only pages written hold memory, so a block
/// allocated far out (a footer written 2 MiB past the last block, or an offset a crafted
/// table names) costs what was written, not the gap.
public final class MemoryFile: RandomAccessFile, @unchecked Sendable {
    // Unchecked: a test and image-building helper, used by one thread at a time.
    public let path: String
    static let pageSize = 1 << 16
    private var pages: [UInt64: [UInt8]] = [:]
    private var count: UInt64 = 0
    public var syncCount = 0
    /// Every write in order, so tests can pin the allocation order.
    public var writeLog: [(offset: UInt64, length: Int)] = []

    public init(path: String = "memory", bytes: [UInt8] = []) {
        self.path = path
        self.bytes = bytes
    }

    /// The whole file as one array (holes read as zeros).
    public var bytes: [UInt8] {
        get {
            var out = [UInt8](repeating: 0, count: Int(count))
            out.withUnsafeMutableBytes { read(into: $0, at: 0) }
            return out
        }
        set {
            pages = [:]
            count = 0
            newValue.withUnsafeBytes { write($0, at: 0) }
            count = UInt64(newValue.count)
        }
    }

    /// An in-memory file grows to this at most (what a test or a fuzzer's input can need).
    static let maxLength: UInt64 = 1 << 32

    /// The pieces of `[offset, offset+length)` within one page each: the page, where in it,
    /// where in the range, and how long.
    private func pieces(_ offset: UInt64, _ length: Int, _ body: (_ page: UInt64, _ within: Int, _ done: Int, _ n: Int) -> Void) {
        var done = 0
        while done < length {
            let o = offset + UInt64(done)
            let within = Int(o % UInt64(Self.pageSize))
            let n = min(length - done, Self.pageSize - within)
            body(o / UInt64(Self.pageSize), within, done, n)
            done += n
        }
    }

    private func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) {
        pieces(offset, buffer.count) { page, within, done, n in
            let out = UnsafeMutableRawBufferPointer(rebasing: buffer[done..<(done + n)])
            let o = offset + UInt64(done)
            if let p = pages[page], o < count {
                let valid = Int(min(UInt64(n), count - o))
                p.withUnsafeBytes { out.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[within..<(within + valid)])) }
                if valid < n { UnsafeMutableRawBufferPointer(rebasing: out[valid...]).initializeMemory(as: UInt8.self, repeating: 0) }
            } else {
                out.initializeMemory(as: UInt8.self, repeating: 0)
            }
        }
    }

    private func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) {
        pieces(offset, buffer.count) { page, within, done, n in
            let piece = UnsafeRawBufferPointer(rebasing: buffer[done..<(done + n)])
            // All-zero pieces of pages never written stay holes.
            if pages[page] != nil || piece.contains(where: { $0 != 0 }) {
                pages[page, default: [UInt8](repeating: 0, count: Self.pageSize)].withUnsafeMutableBytes {
                    UnsafeMutableRawBufferPointer(rebasing: $0[within..<(within + n)]).copyMemory(from: piece)
                }
            }
        }
        count = max(count, offset + UInt64(buffer.count))
    }

    /// Zeros `[offset, offset+length)`, dropping the pages it covers whole.
    private func zero(from offset: UInt64, length: UInt64) {
        // Only pages written can hold bytes to zero: a range far larger than them (a
        // truncation from 4 GiB) visits those, not every page of the range.
        for page in pages.keys where page >= offset / UInt64(Self.pageSize) && page * UInt64(Self.pageSize) < offset + length {
            let start = max(offset, page * UInt64(Self.pageSize)), end = min(offset + length, (page + 1) * UInt64(Self.pageSize))
            if end - start == UInt64(Self.pageSize) { pages[page] = nil; continue }
            let within = Int(start % UInt64(Self.pageSize))
            pages[page]!.withUnsafeMutableBytes {
                UnsafeMutableRawBufferPointer(rebasing: $0[within..<(within + Int(end - start))]).initializeMemory(as: UInt8.self, repeating: 0)
            }
        }
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, atAbsoluteOffset offset: UInt64) throws(VHDError) {
        // Past the end reads zeros, whatever the offset (a crafted one may be near 2^64).
        guard offset < count else {
            buffer.initializeMemory(as: UInt8.self, repeating: 0)
            return
        }
        read(into: buffer, at: offset)
    }

    public func writeAll(_ buffer: UnsafeRawBufferPointer, toAbsoluteOffset offset: UInt64) throws(VHDError) {
        guard offset <= Self.maxLength - min(UInt64(buffer.count), Self.maxLength) else { throw .io(path: path, errno: .fileTooLarge) }
        write(buffer, at: offset)
        writeLog.append((offset, buffer.count))
    }

    public func readIfCached(into buffer: UnsafeMutableRawBufferPointer, atAbsoluteOffset offset: UInt64) throws(VHDError) -> Bool {
        try read(into: buffer, atAbsoluteOffset: offset)
        return true
    }

    public func length() throws(VHDError) -> UInt64 { count }
    public func truncate(toLength length: UInt64) throws(VHDError) {
        guard length <= Self.maxLength else { throw .io(path: path, errno: .fileTooLarge) }
        // What a later growth exposes reads as zeros.
        if length < count { zero(from: length, length: count - length) }
        count = length
    }
    public func synchronize() throws(VHDError) { syncCount += 1 }
    public func punchHole(offset: UInt64, length: UInt64) -> Bool {
        if offset < count { zero(from: offset, length: min(length, count - offset)) }
        return true
    }
    public func close() {}
}

#if os(Linux)
@_silgen_name("preadv2")
private func c_preadv2(_ fd: Int32, _ iov: UnsafePointer<iovec>, _ count: Int32, _ offset: Int, _ flags: Int32) -> Int

@_silgen_name("fallocate")
private func c_fallocate(_ fd: Int32, _ mode: Int32, _ offset: Int, _ length: Int) -> Int32
#endif

/// Runs a closure-taking API (`withUnsafeBytes`...) whose body throws `VHDError`, keeping the type.
@inline(__always)
func typed<T>(_ path: String, _ body: () throws -> T) throws(VHDError) -> T {
    do {
        return try body()
    } catch let e as VHDError {
        throw e
    } catch {
        throw .io(path: path, errno: .ioError)
    }
}
