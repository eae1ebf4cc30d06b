#!/usr/bin/env bash
# kill -9 of the server while the collector merges and deletes, ROUNDS times (20 here,
# 100 in Tools/stress): at a chosen step (the n-th copied chunk, a switch, via
# VDINBD_FAULT_GC_STEP) or at a random moment. After each restart every VDI and snapshot
# reads its model over NBD, vhd-check is clean (qemu-img check for qcow2: leaked clusters at
# most, none after the collector), and once the collector has finished
# (`sr-scan --wait`) no file is left that no record needs and nothing is journalled.
. "$(dirname "$0")/functions.sh"
requires nbdsh
ROUNDS=${ROUNDS:-20}
export VDICTL="$VDINBD_BIN/vdictl"
STATE=$TMP/state
start_vdinbd
export SOCK SR
steps=(copy:1 copy:3 copy:6 switch:1 switch:2 copy:2 random random)
for round in $(seq 1 "$ROUNDS"); do
    # Prepare with the collector held off, so the kill lands in its work.
    vdictl sr-param-set other-config:gc=false
    $PY "$(dirname "$0")/coalesce_crash.py" prepare "$STATE" "$round"
    step=${steps[$(( (round - 1) % ${#steps[@]} ))]}
    kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true
    if [ "$step" = random ]; then
        start_vdinbd
        vdictl sr-param-remove param-name=other-config param-key=gc
        sleep "0.$(( RANDOM % 400 ))"
    else
        VDINBD_FAULT_GC_STEP=$step start_vdinbd
        vdictl sr-param-remove param-name=other-config param-key=gc
        for _ in $(seq 1 100); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.05; done
    fi
    kill -9 "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true
    cp "$TMP/server.log" "$TMP/crashed.log"
    start_vdinbd
    export SOCK
    grep -h "recovery:\|VDINBD_FAULT" "$TMP/crashed.log" "$TMP/server.log" | sed "s/^/round $round ($step): /" || true
    $PY "$(dirname "$0")/coalesce_crash.py" verify "$STATE" || fail "round $round ($step): data differs after restart"
    # The files hold still while they are checked: the collector's merge in progress ends
    # (a scan waits for a pass that starts after it) and no other starts.
    vdictl sr-param-set other-config:gc=false
    vdictl sr-scan --wait >/dev/null
    for f in "$SR"/*."$FMT"; do check_image "$f" leaks-ok || fail "round $round: check $f"; done
    vdictl sr-param-remove param-name=other-config param-key=gc
    vdictl sr-scan --wait | has "running: false" || fail "round $round: the collector did not finish"
    $PY "$(dirname "$0")/coalesce_crash.py" verify "$STATE" || fail "round $round ($step): data differs after the collector"
    for f in "$SR"/*."$FMT"; do check_image "$f" || fail "round $round: check $f after the collector"; done
    [ -z "$(ls "$SR/journal")" ] || fail "round $round: journal entries left: $(ls "$SR/journal")"
    records_match_files || fail "round $round: files and records disagree"
done
echo "$ROUNDS rounds"
