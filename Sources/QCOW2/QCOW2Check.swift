// The refcount scan: every cluster's references counted from the structures (header,
// L1, L2 tables, data, refcount table and blocks) and compared with its refcount, as
// `qemu-img check` does. Leaks (a refcount above the references) are what a crash can
// leave; a writable open of a file left dirty frees them. A refcount below the
// references, an entry outside the file, or a COPIED flag that disagrees with the
// refcount is damage.

public struct QCOW2CheckReport: Sendable, Equatable {
    public var leakedClusters = 0
    /// The first `describedErrors` errors, described.
    public var errors: [String] = []
    /// Every error found: a damaged table can hold thousands, which are counted, not each
    /// described.
    public var errorCount = 0
    public static let describedErrors = 100
    public var isClean: Bool { leakedClusters == 0 && errorCount == 0 }

    mutating func error(_ text: @autoclosure () -> String) {
        errorCount += 1
        if errors.count < Self.describedErrors { errors.append(text()) }
    }

    public var summary: String? {
        if isClean { return nil }
        var parts = errors.prefix(5).map { $0 }
        if errorCount > 5 { parts.append("and \(errorCount - 5) more errors") }
        if leakedClusters > 0 { parts.append("\(leakedClusters) leaked clusters") }
        return parts.joined(separator: "; ")
    }
}

extension QCOW2File {
    /// References per cluster, from the structures.
    func countReferences(_ report: inout QCOW2CheckReport) throws(QCOW2Error) -> [UInt64: UInt64] {
        var refs: [UInt64: UInt64] = [:]
        let cs = clusterSize
        func add(_ offset: UInt64, _ bytes: UInt64, _ what: String) {
            guard bytes > 0 else { return }
            for c in (offset / cs)...((offset + bytes - 1) / cs) { refs[c, default: 0] += 1 }
        }
        let h = header
        let s0 = state.withLock { ($0.l1, $0.refTable, $0.l1Offset) }
        add(0, cs, "header")
        add(s0.2, UInt64(s0.0.count) * 8, "L1 table")
        add(h.refcountTableOffset, UInt64(h.refcountTableClusters) * cs, "refcount table")
        if h.snapshotCount > 0 {
            report.error("internal snapshots are not checked here (qemu-img check them)")
        }
        for e in s0.1 where e != 0 { add(e, cs, "refcount block") }
        let length = try file.length
        for (i, e) in s0.0.enumerated() {
            let off = e & Self.offsetMask
            guard off != 0 else { continue }
            guard off + cs <= max(length, state.withLock { $0.nextCluster } * cs) else {
                report.error("L1[\(i)] points past the end of the file (\(off))")
                continue
            }
            add(off, cs, "L2 table")
            let table = try state.withLock { (s) throws(QCOW2Error) in try l2Table(i, &s) }
            for (k, raw) in table.enumerated() {
                let m: Mapping
                do { m = try decode(raw) } catch {
                    report.error("L2 entry \(k) of table \(i): \(error)")
                    continue
                }
                switch m {
                case .unallocated, .zero(nil): break
                case .zero(let host?), .data(let host, _): add(host, cs, "data")
                case .compressed(let host, let n): add(host, UInt64(n), "compressed data")
                }
            }
        }
        return refs
    }

    /// Counts references and compares them with the refcounts.
    public func check() throws(QCOW2Error) -> QCOW2CheckReport {
        var report = QCOW2CheckReport()
        let refs = try countReferences(&report)
        try compare(refs, &report, fix: false)
        return report
    }

    func compare(_ refs: [UInt64: UInt64], _ report: inout QCOW2CheckReport, fix: Bool) throws(QCOW2Error) {
        let order = header.refcountOrder
        let per = refsPerBlock
        try state.withLock { (s) throws(QCOW2Error) in
            // Every cluster with a refcount (found eight bytes of the block at a time: most
            // of a block is zeros), then every referenced one without.
            let perWord = 64 >> Int(order)
            var referencedWithRefcount = 0
            for rbi in s.refTable.indices where s.refTable[rbi] != 0 {
                guard let b = try refBlock(rbi, &s) else { continue }
                let words = b.withUnsafeBytes { raw in
                    (0..<(raw.count / 8)).filter { raw.loadUnaligned(fromByteOffset: $0 * 8, as: UInt64.self) != 0 }
                }
                for i in words.flatMap({ ($0 * perWord)..<(($0 + 1) * perWord) }) {
                    let c = UInt64(rbi) * per + UInt64(i)
                    let stored = Self.refcount(b, i, order: order)
                    guard stored != 0 else { continue }
                    let want = refs[c] ?? 0
                    if want > 0 { referencedWithRefcount += 1 }
                    if stored > want {
                        report.leakedClusters += 1
                        if fix {
                            try setRefcounts(c..<(c + 1), to: UInt16(want), &s)
                            if want == 0 { file.punch(c * clusterSize, clusterSize) }
                        }
                    } else if stored < want {
                        report.error("cluster \(c): refcount \(stored), referenced \(want) times")
                        if fix { try setRefcounts(c..<(c + 1), to: UInt16(want), &s) }
                    }
                }
            }
            // A sound file has none: then the referenced clusters are not visited again.
            // (In order when there are: the refcount blocks are read once each.)
            let withoutRefcount = referencedWithRefcount == refs.count ? [] : refs.sorted(by: { $0.key < $1.key })
            for (c, want) in withoutRefcount where try refcount(of: c, &s) == 0 {
                report.error("cluster \(c): no refcount, referenced \(want) times")
                if fix { try setRefcounts(c..<(c + 1), to: UInt16(want), &s) }
            }
            // COPIED must say exactly whether the refcount is 1.
            for i in s.l1.indices where s.l1[i] & Self.offsetMask != 0 {
                let l2 = s.l1[i] & Self.offsetMask
                if (try refcount(of: l2 / clusterSize, &s) == 1) != (s.l1[i] & Self.copiedBit != 0) {
                    report.error("L1[\(i)]: COPIED flag disagrees with the refcount")
                    if fix { s.l1[i] ^= Self.copiedBit; s.dirtyL1.insert(i) }
                }
                let t = try l2Table(i, &s)
                for (k, raw) in t.enumerated() where raw & Self.compressedBit == 0 && raw & Self.offsetMask != 0 {
                    let host = raw & Self.offsetMask
                    if (try refcount(of: host / clusterSize, &s) == 1) != (raw & Self.copiedBit != 0) {
                        report.error("L2 entry \(k) of table \(i): COPIED flag disagrees with the refcount")
                        if fix { s.l2[i]![k] ^= Self.copiedBit; s.dirtyL2.insert(i) }
                    }
                }
            }
        }
    }

    /// Frees leaked clusters (and mends refcounts below the references) of a file left
    /// dirty; called by a writable open.
    func repair() throws(QCOW2Error) {
        var report = QCOW2CheckReport()
        let refs = try countReferences(&report)
        allocating.lockExclusive()
        defer { allocating.unlock() }
        try compare(refs, &report, fix: true)
        try syncLocked()
        try file.sync()
        repairReport.withLock { $0 = report }
    }
}
