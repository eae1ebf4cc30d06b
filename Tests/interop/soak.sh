#!/usr/bin/env bash
# The soak (Tools/stress --soak MINUTES; Tools/test runs three 15 s "minutes" of it,
# test-soak-short.sh): two fio jobs (--ioengine=nbd, random reads and writes with
# verification, one connection each) on a VDI with CBT on, for MINUTES; every minute
# (SOAK_PERIOD seconds, default 60) a snapshot, an incremental backup from the one before
# (list_changed_blocks, the changed blocks read onto the previous backup, which must then
# equal the snapshot), the previous snapshot destroyed (so the collector merges) and
# `sr-scan --wait`. Each minute prints the server's RSS and descriptor count; at the end
# they must be flat (RSS within 25% + 16 MiB of the first minute's, descriptors equal),
# fio must report no error and the log no error line.
. "$(dirname "$0")/functions.sh"
requires fio nbdcopy nbdsh
MINUTES=${MINUTES:-30}
PERIOD=${SOAK_PERIOD:-60}
start_vdinbd
u=$(vdictl vdi-create name-label=soak virtual-size=256MiB)
vdictl vdi-enable-cbt "uuid=$u"
U=$(uri "$u")
fio --name=fill --ioengine=nbd --uri="$U" --rw=write --bs=1M --size=256M --iodepth=4 >/dev/null 2>&1 || fail "fill"
prev=$(vdictl vdi-snapshot "uuid=$u")
nbdcopy "$(uri "$prev")" "$TMP/backup.raw"
for j in 0 1; do
    fio --name=soak$j --ioengine=nbd --uri="$U" --rw=randrw --bs=4k --size=48M --offset=$((j * 128))M --iodepth=8 \
        ${SOAK_RATE_IOPS:+--rate_iops=$SOAK_RATE_IOPS} --time_based --runtime=$((MINUTES * PERIOD + PERIOD * 3 / 2)) --verify=crc32c --verify_backlog=1024 --verify_fatal=1 \
        >"$TMP/fio$j.log" 2>&1 &
    eval "fio$j=\$!"
done
fds() { ls "/proc/$SERVER_PID/fd" | wc -l; }
rss() { awk '/^VmRSS:/ {print $2}' "/proc/$SERVER_PID/status"; }
first_rss=""; first_fds=""
# Each minute's backup starts on the minute, whatever the last one took; fio runs a minute
# and a half past the last, so every backup has writes to find.
t0=$(date +%s)
for m in $(seq 1 "$MINUTES"); do
    left=$(( t0 + m * PERIOD - $(date +%s) ))
    [ "$left" -le 0 ] || sleep "$left"
    snap=$(vdictl vdi-snapshot "uuid=$u")
    vdictl vdi-list-changed-blocks "vdi-from=$prev" "vdi-to=$snap" > "$TMP/bitmap.b64"
    $PY "$(dirname "$0")/incremental_backup.py" "$TMP/backup.raw" "$TMP/bitmap.b64" "$(uri "$snap")" >/dev/null \
        || fail "minute $m: the incremental backup differs from the snapshot"
    nbdcopy "$(uri "$snap")" "$TMP/backup.raw"
    vdictl vdi-destroy "uuid=$prev"
    prev=$snap
    vdictl sr-scan --wait >/dev/null
    r=$(rss); f=$(fds)
    [ -n "$first_rss" ] || { first_rss=$r; first_fds=$f; }
    depth=$(vdictl vdi-param-list "uuid=$u" | sed -n 's/.*chain-depth: \([0-9]*\).*/\1/p' | head -1)
    echo "minute $m: RSS $r KiB, $f descriptors, chain depth ${depth:-?}"
done
wait "$fio0" || { cat "$TMP/fio0.log"; fail "fio 0"; }
wait "$fio1" || { cat "$TMP/fio1.log"; fail "fio 1"; }
for j in 0 1; do has -E "err= *0" "$TMP/fio$j.log" || { cat "$TMP/fio$j.log"; fail "fio $j errors"; }; done
r=$(rss); f=$(fds)
echo "end: RSS $r KiB (first minute $first_rss), $f descriptors (first minute $first_fds)"
[ "$r" -le $((first_rss * 5 / 4 + 16384)) ] || fail "RSS grew from $first_rss to $r KiB"
[ "$f" -le "$first_fds" ] || fail "descriptors grew from $first_fds to $f"
if grep -E " (error|critical) " "$TMP/server.log"; then fail "error lines in the log"; fi
kill "$SERVER_PID"; wait "$SERVER_PID" || fail "server exit status"
for f in "$SR"/*."$FMT"; do check_image "$f" || fail "check $f"; done
echo PASS
