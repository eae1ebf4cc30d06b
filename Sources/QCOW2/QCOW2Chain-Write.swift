// Writes and zeroing through the leaf. A cluster the leaf holds with refcount 1 is
// written in place; any other cluster the write touches gets a new cluster at the end of
// the file, filled with the old contents (from the leaf's zero flag or compressed data,
// or from the backing files) around the new bytes, and is pointed at only after its data
// is written (see QCOW2File.swift for the crash order).

import Image

extension QCOW2Chain {
    func gate(_ g: (() throws -> Void)?) throws(QCOW2Error) {
        guard let g else { return }
        do { try g() } catch { throw .notPublished(path: leaf.path) }
    }

    public func write(_ data: UnsafeRawBufferPointer, at offset: UInt64, beforeVisible: (() throws -> Void)?) throws {
        guard writable else { throw QCOW2Error.readOnly(path: leaf.path) }
        try checkRange(offset, UInt64(data.count))
        guard data.count > 0 else { return }
        let f = leaf, cs = f.clusterSize
        let first = offset / cs, end = offset + UInt64(data.count), last = (end - 1) / cs
        // Every cluster held in place: no allocation, no lock beyond the lookup.
        let maps = try f.mappings(first: first, end: last + 1)
        if let hosts = Self.inPlace(maps) {
            try gate(beforeVisible)
            try writeInPlace(data, at: offset, hosts: hosts, first: first)
            return
        }
        // Copy-ups of other clusters go on meanwhile; a sync waits for this one.
        f.allocating.lockShared()
        f.filling.acquire(first...last)
        do {
            defer {
                f.filling.release(first...last)
                f.allocating.unlock()
            }
            try writeLocked(data, at: offset, beforeVisible: beforeVisible)
        }
        if f.syncDue() {
            f.allocating.lockExclusive()
            defer { f.allocating.unlock() }
            try f.syncIfDue()
        }
    }

    /// The host clusters of `maps` if every one is data with refcount 1.
    static func inPlace(_ maps: [Mapping]) -> [UInt64]? {
        var hosts: [UInt64] = []
        hosts.reserveCapacity(maps.count)
        for m in maps {
            guard case .data(let h, true) = m else { return nil }
            hosts.append(h)
        }
        return hosts
    }

    func writeInPlace(_ data: UnsafeRawBufferPointer, at offset: UInt64, hosts: [UInt64], first: UInt64) throws(QCOW2Error) {
        let cs = leaf.clusterSize, end = offset + UInt64(data.count)
        var pos = offset
        // Runs of clusters adjacent in the file go out as one write.
        var i = 0
        while i < hosts.count {
            var j = i + 1
            while j < hosts.count, hosts[j] == hosts[j - 1] + cs { j += 1 }
            let runEnd = min((first + UInt64(j)) * cs, end)
            let host = hosts[i] + (pos - (first + UInt64(i)) * cs)
            try leaf.file.write(UnsafeRawBufferPointer(rebasing: data[Int(pos - offset)..<Int(runEnd - offset)]), at: host)
            pos = runEnd
            i = j
        }
    }

    /// A write that allocates (`allocating` held alone, or shared with its clusters in `filling`).
    func writeLocked(_ data: UnsafeRawBufferPointer, at offset: UInt64, beforeVisible: (() throws -> Void)?) throws(QCOW2Error) {
        let f = leaf, cs = f.clusterSize
        let first = offset / cs, end = offset + UInt64(data.count), last = (end - 1) / cs
        let maps = try f.mappings(first: first, end: last + 1)
        var fresh: [UInt64] = []
        var inPlace: [(ci: UInt64, host: UInt64)] = []
        for (k, m) in maps.enumerated() {
            if case .data(let h, true) = m { inPlace.append((first + UInt64(k), h)) } else { fresh.append(first + UInt64(k)) }
        }
        let base = try f.state.withLock { (s) throws(QCOW2Error) in try f.reserve(fresh.count, &s) }
        // A fresh cluster lies past all the file ever held (clusters come from its end and
        // are not reused while it is open), so what is not written there reads as zeros:
        // only the new bytes and the old contents that are not zeros go out. A small
        // write into a cluster no layer holds writes only itself, not a whole cluster.
        var pieces: [(host: UInt64, bytes: UnsafeRawBufferPointer)] = []
        var temps: [UnsafeMutableRawBufferPointer] = []
        defer { for t in temps { t.deallocate() } }
        do {
            for (j, ci) in fresh.enumerated() {
                let host = (base + UInt64(j)) * cs
                let cStart = ci * cs, cEnd = cStart + cs
                let a = max(cStart, offset), b = min(cEnd, end)
                let new = UnsafeRawBufferPointer(rebasing: data[Int(a - offset)..<Int(b - offset)])
                if a == cStart && b == cEnd {
                    pieces.append((host, new))
                    continue
                }
                let t = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(cs), alignment: 4096)
                temps.append(t)
                let zeros = try oldContents(of: ci, maps[Int(ci - first)], into: t)
                let own = Int(a - cStart)..<Int(b - cStart)
                UnsafeMutableRawBufferPointer(rebasing: t[own]).copyMemory(from: new)
                for r in Self.written(Int(cs), zeros: zeros, own: own) {
                    pieces.append((host + UInt64(r.lowerBound), UnsafeRawBufferPointer(rebasing: t[r])))
                }
            }
            try f.file.write(pieces: pieces)
            try gate(beforeVisible)
        } catch {
            // Nothing points at the new clusters: they go back after the next sync.
            f.state.withLock { $0.pendingFrees += (base..<(base + UInt64(fresh.count))).map { $0 } }
            throw error
        }
        for (ci, host) in inPlace {
            let cStart = ci * cs
            let a = max(cStart, offset), b = min(cStart + cs, end)
            try f.file.write(UnsafeRawBufferPointer(rebasing: data[Int(a - offset)..<Int(b - offset)]), at: host + (a - cStart))
        }
        try f.state.withLock { (s) throws(QCOW2Error) in
            for (j, ci) in fresh.enumerated() {
                try f.setEntry(ci, (base + UInt64(j)) * cs | QCOW2File.copiedBit, &s)
            }
        }
    }

    /// The parts of a fresh cluster to write: all but the stretches that read as zeros
    /// (`zeros`, in order), with the new bytes (`own`) always.
    static func written(_ size: Int, zeros: [Range<Int>], own: Range<Int>) -> [Range<Int>] {
        var keep: [Range<Int>] = [own]
        var at = 0
        for z in zeros + [size..<size] {
            if z.lowerBound > at { keep.append(at..<z.lowerBound) }
            at = max(at, z.upperBound)
        }
        keep.sort { $0.lowerBound < $1.lowerBound }
        var out: [Range<Int>] = []
        for r in keep where !r.isEmpty {
            if let last = out.last, r.lowerBound <= last.upperBound {
                out[out.count - 1] = last.lowerBound..<max(last.upperBound, r.upperBound)
            } else {
                out.append(r)
            }
        }
        return out
    }

    /// What cluster `ci` of the leaf reads as now, whole (zeros past the disk's end).
    /// Returns the stretches of it that read as zeros because nothing holds them.
    func oldContents(of ci: UInt64, _ m: Mapping, into t: UnsafeMutableRawBufferPointer) throws(QCOW2Error) -> [Range<Int>] {
        let f = leaf, cs = f.clusterSize
        switch m {
        case .zero:
            t.initializeMemory(as: UInt8.self, repeating: 0)
            return [0..<Int(cs)]
        case .data(let h, _):
            try f.file.read(into: t, at: h)
            return []
        case .compressed(let h, let n):
            let c = try f.inflate(host: h, bytes: n)
            c.withUnsafeBytes { t.copyMemory(from: $0) }
            return []
        case .unallocated:
            let start = ci * cs
            let n = start < f.size ? min(cs, f.size - start) : 0
            t.initializeMemory(as: UInt8.self, repeating: 0)
            var holes: [Range<Int>] = []
            if n > 0 {
                try fill(UnsafeMutableRawBufferPointer(rebasing: t[0..<Int(n)]), try pieces(start, n, from: 1), cachedOnly: false, holes: &holes)
            }
            if Int(n) < Int(cs) { holes.append(Int(n)..<Int(cs)) }
            return holes.sorted { $0.lowerBound < $1.lowerBound }
        }
    }

    public func writeZeroes(offset: UInt64, length: UInt64, punch: Bool, fastOnly: Bool) throws {
        guard writable else { throw QCOW2Error.readOnly(path: leaf.path) }
        try checkRange(offset, length)
        guard length > 0 else { return }
        let f = leaf, cs = f.clusterSize, size = f.size
        let end = offset + length
        f.allocating.lockExclusive()
        defer { f.allocating.unlock() }
        // Plan first, so `fastOnly` fails before anything changes.
        var flags: [UInt64] = []
        var partial: [Range<UInt64>] = []
        var ci = offset / cs
        for run in try f.mappingRuns(first: ci, end: (end - 1) / cs + 1) {
            defer { ci += run.count }
            if run.m == .zero(host: nil) { continue }
            // Clusters of the run that read as anything but zeros (for a run the leaf
            // does not hold: those some backing file holds).
            var busy: [Range<UInt64>] = []
            let runRange = (ci * cs)..<min((ci + run.count) * cs, size)
            if run.m == .unallocated {
                var at = runRange.lowerBound
                for p in try pieces(runRange.lowerBound, UInt64(runRange.count), from: 1) {
                    if case .zeros = p {} else { busy.append(at..<(at + UInt64(p.count))) }
                    at += UInt64(p.count)
                }
            } else if case .zero = run.m {
                // A zero cluster that keeps a host cluster reads as zeros already; a
                // punch gives the cluster back.
                let c = ci
                if punch, c * cs >= offset, min((c + 1) * cs, size) <= end { flags.append(c) }
                continue
            } else {
                busy = [runRange]
            }
            for r in busy {
                var c = r.lowerBound / cs
                while c * cs < r.upperBound {
                    let cr = (c * cs)..<min((c + 1) * cs, size)
                    if cr.lowerBound >= offset && cr.upperBound <= end {
                        if flags.last != c { flags.append(c) }
                    } else {
                        let z = max(cr.lowerBound, offset)..<min(cr.upperBound, end)
                        if !z.isEmpty, partial.last != z { partial.append(z) }
                    }
                    c += 1
                }
            }
        }
        if fastOnly && !partial.isEmpty { throw QCOW2Error.zeroingNotFast(path: f.path) }
        try f.state.withLock { (s) throws(QCOW2Error) in
            for c in flags { try f.setEntry(c, 1, &s) }
        }
        if !partial.isEmpty {
            let zeros = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(cs), alignment: 4096)
            defer { zeros.deallocate() }
            zeros.initializeMemory(as: UInt8.self, repeating: 0)
            for z in partial {
                try writeLocked(UnsafeRawBufferPointer(rebasing: zeros[0..<z.count]), at: z.lowerBound, beforeVisible: nil)
            }
        }
        try f.syncIfDue()
    }
}
