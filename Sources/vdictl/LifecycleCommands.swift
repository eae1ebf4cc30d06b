import ArgumentParser
import Control
import Foundation

struct VDIClone: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "vdi-clone",
                                                    abstract: "Clone a VDI (a writable VDI sharing its chain); prints the clone's uuid.")
    @OptionGroup var options: ControlOptions
    @Argument(help: "uuid=UUID [driver-params:KEY=VALUE ...]") var args: [String] = []
    func run() throws {
        let kv = try keyValues(args.filter { !$0.hasPrefix("driver-params:") }, allowed: ["uuid"])
        var dp: [String: JSONValue] = [:]
        for (k, v) in try mapSettings(args.filter { $0.hasPrefix("driver-params:") }, map: "driver-params") { dp[k] = .string(v) }
        print(display(try rpc(options, "VDI.clone", [.string(try require(kv, "uuid")), .object(dp)])))
    }
}

struct VDICopy: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "vdi-copy",
        abstract: "Copy a VDI into a fresh VDI, or into an existing one; prints the uuid written.",
        discussion: "With base-vdi=, only the blocks that differ from it. sr-uuid= makes the new VDI in another SR of the server (sr-list shows them; by default the source's). image-format= (vhd, qcow2, raw; one the target SR holds) makes it in that format rather than the source's (xapi's dest-img-format). Runs as a task; Ctrl-C cancels it.")
    @OptionGroup var options: ControlOptions
    @OptionGroup var bar: ProgressOptions
    @Argument(help: "uuid=UUID [base-vdi=UUID] [into-vdi=UUID | [sr-uuid=UUID] [image-format=vhd|qcow2|raw]]") var args: [String] = []
    func run() throws {
        let kv = try keyValues(args, allowed: ["uuid", "base-vdi", "into-vdi", "image-format", "sr-uuid"])
        let ref: (String) -> JSONValue = { kv[$0].map { .string($0) } ?? .string("") }
        var params: [JSONValue] = [.string(try require(kv, "uuid")), ref("sr-uuid"), ref("base-vdi"), ref("into-vdi")]
        if let f = kv["image-format"] { params.append(.object(["dest-img-format": .string(f)])) }
        let task = display(try rpc(options, "Async.VDI.copy", params))
        let result = try waitForTask(options, task, label: "copy", show: bar.show)
        print(result)
    }
}

struct VDIPoolMigrate: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "vdi-pool-migrate",
        abstract: "Move a VDI to another SR or image format while it stays attached; prints its uuid (unchanged).",
        discussion: """
            sr-uuid= names the SR to move to (sr-list shows them; by default the VDI's own). \
            image-format= (vhd, qcow2, raw; one that SR holds) is xapi's dest-img-format; by default \
            the VDI's format if the SR holds it, else the SR's default. The VDI's current state is \
            copied into one file of that format, writes made meanwhile are copied again, then the \
            file takes its place: connections, tokens and change block tracking carry on. Snapshots \
            stay in their SR and format, and list-changed-blocks still compares them with later \
            ones. Runs as a task; Ctrl-C cancels it before the switch.
            """)
    @OptionGroup var options: ControlOptions
    @OptionGroup var bar: ProgressOptions
    @Argument(help: "uuid=UUID [sr-uuid=UUID] [image-format=vhd|qcow2|raw] (at least one of the two)") var args: [String] = []
    func run() throws {
        let kv = try keyValues(args, allowed: ["uuid", "image-format", "sr-uuid"])
        guard kv["sr-uuid"] != nil || kv["image-format"] != nil else {
            throw ValidationError("give sr-uuid= (the SR to move to), image-format= (vhd, qcow2 or raw), or both")
        }
        let options2: JSONValue = .object(kv["image-format"].map { ["dest-img-format": .string($0)] } ?? [:])
        let task = display(try rpc(options, "Async.VDI.pool_migrate",
                                   [.string(try require(kv, "uuid")), .string(kv["sr-uuid"] ?? ""), options2]))
        print(try waitForTask(options, task, label: "migrate", show: bar.show))
    }
}

/// `--progress` / `--quiet` of the commands that run a task.
struct ProgressOptions: ParsableArguments {
    @Flag(name: .long, help: "Show progress (the default when stderr is a terminal).") var progress = false
    @Flag(name: .long, help: "No progress.") var quiet = false
    var show: Bool { (progress || isatty(2) != 0) && !quiet }
}

/// Polls a task until it ends, showing progress; on SIGINT, cancels it. Returns its result.
func waitForTask(_ o: ControlOptions, _ task: String, label: String, show: Bool) throws -> String {
    signal(SIGINT, SIG_IGN)
    let sig = DispatchSource.makeSignalSource(signal: SIGINT, queue: .global())
    let cancelled = NSLock()
    var askedToCancel = false
    sig.setEventHandler {
        cancelled.lock(); askedToCancel = true; cancelled.unlock()
        _ = try? rpc(o, "Task.cancel", [.string(task)])
    }
    sig.resume()
    defer { sig.cancel(); signal(SIGINT, SIG_DFL) }
    let started = Date()
    while true {
        let rec = try rpc(o, "Task.get_record", [.string(task)]).objectValue ?? [:]
        let status = rec["status"]?.stringValue ?? ""
        if show, case .number(let p)? = rec["progress"] {
            let line = progressLine(label: label, progress: p, other: rec["other_config"]?.objectValue ?? [:],
                                    elapsed: Date().timeIntervalSince(started))
            FileHandle.standardError.write(Data(("\r" + line + "   ").utf8))
        }
        switch status {
        case "pending", "cancelling":
            // Often at first (most tasks are short), then five times a second.
            Thread.sleep(forTimeInterval: Date().timeIntervalSince(started) < 2 ? 0.05 : 0.2)
        case "success":
            if show { FileHandle.standardError.write(Data("\n".utf8)) }
            _ = try? rpc(o, "Task.destroy", [.string(task)])
            let r = rec["result"]?.stringValue ?? ""
            // The result is JSON-encoded (a uuid arrives quoted).
            if let d = r.data(using: .utf8), let v = try? JSONDecoder().decode(JSONValue.self, from: d) { return display(v) }
            return r
        default:
            if show { FileHandle.standardError.write(Data("\n".utf8)) }
            let info = rec["error_info"]?.arrayValue?.compactMap(\.stringValue) ?? [status]
            _ = try? rpc(o, "Task.destroy", [.string(task)])
            cancelled.lock(); let c = askedToCancel; cancelled.unlock()
            throw CLIError(info.joined(separator: ": ") + (c ? " (cancelled)" : ""))
        }
    }
}

struct VDIForget: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "vdi-forget",
                                                    abstract: "Drop a VDI's record, keeping its file (sr-scan brings it back).")
    @OptionGroup var options: ControlOptions
    @Argument(help: "uuid=UUID") var args: [String] = []
    func run() throws { try UUIDCommand.run(options, args, "VDI.forget") }
}

struct VDIUpdate: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "vdi-update", abstract: "Refresh a VDI's record from its file.")
    @OptionGroup var options: ControlOptions
    @Argument(help: "uuid=UUID") var args: [String] = []
    func run() throws { try UUIDCommand.run(options, args, "VDI.update") }
}
