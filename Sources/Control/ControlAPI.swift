import Foundation
import Logging
import Storage

/// The method table: XenAPI-named methods over the hosted SRs. Each request runs against
/// one SR (`sr`): the one holding the VDI it names, the SR it names, or the default; the
/// listings (`VDI.get_all`, `SR.get_all`, ...) cover them all.
public final class ControlAPI: Sendable {
    let sr: SR
    let pool: Pool
    let logger: Logger

    public init(pool: Pool, logger: Logger) {
        self.sr = pool.primary
        self.pool = pool
        self.logger = logger
    }

    /// The methods of one SR.
    public convenience init(sr: SR, logger: Logger) {
        self.init(pool: try! Pool([sr]), logger: logger)
    }

    private init(sr: SR, pool: Pool, logger: Logger) {
        self.sr = sr
        self.pool = pool
        self.logger = logger
    }

    /// The SR a request runs against when it is not this one's (nil: this one's, or a
    /// listing over all).
    func routed(_ method: String, _ p: Params) throws -> SR? {
        func first(_ names: String...) -> String? {
            if let s = p.positional.first?.stringValue { return s }
            for n in names { if let s = p.named[n]?.stringValue { return s } }
            return nil
        }
        let target: SR
        switch method {
        case _ where method.hasPrefix("Async.") || method.hasPrefix("Task.") || method == "system.listMethods":
            return nil
        case "VDI.get_all", "VDI.get_all_records", "VDI.get_by_name_label", "SR.get_all", "SR.get_all_records":
            return nil
        case "VDI.create":
            let args = p.positional.first?.objectValue ?? p.named["args"]?.objectValue ?? p.named
            guard let s = ref(args["SR"]) else { return pool.primary === sr ? nil : pool.primary }
            target = try pool.sr(ref: s)
        case "VDI.list_changed_blocks":
            guard let to = (p.positional.count > 1 ? p.positional[1] : p.named["vdi_to"])?.stringValue else { return nil }
            target = pool.route(to)
        case _ where method.hasPrefix("SR."):
            guard let s = first("sr", "uuid"), !s.isEmpty else { return nil }
            guard let t = pool.sr(named: s) else { throw RPCError.xenAPI("UUID_INVALID", ["SR", s]) }
            target = t
        case _ where method.hasPrefix("VDI."):
            guard let v = first("uuid", "vdi", "self") else { return nil }
            target = pool.route(v)
        default:
            return nil
        }
        return target === sr ? nil : target
    }

    /// Handles one decoded request; never throws.
    public func handle(_ req: RPCRequest, fds: [Int32] = []) -> RPCResponse {
        guard req.jsonrpc == "2.0" else {
            return RPCResponse(result: nil, error: .invalidRequest("jsonrpc must be \"2.0\""), id: req.id)
        }
        do {
            var params = Params(req.params)
            params.fds = fds
            let result = try dispatch(req.method, params, task: nil)
            return RPCResponse(result: result, error: nil, id: req.id)
        } catch let e as RPCError {
            return RPCResponse(result: nil, error: e, id: req.id)
        } catch let e as StorageError {
            logger.info("\(req.method) failed: \(e)")
            return RPCResponse(result: nil, error: .xenAPI(e.code, e.params), id: req.id)
        } catch {
            logger.error("\(req.method) failed: \(error)")
            return RPCResponse(result: nil, error: .xenAPI("INTERNAL_ERROR", ["\(error)"]), id: req.id)
        }
    }

    /// Handles one line of input: parse errors answer with a null id.
    /// `fds`: descriptors passed with the line; they stay the caller's (closed after the
    /// answer), an `Async.` call takes copies of its own.
    public func handle(line: Data, fds: [Int32] = []) -> RPCResponse {
        let value: JSONValue
        do {
            value = try JSONDecoder().decode(JSONValue.self, from: line)
        } catch {
            return RPCResponse(result: nil, error: .parseError("not valid JSON"), id: nil)
        }
        guard case .object(let o) = value else {
            return RPCResponse(result: nil, error: .invalidRequest("a request is a JSON object"), id: nil)
        }
        guard let m = o["method"]?.stringValue else {
            return RPCResponse(result: nil, error: .invalidRequest("method must be a string"), id: o["id"])
        }
        if let p = o["params"], p.arrayValue == nil, p.objectValue == nil {
            return RPCResponse(result: nil, error: .invalidRequest("params must be an array or an object"), id: o["id"])
        }
        let req = RPCRequest(jsonrpc: o["jsonrpc"]?.stringValue ?? "", method: m, params: o["params"], id: o["id"])
        return handle(req, fds: fds)
    }

    /// Positional (XenAPI style) or named params.
    struct Params: Sendable {
        let positional: [JSONValue]
        let named: [String: JSONValue]
        /// Descriptors passed with the request (owned by the caller of `handle`).
        var fds: [Int32] = []
        init(_ v: JSONValue?) {
            switch v {
            case .array(let a)?:
                // XenAPI's JSON-RPC passes a session first; accept and skip an "OpaqueRef:..." string.
                if let first = a.first?.stringValue, first.hasPrefix("OpaqueRef:") { positional = Array(a.dropFirst()) } else {
                    positional = a
                }
                named = [:]
            case .object(let o)?: positional = []; named = o
            default: positional = []; named = [:]
            }
        }

        func string(_ index: Int, _ name: String) throws -> String {
            if let s = (index < positional.count ? positional[index] : named[name])?.stringValue { return s }
            throw RPCError.invalidParams("\(name) (parameter \(index + 1)) must be a string")
        }

        func optional(_ index: Int, _ name: String) -> JSONValue? {
            index < positional.count ? positional[index] : named[name]
        }

        func object(_ index: Int, _ name: String) throws -> [String: JSONValue] {
            if let o = (index < positional.count ? positional[index] : named[name] ?? .object(named))?.objectValue { return o }
            throw RPCError.invalidParams("\(name) (parameter \(index + 1)) must be an object")
        }
    }

    public static let methods = [
        "VDI.create", "VDI.get_record", "VDI.get_all", "VDI.get_all_records", "VDI.get_by_name_label", "VDI.snapshot",
        "VDI.destroy", "VDI.get_nbd_info", "VDI.revoke_nbd_info", "VDI.enable_cbt", "VDI.disable_cbt",
        "VDI.list_changed_blocks", "VDI.data_destroy", "VDI.resize", "system.listMethods",
    ]

    func dispatch(_ method: String, _ p: Params, task: TaskContext?) throws -> JSONValue {
        try checkArity(method, p)
        if let other = try routed(method, p) {
            return try ControlAPI(sr: other, pool: pool, logger: logger).dispatch(method, p, task: task)
        }
        switch method {
        case "system.listMethods":
            return .array((Self.methods + Self.moreMethods + Self.lifecycleMethods + Self.transferMethods).map { .string($0) })
        case "VDI.create":
            return .string(try create(p.object(0, "args")).uuid)
        case "VDI.get_record":
            return try recordJSON(sr.record(p.string(0, "uuid")))
        case "VDI.get_all":
            return .array(try pool.allRecords().map { .string($0.uuid) })
        case "VDI.get_all_records":
            var out: [String: JSONValue] = [:]
            // One pass over the records for every record's `snapshots`, not one per record
            // (a VDI migrated to another SR keeps its snapshots where they were).
            let all = try pool.srs.map { ($0, try $0.allRecords()) }
            let snapshots = Dictionary(grouping: all.flatMap(\.1).filter { $0.snapshotOf != nil }, by: { $0.snapshotOf! }).mapValues { $0.map(\.uuid) }
            for (s, records) in all {
                let api = s === sr ? self : ControlAPI(sr: s, pool: pool, logger: logger)
                for r in records { out[r.uuid] = try api.recordJSON(r, snapshots: snapshots[r.uuid] ?? []) }
            }
            return .object(out)
        case "VDI.get_by_name_label":
            let label = try p.string(0, "label")
            return .array(try pool.allRecords().filter { $0.nameLabel == label }.map { .string($0.uuid) })
        case "VDI.snapshot":
            var driver: [String: String] = [:]
            if let d = p.optional(1, "driver_params")?.objectValue {
                for (k, v) in d { driver[k] = v.stringValue ?? "" }
            }
            return .string(try sr.snapshot(p.string(0, "uuid"), driverParams: driver).uuid)
        case "VDI.destroy":
            try sr.destroy(p.string(0, "uuid"))
            return .null
        case "VDI.get_nbd_info":
            let uuid = try p.string(0, "uuid")
            var readOnly = false
            var lifetime: TimeInterval?
            var mode = AttachMode.direct
            var label: String?
            if let o = p.optional(1, "options")?.objectValue {
                if case .bool(let b)? = o["read_only"] { readOnly = b }
                if let m = o["mode"]?.stringValue {
                    guard let am = AttachMode(rawValue: m) else {
                        throw StorageError.valueNotSupported(field: "mode", value: m, reason: "expected direct or scratch")
                    }
                    mode = am
                }
                if let l = o["label"]?.stringValue, !l.isEmpty { label = l }
                if case .number(let n)? = o["lifetime"] {
                    guard n > 0 else { throw StorageError.valueNotSupported(field: "lifetime", value: "\(n)", reason: "must be positive") }
                    lifetime = n
                }
            }
            return try JSONValue.from(sr.getNBDInfo(uuid, readOnly: readOnly, lifetime: lifetime, mode: mode, label: label))
        case "VDI.enable_cbt":
            try sr.enableCBT(p.string(0, "uuid"))
            return .null
        case "VDI.disable_cbt":
            try sr.disableCBT(p.string(0, "uuid"))
            return .null
        case "VDI.data_destroy":
            try sr.dataDestroy(p.string(0, "uuid"))
            return .null
        case "VDI.list_changed_blocks":
            let from = try SR.validUUID(p.string(0, "vdi_from")), to = try SR.validUUID(p.string(1, "vdi_to"))
            return .ascii(try sr.listChangedBlocks(from: from, to: to))
        case "VDI.resize":
            let uuid = try p.string(0, "uuid")
            _ = try sr.resize(uuid, size: try sizeParam(p.optional(1, "size"), field: "size"))
            return .null
        case "VDI.revoke_nbd_info":
            return .number(Double(try sr.revokeTokens(vdi: p.string(0, "uuid"), exportName: p.optional(1, "exportname")?.stringValue)))
        default:
            return try dispatchMore(method, p, task: task)
        }
    }

    /// A size given as a number of bytes or a string ("1073741824", "64MiB").
    func sizeParam(_ v: JSONValue?, field: String) throws -> UInt64 {
        switch v {
        case .number(let n)?:
            guard n >= 1, n == n.rounded(), n < 1.8e19 else {
                throw StorageError.valueNotSupported(field: field, value: "\(n)", reason: "must be a positive integer")
            }
            return UInt64(n)
        case .string(let s)?:
            guard let v = parseSize(s) else {
                throw StorageError.valueNotSupported(field: field, value: s, reason: "not a size")
            }
            return v
        default:
            throw RPCError.invalidParams("\(field) is required")
        }
    }

    func create(_ o: [String: JSONValue]) throws -> VDIRecord {
        let size = try sizeParam(o["virtual_size"], field: "virtual_size")
        var cp = SR.CreateParams(nameLabel: o["name_label"]?.stringValue ?? "", virtualSize: size)
        cp.nameDescription = o["name_description"]?.stringValue ?? ""
        if case .bool(let b)? = o["sharable"] { cp.sharable = b }
        if case .bool(let b)? = o["read_only"] { cp.readOnly = b }
        if let oc = o["other_config"]?.objectValue { cp.otherConfig = oc.compactMapValues(\.stringValue) }
        if let sc = o["sm_config"]?.objectValue { cp.smConfig = sc.compactMapValues(\.stringValue) }
        if let t = o["tags"]?.arrayValue { cp.tags = t.compactMap(\.stringValue) }
        return try sr.create(cp)
    }

    /// `snapshots`: the uuids of the VDI's snapshots when the caller has them (nil: read them).
    func recordJSON(_ r: VDIRecord, snapshots: [String]? = nil) throws -> JSONValue {
        guard case .object(var o) = try JSONValue.from(r) else { return .null }
        o["managed"] = nil
        o["created"] = nil
        o["snapshot_time"] = .string(r.snapshotTime.map(Self.iso8601) ?? "19700101T00:00:00Z")
        o["snapshot_of"] = .string(r.snapshotOf ?? "")
        o["parent"] = .string(r.parent ?? "")
        o["SR"] = .string(sr.uuid)
        o["family"] = nil
        o["location"] = .string(r.uuid)
        o["missing"] = .bool(r.type != .cbtMetadata && !FileManager.default.fileExists(atPath: sr.imagePath(r.uuid)))
        o["managed"] = .bool(true)
        let attachments = sr.attachments(of: r.uuid)
        o["currently_attached"] = .bool(!attachments.isEmpty)
        o["nbd_attachments"] = .array(attachments.map { a in
            .object(["token": .string(a.token), "read_only": .bool(a.readOnly), "mode": .string(a.mode.rawValue),
                     "connections": .number(Double(a.connections)), "since": .string(Self.iso8601(a.since))])
        })
        o["allowed_operations"] = .array(sr.allowedOperations(r).map { .string($0.rawValue) })
        o["current_operations"] = .object([:])
        let snaps = snapshots ?? ((try? pool.allRecords()) ?? []).filter { $0.snapshotOf == r.uuid }.map(\.uuid)
        o["snapshots"] = .array(snaps.map { .string($0) })
        o["storage_lock"] = .bool(false)
        o["is_tools_iso"] = .bool(false)
        o["xenstore_data"] = .object([:])
        return .object(o)
    }
}
