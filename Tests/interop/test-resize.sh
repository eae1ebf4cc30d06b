#!/usr/bin/env bash
# vdi-resize grows a VDI offline: its old bytes stay, clients see the new size, the grown
# VHD (BAT relocated past the data) is read alike by qemu-img, vhdiinfo and pyvhdi, and
# the change log grows so list_changed_blocks covers the new space. Shrinking, resizing a
# snapshot and resizing an attached VDI are refused with XenAPI errors.
. "$(dirname "$0")/functions.sh"
requires nbdcopy nbdinfo nbdsh qemu-img vhdiinfo
$PY -c 'import pyvhdi' || { [ "${CI:-}" = true ] && exit 1; echo "SKIP: pyvhdi"; exit 77; }
start_vdinbd
size_of() { nbdinfo --size "$1"; }

# A plain dynamic VDI grown from 16 MiB to 600 MiB (the BAT must move): qemu-img reads the
# file exactly as the export reads.
p=$(vdictl vdi-create name-label=plain virtual-size=16MiB)
head -c 16M /dev/urandom > "$TMP/p.raw"
nbdcopy "$TMP/p.raw" "$(uri "$p")"
vdictl vdi-resize "uuid=$p" disk-size=600MiB
[ "$(size_of "$(uri "$p")")" = $((600 << 20)) ] || fail "export size after resize"
nbdsh -u "$(uri "$p")" -c "h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_ALIGN)" -c 'h.pwrite(b"\x5a" * 70000, (500 << 20) + 12345)'
qemu-img info -f vpc --output=json "$SR/$p.vhd" | $PY -c 'import json,sys; assert json.load(sys.stdin)["virtual-size"] == 600 << 20' \
    || fail "qemu-img sees another size"
qemu-img convert -f vpc -O raw "$SR/$p.vhd" "$TMP/p-qemu.raw"
nbdcopy "$(uri "$p")" "$TMP/p-nbd.raw"
cmp "$TMP/p-qemu.raw" "$TMP/p-nbd.raw" || fail "qemu-img reads the grown VHD differently from the export"
cmp -n $((16 << 20)) "$TMP/p.raw" "$TMP/p-nbd.raw" || fail "old bytes changed by the resize"
rm -f "$TMP/p-qemu.raw" "$TMP/p-nbd.raw"

# A CBT VDI with a snapshot: the leaf grows, the snapshot keeps its size, the chain reads
# right in pyvhdi and the changed blocks cover the grown space.
u=$(vdictl vdi-create name-label=t virtual-size=16MiB)
head -c 16M /dev/urandom > "$TMP/a.raw"
nbdcopy "$TMP/a.raw" "$(uri "$u")"
vdictl vdi-enable-cbt "uuid=$u"
s1=$(vdictl vdi-snapshot "uuid=$u")
vdictl vdi-resize "uuid=$u" disk-size=3GiB
[ "$(size_of "$(uri "$u")")" = $((3 << 30)) ] || fail "leaf size after resize"
[ "$(size_of "$(uri "$s1")")" = $((16 << 20)) ] || fail "the snapshot's size changed"
vdictl vdi-param-list "uuid=$u" | has "virtual-size: $((3 << 30))" || fail "record size"
nbdsh -u "$(uri "$u")" -c '
h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_ALIGN)
h.pwrite(b"\xa5" * 70000, (2 << 30) + 12345)
h.pwrite(b"\x3c" * 512, (3 << 30) - 512)
assert h.pread(4096, 16 << 20) == bytes(4096), "new space does not read as zeros"
'
s2=$(vdictl vdi-snapshot "uuid=$u")
# Exactly the 64 KiB blocks the two writes touched.
got=$(vdictl vdi-list-changed-blocks "vdi-from=$s1" "vdi-to=$s2" --ranges | tr '\n' ' ')
want="$(( (2 << 30) )) $((2 * 65536)) $(( (3 << 30) - 65536 )) 65536 "
$PY - "$got" "$want" <<'PY' || fail "changed ranges: $got"
import sys
got = [int(x) for x in sys.argv[1].replace("+", " ").replace(",", " ").split() if x.isdigit()]
want = [int(x) for x in sys.argv[2].split()]
assert got == want, (got, want)
PY
b64=$(vdictl vdi-list-changed-blocks "vdi-from=$s1" "vdi-to=$s2")
$PY -c "import base64,sys; assert len(base64.b64decode('$b64')) == (3 << 30) // 65536 // 8" || fail "bitmap length"
$PY - "$SR/$s2.vhd" "$TMP/a.raw" <<'PY' || fail "pyvhdi reads the grown chain differently"
import os, sys, pyvhdi
leaf = pyvhdi.file(); leaf.open(sys.argv[1])
files = [leaf]
while files[-1].parent_identifier:
    p = pyvhdi.file(); p.open(os.path.join(os.path.dirname(sys.argv[1]), files[-1].parent_filename))
    files[-1].set_parent(p); files.append(p)
assert leaf.media_size == 3 << 30, leaf.media_size
a = open(sys.argv[2], "rb").read()
assert leaf.read_buffer_at_offset(len(a), 0) == a
# (libvhdi refuses reads of blocks no layer holds past a smaller parent's end, so the
# zeros there are checked over NBD above, not here.)
assert leaf.read_buffer_at_offset(70002, (2 << 30) + 12344) == b"\0" + b"\xa5" * 70000 + b"\0"
assert leaf.read_buffer_at_offset(512, (3 << 30) - 512) == b"\x3c" * 512
PY
for f in "$SR"/*.vhd; do
    "$VDINBD_BIN/vdictl" vhd-check "$f" >/dev/null || fail "vhd-check $f"
    vhdiinfo "$f" >/dev/null || fail "vhdiinfo $f"
done
vhdiinfo "$SR/$u.vhd" | has -E "Media size.*(3 GiB|3221225472)" || { vhdiinfo "$SR/$u.vhd"; fail "vhdiinfo size"; }

# Refusals, each naming the XenAPI error, and nothing changes.
expect_error() {
    local code=$1; shift
    local out
    if out=$(vdictl "$@" 2>&1); then fail "$* succeeded"; fi
    echo "$out" | has "$code" || fail "$* gave: $out (want $code)"
}
expect_error VALUE_NOT_SUPPORTED vdi-resize "uuid=$u" disk-size=1GiB
expect_error OPERATION_NOT_ALLOWED vdi-resize "uuid=$s1" disk-size=4GiB
expect_error VDI_MISSING vdi-resize uuid=00000000-0000-0000-0000-000000000000 disk-size=4GiB
# While a client is attached: VDI_IN_USE.
U=$(uri "$u")
nbdsh -u "$U" -c "
import subprocess
r = subprocess.run(['$VDINBD_BIN/vdictl', '--socket', '$SOCK', 'vdi-resize', 'uuid=$u', 'disk-size=4GiB'],
                   capture_output=True, text=True)
assert r.returncode != 0 and 'VDI_IN_USE' in r.stderr + r.stdout, r
assert h.get_size() == 3 << 30
" || fail "resize while attached was not VDI_IN_USE"
[ "$(size_of "$(uri "$u")")" = $((3 << 30)) ] || fail "a refused resize changed the size"
