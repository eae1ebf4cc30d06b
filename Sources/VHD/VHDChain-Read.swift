// Reading a chain: one walk down the layers per block range (`walk`), feeding a sink that
// either copies into a buffer or lists the pieces (`ReadPlan`); allocation runs for
// BLOCK_STATUS.

import Image

extension VHDChain {
    /// Reads `buffer.count` bytes at `offset` through the chain.
    /// With `cachedOnly`, throws `.wouldBlock` instead of waiting for the disk anywhere.
    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64, cachedOnly: Bool = false) throws(VHDError) {
        var holes = HoleList(base: nil)
        try read(into: buffer, at: offset, cachedOnly: cachedOnly, holes: &holes)
    }

    /// Reads as `read` does and also lists, in `holes`, the byte ranges of `buffer` that no
    /// layer holds (they read as zeros): one pass serves a structured READ's hole chunks.
    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64, cachedOnly: Bool = false,
                     holes: inout [Range<Int>]) throws(VHDError) {
        var list = HoleList(base: buffer.baseAddress)
        try read(into: buffer, at: offset, cachedOnly: cachedOnly, holes: &list)
        holes = list.ranges
    }

    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64, cachedOnly: Bool, holes: inout HoleList) throws(VHDError) {
        guard let base = buffer.baseAddress else { return }
        var sink = CopySink(base: base, cachedOnly: cachedOnly, holes: holes)
        try walk(offset: offset, length: buffer.count, into: &sink)
        holes = sink.holes
    }

    /// Where each byte of `[offset, offset+length)` comes from, without reading any: runs of
    /// file extents (merged where contiguous in one file) and of zeros no layer holds. A
    /// caller that can send straight from the files (a mapped page cache) skips the copy.
    public func plan(offset: UInt64, length: Int) throws(VHDError) -> ReadPlan {
        var sink = ReadPlan()
        try walk(offset: offset, length: length, into: &sink)
        return sink
    }

    /// The one chain walk behind reads and plans: each block's range goes down the layers.
    func walk<S: ReadSink>(offset: UInt64, length count: Int, into sink: inout S) throws(VHDError) {
        let length = UInt64(count)
        guard offset <= virtualSize, length <= virtualSize - offset else {
            throw .outOfRange(offset: offset, length: length, virtualSize: virtualSize)
        }
        var done = 0
        let bs = UInt64(blockSize)
        while done < count {
            let pos = offset + UInt64(done)
            let blockIndex = Int(pos / bs)
            let inBlock = Int(pos % bs)
            let n = min(Int(bs) - inBlock, count - done)
            try readPiece(layer: 0, blockIndex: blockIndex, range: inBlock..<(inBlock + n), at: done, into: &sink)
            done += n
        }
    }

    /// Ranges of a read's buffer that fell through every layer, merged as they come.
    struct HoleList {
        let base: UnsafeMutableRawPointer?
        var ranges: [Range<Int>] = []
        @inline(__always) mutating func add(_ pos: Int, _ count: Int) {
            guard base != nil, count > 0 else { return }
            if let last = ranges.last, last.upperBound == pos {
                ranges[ranges.count - 1] = last.lowerBound..<(pos + count)
            } else {
                ranges.append(pos..<(pos + count))
            }
        }
    }

    /// Reads into a buffer: data is copied from the files, holes are zeroed and listed.
    struct CopySink: ReadSink {
        let base: UnsafeMutableRawPointer
        let cachedOnly: Bool
        var holes: HoleList

        mutating func data(_ f: VHDFile, fileOffset: UInt64, at pos: Int, count: Int) throws(VHDError) {
            let dest = UnsafeMutableRawBufferPointer(start: base + pos, count: count)
            if cachedOnly {
                guard try f.file.readIfCached(into: dest, atAbsoluteOffset: fileOffset) else { throw .wouldBlock }
            } else {
                try f.file.read(into: dest, atAbsoluteOffset: fileOffset)
            }
        }

        mutating func zeros(at pos: Int, count: Int) {
            (base + pos).initializeMemory(as: UInt8.self, repeating: 0, count: count)
            holes.add(pos, count)
        }
    }

    public func read(at offset: UInt64, count: Int) throws(VHDError) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        try typed(leaf.path) { try out.withUnsafeMutableBytes { b in try read(into: b, at: offset) } }
        return out
    }

    /// Reads a byte range inside one block from `layer` down (the copy-up of a write).
    func readPiece(layer: Int, blockIndex: Int, range: Range<Int>, into dest: UnsafeMutableRawBufferPointer,
                   cachedOnly: Bool = false) throws(VHDError) {
        guard let base = dest.baseAddress else { return }
        var sink = CopySink(base: base, cachedOnly: cachedOnly, holes: HoleList(base: nil))
        try readPiece(layer: layer, blockIndex: blockIndex, range: range, at: 0, into: &sink)
    }

    /// `range` is a byte range inside the block, standing at `pos` in the request.
    func readPiece<S: ReadSink>(layer: Int, blockIndex: Int, range: Range<Int>, at pos: Int, into sink: inout S) throws(VHDError) {
        guard layer < layers.count else {
            sink.zeros(at: pos, count: range.count)
            return
        }
        let f = layers[layer]
        // Past this layer's own size it holds nothing.
        let blockStart = UInt64(blockIndex) * UInt64(blockSize)
        if blockStart + UInt64(range.upperBound) > f.virtualSize {
            let limit = f.virtualSize > blockStart + UInt64(range.lowerBound) ? Int(f.virtualSize - blockStart) : range.lowerBound
            if limit > range.lowerBound {
                try readPiece(layer: layer, blockIndex: blockIndex, range: range.lowerBound..<limit, at: pos, into: &sink)
            }
            try readPiece(layer: layer + 1, blockIndex: blockIndex, range: limit..<range.upperBound,
                          at: pos + (limit - range.lowerBound), into: &sink)
            return
        }
        switch try f.blockState(blockIndex, cachedOnly: sink.cachedOnly) {
        case .absent:
            try readPiece(layer: layer + 1, blockIndex: blockIndex, range: range, at: pos, into: &sink)
        case .full(let dataOffset):
            try sink.data(f, fileOffset: dataOffset + UInt64(range.lowerBound), at: pos, count: range.count)
        case .partial(let dataOffset, let bitmap):
            let sectors = (range.lowerBound / 512)..<((range.upperBound + 511) / 512)
            for (present, run) in bitmap.runs(in: sectors) {
                let a = max(run.lowerBound * 512, range.lowerBound)
                let b = min(run.upperBound * 512, range.upperBound)
                let at = pos + (a - range.lowerBound)
                if present {
                    try sink.data(f, fileOffset: dataOffset + UInt64(a), at: at, count: b - a)
                } else {
                    try readPiece(layer: layer + 1, blockIndex: blockIndex, range: a..<b, at: at, into: &sink)
                }
            }
        }
    }

    /// Whether any layer from `layer` down holds data for this block.
    func anyLayerHolds(blockIndex: Int, from layer: Int) throws(VHDError) -> Bool {
        for l in layers[layer...] {
            if UInt64(blockIndex) * UInt64(blockSize) >= l.virtualSize { continue }
            if case .absent = try l.blockState(blockIndex) { continue }
            return true
        }
        return false
    }

    /// Allocation status of `[offset, offset+length)` as runs: true where some layer holds data.
    public func allocationRuns(offset: UInt64, length: UInt64) throws(VHDError) -> [(allocated: Bool, length: UInt64)] {
        var out: [(Bool, UInt64)] = []
        func add(_ a: Bool, _ n: UInt64) {
            if let last = out.last, last.0 == a { out[out.count - 1].1 += n } else { out.append((a, n)) }
        }
        var pos = offset
        let end = offset + length
        let bs = UInt64(blockSize)
        while pos < end {
            let bi = Int(pos / bs)
            let n = min(bs - pos % bs, end - pos)
            add(try anyLayerHolds(blockIndex: bi, from: 0), n)
            pos += n
        }
        return out
    }
}
