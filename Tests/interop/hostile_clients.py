"""Hostile NBD clients (see test-hostile-clients.sh).

  hostile_clients.py HOST PORT CONNECTIONS SECONDS HELD

opens CONNECTIONS connections spread over SECONDS, HELD of them (stalls, plain and after
STARTTLS) kept open until the end, the others each misbehaving one way and closing: random
garbage, a handshake cut short, an option length of 4 GiB, a bad option magic, a
transmission request before any option, a close by RST, and a TLS handshake begun and left
half done. Prints how many of each ran, how many the server refused outright, and this
process's CPU seconds.
"""
import asyncio, os, random, resource, socket, struct, sys, time

IHAVEOPT = b"IHAVEOPT"
OPT_GO, OPT_STARTTLS = 7, 5
FLAGS = struct.pack(">I", 3)  # FIXED_NEWSTYLE | NO_ZEROES


async def greeting(r):
    await r.readexactly(18)  # NBDMAGIC, IHAVEOPT, handshake flags


def option(opt, data=b"", length=None):
    return IHAVEOPT + struct.pack(">II", opt, len(data) if length is None else length) + data


async def garbage(r, w, rng):
    w.write(rng.randbytes(rng.randrange(1, 200)))


async def truncated(r, w, rng):
    await greeting(r)
    w.write(FLAGS[:rng.randrange(1, 4)])


async def oversized(r, w, rng):
    await greeting(r)
    w.write(FLAGS + option(OPT_GO, length=0xFFFFFFFF) + rng.randbytes(512))
    await w.drain()
    await asyncio.wait_for(r.read(64), 2)


async def bad_magic(r, w, rng):
    await greeting(r)
    w.write(FLAGS + b"BADMAGIC" + struct.pack(">II", OPT_GO, 0))
    await w.drain()
    await asyncio.wait_for(r.read(64), 2)


async def command_first(r, w, rng):
    await greeting(r)
    # NBD_CMD_READ of 64 KiB at 0, as if transmission had begun.
    w.write(FLAGS + struct.pack(">IHHQQI", 0x25609513, 0, 0, 1, 0, 65536))
    await w.drain()
    await asyncio.wait_for(r.read(64), 2)


async def rst(r, w, rng):
    await greeting(r)
    w.write(FLAGS + option(OPT_GO, b"\0" * 6))
    await w.drain()
    s = w.get_extra_info("socket")
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def tls_half(r, w, rng):
    await greeting(r)
    w.write(FLAGS + option(OPT_STARTTLS))
    await w.drain()
    await asyncio.wait_for(r.readexactly(20), 2)
    # A ClientHello's first bytes, then nothing more.
    w.write(bytes([0x16, 0x03, 0x01, 0x02, 0x00, 0x01]) + rng.randbytes(40))


KINDS = [garbage, truncated, oversized, bad_magic, command_first, rst, tls_half]


async def stall(host, port, plain, until, stats):
    try:
        r, w = await asyncio.open_connection(host, port)
        if not plain:
            await greeting(r)
            w.write(FLAGS + option(OPT_STARTTLS))
            await w.drain()
        stats["held"] += 1
        while time.time() < until:
            await asyncio.sleep(0.2)
        w.close()
    except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError):
        stats["refused"] += 1


async def one(host, port, kind, rng, stats):
    try:
        r, w = await asyncio.open_connection(host, port)
        try:
            await kind(r, w, rng)
            await w.drain()
        finally:
            w.close()
        stats[kind.__name__] = stats.get(kind.__name__, 0) + 1
    except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError):
        stats["refused"] += 1


async def main(host, port, total, seconds, held):
    rng = random.Random(7)
    stats = {"held": 0, "refused": 0}
    until = time.time() + seconds
    stalls = [asyncio.create_task(stall(host, port, i % 2 == 0, until, stats)) for i in range(held)]
    rest = total - held
    tasks = []
    start = time.time()
    for i in range(rest):
        due = start + seconds * i / rest
        await asyncio.sleep(max(0, due - time.time()))
        tasks.append(asyncio.create_task(one(host, port, KINDS[i % len(KINDS)], rng, stats)))
    await asyncio.gather(*tasks, *stalls)
    u = resource.getrusage(resource.RUSAGE_SELF)
    print("attacker: %s; %.2f s CPU" % (", ".join("%s %d" % kv for kv in sorted(stats.items())), u.ru_utime + u.ru_stime))


if __name__ == "__main__":
    h, p, n, s, held = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
    asyncio.run(main(h, p, n, s, held))
