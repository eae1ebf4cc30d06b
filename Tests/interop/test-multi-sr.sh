#!/usr/bin/env bash
# One server, two SRs (--sr given twice; the second holds qcow2 and raw only): sr-list and
# sr-param-list show both; VDI.create goes to the SR named (sr-uuid=) and refuses a format
# that SR lacks, listing its formats; tokens of a VDI in either SR work with nbdsh, nbdcopy
# and curl (HTTP export); vdi-copy into the other SR; and VDI.pool_migrate to the other SR
# while fio (--ioengine=nbd) writes with verification on one connection throughout: no
# verify error, the VDI keeps its uuid and token, its record and files are in the new SR,
# its snapshot stays in the old one and reads as before, and an incremental backup from
# that snapshot (list_changed_blocks across the two SRs) is byte-exact. Then kill -9 in a
# move's switch, before and after the destination's commit: each start leaves the VDI
# whole in exactly one SR.
. "$(dirname "$0")/functions.sh"
requires fio nbdcopy nbdsh qemu-img curl
SR2=$TMP/sr2
start_vdinbd --sr "$SR2,formats=qcow2+raw"
vdictl sr-list --json > "$TMP/srs.json"
read -r sr1 sr2 < <($PY - "$TMP/srs.json" "$SR" "$SR2" <<'PY'
import json, os, sys
srs = json.load(open(sys.argv[1]))
assert len(srs) == 2, srs
by = {os.path.realpath(r["path"]): u for u, r in srs.items()}
a, b = by[os.path.realpath(sys.argv[2])], by[os.path.realpath(sys.argv[3])]
assert srs[b]["supported_image_formats"] == ["qcow2", "raw"], srs[b]
print(a, b)
PY
) || fail "sr-list: $(cat "$TMP/srs.json")"
vdictl sr-param-list "uuid=$sr2" | has "supported-image-formats: qcow2, raw" || fail "sr-param-list of the second SR"
vdictl sr-param-list | has "uuid.*: $sr1" || fail "sr-param-list without uuid= is not the default SR"
has "serving SR .*sr2 .*uuid $sr2" < "$TMP/server.log" || fail "the banner does not name the second SR"

# Creating in each SR, and the refusals.
a=$(vdictl vdi-create name-label=a virtual-size=64MiB)
b=$(vdictl vdi-create name-label=b virtual-size=64MiB "sr-uuid=$sr2")
[ -f "$SR/$a.vhd" ] && [ -f "$SR2/$b.qcow2" ] || fail "files: $(ls "$SR" "$SR2")"
[ "$(vdictl vdi-param-list "uuid=$b" --json | $PY -c 'import json,sys; print(json.load(sys.stdin)["SR"])')" = "$sr2" ] || fail "b's SR field"
vdictl vdi-list | grep -c "^uuid ( RO): \($a\|$b\)$" | has -x 2 || fail "vdi-list does not list both SRs' VDIs"
if vdictl vdi-create name-label=x virtual-size=1MiB "sr-uuid=$sr2" sm-config:image-format=vhd 2>"$TMP/err"; then fail "vhd made in an SR without it"; fi
has "qcow2, raw" < "$TMP/err" || fail "refusal does not list the SR's formats: $(cat "$TMP/err")"
if vdictl vdi-create name-label=x virtual-size=1MiB sr-uuid=00000000-0000-0000-0000-000000000000 2>"$TMP/err"; then fail "made in an unknown SR"; fi
has "HANDLE_INVALID" < "$TMP/err" || fail "unknown SR: $(cat "$TMP/err")"

# I/O through tokens of both SRs.
$PY - "$(uri "$a")" "$(uri "$b")" <<'PY'
import nbd, sys
for i, u in enumerate(sys.argv[1:]):
    h = nbd.NBD(); h.connect_uri(u)
    h.pwrite(bytes([0x41 + i]) * (1 << 20), 3 << 20); h.flush()
    assert h.pread(1 << 20, 3 << 20) == bytes([0x41 + i]) * (1 << 20)
PY
[ $? = 0 ] || fail "nbdsh I/O"
http=$(vdictl vdi-get-nbd-info "uuid=$b" | sed -n 's/^http: //p' | head -1)
curl -sf "${http/format=vhd/format=raw}" -o "$TMP/b.raw" || fail "HTTP export of the second SR's VDI"
$PY -c "import sys; d=open('$TMP/b.raw','rb').read(); assert d[3<<20:4<<20]==b'B'*(1<<20) and len(d)==64<<20" || fail "HTTP export bytes"

# A copy into the other SR: its default format there (qcow2; it holds no VHD).
c=$(vdictl vdi-copy "uuid=$a" "sr-uuid=$sr2" --quiet) || fail "vdi-copy into the second SR"
[ -f "$SR2/$c.qcow2" ] || fail "the copy's file: $(ls "$SR2")"
nbdcopy "$(uri "$a")" "$TMP/a.raw"; nbdcopy "$(uri "$c")" "$TMP/c.raw"
cmp "$TMP/a.raw" "$TMP/c.raw" || fail "the copy differs"

# Live move of a CBT VDI with a snapshot, VHD in the first SR to qcow2 in the second.
u=$(vdictl vdi-create name-label=t virtual-size=96MiB)
vdictl vdi-enable-cbt "uuid=$u"
sp=$(vdictl vdi-snapshot "uuid=$u")  # the empty disk: the base of the check after s0 goes
U=$(uri "$u")
fio --name=fill --ioengine=nbd --uri="$U" --rw=write:2M --bs=1M --size=96M --iodepth=4 >"$TMP/fill.log" 2>&1 || { cat "$TMP/fill.log"; fail "fio fill"; }
s0=$(vdictl vdi-snapshot "uuid=$u")
nbdcopy "$(uri "$s0")" "$TMP/s0.raw"
fio --name=verify --ioengine=nbd --uri="$U" --rw=randwrite --bs=4k --size=40M --iodepth=8 --time_based --runtime=8 \
    --verify=crc32c --verify_backlog=512 --verify_fatal=1 --do_verify=1 >"$TMP/fio.log" 2>&1 &
writer=$!
sleep 1.5
vdictl vdi-pool-migrate "uuid=$u" "sr-uuid=$sr2" --quiet > "$TMP/migrated" 2>"$TMP/migrate.err" || { cat "$TMP/migrate.err"; fail "the move failed"; }
[ "$(cat "$TMP/migrated")" = "$u" ] || fail "the move returned $(cat "$TMP/migrated")"
kill -0 "$writer" 2>/dev/null || fail "fio ended before the move did: the test proves nothing"
wait "$writer" || { cat "$TMP/fio.log"; fail "fio reported errors across the move"; }
has -E "err= *0" "$TMP/fio.log" || { cat "$TMP/fio.log"; fail "fio errors"; }
has "migrated VDI $u from vhd to qcow2 in SR $sr2" < "$TMP/server.log" || fail "no move logged"
[ -f "$SR2/$u.qcow2" ] && [ -f "$SR2/$u.cbtlog" ] && [ ! -e "$SR/$u.vhd" ] && [ ! -e "$SR/$u.cbtlog" ] || fail "files after the move: $(ls "$SR" "$SR2")"
vdictl vdi-param-list "uuid=$u" --json > "$TMP/rec.json"
$PY -c "import json; r=json.load(open('$TMP/rec.json')); assert r['SR']=='$sr2' and r['cbt_enabled'] and r['sm_config']['image-format']=='qcow2', r" || fail "record after the move"
[ "$(vdictl vdi-param-list "uuid=$s0" --json | $PY -c 'import json,sys; print(json.load(sys.stdin)["SR"])')" = "$sr1" ] || fail "the snapshot left its SR"
nbdcopy "$(uri "$s0")" "$TMP/s0-again.raw"
cmp "$TMP/s0.raw" "$TMP/s0-again.raw" || fail "the snapshot changed"
# The token from before the move still opens the VDI.
nbdinfo --size "$U" | has -x 100663296 || fail "the old token after the move"
s1=$(vdictl vdi-snapshot "uuid=$u")
[ -f "$SR2/$s1.cbtlog" ] || fail "the new snapshot's log is not in the second SR"
vdictl vdi-list-changed-blocks "vdi-from=$s0" "vdi-to=$s1" > "$TMP/bitmap.b64" || fail "list_changed_blocks across the SRs"
$PY "$(dirname "$0")/incremental_backup.py" "$TMP/s0.raw" "$TMP/bitmap.b64" "$(uri "$s1")" || fail "the incremental backup"
# Destroying the old snapshot merges its log into the next one, across the SRs.
vdictl vdi-destroy "uuid=$s0" || fail "destroy the snapshot left behind"
vdictl vdi-list-changed-blocks "vdi-from=$sp" "vdi-to=$s1" > "$TMP/bitmap2.b64" || fail "list_changed_blocks past the destroyed snapshot"
$PY - "$TMP/bitmap2.b64" "$(uri "$s1")" <<'PY' || fail "the changes before the destroyed snapshot were lost from the log chain"
import base64, nbd, sys
bm = base64.b64decode(open(sys.argv[1]).read())
h = nbd.NBD(); h.connect_uri(sys.argv[2])
BLK = 64 << 10
for i in range(h.get_size() // BLK):
    if h.pread(BLK, i * BLK) != bytes(BLK):
        assert bm[i // 8] & (0x80 >> (i % 8)), "block %d holds data but is not in the bitmap" % i
PY
nbdcopy "$(uri "$u")" "$TMP/u.raw"
kill "$SERVER_PID"; wait "$SERVER_PID" || fail "server exit status"
for f in "$SR"/*.vhd "$SR2"/*.qcow2; do check_image "$f" || fail "check $f"; done
ls "$SR2" | has migrating && fail "a staging file was left: $(ls "$SR2")"

# kill -9 in the switch: before the destination's commit (undone) and after (finished).
for step in migrate-switch move-committed; do
    VDINBD_FAULT_GC_STEP=$step:1 start_vdinbd --sr "$SR2,formats=qcow2+raw"
    from=$SR to=$SR2 fromsr=$sr1 tosr=$sr2 f=vhd
    [ -f "$SR2/$u.qcow2" ] && { from=$SR2 to=$SR fromsr=$sr2 tosr=$sr1 f=qcow2; }
    if vdictl vdi-pool-migrate "uuid=$u" "sr-uuid=$tosr" image-format=vhd --quiet 2>/dev/null; then fail "the fault at $step did not fire"; fi
    wait "$SERVER_PID" 2>/dev/null || true
    start_vdinbd --sr "$SR2,formats=qcow2+raw"
    has -E "recovery: (finished moving|undid an unfinished move of) VDI $u" < "$TMP/server.log" || fail "no recovery logged after $step"
    where=$(vdictl vdi-param-list "uuid=$u" --json | $PY -c 'import json,sys; print(json.load(sys.stdin)["SR"])')
    case $step in
        migrate-switch) [ "$where" = "$fromsr" ] || fail "after $step the VDI is in $where" ;;
        move-committed) [ "$where" = "$tosr" ] || fail "after $step the VDI is in $where" ;;
    esac
    n=$(ls "$SR" "$SR2" | grep -c "^$u\.\(vhd\|qcow2\|raw\)$")
    [ "$n" = 1 ] || fail "after $step: $n files of the VDI: $(ls "$SR" "$SR2")"
    ls "$SR" "$SR2" | has "migrating\|copying" && fail "leftovers after $step: $(ls "$SR" "$SR2")"
    nbdcopy "$(uri "$u")" "$TMP/after.raw"
    cmp "$TMP/u.raw" "$TMP/after.raw" || fail "the VDI's bytes changed over the kill at $step"
    kill "$SERVER_PID"; wait "$SERVER_PID" || fail "server exit status"
    for f in "$SR"/*.vhd "$SR2"/*.qcow2; do check_image "$f" || fail "check $f after $step"; done
done
echo PASS
