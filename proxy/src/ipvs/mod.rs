//! ipvs mode: kube-proxy's IPVS design with our names. A sync observes the kernel (IPVS over generic
//! netlink, `weft-ipvs0` over rtnetlink), plans (`plan`, pure), then writes in a safe order: ipsets in
//! one `ipset restore`, the constant iptables rules, addresses, then virtual and real servers.
//! It touches IPVS, the `weft-ipvs0` link, the `WEFT-*` ipsets and `WEFT-IPVS-*` chains, IPVS sysctls.

pub mod link;
pub mod netlink;
pub mod plan;
pub mod rules;

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use ipnetwork::Ipv4Network;

use crate::conntrack::StaleUdpFlows;
use crate::dataplane::{self, Dataplane, SyncStats};
use crate::iptables::{CommandRunner, Runner};
use crate::model::{ServicePortName, ServiceTable};

use self::link::{RtSocket, DUMMY};
use self::netlink::{request, IpvsSocket, RealServer, Timeouts, VsKey};
use self::plan::{Index, Observed, Op, PlanConfig, Scheduler, Terminating, Touched};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}: {source}")]
    Ipvs {
        /// The change or read that failed, naming the service port and virtual server.
        what: String,
        #[source]
        source: netlink::Error,
    },
    #[error(transparent)]
    Link(#[from] link::Error),
    #[error(transparent)]
    Tool(#[from] crate::iptables::Error),
    #[error("writing sysctl {path}: {source}")]
    Sysctl {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn ipvs_err(what: impl Into<String>) -> impl FnOnce(netlink::Error) -> Error {
    let what = what.into();
    move |source| Error::Ipvs { what, source }
}

/// Node-wide settings of ipvs mode (kube-proxy's `--ipvs-*` flags and the shared ones).
#[derive(Debug, Clone)]
pub struct Config {
    pub scheduler: Scheduler,
    pub cluster_cidr: Option<Ipv4Network>,
    pub nodeport_addresses: Vec<Ipv4Network>,
    pub masquerade_bit: u8,
    /// `--ipvs-strict-arp`: arp_ignore=1, arp_announce=2, so the node does not answer ARP for service
    /// addresses on the dummy interface.
    pub strict_arp: bool,
    /// `--ipvs-tcp-timeout`, `--ipvs-tcpfin-timeout`, `--ipvs-udp-timeout` (0: leave the kernel's).
    pub timeouts: Timeouts,
    /// How long a removed TCP real server drains at weight 0 before it is deleted anyway.
    pub graceful_period: Duration,
    /// Where the sysctls live (`/proc/sys`; a directory in tests).
    pub proc_sys: std::path::PathBuf,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            scheduler: Scheduler::Rr,
            cluster_cidr: None,
            nodeport_addresses: vec![],
            masquerade_bit: 14,
            strict_arp: false,
            timeouts: Timeouts::default(),
            graceful_period: PlanConfig::default().graceful_period,
            proc_sys: "/proc/sys".into(),
        }
    }
}

/// The sysctls ipvs mode needs in the node's namespace, as (path under /proc/sys, value). `kernel` is
/// (major, minor): before 5.9, `conn_reuse_mode=1` delayed reused connections by a second, so kube-proxy
/// sets 0 there; later kernels keep 1, which also sends a reused port to a live real server.
pub fn sysctls(strict_arp: bool, kernel: (u32, u32)) -> Vec<(&'static str, &'static str)> {
    let mut v = vec![
        // IPVS-NATed packets go through conntrack, so the masquerade rules see them.
        ("net/ipv4/vs/conntrack", "1"),
        ("net/ipv4/vs/conn_reuse_mode", if kernel < (5, 9) { "0" } else { "1" }),
        // Connections to a deleted real server are dropped at once (UDP: no black hole during a rollout).
        ("net/ipv4/vs/expire_nodest_conn", "1"),
        ("net/ipv4/vs/expire_quiescent_template", "1"),
    ];
    if strict_arp {
        v.push(("net/ipv4/conf/all/arp_ignore", "1"));
        v.push(("net/ipv4/conf/all/arp_announce", "2"));
    }
    v
}

fn kernel_version(proc_sys: &std::path::Path) -> (u32, u32) {
    let release = std::fs::read_to_string(proc_sys.join("kernel/osrelease")).unwrap_or_default();
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit()).filter_map(|p| p.parse().ok());
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

/// The ipvs dataplane.
pub struct IpvsDataplane<R: Runner = CommandRunner> {
    runner: R,
    cfg: Config,
    ipvs: Option<IpvsSocket>,
    rt: Option<RtSocket>,
    /// The kernel as last observed and changed by us; None forces the next sync to observe it again.
    observed: Option<Observed>,
    dummy_index: u32,
    terminating: Terminating,
    /// The ipset members last written (None: rewrite every set).
    sets: Option<BTreeMap<&'static str, BTreeSet<String>>>,
    /// The desired state of the last sync, per service port (None: rebuild it on a full sync).
    index: Option<Index>,
    /// The addresses NodePorts listen on, as of the last full sync.
    node_addrs: Vec<Ipv4Addr>,
    configured: bool,
    /// UDP flows NATed through conntrack (`net/ipv4/vs/conntrack=1`) outlive a removed real server.
    stale_udp: StaleUdpFlows,
}

impl<R: Runner> IpvsDataplane<R> {
    pub fn new(runner: R, cfg: Config) -> Self {
        IpvsDataplane {
            runner,
            cfg,
            ipvs: None,
            rt: None,
            observed: None,
            dummy_index: 0,
            terminating: Terminating::new(),
            sets: None,
            index: None,
            node_addrs: vec![],
            configured: false,
            stale_udp: StaleUdpFlows::default(),
        }
    }

    fn plan_cfg(&self) -> PlanConfig {
        PlanConfig { scheduler: self.cfg.scheduler, graceful_period: self.cfg.graceful_period }
    }

    fn sockets(&mut self) -> Result<(&mut IpvsSocket, &mut RtSocket)> {
        let ipvs = match self.ipvs.take() {
            Some(s) => s,
            None => IpvsSocket::connect().map_err(ipvs_err("connecting to IPVS"))?,
        };
        let rt = match self.rt.take() {
            Some(s) => s,
            None => RtSocket::connect()?,
        };
        Ok((self.ipvs.insert(ipvs), self.rt.insert(rt)))
    }

    /// Once per process: sysctls and IPVS timeouts.
    fn configure(&mut self) -> Result<()> {
        for (path, value) in sysctls(self.cfg.strict_arp, kernel_version(&self.cfg.proc_sys)) {
            let full = self.cfg.proc_sys.join(path);
            std::fs::write(&full, value)
                .map_err(|source| Error::Sysctl { path: full.display().to_string(), source })?;
        }
        let t = self.cfg.timeouts;
        if t != Timeouts::default() {
            let (ipvs, _) = self.sockets()?;
            ipvs.request(request::set_config(&t)).map_err(ipvs_err("setting IPVS timeouts"))?;
        }
        self.configured = true;
        Ok(())
    }

    /// Reads everything ipvs mode may own from the kernel.
    fn observe(&mut self) -> Result<Observed> {
        let (ipvs, rt) = self.sockets()?;
        let index = rt.ensure_dummy(DUMMY)?;
        let all = rt.addresses()?;
        let (addresses, others) = link::split_addresses(&all, Some(index));
        let mut o = Observed { addresses, node_addresses: others.into_iter().collect(), ..Observed::default() };
        for vs in ipvs.services().map_err(ipvs_err("listing virtual servers"))? {
            let dests = ipvs.dests(&vs.key).map_err(ipvs_err(format!("listing real servers of {}", vs.key)))?;
            o.services.insert(vs.key, (vs, dests));
        }
        self.dummy_index = index;
        Ok(o)
    }

    /// Fresh connection counts for the real servers still draining.
    fn refresh_draining(&mut self, observed: &mut Observed) -> Result<()> {
        let keys: BTreeSet<VsKey> = self.terminating.keys().map(|(k, _, _)| *k).collect();
        if keys.is_empty() {
            return Ok(());
        }
        let (ipvs, _) = self.sockets()?;
        for key in keys {
            if let Some((_, dests)) = observed.services.get_mut(&key) {
                *dests = ipvs.dests(&key).map_err(ipvs_err(format!("listing real servers of {key}")))?;
            }
        }
        Ok(())
    }

    fn write_rules(&mut self) -> Result<()> {
        let save = self.runner.run("iptables-save", &[], None)?;
        let cfg = rules::RuleConfig { cluster_cidr: self.cfg.cluster_cidr, masquerade_bit: self.cfg.masquerade_bit };
        let text = rules::render_rules(&cfg, &String::from_utf8_lossy(&save));
        self.runner.run("iptables-restore", &["-w", "5", "--noflush"], Some(text.as_bytes()))?;
        Ok(())
    }

    /// Refills every ipset (through its twin) in one `ipset restore`.
    fn write_sets(&mut self, want: BTreeMap<&'static str, BTreeSet<String>>) -> Result<usize> {
        let text = rules::render_ipsets(&want);
        self.sets = None;
        self.runner.run("ipset", &["restore"], Some(text.as_bytes()))?;
        self.sets = Some(want);
        Ok(text.len())
    }

    /// Adds and deletes the touched members that changed, in one `ipset restore`.
    fn update_sets(&mut self, index: &Index, touched: &Touched) -> Result<usize> {
        let Some(mut sets) = self.sets.take() else { return Ok(0) };
        let (mut have, mut want) = (BTreeMap::new(), BTreeMap::new());
        for m in &touched.members {
            let (set, member) = m;
            let is = sets.get(set).is_some_and(|s| s.contains(member));
            let should = index.has_member(m);
            if is != should {
                let (target, other) = if should { (&mut want, &mut have) } else { (&mut have, &mut want) };
                target.entry(*set).or_insert_with(BTreeSet::new).insert(member.clone());
                other.entry(*set).or_insert_with(BTreeSet::new);
                let s = sets.entry(*set).or_default();
                if should {
                    s.insert(member.clone());
                } else {
                    s.remove(member);
                }
            }
        }
        let text = rules::render_ipset_changes(&have, &want);
        if !text.is_empty() {
            self.runner.run("ipset", &["restore"], Some(text.as_bytes()))?;
        }
        self.sets = Some(sets);
        Ok(text.len())
    }

    fn apply(&mut self, ops: &[Op], observed: &mut Observed) -> Result<()> {
        let index = self.dummy_index;
        let (ipvs, rt) = self.sockets()?;
        for op in ops {
            match op {
                Op::AddAddress(_) | Op::AddService { .. } | Op::AddDest { .. } => tracing::debug!(%op, "ipvs"),
                _ => tracing::info!(%op, "ipvs"),
            }
        }
        // Addresses first, then every IPVS change in order (batched: a big first sync is a few hundred
        // system calls, not one round trip per real server), then the addresses that go.
        let addrs = |add: bool| -> Vec<Ipv4Addr> {
            ops.iter()
                .filter_map(|o| match o {
                    Op::AddAddress(ip) if add => Some(*ip),
                    Op::DelAddress(ip) if !add => Some(*ip),
                    _ => None,
                })
                .collect()
        };
        let adds = addrs(true);
        if !adds.is_empty() {
            rt.addresses_batch(index, &adds, true)?;
            observed.addresses.extend(adds);
        }
        let vs_ops: Vec<&Op> = ops.iter().filter(|o| !matches!(o, Op::AddAddress(_) | Op::DelAddress(_))).collect();
        let msgs: Vec<netlink::IpvsMessage> = vs_ops.iter().filter_map(|op| message(op)).collect();
        let results = ipvs.batch(&msgs).map_err(ipvs_err("applying IPVS changes"))?;
        let mut first_err = None;
        for (op, r) in vs_ops.into_iter().zip(results) {
            match r {
                Ok(()) => record(observed, op),
                Err(e) if matches!(op, Op::DelDest { .. } | Op::DelService { .. }) && e.is_not_found() => {
                    record(observed, op)
                }
                Err(e) => {
                    if first_err.is_none() {
                        first_err = Some(ipvs_err(op.to_string())(e));
                    }
                }
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        let dels = addrs(false);
        if !dels.is_empty() {
            rt.addresses_batch(index, &dels, false)?;
            for ip in &dels {
                observed.addresses.remove(ip);
            }
        }
        Ok(())
    }

    fn sync_inner(&mut self, table: &ServiceTable, changed: Option<&BTreeSet<ServicePortName>>) -> Result<SyncStats> {
        let started = Instant::now();
        let cfg = self.plan_cfg();
        if !self.configured {
            self.sockets()?;
            self.configure()?;
        }
        let partial = match (changed, self.observed.take(), self.index.take()) {
            (Some(c), Some(o), Some(i)) => Some((c, o, i)),
            _ => None,
        };
        let full = partial.is_none();
        let (ops, still, index, mut observed, bytes) = match partial {
            Some((changed, mut observed, mut index)) => {
                let mut touched = Touched::default();
                for spn in changed {
                    let plan = table.get(spn).map(|e| plan::port_plan(spn, e, &self.node_addrs, &cfg));
                    index.set(spn, plan, &mut touched);
                }
                self.refresh_draining(&mut observed)?;
                let bytes = self.update_sets(&index, &touched)?;
                let (ops, still) =
                    plan::diff_touched(&index, &touched, &observed, &self.terminating, Instant::now(), &cfg);
                (ops, still, index, observed, bytes)
            }
            None => {
                self.sets = None;
                let observed = self.observe()?;
                let local: Vec<Ipv4Addr> = observed.node_addresses.iter().copied().collect();
                self.node_addrs = plan::nodeport_addresses(&local, &self.cfg.nodeport_addresses, &observed.addresses);
                let index = Index::build(table, &self.node_addrs, &cfg);
                let mut desired = index.desired();
                let bytes = self.write_sets(std::mem::take(&mut desired.ipsets))?;
                // The rules name the sets, so they follow them; both precede every virtual server, so no
                // service is ever served before its masquerade rules exist (kube-proxy's first-sync race).
                self.write_rules()?;
                let (ops, still) = plan::diff(&desired, &observed, &self.terminating, Instant::now(), &cfg);
                (ops, still, index, observed, bytes)
            }
        };
        self.apply(&ops, &mut observed)?;
        self.terminating = still;
        self.observed = Some(observed);
        self.index = Some(index);
        let deleted = ops.iter().filter(|o| matches!(o, Op::DelService { .. })).count();
        tracing::debug!(full, ops = ops.len(), draining = self.terminating.len(), "ipvs sync");
        Ok(SyncStats {
            full,
            chains_written: ops
                .iter()
                .filter(|o| matches!(o, Op::AddService { .. } | Op::UpdateService { .. }))
                .count(),
            chains_deleted: deleted,
            rules_written: ops.len(),
            bytes,
            duration: started.elapsed(),
        })
    }
}

/// The IPVS request an op needs (None for address ops).
fn message(op: &Op) -> Option<netlink::IpvsMessage> {
    Some(match op {
        Op::AddService { vs, .. } => request::new_service(vs),
        Op::UpdateService { vs, .. } => request::set_service(vs),
        Op::DelService { key, .. } => request::del_service(key),
        Op::AddDest { key, rs, .. } => request::new_dest(key, rs),
        Op::UpdateDest { key, rs, .. } => request::set_dest(key, rs),
        Op::DelDest { key, rs, .. } => request::del_dest(key, rs),
        Op::AddAddress(_) | Op::DelAddress(_) => return None,
    })
}

/// Keeps the cached kernel state in step with an op the kernel accepted.
fn record(observed: &mut Observed, op: &Op) {
    match op {
        Op::AddService { vs, .. } => {
            observed.services.insert(vs.key, (vs.clone(), vec![]));
        }
        Op::UpdateService { vs, .. } => {
            if let Some(e) = observed.services.get_mut(&vs.key) {
                e.0 = vs.clone();
            }
        }
        Op::DelService { key, .. } => {
            observed.services.remove(key);
        }
        Op::AddDest { key, rs, .. } => {
            if let Some(e) = observed.services.get_mut(key) {
                e.1.push(rs.clone());
            }
        }
        Op::UpdateDest { key, rs, .. } => {
            if let Some(r) = observed
                .services
                .get_mut(key)
                .and_then(|e| e.1.iter_mut().find(|r| r.addr == rs.addr && r.port == rs.port))
            {
                r.weight = rs.weight;
            }
        }
        Op::DelDest { key, rs, .. } => {
            if let Some(e) = observed.services.get_mut(key) {
                e.1.retain(|r| !(r.addr == rs.addr && r.port == rs.port));
            }
        }
        Op::AddAddress(ip) => {
            observed.addresses.insert(*ip);
        }
        Op::DelAddress(ip) => {
            observed.addresses.remove(ip);
        }
    }
}

fn real_text(r: &RealServer) -> String {
    format!("{}:{} w{} active {} inactive {}", r.addr, r.port, r.weight, r.active_conns, r.inactive_conns)
}

impl<R: Runner> Dataplane for IpvsDataplane<R> {
    fn mode(&self) -> &'static str {
        "ipvs"
    }

    /// Its virtual servers with how many real servers serve and drain (the kernel's full view, with
    /// connection counts, is `weft services` reading IPVS itself).
    fn describe(&self, port: &ServicePortName) -> Option<String> {
        let (plan, observed) = (self.index.as_ref()?.port(port)?, self.observed.as_ref()?);
        let parts: Vec<String> = plan
            .services
            .iter()
            .map(|d| {
                let rs = observed.services.get(&d.vs.key).map(|(_, rs)| rs.as_slice()).unwrap_or(&[]);
                let draining = rs.iter().filter(|r| r.weight == 0).count();
                let mut t = format!("{} {} {} real", d.vs.key, d.vs.scheduler, rs.len() - draining);
                if draining > 0 {
                    t.push_str(&format!(" ({draining} draining)"));
                }
                t
            })
            .collect();
        Some(parts.join("; "))
    }

    fn sync(
        &mut self,
        table: &ServiceTable,
        changed: Option<&BTreeSet<ServicePortName>>,
    ) -> dataplane::Result<SyncStats> {
        let r = self.sync_inner(table, changed);
        if r.is_ok() {
            self.stale_udp.clear(&mut self.runner, table);
        }
        if r.is_err() {
            // Observe everything again next time (the proxier also asks for a full sync after a failure).
            self.observed = None;
            self.sets = None;
            self.index = None;
        }
        Ok(r?)
    }
}

/// Removes everything ipvs mode leaves in this namespace (for a node switched to another mode):
/// virtual servers on our dummy interface's addresses and on node addresses, the dummy interface, our
/// chains and our ipsets. Best effort: what cannot be read (no IPVS, no ipset tool) has nothing of ours.
pub fn cleanup_leftovers<R: Runner>(runner: &mut R) -> Vec<String> {
    let mut done = Vec::new();
    if let Ok(save) = runner.run("iptables-save", &[], None) {
        if let Some(text) = rules::render_cleanup(&String::from_utf8_lossy(&save)) {
            match runner.run("iptables-restore", &["-w", "5", "--noflush"], Some(text.as_bytes())) {
                Ok(_) => done.push("ipvs-mode chains".to_string()),
                Err(e) => tracing::warn!("removing ipvs-mode chains: {e}"),
            }
        }
    }
    let Ok(mut rt) = RtSocket::connect() else { return done };
    let index = rt.link_index(DUMMY).ok().flatten();
    let all = rt.addresses().unwrap_or_default();
    let (on_dummy, others) = link::split_addresses(&all, index);
    if let Ok(mut ipvs) = IpvsSocket::connect() {
        for vs in ipvs.services().unwrap_or_default() {
            if on_dummy.contains(&vs.key.addr) || others.contains(&vs.key.addr) {
                match ipvs.request(request::del_service(&vs.key)) {
                    Ok(_) => done.push(format!("virtual server {}", vs.key)),
                    Err(e) => tracing::warn!("removing virtual server {}: {e}", vs.key),
                }
            }
        }
    }
    if let Some(i) = index {
        match rt.delete_link(i, DUMMY) {
            Ok(()) => done.push(format!("link {DUMMY}")),
            Err(e) => tracing::warn!("{e}"),
        }
    }
    if let Ok(list) = runner.run("ipset", &["list", "-n"], None) {
        let text = rules::render_ipset_destroy(&String::from_utf8_lossy(&list));
        if !text.is_empty() {
            match runner.run("ipset", &["restore"], Some(text.as_bytes())) {
                Ok(_) => done.push("ipsets".to_string()),
                Err(e) => tracing::warn!("removing ipvs-mode ipsets: {e}"),
            }
        }
    }
    done
}

/// `weft services` in ipvs mode: the kernel's virtual and real servers (as `ipvsadm -Ln` shows them) and
/// the sysctls ipvs mode sets, read live from this namespace.
pub fn report() -> Result<String> {
    let mut ipvs = IpvsSocket::connect().map_err(ipvs_err("connecting to IPVS"))?;
    let mut out = String::new();
    let (version, size) = ipvs.info().map_err(ipvs_err("reading IPVS info"))?;
    out.push_str(&format!(
        "IPVS {}.{}.{} (connection table size {size})\n",
        version >> 16,
        (version >> 8) & 0xff,
        version & 0xff
    ));
    let mut services = ipvs.services().map_err(ipvs_err("listing virtual servers"))?;
    services.sort_by_key(|v| v.key);
    for vs in services {
        let persist = if vs.flags & netlink::SVC_F_PERSISTENT != 0 {
            format!(" persistent {}", vs.timeout)
        } else {
            String::new()
        };
        out.push_str(&format!("{} {}{persist}\n", vs.key, vs.scheduler));
        for r in ipvs.dests(&vs.key).map_err(ipvs_err(format!("listing real servers of {}", vs.key)))? {
            out.push_str(&format!("  -> {}\n", real_text(&r)));
        }
    }
    let t = ipvs.timeouts().map_err(ipvs_err("reading IPVS timeouts"))?;
    out.push_str(&format!("timeouts: tcp {} tcpfin {} udp {}\n", t.tcp, t.tcp_fin, t.udp));
    let all = sysctls(true, kernel_version(std::path::Path::new("/proc/sys")));
    let always = sysctls(false, kernel_version(std::path::Path::new("/proc/sys")));
    for (path, want) in all {
        let have = std::fs::read_to_string(std::path::Path::new("/proc/sys").join(path)).unwrap_or_default();
        let when = if always.iter().any(|(p, _)| *p == path) { "" } else { " with --ipvs-strict-arp" };
        let name = path.replace('/', ".");
        out.push_str(&format!("sysctl {name} = {} (ipvs mode sets {want}{when})\n", have.trim()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysctls_follow_the_kernel_and_strict_arp() {
        let old = sysctls(false, (5, 4));
        assert!(old.contains(&("net/ipv4/vs/conn_reuse_mode", "0")));
        assert!(old.contains(&("net/ipv4/vs/conntrack", "1")));
        assert!(old.contains(&("net/ipv4/vs/expire_nodest_conn", "1")));
        assert!(old.contains(&("net/ipv4/vs/expire_quiescent_template", "1")));
        assert!(!old.iter().any(|(p, _)| p.contains("arp_")));
        let new = sysctls(true, (6, 1));
        assert!(new.contains(&("net/ipv4/vs/conn_reuse_mode", "1")));
        assert!(new.contains(&("net/ipv4/conf/all/arp_ignore", "1")));
        assert!(new.contains(&("net/ipv4/conf/all/arp_announce", "2")));
    }

    #[test]
    fn kernel_version_is_parsed_from_osrelease() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("kernel")).unwrap();
        std::fs::write(dir.path().join("kernel/osrelease"), "6.1.0-57-amd64\n").unwrap();
        assert_eq!(kernel_version(dir.path()), (6, 1));
        assert_eq!(kernel_version(&dir.path().join("missing")), (0, 0));
    }
}
