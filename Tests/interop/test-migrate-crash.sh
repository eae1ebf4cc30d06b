#!/usr/bin/env bash
# kill -9 of the server during a format migration (VDINBD_FAULT_GC_STEP): in the copy, the
# next start drops the half-made file and the VDI is as it was (VHD, same bytes); once the
# switch is journalled, the next start finishes it (qcow2, same bytes, no VHD left, qemu-img
# check clean after a clean stop). The change log survives both.
. "$(dirname "$0")/functions.sh"
requires nbdcopy qemu-img
start_vdinbd
u=$(vdictl vdi-create name-label=t virtual-size=48MiB sm-config:image-format=vhd)
vdictl vdi-enable-cbt "uuid=$u"
head -c 40M /dev/urandom > "$TMP/in.raw"; truncate -s 48M "$TMP/in.raw"
nbdcopy "$TMP/in.raw" "$(uri "$u")"
vdictl sr-param-set other-config:gc=false   # the collector's copies do not count as the migration's
crash_at() {  # STEP: start with the fault, migrate, expect the server to die
    kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true
    VDINBD_FAULT_GC_STEP=$1 start_vdinbd
    if vdictl vdi-pool-migrate "uuid=$u" image-format=qcow2 --quiet >/dev/null 2>&1; then fail "the migration finished despite the fault at $1"; fi
    wait "$SERVER_PID" 2>/dev/null || true
    kill -0 "$SERVER_PID" 2>/dev/null && fail "the server survived the fault at $1"
    cp "$TMP/server.log" "$TMP/crashed.log"
    start_vdinbd
    has "VDINBD_FAULT_GC_STEP: exiting at ${1%%:*} #${1#*:}" < "$TMP/crashed.log" || fail "the fault at $1 was not reached"
}
crash_at copy:3
has "recovery: dropped an interrupted migration of $u" < "$TMP/server.log" || fail "no recovery of the copy"
[ -f "$SR/$u.vhd" ] && [ ! -e "$SR/$u.qcow2" ] || fail "files after a crash in the copy: $(ls "$SR")"
ls "$SR" | has migrating && fail "a staging file survived: $(ls "$SR")"
nbdcopy "$(uri "$u")" "$TMP/out.raw"; cmp "$TMP/in.raw" "$TMP/out.raw" || fail "the VDI changed after a crash in the copy"
crash_at migrate-switch:1
has "recovery: finished migrating $u to qcow2" < "$TMP/server.log" || fail "no recovery of the switch"
[ -f "$SR/$u.qcow2" ] && [ ! -e "$SR/$u.vhd" ] || fail "files after a crash at the switch: $(ls "$SR")"
vdictl vdi-param-list "uuid=$u" | has "image-format: qcow2" || fail "the record does not say qcow2"
vdictl vdi-param-list "uuid=$u" | has "cbt-enabled: true" || fail "CBT was lost"
nbdcopy "$(uri "$u")" "$TMP/out.raw"; cmp "$TMP/in.raw" "$TMP/out.raw" || fail "the VDI changed after a crash at the switch"
kill "$SERVER_PID"; wait "$SERVER_PID" || fail "server exit status"
check_image "$SR/$u.qcow2" || fail "qemu-img check"
echo PASS
