// The two merges of the collector (see the design notes in Collector.swift): a hidden
// layer into its hidden parent, and a leaf into its hidden parent.

import Foundation
import GRDB
import Image

extension Collector {
    /// Copies `runs` of `source` into `target`, a chunk at a time, throttled.
    func copy(runs: [Range<UInt64>], from source: (UnsafeMutableRawBufferPointer, UInt64) throws -> Void,
              into target: any DiskImage, family: String) throws -> UInt64 {
        let buf = UnsafeMutableRawBufferPointer.allocate(byteCount: Self.chunk, alignment: 4096)
        defer { buf.deallocate() }
        var copied: UInt64 = 0
        var lastOps = sr.foregroundOps(excluding: family)
        // SR other_config:gc-rate-limit: MiB/s an administrator allows the collector.
        let limit = (try? sr.otherConfig()["gc-rate-limit"]).flatMap { $0.flatMap(Double.init) }.map { $0 * 1048576 }
        let began = DispatchTime.now().uptimeNanoseconds
        for run in runs {
            var pos = run.lowerBound
            while pos < run.upperBound {
                let n = Int(min(UInt64(Self.chunk), run.upperBound - pos))
                let started = DispatchTime.now().uptimeNanoseconds
                let piece = UnsafeMutableRawBufferPointer(rebasing: buf[0..<n])
                try source(piece, pos)
                try target.write(UnsafeRawBufferPointer(piece), at: pos)
                pos += UInt64(n)
                copied += UInt64(n)
                stepHook?("copy")
                if let limit, limit > 0 {
                    let due = Double(copied) / limit * 1e9, spent = Double(DispatchTime.now().uptimeNanoseconds - began)
                    if due > spent { usleep(useconds_t(min((due - spent) / 1000, 5e6))) }
                }
                if throttle {
                    let ops = sr.foregroundOps(excluding: family)
                    if ops != lastOps {
                        // Other VDIs are busy: a quarter of the time for the merge.
                        let took = DispatchTime.now().uptimeNanoseconds - started
                        usleep(useconds_t(min(3 * took / 1000, 300_000)))
                    }
                    lastOps = ops
                }
            }
        }
        return copied
    }

    /// Runs a merge under a journal entry: written before `body`, advanced to `switching`
    /// when `body` calls `switching()` (the copy is complete and synced), removed when
    /// `body` returns or throws (a dropped copy needs no undo; a switch once journalled
    /// that failed here is redone at the next start-up only if the process dies first).
    func journalled<T>(_ op: JournalEntry.Operation, child: String, parent: String,
                       _ body: (_ switching: () throws -> Void) throws -> T) throws -> T {
        var entry = JournalEntry(id: UUID().uuidString.lowercased(), operation: op, child: child, parent: parent,
                                 phase: .copying, started: Date())
        try sr.journal.write(entry)
        defer { sr.journal.remove(entry.id) }
        return try body {
            entry.phase = .switching
            try sr.journal.write(entry)
            stepHook?("switch")
        }
    }

    func checkSpace(for path: String) throws {
        let needed = sr.allocatedBytes(path) + (64 << 20)
        let free = sr.freeBytes()
        if needed > free { throw NoSpace(needed: needed, free: free) }
    }

    // MARK: non-leaf

    /// Merges hidden `x` into its hidden parent `p` (whose only child it is), then relinks
    /// x's children to p and deletes x.
    func coalesce(_ x: String, into p: String) throws {
        guard let xr = try sr.anyRecord(x) else { return }
        let xPath = sr.imagePath(x), pPath = sr.imagePath(p)
        // A chain is one format: the parent's is the child's.
        let format = sr.format(of: p)
        try checkSpace(for: xPath)
        let started = Date()
        let bytes = try journalled(.coalesce, child: x, parent: p) { switching -> UInt64 in
            let source = try format.openLayer(path: xPath)
            defer { source.close() }
            if try format.virtualSize(ofFile: pPath) < source.virtualSize {
                try format.grow(path: pPath, to: source.virtualSize)
            }
            let target = try format.open(path: pPath, writable: true)
            defer { target.close() }
            let runs = try source.leafDataRuns(offset: 0, length: source.virtualSize)
            let bytes = try copy(runs: runs, from: { b, o in try source.read(into: b, at: o) }, into: target, family: xr.family)
            try target.flush()
            try sr.withFamilyLock(xr.family) {
                if let why = sr.familyKept(xr.family) { throw Gave(reason: why) }
                guard let x2 = try sr.anyRecord(x), !x2.managed, x2.parent == p, let p2 = try sr.anyRecord(p), !p2.managed,
                      try sr.dbRead({ try VDIRecord.filter(Column("parent") == p).fetchCount($0) }) == 1
                else { throw Gave(reason: "the chain changed during the copy") }
                try switching()
                try sr.finishCoalesce(x, into: p)
            }
            return bytes
        }
        StorageMetrics.coalesces.increment()
        StorageMetrics.coalescedBytes.increment(by: Int(bytes))
        sr.logger.info("collector: coalesced \(x) into \(p) (\(bytes) bytes in \(String(format: "%.2f", Date().timeIntervalSince(started))) s)")
    }

    // MARK: leaf

    /// Merges leaf `c` into its hidden parent `p` (whose only child it is); p's file then
    /// replaces c's, so the VDI keeps its uuid and reads one layer fewer.
    func leafCoalesce(_ c: String, into p: String) throws {
        guard let cr = try sr.anyRecord(c) else { return }
        let cPath = sr.imagePath(c), pPath = sr.imagePath(p)
        let format = sr.format(of: p)
        try checkSpace(for: cPath)
        let started = Date()
        let bytes = try journalled(.leafCoalesce, child: c, parent: p) { switching -> UInt64 in
            // From here every write to c, on any handle, is tracked.
            let (tracker, source) = try sr.startTracking(c, family: cr.family) { try format.openLayer(path: cPath) }
            defer { source.close() }
            defer { sr.stopTracking(c, family: cr.family, tracker) }
            let size = source.virtualSize
            if try format.virtualSize(ofFile: pPath) < size { try format.grow(path: pPath, to: size) }
            let target = try format.open(path: pPath, writable: true)
            var targetOpen = true
            defer { if targetOpen { target.close() } }
            var bytes: UInt64 = 0
            // The layer was opened after the tracker: what it misses was written since, and is marked.
            let runs = try source.leafDataRuns(offset: 0, length: size)
            bytes += try copy(runs: runs, from: { b, o in try source.read(into: b, at: o) }, into: target, family: cr.family)
            // Catch up online while clients keep writing much.
            for _ in 0..<4 where tracker.count > 32 {
                let again = try leafRuns(of: c, within: tracker.take(size: size))
                bytes += try copy(runs: again, from: { b, o in try self.readThroughVDI(c, into: b, at: o) }, into: target, family: cr.family)
            }
            try sr.withFamilyLock(cr.family) {
                if let why = sr.familyKept(cr.family) { throw Gave(reason: why) }
                guard let c2 = try sr.anyRecord(c), c2.parent == p, let p2 = try sr.anyRecord(p), !p2.managed,
                      try sr.dbRead({ try VDIRecord.filter(Column("parent") == p).fetchCount($0) }) == 1,
                      try sr.dbRead({ try VDIRecord.filter(Column("parent") == c).fetchCount($0) }) == 0
                else { throw Gave(reason: "the chain changed during the copy") }
                func switchOver(_ chain: (any DiskImage)?) throws {
                    // I/O is held off: copy the rest, then the parent takes the leaf's place.
                    let rest = tracker.take(size: size)
                    if let chain {
                        try chain.flush()
                        let own = try Self.leafRuns(of: chain, within: rest)
                        bytes += try copy(runs: own, from: { b, o in try chain.read(into: b, at: o) }, into: target, family: cr.family)
                    } else if !rest.isEmpty {
                        let chain = try format.open(path: cPath, writable: false)
                        defer { chain.close() }
                        let own = try Self.leafRuns(of: chain, within: rest)
                        bytes += try copy(runs: own, from: { b, o in try chain.read(into: b, at: o) }, into: target, family: cr.family)
                    }
                    try target.flush()
                    target.close()
                    targetOpen = false
                    try switching()
                    try sr.finishLeafCoalesce(c, into: p)
                }
                if let h = sr.lookUp(c) {
                    try h.exclusively { old in
                        try switchOver(old)
                        h.tracker = nil
                        let new = try format.open(path: cPath, writable: old.writable)
                        old.close()
                        return new
                    }
                } else {
                    try switchOver(nil)
                }
            }
            return bytes
        }
        StorageMetrics.coalesces.increment()
        StorageMetrics.coalescedBytes.increment(by: Int(bytes))
        sr.logger.info("collector: leaf-coalesced \(c) into \(p) (\(bytes) bytes in \(String(format: "%.2f", Date().timeIntervalSince(started))) s)")
    }

    /// The parts of `ranges` (the tracker's 2 MiB units) that the leaf holds: only those
    /// are the leaf's to merge. The rest reads through to the parent, which has it already;
    /// copying it would write the parent's own bytes (or zeros no layer holds) into the
    /// parent again, allocating them in a format with smaller units than the tracker's
    /// (qcow2's 64 KiB clusters). A leaf never gives up space it held (it would show its
    /// parent there), so what it held and was copied before is still within these.
    static func leafRuns(of chain: any DiskImage, within ranges: [Range<UInt64>]) throws -> [Range<UInt64>] {
        try ranges.flatMap { try chain.leafDataRuns(offset: $0.lowerBound, length: UInt64($0.count)) }
    }

    func leafRuns(of uuid: String, within ranges: [Range<UInt64>]) throws -> [Range<UInt64>] {
        if let h = sr.lookUp(uuid) { return try h.withChain { try Self.leafRuns(of: $0, within: ranges) } }
        let chain = try sr.format(of: uuid).open(path: sr.imagePath(uuid), writable: false)
        defer { chain.close() }
        return try Self.leafRuns(of: chain, within: ranges)
    }

    /// Reads the VDI's bytes as clients see them (through its handle when open).
    func readThroughVDI(_ uuid: String, into b: UnsafeMutableRawBufferPointer, at o: UInt64) throws {
        if let h = sr.lookUp(uuid) {
            try h.read(into: b, at: o)
        } else {
            let chain = try sr.format(of: uuid).open(path: sr.imagePath(uuid), writable: false)
            defer { chain.close() }
            try chain.read(into: b, at: o)
        }
    }
}

extension SR {
    /// The switch of a non-leaf coalesce (family lock held, or at recovery): x's children
    /// name p as their parent, in their files and then their records; every open chain
    /// through x is reopened; x goes. Redoing it is harmless.
    func finishCoalesce(_ x: String, into p: String) throws {
        let xPath = imagePath(x), pPath = imagePath(p)
        let format = self.format(of: p)
        let kids = try dbRead { try VDIRecord.filter(Column("parent") == x).fetchAll($0) }
        let family = try anyRecord(x)?.family ?? anyRecord(p)?.family ?? ""
        let open = openHandles(family: family)
        for k in kids {
            let kPath = imagePath(k.uuid)
            if let h = open.first(where: { $0.uuid == k.uuid }) {
                try h.paused { _ in try format.setParent(ofFile: kPath, to: pPath) }
            } else {
                try format.setParent(ofFile: kPath, to: pPath)
            }
        }
        try dbWrite { db in
            for var k in kids {
                k.parent = p
                try k.update(db)
            }
            _ = try VDIRecord.deleteOne(db, key: x)
        }
        for h in open where h.withChain({ $0.layerPaths.contains(xPath) }) {
            try h.exclusively { old in
                // The same leaf file: closed before it is opened again, since one
                // writer's tables in memory are not the file's (a qcow2 leaf publishes new
                // mappings at a sync) and two writers would allocate the same clusters.
                let writable = old.writable
                try old.flush()
                old.close()
                return try format.open(path: imagePath(h.uuid), writable: writable)
            }
        }
        unlink(xPath)
        try syncDirectory()
    }

    /// The switch of a leaf coalesce: p's file replaces c's (one rename), then the records.
    /// Redoing it is harmless.
    func finishLeafCoalesce(_ c: String, into p: String) throws {
        let pPath = imagePath(p)
        if FileManager.default.fileExists(atPath: pPath) {
            guard rename(pPath, imagePath(c)) == 0 else {
                throw StorageError.vdiIOError(uuid: c, detail: "rename \(pPath): \(String(cString: strerror(errno)))")
            }
            try syncDirectory()
        }
        try dbWrite { db in
            if let pr = try VDIRecord.fetchOne(db, key: p), var cr = try VDIRecord.fetchOne(db, key: c) {
                cr.parent = pr.parent
                try cr.update(db)
                _ = try VDIRecord.deleteOne(db, key: p)
            }
        }
    }
}
