// libFuzzer target: bytes as a client's side of the handshake (client flags, then options)
// through the handshake state machine, with a resolver that knows one export.
import NBD
import NIOCore

struct OneExport: ExportResolver {
    func describe(exportName: String) -> Result<ExportDescription, ExportLookupFailure> {
        exportName.hasPrefix("/a")
            ? .success(ExportDescription(name: exportName, size: 1 << 20, readOnly: false, canMultiConn: true, metaContexts: ["base:allocation", "qemu:dirty-bitmap:x"]))
            : .failure(ExportLookupFailure("no", policy: exportName.hasPrefix("/p")))
    }
}

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    for policy in [TLSPolicy.off, .require] {
        var m = HandshakeStateMachine(tlsPolicy: policy)
        var buf = ByteBuffer(bytes: UnsafeBufferPointer(start: data, count: size))
        var flags = ClientFlagsDecoder()
        guard let f = try? flags.decode(buffer: &buf) else { continue }
        _ = m.receive(clientFlags: f)
        var options = OptionDecoder()
        var n = 0
        while n < 64, let o = try? options.decode(buffer: &buf) {
            let actions = m.receive(option: o, resolver: OneExport())
            if actions.contains(where: { if case .startTLS = $0 { return true }; return false }) { m.tlsEstablished() }
            n += 1
        }
    }
    return 0
}

// SwiftPM links an executable's entry point as `<module>_main`: it hands libFuzzer our input callback.
@_silgen_name("LLVMFuzzerRunDriver")
func LLVMFuzzerRunDriver(_ argc: UnsafeMutablePointer<CInt>, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?>,
                         _ callback: @convention(c) (UnsafePointer<UInt8>?, Int) -> CInt) -> CInt

@_cdecl("fuzz_nbd_handshake_main")
func fuzzMain(_ argc: CInt, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?) -> CInt {
    var c = argc, v = argv
    return LLVMFuzzerRunDriver(&c, &v) { data, size in
        // libFuzzer may pass a null pointer for the empty input.
        guard let data else { var none: UInt8 = 0; return fuzz(&none, 0) }
        return fuzz(data, size)
    }
}
