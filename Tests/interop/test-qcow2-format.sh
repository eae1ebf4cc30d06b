#!/usr/bin/env bash
# qcow2 VDIs (sm-config:image-format=qcow2): `<uuid>.qcow2` files that qemu-img checks
# clean after a clean stop and after kill -9 (leaks at worst, none once we reopened
# them); a 3-deep chain of snapshots that `qemu-img info --backing-chain` shows and
# `qemu-nbd -f qcow2` serves with the same bytes as our export, checked against a model
# of random writes, trims and zeroes; data written by qemu-io into our file reads back
# through our export; qemu-made images with 2 MiB clusters and with compressed clusters
# (introduced by SR.scan) read correctly and take writes; 4 TiB (qcow2 chosen by size)
# and 16 TiB VDIs; the refusals.
. "$(dirname "$0")/functions.sh"
requires nbdinfo qemu-img qemu-io qemu-nbd nbdcopy
$PY -c 'import nbd' || { [ "${CI:-}" = true ] && exit 1; echo "SKIP: python nbd"; exit 77; }
start_vdinbd
V=$(vdictl vdi-create name-label=q virtual-size=64MiB sm-config:image-format=qcow2)
F="$SR/$V.qcow2"
[ -f "$F" ] || fail "no $F"
qemu-img info --output=json "$F" | $PY -c 'import json,sys; j=json.load(sys.stdin); assert j["format"] == "qcow2" and j["virtual-size"] == 64 << 20 and j["cluster-size"] == 65536, j'
qemu-img check "$F" >/dev/null || fail "qemu-img check fails on a new file"
vdictl vdi-param-list "uuid=$V" | has "image-format: qcow2" || fail "sm_config lacks image-format: qcow2"

# Random writes, trims and zeroes through libnbd, snapshots between: a 3-deep chain.
export TMP
model_round() {
    U=$(uri "$V") SEED=$1 $PY - <<'PY'
import os, random, nbd
U, TMP, seed = os.environ["U"], os.environ["TMP"], int(os.environ["SEED"])
size = 64 << 20
path = TMP + "/model"
model = bytearray(open(path, "rb").read()) if os.path.exists(path) else bytearray(size)
h = nbd.NBD(); h.connect_uri(U)
rng = random.Random(seed)
for step in range(300):
    off = rng.randrange(0, size // 512) * 512
    n = min(size - off, rng.choice([512, 4096, 65536, 200000 // 512 * 512, 1 << 20]))
    k = rng.randrange(6)
    if k < 3:
        d = os.urandom(n); h.pwrite(d, off); model[off:off + n] = d
    elif k == 3:
        h.trim(n, off); model[off:off + n] = bytes(n)
    elif k == 4:
        h.zero(n, off); model[off:off + n] = bytes(n)
    else:
        assert h.pread(n, off) == bytes(model[off:off + n]), "read at %d+%d" % (off, n)
h.flush()
for o in range(0, size, 4 << 20):
    assert h.pread(4 << 20, o) == bytes(model[o:o + (4 << 20)]), "the export differs from the model at %d" % o
h.shutdown()
open(path, "wb").write(model)
PY
}
model_round 1
S1=$(vdictl vdi-snapshot "uuid=$V")
model_round 2
S2=$(vdictl vdi-snapshot "uuid=$V")
model_round 3
# The collector may coalesce the snapshots' chain: pause it while qemu looks.
qemu-img info --backing-chain "$F" > "$TMP/chain"
n=$(grep -c '^image:' "$TMP/chain")
[ "$n" -ge 2 ] || fail "qemu-img sees a chain of $n files: $(cat "$TMP/chain")"
grep -q "backing file format: qcow2" "$TMP/chain" || fail "no backing format in $(cat "$TMP/chain")"

# A clean stop: every file of the SR checks clean (no leaks either).
kill "$SERVER_PID"; wait "$SERVER_PID" || true; SERVER_PID=""
for q in "$SR"/*.qcow2; do
    qemu-img check "$q" > "$TMP/check" 2>&1 || fail "qemu-img check $q after a clean stop: $(cat "$TMP/check")"
done
# qemu-nbd serving our chain gives the model's bytes.
QP=$(free_port)
qemu-nbd -r -f qcow2 -p "$QP" -b 127.0.0.1 -t "$F" & QPID=$!
for _ in $(seq 50); do nbdinfo --size "nbd://127.0.0.1:$QP" >/dev/null 2>&1 && break; sleep 0.1; done
nbdcopy "nbd://127.0.0.1:$QP" "$TMP/qemu.raw"
kill "$QPID"; wait "$QPID" || true
cmp "$TMP/qemu.raw" "$TMP/model" || fail "qemu-nbd reads our chain differently from the model"
# qemu-io writes into our file; our export reads it back.
qemu-io -f qcow2 -c "write -P 0xab 1M 192k" -c "write -z 8M 64k" -c "write -P 0xcd 63M 4k" "$F" >/dev/null
$PY - "$TMP/model" <<'PY'
import sys
m = bytearray(open(sys.argv[1], "rb").read())
m[1 << 20:(1 << 20) + 192 * 1024] = b"\xab" * (192 * 1024)
m[8 << 20:(8 << 20) + 65536] = bytes(65536)
m[63 << 20:(63 << 20) + 4096] = b"\xcd" * 4096
open(sys.argv[1], "wb").write(m)
PY
start_vdinbd
nbdcopy "$(uri "$V")" "$TMP/ours.raw"
cmp "$TMP/ours.raw" "$TMP/model" || fail "our export misreads what qemu-io wrote"

# kill -9 during writes: what was flushed is there; qemu-img check finds leaks at most,
# and none after we reopened the file.
U=$(uri "$V") $PY - <<'PY' &
import os, nbd
h = nbd.NBD(); h.connect_uri(os.environ["U"])
h.pwrite(b"\x5a" * (1 << 20), 40 << 20); h.flush()
open(os.environ["TMP"] + "/flushed", "w").write("1")
i = 0
while True:
    h.pwrite(os.urandom(65536), ((i * 7919) % 500) * 65536); i += 1
PY
W=$!
for _ in $(seq 100); do [ -f "$TMP/flushed" ] && break; sleep 0.1; done
sleep 1
kill -9 "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true; SERVER_PID=""
wait "$W" 2>/dev/null || true
set +e; qemu-img check "$F" > "$TMP/check" 2>&1; rc=$?; set -e
[ $rc = 0 ] || [ $rc = 3 ] || fail "qemu-img check after kill -9: rc $rc: $(cat "$TMP/check")"
if [ $rc = 3 ]; then grep -q "leaked clusters" "$TMP/check" || fail "rc 3 without leaks: $(cat "$TMP/check")"; fi
start_vdinbd
$PY - "$(uri "$V")" <<'PY'
import sys, nbd
h = nbd.NBD(); h.connect_uri(sys.argv[1])
assert h.pread(1 << 20, 40 << 20) == b"\x5a" * (1 << 20), "a flushed write was lost"
h.shutdown()
PY
kill "$SERVER_PID"; wait "$SERVER_PID" || true; SERVER_PID=""
qemu-img check "$F" > "$TMP/check" 2>&1 || fail "qemu-img check after our reopen: $(cat "$TMP/check")"

# qemu-made images: 2 MiB clusters, and compressed clusters; SR.scan introduces them.
start_vdinbd
# Random data (stored as is), zeros, and text that deflates (stored compressed).
$PY - "$TMP/src.raw" <<'PY'
import os, sys
text = b"".join(b"sector %08d of a compressible cluster\n" % i for i in range((16 << 20) // 40 + 1))[:16 << 20]
open(sys.argv[1], "wb").write(os.urandom(4 << 20) + bytes(4 << 20) + text)
PY
B=$($PY -c 'import uuid; print(uuid.uuid4())'); C=$($PY -c 'import uuid; print(uuid.uuid4())')
qemu-img convert -f raw -O qcow2 -o cluster_size=2M "$TMP/src.raw" "$SR/$B.qcow2"
qemu-img convert -c -f raw -O qcow2 "$TMP/src.raw" "$SR/$C.qcow2"
# (qemu-img 7's map has no "compressed" field: data with no host offset is compressed.)
qemu-img map --output=json "$SR/$C.qcow2" | $PY -c 'import json,sys; m=json.load(sys.stdin); assert any(e["data"] and "offset" not in e for e in m), m' \
    || fail "qemu-img made no compressed clusters"
vdictl sr-scan >/dev/null
for u in "$B" "$C"; do
    nbdcopy "$(uri "$u")" "$TMP/got.raw"
    cmp "$TMP/got.raw" "$TMP/src.raw" || fail "a qemu-made image ($u) reads differently"
    # A write into it (copy-up of a compressed cluster) and a snapshot over it.
    $PY - "$(uri "$u")" <<'PY'
import sys, nbd
h = nbd.NBD(); h.connect_uri(sys.argv[1])
h.pwrite(b"\x11" * 4096, 3 * 65536 + 512); h.flush()
assert h.pread(65536 * 2, 3 * 65536 - 65536)[65536 + 512:65536 + 512 + 4096] == b"\x11" * 4096
h.shutdown()
PY
done
kill "$SERVER_PID"; wait "$SERVER_PID" || true; SERVER_PID=""
for u in "$B" "$C"; do
    qemu-img check "$SR/$u.qcow2" > "$TMP/check" 2>&1 || fail "qemu-img check of a qemu-made image we wrote: $(cat "$TMP/check")"
    qemu-img convert -O raw "$SR/$u.qcow2" "$TMP/got.raw"
    $PY - "$TMP/got.raw" "$TMP/src.raw" <<'PY'
import sys
a, b = open(sys.argv[1], "rb").read(), bytearray(open(sys.argv[2], "rb").read())
o = 3 * 65536 + 512; b[o:o + 4096] = b"\x11" * 4096
assert a == bytes(b), "qemu reads back our write into its image differently"
PY
done

# Sizes: 4 TiB with no format given is qcow2 (past VHD's 2040 GiB); 16 TiB; not more.
start_vdinbd
L=$(vdictl vdi-create name-label=big virtual-size=4TiB)
[ -f "$SR/$L.qcow2" ] || fail "a 4 TiB VDI is not qcow2: $(ls "$SR")"
H=$(vdictl vdi-create name-label=huge virtual-size=16TiB sm-config:image-format=qcow2)
for u in "$L" "$H"; do
    $PY - "$(uri "$u")" <<'PY'
import sys, nbd
h = nbd.NBD(); h.connect_uri(sys.argv[1])
size = h.get_size()
for off in (0, size // 2 + 12345 * 512, size - 65536):
    h.pwrite(b"\x77" * 65536, off)
h.flush()
for off in (0, size // 2 + 12345 * 512, size - 65536):
    assert h.pread(65536, off) == b"\x77" * 65536, off
assert h.pread(4096, size // 4) == bytes(4096)
h.shutdown()
PY
done
nbdinfo --size "$(uri "$H")" | has "^$((16 << 40))$" || fail "16 TiB VDI has the wrong size"
vdictl vdi-create name-label=x virtual-size=17TiB sm-config:image-format=qcow2 > "$TMP/err" 2>&1 && fail "17 TiB qcow2 accepted"
has -i "qcow2" "$TMP/err" || fail "17 TiB refusal does not name qcow2: $(cat "$TMP/err")"
kill "$SERVER_PID"; wait "$SERVER_PID" || true; SERVER_PID=""
for u in "$L" "$H"; do qemu-img check "$SR/$u.qcow2" > "$TMP/check" 2>&1 || fail "qemu-img check $u: $(cat "$TMP/check")"; done
echo "qcow2 format ok"
