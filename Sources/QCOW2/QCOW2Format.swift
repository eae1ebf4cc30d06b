// qcow2 files as an `ImageFormat`: `<uuid>.qcow2`, version 3, 64 KiB clusters, 16-bit
// refcounts; a child names its parent as its backing file (relative to its directory
// when they share one), with a backing format extension of "qcow2".

import Foundation
import Image
#if canImport(Glibc)
import Glibc
#endif

public struct QCOW2Format: ImageFormat {
    public init() {}
    public var name: String { "qcow2" }
    public var fileExtension: String { "qcow2" }
    /// XCP-ng's largest VDI (seed 004).
    public var maxVirtualSize: UInt64 { 16 << 40 }
    public var holdsChains: Bool { true }

    public static let clusterBits: UInt32 = 16
    /// Refcount table clusters a new file gets: 4 × 8192 blocks × 2 GiB = 64 TiB of file.
    static let refcountTableClusters: UInt64 = 4

    /// Makes the file: header, refcount table, one refcount block, an empty L1 table.
    public static func create(path: String, size: UInt64, backing: String? = nil) throws(QCOW2Error) {
        guard size <= QCOW2Format().maxVirtualSize else {
            throw .invalidField(path: path, field: "size", value: size, reason: "qcow2 VDIs hold at most 16 TiB here")
        }
        let cs = UInt64(1) << UInt64(clusterBits)
        let l1n = max(1, QCOW2Header.l1Entries(size: size, clusterBits: clusterBits))
        let l1Clusters = (l1n * 8 + cs - 1) / cs
        let rtAt: UInt64 = 1, rbAt = rtAt + refcountTableClusters, l1At = rbAt + 1
        let total = l1At + l1Clusters
        var h = QCOW2Header()
        h.clusterBits = clusterBits
        h.size = size
        h.l1Size = UInt32(l1n)
        h.l1TableOffset = l1At * cs
        h.refcountTableOffset = rtAt * cs
        h.refcountTableClusters = UInt32(refcountTableClusters)
        if let backing {
            guard backing.utf8.count <= QCOW2Header.maxBackingNameBytes else {
                throw .invalidField(path: path, field: "backing_file_size", value: UInt64(backing.utf8.count), reason: "a backing file's name is at most 1023 bytes")
            }
            h.backingFile = backing
            h.backingFormat = "qcow2"
        }
        var image = h.serialize()
        var table = [UInt8](repeating: 0, count: Int(refcountTableClusters * cs))
        put64(&table, 0, rbAt * cs)
        var block = [UInt8](repeating: 0, count: Int(cs))
        for c in 0..<Int(total) { block[c * 2 + 1] = 1 }
        image += table + block + [UInt8](repeating: 0, count: Int(l1Clusters * cs))
        let f = try HostFile(path: path, writable: true, create: true)
        defer { f.close() }
        do {
            try f.write(image, at: 0)
            try f.sync()
        } catch {
            unlink(path)
            throw error
        }
    }

    public func create(path: String, size: UInt64) throws {
        try Self.create(path: path, size: size)
    }

    public func createChild(path: String, parent: String, size: UInt64?) throws {
        let s = try size ?? virtualSize(ofFile: parent)
        try Self.create(path: path, size: s, backing: Self.backingName(parent, for: path))
    }

    /// The name a child at `child` gives `parent`: its file name when they share a
    /// directory (so an SR can move), else its absolute path.
    static func backingName(_ parent: String, for child: String) -> String {
        let p = URL(fileURLWithPath: parent).standardizedFileURL
        let c = URL(fileURLWithPath: child).standardizedFileURL
        return p.deletingLastPathComponent().path == c.deletingLastPathComponent().path ? p.lastPathComponent : p.path
    }

    public func open(path: String, writable: Bool) throws -> any DiskImage {
        try QCOW2Chain.open(path: path, writable: writable)
    }

    public func openLayer(path: String) throws -> any DiskImage {
        QCOW2Chain(layers: [try QCOW2File.open(path: path, writable: false)])
    }

    static func header(of path: String) throws(QCOW2Error) -> QCOW2Header {
        let f = try HostFile(path: path, writable: false)
        defer { f.close() }
        let first = try f.read(count: 4096, at: 0)
        guard be32(first, 0) == QCOW2Header.magic else { throw .badMagic(path: path) }
        let bits = be32(first, 20)
        let c0 = (9...21).contains(bits) && bits > 12 ? try f.read(count: 1 << Int(bits), at: 0) : first
        return try QCOW2Header.parse(c0, path: path, fileLength: try f.length)
    }

    public func parentPath(ofFile path: String) -> String? {
        guard let h = try? Self.header(of: path), let name = h.backingFile else { return nil }
        let p = QCOW2Chain.resolve(backing: name, of: path)
        return access(p, F_OK) == 0 ? p : nil
    }

    /// Writes the new name in the slot of cluster 0 not in use, syncs, then points the
    /// header at it (one sector) and syncs: a crash leaves one whole name or the other.
    public func setParent(ofFile path: String, to parent: String) throws {
        let h = try Self.header(of: path)
        guard h.version >= 3, h.clusterSize >= 4096 else {
            throw QCOW2Error.unsupportedFeature(path: path, feature: "relinking an image with clusters under 4 KiB or of version 2")
        }
        let name = Array(Self.backingName(parent, for: path).utf8)
        guard name.count <= QCOW2Header.maxBackingNameBytes else {
            throw QCOW2Error.invalidField(path: path, field: "backing_file_size", value: UInt64(name.count), reason: "a backing file's name is at most 1023 bytes")
        }
        let inUse = h.backingFileOffset..<(h.backingFileOffset + UInt64(h.backingFileSize))
        guard let slot = QCOW2Header.nameSlots.first(where: { s in
            s >= h.extensionsEnd && !inUse.overlaps(UInt64(s)..<UInt64(s + QCOW2Header.maxBackingNameBytes))
        }) else {
            throw QCOW2Error.unsupportedFeature(path: path, feature: "relinking: no free place for the name in cluster 0")
        }
        let f = try HostFile(path: path, writable: true)
        defer { f.close() }
        try f.write(name, at: UInt64(slot))
        try f.sync()
        var fields = [UInt8](repeating: 0, count: 12)
        put64(&fields, 0, UInt64(slot))
        put32(&fields, 8, UInt32(name.count))
        try f.write(fields, at: 8)
        try f.sync()
    }

    public func virtualSize(ofFile path: String) throws -> UInt64 {
        try Self.header(of: path).size
    }

    public func grow(path: String, to size: UInt64) throws {
        guard size <= maxVirtualSize else {
            throw QCOW2Error.invalidField(path: path, field: "size", value: size, reason: "qcow2 VDIs hold at most 16 TiB here")
        }
        let f = try QCOW2File.open(path: path, writable: true)
        defer { f.close() }
        try f.grow(to: size)
    }

    public func check(path: String) -> String? {
        do {
            let f = try QCOW2File.open(path: path, writable: false)
            defer { f.close() }
            return try f.check().summary.map { "\(path): \($0)" }
        } catch {
            return "\(error)"
        }
    }
}
