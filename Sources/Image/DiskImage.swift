// Design notes: the storage seam.
//
// Storage and Server see a disk only through these protocols. A format (VHD today;
// raw and qcow2 next) is one implementation of `ImageFormat` (files: create, open,
// parentage, relink, grow) and `DiskImage` (an open chain: read with hole reporting,
// plans for zero-copy sends, writes with a `beforeVisible` gate, zeroing, allocation,
// flush). Nothing here does I/O scheduling, locking across handles or record keeping:
// those stay in Storage, the same for every format.
//
// Errors: each format throws its own typed errors and makes them `ImageFailure`s, so the
// one place that maps them for the layers above (Storage's `DiskError`) switches on a
// kind and keeps the errno and the format's error as the cause.

import SystemPackage

/// What went wrong, as the layers above an image need to know it.
public enum ImageFailureKind: Sendable, Equatable {
    case readOnly
    case outOfRange
    case zeroingNotFast
    case wouldBlock
    /// A `beforeVisible` gate failed: nothing of the write became visible.
    case notPublished
    /// A system call failed (see `errno`).
    case io
    /// The file is not a valid image of its format (or of a version we read).
    case corrupt
    /// The chain is broken (a parent missing or not the one recorded) or too deep.
    case chain
}

/// An image format's error, classified.
public protocol ImageFailure: Error, Sendable, CustomStringConvertible {
    var failureKind: ImageFailureKind { get }
    var errno: Errno? { get }
}

/// A file whose bytes can be lent as mapped memory (the zero-copy read path).
public protocol MappableFile: AnyObject, Sendable {
    var path: String { get }
    /// The file's bytes `[offset, offset+count)` in memory, faulted in, valid while the
    /// file object lives; nil where that cannot be done.
    func mapped(offset: UInt64, count: Int) -> UnsafeRawBufferPointer?
}

/// The pieces of one read, in order, covering it exactly.
public struct ReadPlan: Sendable {
    public enum Piece: Sendable {
        /// `count` bytes at `offset` of `file`.
        case data(file: any MappableFile, offset: UInt64, count: Int)
        /// `count` bytes that read as zeros (no layer holds them).
        case zeros(count: Int)

        public var count: Int {
            switch self {
            case .data(_, _, let n), .zeros(let n): return n
            }
        }
    }

    public var pieces: [Piece] = []
    public init() {}

    /// Adds a file extent, merged with the previous one where contiguous in the same file.
    public mutating func appendData(_ file: any MappableFile, offset: UInt64, count: Int) {
        if case .data(let f, let o, let n)? = pieces.last, f === file, o + UInt64(n) == offset {
            pieces[pieces.count - 1] = .data(file: f, offset: o, count: n + count)
        } else {
            pieces.append(.data(file: file, offset: offset, count: count))
        }
    }

    public mutating func appendZeros(_ count: Int) {
        if case .zeros(let n)? = pieces.last {
            pieces[pieces.count - 1] = .zeros(count: n + count)
        } else {
            pieces.append(.zeros(count: count))
        }
    }
}

/// An open chain of image files, leaf first. Only the leaf is ever written.
public protocol DiskImage: AnyObject, Sendable {
    var virtualSize: UInt64 { get }
    var writable: Bool { get }
    /// How many files the chain reads from.
    var depth: Int { get }
    /// The chain's files, leaf first.
    var layerPaths: [String] { get }

    /// Reads `buffer.count` bytes at `offset`; `holes` gets the ranges of the buffer no
    /// layer holds (they read as zeros). With `cachedOnly`, fails with a `.wouldBlock`
    /// failure instead of waiting for the disk.
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64, cachedOnly: Bool,
              holes: inout [Range<Int>]) throws
    /// Where each byte of the range comes from, without reading.
    func plan(offset: UInt64, length: Int) throws -> ReadPlan
    /// Writes through the leaf. `beforeVisible` runs before any byte of the write can be
    /// read back (for a block being allocated: after its data is durable, before the
    /// table points at it); if it throws, nothing of that piece becomes visible.
    func write(_ data: UnsafeRawBufferPointer, at offset: UInt64, beforeVisible: (() throws -> Void)?) throws
    /// Makes the range read as zeros; `punch` returns space where it can; `fastOnly`
    /// fails (`.zeroingNotFast`) before changing anything if zeros would have to be written.
    func writeZeroes(offset: UInt64, length: UInt64, punch: Bool, fastOnly: Bool) throws
    /// Runs of allocated (some layer holds data) and unallocated space.
    func allocationRuns(offset: UInt64, length: UInt64) throws -> [(allocated: Bool, length: UInt64)]
    /// The byte ranges the leaf itself holds, exactly (what merging it into its parent copies).
    func leafDataRuns(offset: UInt64, length: UInt64) throws -> [Range<UInt64>]
    /// The leaf holds every byte of the range: a write there allocates nothing.
    func leafHoldsAll(offset: UInt64, length: UInt64) -> Bool
    /// The leaf holds none of the range's allocation units: a write there allocates.
    func leafLacksAll(offset: UInt64, length: UInt64) -> Bool
    /// A write of the range is one plain write into the leaf's file: no table of the
    /// image's own to change and nothing to copy up from a parent (so it may be done on the
    /// caller's thread). By default where the leaf holds all of it; a raw file, whose holes
    /// the file system fills, always.
    func writesInPlace(offset: UInt64, length: UInt64) -> Bool
    func flush() throws
    func close()
    /// Off: a newly allocated unit's data need not be durable before the image points at
    /// it (for an image being filled that no one relies on until a final `flush`, a fresh
    /// copy's target). On by default.
    func setAllocationBarrier(_ on: Bool)
}

/// One image format: how its files are made, opened and linked into chains.
public protocol ImageFormat: Sendable {
    /// The format's name as XenAPI's `image-format` spells it (`vhd`, `qcow2`, `raw`).
    var name: String { get }
    /// The file name extension in an SR (`<uuid>.<ext>`).
    var fileExtension: String { get }
    /// The largest virtual size the format holds.
    var maxVirtualSize: UInt64 { get }
    /// Whether an image can have a parent (snapshots, clones, overlays); raw cannot.
    var holdsChains: Bool { get }

    /// Makes a new empty image (fails if the file exists).
    func create(path: String, size: UInt64) throws
    /// Makes a new empty child of `parent`, of the parent's size unless `size` is given.
    func createChild(path: String, parent: String, size: UInt64?) throws
    /// Opens `path` and every parent it names; only the leaf is writable. A file has one
    /// writer in a process, and a view opened while it writes sees every write made
    /// before the open (an export, a copy and a merge open such views beside a handle).
    func open(path: String, writable: Bool) throws -> any DiskImage
    /// Opens `path` alone, read-only: it reads its own data and zeros elsewhere.
    func openLayer(path: String) throws -> any DiskImage
    /// The file the image names as its parent, or nil (no parent, or none found).
    func parentPath(ofFile path: String) -> String?
    /// Makes the image name `parent` as its parent. Crash note: the file may read as
    /// damaged until this completes; callers journal the step and redo it.
    func setParent(ofFile path: String, to parent: String) throws
    func virtualSize(ofFile path: String) throws -> UInt64
    /// Grows the image (not open for I/O elsewhere, or open only by readers that never
    /// read past the old size of this file).
    func grow(path: String, to size: UInt64) throws
    /// Checks the file's structures; nil when sound, else what is wrong.
    func check(path: String) -> String?
}

extension DiskImage {
    public func writesInPlace(offset: UInt64, length: UInt64) -> Bool { leafHoldsAll(offset: offset, length: length) }

    public func write(_ data: UnsafeRawBufferPointer, at offset: UInt64) throws {
        try write(data, at: offset, beforeVisible: nil)
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        var holes: [Range<Int>] = []
        try read(into: buffer, at: offset, cachedOnly: false, holes: &holes)
    }
}
