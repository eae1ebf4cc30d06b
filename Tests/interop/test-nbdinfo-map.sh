#!/usr/bin/env bash
# nbdinfo --map over a differencing chain reports data exactly where some layer holds it
# (2 MiB VHD blocks) and holes+zero elsewhere; nbdinfo --can and the flags say what works.
. "$(dirname "$0")/functions.sh"
requires nbdinfo nbdsh
start_vdinbd
u=$(vdictl vdi-create name-label=t virtual-size=32MiB)
U=$(uri "$u")
nbdsh -u "$U" -c 'h.pwrite(b"a" * 4096, 3 << 20)'
vdictl vdi-snapshot "uuid=$u" >/dev/null
nbdsh -u "$(uri "$u")" -c 'h.pwrite(b"b" * 512, (20 << 20) + 7 * 512)'
nbdinfo --map --json "$(uri "$u")" > "$TMP/map.json"
$PY - "$TMP/map.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
got = [(e["offset"], e["length"], e["type"]) for e in m]
want = [(0, 2 << 20, 3), (2 << 20, 2 << 20, 0), (4 << 20, 16 << 20, 3), (20 << 20, 2 << 20, 0), (22 << 20, 10 << 20, 3)]
assert got == want, got
PY
for c in trim zero fast-zero cache multi-conn df flush fua structured-reply; do
    nbdinfo --can "$c" "$(uri "$u")" || fail "cannot $c"
done
nbdinfo --json "$(uri "$u")" | $PY -c 'import json,sys; assert "base:allocation" in json.load(sys.stdin)["exports"][0]["contexts"]' \
    || fail "no base:allocation"
