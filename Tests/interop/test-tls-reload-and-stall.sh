#!/usr/bin/env bash
# SIGHUP reloads certificates for new sessions without dropping a connected client; a
# client stalled mid-handshake times out and frees its slot; --tls on also accepts plain.
. "$(dirname "$0")/functions.sh"
requires nbdsh nbdinfo certtool
CERTS=$TMP/certs
start_vdinbd --tls on --certs "$CERTS" --tls-hostname first.test --handshake-timeout 2 --max-connections 2
u=$(vdictl vdi-create name-label=t virtual-size=1MiB)
name=$(export_name "$u"); enc=${name/\?/%3F}
# --tls on: a plain client is served too.
nbdinfo "nbd://127.0.0.1:$PORT/$enc" | has "without TLS" || fail "plain client refused under --tls on"
vdictl vdi-get-nbd-info "uuid=$u" --json | $PY -c 'import json,sys; assert json.load(sys.stdin)[0]["subject"] == "first.test"'
# A TLS client stays connected across the reload.
mkfifo "$TMP/go"
nbdsh -c "
h.set_uri_allow_local_file(True)
h.connect_uri('nbds://127.0.0.1:$PORT/$enc?tls-certificates=$CERTS')
h.pwrite(b'x' * 512, 0)
open('$TMP/go').read()
assert h.pread(512, 0) == b'x' * 512
" &
client=$!
sleep 1
# New material: a new CA and server certificate with another host name.
new_certs "$TMP/new" second.test
cp "$TMP/new/ca-cert.pem" "$TMP/new/server-cert.pem" "$TMP/new/server-key.pem" "$CERTS/"
kill -HUP "$SERVER_PID"
sleep 0.5
grep -q "reloaded TLS credentials" "$TMP/server.log" || fail "no reload"
vdictl vdi-get-nbd-info "uuid=$u" --json | $PY -c 'import json,sys; assert json.load(sys.stdin)[0]["subject"] == "second.test"'
nbdinfo "nbds://127.0.0.1:$PORT/$enc?tls-certificates=$CERTS" >/dev/null || fail "new certificate not served"
timeout 10 sh -c "echo go > '$TMP/go'" || fail "client did not survive to the reload"
wait "$client" || fail "connected client broke across the reload"
# Two stalled clients fill both slots, then time out; a third client then gets in.
$PY - "$PORT" <<'PY'
import socket, struct, sys, time
port = int(sys.argv[1]); stalled = []
def greeted():
    # The server notices the earlier clients' closes asynchronously; until it has, the
    # connection limit refuses us (closed without a greeting), so try again briefly.
    for _ in range(50):
        s = socket.create_connection(("127.0.0.1", port))
        try:
            if len(s.recv(18, socket.MSG_WAITALL)) == 18:
                return s
        except ConnectionResetError:
            pass
        s.close(); time.sleep(0.1)
    raise SystemExit("no slot for a new client")
for _ in range(2):
    s = greeted(); s.sendall(struct.pack(">I", 1))
    s.sendall(b"IHAVEOPT" + struct.pack(">II", 5, 0)); s.recv(20)   # STARTTLS acked, then silence
    stalled.append(s)
time.sleep(3)
for s in stalled:
    s.settimeout(2)
    try:
        assert s.recv(1) == b"", "stalled client still connected"
    except ConnectionResetError:
        pass
PY
grep -q "handshake timed out" "$TMP/server.log" || fail "no timeout"
nbdinfo "nbds://127.0.0.1:$PORT/$enc?tls-certificates=$CERTS" >/dev/null || fail "slot not freed"
