#!/usr/bin/env bash
# kill -9 at a random moment, ROUNDS times (20 here, 100 in Tools/stress), while libnbd
# pipelines random writes (32 in flight, some FUA, FLUSHes between) to a VDI with CBT on,
# and meanwhile snapshots are taken and destroyed (so the collector coalesces) and CBT is
# switched on and off on a second VDI. After each restart, against the model
# (crash_model.py): every write acknowledged before a completed FLUSH, or with FUA, is
# there; every block holds, whole, a value that was written to it; the change log names
# every block changed since the snapshot taken before the round (list_changed_blocks to a
# snapshot after it); CBT is still on with no damage noted; the files check clean
# (vhd-check, or qemu-img check with leaked clusters at most) and match the records.
. "$(dirname "$0")/functions.sh"
requires nbdsh
ROUNDS=${ROUNDS:-20}
M="$PY $(dirname "$0")/crash_model.py"
STATE=$TMP/model
start_vdinbd
v=$(vdictl vdi-create name-label=crash virtual-size=32MiB)
vdictl vdi-enable-cbt "uuid=$v"
w=$(vdictl vdi-create name-label=toggled virtual-size=8MiB)
$M init "$STATE" $((32 << 20))
no_damage() {
    vdictl vdi-param-list "uuid=$1" --json | $PY -c '
import json, sys
r = json.load(sys.stdin)
assert "cbt_disabled_reason" not in r["other_config"], r["other_config"]
assert r["cbt_enabled"] == (sys.argv[1] == "on"), r["cbt_enabled"]' "$2"
}
edits=0
for round in $(seq 1 "$ROUNDS"); do
    before=$(vdictl vdi-snapshot "uuid=$v")
    cp "$STATE/ids.json" "$STATE/before.json"
    rm -f "$STATE/started"
    $M write "$STATE" "$(uri "$v")" 30 > "$TMP/writer.log" 2>&1 &
    writer=$!
    # The kill comes once the writer is connected (else it would test nothing).
    for _ in $(seq 1 100); do [ -e "$STATE/started" ] && break; sleep 0.1; done
    [ -e "$STATE/started" ] || { cat "$TMP/writer.log"; fail "round $round: the writer did not connect"; }
    (
        # Chain edits in flight: a snapshot made and destroyed (the collector merges it
        # away), CBT on and off on the other VDI; errors once the server is gone end it.
        while kill -0 "$SERVER_PID" 2>/dev/null; do
            s=$(vdictl vdi-snapshot "uuid=$v" 2>/dev/null) || break
            sleep 0.0$((RANDOM % 9))
            vdictl vdi-destroy "uuid=$s" 2>/dev/null || break
            vdictl vdi-enable-cbt "uuid=$w" 2>/dev/null || break
            vdictl vdi-disable-cbt "uuid=$w" 2>/dev/null || break
        done
    ) &
    chaos=$!
    sleep "$((RANDOM % 2)).$((RANDOM % 10))"
    sleep 0.2
    kill -9 "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true
    wait "$writer" || { cat "$TMP/writer.log"; fail "round $round: the writer failed"; }
    wait "$chaos" 2>/dev/null || true
    has "connection ended" < "$TMP/writer.log" || { cat "$TMP/writer.log"; fail "round $round: the writer outlived the server"; }
    cp "$TMP/server.log" "$TMP/crashed.log"
    edits=$((edits + $(grep -c "snapshot .* of VDI $v" "$TMP/crashed.log" || true) - 1))
    start_vdinbd
    $M verify "$STATE" "$(uri "$v")" | sed "s/^/round $round: /" || fail "round $round: the disk differs from the model"
    after=$(vdictl vdi-snapshot "uuid=$v")
    vdictl vdi-list-changed-blocks "vdi-from=$before" "vdi-to=$after" > "$TMP/bitmap.b64" || fail "round $round: list_changed_blocks"
    $M cbt "$STATE" "$STATE/before.json" "$TMP/bitmap.b64" | sed "s/^/round $round: /" || fail "round $round: the change log misses changes"
    no_damage "$v" on || fail "round $round: CBT on $v after the kill"
    # The toggled VDI: on or off, as its last finished call left it, and never damaged.
    vdictl vdi-param-list "uuid=$w" --json | $PY -c 'import json,sys; r=json.load(sys.stdin); assert "cbt_disabled_reason" not in r["other_config"], r' \
        || fail "round $round: the toggled VDI's log was damaged"
    vdictl vdi-destroy "uuid=$before"
    vdictl vdi-destroy "uuid=$after"
    # A kill between the chain edits' snapshot and its destroy leaves that snapshot, which
    # pins a layer: 19 such by round 80 of a 100-round run. They go now, so the chain
    # stays short and the collector has merges to do in the next round.
    for s in $(vdictl vdi-list | awk '/^uuid/ {u=$NF} /^name-label/ {n=$NF} /^is-a-snapshot/ && $NF == "true" && n == "crash" {print u}'); do
        vdictl vdi-destroy "uuid=$s"
    done
    # The files hold still while they are checked.
    vdictl sr-param-set other-config:gc=false
    vdictl sr-scan --wait >/dev/null
    for f in "$SR"/*."$FMT"; do check_image "$f" leaks-ok || fail "round $round: check $f"; done
    records_match_files || fail "round $round: files and records disagree"
    vdictl sr-param-remove param-name=other-config param-key=gc
done
vdictl sr-scan --wait | has "running: false" || fail "the collector did not finish"
kill "$SERVER_PID"; wait "$SERVER_PID" || fail "server exit status"
for f in "$SR"/*."$FMT"; do check_image "$f" || fail "check $f after a clean stop"; done
[ "$edits" -gt 0 ] || fail "no snapshot was taken while the writes ran: the chain edits never overlapped them"
echo "$ROUNDS rounds, $edits snapshots taken (and destroyed) while the writes ran"
echo PASS
