// qcow2's typed errors, classified for the storage seam.

import Image
import SystemPackage

public enum QCOW2Error: ImageFailure, Equatable {
    case io(path: String, errno: Errno)
    case readOnly(path: String)
    case outOfRange(path: String, offset: UInt64, length: UInt64, size: UInt64)
    case wouldBlock
    case notPublished(path: String)
    case zeroingNotFast(path: String)
    /// Not a qcow2 file (the first four bytes are not `QFI\xfb`).
    case badMagic(path: String)
    /// A header field or table entry that no valid image has.
    case invalidField(path: String, field: String, value: UInt64, reason: String)
    /// A feature this implementation does not serve (named as qcow2.txt names it).
    case unsupportedFeature(path: String, feature: String)
    /// The file is marked corrupt (incompatible bit 1): qemu-img check -r all first.
    case markedCorrupt(path: String)
    /// The refcount table cannot describe a cluster this far into the file.
    case refcountTableFull(path: String, cluster: UInt64)
    /// A compressed cluster whose data does not inflate to one cluster.
    case badCompressedCluster(path: String, offset: UInt64)
    case backingMissing(path: String, backing: String)
    case backingFormat(path: String, format: String)
    case chainLoop(path: String)
    case chainTooDeep(limit: Int)
    /// The file is already open for writing in this process (one writer per file).
    case alreadyOpenForWriting(path: String)

    public var failureKind: ImageFailureKind {
        switch self {
        case .io, .alreadyOpenForWriting: return .io
        case .readOnly: return .readOnly
        case .outOfRange: return .outOfRange
        case .wouldBlock: return .wouldBlock
        case .notPublished: return .notPublished
        case .zeroingNotFast: return .zeroingNotFast
        case .badMagic, .invalidField, .unsupportedFeature, .markedCorrupt, .refcountTableFull, .badCompressedCluster:
            return .corrupt
        case .backingMissing, .backingFormat, .chainLoop, .chainTooDeep: return .chain
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
        case .badMagic(let p): return "\(p) is not a qcow2 image (bad magic)"
        case .invalidField(let p, let f, let v, let r): return "\(p): qcow2 \(f) = \(v): \(r)"
        case .unsupportedFeature(let p, let f): return "\(p): qcow2 feature not supported: \(f)"
        case .markedCorrupt(let p): return "\(p): the image is marked corrupt (repair it with qemu-img check -r all)"
        case .refcountTableFull(let p, let c): return "\(p): the refcount table cannot cover cluster \(c)"
        case .badCompressedCluster(let p, let o): return "\(p): the compressed cluster at \(o) does not inflate to one cluster"
        case .backingMissing(let p, let b): return "\(p): its backing file \(b) cannot be opened"
        case .backingFormat(let p, let f): return "\(p): backing file format \(f) is not qcow2"
        case .chainLoop(let p): return "\(p): the backing chain loops"
        case .chainTooDeep(let n): return "the backing chain is deeper than \(n) files"
        case .alreadyOpenForWriting(let p): return "\(p) is already open for writing (its tables in memory are not yet the file's)"
        }
    }
}
