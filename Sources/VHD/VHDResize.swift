// Design notes: growing a dynamic or differencing VHD.
//
// The virtual size lives in the footer; the BAT must have an entry for every block of it.
// When the BAT's last sector has room for the new entries they are written in place;
// otherwise a new, larger BAT is written past the end of the data and the header is
// pointed at it (the old one becomes dead space, as after blktap's relocation). Each step
// is synced before the next, so a crash leaves a file that opens at the old size or at the
// new one, never one whose footer claims blocks its BAT cannot hold:
//   1. the new BAT entries (in place, or the new BAT followed by the old footer at the end)
//   2. the header (table offset, max table entries)
//   3. the footer at offset 0 and at the end (current and original size, geometry)
// The file must not be open for I/O elsewhere while it grows.

import Foundation

extension VHDFile {
    /// Grows the virtual size to `newSize` bytes (a multiple of 512, up to 2040 GiB).
    public func grow(to newSize: UInt64) throws(VHDError) {
        guard writable else { throw .readOnly(path: path) }
        guard newSize >= footer.currentSize else {
            throw .invalidField(structure: "footer", field: "currentSize", value: newSize,
                                reason: "shrinking is not supported (the disk holds \(footer.currentSize) bytes)")
        }
        try VHDCreate.validate(size: newSize, path: path)
        guard let h = header else {
            throw .invalidField(structure: "footer", field: "diskType", value: UInt64(DiskType.fixed.rawValue),
                                reason: "a fixed disk cannot be grown in place")
        }
        if newSize == footer.currentSize { return }
        try growTable(header: h, toCover: newSize)
        var f = footer
        f.currentSize = newSize
        // The spec keeps the creation-time size in Original Size, but libvhdi (vhdiinfo,
        // pyvhdi) takes the disk's size from that field: keep both equal, as at creation.
        f.originalSize = newSize
        f.diskGeometry = DiskGeometry(forSize: newSize)
        try rewriteFooter(f)
        try file.synchronize()
    }

    /// Steps 1 and 2: BAT entries for every block of `newSize`, then the header.
    func growTable(header h: DynamicDiskHeader, toCover newSize: UInt64) throws(VHDError) {
        var h = h
        lock.lock()
        defer { lock.unlock() }
        let needed = Int((newSize + UInt64(h.blockSize) - 1) / UInt64(h.blockSize))
        if needed > Int(h.maxTableEntries) {
            var table = fullTable
            table.entries += [UInt32](repeating: BlockAllocationTable.unallocated, count: needed - table.entries.count)
            let oldBytes = BlockAllocationTable.byteLength(entries: Int(h.maxTableEntries))
            let newBytes = BlockAllocationTable.byteLength(entries: needed)
            if newBytes == oldBytes {
                // The BAT's last sector has room (its padding belongs to no other structure).
                try file.write(table.serialize(), at: h.tableOffset)
            } else {
                let at = nextFreeOffset
                try file.write(table.serialize() + footer.serialize(), at: at)
                h.tableOffset = at
                nextFreeOffset = at + UInt64(newBytes)
                staleLimit = 0
            }
            try file.synchronize()
            h.maxTableEntries = UInt32(needed)
            try file.write(h.serialize(), at: footer.dataOffset)
            try file.synchronize()
            header = h
            // The grown table lives in memory from now on (the mapping covers the old one).
            bat = table
            batMap = nil
            bitmapKinds.grow(to: needed)
        }
    }
}
