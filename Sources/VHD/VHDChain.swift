// Design notes: a chain of VHD files, leaf first.
//
// Reads resolve each block piece layer by layer: a layer that has the whole block
// answers with one pread; a layer with a partial sector bitmap answers the sectors it
// has and passes the rest down; past the last layer the disk reads as zeros. Layers
// smaller than the leaf (a parent before a resize) hold nothing past their own size.
//
// Writes go to the leaf only. A block the leaf lacks is allocated whole: the untouched
// part is copied up from the chain (unless no layer holds anything there, in which case
// the new block's hole already reads as zeros), then VHDFile's ordered allocation runs.

import Foundation

public final class VHDChain: Sendable {
    /// Leaf first, base last.
    public let layers: [VHDFile]
    public let blockSize: UInt32
    public static let maxDepth = 64

    public var leaf: VHDFile { layers[0] }
    public var virtualSize: UInt64 { leaf.virtualSize }
    public var writable: Bool { leaf.writable }

    public init(layers: [VHDFile]) throws(VHDError) {
        precondition(!layers.isEmpty)
        self.layers = layers
        let bs = layers[0].blockSize
        for l in layers where l.diskType != .fixed && l.blockSize != bs {
            throw .invalidField(structure: "dynamic disk header", field: "blockSize", value: UInt64(l.blockSize),
                                reason: "\(l.path) differs from the leaf's block size \(bs)")
        }
        self.blockSize = bs
    }

    /// Opens `path` and every parent it names. Only the leaf is opened writable.
    public static func open(path: String, writable: Bool, policy: ChecksumPolicy = .strict,
                            resolveParent: ((VHDFile) -> String?)? = nil) throws(VHDError) -> VHDChain {
        var layers: [VHDFile] = []
        // A loop of paths comes back to a file already open, so its unique id repeats.
        var seenIDs = Set<UUID>()
        var current = path
        // The next layer, opened already to check its identity (each file is opened once).
        var opened: VHDFile?
        do {
            while true {
                let f = try opened ?? VHDFile.open(path: current, writable: writable, policy: policy)
                opened = nil
                layers.append(f)
                guard seenIDs.insert(f.uniqueID).inserted else { throw VHDError.chainLoop(path: current) }
                if layers.count > maxDepth { throw VHDError.chainTooDeep(limit: maxDepth) }
                guard f.diskType == .differencing, let h = f.header else { break }
                let expected = UUID(uuid: uuidTuple(h.parentUniqueID))
                let parentPath = try resolveParent?(f) ?? findParent(of: f)
                // Verify identity before trusting the file.
                let p = try VHDFile.open(path: parentPath, writable: false, policy: policy)
                guard p.uniqueID == expected else {
                    p.close()
                    throw VHDError.parentMismatch(child: f.path, parent: parentPath,
                                                  expected: expected.uuidString.lowercased(), found: p.uniqueID.uuidString.lowercased())
                }
                opened = p
                current = parentPath
            }
            return try VHDChain(layers: layers)
        } catch let e as VHDError {
            layers.forEach { $0.close() }
            throw e
        } catch {
            layers.forEach { $0.close() }
            throw .io(path: path, errno: .ioError)
        }
    }

    /// Tries the parent locators (MacX, W2ru, W2ku) then the parent's unicode name, each
    /// relative to the child's directory.
    public static func findParent(of f: VHDFile) throws(VHDError) -> String {
        // Plain string work and one stat a candidate: Foundation's URL standardising
        // stat'ed every directory of the path, nine calls a layer on each first GO.
        let dir = directory(of: f.path)
        var found: String?
        var first: String?
        f.forEachParentLocatorPath { code, p in
            if first == nil { first = p }
            var candidates: [String] = []
            if p.hasPrefix("/") { candidates.append(normalised(p)) }
            if code == .w2ku {
                // An absolute Windows path: only its last component is useful here.
                candidates.append(dir + "/" + lastComponent(p))
            } else if !p.hasPrefix("/") {
                candidates.append(normalised(dir + "/" + p))
            }
            found = candidates.first(where: isFile)
            return found != nil
        }
        if let found { return found }
        let name = f.header?.parentUnicodeName ?? ""
        if !name.isEmpty {
            let n = name.replacingOccurrences(of: "\\", with: "/")
            let c = n.hasPrefix("/") ? n : dir + "/" + lastComponent(n)
            if isFile(c) { return c }
        }
        let shown = first ?? name
        let uid = f.header.map { UUID(uuid: uuidTuple($0.parentUniqueID)).uuidString.lowercased() } ?? ""
        throw .parentMissing(child: f.path, parentName: shown, parentUniqueID: uid)
    }

    /// The directory part of a path ("." for a bare name).
    static func directory(of path: String) -> String {
        guard let slash = path.lastIndex(of: "/") else { return "." }
        return slash == path.startIndex ? "/" : String(path[..<slash])
    }

    static func lastComponent(_ p: String) -> String {
        String(p.split(separator: "/", omittingEmptySubsequences: true).last ?? "")
    }

    /// `a/./b`, `a//b` and `a/x/../b` as `a/b`, without looking at the file system.
    static func normalised(_ p: String) -> String {
        var parts: [Substring] = []
        for c in p.split(separator: "/", omittingEmptySubsequences: true) {
            if c == "." { continue }
            if c == "..", let last = parts.last, last != ".." { parts.removeLast(); continue }
            if c == "..", p.hasPrefix("/") { continue }
            parts.append(c)
        }
        let joined = parts.joined(separator: "/")
        return p.hasPrefix("/") ? "/" + joined : (joined.isEmpty ? "." : joined)
    }

    static func isFile(_ p: String) -> Bool {
        var st = stat()
        return stat(p, &st) == 0 && (st.st_mode & S_IFMT) != S_IFDIR
    }

    public func close() { layers.forEach { $0.close() } }

    // MARK: writes

    /// Writes through the leaf. `beforeVisible`, if given, runs before any byte of the write
    /// can be read back: before a write into space the leaf already holds, or, for a block
    /// being allocated, after its data is filled and synced but before the BAT points at it,
    /// so whatever the caller must make durable first (a change log) overlaps the copy-up.
    /// If it throws, nothing of that piece becomes visible.
    public func write(_ data: UnsafeRawBufferPointer, at offset: UInt64,
                      beforeVisible gate: (() throws -> Void)? = nil) throws(VHDError) {
        let beforeVisible = gate.map(Self.typedGate)
        let length = UInt64(data.count)
        guard offset <= virtualSize, length <= virtualSize - offset else {
            throw .outOfRange(offset: offset, length: length, virtualSize: virtualSize)
        }
        guard leaf.writable else { throw .readOnly(path: leaf.path) }
        if leaf.diskType == .fixed {
            try beforeVisible?()
            try leaf.file.writeAll(data, toAbsoluteOffset: offset)
            return
        }
        var done = 0
        let bs = UInt64(blockSize)
        while done < data.count {
            let pos = offset + UInt64(done)
            let blockIndex = Int(pos / bs)
            let inBlock = Int(pos % bs)
            let n = min(Int(bs) - inBlock, data.count - done)
            try writePiece(blockIndex: blockIndex, inBlock: inBlock,
                           data: UnsafeRawBufferPointer(rebasing: data[done..<(done + n)]), beforeVisible: beforeVisible)
            done += n
        }
    }

    /// True when the leaf holds none of the blocks `[offset, offset+length)` touches: a write
    /// there allocates, and its `beforeVisible` runs only at the end.
    public func leafLacksAll(offset: UInt64, length: UInt64) -> Bool {
        guard length > 0, leaf.diskType != .fixed else { return false }
        let bs = UInt64(blockSize)
        for bi in Int(offset / bs)...Int((offset + length - 1) / bs) {
            guard case .absent? = try? leaf.blockState(bi) else { return false }
        }
        return true
    }

    /// True if the leaf holds every sector of the range: a write there allocates nothing
    /// and changes no sector bitmap, so what the chain reports as allocated stays the same.
    public func leafHoldsAll(offset: UInt64, length: UInt64) -> Bool {
        guard length > 0 else { return true }
        if leaf.diskType == .fixed { return true }
        let bs = UInt64(blockSize)
        let end = offset + length
        for bi in Int(offset / bs)...Int((end - 1) / bs) {
            switch try? leaf.blockState(bi) {
            case .full?:
                continue
            case .partial(_, let bm)?:
                let blockStart = UInt64(bi) * bs
                let from = max(offset, blockStart) - blockStart, to = min(end, blockStart + bs) - blockStart
                for sector in Int(from / 512)...Int((to - 1) / 512) where !bm.isSet(sector) { return false }
            default:
                return false
            }
        }
        return true
    }

    /// A caller's gate as the write path runs it: whatever it throws means "not published".
    static func typedGate(_ gate: @escaping () throws -> Void) -> () throws(VHDError) -> Void {
        return { () throws(VHDError) -> Void in
            do {
                try gate()
            } catch {
                if let v = error as? VHDError { throw v }
                throw VHDError.notPublished(reason: "\(error)")
            }
        }
    }

    public func write(_ bytes: [UInt8], at offset: UInt64, beforeVisible: (() throws -> Void)? = nil) throws(VHDError) {
        try typed(leaf.path) { try bytes.withUnsafeBytes { b in try write(b, at: offset, beforeVisible: beforeVisible) } }
    }

    func writePiece(blockIndex: Int, inBlock: Int, data: UnsafeRawBufferPointer,
                    beforeVisible: (() throws(VHDError) -> Void)? = nil) throws(VHDError) {
        let f = leaf
        switch try f.blockState(blockIndex) {
        case .full(let dataOffset):
            try beforeVisible?()
            try f.file.writeAll(data, toAbsoluteOffset: dataOffset + UInt64(inBlock))
        case .partial(let dataOffset, _):
            try beforeVisible?()
            try f.file.writeAll(data, toAbsoluteOffset: dataOffset + UInt64(inBlock))
            let sectors = (inBlock / 512)..<((inBlock + data.count + 511) / 512)
            // A partially covered sector that was absent must first be filled from below.
            try f.withAllocationLock { () throws(VHDError) in
                if case .partial(_, let bm) = try f.blockStateLocked(blockIndex) {
                    for s in [sectors.lowerBound, sectors.upperBound - 1] where !bm.isSet(s) {
                        let sStart = s * 512, sEnd = sStart + 512
                        if inBlock > sStart || inBlock + data.count < sEnd {
                            var tmp = [UInt8](repeating: 0, count: 512)
                            try typed(f.path) { try tmp.withUnsafeMutableBytes { b in
                                try readPiece(layer: 1, blockIndex: blockIndex, range: sStart..<sEnd, into: b)
                            } }
                            // Overlay the bytes just written.
                            let a = max(inBlock, sStart), b = min(inBlock + data.count, sEnd)
                            for i in a..<b { tmp[i - sStart] = data[i - inBlock] }
                            try f.file.write(tmp, at: dataOffset + UInt64(sStart))
                        }
                    }
                    try f.setBitsLocked(blockIndex: blockIndex, sectors: sectors)
                }
            }
        case .absent:
            switch try f.reserve(blockIndex: blockIndex) {
            case .allocated:
                try writePiece(blockIndex: blockIndex, inBlock: inBlock, data: data, beforeVisible: beforeVisible)
            case .reserved(let dataOffset, let stale):
                do {
                    try fill(blockIndex: blockIndex, dataOffset: dataOffset, stale: stale, inBlock: inBlock, data: data)
                    try f.writeFullBitmap(dataOffset: dataOffset)
                    try f.barrier()
                    try beforeVisible?()
                    try f.commit(blockIndex: blockIndex, dataOffset: dataOffset)
                } catch {
                    f.abandon(blockIndex: blockIndex)
                    throw error
                }
            }
        }
    }

    /// Writes a new block's data: the untouched part copied up from the chain (unless no
    /// layer below holds anything there, when the fresh space already reads as zeros).
    func fill(blockIndex: Int, dataOffset: UInt64, stale: Range<UInt64>?, inBlock: Int, data: UnsafeRawBufferPointer)
        throws(VHDError)
    {
        let f = leaf
        let bs = Int(blockSize)
        if layers.count > 1, try anyLayerHolds(blockIndex: blockIndex, from: 1) {
            var block = [UInt8](repeating: 0, count: bs)
            try typed(f.path) {
                try block.withUnsafeMutableBytes { b in
                    try readPiece(layer: 1, blockIndex: blockIndex, range: 0..<bs, into: b)
                    b.baseAddress!.advanced(by: inBlock).copyMemory(from: data.baseAddress!, byteCount: data.count)
                    try f.file.writeAll(UnsafeRawBufferPointer(b), toAbsoluteOffset: dataOffset)
                }
            }
            return
        }
        if let st = stale {
            try writeZeroBytes(at: st.lowerBound, length: Int(st.upperBound - st.lowerBound), direct: true, file: f.file)
        }
        try f.file.writeAll(data, toAbsoluteOffset: dataOffset + UInt64(inBlock))
    }

    public func flush() throws(VHDError) { try leaf.synchronize() }

    // MARK: zeroing

    /// Makes `[offset, offset+length)` read as zeros. With `punch`, space is returned to the
    /// file system where the leaf holds the data (`NBD_CMD_TRIM`, `WRITE_ZEROES` without
    /// `NO_HOLE`); without it zeros are written. With `fastOnly`, fails with
    /// `.zeroingNotFast` before changing anything if some part would need zeros written.
    public func writeZeroes(offset: UInt64, length: UInt64, punch: Bool, fastOnly: Bool) throws(VHDError) {
        guard offset <= virtualSize, length <= virtualSize - offset else {
            throw .outOfRange(offset: offset, length: length, virtualSize: virtualSize)
        }
        guard leaf.writable else { throw .readOnly(path: leaf.path) }
        let bs = UInt64(blockSize)
        func pieces(_ body: (Int, Int, Int) throws(VHDError) -> Void) throws(VHDError) {
            var pos = offset
            while pos < offset + length {
                let n = min(bs - pos % bs, offset + length - pos)
                try body(Int(pos / bs), Int(pos % bs), Int(n))
                pos += n
            }
        }
        if fastOnly {
            try pieces { (bi, _, _) throws(VHDError) in
                guard try zeroIsFast(blockIndex: bi, punch: punch) else { throw .zeroingNotFast }
            }
        }
        try pieces { (bi, inBlock, n) throws(VHDError) in try zeroPiece(blockIndex: bi, inBlock: inBlock, length: n, punch: punch) }
    }

    func zeroIsFast(blockIndex: Int, punch: Bool) throws(VHDError) -> Bool {
        switch try leaf.blockState(blockIndex) {
        case .absent: return try !anyLayerHolds(blockIndex: blockIndex, from: 1)
        case .full: return punch
        case .partial: return false
        }
    }

    static let zeros = [UInt8](repeating: 0, count: Int(DynamicDiskHeader.defaultBlockSize))

    func zeroPiece(blockIndex: Int, inBlock: Int, length: Int, punch: Bool) throws(VHDError) {
        let f = leaf
        if f.diskType == .fixed {
            let off = UInt64(blockIndex) * UInt64(blockSize) + UInt64(inBlock)
            if punch && f.file.punchHole(offset: off, length: UInt64(length)) { return }
            try writeZeroBytes(at: off, length: length, direct: true)
            return
        }
        switch try f.blockState(blockIndex) {
        case .absent:
            // Nothing below either: it already reads as zeros.
            if try !anyLayerHolds(blockIndex: blockIndex, from: 1) { return }
        case .full(let dataOffset):
            if punch && f.file.punchHole(offset: dataOffset + UInt64(inBlock), length: UInt64(length)) { return }
        case .partial:
            break
        }
        try writeZeroBytes(at: UInt64(blockIndex) * UInt64(blockSize) + UInt64(inBlock), length: length, direct: false)
    }

    func writeZeroBytes(at offset: UInt64, length: Int, direct: Bool, file: RandomAccessFile? = nil) throws(VHDError) {
        let target = file ?? leaf.file
        var done = 0
        while done < length {
            let n = min(Self.zeros.count, length - done)
            try typed(leaf.path) {
                try Self.zeros.withUnsafeBytes { z in
                    let b = UnsafeRawBufferPointer(rebasing: z[0..<n])
                    if direct { try target.writeAll(b, toAbsoluteOffset: offset + UInt64(done)) } else {
                        try write(b, at: offset + UInt64(done))
                    }
                }
            }
            done += n
        }
    }
}
