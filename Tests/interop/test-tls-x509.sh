#!/usr/bin/env bash
# TLS required by default: certificates are generated on first run; nbdinfo/nbdcopy and
# qemu-img connect with the CA; a plain client is refused with NBD_REP_ERR_TLS_REQD; the
# get_nbd_info record's cert and subject alone verify the server for a TLS-1.2-only
# Python ssl client.
. "$(dirname "$0")/functions.sh"
requires nbdinfo nbdcopy qemu-img
CERTS=$TMP/certs
start_vdinbd --tls require --certs "$CERTS" --tls-hostname vdinbd.test
for f in ca-cert.pem server-cert.pem server-key.pem; do [ -f "$CERTS/$f" ] || fail "$f not generated"; done
[ "$(stat -c %a "$CERTS/server-key.pem")" = 600 ] || fail "key file mode"
u=$(vdictl vdi-create name-label=t virtual-size=8MiB)
U=$(uri "$u")
case "$U" in nbds://*) ;; *) fail "uri is not nbds: $U" ;; esac
# The uri works as printed: it names the CA directory (absolute), as libnbd wants it.
case "$U" in *"?tls-certificates=$(cd "$CERTS" && pwd)") ;; *) fail "uri does not carry tls-certificates=<certs dir>: $U" ;; esac
nbdinfo --json "$U" | $PY -c 'import json,sys; assert json.load(sys.stdin)["exports"][0]["export-size"] == 8 << 20'
head -c 8M /dev/urandom > "$TMP/in.raw"
nbdcopy "$TMP/in.raw" "$U"
nbdcopy "$U" "$TMP/out.raw"
# The start-up banner says how to attach without options nbdinfo 1.14 lacks.
grep -q -- "--tls-certificates" "$TMP/server.log" && fail "the banner still suggests nbdinfo --tls-certificates"
cmp "$TMP/in.raw" "$TMP/out.raw" || fail "TLS round trip differs"
# qemu with its x509 credentials object.
name=$(export_name "$u")
qemu-img info --object "tls-creds-x509,id=tls0,dir=$CERTS,endpoint=client" \
    --image-opts "driver=nbd,host=127.0.0.1,port=$PORT,export=$name,tls-creds=tls0" | has "virtual size: 8 MiB" \
    || fail "qemu-img over TLS"
# A plain client is refused.
if nbdinfo "nbd://127.0.0.1:$PORT/${U#*$PORT/}" > "$TMP/plain" 2>&1; then fail "plain client accepted"; fi
grep -q "NBD_REP_ERR_TLS_REQD" "$TMP/server.log" || fail "no TLS_REQD in the log"
# A client that pins get_nbd_info's cert and checks subject, speaking TLS 1.2 only.
vdictl vdi-get-nbd-info "uuid=$u" --json > "$TMP/info.json"
$PY - "$TMP/info.json" <<'PY'
import json, socket, ssl, struct, sys
rec = json.load(open(sys.argv[1]))[0]
assert rec["subject"] == "vdinbd.test", rec["subject"]
assert "BEGIN CERTIFICATE" in rec["cert"]
s = socket.create_connection((rec["address"], rec["port"]))
hello = s.recv(18); assert hello[:8] == b"NBDMAGIC"
s.sendall(struct.pack(">I", 1))
s.sendall(b"IHAVEOPT" + struct.pack(">II", 5, 0))  # NBD_OPT_STARTTLS
rep = s.recv(20); assert struct.unpack(">QIII", rep)[2] == 1, rep  # NBD_REP_ACK
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_2
ctx.load_verify_locations(cadata=rec["cert"])
t = ctx.wrap_socket(s, server_hostname=rec["subject"])
assert t.version() == "TLSv1.2", t.version()
name = rec["exportname"].encode()
t.sendall(b"IHAVEOPT" + struct.pack(">II", 7, 4 + len(name) + 2) + struct.pack(">I", len(name)) + name + b"\0\0")
magic, opt, typ, ln = struct.unpack(">QIII", t.recv(20))
assert typ == 3, typ  # NBD_REP_INFO
# A wrong host name is refused by the client.
s2 = socket.create_connection((rec["address"], rec["port"])); s2.recv(18); s2.sendall(struct.pack(">I", 1))
s2.sendall(b"IHAVEOPT" + struct.pack(">II", 5, 0)); s2.recv(20)
try:
    ctx.wrap_socket(s2, server_hostname="wrong.example")
    raise SystemExit("wrong host accepted")
except ssl.SSLCertVerificationError:
    pass
PY
