// libFuzzer target: a qcow2 file image (header and extensions, L1, L2 and refcount
// tables, compressed clusters), put in a memory file and opened as qemu-made files are:
// read-only (reads, allocation and leaf runs, the reference check), then writable (the
// repair of a dirty image, writes that allocate, zeroing, a flush and a clean close), then
// checked again. A crash, a trap or a hang is a finding; typed errors are the expected end.
import Foundation
import Image
import QCOW2

/// One file in memory (tmpfs) for every input, opened by path as an SR's files are.
let path = "/dev/shm/fuzz-qcow2-\(getpid()).qcow2"
let memfd: CInt = {
    let fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
    precondition(fd >= 0, "open \(path)")
    atexit { unlink(path) }
    return fd
}()

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    guard ftruncate(memfd, 0) == 0, pwrite(memfd, data, size, 0) == size else { return 0 }
    let format = QCOW2Format()
    for writable in [false, true] {
        guard let image = try? format.open(path: path, writable: writable) else { continue }
        defer { image.close() }
        let vs = image.virtualSize
        var buf = [UInt8](repeating: 0, count: 70_000)
        for o in [0, vs / 2, vs &- 70_000] where o < vs {
            let n = Int(min(UInt64(buf.count), vs - o))
            buf.withUnsafeMutableBytes { _ = try? image.read(into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<n]), at: o) }
        }
        // 16 MiB spans several L2 tables at any cluster size the seeds use; a mutated
        // virtual size of terabytes would only make each run walk longer, not elsewhere.
        _ = try? image.allocationRuns(offset: 0, length: min(vs, 1 << 24))
        _ = try? image.leafDataRuns(offset: 0, length: min(vs, 1 << 24))
        if writable {
            let block = [UInt8](repeating: 7, count: 4096)
            for o in [UInt64(0), vs / 2 / 512 * 512] where o + 4096 <= vs {
                _ = try? block.withUnsafeBytes { try image.write($0, at: o + 512, beforeVisible: nil) }
            }
            if vs >= 1 << 20 { _ = try? image.writeZeroes(offset: 4096, length: 1 << 19, punch: true, fastOnly: false) }
            _ = try? image.flush()
        }
    }
    _ = format.check(path: path)
    return 0
}

// SwiftPM links an executable's entry point as `<module>_main`: it hands libFuzzer our input callback.
@_silgen_name("LLVMFuzzerRunDriver")
func LLVMFuzzerRunDriver(_ argc: UnsafeMutablePointer<CInt>, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?>,
                         _ callback: @convention(c) (UnsafePointer<UInt8>?, Int) -> CInt) -> CInt

@_cdecl("fuzz_qcow2_main")
func fuzzMain(_ argc: CInt, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?) -> CInt {
    var c = argc, v = argv
    return LLVMFuzzerRunDriver(&c, &v) { data, size in
        guard let data else { var none: UInt8 = 0; return fuzz(&none, 0) }
        return fuzz(data, size)
    }
}
