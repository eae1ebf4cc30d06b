import Foundation
import Image
import XCTest
@testable import VHD

/// Export layouts and import decoders against a model disk: what a layout produces, fed
/// back in pieces of every size, must decode to the same disk.
final class StreamTests: XCTestCase {
    let mib = 1 << 20

    /// A disk of `size` bytes with `blocks` (2 MiB) filled with a pattern, the rest zeros.
    func model(size: Int, blocks: [Int], seed: UInt64 = 7) -> [UInt8] {
        var rng = SplitMix(seed)
        var d = [UInt8](repeating: 0, count: size)
        for b in blocks {
            for i in (b * 2 * mib)..<min(size, (b + 1) * 2 * mib) { d[i] = UInt8(truncatingIfNeeded: rng.next()) }
        }
        return d
    }

    /// The stream's bytes, produced piece by piece from `layout` over `disk`.
    func render(_ layout: any StreamLayout, disk: [UInt8], from: UInt64 = 0, count: UInt64? = nil) -> [UInt8] {
        var out: [UInt8] = []
        for p in layout.pieces(offset: from, length: count ?? layout.length - from) {
            switch p {
            case .bytes(let b): out += b
            case .zeros(let n): out += [UInt8](repeating: 0, count: n)
            case .disk(let o, let n): out += disk[Int(o)..<(Int(o) + n)]
            }
        }
        return out
    }

    /// Decodes `stream` fed in pieces from `split`; returns the disk it describes over `base`.
    func decode(_ stream: [UInt8], into base: [UInt8], decoder: inout any StreamDecoder, split: inout SplitMix,
                maxPiece: Int) throws -> (disk: [UInt8], replaces: Bool, size: UInt64?) {
        var disk = base
        var replaced = false
        var size: UInt64?
        var written: [Range<Int>] = []
        let sink: (StreamEvent) throws -> Void = { e in
            switch e {
            case .header(let v, let r):
                size = v
                replaced = r
            case .data(let o, let b):
                written.append(Int(o)..<(Int(o) + b.count))
                for (i, x) in b.enumerated() { disk[Int(o) + i] = x }
            }
        }
        var at = 0
        while at < stream.count {
            let n = min(stream.count - at, 1 + Int(split.next() % UInt64(maxPiece)))
            try stream[at..<(at + n)].withUnsafeBytes { try decoder.feed($0, sink) }
            at += n
        }
        try decoder.finish(sink)
        if replaced {
            // What the stream did not hold reads as zeros.
            var keep = [Bool](repeating: false, count: disk.count)
            for r in written { for i in r { keep[i] = true } }
            for i in disk.indices where !keep[i] { disk[i] = 0 }
        }
        return (disk, replaced, size)
    }

    func testDynamicExportRoundTripsInPiecesOfAnySize() throws {
        let size = 9 * mib + 512  // a partial last block
        let blocks = [0, 2, 4]
        let disk = model(size: size, blocks: blocks)
        let layout = VHDExportLayout(virtualSize: UInt64(size), blocks: [4, 0, 2], uniqueID: UUID(), timeStamp: 1234)
        let stream = render(layout, disk: disk)
        XCTAssertEqual(UInt64(stream.count), layout.length)
        XCTAssertEqual(stream.count, 512 + 1024 + 512 + 3 * (512 + 2 * mib) + 512)
        var split = SplitMix(1)
        for maxPiece in [1 << 20, 4096, 777] {
            var d: any StreamDecoder = VHDDecoder()
            let out = try decode(stream, into: [UInt8](repeating: 0xAA, count: size), decoder: &d, split: &split, maxPiece: maxPiece)
            XCTAssertTrue(out.replaces)
            XCTAssertEqual(out.size, UInt64(size))
            XCTAssertTrue(out.disk == disk, "piece size up to \(maxPiece)")
        }
    }

    func testAnyRangeOfALayoutIsTheSameBytesAsTheWhole() {
        let size = 6 * mib
        let disk = model(size: size, blocks: [1, 2])
        let layout = VHDExportLayout(virtualSize: UInt64(size), blocks: [1, 2], uniqueID: UUID(), timeStamp: 99)
        let whole = render(layout, disk: disk)
        var rng = SplitMix(3)
        for _ in 0..<200 {
            let a = rng.next() % layout.length
            let n = rng.next() % (layout.length - a + 1)
            XCTAssertEqual(render(layout, disk: disk, from: a, count: n), Array(whole[Int(a)..<Int(a + n)]), "range \(a)+\(n)")
        }
        XCTAssertEqual(render(layout, disk: disk, from: layout.length, count: 10), [])
    }

    func testTheSameIdentityGivesTheSameBytes() {
        let id = UUID()
        let a = VHDExportLayout(virtualSize: 4 << 20, blocks: [1], uniqueID: id, timeStamp: 5)
        let b = VHDExportLayout(virtualSize: 4 << 20, blocks: [1], uniqueID: id, timeStamp: 5)
        let disk = model(size: 4 << 20, blocks: [1])
        XCTAssertEqual(render(a, disk: disk), render(b, disk: disk))
    }

    func testADifferencingExportIsADeltaOfItsBlocksOnly() throws {
        let size = 8 * mib
        let disk = model(size: size, blocks: [1, 3], seed: 11)
        let layout = VHDExportLayout(virtualSize: UInt64(size), blocks: [3], uniqueID: UUID(), timeStamp: 1,
                                     parent: (UUID(), 2))
        let stream = render(layout, disk: disk)
        let old = model(size: size, blocks: [0, 1, 2, 3], seed: 12)
        var d: any StreamDecoder = VHDDecoder()
        var split = SplitMix(5)
        let out = try decode(stream, into: old, decoder: &d, split: &split, maxPiece: 65536)
        XCTAssertFalse(out.replaces)
        var expected = old
        expected.replaceSubrange((6 * mib)..<(8 * mib), with: disk[(6 * mib)..<(8 * mib)])
        XCTAssertTrue(out.disk == expected)
    }

    func testOnlyTheSectorsABitmapMarksAreReported() throws {
        // A differencing block with sectors 0..<8 present and junk in the rest.
        let size = 2 * mib
        let layout = VHDExportLayout(virtualSize: UInt64(size), blocks: [0], uniqueID: UUID(), timeStamp: 1, parent: (UUID(), 2))
        var stream = render(layout, disk: [UInt8](repeating: 0x55, count: size))
        let bitmapAt = 512 + 1024 + 512
        for i in 0..<512 { stream[bitmapAt + i] = 0 }
        stream[bitmapAt] = 0xFF
        var d: any StreamDecoder = VHDDecoder()
        var split = SplitMix(9)
        let out = try decode(stream, into: [UInt8](repeating: 1, count: size), decoder: &d, split: &split, maxPiece: 1000)
        XCTAssertEqual(Array(out.disk[0..<4096]), [UInt8](repeating: 0x55, count: 4096))
        XCTAssertEqual(Array(out.disk[4096...]), [UInt8](repeating: 1, count: size - 4096))
    }

    func testEveryCutOfAStreamIsRefused() {
        let size = 4 * mib
        let disk = model(size: size, blocks: [1])
        let layout = VHDExportLayout(virtualSize: UInt64(size), blocks: [1], uniqueID: UUID(), timeStamp: 1)
        let stream = render(layout, disk: disk)
        var rng = SplitMix(17)
        var cuts = [0, 1, 511, 512, 1000, 1536, 2048, 2560, stream.count - 512, stream.count - 1]
        for _ in 0..<20 { cuts.append(Int(rng.next() % UInt64(stream.count))) }
        for cut in cuts {
            var d = VHDDecoder()
            XCTAssertThrowsError(try {
                try stream[0..<cut].withUnsafeBytes { try d.feed($0) { _ in } }
                try d.finish { _ in }
            }(), "a stream cut at \(cut) of \(stream.count) was accepted")
        }
    }

    func testAFixedVHDIsItsDataThenItsFooter() throws {
        let size = 3 * mib
        let disk = model(size: size, blocks: [0, 1])
        let footer = Footer(diskType: .fixed, currentSize: UInt64(size), uniqueID: uuidBytes(UUID()), timeStamp: 1, dataOffset: .max)
        let stream = disk + footer.serialize()
        var d: any StreamDecoder = VHDDecoder()
        var split = SplitMix(21)
        let out = try decode(stream, into: [UInt8](repeating: 9, count: size), decoder: &d, split: &split, maxPiece: 300_000)
        XCTAssertTrue(out.replaces)
        XCTAssertTrue(out.disk == disk)
        // Raw bytes are not a VHD.
        var e = VHDDecoder()
        XCTAssertThrowsError(try {
            try disk.withUnsafeBytes { try e.feed($0) { _ in } }
            try e.finish { _ in }
        }()) { XCTAssertTrue("\($0)".contains("not a VHD"), "\($0)") }
        // A footer whose size disagrees with the data.
        var wrong = Footer(diskType: .fixed, currentSize: UInt64(size + 512), uniqueID: uuidBytes(UUID()), timeStamp: 1, dataOffset: .max)
        wrong.creatorHostOS = Array("Wi2k".utf8)
        var f = VHDDecoder()
        XCTAssertThrowsError(try {
            try (disk + wrong.serialize()).withUnsafeBytes { try f.feed($0) { _ in } }
            try f.finish { _ in }
        }())
    }

    func testXapiChunkedFramingAppliesItsChunksOnly() throws {
        func frame(_ off: UInt64, _ data: [UInt8]) -> [UInt8] {
            var h = [UInt8](repeating: 0, count: 12)
            for k in 0..<8 { h[k] = UInt8(truncatingIfNeeded: off >> (8 * k)) }
            for k in 0..<4 { h[8 + k] = UInt8(truncatingIfNeeded: UInt32(data.count) >> (8 * k)) }
            return h + data
        }
        let stream = frame(4096, [1, 2, 3]) + frame(10, [9]) + frame(0, [])  + frame(0, [7, 7])
        // {0, 0} ends it; the empty chunk above has offset 0 and length 0, so it ends there:
        // the chunk after it is refused.
        var d: any StreamDecoder = XapiChunkedDecoder()
        var split = SplitMix(2)
        XCTAssertThrowsError(try decode(stream, into: [UInt8](repeating: 0, count: 8192), decoder: &d, split: &split, maxPiece: 5))
        let good = frame(4096, [1, 2, 3]) + frame(10, [9]) + frame(0, [])
        var g: any StreamDecoder = XapiChunkedDecoder()
        let out = try decode(good, into: [UInt8](repeating: 5, count: 8192), decoder: &g, split: &split, maxPiece: 5)
        XCTAssertFalse(out.replaces)
        var expected = [UInt8](repeating: 5, count: 8192)
        expected[4096] = 1; expected[4097] = 2; expected[4098] = 3; expected[10] = 9
        XCTAssertEqual(out.disk, expected)
        var cut: any StreamDecoder = XapiChunkedDecoder()
        XCTAssertThrowsError(try decode(Array(good.dropLast(12)), into: expected, decoder: &cut, split: &split, maxPiece: 7))
    }
}

struct SplitMix {
    var state: UInt64
    init(_ seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
