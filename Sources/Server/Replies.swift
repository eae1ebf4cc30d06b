// Building transmission replies from the backend: whole replies are built on the I/O queue
// and handed to the connection's writer in one piece, so chunks never interleave.

import NBD
import NIOCore
import Storage

enum Replies {
    /// A READ reply. With structured replies, unallocated stretches go back as hole chunks
    /// (unless DF forbids splitting) so clients like nbdcopy skip them.
    static func read(_ h: VDIHandle, cookie: UInt64, offset: UInt64, length: UInt32, structured: Bool, df: Bool)
        throws -> ByteBuffer
    {
        var buf = ByteBuffer()
        guard structured else {
            buf.reserveCapacity(16 + Int(length))
            encodeSimpleReply(error: nil, cookie: cookie, into: &buf)
            try readInto(&buf, h, offset: offset, length: Int(length))
            return buf
        }
        let runs = df ? [(allocated: true, length: UInt64(length))] : try h.allocationRuns(offset: offset, length: UInt64(length))
        buf.reserveCapacity(runs.count * 32 + (runs.contains { $0.allocated } ? Int(length) : 0))
        var pos = offset
        for (i, run) in runs.enumerated() {
            let last = i == runs.count - 1
            if run.allocated {
                encodeDataChunkHeader(cookie: cookie, offset: pos, length: UInt32(run.length), done: last, into: &buf)
                try readInto(&buf, h, offset: pos, length: Int(run.length))
            } else {
                encodeHoleChunk(cookie: cookie, offset: pos, length: UInt32(run.length), done: last, into: &buf)
            }
            pos += run.length
        }
        return buf
    }

    static func readInto(_ buf: inout ByteBuffer, _ h: VDIHandle, offset: UInt64, length: Int) throws {
        var failure: Error?
        buf.writeWithUnsafeMutableBytes(minimumWritableBytes: length) { ptr in
            do {
                try h.read(into: UnsafeMutableRawBufferPointer(rebasing: ptr[0..<length]), at: offset)
            } catch {
                failure = error
            }
            return length
        }
        if let f = failure { throw f }
    }

    /// A BLOCK_STATUS reply: one chunk per negotiated context.
    static func blockStatus(_ h: VDIHandle, cookie: UInt64, offset: UInt64, length: UInt32, reqOne: Bool,
                            contexts: [MetaContext]) throws -> ByteBuffer {
        var buf = ByteBuffer()
        for (i, ctx) in contexts.enumerated() {
            var extents: [(length: UInt32, flags: UInt32)] = []
            switch ctx.name {
            case baseAllocationContext:
                for run in try h.allocationRuns(offset: offset, length: UInt64(length)) {
                    let flags: AllocationState = run.allocated ? [] : [.hole, .zero]
                    extents.append((UInt32(run.length), flags.rawValue))
                }
            default:
                // A context we offered but cannot answer: report the range as one plain extent.
                extents.append((length, 0))
            }
            if reqOne { extents = Array(extents.prefix(1)) }
            encodeBlockStatusChunk(cookie: cookie, contextID: ctx.id, extents: extents, done: i == contexts.count - 1, into: &buf)
        }
        return buf
    }
}
