#!/usr/bin/env bash
# The control socket: mode 0600, and on top of it a peer-credentials check (SO_PEERCRED):
# a process of a uid not allowed (nobody, given a socket opened up to everyone by hand)
# gets one JSON-RPC "Permission denied" naming its uid and the allowed ones, and is
# logged; with --control-allow-uid for it, the same request works. A request line over the
# limit (1 MiB) is refused without the server reading it whole, and the server serves on.
. "$(dirname "$0")/functions.sh"
requires setpriv
[ "$(id -u)" = 0 ] || { echo "SKIP: needs root to act as another uid"; exit 77; }
# A directory another uid can reach: the socket's own mode and SO_PEERCRED are the test.
chmod 711 "$TMP"; PUB=$TMP/pub; mkdir -m 755 "$PUB"
start_vdinbd --control-socket "$PUB/control.sock"
[ "$(stat -c %a "$SOCK")" = 600 ] || fail "the control socket's mode is $(stat -c %a "$SOCK")"
chmod 666 "$SOCK"
ask_as_nobody() {
    setpriv --reuid=65534 --regid=65534 --clear-groups /usr/bin/python3 - "$SOCK" <<'PY'
import socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
s.sendall(b'{"jsonrpc":"2.0","method":"SR.get_all","params":[],"id":1}\n')
out = b""
while not out.endswith(b"\n"):
    c = s.recv(65536)
    if not c: break
    out += c
print(out.decode().strip())
PY
}
ask_as_nobody > "$TMP/nobody.out" || fail "nobody's client failed: $(cat "$TMP/nobody.out")"
has '"Permission denied"' < "$TMP/nobody.out" || fail "nobody was not refused: $(cat "$TMP/nobody.out")"
has "uid 65534" < "$TMP/nobody.out" || fail "the refusal does not name the uid: $(cat "$TMP/nobody.out")"
has "control: refused a client: uid 65534" < "$TMP/server.log" || fail "the refusal was not logged"
vdictl sr-list | has "uuid: " || fail "root's vdictl no longer works"
# An oversized request line: refused, the connection closed, the server unharmed.
$PY - "$SOCK" <<'PY' || fail "the oversized request"
import socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
try:
    for _ in range(64): s.sendall(b"x" * 65536)
except (BrokenPipeError, ConnectionResetError):
    pass
out = s.recv(65536)
assert b"longer than" in out, out
PY
vdictl sr-list | has "uuid: " || fail "the server stopped serving after an oversized request"
kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true
start_vdinbd --control-socket "$PUB/control.sock" --control-allow-uid 0 --control-allow-uid 65534
chmod 666 "$SOCK"
ask_as_nobody > "$TMP/nobody.out" || fail "nobody's client failed"
has '"result"' < "$TMP/nobody.out" || fail "an allowed uid was refused: $(cat "$TMP/nobody.out")"
echo PASS
