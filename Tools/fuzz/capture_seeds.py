"""Seeds for the NBD fuzz targets from real clients' sessions.

  capture_seeds.py LISTEN_PORT SERVER_PORT OUT_DIR NAME -- CLIENT ARGS...

Relays one or more TCP connections from LISTEN_PORT to a vdinbd on SERVER_PORT while
CLIENT runs (pointed at LISTEN_PORT), and keeps what the client sent, split where the
protocol splits it: the client flags and options up to NBD_OPT_GO or NBD_OPT_EXPORT_NAME
go to OUT_DIR/fuzz-nbd-handshake/NAME-N.bin, the transmission-phase bytes after them to
OUT_DIR/fuzz-nbd-request/NAME-N.bin (N counts the client's connections). Plain NBD only:
under TLS the options after STARTTLS are encrypted.
"""
import os, select, socket, struct, subprocess, sys, threading

listen_port, server_port, out, name = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
client = sys.argv[sys.argv.index("--") + 1:]
OPT_MAGIC = 0x49484156454F5054
GO, EXPORT_NAME = 7, 1


def split(sent: bytes):
    """The handshake's bytes (client flags and options through GO) and the rest."""
    at = 4
    while at + 16 <= len(sent):
        magic, option, length = struct.unpack(">QII", sent[at:at + 16])
        if magic != OPT_MAGIC:
            break
        at += 16 + length
        if option in (GO, EXPORT_NAME):
            break
    return sent[:at], sent[at:]


def relay(conn, n):
    up = socket.create_connection(("127.0.0.1", server_port))
    sent = bytearray()
    peers = {conn: up, up: conn}
    try:
        while True:
            ready, _, _ = select.select(list(peers), [], [], 30)
            if not ready:
                break
            done = False
            for s in ready:
                data = s.recv(1 << 20)
                if not data:
                    done = True
                    break
                if s is conn:
                    sent += data
                peers[s].sendall(data)
            if done:
                break
    finally:
        conn.close()
        up.close()
    hs, rest = split(bytes(sent))
    for target, data in (("fuzz-nbd-handshake", hs), ("fuzz-nbd-request", rest[:64 << 10])):
        if data:
            os.makedirs(os.path.join(out, target), exist_ok=True)
            with open(os.path.join(out, target, "%s-%d.bin" % (name, n)), "wb") as f:
                f.write(data)


lsock = socket.socket()
lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
lsock.bind(("127.0.0.1", listen_port))
lsock.listen(16)
threads = []


def accept_loop():
    n = 0
    while True:
        try:
            conn, _ = lsock.accept()
        except OSError:
            return
        t = threading.Thread(target=relay, args=(conn, n))
        t.start()
        threads.append(t)
        n += 1


threading.Thread(target=accept_loop, daemon=True).start()
rc = subprocess.call(client, stdout=subprocess.DEVNULL)
lsock.close()
for t in threads:
    t.join(60)
sys.exit(rc)
