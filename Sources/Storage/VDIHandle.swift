import CBT
import Foundation
import Image
import Locking

/// A VDI opened for I/O. All connections to one VDI share one handle, so they share one
/// open chain and one allocation lock. Snapshot and coalesce swap the chain under the
/// exclusive side of `gate`; every I/O holds the shared side, so no I/O sees a half-swapped
/// chain. The chain is any format's `DiskImage`: nothing here knows VHD.
public final class VDIHandle: @unchecked Sendable {
    // Unchecked: `chain`, `cbt` and `tracker` change only with every I/O held off (the
    // exclusive side of `gate`) and are read under its shared side; `key`, `overlayPath`,
    // `refCount` and `lingerGeneration` change under the family lock, with `handlesLock`
    // for the table's view of them.
    public let uuid: String
    /// The VDI's family (whose lock guards attach, detach and chain changes).
    let family: String
    /// Where the handles table keeps it: the VDI's uuid, or for an overlay attachment (a
    /// scratch view, an on_boot=reset VDI) the uuid and the token's secret.
    var key: String
    /// An overlay attachment's throw-away leaf, deleted when the attachment ends.
    var overlayPath: String?
    private var chain: any DiskImage
    /// The VDI's change log while CBT is enabled. Changed only with all I/O held off.
    var cbt: ChangeLog?
    private let gate = Gate()
    /// Set while the leaf is being merged into its parent (see `Coalesce`); changed only
    /// with I/O held off, read under the shared gate.
    var tracker: ChangeTracker?
    /// Requests served (the collector's throttle watches it).
    let ops = Atomic<Int>(0)
    var refCount = 0
    /// Counts detaches to zero, so a linger timer knows it is still the latest.
    var lingerGeneration = 0
    /// CBT writes acknowledged before their bits were durable (see ParkedWrites).
    let parked = ParkedWrites()
    /// Told (once per failure, on the pumping thread) when the change log could not be
    /// synced for a parked write: its data was written anyway, so the log on disk is no
    /// longer a superset of the changes and CBT must be disabled with the reason.
    var onLogFailure: ((CBTError) -> Void)?

    init(uuid: String, family: String, chain: any DiskImage) {
        self.uuid = uuid
        self.family = family
        self.chain = chain
        self.key = uuid
    }

    public var virtualSize: UInt64 { withChain { $0.virtualSize } }
    public var writable: Bool { withChain { $0.writable } }

    @inline(__always)
    public func withChain<T>(_ body: (any DiskImage) throws -> T) rethrows -> T {
        gate.lockShared()
        defer { gate.unlock() }
        return try body(chain)
    }

    /// With `cachedOnly`, never waits: not for the disk (`.wouldBlock`), nor for a snapshot
    /// holding the gate.
    public func read(into buf: UnsafeMutableRawBufferPointer, at offset: UInt64, cachedOnly: Bool = false) throws(DiskError) {
        var holes: [Range<Int>] = []
        try read(into: buf, at: offset, cachedOnly: cachedOnly, holes: &holes)
    }

    /// `read`, also listing the ranges of `buf` no layer holds (see `DiskImage.read(holes:)`).
    public func read(into buf: UnsafeMutableRawBufferPointer, at offset: UInt64, cachedOnly: Bool = false,
                     holes: inout [Range<Int>]) throws(DiskError) {
        do { try readChain(into: buf, at: offset, cachedOnly: cachedOnly, holes: &holes) } catch { throw DiskError(error) }
    }

    private func readChain(into buf: UnsafeMutableRawBufferPointer, at offset: UInt64, cachedOnly: Bool,
                           holes: inout [Range<Int>]) throws {
        if cachedOnly {
            guard gate.tryLockShared() else { throw DiskError.wouldBlock }
        } else {
            gate.lockShared()
        }
        defer { gate.unlock() }
        ops.add(1, ordering: .relaxed)
        // Taken before the chain is read: an entry written meanwhile is in both, the same bytes.
        let over = parked.overlapping(offset, UInt64(buf.count))
        try chain.read(into: buf, at: offset, cachedOnly: cachedOnly, holes: &holes)
        if !over.isEmpty { Self.lay(over, over: buf, at: offset, holes: &holes) }
    }

    /// A read served from the files' page cache without copying: the pieces in order,
    /// data as mapped memory (faulted in, so using it never waits for the disk) and runs of
    /// zeros no layer holds. Nil when that cannot be done here (a parked write overlaps,
    /// a file cannot be mapped): read into a buffer instead.
    public func readMapped(at offset: UInt64, length: Int) throws(DiskError) -> MappedRead? {
        gate.lockShared()
        defer { gate.unlock() }
        ops.add(1, ordering: .relaxed)
        guard parked.overlapping(offset, UInt64(length)).isEmpty else { return nil }
        let plan: ReadPlan
        do { plan = try chain.plan(offset: offset, length: length) } catch { throw DiskError(error) }
        var pieces: [MappedRead.Piece] = []
        var owners: [any MappableFile] = []
        pieces.reserveCapacity(plan.pieces.count)
        for p in plan.pieces {
            switch p {
            case .zeros(let n):
                pieces.append(.zeros(n))
            case .data(let file, let o, let n):
                guard let m = file.mapped(offset: o, count: n) else { return nil }
                pieces.append(.bytes(m))
                if !owners.contains(where: { $0 === file }) { owners.append(file) }
            }
        }
        return MappedRead(pieces: pieces, owners: owners)
    }

    /// Copies parked data over a read's buffer (oldest first, so the newest wins) and takes
    /// its ranges out of the holes.
    static func lay(_ entries: [ParkedWrites.Entry], over buf: UnsafeMutableRawBufferPointer, at offset: UInt64,
                    holes: inout [Range<Int>]) {
        let end = offset + UInt64(buf.count)
        for e in entries {
            let from = max(offset, e.offset), to = min(end, e.end)
            guard from < to else { continue }
            let dst = Int(from - offset), src = Int(from - e.offset), n = Int(to - from)
            e.data.withUnsafeBytes { d in
                UnsafeMutableRawBufferPointer(rebasing: buf[dst..<(dst + n)]).copyMemory(
                    from: UnsafeRawBufferPointer(rebasing: d[src..<(src + n)]))
            }
            if !holes.isEmpty {
                let cut = dst..<(dst + n)
                holes = holes.flatMap { h -> [Range<Int>] in
                    guard h.overlaps(cut) else { return [h] }
                    var rest: [Range<Int>] = []
                    if h.lowerBound < cut.lowerBound { rest.append(h.lowerBound..<cut.lowerBound) }
                    if cut.upperBound < h.upperBound { rest.append(cut.upperBound..<h.upperBound) }
                    return rest
                }
            }
        }
    }

    public func write(_ buf: UnsafeRawBufferPointer, at offset: UInt64) throws(DiskError) {
        if parked.lastOverlapping(offset, UInt64(buf.count)) != nil { waitParked() }
        gate.lockShared()
        defer { gate.unlock() }
        // Marked once the data has landed (see `ChangeTracker`); the defer runs first.
        defer { tracker?.mark(offset, UInt64(buf.count)) }
        do {
            guard let log = cbt, log.markDirty(offset: offset, length: UInt64(buf.count)) else {
                return try chain.write(buf, at: offset)
            }
            try chain.write(buf, at: offset, beforeVisible: commitOnce(log))
        } catch { throw DiskError(error) }
    }

    /// A write done here and now, on the caller's thread, when nothing would make it wait
    /// beyond a pwrite into the page cache: no parked write overlaps it, the gate is free
    /// to share, its change-log bits are durable already (or there is no log), and it is one
    /// plain write into the leaf's file (`writesInPlace`: no allocation in the image's
    /// tables, no copy-up). False when any of that fails: then
    /// nothing was written, and the caller submits the write as usual.
    public func writeNow(_ buf: UnsafeRawBufferPointer, at offset: UInt64) throws(DiskError) -> Bool {
        let n = UInt64(buf.count)
        guard parked.lastOverlapping(offset, n) == nil, gate.tryLockShared() else { return false }
        defer { gate.unlock() }
        // True while any bit is not durable; it stays so for the usual path to commit.
        if let log = cbt, log.markDirty(offset: offset, length: n) { return false }
        guard chain.writesInPlace(offset: offset, length: n) else { return false }
        ops.add(1, ordering: .relaxed)
        defer { tracker?.mark(offset, n) }
        do { try chain.write(buf, at: offset) } catch { throw DiskError(error) }
        return true
    }

    /// The server's write. The same as `write`, except that a write into space the leaf
    /// already holds does not hold a thread while the change log syncs: it waits on the log
    /// and its data is written on `queue` once the batch is durable. (A write that allocates
    /// runs at once: its log sync overlaps the block's copy-up and gates only the BAT.)
    /// `withBytes` lends the payload; `done` gets the outcome.
    public func write(length: Int, at offset: UInt64, on queue: DispatchQueue,
                      withBytes: @escaping @Sendable (_ body: (UnsafeRawBufferPointer) throws -> Void) throws -> Void,
                      done: @escaping @Sendable (DiskError?) -> Void) {
        submitWrite(length: length, at: offset, on: queue, withBytes: withBytes) { done($0.map { DiskError($0) }) }
    }

    private func submitWrite(length: Int, at offset: UInt64, on queue: DispatchQueue,
                             withBytes: @escaping @Sendable (_ body: (UnsafeRawBufferPointer) throws -> Void) throws -> Void,
                             done: @escaping @Sendable (Error?) -> Void) {
        // A write issued after an overlapping parked write was acknowledged lands after it.
        if let seq = parked.lastOverlapping(offset, UInt64(length)) {
            parked.after(seq) {
                queue.async { self.submitWrite(length: length, at: offset, on: queue, withBytes: withBytes, done: done) }
            }
            return
        }
        gate.lockShared()
        ops.add(1, ordering: .relaxed)
        if let log = cbt, log.markDirty(offset: offset, length: UInt64(length)) {
            // The leaf holds the space: park the data and acknowledge now; it is written
            // once its bits are durable.
            if chain.leafHoldsAll(offset: offset, length: UInt64(length)) {
                let seq: UInt64?
                do {
                    seq = try parked.park(offset: offset, length: length) { dst in
                        try withBytes { src in dst.copyMemory(from: src) }
                    }
                } catch {
                    gate.unlock()
                    return done(error)
                }
                if let seq {
                    StorageMetrics.parkedWrites.increment()
                    // Parked: reads through the handle see the data from now on.
                    tracker?.mark(offset, UInt64(length))
                    gate.unlock()
                    done(nil)
                    log.commitLazily { failure in
                        self.parked.markReady(seq, failure: failure)
                        queue.async { self.pumpParked() }
                    }
                    return
                }
            }
            if !chain.leafLacksAll(offset: offset, length: UInt64(length)) {
                gate.unlock()
                log.commitAsync { error in
                    if let error { return done(error) }
                    queue.async { self.writeTracked(by: log, at: offset, length: length, withBytes: withBytes, done: done) }
                }
                return
            }
            defer { gate.unlock() }
            do {
                defer { tracker?.mark(offset, UInt64(length)) }
                try withBytes { try chain.write($0, at: offset, beforeVisible: commitOnce(log)) }
            } catch { return done(error) }
            return done(nil)
        }
        defer { gate.unlock() }
        do {
            defer { tracker?.mark(offset, UInt64(length)) }
            try withBytes { try chain.write($0, at: offset) }
        } catch { return done(error) }
        done(nil)
    }

    /// A `beforeVisible` gate that commits the log once, however many pieces the write has.
    func commitOnce(_ log: ChangeLog) -> () throws -> Void {
        var committed = false
        return {
            if committed { return }
            try log.commit()
            committed = true
        }
    }

    /// Writes data whose bits `log` made durable. If a snapshot swapped the log meanwhile,
    /// the bits go into the new log too before the data is written.
    func writeTracked(by log: ChangeLog, at offset: UInt64, length: Int,
                      withBytes: (_ body: (UnsafeRawBufferPointer) throws -> Void) throws -> Void, done: (Error?) -> Void) {
        gate.lockShared()
        defer { gate.unlock() }
        do {
            defer { tracker?.mark(offset, UInt64(length)) }
            if let now = cbt, now !== log { try track(offset: offset, length: UInt64(length)) }
            try withBytes { try chain.write($0, at: offset) }
        } catch { return done(error) }
        done(nil)
    }

    /// CBT: the bits for a write are durable before any of its data reaches the image.
    @inline(__always)
    func track(offset: UInt64, length: UInt64) throws {
        if let log = cbt, log.markDirty(offset: offset, length: length) { try log.commit() }
    }

    public func writeZeroes(offset: UInt64, length: UInt64, punch: Bool, fastOnly: Bool) throws(DiskError) {
        if parked.lastOverlapping(offset, length) != nil { waitParked() }
        gate.lockShared()
        defer { gate.unlock() }
        defer { tracker?.mark(offset, length) }
        do {
            try track(offset: offset, length: length)
            try chain.writeZeroes(offset: offset, length: length, punch: punch, fastOnly: fastOnly)
        } catch { throw DiskError(error) }
    }

    /// Runs of allocated (some layer holds data) and unallocated space.
    public func allocationRuns(offset: UInt64, length: UInt64) throws(DiskError) -> [(allocated: Bool, length: UInt64)] {
        gate.lockShared()
        defer { gate.unlock() }
        do { return try chain.allocationRuns(offset: offset, length: length) } catch { throw DiskError(error) }
    }

    /// Parked writes reach the image first; a parked write that could not be written is
    /// reported here, as a write-back error is at fsync.
    public func flush() throws(DiskError) {
        waitParked()
        if let failure = parked.takeWriteFailure() { throw failure }
        gate.lockShared()
        defer { gate.unlock() }
        do { try chain.flush() } catch { throw DiskError(error) }
    }

    /// Writes parked entries whose bits are durable, in order.
    func pumpParked() {
        parked.pump { e throws(DiskError) in try applyParked(e) }
    }

    func applyParked(_ e: ParkedWrites.Entry) throws(DiskError) {
        if let failure = e.failure { onLogFailure?(failure) }
        gate.lockShared()
        defer { gate.unlock() }
        do {
            try e.data.withUnsafeBytes { try chain.write($0, at: e.offset, beforeVisible: nil) }
        } catch { throw DiskError(error) }
    }

    /// Blocks until every write parked so far is written to the image.
    func waitParked() {
        parked.waitAllWritten(makeDurable: { () -> CBTError? in
            guard let log = withCBT({ $0 }) else { return nil }
            do throws(CBTError) { try log.commit() } catch { return error }
            return nil
        }, apply: { e throws(DiskError) in try applyParked(e) })
    }

    /// Takes the gate exclusively once nothing is parked (parking needs the shared side).
    /// New writes take the waiting path meanwhile, so the drain ends under any load.
    private func quiesce() {
        parked.holdOff()
        defer { parked.resume() }
        while true {
            waitParked()
            gate.lockExclusive()
            if parked.isEmpty { return }
            gate.unlock()
        }
    }

    /// Runs `body` with all I/O held off (to swap the change log).
    func exclusivelyCBT(_ body: (ChangeLog?) throws -> ChangeLog?) rethrows {
        quiesce()
        defer { gate.unlock() }
        cbt = try body(cbt)
    }

    /// Runs `body` with all I/O held off; `body` returns the chain to use from now on.
    func exclusively(_ body: (any DiskImage) throws -> any DiskImage) rethrows {
        quiesce()
        defer { gate.unlock() }
        chain = try body(chain)
    }

    /// Runs `body` with all I/O held off, the chain unchanged.
    func paused<T>(_ body: (any DiskImage) throws -> T) rethrows -> T {
        quiesce()
        defer { gate.unlock() }
        return try body(chain)
    }

    func close() {
        quiesce()
        defer { gate.unlock() }
        chain.close()
    }
}

/// The pieces of a read as mapped file memory and zero runs (`VDIHandle.readMapped`).
/// The memory stays valid while this value (which holds the files) lives.
public struct MappedRead: @unchecked Sendable {
    // Unchecked: the pointers are into mapped pages nobody writes while `owners` (the
    // files, which keep the mappings) live, and this value holds them.
    public enum Piece {
        case bytes(UnsafeRawBufferPointer)
        case zeros(Int)
    }
    public let pieces: [Piece]
    let owners: [any MappableFile]
}
