#!/usr/bin/env bash
# Files we create: qemu-img reports their exact size (creator "tap"), qemu-io writes into
# them, and our engine reads back what qemu wrote; our snapshot over it is read by qemu.
. "$(dirname "$0")/functions.sh"
requires qemu-img qemu-io vhdiinfo
V="$VDINBD_BIN/vdictl"
for size in 1MiB 100MiB 1000000000 3GiB; do
    rm -f "$TMP/s.vhd"
    "$V" vhd-create "$TMP/s.vhd" "$size"
    want=$($PY -c "import sys; s='$size'; m={'MiB':1<<20,'GiB':1<<30}; print(int(s[:-3])*m[s[-3:]] if s[-3:] in m else int(s))")
    got=$(qemu-img info -f vpc --output=json "$TMP/s.vhd" | $PY -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"])')
    [ "$got" = "$want" ] || fail "qemu-img sees $got for $size (want $want)"
done
"$V" vhd-create "$TMP/q.vhd" 16MiB
qemu-io -f vpc -c "write -P 0xab 0 1M" -c "write -P 0xcd 5M 4k" -c "write -P 0xef 15M 1M" "$TMP/q.vhd" >/dev/null
"$V" vhd-check "$TMP/q.vhd" || fail "vhd-check after qemu-io"
"$V" vhd-read "$TMP/q.vhd" "$TMP/ours.raw"
qemu-img convert -f vpc -O raw "$TMP/q.vhd" "$TMP/qemu.raw"
cmp "$TMP/ours.raw" "$TMP/qemu.raw" || fail "our engine reads qemu's writes differently"
"$V" vhd-snapshot "$TMP/child.vhd" "$TMP/q.vhd"
vhdiinfo "$TMP/child.vhd" | has "Parent filename.*q.vhd" || fail "vhdiinfo does not see the parent"
qemu-img info -f vpc "$TMP/child.vhd" >/dev/null || fail "qemu-img cannot open our child"
