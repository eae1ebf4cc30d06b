# Shared helpers for the interop tests. Each test sources this, starts one vdinbd on a
# fresh SR and a free port, drives one real client and checks one behaviour.
set -euo pipefail

: "${VDINBD_BIN:?set VDINBD_BIN to the build directory holding vdinbd and vdictl}"
PY=/usr/bin/python3
# nbdsh runs "python3" from PATH: it must be the system one that has the nbd module.
export PATH=/usr/bin:/bin:$PATH
TMP=$(mktemp -d /tmp/vdinbd-interop.XXXXXX)
SERVER_PID=""
# Every command the test runs is traced to a file; a failing test prints the last ones.
exec {BASH_XTRACEFD}>"$TMP/trace"
set -x
show_context() {
    { set +x; } 2>/dev/null
    echo "--- last commands" >&2; grep -v -e '^+* set +x$' -e '^+* rc=\$?$' -e '^+* rc=[0-9]*$' "$TMP/trace" | tail -8 | cut -c1-300 >&2
    [ -f "$TMP/server.log" ] && { echo "--- server log" >&2; tail -30 "$TMP/server.log" >&2; }
    return 0
}

cleanup() {
    local rc=$1
    # A test that died outside `fail` (a python assertion, a client error) still shows
    # what the server saw.
    if [ "$rc" != 0 ] && [ "$rc" != 77 ] && [ -z "${FAILED:-}" ]; then
        echo "FAIL: exit $rc" >&2; show_context
    fi
    if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
    rm -rf "$TMP"
}
trap 'rc=$?; { set +x; } 2>/dev/null; cleanup $rc' EXIT
# Tools/test's timeout sends SIGTERM: say so and show the server's side before cleaning up.
trap '{ set +x; } 2>/dev/null; FAILED=1; echo "FAIL: timed out (SIGTERM)" >&2; show_context; exit 143' TERM

# requires TOOL...: fail under CI, skip (exit 77) on a developer's machine.
requires() {
    for t in "$@"; do
        if ! command -v "$t" >/dev/null 2>&1 && ! [ -x "$t" ]; then
            if [ "${CI:-}" = "true" ]; then echo "missing tool $t" >&2; exit 1; fi
            echo "SKIP: $t not installed"; exit 77
        fi
    done
}

free_port() { $PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# start_vdinbd [extra args]: sets PORT, HTTP_PORT, SR, SOCK. TLS is off unless the args
# say otherwise; HTTP listens on a free port of its own (the same again on a restart).
# A port taken between free_port and the server's bind (by another test's client or
# server) is retried with another, twice at most.
start_vdinbd() {
    local fresh_http="" attempt
    [ -n "${HTTP_PORT:-}" ] || fresh_http=1
    for attempt in 1 2 3; do
        [ -z "$fresh_http" ] || HTTP_PORT=$(free_port)
        PORT=$(free_port)
        while [ "$PORT" = "$HTTP_PORT" ]; do PORT=$(free_port); done
        start_vdinbd_once "$@" && return 0
        has "Address already in use" < "$TMP/server.log" || break
        echo "start_vdinbd: a port was taken before the server bound it; again with others" >&2
    done
    cat "$TMP/server.log"; echo "vdinbd did not start" >&2; exit 1
}
start_vdinbd_once() {
    SR=$TMP/sr
    SOCK=$SR/control.sock
    local a prev=""
    for a in "$@"; do [ "$prev" = --control-socket ] && SOCK=$a; prev=$a; done
    local tls=(--tls off) http=(--http "127.0.0.1:$HTTP_PORT")
    case " $* " in *" --tls "*) tls=() ;; esac
    case " $* " in *" --http "*) http=() ;; esac
    rm -f "$SOCK"  # a killed server's socket file: wait for the new one
    # VDINBD_SR_FORMATS (e.g. qcow2+vhd+raw) runs a test on an SR whose default format
    # is another one (the first named).
    "$VDINBD_BIN/vdinbd" --sr "$SR${VDINBD_SR_FORMATS:+,formats=$VDINBD_SR_FORMATS}" --listen "127.0.0.1:$PORT" "${tls[@]}" "${http[@]}" "$@" >"$TMP/server.log" 2>&1 &
    SERVER_PID=$!
    # The control socket appears once every listener is bound.
    for _ in $(seq 1 100); do
        [ -S "$SOCK" ] && return 0
        kill -0 "$SERVER_PID" 2>/dev/null || { wait "$SERVER_PID" 2>/dev/null || true; SERVER_PID=""; return 1; }
        sleep 0.1
    done
    return 1
}

vdictl() { "$VDINBD_BIN/vdictl" --socket "$SOCK" "$@"; }

# uri UUID [key=value...]: an nbd:// URI with a fresh token.
uri() {
    local u=$1; shift
    vdictl vdi-get-nbd-info "uuid=$u" "$@" | sed -n 's/^uri: //p'
}

# export_name UUID: the raw export name.
export_name() { vdictl vdi-get-nbd-info "uuid=$1" | sed -n 's/^exportname: //p'; }

# new_certs DIR CN: a new CA and a server certificate for CN (and 127.0.0.1, localhost)
# signed by it, as DIR/ca-cert.pem, DIR/server-cert.pem, DIR/server-key.pem.
new_certs() {
    local d=$1 cn=$2
    mkdir -p "$d"
    printf 'cn = new CA\nca\ncert_signing_key\nexpiration_days = 30\n' > "$d/catmpl"
    certtool --generate-privkey --outfile "$d/ca-key.pem" 2>/dev/null
    certtool --generate-self-signed --load-privkey "$d/ca-key.pem" --template "$d/catmpl" --outfile "$d/ca-cert.pem" 2>/dev/null
    printf 'cn = %s\ndns_name = %s\ndns_name = localhost\nip_address = 127.0.0.1\ntls_www_server\nsigning_key\nencryption_key\nexpiration_days = 30\n' "$cn" "$cn" > "$d/tmpl"
    certtool --generate-privkey --outfile "$d/server-key.pem" 2>/dev/null
    certtool --generate-certificate --load-privkey "$d/server-key.pem" --load-ca-certificate "$d/ca-cert.pem" \
        --load-ca-privkey "$d/ca-key.pem" --template "$d/tmpl" --outfile "$d/server-cert.pem" 2>/dev/null
}

fail() { FAILED=1; echo "FAIL: $*" >&2; show_context; exit 1; }

# PRODUCER | has PATTERN: grep that reads all its input. `grep -q` stops at the first
# match, and under pipefail the producer's SIGPIPE would then fail the pipeline.
has() { grep "$@" >/dev/null; }
# FMT: the image format new VDIs get in this run (the first of VDINBD_SR_FORMATS, else vhd).
FMT=${VDINBD_SR_FORMATS:-vhd}; FMT=${FMT%%+*}; export FMT
# check_image FILE [leaks-ok]: vhd-check for a VHD, qemu-img check for a qcow2 file (exit 3,
# leaked clusters and nothing worse, passes with leaks-ok: what a kill -9 may leave in a
# file we have not opened for writing since).
# Every image file of the SR is a VDI's or a VDI's parent, and each has one (collector idle).
records_match_files() {
    vdictl vdi-list --json > "$TMP/records.json"
    $PY - "$TMP/records.json" "$SR" "$FMT" <<'PY'
import json, os, struct, sys
recs = json.load(open(sys.argv[1]))
live = [r for r in recs.values() if r["type"] != "cbt_metadata"]
ext = "." + sys.argv[3]
def parent_of(path):
    # The file a qcow2 backing name or a VHD parent locator's name points at.
    with open(path, "rb") as f:
        head = f.read(512)
        if head[:4] == b"QFI\xfb":
            off, n = struct.unpack(">QI", head[8:20])
            if not off: return None
            f.seek(off); return os.path.basename(f.read(n).decode())
        if head[:8] == b"conectix":
            f.seek(struct.unpack(">Q", head[16:24])[0]); dyn = f.read(1024)
            name = dyn[64:576].decode("utf-16-be").rstrip("\0")
            return os.path.basename(name) if name else None
    return None
# Every record's file, and the chain of files under each (hidden bases are not listed).
need, todo = set(), [r["uuid"] + ext for r in live]
while todo:
    f = todo.pop()
    if f in need: continue
    need.add(f)
    p = os.path.join(sys.argv[2], f)
    if os.path.exists(p) and (q := parent_of(p)): todo.append(q)
files = {f for f in os.listdir(sys.argv[2]) if f.endswith(ext)}
assert files == need, ("files without a record or a child:", sorted(files - need), "records or parents without a file:", sorted(need - files))
PY
}

check_image() {
    case "$1" in
        *.vhd) "$VDINBD_BIN/vdictl" vhd-check "$1" >/dev/null ;;
        *.qcow2)
            local rc=0
            qemu-img check -f qcow2 "$1" >"$TMP/check.out" 2>&1 || rc=$?
            [ "$rc" = 0 ] || { [ "${2:-}" = leaks-ok ] && [ "$rc" = 3 ]; } || { cat "$TMP/check.out" >&2; return 1; } ;;
        *) return 0 ;;
    esac
}
