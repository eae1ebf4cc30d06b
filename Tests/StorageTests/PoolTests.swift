import Foundation
import XCTest
@testable import Storage

/// Several SRs in one server: routing, and a VDI moved from one to the other while a
/// handle is open, against a model of its bytes.
final class PoolTests: XCTestCase {
    var dirs: [String] = []

    override func tearDown() { for d in dirs { try? FileManager.default.removeItem(atPath: d) } }

    func makePool(_ formats: [String?] = [nil, "qcow2+raw"]) throws -> Pool {
        let tasks = TaskTable()
        var srs: [SR] = []
        for f in formats {
            let d = NSTemporaryDirectory() + "pooltests-" + UUID().uuidString
            dirs.append(d)
            let s = try SR(path: d, supportedFormats: try f.map(SR.parseImageFormats), tasks: tasks)
            s.endpoints = [NBDEndpoint(address: "127.0.0.1", port: 10809)]
            s.attachLingerSeconds = 0
            srs.append(s)
        }
        return try Pool(srs)
    }

    func testAnSRGivenTwiceIsRefused() throws {
        let d = NSTemporaryDirectory() + "pooltests-" + UUID().uuidString
        dirs.append(d)
        let tasks = TaskTable()
        let a = try SR(path: d, tasks: tasks), b = try SR(path: d, tasks: tasks)
        XCTAssertThrowsError(try Pool([a, b])) { XCTAssertEqual(($0 as? StorageError)?.code, "SR_BACKEND_FAILURE") }
    }

    func testRequestsGoToTheSRHoldingTheVDI() throws {
        let pool = try makePool()
        let (a, b) = (pool.srs[0], pool.srs[1])
        let x = try a.create(.init(nameLabel: "x", virtualSize: 4 << 20))
        let y = try b.create(.init(nameLabel: "y", virtualSize: 4 << 20))
        XCTAssertTrue(pool.route(x.uuid) === a)
        XCTAssertTrue(pool.route(y.uuid) === b)
        XCTAssertEqual(b.format(of: y.uuid).name, "qcow2")
        XCTAssertTrue(pool.sr(named: b.uuid) === b)
        XCTAssertTrue(pool.sr(named: b.path) === b)
        XCTAssertNil(pool.sr(named: UUID().uuidString))
        let name = try b.getNBDInfo(y.uuid)[0].exportname
        let (s, result) = pool.resolve(exportName: name)
        XCTAssertTrue(s === b)
        guard case .success(let g) = result else { return XCTFail("\(result)") }
        XCTAssertEqual(g.vdi.uuid, y.uuid)
        XCTAssertEqual(Set(try pool.allRecords().map(\.uuid)), [x.uuid, y.uuid])
    }

    func testAMoveCarriesTheRecordTokensHandleAndChangeLog() throws {
        let pool = try makePool()
        let (a, b) = (pool.srs[0], pool.srs[1])
        let size: UInt64 = 16 << 20
        let v = try a.create(.init(nameLabel: "v", virtualSize: size))
        try a.enableCBT(v.uuid)
        var model = [UInt8](repeating: 0, count: Int(size))
        var rng = SystemRandomNumberGenerator()
        let h = try a.attach(v.uuid)
        func write(_ n: Int) throws {
            for _ in 0..<n {
                let off = Int.random(in: 0..<Int(size / 4096), using: &rng) * 4096
                let fill = UInt8.random(in: 1...255, using: &rng)
                let buf = [UInt8](repeating: fill, count: 4096 * Int.random(in: 1...16, using: &rng))
                let n = min(buf.count, Int(size) - off)
                try buf.withUnsafeBytes { try h.write(UnsafeRawBufferPointer(rebasing: $0[0..<n]), at: UInt64(off)) }
                model.replaceSubrange(off..<(off + n), with: buf[0..<n])
            }
        }
        try write(200)
        let s0 = try a.snapshot(v.uuid)
        let atSnapshot = model
        try write(200)
        let name = try a.getNBDInfo(v.uuid)[0].exportname
        let moved = try a.migrate(v.uuid, to: b, format: "qcow2", task: nil)
        XCTAssertEqual(moved.uuid, v.uuid)
        XCTAssertTrue(pool.owner(of: h) === b, "the handle stayed in the old SR's table")
        XCTAssertThrowsError(try a.record(v.uuid))
        XCTAssertEqual(try b.record(v.uuid).smConfig["image-format"], "qcow2")
        XCTAssertTrue(FileManager.default.fileExists(atPath: b.imagePath(v.uuid, format: Formats.named("qcow2")!)))
        XCTAssertFalse(FileManager.default.fileExists(atPath: a.cbtLogPath(v.uuid)))
        // Writes after the move go to the new file and its log.
        try write(200)
        var got = [UInt8](repeating: 0, count: Int(size))
        try got.withUnsafeMutableBytes { try h.read(into: $0, at: 0) }
        XCTAssertEqual(got, model)
        // The token moved; the snapshot stayed and still reads as it was.
        guard case .success = pool.resolve(exportName: name).1 else { return XCTFail("the token did not move") }
        XCTAssertTrue(pool.route(s0.uuid) === a)
        let hs = try a.attach(s0.uuid)
        try got.withUnsafeMutableBytes { try hs.read(into: $0, at: 0) }
        a.detach(hs)
        XCTAssertEqual(got, atSnapshot)
        // The changes since the snapshot, across the two SRs, cover every block that differs.
        let bits = try b.changedBlocks(from: s0.uuid, to: v.uuid)
        for blk in 0..<Int(size >> 16) where model[(blk << 16)..<((blk + 1) << 16)] != atSnapshot[(blk << 16)..<((blk + 1) << 16)] {
            XCTAssertNotEqual(bits[blk / 8] & (0x80 >> UInt8(blk % 8)), 0, "block \(blk) changed but is not in the bitmap")
        }
        pool.detach(h, grant: nil, attachedTo: a)
        XCTAssertNil(b.withHandlesLocked { $0[v.uuid] })
        // The next snapshot's log is in the new SR and links back to the old snapshot.
        let s1 = try b.snapshot(v.uuid)
        XCTAssertEqual(try b.changedBlocks(from: s0.uuid, to: s1.uuid), bits)
    }
}

