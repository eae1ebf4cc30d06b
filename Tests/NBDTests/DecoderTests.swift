import NIOCore
import NIOTestUtils
import XCTest
@testable import NBD

extension OptionRequest: CustomStringConvertible {
    public var description: String { "\(option) \(data)" }
}

final class DecoderTests: XCTestCase {
    func testOptionDecoderByteByByteAndBatched() throws {
        var input = ByteBuffer()
        input.writeMultipleIntegers(iHaveOpt, Option.go.rawValue, UInt32(3))
        input.writeBytes([1, 2, 3])
        try ByteToMessageDecoderVerifier.verifyDecoder(
            inputOutputPairs: [(input, [OptionRequest(option: .go, data: [1, 2, 3])])],
            decoderFactory: { OptionDecoderHandler() })
    }

    func testOptionDecoderRejectsBadMagic() {
        var b = ByteBuffer()
        b.writeMultipleIntegers(UInt64(1), UInt32(7), UInt32(0))
        var d = OptionDecoder()
        XCTAssertThrowsError(try d.decode(buffer: &b))
    }

    func testOptionDecoderRejectsHugeLengthBeforeBuffering() {
        var b = ByteBuffer()
        b.writeMultipleIntegers(iHaveOpt, UInt32(7), UInt32(1 << 30))
        var d = OptionDecoder()
        XCTAssertThrowsError(try d.decode(buffer: &b))
    }

    func testRequestDecoderWaitsForWholeWritePayload() throws {
        var b = ByteBuffer()
        Request(flags: [.fua], command: .write, cookie: 9, offset: 512, length: 4, payload: ByteBuffer(bytes: [1, 2, 3, 4])).encode(into: &b)
        var partial = b.getSlice(at: 0, length: 30)!
        var d = RequestDecoder()
        XCTAssertNil(try d.decode(buffer: &partial))
        XCTAssertEqual(partial.readableBytes, 30, "consumes nothing until whole")
        guard case .request(let r)? = try d.decode(buffer: &b) else { return XCTFail() }
        XCTAssertEqual(r.cookie, 9)
        XCTAssertEqual(r.flags, [.fua])
        XCTAssertEqual(r.payload.readableBytes, 4)
    }

    func testOversizedWriteIsReportedAndItsPayloadDrained() throws {
        var d = RequestDecoder(maxPayload: 8)
        var b = ByteBuffer()
        Request(flags: [], command: .write, cookie: 1, offset: 0, length: 16, payload: ByteBuffer(bytes: [UInt8](repeating: 0, count: 16)))
            .encode(into: &b)
        Request(flags: [], command: .flush, cookie: 2, offset: 0, length: 0).encode(into: &b)
        guard case .oversizedWrite(let w)? = try d.decode(buffer: &b) else { return XCTFail() }
        XCTAssertEqual(w.cookie, 1)
        guard case .request(let f)? = try d.decode(buffer: &b) else { return XCTFail() }
        XCTAssertEqual(f.command, .flush)
    }

    func testBadRequestMagicThrows() {
        var b = ByteBuffer(bytes: [UInt8](repeating: 0x11, count: 28))
        var d = RequestDecoder()
        XCTAssertThrowsError(try d.decode(buffer: &b))
    }

    func testSimpleReplyGoldenBytes() {
        var b = ByteBuffer()
        encodeSimpleReply(error: .einval, cookie: 0x0102, into: &b)
        XCTAssertEqual(b.readBytes(length: b.readableBytes)!, [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 22, 0, 0, 0, 0, 0, 0, 1, 2])
    }
}

/// Adapts the single-step decoder to NIOTestUtils' verifier.
struct OptionDecoderHandler: ByteToMessageDecoder {
    typealias InboundOut = OptionRequest
    var inner = OptionDecoder()
    mutating func decode(context: ChannelHandlerContext, buffer: inout ByteBuffer) throws -> DecodingState {
        guard let m = try inner.decode(buffer: &buffer) else { return .needMoreData }
        context.fireChannelRead(NIOAny(m))
        return .continue
    }
}
