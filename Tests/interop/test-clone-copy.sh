#!/usr/bin/env bash
# VDI.clone and VDI.copy with python nbd, qemu-img and vdictl, against in-memory models:
# a clone of a 3-deep chain reads its source's bytes, writes to either do not show in the
# other, destroying the source keeps the clone and the collector then merges it; a full
# copy keeps holes; a copy with base-vdi into an earlier copy makes it equal (sharing
# layers with the base, and sharing none); refusals with their codes; a cancelled copy
# leaves no VDI; setters, tags, forget and scan.
. "$(dirname "$0")/functions.sh"
requires qemu-img nbdinfo
$PY -c 'import pyvhdi' || { [ "${CI:-}" = true ] && exit 1; echo "SKIP: pyvhdi"; exit 77; }
start_vdinbd
export VDICTL="$VDINBD_BIN/vdictl" SOCK SR
$PY - <<'PY'
import json, os, random, socket, subprocess, sys, time
import nbd, pyvhdi
def ctl(*a):
    return subprocess.run([os.environ["VDICTL"], "--socket", os.environ["SOCK"], *a], check=True, capture_output=True, text=True).stdout.strip()
def fails(*a):
    r = subprocess.run([os.environ["VDICTL"], "--socket", os.environ["SOCK"], *a], capture_output=True, text=True)
    assert r.returncode != 0, a
    return r.stderr
def rpc(method, params):
    s = socket.socket(socket.AF_UNIX); s.connect(os.environ["SOCK"])
    s.sendall((json.dumps({"jsonrpc": "2.0", "method": method, "params": params, "id": 1}) + "\n").encode())
    buf = b""
    while not buf.endswith(b"\n"): buf += s.recv(65536)
    s.close(); return json.loads(buf)
def connect(u, **opts):
    args = ["vdi-get-nbd-info", "uuid=" + u, "--json"] + ["%s=%s" % kv for kv in opts.items()]
    info = json.loads(ctl(*args))[0]
    h = nbd.NBD(); h.set_export_name(info["exportname"]); h.connect_tcp(info["address"], str(info["port"]))
    return h
SIZE = 32 << 20; rng = random.Random(7)
def scribble(h, model, n):
    for _ in range(n):
        ln = rng.choice([512, 4096, 65536, 1 << 20]); off = rng.randrange(0, SIZE - ln) & ~511
        data = os.urandom(ln); h.pwrite(data, off); model[off:off + ln] = data
def read_all(u):
    h = connect(u, **{"read-only": "true"}); d = h.pread(SIZE, 0); h.shutdown(); return d
def vhd(u): return os.path.join(os.environ["SR"], u + ".vhd")
def pyvhdi_equal(u, model):
    # libvhdi follows the chain through each file's parent name (qemu's vpc driver reads one file only).
    chain = [pyvhdi.file()]; chain[0].open(vhd(u))
    while chain[-1].parent_filename:
        p = pyvhdi.file(); p.open(os.path.join(os.environ["SR"], chain[-1].parent_filename)); chain[-1].set_parent(p); chain.append(p)
    assert chain[0].read_buffer(SIZE) == bytes(model), "pyvhdi reads %s differently" % u
def qemu_equal(u, model):
    raw = os.path.join(os.environ["SR"], "..", "model.raw"); open(raw, "wb").write(model)
    r = subprocess.run(["qemu-img", "compare", "-f", "vpc", "-F", "raw", vhd(u), raw], capture_output=True, text=True)
    assert r.returncode == 0, (u, r.stdout, r.stderr)

# A 3-deep chain.
a = ctl("vdi-create", "name-label=a", "virtual-size=32MiB")
ma = bytearray(SIZE)
h = connect(a)
scribble(h, ma, 20); ctl("vdi-snapshot", "uuid=" + a)
scribble(h, ma, 20); s2 = ctl("vdi-snapshot", "uuid=" + a)
scribble(h, ma, 20); h.flush(); h.shutdown()
assert int(json.loads(ctl("vdi-param-list", "uuid=" + a, "--json"))["sm_config"]["chain-depth"]) == 3
c = ctl("vdi-clone", "uuid=" + a, "driver-params:origin=test")
rc = json.loads(ctl("vdi-param-list", "uuid=" + c, "--json"))
assert rc["is_a_snapshot"] is False and rc["read_only"] is False and rc["name_label"] == "a", rc
assert rc["sm_config"].get("origin") == "test", rc["sm_config"]
mc = bytearray(ma)
assert read_all(c) == bytes(ma), "the clone does not read its source's bytes"
ha, hc = connect(a), connect(c)
scribble(ha, ma, 15); scribble(hc, mc, 15); ha.flush(); hc.flush(); ha.shutdown(); hc.shutdown()
assert read_all(a) == bytes(ma) and read_all(c) == bytes(mc), "writes to a clone or its source show in the other"
# A clone of a snapshot is a writable disk.
cs = ctl("vdi-clone", "uuid=" + s2)
r = json.loads(ctl("vdi-param-list", "uuid=" + cs, "--json"))
assert r["is_a_snapshot"] is False and r["read_only"] is False, r
hs = connect(cs); hs.pwrite(b"x" * 4096, 0); hs.shutdown()
# Destroying the source keeps the clone; the collector merges what it can.
for v in [a, cs]: ctl("vdi-destroy", "uuid=" + v)
ctl("sr-scan", "--wait")
assert read_all(c) == bytes(mc), "the clone changed when its source went"
pyvhdi_equal(c, mc)
depth = int(json.loads(ctl("vdi-param-list", "uuid=" + c, "--json"))["sm_config"]["chain-depth"])
print("clone chain depth after the collector:", depth)

# Full copy: holes stay holes.
d = ctl("vdi-copy", "uuid=" + c, "--quiet")
assert read_all(d) == bytes(mc)
qemu_equal(d, mc)   # a fresh copy is one dynamic VHD: qemu-img reads it
m = subprocess.run(["nbdinfo", "--map", "nbd://127.0.0.1:%s/%s" % (json.loads(ctl("vdi-get-nbd-info", "uuid=" + d, "--json"))[0]["port"],
                    json.loads(ctl("vdi-get-nbd-info", "uuid=" + d, "--json"))[0]["exportname"].lstrip("/").replace("?", "%3F"))],
                   capture_output=True, text=True, check=True).stdout
assert "hole" in m, m
# Copy with a base: an earlier copy made equal again. s1 shares layers with c's chain.
s1 = ctl("vdi-snapshot", "uuid=" + c)
e = ctl("vdi-copy", "uuid=" + s1, "--quiet")       # e: a full copy of s1 (shares no layer with c)
f = ctl("vdi-copy", "uuid=" + s1, "--quiet")
h = connect(c); scribble(h, mc, 25); h.pwrite(bytes(65536), 0); mc[0:65536] = bytes(65536); h.flush(); h.shutdown()
s3 = ctl("vdi-snapshot", "uuid=" + c)
assert ctl("vdi-copy", "uuid=" + s3, "base-vdi=" + s1, "into-vdi=" + e, "--quiet") == e
assert read_all(e) == bytes(mc), "copy with a shared-layer base did not make the target equal"
assert ctl("vdi-copy", "uuid=" + s3, "base-vdi=" + f, "into-vdi=" + f, "--quiet") == f
assert read_all(f) == bytes(mc), "copy with an unrelated base did not make the target equal"
qemu_equal(e, mc); qemu_equal(f, mc)   # each a single dynamic VHD, as qemu-img sees it
delta = ctl("vdi-copy", "uuid=" + s3, "base-vdi=" + s1, "--quiet")
du = json.loads(ctl("vdi-param-list", "uuid=" + delta, "--json"))["physical_utilisation"]
fu = json.loads(ctl("vdi-param-list", "uuid=" + d, "--json"))["physical_utilisation"]
assert du < fu, ("a delta copy is not smaller than a full one", du, fu)

# Refusals, from vdictl and from the socket.
small = ctl("vdi-create", "name-label=small", "virtual-size=16MiB")
assert "VDI_TOO_SMALL" in fails("vdi-copy", "uuid=" + c, "into-vdi=" + small, "--quiet")
assert "VDI_READONLY" in fails("vdi-copy", "uuid=" + c, "into-vdi=" + s1, "--quiet")
r = rpc("VDI.copy", [c, "", "", s1]); assert r["error"]["message"] == "VDI_READONLY", r
r = rpc("VDI.clone", []); assert r["error"]["data"][0] == "MESSAGE_PARAMETER_COUNT_MISMATCH", r
r = rpc("VDI.set_name_label", [c]); assert r["error"]["data"][0] == "MESSAGE_PARAMETER_COUNT_MISMATCH", r
r = rpc("VDI.set_on_boot", [c, "sometimes"]); assert r["error"]["message"] == "VALUE_NOT_SUPPORTED", r
r = rpc("VDI.clone", ["not-a-uuid"]); assert r["error"]["message"] == "UUID_INVALID", r
r = rpc("VDI.set_read_only", [s1, False]); assert r["error"]["message"] == "OPERATION_NOT_ALLOWED", r
ctl("vdi-enable-cbt", "uuid=" + c); cb = ctl("vdi-snapshot", "uuid=" + c); ctl("vdi-data-destroy", "uuid=" + cb)
assert "VDI_INCOMPATIBLE_TYPE" in fails("vdi-clone", "uuid=" + cb)
assert "VDI_INCOMPATIBLE_TYPE" in fails("vdi-copy", "uuid=" + cb, "--quiet")
# A record whose file is gone: VDI_MISSING.
gone = ctl("vdi-create", "name-label=gone", "virtual-size=1MiB"); os.unlink(vhd(gone))
assert json.loads(ctl("vdi-param-list", "uuid=" + gone, "--json"))["missing"] is True
assert "VDI_MISSING" in fails("vdi-copy", "uuid=" + gone, "--quiet")
assert "VDI_MISSING" in fails("vdi-update", "uuid=" + gone)
ctl("vdi-destroy", "uuid=" + gone)

# A cancelled copy leaves no VDI behind.
big = ctl("vdi-create", "name-label=big", "virtual-size=1GiB")
h = connect(big)
for o in range(0, 1 << 30, 16 << 20): h.pwrite(os.urandom(1 << 20), o)
h.flush(); h.shutdown()
before = set(json.loads(ctl("vdi-list", "--json")).keys())
task = rpc("Async.VDI.copy", [big, "", "", ""])["result"]
time.sleep(0.05)
rpc("Task.cancel", [task])
for _ in range(200):
    t = rpc("Task.get_record", [task])["result"]
    if t["status"] not in ("pending", "cancelling"): break
    time.sleep(0.05)
if t["status"] == "success":
    print("the copy finished before the cancel reached it; its VDI is", t["result"])
    ctl("vdi-destroy", "uuid=" + json.loads(t["result"]))
else:
    assert t["status"] == "cancelled" or "TASK_CANCELLED" in t["error_info"], t
after = set(json.loads(ctl("vdi-list", "--json")).keys())
assert after == before, ("a cancelled copy left a VDI", after - before)

# Setters, tags, lookups.
ctl("vdi-param-set", "uuid=" + c, "name-label=renamed", "name-description=notes", "allow-caching=true", "sharable=true")
ctl("vdi-param-add", "uuid=" + c, "param-name=tags", "param-key=blue")
r = json.loads(ctl("vdi-param-list", "uuid=" + c, "--json"))
assert (r["name_label"], r["name_description"], r["allow_caching"], r["sharable"], r["tags"]) == ("renamed", "notes", True, True, ["blue"]), r
ctl("vdi-param-remove", "uuid=" + c, "param-name=tags", "param-key=blue")
assert rpc("VDI.get_tags", [c])["result"] == []
assert rpc("VDI.get_name_label", [c])["result"] == "renamed"
assert rpc("VDI.get_by_uuid", [c])["result"] == c
assert c in rpc("VDI.get_by_name_label", ["renamed"])["result"]
assert "snapshot" in rpc("VDI.get_allowed_operations", [c])["result"]
ctl("vdi-update", "uuid=" + c)
# forget keeps the file; scan brings the VDI back with its name.
ctl("vdi-forget", "uuid=" + d)
assert d not in json.loads(ctl("vdi-list", "--json"))
assert os.path.exists(vhd(d))
ctl("sr-scan")
assert json.loads(ctl("vdi-param-list", "uuid=" + d, "--json"))["name_label"] == "a"
assert read_all(d) == bytes(read_all(d))
# qemu-img opens every file of the SR (the chains' files one by one).
for n in os.listdir(os.environ["SR"]):
    if n.endswith(".vhd"):
        subprocess.run(["qemu-img", "info", "-f", "vpc", os.path.join(os.environ["SR"], n)], check=True, capture_output=True)
print("ok")
PY
