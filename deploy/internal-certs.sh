#!/bin/sh
# Makes the internal hop's certificates (STRATA_INTERNAL_TLS_*, see docs/SECURITY.md):
#   deploy/internal-certs.sh DIR [NAME ...]
# DIR/ca.pem            the internal CA (every process trusts it)
# DIR/ca-key.pem        its key: keep it, to issue again; no process needs it
# DIR/internal.pem      the certificate every Strata process presents, as server
#                       and as client; valid for kv, tenants, vector, admin,
#                       gateway, localhost, 127.0.0.1 and each NAME given
# DIR/internal-key.pem  its key
# DIR is made 0700, so only its owner on this host reaches the keys; the files
# themselves are 0644, so a container's user reads them where they are mounted.
# An existing DIR/ca.pem is refused: remove DIR to start over.
set -eu

if [ $# -lt 1 ]; then
  echo "usage: $0 DIR [NAME ...]" >&2
  exit 2
fi
dir=$1
shift
if [ -e "$dir/ca.pem" ]; then
  echo "$dir/ca.pem exists: remove $dir to make new certificates" >&2
  exit 1
fi
mkdir -p "$dir"
chmod 0700 "$dir"

days=825
alt="DNS:kv,DNS:tenants,DNS:vector,DNS:admin,DNS:gateway,DNS:localhost,IP:127.0.0.1,IP:::1"
for name in "$@"; do
  case $name in
    *[!A-Za-z0-9.:-]* | "") echo "not a host name or address: $name" >&2; exit 2 ;;
    *[!0-9.]*) case $name in *:*) alt="$alt,IP:$name" ;; *) alt="$alt,DNS:$name" ;; esac ;;
    *) alt="$alt,IP:$name" ;;
  esac
done

openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
  -keyout "$dir/ca-key.pem" -out "$dir/ca.pem" -days "$days" -sha256 \
  -subj "/O=Strata/CN=Strata internal CA" \
  -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
  -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
  -keyout "$dir/internal-key.pem" -out "$dir/internal.csr" \
  -subj "/O=Strata/CN=strata-internal" 2>/dev/null
printf '%s\n' \
  "basicConstraints=critical,CA:FALSE" \
  "keyUsage=critical,digitalSignature" \
  "extendedKeyUsage=serverAuth,clientAuth" \
  "subjectAltName=$alt" > "$dir/internal.ext"
openssl x509 -req -in "$dir/internal.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca-key.pem" \
  -set_serial "0x$(openssl rand -hex 16)" -days "$days" -sha256 \
  -extfile "$dir/internal.ext" -out "$dir/internal.pem" 2>/dev/null
rm -f "$dir/internal.csr" "$dir/internal.ext"
chmod 0600 "$dir/ca-key.pem"
chmod 0644 "$dir/ca.pem" "$dir/internal.pem" "$dir/internal-key.pem"
echo "made $dir/ca.pem and $dir/internal.pem ($alt), valid $days days"
