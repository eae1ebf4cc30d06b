// The SRs one server hosts (`vdinbd --sr PATH` given more than once). The first is the
// default: VDIs are made there unless `VDI.create` names another, and the control socket
// lives in it. A VDI uuid names one VDI in the whole pool, so a request about a VDI goes
// to the SR that holds it; export tokens live beside their VDI and move with it.
//
// The SRs share one task table (a task started through one is seen through all). Each SR
// keeps its own database, journal, collector and locks: work in one never waits for
// another, except a migration between two, which holds the moved VDI's family in both.

import Foundation
import Logging

public final class Pool: Sendable {
    /// The hosted SRs, the default first; fixed for the pool's life.
    public let srs: [SR]

    public var primary: SR { srs[0] }
    public var tasks: TaskTable { primary.tasks }

    /// `srs` must share one task table and have distinct paths and uuids.
    public init(_ srs: [SR]) throws {
        precondition(!srs.isEmpty, "a pool holds at least one SR")
        for (i, a) in srs.enumerated() {
            for b in srs[(i + 1)...] where a.path == b.path || a.uuid == b.uuid {
                throw StorageError.srBackendFailure(detail: "SR \(b.path) is given twice (same \(a.path == b.path ? "path" : "uuid") as \(a.path))")
            }
        }
        precondition(srs.allSatisfy { $0.tasks === srs[0].tasks }, "the SRs of a pool share one task table")
        self.srs = srs
        for s in srs { s.pool = self }
    }

    /// The SR a reference names: its uuid or its path (nil: none hosted).
    public func sr(named ref: String) -> SR? {
        if let s = srs.first(where: { $0.uuid == ref.lowercased() }) { return s }
        let path = URL(fileURLWithPath: ref).standardizedFileURL.path
        return srs.first { $0.path == path }
    }

    /// The SR a reference names, or `HANDLE_INVALID` (SR) listing the hosted ones.
    public func sr(ref: String) throws -> SR {
        guard let s = sr(named: ref) else { throw StorageError.handleInvalid(kind: "SR", value: ref) }
        return s
    }

    /// The SR holding the VDI (its record, a hidden base's or a snapshot's included), nil
    /// when none does.
    public func holding(_ vdi: String) -> SR? {
        guard let u = try? SR.validUUID(vdi) else { return nil }
        if srs.count == 1 { return primary }
        return srs.first { (try? $0.anyRecord(u)) != nil }
    }

    /// Where requests about `vdi` go: the SR holding it, else the default (which then
    /// answers that the VDI is missing).
    public func route(_ vdi: String) -> SR { holding(vdi) ?? primary }

    /// Checks an export name against the tokens of the SR that holds its VDI.
    public func resolve(exportName: String) -> (SR, Result<SR.ExportGrant, SR.ExportRefusal>) {
        let name = exportName.hasPrefix("/") ? String(exportName.dropFirst()) : exportName
        let sr = route(String(name.split(separator: "?").first ?? ""))
        return (sr, sr.resolve(exportName: exportName))
    }

    /// The SR whose handles table holds `h` now (a migration to another SR moves it),
    /// nil when none does (it was closed).
    public func owner(of h: VDIHandle) -> SR? {
        srs.first { $0.lookUp(h.key) === h }
    }

    /// Lets go of a connection's handle in the SR that holds it now; `attachedTo` is where
    /// the connection attached (used when no table holds the handle any more).
    public func detach(_ h: VDIHandle, grant: SR.ExportGrant?, attachedTo: SR) {
        // A move hands the handle over under the source's family lock: a detach that
        // waited for it there finds the handle gone and, on the next look, in the
        // destination. Another move of it takes a whole copy first, so two looks suffice;
        // a third costs nothing.
        for _ in 0..<3 {
            let sr = owner(of: h) ?? attachedTo
            if sr.detach(h, grant: grant) { return }
        }
        attachedTo.detach(h, grant: grant, force: true)
    }

    /// Attaches a connection to `vdi` in `sr` (where GO resolved it), or in the SR it
    /// moved to since: its token went along.
    public func attach(_ vdi: String, in sr: SR, familyHint: String?, grant: SR.ExportGrant?) throws -> (VDIHandle, SR) {
        do {
            return (try sr.attach(vdi, familyHint: familyHint, grant: grant), sr)
        } catch StorageError.vdiMissing where route(vdi) !== sr {
            let now = route(vdi)
            return (try now.attach(vdi, familyHint: nil, grant: grant), now)
        }
    }

    /// All the VDIs' records, SR by SR.
    public func allRecords() throws -> [VDIRecord] {
        try srs.flatMap { try $0.allRecords() }
    }
}
