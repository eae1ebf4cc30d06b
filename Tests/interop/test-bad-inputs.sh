#!/usr/bin/env bash
# A wrong token, a malformed handshake and a garbage control request each get a clear
# refusal while another client keeps working on the same server.
. "$(dirname "$0")/functions.sh"
requires nbdinfo nbdsh
start_vdinbd
u=$(vdictl vdi-create name-label=t virtual-size=8MiB)
# One token for every connection: the VDI is not sharable, so a second read-write token
# would be refused while the first client is attached.
info=$(vdictl vdi-get-nbd-info "uuid=$u")
U=$(echo "$info" | sed -n 's/^uri: //p')
# A client that stays connected throughout.
export PORT SOCK NAME=$(echo "$info" | sed -n 's/^exportname: //p') LOG=$TMP/server.log URI=$U
nbdsh -u "$U" -c '
import socket, struct, sys, time, json, subprocess, os
h.pwrite(b"A" * 4096, 0)
port = int(os.environ["PORT"]); sock = os.environ["SOCK"]; name = os.environ["NAME"]
# 1. wrong token: GO gets NBD_REP_ERR_UNKNOWN with a reason.
r = subprocess.run(["nbdinfo", "nbd://127.0.0.1:%d//%s%%3Ftoken=wrong" % (port, name.split("?")[0][1:])], capture_output=True, text=True)
assert r.returncode != 0 and "server replied with error to opt_go" in r.stderr, r.stderr
assert "unknown export token" in open(os.environ["LOG"]).read()
# 2. malformed handshake: garbage instead of client flags and options.
s = socket.create_connection(("127.0.0.1", port)); s.recv(18)
s.sendall(b"\x00\x00\x00\x01" + b"garbage-garbage-garbage!" * 4)
s.settimeout(5)
assert s.recv(4096) == b"", "server kept a garbage handshake open"
s.close()
# 3. garbage on the control socket: a JSON-RPC parse error, and the connection stays usable.
c = socket.socket(socket.AF_UNIX); c.connect(sock); f = c.makefile("rwb")
f.write(b"{this is not json\n"); f.flush()
e = json.loads(f.readline()); assert e["error"]["code"] == -32700, e
f.write(b"{\"jsonrpc\":\"2.0\",\"method\":\"VDI.get_all\",\"params\":[],\"id\":7}\n"); f.flush()
ok = json.loads(f.readline()); assert ok["id"] == 7 and ok["result"], ok
# 4. a malformed request header in transmission: that client alone is disconnected.
s = socket.create_connection(("127.0.0.1", port)); s.recv(18)
s.sendall(struct.pack(">I", 3))  # fixed newstyle, no zeroes
s.sendall(b"IHAVEOPT" + struct.pack(">II", 1, len(name)) + name.encode())  # NBD_OPT_EXPORT_NAME
hdr = s.recv(10); assert len(hdr) == 10, hdr
s.sendall(b"\xde\xad\xbe\xef" + bytes(24))
s.settimeout(5)
assert s.recv(4096) == b"", "server kept a client with a bad request magic"
# 5. a WRITE larger than the advertised maximum: EINVAL once its payload is in, and the
#    connection stays framed and usable.
g = nbd.NBD(); g.set_strict_mode(0); g.connect_uri(os.environ["URI"])
try:
    g.pwrite(b"z" * (33 << 20), 0); raise SystemExit("oversized write accepted")
except nbd.Error as e:
    assert e.errnum == 22, e
assert g.pread(4096, 0) == b"A" * 4096
g.shutdown()
# The first client still works.
assert h.pread(4096, 0) == b"A" * 4096
h.pwrite(b"B" * 512, 8192); assert h.pread(512, 8192) == b"B" * 512
' || fail "bad input handling"
