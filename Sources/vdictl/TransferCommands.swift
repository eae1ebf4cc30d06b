import ArgumentParser
import Control
import Foundation

/// `vdi-export` / `vdi-import` (as `xe` in seed 000): the file (or stdout/stdin for `-`)
/// is opened here and its descriptor passed to the server, which streams it directly.
struct VDIExport: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "vdi-export",
        abstract: "Export a VDI to a file (or stdout with filename=-) as raw or VHD.",
        discussion: """
            format=vhd writes a sparse dynamic VHD (blocks no layer holds are not in it); with base=, a \
            differencing VHD holding only the blocks that differ from that VDI. format=raw (the default) \
            leaves holes in a regular file where the disk holds nothing. Runs as a task; Ctrl-C cancels it.
            """)
    @OptionGroup var options: ControlOptions
    @OptionGroup var bar: ProgressOptions
    @Argument(help: "uuid=UUID filename=FILE|- [format=raw|vhd] [base=UUID]") var args: [String] = []
    func run() throws {
        let kv = try keyValues(args, allowed: ["uuid", "filename", "format", "base"])
        let name = try require(kv, "filename")
        let fd: Int32 = name == "-" ? 1 : open(name, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw CLIError("cannot create \(name): \(String(cString: strerror(errno)))") }
        do {
            try runTransfer(options, "Async.VDI.export", [.string(try require(kv, "uuid")), .string(kv["format"] ?? "raw"),
                                                          .string(kv["base"] ?? "")], fd: fd, label: "export", show: bar.show)
        } catch {
            if name != "-" { unlink(name) }
            throw error
        }
    }
}

struct VDIImport: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "vdi-import",
        abstract: "Import a raw or VHD file (or stdin with filename=-) into a VDI.",
        discussion: """
            A differencing VHD applies only its blocks onto the VDI; a dynamic or fixed VHD, or raw data, \
            replaces its contents. Nothing changes unless the whole stream arrives and is valid. Runs as a \
            task; Ctrl-C cancels it.
            """)
    @OptionGroup var options: ControlOptions
    @OptionGroup var bar: ProgressOptions
    @Argument(help: "uuid=UUID filename=FILE|- [format=raw|vhd]") var args: [String] = []
    func run() throws {
        let kv = try keyValues(args, allowed: ["uuid", "filename", "format"])
        let name = try require(kv, "filename")
        let fd: Int32 = name == "-" ? 0 : open(name, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw CLIError("cannot open \(name): \(String(cString: strerror(errno)))") }
        try runTransfer(options, "Async.VDI.import", [.string(try require(kv, "uuid")), .string(kv["format"] ?? "raw")],
                        fd: fd, label: "import", show: bar.show)
    }
}

/// Starts a transfer task, passing `fd` with the call, and follows it to its end.
func runTransfer(_ options: ControlOptions, _ method: String, _ params: [JSONValue], fd: Int32, label: String, show: Bool) throws {
    let task: String
    do {
        task = display(try options.client().call(method, params, passing: fd))
    } catch let e as RPCError {
        throw CLIError(e.errorDescription.joined(separator: ": "))
    }
    _ = try waitForTask(options, task, label: label, show: show)
}

/// One line of progress: percent, bytes, rate and ETA when the task reports bytes.
func progressLine(label: String, progress p: Double, other: [String: JSONValue], elapsed: TimeInterval) -> String {
    func size(_ b: Double) -> String {
        let units = ["B", "KiB", "MiB", "GiB", "TiB"]
        var v = b, i = 0
        while v >= 1024 && i < units.count - 1 { v /= 1024; i += 1 }
        return String(format: i == 0 ? "%.0f %@" : "%.1f %@", v, units[i])
    }
    var s = String(format: "%@: %5.1f%%", label, p * 100)
    if let done = other["bytes_done"]?.stringValue.flatMap(Double.init) {
        let total = other["total_bytes"]?.stringValue.flatMap(Double.init)
        s += "  " + size(done) + (total.map { " / " + size($0) } ?? "")
        if elapsed > 0.5 { s += "  " + size(done / elapsed) + "/s" }
        if let total, done > 0, total > done, elapsed > 0.5 { s += String(format: "  ETA %.0f s", (total - done) / (done / elapsed)) }
    } else if p > 0.01 {
        s += String(format: "  ETA %.0f s", elapsed / p - elapsed)
    }
    return s
}
