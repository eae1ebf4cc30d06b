// Export (seed 000): a VDI as a raw or VHD stream, whole or only the blocks that differ
// from a base. The stream's layout is fixed when the export opens (see the design notes
// in Image/Stream.swift); the disk is read through its own read-only opening of the
// chain, as `VDI.copy` reads its source, so the collector may merge layers meanwhile
// (merged files stay readable through the descriptors the opening holds).

import Foundation
import Image
import Locking

/// An open export.
public final class ExportStream: Sendable {
    public let uuid: String
    public let format: any StreamFormat
    public let layout: any StreamLayout
    public var length: UInt64 { layout.length }
    /// The bytes are the same on every request, across restarts too (a snapshot or a
    /// read-only VDI, exported whole): a byte range may be served alone.
    public let stable: Bool
    /// An HTTP entity tag for `stable` streams.
    public let etag: String
    let image: any DiskImage

    init(uuid: String, format: any StreamFormat, layout: any StreamLayout, stable: Bool, etag: String, image: any DiskImage) {
        self.uuid = uuid
        self.format = format
        self.layout = layout
        self.stable = stable
        self.etag = etag
        self.image = image
        StorageMetrics.activeExports.increment()
    }

    /// Fills `buffer` with the stream's bytes at `offset`; returns how many (fewer only at
    /// the end). `holes` gets the ranges of the buffer that read as zeros because nothing
    /// holds them (a sparse file can leave them unwritten).
    public func read(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer, holes: inout [Range<Int>]) throws -> Int {
        holes.removeAll(keepingCapacity: true)
        var at = 0
        var diskHoles: [Range<Int>] = []
        for piece in layout.pieces(offset: offset, length: UInt64(buffer.count)) {
            let dst = UnsafeMutableRawBufferPointer(rebasing: buffer[at..<(at + piece.count)])
            switch piece {
            case .bytes(let b):
                b.withUnsafeBytes { dst.copyMemory(from: $0) }
            case .zeros(let n):
                dst.initializeMemory(as: UInt8.self, repeating: 0)
                holes.append(at..<(at + n))
            case .disk(let o, _):
                do {
                    try image.read(into: dst, at: o, cachedOnly: false, holes: &diskHoles)
                } catch {
                    throw StorageError.vdiIOError(uuid: uuid, detail: "export read at \(o): \(DiskError(error))")
                }
                holes += diskHoles.map { ($0.lowerBound + at)..<($0.upperBound + at) }
            }
            at += piece.count
        }
        StorageMetrics.exportBytes.increment(by: at)
        return at
    }

    /// An export whose HTTP body was never sent (the client went first) closes here.
    deinit { close() }

    private let isClosed = Mutex(false)
    /// Writes `[offset, offset+count)` of the stream into a regular file straight from the
    /// layers' mapped pages (one copy, into the file's page cache), leaving holes where
    /// nothing is held. False where a file cannot be mapped: the caller reads instead.
    func writeMapped(at offset: UInt64, count: Int, to fd: Int32,
                     writer: (Int32, UnsafeRawBufferPointer, UInt64?) throws -> Void) throws -> Bool {
        var plans: [(at: UInt64, piece: StreamPiece, plan: ReadPlan?)] = []
        var at = offset
        for piece in layout.pieces(offset: offset, length: UInt64(count)) {
            var plan: ReadPlan?
            if case .disk(let o, let n) = piece {
                do { plan = try image.plan(offset: o, length: n) } catch {
                    throw StorageError.vdiIOError(uuid: uuid, detail: "export read at \(o): \(DiskError(error))")
                }
                for p in plan!.pieces {
                    if case .data(let f, let off, let c) = p, f.mapped(offset: off, count: c) == nil { return false }
                }
            }
            plans.append((at, piece, plan))
            at += UInt64(piece.count)
        }
        for (start, piece, plan) in plans {
            switch piece {
            case .bytes(let b):
                try b.withUnsafeBytes { try writer(fd, $0, start) }
            case .zeros:
                break
            case .disk:
                var pos = start
                for p in plan!.pieces {
                    if case .data(let f, let off, let c) = p, let m = f.mapped(offset: off, count: c) {
                        try writer(fd, m, pos)
                    }
                    pos += UInt64(p.count)
                }
            }
        }
        StorageMetrics.exportBytes.increment(by: count)
        return true
    }

    public func close() {
        // Under the lock: a second close waits until the first has closed the image.
        isClosed.withLock { closed in
            guard !closed else { return }
            closed = true
            image.close()
            StorageMetrics.activeExports.decrement()
        }
    }
}

extension SR {
    /// Opens an export of `uuid` in `formatName`, with only the blocks that differ from
    /// `base` when one is given (VHD only).
    public func openExport(_ uuid: String, format formatName: String, base: String?) throws -> ExportStream {
        let rec = try record(uuid)
        guard rec.type != .cbtMetadata else { throw StorageError.vdiIncompatibleType(uuid: rec.uuid, type: rec.type.rawValue) }
        let sf = try streamFormat(formatName)
        let baseRec = try base.map { try record($0) }
        if let b = baseRec {
            guard sf.supportsDelta else {
                throw StorageError.valueNotSupported(field: "base", value: b.uuid,
                    reason: "only formats \(Formats.streams.filter(\.supportsDelta).map(\.name).joined(separator: ", ")) export a delta")
            }
            guard b.type != .cbtMetadata else { throw StorageError.vdiIncompatibleType(uuid: b.uuid, type: b.type.rawValue) }
            try requireFile(b)
        }
        try requireFile(rec)
        let (image, plan) = try openWithPlan(rec, base: baseRec.map { ($0, self) })
        do {
            let size = rec.virtualSize
            var blocks: [Int] = []
            if let bs = sf.blockSize {
                blocks = try exportBlocks(image, size: size, blockSize: bs, plan: baseRec == nil ? nil : plan)
            }
            let id = StreamIdentity(uniqueID: UUID(uuidString: rec.uuid) ?? UUID(), timeStamp: rec.snapshotTime ?? rec.created,
                                    parent: baseRec.map { (UUID(uuidString: $0.uuid) ?? UUID(), $0.snapshotTime ?? $0.created) })
            let layout = sf.layout(virtualSize: size, blocks: blocks, identity: id)
            let stable = (rec.isASnapshot || rec.readOnly) && baseRec == nil
            let etag = "\"\(rec.uuid)-\(sf.name)-\(layout.length)-\(Int((rec.snapshotTime ?? rec.created).timeIntervalSince1970))\""
            return ExportStream(uuid: rec.uuid, format: sf, layout: layout, stable: stable, etag: etag, image: image)
        } catch {
            image.close()
            throw error
        }
    }

    func streamFormat(_ name: String) throws -> any StreamFormat {
        guard let f = Formats.stream(named: name) else {
            throw StorageError.valueNotSupported(field: "format", value: name,
                                                 reason: "supported formats: \(Formats.streams.map(\.name).joined(separator: ", "))")
        }
        return f
    }

    /// The blocks an export holds: those any layer holds, or with a base, those where the
    /// two VDIs may differ (layers they do not share; compared byte for byte when they
    /// share none).
    func exportBlocks(_ image: any DiskImage, size: UInt64, blockSize bs: UInt64, plan: CopyPlan?) throws -> [Int] {
        var ranges: [Range<UInt64>] = []
        var compare: String?
        if let plan {
            ranges = plan.work.map(\.range)
            compare = plan.compareWith
        } else {
            var pos: UInt64 = 0
            for run in try image.allocationRuns(offset: 0, length: size) {
                if run.allocated { ranges.append(pos..<(pos + run.length)) }
                pos += run.length
            }
        }
        var blocks: [Int] = []
        for r in ranges where !r.isEmpty {
            let first = Int(r.lowerBound / bs), last = Int((r.upperBound - 1) / bs)
            let from = blocks.last.map { max($0 + 1, first) } ?? first
            if from <= last { blocks += Array(from...last) }
        }
        guard let compare else { return blocks }
        // No shared layer: keep only the blocks that read differently.
        let other = try openForReading(compare)
        defer { other.close() }
        let a = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(bs), alignment: 4096)
        let b = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(bs), alignment: 4096)
        defer { a.deallocate(); b.deallocate() }
        return try blocks.filter { k in
            let at = UInt64(k) * bs
            let n = Int(min(bs, size - at))
            let pa = UnsafeMutableRawBufferPointer(rebasing: a[0..<n]), pb = UnsafeMutableRawBufferPointer(rebasing: b[0..<n])
            try image.read(into: pa, at: at)
            if at >= other.virtualSize { return !isZero(UnsafeRawBufferPointer(pa)) }
            let m = Int(min(UInt64(n), other.virtualSize - at))
            pb.initializeMemory(as: UInt8.self, repeating: 0)
            try other.read(into: UnsafeMutableRawBufferPointer(rebasing: pb[0..<m]), at: at)
            return memcmp(pa.baseAddress!, pb.baseAddress!, n) != 0
        }
    }

    /// Writes a whole export to `fd` (`vdictl vdi-export`): into a regular file with holes
    /// left where nothing is held, else (a pipe) every byte in order. Returns its length.
    public func export(_ stream: ExportStream, to fd: Int32, task: TaskContext?) throws -> UInt64 {
        var st = stat()
        let seekable = fstat(fd, &st) == 0 && (st.st_mode & S_IFMT) == S_IFREG
        if seekable { _ = ftruncate(fd, 0) }
        let total = stream.length
        task?.setOther("total_bytes", String(total))
        let buf = UnsafeMutableRawBufferPointer.allocate(byteCount: Self.copyChunk, alignment: 4096)
        defer { buf.deallocate() }
        var holes: [Range<Int>] = []
        var pos: UInt64 = 0
        while pos < total {
            try task?.checkCancelled()
            let n = Int(min(UInt64(buf.count), total - pos))
            var got = n
            if seekable, try stream.writeMapped(at: pos, count: n, to: fd, writer: writeAll) {
                // Written straight from the layers' mapped pages.
            } else if seekable {
                got = try stream.read(at: pos, into: UnsafeMutableRawBufferPointer(rebasing: buf[0..<n]), holes: &holes)
                var at = 0
                for h in holes + [got..<got] {
                    if h.lowerBound > at { try writeAll(fd, UnsafeRawBufferPointer(rebasing: buf[at..<h.lowerBound]), at: pos + UInt64(at)) }
                    at = max(at, h.upperBound)
                }
            } else {
                got = try stream.read(at: pos, into: UnsafeMutableRawBufferPointer(rebasing: buf[0..<n]), holes: &holes)
                try writeAll(fd, UnsafeRawBufferPointer(rebasing: buf[0..<got]), at: nil)
            }
            pos += UInt64(got)
            task?.setOther("bytes_done", String(pos))
            task?.setProgress(total == 0 ? 1 : Double(pos) / Double(total))
        }
        if seekable {
            guard ftruncate(fd, off_t(total)) == 0, fsync(fd) == 0 || errno == EINVAL else {
                throw StorageError.vdiIOError(uuid: stream.uuid, detail: "export: finishing the file: \(String(cString: strerror(errno)))")
            }
        }
        return total
    }

    /// Writes all of `b` to `fd` (at `offset`, or at its position); used by exports (the
    /// output) and imports (the staging file).
    func writeAll(_ fd: Int32, _ b: UnsafeRawBufferPointer, at offset: UInt64?) throws {
        var done = 0
        while done < b.count {
            let n = offset.map { pwrite(fd, b.baseAddress! + done, b.count - done, off_t($0) + off_t(done)) }
                ?? write(fd, b.baseAddress! + done, b.count - done)
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else {
                throw StorageError.srBackendFailure(detail: "writing descriptor \(fd) at \(offset.map { String($0 + UInt64(done)) } ?? "its position"): \(String(cString: strerror(errno)))")
            }
            done += n
        }
    }
}
