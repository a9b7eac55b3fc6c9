#!/usr/bin/env bash
# Makes this Debian 12 host a weft node: packages, sysctls, kernel modules, the weft binary, CNI config, containerd
# (config from `weft containerd-config`), the images, the PKI, and systemd units for weft agent/proxy/kubelet;
# with --etcd-server also etcd (and the cluster's network config), with --control-plane also weft dns and weft
# controller. Plain shell, no Vagrant in it: on a real host run it as root with the host's own address.
# Idempotent: re-running rewrites the config and restarts what changed.
#
# Usage: node.sh --name NAME --address IPv4 --etcd URL [--proxy-mode MODE] [--share DIR]
#                [--network CIDR] [--backend TYPE] [--etcd-server] [--control-plane]
#   --share: a directory holding bin/weft (and bin/weft-<daemon>, optional), images/*.tar, pki/{ca.crt,kubelet-NAME.crt,kubelet-NAME.key}
#            (vagrant/provision/host-prepare.sh makes it)
set -euo pipefail

name="" address="" etcd="" proxy_mode="iptables" share="/opt/weft/share"
network="10.244.0.0/16" backend="vxlan" etcd_server=0 control_plane=0
cluster_dns="10.96.0.10"
while [ $# -gt 0 ]; do
  case "$1" in
  --name) name="$2"; shift 2 ;;
  --address) address="$2"; shift 2 ;;
  --etcd) etcd="$2"; shift 2 ;;
  --proxy-mode) proxy_mode="$2"; shift 2 ;;
  --share) share="$2"; shift 2 ;;
  --network) network="$2"; shift 2 ;;
  --backend) backend="$2"; shift 2 ;;
  --etcd-server) etcd_server=1; shift ;;
  --control-plane) control_plane=1; shift ;;
  *) echo "node.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
die() { echo "node.sh: $*" >&2; exit 1; }
[[ "$name" =~ ^[a-z0-9][a-z0-9-]{0,62}$ ]] || die "--name NAME (a DNS label) is required"
[[ "$address" =~ ^[0-9]{1,3}(\.[0-9]{1,3}){3}$ ]] || die "--address IPv4 is required"
[[ "$etcd" =~ ^https?://[A-Za-z0-9.:,/-]+$ ]] || die "--etcd URL is required"
[[ "$proxy_mode" =~ ^[a-z]+$ ]] || die "--proxy-mode: $proxy_mode?"
[[ "$network" =~ ^[0-9.]+/[0-9]+$ ]] || die "--network: $network?"
[[ "$backend" =~ ^[a-z-]+$ ]] || die "--backend: $backend?"
[ "$(id -u)" = 0 ] || die "run as root"
[ -x "$share/bin/weft" ] || die "$share/bin/weft is missing (vagrant/provision/host-prepare.sh stages it)"

# Wait up to $1 seconds for command $2... to succeed.
wait_for() {
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || return 1
    sleep 1
  done
}

# The interface holding $address. Vagrant's first NIC is NAT with the same address on every VM: the agent
# must use this one (--iface), and the kubelet this address (--node-ip).
iface="$(ip -o -4 addr show | awk -v a="$address" '{split($4, p, "/"); if (p[1] == a) {print $2; exit}}')"
[ -n "$iface" ] || die "no interface has $address (is the private network up?)"
echo "node.sh: $name $address on $iface, etcd $etcd, proxy $proxy_mode"

echo "node.sh: packages"
export DEBIAN_FRONTEND=noninteractive
pkgs=(containerd runc containernetworking-plugins iptables ipset ipvsadm conntrack kmod curl dnsutils rsync openssl)
[ "$etcd_server" = 1 ] && pkgs+=(etcd-server etcd-client)
missing=()
for p in "${pkgs[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
# weft runs its own containerd (below); Debian's would be a second one nobody uses.
systemctl disable --now containerd.service 2>/dev/null || true

echo "node.sh: kernel modules and sysctls"
cat >/etc/modules-load.d/weft.conf <<MODS
br_netfilter
overlay
vxlan
nf_conntrack
ip_vs
ip_vs_rr
ip_vs_wrr
ip_vs_sh
ip_vs_mh
MODS
while read -r m; do modprobe "$m" || echo "node.sh: warning: modprobe $m failed" >&2; done </etc/modules-load.d/weft.conf
cat >/etc/sysctl.d/90-weft.conf <<SYS
net.ipv4.ip_forward = 1
net.bridge.bridge-nf-call-iptables = 1
net.bridge.bridge-nf-call-ip6tables = 1
net.ipv4.conf.all.rp_filter = 0
net.ipv4.conf.default.rp_filter = 0
SYS
sysctl -q --system >/dev/null

echo "node.sh: weft binary, CNI"
install -m 0755 "$share/bin/weft" /usr/local/bin/weft
# The daemons' own binaries (smaller: each maps only its own code); `weft agent` runs weft-agent when it is beside it.
for d in agent proxy dns controller kubelet; do
  if [ -x "$share/bin/weft-$d" ]; then install -m 0755 "$share/bin/weft-$d" "/usr/local/bin/weft-$d"; else rm -f "/usr/local/bin/weft-$d"; fi
done
mkdir -p /opt/cni/bin /etc/cni/net.d /etc/weft /var/lib/weft /run/flannel
ln -sf /usr/local/bin/weft /opt/cni/bin/weft-cni # weft acts as the CNI plugin when called weft-cni
for p in bridge host-local loopback portmap; do
  [ -e "/usr/lib/cni/$p" ] && ln -sf "/usr/lib/cni/$p" "/opt/cni/bin/$p"
done
cat >/etc/cni/net.d/10-weft.conf <<CNI
{
  "cniVersion": "1.0.0",
  "name": "weft",
  "type": "weft-cni",
  "subnetFile": "/run/flannel/subnet.env",
  "dataDir": "/var/lib/cni/weft",
  "delegate": { "hairpinMode": true, "isDefaultGateway": true }
}
CNI

echo "node.sh: PKI"
install -d -m 0755 /etc/weft/pki
install -m 0644 "$share/pki/ca.crt" /etc/weft/pki/ca.crt
install -m 0644 "$share/pki/kubelet-$name.crt" /etc/weft/pki/kubelet.crt
install -m 0600 "$share/pki/kubelet-$name.key" /etc/weft/pki/kubelet.key

echo "node.sh: containerd"
weft containerd-config --dir /var/lib/weft/containerd --cni-conf-dir /etc/cni/net.d --cni-bin-dir /opt/cni/bin \
  -o /etc/weft/containerd.toml
socket=/var/lib/weft/containerd/containerd.sock

unit() { # NAME, then the [Service] body on stdin
  local body
  body="$(cat)"
  printf '[Unit]\nDescription=%s\n%s\n\n[Install]\nWantedBy=multi-user.target\n' "$1" "$body" \
    >"/etc/systemd/system/$1.service"
}
unit weft-containerd <<U
After=network-online.target
Wants=network-online.target

[Service]
ExecStart=/usr/bin/containerd --config /etc/weft/containerd.toml
Restart=always
Delegate=yes
KillMode=process
LimitNOFILE=1048576
U

if [ "$etcd_server" = 1 ]; then
  echo "node.sh: etcd"
  cat >/etc/default/etcd <<ETCD
ETCD_NAME=$name
ETCD_DATA_DIR=/var/lib/etcd/default
ETCD_LISTEN_CLIENT_URLS=http://$address:2379,http://127.0.0.1:2379
ETCD_ADVERTISE_CLIENT_URLS=http://$address:2379
ETCD_LISTEN_PEER_URLS=http://127.0.0.1:2380
ETCD_INITIAL_ADVERTISE_PEER_URLS=http://127.0.0.1:2380
ETCD_INITIAL_CLUSTER=$name=http://127.0.0.1:2380
ETCD
  systemctl enable etcd.service
  systemctl restart etcd.service
  wait_for 60 etcdctl --endpoints=http://127.0.0.1:2379 endpoint health || die "etcd is not healthy"
  etcdctl --endpoints=http://127.0.0.1:2379 put /coreos.com/network/config \
    "{\"Network\":\"$network\",\"Backend\":{\"Type\":\"$backend\"}}" >/dev/null
fi

first_etcd="${etcd%%,*}"
wait_for 120 curl -sf "$first_etcd/health" || die "etcd at $first_etcd does not answer"

cat >/etc/default/weft <<ENV
# Read by weft's units; edit and restart them (see vagrant/README.md).
WEFT_ETCD_ENDPOINTS=$etcd
WEFT_NODE_NAME=$name
WEFT_NODE_IP=$address
WEFT_IFACE=$iface
WEFT_CLUSTER_CIDR=$network
WEFT_PROXY_MODE=$proxy_mode
ENV

unit weft-agent <<'U'
After=network-online.target
Wants=network-online.target

[Service]
EnvironmentFile=/etc/default/weft
ExecStart=/usr/local/bin/weft agent --etcd-endpoints ${WEFT_ETCD_ENDPOINTS} --iface ${WEFT_IFACE} --subnet-file /run/flannel/subnet.env --ip-masq --healthz-addr 127.0.0.1:8285
Restart=always
RestartSec=2
U
unit weft-proxy <<'U'
After=weft-agent.service

[Service]
EnvironmentFile=/etc/default/weft
ExecStart=/usr/local/bin/weft proxy --proxy-mode ${WEFT_PROXY_MODE} --etcd-endpoints ${WEFT_ETCD_ENDPOINTS} --hostname-override ${WEFT_NODE_NAME} --cluster-cidr ${WEFT_CLUSTER_CIDR}
Restart=always
RestartSec=2
U
unit weft-kubelet <<U
After=weft-containerd.service weft-agent.service
Wants=weft-containerd.service weft-agent.service

[Service]
EnvironmentFile=/etc/default/weft
ExecStart=/usr/local/bin/weft kubelet --etcd-endpoints \${WEFT_ETCD_ENDPOINTS} --hostname-override \${WEFT_NODE_NAME} --node-ip \${WEFT_NODE_IP} --container-runtime-endpoint unix://$socket --cgroup-parent /weft --root-dir /var/lib/weft/kubelet --subnet-file /run/flannel/subnet.env --resolv-conf /etc/resolv.conf --cluster-dns $cluster_dns --tls-cert-file /etc/weft/pki/kubelet.crt --tls-private-key-file /etc/weft/pki/kubelet.key --client-ca-file /etc/weft/pki/ca.crt
Restart=always
RestartSec=2
KillMode=process
U
services=(weft-containerd weft-agent weft-proxy weft-kubelet)

if [ "$control_plane" = 1 ]; then
  # Names outside the cluster go to this host's own resolver (not a loopback stub: weft dns takes port 53).
  upstream="$(awk '$1 == "nameserver" && $2 !~ /^127\./ {print $2; exit}' /etc/resolv.conf)"
  upstream="${upstream:-1.1.1.1}"
  unit weft-dns <<U
After=network-online.target

[Service]
EnvironmentFile=/etc/default/weft
ExecStart=/usr/local/bin/weft dns --etcd-endpoints \${WEFT_ETCD_ENDPOINTS} --listen 0.0.0.0:53 --upstream $upstream --cluster-cidr \${WEFT_CLUSTER_CIDR}
Restart=always
RestartSec=2
U
  unit weft-controller <<'U'
After=network-online.target

[Service]
EnvironmentFile=/etc/default/weft
ExecStart=/usr/local/bin/weft controller --etcd-endpoints ${WEFT_ETCD_ENDPOINTS}
Restart=always
RestartSec=2
U
  services+=(weft-dns weft-controller)
fi

systemctl daemon-reload
systemctl enable "${services[@]/%/.service}" >/dev/null 2>&1
systemctl restart weft-containerd.service
wait_for 60 test -S "$socket" || die "containerd's socket $socket did not appear"
echo "node.sh: images"
for t in "$share"/images/*.tar; do
  weft image import --address "$socket" "$t"
done
systemctl restart weft-agent.service
wait_for 60 test -s /run/flannel/subnet.env || die "weft agent wrote no subnet file (journalctl -u weft-agent)"
for s in "${services[@]}"; do
  [ "$s" = weft-containerd ] || [ "$s" = weft-agent ] || systemctl restart "$s.service"
done

if [ "$control_plane" = 1 ]; then
  echo "node.sh: kube-dns Service -> $address"
  weft apply --etcd-endpoints "$etcd" -f - <<DNS
apiVersion: v1
kind: Namespace
metadata: {name: kube-system}
---
apiVersion: v1
kind: Service
metadata: {name: kube-dns, namespace: kube-system}
spec:
  clusterIP: $cluster_dns
  ports: [{name: dns, port: 53, protocol: UDP}, {name: dns-tcp, port: 53, protocol: TCP}]
---
apiVersion: v1
kind: Endpoints
metadata: {name: kube-dns, namespace: kube-system}
subsets: [{addresses: [{ip: "$address"}], ports: [{name: dns, port: 53, protocol: UDP}, {name: dns-tcp, port: 53, protocol: TCP}]}]
DNS
fi
echo "node.sh: $name done ($(cat /run/flannel/subnet.env | tr '\n' ' '))"
