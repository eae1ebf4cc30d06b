#!/usr/bin/python3
"""A pipelining NBD client written from the protocol document, as simple third-party
clients are: one thread sends every request back to back without waiting, the other reads
the replies as they come. proto.md sets no limit on outstanding requests, so a server must
keep its cost per request flat however many are queued behind the one it serves.

  pipeline_client.py HOST PORT EXPORT --count N --size BYTES --op write|read|verify
      [--replies simple|structured|extended] [--tls CA_FILE] [--disk BYTES]
      [--pid SERVER_PID] [--json]

write: N writes of SIZE bytes (each filled with its index), at offsets i*SIZE mod disk.
read: N reads of SIZE bytes at the same offsets. verify: like read, and checks that each
block holds what the write pass put there (so run write first, same N, SIZE and disk).
With --pid, the server's CPU seconds (user+sys from /proc) spent during the run and its
peak resident size (sampled every 5 ms) are reported too.
"""
import argparse, json, os, socket, ssl, struct, sys, threading, time

IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC, EXTENDED_REQUEST_MAGIC = 0x25609513, 0x21E41C71
SIMPLE_MAGIC, STRUCTURED_MAGIC, EXTENDED_MAGIC = 0x67446698, 0x668E33EF, 0x6E8A278C
OPT_STARTTLS, OPT_GO, OPT_STRUCTURED_REPLY, OPT_EXTENDED_HEADERS = 5, 7, 8, 11
REP_ACK, REP_INFO = 1, 3
CMD_READ, CMD_WRITE = 0, 1
FLAG_PAYLOAD_LEN = 1 << 5
CHUNK_DONE = 1
CHUNK_NONE, CHUNK_OFFSET_DATA, CHUNK_OFFSET_HOLE = 0, 1, 2


def recv_exact(s, n):
    b = bytearray()
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            raise SystemExit("server closed the connection during the handshake")
        b += c
    return bytes(b)


def option(s, opt, data=b""):
    s.sendall(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)
    while True:
        magic, ropt, typ, n = struct.unpack(">QIII", recv_exact(s, 20))
        assert magic == OPT_REPLY_MAGIC and ropt == opt, (hex(magic), ropt)
        body = recv_exact(s, n)
        yield typ, body
        if typ == REP_ACK or typ & 0x80000000:
            return


def handshake(args):
    s = socket.create_connection((args.host, args.port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    magic, ihave, _ = struct.unpack(">QQH", recv_exact(s, 18))
    assert magic == 0x4E42444D41474943 and ihave == IHAVEOPT, "not a fixed newstyle server"
    s.sendall(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES
    if args.tls:
        replies = list(option(s, OPT_STARTTLS))
        assert replies[-1][0] == REP_ACK, "STARTTLS refused: %r" % (replies,)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(args.tls)
        ctx.check_hostname = False
        s = ctx.wrap_socket(s)
    if args.replies == "extended":
        assert list(option(s, OPT_EXTENDED_HEADERS))[-1][0] == REP_ACK, "EXTENDED_HEADERS refused"
    elif args.replies == "structured":
        assert list(option(s, OPT_STRUCTURED_REPLY))[-1][0] == REP_ACK, "STRUCTURED_REPLY refused"
    name = args.export.encode()
    size = None
    for typ, body in option(s, OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">H", 0)):
        if typ & 0x80000000:
            raise SystemExit("GO refused: 0x%x %s" % (typ, body))
        if typ == REP_INFO and struct.unpack(">H", body[:2])[0] == 0:
            size = struct.unpack(">Q", body[2:10])[0]
    return s, size


def requests(args, disk):
    """All requests, as one byte string: the sender writes it as fast as TCP lets it."""
    ext = args.replies == "extended"
    parts = []
    for i in range(args.count):
        off = (i * args.size) % disk
        cmd = CMD_WRITE if args.op == "write" else CMD_READ
        flags = FLAG_PAYLOAD_LEN if ext and cmd == CMD_WRITE else 0
        if ext:
            parts.append(struct.pack(">IHHQQQ", EXTENDED_REQUEST_MAGIC, flags, cmd, i, off, args.size))
        else:
            parts.append(struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, i, off, args.size))
        if cmd == CMD_WRITE:
            parts.append(pattern(i, args.size))
    return b"".join(parts)


def pattern(i, size):
    return struct.pack(">Q", i) * (size // 8) + b"\0" * (size % 8)


class NeedMore(Exception):
    pass


class Replies:
    """Parses replies in place from what has arrived; a reply not whole yet waits."""

    def __init__(self, args, disk):
        self.args, self.disk = args, disk
        self.buf = bytearray(16 << 20)
        self.start = self.end = 0
        self.done = set()

    def room(self):
        """A writable view for the next recv, after moving unparsed bytes to the front."""
        if self.start > 0:
            self.buf[: self.end - self.start] = self.buf[self.start : self.end]
            self.end -= self.start
            self.start = 0
        return memoryview(self.buf)[self.end :]

    def take(self, n):
        if self.end - self.pos < n:
            raise NeedMore
        v = memoryview(self.buf)[self.pos : self.pos + n]
        self.pos += n
        return v

    def peek_magic(self):
        if self.end - self.pos < 4:
            raise NeedMore
        return struct.unpack_from(">I", self.buf, self.pos)[0]

    def check_data(self, cookie, rel, data):
        if self.args.op != "verify":
            return
        want = pattern(cookie, self.args.size)
        if bytes(data) != want[rel : rel + len(data)]:
            raise SystemExit("cookie %d: data at +%d differs from what was written" % (cookie, rel))

    def parse(self):
        """Consumes every whole reply in the buffer."""
        while len(self.done) < self.args.count:
            self.pos = self.start
            try:
                self.one()
            except NeedMore:
                return
            self.start = self.pos

    def one(self):
        a = self.args
        reading = a.op != "write"
        # With structured replies a server may still answer anything but a READ with a
        # simple reply; with extended headers every reply is a chunk.
        if a.replies == "simple" or (a.replies == "structured" and self.peek_magic() == SIMPLE_MAGIC):
            magic, err, cookie = struct.unpack(">IIQ", self.take(16))
            assert magic == SIMPLE_MAGIC, hex(magic)
            if err:
                raise SystemExit("cookie %d: error %d" % (cookie, err))
            if reading:
                self.check_data(cookie, 0, self.take(a.size))
            return self.finish(cookie)
        if a.replies == "extended":
            magic, flags, typ, cookie, roff, n = struct.unpack(">IHHQQQ", self.take(32))
            assert magic == EXTENDED_MAGIC, hex(magic)
        else:
            magic, flags, typ, cookie, n = struct.unpack(">IHHQI", self.take(20))
            assert magic == STRUCTURED_MAGIC, hex(magic)
        base = (cookie * a.size) % self.disk
        if typ == CHUNK_OFFSET_DATA:
            off = struct.unpack(">Q", self.take(8))[0]
            self.check_data(cookie, off - base, self.take(n - 8))
        elif typ == CHUNK_OFFSET_HOLE:
            off, hl = struct.unpack(">QI", self.take(12))
            self.check_data(cookie, off - base, bytes(hl))
        elif typ & 0x8000:
            raise SystemExit("cookie %d: error chunk %s" % (cookie, bytes(self.take(n))))
        else:
            self.take(n)
        if flags & CHUNK_DONE:
            self.finish(cookie)

    def finish(self, cookie):
        if cookie in self.done or cookie >= self.args.count:
            raise SystemExit("unexpected reply cookie %d" % cookie)
        self.done.add(cookie)


def exchange(s, payload, replies):
    """Sends everything as fast as the socket takes it while reading replies, in one
    thread (an ssl socket may not be used from two threads at once)."""
    import selectors
    s.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE)
    view, sent = memoryview(payload), 0
    while len(replies.done) < replies.args.count:
        sel.select(timeout=30)
        progressed = False
        while sent < len(view):
            try:
                n = s.send(view[sent : sent + (1 << 20)])
            except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                break
            sent += n
            progressed = True
        if sent == len(view):
            sel.modify(s, selectors.EVENT_READ)
        while True:
            try:
                n = s.recv_into(replies.room())
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                break
            if n == 0:
                raise SystemExit("server closed the connection after %d replies" % len(replies.done))
            replies.end += n
            progressed = True
            replies.parse()
        if not progressed and not (isinstance(s, ssl.SSLSocket) and s.pending()):
            # select woke us without progress: nothing for 30 s means a stuck server.
            if not sel.select(timeout=30):
                raise SystemExit("no progress for 30 s after %d replies" % len(replies.done))


def cpu_seconds(pid):
    f = open("/proc/%d/stat" % pid).read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid):
    for line in open("/proc/%d/status" % pid):
        if line.startswith("VmRSS"):
            return int(line.split()[1])
    return 0


def main():
    p = argparse.ArgumentParser()
    p.add_argument("host"); p.add_argument("port", type=int); p.add_argument("export")
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--size", type=int, required=True)
    p.add_argument("--op", choices=["write", "read", "verify"], required=True)
    p.add_argument("--replies", choices=["simple", "structured", "extended"], default="simple")
    p.add_argument("--tls")
    p.add_argument("--disk", type=int, default=64 << 20)
    p.add_argument("--pid", type=int)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    s, size = handshake(a)
    disk = min(a.disk, size)
    payload = requests(a, disk)
    peak = [0]
    stop = threading.Event()
    if a.pid:
        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], rss_kib(a.pid))
                time.sleep(0.005)
        threading.Thread(target=sample, daemon=True).start()
        cpu0 = cpu_seconds(a.pid)
    t0 = time.perf_counter()
    exchange(s, payload, Replies(a, disk))
    wall = time.perf_counter() - t0
    out = {"op": a.op, "count": a.count, "size": a.size, "replies": a.replies, "tls": bool(a.tls), "seconds": wall}
    if a.pid:
        out["server_cpu_seconds"] = cpu_seconds(a.pid) - cpu0
        stop.set()
        out["server_peak_rss_mib"] = max(peak[0], rss_kib(a.pid)) / 1024
    s.close()
    if a.json:
        print(json.dumps(out))
    else:
        print(" ".join("%s=%s" % kv for kv in out.items()))


if __name__ == "__main__":
    main()
