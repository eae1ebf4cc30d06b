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
        XCTAssertEqual(err(Request(flags: [], command: .read, cookie: 1, offset: 0, length: UInt64(Limits.maxPayload) + 1), rw), .einval)
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
        guard case .success(.read(let c, let o, let l, let df)) = RequestValidator.validate(
            Request(flags: [], command: .read, cookie: 7, offset: 512, length: 512), rw) else { return XCTFail() }
        XCTAssertEqual([c, o, UInt64(l)], [7, 512, 512])
        XCTAssertFalse(df)
    }

    var structured: TransmissionState {
        TransmissionState(export: rw.export, structuredReplies: true, metaContexts: [MetaContext(id: 1, name: baseAllocationContext)])
    }

    func testDFWithoutStructuredRepliesIsEINVAL() {
        XCTAssertEqual(err(Request(flags: [.df], command: .read, cookie: 1, offset: 0, length: 1), rw), .einval)
        XCTAssertNil(err(Request(flags: [.df], command: .read, cookie: 1, offset: 0, length: 1), structured))
    }

    func testOversizedReadWithDFIsEOVERFLOW() {
        XCTAssertEqual(err(Request(flags: [.df], command: .read, cookie: 1, offset: 0, length: UInt64(Limits.maxPayload) + 1), structured), .eoverflow)
    }

    func testBlockStatusWithoutContextIsEINVAL() {
        XCTAssertEqual(err(Request(flags: [], command: .blockStatus, cookie: 1, offset: 0, length: 512), rw), .einval)
        XCTAssertNil(err(Request(flags: [.reqOne], command: .blockStatus, cookie: 1, offset: 0, length: 512), structured))
    }

    var extended: TransmissionState { TransmissionState(export: rw.export, extendedHeaders: true) }

    func testExtendedHeadersImplyStructuredRepliesAndFrameRepliesWithTheOffset() {
        XCTAssertTrue(extended.structuredReplies)
        XCTAssertTrue(extended.flags.contains(.sendDF))
        XCTAssertEqual(extended.framing(requestOffset: 42), .extended(requestOffset: 42))
        XCTAssertNil(rw.framing(requestOffset: 42))
    }

    func testExtendedWriteNeedsPayloadLenAndOtherCommandsRefuseIt() {
        XCTAssertEqual(err(Request(flags: [], command: .write, cookie: 1, offset: 0, length: 1), extended), .einval)
        XCTAssertNil(err(Request(flags: [.payloadLen], command: .write, cookie: 1, offset: 0, length: 1), extended))
        XCTAssertEqual(err(Request(flags: [.payloadLen], command: .trim, cookie: 1, offset: 0, length: 1), extended), .einval)
        XCTAssertEqual(err(Request(flags: [.payloadLen], command: .write, cookie: 1, offset: 0, length: 1), rw), .einval,
                       "PAYLOAD_LEN is unknown without extended headers")
    }

    func testExtendedEffectLengthsAreSixtyFourBit() {
        let big = TransmissionState(export: ExportDescription(name: "x", size: 8 << 40, readOnly: false), extendedHeaders: true)
        guard case .success(.writeZeroes(_, _, let l, _, _, _)) = RequestValidator.validate(
            Request(flags: [], command: .writeZeroes, cookie: 1, offset: 0, length: 5 << 40), big) else { return XCTFail() }
        XCTAssertEqual(l, 5 << 40)
        XCTAssertEqual(err(Request(flags: [], command: .read, cookie: 1, offset: 0, length: 5 << 40), big), .einval)
        XCTAssertEqual(err(Request(flags: [], command: .trim, cookie: 1, offset: 1, length: 8 << 40), big), .einval)
    }

    func testTrimAndZeroOnReadOnlyAreEPERM() {
        XCTAssertEqual(err(Request(flags: [], command: .trim, cookie: 1, offset: 0, length: 512), ro), .eperm)
        XCTAssertEqual(err(Request(flags: [], command: .writeZeroes, cookie: 1, offset: 0, length: 512), ro), .eperm)
    }

    func testFastZeroOnlyOnWriteZeroes() {
        XCTAssertEqual(err(Request(flags: [.fastZero], command: .trim, cookie: 1, offset: 0, length: 512), rw), .einval)
        XCTAssertNil(err(Request(flags: [.fastZero, .noHole, .fua], command: .writeZeroes, cookie: 1, offset: 0, length: 512), rw))
    }

    func testWriteZeroesPastEndIsENOSPC() {
        XCTAssertEqual(err(Request(flags: [], command: .writeZeroes, cookie: 1, offset: 1 << 20, length: 512), rw), .enospc)
    }

    func testZeroLengthReadIsEINVAL() {
        XCTAssertEqual(err(Request(flags: [], command: .read, cookie: 1, offset: 0, length: 0), rw), .einval)
    }

    func testReadOnlyExportAdvertisesReadOnlyFlag() {
        XCTAssertTrue(ro.flags.contains(.readOnly))
        XCTAssertFalse(ro.flags.contains(.sendTrim))
        XCTAssertFalse(rw.flags.contains(.readOnly))
        XCTAssertTrue(rw.flags.isSuperset(of: [.sendTrim, .sendWriteZeroes, .sendFastZero, .sendCache]))
    }
}
