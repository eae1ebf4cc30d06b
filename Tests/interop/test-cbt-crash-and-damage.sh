#!/usr/bin/env bash
# kill -9 the server at random moments while a client writes with CBT on: after a restart
# CBT is still enabled and list_changed_blocks covers every block whose bytes differ
# between the two snapshots. Then damage a log on purpose: CBT reports disabled with the
# reason, and list_changed_blocks fails naming it, never a silently incomplete bitmap.
. "$(dirname "$0")/functions.sh"
requires nbdsh
start_vdinbd
u=$(vdictl vdi-create name-label=t virtual-size=32MiB)
vdictl vdi-enable-cbt "uuid=$u"
# restart: the server again on the same SR, the killed one's log kept in crashed.log.
restart() { cat "$TMP/server.log" >>"$TMP/crashed.log"; start_vdinbd; }
for round in 1 2 3 4 5; do
    a=$(vdictl vdi-snapshot "uuid=$u")
    U=$(uri "$u")
    # Writer in the background; the server dies under it.
    $PY - "$U" "$round" <<'PY' &
import nbd, os, random, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1])
rng = random.Random(int(sys.argv[2]))
try:
    while True:
        for _ in range(16):
            off = rng.randrange(0, (32 << 20) - 70000)
            h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(os.urandom(rng.choice([512, 4096, 70000])))), off)
        while h.aio_in_flight() > 8:
            h.poll(-1)
except Exception:
    pass
PY
    writer=$!
    sleep "0.$((RANDOM % 9 + 1))"
    kill -9 "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true
    wait "$writer" 2>/dev/null || true
    restart
    vdictl vdi-param-list "uuid=$u" | has "cbt-enabled: true" || fail "CBT disabled after kill -9 (round $round)"
    b=$(vdictl vdi-snapshot "uuid=$u")
    bits=$(vdictl vdi-list-changed-blocks "vdi-from=$a" "vdi-to=$b")
    $PY - "$(uri "$a")" "$(uri "$b")" "$bits" <<'PY' || fail "round $round: a changed block is missing from the bitmap"
import base64, nbd, sys
ha = nbd.NBD(); ha.connect_uri(sys.argv[1]); hb = nbd.NBD(); hb.connect_uri(sys.argv[2])
bits = base64.b64decode(sys.argv[3]); blk = 64 << 10
for i in range((32 << 20) // blk):
    if ha.pread(blk, i * blk) != hb.pread(blk, i * blk):
        assert bits[i // 8] & (0x80 >> (i % 8)), "block %d differs but is not marked" % i
PY
done
# Damage the live log: CBT goes off with a reason, and asking for changes names it.
kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true
truncate -s 20 "$SR/$u.cbtlog"
restart
last=$(vdictl vdi-snapshot "uuid=$u" 2>&1) || true
vdictl vdi-param-list "uuid=$u" > "$TMP/rec"
grep -q "cbt-enabled: false" "$TMP/rec" || { cat "$TMP/rec"; fail "damaged log did not disable CBT"; }
grep -q "cbt_disabled_reason: .*torn header" "$TMP/rec" || { cat "$TMP/rec"; fail "no reason recorded"; }
if vdictl vdi-list-changed-blocks "vdi-from=$b" "vdi-to=$u" 2>"$TMP/err"; then fail "bitmap from a damaged log"; fi
grep -q "VDI_NO_CBT_METADATA.*torn header" "$TMP/err" || { cat "$TMP/err"; fail "error does not name the reason"; }
