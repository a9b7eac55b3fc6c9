# The service conformance table in ipvs mode, run inside the QEMU kernel lab's guest (busybox sh).
# Namespaces play the node (node-1, 192.168.56.11, pods on cni0 10.244.1.0/24), a host outside (ext,
# 192.168.56.10), a client pod on a routed link (10.244.2.2), three backend pods s1-s3, and a second node (node-2,
# 192.168.57.12 behind ext, its own proxy) with one pod s4 (10.244.3.3).
# Every check prints `WEFT-CHECK PASS|FAIL <name>: <detail>`; the test on the host reads them.

ip() { /bin/ip "$@"; }
nsx() { ns=$1; shift; /bin/ip netns exec "$ns" "$@"; }
pass() { echo "WEFT-CHECK PASS $1 :: $2"; }
fail() { echo "WEFT-CHECK FAIL $1 :: $2"; }
# until_ok SECONDS CMD...: polls CMD until it succeeds or the time is up.
until_ok() {
    n=$(($1 * 5)); shift
    while [ $n -gt 0 ]; do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.2; n=$((n - 1))
    done
    "$@" >/dev/null 2>&1
}
fetch() { nsx "$1" socat -t3 -T5 - "TCP:$2,connect-timeout=3" </dev/null 2>&1; }
udp() { echo who | nsx "$1" socat -T2 - "UDP:$2" 2>&1; }
is_one_of() { v=$1; shift; for x in "$@"; do [ "$v" = "$x" ] && return 0; done; return 1; }
# spread NS ADDR N: the distinct answers of N connections, as "count name" lines.
spread() {
    : > /tmp/spread
    i=0; while [ $i -lt "$3" ]; do fetch "$1" "$2" >> /tmp/spread; echo >> /tmp/spread; i=$((i + 1)); done
    grep -v '^$' /tmp/spread | sort | uniq -c | sed 's/^ *//'
}
healthy() { nsx node curl -sf http://127.0.0.1:10256/healthz; }
export WEFT_ETCD_ENDPOINTS=http://127.0.0.1:2379

start_proxy() {
    mode=$1; shift
    # Not through nsx: `ip netns exec` execs weft, so $! is the proxy itself.
    WEFT_LOG=info,weft_proxy=debug /bin/ip netns exec node weft proxy --proxy-mode "$mode" --hostname-override node-1 --cluster-cidr 10.244.0.0/16 \
        --min-sync-period 100ms --sync-period 2s "$@" >> "/tmp/proxy-$mode.log" 2>&1 &
    echo $! > /tmp/proxy.pid
    until_ok 30 healthy || { echo "proxy ($mode) not healthy"; tail -n 30 "/tmp/proxy-$mode.log"; }
}
stop_proxy() {
    pid=$(cat /tmp/proxy.pid); kill "$pid"
    n=50; while [ $n -gt 0 ] && kill -0 "$pid" 2>/dev/null; do sleep 0.2; n=$((n - 1)); done
    kill -0 "$pid" 2>/dev/null && echo "proxy $pid did not stop"
    ! healthy > /dev/null 2>&1
}

# --- topology ---------------------------------------------------------------------------------------
for n in node ext client s1 s2 s3; do ip netns add $n; ip -n $n link set lo up; done
ip -n node link add eth0 type veth peer name eth0 netns ext
ip -n node addr add 192.168.56.11/24 dev eth0; ip -n node link set eth0 up
ip -n ext addr add 192.168.56.10/24 dev eth0; ip -n ext link set eth0 up
ip -n ext route add 203.0.113.0/24 via 192.168.56.11
ip -n node link add cni0 type bridge; ip -n node addr add 10.244.1.1/24 dev cni0; ip -n node link set cni0 up
i=3
for p in s1 s2 s3; do
    ip -n node link add veth-$p type veth peer name eth0 netns $p
    ip -n node link set veth-$p master cni0 up
    ip -n $p addr add 10.244.1.$i/24 dev eth0; ip -n $p link set eth0 up; ip -n $p route add default via 10.244.1.1
    i=$((i + 1))
done
# The client sits on a routed link (as a pod of another node would), so replies pass the node's IPVS.
ip -n node link add veth-client type veth peer name eth0 netns client
ip -n node addr add 10.244.2.1/24 dev veth-client; ip -n node link set veth-client up
ip -n client addr add 10.244.2.2/24 dev eth0; ip -n client link set eth0 up; ip -n client route add default via 10.244.2.1
nsx node sh -c 'echo 1 > /proc/sys/net/ipv4/ip_forward'
# A second node (node-2, 192.168.57.12, pods on 10.244.3.0/24) on another link of the outside host, which routes
# between the two nodes as a fabric would; its one pod, s4.
for n in node2 s4; do ip netns add $n; ip -n $n link set lo up; done
ip -n node2 link add eth0 type veth peer name eth1 netns ext
ip -n node2 addr add 192.168.57.12/24 dev eth0; ip -n node2 link set eth0 up
ip -n ext addr add 192.168.57.10/24 dev eth1; ip -n ext link set eth1 up
ip -n node2 link add cni0 type bridge; ip -n node2 addr add 10.244.3.1/24 dev cni0; ip -n node2 link set cni0 up
ip -n node2 link add veth-s4 type veth peer name eth0 netns s4
ip -n node2 link set veth-s4 master cni0 up
ip -n s4 addr add 10.244.3.3/24 dev eth0; ip -n s4 link set eth0 up; ip -n s4 route add default via 10.244.3.1
for n in ext node2; do nsx $n sh -c 'echo 1 > /proc/sys/net/ipv4/ip_forward'; done
ip -n ext route add 10.244.3.0/24 via 192.168.57.12
ip -n ext route add 10.244.1.0/24 via 192.168.56.11; ip -n ext route add 10.244.2.0/24 via 192.168.56.11
ip -n node route add 10.244.3.0/24 via 192.168.56.10; ip -n node route add 192.168.57.0/24 via 192.168.56.10
ip -n node2 route add default via 192.168.57.10

for s in s1 s2 s3; do
    nsx $s socat TCP-LISTEN:9376,fork,reuseaddr SYSTEM:"echo $s" &
    nsx $s socat UDP-RECVFROM:9377,fork SYSTEM:"echo $s" &
    nsx $s socat TCP-LISTEN:7000,fork,reuseaddr EXEC:cat &
done
nsx s4 socat TCP-LISTEN:9376,fork,reuseaddr SYSTEM:"echo s4" &

nsx node etcd --data-dir /tmp/etcd --name default --listen-client-urls http://127.0.0.1:2379,http://192.168.56.11:2379 \
    --advertise-client-urls http://127.0.0.1:2379 --listen-peer-urls http://127.0.0.1:2380 \
    --initial-advertise-peer-urls http://127.0.0.1:2380 --initial-cluster default=http://127.0.0.1:2380 \
    > /tmp/etcd.log 2>&1 &
until_ok 60 nsx node curl -sf http://127.0.0.1:2379/health || { echo "etcd did not start"; tail -n 20 /tmp/etcd.log; }

# --- services ---------------------------------------------------------------------------------------
# svc NAME IP PORT TARGET PROTO EXTRA-SPEC; eps NAME PORT PROTO IPS...
svc() {
    printf 'apiVersion: v1\nkind: Service\nmetadata: {name: %s, namespace: default}\nspec: {clusterIP: %s%s, ports: [{name: p, port: %s, targetPort: %s, protocol: %s%s}]}\n---\n' \
        "$1" "$2" "$6" "$3" "$4" "$5" "$7"
}
eps() {
    name=$1; port=$2; proto=$3; shift 3
    addrs=""; for a in "$@"; do addrs="$addrs{ip: $a, nodeName: node-1}, "; done
    if [ -z "$addrs" ]; then subsets="[]"; else subsets="[{addresses: [${addrs%, }], ports: [{name: p, port: $port, protocol: $proto}]}]"; fi
    printf 'apiVersion: v1\nkind: Endpoints\nmetadata: {name: %s, namespace: default}\nsubsets: %s\n---\n' "$name" "$subsets"
}
S1=10.244.1.3; S2=10.244.1.4; S3=10.244.1.5
{
    svc web 10.96.100.1 80 9376 TCP "" ""; eps web 9376 TCP $S2 $S3
    svc local 10.96.100.2 80 9376 TCP "" ""; eps local 9376 TCP $S1
    svc np 10.96.100.4 80 9376 TCP ", type: NodePort" ", nodePort: 30080"; eps np 9376 TCP $S1 $S2 $S3
    svc ext 10.96.100.3 80 9376 TCP ", externalIPs: [203.0.113.10]" ""; eps ext 9376 TCP $S2
    svc spread 10.96.100.5 80 9376 TCP "" ""; eps spread 9376 TCP $S1 $S2 $S3
    svc sticky 10.96.100.6 80 9376 TCP ", sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}" ""
    eps sticky 9376 TCP $S1 $S2 $S3
    svc dns 10.96.100.7 53 9377 UDP "" ""; eps dns 9377 UDP $S2 $S3
    svc shrink 10.96.100.8 80 9376 TCP "" ""; eps shrink 9376 TCP $S1 $S2
    svc empty 10.96.100.9 80 9376 TCP "" ""; eps empty 9376 TCP
    svc echo 10.96.100.11 7000 7000 TCP "" ""; eps echo 7000 TCP $S3
    svc hairpin 10.96.100.12 80 9376 TCP "" ""; eps hairpin 9376 TCP $S1
    svc remote 10.96.100.14 80 9376 TCP "" ""
    printf 'apiVersion: v1\nkind: Endpoints\nmetadata: {name: remote, namespace: default}\nsubsets: [{addresses: [{ip: 10.244.3.3, nodeName: node-2}], ports: [{name: p, port: 9376, protocol: TCP}]}]\n---\n'
    printf 'apiVersion: v1\nkind: Service\nmetadata: {name: headless, namespace: default}\nspec: {clusterIP: None, ports: [{port: 80}]}\n'
} > /tmp/services.yaml
apply() { nsx node weft apply -f "$1" > /tmp/apply.log 2>&1 || { echo "apply failed:"; cat /tmp/apply.log; }; }
apply /tmp/services.yaml

start_proxy ipvs --ipvs-tcp-timeout 900s --ipvs-tcpfin-timeout 120s --ipvs-udp-timeout 300s \
    --ipvs-graceful-termination-period 3s
# node-2's proxy, against node-1's etcd over the fabric.
WEFT_LOG=info /bin/ip netns exec node2 weft proxy --proxy-mode ipvs --hostname-override node-2 --cluster-cidr 10.244.0.0/16 \
    --etcd-endpoints http://192.168.56.11:2379 --min-sync-period 100ms --sync-period 2s >> /tmp/proxy-node2.log 2>&1 &
echo $! > /tmp/proxy-node2.pid
has_vs() { nsx node ipvsadm -Ln | grep -q "$1"; }
until_ok 20 has_vs "10.96.100.12:80" || { echo "no virtual servers"; nsx node ipvsadm -Ln; tail -n 30 /tmp/proxy-ipvs.log; }

# --- the conformance table ---------------------------------------------------------------------------
out=$(fetch client 10.96.100.1:80)
if is_one_of "$out" s2 s3; then pass "pod to ClusterIP" "$out"; else fail "pod to ClusterIP" "$out"; fi

out=$(fetch client 10.96.100.2:80)
if [ "$out" = s1 ]; then pass "pod to a single-endpoint service" "$out"; else fail "pod to a single-endpoint service" "$out"; fi

out=$(fetch client 10.96.100.14:80)
if [ "$out" = s4 ]; then pass "pod to ClusterIP across nodes" "$out"; else fail "pod to ClusterIP across nodes" "$out"; fi

np2() { is_one_of "$(fetch ext 192.168.57.12:30080)" s1 s2 s3; }
if until_ok 30 np2; then pass "NodePort from an outside host, on the other node" "$(fetch ext 192.168.57.12:30080)"
else fail "NodePort from an outside host, on the other node" "$(fetch ext 192.168.57.12:30080); $(tail -n 5 /tmp/proxy-node2.log | tr '\n' ' ')"; fi

out=$(fetch s1 10.96.100.12:80)
if [ "$out" = s1 ]; then pass "a pod reaches itself through its own service (hairpin)" "$out"
else fail "a pod reaches itself through its own service (hairpin)" "$out"; fi

out=$(fetch ext 192.168.56.11:30080)
if is_one_of "$out" s1 s2 s3; then pass "NodePort from an outside host" "$out"; else fail "NodePort from an outside host" "$out"; fi

out=$(fetch ext 203.0.113.10:80)
if [ "$out" = s2 ]; then pass "externalIPs from an outside host" "$out"; else fail "externalIPs from an outside host" "$out"; fi

out=$(spread client 10.96.100.5:80 30 | tr '\n' ' ')
if [ "$(echo "$out" | wc -w)" = 6 ]; then pass "load spread over every endpoint (30 connections)" "$out"
else fail "load spread over every endpoint (30 connections)" "$out"; fi

out=$(spread client 10.96.100.6:80 12 | tr '\n' ' ')
if [ "$(echo "$out" | wc -w)" = 2 ]; then pass "ClientIP affinity" "$out"; else fail "ClientIP affinity" "$out"; fi
if nsx node ipvsadm -Ln -t 10.96.100.6:80 | grep -q "persistent 60"; then pass "affinity is IPVS persistence with the Service's timeout" ""
else fail "affinity is IPVS persistence with the Service's timeout" "$(nsx node ipvsadm -Ln -t 10.96.100.6:80)"; fi

# UDP has no retransmission, and the answer (socat forks a shell per datagram) can take longer than socat's 2 s
# under emulation on a busy host: ask up to 5 times.
i=0; out=""
while [ $i -lt 5 ] && ! is_one_of "$out" s2 s3; do out=$(udp client 10.96.100.7:53); i=$((i + 1)); done
if is_one_of "$out" s2 s3; then pass "UDP" "$out (attempt $i)"; else fail "UDP" "no answer in $i attempts: $out"; fi

out=$(fetch client 10.96.100.9:80)
case "$out" in *refused*) pass "no endpoints: refused at once" "$out" ;; *) fail "no endpoints: refused at once" "$out" ;; esac

# A listener of the node itself must not answer on a service address (the filter on WEFT-IPVS-IPS).
nsx node socat TCP-LISTEN:81,fork,reuseaddr SYSTEM:"echo node" &
listening() { [ "$(fetch node 10.244.1.1:81)" = node ]; }
until_ok 5 listening
out=$(fetch client 10.96.100.1:81)
case "$out" in *refused*) pass "a service address on no service port is refused" "$out" ;;
    *) fail "a service address on no service port is refused" "$out" ;; esac

if nsx node /bin/ip -o addr show dev weft-ipvs0 | grep -q "10.96.100.1/32" \
    && nsx node /bin/ip -o link show weft-ipvs0 | grep -q NOARP; then
    pass "ClusterIPs are /32 addresses on the NOARP dummy weft-ipvs0" ""
else fail "ClusterIPs are /32 addresses on the NOARP dummy weft-ipvs0" "$(nsx node /bin/ip addr show dev weft-ipvs0)"; fi

if nsx node ipset list WEFT-CLUSTER-IP | grep -q "10.96.100.1,tcp:80" && nsx node ipset list WEFT-NODE-PORT-TCP | grep -q 30080 \
    && nsx node ipset list WEFT-LOOP-BACK | grep -q "10.244.1.3,tcp:9376,10.244.1.3"; then
    pass "ipsets hold cluster IPs, node ports and hairpin endpoints" ""
else fail "ipsets hold cluster IPs, node ports and hairpin endpoints" "$(nsx node ipset list -t)"; fi

out=$(nsx node weft services -o json 2>&1)
if echo "$out" | grep -q "default/headless" || ! echo "$out" | grep -q "default/web:p"; then
    fail "a headless service gets no virtual server" "$out"
else pass "a headless service gets no virtual server" ""; fi

ok=1
for f in conntrack expire_nodest_conn expire_quiescent_template; do
    [ "$(nsx node cat /proc/sys/net/ipv4/vs/$f)" = 1 ] || ok=0
done
if [ $ok = 1 ]; then pass "IPVS sysctls set in the node's namespace" "conn_reuse_mode=$(nsx node cat /proc/sys/net/ipv4/vs/conn_reuse_mode)"
else fail "IPVS sysctls set in the node's namespace" "$(nsx node sh -c 'grep . /proc/sys/net/ipv4/vs/*')"; fi

out=$(nsx node ipvsadm -L --timeout)
case "$out" in *"900 120 300"*) pass "--ipvs-*-timeout flags" "$out" ;; *) fail "--ipvs-*-timeout flags" "$out" ;; esac

out=$(nsx node weft services 2>&1)
if echo "$out" | grep -q "TCP 10.96.100.1:80 rr" && echo "$out" | grep -q "10.244.1.4:9376 w1 active" \
    && echo "$out" | grep -q "sysctl net.ipv4.vs.conntrack = 1"; then
    pass "weft services shows virtual and real servers with weights and connections" ""
else fail "weft services shows virtual and real servers with weights and connections" "$out"; fi

out=$(nsx node curl -sf http://127.0.0.1:10249/metrics)
if echo "$out" | grep -q 'weft_proxy_info{mode="ipvs"} 1' && echo "$out" | grep -Eq '^weft_proxy_service_ports [0-9]'; then
    pass "metrics and healthz" "$(healthy)"
else fail "metrics and healthz" "$out"; fi

# Bad input written straight into etcd (no API server would store it): skipped with a warning naming the key and
# the bad address, every valid service still served, and a service added afterwards served too.
ctl() { nsx node etcdctl --endpoints http://127.0.0.1:2379 "$@" > /dev/null; }
ctl put /registry/services/default/garbage '{not json'
ctl put /registry/endpoints/default/halfbad '{"apiVersion":"v1","kind":"Endpoints","metadata":{"name":"halfbad","namespace":"default"},"subsets":[{"addresses":[{"ip":"999.1.1.1"},{"ip":"10.244.1.3","nodeName":"node-1"}],"ports":[{"name":"p","port":9376,"protocol":"TCP"}]}]}'
{ svc after 10.96.100.13 80 9376 TCP "" ""; eps after 9376 TCP $S1; } > /tmp/after.yaml; apply /tmp/after.yaml
warned() { grep -q "/registry/services/default/garbage" /tmp/proxy-ipvs.log && grep -q "999.1.1.1" /tmp/proxy-ipvs.log; }
after_served() { [ "$(fetch client 10.96.100.13:80)" = s1 ]; }
if until_ok 15 warned && until_ok 15 after_served && [ "$(fetch client 10.96.100.2:80)" = s1 ] && healthy > /dev/null; then
    pass "bad input is skipped and every valid service still served" "$(grep -c 'garbage\|999.1.1.1' /tmp/proxy-ipvs.log) warning lines"
else fail "bad input is skipped and every valid service still served" "$(grep -i 'warn' /tmp/proxy-ipvs.log | tail -n 5 | tr '\n' ' ') after: $(fetch client 10.96.100.13:80)"; fi
ctl del /registry/services/default/garbage; ctl del /registry/endpoints/default/halfbad

# A removed TCP real server drains at weight 0 (its closed connections still count), then goes at the deadline.
before=$(spread client 10.96.100.8:80 6 | tr '\n' ' ')
eps shrink 9376 TCP $S1 > /tmp/shrink.yaml; apply /tmp/shrink.yaml
quiesced() { nsx node ipvsadm -Ln -t 10.96.100.8:80 | grep -Eq "10.244.1.4:9376 +Masq +0 "; }
gone_now() { ! nsx node ipvsadm -Ln -t 10.96.100.8:80 | grep -q "10.244.1.4:9376"; }
# A real server with connections to drain goes to weight 0; one that served none (the spread missed it) has nothing
# to drain and is deleted at once, as kube-proxy's graceful termination does.
case "$before" in
    *s2*) check=quiesced ;;
    *) check=gone_now ;;
esac
if until_ok 10 $check; then pass "a removed TCP real server goes to weight 0" "before: $before ($check)"
else fail "a removed TCP real server goes to weight 0" "before: $before; $(nsx node ipvsadm -Ln -t 10.96.100.8:80 | tr '\n' ' ')"; fi
after=$(spread client 10.96.100.8:80 12 | tr '\n' ' ')
case "$after" in *s2*) fail "a removed endpoint gets no new connection" "$after" ;; *) pass "a removed endpoint gets no new connection" "$after" ;; esac
gone() { ! nsx node ipvsadm -Ln -t 10.96.100.8:80 | grep -q "10.244.1.4:9376"; }
if until_ok 15 gone; then pass "a draining real server is deleted at its deadline" ""
else fail "a draining real server is deleted at its deadline" "$(nsx node ipvsadm -Ln -t 10.96.100.8:80)"; fi

# A removed UDP real server is deleted at once, and the conntrack flows NATed to it with it (as kube-proxy
# clears them: a client reusing its source port would otherwise keep talking to the removed endpoint).
udp client 10.96.100.7:53 > /dev/null; udp client 10.96.100.7:53 > /dev/null
flows_to_s2() { nsx node conntrack -L -p udp --orig-dst 10.96.100.7 --dst-nat $S2 2>/dev/null | grep -c "dport=53"; }
flows_before=$(flows_to_s2)
eps dns 9377 UDP $S3 > /tmp/dns.yaml; apply /tmp/dns.yaml
udp_gone() { ! nsx node ipvsadm -Ln -u 10.96.100.7:53 | grep -q "10.244.1.4:9377"; }
if until_ok 5 udp_gone; then pass "a removed UDP real server is deleted at once" ""
else fail "a removed UDP real server is deleted at once" "$(nsx node ipvsadm -Ln -u 10.96.100.7:53)"; fi
no_flows() { [ "$(flows_to_s2)" = 0 ]; }
if [ "${flows_before:-0}" -gt 0 ] && until_ok 5 no_flows; then
    pass "UDP flows to a removed real server are cleared from conntrack" "$flows_before before"
else fail "UDP flows to a removed real server are cleared from conntrack" "before: ${flows_before:-none}; now: $(nsx node conntrack -L -p udp --orig-dst 10.96.100.7 2>&1 | tr '\n' ' ')"; fi

# Restart: an established connection through the VIP survives the proxy's restart.
mkfifo /tmp/echo-in
nsx client socat -T120 - TCP:10.96.100.11:7000 < /tmp/echo-in > /tmp/echo-out 2>&1 &
exec 3> /tmp/echo-in
echo before >&3
got_before() { grep -q before /tmp/echo-out; }
until_ok 10 got_before
old=$(cat /tmp/proxy.pid)
echo "--- connections before the restart"; nsx node ipvsadm -Lnc
stop_proxy || echo "the old proxy still answers"
start_proxy ipvs
new=$(cat /tmp/proxy.pid)
echo "--- connections after the restart"; nsx node ipvsadm -Lnc
echo after >&3
got_after() { grep -q after /tmp/echo-out; }
if until_ok 10 got_after && [ "$old" != "$new" ] && ! kill -0 "$old" 2>/dev/null && kill -0 "$new"; then pass "proxy restart: established connections survive" "$(tr '\n' ' ' < /tmp/echo-out)"
else fail "proxy restart: established connections survive" "$(cat /tmp/echo-out)"; fi
exec 3>&-

# Switching modes: iptables mode keeps nothing of ipvs mode, and back.
stop_proxy
start_proxy iptables
served() { fetch client 10.96.100.1:80 | grep -q '^s[23]$'; }
left=""
nsx node ipvsadm -Ln | grep -q "10.96.100" && left="$left virtual-servers"
nsx node /bin/ip link show weft-ipvs0 > /dev/null 2>&1 && left="$left weft-ipvs0"
nsx node ipset list -n | grep -q "^WEFT-" && left="$left ipsets"
nsx node iptables-save | grep -q "WEFT-IPVS" && left="$left chains"
if [ -z "$left" ] && until_ok 10 served; then pass "ipvs -> iptables leaves nothing of ipvs mode" ""
else fail "ipvs -> iptables leaves nothing of ipvs mode" "left:$left; $(fetch client 10.96.100.1:80)"; fi

stop_proxy
start_proxy ipvs --ipvs-scheduler mh
until_ok 10 has_vs "10.96.100.1:80 mh"
left=""
nsx node iptables-save | grep -Eq "WEFT-SERVICES|WEFT-SVC-|WEFT-SEP-|WEFT-NODEPORTS" && left="$left chains"
if [ -z "$left" ] && until_ok 10 served; then pass "iptables -> ipvs leaves nothing of iptables mode" ""
else fail "iptables -> ipvs leaves nothing of iptables mode" "left:$left; $(nsx node iptables-save | grep WEFT)"; fi
if has_vs "10.96.100.1:80 mh"; then pass "--ipvs-scheduler mh" ""; else fail "--ipvs-scheduler mh" "$(nsx node ipvsadm -Ln)"; fi

kill "$(cat /tmp/proxy-node2.pid)"
echo "--- ipvsadm -Ln"; nsx node ipvsadm -Ln
echo "--- proxy log (ipvs)"; grep -v DEBUG /tmp/proxy-ipvs.log | tail -n 40
stop_proxy
