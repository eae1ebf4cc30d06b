#!/usr/bin/env bash
# The SR's files are VHDs other tools read: pyvhdi reading the chain gives the same bytes
# as NBD; vhd-check is clean; vhdiinfo reads every file; qemu-img sees the exact size and
# converts the base.
. "$(dirname "$0")/functions.sh"
requires nbdcopy vhdiinfo qemu-img
$PY -c 'import pyvhdi' || { [ "${CI:-}" = true ] && exit 1; echo "SKIP: pyvhdi"; exit 77; }
start_vdinbd
u=$(vdictl vdi-create name-label=t virtual-size=20MiB)
U=$(uri "$u")
head -c 20M /dev/urandom > "$TMP/a.raw"
nbdcopy "$TMP/a.raw" "$U"
vdictl vdi-snapshot "uuid=$u" >/dev/null
# Overwrite part of the disk, unaligned to blocks, so the chain mixes layers.
$PY - "$TMP/a.raw" <<'PY'
import os, sys
d = bytearray(open(sys.argv[1], "rb").read())
patch = os.urandom(3 * 1024 * 1024 + 4096)
d[1024 * 1024 + 512: 1024 * 1024 + 512 + len(patch)] = patch
open(sys.argv[1] + ".new", "wb").write(d)
open(sys.argv[1] + ".patch", "wb").write(patch)
PY
nbdsh -u "$U" -c "h.pwrite(open('$TMP/a.raw.patch','rb').read(), 1024*1024+512)"
nbdcopy "$U" "$TMP/nbd.raw"
cmp "$TMP/nbd.raw" "$TMP/a.raw.new" || fail "NBD read differs from what was written"
$PY - "$SR/$u.vhd" "$TMP/nbd.raw" <<'PY'
import os, sys, pyvhdi
leaf = pyvhdi.file(); leaf.open(sys.argv[1])
files = [leaf]
while files[-1].parent_identifier:
    p = pyvhdi.file(); p.open(os.path.join(os.path.dirname(sys.argv[1]), files[-1].parent_filename))
    files[-1].set_parent(p); files.append(p)
assert len(files) == 2, len(files)
data = leaf.read_buffer(leaf.media_size)
assert data == open(sys.argv[2], "rb").read(), "pyvhdi reads other bytes than NBD"
PY
for f in "$SR"/*.vhd; do
    "$VDINBD_BIN/vdictl" vhd-check "$f" || fail "vhd-check $f"
    vhdiinfo "$f" > /dev/null || fail "vhdiinfo $f"
    qemu-img info -f vpc --output=json "$f" | $PY -c 'import json,sys; assert json.load(sys.stdin)["virtual-size"] == 20 << 20'
done
base=$(vdictl vdi-param-list "uuid=$u" | sed -n 's/^parent: //p')
qemu-img convert -f vpc -O raw "$SR/$base.vhd" "$TMP/base.raw"
cmp "$TMP/base.raw" "$TMP/a.raw" || fail "qemu-img reads the base differently"
