//! The userspace mode, kube-proxy's first design done carefully: for each service port a socket on
//! the node (TCP listener or UDP relay on a port the kernel picks), iptables `REDIRECT` rules that send
//! the port's VIP, external IPs, load-balancer IPs and NodePort to that socket, and a balancer (round
//! robin, ClientIP affinity, a failed connect tries the next endpoint). Ports without endpoints get a
//! `REJECT` instead, so clients are refused at once. It owns only the `WEFT-PORTALS-*` chains.
//!
//! Sockets belong to the network namespace of the thread that calls `sync` (the daemon's own); their
//! tasks run on the tokio runtime given to `new`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::runtime::Handle;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use crate::dataplane::{self, Dataplane, SyncStats};
use crate::iptables::Runner;
use crate::model::{Protocol, ServicePortName, ServiceTable};

pub const CONTAINER_CHAIN: &str = "WEFT-PORTALS-CONTAINER";
pub const HOST_CHAIN: &str = "WEFT-PORTALS-HOST";
pub const REJECT_CHAIN: &str = "WEFT-PORTALS-REJECT";
/// How long one endpoint may take to accept before the next is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// A UDP "session" (client address → endpoint) ends after this long without traffic.
const UDP_IDLE: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("binding a {protocol} proxy socket for {port}: {source}")]
    Bind { port: String, protocol: &'static str, source: std::io::Error },
    #[error(transparent)]
    Iptables(#[from] crate::iptables::Error),
}

/// Picks endpoints for new connections: ClientIP affinity first (while fresh), then round robin.
/// Pure apart from the clock the caller passes in.
#[derive(Debug, Clone, Default)]
pub struct Balancer {
    endpoints: Vec<SocketAddr>,
    next: usize,
    affinity: Option<Duration>,
    sticky: HashMap<IpAddr, (SocketAddr, Instant)>,
}

impl Balancer {
    pub fn new(endpoints: Vec<SocketAddr>, affinity: Option<Duration>) -> Self {
        Balancer { endpoints, next: 0, affinity, sticky: HashMap::new() }
    }

    /// New endpoints or affinity take effect for the next connection; affinities to endpoints that
    /// left are forgotten.
    pub fn update(&mut self, endpoints: Vec<SocketAddr>, affinity: Option<Duration>) {
        self.sticky.retain(|_, (ep, _)| endpoints.contains(ep));
        if affinity.is_none() {
            self.sticky.clear();
        }
        self.endpoints = endpoints;
        self.affinity = affinity;
        if self.next >= self.endpoints.len() {
            self.next = 0;
        }
    }

    pub fn endpoints(&self) -> &[SocketAddr] {
        &self.endpoints
    }

    /// The order in which to try endpoints for a new connection from `client`.
    pub fn candidates(&mut self, client: IpAddr, now: Instant) -> Vec<SocketAddr> {
        let n = self.endpoints.len();
        if n == 0 {
            return Vec::new();
        }
        let mut order: Vec<SocketAddr> = (0..n).map(|i| self.endpoints[(self.next + i) % n]).collect();
        self.next = (self.next + 1) % n;
        if let (Some(timeout), Some((ep, at))) = (self.affinity, self.sticky.get(&client)) {
            if now.duration_since(*at) <= timeout {
                let ep = *ep;
                order.retain(|e| *e != ep);
                order.insert(0, ep);
            }
        }
        order
    }

    /// A connection from `client` went to `ep`: remember it for affinity.
    pub fn chose(&mut self, client: IpAddr, ep: SocketAddr, now: Instant) {
        if self.affinity.is_some() {
            self.sticky.insert(client, (ep, now));
        }
    }
}

/// One rule target: where a service port is reached (`dst` None = any local address, for NodePorts).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Portal {
    dst: Option<Ipv4Addr>,
    port: u16,
}

fn portals(entry: &crate::model::ServiceEntry) -> Vec<Portal> {
    let p = &entry.port;
    let mut out: Vec<Portal> = p
        .cluster_ip
        .iter()
        .chain(&p.external_ips)
        .chain(&p.load_balancer_ips)
        .map(|ip| Portal { dst: Some(*ip), port: p.port })
        .collect();
    if let Some(np) = p.node_port {
        out.push(Portal { dst: None, port: np });
    }
    out
}

/// The `iptables-restore --noflush` input for the whole table: REDIRECT each portal of a port with
/// endpoints to its proxy socket (`proxy_ports`), REJECT the portals of ports without. Pure.
pub fn render(table: &ServiceTable, proxy_ports: &BTreeMap<ServicePortName, u16>) -> String {
    let mut nat = String::new();
    let mut filter = String::new();
    for (name, entry) in table {
        let proto = name.protocol.lower();
        let comment = format!("-m comment --comment \"{name}\"");
        let matcher = |p: &Portal| match p.dst {
            Some(ip) => format!("-d {ip}/32 -p {proto} {comment} -m {proto} --dport {}", p.port),
            None => format!("-p {proto} {comment} -m addrtype --dst-type LOCAL -m {proto} --dport {}", p.port),
        };
        match proxy_ports.get(name) {
            Some(local) if !entry.endpoints.is_empty() => {
                for p in portals(entry) {
                    for chain in [CONTAINER_CHAIN, HOST_CHAIN] {
                        let _ = writeln!(nat, "-A {chain} {} -j REDIRECT --to-ports {local}", matcher(&p));
                    }
                }
            }
            _ => {
                for p in portals(entry) {
                    let _ = writeln!(
                        filter,
                        "-A {REJECT_CHAIN} {} -j REJECT --reject-with icmp-port-unreachable",
                        matcher(&p)
                    );
                }
            }
        }
    }
    format!(
        "*nat\n:{CONTAINER_CHAIN} - [0:0]\n:{HOST_CHAIN} - [0:0]\n{nat}COMMIT\n*filter\n:{REJECT_CHAIN} - [0:0]\n{filter}COMMIT\n"
    )
}

/// The jumps from the built-in chains: (table, chain, target).
const HOOKS: [(&str, &str, &str); 5] = [
    ("nat", "PREROUTING", CONTAINER_CHAIN),
    ("nat", "OUTPUT", HOST_CHAIN),
    ("filter", "INPUT", REJECT_CHAIN),
    ("filter", "FORWARD", REJECT_CHAIN),
    ("filter", "OUTPUT", REJECT_CHAIN),
];

/// A running proxy socket for one service port.
struct PortProxy {
    protocol: Protocol,
    local_port: u16,
    balancer: Arc<Mutex<Balancer>>,
    task: JoinHandle<()>,
}

impl Drop for PortProxy {
    fn drop(&mut self) {
        // Stops accepting; connections already relayed run on in their own tasks.
        self.task.abort();
    }
}

pub struct UserspaceDataplane<R: Runner> {
    runner: R,
    handle: Handle,
    proxies: BTreeMap<ServicePortName, PortProxy>,
    hooks_checked: bool,
}

fn lock(b: &Mutex<Balancer>) -> std::sync::MutexGuard<'_, Balancer> {
    b.lock().unwrap_or_else(|p| p.into_inner())
}

impl<R: Runner> UserspaceDataplane<R> {
    /// `handle`: the runtime the socket tasks run on.
    pub fn new(runner: R, handle: Handle) -> Self {
        UserspaceDataplane { runner, handle, proxies: BTreeMap::new(), hooks_checked: false }
    }

    /// The proxy socket's port for a service port (for tests and `weft services`).
    pub fn local_port(&self, name: &ServicePortName) -> Option<u16> {
        self.proxies.get(name).map(|p| p.local_port)
    }

    fn open(&self, name: &ServicePortName, balancer: Arc<Mutex<Balancer>>) -> Result<PortProxy, Error> {
        let _guard = self.handle.enter();
        let bind_err = |protocol, source| Error::Bind { port: name.to_string(), protocol, source };
        let (local_port, task) = match name.protocol {
            Protocol::Tcp => {
                let std = std::net::TcpListener::bind("0.0.0.0:0").map_err(|e| bind_err("TCP", e))?;
                std.set_nonblocking(true).map_err(|e| bind_err("TCP", e))?;
                let port = std.local_addr().map_err(|e| bind_err("TCP", e))?.port();
                let listener = TcpListener::from_std(std).map_err(|e| bind_err("TCP", e))?;
                (port, self.handle.spawn(serve_tcp(listener, balancer.clone(), name.to_string())))
            }
            Protocol::Udp => {
                let std = std::net::UdpSocket::bind("0.0.0.0:0").map_err(|e| bind_err("UDP", e))?;
                std.set_nonblocking(true).map_err(|e| bind_err("UDP", e))?;
                let port = std.local_addr().map_err(|e| bind_err("UDP", e))?.port();
                let socket = UdpSocket::from_std(std).map_err(|e| bind_err("UDP", e))?;
                (port, self.handle.spawn(serve_udp(Arc::new(socket), balancer.clone(), name.to_string())))
            }
            Protocol::Sctp => {
                return Err(bind_err("SCTP", std::io::Error::other("SCTP is not proxied in userspace mode")));
            }
        };
        Ok(PortProxy { protocol: name.protocol, local_port, balancer, task })
    }

    fn ensure_hooks(&mut self) -> Result<(), Error> {
        for (table, chain, target) in HOOKS {
            let spec = ["-m", "comment", "--comment", "weft userspace portals", "-j", target];
            let check: Vec<&str> = ["-t", table, "-C", chain].iter().copied().chain(spec).collect();
            if self.runner.run("iptables", &check, None).is_err() {
                let insert: Vec<&str> = ["-t", table, "-I", chain, "1"].iter().copied().chain(spec).collect();
                self.runner.run("iptables", &insert, None)?;
            }
        }
        self.hooks_checked = true;
        Ok(())
    }
}

impl<R: Runner> Dataplane for UserspaceDataplane<R> {
    fn sync(
        &mut self,
        table: &ServiceTable,
        changed: Option<&BTreeSet<ServicePortName>>,
    ) -> dataplane::Result<SyncStats> {
        let started = Instant::now();
        let _ = changed; // the rule set is small: every sync renders it whole
                         // Ports that left (or changed protocol) close their sockets.
        self.proxies.retain(|name, p| table.contains_key(name) && p.protocol == name.protocol);
        for (name, entry) in table {
            if name.protocol == Protocol::Sctp {
                debug!(port = %name, "SCTP is not proxied in userspace mode");
                continue;
            }
            let endpoints: Vec<SocketAddr> = entry.endpoints.iter().map(|e| SocketAddr::from((e.ip, e.port))).collect();
            match self.proxies.get(name) {
                Some(p) => lock(&p.balancer).update(endpoints, entry.port.session_affinity),
                None => {
                    let balancer = Arc::new(Mutex::new(Balancer::new(endpoints, entry.port.session_affinity)));
                    let proxy = self.open(name, balancer).map_err(userspace_err)?;
                    self.proxies.insert(name.clone(), proxy);
                }
            }
        }
        let ports: BTreeMap<ServicePortName, u16> =
            self.proxies.iter().map(|(n, p)| (n.clone(), p.local_port)).collect();
        let text = render(table, &ports);
        self.runner.run("iptables-restore", &["--noflush"], Some(text.as_bytes()))?;
        if !self.hooks_checked || changed.is_none() {
            self.ensure_hooks().map_err(userspace_err)?;
        }
        let rules = text.lines().filter(|l| l.starts_with("-A ")).count();
        Ok(SyncStats {
            full: true,
            chains_written: 3,
            chains_deleted: 0,
            rules_written: rules,
            bytes: text.len(),
            duration: started.elapsed(),
        })
    }

    fn mode(&self) -> &'static str {
        "userspace"
    }

    fn describe(&self, port: &ServicePortName) -> Option<String> {
        self.local_port(port).map(|p| format!("proxy port {p}"))
    }
}

fn userspace_err(e: Error) -> dataplane::Error {
    dataplane::Error::Userspace(e)
}

async fn serve_tcp(listener: TcpListener, balancer: Arc<Mutex<Balancer>>, name: String) {
    loop {
        let (client, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                warn!(port = %name, "accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let balancer = balancer.clone();
        let name = name.clone();
        tokio::spawn(async move {
            let candidates = lock(&balancer).candidates(peer.ip(), Instant::now());
            for ep in candidates {
                match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(ep)).await {
                    Ok(Ok(upstream)) => {
                        lock(&balancer).chose(peer.ip(), ep, Instant::now());
                        relay(client, upstream).await;
                        return;
                    }
                    Ok(Err(e)) => debug!(port = %name, endpoint = %ep, "connect failed, trying the next: {e}"),
                    Err(_) => debug!(port = %name, endpoint = %ep, "connect timed out, trying the next"),
                }
            }
            // No endpoint took it: dropping the client closes its connection.
        });
    }
}

async fn relay(mut client: TcpStream, mut upstream: TcpStream) {
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
}

async fn serve_udp(socket: Arc<UdpSocket>, balancer: Arc<Mutex<Balancer>>, name: String) {
    // client address → the socket connected to its endpoint (replies are relayed back by its task).
    let sessions: Arc<Mutex<HashMap<SocketAddr, Arc<UdpSocket>>>> = Arc::default();
    let mut buf = vec![0u8; 65_536];
    loop {
        let (n, client) = match socket.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                debug!(port = %name, "recv: {e}");
                continue;
            }
        };
        let existing = sessions.lock().unwrap_or_else(|p| p.into_inner()).get(&client).cloned();
        let upstream = match existing {
            Some(u) => u,
            None => {
                let Some(ep) = lock(&balancer).candidates(client.ip(), Instant::now()).into_iter().next() else {
                    continue; // no endpoints: the datagram is dropped (the REJECT rule normally answers first)
                };
                let Ok(u) = UdpSocket::bind("0.0.0.0:0").await else { continue };
                if u.connect(ep).await.is_err() {
                    continue;
                }
                lock(&balancer).chose(client.ip(), ep, Instant::now());
                let u = Arc::new(u);
                sessions.lock().unwrap_or_else(|p| p.into_inner()).insert(client, u.clone());
                tokio::spawn(udp_replies(u.clone(), socket.clone(), client, sessions.clone()));
                u
            }
        };
        let _ = upstream.send(&buf[..n]).await;
    }
}

/// Relays an endpoint's replies to its client until the session idles out.
async fn udp_replies(
    upstream: Arc<UdpSocket>,
    socket: Arc<UdpSocket>,
    client: SocketAddr,
    sessions: Arc<Mutex<HashMap<SocketAddr, Arc<UdpSocket>>>>,
) {
    let mut buf = vec![0u8; 65_536];
    while let Ok(Ok(n)) = tokio::time::timeout(UDP_IDLE, upstream.recv(&mut buf)).await {
        let _ = socket.send_to(&buf[..n], client).await;
    }
    sessions.lock().unwrap_or_else(|p| p.into_inner()).remove(&client);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Endpoint, ServiceEntry, ServicePort};

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn round_robin_then_next_on_failure_order() {
        let mut b = Balancer::new(vec![sa("10.0.0.1:80"), sa("10.0.0.2:80"), sa("10.0.0.3:80")], None);
        let c: IpAddr = "10.244.1.2".parse().unwrap();
        let now = Instant::now();
        let firsts: Vec<SocketAddr> = (0..6).map(|_| b.candidates(c, now)[0]).collect();
        assert_eq!(firsts, [sa("10.0.0.1:80"), sa("10.0.0.2:80"), sa("10.0.0.3:80")].repeat(2));
        // Every candidate list holds every endpoint once: a failed connect falls through to the rest.
        let all = b.candidates(c, now);
        assert_eq!(all.len(), 3);
        assert_eq!(all.iter().collect::<BTreeSet<_>>().len(), 3);
    }

    #[test]
    fn client_ip_affinity_sticks_until_it_expires_or_the_endpoint_leaves() {
        let eps = vec![sa("10.0.0.1:80"), sa("10.0.0.2:80")];
        let mut b = Balancer::new(eps.clone(), Some(Duration::from_secs(10)));
        let (c, other): (IpAddr, IpAddr) = ("10.244.1.2".parse().unwrap(), "10.244.1.3".parse().unwrap());
        let t0 = Instant::now();
        let first = b.candidates(c, t0)[0];
        b.chose(c, first, t0);
        for i in 1..5 {
            assert_eq!(b.candidates(c, t0 + Duration::from_secs(i))[0], first, "sticky");
        }
        let _ = b.candidates(other, t0);
        assert_eq!(b.candidates(c, t0 + Duration::from_secs(9))[0], first);
        // Expired: back to round robin (which may or may not pick the same one); the map entry is stale.
        let later = t0 + Duration::from_secs(30);
        let picks: BTreeSet<SocketAddr> = (0..2).map(|_| b.candidates(c, later)[0]).collect();
        assert_eq!(picks.len(), 2, "no longer sticky after the timeout");
        // The endpoint leaves: affinity to it is forgotten.
        b.chose(c, first, later);
        let remaining: Vec<SocketAddr> = eps.into_iter().filter(|e| *e != first).collect();
        b.update(remaining.clone(), Some(Duration::from_secs(10)));
        assert_eq!(b.candidates(c, later), remaining);
    }

    #[test]
    fn no_endpoints_no_candidates() {
        let mut b = Balancer::new(vec![], None);
        assert!(b.candidates("10.0.0.9".parse().unwrap(), Instant::now()).is_empty());
    }

    fn entry(vip: [u8; 4], eps: usize, node_port: Option<u16>, external: &[[u8; 4]]) -> ServiceEntry {
        ServiceEntry {
            port: ServicePort {
                cluster_ip: Some(Ipv4Addr::from(vip)),
                port: 80,
                node_port,
                external_ips: external.iter().map(|ip| Ipv4Addr::from(*ip)).collect(),
                load_balancer_ips: vec![],
                session_affinity: None,
                external_policy_local: false,
                internal_policy_local: false,
            },
            endpoints: (0..eps)
                .map(|i| Endpoint {
                    ip: Ipv4Addr::new(10, 244, 1, 2 + i as u8),
                    port: 9376,
                    node_name: None,
                    is_local: false,
                    ready: true,
                })
                .collect(),
        }
    }

    #[test]
    fn render_matches_golden() {
        let web = ServicePortName::new("default", "web", "http", Protocol::Tcp);
        let dns = ServicePortName::new("kube-system", "dns", "dns", Protocol::Udp);
        let empty = ServicePortName::new("default", "empty", "http", Protocol::Tcp);
        let mut dns_entry = entry([10, 96, 0, 10], 2, None, &[]);
        dns_entry.port.port = 53;
        let table = ServiceTable::from([
            (web.clone(), entry([10, 96, 0, 1], 2, Some(30080), &[[203, 0, 113, 10]])),
            (dns.clone(), dns_entry),
            (empty.clone(), entry([10, 96, 0, 9], 0, None, &[])),
        ]);
        let ports = BTreeMap::from([(web, 40001), (dns, 40002), (empty, 40003)]);
        let got = render(&table, &ports);
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/userspace.golden");
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::write(path, &got).unwrap();
        }
        assert_eq!(got, std::fs::read_to_string(path).unwrap(), "UPDATE_GOLDEN=1 rewrites {path}");
    }
}
