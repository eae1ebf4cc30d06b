#!/usr/bin/env bash
# nbdinfo reports the VDI's exact size and the flags we advertise.
. "$(dirname "$0")/functions.sh"
requires nbdinfo
start_vdinbd
u=$(vdictl vdi-create name-label=t virtual-size=100MiB)
nbdinfo --json "$(uri "$u")" > "$TMP/info.json"
$PY - "$TMP/info.json" <<'PY'
import json, sys
e = json.load(open(sys.argv[1]))["exports"][0]
assert e["export-size"] == 100 * 1024 * 1024, e
assert e["is_read_only"] is False and e["can_flush"] and e["can_fua"], e
assert e["block_size_minimum"] == 512 and e["block_size_preferred"] >= 65536 and e["block_size_maximum"] == 32 << 20, e
PY
