// libFuzzer target: bytes as a transmission-phase stream, compact then extended headers,
// through the request decoder and the validator.
import NBD
import NIOCore

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let export = ExportDescription(name: "x", size: 1 << 30, readOnly: size % 2 == 0, canMultiConn: true)
    for extended in [false, true] {
        var d = RequestDecoder(maxPayload: 1 << 20)
        d.extended = extended
        var buf = ByteBuffer(bytes: UnsafeBufferPointer(start: data, count: size))
        let state = TransmissionState(export: export, structuredReplies: true, extendedHeaders: extended)
        while true {
            guard let r = try? d.decode(buffer: &buf) else { break }
            switch r {
            case .request(let q), .oversizedWrite(let q): _ = RequestValidator.validate(q, state)
            }
        }
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
