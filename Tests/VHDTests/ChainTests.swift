import Foundation
import XCTest
@testable import VHD

/// Programs in the style of ocaml-vhd's patterns: write at the edges of blocks, snapshot,
/// write again, and compare every read with a flat-array model.
final class ChainTests: TemporaryDirectoryTestCase {
    func pattern(_ n: Int, seed: UInt8) -> [UInt8] { (0..<n).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ Int(seed)) } }

    func testWritesAtBlockEdgesThroughThreeSnapshotsMatchModel() throws {
        let size: UInt64 = 10 << 20
        var model = [UInt8](repeating: 0, count: Int(size))
        let bs = 2 << 20
        var leaf = dir + "/l0.vhd"
        try VHDCreate.createDynamic(path: leaf, size: size)
        let writes: [(Int, Int)] = [(0, 512), (bs - 512, 1024), (bs * 2 + 4096, 70000), (Int(size) - 512, 512), (777, 1000), (bs * 3 - 100, 300)]
        for gen in 0..<4 {
            let c = try VHDChain.open(path: leaf, writable: true)
            for (i, (off, len)) in writes.enumerated() where (i + gen) % 2 == 0 || gen == 0 {
                let p = pattern(len, seed: UInt8(gen * 10 + i))
                try c.write(p, at: UInt64(off))
                model.replaceSubrange(off..<(off + len), with: p)
            }
            try c.flush()
            XCTAssertEqual(try c.read(at: 0, count: Int(size)), model, "generation \(gen)")
            c.close()
            // Snapshot: the leaf becomes the parent of a new leaf.
            let next = dir + "/l\(gen + 1).vhd"
            try VHDCreate.createDifferencing(path: next, parentPath: leaf)
            leaf = next
        }
        let c = try VHDChain.open(path: leaf, writable: false)
        defer { c.close() }
        XCTAssertEqual(c.layers.count, 5)
        XCTAssertEqual(try c.read(at: 0, count: Int(size)), model)
        for i in 0...4 { XCTAssertEqual(VHDCheck.check(path: dir + "/l\(i).vhd"), []) }
    }

    /// A block with a partial sector bitmap (as other tools write): sectors absent from
    /// every layer are holes, sector by sector.
    func testReadWithHolesFindsAbsentSectorsOfAPartialBlock() throws {
        let p = dir + "/partial.vhd"
        try VHDCreate.createDynamic(path: p, size: 4 << 20)
        var c = try VHDChain.open(path: p, writable: true)
        try c.write([UInt8](repeating: 0xAB, count: 2 << 20), at: 0)
        let bitmapAt = UInt64(c.leaf.blockAllocationTable.entries[0]) * 512
        c.close()
        // Sectors 4-7 and 12-15 absent, the rest present.
        let f = try PosixFile(path: p, writable: true)
        try f.write([0xF0, 0xF0] + [UInt8](repeating: 0xFF, count: 510), at: bitmapAt)
        f.close()
        c = try VHDChain.open(path: p, writable: false)
        defer { c.close() }
        var buf = [UInt8](repeating: 0xEE, count: 16384)
        var holes: [Range<Int>] = []
        try buf.withUnsafeMutableBytes { try c.read(into: $0, at: 0, holes: &holes) }
        XCTAssertEqual(holes, [2048..<4096, 6144..<8192])
        XCTAssertEqual(Array(buf[0..<2048]), [UInt8](repeating: 0xAB, count: 2048))
        XCTAssertEqual(Array(buf[2048..<4096]), [UInt8](repeating: 0, count: 2048))
        // Across the block boundary into an unallocated block: one hole to the end.
        holes = []
        var tail = [UInt8](repeating: 0xEE, count: 8192)
        try tail.withUnsafeMutableBytes { try c.read(into: $0, at: (2 << 20) - 4096, holes: &holes) }
        XCTAssertEqual(holes, [4096..<8192])
    }

    func testUnalignedReadsAndWrites() throws {
        let p = dir + "/u.vhd"
        try VHDCreate.createDynamic(path: p, size: 4 << 20)
        let c = try VHDChain.open(path: p, writable: true)
        defer { c.close() }
        try c.write([1, 2, 3], at: 1)
        try c.write([9], at: (2 << 20) - 1)
        XCTAssertEqual(try c.read(at: 0, count: 5), [0, 1, 2, 3, 0])
        XCTAssertEqual(try c.read(at: (2 << 20) - 2, count: 3), [0, 9, 0])
    }

    func testOutOfRangeIsTyped() throws {
        let p = dir + "/r.vhd"
        try VHDCreate.createDynamic(path: p, size: 1 << 20)
        let c = try VHDChain.open(path: p, writable: true)
        defer { c.close() }
        XCTAssertThrowsError(try c.read(at: (1 << 20) - 1, count: 2)) {
            guard case VHDError.outOfRange = $0 else { return XCTFail("\($0)") }
        }
        XCTAssertThrowsError(try c.write([1], at: 1 << 20))
    }

    func testReadOnlyChainRefusesWrites() throws {
        let p = dir + "/ro.vhd"
        try VHDCreate.createDynamic(path: p, size: 1 << 20)
        let c = try VHDChain.open(path: p, writable: false)
        defer { c.close() }
        XCTAssertThrowsError(try c.write([1], at: 0)) {
            guard case VHDError.readOnly = $0 else { return XCTFail("\($0)") }
        }
    }

    func testChainLoopIsDetected() throws {
        // a's parent is b, b's parent is a: make b a child of a, then rewrite a as a child of b.
        let a = dir + "/a.vhd", b = dir + "/b.vhd", tmp = dir + "/t.vhd"
        try VHDCreate.createDynamic(path: a, size: 1 << 20)
        try VHDCreate.createDifferencing(path: b, parentPath: a)
        let aID = try VHDFile.open(path: a, writable: false).uniqueID
        try VHDCreate.createDifferencing(path: tmp, parentPath: b, uniqueID: aID)
        try FileManager.default.removeItem(atPath: a)
        try FileManager.default.moveItem(atPath: tmp, toPath: a)
        XCTAssertThrowsError(try VHDChain.open(path: a, writable: false)) {
            guard case VHDError.chainLoop = $0 else { return XCTFail("\($0)") }
        }
    }

    func testParentWithWrongUniqueIDIsRefused() throws {
        let a = dir + "/pa.vhd", b = dir + "/pb.vhd"
        try VHDCreate.createDynamic(path: a, size: 1 << 20)
        try VHDCreate.createDifferencing(path: b, parentPath: a)
        try FileManager.default.removeItem(atPath: a)
        try VHDCreate.createDynamic(path: a, size: 1 << 20)
        XCTAssertThrowsError(try VHDChain.open(path: b, writable: false)) {
            guard case VHDError.parentMismatch = $0 else { return XCTFail("\($0)") }
        }
    }

    /// Pins the crash-safe order: footer past the new block, then data and bitmap, a
    /// barrier, and only then the BAT sector.
    func testAllocationOrderIsFooterDataBarrierThenBAT() throws {
        let m = newImage(size: 4 << 20)
        let f = try VHDFile(file: m, writable: true)
        let c = try VHDChain(layers: [f])
        m.writeLog = []
        let syncsBefore = m.syncCount
        try c.write([UInt8](repeating: 7, count: 4096), at: 8192)
        let batOffset: UInt64 = 1536
        let start = UInt64(512 + 1024 + 512)
        XCTAssertEqual(m.writeLog.map(\.offset), [start + 512 + (2 << 20), start + 512 + 8192, start, batOffset])
        XCTAssertEqual(m.syncCount, syncsBefore + 1)
        // And the file reopens to the same content.
        let g = try VHDFile(file: m, writable: false)
        XCTAssertEqual(try VHDChain(layers: [g]).read(at: 8192, count: 4096), [UInt8](repeating: 7, count: 4096))
    }

    /// The visibility gate (a change log's sync): for a block being allocated it runs after
    /// the data and the barrier and before the BAT; for space the leaf holds, before the data.
    /// If it fails, nothing of the write is visible.
    func testBeforeVisibleRunsBeforeTheBATOrTheInPlaceDataAndItsFailurePublishesNothing() throws {
        let m = newImage(size: 4 << 20)
        let c = try VHDChain(layers: [try VHDFile(file: m, writable: true)])
        let batOffset: UInt64 = 1536
        m.writeLog = []
        var seen: [(writes: Int, syncs: Int)] = []
        try c.write([UInt8](repeating: 1, count: 4096), at: 8192, beforeVisible: { seen.append((m.writeLog.count, m.syncCount)) })
        XCTAssertEqual(seen.count, 1)
        XCTAssertEqual(seen[0].writes, 3, "footer, data and bitmap written before the gate")
        XCTAssertEqual(m.writeLog.last?.offset, batOffset, "the BAT after it")
        m.writeLog = []
        try c.write([UInt8](repeating: 2, count: 512), at: 0, beforeVisible: { XCTAssertEqual(m.writeLog.count, 0) })
        XCTAssertEqual(m.writeLog.count, 1)
        // A failing gate: an allocation stays invisible, an in-place write does not happen.
        let refuse = { () throws(VHDError) in throw VHDError.notPublished(reason: "log") }
        XCTAssertThrowsError(try c.write([UInt8](repeating: 3, count: 4096), at: 3 << 20, beforeVisible: refuse))
        XCTAssertEqual(try c.read(at: 3 << 20, count: 4096), [UInt8](repeating: 0, count: 4096))
        XCTAssertThrowsError(try c.write([UInt8](repeating: 4, count: 512), at: 0, beforeVisible: refuse))
        XCTAssertEqual(try c.read(at: 0, count: 512), [UInt8](repeating: 2, count: 512))
    }

    func testConcurrentWritersToOneUnallocatedBlockBothLand() throws {
        let p = dir + "/c.vhd"
        try VHDCreate.createDynamic(path: p, size: 4 << 20)
        let c = try VHDChain.open(path: p, writable: true)
        defer { c.close() }
        DispatchQueue.concurrentPerform(iterations: 64) { i in
            try? c.write([UInt8](repeating: UInt8(i + 1), count: 512), at: UInt64(i * 512))
        }
        for i in 0..<64 { XCTAssertEqual(try c.read(at: UInt64(i * 512), count: 512), [UInt8](repeating: UInt8(i + 1), count: 512)) }
        XCTAssertEqual(c.leaf.allocatedBlockCount, 1)
    }

    func testConcurrentAllocationsOfManyBlocksShareSyncsAndAllLand() throws {
        let p = dir + "/m.vhd"
        try VHDCreate.createDynamic(path: p, size: 128 << 20)
        let c = try VHDChain.open(path: p, writable: true)
        DispatchQueue.concurrentPerform(iterations: 128) { i in
            // Two writers per block, in different halves.
            try? c.write([UInt8](repeating: UInt8(i + 1), count: 4096), at: UInt64(i / 2) * (2 << 20) + UInt64(i % 2) * (1 << 20))
        }
        c.close()
        let r = try VHDChain.open(path: p, writable: false)
        defer { r.close() }
        XCTAssertEqual(VHDCheck.check(path: p), [])
        for i in 0..<128 {
            let off = UInt64(i / 2) * (2 << 20) + UInt64(i % 2) * (1 << 20)
            XCTAssertEqual(try r.read(at: off, count: 4096), [UInt8](repeating: UInt8(i + 1), count: 4096), "\(i)")
        }
    }
}

final class ZeroTests: XCTestCase {
    func testWriteZeroesPunchesLeafDataAndFastOnlyRefusesWhereZerosMustBeWritten() throws {
        let dir = NSTemporaryDirectory() + "zero-" + UUID().uuidString
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let base = dir + "/b.vhd", leaf = dir + "/l.vhd"
        try VHDCreate.createDynamic(path: base, size: 8 << 20)
        var c = try VHDChain.open(path: base, writable: true)
        try c.write([UInt8](repeating: 9, count: 4 << 20), at: 0)
        c.close()
        try VHDCreate.createDifferencing(path: leaf, parentPath: base)
        c = try VHDChain.open(path: leaf, writable: true)
        defer { c.close() }
        // Block 0 lives only in the parent: zeroing it fast is impossible.
        XCTAssertThrowsError(try c.writeZeroes(offset: 0, length: 4096, punch: true, fastOnly: true)) {
            XCTAssertEqual($0 as? VHDError, .zeroingNotFast)
        }
        XCTAssertEqual(try c.read(at: 0, count: 4096), [UInt8](repeating: 9, count: 4096), "refused before any change")
        // Block 3 is empty everywhere: fast, and nothing is allocated.
        try c.writeZeroes(offset: 6 << 20, length: 2 << 20, punch: true, fastOnly: true)
        XCTAssertEqual(c.leaf.allocatedBlockCount, 0)
        // Slow path copies up and zeroes the range only.
        try c.writeZeroes(offset: 1000, length: 3000, punch: false, fastOnly: false)
        var want = [UInt8](repeating: 9, count: 8192)
        for i in 1000..<4000 { want[i] = 0 }
        XCTAssertEqual(try c.read(at: 0, count: 8192), want)
        // Now block 0 is in the leaf: punching it is fast.
        try c.writeZeroes(offset: 0, length: 2 << 20, punch: true, fastOnly: true)
        XCTAssertEqual(try c.read(at: 0, count: 2 << 20), [UInt8](repeating: 0, count: 2 << 20))
        XCTAssertEqual(try c.read(at: 2 << 20, count: 16), [UInt8](repeating: 9, count: 16))
    }
}
