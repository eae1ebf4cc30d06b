#!/usr/bin/env bash
# A client that vanishes with requests in flight leaves nothing attached: the VDI can be
# destroyed right after, and the server still serves others.
. "$(dirname "$0")/functions.sh"
requires nbdsh
start_vdinbd
u=$(vdictl vdi-create name-label=t virtual-size=64MiB)
nbdsh -u "$(uri "$u")" -c '
import os
for i in range(64):
    h.aio_pread(nbd.Buffer(1 << 20), (i % 64) << 20)
os._exit(0)
'
for _ in $(seq 1 50); do
    vdictl vdi-destroy "uuid=$u" 2>"$TMP/err" && break
    grep -q VDI_IN_USE "$TMP/err" || { cat "$TMP/err"; fail "unexpected error"; }
    sleep 0.1
done
vdictl vdi-list | has "$u" && fail "VDI still there (left attached)"
v=$(vdictl vdi-create name-label=t2 virtual-size=1MiB)
nbdsh -u "$(uri "$v")" -c 'assert h.pread(512, 0) == bytes(512)'

# A client that reconnects finds the chain still open (it lingers 10 s by default): the
# second GO does not reopen the layers, and the VDI is not "in use" meanwhile.
w=$(vdictl vdi-create name-label=t3 virtual-size=8MiB)
W=$(uri "$w")
nbdsh -u "$W" -c 'h.pwrite(b"\x5a" * 4096, 0)'
nbdsh -u "$W" -c 'assert h.pread(4096, 0) == b"\x5a" * 4096'
grep -q "VDI $w: its chain was still open (lingering); reused" "$TMP/server.log" || fail "the second connection reopened the chain"
vdictl vdi-resize "uuid=$w" disk-size=16MiB || fail "a lingering chain blocked resize"
nbdsh -u "$(uri "$w")" -c 'assert h.get_size() == 16 << 20; assert h.pread(4096, 0) == b"\x5a" * 4096'
vdictl vdi-destroy "uuid=$w" || fail "a lingering chain blocked destroy"
