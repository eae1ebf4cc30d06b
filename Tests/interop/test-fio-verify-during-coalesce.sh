#!/usr/bin/env bash
# fio (--ioengine=nbd) writes with verification while the VDI's chain is snapshotted and
# merged again and again under it (each snapshot destroyed at once, so the collector
# leaf-coalesces the attached leaf online): no verify error, and the chain ends one file.
. "$(dirname "$0")/functions.sh"
requires fio
start_vdinbd
u=$(vdictl vdi-create name-label=t virtual-size=96MiB)
U=$(uri "$u")
# A first layer for the merges to move, with holes: the merges then allocate blocks in
# the parent that clients' chains opened before they existed.
fio --name=fill --ioengine=nbd --uri="$U" --rw=write:2M --bs=1M --size=96M --iodepth=4 >"$TMP/fill.log" 2>&1 || { cat "$TMP/fill.log"; fail "fio fill"; }
fio --name=verify --ioengine=nbd --uri="$U" --rw=randwrite --bs=4k --size=96M --iodepth=8 \
    --verify=crc32c --verify_backlog=512 --verify_fatal=1 --do_verify=1 --loops=2 >"$TMP/fio.log" 2>&1 &
writer=$!
# Snapshot, destroy and wait for the merge, for as long as fio writes (on a loaded machine
# the collector, at nice 10, merges less often: each round waits for its merge).
(
    while kill -0 "$writer" 2>/dev/null; do
        s=$(vdictl vdi-snapshot "uuid=$u") && vdictl vdi-destroy "uuid=$s" && vdictl sr-scan --wait >/dev/null || exit 1
        sleep 0.2
    done
) >"$TMP/snaps.log" 2>&1 &
snapper=$!
wait "$writer" || { cat "$TMP/fio.log"; fail "fio reported errors while the chain was coalesced"; }
wait "$snapper" || { cat "$TMP/snaps.log"; fail "snapshots failed"; }
has -E "err= *0" "$TMP/fio.log" || { cat "$TMP/fio.log"; fail "fio errors"; }
merges=$(grep -c "leaf-coalesced" "$TMP/server.log" || true)
[ "$merges" -ge 2 ] || fail "only $merges merges ran while fio wrote"
vdictl sr-scan --wait | has "running: false" || fail "collector"
vdictl vdi-param-list "uuid=$u" | has "chain-depth: 1" || fail "the chain should end as one file"
echo "$merges merges during fio"
