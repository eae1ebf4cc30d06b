#!/usr/bin/env bash
# Tokens at rest and under guessing: metadata.db holds no token's secret (only its SHA-256
# digest), a token made before the digests (an SR of the previous schema) still works
# after the upgrade, TRIES random export names for a real VDI (10^4 here, 10^6 in
# Tools/stress) are all refused over NBD_OPT_INFO, and a wrong secret that shares all but
# its last character with the real one is refused in the same time as one that shares none.
. "$(dirname "$0")/functions.sh"
requires nbdinfo sqlite3
TRIES=${TRIES:-10000}
start_vdinbd
u=$(vdictl vdi-create name-label=t virtual-size=1MiB)
name=$(vdictl vdi-get-nbd-info "uuid=$u" --json | $PY -c 'import json,sys; print(json.load(sys.stdin)[0]["exportname"])')
secret=${name##*token=}
nbdinfo --size "nbd://127.0.0.1:$PORT/$u%3Ftoken=$secret" >/dev/null || fail "the real token is refused"
sqlite3 "$SR/metadata.db" .dump > "$TMP/dump.sql"
has -F "$secret" < "$TMP/dump.sql" && fail "metadata.db holds the token's secret"
has -F "$(printf %s "$secret" | sha256sum | cut -c1-64)" < "$TMP/dump.sql" || fail "metadata.db does not hold the token's digest"
has -F "$secret" < "$TMP/server.log" && fail "the server log shows the secret"
$PY - "$PORT" "$u" "$secret" "$TRIES" <<'PY'
import os, random, socket, statistics, struct, sys, time
port, vdi, secret, tries = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
IHAVEOPT, OPT_INFO = 0x49484156454F5054, 6
def exact(s, n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c: raise SystemExit("the server closed the connection")
        b += c
    return b
def connect():
    s = socket.create_connection(("127.0.0.1", port)); s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    exact(s, 18); s.sendall(struct.pack(">I", 3))  # fixed newstyle, no zeroes
    return s
def info(s, name):
    """NBD_OPT_INFO for `name`: True when the server describes the export."""
    n = name.encode()
    data = struct.pack(">I", len(n)) + n + struct.pack(">H", 0)
    s.sendall(struct.pack(">QII", IHAVEOPT, OPT_INFO, len(data)) + data)
    ok = False
    while True:
        _, _, typ, ln = struct.unpack(">QIII", exact(s, 20)); exact(s, ln)
        if typ == 3: ok = True            # NBD_REP_INFO
        elif typ == 1: return ok          # NBD_REP_ACK
        elif typ & 0x80000000: return False
alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
rng = random.SystemRandom()
s, used, accepted = connect(), 0, 0
for i in range(tries):
    if used == 200: s.close(); s, used = connect(), 0
    guess = "".join(rng.choice(alphabet) for _ in secret)
    if guess != secret and info(s, "/%s?token=%s" % (vdi, guess)): accepted += 1
    used += 1
assert accepted == 0, "%d random tokens accepted" % accepted
s.close(); s, used = connect(), 0
assert info(s, "/%s?token=%s" % (vdi, secret)), "the real token is refused after the guesses"
# Timing: all but the last character right against nothing right, interleaved.
near = secret[:-1] + ("A" if secret[-1] != "A" else "B")
far = "".join(rng.choice([c for c in alphabet if c != secret[k]]) for k in range(len(secret)))
t = {"near": [], "far": []}
for i in range(4000):
    if used >= 200: s.close(); s, used = connect(), 0
    for k, g in (("near", near), ("far", far)) if i % 2 else (("far", far), ("near", near)):
        a = time.perf_counter_ns(); r = info(s, "/%s?token=%s" % (vdi, g)); t[k].append(time.perf_counter_ns() - a)
        assert not r
        used += 1
mn, mf = statistics.median(t["near"]), statistics.median(t["far"])
print("%d random tokens refused; refusal median %.1f us (all but one character right) vs %.1f us (none)" % (tries, mn / 1e3, mf / 1e3))
assert 0.8 < mn / mf < 1.25, "refusal time depends on the matching prefix: %.1f vs %.1f us" % (mn / 1e3, mf / 1e3)
PY
# Tokens minted before digests were kept: put the old schema back (secrets in clear, this
# token's among them, and one more), restart, use both.
kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true
old="oldtoken$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
sqlite3 "$SR/metadata.db" "ALTER TABLE token RENAME COLUMN digest TO secret;
    UPDATE token SET secret = '$secret' WHERE vdi_uuid = '$u';
    INSERT INTO token (secret, vdi_uuid, read_only, revoked, created, label, mode) VALUES ('$old', '$u', 0, 0, '2026-01-01 00:00:00.000', 'old', 'direct');
    DELETE FROM grdb_migrations WHERE identifier LIKE 'v4%';"
start_vdinbd
nbdinfo --size "nbd://127.0.0.1:$PORT/$u%3Ftoken=$old" >/dev/null || fail "a token kept before the upgrade is refused after it"
nbdinfo --size "nbd://127.0.0.1:$PORT/$u%3Ftoken=$secret" >/dev/null || fail "the token is refused after the upgrade"
sqlite3 "$SR/metadata.db" .dump | has -F "$old" && fail "the upgrade left a secret in metadata.db"
echo PASS
