// Import (seed 000): a raw or VHD stream onto a VDI. Whether it replaces the contents or
// applies a delta is the stream's to say (a differencing VHD, xapi's chunked framing).
//
// Nothing reaches the VDI until the whole stream is in and valid: the data goes to a
// staging file beside the VDI (`<uuid>.import-<id>`, removed at start-up if a crash
// leaves one), with the byte ranges it holds kept in memory; only when the decoder has
// accepted the end of the stream is it committed. A stream that is refused, cut or
// cancelled changes nothing.
//
// A stream that replaces the contents is staged as a new image of the SR's format, the
// size of the VDI. If the VDI is then not attached, has no CBT log to keep and no child,
// the commit is a journalled rename: the image becomes the VDI's file (one layer, its old
// bases left to the collector), so the data is written once. Otherwise, and for deltas
// (staged in a sparse raw file), the commit goes through the VDI's handle (the one its
// NBD connections share, CBT tracked): the ranges written, and for a replacing stream
// zeros everywhere else.

import Foundation
import GRDB
import Image

public final class ImportSession: @unchecked Sendable {
    // Unchecked: one caller feeds a session at a time (vdictl's request or the HTTP
    // body's task, each awaiting the last chunk before the next); the lets never change.
    let sr: SR
    public let uuid: String
    let size: UInt64
    var decoder: any StreamDecoder
    /// `<uuid>.import-<id>.<ext>`: the VDI's format for a staged image, raw for a delta.
    var stagingPath: String
    /// The raw staging file (deltas), open from the start, or -1.
    var fd: Int32 = -1
    /// The staged image (replacing streams), made at the stream's header.
    var image: (any DiskImage)?
    /// Byte ranges of the staging file that hold the stream's data, in arrival order.
    var written: [Range<UInt64>] = []
    public let task: TaskContext?
    /// The stream's length when known (Content-Length, a file's size): for progress.
    public var expectedLength: UInt64?
    var finished = false
    /// From the stream's header event (the decoder is busy while it reports events).
    var replaces = true

    init(sr: SR, uuid: String, size: UInt64, decoder: any StreamDecoder, task: TaskContext?) throws {
        self.sr = sr
        self.uuid = uuid
        self.size = size
        self.decoder = decoder
        self.task = task
        stagingPath = "\(sr.path)/\(uuid).import-\(UUID().uuidString.lowercased().prefix(8)).\(sr.format(of: uuid).fileExtension)"
        StorageMetrics.activeImports.increment()
    }

    deinit { abort() }

    /// Takes the next bytes of the stream.
    public func feed(_ bytes: UnsafeRawBufferPointer) throws {
        try task?.checkCancelled()
        StorageMetrics.importBytes.increment(by: bytes.count)
        do {
            try decoder.feed(bytes) { try self.handle($0) }
        } catch let e as StreamError {
            throw StorageError.importError(reason: e.description)
        }
        if let total = expectedLength, total > 0 {
            task?.setProgress(0.9 * Double(decoder.consumed) / Double(total))
        }
        task?.setOther("bytes_done", String(decoder.consumed))
    }

    public var consumed: UInt64 { decoder.consumed }

    func handle(_ e: StreamEvent) throws {
        switch e {
        case .header(let v, let r):
            replaces = r
            if let v, v > size { throw StorageError.vdiTooSmall(uuid: uuid, minimum: v) }
            try makeStaging()
        case .data(let offset, let bytes):
            guard offset <= size, UInt64(bytes.count) <= size - offset else {
                // A raw stream's length, when known, is the size it needs.
                let needed = replaces ? max(expectedLength ?? 0, offset + UInt64(bytes.count)) : offset + UInt64(bytes.count)
                throw StorageError.vdiTooSmall(uuid: uuid, minimum: needed)
            }
            // A whole disk need not stage its zeros: what it does not hold is zeroed.
            if replaces && sr.isZero(bytes) { return }
            if let image {
                do { try image.write(bytes, at: offset) } catch {
                    throw StorageError.srBackendFailure(detail: "import staging image: \(DiskError(error))")
                }
            } else {
                try sr.writeAll(fd, bytes, at: offset)
            }
            let r = offset..<(offset + UInt64(bytes.count))
            if let last = written.last, last.upperBound == r.lowerBound {
                written[written.count - 1] = last.lowerBound..<r.upperBound
            } else {
                written.append(r)
            }
        }
    }

    /// The stream has ended: validates it, then commits it onto the VDI.
    public func finish() throws {
        guard decoder.consumed > 0 else { throw StorageError.importError(reason: "the stream is empty") }
        do {
            try decoder.finish { try self.handle($0) }
        } catch let e as StreamError {
            throw StorageError.importError(reason: e.description)
        }
        try task?.checkCancelled()
        try commit()
        finished = true
        abort()
    }

    func makeStaging() throws {
        guard image == nil, fd < 0 else { return }
        if replaces {
            do {
                try sr.format(of: uuid).create(path: stagingPath, size: size)
                let i = try sr.format(of: uuid).open(path: stagingPath, writable: true)
                // Nothing relies on it before the final flush (a crash drops it).
                i.setAllocationBarrier(false)
                image = i
            } catch {
                unlink(stagingPath)
                throw StorageError.srBackendFailure(detail: "import staging image \(stagingPath): \(DiskError(error))")
            }
            return
        }
        stagingPath = (stagingPath as NSString).deletingPathExtension + ".raw"
        fd = open(stagingPath, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard fd >= 0 else {
            throw StorageError.srBackendFailure(detail: "import staging file \(stagingPath): \(String(cString: strerror(errno)))")
        }
    }

    func commit() throws {
        if let image {
            do { try image.flush() } catch { throw StorageError.srBackendFailure(detail: "import staging image: \(DiskError(error))") }
            if try sr.replaceContents(uuid, with: stagingPath, closing: image) {
                self.image = nil
                stagingRemoved = true
                StorageMetrics.activeImports.decrement()
                sr.logger.info("imported \(decoder.consumed) bytes into \(uuid): its file is now the imported image")
                return
            }
        }
        // Through the handle: journalled first, so a crash part-way is finished at the
        // next start (from the staging file, kept until the entry goes), never left half.
        let runs = SR.merged(written)
        if fd >= 0, fsync(fd) != 0 {
            throw StorageError.srBackendFailure(detail: "import staging file: \(String(cString: strerror(errno)))")
        }
        var e = JournalEntry(id: UUID().uuidString.lowercased(), operation: .importCommit, child: uuid, parent: nil,
                             phase: .switching, started: Date(), staging: stagingPath)
        e.runs = runs.map { [$0.lowerBound, $0.upperBound] }
        e.replaces = replaces
        e.stagedImage = image != nil
        try sr.journal.write(e)
        let source: StagedImport = image.map { .image($0) } ?? .file(fd)
        try sr.applyImport(uuid, from: source, runs: runs, replaces: replaces, size: size) { done, total in
            task?.setProgress(0.9 + 0.1 * (total == 0 ? 1 : Double(done) / Double(total)))
        }
        sr.journal.remove(e.id)
        sr.logger.info("imported \(decoder.consumed) bytes into \(uuid) (\(replaces ? "its whole contents" : "a delta"): \(runs.count) runs)")
    }

    /// Drops the staging file (the VDI is left as it was unless `finish` committed).
    public func abort() {
        guard !stagingRemoved else { return }
        stagingRemoved = true
        StorageMetrics.activeImports.decrement()
        image?.close()
        image = nil
        if fd >= 0 { _ = close(fd) }
        unlink(stagingPath)
    }
    private var stagingRemoved = false
}

extension SR {
    /// Starts an import into `uuid`; feed it the stream, then `finish` (or `abort`).
    public func beginImport(_ uuid: String, format formatName: String, chunked: Bool = false, task: TaskContext?) throws -> ImportSession {
        let rec = try record(uuid)
        guard rec.type != .cbtMetadata else { throw StorageError.vdiIncompatibleType(uuid: rec.uuid, type: rec.type.rawValue) }
        if rec.readOnly || rec.isASnapshot { throw StorageError.vdiReadonly(uuid: rec.uuid) }
        // Its file is written no more while the mode lasts: an import would land in an overlay.
        if rec.onBoot == .reset { throw StorageError.vdiOnBootModeIncompatible(uuid: rec.uuid) }
        let sf = try streamFormat(formatName)
        try requireFile(rec)
        var decoder = sf.decoder()
        if chunked {
            guard sf.name == "raw" else {
                throw StorageError.valueNotSupported(field: "chunked", value: "true", reason: "xapi's chunked framing carries raw data only")
            }
            decoder = XapiChunkedDecoder()
        }
        return try ImportSession(sr: self, uuid: rec.uuid, size: rec.virtualSize, decoder: decoder, task: task)
    }

    /// Reads a whole import from `fd` (`vdictl vdi-import`) and commits it.
    public func importStream(_ uuid: String, format: String, from fd: Int32, task: TaskContext?) throws {
        let session = try beginImport(uuid, format: format, task: task)
        defer { session.abort() }
        var st = stat()
        if fstat(fd, &st) == 0, (st.st_mode & S_IFMT) == S_IFREG {
            session.expectedLength = UInt64(st.st_size)
            task?.setOther("total_bytes", String(st.st_size))
        }
        let buf = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 4096)
        defer { buf.deallocate() }
        while true {
            let n = read(fd, buf.baseAddress!, buf.count)
            if n < 0 && errno == EINTR { continue }
            guard n >= 0 else {
                throw StorageError.importError(reason: "reading the input: \(String(cString: strerror(errno)))")
            }
            if n == 0 { break }
            try session.feed(UnsafeRawBufferPointer(rebasing: buf[0..<n]))
        }
        try session.finish()
    }

    /// A replacing import's validated image takes the place of the VDI's file, when
    /// nothing else needs that file to stay: no attachment, no CBT log (it would have to
    /// record every block), no child. Journalled: redone at start-up once begun. False:
    /// the caller commits through the handle instead.
    func replaceContents(_ uuid: String, with staging: String, closing image: any DiskImage) throws -> Bool {
        try withFamily(of: uuid) { rec in
            closeLingering(uuid)
            let children = try dbRead { try VDIRecord.filter(Column("parent") == uuid).fetchCount($0) }
            guard lookUp(uuid) == nil, !rec.cbtEnabled, rec.onBoot == .persist, children == 0,
                  !familiesWithOverlays().contains(rec.family) else { return false }
            image.close()
            let e = JournalEntry(id: UUID().uuidString.lowercased(), operation: .replace, child: uuid, parent: nil,
                                 phase: .switching, started: Date(), staging: staging)
            try journal.write(e)
            try finishReplace(uuid, with: staging)
            journal.remove(e.id)
            collector.kick()
            return true
        }
    }

    /// The last step of a replace (redone at recovery): the file, then the record.
    func finishReplace(_ uuid: String, with staging: String) throws {
        if !staging.isEmpty, FileManager.default.fileExists(atPath: staging) {
            // The old file keeps a second name until the rename is done, so freeing its
            // blocks (a tenth of a second a GiB) happens after the commit, not inside it;
            // a crash leaves the name to start-up's sweep of `.import-` files.
            let old = staging + "-old"
            let kept = link(imagePath(uuid), old) == 0
            guard rename(staging, imagePath(uuid)) == 0 else {
                if kept { unlink(old) }
                throw StorageError.vdiIOError(uuid: uuid, detail: "rename \(staging): \(String(cString: strerror(errno)))")
            }
            try syncDirectory()
            if kept { DispatchQueue.global(qos: .utility).async { unlink(old) } }
        }
        try dbWrite { db in
            if var r = try VDIRecord.fetchOne(db, key: uuid) {
                r.parent = nil
                try r.update(db)
            }
        }
    }

    /// Writes a validated import onto the VDI through its handle (CBT tracked): the
    /// ranges staged, and for a replacing stream zeros everywhere else; then flushes.
    /// Redoing it gives the same result, so recovery runs it again after a crash.
    func applyImport(_ uuid: String, from source: StagedImport, runs: [Range<UInt64>], replaces: Bool, size: UInt64,
                     progress: (UInt64, UInt64) -> Void) throws {
        let h = try attach(uuid)
        defer { detach(h) }
        var zero: [Range<UInt64>] = []
        if replaces {
            var pos: UInt64 = 0
            for r in runs + [size..<size] {
                if r.lowerBound > pos { zero.append(pos..<r.lowerBound) }
                pos = max(pos, r.upperBound)
            }
        }
        let total = UInt64(runs.reduce(0) { $0 + $1.count } + zero.reduce(0) { $0 + $1.count })
        var done: UInt64 = 0
        do {
            for r in zero {
                try h.writeZeroes(offset: r.lowerBound, length: UInt64(r.count), punch: true, fastOnly: false)
                done += UInt64(r.count)
                progress(done, total)
            }
            try source.forEachPiece(of: runs, chunk: SR.copyChunk) { bytes, at in
                try h.write(bytes, at: at)
                importWriteHook?(done)
                done += UInt64(bytes.count)
                progress(done, total)
            }
            try h.flush()
        } catch let e as DiskError {
            throw StorageError.vdiIOError(uuid: uuid, detail: "import: \(e)")
        }
    }

    /// Start-up, once the SR is open: finishes imports a crash cut while they were being
    /// written onto their VDIs (their staging files are kept until then).
    func finishImportCommits() {
        for e in journal.entries().valid where e.operation == .importCommit {
            let staging = e.staging ?? ""
            do {
                let runs = (e.runs ?? []).compactMap { $0.count == 2 && $0[0] <= $0[1] ? $0[0]..<$0[1] : nil }
                guard let rec = try anyRecord(e.child) else {
                    logger.warning("recovery: the VDI \(e.child) of an interrupted import is gone; dropping its staging file")
                    journal.remove(e.id)
                    unlink(staging)
                    continue
                }
                let source: StagedImport
                if e.stagedImage == true {
                    source = .image(try format(at: staging).open(path: staging, writable: false))
                } else {
                    let fd = open(staging, O_RDONLY | O_CLOEXEC)
                    guard fd >= 0 else { throw StorageError.srBackendFailure(detail: "\(staging): \(String(cString: strerror(errno)))") }
                    source = .file(fd)
                }
                defer { source.close() }
                try applyImport(rec.uuid, from: source, runs: runs, replaces: e.replaces ?? true, size: rec.virtualSize) { _, _ in }
                journal.remove(e.id)
                unlink(staging)
                logger.warning("recovery: finished writing an import cut by the end of the last run onto \(e.child)")
            } catch {
                logger.error("recovery: cannot finish the import onto \(e.child) (kept for the next start: \(staging)): \(error)")
            }
        }
    }

    /// Start-up: staging files of imports that ended with the last run (not those an
    /// interrupted commit still needs).
    func removeImportStaging() {
        let needed = Set(journal.entries().valid.compactMap { $0.operation == .importCommit ? $0.staging : nil })
        for n in (try? FileManager.default.contentsOfDirectory(atPath: path)) ?? [] where n.contains(".import-") {
            guard !needed.contains("\(path)/\(n)") else { continue }
            unlink("\(path)/\(n)")
            logger.warning("recovery: removed \(n), the staging file of an import cut by the end of the last run (the VDI was left as it was)")
        }
    }
}

/// Where a validated import's bytes wait to be written onto the VDI.
enum StagedImport {
    /// A staged image of the SR's format (a replacing stream).
    case image(any DiskImage)
    /// A sparse raw file (a delta), as a descriptor.
    case file(Int32)

    /// Calls `body` with the staged bytes of each run in order, at most `chunk` at a time,
    /// with their offset on the disk. A file's pages are lent from its mapping (one copy
    /// fewer than a read into a buffer); only ranges written are touched.
    func forEachPiece(of runs: [Range<UInt64>], chunk: Int, _ body: (UnsafeRawBufferPointer, UInt64) throws -> Void) throws {
        let mapLength = Int(runs.last?.upperBound ?? 0)
        var map: UnsafeMutableRawPointer?
        if case .file(let fd) = self, mapLength > 0, let p = mmap(nil, mapLength, PROT_READ, MAP_SHARED, fd, 0), p != MAP_FAILED {
            map = p
            _ = madvise(p, mapLength, MADV_SEQUENTIAL)
        }
        defer { if let map { munmap(map, mapLength) } }
        let buf = UnsafeMutableRawBufferPointer.allocate(byteCount: chunk, alignment: 4096)
        defer { buf.deallocate() }
        for r in runs {
            var pos = r.lowerBound
            while pos < r.upperBound {
                let n = Int(min(UInt64(chunk), r.upperBound - pos))
                let piece = UnsafeMutableRawBufferPointer(rebasing: buf[0..<n])
                if let map {
                    try body(UnsafeRawBufferPointer(start: map + Int(pos), count: n), pos)
                } else {
                    try read(into: piece, at: pos)
                    try body(UnsafeRawBufferPointer(piece), pos)
                }
                pos += UInt64(n)
            }
        }
    }

    func read(into b: UnsafeMutableRawBufferPointer, at pos: UInt64) throws {
        switch self {
        case .image(let i):
            do { try i.read(into: b, at: pos) } catch {
                throw StorageError.srBackendFailure(detail: "import staging image: \(DiskError(error))")
            }
        case .file(let fd):
            var got = 0
            while got < b.count {
                let k = pread(fd, b.baseAddress! + got, b.count - got, off_t(pos) + off_t(got))
                if k < 0 && errno == EINTR { continue }
                guard k > 0 else {
                    throw StorageError.srBackendFailure(detail: "import staging file: \(k == 0 ? "ends early" : String(cString: strerror(errno)))")
                }
                got += k
            }
        }
    }

    func close() {
        switch self {
        case .image(let i): i.close()
        case .file(let fd): _ = Glibc.close(fd)
        }
    }
}
