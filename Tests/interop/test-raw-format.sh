#!/usr/bin/env bash
# Raw VDIs (sm-config:image-format=raw): a sparse `<uuid>.raw` file that qemu-img reads as
# raw; random writes, trims and zeroes through libnbd match a model and the file itself;
# BLOCK_STATUS (nbdinfo --map) follows the file's holes; the refusals (snapshot, clone,
# CBT, on_boot=reset, scratch views) are typed; export as VHD and import of a qemu-made
# VHD; resize; kill -9 keeps what was flushed. Then the format refusals: an unknown
# format, one the SR does not hold (--sr PATH,formats=vhd), VHD past 2040 GiB.
. "$(dirname "$0")/functions.sh"
requires nbdinfo qemu-img nbdcopy
$PY -c 'import nbd' || { [ "${CI:-}" = true ] && exit 1; echo "SKIP: python nbd"; exit 77; }
start_vdinbd
V=$(vdictl vdi-create name-label=raw virtual-size=64MiB sm-config:image-format=raw)
F="$SR/$V.raw"
[ -f "$F" ] || fail "no $F"
qemu-img info --output=json "$F" | $PY -c 'import json,sys; j=json.load(sys.stdin); assert j["format"] == "raw" and j["virtual-size"] == 64 << 20, j'
vdictl vdi-param-list "uuid=$V" | has "image-format: raw" || fail "sm_config lacks image-format: raw"
U=$(uri "$V")
export U F TMP
$PY - <<'PY'
import os, random, nbd
U, F = os.environ["U"], os.environ["F"]
size = 64 << 20
model = bytearray(size)
h = nbd.NBD(); h.add_meta_context("base:allocation"); h.connect_uri(U)
assert h.get_size() == size
rng = random.Random(7)
for step in range(400):
    off = rng.randrange(0, size // 4096) * 4096
    n = min(size - off, rng.randrange(1, 65) * 4096)
    k = step % 4
    if k < 2:
        d = os.urandom(n); h.pwrite(d, off); model[off:off + n] = d
    elif k == 2:
        h.trim(n, off); model[off:off + n] = bytes(n)
    else:
        h.zero(n, off); model[off:off + n] = bytes(n)
    if step % 50 == 0:
        assert h.pread(n, off) == bytes(model[off:off + n]), "read at %d" % off
h.flush()
for o in range(0, size, 4 << 20):
    assert h.pread(4 << 20, o) == bytes(model[o:o + (4 << 20)]), "the export differs from the model at %d" % o
with open(F, "rb") as f: assert f.read() == bytes(model), "the file differs from the model"
# BLOCK_STATUS: a hole reported by the server is a hole in the file (SEEK_DATA past it).
fd = os.open(F, os.O_RDONLY)
ext = []
h.block_status(size, 0, lambda ctx, off, entries, err: ext.extend(entries) or 0)
pos = 0
for i in range(0, len(ext), 2):
    length, flags = ext[i], ext[i + 1]
    if flags & 1:  # hole
        try: nxt = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError: nxt = size
        assert nxt >= pos + length, "server reports a hole at %d+%d, the file has data at %d" % (pos, length, nxt)
        assert model[pos:pos + length] == bytes(length)
    pos += length
assert pos == size, pos
h.shutdown()
PY
# nbdinfo --map agrees with the file's own holes.
nbdinfo --map "$U" | awk '{print $1, $2, ($3 % 2)}' > "$TMP/map"
$PY - "$F" "$TMP/map" <<'PY'
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY); size = os.fstat(fd).st_size
holes = []
pos = 0
while pos < size:
    try: d = os.lseek(fd, pos, os.SEEK_DATA)
    except OSError: d = size
    if d > pos: holes.append((pos, d))
    if d >= size: break
    pos = os.lseek(fd, d, os.SEEK_HOLE)
got = []
for line in open(sys.argv[2]):
    o, n, hole = map(int, line.split())
    if hole:
        if got and got[-1][1] == o: got[-1] = (got[-1][0], o + n)
        else: got.append((o, o + n))
assert got == holes, (got[:5], holes[:5])
PY
# Refusals: typed, and the VDI untouched.
cp "$F" "$TMP/before"
for cmd in "vdi-snapshot uuid=$V" "vdi-clone uuid=$V" "vdi-enable-cbt uuid=$V" "vdi-param-set uuid=$V on-boot=reset"; do
    if vdictl $cmd 2>"$TMP/err"; then fail "$cmd accepted on a raw VDI"; fi
    grep -q "VDI_INCOMPATIBLE_TYPE" "$TMP/err" || fail "$cmd: $(cat "$TMP/err")"
done
if vdictl vdi-get-nbd-info "uuid=$V" mode=scratch >/dev/null 2>"$TMP/err"; then fail "a scratch token for a raw VDI"; fi
grep -q "VDI_INCOMPATIBLE_TYPE" "$TMP/err" || fail "scratch token: $(cat "$TMP/err")"
cmp "$F" "$TMP/before" || fail "a refusal changed the raw VDI"
# Export as VHD, import a qemu-made VHD.
vdictl vdi-export "uuid=$V" format=vhd "filename=$TMP/r.vhd" --quiet
qemu-img compare -f vpc -F raw "$TMP/r.vhd" "$F" >/dev/null || fail "the VHD export of a raw VDI differs"
head -c 8M /dev/urandom > "$TMP/src.raw"; truncate -s 64M "$TMP/src.raw"
qemu-img convert -f raw -O vpc -o subformat=dynamic,force_size=on "$TMP/src.raw" "$TMP/q.vhd"
vdictl vdi-import "uuid=$V" "filename=$TMP/q.vhd" format=vhd --quiet
cmp "$F" "$TMP/src.raw" || fail "a VHD import into a raw VDI differs"
[ "$(stat -c %b "$F")" -lt $((20 << 11)) ] || fail "the imported raw file is not sparse ($(stat -c %b "$F") blocks)"
vdictl vdi-resize "uuid=$V" disk-size=96MiB >/dev/null
[ "$(stat -c %s "$F")" = $((96 << 20)) ] || fail "resize did not grow the raw file"
nbdinfo --size "$(uri "$V")" | has -x $((96 << 20)) || fail "the export's size after resize"
# kill -9 keeps what was flushed.
head -c 1M /dev/urandom > "$TMP/last"
nbdcopy "$TMP/last" "$(uri "$V")"
kill -9 "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true
start_vdinbd
nbdcopy "$(uri "$V")" "$TMP/after"
cmp -n $((1 << 20)) "$TMP/after" "$TMP/last" || fail "flushed data lost across kill -9"
# The SR's record: its uuid (a VDI's SR field), its formats; the uuid survives a restart.
vdictl sr-param-list --json > "$TMP/sr.json"
vdictl vdi-param-list "uuid=$V" --json > "$TMP/vdi.json"
$PY - "$TMP/sr.json" "$TMP/vdi.json" <<'PY'
import json, sys
sr, vdi = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
vdi = vdi[0] if isinstance(vdi, list) else vdi
assert sr["supported_image_formats"] == ["vhd", "raw", "qcow2"], sr
assert vdi["SR"] == sr["uuid"], (vdi["SR"], sr["uuid"])
assert sr["virtual_allocation"] >= 96 << 20 and sr["physical_size"] > 0, sr
PY
SRU=$($PY -c 'import json,sys; print(json.load(open(sys.argv[1]))["uuid"])' "$TMP/sr.json")
vdictl sr-list | has "uuid: $SRU" || fail "sr-list does not show the SR"
# Format refusals.
if vdictl vdi-create name-label=x virtual-size=1GiB sm-config:image-format=vhdx 2>"$TMP/err"; then fail "vhdx accepted"; fi
grep -q "VALUE_NOT_SUPPORTED.*known: vhd, raw, qcow2" "$TMP/err" || fail "unknown format: $(cat "$TMP/err")"
if vdictl vdi-create name-label=x virtual-size=3TiB sm-config:image-format=vhd 2>"$TMP/err"; then fail "a 3 TiB VHD"; fi
grep -q "VALUE_NOT_SUPPORTED.*vhd holds at most 2040 GiB.*image-format=" "$TMP/err" || fail "3 TiB VHD: $(cat "$TMP/err")"
kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true
SR0=$SR
"$VDINBD_BIN/vdinbd" --sr "$TMP/sr2,formats=vhd" --listen 127.0.0.1:0 --tls off --http off >"$TMP/server2.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 1 100); do [ -S "$TMP/sr2/control.sock" ] && break; sleep 0.1; done
grep -q "formats vhd)" "$TMP/server2.log" || fail "the banner does not name the SR's formats"
if "$VDINBD_BIN/vdictl" --socket "$TMP/sr2/control.sock" vdi-create name-label=x virtual-size=1GiB sm-config:image-format=raw 2>"$TMP/err"; then
    fail "raw made in an SR that holds vhd only"
fi
grep -q "this SR holds vhd$" "$TMP/err" || fail "unsupported format: $(cat "$TMP/err")"
# Past VHD's limit with no format asked, in an SR whose only format is VHD: refused, listing it.
if "$VDINBD_BIN/vdictl" --socket "$TMP/sr2/control.sock" vdi-create name-label=x virtual-size=3TiB 2>"$TMP/err"; then
    fail "3 TiB made in an SR that holds vhd only"
fi
grep -q "VALUE_NOT_SUPPORTED.*2040 GiB.*this SR (vhd)" "$TMP/err" || fail "VHD past 2040 GiB: $(cat "$TMP/err")"
kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true
start_vdinbd
[ "$(vdictl sr-param-list --json | $PY -c 'import json,sys; print(json.load(sys.stdin)["uuid"])')" = "$SRU" ] || fail "the SR's uuid changed across a restart"
echo PASS
