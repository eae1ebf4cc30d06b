import Foundation
import Locking
import XCTest
@testable import CBT

final class ChangeLogTests: XCTestCase {
    var dir: String!
    override func setUp() {
        dir = NSTemporaryDirectory() + "cbt-" + UUID().uuidString
        try? FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    }
    override func tearDown() { try? FileManager.default.removeItem(atPath: dir) }

    func testLayoutIsBlktaps48ByteHeaderThenLSBFirstBits() throws {
        let p = dir + "/a.cbtlog"
        let parent = UUID()
        let log = try ChangeLog.create(path: p, size: 1 << 20, parent: parent)
        XCTAssertTrue(log.markDirty(offset: 64 * 1024 * 3, length: 1))
        XCTAssertTrue(log.markDirty(offset: 64 * 1024 * 3 + 10, length: 5), "set but not yet durable: must wait too")
        try log.commit()
        XCTAssertFalse(log.markDirty(offset: 64 * 1024 * 3 + 10, length: 5), "durable: no wait")
        let bytes = Array(try Data(contentsOf: URL(fileURLWithPath: p)))
        XCTAssertEqual(bytes.count, 48 + 2)  // 16 blocks -> 2 bytes
        XCTAssertEqual(Array(bytes[0..<16]), withUnsafeBytes(of: parent.uuid) { Array($0) })
        XCTAssertEqual(Array(bytes[40..<48]), [0, 0, 16, 0, 0, 0, 0, 0])  // size, little-endian
        XCTAssertEqual(bytes[48], 0b0000_1000)
    }

    func testParentIsReadFromTheHeaderAloneAndADamagedHeaderIsRefused() throws {
        let p = dir + "/p.cbtlog"
        let parent = UUID()
        _ = try ChangeLog.create(path: p, size: 1 << 30, parent: parent)
        XCTAssertEqual(try ChangeLog.parent(path: p), parent)
        _ = try ChangeLog.create(path: dir + "/root.cbtlog", size: 1 << 20)
        XCTAssertNil(try ChangeLog.parent(path: dir + "/root.cbtlog"))
        // A file whose length does not match its header's size is damaged, as `open` says.
        let h = try FileHandle(forWritingTo: URL(fileURLWithPath: p))
        try h.truncate(atOffset: 100)
        try h.close()
        XCTAssertThrowsError(try ChangeLog.parent(path: p)) { XCTAssertNotNil($0 as? CBTError) }
        XCTAssertThrowsError(try ChangeLog.parent(path: dir + "/missing.cbtlog"))
    }

    func testRangeCrossingABoundarySetsBothBits() throws {
        let log = try ChangeLog.create(path: dir + "/b.cbtlog", size: 1 << 20)
        _ = log.markDirty(offset: 64 * 1024 - 1, length: 2)
        XCTAssertEqual(log.bits[0], 0b0000_0011)
    }

    func testReopenSeesCommittedBitsAndHeader() throws {
        let p = dir + "/c.cbtlog"
        let log = try ChangeLog.create(path: p, size: 10 << 20)
        _ = log.markDirty(offset: 5 << 20, length: 4096)
        try log.commit()
        try log.setConsistent(false)
        let again = try ChangeLog.open(path: p)
        XCTAssertEqual(again.bits, log.bits)
        XCTAssertFalse(again.consistent)
        XCTAssertEqual(again.size, 10 << 20)
    }

    /// Async commits: every waiter is called once, after its bits are on disk, and many
    /// waiters share few batches.
    func testAsyncCommitsCallEveryWaiterAfterItsBitsAreDurable() throws {
        let p = dir + "/async.cbtlog"
        let log = try ChangeLog.create(path: p, size: 64 << 20)
        let group = DispatchGroup()
        let seen = Atomic<Int>(0)
        for i in 0..<500 {
            let off = UInt64(i % 1024) * ChangeLog.blockSize
            guard log.markDirty(offset: off, length: 512) else { continue }
            group.enter()
            log.commitAsync { error in
                XCTAssertNil(error)
                // What is on disk now holds this write's bit.
                let onDisk = Array(try! Data(contentsOf: URL(fileURLWithPath: p)))
                let bit = Int(off / ChangeLog.blockSize)
                XCTAssertNotEqual(onDisk[48 + bit / 8] & UInt8(1 << (bit % 8)), 0)
                seen.add(1, ordering: .relaxed)
                group.leave()
            }
        }
        XCTAssertEqual(group.wait(timeout: .now() + 30), .success)
        XCTAssertEqual(seen.load(ordering: .relaxed), 500)
        XCTAssertFalse(log.markDirty(offset: 0, length: 1))
    }

    /// Lazy commits: each waiter is called after its bit is on disk, even when nobody else
    /// commits (the delay starts a batch); an eager commit meanwhile takes them along.
    func testLazyCommitsBecomeDurableAloneOrWithAnEagerOne() throws {
        let p = dir + "/lazy.cbtlog"
        let log = try ChangeLog.create(path: p, size: 64 << 20)
        @Sendable func onDisk(_ bit: Int) -> Bool {
            let b = Array(try! Data(contentsOf: URL(fileURLWithPath: p)))
            return b[48 + bit / 8] & UInt8(1 << (bit % 8)) != 0
        }
        // Alone: the timer starts the batch.
        let alone = DispatchSemaphore(value: 0)
        XCTAssertTrue(log.markDirty(offset: 3 * ChangeLog.blockSize, length: 1))
        log.commitLazily { error in
            XCTAssertNil(error)
            XCTAssertTrue(onDisk(3))
            alone.signal()
        }
        XCTAssertEqual(alone.wait(timeout: .now() + 10), .success)
        // Many lazy waiters, then an eager commit: when it returns, all their bits are durable.
        let group = DispatchGroup()
        for i in 10..<60 {
            XCTAssertTrue(log.markDirty(offset: UInt64(i) * ChangeLog.blockSize, length: 1))
            group.enter()
            log.commitLazily { error in XCTAssertNil(error); group.leave() }
        }
        try log.commit()
        for i in 10..<60 { XCTAssertTrue(onDisk(i)) }
        XCTAssertFalse(log.markDirty(offset: 59 * ChangeLog.blockSize, length: 1))
        XCTAssertEqual(group.wait(timeout: .now() + 10), .success)
    }

    /// The one-pass encoder gives exactly Foundation's base64 of the MSB-first bitmap, for
    /// every tail length and a partial last byte.
    func testFastBase64EqualsFoundationsOfTheFinishedBitmap() {
        var rng = SystemRandomNumberGenerator()
        for blocks in [1, 7, 8, 9, 15, 16, 17, 23, 24, 25, 64, 1000, 4099, 65536 + 3] {
            let size = UInt64(blocks) * ChangeLog.blockSize - (blocks % 2 == 0 ? 0 : 512)
            let lsb = (0..<ChangeLog.bitmapLength(size: size)).map { _ in UInt8.random(in: 0...255, using: &rng) }
            let expected = Data(ChangedBlocks.finish(lsb, size: size)).base64EncodedString()
            XCTAssertEqual(String(decoding: ChangedBlocks.base64Bytes(lsb, size: size), as: UTF8.self), expected, "\(blocks) blocks")
        }
        XCTAssertEqual(ChangedBlocks.base64Bytes([], size: 0), [])
    }

    func testOrFromAnUnalignedBufferEqualsTheAlignedOne() {
        let src = (0..<1001).map { UInt8(truncatingIfNeeded: $0 &* 37) }
        var a = [UInt8](repeating: 0x11, count: 1000), b = a
        ChangedBlocks.or(Array(src[1...]), into: &a)
        src.withUnsafeBytes { ChangedBlocks.or(UnsafeRawBufferPointer(rebasing: $0[1...]), into: &b) }
        XCTAssertEqual(a, b)
        XCTAssertEqual(a[0], 0x11 | 37)
    }

    func testGrowKeepsBitsAndLinksAndClearsTheNewSpace() throws {
        let p = dir + "/g.cbtlog"
        let parent = UUID(), child = UUID()
        do {
            let log = try ChangeLog.create(path: p, size: 1 << 20, parent: parent, child: child)
            _ = log.markDirty(offset: 0, length: 1)
            _ = log.markDirty(offset: (1 << 20) - 1, length: 1)
            try log.commit()
        }
        try ChangeLog.grow(path: p, to: 3 << 20)
        let g = try ChangeLog.open(path: p)
        XCTAssertEqual(g.size, 3 << 20)
        XCTAssertEqual(g.parent, parent)
        XCTAssertEqual(g.child, child)
        XCTAssertEqual(g.bits, [0x01, 0x80, 0, 0, 0, 0])
        XCTAssertFalse(FileManager.default.fileExists(atPath: p + ".resize"))
        // Never shrinks.
        try ChangeLog.grow(path: p, to: 1 << 20)
        XCTAssertEqual(try ChangeLog.open(path: p).size, 3 << 20)
    }

    func testDamagedLogsAreTypedWithAReason() throws {
        let p = dir + "/d.cbtlog"
        _ = try ChangeLog.create(path: p, size: 10 << 20)
        let h = FileHandle(forWritingAtPath: p)!
        h.truncateFile(atOffset: 30)
        h.closeFile()
        XCTAssertThrowsError(try ChangeLog.open(path: p)) {
            guard case CBTError.damaged(_, let r) = $0 else { return XCTFail("\($0)") }
            XCTAssertTrue(r.contains("torn header"), r)
        }
        let q = dir + "/e.cbtlog"
        _ = try ChangeLog.create(path: q, size: 10 << 20)
        let g = FileHandle(forWritingAtPath: q)!
        g.seekToEndOfFile()
        g.write(Data([1, 2, 3]))
        g.closeFile()
        XCTAssertThrowsError(try ChangeLog.open(path: q)) {
            guard case CBTError.damaged(_, let r) = $0 else { return XCTFail("\($0)") }
            XCTAssertTrue(r.contains("bytes"), r)
        }
    }

    func testUnionIsMSBFirstAndSizedByTheNewerDisk() {
        // LSB-first logs: block 0 in one, block 9 in the other; 100 blocks -> 13 bytes.
        let out = ChangedBlocks.union([[0b0000_0001], [0, 0b0000_0010]], size: 100 * 64 * 1024)
        XCTAssertEqual(out.count, 13)
        XCTAssertEqual(out[0], 0b1000_0000)
        XCTAssertEqual(out[1], 0b0100_0000)
        XCTAssertEqual(ChangedBlocks.ranges(out, size: 100 * 64 * 1024).map(\.offset), [0, 9 * 64 * 1024])
    }

    func testShortLastBlockRangeIsClampedToTheSize() {
        let size: UInt64 = 64 * 1024 + 512
        let r = ChangedBlocks.ranges([0b0100_0000], size: size)
        XCTAssertEqual(r.map(\.length), [512])
    }

    func testConcurrentCommitsAllBecomeDurable() throws {
        let p = dir + "/f.cbtlog"
        let log = try ChangeLog.create(path: p, size: 64 << 20)
        DispatchQueue.concurrentPerform(iterations: 256) { i in
            if log.markDirty(offset: UInt64(i) * 256 * 1024, length: 1) { try? log.commit() }
        }
        let again = try ChangeLog.open(path: p)
        XCTAssertEqual(again.bits, log.bits)
        XCTAssertEqual(again.bits.reduce(0) { $0 + $1.nonzeroBitCount }, 256)
    }

    /// A new log's bitmap is a hole in its file (a 2040 GiB disk's 4 MiB of zeros is not
    /// written), reads as zeros, and takes bits anywhere.
    func testANewLargeLogIsSparseAndTakesItsLastBit() throws {
        let p = dir + "/big.cbtlog"
        let size: UInt64 = 2040 << 30
        let log = try ChangeLog.create(path: p, size: size)
        var st = stat()
        XCTAssertEqual(stat(p, &st), 0)
        XCTAssertEqual(Int(st.st_size), 48 + ChangeLog.bitmapLength(size: size))
        XCTAssertLessThan(Int(st.st_blocks) * 512, 1 << 20, "the zero bitmap is not written out")
        XCTAssertTrue(log.markDirty(offset: size - 1, length: 1))
        try log.commit()
        let again = try ChangeLog.open(path: p)
        let bits = again.bits
        XCTAssertEqual(bits.last, log.bits.last)
        XCTAssertNotEqual(bits.last, 0)
        XCTAssertEqual(bits.dropLast().first { $0 != 0 }, nil)
    }

    /// Marking a log in use writes its flag without a sync of its own; a later commit
    /// makes it durable with the bits.
    func testMarkInUseIsSeenByAReopenAndLeavesTheLinksGenerationAlone() throws {
        let p = dir + "/u.cbtlog"
        let log = try ChangeLog.create(path: p, size: 1 << 30)
        let before = ChangeLog.generation.load(ordering: .sequentiallyConsistent)
        try log.markInUse()
        XCTAssertEqual(ChangeLog.generation.load(ordering: .sequentiallyConsistent), before,
                       "the flag is not a link: cached ancestries stay valid")
        XCTAssertFalse(try ChangeLog.open(path: p).consistent)
        try log.setChild(UUID())
        XCTAssertGreaterThan(ChangeLog.generation.load(ordering: .sequentiallyConsistent), before)
        let g = ChangeLog.generation.load(ordering: .sequentiallyConsistent)
        XCTAssertTrue(ChangeLog.rename(p, to: p + ".moved"))
        XCTAssertGreaterThan(ChangeLog.generation.load(ordering: .sequentiallyConsistent), g)
    }

    /// Bits merged in from a destroyed snapshot's log are durable once `merge` returns, and
    /// a write whose bits they cover then needs no commit.
    func testMergedBitsAreDurableAfterMerge() throws {
        let p = dir + "/m.cbtlog"
        let log = try ChangeLog.create(path: p, size: 1 << 30)
        var other = [UInt8](repeating: 0, count: ChangeLog.bitmapLength(size: 1 << 30))
        other[3] = 0b0001_0000
        try log.merge(other)
        XCTAssertFalse(log.markDirty(offset: (3 * 8 + 4) * 64 * 1024, length: 4096))
        XCTAssertEqual(try ChangeLog.open(path: p).bits[3], 0b0001_0000)
    }
}
