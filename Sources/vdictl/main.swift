import ArgumentParser
import Control
import Foundation
import CBT
import VHD

/// Options every control command shares.
struct ControlOptions: ParsableArguments {
    @Option(name: .long, help: "Control socket (default $VDINBD_SOCKET or ./sr/control.sock).")
    var socket: String?

    @Flag(name: .long, help: "Print JSON.")
    var json = false

    func client() throws -> ControlClient {
        let path = socket ?? ProcessInfo.processInfo.environment["VDINBD_SOCKET"] ?? "./sr/control.sock"
        do {
            return try ControlClient(path: path)
        } catch let e as RPCError {
            throw CLIError(e.message)
        }
    }
}

struct CLIError: Error, CustomStringConvertible {
    var description: String
    init(_ s: String) { description = s }
}

/// xe-style `key=value` arguments.
func keyValues(_ args: [String], allowed: Set<String>) throws -> [String: String] {
    var out: [String: String] = [:]
    for a in args {
        guard let eq = a.firstIndex(of: "=") else { throw ValidationError("expected key=value, got '\(a)'") }
        let k = String(a[..<eq]), v = String(a[a.index(after: eq)...])
        guard allowed.contains(k) else {
            throw ValidationError("unknown parameter '\(k)'; accepted: \(allowed.sorted().joined(separator: ", "))")
        }
        out[k] = v
    }
    return out
}

func require(_ kv: [String: String], _ k: String) throws -> String {
    guard let v = kv[k], !v.isEmpty else { throw ValidationError("\(k)= is required") }
    return v
}

/// Runs an RPC, turning XenAPI errors into a one-line message and exit code 1.
func rpc(_ o: ControlOptions, _ method: String, _ params: [JSONValue]) throws -> JSONValue {
    let c = try o.client()
    do {
        return try c.call(method, params)
    } catch let e as RPCError {
        throw CLIError(e.errorDescription.joined(separator: ": "))
    }
}

func printJSON(_ v: JSONValue) throws {
    let enc = JSONEncoder()
    enc.outputFormatting = [.prettyPrinted, .sortedKeys]
    print(String(decoding: try enc.encode(v), as: UTF8.self))
}

func display(_ v: JSONValue) -> String {
    switch v {
    case .null: return ""
    case .bool(let b): return b ? "true" : "false"
    case .number(let n): return n == n.rounded() ? String(Int64(n)) : String(n)
    case .string(let s): return s
    case .ascii(let b): return String(decoding: b, as: UTF8.self)
    case .array(let a): return a.map(display).joined(separator: "; ")
    case .object(let o): return o.keys.sorted().map { "\($0): \(display(o[$0]!))" }.joined(separator: "; ")
    }
}

struct VDICreate: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "vdi-create", abstract: "Create a VDI; prints its uuid.",
        discussion: """
            sm-config:image-format= chooses the VDI's image format among those its SR holds (sr-param-list \
            shows them as supported-image-formats):
              vhd   VHD chains (snapshots, clones, CBT), up to 2040 GiB; the default where the SR holds it
              raw   a sparse file: no snapshots, clones, CBT or on_boot=reset; up to 16 TiB
              qcow2 qcow2 version 3 chains (64 KiB clusters; snapshots, clones, CBT), up to 16 TiB
            Without it, the SR's default format if it holds the size, else another of its formats with \
            chains (qcow2 past 2040 GiB, as XCP-ng chooses); a size no such format holds is refused with \
            the formats that would. sr-uuid= makes it in another SR of the server (sr-list shows them; \
            by default the first --sr).
            """)
    @OptionGroup var options: ControlOptions
    @Argument(help: "name-label=NAME virtual-size=SIZE [sr-uuid=UUID] [name-description=TEXT] [sharable=true] [read-only=true] [sm-config:image-format=vhd|raw|qcow2]")
    var args: [String] = []
    func run() throws {
        let kv = try keyValues(args, allowed: ["name-label", "virtual-size", "name-description", "sharable", "read-only",
                                               "sm-config:image-format", "sr-uuid"])
        let sizeText = try require(kv, "virtual-size")
        guard let size = parseSize(sizeText), size > 0 else {
            throw ValidationError("virtual-size=\(sizeText): expected a size such as 1073741824, 64MiB or 2GiB")
        }
        var rec: [String: JSONValue] = [
            "name_label": .string(kv["name-label"] ?? ""), "virtual_size": .number(Double(size)),
            "name_description": .string(kv["name-description"] ?? ""),
        ]
        if let s = kv["sharable"] { rec["sharable"] = .bool(s == "true") }
        if let s = kv["read-only"] { rec["read_only"] = .bool(s == "true") }
        if let f = kv["sm-config:image-format"] { rec["sm_config"] = .object(["image-format": .string(f)]) }
        if let s = kv["sr-uuid"] { rec["SR"] = .string(s) }
        print(display(try rpc(options, "VDI.create", [.object(rec)])))
    }
}

let listFields = ["uuid", "name_label", "virtual_size", "physical_utilisation", "is_a_snapshot", "read_only"]

struct VDIList: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "vdi-list", abstract: "List VDIs.")
    @OptionGroup var options: ControlOptions
    func run() throws {
        let all = try rpc(options, "VDI.get_all_records", [])
        if options.json { try printJSON(all); return }
        guard let o = all.objectValue else { return }
        for (_, r) in o.sorted(by: { $0.key < $1.key }) {
            guard let rec = r.objectValue else { continue }
            for f in listFields { print("\(f.replacingOccurrences(of: "_", with: "-")) ( RO): \(display(rec[f] ?? .null))") }
            print("sr-uuid ( RO): \(display(rec["SR"] ?? .null))")
            print("")
        }
    }
}

struct VDIParamList: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "vdi-param-list", abstract: "Show every field of a VDI.")
    @OptionGroup var options: ControlOptions
    @Argument(help: "uuid=UUID") var args: [String] = []
    func run() throws {
        let kv = try keyValues(args, allowed: ["uuid"])
        let r = try rpc(options, "VDI.get_record", [.string(try require(kv, "uuid"))])
        if options.json { try printJSON(r); return }
        for (k, v) in (r.objectValue ?? [:]).sorted(by: { $0.key < $1.key }) {
            print("\(k.replacingOccurrences(of: "_", with: "-")): \(display(v))")
        }
    }
}

struct VDISnapshot: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "vdi-snapshot", abstract: "Snapshot a VDI; prints the snapshot's uuid.")
    @OptionGroup var options: ControlOptions
    @Argument(help: "uuid=UUID") var args: [String] = []
    func run() throws {
        let kv = try keyValues(args, allowed: ["uuid"])
        print(display(try rpc(options, "VDI.snapshot", [.string(try require(kv, "uuid"))])))
    }
}

struct VDIResize: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "vdi-resize",
                                                    abstract: "Grow a VDI that no client has attached (its change log grows too).")
    @OptionGroup var options: ControlOptions
    @Argument(help: "uuid=UUID disk-size=SIZE") var args: [String] = []
    func run() throws {
        let kv = try keyValues(args, allowed: ["uuid", "disk-size"])
        let sizeText = try require(kv, "disk-size")
        guard let size = parseSize(sizeText), size > 0 else {
            throw ValidationError("disk-size=\(sizeText): expected a size such as 1073741824, 64MiB or 2GiB")
        }
        _ = try rpc(options, "VDI.resize", [.string(try require(kv, "uuid")), .number(Double(size))])
    }
}

struct VDIDestroy: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "vdi-destroy", abstract: "Destroy a VDI.")
    @OptionGroup var options: ControlOptions
    @Argument(help: "uuid=UUID") var args: [String] = []
    func run() throws {
        let kv = try keyValues(args, allowed: ["uuid"])
        _ = try rpc(options, "VDI.destroy", [.string(try require(kv, "uuid"))])
    }
}

struct VDIGetNBDInfo: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "vdi-get-nbd-info",
                                                    abstract: "Mint an export token; print how to reach the VDI over NBD.")
    @OptionGroup var options: ControlOptions
    @Argument(help: "uuid=UUID [read-only=true] [lifetime=SECONDS] [mode=direct|scratch] [label=NAME]") var args: [String] = []
    func run() throws {
        let kv = try keyValues(args, allowed: ["uuid", "read-only", "lifetime", "mode", "label"])
        var opts: [String: JSONValue] = [:]
        if let m = kv["mode"] { opts["mode"] = .string(m) }
        if let l = kv["label"] { opts["label"] = .string(l) }
        if let r = kv["read-only"] { opts["read_only"] = .bool(r == "true") }
        if let l = kv["lifetime"] {
            guard let n = Double(l), n > 0 else { throw ValidationError("lifetime=\(l): expected seconds") }
            opts["lifetime"] = .number(n)
        }
        let r = try rpc(options, "VDI.get_nbd_info", [.string(try require(kv, "uuid")), .object(opts)])
        if options.json { try printJSON(r); return }
        for rec in r.arrayValue ?? [] {
            guard let o = rec.objectValue else { continue }
            for f in ["exportname", "address", "port", "subject"] { print("\(f): \(display(o[f] ?? .null))") }
            // The server's NBD URI: libnbd tools and fio take it as it is (TLS: it names the CA directory).
            print("uri: \(display(o["uri"] ?? .null))")
            // The same token downloads the VDI over HTTP (curl -o disk.vhd "<http>").
            if let h = o["http"]?.stringValue, !h.isEmpty { print("http: \(h)") }
            print("")
        }
    }
}

/// `vdi-enable-cbt`, `vdi-disable-cbt`, `vdi-data-destroy`: one uuid, no result.
struct UUIDCommand {
    static func run(_ o: ControlOptions, _ args: [String], _ method: String) throws {
        let kv = try keyValues(args, allowed: ["uuid"])
        _ = try rpc(o, method, [.string(try require(kv, "uuid"))])
    }
}

struct VDIEnableCBT: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "vdi-enable-cbt", abstract: "Enable changed block tracking.")
    @OptionGroup var options: ControlOptions
    @Argument(help: "uuid=UUID") var args: [String] = []
    func run() throws { try UUIDCommand.run(options, args, "VDI.enable_cbt") }
}

struct VDIDisableCBT: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "vdi-disable-cbt", abstract: "Disable changed block tracking.")
    @OptionGroup var options: ControlOptions
    @Argument(help: "uuid=UUID") var args: [String] = []
    func run() throws { try UUIDCommand.run(options, args, "VDI.disable_cbt") }
}

struct VDIDataDestroy: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "vdi-data-destroy",
                                                    abstract: "Free a CBT snapshot's data, keeping its change log.")
    @OptionGroup var options: ControlOptions
    @Argument(help: "uuid=UUID") var args: [String] = []
    func run() throws { try UUIDCommand.run(options, args, "VDI.data_destroy") }
}

struct VDIListChangedBlocks: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "vdi-list-changed-blocks",
                                                    abstract: "Blocks changed between two VDIs: base64 bitmap, one bit per 64 KiB, MSB first.")
    @OptionGroup var options: ControlOptions
    @Flag(help: "Print byte ranges (offset length) instead of the bitmap.") var ranges = false
    @Argument(help: "vdi-from=UUID vdi-to=UUID") var args: [String] = []
    func run() throws {
        let kv = try keyValues(args, allowed: ["vdi-from", "vdi-to"])
        let to = try require(kv, "vdi-to")
        let b64 = display(try rpc(options, "VDI.list_changed_blocks", [.string(try require(kv, "vdi-from")), .string(to)]))
        guard ranges else { print(b64); return }
        let size = try rpc(options, "VDI.get_record", [.string(to)]).objectValue?["virtual_size"]
        guard case .number(let n)? = size, let bits = Data(base64Encoded: b64) else { throw CLIError("bad reply") }
        for r in ChangedBlocks.ranges(Array(bits), size: UInt64(n)) { print("\(r.offset) \(r.length)") }
    }
}

// MARK: offline VHD tools

struct VHDCreateCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "vhd-create", abstract: "Create a dynamic VHD file.")
    @Argument var file: String
    @Argument(help: "Virtual size: bytes or 64MiB, 2GiB...") var size: String
    func run() throws {
        guard let s = parseSize(size) else { throw ValidationError("\(size) is not a size") }
        do { try VHDCreate.createDynamic(path: file, size: s) } catch { throw CLIError("\(error)") }
    }
}

struct VHDSnapshotCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "vhd-snapshot",
                                                    abstract: "Create CHILD as a differencing VHD over PARENT.")
    @Argument var child: String
    @Argument var parent: String
    func run() throws {
        do { try VHDCreate.createDifferencing(path: child, parentPath: parent) } catch { throw CLIError("\(error)") }
    }
}

struct VHDInfoCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "vhd-info", abstract: "Describe a VHD file.")
    @Argument var file: String
    @Flag var json = false
    func run() throws {
        let info: VHDInfo
        do {
            let f = try VHDFile.open(path: file, writable: false, policy: .tolerate)
            defer { f.close() }
            info = try VHDInfo(file: f)
        } catch { throw CLIError("\(error)") }
        if json {
            let enc = JSONEncoder()
            enc.outputFormatting = [.prettyPrinted, .sortedKeys]
            print(String(decoding: try enc.encode(info), as: UTF8.self))
            return
        }
        print("disk type: \(info.diskType)")
        print("virtual size: \(info.virtualSize)")
        print("block size: \(info.blockSize)")
        print("allocated blocks: \(info.allocatedBlocks) of \(info.maxTableEntries)")
        print("unique id: \(info.uniqueID)")
        if let p = info.parentUniqueID { print("parent uuid: \(p)") }
        if let p = info.parentPath ?? info.parentUnicodeName { print("parent path: \(p)") }
        print("creator: \(info.creatorApplication) (\(info.creatorHostOS))")
        for w in info.warnings { print("warning: \(w)") }
    }
}

struct VHDCheckCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "vhd-check", abstract: "Check a VHD's structure; exit 0 when clean.")
    @Argument var file: String
    func run() throws {
        let problems = VHDCheck.check(path: file)
        if problems.isEmpty {
            print("\(file): clean")
            return
        }
        for p in problems { print(p) }
        throw ExitCode(2)
    }
}

struct VHDReadCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "vhd-read",
                                                    abstract: "Read a VHD (with its parents) and write the raw disk to OUT.")
    @Argument var file: String
    @Argument var out: String
    func run() throws {
        do {
            let c = try VHDChain.open(path: file, writable: false, policy: .tolerate)
            defer { c.close() }
            FileManager.default.createFile(atPath: out, contents: nil)
            guard let h = FileHandle(forWritingAtPath: out) else { throw CLIError("cannot write \(out)") }
            defer { try? h.close() }
            var off: UInt64 = 0
            while off < c.virtualSize {
                let n = Int(min(UInt64(4 << 20), c.virtualSize - off))
                h.write(Data(try c.read(at: off, count: n)))
                off += UInt64(n)
            }
        } catch let e as CLIError { throw e } catch { throw CLIError("\(error)") }
    }
}

struct VDICtl: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "vdictl",
        abstract: "Administer a vdinbd storage repository (xe-style key=value arguments).",
        subcommands: [VDICreate.self, VDIList.self, VDIParamList.self, VDISnapshot.self, VDIResize.self, VDIDestroy.self, VDIGetNBDInfo.self,
                      VDIEnableCBT.self, VDIDisableCBT.self, VDIDataDestroy.self, VDIListChangedBlocks.self,
                      VDIParamSet.self, VDIParamAdd.self, VDIParamRemove.self, VDIClone.self, VDICopy.self, VDIPoolMigrate.self, VDIExport.self, VDIImport.self, VDIForget.self,
                      VDIUpdate.self, SRList.self, SRParamList.self, SRScan.self, SRGCStatus.self, SRParamSet.self, SRParamRemove.self,
                      TaskList.self, TaskParamList.self, TaskCancel.self,
                      VHDCreateCommand.self, VHDSnapshotCommand.self, VHDInfoCommand.self, VHDCheckCommand.self, VHDReadCommand.self])
}

// Global options may come before the subcommand (`vdictl --socket S vdi-list`): move them after it.
var argv = Array(CommandLine.arguments.dropFirst())
var leading: [String] = []
while let first = argv.first, first.hasPrefix("--"), first != "--help" {
    leading.append(argv.removeFirst())
    if (first == "--socket") && !argv.isEmpty { leading.append(argv.removeFirst()) }
}
if !argv.isEmpty { argv.insert(contentsOf: leading, at: 1) } else { argv = leading }
VDICtl.main(argv)
