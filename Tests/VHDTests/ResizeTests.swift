import Foundation
import XCTest
@testable import VHD

/// Growing a disk: in place when the BAT's last sector has room, by relocating the BAT
/// otherwise; data, chains and a crash between the steps all stay readable.
final class ResizeTests: TemporaryDirectoryTestCase {
    func pattern(_ n: Int, seed: UInt8) -> [UInt8] { (0..<n).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ Int(seed)) } }

    func testGrowWithinTheBATSectorKeepsTheTableInPlace() throws {
        let p = dir + "/a.vhd"
        try VHDCreate.createDynamic(path: p, size: 8 << 20)
        let f = try VHDFile.open(path: p, writable: true)
        let before = f.header!.tableOffset
        try f.grow(to: 100 << 20)
        f.close()
        let g = try VHDFile.open(path: p, writable: false)
        defer { g.close() }
        XCTAssertEqual(g.virtualSize, 100 << 20)
        XCTAssertEqual(g.header!.tableOffset, before)
        XCTAssertEqual(g.header!.maxTableEntries, 50)
        XCTAssertEqual(g.footer.diskGeometry, DiskGeometry(forSize: 100 << 20))
        XCTAssertEqual(g.footer.originalSize, 100 << 20)
        XCTAssertEqual(VHDCheck.check(path: p), [])
    }

    func testGrowPastTheBATSectorRelocatesTheTableAndKeepsData() throws {
        let p = dir + "/b.vhd"
        try VHDCreate.createDynamic(path: p, size: 16 << 20)
        var c = try VHDChain.open(path: p, writable: true)
        let a = pattern(5000, seed: 1), b = pattern(3000, seed: 2)
        try c.write(a, at: 1000)
        try c.write(b, at: (16 << 20) - 3000)
        c.close()
        let f = try VHDFile.open(path: p, writable: true)
        let oldTable = f.header!.tableOffset
        try f.grow(to: 3 << 30)
        XCTAssertNotEqual(f.header!.tableOffset, oldTable)
        XCTAssertEqual(f.header!.maxTableEntries, 1536)
        f.close()
        XCTAssertEqual(VHDCheck.check(path: p), [])
        c = try VHDChain.open(path: p, writable: true)
        XCTAssertEqual(c.virtualSize, 3 << 30)
        XCTAssertEqual(try c.read(at: 1000, count: a.count), a)
        XCTAssertEqual(try c.read(at: (16 << 20) - 3000, count: b.count), b)
        XCTAssertEqual(try c.read(at: 16 << 20, count: 4096), [UInt8](repeating: 0, count: 4096))
        // New blocks land after the relocated table, at both ends of the new space.
        let d = pattern(70000, seed: 3), e = pattern(512, seed: 4)
        try c.write(d, at: (2 << 30) + 12345)
        try c.write(e, at: (3 << 30) - 512)
        c.close()
        XCTAssertEqual(VHDCheck.check(path: p), [])
        c = try VHDChain.open(path: p, writable: false)
        defer { c.close() }
        XCTAssertEqual(try c.read(at: (2 << 30) + 12345, count: d.count), d)
        XCTAssertEqual(try c.read(at: (3 << 30) - 512, count: 512), e)
        XCTAssertEqual(try c.read(at: 1000, count: a.count), a)
    }

    func testGrownLeafReadsZerosPastItsSmallerParent() throws {
        let base = dir + "/base.vhd", leaf = dir + "/leaf.vhd"
        try VHDCreate.createDynamic(path: base, size: 4 << 20)
        var c = try VHDChain.open(path: base, writable: true)
        try c.write([UInt8](repeating: 0xAB, count: 4 << 20), at: 0)
        c.close()
        try VHDCreate.createDifferencing(path: leaf, parentPath: base)
        let f = try VHDFile.open(path: leaf, writable: true)
        try f.grow(to: 64 << 20)
        f.close()
        c = try VHDChain.open(path: leaf, writable: true)
        defer { c.close() }
        XCTAssertEqual(c.virtualSize, 64 << 20)
        XCTAssertEqual(try c.read(at: (4 << 20) - 2, count: 4), [0xAB, 0xAB, 0, 0])
        try c.write([1, 2, 3], at: (4 << 20) + 7)
        XCTAssertEqual(try c.read(at: (4 << 20) + 6, count: 5), [0, 1, 2, 3, 0])
        XCTAssertEqual(try c.read(at: 0, count: 2), [0xAB, 0xAB])
    }

    func testShrinkAndOversizeAreRefusedAndChangeNothing() throws {
        let p = dir + "/c.vhd"
        try VHDCreate.createDynamic(path: p, size: 8 << 20)
        let before = try Data(contentsOf: URL(fileURLWithPath: p))
        let f = try VHDFile.open(path: p, writable: true)
        defer { f.close() }
        for bad: UInt64 in [4 << 20, (8 << 20) + 1, 2041 << 30] {
            XCTAssertThrowsError(try f.grow(to: bad)) { e in
                guard case VHDError.invalidField(_, "currentSize", bad, _) = e else { return XCTFail("\(e)") }
            }
        }
        XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: p)), before)
        let ro = try VHDFile.open(path: p, writable: false)
        defer { ro.close() }
        XCTAssertThrowsError(try ro.grow(to: 16 << 20)) { XCTAssertEqual($0 as? VHDError, .readOnly(path: p)) }
    }

    /// A crash after the relocated table and header were written but before the footer:
    /// the disk opens at its old size with every block where it was.
    func testCrashBeforeTheFooterLeavesTheOldSizeReadable() throws {
        let p = dir + "/d.vhd"
        try VHDCreate.createDynamic(path: p, size: 8 << 20)
        var c = try VHDChain.open(path: p, writable: true)
        let a = pattern(4096, seed: 9)
        try c.write(a, at: 3 << 20)
        c.close()
        let f = try VHDFile.open(path: p, writable: true)
        let oldFooter = f.footer.serialize()
        try f.grow(to: 1 << 30)
        let end = try f.file.length()
        // Put the old footer back in both places, as if step 3 never ran.
        try f.file.write(oldFooter, at: end - 512)
        try f.file.write(oldFooter, at: 0)
        f.close()
        c = try VHDChain.open(path: p, writable: false)
        defer { c.close() }
        XCTAssertEqual(c.virtualSize, 8 << 20)
        XCTAssertEqual(try c.read(at: 3 << 20, count: a.count), a)
        XCTAssertEqual(VHDCheck.check(path: p), [])
    }
}
