// VHD as a stream (seed 000): the layout of an exported dynamic or differencing VHD, and a
// forward-only decoder of one being imported. See the design notes in Image/Stream.swift.

import Foundation
import Image

/// An exported VHD: footer copy, header at 512, BAT at 1536, then each present block
/// (its full sector bitmap and 2 MiB of data) in disk order, then the footer. Only the
/// blocks given are in the file. A differencing export names its parent by unique id and
/// time stamp only (no locator: the seed says its parent need not name any file).
///
/// Everything in it follows from the arguments, so the same disk, blocks, id and time
/// stamp give the same bytes on every request: a range can be served alone.
public struct VHDExportLayout: StreamLayout {
    public let virtualSize: UInt64
    public let blockSize: UInt64
    /// Present blocks, ascending.
    public let blocks: [Int]
    let metadata: [UInt8]
    let footer: [UInt8]
    let bitmap: [UInt8]
    public let length: UInt64

    public init(virtualSize: UInt64, blocks: [Int], uniqueID: UUID, timeStamp: UInt32,
                parent: (uniqueID: UUID, timeStamp: UInt32)? = nil) {
        let bs = DynamicDiskHeader.defaultBlockSize
        self.virtualSize = virtualSize
        blockSize = UInt64(bs)
        self.blocks = blocks.sorted()
        let entries = Int((virtualSize + UInt64(bs) - 1) / UInt64(bs))
        var f = Footer(diskType: parent == nil ? .dynamic : .differencing, currentSize: virtualSize,
                       uniqueID: uuidBytes(uniqueID), timeStamp: timeStamp, dataOffset: 512)
        f.creatorHostOS = Array("Wi2k".utf8)
        var h = DynamicDiskHeader(tableOffset: 1536, maxTableEntries: UInt32(entries), blockSize: bs)
        if let p = parent {
            h.parentUniqueID = uuidBytes(p.uniqueID)
            h.parentTimeStamp = p.timeStamp
        }
        bitmap = SectorBitmap.full(sectors: Int(bs) / 512, paddedBytes: h.bitmapBytes).bytes
        var bat = BlockAllocationTable(count: entries)
        let batBytes = BlockAllocationTable.byteLength(entries: entries)
        let first = UInt64(1536 + batBytes)
        let span = UInt64(bitmap.count) + UInt64(bs)
        for (k, b) in self.blocks.enumerated() { bat.entries[b] = UInt32((first + UInt64(k) * span) / 512) }
        footer = f.serialize()
        metadata = footer + h.serialize() + bat.serialize()
        length = first + UInt64(self.blocks.count) * span + 512
    }

    var span: UInt64 { UInt64(bitmap.count) + blockSize }

    public func pieces(offset: UInt64, length n: UInt64) -> [StreamPiece] {
        let end = min(length, offset &+ n)
        var out: [StreamPiece] = []
        var pos = offset
        let meta = UInt64(metadata.count), tail = length - 512
        func bytes(_ b: [UInt8], from start: UInt64) {
            let lo = Int(pos - start), hi = Int(min(end - start, UInt64(b.count)))
            out.append(.bytes(Array(b[lo..<hi])))
            pos = start + UInt64(hi)
        }
        while pos < end {
            if pos < meta {
                bytes(metadata, from: 0)
            } else if pos >= tail {
                bytes(footer, from: tail)
            } else {
                let k = Int((pos - meta) / span)
                let start = meta + UInt64(k) * span
                let dataStart = start + UInt64(bitmap.count)
                if pos < dataStart {
                    bytes(bitmap, from: start)
                    continue
                }
                let diskBase = UInt64(blocks[k]) * blockSize
                let lo = pos - dataStart, hi = min(end - dataStart, blockSize)
                let inDisk = virtualSize > diskBase ? min(virtualSize - diskBase, blockSize) : 0
                if lo < inDisk {
                    let c = min(hi, inDisk) - lo
                    out.append(.disk(offset: diskBase + lo, count: Int(c)))
                    pos += c
                }
                if pos < dataStart + hi {
                    let c = dataStart + hi - pos
                    out.append(.zeros(count: Int(c)))
                    pos += c
                }
            }
        }
        return out
    }
}

/// Decodes a VHD pushed in as a stream: fixed, dynamic or differencing. A dynamic or
/// differencing VHD must be laid out as every tool writes one (header and BAT before the
/// blocks); blocks may come in any order of the file, are read in file order, and only
/// the sectors their bitmaps mark are reported. A fixed VHD is data then a footer: the
/// last 512 bytes seen are held back until the stream ends, then checked as its footer.
public struct VHDDecoder: StreamDecoder {
    enum Phase {
        case start, fixed, header, table, bitmap, data, tail
    }

    var phase = Phase.start
    public private(set) var consumed: UInt64 = 0
    public private(set) var footer: Footer?
    public private(set) var header: DynamicDiskHeader?
    /// The structure being collected, and where the next one starts.
    var collect: [UInt8] = []
    var wantAt: UInt64 = 0
    var wantCount = 512
    /// Present blocks in file order: (file offset of the bitmap, block index).
    var regions: [(start: UInt64, block: Int)] = []
    var next = 0
    var blockBitmap = SectorBitmap(bytes: [], sectors: 0)
    /// Fixed disks: data bytes reported so far; the held-back tail.
    var fixedData: UInt64 = 0
    var held: [UInt8] = []

    public init() {}

    public var replaces: Bool { footer?.diskType != .differencing }

    public mutating func feed(_ bytes: UnsafeRawBufferPointer, _ sink: (StreamEvent) throws -> Void) throws {
        var i = 0
        while i < bytes.count {
            let pos = consumed + UInt64(i)
            switch phase {
            case .fixed:
                try feedFixed(UnsafeRawBufferPointer(rebasing: bytes[i...]), sink)
                i = bytes.count
            case .tail:
                // The footer is the last 512 bytes; keep a rolling copy.
                let rest = bytes.count - i
                if rest >= 512 { held = Array(bytes[(bytes.count - 512)...]) } else {
                    held = Array((held + bytes[i...]).suffix(512))
                }
                i = bytes.count
            case .data:
                let r = regions[next - 1]
                let dataStart = r.start + UInt64(blockBitmap.bytes.count)
                let blockSize = UInt64(header!.blockSize)
                let end = dataStart + blockSize
                let n = Int(min(UInt64(bytes.count - i), end - pos))
                try report(block: r.block, at: pos - dataStart, UnsafeRawBufferPointer(rebasing: bytes[i..<(i + n)]), sink)
                i += n
                if pos + UInt64(n) == end { try advanceToNextBlock(after: end) }
            default:
                if pos < wantAt {
                    i += Int(min(UInt64(bytes.count - i), wantAt - pos))
                    continue
                }
                let n = min(wantCount - collect.count, bytes.count - i)
                collect += bytes[i..<(i + n)]
                i += n
                // A fixed disk's first 512 bytes go back to `held` as data (see `collected`).
                if collect.count == wantCount { try collected(sink) }
            }
        }
        consumed += UInt64(bytes.count)
    }

    /// A whole structure is in `collect`.
    mutating func collected(_ sink: (StreamEvent) throws -> Void) throws {
        let b = collect
        collect = []
        switch phase {
        case .start:
            let f: Footer
            // Checksums that are off are tolerated, as in files opened in an SR (qemu once wrote
            // them so); the structures must be valid.
            do { f = try Footer.parse(b, policy: .tolerate) } catch {
                phase = .fixed
                held = b
                try sink(.header(virtualSize: nil, replaces: true))
                return
            }
            if f.diskType == .fixed {
                phase = .fixed
                held = b
                try sink(.header(virtualSize: nil, replaces: true))
                return
            }
            footer = f
            guard f.dataOffset >= 512, f.dataOffset < UInt64.max - 1024 else {
                throw StreamError.invalid("footer: the header offset \(f.dataOffset) is not after the footer copy")
            }
            try sink(.header(virtualSize: f.currentSize, replaces: f.diskType != .differencing))
            phase = .header
            wantAt = f.dataOffset
            wantCount = DynamicDiskHeader.size
        case .header:
            let h: DynamicDiskHeader
            do { h = try DynamicDiskHeader.parse(b, policy: .tolerate) } catch { throw StreamError.invalid("dynamic disk header: \(error)") }
            let f = footer!
            guard UInt64(h.maxTableEntries) * UInt64(h.blockSize) >= f.currentSize else {
                throw StreamError.invalid("the BAT's \(h.maxTableEntries) entries of \(h.blockSize) bytes do not cover the disk's \(f.currentSize) bytes")
            }
            guard h.maxTableEntries <= 1 << 24 else { throw StreamError.invalid("a BAT of \(h.maxTableEntries) entries is too large") }
            guard h.tableOffset >= wantAt + 1024 else {
                throw StreamError.invalid("the BAT (at \(h.tableOffset)) comes before the end of the header: a stream reads forward only")
            }
            header = h
            phase = .table
            wantAt = h.tableOffset
            wantCount = BlockAllocationTable.byteLength(entries: Int(h.maxTableEntries))
        case .table:
            let h = header!
            let entries = Int(h.maxTableEntries)
            let bat: BlockAllocationTable
            do { bat = try BlockAllocationTable.parse(b, count: entries) } catch { throw StreamError.invalid("BAT: \(error)") }
            let needed = Int((footer!.currentSize + UInt64(h.blockSize) - 1) / UInt64(h.blockSize))
            regions = bat.entries.enumerated().compactMap { k, e in
                e == BlockAllocationTable.unallocated || k >= needed ? nil : (UInt64(e) * 512, k)
            }.sorted { $0.start < $1.start }
            let span = UInt64(h.bitmapBytes) + UInt64(h.blockSize)
            var floor = h.tableOffset + UInt64(b.count)
            for r in regions {
                guard r.start >= floor else {
                    throw StreamError.invalid("block \(r.block) at \(r.start) overlaps the BAT or another block")
                }
                floor = r.start + span
            }
            try advanceToNextBlock(after: h.tableOffset + UInt64(b.count))
        case .bitmap:
            let h = header!
            blockBitmap = SectorBitmap(bytes: b, sectors: Int(h.blockSize) / 512)
            phase = .data
        default:
            break
        }
    }

    mutating func advanceToNextBlock(after: UInt64) throws {
        if next < regions.count {
            wantAt = regions[next].start
            wantCount = header!.bitmapBytes
            next += 1
            phase = .bitmap
        } else {
            phase = .tail
            held = []
        }
    }

    /// Data of `block` at `offset` within it: the sectors its bitmap marks.
    func report(block: Int, at offset: UInt64, _ d: UnsafeRawBufferPointer, _ sink: (StreamEvent) throws -> Void) throws {
        let bs = UInt64(header!.blockSize)
        let base = UInt64(block) * bs
        let size = footer!.currentSize
        let limit = size > base + offset ? Int(min(UInt64(d.count), size - base - offset)) : 0
        guard limit > 0 else { return }
        let lo = Int(offset), hi = lo + limit
        for (present, sectors) in blockBitmap.runs(in: (lo / 512)..<((hi + 511) / 512)) where present {
            let a = max(lo, sectors.lowerBound * 512), z = min(hi, sectors.upperBound * 512)
            try sink(.data(offset: base + UInt64(a), bytes: UnsafeRawBufferPointer(rebasing: d[(a - lo)..<(z - lo)])))
        }
    }

    /// Fixed disks: reports all but the last 512 bytes seen.
    mutating func feedFixed(_ d: UnsafeRawBufferPointer, _ sink: (StreamEvent) throws -> Void) throws {
        let total = held.count + d.count
        guard total > 512 else {
            held += d
            return
        }
        var emit = total - 512
        let fromHeld = min(held.count, emit)
        if fromHeld > 0 {
            try held.withUnsafeBytes { try sink(.data(offset: fixedData, bytes: UnsafeRawBufferPointer(rebasing: $0[0..<fromHeld]))) }
            fixedData += UInt64(fromHeld)
            emit -= fromHeld
        }
        if emit > 0 {
            try sink(.data(offset: fixedData, bytes: UnsafeRawBufferPointer(rebasing: d[0..<emit])))
            fixedData += UInt64(emit)
        }
        held = Array(held[fromHeld...]) + d[emit...]
    }

    public mutating func finish(_ sink: (StreamEvent) throws -> Void) throws {
        switch phase {
        case .start:
            throw StreamError.truncated("\(collect.count) bytes: not even a footer")
        case .fixed:
            guard held.count == 512, let f = try? Footer.parse(held, policy: .tolerate), f.diskType == .fixed else {
                throw StreamError.invalid("not a VHD: no footer at its start (dynamic or differencing) nor at its end (fixed)")
            }
            guard f.currentSize == fixedData else {
                throw StreamError.invalid("a fixed VHD of \(fixedData) data bytes whose footer says \(f.currentSize)")
            }
            footer = f
        case .tail:
            guard held.count == 512, let f = try? Footer.parse(held, policy: .tolerate) else {
                throw StreamError.truncated("no footer after the last block")
            }
            guard f.uniqueID == footer!.uniqueID, f.currentSize == footer!.currentSize else {
                throw StreamError.invalid("the footer at the end does not match the copy at the start")
            }
        case .header:
            throw StreamError.truncated("no dynamic disk header")
        case .table:
            throw StreamError.truncated("the BAT is incomplete")
        case .bitmap, .data:
            throw StreamError.truncated("block \(regions[next - 1].block) is incomplete (\(regions.count - next) more blocks were due)")
        }
    }
}

/// `format=vhd`.
public struct VHDStreamFormat: StreamFormat {
    public init() {}
    public var name: String { "vhd" }
    public var contentType: String { "application/vhd" }
    public var blockSize: UInt64? { UInt64(DynamicDiskHeader.defaultBlockSize) }
    public var supportsDelta: Bool { true }
    public func layout(virtualSize: UInt64, blocks: [Int], identity: StreamIdentity) -> any StreamLayout {
        VHDExportLayout(virtualSize: virtualSize, blocks: blocks, uniqueID: identity.uniqueID,
                        timeStamp: VHDCreate.timeStamp(identity.timeStamp),
                        parent: identity.parent.map { ($0.uniqueID, VHDCreate.timeStamp($0.timeStamp)) })
    }
    public func decoder() -> any StreamDecoder { VHDDecoder() }
}
