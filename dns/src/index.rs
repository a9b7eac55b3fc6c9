//! The record index: every name `weft dns` is authoritative for, from the summaries of the Services, Endpoints
//! and Pods the informers hold (the Kubernetes DNS-Based Service Discovery specification, 1.1.0). Names are
//! lowercase, without the trailing dot; records are compact (no wire encoding) so that 10,000 services fit in a
//! few megabytes. The records of one service name are a pure function of its group (`Group::records`); `State`
//! turns each change into the difference of that group's records (`Delta`), which `Index::apply` makes in place.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use ipnetwork::IpNetwork;
use k8s_openapi::api::core::v1::{Endpoints, Pod, Service};

/// The schema version `dns-version.<zone>` announces.
pub const SCHEMA_VERSION: &str = "1.1.0";

/// What the index and the answers depend on besides the objects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The cluster zone, lowercase, no trailing dot (`cluster.local`).
    pub zone: String,
    /// TTL of every authoritative record, and the SOA minimum (negative caching).
    pub ttl: u32,
    /// Networks whose reverse zones are served (the service network and the pod network).
    pub reverse: Vec<IpNetwork>,
}

impl Config {
    pub fn new(zone: &str, ttl: u32, reverse: Vec<IpNetwork>) -> Config {
        Config { zone: zone.trim_end_matches('.').to_ascii_lowercase(), ttl, reverse }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config::new(
            "cluster.local",
            30,
            vec!["10.96.0.0/12".parse().expect("literal"), "10.244.0.0/16".parse().expect("literal")],
        )
    }
}

/// One record's data. Names are lowercase and absolute, without the trailing dot.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Rdata {
    A(Ipv4Addr),
    Aaaa(Ipv6Addr),
    Srv {
        priority: u16,
        weight: u16,
        port: u16,
        target: Arc<str>,
    },
    Ptr(Arc<str>),
    Cname(Arc<str>),
    Txt(Arc<str>),
    /// The zone's SOA (its serial is the index's).
    Soa,
    Ns(Arc<str>),
}

impl Rdata {
    /// The record type's number on the wire.
    pub fn rtype(&self) -> u16 {
        match self {
            Rdata::A(_) => 1,
            Rdata::Ns(_) => 2,
            Rdata::Cname(_) => 5,
            Rdata::Soa => 6,
            Rdata::Ptr(_) => 12,
            Rdata::Txt(_) => 16,
            Rdata::Aaaa(_) => 28,
            Rdata::Srv { .. } => 33,
        }
    }
}

/// Where a record lives: a name in the cluster zone, relative to it (`web.default.svc`; `""` is the apex), or
/// the reverse name of an address (kept by address: 19,000 `in-addr.arpa` strings less at 10,000 services).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Owner {
    Name(Box<str>),
    Ptr(IpAddr),
}

/// Each distinct record at a name with the number of contributions that put it there: two services with one
/// address share the PTR record of it, which stays until both are gone. Most names have one record, kept
/// inline (an allocation less for each of 50,000 names at 10,000 services).
#[derive(Debug)]
enum Recs {
    One([(Rdata, u32); 1]),
    Many(Box<[(Rdata, u32)]>),
}

impl Default for Recs {
    fn default() -> Self {
        Recs::Many(Box::default())
    }
}

impl Recs {
    fn as_slice(&self) -> &[(Rdata, u32)] {
        match self {
            Recs::One(r) => r,
            Recs::Many(r) => r,
        }
    }

    fn as_mut_slice(&mut self) -> &mut [(Rdata, u32)] {
        match self {
            Recs::One(r) => r,
            Recs::Many(r) => r,
        }
    }

    fn is_empty(&self) -> bool {
        self.as_slice().is_empty()
    }

    /// Changes the list as a vector (rare: a record added or gone), then stores it compactly again.
    fn edit(&mut self, f: impl FnOnce(&mut Vec<(Rdata, u32)>)) {
        let mut v = match std::mem::take(self) {
            Recs::One([r]) => vec![r],
            Recs::Many(r) => r.into_vec(),
        };
        f(&mut v);
        *self = match v.len() {
            1 => Recs::One([v.remove(0)]),
            _ => Recs::Many(v.into_boxed_slice()),
        };
    }
}

#[derive(Debug, Default)]
struct Node {
    recs: Recs,
    /// Names directly below this one that exist: a name with no records exists while it has any (an empty
    /// non-terminal such as `svc.<zone>`), or while it is pinned (`pod.<zone>`, counted as a child).
    children: u32,
}

/// The records at one name, as the index holds them.
#[derive(Debug, Clone, Copy)]
pub struct Records<'a>(&'a [(Rdata, u32)]);

impl<'a> Records<'a> {
    pub fn iter(&self) -> impl Iterator<Item = &'a Rdata> + 'a {
        self.0.iter().map(|(r, _)| r)
    }

    pub fn to_vec(&self) -> Vec<Rdata> {
        self.iter().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Every authoritative name. A name present with no records exists (an empty non-terminal such as
/// `svc.<zone>`, or a headless service's parent of endpoint names): NODATA, not NXDOMAIN. Changed in place by
/// `apply` (one service's records at a time, see `State`); the server guards it with a lock that queries hold
/// for one answer.
#[derive(Debug)]
pub struct Index {
    zone: Box<str>,
    names: HashMap<Box<str>, Node>,
    ptrs: HashMap<IpAddr, Recs>,
    /// SOA serial: the time in seconds of the last change, as CoreDNS does.
    pub serial: u32,
    pub services: usize,
    /// Distinct records.
    pub records: usize,
}

impl Index {
    /// The records every zone has: SOA and NS at the apex, `dns-version`, and `pod.<zone>` (whose names are
    /// computed from the query, see `answer`).
    pub fn empty(cfg: &Config, serial: u32) -> Index {
        let zone = cfg.zone.as_str();
        let mut idx =
            Index { zone: zone.into(), names: HashMap::new(), ptrs: HashMap::new(), serial, services: 0, records: 0 };
        idx.add(&Owner::Name("".into()), Rdata::Soa);
        idx.add(&Owner::Name("".into()), Rdata::Ns(Arc::from(format!("ns.dns.{zone}"))));
        idx.add(&Owner::Name("dns-version".into()), Rdata::Txt(Arc::from(SCHEMA_VERSION)));
        idx.node("pod").children += 1;
        idx
    }

    /// The records at `name` (lowercase, absolute, no trailing dot); `None` when the name does not exist.
    pub fn get(&self, name: &str) -> Option<Records<'_>> {
        if let Some(rel) = self.relative(name) {
            return self.names.get(rel).map(|n| Records(n.recs.as_slice()));
        }
        self.ptrs.get(&reverse_ip(name)?).map(|r| Records(r.as_slice()))
    }

    /// Names that exist, records or not.
    pub fn names(&self) -> usize {
        self.names.len() + self.ptrs.len()
    }

    fn relative<'a>(&self, name: &'a str) -> Option<&'a str> {
        if name == &*self.zone {
            return Some("");
        }
        name.strip_suffix(&*self.zone)?.strip_suffix('.')
    }

    fn absolute(&self, rel: &str) -> String {
        if rel.is_empty() {
            self.zone.to_string()
        } else {
            format!("{rel}.{}", self.zone)
        }
    }

    /// Every name that exists with its records, both sorted: for tests and the benchmark's zone file.
    pub fn snapshot(&self) -> Vec<(String, Vec<Rdata>)> {
        let sorted = |rs: &Recs| {
            let mut v: Vec<Rdata> = rs.as_slice().iter().map(|(r, _)| r.clone()).collect();
            v.sort();
            v
        };
        let mut out: Vec<(String, Vec<Rdata>)> =
            self.names.iter().map(|(k, n)| (self.absolute(k), sorted(&n.recs))).collect();
        out.extend(self.ptrs.iter().map(|(ip, rs)| (reverse_name(*ip), sorted(rs))));
        out.sort();
        out
    }

    /// Every (name, record), sorted.
    pub fn dump(&self) -> Vec<(String, Rdata)> {
        self.snapshot().into_iter().flat_map(|(n, rs)| rs.into_iter().map(move |r| (n.clone(), r))).collect()
    }

    /// The node at `rel`, created (and linked into its parent) if it did not exist.
    fn node(&mut self, rel: &str) -> &mut Node {
        if !self.names.contains_key(rel) {
            self.names.insert(rel.into(), Node::default());
            self.link(rel);
        }
        self.names.get_mut(rel).expect("inserted above")
    }

    /// `rel` was just created: its parent gains a child, and is created itself if it did not exist.
    fn link(&mut self, rel: &str) {
        let mut cur = rel;
        while !cur.is_empty() {
            let parent = parent_of(cur);
            if let Some(n) = self.names.get_mut(parent) {
                n.children += 1;
                return;
            }
            self.names.insert(parent.into(), Node { recs: Recs::default(), children: 1 });
            cur = parent;
        }
    }

    /// `rel` may have become empty: remove it, and its parents that existed only for it.
    fn prune(&mut self, rel: &str) {
        let mut cur = rel;
        loop {
            match self.names.get(cur) {
                Some(n) if n.recs.is_empty() && n.children == 0 && !cur.is_empty() => {}
                _ => return,
            }
            self.names.remove(cur);
            let parent = parent_of(cur);
            let Some(p) = self.names.get_mut(parent) else { return };
            p.children = p.children.saturating_sub(1);
            cur = parent;
        }
    }

    /// Adds one contribution of `r` at `owner`.
    pub fn add(&mut self, owner: &Owner, r: Rdata) {
        let recs = match owner {
            Owner::Name(rel) => &mut self.node(rel).recs,
            Owner::Ptr(ip) => self.ptrs.entry(*ip).or_default(),
        };
        if let Some(e) = recs.as_mut_slice().iter_mut().find(|(x, _)| *x == r) {
            e.1 += 1;
            return;
        }
        recs.edit(|v| v.push((r, 1)));
        self.records += 1;
    }

    /// Takes back one contribution of `r` at `owner` (one that `add` made).
    pub fn remove(&mut self, owner: &Owner, r: &Rdata) {
        let recs = match owner {
            Owner::Name(rel) => self.names.get_mut(&**rel).map(|n| &mut n.recs),
            Owner::Ptr(ip) => self.ptrs.get_mut(ip),
        };
        let Some(recs) = recs else { return };
        let Some(i) = recs.as_slice().iter().position(|(x, _)| x == r) else { return };
        if let Some(e) = recs.as_mut_slice().get_mut(i).filter(|e| e.1 > 1) {
            e.1 -= 1;
            return;
        }
        recs.edit(|v| {
            v.remove(i);
        });
        self.records -= 1;
        match owner {
            Owner::Name(rel) => self.prune(rel),
            Owner::Ptr(ip) => {
                if self.ptrs.get(ip).is_some_and(|rs| rs.is_empty()) {
                    self.ptrs.remove(ip);
                }
            }
        }
    }

    /// Applies what one change did to the records (see `State`).
    pub fn apply(&mut self, delta: &Delta) {
        for (owner, r) in &delta.removed {
            self.remove(owner, r);
        }
        for (owner, r) in &delta.added {
            self.add(owner, r.clone());
        }
        self.services = self.services.saturating_add_signed(delta.services);
    }
}

/// The parent of a relative name (`""` is the apex's, and the apex has none).
fn parent_of(rel: &str) -> &str {
    rel.split_once('.').map(|(_, p)| p).unwrap_or("")
}

/// The address a reverse name spells, if it is one in the canonical form `reverse_name` writes.
pub fn reverse_ip(name: &str) -> Option<IpAddr> {
    if let Some(rest) = name.strip_suffix(".in-addr.arpa") {
        let mut o = [0u8; 4];
        let mut labels = rest.split('.');
        for slot in o.iter_mut().rev() {
            let l = labels.next()?;
            if l.is_empty()
                || l.len() > 3
                || (l.len() > 1 && l.starts_with('0'))
                || !l.bytes().all(|b| b.is_ascii_digit())
            {
                return None;
            }
            *slot = l.parse().ok()?;
        }
        return labels.next().is_none().then_some(IpAddr::V4(o.into()));
    }
    let rest = name.strip_suffix(".ip6.arpa")?;
    let mut o = [0u8; 16];
    let mut labels = rest.split('.');
    for i in (0..32).rev() {
        let l = labels.next()?;
        let [b] = l.as_bytes() else { return None };
        let nibble = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            _ => return None,
        };
        o[i / 2] |= if i % 2 == 0 { nibble << 4 } else { nibble };
    }
    labels.next().is_none().then_some(IpAddr::V6(o.into()))
}

/// `<a>.<b>.<c>.<d>.in-addr.arpa` / the 32 nibbles `.ip6.arpa` name of an address.
pub fn reverse_name(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.{}.in-addr.arpa", o[3], o[2], o[1], o[0])
        }
        IpAddr::V6(v6) => {
            let mut s = String::with_capacity(72);
            for b in v6.octets().iter().rev() {
                s.push(char::from_digit(u32::from(b & 0xf), 16).unwrap_or('0'));
                s.push('.');
                s.push(char::from_digit(u32::from(b >> 4), 16).unwrap_or('0'));
                s.push('.');
            }
            s.push_str("ip6.arpa");
            s
        }
    }
}

/// The stable name of an endpoint without a hostname: its address with `.`/`:` as `-` (CoreDNS's rule).
pub fn dashed(ip: IpAddr) -> String {
    let mut s = ip.to_string().replace(['.', ':'], "-");
    if s.ends_with('-') {
        s.push('0');
    }
    if s.starts_with('-') {
        s.insert(0, '0');
    }
    s
}

/// The address a pod name's first label spells (`10-244-1-5`, or an IPv6 address with `-` for `:`).
pub fn undashed(label: &str) -> Option<IpAddr> {
    if label.len() > 39 {
        return None;
    }
    let dotted = label.replace('-', ".");
    if let Ok(v4) = dotted.parse::<Ipv4Addr>() {
        return Some(IpAddr::V4(v4));
    }
    label.replace('-', ":").parse::<Ipv6Addr>().ok().map(IpAddr::V6)
}

/// A DNS label Kubernetes would accept in a service, port or host name (letters, digits, `-`, 1–63).
/// An object name or namespace as Kubernetes requires it (a lowercase DNS-1123 label). Lowercase only, so
/// that two objects never map to one service name (a reader must not trust that etcd holds valid objects).
fn valid_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 63 && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

fn valid_label(s: &str) -> bool {
    !s.is_empty() && s.len() <= 63 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn record(ip: IpAddr) -> Rdata {
    match ip {
        IpAddr::V4(v) => Rdata::A(v),
        IpAddr::V6(v) => Rdata::Aaaa(v),
    }
}

fn is_ready(pod: &Pod) -> bool {
    let conditions = pod.status.as_ref().and_then(|s| s.conditions.as_ref());
    match conditions {
        Some(cs) => cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"),
        // No conditions reported (a pod nobody runs a kubelet for): its address is all we know.
        None => true,
    }
}

fn pod_ips(pod: &Pod) -> Vec<IpAddr> {
    let Some(st) = pod.status.as_ref() else { return Vec::new() };
    let mut out: Vec<IpAddr> = st.pod_ips.iter().flatten().filter_map(|p| p.ip.parse().ok()).collect::<Vec<IpAddr>>();
    if out.is_empty() {
        out.extend(st.pod_ip.as_deref().and_then(|ip| ip.parse::<IpAddr>().ok()));
    }
    out
}

/// A port name, lowercase, at most 15 characters (Kubernetes' IANA_SVC_NAME), kept inline: no allocation
/// for each port of 10,000 services.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PortName {
    len: u8,
    bytes: [u8; 15],
}

impl PortName {
    pub fn new(s: &str) -> Option<PortName> {
        if !valid_label(s) || s.len() > 15 {
            return None;
        }
        let mut bytes = [0u8; 15];
        bytes[..s.len()].copy_from_slice(s.to_ascii_lowercase().as_bytes());
        Some(PortName { len: s.len() as u8, bytes })
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII is ever stored (`valid_label`).
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or("")
    }
}

impl std::fmt::Debug for PortName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

impl std::fmt::Display for PortName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A port's protocol (the three Kubernetes knows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
    Sctp,
}

impl Proto {
    /// Kubernetes' spelling (`TCP`, the default when absent).
    pub fn parse(s: Option<&str>) -> Option<Proto> {
        match s.unwrap_or("TCP").to_ascii_uppercase().as_str() {
            "TCP" => Some(Proto::Tcp),
            "UDP" => Some(Proto::Udp),
            "SCTP" => Some(Proto::Sctp),
            _ => None,
        }
    }
}

impl std::fmt::Display for Proto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Sctp => "sctp",
        })
    }
}

/// A named port: `_<name>._<proto>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NamedPort {
    pub name: PortName,
    pub proto: Proto,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SvcKind {
    ClusterIp(Box<[IpAddr]>),
    Headless { publish_not_ready: bool },
    ExternalName(Box<str>),
}

/// What the index needs of a Service: a few dozen bytes instead of the whole object, so that the
/// caches of 10,000 services stay small. Its namespace and name are the informer's key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SvcInfo {
    pub kind: SvcKind,
    pub ports: Box<[NamedPort]>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpAddr {
    pub ip: IpAddr,
    pub hostname: Option<Box<str>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpSubset {
    pub ready: Box<[EpAddr]>,
    pub not_ready: Box<[EpAddr]>,
    pub ports: Box<[NamedPort]>,
}

/// What the index needs of an Endpoints object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpInfo {
    pub subsets: Box<[EpSubset]>,
}

/// What the index needs of a Pod: only pods with a hostname and a subdomain matter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    pub namespace: Box<str>,
    pub hostname: Box<str>,
    pub subdomain: Box<str>,
    pub ips: Box<[IpAddr]>,
    pub ready: bool,
}

fn named_ports<'a>(ports: impl Iterator<Item = (Option<&'a str>, Option<&'a str>, i32)>) -> Box<[NamedPort]> {
    ports
        .filter_map(|(name, proto, port)| {
            Some(NamedPort {
                name: PortName::new(name?)?,
                proto: Proto::parse(proto)?,
                port: u16::try_from(port).ok()?,
            })
        })
        .collect()
}

impl SvcInfo {
    pub fn of(svc: &Service) -> Option<SvcInfo> {
        // The name is the informer's key; it must still be one a service can have.
        svc.metadata.name.as_deref().filter(|n| valid_name(n))?;
        let ns = svc.metadata.namespace.as_deref().unwrap_or("default");
        if !valid_name(ns) {
            return None;
        }
        let spec = svc.spec.as_ref()?;
        let ports =
            named_ports(spec.ports.iter().flatten().map(|p| (p.name.as_deref(), p.protocol.as_deref(), p.port)));
        let kind = if spec.type_.as_deref() == Some("ExternalName") {
            let ext = spec.external_name.as_deref().filter(|e| !e.is_empty())?;
            SvcKind::ExternalName(ext.trim_end_matches('.').to_ascii_lowercase().into())
        } else {
            let mut ips: Vec<&str> = spec.cluster_ips.iter().flatten().map(String::as_str).collect();
            if ips.is_empty() {
                ips.extend(spec.cluster_ip.as_deref());
            }
            if ips.first().is_some_and(|ip| ip.eq_ignore_ascii_case("None")) {
                SvcKind::Headless { publish_not_ready: spec.publish_not_ready_addresses.unwrap_or(false) }
            } else {
                SvcKind::ClusterIp(ips.iter().filter_map(|s| s.parse().ok()).collect())
            }
        };
        Some(SvcInfo { kind, ports })
    }
}

impl EpInfo {
    pub fn of(ep: &Endpoints) -> Option<EpInfo> {
        ep.metadata.name.as_deref().filter(|n| valid_name(n))?;
        let ns = ep.metadata.namespace.as_deref().unwrap_or("default");
        if !valid_name(ns) {
            return None;
        }
        let addrs = |a: Option<&Vec<k8s_openapi::api::core::v1::EndpointAddress>>| -> Box<[EpAddr]> {
            a.into_iter()
                .flatten()
                .filter_map(|a| {
                    Some(EpAddr {
                        ip: a.ip.parse().ok()?,
                        hostname: a
                            .hostname
                            .as_deref()
                            .filter(|h| valid_label(h))
                            .map(|h| h.to_ascii_lowercase().into()),
                    })
                })
                .collect()
        };
        let subsets = ep
            .subsets
            .iter()
            .flatten()
            .map(|s| EpSubset {
                ready: addrs(s.addresses.as_ref()),
                not_ready: addrs(s.not_ready_addresses.as_ref()),
                ports: named_ports(
                    s.ports.iter().flatten().map(|p| (p.name.as_deref(), p.protocol.as_deref(), p.port)),
                ),
            })
            .collect();
        Some(EpInfo { subsets })
    }
}

impl PodInfo {
    pub fn of(pod: &Pod) -> Option<PodInfo> {
        let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
        if !valid_name(ns) {
            return None;
        }
        let spec = pod.spec.as_ref()?;
        let hostname = spec.hostname.as_deref().filter(|h| valid_label(h))?;
        let subdomain = spec.subdomain.as_deref().filter(|s| valid_label(s))?;
        Some(PodInfo {
            namespace: ns.into(),
            hostname: hostname.to_ascii_lowercase().into(),
            subdomain: subdomain.to_ascii_lowercase().into(),
            ips: pod_ips(pod).into(),
            ready: is_ready(pod),
        })
    }
}

/// What one service name's records are computed from: its Service, its Endpoints, and the pods naming it as
/// their subdomain. A record depends on nothing else, so a change to any of them recomputes this group only.
#[derive(Debug, Default, Clone)]
struct Group {
    svc: Option<Arc<SvcInfo>>,
    ep: Option<Arc<EpInfo>>,
    pods: Vec<Arc<PodInfo>>,
}

impl Group {
    fn is_empty(&self) -> bool {
        self.svc.is_none() && self.ep.is_none() && self.pods.is_empty()
    }

    /// The records of this service name (Kubernetes DNS-Based Service Discovery 1.1.0), names relative to `zone`.
    fn records(&self, zone: &str, key: &str, out: &mut Vec<(Owner, Rdata)>) {
        let Some(svc) = self.svc.as_deref() else { return };
        let rel = format!("{key}.svc");
        let base = Owner::Name(rel.as_str().into());
        let publish_not_ready = match &svc.kind {
            SvcKind::ExternalName(ext) => {
                out.push((base, Rdata::Cname(Arc::from(&**ext))));
                return;
            }
            SvcKind::ClusterIp(ips) => {
                if ips.is_empty() {
                    return;
                }
                let target: Arc<str> = Arc::from(format!("{rel}.{zone}"));
                for ip in ips.iter() {
                    out.push((base.clone(), record(*ip)));
                    out.push((Owner::Ptr(*ip), Rdata::Ptr(target.clone())));
                }
                for p in svc.ports.iter() {
                    let srv = Owner::Name(format!("_{}._{}.{rel}", p.name, p.proto).into());
                    out.push((srv, Rdata::Srv { priority: 0, weight: 100, port: p.port, target: target.clone() }));
                }
                return;
            }
            SvcKind::Headless { publish_not_ready } => *publish_not_ready,
        };
        if let Some(ep) = self.ep.as_deref() {
            // _port._proto name → (port, endpoint name); weights are shared out once all are known.
            let mut srvs: Vec<(Box<str>, u16, Arc<str>)> = Vec::new();
            for subset in ep.subsets.iter() {
                let not_ready = subset.not_ready.iter().filter(|_| publish_not_ready);
                for addr in subset.ready.iter().chain(not_ready) {
                    let host = match &addr.hostname {
                        Some(h) => h.to_string(),
                        None => dashed(addr.ip),
                    };
                    let ep_rel = format!("{host}.{rel}");
                    let ep_name: Arc<str> = Arc::from(format!("{ep_rel}.{zone}"));
                    out.push((base.clone(), record(addr.ip)));
                    out.push((Owner::Name(ep_rel.into()), record(addr.ip)));
                    out.push((Owner::Ptr(addr.ip), Rdata::Ptr(ep_name.clone())));
                    for p in subset.ports.iter() {
                        srvs.push((format!("_{}._{}.{rel}", p.name, p.proto).into(), p.port, ep_name.clone()));
                    }
                }
            }
            let mut per_name: HashMap<&str, u16> = HashMap::new();
            for (n, ..) in &srvs {
                *per_name.entry(n).or_default() += 1;
            }
            for (n, port, target) in &srvs {
                let weight = (100 / per_name[&**n]).max(1);
                let srv = Rdata::Srv { priority: 0, weight, port: *port, target: target.clone() };
                out.push((Owner::Name(n.clone()), srv));
            }
        }
        // <hostname>.<subdomain>.<ns>.svc.<zone> for pods naming this headless service as their subdomain.
        for pod in &self.pods {
            if !publish_not_ready && !pod.ready {
                continue;
            }
            let name = Owner::Name(format!("{}.{rel}", pod.hostname).into());
            for ip in pod.ips.iter() {
                out.push((name.clone(), record(*ip)));
            }
        }
    }
}

/// The key of a service name's group: `<name>.<namespace>`.
fn group_key(namespace: &str, name: &str) -> Box<str> {
    format!("{name}.{namespace}").into()
}

/// What one change did to the records: contributions taken back, then contributions added (a multiset
/// difference, so a record both before and after is not touched).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Delta {
    pub removed: Vec<(Owner, Rdata)>,
    pub added: Vec<(Owner, Rdata)>,
    /// The change in the number of services.
    pub services: isize,
}

impl Delta {
    pub fn is_empty(&self) -> bool {
        self.removed.is_empty() && self.added.is_empty() && self.services == 0
    }
}

/// The summaries the index is computed from, grouped by service name. Each change returns the records it
/// takes back and adds (`Index::apply`), so that the index follows one change at the cost of that service's
/// records, not of the whole zone. `zone` None: only the state changes (before the first `build`).
#[derive(Debug, Default, Clone)]
pub struct State {
    groups: HashMap<Box<str>, Group>,
}

impl State {
    /// The Service `namespace`/`name` was added or changed (`new`), or deleted (`new` None).
    pub fn service(&mut self, zone: Option<&str>, namespace: &str, name: &str, new: Option<Arc<SvcInfo>>) -> Delta {
        let key = group_key(namespace, name);
        self.change(zone, &[&key], |st| st.group(&key).svc = new)
    }

    /// The same for an Endpoints object.
    pub fn endpoints(&mut self, zone: Option<&str>, namespace: &str, name: &str, new: Option<Arc<EpInfo>>) -> Delta {
        let key = group_key(namespace, name);
        self.change(zone, &[&key], |st| st.group(&key).ep = new)
    }

    /// The same for a pod; `old` is the summary this state was given last for it (it may have named another
    /// subdomain).
    pub fn pod(&mut self, zone: Option<&str>, old: Option<&PodInfo>, new: Option<Arc<PodInfo>>) -> Delta {
        let old_key = old.map(|p| group_key(&p.namespace, &p.subdomain));
        let new_key = new.as_deref().map(|p| group_key(&p.namespace, &p.subdomain));
        let mut keys: Vec<&str> = old_key.iter().chain(new_key.iter()).map(|k| &**k).collect();
        keys.dedup();
        self.change(zone, &keys, |st| {
            if let (Some(old), Some(k)) = (old, &old_key) {
                let g = st.group(k);
                if let Some(i) = g.pods.iter().position(|p| **p == *old) {
                    g.pods.remove(i);
                }
            }
            if let (Some(new), Some(k)) = (new, &new_key) {
                st.group(k).pods.push(new);
            }
        })
    }

    fn group(&mut self, key: &str) -> &mut Group {
        if !self.groups.contains_key(key) {
            self.groups.insert(key.into(), Group::default());
        }
        self.groups.get_mut(key).expect("inserted above")
    }

    fn records_of(&self, zone: &str, keys: &[&str]) -> (Vec<(Owner, Rdata)>, isize) {
        let mut out = Vec::new();
        let mut services = 0;
        for (k, g) in keys.iter().filter_map(|k| Some((*k, self.groups.get(*k)?))) {
            g.records(zone, k, &mut out);
            services += isize::from(g.svc.is_some());
        }
        out.sort();
        (out, services)
    }

    fn change(&mut self, zone: Option<&str>, keys: &[&str], f: impl FnOnce(&mut Self)) -> Delta {
        let before = zone.map(|z| self.records_of(z, keys));
        f(self);
        for k in keys {
            if self.groups.get(*k).is_some_and(Group::is_empty) {
                self.groups.remove(*k);
            }
        }
        let (Some(z), Some((before, svc_before))) = (zone, before) else { return Delta::default() };
        let (after, svc_after) = self.records_of(z, keys);
        let mut d = Delta { services: svc_after - svc_before, ..Delta::default() };
        let (mut a, mut b) = (before.into_iter().peekable(), after.into_iter().peekable());
        loop {
            match (a.peek(), b.peek()) {
                (Some(x), Some(y)) if x == y => {
                    a.next();
                    b.next();
                }
                (Some(x), Some(y)) if x < y => d.removed.extend(a.next()),
                (Some(_), Some(_)) | (None, Some(_)) => d.added.extend(b.next()),
                (Some(_), None) => d.removed.extend(a.next()),
                (None, None) => break,
            }
        }
        d
    }

    /// The whole index from this state (the first sync, and after a relist).
    pub fn build(&self, cfg: &Config, serial: u32) -> Index {
        let mut idx = Index::empty(cfg, serial);
        let mut out = Vec::new();
        for (k, g) in &self.groups {
            g.records(&cfg.zone, k, &mut out);
            for (owner, r) in out.drain(..) {
                idx.add(&owner, r);
            }
            idx.services += usize::from(g.svc.is_some());
        }
        idx
    }
}

/// The index of these objects (for tests; the server keeps summaries in a `State`). `serial` is the SOA serial.
pub fn build(
    cfg: &Config,
    services: &[Arc<Service>],
    endpoints: &[Arc<Endpoints>],
    pods: &[Arc<Pod>],
    serial: u32,
) -> Index {
    let key = |m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
        (m.namespace.clone().unwrap_or_else(|| "default".into()), m.name.clone().unwrap_or_default())
    };
    let mut st = State::default();
    for s in services {
        let (ns, name) = key(&s.metadata);
        st.service(None, &ns, &name, SvcInfo::of(s).map(Arc::new));
    }
    for e in endpoints {
        let (ns, name) = key(&e.metadata);
        st.endpoints(None, &ns, &name, EpInfo::of(e).map(Arc::new));
    }
    for p in pods {
        st.pod(None, None, PodInfo::of(p).map(Arc::new));
    }
    st.build(cfg, serial)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn reverse_names_and_dashes() {
        assert_eq!(reverse_name("10.96.0.10".parse().unwrap()), "10.0.96.10.in-addr.arpa");
        assert_eq!(
            reverse_name("fd00::a".parse().unwrap()),
            "a.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.d.f.ip6.arpa"
        );
        assert_eq!(dashed("10.244.1.5".parse().unwrap()), "10-244-1-5");
        assert_eq!(dashed("fd00::a".parse().unwrap()), "fd00--a");
        assert_eq!(dashed("fd00::".parse().unwrap()), "fd00--0");
        assert_eq!(dashed("::1".parse().unwrap()), "0--1");
        assert_eq!(undashed("10-244-1-5"), Some("10.244.1.5".parse().unwrap()));
        assert_eq!(undashed("fd00--a"), Some("fd00::a".parse().unwrap()));
        assert_eq!(undashed("web"), None);
        assert_eq!(undashed("10-244-1"), None);
    }

    #[test]
    fn reverse_ip_reads_back_only_what_reverse_name_writes() {
        for ip in ["10.96.0.10", "0.0.0.0", "255.255.255.255", "fd00::a", "::1", "2001:db8::ff00:42:8329"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(reverse_ip(&reverse_name(ip)), Some(ip), "{ip}");
        }
        for bad in [
            "010.0.96.10.in-addr.arpa",
            "+1.0.96.10.in-addr.arpa",
            "256.0.96.10.in-addr.arpa",
            "0.96.10.in-addr.arpa",
            "1.10.0.96.10.in-addr.arpa",
            "1..96.10.in-addr.arpa",
            "a.0.0.d.f.ip6.arpa",
            "web.default.svc.cluster.local",
        ] {
            assert_eq!(reverse_ip(bad), None, "{bad}");
        }
    }

    /// One step: an object written (its JSON) or deleted, as the informer reports it.
    enum Step {
        Svc(&'static str, &'static str, Option<serde_json::Value>),
        Ep(&'static str, &'static str, Option<serde_json::Value>),
        Pod(&'static str, &'static str, Option<serde_json::Value>),
    }

    fn svc(ns: &'static str, name: &'static str, spec: serde_json::Value) -> Step {
        Step::Svc(ns, name, Some(serde_json::json!({"metadata": {"name": name, "namespace": ns}, "spec": spec})))
    }

    fn ep(ns: &'static str, name: &'static str, subsets: serde_json::Value) -> Step {
        Step::Ep(ns, name, Some(serde_json::json!({"metadata": {"name": name, "namespace": ns}, "subsets": subsets})))
    }

    fn pod(ns: &'static str, name: &'static str, host: &str, sub: &str, ip: &str, ready: bool) -> Step {
        let ready = if ready { "True" } else { "False" };
        Step::Pod(
            ns,
            name,
            Some(serde_json::json!({
                "metadata": {"name": name, "namespace": ns},
                "spec": {"hostname": host, "subdomain": sub, "containers": []},
                "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": ready}]}
            })),
        )
    }

    fn cip(ip: &str, port: &str) -> serde_json::Value {
        serde_json::json!({"clusterIP": ip, "clusterIPs": [ip], "ports": [{"name": port, "port": 80, "protocol": "TCP"}]})
    }

    fn headless(publish_not_ready: bool) -> serde_json::Value {
        serde_json::json!({"clusterIP": "None", "publishNotReadyAddresses": publish_not_ready,
            "ports": [{"name": "http", "port": 80}]})
    }

    fn ext(name: &str) -> serde_json::Value {
        serde_json::json!({"type": "ExternalName", "externalName": name})
    }

    /// The summaries the informers would hold, keyed by (namespace, name), and the events they would send.
    #[derive(Default)]
    struct Objects {
        svcs: BTreeMap<(String, String), Arc<SvcInfo>>,
        eps: BTreeMap<(String, String), Arc<EpInfo>>,
        pods: BTreeMap<(String, String), Arc<PodInfo>>,
    }

    /// Puts `new` (None: deleted or rejected by the transform) at `key`; returns the event, None when the
    /// informer would send none (a rejected object that was not kept before).
    #[allow(clippy::type_complexity)]
    fn put<T>(
        map: &mut BTreeMap<(String, String), Arc<T>>,
        key: (&str, &str),
        new: Option<T>,
    ) -> Option<(Option<Arc<T>>, Option<Arc<T>>)> {
        let key = (key.0.to_string(), key.1.to_string());
        let new = new.map(Arc::new);
        let old = match &new {
            Some(n) => map.insert(key, n.clone()),
            None => map.remove(&key),
        };
        (old.is_some() || new.is_some()).then_some((old, new))
    }

    fn decode<T: serde::de::DeserializeOwned>(v: &Option<serde_json::Value>) -> Option<T> {
        v.clone().map(|v| serde_json::from_value(v).unwrap())
    }

    /// Applies `steps` one by one to a state and an index, and after each compares the index with one built
    /// whole from the objects present at that point (names, records and their counts, services).
    fn check(case: &str, steps: &[Step]) -> Index {
        let cfg = Config::default();
        let zone = cfg.zone.clone();
        let mut st = State::default();
        let mut idx = st.build(&cfg, 1);
        let mut objs = Objects::default();
        for (i, step) in steps.iter().enumerate() {
            let delta = match step {
                Step::Svc(ns, n, v) => {
                    let new = decode::<Service>(v).and_then(|s| SvcInfo::of(&s));
                    put(&mut objs.svcs, (ns, n), new).map(|(_, new)| st.service(Some(&zone), ns, n, new))
                }
                Step::Ep(ns, n, v) => {
                    let new = decode::<Endpoints>(v).and_then(|e| EpInfo::of(&e));
                    put(&mut objs.eps, (ns, n), new).map(|(_, new)| st.endpoints(Some(&zone), ns, n, new))
                }
                Step::Pod(ns, n, v) => {
                    let new = decode::<Pod>(v).and_then(|p| PodInfo::of(&p));
                    put(&mut objs.pods, (ns, n), new).map(|(o, n)| st.pod(Some(&zone), o.as_deref(), n))
                }
            };
            if let Some(d) = delta {
                idx.apply(&d);
            }
            // A fresh state given the objects present now, in another order (by key, kind after kind).
            let mut fresh = State::default();
            for ((ns, n), s) in &objs.svcs {
                fresh.service(None, ns, n, Some(Arc::new((**s).clone())));
            }
            for ((ns, n), e) in &objs.eps {
                fresh.endpoints(None, ns, n, Some(Arc::new((**e).clone())));
            }
            for p in objs.pods.values() {
                fresh.pod(None, None, Some(Arc::new((**p).clone())));
            }
            let full = fresh.build(&cfg, 1);
            assert_eq!(idx.snapshot(), full.snapshot(), "{case}: after step {i}");
            type Counted = Vec<(Rdata, u32)>;
            let counts = |x: &Index| {
                let mut c: Vec<(String, Counted, u32)> =
                    x.names.iter().map(|(k, n)| (k.to_string(), n.recs.as_slice().to_vec(), n.children)).collect();
                c.iter_mut().for_each(|e| e.1.sort());
                c.sort();
                let mut p: Vec<(IpAddr, Counted)> = x.ptrs.iter().map(|(k, r)| (*k, r.as_slice().to_vec())).collect();
                p.iter_mut().for_each(|e| e.1.sort());
                p.sort();
                (c, p, x.services, x.records)
            };
            assert_eq!(counts(&idx), counts(&full), "{case}: after step {i}, contribution counts");
        }
        idx
    }

    fn a(ip: &str) -> Rdata {
        record(ip.parse().unwrap())
    }

    fn ptr(target: &str) -> Rdata {
        Rdata::Ptr(Arc::from(target))
    }

    #[test]
    fn incremental_updates_give_the_index_a_full_rebuild_gives() {
        let hosts = serde_json::json!([{
            "addresses": [{"ip": "10.244.1.5"}, {"ip": "10.244.2.6", "hostname": "db-0"}],
            "notReadyAddresses": [{"ip": "10.244.3.7"}],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]
        }]);
        let cases: Vec<(&str, Vec<Step>)> = vec![
            (
                "a ClusterIP service added, its address and port renamed, deleted",
                vec![
                    svc("default", "web", cip("10.96.0.10", "http")),
                    svc("default", "web", cip("10.96.0.11", "web")),
                    svc("default", "web", serde_json::json!({"clusterIP": "10.96.0.11",
                        "clusterIPs": ["10.96.0.11", "fd00:96::11"], "ports": [{"name": "dns", "port": 53, "protocol": "UDP"}]})),
                    Step::Svc("default", "web", None),
                ],
            ),
            (
                "a headless service with endpoints (hostnames, not ready) changing, publishing not-ready, deleted first",
                vec![
                    svc("default", "db", headless(false)),
                    ep("default", "db", hosts.clone()),
                    ep("default", "db", serde_json::json!([{"addresses": [{"ip": "10.244.2.6", "hostname": "db-1"}],
                        "ports": [{"name": "http", "port": 8080}, {"name": "grpc", "port": 9090}]}])),
                    ep("default", "db", hosts.clone()),
                    svc("default", "db", headless(true)),
                    svc("default", "db", headless(false)),
                    Step::Svc("default", "db", None),
                    svc("default", "db", headless(false)),
                    Step::Ep("default", "db", None),
                    Step::Svc("default", "db", None),
                ],
            ),
            (
                "endpoints before their service, which changes type: headless, ClusterIP, ExternalName, headless",
                vec![
                    ep("ns1", "x", hosts.clone()),
                    svc("ns1", "x", headless(false)),
                    svc("ns1", "x", cip("10.96.1.1", "http")),
                    svc("ns1", "x", ext("example.com.")),
                    svc("ns1", "x", ext("web.default.svc.cluster.local")),
                    svc("ns1", "x", headless(true)),
                    Step::Ep("ns1", "x", None),
                ],
            ),
            (
                "pods with hostname and subdomain: before their service, becoming ready, moving, sharing an endpoint's name",
                vec![
                    pod("default", "p1", "p1", "hl", "10.244.1.9", false),
                    svc("default", "hl", headless(false)),
                    svc("default", "other", headless(true)),
                    pod("default", "p1", "p1", "hl", "10.244.1.9", true),
                    pod("default", "p2", "p2", "other", "10.244.1.10", false),
                    pod("default", "p1", "p1", "other", "10.244.1.9", true),
                    // The endpoints controller names a pod's address after its hostname: one record, two sources.
                    ep("default", "other", serde_json::json!([{"addresses": [{"ip": "10.244.1.9", "hostname": "p1"}]}])),
                    Step::Pod("default", "p1", None),
                    pod("default", "p2", "p2", "hl", "10.244.1.10", true),
                    Step::Svc("default", "other", None),
                    Step::Ep("default", "other", None),
                    Step::Pod("default", "p2", None),
                    Step::Svc("default", "hl", None),
                ],
            ),
            (
                "two services sharing an address share its PTR name; an endpoint at a cluster address",
                vec![
                    svc("default", "a", cip("10.96.0.50", "http")),
                    svc("other", "b", cip("10.96.0.50", "http")),
                    svc("default", "h", headless(false)),
                    ep("default", "h", serde_json::json!([{"addresses": [{"ip": "10.96.0.50"}, {"ip": "10.96.0.50"}]},
                        {"addresses": [{"ip": "10.96.0.50", "hostname": "x"}]}])),
                    Step::Svc("default", "a", None),
                    svc("default", "a", cip("10.96.0.51", "http")),
                    Step::Svc("other", "b", None),
                    Step::Svc("default", "h", None),
                    Step::Ep("default", "h", None),
                    Step::Svc("default", "a", None),
                ],
            ),
            (
                "objects the summaries reject are deletes to the index; duplicate addresses count once",
                vec![
                    svc("default", "dup", serde_json::json!({"clusterIP": "10.96.0.60",
                        "clusterIPs": ["10.96.0.60", "10.96.0.60"], "ports": [{"name": "http", "port": 80}, {"name": "http", "port": 80}]})),
                    svc("default", "dup", ext("")),
                    svc("default", "Upper", cip("10.96.0.61", "http")),
                    svc("default", "dup", cip("10.96.0.62", "BAD_NAME")),
                    Step::Svc("default", "dup", None),
                ],
            ),
        ];
        for (case, steps) in &cases {
            let idx = check(case, steps);
            // Every case deletes everything it added: what is left is the empty zone.
            assert_eq!(idx.snapshot(), Index::empty(&Config::default(), 1).snapshot(), "{case}: at the end");
        }
    }

    #[test]
    fn a_shared_ptr_name_keeps_each_target_until_its_last_service_is_gone() {
        let steps = vec![
            svc("default", "a", cip("10.96.0.50", "http")),
            svc("other", "b", cip("10.96.0.50", "http")),
            svc("default", "h", headless(false)),
            ep("default", "h", serde_json::json!([{"addresses": [{"ip": "10.96.0.50", "hostname": "x"}]}])),
            Step::Svc("default", "a", None),
        ];
        let idx = check("shared PTR", &steps);
        let at = |name: &str| idx.get(name).map(|r| r.to_vec());
        let mut ptrs = at("50.0.96.10.in-addr.arpa").unwrap();
        ptrs.sort();
        assert_eq!(ptrs, [ptr("b.other.svc.cluster.local"), ptr("x.h.default.svc.cluster.local")]);
        assert_eq!(at("a.default.svc.cluster.local"), None);
        assert_eq!(at("b.other.svc.cluster.local"), Some(vec![a("10.96.0.50")]));
        assert_eq!(at("x.h.default.svc.cluster.local"), Some(vec![a("10.96.0.50")]));
        assert_eq!(at("_tcp.b.other.svc.cluster.local"), Some(vec![]), "an empty non-terminal exists");
        assert_eq!(at("_tcp.a.default.svc.cluster.local"), None, "and goes with the last name below it");
        assert_eq!(idx.services, 2);
    }
}
