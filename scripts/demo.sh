#!/usr/bin/env bash
# `make demo`: a 3-node lab on this machine, a pod on each node, pods pinging across nodes over
# VXLAN, then what the operator sees: leases, routes and the kernel's own view. Leaves the lab up.
set -euo pipefail
WEFT=${1:-target/debug/weft}
WEFT=$(readlink -f "$WEFT")
LAB=demo

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

# A previous demo is replaced, so the demo can be run again and again.
"$WEFT" lab down --name "$LAB" >/dev/null 2>&1 || true

say "weft lab up --name $LAB --nodes 3"
"$WEFT" lab up --name "$LAB" --nodes 3

say "a pod on each node, wired by weft-cni"
declare -A IP
for n in 1 2 3; do
  out=$("$WEFT" lab pod --name "$LAB" add "node-$n" "pod$n")
  echo "$out"
  IP[$n]=$(echo "$out" | sed -n 's/.*: \([0-9.]*\) (namespace.*/\1/p')
done

say "pods ping each other across nodes (VXLAN, flannel.1)"
for a in 1 2 3; do
  for b in 1 2 3; do
    [ "$a" = "$b" ] && continue
    if "$WEFT" lab exec --name "$LAB" "node-$a-pod$a" -- ping -c 2 -i 0.2 -W 2 "${IP[$b]}" >/dev/null; then
      echo "pod$a (node-$a) -> pod$b ${IP[$b]} (node-$b): ok"
    else
      echo "pod$a (node-$a) -> pod$b ${IP[$b]} (node-$b): FAILED" >&2
      exit 1
    fi
  done
done

say "weft leases   (every node's subnet lease in etcd)"
"$WEFT" lab exec --name "$LAB" node-1 -- weft leases

say "weft routes   (on node-1: is every remote node programmed?)"
"$WEFT" lab exec --name "$LAB" node-1 -- weft routes

say "the kernel's view on node-1"
"$WEFT" lab exec --name "$LAB" node-1 -- ip route show dev flannel.1
"$WEFT" lab exec --name "$LAB" node-1 -- ip neigh show dev flannel.1
"$WEFT" lab exec --name "$LAB" node-1 -- bridge fdb show dev flannel.1

cat <<MSG

The lab is still up. Try:
  $WEFT lab status --name $LAB
  $WEFT lab exec --name $LAB node-2 -- weft routes -o json
  $WEFT lab exec --name $LAB node-1-pod1 -- ping ${IP[3]}
  $WEFT lab down --name $LAB        # removes every trace
MSG
