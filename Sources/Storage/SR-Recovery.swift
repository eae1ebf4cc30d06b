// Start-up recovery (journalled chain edits first, then what unjournalled steps leave:
// half-made snapshots, a resize's record) and `SR.scan`, which reports and repairs what
// the records and the files disagree on without losing data.

import Foundation
import GRDB
import Image

extension SR {
    /// The SR uuid of the file an image names as its parent.
    func parentUUID(ofFile path: String) -> String? {
        guard let p = format(at: path).parentPath(ofFile: path) else { return nil }
        return ((p as NSString).lastPathComponent as NSString).deletingPathExtension
    }

    /// Finishes (or drops, where nothing was changed yet) every journalled chain edit.
    func recoverJournal() throws {
        let (entries, unreadable) = journal.entries()
        for n in unreadable { logger.error("recovery: journal entry \(n) cannot be read; left for an administrator") }
        for e in entries {
            switch (e.operation, e.phase) {
            case (.delete, _):
                try finishDelete(e.child)
                logger.warning("recovery: finished removing base \(e.child)")
            case (.replace, _):
                try finishReplace(e.child, with: e.staging ?? "")
                logger.warning("recovery: finished replacing \(e.child)'s contents with a validated import")
            case (.migrate, .copying):
                if let s = e.staging { unlink(s) }
                logger.warning("recovery: dropped an interrupted migration of \(e.child) (its file is as it was)")
            case (.migrate, .switching) where e.destination != nil:
                // A move to another SR: finished or undone once both are open (`Pool.recover`).
                continue
            case (.migrate, .switching):
                if let s = e.staging { try finishMigrate(e.child, staging: s, to: format(at: s)) }
                logger.warning("recovery: finished migrating \(e.child) to \(e.staging.map { format(at: $0).name } ?? "?")")
            case (.importCommit, _):
                // Finished once the SR is open (`finishImportCommits`).
                continue
            case (.coalesce, .copying), (.leafCoalesce, .copying):
                // The child still holds everything the parent was given: nothing to undo.
                logger.warning("recovery: dropped an interrupted coalesce of \(e.child) into \(e.parent ?? "?") (it is planned again)")
            case (.coalesce, .switching):
                if let p = e.parent {
                    if try anyRecord(e.child) != nil {
                        try finishCoalesce(e.child, into: p)
                    } else {
                        unlink(imagePath(e.child))
                    }
                }
                logger.warning("recovery: finished coalescing \(e.child) into \(e.parent ?? "?")")
            case (.leafCoalesce, .switching):
                if let p = e.parent { try finishLeafCoalesce(e.child, into: p) }
                logger.warning("recovery: finished leaf-coalescing \(e.child) into \(e.parent ?? "?")")
            }
            journal.remove(e.id)
        }
    }

    /// Finishes or undoes unjournalled operations a crash interrupted.
    func recover() throws {
        removeOverlays()
        removeImportStaging()
        let fm = FileManager.default
        let names = (try? fm.contentsOfDirectory(atPath: path)) ?? []
        let known = Set(try dbRead { try String.fetchAll($0, sql: "SELECT uuid FROM vdi") })
        for n in names where n.hasSuffix(".new") && SR.imageUUID(String(n.dropLast(4))) != nil {
            // The rename never happened, so the old leaf is intact: drop the half-made one.
            unlink("\(path)/\(n)")
            logger.warning("recovery: removed unfinished snapshot leaf \(n)")
        }
        var referenced = Set<String>()
        for u in known {
            if let p = parentUUID(ofFile: imagePath(u)) { referenced.insert(p) }
        }
        // A snapshot cut before its leaf's rename: its base is a hard link of the VDI's
        // file (the same inode, which the VDI keeps writing) that no file with a record
        // names, and its own file, empty, names that link. Neither holds anything: both go.
        func inode(_ p: String) -> UInt64? {
            var st = stat()
            return stat(p, &st) == 0 ? UInt64(st.st_ino) : nil
        }
        let knownInodes = Set(known.compactMap { inode(imagePath($0)) })
        var staleLinks = Set<String>()
        for n in names {
            guard let u = SR.imageUUID(n), !known.contains(u), !referenced.contains(u),
                  let i = inode(imagePath(u)), knownInodes.contains(i) else { continue }
            staleLinks.insert(u)
        }
        for n in names {
            guard let u = SR.imageUUID(n), !known.contains(u), let p = parentUUID(ofFile: imagePath(u)),
                  staleLinks.contains(p), isEmptyImage(imagePath(u)) else { continue }
            unlink(imagePath(u))
            logger.warning("recovery: removed \(n), the empty file of a snapshot cut before its leaf's rename")
        }
        for u in staleLinks {
            unlink(imagePath(u))
            logger.warning("recovery: removed the base link \(u) of a snapshot cut before its leaf's rename")
        }
        for n in names {
            guard let u = SR.imageUUID(n), !known.contains(u), FileManager.default.fileExists(atPath: imagePath(u)) else { continue }
            if referenced.contains(u) {
                // A snapshot's base whose records were not committed: keep it as a hidden base.
                var base = VDIRecord(uuid: u, nameLabel: "base copy", virtualSize: (try? format(of: u).virtualSize(ofFile: imagePath(u))) ?? 0)
                base.managed = false
                base.readOnly = true
                base.parent = parentUUID(ofFile: imagePath(u))
                let children = known.filter { parentUUID(ofFile: imagePath($0)) == u }
                if let c = children.first, let cr = try anyRecord(c) { base.family = cr.family }
                let b = base
                try dbWrite { try b.insert($0) }
                for child in children {
                    if var r = try anyRecord(child), r.parent == nil || r.parent == base.parent {
                        r.parent = u
                        let rr = r
                        try dbWrite { try rr.update($0) }
                    }
                }
                logger.warning("recovery: adopted base \(u) of an interrupted snapshot")
            } else if let p = parentUUID(ofFile: imagePath(u)), known.contains(p) || referenced.contains(p), isEmptyImage(imagePath(u)) {
                // The snapshot's own (still empty) file of a snapshot whose records were not
                // committed (its parent a base with a record, or one adopted in this pass).
                unlink(imagePath(u))
                logger.warning("recovery: removed \(n), the empty file of an interrupted snapshot")
            } else {
                logger.warning("recovery: \(n) has no record and no child; SR.scan introduces it")
            }
        }
        for u in known where !fm.fileExists(atPath: imagePath(u)) {
            if let r = try anyRecord(u), r.type == .cbtMetadata { continue }
            logger.error("recovery: VDI \(u) has no file \(imagePath(u))")
        }
        // A resize that grew the image but crashed before the record: the file is the truth.
        let leaves = try dbRead { try VDIRecord.filter(Column("managed") == true && Column("is_a_snapshot") == false).fetchAll($0) }
        for var r in leaves where r.type != .cbtMetadata {
            guard let size = try? format(of: r.uuid).virtualSize(ofFile: imagePath(r.uuid)) else { continue }
            if size != r.virtualSize {
                logger.warning("recovery: VDI \(r.uuid) record said \(r.virtualSize) bytes, its image \(size)")
                r.virtualSize = size
                let rr = r
                try dbWrite { try rr.update($0) }
            }
        }
    }

    /// No data in the image's own layer.
    func isEmptyImage(_ p: String) -> Bool {
        guard let l = try? format(at: p).openLayer(path: p) else { return false }
        defer { l.close() }
        return (try? l.leafDataRuns(offset: 0, length: l.virtualSize).isEmpty) ?? false
    }

    /// What `SR.scan` found and did.
    public struct ScanReport: Codable, Sendable, Equatable {
        /// Files without records, introduced as new VDIs (`name_label` says so).
        public var introduced: [String] = []
        /// Empty leftovers of interrupted operations, removed.
        public var removed: [String] = []
        /// Records whose file is gone (kept, so an administrator decides).
        public var missing: [String] = []
        /// Records whose recorded parent differs from their file's, corrected from the file.
        public var relinked: [String] = []
    }

    /// Rescans the SR: files and records are compared and repaired without losing data;
    /// then the collector is kicked.
    public func scan() throws -> ScanReport {
        var report = ScanReport()
        let names = (try? FileManager.default.contentsOfDirectory(atPath: path)) ?? []
        let all = try dbRead { try VDIRecord.fetchAll($0) }
        let known = Dictionary(all.map { ($0.uuid, $0) }, uniquingKeysWith: { a, _ in a })
        // Journalled work in progress is the collector's, not an orphan.
        let inProgress = Set(journal.entries().valid.flatMap { [$0.child] + ($0.parent.map { [$0] } ?? []) })
        let forgotten = try dbRead { db in
            Dictionary(try Row.fetchAll(db, sql: "SELECT uuid, name_label, name_description, family FROM forgotten").map {
                ($0["uuid"] as String, ($0["name_label"] as String, $0["name_description"] as String, $0["family"] as String))
            }, uniquingKeysWith: { a, _ in a })
        }
        for n in names.sorted() {
            guard let u = SR.imageUUID(n) else { continue }
            guard known[u] == nil, UUID(uuidString: u) != nil, !inProgress.contains(u) else { continue }
            let p = imagePath(u)
            if let f = forgotten[u], let size = try? format(at: p).virtualSize(ofFile: p) {
                // A VDI.forget: back under its old name, whatever the file holds.
                var r = VDIRecord(uuid: u, nameLabel: f.0, nameDescription: f.1, virtualSize: size)
                r.family = f.2
                try introduce(r, file: p) { db in
                    try db.execute(sql: "DELETE FROM forgotten WHERE uuid = ?", arguments: [u])
                }
                report.introduced.append(u)
                logger.info("scan: reintroduced forgotten VDI \(u)")
                continue
            }
            if let parent = parentUUID(ofFile: p), known[parent] != nil, isEmptyImage(p) {
                unlink(p)
                report.removed.append(u)
                continue
            }
            guard let size = try? format(at: p).virtualSize(ofFile: p) else { continue }
            try introduce(VDIRecord(uuid: u, nameLabel: "unknown (introduced by SR.scan)", virtualSize: size), file: p)
            report.introduced.append(u)
            logger.warning("scan: introduced \(n) as VDI \(u)")
        }
        for r in all where r.type != .cbtMetadata {
            let p = imagePath(r.uuid)
            guard FileManager.default.fileExists(atPath: p) else {
                report.missing.append(r.uuid)
                continue
            }
            let fileParent = parentUUID(ofFile: p)
            if fileParent != r.parent, let fp = fileParent, known[fp] != nil {
                try withFamilyLock(r.family) {
                    var rr = r
                    rr.parent = fp
                    try dbWrite { try rr.update($0) }
                }
                report.relinked.append(r.uuid)
            }
        }
        if !report.removed.isEmpty { try syncDirectory() }
        collector.retryNow()
        collector.kick()
        return report
    }

    /// Records a file the scan found, in its parent's family and under that family's lock:
    /// the collector switches chains under the same lock, so the parent is read afresh
    /// there (a merge since the scan began may have replaced it) and a merge planned
    /// before this record existed sees it at its switch.
    private func introduce(_ record: VDIRecord, file p: String, also: (Database) throws -> Void = { _ in }) throws {
        let parent = parentUUID(ofFile: p)
        let family = try parent.flatMap { try anyRecord($0)?.family } ?? record.family
        try withFamilyLock(family) {
            var r = record
            if let par = parent, let pr = try anyRecord(par) {
                r.parent = par
                r.family = pr.family
            }
            let rr = r
            try dbWrite { db in
                try rr.insert(db)
                try also(db)
            }
        }
    }
}
