#!/usr/bin/env bash
# 1,000 hostile connections over 10 s (hostile_clients.py: garbage, handshakes cut short,
# a 4 GiB option length, bad option magic, a request before any option, RST closes, TLS
# handshakes left half done, and 200 stalls held open throughout, plain and after
# STARTTLS) while a good client reads a VDI with libnbd. The good client sees no error and
# keeps reading; the server's log grows by a few lines a second, not a line per
# connection; afterwards its descriptor count is back to where it was and its RSS near
# it, and a new client is served. The throughput ratio is printed (Tools/bench
# --only-hostile measures it; a timed test does not judge it).
. "$(dirname "$0")/functions.sh"
requires nbdsh
N=${HOSTILE_CONNECTIONS:-1000}
start_vdinbd --tls on --certs "$TMP/certs"
v=$(vdictl vdi-create name-label=h virtual-size=256MiB)
U=$(vdictl vdi-get-nbd-info "uuid=$v" | sed -n 's/^exportname: //p')
good() {  # SECONDS -> MiB/s
    $PY - "$PORT" "$U" "$1" <<'PY'
import nbd, sys, time
h = nbd.NBD(); h.set_export_name(sys.argv[2]); h.set_tls(nbd.TLS_DISABLE); h.connect_tcp("127.0.0.1", sys.argv[1])
h.pwrite(b"\x5a" * (1 << 20), 0)
end = time.time() + float(sys.argv[3]); n = 0; off = 0
while time.time() < end:
    d = h.pread(1 << 20, off)
    assert off != 0 or d[:4] == b"\x5a" * 4, "wrong bytes"
    off = (off + (1 << 20)) % (256 << 20); n += 1
print("%.0f" % (n / float(sys.argv[3])))
h.shutdown()
PY
}
fds() { ls "/proc/$SERVER_PID/fd" | wc -l; }
rss() { awk '/^VmRSS:/ {print $2}' "/proc/$SERVER_PID/status"; }
good 3 >/dev/null  # warm up: the chain open, the page cache filled
base=$(good 5) || fail "the good client alone"
cpu() { $PY -c "import os,sys; f=open('/proc/%s/stat' % sys.argv[1]).read().rsplit(')',1)[1].split(); print((int(f[11])+int(f[12]))/os.sysconf('SC_CLK_TCK'))" "$SERVER_PID"; }
fd0=$(fds); rss0=$(rss); lines0=$(wc -l < "$TMP/server.log"); cpu0=$(cpu)
$PY "$(dirname "$0")/hostile_clients.py" 127.0.0.1 "$PORT" "$N" 10 200 > "$TMP/attack.log" 2>&1 &
attacker=$!
sleep 1
under=$(good 8) || fail "the good client failed during the attack"
wait "$attacker" || { cat "$TMP/attack.log"; fail "the attacker failed"; }
cat "$TMP/attack.log"
echo "server CPU over the attack and the good client's reads: $($PY -c "print('%.2f' % ($(cpu) - $cpu0))") s"
lines=$(( $(wc -l < "$TMP/server.log") - lines0 ))
echo "good client: $base MiB/s alone, $under MiB/s under attack ($(python3 -c "print('%.0f' % (100 * $under / max(1, $base)))")%); the server logged $lines lines for $N connections"
[ "$lines" -le 400 ] || { tail -20 "$TMP/server.log"; fail "the server logged $lines lines for $N hostile connections"; }
has "similar lines held back" < "$TMP/server.log" || fail "no line says how many were held back"
# Back to the baseline once the stalls are gone.
for _ in $(seq 1 50); do [ "$(fds)" -le "$fd0" ] && break; sleep 0.1; done
[ "$(fds)" -le "$fd0" ] || { ls -l "/proc/$SERVER_PID/fd"; fail "descriptors: $(fds) after, $fd0 before"; }
rss1=$(rss)
echo "server RSS: $rss0 KiB before, $rss1 KiB after"
[ "$rss1" -le $((rss0 + 65536)) ] || fail "RSS grew from $rss0 to $rss1 KiB"
kill -0 "$SERVER_PID" || fail "the server died"
[ "$(good 1)" -gt 0 ] || fail "a new client after the attack"
nbdinfo --size "$(uri "$v")" | has -x 268435456 || fail "nbdinfo (TLS) after the attack"
echo PASS
