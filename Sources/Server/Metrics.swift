// What the NBD side reports through swift-metrics (exported by `/metrics` in the Prometheus
// text format; see the README). Handles are made once (per process, or per connection for
// those labelled by export), so a request costs a few atomic adds and one histogram
// update, not a factory lookup.

import CoreMetrics
import Dispatch
import NBD

enum NBDMetrics {
    static let connections = Meter(label: "vdinbd_nbd_connections")
    static let refusedLimit = Counter(label: "vdinbd_nbd_connections_refused_total", dimensions: [("reason", "connection_limit")])
    static let refusedOption = Counter(label: "vdinbd_nbd_options_refused_total")
    static let refusedTimeout = Counter(label: "vdinbd_nbd_connections_refused_total", dimensions: [("reason", "handshake_timeout")])
    static let tlsHandshakes = Counter(label: "vdinbd_tls_handshakes_total")
    static let tlsFailures = Counter(label: "vdinbd_tls_handshake_failures_total")
    static let inFlight = Meter(label: "vdinbd_nbd_requests_in_flight")

    static func error(_ e: ErrorValue) {
        Counter(label: "vdinbd_nbd_errors_total", dimensions: [("errno", "\(e)")]).increment()
    }
}

/// The kinds of request, as the metrics name them.
enum CommandKind: Int, CaseIterable {
    case read, write, flush, trim, writeZeroes, cache, blockStatus
    var name: String {
        switch self {
        case .read: return "read"
        case .write: return "write"
        case .flush: return "flush"
        case .trim: return "trim"
        case .writeZeroes: return "write_zeroes"
        case .cache: return "cache"
        case .blockStatus: return "block_status"
        }
    }
}

/// One connection's request counters, labelled by command and export (the VDI).
struct RequestMetrics {
    let requests: [Counter]
    let bytes: [Counter]
    let latency: [Timer]

    init(export: String) {
        requests = CommandKind.allCases.map {
            Counter(label: "vdinbd_nbd_requests_total", dimensions: [("command", $0.name), ("export", export)])
        }
        bytes = CommandKind.allCases.map {
            Counter(label: "vdinbd_nbd_bytes_total", dimensions: [("command", $0.name), ("export", export)])
        }
        latency = CommandKind.allCases.map {
            Timer(label: "vdinbd_nbd_request_duration_seconds", dimensions: [("command", $0.name)],
                  preferredDisplayUnit: .seconds)
        }
    }

    func done(_ kind: CommandKind, bytes n: Int, started: UInt64) {
        requests[kind.rawValue].increment()
        if n > 0 { bytes[kind.rawValue].increment(by: n) }
        latency[kind.rawValue].recordNanoseconds(Int64(DispatchTime.now().uptimeNanoseconds &- started))
    }
}
