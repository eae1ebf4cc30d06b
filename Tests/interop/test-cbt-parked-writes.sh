#!/usr/bin/env bash
# CBT on, fresh log after a snapshot: writes to 64 KiB blocks whose bits are not yet
# durable are acknowledged before the log syncs and written after it. Through python nbd:
# every read issued after a write's reply sees it, an overlapping write issued after a
# reply lands after it, FLUSH puts everything on disk (it survives a restart), and
# list_changed_blocks covers every block written.
. "$(dirname "$0")/functions.sh"
requires nbdsh nbdcopy
start_vdinbd
u=$(vdictl vdi-create name-label=t virtual-size=16MiB)
vdictl vdi-enable-cbt "uuid=$u"
U=$(uri "$u")
# Data everywhere first, so after the snapshot the leaf's blocks get copied up and later
# writes land in space the leaf holds.
head -c 16M /dev/urandom > "$TMP/model.raw"
nbdcopy "$TMP/model.raw" "$U"
s1=$(vdictl vdi-snapshot "uuid=$u")
$PY - "$U" "$TMP/model.raw" "$TMP/touched" <<'PY'
import nbd, os, random, sys
uri, model_path, touched_path = sys.argv[1:]
model = bytearray(open(model_path, "rb").read())
size = len(model)
rng = random.Random(7)
h = nbd.NBD()
h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_ALIGN)   # unaligned writes are the point
h.connect_uri(uri)
touched = set()
def note(off, n):
    touched.update(range(off >> 16, (off + n - 1 >> 16) + 1))
# One 512-byte write per 2 MiB block first: the leaf copies the block up.
for b in range(size >> 21):
    d = os.urandom(512); h.pwrite(d, b << 21); model[b << 21:(b << 21) + 512] = d; note(b << 21, 512)
for i in range(600):
    n = rng.choice([512, 4096, 4096, 65536, 70000, 1000])
    off = rng.randrange(0, size - n)
    d = os.urandom(n)
    h.pwrite(d, off)
    model[off:off + n] = d
    note(off, n)
    # Read issued after the reply: must see the write, and its neighbourhood unchanged.
    lo, hi = max(0, off - 3000), min(size, off + n + 3000)
    assert h.pread(hi - lo, lo) == bytes(model[lo:hi]), "read after write %d" % i
    if i % 5 == 0:
        # An overlapping write issued after the first one's reply, and a read pipelined
        # behind it (issued after the second reply): the second write wins.
        d2 = os.urandom(n // 2 + 1)
        o2 = off + n // 4
        if o2 + len(d2) > size: o2 = size - len(d2)
        h.pwrite(d2, o2); model[o2:o2 + len(d2)] = d2; note(o2, len(d2))
        c = h.aio_pread(nbd.Buffer(hi - lo), lo)
        while not h.aio_command_completed(c): h.poll(-1)
    if i % 97 == 0:
        h.flush()
h.flush()
assert h.pread(size, 0) == bytes(model), "whole disk after flush"
open(model_path, "wb").write(model)
open(touched_path, "w").write(" ".join(map(str, sorted(touched))))
PY
# A restart: what was flushed is on disk.
kill "$SERVER_PID"; wait "$SERVER_PID" || fail "server exit status"
has "writes were acknowledged before their change-log sync" < "$TMP/server.log" || fail "no write took the parked path"
start_vdinbd
nbdcopy "$(uri "$u")" "$TMP/after.raw"
cmp "$TMP/model.raw" "$TMP/after.raw" || fail "data differs after a restart"
s2=$(vdictl vdi-snapshot "uuid=$u")
vdictl vdi-list-changed-blocks "vdi-from=$s1" "vdi-to=$s2" > "$TMP/bitmap"
$PY - "$TMP/bitmap" "$TMP/touched" <<'PY'
import base64, sys
bits = base64.b64decode(open(sys.argv[1]).read().strip())
marked = {i * 8 + k for i, b in enumerate(bits) for k in range(8) if b & (0x80 >> k)}
touched = set(map(int, open(sys.argv[2]).read().split()))
assert marked == touched, ("missed", sorted(touched - marked)[:10], "extra", sorted(marked - touched)[:10])
PY
