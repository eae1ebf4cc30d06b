import CBT
import SystemPackage
import Image

/// A failed read, write, zeroing or flush of a VDI, as the layers above the image see it:
/// what kind of failure (the NBD and XenAPI mappings switch on that), the errno where the
/// system gave one, and the image format's own error as the cause. Image errors are
/// mapped into this once, where they leave `VDIHandle`.
public struct DiskError: Error, CustomStringConvertible, Sendable {
    public enum Kind: Sendable, Equatable {
        /// The disk is read-only.
        case readOnly
        /// The range is outside the disk.
        case outOfRange
        /// Zeroing would mean writing zeros, and the caller asked to fail fast instead.
        case zeroingNotFast
        /// A cached-only read would have had to wait for the disk.
        case wouldBlock
        /// No space left (ENOSPC, EDQUOT, EFBIG).
        case noSpace
        case noMemory
        /// The file system refused (EROFS, EPERM, EACCES).
        case notPermitted
        /// Any other I/O failure, a corrupt image, or a change log that could not be made
        /// durable.
        case io
    }

    public let kind: Kind
    /// The system's error number, where the failure came from a system call.
    public let errno: Errno?
    /// The image's (or change log's) own error.
    public let cause: any Error

    public init(_ error: any Error) {
        if let d = error as? DiskError {
            self = d
            return
        }
        switch error {
        case let v as any ImageFailure:
            cause = v
            switch v.failureKind {
            case .readOnly: (kind, errno) = (.readOnly, nil)
            case .outOfRange: (kind, errno) = (.outOfRange, nil)
            case .zeroingNotFast: (kind, errno) = (.zeroingNotFast, nil)
            case .wouldBlock: (kind, errno) = (.wouldBlock, nil)
            case .io: (kind, errno) = (v.errno.map(Self.kind(of:)) ?? .io, v.errno)
            case .notPublished, .corrupt, .chain: (kind, errno) = (.io, v.errno)
            }
        case let c as CBTError:
            (kind, errno, cause) = (.io, nil, c)
        case let e as Errno:
            (kind, errno, cause) = (Self.kind(of: e), e, e)
        default:
            (kind, errno, cause) = (.io, nil, error)
        }
    }

    static func kind(of e: Errno) -> Kind {
        switch e {
        case .noSpace, .fileTooLarge, .diskQuotaExceeded: return .noSpace
        case .noMemory: return .noMemory
        case .readOnlyFileSystem, .notPermitted, .permissionDenied: return .notPermitted
        default: return .io
        }
    }

    init(kind: Kind, errno: Errno?, cause: any Error) {
        (self.kind, self.errno, self.cause) = (kind, errno, cause)
    }

    /// A cached-only read that found the chain being changed (no image was asked).
    static let wouldBlock = DiskError(kind: .wouldBlock, errno: nil, cause: Busy())
    struct Busy: Error, CustomStringConvertible { var description: String { "the VDI's chain is being changed" } }

    public var description: String { "\(cause)" }
}
