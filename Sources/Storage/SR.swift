// Design notes: the storage repository.
//
// The SR is a directory of `<uuid>.vhd` files plus `metadata.db` (SQLite via GRDB). The
// files are the truth about data and parentage; the database holds the XenAPI record
// fields. Every operation orders its steps so a crash leaves either the old state or the
// new one, and never a record that names a missing file:
//   create:   write the VHD (fsync), then insert the record.
//   snapshot: hard-link the leaf to a new hidden base, write the new leaf as
//             `<vdi>.vhd.new` and the snapshot's file (both children of the base), rename
//             the new leaf over `<vdi>.vhd` (atomic), then commit the records. Before the
//             rename nothing visible changed; after it the chain reads the same bytes.
//   destroy:  delete the record, then the file, then any hidden base left childless.
// `recover()` runs at start-up and finishes or undoes what a crash interrupted.

import CBT
import Foundation
import GRDB
import Logging
import VHD

/// Where clients reach the NBD server; filled in by the server at start-up.
public struct NBDEndpoint: Sendable, Equatable {
    public var address: String
    public var port: Int
    public init(address: String, port: Int) {
        self.address = address
        self.port = port
    }
}

/// One `get_nbd_info` record.
public struct NBDInfoRecord: Codable, Sendable, Equatable {
    public var exportname: String
    public var address: String
    public var port: Int
    public var cert: String
    public var subject: String
}

public final class SR: @unchecked Sendable {
    public let path: String
    let db: DatabaseQueue
    let logger: Logger
    /// Serialises metadata-changing operations.
    let opLock = NSLock()
    /// Open handles by VDI uuid.
    var handles: [String: VDIHandle] = [:]
    /// Held while a handle is looked up, attached, detached or has its files changed under it.
    /// Recursive: an operation holding it may look up a neighbour's handle (CBT merges).
    let handlesLock = NSRecursiveLock()
    /// How long a VDI's open chain outlives its last connection, so a client that connects
    /// again (a backup agent opens several in a row) does not reopen and recheck every
    /// layer. A lingering handle is flushed and its change log marked consistent, as at
    /// any detach; a control operation on the VDI closes it first, so those see exactly
    /// an unattached VDI. Zero closes at the last detach.
    public var attachLingerSeconds: Double = 10
    private let lingerQueue = DispatchQueue(label: "vdinbd.sr.linger")

    public var endpoints: [NBDEndpoint] = []
    private var tlsIdentity = (pem: "", subject: "")
    private let tlsIdentityLock = NSLock()

    /// What `get_nbd_info` hands out as `cert` and `subject`; replaced on certificate reload.
    public func setTLSIdentity(certificatePEM: String, subject: String) {
        tlsIdentityLock.lock(); defer { tlsIdentityLock.unlock() }
        tlsIdentity = (certificatePEM, subject)
    }
    /// How long a token lives unless asked otherwise (nil: until revoked).
    public var defaultTokenLifetime: TimeInterval? = nil

    public static let databaseName = "metadata.db"

    public init(path: String, logger: Logger = Logger(label: "vdinbd.sr")) throws {
        self.path = URL(fileURLWithPath: path).standardizedFileURL.path
        self.logger = logger
        let fm = FileManager.default
        do {
            try fm.createDirectory(atPath: self.path, withIntermediateDirectories: true,
                                   attributes: [.posixPermissions: 0o700])
            var config = Configuration()
            config.busyMode = .timeout(10)
            db = try DatabaseQueue(path: self.path + "/" + SR.databaseName, configuration: config)
            try Schema.migrator().migrate(db)
        } catch {
            throw StorageError.srBackendFailure(detail: "cannot open SR at \(self.path): \(error)")
        }
        try recover()
        checkCBTLogs()
    }

    public func vhdPath(_ uuid: String) -> String { "\(path)/\(uuid).vhd" }

    // MARK: records

    public static func validUUID(_ s: String) throws -> String {
        guard let u = UUID(uuidString: s) else { throw StorageError.uuidInvalid(kind: "VDI", value: s) }
        return u.uuidString.lowercased()
    }

    func dbRead<T>(_ body: (Database) throws -> T) throws -> T {
        do { return try db.read(body) } catch let e as StorageError { throw e } catch {
            throw StorageError.srBackendFailure(detail: "\(error)")
        }
    }

    func dbWrite<T>(_ body: (Database) throws -> T) throws -> T {
        do { return try db.write(body) } catch let e as StorageError { throw e } catch {
            throw StorageError.srBackendFailure(detail: "\(error)")
        }
    }

    public func record(_ uuid: String) throws -> VDIRecord {
        let u = try SR.validUUID(uuid)
        guard var r = try dbRead({ try VDIRecord.fetchOne($0, key: u) }), r.managed else {
            throw StorageError.vdiMissing(uuid: u)
        }
        r.physicalUtilisation = allocatedBytes(vhdPath(u))
        return r
    }

    public func allRecords() throws -> [VDIRecord] {
        try dbRead { try VDIRecord.filter(Column("managed") == true).order(Column("created")).fetchAll($0) }
            .map { var r = $0; r.physicalUtilisation = allocatedBytes(vhdPath(r.uuid)); return r }
    }

    func allocatedBytes(_ p: String) -> UInt64 {
        var st = stat()
        guard stat(p, &st) == 0 else { return 0 }
        return UInt64(st.st_blocks) * 512
    }

    // MARK: operations

    public struct CreateParams: Sendable {
        public var nameLabel: String
        public var nameDescription: String = ""
        public var virtualSize: UInt64
        public var sharable = false
        public var readOnly = false
        public var otherConfig: [String: String] = [:]
        public var smConfig: [String: String] = [:]
        public var tags: [String] = []
        public init(nameLabel: String, virtualSize: UInt64) {
            self.nameLabel = nameLabel
            self.virtualSize = virtualSize
        }
    }

    /// A requested disk size as the VHD will hold it: 1 byte to 2040 GiB, rounded up to
    /// whole sectors as XenServer does.
    static func diskSize(_ requested: UInt64, field: String) throws -> UInt64 {
        guard requested > 0, requested <= VHDCreate.maxVirtualSize else {
            throw StorageError.valueNotSupported(field: field, value: String(requested), reason: "must be between 1 byte and 2040 GiB")
        }
        return (requested + 511) / 512 * 512
    }

    public func create(_ p: CreateParams) throws -> VDIRecord {
        let size = try SR.diskSize(p.virtualSize, field: "virtual_size")
        opLock.lock(); defer { opLock.unlock() }
        let uuid = UUID().uuidString.lowercased()
        do {
            try VHDCreate.createDynamic(path: vhdPath(uuid), size: size, uniqueID: UUID())
        } catch {
            throw StorageError.vdiIOError(uuid: uuid, detail: "\(error)")
        }
        try syncDirectory()
        var r = VDIRecord(uuid: uuid, nameLabel: p.nameLabel, nameDescription: p.nameDescription, virtualSize: size)
        r.sharable = p.sharable
        r.readOnly = p.readOnly
        r.otherConfig = p.otherConfig
        r.smConfig = p.smConfig
        r.tags = p.tags
        let rec = r
        do {
            try dbWrite { try rec.insert($0) }
        } catch {
            try? FileManager.default.removeItem(atPath: vhdPath(uuid))
            throw error
        }
        logger.info("created VDI \(uuid) (\(size) bytes)")
        return try record(uuid)
    }

    public func snapshot(_ uuid: String, driverParams: [String: String] = [:]) throws -> VDIRecord {
        let u = try SR.validUUID(uuid)
        opLock.lock(); defer { opLock.unlock() }
        var vdi = try record(u)
        guard vdi.type != .cbtMetadata else { throw StorageError.vdiIncompatibleType(uuid: u, type: vdi.type.rawValue) }
        if vdi.cbtEnabled && !isAttached(u) {
            // A damaged log is reported, not handed on to the snapshot.
            do { _ = try ChangeLog.open(path: cbtLogPath(u)) } catch {
                try disableCBTLocked(vdi, reason: "\(error)")
                vdi = try record(u)
            }
        }
        let baseUUID = UUID().uuidString.lowercased()
        let snapUUID = UUID().uuidString.lowercased()
        let leafPath = vhdPath(u), basePath = vhdPath(baseUUID), snapPath = vhdPath(snapUUID)
        let newLeafPath = leafPath + ".new"
        let now = Date()

        func swap(_ chain: VHDChain?) throws {
            do {
                try chain?.flush()
                guard link(leafPath, basePath) == 0 else {
                    throw StorageError.vdiIOError(uuid: u, detail: "link \(leafPath): \(String(cString: strerror(errno)))")
                }
                try VHDCreate.createDifferencing(path: snapPath, parentPath: basePath, now: now)
                try VHDCreate.createDifferencing(path: newLeafPath, parentPath: basePath, now: now)
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

        // No connection attaches or detaches the VDI while its files change under it.
        try withHandle(u) { handle in
            if let h = handle {
                try h.exclusively { old in
                    try swap(old)
                    old.close()
                    let chain: VHDChain
                    do {
                        chain = try VHDChain.open(path: leafPath, writable: true)
                    } catch {
                        throw StorageError.vdiIOError(uuid: u, detail: "reopening after snapshot: \(error)")
                    }
                    if vdi.cbtEnabled {
                        try snapshotCBT(vdi: u, snapshot: snapUUID, size: vdi.virtualSize, handle: h, writable: chain.writable)
                    }
                    return chain
                }
            } else {
                try swap(nil)
                if vdi.cbtEnabled {
                    try snapshotCBT(vdi: u, snapshot: snapUUID, size: vdi.virtualSize, handle: nil, writable: false)
                }
            }
        }

        var base = VDIRecord(uuid: baseUUID, nameLabel: "base copy", virtualSize: vdi.virtualSize)
        base.managed = false
        base.readOnly = true
        base.parent = vdi.parent
        var snap = VDIRecord(uuid: snapUUID, nameLabel: vdi.nameLabel, nameDescription: vdi.nameDescription,
                             virtualSize: vdi.virtualSize)
        snap.isASnapshot = true
        snap.snapshotOf = u
        snap.snapshotTime = now
        snap.readOnly = true
        snap.parent = baseUUID
        snap.otherConfig = vdi.otherConfig
        snap.smConfig = vdi.smConfig.merging(driverParams) { $1 }
        snap.tags = vdi.tags
        snap.cbtEnabled = vdi.cbtEnabled
        var leaf = vdi
        leaf.parent = baseUUID
        let (b, s, l) = (base, snap, leaf)
        try dbWrite { db in
            try b.insert(db)
            try s.insert(db)
            try l.update(db)
        }
        logger.info("snapshot \(snapUUID) of VDI \(u) (base \(baseUUID))")
        return try record(snapUUID)
    }

    public func destroy(_ uuid: String) throws {
        let u = try SR.validUUID(uuid)
        opLock.lock(); defer { opLock.unlock() }
        let r = try record(u)
        try withHandle(u) { h in
            if h != nil { throw StorageError.vdiInUse(uuid: u, operation: "destroy") }
            if r.cbtEnabled {
                if r.isASnapshot || r.type == .cbtMetadata { mergeCBTOnDestroy(r) } else { unlink(cbtLogPath(u)) }
            }
            try dbWrite { db in
                _ = try VDIRecord.deleteOne(db, key: u)
                _ = try TokenRecord.filter(Column("vdi_uuid") == u).deleteAll(db)
            }
            unlink(vhdPath(u))
        }
        try? syncDirectory()
        collectGarbage(from: r.parent)
        logger.info("destroyed VDI \(u)")
    }

    /// Grows a VDI (offline, as XenServer's `VDI.resize`): its change log first, then the
    /// leaf VHD, then the record. Each step leaves a usable VDI if the next never happens: a
    /// log larger than the disk only has clear bits past its end, and `recover()` takes the
    /// size from the VHD if the record was not updated.
    public func resize(_ uuid: String, size requested: UInt64) throws -> VDIRecord {
        let u = try SR.validUUID(uuid)
        opLock.lock(); defer { opLock.unlock() }
        let r = try record(u)
        if r.type == .cbtMetadata { throw StorageError.vdiIncompatibleType(uuid: u, type: r.type.rawValue) }
        if r.isASnapshot || !r.managed {
            throw StorageError.operationNotAllowed(reason: "VDI \(u) is a snapshot; only a VDI's current state can be resized")
        }
        if r.readOnly { throw StorageError.vdiReadonly(uuid: u) }
        let size = try SR.diskSize(requested, field: "size")
        guard size >= r.virtualSize else {
            throw StorageError.valueNotSupported(field: "size", value: String(requested),
                                                 reason: "shrinking is not allowed (the VDI is \(r.virtualSize) bytes)")
        }
        // Held throughout, so no client attaches while the files change.
        handlesLock.lock(); defer { handlesLock.unlock() }
        closeLingering(u)
        if handles[u] != nil { throw StorageError.vdiInUse(uuid: u, operation: "resize") }
        if size == r.virtualSize { return r }
        if r.cbtEnabled {
            do { try ChangeLog.grow(path: cbtLogPath(u), to: size) } catch {
                throw StorageError.vdiIOError(uuid: u, detail: "growing the change log: \(error)")
            }
            try syncDirectory()
        }
        do {
            let f = try VHDFile.open(path: vhdPath(u), writable: true)
            defer { f.close() }
            try f.grow(to: size)
        } catch {
            throw StorageError.vdiIOError(uuid: u, detail: "\(error)")
        }
        var grown = r
        grown.virtualSize = size
        try save(grown)
        logger.info("resized VDI \(u) from \(r.virtualSize) to \(size) bytes")
        return try record(u)
    }

    /// Deletes hidden bases that no longer have children, walking up the chain.
    func collectGarbage(from parent: String?) {
        var cur = parent
        while let p = cur {
            guard let rec = try? dbRead({ try VDIRecord.fetchOne($0, key: p) }), !rec.managed else { return }
            let children = (try? dbRead { try VDIRecord.filter(Column("parent") == p).fetchCount($0) }) ?? 1
            guard children == 0 else { return }
            _ = try? dbWrite { try VDIRecord.deleteOne($0, key: p) }
            unlink(vhdPath(p))
            logger.info("removed unreferenced base \(p)")
            cur = rec.parent
        }
    }

    // MARK: tokens and NBD info

    public func getNBDInfo(_ uuid: String, readOnly: Bool = false, lifetime: TimeInterval? = nil) throws -> [NBDInfoRecord] {
        let r = try record(uuid)
        guard r.type != .cbtMetadata else { throw StorageError.vdiIncompatibleType(uuid: r.uuid, type: r.type.rawValue) }
        var bytes = [UInt8](repeating: 0, count: 24)
        var rng = SystemRandomNumberGenerator()  // getrandom(2): the system CSPRNG
        for i in bytes.indices { bytes[i] = UInt8.random(in: 0...255, using: &rng) }
        let secret = Data(bytes).base64EncodedString()
            .replacingOccurrences(of: "+", with: "-").replacingOccurrences(of: "/", with: "_")
            .replacingOccurrences(of: "=", with: "")
        let life = lifetime ?? defaultTokenLifetime
        let tok = TokenRecord(secret: secret, vdiUUID: r.uuid, readOnly: readOnly || r.readOnly || r.isASnapshot,
                              expiresAt: life.map { Date().addingTimeInterval($0) }, revoked: false, created: Date())
        try dbWrite { try tok.insert($0) }
        let name = "/\(r.uuid)?token=\(secret)"
        tlsIdentityLock.lock()
        let id = tlsIdentity
        tlsIdentityLock.unlock()
        return endpoints.map {
            NBDInfoRecord(exportname: name, address: $0.address, port: $0.port, cert: id.pem, subject: id.subject)
        }
    }

    /// Revokes every token of a VDI, or the one named.
    public func revokeTokens(vdi uuid: String, exportName: String? = nil) throws -> Int {
        let u = try SR.validUUID(uuid)
        return try dbWrite { db in
            var q = TokenRecord.filter(Column("vdi_uuid") == u)
            if let n = exportName, let s = SR.secret(fromExportName: n) { q = q.filter(Column("secret") == s) }
            return try q.updateAll(db, Column("revoked").set(to: true))
        }
    }

    static func secret(fromExportName name: String) -> String? {
        guard let r = name.range(of: "?token=") else { return nil }
        return String(name[r.upperBound...])
    }

    public struct ExportGrant: Sendable {
        public var vdi: VDIRecord
        public var readOnly: Bool
    }

    public enum ExportRefusal: Error, Sendable, CustomStringConvertible {
        case malformed, unknown, expired, revoked, vdiGone
        public var description: String {
            switch self {
            case .malformed: return "export name is not of the form /<vdi-uuid>?token=<secret>"
            case .unknown: return "unknown export token"
            case .expired: return "export token expired"
            case .revoked: return "export token revoked"
            case .vdiGone: return "the VDI of this token no longer exists"
            }
        }
    }

    /// Checks an export name. The uuid part must match the token's VDI.
    public func resolve(exportName: String) -> Result<ExportGrant, ExportRefusal> {
        // The leading slash is optional: some URI parsers drop it.
        let name = exportName.hasPrefix("/") ? String(exportName.dropFirst()) : exportName
        guard let secret = SR.secret(fromExportName: name), !secret.isEmpty,
              let uuidPart = name.split(separator: "?").first
        else { return .failure(.malformed) }
        guard let tok = try? dbRead({ try TokenRecord.fetchOne($0, key: secret) }),
              tok.vdiUUID == uuidPart.lowercased()
        else { return .failure(.unknown) }
        if tok.revoked { return .failure(.revoked) }
        if let e = tok.expiresAt, e < Date() { return .failure(.expired) }
        guard let r = try? record(tok.vdiUUID), r.type != .cbtMetadata else { return .failure(.vdiGone) }
        return .success(ExportGrant(vdi: r, readOnly: tok.readOnly || r.readOnly))
    }

    // MARK: attach

    /// Opens (or shares) the VDI's chain for I/O.
    public func attach(_ uuid: String) throws -> VDIHandle {
        handlesLock.lock(); defer { handlesLock.unlock() }
        // Read under the lock: an operation that changes the record (snapshot, CBT,
        // destroy) holds it too, so attach sees the record as that operation left it.
        let r = try record(uuid)
        if let h = handles[r.uuid] {
            // A lingering handle is taken back: its log is in use again.
            if h.refCount == 0 {
                try? h.withCBT { try $0?.setConsistent(false) }
                logger.info("VDI \(r.uuid): its chain was still open (lingering); reused")
            }
            h.refCount += 1
            return h
        }
        let writable = !(r.readOnly || r.isASnapshot)
        do {
            let chain = try VHDChain.open(path: vhdPath(r.uuid), writable: writable)
            let h = VDIHandle(uuid: r.uuid, chain: chain)
            h.refCount = 1
            handles[r.uuid] = h
            if writable { attachCBT(r, handle: h) }
            return h
        } catch {
            throw StorageError.vdiIOError(uuid: r.uuid, detail: "\(error)")
        }
    }

    public func detach(_ h: VDIHandle) {
        handlesLock.lock(); defer { handlesLock.unlock() }
        h.refCount -= 1
        if h.refCount == 0 {
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
                    self.handlesLock.lock(); defer { self.handlesLock.unlock() }
                    if h.refCount == 0, h.lingerGeneration == generation, self.handles[h.uuid] === h { self.closeHandle(h) }
                }
            }
        }
    }

    /// Closes a handle no connection holds (handles lock held).
    private func closeHandle(_ h: VDIHandle) {
        precondition(h.refCount == 0)
        h.close()
        handles[h.uuid] = nil
    }

    /// Closes the VDI's handle if it is only lingering (handles lock held or taken here).
    func closeLingering(_ uuid: String) {
        handlesLock.lock(); defer { handlesLock.unlock() }
        if let h = handles[uuid], h.refCount == 0 { closeHandle(h) }
    }

    /// Runs `body` with the VDI's handle (nil when no connection has it attached) while no
    /// connection can attach or detach it. Lock order: `opLock`, then this, then a handle's gate.
    func withHandle<T>(_ uuid: String, _ body: (VDIHandle?) throws -> T) rethrows -> T {
        handlesLock.lock(); defer { handlesLock.unlock() }
        closeLingering(uuid)
        return try body(handles[uuid])
    }

    /// Runs `body` with the VDI's open handle, a lingering one included (nil when none is
    /// open), while no connection can attach or detach it: for reading or merging its
    /// change log, which does not need the VDI unattached and so keeps the linger.
    func withOpenHandle<T>(_ uuid: String, _ body: (VDIHandle?) throws -> T) rethrows -> T {
        handlesLock.lock(); defer { handlesLock.unlock() }
        return try body(handles[uuid])
    }

    /// The open handles, for tests and diagnostics.
    func withHandlesLocked<T>(_ body: ([String: VDIHandle]) -> T) -> T {
        handlesLock.lock(); defer { handlesLock.unlock() }
        return body(handles)
    }

    /// Whether a connection has the VDI attached (a lingering handle is closed first).
    public func isAttached(_ uuid: String) -> Bool {
        handlesLock.lock(); defer { handlesLock.unlock() }
        closeLingering(uuid)
        return handles[uuid] != nil
    }

    // MARK: recovery

    /// The SR uuid of the file a differencing VHD names as its parent.
    func parentUUID(ofFile path: String) -> String? {
        guard let f = try? VHDFile.open(path: path, writable: false, policy: .tolerate) else { return nil }
        defer { f.close() }
        guard f.diskType == .differencing, let p = try? VHDChain.findParent(of: f) else { return nil }
        return ((p as NSString).lastPathComponent as NSString).deletingPathExtension
    }

    func syncDirectory() throws {
        let fd = open(path, O_RDONLY | O_DIRECTORY)
        guard fd >= 0 else { throw StorageError.srBackendFailure(detail: "open \(path): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        fsync(fd)
    }

    /// Finishes or undoes operations a crash interrupted.
    func recover() throws {
        let fm = FileManager.default
        let names = (try? fm.contentsOfDirectory(atPath: path)) ?? []
        let known = Set(try dbRead { try String.fetchAll($0, sql: "SELECT uuid FROM vdi") })
        for n in names where n.hasSuffix(".vhd.new") {
            // The rename never happened, so the old leaf is intact: drop the half-made one.
            unlink("\(path)/\(n)")
            logger.warning("recovery: removed unfinished snapshot leaf \(n)")
        }
        var referenced = Set<String>()
        for u in known {
            if let p = parentUUID(ofFile: vhdPath(u)) { referenced.insert(p) }
        }
        for n in names where n.hasSuffix(".vhd") {
            let u = (n as NSString).deletingPathExtension
            guard !known.contains(u) else { continue }
            if referenced.contains(u) {
                // A snapshot's base whose records were not committed: keep it as a hidden base.
                var base = VDIRecord(uuid: u, nameLabel: "base copy", virtualSize: 0)
                if let f = try? VHDFile.open(path: vhdPath(u), writable: false, policy: .tolerate) {
                    base.virtualSize = f.virtualSize
                    f.close()
                }
                base.managed = false
                base.readOnly = true
                let b = base
                try dbWrite { try b.insert($0) }
                for child in known where parentUUID(ofFile: vhdPath(child)) == u {
                    if var r = try dbRead({ try VDIRecord.fetchOne($0, key: child) }), r.parent == nil {
                        r.parent = u
                        let rr = r
                        try dbWrite { try rr.update($0) }
                    }
                }
                logger.warning("recovery: adopted base \(u) of an interrupted snapshot")
            } else {
                logger.warning("recovery: \(n) has no record and no child; left in place")
            }
        }
        for u in known where !fm.fileExists(atPath: vhdPath(u)) {
            logger.error("recovery: VDI \(u) has no file \(vhdPath(u))")
        }
        // A resize that grew the VHD but crashed before the record: the file is the truth.
        let leaves = try dbRead { try VDIRecord.filter(Column("managed") == true && Column("is_a_snapshot") == false).fetchAll($0) }
        for var r in leaves where r.type != .cbtMetadata {
            guard let f = try? VHDFile.open(path: vhdPath(r.uuid), writable: false, policy: .tolerate) else { continue }
            let size = f.virtualSize
            f.close()
            if size != r.virtualSize {
                logger.warning("recovery: VDI \(r.uuid) record said \(r.virtualSize) bytes, its VHD \(size)")
                r.virtualSize = size
                let rr = r
                try dbWrite { try rr.update($0) }
            }
        }
    }
}
