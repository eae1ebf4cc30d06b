// Design notes: the collector (garbage collection and coalesce).
//
// One background thread per SR keeps chains short, as XenServer's SM GC does:
//   - a hidden base no record and no child needs is deleted;
//   - a hidden layer whose hidden parent has no other child is merged into that parent,
//     and its children are relinked to it (non-leaf coalesce);
//   - a leaf whose hidden parent has no other child is merged into the parent, which then
//     takes the leaf's name (leaf coalesce).
// So a VDI with no snapshots kept reads from one file, and with k kept snapshots from at
// most k+1.
//
// Online: the bytes copied into the parent are bytes the child already holds, so no
// reader of any chain sees a change while the copy runs (a read stops at the child).
// Writes that land in a leaf while it is copied are tracked (`ChangeTracker`, attached to
// every handle of that VDI); the switch holds the VDI's I/O off, copies what they
// touched again, renames, and reopens the chain: a short pause, not a stop.
//
// Crash-safe: each merge is journalled (see Journal). The copy phase needs no undo; the
// switch is redone at start-up. Before the switch, the structure is checked again under
// the family lock: if a snapshot or destroy changed it meanwhile, the merge is dropped
// (the parent's extra bytes stay hidden under its only child) and planned afresh.
//
// Throttled: between chunks, if other VDIs did I/O since the last chunk, the copy sleeps
// three times as long as the chunk took (a quarter of the speed under load, full speed
// when idle), at a lower CPU priority.

import Foundation
import GRDB
import Image
import Locking

public final class Collector: @unchecked Sendable {
    // Unchecked: its state is touched with `cond` locked (a condition variable, which
    // `Mutex` has not); the settings and `stepHook` are set before the collector starts.
    unowned let sr: SR
    private let cond = NSCondition()
    private var started = false
    private var scheduled = false
    private var running = false
    /// Counts kicks; a pass that started after a kick has seen its work.
    private var generation = 0
    private var finishedGeneration = 0
    private var lastRun: Date?
    private var lastError: String?
    private var pending: [String] = []
    /// Work that failed for want of space or an error, not retried before this time.
    private var retryAfter: [String: Date] = [:]
    /// Where merges copy in chunks of this many bytes.
    static let chunk = 1 << 20
    /// How long a failed item waits before it is tried again.
    public var retryInterval: TimeInterval = 30
    /// Sleep between chunks while other VDIs are busy (off for benchmarks of raw speed).
    public var throttle = true
    /// Fault injection (tests): called on the collector's thread at each step, with a
    /// label (`copy` after each chunk, `switch` once a merge's switch is journalled,
    /// `delete`).
    var stepHook: ((String) -> Void)?
    public func setStepHook(_ hook: @escaping (String) -> Void) { stepHook = hook }

    init(sr: SR) { self.sr = sr }

    public struct Status: Codable, Sendable, Equatable {
        public var running: Bool
        /// VDIs (or hidden bases) with work left.
        public var pending: [String]
        public var lastRun: Date?
        public var lastError: String?
        public var enabled: Bool
        enum CodingKeys: String, CodingKey {
            case running, pending, lastRun = "last_run", lastError = "last_error", enabled
        }
    }

    public var status: Status {
        cond.lock(); defer { cond.unlock() }
        let enabled = (try? sr.otherConfig()["gc"]) != "false"
        return Status(running: running, pending: pending, lastRun: lastRun, lastError: lastError, enabled: enabled)
    }

    func start() {
        cond.lock()
        started = true
        cond.unlock()
        kick()
        // A periodic look too: retries after a failure, work a crash left.
        let t = Thread { [weak self] in
            while let s = self {
                Thread.sleep(forTimeInterval: 30)
                s.kick()
            }
        }
        t.name = "vdinbd.gc.timer"
        t.start()
    }

    /// Forgets the back-off of failed work, so the next pass tries it again (an
    /// administrator's `SR.scan` means "now").
    public func retryNow() {
        cond.lock()
        retryAfter = [:]
        cond.unlock()
    }

    /// Makes the calling thread background work: nice 10 (Linux applies it to the calling
    /// thread). Not SCHED_IDLE: under a load that keeps both cores busy the collector then
    /// never ran (merges starved for as long as clients wrote), and a switch that holds a
    /// VDI's gate must not wait for idle time either.
    static func yieldToForeground() {
        setpriority(__priority_which_t(PRIO_PROCESS.rawValue), 0, 10)
    }

    /// Asks for a pass soon (after a destroy, data_destroy, snapshot, scan).
    public func kick() {
        cond.lock()
        generation += 1
        let go = started && !scheduled
        if go { scheduled = true }
        cond.unlock()
        if go {
            let t = Thread { [self] in
                Collector.yieldToForeground()
                runPasses()
            }
            t.name = "vdinbd.gc"
            t.start()
        }
    }

    /// Kicks, then waits until a pass that began after the kick has found nothing left to
    /// do (or `timeout` passes). True when idle.
    public func waitIdle(timeout: TimeInterval) -> Bool {
        waitFinished(kickAndMark(), timeout: timeout)
    }

    /// Kicks and returns the mark `waitFinished` waits for.
    public func kickAndMark() -> Int {
        kick()
        cond.lock(); defer { cond.unlock() }
        return generation
    }

    /// Waits until a pass that began at or after `mark` has finished. True if one has.
    public func waitFinished(_ mark: Int, timeout: TimeInterval) -> Bool {
        cond.lock(); defer { cond.unlock() }
        let deadline = Date().addingTimeInterval(timeout)
        while finishedGeneration < mark {
            if !cond.wait(until: deadline) { return finishedGeneration >= mark }
        }
        return true
    }

    private func runPasses() {
        while true {
            cond.lock()
            let gen = generation
            running = true
            cond.unlock()
            let left = pass()
            cond.lock()
            running = false
            lastRun = Date()
            pending = left
            StorageMetrics.gcPending.record(left.count)
            finishedGeneration = max(finishedGeneration, gen)
            cond.broadcast()
            if generation == gen {
                scheduled = false
                cond.unlock()
                return
            }
            cond.unlock()
        }
    }

    // MARK: planning

    enum Work: Equatable {
        case delete(base: String)
        case coalesce(child: String, into: String)
        case leafCoalesce(leaf: String, into: String)

        var subject: String {
            switch self {
            case .delete(let b): return b
            case .coalesce(let c, _), .leafCoalesce(let c, _): return c
            }
        }
    }

    /// What there is to do, from the records (files with records; hidden bases included).
    func plan() throws -> [Work] {
        // A family with an overlay attachment open keeps its files where the overlay reads them.
        // So does a family with a forgotten VDI's file, which reads through its bases.
        let held = sr.familiesWithOverlays().union(sr.familiesWithForgottenFiles()).union(sr.familyWork.withLock { $0.held })
        let all = try sr.dbRead { try VDIRecord.fetchAll($0) }.filter { $0.type != .cbtMetadata && !held.contains($0.family) }
        let byUUID = Dictionary(all.map { ($0.uuid, $0) }, uniquingKeysWith: { a, _ in a })
        var children: [String: [VDIRecord]] = [:]
        for r in all { if let p = r.parent { children[p, default: []].append(r) } }
        var work: [Work] = []
        for r in all where !r.managed && (children[r.uuid] ?? []).isEmpty { work.append(.delete(base: r.uuid)) }
        for x in all where !x.managed {
            guard let p = x.parent, let pr = byUUID[p], !pr.managed, children[p]?.count == 1, !(children[x.uuid] ?? []).isEmpty else { continue }
            work.append(.coalesce(child: x.uuid, into: p))
        }
        for c in all where c.managed && (children[c.uuid] ?? []).isEmpty {
            guard let p = c.parent, let pr = byUUID[p], !pr.managed, children[p]?.count == 1 else { continue }
            if c.otherConfig["leaf-coalesce"] == "false" { continue }
            work.append(.leafCoalesce(leaf: c.uuid, into: p))
        }
        return work
    }

    /// Runs work until none is left that can be done now; returns what is left.
    func pass() -> [String] {
        var failed = Set<String>()
        while true {
            let work: [Work]
            do { work = try plan() } catch {
                record(error: "planning: \(error)")
                return []
            }
            if (try? sr.otherConfig()["gc"]) == "false" { return work.map(\.subject) }
            let now = Date()
            cond.lock()
            retryAfter = retryAfter.filter { $0.value > now }
            let blocked = Set(retryAfter.keys)
            cond.unlock()
            guard let item = work.first(where: { !failed.contains($0.subject) && !blocked.contains($0.subject) }) else {
                return work.map(\.subject)
            }
            do {
                try perform(item)
            } catch let e as Gave {
                sr.logger.info("collector: \(item) given up for now: \(e.reason)")
                failed.insert(item.subject)
            } catch {
                record(error: "\(item): \(error)")
                sr.logger.error("collector: \(item) failed: \(error)")
                failed.insert(item.subject)
                cond.lock()
                retryAfter[item.subject] = Date().addingTimeInterval(retryInterval)
                cond.unlock()
            }
        }
    }

    private func record(error: String) {
        StorageMetrics.gcErrors.increment()
        cond.lock()
        lastError = error
        cond.unlock()
    }

    /// A merge dropped because the chain changed under it (planned afresh next pass).
    struct Gave: Error { var reason: String }

    /// Not enough free space in the SR for a merge: reported, tried again later.
    struct NoSpace: Error, CustomStringConvertible {
        var needed: UInt64, free: UInt64
        var description: String { "not enough free space to coalesce: needs \(needed) bytes, the SR has \(free)" }
    }

    func perform(_ w: Work) throws {
        // A family held (a migration) since the plan was made is left alone.
        let family = (try? sr.anyRecord(w.subject))?.family ?? ""
        try sr.familyWork.withLock { (s) throws(Gave) in
            if s.held.contains(family) { throw Gave(reason: "a migration holds its family") }
            s.performing = family
        }
        defer { sr.familyWork.withLock { $0.performing = nil } }
        switch w {
        case .delete(let b): try deleteBase(b)
        case .coalesce(let c, let p): try coalesce(c, into: p)
        case .leafCoalesce(let c, let p): try leafCoalesce(c, into: p)
        }
    }

    // MARK: deleting

    func deleteBase(_ b: String) throws {
        guard let rec = try sr.anyRecord(b) else { return }
        try sr.withFamilyLock(rec.family) {
            if let why = sr.familyKept(rec.family) { throw Gave(reason: why) }
            guard let r = try sr.anyRecord(b), !r.managed else { return }
            let kids = try sr.dbRead { try VDIRecord.filter(Column("parent") == b).fetchCount($0) }
            guard kids == 0 else { return }
            let e = JournalEntry(id: UUID().uuidString.lowercased(), operation: .delete, child: b, parent: nil, phase: .switching, started: Date())
            try sr.journal.write(e)
            stepHook?("delete")
            try sr.finishDelete(b)
            sr.journal.remove(e.id)
            sr.logger.info("collector: removed unreferenced base \(b)")
        }
    }
}

extension SR {
    /// The last step of deleting a base (redone at recovery): record, then file.
    func finishDelete(_ b: String) throws {
        _ = try dbWrite { try VDIRecord.deleteOne($0, key: b) }
        unlink(imagePath(b))
        try syncDirectory()
    }

    /// Free bytes on the SR's file system.
    func freeBytes() -> UInt64 {
        var st = statvfs()
        guard statvfs(path, &st) == 0 else { return .max }
        return UInt64(st.f_bavail) * UInt64(st.f_frsize)
    }

    /// Operations on handles outside `family` since the last call (for the throttle).
    func foregroundOps(excluding family: String) -> Int {
        handlesLock.lock(); defer { handlesLock.unlock() }
        return handles.values.filter { $0.family != family }.reduce(0) { $0 + $1.ops.load(ordering: .relaxed) }
    }
}
