// The qcow2 implementation of the storage seam's `DiskImage`: a leaf and its backing
// files. A read resolves each range through the layers (each with its own cluster size:
// a qemu-made base may have 2 MiB clusters under our 64 KiB overlay); a write goes to the
// leaf, copying up the rest of each new cluster from below.

import Foundation
import Image

public final class QCOW2Chain: DiskImage, Sendable {
    public let layers: [QCOW2File]
    var leaf: QCOW2File { layers[0] }
    public static let maxDepth = 64

    public init(layers: [QCOW2File]) { self.layers = layers }

    /// Opens `path` and its backing files (qcow2 only), only the leaf writable.
    public static func open(path: String, writable: Bool) throws(QCOW2Error) -> QCOW2Chain {
        var layers = [try QCOW2File.open(path: path, writable: writable)]
        do {
            var seen: Set<String> = [URL(fileURLWithPath: path).resolvingSymlinksInPath().path]
            while let name = layers.last!.header.backingFile {
                let child = layers.last!
                if let f = child.header.backingFormat, f != "qcow2" { throw QCOW2Error.backingFormat(path: child.path, format: f) }
                let p = resolve(backing: name, of: child.path)
                guard seen.insert(URL(fileURLWithPath: p).resolvingSymlinksInPath().path).inserted else {
                    throw QCOW2Error.chainLoop(path: p)
                }
                guard layers.count < maxDepth else { throw QCOW2Error.chainTooDeep(limit: maxDepth) }
                do { layers.append(try QCOW2File.open(path: p, writable: false)) } catch {
                    if case .io = error { throw QCOW2Error.backingMissing(path: child.path, backing: name) }
                    throw error
                }
            }
            return QCOW2Chain(layers: layers)
        } catch {
            for l in layers { l.close() }
            throw error as! QCOW2Error
        }
    }

    /// A backing file's name as a path: relative names are relative to the child's directory.
    static func resolve(backing name: String, of child: String) -> String {
        if name.hasPrefix("/") { return name }
        return (child as NSString).deletingLastPathComponent + "/" + name
    }

    public var virtualSize: UInt64 { leaf.size }
    public var writable: Bool { leaf.writable }
    public var depth: Int { layers.count }
    public var layerPaths: [String] { layers.map(\.path) }
    /// New mappings reach the file only after their data is durable (see QCOW2File), so
    /// there is no per-allocation barrier to turn off.
    public func setAllocationBarrier(_ on: Bool) {}

    func checkRange(_ offset: UInt64, _ length: UInt64) throws(QCOW2Error) {
        let size = virtualSize
        guard offset <= size, length <= size - offset else {
            throw .outOfRange(path: leaf.path, offset: offset, length: length, size: size)
        }
    }

    // MARK: resolving reads

    enum Piece {
        case data(QCOW2File, UInt64, Int)
        case zeros(Int)
        case compressed(QCOW2File, host: UInt64, bytes: Int, skip: Int, count: Int)

        var count: Int {
            switch self {
            case .data(_, _, let n), .zeros(let n), .compressed(_, _, _, _, let n): return n
            }
        }
    }

    static func append(_ p: Piece, to out: inout [Piece]) {
        guard p.count > 0 else { return }
        switch (out.last, p) {
        case (.zeros(let a)?, .zeros(let b)):
            out[out.count - 1] = .zeros(a + b)
        case (.data(let f, let o, let n)?, .data(let g, let q, let m)) where f === g && o + UInt64(n) == q:
            out[out.count - 1] = .data(f, o, n + m)
        default:
            out.append(p)
        }
    }

    /// The pieces of `[offset, offset+length)` as layer `layer` and those below it hold them.
    func resolve(from layer: Int, _ offset: UInt64, _ length: UInt64, into out: inout [Piece]) throws(QCOW2Error) {
        guard length > 0 else { return }
        guard layer < layers.count else { return Self.append(.zeros(Int(length)), to: &out) }
        let f = layers[layer]
        let end = offset + length, lim = min(end, f.size)
        if offset < lim {
            let cs = f.clusterSize
            var pos = offset
            var ci = offset / cs
            for run in try f.mappingRuns(first: ci, end: (lim - 1) / cs + 1) {
                let runEnd = min((ci + run.count) * cs, lim)
                switch run.m {
                case .unallocated:
                    try resolve(from: layer + 1, pos, runEnd - pos, into: &out)
                case .zero:
                    Self.append(.zeros(Int(runEnd - pos)), to: &out)
                case .data(let host, _):
                    Self.append(.data(f, host + pos - ci * cs, Int(runEnd - pos)), to: &out)
                case .compressed(let host, let n):
                    Self.append(.compressed(f, host: host, bytes: n, skip: Int(pos - ci * cs), count: Int(runEnd - pos)), to: &out)
                }
                pos = runEnd
                ci += run.count
            }
        }
        if max(offset, lim) < end { Self.append(.zeros(Int(end - max(offset, lim))), to: &out) }
    }

    func pieces(_ offset: UInt64, _ length: UInt64, from layer: Int = 0) throws(QCOW2Error) -> [Piece] {
        var out: [Piece] = []
        // In steps, so no step's pieces are more than a few thousand.
        var pos = offset
        let end = offset + length
        while pos < end {
            let n = min(end - pos, 1 << 32)
            try resolve(from: layer, pos, n, into: &out)
            pos += n
        }
        return out
    }

    /// Fills `buffer` from the pieces; `holes` gets the ranges that read as zeros.
    func fill(_ buffer: UnsafeMutableRawBufferPointer, _ pieces: [Piece], cachedOnly: Bool,
              holes: inout [Range<Int>]) throws(QCOW2Error) {
        var at = 0
        for p in pieces {
            let dst = UnsafeMutableRawBufferPointer(rebasing: buffer[at..<(at + p.count)])
            switch p {
            case .data(let f, let off, _):
                try f.file.read(into: dst, at: off, cachedOnly: cachedOnly)
            case .zeros:
                dst.initializeMemory(as: UInt8.self, repeating: 0)
                holes.append(at..<(at + p.count))
            case .compressed(let f, let host, let bytes, let skip, let n):
                if cachedOnly { throw .wouldBlock }
                let c = try f.inflate(host: host, bytes: bytes)
                c.withUnsafeBytes { dst.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[skip..<(skip + n)])) }
            }
            at += p.count
        }
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64, cachedOnly: Bool,
                     holes: inout [Range<Int>]) throws {
        holes.removeAll(keepingCapacity: true)
        try checkRange(offset, UInt64(buffer.count))
        try fill(buffer, try pieces(offset, UInt64(buffer.count)), cachedOnly: cachedOnly, holes: &holes)
    }

    public func plan(offset: UInt64, length: Int) throws -> ReadPlan {
        try checkRange(offset, UInt64(length))
        var plan = ReadPlan()
        for p in try pieces(offset, UInt64(length)) {
            switch p {
            case .data(let f, let o, let n): plan.appendData(f, offset: o, count: n)
            case .zeros(let n): plan.appendZeros(n)
            // Inflated data has no pages to lend: whoever maps it gets nil and reads instead.
            case .compressed(_, _, _, _, let n): plan.pieces.append(.data(file: Unmappable.shared, offset: 0, count: n))
            }
        }
        return plan
    }

    public func allocationRuns(offset: UInt64, length: UInt64) throws -> [(allocated: Bool, length: UInt64)] {
        let n = min(length, virtualSize - min(offset, virtualSize))
        var out: [(allocated: Bool, length: UInt64)] = []
        for p in try pieces(offset, n) {
            var a = true
            if case .zeros = p { a = false }
            if let last = out.last, last.allocated == a { out[out.count - 1].length += UInt64(p.count) } else { out.append((a, UInt64(p.count))) }
        }
        return out
    }

    public func leafDataRuns(offset: UInt64, length: UInt64) throws -> [Range<UInt64>] {
        let end = min(offset + length, virtualSize)
        guard offset < end else { return [] }
        let cs = leaf.clusterSize
        var out: [Range<UInt64>] = []
        var ci = offset / cs
        for run in try leaf.mappingRuns(first: ci, end: (end - 1) / cs + 1) {
            let r = max(ci * cs, offset)..<min((ci + run.count) * cs, end)
            ci += run.count
            // Zero clusters are the leaf's too: merged down, they hide the parent's data.
            if run.m == .unallocated || r.isEmpty { continue }
            if let last = out.last, last.upperBound == r.lowerBound { out[out.count - 1] = last.lowerBound..<r.upperBound } else { out.append(r) }
        }
        return out
    }

    public func leafHoldsAll(offset: UInt64, length: UInt64) -> Bool {
        guard length > 0 else { return true }
        let cs = leaf.clusterSize
        guard let runs = try? leaf.mappingRuns(first: offset / cs, end: (offset + length - 1) / cs + 1) else { return false }
        return runs.allSatisfy { if case .data(_, true) = $0.m { return true } else { return false } }
    }

    public func leafLacksAll(offset: UInt64, length: UInt64) -> Bool {
        guard length > 0 else { return true }
        let cs = leaf.clusterSize
        guard let runs = try? leaf.mappingRuns(first: offset / cs, end: (offset + length - 1) / cs + 1) else { return false }
        return !runs.contains { if case .data = $0.m { return true } else { return false } }
    }

    public func flush() throws { try leaf.flush() }

    public func close() { for l in layers { l.close() } }
}
