#!/usr/bin/env bash
# NBD_OPT_EXTENDED_HEADERS. No client on these machines speaks the extension yet (libnbd
# 1.14, qemu 7.2), so a small client written here from the protocol document drives it:
# 32-byte requests and replies, PAYLOAD_LEN writes, 64-bit effect lengths, BLOCK_STATUS_EXT,
# the reply's offset field; then libnbd (compact headers) reads back what it wrote.
. "$(dirname "$0")/functions.sh"
requires nbdsh
start_vdinbd
u=$(vdictl vdi-create name-label=t virtual-size=6GiB)
name=$(export_name "$u")
$PY - "$PORT" "$name" <<'PY' || fail "extended headers client"
import socket, struct, sys
port, name = int(sys.argv[1]), sys.argv[2].encode()
s = socket.create_connection(("127.0.0.1", port))
def recv(n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        assert c, "server closed the connection"
        b += c
    return b
magic, ihave, hflags = struct.unpack(">QQH", recv(18))
assert magic == 0x4E42444D41474943 and ihave == 0x49484156454F5054
s.sendall(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES
def option(opt, data=b""):
    s.sendall(struct.pack(">QII", 0x49484156454F5054, opt, len(data)) + data)
def opt_reply():
    m, opt, typ, n = struct.unpack(">QIII", recv(20))
    assert m == 0x3E889045565A9
    return opt, typ, recv(n)
EXT, SR, SET_META, GO = 11, 8, 10, 7
ACK, META, INFO, ERR_EXT_HEADER_REQD, ERR_INVALID = 1, 4, 3, 0x8000000A, 0x80000003
option(EXT, b"x"); assert opt_reply()[1] == ERR_INVALID, "data with EXTENDED_HEADERS"
option(EXT); assert opt_reply()[:2] == (EXT, ACK)
option(SR); assert opt_reply()[1] == ERR_EXT_HEADER_REQD
q = b"base:allocation"
option(SET_META, struct.pack(">I", len(name)) + name + struct.pack(">II", 1, len(q)) + q)
opt, typ, data = opt_reply(); assert typ == META, typ
ctx = struct.unpack(">I", data[:4])[0]
assert opt_reply()[1] == ACK
option(GO, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
while True:
    opt, typ, data = opt_reply()
    if typ == ACK: break
    assert typ == INFO, hex(typ)
    if struct.unpack(">H", data[:2])[0] == 0:
        size, tflags = struct.unpack(">QH", data[2:12])
assert size == 6 << 30
# Transmission: extended requests and replies.
READ, WRITE, FLUSH, TRIM, ZEROES, BSTATUS = 0, 1, 3, 4, 6, 7
FUA, DF, PAYLOAD_LEN = 1, 4, 32
cookie = 0
def request(cmd, offset, length, flags=0, payload=b""):
    global cookie
    cookie += 1
    s.sendall(struct.pack(">IHHQQQ", 0x21E41C71, flags, cmd, cookie, offset, length) + payload)
    return cookie
def chunks(c, offset):
    out = []
    while True:
        m, flags, typ, ck, off, n = struct.unpack(">IHHQQQ", recv(32))
        assert m == 0x6E8A278C, hex(m)
        assert ck == c and off == offset, (ck, c, off, offset)
        out.append((typ, recv(n)))
        if flags & 1: return out
def ok(c, offset):
    r = chunks(c, offset)
    assert r == [(0, b"")], r  # NBD_REPLY_TYPE_NONE, done
data = bytes(range(256)) * 16
c = request(WRITE, 4096, len(data), FUA | PAYLOAD_LEN, data); ok(c, 4096)
# A WRITE without PAYLOAD_LEN has no payload and is refused.
c = request(WRITE, 0, 4096); r = chunks(c, 0)
assert r[0][0] == 0x8001 and struct.unpack(">I", r[0][1][:4])[0] == 22, r
# A 4 GiB + 4 KiB zeroing (64-bit effect length) then data on each side of it.
c = request(WRITE, (5 << 30) - 512, 512, PAYLOAD_LEN, b"\xee" * 512); ok(c, (5 << 30) - 512)
c = request(ZEROES, 1 << 20, (4 << 30) + 4096); ok(c, 1 << 20)
c = request(READ, 4096, 4096, DF)
r = chunks(c, 4096); assert r[0][0] == 1 and r[0][1] == struct.pack(">Q", 4096) + data, "read back"
# A read across data and a hole: a data chunk and a hole chunk, each with its own offset.
c = request(READ, (5 << 30) - 512, 1024)
r = chunks(c, (5 << 30) - 512)
assert r[0] == (1, struct.pack(">Q", (5 << 30) - 512) + b"\xee" * 512), r[0][:1]
assert r[1] == (2, struct.pack(">QI", 5 << 30, 512)), r[1]
# BLOCK_STATUS_EXT: context id, descriptor count, 64-bit extents covering the request.
c = request(BSTATUS, 0, 6 << 30); r = chunks(c, 0)
assert len(r) == 1 and r[0][0] == 6, r[0][0]
cid, count = struct.unpack(">II", r[0][1][:8])
assert cid == ctx and count == (len(r[0][1]) - 8) // 16 and count >= 1
ext = [struct.unpack(">QQ", r[0][1][8 + 16 * i: 24 + 16 * i]) for i in range(count)]
assert ext[0][1] == 0 and ext[0][0] >= 8192, ext[:2]  # data at the start
assert sum(e[0] for e in ext) > 0
c = request(TRIM, 4096, 4096); ok(c, 4096)
c = request(FLUSH, 0, 0); ok(c, 0)
# Errors are ERROR chunks with the request's offset; a READ past the end is EINVAL.
c = request(READ, 6 << 30, 512); r = chunks(c, 6 << 30)
assert r[0][0] == 0x8001 and struct.unpack(">I", r[0][1][:4])[0] == 22, r
# After DISC the server closes.
s.sendall(struct.pack(">IHHQQQ", 0x21E41C71, 0, 2, 99, 0, 0))
assert s.recv(1) == b""
PY
# A real client with compact headers sees what the extended client wrote.
nbdsh -u "$(uri "$u")" -c '
import errno
assert h.pread(4096, 4096) == bytes(4096), "trimmed range"
assert h.pread(512, (5 << 30) - 512) == b"\xee" * 512, "data written after the zeroing"
assert h.pread(4096, 3 << 30) == bytes(4096)
' || fail "libnbd reads what the extended client wrote"
grep -q "extended headers" "$TMP/server.log" || fail "server log does not name extended headers"
