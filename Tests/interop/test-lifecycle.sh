#!/usr/bin/env bash
# SIGTERM drains in-flight requests, flushes and exits 0; the data is there after a restart.
# An idle connection is closed after --idle-timeout; the connection limit refuses extras.
. "$(dirname "$0")/functions.sh"
requires nbdsh nbdinfo
start_vdinbd --idle-timeout 2 --max-connections 3
u=$(vdictl vdi-create name-label=t virtual-size=32MiB)
U=$(uri "$u")
# Many writes in flight when SIGTERM arrives: each acknowledged write must survive.
nbdsh -u "$U" -c "
import os, signal, time
bufs = [nbd.Buffer.from_bytearray(bytearray([i + 1]) * (1 << 20)) for i in range(32)]
done = []
for i, b in enumerate(bufs):
    h.aio_pwrite(b, i << 20, completion=lambda err, i=i: (done.append(i) if err.value == 0 else None, 1)[1])
os.kill($SERVER_PID, signal.SIGTERM)
try:
    while h.aio_in_flight() > 0:
        h.poll(-1)
except nbd.Error:
    pass
open('$TMP/acked', 'w').write(' '.join(map(str, done)))
" || true
for _ in $(seq 1 100); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
kill -0 "$SERVER_PID" 2>/dev/null && fail "server did not exit on SIGTERM"
wait "$SERVER_PID"; rc=$?; SERVER_PID=""
[ "$rc" = 0 ] || fail "exit status $rc"
grep -q "draining connections" "$TMP/server.log" || fail "no drain"
mv "$TMP/server.log" "$TMP/server1.log"
start_vdinbd --idle-timeout 2 --max-connections 3
nbdsh -u "$(uri "$u")" -c "
for i in map(int, open('$TMP/acked').read().split()):
    assert h.pread(1 << 20, i << 20) == bytes([i + 1]) * (1 << 20), i
"
[ -s "$TMP/acked" ] || fail "no write was acknowledged before the drain"
echo "acked before exit: $(wc -w < "$TMP/acked") of 32"
# Idle timeout.
$PY - "$PORT" "$(export_name "$u")" <<'PY'
import socket, struct, sys, time
port, name = int(sys.argv[1]), sys.argv[2]
s = socket.create_connection(("127.0.0.1", port)); s.recv(18); s.sendall(struct.pack(">I", 3))
s.sendall(b"IHAVEOPT" + struct.pack(">II", 1, len(name)) + name.encode()); assert len(s.recv(10)) == 10
s.settimeout(10); t = time.time()
assert s.recv(1) == b""; assert 1.5 < time.time() - t < 6, time.time() - t
PY
grep -q "idle timeout" "$TMP/server.log" || fail "no idle timeout"
