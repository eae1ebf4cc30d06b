#!/usr/bin/env bash
# fio's nbd engine, queue depth 32, random writes with verification, then a verify pass.
. "$(dirname "$0")/functions.sh"
requires fio
start_vdinbd
u=$(vdictl vdi-create name-label=t virtual-size=64MiB)
U=$(uri "$u")
fio --name=rw --ioengine=nbd --uri="$U" --rw=randwrite --bs=4k --iodepth=32 --size=64M --io_size=16M \
    --verify=crc32c --verify_backlog=512 --do_verify=1 --randrepeat=1 --verify_state_save=0 --output="$TMP/fio.out" >/dev/null 2>&1 \
    || { cat "$TMP/fio.out"; fail "fio randwrite/verify"; }
grep -q "err= 0" "$TMP/fio.out" || { cat "$TMP/fio.out"; fail "fio reported errors"; }
