import Foundation
import NBD
import NIOCore
import Storage

/// Joins NBD and Storage: resolves export names through the tokens of the SR holding the
/// VDI, and remembers what it granted (and where) so entering transmission needs no
/// second lookup. One per connection.
final class SRExportResolver: ExportResolver {
    let pool: Pool
    var grants: [String: SR.ExportGrant] = [:]
    var srs: [String: SR] = [:]
    init(pool: Pool) { self.pool = pool }

    func describe(exportName: String) -> Result<ExportDescription, ExportLookupFailure> {
        let (sr, result) = pool.resolve(exportName: exportName)
        srs[exportName] = sr
        switch result {
        case .failure(let r):
            grants[exportName] = nil
            switch r {
            case .attachedElsewhere, .tooManyConnections: return .failure(ExportLookupFailure(r.description, policy: true))
            default: break
            }
            return .failure(ExportLookupFailure(r.description))
        case .success(let g):
            grants[exportName] = g
            // Every connection to a VDI shares one open chain, so a FLUSH on any of them
            // covers writes completed on all: multi-conn is safe.
            // CBT: the changes since each earlier snapshot, as qemu names dirty bitmaps.
            let dirty = sr.cbtAncestors(g.vdi).map { dirtyBitmapPrefix + $0 }
            return .success(ExportDescription(name: exportName, size: g.vdi.virtualSize,
                                              readOnly: g.readOnly || (g.vdi.isASnapshot && g.mode != .scratch), canMultiConn: true,
                                              metaContexts: [baseAllocationContext] + dirty))
        }
    }
}

/// The meta context namespace qemu uses for dirty bitmaps.
let dirtyBitmapPrefix = "qemu:dirty-bitmap:"

/// The narrowing of a disk failure to an NBD error value (one place only). Storage has
/// already mapped the image's errors into `DiskError`, errno and cause kept.
func nbdError(for error: Error) -> ErrorValue {
    guard let d = error as? DiskError else { return .eio }
    switch d.kind {
    case .readOnly, .notPermitted: return .eperm
    case .outOfRange: return .einval
    case .zeroingNotFast: return .enotsup
    case .noSpace: return .enospc
    case .noMemory: return .enomem
    case .wouldBlock, .io: return .eio
    }
}
