import Image

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

/// A plan is the walk's sink that lists the pieces (`ReadPlan` is the seam's type).
extension ReadPlan: ReadSink {
    var cachedOnly: Bool { false }

    mutating func data(_ f: VHDFile, fileOffset: UInt64, at pos: Int, count: Int) throws(VHDError) {
        // Contiguous in the same file: one piece (a fully allocated block is one extent).
        appendData(f.file, offset: fileOffset, count: count)
    }

    mutating func zeros(at pos: Int, count: Int) { appendZeros(count) }
}
