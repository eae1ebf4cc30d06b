// Raw files as an `ImageFormat`: `<uuid>.raw`, a sparse file of the disk's size.

import Image
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

public struct RawFormat: ImageFormat {
    public init() {}
    public var name: String { "raw" }
    public var fileExtension: String { "raw" }
    /// XCP-ng's largest VDI (seed 004); the file system's own limit may be lower.
    public var maxVirtualSize: UInt64 { 16 << 40 }
    public var holdsChains: Bool { false }

    public func create(path: String, size: UInt64) throws {
        let fd = Glibc.open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o640)
        guard fd >= 0 else { throw RawError.io(path: path, errno: Errno(rawValue: errno)) }
        defer { _ = Glibc.close(fd) }
        guard ftruncate(fd, off_t(size)) == 0, fsync(fd) == 0 else {
            let e = Errno(rawValue: errno)
            unlink(path)
            throw RawError.io(path: path, errno: e)
        }
    }

    public func createChild(path: String, parent: String, size: UInt64?) throws {
        throw RawError.noChains(path: parent, operation: "have a child (snapshot or clone)")
    }

    public func open(path: String, writable: Bool) throws -> any DiskImage {
        try RawImage(path: path, writable: writable)
    }

    public func openLayer(path: String) throws -> any DiskImage {
        try RawImage(path: path, writable: false)
    }

    public func parentPath(ofFile path: String) -> String? { nil }

    public func setParent(ofFile path: String, to parent: String) throws {
        throw RawError.noChains(path: path, operation: "be given a parent")
    }

    public func virtualSize(ofFile path: String) throws -> UInt64 {
        var st = Glibc.stat()
        guard lstat(path, &st) == 0 else { throw RawError.io(path: path, errno: Errno(rawValue: errno)) }
        return UInt64(st.st_size)
    }

    public func grow(path: String, to size: UInt64) throws {
        guard try virtualSize(ofFile: path) <= size else { return }
        guard Glibc.truncate(path, off_t(size)) == 0 else { throw RawError.io(path: path, errno: Errno(rawValue: errno)) }
    }

    /// A raw file has no structure to damage; only its length can be wrong.
    public func check(path: String) -> String? {
        do {
            let n = try virtualSize(ofFile: path)
            return n % 512 == 0 ? nil : "\(path): its length (\(n) bytes) is not a whole number of 512-byte sectors"
        } catch {
            return "\(error)"
        }
    }
}
