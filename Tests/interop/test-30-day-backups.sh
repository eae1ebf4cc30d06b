#!/usr/bin/env bash
# A month of daily incremental backups, as a backup agent drives them: each day the guest
# writes, the agent snapshots, reads only list_changed_blocks since yesterday's snapshot
# over NBD, and data-destroys yesterday's; a VM-style snapshot is taken and destroyed too.
# With the collector running, after `vdictl sr-scan --wait`: the VDI's chain is at most 2
# deep, no image file is left that no record needs, the SR holds at most 1.3x the 2 MiB
# blocks ever written, every byte equals the model, every day's changed-block list is
# unchanged, vhd-check is clean, pyvhdi reads both chains and qemu-img the root base.
# On an SR whose default is qcow2 (VDINBD_SR_FORMATS=qcow2, as test-qcow2-suite runs it):
# 64 KiB clusters for the space figure, qemu-img check and qemu-img reading both chains.
. "$(dirname "$0")/functions.sh"
requires nbdsh qemu-img
[ "$FMT" != vhd ] || $PY -c 'import pyvhdi' || { [ "${CI:-}" = true ] && exit 1; echo "SKIP: pyvhdi"; exit 77; }
start_vdinbd
u=$(vdictl vdi-create name-label=guest virtual-size=256MiB)
export VDICTL="$VDINBD_BIN/vdictl" SOCK SR
$PY - "$u" <<'PY'
import base64, json, os, random, subprocess, sys, time
import nbd
EXT = "." + os.environ["FMT"]
if EXT == ".vhd": import pyvhdi
vdi = sys.argv[1]
def ctl(*a):
    return subprocess.run([os.environ["VDICTL"], "--socket", os.environ["SOCK"], *a], check=True, capture_output=True, text=True).stdout.strip()
def connect(uuid):
    info = json.loads(ctl("vdi-get-nbd-info", "uuid=" + uuid, "--json"))[0]
    h = nbd.NBD()
    h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_ALIGN)
    h.set_export_name(info["exportname"]); h.connect_tcp(info["address"], str(info["port"]))
    return h
def field(uuid, name):
    for line in ctl("vdi-param-list", "uuid=" + uuid).splitlines():
        if line.startswith(name + ": "): return line[len(name) + 2:]
    return None
def retry(*a):
    for _ in range(100):
        r = subprocess.run([os.environ["VDICTL"], "--socket", os.environ["SOCK"], *a], capture_output=True, text=True)
        if r.returncode == 0: return r.stdout.strip()
        assert "VDI_IN_USE" in r.stderr, r.stderr
        time.sleep(0.1)
    raise SystemExit("still in use: %s" % (a,))
def collector_errors():
    log = open(os.environ["SR"] + "/../server.log").read().splitlines()
    return [l for l in log if "collector:" in l and ("failed" in l or "given up" in l)]
SIZE, BLK, VHDBLK = 256 << 20, 64 << 10, (2 << 20 if EXT == ".vhd" else 64 << 10)
rng = random.Random(30)
model = bytearray(SIZE)
written = set()
ctl("vdi-enable-cbt", "uuid=" + vdi)
guest = connect(vdi)
def gwrite(off, data):
    guest.pwrite(data, off); model[off:off + len(data)] = data
    for b in range(off // VHDBLK, (off + len(data) - 1) // VHDBLK + 1): written.add(b)
for o in range(0, 64 << 20, 4 << 20): gwrite(o, os.urandom(4 << 20))
guest.flush()
prev = ctl("vdi-snapshot", "uuid=" + vdi)
backup = bytearray(model)
lists = []  # (from, to, bitmap) for every day
for day in range(30):
    for _ in range(24):
        ln = rng.choice([512, 4096, 65536, 200000])
        gwrite(rng.randrange(0, SIZE - ln) // 512 * 512, os.urandom(ln))
    guest.flush()
    snap = ctl("vdi-snapshot", "uuid=" + vdi)
    bitmap = base64.b64decode(ctl("vdi-list-changed-blocks", "vdi-from=" + prev, "vdi-to=" + snap))
    lists.append((prev, snap, bitmap))
    h = connect(snap)
    for i in range(SIZE // BLK):
        if bitmap[i // 8] & (0x80 >> (i % 8)):
            backup[i * BLK:(i + 1) * BLK] = h.pread(BLK, i * BLK)
    h.shutdown()
    assert backup == model, "day %d: the incremental backup differs from the disk" % day
    retry("vdi-data-destroy", "uuid=" + prev)
    vm = ctl("vdi-snapshot", "uuid=" + vdi)
    retry("vdi-destroy", "uuid=" + vm)
    prev = snap
    depth = int(field(vdi, "sm-config").split("chain-depth: ")[1].split(";")[0])
    assert depth < 30, "day %d: depth %d" % (day, depth)
guest.shutdown()
out = ctl("sr-scan", "--wait")
assert "running: false" in out, out
sm = field(vdi, "sm-config")
depth = int(sm.split("chain-depth: ")[1].split(";")[0])
assert depth <= 2, "chain depth %d after the collector; its failures: %s" % (depth, collector_errors())
# Files: one per live VDI, kept snapshot and needed base.
srdir = os.environ["SR"]
files = sorted(f for f in os.listdir(srdir) if f.endswith(EXT))
recs = json.loads(ctl("vdi-list", "--json"))
live = [r for r in recs.values() if r["type"] != "cbt_metadata"]
assert len(files) <= 3, files
need = {r["uuid"] + EXT for r in live} | {r["parent"] + EXT for r in live if r["parent"]}
assert set(files) == need, (files, need)
used = sum(os.stat(os.path.join(srdir, f)).st_blocks * 512 for f in os.listdir(srdir) if f.endswith((EXT, ".cbtlog")))
blocks = len(written) * VHDBLK
print("SR bytes %d, written blocks %d bytes, ratio %.2f" % (used, blocks, used / blocks))
assert used <= 1.3 * blocks, "the SR uses %.2fx the blocks written" % (used / blocks)
# Bytes, as served, and as other tools read the files.
h = connect(vdi)
assert b"".join(h.pread(8 << 20, o) for o in range(0, SIZE, 8 << 20)) == model, "the VDI differs from its model"
h.shutdown()
h = connect(prev)
assert b"".join(h.pread(8 << 20, o) for o in range(0, SIZE, 8 << 20)) == model, "the last snapshot differs"
h.shutdown()
for f, m in [(vdi + EXT, model), (prev + EXT, model)]:
    if EXT != ".vhd":
        out = os.environ["SR"] + "/../qemu.raw"
        subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", os.path.join(srdir, f), out], check=True)
        assert open(out, "rb").read() == bytes(m), "qemu-img reads %s differently" % f
        continue
    leaf = pyvhdi.file(); leaf.open(os.path.join(srdir, f))
    chain = [leaf]
    while chain[-1].parent_identifier:
        p = pyvhdi.file(); p.open(os.path.join(srdir, chain[-1].parent_filename)); chain[-1].set_parent(p); chain.append(p)
    assert len(chain) <= 2
    assert leaf.read_buffer(SIZE) == bytes(m), "pyvhdi reads %s differently" % f
with open(os.environ["SR"] + "/../model.raw", "wb") as fh: fh.write(model)
# Every day's changed blocks are the same after all that merging.
for (a, b, bm) in lists:
    assert base64.b64decode(ctl("vdi-list-changed-blocks", "vdi-from=" + a, "vdi-to=" + b)) == bm, "list_changed_blocks %s..%s changed" % (a, b)
PY
if [ "$FMT" = vhd ]; then
    for f in "$SR"/*.vhd; do "$VDINBD_BIN/vdictl" vhd-check "$f" >/dev/null || fail "vhd-check $f"; done
else
    for f in "$SR"/*."$FMT"; do qemu-img check -f "$FMT" "$f" >/dev/null || fail "qemu-img check $f"; done
fi
base=$(vdictl vdi-param-list "uuid=$u" | sed -n 's/^parent: //p')
[ -n "$base" ] || fail "the VDI should keep one base under its kept snapshot"
qemu-img convert -f "$( [ "$FMT" = vhd ] && echo vpc || echo "$FMT")" -O raw "$SR/$base.$FMT" "$TMP/base.raw"
cmp "$TMP/base.raw" "$TMP/model.raw" || fail "qemu-img reads the root base differently"
