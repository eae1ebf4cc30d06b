import Foundation
import GRDB
import Locking
import XCTest
@testable import Storage

/// The collector against a model: every VDI and snapshot must read exactly what was
/// written to it, whatever was merged, relinked or deleted meanwhile.
final class CollectorTests: XCTestCase {
    var dir: String!
    var sr: SR!
    static let size: UInt64 = 16 << 20

    override func setUpWithError() throws {
        dir = NSTemporaryDirectory() + "gctests-" + UUID().uuidString
        sr = try SR(path: dir)
        sr.attachLingerSeconds = 0
    }

    override func tearDown() { try? FileManager.default.removeItem(atPath: dir) }

    func write(_ uuid: String, _ bytes: [UInt8], at offset: UInt64, model: inout [UInt8]) throws {
        let h = try sr.attach(uuid)
        defer { sr.detach(h) }
        try bytes.withUnsafeBytes { try h.write($0, at: offset) }
        model.replaceSubrange(Int(offset)..<(Int(offset) + bytes.count), with: bytes)
    }

    func contents(_ uuid: String) throws -> [UInt8] {
        let h = try sr.attach(uuid)
        defer { sr.detach(h) }
        var out = [UInt8](repeating: 0xEE, count: Int(h.virtualSize))
        try out.withUnsafeMutableBytes { try h.read(into: $0, at: 0) }
        return out
    }

    func imageFiles() -> [String] {
        ((try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []).filter { $0.hasSuffix(".vhd") }.sorted()
    }

    func depth(_ uuid: String) throws -> Int { Int(try sr.record(uuid).smConfig["chain-depth"] ?? "") ?? -1 }

    func randomWrite(_ uuid: String, model: inout [UInt8], rng: inout some RandomNumberGenerator) throws {
        let size = UInt64(model.count)
        let sector = UInt64.random(in: 0..<(size / 512), using: &rng)
        let count = Int.random(in: 1...min(4096, Int(size / 512 - sector)), using: &rng)
        let fill = UInt8.random(in: 1...255, using: &rng)
        try write(uuid, [UInt8](repeating: fill, count: count * 512), at: sector * 512, model: &model)
    }

    func testLeafCoalesceLeavesOneFileWithTheSameBytes() throws {
        let r = try sr.create(.init(nameLabel: "d", virtualSize: Self.size))
        var model = [UInt8](repeating: 0, count: Int(Self.size))
        var rng = SystemRandomNumberGenerator()
        for _ in 0..<20 { try randomWrite(r.uuid, model: &model, rng: &rng) }
        let s = try sr.snapshot(r.uuid)
        for _ in 0..<20 { try randomWrite(r.uuid, model: &model, rng: &rng) }
        XCTAssertEqual(try depth(r.uuid), 2)
        try sr.destroy(s.uuid)
        sr.startCollector()
        XCTAssertTrue(sr.collector.waitIdle(timeout: 60))
        XCTAssertEqual(try depth(r.uuid), 1)
        XCTAssertNil(try sr.record(r.uuid).smConfig["vhd-parent"])
        XCTAssertEqual(imageFiles(), [r.uuid + ".vhd"])
        XCTAssertEqual(try contents(r.uuid), model)
        XCTAssertNil(sr.format.check(path: sr.imagePath(r.uuid)))
        XCTAssertNil(sr.collector.status.lastError)
    }

    /// A VDI written between two snapshots and after them (depth 3): the VDI, its
    /// snapshots, what the second holds and what the VDI holds.
    func twoSnapshotChain() throws -> (r: VDIRecord, s1: VDIRecord, s2: VDIRecord, m2: [UInt8], model: [UInt8]) {
        let r = try sr.create(.init(nameLabel: "d", virtualSize: Self.size))
        var model = [UInt8](repeating: 0, count: Int(Self.size))
        var rng = SystemRandomNumberGenerator()
        for _ in 0..<10 { try randomWrite(r.uuid, model: &model, rng: &rng) }
        let s1 = try sr.snapshot(r.uuid)
        for _ in 0..<10 { try randomWrite(r.uuid, model: &model, rng: &rng) }
        let s2 = try sr.snapshot(r.uuid)
        let m2 = model
        for _ in 0..<10 { try randomWrite(r.uuid, model: &model, rng: &rng) }
        return (r, s1, s2, m2, model)
    }

    func testNonLeafCoalesceRelinksTheChildren() throws {
        let (r, s1, s2, m2, model) = try twoSnapshotChain()
        XCTAssertEqual(try depth(r.uuid), 3)
        // The leaf is attached throughout: its chain is reopened under it.
        let h = try sr.attach(r.uuid)
        try sr.destroy(s1.uuid)
        sr.startCollector()
        XCTAssertTrue(sr.collector.waitIdle(timeout: 60))
        XCTAssertEqual(try depth(r.uuid), 2)
        XCTAssertEqual(try depth(s2.uuid), 2)
        XCTAssertEqual(try sr.record(r.uuid).parent, try sr.record(s2.uuid).parent)
        XCTAssertEqual(h.withChain { $0.depth }, 2, "the open chain was reopened")
        XCTAssertEqual(try contents(s2.uuid), m2)
        XCTAssertEqual(try contents(r.uuid), model)
        sr.detach(h)
        XCTAssertEqual(imageFiles().count, 3)
        for f in imageFiles() { XCTAssertNil(sr.format.check(path: dir + "/" + f)) }
    }

    /// Writes keep landing on the leaf while it is merged: none is lost, none reads wrong.
    func testWritesDuringALeafCoalesceAreKept() throws {
        let size: UInt64 = 64 << 20
        let r = try sr.create(.init(nameLabel: "d", virtualSize: size))
        var model = [UInt8](repeating: 0, count: Int(size)), writes = 0
        // A fully written leaf over a base, so the merge copies 64 MiB.
        let s = try sr.snapshot(r.uuid)
        for i in 0..<32 { try write(r.uuid, [UInt8](repeating: UInt8(i + 1), count: 2 << 20), at: UInt64(i) << 21, model: &model) }
        try sr.destroy(s.uuid)
        let h = try sr.attach(r.uuid)
        let shared = Mutex(WriterState(model: model))
        let writer = Thread {
            var rng = SystemRandomNumberGenerator()
            while true {
                if shared.withLock({ $0.stop }) { return }
                let sector = UInt64.random(in: 0..<(size / 512 - 64), using: &rng)
                let bytes = [UInt8](repeating: UInt8.random(in: 1...255, using: &rng), count: Int.random(in: 1...64, using: &rng) * 512)
                try! bytes.withUnsafeBytes { try h.write($0, at: sector * 512) }
                shared.withLock {
                    $0.model.replaceSubrange(Int(sector * 512)..<(Int(sector * 512) + bytes.count), with: bytes)
                    $0.writes += 1
                }
            }
        }
        writer.start()
        sr.startCollector()
        XCTAssertTrue(sr.collector.waitIdle(timeout: 120))
        shared.withLock { $0.stop = true }
        while !writer.isFinished { usleep(1000) }
        (model, writes) = shared.withLock { ($0.model, $0.writes) }
        XCTAssertGreaterThan(writes, 0)
        XCTAssertEqual(try depth(r.uuid), 1)
        XCTAssertEqual(h.withChain { $0.depth }, 1)
        var got = [UInt8](repeating: 0, count: Int(size))
        try got.withUnsafeMutableBytes { try h.read(into: $0, at: 0) }
        sr.detach(h)
        XCTAssertTrue(got == model, "the VDI reads its model after \(writes) writes during the merge")
        XCTAssertEqual(imageFiles(), [r.uuid + ".vhd"])
    }

    /// Several writers at once, each in its own stretch, while the leaf is merged again and
    /// again, every write allocating or landing in a block during the copy or its catch-up
    /// passes: nothing written is lost. (The ordering the catch-up depends on, a write
    /// marked only once it has landed, is pinned down in `TrackerOrderingTests`.)
    func testConcurrentWritersAcrossRepeatedLeafCoalescesLoseNothing() throws {
        let size: UInt64 = 128 << 20, writers = 4
        let r = try sr.create(.init(nameLabel: "d", virtualSize: size))
        var base = [UInt8](repeating: 0, count: Int(size))
        // A full base, so each merge has a layer to move and the leaf stays small.
        for i in 0..<Int(size >> 21) { try write(r.uuid, [UInt8](repeating: UInt8(i % 250 + 1), count: 2 << 20), at: UInt64(i) << 21, model: &base) }
        sr.startCollector()
        let h = try sr.attach(r.uuid)
        let shared = Mutex(WriterState(model: base))
        let stretch = size / UInt64(writers)
        let threads = (0..<writers).map { w in
            Thread {
                var rng = SystemRandomNumberGenerator()
                var n: UInt32 = 0
                while true {
                    if shared.withLock({ $0.stop }) { return }
                    // 4 KiB stamped with the writer and a counter, anywhere in its stretch.
                    let at = UInt64(w) * stretch + UInt64.random(in: 0..<(stretch / 4096), using: &rng) * 4096
                    n += 1
                    var bytes = [UInt8](repeating: UInt8(w + 1), count: 4096)
                    withUnsafeBytes(of: n.littleEndian) { for k in 0..<4 { bytes[k] = $0[k] } }
                    try! bytes.withUnsafeBytes { try h.write($0, at: at) }
                    shared.withLock {
                        $0.model.replaceSubrange(Int(at)..<(Int(at) + 4096), with: bytes)
                        $0.writes += 1
                    }
                }
            }
        }
        threads.forEach { $0.start() }
        for _ in 0..<6 {
            // The merge waits until the new leaf holds many blocks, each written while
            // its allocation (copy-up, sync) was under way.
            try sr.addToOtherConfig(key: "gc", value: "false")
            let s = try sr.snapshot(r.uuid)
            try sr.destroy(s.uuid)
            usleep(300_000)
            try sr.removeFromOtherConfig(key: "gc")
            XCTAssertTrue(sr.collector.waitIdle(timeout: 120))
        }
        shared.withLock { $0.stop = true }
        while threads.contains(where: { !$0.isFinished }) { usleep(1000) }
        let (model, writes) = shared.withLock { ($0.model, $0.writes) }
        XCTAssertEqual(try depth(r.uuid), 1)
        var got = [UInt8](repeating: 0, count: Int(size))
        try got.withUnsafeMutableBytes { try h.read(into: $0, at: 0) }
        sr.detach(h)
        var wrong = 0
        for o in stride(from: 0, to: Int(size), by: 4096) where got[o..<(o + 4096)] != model[o..<(o + 4096)] { wrong += 1 }
        XCTAssertEqual(wrong, 0, "4 KiB pieces wrong after \(writes) writes from \(writers) writers across six merges")
    }

    /// Random create / write / snapshot / destroy / data_destroy / scan with the collector
    /// running all along; every VDI checked against its model after every step.
    func testRandomSequencesMatchTheModel() throws {
        sr.startCollector()
        var models: [String: [UInt8]] = [:]
        var cbt: Set<String> = []
        var rng = SystemRandomNumberGenerator()
        for step in 0..<80 {
            let live = try sr.allRecords().filter { $0.type != .cbtMetadata }
            let leaves = live.filter { !$0.isASnapshot }
            switch Int.random(in: 0..<13, using: &rng) {
            case 0 where leaves.count < 4, _ where live.isEmpty:
                let r = try sr.create(.init(nameLabel: "v\(step)", virtualSize: 6 << 20))
                models[r.uuid] = [UInt8](repeating: 0, count: 6 << 20)
                if Bool.random(using: &rng) { try sr.enableCBT(r.uuid); cbt.insert(r.uuid) }
            case 1, 2, 3, 4:
                guard let v = leaves.randomElement(using: &rng) else { continue }
                try randomWrite(v.uuid, model: &models[v.uuid]!, rng: &rng)
            case 5, 6:
                guard let v = leaves.randomElement(using: &rng) else { continue }
                do {
                    let s = try sr.snapshot(v.uuid)
                    models[s.uuid] = models[v.uuid]
                } catch let e as StorageError where e.code == "SR_BACKEND_FAILURE_109" { continue }
            case 7:
                guard let v = live.randomElement(using: &rng) else { continue }
                try sr.destroy(v.uuid)
                models[v.uuid] = nil
            case 8:
                guard let s = live.filter({ $0.isASnapshot && $0.cbtEnabled }).randomElement(using: &rng) else { continue }
                try sr.dataDestroy(s.uuid)
                models[s.uuid] = nil
            case 9:
                // A clone of a VDI or a snapshot: a new writable VDI with the same bytes.
                guard let v = live.randomElement(using: &rng) else { continue }
                do {
                    let c = try sr.clone(v.uuid)
                    models[c.uuid] = models[v.uuid]
                } catch let e as StorageError where e.code == "SR_BACKEND_FAILURE_109" { continue }
            case 10:
                // A copy, into a fresh VDI or over another leaf.
                guard let v = live.randomElement(using: &rng) else { continue }
                let into = leaves.filter { $0.uuid != v.uuid }.randomElement(using: &rng).flatMap { Bool.random(using: &rng) ? $0 : nil }
                let t = try sr.copy(v.uuid, base: nil, into: into?.uuid, task: nil)
                models[t.uuid] = models[v.uuid]
            case 11:
                // forget, then scan brings it back with the same bytes (without CBT).
                guard let v = leaves.filter({ !$0.cbtEnabled }).randomElement(using: &rng) else { continue }
                try sr.forget(v.uuid)
                XCTAssertThrowsError(try sr.record(v.uuid))
                XCTAssertTrue(try sr.scan().introduced.contains(v.uuid), "step \(step): forgotten \(v.uuid) not reintroduced")
            default:
                _ = try sr.scan()
            }
            // Every VDI every 8 steps, three at random in between (reads are slow in debug builds).
            let check = step % 8 == 7 ? Array(models.keys) : Array(models.keys.shuffled(using: &rng).prefix(3))
            for u in check { XCTAssertTrue(try contents(u) == models[u], "step \(step): VDI \(u) differs from its model") }
        }
        XCTAssertTrue(sr.collector.waitIdle(timeout: 60))
        for (u, m) in models { XCTAssertTrue(try contents(u) == m, "after the collector: VDI \(u) differs") }
        // Every file is a live VDI's or a needed base; every base has two children or more.
        let all = try sr.dbRead { try VDIRecord.fetchAll($0) }
        let withFiles = all.filter { $0.type != .cbtMetadata }
        XCTAssertEqual(Set(imageFiles()), Set(withFiles.map { $0.uuid + ".vhd" }))
        for b in withFiles where !b.managed {
            XCTAssertGreaterThanOrEqual(withFiles.filter { $0.parent == b.uuid }.count, 2, "base \(b.uuid) should have been merged")
        }
        XCTAssertNil(sr.collector.status.lastError)
    }

    func testSnapshotPastDepthThirtyIsRefusedAndChangesNothing() throws {
        let r = try sr.create(.init(nameLabel: "d", virtualSize: 1 << 20))
        for _ in 0..<29 { _ = try sr.snapshot(r.uuid) }
        XCTAssertEqual(try depth(r.uuid), 30)
        let files = imageFiles(), records = try sr.dbRead { try VDIRecord.fetchCount($0) }
        XCTAssertThrowsError(try sr.snapshot(r.uuid)) { e in
            XCTAssertEqual((e as? StorageError)?.code, "SR_BACKEND_FAILURE_109")
            XCTAssertEqual((e as? StorageError)?.params, ["", "The snapshot chain is too long", ""])
        }
        XCTAssertEqual(imageFiles(), files)
        XCTAssertEqual(try sr.dbRead { try VDIRecord.fetchCount($0) }, records)
    }

    func testGCFalseAndLeafCoalesceFalseKeepChains() throws {
        let r = try sr.create(.init(nameLabel: "d", virtualSize: 1 << 20))
        try sr.destroy(try sr.snapshot(r.uuid).uuid)
        try sr.addToOtherConfig(key: "gc", value: "false")
        sr.startCollector()
        XCTAssertTrue(sr.collector.waitIdle(timeout: 30))
        XCTAssertEqual(try depth(r.uuid), 2)
        XCTAssertEqual(sr.collector.status.pending, [r.uuid])
        XCTAssertFalse(sr.collector.status.enabled)
        try sr.updateRecord(r.uuid) { $0.otherConfig["leaf-coalesce"] = "false" }
        try sr.removeFromOtherConfig(key: "gc")
        XCTAssertTrue(sr.collector.waitIdle(timeout: 30))
        XCTAssertEqual(try depth(r.uuid), 2, "leaf-coalesce=false keeps the leaf's chain")
        try sr.updateRecord(r.uuid) { $0.otherConfig["leaf-coalesce"] = nil }
        XCTAssertTrue(sr.collector.waitIdle(timeout: 30))
        XCTAssertEqual(try depth(r.uuid), 1)
    }

    /// Logs are independent of the image files: the same changed blocks after coalescing.
    /// Copies and exports of a VDI while the collector merges its chain under them: each
    /// opens a whole chain (not a leaf read before a switch with a parent looked up after
    /// it, a file by then renamed), so each succeeds with the VDI's bytes.
    func testCopiesAndExportsDuringMergesSucceed() throws {
        let r = try sr.create(.init(nameLabel: "d", virtualSize: Self.size))
        var model = [UInt8](repeating: 0, count: Int(Self.size))
        var rng = SystemRandomNumberGenerator()
        sr.startCollector()
        var copies = 0
        for round in 0..<12 {
            try sr.addToOtherConfig(key: "gc", value: "false")
            let keep = try sr.snapshot(r.uuid)
            for _ in 0..<10 { try randomWrite(r.uuid, model: &model, rng: &rng) }
            let gone = try sr.snapshot(r.uuid)
            for _ in 0..<10 { try randomWrite(r.uuid, model: &model, rng: &rng) }
            // Destroying `gone` leaves a hidden base with one child (a leaf merge); with
            // `keep` destroyed on odd rounds, a base under it too (a non-leaf merge).
            try sr.destroy(gone.uuid)
            if round % 2 == 1 { try sr.destroy(keep.uuid) }
            try sr.removeFromOtherConfig(key: "gc")
            let mark = sr.collector.kickAndMark()
            repeat {
                let c = try sr.copy(r.uuid, base: nil, into: nil, task: nil)
                XCTAssertEqual(try contents(c.uuid), model, "copy \(copies) in round \(round)")
                try sr.destroy(c.uuid)
                let e = try sr.openExport(r.uuid, format: "raw", base: nil)
                var got = [UInt8](repeating: 0, count: Int(Self.size))
                var holes: [Range<Int>] = []
                _ = try got.withUnsafeMutableBytes { try e.read(at: 0, into: $0, holes: &holes) }
                e.close()
                XCTAssertEqual(got, model, "export \(copies) in round \(round)")
                copies += 1
            } while !sr.collector.waitFinished(mark, timeout: 0)
            if round % 2 == 0 { try sr.destroy(keep.uuid) }
        }
        XCTAssertTrue(sr.collector.waitIdle(timeout: 60))
        XCTAssertEqual(try depth(r.uuid), 1)
        XCTAssertEqual(try contents(r.uuid), model)
        XCTAssertNil(sr.collector.status.lastError)
    }

    func testChangedBlocksAreTheSameAfterCoalescing() throws {
        let r = try sr.create(.init(nameLabel: "d", virtualSize: Self.size))
        try sr.enableCBT(r.uuid)
        var model = [UInt8](repeating: 0, count: Int(Self.size))
        var rng = SystemRandomNumberGenerator()
        var snaps: [String] = []
        for _ in 0..<4 {
            for _ in 0..<5 { try randomWrite(r.uuid, model: &model, rng: &rng) }
            snaps.append(try sr.snapshot(r.uuid).uuid)
        }
        try sr.dataDestroy(snaps[0])
        try sr.dataDestroy(snaps[1])
        let before = try (1..<snaps.count).map { try sr.listChangedBlocks(from: snaps[$0 - 1], to: snaps[$0]) }
        let toLeaf = try sr.listChangedBlocks(from: snaps[0], to: r.uuid)
        sr.startCollector()
        XCTAssertTrue(sr.collector.waitIdle(timeout: 60))
        // Two snapshots kept with data: at most three layers.
        XCTAssertEqual(try depth(r.uuid), 3)
        let after = try (1..<snaps.count).map { try sr.listChangedBlocks(from: snaps[$0 - 1], to: snaps[$0]) }
        XCTAssertEqual(before, after)
        XCTAssertEqual(toLeaf, try sr.listChangedBlocks(from: snaps[0], to: r.uuid))
        XCTAssertEqual(try contents(r.uuid), model)
        XCTAssertTrue(try sr.record(r.uuid).cbtEnabled)
    }

    func testTasksRunAndCanBeCancelledAndDestroyed() throws {
        let t = sr.tasks
        let quick = t.run(name: "VDI.get_all") { _ in "[]" }
        let slow = t.run(name: "wait") { ctx in
            while true {
                try ctx.checkCancelled()
                usleep(1000)
            }
        }
        var spins = 0
        while t.record(quick)?.status == .pending, spins < 5000 { usleep(1000); spins += 1 }
        XCTAssertEqual(t.record(quick)?.status, .success)
        XCTAssertEqual(t.record(quick)?.result, "[]")
        XCTAssertEqual(t.record(quick)?.progress, 1)
        XCTAssertThrowsError(try t.destroy(slow)) { XCTAssertEqual(($0 as? StorageError)?.code, "OPERATION_NOT_ALLOWED") }
        try t.cancel(slow)
        spins = 0
        while t.record(slow)?.finished == nil, spins < 5000 { usleep(1000); spins += 1 }
        XCTAssertEqual(t.record(slow)?.status, .cancelled)
        XCTAssertEqual(t.record(slow)?.errorInfo.first, "TASK_CANCELLED")
        try t.destroy(slow)
        XCTAssertNil(t.record(slow))
        XCTAssertThrowsError(try t.cancel(UUID().uuidString)) { XCTAssertEqual(($0 as? StorageError)?.code, "HANDLE_INVALID") }
    }

    /// A VDI forgotten while a merge under it copies: its file still reads through the
    /// layer being merged, so the switch is held off (the family is kept as it is) until a
    /// scan brings the VDI back, and then both children are relinked.
    func testForgetDuringACoalesceCopyKeepsTheForgottenFileReadable() throws {
        let (r, s1, s2, m2, model) = try twoSnapshotChain()
        try sr.destroy(s1.uuid)
        let forgot = Atomic(false)
        let sr = self.sr!
        sr.collector.setStepHook { step in
            guard step == "copy", !forgot.exchange(true, ordering: .relaxed) else { return }
            do { try sr.forget(s2.uuid) } catch { XCTFail("forget: \(error)") }
        }
        sr.startCollector()
        XCTAssertTrue(sr.collector.waitIdle(timeout: 60))
        XCTAssertTrue(forgot.load(ordering: .relaxed), "the forget came during a merge's copy")
        XCTAssertEqual(try depth(r.uuid), 3, "nothing merged while the forgotten file reads through the chain")
        XCTAssertEqual(try sr.scan().introduced, [s2.uuid])
        XCTAssertTrue(sr.collector.waitIdle(timeout: 60))
        XCTAssertEqual(try depth(r.uuid), 2)
        XCTAssertEqual(try depth(s2.uuid), 2)
        XCTAssertEqual(try contents(s2.uuid), m2)
        XCTAssertEqual(try contents(r.uuid), model)
    }

    /// A scan finds files without records (introduced, data kept) and records without files.
    func testScanIntroducesOrphansAndReportsMissingFiles() throws {
        let r = try sr.create(.init(nameLabel: "d", virtualSize: 1 << 20))
        var model = [UInt8](repeating: 0, count: 1 << 20)
        try write(r.uuid, [UInt8](repeating: 7, count: 4096), at: 0, model: &model)
        let orphan = UUID().uuidString.lowercased()
        XCTAssertEqual(link(sr.imagePath(r.uuid), sr.imagePath(orphan)), 0)
        let gone = try sr.create(.init(nameLabel: "gone", virtualSize: 1 << 20))
        unlink(sr.imagePath(gone.uuid))
        let report = try sr.scan()
        XCTAssertEqual(report.introduced, [orphan])
        XCTAssertEqual(report.missing, [gone.uuid])
        XCTAssertEqual(try contents(orphan), model)
    }
}

/// What writer threads and the test share: the model they write into and when to stop.
struct WriterState: Sendable {
    var model: [UInt8]
    var stop = false
    var writes = 0
}
