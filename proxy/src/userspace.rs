//! userspace mode: every TCP/UDP service port gets a proxy socket on the node (tasks on a given tokio runtime)
//! that picks an endpoint — round robin, ClientIP affinity, the next endpoint when a connect fails — and relays.
//! nat rules in our own `WEFT-PORTALS-` chains (rendered purely, applied with one `iptables-restore --noflush`)
//! send VIP, external/LB IP and NodePort traffic to those sockets; nothing else in the kernel is touched.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ipnetwork::Ipv4Network;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::runtime::Handle;
use tokio::task::JoinHandle;

use crate::dataplane::{self, Dataplane, SyncStats};
use crate::model::{Protocol, ServiceEntry, ServicePortName, ServiceTable};
use crate::restore::{self, comment, CommandRunner, Runner, Table};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("binding the {protocol} proxy socket of {service} on {addr} failed")]
    Bind {
        service: String,
        protocol: Protocol,
        addr: SocketAddrV4,
        #[source]
        source: io::Error,
    },
    #[error("the runtime that owns the proxy sockets has shut down")]
    RuntimeGone,
    #[error("applying the portal rules failed")]
    Iptables(#[from] crate::restore::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Prefix of every chain this mode owns (distinct from the iptables mode's chains, so neither sweeps the other).
pub const PREFIX: &str = "WEFT-PORTALS-";
/// nat, from PREROUTING: traffic arriving from pods or from outside.
pub const CONTAINER: &str = "WEFT-PORTALS-CONTAINER";
/// nat, from OUTPUT: traffic originated on the node.
pub const HOST: &str = "WEFT-PORTALS-HOST";
/// filter, from INPUT: new connections to the proxy socket of a port without endpoints are refused.
pub const REJECT: &str = "WEFT-PORTALS-REJECT";

/// Node-wide settings of the userspace mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Address the proxy sockets bind (port chosen by the kernel). Unspecified: every address, and the rules
    /// REDIRECT; a specific address: the rules DNAT to it.
    pub listen_ip: Ipv4Addr,
    /// Node addresses that answer NodePorts; empty: every local address (`addrtype LOCAL`).
    pub nodeport_addresses: Vec<Ipv4Network>,
    /// How long one endpoint gets to accept a TCP connection before the next one is tried.
    pub connect_timeout: Duration,
    /// A UDP client's session (its backend socket) ends after this long without a datagram either way.
    pub udp_idle_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen_ip: Ipv4Addr::UNSPECIFIED,
            nodeport_addresses: vec![],
            connect_timeout: Duration::from_millis(500),
            udp_idle_timeout: Duration::from_secs(1),
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Endpoint selection (pure; the clock is a parameter).

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Sticky {
    endpoint: SocketAddrV4,
    last_used: Instant,
}

/// Round robin over a service port's ready endpoints, with optional ClientIP affinity.
#[derive(Debug, Clone, Default)]
pub struct Balancer {
    endpoints: Vec<SocketAddrV4>,
    next: usize,
    affinity: Option<Duration>,
    clients: HashMap<Ipv4Addr, Sticky>,
    /// Size of `clients` at which expired entries are purged (keeps the map bounded without a timer).
    purge_at: usize,
}

impl Balancer {
    pub fn new(endpoints: Vec<SocketAddrV4>, affinity: Option<Duration>) -> Self {
        let mut b = Balancer { purge_at: 1024, ..Balancer::default() };
        b.set(endpoints, affinity);
        b
    }

    /// New endpoints for new connections. Clients stuck to an endpoint that remains stay stuck.
    pub fn set(&mut self, endpoints: Vec<SocketAddrV4>, affinity: Option<Duration>) {
        if affinity.is_none() {
            self.clients.clear();
        }
        self.affinity = affinity;
        if endpoints != self.endpoints {
            self.clients.retain(|_, s| endpoints.contains(&s.endpoint));
            self.next = if endpoints.is_empty() { 0 } else { self.next % endpoints.len() };
            self.endpoints = endpoints;
        }
    }

    pub fn endpoints(&self) -> &[SocketAddrV4] {
        &self.endpoints
    }

    pub fn contains(&self, ep: SocketAddrV4) -> bool {
        self.endpoints.contains(&ep)
    }

    /// The endpoint for a new connection from `client` at `now`, never one in `exclude` (endpoints that
    /// already failed this connection). With affinity, the client's endpoint while it is fresh; otherwise
    /// the next in turn, which becomes the client's endpoint.
    pub fn pick(&mut self, client: Ipv4Addr, now: Instant, exclude: &[SocketAddrV4]) -> Option<SocketAddrV4> {
        if let Some(ttl) = self.affinity {
            if let Some(s) = self.clients.get_mut(&client) {
                let fresh = now.saturating_duration_since(s.last_used) < ttl;
                if fresh && !exclude.contains(&s.endpoint) {
                    s.last_used = now;
                    return Some(s.endpoint);
                }
            }
        }
        let n = self.endpoints.len();
        let i = (0..n).map(|i| (self.next + i) % n).find(|i| !exclude.contains(&self.endpoints[*i]))?;
        self.next = (i + 1) % n;
        let endpoint = self.endpoints[i];
        if let Some(ttl) = self.affinity {
            if self.clients.len() >= self.purge_at {
                self.clients.retain(|_, s| now.saturating_duration_since(s.last_used) < ttl);
                self.purge_at = (self.clients.len() * 2).max(1024);
            }
            self.clients.insert(client, Sticky { endpoint, last_used: now });
        }
        Some(endpoint)
    }
}

fn ready_endpoints(e: &ServiceEntry) -> Vec<SocketAddrV4> {
    e.endpoints.iter().filter(|ep| ep.ready).map(|ep| SocketAddrV4::new(ep.ip, ep.port)).collect()
}

// ---------------------------------------------------------------------------------------------------------
// Rules (pure).

/// One service port with its proxy socket's port: what the rules are rendered from.
#[derive(Debug, Clone, Copy)]
pub struct Portal<'a> {
    pub name: &'a ServicePortName,
    pub entry: &'a ServiceEntry,
    pub proxy_port: u16,
}

/// Our footprint as `iptables-save` shows it: `WEFT-PORTALS-` chains and the rules jumping to them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Existing {
    pub chains: BTreeSet<(Table, String)>,
    /// (table, built-in chain, the rule after `-A <chain> `) for each rule of a built-in chain jumping to ours.
    pub hooks: Vec<(Table, String, String)>,
}

impl Existing {
    fn has_hook(&self, table: Table, builtin: &str, target: &str) -> bool {
        self.hooks
            .iter()
            .any(|(t, b, r)| *t == table && b == builtin && restore::jump_target(r).as_deref() == Some(target))
    }
}

/// Parses `iptables-save` output for our chains and the rules that jump to them.
pub fn parse_save(text: &str) -> Existing {
    let (chains, hooks) = restore::scan_save(text, |n| n.starts_with(PREFIX));
    Existing { chains, hooks: hooks.into_iter().map(|(t, chain, rest, _)| (t, chain, rest)).collect() }
}

/// Our chains and the jumps into them, inserted first in the built-in chains as kube-proxy does.
fn hooks() -> [(Table, &'static str, &'static str, &'static str); 3] {
    [
        (
            Table::Filter,
            "INPUT",
            REJECT,
            "-m conntrack --ctstate NEW -m comment --comment \"weft userspace portals without endpoints\"",
        ),
        (Table::Nat, "PREROUTING", CONTAINER, "-m comment --comment \"weft userspace portals\""),
        (Table::Nat, "OUTPUT", HOST, "-m comment --comment \"weft userspace portals\""),
    ]
}

/// A rendered sync: the `iptables-restore --noflush` input and what the kernel holds once it is applied.
#[derive(Debug, Clone)]
pub struct Rendered {
    pub text: String,
    pub rules: usize,
    pub chains_deleted: usize,
    pub installed: Existing,
}

#[derive(Default)]
struct TableText {
    decls: Vec<String>,
    rules: Vec<String>,
    deletes: Vec<String>,
}

fn finish(tables: BTreeMap<Table, TableText>) -> String {
    let mut s = String::new();
    for (t, tt) in tables {
        if tt.decls.is_empty() && tt.rules.is_empty() && tt.deletes.is_empty() {
            continue;
        }
        let _ = writeln!(s, "*{}", t.name());
        for line in tt.decls.iter().chain(&tt.rules).chain(&tt.deletes) {
            s.push_str(line);
            s.push('\n');
        }
        s.push_str("COMMIT\n");
    }
    s
}

/// Deletes (in `tables`) every chain of `existing` not in `keep`, after the built-in rules jumping to it.
fn sweep(existing: &Existing, keep: &[&str], tables: &mut BTreeMap<Table, TableText>) -> usize {
    let stale: Vec<&(Table, String)> = existing.chains.iter().filter(|(_, c)| !keep.contains(&c.as_str())).collect();
    for (t, builtin, rule) in &existing.hooks {
        if restore::jump_target(rule).is_some_and(|j| !keep.contains(&j.as_str())) {
            tables.entry(*t).or_default().rules.insert(0, format!("-D {builtin} {rule}"));
        }
    }
    for (t, c) in &stale {
        let tt = tables.entry(*t).or_default();
        // Declaring flushes it, so jumps between stale chains are gone before `-X`.
        tt.decls.push(format!(":{c} - [0:0]"));
        tt.deletes.push(format!("-X {c}"));
    }
    stale.len()
}

/// The whole desired state of our chains as one restore input: our three chains rewritten, the jumps into
/// them that `existing` lacks inserted, and every other `WEFT-PORTALS-` chain (and jump to it) removed.
pub fn render(portals: &[Portal<'_>], cfg: &Config, existing: &Existing) -> Rendered {
    let mut tables: BTreeMap<Table, TableText> = BTreeMap::new();
    let chains_deleted = sweep(existing, &[CONTAINER, HOST, REJECT], &mut tables);
    let mut installed = Existing::default();
    for (t, builtin, chain, matches) in hooks() {
        let tt = tables.entry(t).or_default();
        tt.decls.push(format!(":{chain} - [0:0]"));
        installed.chains.insert((t, chain.to_string()));
        let rule = format!("{matches} -j {chain}");
        if !existing.has_hook(t, builtin, chain) {
            tt.rules.push(format!("-I {builtin} {rule}"));
        }
        installed.hooks.push((t, builtin.to_string(), rule));
    }

    let mut container = Vec::new();
    let mut host = Vec::new();
    let mut nodeports = Vec::new();
    let mut reject = Vec::new();
    for p in portals {
        let name = p.name.to_string();
        let proto = p.name.protocol.lower();
        let sp = &p.entry.port;
        let target = if cfg.listen_ip.is_unspecified() {
            format!("REDIRECT --to-ports {}", p.proxy_port)
        } else {
            format!("DNAT --to-destination {}:{}", cfg.listen_ip, p.proxy_port)
        };
        let pm = format!("-p {proto} -m {proto} --dport {}", sp.port);
        let addrs = sp.cluster_ip.iter().map(|ip| (ip, "cluster IP"));
        let addrs = addrs
            .chain(sp.external_ips.iter().map(|ip| (ip, "external IP")))
            .chain(sp.load_balancer_ips.iter().map(|ip| (ip, "loadbalancer IP")));
        for (ip, what) in addrs {
            let rule = format!("-d {ip}/32 {pm} {} -j {target}", comment(&format!("{name} {what}")));
            container.push(rule.clone());
            host.push(rule);
        }
        if let Some(np) = sp.node_port {
            let dsts: Vec<String> = if cfg.nodeport_addresses.is_empty() {
                vec![String::new()]
            } else {
                cfg.nodeport_addresses.iter().map(|n| format!("-d {n} ")).collect()
            };
            for d in dsts {
                let c = comment(&format!("{name} node port"));
                nodeports.push(format!(
                    "{d}-m addrtype --dst-type LOCAL -p {proto} -m {proto} --dport {np} {c} -j {target}"
                ));
            }
        }
        if ready_endpoints(p.entry).is_empty() {
            let c = comment(&format!("{name} has no endpoints"));
            reject.push(format!("-p {proto} -m {proto} --dport {} {c} -j REJECT", p.proxy_port));
        }
    }
    // NodePorts last: a VIP rule is more specific than "any local address on this port".
    container.extend(nodeports.iter().cloned());
    host.extend(nodeports);
    let mut rules = 0;
    for (t, chain, list) in
        [(Table::Nat, CONTAINER, container), (Table::Nat, HOST, host), (Table::Filter, REJECT, reject)]
    {
        rules += list.len();
        tables.entry(t).or_default().rules.extend(list.into_iter().map(|r| format!("-A {chain} {r}")));
    }
    Rendered { text: finish(tables), rules, chains_deleted, installed }
}

/// Removes everything this mode installed (`weft proxy --cleanup`, or a switch to another mode).
pub fn render_cleanup(existing: &Existing) -> String {
    let mut tables = BTreeMap::new();
    sweep(existing, &[], &mut tables);
    finish(tables)
}

// ---------------------------------------------------------------------------------------------------------
// Sockets and relays.

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned balancer is still consistent (every update is a plain assignment).
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn client_ip(addr: SocketAddr) -> Ipv4Addr {
    match addr.ip() {
        IpAddr::V4(ip) => ip,
        IpAddr::V6(ip) => ip.to_ipv4_mapped().unwrap_or(Ipv4Addr::UNSPECIFIED),
    }
}

enum Bound {
    Tcp(std::net::TcpListener),
    Udp(std::net::UdpSocket),
}

impl Bound {
    fn port(&self) -> io::Result<u16> {
        match self {
            Bound::Tcp(l) => l.local_addr().map(|a| a.port()),
            Bound::Udp(s) => s.local_addr().map(|a| a.port()),
        }
    }
}

fn bind(protocol: Protocol, addr: SocketAddrV4) -> io::Result<Bound> {
    match protocol {
        Protocol::Tcp => {
            let l = std::net::TcpListener::bind(addr)?;
            l.set_nonblocking(true)?;
            Ok(Bound::Tcp(l))
        }
        Protocol::Udp => {
            let s = std::net::UdpSocket::bind(addr)?;
            s.set_nonblocking(true)?;
            Ok(Bound::Udp(s))
        }
        Protocol::Sctp => Err(io::Error::new(io::ErrorKind::Unsupported, "SCTP is not proxied in userspace mode")),
    }
}

/// One service port's proxy socket. Dropping it stops the task that owns the socket (closing it) and every
/// UDP session; accepted TCP connections run in their own tasks and finish on their own.
struct ProxySocket {
    port: u16,
    balancer: Arc<Mutex<Balancer>>,
    task: JoinHandle<()>,
}

impl Drop for ProxySocket {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Accepts on the proxy socket from one task per runtime worker (the socket's fd duplicated), so that on a
/// multi-thread runtime new connections are taken on every core.
async fn serve_tcp(listener: std::net::TcpListener, name: Arc<str>, lb: Arc<Mutex<Balancer>>, timeout: Duration) {
    let workers = Handle::current().metrics().num_workers();
    // A JoinSet aborts its tasks when dropped: the extra accept loops end with this one.
    let mut extra = tokio::task::JoinSet::new();
    for _ in 1..workers {
        match listener.try_clone() {
            Ok(l) => {
                extra.spawn(accept_loop(l, name.clone(), lb.clone(), timeout));
            }
            Err(e) => tracing::warn!(service = %name, error = %e, "duplicating the proxy listener failed"),
        }
    }
    accept_loop(listener, name, lb, timeout).await;
    drop(extra);
}

/// Relays one service port accepts at once; more wait in the kernel's backlog (a flood cannot exhaust our
/// descriptors and starve the other ports).
const MAX_RELAYS: usize = 1024;

async fn accept_loop(listener: std::net::TcpListener, name: Arc<str>, lb: Arc<Mutex<Balancer>>, timeout: Duration) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(service = %name, error = %e, "registering the proxy listener failed");
            return;
        }
    };
    // Out of file descriptors and the like: the shared loop backs off (10 ms doubling to 1 s) instead of spinning.
    let what = format!("userspace proxy {name}");
    weft_api::http::accept_loop(listener, MAX_RELAYS, &what, move |client, peer| {
        relay_tcp(client, peer, name.clone(), lb.clone(), timeout)
    })
    .await;
}

async fn relay_tcp(
    mut client: TcpStream,
    peer: SocketAddr,
    name: Arc<str>,
    lb: Arc<Mutex<Balancer>>,
    timeout: Duration,
) {
    let ip = client_ip(peer);
    let mut tried = Vec::new();
    let mut server = loop {
        let picked = lock(&lb).pick(ip, Instant::now(), &tried);
        let Some(ep) = picked else {
            tracing::debug!(service = %name, %peer, ?tried, "no endpoint took the connection");
            // A reset, not a clean close: the client must not mistake this for an empty answer. (Deprecated
            // because a non-zero linger blocks on drop; a zero linger never does.)
            #[allow(deprecated)]
            let _ = client.set_linger(Some(Duration::ZERO));
            return;
        };
        match tokio::time::timeout(timeout, TcpStream::connect(ep)).await {
            Ok(Ok(s)) => break s,
            Ok(Err(e)) => tracing::debug!(service = %name, endpoint = %ep, error = %e, "connect failed; next endpoint"),
            Err(_) => tracing::debug!(service = %name, endpoint = %ep, "connect timed out; next endpoint"),
        }
        tried.push(ep);
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut server).await {
        tracing::debug!(service = %name, %peer, error = %e, "relay ended");
    }
}

/// One UDP client's session: a socket connected to its endpoint; replies go back through the proxy socket.
struct UdpSession {
    id: u64,
    endpoint: SocketAddrV4,
    backend: Arc<UdpSocket>,
    last: Arc<Mutex<Instant>>,
    task: JoinHandle<()>,
}

impl Drop for UdpSession {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_udp(socket: std::net::UdpSocket, name: Arc<str>, lb: Arc<Mutex<Balancer>>, idle: Duration) {
    let socket = match UdpSocket::from_std(socket) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            tracing::error!(service = %name, error = %e, "registering the proxy socket failed");
            return;
        }
    };
    let mut sessions: HashMap<SocketAddr, UdpSession> = HashMap::new();
    let (ended_tx, mut ended) = tokio::sync::mpsc::unbounded_channel::<(SocketAddr, u64)>();
    let mut next_id = 0u64;
    let mut buf = vec![0u8; 65536];
    loop {
        let (n, client) = tokio::select! {
            Some((client, id)) = ended.recv() => {
                if sessions.get(&client).is_some_and(|s| s.id == id) {
                    sessions.remove(&client);
                }
                continue;
            }
            r = socket.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!(service = %name, error = %e, "recv failed");
                    continue;
                }
            },
        };
        // A session whose endpoint was removed ends here: the datagram goes to a live endpoint.
        if sessions.get(&client).is_some_and(|s| !lock(&lb).contains(s.endpoint)) {
            sessions.remove(&client);
        }
        let s = match sessions.entry(client) {
            Entry::Occupied(o) => o.into_mut(),
            Entry::Vacant(v) => {
                let picked = lock(&lb).pick(client_ip(client), Instant::now(), &[]);
                let Some(endpoint) = picked else { continue };
                let backend = match open_backend(endpoint).await {
                    Ok(b) => Arc::new(b),
                    Err(e) => {
                        tracing::debug!(service = %name, %endpoint, error = %e, "opening a UDP session failed");
                        continue;
                    }
                };
                next_id += 1;
                let last = Arc::new(Mutex::new(Instant::now()));
                let (to, from, ended) = (backend.clone(), socket.clone(), ended_tx.clone());
                let task = tokio::spawn(udp_session(to, from, client, last.clone(), idle, ended, next_id));
                v.insert(UdpSession { id: next_id, endpoint, backend, last, task })
            }
        };
        *lock(&s.last) = Instant::now();
        let (endpoint, backend) = (s.endpoint, s.backend.clone());
        if let Err(e) = backend.send(&buf[..n]).await {
            tracing::debug!(service = %name, %endpoint, error = %e, "UDP send failed; session ends");
            sessions.remove(&client);
        }
    }
}

async fn open_backend(endpoint: SocketAddrV4) -> io::Result<UdpSocket> {
    let s = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)).await?;
    s.connect(endpoint).await?;
    Ok(s)
}

async fn udp_session(
    backend: Arc<UdpSocket>,
    socket: Arc<UdpSocket>,
    client: SocketAddr,
    last: Arc<Mutex<Instant>>,
    idle: Duration,
    ended: tokio::sync::mpsc::UnboundedSender<(SocketAddr, u64)>,
    id: u64,
) {
    let mut buf = vec![0u8; 65536];
    loop {
        let wait = idle.saturating_sub(lock(&last).elapsed());
        if wait.is_zero() {
            break;
        }
        match tokio::time::timeout(wait, backend.recv(&mut buf)).await {
            Err(_) => continue, // the client may have sent meanwhile: re-check
            Ok(Ok(n)) => {
                *lock(&last) = Instant::now();
                let _ = socket.send_to(&buf[..n], client).await;
            }
            // Typically ECONNREFUSED: the endpoint's port is closed.
            Ok(Err(_)) => break,
        }
    }
    let _ = ended.send((client, id));
}

// ---------------------------------------------------------------------------------------------------------
// The dataplane.

/// The userspace dataplane. Its sockets and relay tasks live on `handle`'s runtime: they are opened on that
/// runtime's thread, so they belong to its network namespace. `sync` may be called on that runtime's thread
/// (the daemon) or on a thread outside any runtime (tests); it never waits for the runtime in the first case.
pub struct UserspaceDataplane<R: Runner = CommandRunner> {
    runner: R,
    cfg: Config,
    handle: Handle,
    sockets: BTreeMap<ServicePortName, ProxySocket>,
    /// What the kernel holds after our last successful restore; None: read it with `iptables-save` first.
    installed: Option<Existing>,
    /// Ports already logged as not proxied (so a sync does not repeat it).
    unsupported: BTreeSet<ServicePortName>,
}

impl<R: Runner> UserspaceDataplane<R> {
    pub fn new(runner: R, cfg: Config, handle: Handle) -> Self {
        UserspaceDataplane {
            runner,
            cfg,
            handle,
            sockets: BTreeMap::new(),
            installed: None,
            unsupported: BTreeSet::new(),
        }
    }

    /// Every proxied service port and the port of its proxy socket.
    pub fn sockets(&self) -> impl Iterator<Item = (&ServicePortName, u16)> {
        self.sockets.iter().map(|(n, s)| (n, s.port))
    }

    /// Removes our chains and the jumps to them (the sockets stay until the dataplane is dropped).
    pub fn cleanup(&mut self) -> Result<()> {
        self.installed = None;
        let save = restore::save(&mut self.runner)?;
        let text = render_cleanup(&parse_save(&save));
        if !text.is_empty() {
            restore::restore(&mut self.runner, text.as_bytes())?;
        }
        Ok(())
    }

    /// Ports that get a proxy socket: TCP and UDP with at least one address to answer on.
    fn wants(&mut self, name: &ServicePortName, e: &ServiceEntry) -> bool {
        let sp = &e.port;
        let reachable = sp.cluster_ip.is_some()
            || sp.node_port.is_some()
            || !sp.external_ips.is_empty()
            || !sp.load_balancer_ips.is_empty();
        if name.protocol == Protocol::Sctp {
            if reachable && self.unsupported.insert(name.clone()) {
                tracing::warn!(service = %name, "not proxied: the userspace mode relays TCP and UDP only");
            }
            return false;
        }
        reachable
    }

    /// Binds the given sockets on the runtime's thread (directly when we are on it).
    fn bind_all(&self, reqs: Vec<(Protocol, SocketAddrV4)>) -> Result<Vec<io::Result<Bound>>> {
        let bind_them = move || reqs.into_iter().map(|(p, a)| bind(p, a)).collect::<Vec<_>>();
        if Handle::try_current().is_ok() {
            return Ok(bind_them());
        }
        let (tx, rx) = std::sync::mpsc::channel();
        self.handle.spawn(async move {
            let _ = tx.send(bind_them());
        });
        rx.recv().map_err(|_| Error::RuntimeGone)
    }

    fn start(&self, name: &ServicePortName, bound: Bound, port: u16) -> ProxySocket {
        let balancer = Arc::new(Mutex::new(Balancer::new(vec![], None)));
        let label: Arc<str> = name.to_string().into();
        let task = match bound {
            Bound::Tcp(l) => self.handle.spawn(serve_tcp(l, label, balancer.clone(), self.cfg.connect_timeout)),
            Bound::Udp(s) => self.handle.spawn(serve_udp(s, label, balancer.clone(), self.cfg.udp_idle_timeout)),
        };
        ProxySocket { port, balancer, task }
    }

    fn sync_all(&mut self, table: &ServiceTable, full: bool) -> Result<SyncStats> {
        let started = Instant::now();
        self.unsupported.retain(|n| table.contains_key(n));
        let mut wanted = BTreeSet::new();
        for (name, e) in table {
            if self.wants(name, e) {
                wanted.insert(name);
            }
        }

        // New ports get a socket; a bind failure skips that port (and fails the sync so it is retried).
        let missing: Vec<&ServicePortName> =
            wanted.iter().copied().filter(|n| !self.sockets.contains_key(*n)).collect();
        let addr = SocketAddrV4::new(self.cfg.listen_ip, 0);
        let bound = self.bind_all(missing.iter().map(|n| (n.protocol, addr)).collect())?;
        let mut bind_error = None;
        for (name, res) in missing.into_iter().zip(bound) {
            match res.and_then(|b| Ok((b.port()?, b))) {
                Ok((port, b)) => {
                    let s = self.start(name, b, port);
                    self.sockets.insert(name.clone(), s);
                }
                Err(source) => {
                    let e = Error::Bind { service: name.to_string(), protocol: name.protocol, addr, source };
                    tracing::warn!(error = %e, cause = %e.source_text(), "service port not proxied");
                    bind_error.get_or_insert(e);
                }
            }
        }

        // Endpoint changes reach new connections at once; established ones keep their endpoint.
        for (name, s) in &self.sockets {
            if let Some(e) = table.get(name) {
                lock(&s.balancer).set(ready_endpoints(e), e.port.session_affinity);
            }
        }

        let (existing, read_kernel) = match (&self.installed, full) {
            (Some(i), false) => (i.clone(), false),
            _ => {
                self.installed = None;
                let save = restore::save(&mut self.runner)?;
                (parse_save(&save), true)
            }
        };
        let portals: Vec<Portal<'_>> = self
            .sockets
            .iter()
            .filter(|(n, _)| wanted.contains(n))
            .filter_map(|(name, s)| table.get(name).map(|entry| Portal { name, entry, proxy_port: s.port }))
            .collect();
        let r = render(&portals, &self.cfg, &existing);
        self.installed = None;
        restore::restore(&mut self.runner, r.text.as_bytes())?;
        self.installed = Some(r.installed);

        // Sockets of removed ports close only now that no rule sends traffic to them.
        self.sockets.retain(|n, _| wanted.contains(n));
        if let Some(e) = bind_error {
            return Err(e);
        }
        let stats = SyncStats {
            full: read_kernel,
            chains_written: 3,
            chains_deleted: r.chains_deleted,
            rules_written: r.rules,
            bytes: r.text.len(),
            duration: started.elapsed(),
        };
        tracing::debug!(sockets = self.sockets.len(), rules = stats.rules_written, full = stats.full, "userspace sync");
        Ok(stats)
    }
}

impl Error {
    fn source_text(&self) -> String {
        std::error::Error::source(self).map(|s| s.to_string()).unwrap_or_default()
    }
}

impl<R: Runner> Dataplane for UserspaceDataplane<R> {
    fn mode(&self) -> &'static str {
        "userspace"
    }

    fn describe(&self, port: &ServicePortName) -> Option<String> {
        self.sockets.get(port).map(|s| format!("proxy port {}", s.port))
    }

    /// Always renders every portal (one rule per address, cheap); a partial sync only skips `iptables-save`.
    fn sync(
        &mut self,
        table: &ServiceTable,
        changed: Option<&BTreeSet<ServicePortName>>,
    ) -> dataplane::Result<SyncStats> {
        Ok(self.sync_all(table, changed.is_none())?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Endpoint, ServicePort};

    fn ep(last: u8) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, last), 8080)
    }

    const C1: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 2);
    const C2: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 3);

    #[test]
    fn round_robin_uses_every_endpoint_in_turn() {
        let mut b = Balancer::new(vec![ep(1), ep(2), ep(3)], None);
        let now = Instant::now();
        let got: Vec<_> = (0..6).map(|_| b.pick(C1, now, &[]).unwrap()).collect();
        assert_eq!(got, [ep(1), ep(2), ep(3), ep(1), ep(2), ep(3)]);
    }

    #[test]
    fn failed_endpoint_is_skipped_and_none_left_means_none() {
        let mut b = Balancer::new(vec![ep(1), ep(2)], None);
        let now = Instant::now();
        assert_eq!(b.pick(C1, now, &[ep(1)]), Some(ep(2)));
        assert_eq!(b.pick(C1, now, &[ep(1), ep(2)]), None);
        assert_eq!(Balancer::new(vec![], None).pick(C1, now, &[]), None);
    }

    #[test]
    fn client_ip_affinity_holds_until_the_timeout() {
        let ttl = Duration::from_secs(10);
        let mut b = Balancer::new(vec![ep(1), ep(2)], Some(ttl));
        let t0 = Instant::now();
        let first = b.pick(C1, t0, &[]).unwrap();
        let other = b.pick(C2, t0, &[]).unwrap();
        assert_ne!(first, other, "a new client still gets the next endpoint");
        for i in 1..5 {
            assert_eq!(b.pick(C1, t0 + Duration::from_secs(9 * i), &[]), Some(first), "each use refreshes it");
        }
        // Idle longer than the timeout: the client is balanced again (next in turn is `first`'s neighbour).
        let later = t0 + Duration::from_secs(36 + 11);
        assert_eq!(b.pick(C1, later, &[]), Some(first));
        assert_eq!(b.pick(C1, later + Duration::from_secs(11), &[]), Some(other));
    }

    #[test]
    fn affinity_moves_off_a_failed_or_removed_endpoint() {
        let mut b = Balancer::new(vec![ep(1), ep(2)], Some(Duration::from_secs(60)));
        let now = Instant::now();
        assert_eq!(b.pick(C1, now, &[]), Some(ep(1)));
        assert_eq!(b.pick(C1, now, &[ep(1)]), Some(ep(2)), "failed connect: next endpoint");
        assert_eq!(b.pick(C1, now, &[]), Some(ep(2)), "and the client sticks to it");
        b.set(vec![ep(1), ep(3)], Some(Duration::from_secs(60)));
        assert_ne!(b.pick(C1, now, &[]), Some(ep(2)), "removed endpoint never chosen again");
    }

    #[test]
    fn unchanged_endpoints_keep_turn_and_affinity() {
        let mut b = Balancer::new(vec![ep(1), ep(2), ep(3)], Some(Duration::from_secs(60)));
        let now = Instant::now();
        assert_eq!(b.pick(C1, now, &[]), Some(ep(1)));
        b.set(vec![ep(1), ep(2), ep(3)], Some(Duration::from_secs(60)));
        assert_eq!(b.pick(C1, now, &[]), Some(ep(1)));
        assert_eq!(b.pick(C2, now, &[]), Some(ep(2)));
        b.set(vec![ep(1), ep(2), ep(3)], None);
        assert_eq!(b.pick(C1, now, &[]), Some(ep(3)), "affinity off: plain round robin");
    }

    fn entry(vip: [u8; 4], port: u16, eps: &[[u8; 4]]) -> ServiceEntry {
        ServiceEntry {
            port: ServicePort::cluster_ip(vip.into(), port),
            endpoints: eps.iter().map(|ip| Endpoint::ready((*ip).into(), 8080)).collect(),
        }
    }

    fn golden_table() -> Vec<(ServicePortName, ServiceEntry, u16)> {
        let mut web = entry([10, 96, 0, 20], 80, &[[10, 244, 1, 2], [10, 244, 2, 2]]);
        web.port.node_port = Some(30080);
        web.port.external_ips = vec![Ipv4Addr::new(80, 11, 12, 10)];
        web.port.load_balancer_ips = vec![Ipv4Addr::new(80, 11, 12, 20)];
        let mut sticky = entry([10, 96, 0, 21], 80, &[[10, 244, 1, 2]]);
        sticky.port.session_affinity = Some(Duration::from_secs(10800));
        let dns = entry([10, 96, 0, 10], 53, &[[10, 244, 2, 3]]);
        let mut empty = entry([10, 96, 0, 22], 80, &[]);
        empty.port.node_port = Some(30022);
        vec![
            (ServicePortName::new("default", "web", "http", Protocol::Tcp), web, 40001),
            (ServicePortName::new("default", "sticky", "", Protocol::Tcp), sticky, 40002),
            (ServicePortName::new("kube-system", "dns", "dns", Protocol::Udp), dns, 40003),
            (ServicePortName::new("default", "empty", "", Protocol::Tcp), empty, 40004),
        ]
    }

    fn portals(t: &[(ServicePortName, ServiceEntry, u16)]) -> Vec<Portal<'_>> {
        t.iter().map(|(name, entry, proxy_port)| Portal { name, entry, proxy_port: *proxy_port }).collect()
    }

    fn check_golden(name: &str, got: &str) {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata").join(name);
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::write(&path, got).unwrap();
        }
        let want = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (UPDATE_GOLDEN=1 writes it)", path.display()));
        assert_eq!(got, want, "{name} differs; UPDATE_GOLDEN=1 rewrites it, then review the diff");
    }

    /// What a node shows after an older layout: a stale chain of ours with its jump, our hooks, and
    /// someone else's chains (iptables mode's, Docker's) that must stay.
    const SAVE: &str = "# Generated by iptables-save
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:WEFT-PORTALS-CONTAINER - [0:0]
:WEFT-PORTALS-OLD - [0:0]
:WEFT-SERVICES - [0:0]
:DOCKER - [0:0]
-A PREROUTING -m comment --comment \"weft userspace portals\" -j WEFT-PORTALS-CONTAINER
-A PREROUTING -m comment --comment \"old\" -j WEFT-PORTALS-OLD
-A PREROUTING -m comment --comment \"weft service portals\" -j WEFT-SERVICES
-A OUTPUT -j DOCKER
-A WEFT-PORTALS-OLD -p tcp -j REDIRECT --to-ports 1234
COMMIT
*filter
:INPUT ACCEPT [0:0]
COMMIT
";

    #[test]
    fn golden_rules_redirect() {
        let t = golden_table();
        let r = render(&portals(&t), &Config::default(), &Existing::default());
        check_golden("userspace.golden", &r.text);
        assert_eq!(r.chains_deleted, 0);
    }

    #[test]
    fn golden_rules_listen_ip_and_sweep() {
        let t = golden_table();
        let cfg = Config {
            listen_ip: Ipv4Addr::new(192, 168, 77, 1),
            nodeport_addresses: vec!["192.168.77.0/24".parse().unwrap()],
            ..Config::default()
        };
        let existing = parse_save(SAVE);
        assert_eq!(existing.chains.len(), 2, "only WEFT-PORTALS- chains are ours: {existing:?}");
        let r = render(&portals(&t), &cfg, &existing);
        check_golden("userspace_listen_sweep.golden", &r.text);
        assert_eq!(r.chains_deleted, 1);
        assert!(!r.text.contains("-I PREROUTING"), "an existing hook is not inserted twice");
        assert!(!r.text.contains("WEFT-SERVICES") && !r.text.contains("DOCKER"));
    }

    #[test]
    fn cleanup_removes_hooks_then_chains() {
        let text = render_cleanup(&parse_save(SAVE));
        assert_eq!(
            text,
            "*nat
:WEFT-PORTALS-CONTAINER - [0:0]
:WEFT-PORTALS-OLD - [0:0]
-D PREROUTING -m comment --comment \"old\" -j WEFT-PORTALS-OLD
-D PREROUTING -m comment --comment \"weft userspace portals\" -j WEFT-PORTALS-CONTAINER
-X WEFT-PORTALS-CONTAINER
-X WEFT-PORTALS-OLD
COMMIT
"
        );
    }

    #[test]
    fn a_render_of_what_it_installed_inserts_nothing() {
        let t = golden_table();
        let first = render(&portals(&t), &Config::default(), &Existing::default());
        let again = render(&portals(&t), &Config::default(), &first.installed);
        assert!(!again.text.contains("-I ") && !again.text.contains("-X "), "{}", again.text);
        assert_eq!(again.rules, first.rules);
    }

    /// Records every tool run; fails `iptables-restore` while `fail` is set.
    #[derive(Clone, Default)]
    struct FakeRunner {
        calls: Arc<Mutex<Vec<String>>>,
        fail: Arc<std::sync::atomic::AtomicBool>,
    }

    impl Runner for FakeRunner {
        fn run(&mut self, program: &str, _: &[&str], _: Option<&[u8]>) -> crate::restore::Result<Vec<u8>> {
            lock(&self.calls).push(program.to_string());
            if program == "iptables-restore" && self.fail.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(crate::restore::Error::Failed {
                    program: program.into(),
                    status: "exit status: 2".into(),
                    stderr: "iptables-restore: line 7 failed".into(),
                });
            }
            Ok(vec![])
        }
    }

    fn chain(e: &dyn std::error::Error) -> String {
        let mut out = e.to_string();
        let mut cur = e.source();
        while let Some(c) = cur {
            out = format!("{out}: {c}");
            cur = c.source();
        }
        out
    }

    /// The daemon calls `sync` on its own current-thread runtime: sockets are opened there without waiting
    /// for the runtime (which would deadlock), and the relay works. Loopback only.
    #[tokio::test(flavor = "current_thread")]
    async fn sync_on_the_runtime_thread_binds_and_relays() {
        let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let backend = server.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = server.accept().await {
                let _ = tokio::io::AsyncWriteExt::write_all(&mut s, b"hello").await;
            }
        });
        let runner = FakeRunner::default();
        let cfg = Config { listen_ip: Ipv4Addr::LOCALHOST, ..Config::default() };
        let mut dp = UserspaceDataplane::new(runner.clone(), cfg, Handle::current());
        let mut e = entry([10, 96, 0, 20], 80, &[]);
        e.endpoints =
            vec![Endpoint { ip: Ipv4Addr::LOCALHOST, port: backend, node_name: None, is_local: true, ready: true }];
        let name = ServicePortName::new("default", "web", "", Protocol::Tcp);
        let table: ServiceTable = [(name.clone(), e)].into();
        let stats = dp.sync(&table, None).unwrap();
        assert!(stats.full && stats.rules_written == 2, "{stats:?}");
        let port = dp.sockets().next().unwrap().1;
        let mut c = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await.unwrap();
        let mut got = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut c, &mut got).await.unwrap();
        assert_eq!(got, "hello");

        // A partial sync trusts what it installed; a failed restore makes the next sync read the kernel again.
        dp.sync(&table, Some(&[name.clone()].into())).unwrap();
        assert_eq!(*lock(&runner.calls), ["iptables-save", "iptables-restore", "iptables-restore"]);
        runner.fail.store(true, std::sync::atomic::Ordering::Relaxed);
        let err = dp.sync(&table, Some(&BTreeSet::new())).unwrap_err();
        assert!(chain(&err).contains("line 7 failed"), "{}", chain(&err));
        runner.fail.store(false, std::sync::atomic::Ordering::Relaxed);
        lock(&runner.calls).clear();
        assert!(dp.sync(&table, Some(&BTreeSet::new())).unwrap().full);
        assert_eq!(*lock(&runner.calls), ["iptables-save", "iptables-restore"]);
        assert_eq!(dp.sockets().next().unwrap().1, port, "the socket outlives a failed sync");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_bind_failure_names_the_port_and_still_syncs_the_rules() {
        // TEST-NET-1 is on no interface here, so binding it fails with EADDRNOTAVAIL.
        let cfg = Config { listen_ip: Ipv4Addr::new(192, 0, 2, 1), ..Config::default() };
        let runner = FakeRunner::default();
        let mut dp = UserspaceDataplane::new(runner.clone(), cfg, Handle::current());
        let name = ServicePortName::new("default", "web", "http", Protocol::Udp);
        let table: ServiceTable = [(name, entry([10, 96, 0, 20], 53, &[[10, 244, 1, 2]]))].into();
        let err = dp.sync(&table, None).unwrap_err();
        let text = chain(&err);
        assert!(text.contains("UDP proxy socket of default/web:http on 192.0.2.1:0"), "{text}");
        assert!(text.contains("ddress"), "the OS cause is kept: {text}");
        assert_eq!(*lock(&runner.calls), ["iptables-save", "iptables-restore"], "the rules are still synced");
    }
}
