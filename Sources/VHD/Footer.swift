import NIOCore

/// `Disk Type` in the hard disk footer.
public enum DiskType: UInt32, Sendable, CustomStringConvertible {
    case fixed = 2
    case dynamic = 3
    case differencing = 4
    public var description: String {
        switch self {
        case .fixed: return "fixed"
        case .dynamic: return "dynamic"
        case .differencing: return "differencing"
        }
    }
}

/// `Disk Geometry`: cylinders, heads, sectors per track.
public struct DiskGeometry: Equatable, Sendable {
    public var cylinders: UInt16
    public var heads: UInt8
    public var sectorsPerTrack: UInt8

    /// The CHS algorithm from the VHD specification's appendix.
    public init(forSize size: UInt64) {
        var totalSectors = size / 512
        if totalSectors > 65535 * 16 * 255 { totalSectors = 65535 * 16 * 255 }
        var spt: UInt64, heads: UInt64, cth: UInt64
        if totalSectors >= 65535 * 16 * 63 {
            spt = 255; heads = 16; cth = totalSectors / spt
        } else {
            spt = 17
            cth = totalSectors / spt
            heads = (cth + 1023) / 1024
            if heads < 4 { heads = 4 }
            if cth >= heads * 1024 || heads > 16 {
                spt = 31; heads = 16; cth = totalSectors / spt
            }
            if cth >= heads * 1024 {
                spt = 63; heads = 16; cth = totalSectors / spt
            }
        }
        let cyl = cth / heads
        self.cylinders = UInt16(min(cyl, 65535))
        self.heads = UInt8(heads)
        self.sectorsPerTrack = UInt8(spt)
    }

    public init(cylinders: UInt16, heads: UInt8, sectorsPerTrack: UInt8) {
        self.cylinders = cylinders
        self.heads = heads
        self.sectorsPerTrack = sectorsPerTrack
    }
}

/// The 512-byte hard disk footer (also copied at offset 0 of dynamic and differencing disks).
public struct Footer: Equatable, Sendable {
    public static let size = 512
    /// `conectix`
    public static let cookieBytes: [UInt8] = Array("conectix".utf8)
    static let checksumOffset = 64

    /// `Features`: bit 1 (reserved) is always set.
    public var features: UInt32 = 2
    /// `File Format Version`
    public var fileFormatVersion: UInt32 = 0x0001_0000
    /// `Data Offset`: the dynamic disk header's offset, all ones for fixed disks.
    public var dataOffset: UInt64
    /// `Time Stamp`: seconds since 2000-01-01 UTC.
    public var timeStamp: UInt32
    /// `Creator Application`. We write blktap's `tap\0` so qemu trusts `currentSize`.
    public var creatorApplication: [UInt8] = Array("tap\0".utf8)
    /// `Creator Version`
    public var creatorVersion: UInt32 = 0x0001_0003
    /// `Creator Host OS`: `Wi2k`, `Mac `.
    public var creatorHostOS: [UInt8] = Array("Wi2k".utf8)
    /// `Original Size`
    public var originalSize: UInt64
    /// `Current Size`: the virtual size in bytes.
    public var currentSize: UInt64
    /// `Disk Geometry`
    public var diskGeometry: DiskGeometry
    /// `Disk Type`
    public var diskType: DiskType
    /// `Unique Id`
    public var uniqueID: [UInt8]
    /// `Saved State`
    public var savedState: UInt8 = 0

    public init(diskType: DiskType, currentSize: UInt64, uniqueID: [UInt8], timeStamp: UInt32, dataOffset: UInt64) {
        self.diskType = diskType
        self.currentSize = currentSize
        self.originalSize = currentSize
        self.diskGeometry = DiskGeometry(forSize: currentSize)
        self.uniqueID = uniqueID
        self.timeStamp = timeStamp
        self.dataOffset = dataOffset
    }

    /// The checksum as stored, when the footer was parsed with `.tolerate` and did not match.
    public internal(set) var checksumMismatch: (stored: UInt32, computed: UInt32)? = nil

    public static func == (a: Footer, b: Footer) -> Bool { a.serialize() == b.serialize() }

    /// Parses and distrusts: cookie, checksum, version, disk type, then ranges.
    public static func parse(_ bytes: [UInt8], policy: ChecksumPolicy = .strict) throws(VHDError) -> Footer {
        guard bytes.count >= size else {
            throw .truncated(needed: UInt64(size), fileLength: UInt64(bytes.count))
        }
        var buf = ByteBuffer(bytes: bytes[0..<size])
        let cookie = buf.readBytes(length: 8)!
        guard cookie == cookieBytes else { throw .badCookie(structure: "footer", found: cookie) }
        let stored = buf.getInteger(at: checksumOffset, as: UInt32.self)!
        let computed = vhdChecksum(Array(bytes[0..<size]), checksumOffset: checksumOffset)
        var mismatch: (UInt32, UInt32)? = nil
        if stored != computed {
            if policy == .strict { throw .badChecksum(structure: "footer", expected: computed, found: stored) }
            mismatch = (stored, computed)
        }
        let features = buf.readInteger(as: UInt32.self)!
        let version = buf.readInteger(as: UInt32.self)!
        guard version >> 16 == 1 else { throw .unsupportedVersion(structure: "footer", version: version) }
        let dataOffset = buf.readInteger(as: UInt64.self)!
        let timeStamp = buf.readInteger(as: UInt32.self)!
        let creatorApp = buf.readBytes(length: 4)!
        let creatorVersion = buf.readInteger(as: UInt32.self)!
        let creatorOS = buf.readBytes(length: 4)!
        let originalSize = buf.readInteger(as: UInt64.self)!
        let currentSize = buf.readInteger(as: UInt64.self)!
        let cyl = buf.readInteger(as: UInt16.self)!
        let heads = buf.readInteger(as: UInt8.self)!
        let spt = buf.readInteger(as: UInt8.self)!
        let rawType = buf.readInteger(as: UInt32.self)!
        guard let type = DiskType(rawValue: rawType) else { throw .unsupportedDiskType(rawType) }
        _ = buf.readInteger(as: UInt32.self)  // checksum, checked above
        let uid = buf.readBytes(length: 16)!
        let saved = buf.readInteger(as: UInt8.self)!
        // 2 TiB is the format's documented limit; allow a little more as blktap does, but refuse nonsense.
        guard currentSize <= (1 << 44) else {
            throw .invalidField(structure: "footer", field: "currentSize", value: currentSize, reason: "larger than 16 TiB")
        }
        var f = Footer(diskType: type, currentSize: currentSize, uniqueID: uid, timeStamp: timeStamp, dataOffset: dataOffset)
        f.features = features
        f.fileFormatVersion = version
        f.creatorApplication = creatorApp
        f.creatorVersion = creatorVersion
        f.creatorHostOS = creatorOS
        f.originalSize = originalSize
        f.diskGeometry = DiskGeometry(cylinders: cyl, heads: heads, sectorsPerTrack: spt)
        f.savedState = saved
        f.checksumMismatch = mismatch
        return f
    }

    /// Serializes with a freshly computed checksum.
    public func serialize() -> [UInt8] {
        var buf = ByteBuffer()
        buf.reserveCapacity(Footer.size)
        buf.writeBytes(Footer.cookieBytes)
        buf.writeInteger(features)
        buf.writeInteger(fileFormatVersion)
        buf.writeInteger(dataOffset)
        buf.writeInteger(timeStamp)
        buf.writeBytes(padded(creatorApplication, 4))
        buf.writeInteger(creatorVersion)
        buf.writeBytes(padded(creatorHostOS, 4))
        buf.writeInteger(originalSize)
        buf.writeInteger(currentSize)
        buf.writeInteger(diskGeometry.cylinders)
        buf.writeInteger(diskGeometry.heads)
        buf.writeInteger(diskGeometry.sectorsPerTrack)
        buf.writeInteger(diskType.rawValue)
        buf.writeInteger(UInt32(0))
        buf.writeBytes(padded(uniqueID, 16))
        buf.writeInteger(savedState)
        buf.writeRepeatingByte(0, count: Footer.size - buf.readableBytes)
        var bytes = buf.readBytes(length: Footer.size)!
        let sum = vhdChecksum(bytes, checksumOffset: Footer.checksumOffset)
        withUnsafeBytes(of: sum.bigEndian) { raw in
            for i in 0..<4 { bytes[Footer.checksumOffset + i] = raw[i] }
        }
        return bytes
    }

    /// The creator application as text (`tap`, `qemu`, `win `).
    public var creatorApplicationString: String {
        String(decoding: creatorApplication.prefix { $0 != 0 }, as: UTF8.self)
    }
}

func padded(_ b: [UInt8], _ n: Int) -> [UInt8] {
    b.count >= n ? Array(b.prefix(n)) : b + [UInt8](repeating: 0, count: n - b.count)
}
