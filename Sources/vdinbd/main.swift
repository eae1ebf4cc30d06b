import ArgumentParser
import Control
import Dispatch
import Foundation
import Logging

import HTTP
import Server
import Storage
import TLS
#if canImport(Glibc)
import Glibc
#endif

enum TLSMode: String, ExpressibleByArgument, CaseIterable {
    case off, on, require
}

struct VDINBD: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "vdinbd",
        abstract: "Serve the VDIs of a storage repository over NBD.")

    @ArgumentParser.Option(name: .long, help: ArgumentHelp(
        "Storage repository directory, optionally with the image formats it holds: PATH[,formats=vhd+qcow2+raw] (repeatable).",
        discussion: "Formats: vhd (VHD chains, up to 2040 GiB), qcow2 (qcow2 v3 chains, up to 16 TiB) and raw (a sparse file, no snapshots, up to 16 TiB); the first is the default for new VDIs, and a size past it takes the next with chains. Kept in the SR; without formats=, the ones kept there, else all. Given more than once, the server hosts each SR (SR.get_all lists them); the first is the default for VDI.create and holds the control socket."))
    var sr: [String] = []

    /// Each `--sr`'s directory and, when given, its `formats=`.
    var srSpecs: [(path: String, formats: String?)] {
        (sr.isEmpty ? ["./sr"] : sr).map { s in
            guard let r = s.range(of: ",formats=") else { return (s, nil) }
            return (String(s[..<r.lowerBound]), String(s[r.upperBound...]))
        }
    }
    var srPath: String { srSpecs[0].path }

    @ArgumentParser.Option(name: .long, help: "Address to listen on, HOST:PORT (repeatable; [::1]:PORT for IPv6).")
    var listen: [String] = []

    @ArgumentParser.Option(name: .long, help: "TLS mode: off, on (offered), require.")
    var tls: TLSMode = .require

    @ArgumentParser.Option(name: .long, help: "Directory with ca-cert.pem, server-cert.pem, server-key.pem (generated on first run).")
    var certs: String = "./certs"

    @ArgumentParser.Option(name: .long, help: "Host name for the generated certificate (repeatable; default: this host's name and localhost).")
    var tlsHostname: [String] = []

    @ArgumentParser.Option(name: .long, help: "GnuTLS priority string.")
    var tlsPriority: String = ServerCredentials.defaultPriority

    @ArgumentParser.Option(name: .long, help: "Also accept TLS-PSK clients, keys in this psktool file (username:hexkey).")
    var tlsPsk: String?

    @Flag(name: .long, help: "Require a client certificate signed by the CA in --certs.")
    var tlsVerifyPeer = false

    @ArgumentParser.Option(name: .long, help: "Control socket path (default: <sr>/control.sock).")
    var controlSocket: String?

    @ArgumentParser.Option(name: .long, help: ArgumentHelp(
        "A user id whose processes may use the control socket (repeatable).",
        discussion: "Checked with SO_PEERCRED on top of the socket's mode 0600; default: the server's own uid and root. A refused client gets a JSON-RPC error and is logged."))
    var controlAllowUid: [UInt32] = []

    @ArgumentParser.Option(name: .long, help: "Maximum simultaneous NBD connections.")
    var maxConnections: Int = 256

    @ArgumentParser.Option(name: .long, help: "Maximum simultaneous NBD connections to one VDI, over all its tokens (default: no limit beyond --max-connections); one more is refused at NBD_OPT_GO with NBD_REP_ERR_POLICY and the reason.")
    var maxConnectionsPerExport: Int?

    @ArgumentParser.Option(name: .long, help: "Maximum simultaneous NBD connections through one export token (default: no limit).")
    var maxConnectionsPerToken: Int?

    @ArgumentParser.Option(name: .long, help: "Seconds a client may take to finish the handshake.")
    var handshakeTimeout: Int = 30

    @ArgumentParser.Option(name: .long, help: "Seconds a connection may sit idle before it is closed (0: never).")
    var idleTimeout: Int = 0

    @ArgumentParser.Option(name: .long, help: "Seconds a VDI's open chain outlives its last connection, so reconnecting is cheap (0: close at once).")
    var attachLinger: Double = 10

    @ArgumentParser.Option(name: .long, help: "HTTP export/import listener, HOST:PORT, or off (default 127.0.0.1:10810; if that port is taken, HTTP stays off with a warning).")
    var http: String?

    @ArgumentParser.Option(name: .long, help: "Log level: trace, debug, info, notice, warning, error.")
    var logLevel: String = "info"

    func validate() throws {
        for l in listen where parseListen(l) == nil {
            throw ValidationError("--listen \(l): expected HOST:PORT, e.g. 127.0.0.1:10809 or [::1]:10809")
        }
        guard Logger.Level(rawValue: logLevel) != nil else { throw ValidationError("--log-level \(logLevel) is not a level") }
        guard maxConnections > 0 else { throw ValidationError("--max-connections must be positive") }
        if let n = maxConnectionsPerExport, n <= 0 { throw ValidationError("--max-connections-per-export must be positive") }
        if let n = maxConnectionsPerToken, n <= 0 { throw ValidationError("--max-connections-per-token must be positive") }
        if let h = http, h != "off", parseListen(h) == nil {
            throw ValidationError("--http \(h): expected HOST:PORT (e.g. 127.0.0.1:10810) or off")
        }
    }

    func run() throws {
        let level = Logger.Level(rawValue: logLevel) ?? .info
        LoggingSystem.bootstrap { label in
            var h = StreamLogHandler.standardError(label: label)
            h.logLevel = level
            return h
        }
        let logger = Logger(label: "vdinbd")
        signal(SIGPIPE, SIG_IGN)
        // Before any metric is made: they report to the registry `/metrics` serves.
        MetricsExport.bootstrap()

        // A misspelt format is a mistake in the arguments; a damaged or busy SR is not.
        let srFormats = try srSpecs.map { spec in
            do { return try spec.formats.map(SR.parseImageFormats) } catch { throw ValidationError("\(error)") }
        }
        let pool: Pool
        do {
            let tasks = TaskTable()
            var srs: [SR] = []
            for (spec, formats) in zip(srSpecs, srFormats) {
                let s = try SR(path: spec.path, logger: Logger(label: "vdinbd.sr"), supportedFormats: formats, tasks: tasks)
                s.attachLingerSeconds = attachLinger
                s.maxConnectionsPerExport = maxConnectionsPerExport
                s.maxConnectionsPerToken = maxConnectionsPerToken
                srs.append(s)
            }
            pool = try Pool(srs)
            try pool.recover()
        } catch {
            throw StartupFailure("\(error)")
        }
        let repo = pool.primary
        var config = ServerConfig()
        config.listen = (listen.isEmpty ? ["127.0.0.1:10809"] : listen).map { parseListen($0)! }
        config.tlsPolicy = tls == .off ? .off : (tls == .on ? .on : .require)
        config.maxConnections = maxConnections
        config.handshakeTimeout = .seconds(handshakeTimeout)
        config.idleTimeout = idleTimeout > 0 ? .seconds(idleTimeout) : nil
        if tls != .off {
            var host = [CChar](repeating: 0, count: 256)
            gethostname(&host, host.count)
            let names = tlsHostname.isEmpty ? [host.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }, "localhost"].filter { !$0.isEmpty } : tlsHostname
            let ips = config.listen.map(\.host).filter { $0 != "0.0.0.0" && $0 != "::" }
            do {
                if try CertificateFactory.ensure(directory: certs, dnsNames: names, ipAddresses: ips) {
                    logger.info("generated a CA and a server certificate in \(certs) for \(names + ips)")
                }
                let creds = try loadCredentials()
                config.tlsCredentials = creds
                for s in pool.srs {
                    s.setTLSIdentity(certificatePEM: creds.trustAnchorPEM, subject: creds.subject)
                    s.certificatesDirectory = URL(fileURLWithPath: certs).standardizedFileURL.path
                }
            } catch {
                throw StartupFailure("TLS: \(error)")
            }
        }
        limitAllocatorRetention()
        let server = NBDServer(config: config, pool: pool, logger: logger)
        do {
            try server.start()
        } catch {
            throw StartupFailure("cannot listen: \(error)")
        }
        for s in pool.srs { s.endpoints = server.boundEndpoints }

        // Every listener is bound before the control socket appears: a client (or a test)
        // that waits for the socket finds the whole server up, and the records it reads
        // already name the HTTP base.
        var httpLine = "off"
        var httpServer: HTTPTransferServer?
        if http != "off" {
            let (host, port) = parseListen(http ?? "127.0.0.1:10810")!
            do {
                // HTTPS whenever NBD has TLS, with the same certificate.
                let hs = HTTPTransferServer(pool: pool, logger: Logger(label: "vdinbd.http"))
                let bound = try hs.start(host: host, port: port, certsDirectory: tls == .off ? nil : certs)
                httpServer = hs
                let h = host.contains(":") ? "[\(host)]" : host
                let base = "\(tls == .off ? "http" : "https")://\(h):\(bound)"
                for s in pool.srs { s.httpBase = base }
                httpLine = base + " (export_raw_vdi, import_raw_vdi, metrics)"
            } catch {
                if http != nil { throw StartupFailure("cannot listen for HTTP on \(http!): \(error)") }
                logger.warning("HTTP stays off: cannot listen on 127.0.0.1:10810 (\(error)); choose another with --http")
                httpLine = "off (127.0.0.1:10810 is taken; see --http)"
            }
        }

        let socketPath = controlSocket ?? repo.path + "/control.sock"
        let control = ControlServer(api: ControlAPI(pool: pool, logger: Logger(label: "vdinbd.control")), path: socketPath,
                                    logger: logger, allowedUIDs: controlAllowUid.isEmpty ? nil : Set(controlAllowUid))
        let ctl = controlSocket == nil && srPath == "./sr" ? "vdictl" : "vdictl --socket \(socketPath)"
        let banner = """
            \(pool.srs.map { "vdinbd: serving SR \($0.path) (\($0 === repo ? "default, " : "")uuid \($0.uuid), formats \($0.supportedImageFormats.map(\.name).joined(separator: ", ")))" }.joined(separator: "\n"))
            vdinbd: NBD on \(server.boundEndpoints.map { "\($0.address):\($0.port)" }.joined(separator: ", ")) (TLS \(tls.rawValue))
            vdinbd: control socket \(socketPath)
            vdinbd: http \(httpLine)
            Create a disk and attach it:
              uuid=$(swift run \(ctl) vdi-create name-label=disk1 virtual-size=1GiB)
              swift run \(ctl) vdi-get-nbd-info uuid=$uuid
              nbdinfo "<uri printed above>"
            """
        do {
            // The banner is written before the socket appears under its name.
            control.start(listenFD: try listenUnix(path: socketPath, mode: 0o600) {
                print(banner)
                fflush(nil)  // every output stream (glibc's `stdout` is a mutable global)
            })
        } catch {
            throw StartupFailure("cannot create control socket: \(error)")
        }
        // Coalesce and garbage collection in the background (SR other_config:gc=false stops it).
        if let fault = ProcessInfo.processInfo.environment["VDINBD_FAULT_GC_STEP"] {
            // Fault injection for the crash tests: exit at the n-th `label` step of the collector.
            let parts = fault.split(separator: ":")
            let label = String(parts[0]), n = parts.count > 1 ? Int(parts[1]) ?? 1 : 1
            var seen = 0
            let lock = NSLock()
            for s in pool.srs {
                s.collector.setStepHook { step in
                    guard step == label else { return }
                    lock.lock(); defer { lock.unlock() }
                    seen += 1
                    if seen >= n { logger.warning("VDINBD_FAULT_GC_STEP: exiting at \(step) #\(seen)"); _exit(137) }
                }
            }
        }
        if let fault = ProcessInfo.processInfo.environment["VDINBD_FAULT_IMPORT_AFTER"], let n = UInt64(fault) {
            // Fault injection for the crash tests: exit once an import has written n bytes onto its VDI.
            for s in pool.srs {
                s.importWriteHook = { done in
                    if done >= n { logger.warning("VDINBD_FAULT_IMPORT_AFTER: exiting after \(done) bytes"); _exit(137) }
                }
            }
        }
        for s in pool.srs { s.startCollector() }

        var sources: [DispatchSourceSignal] = []
        for sig in [SIGINT, SIGTERM] {
            signal(sig, SIG_IGN)
            let s = DispatchSource.makeSignalSource(signal: sig, queue: .main)
            s.setEventHandler {
                logger.info("signal \(sig): draining connections")
                server.shutdown {
                    control.stop()
                    for s in pool.srs { s.closeIdleHandles() }
                    logger.info("stopped")
                    Glibc.exit(0)
                }
            }
            s.resume()
            sources.append(s)
        }
        if tls != .off {
            // SIGHUP: reload certificates for new sessions; connections keep theirs.
            signal(SIGHUP, SIG_IGN)
            let s = DispatchSource.makeSignalSource(signal: SIGHUP, queue: .main)
            s.setEventHandler {
                do {
                    let creds = try loadCredentials()
                    try httpServer?.reloadCertificates(from: certs)
                    server.reloadCredentials(creds)
                    for s in pool.srs { s.setTLSIdentity(certificatePEM: creds.trustAnchorPEM, subject: creds.subject) }
                    logger.info("SIGHUP: reloaded TLS credentials from \(certs)\(httpServer == nil ? "" : " (NBD and HTTPS)")")
                } catch {
                    logger.error("SIGHUP: keeping the old TLS credentials: \(error)")
                }
            }
            s.resume()
            sources.append(s)
        }
        withExtendedLifetime(sources) { dispatchMain() }
    }

    func loadCredentials() throws -> ServerCredentials {
        try ServerCredentials(certsDirectory: certs, priority: tlsPriority, pskFile: tlsPsk, verifyPeer: tlsVerifyPeer)
    }
}

/// What stops a correctly invoked server from starting (a port taken, a certificate that
/// does not load, a socket path it cannot bind). ArgumentParser prints it as "Error: …" and
/// exits 1, without the usage text a `ValidationError` (a mistake in the arguments) gets.
struct StartupFailure: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

func parseListen(_ s: String) -> (host: String, port: Int)? {
    var host: Substring, port: Substring
    if s.hasPrefix("[") {
        guard let close = s.firstIndex(of: "]"), s[s.index(after: close)...].hasPrefix(":") else { return nil }
        host = s[s.index(after: s.startIndex)..<close]
        port = s[s.index(close, offsetBy: 2)...]
    } else {
        guard let colon = s.lastIndex(of: ":") else { return nil }
        host = s[..<colon]
        port = s[s.index(after: colon)...]
    }
    guard let p = Int(port), (0...65535).contains(p), !host.isEmpty else { return nil }
    return (String(host), p)
}

VDINBD.main()
