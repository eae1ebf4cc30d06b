// The image file itself: positioned reads and writes that finish or throw, a data sync,
// hole punching, and read-only shared mappings for zero-copy reads.

import Image
import Locking
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

final class HostFile: Sendable {
    let path: String
    let fd: Int32
    private let closed = Atomic<Bool>(false)

    init(path: String, writable: Bool, create: Bool = false) throws(QCOW2Error) {
        self.path = path
        let flags = (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC | (create ? O_CREAT | O_EXCL : 0)
        let fd = Glibc.open(path, flags, 0o640)
        guard fd >= 0 else { throw .io(path: path, errno: Errno(rawValue: Glibc.errno)) }
        self.fd = fd
    }

    deinit { close() }

    func close() {
        if closed.exchange(true, ordering: .acquiringAndReleasing) { return }
        _ = Glibc.close(fd)
    }

    func fail(_ e: Int32 = Glibc.errno) -> QCOW2Error { .io(path: path, errno: Errno(rawValue: e)) }

    var length: UInt64 {
        get throws(QCOW2Error) {
            var st = stat()
            guard fstat(fd, &st) == 0 else { throw fail() }
            return UInt64(st.st_size)
        }
    }

    /// The file's device and inode.
    var identity: QCOW2File.FileKey {
        get throws(QCOW2Error) {
            var st = stat()
            guard fstat(fd, &st) == 0 else { throw fail() }
            return QCOW2File.FileKey(dev: UInt64(st.st_dev), ino: UInt64(st.st_ino))
        }
    }

    /// Reads `b.count` bytes at `offset`; past the end of the file reads zeros. With
    /// `cachedOnly`, fails with `.wouldBlock` rather than wait for the disk (RWF_NOWAIT).
    func read(into b: UnsafeMutableRawBufferPointer, at offset: UInt64, cachedOnly: Bool = false) throws(QCOW2Error) {
        guard offset <= UInt64(Int.max) - UInt64(b.count) else { throw fail(EINVAL) }
        var done = 0
        while done < b.count {
            var iov = iovec(iov_base: b.baseAddress! + done, iov_len: b.count - done)
            let n = qcow2_preadv2(fd, &iov, 1, Int(offset) + done, cachedOnly ? 0x08 : 0)
            if n < 0 {
                if Glibc.errno == EINTR { continue }
                if cachedOnly && (Glibc.errno == EAGAIN || Glibc.errno == EOPNOTSUPP) { throw .wouldBlock }
                throw fail()
            }
            if n == 0 {
                UnsafeMutableRawBufferPointer(rebasing: b[done...]).initializeMemory(as: UInt8.self, repeating: 0)
                return
            }
            if cachedOnly && n < b.count - done { throw .wouldBlock }
            done += n
        }
    }

    func read(count: Int, at offset: UInt64) throws(QCOW2Error) -> [UInt8] {
        let b = UnsafeMutableRawBufferPointer.allocate(byteCount: count, alignment: 16)
        defer { b.deallocate() }
        try read(into: b, at: offset)
        return [UInt8](b)
    }

    func write(_ b: UnsafeRawBufferPointer, at offset: UInt64) throws(QCOW2Error) {
        guard offset <= UInt64(Int.max) - UInt64(b.count) else { throw fail(EINVAL) }
        var done = 0
        while done < b.count {
            let n = Glibc.pwrite(fd, b.baseAddress! + done, b.count - done, off_t(offset) + off_t(done))
            if n < 0 && Glibc.errno == EINTR { continue }
            guard n > 0 else { throw fail(n < 0 ? Glibc.errno : EIO) }
            done += n
        }
    }

    func write(_ bytes: [UInt8], at offset: UInt64) throws(QCOW2Error) {
        var failure: QCOW2Error?
        bytes.withUnsafeBytes { b in
            do throws(QCOW2Error) { try write(b, at: offset) } catch { failure = error }
        }
        if let failure { throw failure }
    }

    /// Writes the buffers one after another from `offset` (pwritev, at most 1024 at a time).
    func write(gather: [UnsafeRawBufferPointer], at offset: UInt64) throws(QCOW2Error) {
        var iov = gather.map { iovec(iov_base: UnsafeMutableRawPointer(mutating: $0.baseAddress), iov_len: $0.count) }
        var pos = offset
        var i = 0
        while i < iov.count {
            let k = min(1024, iov.count - i)
            let n = iov.withUnsafeMutableBufferPointer { qcow2_pwritev(fd, $0.baseAddress! + i, Int32(k), Int(pos)) }
            if n < 0 && Glibc.errno == EINTR { continue }
            guard n > 0 else { throw fail(n < 0 ? Glibc.errno : EIO) }
            pos += UInt64(n)
            // Step past what was written (a short write leaves part of one buffer).
            var left = n
            while left > 0 && i < iov.count {
                if left >= iov[i].iov_len { left -= iov[i].iov_len; i += 1 } else {
                    iov[i].iov_base += left
                    iov[i].iov_len -= left
                    left = 0
                }
            }
        }
    }

    /// Writes each piece at its offset; pieces that follow one another in the file (in
    /// the order given) go out as one pwritev.
    func write(pieces: [(host: UInt64, bytes: UnsafeRawBufferPointer)]) throws(QCOW2Error) {
        var i = 0
        while i < pieces.count {
            var j = i + 1
            var next = pieces[i].host + UInt64(pieces[i].bytes.count)
            while j < pieces.count, pieces[j].host == next {
                next += UInt64(pieces[j].bytes.count)
                j += 1
            }
            if j == i + 1 { try write(pieces[i].bytes, at: pieces[i].host) } else {
                try write(gather: pieces[i..<j].map(\.bytes), at: pieces[i].host)
            }
            i = j
        }
    }

    func sync() throws(QCOW2Error) {
        guard fdatasync(fd) == 0 else { throw fail() }
    }

    /// Returns the space of `[offset, offset+length)` to the file system (reads as zeros).
    func punch(_ offset: UInt64, _ length: UInt64) {
        _ = qcow2_fallocate(fd, 0x02 | 0x01, Int(offset), Int(length))
    }

    // MARK: mappings

    /// Read-only shared mappings (qcow2 files only grow: freed clusters are punched).
    private let mappings = FileMappings()

    func mapped(offset: UInt64, count: Int) -> UnsafeRawBufferPointer? {
        mappings.map(fd: fd, offset: offset, count: count)
    }
}

@_silgen_name("preadv2")
private func qcow2_preadv2(_ fd: Int32, _ iov: UnsafePointer<iovec>, _ count: Int32, _ offset: Int, _ flags: Int32) -> Int
@_silgen_name("pwritev")
private func qcow2_pwritev(_ fd: Int32, _ iov: UnsafePointer<iovec>, _ count: Int32, _ offset: Int) -> Int
@_silgen_name("fallocate")
private func qcow2_fallocate(_ fd: Int32, _ mode: Int32, _ offset: Int, _ length: Int) -> Int32
