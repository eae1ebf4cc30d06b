import Foundation
import XCTest
@testable import VHD

/// A read-only layer's BAT is decoded from the mapped file as blocks are looked up: the
/// same answers as a table read at open, and a bad entry is still a typed error (at its
/// first use instead of at open).
final class LazyTableTests: TemporaryDirectoryTestCase {
    func describe(_ s: BlockState) -> String {
        switch s {
        case .absent: return "absent"
        case .full(let o): return "full \(o)"
        case .partial(let o, let bm): return "partial \(o) \(bm.bytes)"
        }
    }

    func testReadOnlyOpenAnswersAsTheWritableOne() throws {
        let p = dir + "/a.vhd"
        try VHDCreate.createDynamic(path: p, size: 64 << 20)
        let w = try VHDChain.open(path: p, writable: true)
        for b in [0, 3, 17, 31] { try w.write([UInt8](repeating: UInt8(b + 1), count: 4096), at: UInt64(b) << 21) }
        try w.write([UInt8](repeating: 9, count: 512), at: (5 << 21) + 512)
        try w.flush()
        let r = try VHDFile.open(path: p, writable: false)
        defer { r.close(); w.close() }
        XCTAssertEqual(r.allocatedBlockCount, w.leaf.allocatedBlockCount)
        XCTAssertEqual(r.blockAllocationTable.entries, w.leaf.blockAllocationTable.entries)
        for b in 0..<32 { XCTAssertEqual(describe(try r.blockState(b)), describe(try w.leaf.blockState(b)), "block \(b)") }
    }

    func testABatEntryPastTheEndFailsTypedAtItsFirstUse() throws {
        let p = dir + "/b.vhd"
        try VHDCreate.createDynamic(path: p, size: 8 << 20)
        let f = try VHDFile.open(path: p, writable: false)
        let tableOffset = f.header!.tableOffset
        f.close()
        // Entry 1 points a long way past the end of the file.
        let h = try XCTUnwrap(FileHandle(forUpdatingAtPath: p))
        try h.seek(toOffset: tableOffset + 4)
        h.write(Data([0x00, 0x10, 0x00, 0x00]))
        try h.close()
        XCTAssertThrowsError(try VHDFile.open(path: p, writable: true)) { e in
            guard case .invalidField(let s, _, _, _)? = e as? VHDError else { return XCTFail("\(e)") }
            XCTAssertEqual(s, "BAT")
        }
        let r = try VHDFile.open(path: p, writable: false)
        defer { r.close() }
        XCTAssertEqual(describe(try r.blockState(0)), "absent")
        XCTAssertThrowsError(try r.blockState(1)) { e in
            guard case .invalidField(let s, _, _, _)? = e as? VHDError else { return XCTFail("\(e)") }
            XCTAssertEqual(s, "BAT")
        }
    }

    /// A writable file's table is the mapped file too: entries committed by allocation are
    /// read back from it, a far entry (past 1024 unallocated ones) is found by the skipping
    /// scan, and the next block goes after it.
    func testWritableMappedTableSeesCommitsAndPlacesNewBlocksPastTheLast() throws {
        let p = dir + "/w.vhd"
        try VHDCreate.createDynamic(path: p, size: 8 << 30)  // 4096 entries: four 4 KiB stretches
        do {
            let c = try VHDChain.open(path: p, writable: true)
            try c.write([UInt8](repeating: 7, count: 4096), at: 2500 << 21)
            try c.flush()
            c.close()
        }
        let c = try VHDChain.open(path: p, writable: true)
        defer { c.close() }
        XCTAssertNotNil(c.leaf.batMap, "the table is mapped, not copied")
        guard case .full(let far) = try c.leaf.blockState(2500) else { return XCTFail("block 2500 lost") }
        for b in [0, 127, 128, 4095] {
            try c.write([UInt8](repeating: UInt8(b % 250 + 1), count: 4096), at: UInt64(b) << 21)
            guard case .full(let o) = try c.leaf.blockState(b) else { return XCTFail("block \(b) not allocated") }
            XCTAssertGreaterThan(o, far, "a new block must not overlap the one found at open")
        }
        try c.flush()
        let r = try VHDFile.open(path: p, writable: false)
        defer { r.close() }
        XCTAssertEqual(r.blockAllocationTable.entries, c.leaf.blockAllocationTable.entries)
        XCTAssertEqual(r.allocatedBlockCount, 5)
        var out = [UInt8](repeating: 0, count: 4096)
        let again = try VHDChain.open(path: p, writable: false)
        defer { again.close() }
        for (b, v) in [(0, 1), (127, 128), (128, 129), (4095, 96), (2500, 7)] {
            try out.withUnsafeMutableBytes { try again.read(into: $0, at: UInt64(b) << 21) }
            XCTAssertEqual(out, [UInt8](repeating: UInt8(v), count: 4096), "block \(b)")
        }
    }

    func testAWritableOpenRefusesTwoEntriesSharingABlock() throws {
        let p = dir + "/d.vhd"
        try VHDCreate.createDynamic(path: p, size: 8 << 30)
        do {
            let c = try VHDChain.open(path: p, writable: true)
            try c.write([UInt8](repeating: 1, count: 512), at: 3000 << 21)
            c.close()
        }
        let f = try VHDFile.open(path: p, writable: false)
        let tableOffset = f.header!.tableOffset
        let entry = f.blockAllocationTable.entries[3000]
        f.close()
        let h = try XCTUnwrap(FileHandle(forUpdatingAtPath: p))
        try h.seek(toOffset: tableOffset + 10 * 4)
        h.write(withUnsafeBytes(of: entry.bigEndian) { Data($0) })
        try h.close()
        XCTAssertThrowsError(try VHDFile.open(path: p, writable: true)) { e in
            guard case .invalidField(_, let field, _, let reason)? = e as? VHDError else { return XCTFail("\(e)") }
            XCTAssertEqual(field, "entry[3000]")
            XCTAssertTrue(reason.contains("share"), reason)
        }
    }

    func testParentPathsAreNormalisedWithoutTheFileSystem() {
        XCTAssertEqual(VHDChain.normalised("/sr/./a.vhd"), "/sr/a.vhd")
        XCTAssertEqual(VHDChain.normalised("/sr//x/../a.vhd"), "/sr/a.vhd")
        XCTAssertEqual(VHDChain.normalised("/../a.vhd"), "/a.vhd")
        XCTAssertEqual(VHDChain.normalised("sr/../../a.vhd"), "../a.vhd")
        XCTAssertEqual(VHDChain.directory(of: "/sr/a.vhd"), "/sr")
        XCTAssertEqual(VHDChain.directory(of: "/a.vhd"), "/")
        XCTAssertEqual(VHDChain.directory(of: "a.vhd"), ".")
        XCTAssertEqual(VHDChain.lastComponent("C:/images/p.vhd"), "p.vhd")
    }
}

/// A merge writes into a layer that clients' chains hold open read-only: a block it
/// allocates after they opened lies past the length they saw, and is read, not refused.
final class GrownLayerTests: TemporaryDirectoryTestCase {
    func testAReadOnlyOpeningReadsABlockAnotherOpeningAllocatedLater() throws {
        let p = dir + "/g.vhd"
        try VHDCreate.createDynamic(path: p, size: 16 << 20)
        let reader = try VHDChain.open(path: p, writable: false)
        defer { reader.close() }
        var before = [UInt8](repeating: 0xEE, count: 4096)
        try before.withUnsafeMutableBytes { try reader.read(into: $0, at: 3 << 21) }
        XCTAssertEqual(before, [UInt8](repeating: 0, count: 4096))
        let writer = try VHDChain.open(path: p, writable: true)
        try writer.write([UInt8](repeating: 0x5A, count: 4096), at: 3 << 21)
        try writer.flush()
        writer.close()
        var after = [UInt8](repeating: 0xEE, count: 4096)
        try after.withUnsafeMutableBytes { try reader.read(into: $0, at: 3 << 21) }
        XCTAssertEqual(after, [UInt8](repeating: 0x5A, count: 4096))
    }
}
