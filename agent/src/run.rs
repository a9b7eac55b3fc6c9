//! The agent's loop: lease a subnet, set up the backend, then keep the kernel equal to the leases
//! (watch events apply at once; a periodic resync re-reads the kernel so hand-made changes are
//! undone), renew the lease before it expires, and keep ip-masq rules in place. Stopping leaves
//! routes in place so pod traffic keeps flowing while the agent restarts.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use ipnetwork::Ipv4Network;
use tokio::time::{sleep, Instant};
use tracing::{error, info, warn};

use crate::config::{Backend, NetworkConfig};
use crate::healthz::{self, Health};
use crate::kernel::{self, keep_checksum_offload, vtep_mac, ChecksumOffload, Netlink, Underlay, VxlanSpec};
use crate::lease::{subnet_key, Lease, LeaseAttrs};
use crate::plan::{self, KernelState};
use crate::status::{Snapshot, StateCell};
use crate::subnet::{self, LeaseTable, LeaseWatch, SubnetManager, WatchEvent};
use crate::{ipmasq, subnet_env};

/// Everything `weft agent` is told on its command line.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    pub etcd: weft_api::EtcdArgs,
    pub prefix: String,
    pub iface: Option<String>,
    pub public_ip: Option<Ipv4Addr>,
    pub subnet_file: PathBuf,
    pub ip_masq: bool,
    pub renew_margin: Duration,
    pub iptables_resync: Duration,
    pub resync: Duration,
    pub healthz_addr: Option<SocketAddr>,
    pub lease_ttl: Duration,
    pub checksum_offload: ChecksumOffload,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("choosing the interface for node traffic: {0}")]
    Underlay(#[source] kernel::Error),
    #[error("opening netlink: {0}")]
    Netlink(#[source] kernel::Error),
    #[error("healthz on {addr}: {source}")]
    Healthz { addr: SocketAddr, source: std::io::Error },
}

/// Logs a dependency's state only when it changes, so an etcd outage is one line, not thousands.
#[derive(Default)]
struct StateLog {
    failing: Option<String>,
}

impl StateLog {
    fn failed(&mut self, what: &str, err: &dyn std::fmt::Display) {
        let msg = format!("{what}: {err}");
        if self.failing.as_deref() != Some(msg.as_str()) {
            warn!("{msg} (keeping the last known state, retrying)");
            self.failing = Some(msg);
        }
    }
    fn ok(&mut self, what: &str) {
        if self.failing.take().is_some() {
            info!("{what}: recovered");
        }
    }
}

fn backoff(attempt: u32) -> Duration {
    Duration::from_millis((200u64 << attempt.min(5)).min(5_000))
}

/// How this node reaches the others.
enum Dataplane {
    Vxlan { spec: VxlanSpec, ifindex: u32 },
    HostGw { ifindex: u32 },
}

struct Agent {
    opts: AgentOptions,
    nl: Netlink,
    underlay: Underlay,
    public_ip: Ipv4Addr,
    mgr: SubnetManager,
    cfg: NetworkConfig,
    attrs: LeaseAttrs,
    lease: Lease,
    dataplane: Dataplane,
    table: LeaseTable,
    /// What the last apply left in the kernel, as far as we know; a full resync re-reads it.
    applied: KernelState,
    etcd_log: StateLog,
    health: Health,
    state: StateCell,
}

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(opts: AgentOptions) -> Result<(), Error> {
    let nl = Netlink::new().map_err(Error::Netlink)?;
    let underlay = nl.find_underlay(opts.iface.as_deref()).await.map_err(Error::Underlay)?;
    let public_ip = opts.public_ip.unwrap_or(underlay.ip);
    info!(iface = %underlay.name, ip = %underlay.ip, %public_ip, mtu = underlay.mtu, "using interface");

    let health = Health::default();
    let state = StateCell::default();
    if let Some(addr) = opts.healthz_addr {
        let server = healthz::bind(addr, health.clone(), state.clone())
            .await
            .map_err(|source| Error::Healthz { addr, source })?;
        tokio::spawn(server);
    }

    let mut etcd_log = StateLog::default();
    let mut mgr = connect(&opts, &mut etcd_log).await;
    let cfg = load_config(&mut mgr, &opts.prefix).await;
    info!(network = %cfg.network, subnet_len = cfg.subnet_len, backend = cfg.backend.type_name(), "network config");

    let attrs = match cfg.backend {
        Backend::Vxlan { vni, .. } => LeaseAttrs::vxlan(public_ip, vni, vtep_mac(public_ip, vni)),
        Backend::HostGw => LeaseAttrs::host_gw(public_ip),
    };
    let previous = subnet_env::SubnetEnv::read(&opts.subnet_file).ok().map(|e| e.subnet);
    let lease = acquire(&mut mgr, &cfg, &attrs, previous, opts.lease_ttl, &mut etcd_log).await;
    info!(subnet = %lease.subnet, reservation = lease.is_reservation(), "leased subnet");

    let dataplane = setup_dataplane(&nl, &cfg, &underlay, public_ip, lease.subnet, opts.checksum_offload).await;
    let mut agent = Agent {
        opts,
        nl,
        underlay,
        public_ip,
        mgr,
        cfg,
        attrs,
        lease,
        dataplane,
        table: LeaseTable::default(),
        applied: KernelState::default(),
        etcd_log,
        health,
        state,
    };
    agent.write_subnet_file();
    agent.sync_masq();
    agent.main_loop().await;
    info!("stopping; routes stay in place");
    Ok(())
}

async fn connect(opts: &AgentOptions, log: &mut StateLog) -> SubnetManager {
    let mut attempt = 0;
    loop {
        match weft_api::connect(&opts.etcd).await {
            Ok(c) => {
                log.ok("etcd");
                return SubnetManager::new(c, &opts.prefix);
            }
            Err(e) => log.failed("etcd", &e),
        }
        sleep(backoff(attempt)).await;
        attempt += 1;
    }
}

/// Waits for a valid config: a missing or invalid key is logged (once per distinct problem) and retried.
async fn load_config(mgr: &mut SubnetManager, prefix: &str) -> NetworkConfig {
    let mut log = StateLog::default();
    loop {
        match mgr.get_config().await {
            Ok(cfg) => {
                log.ok("network config");
                return cfg;
            }
            Err(e) => log.failed(&format!("network config {}", crate::lease::config_key(prefix)), &e),
        }
        sleep(Duration::from_secs(1)).await;
    }
}

async fn acquire(
    mgr: &mut SubnetManager,
    cfg: &NetworkConfig,
    attrs: &LeaseAttrs,
    previous: Option<Ipv4Network>,
    ttl: Duration,
    log: &mut StateLog,
) -> Lease {
    let mut attempt = 0;
    loop {
        match mgr.acquire(cfg, attrs, previous, ttl).await {
            Ok(lease) => {
                log.ok("acquiring a subnet lease");
                return lease;
            }
            Err(e) => log.failed("acquiring a subnet lease", &e),
        }
        sleep(backoff(attempt)).await;
        attempt += 1;
    }
}

/// Creates the backend's kernel side; retries until it works (the cause is logged once).
async fn setup_dataplane(
    nl: &Netlink,
    cfg: &NetworkConfig,
    underlay: &Underlay,
    public_ip: Ipv4Addr,
    subnet: Ipv4Network,
    offload: ChecksumOffload,
) -> Dataplane {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let keep = keep_checksum_offload(offload, release.trim(), public_ip, underlay.ip);
    if matches!(cfg.backend, Backend::Vxlan { .. }) {
        info!(kernel = release.trim(), mode = ?offload, keep, "VXLAN TX checksum offload");
    }
    let mut log = StateLog::default();
    loop {
        let r = match cfg.backend {
            Backend::Vxlan { vni, port } => {
                let spec = VxlanSpec {
                    mac: vtep_mac(public_ip, vni),
                    tx_checksum_offload: keep,
                    ..VxlanSpec::new(underlay, vni, port, subnet)
                };
                nl.ensure_vxlan(&spec).await.map(|ifindex| Dataplane::Vxlan { spec, ifindex })
            }
            Backend::HostGw => Ok(Dataplane::HostGw { ifindex: underlay.ifindex }),
        };
        match r {
            Ok(d) => {
                log.ok("backend device");
                return d;
            }
            Err(e) => log.failed("backend device", &e),
        }
        sleep(Duration::from_secs(1)).await;
    }
}

impl Agent {
    fn mtu(&self) -> u32 {
        match &self.dataplane {
            Dataplane::Vxlan { spec, .. } => spec.mtu,
            Dataplane::HostGw { .. } => self.underlay.mtu,
        }
    }

    fn write_subnet_file(&self) {
        let env = subnet_env::SubnetEnv {
            network: self.cfg.network,
            subnet: self.lease.subnet,
            mtu: self.mtu(),
            ipmasq: self.opts.ip_masq,
        };
        if let Err(e) = env.write_atomic(&self.opts.subnet_file) {
            error!("writing {}: {e}", self.opts.subnet_file.display());
        }
    }

    fn sync_masq(&self) {
        let r = if self.opts.ip_masq {
            ipmasq::ensure(self.cfg.network, self.lease.subnet).map(|changed| {
                if changed {
                    info!("ip-masq rules (re)installed");
                }
            })
        } else {
            Ok(())
        };
        if let Err(e) = r {
            warn!("ip-masq: {e}");
        }
    }

    /// Desired kernel objects for these (valid) leases.
    fn desired(&self, leases: &[Lease]) -> KernelState {
        match &self.dataplane {
            Dataplane::Vxlan { spec, ifindex } => plan::desired_vxlan(self.lease.subnet, spec.vni, *ifindex, leases),
            Dataplane::HostGw { ifindex } => plan::desired_host_gw(self.lease.subnet, *ifindex, leases),
        }
    }

    /// Makes the kernel match the leases. `full` re-reads the kernel (and re-creates the device if it
    /// vanished) instead of trusting what the last apply left.
    async fn reconcile(&mut self, full: bool) {
        let leases = self.table.valid(&self.cfg);
        self.reconcile_with(full, &leases).await;
    }

    /// `reconcile` with the valid leases already at hand (validating is O(leases), once per batch).
    async fn reconcile_with(&mut self, full: bool, leases: &[Lease]) {
        if full {
            if let Dataplane::Vxlan { spec, ifindex } = &mut self.dataplane {
                match self.nl.ensure_vxlan(spec).await {
                    Ok(i) => {
                        if i != *ifindex {
                            warn!(device = %format!("flannel.{}", spec.vni), "VXLAN device was re-created");
                            *ifindex = i;
                        }
                    }
                    Err(e) => warn!("VXLAN device: {e}"),
                }
            }
        }
        let desired = self.desired(leases);
        let observed = if full {
            let r = match &self.dataplane {
                Dataplane::Vxlan { ifindex, .. } => self.nl.observe_vxlan(*ifindex).await,
                Dataplane::HostGw { ifindex } => {
                    self.nl.observe_host_gw(*ifindex, self.cfg.network, self.lease.subnet).await
                }
            };
            match r {
                Ok(s) => s,
                Err(e) => {
                    warn!("reading the kernel's routes: {e}");
                    return;
                }
            }
        } else {
            self.applied.clone()
        };
        let ops = plan::diff(&desired, &observed);
        if !ops.is_empty() {
            let failures = self.nl.apply(&ops).await;
            for (op, e) in &failures {
                warn!("{op}: {e}");
            }
            tracing::debug!(ops = ops.len(), failed = failures.len(), full, "kernel synced");
        }
        self.applied = desired;
        self.publish_state(leases);
        self.health.set_ready(true);
    }

    /// Hands `/state` what was just applied (only when the health server runs).
    fn publish_state(&self, leases: &[Lease]) {
        if self.opts.healthz_addr.is_none() {
            return;
        }
        let device = match &self.dataplane {
            Dataplane::Vxlan { spec, .. } => format!("flannel.{}", spec.vni),
            Dataplane::HostGw { .. } => self.underlay.name.clone(),
        };
        self.state.publish(Snapshot {
            prefix: self.opts.prefix.clone(),
            config: self.cfg,
            subnet: self.lease.subnet,
            public_ip: self.public_ip,
            device,
            mtu: self.mtu(),
            leases: leases.to_vec(),
            programmed: self.applied.clone(),
        });
    }

    /// Lists the leases and starts a watch after them; None while etcd is unreachable.
    async fn relist(&mut self) -> Option<LeaseWatch> {
        let (table, rev) = match self.mgr.list().await {
            Ok(x) => x,
            Err(e) => {
                self.etcd_log.failed("etcd", &e);
                return None;
            }
        };
        let watch = match self.mgr.watch(rev + 1).await {
            Ok(w) => w,
            Err(e) => {
                self.etcd_log.failed("etcd", &e);
                return None;
            }
        };
        self.etcd_log.ok("etcd");
        self.table = table;
        self.reacquire_if_lost_then_reconcile().await;
        Some(watch)
    }

    fn holds_own_lease(&self, leases: &[Lease]) -> bool {
        leases.iter().any(|l| l.subnet == self.lease.subnet && l.attrs.public_ip == self.public_ip)
    }

    /// Level-triggered: whether our key was deleted, expired or overwritten, the valid leases no longer
    /// show ours, and we take one again before programming the kernel.
    async fn reacquire_if_lost_then_reconcile(&mut self) {
        let leases = self.table.valid(&self.cfg);
        if self.holds_own_lease(&leases) {
            self.reconcile_with(false, &leases).await;
        } else {
            self.reacquire().await;
            self.reconcile(false).await;
        }
    }

    /// Our lease vanished (deleted by hand, or expired while etcd was away): take a subnet again,
    /// preferring the same one, and re-address everything if it changed.
    async fn reacquire(&mut self) {
        warn!(subnet = %self.lease.subnet, "our lease is gone; acquiring again");
        let old = self.lease.subnet;
        self.lease =
            acquire(&mut self.mgr, &self.cfg, &self.attrs, Some(old), self.opts.lease_ttl, &mut self.etcd_log).await;
        // Our own write comes back through the watch too; until then the table must already know it.
        let l = &self.lease;
        let key = subnet_key(&self.opts.prefix, l.subnet);
        self.table.apply_put(&key, l.attrs.to_json().as_bytes(), l.etcd_lease, l.mod_revision, l.create_revision);
        if self.lease.subnet != old {
            warn!(old = %old, new = %self.lease.subnet, "subnet changed; pods on this node need new addresses");
            if let Dataplane::Vxlan { spec, .. } = &mut self.dataplane {
                spec.address = self.lease.subnet.network();
            }
            self.write_subnet_file();
            self.sync_masq();
            self.reconcile(true).await;
        }
        info!(subnet = %self.lease.subnet, "leased subnet");
    }

    fn renew_at(&self) -> Instant {
        let ttl = self.opts.lease_ttl;
        let wait = if self.opts.renew_margin < ttl { ttl - self.opts.renew_margin } else { ttl / 2 };
        Instant::now() + wait
    }

    async fn main_loop(&mut self) {
        let mut watch = self.relist().await;
        self.reconcile(true).await;
        let mut resync = tokio::time::interval(self.opts.resync);
        let mut masq = tokio::time::interval(self.opts.iptables_resync);
        let mut retry = tokio::time::interval(Duration::from_secs(1));
        let mut attempt = 0u32;
        let mut next_retry = Instant::now();
        let mut renew_at = self.renew_at();
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                error!("installing the SIGTERM handler: {e}");
                return;
            }
        };
        loop {
            tokio::select! {
                ev = next(&mut watch) => match ev {
                    Ok(events) => self.on_events(events).await,
                    Err(subnet::Error::Compacted { .. }) => {
                        info!("watch revision compacted; relisting");
                        watch = self.relist().await;
                    }
                    Err(e) => {
                        self.etcd_log.failed("etcd", &e);
                        watch = None;
                        next_retry = Instant::now() + backoff(attempt);
                    }
                },
                _ = retry.tick(), if watch.is_none() => {
                    if Instant::now() >= next_retry {
                        watch = self.relist().await;
                        attempt = if watch.is_some() { 0 } else { attempt + 1 };
                        next_retry = Instant::now() + backoff(attempt);
                        if watch.is_some() {
                            self.reconcile(true).await;
                        }
                    }
                }
                _ = resync.tick() => self.reconcile(true).await,
                _ = masq.tick() => self.sync_masq(),
                _ = tokio::time::sleep_until(renew_at) => {
                    renew_at = self.renew().await;
                }
                _ = term.recv() => return,
                _ = tokio::signal::ctrl_c() => return,
            }
        }
    }

    async fn on_events(&mut self, events: Vec<WatchEvent>) {
        for ev in &events {
            self.table.apply(ev);
        }
        self.reacquire_if_lost_then_reconcile().await;
    }

    /// Renews the lease; returns when to renew next (sooner after a failure).
    async fn renew(&mut self) -> Instant {
        if self.lease.is_reservation() {
            return Instant::now() + self.opts.lease_ttl;
        }
        match self.mgr.renew(&self.lease, &self.attrs, self.opts.lease_ttl).await {
            Ok(l) => {
                info!(subnet = %l.subnet, "lease renewed");
                self.lease = l;
                self.renew_at()
            }
            Err(subnet::Error::LeaseLost { .. }) => {
                self.reacquire().await;
                self.renew_at()
            }
            Err(e) => {
                self.etcd_log.failed("renewing the lease", &e);
                Instant::now() + Duration::from_secs(10)
            }
        }
    }
}

/// The next watch batch, or never while there is no watch.
async fn next(watch: &mut Option<LeaseWatch>) -> subnet::Result<Vec<WatchEvent>> {
    match watch {
        Some(w) => w.next().await,
        None => std::future::pending().await,
    }
}
