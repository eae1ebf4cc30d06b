// Design notes: disk streams (export and import, seed 000).
//
// An export is a `StreamLayout`: its length and, for any byte range of it, the pieces
// that make that range up (format metadata, the disk's bytes, zeros). A layout is a value
// computed from the disk's allocation before the first byte is sent, so the length is
// known (HTTP Content-Length, a progress bar's total) and any range can be produced on its
// own (HTTP Range: a resumed download reads the same bytes as the first one did).
//
// An import is a `StreamDecoder`: bytes are pushed in as they arrive, in order, in pieces
// of any size, and it reports the disk data they carry. It never seeks and holds only the
// format's metadata (a VHD's BAT, one block's bitmap), so a pipe or an HTTP body streams
// through in bounded memory. Whether the stream replaces the disk's contents or applies
// a delta onto them is the decoder's to say (a differencing VHD is a delta).

import Foundation

/// One piece of an export stream.
public enum StreamPiece: Sendable, Equatable {
    /// Bytes of the format's own (headers, tables, bitmaps).
    case bytes([UInt8])
    /// `count` bytes of the disk at `offset`.
    case disk(offset: UInt64, count: Int)
    /// `count` zero bytes.
    case zeros(count: Int)

    public var count: Int {
        switch self {
        case .bytes(let b): return b.count
        case .disk(_, let n), .zeros(let n): return n
        }
    }
}

/// What an export stream holds, byte for byte.
public protocol StreamLayout: Sendable {
    /// The stream's length in bytes.
    var length: UInt64 { get }
    /// The pieces of `[offset, offset+length)` (clamped to the stream), in order.
    func pieces(offset: UInt64, length: UInt64) -> [StreamPiece]
}

/// A raw stream: the disk's bytes, nothing else.
public struct RawLayout: StreamLayout {
    public let length: UInt64
    public init(virtualSize: UInt64) { length = virtualSize }

    public func pieces(offset: UInt64, length n: UInt64) -> [StreamPiece] {
        guard offset < length else { return [] }
        var out: [StreamPiece] = []
        var pos = offset
        let end = min(length, offset &+ n)
        while pos < end {
            let c = Int(min(end - pos, 1 << 30))
            out.append(.disk(offset: pos, count: c))
            pos += UInt64(c)
        }
        return out
    }
}

/// What a decoder found in the bytes pushed into it.
public enum StreamEvent {
    /// Comes first, before any data: the disk size the stream declares (raw streams
    /// declare none), and whether it replaces the disk's contents (see `replaces`).
    case header(virtualSize: UInt64?, replaces: Bool)
    /// Disk bytes at `offset` (valid only during the call).
    case data(offset: UInt64, bytes: UnsafeRawBufferPointer)
}

/// Why a stream was refused.
public enum StreamError: Error, Sendable, Equatable, CustomStringConvertible {
    /// The bytes are not a valid stream of the format.
    case invalid(String)
    /// The stream ended before it was complete.
    case truncated(String)

    public var description: String {
        switch self {
        case .invalid(let s): return s
        case .truncated(let s): return "the stream ended early: \(s)"
        }
    }
}

/// A push decoder of one import stream.
public protocol StreamDecoder {
    /// True: what the stream does not hold reads as zeros afterwards (a whole disk).
    /// False: only the stream's data is applied (a delta). Settled once the first bytes
    /// are in (a VHD says which it is in its footer).
    var replaces: Bool { get }
    /// Stream bytes consumed so far.
    var consumed: UInt64 { get }
    /// Takes the next bytes of the stream.
    mutating func feed(_ bytes: UnsafeRawBufferPointer, _ sink: (StreamEvent) throws -> Void) throws
    /// The stream has ended: throws if it is incomplete or invalid.
    mutating func finish(_ sink: (StreamEvent) throws -> Void) throws
}

/// A raw stream: every byte is disk data, from offset 0.
public struct RawDecoder: StreamDecoder {
    public private(set) var consumed: UInt64 = 0
    public var replaces: Bool { true }
    public init() {}

    public mutating func feed(_ bytes: UnsafeRawBufferPointer, _ sink: (StreamEvent) throws -> Void) throws {
        guard bytes.count > 0 else { return }
        if consumed == 0 { try sink(.header(virtualSize: nil, replaces: true)) }
        try sink(.data(offset: consumed, bytes: bytes))
        consumed += UInt64(bytes.count)
    }

    public mutating func finish(_ sink: (StreamEvent) throws -> Void) throws {}
}

/// xapi's `chunked=true` raw framing: chunks of a 12-byte little-endian header
/// {offset: u64, length: u32} followed by `length` bytes of data for `offset`; a header
/// of {0, 0} ends the stream. Only the chunks given are written (a delta).
public struct XapiChunkedDecoder: StreamDecoder {
    public private(set) var consumed: UInt64 = 0
    public var replaces: Bool { false }
    var header: [UInt8] = []
    /// The chunk being read: where its next byte goes and how many are left.
    var chunk: (offset: UInt64, left: UInt32)?
    var ended = false
    public init() {}

    public mutating func feed(_ bytes: UnsafeRawBufferPointer, _ sink: (StreamEvent) throws -> Void) throws {
        if consumed == 0 && !bytes.isEmpty { try sink(.header(virtualSize: nil, replaces: false)) }
        var i = 0
        while i < bytes.count {
            if ended { throw StreamError.invalid("bytes after the end marker of a chunked stream") }
            if var c = chunk {
                let n = min(Int(c.left), bytes.count - i)
                try sink(.data(offset: c.offset, bytes: UnsafeRawBufferPointer(rebasing: bytes[i..<(i + n)])))
                c.offset += UInt64(n)
                c.left -= UInt32(n)
                chunk = c.left == 0 ? nil : c
                i += n
                continue
            }
            let n = min(12 - header.count, bytes.count - i)
            header += bytes[i..<(i + n)]
            i += n
            if header.count == 12 {
                var off: UInt64 = 0, len: UInt32 = 0
                for k in 0..<8 { off |= UInt64(header[k]) << (8 * k) }
                for k in 0..<4 { len |= UInt32(header[8 + k]) << (8 * k) }
                header = []
                if off == 0 && len == 0 { ended = true } else if len > 0 {
                    guard off <= UInt64.max - UInt64(len) else { throw StreamError.invalid("a chunk at \(off) of \(len) bytes passes 2^64") }
                    chunk = (off, len)
                }
            }
        }
        consumed += UInt64(bytes.count)
    }

    public mutating func finish(_ sink: (StreamEvent) throws -> Void) throws {
        if let c = chunk { throw StreamError.truncated("\(c.left) bytes of the chunk for offset \(c.offset) are missing") }
        guard ended else { throw StreamError.truncated("no end marker (a chunk header of offset 0, length 0)") }
    }
}

/// The identity an exported image carries (a VHD's unique id and time stamp), fixed by
/// the VDI so that every export of the same disk is the same bytes.
public struct StreamIdentity: Sendable {
    public var uniqueID: UUID
    public var timeStamp: Date
    /// The base a delta is against.
    public var parent: (uniqueID: UUID, timeStamp: Date)?
    public init(uniqueID: UUID, timeStamp: Date, parent: (uniqueID: UUID, timeStamp: Date)? = nil) {
        self.uniqueID = uniqueID
        self.timeStamp = timeStamp
        self.parent = parent
    }
}

/// A format disks are exported and imported in (`format=` of seed 000).
public protocol StreamFormat: Sendable {
    /// As `format=` spells it.
    var name: String { get }
    /// The HTTP Content-Type of an export.
    var contentType: String { get }
    /// Exports hold whole blocks of this size (nil: every byte of the disk, in order).
    var blockSize: UInt64? { get }
    /// Whether an export can hold only the blocks that differ from a base.
    var supportsDelta: Bool { get }
    /// The export of a disk of `virtualSize` holding `blocks` (ascending block indexes;
    /// ignored without a `blockSize`).
    func layout(virtualSize: UInt64, blocks: [Int], identity: StreamIdentity) -> any StreamLayout
    func decoder() -> any StreamDecoder
}

/// `format=raw`: the disk's bytes.
public struct RawStreamFormat: StreamFormat {
    public init() {}
    public var name: String { "raw" }
    public var contentType: String { "application/octet-stream" }
    public var blockSize: UInt64? { nil }
    public var supportsDelta: Bool { false }
    public func layout(virtualSize: UInt64, blocks: [Int], identity: StreamIdentity) -> any StreamLayout {
        RawLayout(virtualSize: virtualSize)
    }
    public func decoder() -> any StreamDecoder { RawDecoder() }
}
