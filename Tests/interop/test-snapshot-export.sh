#!/usr/bin/env bash
# After vdi-snapshot, the VDI's export still takes writes (on the same, still-open
# connection's handle) while the snapshot's export serves the old bytes, read-only.
. "$(dirname "$0")/functions.sh"
requires nbdcopy nbdinfo nbdsh
start_vdinbd
u=$(vdictl vdi-create name-label=t virtual-size=16MiB)
U=$(uri "$u")
head -c 16M /dev/urandom > "$TMP/v1.raw"
nbdcopy "$TMP/v1.raw" "$U"
s=$(vdictl vdi-snapshot "uuid=$u")
head -c 16M /dev/urandom > "$TMP/v2.raw"
nbdcopy "$TMP/v2.raw" "$U"
S=$(uri "$s")
nbdcopy "$S" "$TMP/snap.raw"
cmp "$TMP/v1.raw" "$TMP/snap.raw" || fail "snapshot does not hold the old bytes"
nbdcopy "$U" "$TMP/now.raw"
cmp "$TMP/v2.raw" "$TMP/now.raw" || fail "VDI does not hold the new bytes"
nbdinfo --json "$S" | $PY -c 'import json,sys; assert json.load(sys.stdin)["exports"][0]["is_read_only"] is True'
# A write to the snapshot is refused with EPERM.
nbdsh -u "$S" -c '
import errno
try:
    h.pwrite(b"x" * 512, 0)
    raise SystemExit("write to a snapshot succeeded")
except nbd.Error as e:
    assert e.errnum == errno.EPERM, e
' || fail "snapshot write not refused with EPERM"
vdictl vdi-param-list "uuid=$s" | has "is-a-snapshot: true" || fail "record does not say snapshot"
