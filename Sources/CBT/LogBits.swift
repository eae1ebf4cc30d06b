// Design notes: a change log's bitmap in memory.
//
// A private (copy-on-write) mapping of the log file: opening a 2040 GiB disk's log (4 MiB
// of bits) copies nothing, and a page is copied only when a bit in it is first set. The
// file is written only from these bytes, so a page not yet copied shows what the file
// holds and a copied one holds what the file will: either way, the bits as the log has them.
//
// Which set bits are not yet durable is kept beside them (`pending`): a few entries per
// batch of writes, where a second full copy of the bitmap cost 4 MiB at the first write.

import Foundation

final class LogBits {
    /// The first bitmap byte.
    private let base: UnsafeMutablePointer<UInt8>
    let count: Int
    private let mapping: UnsafeMutableRawPointer
    private let mappingLength: Int

    /// Maps the bitmap that follows a `headerSize`-byte header in `fd`'s file (whose length
    /// the caller has checked: header plus `count`).
    init(fd: Int32, headerSize: Int, count: Int) throws(CBTError) {
        let length = headerSize + count
        guard let p = mmap(nil, length, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0), p != MAP_FAILED else {
            throw .io(path: "", errno: .init(rawValue: errno))
        }
        mapping = p
        mappingLength = length
        base = (p + headerSize).assumingMemoryBound(to: UInt8.self)
        self.count = count
    }

    deinit { munmap(mapping, mappingLength) }

    @inline(__always) subscript(i: Int) -> UInt8 {
        get { base[i] }
        set { base[i] = newValue }
    }

    func bytes(_ r: Range<Int>) -> [UInt8] { Array(UnsafeBufferPointer(start: base + r.lowerBound, count: r.count)) }

    var all: [UInt8] { bytes(0..<count) }

    func withBytes<T>(_ r: Range<Int>, _ body: (UnsafeRawBufferPointer) throws -> T) rethrows -> T {
        try body(UnsafeRawBufferPointer(start: base + r.lowerBound, count: r.count))
    }
}

/// Bits set in memory whose write and sync have not both finished, by byte.
struct PendingBits {
    private(set) var bytes: [Int: UInt8] = [:]

    var isEmpty: Bool { bytes.isEmpty }

    @inline(__always) func contains(_ i: Int, _ mask: UInt8) -> Bool {
        guard !bytes.isEmpty, let b = bytes[i] else { return false }
        return b & mask != 0
    }

    mutating func insert(_ i: Int, _ mask: UInt8) { bytes[i, default: 0] |= mask }

    /// Forgets bits that are now durable.
    mutating func remove(_ done: PendingBits) {
        for (i, m) in done.bytes {
            guard let b = bytes[i] else { continue }
            let left = b & ~m
            if left == 0 { bytes[i] = nil } else { bytes[i] = left }
        }
    }
}
