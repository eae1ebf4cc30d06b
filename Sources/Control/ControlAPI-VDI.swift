// The VDI lifecycle methods (seed 001): setters, tags, lookups, `get_<field>`, forget,
// update, clone and copy; and the parameter counts every method takes.

import Foundation
import Storage

extension ControlAPI {
    static let lifecycleMethods = [
        "VDI.get_by_uuid", "VDI.set_name_label", "VDI.set_name_description", "VDI.set_on_boot", "VDI.set_allow_caching",
        "VDI.set_sharable", "VDI.set_read_only", "VDI.add_tags", "VDI.remove_tags", "VDI.forget", "VDI.update",
        "VDI.clone", "VDI.copy", "VDI.pool_migrate", "VDI.get_allowed_operations",
    ] + recordFields.map { "VDI.get_" + $0 }

    /// The record fields `VDI.get_<field>` reads.
    static let recordFields = [
        "uuid", "name_label", "name_description", "virtual_size", "physical_utilisation", "type", "read_only",
        "is_a_snapshot", "snapshot_of", "snapshot_time", "sharable", "allow_caching", "on_boot", "tags", "other_config",
        "sm_config", "cbt_enabled", "location", "SR", "missing", "managed", "currently_attached", "nbd_attachments",
        "snapshots", "parent", "storage_lock", "is_tools_iso", "current_operations", "xenstore_data",
    ]

    /// Positional parameters each method takes (after the session), as XenAPI counts them:
    /// a call with another number is `MESSAGE_PARAMETER_COUNT_MISMATCH`. Optional trailing
    /// parameters (this server's extensions, or XenAPI's own, as `snapshot`'s driver_params)
    /// widen the range.
    static let arity: [String: ClosedRange<Int>] = {
        var a: [String: ClosedRange<Int>] = [
            "VDI.create": 1...1, "VDI.get_record": 1...1, "VDI.get_all": 0...0, "VDI.get_all_records": 0...0,
            "VDI.get_by_name_label": 1...1, "VDI.snapshot": 1...2, "VDI.clone": 1...2, "VDI.copy": 2...5, "VDI.pool_migrate": 2...3,
            "VDI.destroy": 1...1, "VDI.get_nbd_info": 1...2, "VDI.revoke_nbd_info": 1...2, "VDI.enable_cbt": 1...1,
            "VDI.disable_cbt": 1...1, "VDI.list_changed_blocks": 2...2, "VDI.data_destroy": 1...1, "VDI.resize": 2...2,
            "VDI.get_by_uuid": 1...1, "VDI.set_name_label": 2...2, "VDI.set_name_description": 2...2,
            "VDI.set_on_boot": 2...2, "VDI.set_allow_caching": 2...2, "VDI.set_sharable": 2...2,
            "VDI.set_read_only": 2...2, "VDI.add_tags": 2...2, "VDI.remove_tags": 2...2, "VDI.forget": 1...1,
            "VDI.update": 1...1, "VDI.add_to_other_config": 3...3, "VDI.remove_from_other_config": 2...2,
            "VDI.get_allowed_operations": 1...1,
        ]
        for f in recordFields { a["VDI.get_" + f] = 1...1 }
        return a
    }()

    /// Refuses a positional call with the wrong number of parameters.
    func checkArity(_ method: String, _ p: Params) throws {
        guard p.named.isEmpty, let range = Self.arity[method], !range.contains(p.positional.count) else { return }
        let expected = range.lowerBound == range.upperBound ? "\(range.lowerBound)" : "\(range.lowerBound)-\(range.upperBound)"
        throw RPCError.xenAPI("MESSAGE_PARAMETER_COUNT_MISMATCH", [method, expected, "\(p.positional.count)"])
    }

    func dispatchLifecycle(_ method: String, _ p: Params, task: TaskContext?) throws -> JSONValue? {
        switch method {
        case "VDI.get_by_uuid":
            return .string(try sr.record(p.string(0, "uuid")).uuid)
        case "VDI.set_name_label":
            try sr.set(p.string(0, "uuid"), .nameLabel(try p.string(1, "value")))
        case "VDI.set_name_description":
            try sr.set(p.string(0, "uuid"), .nameDescription(try p.string(1, "value")))
        case "VDI.set_allow_caching":
            try sr.set(p.string(0, "uuid"), .allowCaching(try p.bool(1, "value")))
        case "VDI.set_sharable":
            try sr.set(p.string(0, "uuid"), .sharable(try p.bool(1, "value")))
        case "VDI.set_read_only":
            try sr.set(p.string(0, "uuid"), .readOnly(try p.bool(1, "value")))
        case "VDI.add_tags":
            try sr.set(p.string(0, "uuid"), .addTag(try p.string(1, "value")))
        case "VDI.remove_tags":
            try sr.set(p.string(0, "uuid"), .removeTag(try p.string(1, "value")))
        case "VDI.set_on_boot":
            let v = try p.string(1, "value")
            guard let mode = OnBoot(rawValue: v) else {
                throw StorageError.valueNotSupported(field: "on_boot", value: v, reason: "expected persist or reset")
            }
            try sr.setOnBoot(p.string(0, "uuid"), mode)
        case "VDI.forget":
            try sr.forget(p.string(0, "uuid"))
        case "VDI.update":
            try sr.update(p.string(0, "uuid"))
        case "VDI.get_allowed_operations":
            return .array(sr.allowedOperations(try sr.record(p.string(0, "uuid"))).map { .string($0.rawValue) })
        case "VDI.clone":
            return .string(try sr.clone(p.string(0, "uuid"), driverParams: driverParams(p.optional(1, "driver_params"))).uuid)
        case "VDI.pool_migrate":
            // (vdi, sr, options): the SR to move to (its uuid or path; empty: the VDI's
            // own), options {"dest-img-format": F}, the name xapi gives the target's image
            // format (default: the VDI's own if the SR holds it, else the SR's default).
            let vdi = try p.string(0, "vdi")
            let dest = try ref(p.optional(1, "sr")).map { try pool.sr(ref: $0) } ?? sr
            let options = p.optional(2, "options")?.objectValue ?? [:]
            let own = sr.format(of: vdi).name
            let f = options["dest-img-format"]?.stringValue
                ?? (dest.supportedImageFormats.contains { $0.name == own } ? own : dest.format.name)
            if dest !== sr { return .string(try sr.migrate(vdi, to: dest, format: f, task: task).uuid) }
            return .string(try sr.migrate(vdi, toFormat: f, task: task).uuid)
        case "VDI.copy":
            let src = try p.string(0, "vdi")
            // An absent SR (a null ref, as xe sends with into_vdi) means the source's, or
            // into_vdi's when one is given.
            let into = ref(p.optional(3, "into_vdi"))
            let dest = try ref(p.optional(1, "sr")).map { try pool.sr(ref: $0) } ?? into.map { pool.route($0) } ?? sr
            if let i = into, pool.holding(i) != nil, pool.route(i) !== dest {
                throw StorageError.operationNotAllowed(reason: "into_vdi \(i) is not in SR \(dest.uuid)")
            }
            // options {"dest-img-format": F}, as xapi names the target format of a migration.
            let options = p.optional(4, "options")?.objectValue ?? [:]
            let destFormat = options["dest-img-format"]?.stringValue
            if destFormat != nil, into != nil {
                throw StorageError.valueNotSupported(field: "dest-img-format", value: destFormat!,
                                                     reason: "a copy into an existing VDI keeps that VDI's format")
            }
            return .string(try sr.copy(src, base: ref(p.optional(2, "base_vdi")), into: into, format: destFormat,
                                       destination: dest, task: task).uuid)
        default:
            guard method.hasPrefix("VDI.get_"), Self.recordFields.contains(String(method.dropFirst("VDI.get_".count))) else {
                return nil
            }
            let field = String(method.dropFirst("VDI.get_".count))
            return try recordJSON(sr.record(p.string(0, "uuid"))).objectValue?[field] ?? .null
        }
        return .null
    }

    /// An optional reference: absent, null, "" and XenAPI's "OpaqueRef:NULL" all mean none.
    func ref(_ v: JSONValue?) -> String? {
        guard let s = v?.stringValue, !s.isEmpty, s != "OpaqueRef:NULL" else { return nil }
        return s
    }

    func driverParams(_ v: JSONValue?) -> [String: String] {
        var out: [String: String] = [:]
        for (k, x) in v?.objectValue ?? [:] { out[k] = x.stringValue ?? display(x) }
        return out
    }

    func display(_ v: JSONValue) -> String {
        switch v {
        case .bool(let b): return b ? "true" : "false"
        case .number(let n): return n == n.rounded() ? String(Int64(n)) : String(n)
        case .string(let s): return s
        default: return ""
        }
    }
}

extension ControlAPI.Params {
    /// A boolean, or the strings "true"/"false" (as xe passes them).
    func bool(_ index: Int, _ name: String) throws -> Bool {
        switch optional(index, name) {
        case .bool(let b)?: return b
        case .string("true")?: return true
        case .string("false")?: return false
        default: throw StorageError.valueNotSupported(field: name, value: "", reason: "expected true or false")
        }
    }
}
