import Foundation
import Image
import XCTest
@testable import RawImage

/// Random writes, zeroes (punched and kept) and reads against a flat-array model; the
/// allocation reported must be a superset of what was written and never cover a punched
/// hole's interior; plans lend the file's own pages.
final class RawImageTests: XCTestCase {
    var dir: String!

    override func setUp() {
        dir = NSTemporaryDirectory() + "rawtests-" + UUID().uuidString
        try? FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    }

    override func tearDown() { try? FileManager.default.removeItem(atPath: dir) }

    func testRandomOperationsMatchModel() throws {
        let size = 8 << 20
        let path = dir + "/d.raw"
        try RawFormat().create(path: path, size: UInt64(size))
        let img = try RawFormat().open(path: path, writable: true)
        defer { img.close() }
        XCTAssertEqual(img.virtualSize, UInt64(size))
        XCTAssertTrue(img.leafLacksAll(offset: 0, length: UInt64(size)), "a new raw image holds nothing")
        var model = [UInt8](repeating: 0, count: size)
        var rng = SystemRandomNumberGenerator()
        for step in 0..<300 {
            let off = Int.random(in: 0..<(size / 4096), using: &rng) * 4096
            let len = min(size - off, Int.random(in: 1...64, using: &rng) * 4096)
            switch step % 5 {
            case 0, 1:
                var data = [UInt8](repeating: UInt8(truncatingIfNeeded: step) | 1, count: len)
                for i in stride(from: 0, to: len, by: 512) { data[i] = UInt8.random(in: 1...255, using: &rng) }
                try data.withUnsafeBytes { try img.write($0, at: UInt64(off)) }
                model.replaceSubrange(off..<(off + len), with: data)
                XCTAssertTrue(img.leafHoldsAll(offset: UInt64(off), length: UInt64(len)))
            case 2:
                try img.writeZeroes(offset: UInt64(off), length: UInt64(len), punch: true, fastOnly: false)
                model.replaceSubrange(off..<(off + len), with: [UInt8](repeating: 0, count: len))
                XCTAssertTrue(img.leafLacksAll(offset: UInt64(off), length: UInt64(len)), "a punched range still holds data")
            case 3:
                // Kept allocated (ext4 makes the range unwritten extents, which SEEK_DATA
                // may report as a hole): the file's space must not shrink.
                let before = allocated(path)
                try img.writeZeroes(offset: UInt64(off), length: UInt64(len), punch: false, fastOnly: false)
                model.replaceSubrange(off..<(off + len), with: [UInt8](repeating: 0, count: len))
                XCTAssertGreaterThanOrEqual(allocated(path), before, "zeroes kept allocated returned space")
            default:
                var buf = [UInt8](repeating: 0xAA, count: len)
                var holes: [Range<Int>] = []
                try buf.withUnsafeMutableBytes { try img.read(into: $0, at: UInt64(off), cachedOnly: false, holes: &holes) }
                XCTAssertEqual(buf, Array(model[off..<(off + len)]), "read at \(off)+\(len), step \(step)")
                for h in holes { XCTAssertTrue(model[(off + h.lowerBound)..<(off + h.upperBound)].allSatisfy { $0 == 0 }) }
            }
        }
        // The whole disk, through a read and through a plan of mapped pages.
        var all = [UInt8](repeating: 0, count: size)
        try all.withUnsafeMutableBytes { try img.read(into: $0, at: 0) }
        XCTAssertEqual(all, model)
        var fromPlan = [UInt8]()
        for p in try img.plan(offset: 0, length: size).pieces {
            switch p {
            case .zeros(let n): fromPlan += [UInt8](repeating: 0, count: n)
            case .data(let f, let o, let n): fromPlan += Array(try XCTUnwrap(f.mapped(offset: o, count: n)))
            }
        }
        XCTAssertEqual(fromPlan, model)
        // Allocation: every nonzero byte is inside an allocated run; the runs cover the disk.
        let runs = try img.allocationRuns(offset: 0, length: UInt64(size))
        XCTAssertEqual(runs.reduce(0) { $0 + $1.length }, UInt64(size))
        var pos = 0
        for r in runs {
            if !r.allocated { XCTAssertTrue(model[pos..<(pos + Int(r.length))].allSatisfy { $0 == 0 }, "data in a hole at \(pos)") }
            pos += Int(r.length)
        }
        try img.flush()
    }

    func allocated(_ path: String) -> Int {
        var st = stat()
        return stat(path, &st) == 0 ? Int(st.st_blocks) * 512 : -1
    }

    func testRefusalsAreTyped() throws {
        let path = dir + "/r.raw"
        try RawFormat().create(path: path, size: 1 << 20)
        XCTAssertThrowsError(try RawFormat().create(path: path, size: 1 << 20)) { e in
            XCTAssertEqual((e as? RawError)?.errno, .fileExists)
        }
        XCTAssertThrowsError(try RawFormat().createChild(path: dir + "/c.raw", parent: path, size: nil)) { e in
            guard case .noChains? = e as? RawError else { return XCTFail("\(e)") }
        }
        XCTAssertNil(RawFormat().parentPath(ofFile: path))
        let ro = try RawFormat().open(path: path, writable: false)
        defer { ro.close() }
        XCTAssertThrowsError(try [UInt8](repeating: 1, count: 512).withUnsafeBytes { try ro.write($0, at: 0) }) { e in
            XCTAssertEqual((e as? RawError)?.failureKind, .readOnly)
        }
        let rw = try RawFormat().open(path: path, writable: true)
        defer { rw.close() }
        XCTAssertThrowsError(try [UInt8](repeating: 1, count: 512).withUnsafeBytes { try rw.write($0, at: (1 << 20) - 256) }) { e in
            XCTAssertEqual((e as? RawError)?.failureKind, .outOfRange)
        }
        // A gate that fails: nothing written.
        struct Gate: Error {}
        XCTAssertThrowsError(try [UInt8](repeating: 7, count: 512).withUnsafeBytes { try rw.write($0, at: 0, beforeVisible: { throw Gate() }) })
        var b = [UInt8](repeating: 1, count: 512)
        try b.withUnsafeMutableBytes { try rw.read(into: $0, at: 0) }
        XCTAssertEqual(b, [UInt8](repeating: 0, count: 512))
        try RawFormat().grow(path: path, to: 2 << 20)
        XCTAssertEqual(try RawFormat().virtualSize(ofFile: path), 2 << 20)
        XCTAssertNil(RawFormat().check(path: path))
    }
}
