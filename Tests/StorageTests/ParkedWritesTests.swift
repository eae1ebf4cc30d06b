import CBT
import Foundation
import XCTest
@testable import Storage
import VHD

final class ParkedWritesTests: XCTestCase {
    func park(_ p: ParkedWrites, _ offset: UInt64, _ byte: UInt8, _ n: Int = 512) -> UInt64 {
        p.park(offset: offset, length: n) { $0.initializeMemory(as: UInt8.self, repeating: byte) }!
    }

    func testEntriesAreWrittenInArrivalOrderOnceReady() {
        let p = ParkedWrites()
        var applied: [UInt64] = []
        let a = park(p, 0, 1), b = park(p, 4096, 2)
        p.markReady(b, failure: nil)
        p.pump { applied.append($0.seq) }
        XCTAssertEqual(applied, [], "the head is not ready: nothing may overtake it")
        p.markReady(a, failure: nil)
        p.pump { applied.append($0.seq) }
        XCTAssertEqual(applied, [a, b])
        XCTAssertTrue(p.isEmpty)
    }

    func testWorkAfterAnEntryRunsOnlyOnceItIsWritten() {
        let p = ParkedWrites()
        let a = park(p, 0, 1)
        XCTAssertEqual(p.lastOverlapping(256, 512), a)
        XCTAssertNil(p.lastOverlapping(512, 512))
        var ran = false
        p.after(a) { ran = true }
        XCTAssertFalse(ran)
        p.markReady(a, failure: nil)
        p.pump { _ in }
        XCTAssertTrue(ran)
        var now = false
        p.after(a) { now = true }
        XCTAssertTrue(now, "already written: runs at once")
    }

    func testWaitMakesBitsDurableAndPumpsItself() {
        let p = ParkedWrites()
        _ = park(p, 0, 1); _ = park(p, 512, 2)
        var durable = 0, applied = 0
        p.waitAllWritten(makeDurable: { durable += 1; return nil }, apply: { _ in applied += 1 })
        XCTAssertEqual(durable, 1)
        XCTAssertEqual(applied, 2)
        XCTAssertTrue(p.isEmpty)
        p.waitAllWritten(makeDurable: { durable += 1; return nil }, apply: { _ in applied += 1 })
        XCTAssertEqual(durable, 1, "nothing parked: no sync")
    }

    func testAWriteFailureIsReportedOnce() {
        let p = ParkedWrites()
        _ = park(p, 0, 1)
        p.waitAllWritten(makeDurable: { nil }, apply: { _ throws(DiskError) in throw DiskError(VHDError.readOnly(path: "x")) })
        XCTAssertNotNil(p.takeWriteFailure())
        XCTAssertNil(p.takeWriteFailure())
    }

    func testTheByteLimitRefusesToPark() {
        let p = ParkedWrites()
        XCTAssertNotNil(p.park(offset: 0, length: ParkedWrites.byteLimit) { $0.initializeMemory(as: UInt8.self, repeating: 0) })
        XCTAssertNil(p.park(offset: 0, length: 1) { _ in XCTFail("copied past the limit") })
    }

    func testNothingParksWhileHeldOff() {
        let p = ParkedWrites()
        p.holdOff()
        XCTAssertNil(p.park(offset: 0, length: 512) { _ in XCTFail("copied while held off") })
        p.resume()
        XCTAssertNotNil(p.park(offset: 0, length: 512) { $0.initializeMemory(as: UInt8.self, repeating: 0) })
    }

    func testParkedDataLiesOverAReadAndFillsItsHoles() {
        let p = ParkedWrites()
        _ = park(p, 1024, 7, 1024)
        _ = park(p, 1536, 9, 1024)   // newer, overlapping the end of the first
        var buf = [UInt8](repeating: 0, count: 4096)
        var holes = [0..<4096]
        buf.withUnsafeMutableBytes { VDIHandle.lay(p.overlapping(0, 4096), over: $0, at: 0, holes: &holes) }
        XCTAssertEqual(Array(buf[0..<1024]), [UInt8](repeating: 0, count: 1024))
        XCTAssertEqual(Array(buf[1024..<1536]), [UInt8](repeating: 7, count: 512))
        XCTAssertEqual(Array(buf[1536..<2560]), [UInt8](repeating: 9, count: 1024))
        XCTAssertEqual(holes, [0..<1024, 2560..<4096])
    }
}

final class Box: @unchecked Sendable { var error: Error? }

/// The parking write path end to end on a real SR: CBT on, a fresh log after a snapshot,
/// many async writes (overlapping, acknowledged before their bits are durable).
extension SRTests {
    func testAcknowledgedWritesAreReadBackInOrderAndLoggedAndLandOnDisk() throws {
        let size: UInt64 = 8 << 20
        let r = try sr.create(.init(nameLabel: "d", virtualSize: size))
        try sr.enableCBT(r.uuid)
        let h = try sr.attach(r.uuid)
        // Every 2 MiB block allocated in the leaf after the snapshot, so writes may park.
        let snap = try sr.snapshot(r.uuid)
        for b in 0..<4 { try [UInt8](repeating: 0xEE, count: 512).withUnsafeBytes { try h.write($0, at: UInt64(b) << 21) } }
        var model = [UInt8](repeating: 0, count: Int(size))
        for b in 0..<4 { model.replaceSubrange((b << 21)..<((b << 21) + 512), with: [UInt8](repeating: 0xEE, count: 512)) }
        let queue = DispatchQueue(label: "io", attributes: .concurrent)
        var rng = SystemRandomNumberGenerator()
        var touched = Set<Int>()
        for round in 0..<400 {
            let len = Int.random(in: 1...16, using: &rng) * 512
            let off = UInt64.random(in: 0...(size - UInt64(len)) / 512, using: &rng) * 512
            let data = [UInt8](repeating: UInt8(truncatingIfNeeded: round + 1), count: len)
            let acked = DispatchSemaphore(value: 0)
            let failure = Box()
            h.write(length: len, at: off, on: queue, withBytes: { body in try data.withUnsafeBytes(body) }) { e in
                failure.error = e
                acked.signal()
            }
            acked.wait()
            XCTAssertNil(failure.error)
            model.replaceSubrange(Int(off)..<(Int(off) + len), with: data)
            for blk in Int(off >> 16)...Int((off + UInt64(len) - 1) >> 16) { touched.insert(blk) }
            // Read back at once, over the write and a little around it.
            let from = off >= 4096 ? off - 4096 : 0, n = Int(min(size - from, UInt64(len) + 8192))
            var got = [UInt8](repeating: 0, count: n)
            try got.withUnsafeMutableBytes { try h.read(into: $0, at: from) }
            XCTAssertEqual(got, Array(model[Int(from)..<(Int(from) + n)]), "round \(round)")
        }
        try h.flush()
        XCTAssertTrue(h.parked.isEmpty)
        // A write to a 64 KiB block new to the log, in space the leaf holds, is parked:
        // about one per block of the 128 here.
        XCTAssertGreaterThan(h.parked.parkedCount, touched.count / 2)
        sr.detach(h)
        // On disk: the chain holds the model, and the log marks exactly the touched blocks.
        let chain = try VHDChain.open(path: sr.imagePath(r.uuid), writable: false)
        var disk = [UInt8](repeating: 0, count: Int(size))
        try disk.withUnsafeMutableBytes { try chain.read(into: $0, at: 0) }
        chain.close()
        XCTAssertEqual(disk, model)
        let snap2 = try sr.snapshot(r.uuid)
        let bits = try sr.changedBlocks(from: snap.uuid, to: snap2.uuid)
        var marked = Set<Int>()
        for (i, byte) in bits.enumerated() { for k in 0..<8 where byte & (0x80 >> k) != 0 { marked.insert(i * 8 + k) } }
        XCTAssertEqual(marked, touched.union((0..<4).map { $0 * 32 }))
    }
}
