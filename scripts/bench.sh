#!/usr/bin/env bash
# weft's benchmarks (`make bench`): usage scripts/bench.sh <weft binary>
#
# 1. Overlay throughput: a 2-node lab per backend (vxlan, then host-gw), iperf3 pod-on-node-1 → pod-on-node-2
#    (the overlay) and node-1 → node-2 (the underlay, the same veths and bridge without weft), alternating,
#    BENCH_ROUNDS rounds (3) of BENCH_SECS seconds (5) each; for vxlan also the path split (BENCH_SPLIT=0 skips):
#    node-1 → pod b, node-1 → node-2's flannel.1, pod a → node-1's cni0, each against the underlay. Everything runs
#    inside the lab's namespaces. Then both backends again with one CPU per node (BENCH_PINNED=0 skips: clients on
#    CPU 0, servers on CPU 1, each node's eth0 receive processing on its node's CPU by RPS).
#
# Every step rejects a round in which its load generator saw errors (wrk socket errors or non-2xx, dnsperf
# lost queries beyond 0.5 %, an iperf3 error) or a side's rate collapsed below a third of its median, and
# names the rejected rounds: weft_lab::rounds (lab/src/rounds.rs; step 1 through the judge_rounds example).
# Sides swap who runs first every round.
# 2. Convergence, single-add latency and agent memory: tests/examples/overlay_bench.rs (BENCH_REPS, 3).
# 3. Service proxy (iptables mode, weft's dispatch vs kube-proxy's layout): proxy/examples/proxy_bench.rs —
#    new connections with wrk through client/node/server namespaces at 10 and BENCH_SERVICES (10,000)
#    services, full and one-endpoint syncs, and the RSS of a real `weft proxy`. BENCH_PROXY=0 skips it.
# 4. Userspace mode beside HAProxy (same node, same 10 backends): proxy/examples/userspace_bench.rs.
#    BENCH_USERSPACE=0 skips it.
# 5. Cluster DNS: tests/examples/dns_bench.rs — dnsperf against `weft dns` and Knot DNS serving the same 10,000
#    services (1,000 headless x 10 endpoints), alternating rounds (BENCH_DNS_ROUNDS, 2, of BENCH_DNS_SECS, 10),
#    latency percentiles at 10,000 QPS, the RSS of `weft dns`, and how long one Service change takes to be
#    answered (BENCH_DNS_UPDATES, 200, changes). BENCH_DNS=0 skips it.
# 6. Controllers: tests/examples/control_bench.rs — `weft apply` of a 1,000-replica Deployment to 1,000 pods bound,
#    a rolling update of it, controller RSS at 10,000 pods (real etcd on loopback). BENCH_CONTROL=0 skips it.
# 7. Kubelet: tests/examples/kubelet_bench.rs — pod start latency bind → Running (p50/p99 over BENCH_PODS, 50, pods
#    written at once, then over BENCH_PACED, 50, pods written at BENCH_RATE, 2, pods/s) and kubelet RSS at
#    BENCH_SCALE (100) pods, real containerd + runc + CNI. BENCH_KUBELET=0 skips it.
# 8. ipvs mode vs iptables mode inside one QEMU guest (the host kernel has no IPVS): proxy/examples/ipvs_bench.rs —
#    new connections through a VIP at 10 and BENCH_IPVS_SERVICES (10,000) services, full and one-endpoint syncs.
#    Emulated CPU, so ratios only. BENCH_IPVS=0 skips it.
# 9. eBPF mode: proxy/examples/ebpf_bench.rs — new connections through a VIP (socket LB) vs direct at 10 and
#    BENCH_SERVICES (10,000) services, full / no-op / one-endpoint syncs beside iptables mode's full sync,
#    map memory (bpftool); proxy/examples/ebpf_nodeport_bench.rs — NodePort throughput to a remote backend,
#    ebpf vs iptables mode on node-1 of a 2-node lab. BENCH_EBPF=0 skips both.
#
# Prints a markdown summary. Exits non-zero only when a measurement could not be taken; a missed target is
# reported, never an error (timings on these shared 2-core machines are noisy).
set -uo pipefail

WEFT=${1:?usage: scripts/bench.sh <weft binary>}
WEFT=$(realpath "$WEFT")
ROUNDS=${BENCH_ROUNDS:-3}
SECS=${BENCH_SECS:-5}
cd "$(dirname "$0")/.."

OUT=$(mktemp -d /tmp/weft-bench.XXXXXX)
LABS=()
cleanup() {
  for l in "${LABS[@]}"; do "$WEFT" lab down --name "$l" >/dev/null 2>&1; done
  rm -rf "$OUT"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

failed=0
fail() { echo "bench: $*" >&2; failed=1; }

# bits/s received, from an iperf3 -J report (empty when iperf3 failed).
gbps() {
  python3 - "$1" <<'EOF'
import json, sys
try:
    d = json.load(open(sys.argv[1]))
    if "error" in d:
        raise SystemExit(1)
    print("%.3f" % (d["end"]["sum_received"]["bits_per_second"] / 1e9))
except Exception:
    raise SystemExit(1)
EOF
}

# Client-side and server-side CPU (% of one core summed over the run, as iperf3 reports it).
cpu() {
  python3 -c 'import json,sys; c=json.load(open(sys.argv[1]))["end"]["cpu_utilization_percent"]; print("%.0f/%.0f" % (c["host_total"], c["remote_total"]))' "$1" 2>/dev/null
}

stats() { # "a b c" → "mean min max median"
  python3 -c 'import sys,statistics as s; v=[float(x) for x in sys.argv[1:]]; print("%.2f %.2f %.2f %.2f" % (s.mean(v), min(v), max(v), s.median(v)))' "$@"
}

THROUGHPUT_ROWS=()
THROUGHPUT_NOTES=()
# throughput <backend> [csum-off]: csum-off runs the agents with --vxlan-tx-checksum-offload=off, the
# workaround for NATed hosts on old kernels, to show what it costs.
throughput() {
  local backend=$1 variant=${2:-}
  local lab="bench$$${backend//-/}${variant//-/}" label=$backend extra=() cpin=() spin=()
  if [ "$variant" = csum-off ]; then
    label="$backend, --vxlan-tx-checksum-offload=off"
    extra=(--agent-arg=--vxlan-tx-checksum-offload=off)
  fi
  # pinned: one CPU per node, as two hosts would have — iperf3 clients on CPU 0, servers on CPU 1, and each node's
  # eth0 receive processing (RPS) on its node's CPU. Without it, the sender's CPU runs node-2's receive path too
  # (a veth hands a packet on in the sender's softirq), which no pair of real hosts does.
  if [ "$variant" = pinned ]; then
    label="$backend, one CPU per node"
    cpin=(taskset -c 0) spin=(taskset -c 1)
  fi
  LABS+=("$lab")
  echo "== throughput, $label: lab $lab (2 nodes), $ROUNDS rounds x ${SECS}s, overlay and underlay alternating" >&2
  # The overlay alone, as before `weft lab up` ran a whole cluster: no kubelets, containerd or DNS to share the cores.
  if ! "$WEFT" lab up --name "$lab" --nodes 2 --backend "$backend" --no-kubelet --no-dns "${extra[@]}" >"$OUT/$lab.up" 2>&1; then
    cat "$OUT/$lab.up" >&2; fail "$backend: lab up failed"; return
  fi
  local a b
  a=$("$WEFT" lab pod --name "$lab" add node-1 a 2>&1) || { echo "$a" >&2; fail "$backend: pod a"; return; }
  b=$("$WEFT" lab pod --name "$lab" add node-2 b 2>&1) || { echo "$b" >&2; fail "$backend: pod b"; return; }
  local pod_b underlay_b=192.168.56.12
  pod_b=$(sed -n 's/^pod b on node-2: \([0-9.]*\) .*/\1/p' <<<"$b")
  [ -n "$pod_b" ] || { fail "$backend: no address for pod b in: $b"; return; }
  if [ "$variant" = pinned ]; then
    "$WEFT" lab exec --name "$lab" node-1 -- sh -c 'echo 1 >/sys/class/net/eth0/queues/rx-0/rps_cpus' &&
      "$WEFT" lab exec --name "$lab" node-2 -- sh -c 'echo 2 >/sys/class/net/eth0/queues/rx-0/rps_cpus' || { fail "$label: RPS"; return; }
  fi
  "$WEFT" lab exec --name "$lab" node-2-b -- "${spin[@]}" iperf3 -s -D >/dev/null 2>&1 || { fail "$backend: iperf3 server in pod"; return; }
  "$WEFT" lab exec --name "$lab" node-2 -- "${spin[@]}" iperf3 -s -D >/dev/null 2>&1 || { fail "$backend: iperf3 server on node"; return; }
  local ok=0
  for _ in $(seq 1 40); do
    if "$WEFT" lab exec --name "$lab" node-1-a -- ping -c1 -W1 "$pod_b" >/dev/null 2>&1; then ok=1; break; fi
    sleep 0.5
  done
  [ $ok = 1 ] || { fail "$backend: pod a cannot reach pod b ($pod_b)"; return; }
  local over=() under=() ratios=() r o u judged=() rounds_in=""
  for r in $(seq 1 "$ROUNDS"); do
    # Overlay and underlay swap who runs first every round.
    if [ $((r % 2)) = 1 ]; then
      "$WEFT" lab exec --name "$lab" node-1-a -- "${cpin[@]}" iperf3 -c "$pod_b" -t "$SECS" -J >"$OUT/$lab.o$r.json" 2>&1
      "$WEFT" lab exec --name "$lab" node-1 -- "${cpin[@]}" iperf3 -c "$underlay_b" -t "$SECS" -J >"$OUT/$lab.u$r.json" 2>&1
    else
      "$WEFT" lab exec --name "$lab" node-1 -- "${cpin[@]}" iperf3 -c "$underlay_b" -t "$SECS" -J >"$OUT/$lab.u$r.json" 2>&1
      "$WEFT" lab exec --name "$lab" node-1-a -- "${cpin[@]}" iperf3 -c "$pod_b" -t "$SECS" -J >"$OUT/$lab.o$r.json" 2>&1
    fi
    # An iperf3 that failed is a rejected round (rate nan, 1 error), not the end of the step.
    local oe=0 ue=0
    o=$(gbps "$OUT/$lab.o$r.json") || { o=nan; oe=1; echo "   round $r: overlay iperf3 failed: $(head -c 300 "$OUT/$lab.o$r.json")" >&2; }
    u=$(gbps "$OUT/$lab.u$r.json") || { u=nan; ue=1; echo "   round $r: underlay iperf3 failed: $(head -c 300 "$OUT/$lab.u$r.json")" >&2; }
    rounds_in+="$o $oe $u $ue"$'\n'
    echo "   round $r: overlay $o Gbit/s (cpu client/server $(cpu "$OUT/$lab.o$r.json")%), underlay $u Gbit/s (cpu $(cpu "$OUT/$lab.u$r.json")%)" >&2
  done
  # Which rounds count: weft_lab::rounds (no iperf3 error, no rate under a third of its side's median).
  mapfile -t judged < <(printf '%s' "$rounds_in" | cargo run -q --release -p weft-tests --example judge_rounds -- overlay underlay)
  [ "${#judged[@]}" = "$ROUNDS" ] || { fail "$backend: judging the rounds failed"; return; }
  local rejected=()
  for r in $(seq 1 "$ROUNDS"); do
    read -r o _ u _ <<<"$(sed -n "${r}p" <<<"$rounds_in")"
    if [ "${judged[r-1]}" = ok ]; then
      over+=("$o"); under+=("$u")
      ratios+=("$(python3 -c "print('%.3f' % ($o / $u))")")
    else
      rejected+=("round $r ${judged[r-1]}")
      echo "   round $r ${judged[r-1]}" >&2
    fi
  done
  [ "${#ratios[@]}" -gt 0 ] || { fail "$backend: no valid round (${rejected[*]})"; return; }
  local so_mean so_min so_max su_mean su_min su_max sr_min sr_max sr_med
  read -r so_mean so_min so_max _ <<<"$(stats "${over[@]}")"
  read -r su_mean su_min su_max _ <<<"$(stats "${under[@]}")"
  read -r _ sr_min sr_max sr_med <<<"$(stats "${ratios[@]}")"
  THROUGHPUT_ROWS+=("| $label | $so_mean ($so_min–$so_max) | $su_mean ($su_min–$su_max) | $sr_med ($sr_min–$sr_max; ${#ratios[@]} of $ROUNDS rounds valid) | ≥ 0.8 | $(python3 -c "print('%.2f' % ($sr_med / 0.8))") |")
  for x in "${rejected[@]}"; do THROUGHPUT_NOTES+=("$label: $x"); done
  [ "$backend" = vxlan ] && [ -z "$variant" ] && [ "${BENCH_SPLIT:-1}" = 1 ] && split_path "$lab" "$pod_b"
  "$WEFT" lab down --name "$lab" >/dev/null 2>&1 || fail "$backend: lab down"
}

# split_path <lab> <pod b>: where the overlay's cost lies. Each part of the path against the underlay measured right
# after it, BENCH_ROUNDS rounds: node-1 → pod b (VXLAN and node-2's cni0 + pod veth, no pod hop on node-1), node-1 →
# node-2's flannel.1 address (VXLAN alone), pod a → node-1's cni0 address (pod veth and cni0 alone).
SPLIT_ROWS=()
split_path() {
  local lab=$1 pod_b=$2 f2 c1 r part src dst o u
  x() { "$WEFT" lab exec --name "$lab" "$@"; }
  f2=$(x node-2 -- ip -4 -o addr show flannel.1 | awk '{split($4, p, "/"); print p[1]}')
  c1=$(x node-1 -- ip -4 -o addr show cni0 | awk '{split($4, p, "/"); print p[1]}')
  x node-1 -- iperf3 -s -D >/dev/null 2>&1 || { fail "split: iperf3 server on node-1"; return; }
  for part in "node-1 → pod b (VXLAN + remote cni0/pod veth)|node-1|$pod_b" \
    "node-1 → node-2 flannel.1 (VXLAN alone)|node-1|$f2" "pod a → node-1 cni0 (local pod veth + cni0)|node-1-a|$c1"; do
    IFS='|' read -r what src dst <<<"$part"
    local rs=()
    for r in $(seq 1 "$ROUNDS"); do
      x "$src" -- iperf3 -c "$dst" -t "$SECS" -J >"$OUT/$lab.s$r.json" 2>&1
      x node-1 -- iperf3 -c 192.168.56.12 -t "$SECS" -J >"$OUT/$lab.su$r.json" 2>&1
      o=$(gbps "$OUT/$lab.s$r.json") && u=$(gbps "$OUT/$lab.su$r.json") || { echo "   split $what round $r: iperf3 failed" >&2; continue; }
      rs+=("$(python3 -c "print('%.3f' % ($o / $u))")")
      echo "   split $what round $r: $o Gbit/s, underlay $u" >&2
    done
    [ "${#rs[@]}" -gt 0 ] || { fail "split: $what: no round"; continue; }
    local mn mx md
    read -r _ mn mx md <<<"$(stats "${rs[@]}")"
    SPLIT_ROWS+=("| $what | $md ($mn–$mx; ${#rs[@]} rounds) |")
  done
}

throughput vxlan
throughput host-gw
if [ "${BENCH_PINNED:-1}" = 1 ] && [ "$(nproc)" -ge 2 ]; then
  throughput vxlan pinned
  throughput host-gw pinned
fi
[ "${BENCH_CSUM_AB:-1}" = 1 ] && throughput vxlan csum-off

echo "== convergence: cargo run --release -p weft-tests --example overlay_bench (WEFT_BIN=$WEFT)" >&2
WEFT_BIN="$WEFT" cargo run -q --release -p weft-tests --example overlay_bench >"$OUT/converge.md" || fail "convergence benchmark failed"

if [ "${BENCH_PROXY:-1}" = 1 ]; then
  echo "== service proxy: cargo run --release -p weft-proxy --example proxy_bench (WEFT_BIN=$WEFT)" >&2
  WEFT_BIN="$WEFT" cargo run -q --release -p weft-proxy --example proxy_bench >"$OUT/proxy.md" || fail "service proxy benchmark failed"
fi

if [ "${BENCH_USERSPACE:-1}" = 1 ]; then
  echo "== userspace vs HAProxy: cargo run --release -p weft-proxy --example userspace_bench" >&2
  cargo run -q --release -p weft-proxy --example userspace_bench >"$OUT/userspace.md" || fail "userspace benchmark failed"
fi

if [ "${BENCH_DNS:-1}" = 1 ]; then
  echo "== cluster DNS: cargo run --release -p weft-tests --example dns_bench (WEFT_BIN=$WEFT)" >&2
  WEFT_BIN="$WEFT" cargo run -q --release -p weft-tests --example dns_bench >"$OUT/dns.md" || fail "DNS benchmark failed"
fi

echo
echo "## Overlay throughput (iperf3, 1 TCP stream, $ROUNDS alternating rounds x ${SECS}s)"
echo
echo "| backend | pod→pod across nodes, Gbit/s (mean; min–max) | node→node underlay, Gbit/s | overlay / underlay (median of rounds; min–max) | target | ratio / target |"
echo "|---|---|---|---|---|---|"
for row in "${THROUGHPUT_ROWS[@]}"; do echo "$row"; done
for note in "${THROUGHPUT_NOTES[@]}"; do echo; echo "- $note"; done
if [ "${#SPLIT_ROWS[@]}" -gt 0 ]; then
  echo
  echo "VXLAN path split (each part / the underlay measured right after it, median; min–max):"
  echo
  echo "| part of the path | part / underlay |"
  echo "|---|---|"
  for row in "${SPLIT_ROWS[@]}"; do echo "$row"; done
fi
echo
cat "$OUT/converge.md"
[ -s "$OUT/proxy.md" ] && { echo; cat "$OUT/proxy.md"; }
[ -s "$OUT/userspace.md" ] && { echo; echo "## Userspace mode vs HAProxy"; echo; cat "$OUT/userspace.md"; }
[ -s "$OUT/dns.md" ] && { echo; cat "$OUT/dns.md"; }

if [ "${BENCH_CONTROL:-1}" = 1 ]; then
  echo "== controllers: cargo run --release -p weft-tests --example control_bench (WEFT_BIN=$WEFT)" >&2
  WEFT_BIN="$WEFT" cargo run -q --release -p weft-tests --example control_bench >"$OUT/control.md" || fail "controller benchmark failed"
  [ -s "$OUT/control.md" ] && { echo; cat "$OUT/control.md"; }
fi

if [ "${BENCH_KUBELET:-1}" = 1 ]; then
  echo "== kubelet: cargo run --release -p weft-tests --example kubelet_bench (WEFT_BIN=$WEFT)" >&2
  WEFT_BIN="$WEFT" cargo run -q --release -p weft-tests --example kubelet_bench >"$OUT/kubelet.md" || fail "kubelet benchmark failed"
  [ -s "$OUT/kubelet.md" ] && { echo; cat "$OUT/kubelet.md"; }
fi

if [ "${BENCH_IPVS:-1}" = 1 ]; then
  echo "== ipvs vs iptables in the QEMU lab: cargo run --release -p weft-proxy --example ipvs_bench" >&2
  cargo run -q --release -p weft-proxy --example ipvs_bench >"$OUT/ipvs.md" || fail "ipvs benchmark failed"
  [ -s "$OUT/ipvs.md" ] && { echo; cat "$OUT/ipvs.md"; }
fi

if [ "${BENCH_EBPF:-1}" = 1 ]; then
  echo "== eBPF mode: cargo run --release -p weft-proxy --example ebpf_bench" >&2
  cargo run -q --release -p weft-proxy --example ebpf_bench >"$OUT/ebpf.md" || fail "eBPF benchmark failed"
  [ -s "$OUT/ebpf.md" ] && { echo; cat "$OUT/ebpf.md"; }
  echo "== eBPF mode NodePort: cargo run --release -p weft-proxy --example ebpf_nodeport_bench (WEFT_BIN=$WEFT)" >&2
  WEFT_BIN="$WEFT" cargo run -q --release -p weft-proxy --example ebpf_nodeport_bench >"$OUT/ebpf-np.md" || fail "eBPF NodePort benchmark failed"
  [ -s "$OUT/ebpf-np.md" ] && { echo; cat "$OUT/ebpf-np.md"; }
fi
exit $failed
