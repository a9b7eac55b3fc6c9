//! eBPF mode: the service table → entries of the socket LB maps (`plan`, pure) → the ordered writes that
//! take the maps from what they hold to that (`diff`, pure) → `EbpfDataplane` applies them through the
//! narrow `LbMapsApi` (the pinned maps of `weft-ebpf`). It touches only those maps and its pin directory.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Instant;

use tracing::{info, warn};
use weft_ebpf::maps::{
    IPPROTO_TCP, IPPROTO_UDP, LB_FLAG_AFFINITY, LB_FLAG_LOCAL_ONLY, LB_MAP_MAX_DEFAULT, LB_SCOPE_NODEPORT,
    LB_SCOPE_SOCKET,
};
use weft_ebpf::{Backend, BackendKey, LbMaps, MapOp, MapState, SvcKey, SvcVal};

use crate::dataplane::{self, Dataplane, SyncStats};
use crate::model::{Protocol, ServiceEntry, ServicePortName, ServiceTable};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Bpf(#[from] weft_ebpf::Error),
    #[error("--nodeport-interface {0}: no such interface with an IPv4 address in this namespace")]
    NoNodeAddress(String),
    #[error("--bind-address {0}: no interface in this namespace holds it (name one with --nodeport-interface)")]
    NoInterfaceFor(Ipv4Addr),
    #[error("map {map} would need {needed} entries but holds {max}: raise --bpf-lb-map-max")]
    TooManyEntries { map: &'static str, needed: usize, max: u32 },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An LB map is (or would be) full: counted in `weft_proxy_bpf_map_full_total`.
    pub fn is_map_full(&self) -> bool {
        match self {
            Error::TooManyEntries { .. } => true,
            Error::Bpf(e) => e.is_map_full(),
            Error::NoNodeAddress(_) | Error::NoInterfaceFor(_) => false,
        }
    }
}

impl dataplane::Error {
    /// The sync failed because an eBPF LB map is full.
    pub fn is_map_full(&self) -> bool {
        matches!(self, dataplane::Error::Ebpf(e) if e.is_map_full())
    }
}

/// Where the programs attach and pin, and how big the maps are (`--cgroup-path`, `--bpf-pin-dir`,
/// `--bpf-lb-map-max`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub cgroup: PathBuf,
    /// Base directory on bpffs; this node's pins live in `<pin_base>/<node>`.
    pub pin_base: PathBuf,
    pub map_max: u32,
    /// `--nodeport-interface`: where the north-south program runs (`None`: no north-south).
    pub nodeport_interface: Option<String>,
}

pub const DEFAULT_PIN_BASE: &str = "/sys/fs/bpf/weft";

/// Time between writing service entries and removing the slots they no longer count.
const STALE_SLOT_GRACE: std::time::Duration = std::time::Duration::from_millis(1);

impl Default for Config {
    fn default() -> Self {
        Config {
            cgroup: default_cgroup(),
            pin_base: DEFAULT_PIN_BASE.into(),
            map_max: LB_MAP_MAX_DEFAULT,
            nodeport_interface: None,
        }
    }
}

/// The cgroup v2 root: `/sys/fs/cgroup/unified` on a hybrid host, else `/sys/fs/cgroup` (as Cilium).
pub fn default_cgroup() -> PathBuf {
    let hybrid = Path::new("/sys/fs/cgroup/unified");
    if hybrid.join("cgroup.procs").exists() {
        hybrid.into()
    } else {
        "/sys/fs/cgroup".into()
    }
}

/// Where `--nodeport-interface` puts the north-south programs, decided from the flag, `--bind-address`, this
/// namespace's (interface, IPv4 address) pairs and the interface of its IPv4 default route. Unset, it is the
/// interface holding the node address: `--bind-address` when given, else the default route's interface (as
/// Cilium picks its devices). `none` or an empty value turns north-south off. `Ok(None)`: off.
pub fn nodeport_interface(
    flag: Option<&str>,
    bind: Ipv4Addr,
    addrs: &[(String, Ipv4Addr)],
    default_route: Option<&str>,
) -> Result<Option<String>> {
    match flag.map(str::trim) {
        Some("") | Some("none") => return Ok(None),
        Some(name) => return Ok(Some(name.to_string())),
        None => {}
    }
    if !bind.is_unspecified() {
        return addrs.iter().find(|(_, a)| *a == bind).map(|(i, _)| Some(i.clone())).ok_or(Error::NoInterfaceFor(bind));
    }
    // Without a default route there is no node address to guess: north-south stays off (the caller says so).
    Ok(default_route.filter(|r| addrs.iter().any(|(i, _)| i == r)).map(String::from))
}

/// The interface of the first IPv4 default route in a `/proc/net/route` text (destination and mask 0, up).
pub fn default_route_interface(route: &str) -> Option<String> {
    route.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let (iface, dest, flags, mask) = (f.first()?, f.get(1)?, f.get(3)?, f.get(7)?);
        let up = u32::from_str_radix(flags, 16).ok()? & 1 == 1;
        (*dest == "00000000" && *mask == "00000000" && up).then(|| iface.to_string())
    })
}

/// This namespace's (interface, IPv4 address) pairs.
pub fn interface_addresses() -> Vec<(String, Ipv4Addr)> {
    weft_ebpf::loader::interfaces_ipv4()
}

/// This node's pin directory.
pub fn pin_dir(base: &Path, node: &str) -> PathBuf {
    base.join(node)
}

/// Another mode starts: detach and unpin what an earlier eBPF-mode proxy of this node left.
pub fn remove_leftovers(base: &Path, node: &str) -> Result<()> {
    let dir = pin_dir(base, node);
    if !dir.exists() {
        return Ok(());
    }
    let removed = weft_ebpf::remove(&dir)?;
    info!(dir = %dir.display(), links = removed.links.len(), maps = removed.maps.len(),
          "removed the eBPF mode's programs and maps left by an earlier run");
    Ok(())
}

/// The seam to the kernel: the services and backends maps. The real side is `weft_ebpf::LbMaps`.
pub trait LbMapsApi {
    fn dump(&self) -> Result<MapState>;
    fn apply(&mut self, op: &MapOp) -> Result<()>;
    fn max_entries(&self) -> u32;
}

impl LbMapsApi for LbMaps {
    fn dump(&self) -> Result<MapState> {
        Ok(LbMaps::dump(self)?)
    }
    fn apply(&mut self, op: &MapOp) -> Result<()> {
        Ok(LbMaps::apply(self, op)?)
    }
    fn max_entries(&self) -> u32 {
        LbMaps::max_entries(self)
    }
}

fn proto(p: Protocol) -> Option<u8> {
    match p {
        Protocol::Tcp => Some(IPPROTO_TCP),
        Protocol::Udp => Some(IPPROTO_UDP),
        Protocol::Sctp => None,
    }
}

/// The frontends of a port: its cluster IP, external IPs and load-balancer IPs (socket LB, and the
/// north-south program for traffic from outside), and its node port (north-south only).
pub fn frontends(name: &ServicePortName, entry: &ServiceEntry) -> Vec<SvcKey> {
    let Some(p) = proto(name.protocol) else { return vec![] };
    let sp = &entry.port;
    let mut ips: Vec<Ipv4Addr> = sp.cluster_ip.into_iter().collect();
    ips.extend(sp.external_ips.iter().chain(&sp.load_balancer_ips).copied());
    let mut keys: Vec<SvcKey> = ips.into_iter().map(|ip| SvcKey::new(ip, sp.port, p, LB_SCOPE_SOCKET)).collect();
    // For the north-south program: any node address.
    keys.extend(sp.node_port.map(|np| SvcKey::new(Ipv4Addr::UNSPECIFIED, np, p, LB_SCOPE_NODEPORT)));
    keys.sort();
    keys.dedup();
    keys
}

/// The backends a port balances over: its ready endpoints (only local ones under
/// `internalTrafficPolicy: Local`), sorted.
fn backends(entry: &ServiceEntry) -> Vec<Backend> {
    let mut out: Vec<Backend> = entry
        .endpoints
        .iter()
        .filter(|e| e.ready && (!entry.port.internal_policy_local || e.is_local))
        .map(|e| Backend::new(e.ip, e.port, e.is_local))
        .collect();
    out.sort();
    out.dedup();
    out
}

fn service_val(entry: &ServiceEntry, id: u32, count: usize) -> SvcVal {
    let mut flags = 0;
    let mut affinity_secs = 0;
    if let Some(t) = entry.port.session_affinity {
        flags |= LB_FLAG_AFFINITY;
        affinity_secs = u32::try_from(t.as_secs()).unwrap_or(u32::MAX);
    }
    if entry.port.external_policy_local {
        flags |= LB_FLAG_LOCAL_ONLY;
    }
    SvcVal { id, count: u16::try_from(count).unwrap_or(u16::MAX), flags, affinity_secs }
}

/// Slots for `want`, keeping every backend that already sits in a slot below the new count where it
/// is (so one endpoint change moves at most one other backend), and filling the holes in order.
pub fn assign_slots(current: &BTreeMap<u32, Backend>, want: &[Backend]) -> Vec<Backend> {
    let n = want.len();
    let mut slots: Vec<Option<Backend>> = vec![None; n];
    let mut placed = BTreeSet::new();
    for (slot, be) in current.range(..n as u32) {
        if want.contains(be) && placed.insert(*be) {
            slots[*slot as usize] = Some(*be);
        }
    }
    let mut rest = want.iter().filter(|b| !placed.contains(b));
    slots.into_iter().map(|s| s.or_else(|| rest.next().copied())).collect::<Option<Vec<_>>>().unwrap_or_default()
}

/// Backends of service `id` in `state`, by slot.
fn slots_of(state: &MapState, id: u32) -> BTreeMap<u32, Backend> {
    state
        .backends
        .range(BackendKey { id, slot: 0 }..=BackendKey { id, slot: u32::MAX })
        .map(|(k, v)| (k.slot, *v))
        .collect()
}

/// What one port wants in the maps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortPlan {
    pub id: u32,
    pub services: Vec<(SvcKey, SvcVal)>,
    pub backends: Vec<(BackendKey, Backend)>,
}

/// One port's entries, given its id and the slots its backends hold now.
pub fn plan_port(name: &ServicePortName, entry: &ServiceEntry, id: u32, current: &BTreeMap<u32, Backend>) -> PortPlan {
    let slots = assign_slots(current, &backends(entry));
    let val = service_val(entry, id, slots.len());
    PortPlan {
        id,
        services: frontends(name, entry).into_iter().map(|k| (k, val)).collect(),
        backends: slots.into_iter().enumerate().map(|(i, b)| (BackendKey { id, slot: i as u32 }, b)).collect(),
    }
}

/// The whole desired map contents for `table`, re-using the ids and slots `observed` already holds
/// (a restart or resync rewrites nothing that is right). Also returns each port's id and frontends.
/// A frontend claimed by two ports goes to the first (in the table's order).
pub fn plan(table: &ServiceTable, observed: &MapState) -> (MapState, BTreeMap<ServicePortName, Owned>) {
    let mut desired = MapState::default();
    let mut owned = BTreeMap::new();
    let mut used: BTreeSet<u32> = observed.services.values().map(|v| v.id).collect();
    used.extend(observed.backends.keys().map(|k| k.id));
    let mut taken: BTreeSet<u32> = BTreeSet::new();
    let mut next = 1u32;
    for (name, entry) in table {
        let keys: Vec<SvcKey> =
            frontends(name, entry).into_iter().filter(|k| !desired.services.contains_key(k)).collect();
        if keys.is_empty() {
            continue;
        }
        // The id one of its frontends has now, unless another port already took it in this plan.
        let id = keys.iter().filter_map(|k| observed.services.get(k)).map(|v| v.id).find(|id| !taken.contains(id));
        let id = id.unwrap_or_else(|| {
            while used.contains(&next) || taken.contains(&next) {
                next += 1;
            }
            next
        });
        taken.insert(id);
        let p = plan_port(name, entry, id, &slots_of(observed, id));
        for (k, v) in &p.services {
            if keys.contains(k) {
                desired.services.insert(*k, *v);
            }
        }
        desired.backends.extend(p.backends.iter().copied());
        owned.insert(name.clone(), Owned { id, frontends: keys });
    }
    (desired, owned)
}

/// A port's id and the frontends it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owned {
    pub id: u32,
    pub frontends: Vec<SvcKey>,
}

/// The writes from `observed` to `desired`, in the order that keeps every service whole for a racing
/// reader: changed backend slots first, then service entries (with their new counts), then removed
/// services, then stale slots. Entries that already match are not written.
pub fn diff(observed: &MapState, desired: &MapState) -> Vec<MapOp> {
    let mut ops = Vec::new();
    for (k, v) in &desired.backends {
        if observed.backends.get(k) != Some(v) {
            ops.push(MapOp::PutBackend(*k, *v));
        }
    }
    for (k, v) in &desired.services {
        if observed.services.get(k) != Some(v) {
            ops.push(MapOp::PutService(*k, *v));
        }
    }
    ops.extend(
        observed.services.keys().filter(|k| !desired.services.contains_key(k)).map(|k| MapOp::DeleteService(*k)),
    );
    ops.extend(
        observed.backends.keys().filter(|k| !desired.backends.contains_key(k)).map(|k| MapOp::DeleteBackend(*k)),
    );
    ops
}

fn phase(op: &MapOp) -> u8 {
    match op {
        MapOp::PutBackend(..) => 0,
        MapOp::PutService(..) => 1,
        MapOp::DeleteService(_) => 2,
        MapOp::DeleteBackend(_) => 3,
    }
}

/// Per changed port, what it holds after a partial sync (`None`: nothing, it is gone).
pub type OwnedUpdates = BTreeMap<ServicePortName, Option<Owned>>;

/// The writes for a partial sync of `changed` ports against the maps as last written (`mirror`,
/// `owned`), or `None` when only a full sync can tell (a frontend moving between ports).
pub fn partial(
    table: &ServiceTable,
    changed: &BTreeSet<ServicePortName>,
    mirror: &MapState,
    owned: &BTreeMap<ServicePortName, Owned>,
) -> Option<(Vec<MapOp>, OwnedUpdates)> {
    let mut ops = Vec::new();
    let mut updates = BTreeMap::new();
    // Ids in use, collected only when a port needs a new one (an endpoint change does not).
    let mut used: Option<BTreeSet<u32>> = None;
    let mut next = 1u32;
    for name in changed {
        let old = owned.get(name);
        let mut before = MapState::default();
        if let Some(o) = old {
            for k in &o.frontends {
                if let Some(v) = mirror.services.get(k) {
                    before.services.insert(*k, *v);
                }
            }
            before
                .backends
                .extend(slots_of(mirror, o.id).into_iter().map(|(s, b)| (BackendKey { id: o.id, slot: s }, b)));
        }
        let mut after = MapState::default();
        let entry = table.get(name);
        let keys = entry.map(|e| frontends(name, e)).unwrap_or_default();
        if keys.is_empty() {
            updates.insert(name.clone(), None);
        } else {
            let entry = entry?;
            // A frontend some other port holds: only a full plan can settle who gets it.
            if keys.iter().any(|k| mirror.services.contains_key(k) && !old.is_some_and(|o| o.frontends.contains(k))) {
                return None;
            }
            let id = match old {
                Some(o) => o.id,
                None => {
                    let used = used.get_or_insert_with(|| {
                        let mut u: BTreeSet<u32> = owned.values().map(|o| o.id).collect();
                        u.extend(mirror.services.values().map(|v| v.id));
                        u.extend(mirror.backends.keys().map(|k| k.id));
                        u
                    });
                    while used.contains(&next) {
                        next += 1;
                    }
                    used.insert(next);
                    next
                }
            };
            let p = plan_port(name, entry, id, &slots_of(mirror, id));
            after.services.extend(p.services);
            after.backends.extend(p.backends);
            updates.insert(name.clone(), Some(Owned { id, frontends: keys }));
        }
        ops.extend(diff(&before, &after));
    }
    ops.sort_by_key(phase);
    Some((ops, updates))
}

/// The eBPF dataplane: keeps a mirror of what it wrote so a partial sync is a handful of writes; a
/// full sync reads the maps back from the kernel first (level-triggered: a manual change is undone).
pub struct EbpfDataplane<M> {
    maps: M,
    mirror: Option<MapState>,
    owned: BTreeMap<ServicePortName, Owned>,
    cgroup: PathBuf,
}

impl EbpfDataplane<LbMaps> {
    /// Loads and attaches the programs (re-using pinned maps) for `node`.
    pub fn load(cfg: &Config, node: &str) -> Result<EbpfDataplane<LbMaps>> {
        let bpf = weft_ebpf::Config {
            cgroup: cfg.cgroup.clone(),
            pin_dir: pin_dir(&cfg.pin_base, node),
            map_max: cfg.map_max,
        };
        let nodeport = match &cfg.nodeport_interface {
            None => None,
            Some(interface) => {
                let node_ip = weft_ebpf::loader::interface_ipv4(interface)
                    .ok_or_else(|| Error::NoNodeAddress(interface.clone()))?;
                Some(weft_ebpf::loader::NodePort { interface: interface.clone(), node_ip })
            }
        };
        let lb = weft_ebpf::SockLb::load(&bpf)?;
        info!(cgroup = %cfg.cgroup.display(), pins = %lb.pin_dir().display(), map_max = cfg.map_max,
              "socket LB attached (connect4, sendmsg4, recvmsg4, getpeername4)");
        weft_ebpf::loader::attach_nodeport(&bpf, nodeport.as_ref())?;
        if let Some(np) = &nodeport {
            info!(interface = %np.interface, node_ip = %np.node_ip, "north-south attached (tcx ingress and egress)");
        }
        Ok(EbpfDataplane::new(lb.maps, cfg.cgroup.clone()))
    }
}

impl<M: LbMapsApi> EbpfDataplane<M> {
    pub fn new(maps: M, cgroup: PathBuf) -> Self {
        EbpfDataplane { maps, mirror: None, owned: BTreeMap::new(), cgroup }
    }

    pub fn maps(&self) -> &M {
        &self.maps
    }

    fn check_capacity(&self, desired: &MapState) -> Result<()> {
        self.check_sizes(desired.services.len(), desired.backends.len())
    }

    fn check_sizes(&self, services: usize, backends: usize) -> Result<()> {
        let max = self.maps.max_entries();
        for (map, needed) in [(weft_ebpf::maps::MAP_SERVICES, services), (weft_ebpf::maps::MAP_BACKENDS, backends)] {
            if needed > max as usize {
                return Err(Error::TooManyEntries { map, needed, max });
            }
        }
        Ok(())
    }

    /// Applies `ops` in order, keeping the mirror equal to what the kernel accepted.
    fn apply(&mut self, ops: &[MapOp], mirror: &mut MapState) -> Result<()> {
        let mut services_written = false;
        for op in ops {
            match op {
                MapOp::PutService(..) | MapOp::DeleteService(_) => services_written = true,
                // A program that read the old count just before may still look up a slot past the new
                // one: give it time to finish (programs run for microseconds) before the slot goes.
                MapOp::DeleteBackend(_) if services_written => {
                    std::thread::sleep(STALE_SLOT_GRACE);
                    services_written = false;
                }
                _ => {}
            }
            self.maps.apply(op)?;
            mirror.apply(op);
        }
        Ok(())
    }

    fn full(&mut self, table: &ServiceTable) -> Result<SyncStats> {
        let observed = self.maps.dump()?;
        let (desired, owned) = plan(table, &observed);
        self.check_capacity(&desired)?;
        let ops = diff(&observed, &desired);
        let mut mirror = observed;
        self.mirror = None;
        self.apply(&ops, &mut mirror)?;
        self.mirror = Some(mirror);
        self.owned = owned;
        Ok(stats(true, &ops))
    }

    fn sync_inner(&mut self, table: &ServiceTable, changed: Option<&BTreeSet<ServicePortName>>) -> Result<SyncStats> {
        let (Some(changed), Some(mirror)) = (changed, self.mirror.take()) else { return self.full(table) };
        let Some((ops, updates)) = partial(table, changed, &mirror, &self.owned) else {
            return self.full(table);
        };
        let (services, backends) = sizes_after(&mirror, &ops);
        if let Err(e) = self.check_sizes(services, backends) {
            self.mirror = Some(mirror);
            return Err(e);
        }
        let mut mirror = mirror;
        // On failure the mirror stays unset: the next sync is full and reads the kernel.
        self.apply(&ops, &mut mirror)?;
        self.mirror = Some(mirror);
        for (name, o) in updates {
            match o {
                Some(o) => self.owned.insert(name, o),
                None => self.owned.remove(&name),
            };
        }
        Ok(stats(false, &ops))
    }

    /// The map entries behind a port, as `weft services` shows them.
    pub fn entries(&self, port: &ServicePortName) -> Option<String> {
        let o = self.owned.get(port)?;
        let mirror = self.mirror.as_ref()?;
        let mut out = String::new();
        for k in &o.frontends {
            if let Some(v) = mirror.services.get(k) {
                let _ = write!(out, "{}{k} {v}", if out.is_empty() { "" } else { ", " });
            }
        }
        for (slot, be) in slots_of(mirror, o.id) {
            let _ = write!(out, " [{slot}]{be}");
        }
        Some(out)
    }
}

/// Entries of the services and backends maps once `ops` are applied to `state`.
fn sizes_after(state: &MapState, ops: &[MapOp]) -> (usize, usize) {
    let (mut services, mut backends) = (state.services.len() as isize, state.backends.len() as isize);
    for op in ops {
        match op {
            MapOp::PutService(k, _) if !state.services.contains_key(k) => services += 1,
            MapOp::DeleteService(k) if state.services.contains_key(k) => services -= 1,
            MapOp::PutBackend(k, _) if !state.backends.contains_key(k) => backends += 1,
            MapOp::DeleteBackend(k) if state.backends.contains_key(k) => backends -= 1,
            _ => {}
        }
    }
    (services.max(0) as usize, backends.max(0) as usize)
}

fn stats(full: bool, ops: &[MapOp]) -> SyncStats {
    let count = |p: u8| ops.iter().filter(|o| phase(o) == p).count();
    SyncStats {
        full,
        chains_written: count(1),
        chains_deleted: count(2),
        rules_written: ops.len(),
        bytes: 0,
        duration: Default::default(),
    }
}

impl<M: LbMapsApi> Dataplane for EbpfDataplane<M> {
    fn sync(
        &mut self,
        table: &ServiceTable,
        changed: Option<&BTreeSet<ServicePortName>>,
    ) -> dataplane::Result<SyncStats> {
        let started = Instant::now();
        let mut stats = self.sync_inner(table, changed).inspect_err(|e| {
            if e.is_map_full() {
                warn!("{e}");
            }
        })?;
        stats.duration = started.elapsed();
        Ok(stats)
    }

    fn mode(&self) -> &'static str {
        "ebpf"
    }

    fn describe(&self, port: &ServicePortName) -> Option<String> {
        let entries = self.entries(port)?;
        // What socket-level balancing cannot reach, said where the operator looks.
        Some(format!("{entries} (socket LB for processes in {})", self.cgroup.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodeport_interface_is_the_one_holding_the_node_address_unless_named_or_off() {
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        let addrs: Vec<(String, Ipv4Addr)> = [
            ("lo", "127.0.0.1"),
            ("eth0", "192.168.56.11"),
            ("eth1", "10.0.0.5"),
            ("cni0", "10.244.1.1"),
            ("eth1", "10.0.0.6"),
        ]
        .iter()
        .map(|(i, a)| (i.to_string(), ip(a)))
        .collect();
        let any = ip("0.0.0.0");
        // (flag, --bind-address, default route interface) → chosen interface, or the error's text.
        type Case<'a> = (Option<&'a str>, Ipv4Addr, Option<&'a str>, Result<Option<&'a str>, &'a str>);
        let table: &[Case] = &[
            (Some("eth1"), any, Some("eth0"), Ok(Some("eth1"))),
            (Some("eth1"), ip("192.168.56.11"), Some("eth0"), Ok(Some("eth1"))),
            (Some("none"), ip("192.168.56.11"), Some("eth0"), Ok(None)),
            (Some(""), any, Some("eth0"), Ok(None)),
            (None, ip("10.0.0.6"), Some("eth0"), Ok(Some("eth1"))),
            (None, ip("192.168.56.11"), None, Ok(Some("eth0"))),
            (None, ip("192.0.2.1"), Some("eth0"), Err("--bind-address 192.0.2.1: no interface")),
            (None, any, Some("eth1"), Ok(Some("eth1"))),
            (None, any, None, Ok(None)),
            (None, any, Some("tun9"), Ok(None)),
        ];
        for (flag, bind, route, want) in table {
            let got = nodeport_interface(*flag, *bind, &addrs, *route);
            match (want, got) {
                (Ok(w), Ok(g)) => assert_eq!(g.as_deref(), *w, "{flag:?} {bind} {route:?}"),
                (Err(w), Err(e)) => assert!(e.to_string().starts_with(w), "{flag:?} {bind} {route:?}: {e}"),
                (w, g) => panic!("{flag:?} {bind} {route:?}: want {w:?}, got {g:?}"),
            }
        }
    }

    #[test]
    fn default_route_interface_reads_proc_net_route() {
        let header = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n";
        let table: &[(&str, Option<&str>)] = &[
            (
                "eth0\t0038A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
              eth0\t00000000\t0A38A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n",
                Some("eth0"),
            ),
            // A route to 0.0.0.0/8 is not a default route; a down one does not count.
            ("eth1\t00000000\t00000000\t0001\t0\t0\t0\t000000FF\t0\t0\t0\n", None),
            ("eth1\t00000000\t0A38A8C0\t0002\t0\t0\t0\t00000000\t0\t0\t0\n", None),
            ("", None),
            ("garbage\n", None),
        ];
        for (rows, want) in table {
            assert_eq!(default_route_interface(&format!("{header}{rows}")).as_deref(), *want, "{rows}");
        }
    }
    use crate::model::{Endpoint, ServicePort};
    use std::time::Duration;

    /// The maps as plain data: the fake side of the seam (the real side is tested in tests/ebpf_*.rs).
    #[derive(Default)]
    struct FakeMaps {
        state: MapState,
        writes: Vec<MapOp>,
        max: u32,
    }

    impl LbMapsApi for FakeMaps {
        fn dump(&self) -> Result<MapState> {
            Ok(self.state.clone())
        }
        fn apply(&mut self, op: &MapOp) -> Result<()> {
            self.state.apply(op);
            if self.state.backends.len() > self.max as usize || self.state.services.len() > self.max as usize {
                return Err(weft_ebpf::Error::MapFull { map: op.map(), max: self.max }.into());
            }
            self.writes.push(*op);
            Ok(())
        }
        fn max_entries(&self) -> u32 {
            self.max
        }
    }

    fn ep(ip: [u8; 4], port: u16, local: bool) -> Endpoint {
        Endpoint { ip: ip.into(), port, node_name: None, is_local: local, ready: true }
    }

    fn small_table() -> ServiceTable {
        let mut t = ServiceTable::new();
        t.insert(
            ServicePortName::new("default", "web", "http", Protocol::Tcp),
            ServiceEntry {
                port: ServicePort {
                    external_ips: vec![[203, 0, 113, 10].into()],
                    node_port: Some(30080),
                    ..ServicePort::cluster_ip([10, 96, 100, 1].into(), 80)
                },
                endpoints: vec![ep([10, 244, 2, 2], 9376, false), ep([10, 244, 1, 2], 9376, true)],
            },
        );
        t.insert(
            ServicePortName::new("default", "dns", "dns", Protocol::Udp),
            ServiceEntry {
                port: ServicePort {
                    session_affinity: Some(Duration::from_secs(10800)),
                    ..ServicePort::cluster_ip([10, 96, 0, 10].into(), 53)
                },
                endpoints: vec![ep([10, 244, 1, 3], 53, true)],
            },
        );
        t.insert(
            ServicePortName::new("default", "empty", "", Protocol::Tcp),
            ServiceEntry { port: ServicePort::cluster_ip([10, 96, 100, 9].into(), 80), endpoints: vec![] },
        );
        t.insert(
            ServicePortName::new("default", "sctp", "", Protocol::Sctp),
            ServiceEntry {
                port: ServicePort::cluster_ip([10, 96, 100, 7].into(), 80),
                endpoints: vec![ep([10, 244, 1, 9], 80, true)],
            },
        );
        t
    }

    #[test]
    fn plan_of_a_small_table_matches_the_golden_file() {
        let (desired, owned) = plan(&small_table(), &MapState::default());
        let golden = include_str!("../testdata/ebpf_small_table.golden");
        assert_eq!(desired.render(), golden, "rendered:\n{}", desired.render());
        assert_eq!(owned.len(), 3, "SCTP is not served by socket LB");
    }

    #[test]
    fn one_endpoint_change_is_a_handful_of_writes_in_order() {
        let mut dp = EbpfDataplane::new(FakeMaps { max: 100, ..Default::default() }, "/cg".into());
        let mut table = small_table();
        dp.sync(&table, None).unwrap();
        let web = ServicePortName::new("default", "web", "http", Protocol::Tcp);
        let first = dp.maps.writes.len();

        // Remove the endpoint in slot 0: the last one moves into its slot, then the count, then the stale slot.
        table.get_mut(&web).unwrap().endpoints.retain(|e| e.ip != Ipv4Addr::new(10, 244, 1, 2));
        let stats = dp.sync(&table, Some(&[web.clone()].into())).unwrap();
        let ops: Vec<String> = dp.maps.writes[first..].iter().map(ToString::to_string).collect();
        assert_eq!(
            ops,
            [
                "put be 3/0 10.244.2.2:9376",
                "put svc *:30080/tcp nodeport id=3 count=1",
                "put svc 10.96.100.1:80/tcp id=3 count=1",
                "put svc 203.0.113.10:80/tcp id=3 count=1",
                "del be 3/1",
            ]
        );
        assert!(!stats.full);

        // Add one back: one slot and the count, nothing moves.
        let before = dp.maps.writes.len();
        table.get_mut(&web).unwrap().endpoints.push(ep([10, 244, 1, 7], 9376, true));
        dp.sync(&table, Some(&[web.clone()].into())).unwrap();
        let ops: Vec<String> = dp.maps.writes[before..].iter().map(ToString::to_string).collect();
        assert_eq!(
            ops,
            [
                "put be 3/1 10.244.1.7:9376 local",
                "put svc *:30080/tcp nodeport id=3 count=2",
                "put svc 10.96.100.1:80/tcp id=3 count=2",
                "put svc 203.0.113.10:80/tcp id=3 count=2",
            ]
        );
        // The partial result equals what a full plan of the same table wants.
        let (want, _) = plan(&table, &dp.maps.state);
        assert_eq!(dp.maps.state, want);
    }

    #[test]
    fn full_resync_writes_only_differences_and_removes_unclaimed_entries() {
        let table = small_table();
        let (desired, _) = plan(&table, &MapState::default());
        let mut maps = FakeMaps { state: desired, max: 100, ..Default::default() };
        // Left by someone else (or a deleted service): claimed by no service.
        let stray = SvcKey::new([10, 96, 200, 1].into(), 80, IPPROTO_TCP, LB_SCOPE_SOCKET);
        maps.state.services.insert(stray, SvcVal { id: 77, count: 1, flags: 0, affinity_secs: 0 });
        maps.state.backends.insert(BackendKey { id: 77, slot: 0 }, Backend::new([10, 1, 1, 1].into(), 1, false));
        let mut dp = EbpfDataplane::new(maps, "/cg".into());
        let stats = dp.sync(&table, None).unwrap();
        let ops: Vec<String> = dp.maps.writes.iter().map(ToString::to_string).collect();
        assert_eq!(ops, ["del svc 10.96.200.1:80/tcp", "del be 77/0"]);
        assert!(stats.full);
        dp.maps.writes.clear();
        dp.sync(&table, None).unwrap();
        assert!(dp.maps.writes.is_empty(), "a second full sync writes nothing");
    }

    #[test]
    fn ids_and_slots_survive_a_restart() {
        let table = small_table();
        let (first, _) = plan(&table, &MapState::default());
        // A restarted proxy plans against what the pinned maps hold: nothing to write.
        let (second, _) = plan(&table, &first);
        assert_eq!(first, second);
        assert!(diff(&first, &second).is_empty());
    }

    #[test]
    fn slot_assignment_keeps_backends_in_place() {
        let b = |n: u8| Backend::new([10, 0, 0, n].into(), 80, false);
        let cur: BTreeMap<u32, Backend> = [(0, b(1)), (1, b(2)), (2, b(3))].into();
        let cases: [(&str, Vec<Backend>, Vec<Backend>); 4] = [
            ("unchanged", vec![b(1), b(2), b(3)], vec![b(1), b(2), b(3)]),
            ("middle removed: last moves in", vec![b(1), b(3)], vec![b(1), b(3)]),
            ("first removed", vec![b(2), b(3)], vec![b(3), b(2)]),
            ("one added at the end", vec![b(1), b(2), b(3), b(4)], vec![b(1), b(2), b(3), b(4)]),
        ];
        for (name, want, expect) in cases {
            assert_eq!(assign_slots(&cur, &want), expect, "{name}");
        }
    }

    #[test]
    fn a_full_map_is_an_error_before_any_write() {
        let mut dp = EbpfDataplane::new(FakeMaps { max: 2, ..Default::default() }, "/cg".into());
        let err = dp.sync(&small_table(), None).unwrap_err();
        assert!(err.is_map_full(), "{err:?}");
        assert!(dp.maps.writes.is_empty(), "nothing half-written");
        let text = match &err {
            dataplane::Error::Ebpf(e) => e.to_string(),
            other => panic!("{other:?}"),
        };
        assert_eq!(text, "map weft_lb_svc would need 5 entries but holds 2: raise --bpf-lb-map-max");
    }

    #[test]
    fn a_partial_sync_that_overflows_a_map_writes_nothing() {
        let mut dp = EbpfDataplane::new(FakeMaps { max: 5, ..Default::default() }, "/cg".into());
        let mut table = small_table();
        table.get_mut(&ServicePortName::new("default", "web", "http", Protocol::Tcp)).unwrap().endpoints.pop();
        dp.sync(&table, None).unwrap();
        let writes = dp.maps.writes.len();
        let web = ServicePortName::new("default", "web", "http", Protocol::Tcp);
        table.get_mut(&web).unwrap().endpoints.extend((1..=4).map(|i| ep([10, 244, 3, i], 9376, false)));
        let err = dp.sync(&table, Some(&[web.clone()].into())).unwrap_err();
        assert!(err.is_map_full(), "{err:?}");
        assert_eq!(dp.maps.writes.len(), writes, "nothing half-written");
        // Once the table fits again, the next (partial) sync works from the kept mirror.
        table.get_mut(&web).unwrap().endpoints.truncate(1);
        dp.sync(&table, Some(&[web].into())).unwrap();
        let (want, _) = plan(&table, &dp.maps.state);
        assert_eq!(dp.maps.state, want);
    }

    #[test]
    fn a_frontend_moving_between_ports_falls_back_to_a_full_plan() {
        let mut dp = EbpfDataplane::new(FakeMaps { max: 100, ..Default::default() }, "/cg".into());
        let mut table = small_table();
        dp.sync(&table, None).unwrap();
        let web = ServicePortName::new("default", "web", "http", Protocol::Tcp);
        let entry = table.remove(&web).unwrap();
        let moved = ServicePortName::new("default", "web2", "http", Protocol::Tcp);
        table.insert(moved.clone(), entry);
        let stats = dp.sync(&table, Some(&[web, moved.clone()].into())).unwrap();
        let (want, _) = plan(&table, &dp.maps.state);
        assert_eq!(dp.maps.state, want);
        assert!(dp.describe(&moved).is_some_and(|d| d.contains("10.96.100.1:80/tcp")), "{stats:?}");
    }
}
