// The two locks an open qcow2 file orders its writes with. Allocating writes share
// `allocating` (each holds only the clusters it fills, in `filling`), so copy-ups of
// different clusters run side by side; a sync, a zeroing, growth, repair and close take it
// alone, so a sync publishes only entries whose data was written before its first
// fdatasync.

import Foundation
import Image

/// Clusters being filled by allocating writes: a write waits until none of its clusters
/// is another's, then holds them all.
final class ClusterLocks: @unchecked Sendable {
    // Unchecked: `held` is only touched with `cond` locked.
    private let cond = NSCondition()
    private var held: Set<UInt64> = []

    func acquire(_ clusters: ClosedRange<UInt64>) {
        cond.lock()
        defer { cond.unlock() }
        while clusters.contains(where: { held.contains($0) }) { cond.wait() }
        for c in clusters { held.insert(c) }
    }

    func release(_ clusters: ClosedRange<UInt64>) {
        cond.lock()
        for c in clusters { held.remove(c) }
        cond.broadcast()
        cond.unlock()
    }
}
