// libFuzzer target: bytes as a transmission-phase stream, compact then extended headers,
// through the request decoder and the transmission machine (which validates each request,
// counts it in flight and drains on NBD_CMD_DISC); requests run complete in order, as soon
// as the machine stops taking more.
import NBD
import NIOCore

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let export = ExportDescription(name: "x", size: 1 << 30, readOnly: size % 2 == 0, canMultiConn: true)
    for extended in [false, true] {
        var d = RequestDecoder(maxPayload: 1 << 20)
        d.extended = extended
        var buf = ByteBuffer(bytes: UnsafeBufferPointer(start: data, count: size))
        let state = TransmissionState(export: export, structuredReplies: true, extendedHeaders: extended,
                                      metaContexts: [MetaContext(id: 1, name: "base:allocation")])
        var m = TransmissionMachine(negotiated: state, limits: .init(maxInFlightRequests: 4, maxInFlightBytes: 1 << 21,
                                                                     maxQueuedReplyBytes: 1 << 20))
        var running: [Int] = []
        decoding: while true {
            if !m.mayTake(queuedReplyBytes: 0) {
                guard !running.isEmpty else { break }
                switch m.completed(bytes: running.removeFirst()) {
                case .close, .release: break decoding
                case .takeMore, .wait: continue
                }
            }
            guard let r = try? d.decode(buffer: &buf) else { break }
            switch m.receive(r) {
            case .execute(_, _, let bytes): running.append(bytes)
            case .refuse, .stopReading: break
            case .close: break decoding
            }
        }
        precondition(m.inFlight == running.count && m.inFlightBytes == running.reduce(0, +))
    }
    return 0
}

// SwiftPM links an executable's entry point as `<module>_main`: it hands libFuzzer our input callback.
@_silgen_name("LLVMFuzzerRunDriver")
func LLVMFuzzerRunDriver(_ argc: UnsafeMutablePointer<CInt>, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?>,
                         _ callback: @convention(c) (UnsafePointer<UInt8>?, Int) -> CInt) -> CInt

@_cdecl("fuzz_nbd_request_main")
func fuzzMain(_ argc: CInt, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?) -> CInt {
    var c = argc, v = argv
    return LLVMFuzzerRunDriver(&c, &v) { data, size in
        // libFuzzer may pass a null pointer for the empty input.
        guard let data else { var none: UInt8 = 0; return fuzz(&none, 0) }
        return fuzz(data, size)
    }
}
