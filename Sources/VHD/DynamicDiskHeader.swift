import Foundation
import NIOCore

/// One of the eight `Parent Locator Entries` of the dynamic disk header.
public struct ParentLocatorEntry: Equatable, Sendable {
    public static let size = 24
    /// `Platform Code`
    public struct PlatformCode: RawRepresentable, Equatable, Sendable, CustomStringConvertible {
        public var rawValue: UInt32
        public init(rawValue: UInt32) { self.rawValue = rawValue }
        /// `None`
        public static let none = PlatformCode(rawValue: 0)
        /// `W2ru`: relative Windows path, UTF-16LE.
        public static let w2ru = PlatformCode(rawValue: 0x5732_7275)
        /// `W2ku`: absolute Windows path, UTF-16LE.
        public static let w2ku = PlatformCode(rawValue: 0x5732_6B75)
        /// `MacX`: a file URL, UTF-8 (what blktap writes).
        public static let macX = PlatformCode(rawValue: 0x4D61_6358)
        public var description: String {
            let b = withUnsafeBytes(of: rawValue.bigEndian) { Array($0) }
            return b.allSatisfy({ $0 >= 0x20 && $0 < 0x7f }) ? String(decoding: b, as: UTF8.self) : "0x\(String(rawValue, radix: 16))"
        }
    }

    public var platformCode: PlatformCode
    /// `Platform Data Space`: spec says sectors; Windows and blktap write bytes. Readers accept both.
    public var platformDataSpace: UInt32
    /// `Platform Data Length` in bytes.
    public var platformDataLength: UInt32
    /// `Platform Data Offset`: absolute file offset of the locator data.
    public var platformDataOffset: UInt64

    public init(platformCode: PlatformCode, platformDataSpace: UInt32, platformDataLength: UInt32, platformDataOffset: UInt64) {
        self.platformCode = platformCode
        self.platformDataSpace = platformDataSpace
        self.platformDataLength = platformDataLength
        self.platformDataOffset = platformDataOffset
    }

    static let empty = ParentLocatorEntry(platformCode: .none, platformDataSpace: 0, platformDataLength: 0, platformDataOffset: 0)

    /// Decodes the locator's data into a path, per its platform code.
    public func decodePath(_ data: [UInt8]) -> String? {
        switch platformCode {
        case .macX:
            var s = String(decoding: data.prefix { $0 != 0 }, as: UTF8.self)
            if s.hasPrefix("file://") { s.removeFirst(7) }
            return s.isEmpty ? nil : s
        case .w2ru, .w2ku:
            var units: [UInt16] = []
            var i = 0
            while i + 1 < data.count {
                let u = UInt16(data[i]) | UInt16(data[i + 1]) << 8
                if u == 0 { break }
                // Windows separators as "/" (0x5C is "\\").
                units.append(u == 0x5C ? 0x2F : u)
                i += 2
            }
            let s = String(decoding: units, as: UTF16.self)
            return s.isEmpty ? nil : s
        default:
            return nil
        }
    }
}

/// The 1024-byte dynamic disk header (`cxsparse`).
public struct DynamicDiskHeader: Equatable, Sendable {
    public static let size = 1024
    /// `cxsparse`
    public static let cookieBytes: [UInt8] = Array("cxsparse".utf8)
    static let checksumOffset = 36
    /// The block size blktap and Hyper-V use: 2 MiB.
    public static let defaultBlockSize: UInt32 = 2 * 1024 * 1024

    /// `Data Offset`: unused, all ones.
    public var dataOffset: UInt64 = .max
    /// `Table Offset`: the BAT's absolute offset.
    public var tableOffset: UInt64
    /// `Header Version`
    public var headerVersion: UInt32 = 0x0001_0000
    /// `Max Table Entries`
    public var maxTableEntries: UInt32
    /// `Block Size` in bytes (data only, not the sector bitmap).
    public var blockSize: UInt32
    /// `Parent Unique ID`
    public var parentUniqueID: [UInt8] = [UInt8](repeating: 0, count: 16)
    /// `Parent Time Stamp`
    public var parentTimeStamp: UInt32 = 0
    /// `Parent Unicode Name`, UTF-16 big-endian in the file.
    public var parentUnicodeName: String = ""
    /// `Parent Locator Entries`
    public var parentLocatorEntries: [ParentLocatorEntry] = Array(repeating: .empty, count: 8)

    public var checksumMismatch: (stored: UInt32, computed: UInt32)? = nil

    public static func == (a: DynamicDiskHeader, b: DynamicDiskHeader) -> Bool { a.serialize() == b.serialize() }

    public init(tableOffset: UInt64, maxTableEntries: UInt32, blockSize: UInt32) {
        self.tableOffset = tableOffset
        self.maxTableEntries = maxTableEntries
        self.blockSize = blockSize
    }

    public static func parse(_ bytes: [UInt8], policy: ChecksumPolicy = .strict) throws(VHDError) -> DynamicDiskHeader {
        guard bytes.count >= size else { throw .truncated(needed: UInt64(size), fileLength: UInt64(bytes.count)) }
        var buf = ByteBuffer(bytes: bytes[0..<size])
        let cookie = buf.readBytes(length: 8)!
        guard cookie == cookieBytes else { throw .badCookie(structure: "dynamic disk header", found: cookie) }
        let stored = buf.getInteger(at: checksumOffset, as: UInt32.self)!
        let computed = vhdChecksum(Array(bytes[0..<size]), checksumOffset: checksumOffset)
        var mismatch: (UInt32, UInt32)? = nil
        if stored != computed {
            if policy == .strict {
                throw .badChecksum(structure: "dynamic disk header", expected: computed, found: stored)
            }
            mismatch = (stored, computed)
        }
        let dataOffset = buf.readInteger(as: UInt64.self)!
        let tableOffset = buf.readInteger(as: UInt64.self)!
        let version = buf.readInteger(as: UInt32.self)!
        guard version == 0x0001_0000 else { throw .unsupportedVersion(structure: "dynamic disk header", version: version) }
        let maxEntries = buf.readInteger(as: UInt32.self)!
        let blockSize = buf.readInteger(as: UInt32.self)!
        guard blockSize >= 512, blockSize <= 256 * 1024 * 1024, blockSize & (blockSize - 1) == 0 else {
            throw .invalidField(structure: "dynamic disk header", field: "blockSize", value: UInt64(blockSize),
                                reason: "must be a power of two between 512 bytes and 256 MiB")
        }
        _ = buf.readInteger(as: UInt32.self)
        var h = DynamicDiskHeader(tableOffset: tableOffset, maxTableEntries: maxEntries, blockSize: blockSize)
        h.dataOffset = dataOffset
        h.headerVersion = version
        h.parentUniqueID = buf.readBytes(length: 16)!
        h.parentTimeStamp = buf.readInteger(as: UInt32.self)!
        _ = buf.readInteger(as: UInt32.self)
        let nameBytes = buf.readBytes(length: 512)!
        var units: [UInt16] = []
        for i in stride(from: 0, to: 512, by: 2) {
            let u = UInt16(nameBytes[i]) << 8 | UInt16(nameBytes[i + 1])
            if u == 0 { break }
            units.append(u)
        }
        h.parentUnicodeName = String(decoding: units, as: UTF16.self)
        var locs: [ParentLocatorEntry] = []
        for _ in 0..<8 {
            let code = buf.readInteger(as: UInt32.self)!
            let space = buf.readInteger(as: UInt32.self)!
            let length = buf.readInteger(as: UInt32.self)!
            _ = buf.readInteger(as: UInt32.self)
            let offset = buf.readInteger(as: UInt64.self)!
            locs.append(ParentLocatorEntry(platformCode: .init(rawValue: code), platformDataSpace: space,
                                           platformDataLength: length, platformDataOffset: offset))
        }
        h.parentLocatorEntries = locs
        h.checksumMismatch = mismatch
        return h
    }

    public func serialize() -> [UInt8] {
        var buf = ByteBuffer()
        buf.reserveCapacity(DynamicDiskHeader.size)
        buf.writeBytes(DynamicDiskHeader.cookieBytes)
        buf.writeInteger(dataOffset)
        buf.writeInteger(tableOffset)
        buf.writeInteger(headerVersion)
        buf.writeInteger(maxTableEntries)
        buf.writeInteger(blockSize)
        buf.writeInteger(UInt32(0))
        buf.writeBytes(padded(parentUniqueID, 16))
        buf.writeInteger(parentTimeStamp)
        buf.writeInteger(UInt32(0))
        var name = [UInt8]()
        for u in parentUnicodeName.utf16.prefix(256) { name.append(UInt8(u >> 8)); name.append(UInt8(u & 0xff)) }
        buf.writeBytes(padded(name, 512))
        for i in 0..<8 {
            let l = i < parentLocatorEntries.count ? parentLocatorEntries[i] : .empty
            buf.writeInteger(l.platformCode.rawValue)
            buf.writeInteger(l.platformDataSpace)
            buf.writeInteger(l.platformDataLength)
            buf.writeInteger(UInt32(0))
            buf.writeInteger(l.platformDataOffset)
        }
        buf.writeRepeatingByte(0, count: DynamicDiskHeader.size - buf.readableBytes)
        var bytes = buf.readBytes(length: DynamicDiskHeader.size)!
        let sum = vhdChecksum(bytes, checksumOffset: DynamicDiskHeader.checksumOffset)
        withUnsafeBytes(of: sum.bigEndian) { raw in
            for i in 0..<4 { bytes[DynamicDiskHeader.checksumOffset + i] = raw[i] }
        }
        return bytes
    }

    /// Sectors of the sector bitmap in front of each block (padded to a whole sector).
    public var bitmapSectors: Int { (Int(blockSize) / 512 / 8 + 511) / 512 }
    public var bitmapBytes: Int { bitmapSectors * 512 }
}

/// `Block Allocation Table`: big-endian u32 sector offsets, all ones for unallocated.
public struct BlockAllocationTable: Equatable, Sendable {
    public static let unallocated: UInt32 = 0xFFFF_FFFF
    public var entries: [UInt32]

    public init(count: Int) { entries = Array(repeating: Self.unallocated, count: count) }

    /// Bytes the table occupies on disk, padded to a sector.
    public static func byteLength(entries: Int) -> Int { (entries * 4 + 511) / 512 * 512 }

    public static func parse(_ bytes: [UInt8], count: Int) throws(VHDError) -> BlockAllocationTable {
        guard bytes.count >= count * 4 else {
            throw .truncated(needed: UInt64(count * 4), fileLength: UInt64(bytes.count))
        }
        var t = BlockAllocationTable(count: 0)
        t.entries = bytes.withUnsafeBytes { raw in
            [UInt32](unsafeUninitializedCapacity: count) { out, n in
                for i in 0..<count { out[i] = UInt32(bigEndian: raw.loadUnaligned(fromByteOffset: i * 4, as: UInt32.self)) }
                n = count
            }
        }
        return t
    }

    /// Calls `body` with each allocated entry of the big-endian table in `raw`, in order.
    /// A 4 KiB stretch that is all ones (1024 unallocated entries) is passed over with one
    /// `memcmp`: a mostly empty table of a 2040 GiB disk costs a few microseconds, not a
    /// walk of a million entries.
    static func forEachAllocated(_ raw: UnsafeRawBufferPointer, count: Int,
                                 _ body: (Int, UInt32) throws(VHDError) -> Void) throws(VHDError) {
        let stride = allOnes.count / 4
        var first = 0
        while first < count {
            let n = min(stride, count - first)
            let empty = allOnes.withUnsafeBytes { ones in memcmp(raw.baseAddress! + first * 4, ones.baseAddress!, n * 4) == 0 }
            if !empty {
                for k in first..<(first + n) {
                    let e = UInt32(bigEndian: raw.loadUnaligned(fromByteOffset: k * 4, as: UInt32.self))
                    if e != unallocated { try body(k, e) }
                }
            }
            first += n
        }
    }

    private static let allOnes = [UInt8](repeating: 0xFF, count: 4096)

    public func serialize() -> [UInt8] { encode(entries[...], paddedTo: Self.byteLength(entries: entries.count)) }

    /// The one sector of the table that holds `blockIndex`'s entry, and its bytes.
    public func sectorContaining(blockIndex: Int) -> (sectorIndex: Int, bytes: [UInt8]) {
        let sector = blockIndex * 4 / 512
        let first = sector * 128
        return (sector, encode(entries[first..<min(first + 128, entries.count)], paddedTo: 512))
    }

    /// Big-endian entries, padded with unallocated (all ones) bytes.
    func encode(_ slice: ArraySlice<UInt32>, paddedTo length: Int) -> [UInt8] {
        var buf = ByteBuffer()
        buf.reserveCapacity(length)
        for e in slice { buf.writeInteger(e) }
        buf.writeRepeatingByte(0xFF, count: length - buf.readableBytes)
        return buf.readBytes(length: length)!
    }
}

/// The sector bitmap in front of a block: bit set means the sector is present in this
/// disk. VHD spec: MSB of byte 0 is sector 0.
public struct SectorBitmap: Equatable, Sendable {
    public var bytes: [UInt8]
    public let sectors: Int

    public init(bytes: [UInt8], sectors: Int) {
        self.bytes = bytes
        self.sectors = sectors
    }

    public static func full(sectors: Int, paddedBytes: Int) -> SectorBitmap {
        var b = [UInt8](repeating: 0, count: paddedBytes)
        for i in 0..<(sectors / 8) { b[i] = 0xFF }
        if sectors % 8 != 0 { b[sectors / 8] = UInt8(0xFF << (8 - sectors % 8) & 0xFF) }
        return SectorBitmap(bytes: b, sectors: sectors)
    }

    @inline(__always) public func isSet(_ sector: Int) -> Bool { bytes[sector >> 3] & (0x80 >> UInt8(sector & 7)) != 0 }

    public mutating func set(_ range: Range<Int>) {
        for s in range { bytes[s >> 3] |= (0x80 >> UInt8(s & 7)) }
    }

    public var isFull: Bool {
        for i in 0..<(sectors / 8) where bytes[i] != 0xFF { return false }
        for s in (sectors / 8 * 8)..<sectors where !isSet(s) { return false }
        return true
    }

    /// Runs of equal bits within `range`: (present, subrange).
    public func runs(in range: Range<Int>) -> [(Bool, Range<Int>)] {
        var out: [(Bool, Range<Int>)] = []
        var start = range.lowerBound
        guard start < range.upperBound else { return out }
        var cur = isSet(start)
        var s = start + 1
        while s < range.upperBound {
            // Skip whole bytes quickly when aligned.
            if s & 7 == 0, s + 8 <= range.upperBound {
                let b = bytes[s >> 3]
                if (cur && b == 0xFF) || (!cur && b == 0) { s += 8; continue }
            }
            let v = isSet(s)
            if v != cur { out.append((cur, start..<s)); start = s; cur = v }
            s += 1
        }
        out.append((cur, start..<range.upperBound))
        return out
    }
}
