import Foundation

/// Creating VHD files the way blktap's vhd-util does: footer copy, header, BAT, (parent
/// locator data), trailing footer; 2 MiB blocks; creator `tap`.
public enum VHDCreate {
    public static func timeStamp(_ date: Date) -> UInt32 {
        UInt32(clamping: Int64(date.timeIntervalSince1970) - vhdEpochOffsetFromUnix)
    }

    /// The largest virtual size we create: the VHD spec's 2040 GiB limit, as blktap.
    public static let maxVirtualSize: UInt64 = 2040 << 30

    /// Metadata bytes of a new dynamic or differencing disk, ready to be written at offset 0.
    public static func image(size: UInt64, uniqueID: UUID, now: Date,
                             parent: (uniqueID: UUID, timeStamp: UInt32, relativePath: String)? = nil,
                             blockSize: UInt32 = DynamicDiskHeader.defaultBlockSize) -> [UInt8] {
        let entries = Int((size + UInt64(blockSize) - 1) / UInt64(blockSize))
        let tableOffset: UInt64 = 512 + 1024
        let batBytes = BlockAllocationTable.byteLength(entries: entries)
        var footer = Footer(diskType: parent == nil ? .dynamic : .differencing, currentSize: size,
                            uniqueID: uuidBytes(uniqueID), timeStamp: timeStamp(now), dataOffset: 512)
        footer.creatorHostOS = Array("Wi2k".utf8)
        var header = DynamicDiskHeader(tableOffset: tableOffset, maxTableEntries: UInt32(entries), blockSize: blockSize)
        var locatorData: [UInt8] = []
        var end = tableOffset + UInt64(batBytes)
        if let p = parent {
            header.parentUniqueID = uuidBytes(p.uniqueID)
            header.parentTimeStamp = p.timeStamp
            header.parentUnicodeName = (p.relativePath as NSString).lastPathComponent
            // MacX: a file URL, as blktap writes it.
            let rel = p.relativePath.hasPrefix("/") || p.relativePath.hasPrefix("./") ? p.relativePath : "./" + p.relativePath
            let macx = Array("file://\(rel)".utf8)
            let macxSpace = (macx.count + 511) / 512 * 512
            header.parentLocatorEntries[0] = ParentLocatorEntry(
                platformCode: .macX, platformDataSpace: UInt32(macxSpace), platformDataLength: UInt32(macx.count),
                platformDataOffset: end)
            locatorData += padded(macx, macxSpace)
            end += UInt64(macxSpace)
            // W2ru too, for Windows-side tools.
            var w2ru: [UInt8] = []
            for u in rel.replacingOccurrences(of: "/", with: "\\").utf16 { w2ru.append(UInt8(u & 0xff)); w2ru.append(UInt8(u >> 8)) }
            let w2ruSpace = (w2ru.count + 511) / 512 * 512
            header.parentLocatorEntries[1] = ParentLocatorEntry(
                platformCode: .w2ru, platformDataSpace: UInt32(w2ruSpace), platformDataLength: UInt32(w2ru.count),
                platformDataOffset: end)
            locatorData += padded(w2ru, w2ruSpace)
            end += UInt64(w2ruSpace)
        }
        var out = footer.serialize()
        out += header.serialize()
        out += BlockAllocationTable(count: entries).serialize()
        out += locatorData
        precondition(UInt64(out.count) == end)
        out += footer.serialize()
        return out
    }

    /// Creates a new dynamic VHD. Fails if the file exists.
    public static func createDynamic(path: String, size: UInt64, uniqueID: UUID = UUID(), now: Date = Date()) throws(VHDError) {
        try validate(size: size, path: path)
        try writeNew(path: path, bytes: image(size: size, uniqueID: uniqueID, now: now))
    }

    /// Creates a differencing VHD whose parent is `parentPath` (recorded relative to the child's directory when they share it).
    public static func createDifferencing(path: String, parentPath: String, uniqueID: UUID = UUID(), now: Date = Date(),
                                          size: UInt64? = nil) throws(VHDError) {
        let parent = try VHDFile.open(path: parentPath, writable: false)
        defer { parent.close() }
        let childDir = URL(fileURLWithPath: path).standardizedFileURL.deletingLastPathComponent().path
        let parentURL = URL(fileURLWithPath: parentPath).standardizedFileURL
        let rel = parentURL.deletingLastPathComponent().path == childDir ? "./" + parentURL.lastPathComponent : parentURL.path
        let sz = size ?? parent.virtualSize
        try validate(size: sz, path: path)
        try writeNew(path: path, bytes: image(size: sz, uniqueID: uniqueID, now: now,
                                              parent: (parent.uniqueID, parent.footer.timeStamp, rel),
                                              blockSize: parent.diskType == .fixed ? DynamicDiskHeader.defaultBlockSize : parent.blockSize))
    }

    static func validate(size: UInt64, path: String) throws(VHDError) {
        guard size > 0, size % 512 == 0, size <= maxVirtualSize else {
            throw .invalidField(structure: "footer", field: "currentSize", value: size,
                                reason: "must be a non-zero multiple of 512 up to 2040 GiB")
        }
    }

    static func writeNew(path: String, bytes: [UInt8]) throws(VHDError) {
        let f = try PosixFile(path: path, writable: true, create: true, exclusive: true)
        defer { f.close() }
        do {
            try f.write(bytes, at: 0)
            try f.synchronize()
        } catch {
            try? FileManager.default.removeItem(atPath: path)
            throw error
        }
    }
}
