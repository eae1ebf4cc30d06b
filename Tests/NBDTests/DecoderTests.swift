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

    func testRequestDecoderGathersAWritePayloadAsItArrives() throws {
        var b = ByteBuffer()
        Request(flags: [.fua], command: .write, cookie: 9, offset: 512, length: 4, payload: ByteBuffer(bytes: [1, 2, 3, 4])).encode(into: &b)
        var partial = b.getSlice(at: 0, length: 30)!
        var rest = b.getSlice(at: 30, length: 2)!
        var d = RequestDecoder()
        XCTAssertNil(try d.decode(buffer: &partial))
        XCTAssertEqual(partial.readableBytes, 0, "the header and the payload's first bytes are taken at once")
        XCTAssertEqual(d.payloadBytesNeeded, 2)
        guard case .request(let r)? = try d.decode(buffer: &rest) else { return XCTFail() }
        XCTAssertEqual(r.cookie, 9)
        XCTAssertEqual(r.flags, [.fua])
        XCTAssertEqual(r.payload.getBytes(at: r.payload.readerIndex, length: 4), [1, 2, 3, 4])
        XCTAssertEqual(d.payloadBytesNeeded, 0)
    }

    func testWritePayloadsOwnTheirStorageAndLeaveTheInputEmpty() throws {
        // Many writes in one input buffer: each payload is a buffer of its own, so the input
        // can be compacted or reused while the writes are still in flight.
        var b = ByteBuffer()
        for i in 0..<100 {
            Request(flags: [], command: .write, cookie: UInt64(i), offset: 0, length: 1024,
                    payload: ByteBuffer(bytes: [UInt8](repeating: UInt8(i), count: 1024))).encode(into: &b)
        }
        Request(flags: [], command: .flush, cookie: 100, offset: 0, length: 0).encode(into: &b)
        b.writeBytes([0x25, 0x60])  // a partial header stays behind
        // The input's storage stays alive below, so nothing else can be allocated inside it.
        let (inputStart, inputEnd) = b.withUnsafeReadableBytes {
            (UInt(bitPattern: $0.baseAddress), UInt(bitPattern: $0.baseAddress) + UInt($0.count))
        }
        var d = RequestDecoder()
        var payloads: [ByteBuffer] = []
        while case .request(let r)? = try d.decode(buffer: &b), r.command == .write { payloads.append(r.payload) }
        XCTAssertEqual(payloads.count, 100)
        XCTAssertEqual(b.readableBytes, 2)
        b.discardReadBytes()
        b.writeRepeatingByte(0xEE, count: 64 * 1024)
        for (i, p) in payloads.enumerated() {
            XCTAssertEqual(p.getBytes(at: p.readerIndex, length: 1024), [UInt8](repeating: UInt8(i), count: 1024))
            let at = p.withUnsafeReadableBytes { UInt(bitPattern: $0.baseAddress) }
            XCTAssertFalse(at >= inputStart && at < inputEnd, "payload \(i) aliases the input buffer")
        }
    }

    func testReceivePayloadWritesStraightIntoTheGatheredRequest() throws {
        var b = ByteBuffer()
        let data = (0..<300).map { UInt8($0 % 251) }
        Request(flags: [], command: .write, cookie: 3, offset: 0, length: 300, payload: ByteBuffer(bytes: data)).encode(into: &b)
        var head = b.getSlice(at: 0, length: 28 + 100)!
        var d = RequestDecoder()
        XCTAssertNil(try d.decode(buffer: &head))
        XCTAssertEqual(d.payloadBytesNeeded, 200)
        // A read that returns less than asked, then the rest.
        for part in [data[100..<150], data[150..<300]] {
            d.receivePayload { window in
                XCTAssertEqual(window.count, 300 - part.startIndex)
                window.copyBytes(from: part)
                return part.count
            }
        }
        XCTAssertEqual(d.payloadBytesNeeded, 0)
        var empty = ByteBuffer()
        guard case .request(let r)? = try d.decode(buffer: &empty) else { return XCTFail("not released once whole") }
        XCTAssertEqual(r.payload.getBytes(at: r.payload.readerIndex, length: 300), data)
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

    func testExtendedRequestsHave32ByteHeadersAndPayloadsOnlyWithPayloadLen() throws {
        var d = RequestDecoder()
        d.extended = true
        var b = ByteBuffer()
        Request(flags: [.payloadLen, .fua], command: .write, cookie: 5, offset: 4096, length: 3, payload: ByteBuffer(bytes: [7, 8, 9]))
            .encode(into: &b, extended: true)
        // A 64-bit effect length: zero 5 TiB in one request.
        Request(flags: [], command: .writeZeroes, cookie: 6, offset: 0, length: 5 << 40).encode(into: &b, extended: true)
        // A payload on a command that takes none is consumed, so the next request stays framed.
        Request(flags: [.payloadLen], command: .trim, cookie: 7, offset: 0, length: 2, payload: ByteBuffer(bytes: [1, 1]))
            .encode(into: &b, extended: true)
        Request(flags: [], command: .flush, cookie: 8, offset: 0, length: 0).encode(into: &b, extended: true)
        XCTAssertEqual(b.readableBytes, 32 * 4 + 3 + 2)
        guard case .request(let w)? = try d.decode(buffer: &b) else { return XCTFail() }
        XCTAssertEqual([w.cookie, w.offset, w.length], [5, 4096, 3])
        XCTAssertEqual(w.payload.getBytes(at: w.payload.readerIndex, length: 3), [7, 8, 9])
        guard case .request(let z)? = try d.decode(buffer: &b) else { return XCTFail() }
        XCTAssertEqual(z.length, 5 << 40)
        XCTAssertEqual(z.payload.readableBytes, 0)
        guard case .request(let t)? = try d.decode(buffer: &b) else { return XCTFail() }
        XCTAssertEqual(t.payload.readableBytes, 2)
        guard case .request(let f)? = try d.decode(buffer: &b) else { return XCTFail() }
        XCTAssertEqual(f.command, .flush)
    }

    func testExtendedModeRefusesCompactMagicAndOversizedPayloads() {
        var d = RequestDecoder(maxPayload: 8)
        d.extended = true
        var compact = ByteBuffer()
        Request(flags: [], command: .flush, cookie: 1, offset: 0, length: 0).encode(into: &compact)
        compact.writeRepeatingByte(0, count: 4)
        XCTAssertThrowsError(try d.decode(buffer: &compact)) { XCTAssertEqual($0 as? NBDProtocolError, .badRequestMagic(requestMagic)) }
        var big = ByteBuffer()
        Request(flags: [.payloadLen], command: .write, cookie: 1, offset: 0, length: 9).encode(into: &big, extended: true)
        XCTAssertThrowsError(try d.decode(buffer: &big)) { XCTAssertEqual($0 as? NBDProtocolError, .payloadTooLarge(9)) }
    }

    func testExtendedReplyGoldenBytes() {
        var b = ByteBuffer()
        encodeDoneChunk(.extended(requestOffset: 0x10), cookie: 0x0102, into: &b)
        XCTAssertEqual(b.readBytes(length: b.readableBytes)!,
                       [0x6E, 0x8A, 0x27, 0x8C, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 0, 0, 0, 0, 0])
        b = ByteBuffer()
        encodeBlockStatusChunk(.extended(requestOffset: 0), cookie: 1, contextID: 3, extents: [(5 << 32, 3)], done: true, into: &b)
        XCTAssertEqual(b.getInteger(at: 6, as: UInt16.self), ReplyType.blockStatusExt.rawValue)
        XCTAssertEqual(b.getInteger(at: 24, as: UInt64.self), 8 + 16)
        XCTAssertEqual(b.getInteger(at: 32, as: UInt32.self), 3)
        XCTAssertEqual(b.getInteger(at: 36, as: UInt32.self), 1, "descriptor count")
        XCTAssertEqual(b.getInteger(at: 40, as: UInt64.self), 5 << 32)
        XCTAssertEqual(b.getInteger(at: 48, as: UInt64.self), 3)
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
