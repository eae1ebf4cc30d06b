// The body of an HTTP export: the stream's bytes read on NIO's blocking pool one chunk
// ahead of the socket (the disk read of chunk k+1 runs while chunk k is sent), into a
// ring of buffers used over and over.
//
// A buffer handed to the channel stays NIO's until its bytes are sent, and a write
// returns well before that (counted with 1 MiB chunks on loopback: a buffer was still
// held six writes later one time in twenty, eleven later never). So before a slot is
// read into again, the pump waits until NIO has let go of its buffer: an export holds
// four chunks, however slow its client (four 4 GiB exports at once: 20 MiB of anonymous
// memory at the peak, at full speed). A fresh buffer per chunk cost page faults and
// zeroing, a quarter of an export's CPU, and as NIO freed them on its own threads they
// stayed in malloc's arenas (180 MiB at the peak of four exports).

import Hummingbird
import NIOCore
import NIOPosix
import Storage

struct ExportPump {
    /// One buffer of the ring, shared with the blocking pool by reference so that a
    /// read mutates the buffer in place (a copy of the value would make it non-unique).
    final class Slot: @unchecked Sendable {
        // Unchecked: a slot is touched by one side at a time (the pool's read, then the
        // loop that awaited it).
        var buffer: ByteBuffer
        init(capacity: Int) { buffer = ByteBufferAllocator().buffer(capacity: capacity) }
    }

    let stream: ExportStream
    let span: Range<UInt64>
    let chunk: Int
    let ring: [Slot]
    static let ringSize = 4

    init(stream: ExportStream, span: Range<UInt64>, chunk: Int) {
        self.stream = stream
        self.span = span
        self.chunk = chunk
        let chunks = Int((UInt64(span.count) + UInt64(chunk) - 1) / UInt64(chunk))
        ring = (0..<min(Self.ringSize, max(1, chunks))).map { _ in Slot(capacity: chunk) }
    }

    /// Reads `[at, at+n)` of the stream into `slot`, on the blocking pool.
    func read(at: UInt64, count n: Int, into slot: Slot) async throws {
        let stream = self.stream
        try await NIOThreadPool.singleton.runIfActive {
            slot.buffer.clear()
            var holes: [Range<Int>] = []
            let got = try slot.buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: n) { raw in
                try stream.read(at: at, into: UnsafeMutableRawBufferPointer(rebasing: raw[0..<n]), holes: &holes)
            }
            guard got == n else { throw StorageError.vdiIOError(uuid: stream.uuid, detail: "export ended early") }
        }
    }

    /// Waits until NIO has sent the slot's last chunk (its buffer is ours alone again):
    /// what bounds an export's memory to the ring when the client reads slowly.
    func released(_ slot: Slot) async throws {
        var pause: UInt64 = 100_000
        while slot.buffer.modifyIfUniquelyOwned({ _ in () }) == nil {
            try await Task.sleep(nanoseconds: pause)
            pause = min(pause * 2, 5_000_000)
        }
    }

    /// Sends the span through `writer`; `progress` gets the bytes sent so far (where it
    /// stopped, if it throws). No read is left running when it returns or throws.
    func run(_ writer: inout any ResponseBodyWriter, checkCancelled: () throws -> Void,
             progress: (UInt64) -> Void) async throws {
        var pos = span.lowerBound
        let end = span.upperBound
        var index = 0
        func start(_ at: UInt64) -> (Task<Void, Error>, Slot)? {
            guard at < end else { return nil }
            let n = Int(min(UInt64(chunk), end - at))
            let slot = ring[index % ring.count]
            index += 1
            return (Task {
                try await released(slot)
                try await read(at: at, count: n, into: slot)
            }, slot)
        }
        var next = start(pos)
        do {
            while let (reading, slot) = next {
                try checkCancelled()
                try await reading.value
                let after = pos + UInt64(slot.buffer.readableBytes)
                let buffer = slot.buffer
                next = start(after)
                try await writer.write(buffer)
                pos = after
                progress(pos - span.lowerBound)
            }
        } catch {
            // The stream closes after this returns: let the read ahead finish first.
            _ = try? await next?.0.value
            throw error
        }
    }
}

/// The body of an HTTP import, handed to the session a chunk at a time on the blocking
/// pool. Two gather buffers: while one chunk is written to the disk, the next is received
/// (the socket and the disk each keep a core busy).
final class ImportPump: @unchecked Sendable {
    // Unchecked: each gather buffer is touched by one side at a time, the receiver
    // until it hands the buffer to a feed and again only after awaiting that feed.
    final class Gather: @unchecked Sendable {
        let memory: UnsafeMutableRawBufferPointer
        var count = 0
        init(size: Int) { memory = .allocate(byteCount: size, alignment: 4096) }
        deinit { memory.deallocate() }
        var bytes: UnsafeRawBufferPointer { UnsafeRawBufferPointer(rebasing: memory[0..<count]) }
    }

    let session: ImportSession
    let chunk: Int

    init(session: ImportSession, chunk: Int) {
        self.session = session
        self.chunk = chunk
    }

    /// Feeds the whole body, then finishes the session (validation and commit).
    func run(_ body: inout RequestBody.AsyncIterator) async throws {
        var filling = Gather(size: chunk), spare = Gather(size: chunk)
        var feeding: Task<Void, Error>?
        let session = self.session
        func feed(_ g: Gather) -> Task<Void, Error> {
            Task { try await NIOThreadPool.singleton.runIfActive { try session.feed(g.bytes) } }
        }
        do {
            while var buffer = try await body.next() {
                while buffer.readableBytes > 0 {
                    let n = min(buffer.readableBytes, chunk - filling.count)
                    buffer.withUnsafeReadableBytes { src in
                        (filling.memory.baseAddress! + filling.count).copyMemory(from: src.baseAddress!, byteCount: n)
                    }
                    buffer.moveReaderIndex(forwardBy: n)
                    filling.count += n
                    guard filling.count == chunk else { continue }
                    try await feeding?.value
                    feeding = feed(filling)
                    swap(&filling, &spare)
                    filling.count = 0
                }
            }
            try await feeding?.value
            feeding = nil
            let last = filling
            try await NIOThreadPool.singleton.runIfActive {
                if last.count > 0 { try session.feed(last.bytes) }
                try session.finish()
            }
        } catch {
            // No feed may still run when the caller aborts the session.
            _ = try? await feeding?.value
            throw error
        }
    }
}
