#!/usr/bin/env bash
# Makes a certificate authority, a server certificate and a client certificate for NBD over TLS, in the directory
# layout nbdkit, qemu and libnbd use:
#   DIR/ca-cert.pem DIR/ca-key.pem          the CA (keep ca-key.pem private)
#   DIR/server-cert.pem DIR/server-key.pem  for spindle serve --tls-certificates DIR (and nbdkit, qemu-nbd)
#   DIR/client-cert.pem DIR/client-key.pem  for clients: nbdinfo 'nbds://host/export?tls-certificates=DIR',
#                                           qemu --object tls-creds-x509,dir=DIR,endpoint=client
# Usage: scripts/make-certs.sh DIR [SERVER_NAME [CLIENT_NAME]]
#   SERVER_NAME  the server's host name (default: this host's name); localhost, 127.0.0.1 and ::1 are always included
#   CLIENT_NAME  the client certificate's common name (default: client), which per-export identity rules match
set -euo pipefail
dir=${1:?usage: make-certs.sh DIR [SERVER_NAME [CLIENT_NAME]]}
server=${2:-$(hostname -f 2>/dev/null || hostname)}
client=${3:-client}
days=3650
mkdir -p "$dir"
cd "$dir"
key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:prime256v1 -out "$1" 2>/dev/null; chmod 600 "$1"; }

if [ ! -f ca-cert.pem ]; then
  key ca-key.pem
  openssl req -x509 -new -key ca-key.pem -out ca-cert.pem -days $days -subj "/CN=Spindle CA $(date +%s)" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
fi

sign() { # name cn extensions
  key "$1-key.pem"
  openssl req -new -key "$1-key.pem" -out "$1.csr" -subj "/CN=$2" 2>/dev/null
  printf '%b' "$3" > "$1.ext"
  openssl x509 -req -in "$1.csr" -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial -out "$1-cert.pem" \
    -days $days -extfile "$1.ext" 2>/dev/null
  rm -f "$1.csr" "$1.ext"
}

sign server "$server" "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=DNS:$server,DNS:localhost,IP:127.0.0.1,IP:::1\n"
sign client "$client" "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\nsubjectAltName=DNS:$client\n"
rm -f ca-cert.srl
echo "certificates for server '$server' and client '$client' in $(pwd)"
