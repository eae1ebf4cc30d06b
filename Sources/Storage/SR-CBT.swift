// Changed block tracking on the SR: enabling and disabling, the log chain across
// snapshots (the current log goes with the snapshot, the leaf starts a fresh log linked to
// it), list_changed_blocks, data_destroy, and merging a destroyed snapshot's log into its
// neighbour. The log format and its durability live in the CBT target.

import CBT
import Foundation
import GRDB

extension SR {
    public func cbtLogPath(_ uuid: String) -> String { "\(path)/\(uuid).cbtlog" }

    /// The SR holding `uuid`: this one, or another of the pool. A VDI migrated to another
    /// SR leaves its snapshots here, and the change-log chain links across the two.
    func peer(holding uuid: String) -> SR {
        // One SR: nothing to look up (this runs for each link of a change-log walk).
        guard let pool, pool.srs.count > 1 else { return self }
        if (try? anyRecord(uuid)) != nil { return self }
        return pool.holding(uuid) ?? self
    }

    /// The change log of `uuid`, in whichever SR holds it.
    func logPath(_ uuid: String) -> String { peer(holding: uuid).cbtLogPath(uuid) }

    public func enableCBT(_ uuid: String) throws {
        try withFamily(of: uuid) { try enableCBTLocked($0) }
    }

    private func enableCBTLocked(_ rec: VDIRecord) throws {
        var r = rec
        if r.isASnapshot || r.type == .cbtMetadata {
            throw StorageError.operationNotAllowed(reason: "changed block tracking cannot be enabled on a snapshot (\(r.uuid))")
        }
        if r.onBoot == .reset { throw StorageError.vdiOnBootModeIncompatible(uuid: r.uuid) }
        // As XenAPI: CBT needs snapshots to compare, which a format without chains has not.
        try requireChains(r.uuid, for: "changed block tracking")
        if r.cbtEnabled { return }
        let p = cbtLogPath(r.uuid)
        try withHandle(r.uuid) { handle in
            ChangeLog.remove(path: p)
            let log: ChangeLog
            do { log = try ChangeLog.create(path: p, size: r.virtualSize) } catch {
                throw StorageError.vdiIOError(uuid: r.uuid, detail: "\(error)")
            }
            try syncDirectory()
            if let h = handle {
                h.exclusivelyCBT { _ in
                    try? log.setConsistent(false)
                    return log
                }
            }
            r.cbtEnabled = true
            r.otherConfig["cbt_disabled_reason"] = nil
            try save(r)
        }
    }

    public func disableCBT(_ uuid: String) throws {
        try withFamily(of: uuid) { try disableCBTLocked($0, reason: nil) }
    }

    /// Turns CBT off; with a reason (a damaged log) the record says why.
    func disableCBTLocked(_ rec: VDIRecord, reason: String?) throws {
        var r = rec
        if r.isASnapshot || r.type == .cbtMetadata {
            throw StorageError.operationNotAllowed(reason: "changed block tracking of a snapshot cannot be disabled")
        }
        if !r.cbtEnabled && reason == nil { return }
        try withHandle(r.uuid) { handle in
            handle?.exclusivelyCBT { _ in nil }
            r.cbtEnabled = false
            r.otherConfig["cbt_disabled_reason"] = reason
            // The record first: a crash between the two leaves an unused log (the next
            // enable replaces it), never a record naming a log that is gone.
            try save(r)
            if reason == nil { ChangeLog.remove(path: cbtLogPath(r.uuid)) }
        }
        if let why = reason { logger.error("CBT disabled on VDI \(r.uuid): \(why)") }
    }

    func save(_ r: VDIRecord) throws {
        try dbWrite { try r.update($0) }
    }

    /// Opens a VDI's log for reading or merging: the attached handle's own when there is one.
    func openLog(_ uuid: String) throws -> ChangeLog {
        let owner = peer(holding: uuid)
        if owner !== self { return try owner.openLog(uuid) }
        return try withOpenHandle(uuid) { h in
            if let h, let l = h.withCBT({ $0 }) { return l }
            return try ChangeLog.open(path: cbtLogPath(uuid))
        }
    }

    /// Called on attach (handles lock held): opens the log; a damaged one disables CBT and
    /// the record says why, instead of a backup silently missing changes.
    func attachCBT(_ r: VDIRecord, handle h: VDIHandle) {
        guard r.cbtEnabled else { return }
        do {
            let log = try ChangeLog.open(path: cbtLogPath(r.uuid))
            try log.markInUse()
            h.exclusivelyCBT { _ in log }
            let uuid = r.uuid
            h.onLogFailure = { [weak self] failure in
                guard let sr = self else { return }
                DispatchQueue.global().async { sr.logSyncFailed(uuid, failure) }
            }
        } catch {
            var d = r
            d.cbtEnabled = false
            d.otherConfig["cbt_disabled_reason"] = "\(error)"
            try? save(d)
            logger.error("CBT disabled on VDI \(r.uuid): \(error)")
        }
    }

    /// A parked write reached the VHD although its log sync failed: the log no longer
    /// covers every change, so CBT is disabled and the record says why.
    func logSyncFailed(_ uuid: String, _ failure: CBTError) {
        _ = try? withFamily(of: uuid) { r in
            guard r.cbtEnabled else { return }
            try disableCBTLocked(r, reason: "change log sync failed: \(failure)")
        }
    }

    /// At start-up: a live VDI whose log is damaged gets CBT disabled with the reason.
    func checkCBTLogs() {
        // A snapshot cut between its two log renames (the old log to the snapshot, the
        // fresh one to the VDI): finish the second, so the VDI's log leads to the old one.
        for n in (try? FileManager.default.contentsOfDirectory(atPath: path)) ?? [] where n.hasSuffix(".cbtlog.new") {
            let fresh = "\(path)/\(n)", live = String(fresh.dropLast(4))
            if FileManager.default.fileExists(atPath: live) {
                ChangeLog.remove(path: fresh)
            } else if ChangeLog.rename(fresh, to: live) {
                logger.warning("recovery: finished moving the change logs of an interrupted snapshot (\(n))")
            }
        }
        try? syncDirectory()
        let live = (try? dbRead { try VDIRecord.filter(Column("cbt_enabled") == true && Column("is_a_snapshot") == false).fetchAll($0) }) ?? []
        for r in live {
            do { _ = try ChangeLog.open(path: cbtLogPath(r.uuid)) } catch { try? disableCBTLocked(r, reason: "\(error)") }
        }
    }

    /// Snapshot of a CBT VDI (I/O held off by the caller): the log moves to the snapshot and
    /// the leaf starts a fresh one whose parent is the snapshot.
    func snapshotCBT(vdi: String, snapshot: String, size: UInt64, handle h: VDIHandle?, writable: Bool) throws {
        let live = cbtLogPath(vdi), moved = cbtLogPath(snapshot), fresh = live + ".new"
        unlink(fresh)
        let newLog = try ChangeLog.create(path: fresh, size: size, parent: UUID(uuidString: snapshot))
        // The caller holds the handle's gate exclusively: read its log directly.
        let old = try h?.cbt ?? ChangeLog.open(path: live)
        try old.setChild(UUID(uuidString: vdi))
        try old.setConsistent(true)
        // The log before it now leads to the snapshot, not to the live VDI.
        if let p = old.parent?.uuidString.lowercased(), let prev = try? ChangeLog.open(path: logPath(p)) {
            try prev.setChild(UUID(uuidString: snapshot))
        }
        guard ChangeLog.rename(live, to: moved), ChangeLog.rename(fresh, to: live) else {
            throw StorageError.vdiIOError(uuid: vdi, detail: "moving change logs: \(String(cString: strerror(errno)))")
        }
        try syncDirectory()
        if let h {
            if writable { try newLog.setConsistent(false) }
            h.exclusivelyCBTHeld { _ in newLog }
        }
    }

    /// Before a CBT snapshot's log is deleted: its bits go into the next log in the chain,
    /// which then links to this log's parent, so no change is forgotten.
    func mergeCBTOnDestroy(_ r: VDIRecord) {
        guard r.cbtEnabled, let log = try? ChangeLog.open(path: cbtLogPath(r.uuid)) else { return }
        // The next log is the one whose parent is this snapshot (the child field says which).
        var nextUUID = log.child?.uuidString.lowercased()
        if let n = nextUUID, (try? openLog(n))?.parent?.uuidString.lowercased() != r.uuid {
            nextUUID = (try? allRecords().map(\.uuid) + dbRead { try String.fetchAll($0, sql: "SELECT uuid FROM vdi WHERE cbt_enabled") })?
                .first { (try? openLog($0))?.parent?.uuidString.lowercased() == r.uuid }
        }
        if let child = nextUUID, let next = try? openLog(child) {
            do {
                try next.merge(log.bits)
                try next.setParent(log.parent)
                if let p = log.parent?.uuidString.lowercased(), let prev = try? ChangeLog.open(path: logPath(p)) {
                    try prev.setChild(UUID(uuidString: child))
                }
            } catch {
                logger.error("merging the change log of \(r.uuid) into \(child): \(error)")
                return
            }
        }
        ChangeLog.remove(path: cbtLogPath(r.uuid))
    }

    public func dataDestroy(_ uuid: String) throws {
        try withFamily(of: uuid) { rec in
            var r = rec
            if r.type == .cbtMetadata { return }
            guard r.isASnapshot, r.cbtEnabled else { throw StorageError.vdiNoCBTMetadata(uuid: r.uuid, reason: "not a snapshot with changed block tracking") }
            try withHandle(r.uuid) { h in
                if h != nil || hasOverlays(r.uuid) { throw StorageError.vdiInUse(uuid: r.uuid, operation: "data_destroy") }
                r.type = .cbtMetadata
                r.parent = nil
                let rr = r
                try dbWrite { db in
                    try rr.update(db)
                    _ = try TokenRecord.filter(Column("vdi_uuid") == rr.uuid).deleteAll(db)
                }
                unlink(imagePath(r.uuid))
            }
            try? syncDirectory()
            logger.info("data of snapshot \(r.uuid) destroyed; its change log is kept")
        }
        collector.kick()
    }

    /// The blocks changed after `from` up to and including `to`: MSB-first bitmap, one bit
    /// per 64 KiB, sized by `to`'s virtual size.
    public func changedBlocks(from: String, to: String) throws -> [UInt8] {
        let (acc, size) = try changedBlocksLSB(from: from, to: to)
        return ChangedBlocks.finish(acc, size: size)
    }

    /// The union of the logs after `from` up to `to`, LSB first as stored, and `to`'s size.
    func changedBlocksLSB(from: String, to: String) throws -> ([UInt8], UInt64) {
        let f = try peer(holding: from).record(from), t = try record(to)
        for r in [f, t] where !r.cbtEnabled {
            throw StorageError.vdiNoCBTMetadata(uuid: r.uuid, reason: r.otherConfig["cbt_disabled_reason"] ?? "changed block tracking is not enabled")
        }
        guard f.uuid != t.uuid else { return ([UInt8](repeating: 0, count: ChangeLog.bitmapLength(size: t.virtualSize)), t.virtualSize) }
        var acc = [UInt8](repeating: 0, count: ChangeLog.bitmapLength(size: t.virtualSize))
        var cur = t.uuid
        for _ in 0..<100_000 {
            let parent: UUID?
            do {
                let owner = peer(holding: cur)
                if let live = owner.withOpenHandle(cur, { $0?.withCBT({ $0 }) }) {
                    // Attached: its log is in memory and changing.
                    ChangedBlocks.or(live.bits, into: &acc)
                    parent = live.parent
                } else {
                    parent = try ChangeLog.accumulate(path: owner.cbtLogPath(cur), into: &acc)
                }
            } catch {
                let owner = peer(holding: cur)
                if let live = try? owner.record(cur), !live.isASnapshot { try? owner.disableCBTLocked(live, reason: "\(error)") }
                throw StorageError.vdiNoCBTMetadata(uuid: cur, reason: "\(error)")
            }
            guard let p = parent?.uuidString.lowercased() else {
                throw StorageError.operationNotAllowed(reason: "\(f.uuid) is not an earlier snapshot of \(t.uuid) in the change log chain")
            }
            if p == f.uuid { return (acc, t.virtualSize) }
            cur = p
        }
        throw StorageError.operationNotAllowed(reason: "change log chain of \(t.uuid) does not end")
    }

    /// `VDI.list_changed_blocks`: the base64 text, as ASCII bytes.
    public func listChangedBlocks(from: String, to: String) throws -> [UInt8] {
        let (acc, size) = try changedBlocksLSB(from: from, to: to)
        return ChangedBlocks.base64Bytes(acc, size: size)
    }

    /// The VDIs whose changes since them `r`'s export can report (qemu:dirty-bitmap:<uuid>).
    /// Cached until any log's header or any log file changes (`ChangeLog.generation`): a
    /// GO on a VDI with 29 CBT snapshots read 29 headers.
    public func cbtAncestors(_ r: VDIRecord) -> [String] {
        guard r.cbtEnabled else { return [] }
        let generation = ChangeLog.generation.load(ordering: .sequentiallyConsistent)
        if let hit = ancestryCache.withLock({ $0[r.uuid] }), hit.generation == generation { return hit.ancestors }
        let out = readAncestors(r.uuid)
        ancestryCache.withLock { c in
            if c.count > 4096 { c.removeAll() }
            c[r.uuid] = (generation, out)
        }
        return out
    }

    private func readAncestors(_ uuid: String) -> [String] {
        var out: [String] = []
        var cur = uuid
        // Headers only: opening each ancestor's log read its whole bitmap (4 MiB for a
        // 2040 GiB disk), over a second per GO with 29 snapshots.
        while out.count < 1000, let parent = try? ChangeLog.parent(path: logPath(cur)) {
            let p = parent.uuidString.lowercased()
            out.append(p)
            cur = p
        }
        return out
    }
}

extension VDIHandle {
    func withCBT<T>(_ body: (ChangeLog?) throws -> T) rethrows -> T {
        try withChain { _ in try body(cbt) }
    }

    /// For callers that already hold the gate exclusively (inside `exclusively`).
    func exclusivelyCBTHeld(_ body: (ChangeLog?) -> ChangeLog?) {
        cbt = body(cbt)
    }
}
