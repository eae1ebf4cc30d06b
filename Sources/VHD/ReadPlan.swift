// Design notes: a chain read as a plan.
//
// A read walks the chain once (`VHDChain.walk`) and hands each piece to a sink: either
// data at an offset of one layer's file, or zeros where no layer holds the bytes. The
// copying sink reads the pieces into a buffer; `ReadPlan` only lists them, so a caller
// that can send straight from the files' page cache (a mapping) skips the copy into a
// buffer of its own. The plan is exact at the moment it is made; the bytes it names are
// the files' bytes when they are used, as for any read racing a write.

/// Where a chain walk's pieces go. `pos` counts bytes from the start of the request.
protocol ReadSink {
    /// Wait for nothing: a piece not in the page cache fails with `.wouldBlock`.
    var cachedOnly: Bool { get }
    /// `count` bytes at `fileOffset` of `f` are the request's bytes at `pos`.
    mutating func data(_ f: VHDFile, fileOffset: UInt64, at pos: Int, count: Int) throws(VHDError)
    /// No layer holds the request's bytes at `pos` (they read as zeros).
    mutating func zeros(at pos: Int, count: Int)
}

/// The pieces of one read, in order, covering it exactly.
public struct ReadPlan: ReadSink, Sendable {
    public enum Piece: Sendable {
        /// `count` bytes at `offset` of `file`.
        case data(file: RandomAccessFile, offset: UInt64, count: Int)
        /// `count` bytes that read as zeros (no layer holds them).
        case zeros(count: Int)

        public var count: Int {
            switch self {
            case .data(_, _, let n), .zeros(let n): return n
            }
        }
    }

    public private(set) var pieces: [Piece] = []
    var cachedOnly: Bool { false }

    mutating func data(_ f: VHDFile, fileOffset: UInt64, at pos: Int, count: Int) throws(VHDError) {
        // Contiguous in the same file: one piece (a fully allocated block is one extent).
        if case .data(let file, let o, let n)? = pieces.last, file === f.file, o + UInt64(n) == fileOffset {
            pieces[pieces.count - 1] = .data(file: file, offset: o, count: n + count)
        } else {
            pieces.append(.data(file: f.file, offset: fileOffset, count: count))
        }
    }

    mutating func zeros(at pos: Int, count: Int) {
        if case .zeros(let n)? = pieces.last {
            pieces[pieces.count - 1] = .zeros(count: n + count)
        } else {
            pieces.append(.zeros(count: count))
        }
    }
}
