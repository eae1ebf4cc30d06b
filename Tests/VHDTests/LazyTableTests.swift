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
}
