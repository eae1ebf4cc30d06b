import Foundation
import XCTest
@testable import VHD

/// A read plan names, piece by piece, the same bytes a read copies: checked over a chain
/// three snapshots deep with partial blocks, and through the files' mappings.
final class ReadPlanTests: TemporaryDirectoryTestCase {
    func testPlanNamesTheBytesReadsCopyAndTheSameHoles() throws {
        let size: UInt64 = 12 << 20
        var leaf = dir + "/l0.vhd"
        try VHDCreate.createDynamic(path: leaf, size: size)
        var rng = SystemRandomNumberGenerator()
        for gen in 0..<4 {
            let c = try VHDChain.open(path: leaf, writable: true)
            for _ in 0..<12 {
                let len = Int.random(in: 1...300_000, using: &rng)
                let off = UInt64.random(in: 0...(size - UInt64(len)), using: &rng)
                try c.write((0..<len).map { UInt8(truncatingIfNeeded: $0 &+ gen &* 7) }, at: off)
            }
            try c.flush()
            c.close()
            let next = dir + "/l\(gen + 1).vhd"
            try VHDCreate.createDifferencing(path: next, parentPath: leaf)
            leaf = next
        }
        let c = try VHDChain.open(path: leaf, writable: false)
        defer { c.close() }
        for i in 0..<200 {
            let len = i == 0 ? Int(size) : Int.random(in: 1...(3 << 20), using: &rng)
            let off = i == 0 ? 0 : UInt64.random(in: 0...(size - UInt64(len)), using: &rng)
            var want = [UInt8](repeating: 0xEE, count: len)
            var holes: [Range<Int>] = []
            try want.withUnsafeMutableBytes { try c.read(into: $0, at: off, holes: &holes) }
            let plan = try c.plan(offset: off, length: len)
            var got: [UInt8] = []
            var planHoles: [Range<Int>] = []
            for p in plan.pieces {
                switch p {
                case .zeros(let n):
                    planHoles.append(got.count..<(got.count + n))
                    got += [UInt8](repeating: 0, count: n)
                case .data(let f, let o, let n):
                    got += try XCTUnwrap(f as? RandomAccessFile).read(at: o, count: n)
                    // The mapping shows the same bytes.
                    let m = try XCTUnwrap(f.mapped(offset: o, count: n), "not mapped")
                    XCTAssertEqual(Array(m), Array(got.suffix(n)))
                }
            }
            XCTAssertEqual(got.count, len)
            XCTAssertEqual(got, want, "read at \(off)+\(len)")
            XCTAssertEqual(planHoles, holes, "holes at \(off)+\(len)")
        }
    }

    func testMappingRefusesRangesPastTheEndOfTheFile() throws {
        let p = dir + "/small.vhd"
        try VHDCreate.createDynamic(path: p, size: 4 << 20)
        let f = try PosixFile(path: p, writable: false)
        let length = try f.length()
        XCTAssertNotNil(f.mapped(offset: 0, count: 512))
        XCTAssertNil(f.mapped(offset: length - 100, count: 512), "a mapping past the end would raise SIGBUS")
        f.close()
        XCTAssertNotNil(f.mapped(offset: 0, count: 512), "an existing mapping outlives the descriptor")
    }
}
