import Foundation
import GRDB
import Locking
import XCTest
@testable import Storage
import VHD

final class SRTests: XCTestCase {
    var dir: String!
    var sr: SR!

    override func setUpWithError() throws {
        dir = NSTemporaryDirectory() + "srtests-" + UUID().uuidString
        sr = try SR(path: dir)
        sr.endpoints = [NBDEndpoint(address: "127.0.0.1", port: 10809)]
    }

    override func tearDown() { try? FileManager.default.removeItem(atPath: dir) }

    func testCreateWritesAVHDAndARecord() throws {
        let r = try sr.create(.init(nameLabel: "d", virtualSize: 10 << 20))
        XCTAssertEqual(r.virtualSize, 10 << 20)
        XCTAssertTrue(FileManager.default.fileExists(atPath: sr.imagePath(r.uuid)))
        XCTAssertEqual(VHDCheck.check(path: sr.imagePath(r.uuid)), [])
        XCTAssertEqual(try sr.allRecords().map(\.uuid), [r.uuid])
    }

    func testClosedXenAPIEnumsAreStoredByTheirXenAPINames() throws {
        let db = try DatabaseQueue()
        try Schema.migrator().migrate(db)
        var r = VDIRecord(uuid: UUID().uuidString.lowercased(), nameLabel: "d", virtualSize: 512)
        XCTAssertEqual(r.type, .user)
        XCTAssertEqual(r.onBoot, .persist)
        r.type = .cbtMetadata
        r.onBoot = .reset
        r.created = Date(timeIntervalSince1970: 1_800_000_000)  // whole seconds: the column keeps milliseconds
        try db.write { try r.insert($0) }
        let raw = try db.read { try Row.fetchOne($0, sql: "SELECT type, on_boot FROM vdi")! }
        XCTAssertEqual(raw["type"] as String, "cbt_metadata")
        XCTAssertEqual(raw["on_boot"] as String, "reset")
        XCTAssertEqual(try db.read { try VDIRecord.fetchOne($0) }, r)
        let json = String(decoding: try JSONEncoder().encode(r), as: UTF8.self)
        XCTAssertTrue(json.contains(#""type":"cbt_metadata""#), json)
    }

    func testDiskErrorsKeepTheErrnoAndTheImagesOwnError() throws {
        let full = DiskError(VHDError.io(path: "/x.vhd", errno: .noSpace))
        XCTAssertEqual(full.kind, .noSpace)
        XCTAssertEqual(full.errno, .noSpace)
        XCTAssertEqual(full.cause as? VHDError, .io(path: "/x.vhd", errno: .noSpace))
        XCTAssertEqual(DiskError(VHDError.io(path: "/x", errno: .readOnlyFileSystem)).kind, .notPermitted)
        XCTAssertEqual(DiskError(VHDError.zeroingNotFast).kind, .zeroingNotFast)
        XCTAssertEqual(DiskError(VHDError.badChecksum(structure: "footer", expected: 1, found: 2)).kind, .io)
        XCTAssertEqual(DiskError(DiskError(VHDError.readOnly(path: "p"))).kind, .readOnly, "mapped once")
        // Through a handle: a read past the end is refused as out of range, the cause kept.
        let r = try sr.create(.init(nameLabel: "d", virtualSize: 1 << 20))
        let h = try sr.attach(r.uuid)
        defer { sr.detach(h) }
        var buf = [UInt8](repeating: 0, count: 4096)
        XCTAssertThrowsError(try buf.withUnsafeMutableBytes { try h.read(into: $0, at: 1 << 20) }) { e in
            XCTAssertEqual((e as? DiskError)?.kind, .outOfRange)
            guard case .outOfRange? = (e as? DiskError)?.cause as? VHDError else { return XCTFail("cause lost: \(e)") }
        }
    }

    func testAChainLingersAfterItsLastDetachWithoutHoldingTheVDI() throws {
        sr.attachLingerSeconds = 0.3
        let r = try sr.create(.init(nameLabel: "d", virtualSize: 1 << 20))
        let h = try sr.attach(r.uuid)
        sr.detach(h)
        XCTAssertFalse(sr.isAttached(r.uuid), "a lingering chain is not an attachment")
        // isAttached closed the lingering handle: the next attach opens anew.
        let h2 = try sr.attach(r.uuid)
        XCTAssertFalse(h2 === h)
        sr.detach(h2)
        // Reconnecting within the linger takes the same open chain back.
        let h3 = try sr.attach(r.uuid)
        XCTAssertTrue(h3 === h2, "reattached within the linger: the chain is reused")
        sr.detach(h3)
        // Control operations see an unattached VDI at once.
        _ = try sr.resize(r.uuid, size: 2 << 20)
        let h4 = try sr.attach(r.uuid)
        XCTAssertEqual(h4.virtualSize, 2 << 20)
        sr.detach(h4)
        // Reading change logs keeps the linger: list_changed_blocks between a backup's
        // connections must not make the next one reopen the chain.
        try sr.enableCBT(r.uuid)
        let base = try sr.snapshot(r.uuid)
        let h5 = try sr.attach(r.uuid)
        sr.detach(h5)
        _ = try sr.changedBlocks(from: base.uuid, to: r.uuid)
        XCTAssertTrue(try sr.attach(r.uuid) === h5, "list_changed_blocks closed the lingering chain")
        sr.detach(h5)
        // After the linger the chain is closed.
        Thread.sleep(forTimeInterval: 0.8)
        XCTAssertNil(sr.withHandlesLocked { $0[r.uuid] })
        try sr.destroy(r.uuid)
        try sr.destroy(base.uuid)
    }

    func testCreateRoundsSizeUpToASector() throws {
        XCTAssertEqual(try sr.create(.init(nameLabel: "d", virtualSize: 1000)).virtualSize, 1024)
    }

    func testCreateRefusesZeroSize() {
        XCTAssertThrowsError(try sr.create(.init(nameLabel: "d", virtualSize: 0))) {
            XCTAssertEqual(($0 as? StorageError)?.code, "VALUE_NOT_SUPPORTED")
        }
    }

    func testBadUUIDIsUUIDInvalidAndUnknownIsVDIMissing() {
        XCTAssertThrowsError(try sr.record("nope")) { XCTAssertEqual(($0 as? StorageError)?.code, "UUID_INVALID") }
        XCTAssertThrowsError(try sr.record(UUID().uuidString)) { XCTAssertEqual(($0 as? StorageError)?.code, "VDI_MISSING") }
    }

    /// A connection detaching while a snapshot runs: neither sees the other halfway. The
    /// snapshot never works on a handle that detach has closed (which reopened the chain
    /// into a handle nobody held, leaking its descriptors), and the data stays.
    func testSnapshotRacingDetachLeaksNothing() throws {
        sr.attachLingerSeconds = 0  // the race is between a detach that closes and a snapshot
        let r = try sr.create(.init(nameLabel: "d", virtualSize: 4 << 20))
        func openFDs() -> Int { (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd").count) ?? 0 }
        let before = openFDs()
        for i in 0..<25 {  // each snapshot adds a layer (the collector is not running); snapshots stop at depth 30
            let h = try sr.attach(r.uuid)
            try [UInt8](repeating: UInt8(i), count: 4096).withUnsafeBytes { try h.write($0, at: 0) }
            let failure = Mutex<String?>(nil)
            let sr = self.sr!
            DispatchQueue.concurrentPerform(iterations: 2) { k in
                if k == 0 {
                    do { _ = try sr.snapshot(r.uuid) } catch { failure.withLock { $0 = "\(error)" } }
                } else {
                    sr.detach(h)
                }
            }
            XCTAssertNil(failure.withLock { $0 })
            XCTAssertFalse(sr.isAttached(r.uuid))
            let again = try sr.attach(r.uuid)
            var got = [UInt8](repeating: 0, count: 4096)
            try got.withUnsafeMutableBytes { try again.read(into: $0, at: 0) }
            XCTAssertEqual(got, [UInt8](repeating: UInt8(i), count: 4096))
            sr.detach(again)
        }
        // Each snapshot leaves three layers open nowhere: descriptors come back to the start.
        XCTAssertLessThanOrEqual(openFDs(), before + 2)
    }

    func testSnapshotKeepsOldBytesAndLeafStaysWritable() throws {
        let r = try sr.create(.init(nameLabel: "d", virtualSize: 4 << 20))
        let h = try sr.attach(r.uuid)
        try [UInt8](repeating: 1, count: 4096).withUnsafeBytes { try h.write($0, at: 0) }
        let s = try sr.snapshot(r.uuid)
        XCTAssertTrue(s.isASnapshot)
        XCTAssertEqual(s.snapshotOf, r.uuid)
        try [UInt8](repeating: 2, count: 4096).withUnsafeBytes { try h.write($0, at: 0) }
        var now = [UInt8](repeating: 0, count: 4096)
        try now.withUnsafeMutableBytes { try h.read(into: $0, at: 0) }
        XCTAssertEqual(now, [UInt8](repeating: 2, count: 4096))
        let sh = try sr.attach(s.uuid)
        var old = [UInt8](repeating: 0, count: 4096)
        try old.withUnsafeMutableBytes { try sh.read(into: $0, at: 0) }
        XCTAssertEqual(old, [UInt8](repeating: 1, count: 4096))
        XCTAssertFalse(sh.writable)
        sr.detach(sh)
        sr.detach(h)
        XCTAssertEqual(Set(try sr.allRecords().map(\.uuid)), [r.uuid, s.uuid])
    }

    func testResizeGrowsTheVDIAndKeepsItsData() throws {
        let r = try sr.create(.init(nameLabel: "d", virtualSize: 8 << 20))
        var h = try sr.attach(r.uuid)
        try [UInt8](repeating: 7, count: 4096).withUnsafeBytes { try h.write($0, at: (8 << 20) - 4096) }
        let s = try sr.snapshot(r.uuid)
        sr.detach(h)
        let g = try sr.resize(r.uuid, size: (1 << 30) + 1)
        XCTAssertEqual(g.virtualSize, (1 << 30) + 512)
        XCTAssertEqual(try sr.record(s.uuid).virtualSize, 8 << 20)
        XCTAssertEqual(VHDCheck.check(path: sr.imagePath(r.uuid)), [])
        h = try sr.attach(r.uuid)
        defer { sr.detach(h) }
        XCTAssertEqual(h.virtualSize, (1 << 30) + 512)
        var buf = [UInt8](repeating: 1, count: 8192)
        try buf.withUnsafeMutableBytes { try h.read(into: $0, at: (8 << 20) - 4096) }
        XCTAssertEqual(buf, [UInt8](repeating: 7, count: 4096) + [UInt8](repeating: 0, count: 4096))
        try [UInt8](repeating: 9, count: 512).withUnsafeBytes { try h.write($0, at: 1 << 30) }
        try buf.withUnsafeMutableBytes { try h.read(into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<512]), at: 1 << 30) }
        XCTAssertEqual(Array(buf[0..<512]), [UInt8](repeating: 9, count: 512))
    }

    func testResizeRefusalsAreTypedAndChangeNothing() throws {
        let r = try sr.create(.init(nameLabel: "d", virtualSize: 8 << 20))
        let s = try sr.snapshot(r.uuid)
        func code(_ body: () throws -> Any) -> String? {
            do { _ = try body(); return nil } catch { return (error as? StorageError)?.code }
        }
        XCTAssertEqual(code { try self.sr.resize(r.uuid, size: 4 << 20) }, "VALUE_NOT_SUPPORTED")
        XCTAssertEqual(code { try self.sr.resize(r.uuid, size: 2041 << 30) }, "VALUE_NOT_SUPPORTED")
        XCTAssertEqual(code { try self.sr.resize(s.uuid, size: 16 << 20) }, "OPERATION_NOT_ALLOWED")
        XCTAssertEqual(code { try self.sr.resize(UUID().uuidString, size: 16 << 20) }, "VDI_MISSING")
        let h = try sr.attach(r.uuid)
        XCTAssertEqual(code { try self.sr.resize(r.uuid, size: 16 << 20) }, "VDI_IN_USE")
        sr.detach(h)
        XCTAssertEqual(try sr.record(r.uuid).virtualSize, 8 << 20)
        XCTAssertEqual(try VHDFile.open(path: sr.imagePath(r.uuid), writable: false).virtualSize, 8 << 20)
    }

    func testResizeGrowsTheChangeLogAndBitmapsCoverTheNewSize() throws {
        let r = try sr.create(.init(nameLabel: "d", virtualSize: 1 << 20))
        try sr.enableCBT(r.uuid)
        var h = try sr.attach(r.uuid)
        try [UInt8](repeating: 1, count: 512).withUnsafeBytes { try h.write($0, at: 0) }
        sr.detach(h)
        let s1 = try sr.snapshot(r.uuid)
        _ = try sr.resize(r.uuid, size: 4 << 20)
        XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: sr.cbtLogPath(r.uuid))).count, 48 + 8)
        h = try sr.attach(r.uuid)
        try [UInt8](repeating: 2, count: 512).withUnsafeBytes { try h.write($0, at: (4 << 20) - 512) }
        sr.detach(h)
        let s2 = try sr.snapshot(r.uuid)
        // 64 blocks of 64 KiB: only the last was written after s1.
        var expected = [UInt8](repeating: 0, count: 8)
        expected[7] = 0x01
        XCTAssertEqual(try sr.changedBlocks(from: s1.uuid, to: s2.uuid), expected)
        XCTAssertTrue(try sr.record(r.uuid).cbtEnabled)
    }

    func testRecoveryTakesTheSizeFromAGrownVHD() throws {
        let r = try sr.create(.init(nameLabel: "d", virtualSize: 8 << 20))
        // A crash after the VHD grew but before the record was written.
        let f = try VHDFile.open(path: sr.imagePath(r.uuid), writable: true)
        try f.grow(to: 32 << 20)
        f.close()
        sr = try SR(path: dir)
        XCTAssertEqual(try sr.record(r.uuid).virtualSize, 32 << 20)
    }

    func testDestroyWhileAttachedIsVDIInUse() throws {
        let r = try sr.create(.init(nameLabel: "d", virtualSize: 1 << 20))
        let h = try sr.attach(r.uuid)
        XCTAssertThrowsError(try sr.destroy(r.uuid)) { XCTAssertEqual(($0 as? StorageError)?.code, "VDI_IN_USE") }
        sr.detach(h)
        try sr.destroy(r.uuid)
        XCTAssertFalse(FileManager.default.fileExists(atPath: sr.imagePath(r.uuid)))
    }

    func testDestroyingBothChildrenCollectsTheBase() throws {
        let r = try sr.create(.init(nameLabel: "d", virtualSize: 1 << 20))
        let s = try sr.snapshot(r.uuid)
        let base = try XCTUnwrap(try sr.dbRead { try VDIRecord.fetchOne($0, key: s.parent!) })
        try sr.destroy(s.uuid)
        try sr.destroy(r.uuid)
        // Without the collector the base stays; its first pass removes it.
        XCTAssertTrue(FileManager.default.fileExists(atPath: sr.imagePath(base.uuid)))
        sr.startCollector()
        XCTAssertTrue(sr.collector.waitIdle(timeout: 30))
        XCTAssertFalse(FileManager.default.fileExists(atPath: sr.imagePath(base.uuid)))
        XCTAssertNil(try sr.anyRecord(base.uuid))
    }

    func testTokensResolveAndAreUnguessable() throws {
        let r = try sr.create(.init(nameLabel: "d", virtualSize: 1 << 20))
        let info = try sr.getNBDInfo(r.uuid)
        XCTAssertEqual(info.count, 1)
        let name = info[0].exportname
        XCTAssertTrue(name.hasPrefix("/\(r.uuid)?token="))
        XCTAssertGreaterThanOrEqual(name.count - "/\(r.uuid)?token=".count, 32)
        guard case .success(let g) = sr.resolve(exportName: name) else { return XCTFail() }
        XCTAssertFalse(g.readOnly)
        XCTAssertNotEqual(try sr.getNBDInfo(r.uuid)[0].exportname, name)
        guard case .failure(.unknown) = sr.resolve(exportName: "/\(r.uuid)?token=guess") else { return XCTFail() }
        guard case .failure(.malformed) = sr.resolve(exportName: "/\(r.uuid)") else { return XCTFail() }
    }

    func testTokensAreKeptAsDigests() throws {
        XCTAssertEqual(TokenDigest.of("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
        XCTAssertTrue(TokenDigest.equal("ab", "ab"))
        XCTAssertFalse(TokenDigest.equal("ab", "ac"))
        XCTAssertFalse(TokenDigest.equal("ab", "abc"))
        let r = try sr.create(.init(nameLabel: "d", virtualSize: 1 << 20))
        let name = try sr.getNBDInfo(r.uuid)[0].exportname
        let secret = String(name[name.range(of: "?token=")!.upperBound...])
        let rows = try sr.dbRead { try TokenRecord.fetchAll($0) }
        XCTAssertEqual(rows.map(\.digest), [TokenDigest.of(secret)])
        guard case .success(let g) = sr.resolve(exportName: name) else { return XCTFail() }
        XCTAssertEqual(g.digest, TokenDigest.of(secret))
        // Revoking by export name finds the token by its digest.
        XCTAssertEqual(try sr.revokeTokens(vdi: r.uuid, exportName: name), 1)
    }

    func testRevokedAndExpiredTokensAreRefused() throws {
        let r = try sr.create(.init(nameLabel: "d", virtualSize: 1 << 20))
        let name = try sr.getNBDInfo(r.uuid)[0].exportname
        XCTAssertEqual(try sr.revokeTokens(vdi: r.uuid), 1)
        guard case .failure(.revoked) = sr.resolve(exportName: name) else { return XCTFail() }
        let short = try sr.getNBDInfo(r.uuid, lifetime: 0.01)[0].exportname
        Thread.sleep(forTimeInterval: 0.05)
        guard case .failure(.expired) = sr.resolve(exportName: short) else { return XCTFail() }
    }

    func testSnapshotTokensAreReadOnly() throws {
        let r = try sr.create(.init(nameLabel: "d", virtualSize: 1 << 20))
        let s = try sr.snapshot(r.uuid)
        guard case .success(let g) = sr.resolve(exportName: try sr.getNBDInfo(s.uuid)[0].exportname) else { return XCTFail() }
        XCTAssertTrue(g.readOnly)
    }

    func testRecoveryAdoptsBaseOfSnapshotInterruptedBeforeCommit() throws {
        let r = try sr.create(.init(nameLabel: "d", virtualSize: 1 << 20))
        // Simulate a crash after the rename but before the records: do the file steps by hand.
        let base = UUID().uuidString.lowercased()
        XCTAssertEqual(link(sr.imagePath(r.uuid), sr.imagePath(base)), 0)
        try VHDCreate.createDifferencing(path: sr.imagePath(r.uuid) + ".new", parentPath: sr.imagePath(base))
        XCTAssertEqual(rename(sr.imagePath(r.uuid) + ".new", sr.imagePath(r.uuid)), 0)
        let again = try SR(path: dir)
        XCTAssertEqual(try again.record(r.uuid).parent, base)
        let h = try again.attach(r.uuid)
        XCTAssertEqual(h.virtualSize, 1 << 20)
        again.detach(h)
    }

    func testRecoveryDropsHalfMadeLeaf() throws {
        let r = try sr.create(.init(nameLabel: "d", virtualSize: 1 << 20))
        FileManager.default.createFile(atPath: sr.imagePath(r.uuid) + ".new", contents: Data([1, 2, 3]))
        _ = try SR(path: dir)
        XCTAssertFalse(FileManager.default.fileExists(atPath: sr.imagePath(r.uuid) + ".new"))
    }
}

/// The `uri` of a `get_nbd_info` record, as libnbd's tools take it.
final class NBDInfoURITests: XCTestCase {
    func testPlainTLSAndIPv6URIs() {
        let plain = NBDInfoRecord(exportname: "/u?token=s", address: "127.0.0.1", port: 10809, cert: "", subject: "",
                                  certificatesDirectory: "/etc/vdinbd/certs")
        XCTAssertEqual(plain.uri, "nbd://127.0.0.1:10809//u%3Ftoken=s", "no TLS: no certificate directory")
        let tls = NBDInfoRecord(exportname: "/u?token=s", address: "::1", port: 10809, cert: "PEM", subject: "x",
                                certificatesDirectory: "/srv/my certs&keys")
        XCTAssertEqual(tls.uri, "nbds://[::1]:10809//u%3Ftoken=s?tls-certificates=/srv/my%20certs%26keys")
    }
}

/// `VDIHandle.writeNow`, the server's inline write: done only where nothing would wait.
final class WriteNowTests: XCTestCase {
    var dir: String!
    var sr: SR!

    override func setUpWithError() throws {
        dir = NSTemporaryDirectory() + "writenow-" + UUID().uuidString
        sr = try SR(path: dir)
    }

    override func tearDown() { try? FileManager.default.removeItem(atPath: dir) }

    func bytes(_ h: VDIHandle, _ at: UInt64, _ n: Int) throws -> [UInt8] {
        var out = [UInt8](repeating: 0xEE, count: n)
        try out.withUnsafeMutableBytes { try h.read(into: $0, at: at) }
        return out
    }

    func testWriteNowOnlyWhereNothingWaits() throws {
        let a = [UInt8](repeating: 1, count: 4096), b = [UInt8](repeating: 2, count: 4096)
        let r = try sr.create(.init(nameLabel: "d", virtualSize: 8 << 20))
        let h = try sr.attach(r.uuid)
        // Space the leaf lacks is an allocation: not done here, and nothing written.
        XCTAssertFalse(try a.withUnsafeBytes { try h.writeNow($0, at: 0) })
        XCTAssertEqual(try bytes(h, 0, 4096), [UInt8](repeating: 0, count: 4096))
        try a.withUnsafeBytes { try h.write($0, at: 0) }
        // Held now: done here.
        XCTAssertTrue(try b.withUnsafeBytes { try h.writeNow($0, at: 0) })
        XCTAssertEqual(try bytes(h, 0, 4096), b)
        // I/O held off (a snapshot's or a merge's switch): not done here.
        try h.exclusively { old in
            XCTAssertFalse(try a.withUnsafeBytes { try h.writeNow($0, at: 0) })
            return old
        }
        XCTAssertEqual(try bytes(h, 0, 4096), b)
        sr.detach(h)

        // CBT: a block the leaf holds whose bit is not yet durable goes the usual way
        // (the log commits first); once durable, writes there are done here.
        try sr.enableCBT(r.uuid)
        let c = try sr.attach(r.uuid)
        defer { sr.detach(c) }
        XCTAssertFalse(try a.withUnsafeBytes { try c.writeNow($0, at: 0) })
        XCTAssertEqual(try bytes(c, 0, 4096), b)
        try a.withUnsafeBytes { try c.write($0, at: 0) }
        XCTAssertTrue(try b.withUnsafeBytes { try c.writeNow($0, at: 512) })
        XCTAssertEqual(try bytes(c, 0, 512), [UInt8](repeating: 1, count: 512))
        XCTAssertEqual(try bytes(c, 512, 4096), b)
    }
}
