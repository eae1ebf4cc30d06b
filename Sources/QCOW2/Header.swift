// The qcow2 header (qemu's docs/interop/qcow2.txt): the fixed fields, version 2 and 3,
// and the header extensions that follow them in cluster 0. A value: parsing validates
// every field a later step trusts (with overflow-safe arithmetic), serializing makes the
// header this implementation writes (version 3, refcount order 4).

public struct QCOW2Header: Sendable, Equatable {
    public static let magic: UInt32 = 0x5146_49fb  // "QFI\xfb"
    public static let v3Length = 112
    /// qemu's limit on a backing file's name.
    public static let maxBackingNameBytes = 1023

    public enum Incompatible {
        public static let dirty: UInt64 = 1 << 0
        public static let corrupt: UInt64 = 1 << 1
        public static let externalData: UInt64 = 1 << 2
        public static let compressionType: UInt64 = 1 << 3
        public static let extendedL2: UInt64 = 1 << 4
    }

    enum Extension {
        static let end: UInt32 = 0
        static let backingFormat: UInt32 = 0xe279_2aca
        static let featureNames: UInt32 = 0x6803_f857
        static let bitmaps: UInt32 = 0x2385_2875
        static let encryption: UInt32 = 0x0537_be77
        static let externalData: UInt32 = 0x4441_5441
    }

    public var version: UInt32 = 3
    public var backingFileOffset: UInt64 = 0
    public var backingFileSize: UInt32 = 0
    public var clusterBits: UInt32 = 16
    public var size: UInt64 = 0
    public var cryptMethod: UInt32 = 0
    public var l1Size: UInt32 = 0
    public var l1TableOffset: UInt64 = 0
    public var refcountTableOffset: UInt64 = 0
    public var refcountTableClusters: UInt32 = 0
    public var snapshotCount: UInt32 = 0
    public var snapshotsOffset: UInt64 = 0
    public var incompatibleFeatures: UInt64 = 0
    public var compatibleFeatures: UInt64 = 0
    public var autoclearFeatures: UInt64 = 0
    public var refcountOrder: UInt32 = 4
    public var headerLength: UInt32 = UInt32(v3Length)
    public var compressionType: UInt8 = 0
    /// From the extensions.
    public var backingFormat: String?
    public var backingFile: String?
    public var hasBitmaps = false
    /// Where the header and its extensions end in cluster 0.
    public var extensionsEnd = 0
    /// Names of features by (type, bit), from the feature name table.
    public var featureNames: [UInt16: String] = [:]

    public var clusterSize: UInt64 { 1 << UInt64(clusterBits) }
    /// L2 entries per table (a table is one cluster of 8-byte entries).
    public var l2Entries: UInt64 { clusterSize / 8 }

    public init() {}

    /// L1 entries needed for `size` bytes with `clusterBits` clusters.
    public static func l1Entries(size: UInt64, clusterBits: UInt32) -> UInt64 {
        let perL1 = UInt64(1) << (UInt64(clusterBits) * 2 - 3)
        // Rounded up without `size + perL1 - 1`, which a crafted size near 2^64 overflows.
        return size / perL1 + (size % perL1 == 0 ? 0 : 1)
    }

    /// Parses cluster 0 (or at least its first `headerLength` bytes plus extensions and
    /// the backing name); `fileLength` bounds the offsets.
    public static func parse(_ b: [UInt8], path: String, fileLength: UInt64) throws(QCOW2Error) -> QCOW2Header {
        func bad(_ f: String, _ v: UInt64, _ r: String) -> QCOW2Error { .invalidField(path: path, field: f, value: v, reason: r) }
        guard b.count >= 72 else { throw bad("header", UInt64(b.count), "shorter than a version 2 header (72 bytes)") }
        guard be32(b, 0) == magic else { throw .badMagic(path: path) }
        var h = QCOW2Header()
        h.version = be32(b, 4)
        guard h.version == 2 || h.version == 3 else { throw bad("version", UInt64(h.version), "only versions 2 and 3 exist") }
        h.backingFileOffset = be64(b, 8)
        h.backingFileSize = be32(b, 16)
        h.clusterBits = be32(b, 20)
        guard (9...21).contains(h.clusterBits) else { throw bad("cluster_bits", UInt64(h.clusterBits), "clusters are 512 B to 2 MiB") }
        h.size = be64(b, 24)
        h.cryptMethod = be32(b, 32)
        h.l1Size = be32(b, 36)
        h.l1TableOffset = be64(b, 40)
        h.refcountTableOffset = be64(b, 48)
        h.refcountTableClusters = be32(b, 56)
        h.snapshotCount = be32(b, 60)
        h.snapshotsOffset = be64(b, 64)
        var extStart = 72
        if h.version == 3 {
            guard b.count >= 104 else { throw bad("header", UInt64(b.count), "shorter than a version 3 header (104 bytes)") }
            h.incompatibleFeatures = be64(b, 72)
            h.compatibleFeatures = be64(b, 80)
            h.autoclearFeatures = be64(b, 88)
            h.refcountOrder = be32(b, 96)
            h.headerLength = be32(b, 100)
            guard h.headerLength >= 104, h.headerLength % 8 == 0, Int(h.headerLength) <= b.count else {
                throw bad("header_length", UInt64(h.headerLength), "must be at least 104, a multiple of 8, inside cluster 0")
            }
            if h.headerLength > 104 { h.compressionType = b[104] }
            extStart = Int(h.headerLength)
        } else {
            h.headerLength = 72
        }
        guard h.refcountOrder <= 6 else { throw bad("refcount_order", UInt64(h.refcountOrder), "refcounts are 1 to 64 bits") }
        let cs = h.clusterSize
        // Every table must start on a cluster and lie inside the file.
        func table(_ f: String, _ off: UInt64, _ bytes: UInt64) throws(QCOW2Error) {
            guard off % cs == 0 else { throw bad(f, off, "not aligned to a cluster (\(cs) bytes)") }
            let (end, o) = off.addingReportingOverflow(bytes)
            guard !o, end <= fileLength || bytes == 0 else {
                throw bad(f, off, "the table (\(bytes) bytes) passes the end of the file (\(fileLength) bytes)")
            }
        }
        // qemu's own bound on L1 (32 MiB of entries).
        guard UInt64(h.l1Size) <= (32 << 20) / 8 else { throw bad("l1_size", UInt64(h.l1Size), "larger than qemu allows") }
        let needed = l1Entries(size: h.size, clusterBits: h.clusterBits)
        guard UInt64(h.l1Size) >= needed else {
            throw bad("l1_size", UInt64(h.l1Size), "\(needed) entries are needed for a \(h.size)-byte disk")
        }
        try table("l1_table_offset", h.l1TableOffset, UInt64(h.l1Size) * 8)
        guard h.refcountTableClusters > 0, UInt64(h.refcountTableClusters) <= (8 << 20) / cs + 1 else {
            throw bad("refcount_table_clusters", UInt64(h.refcountTableClusters), "must be 1 to 8 MiB of table")
        }
        try table("refcount_table_offset", h.refcountTableOffset, UInt64(h.refcountTableClusters) * cs)

        // Extensions: type, length, data padded to 8 bytes; they end with type 0.
        var p = extStart
        if h.version == 3 {
            while p + 8 <= b.count {
                let type = be32(b, p), len = Int(be32(b, p + 4))
                p += 8
                if type == Extension.end { break }
                guard len <= b.count - p else { throw bad("header extension 0x\(String(type, radix: 16)) length", UInt64(len), "passes cluster 0") }
                let data = Array(b[p..<(p + len)])
                switch type {
                case Extension.backingFormat:
                    h.backingFormat = String(decoding: data.prefix { $0 != 0 }, as: UTF8.self)
                case Extension.featureNames:
                    var i = 0
                    while i + 48 <= data.count {
                        let name = String(decoding: data[(i + 2)..<(i + 48)].prefix { $0 != 0 }, as: UTF8.self)
                        h.featureNames[UInt16(data[i]) << 8 | UInt16(data[i + 1])] = name
                        i += 48
                    }
                case Extension.bitmaps: h.hasBitmaps = true
                case Extension.encryption: h.cryptMethod = max(h.cryptMethod, 2)
                case Extension.externalData: h.incompatibleFeatures |= Incompatible.externalData
                default: break
                }
                p += (len + 7) & ~7
            }
        }
        h.extensionsEnd = p
        if h.backingFileOffset != 0 {
            let off = h.backingFileOffset, n = UInt64(h.backingFileSize)
            guard n > 0, n <= UInt64(maxBackingNameBytes) else { throw bad("backing_file_size", n, "a backing file's name is 1 to 1023 bytes") }
            let (end, o) = off.addingReportingOverflow(n)
            guard !o, end <= UInt64(b.count) else { throw bad("backing_file_offset", off, "the name passes cluster 0") }
            h.backingFile = String(decoding: b[Int(off)..<Int(end)], as: UTF8.self)
        }
        return h
    }

    /// Refuses what this implementation cannot serve correctly, naming the feature.
    public func checkSupported(path: String, writable: Bool) throws(QCOW2Error) {
        func name(_ type: UInt16, _ bit: Int, _ fallback: String) -> String {
            featureNames[type << 8 | UInt16(bit)] ?? fallback
        }
        if cryptMethod == 1 { throw .unsupportedFeature(path: path, feature: "encryption (AES, crypt_method 1)") }
        if cryptMethod == 2 { throw .unsupportedFeature(path: path, feature: "encryption (LUKS, crypt_method 2)") }
        if cryptMethod != 0 { throw .unsupportedFeature(path: path, feature: "encryption (crypt_method \(cryptMethod))") }
        if incompatibleFeatures & Incompatible.externalData != 0 {
            throw .unsupportedFeature(path: path, feature: name(0, 2, "external data file"))
        }
        if incompatibleFeatures & Incompatible.extendedL2 != 0 {
            throw .unsupportedFeature(path: path, feature: name(0, 4, "extended L2 entries (subclusters)"))
        }
        if incompatibleFeatures & Incompatible.compressionType != 0, compressionType != 0 {
            throw .unsupportedFeature(path: path, feature: compressionType == 1 ? "zstd compression" : "compression type \(compressionType)")
        }
        let known = Incompatible.dirty | Incompatible.corrupt | Incompatible.compressionType
        let unknown = incompatibleFeatures & ~known & ~(Incompatible.externalData | Incompatible.extendedL2)
        if unknown != 0 {
            let bits = (0..<64).filter { unknown & (1 << UInt64($0)) != 0 }
            throw .unsupportedFeature(path: path, feature: bits.map { name(0, $0, "incompatible feature bit \($0)") }.joined(separator: ", "))
        }
        if writable {
            if incompatibleFeatures & Incompatible.corrupt != 0 { throw .markedCorrupt(path: path) }
            if version < 3 { throw .unsupportedFeature(path: path, feature: "writing a version 2 image (qemu-img amend -o compat=1.1 it)") }
            if refcountOrder != 4 { throw .unsupportedFeature(path: path, feature: "writing with \(1 << refcountOrder)-bit refcounts") }
            if snapshotCount > 0 { throw .unsupportedFeature(path: path, feature: "writing an image with internal snapshots") }
        }
    }

    /// Cluster 0 of an image this implementation makes (version 3, refcount order 4):
    /// the header, a backing format extension when there is a backing file, and the
    /// backing file's name at `nameSlot`.
    public func serialize(nameSlot: Int = QCOW2Header.nameSlots[0]) -> [UInt8] {
        var b = [UInt8](repeating: 0, count: Int(clusterSize))
        put32(&b, 0, Self.magic)
        put32(&b, 4, 3)
        put32(&b, 20, clusterBits)
        put64(&b, 24, size)
        put32(&b, 36, l1Size)
        put64(&b, 40, l1TableOffset)
        put64(&b, 48, refcountTableOffset)
        put32(&b, 56, refcountTableClusters)
        put64(&b, 72, incompatibleFeatures)
        put64(&b, 80, compatibleFeatures)
        put64(&b, 88, autoclearFeatures)
        put32(&b, 96, 4)
        put32(&b, 100, UInt32(Self.v3Length))
        var p = Self.v3Length
        if let fmt = backingFormat {
            let d = Array(fmt.utf8)
            put32(&b, p, Extension.backingFormat)
            put32(&b, p + 4, UInt32(d.count))
            for (i, c) in d.enumerated() { b[p + 8 + i] = c }
            p += 8 + ((d.count + 7) & ~7)
        }
        put32(&b, p, Extension.end)  // end of extensions (type 0, length 0)
        if let name = backingFile {
            let d = Array(name.utf8)
            put64(&b, 8, UInt64(nameSlot))
            put32(&b, 16, UInt32(d.count))
            for (i, c) in d.enumerated() { b[nameSlot + i] = c }
        }
        return b
    }

    /// Two places in cluster 0 for the backing file's name: a new name is written in the
    /// one not in use, then the header is pointed at it (one sector), so a crash leaves
    /// either name whole.
    public static let nameSlots = [1024, 2048]
}

@inline(__always) func be32(_ b: [UInt8], _ o: Int) -> UInt32 {
    UInt32(b[o]) << 24 | UInt32(b[o + 1]) << 16 | UInt32(b[o + 2]) << 8 | UInt32(b[o + 3])
}
@inline(__always) func be64(_ b: [UInt8], _ o: Int) -> UInt64 { UInt64(be32(b, o)) << 32 | UInt64(be32(b, o + 4)) }
/// A table of big-endian 64-bit entries (L1, L2, the refcount table), eight bytes at a time.
func be64Table(_ b: [UInt8], count: Int) -> [UInt64] {
    b.withUnsafeBytes { raw in (0..<count).map { UInt64(bigEndian: raw.loadUnaligned(fromByteOffset: $0 * 8, as: UInt64.self)) } }
}
@inline(__always) func put32(_ b: inout [UInt8], _ o: Int, _ v: UInt32) {
    b[o] = UInt8(v >> 24); b[o + 1] = UInt8((v >> 16) & 0xff); b[o + 2] = UInt8((v >> 8) & 0xff); b[o + 3] = UInt8(v & 0xff)
}
@inline(__always) func put64(_ b: inout [UInt8], _ o: Int, _ v: UInt64) { put32(&b, o, UInt32(v >> 32)); put32(&b, o + 4, UInt32(v & 0xffff_ffff)) }
