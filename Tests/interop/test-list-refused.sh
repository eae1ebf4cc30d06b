#!/usr/bin/env bash
# nbd-client -l gets NBD_REP_ERR_POLICY: tokens are never listed.
. "$(dirname "$0")/functions.sh"
requires nbd-client
start_vdinbd
vdictl vdi-create name-label=t virtual-size=1MiB >/dev/null
if nbd-client -l 127.0.0.1 "$PORT" > "$TMP/out" 2>&1; then cat "$TMP/out"; fail "listing succeeded"; fi
grep -qi "not allowed" "$TMP/out" || { cat "$TMP/out"; fail "no policy refusal"; }
grep -q "never listed" "$TMP/out" || fail "server's reason not shown"
