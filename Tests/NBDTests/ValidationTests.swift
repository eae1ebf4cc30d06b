import NIOCore
import XCTest
@testable import NBD

final class ValidationTests: XCTestCase {
    let rw = TransmissionState(export: ExportDescription(name: "x", size: 1 << 20, readOnly: false))
    let ro = TransmissionState(export: ExportDescription(name: "x", size: 1 << 20, readOnly: true))

    func err(_ r: Request, _ s: TransmissionState) -> ErrorValue? {
        if case .failure(let e) = RequestValidator.validate(r, s) { return e }
        return nil
    }

    func testReadPastEndIsEINVAL() {
        XCTAssertEqual(err(Request(flags: [], command: .read, cookie: 1, offset: (1 << 20) - 1, length: 2), rw), .einval)
    }

    func testOffsetOverflowIsEINVAL() {
        XCTAssertEqual(err(Request(flags: [], command: .read, cookie: 1, offset: .max, length: 2), rw), .einval)
    }

    func testWritePastEndIsENOSPC() {
        XCTAssertEqual(err(Request(flags: [], command: .write, cookie: 1, offset: 1 << 20, length: 1), rw), .enospc)
    }

    func testWriteToReadOnlyExportIsEPERM() {
        XCTAssertEqual(err(Request(flags: [], command: .write, cookie: 1, offset: 0, length: 1), ro), .eperm)
    }

    func testOversizedReadIsEINVAL() {
        XCTAssertEqual(err(Request(flags: [], command: .read, cookie: 1, offset: 0, length: Limits.maxPayload + 1), rw), .einval)
    }

    func testUnknownCommandIsEINVAL() {
        XCTAssertEqual(err(Request(flags: [], command: Command(rawValue: 42), cookie: 1, offset: 0, length: 0), rw), .einval)
    }

    func testUnknownFlagBitIsEINVAL() {
        XCTAssertEqual(err(Request(flags: CommandFlags(rawValue: 0x100), command: .read, cookie: 1, offset: 0, length: 1), rw), .einval)
    }

    func testFlushWithLengthIsEINVAL() {
        XCTAssertEqual(err(Request(flags: [], command: .flush, cookie: 1, offset: 0, length: 5), rw), .einval)
    }

    func testValidReadPasses() {
        guard case .success(.read(let c, let o, let l)) = RequestValidator.validate(
            Request(flags: [], command: .read, cookie: 7, offset: 512, length: 512), rw) else { return XCTFail() }
        XCTAssertEqual([c, o, UInt64(l)], [7, 512, 512])
    }

    func testReadOnlyExportAdvertisesReadOnlyFlag() {
        XCTAssertTrue(ro.flags.contains(.readOnly))
        XCTAssertFalse(rw.flags.contains(.readOnly))
    }
}
