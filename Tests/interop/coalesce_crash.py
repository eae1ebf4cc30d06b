"""Drives one round of the coalesce crash test (see test-coalesce-kill9.sh).

  coalesce_crash.py prepare STATE ROUND   writes, snapshots and destroys so the collector
                                          has merges to do; the model goes to STATE
  coalesce_crash.py verify STATE          every VDI in STATE reads its model over NBD
"""
import json, os, random, subprocess, sys
import nbd

CTL = [os.environ["VDICTL"], "--socket", os.environ["SOCK"]]
SIZE = 32 << 20

def ctl(*a):
    return subprocess.run(CTL + list(a), check=True, capture_output=True, text=True).stdout.strip()

def connect(uuid):
    info = json.loads(ctl("vdi-get-nbd-info", "uuid=" + uuid, "--json"))[0]
    h = nbd.NBD()
    h.set_export_name(info["exportname"]); h.connect_tcp(info["address"], str(info["port"]))
    return h

def load(path):
    if not os.path.exists(path): return {}
    return json.load(open(path))

def pattern(seed, n):
    return random.Random(seed).randbytes(n)

def prepare(state_path, rnd):
    st = load(state_path)
    rng = random.Random(rnd)
    if "vdi" not in st:
        st["vdi"] = ctl("vdi-create", "name-label=crash", "virtual-size=%d" % SIZE)
        st["writes"] = {st["vdi"]: []}
    vdi = st["vdi"]
    h = connect(vdi)
    def write(n):
        for _ in range(n):
            ln = rng.choice([512, 4096, 65536, 1 << 20, 3 << 20])
            off = rng.randrange(0, (SIZE - ln) // 512) * 512
            seed = rng.randrange(1 << 30)
            h.pwrite(pattern(seed, ln), off)
            st["writes"][vdi].append([off, ln, seed])
        h.flush()
    write(12)
    s1 = ctl("vdi-snapshot", "uuid=" + vdi); st["writes"][s1] = list(st["writes"][vdi])
    write(8)
    s2 = ctl("vdi-snapshot", "uuid=" + vdi); st["writes"][s2] = list(st["writes"][vdi])
    write(8)
    h.shutdown()
    # Keep at most the newest snapshot: the rest go, so bases are merged and collected.
    olds = [u for u in st["writes"] if u not in (vdi, s2)]
    for u in olds:
        ctl("vdi-destroy", "uuid=" + u); del st["writes"][u]
    json.dump(st, open(state_path, "w"))

def verify(state_path):
    st = load(state_path)
    for u, writes in st["writes"].items():
        model = bytearray(SIZE)
        for off, ln, seed in writes: model[off:off + ln] = pattern(seed, ln)
        h = connect(u)
        got = b"".join(h.pread(4 << 20, o) for o in range(0, SIZE, 4 << 20))
        h.shutdown()
        if got != bytes(model):
            bad = next(i for i in range(SIZE) if got[i] != model[i])
            sys.exit("VDI %s differs from its model at byte %d" % (u, bad))

if __name__ == "__main__":
    if sys.argv[1] == "prepare": prepare(sys.argv[2], int(sys.argv[3]))
    else: verify(sys.argv[2])
