#!/usr/bin/env bash
# python nbd does a random mix of reads, writes, trims and zeroes over a chain three
# snapshots deep, on two connections, checked against an in-memory model of the disk.
. "$(dirname "$0")/functions.sh"
requires nbdsh
start_vdinbd
u=$(vdictl vdi-create name-label=t virtual-size=24MiB)
export PYTHONHASHSEED=0
run_round() {
# Both connections use one token: one attachment (the VDI is not sharable).
local U; U=$(uri "$u")
$PY - "$U" "$U" "$1" "$TMP/model.bin" <<'PY'
import nbd, os, random, sys
uri1, uri2, seed, path = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
size = 24 << 20
model = bytearray(open(path, "rb").read()) if os.path.exists(path) else bytearray(size)
hs = []
for u in (uri1, uri2):
    h = nbd.NBD()
    # The server serves unaligned requests (read-modify-write of edge sectors); let libnbd send them.
    h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_ALIGN)
    h.connect_uri(u); hs.append(h)
rng = random.Random(seed)
for step in range(400):
    h = rng.choice(hs)
    off = rng.randrange(0, size - 1)
    ln = min(rng.choice([1, 511, 512, 4096, 65536, 65537, 3 << 20]), size - off)
    op = rng.choice(["read", "read", "write", "write", "trim", "zero", "zero-nohole", "flush"])
    if op == "read":
        assert h.pread(ln, off) == model[off:off + ln], (step, op, off, ln)
    elif op == "write":
        d = os.urandom(ln); h.pwrite(d, off); model[off:off + ln] = d
    elif op == "trim":
        h.trim(ln, off); model[off:off + ln] = bytes(ln)
    elif op == "zero":
        h.zero(ln, off); model[off:off + ln] = bytes(ln)
    elif op == "zero-nohole":
        h.zero(ln, off, nbd.CMD_FLAG_NO_HOLE); model[off:off + ln] = bytes(ln)
    else:
        h.flush()
for h in hs:
    h.flush()
assert hs[0].pread(size, 0) == model
assert hs[1].pread(size, 0) == model
for h in hs:
    h.shutdown()
open(path, "wb").write(model)
PY
}
for r in 1 2 3 4; do
    run_round "$r" || fail "round $r"
    [ "$r" = 4 ] || vdictl vdi-snapshot "uuid=$u" >/dev/null
done
# Three snapshots deep: the leaf's chain has four files (three hidden bases below it).
$PY - "$SR/$u.vhd" <<'PY'
import os, sys, pyvhdi
f = pyvhdi.file(); f.open(sys.argv[1]); depth = 1
while f.parent_identifier:
    p = pyvhdi.file(); p.open(os.path.join(os.path.dirname(sys.argv[1]), f.parent_filename)); f = p; depth += 1
assert depth == 4, depth
PY
for f in "$SR"/*.vhd; do "$VDINBD_BIN/vdictl" vhd-check "$f" >/dev/null || fail "vhd-check $f"; done
