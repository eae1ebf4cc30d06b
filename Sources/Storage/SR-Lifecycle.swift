// The VDI lifecycle beyond create, snapshot and destroy: the record's setters, forget,
// and what a record shows of its state (`allowed_operations`, `missing`, attachments).
// Clone is in SR-Chain.swift (it shares snapshot's chain edit), copy in SR-Copy.swift.

import Foundation
import GRDB

/// XenAPI's `vdi_operations` this server can perform, as `allowed_operations` lists them.
public enum VDIOperation: String, Codable, Sendable, CaseIterable {
    case clone, copy, resize, snapshot, destroy, forget, update
    case enableCBT = "enable_cbt", disableCBT = "disable_cbt", dataDestroy = "data_destroy"
    case listChangedBlocks = "list_changed_blocks", setOnBoot = "set_on_boot"
}

/// A change to a record's plain fields (`VDI.set_*`, tags).
public enum RecordChange: Sendable {
    case nameLabel(String), nameDescription(String), allowCaching(Bool), sharable(Bool), readOnly(Bool)
    case addTag(String), removeTag(String)
}

extension SR {
    /// `VDI.set_name_label` and friends, checked against the VDI's state.
    public func set(_ uuid: String, _ change: RecordChange) throws {
        let u = try SR.validUUID(uuid)
        try withFamily(of: u) { rec in
            var r = rec
            switch change {
            case .nameLabel(let s): r.nameLabel = s
            case .nameDescription(let s): r.nameDescription = s
            case .allowCaching(let b): r.allowCaching = b
            case .sharable(let b):
                // Two read-write attachments may be live only while sharable.
                if !b, attachments(of: u).filter({ !$0.readOnly }).count > 1 {
                    throw StorageError.vdiInUse(uuid: u, operation: "set_sharable")
                }
                r.sharable = b
            case .readOnly(let b):
                if !b, r.isASnapshot || r.type == .cbtMetadata {
                    throw StorageError.operationNotAllowed(reason: "VDI \(u) is a snapshot: it is always read-only")
                }
                if b, attachments(of: u).contains(where: { !$0.readOnly }) {
                    throw StorageError.vdiInUse(uuid: u, operation: "set_read_only")
                }
                r.readOnly = b
            case .addTag(let t): if !r.tags.contains(t) { r.tags.append(t) }
            case .removeTag(let t): r.tags.removeAll { $0 == t }
            }
            try save(r)
        }
    }

    /// `VDI.forget`: the record goes, the file stays; `SR.scan` brings it back.
    public func forget(_ uuid: String) throws {
        let u = try SR.validUUID(uuid)
        try withFamily(of: u) { r in
            try withHandle(u) { h in
                if h != nil || hasOverlays(u) { throw StorageError.vdiInUse(uuid: u, operation: "forget") }
                let hasFile = FileManager.default.fileExists(atPath: imagePath(u))
                try dbWrite { db in
                    _ = try VDIRecord.deleteOne(db, key: u)
                    _ = try TokenRecord.filter(Column("vdi_uuid") == u).deleteAll(db)
                    if hasFile {
                        try db.execute(sql: "INSERT OR REPLACE INTO forgotten (uuid, name_label, name_description, family) VALUES (?, ?, ?, ?)",
                                       arguments: [u, r.nameLabel, r.nameDescription, r.family])
                    }
                }
                logger.info("forgot VDI \(u)\(hasFile ? " (its file stays; SR.scan reintroduces it)" : "")")
            }
        }
    }

    /// Why the collector must leave a family's files as they are now, or nil: the two
    /// reasons its plan leaves families out for, asked again under the family lock at every
    /// switch, so that a forget or an overlay that came during a merge's copy holds it off.
    func familyKept(_ family: String) -> String? {
        if familiesWithOverlays().contains(family) { return "an overlay reads through its files" }
        if familiesWithForgottenFiles().contains(family) { return "a forgotten VDI's file reads through its bases" }
        return nil
    }

    /// Families with a forgotten VDI whose file is still there: the collector leaves them
    /// as they are until scan brings the VDI back (or its file goes).
    func familiesWithForgottenFiles() -> Set<String> {
        let rows = (try? dbRead { try Row.fetchAll($0, sql: "SELECT uuid, family FROM forgotten") }) ?? []
        return Set(rows.compactMap { r -> String? in
            FileManager.default.fileExists(atPath: imagePath(r["uuid"])) ? r["family"] : nil
        })
    }

    /// `VDI.update`: rereads what the record shows of the file (its size on disk is read at
    /// every record fetch); a record whose file is gone is `VDI_MISSING`.
    public func update(_ uuid: String) throws {
        let r = try record(uuid)
        try requireFile(r)
    }

    /// Throws `VDI_MISSING` when a record's file is gone (a data-destroyed snapshot has none by design).
    func requireFile(_ r: VDIRecord) throws {
        guard r.type != .cbtMetadata else { return }
        if !FileManager.default.fileExists(atPath: imagePath(r.uuid)) { throw StorageError.vdiMissing(uuid: r.uuid) }
    }

    /// What may be done to the VDI now (advisory, as XenAPI says).
    public func allowedOperations(_ r: VDIRecord) -> [VDIOperation] {
        if r.type == .cbtMetadata { return [.destroy, .forget, .listChangedBlocks, .dataDestroy] }
        if !FileManager.default.fileExists(atPath: imagePath(r.uuid)) { return [.destroy, .forget] }
        let attached = isAttached(r.uuid)
        var ops: [VDIOperation] = [.clone, .copy, .snapshot, .update]
        if !attached { ops += [.destroy, .forget] }
        if r.isASnapshot {
            if r.cbtEnabled { ops += [.listChangedBlocks] }
            if r.cbtEnabled && !attached { ops += [.dataDestroy] }
        } else {
            if !attached && !r.readOnly { ops += [.resize] }
            if r.onBoot == .persist { ops += r.cbtEnabled ? [.disableCBT, .listChangedBlocks] : [.enableCBT] }
            if !attached && !r.cbtEnabled { ops += [.setOnBoot] }
        }
        return ops
    }
}
