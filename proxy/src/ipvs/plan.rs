//! The pure half of ipvs mode: a `ServiceTable` and this node's addresses → the desired virtual servers,
//! real servers, dummy-interface addresses and ipset members (`desired`); observed kernel state + desired
//! → the ops that make the kernel match, with graceful termination of TCP real servers (`diff`). No I/O.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use crate::model::{Endpoint, Protocol, ServiceEntry, ServicePortName, ServiceTable};

use super::netlink::{RealServer, VirtualServer, VsKey, SVC_F_PERSISTENT};

/// `IP_VS_SVC_F_HASHED`: the kernel sets it on every service it reports; not ours to compare.
const SVC_F_HASHED: u32 = 0x2;

/// IPVS schedulers `--ipvs-scheduler` accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Scheduler {
    /// round robin
    #[default]
    Rr,
    /// least connection
    Lc,
    /// weighted round robin
    Wrr,
    /// source hashing
    Sh,
    /// Maglev hashing
    Mh,
}

impl Scheduler {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheduler::Rr => "rr",
            Scheduler::Lc => "lc",
            Scheduler::Wrr => "wrr",
            Scheduler::Sh => "sh",
            Scheduler::Mh => "mh",
        }
    }
}

/// The ipsets ipvs mode owns, as kube-proxy names them with our prefix. The names are constants: nothing
/// read from etcd ever becomes part of a set name, and members are built from addresses, ports and
/// protocol enums only.
pub const SET_CLUSTER_IP: &str = "WEFT-CLUSTER-IP";
pub const SET_EXTERNAL_IP: &str = "WEFT-EXTERNAL-IP";
pub const SET_LOAD_BALANCER: &str = "WEFT-LOAD-BALANCER";
pub const SET_LOOP_BACK: &str = "WEFT-LOOP-BACK";
pub const SET_NODE_PORT_TCP: &str = "WEFT-NODE-PORT-TCP";
pub const SET_NODE_PORT_UDP: &str = "WEFT-NODE-PORT-UDP";
pub const SET_NODE_PORT_SCTP: &str = "WEFT-NODE-PORT-SCTP";
/// Every address bound to the dummy interface (to refuse what no virtual server claims).
pub const SET_IPVS_IPS: &str = "WEFT-IPVS-IPS";

/// (name, ipset type) of every set, in the order they are created.
pub const SETS: [(&str, &str); 8] = [
    (SET_CLUSTER_IP, "hash:ip,port"),
    (SET_EXTERNAL_IP, "hash:ip,port"),
    (SET_LOAD_BALANCER, "hash:ip,port"),
    (SET_LOOP_BACK, "hash:ip,port,ip"),
    (SET_NODE_PORT_TCP, "bitmap:port"),
    (SET_NODE_PORT_UDP, "bitmap:port"),
    (SET_NODE_PORT_SCTP, "bitmap:port"),
    (SET_IPVS_IPS, "hash:ip"),
];

/// Node-wide settings of the plan.
#[derive(Debug, Clone)]
pub struct PlanConfig {
    pub scheduler: Scheduler,
    /// How long a removed TCP real server may drain (at weight 0) before it is deleted anyway.
    pub graceful_period: Duration,
}

impl Default for PlanConfig {
    fn default() -> Self {
        PlanConfig { scheduler: Scheduler::Rr, graceful_period: Duration::from_secs(15 * 60) }
    }
}

/// One desired virtual server, the service port it serves and its real servers (address, port).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredVs {
    pub vs: VirtualServer,
    pub owner: ServicePortName,
    pub reals: BTreeSet<(Ipv4Addr, u16)>,
}

/// Everything ipvs mode wants in the kernel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    pub services: BTreeMap<VsKey, DesiredVs>,
    /// /32 addresses on `weft-ipvs0`.
    pub addresses: BTreeSet<Ipv4Addr>,
    /// Members of each of `SETS` (every set present, possibly empty).
    pub ipsets: BTreeMap<&'static str, BTreeSet<String>>,
}

/// The addresses that accept NodePorts: local addresses inside `cidrs` (all when empty), never loopback
/// and never the service addresses on our dummy interface.
pub fn nodeport_addresses(
    local: &[Ipv4Addr],
    cidrs: &[ipnetwork::Ipv4Network],
    dummy: &BTreeSet<Ipv4Addr>,
) -> Vec<Ipv4Addr> {
    let mut out: Vec<Ipv4Addr> = local
        .iter()
        .copied()
        .filter(|ip| !ip.is_loopback() && !ip.is_unspecified() && !dummy.contains(ip))
        .filter(|ip| cidrs.is_empty() || cidrs.iter().any(|c| c.contains(*ip)))
        .collect();
    out.sort();
    out.dedup();
    out
}

fn member(ip: Ipv4Addr, proto: Protocol, port: u16) -> String {
    format!("{ip},{}:{port}", proto.lower())
}

fn reals<'a>(eps: impl Iterator<Item = &'a Endpoint>, local_only: bool) -> BTreeSet<(Ipv4Addr, u16)> {
    eps.filter(|e| e.ready && (!local_only || e.is_local)).map(|e| (e.ip, e.port)).collect()
}

fn virtual_server(key: VsKey, entry: &ServiceEntry, cfg: &PlanConfig) -> VirtualServer {
    let (flags, timeout) = match entry.port.session_affinity {
        Some(t) => (SVC_F_PERSISTENT, u32::try_from(t.as_secs()).unwrap_or(u32::MAX).max(1)),
        None => (0, 0),
    };
    VirtualServer { key, scheduler: cfg.scheduler.as_str().into(), flags, timeout, netmask: Ipv4Addr::BROADCAST }
}

/// One service port's share of the desired state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortPlan {
    pub services: Vec<DesiredVs>,
    pub addresses: Vec<Ipv4Addr>,
    pub members: Vec<(&'static str, String)>,
}

/// What one service port wants on a node whose NodePorts listen on `node_addrs`.
pub fn port_plan(spn: &ServicePortName, entry: &ServiceEntry, node_addrs: &[Ipv4Addr], cfg: &PlanConfig) -> PortPlan {
    let mut p = PortPlan::default();
    let sp = &entry.port;
    let proto = spn.protocol;
    let internal = reals(entry.endpoints.iter(), sp.internal_policy_local);
    let external = reals(entry.endpoints.iter(), sp.external_policy_local);
    let put = |p: &mut PortPlan, addr: Ipv4Addr, port: u16, reals: &BTreeSet<(Ipv4Addr, u16)>| {
        let key = VsKey { protocol: proto, addr, port };
        if !p.services.iter().any(|d| d.vs.key == key) {
            p.services.push(DesiredVs {
                vs: virtual_server(key, entry, cfg),
                owner: spn.clone(),
                reals: reals.clone(),
            });
        }
    };
    let vip = |p: &mut PortPlan, ip: Ipv4Addr, reals: &BTreeSet<(Ipv4Addr, u16)>, set: &'static str| {
        put(p, ip, sp.port, reals);
        if !p.addresses.contains(&ip) {
            p.addresses.push(ip);
            p.members.push((SET_IPVS_IPS, ip.to_string()));
        }
        p.members.push((set, member(ip, proto, sp.port)));
    };
    if let Some(ip) = sp.cluster_ip {
        vip(&mut p, ip, &internal, SET_CLUSTER_IP);
    }
    for ip in &sp.external_ips {
        vip(&mut p, *ip, &external, SET_EXTERNAL_IP);
    }
    for ip in &sp.load_balancer_ips {
        vip(&mut p, *ip, &external, SET_LOAD_BALANCER);
    }
    if let Some(np) = sp.node_port {
        for ip in node_addrs {
            put(&mut p, *ip, np, &external);
        }
        let set = match proto {
            Protocol::Tcp => SET_NODE_PORT_TCP,
            Protocol::Udp => SET_NODE_PORT_UDP,
            Protocol::Sctp => SET_NODE_PORT_SCTP,
        };
        p.members.push((set, np.to_string()));
    }
    // Hairpin: a pod on this node reaching itself through the service must be masqueraded.
    for ep in entry.endpoints.iter().filter(|e| e.is_local || e.node_name.is_none()) {
        p.members.push((SET_LOOP_BACK, format!("{},{}:{},{}", ep.ip, proto.lower(), ep.port, ep.ip)));
    }
    p
}

/// What a change of some service ports may have changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Touched {
    pub keys: BTreeSet<VsKey>,
    pub addresses: BTreeSet<Ipv4Addr>,
    pub members: BTreeSet<(&'static str, String)>,
}

/// The desired state kept per service port, with reference counts where ports share something (an
/// address, an ipset member, a virtual server two ports claim): a partial sync replaces the plans of the
/// changed ports and learns what it touched, without rebuilding the rest.
#[derive(Debug, Clone, Default)]
pub struct Index {
    ports: BTreeMap<ServicePortName, PortPlan>,
    /// Claimants of each virtual server; the first (in table order) defines it.
    claims: BTreeMap<VsKey, BTreeSet<ServicePortName>>,
    addresses: BTreeMap<Ipv4Addr, usize>,
    members: BTreeMap<(&'static str, String), usize>,
}

impl Index {
    pub fn build(table: &ServiceTable, node_addrs: &[Ipv4Addr], cfg: &PlanConfig) -> Index {
        let mut idx = Index::default();
        let mut touched = Touched::default();
        for (spn, entry) in table {
            idx.set(spn, Some(port_plan(spn, entry, node_addrs, cfg)), &mut touched);
        }
        idx
    }

    /// Replaces the plan of `spn` (None: the port is gone), adding what changed to `touched`.
    pub fn set(&mut self, spn: &ServicePortName, plan: Option<PortPlan>, touched: &mut Touched) {
        if let Some(old) = self.ports.remove(spn) {
            for d in &old.services {
                touched.keys.insert(d.vs.key);
                if let Some(c) = self.claims.get_mut(&d.vs.key) {
                    c.remove(spn);
                    if c.is_empty() {
                        self.claims.remove(&d.vs.key);
                    }
                }
            }
            for a in &old.addresses {
                touched.addresses.insert(*a);
                decrement(&mut self.addresses, a);
            }
            for m in &old.members {
                touched.members.insert(m.clone());
                decrement(&mut self.members, m);
            }
        }
        let Some(plan) = plan else { return };
        for d in &plan.services {
            touched.keys.insert(d.vs.key);
            self.claims.entry(d.vs.key).or_default().insert(spn.clone());
        }
        for a in &plan.addresses {
            touched.addresses.insert(*a);
            *self.addresses.entry(*a).or_default() += 1;
        }
        for m in &plan.members {
            touched.members.insert(m.clone());
            *self.members.entry(m.clone()).or_default() += 1;
        }
        self.ports.insert(spn.clone(), plan);
    }

    /// The virtual server `key` as its first claimant wants it.
    pub fn vs(&self, key: &VsKey) -> Option<&DesiredVs> {
        let owner = self.claims.get(key)?.iter().next()?;
        self.ports.get(owner)?.services.iter().find(|d| d.vs.key == *key)
    }

    pub fn has_address(&self, ip: &Ipv4Addr) -> bool {
        self.addresses.contains_key(ip)
    }

    pub fn has_member(&self, m: &(&'static str, String)) -> bool {
        self.members.contains_key(m)
    }

    /// The virtual servers a port's plan names (for `weft services`).
    pub fn port(&self, spn: &ServicePortName) -> Option<&PortPlan> {
        self.ports.get(spn)
    }

    /// Everything at once (for a full sync).
    pub fn desired(&self) -> Desired {
        let mut d = Desired { ipsets: SETS.iter().map(|(n, _)| (*n, BTreeSet::new())).collect(), ..Desired::default() };
        for key in self.claims.keys() {
            if let Some(v) = self.vs(key) {
                d.services.insert(*key, v.clone());
            }
        }
        d.addresses = self.addresses.keys().copied().collect();
        for (set, m) in self.members.keys() {
            d.ipsets.entry(set).or_default().insert(m.clone());
        }
        d
    }
}

fn decrement<K: Ord + Clone>(map: &mut BTreeMap<K, usize>, k: &K) {
    if let Some(n) = map.get_mut(k) {
        *n -= 1;
        if *n == 0 {
            map.remove(k);
        }
    }
}

/// The desired state for `table` on a node whose NodePorts listen on `node_addrs`.
pub fn desired(table: &ServiceTable, node_addrs: &[Ipv4Addr], cfg: &PlanConfig) -> Desired {
    Index::build(table, node_addrs, cfg).desired()
}

/// What the kernel holds, as far as ipvs mode cares.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    pub services: BTreeMap<VsKey, (VirtualServer, Vec<RealServer>)>,
    /// Addresses on `weft-ipvs0`.
    pub addresses: BTreeSet<Ipv4Addr>,
    /// This node's other addresses (NodePort virtual servers on them are ours too).
    pub node_addresses: BTreeSet<Ipv4Addr>,
}

/// One change to the kernel. `owner` names the service port for error messages and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    AddAddress(Ipv4Addr),
    AddService {
        vs: VirtualServer,
        owner: String,
    },
    UpdateService {
        vs: VirtualServer,
        owner: String,
    },
    AddDest {
        key: VsKey,
        rs: RealServer,
        owner: String,
    },
    /// A weight change: 1 for a serving real server, 0 for a draining one.
    UpdateDest {
        key: VsKey,
        rs: RealServer,
        owner: String,
    },
    DelDest {
        key: VsKey,
        rs: RealServer,
        owner: String,
    },
    DelService {
        key: VsKey,
        owner: String,
    },
    DelAddress(Ipv4Addr),
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::AddAddress(ip) => write!(f, "add address {ip}/32"),
            Op::AddService { vs, owner } => write!(f, "add {} ({owner}) {}", vs.key, vs.scheduler),
            Op::UpdateService { vs, owner } => write!(f, "update {} ({owner}) {}", vs.key, vs.scheduler),
            Op::AddDest { key, rs, owner } => {
                write!(f, "add {key} ({owner}) -> {}:{} w{}", rs.addr, rs.port, rs.weight)
            }
            Op::UpdateDest { key, rs, owner } => {
                write!(f, "weight {key} ({owner}) -> {}:{} w{}", rs.addr, rs.port, rs.weight)
            }
            Op::DelDest { key, rs, owner } => write!(f, "delete {key} ({owner}) -> {}:{}", rs.addr, rs.port),
            Op::DelService { key, owner } => write!(f, "delete {key} ({owner})"),
            Op::DelAddress(ip) => write!(f, "delete address {ip}/32"),
        }
    }
}

/// Real servers draining at weight 0, each with the instant it is deleted regardless of connections.
pub type Terminating = BTreeMap<(VsKey, Ipv4Addr, u16), Instant>;

/// What to do with a real server that is no longer desired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drain {
    /// Delete it now.
    Delete,
    /// Keep it at weight 0 until this deadline (or until its connections are gone).
    Keep(Instant),
}

/// kube-proxy's graceful termination, as a decision: UDP has no connection to finish (and with
/// `expire_nodest_conn=1` its flows are dropped with the server), so it goes at once; a TCP server with
/// connections is kept at weight 0 until they end or the deadline passes.
pub fn drain(protocol: Protocol, rs: &RealServer, deadline: Option<Instant>, now: Instant, grace: Duration) -> Drain {
    if protocol == Protocol::Udp || rs.active_conns + rs.inactive_conns == 0 {
        return Drain::Delete;
    }
    match deadline {
        Some(d) if now >= d => Drain::Delete,
        Some(d) => Drain::Keep(d),
        None => Drain::Keep(now + grace),
    }
}

fn vs_differs(want: &VirtualServer, have: &VirtualServer) -> bool {
    want.scheduler != have.scheduler
        || want.flags != (have.flags & !SVC_F_HASHED)
        || (want.flags & SVC_F_PERSISTENT != 0 && (want.timeout != have.timeout || want.netmask != have.netmask))
}

/// Whether an observed virtual server is ours to sweep: on an address of our dummy interface, one we
/// want there, or a node address (our NodePorts).
fn is_ours(key: &VsKey, desired: &Desired, observed: &Observed) -> bool {
    observed.addresses.contains(&key.addr)
        || desired.addresses.contains(&key.addr)
        || observed.node_addresses.contains(&key.addr)
}

/// The ops for one virtual server: `want` (None: not wanted) against `have`; deletions go to `dels`.
#[allow(clippy::too_many_arguments)]
fn diff_vs(
    key: &VsKey,
    want: Option<&DesiredVs>,
    have: Option<&(VirtualServer, Vec<RealServer>)>,
    ours: bool,
    terminating: &Terminating,
    now: Instant,
    cfg: &PlanConfig,
    ops: &mut Vec<Op>,
    dels: &mut Vec<Op>,
    still: &mut Terminating,
) {
    let Some(want) = want else {
        if have.is_some() && ours {
            dels.push(Op::DelService { key: *key, owner: "no service".into() });
        }
        return;
    };
    let owner = want.owner.to_string();
    match have {
        None => ops.push(Op::AddService { vs: want.vs.clone(), owner: owner.clone() }),
        Some((vs, _)) if vs_differs(&want.vs, vs) => {
            ops.push(Op::UpdateService { vs: want.vs.clone(), owner: owner.clone() })
        }
        Some(_) => {}
    }
    let have_reals: &[RealServer] = have.map(|(_, r)| r.as_slice()).unwrap_or(&[]);
    for (ip, port) in &want.reals {
        match have_reals.iter().find(|r| r.addr == *ip && r.port == *port) {
            None => ops.push(Op::AddDest { key: *key, rs: RealServer::masq(*ip, *port, 1), owner: owner.clone() }),
            Some(r) if r.weight != 1 => {
                ops.push(Op::UpdateDest { key: *key, rs: RealServer::masq(*ip, *port, 1), owner: owner.clone() })
            }
            Some(_) => {}
        }
    }
    for r in have_reals.iter().filter(|r| !want.reals.contains(&(r.addr, r.port))) {
        let tkey = (*key, r.addr, r.port);
        match drain(key.protocol, r, terminating.get(&tkey).copied(), now, cfg.graceful_period) {
            Drain::Delete => dels.push(Op::DelDest { key: *key, rs: r.clone(), owner: owner.clone() }),
            Drain::Keep(deadline) => {
                if r.weight != 0 {
                    let rs = RealServer::masq(r.addr, r.port, 0);
                    ops.push(Op::UpdateDest { key: *key, rs, owner: owner.clone() });
                }
                still.insert(tkey, deadline);
            }
        }
    }
}

/// The ops that take the kernel from `observed` to `desired`, in a safe order (addresses, services and
/// real servers first; deletions last), and the real servers left draining.
pub fn diff(
    desired: &Desired,
    observed: &Observed,
    terminating: &Terminating,
    now: Instant,
    cfg: &PlanConfig,
) -> (Vec<Op>, Terminating) {
    let (mut ops, mut dels, mut still) = (Vec::new(), Vec::new(), Terminating::new());
    for ip in desired.addresses.difference(&observed.addresses) {
        ops.push(Op::AddAddress(*ip));
    }
    let keys: BTreeSet<&VsKey> = desired.services.keys().chain(observed.services.keys()).collect();
    for key in keys {
        let ours = is_ours(key, desired, observed);
        let want = desired.services.get(key);
        let have = observed.services.get(key);
        diff_vs(key, want, have, ours, terminating, now, cfg, &mut ops, &mut dels, &mut still);
    }
    ops.extend(dels);
    for ip in observed.addresses.difference(&desired.addresses) {
        ops.push(Op::DelAddress(*ip));
    }
    (ops, still)
}

/// Like `diff`, for a partial sync: only the virtual servers and addresses `touched` names, plus the real
/// servers still draining (their connection counts move on their own). Draining entries of other
/// virtual servers are carried over.
pub fn diff_touched(
    index: &Index,
    touched: &Touched,
    observed: &Observed,
    terminating: &Terminating,
    now: Instant,
    cfg: &PlanConfig,
) -> (Vec<Op>, Terminating) {
    let (mut ops, mut dels) = (Vec::new(), Vec::new());
    for ip in &touched.addresses {
        if index.has_address(ip) && !observed.addresses.contains(ip) {
            ops.push(Op::AddAddress(*ip));
        }
    }
    let mut keys: BTreeSet<VsKey> = touched.keys.clone();
    keys.extend(terminating.keys().map(|(k, _, _)| *k));
    let mut still: Terminating =
        terminating.iter().filter(|((k, _, _), _)| !keys.contains(k)).map(|(k, v)| (*k, *v)).collect();
    for key in &keys {
        // Every key a changed port named was ours (we planned it).
        diff_vs(
            key,
            index.vs(key),
            observed.services.get(key),
            true,
            terminating,
            now,
            cfg,
            &mut ops,
            &mut dels,
            &mut still,
        );
    }
    ops.extend(dels);
    for ip in &touched.addresses {
        if !index.has_address(ip) && observed.addresses.contains(ip) {
            ops.push(Op::DelAddress(*ip));
        }
    }
    (ops, still)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ServiceEntry, ServicePort};

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }
    fn key(p: Protocol, a: &str, port: u16) -> VsKey {
        VsKey { protocol: p, addr: ip(a), port }
    }
    fn ep(a: &str, port: u16, local: bool) -> Endpoint {
        Endpoint {
            ip: ip(a),
            port,
            node_name: Some(if local { "node-1" } else { "node-2" }.into()),
            is_local: local,
            ready: true,
        }
    }
    fn table() -> ServiceTable {
        let web = ServicePortName::new("default", "web", "http", Protocol::Tcp);
        let dns = ServicePortName::new("kube-system", "dns", "dns", Protocol::Udp);
        let np = ServicePortName::new("default", "np", "", Protocol::Tcp);
        [
            (
                web,
                ServiceEntry {
                    port: ServicePort {
                        external_ips: vec![ip("203.0.113.10")],
                        session_affinity: Some(Duration::from_secs(60)),
                        ..ServicePort::cluster_ip(ip("10.96.0.10"), 80)
                    },
                    endpoints: vec![ep("10.244.1.5", 8080, true), ep("10.244.2.7", 8080, false)],
                },
            ),
            (
                dns,
                ServiceEntry {
                    port: ServicePort::cluster_ip(ip("10.96.0.53"), 53),
                    endpoints: vec![ep("10.244.2.8", 5353, false)],
                },
            ),
            (
                np,
                ServiceEntry {
                    port: ServicePort {
                        node_port: Some(30080),
                        external_policy_local: true,
                        ..ServicePort::cluster_ip(ip("10.96.0.20"), 80)
                    },
                    endpoints: vec![ep("10.244.1.6", 80, true), ep("10.244.2.9", 80, false)],
                },
            ),
        ]
        .into()
    }

    fn reals(d: &Desired, k: VsKey) -> Vec<String> {
        d.services[&k].reals.iter().map(|(a, p)| format!("{a}:{p}")).collect()
    }

    #[test]
    fn desired_virtual_servers_addresses_and_sets() {
        let cfg = PlanConfig { scheduler: Scheduler::Mh, ..PlanConfig::default() };
        let d = desired(&table(), &[ip("192.168.56.11")], &cfg);
        let keys: Vec<String> = d.services.keys().map(ToString::to_string).collect();
        assert_eq!(
            keys,
            [
                "TCP 10.96.0.10:80",
                "TCP 10.96.0.20:80",
                "TCP 192.168.56.11:30080",
                "TCP 203.0.113.10:80",
                "UDP 10.96.0.53:53"
            ]
        );
        let web = &d.services[&key(Protocol::Tcp, "10.96.0.10", 80)];
        assert_eq!((web.vs.scheduler.as_str(), web.vs.flags, web.vs.timeout), ("mh", SVC_F_PERSISTENT, 60));
        assert_eq!(web.owner.to_string(), "default/web:http");
        assert_eq!(reals(&d, key(Protocol::Tcp, "10.96.0.10", 80)), ["10.244.1.5:8080", "10.244.2.7:8080"]);
        assert_eq!(reals(&d, key(Protocol::Tcp, "203.0.113.10", 80)), ["10.244.1.5:8080", "10.244.2.7:8080"]);
        // externalTrafficPolicy: Local keeps the NodePort on local endpoints; the ClusterIP keeps them all.
        assert_eq!(reals(&d, key(Protocol::Tcp, "192.168.56.11", 30080)), ["10.244.1.6:80"]);
        assert_eq!(reals(&d, key(Protocol::Tcp, "10.96.0.20", 80)), ["10.244.1.6:80", "10.244.2.9:80"]);
        let np = &d.services[&key(Protocol::Tcp, "10.96.0.20", 80)];
        assert_eq!((np.vs.flags, np.vs.timeout), (0, 0));

        let addrs: Vec<String> = d.addresses.iter().map(ToString::to_string).collect();
        assert_eq!(addrs, ["10.96.0.10", "10.96.0.20", "10.96.0.53", "203.0.113.10"], "no node address on the dummy");
        let set = |n: &str| d.ipsets[n].iter().cloned().collect::<Vec<_>>();
        assert_eq!(set(SET_CLUSTER_IP), ["10.96.0.10,tcp:80", "10.96.0.20,tcp:80", "10.96.0.53,udp:53"]);
        assert_eq!(set(SET_EXTERNAL_IP), ["203.0.113.10,tcp:80"]);
        assert_eq!(set(SET_NODE_PORT_TCP), ["30080"]);
        assert!(set(SET_NODE_PORT_UDP).is_empty() && set(SET_LOAD_BALANCER).is_empty());
        assert_eq!(set(SET_LOOP_BACK), ["10.244.1.5,tcp:8080,10.244.1.5", "10.244.1.6,tcp:80,10.244.1.6"]);
        assert_eq!(set(SET_IPVS_IPS), ["10.96.0.10", "10.96.0.20", "10.96.0.53", "203.0.113.10"]);
    }

    #[test]
    fn nodeport_addresses_filter() {
        let local = [ip("127.0.0.1"), ip("192.168.56.11"), ip("10.244.1.1"), ip("10.96.0.10")];
        let dummy: BTreeSet<Ipv4Addr> = [ip("10.96.0.10")].into();
        assert_eq!(nodeport_addresses(&local, &[], &dummy), [ip("10.244.1.1"), ip("192.168.56.11")]);
        let only = ["192.168.56.0/24".parse().unwrap()];
        assert_eq!(nodeport_addresses(&local, &only, &dummy), [ip("192.168.56.11")]);
    }

    fn observed_from(d: &Desired) -> Observed {
        Observed {
            services: d
                .services
                .iter()
                .map(|(k, v)| {
                    let mut vs = v.vs.clone();
                    vs.flags |= SVC_F_HASHED;
                    (*k, (vs, v.reals.iter().map(|(a, p)| RealServer::masq(*a, *p, 1)).collect()))
                })
                .collect(),
            addresses: d.addresses.clone(),
            node_addresses: [ip("192.168.56.11")].into(),
        }
    }

    struct Case {
        name: &'static str,
        /// Changes the observed state before the diff.
        observe: fn(&mut Observed, Instant),
        /// Draining real servers before the diff.
        terminating: fn(Instant) -> Terminating,
        want: Vec<&'static str>,
        still: usize,
    }

    #[test]
    fn diff_cases() {
        let cfg = PlanConfig::default();
        let d = desired(&table(), &[ip("192.168.56.11")], &cfg);
        let none = |_| Terminating::new();
        let cases = vec![
            Case { name: "in sync: nothing to do", observe: |_, _| {}, terminating: none, want: vec![], still: 0 },
            Case {
                name: "empty kernel: addresses, then services and real servers",
                observe: |o, _| {
                    o.services.clear();
                    o.addresses.clear();
                },
                terminating: none,
                want: vec![
                    "add address 10.96.0.10/32",
                    "add address 10.96.0.20/32",
                    "add address 10.96.0.53/32",
                    "add address 203.0.113.10/32",
                    "add TCP 10.96.0.10:80 (default/web:http) rr",
                    "add TCP 10.96.0.10:80 (default/web:http) -> 10.244.1.5:8080 w1",
                    "add TCP 10.96.0.10:80 (default/web:http) -> 10.244.2.7:8080 w1",
                    "add TCP 10.96.0.20:80 (default/np) rr",
                    "add TCP 10.96.0.20:80 (default/np) -> 10.244.1.6:80 w1",
                    "add TCP 10.96.0.20:80 (default/np) -> 10.244.2.9:80 w1",
                    "add TCP 192.168.56.11:30080 (default/np) rr",
                    "add TCP 192.168.56.11:30080 (default/np) -> 10.244.1.6:80 w1",
                    "add TCP 203.0.113.10:80 (default/web:http) rr",
                    "add TCP 203.0.113.10:80 (default/web:http) -> 10.244.1.5:8080 w1",
                    "add TCP 203.0.113.10:80 (default/web:http) -> 10.244.2.7:8080 w1",
                    "add UDP 10.96.0.53:53 (kube-system/dns:dns) rr",
                    "add UDP 10.96.0.53:53 (kube-system/dns:dns) -> 10.244.2.8:5353 w1",
                ],
                still: 0,
            },
            Case {
                name: "a removed TCP real server with connections drains at weight 0",
                observe: |o, _| {
                    let (_, rs) = o.services.get_mut(&key(Protocol::Tcp, "10.96.0.10", 80)).unwrap();
                    rs.push(RealServer { active_conns: 2, ..RealServer::masq(ip("10.244.3.3"), 8080, 1) });
                },
                terminating: none,
                want: vec!["weight TCP 10.96.0.10:80 (default/web:http) -> 10.244.3.3:8080 w0"],
                still: 1,
            },
            Case {
                name: "a draining server with connections left stays, without another weight change",
                observe: |o, _| {
                    let (_, rs) = o.services.get_mut(&key(Protocol::Tcp, "10.96.0.10", 80)).unwrap();
                    rs.push(RealServer { inactive_conns: 1, ..RealServer::masq(ip("10.244.3.3"), 8080, 0) });
                },
                terminating: |now| {
                    [((key(Protocol::Tcp, "10.96.0.10", 80), ip("10.244.3.3"), 8080), now + Duration::from_secs(5))]
                        .into()
                },
                want: vec![],
                still: 1,
            },
            Case {
                name: "a draining server past its deadline is deleted",
                observe: |o, _| {
                    let (_, rs) = o.services.get_mut(&key(Protocol::Tcp, "10.96.0.10", 80)).unwrap();
                    rs.push(RealServer { active_conns: 1, ..RealServer::masq(ip("10.244.3.3"), 8080, 0) });
                },
                terminating: |now| [((key(Protocol::Tcp, "10.96.0.10", 80), ip("10.244.3.3"), 8080), now)].into(),
                want: vec!["delete TCP 10.96.0.10:80 (default/web:http) -> 10.244.3.3:8080"],
                still: 0,
            },
            Case {
                name: "a drained server (no connections) is deleted",
                observe: |o, _| {
                    let (_, rs) = o.services.get_mut(&key(Protocol::Tcp, "10.96.0.10", 80)).unwrap();
                    rs.push(RealServer::masq(ip("10.244.3.3"), 8080, 0));
                },
                terminating: none,
                want: vec!["delete TCP 10.96.0.10:80 (default/web:http) -> 10.244.3.3:8080"],
                still: 0,
            },
            Case {
                name: "a removed UDP real server is deleted at once, connections or not",
                observe: |o, _| {
                    let (_, rs) = o.services.get_mut(&key(Protocol::Udp, "10.96.0.53", 53)).unwrap();
                    rs.push(RealServer { active_conns: 4, ..RealServer::masq(ip("10.244.3.4"), 5353, 1) });
                },
                terminating: none,
                want: vec!["delete UDP 10.96.0.53:53 (kube-system/dns:dns) -> 10.244.3.4:5353"],
                still: 0,
            },
            Case {
                name: "an endpoint back while draining returns to weight 1",
                observe: |o, _| {
                    let (_, rs) = o.services.get_mut(&key(Protocol::Tcp, "10.96.0.10", 80)).unwrap();
                    rs[0].weight = 0;
                },
                terminating: |now| [((key(Protocol::Tcp, "10.96.0.10", 80), ip("10.244.1.5"), 8080), now)].into(),
                want: vec!["weight TCP 10.96.0.10:80 (default/web:http) -> 10.244.1.5:8080 w1"],
                still: 0,
            },
            Case {
                name: "scheduler or affinity changed: the service is updated in place",
                observe: |o, _| {
                    o.services.get_mut(&key(Protocol::Tcp, "10.96.0.10", 80)).unwrap().0.timeout = 10800;
                    o.services.get_mut(&key(Protocol::Udp, "10.96.0.53", 53)).unwrap().0.scheduler = "lc".into();
                },
                terminating: none,
                want: vec![
                    "update TCP 10.96.0.10:80 (default/web:http) rr",
                    "update UDP 10.96.0.53:53 (kube-system/dns:dns) rr",
                ],
                still: 0,
            },
            Case {
                name: "mark and sweep: ours (dummy or node address) deleted, others left alone",
                observe: |o, _| {
                    let stale = |k: VsKey| {
                        (
                            k,
                            (
                                VirtualServer {
                                    key: k,
                                    scheduler: "rr".into(),
                                    flags: 2,
                                    timeout: 0,
                                    netmask: Ipv4Addr::BROADCAST,
                                },
                                vec![],
                            ),
                        )
                    };
                    o.services.extend([
                        stale(key(Protocol::Tcp, "10.96.9.9", 80)),
                        stale(key(Protocol::Tcp, "192.168.56.11", 30999)),
                        stale(key(Protocol::Tcp, "172.16.0.1", 80)),
                    ]);
                    o.addresses.insert(ip("10.96.9.9"));
                },
                terminating: none,
                want: vec![
                    "delete TCP 10.96.9.9:80 (no service)",
                    "delete TCP 192.168.56.11:30999 (no service)",
                    "delete address 10.96.9.9/32",
                ],
                still: 0,
            },
        ];
        let now = Instant::now();
        for c in cases {
            let mut o = observed_from(&d);
            (c.observe)(&mut o, now);
            let (ops, still) = diff(&d, &o, &(c.terminating)(now), now, &cfg);
            let got: Vec<String> = ops.iter().map(ToString::to_string).collect();
            assert_eq!(got, c.want, "{}", c.name);
            assert_eq!(still.len(), c.still, "{}", c.name);
        }
    }

    /// A partial sync (the changed ports' plans replaced, only touched things diffed) must reach the
    /// same state as a full one, for every kind of change.
    #[test]
    fn partial_plan_matches_full_plan() {
        let cfg = PlanConfig::default();
        let nodes = [ip("192.168.56.11")];
        let base = table();
        let web = ServicePortName::new("default", "web", "http", Protocol::Tcp);
        let np = ServicePortName::new("default", "np", "", Protocol::Tcp);
        let twin = ServicePortName::new("default", "web", "alt", Protocol::Tcp);
        type Change = fn(&mut ServiceTable);
        let changes: Vec<(&str, Change)> = vec![
            ("endpoint removed", |t| {
                t.values_mut().next().unwrap().endpoints.pop();
            }),
            ("service removed", |t| {
                t.remove(&ServicePortName::new("default", "web", "http", Protocol::Tcp));
            }),
            ("second port on a shared VIP, then the first goes", |t| {
                let mut e = t[&ServicePortName::new("default", "web", "http", Protocol::Tcp)].clone();
                e.port.port = 8443;
                t.insert(ServicePortName::new("default", "web", "alt", Protocol::Tcp), e);
                t.remove(&ServicePortName::new("default", "web", "http", Protocol::Tcp));
            }),
            ("node port changed", |t| {
                t.get_mut(&ServicePortName::new("default", "np", "", Protocol::Tcp)).unwrap().port.node_port =
                    Some(30090);
            }),
        ];
        let now = Instant::now();
        for (name, change) in changes {
            let mut index = Index::build(&base, &nodes, &cfg);
            let observed = observed_from(&index.desired());
            let mut next = base.clone();
            change(&mut next);
            let mut touched = Touched::default();
            for spn in [&web, &np, &twin] {
                index.set(spn, next.get(spn).map(|e| port_plan(spn, e, &nodes, &cfg)), &mut touched);
            }
            let full = desired(&next, &nodes, &cfg);
            assert_eq!(index.desired(), full, "{name}: the index equals a rebuild");
            let (want, _) = diff(&full, &observed, &Terminating::new(), now, &cfg);
            let (got, _) = diff_touched(&index, &touched, &observed, &Terminating::new(), now, &cfg);
            let sorted = |v: Vec<Op>| {
                let mut v: Vec<String> = v.iter().map(ToString::to_string).collect();
                v.sort();
                v
            };
            assert_eq!(sorted(got), sorted(want), "{name}");
        }
    }

    #[test]
    fn drain_decisions() {
        let now = Instant::now();
        let grace = Duration::from_secs(60);
        let busy = RealServer { active_conns: 1, ..RealServer::masq(ip("10.0.0.1"), 80, 1) };
        let idle = RealServer::masq(ip("10.0.0.1"), 80, 0);
        assert_eq!(drain(Protocol::Tcp, &busy, None, now, grace), Drain::Keep(now + grace));
        assert_eq!(drain(Protocol::Tcp, &busy, Some(now + grace), now, grace), Drain::Keep(now + grace));
        assert_eq!(drain(Protocol::Tcp, &busy, Some(now), now, grace), Drain::Delete);
        assert_eq!(drain(Protocol::Tcp, &idle, None, now, grace), Drain::Delete);
        assert_eq!(drain(Protocol::Udp, &busy, None, now, grace), Drain::Delete);
        assert_eq!(drain(Protocol::Sctp, &busy, None, now, grace), Drain::Keep(now + grace));
    }
}
