// Refcounts, cluster allocation, and the sync that makes new mappings durable in order
// (see QCOW2File.swift's crash notes). Clusters are taken from the end of the file and
// never reused while it is open: a freed cluster's space is punched out instead, so a
// write that raced the free lands in space no entry points at.

extension QCOW2File {
    /// Refcount `i` of a block (entries of 2^order bits, big-endian, low bits first below a byte).
    static func refcount(_ b: [UInt8], _ i: Int, order: UInt32) -> UInt64 {
        let bits = 1 << Int(order)
        if bits >= 8 {
            let n = bits / 8
            var v: UInt64 = 0
            for k in 0..<n { v = v << 8 | UInt64(b[i * n + k]) }
            return v
        }
        let bit = i * bits
        return UInt64(b[bit / 8] >> UInt8(bit % 8)) & ((1 << UInt64(bits)) - 1)
    }

    /// The refcount block of table entry `rbi` (nil if the table has none there).
    func refBlock(_ rbi: Int, _ s: inout State) throws(QCOW2Error) -> [UInt8]? {
        if let b = s.refBlocks[rbi] { return b }
        guard rbi < s.refTable.count, s.refTable[rbi] != 0 else { return nil }
        let b = try file.read(count: Int(clusterSize), at: s.refTable[rbi])
        if s.refBlocks.count >= Self.cachedTables {
            if let k = s.refBlocks.keys.first(where: { s.dirtyRefs[$0] == nil }) { s.refBlocks[k] = nil } else {
                try writeDirtyRefcounts(&s)
                if let k = s.refBlocks.keys.first { s.refBlocks[k] = nil }
            }
        }
        s.refBlocks[rbi] = b
        return b
    }

    /// Writes the refcount entries changed since they were last written.
    func writeDirtyRefcounts(_ s: inout State) throws(QCOW2Error) {
        for (rbi, r) in s.dirtyRefs.sorted(by: { $0.key < $1.key }) {
            guard let b = s.refBlocks[rbi] else { continue }
            try file.write(Array(b[(r.lowerBound * 2)..<(r.upperBound * 2)]), at: s.refTable[rbi] + UInt64(r.lowerBound * 2))
        }
        s.dirtyRefs.removeAll(keepingCapacity: true)
    }

    func refcount(of cluster: UInt64, _ s: inout State) throws(QCOW2Error) -> UInt64 {
        guard let b = try refBlock(Int(cluster / refsPerBlock), &s) else { return 0 }
        return Self.refcount(b, Int(cluster % refsPerBlock), order: header.refcountOrder)
    }

    /// Sets the refcounts of `clusters` (consecutive) to `value`, in memory: the file gets
    /// them at the next sync (before the mappings that need them) or when the block leaves
    /// the cache. Only for 16-bit refcounts (what a writable file has).
    func setRefcounts(_ clusters: Range<UInt64>, to value: UInt16, _ s: inout State) throws(QCOW2Error) {
        var c = clusters.lowerBound
        while c < clusters.upperBound {
            let rbi = Int(c / refsPerBlock)
            try ensureRefBlock(rbi, &s)
            let first = Int(c % refsPerBlock)
            let n = Int(min(clusters.upperBound - c, refsPerBlock - UInt64(first)))
            // In place: the cached block is not copied.
            s.refBlocks[rbi]!.withUnsafeMutableBytes { b in
                for i in first..<(first + n) {
                    b[i * 2] = UInt8(value >> 8)
                    b[i * 2 + 1] = UInt8(value & 0xff)
                }
            }
            let r = first..<(first + n)
            s.dirtyRefs[rbi] = s.dirtyRefs[rbi].map { min($0.lowerBound, r.lowerBound)..<max($0.upperBound, r.upperBound) } ?? r
            c += UInt64(n)
        }
    }

    /// Makes refcount block `rbi` exist (in memory and the file), taking its cluster from
    /// the end of the file.
    func ensureRefBlock(_ rbi: Int, _ s: inout State) throws(QCOW2Error) {
        if try refBlock(rbi, &s) != nil { return }
        guard rbi < s.refTable.count else { throw .refcountTableFull(path: path, cluster: UInt64(rbi) * refsPerBlock) }
        // A fresh cluster (past all the file held) reads as zeros: the block's own
        // refcount goes out first, then the table entry that points at it.
        let c = s.nextCluster
        s.nextCluster += 1
        s.refBlocks[rbi] = [UInt8](repeating: 0, count: Int(clusterSize))
        s.refTable[rbi] = c * clusterSize
        try setRefcounts(c..<(c + 1), to: 1, &s)
        try writeDirtyRefcounts(&s)
        var e = [UInt8](repeating: 0, count: 8)
        put64(&e, 0, c * clusterSize)
        try file.write(e, at: header.refcountTableOffset + UInt64(rbi * 8))
    }

    /// Takes `count` consecutive clusters from the end of the file, refcount 1 each.
    func reserve(_ count: Int, _ s: inout State) throws(QCOW2Error) -> UInt64 {
        let first = s.nextCluster
        s.nextCluster += UInt64(count)
        try setRefcounts(first..<(first + UInt64(count)), to: 1, &s)
        s.allocatedSinceSync += count
        return first
    }

    /// The clusters a mapping holds (for freeing it once nothing points at it).
    func clusters(of m: Mapping) -> [UInt64] {
        switch m {
        case .unallocated, .zero(nil): return []
        case .zero(let h?): return [h / clusterSize]
        case .data(let h, _): return [h / clusterSize]
        case .compressed(let h, let n):
            let a = h / clusterSize, b = (h + UInt64(max(n, 1)) - 1) / clusterSize
            return Array(a...b)
        }
    }

    /// Points cluster `ci`'s L2 entry at `entry` (in memory; the file gets it at sync),
    /// making the L2 table first if the L1 entry has none. The old mapping's clusters are
    /// freed after the next sync.
    func setEntry(_ ci: UInt64, _ entry: UInt64, _ s: inout State) throws(QCOW2Error) {
        let per = clusterSize / 8
        let l1i = Int(ci / per), l2i = Int(ci % per)
        guard l1i < s.l1.count else { throw .outOfRange(path: path, offset: ci * clusterSize, length: clusterSize, size: s.size) }
        if s.l1[l1i] & Self.offsetMask == 0 {
            let c = try reserve(1, &s)
            s.l2[l1i] = [UInt64](repeating: 0, count: Int(per))
            s.l1[l1i] = c * clusterSize | Self.copiedBit
            s.dirtyL1.insert(l1i)
        }
        let old = try decode(try l2Table(l1i, &s)[l2i])
        s.l2[l1i]![l2i] = entry  // in place: the table is not copied
        s.dirtyL2.insert(l1i)
        s.pendingFrees += clusters(of: old)
    }

    /// Publishes the in-memory tables: data and refcounts durable, then the dirty L2
    /// tables and L1 entries, durable; then the refcounts of clusters nothing points at
    /// any more drop (punching their space). `allocating` held alone.
    func syncLocked() throws(QCOW2Error) {
        guard writable else { return }
        try state.withLock { (s) throws(QCOW2Error) in try writeDirtyRefcounts(&s) }
        try file.sync()
        let (tables, l1Runs): ([(UInt64, [UInt8])], [(UInt64, [UInt8])]) = state.withLock { s in
            var tables: [(UInt64, [UInt8])] = []
            for i in s.dirtyL2.sorted() {
                guard let t = s.l2[i] else { continue }
                var raw = [UInt8](repeating: 0, count: t.count * 8)
                for (k, e) in t.enumerated() { put64(&raw, k * 8, e) }
                tables.append((s.l1[i] & Self.offsetMask, raw))
            }
            var runs: [(UInt64, [UInt8])] = []
            for i in s.dirtyL1.sorted() {
                var e = [UInt8](repeating: 0, count: 8)
                put64(&e, 0, s.l1[i])
                let at = s.l1Offset + UInt64(i * 8)
                if let last = runs.last, last.0 + UInt64(last.1.count) == at { runs[runs.count - 1].1 += e } else { runs.append((at, e)) }
            }
            return (tables, runs)
        }
        guard !tables.isEmpty || !l1Runs.isEmpty || state.withLock({ !$0.pendingFrees.isEmpty }) else { return }
        for (off, raw) in tables { try file.write(raw, at: off) }
        for (off, raw) in l1Runs { try file.write(raw, at: off) }
        try file.sync()
        try state.withLock { (s) throws(QCOW2Error) in
            s.dirtyL2.removeAll()
            s.dirtyL1.removeAll()
            s.allocatedSinceSync = 0
            let frees = s.pendingFrees
            s.pendingFrees.removeAll()
            for c in frees {
                let r = try refcount(of: c, &s)
                guard r > 0 else { continue }
                try setRefcounts(c..<(c + 1), to: UInt16(r - 1), &s)
                if r == 1 { file.punch(c * clusterSize, clusterSize) }
            }
            // Lost in a crash these would only leak the clusters; the next sync or the
            // close's data sync makes them durable.
            try writeDirtyRefcounts(&s)
        }
    }

    /// Whether enough is waiting to be published.
    func syncDue() -> Bool {
        state.withLock { $0.allocatedSinceSync >= Self.syncAfterClusters || $0.dirtyL2.count >= Self.syncAfterDirtyTables }
    }

    /// Syncs if enough is waiting to be published. `allocating` held alone.
    func syncIfDue() throws(QCOW2Error) {
        if syncDue() { try syncLocked() }
    }

    public func flush() throws(QCOW2Error) {
        guard writable else { return }
        allocating.lockExclusive()
        defer { allocating.unlock() }
        // Closed meanwhile (a reader's open may race the writer's close): the close synced.
        if state.withLock({ $0.closed }) { return }
        try syncLocked()
        try file.sync()
    }

    /// A clean close: everything published and synced, then the dirty bit cleared.
    public func close() {
        let first = state.withLock { s in
            if s.closed { return false }
            s.closed = true
            return true
        }
        guard first else { return }
        if writable {
            allocating.lockExclusive()
            if (try? syncLocked()) != nil, (try? file.sync()) != nil {
                var h = header
                h.incompatibleFeatures &= ~QCOW2Header.Incompatible.dirty
                h.autoclearFeatures = 0
                try? writeFeatureFields(h)
            }
            allocating.unlock()
        }
        file.close()
        if let k = writerKey { _ = Self.writers.withLock { $0.removeValue(forKey: k) } }
    }
}

extension QCOW2File {
    /// Grows the disk to `newSize`: a larger L1 table where needed (written whole and
    /// synced before the header points at it, in one sector with the new size).
    func grow(to newSize: UInt64) throws(QCOW2Error) {
        guard writable else { throw .readOnly(path: path) }
        allocating.lockExclusive()
        defer { allocating.unlock() }
        guard newSize > size else { return }
        let need = QCOW2Header.l1Entries(size: newSize, clusterBits: UInt32(clusterBits))
        try syncLocked()
        var fields = [UInt8](repeating: 0, count: 24)  // bytes 24..<48: size, l1_size, l1_table_offset
        put64(&fields, 0, newSize)
        if need > UInt64(state.withLock { $0.l1.count }) {
            let bytes = need * 8, clusters = (bytes + clusterSize - 1) / clusterSize
            let (old, base) = try state.withLock { (s) throws(QCOW2Error) in
                ((s.l1Offset, UInt64(s.l1.count)), try reserve(Int(clusters), &s))
            }
            var raw = [UInt8](repeating: 0, count: Int(clusters * clusterSize))
            let l1 = state.withLock { $0.l1 }
            for (i, e) in l1.enumerated() { put64(&raw, i * 8, e) }
            try file.write(raw, at: base * clusterSize)
            try file.sync()
            put32(&fields, 12, UInt32(need))
            put64(&fields, 16, base * clusterSize)
            try file.write(fields, at: 24)
            try file.sync()
            try state.withLock { (s) throws(QCOW2Error) in
                s.l1 += [UInt64](repeating: 0, count: Int(need) - s.l1.count)
                s.l1Offset = base * clusterSize
                let first = old.0 / clusterSize, n = (old.1 * 8 + clusterSize - 1) / clusterSize
                try setRefcounts(first..<(first + n), to: 0, &s)
                file.punch(first * clusterSize, n * clusterSize)
            }
        } else {
            try file.write(Array(fields[0..<8]), at: 24)
            try file.sync()
        }
        state.withLock { $0.size = newSize }
    }
}
