import Foundation
import NBD
import NIOCore
import Storage
import VHD

/// Joins NBD and Storage: resolves export names through the SR's tokens, and remembers
/// what it granted so entering transmission needs no second lookup. One per connection.
final class SRExportResolver: ExportResolver {
    let sr: SR
    var grants: [String: SR.ExportGrant] = [:]
    init(sr: SR) { self.sr = sr }

    func describe(exportName: String) -> Result<ExportDescription, ExportLookupFailure> {
        switch sr.resolve(exportName: exportName) {
        case .failure(let r):
            grants[exportName] = nil
            return .failure(ExportLookupFailure(r.description))
        case .success(let g):
            grants[exportName] = g
            // Every connection to a VDI shares one open chain, so a FLUSH on any of them
            // covers writes completed on all: multi-conn is safe.
            // CBT: the changes since each earlier snapshot, as qemu names dirty bitmaps.
            let dirty = sr.cbtAncestors(g.vdi.uuid).map { dirtyBitmapPrefix + $0 }
            return .success(ExportDescription(name: exportName, size: g.vdi.virtualSize,
                                              readOnly: g.readOnly || g.vdi.isASnapshot, canMultiConn: true,
                                              metaContexts: [baseAllocationContext] + dirty))
        }
    }
}

/// The meta context namespace qemu uses for dirty bitmaps.
let dirtyBitmapPrefix = "qemu:dirty-bitmap:"

/// The errno-style narrowing of a backend failure to an NBD error value (one place only).
func nbdError(for error: Error) -> ErrorValue {
    switch error {
    case let v as VHDError:
        switch v {
        case .readOnly: return .eperm
        case .outOfRange: return .einval
        case .zeroingNotFast: return .enotsup
        case .io(_, let e):
            switch e {
            case .readOnlyFileSystem, .notPermitted: return .eperm
            case .noSpace, .fileTooLarge: return .enospc
            case .noMemory: return .enomem
            default: return .eio
            }
        default: return .eio
        }
    default:
        return .eio
    }
}
