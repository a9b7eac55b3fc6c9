//! The record index: every name `weft dns` is authoritative for, built by a pure function from the Services,
//! Endpoints and Pods in the informer caches (the Kubernetes DNS-Based Service Discovery specification, 1.1.0).
//! Names are lowercase, without the trailing dot; records are compact (no wire encoding) so that 10,000
//! services fit in a few megabytes. A built index is never changed: the server swaps in a new one.

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
#[derive(Debug, Clone, PartialEq, Eq)]
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

/// An immutable snapshot of every authoritative name. A name present with no records exists (an empty
/// non-terminal such as `svc.<zone>`, or a headless service's parent of endpoint names): NODATA, not NXDOMAIN.
#[derive(Debug, Default)]
pub struct Index {
    /// name → its records' range in `data` (one allocation for all records, not one per name).
    names: HashMap<Box<str>, (u32, u32)>,
    data: Vec<Rdata>,
    /// SOA serial: the build's time in seconds, as CoreDNS does.
    pub serial: u32,
    pub services: usize,
    pub records: usize,
}

impl Index {
    /// The records at `name` (lowercase, no trailing dot); `None` when the name does not exist.
    pub fn get(&self, name: &str) -> Option<&[Rdata]> {
        self.names.get(name).map(|&(start, len)| &self.data[start as usize..(start + len) as usize])
    }

    pub fn names(&self) -> usize {
        self.names.len()
    }

    /// Every (name, record), sorted: for tests and the benchmark's zone file.
    pub fn dump(&self) -> Vec<(&str, &Rdata)> {
        let mut out: Vec<(&str, &Rdata)> =
            self.names.keys().flat_map(|n| self.get(n).unwrap_or_default().iter().map(move |r| (&**n, r))).collect();
        out.sort_by(|a, b| a.0.cmp(b.0).then_with(|| format!("{:?}", a.1).cmp(&format!("{:?}", b.1))));
        out
    }
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
fn valid_label(s: &str) -> bool {
    !s.is_empty() && s.len() <= 63 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn record(ip: IpAddr) -> Rdata {
    match ip {
        IpAddr::V4(v) => Rdata::A(v),
        IpAddr::V6(v) => Rdata::Aaaa(v),
    }
}

#[derive(Default)]
struct Builder {
    names: HashMap<String, Vec<Rdata>>,
    /// Interned target names, so that an SRV and a PTR to one name share it.
    strings: HashMap<String, Arc<str>>,
}

impl Builder {
    fn intern(&mut self, s: &str) -> Arc<str> {
        if let Some(a) = self.strings.get(s) {
            return a.clone();
        }
        let a: Arc<str> = Arc::from(s);
        self.strings.insert(s.to_string(), a.clone());
        a
    }

    fn add(&mut self, name: &str, r: Rdata) {
        let rs = self.names.entry(name.to_string()).or_default();
        if !rs.contains(&r) {
            rs.push(r);
        }
    }

    fn touch(&mut self, name: &str) {
        self.names.entry(name.to_string()).or_default();
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

/// A named port: `_<name>._<proto>` (lowercase).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedPort {
    pub name: Box<str>,
    pub proto: Box<str>,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SvcKind {
    ClusterIp(Box<[IpAddr]>),
    Headless { publish_not_ready: bool },
    ExternalName(Box<str>),
}

/// What the index needs of a Service: a few dozen bytes instead of the whole object, so that the
/// caches of 10,000 services stay small.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SvcInfo {
    pub namespace: Box<str>,
    pub name: Box<str>,
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
    pub namespace: Box<str>,
    pub name: Box<str>,
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
            let name = name.filter(|n| valid_label(n))?;
            Some(NamedPort {
                name: name.to_ascii_lowercase().into(),
                proto: proto.unwrap_or("TCP").to_ascii_lowercase().into(),
                port: u16::try_from(port).ok()?,
            })
        })
        .collect()
}

impl SvcInfo {
    pub fn of(svc: &Service) -> Option<SvcInfo> {
        let name = svc.metadata.name.as_deref().filter(|n| valid_label(n))?;
        let ns = svc.metadata.namespace.as_deref().unwrap_or("default");
        if !valid_label(ns) {
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
        Some(SvcInfo { namespace: ns.to_ascii_lowercase().into(), name: name.to_ascii_lowercase().into(), kind, ports })
    }
}

impl EpInfo {
    pub fn of(ep: &Endpoints) -> Option<EpInfo> {
        let name = ep.metadata.name.as_deref()?;
        let ns = ep.metadata.namespace.as_deref().unwrap_or("default");
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
        Some(EpInfo { namespace: ns.to_ascii_lowercase().into(), name: name.to_ascii_lowercase().into(), subsets })
    }
}

impl PodInfo {
    pub fn of(pod: &Pod) -> Option<PodInfo> {
        let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
        let spec = pod.spec.as_ref()?;
        let hostname = spec.hostname.as_deref().filter(|h| valid_label(h))?;
        let subdomain = spec.subdomain.as_deref().filter(|s| valid_label(s))?;
        Some(PodInfo {
            namespace: ns.to_ascii_lowercase().into(),
            hostname: hostname.to_ascii_lowercase().into(),
            subdomain: subdomain.to_ascii_lowercase().into(),
            ips: pod_ips(pod).into(),
            ready: is_ready(pod),
        })
    }
}

/// The pure function from objects to the index. `serial` is the SOA serial (the caller's clock).
pub fn build(
    cfg: &Config,
    services: &[Arc<Service>],
    endpoints: &[Arc<Endpoints>],
    pods: &[Arc<Pod>],
    serial: u32,
) -> Index {
    let s: Vec<SvcInfo> = services.iter().filter_map(|s| SvcInfo::of(s)).collect();
    let e: Vec<EpInfo> = endpoints.iter().filter_map(|e| EpInfo::of(e)).collect();
    let p: Vec<PodInfo> = pods.iter().filter_map(|p| PodInfo::of(p)).collect();
    build_from(cfg, s.iter(), e.iter(), p.iter(), serial)
}

/// `build` over the summaries the server keeps.
pub fn build_from<'a>(
    cfg: &Config,
    services: impl Iterator<Item = &'a SvcInfo>,
    endpoints: impl Iterator<Item = &'a EpInfo>,
    pods: impl Iterator<Item = &'a PodInfo>,
    serial: u32,
) -> Index {
    let zone = cfg.zone.as_str();
    let mut b = Builder::default();
    let eps: HashMap<(&str, &str), &EpInfo> = endpoints.map(|e| ((&*e.namespace, &*e.name), e)).collect();
    let mut headless: HashMap<(&str, &str), bool> = HashMap::new();
    let mut count = 0;

    for svc in services {
        let (name, ns) = (&*svc.name, &*svc.namespace);
        count += 1;
        let base = format!("{name}.{ns}.svc.{zone}");
        let publish_not_ready = match &svc.kind {
            SvcKind::ExternalName(ext) => {
                let target = b.intern(ext);
                b.add(&base, Rdata::Cname(target));
                continue;
            }
            SvcKind::ClusterIp(ips) => {
                if ips.is_empty() {
                    continue;
                }
                let target = b.intern(&base);
                for ip in ips.iter() {
                    b.add(&base, record(*ip));
                    b.add(&reverse_name(*ip), Rdata::Ptr(target.clone()));
                }
                for p in svc.ports.iter() {
                    let srv = format!("_{}._{}.{base}", p.name, p.proto);
                    b.add(&srv, Rdata::Srv { priority: 0, weight: 100, port: p.port, target: target.clone() });
                }
                continue;
            }
            SvcKind::Headless { publish_not_ready } => *publish_not_ready,
        };
        headless.insert((ns, name), publish_not_ready);
        let Some(ep) = eps.get(&(ns, name)) else { continue };
        // _port._proto name → (port, endpoint name); weights are shared out once all are known.
        let mut srvs: Vec<(String, u16, Arc<str>)> = Vec::new();
        for subset in ep.subsets.iter() {
            let not_ready = subset.not_ready.iter().filter(|_| publish_not_ready);
            for addr in subset.ready.iter().chain(not_ready) {
                let host = match &addr.hostname {
                    Some(h) => h.to_string(),
                    None => dashed(addr.ip),
                };
                let ep_name = b.intern(&format!("{host}.{base}"));
                b.add(&base, record(addr.ip));
                b.add(&ep_name, record(addr.ip));
                b.add(&reverse_name(addr.ip), Rdata::Ptr(ep_name.clone()));
                for p in subset.ports.iter() {
                    srvs.push((format!("_{}._{}.{base}", p.name, p.proto), p.port, ep_name.clone()));
                }
            }
        }
        let mut per_name: HashMap<&str, u16> = HashMap::new();
        for (n, ..) in &srvs {
            *per_name.entry(n.as_str()).or_default() += 1;
        }
        for (n, port, target) in &srvs {
            let weight = (100 / per_name[n.as_str()]).max(1);
            b.add(n, Rdata::Srv { priority: 0, weight, port: *port, target: target.clone() });
        }
    }

    // <hostname>.<subdomain>.<ns>.svc.<zone> for pods naming a headless service as their subdomain.
    for pod in pods {
        let Some(&publish_not_ready) = headless.get(&(&*pod.namespace, &*pod.subdomain)) else { continue };
        if !publish_not_ready && !pod.ready {
            continue;
        }
        let name = format!("{}.{}.{}.svc.{zone}", pod.hostname, pod.subdomain, pod.namespace);
        for ip in pod.ips.iter() {
            b.add(&name, record(*ip));
        }
    }

    b.add(&format!("dns-version.{zone}"), Rdata::Txt(Arc::from(SCHEMA_VERSION)));
    b.add(zone, Rdata::Soa);
    let ns_name = b.intern(&format!("ns.dns.{zone}"));
    b.add(zone, Rdata::Ns(ns_name));
    b.touch(&format!("pod.{zone}"));

    // Every ancestor of a name in the zone exists (an empty non-terminal).
    let suffix = format!(".{zone}");
    let mut ents: Vec<String> = Vec::new();
    for name in b.names.keys() {
        let Some(rel) = name.strip_suffix(&suffix) else { continue };
        let mut rest = rel;
        while let Some((_, parent)) = rest.split_once('.') {
            let full = format!("{parent}{suffix}");
            if b.names.contains_key(&full) {
                break;
            }
            ents.push(full);
            rest = parent;
        }
    }
    for e in ents {
        b.touch(&e);
    }

    let records = b.names.values().map(Vec::len).sum();
    let mut data = Vec::with_capacity(records);
    let mut names = HashMap::with_capacity(b.names.len());
    for (k, v) in b.names {
        names.insert(k.into_boxed_str(), (data.len() as u32, v.len() as u32));
        data.extend(v);
    }
    Index { names, data, serial, services: count, records }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
