#!/usr/bin/env bash
# The collector's switches and the task API, over the control socket (JSON-RPC, as a
# XenAPI client speaks it) and vdictl: a snapshot at chain depth 30 fails with
# SR_BACKEND_FAILURE_109 and changes nothing; SR other-config:gc=false stops merging and
# sr-gc-status lists the pending VDI; VDI other-config:leaf-coalesce=false keeps a leaf's
# chain; an Async.SR.scan waiting for a rate-limited merge is a task that task-list shows,
# task-cancel cancels, and Task.destroy forgets; other requests are served meanwhile.
. "$(dirname "$0")/functions.sh"
requires nbdcopy
start_vdinbd
export VDICTL="$VDINBD_BIN/vdictl" SOCK SR
vdictl sr-param-set other-config:gc=false
u=$(vdictl vdi-create name-label=deep virtual-size=4MiB)
for i in $(seq 1 29); do vdictl vdi-snapshot "uuid=$u" >/dev/null; done
vdictl vdi-param-list "uuid=$u" | has "chain-depth: 30" || fail "depth should be 30"
before=$(ls "$SR" | sort | md5sum)
out=$(vdictl vdi-snapshot "uuid=$u" 2>&1) && fail "a snapshot at depth 30 must fail"
echo "$out" | has "SR_BACKEND_FAILURE_109" || fail "wrong error: $out"
echo "$out" | has "The snapshot chain is too long" || fail "wrong message: $out"
[ "$(ls "$SR" | sort | md5sum)" = "$before" ] || fail "the refused snapshot changed files"
vdictl sr-gc-status | has "enabled: false" || fail "gc=false not reported"
# Destroy every snapshot: with gc=false nothing merges, and the VDI is pending.
for s in $(vdictl vdi-list --json | $PY -c 'import json,sys; print(" ".join(r["uuid"] for r in json.load(sys.stdin).values() if r["is_a_snapshot"]))'); do
    vdictl vdi-destroy "uuid=$s"
done
vdictl sr-scan --wait | has "^gc-status:.*pending:.*$u" || fail "the VDI should be pending while gc=false"
vdictl vdi-param-list "uuid=$u" | has "chain-depth: 30" || fail "gc=false must keep the chain"
# leaf-coalesce=false: bases above are merged, the leaf's own parent is kept.
vdictl vdi-param-set "uuid=$u" other-config:leaf-coalesce=false
vdictl sr-param-remove param-name=other-config param-key=gc
vdictl sr-scan --wait >/dev/null
vdictl vdi-param-list "uuid=$u" | has "chain-depth: 2" || fail "leaf-coalesce=false: expected depth 2, got $(vdictl vdi-param-list uuid=$u | grep sm-config)"
vdictl vdi-param-remove "uuid=$u" param-name=other-config param-key=leaf-coalesce
vdictl sr-scan --wait >/dev/null
vdictl vdi-param-list "uuid=$u" | has "chain-depth: 1" || fail "expected one file after the leaf merge"
# A slow merge (1 MiB/s) and a task waiting for it.
w=$(vdictl vdi-create name-label=slow virtual-size=32MiB)
ws=$(vdictl vdi-snapshot "uuid=$w")
head -c 32M /dev/urandom > "$TMP/d.raw"
nbdcopy "$TMP/d.raw" "$(uri "$w")"  # into the leaf, over the snapshot's base
vdictl sr-param-set other-config:gc-rate-limit=1
vdictl vdi-destroy "uuid=$ws"
$PY - <<'PY'
import json, os, socket, subprocess, time
def call(method, *params):
    s = socket.socket(socket.AF_UNIX); s.connect(os.environ["SOCK"])
    s.sendall((json.dumps({"jsonrpc": "2.0", "method": method, "params": list(params), "id": 1}) + "\n").encode())
    buf = b""
    while not buf.endswith(b"\n"): buf += s.recv(65536)
    s.close()
    r = json.loads(buf)
    if r.get("error"): raise RuntimeError(r["error"])
    return r["result"]
def ctl(*a): return subprocess.run([os.environ["VDICTL"], "--socket", os.environ["SOCK"], *a], check=True, capture_output=True, text=True).stdout
task = call("Async.SR.scan", "OpaqueRef:sr", {"wait": True})
rec = call("Task.get_record", task)
assert rec["status"] == "pending" and rec["name_label"] == "SR.scan", rec
# The control socket serves others while the task waits.
t0 = time.time(); call("VDI.get_all"); assert time.time() - t0 < 2
assert call("SR.get_gc_status", "")["running"] is True
assert task in ctl("task-list")
out = ctl("task-param-list", "uuid=" + task); assert "status: pending" in out, out
try:
    call("Task.destroy", task); raise SystemExit("destroying a running task must fail")
except RuntimeError as e: assert "OPERATION_NOT_ALLOWED" in str(e), e
ctl("task-cancel", "uuid=" + task)
for _ in range(100):
    rec = call("Task.get_record", task)
    if rec["status"] != "cancelling": break
    time.sleep(0.1)
assert rec["status"] == "cancelled", rec
assert rec["error_info"][0] == "TASK_CANCELLED", rec
call("Task.destroy", task)
try:
    call("Task.get_record", task); raise SystemExit("a destroyed task must be gone")
except RuntimeError as e: assert "HANDLE_INVALID" in str(e), e
# Async of a quick call: its result is the call's, JSON-encoded.
t = call("Async.VDI.get_all")
for _ in range(100):
    rec = call("Task.get_record", t)
    if rec["status"] != "pending": break
    time.sleep(0.05)
assert rec["status"] == "success" and json.loads(rec["result"]) == call("VDI.get_all"), rec
PY
vdictl sr-param-remove param-name=other-config param-key=gc-rate-limit
vdictl sr-scan --wait >/dev/null
vdictl vdi-param-list "uuid=$w" | has "chain-depth: 1" || fail "the slow merge should finish"
nbdcopy "$(uri "$w")" "$TMP/back.raw"
cmp "$TMP/d.raw" "$TMP/back.raw" || fail "data differs after the merge"
