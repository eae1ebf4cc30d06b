// Overlay attachments: a read-write view whose writes go to a throw-away leaf above the
// VDI, deleted when the attachment (the connections of one token) ends.
//   - scratch: `get_nbd_info(vdi, {"mode": "scratch"})`, as the oVirt backup API gives a
//     backup appliance a writable view of a snapshot (seeds 002/003). The VDI never changes.
//   - on_boot=reset: every read-write attachment starts from the state recorded when the
//     mode was set (the VDI's file, which nothing writes while the mode lasts).
// The overlay is `<uuid>.overlay-<id>.<ext>` beside the VDI's file (its parent locator
// names it relatively); start-up removes any a crash left. While an overlay is open the
// collector leaves its family alone: a merge would move the file the overlay reads.

import Foundation
import Image

extension SR {
    func overlayPath(_ uuid: String) -> String {
        "\(path)/\(uuid).overlay-\(UUID().uuidString.lowercased().prefix(8)).\(format(of: uuid).fileExtension)"
    }

    func needsOverlay(_ r: VDIRecord, grant g: ExportGrant) -> Bool {
        g.mode == .scratch || (r.onBoot == .reset && !g.readOnly)
    }

    /// The attachment's overlay handle: the one its token opened, or a new overlay (family lock held).
    func openOverlay(_ r: VDIRecord, grant g: ExportGrant) throws -> VDIHandle {
        let key = "\(r.uuid)#\(g.digest)"
        handlesLock.lock()
        let existing = handles[key]
        handlesLock.unlock()
        if let h = existing {
            h.refCount += 1
            return h
        }
        try requireChains(r.uuid, for: g.mode == .scratch ? "scratch views" : "on_boot=reset")
        let o = overlayPath(r.uuid)
        let chain: any DiskImage
        do {
            try format(at: o).createChild(path: o, parent: imagePath(r.uuid), size: nil)
            chain = try format(at: o).open(path: o, writable: true)
        } catch {
            unlink(o)
            throw StorageError.vdiIOError(uuid: r.uuid, detail: "creating the attachment's overlay: \(error)")
        }
        let h = VDIHandle(uuid: r.uuid, family: r.family, chain: chain)
        h.key = key
        h.overlayPath = o
        h.refCount = 1
        handlesLock.lock()
        handles[key] = h
        handlesLock.unlock()
        logger.info("VDI \(r.uuid): \(g.mode == .scratch ? "scratch" : "on_boot=reset") attachment \(g.label) writes to \(o)")
        return h
    }

    /// The attachment ended: its overlay and its writes go (family lock held).
    func closeOverlay(_ h: VDIHandle) {
        closeHandle(h)
        if let o = h.overlayPath {
            unlink(o)
            logger.info("VDI \(h.uuid): overlay \(o) dropped")
        }
        collector.kick()
    }

    func hasOverlays(_ uuid: String) -> Bool {
        handlesLock.lock(); defer { handlesLock.unlock() }
        return handles.values.contains { $0.uuid == uuid && $0.overlayPath != nil }
    }

    /// Families with an overlay open: the collector leaves them as they are.
    func familiesWithOverlays() -> Set<String> {
        handlesLock.lock(); defer { handlesLock.unlock() }
        return Set(handles.values.filter { $0.overlayPath != nil }.map(\.family))
    }

    /// Start-up: overlays a crash left behind (their attachments ended with the process).
    func removeOverlays() {
        let marker = ".overlay-"
        for n in (try? FileManager.default.contentsOfDirectory(atPath: path)) ?? [] where n.contains(marker) {
            unlink("\(path)/\(n)")
            logger.warning("recovery: removed the overlay \(n) of an attachment that ended with the last run")
        }
    }

    /// `VDI.set_on_boot`. `reset` records the VDI's state now: its file is written no more
    /// while the mode lasts, each read-write attachment writing to an overlay instead.
    /// XenServer's rules: not with CBT on, not on a snapshot, and (as XenServer asks the VM
    /// to be halted) not while attached.
    public func setOnBoot(_ uuid: String, _ mode: OnBoot) throws {
        let u = try SR.validUUID(uuid)
        try withFamily(of: u) { rec in
            var r = rec
            if r.onBoot == mode { return }
            if r.isASnapshot || r.type == .cbtMetadata {
                throw StorageError.vdiIncompatibleType(uuid: u, type: r.isASnapshot ? "snapshot" : r.type.rawValue)
            }
            if mode == .reset && r.cbtEnabled { throw StorageError.vdiOnBootModeIncompatible(uuid: u) }
            if mode == .reset { try requireChains(u, for: "on_boot=reset") }
            try withHandle(u) { h in
                if h != nil || hasOverlays(u) { throw StorageError.vdiInUse(uuid: u, operation: "set_on_boot") }
                r.onBoot = mode
                try save(r)
            }
            logger.info("VDI \(u): on_boot=\(mode.rawValue)")
        }
    }
}
