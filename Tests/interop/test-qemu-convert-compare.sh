#!/usr/bin/env bash
# qemu-img convert writes into an export and qemu-img compare finds it equal to the source;
# qemu-io write/discard/write -z patterns read back as qemu expects.
. "$(dirname "$0")/functions.sh"
requires qemu-img qemu-io
start_vdinbd
u=$(vdictl vdi-create name-label=t virtual-size=64MiB)
name=$(export_name "$u")
J="json:{\"driver\":\"raw\",\"file\":{\"driver\":\"nbd\",\"host\":\"127.0.0.1\",\"port\":\"$PORT\",\"export\":\"$name\"}}"
# A sparse source: data at the start, in the middle and at the very end.
truncate -s 64M "$TMP/src.raw"
head -c 3M /dev/urandom | dd of="$TMP/src.raw" conv=notrunc status=none
head -c 1M /dev/urandom | dd of="$TMP/src.raw" bs=1M seek=30 conv=notrunc status=none
head -c 512 /dev/urandom | dd of="$TMP/src.raw" bs=512 seek=$(( (64 << 20) / 512 - 1 )) conv=notrunc status=none
qemu-img convert -n -f raw -O raw "$TMP/src.raw" "$J"
qemu-img compare -f raw "$TMP/src.raw" "$J" || fail "qemu-img compare"
qemu-io -f raw -c "write -P 0x5a 1M 64k" -c "discard 30M 1M" -c "write -z 0 4k" -c "write -P 0x11 40M 4k" "$J" >/dev/null
out=$(qemu-io -f raw -c "read -P 0x5a 1M 64k" -c "read -P 0 30M 1M" -c "read -P 0 0 4k" -c "read -P 0x11 40M 4k" "$J")
echo "$out" | has "Pattern verification failed" && { echo "$out"; fail "pattern mismatch"; }
[ "$(echo "$out" | grep -c '^read')" = 4 ] || { echo "$out"; fail "not all reads done"; }
