#!/usr/bin/env bash
# GET /metrics: after NBD I/O (python nbd), a refused request, CBT-tracked writes, a
# snapshot and an HTTP export, curl's answer parses with prometheus_client's text parser
# and the counters moved by exactly what was done.
. "$(dirname "$0")/functions.sh"
requires curl
$PY -c 'import nbd, prometheus_client.parser' || { [ "${CI:-}" = true ] && exit 1; echo "SKIP: nbd or prometheus_client"; exit 77; }
start_vdinbd
export VDICTL="$VDINBD_BIN/vdictl" SOCK HTTP_PORT
$PY - <<'PY'
import json, os, subprocess, time
import nbd
from prometheus_client.parser import text_string_to_metric_families
def ctl(*a): return subprocess.run([os.environ["VDICTL"], "--socket", os.environ["SOCK"], *a], check=True, capture_output=True, text=True).stdout.strip()
def scrape():
    out = subprocess.run(["curl", "-sS", "-f", "http://127.0.0.1:%s/metrics" % os.environ["HTTP_PORT"]], check=True, capture_output=True, text=True).stdout
    samples = {}
    for fam in text_string_to_metric_families(out):
        for s in fam.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples
def get(samples, name, **labels): return samples.get((name, tuple(sorted(labels.items()))), 0)
v = ctl("vdi-create", "name-label=m", "virtual-size=16MiB")
ctl("vdi-enable-cbt", "uuid=" + v)
before = scrape()
info = json.loads(ctl("vdi-get-nbd-info", "uuid=" + v, "--json"))[0]
h = nbd.NBD(); h.set_export_name(info["exportname"]); h.connect_tcp(info["address"], str(info["port"]))
mid = scrape()
assert get(mid, "vdinbd_nbd_connections") >= 1, mid
for i in range(10): h.pwrite(b"x" * 4096, i * 65536)
for i in range(7): h.pread(8192, i * 4096)
h.flush()
h.set_strict_mode(0)  # let the server refuse it, not libnbd
try:
    h.pwrite(b"y" * 512, 16 << 20)  # past the end: refused
    raise SystemExit("a write past the end succeeded")
except nbd.Error:
    pass
h.shutdown()
s = ctl("vdi-snapshot", "uuid=" + v)
tok = info["exportname"].split("token=")[1]
data = subprocess.run(["curl", "-sS", "-f", "http://127.0.0.1:%s/export_raw_vdi?vdi=%s&token=%s" % (os.environ["HTTP_PORT"], v, tok)], check=True, capture_output=True).stdout
assert len(data) == 16 << 20
time.sleep(0.3)
after = scrape()
d = lambda name, **l: get(after, name, **l) - get(before, name, **l)
assert d("vdinbd_nbd_requests_total", command="write", export=v) == 10, d("vdinbd_nbd_requests_total", command="write", export=v)
assert d("vdinbd_nbd_bytes_total", command="write", export=v) == 40960
assert d("vdinbd_nbd_requests_total", command="read", export=v) == 7
assert d("vdinbd_nbd_bytes_total", command="read", export=v) == 7 * 8192
assert d("vdinbd_nbd_requests_total", command="flush", export=v) == 1
errs = lambda m: sum(x for (n, l), x in m.items() if n == "vdinbd_nbd_errors_total")
assert errs(after) - errs(before) == 1, [k for k in after if k[0] == "vdinbd_nbd_errors_total"]
assert d("vdinbd_nbd_request_duration_seconds_count", command="write") >= 10
assert d("vdinbd_cbt_log_syncs_total") >= 1 and d("vdinbd_cbt_log_synced_writes_total") >= 1
assert d("vdinbd_transfer_bytes_total", direction="export") == 16 << 20
assert get(after, "vdinbd_transfers_active", direction="export") == 0
assert get(after, "vdinbd_vdi_chain_depth", vdi=v) == 2 and get(after, "vdinbd_vdi_chain_depth", vdi=s) == 2, [k for k in after if k[0] == "vdinbd_vdi_chain_depth"]
assert get(after, "vdinbd_nbd_requests_in_flight") == 0
assert get(after, "vdinbd_nbd_connections") == get(before, "vdinbd_nbd_connections")
print("metrics ok:", len(after), "samples")
PY
echo PASS
