#!/usr/bin/env bash
# A client that sends thousands of requests back to back, reading replies as they come
# (pipeline_client.py, written from the protocol document): the server's CPU per request
# stays flat from 4,000 to 32,000 queued writes, the input it holds stays under its bound,
# a flood of reads whose replies the client is slow to take does not grow the server's
# memory, and every byte reads back right, over TCP and TLS, with simple, structured and
# extended replies.
. "$(dirname "$0")/functions.sh"
requires nbdcopy
CERTS=$TMP/certs
start_vdinbd --tls on --certs "$CERTS"
u=$(vdictl vdi-create name-label=t virtual-size=64MiB)
name=$(export_name "$u")
client() { $PY "$(dirname "$0")/pipeline_client.py" 127.0.0.1 "$PORT" "$name" --pid "$SERVER_PID" --json "$@"; }

# Cost per request at two backlogs, measured in one run. Before input payloads owned their
# storage, each request copied all input queued behind it: 8,000 writes cost 35x what
# 2,000 did per request, and 32,000 took minutes.
client --count 4000 --size 1024 --op write > "$TMP/small.json"
client --count 32000 --size 1024 --op write > "$TMP/large.json"
$PY - "$TMP/small.json" "$TMP/large.json" <<'PY' || fail "cost per request grows with the backlog"
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:])
# CPU is counted in 10 ms ticks: give the small run at least one.
per = lambda r: max(r["server_cpu_seconds"], 0.01) / r["count"]
ratio = per(b) / per(a)
print("server CPU per request: %.1f us at 4,000 queued, %.1f us at 32,000 (ratio %.2f); wall %.2f s, %.2f s"
      % (per(a) * 1e6, per(b) * 1e6, ratio, a["seconds"], b["seconds"]))
assert ratio < 2.5, ratio
PY

# The input held is the read buffer (256 KiB) and a partial header plus the write being
# gathered (1 KiB here), never the backlog.
held=$(sed -n 's/.*closing: .*(at most \([0-9]*\) bytes of input held).*/\1/p' "$TMP/server.log" | sort -n | tail -1)
[ -n "$held" ] || fail "no input figure in the close log lines"
[ "$held" -le $((256 * 1024 + 64 + 1024)) ] || fail "held $held bytes of input"

# 65,536 reads of 4 KiB sent at once: replies queue for the socket only up to the limit,
# then the server stops taking requests until the client reads.
client --count 65536 --size 4096 --op read > "$TMP/reads.json"
$PY - "$TMP/reads.json" <<'PY' || fail "reads in flood"
import json, sys
r = json.load(open(sys.argv[1]))
print("65,536 pipelined 4 KiB reads: %.2f s, server CPU %.2f s, peak RSS %.1f MiB" % (r["seconds"], r["server_cpu_seconds"], r["server_peak_rss_mib"]))
assert r["server_peak_rss_mib"] < 120, r
PY

# Every write lands where it was sent, whichever framing and transport: a write pass,
# then a verify pass reading each block back.
for mode in simple structured extended; do
    for tls in "" "--tls $CERTS/ca-cert.pem"; do
        # shellcheck disable=SC2086
        client --count 16384 --size 3000 --op write --replies "$mode" $tls >/dev/null || fail "write pass, $mode $tls"
        # shellcheck disable=SC2086
        client --count 16384 --size 3000 --op verify --replies "$mode" $tls >/dev/null || fail "verify pass, $mode $tls"
    done
done
# And a real client reads back what the pipelined writes put there.
U=$(uri "$u")   # with TLS on, the uri names the CA directory itself
nbdcopy "$U" "$TMP/out.raw"
$PY - "$TMP/out.raw" <<'PY' || fail "nbdcopy read back differs from the pipelined writes"
import struct, sys
data = open(sys.argv[1], "rb").read()
for i in range(16384):
    assert data[i * 3000:(i + 1) * 3000] == struct.pack(">Q", i) * 375, i
PY
echo ok
