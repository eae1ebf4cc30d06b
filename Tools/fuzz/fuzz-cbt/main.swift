// libFuzzer target: bytes as a change log file: opened, its bits and parent read, ORed into
// an accumulator, and turned into list_changed_blocks output and ranges.
import CBT
import Foundation

/// In memory (tmpfs): a file written and removed per input on a disk file system costs
/// a journal commit, most of each run.
let path = "/dev/shm/vdinbd-fuzz-\(getpid()).cbtlog"

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    guard FileManager.default.createFile(atPath: path, contents: Data(bytes: data, count: size)) else { return 0 }
    defer { unlink(path) }
    _ = try? ChangeLog.parent(path: path)
    if let log = try? ChangeLog.open(path: path) {
        let bits = log.bits
        var acc = [UInt8](repeating: 0, count: bits.count)
        _ = try? ChangeLog.accumulate(path: path, into: &acc)
        let msb = ChangedBlocks.union([bits], size: log.size)
        _ = ChangedBlocks.ranges(msb, size: log.size)
        _ = ChangedBlocks.base64Bytes(bits, size: log.size)
        _ = log.markDirty(offset: UInt64(size) * 65536 % max(log.size, 1), length: 1)
    }
    return 0
}

// SwiftPM links an executable's entry point as `<module>_main`: it hands libFuzzer our input callback.
@_silgen_name("LLVMFuzzerRunDriver")
func LLVMFuzzerRunDriver(_ argc: UnsafeMutablePointer<CInt>, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?>,
                         _ callback: @convention(c) (UnsafePointer<UInt8>?, Int) -> CInt) -> CInt

@_cdecl("fuzz_cbt_main")
func fuzzMain(_ argc: CInt, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?) -> CInt {
    var c = argc, v = argv
    return LLVMFuzzerRunDriver(&c, &v) { data, size in
        // libFuzzer may pass a null pointer for the empty input.
        guard let data else { var none: UInt8 = 0; return fuzz(&none, 0) }
        return fuzz(data, size)
    }
}
