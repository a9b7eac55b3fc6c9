#!/usr/bin/env bash
# Stages what every node needs into one directory (the Vagrantfile syncs it to /opt/weft/share; on real hosts
# copy it yourself): bin/weft and the daemons' own binaries beside it, bin/weft-{agent,proxy,dns,controller,kubelet}
# (the host's release build), images/{pause,busybox}.tar (scripts/images.sh),
# pki/ (a cluster CA and one kubelet serving certificate per node, made with openssl; the CA key stays here),
# provision/ (these scripts). Idempotent: existing PKI files are kept.
# Usage: host-prepare.sh SHARE_DIR node-1=192.168.56.11,node-2=192.168.56.12,...
set -euo pipefail

share="${1:?usage: host-prepare.sh SHARE_DIR NAME=IP[,NAME=IP...]}"
nodes="${2:?usage: host-prepare.sh SHARE_DIR NAME=IP[,NAME=IP...]}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
bin="${WEFT_BIN:-$repo/target/release/weft}"

if [ ! -x "$bin" ]; then
  echo "host-prepare: $bin is missing: run 'cargo build --release' on the host first (or set WEFT_BIN)" >&2
  exit 1
fi
mkdir -p "$share/bin" "$share/images" "$share/pki" "$share/provision"
install -m 0755 "$bin" "$share/bin/weft"
# The daemons' own binaries, when built beside weft (`weft agent` runs weft-agent from its directory); a stale one
# from an earlier staging must not outlive its weft.
for d in agent proxy dns controller kubelet; do
  rm -f "$share/bin/weft-$d"
  [ -x "$(dirname "$bin")/weft-$d" ] && install -m 0755 "$(dirname "$bin")/weft-$d" "$share/bin/weft-$d"
done
install -m 0755 "$here"/*.sh "$share/provision/"

images="$(WEFT_IMAGES_DIR="$repo/target/images" bash "$repo/scripts/images.sh" | tail -n1)"
for t in pause busybox; do
  install -m 0644 "$images/$t.tar" "$share/images/$t.tar"
done

pki="$share/pki"
ca_dir="$repo/target/vagrant/ca" # the CA key never enters a VM
mkdir -p "$ca_dir"
chmod 700 "$ca_dir"
if [ ! -s "$ca_dir/ca.key" ] || [ ! -s "$ca_dir/ca.crt" ]; then
  openssl req -x509 -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 \
    -keyout "$ca_dir/ca.key" -out "$ca_dir/ca.crt" -days 3650 -subj "/CN=weft-vagrant-ca" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" \
    2>/dev/null
fi
install -m 0644 "$ca_dir/ca.crt" "$pki/ca.crt"

IFS=, read -r -a pairs <<<"$nodes"
for pair in "${pairs[@]}"; do
  name="${pair%%=*}" ip="${pair#*=}"
  if ! [[ "$name" =~ ^[a-z0-9][a-z0-9-]{0,62}$ ]] || ! [[ "$ip" =~ ^[0-9]{1,3}(\.[0-9]{1,3}){3}$ ]]; then
    echo "host-prepare: bad node '$pair' (want NAME=IPv4)" >&2
    exit 1
  fi
  crt="$pki/kubelet-$name.crt" key="$pki/kubelet-$name.key"
  # Re-issue when missing or when the address in it changed.
  if [ -s "$crt" ] && openssl x509 -noout -ext subjectAltName -in "$crt" 2>/dev/null | grep -q "IP Address:$ip\$"; then
    continue
  fi
  tmp="$(mktemp -d)"
  printf 'basicConstraints = critical, CA:FALSE\nkeyUsage = critical, digitalSignature, keyEncipherment\nextendedKeyUsage = serverAuth\nsubjectAltName = DNS:%s, IP:%s\n' \
    "$name" "$ip" >"$tmp/ext"
  openssl req -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -keyout "$key" -out "$tmp/csr" \
    -subj "/O=system:nodes/CN=system:node:$name" 2>/dev/null
  openssl x509 -req -in "$tmp/csr" -CA "$ca_dir/ca.crt" -CAkey "$ca_dir/ca.key" -CAcreateserial -days 825 -sha256 \
    -extfile "$tmp/ext" -out "$crt" 2>/dev/null
  chmod 0600 "$key"
  rm -rf "$tmp"
done
echo "host-prepare: staged $share"
