#!/usr/bin/env bash
# Every fixture written by other tools reads the same through our engine as through
# pyvhdi (chains included); fat-differential fails naming its missing parent.
. "$(dirname "$0")/functions.sh"
$PY -c 'import pyvhdi' || { [ "${CI:-}" = true ] && exit 1; echo "SKIP: pyvhdi"; exit 77; }
FIX=${VDINBD_FIXTURES:-$(cd "$(dirname "$0")/../../.." && pwd)/shared/fixtures/vhd}
[ -d "$FIX" ] || fail "fixtures not found at $FIX"
for f in ext2.vhd image.vhd image-differential.vhd; do
    "$VDINBD_BIN/vdictl" vhd-read "$FIX/$f" "$TMP/$f.ours"
    $PY - "$FIX/$f" "$TMP/$f.ours" <<'PY'
import os, sys, pyvhdi
v = pyvhdi.file(); v.open(sys.argv[1])
if v.parent_identifier:
    p = pyvhdi.file(); p.open(os.path.join(os.path.dirname(sys.argv[1]), v.parent_filename)); v.set_parent(p)
assert v.read_buffer(v.media_size) == open(sys.argv[2], "rb").read(), sys.argv[1]
PY
done
if "$VDINBD_BIN/vdictl" vhd-read "$FIX/fat-differential.vhd" "$TMP/fat" 2> "$TMP/err"; then fail "missing parent not detected"; fi
grep -q "parent missing" "$TMP/err" && grep -q "fat-parent.vhd" "$TMP/err" || { cat "$TMP/err"; fail "error does not name the parent"; }
"$VDINBD_BIN/vdictl" vhd-info "$FIX/fat-differential.vhd" | has "disk type: differencing" || fail "vhd-info"
