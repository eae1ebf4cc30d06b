import Foundation
import Image
import XCTest
@testable import Storage

/// A leaf merge's catch-up takes the tracker's marks and then reads what they cover. A
/// write is therefore marked only once its data is visible: marked earlier, a take between
/// the mark and the data would copy the old bytes and never see the write again.
final class TrackerOrderingTests: XCTestCase {
    var dir: String!
    var sr: SR!

    override func setUpWithError() throws {
        dir = NSTemporaryDirectory() + "tracker-" + UUID().uuidString
        sr = try SR(path: dir)
    }

    override func tearDown() { try? FileManager.default.removeItem(atPath: dir) }

    /// A chain whose writes stop inside the image until released.
    final class HeldWrites: DiskImage, @unchecked Sendable {
        let inner: any DiskImage
        let entered = DispatchSemaphore(value: 0)
        let release = DispatchSemaphore(value: 0)
        init(_ inner: any DiskImage) { self.inner = inner }
        var virtualSize: UInt64 { inner.virtualSize }
        var writable: Bool { inner.writable }
        var depth: Int { inner.depth }
        var layerPaths: [String] { inner.layerPaths }
        func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64, cachedOnly: Bool, holes: inout [Range<Int>]) throws {
            try inner.read(into: buffer, at: offset, cachedOnly: cachedOnly, holes: &holes)
        }
        func plan(offset: UInt64, length: Int) throws -> ReadPlan { try inner.plan(offset: offset, length: length) }
        func write(_ data: UnsafeRawBufferPointer, at offset: UInt64, beforeVisible: (() throws -> Void)?) throws {
            entered.signal()
            release.wait()
            try inner.write(data, at: offset, beforeVisible: beforeVisible)
        }
        func writeZeroes(offset: UInt64, length: UInt64, punch: Bool, fastOnly: Bool) throws {
            entered.signal()
            release.wait()
            try inner.writeZeroes(offset: offset, length: length, punch: punch, fastOnly: fastOnly)
        }
        func allocationRuns(offset: UInt64, length: UInt64) throws -> [(allocated: Bool, length: UInt64)] {
            try inner.allocationRuns(offset: offset, length: length)
        }
        func leafDataRuns(offset: UInt64, length: UInt64) throws -> [Range<UInt64>] { try inner.leafDataRuns(offset: offset, length: length) }
        func leafHoldsAll(offset: UInt64, length: UInt64) -> Bool { inner.leafHoldsAll(offset: offset, length: length) }
        func leafLacksAll(offset: UInt64, length: UInt64) -> Bool { inner.leafLacksAll(offset: offset, length: length) }
        func flush() throws { try inner.flush() }
        func close() { inner.close() }
        func setAllocationBarrier(_ on: Bool) { inner.setAllocationBarrier(on) }
    }

    func handle() throws -> (VDIHandle, HeldWrites, ChangeTracker) {
        let path = dir + "/held." + sr.format.fileExtension
        try sr.format.create(path: path, size: 16 << 20)
        let held = HeldWrites(try sr.format.open(path: path, writable: true))
        let h = VDIHandle(uuid: "held", family: "held", chain: held)
        let tracker = ChangeTracker()
        h.paused { _ in h.tracker = tracker }
        return (h, held, tracker)
    }

    /// Runs `io` on a thread; while it is held inside the image nothing is marked, and once
    /// it returns its 2 MiB unit is.
    func checkMarkedOnlyAfterLanding(_ io: @escaping @Sendable (VDIHandle) -> Void) throws {
        let (h, held, tracker) = try handle()
        defer { h.close() }
        let done = DispatchSemaphore(value: 0)
        Thread { io(h); done.signal() }.start()
        held.entered.wait()
        XCTAssertEqual(tracker.take(size: 16 << 20), [], "marked while its data was not yet in the image")
        held.release.signal()
        done.wait()
        XCTAssertEqual(tracker.take(size: 16 << 20), [(4 << 20)..<(6 << 20)], "not marked once it landed")
    }

    func testAWriteIsMarkedOnlyOnceItHasLanded() throws {
        try checkMarkedOnlyAfterLanding { h in
            let bytes = [UInt8](repeating: 7, count: 4096)
            try! bytes.withUnsafeBytes { try h.write($0, at: (4 << 20) + 8192) }
        }
    }

    func testTheServersWriteIsMarkedOnlyOnceItHasLanded() throws {
        try checkMarkedOnlyAfterLanding { h in
            let finished = DispatchSemaphore(value: 0)
            h.write(length: 4096, at: (4 << 20) + 8192, on: DispatchQueue(label: "t"), withBytes: { body in
                try [UInt8](repeating: 9, count: 4096).withUnsafeBytes { try body($0) }
            }, done: { error in
                XCTAssertNil(error)
                finished.signal()
            })
            finished.wait()
        }
    }

    func testZeroingIsMarkedOnlyOnceItHasLanded() throws {
        try checkMarkedOnlyAfterLanding { h in
            try! h.writeZeroes(offset: 4 << 20, length: 65536, punch: false, fastOnly: false)
        }
    }
}
