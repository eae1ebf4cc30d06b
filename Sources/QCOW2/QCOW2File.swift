// One qcow2 file of a chain: its header, its L1 table, and a cache of its L2 tables and
// refcount blocks. Lookups are here; allocation, refcounts and the sync that publishes
// new mappings are in QCOW2File-Alloc.swift; the refcount scan in QCOW2Check.swift.
//
// Crash order (writes): a new cluster's refcount is written first, then its data; the L2
// and L1 entries that point at new clusters are changed in memory at once (readers see
// them) but written to the file only by `sync`: fdatasync (refcounts and data durable),
// the dirty tables, fdatasync. Old clusters are freed only after that. A crash therefore
// loses unsynced allocations whole (their clusters leak, nothing points at data that is
// not there) and never leaves an entry pointing at a cluster with refcount 0. The header's
// dirty bit is set while the file is open for writing, so the next writable open scans
// and frees leaked clusters.

import Foundation
import Image
import Locking

/// Where one cluster's bytes are, as its L2 entry says.
enum Mapping: Equatable {
    /// Not in this file: read the backing file.
    case unallocated
    /// Reads as zeros (zero flag); `host` is a cluster kept for it, if any.
    case zero(host: UInt64?)
    /// At `host` in this file; `copied` (refcount exactly 1) means it may be written in place.
    case data(host: UInt64, copied: Bool)
    /// Deflated at `host`, `bytes` long (its sectors).
    case compressed(host: UInt64, bytes: Int)
}

public final class QCOW2File: MappableFile, @unchecked Sendable {
    // Unchecked: the lets never change after init; everything that does is in `state`
    // (a Mutex), and `allocating` with `filling` (Locks.swift) order allocating writes and syncs.
    public let path: String
    let file: HostFile
    public let writable: Bool
    let header: QCOW2Header
    let clusterBits: UInt64
    let clusterSize: UInt64
    /// Refcount entries per refcount block.
    let refsPerBlock: UInt64
    let headerWasDirty: Bool
    var size: UInt64 { state.withLock { $0.size } }

    struct State {
        var size: UInt64
        var l1: [UInt64]
        var l1Offset: UInt64
        var l2: [Int: [UInt64]] = [:]
        var dirtyL2: Set<Int> = []
        var dirtyL1: Set<Int> = []
        var refTable: [UInt64]
        var refBlocks: [Int: [UInt8]] = [:]
        /// Refcount entries changed in memory and not yet written, by block: they go out
        /// before the next sync (ahead of any mapping that needs them).
        var dirtyRefs: [Int: Range<Int>] = [:]
        /// The next cluster of the file that has never been used.
        var nextCluster: UInt64
        /// Clusters whose refcount drops once the entries that stopped pointing at them are durable.
        var pendingFrees: [UInt64] = []
        var allocatedSinceSync = 0
        var closed = false
    }
    let state: Mutex<State>
    /// Shared by allocating writes, alone for syncs, zeroing, growth, repair and close.
    let allocating = ReadersWriterLock()
    /// The clusters allocating writes are filling now.
    let filling = ClusterLocks()
    /// The last compressed cluster inflated (sequential reads inflate each once).
    let inflated = Mutex<(host: UInt64, bytes: [UInt8])?>(nil)
    /// What the scan of a file left dirty found and mended at open (nil: it was clean).
    public let repairReport = Mutex<QCOW2CheckReport?>(nil)

    /// L2 tables kept in memory per file (64 KiB each with 64 KiB clusters: 32 MiB,
    /// mapping 256 GiB); refcount blocks likewise. Dirty L2 tables stay until synced.
    static let cachedTables = 512
    /// A writing file syncs its new mappings after this many allocated clusters, or once
    /// this many L2 tables are dirty, so a crash loses a bounded amount of unflushed data.
    static let syncAfterClusters = 8192
    static let syncAfterDirtyTables = 64

    static let offsetMask: UInt64 = 0x00ff_ffff_ffff_fe00
    static let copiedBit: UInt64 = 1 << 63
    static let compressedBit: UInt64 = 1 << 62

    public static func open(path: String, writable: Bool) throws(QCOW2Error) -> QCOW2File {
        let f = try HostFile(path: path, writable: writable)
        do {
            return try QCOW2File(file: f, writable: writable)
        } catch {
            f.close()
            throw error
        }
    }

    /// The files open for writing in this process, by device and inode. A writer keeps
    /// new mappings in memory until it syncs, so a second writer (which would allocate
    /// the clusters the first holds) is refused, and a reader opened meanwhile first has
    /// the writer sync: a view opened in this process sees every write made before it,
    /// whoever opens it (an export, a copy, a merge's source).
    static let writers = Mutex<[FileKey: Writer]>([:])
    struct FileKey: Hashable { let dev: UInt64, ino: UInt64 }
    /// A writer's entry: claimed at the start of its open, pointing at it once open.
    final class Writer: @unchecked Sendable {
        // Unchecked: set once, under `writers`' lock, and read under it.
        weak var file: QCOW2File?
    }
    /// This file's entry in `writers` (writable files only).
    let writerKey: FileKey?

    init(file: HostFile, writable: Bool) throws(QCOW2Error) {
        self.file = file
        self.path = file.path
        self.writable = writable
        let identity = try file.identity
        let slot = Writer()
        let writer = try Self.writers.withLock { (w) throws(QCOW2Error) -> QCOW2File? in
            guard writable else { return w[identity]?.file }
            if w[identity] != nil { throw .alreadyOpenForWriting(path: file.path) }
            w[identity] = slot
            return nil
        }
        // Outside the registry's lock: the writer's sync takes its own.
        try writer?.flush()
        let key: FileKey? = writable ? identity : nil
        writerKey = key
        var opened = false
        defer { if !opened, let key { _ = Self.writers.withLock { $0.removeValue(forKey: key) } } }
        let length = try file.length
        let first = try file.read(count: 4096, at: 0)
        guard first.count >= 24, be32(first, 0) == QCOW2Header.magic else { throw .badMagic(path: path) }
        let bits = be32(first, 20)
        guard (9...21).contains(bits) else {
            throw .invalidField(path: path, field: "cluster_bits", value: UInt64(bits), reason: "clusters are 512 B to 2 MiB")
        }
        let cluster0 = bits <= 12 ? first : try file.read(count: 1 << Int(bits), at: 0)
        var h = try QCOW2Header.parse(cluster0, path: path, fileLength: length)
        try h.checkSupported(path: path, writable: writable)
        header = h
        clusterBits = UInt64(h.clusterBits)
        clusterSize = h.clusterSize
        refsPerBlock = (clusterSize * 8) >> UInt64(h.refcountOrder)
        headerWasDirty = h.incompatibleFeatures & QCOW2Header.Incompatible.dirty != 0

        let l1Bytes = try file.read(count: Int(h.l1Size) * 8, at: h.l1TableOffset)
        let l1 = be64Table(l1Bytes, count: Int(h.l1Size))
        let rtBytes = try file.read(count: Int(UInt64(h.refcountTableClusters) * clusterSize), at: h.refcountTableOffset)
        let rt = be64Table(rtBytes, count: rtBytes.count / 8)
        for (i, e) in l1.enumerated() where e & Self.offsetMask != 0 && e & Self.offsetMask % clusterSize != 0 {
            throw .invalidField(path: path, field: "L1[\(i)]", value: e, reason: "an L2 table not aligned to a cluster")
        }
        for (i, e) in rt.enumerated() where e != 0 && e % clusterSize != 0 {
            throw .invalidField(path: path, field: "refcount_table[\(i)]", value: e, reason: "a refcount block not aligned to a cluster")
        }
        state = Mutex(State(size: h.size, l1: l1, l1Offset: h.l1TableOffset, refTable: rt, nextCluster: (length + clusterSize - 1) / clusterSize))
        if writable {
            // Set before any change; cleared by a clean close.
            h.incompatibleFeatures |= QCOW2Header.Incompatible.dirty
            // Autoclear bits name extensions a writer that does not keep them must drop.
            h.autoclearFeatures = 0
            try writeFeatureFields(h)
            if headerWasDirty { try repair() }
            Self.writers.withLock { _ in slot.file = self }
        }
        opened = true
    }

    deinit {
        // A closed file gave its entry back at close (someone may hold the key since).
        if let k = writerKey, !state.withLock({ $0.closed }) { _ = Self.writers.withLock { $0.removeValue(forKey: k) } }
        file.close()
    }

    /// Writes the header's three feature words (one sector) and syncs.
    func writeFeatureFields(_ h: QCOW2Header) throws(QCOW2Error) {
        var b = [UInt8](repeating: 0, count: 24)
        put64(&b, 0, h.incompatibleFeatures)
        put64(&b, 8, h.compatibleFeatures)
        put64(&b, 16, h.autoclearFeatures)
        try file.write(b, at: 72)
        try file.sync()
    }

    // MARK: lookups

    func decode(_ e: UInt64) throws(QCOW2Error) -> Mapping {
        if e & Self.compressedBit != 0 {
            let x = 62 - (clusterBits - 8)
            let host = e & ((1 << x) - 1)
            let sectors = (e >> x) & ((1 << (62 - x)) - 1)
            let bytes = (sectors + 1) * 512 - (host & 511)
            return .compressed(host: host, bytes: Int(bytes))
        }
        let host = e & Self.offsetMask
        guard host % clusterSize == 0 else {
            throw .invalidField(path: path, field: "L2 entry", value: e, reason: "a data cluster not aligned to a cluster")
        }
        if e & 1 != 0, header.version >= 3 { return .zero(host: host == 0 ? nil : host) }
        if host == 0 { return .unallocated }
        return .data(host: host, copied: e & Self.copiedBit != 0)
    }

    /// The mappings of clusters `[first, end)` as runs (one lock for the lot): an L1
    /// entry with no table is one run whatever its span, so a whole disk costs its tables.
    func mappingRuns(first: UInt64, end: UInt64) throws(QCOW2Error) -> [(m: Mapping, count: UInt64)] {
        try state.withLock { (s) throws(QCOW2Error) in
            var out: [(m: Mapping, count: UInt64)] = []
            func push(_ m: Mapping, _ n: UInt64) {
                if let last = out.last, last.m == m, m == .unallocated || m == .zero(host: nil) {
                    out[out.count - 1].count += n
                } else {
                    out.append((m, n))
                }
            }
            let per = clusterSize / 8
            var ci = first
            while ci < end {
                let l1i = ci / per
                let spanEnd = min((l1i + 1) * per, end)
                if l1i >= UInt64(s.l1.count) || s.l1[Int(l1i)] & Self.offsetMask == 0 {
                    push(.unallocated, spanEnd - ci)
                } else {
                    let t = try l2Table(Int(l1i), &s)
                    for c in ci..<spanEnd { push(try decode(t[Int(c % per)]), 1) }
                }
                ci = spanEnd
            }
            return out
        }
    }

    /// One mapping per cluster of `[first, end)` (for ranges of a write's size).
    func mappings(first: UInt64, end: UInt64) throws(QCOW2Error) -> [Mapping] {
        var out: [Mapping] = []
        for r in try mappingRuns(first: first, end: end) { out += repeatElement(r.m, count: Int(r.count)) }
        return out
    }

    /// The L2 table of L1 entry `l1i` (which points at one), read on first use.
    func l2Table(_ l1i: Int, _ s: inout State) throws(QCOW2Error) -> [UInt64] {
        if let t = s.l2[l1i] { return t }
        let off = s.l1[l1i] & Self.offsetMask
        let raw = try file.read(count: Int(clusterSize), at: off)
        let t = be64Table(raw, count: Int(clusterSize / 8))
        if s.l2.count >= Self.cachedTables {
            // Drop a table that matches the file (dirty ones wait for the next sync).
            if let k = s.l2.keys.first(where: { !s.dirtyL2.contains($0) }) { s.l2[k] = nil }
        }
        s.l2[l1i] = t
        return t
    }

    /// The bytes of a compressed cluster, inflated.
    func inflate(host: UInt64, bytes: Int) throws(QCOW2Error) -> [UInt8] {
        if let c = inflated.withLock({ $0 }), c.host == host { return c.bytes }
        let raw = try file.read(count: bytes, at: host)
        guard let out = Deflate.inflate(raw, into: Int(clusterSize)) else {
            throw .badCompressedCluster(path: path, offset: host)
        }
        inflated.withLock { $0 = (host, out) }
        return out
    }

    public func mapped(offset: UInt64, count: Int) -> UnsafeRawBufferPointer? {
        file.mapped(offset: offset, count: count)
    }
}

/// Stands for pieces of a read plan that cannot be lent as memory (compressed clusters):
/// whoever asks for its pages gets nil and reads into a buffer instead.
final class Unmappable: MappableFile, Sendable {
    static let shared = Unmappable()
    var path: String { "(compressed cluster)" }
    func mapped(offset: UInt64, count: Int) -> UnsafeRawBufferPointer? { nil }
}
