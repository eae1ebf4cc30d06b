// What the reply writer sends: buffers we own, and file memory that mapped reads lend.

import NIOCore
import Storage

/// One piece of the outgoing byte stream. Sendable unchecked for `.mapped`: its pointer is
/// to memory nobody writes while the piece lives (a file's mapped pages, which `keep` holds
/// mapped, or the shared zeros), handed once from the I/O queue to the connection's.
enum Outgoing: @unchecked Sendable {
    /// Bytes in a buffer of ours (headers, replies read into a buffer).
    case buffer(ByteBuffer)
    /// Bytes of a file's page cache (or of the shared zeros), kept valid by `keep`.
    case mapped(UnsafeRawBufferPointer, keep: MappedRead?)

    var readableBytes: Int {
        switch self {
        case .buffer(let b): return b.readableBytes
        case .mapped(let p, _): return p.count
        }
    }

    func withUnsafeReadableBytes<T>(_ body: (UnsafeRawBufferPointer) throws -> T) rethrows -> T {
        switch self {
        case .buffer(let b): return try b.withUnsafeReadableBytes(body)
        case .mapped(let p, _): return try body(p)
        }
    }

    mutating func moveReaderIndex(forwardBy n: Int) {
        switch self {
        case .buffer:
            _ = withOwnedBuffer { $0.moveReaderIndex(forwardBy: n) }
        case .mapped(let p, let keep):
            self = .mapped(UnsafeRawBufferPointer(rebasing: p[n...]), keep: keep)
        }
    }

    private static let empty = Outgoing.mapped(UnsafeRawBufferPointer(start: nil, count: 0), keep: nil)

    /// Runs `body` on a buffer piece's buffer in place, with the enum's own reference
    /// dropped meanwhile so the buffer is uniquely held and changing it copies nothing;
    /// nil for a mapped piece.
    private mutating func withOwnedBuffer<T>(_ body: (inout ByteBuffer) -> T) -> T? {
        guard case .buffer(var b) = self else { return nil }
        self = Self.empty
        let result = body(&b)
        self = .buffer(b)
        return result
    }

    /// Encodes more bytes onto the end of a buffer piece in place; the bytes added, or nil
    /// for a mapped piece.
    mutating func append(_ encode: (inout ByteBuffer) -> Void) -> Int? {
        withOwnedBuffer { b in
            let before = b.readableBytes
            encode(&b)
            return b.readableBytes - before
        }
    }

    /// Hands a sent buffer to the pool (it must hold the only reference to be reused).
    mutating func recycle(into pool: ReplyBufferPool) {
        guard case .buffer(var b) = self else { return }
        self = Self.empty  // b alone holds it, so the pool can reuse its storage
        pool.give(&b)
    }

    /// 1 MiB of zeros that holes of mapped reads are sent from: written once, while the
    /// lazy initialiser runs, and only read after.
    nonisolated(unsafe) static let zeros: UnsafeRawBufferPointer = {
        let p = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 4096)
        p.initializeMemory(as: UInt8.self, repeating: 0)
        return UnsafeRawBufferPointer(p)
    }()

    /// `count` zero bytes as pieces.
    static func zeroPieces(_ count: Int, into out: inout [Outgoing]) {
        var left = count
        while left > 0 {
            let n = min(left, zeros.count)
            out.append(.mapped(UnsafeRawBufferPointer(rebasing: zeros[0..<n]), keep: nil))
            left -= n
        }
    }
}

/// What a request's body produced.
enum Reply: Sendable {
    /// Nothing beyond a plain OK (or done chunk).
    case none
    case buffer(ByteBuffer)
    /// A reply in pieces (a mapped read).
    case pieces([Outgoing])
}
