"""The model of the kill -9 test (see test-crash-model.sh).

  crash_model.py write STATE URI SECONDS   pipelined random writes (32 in flight, some
                                           FUA, a FLUSH now and then) until the server
                                           dies or SECONDS pass; what each 4 KiB block
                                           may hold afterwards goes to STATE/model.json
  crash_model.py verify STATE URI          every block holds a value it may hold: the last
                                           one made durable (acknowledged before a FLUSH
                                           that completed, or with FUA) or one written
                                           after it, whole; the model then becomes what
                                           was read, also kept in STATE/ids.json
  crash_model.py cbt BEFORE_IDS BITMAP     every block whose value differs between the
                                           ids in BEFORE_IDS and STATE's now has its bit
                                           set in the list_changed_blocks bitmap (base64)

Every write of block b with id i fills it with the 16 bytes (b, i) repeated, so a block
read back names the write it came from and shows any tearing or mixing; id 0 is zeros.
"""
import base64, json, os, random, struct, sys, time
import nbd

BLOCK = 4096


def pattern(b, i):
    return bytes(BLOCK) if i == 0 else struct.pack("<QQ", b, i) * (BLOCK // 16)


def load(state):
    return json.load(open(os.path.join(state, "model.json")))


def save(state, m):
    tmp = os.path.join(state, "model.json.tmp")
    json.dump(m, open(tmp, "w"))
    os.replace(tmp, os.path.join(state, "model.json"))


def write(state, uri, seconds):
    m = load(state)
    blocks = m["blocks"]
    # history[b]: ids written to b in order; durable[b]: index of the last durable one.
    history = [[i] for i in m["ids"]]
    durable = [0] * blocks
    next_id = m["next_id"]
    rng = random.Random(next_id)
    h = nbd.NBD()
    h.connect_uri(uri)
    open(os.path.join(state, "started"), "w").close()
    inflight = {}        # cookie -> (kind, blocks, id, buffer)
    busy = set()         # blocks with a write in flight
    acked = []           # (block, history index) acknowledged since the last FLUSH was sent
    flushes = {}         # flush cookie -> the acked writes it covers
    deadline = time.time() + seconds
    writes = 0
    try:
        while time.time() < deadline:
            while len(inflight) < 32 and time.time() < deadline:
                if rng.random() < 0.03 and acked:
                    c = h.aio_flush()
                    flushes[c] = acked
                    acked = []
                    inflight[c] = ("flush", None, None, None)
                    continue
                n = rng.choice([1, 1, 1, 2, 4, 16])
                first = rng.randrange(0, blocks - n + 1)
                span = range(first, first + n)
                if any(b in busy for b in span):
                    break
                wid = next_id
                next_id += 1
                buf = nbd.Buffer.from_bytearray(bytearray(b"".join(pattern(b, wid) for b in span)))
                fua = rng.random() < 0.05
                c = h.aio_pwrite(buf, first * BLOCK, flags=nbd.CMD_FLAG_FUA if fua else 0)
                for b in span:
                    busy.add(b)
                    history[b].append(wid)
                inflight[c] = ("fua" if fua else "write", list(span), wid, buf)
            h.poll(-1)
            while True:
                c = h.aio_peek_command_completed()
                if c == 0:
                    break
                h.aio_command_completed(c)
                kind, span, wid, _ = inflight.pop(c)
                if kind == "flush":
                    for b, k in flushes.pop(c):
                        durable[b] = max(durable[b], k)
                    continue
                writes += 1
                for b in span:
                    busy.discard(b)
                    k = len(history[b]) - 1
                    if kind == "fua":
                        durable[b] = max(durable[b], k)
                    else:
                        acked.append((b, k))
    except nbd.Error as e:
        # A dead server ends the connection; an error reply from a live one is a failure.
        print("writer: the connection ended (%s) after %d writes, %d in flight" % (e, writes, len(inflight)))
        if e.errno in (5, 28, 22, 1):
            m["next_id"] = next_id
            m["allowed"] = [history[b][durable[b]:] for b in range(blocks)]
            save(state, m)
            sys.exit("writer: the server answered a write with an error: %s" % e)
    else:
        print("writer: %d writes in %d s" % (writes, seconds))
    m["next_id"] = next_id
    m["allowed"] = [history[b][durable[b]:] for b in range(blocks)]
    save(state, m)


def read_ids(uri, blocks):
    h = nbd.NBD()
    h.connect_uri(uri)
    ids, bad = [], []
    step = 256
    for first in range(0, blocks, step):
        data = h.pread(min(step, blocks - first) * BLOCK, first * BLOCK)
        for k in range(len(data) // BLOCK):
            b = first + k
            blk = data[k * BLOCK:(k + 1) * BLOCK]
            if blk == bytes(BLOCK):
                ids.append(0)
                continue
            bb, i = struct.unpack_from("<QQ", blk)
            if bb != b or blk != pattern(b, i):
                bad.append(b)
                i = -1
            ids.append(i)
    h.shutdown()
    return ids, bad


def verify(state, uri):
    m = load(state)
    ids, bad = read_ids(uri, m["blocks"])
    assert not bad, "blocks torn or holding another block's bytes: %s" % bad[:10]
    wrong = [(b, ids[b], m["allowed"][b]) for b in range(m["blocks"]) if ids[b] not in m["allowed"][b]]
    assert not wrong, "%d blocks hold a value they may not (block, found, allowed): %s" % (len(wrong), wrong[:5])
    lost = sum(1 for b in range(m["blocks"]) if ids[b] != m["allowed"][b][-1])
    print("verify: every block as allowed; %d blocks hold an earlier value than the last written (not yet durable at the kill)" % lost)
    m["ids"] = ids
    m["allowed"] = [[i] for i in ids]
    save(state, m)
    json.dump(ids, open(os.path.join(state, "ids.json"), "w"))


def cbt(state, before_path, bitmap_b64):
    m = load(state)
    before = json.load(open(before_path))
    bm = base64.b64decode(open(bitmap_b64).read())
    per = (64 << 10) // BLOCK
    missing = [b for b in range(m["blocks"]) if before[b] != m["ids"][b] and not bm[(b // per) // 8] & (0x80 >> ((b // per) % 8))]
    assert not missing, "changed blocks the change log does not name: %s" % missing[:10]
    print("cbt: %d changed blocks, all in the bitmap" % sum(1 for b in range(m["blocks"]) if before[b] != m["ids"][b]))


if __name__ == "__main__":
    cmd, state = sys.argv[1], sys.argv[2]
    if cmd == "init":
        os.makedirs(state, exist_ok=True)
        blocks = int(sys.argv[3]) // BLOCK
        save(state, {"blocks": blocks, "ids": [0] * blocks, "allowed": [[0]] * blocks, "next_id": 1})
        json.dump([0] * blocks, open(os.path.join(state, "ids.json"), "w"))
    elif cmd == "write":
        write(state, sys.argv[3], float(sys.argv[4]))
    elif cmd == "verify":
        verify(state, sys.argv[3])
    elif cmd == "cbt":
        cbt(state, sys.argv[3], sys.argv[4])
