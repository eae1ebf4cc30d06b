// Attaching a VDI for I/O: one shared handle per VDI, kept open for `attachLingerSeconds`
// after its last connection; family locks; the handles table.

import Foundation
import Image

/// One recursive lock per family (chain tree), made on first use.
final class FamilyLocks: @unchecked Sendable {
    private let lock = NSLock()
    private var locks: [String: NSRecursiveLock] = [:]

    func lock(_ family: String) -> NSRecursiveLock {
        lock.lock(); defer { lock.unlock() }
        if let l = locks[family] { return l }
        let l = NSRecursiveLock()
        l.name = "family \(family)"
        locks[family] = l
        return l
    }
}

extension SR {
    /// Runs `body` with the VDI's family locked and its record as it is under the lock.
    func withFamily<T>(of uuid: String, _ body: (VDIRecord) throws -> T) throws -> T {
        let u = try SR.validUUID(uuid)
        // A VDI's family never changes: read it without the lock.
        guard let family = try anyRecord(u)?.family else { throw StorageError.vdiMissing(uuid: u) }
        return try withFamilyLock(family) { try body(try record(u)) }
    }

    func withFamilyLock<T>(_ family: String, _ body: () throws -> T) rethrows -> T {
        let l = families.lock(family)
        l.lock(); defer { l.unlock() }
        return try body()
    }

    /// Opens (or shares) the VDI's chain for I/O. Only this VDI's family waits meanwhile.
    /// `familyHint` (the family of a record the caller read) saves a read; a stale hint
    /// (a snapshot or coalesce moved the VDI since) is noticed under the lock and retried.
    public func attach(_ uuid: String, familyHint: String? = nil) throws -> VDIHandle {
        let u = try SR.validUUID(uuid)
        var hint = familyHint
        while true {
            let family: String
            if let h = hint { family = h } else {
                guard let f = try anyRecord(u)?.family else { throw StorageError.vdiMissing(uuid: u) }
                family = f
            }
            if let h = try attach(u, inFamily: family) { return h }
            hint = nil
        }
    }

    /// Nil if `u` is no longer of `family`.
    private func attach(_ u: String, inFamily family: String) throws -> VDIHandle? {
        try withFamilyLock(family) {
            let r = try storedRecord(u)
            guard r.family == family else { return nil }
            // The record is read under the family lock: an operation that changes it
            // (snapshot, CBT, destroy) holds the lock too, so attach sees it as that left it.
            if let h = lookUp(r.uuid) {
                // A lingering handle is taken back: its log is in use again.
                if h.refCount == 0 {
                    try? h.withCBT { try $0?.markInUse() }
                    logger.info("VDI \(r.uuid): its chain was still open (lingering); reused")
                }
                h.refCount += 1
                return h
            }
            let writable = !(r.readOnly || r.isASnapshot)
            let chain: any DiskImage
            do { chain = try format.open(path: imagePath(r.uuid), writable: writable) } catch {
                throw StorageError.vdiIOError(uuid: r.uuid, detail: "\(error)")
            }
            let h = VDIHandle(uuid: r.uuid, family: r.family, chain: chain)
            h.refCount = 1
            h.tracker = mergeTrackers[r.uuid]
            if writable { attachCBT(r, handle: h) }
            handlesLock.lock()
            handles[r.uuid] = h
            handlesLock.unlock()
            return h
        }
    }

    public func detach(_ h: VDIHandle) {
        withFamilyLock(h.family) {
            h.refCount -= 1
            guard h.refCount == 0 else { return }
            try? h.flush()
            // A clean detach: the log is marked consistent, as blktap does.
            try? h.cbt?.setConsistent(true)
            if h.parked.parkedCount > 0 {
                logger.info("VDI \(h.uuid) detached; \(h.parked.parkedCount) writes were acknowledged before their change-log sync")
            }
            if attachLingerSeconds <= 0 {
                closeHandle(h)
            } else {
                h.lingerGeneration += 1
                let generation = h.lingerGeneration
                lingerQueue.asyncAfter(deadline: .now() + attachLingerSeconds) { [weak self, weak h] in
                    guard let self, let h else { return }
                    self.withFamilyLock(h.family) {
                        if h.refCount == 0, h.lingerGeneration == generation, self.lookUp(h.uuid) === h { self.closeHandle(h) }
                    }
                }
            }
        }
    }

    func lookUp(_ uuid: String) -> VDIHandle? {
        handlesLock.lock(); defer { handlesLock.unlock() }
        return handles[uuid]
    }

    /// Closes a handle no connection holds (family lock held).
    private func closeHandle(_ h: VDIHandle) {
        precondition(h.refCount == 0)
        h.close()
        handlesLock.lock()
        if handles[h.uuid] === h { handles[h.uuid] = nil }
        handlesLock.unlock()
    }

    /// Closes the VDI's handle if it is only lingering (family lock held).
    func closeLingering(_ uuid: String) {
        if let h = lookUp(uuid), h.refCount == 0 { closeHandle(h) }
    }

    /// Runs `body` with the VDI's handle (nil when no connection has it attached); the
    /// caller holds the family lock, so no connection attaches or detaches it meanwhile.
    func withHandle<T>(_ uuid: String, _ body: (VDIHandle?) throws -> T) rethrows -> T {
        closeLingering(uuid)
        return try body(lookUp(uuid))
    }

    /// Runs `body` with the VDI's open handle, a lingering one included (nil when none is
    /// open): for reading or merging its change log, which does not need the VDI
    /// unattached and so keeps the linger.
    func withOpenHandle<T>(_ uuid: String, _ body: (VDIHandle?) throws -> T) rethrows -> T {
        guard let fam = try? anyRecord(uuid)?.family else { return try body(lookUp(uuid)) }
        return try withFamilyLock(fam) { try body(lookUp(uuid)) }
    }

    /// The open handles, for tests and diagnostics.
    func withHandlesLocked<T>(_ body: ([String: VDIHandle]) -> T) -> T {
        handlesLock.lock(); defer { handlesLock.unlock() }
        return body(handles)
    }

    /// Whether a connection has the VDI attached (a lingering handle is closed first).
    public func isAttached(_ uuid: String) -> Bool {
        guard let fam = try? anyRecord(uuid)?.family else { return lookUp(uuid) != nil }
        return withFamilyLock(fam) {
            closeLingering(uuid)
            return lookUp(uuid) != nil
        }
    }

    /// The open handles of a family's VDIs (family lock held).
    func openHandles(family: String) -> [VDIHandle] {
        handlesLock.lock(); defer { handlesLock.unlock() }
        return handles.values.filter { $0.family == family }
    }
}
