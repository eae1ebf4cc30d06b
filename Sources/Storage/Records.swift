import Foundation
import GRDB

/// XenAPI's `vdi_type`: what a VDI is for. Stored and sent as its XenAPI name.
public enum VDIType: String, Codable, Sendable, CaseIterable, DatabaseValueConvertible {
    case system, user, ephemeral, suspend, crashdump, rrd, metadata, pvs
    case haStatefile = "ha_statefile"
    case redoLog = "redo_log"
    case pvsCache = "pvs_cache"
    /// A snapshot whose data `VDI.data_destroy` removed; only its change log is left.
    case cbtMetadata = "cbt_metadata"
}

/// XenAPI's `on_boot`: whether a VDI keeps its writes across a VM boot.
public enum OnBoot: String, Codable, Sendable, CaseIterable, DatabaseValueConvertible {
    case persist, reset
}

/// One VDI, with the fields of XenAPI's VDI class that apply to this SR.
/// Hidden base images that snapshots leave behind are rows with `managed == false`.
public struct VDIRecord: Codable, Equatable, Sendable, FetchableRecord, PersistableRecord {
    public static let databaseTableName = "vdi"

    public var uuid: String
    public var nameLabel: String
    public var nameDescription: String
    public var virtualSize: UInt64
    public var physicalUtilisation: UInt64
    /// `type`: `user` for disks, `cbt_metadata` after data_destroy.
    public var type: VDIType
    public var readOnly: Bool
    public var isASnapshot: Bool
    public var snapshotOf: String?
    public var snapshotTime: Date?
    public var sharable: Bool
    /// `allow_caching`: recorded for XenAPI clients (this server has no local cache SR).
    public var allowCaching: Bool
    /// `on_boot`: `persist` or `reset`.
    public var onBoot: OnBoot
    public var tags: [String]
    public var otherConfig: [String: String]
    public var smConfig: [String: String]
    /// The uuid of the VHD this one's chain continues in (a hidden base), if any.
    public var parent: String?
    public var managed: Bool
    public var cbtEnabled: Bool
    public var created: Date
    /// The chain tree this VDI's files belong to: a new VDI starts one (its own uuid), and
    /// snapshots and the hidden bases they leave inherit it. Operations that change files
    /// or parentage lock the family, so one tree's work never waits for another's.
    public var family: String

    enum CodingKeys: String, CodingKey, ColumnExpression {
        case uuid, nameLabel = "name_label", nameDescription = "name_description", virtualSize = "virtual_size"
        case physicalUtilisation = "physical_utilisation", type, readOnly = "read_only", isASnapshot = "is_a_snapshot"
        case snapshotOf = "snapshot_of", snapshotTime = "snapshot_time", sharable, onBoot = "on_boot", tags
        case otherConfig = "other_config", smConfig = "sm_config", parent, managed, cbtEnabled = "cbt_enabled", created
        case family, allowCaching = "allow_caching"
    }

    public init(uuid: String, nameLabel: String, nameDescription: String = "", virtualSize: UInt64) {
        self.uuid = uuid
        self.nameLabel = nameLabel
        self.nameDescription = nameDescription
        self.virtualSize = virtualSize
        self.physicalUtilisation = 0
        self.type = .user
        self.readOnly = false
        self.isASnapshot = false
        self.snapshotOf = nil
        self.snapshotTime = nil
        self.sharable = false
        self.allowCaching = false
        self.onBoot = .persist
        self.tags = []
        self.otherConfig = [:]
        self.smConfig = [:]
        self.parent = nil
        self.managed = true
        self.cbtEnabled = false
        self.created = Date()
        self.family = uuid
    }
}

/// How an export token's connections reach the VDI.
public enum AttachMode: String, Codable, Sendable, CaseIterable, DatabaseValueConvertible {
    /// Reads and writes go to the VDI itself (or read-only, as the token says).
    case direct
    /// Writes go to a throw-away overlay above the VDI: the VDI never changes.
    case scratch
}

/// An export token minted by `get_nbd_info`.
public struct TokenRecord: Codable, Equatable, Sendable, FetchableRecord, PersistableRecord {
    public static let databaseTableName = "token"
    /// The SHA-256 of the token's secret (`TokenDigest`): the secret itself is only ever
    /// in the export name handed to the caller.
    public var digest: String
    public var vdiUUID: String
    public var readOnly: Bool
    public var expiresAt: Date?
    public var revoked: Bool
    public var created: Date
    /// Shown in place of the secret (records, logs): random, or the caller's `label`.
    public var label: String
    /// `scratch`: writes go to an overlay dropped when the attachment ends (seeds 002/003).
    public var mode: AttachMode

    enum CodingKeys: String, CodingKey, ColumnExpression {
        case digest, vdiUUID = "vdi_uuid", readOnly = "read_only", expiresAt = "expires_at", revoked, created, label, mode
    }
}

enum Schema {
    static func migrator() -> DatabaseMigrator {
        var m = DatabaseMigrator()
        m.registerMigration("v1") { db in
            try db.create(table: "vdi") { t in
                t.primaryKey("uuid", .text)
                t.column("name_label", .text).notNull()
                t.column("name_description", .text).notNull()
                t.column("virtual_size", .integer).notNull()
                t.column("physical_utilisation", .integer).notNull()
                t.column("type", .text).notNull()
                t.column("read_only", .boolean).notNull()
                t.column("is_a_snapshot", .boolean).notNull()
                t.column("snapshot_of", .text)
                t.column("snapshot_time", .datetime)
                t.column("sharable", .boolean).notNull()
                t.column("on_boot", .text).notNull()
                t.column("tags", .text).notNull()
                t.column("other_config", .text).notNull()
                t.column("sm_config", .text).notNull()
                t.column("parent", .text)
                t.column("managed", .boolean).notNull()
                t.column("cbt_enabled", .boolean).notNull()
                t.column("created", .datetime).notNull()
            }
            try db.create(table: "token") { t in
                t.primaryKey("secret", .text)
                t.column("vdi_uuid", .text).notNull().indexed()
                t.column("read_only", .boolean).notNull()
                t.column("expires_at", .datetime)
                t.column("revoked", .boolean).notNull()
                t.column("created", .datetime).notNull()
            }
        }
        m.registerMigration("v2: families, SR config") { db in
            try db.alter(table: "vdi") { t in t.add(column: "family", .text).notNull().defaults(to: "") }
            // Each row's family is its root's uuid (a data-destroyed snapshot: its origin's).
            let rows = try Row.fetchAll(db, sql: "SELECT uuid, parent, snapshot_of FROM vdi")
            var parent: [String: String] = [:], origin: [String: String] = [:]
            for r in rows {
                let u: String = r["uuid"]
                if let p: String = r["parent"] { parent[u] = p }
                if let o: String = r["snapshot_of"] { origin[u] = o }
            }
            func root(_ u: String) -> String {
                var cur = u, seen = Set<String>()
                while let p = parent[cur], seen.insert(cur).inserted { cur = p }
                return cur
            }
            for r in rows {
                let u: String = r["uuid"]
                let f = parent[u] == nil && origin[u] != nil ? root(origin[u]!) : root(u)
                try db.execute(sql: "UPDATE vdi SET family = ? WHERE uuid = ?", arguments: [f, u])
            }
            try db.create(table: "sr_config") { t in
                t.primaryKey("key", .text)
                t.column("value", .text).notNull()
            }
        }
        m.registerMigration("v3: allow_caching, forgotten VDIs") { db in
            try db.alter(table: "vdi") { t in t.add(column: "allow_caching", .boolean).notNull().defaults(to: false) }
            // `VDI.forget` drops a record and keeps its file; `SR.scan` brings it back with
            // these fields instead of taking an empty file for a crash's leftover.
            try db.alter(table: "token") { t in
                t.add(column: "label", .text).notNull().defaults(to: "")
                t.add(column: "mode", .text).notNull().defaults(to: "direct")
            }
            // Its family stays pinned meanwhile: the collector plans from records, and the
            // file still reads through its bases.
            try db.create(table: "forgotten") { t in
                t.primaryKey("uuid", .text)
                t.column("name_label", .text).notNull()
                t.column("name_description", .text).notNull()
                t.column("family", .text).notNull()
            }
        }
        m.registerMigration("v4: tokens kept as digests") { db in
            try db.execute(sql: "ALTER TABLE token RENAME COLUMN secret TO digest")
            for s in try String.fetchAll(db, sql: "SELECT digest FROM token") {
                try db.execute(sql: "UPDATE token SET digest = ? WHERE digest = ?", arguments: [TokenDigest.of(s), s])
            }
        }
        return m
    }
}
