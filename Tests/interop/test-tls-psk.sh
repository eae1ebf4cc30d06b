#!/usr/bin/env bash
# TLS-PSK with a psktool key file, as qemu-nbd and nbdkit read it: nbdinfo and qemu-img
# connect with the key; a wrong key is refused.
. "$(dirname "$0")/functions.sh"
requires psktool nbdinfo qemu-img
mkdir -p "$TMP/psk" "$TMP/bad"
psktool -u alice -p "$TMP/psk/keys.psk" >/dev/null
psktool -u alice -p "$TMP/bad/keys.psk" >/dev/null
start_vdinbd --tls require --certs "$TMP/certs" --tls-psk "$TMP/psk/keys.psk"
u=$(vdictl vdi-create name-label=t virtual-size=4MiB)
name=$(export_name "$u")
enc=${name/\?/%3F}
nbdinfo --json "nbds://alice@127.0.0.1:$PORT/$enc?tls-psk-file=$TMP/psk/keys.psk" \
    | $PY -c 'import json,sys; assert json.load(sys.stdin)["exports"][0]["export-size"] == 4 << 20'
grep -q "PSK user alice" "$TMP/server.log" || fail "session did not use PSK"
qemu-img info --object "tls-creds-psk,id=tls0,dir=$TMP/psk,username=alice,endpoint=client" \
    --image-opts "driver=nbd,host=127.0.0.1,port=$PORT,export=$name,tls-creds=tls0" | has "virtual size: 4 MiB" \
    || fail "qemu-img with PSK"
if nbdinfo "nbds://alice@127.0.0.1:$PORT/$enc?tls-psk-file=$TMP/bad/keys.psk" >/dev/null 2>&1; then fail "wrong key accepted"; fi
