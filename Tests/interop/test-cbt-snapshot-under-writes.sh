#!/usr/bin/env bash
# Snapshots taken while a client keeps 32 writes in flight with CBT on: a write waiting for
# its log sync when the snapshot swaps the log lands after the snapshot, so its bits must be
# in the new log. Between each pair of snapshots every 64 KiB block whose bytes differ is in
# list_changed_blocks, and the NBD dirty bitmap of the later snapshot says the same.
. "$(dirname "$0")/functions.sh"
requires nbdsh
start_vdinbd
u=$(vdictl vdi-create name-label=t virtual-size=32MiB)
vdictl vdi-enable-cbt "uuid=$u"
snaps=("$(vdictl vdi-snapshot "uuid=$u")")
$PY - "$(uri "$u")" <<'PY' &
import nbd, os, random, signal, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1])
h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_ALIGN)
rng = random.Random(7)
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
while True:
    while h.aio_in_flight() < 32:
        n = rng.choice([512, 4096, 65536, 70000, 3000])
        h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(os.urandom(n))), rng.randrange(0, (32 << 20) - n))
    h.poll(-1)
PY
writer=$!
for _ in $(seq 1 12); do
    sleep 0.15
    snaps+=("$(vdictl vdi-snapshot "uuid=$u")")
done
kill "$writer"; wait "$writer" 2>/dev/null || true
for i in $(seq 1 12); do
    a=${snaps[$((i - 1))]} b=${snaps[$i]}
    bits=$(vdictl vdi-list-changed-blocks "vdi-from=$a" "vdi-to=$b")
    $PY - "$(uri "$a")" "$(uri "$b")" "$bits" "$a" <<'PY' || fail "snapshot pair $i: a changed block is not in the bitmap"
import base64, nbd, sys
ha = nbd.NBD(); ha.connect_uri(sys.argv[1])
hb = nbd.NBD(); hb.add_meta_context("qemu:dirty-bitmap:" + sys.argv[4]); hb.connect_uri(sys.argv[2])
bits = base64.b64decode(sys.argv[3]); blk = 64 << 10
changed = 0
for i in range((32 << 20) // blk):
    if ha.pread(blk, i * blk) != hb.pread(blk, i * blk):
        changed += 1
        assert bits[i // 8] & (0x80 >> (i % 8)), "block %d differs but is not marked" % i
assert changed > 0, "the writer changed nothing between these snapshots"
# The same set over NBD, from the later snapshot's export.
dirty = set()
def cb(ctx, off, entries, err):
    pos = off
    for k in range(0, len(entries), 2):
        if entries[k + 1] & 1:
            dirty.update(range(pos // blk, (pos + entries[k]) // blk))
        pos += entries[k]
    return 0
off = 0
while off < (32 << 20):
    got = []
    def cb2(ctx, o, entries, err):
        got.append(sum(entries[0::2])); return cb(ctx, o, entries, err)
    hb.block_status(min(32 << 20, (32 << 20) - off), off, cb2)
    off += got[0]
marked = {i for i in range((32 << 20) // blk) if bits[i // 8] & (0x80 >> (i % 8))}
assert dirty == marked, (len(dirty), len(marked))
PY
done
