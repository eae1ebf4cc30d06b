import Foundation
import XCTest
@testable import Storage

/// Image formats per VDI: the choice at create (asked for, defaulted, refused with the
/// SR's formats), the file name, the SR's kept list, and what a raw VDI refuses.
final class FormatTests: XCTestCase {
    var dir: String!

    override func setUp() { dir = NSTemporaryDirectory() + "formattests-" + UUID().uuidString }
    override func tearDown() { try? FileManager.default.removeItem(atPath: dir) }

    func code(_ body: () throws -> Void) -> String? {
        do { try body() } catch let e as StorageError { return e.code } catch { return "\(error)" }
        return nil
    }

    func testCreateChoosesAndNamesTheFormat() throws {
        let sr = try SR(path: dir)
        XCTAssertEqual(sr.supportedImageFormats.map(\.name), ["vhd", "raw", "qcow2"])
        let v = try sr.create(.init(nameLabel: "v", virtualSize: 1 << 20))
        XCTAssertTrue(sr.imagePath(v.uuid).hasSuffix("/\(v.uuid).vhd"))
        XCTAssertEqual(sr.filledIn(v).smConfig["image-format"], "vhd")
        var p = SR.CreateParams(nameLabel: "r", virtualSize: 1 << 20)
        p.smConfig["image-format"] = "raw"
        let r = try sr.create(p)
        XCTAssertTrue(FileManager.default.fileExists(atPath: "\(dir!)/\(r.uuid).raw"))
        XCTAssertEqual(sr.format(of: r.uuid).name, "raw")
        XCTAssertEqual(try sr.record(r.uuid).smConfig["image-format"], "raw")
        XCTAssertNil(sr.filledIn(r).smConfig["vhd-parent"])
        // Past VHD's limit with no format asked: qcow2 (XCP-ng's choice); VHD asked for is
        // refused, naming the formats that would do.
        let big = SR.CreateParams(nameLabel: "b", virtualSize: 3 << 40)
        let q = try sr.create(big)
        XCTAssertEqual(sr.format(of: q.uuid).name, "qcow2")
        XCTAssertTrue(FileManager.default.fileExists(atPath: "\(dir!)/\(q.uuid).qcow2"))
        var bigVHD = big
        bigVHD.smConfig["image-format"] = "vhd"
        XCTAssertThrowsError(try sr.create(bigVHD)) { e in
            XCTAssertEqual((e as? StorageError)?.code, "VALUE_NOT_SUPPORTED")
            XCTAssertTrue("\(e)".contains("2040 GiB"), "\(e)")
        }
        let vhdOnly = try SR(path: dir + "-vhd", supportedFormats: try SR.parseImageFormats("vhd"))
        defer { try? FileManager.default.removeItem(atPath: dir + "-vhd") }
        XCTAssertThrowsError(try vhdOnly.create(big)) { e in
            XCTAssertEqual((e as? StorageError)?.code, "VALUE_NOT_SUPPORTED")
            XCTAssertTrue("\(e)".contains("this SR (vhd)"), "\(e)")
        }
        var bigRaw = big
        bigRaw.smConfig["image-format"] = "raw"
        XCTAssertEqual(sr.format(of: try sr.create(bigRaw).uuid).name, "raw")
        var bad = SR.CreateParams(nameLabel: "x", virtualSize: 1 << 20)
        bad.smConfig["image-format"] = "qcow3"
        XCTAssertThrowsError(try sr.create(bad)) { e in XCTAssertTrue("\(e)".contains("known: vhd, raw, qcow2"), "\(e)") }
    }

    func testTheSRKeepsItsFormatsAndRefusesOthers() throws {
        _ = try SR(path: dir, supportedFormats: try SR.parseImageFormats("vhd"))
        let sr = try SR(path: dir)  // reopened without formats: the kept ones
        XCTAssertEqual(sr.supportedImageFormats.map(\.name), ["vhd"])
        XCTAssertNil(try sr.otherConfig()[SR.imageFormatsKey], "the formats are not other_config")
        var p = SR.CreateParams(nameLabel: "r", virtualSize: 1 << 20)
        p.smConfig["image-format"] = "raw"
        XCTAssertThrowsError(try sr.create(p)) { e in XCTAssertTrue("\(e)".hasSuffix("this SR holds vhd"), "\(e)") }
        XCTAssertThrowsError(try SR.parseImageFormats("vhd+vmdk"))
        XCTAssertThrowsError(try SR.parseImageFormats(""))
        XCTAssertEqual(try SR.parseImageFormats("raw,vhd").map(\.name), ["raw", "vhd"])
    }

    func testTheSRRecordKeepsItsUUIDAndIsNotOtherConfig() throws {
        let a = try SR(path: dir)
        try a.setNameLabel("pool disks")
        _ = try a.create(.init(nameLabel: "v", virtualSize: 3 << 20))
        let b = try SR(path: dir)
        let r = try b.srRecord()
        XCTAssertEqual(r.uuid, a.uuid)
        XCTAssertNotNil(UUID(uuidString: r.uuid))
        XCTAssertEqual(r.nameLabel, "pool disks")
        XCTAssertEqual(r.supportedImageFormats, ["vhd", "raw", "qcow2"])
        XCTAssertEqual(r.virtualAllocation, 3 << 20)
        XCTAssertEqual(try b.otherConfig(), [:])
        XCTAssertThrowsError(try b.addToOtherConfig(key: "uuid", value: "x"))
    }

    func testARawVDIRefusesWhatNeedsAChain() throws {
        let sr = try SR(path: dir)
        var p = SR.CreateParams(nameLabel: "r", virtualSize: 4 << 20)
        p.smConfig["image-format"] = "raw"
        let r = try sr.create(p)
        XCTAssertEqual(code { _ = try sr.snapshot(r.uuid) }, "VDI_INCOMPATIBLE_TYPE")
        XCTAssertEqual(code { _ = try sr.clone(r.uuid) }, "VDI_INCOMPATIBLE_TYPE")
        XCTAssertEqual(code { try sr.enableCBT(r.uuid) }, "VDI_INCOMPATIBLE_TYPE")
        XCTAssertEqual(code { try sr.setOnBoot(r.uuid, .reset) }, "VDI_INCOMPATIBLE_TYPE")
        // What a raw VDI does: writes through its handle, a copy (raw too), a resize.
        let h = try sr.attach(r.uuid)
        try [UInt8](repeating: 9, count: 4096).withUnsafeBytes { try h.write($0, at: 8192) }
        try h.flush()
        sr.detach(h)
        let c = try sr.copy(r.uuid, base: nil, into: nil, task: nil)
        XCTAssertEqual(sr.format(of: c.uuid).name, "raw")
        let data = try Data(contentsOf: URL(fileURLWithPath: sr.imagePath(c.uuid)))
        XCTAssertEqual(Array(data[8192..<(8192 + 4096)]), [UInt8](repeating: 9, count: 4096))
        XCTAssertEqual(try sr.resize(r.uuid, size: 8 << 20).virtualSize, 8 << 20)
    }
}
