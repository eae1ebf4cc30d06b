import Foundation
import XCTest
@testable import VHD

/// The shared fixtures: real VHD files written by qemu and Windows.
func fixturesDirectory() throws -> String {
    if let d = ProcessInfo.processInfo.environment["VDINBD_FIXTURES"] { return d }
    let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
    let d = root.deletingLastPathComponent().appendingPathComponent("shared/fixtures/vhd").path
    guard FileManager.default.fileExists(atPath: d) else { throw XCTSkip("fixtures not found at \(d)") }
    return d
}

final class FixtureTests: XCTestCase {
    func testQemuDynamicFixtureOpensStrictAndReportsExactSize() throws {
        let f = try VHDFile.open(path: try fixturesDirectory() + "/ext2.vhd", writable: false, policy: .strict)
        defer { f.close() }
        XCTAssertEqual(f.diskType, .dynamic)
        XCTAssertEqual(f.virtualSize, 4_212_736)
        XCTAssertEqual(f.blockSize, 2 * 1024 * 1024)
        XCTAssertEqual(f.allocatedBlockCount, 1)
        XCTAssertEqual(f.footer.creatorApplicationString, "qemu")
    }

    func testExt2FixtureHoldsAnExt2SuperblockMagic() throws {
        let c = try VHDChain.open(path: try fixturesDirectory() + "/ext2.vhd", writable: false)
        defer { c.close() }
        // ext2 superblock at 1024, s_magic at offset 56 within it: 0xEF53 little-endian.
        let magic = try c.read(at: 1024 + 56, count: 2)
        XCTAssertEqual(magic, [0x53, 0xEF])
    }

    func testFixtureWithStaleChecksumIsRefusedWhenStrict() throws {
        XCTAssertThrowsError(try VHDFile.open(path: try fixturesDirectory() + "/image.vhd", writable: false, policy: .strict)) {
            guard case VHDError.badChecksum(let s, _, _) = $0 else { return XCTFail("\($0)") }
            XCTAssertEqual(s, "footer")
        }
    }

    func testFixtureWithStaleChecksumOpensTolerantWithWarning() throws {
        let f = try VHDFile.open(path: try fixturesDirectory() + "/image.vhd", writable: false, policy: .tolerate)
        defer { f.close() }
        XCTAssertEqual(f.virtualSize, 104_448)
        XCTAssertTrue(f.warnings.contains { $0.contains("footer checksum mismatch") })
    }

    func testDifferencingFixtureFindsParentByUnicodeName() throws {
        let c = try VHDChain.open(path: try fixturesDirectory() + "/image-differential.vhd", writable: false, policy: .tolerate)
        defer { c.close() }
        XCTAssertEqual(c.layers.count, 2)
        XCTAssertEqual(c.layers[1].path.hasSuffix("image.vhd"), true)
    }

    func testCachedOnlyReadRefusesToLoadABitmapThenServesOnceLoaded() throws {
        let c = try VHDChain.open(path: try fixturesDirectory() + "/ext2.vhd", writable: false)
        defer { c.close() }
        var buf = [UInt8](repeating: 0, count: 512)
        XCTAssertThrowsError(try buf.withUnsafeMutableBytes { try c.read(into: $0, at: 1024, cachedOnly: true) }) {
            XCTAssertEqual($0 as? VHDError, .wouldBlock)
        }
        let full = try c.read(at: 1024, count: 512)
        try buf.withUnsafeMutableBytes { try c.read(into: $0, at: 1024, cachedOnly: true) }
        XCTAssertEqual(buf, full)
    }

    /// The one-pass read that also finds holes: on real files, the same bytes as a plain
    /// read, every hole reads as zeros, and unallocated blocks are all hole.
    func testReadWithHolesMatchesPlainReadOnFixtures() throws {
        for name in ["ext2.vhd", "image-differential.vhd"] {
            let c = try VHDChain.open(path: try fixturesDirectory() + "/" + name, writable: false, policy: .tolerate)
            defer { c.close() }
            let n = Int(c.virtualSize)
            let plain = try c.read(at: 0, count: n)
            var buf = [UInt8](repeating: 0xEE, count: n)
            var holes: [Range<Int>] = []
            try buf.withUnsafeMutableBytes { try c.read(into: $0, at: 0, holes: &holes) }
            XCTAssertEqual(buf, plain, name)
            for h in holes {
                XCTAssertEqual(h.lowerBound % 512, 0)
                XCTAssertTrue(plain[h].allSatisfy { $0 == 0 }, "\(name): hole \(h) holds data")
            }
            for (a, b) in zip(holes, holes.dropFirst()) { XCTAssertLessThan(a.upperBound, b.lowerBound, "holes merged and ordered") }
            // Where the block-level map says unallocated, all is hole.
            var pos = 0
            for run in try c.allocationRuns(offset: 0, length: UInt64(n)) {
                let r = pos..<(pos + Int(run.length))
                if !run.allocated { XCTAssertTrue(holes.contains { $0.lowerBound <= r.lowerBound && $0.upperBound >= r.upperBound }, "\(name) \(r)") }
                pos = r.upperBound
            }
            if name == "ext2.vhd" { XCTAssertFalse(holes.isEmpty) }
        }
    }

    func testFatDifferentialFailsWithParentMissingNamingTheParent() throws {
        XCTAssertThrowsError(try VHDChain.open(path: try fixturesDirectory() + "/fat-differential.vhd", writable: false)) {
            guard case VHDError.parentMissing(_, let name, let uid) = $0 else { return XCTFail("\($0)") }
            XCTAssertTrue(name.hasSuffix("fat-parent.vhd"), name)
            XCTAssertEqual(uid, "5fa21a55-f394-aa4d-9958-1951a67d5540")
        }
    }

    func testEveryFixturePassesOrReportsInVHDCheck() throws {
        let d = try fixturesDirectory()
        XCTAssertEqual(VHDCheck.check(path: d + "/ext2.vhd"), [])
        XCTAssertFalse(VHDCheck.check(path: d + "/image.vhd").isEmpty)
        XCTAssertTrue(VHDCheck.check(path: d + "/fat-differential.vhd").contains { $0.contains("parent missing") })
    }
}
