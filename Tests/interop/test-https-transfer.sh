#!/usr/bin/env bash
# With NBD TLS required, HTTP transfers are HTTPS with the same certificate: curl trusts
# the SR's CA, downloads and uploads with a token; plain HTTP gets no answer; the
# `http` line of vdi-get-nbd-info is an https URL that works as printed; SIGHUP makes
# HTTPS serve the new certificate (as NBD does).
. "$(dirname "$0")/functions.sh"
requires curl qemu-img nbdcopy certtool
start_vdinbd --tls require --certs "$TMP/certs"
V=$(vdictl vdi-create name-label=a virtual-size=16MiB)
U=$(uri "$V")
head -c 3M /dev/urandom > "$TMP/data"
nbdcopy "$TMP/data" "$U" || fail "nbdcopy over TLS"
H=$(vdictl vdi-get-nbd-info "uuid=$V" | sed -n 's/^http: //p')
case "$H" in https://127.0.0.1:$HTTP_PORT/export_raw_vdi\?vdi=$V\&format=vhd\&token=*) ;; *) fail "http line: $H" ;; esac
curl -sS -f --cacert "$TMP/certs/ca-cert.pem" -o "$TMP/v.vhd" "$H" || fail "https download"
nbdcopy "$U" "$TMP/disk.raw"
qemu-img compare -f vpc -F raw "$TMP/v.vhd" "$TMP/disk.raw" >/dev/null || fail "the https export differs from the disk"
if curl -sS -o /dev/null "$H" 2>"$TMP/err"; then fail "curl accepted a certificate it had no CA for"; fi
if curl -sS -o /dev/null "${H/https:/http:}" 2>/dev/null; then fail "plain HTTP was answered on the HTTPS listener"; fi
W=$(vdictl vdi-create name-label=b virtual-size=16MiB)
TW=$(vdictl vdi-get-nbd-info "uuid=$W" | sed -n 's/^exportname: .*token=//p')
curl -sS -f --cacert "$TMP/certs/ca-cert.pem" -T "$TMP/v.vhd" -u ":$TW" \
    "https://127.0.0.1:$HTTP_PORT/import_raw_vdi?vdi=$W&format=vhd" >/dev/null || fail "https upload"
nbdcopy "$(uri "$W")" "$TMP/w.raw"
cmp "$TMP/w.raw" "$TMP/disk.raw" || fail "the https import differs"
# New material (another CA), then SIGHUP: new HTTPS connections get the new certificate.
cp "$TMP/certs/ca-cert.pem" "$TMP/old-ca.pem"
new_certs "$TMP/new" second.test
cp "$TMP/new/ca-cert.pem" "$TMP/new/server-cert.pem" "$TMP/new/server-key.pem" "$TMP/certs/"
kill -HUP "$SERVER_PID"
for _ in $(seq 1 50); do grep -q "reloaded TLS credentials.*HTTPS" "$TMP/server.log" && break; sleep 0.1; done
grep -q "reloaded TLS credentials.*HTTPS" "$TMP/server.log" || fail "no reload of the HTTPS certificate"
curl -sS -f --cacert "$TMP/new/ca-cert.pem" -o "$TMP/v2.vhd" "$H" || fail "https download with the new CA after SIGHUP"
cmp "$TMP/v.vhd" "$TMP/v2.vhd" || fail "the export changed across the reload"
if curl -sS -o /dev/null --cacert "$TMP/old-ca.pem" "$H" 2>/dev/null; then fail "the old certificate is still served after SIGHUP"; fi
echo PASS
