import Foundation
import Image
@testable import QCOW2
import Locking
import XCTest

final class QCOW2Tests: XCTestCase {
    var dir: String!

    override func setUp() {
        dir = NSTemporaryDirectory() + "qcow2-\(UUID().uuidString)"
        try! FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    }

    override func tearDown() { try? FileManager.default.removeItem(atPath: dir) }

    func read(_ img: any DiskImage, _ off: UInt64, _ n: Int) throws -> [UInt8] {
        var b = [UInt8](repeating: 0xee, count: n)
        try b.withUnsafeMutableBytes { try img.read(into: $0, at: off) }
        return b
    }

    func testCreateIsEmptyAndClean() throws {
        let p = dir + "/a.qcow2"
        try QCOW2Format().create(path: p, size: 1 << 30)
        XCTAssertNil(QCOW2Format().check(path: p))
        let img = try QCOW2Format().open(path: p, writable: false)
        defer { img.close() }
        XCTAssertEqual(img.virtualSize, 1 << 30)
        XCTAssertEqual(try read(img, 12345, 70000), [UInt8](repeating: 0, count: 70000))
        let runs = try img.allocationRuns(offset: 0, length: 1 << 30)
        XCTAssertEqual(runs.count, 1)
        XCTAssertEqual(runs[0].allocated, false)
    }

    /// Random writes, zeroes and trims over a 3-deep chain against an in-memory model,
    /// through reopenings; every file checks clean after each clean close.
    func testModelOverThreeDeepChain() throws {
        let fmt = QCOW2Format()
        let size: UInt64 = 8 << 20
        var model = [UInt8](repeating: 0, count: Int(size))
        var rng = SystemRandomNumberGenerator()
        var paths: [String] = []
        for layer in 0..<3 {
            let p = dir + "/l\(layer).qcow2"
            if let parent = paths.last { try fmt.createChild(path: p, parent: parent, size: nil) } else { try fmt.create(path: p, size: size) }
            paths.append(p)
            for round in 0..<2 {
                let img = try fmt.open(path: p, writable: true)
                XCTAssertEqual(img.depth, layer + 1)
                for _ in 0..<150 {
                    let off = UInt64.random(in: 0..<size, using: &rng) & ~511
                    let n = Int(min(UInt64.random(in: 1...300_000, using: &rng), size - off))
                    switch Int.random(in: 0..<10, using: &rng) {
                    case 0..<6:
                        let fill = UInt8.random(in: 1...255, using: &rng)
                        var d = [UInt8](repeating: fill, count: n)
                        d[0] = UInt8(truncatingIfNeeded: off >> 9)
                        try d.withUnsafeBytes { try img.write($0, at: off) }
                        model.replaceSubrange(Int(off)..<(Int(off) + n), with: d)
                    case 6..<8:
                        try img.writeZeroes(offset: off, length: UInt64(n), punch: Bool.random(using: &rng), fastOnly: false)
                        model.replaceSubrange(Int(off)..<(Int(off) + n), with: repeatElement(0, count: n))
                    case 8:
                        if img.leafHoldsAll(offset: off, length: UInt64(n)) {
                            XCTAssertFalse(img.leafLacksAll(offset: off, length: UInt64(n)))
                        }
                        try img.flush()
                    default:
                        XCTAssertEqual(try read(img, off, n), Array(model[Int(off)..<(Int(off) + n)]), "read at \(off)+\(n)")
                    }
                }
                XCTAssertEqual(try read(img, 0, Int(size)), model, "layer \(layer) round \(round)")
                img.close()
                for q in paths { XCTAssertNil(fmt.check(path: q), q) }
            }
        }
        let img = try fmt.open(path: paths.last!, writable: false)
        defer { img.close() }
        XCTAssertEqual(try read(img, 0, Int(size)), model)
        // The plan covers the reads exactly and agrees with them.
        let plan = try img.plan(offset: 4096, length: 1 << 20)
        XCTAssertEqual(plan.pieces.reduce(0) { $0 + $1.count }, 1 << 20)
    }

    /// Threads writing 4 KiB pieces at once into an overlay: each piece belongs to one
    /// thread, and neighbouring pieces of one cluster to different threads, so every
    /// copy-up races others in its cluster (held one at a time) and in others (side by
    /// side), with syncs in between. Nothing written is lost; the files check clean.
    func testConcurrentCopyUpsLoseNothing() throws {
        let fmt = QCOW2Format()
        let size: UInt64 = 32 << 20, piece = 4096, threads = 8
        let base = dir + "/base.qcow2", top = dir + "/top.qcow2"
        try fmt.create(path: base, size: size)
        var model = [UInt8](repeating: 0, count: Int(size))
        do {
            let img = try fmt.open(path: base, writable: true)
            var d = [UInt8](repeating: 0, count: Int(size))
            for i in d.indices { d[i] = UInt8(truncatingIfNeeded: i &* 31 &+ (i >> 12)) }
            try d.withUnsafeBytes { try img.write($0, at: 0) }
            model = d
            img.close()
        }
        try fmt.createChild(path: top, parent: base, size: nil)
        let img = try fmt.open(path: top, writable: true)
        let pieces = Int(size) / piece
        // Each thread's pieces: i % threads == t, in a shuffled order.
        let plan: [[Int]] = (0..<threads).map { t in Array(stride(from: t, to: pieces, by: threads)).shuffled() }
        let failures = Mutex<[String]>([])
        DispatchQueue.concurrentPerform(iterations: threads) { t in
            var buf = [UInt8](repeating: 0, count: piece)
            for (n, i) in plan[t].enumerated() where n % 2 == 0 {
                for k in 0..<piece { buf[k] = UInt8(truncatingIfNeeded: i &+ k &* 7 &+ t) }
                do {
                    try buf.withUnsafeBytes { try img.write($0, at: UInt64(i * piece)) }
                    if n % 512 == 0 { try img.flush() }
                } catch {
                    failures.withLock { $0.append("\(error)") }
                }
            }
        }
        XCTAssertEqual(failures.withLock { $0 }, [])
        for t in 0..<threads {
            for (n, i) in plan[t].enumerated() where n % 2 == 0 {
                for k in 0..<piece { model[i * piece + k] = UInt8(truncatingIfNeeded: i &+ k &* 7 &+ t) }
            }
        }
        XCTAssertTrue(try read(img, 0, Int(size)) == model, "the overlay lost writes")
        img.close()
        XCTAssertNil(fmt.check(path: top))
        let again = try fmt.open(path: top, writable: false)
        defer { again.close() }
        XCTAssertTrue(try read(again, 0, Int(size)) == model, "the overlay lost writes after reopening")
    }

    /// A write into a cluster the overlay lacks writes the new bytes and what the backing
    /// holds there, not the zeros around them: a fresh cluster's unwritten space is a
    /// hole that reads as zeros, through our reads and to a checker.
    func testCopyUpsWriteOnlyWhatIsNotZeros() throws {
        let fmt = QCOW2Format()
        let size: UInt64 = 8 << 20, cs = 65536
        let base = dir + "/hb.qcow2", top = dir + "/ht.qcow2"
        try fmt.create(path: base, size: size)
        var model = [UInt8](repeating: 0, count: Int(size))
        do {
            let img = try fmt.open(path: base, writable: true)
            let d = [UInt8](repeating: 0x5a, count: cs / 2)
            try d.withUnsafeBytes { try img.write($0, at: 0) }  // the first half of cluster 0
            model.replaceSubrange(0..<(cs / 2), with: d)
            img.close()
        }
        try fmt.createChild(path: top, parent: base, size: nil)
        func allocated() throws -> Int {
            var st = stat()
            XCTAssertEqual(stat(top, &st), 0)
            return Int(st.st_blocks) * 512
        }
        let before = try allocated()
        let img = try fmt.open(path: top, writable: true)
        var writes: [(at: Int, bytes: [UInt8])] = [(40 << 10, [UInt8](repeating: 1, count: 4096)),
                                                   (cs + (8 << 10), [UInt8](repeating: 2, count: 4096)),
                                                   (3 * cs - 512, [UInt8](repeating: 3, count: 1024))]
        for k in 0..<16 { writes.append((8 * cs + k * cs + 512 * k, [UInt8](repeating: UInt8(k + 4), count: 512))) }
        for w in writes {
            try w.bytes.withUnsafeBytes { try img.write($0, at: UInt64(w.at)) }
            model.replaceSubrange(w.at..<(w.at + w.bytes.count), with: w.bytes)
        }
        XCTAssertTrue(try read(img, 0, Int(size)) == model)
        img.close()
        XCTAssertNil(fmt.check(path: top))
        // 20 clusters were allocated; written whole they would take 1,280 KiB besides the
        // L2 table. Written as here: cluster 0's 32 KiB of backing data, then some KiB.
        let grew = try allocated() - before
        XCTAssertLessThan(grew, 64 << 10 + 40 << 10 + 20 * 8192, "the overlay grew by \(grew) bytes")
        let again = try fmt.open(path: top, writable: false)
        defer { again.close() }
        XCTAssertTrue(try read(again, 0, Int(size)) == model, "different after reopening")
    }

    func testFastZeroingRefusesPartialClustersBeforeChangingAnything() throws {
        let p = dir + "/z.qcow2"
        try QCOW2Format().create(path: p, size: 1 << 20)
        let img = try QCOW2Format().open(path: p, writable: true)
        defer { img.close() }
        let d = [UInt8](repeating: 7, count: 1 << 20)
        try d.withUnsafeBytes { try img.write($0, at: 0) }
        XCTAssertThrowsError(try img.writeZeroes(offset: 0, length: 65536 + 512, punch: true, fastOnly: true)) {
            XCTAssertEqual(($0 as? QCOW2Error).map { $0.failureKind }, .zeroingNotFast)
        }
        XCTAssertEqual(try read(img, 0, 1 << 20), d)
        try img.writeZeroes(offset: 65536, length: 65536 * 2, punch: true, fastOnly: true)
        XCTAssertEqual(try read(img, 65536, 65536 * 2), [UInt8](repeating: 0, count: 65536 * 2))
        XCTAssertEqual(try read(img, 0, 65536), Array(d[0..<65536]))
    }

    func testGrowRewritesL1AndKeepsData() throws {
        let p = dir + "/g.qcow2"
        let fmt = QCOW2Format()
        try fmt.create(path: p, size: 1 << 30)
        do {
            let img = try fmt.open(path: p, writable: true)
            let d = [UInt8](repeating: 9, count: 4096)
            try d.withUnsafeBytes { try img.write($0, at: (1 << 30) - 4096) }
            img.close()
        }
        try fmt.grow(path: p, to: 2 << 40)
        XCTAssertEqual(try fmt.virtualSize(ofFile: p), 2 << 40)
        XCTAssertNil(fmt.check(path: p))
        let img = try fmt.open(path: p, writable: true)
        defer { img.close() }
        XCTAssertEqual(try read(img, (1 << 30) - 4096, 4096), [UInt8](repeating: 9, count: 4096))
        let d = [UInt8](repeating: 3, count: 4096)
        try d.withUnsafeBytes { try img.write($0, at: (2 << 40) - 4096) }
        XCTAssertEqual(try read(img, (2 << 40) - 4096, 4096), d)
    }

    func testRelinkKeepsEitherNameWhole() throws {
        let fmt = QCOW2Format()
        let a = dir + "/a.qcow2", b = dir + "/b.qcow2", c = dir + "/c.qcow2"
        try fmt.create(path: a, size: 1 << 20)
        try fmt.createChild(path: b, parent: a, size: nil)
        try fmt.createChild(path: c, parent: b, size: nil)
        XCTAssertEqual(fmt.parentPath(ofFile: c), b)
        try fmt.setParent(ofFile: c, to: a)
        XCTAssertEqual(fmt.parentPath(ofFile: c), a)
        try fmt.setParent(ofFile: c, to: b)
        XCTAssertEqual(fmt.parentPath(ofFile: c), b)
        XCTAssertEqual(try fmt.open(path: c, writable: false).depth, 3)
    }

    /// A crash leaves at worst leaked clusters; the next writable open frees them.
    func testLeaksFromAnUncleanStopAreRepaired() throws {
        let fmt = QCOW2Format()
        let p = dir + "/leak.qcow2"
        try fmt.create(path: p, size: 64 << 20)
        do {
            let f = try QCOW2File.open(path: p, writable: true)
            let img = QCOW2Chain(layers: [f])
            let d = [UInt8](repeating: 5, count: 1 << 20)
            try d.withUnsafeBytes { try img.write($0, at: 0) }
            try img.flush()
            try d.withUnsafeBytes { try img.write($0, at: 8 << 20) }
            // The second write's refcounts reach the file (as when their block leaves the
            // cache), its L2 entries not; then no close.
            try f.state.withLock { (s) throws(QCOW2Error) in try f.writeDirtyRefcounts(&s) }
            f.file.close()
        }
        let report = try QCOW2File.open(path: p, writable: false).check()
        XCTAssertTrue(report.errors.isEmpty, "\(report.errors)")
        XCTAssertGreaterThan(report.leakedClusters, 0)
        let f = try QCOW2File.open(path: p, writable: true)
        XCTAssertEqual(f.repairReport.withLock { $0?.leakedClusters }, report.leakedClusters)
        f.close()
        XCTAssertNil(fmt.check(path: p))
        let img = try fmt.open(path: p, writable: false)
        XCTAssertEqual(try read(img, 0, 4096), [UInt8](repeating: 5, count: 4096))
        XCTAssertEqual(try read(img, 8 << 20, 4096), [UInt8](repeating: 0, count: 4096))
    }

    /// The reference check finds a referenced cluster without a refcount (an error) and
    /// refcounts nothing needs (leaks), wherever they sit in a refcount block.
    func testCheckFindsMissingAndExtraRefcounts() throws {
        let fmt = QCOW2Format()
        let p = dir + "/refs.qcow2"
        try fmt.create(path: p, size: 64 << 20)
        do {
            let f = try QCOW2File.open(path: p, writable: true)
            let img = QCOW2Chain(layers: [f])
            try [UInt8](repeating: 5, count: 1 << 20).withUnsafeBytes { try img.write($0, at: 0) }
            try img.flush()
            let l1Cluster = f.header.l1TableOffset / f.clusterSize
            try f.state.withLock { (s) throws(QCOW2Error) in
                try f.setRefcounts(l1Cluster..<(l1Cluster + 1), to: 0, &s)
                try f.setRefcounts(0..<1, to: 3, &s)
                try f.setRefcounts(900..<901, to: 1, &s)
                try f.writeDirtyRefcounts(&s)
            }
            f.file.close()
        }
        let report = try QCOW2File.open(path: p, writable: false).check()
        XCTAssertEqual(report.errors, ["cluster \(try QCOW2File.open(path: p, writable: false).header.l1TableOffset / 65536): no refcount, referenced 1 times"])
        XCTAssertEqual(report.leakedClusters, 2)
    }

    /// Found by fuzz-qcow2: a virtual size near 2^64 overflowed the L1 size it needs
    /// (a trap); it is a typed refusal of the header.
    func testAVirtualSizeNear2To64IsRefusedNotATrap() throws {
        let fmt = QCOW2Format()
        let p = dir + "/huge.qcow2"
        try fmt.create(path: p, size: 1 << 20)
        let fd = open(p, O_WRONLY)
        let size = [UInt8](repeating: 0xFF, count: 8)
        XCTAssertEqual(size.withUnsafeBytes { pwrite(fd, $0.baseAddress, 8, 24) }, 8)
        close(fd)
        XCTAssertThrowsError(try QCOW2File.open(path: p, writable: false)) { e in
            guard case .invalidField(_, let field, _, _)? = e as? QCOW2Error else { return XCTFail("\(e)") }
            XCTAssertEqual(field, "l1_size")
        }
    }

    /// A damaged L2 table yields thousands of errors: all are counted, the first hundred
    /// described (a check of a wrecked file stays as quick as of a sound one).
    func testCheckCountsEveryErrorAndDescribesTheFirstHundred() throws {
        let fmt = QCOW2Format()
        let p = dir + "/wrecked.qcow2"
        try fmt.create(path: p, size: 64 << 20)
        let l2: UInt64
        do {
            let f = try QCOW2File.open(path: p, writable: true)
            try [UInt8](repeating: 5, count: 65536).withUnsafeBytes { try QCOW2Chain(layers: [f]).write($0, at: 0) }
            l2 = f.state.withLock { $0.l1[0] } & QCOW2File.offsetMask
            f.close()
        }
        // Every entry a data cluster at byte 512: not aligned to a cluster.
        var table = [UInt8](repeating: 0, count: 65536)
        for k in 0..<8192 { table[k * 8 + 6] = 0x02 }
        let fd = open(p, O_WRONLY)
        XCTAssertEqual(table.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, off_t(l2)) }, 65536)
        close(fd)
        let report = try QCOW2File.open(path: p, writable: false).check()
        XCTAssertGreaterThanOrEqual(report.errorCount, 8192)
        XCTAssertEqual(report.errors.count, QCOW2CheckReport.describedErrors)
        XCTAssertTrue(report.errors[0].hasPrefix("L2 entry 0 of table 0:"), report.errors[0])
        XCTAssertTrue(report.summary?.contains("and \(report.errorCount - 5) more errors") == true, report.summary ?? "nil")
    }

    /// A file has one writer: a second writable open (through another name too) is
    /// refused while the first is open, and allowed once it is closed; a reader is let in
    /// and sees what the writer wrote before it opened.
    func testOneWriterPerFile() throws {
        let p = dir + "/w.qcow2", q = dir + "/w-link.qcow2"
        try QCOW2Format().create(path: p, size: 1 << 20)
        XCTAssertEqual(link(p, q), 0)
        let a = try QCOW2Format().open(path: p, writable: true)
        XCTAssertThrowsError(try QCOW2Format().open(path: q, writable: true)) {
            XCTAssertEqual($0 as? QCOW2Error, .alreadyOpenForWriting(path: q))
        }
        // A reader opened while the writer holds a new mapping in memory only (no flush
        // yet) sees it: its open has the writer sync first.
        try [UInt8](repeating: 7, count: 4096).withUnsafeBytes { try a.write($0, at: 0, beforeVisible: nil) }
        let r = try QCOW2Format().open(path: q, writable: false)
        XCTAssertEqual(try read(r, 0, 4096), [UInt8](repeating: 7, count: 4096))
        r.close()
        a.close()
        let b = try QCOW2Format().open(path: q, writable: true)
        defer { b.close() }
        XCTAssertEqual(try read(b, 0, 4096), [UInt8](repeating: 7, count: 4096))
    }

    func testRefusesWhatItCannotServe() throws {
        let p = dir + "/x.qcow2"
        try QCOW2Format.create(path: p, size: 1 << 20)
        func patch(_ off: UInt64, _ bytes: [UInt8]) throws {
            let f = try HostFile(path: p, writable: true)
            try f.write(bytes, at: off)
            f.close()
        }
        try patch(32, [0, 0, 0, 2])  // crypt_method LUKS
        XCTAssertThrowsError(try QCOW2File.open(path: p, writable: false)) {
            XCTAssertEqual("\($0)".contains("LUKS"), true, "\($0)")
        }
        try patch(32, [0, 0, 0, 0])
        try patch(72, [0, 0, 0, 0, 0, 0, 0, 4])  // external data file
        XCTAssertThrowsError(try QCOW2File.open(path: p, writable: false)) {
            XCTAssertEqual("\($0)".contains("external data file"), true, "\($0)")
        }
        try patch(72, [0, 0, 0, 0, 0, 0, 0x01, 0])  // bit 8: unknown
        XCTAssertThrowsError(try QCOW2File.open(path: p, writable: false)) {
            XCTAssertEqual("\($0)".contains("bit 8"), true, "\($0)")
        }
        try patch(0, [0, 0, 0, 0])
        XCTAssertThrowsError(try QCOW2File.open(path: p, writable: false)) {
            XCTAssertEqual($0 as? QCOW2Error, .badMagic(path: p))
        }
    }
}
