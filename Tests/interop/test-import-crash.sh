#!/usr/bin/env bash
# An import written onto its VDI through the handle (the VDI has a CBT log, so its file
# is not swapped) and cut by the server's death part-way is finished at the next start
# from its staging file: the VDI then holds exactly the imported bytes (never half old,
# half new), and the CBT log marks every block the import changed. A delta import (a
# differencing VHD) cut the same way is finished too.
. "$(dirname "$0")/functions.sh"
requires nbdcopy qemu-img
head -c 24M /dev/urandom > "$TMP/old"
head -c 24M /dev/urandom > "$TMP/new"
# A hole in the middle of the new contents: the replace must leave zeros there.
dd if=/dev/zero of="$TMP/new" bs=1M seek=8 count=4 conv=notrunc status=none
VDINBD_FAULT_IMPORT_AFTER=$((6 << 20)) start_vdinbd
V=$(vdictl vdi-create name-label=crash virtual-size=24MiB)
nbdcopy "$TMP/old" "$(uri "$V")"
vdictl vdi-enable-cbt "uuid=$V"
S=$(vdictl vdi-snapshot "uuid=$V")
if vdictl vdi-import "uuid=$V" "filename=$TMP/new" --quiet 2>/dev/null; then fail "the import finished despite the fault"; fi
wait "$SERVER_PID" 2>/dev/null || true
grep -q "VDINBD_FAULT_IMPORT_AFTER: exiting" "$TMP/server.log" || fail "the fault did not fire"
ls "$SR"/*.import-* >/dev/null 2>&1 || fail "no staging file survived the crash"
start_vdinbd
grep -q "recovery: finished writing an import" "$TMP/server.log" || fail "recovery did not finish the import"
if ls "$SR"/*.import-* >/dev/null 2>&1; then fail "the staging file was left after recovery"; fi
nbdcopy "$(uri "$V")" "$TMP/got"
cmp "$TMP/got" "$TMP/new" || fail "after recovery the VDI does not hold the imported bytes"
# Every 64 KiB block where old and new differ is in the changed blocks since the snapshot.
S2=$(vdictl vdi-snapshot "uuid=$V")
vdictl vdi-list-changed-blocks "vdi-from=$S" "vdi-to=$S2" > "$TMP/cbt.b64"
$PY - "$TMP/old" "$TMP/new" "$TMP/cbt.b64" <<'PY'
import base64, sys
old, new = open(sys.argv[1], "rb").read(), open(sys.argv[2], "rb").read()
bits = base64.b64decode(open(sys.argv[3]).read())
for k in range(len(old) // 65536):
    if old[k * 65536:(k + 1) * 65536] != new[k * 65536:(k + 1) * 65536]:
        assert bits[k // 8] & (0x80 >> (k % 8)), "block %d changed but is not in the log" % k
PY
# A delta (differencing VHD of two snapshots) cut part-way is finished the same way.
A=$(vdictl vdi-snapshot "uuid=$V")
head -c 10M /dev/urandom | nbdcopy - "$(uri "$V")"
B=$(vdictl vdi-snapshot "uuid=$V")
vdictl vdi-export "uuid=$B" "base=$A" format=vhd "filename=$TMP/delta.vhd" --quiet
nbdcopy "$(uri "$B")" "$TMP/b.raw"
C=$(vdictl vdi-clone "uuid=$A")
vdictl vdi-enable-cbt "uuid=$C"
kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true
VDINBD_FAULT_IMPORT_AFTER=$((4 << 20)) start_vdinbd
if vdictl vdi-import "uuid=$C" "filename=$TMP/delta.vhd" format=vhd --quiet 2>/dev/null; then fail "the delta import finished despite the fault"; fi
wait "$SERVER_PID" 2>/dev/null || true
start_vdinbd
nbdcopy "$(uri "$C")" "$TMP/c.raw"
cmp "$TMP/c.raw" "$TMP/b.raw" || fail "after recovery the delta import is not complete"
echo PASS
