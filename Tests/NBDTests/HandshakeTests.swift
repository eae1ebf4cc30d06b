import NIOCore
import XCTest
@testable import NBD

struct FakeResolver: ExportResolver {
    var exports: [String: ExportDescription] = [:]
    func describe(exportName: String) -> Result<ExportDescription, ExportLookupFailure> {
        exports[exportName].map { .success($0) } ?? .failure(ExportLookupFailure("unknown export token"))
    }
}

let disk = ExportDescription(name: "/u?token=t", size: 1 << 20, readOnly: false)
let resolver = FakeResolver(exports: ["/u?token=t": disk])

func haggling(_ policy: TLSPolicy = .off, flags: ClientFlags = [.fixedNewstyle, .noZeroes]) -> HandshakeStateMachine {
    var m = HandshakeStateMachine(tlsPolicy: policy)
    XCTAssertEqual(m.receive(clientFlags: flags), [])
    return m
}

func infoData(_ name: String, _ reqs: [UInt16] = []) -> [UInt8] {
    var b = ByteBuffer()
    b.writeInteger(UInt32(name.utf8.count))
    b.writeString(name)
    b.writeInteger(UInt16(reqs.count))
    for r in reqs { b.writeInteger(r) }
    return b.readBytes(length: b.readableBytes)!
}

final class HandshakeTests: XCTestCase {
    func testGreetingGoldenBytes() {
        var b = ByteBuffer()
        encodeGreeting([.fixedNewstyle, .noZeroes], into: &b)
        XCTAssertEqual(b.readBytes(length: b.readableBytes)!, Array("NBDMAGIC".utf8) + Array("IHAVEOPT".utf8) + [0, 3])
    }

    func testClientWithoutFixedNewstyleIsClosed() {
        var m = HandshakeStateMachine(tlsPolicy: .off)
        guard case .close = m.receive(clientFlags: []).first else { return XCTFail() }
    }

    func testUnknownClientFlagsAreClosed() {
        var m = HandshakeStateMachine(tlsPolicy: .off)
        guard case .close = m.receive(clientFlags: ClientFlags(rawValue: 0x81)).first else { return XCTFail() }
    }

    func testOptListRepliesErrPolicy() {
        var m = haggling()
        let a = m.receive(option: OptionRequest(option: .list, data: []), resolver: resolver)
        guard case .send(let r) = a.first else { return XCTFail() }
        XCTAssertEqual(r.type, .errPolicy)
        XCTAssertEqual(m.state, .optionHaggling)
    }

    func testUnknownOptionRepliesErrUnsup() {
        var m = haggling()
        guard case .send(let r) = m.receive(option: OptionRequest(option: Option(rawValue: 99), data: []), resolver: resolver).first
        else { return XCTFail() }
        XCTAssertEqual(r.type, .errUnsup)
        XCTAssertEqual(r.option.rawValue, 99)
    }

    func testGoOnUnknownExportRepliesErrUnknown() {
        var m = haggling()
        guard case .send(let r) = m.receive(option: OptionRequest(option: .go, data: infoData("/u?token=wrong")), resolver: resolver).first
        else { return XCTFail() }
        XCTAssertEqual(r.type, .errUnknown)
        XCTAssertEqual(m.state, .optionHaggling)
    }

    func testGoOnKnownExportSendsInfoBlockSizeAckThenEntersTransmission() {
        var m = haggling()
        let a = m.receive(option: OptionRequest(option: .go, data: infoData("/u?token=t")), resolver: resolver)
        XCTAssertEqual(a.count, 4)
        XCTAssertEqual(a[0], .send(.infoExport(.go, size: 1 << 20, flags: disk.transmissionFlags(structuredReplies: false))))
        XCTAssertEqual(a[1], .send(.infoBlockSize(.go, minimum: 512, preferred: 65536, maximum: 32 << 20)))
        XCTAssertEqual(a[2], .send(OptionReply(option: .go, type: .ack)))
        XCTAssertEqual(a[3], .enterTransmission(TransmissionState(export: disk)))
        XCTAssertEqual(m.state, .transmission)
    }

    func testInfoDoesNotEnterTransmission() {
        var m = haggling()
        let a = m.receive(option: OptionRequest(option: .info, data: infoData("/u?token=t", [1])), resolver: resolver)
        XCTAssertTrue(a.contains(.send(.infoName(.info, name: "/u?token=t"))))
        XCTAssertEqual(m.state, .optionHaggling)
    }

    func testMalformedGoRepliesErrInvalid() {
        var m = haggling()
        guard case .send(let r) = m.receive(option: OptionRequest(option: .go, data: [0, 0, 0, 9, 1]), resolver: resolver).first
        else { return XCTFail() }
        XCTAssertEqual(r.type, .errInvalid)
    }

    func testExportNameOnUnknownExportCloses() {
        var m = haggling()
        guard case .close = m.receive(option: OptionRequest(option: .exportName, data: Array("nope".utf8)), resolver: resolver).first
        else { return XCTFail() }
        XCTAssertEqual(m.state, .closed)
    }

    func testExportNameReplyHas124ZeroesUnlessNoZeroes() {
        var m = haggling(flags: [.fixedNewstyle])
        let a = m.receive(option: OptionRequest(option: .exportName, data: Array("/u?token=t".utf8)), resolver: resolver)
        XCTAssertEqual(a.first, .sendExportNameReply(size: 1 << 20, flags: disk.transmissionFlags(structuredReplies: false),
                                                     noZeroes: false))
        var b = ByteBuffer()
        encodeExportNameReply(size: 1 << 20, flags: [.hasFlags], noZeroes: false, into: &b)
        XCTAssertEqual(b.readableBytes, 8 + 2 + 124)
        b.clear()
        encodeExportNameReply(size: 1 << 20, flags: [.hasFlags], noZeroes: true, into: &b)
        XCTAssertEqual(b.readableBytes, 10)
    }

    func testAbortAcksAndCloses() {
        var m = haggling()
        let a = m.receive(option: OptionRequest(option: .abort, data: []), resolver: resolver)
        XCTAssertEqual(a.first, .send(OptionReply(option: .abort, type: .ack)))
        guard case .close = a.last else { return XCTFail() }
    }

    func testRequireTLSRefusesGoWithErrTLSReqdAndClosesOnExportName() {
        var m = haggling(.require)
        guard case .send(let r) = m.receive(option: OptionRequest(option: .go, data: infoData("/u?token=t")), resolver: resolver).first
        else { return XCTFail() }
        XCTAssertEqual(r.type, .errTLSReqd)
        guard case .close = m.receive(option: OptionRequest(option: .exportName, data: Array("/u?token=t".utf8)), resolver: resolver).first
        else { return XCTFail() }
    }

    func testStartTLSUnderRequireThenGoSucceeds() {
        var m = haggling(.require)
        XCTAssertEqual(m.receive(option: OptionRequest(option: .startTLS, data: []), resolver: resolver), [.startTLS])
        m.tlsEstablished()
        let a = m.receive(option: OptionRequest(option: .go, data: infoData("/u?token=t")), resolver: resolver)
        XCTAssertEqual(a.last, .enterTransmission(TransmissionState(export: disk)))
    }

    func testStartTLSWhenOffRepliesErrPolicy() {
        var m = haggling(.off)
        guard case .send(let r) = m.receive(option: OptionRequest(option: .startTLS, data: []), resolver: resolver).first
        else { return XCTFail() }
        XCTAssertEqual(r.type, .errPolicy)
    }

    func testSecondStartTLSRepliesErrInvalid() {
        var m = haggling(.on)
        _ = m.receive(option: OptionRequest(option: .startTLS, data: []), resolver: resolver)
        m.tlsEstablished()
        guard case .send(let r) = m.receive(option: OptionRequest(option: .startTLS, data: []), resolver: resolver).first
        else { return XCTFail() }
        XCTAssertEqual(r.type, .errInvalid)
    }

    func metaData(_ name: String, _ queries: [String]) -> [UInt8] {
        var b = ByteBuffer()
        b.writeInteger(UInt32(name.utf8.count)); b.writeString(name)
        b.writeInteger(UInt32(queries.count))
        for q in queries { b.writeInteger(UInt32(q.utf8.count)); b.writeString(q) }
        return b.readBytes(length: b.readableBytes)!
    }

    func testSetMetaContextWithoutStructuredRepliesIsErrInvalid() {
        var m = haggling()
        guard case .send(let r) = m.receive(option: OptionRequest(option: .setMetaContext, data: metaData("/u?token=t", [baseAllocationContext])),
                                            resolver: resolver).first else { return XCTFail() }
        XCTAssertEqual(r.type, .errInvalid)
    }

    func testStructuredReplyThenSetBaseAllocationCarriesIntoTransmission() {
        var m = haggling()
        XCTAssertEqual(m.receive(option: OptionRequest(option: .structuredReply, data: []), resolver: resolver),
                       [.send(OptionReply(option: .structuredReply, type: .ack))])
        let a = m.receive(option: OptionRequest(option: .setMetaContext, data: metaData("/u?token=t", [baseAllocationContext, "qemu:nope"])),
                          resolver: resolver)
        XCTAssertEqual(a, [.send(.metaContext(.setMetaContext, id: 1, name: baseAllocationContext)),
                           .send(OptionReply(option: .setMetaContext, type: .ack))])
        let g = m.receive(option: OptionRequest(option: .go, data: infoData("/u?token=t")), resolver: resolver)
        guard case .enterTransmission(let ts) = g.last else { return XCTFail() }
        XCTAssertTrue(ts.structuredReplies)
        XCTAssertEqual(ts.metaContexts, [MetaContext(id: 1, name: baseAllocationContext)])
        XCTAssertTrue(ts.flags.contains(.sendDF))
    }

    func testExtendedHeadersAckThenStructuredReplyIsExtHeaderReqdAndGoCarriesThem() {
        var m = haggling()
        XCTAssertEqual(m.receive(option: OptionRequest(option: .extendedHeaders, data: [1]), resolver: resolver),
                       [.send(.error(.extendedHeaders, .errInvalid, "EXTENDED_HEADERS takes no data"))])
        XCTAssertEqual(m.receive(option: OptionRequest(option: .extendedHeaders, data: []), resolver: resolver),
                       [.send(OptionReply(option: .extendedHeaders, type: .ack))])
        guard case .send(let r) = m.receive(option: OptionRequest(option: .structuredReply, data: []), resolver: resolver).first
        else { return XCTFail() }
        XCTAssertEqual(r.type, .errExtHeaderReqd)
        // Meta contexts need no STRUCTURED_REPLY once extended headers are on.
        let a = m.receive(option: OptionRequest(option: .setMetaContext, data: metaData("/u?token=t", [baseAllocationContext])),
                          resolver: resolver)
        XCTAssertEqual(a.count, 2)
        guard case .enterTransmission(let ts) = m.receive(option: OptionRequest(option: .go, data: infoData("/u?token=t")),
                                                          resolver: resolver).last else { return XCTFail() }
        XCTAssertTrue(ts.extendedHeaders)
        XCTAssertTrue(ts.structuredReplies)
        XCTAssertEqual(ts.metaContexts.count, 1)
    }

    func testExportNameAfterExtendedHeadersCloses() {
        var m = haggling()
        _ = m.receive(option: OptionRequest(option: .extendedHeaders, data: []), resolver: resolver)
        guard case .close = m.receive(option: OptionRequest(option: .exportName, data: Array("/u?token=t".utf8)), resolver: resolver).first
        else { return XCTFail() }
    }

    func testMetaContextsForAnotherExportAreDropped() {
        var m = haggling()
        _ = m.receive(option: OptionRequest(option: .structuredReply, data: []), resolver: resolver)
        let other = ExportDescription(name: "/v?token=s", size: 512, readOnly: true)
        let r2 = FakeResolver(exports: ["/u?token=t": disk, "/v?token=s": other])
        _ = m.receive(option: OptionRequest(option: .setMetaContext, data: metaData("/u?token=t", [baseAllocationContext])), resolver: r2)
        guard case .enterTransmission(let ts) = m.receive(option: OptionRequest(option: .go, data: infoData("/v?token=s")), resolver: r2).last
        else { return XCTFail() }
        XCTAssertEqual(ts.metaContexts, [])
    }

    func testListMetaContextNamespaceQueryListsIt() {
        var m = haggling()
        _ = m.receive(option: OptionRequest(option: .structuredReply, data: []), resolver: resolver)
        let a = m.receive(option: OptionRequest(option: .listMetaContext, data: metaData("/u?token=t", ["base:"])), resolver: resolver)
        XCTAssertEqual(a.first, .send(.metaContext(.listMetaContext, id: 0, name: baseAllocationContext)))
    }

    func testMetaContextOnUnknownExportIsErrUnknown() {
        var m = haggling()
        _ = m.receive(option: OptionRequest(option: .structuredReply, data: []), resolver: resolver)
        guard case .send(let r) = m.receive(option: OptionRequest(option: .listMetaContext, data: metaData("/x", [])), resolver: resolver).first
        else { return XCTFail() }
        XCTAssertEqual(r.type, .errUnknown)
    }

    func testTooManyOptionsCloses() {
        var m = haggling()
        for _ in 0..<Limits.maxOptions { _ = m.receive(option: OptionRequest(option: .list, data: []), resolver: resolver) }
        guard case .close = m.receive(option: OptionRequest(option: .list, data: []), resolver: resolver).first else { return XCTFail() }
    }

    func testOptionReplyGoldenBytes() {
        var b = ByteBuffer()
        OptionReply(option: .go, type: .ack).encode(into: &b)
        XCTAssertEqual(b.readBytes(length: b.readableBytes)!,
                       [0x00, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9, 0, 0, 0, 7, 0, 0, 0, 1, 0, 0, 0, 0])
    }
}
