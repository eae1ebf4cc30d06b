import ArgumentParser
import Control
import Foundation

/// `key:sub=value` arguments (`other-config:gc=false`), as xe's map parameters.
func mapSettings(_ args: [String], map: String) throws -> [(key: String, value: String)] {
    try args.map { a in
        guard a.hasPrefix(map + ":"), let eq = a.firstIndex(of: "=") else {
            throw ValidationError("expected \(map):KEY=VALUE, got '\(a)'")
        }
        let k = String(a[a.index(a.startIndex, offsetBy: map.count + 1)..<eq])
        guard !k.isEmpty else { throw ValidationError("empty key in '\(a)'") }
        return (k, String(a[a.index(after: eq)...]))
    }
}

func printFields(_ v: JSONValue) {
    for (k, x) in (v.objectValue ?? [:]).sorted(by: { $0.key < $1.key }) {
        print("\(k.replacingOccurrences(of: "_", with: "-")): \(display(x))")
    }
}

struct SRScan: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "sr-scan",
        abstract: "Rescan the SR (files without records, records without files, half-finished work) and kick the collector.",
        discussion: "With --wait, returns once the collector has nothing left it can do now.")
    @OptionGroup var options: ControlOptions
    @Flag(name: .long, help: "Wait for the collector to finish.") var wait = false
    @Option(name: .long, help: "With --wait: give up after this many seconds.") var timeout: Double = 3600
    func run() throws {
        var o: [String: JSONValue] = [:]
        if wait { o = ["wait": .bool(true), "timeout": .number(timeout)] }
        let r = try rpc(options, "SR.scan", [.string(""), .object(o)])
        if options.json { try printJSON(r); return }
        printFields(r)
    }
}

struct SRList: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "sr-list", abstract: "List the SRs this server serves: uuid, name, path, image formats (the default first).")
    @OptionGroup var options: ControlOptions
    func run() throws {
        let all = try rpc(options, "SR.get_all_records", [])
        if options.json { try printJSON(all); return }
        for (u, r) in (all.objectValue ?? [:]).sorted(by: { $0.key < $1.key }) {
            let o = r.objectValue ?? [:]
            print("uuid: \(u)\nname-label: \(display(o["name_label"] ?? .null))\npath: \(display(o["path"] ?? .null))\n"
                  + "supported-image-formats: \((o["supported_image_formats"]?.arrayValue ?? []).map(display).joined(separator: ", "))\n")
        }
    }
}

struct SRParamList: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "sr-param-list", abstract: "Show an SR's record (without uuid=, the server's default SR).")
    @OptionGroup var options: ControlOptions
    @Argument(help: "[uuid=UUID]") var args: [String] = []
    func run() throws {
        let kv = try keyValues(args, allowed: ["uuid"])
        let r = try rpc(options, "SR.get_record", [.string(kv["uuid"] ?? "")])
        if options.json { try printJSON(r); return }
        var o = r.objectValue ?? [:]
        if let f = o["supported_image_formats"]?.arrayValue { o["supported_image_formats"] = .string(f.map(display).joined(separator: ", ")) }
        printFields(.object(o))
    }
}

struct SRGCStatus: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "sr-gc-status", abstract: "Show the collector's state.")
    @OptionGroup var options: ControlOptions
    func run() throws {
        let r = try rpc(options, "SR.get_gc_status", [.string("")])
        if options.json { try printJSON(r); return }
        printFields(r)
    }
}

struct SRParamSet: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "sr-param-set", abstract: "Set SR other-config keys (other-config:gc=false stops the collector).")
    @OptionGroup var options: ControlOptions
    @Argument(help: "other-config:KEY=VALUE ...") var args: [String] = []
    func run() throws {
        for (k, v) in try mapSettings(args, map: "other-config") {
            _ = try rpc(options, "SR.add_to_other_config", [.string(""), .string(k), .string(v)])
        }
    }
}

struct SRParamRemove: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "sr-param-remove", abstract: "Remove an SR other-config key.")
    @OptionGroup var options: ControlOptions
    @Argument(help: "param-name=other-config param-key=KEY") var args: [String] = []
    func run() throws {
        let kv = try keyValues(args, allowed: ["param-name", "param-key"])
        guard try require(kv, "param-name") == "other-config" else { throw ValidationError("param-name must be other-config") }
        _ = try rpc(options, "SR.remove_from_other_config", [.string(""), .string(try require(kv, "param-key"))])
    }
}

struct VDIParamSet: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "vdi-param-set",
        abstract: "Set VDI fields and other-config keys.",
        discussion: """
        Fields: name-label=, name-description=, on-boot=persist|reset, allow-caching=, sharable=, read-only=
        (true or false). other-config:KEY=VALUE sets a key (other-config:leaf-coalesce=false keeps a leaf's chain).
        """)
    @OptionGroup var options: ControlOptions
    @Argument(help: "uuid=UUID [FIELD=VALUE ...] [other-config:KEY=VALUE ...]") var args: [String] = []
    static let fields = ["name-label": "VDI.set_name_label", "name-description": "VDI.set_name_description",
                         "on-boot": "VDI.set_on_boot", "allow-caching": "VDI.set_allow_caching", "sharable": "VDI.set_sharable",
                         "read-only": "VDI.set_read_only"]
    func run() throws {
        guard let u = args.first(where: { $0.hasPrefix("uuid=") }) else { throw ValidationError("uuid= is required") }
        let uuid = String(u.dropFirst(5))
        let rest = args.filter { !$0.hasPrefix("uuid=") }
        let maps = rest.filter { $0.hasPrefix("other-config:") }
        let plain = try keyValues(rest.filter { !$0.hasPrefix("other-config:") }, allowed: Set(Self.fields.keys))
        for (k, v) in plain.sorted(by: { $0.key < $1.key }) {
            let bools: Set<String> = ["allow-caching", "sharable", "read-only"]
            if bools.contains(k), v != "true", v != "false" { throw ValidationError("\(k)=\(v): expected true or false") }
            _ = try rpc(options, Self.fields[k]!, [.string(uuid), bools.contains(k) ? .bool(v == "true") : .string(v)])
        }
        for (k, v) in try mapSettings(maps, map: "other-config") {
            _ = try rpc(options, "VDI.add_to_other_config", [.string(uuid), .string(k), .string(v)])
        }
    }
}

struct VDIParamAdd: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "vdi-param-add", abstract: "Add a tag to a VDI.")
    @OptionGroup var options: ControlOptions
    @Argument(help: "uuid=UUID param-name=tags param-key=TAG") var args: [String] = []
    func run() throws {
        let kv = try keyValues(args, allowed: ["uuid", "param-name", "param-key"])
        guard try require(kv, "param-name") == "tags" else { throw ValidationError("param-name must be tags") }
        _ = try rpc(options, "VDI.add_tags", [.string(try require(kv, "uuid")), .string(try require(kv, "param-key"))])
    }
}

struct VDIParamRemove: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "vdi-param-remove", abstract: "Remove a VDI other-config key or tag.")
    @OptionGroup var options: ControlOptions
    @Argument(help: "uuid=UUID param-name=other-config|tags param-key=KEY") var args: [String] = []
    func run() throws {
        let kv = try keyValues(args, allowed: ["uuid", "param-name", "param-key"])
        let method: String
        switch try require(kv, "param-name") {
        case "other-config": method = "VDI.remove_from_other_config"
        case "tags": method = "VDI.remove_tags"
        default: throw ValidationError("param-name must be other-config or tags")
        }
        _ = try rpc(options, method, [.string(try require(kv, "uuid")), .string(try require(kv, "param-key"))])
    }
}

struct TaskList: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "task-list", abstract: "List tasks (Async.* calls).")
    @OptionGroup var options: ControlOptions
    func run() throws {
        let all = try rpc(options, "Task.get_all_records", [])
        if options.json { try printJSON(all); return }
        for (_, t) in (all.objectValue ?? [:]).sorted(by: { display($0.value.objectValue?["created"] ?? .null) < display($1.value.objectValue?["created"] ?? .null) }) {
            let o = t.objectValue ?? [:]
            for f in ["uuid", "name_label", "status", "progress"] { print("\(f.replacingOccurrences(of: "_", with: "-")) ( RO): \(display(o[f] ?? .null))") }
            print("")
        }
    }
}

struct TaskParamList: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "task-param-list", abstract: "Show every field of a task.")
    @OptionGroup var options: ControlOptions
    @Argument(help: "uuid=UUID") var args: [String] = []
    func run() throws {
        let kv = try keyValues(args, allowed: ["uuid"])
        let r = try rpc(options, "Task.get_record", [.string(try require(kv, "uuid"))])
        if options.json { try printJSON(r); return }
        printFields(r)
    }
}

struct TaskCancel: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "task-cancel", abstract: "Ask a pending task to stop.")
    @OptionGroup var options: ControlOptions
    @Argument(help: "uuid=UUID") var args: [String] = []
    func run() throws {
        let kv = try keyValues(args, allowed: ["uuid"])
        _ = try rpc(options, "Task.cancel", [.string(try require(kv, "uuid"))])
    }
}
