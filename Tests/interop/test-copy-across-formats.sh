#!/usr/bin/env bash
# VDI.copy with options {"dest-img-format": F} (vdictl vdi-copy image-format=F): a VHD
# chain three layers deep copied to qcow2, that copy to raw and back to VHD, each read
# back over NBD equal to the source, qemu-img reading the files alike (`qemu-img check`
# clean for qcow2), holes kept (nbdinfo --map); the refusals: a format the SR does not know,
# and a format with into-vdi.
. "$(dirname "$0")/functions.sh"
requires nbdsh nbdinfo qemu-img
start_vdinbd
u=$(vdictl vdi-create name-label=src virtual-size=40MiB sm-config:image-format=vhd)
for layer in 0 1 2; do
    $PY - "$(uri "$u")" "$layer" <<'PY'
import nbd, sys, random
h = nbd.NBD(); h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_ALIGN); h.connect_uri(sys.argv[1]); layer = int(sys.argv[2])
rng = random.Random(layer)
for _ in range(12):
    o = rng.randrange(0, 30 << 20) // 512 * 512
    h.pwrite(bytes([0x41 + layer]) * rng.choice([512, 4096, 70000, 1 << 20]), o)
h.flush(); h.shutdown()
PY
    [ "$layer" = 2 ] || vdictl vdi-snapshot "uuid=$u" >/dev/null
done
nbdcopy "$(uri "$u")" "$TMP/src.raw"
q=$(vdictl vdi-copy "uuid=$u" image-format=qcow2 --quiet)
[ -f "$SR/$q.qcow2" ] || fail "the qcow2 copy has no .qcow2 file"
vdictl vdi-param-list "uuid=$q" | has "image-format: qcow2" || fail "the copy's record does not say qcow2"
r=$(vdictl vdi-copy "uuid=$q" image-format=raw --quiet)
v=$(vdictl vdi-copy "uuid=$r" image-format=vhd --quiet)
for x in "$q" "$r" "$v"; do
    nbdcopy "$(uri "$x")" "$TMP/out.raw"
    cmp "$TMP/src.raw" "$TMP/out.raw" || fail "copy $x reads differently over NBD"
done
kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true   # a clean stop, files closed
qemu-img check -f qcow2 "$SR/$q.qcow2" >/dev/null || fail "qemu-img check of the qcow2 copy"
for f in "qcow2:$q.qcow2" "raw:$r.raw" "vpc:$v.vhd"; do
    qemu-img convert -f "${f%%:*}" -O raw "$SR/${f#*:}" "$TMP/q.raw"
    cmp "$TMP/src.raw" "$TMP/q.raw" || fail "qemu-img reads ${f#*:} differently"
done
start_vdinbd
# The copies hold data only where the source does (allocation at each format's unit).
nbdinfo --map --json "$(uri "$q")" | $PY -c '
import json, sys
m = json.load(sys.stdin)
data = sum(e["length"] for e in m if e["type"] & 1 == 0)
assert 0 < data < 30 << 20, "the qcow2 copy holds %d bytes of a 40 MiB disk" % data' || fail "the qcow2 copy is not sparse"
if vdictl vdi-copy "uuid=$u" image-format=vmdk --quiet 2>"$TMP/err"; then fail "vmdk accepted"; fi
has "known: vhd, raw, qcow2" < "$TMP/err" || fail "unknown format: $(cat "$TMP/err")"
if vdictl vdi-copy "uuid=$u" "into-vdi=$v" image-format=qcow2 --quiet 2>"$TMP/err"; then fail "a format with into-vdi accepted"; fi
has "keeps that VDI's format" < "$TMP/err" || fail "format with into-vdi: $(cat "$TMP/err")"
echo PASS
