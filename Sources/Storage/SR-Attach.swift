// Attaching a VDI for I/O: one shared handle per VDI, kept open for `attachLingerSeconds`
// after its last connection; family locks; the handles table.

import Foundation
import Image
import Locking

/// One recursive lock per family (chain tree), made on first use.
final class FamilyLocks: Sendable {
    private let locks = Mutex<[String: NSRecursiveLock]>([:])

    func lock(_ family: String) -> NSRecursiveLock {
        locks.withLock { locks in
            if let l = locks[family] { return l }
            let l = NSRecursiveLock()
            l.name = "family \(family)"
            locks[family] = l
            return l
        }
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
    /// With `grant` (a connection's token), the connection joins that token's attachment,
    /// and a second read-write attachment of a VDI that is not sharable is refused.
    public func attach(_ uuid: String, familyHint: String? = nil, grant: ExportGrant? = nil) throws -> VDIHandle {
        let u = try SR.validUUID(uuid)
        var hint = familyHint
        while true {
            let family: String
            if let h = hint { family = h } else {
                guard let f = try anyRecord(u)?.family else { throw StorageError.vdiMissing(uuid: u) }
                family = f
            }
            if let h = try attach(u, inFamily: family, grant: grant) { return h }
            hint = nil
        }
    }

    /// Opens a VDI's chain read-only from its files (a copy's or an export's source),
    /// under its family lock: a merge switches files under that lock, so the chain opened
    /// is whole (a leaf read before a switch and its parent looked up after it is not).
    /// Once open, the files stay readable through their descriptors whatever is renamed.
    func openForReading(_ uuid: String) throws -> any DiskImage {
        while true {
            guard let family = try anyRecord(uuid)?.family else { throw StorageError.vdiMissing(uuid: uuid) }
            let chain = try withFamilyLock(family) { () throws -> (any DiskImage)? in
                guard try anyRecord(uuid)?.family == family else { return nil }
                return try format(of: uuid).open(path: imagePath(uuid), writable: false)
            }
            if let chain { return chain }
        }
    }

    /// Nil if `u` is no longer of `family`.
    private func attach(_ u: String, inFamily family: String, grant: ExportGrant?) throws -> VDIHandle? {
        try withFamilyLock(family) {
            let r = try storedRecord(u)
            guard r.family == family else { return nil }
            if let g = grant {
                if let other = conflictingAttachment(r, grant: g) {
                    throw StorageError.vdiInUse(uuid: u, operation: "read-write attachment (attached read-write by \(other.token); the VDI is not sharable)")
                }
                if let full = connectionLimitReached(u, grant: g) { throw StorageError.vdiInUse(uuid: u, operation: "\(full)") }
            }
            let h: VDIHandle
            if let g = grant, needsOverlay(r, grant: g) { h = try openOverlay(r, grant: g) } else { h = try openOrShare(r) }
            if let g = grant { joinAttachment(u, grant: g) }
            return h
        }
    }

    /// The handle for a record read under its family lock: the open one, or a new one.
    private func openOrShare(_ r: VDIRecord) throws -> VDIHandle {
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
        do { chain = try format(of: r.uuid).open(path: imagePath(r.uuid), writable: writable) } catch {
            throw StorageError.vdiIOError(uuid: r.uuid, detail: "\(error)")
        }
        let h = VDIHandle(uuid: r.uuid, family: r.family, chain: chain)
        h.refCount = 1
        h.tracker = mergeTrackers.withLock { $0[r.uuid] }
        if writable { attachCBT(r, handle: h) }
        handlesLock.lock()
        handles[r.uuid] = h
        handlesLock.unlock()
        return h
    }

    // MARK: attachments

    /// A live attachment as the record shows it (`nbd_attachments`).
    public struct Attachment: Codable, Sendable, Equatable {
        public var token: String
        public var readOnly: Bool
        public var mode: AttachMode
        public var connections: Int
        public var since: Date
        enum CodingKeys: String, CodingKey { case token, readOnly = "read_only", mode, connections, since }
    }

    public func attachments(of uuid: String) -> [Attachment] {
        attachmentTable.withLock { Array(($0[uuid] ?? [:]).values) }.sorted { $0.since < $1.since }
    }

    /// Another token's read-write attachment that `g` may not join (nil: none). A VDI that
    /// is not sharable has one read-write attachment at most; read-only tokens, snapshots
    /// and scratch views (whose writes never reach the VDI) are never refused by this.
    func conflictingAttachment(_ r: VDIRecord, grant g: ExportGrant) -> Attachment? {
        guard !g.readOnly, g.mode == .direct, !r.sharable, !r.isASnapshot else { return nil }
        return attachmentTable.withLock { t in
            (t[r.uuid] ?? [:]).first { $0.key != g.digest && !$0.value.readOnly && $0.value.mode == .direct }?.value
        }
    }

    /// The refusal for one more connection of `g` to `u` when a limit is reached (nil: room).
    func connectionLimitReached(_ u: String, grant g: ExportGrant) -> ExportRefusal? {
        guard maxConnectionsPerExport != nil || maxConnectionsPerToken != nil else { return nil }
        return attachmentTable.withLock { t in
            let mine = t[u] ?? [:]
            if let n = maxConnectionsPerToken, (mine[g.digest]?.connections ?? 0) >= n {
                return .tooManyConnections(uuid: u, limit: n, perToken: true)
            }
            if let n = maxConnectionsPerExport, mine.values.reduce(0, { $0 + $1.connections }) >= n {
                return .tooManyConnections(uuid: u, limit: n, perToken: false)
            }
            return nil
        }
    }

    func joinAttachment(_ u: String, grant g: ExportGrant) {
        attachmentTable.withLock { t in
            var a = t[u]?[g.digest] ?? Attachment(token: g.label, readOnly: g.readOnly, mode: g.mode, connections: 0, since: Date())
            a.connections += 1
            t[u, default: [:]][g.digest] = a
        }
    }

    func leaveAttachment(_ u: String, digest: String) {
        attachmentTable.withLock { t in
            guard var a = t[u]?[digest] else { return }
            a.connections -= 1
            if a.connections <= 0 { t[u]?[digest] = nil } else { t[u]?[digest] = a }
            if t[u]?.isEmpty == true { t[u] = nil }
        }
    }

    /// Lets go of one hold of `h`. False (nothing done) when this SR's table no longer
    /// holds it: a migration moved it to another SR, whose `detach` the pool calls.
    @discardableResult
    public func detach(_ h: VDIHandle, grant: ExportGrant? = nil, force: Bool = false) -> Bool {
        withFamilyLock(h.family) {
            guard force || lookUp(h.key) === h else { return false }
            if let g = grant { leaveAttachment(h.uuid, digest: g.digest) }
            h.refCount -= 1
            guard h.refCount == 0 else { return true }
            if h.overlayPath != nil {
                closeOverlay(h)
                return true
            }
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
            return true
        }
    }

    func lookUp(_ uuid: String) -> VDIHandle? {
        handlesLock.lock(); defer { handlesLock.unlock() }
        return handles[uuid]
    }

    /// Starts tracking every write to `uuid`, on its open handle and on any opened later
    /// (a merge or a migration copies them again), and runs `open` (the view it copies
    /// from) under the family lock right after: the view sees every write made before it
    /// opens (the seam's promise), so it misses nothing untracked.
    func startTracking<T>(_ uuid: String, family: String, then open: () throws -> T) throws -> (ChangeTracker, T) {
        let tracker = ChangeTracker()
        let view = try withFamilyLock(family) { () throws -> T in
            mergeTrackers.withLock { $0[uuid] = tracker }
            do {
                if let h = lookUp(uuid) { h.paused { _ in h.tracker = tracker } }
                return try open()
            } catch {
                stopTracking(uuid, family: family, tracker)
                throw error
            }
        }
        return (tracker, view)
    }

    func stopTracking(_ uuid: String, family: String, _ tracker: ChangeTracker) {
        withFamilyLock(family) {
            mergeTrackers.withLock { if $0[uuid] === tracker { $0[uuid] = nil } }
            if let h = lookUp(uuid), h.tracker === tracker { h.paused { _ in h.tracker = nil } }
        }
    }

    /// Closes a handle no connection holds (family lock held).
    func closeHandle(_ h: VDIHandle) {
        precondition(h.refCount == 0)
        h.close()
        handlesLock.lock()
        if handles[h.key] === h { handles[h.key] = nil }
        handlesLock.unlock()
    }

    /// At a clean stop, after the connections have gone: closes every handle none holds
    /// (the lingering ones), so each image is closed as a clean stop leaves it (a qcow2
    /// file's dirty bit is cleared).
    public func closeIdleHandles() {
        for h in withHandlesLocked({ Array($0.values) }) {
            withFamilyLock(h.family) {
                if h.refCount == 0, lookUp(h.key) === h { closeHandle(h) }
            }
        }
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

    /// Whether a connection has the VDI attached, an overlay attachment included (a
    /// lingering handle is closed first).
    public func isAttached(_ uuid: String) -> Bool {
        guard let fam = try? anyRecord(uuid)?.family else { return lookUp(uuid) != nil || hasOverlays(uuid) }
        return withFamilyLock(fam) {
            closeLingering(uuid)
            return lookUp(uuid) != nil || hasOverlays(uuid)
        }
    }

    /// The open handles of a family's VDIs (family lock held).
    func openHandles(family: String) -> [VDIHandle] {
        handlesLock.lock(); defer { handlesLock.unlock() }
        return handles.values.filter { $0.family == family }
    }
}
