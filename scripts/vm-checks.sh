#!/usr/bin/env bash
# Runs inside one VM of the Vagrant lab, as root, fed on stdin by scripts/test-vm.sh (`vagrant ssh -c 'sudo bash -s
# -- MODE ARGS'`). Prints one line per check, `ok …` or `FAIL …`, and runs every check (exit 0 unless misused).
#   pod ADDR VIP TARGET...   from the network namespace of the pod with address ADDR: each TARGET pod over HTTP,
#                            the Service VIP over HTTP, the cluster DNS (10.96.0.10) resolving web to VIP
#   node NAME VIP ETCD PEER_ADDR...   from the VM itself: the VIP, the cluster DNS, `weft routes` naming every peer
#   pod-ns ADDR              the network namespace file of the pod holding ADDR (for the benchmark)
set -uo pipefail
mode="${1:?mode}"
shift
dns=10.96.0.10
name=web.default.svc.cluster.local

check() { # WHAT CMD...
  local what="$1" out
  shift
  if out="$("$@" 2>&1)"; then
    echo "ok $what"
  else
    echo "FAIL $what: $(echo "$out" | tr '\n' ' ' | head -c 300)"
  fi
}
# The network namespace file of the pod holding address $1: weft's containerd keeps them in its state directory
# (CRI's netns/), `ip netns` in /run/netns.
pod_ns() {
  local n
  for n in /var/lib/weft/containerd/state/io.containerd.grpc.v1.cri/netns/* /run/netns/*; do
    [ -e "$n" ] || continue
    nsenter --net="$n" ip -4 -o addr | grep -q " $1/" && { echo "$n"; return 0; }
  done
  return 1
}
resolves() { # DIG_PREFIX... : the cluster DNS answers web with the VIP
  local got
  got="$("$@" dig +short +time=5 +tries=2 "@$dns" "$name")"
  [ "$got" = "$vip" ] || { echo "dig @$dns $name: '$got', want $vip"; return 1; }
}

case "$mode" in
pod)
  addr="$1" vip="$2"
  shift 2
  ns="$(pod_ns "$addr")" || { echo "FAIL no network namespace on $(hostname) holds $addr"; exit 0; }
  in_pod() { nsenter --net="$ns" "$@"; }
  for t in "$@"; do
    check "pod $addr on $(hostname) reaches pod $t" in_pod curl -sf --max-time 10 "http://$t/"
  done
  check "pod $addr on $(hostname) reaches the Service VIP $vip" in_pod curl -sf --max-time 10 "http://$vip/"
  check "pod $addr on $(hostname) resolves $name to $vip" resolves in_pod
  ;;
node)
  node="$1" vip="$2" etcd="$3"
  shift 3
  check "$node reaches the Service VIP $vip" curl -sf --max-time 10 "http://$vip/"
  check "$node resolves $name to $vip" resolves
  routes="$(weft routes --etcd-endpoints "$etcd" 2>&1)"
  echo "$routes" | sed 's/^/  /'
  for peer in "$@"; do
    check "$node: weft routes shows peer $peer" grep -q "$peer" <<<"$routes"
  done
  ;;
pod-ns)
  pod_ns "$1"
  ;;
*)
  echo "vm-checks.sh: unknown mode $mode" >&2
  exit 2
  ;;
esac
