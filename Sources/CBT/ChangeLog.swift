// Design notes: a per-VDI change log in blktap's layout.
//
//   offset 0   parent uuid (16 bytes)   the log of the snapshot before this one
//   offset 16  child uuid  (16 bytes)   the log after it (set when this log moves to a snapshot)
//   offset 32  consistent  (int32, padded to 8)   0 while attached read-write, 1 after a clean detach
//   offset 40  size        (u64)        virtual size the bitmap covers
//   offset 48  bitmap, one bit per 64 KiB block, LSB first; bits are never cleared
// Integers are little-endian, as blktap writes its struct on x86.
//
// Going beyond blktap: a write's bits are made durable *before* its data is written to the
// VHD (`markDirty` then `commit`), so the log is a superset of what changed even across
// kill -9 or power loss, and an unclean detach needs no "inconsistent" fallback. Commits
// are grouped: one write and one fdatasync cover every write whose bits are waiting, and a
// waiting write holds no thread (`commitAsync`), so a batch is as large as the queue depth.
// A write already acknowledged (its data parked in memory) commits lazily (`commitLazily`):
// it rides along with the next batch, or starts one a few milliseconds later.

import Foundation
import Locking
import SystemPackage

public enum CBTError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The log is damaged: torn header, wrong length, unreadable.
    case damaged(path: String, reason: String)
    case io(path: String, errno: Errno)

    public var description: String {
        switch self {
        case .damaged(let p, let r): return "change log \(p) is damaged: \(r)"
        case .io(let p, let e): return "change log \(p): \(e)"
        }
    }
}

public final class ChangeLog: @unchecked Sendable {
    // Unchecked: every var, and the mapped bitmap (`LogBits`), is touched with `lock` held
    // (a condition variable: commits wait on it for the batch ahead).
    public static let blockSize: UInt64 = 64 * 1024
    public static let headerSize = 48

    public let path: String
    let fd: FileDescriptor
    let lock = NSCondition()
    public private(set) var parent: UUID?
    public private(set) var child: UUID?
    public private(set) var consistent: Bool
    public private(set) var size: UInt64
    let bitmap: LogBits
    /// Bytes of `bitmap` changed in memory and not yet written.
    var dirtyBytes: Range<Int>?
    /// Set bits not yet known to be on stable storage; a write whose bits are all set and
    /// none of them pending need not wait.
    var pending = PendingBits()
    var waiters: [(CBTError?) -> Void] = []
    /// Waiters that can wait a little (their write is already acknowledged): they join the
    /// next batch anyone starts, or one started `lazyDelay` after the first of them came.
    var lazyWaiters: [(CBTError?) -> Void] = []
    var lazyTimerArmed = false
    static let lazyDelay = DispatchTimeInterval.milliseconds(5)
    /// Batches being synced. A second batch may start while the first syncs: its bytes are
    /// written after the first's (both under `lock`), so its sync covers both, and its
    /// waiters wait for about one device flush instead of the rest of one plus their own.
    var committers = 0
    static let maxCommitters = 2
    /// A sync that failed: the log can no longer promise anything, so every later commit
    /// fails too (the writes waiting on it get EIO) instead of trusting a later sync.
    var failed: CBTError?
    let committer = DispatchQueue(label: "vdinbd.cbt.commit", attributes: .concurrent)

    /// Bumped by every change to a log's parent or child links and to which logs exist
    /// (create, grow, `remove`, `rename`): whoever caches the links (a VDI's ancestry) checks it.
    public static let generation = Atomic<Int>(0)

    static func changed() { generation.add(1, ordering: .sequentiallyConsistent) }

    /// Deletes a log file (a missing one is not an error).
    public static func remove(path: String) {
        unlink(path)
        changed()
    }

    /// Renames a log file; false (errno set) if the rename failed.
    public static func rename(_ from: String, to: String) -> Bool {
        defer { changed() }
        return Foundation.rename(from, to) == 0
    }

    public static func bitmapLength(size: UInt64) -> Int { Int((size + blockSize - 1) / blockSize + 7) / 8 }

    init(path: String, fd: FileDescriptor, parent: UUID?, child: UUID?, consistent: Bool, size: UInt64, bitmap: LogBits) {
        self.path = path
        self.fd = fd
        self.parent = parent
        self.child = child
        self.consistent = consistent
        self.size = size
        self.bitmap = bitmap
    }

    deinit { try? fd.close() }

    /// Creates a new, empty log (fails if the file exists) and makes it durable.
    public static func create(path: String, size: UInt64, parent: UUID? = nil, child: UUID? = nil) throws(CBTError) -> ChangeLog {
        let fd: FileDescriptor
        do {
            fd = try FileDescriptor.open(FilePath(path), .readWrite, options: [.create, .exclusiveCreate, .closeOnExec],
                                         permissions: [.ownerReadWrite])
        } catch { throw .io(path: path, errno: (error as? Errno) ?? .ioError) }
        let header = headerBytes(parent: parent, child: child, consistent: true, size: size)
        do {
            // The zero bitmap as a hole: the file system reads it back as zeros.
            try writeAll(fd, path: path, header, at: 0)
            guard ftruncate(fd.rawValue, off_t(headerSize + bitmapLength(size: size))) == 0 else {
                throw CBTError.io(path: path, errno: Errno(rawValue: errno))
            }
            guard fdatasync(fd.rawValue) == 0 else { throw CBTError.io(path: path, errno: Errno(rawValue: errno)) }
            let bits = try mappedBits(fd, path: path, count: bitmapLength(size: size))
            changed()
            return ChangeLog(path: path, fd: fd, parent: parent, child: child, consistent: true, size: size, bitmap: bits)
        } catch let e as CBTError {
            try? fd.close()
            unlink(path)
            throw e
        } catch {
            try? fd.close()
            unlink(path)
            throw .io(path: path, errno: .ioError)
        }
    }

    /// Opens and checks a log. Any structural problem is `.damaged` with the reason.
    public static func open(path: String) throws(CBTError) -> ChangeLog {
        let fd: FileDescriptor
        do {
            fd = try FileDescriptor.open(FilePath(path), .readWrite, options: [.closeOnExec])
        } catch { throw .damaged(path: path, reason: "cannot open: \((error as? Errno) ?? .ioError)") }
        do {
            let length = try fd.seek(offset: 0, from: .end)
            guard length >= headerSize else { throw CBTError.damaged(path: path, reason: "torn header (\(length) bytes)") }
            var h = [UInt8](repeating: 0, count: headerSize)
            let hn = try h.withUnsafeMutableBytes { try fd.read(fromAbsoluteOffset: 0, into: $0) }
            guard hn == headerSize else { throw CBTError.damaged(path: path, reason: "short read") }
            let consistentRaw = h[32..<36].withUnsafeBytes { Int32(littleEndian: $0.loadUnaligned(as: Int32.self)) }
            guard consistentRaw == 0 || consistentRaw == 1 else {
                throw CBTError.damaged(path: path, reason: "consistent flag is \(consistentRaw)")
            }
            let size = try h.withUnsafeBytes { raw throws(CBTError) in try checkedSize(header: raw, fileLength: Int(length), path: path) }
            let bitmap = try mappedBits(fd, path: path, count: bitmapLength(size: size))
            return ChangeLog(path: path, fd: fd, parent: uuid(h[0..<16]), child: uuid(h[16..<32]), consistent: consistentRaw == 1,
                             size: size, bitmap: bitmap)
        } catch let e as CBTError {
            try? fd.close()
            throw e
        } catch {
            try? fd.close()
            throw .damaged(path: path, reason: "\(error)")
        }
    }

    /// Grows a closed log to cover `size` bytes: the old bits, new clear bits past them and
    /// the new size, written to a side file that is synced and renamed over the log, so a
    /// crash leaves the old log or the new one (the caller syncs the directory, as for every
    /// other rename in the SR). Never shrinks.
    public static func grow(path: String, to size: UInt64) throws(CBTError) {
        let old = try open(path: path)
        guard size > old.size else { return }
        let side = path + ".resize"
        unlink(side)
        var bytes = headerBytes(parent: old.parent, child: old.child, consistent: old.consistent, size: size) + old.bitmap.all
        bytes += [UInt8](repeating: 0, count: bitmapLength(size: size) - old.bitmap.count)
        let fd: FileDescriptor
        do {
            fd = try FileDescriptor.open(FilePath(side), .readWrite, options: [.create, .exclusiveCreate, .closeOnExec],
                                         permissions: [.ownerReadWrite])
        } catch { throw .io(path: side, errno: (error as? Errno) ?? .ioError) }
        do {
            _ = try bytes.withUnsafeBytes { try fd.writeAll(toAbsoluteOffset: 0, $0) }
            guard fdatasync(fd.rawValue) == 0 else { throw Errno(rawValue: errno) }
            try fd.close()
        } catch {
            try? fd.close()
            unlink(side)
            throw .io(path: side, errno: (error as? Errno) ?? .ioError)
        }
        guard rename(side, to: path) else {
            let e = Errno(rawValue: errno)
            unlink(side)
            throw .io(path: path, errno: e)
        }
    }

    /// A log's parent, from its header alone (48 bytes, checked against the file's length):
    /// the ancestry of a VDI with many CBT snapshots of a large disk is read without
    /// reading their bitmaps.
    public static func parent(path: String) throws(CBTError) -> UUID? {
        let fd: FileDescriptor
        do { fd = try FileDescriptor.open(FilePath(path), .readOnly, options: [.closeOnExec]) } catch {
            throw .damaged(path: path, reason: "cannot open: \((error as? Errno) ?? .ioError)")
        }
        defer { try? fd.close() }
        var h = [UInt8](repeating: 0, count: headerSize)
        let length: Int
        do {
            length = Int(try fd.seek(offset: 0, from: .end))
            guard length >= headerSize else { throw CBTError.damaged(path: path, reason: "torn header (\(length) bytes)") }
            let n = try h.withUnsafeMutableBytes { try fd.read(fromAbsoluteOffset: 0, into: $0) }
            guard n == headerSize else { throw CBTError.damaged(path: path, reason: "short read") }
            _ = try h.withUnsafeBytes { raw throws(CBTError) in try checkedSize(header: raw, fileLength: length, path: path) }
        } catch let e as CBTError {
            throw e
        } catch {
            throw .damaged(path: path, reason: "\((error as? Errno) ?? .ioError)")
        }
        return uuid(h[0..<16])
    }

    /// Reads a log's parent and ORs its bits (LSB first) into `acc`, straight from a
    /// mapping of the file: `list_changed_blocks` walks many 4 MiB logs.
    public static func accumulate(path: String, into acc: inout [UInt8]) throws(CBTError) -> UUID? {
        let fd: FileDescriptor
        do { fd = try FileDescriptor.open(FilePath(path), .readOnly, options: [.closeOnExec]) } catch {
            throw .damaged(path: path, reason: "cannot open: \((error as? Errno) ?? .ioError)")
        }
        defer { try? fd.close() }
        let length: Int
        do { length = Int(try fd.seek(offset: 0, from: .end)) } catch {
            throw .damaged(path: path, reason: "\((error as? Errno) ?? .ioError)")
        }
        guard length >= headerSize else { throw .damaged(path: path, reason: "torn header (\(length) bytes)") }
        guard let map = mmap(nil, length, PROT_READ, MAP_PRIVATE | MAP_POPULATE, fd.rawValue, 0), map != MAP_FAILED else {
            throw .damaged(path: path, reason: "cannot map: \(Errno(rawValue: errno))")
        }
        defer { munmap(map, length) }
        let raw = UnsafeRawBufferPointer(start: map, count: length)
        _ = try checkedSize(header: raw, fileLength: length, path: path)
        ChangedBlocks.or(UnsafeRawBufferPointer(rebasing: raw[headerSize...]), into: &acc)
        return uuid(ArraySlice(raw[0..<16]))
    }

    /// The size field of a log's header, checked against the file's length.
    static func checkedSize(header raw: UnsafeRawBufferPointer, fileLength: Int, path: String) throws(CBTError) -> UInt64 {
        let size = UInt64(littleEndian: raw.loadUnaligned(fromByteOffset: 40, as: UInt64.self))
        guard size > 0, size <= 1 << 44 else { throw .damaged(path: path, reason: "size \(size) out of range") }
        let expected = headerSize + bitmapLength(size: size)
        guard fileLength == expected else {
            throw .damaged(path: path, reason: "file is \(fileLength) bytes, a log of size \(size) has \(expected)")
        }
        return size
    }

    static func uuid(_ b: ArraySlice<UInt8>) -> UUID? {
        if b.allSatisfy({ $0 == 0 }) { return nil }
        let a = Array(b)
        return UUID(uuid: (a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], a[9], a[10], a[11], a[12], a[13], a[14], a[15]))
    }

    static func bytes(_ u: UUID?) -> [UInt8] {
        guard let u else { return [UInt8](repeating: 0, count: 16) }
        return withUnsafeBytes(of: u.uuid) { Array($0) }
    }

    func headerBytes() -> [UInt8] { ChangeLog.headerBytes(parent: parent, child: child, consistent: consistent, size: size) }

    static func headerBytes(parent: UUID?, child: UUID?, consistent: Bool, size: UInt64) -> [UInt8] {
        var h = bytes(parent) + bytes(child)
        h += withUnsafeBytes(of: Int32(consistent ? 1 : 0).littleEndian) { Array($0) } + [0, 0, 0, 0]
        h += withUnsafeBytes(of: size.littleEndian) { Array($0) }
        return h
    }

    static func mappedBits(_ fd: FileDescriptor, path: String, count: Int) throws(CBTError) -> LogBits {
        do { return try LogBits(fd: fd.rawValue, headerSize: headerSize, count: count) } catch {
            throw .damaged(path: path, reason: "cannot map its bitmap: \(error)")
        }
    }

    static func writeAll(_ fd: FileDescriptor, path: String, _ b: [UInt8], at offset: Int) throws(CBTError) {
        do {
            _ = try b.withUnsafeBytes { try fd.writeAll(toAbsoluteOffset: Int64(offset), $0) }
        } catch { throw .io(path: path, errno: (error as? Errno) ?? .ioError) }
    }

    func writeAll(_ b: [UInt8], at offset: Int) throws(CBTError) {
        do {
            _ = try b.withUnsafeBytes { try fd.writeAll(toAbsoluteOffset: Int64(offset), $0) }
        } catch { throw .io(path: path, errno: (error as? Errno) ?? .ioError) }
    }

    func sync() throws(CBTError) {
        if fdatasync(fd.rawValue) != 0 { throw .io(path: path, errno: Errno(rawValue: errno)) }
    }

    // MARK: tracking

    /// Sets the bits of every 64 KiB block the range touches. True if any of them is not
    /// yet durable (new here, or set by a write whose commit has not finished): the caller
    /// must then `commit()` (or `commitAsync`) before writing the data.
    public func markDirty(offset: UInt64, length: UInt64) -> Bool {
        guard length > 0 else { return false }
        let first = Int(offset / ChangeLog.blockSize)
        let last = Int((offset + length - 1) / ChangeLog.blockSize)
        lock.lock()
        defer { lock.unlock() }
        var needsCommit = false
        for bit in first...last where bit / 8 < bitmap.count {
            let i = bit / 8, mask = UInt8(1 << (bit % 8))
            if bitmap[i] & mask != 0 && !pending.contains(i, mask) { continue }
            needsCommit = true
            if bitmap[i] & mask == 0 {
                bitmap[i] |= mask
                pending.insert(i, mask)
                dirtyBytes = dirtyBytes.map { min($0.lowerBound, i)..<max($0.upperBound, i + 1) } ?? i..<(i + 1)
            }
        }
        return needsCommit
    }

    /// Makes every bit set so far durable, blocking the caller. Shares batches with
    /// `commitAsync`; with no batch running, the caller runs it.
    public func commit() throws(CBTError) {
        let done = DispatchSemaphore(value: 0)
        var result: CBTError?
        let runHere = enqueue { e in
            result = e
            done.signal()
        }
        if runHere { drain() }
        done.wait()
        if let result { throw result }
    }

    /// Told of each batch commit's sync: how many writes it covered and how long it took
    /// (for metrics; set once at start-up).
    nonisolated(unsafe) public static var onBatchSynced: (@Sendable (_ writes: Int, _ nanoseconds: UInt64) -> Void)?

    /// Calls `done` once every bit set before the call is durable, without blocking: a
    /// write waiting for its bits holds no thread. Waiters that arrive while a batch syncs
    /// form the next batch, so one write and one fdatasync cover all of them. `done` runs
    /// on the committing thread and must hand real work elsewhere.
    public func commitAsync(_ done: @escaping @Sendable (CBTError?) -> Void) {
        if enqueue(done) { committer.async { self.drain() } }
    }

    /// `commitAsync` for a caller in no hurry (a write already acknowledged, whose data
    /// waits in memory): fewer, larger batches, so fewer device flushes slow everyone else.
    public func commitLazily(_ done: @escaping @Sendable (CBTError?) -> Void) {
        lock.lock()
        lazyWaiters.append(done)
        let arm = !lazyTimerArmed
        lazyTimerArmed = true
        lock.unlock()
        guard arm else { return }
        committer.asyncAfter(deadline: .now() + ChangeLog.lazyDelay) {
            self.lock.lock()
            self.lazyTimerArmed = false
            let start = !self.lazyWaiters.isEmpty && self.claimCommitter()
            self.lock.unlock()
            if start { self.drain() }
        }
    }

    /// Adds a waiter; true if the caller must start a batch.
    func enqueue(_ w: @escaping (CBTError?) -> Void) -> Bool {
        lock.lock()
        defer { lock.unlock() }
        waiters.append(w)
        return claimCommitter()
    }

    /// With `lock` held: true (and counted) if another batch may start now.
    func claimCommitter() -> Bool {
        if committers >= ChangeLog.maxCommitters { return false }
        committers += 1
        return true
    }

    /// Runs batches until no waiter is left.
    func drain() {
        while true {
            lock.lock()
            if waiters.isEmpty && (lazyWaiters.isEmpty || lazyTimerArmed) {
                committers -= 1
                lock.unlock()
                return
            }
            // Lazy waiters ride along: their bits are set, and this sync covers them.
            let batch = waiters + lazyWaiters
            waiters = []
            lazyWaiters = []
            let range = dirtyBytes
            dirtyBytes = nil
            var failure = failed
            if failure == nil, let r = range {
                // Written under the lock, so batches reach the file in the order they were taken.
                do { try writeAll(bitmap.bytes(r), at: ChangeLog.headerSize + r.lowerBound) } catch { failure = error }
            }
            // Every pending bit is written by now (by this batch or an earlier one), so
            // this batch's sync makes all of them durable.
            let written = pending
            lock.unlock()
            if failure == nil {
                let began = DispatchTime.now().uptimeNanoseconds
                do { try sync() } catch { failure = error }
                ChangeLog.onBatchSynced?(batch.count, DispatchTime.now().uptimeNanoseconds - began)
            }
            lock.lock()
            if failure == nil {
                pending.remove(written)
            } else if let f = failure {
                failed = f
                if let r = range { dirtyBytes = dirtyBytes.map { min($0.lowerBound, r.lowerBound)..<max($0.upperBound, r.upperBound) } ?? r }
            }
            lock.unlock()
            for w in batch { w(failure) }
        }
    }

    /// The bitmap as stored (LSB first).
    public var bits: [UInt8] {
        lock.lock(); defer { lock.unlock() }
        return bitmap.all
    }

    // MARK: metadata changes (rare; each written and synced at once)

    public func setConsistent(_ c: Bool) throws(CBTError) { try updateHeader(links: false) { $0.consistent = c } }

    /// Marks the log in use (consistent 0) without waiting for the disk: an attach pays no
    /// device flush. The next batch's sync, which comes before any write whose bits are new,
    /// covers it; a write whose bits were all durable already is in the log either way.
    public func markInUse() throws(CBTError) {
        lock.lock()
        consistent = false
        let h = headerBytes()
        lock.unlock()
        try writeAll(h, at: 0)
    }
    public func setParent(_ p: UUID?) throws(CBTError) { try updateHeader(links: true) { $0.parent = p } }
    public func setChild(_ c: UUID?) throws(CBTError) { try updateHeader(links: true) { $0.child = c } }

    func updateHeader(links: Bool, _ body: (ChangeLog) -> Void) throws(CBTError) {
        lock.lock()
        body(self)
        let h = headerBytes()
        lock.unlock()
        defer { if links { ChangeLog.changed() } }
        try writeAll(h, at: 0)
        try sync()
    }

    /// ORs another log's bits into this one (merging a destroyed snapshot's log).
    public func merge(_ other: [UInt8]) throws(CBTError) {
        lock.lock()
        // New bits are pending until the sync below: a write that finds them set must still
        // wait for it.
        for i in 0..<min(bitmap.count, other.count) where other[i] & ~bitmap[i] != 0 {
            let new = other[i] & ~bitmap[i]
            bitmap[i] |= new
            pending.insert(i, new)
        }
        let all = bitmap.all
        let written = pending
        lock.unlock()
        try writeAll(all, at: ChangeLog.headerSize)
        try sync()
        lock.lock()
        pending.remove(written)
        lock.unlock()
    }
}

/// The bitmap `list_changed_blocks` returns: one bit per 64 KiB, MSB first.
public enum ChangedBlocks {
    /// ORs LSB-first log bitmaps and converts to MSB-first bytes covering `size`.
    public static func union(_ logs: [[UInt8]], size: UInt64) -> [UInt8] {
        var acc = [UInt8](repeating: 0, count: ChangeLog.bitmapLength(size: size))
        for l in logs { or(l, into: &acc) }
        return finish(acc, size: size)
    }

    /// ORs LSB-first bits into an accumulator of the same layout, a word at a time.
    public static func or(_ l: [UInt8], into acc: inout [UInt8]) {
        l.withUnsafeBytes { or($0, into: &acc) }
    }

    public static func or(_ src: UnsafeRawBufferPointer, into acc: inout [UInt8]) {
        let n = acc.count
        acc.withUnsafeMutableBytes { dst in
            let m = min(n, src.count)
            var i = 0
            if Int(bitPattern: src.baseAddress) % 8 == 0 {
                // Aligned (a mapping past the 48-byte header, an array): plain word loads
                // the compiler turns into vector ORs.
                let words = m / 8
                let d64 = dst.baseAddress!.assumingMemoryBound(to: UInt64.self)
                let s64 = src.baseAddress!.assumingMemoryBound(to: UInt64.self)
                for w in 0..<words { d64[w] |= s64[w] }
                i = words * 8
            }
            while i < m { dst[i] |= src[i]; i += 1 }
        }
    }

    /// LSB-first accumulator → the API's MSB-first bitmap, bits past the last block clear.
    public static func finish(_ lsb: [UInt8], size: UInt64) -> [UInt8] {
        var acc = lsb
        let n = acc.count
        let blocks = Int((size + ChangeLog.blockSize - 1) / ChangeLog.blockSize)
        acc.withUnsafeMutableBufferPointer { b in
            for i in 0..<n { b[i] = reversedBits[Int(b[i])] }
        }
        if blocks % 8 != 0, n > 0 { acc[n - 1] &= UInt8(0xFF << (8 - blocks % 8) & 0xFF) }
        return acc
    }

    /// The API's answer in one pass: LSB-first accumulator → MSB-first bytes (bits past the
    /// last block clear) → base64. The same bytes as `finish` then base64, at memory speed
    /// (a 2 TiB disk's bitmap is 4 MiB).
    public static func base64(_ lsb: [UInt8], size: UInt64) -> String {
        String(decoding: base64Bytes(lsb, size: size), as: UTF8.self)
    }

    /// `base64` as ASCII bytes. Two passes over the 4 MiB of a 2 TiB disk: bits reversed
    /// in place a word at a time, then each 12 bits looked up as two characters at once.
    public static func base64Bytes(_ lsb: [UInt8], size: UInt64) -> [UInt8] {
        var msb = lsb
        let n = msb.count
        guard n > 0 else { return [] }
        msb.withUnsafeMutableBytes { b in
            let words = n / 8
            let w64 = b.baseAddress!.assumingMemoryBound(to: UInt64.self)
            for w in 0..<words {
                var x = w64[w]
                x = (x & 0xF0F0_F0F0_F0F0_F0F0) >> 4 | (x & 0x0F0F_0F0F_0F0F_0F0F) << 4
                x = (x & 0xCCCC_CCCC_CCCC_CCCC) >> 2 | (x & 0x3333_3333_3333_3333) << 2
                x = (x & 0xAAAA_AAAA_AAAA_AAAA) >> 1 | (x & 0x5555_5555_5555_5555) << 1
                w64[w] = x
            }
            for i in (words * 8)..<n { b[i] = reversedBits[Int(b[i])] }
        }
        let blocks = Int((size + ChangeLog.blockSize - 1) / ChangeLog.blockSize)
        if blocks % 8 != 0 { msb[n - 1] &= UInt8(0xFF << (8 - blocks % 8) & 0xFF) }
        let groups = n / 3, rest = n % 3
        let outLength = (groups + (rest > 0 ? 1 : 0)) * 4
        return [UInt8](unsafeUninitializedCapacity: outLength) { out, count in
            msb.withUnsafeBufferPointer { srcBuf in
                base64Pairs.withUnsafeBufferPointer { pairBuf in
                    let src = srcBuf.baseAddress!, pairs = pairBuf.baseAddress!
                    let o16 = UnsafeMutableRawPointer(out.baseAddress!)
                    var i = 0, j = 0
                    for _ in 0..<groups {
                        let v = Int(src[i]) << 16 | Int(src[i + 1]) << 8 | Int(src[i + 2])
                        o16.storeBytes(of: pairs[v >> 12], toByteOffset: j, as: UInt16.self)
                        o16.storeBytes(of: pairs[v & 0xFFF], toByteOffset: j + 2, as: UInt16.self)
                        i += 3
                        j += 4
                    }
                    if rest > 0 {
                        let v = Int(src[i]) << 16 | (rest == 2 ? Int(src[i + 1]) << 8 : 0)
                        o16.storeBytes(of: pairs[v >> 12], toByteOffset: j, as: UInt16.self)
                        o16.storeBytes(of: pairs[v & 0xFFF], toByteOffset: j + 2, as: UInt16.self)
                        out[j + 3] = UInt8(ascii: "=")
                        if rest == 1 { out[j + 2] = UInt8(ascii: "=") }
                    }
                }
            }
            count = outLength
        }
    }

    /// Every 12-bit value as its two base64 characters, in memory order.
    static let base64Pairs: [UInt16] = (0..<4096).map { v in
        UInt16(base64Alphabet[v >> 6]) | UInt16(base64Alphabet[v & 63]) << 8
    }

    static let base64Alphabet: [UInt8] = Array("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/".utf8)

    static let reversedBits: [UInt8] = (0..<256).map { v in
        var b = UInt8(v), r: UInt8 = 0
        for _ in 0..<8 { r = (r << 1) | (b & 1); b >>= 1 }
        return r
    }

    /// MSB-first bitmap → byte ranges of changed blocks, clamped to `size`.
    public static func ranges(_ msb: [UInt8], size: UInt64) -> [(offset: UInt64, length: UInt64)] {
        var out: [(UInt64, UInt64)] = []
        // A bitmap shorter than `size` says (a server's answer, say) ends the ranges early:
        // never an index past it.
        let blocks = min(Int((min(size, UInt64(Int.max) / 2) + ChangeLog.blockSize - 1) / ChangeLog.blockSize), msb.count * 8)
        var i = 0
        while i < blocks {
            guard msb[i / 8] & (0x80 >> UInt8(i % 8)) != 0 else { i += 1; continue }
            let start = i
            while i < blocks, msb[i / 8] & (0x80 >> UInt8(i % 8)) != 0 { i += 1 }
            let off = UInt64(start) * ChangeLog.blockSize
            out.append((off, min(UInt64(i) * ChangeLog.blockSize, size) - off))
        }
        return out
    }
}
