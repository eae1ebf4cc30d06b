#!/usr/bin/env bash
# Downgrades under --tls require: a client that skips STARTTLS gets NBD_REP_ERR_TLS_REQD for
# GO and for INFO; one that offers only TLS 1.0/1.1 after STARTTLS fails the TLS handshake;
# one that sends plain NBD bytes where the TLS handshake should be is dropped; and after
# all of them a proper client (nbdinfo, TLS 1.2+) is served.
. "$(dirname "$0")/functions.sh"
requires nbdinfo
CERTS=$TMP/certs
start_vdinbd --tls require --certs "$CERTS"
u=$(vdictl vdi-create name-label=t virtual-size=1MiB)
name=$(export_name "$u")
$PY - "$PORT" "$name" <<'PY'
import socket, ssl, struct, sys
port, name = int(sys.argv[1]), sys.argv[2]
IHAVEOPT, OPT_GO, OPT_INFO, OPT_STARTTLS = 0x49484156454F5054, 7, 6, 5
TLS_REQD = 0x80000005
def exact(s, n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c: raise EOFError("closed")
        b += c
    return b
def start():
    s = socket.create_connection(("127.0.0.1", port)); exact(s, 18); s.sendall(struct.pack(">I", 3)); return s
def option(s, opt, data=b""):
    s.sendall(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)
    _, o, typ, ln = struct.unpack(">QIII", exact(s, 20)); exact(s, ln)
    return typ
n = name.encode()
req = struct.pack(">I", len(n)) + n + struct.pack(">H", 0)
# STARTTLS stripped: every export option is refused with TLS_REQD.
s = start()
assert option(s, OPT_GO, req) == TLS_REQD, "GO without STARTTLS"
assert option(s, OPT_INFO, req) == TLS_REQD, "INFO without STARTTLS"
s.close()
# TLS 1.0/1.1 only.
s = start()
assert option(s, OPT_STARTTLS) == 1, "STARTTLS not acknowledged"
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
ctx.minimum_version = ssl.TLSVersion.TLSv1; ctx.maximum_version = ssl.TLSVersion.TLSv1_1
try:
    ctx.wrap_socket(s).do_handshake()
    raise SystemExit("a TLS 1.1 handshake succeeded")
except (ssl.SSLError, ConnectionResetError, EOFError, OSError) as e:
    print("TLS 1.0/1.1 refused:", type(e).__name__, e)
# Plain NBD where the TLS handshake belongs: dropped, never served.
s = start()
assert option(s, OPT_STARTTLS) == 1
s.sendall(struct.pack(">QII", IHAVEOPT, OPT_GO, len(req)) + req)
s.settimeout(10)
try:
    got = s.recv(4096)
    assert got == b"" or not got.startswith(struct.pack(">Q", 0x3e889045565a9)), "plain NBD answered after STARTTLS: %r" % got[:20]
    print("plain bytes after STARTTLS: %s" % ("closed" if got == b"" else "TLS alert %r" % got[:8]))
except ConnectionResetError:
    print("plain bytes after STARTTLS: reset")
PY
[ $? = 0 ] || fail "downgrade checks"
has "TLS handshake failed" < "$TMP/server.log" || fail "the failed handshakes were not logged"
nbdinfo --size "$(uri "$u")" >/dev/null || fail "a proper client is refused after the downgrade attempts"
echo PASS
