// The SR as XenAPI's SR class shows it: a uuid made at its first open and kept, a name,
// its path, the image formats it holds, and its space. Kept in `sr_config` beside the
// other_config keys, but not among them.

import Foundation
import GRDB

/// `SR.get_record`'s fields.
public struct SRRecord: Codable, Sendable, Equatable {
    public var uuid: String
    public var nameLabel: String
    public var path: String
    /// `supported_image_formats`, the default first.
    public var supportedImageFormats: [String]
    /// The file system's size and what the SR's files take of it, in bytes.
    public var physicalSize: UInt64
    public var physicalUtilisation: UInt64
    /// The sum of its VDIs' virtual sizes.
    public var virtualAllocation: UInt64

    enum CodingKeys: String, CodingKey {
        case uuid, path
        case nameLabel = "name_label"
        case supportedImageFormats = "supported_image_formats"
        case physicalSize = "physical_size"
        case physicalUtilisation = "physical_utilisation"
        case virtualAllocation = "virtual_allocation"
    }
}

extension SR {
    static let uuidKey = "uuid", nameKey = "name-label"
    /// `sr_config` keys that are the SR's own fields, not other_config.
    static let ownKeys: Set<String> = [imageFormatsKey, uuidKey, nameKey]

    /// Reads the SR's uuid, making and keeping one on the first open.
    static func storedUUID(_ db: DatabaseQueue) throws -> String {
        try db.write { db in
            if let u = try String.fetchOne(db, sql: "SELECT value FROM sr_config WHERE key = ?", arguments: [uuidKey]),
               UUID(uuidString: u) != nil { return u }
            let u = UUID().uuidString.lowercased()
            try db.execute(sql: "INSERT OR REPLACE INTO sr_config (key, value) VALUES (?, ?)", arguments: [uuidKey, u])
            return u
        }
    }

    public func setNameLabel(_ name: String) throws {
        try dbWrite { try $0.execute(sql: "INSERT OR REPLACE INTO sr_config (key, value) VALUES (?, ?)", arguments: [SR.nameKey, name]) }
    }

    /// The SR's record, its space read now.
    public func srRecord() throws -> SRRecord {
        var fs = statvfs()
        let size = statvfs(path, &fs) == 0 ? UInt64(fs.f_blocks) * UInt64(fs.f_frsize) : 0
        var used: UInt64 = 0
        for n in (try? FileManager.default.contentsOfDirectory(atPath: path)) ?? [] {
            used += allocatedBytes("\(path)/\(n)")
        }
        let name = try dbRead { try String.fetchOne($0, sql: "SELECT value FROM sr_config WHERE key = ?", arguments: [SR.nameKey]) }
        let virtual = try allRecords().filter { $0.type != .cbtMetadata }.reduce(UInt64(0)) { $0 + $1.virtualSize }
        return SRRecord(uuid: uuid, nameLabel: name ?? (path as NSString).lastPathComponent, path: path,
                        supportedImageFormats: supportedImageFormats.map(\.name),
                        physicalSize: size, physicalUtilisation: used, virtualAllocation: virtual)
    }
}
