#!/usr/bin/env bash
# Snapshots and CBT changes race with python nbd clients that attach, write and detach in
# a tight loop: every operation succeeds, every snapshot is a point-in-time image of the
# writes (a cut between the ones finished before and the ones started after), and the
# server holds no more descriptors afterwards than before (once the last connection's
# chain has stopped lingering).
. "$(dirname "$0")/functions.sh"
requires nbdsh
start_vdinbd --attach-linger 0.5
u=$(vdictl vdi-create name-label=t virtual-size=4MiB)
U=$(uri "$u")
fds() { ls "/proc/$SERVER_PID/fd" | wc -l; }
before=$(fds)
$PY - "$U" "$VDINBD_BIN/vdictl" "$SOCK" "$u" <<'PY'
import nbd, struct, subprocess, sys, threading, time
uri, vdictl, sock, u = sys.argv[1:]
SLOTS, SLOT = 16, 4096
def ctl(*args):
    return subprocess.run([vdictl, "--socket", sock, *args], check=True, timeout=30,
                          capture_output=True, text=True).stdout.strip()

done = [0]        # writes acknowledged and their connection closed
started = [0]     # writes whose connection has begun
stop = threading.Event()
failure = []
def writer():
    try:
        write_loop()
    except BaseException as e:
        failure.append(e)
def write_loop():
    n = 1
    while not stop.is_set():
        started[0] = n
        h = nbd.NBD()
        h.connect_uri(uri)
        h.pwrite(struct.pack(">Q", n) * (SLOT // 8), (n % SLOTS) * SLOT)
        if n % 2:
            h.shutdown()    # NBD_CMD_DISC: the server detaches before it closes
        del h               # otherwise the socket just closes, as when nbdsh exits
        done[0] = n
        n += 1
t = threading.Thread(target=writer, daemon=True); t.start()

snaps = []
# 29 snapshots kept: the chain reaches depth 30, the most XenServer allows.
for i in range(29):
    a = done[0]
    if i % 3 == 1:
        ctl("vdi-enable-cbt", "uuid=" + u)
    elif i % 3 == 2:
        ctl("vdi-disable-cbt", "uuid=" + u)
    s = ctl("vdi-snapshot", "uuid=" + u)
    snaps.append((s, a, started[0]))
stop.set(); t.join()
assert not failure, "writer: %r" % failure
assert done[0] > 30, "the writer made too little progress: %d" % done[0]

def content(vdi):
    info = ctl("vdi-get-nbd-info", "uuid=" + vdi)
    su = [l[5:] for l in info.splitlines() if l.startswith("uri: ")][0]
    h = nbd.NBD(); h.connect_uri(su)
    vals = []
    for k in range(SLOTS):
        b = h.pread(SLOT, k * SLOT)
        v = struct.unpack(">Q", b[:8])[0]
        assert b == b[:8] * (SLOT // 8), "slot %d torn" % k
        vals.append(v)
    h.shutdown(); del h
    return vals

def image_at(cut):
    # The state after writes 1..cut-1.
    vals = [0] * SLOTS
    for n in range(1, cut):
        vals[n % SLOTS] = n
    return vals

for s, a, b in snaps:
    got = content(s)
    ok = any(image_at(c) == got for c in range(a + 1, b + 2))
    assert ok, "snapshot %s is no point-in-time image between writes %d and %d: %s" % (s, a, b, got)
assert content(u) == image_at(done[0] + 1), "the VDI lost a write"
print("writes:", done[0], "snapshots:", len(snaps))
PY
sleep 1.5
after=$(fds)
[ "$after" -le "$((before + 2))" ] || fail "descriptors: $before before, $after after"
