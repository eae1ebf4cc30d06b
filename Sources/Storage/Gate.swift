import Foundation
import Image
import Locking

/// The readers-writer lock between a VDI's I/O (shared) and the operations that change its
/// chain or change log under it (exclusive); writer-preferring, so steady I/O cannot starve
/// a quiesce.
typealias Gate = ReadersWriterLock

/// While a VDI's leaf is merged into its parent with clients writing: the ranges written,
/// zeroed or trimmed since the merge began, in 2 MiB units, so the final pass (with I/O
/// held off) copies only those again.
///
/// A range is marked only once its data is visible to reads through the handle (written,
/// or parked), never before: the merge's catch-up takes the marks and then reads, so a
/// write marked first and landing after that read would be taken, copied stale, and lost.
final class ChangeTracker: Sendable {
    static let unit: UInt64 = 2 << 20
    private let units = Mutex<Set<UInt64>>([])

    func mark(_ offset: UInt64, _ length: UInt64) {
        guard length > 0 else { return }
        let first = offset / Self.unit, last = (offset + length - 1) / Self.unit
        units.withLock { s in for u in first...last { s.insert(u) } }
    }

    /// The marked ranges, merged and sorted, clipped to `size`; the set is emptied.
    func take(size: UInt64) -> [Range<UInt64>] {
        let all = units.withLock { s -> [UInt64] in defer { s.removeAll() }; return s.sorted() }
        var out: [Range<UInt64>] = []
        for u in all {
            let r = (u * Self.unit)..<min((u + 1) * Self.unit, size)
            guard !r.isEmpty else { continue }
            if let last = out.last, last.upperBound == r.lowerBound { out[out.count - 1] = last.lowerBound..<r.upperBound } else { out.append(r) }
        }
        return out
    }

    var count: Int { units.withLock { $0.count } }
}
