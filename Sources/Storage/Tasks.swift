// Tasks, as XenAPI's `Async.*` calls make them: a long operation runs on its own thread
// and its caller gets the task's uuid at once, then watches `Task.get_record`. Tasks live
// in memory (as xapi's do across a restart, they are not kept).

import Foundation
import Locking

public enum TaskStatus: String, Codable, Sendable {
    case pending, success, failure, cancelling, cancelled
}

public struct TaskRecord: Codable, Sendable, Equatable {
    public var uuid: String
    public var nameLabel: String
    public var status: TaskStatus
    public var progress: Double
    public var created: Date
    public var finished: Date?
    /// The operation's result, JSON-encoded (empty until it succeeds).
    public var result: String
    /// On failure: the XenAPI error code and its parameters.
    public var errorInfo: [String]
    /// What the operation tells its watchers besides progress (a transfer's `total_bytes`
    /// and `bytes_done`).
    public var otherConfig: [String: String] = [:]

    enum CodingKeys: String, CodingKey {
        case uuid, nameLabel = "name_label", status, progress, created, finished, result, errorInfo = "error_info"
        case otherConfig = "other_config"
    }
}

/// What a running operation sees of its task.
public final class TaskContext: Sendable {
    public let uuid: String
    private let table: TaskTable
    init(uuid: String, table: TaskTable) {
        self.uuid = uuid
        self.table = table
    }

    public var isCancelled: Bool { table.record(uuid)?.status == .cancelling }
    public func setProgress(_ p: Double) { table.update(uuid) { $0.progress = min(1, max(0, p)) } }
    public func setOther(_ key: String, _ value: String) { table.update(uuid) { $0.otherConfig[key] = value } }
    /// Throws `TASK_CANCELLED` once a cancel was asked for.
    public func checkCancelled() throws {
        if isCancelled { throw StorageError.taskCancelled(task: uuid) }
    }
}

public final class TaskTable: Sendable {
    private let tasks = Mutex<[String: TaskRecord]>([:])
    /// Finished tasks are forgotten after this long unless destroyed sooner.
    public let keepFinished: TimeInterval

    public init(keepFinished: TimeInterval = 3600) { self.keepFinished = keepFinished }

    /// Starts `body` on a thread of its own; returns the task's uuid at once. `body`
    /// returns the JSON-encoded result or throws (a `StorageError` becomes its error_info).
    public func run(name: String, _ body: @escaping @Sendable (TaskContext) throws -> String) -> String {
        let uuid = UUID().uuidString.lowercased()
        let now = Date()
        tasks.withLock { tasks in
            tasks = tasks.filter { $0.value.finished.map { now.timeIntervalSince($0) < keepFinished } ?? true }
            tasks[uuid] = TaskRecord(uuid: uuid, nameLabel: name, status: .pending, progress: 0, created: now,
                                     finished: nil, result: "", errorInfo: [])
        }
        let ctx = TaskContext(uuid: uuid, table: self)
        let t = Thread { [self] in
            do {
                finish(ctx, result: try body(ctx))
            } catch {
                finish(ctx, error: error)
            }
        }
        t.name = "vdinbd.task"
        t.start()
        return uuid
    }

    /// A task for an operation its caller runs itself (an HTTP transfer): pending until
    /// `finish`. With `adopting`, the pending task of that uuid a client made with
    /// `Task.create` (xapi's `task_id=`), if there is one.
    public func begin(name: String, adopting existing: String? = nil) -> TaskContext {
        let uuid: String = tasks.withLock { tasks in
            if let u = existing?.lowercased(), var r = tasks[u], r.status == .pending, r.otherConfig["owner"] == "client" {
                r.otherConfig["owner"] = "server"
                tasks[u] = r
                return u
            }
            let uuid = UUID().uuidString.lowercased()
            tasks[uuid] = TaskRecord(uuid: uuid, nameLabel: name, status: .pending, progress: 0, created: Date(),
                                     finished: nil, result: "", errorInfo: [])
            return uuid
        }
        return TaskContext(uuid: uuid, table: self)
    }

    /// `Task.create`: a pending task nothing runs until a transfer adopts it (`task_id=`).
    public func create(name: String) -> String {
        let uuid = UUID().uuidString.lowercased()
        var r = TaskRecord(uuid: uuid, nameLabel: name, status: .pending, progress: 0, created: Date(),
                           finished: nil, result: "", errorInfo: [])
        r.otherConfig["owner"] = "client"
        tasks.withLock { $0[uuid] = r }
        return uuid
    }

    public func finish(_ ctx: TaskContext, result: String) {
        update(ctx.uuid) { r in
            r.status = r.status == .cancelling ? .cancelled : .success
            if r.status == .success { r.result = result; r.progress = 1 }
            r.finished = Date()
        }
    }

    public func finish(_ ctx: TaskContext, error: Error) {
        update(ctx.uuid) { r in
            if case StorageError.taskCancelled = error {
                r.status = .cancelled
            } else {
                r.status = .failure
            }
            if let e = error as? StorageError { r.errorInfo = [e.code] + e.params } else { r.errorInfo = ["INTERNAL_ERROR", "\(error)"] }
            r.finished = Date()
        }
    }

    public func record(_ uuid: String) -> TaskRecord? {
        tasks.withLock { $0[uuid.lowercased()] }
    }

    public func all() -> [TaskRecord] {
        tasks.withLock { $0.values.sorted { $0.created < $1.created } }
    }

    func update(_ uuid: String, _ change: (inout TaskRecord) -> Void) {
        tasks.withLock { tasks in
            if var r = tasks[uuid] {
                change(&r)
                tasks[uuid] = r
            }
        }
    }

    /// Asks a pending task to stop; `HANDLE_INVALID` for an unknown one.
    public func cancel(_ uuid: String) throws {
        try tasks.withLock { tasks in
            guard var r = tasks[uuid.lowercased()] else { throw StorageError.handleInvalid(kind: "task", value: uuid) }
            guard r.status == .pending else {
                throw StorageError.operationNotAllowed(reason: "task \(r.uuid) is \(r.status.rawValue), not pending")
            }
            r.status = .cancelling
            tasks[r.uuid] = r
        }
    }

    /// Forgets a finished task; a running one is refused.
    public func destroy(_ uuid: String) throws {
        try tasks.withLock { tasks in
            guard let r = tasks[uuid.lowercased()] else { throw StorageError.handleInvalid(kind: "task", value: uuid) }
            guard r.finished != nil else {
                throw StorageError.operationNotAllowed(reason: "task \(r.uuid) is still \(r.status.rawValue)")
            }
            tasks[r.uuid] = nil
        }
    }
}
