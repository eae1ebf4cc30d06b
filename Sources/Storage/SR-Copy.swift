// `VDI.copy(vdi, sr, base_vdi, into_vdi)` as seed 001 describes it: the whole VDI, or only
// the blocks that differ from `base_vdi`, into a fresh VDI or into an existing one.
//
// What is copied: without a base, the source's allocated ranges (holes stay holes; a
// chunk of zeros is skipped in a fresh target, written as zeros into an existing one, and
// an existing target's ranges the source does not hold are zeroed). With a base, the
// ranges any layer holds that the two chains do not share (a structural difference: a
// layer both read through holds the same bytes for both); when the chains share no layer,
// the contents are compared chunk by chunk. The target is written through its handle (the
// one its connections share, CBT tracked), so a client attached to it sees the copy as
// writes. A fresh target is filled without a sync per allocation and flushed once at the
// end; a copy that fails or is cancelled destroys it.

import Foundation
import Image

extension SR {
    static let copyChunk = 4 << 20

    /// `format` (xapi's `dest-img-format`): the image format of a fresh target, which may
    /// differ from the source's (a VHD VDI copied to qcow2, say); by default the source's,
    /// or `destination`'s default when it does not hold that. `destination`: the SR the
    /// target is in (by default this one); `base` may be in any SR of the pool.
    public func copy(_ uuid: String, base: String?, into: String?, format destFormat: String? = nil,
                     destination: SR? = nil, task: TaskContext?) throws -> VDIRecord {
        let dest = destination ?? self
        let src = try record(uuid)
        guard src.type != .cbtMetadata else { throw StorageError.vdiIncompatibleType(uuid: src.uuid, type: src.type.rawValue) }
        try requireFile(src)
        let baseSR = base.flatMap { pool?.holding($0) } ?? self
        let baseRec = try base.map { try baseSR.record($0) }
        if let b = baseRec {
            guard b.type != .cbtMetadata else { throw StorageError.vdiIncompatibleType(uuid: b.uuid, type: b.type.rawValue) }
            try baseSR.requireFile(b)
        }
        var target: VDIRecord
        let fresh = into == nil
        if let i = into {
            target = try dest.record(i)
            if target.uuid == src.uuid { throw StorageError.operationNotAllowed(reason: "a VDI cannot be copied into itself") }
            if target.type == .cbtMetadata { throw StorageError.vdiIncompatibleType(uuid: target.uuid, type: target.type.rawValue) }
            if target.readOnly || target.isASnapshot { throw StorageError.vdiReadonly(uuid: target.uuid) }
            try dest.requireFile(target)
            guard target.virtualSize >= src.virtualSize else {
                throw StorageError.vdiTooSmall(uuid: target.uuid, minimum: src.virtualSize)
            }
        } else {
            var cp = CreateParams(nameLabel: src.nameLabel, virtualSize: src.virtualSize)
            cp.nameDescription = src.nameDescription
            cp.tags = src.tags
            let own = format(of: src.uuid).name
            cp.smConfig["image-format"] = destFormat ?? (dest.supportedImageFormats.contains { $0.name == own } ? own : dest.format.name)
            target = try dest.create(cp)
        }
        do {
            try copyData(from: src, base: baseRec.map { ($0, baseSR) }, into: target, in: dest, fresh: fresh, task: task)
        } catch {
            if fresh {
                try? dest.destroy(target.uuid)
                logger.info("copy of \(src.uuid) failed or was cancelled: its target \(target.uuid) is destroyed (\(error))")
            }
            if error is StorageError { throw error }
            throw StorageError.vdiIOError(uuid: target.uuid, detail: "copy from \(src.uuid): \(error)")
        }
        logger.info("copied VDI \(src.uuid)\(baseRec.map { " (blocks differing from \($0.uuid))" } ?? "") into \(target.uuid)\(dest === self ? "" : " in SR \(dest.uuid)")")
        return try dest.record(target.uuid)
    }

    private func copyData(from src: VDIRecord, base: (VDIRecord, SR)?, into target: VDIRecord, in dest: SR, fresh: Bool,
                          task: TaskContext?) throws {
        var (source, plan) = try openWithPlan(src, base: base)
        defer { source.close() }
        if fresh { plan.zero = [] }  // a fresh target reads zeros there already
        let h = try dest.attach(target.uuid)
        defer { dest.detach(h) }
        if fresh { h.withChain { $0.setAllocationBarrier(false) } }
        defer { if fresh { h.withChain { $0.setAllocationBarrier(true) } } }
        let total = plan.work.reduce(0) { $0 + $1.range.count } + plan.zero.reduce(0) { $0 + $1.count }
        var done: UInt64 = 0
        let buf = UnsafeMutableRawBufferPointer.allocate(byteCount: Self.copyChunk, alignment: 4096)
        defer { buf.deallocate() }
        let baseSR = base?.1 ?? self
        let baseChain = try plan.compareWith.map { try baseSR.openForReading($0) }
        defer { baseChain?.close() }
        let other = baseChain.map { _ in UnsafeMutableRawBufferPointer.allocate(byteCount: Self.copyChunk, alignment: 4096) }
        defer { other?.deallocate() }
        var holes: [Range<Int>] = []
        for item in plan.work {
            var pos = item.range.lowerBound
            while pos < item.range.upperBound {
                try task?.checkCancelled()
                let n = Int(min(UInt64(Self.copyChunk), item.range.upperBound - pos))
                if fresh, baseChain == nil, try copyMapped(from: source, at: pos, count: n, exact: item.exact, into: h) {
                    pos += UInt64(n)
                    done += UInt64(n)
                    task?.setProgress(total == 0 ? 1 : Double(done) / Double(total))
                    continue
                }
                let piece = UnsafeMutableRawBufferPointer(rebasing: buf[0..<n])
                try source.read(into: piece, at: pos, cachedOnly: false, holes: &holes)
                var write = true
                if let bc = baseChain, let o = other {
                    // No shared layer: copy only what reads differently.
                    let op = UnsafeMutableRawBufferPointer(rebasing: o[0..<n])
                    var h2: [Range<Int>] = []
                    try bc.read(into: op, at: pos, cachedOnly: false, holes: &h2)
                    write = memcmp(piece.baseAddress!, op.baseAddress!, n) != 0
                } else if fresh && !item.exact && isZero(UnsafeRawBufferPointer(piece)) {
                    write = false  // a fresh target reads zeros there already
                }
                if write {
                    if !fresh && isZero(UnsafeRawBufferPointer(piece)) {
                        try h.writeZeroes(offset: pos, length: UInt64(n), punch: true, fastOnly: false)
                    } else {
                        try h.write(UnsafeRawBufferPointer(piece), at: pos)
                    }
                }
                pos += UInt64(n)
                done += UInt64(n)
                task?.setProgress(total == 0 ? 1 : Double(done) / Double(total))
            }
        }
        for r in plan.zero {
            try task?.checkCancelled()
            try h.writeZeroes(offset: r.lowerBound, length: UInt64(r.count), punch: true, fastOnly: false)
            done += UInt64(r.count)
            task?.setProgress(total == 0 ? 1 : Double(done) / Double(total))
        }
        try h.flush()
        task?.setProgress(1)
    }

    /// A fresh target's chunk written straight from the source files' mapped pages (one
    /// copy, into the target's page cache, instead of a read into a buffer and a write out
    /// of it). Stretches no layer holds are left as holes, and data that is all zeros too
    /// unless `exact`. False where a file cannot be mapped: the caller reads instead.
    private func copyMapped(from source: any DiskImage, at pos: UInt64, count n: Int, exact: Bool, into h: VDIHandle) throws -> Bool {
        let plan = try source.plan(offset: pos, length: n)
        var maps: [UnsafeRawBufferPointer?] = []
        for p in plan.pieces {
            if case .data(let f, let off, let c) = p {
                guard let m = f.mapped(offset: off, count: c) else { return false }
                maps.append(m)
            } else {
                maps.append(nil)
            }
        }
        var at = pos
        for (p, m) in zip(plan.pieces, maps) {
            if let m, exact || !isZero(m) { try h.write(m, at: at) }
            if m == nil, exact {
                try h.writeZeroes(offset: at, length: UInt64(p.count), punch: false, fastOnly: false)
            }
            at += UInt64(p.count)
        }
        return true
    }

    /// What to copy: ranges to read and write (`exact`: a structural difference, written
    /// even if zeros), ranges to zero in the target, or a base to compare contents with.
    struct CopyPlan {
        var work: [(range: Range<UInt64>, exact: Bool)] = []
        var zero: [Range<UInt64>] = []
        var compareWith: String?
    }

    /// The source's chain, opened read-only, and what to copy from it, both from one
    /// moment of the files. Only chains of one family can share layers; for those, both
    /// chains are opened and their layers compared under the family lock, so no merge
    /// renames or removes a file between (a layer looked up by a path it has since left).
    func openWithPlan(_ rec: VDIRecord, base: (VDIRecord, SR)?) throws -> (any DiskImage, CopyPlan) {
        var rec = rec, base = base
        while true {
            guard let (b, baseSR) = base, baseSR === self, b.family == rec.family else {
                let image = try openForReading(rec.uuid)
                do { return (image, try copyPlan(image, size: rec.virtualSize, base: base?.0.uuid, baseChain: nil)) } catch {
                    image.close()
                    throw error
                }
            }
            let opened = try withFamilyLock(rec.family) { () throws -> (any DiskImage, CopyPlan)? in
                guard let r = try anyRecord(rec.uuid), let r2 = try anyRecord(b.uuid) else {
                    throw StorageError.vdiMissing(uuid: try anyRecord(rec.uuid) == nil ? rec.uuid : b.uuid)
                }
                guard r.family == rec.family, r2.family == rec.family else { rec = r; base = (r2, self); return nil }
                let image = try format(of: rec.uuid).open(path: imagePath(rec.uuid), writable: false)
                do {
                    let baseChain = try format(of: b.uuid).open(path: imagePath(b.uuid), writable: false)
                    defer { baseChain.close() }
                    return (image, try copyPlan(image, size: rec.virtualSize, base: b.uuid, baseChain: baseChain))
                } catch {
                    image.close()
                    throw error
                }
            }
            if let opened { return opened }
        }
    }

    /// Without a base: the source's allocated ranges. With one whose chain is open
    /// (`baseChain`, its family lock held): the ranges the layers the two do not share
    /// hold. With one of another family (nil): every byte, compared.
    func copyPlan(_ source: any DiskImage, size: UInt64, base: String?, baseChain: (any DiskImage)?) throws -> CopyPlan {
        var plan = CopyPlan()
        guard let base else {
            var pos: UInt64 = 0
            for run in try source.allocationRuns(offset: 0, length: size) {
                let r = pos..<(pos + run.length)
                if run.allocated { plan.work.append((r, false)) } else { plan.zero.append(r) }
                pos += run.length
            }
            return plan
        }
        let basePaths = baseChain?.layerPaths ?? []
        let srcPaths = source.layerPaths
        let shared = Set(srcPaths).intersection(basePaths)
        if shared.isEmpty {
            // Nothing in common: compare every byte either side may hold.
            plan.compareWith = base
            plan.work = [(0..<size, false)]
            return plan
        }
        // Ranges some unshared layer (of either chain) holds: there the two may differ.
        var ranges: [Range<UInt64>] = []
        for p in srcPaths.filter({ !shared.contains($0) }) + basePaths.filter({ !shared.contains($0) }) {
            let layer = try format(at: p).openLayer(path: p)
            defer { layer.close() }
            ranges += try layer.leafDataRuns(offset: 0, length: min(size, layer.virtualSize))
        }
        plan.work = Self.merged(ranges).map { ($0.clamped(to: 0..<size), true) }.filter { !$0.0.isEmpty }
        return plan
    }

    static func merged(_ rs: [Range<UInt64>]) -> [Range<UInt64>] {
        var out: [Range<UInt64>] = []
        for r in rs.sorted(by: { $0.lowerBound < $1.lowerBound }) where !r.isEmpty {
            if let last = out.last, r.lowerBound <= last.upperBound {
                out[out.count - 1] = last.lowerBound..<max(last.upperBound, r.upperBound)
            } else {
                out.append(r)
            }
        }
        return out
    }

    func isZero(_ b: UnsafeRawBufferPointer) -> Bool {
        guard let p = b.baseAddress, b.count > 0 else { return true }
        // First byte zero and the buffer equal to itself shifted by one: all zeros.
        return p.load(as: UInt8.self) == 0 && memcmp(p, p + 1, b.count - 1) == 0
    }
}
