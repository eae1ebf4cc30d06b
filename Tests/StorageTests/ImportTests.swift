import Foundation
import XCTest
@testable import Storage
import VHD

/// Imports through `ImportSession` against a model: staged until valid, then committed by
/// a journalled rename or through the handle; a crash in the rename is finished at start-up.
final class ImportTests: XCTestCase {
    var dir: String!
    var sr: SR!

    override func setUpWithError() throws {
        dir = NSTemporaryDirectory() + "importtests-" + UUID().uuidString
        sr = try SR(path: dir)
    }

    override func tearDown() { try? FileManager.default.removeItem(atPath: dir) }

    func contents(_ uuid: String, _ size: Int) throws -> [UInt8] {
        let h = try sr.attach(uuid)
        defer { sr.detach(h) }
        var out = [UInt8](repeating: 0, count: size)
        try out.withUnsafeMutableBytes { try h.read(into: $0, at: 0) }
        return out
    }

    func testACutRawImportChangesNothingAndAWholeOneReplaces() throws {
        let size = 4 << 20
        let r = try sr.create(.init(nameLabel: "d", virtualSize: UInt64(size)))
        let h = try sr.attach(r.uuid)
        try [UInt8](repeating: 7, count: size).withUnsafeBytes { try h.write($0, at: 0) }
        sr.detach(h)
        var data = [UInt8](repeating: 0, count: size)
        for i in stride(from: 0, to: size, by: 4096) { data[i] = UInt8(truncatingIfNeeded: i >> 12) | 1 }
        // Cut: fed half, then abandoned.
        let cut = try sr.beginImport(r.uuid, format: "vhd", task: nil)
        try data.withUnsafeBytes { try cut.feed(UnsafeRawBufferPointer(rebasing: $0[0..<(size / 2)])) }
        XCTAssertThrowsError(try cut.finish())
        cut.abort()
        XCTAssertEqual(try contents(r.uuid, size), [UInt8](repeating: 7, count: size))
        XCTAssertFalse(try FileManager.default.contentsOfDirectory(atPath: dir).contains { $0.contains(".import-") })
        // Whole, raw: the VDI reads the stream; its file is the staged image (no parent).
        _ = try sr.snapshot(r.uuid)
        let whole = try sr.beginImport(r.uuid, format: "raw", task: nil)
        try data.withUnsafeBytes { try whole.feed($0) }
        try whole.finish()
        XCTAssertEqual(try contents(r.uuid, size), data)
        XCTAssertNil(try sr.record(r.uuid).parent)
    }

    func testAReplaceInterruptedAfterItsJournalEntryIsFinishedAtStartUp() throws {
        let size = 2 << 20
        let r = try sr.create(.init(nameLabel: "d", virtualSize: UInt64(size)))
        _ = try sr.snapshot(r.uuid)
        XCTAssertNotNil(try sr.record(r.uuid).parent)
        // The staged image, validated and flushed, and the entry: then the process dies.
        let staging = "\(sr.path)/\(r.uuid).import-test"
        try sr.format.create(path: staging, size: UInt64(size))
        let img = try sr.format.open(path: staging, writable: true)
        let data = [UInt8](repeating: 0x5A, count: size)
        try data.withUnsafeBytes { try img.write($0, at: 0) }
        try img.flush()
        img.close()
        try sr.journal.write(JournalEntry(id: "t", operation: .replace, child: r.uuid, parent: nil, phase: .switching,
                                          started: Date(), staging: staging))
        sr = try SR(path: dir)
        XCTAssertEqual(try contents(r.uuid, size), data)
        XCTAssertNil(try sr.record(r.uuid).parent)
        XCTAssertFalse(FileManager.default.fileExists(atPath: staging))
        XCTAssertTrue(sr.journal.entries().valid.isEmpty)
    }
}
