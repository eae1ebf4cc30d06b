// libFuzzer target: bytes as one control-socket line (JSON-RPC 2.0): decoded, its params
// read positionally or by name, checked for count, routed and dispatched against an SR in
// a temporary directory holding one VDI and one snapshot. Methods that change state run
// as VDI.get_record with the same params, so the SR stays as it was and every input meets
// the same records.
import Control
import Foundation
import Logging
import Storage

let dir = (ProcessInfo.processInfo.environment["TMPDIR"] ?? "/tmp") + "/vdinbd-fuzz-control-\(getpid())"
let api: ControlAPI = {
    try? FileManager.default.removeItem(atPath: dir)
    var quiet = Logger(label: "fuzz")
    quiet.logLevel = .critical
    let sr = try! SR(path: dir, logger: quiet)
    let v = try! sr.create(.init(nameLabel: "fuzz", virtualSize: 1 << 20))
    _ = try! sr.snapshot(v.uuid)
    atexit { try? FileManager.default.removeItem(atPath: dir) }
    return ControlAPI(sr: sr, logger: quiet)
}()
let readOnly: Set<String> = ["system.listMethods", "VDI.get_all", "VDI.get_all_records", "VDI.get_record",
                             "VDI.get_by_name_label", "VDI.get_by_uuid", "VDI.list_changed_blocks", "SR.get_all",
                             "SR.get_all_records", "SR.get_record", "SR.get_uuid", "SR.get_name_label",
                             "SR.get_supported_image_formats", "SR.get_other_config", "Task.get_all", "Task.get_record"]

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    var line = Data(bytes: data, count: size)
    // Keep the SR as it is: a method that would change it reads a record instead.
    if let o = try? JSONSerialization.jsonObject(with: line) as? [String: Any], let m = o["method"] as? String,
       !(readOnly.contains(m) || ((m.hasPrefix("VDI.get_") || m.hasPrefix("SR.get_")) && m != "VDI.get_nbd_info")) {
        var copy = o
        copy["method"] = "VDI.get_record"
        if let d = try? JSONSerialization.data(withJSONObject: copy) { line = d }
    }
    let reply = api.handle(line: line)
    _ = try? JSONEncoder().encode(reply)
    return 0
}

// SwiftPM links an executable's entry point as `<module>_main`: it hands libFuzzer our input callback.
@_silgen_name("LLVMFuzzerRunDriver")
func LLVMFuzzerRunDriver(_ argc: UnsafeMutablePointer<CInt>, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?>,
                         _ callback: @convention(c) (UnsafePointer<UInt8>?, Int) -> CInt) -> CInt

@_cdecl("fuzz_control_main")
func fuzzMain(_ argc: CInt, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?) -> CInt {
    var c = argc, v = argv
    return LLVMFuzzerRunDriver(&c, &v) { data, size in
        guard let data else { var none: UInt8 = 0; return fuzz(&none, 0) }
        return fuzz(data, size)
    }
}
