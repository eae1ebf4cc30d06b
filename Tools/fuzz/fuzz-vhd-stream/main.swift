// libFuzzer target: bytes as an import stream, pushed in pieces of a size the first byte
// picks, through the VHD decoder and xapi's chunked-framing decoder. Every data event must
// lie within the size the stream declared (when it declared one) and come after its header
// event; `finish` may refuse, never trap.
import Foundation
import Image
import VHD

func run(_ decoder: inout some StreamDecoder, _ bytes: UnsafeRawBufferPointer, piece: Int) {
    var declared: UInt64?? = .none
    let sink: (StreamEvent) throws -> Void = { e in
        switch e {
        case .header(let v, _):
            precondition(declared == nil, "two header events")
            declared = .some(v)
        case .data(let o, let b):
            guard case .some(let size) = declared else { preconditionFailure("data before the header event") }
            if let s = size { precondition(o <= s && UInt64(b.count) <= s - o, "data at \(o)+\(b.count) past the declared \(s)") }
        }
    }
    var at = 0
    do {
        while at < bytes.count {
            let n = min(piece, bytes.count - at)
            try decoder.feed(UnsafeRawBufferPointer(rebasing: bytes[at..<(at + n)]), sink)
            at += n
        }
        try decoder.finish(sink)
    } catch {}
}

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    guard size > 0 else { return 0 }
    let piece = [1, 7, 512, 4096, 65536, 1 << 20][Int(data[0]) % 6]
    let bytes = UnsafeRawBufferPointer(start: data + 1, count: size - 1)
    var v = VHDDecoder()
    run(&v, bytes, piece: piece)
    var c = XapiChunkedDecoder()
    run(&c, bytes, piece: piece)
    return 0
}

// SwiftPM links an executable's entry point as `<module>_main`: it hands libFuzzer our input callback.
@_silgen_name("LLVMFuzzerRunDriver")
func LLVMFuzzerRunDriver(_ argc: UnsafeMutablePointer<CInt>, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?>,
                         _ callback: @convention(c) (UnsafePointer<UInt8>?, Int) -> CInt) -> CInt

@_cdecl("fuzz_vhd_stream_main")
func fuzzMain(_ argc: CInt, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?) -> CInt {
    var c = argc, v = argv
    return LLVMFuzzerRunDriver(&c, &v) { data, size in
        guard let data else { var none: UInt8 = 0; return fuzz(&none, 0) }
        return fuzz(data, size)
    }
}
