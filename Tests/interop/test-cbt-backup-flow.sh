#!/usr/bin/env bash
# The XenAPI incremental backup flow over NBD with python nbd, 10 rounds: enable CBT,
# snapshot, full read, data_destroy, random writes (unaligned, crossing 64 KiB), snapshot,
# read only the changed blocks, data_destroy. Each bitmap equals the set of 64 KiB blocks
# written; the same blocks come back over NBD as qemu:dirty-bitmap:<from>; restoring the
# full backup plus the increments equals the last snapshot byte for byte.
. "$(dirname "$0")/functions.sh"
requires nbdsh nbdinfo
start_vdinbd
u=$(vdictl vdi-create name-label=t virtual-size=40MiB)
export VDICTL="$VDINBD_BIN/vdictl" SOCK
$PY - "$u" <<'PY'
import base64, json, os, random, subprocess, sys
import nbd
vdi = sys.argv[1]
def ctl(*a):
    return subprocess.run([os.environ["VDICTL"], "--socket", os.environ["SOCK"], *a], check=True, capture_output=True, text=True).stdout.strip()
def rpc_fails(*a):
    return subprocess.run([os.environ["VDICTL"], "--socket", os.environ["SOCK"], *a], capture_output=True, text=True)
def connect(uuid, ctx=None):
    info = json.loads(ctl("vdi-get-nbd-info", "uuid=" + uuid, "--json"))[0]
    h = nbd.NBD()
    h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_ALIGN)
    if ctx: h.add_meta_context(ctx)
    h.connect_tcp(info["address"], str(info["port"])) if False else None
    h.set_export_name(info["exportname"]); h.connect_tcp(info["address"], str(info["port"]))
    return h
SIZE = 40 << 20; BLK = 64 << 10
rng = random.Random(11)
ctl("vdi-enable-cbt", "uuid=" + vdi)
assert "cbt-enabled: true" in ctl("vdi-param-list", "uuid=" + vdi)
# Refusals.
s0 = ctl("vdi-snapshot", "uuid=" + vdi)
r = rpc_fails("vdi-enable-cbt", "uuid=" + s0); assert r.returncode != 0 and "OPERATION_NOT_ALLOWED" in r.stderr, r.stderr
ctl("vdi-destroy", "uuid=" + s0)
# The guest: one connection that stays open across snapshots.
guest = connect(vdi)
for o in range(0, SIZE, 8 << 20):
    guest.pwrite(os.urandom(8 << 20), o)
prev = ctl("vdi-snapshot", "uuid=" + vdi)
hp = connect(prev)
backup = bytearray(b"".join(hp.pread(8 << 20, o) for o in range(0, SIZE, 8 << 20)))
r = rpc_fails("vdi-data-destroy", "uuid=" + prev); assert "VDI_IN_USE" in r.stderr, r.stderr
hp.shutdown()
def data_destroy(u):
    import time
    for _ in range(50):
        r = rpc_fails("vdi-data-destroy", "uuid=" + u)
        if r.returncode == 0: return
        assert "VDI_IN_USE" in r.stderr, r.stderr
        time.sleep(0.1)
    raise SystemExit("still in use")
data_destroy(prev)
assert "type: cbt_metadata" in ctl("vdi-param-list", "uuid=" + prev)
r = rpc_fails("vdi-get-nbd-info", "uuid=" + prev); assert "VDI_INCOMPATIBLE_TYPE" in r.stderr, r.stderr
snaps, touches = [prev], []
for rnd in range(10):
    touched = set()
    for _ in range(rng.randrange(1, 40)):
        ln = rng.choice([1, 100, 4096, 65536, 65537, 200000, 1 << 20])
        off = rng.randrange(0, SIZE - ln)
        if rng.random() < 0.3: off = (off // BLK) * BLK + BLK - rng.randrange(1, 50)   # straddle a boundary
        off = min(off, SIZE - ln)
        guest.pwrite(os.urandom(ln), off)
        touched.update(range(off // BLK, (off + ln - 1) // BLK + 1))
    snap = ctl("vdi-snapshot", "uuid=" + vdi)
    b64 = ctl("vdi-list-changed-blocks", "vdi-from=" + prev, "vdi-to=" + snap)
    bits = base64.b64decode(b64)
    assert len(bits) == (SIZE // BLK + 7) // 8
    changed = {i for i in range(SIZE // BLK) if bits[i // 8] & (0x80 >> (i % 8))}
    assert changed == touched, (rnd, sorted(changed ^ touched)[:10])
    # The same answer through NBD block status.
    ctx = "qemu:dirty-bitmap:" + prev
    h = connect(snap, ctx)
    assert h.can_meta_context(ctx)
    seen = set(); pos = 0
    def cb(metacontext, offset, entries, err):
        global pos
        o = offset
        for i in range(0, len(entries), 2):
            if entries[i + 1] & 1:
                seen.update(range(o // BLK, (o + entries[i] - 1) // BLK + 1))
            o += entries[i]
        pos = o
    while pos < SIZE:
        h.block_status(SIZE - pos, pos, cb)
    assert seen == touched, (rnd, sorted(seen ^ touched)[:10])
    # Incremental: read only the changed blocks (64 KiB per bit, the tail clamped).
    for i in sorted(changed):
        o = i * BLK; n = min(BLK, SIZE - o)
        backup[o:o + n] = h.pread(n, o)
    assert bytes(backup) == b"".join(h.pread(8 << 20, o) for o in range(0, SIZE, 8 << 20)), rnd
    h.shutdown()
    data_destroy(snap)
    prev = snap
    snaps.append(snap); touches.append(touched)
# Reversed and unrelated pairs are errors.
other = ctl("vdi-create", "name-label=o", "virtual-size=1MiB"); ctl("vdi-enable-cbt", "uuid=" + other)
r = rpc_fails("vdi-list-changed-blocks", "vdi-from=" + other, "vdi-to=" + prev); assert r.returncode != 0, r
final = ctl("vdi-snapshot", "uuid=" + vdi)
r = rpc_fails("vdi-list-changed-blocks", "vdi-from=" + final, "vdi-to=" + prev); assert r.returncode != 0, "reversed pair accepted"
# Destroying a metadata snapshot in the middle merges its bits into the next log: the
# changes since the one before it still cover both rounds.
ctl("vdi-destroy", "uuid=" + snaps[5])
bits = base64.b64decode(ctl("vdi-list-changed-blocks", "vdi-from=" + snaps[4], "vdi-to=" + snaps[6]))
got = {i for i in range(SIZE // BLK) if bits[i // 8] & (0x80 >> (i % 8))}
assert got == touches[4] | touches[5], sorted(got ^ (touches[4] | touches[5]))[:10]
# The export's dirty bitmaps follow the log chain as it is now (the server caches it):
# the destroyed snapshot is gone from the list, its neighbours and the newest are there.
def contexts(uuid):
    # Read-only: the guest holds the one read-write attachment.
    info = json.loads(ctl("vdi-get-nbd-info", "uuid=" + uuid, "read-only=true", "--json"))[0]
    h = nbd.NBD(); h.set_opt_mode(True); h.set_export_name(info["exportname"])
    h.connect_tcp(info["address"], str(info["port"]))
    names = []
    h.opt_list_meta_context(lambda name: names.append(name) or 0)
    h.opt_abort()
    return {n[len("qemu:dirty-bitmap:"):] for n in names if n.startswith("qemu:dirty-bitmap:")}
listed = contexts(vdi)
assert snaps[5] not in listed and snaps[4] in listed and final in listed and snaps[6] in listed, (sorted(listed), snaps[4:7], final)
assert len(listed) == len(snaps) - 1 + 1, (len(listed), len(snaps))
print("ok")
PY
