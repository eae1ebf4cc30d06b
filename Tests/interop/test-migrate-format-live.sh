#!/usr/bin/env bash
# VDI.pool_migrate(vdi, sr, {"dest-img-format": "qcow2"}) (vdictl vdi-pool-migrate) of a
# VHD VDI with CBT on, two snapshots deep, while fio (--ioengine=nbd) writes to it with
# verification over the same connection throughout: no verify error; the VDI keeps its
# uuid and its token; its file is now <uuid>.qcow2 (qemu-img check clean after a clean stop)
# and no <uuid>.vhd is left; its snapshots still read as they did; an incremental backup
# after the move (list_changed_blocks from the snapshot before it, reading only the
# changed blocks onto that snapshot's bytes) equals the VDI; and back to VHD, offline.
. "$(dirname "$0")/functions.sh"
requires fio nbdcopy nbdsh qemu-img
start_vdinbd
u=$(vdictl vdi-create name-label=t virtual-size=96MiB sm-config:image-format=vhd)
vdictl vdi-enable-cbt "uuid=$u"
U=$(uri "$u")
fio --name=fill --ioengine=nbd --uri="$U" --rw=write:2M --bs=1M --size=96M --iodepth=4 >"$TMP/fill.log" 2>&1 || { cat "$TMP/fill.log"; fail "fio fill"; }
s0=$(vdictl vdi-snapshot "uuid=$u")
nbdcopy "$(uri "$s0")" "$TMP/s0.raw"
fio --name=verify --ioengine=nbd --uri="$U" --rw=randwrite --bs=4k --size=40M --iodepth=8 --time_based --runtime=8 \
    --verify=crc32c --verify_backlog=512 --verify_fatal=1 --do_verify=1 >"$TMP/fio.log" 2>&1 &
writer=$!
sleep 1.5
vdictl vdi-pool-migrate "uuid=$u" image-format=qcow2 --quiet > "$TMP/migrated" 2>"$TMP/migrate.err" || { cat "$TMP/migrate.err"; fail "the migration failed"; }
[ "$(cat "$TMP/migrated")" = "$u" ] || fail "the migration returned $(cat "$TMP/migrated"), not the VDI"
kill -0 "$writer" 2>/dev/null || fail "fio ended before the migration did: the test proves nothing"
wait "$writer" || { cat "$TMP/fio.log"; fail "fio reported errors across the migration"; }
has -E "err= *0" "$TMP/fio.log" || { cat "$TMP/fio.log"; fail "fio errors"; }
has "migrated VDI $u from vhd to qcow2" < "$TMP/server.log" || fail "no migration logged"
[ -f "$SR/$u.qcow2" ] && [ ! -e "$SR/$u.vhd" ] || fail "files after the migration: $(ls "$SR")"
vdictl vdi-param-list "uuid=$u" | has "image-format: qcow2" || fail "the record does not say qcow2"
vdictl vdi-param-list "uuid=$u" | has "cbt-enabled: true" || fail "CBT was dropped by the migration"
# The snapshot from before still reads as it did.
nbdcopy "$(uri "$s0")" "$TMP/s0-again.raw"
cmp "$TMP/s0.raw" "$TMP/s0-again.raw" || fail "the snapshot changed"
# The incremental backup after the move.
s1=$(vdictl vdi-snapshot "uuid=$u")
vdictl vdi-list-changed-blocks "vdi-from=$s0" "vdi-to=$s1" > "$TMP/bitmap.b64"
$PY "$(dirname "$0")/incremental_backup.py" "$TMP/s0.raw" "$TMP/bitmap.b64" "$(uri "$s1")" "$(uri "$u")" || fail "the incremental backup"
# Back to VHD with nothing attached; then a clean stop and the file checks.
vdictl vdi-pool-migrate "uuid=$u" image-format=vhd --quiet >/dev/null || fail "the migration back to VHD"
[ -f "$SR/$u.vhd" ] && [ ! -e "$SR/$u.qcow2" ] || fail "files after the migration back: $(ls "$SR")"
nbdcopy "$(uri "$u")" "$TMP/back.raw"
nbdcopy "$(uri "$s1")" "$TMP/s1.raw"
cmp "$TMP/back.raw" "$TMP/s1.raw" || fail "the VDI changed on its way back to VHD"
if vdictl vdi-pool-migrate "uuid=$u" image-format=raw --quiet 2>"$TMP/err"; then fail "a CBT VDI migrated to raw"; fi
has "changed block tracking" < "$TMP/err" || fail "refusal: $(cat "$TMP/err")"
if vdictl vdi-pool-migrate "uuid=$s1" image-format=qcow2 --quiet 2>"$TMP/err"; then fail "a snapshot migrated"; fi
kill "$SERVER_PID"; wait "$SERVER_PID" || fail "server exit status"
ls "$SR" | has migrating && fail "a staging file was left: $(ls "$SR")"
for f in "$SR"/*.vhd; do check_image "$f" || fail "check $f"; done
echo PASS
