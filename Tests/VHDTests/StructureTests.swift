import Foundation
import XCTest
@testable import VHD

func newImage(size: UInt64) -> MemoryFile {
    MemoryFile(bytes: VHDCreate.image(size: size, uniqueID: UUID(), now: Date(timeIntervalSince1970: 1_700_000_000)))
}

final class StructureTests: XCTestCase {
    func testFooterRoundTripsAndChecksumVerifies() throws {
        let f = Footer(diskType: .dynamic, currentSize: 64 << 20, uniqueID: Array(0..<16), timeStamp: 5, dataOffset: 512)
        let bytes = f.serialize()
        XCTAssertEqual(bytes.count, 512)
        XCTAssertEqual(Array(bytes[0..<8]), Array("conectix".utf8))
        XCTAssertEqual(Array(bytes[28..<32]), Array("tap\0".utf8))
        XCTAssertEqual(try Footer.parse(bytes), f)
    }

    func testFooterBadCookieIsTyped() {
        var b = Footer(diskType: .fixed, currentSize: 512, uniqueID: Array(0..<16), timeStamp: 0, dataOffset: .max).serialize()
        b[0] = UInt8(ascii: "X")
        XCTAssertThrowsError(try Footer.parse(b)) {
            guard case VHDError.badCookie = $0 else { return XCTFail("\($0)") }
        }
    }

    func testFooterBadChecksumIsTyped() {
        var b = Footer(diskType: .fixed, currentSize: 512, uniqueID: Array(0..<16), timeStamp: 0, dataOffset: .max).serialize()
        b[40] ^= 1
        XCTAssertThrowsError(try Footer.parse(b)) {
            guard case VHDError.badChecksum = $0 else { return XCTFail("\($0)") }
        }
    }

    func testTruncatedAndGarbageInputNeverTraps() {
        for n in [0, 1, 100, 511] {
            XCTAssertThrowsError(try Footer.parse([UInt8](repeating: 0xAB, count: n)))
            XCTAssertThrowsError(try DynamicDiskHeader.parse([UInt8](repeating: 0xAB, count: n)))
        }
        var rng = SystemRandomNumberGenerator()
        for _ in 0..<200 {
            let b = (0..<1024).map { _ in UInt8.random(in: 0...255, using: &rng) }
            XCTAssertThrowsError(try Footer.parse(b))
            XCTAssertThrowsError(try VHDFile(file: MemoryFile(bytes: b), writable: false, policy: .tolerate))
        }
    }

    func testGeometryFollowsTheSpecAlgorithm() {
        // 64 MiB: 131072 sectors -> spt 17, heads 8... per the spec's CHS table.
        let g = DiskGeometry(forSize: 64 << 20)
        XCTAssertEqual(UInt64(g.cylinders) * UInt64(g.heads) * UInt64(g.sectorsPerTrack) <= (64 << 20) / 512, true)
        let big = DiskGeometry(forSize: 2040 << 30)
        XCTAssertEqual(big.cylinders, 65535)
        XCTAssertEqual(big.heads, 16)
        XCTAssertEqual(big.sectorsPerTrack, 255)
    }

    func testBATEntryPastEOFIsRefused() throws {
        let m = newImage(size: 8 << 20)
        // Point entry 0 far past the end.
        m.bytes[1536..<1540] = [0x00, 0x10, 0x00, 0x00]
        XCTAssertThrowsError(try VHDFile(file: m, writable: false)) {
            guard case VHDError.invalidField(let s, _, _, _) = $0 else { return XCTFail("\($0)") }
            XCTAssertEqual(s, "BAT")
        }
    }

    func testTruncatedFileIsRefused() throws {
        let m = newImage(size: 8 << 20)
        m.bytes.removeLast(1200)
        XCTAssertThrowsError(try VHDFile(file: m, writable: false))
    }

    func testSectorBitmapRuns() {
        var bm = SectorBitmap(bytes: [UInt8](repeating: 0, count: 512), sectors: 4096)
        bm.set(3..<20)
        let runs = bm.runs(in: 0..<32)
        XCTAssertEqual(runs.map(\.0), [false, true, false])
        XCTAssertEqual(runs.map(\.1), [0..<3, 3..<20, 20..<32])
        XCTAssertFalse(bm.isFull)
        XCTAssertTrue(SectorBitmap.full(sectors: 4096, paddedBytes: 512).isFull)
    }
}
