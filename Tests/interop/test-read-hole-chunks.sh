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
