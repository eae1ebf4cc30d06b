// What the SR reports through swift-metrics (see the README's metrics list): CBT log
// syncs, parked writes, export/import bytes and transfers, the collector's work, and each
// VDI's chain depth (computed when scraped, by `chainDepths`).

import CBT
import CoreMetrics
import Foundation

public enum StorageMetrics {
    static let cbtSyncs = Counter(label: "vdinbd_cbt_log_syncs_total")
    static let cbtSyncedWrites = Counter(label: "vdinbd_cbt_log_synced_writes_total")
    static let cbtSyncLatency = Timer(label: "vdinbd_cbt_log_sync_duration_seconds", preferredDisplayUnit: .seconds)
    static let parkedWrites = Counter(label: "vdinbd_cbt_parked_writes_total")
    public static let exportBytes = Counter(label: "vdinbd_transfer_bytes_total", dimensions: [("direction", "export")])
    public static let importBytes = Counter(label: "vdinbd_transfer_bytes_total", dimensions: [("direction", "import")])
    public static let activeExports = Meter(label: "vdinbd_transfers_active", dimensions: [("direction", "export")])
    public static let activeImports = Meter(label: "vdinbd_transfers_active", dimensions: [("direction", "import")])
    static let coalescedBytes = Counter(label: "vdinbd_gc_coalesced_bytes_total")
    static let coalesces = Counter(label: "vdinbd_gc_coalesces_total")
    static let gcErrors = Counter(label: "vdinbd_gc_errors_total")
    static let gcPending = Gauge(label: "vdinbd_gc_pending_work")

    /// Routes the change logs' sync reports here (once, at start-up).
    static let installed: Void = {
        ChangeLog.onBatchSynced = { writes, ns in
            cbtSyncs.increment()
            cbtSyncedWrites.increment(by: writes)
            cbtSyncLatency.recordNanoseconds(Int64(ns))
        }
    }()
}

extension SR {
    /// Each VDI's chain depth (the files its reads may go through), from the records.
    public func chainDepths() -> [(uuid: String, depth: Int)] {
        // One read of every record, hidden bases included (the walk goes through them).
        guard let stored = try? dbRead({ try VDIRecord.fetchAll($0) }) else { return [] }
        let parent = Dictionary(stored.map { ($0.uuid, $0.parent) }, uniquingKeysWith: { a, _ in a })
        return stored.filter { $0.managed && $0.type != .cbtMetadata }.map { r in
            var depth = 1, at = r.parent
            while let p = at, depth < 1000 {
                depth += 1
                at = parent[p] ?? nil
            }
            return (r.uuid, depth)
        }
    }
}
