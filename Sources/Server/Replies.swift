// Building transmission replies from the backend: whole replies are built on the I/O queue
// and handed to the connection's writer in one piece, so chunks never interleave.

import NBD
import NIOCore
import Storage

enum Replies {
    /// A READ reply. With structured replies, stretches no layer holds go back as hole
    /// chunks (unless DF forbids splitting) so clients like nbdcopy skip them. One pass over
    /// the chain reads the data and finds the holes; the common all-data reply is built in
    /// place, anything else is rebuilt from the bytes read.
    static func read(_ h: VDIHandle, _ to: ReplyTo, offset: UInt64, length: UInt32, df: Bool,
                     cachedOnly: Bool = false, pool: ReplyBufferPool) throws -> ByteBuffer
    {
        var buf = pool.take(capacity: 32 + 8 + Int(length))
        guard let framing = to.framing else {
            encodeSimpleReply(error: nil, cookie: to.cookie, into: &buf)
            _ = try readInto(&buf, h, offset: offset, length: Int(length), cachedOnly: cachedOnly)
            return buf
        }
        let overhead = framing.headerLength + 8
        encodeDataChunkHeader(framing, cookie: to.cookie, offset: offset, length: length, done: true, into: &buf)
        let holes = try readInto(&buf, h, offset: offset, length: Int(length), cachedOnly: cachedOnly)
        // DF: one data chunk, holes and all.
        if holes.isEmpty || df { return buf }
        // Split into data and hole chunks, in order.
        let data = buf.getSlice(at: overhead, length: Int(length))!
        var out = ByteBuffer()
        out.reserveCapacity(Int(length) - holes.reduce(0) { $0 + $1.count } + (2 * holes.count + 1) * overhead)
        var pos = 0
        func dataChunk(upTo end: Int, done: Bool) {
            encodeDataChunkHeader(framing, cookie: to.cookie, offset: offset + UInt64(pos), length: UInt32(end - pos), done: done,
                                  into: &out)
            out.writeImmutableBuffer(data.getSlice(at: pos, length: end - pos)!)
        }
        for (i, hole) in holes.enumerated() {
            if hole.lowerBound > pos { dataChunk(upTo: hole.lowerBound, done: false) }
            let last = i == holes.count - 1 && hole.upperBound == Int(length)
            encodeHoleChunk(framing, cookie: to.cookie, offset: offset + UInt64(hole.lowerBound), length: UInt32(hole.count),
                            done: last, into: &out)
            pos = hole.upperBound
        }
        if pos < Int(length) { dataChunk(upTo: Int(length), done: true) }
        return out
    }

    /// A READ reply sent from the files' page cache: headers in buffers, data as mapped
    /// file memory, holes as hole chunks (or zeros under DF and simple replies), framed as
    /// `read` frames them. Nil when the handle cannot map this read.
    static func readMapped(_ h: VDIHandle, _ to: ReplyTo, offset: UInt64, length: UInt32, df: Bool) throws -> [Outgoing]? {
        guard let m = try h.readMapped(at: offset, length: Int(length)) else { return nil }
        var out: [Outgoing] = []
        out.reserveCapacity(m.pieces.count + 2)
        func add(_ p: MappedRead.Piece) {
            switch p {
            case .bytes(let b): out.append(.mapped(b, keep: m))
            case .zeros(let n): Outgoing.zeroPieces(n, into: &out)
            }
        }
        var header = ByteBuffer()
        guard let framing = to.framing else {
            encodeSimpleReply(error: nil, cookie: to.cookie, into: &header)
            out.append(.buffer(header))
            m.pieces.forEach(add)
            return out
        }
        let hasHoles = m.pieces.contains { if case .zeros = $0 { return true } else { return false } }
        if df || !hasHoles {
            encodeDataChunkHeader(framing, cookie: to.cookie, offset: offset, length: length, done: true, into: &header)
            out.append(.buffer(header))
            m.pieces.forEach(add)
            return out
        }
        // Data runs as data chunks, holes as hole chunks, in order; the last is done.
        var pos = 0, i = 0
        while i < m.pieces.count {
            var h = ByteBuffer()
            if case .zeros(let n) = m.pieces[i] {
                encodeHoleChunk(framing, cookie: to.cookie, offset: offset + UInt64(pos), length: UInt32(n),
                                done: pos + n == Int(length), into: &h)
                out.append(.buffer(h))
                pos += n
                i += 1
                continue
            }
            var j = i, run = 0
            while j < m.pieces.count, case .bytes(let b) = m.pieces[j] {
                run += b.count
                j += 1
            }
            encodeDataChunkHeader(framing, cookie: to.cookie, offset: offset + UInt64(pos), length: UInt32(run),
                                  done: pos + run == Int(length), into: &h)
            out.append(.buffer(h))
            m.pieces[i..<j].forEach(add)
            pos += run
            i = j
        }
        return out
    }

    /// Appends `length` bytes read at `offset`; returns the ranges of them no layer holds.
    static func readInto(_ buf: inout ByteBuffer, _ h: VDIHandle, offset: UInt64, length: Int,
                         cachedOnly: Bool = false) throws -> [Range<Int>] {
        var failure: Error?
        var holes: [Range<Int>] = []
        buf.writeWithUnsafeMutableBytes(minimumWritableBytes: length) { ptr in
            do {
                try h.read(into: UnsafeMutableRawBufferPointer(rebasing: ptr[0..<length]), at: offset, cachedOnly: cachedOnly,
                           holes: &holes)
            } catch {
                failure = error
            }
            return length
        }
        if let f = failure { throw f }
        return holes
    }

    /// Runs of changed (1) and unchanged (0) 64 KiB blocks over the range, from an MSB-first bitmap.
    static func dirtyExtents(_ msb: [UInt8], offset: UInt64, length: UInt64) -> [(length: UInt64, flags: UInt32)] {
        let bs: UInt64 = 64 * 1024
        var out: [(length: UInt64, flags: UInt32)] = []
        var pos = offset
        while pos < offset + length {
            let i = Int(pos / bs)
            let dirty: UInt32 = i / 8 < msb.count && msb[i / 8] & (0x80 >> UInt8(i % 8)) != 0 ? 1 : 0
            let n = min(bs - pos % bs, offset + length - pos)
            if let last = out.last, last.flags == dirty {
                out[out.count - 1].length += n
            } else {
                out.append((n, dirty))
            }
            pos += n
        }
        return out
    }

    /// The most one BLOCK_STATUS reply describes; a client asks again past its end (the
    /// spec lets a server answer a shorter range than requested).
    static let maxBlockStatusSpan: UInt64 = 4 << 30

    /// A BLOCK_STATUS reply: one chunk per negotiated context.
    static func blockStatus(_ h: VDIHandle, _ to: ReplyTo, offset: UInt64, length requested: UInt64, reqOne: Bool,
                            contexts: [MetaContext], changedSince: (String) throws -> [UInt8]) throws -> ByteBuffer {
        let framing = to.framing ?? .structured
        let length = min(requested, maxBlockStatusSpan - 1)
        var buf = ByteBuffer()
        for (i, ctx) in contexts.enumerated() {
            var extents: [(length: UInt64, flags: UInt32)] = []
            switch ctx.name {
            case baseAllocationContext:
                for run in try h.allocationRuns(offset: offset, length: length) {
                    let flags: AllocationState = run.allocated ? [] : [.hole, .zero]
                    extents.append((run.length, flags.rawValue))
                }
            case let name where name.hasPrefix(dirtyBitmapPrefix):
                // qemu's dirty bitmap context: flag 1 (dirty) on blocks changed since that snapshot.
                let bits = try changedSince(String(name.dropFirst(dirtyBitmapPrefix.count)))
                extents = dirtyExtents(bits, offset: offset, length: length)
            default:
                extents.append((length, 0))
            }
            if reqOne { extents = Array(extents.prefix(1)) }
            encodeBlockStatusChunk(framing, cookie: to.cookie, contextID: ctx.id, extents: extents, done: i == contexts.count - 1,
                                   into: &buf)
        }
        return buf
    }
}
