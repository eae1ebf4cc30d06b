import SystemPackage

/// Every way a VHD can be refused. Parsers throw these and never trap on file contents.
public enum VHDError: Error, Equatable, CustomStringConvertible, Sendable {
    /// The structure's cookie is not the spec's (`conectix`, `cxsparse`).
    case badCookie(structure: String, found: [UInt8])
    /// The one's-complement checksum does not match.
    case badChecksum(structure: String, expected: UInt32, found: UInt32)
    /// A version field the spec does not define.
    case unsupportedVersion(structure: String, version: UInt32)
    /// The footer's Disk Type is not fixed (2), dynamic (3) or differencing (4).
    case unsupportedDiskType(UInt32)
    /// The file is shorter than its structures say.
    case truncated(needed: UInt64, fileLength: UInt64)
    /// A field is out of its allowed range (BAT past EOF, block size not a power of two, ...).
    case invalidField(structure: String, field: String, value: UInt64, reason: String)
    /// A differencing disk's parent cannot be found by any locator.
    case parentMissing(child: String, parentName: String, parentUniqueID: String)
    /// The parent found has another Unique Id than the child's Parent Unique Id.
    case parentMismatch(child: String, parent: String, expected: String, found: String)
    /// A chain refers back to a disk already in it.
    case chainLoop(path: String)
    /// A chain deeper than we accept.
    case chainTooDeep(limit: Int)
    /// A read or write past the virtual size.
    case outOfRange(offset: UInt64, length: UInt64, virtualSize: UInt64)
    /// A write to a disk opened read-only.
    case readOnly(path: String)
    /// A cached-only read would have had to wait for the disk.
    case wouldBlock
    /// Zeroing this range would mean writing zeros (asked to fail fast instead).
    case zeroingNotFast
    /// The caller's condition for letting a write become visible failed (a change log that
    /// could not be made durable, say); nothing of the write is visible.
    case notPublished(reason: String)
    /// An operating-system error, with the path it happened on.
    case io(path: String, errno: Errno)

    public var description: String {
        switch self {
        case .badCookie(let s, let found):
            return "\(s): bad cookie \(found.map { String(format: "%02x", $0) }.joined())"
        case .badChecksum(let s, let e, let f):
            return "\(s): bad checksum: computed 0x\(String(e, radix: 16)), stored 0x\(String(f, radix: 16))"
        case .unsupportedVersion(let s, let v): return "\(s): unsupported version 0x\(String(v, radix: 16))"
        case .unsupportedDiskType(let t): return "unsupported disk type \(t)"
        case .truncated(let n, let l): return "file truncated: needs \(n) bytes, has \(l)"
        case .invalidField(let s, let f, let v, let r): return "\(s).\(f) = \(v): \(r)"
        case .parentMissing(let c, let p, let u): return "parent missing: \(c) needs parent \(p) (uuid \(u))"
        case .parentMismatch(let c, let p, let e, let f):
            return "parent mismatch: \(c) expects parent uuid \(e) but \(p) has \(f)"
        case .chainLoop(let p): return "chain loops back to \(p)"
        case .chainTooDeep(let l): return "chain deeper than \(l)"
        case .outOfRange(let o, let l, let v): return "range \(o)+\(l) outside virtual size \(v)"
        case .readOnly(let p): return "\(p) is read-only"
        case .wouldBlock: return "the data is not in the page cache"
        case .zeroingNotFast: return "zeroing this range is not faster than writing zeros"
        case .notPublished(let r): return "write not made visible: \(r)"
        case .io(let p, let e): return "\(p): \(e)"
        }
    }
}

func hex(_ bytes: [UInt8]) -> String { bytes.map { String(format: "%02x", $0) }.joined() }
