#!/usr/bin/env bash
# fio's nbd engine, queue depth 32, random writes with verification, then a verify pass;
# then the same with CBT on and a fresh log (writes parked before their log sync).
. "$(dirname "$0")/functions.sh"
requires fio
start_vdinbd
u=$(vdictl vdi-create name-label=t virtual-size=64MiB)
U=$(uri "$u")
fio --name=rw --ioengine=nbd --uri="$U" --rw=randwrite --bs=4k --iodepth=32 --size=64M --io_size=16M \
    --verify=crc32c --verify_backlog=512 --do_verify=1 --randrepeat=1 --verify_state_save=0 --output="$TMP/fio.out" >/dev/null 2>&1 \
    || { cat "$TMP/fio.out"; fail "fio randwrite/verify"; }
grep -q "err= 0" "$TMP/fio.out" || { cat "$TMP/fio.out"; fail "fio reported errors"; }
# Again with CBT on and a fresh log after a snapshot, over data the leaf has copied up:
# most writes are acknowledged before their log sync (parked), and fio's verify reads,
# interleaved at the same queue depth, must see them.
vdictl vdi-enable-cbt "uuid=$u"
vdictl vdi-snapshot "uuid=$u" >/dev/null
fio --name=cbt --ioengine=nbd --uri="$U" --rw=randwrite --bs=4k --iodepth=32 --size=64M --io_size=32M \
    --verify=crc32c --verify_backlog=256 --do_verify=1 --randseed=7 --verify_state_save=0 --output="$TMP/fio2.out" >/dev/null 2>&1 \
    || { cat "$TMP/fio2.out"; fail "fio randwrite/verify with CBT"; }
has "err= 0" < "$TMP/fio2.out" || { cat "$TMP/fio2.out"; fail "fio reported errors with CBT"; }
kill "$SERVER_PID"; wait "$SERVER_PID" || fail "server exit status"
# Parking needs a write into space the leaf holds whose change-log bit is clean: VHD's 2 MiB
# blocks hold many 64 KiB CBT blocks; a qcow2 cluster is one, so its first write allocates.
[ "$FMT" != vhd ] || has "writes were acknowledged before their change-log sync" < "$TMP/server.log" || fail "no write was parked"
