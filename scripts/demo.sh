#!/usr/bin/env bash
# `make demo`: a 3-node lab on this machine, a pod on each node, pods pinging across nodes over
# VXLAN, then what the operator sees: leases, routes and the kernel's own view; a Service through the
# proxy, and its name through the cluster DNS. Leaves the lab up.
set -euo pipefail
WEFT=${1:-target/debug/weft}
WEFT=$(readlink -f "$WEFT")
LAB=demo

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

# A previous demo is replaced, so the demo can be run again and again.
"$WEFT" lab down --name "$LAB" >/dev/null 2>&1 || true

say "weft lab up --name $LAB --nodes 3 --dns"
"$WEFT" lab up --name "$LAB" --nodes 3 --dns

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

say "a Service in front of pod2 and pod3: weft apply, then weft proxy (iptables) on every node"
for n in 2 3; do
  # A tiny server in each backend pod that answers with its name.
  ip netns exec "weft-$LAB-node-$n-pod$n" setsid socat TCP-LISTEN:8080,reuseaddr,fork "SYSTEM:echo hello from pod$n" \
    </dev/null >/dev/null 2>&1 &
done
"$WEFT" lab exec --name "$LAB" node-1 -- weft apply -f - <<YAML
apiVersion: v1
kind: Service
metadata: {name: hello}
spec:
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Endpoints
metadata: {name: hello}
subsets:
- addresses: [{ip: "${IP[2]}", nodeName: node-2}, {ip: "${IP[3]}", nodeName: node-3}]
  ports: [{name: http, port: 8080}]
YAML
"$WEFT" lab exec --name "$LAB" node-1 -- weft get svc
"$WEFT" lab exec --name "$LAB" node-1 -- weft get ep
VIP=$("$WEFT" lab exec --name "$LAB" node-1 -- weft get svc hello -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["spec"]["clusterIP"])')
for i in 1 2 3 4; do
  for try in $(seq 1 20); do
    out=$("$WEFT" lab exec --name "$LAB" node-1-pod1 -- socat -T2 - "TCP:$VIP:80,connect-timeout=2" 2>/dev/null) && break
    sleep 0.25
  done
  echo "pod1 -> hello ($VIP:80): ${out:-FAILED}"
  [ -n "$out" ] || exit 1
done

say "weft services   (on node-1: what the proxy serves and has programmed)"
"$WEFT" lab exec --name "$LAB" node-1 -- weft services
say "cluster DNS: weft dns behind kube-dns (10.96.0.10); pod1 finds hello by name"
"$WEFT" lab exec --name "$LAB" node-1-pod1 -- cat /etc/resolv.conf
for try in $(seq 1 20); do
  out=$("$WEFT" lab exec --name "$LAB" node-1-pod1 -- getent hosts hello 2>/dev/null) && break
  sleep 0.25
done
echo "getent hosts hello: ${out:-FAILED}"
[ -n "$out" ] || exit 1
"$WEFT" lab exec --name "$LAB" node-1-pod1 -- dig +short +search SRV _http._tcp.hello
out=$("$WEFT" lab exec --name "$LAB" node-1-pod1 -- socat -T2 - "TCP:hello.default.svc.cluster.local:80,connect-timeout=2" 2>/dev/null || true)
echo "pod1 -> hello.default.svc.cluster.local:80: ${out:-FAILED}"
[ -n "$out" ] || exit 1

cat <<MSG

The lab is still up. Try:
  $WEFT lab status --name $LAB
  $WEFT lab exec --name $LAB node-2 -- weft routes -o json
  $WEFT lab exec --name $LAB node-1-pod1 -- ping ${IP[3]}
  $WEFT lab down --name $LAB        # removes every trace
MSG
