// `GET /metrics`: everything the process reports through swift-metrics, in the Prometheus
// text format (swift-prometheus), on the HTTP listener. Unauthenticated, like most
// exporters: it shows counts, VDI uuids and timings, never data or tokens; the listener
// is on loopback by default (see the README before binding it wider).

import CoreMetrics
import Metrics
import Prometheus
import Storage

public enum MetricsExport {
    public static let registry = PrometheusCollectorRegistry()

    /// Makes swift-metrics report into `registry` (once, before any metric is made).
    public static func bootstrap() {
        var factory = PrometheusMetricsFactory(registry: registry)
        // NBD requests take microseconds: finer buckets than the default's.
        factory.defaultDurationHistogramBuckets = [
            .microseconds(10), .microseconds(25), .microseconds(50), .microseconds(100), .microseconds(250),
            .microseconds(500), .milliseconds(1), .milliseconds(2), .milliseconds(5), .milliseconds(10),
            .milliseconds(25), .milliseconds(50), .milliseconds(100), .milliseconds(250), .milliseconds(500),
            .seconds(1), .seconds(2), .seconds(5), .seconds(10),
        ]
        MetricsSystem.bootstrap(factory)
    }

    /// The text to serve: first the values computed when asked (chain depths, tasks).
    static func scrape(_ pool: Pool) -> [UInt8] {
        for sr in pool.srs {
            for (uuid, depth) in sr.chainDepths() {
                Gauge(label: "vdinbd_vdi_chain_depth", dimensions: [("vdi", uuid)]).record(depth)
            }
        }
        let running = pool.tasks.all().filter { $0.status == .pending }.count
        Gauge(label: "vdinbd_tasks_pending").record(running)
        return registry.emitToBuffer()
    }
}
