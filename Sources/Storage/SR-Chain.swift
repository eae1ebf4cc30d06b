// Operations that change a VDI's chain: snapshot and destroy. (Coalesce and garbage
// collection, which shorten chains, are the collector's: see Collector.)

import CBT
import Foundation
import GRDB
import Image

extension SR {
    /// How many files a VDI's chain reads from (1: no parent).
    func chainDepth(_ uuid: String) throws -> Int {
        var depth = 1
        var cur = try anyRecord(uuid)?.parent
        while let p = cur, depth < 10_000 {
            depth += 1
            cur = try anyRecord(p)?.parent
        }
        return depth
    }

    public func snapshot(_ uuid: String, driverParams: [String: String] = [:]) throws -> VDIRecord {
        let u = try SR.validUUID(uuid)
        let snap = try withFamily(of: u) { rec in try branchLocked(rec, clone: false, driverParams: driverParams) }
        collector.kick()
        return snap
    }

    /// `VDI.clone`: a new writable VDI over the same hidden base as the source, made as a
    /// snapshot is (the source's file becomes the base, both get a new empty leaf) but
    /// neither read-only nor a snapshot, and without the source's change log (XenServer
    /// does not carry CBT to a clone). A snapshot's clone is how a VM disk is made from it.
    public func clone(_ uuid: String, driverParams: [String: String] = [:]) throws -> VDIRecord {
        let u = try SR.validUUID(uuid)
        let c = try withFamily(of: u) { rec in try branchLocked(rec, clone: true, driverParams: driverParams) }
        collector.kick()
        return c
    }

    /// Snapshot or clone: the source's file becomes a hidden base with two empty children,
    /// the source's new leaf and the new VDI's.
    private func branchLocked(_ rec: VDIRecord, clone: Bool, driverParams: [String: String]) throws -> VDIRecord {
        let u = rec.uuid
        var vdi = rec
        guard vdi.type != .cbtMetadata else { throw StorageError.vdiIncompatibleType(uuid: u, type: vdi.type.rawValue) }
        try requireChains(u, for: clone ? "clone" : "snapshot")
        try requireFile(vdi)
        // XenServer refuses a snapshot at depth 30 rather than build a chain blktap cannot open.
        if try chainDepth(u) >= StorageError.maxChainDepth { throw StorageError.chainTooLong() }
        if vdi.cbtEnabled && !clone && !isAttached(u) {
            // A damaged log is reported, not handed on to the snapshot.
            do { _ = try ChangeLog.open(path: cbtLogPath(u)) } catch {
                try disableCBTLocked(vdi, reason: "\(error)")
                vdi = try record(u)
            }
        }
        let baseUUID = UUID().uuidString.lowercased()
        let snapUUID = UUID().uuidString.lowercased()
        // The chain's format, for the new base and the new VDI too.
        let format = self.format(of: u)
        remember(baseUUID, format)
        remember(snapUUID, format)
        let leafPath = imagePath(u), basePath = imagePath(baseUUID, format: format), snapPath = imagePath(snapUUID, format: format)
        let newLeafPath = leafPath + ".new"

        func swap(_ chain: (any DiskImage)?) throws {
            do {
                try chain?.flush()
                guard link(leafPath, basePath) == 0 else {
                    throw StorageError.vdiIOError(uuid: u, detail: "link \(leafPath): \(String(cString: strerror(errno)))")
                }
                try format.createChild(path: snapPath, parent: basePath, size: nil)
                try format.createChild(path: newLeafPath, parent: basePath, size: nil)
                try syncDirectory()
                guard rename(newLeafPath, leafPath) == 0 else {
                    throw StorageError.vdiIOError(uuid: u, detail: "rename: \(String(cString: strerror(errno)))")
                }
                try syncDirectory()
            } catch {
                // Nothing visible changed before the rename: undo the side files.
                unlink(newLeafPath); unlink(snapPath)
                if FileManager.default.fileExists(atPath: leafPath) { unlink(basePath) }
                if let e = error as? StorageError { throw e }
                throw StorageError.vdiIOError(uuid: u, detail: "\(error)")
            }
        }

        // The family lock is held: no connection attaches or detaches the VDI meanwhile.
        try withHandle(u) { handle in
            if let h = handle {
                try h.exclusively { old in
                    try swap(old)
                    let writable = old.writable
                    old.close()
                    let chain: any DiskImage
                    do {
                        chain = try format.open(path: leafPath, writable: writable)
                    } catch {
                        throw StorageError.vdiIOError(uuid: u, detail: "reopening after snapshot: \(error)")
                    }
                    if vdi.cbtEnabled && !clone {
                        try snapshotCBT(vdi: u, snapshot: snapUUID, size: vdi.virtualSize, handle: h, writable: chain.writable)
                    }
                    return chain
                }
            } else {
                try swap(nil)
                if vdi.cbtEnabled && !clone {
                    try snapshotCBT(vdi: u, snapshot: snapUUID, size: vdi.virtualSize, handle: nil, writable: false)
                }
            }
        }

        let now = Date()
        var base = VDIRecord(uuid: baseUUID, nameLabel: "base copy", virtualSize: vdi.virtualSize)
        base.managed = false
        base.readOnly = true
        base.parent = vdi.parent
        base.family = vdi.family
        var snap = VDIRecord(uuid: snapUUID, nameLabel: vdi.nameLabel, nameDescription: vdi.nameDescription,
                             virtualSize: vdi.virtualSize)
        if clone {
            // A clone of a snapshot is writable (that is what it is for); of a read-only
            // VDI, read-only as its source.
            snap.readOnly = vdi.readOnly && !vdi.isASnapshot
            snap.type = vdi.type
        } else {
            snap.isASnapshot = true
            snap.snapshotOf = u
            snap.snapshotTime = now
            snap.readOnly = true
        }
        snap.parent = baseUUID
        snap.family = vdi.family
        snap.otherConfig = vdi.otherConfig
        snap.smConfig = vdi.smConfig.merging(driverParams) { $1 }
        for k in SR.computedSMConfigKeys { snap.smConfig[k] = nil }
        snap.tags = vdi.tags
        snap.cbtEnabled = vdi.cbtEnabled && !clone
        var leaf = vdi
        leaf.parent = baseUUID
        for k in SR.computedSMConfigKeys { leaf.smConfig[k] = nil }
        let (b, s, l) = (base, snap, leaf)
        try dbWrite { db in
            try b.insert(db)
            try s.insert(db)
            try l.update(db)
        }
        logger.info("\(clone ? "clone" : "snapshot") \(snapUUID) of VDI \(u) (base \(baseUUID))")
        return try record(snapUUID)
    }

    public func destroy(_ uuid: String) throws {
        let u = try SR.validUUID(uuid)
        try withFamily(of: u) { r in
            try withHandle(u) { h in
                if h != nil || hasOverlays(u) { throw StorageError.vdiInUse(uuid: u, operation: "destroy") }
                if r.cbtEnabled {
                    if r.isASnapshot || r.type == .cbtMetadata { mergeCBTOnDestroy(r) } else { ChangeLog.remove(path: cbtLogPath(u)) }
                }
                try dbWrite { db in
                    _ = try VDIRecord.deleteOne(db, key: u)
                    _ = try TokenRecord.filter(Column("vdi_uuid") == u).deleteAll(db)
                }
                unlink(imagePath(u))
            }
        }
        try? syncDirectory()
        logger.info("destroyed VDI \(u)")
        collector.kick()
    }
}
