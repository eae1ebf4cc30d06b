// The VHD implementation of the storage seam (`Image`): the chain as a `DiskImage`, the
// files as an `ImageFormat`, and relinking a differencing disk to a new parent.

import Foundation
import Image
import SystemPackage

extension VHDError: ImageFailure {
    public var failureKind: ImageFailureKind {
        switch self {
        case .readOnly: return .readOnly
        case .outOfRange: return .outOfRange
        case .zeroingNotFast: return .zeroingNotFast
        case .wouldBlock: return .wouldBlock
        case .notPublished: return .notPublished
        case .io: return .io
        case .parentMissing, .parentMismatch, .chainLoop, .chainTooDeep: return .chain
        case .badCookie, .badChecksum, .unsupportedVersion, .unsupportedDiskType, .truncated, .invalidField: return .corrupt
        }
    }

    public var errno: Errno? {
        if case .io(_, let e) = self { return e }
        return nil
    }
}

extension VHDChain: DiskImage {
    public var depth: Int { layers.count }
    public var layerPaths: [String] { layers.map(\.path) }

    public func setAllocationBarrier(_ on: Bool) { leaf.barrierOnAllocate = on }

    /// The leaf's own data as exact byte ranges (sector-precise where a block is partial).
    public func leafDataRuns(offset: UInt64, length: UInt64) throws -> [Range<UInt64>] {
        let end = min(offset + length, leaf.virtualSize)
        guard offset < end else { return [] }
        var out: [Range<UInt64>] = []
        func add(_ r: Range<UInt64>) {
            guard !r.isEmpty else { return }
            if let last = out.last, last.upperBound == r.lowerBound { out[out.count - 1] = last.lowerBound..<r.upperBound } else { out.append(r) }
        }
        if leaf.diskType == .fixed { return [offset..<end] }
        let bs = UInt64(blockSize)
        var bi = Int(offset / bs)
        while UInt64(bi) * bs < end {
            let start = UInt64(bi) * bs
            let clip = { (r: Range<UInt64>) in max(r.lowerBound, offset)..<min(r.upperBound, end) }
            switch try leaf.blockState(bi) {
            case .absent: break
            case .full: add(clip(start..<(start + bs)))
            case .partial(_, let bm):
                let sectors = Int(bs / 512)
                for (present, run) in bm.runs(in: 0..<sectors) where present {
                    let r = clip((start + UInt64(run.lowerBound) * 512)..<(start + UInt64(run.upperBound) * 512))
                    if r.lowerBound < r.upperBound { add(r) }
                }
            }
            bi += 1
        }
        return out
    }
}

extension VHDFile {
    /// Points this differencing disk at `parentPath`: the locators' data first, then the
    /// header, each synced. Between the two the file names one parent by locator and the
    /// other by uuid, and opens as a mismatch: callers journal the step and redo it.
    public func relink(toParent parentPath: String) throws(VHDError) {
        guard writable else { throw .readOnly(path: path) }
        guard footer.diskType == .differencing, var h = header else {
            throw .invalidField(structure: "footer", field: "diskType", value: UInt64(footer.diskType.rawValue),
                                reason: "only a differencing disk has a parent")
        }
        let parent = try VHDFile.open(path: parentPath, writable: false, policy: .tolerate)
        defer { parent.close() }
        let childDir = URL(fileURLWithPath: path).standardizedFileURL.deletingLastPathComponent().path
        let parentURL = URL(fileURLWithPath: parentPath).standardizedFileURL
        let rel = parentURL.deletingLastPathComponent().path == childDir ? "./" + parentURL.lastPathComponent : parentURL.path
        for i in h.parentLocatorEntries.indices {
            let l = h.parentLocatorEntries[i]
            let data: [UInt8]
            switch l.platformCode {
            case .macX:
                data = Array("file://\(rel)".utf8)
            case .w2ru:
                var d: [UInt8] = []
                for u in rel.replacingOccurrences(of: "/", with: "\\").utf16 { d.append(UInt8(u & 0xff)); d.append(UInt8(u >> 8)) }
                data = d
            case .none:
                continue
            default:
                // A locator we cannot rewrite (an absolute Windows path) must not keep naming the old parent.
                h.parentLocatorEntries[i] = .empty
                continue
            }
            let space = l.platformDataSpace < 512 ? Int(l.platformDataSpace) * 512 : Int(l.platformDataSpace)
            guard data.count <= space else {
                throw .invalidField(structure: "parent locator", field: "platformDataSpace", value: UInt64(space),
                                    reason: "the new parent's name needs \(data.count) bytes")
            }
            try file.write(padded(data, space), at: l.platformDataOffset)
            h.parentLocatorEntries[i].platformDataLength = UInt32(data.count)
        }
        try file.synchronize()
        h.parentUniqueID = uuidBytes(parent.uniqueID)
        h.parentTimeStamp = parent.footer.timeStamp
        h.parentUnicodeName = parentURL.lastPathComponent
        try file.write(h.serialize(), at: footer.dataOffset)
        try file.synchronize()
        header = h
    }
}

/// VHD files as blktap makes them: 2 MiB blocks, up to 2040 GiB, chains of differencing disks.
public struct VHDFormat: ImageFormat {
    public init() {}
    public var name: String { "vhd" }
    public var fileExtension: String { "vhd" }
    public var maxVirtualSize: UInt64 { VHDCreate.maxVirtualSize }
    public var holdsChains: Bool { true }

    public func create(path: String, size: UInt64) throws {
        try VHDCreate.createDynamic(path: path, size: size, uniqueID: UUID())
    }

    public func createChild(path: String, parent: String, size: UInt64?) throws {
        try VHDCreate.createDifferencing(path: path, parentPath: parent, size: size)
    }

    public func open(path: String, writable: Bool) throws -> any DiskImage {
        try VHDChain.open(path: path, writable: writable)
    }

    public func openLayer(path: String) throws -> any DiskImage {
        let f = try VHDFile.open(path: path, writable: false)
        do { return try VHDChain(layers: [f]) } catch { f.close(); throw error }
    }

    public func parentPath(ofFile path: String) -> String? {
        guard let f = try? VHDFile.open(path: path, writable: false, policy: .tolerate) else { return nil }
        defer { f.close() }
        guard f.diskType == .differencing else { return nil }
        return try? VHDChain.findParent(of: f)
    }

    public func setParent(ofFile path: String, to parent: String) throws {
        let f = try VHDFile.open(path: path, writable: true, policy: .tolerate)
        defer { f.close() }
        try f.relink(toParent: parent)
    }

    public func virtualSize(ofFile path: String) throws -> UInt64 {
        let f = try VHDFile.open(path: path, writable: false, policy: .tolerate)
        defer { f.close() }
        return f.virtualSize
    }

    public func grow(path: String, to size: UInt64) throws {
        let f = try VHDFile.open(path: path, writable: true)
        defer { f.close() }
        try f.grow(to: size)
    }

    public func check(path: String) -> String? {
        let problems = VHDCheck.check(path: path)
        return problems.isEmpty ? nil : problems.joined(separator: "; ")
    }
}
