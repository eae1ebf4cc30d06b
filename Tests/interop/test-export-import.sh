#!/usr/bin/env bash
# Export and import (seed 000) with vdictl and over HTTP, against an in-memory model of
# every disk: a VHD export of a 3-deep chain compares equal with qemu-img, is clean for
# vhd-check, reads the same through pyvhdi and vhdiinfo, and holds only its blocks; raw
# through a pipe and into a sparse file; a delta between two snapshots imported into a
# clone of the older one makes it equal to the newer one; imports of qemu-img's VHDs
# (dynamic and fixed) and of the fixtures; curl with each kind of token, refusals, a Range
# resume after a cut and after a restart, HTTP chunked uploads and xapi's chunked framing;
# every bad input refused with its code and the VDI's bytes unchanged.
. "$(dirname "$0")/functions.sh"
requires qemu-img curl vhdiinfo nbdcopy
$PY -c 'import pyvhdi, nbd' || { [ "${CI:-}" = true ] && exit 1; echo "SKIP: pyvhdi or nbd"; exit 77; }
FIX=${VDINBD_FIXTURES:-$(cd "$(dirname "$0")/../../.." && pwd)/shared/fixtures/vhd}
start_vdinbd
export VDICTL="$VDINBD_BIN/vdictl" VDINBD="$VDINBD_BIN/vdinbd" SOCK SR TMP FIX PORT HTTP_PORT
restart() {
    kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true
    start_vdinbd
}
$PY - <<'PY'
import hashlib, json, os, random, socket, struct, subprocess, sys, time, urllib.request, urllib.error
import nbd, pyvhdi
T = os.environ["TMP"]; HTTP = "http://127.0.0.1:%s" % os.environ["HTTP_PORT"]
def run(*a, **kw):
    return subprocess.run(list(a), check=True, capture_output=True, **kw)
def ctl(*a):
    return run(os.environ["VDICTL"], "--socket", os.environ["SOCK"], *a, text=True).stdout.strip()
def ctl_fails(*a):
    r = subprocess.run([os.environ["VDICTL"], "--socket", os.environ["SOCK"], *a], capture_output=True, text=True)
    assert r.returncode != 0, a
    return r.stderr
def rpc(method, params):
    s = socket.socket(socket.AF_UNIX); s.connect(os.environ["SOCK"])
    s.sendall((json.dumps({"jsonrpc": "2.0", "method": method, "params": params, "id": 1}) + "\n").encode())
    buf = b""
    while not buf.endswith(b"\n"): buf += s.recv(65536)
    s.close(); return json.loads(buf)
def info(u, **opts):
    return json.loads(ctl("vdi-get-nbd-info", "uuid=" + u, "--json", *["%s=%s" % kv for kv in opts.items()]))[0]
def token(u, **opts): return info(u, **opts)["exportname"].split("token=")[1]
def uri(u): return info(u)["uri"]
def connect(u):
    i = info(u); h = nbd.NBD(); h.set_export_name(i["exportname"]); h.connect_tcp(i["address"], str(i["port"])); return h
SIZE = 64 << 20; MIB = 1 << 20; rng = random.Random(12)
def scribble(u, model, n):
    h = connect(u)
    for _ in range(n):
        ln = rng.choice([512, 4096, 65536, MIB]); off = rng.randrange(0, SIZE - ln) & ~511
        d = os.urandom(ln); h.pwrite(d, off); model[off:off + ln] = d
    h.shutdown()
def read_all(u):
    h = connect(u); d = bytearray()
    for off in range(0, SIZE, 8 * MIB): d += h.pread(min(8 * MIB, SIZE - off), off)
    h.shutdown(); return bytes(d)
def create(size=SIZE, name="d"): return ctl("vdi-create", "name-label=" + name, "virtual-size=%d" % size)
def md5(b): return hashlib.md5(b).hexdigest()

# A 3-deep chain with sparse contents: base, then two snapshots' worth of writes on top.
v = create(); model = bytearray(SIZE)
scribble(v, model, 20); s1 = ctl("vdi-snapshot", "uuid=" + v); m1 = bytes(model)
scribble(v, model, 20); s2 = ctl("vdi-snapshot", "uuid=" + v); m2 = bytes(model)
scribble(v, model, 10)
assert read_all(v) == bytes(model)

# vdictl vdi-export as VHD: qemu-img compare, vhd-check, pyvhdi, vhdiinfo, size on disk.
f = T + "/v.vhd"
ctl("vdi-export", "uuid=" + v, "filename=" + f, "format=vhd", "--quiet")
run("qemu-img", "compare", "-f", "vpc", f, uri(v))
chk = run(os.environ["VDICTL"], "vhd-check", f, text=True).stdout; assert "clean" in chk, chk
p = pyvhdi.file(); p.open(f); assert p.media_size == SIZE and p.read_buffer(SIZE) == bytes(model)
out = run("vhdiinfo", f, text=True).stdout; assert "Dynamic" in out and "67108864" in out, out
blocks = {o // (2 * MIB) for o in range(0, SIZE, 512) if model[o:o + 512] != bytes(512)}
assert os.path.getsize(f) <= 512 * 4 + 1024 + 256 * 4 + len(blocks) * (2 * MIB + 512) + 2 * MIB, (os.path.getsize(f), len(blocks))
assert os.path.getsize(f) < SIZE

# Raw: through a pipe, and into a regular file that keeps holes.
raw = run(os.environ["VDICTL"], "--socket", os.environ["SOCK"], "vdi-export", "uuid=" + v, "filename=-", "--quiet").stdout
assert raw == bytes(model)
ctl("vdi-export", "uuid=" + s1, "filename=" + T + "/s1.raw", "format=raw", "--quiet")
assert open(T + "/s1.raw", "rb").read() == m1
assert os.stat(T + "/s1.raw").st_blocks * 512 < SIZE, "a raw export of a sparse disk left no holes"

# Delta between the snapshots, into a clone of the older one: equal to the newer one.
ctl("vdi-export", "uuid=" + s2, "base=" + s1, "filename=" + T + "/delta.vhd", "format=vhd", "--quiet")
assert os.path.getsize(T + "/delta.vhd") < os.path.getsize(f)
assert "Differential" in run("vhdiinfo", T + "/delta.vhd", text=True).stdout
c = ctl("vdi-clone", "uuid=" + s1)
ctl("vdi-import", "uuid=" + c, "filename=" + T + "/delta.vhd", "format=vhd", "--quiet")
run("qemu-img", "compare", uri(c), uri(s2))
assert read_all(c) == m2

# A full import replaces: raw through stdin, then a VHD.
w = create(name="w"); scribble(w, bytearray(SIZE), 5)
run(os.environ["VDICTL"], "--socket", os.environ["SOCK"], "vdi-import", "uuid=" + w, "filename=-", "--quiet", input=m1)
assert read_all(w) == m1
ctl("vdi-import", "uuid=" + w, "filename=" + f, "format=vhd", "--quiet")
assert read_all(w) == bytes(model)

# A replacing import into an unattached VDI without CBT becomes its file: one layer, its
# snapshots keep their bytes. With a client attached, or CBT on, it goes through the
# handle: the client reads the new bytes, and list_changed_blocks sees the import.
r = create(name="r"); scribble(r, bytearray(SIZE), 5); rs = ctl("vdi-snapshot", "uuid=" + r); rs_bytes = read_all(rs)
ctl("vdi-import", "uuid=" + r, "filename=" + f, "format=vhd", "--quiet")
assert read_all(r) == bytes(model) and read_all(rs) == rs_bytes
assert json.loads(ctl("vdi-param-list", "uuid=" + r, "--json")).get("parent", "") in ("", None), "the imported VDI still has a parent"
h = connect(r)
ctl("vdi-import", "uuid=" + r, "filename=" + T + "/s1.raw", "--quiet")
assert b"".join(h.pread(8 * MIB, o) for o in range(0, SIZE, 8 * MIB)) == m1, "an attached client does not read the import"
h.shutdown()
ctl("vdi-enable-cbt", "uuid=" + r); cb = ctl("vdi-snapshot", "uuid=" + r)
ctl("vdi-import", "uuid=" + r, "filename=" + f, "format=vhd", "--quiet")
assert read_all(r) == bytes(model)
changed = rpc("VDI.list_changed_blocks", [cb, r])["result"]
import base64; bits = base64.b64decode(changed)
assert any(bits), "CBT did not see the import"

# VHDs qemu-img writes: dynamic and fixed.
src = bytearray(SIZE)
for _ in range(8):
    off = rng.randrange(0, SIZE - MIB) & ~4095; src[off:off + 300000] = os.urandom(300000)
open(T + "/src.raw", "wb").write(src)
for sub in ["dynamic", "fixed"]:
    run("qemu-img", "convert", "-f", "raw", "-O", "vpc", "-o", "subformat=" + sub + ",force_size=on", T + "/src.raw", T + "/q.vhd")
    ctl("vdi-import", "uuid=" + w, "filename=" + T + "/q.vhd", "format=vhd", "--quiet")
    assert read_all(w) == bytes(src), sub

# The fixtures: dynamic ones replace, the differencing one applies onto its parent's data.
fx = os.environ["FIX"]
for name in ["ext2.vhd", "image.vhd"]:
    p = pyvhdi.file(); p.open(fx + "/" + name); want = p.read_buffer(p.media_size)
    x = create(size=p.media_size, name=name)
    ctl("vdi-import", "uuid=" + x, "filename=" + fx + "/" + name, "format=vhd", "--quiet")
    h = connect(x); got = h.pread(p.media_size, 0); h.shutdown()
    assert got == want, name
    if name == "image.vhd":
        # The differencing fixture applies only its sectors: import it over a pattern.
        d = pyvhdi.file(); d.open(fx + "/image-differential.vhd"); d.set_parent(p); want2 = d.read_buffer(d.media_size)
        h = connect(x); h.pwrite(b"\xee" * p.media_size, 0); h.shutdown()
        ctl("vdi-import", "uuid=" + x, "filename=" + fx + "/image-differential.vhd", "format=vhd", "--quiet")
        h = connect(x); got = h.pread(d.media_size, 0); h.shutdown()
        mine = 0
        for o in range(0, d.media_size, 512):
            if got[o:o + 512] == want2[o:o + 512] and want2[o:o + 512] != b"\xee" * 512: mine += 1
            else: assert got[o:o + 512] == b"\xee" * 512, o
        assert mine > 0, "the differencing fixture applied nothing"

# Bad inputs over vdictl: each refused with its code, the VDI unchanged.
before = read_all(w)
big = T + "/big.vhd"; run("qemu-img", "create", "-f", "vpc", "-o", "force_size=on", big, "%d" % (2 * SIZE))
assert "VDI_TOO_SMALL" in ctl_fails("vdi-import", "uuid=" + w, "filename=" + big, "format=vhd")
open(T + "/big.raw", "wb").truncate(SIZE + 512)
assert "VDI_TOO_SMALL" in ctl_fails("vdi-import", "uuid=" + w, "filename=" + T + "/big.raw")
bad = bytearray(open(f, "rb").read()); bad[512:520] = b"xxsparse"  # no dynamic disk header
open(T + "/bad.vhd", "wb").write(bad)
e = ctl_fails("vdi-import", "uuid=" + w, "filename=" + T + "/bad.vhd", "format=vhd"); assert "IMPORT_ERROR" in e and "cookie" in e, e
bat = bytearray(open(f, "rb").read()); first = next(i for i in range(1536, 1536 + 128, 4) if bat[i:i + 4] != b"\xff" * 4)
bat[first:first + 4] = struct.pack(">I", 2)  # a block inside the header
open(T + "/bat.vhd", "wb").write(bat)
e = ctl_fails("vdi-import", "uuid=" + w, "filename=" + T + "/bat.vhd", "format=vhd"); assert "overlaps" in e, e
open(T + "/cut.vhd", "wb").write(open(f, "rb").read()[:3 * MIB])
e = ctl_fails("vdi-import", "uuid=" + w, "filename=" + T + "/cut.vhd", "format=vhd"); assert "ended early" in e, e
e = ctl_fails("vdi-import", "uuid=" + w, "filename=" + T + "/src.raw", "format=vhd"); assert "not a VHD" in e, e
e = ctl_fails("vdi-import", "uuid=" + w, "filename=" + f, "format=qcow2"); assert "VALUE_NOT_SUPPORTED" in e and "raw, vhd" in e, e
e = ctl_fails("vdi-export", "uuid=" + v, "filename=" + T + "/x", "format=raw", "base=" + s1); assert "VALUE_NOT_SUPPORTED" in e, e
assert not os.path.exists(T + "/x"), "a refused export left its file"
assert read_all(w) == before
assert not [n for n in os.listdir(os.environ["SR"]) if ".import-" in n], "staging files left"

# HTTP: each way of giving the token.
tv = token(v)
def get(path, *extra):
    return run("curl", "-sS", "-f", *extra, HTTP + path).stdout
assert get("/export_raw_vdi?vdi=%s&format=raw&token=%s" % (v, tv)) == bytes(model)
assert get("/export_raw_vdi?vdi=%s" % v, "-u", ":" + tv) == bytes(model)
assert get("/export_raw_vdi?vdi=%s&format=vhd" % v, "-H", "Authorization: Bearer " + tv) == open(f, "rb").read()
hdr = run("curl", "-sS", "-I", HTTP + "/export_raw_vdi?vdi=%s&format=vhd&token=%s" % (v, tv), text=True).stdout.lower()
assert "content-length: %d" % os.path.getsize(f) in hdr and "content-type: application/vhd" in hdr and "task-id:" in hdr, hdr

# Refusals: none, a wrong one, another VDI's, revoked, expired; a read-only token imports nothing.
def status(method, path, body=None, headers={}):
    r = urllib.request.Request(HTTP + path, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(r) as resp: return resp.status, resp.read()
    except urllib.error.HTTPError as e: return e.code, e.read()
tw = token(w)
assert status("GET", "/export_raw_vdi?vdi=" + v)[0] == 401
assert status("GET", "/export_raw_vdi?vdi=%s&token=nope" % v)[0] == 401
assert status("GET", "/export_raw_vdi?vdi=%s&token=%s" % (v, tw))[0] == 401
rev = token(v, label="gone"); assert rpc("VDI.revoke_nbd_info", [v, "/%s?token=%s" % (v, rev)])["result"] == 1
assert status("GET", "/export_raw_vdi?vdi=%s&token=%s" % (v, rev))[0] == 401
tv = token(v)
short = token(v, lifetime=1); time.sleep(1.5)
assert status("GET", "/export_raw_vdi?vdi=%s&token=%s" % (v, short))[0] == 401
ro = token(w, **{"read-only": "true"})
assert status("PUT", "/import_raw_vdi?vdi=%s&token=%s" % (w, ro), body=m1)[0] == 403
assert status("PUT", "/import_raw_vdi?vdi=%s" % w, body=m1)[0] == 401
assert status("GET", "/export_raw_vdi?vdi=%s&token=%s" % (w, ro))[1] == before

# HTTP imports: a plain body, HTTP chunked encoding, xapi's chunked framing.
code, body = status("PUT", "/import_raw_vdi?vdi=%s&format=vhd&token=%s" % (w, tw), body=open(T + "/delta.vhd", "rb").read())
assert code == 200, (code, body)
after = read_all(w)
for b in range(SIZE // (2 * MIB)):
    blk = slice(b * 2 * MIB, (b + 1) * 2 * MIB)
    # A delta holds whole blocks of the newer snapshot where the two may differ.
    assert after[blk] in (before[blk], m2[blk]), b
    if m1[blk] != m2[blk]: assert after[blk] == m2[blk], b
assert after != before
run("curl", "-sS", "-f", "-T", T + "/s1.raw", "-H", "Transfer-Encoding: chunked", HTTP + "/import_raw_vdi?vdi=%s&token=%s" % (w, tw))
assert read_all(w) == m1
frames = struct.pack("<QI", 4096, 5) + b"hello" + struct.pack("<QI", 3 * MIB, 4) + b"abcd" + struct.pack("<QI", 0, 0)
assert status("PUT", "/import_raw_vdi?vdi=%s&chunked=true&token=%s" % (w, tw), body=frames)[0] == 200
want = bytearray(m1); want[4096:4101] = b"hello"; want[3 * MIB:3 * MIB + 4] = b"abcd"
assert read_all(w) == bytes(want)

# HTTP bad inputs: refused with a status, the VDI unchanged; a cut upload too.
before = read_all(w)
assert status("PUT", "/import_raw_vdi?vdi=%s&format=vhd&token=%s" % (w, tw), body=bytes(bad))[0] == 400
assert status("PUT", "/import_raw_vdi?vdi=%s&format=vhd&token=%s" % (w, tw), body=open(big, "rb").read())[0] == 413
assert status("PUT", "/import_raw_vdi?vdi=%s&format=qcow2&token=%s" % (w, tw), body=b"x" * 512)[0] == 400
assert status("PUT", "/import_raw_vdi?vdi=%s&chunked=true&token=%s" % (w, tw), body=frames[:-12])[0] == 400
s = socket.create_connection(("127.0.0.1", int(os.environ["HTTP_PORT"])))
s.sendall(("PUT /import_raw_vdi?vdi=%s&token=%s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (w, tw, SIZE)).encode())
s.sendall(os.urandom(SIZE // 2)); s.close()
time.sleep(1)
assert read_all(w) == before, "a cut or refused upload changed the VDI"
assert not [n for n in os.listdir(os.environ["SR"]) if ".import-" in n], "staging files left"

# Resumable exports of a snapshot: cut at 60%, resume with Range; ETag and 206.
ts = token(s2, **{"read-only": "true"})
whole = get("/export_raw_vdi?vdi=%s&format=vhd&token=%s" % (s2, ts))
cut = len(whole) * 6 // 10
part = T + "/part.vhd"; open(part, "wb").write(whole[:cut])
run("curl", "-sS", "-f", "-C", "-", "-o", part, HTTP + "/export_raw_vdi?vdi=%s&format=vhd&token=%s" % (s2, ts))
assert open(part, "rb").read() == whole
assert status("GET", "/export_raw_vdi?vdi=%s&format=vhd&token=%s" % (s2, ts), headers={"Range": "bytes=%d-" % (len(whole) + 5)})[0] == 416
# A live VDI's export is not resumable: Range is ignored, the whole comes back.
code, b = status("GET", "/export_raw_vdi?vdi=%s&token=%s" % (v, tv), headers={"Range": "bytes=100-199"})
assert code == 200 and len(b) == SIZE
open(T + "/resume", "w").write(json.dumps({"s2": s2, "ts": ts, "cut": cut, "md5": md5(whole), "len": len(whole)}))
open(part, "wb").write(whole[:cut])

# Transfers are tasks: the HTTP ones are listed with their result.
tasks = ctl("task-list")
assert "VDI.export" in tasks and "VDI.import" in tasks, tasks
PY
# After a restart the same token resumes the same bytes.
restart
$PY - <<'PY'
import hashlib, json, os, subprocess
T = os.environ["TMP"]; HTTP = "http://127.0.0.1:%s" % os.environ["HTTP_PORT"]
r = json.load(open(T + "/resume"))
subprocess.run(["curl", "-sS", "-f", "-C", "-", "-o", T + "/part.vhd",
                HTTP + "/export_raw_vdi?vdi=%s&format=vhd&token=%s" % (r["s2"], r["ts"])], check=True)
d = open(T + "/part.vhd", "rb").read()
assert len(d) == r["len"] and hashlib.md5(d).hexdigest() == r["md5"], "resume after a restart gave other bytes"
PY
echo PASS
