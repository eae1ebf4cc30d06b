#!/usr/bin/env bash
# --max-connections-per-export and --max-connections-per-token: one connection past a
# limit is refused at NBD_OPT_GO with NBD_REP_ERR_POLICY and a message naming the limit
# (libnbd shows it), never a silent close; a closed connection makes room again; other
# VDIs are not affected.
. "$(dirname "$0")/functions.sh"
requires nbdsh
start_vdinbd --max-connections-per-export 3 --max-connections-per-token 2
a=$(vdictl vdi-create name-label=a virtual-size=1MiB sharable=true)
b=$(vdictl vdi-create name-label=b virtual-size=1MiB)
$PY - "$(uri "$a")" "$(uri "$a")" "$(uri "$b")" <<'PY'
import sys, nbd
t1, t2, other = sys.argv[1:4]
def conn(u):
    h = nbd.NBD(); h.connect_uri(u); return h
def refused(u, words):
    try:
        conn(u)
    except nbd.Error as e:
        assert "policy" in str(e).lower() or "not permitted" in str(e).lower() or words in str(e), e
        return str(e)
    raise AssertionError("a connection past the limit was accepted")
x1, x2 = conn(t1), conn(t1)
refused(t1, "per token")                 # a third through one token
y1 = conn(t2)                            # another token: the export's third
refused(t2, "per export")                # the export's fourth
z = [conn(other) for _ in range(2)]      # another VDI has its own count
x1.pread(512, 0); y1.pread(512, 0)       # the ones let in work
x1.shutdown()
import time
for _ in range(40):                      # room again, once the server has seen the close
    try:
        y2 = conn(t2); break
    except nbd.Error:
        time.sleep(0.05)
else:
    raise AssertionError("a closed connection did not make room")
y2.pread(512, 0)
for h in [x2, y1, y2] + z: h.shutdown()
PY
has "most the server allows per token (--max-connections-per-token)" < "$TMP/server.log" || fail "the per-token refusal is not logged with its reason"
has "most the server allows per export (--max-connections-per-export)" < "$TMP/server.log" || fail "the per-export refusal is not logged with its reason"
echo PASS
