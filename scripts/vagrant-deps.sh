#!/usr/bin/env bash
# Installs what the Vagrant lab's tooling needs on the host (idempotent): debootstrap and qemu-utils for
# scripts/vagrant-box.sh; vagrant, vagrant-libvirt and libvirt for scripts/test-vm.sh; rsync for the synced folder.
# Called by scripts/vagrant-box.sh and scripts/test-vm.sh only, never by `make test`'s setup (CI stays lean).
set -euo pipefail

want=(debootstrap qemu-utils e2fsprogs rsync openssl gcc libc6-dev busybox-static)
[ "${1:-}" = --box-only ] || want+=(vagrant vagrant-libvirt libvirt-daemon-system libvirt-clients dnsmasq-base qemu-system-x86)
need=()
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
