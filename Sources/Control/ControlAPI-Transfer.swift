// `VDI.export` and `VDI.import` (what `vdictl vdi-export` / `vdi-import` call): the stream
// goes over a file descriptor passed with the request (SCM_RIGHTS on the control socket),
// so a file, a pipe or a terminal is read or written by the server directly, and the
// socket carries only the request and its answer. `Task.create` makes a task a transfer
// may adopt (xapi's `task_id=`).

import Foundation
import Storage

extension ControlAPI {
    static let transferMethods = ["VDI.export", "VDI.import", "Task.create"]

    func dispatchTransfer(_ method: String, _ p: Params, task: TaskContext?) throws -> JSONValue? {
        switch method {
        case "VDI.export":
            let uuid = try p.string(0, "uuid")
            let format = p.optional(1, "format")?.stringValue ?? "raw"
            let base = p.optional(2, "base")?.stringValue.flatMap { $0.isEmpty ? nil : $0 }
            let fd = try passedFD(method)
            let stream = try sr.openExport(uuid, format: format, base: base)
            defer { stream.close() }
            return .number(Double(try sr.export(stream, to: fd, task: task)))
        case "VDI.import":
            let uuid = try p.string(0, "uuid")
            let format = p.optional(1, "format")?.stringValue ?? "raw"
            try sr.importStream(uuid, format: format, from: try passedFD(method), task: task)
            return .null
        case "Task.create":
            return .string(sr.tasks.create(name: p.optional(0, "label")?.stringValue ?? "task"))
        default:
            return nil
        }

        func passedFD(_ m: String) throws -> Int32 {
            guard let fd = p.fds.first else {
                throw RPCError.invalidParams("\(m) streams through a file descriptor passed with the request (SCM_RIGHTS), as vdictl does; over HTTP use /export_raw_vdi and /import_raw_vdi")
            }
            return fd
        }
    }
}
