#!/usr/bin/env bash
# nbdcopy with 8 connections and many requests in flight round-trips a sparse image, and
# skips holes on the way back (the copy is sparse).
. "$(dirname "$0")/functions.sh"
requires nbdcopy
start_vdinbd
u=$(vdictl vdi-create name-label=t virtual-size=128MiB)
truncate -s 128M "$TMP/in.raw"
for o in 0 17 40 41 90 127; do head -c 1M /dev/urandom | dd of="$TMP/in.raw" bs=1M seek=$o conv=notrunc status=none; done
nbdcopy --connections=8 --requests=16 "$TMP/in.raw" "$(uri "$u")"
nbdcopy --connections=8 --requests=16 "$(uri "$u")" "$TMP/out.raw"
cmp "$TMP/in.raw" "$TMP/out.raw" || fail "data differs"
# 6 data blocks of 2 MiB at most were stored.
[ "$(stat -c %s "$SR/$u.vhd")" -lt $(( 14 << 20 )) ] || fail "holes were written out as data"
