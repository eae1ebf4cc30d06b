"""An incremental backup as a backup agent makes one, checked.

  incremental_backup.py BACKUP BITMAP SNAPSHOT_URI [VDI_URI]

BACKUP holds the bytes of an earlier snapshot, BITMAP (base64) is list_changed_blocks
from it to SNAPSHOT: the changed 64 KiB blocks are read from SNAPSHOT onto BACKUP, which
must then equal SNAPSHOT (and VDI_URI's bytes, when given). Some blocks must have changed,
and not all.
"""
import base64, sys
import nbd

backup = bytearray(open(sys.argv[1], "rb").read())
bm = base64.b64decode(open(sys.argv[2]).read())
BLK = 64 << 10
h = nbd.NBD(); h.connect_uri(sys.argv[3])
changed = 0
for i in range(len(backup) // BLK):
    if bm[i // 8] & (0x80 >> (i % 8)):
        backup[i * BLK:(i + 1) * BLK] = h.pread(BLK, i * BLK); changed += 1
whole = b"".join(h.pread(8 << 20, o) for o in range(0, len(backup), 8 << 20))
assert 0 < changed < len(backup) // BLK, changed
assert bytes(backup) == whole, "the incremental backup differs from the snapshot"
if len(sys.argv) > 4:
    v = nbd.NBD(); v.connect_uri(sys.argv[4])
    assert b"".join(v.pread(8 << 20, o) for o in range(0, len(backup), 8 << 20)) == whole, "the VDI differs from its snapshot"
print("incremental backup: %d changed 64 KiB blocks" % changed)
