#!/usr/bin/env bash
# Overlay attachments and attachment rules, with python nbd and nbdcopy:
#  - scratch views of a snapshot (mode=scratch): writable, independent of each other, the
#    snapshot's bytes unchanged after, no overlay left after the attachment or a kill -9;
#  - on_boot=reset: three read-write attachments each start from the recorded state;
#  - a VDI that is not sharable has one read-write attachment (a second token's GO is
#    refused with the reason; read-only tokens and one token's many connections are not);
#  - the record lists the attachments; revoking a token closes its connections.
. "$(dirname "$0")/functions.sh"
requires nbdcopy nbdinfo
start_vdinbd
export VDICTL="$VDINBD_BIN/vdictl" SOCK SR
run_py() {
$PY - "$@" <<'PY'
import glob, json, os, random, subprocess, sys, time
import nbd
def ctl(*a):
    return subprocess.run([os.environ["VDICTL"], "--socket", os.environ["SOCK"], *a], check=True, capture_output=True, text=True).stdout.strip()
def fails(*a):
    r = subprocess.run([os.environ["VDICTL"], "--socket", os.environ["SOCK"], *a], capture_output=True, text=True)
    assert r.returncode != 0, a
    return r.stderr
def info(u, **opts):
    return json.loads(ctl("vdi-get-nbd-info", "uuid=" + u, "--json", *["%s=%s" % kv for kv in opts.items()]))[0]
def connect(i):
    h = nbd.NBD(); h.set_export_name(i["exportname"]); h.connect_tcp(i["address"], str(i["port"])); return h
def uri(i): return "nbd://%s:%s/%s" % (i["address"], i["port"], i["exportname"].lstrip("/").replace("?", "%3F"))
overlays = lambda: glob.glob(os.path.join(os.environ["SR"], "*.overlay-*"))
SIZE = 16 << 20
phase = sys.argv[1]
if phase == "one":
    a = ctl("vdi-create", "name-label=a", "virtual-size=16MiB")
    base = os.urandom(SIZE)
    h = connect(info(a)); h.pwrite(base, 0); h.flush(); h.shutdown()
    s = ctl("vdi-snapshot", "uuid=" + a)
    # Two scratch views of the snapshot: each writable, neither sees the other.
    i1, i2 = info(s, mode="scratch", label="appliance-1"), info(s, mode="scratch")
    h1, h2 = connect(i1), connect(i2)
    assert not h1.is_read_only() and not h2.is_read_only()
    h1.pwrite(b"1" * 65536, 0); h2.pwrite(b"2" * 65536, 4096)
    assert h1.pread(65536, 0) == b"1" * 65536 and h2.pread(4096, 0) == base[:4096]
    assert len(overlays()) == 2, overlays()
    rec = json.loads(ctl("vdi-param-list", "uuid=" + s, "--json"))
    assert rec["currently_attached"] is True and {x["token"] for x in rec["nbd_attachments"]} >= {"appliance-1"}, rec
    assert all(x["mode"] == "scratch" for x in rec["nbd_attachments"]), rec
    # nbdcopy writes a whole disk into a scratch view; the snapshot stays as it was.
    open(os.environ["TMP"] + "/junk", "wb").write(os.urandom(SIZE))
    subprocess.run(["nbdcopy", os.environ["TMP"] + "/junk", uri(info(s, mode="scratch"))], check=True)
    assert "VDI_IN_USE" in fails("vdi-destroy", "uuid=" + s)
    h1.shutdown(); h2.shutdown()
    for _ in range(50):
        if not overlays(): break
        time.sleep(0.1)
    assert not overlays(), overlays()
    ro = connect(info(s)); assert ro.pread(SIZE, 0) == base, "a scratch write reached the snapshot"; ro.shutdown()
    # Left open for the kill -9 that follows.
    keep = connect(info(s, mode="scratch")); keep.pwrite(b"k" * 4096, 0)
    assert len(overlays()) == 1
    open(os.environ["TMP"] + "/ids", "w").write(json.dumps({"a": a, "s": s}))
    open(os.environ["TMP"] + "/base", "wb").write(base)
    os.kill(int(os.environ["SERVER_PID"]), 9)
    print("ok one")
else:
    ids = json.load(open(os.environ["TMP"] + "/ids")); a, s = ids["a"], ids["s"]
    base = open(os.environ["TMP"] + "/base", "rb").read()
    assert not overlays(), ("an overlay outlived its attachment's process", overlays())
    ro = connect(info(s)); assert ro.pread(SIZE, 0) == base; ro.shutdown()
    # on_boot=reset: each read-write attachment starts from the state recorded at set time.
    h = connect(info(a)); h.pwrite(b"r" * 65536, 0); h.flush(); h.shutdown()
    recorded = b"r" * 65536 + base[65536:]
    time.sleep(0.2)
    ctl("vdi-param-set", "uuid=" + a, "on-boot=reset")
    assert "VDI_ON_BOOT_MODE_INCOMPATIBLE_WITH_OPERATION" in fails("vdi-enable-cbt", "uuid=" + a)
    for n in range(3):
        h = connect(info(a))
        assert h.pread(SIZE, 0) == recorded, "attachment %d did not start from the recorded state" % n
        h.pwrite(bytes([n + 1]) * SIZE, 0)
        assert h.pread(4096, 0) == bytes([n + 1]) * 4096
        h.shutdown()
        time.sleep(0.2)
    assert not overlays()
    # A snapshot of a reset VDI holds the recorded state (what the next attachment sees).
    rs = ctl("vdi-snapshot", "uuid=" + a)
    hr = connect(info(rs)); assert hr.pread(SIZE, 0) == recorded; hr.shutdown()
    h = connect(info(a)); assert h.pread(SIZE, 0) == recorded; h.pwrite(b"z" * 512, 0); h.shutdown()
    time.sleep(0.2)
    ctl("vdi-param-set", "uuid=" + a, "on-boot=persist")
    h = connect(info(a)); assert h.pread(SIZE, 0) == recorded; h.shutdown()
    time.sleep(0.2)
    # One read-write attachment unless sharable.
    t1 = info(a, label="first")
    h1 = connect(t1); h1b = connect(t1)                  # one token, two connections: one attachment
    try:
        connect(info(a)); raise SystemExit("a second read-write attachment was allowed")
    except nbd.Error as e:
        assert "policy" in str(e).lower(), e
    # The refusal's message says why (libnbd shows it in its debug output).
    d = subprocess.run(["nbdinfo", uri(info(a))], env=dict(os.environ, LIBNBD_DEBUG="1"), capture_output=True, text=True)
    assert d.returncode != 0 and "not sharable" in d.stderr and "first" in d.stderr, d.stderr[-2000:]
    r = connect(info(a, **{"read-only": "true"})); r.pread(512, 0)   # read-only: allowed
    rec = json.loads(ctl("vdi-param-list", "uuid=" + a, "--json"))
    first = [x for x in rec["nbd_attachments"] if x["token"] == "first"]
    assert first and first[0]["connections"] == 2 and first[0]["read_only"] is False, rec["nbd_attachments"]
    ctl("vdi-param-set", "uuid=" + a, "sharable=true")
    h3 = connect(info(a)); h3.pread(512, 0); h3.shutdown()
    # Revoking a token closes its connections within a second.
    import socket
    s_ = socket.socket(socket.AF_UNIX); s_.connect(os.environ["SOCK"])
    s_.sendall((json.dumps({"jsonrpc": "2.0", "method": "VDI.revoke_nbd_info", "params": [a, t1["exportname"]], "id": 1}) + "\n").encode())
    s_.recv(65536); s_.close()
    t0 = time.time(); closed = 0
    for hh in (h1, h1b):
        while time.time() - t0 < 2:
            try: hh.pread(512, 0); time.sleep(0.05)
            except nbd.Error: closed += 1; break
    assert closed == 2 and time.time() - t0 < 1.5, ("revoked connections still served", closed, time.time() - t0)
    r.pread(512, 0); r.shutdown()
    print("ok two")
PY
}
SERVER_PID=$SERVER_PID TMP=$TMP run_py one
wait "$SERVER_PID" 2>/dev/null || true
start_vdinbd
SERVER_PID=$SERVER_PID TMP=$TMP run_py two
