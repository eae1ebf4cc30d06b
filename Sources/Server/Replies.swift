// Building transmission replies from the backend: whole replies are built on the I/O queue
// and handed to the connection's writer in one piece, so chunks never interleave.

import NBD
import NIOCore
import Storage

enum Replies {
    /// A READ reply. With structured replies, unallocated stretches go back as hole chunks
    /// (unless DF forbids splitting) so clients like nbdcopy skip them.
    static func read(_ h: VDIHandle, cookie: UInt64, offset: UInt64, length: UInt32, structured: Bool, df: Bool,
                     cachedOnly: Bool = false) throws -> ByteBuffer
    {
        var buf = ByteBuffer()
        guard structured else {
            buf.reserveCapacity(16 + Int(length))
            encodeSimpleReply(error: nil, cookie: cookie, into: &buf)
            try readInto(&buf, h, offset: offset, length: Int(length), cachedOnly: cachedOnly)
            return buf
        }
        let runs = df ? [(allocated: true, length: UInt64(length))]
            : try h.allocationRuns(offset: offset, length: UInt64(length), cachedOnly: cachedOnly)
        buf.reserveCapacity(runs.count * 32 + (runs.contains { $0.allocated } ? Int(length) : 0))
        var pos = offset
        for (i, run) in runs.enumerated() {
            let last = i == runs.count - 1
            if run.allocated {
                encodeDataChunkHeader(cookie: cookie, offset: pos, length: UInt32(run.length), done: last, into: &buf)
                try readInto(&buf, h, offset: pos, length: Int(run.length), cachedOnly: cachedOnly)
            } else {
                encodeHoleChunk(cookie: cookie, offset: pos, length: UInt32(run.length), done: last, into: &buf)
            }
            pos += run.length
        }
        return buf
    }

    static func readInto(_ buf: inout ByteBuffer, _ h: VDIHandle, offset: UInt64, length: Int, cachedOnly: Bool = false) throws {
        var failure: Error?
        buf.writeWithUnsafeMutableBytes(minimumWritableBytes: length) { ptr in
            do {
                try h.read(into: UnsafeMutableRawBufferPointer(rebasing: ptr[0..<length]), at: offset, cachedOnly: cachedOnly)
            } catch {
                failure = error
            }
            return length
        }
        if let f = failure { throw f }
    }

    /// Runs of changed (1) and unchanged (0) 64 KiB blocks over the range, from an MSB-first bitmap.
    static func dirtyExtents(_ msb: [UInt8], offset: UInt64, length: UInt64) -> [(length: UInt32, flags: UInt32)] {
        let bs: UInt64 = 64 * 1024
        var out: [(length: UInt32, flags: UInt32)] = []
        var pos = offset
        while pos < offset + length {
            let i = Int(pos / bs)
            let dirty: UInt32 = i / 8 < msb.count && msb[i / 8] & (0x80 >> UInt8(i % 8)) != 0 ? 1 : 0
            let n = min(bs - pos % bs, offset + length - pos)
            if let last = out.last, last.flags == dirty, UInt64(last.length) + n <= UInt64(UInt32.max) {
                out[out.count - 1].length += UInt32(n)
            } else {
                out.append((UInt32(n), dirty))
            }
            pos += n
        }
        return out
    }

    /// A BLOCK_STATUS reply: one chunk per negotiated context.
    static func blockStatus(_ h: VDIHandle, cookie: UInt64, offset: UInt64, length: UInt32, reqOne: Bool,
                            contexts: [MetaContext], changedSince: (String) throws -> [UInt8]) throws -> ByteBuffer {
        var buf = ByteBuffer()
        for (i, ctx) in contexts.enumerated() {
            var extents: [(length: UInt32, flags: UInt32)] = []
            switch ctx.name {
            case baseAllocationContext:
                for run in try h.allocationRuns(offset: offset, length: UInt64(length)) {
                    let flags: AllocationState = run.allocated ? [] : [.hole, .zero]
                    extents.append((UInt32(run.length), flags.rawValue))
                }
            case let name where name.hasPrefix(dirtyBitmapPrefix):
                // qemu's dirty bitmap context: flag 1 (dirty) on blocks changed since that snapshot.
                let bits = try changedSince(String(name.dropFirst(dirtyBitmapPrefix.count)))
                extents = dirtyExtents(bits, offset: offset, length: UInt64(length))
            default:
                extents.append((length, 0))
            }
            if reqOne { extents = Array(extents.prefix(1)) }
            encodeBlockStatusChunk(cookie: cookie, contextID: ctx.id, extents: extents, done: i == contexts.count - 1, into: &buf)
        }
        return buf
    }
}
