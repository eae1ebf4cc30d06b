// Design notes: the storage repository.
//
// The SR is a directory of image files (`<uuid>.vhd`) plus `metadata.db` (SQLite via
// GRDB) and `journal/`. The files are the truth about data and parentage; the database
// holds the XenAPI record fields. Every operation orders its steps so a crash leaves
// either the old state or the new one, and never a record that names a missing file:
//   create:   write the image (fsync), then insert the record.
//   snapshot: hard-link the leaf to a new hidden base, write the new leaf as
//             `<vdi>.vhd.new` and the snapshot's file (both children of the base), rename
//             the new leaf over `<vdi>.vhd` (atomic), then commit the records. Before the
//             rename nothing visible changed; after it the chain reads the same bytes.
//   destroy:  delete the record, then the file; the collector removes any hidden base
//             left childless.
//   coalesce and garbage collection: journalled chain edits (see Journal, Collector).
// `recover()` runs at start-up and finishes or undoes what a crash interrupted.
//
// Locking: operations lock the VDI's family (the tree of files it shares with its
// snapshots and bases, see `VDIRecord.family`), so work on one tree never waits for work
// on another; the handles table has its own short lock; a handle's gate holds its I/O off
// while its chain changes. Order: family, then gate, then the handles table.

import CBT
import Foundation
import GRDB
import Logging
import Image
import Locking

/// Where clients reach the NBD server; filled in by the server at start-up.
public struct NBDEndpoint: Sendable, Equatable {
    public var address: String
    public var port: Int
    public init(address: String, port: Int) {
        self.address = address
        self.port = port
    }
}

/// One `get_nbd_info` record: XenAPI's `vdi_nbd_server_info` fields, and `uri`, the NBD
/// URI libnbd's tools (nbdinfo, nbdcopy, nbdsh, fio's nbd engine) take as it is: the
/// export name percent-encoded, and with TLS on, `tls-certificates=<the server's
/// certificate directory>` in the query (libnbd then trusts its CA; nbdinfo 1.14 has no
/// `--tls-certificates` option).
public struct NBDInfoRecord: Codable, Sendable, Equatable {
    public var exportname: String
    public var address: String
    public var port: Int
    public var cert: String
    public var subject: String
    public var uri: String
    /// The HTTP export URL of the VDI with this token (empty when HTTP is off).
    public var http: String = ""

    init(exportname: String, address: String, port: Int, cert: String, subject: String, certificatesDirectory: String?) {
        self.exportname = exportname
        self.address = address
        self.port = port
        self.cert = cert
        self.subject = subject
        let host = address.contains(":") ? "[\(address)]" : address
        // The path after the first "/" is the export name; "?" inside it must be encoded.
        let name = exportname.replacingOccurrences(of: "%", with: "%25").replacingOccurrences(of: "?", with: "%3F")
        var u = "\(cert.isEmpty ? "nbd" : "nbds")://\(host):\(port)/\(name)"
        if !cert.isEmpty, let dir = certificatesDirectory {
            var allowed = CharacterSet.urlQueryAllowed
            allowed.remove(charactersIn: "&=+?#")
            u += "?tls-certificates=" + (dir.addingPercentEncoding(withAllowedCharacters: allowed) ?? dir)
        }
        self.uri = u
    }
}

public final class SR: @unchecked Sendable {
    // Unchecked: `handles` changes under `handlesLock`; `collector` and `pool` are set once
    // while the SR opens, and `attachLingerSeconds`, `onTokensRevoked` and `endpoints`
    // before serving starts; every other stored property is a let or a Mutex.
    public let path: String
    let db: DatabaseQueue
    let logger: Logger
    /// The format new VDIs are made in unless they ask for another (the first of
    /// `supportedImageFormats`). Each VDI's own is `format(of:)` (SR-Formats.swift).
    public let format: any ImageFormat
    /// The formats this SR holds (`supported_image_formats`), the default first.
    public let supportedImageFormats: [any ImageFormat]
    /// Made at the SR's first open and kept (`SR-Identity.swift`).
    public let uuid: String
    /// VDI uuid -> its format's name, as found (a uuid's format never changes).
    let formatCache = Mutex<[String: String]>([:])
    /// One lock per chain tree (see the design notes).
    let families = FamilyLocks()
    /// Open handles by VDI uuid.
    var handles: [String: VDIHandle] = [:]
    /// Held only while `handles` is read or changed.
    let handlesLock = NSLock()
    /// Chain edits in progress, redone or undone at start-up.
    let journal: Journal
    /// The background coalesce and garbage collector (started by `startCollector`).
    public private(set) var collector: Collector!
    /// Long operations run as tasks (one table for all the SRs a server hosts).
    public let tasks: TaskTable
    /// The SRs served beside this one (set by `Pool`): a VDI migrated to another SR keeps
    /// its change-log chain, whose earlier links stay here.
    public internal(set) weak var pool: Pool?
    /// Leaf merges and migrations in progress: every handle of the VDI records its writes
    /// here. Set and cleared under the VDI's family lock, but one table for every family,
    /// so a Mutex of its own (two families' merges may start at once).
    let mergeTrackers = Mutex<[String: ChangeTracker]>([:])
    /// Families the collector leaves alone (a migration's), and the one it works on now.
    struct FamilyWork { var held: Set<String> = []; var performing: String? }
    let familyWork = Mutex(FamilyWork())
    /// Live attachments: VDI uuid -> token digest -> what the record shows.
    let attachmentTable = Mutex<[String: [String: Attachment]]>([:])
    /// Called with the digests of the tokens `revokeTokens` revoked: the server closes their connections.
    public var onTokensRevoked: (@Sendable (Set<String>) -> Void)?
    /// CBT ancestry by VDI, with the `ChangeLog.generation` it was read at.
    let ancestryCache = Mutex<[String: (generation: Int, ancestors: [String])]>([:])
    /// How long a VDI's open chain outlives its last connection, so a client that connects
    /// again (a backup agent opens several in a row) does not reopen and recheck every
    /// layer. A lingering handle is flushed and its change log marked consistent, as at
    /// any detach; a control operation on the VDI closes it first, so those see exactly
    /// an unattached VDI. Zero closes at the last detach.
    public var attachLingerSeconds: Double = 10
    let lingerQueue = DispatchQueue(label: "vdinbd.sr.linger")

    public var endpoints: [NBDEndpoint] = []
    /// Where the HTTP transfers listen ("http://127.0.0.1:10810"), nil when off.
    public var httpBase: String?
    /// Fault injection for the crash tests: called with the bytes an import has written
    /// onto its VDI so far, through the handle.
    public var importWriteHook: ((UInt64) -> Void)?
    var tlsIdentity = (pem: "", subject: "")
    let tlsIdentityLock = NSLock()

    /// What `get_nbd_info` hands out as `cert` and `subject`; replaced on certificate reload.
    /// The directory holding the server's CA (absolute), for the `uri` of `get_nbd_info`.
    public var certificatesDirectory: String? {
        get { tlsIdentityLock.lock(); defer { tlsIdentityLock.unlock() }; return certsDir }
        set { tlsIdentityLock.lock(); certsDir = newValue; tlsIdentityLock.unlock() }
    }
    private var certsDir: String?

    public func setTLSIdentity(certificatePEM: String, subject: String) {
        tlsIdentityLock.lock(); defer { tlsIdentityLock.unlock() }
        tlsIdentity = (certificatePEM, subject)
    }
    /// How long a token lives unless asked otherwise (nil: until revoked).
    public var defaultTokenLifetime: TimeInterval? = nil
    /// Most NBD connections at once to one VDI (all its tokens) and through one token
    /// (`--max-connections-per-export`, `--max-connections-per-token`); nil: no limit.
    public var maxConnectionsPerExport: Int? = nil
    public var maxConnectionsPerToken: Int? = nil

    public static let databaseName = "metadata.db"

    /// Opens (creating if need be) the SR at `path` and recovers what a crash interrupted.
    /// The collector does not run until `startCollector()`.
    /// `supportedFormats` (the default first) is kept in the SR's configuration; without
    /// it, the formats kept there, else every format this build knows. `format` puts one
    /// first.
    public init(path: String, logger: Logger = Logger(label: "vdinbd.sr"), format: (any ImageFormat)? = nil,
                supportedFormats: [any ImageFormat]? = nil, tasks: TaskTable = TaskTable()) throws {
        _ = StorageMetrics.installed
        self.tasks = tasks
        self.path = URL(fileURLWithPath: path).standardizedFileURL.path
        self.logger = logger
        self.journal = Journal(directory: self.path + "/journal")
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
        let key = SR.imageFormatsKey
        let stored = try? db.read { try String.fetchOne($0, sql: "SELECT value FROM sr_config WHERE key = ?", arguments: [key]) }
        var formats = supportedFormats ?? stored.flatMap { try? SR.parseImageFormats($0) } ?? Formats.all
        if let f = format { formats = [f] + formats.filter { $0.name != f.name } }
        self.supportedImageFormats = formats
        self.format = formats[0]
        do { uuid = try SR.storedUUID(db) } catch {
            throw StorageError.srBackendFailure(detail: "cannot read the SR's uuid: \(error)")
        }
        if supportedFormats != nil || format != nil {
            let text = formats.map(\.name).joined(separator: "+")
            do {
                try db.write { try $0.execute(sql: "INSERT OR REPLACE INTO sr_config (key, value) VALUES (?, ?)", arguments: [key, text]) }
            } catch {
                throw StorageError.srBackendFailure(detail: "cannot keep the SR's image formats: \(error)")
            }
        }
        collector = Collector(sr: self)
        do { try journal.prepare() } catch {
            throw StorageError.srBackendFailure(detail: "cannot open the journal in \(self.path): \(error)")
        }
        try recoverJournal()
        try recover()
        checkCBTLogs()
        finishImportCommits()
    }

    /// Starts the background collector (the server does at boot; tests may not).
    public func startCollector() { collector.start() }

    /// The image file of a VDI or hidden base.
    public func imagePath(_ uuid: String) -> String { imagePath(uuid, format: format(of: uuid)) }

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
        do { return try db.write(body) } catch let e as StorageError { throw e }
        catch let e as DatabaseError where e.resultCode == .SQLITE_FULL {
            // The file system is full: said as plainly as an image file's ENOSPC is.
            throw StorageError.srBackendFailure(detail: "no space left in the SR for its records: \(e.message ?? "\(e)")")
        } catch {
            throw StorageError.srBackendFailure(detail: "\(error)")
        }
    }

    public func record(_ uuid: String) throws -> VDIRecord {
        filledIn(try storedRecord(uuid))
    }

    /// The record as stored, without the fields computed from the files (for the paths
    /// that run at every attach: the depth walk reads one row per layer).
    func storedRecord(_ uuid: String) throws -> VDIRecord {
        let u = try SR.validUUID(uuid)
        guard let r = try dbRead({ try VDIRecord.fetchOne($0, key: u) }), r.managed else {
            throw StorageError.vdiMissing(uuid: u)
        }
        return r
    }

    public func allRecords() throws -> [VDIRecord] {
        let all = try dbRead { try VDIRecord.order(Column("created")).fetchAll($0) }
        let byUUID = Dictionary(all.map { ($0.uuid, $0) }, uniquingKeysWith: { a, _ in a })
        return all.filter(\.managed).map { filledIn($0, records: byUUID) }
    }

    /// Any row, hidden bases included (nil when there is none).
    func anyRecord(_ uuid: String) throws -> VDIRecord? {
        try dbRead { try VDIRecord.fetchOne($0, key: uuid) }
    }

    /// The fields computed from the files: `physical_utilisation`, and in `sm_config` the
    /// parent (`vhd-parent`, as XenServer names it) and the chain's depth.
    func filledIn(_ rec: VDIRecord, records: [String: VDIRecord]? = nil) -> VDIRecord {
        var r = rec
        r.physicalUtilisation = r.type == .cbtMetadata ? 0 : allocatedBytes(imagePath(r.uuid))
        guard r.type != .cbtMetadata else { return r }
        let lookup: (String) -> VDIRecord? = { u in records.map { $0[u] } ?? (try? self.anyRecord(u)) }
        let f = format(of: r.uuid)
        r.smConfig["image-format"] = f.name
        if f.holdsChains { r.smConfig["\(f.name)-parent"] = r.parent }
        var depth = 1, cur = r.parent
        while let p = cur, depth < 1000, let pr = lookup(p) { depth += 1; cur = pr.parent }
        r.smConfig["chain-depth"] = String(depth)
        return r
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

    /// A requested disk size as the image will hold it: 1 byte up to the format's limit
    /// (2040 GiB for VHD), rounded up to whole sectors as XenServer does.
    func diskSize(_ requested: UInt64, field: String, format f: any ImageFormat) throws -> UInt64 {
        let max = f.maxVirtualSize
        guard requested > 0, requested <= max else {
            throw StorageError.valueNotSupported(field: field, value: String(requested),
                                                 reason: "must be between 1 byte and \(max >> 30) GiB for \(f.name)")
        }
        return (requested + 511) / 512 * 512
    }

    public func create(_ p: CreateParams) throws -> VDIRecord {
        guard p.virtualSize > 0 else {
            throw StorageError.valueNotSupported(field: "virtual_size", value: "0", reason: "must be at least 1 byte")
        }
        let f = try formatForNewVDI(smConfig: p.smConfig, size: p.virtualSize)
        let size = try diskSize(p.virtualSize, field: "virtual_size", format: f)
        let uuid = UUID().uuidString.lowercased()
        do {
            try f.create(path: imagePath(uuid, format: f), size: size)
            remember(uuid, f)
        } catch {
            throw StorageError.vdiIOError(uuid: uuid, detail: "\(error)")
        }
        try syncDirectory()
        var r = VDIRecord(uuid: uuid, nameLabel: p.nameLabel, nameDescription: p.nameDescription, virtualSize: size)
        r.sharable = p.sharable
        r.readOnly = p.readOnly
        r.otherConfig = p.otherConfig
        r.smConfig = p.smConfig
        r.smConfig["image-format"] = f.name
        r.tags = p.tags
        let rec = r
        do {
            try dbWrite { try rec.insert($0) }
        } catch {
            try? FileManager.default.removeItem(atPath: imagePath(uuid))
            throw error
        }
        logger.info("created VDI \(uuid) (\(size) bytes)")
        return try record(uuid)
    }

    /// Grows a VDI (offline, as XenServer's `VDI.resize`): its change log first, then the
    /// leaf VHD, then the record. Each step leaves a usable VDI if the next never happens: a
    /// log larger than the disk only has clear bits past its end, and `recover()` takes the
    /// size from the VHD if the record was not updated.
    public func resize(_ uuid: String, size requested: UInt64) throws -> VDIRecord {
        let u = try SR.validUUID(uuid)
        return try withFamily(of: u) { r in
            if r.type == .cbtMetadata { throw StorageError.vdiIncompatibleType(uuid: u, type: r.type.rawValue) }
            if r.isASnapshot || !r.managed {
                throw StorageError.operationNotAllowed(reason: "VDI \(u) is a snapshot; only a VDI's current state can be resized")
            }
            if r.readOnly { throw StorageError.vdiReadonly(uuid: u) }
            let size = try diskSize(requested, field: "size", format: format(of: u))
            guard size >= r.virtualSize else {
                throw StorageError.valueNotSupported(field: "size", value: String(requested),
                                                     reason: "shrinking is not allowed (the VDI is \(r.virtualSize) bytes)")
            }
            // The family lock is held throughout, so no client attaches while the files change.
            if isAttached(u) { throw StorageError.vdiInUse(uuid: u, operation: "resize") }
            if size == r.virtualSize { return r }
            if r.cbtEnabled {
                do { try ChangeLog.grow(path: cbtLogPath(u), to: size) } catch {
                    throw StorageError.vdiIOError(uuid: u, detail: "growing the change log: \(error)")
                }
                try syncDirectory()
            }
            do { try format(of: u).grow(path: imagePath(u), to: size) } catch {
                throw StorageError.vdiIOError(uuid: u, detail: "\(error)")
            }
            var grown = r
            grown.virtualSize = size
            try save(grown)
            logger.info("resized VDI \(u) from \(r.virtualSize) to \(size) bytes")
            collector.kick()
            return try record(u)
        }
    }

    func syncDirectory() throws {
        let fd = open(path, O_RDONLY | O_DIRECTORY)
        guard fd >= 0 else { throw StorageError.srBackendFailure(detail: "open \(path): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        fsync(fd)
    }

    /// Changes a VDI's record fields (not its files) under its family lock.
    public func updateRecord(_ uuid: String, _ change: (inout VDIRecord) throws -> Void) throws {
        try withFamily(of: uuid) { r in
            var rr = r
            try change(&rr)
            for k in SR.computedSMConfigKeys { rr.smConfig[k] = nil }
            rr.physicalUtilisation = 0
            try save(rr)
        }
        collector.kick()
    }

    // MARK: SR configuration

    /// The SR's `other_config` (`gc=false` stops the collector).
    public func otherConfig() throws -> [String: String] {
        let rows = try dbRead { try Row.fetchAll($0, sql: "SELECT key, value FROM sr_config") }
        return Dictionary(rows.map { ($0["key"] as String, $0["value"] as String) }.filter { !SR.ownKeys.contains($0.0) },
                          uniquingKeysWith: { a, _ in a })
    }

    public func addToOtherConfig(key: String, value: String) throws {
        try notOwnKey(key)
        try dbWrite { try $0.execute(sql: "INSERT OR REPLACE INTO sr_config (key, value) VALUES (?, ?)", arguments: [key, value]) }
        collector.kick()
    }

    /// The SR's own fields share the table: other_config cannot name them.
    func notOwnKey(_ key: String) throws {
        guard !SR.ownKeys.contains(key) else {
            throw StorageError.valueNotSupported(field: "other_config", value: key, reason: "\(key) is a field of the SR, not an other_config key")
        }
    }

    public func removeFromOtherConfig(key: String) throws {
        try notOwnKey(key)
        try dbWrite { try $0.execute(sql: "DELETE FROM sr_config WHERE key = ?", arguments: [key]) }
        collector.kick()
    }
}
