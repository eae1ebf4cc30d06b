import Foundation
import Logging
import XCTest
@testable import Control
@testable import Storage

final class ControlAPITests: XCTestCase {
    var dir: String!
    var api: ControlAPI!

    override func setUpWithError() throws {
        dir = NSTemporaryDirectory() + "ctltests-" + UUID().uuidString
        api = ControlAPI(sr: try SR(path: dir), logger: Logger(label: "test"))
    }

    override func tearDown() { try? FileManager.default.removeItem(atPath: dir) }

    func call(_ line: String) -> RPCResponse { api.handle(line: Data(line.utf8)) }

    func testMalformedJSONIsParseError() {
        let r = call("{nope")
        XCTAssertEqual(r.error?.code, -32700)
        XCTAssertEqual(r.id, nil)
    }

    func testNonObjectIsInvalidRequest() {
        XCTAssertEqual(call("[1,2]").error?.code, -32600)
    }

    func testUnknownMethodIsMethodNotFound() {
        XCTAssertEqual(call(#"{"jsonrpc":"2.0","method":"VDI.frobnicate","params":[],"id":1}"#).error?.code, -32601)
    }

    func testCreateThenGetRecordCarriesXenAPIFields() throws {
        let c = call(#"{"jsonrpc":"2.0","method":"VDI.create","params":[{"name_label":"x","virtual_size":"64MiB"}],"id":1}"#)
        let uuid = try XCTUnwrap(c.result?.stringValue)
        let g = call(#"{"jsonrpc":"2.0","method":"VDI.get_record","params":["\#(uuid)"],"id":2}"#)
        let o = try XCTUnwrap(g.result?.objectValue)
        XCTAssertEqual(o["virtual_size"], .number(Double(64 << 20)))
        XCTAssertEqual(o["name_label"], .string("x"))
        for k in ["is_a_snapshot", "snapshot_of", "read_only", "sharable", "on_boot", "tags", "other_config", "sm_config", "type"] {
            XCTAssertNotNil(o[k], k)
        }
        XCTAssertEqual(g.id, .number(2))
    }

    func testMissingVDIIsXenAPIErrorWithData() {
        let r = call(#"{"jsonrpc":"2.0","method":"VDI.get_record","params":["00000000-0000-0000-0000-000000000000"],"id":1}"#)
        XCTAssertEqual(r.error?.message, "VDI_MISSING")
        XCTAssertEqual(r.error?.data, .array([.string("VDI_MISSING"), .string("00000000-0000-0000-0000-000000000000")]))
    }

    func testBadUUIDIsUUIDInvalid() {
        XCTAssertEqual(call(#"{"jsonrpc":"2.0","method":"VDI.destroy","params":["zz"],"id":1}"#).error?.message, "UUID_INVALID")
    }

    func testBadSizeIsValueNotSupported() {
        let r = call(#"{"jsonrpc":"2.0","method":"VDI.create","params":[{"name_label":"x","virtual_size":"lots"}],"id":1}"#)
        XCTAssertEqual(r.error?.message, "VALUE_NOT_SUPPORTED")
    }

    func testWrongParamTypeIsInvalidParams() {
        XCTAssertEqual(call(#"{"jsonrpc":"2.0","method":"VDI.get_record","params":[5],"id":1}"#).error?.code, -32602)
    }

    func testParseSize() {
        XCTAssertEqual(parseSize("64MiB"), 64 << 20)
        XCTAssertEqual(parseSize("2GiB"), 2 << 30)
        XCTAssertEqual(parseSize("512B"), 512)
        XCTAssertEqual(parseSize("1TiB"), 1 << 40)
        XCTAssertEqual(parseSize("123"), 123)
        XCTAssertNil(parseSize("x"))
        XCTAssertNil(parseSize("99999999999TiB"))
    }
}
