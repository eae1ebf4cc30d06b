// The SR, collector and task methods, `VDI.add_to_other_config` and friends, and
// `Async.*`: any method run as a task.

import Foundation
import Locking
import Storage

extension ControlAPI {
    static let moreMethods = [
        "VDI.add_to_other_config", "VDI.remove_from_other_config", "VDI.get_other_config", "VDI.get_sm_config",
        "SR.scan", "SR.get_gc_status", "SR.get_other_config", "SR.add_to_other_config", "SR.remove_from_other_config",
        "SR.get_all", "SR.get_all_records", "SR.get_record", "SR.get_by_uuid", "SR.get_uuid", "SR.get_name_label",
        "SR.set_name_label", "SR.get_supported_image_formats",
        "Task.get_all", "Task.get_all_records", "Task.get_record", "Task.cancel", "Task.destroy",
    ]

    func dispatchMore(_ method: String, _ p: Params, task: TaskContext?) throws -> JSONValue {
        if method.hasPrefix("Async.") {
            let inner = String(method.dropFirst("Async.".count))
            guard Self.methods.contains(inner) || Self.moreMethods.contains(inner) || Self.lifecycleMethods.contains(inner)
                    || Self.transferMethods.contains(inner), !inner.hasPrefix("Task.") else {
                throw RPCError.methodNotFound(method)
            }
            try checkArity(inner, p)
            // The task outlives the request: it keeps copies of the passed descriptors.
            var own = p
            own.fds = p.fds.map { dup($0) }.filter { $0 >= 0 }
            let params = own
            let uuid = sr.tasks.run(name: inner) { [self] ctx in
                defer { for fd in params.fds { close(fd) } }
                let v = try dispatch(inner, params, task: ctx)
                return String(decoding: try JSONEncoder().encode(v), as: UTF8.self)
            }
            return .string(uuid)
        }
        switch method {
        case "VDI.add_to_other_config":
            try sr.updateRecord(p.string(0, "uuid")) { $0.otherConfig[try p.string(1, "key")] = try p.string(2, "value") }
            return .null
        case "VDI.remove_from_other_config":
            try sr.updateRecord(p.string(0, "uuid")) { $0.otherConfig[try p.string(1, "key")] = nil }
            return .null
        case "VDI.get_other_config":
            return try JSONValue.from(sr.record(p.string(0, "uuid")).otherConfig)
        case "VDI.get_sm_config":
            return try JSONValue.from(sr.record(p.string(0, "uuid")).smConfig)
        case "SR.scan":
            // XenAPI passes the SR first (routed to it); an "OpaqueRef:" SR ref is dropped
            // with the session, so the options may come first, and then it is the default.
            let o = p.optional(1, "options")?.objectValue ?? p.positional.first?.objectValue ?? [:]
            let report = try sr.scan()
            var out = try JSONValue.from(report).objectValue ?? [:]
            if case .bool(true)? = o["wait"] {
                var timeout: TimeInterval = 3600
                if case .number(let n)? = o["timeout"] { timeout = n }
                let deadline = Date().addingTimeInterval(timeout)
                let target = sr.collector.kickAndMark()
                while !sr.collector.waitFinished(target, timeout: 0.25) {
                    try task?.checkCancelled()
                    if Date() > deadline {
                        throw StorageError.operationNotAllowed(reason: "the collector did not finish within \(Int(timeout)) s")
                    }
                }
            }
            out["gc_status"] = try JSONValue.from(sr.collector.status)
            return .object(out)
        case "SR.get_all":
            return .array(pool.srs.map { .string($0.uuid) })
        case "SR.get_all_records":
            var out: [String: JSONValue] = [:]
            for s in pool.srs { out[s.uuid] = try JSONValue.from(s.srRecord()) }
            return .object(out)
        case "SR.get_record", "SR.get_by_uuid", "SR.get_uuid", "SR.get_name_label", "SR.get_supported_image_formats":
            let r = try sr.srRecord()
            // Routed to the SR named (its uuid or path); an empty name means the default.
            let asked = try p.string(0, method == "SR.get_by_uuid" ? "uuid" : "sr")
            guard asked == r.uuid || asked == r.path || asked.isEmpty else {
                throw RPCError.xenAPI("UUID_INVALID", ["SR", asked])
            }
            switch method {
            case "SR.get_by_uuid", "SR.get_uuid": return .string(r.uuid)
            case "SR.get_name_label": return .string(r.nameLabel)
            case "SR.get_supported_image_formats": return .array(r.supportedImageFormats.map { .string($0) })
            default: return try JSONValue.from(r)
            }
        case "SR.set_name_label":
            try sr.setNameLabel(p.string(1, "value"))
            return .null
        case "SR.get_gc_status":
            return try JSONValue.from(sr.collector.status)
        case "SR.get_other_config":
            return try JSONValue.from(sr.otherConfig())
        case "SR.add_to_other_config":
            try sr.addToOtherConfig(key: p.string(1, "key"), value: p.string(2, "value"))
            return .null
        case "SR.remove_from_other_config":
            try sr.removeFromOtherConfig(key: p.string(1, "key"))
            return .null
        case "Task.get_all":
            return .array(sr.tasks.all().map { .string($0.uuid) })
        case "Task.get_all_records":
            var out: [String: JSONValue] = [:]
            for t in sr.tasks.all() { out[t.uuid] = try taskJSON(t) }
            return .object(out)
        case "Task.get_record":
            let u = try p.string(0, "task")
            guard let t = sr.tasks.record(u) else { throw StorageError.handleInvalid(kind: "task", value: u) }
            return try taskJSON(t)
        case "Task.cancel":
            try sr.tasks.cancel(p.string(0, "task"))
            return .null
        case "Task.destroy":
            try sr.tasks.destroy(p.string(0, "task"))
            return .null
        default:
            if let v = try dispatchLifecycle(method, p, task: task) { return v }
            if let v = try dispatchTransfer(method, p, task: task) { return v }
            throw RPCError.methodNotFound(method)
        }
    }

    func taskJSON(_ t: TaskRecord) throws -> JSONValue {
        guard case .object(var o) = try JSONValue.from(t) else { return .null }
        o["created"] = .string(Self.iso8601(t.created))
        o["finished"] = .string(t.finished.map(Self.iso8601) ?? "19700101T00:00:00Z")
        return .object(o)
    }

    /// One formatter, shared under a lock: making one costs more than a task poll's
    /// other work (vdictl polls a running transfer every 50 ms).
    static let formatter = Mutex(ISO8601DateFormatter())
    static func iso8601(_ d: Date) -> String {
        formatter.withLock { $0.string(from: d) }
    }
}
