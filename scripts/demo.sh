#!/usr/bin/env bash
# `make demo`: the seeds' story end to end in a 3-node lab on this machine. `weft lab up` starts etcd, the
# controller and, per node, the overlay agent, the proxy, containerd and the kubelet; then a Deployment of three
# busybox httpd pods and a Service with a selector (Endpoints by the controller) are applied with `weft apply`,
# the page is fetched by DNS name from a pod on another node, and `weft scale` and `weft rollout undo` change
# real containers. Every wait polls with a deadline and says what it waits for. The lab is removed on exit
# (set WEFT_DEMO_KEEP=1 to leave it up).
set -euo pipefail
WEFT=${1:-target/debug/weft}
WEFT=$(readlink -f "$WEFT")
LAB=demo
LABDIR=/run/weft/lab/$LAB

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
# `weft …` inside the lab (node-1), with the lab's etcd and PKI in the environment.
w() { "$WEFT" lab exec --name "$LAB" node-1 -- weft "$@"; }

cleanup() {
  local rc=$?
  if [ "$rc" -ne 0 ]; then
    echo
    echo "demo FAILED (exit $rc); the last lines of the lab's logs:" >&2
    for f in "$LABDIR"/controller.log "$LABDIR"/node-*/kubelet.log; do
      [ -f "$f" ] && { echo "--- $f" >&2; tail -n 5 "$f" >&2; }
    done
  fi
  if [ "${WEFT_DEMO_KEEP:-0}" = 1 ]; then
    echo "the lab is still up: $WEFT lab status --name $LAB; remove it with $WEFT lab down --name $LAB"
  else
    "$WEFT" lab down --name "$LAB" >/dev/null 2>&1 || true
    echo "lab $LAB removed (containers, containerd state, mounts, cgroups, namespaces)"
  fi
  exit "$rc"
}

# wait_for WHAT SECONDS COMMAND…: polls COMMAND every second until it succeeds or the deadline passes.
wait_for() {
  local what="$1" secs="$2"
  shift 2
  local end=$((SECONDS + secs))
  printf 'waiting up to %ss for %s ' "$secs" "$what"
  until "$@" >/dev/null 2>&1; do
    if [ "$SECONDS" -ge "$end" ]; then
      echo "- timed out" >&2
      return 1
    fi
    printf '.'
    sleep 1
  done
  echo " ok"
}

# "<ready> <total> <versions>" for the pods of app=web (not being deleted): Running with Ready True, and the
# VERSION each one's container was started with.
web_state() {
  w get pods -l app=web -o json | python3 -c '
import json, sys
items = json.load(sys.stdin).get("items", [])
live = [p for p in items if not p["metadata"].get("deletionTimestamp")]
ready = 0
versions = set()
for p in live:
    st = p.get("status", {})
    cond = {c["type"]: c["status"] for c in st.get("conditions", [])}
    ready += st.get("phase") == "Running" and cond.get("Ready") == "True"
    env = {e["name"]: e.get("value", "") for e in p["spec"]["containers"][0].get("env", [])}
    versions.add(env.get("VERSION", "?"))
print(ready, len(items), ",".join(sorted(versions)) or "-")'
}
web_is() { [ "$(web_state)" = "$1 $1 $2" ]; }
endpoints_count() {
  w get ep web -o json | python3 -c '
import json, sys
e = json.load(sys.stdin)
print(sum(len(s.get("addresses") or []) for s in e.get("subsets") or []))'
}
endpoints_are() { [ "$(endpoints_count)" = "$1" ]; }
container_ids() {
  w get pods -l app=web -o json | python3 -c '
import json, sys
for p in json.load(sys.stdin).get("items", []):
    for c in p.get("status", {}).get("containerStatuses", []):
        print(p["metadata"]["name"], p["spec"].get("nodeName", "-"), c.get("containerID", "-")[:25])' | sort
}
# Appends "[on node-N]" to every "hello from <pod>" read on stdin, from where the store says each pod runs.
on_nodes() {
  python3 -c '
import json, subprocess, sys
pods = json.loads(subprocess.run(sys.argv[1:], capture_output=True, text=True).stdout or "{}").get("items", [])
where = {p["metadata"]["name"]: p["spec"].get("nodeName", "?") for p in pods}
for line in sys.stdin.read().splitlines():
    words = line.split()
    pod = words[2] if len(words) > 2 and line.startswith("hello from ") else None
    print(line + (" [on %s]" % where.get(pod, "?") if pod else ""))
' "$WEFT" lab exec --name "$LAB" node-1 -- weft get pods -l app=web -o json
}
pod_phase() { w get pod "$1" -o json | python3 -c 'import json,sys; print(json.load(sys.stdin).get("status",{}).get("phase",""))'; }
pod_done() { case "$(pod_phase "$1")" in Succeeded) return 0 ;; Failed) echo "pod $1 Failed" >&2; exit 1 ;; *) return 1 ;; esac; }
# Running containers per node as containerd itself lists them (sandboxes included).
tasks() {
  for n in 1 2 3; do
    printf '  node-%s: %s running tasks in its containerd\n' "$n" \
      "$(ctr --address "$LABDIR/node-$n/containerd/containerd.sock" -n k8s.io tasks ls 2>/dev/null | grep -c RUNNING || true)"
  done
}
# A pod's log: `weft logs` when this weft has it, else the CRI log file the kubelet keeps under its root dir.
pod_log() {
  local pod="$1" node="$2"
  if "$WEFT" logs --help >/dev/null 2>&1; then
    w logs "$pod" | on_nodes
  else
    echo "(no \`weft logs\` in this build: the kubelet's CRI log file on $node)"
    cat "$LABDIR/$node"/kubelet/pods/default_"$pod"_*/*/0.log | cut -d' ' -f4- | on_nodes
  fi
}

deployment() {
  cat <<YAML
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 3
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
      - name: httpd
        image: weft.local/busybox:1
        env: [{name: VERSION, value: "$1"}]
        command: ["sh", "-c", "mkdir -p /www && echo \"hello from \$(hostname) (\$VERSION)\" > /www/index.html && exec httpd -f -p 80 -h /www"]
        ports: [{containerPort: 80}]
        readinessProbe: {httpGet: {path: /, port: 80}, periodSeconds: 2}
YAML
}

# A previous demo is replaced, so the demo can be run again and again.
"$WEFT" lab down --name "$LAB" >/dev/null 2>&1 || true
trap cleanup EXIT

say "weft lab up --name $LAB --nodes 3"
"$WEFT" lab up --name "$LAB" --nodes 3
w get nodes -o wide

say "the overlay: a bare pod namespace on node-1 pings one on node-2 (VXLAN)"
a=$("$WEFT" lab pod --name "$LAB" add node-1 a | sed -n 's/.*: \([0-9.]*\) (namespace.*/\1/p')
b=$("$WEFT" lab pod --name "$LAB" add node-2 b | sed -n 's/.*: \([0-9.]*\) (namespace.*/\1/p')
"$WEFT" lab exec --name "$LAB" node-1-a -- ping -c 2 -i 0.2 -W 2 "$b" | tail -n 2
"$WEFT" lab pod --name "$LAB" del node-1 a >/dev/null
"$WEFT" lab pod --name "$LAB" del node-2 b >/dev/null

say "weft apply: Deployment web (3 busybox httpd pods) and Service web (selector app=web)"
{
  deployment v1
  echo ---
  printf 'apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  selector: {app: web}\n  ports: [{name: http, port: 80, targetPort: 80}]\n'
} | w apply -f -
wait_for "3 web pods Running and Ready" 120 web_is 3 v1
w get pods -o wide
echo "each node's pod subnet (spec.podCIDR from its overlay lease):"
w get nodes -o json | python3 -c '
import json, sys
for n in json.load(sys.stdin)["items"]:
    print("  %s  %s" % (n["metadata"]["name"], n["spec"].get("podCIDR", "-")))'
nodes=$(w get pods -l app=web -o json | python3 -c 'import json,sys; print(len({p["spec"].get("nodeName") for p in json.load(sys.stdin)["items"]}))')
echo "the 3 pods run on $nodes nodes"
[ "$nodes" -ge 2 ]
tasks

say "Endpoints web, maintained by the controller from the pods' readiness (none written by hand)"
wait_for "3 ready addresses in Endpoints web" 60 endpoints_are 3
w get svc web
w get ep web

say "a busybox pod on node-3 fetches http://web/ by its DNS name (cluster DNS, then the Service VIP)"
w apply -f - <<'YAML'
apiVersion: v1
kind: Pod
metadata: {name: client}
spec:
  nodeName: node-3
  restartPolicy: Never
  containers:
  - name: wget
    image: weft.local/busybox:1
    command: ["sh", "-c", "cat /etc/resolv.conf; nslookup web.default.svc.cluster.local; for i in 1 2 3 4 5 6; do wget -q -O - http://web/ || exit 1; done"]
YAML
wait_for "pod client to finish (Succeeded)" 90 pod_done client
w get pod client -o wide
pod_log client node-3

say "and from a bare namespace on node-2: curl http://web.default.svc.cluster.local/"
"$WEFT" lab pod --name "$LAB" add node-2 probe >/dev/null
fetch() {
  local out
  out=$("$WEFT" lab exec --name "$LAB" node-2-probe -- curl -s -m 3 -w '|%{http_code}' http://web.default.svc.cluster.local/) || return 1
  echo "$(echo "${out%|*}" | on_nodes) -> HTTP ${out##*|}"
}
wait_for "an answer from web.default.svc.cluster.local" 30 fetch
for i in 1 2 3; do fetch; done

if "$WEFT" exec --help >/dev/null 2>&1; then
  say "weft exec and weft logs: through the kubelets' HTTPS port 10250 with the lab's admin certificate"
  pod=$(w get pods -l app=web -o json | python3 -c '
import json, sys
print(next(p["metadata"]["name"] for p in json.load(sys.stdin)["items"] if p["spec"].get("nodeName") != "node-1"))')
  echo "\$ weft exec $pod -- sh -c 'hostname; cat /www/index.html; ps'"
  w exec "$pod" -- sh -c 'hostname; cat /www/index.html; ps'
  echo "\$ weft logs client --tail 2"
  w logs client --tail 2
  node_ip=$(w get pod "$pod" -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["status"]["hostIP"])')
  rc=0
  "$WEFT" lab exec --name "$LAB" node-1 -- curl -sk -m 3 "https://$node_ip:10250/healthz" >/dev/null 2>&1 || rc=$?
  if [ "$rc" -eq 0 ]; then
    echo "the kubelet on $node_ip answered a client without a certificate" >&2
    exit 1
  fi
  echo "curl https://$node_ip:10250/ without a client certificate: refused (curl exit $rc)"
else
  say "weft exec / weft logs: not in this build yet (the lab already sets WEFT_KUBELET_CA, WEFT_KUBELET_CLIENT_CERT, WEFT_KUBELET_CLIENT_KEY for them)"
fi

say "weft scale deployment web --replicas 5: two more containers"
w scale deployment web --replicas 5
wait_for "5 web pods Running and Ready" 120 web_is 5 v1
wait_for "5 addresses in Endpoints web" 60 endpoints_are 5
w get pods -l app=web -o wide
tasks
w scale deployment web --replicas 3
wait_for "back to 3 web pods" 120 web_is 3 v1

say "a new revision (VERSION=v2): the Deployment replaces every container"
before=$(container_ids)
deployment v2 | w apply -f -
wait_for "3 web pods of revision v2" 180 web_is 3 v2
wait_for "3 addresses in Endpoints web" 60 endpoints_are 3
container_ids
for i in 1 2; do fetch; done
w rollout history deployment/web

say "weft rollout undo deployment/web: back to v1, in new containers"
w rollout undo deployment/web
wait_for "3 web pods of revision v1 again" 180 web_is 3 v1
wait_for "3 addresses in Endpoints web" 60 endpoints_are 3
after=$(container_ids)
echo "containers before v2:"
echo "$before" | sed 's/^/  /'
echo "containers after the undo:"
echo "$after" | sed 's/^/  /'
[ "$before" != "$after" ]
wait_for "the page to say v1" 30 sh -c "\"$WEFT\" lab exec --name $LAB node-2-probe -- curl -s -m 3 http://web/ | grep -q v1"
for i in 1 2; do fetch; done
w get deploy,rs -o wide

say "done: Deployment -> ReplicaSets -> pods on containerd -> Endpoints -> DNS -> Service VIP, across nodes"
