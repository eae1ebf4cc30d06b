#!/usr/bin/env bash
# --tls-verify-peer: a client with a certificate from our CA gets in; one without any, or
# with a certificate from another CA, is refused.
. "$(dirname "$0")/functions.sh"
requires certtool nbdinfo
CERTS=$TMP/certs
start_vdinbd --tls require --certs "$CERTS" --tls-verify-peer
u=$(vdictl vdi-create name-label=t virtual-size=1MiB)
name=$(export_name "$u"); enc=${name/\?/%3F}
mkclient() {  # DIR CA-CERT CA-KEY
    mkdir -p "$1"; cp "$2" "$1/ca-cert.pem"
    printf 'cn = client\ntls_www_client\nsigning_key\nencryption_key\nexpiration_days = 30\n' > "$1/tmpl"
    certtool --generate-privkey --outfile "$1/client-key.pem" 2>/dev/null
    certtool --generate-certificate --load-privkey "$1/client-key.pem" --load-ca-certificate "$2" \
        --load-ca-privkey "$3" --template "$1/tmpl" --outfile "$1/client-cert.pem" 2>/dev/null
}
mkclient "$TMP/good" "$CERTS/ca-cert.pem" "$CERTS/ca-key.pem"
nbdinfo "nbds://127.0.0.1:$PORT/$enc?tls-certificates=$TMP/good" | has "export-size: 1048576" || fail "good client refused"
# No client certificate at all.
mkdir -p "$TMP/none"; cp "$CERTS/ca-cert.pem" "$TMP/none/"
if nbdinfo "nbds://127.0.0.1:$PORT/$enc?tls-certificates=$TMP/none" >/dev/null 2>&1; then fail "client without certificate accepted"; fi
# A certificate from another CA.
printf 'cn = other CA\nca\ncert_signing_key\nexpiration_days = 30\n' > "$TMP/catmpl"
certtool --generate-privkey --outfile "$TMP/other-ca-key.pem" 2>/dev/null
certtool --generate-self-signed --load-privkey "$TMP/other-ca-key.pem" --template "$TMP/catmpl" --outfile "$TMP/other-ca.pem" 2>/dev/null
mkclient "$TMP/bad" "$TMP/other-ca.pem" "$TMP/other-ca-key.pem"
cp "$CERTS/ca-cert.pem" "$TMP/bad/ca-cert.pem"
if nbdinfo "nbds://127.0.0.1:$PORT/$enc?tls-certificates=$TMP/bad" >/dev/null 2>&1; then fail "foreign client certificate accepted"; fi
grep -q "TLS handshake failed" "$TMP/server.log" || fail "no handshake failure logged"
