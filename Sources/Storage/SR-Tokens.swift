import Foundation
import GRDB

// Export tokens: minted by get_nbd_info, checked at NBD option haggling, revoked by admins.

extension SR {

    public func getNBDInfo(_ uuid: String, readOnly: Bool = false, lifetime: TimeInterval? = nil,
                           mode: AttachMode = .direct, label: String? = nil) throws -> [NBDInfoRecord] {
        let r = try record(uuid)
        guard r.type != .cbtMetadata else { throw StorageError.vdiIncompatibleType(uuid: r.uuid, type: r.type.rawValue) }
        try requireFile(r)
        // A scratch view is an overlay: the VDI's format must hold chains.
        if mode == .scratch { try requireChains(r.uuid, for: "scratch views") }
        var bytes = [UInt8](repeating: 0, count: 24)
        var rng = SystemRandomNumberGenerator()  // getrandom(2): the system CSPRNG
        for i in bytes.indices { bytes[i] = UInt8.random(in: 0...255, using: &rng) }
        let secret = Data(bytes).base64EncodedString()
            .replacingOccurrences(of: "+", with: "-").replacingOccurrences(of: "/", with: "_")
            .replacingOccurrences(of: "=", with: "")
        let life = lifetime ?? defaultTokenLifetime
        // A scratch view is writable whatever the VDI is: its writes never reach the VDI.
        let ro = mode == .scratch ? readOnly : readOnly || r.readOnly || r.isASnapshot
        let tag = label ?? "token-" + String(UUID().uuidString.lowercased().prefix(8))
        let tok = TokenRecord(digest: TokenDigest.of(secret), vdiUUID: r.uuid, readOnly: ro,
                              expiresAt: life.map { Date().addingTimeInterval($0) }, revoked: false, created: Date(),
                              label: tag, mode: mode)
        try dbWrite { try tok.insert($0) }
        let name = "/\(r.uuid)?token=\(secret)"
        tlsIdentityLock.lock()
        let id = tlsIdentity
        tlsIdentityLock.unlock()
        let dir = certificatesDirectory
        let http = httpBase.map { "\($0)/export_raw_vdi?vdi=\(r.uuid)&format=vhd&token=\(secret)" } ?? ""
        return endpoints.map {
            var info = NBDInfoRecord(exportname: name, address: $0.address, port: $0.port, cert: id.pem, subject: id.subject,
                                     certificatesDirectory: dir)
            info.http = http
            return info
        }
    }

    /// Revokes every token of a VDI, or the one named; the live connections that used them
    /// are told to close (`onTokensRevoked`, with the tokens' digests).
    public func revokeTokens(vdi uuid: String, exportName: String? = nil) throws -> Int {
        let u = try SR.validUUID(uuid)
        let digests: [String] = try dbWrite { db in
            var q = TokenRecord.filter(Column("vdi_uuid") == u && Column("revoked") == false)
            if let n = exportName, let s = SR.secret(fromExportName: n) { q = q.filter(Column("digest") == TokenDigest.of(s)) }
            let hit = try q.fetchAll(db).map(\.digest)
            _ = try q.updateAll(db, Column("revoked").set(to: true))
            return hit
        }
        if !digests.isEmpty { onTokensRevoked?(Set(digests)) }
        return digests.count
    }

    static func secret(fromExportName name: String) -> String? {
        guard let r = name.range(of: "?token=") else { return nil }
        return String(name[r.upperBound...])
    }

    public struct ExportGrant: Sendable {
        public var vdi: VDIRecord
        public var readOnly: Bool
        /// The token's digest (the attachment's key; never shown) and label (shown).
        public var digest: String
        public var label: String
        public var mode: AttachMode
    }

    public enum ExportRefusal: Error, Sendable, CustomStringConvertible {
        case malformed, unknown, expired, revoked, vdiGone
        /// Not sharable, and read-write attached through another token.
        case attachedElsewhere(uuid: String, by: String)
        /// As many connections as the server allows per export (VDI) or per token.
        case tooManyConnections(uuid: String, limit: Int, perToken: Bool)
        public var description: String {
            switch self {
            case .attachedElsewhere(let u, let by):
                return "VDI \(u) is not sharable and is attached read-write by \(by); only one read-write attachment at a time"
            case .tooManyConnections(let u, let n, let perToken):
                return perToken
                    ? "this token already has \(n) connections to VDI \(u), the most the server allows per token (--max-connections-per-token)"
                    : "VDI \(u) already has \(n) connections, the most the server allows per export (--max-connections-per-export)"
            case .malformed: return "export name is not of the form /<vdi-uuid>?token=<secret>"
            case .unknown: return "unknown export token"
            case .expired: return "export token expired"
            case .revoked: return "export token revoked"
            case .vdiGone: return "the VDI of this token no longer exists"
            }
        }
    }

    /// Checks a token for `vdi` (the HTTP transfers' check; NBD's adds the attachment rule).
    /// The secret is looked up by its digest, so how long a wrong one takes does not depend
    /// on how much of it matches a real one (it is the digest the index compares, and the
    /// row found is compared again in constant time).
    public func resolve(token secret: String, vdi: String) -> Result<ExportGrant, ExportRefusal> {
        let digest = TokenDigest.of(secret)
        guard let tok = try? dbRead({ try TokenRecord.fetchOne($0, key: digest) }),
              TokenDigest.equal(tok.digest, digest), tok.vdiUUID == vdi.lowercased()
        else { return .failure(.unknown) }
        if tok.revoked { return .failure(.revoked) }
        if let e = tok.expiresAt, e < Date() { return .failure(.expired) }
        guard let r = try? storedRecord(tok.vdiUUID), r.type != .cbtMetadata else { return .failure(.vdiGone) }
        return .success(ExportGrant(vdi: r, readOnly: tok.mode == .scratch ? tok.readOnly : tok.readOnly || r.readOnly,
                                    digest: digest, label: tok.label.isEmpty ? "token" : tok.label, mode: tok.mode))
    }

    /// Checks an export name. The uuid part must match the token's VDI.
    public func resolve(exportName: String) -> Result<ExportGrant, ExportRefusal> {
        // The leading slash is optional: some URI parsers drop it.
        let name = exportName.hasPrefix("/") ? String(exportName.dropFirst()) : exportName
        guard let secret = SR.secret(fromExportName: name), !secret.isEmpty,
              let uuidPart = name.split(separator: "?").first
        else { return .failure(.malformed) }
        let g: ExportGrant
        switch resolve(token: secret, vdi: String(uuidPart)) {
        case .success(let v): g = v
        case .failure(let e): return .failure(e)
        }
        let r = g.vdi
        // Checked again under the family lock at attach; here so GO fails with the reason.
        if let other = conflictingAttachment(r, grant: g) { return .failure(.attachedElsewhere(uuid: r.uuid, by: other.token)) }
        if let full = connectionLimitReached(r.uuid, grant: g) { return .failure(full) }
        return .success(g)
    }

}
