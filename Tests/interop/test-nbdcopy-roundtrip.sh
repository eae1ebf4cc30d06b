#!/usr/bin/env bash
# 256 MiB of random data written with nbdcopy reads back byte-exact.
. "$(dirname "$0")/functions.sh"
requires nbdcopy
start_vdinbd
u=$(vdictl vdi-create name-label=t virtual-size=256MiB)
U=$(uri "$u")
head -c 256M /dev/urandom > "$TMP/in.raw"
nbdcopy "$TMP/in.raw" "$U"
nbdcopy "$U" "$TMP/out.raw"
cmp "$TMP/in.raw" "$TMP/out.raw" || fail "data differs"
