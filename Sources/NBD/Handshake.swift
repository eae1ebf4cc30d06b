// The fixed-newstyle handshake as a value-type state machine: it takes decoded client
// messages and returns actions for the transport to carry out. It never does I/O.

import NIOCore

/// What an export looks like to the protocol layer.
public struct ExportDescription: Sendable, Equatable {
    public var name: String
    public var size: UInt64
    public var readOnly: Bool
    public var canMultiConn: Bool
    /// Meta context names this export offers (`base:allocation` always).
    public var metaContexts: [String]
    public init(name: String, size: UInt64, readOnly: Bool, canMultiConn: Bool = false,
                metaContexts: [String] = [baseAllocationContext]) {
        self.name = name
        self.size = size
        self.readOnly = readOnly
        self.canMultiConn = canMultiConn
        self.metaContexts = metaContexts
    }

    /// The flags advertised for this export: exactly what the server implements.
    public func transmissionFlags(structuredReplies: Bool) -> TransmissionFlags {
        var f: TransmissionFlags = [.hasFlags, .sendFlush, .sendFUA, .sendCache]
        if readOnly {
            f.insert(.readOnly)
        } else {
            f.formUnion([.sendTrim, .sendWriteZeroes, .sendFastZero])
        }
        if canMultiConn { f.insert(.canMultiConn) }
        // NBD spec: DF only means something with structured replies.
        if structuredReplies { f.insert(.sendDF) }
        return f
    }
}

/// Why a lookup failed; the message goes to the client and to the log.
public struct ExportLookupFailure: Error, Sendable {
    public var message: String
    /// The export exists but policy refuses this client now (`NBD_REP_ERR_POLICY`), rather
    /// than no such export (`NBD_REP_ERR_UNKNOWN`).
    public var policy: Bool
    public init(_ message: String, policy: Bool = false) {
        self.message = message
        self.policy = policy
    }
}

/// Looks up exports by name. Implemented by the Server on top of Storage.
public protocol ExportResolver {
    func describe(exportName: String) -> Result<ExportDescription, ExportLookupFailure>
}

public enum TLSPolicy: Sendable, Equatable {
    case off
    case on
    case require
}

public enum HandshakeAction: Equatable, Sendable {
    case send(OptionReply)
    /// Send the `NBD_OPT_EXPORT_NAME` reply and enter transmission.
    case sendExportNameReply(size: UInt64, flags: TransmissionFlags, noZeroes: Bool)
    /// Enter transmission with what was negotiated (after any replies before it are sent).
    case enterTransmission(TransmissionState)
    case close(reason: String)
    /// Reply ACK to STARTTLS, then run the TLS handshake.
    case startTLS
}

public struct HandshakeStateMachine: Sendable {
    public enum State: Equatable, Sendable {
        case awaitingClientFlags
        case optionHaggling
        case transmission
        case closed
    }

    public private(set) var state: State = .awaitingClientFlags
    public private(set) var clientFlags: ClientFlags = []
    public let tlsPolicy: TLSPolicy
    public private(set) var tlsActive = false
    var optionCount = 0
    /// `NBD_OPT_STRUCTURED_REPLY` was acknowledged.
    public private(set) var structuredReplies = false
    /// `NBD_OPT_EXTENDED_HEADERS` was acknowledged (implies structured replies).
    public private(set) var extendedHeaders = false
    /// Contexts chosen by the last `NBD_OPT_SET_META_CONTEXT`, and for which export.
    var metaContexts: [MetaContext] = []
    var metaContextExport: String?
    var nextContextID: UInt32 = 1

    public init(tlsPolicy: TLSPolicy) { self.tlsPolicy = tlsPolicy }

    public static let serverFlags: HandshakeFlags = [.fixedNewstyle, .noZeroes]

    public mutating func receive(clientFlags raw: ClientFlags) -> [HandshakeAction] {
        guard state == .awaitingClientFlags else { return close("client flags out of order") }
        guard raw.contains(.fixedNewstyle) else { return close("\(NBDProtocolError.clientNotFixedNewstyle)") }
        guard ClientFlags.known.isSuperset(of: raw) else {
            return close("\(NBDProtocolError.unknownClientFlags(raw.rawValue))")
        }
        clientFlags = raw
        state = .optionHaggling
        return []
    }

    /// The transport finished the TLS handshake.
    public mutating func tlsEstablished() {
        tlsActive = true
        // NBD spec: anything negotiated in plaintext is forgotten after STARTTLS.
        optionCount = 0
        structuredReplies = false
        extendedHeaders = false
        metaContexts = []
        metaContextExport = nil
    }

    public mutating func receive(option req: OptionRequest, resolver: ExportResolver) -> [HandshakeAction] {
        guard state == .optionHaggling else { return close("option outside option haggling") }
        optionCount += 1
        guard optionCount <= Limits.maxOptions else { return close("\(NBDProtocolError.tooManyOptions)") }
        let opt = req.option
        let needTLS = tlsPolicy == .require && !tlsActive
        if needTLS && opt != .startTLS && opt != .abort {
            if opt == .exportName { return close("NBD_OPT_EXPORT_NAME before TLS: TLS is required") }
            return [.send(.error(opt, .errTLSReqd, "TLS is required: send NBD_OPT_STARTTLS first"))]
        }
        switch opt {
        case .abort:
            state = .closed
            return [.send(OptionReply(option: .abort, type: .ack)), .close(reason: "client sent NBD_OPT_ABORT")]
        case .list:
            return [.send(.error(.list, .errPolicy, "export names are access tokens and are never listed"))]
        case .startTLS:
            guard req.data.isEmpty else { return [.send(.error(opt, .errInvalid, "STARTTLS takes no data"))] }
            if tlsActive { return [.send(.error(opt, .errInvalid, "TLS is already active"))] }
            if tlsPolicy == .off { return [.send(.error(opt, .errPolicy, "TLS is disabled on this server"))] }
            return [.startTLS]
        case .exportName:
            // The extension: a client that negotiated extended headers must use GO.
            if extendedHeaders { return close("NBD_OPT_EXPORT_NAME after NBD_OPT_EXTENDED_HEADERS") }
            guard let name = String(validatingUTF8: req.data.map { CChar(bitPattern: $0) } + [0]),
                  req.data.count <= Limits.maxStringLength
            else { return close("export name is not a valid string") }
            switch resolver.describe(exportName: name) {
            case .failure(let f):
                // EXPORT_NAME has no error reply: disconnect.
                return close("unknown export: \(f.message)")
            case .success(let e):
                state = .transmission
                let ts = transmissionState(e)
                return [.sendExportNameReply(size: e.size, flags: ts.flags, noZeroes: clientFlags.contains(.noZeroes)),
                        .enterTransmission(ts)]
            }
        case .info, .go:
            let ir: InfoRequest
            do {
                ir = try InfoRequest.parse(opt, req.data)
            } catch {
                return [.send(.error(opt, .errInvalid, "\(error)"))]
            }
            switch resolver.describe(exportName: ir.exportName) {
            case .failure(let f):
                return [.send(.error(opt, f.policy ? .errPolicy : .errUnknown, f.message))]
            case .success(let e):
                var out: [HandshakeAction] = [
                    .send(.infoExport(opt, size: e.size,
                                      flags: e.transmissionFlags(structuredReplies: structuredReplies || extendedHeaders))),
                    .send(.infoBlockSize(opt, minimum: Limits.minimumBlockSize, preferred: Limits.preferredBlockSize,
                                         maximum: Limits.maxPayload)),
                ]
                if ir.requests.contains(.name) { out.append(.send(.infoName(opt, name: ir.exportName))) }
                out.append(.send(OptionReply(option: opt, type: .ack)))
                if opt == .go {
                    state = .transmission
                    out.append(.enterTransmission(transmissionState(e)))
                }
                return out
            }
        case .structuredReply:
            guard req.data.isEmpty else { return [.send(.error(opt, .errInvalid, "STRUCTURED_REPLY takes no data"))] }
            if extendedHeaders {
                return [.send(.error(opt, .errExtHeaderReqd, "extended headers are already negotiated and take precedence"))]
            }
            structuredReplies = true
            return [.send(OptionReply(option: opt, type: .ack))]
        case .extendedHeaders:
            guard req.data.isEmpty else { return [.send(.error(opt, .errInvalid, "EXTENDED_HEADERS takes no data"))] }
            extendedHeaders = true
            return [.send(OptionReply(option: opt, type: .ack))]
        case .listMetaContext, .setMetaContext:
            return metaContext(req, resolver: resolver)
        default:
            return [.send(.error(opt, .errUnsup, "\(opt) is not supported"))]
        }
    }

    /// Contexts survive into transmission only for the export they were chosen for.
    func transmissionState(_ e: ExportDescription) -> TransmissionState {
        let contexts = metaContextExport == e.name ? metaContexts : []
        return TransmissionState(export: e, structuredReplies: structuredReplies, extendedHeaders: extendedHeaders,
                                 metaContexts: contexts)
    }

    mutating func metaContext(_ req: OptionRequest, resolver: ExportResolver) -> [HandshakeAction] {
        let opt = req.option
        let mr: MetaContextRequest
        do {
            mr = try MetaContextRequest.parse(opt, req.data)
        } catch {
            return [.send(.error(opt, .errInvalid, "\(error)"))]
        }
        guard structuredReplies || extendedHeaders else {
            return [.send(.error(opt, .errInvalid, "negotiate NBD_OPT_STRUCTURED_REPLY or NBD_OPT_EXTENDED_HEADERS first"))]
        }
        let export: ExportDescription
        switch resolver.describe(exportName: mr.exportName) {
        case .failure(let f): return [.send(.error(opt, f.policy ? .errPolicy : .errUnknown, f.message))]
        case .success(let e): export = e
        }
        var chosen: [String] = []
        if opt == .listMetaContext && mr.queries.isEmpty {
            chosen = export.metaContexts
        } else {
            for q in mr.queries {
                for name in export.metaContexts where !chosen.contains(name) {
                    // A query of just a namespace ("base:") lists all of it, for LIST only.
                    let ns = q.hasSuffix(":") && opt == .listMetaContext && name.hasPrefix(q)
                    if name == q || ns { chosen.append(name) }
                }
            }
        }
        var out: [HandshakeAction] = []
        if opt == .setMetaContext {
            metaContexts = []
            for name in chosen {
                metaContexts.append(MetaContext(id: nextContextID, name: name))
                nextContextID += 1
            }
            metaContextExport = mr.exportName
            out = metaContexts.map { .send(.metaContext(opt, id: $0.id, name: $0.name)) }
        } else {
            out = chosen.map { .send(.metaContext(opt, id: 0, name: $0)) }
        }
        out.append(.send(OptionReply(option: opt, type: .ack)))
        return out
    }

    mutating func close(_ reason: String) -> [HandshakeAction] {
        state = .closed
        return [.close(reason: reason)]
    }
}
