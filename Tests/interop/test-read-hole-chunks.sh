#!/usr/bin/env bash
# A structured READ that spans data and space no layer holds comes back as a data chunk
# then a hole chunk (libnbd's chunk callback sees both); with DF it is one data chunk.
. "$(dirname "$0")/functions.sh"
requires nbdsh
start_vdinbd
u=$(vdictl vdi-create name-label=t virtual-size=8MiB)
nbdsh -u "$(uri "$u")" -c '
h.pwrite(b"\xab" * 4096, (2 << 20) - 4096)
chunks = []
def chunk(buf, offset, status, err):
    chunks.append((status, offset, len(buf), bytes(buf[:1])))
    return 0
data = h.pread_structured(8192, (2 << 20) - 4096, chunk)
assert data == b"\xab" * 4096 + bytes(4096), "bytes"
want = [(nbd.READ_DATA, (2 << 20) - 4096, 4096, b"\xab"), (nbd.READ_HOLE, 2 << 20, 4096, b"\0")]
assert chunks == want, chunks
chunks.clear()
h.pread_structured(8192, (2 << 20) - 4096, chunk, nbd.CMD_FLAG_DF)
assert [c[0] for c in chunks] == [nbd.READ_DATA] and chunks[0][2] == 8192, chunks
chunks.clear()
h.pread_structured(4096, 5 << 20, chunk)
assert [c[0] for c in chunks] == [nbd.READ_HOLE], chunks
' || fail "read chunks"

# Reads of 128 KiB and more are sent from the files' page cache, in pieces: the same
# chunks, across a snapshot (data in two files), with DF, and as simple replies.
snap=$(vdictl vdi-snapshot "uuid=$u")
[ -n "$snap" ] || fail "snapshot"
U=$(uri "$u")
$PY - "$U" <<'PY' || fail "large read chunks"
import nbd, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1]); h.set_strict_mode(0)
M = 1 << 20
# The old leaf (now the base) holds 2M-4K..2M; the new leaf gets 3M..3M+64K+1.
h.pwrite(b"\xcd" * (64 * 1024 + 1), 3 * M)
model = bytearray(8 * M)
model[2 * M - 4096:2 * M] = b"\xab" * 4096
model[3 * M:3 * M + 64 * 1024 + 1] = b"\xcd" * (64 * 1024 + 1)
chunks = []
def chunk(buf, offset, status, err):
    chunks.append((status, offset, len(buf)))
    return 0
for off, ln in ((2 * M - 8192, 512 * 1024), (2 * M + 1024 * 768, 768 * 1024), (0, 8 * M), (3 * M - 1, 200 * 1024)):
    chunks.clear()
    assert h.pread_structured(ln, off, chunk) == model[off:off + ln], ("bytes", off, ln)
    # The chunks cover the range once, data where bytes were written, holes elsewhere.
    pos = off
    for status, o, n in sorted(chunks, key=lambda c: c[1]):
        assert o == pos, (off, ln, chunks)
        if status == nbd.READ_HOLE:
            assert model[o:o + n] == bytes(n), ("hole over data", o, n)
        pos += n
    assert pos == off + ln, (off, ln, chunks)
    chunks.clear()
    assert h.pread_structured(ln, off, chunk, nbd.CMD_FLAG_DF) == model[off:off + ln], ("DF bytes", off, ln)
    assert [c[0] for c in chunks] == [nbd.READ_DATA] and chunks[0][2] == ln, chunks
h.shutdown()
# Simple replies only.
s = nbd.NBD(); s.set_request_structured_replies(False); s.connect_uri(sys.argv[1])
assert not s.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
for off, ln in ((2 * M - 8192, 512 * 1024), (0, 8 * M)):
    assert s.pread(ln, off) == model[off:off + ln], ("simple", off, ln)
s.shutdown()
PY
