#!/usr/bin/env bash
# Installs what weft's build, tests, lab and benchmarks need on a Debian 12 machine.
# Idempotent and quiet: when everything is present it only checks and returns.
set -euo pipefail

# Every Debian package weft uses, and why.
PACKAGES=(
  etcd-server etcd-client            # the real etcd for tests and the lab
  protobuf-compiler                  # protoc, for etcd-client's build script
  iproute2 iptables nftables         # kernel networking inside namespaces
  conntrack                          # the proxy deletes stale UDP flows
  ethtool                            # to check checksum offload on flannel.1
  containernetworking-plugins        # bridge + host-local, the delegates of weft-cni
  iputils-ping curl socat iperf3     # test and benchmark clients
  wrk                                # new-connection rate and latency through the service proxy (make bench)
  haproxy                            # the userspace L4 proxy the userspace mode is compared with (make bench)
  dnsutils                           # dig: the client of the DNS conformance tests and the lab's name checks
  dnsperf knot                       # DNS load generator and the authoritative server weft dns is compared with (make bench)
  procps                             # ps, sysctl
  openssl                            # test certificates for etcd over TLS
  python3                            # make demo reads weft's JSON output (the lab's PKI uses openssl above)
  clang llvm libbpf-dev bpftool      # eBPF programs in C (weft-ebpf's build.rs) and bpftool for the eBPF tests
  qemu-system-x86 kmod cpio          # the QEMU kernel lab (IPVS mode): qemu-system-x86_64, depmod, initramfs
  busybox-static binutils            # the lab guest's userland; objcopy strips weft's debug info for it
  ipvsadm ipset                      # IPVS and ipset, read inside the lab guest (and ipset by ipvs mode itself)
)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done

if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Debian's etcd-server package starts a system etcd on 127.0.0.1:2379; weft's tests and lab run
# their own, so the system one is stopped to keep the default port free and the machine quiet.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet etcd 2>/dev/null; then
  systemctl stop etcd >/dev/null 2>&1 || true
  systemctl disable etcd >/dev/null 2>&1 || true
fi

# Rust components the checks use.
if command -v rustup >/dev/null 2>&1; then
  rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt >/dev/null 2>&1 || true
  rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy >/dev/null 2>&1 || true
fi
# The kubelet's local images (weft.local/pause:1, weft.local/busybox:1) and containerd, runc, gcc.
bash "$(dirname "${BASH_SOURCE[0]}")/images.sh" >/dev/null
exit 0
