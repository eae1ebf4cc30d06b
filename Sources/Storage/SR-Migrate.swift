// `VDI.pool_migrate(vdi, sr, {"dest-img-format": F})`: a VDI's current state moves to a
// file of another image format, in this SR or another the server hosts, while clients
// keep reading and writing it. The chain is copied into one new file, the writes made
// meanwhile are copied again (tracked as a leaf merge tracks them), and with I/O held off
// for the last of them the new file takes the VDI's place; the handle reopens it, so
// connections, tokens and the change log carry on. The VDI's snapshots stay where they
// are, in their format and chain; the VDI's old leaf goes, and the bases only the
// snapshots need are left to the collector.
//
// To another SR the VDI's record, tokens and change log go too (SR-Move.swift): the log
// chain then links the VDI in its new SR to its snapshots in the old one, so the next
// incremental backup reads only what changed.
//
// Journalled (`migrate`, in the VDI's SR): while copying, a crash drops the half-made
// file (the VDI's own file is untouched); once switching, start-up finishes the switch
// (`Pool.recover` for a move, once both SRs are open). While it runs the collector
// leaves the VDI's family alone.

import Foundation
import GRDB
import Image

extension SR {
    /// The staging file a migration of `uuid` to `f` copies into.
    func migrationStaging(_ uuid: String, _ f: any ImageFormat) -> String { "\(path)/\(uuid).migrating.\(f.fileExtension)" }

    public func migrate(_ uuid: String, toFormat name: String, task: TaskContext?) throws -> VDIRecord {
        try migrate(uuid, to: self, format: name, task: task)
    }

    /// `dest`: the SR the VDI moves to (this one: only its format changes).
    public func migrate(_ uuid: String, to destSR: SR, format name: String, task: TaskContext?) throws -> VDIRecord {
        let moving = destSR !== self
        let rec = try record(uuid)
        guard rec.type != .cbtMetadata else { throw StorageError.vdiIncompatibleType(uuid: rec.uuid, type: rec.type.rawValue) }
        if rec.isASnapshot || !rec.managed {
            throw StorageError.operationNotAllowed(reason: "VDI \(rec.uuid) is a snapshot; only a VDI's current state migrates")
        }
        try requireFile(rec)
        let src = format(of: rec.uuid)
        let dest = try destSR.formatForNewVDI(smConfig: ["image-format": name], size: rec.virtualSize)
        if dest.name == src.name && !moving { return filledIn(rec) }
        if moving, try destSR.anyRecord(rec.uuid) != nil {
            throw StorageError.operationNotAllowed(reason: "SR \(destSR.uuid) already holds a VDI \(rec.uuid)")
        }
        if rec.cbtEnabled && !dest.holdsChains {
            throw StorageError.valueNotSupported(field: "dest-img-format", value: name,
                reason: "VDI \(rec.uuid) has changed block tracking on, and \(dest.name) holds no chains to track (disable CBT first)")
        }
        if rec.onBoot == .reset || hasOverlays(rec.uuid) {
            throw StorageError.operationNotAllowed(reason: "VDI \(rec.uuid) has an overlay (on_boot=reset or a scratch view) open or due")
        }
        try holdFamily(rec.family)
        defer { releaseFamily(rec.family) }
        let staging = destSR.migrationStaging(rec.uuid, dest)
        var entry = JournalEntry(id: UUID().uuidString.lowercased(), operation: .migrate, child: rec.uuid, parent: nil,
                                 phase: .copying, started: Date(), staging: staging)
        if moving { entry.destination = destSR.uuid }
        try journal.write(entry)
        // Kept when a switch began and failed here: start-up finishes it.
        var keepEntry = false
        defer { if !keepEntry { journal.remove(entry.id) } }
        var switched = false
        defer { if !switched { unlink(staging) } }
        try dest.create(path: staging, size: rec.virtualSize)
        let started = Date()

        // From here every write to the VDI, on any handle, is tracked.
        let (tracker, source) = try startTracking(rec.uuid, family: rec.family) {
            try src.open(path: imagePath(rec.uuid), writable: false)
        }
        defer { source.close() }
        defer { stopTracking(rec.uuid, family: rec.family, tracker) }
        let target = try dest.open(path: staging, writable: true)
        var targetOpen = true
        defer { if targetOpen { target.close() } }
        // Nothing reads the target until the switch, which flushes it first.
        target.setAllocationBarrier(false)
        let size = rec.virtualSize
        var bytes: UInt64 = 0
        var runs: [Range<UInt64>] = []
        var at: UInt64 = 0
        for r in try source.allocationRuns(offset: 0, length: size) {
            if r.allocated { runs.append(at..<(at + r.length)) }
            at += r.length
        }
        let total = max(1, runs.reduce(0) { $0 + UInt64($1.count) })
        var read: UInt64 = 0
        bytes += try collector.copy(runs: runs, from: { b, o in
            try task?.checkCancelled()
            try source.read(into: b, at: o)
            read += UInt64(b.count)
            task?.setProgress(0.95 * Double(read) / Double(total))
        }, into: target, family: rec.family)
        // Catch up online while clients keep writing much (zeros written meanwhile are
        // copied as zeros: the target holds the old bytes there).
        for _ in 0..<4 where tracker.count > 32 {
            try task?.checkCancelled()
            bytes += try collector.copy(runs: tracker.take(size: size), from: { b, o in try self.collector.readThroughVDI(rec.uuid, into: b, at: o) },
                                        into: target, family: rec.family)
        }
        // A move holds the family in both SRs (always this one first).
        try withFamilyLock(rec.family) { try destSR.withFamilyLock(rec.family) {
            guard let now = try anyRecord(rec.uuid), now.managed, !now.isASnapshot, now.virtualSize == size else {
                throw StorageError.operationNotAllowed(reason: "VDI \(rec.uuid) changed during the migration")
            }
            func switchOver(_ chain: (any DiskImage)?) throws {
                let rest = tracker.take(size: size)
                if let chain {
                    try chain.flush()
                    bytes += try collector.copy(runs: rest, from: { b, o in try chain.read(into: b, at: o) }, into: target, family: rec.family)
                } else if !rest.isEmpty {
                    let chain = try src.open(path: imagePath(rec.uuid), writable: false)
                    defer { chain.close() }
                    bytes += try collector.copy(runs: rest, from: { b, o in try chain.read(into: b, at: o) }, into: target, family: rec.family)
                }
                try target.flush()
                target.close()
                targetOpen = false
                entry.phase = .switching
                try journal.write(entry)
                collector.stepHook?("migrate-switch")
                switched = true
                do {
                    if moving { try finishMove(rec.uuid, staging: staging, to: destSR, format: dest) } else {
                        try finishMigrate(rec.uuid, staging: staging, to: dest)
                    }
                } catch {
                    keepEntry = true
                    logger.error("migration of VDI \(rec.uuid): the switch failed (\(error)); the next start finishes it")
                    throw error
                }
            }
            if let h = lookUp(rec.uuid) {
                try h.exclusively { old in
                    // The log's last bits reach its file before a move copies it.
                    if moving { try h.cbt?.commit() }
                    try switchOver(old)
                    h.tracker = nil
                    let writable = old.writable
                    old.close()
                    if moving { try handOver(h, to: destSR) }
                    return try dest.open(path: destSR.imagePath(rec.uuid, format: dest), writable: writable)
                }
            } else {
                try switchOver(nil)
            }
        } }
        task?.setProgress(1)
        logger.info("migrated VDI \(rec.uuid) from \(src.name) to \(dest.name)\(moving ? " in SR \(destSR.uuid)" : "") (\(bytes) bytes in \(String(format: "%.2f", Date().timeIntervalSince(started))) s)")
        collector.kick()
        return destSR.filledIn(try destSR.record(rec.uuid))
    }

    /// The switch of a migration (redone at recovery): the staging file takes the VDI's
    /// name in the new format, the old leaf goes, then the record (no parent: the new
    /// file holds the whole disk).
    func finishMigrate(_ uuid: String, staging: String, to dest: any ImageFormat) throws {
        let newPath = imagePath(uuid, format: dest)
        if FileManager.default.fileExists(atPath: staging) {
            guard rename(staging, newPath) == 0 else {
                throw StorageError.vdiIOError(uuid: uuid, detail: "rename \(staging): \(String(cString: strerror(errno)))")
            }
        }
        for f in Formats.all where f.name != dest.name { unlink(imagePath(uuid, format: f)) }
        try syncDirectory()
        remember(uuid, dest)
        try dbWrite { db in
            if var r = try VDIRecord.fetchOne(db, key: uuid) {
                r.parent = nil
                if r.smConfig["image-format"] != nil { r.smConfig["image-format"] = dest.name }
                try r.update(db)
            }
        }
    }

    // MARK: families the collector leaves alone

    /// Keeps the collector off a family (waiting for a merge of it in progress to end).
    func holdFamily(_ family: String) throws {
        let deadline = Date().addingTimeInterval(600)
        while !familyWork.withLock({ s -> Bool in
            guard s.performing != family, !s.held.contains(family) else { return false }
            s.held.insert(family)
            return true
        }) {
            guard Date() < deadline else {
                throw StorageError.operationNotAllowed(reason: "another chain operation on this VDI's family has run for 10 minutes")
            }
            usleep(20_000)
        }
    }

    func releaseFamily(_ family: String) {
        familyWork.withLock { _ = $0.held.remove(family) }
        collector.kick()
    }
}
