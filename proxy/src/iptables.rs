//! iptables mode: renders a `ServiceTable` as `iptables-restore` text (pure) and applies it with one
//! `iptables-restore --noflush` per sync through a `Runner` (the only thing here that touches the kernel).
//!
//! Chains follow kube-proxy's design with the `WEFT-` prefix: WEFT-SVC-<hash> per service port
//! (statistic-mode balancing, `recent` ClientIP affinity), WEFT-SEP-<hash> per endpoint of a ClientIP-affinity
//! service (`recent --set` + DNAT), WEFT-SVL-<hash> (local endpoints only), WEFT-EXT-<hash> (NodePort /
//! external / LB traffic), WEFT-NODEPORTS, WEFT-MARK-MASQ, WEFT-POSTROUTING, and in the filter table
//! WEFT-SERVICES / WEFT-EXTERNAL-SERVICES (REJECT or DROP for ports without endpoints) and WEFT-FORWARD.
//!
//! Where kube-proxy writes a SEP chain for every endpoint of every service (its hairpin mark and the
//! DNAT), a service without affinity DNATs straight from its SVC chain, and hairpin traffic (a pod reaching
//! itself through a service) is masqueraded in WEFT-HAIRPIN, jumped to from WEFT-POSTROUTING for DNATed
//! connections: `-s X -d X -j MASQUERADE` for each endpoint address that may be on this node (its
//! nodeName is ours, or it has none), split by source prefix (WEFT-HP-<prefix>-<len>) like the dispatch
//! tree below. At 10,000 services × 10 endpoints that is 100,000 chains and 200,000 rules fewer, which is
//! what a full sync's time is made of (`Config::endpoint_chains` renders kube-proxy's layout, for benchmarks).
//!
//! Where we differ is the dispatch. kube-proxy's KUBE-SERVICES is one linear list of `-d VIP --dport`
//! rules, so at 10,000 services every new connection through the node — to a service or not — walks
//! up to 10,000 rules. Our nat WEFT-SERVICES is the root of a prefix tree over every destination
//! address a service answers on (cluster IPs, external IPs, LB IPs): a chain holding more than
//! `Config::dispatch_leaf` rules is split on the next 4 bits after its addresses' common prefix into at
//! most 16 children `-d <prefix>/<len> -j WEFT-D-<prefix>-<len>`; small chains hold the per-VIP rules.
//! A packet walks at most 16 rules per level (about 50 rules at 10,000 VIPs in a /12, instead of 10,000),
//! and a packet to no service leaves at the first level whose prefixes it misses. The tree depends only on
//! the set of addresses, so an endpoint change never rewrites it, and a new service rewrites one leaf.
//!
//! Partial syncs rewrite only the chains whose rules changed: the chains of the changed ports, and the
//! shared chains (dispatch tree, NODEPORTS, filter lists) whose content differs from what was last
//! written (tracked as a hash per chain). Chains we wrote that the table no longer claims are flushed
//! and deleted (mark and sweep); a full sync also sweeps every `WEFT-` chain found by `iptables-save`.
//!
//! A sync is one `iptables-restore --noflush` run unless it writes more than `Config::restore_batch_rules`
//! rules: iptables-nft 1.8.9's `--noflush` restore slows down quadratically with its input (1,000 services ×
//! 10 endpoints: 7–9 s in one run, 1.5 s in 2,000-rule batches; 2,000 services: 56 s in one run), so a large
//! sync runs as several inputs in dependency order — base
//! chains, service chains (cut only between services), then the dispatch tree and hooks, then deletions —
//! each of which leaves a consistent ruleset: traffic follows the old dispatch until the last one lands.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::hash::{Hash, Hasher};
use std::net::Ipv4Addr;
use std::time::Instant;

use ipnetwork::Ipv4Network;
use sha2::{Digest, Sha256};

use crate::conntrack::StaleUdpFlows;
use crate::dataplane::{self, Dataplane, SyncStats};
use crate::model::{Endpoint, ServiceEntry, ServicePortName, ServiceTable};
use crate::restore;

// The restore/save machinery lives in `restore`; re-exported so `iptables::CommandRunner` & co. keep working.
pub use crate::restore::{comment, scan_save, ChainKey, CommandRunner, Error, Result, Runner, SavedHook, Table};

/// Prefix of every chain we own.
pub const PREFIX: &str = "WEFT-";
const SERVICES: &str = "WEFT-SERVICES";
const EXTERNAL_SERVICES: &str = "WEFT-EXTERNAL-SERVICES";
const NODEPORTS: &str = "WEFT-NODEPORTS";
const POSTROUTING: &str = "WEFT-POSTROUTING";
const MARK_MASQ: &str = "WEFT-MARK-MASQ";
const FORWARD: &str = "WEFT-FORWARD";
const HAIRPIN: &str = "WEFT-HAIRPIN";

/// Node-wide settings of the renderer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The pod network; traffic to a cluster IP from outside it is masqueraded. None: no such rule.
    pub cluster_cidr: Option<Ipv4Network>,
    /// Node addresses that answer NodePorts; empty: every local address (`addrtype LOCAL`).
    pub nodeport_addresses: Vec<Ipv4Network>,
    /// Bit of the packet mark that asks WEFT-POSTROUTING to masquerade (kube-proxy: 14 = 0x4000).
    pub masquerade_bit: u8,
    /// Most rules a dispatch chain holds before it is split into sub-chains (`usize::MAX`: kube-proxy's
    /// linear KUBE-SERVICES).
    pub dispatch_leaf: usize,
    /// A sync writing more rules than this is split into several `iptables-restore` runs at service
    /// boundaries: iptables-nft 1.8.9's `--noflush` restore costs grow quadratically with its input size.
    pub restore_batch_rules: usize,
    /// kube-proxy's endpoint chains: a WEFT-SEP chain (hairpin mark + DNAT) for every endpoint of every
    /// service. Off (weft's layout), only ClientIP-affinity services get SEP chains (`recent` needs them);
    /// the others DNAT from the SVC chain and hairpin is masqueraded in WEFT-HAIRPIN. On: the layout
    /// benchmarks compare against.
    pub endpoint_chains: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            cluster_cidr: None,
            nodeport_addresses: vec![],
            masquerade_bit: 14,
            dispatch_leaf: 16,
            restore_batch_rules: 2_000,
            endpoint_chains: false,
        }
    }
}

impl Config {
    fn mark(&self) -> String {
        format!("{:#x}", 1u32 << self.masquerade_bit.min(31))
    }
}

/// One chain's desired rules; each rule is what follows `-A <name> `.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub table: Table,
    pub name: String,
    pub rules: Vec<String>,
}

impl Chain {
    fn new(table: Table, name: impl Into<String>) -> Self {
        Chain { table, name: name.into(), rules: vec![] }
    }
    fn key(&self) -> ChainKey {
        (self.table, self.name.clone())
    }
    fn hash(&self) -> u64 {
        let mut h = DefaultHasher::new();
        self.rules.hash(&mut h);
        h.finish()
    }
}

/// What we last wrote to the kernel: every chain with a hash of its rules, and which chains each
/// service port owns. The "previous chains" a partial render diffs against.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChainState {
    chains: BTreeMap<ChainKey, u64>,
    owners: BTreeMap<ServicePortName, Vec<ChainKey>>,
}

impl ChainState {
    pub fn chains(&self) -> impl Iterator<Item = &ChainKey> {
        self.chains.keys()
    }
}

/// Our footprint as `iptables-save` shows it: `WEFT-` chains and the jumps to them from built-in chains.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Existing {
    pub chains: BTreeSet<ChainKey>,
    /// (table, built-in chain, target)
    pub hooks: BTreeSet<(Table, String, String)>,
}

/// Whether a chain is this mode's to write and sweep. Other weft components keep `WEFT-` chains of
/// their own in the same tables (the agent's ip-masq `WEFT-POSTRTG`/`WEFT-FWD`, the userspace mode's
/// portals), so ownership is by exact name or hashed family, never by the prefix alone.
pub fn is_proxy_chain(name: &str) -> bool {
    const FIXED: [&str; 7] = [SERVICES, EXTERNAL_SERVICES, NODEPORTS, POSTROUTING, MARK_MASQ, FORWARD, HAIRPIN];
    const FAMILIES: [&str; 6] = ["WEFT-SVC-", "WEFT-SVL-", "WEFT-EXT-", "WEFT-SEP-", "WEFT-D-", "WEFT-HP-"];
    FIXED.contains(&name) || FAMILIES.iter().any(|f| name.starts_with(f))
}

/// Parses `iptables-save` output (all tables) for our chains and hooks.
pub fn parse_save(text: &str) -> Existing {
    existing(scan_save(text, is_proxy_chain))
}

/// Our chains and hooks in the kernel, read from `iptables-save` as it prints (never held whole).
pub fn read_existing(runner: &mut dyn Runner) -> Result<Existing> {
    Ok(existing(restore::scan_saved(runner, is_proxy_chain)?))
}

fn existing((chains, hooks): (BTreeSet<ChainKey>, Vec<SavedHook>)) -> Existing {
    Existing { chains, hooks: hooks.into_iter().map(|(t, chain, _, target)| (t, chain, target)).collect() }
}

/// The jumps from built-in chains into ours, as kube-proxy installs them (inserted first).
fn hooks() -> Vec<(Table, &'static str, &'static str, &'static str)> {
    vec![
        (
            Table::Filter,
            "INPUT",
            EXTERNAL_SERVICES,
            "-m conntrack --ctstate NEW -m comment --comment \"weft externally-visible service portals\"",
        ),
        (Table::Filter, "FORWARD", FORWARD, "-m comment --comment \"weft forwarding rules\""),
        (
            Table::Filter,
            "FORWARD",
            SERVICES,
            "-m conntrack --ctstate NEW -m comment --comment \"weft service portals\"",
        ),
        (
            Table::Filter,
            "FORWARD",
            EXTERNAL_SERVICES,
            "-m conntrack --ctstate NEW -m comment --comment \"weft externally-visible service portals\"",
        ),
        (Table::Filter, "OUTPUT", SERVICES, "-m conntrack --ctstate NEW -m comment --comment \"weft service portals\""),
        (Table::Nat, "PREROUTING", SERVICES, "-m comment --comment \"weft service portals\""),
        (Table::Nat, "OUTPUT", SERVICES, "-m comment --comment \"weft service portals\""),
        (Table::Nat, "POSTROUTING", POSTROUTING, "-m comment --comment \"weft postrouting rules\""),
    ]
}

/// kube-proxy's `portProtoHash`: base32(sha256(name + protocol + extra))[..16].
fn hash16(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
    }
    let enc = base32::encode(base32::Alphabet::Rfc4648 { padding: true }, &h.finalize());
    enc[..16].to_string()
}

/// Chain names of one service port, as kube-proxy's `servicePortChainName` & co. compute them.
#[derive(Debug, Clone)]
pub struct ServiceChains {
    pub svc: String,
    pub svl: String,
    pub ext: String,
}

pub fn service_chains(spn: &ServicePortName) -> ServiceChains {
    let h = hash16(&[&spn.to_string(), spn.protocol.lower()]);
    ServiceChains { svc: format!("WEFT-SVC-{h}"), svl: format!("WEFT-SVL-{h}"), ext: format!("WEFT-EXT-{h}") }
}

/// kube-proxy's `servicePortEndpointChainName`.
pub fn endpoint_chain(spn: &ServicePortName, ep: &Endpoint) -> String {
    format!("WEFT-SEP-{}", hash16(&[&spn.to_string(), spn.protocol.lower(), &ep.to_string()]))
}

fn proto_match(spn: &ServicePortName, port: u16) -> String {
    let p = spn.protocol.lower();
    format!("-p {p} -m {p} --dport {port}")
}

/// One address rule for a prefix tree (the dispatch tree: destinations; the hairpin tree: sources).
struct VipRule {
    addr: Ipv4Addr,
    rule: String,
}

/// The shared lists every service port adds rules to.
struct Lists {
    vips: Vec<VipRule>,
    /// Endpoint addresses that may be on this node: a connection from one of them to itself through a
    /// service (hairpin) must be masqueraded, or its replies would bypass the node's conntrack.
    hairpin: Vec<Ipv4Addr>,
    nodeports: Chain,
    filter_services: Chain,
    filter_external: Chain,
}

/// The chains of a sync that no single service port owns.
struct Shared {
    /// Chains that jump to no service chain: MARK-MASQ, the hairpin tree, POSTROUTING, the filter chains.
    base: Vec<Chain>,
    /// Chains that jump to service chains: the dispatch tree, NODEPORTS, WEFT-SERVICES (children first).
    dispatch: Vec<Chain>,
}

/// Renders the chains of one service port (nat), and adds its dispatch and filter rules to the shared lists.
fn render_service(
    spn: &ServicePortName,
    e: &ServiceEntry,
    cfg: &Config,
    lists: &mut Lists,
    want_chains: bool,
) -> Vec<Chain> {
    let Lists { vips, hairpin, nodeports, filter_services, filter_external } = lists;
    let names = service_chains(spn);
    let name = spn.to_string();
    let sp = &e.port;
    let pm = proto_match(spn, sp.port);
    let local: Vec<&Endpoint> = e.endpoints.iter().filter(|ep| ep.is_local).collect();
    let all: Vec<&Endpoint> = e.endpoints.iter().collect();
    let mut chains = Vec::new();

    let internal_eps = if sp.internal_policy_local { &local } else { &all };
    let internal_chain = if sp.internal_policy_local { &names.svl } else { &names.svc };
    let external_eps = if sp.external_policy_local { &local } else { &all };

    // Internal (cluster IP) traffic.
    if let Some(vip) = sp.cluster_ip {
        if !internal_eps.is_empty() {
            let c = comment(&format!("{name} cluster IP"));
            vips.push(VipRule { addr: vip, rule: format!("-d {vip}/32 {pm} {c} -j {internal_chain}") });
        } else {
            let (what, verdict) =
                if all.is_empty() { ("has no endpoints", "REJECT") } else { ("has no local endpoints", "DROP") };
            let c = comment(&format!("{name} {what}"));
            filter_services.rules.push(format!("-d {vip}/32 {pm} {c} -j {verdict}"));
        }
    }

    // External traffic: node ports, external IPs, load-balancer IPs.
    if sp.is_external() {
        if all.is_empty() || external_eps.is_empty() {
            let (what, verdict) =
                if all.is_empty() { ("has no endpoints", "REJECT") } else { ("has no local endpoints", "DROP") };
            for ip in &sp.external_ips {
                let c = comment(&format!("{name} {what}"));
                filter_external.rules.push(format!("-d {ip}/32 {pm} {c} -j {verdict}"));
            }
            for ip in &sp.load_balancer_ips {
                let c = comment(&format!("{name} {what}"));
                filter_external.rules.push(format!("-d {ip}/32 {pm} {c} -j {verdict}"));
            }
            if let Some(np) = sp.node_port {
                let c = comment(&format!("{name} {what}"));
                let p = spn.protocol.lower();
                filter_external
                    .rules
                    .push(format!("-m addrtype --dst-type LOCAL -p {p} -m {p} --dport {np} {c} -j {verdict}"));
            }
        }
        if !all.is_empty() {
            for ip in &sp.external_ips {
                let c = comment(&format!("{name} external IP"));
                vips.push(VipRule { addr: *ip, rule: format!("-d {ip}/32 {pm} {c} -j {}", names.ext) });
            }
            for ip in &sp.load_balancer_ips {
                let c = comment(&format!("{name} loadbalancer IP"));
                vips.push(VipRule { addr: *ip, rule: format!("-d {ip}/32 {pm} {c} -j {}", names.ext) });
            }
            if let Some(np) = sp.node_port {
                let p = spn.protocol.lower();
                nodeports.rules.push(format!("-p {p} -m {p} --dport {np} {} -j {}", comment(&name), names.ext));
            }
            let mut ext = Chain::new(Table::Nat, &names.ext);
            if sp.external_policy_local {
                if let Some(cidr) = cfg.cluster_cidr {
                    let c = comment(&format!("pod traffic for {name} external destinations"));
                    ext.rules.push(format!("-s {cidr} {c} -j {}", names.svc));
                }
                let c = comment(&format!("masquerade LOCAL traffic for {name} external destinations"));
                ext.rules.push(format!("-m addrtype --src-type LOCAL {c} -j {MARK_MASQ}"));
                let c = comment(&format!("route LOCAL traffic for {name} external destinations"));
                ext.rules.push(format!("-m addrtype --src-type LOCAL {c} -j {}", names.svc));
                if !local.is_empty() {
                    ext.rules.push(format!("-j {}", names.svl));
                }
            } else {
                let c = comment(&format!("masquerade traffic for {name} external destinations"));
                ext.rules.push(format!("{c} -j {MARK_MASQ}"));
                ext.rules.push(format!("-j {}", names.svc));
            }
            chains.push(ext);
        }
    }

    if !cfg.endpoint_chains {
        // Only an endpoint on this node can reach itself through this node's rules; an endpoint without
        // a node name (hand-written Endpoints) might be here.
        hairpin.extend(e.endpoints.iter().filter(|ep| ep.is_local || ep.node_name.is_none()).map(|ep| ep.ip));
    }
    if all.is_empty() || !want_chains {
        return chains;
    }
    let masq_cluster_ip = |chain: &mut Chain| {
        if let (Some(vip), Some(cidr)) = (sp.cluster_ip, cfg.cluster_cidr) {
            let c = comment(&format!("{name} cluster IP"));
            chain.rules.push(format!("-d {vip}/32 {pm} ! -s {cidr} {c} -j {MARK_MASQ}"));
        }
    };
    // The cluster chain (every endpoint) is needed for internal traffic unless internal is Local, and
    // for external traffic whenever the EXT chain can reach it.
    let mut svc = Chain::new(Table::Nat, &names.svc);
    if !sp.internal_policy_local {
        masq_cluster_ip(&mut svc);
    }
    balance(&mut svc, spn, &name, &all, sp.session_affinity.map(|d| d.as_secs()), cfg);
    chains.push(svc);
    if (sp.internal_policy_local || sp.external_policy_local) && !local.is_empty() {
        let mut svl = Chain::new(Table::Nat, &names.svl);
        if sp.internal_policy_local {
            masq_cluster_ip(&mut svl);
        }
        balance(&mut svl, spn, &name, &local, sp.session_affinity.map(|d| d.as_secs()), cfg);
        chains.push(svl);
    }
    if !uses_endpoint_chains(sp.session_affinity.is_some(), cfg) {
        return chains;
    }
    for ep in &all {
        let sep = endpoint_chain(spn, ep);
        let mut c = Chain::new(Table::Nat, &sep);
        if cfg.endpoint_chains {
            c.rules.push(format!("{} -s {}/32 -j {MARK_MASQ}", comment(&name), ep.ip));
        }
        let recent = match sp.session_affinity {
            Some(_) => format!(" -m recent --name {sep} --set"),
            None => String::new(),
        };
        c.rules.push(format!("{}{recent} {}", comment(&name), dnat(spn, ep)));
        chains.push(c);
    }
    chains
}

fn uses_endpoint_chains(affinity: bool, cfg: &Config) -> bool {
    affinity || cfg.endpoint_chains
}

fn dnat(spn: &ServicePortName, ep: &Endpoint) -> String {
    let p = spn.protocol.lower();
    format!("-p {p} -m {p} -j DNAT --to-destination {ep}")
}

/// Affinity checks first, then kube-proxy's statistic chain: endpoint i of n is taken with
/// probability 1/(n-i), so each ends up with 1/n. Without endpoint chains the chosen rule DNATs itself.
fn balance(
    chain: &mut Chain,
    spn: &ServicePortName,
    name: &str,
    eps: &[&Endpoint],
    affinity: Option<u64>,
    cfg: &Config,
) {
    let to = |ep: &Endpoint| {
        if uses_endpoint_chains(affinity.is_some(), cfg) {
            format!("-j {}", endpoint_chain(spn, ep))
        } else {
            dnat(spn, ep)
        }
    };
    if let Some(secs) = affinity {
        for ep in eps {
            let sep = endpoint_chain(spn, ep);
            let c = comment(&format!("{name} -> {ep}"));
            chain.rules.push(format!("{c} -m recent --name {sep} --rcheck --seconds {secs} --reap -j {sep}"));
        }
    }
    let n = eps.len();
    for (i, ep) in eps.iter().enumerate() {
        let c = comment(&format!("{name} -> {ep}"));
        let to = to(ep);
        if i + 1 < n {
            let prob = 1.0 / (n - i) as f64;
            chain.rules.push(format!("{c} -m statistic --mode random --probability {prob:.10} {to}"));
        } else {
            chain.rules.push(format!("{c} {to}"));
        }
    }
}

/// Which address a prefix tree splits on, and what its sub-chains are called.
#[derive(Clone, Copy)]
enum Tree {
    /// The dispatch tree (WEFT-D-<net>-<len>): destination addresses.
    Dispatch,
    /// The hairpin tree (WEFT-HP-<net>-<len>): source addresses.
    Hairpin,
}

impl Tree {
    fn chain_name(self, net: u32, len: u8) -> String {
        let family = match self {
            Tree::Dispatch => "WEFT-D-",
            Tree::Hairpin => "WEFT-HP-",
        };
        format!("{family}{}-{len}", Ipv4Addr::from(net))
    }
    fn flag(self) -> &'static str {
        match self {
            Tree::Dispatch => "-d",
            Tree::Hairpin => "-s",
        }
    }
    fn owns(name: &str) -> bool {
        name.starts_with("WEFT-D-") || name.starts_with("WEFT-HP-")
    }
}

/// Fills `chain` with the rules for `vips` (sorted by address), splitting into sub-chains when large.
fn dispatch_tree(tree: Tree, chain: &mut Chain, vips: &[VipRule], leaf: usize, out: &mut Vec<Chain>) {
    let first = u32::from(vips[0].addr);
    let last = u32::from(vips[vips.len() - 1].addr);
    if vips.len() <= leaf || first == last {
        chain.rules.extend(vips.iter().map(|v| v.rule.clone()));
        return;
    }
    let common = (first ^ last).leading_zeros() as u8;
    let len = (common + 4).min(32);
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - u32::from(len)) };
    let mut start = 0;
    while start < vips.len() {
        let net = u32::from(vips[start].addr) & mask;
        let end = start + vips[start..].iter().take_while(|v| u32::from(v.addr) & mask == net).count();
        let group = &vips[start..end];
        if group.len() <= 2 && group.iter().all(|v| v.addr == group[0].addr) {
            // A jump to a chain of one or two rules costs more than the rules themselves.
            chain.rules.extend(group.iter().map(|v| v.rule.clone()));
        } else {
            let name = tree.chain_name(net, len);
            chain.rules.push(format!("{} {}/{len} -j {name}", tree.flag(), Ipv4Addr::from(net)));
            let mut child = Chain::new(Table::Nat, name);
            dispatch_tree(tree, &mut child, group, leaf, out);
            out.push(child);
        }
        start = end;
    }
}

fn new_lists() -> Lists {
    Lists {
        vips: Vec::new(),
        hairpin: Vec::new(),
        nodeports: Chain::new(Table::Nat, NODEPORTS),
        filter_services: Chain::new(Table::Filter, SERVICES),
        filter_external: Chain::new(Table::Filter, EXTERNAL_SERVICES),
    }
}

/// The chains owned by one service port (its shared rules are rendered into a scratch list and dropped:
/// `shared` renders those for every port).
fn chains_of(spn: &ServicePortName, e: &ServiceEntry, cfg: &Config) -> Vec<Chain> {
    render_service(spn, e, cfg, &mut new_lists(), true)
}

/// The chains every service port adds rules to, from the whole table. Built first and held through a sync
/// (a few megabytes at 10,000 services); the per-port chains are rendered one port at a time (`chains_of`).
fn shared(table: &ServiceTable, cfg: &Config) -> Shared {
    let mut lists = new_lists();
    for (spn, e) in table {
        render_service(spn, e, cfg, &mut lists, false);
    }
    let Lists { mut vips, mut hairpin, nodeports, filter_services, filter_external } = lists;
    let mark = cfg.mark();
    let mut base = Vec::new();
    let mut mm = Chain::new(Table::Nat, MARK_MASQ);
    mm.rules.push(format!("-j MARK --or-mark {mark}"));
    base.push(mm);
    let mut post = Chain::new(Table::Nat, POSTROUTING);
    if !cfg.endpoint_chains {
        // A pod reaching itself through a service: after DNAT its source and destination are equal,
        // which iptables cannot compare, so one rule per address that may be local, in a source tree.
        hairpin.sort();
        hairpin.dedup();
        let rules: Vec<VipRule> = hairpin
            .iter()
            .map(|ip| VipRule { addr: *ip, rule: format!("-s {ip}/32 -d {ip}/32 -j MASQUERADE") })
            .collect();
        let mut hp = Chain::new(Table::Nat, HAIRPIN);
        if !rules.is_empty() {
            dispatch_tree(Tree::Hairpin, &mut hp, &rules, cfg.dispatch_leaf.max(1), &mut base);
        }
        base.push(hp);
        let c = comment("hairpin: an endpoint reaching itself through a service");
        post.rules.push(format!("-m conntrack --ctstate DNAT {c} -j {HAIRPIN}"));
    }
    post.rules.push(format!("-m mark ! --mark {mark}/{mark} -j RETURN"));
    post.rules.push(format!("-j MARK --xor-mark {mark}"));
    post.rules.push(format!("{} -j MASQUERADE --random-fully", comment("weft service traffic requiring SNAT")));
    base.push(post);
    base.push(filter_services);
    base.push(filter_external);
    let mut fwd = Chain::new(Table::Filter, FORWARD);
    fwd.rules.push(format!("{} -m mark --mark {mark}/{mark} -j ACCEPT", comment("weft forwarding rules")));
    fwd.rules.push(format!(
        "{} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        comment("weft forwarding conntrack rule")
    ));
    base.push(fwd);

    let mut root = Chain::new(Table::Nat, SERVICES);
    vips.sort_by_key(|v| v.addr);
    let mut dispatch = Vec::new();
    if !vips.is_empty() {
        dispatch_tree(Tree::Dispatch, &mut root, &vips, cfg.dispatch_leaf.max(1), &mut dispatch);
    }
    let np = comment("weft service nodeports; NOTE: this must be the last rule in this chain");
    if cfg.nodeport_addresses.is_empty() {
        root.rules.push(format!("{np} -m addrtype --dst-type LOCAL -j {NODEPORTS}"));
    } else {
        for net in &cfg.nodeport_addresses {
            root.rules.push(format!("-d {net} {np} -m addrtype --dst-type LOCAL -j {NODEPORTS}"));
        }
    }
    // Children before parents (`dispatch_tree` pushes them that way), the root last.
    dispatch.push(nodeports);
    dispatch.push(root);
    Shared { base, dispatch }
}

/// One `iptables-restore --noflush` input, per table.
#[derive(Default)]
struct Batch {
    decls: BTreeMap<Table, Vec<String>>,
    rules: BTreeMap<Table, Vec<String>>,
    deletes: BTreeMap<Table, Vec<String>>,
    rule_count: usize,
}

impl Batch {
    fn text(&self) -> String {
        let mut s = String::new();
        for t in [Table::Filter, Table::Nat] {
            let (d, r, x) = (self.decls.get(&t), self.rules.get(&t), self.deletes.get(&t));
            if d.is_none() && r.is_none() && x.is_none() {
                continue;
            }
            let _ = writeln!(s, "*{}", t.name());
            for line in [d, r, x].into_iter().flatten().flatten() {
                s.push_str(line);
                s.push('\n');
            }
            s.push_str("COMMIT\n");
        }
        s
    }
}

/// The restore inputs being rendered, in dependency order (a chain is written in the same batch as, or a later
/// batch than, every chain it jumps to), each handed to `sink` as soon as it is complete: a sync holds one
/// batch of text at a time, never the whole ruleset.
struct Restore<'a, E> {
    cur: Batch,
    max_rules: usize,
    stats: SyncStats,
    sink: &'a mut dyn FnMut(String) -> Result<(), E>,
}

impl<'a, E> Restore<'a, E> {
    fn new(max_rules: usize, sink: &'a mut dyn FnMut(String) -> Result<(), E>) -> Self {
        Restore { cur: Batch::default(), max_rules: max_rules.max(1), stats: SyncStats::default(), sink }
    }
    /// A safe point to start a new batch: everything written so far is self-contained.
    fn boundary(&mut self) -> Result<(), E> {
        if self.cur.rule_count >= self.max_rules {
            self.flush()?;
        }
        Ok(())
    }
    fn flush(&mut self) -> Result<(), E> {
        let text = std::mem::take(&mut self.cur).text();
        if text.is_empty() {
            return Ok(());
        }
        self.stats.bytes += text.len();
        (self.sink)(text)
    }
    fn write(&mut self, c: &Chain) {
        let b = &mut self.cur;
        b.decls.entry(c.table).or_default().push(format!(":{} - [0:0]", c.name));
        let rules = b.rules.entry(c.table).or_default();
        rules.extend(c.rules.iter().map(|r| format!("-A {} {r}", c.name)));
        b.rule_count += c.rules.len();
        self.stats.chains_written += 1;
        self.stats.rules_written += c.rules.len();
    }
    fn hook(&mut self, table: Table, builtin: &str, target: &str, matches: &str) {
        self.cur.rules.entry(table).or_default().push(format!("-I {builtin} {matches} -j {target}"));
    }
    fn delete(&mut self, (table, name): &ChainKey) {
        // Declaring flushes it, so references from other chains being deleted are gone first.
        let b = &mut self.cur;
        b.decls.entry(*table).or_default().push(format!(":{name} - [0:0]"));
        b.deletes.entry(*table).or_default().push(format!("-X {name}"));
        self.stats.chains_deleted += 1;
    }
    fn finish(mut self) -> Result<SyncStats, E> {
        self.flush()?;
        Ok(self.stats)
    }
}

/// A rendered sync held whole: the `iptables-restore --noflush` inputs, the state they leave, and their counts.
/// For tests, golden files and benchmarks; the dataplane streams them (`stream_full`, `stream_partial`).
#[derive(Debug, Clone)]
pub struct Rendered {
    /// The restore inputs, in order (see `Config::restore_batch_rules`).
    pub batches: Vec<String>,
    pub state: ChainState,
    pub stats: SyncStats,
}

impl Rendered {
    /// Everything as one restore input (what golden files hold).
    pub fn text(&self) -> String {
        self.batches.concat()
    }

    fn collect(
        render: impl FnOnce(
            &mut dyn FnMut(String) -> Result<(), std::convert::Infallible>,
        ) -> Result<(ChainState, SyncStats), std::convert::Infallible>,
    ) -> Rendered {
        let mut batches = Vec::new();
        let (state, stats) = match render(&mut |b| {
            batches.push(b);
            Ok(())
        }) {
            Ok(r) => r,
            Err(never) => match never {},
        };
        Rendered { batches, state, stats }
    }
}

/// Full sync: every chain, the hooks `existing` lacks, and every `WEFT-` chain in `existing` that
/// the table does not claim flushed and deleted.
pub fn render_sync_full(table: &ServiceTable, cfg: &Config, existing: &Existing) -> Rendered {
    Rendered::collect(|sink| stream_full(table, cfg, existing, sink))
}

/// `render_sync_full`, each restore input handed to `sink` as soon as it is rendered. The per-port chains are
/// rendered one port at a time, so what is held is the shared chains, one batch and the chain state.
pub fn stream_full<E>(
    table: &ServiceTable,
    cfg: &Config,
    existing: &Existing,
    sink: &mut dyn FnMut(String) -> Result<(), E>,
) -> Result<(ChainState, SyncStats), E> {
    let d = shared(table, cfg);
    let mut r = Restore::new(cfg.restore_batch_rules, sink);
    let mut state = ChainState::default();
    for c in &d.base {
        // Base chains are written children first, so any chain boundary is safe.
        r.boundary()?;
        r.write(c);
        state.chains.insert(c.key(), c.hash());
    }
    for (spn, e) in table {
        r.boundary()?;
        let chains = chains_of(spn, e, cfg);
        for c in &chains {
            r.write(c);
            state.chains.insert(c.key(), c.hash());
        }
        state.owners.insert(spn.clone(), chains.iter().map(Chain::key).collect());
    }
    for c in &d.dispatch {
        r.boundary()?;
        r.write(c);
        state.chains.insert(c.key(), c.hash());
    }
    for (t, builtin, target, matches) in hooks() {
        if !existing.hooks.contains(&(t, builtin.to_string(), target.to_string())) {
            r.hook(t, builtin, target, matches);
        }
    }
    for key in existing.chains.iter().filter(|k| !state.chains.contains_key(*k)) {
        r.delete(key);
    }
    let mut stats = r.finish()?;
    stats.full = true;
    Ok((state, stats))
}

/// Everything for a fresh node: all chains and hooks (what the golden files hold).
pub fn render_full(table: &ServiceTable, cfg: &Config) -> String {
    render_sync_full(table, cfg, &Existing::default()).text()
}

/// Partial sync: rewrites the chains of `changed` ports and the shared chains whose rules differ from
/// `previous`; deletes chains `previous` holds that are no longer claimed. Unchanged chains are not written.
pub fn render_partial(
    table: &ServiceTable,
    changed: &BTreeSet<ServicePortName>,
    cfg: &Config,
    previous: &ChainState,
) -> Rendered {
    Rendered::collect(|sink| stream_partial(table, changed, cfg, previous, sink))
}

/// `render_partial`, each restore input handed to `sink` as soon as it is rendered.
pub fn stream_partial<E>(
    table: &ServiceTable,
    changed: &BTreeSet<ServicePortName>,
    cfg: &Config,
    previous: &ChainState,
    sink: &mut dyn FnMut(String) -> Result<(), E>,
) -> Result<(ChainState, SyncStats), E> {
    let d = shared(table, cfg);
    let mut r = Restore::new(cfg.restore_batch_rules, sink);
    let mut state = previous.clone();
    // The trees' shapes may change: forget every old tree chain, then claim the current ones.
    state.chains.retain(|(t, n), _| !(*t == Table::Nat && Tree::owns(n)));
    let emit = |c: &Chain, r: &mut Restore<'_, E>, state: &mut ChainState| {
        let h = c.hash();
        if previous.chains.get(&c.key()) != Some(&h) {
            r.write(c);
        }
        state.chains.insert(c.key(), h);
    };
    for c in &d.base {
        r.boundary()?;
        emit(c, &mut r, &mut state);
    }
    for spn in changed {
        r.boundary()?;
        let old = state.owners.remove(spn).unwrap_or_default();
        for k in &old {
            state.chains.remove(k);
        }
        if let Some(e) = table.get(spn) {
            let chains = chains_of(spn, e, cfg);
            for c in &chains {
                emit(c, &mut r, &mut state);
            }
            state.owners.insert(spn.clone(), chains.iter().map(Chain::key).collect());
        }
    }
    for c in &d.dispatch {
        r.boundary()?;
        emit(c, &mut r, &mut state);
    }
    // Sweep: whatever we had written and nobody claims any more.
    for key in previous.chains.keys().filter(|k| !state.chains.contains_key(*k)) {
        r.delete(key);
    }
    Ok((state, r.finish()?))
}

/// The iptables dataplane: one `iptables-restore --noflush` per sync.
pub struct IptablesDataplane<R: Runner = CommandRunner> {
    runner: R,
    cfg: Config,
    /// What we last wrote; None forces the next sync to be full (start, or after a failure).
    state: Option<ChainState>,
    /// The UDP ports of the table last synced, to find flows that went stale.
    stale_udp: StaleUdpFlows,
}

impl<R: Runner> IptablesDataplane<R> {
    pub fn new(runner: R, cfg: Config) -> Self {
        IptablesDataplane { runner, cfg, state: None, stale_udp: StaleUdpFlows::default() }
    }

    /// The chains we believe the kernel holds (None before the first successful sync).
    pub fn state(&self) -> Option<&ChainState> {
        self.state.as_ref()
    }
}

/// Runs one `iptables-restore --noflush` per restore input handed to it, writing the input into the tool's stdin.
fn applier<R: Runner>(runner: &mut R) -> impl FnMut(String) -> Result<()> + '_ {
    move |batch| restore::restore_with(&mut *runner, &mut |w| w.write_all(batch.as_bytes()))
}

impl<R: Runner> Dataplane for IptablesDataplane<R> {
    fn mode(&self) -> &'static str {
        "iptables"
    }

    fn describe(&self, port: &ServicePortName) -> Option<String> {
        Some(service_chains(port).svc)
    }

    /// A fresh full render as one `iptables-restore --test` input (batches are not self-contained when nothing
    /// is committed between them), written as it is rendered; nothing reaches the kernel.
    fn check(&mut self, table: &ServiceTable) -> dataplane::Result<()> {
        let cfg = &self.cfg;
        let mut input = |w: &mut dyn std::io::Write| {
            stream_full(table, cfg, &Existing::default(), &mut |batch| w.write_all(batch.as_bytes())).map(|_| ())
        };
        Ok(restore::test_restore_with(&mut self.runner, &mut input)?)
    }

    fn sync(
        &mut self,
        table: &ServiceTable,
        changed: Option<&BTreeSet<ServicePortName>>,
    ) -> dataplane::Result<SyncStats> {
        let started = Instant::now();
        // None from here until every restore succeeded: after a failure the next sync is full.
        let previous = self.state.take();
        // Each restore input is applied as soon as it is rendered.
        let (state, mut stats) = match (changed, previous) {
            (Some(changed), Some(prev)) => {
                stream_partial(table, changed, &self.cfg, &prev, &mut applier(&mut self.runner))?
            }
            _ => {
                let existing = read_existing(&mut self.runner)?;
                stream_full(table, &self.cfg, &existing, &mut applier(&mut self.runner))?
            }
        };
        self.state = Some(state);
        // kube-proxy does the same: UDP flows to removed endpoints are deleted after the rules changed.
        self.stale_udp.clear(&mut self.runner, table);
        stats.duration = started.elapsed();
        tracing::debug!(
            full = stats.full,
            chains = stats.chains_written,
            deleted = stats.chains_deleted,
            "iptables sync"
        );
        Ok(stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Protocol, ServicePort};
    use serde_json::json;

    fn golden_table(variant: u8) -> ServiceTable {
        let svc = |v: serde_json::Value| serde_json::from_value(v).unwrap();
        let eps = |v: serde_json::Value| serde_json::from_value(v).unwrap();
        let mut services: Vec<k8s_openapi::api::core::v1::Service> = vec![
            svc(json!({"metadata": {"name": "web", "namespace": "default"}, "spec": {"clusterIP": "10.96.0.10",
                "ports": [{"name": "http", "port": 80}]}})),
            svc(json!({"metadata": {"name": "np", "namespace": "default"}, "spec": {"type": "NodePort",
                "clusterIP": "10.96.0.20", "ports": [{"port": 80, "nodePort": 30080}]}})),
            svc(json!({"metadata": {"name": "ext", "namespace": "default"}, "spec": {"clusterIP": "10.96.1.30",
                "externalIPs": ["80.11.12.10"], "ports": [{"port": 80}]}})),
            svc(json!({"metadata": {"name": "empty", "namespace": "default"}, "spec": {"type": "NodePort",
                "clusterIP": "10.96.0.50", "ports": [{"port": 80, "nodePort": 30050}]}})),
            svc(json!({"metadata": {"name": "local", "namespace": "default"}, "spec": {"type": "NodePort",
                "clusterIP": "10.96.0.60", "externalTrafficPolicy": "Local",
                "ports": [{"port": 80, "nodePort": 30060, "protocol": "UDP"}]}})),
        ];
        if variant == 0 {
            services.push(svc(json!({"metadata": {"name": "sticky", "namespace": "default"}, "spec": {
                "clusterIP": "10.96.0.40", "sessionAffinity": "ClientIP", "ports": [{"port": 80}]}})));
        } else {
            services.push(svc(json!({"metadata": {"name": "new", "namespace": "default"}, "spec": {
                "clusterIP": "10.96.0.70", "ports": [{"port": 443}]}})));
        }
        let web_eps = if variant == 0 {
            json!([{"ip": "10.244.1.5", "nodeName": "node-1"}, {"ip": "10.244.2.7"}])
        } else {
            json!([{"ip": "10.244.1.5", "nodeName": "node-1"}])
        };
        let ep = |name: &str, addresses: serde_json::Value, ports: serde_json::Value| {
            eps(json!({"metadata": {"name": name}, "subsets": [{"addresses": addresses, "ports": ports}]}))
        };
        let endpoints: Vec<k8s_openapi::api::core::v1::Endpoints> = vec![
            ep("web", web_eps, json!([{"name": "http", "port": 8080}])),
            ep("np", json!([{"ip": "10.244.2.8"}]), json!([{"port": 8080}])),
            ep("ext", json!([{"ip": "10.244.1.6", "nodeName": "node-1"}]), json!([{"port": 80}])),
            ep("sticky", json!([{"ip": "10.244.1.7"}, {"ip": "10.244.2.9"}]), json!([{"port": 80}])),
            ep(
                "local",
                json!([{"ip": "10.244.1.8", "nodeName": "node-1"}, {"ip": "10.244.2.10", "nodeName": "node-2"}]),
                json!([{"port": 53, "protocol": "UDP"}]),
            ),
            ep("new", json!([{"ip": "10.244.1.9"}]), json!([{"port": 8443}])),
        ];
        let (table, skipped) = crate::table::from_objects(services, endpoints, "node-1");
        assert!(skipped.is_empty(), "{skipped:?}");
        table
    }

    fn golden_cfg() -> Config {
        Config { cluster_cidr: Some("10.244.0.0/16".parse().unwrap()), dispatch_leaf: 4, ..Config::default() }
    }

    fn check_golden(name: &str, got: &str) {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata").join(name);
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, got).unwrap();
        }
        let want = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (UPDATE_GOLDEN=1 writes it)", path.display()));
        assert_eq!(got, want, "{name} differs; UPDATE_GOLDEN=1 rewrites it, then review the diff");
    }

    fn changed_between(a: &ServiceTable, b: &ServiceTable) -> BTreeSet<ServicePortName> {
        a.keys().chain(b.keys()).filter(|k| a.get(*k) != b.get(*k)).cloned().collect()
    }

    #[test]
    fn golden_full() {
        check_golden("full.golden", &render_full(&golden_table(0), &golden_cfg()));
    }

    #[test]
    fn golden_partial() {
        let (before, after) = (golden_table(0), golden_table(1));
        let full = render_sync_full(&before, &golden_cfg(), &Existing::default());
        let changed = changed_between(&before, &after);
        let partial = render_partial(&after, &changed, &golden_cfg(), &full.state);
        check_golden("partial.golden", &partial.text());
        // The state after a partial is what a full render of the new table would leave.
        let fresh = render_sync_full(&after, &golden_cfg(), &Existing::default());
        assert_eq!(partial.state, fresh.state);
    }

    #[test]
    fn batches_only_jump_to_chains_already_declared() {
        let cfg = Config { restore_batch_rules: 5, ..golden_cfg() };
        let r = render_sync_full(&golden_table(0), &cfg, &Existing::default());
        assert!(r.batches.len() > 3, "{}", r.batches.len());
        assert_eq!(r.batches.concat(), r.text());
        let mut declared = BTreeSet::new();
        for b in &r.batches {
            declared.extend(b.lines().filter_map(|l| l.strip_prefix(':')?.split_whitespace().next()));
            for l in b.lines().filter(|l| l.starts_with("-A ") || l.starts_with("-I ")) {
                let target = l.split_whitespace().skip_while(|w| *w != "-j").nth(1).unwrap();
                assert!(!target.starts_with(PREFIX) || declared.contains(target), "{l} before {target} exists");
            }
        }
    }

    #[test]
    fn chain_names_match_kube_proxy() {
        // Values from kube-proxy's proxier tests (KUBE- prefix there).
        let spn = ServicePortName::new("ns1", "svc1", "p80", Protocol::Tcp);
        assert_eq!(service_chains(&spn).svc, "WEFT-SVC-XPGD46QRK7WJZT7O");
        let ep = Endpoint { ip: [10, 180, 0, 1].into(), port: 80, node_name: None, is_local: false, ready: true };
        assert_eq!(endpoint_chain(&spn, &ep), "WEFT-SEP-SXIVWICOYRO3J4NJ");
    }

    #[test]
    fn statistic_probabilities_are_kube_proxys() {
        let text = render_full(&golden_table(0), &golden_cfg());
        assert!(text.contains("--probability 0.5000000000"));
        let mut t = ServiceTable::new();
        let spn = ServicePortName::new("a", "b", "", Protocol::Tcp);
        let eps = (1..=3)
            .map(|i| Endpoint { ip: [10, 0, 0, i].into(), port: 80, node_name: None, is_local: false, ready: true })
            .collect();
        t.insert(spn, ServiceEntry { port: port([10, 96, 0, 1]), endpoints: eps });
        let text = render_full(&t, &Config::default());
        assert!(text.contains("--probability 0.3333333333"), "{text}");
        assert!(text.contains("--probability 0.5000000000"));
    }

    fn port(ip: [u8; 4]) -> ServicePort {
        ServicePort::cluster_ip(ip.into(), 80)
    }

    /// `n` services in 10.96.0.0/12 spread like a random allocator would, 10 endpoints each.
    fn big_table(n: u32) -> ServiceTable {
        let mut t = ServiceTable::new();
        let mut used = BTreeSet::new();
        let mut x: u32 = 12345;
        for i in 0..n {
            let vip = loop {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                let vip = Ipv4Addr::from(0x0A60_0000 | (x >> 12) & 0x000F_FFFF);
                if used.insert(vip) {
                    break vip;
                }
            };
            let spn = ServicePortName::new("bench", &format!("svc-{i}"), "", Protocol::Tcp);
            let eps = (0..10)
                .map(|j| Endpoint {
                    ip: Ipv4Addr::from(0x0AF4_0000 + i * 10 + j),
                    port: 8080,
                    // Ten nodes; this one is node-0.
                    node_name: Some(format!("node-{j}").into()),
                    is_local: j == 0,
                    ready: true,
                })
                .collect();
            t.insert(spn, ServiceEntry { port: port(vip.octets()), endpoints: eps });
        }
        t
    }

    /// Walks nat from WEFT-SERVICES for a TCP packet to `dst:80` like the kernel would, counting the rules
    /// evaluated until it jumps to a service chain (Some) or leaves WEFT-SERVICES (None).
    fn walk(chains: &BTreeMap<String, Vec<String>>, dst: Ipv4Addr) -> (usize, Option<String>) {
        let mut evaluated = 0;
        let mut chain = SERVICES.to_string();
        'outer: loop {
            for rule in &chains[&chain] {
                evaluated += 1;
                let words: Vec<&str> = rule.split_whitespace().collect();
                let target = words[words.iter().position(|w| *w == "-j").unwrap() + 1];
                if let Some(i) = words.iter().position(|w| *w == "-d") {
                    let net: Ipv4Network = words[i + 1].parse().unwrap();
                    if !net.contains(dst) {
                        continue;
                    }
                    if let Some(p) = words.iter().position(|w| *w == "--dport") {
                        if words[p + 1] != "80" {
                            continue;
                        }
                    }
                } else {
                    continue; // the NODEPORTS rule (addrtype LOCAL) never matches here
                }
                if target.starts_with("WEFT-D-") {
                    chain = target.to_string();
                    continue 'outer;
                }
                return (evaluated, Some(target.to_string()));
            }
            // Falling off a sub-chain returns to its parent, which has nothing else for this address.
            return (evaluated, None);
        }
    }

    fn nat_chains(table: &ServiceTable, cfg: &Config) -> BTreeMap<String, Vec<String>> {
        let d = shared(table, cfg);
        d.dispatch.into_iter().chain(d.base).filter(|c| c.table == Table::Nat).map(|c| (c.name, c.rules)).collect()
    }

    #[test]
    fn dispatch_walks_few_rules_at_10000_services() {
        let t = big_table(10_000);
        let chains = nat_chains(&t, &Config::default());
        let mut worst = 0;
        for (spn, e) in &t {
            let vip = e.port.cluster_ip.unwrap();
            let (n, target) = walk(&chains, vip);
            assert_eq!(target.as_deref(), Some(service_chains(spn).svc.as_str()), "{vip}");
            worst = worst.max(n);
        }
        // kube-proxy's linear KUBE-SERVICES: up to 10,000.
        assert!(worst <= 80, "worst case {worst} rules");
        for dst in ["10.244.3.4", "192.168.56.11", "8.8.8.8"] {
            let (n, target) = walk(&chains, dst.parse().unwrap());
            assert_eq!(target, None);
            assert!(n <= 40, "{dst}: {n} rules");
        }
    }

    #[test]
    fn endpoint_change_rewrites_only_that_service() {
        let before = big_table(2000);
        let mut after = before.clone();
        let spn = ServicePortName::new("bench", "svc-7", "", Protocol::Tcp);
        after.get_mut(&spn).unwrap().endpoints.pop();
        let svc = service_chains(&spn).svc;
        // weft's layout: the SVC chain alone; kube-proxy's: the SVC chain, and the SEP chain deleted.
        for (cfg, deleted) in [(Config::default(), 0), (Config { endpoint_chains: true, ..Config::default() }, 1)] {
            let full = render_sync_full(&before, &cfg, &Existing::default());
            let p = render_partial(&after, &[spn.clone()].into(), &cfg, &full.state);
            let text = p.text();
            let declared: Vec<&str> = text.lines().filter(|l| l.starts_with(':')).collect();
            assert_eq!(p.stats.chains_written, 1, "{}", p.text());
            assert_eq!(p.stats.chains_deleted, deleted, "{}", p.text());
            assert_eq!(declared.len(), 1 + deleted, "{declared:?}");
            assert!(declared.contains(&format!(":{svc} - [0:0]").as_str()));
            assert_eq!(p.text().contains("-X WEFT-SEP-"), deleted == 1);
            // Nothing changed: nothing written.
            let again = render_partial(&after, &[spn.clone()].into(), &cfg, &p.state);
            assert_eq!(again.text(), "");
        }
    }

    #[test]
    fn hairpin_rules_follow_the_local_endpoints() {
        let before = big_table(2000);
        let spn = ServicePortName::new("bench", "svc-7", "", Protocol::Tcp);
        let local = before[&spn].endpoints[0].ip;
        let full = render_sync_full(&before, &Config::default(), &Existing::default());
        let rule = format!("-s {local}/32 -d {local}/32 -j MASQUERADE");
        assert!(full.text().contains(&rule), "a local endpoint gets a hairpin rule");
        let remote = before[&spn].endpoints[1].ip;
        assert!(!full.text().contains(&format!("-s {remote}/32 -d {remote}/32")), "a remote endpoint does not");
        // The local endpoint goes: only the hairpin leaf holding it and the service chain are rewritten.
        let mut after = before.clone();
        after.get_mut(&spn).unwrap().endpoints.remove(0);
        let p = render_partial(&after, &[spn].into(), &Config::default(), &full.state);
        assert_eq!(p.stats.chains_written, 2, "{}", p.text());
        assert!(p.text().contains(":WEFT-HP-") && !p.text().contains(&rule), "{}", p.text());
        // kube-proxy's layout marks hairpin traffic in the SEP chains instead.
        let kube = render_full(&before, &Config { endpoint_chains: true, ..Config::default() });
        assert!(!kube.contains("WEFT-HAIRPIN") && kube.contains(&format!("-s {remote}/32 -j WEFT-MARK-MASQ")));
    }

    #[test]
    fn partial_syncs_reach_the_same_state_as_a_full_sync() {
        let cfg = Config { dispatch_leaf: 4, ..Config::default() };
        let mut table = big_table(60);
        let mut state = render_sync_full(&table, &cfg, &Existing::default()).state;
        let mut x: u32 = 7;
        for step in 0..40u32 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            let i = (x >> 16) % 80;
            let spn = ServicePortName::new("bench", &format!("svc-{i}"), "", Protocol::Tcp);
            let before = table.clone();
            match (x >> 8) % 4 {
                0 => {
                    table.remove(&spn);
                }
                1 => {
                    let mut e = ServiceEntry { port: port([10, 97, (i % 4) as u8, i as u8]), endpoints: vec![] };
                    e.port.session_affinity = (step % 2 == 0).then(|| std::time::Duration::from_secs(60));
                    table.insert(spn.clone(), e);
                }
                2 => {
                    if let Some(e) = table.get_mut(&spn) {
                        e.endpoints.truncate(e.endpoints.len() / 2);
                    }
                }
                _ => {
                    if let Some(e) = table.get_mut(&spn) {
                        e.port.node_port = Some(30000 + i as u16);
                        e.port.external_policy_local = step % 3 == 0;
                    }
                }
            }
            let changed = changed_between(&before, &table);
            state = render_partial(&table, &changed, &cfg, &state).state;
            let full = render_sync_full(&table, &cfg, &Existing::default()).state;
            assert_eq!(state, full, "step {step}");
        }
    }

    #[test]
    fn full_sync_sweeps_unclaimed_chains_and_skips_present_hooks() {
        let save = "*nat\n:PREROUTING ACCEPT [0:0]\n:WEFT-SERVICES - [0:0]\n:WEFT-SVC-OLDOLDOLDOLDOLD - [0:0]\n\
            :KUBE-SERVICES - [0:0]\n-A PREROUTING -m comment --comment \"weft service portals\" -j WEFT-SERVICES\n\
            COMMIT\n*filter\n:WEFT-FORWARD - [0:0]\nCOMMIT\n";
        let existing = parse_save(save);
        assert_eq!(existing.chains.len(), 3);
        assert!(existing.hooks.contains(&(Table::Nat, "PREROUTING".into(), SERVICES.into())));
        let r = render_sync_full(&ServiceTable::new(), &Config::default(), &existing);
        assert!(r.text().contains("-X WEFT-SVC-OLDOLDOLDOLDOLD"));
        assert!(!r.text().contains("-X WEFT-SERVICES"));
        assert!(!r.text().contains("-I PREROUTING"));
        assert!(r.text().contains("-I OUTPUT -m comment --comment \"weft service portals\" -j WEFT-SERVICES"));
        assert!(!r.text().contains("KUBE-"));
    }

    #[test]
    fn other_weft_chains_are_not_swept() {
        // The agent's ip-masq chains and the userspace mode's portals share the tables and the prefix.
        let save = "*nat\n:WEFT-POSTRTG - [0:0]\n:WEFT-PORTALS-HOST - [0:0]\n:WEFT-SVC-OLDOLDOLDOLDOLD - [0:0]\n\
            -A POSTROUTING -m comment --comment \"weft masq\" -j WEFT-POSTRTG\nCOMMIT\n\
            *filter\n:WEFT-FWD - [0:0]\n-A FORWARD -m comment --comment \"weft forward\" -j WEFT-FWD\nCOMMIT\n";
        let existing = parse_save(save);
        assert_eq!(existing.chains.len(), 1, "{:?}", existing.chains);
        assert!(existing.hooks.is_empty(), "{:?}", existing.hooks);
        let r = render_sync_full(&ServiceTable::new(), &Config::default(), &existing);
        for foreign in ["WEFT-POSTRTG", "WEFT-FWD", "WEFT-PORTALS-HOST"] {
            assert!(!r.text().contains(foreign), "{foreign} touched:\n{}", r.text());
        }
    }
}
