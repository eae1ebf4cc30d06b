import Foundation
import XCTest
@testable import CBT
@testable import VHD

/// Structure-aware bad input: files whose cookies and checksums are right, so parsing
/// reaches the arithmetic on their offsets (random bytes fail the cookie check first).
/// Every one must be a typed error or a warning, never a trap.
final class CraftedInputTests: TemporaryDirectoryTestCase {
    /// A differencing VHD over a real parent, with its header changed by `edit` (checksum
    /// recomputed).
    func crafted(_ name: String, _ edit: (inout DynamicDiskHeader) -> Void) throws -> String {
        let parent = dir + "/p-\(name).vhd", child = dir + "/\(name).vhd"
        try VHDCreate.createDynamic(path: parent, size: 16 << 20)
        try VHDCreate.createDifferencing(path: child, parentPath: parent)
        let f = try VHDFile.open(path: child, writable: false)
        var h = try XCTUnwrap(f.header)
        let at = f.footer.dataOffset
        f.close()
        edit(&h)
        let fh = try XCTUnwrap(FileHandle(forUpdatingAtPath: child))
        try fh.seek(toOffset: at)
        fh.write(Data(h.serialize()))
        try fh.close()
        return child
    }

    func testATableOffsetNearTwoToTheSixtyFourIsATypedError() throws {
        // With the largest table allowed (2^24 entries, 64 MiB), offset + size passes 2^64.
        let p = try crafted("bat") { h in
            h.tableOffset = UInt64.max - 511
            h.maxTableEntries = 1 << 24
        }
        for writable in [false, true] {
            XCTAssertThrowsError(try VHDFile.open(path: p, writable: writable)) { e in
                guard case .invalidField(_, let field, _, _)? = e as? VHDError else { return XCTFail("\(e)") }
                XCTAssertEqual(field, "tableOffset")
            }
        }
        XCTAssertFalse(VHDCheck.check(path: p).isEmpty)
    }

    func testALocatorOffsetNearTwoToTheSixtyFourIsAWarningAndAMissingParent() throws {
        let p = try crafted("loc") { h in
            for i in h.parentLocatorEntries.indices where h.parentLocatorEntries[i].platformCode != .none {
                h.parentLocatorEntries[i].platformDataOffset = UInt64.max - 100
            }
        }
        let f = try VHDFile.open(path: p, writable: true)
        XCTAssertTrue(f.warnings.contains { $0.contains("lies past the end") }, "\(f.warnings)")
        f.close()
        // The parent's unicode name still finds it; with that cleared too, a typed error.
        let q = try crafted("loc2") { h in
            for i in h.parentLocatorEntries.indices where h.parentLocatorEntries[i].platformCode != .none {
                h.parentLocatorEntries[i].platformDataOffset = (1 << 63) + 7
            }
            h.parentUnicodeName = "no-such-parent.vhd"
        }
        XCTAssertThrowsError(try VHDChain.open(path: q, writable: false)) { e in
            guard case .parentMissing? = e as? VHDError else { return XCTFail("\(e)") }
        }
        XCTAssertTrue(VHDCheck.check(path: q).contains { $0.contains("lies past the end") })
    }

    func testReadsAndWritesAtOffsetsPastInt64AreTypedErrors() throws {
        let p = dir + "/f.bin"
        FileManager.default.createFile(atPath: p, contents: Data(count: 4096))
        let f = try PosixFile(path: p, writable: true)
        defer { f.close() }
        var buf = [UInt8](repeating: 0, count: 16)
        for offset: UInt64 in [1 << 63, UInt64.max, UInt64(Int64.max) - 8] {
            XCTAssertThrowsError(try buf.withUnsafeMutableBytes { try f.read(into: $0, atAbsoluteOffset: offset) })
            XCTAssertThrowsError(try buf.withUnsafeBytes { try f.writeAll($0, toAbsoluteOffset: offset) })
            XCTAssertNil(f.mapped(offset: offset, count: 16))
        }
        let m = MemoryFile(bytes: [1, 2, 3])
        try buf.withUnsafeMutableBytes { try m.read(into: $0, atAbsoluteOffset: UInt64.max) }
        XCTAssertEqual(buf, [UInt8](repeating: 0, count: 16))
        XCTAssertThrowsError(try buf.withUnsafeBytes { try m.writeAll($0, toAbsoluteOffset: UInt64.max - 4) })
    }

    func testChangedRangesOfABitmapShorterThanTheSizeStopAtItsEnd() {
        // A server's bitmap for 128 KiB against a size of 1 TiB: no index past the bitmap.
        let r = ChangedBlocks.ranges([0xFF], size: 1 << 40)
        XCTAssertEqual(r.map(\.offset), [0])
        XCTAssertEqual(r.map(\.length), [8 * ChangeLog.blockSize])
        XCTAssertTrue(ChangedBlocks.ranges([], size: UInt64.max).isEmpty)
    }
}
