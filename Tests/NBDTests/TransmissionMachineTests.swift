import NIOCore
import XCTest
@testable import NBD

/// The transmission machine without sockets: what it answers to each request, completion
/// and end of input, and how it holds a client to the limits.
final class TransmissionMachineTests: XCTestCase {
    let export = ExportDescription(name: "x", size: 1 << 20, readOnly: false)
    let limits = TransmissionMachine.Limits(maxInFlightRequests: 3, maxInFlightBytes: 64 * 1024, maxQueuedReplyBytes: 4096)

    func machine(structured: Bool = false, extended: Bool = false) -> TransmissionMachine {
        TransmissionMachine(negotiated: TransmissionState(export: export, structuredReplies: structured, extendedHeaders: extended),
                            limits: limits)
    }

    func read(_ cookie: UInt64, _ offset: UInt64 = 0, _ length: UInt64 = 4096) -> DecodedRequest {
        .request(Request(flags: [], command: .read, cookie: cookie, offset: offset, length: length))
    }

    func write(_ cookie: UInt64, bytes: Int) -> DecodedRequest {
        var b = ByteBuffer()
        b.writeRepeatingByte(7, count: bytes)
        return .request(Request(flags: [], command: .write, cookie: cookie, offset: 0, length: UInt64(bytes), payload: b))
    }

    let disc = DecodedRequest.request(Request(flags: [], command: .disc, cookie: 9, offset: 0, length: 0))

    func testAValidRequestRunsAndCountsInFlightUntilItCompletes() {
        var m = machine()
        guard case .execute(.read(cookie: 1, offset: 0, length: 4096, df: false), let to, let bytes) = m.receive(read(1)) else {
            return XCTFail("a valid read runs")
        }
        XCTAssertEqual(to, ReplyTo(cookie: 1, framing: nil))
        XCTAssertEqual(bytes, 4096)
        XCTAssertEqual(m.inFlight, 1)
        XCTAssertEqual(m.inFlightBytes, 4096)
        XCTAssertEqual(m.completed(bytes: bytes), .takeMore)
        XCTAssertEqual(m.inFlight, 0)
        XCTAssertEqual(m.inFlightBytes, 0)
    }

    func testAWriteCountsItsPayload() {
        var m = machine()
        guard case .execute(.write, _, let bytes) = m.receive(write(2, bytes: 5000)) else { return XCTFail("a write runs") }
        XCTAssertEqual(bytes, 5000)
        XCTAssertEqual(m.inFlightBytes, 5000)
    }

    func testTheLimitsStopIntakeAndACompletionReopensIt() {
        var m = machine()
        for c in 1...3 { _ = m.receive(read(UInt64(c))) }
        XCTAssertFalse(m.mayTake(queuedReplyBytes: 0), "three requests in flight is the limit")
        XCTAssertEqual(m.completed(bytes: 4096), .takeMore)
        XCTAssertTrue(m.mayTake(queuedReplyBytes: 0))
        XCTAssertFalse(m.mayTake(queuedReplyBytes: 4096), "replies the socket has not taken count too")
        var big = machine()
        _ = big.receive(write(1, bytes: 64 * 1024))
        XCTAssertFalse(big.mayTake(queuedReplyBytes: 0), "bytes in flight at the limit")
    }

    func testAnInvalidRequestIsRefusedAndNothingRuns() {
        var m = machine()
        guard case .refuse(.einval, let to, let message, let why) = m.receive(read(4, (1 << 20) - 1, 2)) else {
            return XCTFail("a read past the end is refused")
        }
        XCTAssertEqual(to.cookie, 4)
        XCTAssertNil(message, "simple replies carry no message")
        XCTAssertTrue(why.contains("cookie 4"), why)
        XCTAssertEqual(m.inFlight, 0)
    }

    func testARefusedReadUnderStructuredRepliesGetsAnErrorChunk() {
        var m = machine(structured: true)
        guard case .refuse(.einval, let to, let message?, _) = m.receive(read(5, (1 << 20) - 1, 2)) else {
            return XCTFail("an error chunk with a message")
        }
        XCTAssertEqual(to.framing, .structured)
        XCTAssertFalse(message.isEmpty)
    }

    func testExtendedHeadersFrameRepliesWithTheRequestOffset() {
        var m = machine(extended: true)
        var b = ByteBuffer()
        b.writeRepeatingByte(1, count: 512)
        let w = DecodedRequest.request(Request(flags: [.payloadLen], command: .write, cookie: 6, offset: 8192, length: 512, payload: b))
        guard case .execute(_, let to, _) = m.receive(w) else { return XCTFail("runs") }
        XCTAssertEqual(to.framing, .extended(requestOffset: 8192))
    }

    func testAnOversizedWriteIsEINVAL() {
        var m = machine()
        let r = Request(flags: [], command: .write, cookie: 7, offset: 0, length: UInt64(Limits.maxPayload) + 1)
        guard case .refuse(.einval, let to, nil, _) = m.receive(.oversizedWrite(r)) else { return XCTFail("EINVAL") }
        XCTAssertEqual(to.cookie, 7)
    }

    func testDisconnectWithNothingInFlightCloses() {
        var m = machine()
        guard case .close(let reason) = m.receive(disc) else { return XCTFail("closes at once") }
        XCTAssertTrue(reason.contains("NBD_CMD_DISC"))
    }

    func testDisconnectWaitsForWhatIsInFlight() {
        var m = machine()
        _ = m.receive(read(1))
        _ = m.receive(read(2))
        guard case .stopReading = m.receive(disc) else { return XCTFail("stops reading first") }
        XCTAssertFalse(m.isTaking)
        XCTAssertFalse(m.mayTake(queuedReplyBytes: 0))
        XCTAssertEqual(m.completed(bytes: 4096), .wait)
        XCTAssertEqual(m.completed(bytes: 4096), .close(reason: "client sent NBD_CMD_DISC"))
    }

    func testTheEndOfInputDrainsLikeADisconnect() {
        var m = machine()
        XCTAssertEqual(m.stopTaking(reason: "client closed the connection"), .close(reason: "client closed the connection"))
        var busy = machine()
        _ = busy.receive(read(1))
        XCTAssertEqual(busy.stopTaking(reason: "its export token was revoked"), .wait)
        XCTAssertEqual(busy.stopTaking(reason: "server shutting down"), .wait, "the first reason stands")
        XCTAssertEqual(busy.completed(bytes: 4096), .close(reason: "its export token was revoked"))
    }

    func testAClosedConnectionLetsGoOfTheExportAfterTheLastReply() {
        var m = machine()
        _ = m.receive(read(1))
        _ = m.receive(write(2, bytes: 100))
        XCTAssertEqual(m.close(), .wait, "the handle outlives its I/O")
        XCTAssertEqual(m.completed(bytes: 4096), .wait)
        XCTAssertEqual(m.completed(bytes: 100), .release)
        var idle = machine()
        XCTAssertEqual(idle.close(), .release)
    }

    /// Random requests, completions in random order and an end at a random point: the
    /// counts always equal what is outstanding, the limits hold whenever the caller asks
    /// first, and the last completion after the end closes (or releases) exactly once.
    func testRandomSequencesKeepTheCountsAndEndExactlyOnce() {
        var rng = SystemRandomNumberGenerator()
        for _ in 0..<200 {
            var m = machine(structured: Bool.random(using: &rng))
            var outstanding: [Int] = []
            var ended = false, finals = 0
            for step in 0..<60 {
                let roll = Int.random(in: 0..<10, using: &rng)
                if roll < 5, !ended, m.mayTake(queuedReplyBytes: 0) {
                    let req = Bool.random(using: &rng) ? read(UInt64(step), UInt64.random(in: 0..<(1 << 20), using: &rng) & ~4095)
                        : write(UInt64(step), bytes: Int.random(in: 1...8192, using: &rng))
                    switch m.receive(req) {
                    case .execute(_, _, let bytes): outstanding.append(bytes)
                    case .refuse: break
                    default: XCTFail("only run or refuse while open")
                    }
                    XCTAssertLessThanOrEqual(m.inFlight, limits.maxInFlightRequests)
                } else if roll < 9, !outstanding.isEmpty {
                    let b = outstanding.remove(at: Int.random(in: 0..<outstanding.count, using: &rng))
                    switch m.completed(bytes: b) {
                    case .takeMore: XCTAssertFalse(ended)
                    case .wait: XCTAssertFalse(outstanding.isEmpty)
                    case .close, .release: XCTAssertTrue(ended && outstanding.isEmpty); finals += 1
                    }
                } else if !ended {
                    ended = true
                    if m.stopTaking(reason: "end") != .wait { XCTAssertTrue(outstanding.isEmpty); finals += 1 }
                }
                XCTAssertEqual(m.inFlight, outstanding.count)
                XCTAssertEqual(m.inFlightBytes, outstanding.reduce(0, +))
            }
            if ended { XCTAssertEqual(finals, outstanding.isEmpty ? 1 : 0) }
        }
    }
}
