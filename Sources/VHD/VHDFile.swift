// Design notes: one opened VHD file.
//
// The BAT and the per-block sector bitmaps live in memory once read; the file is the
// truth and is written in an order that a crash can interrupt at any point:
//   1. the new trailing footer past the end of the new block (the file is still valid:
//      the old data is untouched and the BAT does not yet point at the new block);
//   2. the block's sector bitmap and data;
//   3. a write barrier (fdatasync) so 1–2 are durable before anything points at them;
//   4. the one BAT sector holding the new entry.
// A crash before 4 leaks the space of one block and exposes nothing.
// Writes into a block that is present but whose bitmap is partial (files written by
// other tools) write the data first and the bitmap after.

import Foundation

/// Where a block of this file keeps its data, as far as this one file knows.
public enum BlockState: Sendable {
    /// No data in this file: the reader falls through to the parent (or zero).
    case absent
    /// Every sector of the block is present at this absolute data offset.
    case full(dataOffset: UInt64)
    /// Only the sectors whose bitmap bit is set are present.
    case partial(dataOffset: UInt64, bitmap: SectorBitmap)
}

public final class VHDFile: @unchecked Sendable {
    // Unchecked: the footer, header, BAT and bitmaps change under `lock` (allocation and
    // bitmap updates) and are looked up under it; the lets and the mapped BAT never change.
    public let path: String
    public let file: RandomAccessFile
    public let writable: Bool
    public internal(set) var footer: Footer
    public internal(set) var header: DynamicDiskHeader?
    /// Problems tolerated at open (checksum mismatches under `.tolerate`, a damaged trailing footer).
    public private(set) var warnings: [String] = []

    var bat: BlockAllocationTable
    /// A read-only file's BAT is not copied at open: entries are decoded from the file's
    /// mapped page cache as blocks are looked up (a 2040 GiB disk's table is 4 MiB a layer,
    /// and a 30-deep chain opened on every first GO read all of them). Nil: `bat` holds it.
    var batMap: UnsafeRawBufferPointer?
    private var batMapCount = 0
    /// The file's length at open (lazily checked BAT entries must lie inside it).
    private var openedLength: UInt64 = 0
    /// Every entry was checked at open (a writable file's are: allocation needs them all).
    private var batChecked = false
    /// Bitmaps of the partial blocks (`bitmapKinds` 2), by block index. Sparse: a full array
    /// of optionals cost 17 bytes a block whether read or not (24 MiB for each layer of a
    /// 2040 GiB disk, filled at every open).
    var bitmaps: [Int: SectorBitmap] = [:]
    /// 0 unknown, 1 full, 2 partial.
    var bitmapKinds: ZeroedBytes
    /// Where the next block goes: the end of all data, where the trailing footer sits.
    var nextFreeOffset: UInt64
    /// Serialises allocation and bitmap updates.
    let lock = NSCondition()
    /// When true, allocation waits for data to be durable before the BAT points at it.
    public var barrierOnAllocate = true

    public var diskType: DiskType { footer.diskType }
    public var virtualSize: UInt64 { footer.currentSize }
    /// The block size used to address this file (2 MiB for fixed disks).
    public var blockSize: UInt32 { header?.blockSize ?? DynamicDiskHeader.defaultBlockSize }
    public var uniqueID: UUID { UUID(uuid: uuidTuple(footer.uniqueID)) }

    public static func open(path: String, writable: Bool, policy: ChecksumPolicy = .strict) throws(VHDError) -> VHDFile {
        let f = try PosixFile(path: path, writable: writable)
        do {
            return try VHDFile(file: f, writable: writable, policy: policy)
        } catch {
            f.close()
            throw error
        }
    }

    public init(file: RandomAccessFile, writable: Bool, policy: ChecksumPolicy = .strict) throws(VHDError) {
        self.path = file.path
        self.file = file
        self.writable = writable
        let length = try file.length()
        guard length >= UInt64(Footer.size) else { throw .truncated(needed: UInt64(Footer.size), fileLength: length) }
        var warnings: [String] = []
        var footer: Footer
        let tail = try file.read(at: length - 512, count: 512)
        do {
            footer = try Footer.parse(tail, policy: policy)
        } catch {
            // blktap keeps a copy of the footer at offset 0 for exactly this case.
            guard let copy = try? Footer.parse(try file.read(at: 0, count: 512), policy: policy), copy.diskType != .fixed
            else { throw error }
            footer = copy
            warnings.append("trailing footer unreadable (\(error)); using the copy at offset 0")
        }
        if let m = footer.checksumMismatch {
            warnings.append("footer checksum mismatch: stored 0x\(String(m.stored, radix: 16)), computed 0x\(String(m.computed, radix: 16))")
        }
        self.footer = footer
        switch footer.diskType {
        case .fixed:
            guard length >= footer.currentSize + 512 else {
                throw .truncated(needed: footer.currentSize + 512, fileLength: length)
            }
            header = nil
            bat = BlockAllocationTable(count: 0)
            nextFreeOffset = footer.currentSize
        case .dynamic, .differencing:
            let ho = footer.dataOffset
            guard ho >= 512, ho % 512 == 0, ho < length, ho + 1024 <= length else {
                throw .invalidField(structure: "footer", field: "dataOffset", value: ho, reason: "header not inside the file")
            }
            let h = try DynamicDiskHeader.parse(try file.read(at: ho, count: 1024), policy: policy)
            if let m = h.checksumMismatch {
                warnings.append("dynamic disk header checksum mismatch: stored 0x\(String(m.stored, radix: 16)), computed 0x\(String(m.computed, radix: 16))")
            }
            let needed = (footer.currentSize + UInt64(h.blockSize) - 1) / UInt64(h.blockSize)
            guard UInt64(h.maxTableEntries) >= needed, h.maxTableEntries <= 1 << 24 else {
                throw .invalidField(structure: "dynamic disk header", field: "maxTableEntries", value: UInt64(h.maxTableEntries),
                                    reason: "does not match current size \(footer.currentSize) (needs \(needed))")
            }
            let batBytes = UInt64(h.maxTableEntries) * 4
            // Checked without adding first: a crafted offset near 2^64 must not trap.
            guard h.tableOffset >= 512, h.tableOffset <= length, batBytes <= length - h.tableOffset else {
                throw .invalidField(structure: "dynamic disk header", field: "tableOffset", value: h.tableOffset,
                                    reason: "BAT of \(batBytes) bytes does not fit in the file of \(length) bytes")
            }
            var end = max(ho + 1024, h.tableOffset + UInt64(BlockAllocationTable.byteLength(entries: Int(h.maxTableEntries))))
            let span = UInt64(h.bitmapBytes) + UInt64(h.blockSize)
            let checkEntry = { (i: Int, e: UInt32) throws(VHDError) -> UInt64 in
                let start = UInt64(e) * 512
                guard start >= 512, start + span <= length else {
                    throw .invalidField(structure: "BAT", field: "entry[\(i)]", value: UInt64(e),
                                        reason: "block at byte \(start) + \(span) lies past the end of the file (\(length))")
                }
                return start + span
            }
            if let m = file.mapped(offset: h.tableOffset, count: Int(batBytes), populate: writable) {
                // The table is read from the file's mapped page cache, never copied: a
                // 2040 GiB disk's is 4 MiB a layer, and every first GO opened 30 of them.
                batMap = m
                batMapCount = Int(h.maxTableEntries)
                bat = BlockAllocationTable(count: 0)
                if writable {
                    // Where the next block goes needs every entry: a word-at-a-time pass
                    // that skips unallocated pairs, checking what it finds as a read would.
                    var seen = Set<UInt32>()
                    try BlockAllocationTable.forEachAllocated(m, count: batMapCount) { (i, e) throws(VHDError) in
                        end = max(end, try checkEntry(i, e))
                        guard seen.insert(e).inserted else {
                            throw .invalidField(structure: "BAT", field: "entry[\(i)]", value: UInt64(e), reason: "two blocks share one offset")
                        }
                    }
                    batChecked = true
                } else {
                    // Read-only: entries are checked as they are used (nothing is allocated
                    // here, so where the next block would go does not matter).
                    end = max(end, length - 512)
                }
            } else {
                // Read without first zeroing the buffer.
                var raw = [UInt8](unsafeUninitializedCapacity: Int(batBytes)) { _, n in n = Int(batBytes) }
                try typed(file.path) { try raw.withUnsafeMutableBytes { b in try file.read(into: b, atAbsoluteOffset: h.tableOffset) } }
                let table = try BlockAllocationTable.parse(raw, count: Int(h.maxTableEntries))
                var seen = Set<UInt32>()
                for (i, e) in table.entries.enumerated() where e != BlockAllocationTable.unallocated {
                    end = max(end, try checkEntry(i, e))
                    guard seen.insert(e).inserted else {
                        throw .invalidField(structure: "BAT", field: "entry[\(i)]", value: UInt64(e), reason: "two blocks share one offset")
                    }
                }
                bat = table
                batChecked = true
            }
            for (i, l) in h.parentLocatorEntries.enumerated() where l.platformCode != .none && l.platformDataOffset > 0 {
                let space = l.platformDataSpace < 512 ? UInt64(l.platformDataSpace) * 512 : UInt64(l.platformDataSpace)
                let (stop, over) = l.platformDataOffset.addingReportingOverflow(max(space, UInt64(l.platformDataLength)))
                guard !over, stop <= length else {
                    // Not where anything else is placed, and unreadable: reported, never trusted.
                    warnings.append("parent locator \(i) at byte \(l.platformDataOffset) lies past the end of the file (\(length))")
                    continue
                }
                end = max(end, stop)
            }
            if footer.diskType == .dynamic, h.parentLocatorEntries.contains(where: { $0.platformCode != .none }) {
                warnings.append("dynamic disk carries parent locators")
            }
            header = h
            openedLength = length
            nextFreeOffset = (end + 511) / 512 * 512
            staleLimit = length >= 512 ? length - 512 : 0
        }
        bitmapKinds = ZeroedBytes(count: batMap != nil ? batMapCount : bat.entries.count)
        self.warnings = warnings
    }

    /// Entries in the BAT.
    var batCount: Int { batMap != nil ? batMapCount : bat.entries.count }

    /// One BAT entry (lock held where the table can change).
    @inline(__always) func batEntry(_ i: Int) -> UInt32 {
        if let m = batMap { return UInt32(bigEndian: m.loadUnaligned(fromByteOffset: i * 4, as: UInt32.self)) }
        return bat.entries[i]
    }

    /// The whole table (decoded from the mapping if it was not read at open).
    var fullTable: BlockAllocationTable {
        guard batMap != nil else { return bat }
        var t = BlockAllocationTable(count: batMapCount)
        for i in 0..<batMapCount { t.entries[i] = batEntry(i) }
        return t
    }

    public func close() { file.close() }

    /// Allocated blocks of this file (0 for fixed disks).
    public var allocatedBlockCount: Int {
        lock.lock(); defer { lock.unlock() }
        return fullTable.entries.reduce(0) { $0 + ($1 == BlockAllocationTable.unallocated ? 0 : 1) }
    }

    /// The BAT entries (sector offsets), for checks and tools.
    public var blockAllocationTable: BlockAllocationTable {
        lock.lock(); defer { lock.unlock() }
        return fullTable
    }

    /// What this file holds for `blockIndex`. For fixed disks every block inside the size is full.
    /// With `cachedOnly`, a bitmap not yet in memory is `.wouldBlock` rather than read.
    public func blockState(_ blockIndex: Int, cachedOnly: Bool = false) throws(VHDError) -> BlockState {
        // A fixed disk has no mutable metadata: no lock needed.
        if header == nil { return try blockStateLocked(blockIndex) }
        lock.lock()
        defer { lock.unlock() }
        return try blockStateLocked(blockIndex, cachedOnly: cachedOnly)
    }

    /// `blockState` for callers that hold the lock.
    func blockStateLocked(_ blockIndex: Int, cachedOnly: Bool = false) throws(VHDError) -> BlockState {
        guard let h = header else {
            let off = UInt64(blockIndex) * UInt64(blockSize)
            return off < footer.currentSize ? .full(dataOffset: off) : .absent
        }
        guard blockIndex < batCount, !allocating.contains(blockIndex) else { return .absent }
        let e = batEntry(blockIndex)
        if e == BlockAllocationTable.unallocated { return .absent }
        let start = UInt64(e) * 512
        if !batChecked {
            let span = UInt64(h.bitmapBytes) + UInt64(h.blockSize)
            if start >= 512, start + span > openedLength, let now = try? file.length(), now > openedLength {
                // Another opening of the file (a merge writing into this layer) allocated
                // the block after this one opened: its data and footer were written before
                // the entry, so the file has grown past it.
                openedLength = now
            }
            guard start >= 512, start + span <= openedLength else {
                throw .invalidField(structure: "BAT", field: "entry[\(blockIndex)]", value: UInt64(e),
                                    reason: "block at byte \(start) + \(span) lies past the end of the file (\(openedLength))")
            }
        }
        let data = start + UInt64(h.bitmapBytes)
        switch bitmapKinds[blockIndex] {
        case 1: return .full(dataOffset: data)
        case 2:
            guard let bm = bitmaps[blockIndex] else { preconditionFailure("block \(blockIndex) is partial without a bitmap") }
            return .partial(dataOffset: data, bitmap: bm)
        default:
            if cachedOnly { throw .wouldBlock }
            let bm = SectorBitmap(bytes: try file.read(at: start, count: h.bitmapBytes), sectors: Int(h.blockSize) / 512)
            if bm.isFull {
                bitmapKinds[blockIndex] = 1
                return .full(dataOffset: data)
            }
            bitmapKinds[blockIndex] = 2
            bitmaps[blockIndex] = bm
            return .partial(dataOffset: data, bitmap: bm)
        }
    }

    /// Runs `body` with the metadata lock held.
    func withAllocationLock<T>(_ body: () throws(VHDError) -> T) throws(VHDError) -> T {
        lock.lock()
        defer { lock.unlock() }
        return try body()
    }

    // MARK: allocation
    //
    // Allocation runs in three steps so the lock is never held across data I/O or a sync:
    // `reserve` (under the lock: claim space, write the new trailing footer), the caller's
    // data writes plus `barrier` (no lock; one fdatasync covers every allocation waiting
    // for it), and `commit` (under the lock: the BAT sector). Readers see a block being
    // allocated as absent and read below it; writers to it wait for the commit.

    public enum Reservation {
        /// The block is (now) allocated: write into it normally.
        case allocated
        /// Space is reserved for the block at this data offset; the caller fills it.
        case reserved(dataOffset: UInt64, zeroStale: Range<UInt64>?)
    }

    var allocating = Set<Int>()
    var syncRequested = 0
    var syncCompleted = 0
    var syncing = false
    /// Bytes past the computed end of data that were in the file at open (a block leaked by
    /// a crash): a new block placed there must not show them.
    var staleLimit: UInt64 = 0

    func reserve(blockIndex: Int) throws(VHDError) -> Reservation {
        guard writable else { throw .readOnly(path: path) }
        guard let h = header else { preconditionFailure("allocate on a fixed disk") }
        lock.lock()
        defer { lock.unlock() }
        while allocating.contains(blockIndex) { lock.wait() }
        if case .absent = try blockStateLocked(blockIndex) {} else { return .allocated }
        let start = nextFreeOffset
        let dataOffset = start + UInt64(h.bitmapBytes)
        let newEnd = dataOffset + UInt64(h.blockSize)
        // The trailing footer at the new end first: the file stays valid whatever follows.
        try file.write(footer.serialize(), at: newEnd)
        nextFreeOffset = newEnd
        allocating.insert(blockIndex)
        let stale: Range<UInt64>? = staleLimit > dataOffset ? dataOffset..<min(staleLimit, newEnd) : nil
        return .reserved(dataOffset: dataOffset, zeroStale: stale)
    }

    /// Writes the block's (full) sector bitmap; the caller has written or will write the data.
    func writeFullBitmap(dataOffset: UInt64) throws(VHDError) {
        guard let h = header else { return }
        let bm = SectorBitmap.full(sectors: Int(h.blockSize) / 512, paddedBytes: h.bitmapBytes)
        try file.write(bm.bytes, at: dataOffset - UInt64(h.bitmapBytes))
    }

    /// Makes everything written before the call durable; concurrent callers share one sync.
    func barrier() throws(VHDError) {
        guard barrierOnAllocate else { return }
        lock.lock()
        defer { lock.unlock() }
        syncRequested += 1
        let ticket = syncRequested
        while syncCompleted < ticket {
            if syncing {
                lock.wait()
                continue
            }
            syncing = true
            let target = syncRequested
            lock.unlock()
            var failure: VHDError?
            do { try file.synchronize() } catch { failure = error }
            lock.lock()
            syncing = false
            if failure == nil { syncCompleted = max(syncCompleted, target) }
            lock.broadcast()
            if let f = failure { throw f }
        }
    }

    /// Points the BAT at the reserved block.
    func commit(blockIndex: Int, dataOffset: UInt64) throws(VHDError) {
        guard let h = header else { return }
        lock.lock()
        defer {
            allocating.remove(blockIndex)
            lock.broadcast()
            lock.unlock()
        }
        let entry = UInt32((dataOffset - UInt64(h.bitmapBytes)) / 512)
        let sector = blockIndex * 4 / 512
        if let m = batMap {
            // The mapping shows the file's page cache: once the sector is written, the
            // lookups read the new entry from it.
            var bytes = [UInt8](repeating: 0xFF, count: 512)
            let from = sector * 512, n = min(512, m.count - from)
            bytes.withUnsafeMutableBytes { b in b.copyMemory(from: UnsafeRawBufferPointer(rebasing: m[from..<(from + n)])) }
            withUnsafeBytes(of: entry.bigEndian) { e in for k in 0..<4 { bytes[blockIndex * 4 - from + k] = e[k] } }
            try file.write(bytes, at: h.tableOffset + UInt64(sector) * 512)
        } else {
            bat.entries[blockIndex] = entry
            let (_, bytes) = bat.sectorContaining(blockIndex: blockIndex)
            do {
                try file.write(bytes, at: h.tableOffset + UInt64(sector) * 512)
            } catch {
                bat.entries[blockIndex] = BlockAllocationTable.unallocated
                throw error
            }
        }
        bitmapKinds[blockIndex] = 1
        bitmaps[blockIndex] = nil
    }

    /// Gives up a reservation after a failed data write (the space stays leaked).
    func abandon(blockIndex: Int) {
        lock.lock()
        allocating.remove(blockIndex)
        lock.broadcast()
        lock.unlock()
    }

    /// Marks sectors present in a partial block after their data was written (lock held by caller).
    func setBitsLocked(blockIndex: Int, sectors: Range<Int>) throws(VHDError) {
        guard var bm = bitmaps[blockIndex] else { return }
        bm.set(sectors)
        let start = UInt64(batEntry(blockIndex)) * 512
        try file.write(bm.bytes, at: start)
        if bm.isFull {
            bitmapKinds[blockIndex] = 1
            bitmaps[blockIndex] = nil
        } else {
            bitmaps[blockIndex] = bm
        }
    }

    /// Rewrites both footer copies (after a resize, say).
    public func rewriteFooter(_ f: Footer) throws(VHDError) {
        guard writable else { throw .readOnly(path: path) }
        lock.lock(); defer { lock.unlock() }
        footer = f
        try file.write(f.serialize(), at: nextFreeOffset)
        if f.diskType != .fixed { try file.write(f.serialize(), at: 0) }
    }

    public func synchronize() throws(VHDError) { try file.synchronize() }

    /// Reads this file's parent locators' data as paths, in the order they should be tried.
    public func parentLocatorPaths() -> [(ParentLocatorEntry.PlatformCode, String)] {
        var out: [(ParentLocatorEntry.PlatformCode, String)] = []
        forEachParentLocatorPath { out.append(($0, $1)); return false }
        return out
    }

    /// Calls `body` with each parent locator's path, in the order they should be tried,
    /// until it returns true (a chain's opener stops at the first that names a file).
    public func forEachParentLocatorPath(_ body: (ParentLocatorEntry.PlatformCode, String) -> Bool) {
        guard let h = header, footer.diskType == .differencing else { return }
        let order: [ParentLocatorEntry.PlatformCode] = [.macX, .w2ru, .w2ku]
        for code in order {
            for l in h.parentLocatorEntries where l.platformCode == code {
                guard l.platformDataLength > 0, l.platformDataLength <= 4096,
                      let data = try? file.read(at: l.platformDataOffset, count: Int(l.platformDataLength)),
                      let p = l.decodePath(data) else { continue }
                if body(code, p) { return }
            }
        }
    }
}

func uuidTuple(_ b: [UInt8]) -> uuid_t {
    let x = padded(b, 16)
    return (x[0], x[1], x[2], x[3], x[4], x[5], x[6], x[7], x[8], x[9], x[10], x[11], x[12], x[13], x[14], x[15])
}

public func uuidBytes(_ u: UUID) -> [UInt8] {
    withUnsafeBytes(of: u.uuid) { Array($0) }
}

/// Per-block bytes that start as zero, in an anonymous mapping made at the first write:
/// fresh pages the kernel zeroes only when first touched, so opening a 2040 GiB layer (a
/// million blocks) costs nothing for the blocks never looked up, and a layer never read
/// costs no mapping at all. (`Array(repeating:)` wrote every byte: 30 MiB of memset for
/// each first GO of a 30-deep chain; calloc does too, for sizes below the mmap threshold
/// vdinbd raises.) Callers serialise access (the file's lock).
struct ZeroedBytes {
    final class Storage {
        let count: Int
        private(set) var base: UnsafeMutablePointer<UInt8>?
        private var mapped = false
        init(count: Int) { self.count = count }

        func allocate() -> UnsafeMutablePointer<UInt8> {
            if let base { return base }
            let p: UnsafeMutablePointer<UInt8>
            if count >= 65536, let m = mmap(nil, count, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0), m != MAP_FAILED {
                p = m.assumingMemoryBound(to: UInt8.self)
                mapped = true
            } else {
                p = calloc(max(count, 1), 1)!.assumingMemoryBound(to: UInt8.self)
            }
            base = p
            return p
        }

        deinit {
            guard let base else { return }
            if mapped { munmap(base, count) } else { free(base) }
        }
    }
    private(set) var storage: Storage

    init(count: Int) { storage = Storage(count: count) }

    var count: Int { storage.count }

    subscript(i: Int) -> UInt8 {
        get { storage.base?[i] ?? 0 }
        nonmutating set { storage.allocate()[i] = newValue }
    }

    /// A longer table with the same first bytes.
    mutating func grow(to n: Int) {
        guard n > storage.count else { return }
        let s = Storage(count: n)
        if let old = storage.base { s.allocate().update(from: old, count: storage.count) }
        storage = s
    }
}
