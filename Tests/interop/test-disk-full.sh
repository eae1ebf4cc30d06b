#!/usr/bin/env bash
# A full SR (a 40 MiB tmpfs): writes that need new space fail with ENOSPC over NBD, writes
# into space already allocated still succeed, nothing acknowledged before changes, the
# server keeps serving; snapshot and create fail with an error naming the cause; once
# space is freed, writes that need it succeed again. For the run's format (VHD, or qcow2
# or raw with VDINBD_SR_FORMATS; a raw VDI has no snapshots, so there only the create).
. "$(dirname "$0")/functions.sh"
requires nbdsh
[ "$(id -u)" = 0 ] || { echo "SKIP: mounting a tmpfs needs root"; exit 77; }
mkdir -p "$TMP/sr"
mount -t tmpfs -o size=40m tmpfs "$TMP/sr" || { [ "${CI:-}" = true ] && fail "cannot mount a tmpfs"; echo "SKIP: no tmpfs mount here"; exit 77; }
trap 'rc=$?; { set +x; } 2>/dev/null; [ -n "$SERVER_PID" ] && { kill "$SERVER_PID" 2>/dev/null; wait "$SERVER_PID" 2>/dev/null; }; umount "$TMP/sr" 2>/dev/null; cleanup $rc' EXIT
start_vdinbd
u=$(vdictl vdi-create name-label=t virtual-size=64MiB)
U=$(uri "$u")
head -c 6M /dev/zero > "$SR/reserve"   # given back at the end, so there is space again
$PY - "$U" "$SR" <<'PY'
import errno, os, random, sys, nbd
uri, sr = sys.argv[1], sys.argv[2]
h = nbd.NBD(); h.connect_uri(uri)
rng = random.Random(5)
model = bytearray(64 << 20)
def w(off, data):
    h.pwrite(data, off); model[off:off + len(data)] = data
for o in range(0, 8 << 20, 1 << 20): w(o, os.urandom(1 << 20))
h.flush()
# Fill the SR: 1 MiB writes past the data until one fails for want of space.
failed_at = None
for o in range(8 << 20, 64 << 20, 1 << 20):
    data = os.urandom(1 << 20)
    try:
        h.pwrite(data, o); model[o:o + len(data)] = data
    except nbd.Error as e:
        assert getattr(e, "errnum", None) == errno.ENOSPC, "a write into new space failed with %s, not ENOSPC" % e
        failed_at = o
        break
assert failed_at is not None, "the 40 MiB SR took 64 MiB of data"
# Writes into space already allocated still succeed (and flush).
for _ in range(20):
    o = rng.randrange(0, 8 << 20) // 4096 * 4096
    w(o, os.urandom(4096))
h.flush()
# Everything acknowledged reads back; the failed write left nothing of itself.
got = bytearray(b"".join(h.pread(4 << 20, o) for o in range(0, 64 << 20, 4 << 20)))
# The failed write's own range is left undefined (as a failed pwrite(2) may have written
# part of it): take what it reads as the model there from now on.
bad = [o for o in range(0, 64 << 20, 65536) if got[o:o + 65536] != model[o:o + 65536]]
assert all(failed_at <= o < failed_at + (1 << 20) for o in bad), "the disk differs from what was acknowledged at %s" % [o >> 16 for o in bad][:20]
model[failed_at:failed_at + (1 << 20)] = got[failed_at:failed_at + (1 << 20)]
h.shutdown()
# A new connection is served.
g = nbd.NBD(); g.connect_uri(uri)
assert g.pread(1 << 20, 0) == bytes(model[:1 << 20]); g.shutdown()
open(sys.argv[2] + "/../model.raw", "wb").write(model)
print("ENOSPC at %d MiB; rewrites of allocated space kept working" % (failed_at >> 20))
PY
# Take the last of the space, then a snapshot and a create: refused, naming the cause.
dd if=/dev/zero of="$SR/filler" bs=64k status=none 2>/dev/null || true
format=${VDINBD_SR_FORMATS:-vhd}; format=${format%%+*}
if [ "$format" != raw ]; then
    if vdictl vdi-snapshot "uuid=$u" >/dev/null 2>"$TMP/err"; then fail "a snapshot succeeded on a full SR"; fi
    grep -qi "no space" "$TMP/err" || fail "the snapshot's error does not name the cause: $(cat "$TMP/err")"
fi
if vdictl vdi-create name-label=x virtual-size=1MiB >/dev/null 2>"$TMP/err"; then fail "a create succeeded on a full SR"; fi
grep -qi "no space" "$TMP/err" || fail "the create's error does not name the cause: $(cat "$TMP/err")"
vdictl vdi-list | has "$u" || fail "the VDI's record is gone"
# Space again: writes that need it work, and the data is still the model's.
rm -f "$SR/filler" "$SR/reserve"
$PY - "$U" "$TMP/model.raw" <<'PY'
import sys, nbd
h = nbd.NBD(); h.connect_uri(sys.argv[1])
model = bytearray(open(sys.argv[2], "rb").read())
got = b"".join(h.pread(4 << 20, o) for o in range(0, 64 << 20, 4 << 20))
assert got == bytes(model), "the disk changed while the SR was full"
h.pwrite(b"z" * 65536, 60 << 20); h.flush()
assert h.pread(65536, 60 << 20) == b"z" * 65536
PY
[ "$format" = raw ] || vdictl vdi-snapshot "uuid=$u" >/dev/null || fail "a snapshot fails once there is space"
vdictl vdi-create name-label=y virtual-size=1MiB >/dev/null || fail "a create fails once there is space"
echo PASS
