"""Drives one round of the coalesce crash test (see test-coalesce-kill9.sh).

  coalesce_crash.py prepare STATE ROUND   writes, snapshots and destroys so the collector
                                          has merges to do; each VDI's model goes to
                                          STATE/<uuid>.model, the list to STATE/vdis.json
  coalesce_crash.py verify STATE          every VDI in STATE reads its model over NBD
"""
import json, os, random, shutil, subprocess, sys
import nbd

CTL = [os.environ["VDICTL"], "--socket", os.environ["SOCK"]]
SIZE = 24 << 20

def ctl(*a):
    return subprocess.run(CTL + list(a), check=True, capture_output=True, text=True).stdout.strip()

def connect(uuid):
    info = json.loads(ctl("vdi-get-nbd-info", "uuid=" + uuid, "--json"))[0]
    h = nbd.NBD()
    h.set_export_name(info["exportname"]); h.connect_tcp(info["address"], str(info["port"]))
    return h

def prepare(state, rnd):
    os.makedirs(state, exist_ok=True)
    index = os.path.join(state, "vdis.json")
    st = json.load(open(index)) if os.path.exists(index) else {}
    rng = random.Random(rnd)
    if "vdi" not in st:
        st["vdi"] = ctl("vdi-create", "name-label=crash", "virtual-size=%d" % SIZE)
        st["vdis"] = [st["vdi"]]
        open(os.path.join(state, st["vdi"] + ".model"), "wb").write(bytes(SIZE))
    vdi = st["vdi"]
    mpath = os.path.join(state, vdi + ".model")
    model = bytearray(open(mpath, "rb").read())
    h = connect(vdi)
    def write(n):
        for _ in range(n):
            ln = rng.choice([512, 4096, 65536, 1 << 20, 2 << 20])
            off = rng.randrange(0, (SIZE - ln) // 512) * 512
            data = rng.randbytes(ln)
            h.pwrite(data, off)
            model[off:off + ln] = data
        h.flush()
    def snapshot():
        s = ctl("vdi-snapshot", "uuid=" + vdi)
        open(os.path.join(state, s + ".model"), "wb").write(model)
        st["vdis"].append(s)
        return s
    write(12); snapshot()
    write(8); s2 = snapshot()
    write(8)
    h.shutdown()
    open(mpath, "wb").write(model)
    # Keep only the newest snapshot: the rest go, so bases are merged and collected.
    for u in [u for u in st["vdis"] if u not in (vdi, s2)]:
        ctl("vdi-destroy", "uuid=" + u)
        os.unlink(os.path.join(state, u + ".model"))
        st["vdis"].remove(u)
    json.dump(st, open(index, "w"))

def verify(state):
    st = json.load(open(os.path.join(state, "vdis.json")))
    for u in st["vdis"]:
        model = open(os.path.join(state, u + ".model"), "rb").read()
        h = connect(u)
        got = b"".join(h.pread(4 << 20, o) for o in range(0, SIZE, 4 << 20))
        h.shutdown()
        if got != model:
            bad = next(i for i in range(SIZE) if got[i] != model[i])
            sys.exit("VDI %s differs from its model at byte %d" % (u, bad))

if __name__ == "__main__":
    if sys.argv[1] == "prepare": prepare(sys.argv[2], int(sys.argv[3]))
    else: verify(sys.argv[2])
