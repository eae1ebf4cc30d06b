
/// Failures of SR operations, each with its XenAPI error code.
public enum StorageError: Error, Equatable, Sendable, CustomStringConvertible {
    /// `UUID_INVALID`
    case uuidInvalid(kind: String, value: String)
    /// `VDI_MISSING`
    case vdiMissing(uuid: String)
    /// `VDI_READONLY`
    case vdiReadonly(uuid: String)
    /// `VDI_IN_USE`
    case vdiInUse(uuid: String, operation: String)
    /// `VALUE_NOT_SUPPORTED`
    case valueNotSupported(field: String, value: String, reason: String)
    /// `VDI_INCOMPATIBLE_TYPE`
    case vdiIncompatibleType(uuid: String, type: String)
    /// `VDI_IO_ERROR`
    case vdiIOError(uuid: String, detail: String)
    /// `SR_BACKEND_FAILURE`: the SR itself (database, directory) failed.
    case srBackendFailure(detail: String)
    /// `HANDLE_INVALID`
    case handleInvalid(kind: String, value: String)
    /// `OPERATION_NOT_ALLOWED`
    case operationNotAllowed(reason: String)
    /// `VDI_NO_CBT_METADATA`
    case vdiNoCBTMetadata(uuid: String, reason: String)
    /// `VDI_ON_BOOT_MODE_INCOMPATIBLE_WITH_OPERATION`
    case vdiOnBootModeIncompatible(uuid: String)
    /// `SR_BACKEND_FAILURE_<n>`: a numbered storage-manager failure, as XenServer's SM
    /// reports them (109: the snapshot chain is too long).
    case srBackendFailureNumbered(number: Int, message: String)
    /// `TASK_CANCELLED`
    case taskCancelled(task: String)
    /// `VDI_TOO_SMALL`: the VDI must be at least `minimum` bytes.
    case vdiTooSmall(uuid: String, minimum: UInt64)
    /// `IMPORT_ERROR`: an import stream was refused (nothing of it was applied).
    case importError(reason: String)

    /// XenServer refuses a snapshot that would make a chain deeper than this.
    public static let maxChainDepth = 30
    public static func chainTooLong() -> StorageError {
        .srBackendFailureNumbered(number: 109, message: "The snapshot chain is too long")
    }

    /// The XenAPI error code.
    public var code: String {
        switch self {
        case .uuidInvalid: return "UUID_INVALID"
        case .vdiMissing: return "VDI_MISSING"
        case .vdiReadonly: return "VDI_READONLY"
        case .vdiInUse: return "VDI_IN_USE"
        case .valueNotSupported: return "VALUE_NOT_SUPPORTED"
        case .vdiIncompatibleType: return "VDI_INCOMPATIBLE_TYPE"
        case .vdiIOError: return "VDI_IO_ERROR"
        case .srBackendFailure: return "SR_BACKEND_FAILURE"
        case .handleInvalid: return "HANDLE_INVALID"
        case .operationNotAllowed: return "OPERATION_NOT_ALLOWED"
        case .vdiNoCBTMetadata: return "VDI_NO_CBT_METADATA"
        case .vdiOnBootModeIncompatible: return "VDI_ON_BOOT_MODE_INCOMPATIBLE_WITH_OPERATION"
        case .srBackendFailureNumbered(let n, _): return "SR_BACKEND_FAILURE_\(n)"
        case .taskCancelled: return "TASK_CANCELLED"
        case .vdiTooSmall: return "VDI_TOO_SMALL"
        case .importError: return "IMPORT_ERROR"
        }
    }

    /// The XenAPI error parameters.
    public var params: [String] {
        switch self {
        case .uuidInvalid(let k, let v): return [k, v]
        case .vdiMissing(let u): return [u]
        case .vdiReadonly(let u): return [u]
        case .vdiInUse(let u, let op): return [u, op]
        case .valueNotSupported(let f, let v, let r): return [f, v, r]
        case .vdiIncompatibleType(let u, let t): return [u, t]
        case .vdiIOError(let u, let d): return [u, d]
        case .srBackendFailure(let d): return [d]
        case .handleInvalid(let k, let v): return [k, v]
        case .operationNotAllowed(let r): return [r]
        case .vdiNoCBTMetadata(let u, let r): return [u, r]
        case .vdiOnBootModeIncompatible(let u): return [u]
        case .srBackendFailureNumbered(_, let m): return ["", m, ""]
        case .taskCancelled(let t): return [t]
        case .vdiTooSmall(let u, let m): return [u, String(m)]
        case .importError(let r): return [r]
        }
    }

    public var description: String { ([code] + params).joined(separator: ": ") }
}
