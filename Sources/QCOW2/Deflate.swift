// Compressed clusters: raw deflate (no zlib header), as qemu writes them.

import CZlib

enum Deflate {
    /// Inflates `input` into exactly `count` bytes; nil if the data is not valid deflate
    /// or yields fewer bytes. (Trailing input past the cluster is ignored: a compressed
    /// cluster's last sector is padding.)
    static func inflate(_ input: [UInt8], into count: Int) -> [UInt8]? {
        var out = [UInt8](repeating: 0, count: count)
        var z = z_stream()
        guard inflateInit2_(&z, -12, ZLIB_VERSION, Int32(MemoryLayout<z_stream>.size)) == Z_OK else { return nil }
        defer { inflateEnd(&z) }
        var input = input
        let ok: Bool = input.withUnsafeMutableBufferPointer { inp in
            out.withUnsafeMutableBufferPointer { o in
                z.next_in = inp.baseAddress
                z.avail_in = UInt32(inp.count)
                z.next_out = o.baseAddress
                z.avail_out = UInt32(o.count)
                let r = CZlib.inflate(&z, Z_FINISH)
                return (r == Z_STREAM_END || r == Z_OK || r == Z_BUF_ERROR) && z.avail_out == 0
            }
        }
        return ok ? out : nil
    }
}
