#!/usr/bin/env bash
# A random sequence of lifecycle calls (vdictl: create, snapshot, clone, copy into fresh and
# existing VDIs, destroy, forget and scan, renames) and NBD writes (python nbd) over several
# VDIs, with the collector running; after every step each touched VDI reads its model over
# NBD, and at the end every VDI does, with vhd-check clean on every file.
. "$(dirname "$0")/functions.sh"
requires nbdsh
start_vdinbd
export VDICTL="$VDINBD_BIN/vdictl" SOCK SR
$PY - "${SEED:-$RANDOM}" <<'PY'
import json, os, random, subprocess, sys
import nbd
seed = int(sys.argv[1]); rng = random.Random(seed); print("seed", seed)
def ctl(*a):
    r = subprocess.run([os.environ["VDICTL"], "--socket", os.environ["SOCK"], *a], capture_output=True, text=True)
    assert r.returncode == 0, "vdictl %s failed (exit %d): %s" % (" ".join(a), r.returncode, r.stderr.strip())
    return r.stdout.strip()
def connect(u, ro=False):
    i = json.loads(ctl("vdi-get-nbd-info", "uuid=" + u, "--json", *(["read-only=true"] if ro else [])))[0]
    h = nbd.NBD(); h.set_export_name(i["exportname"]); h.connect_tcp(i["address"], str(i["port"])); return h
SIZE = 8 << 20
models, snaps = {}, set()
def check(u, step, why):
    h = connect(u, ro=True); got = h.pread(SIZE, 0); h.shutdown()
    assert got == bytes(models[u]), "step %d (%s): VDI %s differs from its model" % (step, why, u)
for step in range(70):
    live = sorted(models); leaves = [u for u in live if u not in snaps]
    op = rng.choice(["create"] * (1 if len(leaves) < 4 else 0) + ["write"] * 4 + ["snapshot", "clone", "copy", "copy-into",
                    "destroy", "forget", "rename"]) if live else "create"
    touched = []
    if op == "create":
        u = ctl("vdi-create", "name-label=v%d" % step, "virtual-size=8MiB"); models[u] = bytearray(SIZE); touched = [u]
    elif op == "write" and leaves:
        u = rng.choice(leaves); h = connect(u)
        for _ in range(rng.randrange(1, 6)):
            ln = rng.choice([512, 4096, 65536, 1 << 20]); off = rng.randrange(0, SIZE - ln) & ~511
            d = os.urandom(ln); h.pwrite(d, off); models[u][off:off + ln] = d
        if rng.random() < 0.3: h.zero(65536, 0); models[u][0:65536] = bytes(65536)
        h.flush(); h.shutdown(); touched = [u]
    elif op == "snapshot" and leaves:
        u = rng.choice(leaves)
        r = subprocess.run([os.environ["VDICTL"], "--socket", os.environ["SOCK"], "vdi-snapshot", "uuid=" + u], capture_output=True, text=True)
        if r.returncode == 0:
            s = r.stdout.strip(); models[s] = bytearray(models[u]); snaps.add(s); touched = [u, s]
        else:
            assert "SR_BACKEND_FAILURE_109" in r.stderr, r.stderr
    elif op == "clone":
        u = rng.choice(live)
        r = subprocess.run([os.environ["VDICTL"], "--socket", os.environ["SOCK"], "vdi-clone", "uuid=" + u], capture_output=True, text=True)
        if r.returncode == 0:
            c = r.stdout.strip(); models[c] = bytearray(models[u]); touched = [u, c]
        else:
            assert "SR_BACKEND_FAILURE_109" in r.stderr, r.stderr
    elif op == "copy":
        u = rng.choice(live); c = ctl("vdi-copy", "uuid=" + u, "--quiet"); models[c] = bytearray(models[u]); touched = [u, c]
    elif op == "copy-into" and len(leaves) >= 2:
        t = rng.choice(leaves); u = rng.choice([x for x in live if x != t])
        base = [x for x in live if x not in (t, u)]
        args = ["vdi-copy", "uuid=" + u, "into-vdi=" + t, "--quiet"]
        # With a base the target must already hold the base's bytes: copy the base in first.
        if base and rng.random() < 0.5:
            b = rng.choice(base); ctl("vdi-copy", "uuid=" + b, "into-vdi=" + t, "--quiet"); args.insert(2, "base-vdi=" + b)
        ctl(*args); models[t] = bytearray(models[u]); touched = [u, t]
    elif op == "destroy" and len(live) > 1:
        u = rng.choice(live); ctl("vdi-destroy", "uuid=" + u); del models[u]; snaps.discard(u)
    elif op == "forget" and leaves:
        u = rng.choice(leaves); ctl("vdi-forget", "uuid=" + u); ctl("sr-scan"); touched = [u]
    elif op == "rename" and live:
        u = rng.choice(live); ctl("vdi-param-set", "uuid=" + u, "name-label=r%d" % step)
        assert json.loads(ctl("vdi-param-list", "uuid=" + u, "--json"))["name_label"] == "r%d" % step
    print(step, op, " ".join(x[:8] for x in touched), flush=True)
    for u in touched: check(u, step, op)
ctl("sr-scan", "--wait")
for u in sorted(models): check(u, 999, "after the collector")
for f in os.listdir(os.environ["SR"]):
    if f.endswith(".vhd"):
        r = subprocess.run([os.environ["VDICTL"], "vhd-check", os.path.join(os.environ["SR"], f)], capture_output=True, text=True)
        assert r.returncode == 0, (f, r.stdout, r.stderr)
print("ok: %d VDIs match their models" % len(models))
PY
