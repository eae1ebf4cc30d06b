// libFuzzer target: a VHD file image in memory, opened as a layer (footer, header, BAT,
// parent locators), then walked: block states, reads through it, the parent's paths.
import Foundation
import VHD

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let bytes = Array(UnsafeBufferPointer(start: data, count: size))
    for writable in [false, true] {
        guard let f = try? VHDFile(file: MemoryFile(path: "fuzz.vhd", bytes: bytes), writable: writable, policy: .tolerate) else { continue }
        _ = f.parentLocatorPaths()
        _ = f.allocatedBlockCount
        for b in 0..<min(64, f.blockAllocationTable.entries.count) { _ = try? f.blockState(b) }
        if let chain = try? VHDChain(layers: [f]) {
            var buf = [UInt8](repeating: 0, count: 8192)
            for o in [0, chain.virtualSize / 2, chain.virtualSize &- 8192] where o < chain.virtualSize {
                buf.withUnsafeMutableBytes { _ = try? chain.read(into: $0, at: o) }
            }
            if writable {
                _ = try? [UInt8](repeating: 7, count: 4096).withUnsafeBytes { try chain.write($0, at: 0) }
            }
        }
    }
    return 0
}

// SwiftPM links an executable's entry point as `<module>_main`: it hands libFuzzer our input callback.
@_silgen_name("LLVMFuzzerRunDriver")
func LLVMFuzzerRunDriver(_ argc: UnsafeMutablePointer<CInt>, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?>,
                         _ callback: @convention(c) (UnsafePointer<UInt8>?, Int) -> CInt) -> CInt

@_cdecl("fuzz_vhd_main")
func fuzzMain(_ argc: CInt, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?) -> CInt {
    var c = argc, v = argv
    return LLVMFuzzerRunDriver(&c, &v) { data, size in
        // libFuzzer may pass a null pointer for the empty input.
        guard let data else { var none: UInt8 = 0; return fuzz(&none, 0) }
        return fuzz(data, size)
    }
}
