//! What the API server does when a Service is written: defaulting, validation (errors name the field path), and
//! ClusterIP / NodePort allocation. Allocations are keys under `/registry/ranges/` claimed and released in the
//! same etcd transaction as the Service itself, so a crash can never leak or double-book one.

use std::collections::{BTreeSet, HashSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::ops::RangeInclusive;

use ipnetwork::Ipv4Network;
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use rand::Rng;

use crate::store::{self, Claims, ObjectKey, Store};

pub const IP_PREFIX: &str = "/registry/ranges/serviceips/";
pub const PORT_PREFIX: &str = "/registry/ranges/servicenodeports/";

/// The service network and NodePort range, as kube-apiserver's `--service-cluster-ip-range` and
/// `--service-node-port-range`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceRanges {
    pub cidr: Ipv4Network,
    pub node_ports: RangeInclusive<u16>,
}

impl Default for ServiceRanges {
    fn default() -> Self {
        ServiceRanges {
            cidr: Ipv4Network::new(Ipv4Addr::new(10, 96, 0, 0), 12).unwrap_or_else(|_| unreachable!()),
            node_ports: 30000..=32767,
        }
    }
}

impl ServiceRanges {
    /// From flag text: `10.96.0.0/12` and `30000-32767`.
    pub fn parse(cidr: &str, node_ports: &str) -> Result<Self> {
        let bad = |what: &str, v: &str| Error::Range(format!("{what}: {v:?} is not valid"));
        let cidr: Ipv4Network = cidr.parse().map_err(|_| bad("service cluster IP range", cidr))?;
        if cidr.prefix() > 30 {
            return Err(Error::Range(format!("service cluster IP range {cidr} is too small")));
        }
        let (lo, hi) = node_ports.split_once('-').ok_or_else(|| bad("node port range", node_ports))?;
        let lo: u16 = lo.trim().parse().map_err(|_| bad("node port range", node_ports))?;
        let hi: u16 = hi.trim().parse().map_err(|_| bad("node port range", node_ports))?;
        if lo == 0 || lo > hi {
            return Err(bad("node port range", node_ports));
        }
        // Store the network address, so that "10.96.0.1/12" means the same as "10.96.0.0/12".
        let cidr = Ipv4Network::new(cidr.network(), cidr.prefix())
            .map_err(|_| bad("service cluster IP range", &cidr.to_string()))?;
        Ok(ServiceRanges { cidr, node_ports: lo..=hi })
    }

    fn node_ports_text(&self) -> String {
        format!("{}-{}", self.node_ports.start(), self.node_ports.end())
    }
}

/// One invalid field, rendered as the API server does: `spec.ports[1].port: Invalid value: 70000: must be …`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Every invalid field of one object.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FieldErrors(pub Vec<FieldError>);

impl fmt::Display for FieldErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(|e| e.to_string()).collect();
        f.write_str(&parts.join("; "))
    }
}

impl std::error::Error for FieldErrors {}

impl FieldErrors {
    fn invalid(&mut self, path: impl Into<String>, value: impl fmt::Display, detail: impl fmt::Display) {
        self.0.push(FieldError { path: path.into(), message: format!("Invalid value: {value}: {detail}") });
    }
    fn required(&mut self, path: impl Into<String>, detail: &str) {
        let message = if detail.is_empty() { "Required value".into() } else { format!("Required value: {detail}") };
        self.0.push(FieldError { path: path.into(), message });
    }
    fn unsupported(&mut self, path: impl Into<String>, value: &str, supported: &[&str]) {
        let s: Vec<String> = supported.iter().map(|s| format!("{s:?}")).collect();
        self.0.push(FieldError {
            path: path.into(),
            message: format!("Unsupported value: {value:?}: supported values: {}", s.join(", ")),
        });
    }
    fn other(&mut self, path: impl Into<String>, kind: &str, detail: impl fmt::Display) {
        self.0.push(FieldError { path: path.into(), message: format!("{kind}: {detail}") });
    }
    fn into_result(self) -> Result<(), FieldErrors> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(self)
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Service \"{key}\" is invalid: {errors}")]
    Invalid { key: ObjectKey, errors: FieldErrors },
    #[error("Service \"{key}\" is invalid: {field}: Invalid value: {value}: provided {what} is already allocated")]
    Allocated { key: ObjectKey, field: String, value: String, what: &'static str },
    #[error("Service \"{key}\": no free {what} left in {range}")]
    Full { key: ObjectKey, what: &'static str, range: String },
    #[error("{0}")]
    Range(String),
    #[error(transparent)]
    Store(#[from] store::Error),
}

impl Error {
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::Store(e) if e.is_not_found())
    }
    pub fn is_conflict(&self) -> bool {
        matches!(self, Error::Store(e) if e.is_conflict())
    }
    pub fn is_already_exists(&self) -> bool {
        matches!(self, Error::Store(e) if e.is_already_exists())
    }
    pub fn is_invalid(&self) -> bool {
        matches!(self, Error::Invalid { .. } | Error::Allocated { .. })
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

// ---- name syntax (apimachinery's validation helpers) ----

fn is_alnum_lower(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit()
}

/// RFC 1123 label: what port names and namespaces must be.
pub fn is_dns1123_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars().all(|c| is_alnum_lower(c) || c == '-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// RFC 1123 subdomain: what most object names must be.
pub fn is_dns1123_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns1123_label)
}

/// RFC 1035 label: what Service names must be (starts with a letter).
pub fn is_dns1035_label(s: &str) -> bool {
    is_dns1123_label(s) && s.starts_with(|c: char| c.is_ascii_lowercase())
}

/// An IANA service name: what a named targetPort must be.
pub fn is_iana_svc_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s.chars().all(|c| is_alnum_lower(c) || c == '-')
        && s.chars().any(|c| c.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}

fn is_qualified_part(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// A label key: `[prefix/]name`, the prefix a DNS subdomain.
pub fn is_label_key(s: &str) -> bool {
    match s.split_once('/') {
        Some((prefix, name)) => is_dns1123_subdomain(prefix) && is_qualified_part(name),
        None => is_qualified_part(s),
    }
}

pub fn is_label_value(s: &str) -> bool {
    s.is_empty() || is_qualified_part(s)
}

// ---- defaulting and validation ----

const TYPES: &[&str] = &["ClusterIP", "ExternalName", "LoadBalancer", "NodePort"];
const PROTOCOLS: &[&str] = &["SCTP", "TCP", "UDP"];

pub fn service_type(svc: &Service) -> &str {
    svc.spec.as_ref().and_then(|s| s.type_.as_deref()).unwrap_or("ClusterIP")
}

fn wants_node_ports(spec: &ServiceSpec) -> bool {
    match spec.type_.as_deref() {
        Some("NodePort") => true,
        Some("LoadBalancer") => spec.allocate_load_balancer_node_ports != Some(false),
        _ => false,
    }
}

fn is_headless(spec: &ServiceSpec) -> bool {
    spec.cluster_ip.as_deref() == Some("None")
}

/// The API server's defaults: type ClusterIP, protocol TCP, targetPort = port, sessionAffinity None, traffic
/// policies Cluster, IPv4 single stack. Idempotent.
pub fn apply_defaults(svc: &mut Service) {
    let spec = svc.spec.get_or_insert_with(Default::default);
    let type_ = spec.type_.get_or_insert_with(|| "ClusterIP".into()).clone();
    for p in spec.ports.iter_mut().flatten() {
        p.protocol.get_or_insert_with(|| "TCP".into());
        // An invalid port is reported once, on `port`, not again on a targetPort copied from it.
        if p.target_port.is_none() && (1..=65535).contains(&p.port) {
            p.target_port = Some(IntOrString::Int(p.port));
        }
    }
    if type_ == "ExternalName" {
        return;
    }
    spec.session_affinity.get_or_insert_with(|| "None".into());
    spec.internal_traffic_policy.get_or_insert_with(|| "Cluster".into());
    if type_ == "NodePort" || type_ == "LoadBalancer" {
        spec.external_traffic_policy.get_or_insert_with(|| "Cluster".into());
    }
    if type_ == "LoadBalancer" {
        spec.allocate_load_balancer_node_ports.get_or_insert(true);
    }
    spec.ip_families.get_or_insert_with(|| vec!["IPv4".into()]);
    spec.ip_family_policy.get_or_insert_with(|| "SingleStack".into());
    if spec.cluster_ip.as_deref() == Some("") {
        spec.cluster_ip = None;
    }
    if let Some(ip) = &spec.cluster_ip {
        spec.cluster_ips = Some(vec![ip.clone()]);
    }
}

/// Validates a (defaulted) Service against the ranges. Pure; every problem is reported, not just the first.
pub fn validate(svc: &Service, ranges: &ServiceRanges) -> Result<(), FieldErrors> {
    let mut errs = FieldErrors::default();
    match svc.metadata.name.as_deref() {
        None | Some("") => errs.required("metadata.name", "name or generateName is required"),
        Some(n) if !is_dns1035_label(n) => errs.invalid(
            "metadata.name",
            format!("{n:?}"),
            "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic \
             character, and end with an alphanumeric character",
        ),
        _ => {}
    }
    if let Some(ns) = svc.metadata.namespace.as_deref() {
        if !is_dns1123_label(ns) {
            errs.invalid("metadata.namespace", format!("{ns:?}"), "a namespace must be a DNS-1123 label");
        }
    }
    let Some(spec) = &svc.spec else {
        errs.required("spec", "");
        return errs.into_result();
    };
    let type_ = spec.type_.as_deref().unwrap_or("ClusterIP");
    if !TYPES.contains(&type_) {
        errs.unsupported("spec.type", type_, TYPES);
    }
    let ports = spec.ports.as_deref().unwrap_or_default();
    let headless = is_headless(spec);
    if type_ == "ExternalName" {
        match spec.external_name.as_deref() {
            None | Some("") => errs.required("spec.externalName", ""),
            Some(n) if !is_dns1123_subdomain(n.trim_end_matches('.')) => {
                errs.invalid("spec.externalName", format!("{n:?}"), "must be a DNS-1123 subdomain")
            }
            _ => {}
        }
        if let Some(ip) = spec.cluster_ip.as_deref().filter(|ip| !ip.is_empty()) {
            errs.invalid("spec.clusterIP", format!("{ip:?}"), "may not be set for type ExternalName");
        }
    } else if ports.is_empty() && !headless {
        errs.required("spec.ports", "");
    }
    if headless && (type_ == "NodePort" || type_ == "LoadBalancer") {
        errs.invalid("spec.clusterIP", "\"None\"", format!("may not be set to 'None' for {type_} services"));
    }
    if let Some(ip) = spec.cluster_ip.as_deref().filter(|ip| !ip.is_empty() && *ip != "None") {
        match ip.parse::<IpAddr>() {
            Err(_) => errs.invalid("spec.clusterIP", format!("{ip:?}"), "must be a valid IP address, (e.g. 10.9.8.7)"),
            Ok(IpAddr::V6(_)) => errs.invalid("spec.clusterIP", format!("{ip:?}"), "IPv6 is not supported"),
            Ok(IpAddr::V4(v4))
                if !ranges.cidr.contains(v4) || v4 == ranges.cidr.network() || v4 == ranges.cidr.broadcast() =>
            {
                errs.invalid(
                    "spec.clusterIP",
                    format!("{ip:?}"),
                    format!("provided IP is not in the valid range. The range of valid IPs is {}", ranges.cidr),
                )
            }
            Ok(_) => {}
        }
    }
    let mut names = HashSet::new();
    let mut port_protos = HashSet::new();
    let mut node_ports: Vec<(i32, &str)> = Vec::new();
    for (i, p) in ports.iter().enumerate() {
        let path = format!("spec.ports[{i}]");
        match p.name.as_deref() {
            None | Some("") if ports.len() > 1 => errs.required(format!("{path}.name"), "when there are several ports"),
            None | Some("") => {}
            Some(n) if !is_dns1123_label(n) => {
                errs.invalid(format!("{path}.name"), format!("{n:?}"), "must be a DNS-1123 label")
            }
            Some(n) => {
                if !names.insert(n) {
                    errs.other(format!("{path}.name"), "Duplicate value", format!("{n:?}"));
                }
            }
        }
        if !(1..=65535).contains(&p.port) {
            errs.invalid(format!("{path}.port"), p.port, "must be between 1 and 65535, inclusive");
        }
        let proto = p.protocol.as_deref().unwrap_or("TCP");
        if !PROTOCOLS.contains(&proto) {
            errs.unsupported(format!("{path}.protocol"), proto, PROTOCOLS);
        }
        if !port_protos.insert((p.port, proto)) {
            errs.other(path.clone(), "Duplicate value", format!("{{port: {}, protocol: {proto:?}}}", p.port));
        }
        match &p.target_port {
            Some(IntOrString::Int(t)) if !(1..=65535).contains(t) => {
                errs.invalid(format!("{path}.targetPort"), t, "must be between 1 and 65535, inclusive")
            }
            Some(IntOrString::String(t)) if !is_iana_svc_name(t) => errs.invalid(
                format!("{path}.targetPort"),
                format!("{t:?}"),
                "must be a port number or an IANA service name (at most 15 lower case alphanumeric or '-', with a letter)",
            ),
            _ => {}
        }
        if let Some(np) = p.node_port {
            if !(type_ == "NodePort" || type_ == "LoadBalancer") {
                errs.other(
                    format!("{path}.nodePort"),
                    "Forbidden",
                    format!("may not be used when `type` is '{type_}'"),
                );
            } else if !u16::try_from(np).is_ok_and(|p| ranges.node_ports.contains(&p)) {
                errs.invalid(
                    format!("{path}.nodePort"),
                    np,
                    format!(
                        "provided port is not in the valid range. The range of valid ports is {}",
                        ranges.node_ports_text()
                    ),
                );
            } else if node_ports.iter().any(|&(n, pr)| n == np && pr == proto) {
                errs.other(format!("{path}.nodePort"), "Duplicate value", np);
            }
            node_ports.push((np, proto));
        }
    }
    for (k, v) in spec.selector.iter().flatten() {
        if !is_label_key(k) {
            errs.invalid(
                "spec.selector",
                format!("{k:?}"),
                "a label key must be a qualified name: at most 63 alphanumeric characters, '-', '_' or '.', starting and \
                 ending with an alphanumeric character, with an optional DNS subdomain prefix and '/'",
            );
        }
        if !is_label_value(v) {
            errs.invalid(
                format!("spec.selector[{k}]"),
                format!("{v:?}"),
                "a label value must be empty or at most 63 alphanumeric characters, '-', '_' or '.', starting and \
                 ending with an alphanumeric character",
            );
        }
    }
    for (i, ip) in spec.external_ips.iter().flatten().enumerate() {
        if ip.parse::<IpAddr>().is_err() {
            errs.invalid(format!("spec.externalIPs[{i}]"), format!("{ip:?}"), "must be a valid IP address");
        }
    }
    if let Some(a) = spec.session_affinity.as_deref() {
        if !["ClientIP", "None"].contains(&a) {
            errs.unsupported("spec.sessionAffinity", a, &["ClientIP", "None"]);
        }
    }
    if let Some(t) =
        spec.session_affinity_config.as_ref().and_then(|c| c.client_ip.as_ref()).and_then(|c| c.timeout_seconds)
    {
        if !(1..=86400).contains(&t) {
            errs.invalid(
                "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                t,
                "must be in the range 0 < x <= 86400",
            );
        }
    }
    for (path, v) in [
        ("spec.externalTrafficPolicy", &spec.external_traffic_policy),
        ("spec.internalTrafficPolicy", &spec.internal_traffic_policy),
    ] {
        if let Some(v) = v.as_deref() {
            if !["Cluster", "Local"].contains(&v) {
                errs.unsupported(path, v, &["Cluster", "Local"]);
            }
        }
    }
    errs.into_result()
}

// ---- allocation ----

/// The Service's allocation keys: its ClusterIP and its node ports (a port number is one key even when TCP and
/// UDP share it), each with the owner it is recorded under.
pub fn allocation_keys(svc: &Service) -> Vec<(String, String)> {
    let owner = ObjectKey::of(svc).to_string();
    let mut keys = Vec::new();
    let Some(spec) = &svc.spec else { return keys };
    if let Some(ip) = spec.cluster_ip.as_deref().and_then(|ip| ip.parse::<Ipv4Addr>().ok()) {
        keys.push((format!("{IP_PREFIX}{ip}"), owner.clone()));
    }
    let ports: BTreeSet<i32> = spec.ports.iter().flatten().filter_map(|p| p.node_port).collect();
    keys.extend(ports.into_iter().map(|p| (format!("{PORT_PREFIX}{p}"), owner.clone())));
    keys
}

/// A random free address of the network, never its network or broadcast address.
pub fn pick_ip(cidr: Ipv4Network, used: &HashSet<Ipv4Addr>, rng: &mut impl Rng) -> Option<Ipv4Addr> {
    let base = u32::from(cidr.network());
    let size: u64 = 1u64 << (32 - cidr.prefix());
    if size < 4 {
        return None;
    }
    let usable = size - 2;
    let at = |off: u64| Ipv4Addr::from(base.wrapping_add(1 + off as u32));
    // Random probes are enough while the range is mostly free; a scan from a random start finds the last ones.
    for _ in 0..32 {
        let ip = at(rng.gen_range(0..usable));
        if !used.contains(&ip) {
            return Some(ip);
        }
    }
    let start = rng.gen_range(0..usable);
    (0..usable).map(|i| at((start + i) % usable)).find(|ip| !used.contains(ip))
}

/// A random free port of the range.
pub fn pick_port(range: &RangeInclusive<u16>, used: &HashSet<u16>, rng: &mut impl Rng) -> Option<u16> {
    let (lo, hi) = (*range.start() as u32, *range.end() as u32);
    if lo > hi {
        return None;
    }
    let n = hi - lo + 1;
    for _ in 0..32 {
        let p = (lo + rng.gen_range(0..n)) as u16;
        if !used.contains(&p) {
            return Some(p);
        }
    }
    let start = rng.gen_range(0..n);
    (0..n).map(|i| (lo + (start + i) % n) as u16).find(|p| !used.contains(p))
}

/// The Service a write of `desired` over `current` stores, before new allocations: defaults applied, the
/// allocated clusterIP kept (it is immutable), node ports kept for ports that still want one and did not name
/// another. Pure, so `apply` can tell "unchanged" without writing.
pub fn prepare_update(current: &Service, desired: &Service) -> Result<Service, FieldErrors> {
    let mut new = desired.clone();
    apply_defaults(&mut new);
    let mut errs = FieldErrors::default();
    let cur_spec = current.spec.clone().unwrap_or_default();
    let spec = new.spec.get_or_insert_with(Default::default);
    let external_name = spec.type_.as_deref() == Some("ExternalName");
    match (&cur_spec.cluster_ip, spec.cluster_ip.clone()) {
        // Going to ExternalName gives the ClusterIP up, as the API server does.
        (_, None) if external_name => spec.cluster_ips = None,
        (Some(cur), None) => {
            spec.cluster_ip = Some(cur.clone());
            spec.cluster_ips = Some(vec![cur.clone()]);
        }
        (Some(cur), Some(new_ip)) if *cur != new_ip => {
            errs.invalid("spec.clusterIP", format!("{new_ip:?}"), "field is immutable")
        }
        _ => {}
    }
    if wants_node_ports(spec) {
        let cur_ports = cur_spec.ports.clone().unwrap_or_default();
        for p in spec.ports.iter_mut().flatten() {
            if p.node_port.is_none() {
                p.node_port = matching_port(&cur_ports, p).and_then(|c| c.node_port);
            }
        }
    }
    // Status is the controllers' to write (a LoadBalancer's ingress, for one).
    new.status = current.status.clone();
    errs.into_result().map(|_| new)
}

fn matching_port<'a>(ports: &'a [ServicePort], p: &ServicePort) -> Option<&'a ServicePort> {
    let proto = |x: &ServicePort| x.protocol.clone().unwrap_or_else(|| "TCP".into());
    ports
        .iter()
        .find(|c| c.name.is_some() && c.name == p.name && proto(c) == proto(p))
        .or_else(|| ports.iter().find(|c| c.port == p.port && proto(c) == proto(p)))
}

/// Fills the ClusterIP and node ports a Service still needs with random free ones. Returns the keys it picked
/// (a clash on those is retried, a clash on a requested one is the user's error).
fn allocate(
    svc: &mut Service,
    ranges: &ServiceRanges,
    used_ips: &HashSet<Ipv4Addr>,
    used_ports: &HashSet<u16>,
) -> Result<Vec<String>> {
    let key = ObjectKey::of(svc);
    let mut picked = Vec::new();
    let mut rng = rand::thread_rng();
    let Some(spec) = svc.spec.as_mut() else { return Ok(picked) };
    let external_name = spec.type_.as_deref() == Some("ExternalName");
    if !external_name && spec.cluster_ip.is_none() {
        let ip = pick_ip(ranges.cidr, used_ips, &mut rng).ok_or_else(|| Error::Full {
            key: key.clone(),
            what: "cluster IPs",
            range: ranges.cidr.to_string(),
        })?;
        spec.cluster_ip = Some(ip.to_string());
        spec.cluster_ips = Some(vec![ip.to_string()]);
        picked.push(format!("{IP_PREFIX}{ip}"));
    }
    if wants_node_ports(spec) {
        let mut used = used_ports.clone();
        used.extend(spec.ports.iter().flatten().filter_map(|p| p.node_port).map(|p| p as u16));
        for p in spec.ports.iter_mut().flatten().filter(|p| p.node_port.is_none()) {
            let port = pick_port(&ranges.node_ports, &used, &mut rng).ok_or_else(|| Error::Full {
                key: key.clone(),
                what: "node ports",
                range: ranges.node_ports_text(),
            })?;
            used.insert(port);
            p.node_port = Some(port as i32);
            picked.push(format!("{PORT_PREFIX}{port}"));
        }
    } else {
        // Node ports belong only to NodePort and LoadBalancer services; a type change gives them back.
        for p in spec.ports.iter_mut().flatten() {
            p.node_port = None;
        }
    }
    Ok(picked)
}

async fn used(store: &Store) -> Result<(HashSet<Ipv4Addr>, HashSet<u16>)> {
    let ips = store.keys(IP_PREFIX).await?;
    let ports = store.keys(PORT_PREFIX).await?;
    Ok((
        ips.keys().filter_map(|k| k.strip_prefix(IP_PREFIX)?.parse().ok()).collect(),
        ports.keys().filter_map(|k| k.strip_prefix(PORT_PREFIX)?.parse().ok()).collect(),
    ))
}

fn allocated_error(svc: &Service, claimed: &str) -> Error {
    let key = ObjectKey::of(svc);
    if let Some(ip) = claimed.strip_prefix(IP_PREFIX) {
        return Error::Allocated { key, field: "spec.clusterIP".into(), value: format!("{ip:?}"), what: "IP" };
    }
    let port = claimed.strip_prefix(PORT_PREFIX).unwrap_or(claimed);
    let index = svc
        .spec
        .iter()
        .flat_map(|s| s.ports.iter().flatten())
        .position(|p| p.node_port.map(|n| n.to_string()).as_deref() == Some(port))
        .unwrap_or(0);
    Error::Allocated { key, field: format!("spec.ports[{index}].nodePort"), value: port.to_string(), what: "port" }
}

const ATTEMPTS: usize = 16;

/// Creates a Service as the API server does: defaults, validation, then the object and its allocations in one
/// transaction.
pub async fn create(store: &Store, ranges: &ServiceRanges, svc: &Service) -> Result<Service> {
    let mut svc = svc.clone();
    apply_defaults(&mut svc);
    if svc.metadata.namespace.is_none() {
        svc.metadata.namespace = Some("default".into());
    }
    let key = ObjectKey::of(&svc);
    validate(&svc, ranges).map_err(|errors| Error::Invalid { key: key.clone(), errors })?;
    for _ in 0..ATTEMPTS {
        let (ips, ports) = used(store).await?;
        let mut candidate = svc.clone();
        let picked = allocate(&mut candidate, ranges, &ips, &ports)?;
        let claims = Claims { claim: allocation_keys(&candidate), release: Vec::new() };
        match store.create_claiming(&candidate, &claims).await {
            Err(store::Error::Claimed { key }) if picked.contains(&key) => continue,
            Err(store::Error::Claimed { key }) => return Err(allocated_error(&candidate, &key)),
            other => return Ok(other?),
        }
    }
    Err(Error::Full { key, what: "free allocation after retries", range: ranges.cidr.to_string() })
}

/// Updates a Service: the clusterIP stays, node ports follow type and port changes (new ones claimed, dropped
/// ones released, in the same transaction). With a resourceVersion it is a compare-and-swap on it; without, it
/// retries on concurrent writes.
pub async fn update(store: &Store, ranges: &ServiceRanges, svc: &Service) -> Result<Service> {
    let key = ObjectKey::of(svc);
    let pinned = svc.metadata.resource_version.clone().filter(|v| !v.is_empty());
    for _ in 0..ATTEMPTS {
        let current: Service = store.get(key.namespace.as_deref(), &key.name).await?;
        let mut desired =
            prepare_update(&current, svc).map_err(|errors| Error::Invalid { key: key.clone(), errors })?;
        desired.metadata.namespace = key.namespace.clone();
        validate(&desired, ranges).map_err(|errors| Error::Invalid { key: key.clone(), errors })?;
        desired.metadata.resource_version = Some(pinned.clone().unwrap_or_else(|| store::rev_of(&current).to_string()));
        let (ips, ports) = used(store).await?;
        let picked = allocate(&mut desired, ranges, &ips, &ports)?;
        let old = allocation_keys(&current);
        let new = allocation_keys(&desired);
        let claims = Claims {
            claim: new.iter().filter(|k| !old.contains(k)).cloned().collect(),
            release: old.iter().filter(|k| !new.contains(k)).cloned().collect(),
        };
        match store.update_claiming(&desired, &claims).await {
            Err(store::Error::Claimed { key }) if picked.contains(&key) => continue,
            Err(store::Error::Claimed { key }) => return Err(allocated_error(&desired, &key)),
            Err(e) if e.is_conflict() && pinned.is_none() => continue,
            other => return Ok(other?),
        }
    }
    Err(Error::Store(store::Error::Conflict { kind: "Service", key, expected: String::new(), actual: 0 }))
}

/// Deletes a Service and releases its ClusterIP and node ports in the same transaction.
pub async fn delete(store: &Store, namespace: Option<&str>, name: &str, precondition: Option<&str>) -> Result<Service> {
    Ok(store.delete_releasing::<Service>(namespace, name, precondition, allocation_keys).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(yaml: &str) -> Service {
        let mut s: Service = serde_norway::from_str(yaml).unwrap();
        apply_defaults(&mut s);
        s
    }

    fn errors(yaml: &str) -> Vec<String> {
        match validate(&svc(yaml), &ServiceRanges::default()) {
            Ok(()) => vec![],
            Err(e) => e.0.iter().map(|e| e.to_string()).collect(),
        }
    }

    const BASE: &str = "metadata: {name: my-service}\nspec:\n  selector: {app: MyApp}\n";

    #[test]
    fn validation_names_the_field() {
        let cases: &[(&str, &[&str])] = &[
            ("ports: [{port: 80, targetPort: 9376}]", &[]),
            ("ports: [{port: 80, protocol: UDP}]", &[]),
            ("clusterIP: None", &[]),
            (
                "ports: [{name: a, port: 80}, {name: b, port: 70000}]",
                &["spec.ports[1].port: Invalid value: 70000: must be between 1 and 65535, inclusive"],
            ),
            ("ports: [{port: 0}]", &["spec.ports[0].port: Invalid value: 0: must be between 1 and 65535, inclusive"]),
            (
                "ports: [{port: 80, protocol: ICMP}]",
                &["spec.ports[0].protocol: Unsupported value: \"ICMP\": supported values: \"SCTP\", \"TCP\", \"UDP\""],
            ),
            (
                "ports: [{port: 80}, {port: 443}]",
                &[
                    "spec.ports[0].name: Required value: when there are several ports",
                    "spec.ports[1].name: Required value: when there are several ports",
                ],
            ),
            ("ports: [{name: x, port: 80}, {name: x, port: 443}]", &["spec.ports[1].name: Duplicate value: \"x\""]),
            ("ports: [{name: Web, port: 80}]", &["spec.ports[0].name: Invalid value: \"Web\": must be a DNS-1123 label"]),
            ("ports: [{port: 80, targetPort: http}]", &[]),
            ("ports: [{port: 80, targetPort: 0}]", &["spec.ports[0].targetPort: Invalid value: 0: must be between 1 and 65535, inclusive"]),
            ("type: Magic\n  ports: [{port: 80}]", &["spec.type: Unsupported value: \"Magic\": supported values: \"ClusterIP\", \"ExternalName\", \"LoadBalancer\", \"NodePort\""]),
            (
                "clusterIP: 10.0.171.239\n  ports: [{port: 80}]",
                &["spec.clusterIP: Invalid value: \"10.0.171.239\": provided IP is not in the valid range. The range of valid IPs is 10.96.0.0/12"],
            ),
            ("clusterIP: 10.96.0.0\n  ports: [{port: 80}]", &["spec.clusterIP: Invalid value: \"10.96.0.0\": provided IP is not in the valid range. The range of valid IPs is 10.96.0.0/12"]),
            ("clusterIP: banana\n  ports: [{port: 80}]", &["spec.clusterIP: Invalid value: \"banana\": must be a valid IP address, (e.g. 10.9.8.7)"]),
            ("type: NodePort\n  ports: [{port: 80, nodePort: 30080}]", &[]),
            (
                "type: NodePort\n  ports: [{port: 80, nodePort: 80}]",
                &["spec.ports[0].nodePort: Invalid value: 80: provided port is not in the valid range. The range of valid ports is 30000-32767"],
            ),
            ("ports: [{port: 80, nodePort: 30080}]", &["spec.ports[0].nodePort: Forbidden: may not be used when `type` is 'ClusterIP'"]),
            ("ports: []", &["spec.ports: Required value"]),
            ("type: ExternalName\n  externalName: my.database.example.com", &[]),
            ("type: ExternalName", &["spec.externalName: Required value"]),
            ("type: NodePort\n  clusterIP: None\n  ports: [{port: 80}]", &["spec.clusterIP: Invalid value: \"None\": may not be set to 'None' for NodePort services"]),
            ("externalIPs: [80.11.12.10]\n  ports: [{port: 80}]", &[]),
            ("externalIPs: [80.11.12]\n  ports: [{port: 80}]", &["spec.externalIPs[0]: Invalid value: \"80.11.12\": must be a valid IP address"]),
            ("ports: [{name: a, port: 80}, {name: b, port: 80}]", &["spec.ports[1]: Duplicate value: {port: 80, protocol: \"TCP\"}"]),
            ("ports: [{name: a, port: 53}, {name: b, port: 53, protocol: UDP}]", &[]),
        ];
        for (spec, want) in cases {
            let got = errors(&format!("{BASE}  {spec}\n"));
            assert_eq!(got, want.iter().map(|s| s.to_string()).collect::<Vec<_>>(), "spec: {spec}");
        }
    }

    #[test]
    fn selector_and_name_syntax() {
        let got = errors(
            "metadata: {name: 1svc}\nspec:\n  selector: {'-bad': ok, app: 'no spaces'}\n  ports: [{port: 80}]\n",
        );
        assert_eq!(got.len(), 3, "{got:?}");
        assert!(got[0].starts_with("metadata.name: Invalid value: \"1svc\""), "{got:?}");
        assert!(got[1].starts_with("spec.selector: Invalid value: \"-bad\""), "{got:?}");
        assert!(got[2].starts_with("spec.selector[app]: Invalid value: \"no spaces\""), "{got:?}");
        assert!(is_label_key("app.kubernetes.io/name"));
        assert!(!is_label_key("app.kubernetes.io/"));
        assert!(is_iana_svc_name("http-alt"));
        assert!(!is_iana_svc_name("8080"));
        assert!(!is_iana_svc_name("a--b"));
    }

    #[test]
    fn defaults_are_those_of_the_api_server() {
        let s = svc("metadata: {name: s}\nspec:\n  type: NodePort\n  ports: [{port: 80}]\n");
        let spec = s.spec.unwrap();
        let p = &spec.ports.unwrap()[0];
        assert_eq!(p.protocol.as_deref(), Some("TCP"));
        assert_eq!(p.target_port, Some(IntOrString::Int(80)));
        assert_eq!(spec.session_affinity.as_deref(), Some("None"));
        assert_eq!(spec.external_traffic_policy.as_deref(), Some("Cluster"));
    }

    #[test]
    fn ip_picks_skip_network_broadcast_and_used() {
        let cidr: Ipv4Network = "10.0.0.0/29".parse().unwrap();
        let mut rng = rand::thread_rng();
        let mut used = HashSet::new();
        for _ in 0..6 {
            let ip = pick_ip(cidr, &used, &mut rng).unwrap();
            assert!(ip != cidr.network() && ip != cidr.broadcast() && cidr.contains(ip), "{ip}");
            assert!(used.insert(ip), "{ip} picked twice");
        }
        assert_eq!(pick_ip(cidr, &used, &mut rng), None, "a /29 has 6 usable addresses");
        assert_eq!(pick_ip("10.0.0.0/31".parse().unwrap(), &HashSet::new(), &mut rng), None);
    }

    #[test]
    fn port_picks_stay_in_range_and_find_the_last_free_one() {
        let mut rng = rand::thread_rng();
        let range = 30000..=30009;
        let used: HashSet<u16> = (30000..=30009).filter(|p| *p != 30007).collect();
        assert_eq!(pick_port(&range, &used, &mut rng), Some(30007));
        let all: HashSet<u16> = range.clone().collect();
        assert_eq!(pick_port(&range, &all, &mut rng), None);
    }

    #[test]
    fn update_keeps_the_cluster_ip_and_node_ports() {
        let cur = svc("metadata: {name: s}\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.5\n  ports: [{name: web, port: 80, nodePort: 30080}]\n");
        let want =
            svc("metadata: {name: s}\nspec:\n  type: NodePort\n  ports: [{name: web, port: 80, targetPort: 8080}]\n");
        let got = prepare_update(&cur, &want).unwrap();
        let spec = got.spec.unwrap();
        assert_eq!(spec.cluster_ip.as_deref(), Some("10.96.0.5"));
        assert_eq!(spec.ports.unwrap()[0].node_port, Some(30080));
        let moved = svc("metadata: {name: s}\nspec:\n  clusterIP: 10.96.0.6\n  ports: [{port: 80}]\n");
        let err = prepare_update(&cur, &moved).unwrap_err();
        assert_eq!(err.to_string(), "spec.clusterIP: Invalid value: \"10.96.0.6\": field is immutable");
    }

    #[test]
    fn allocation_keys_name_ip_and_ports_once() {
        let mut s = svc("metadata: {name: s, namespace: n}\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.5\n  ports: [{name: d, port: 53, nodePort: 30053}, {name: u, port: 53, protocol: UDP, nodePort: 30053}]\n");
        s.metadata.namespace = Some("n".into());
        assert_eq!(
            allocation_keys(&s),
            vec![
                ("/registry/ranges/serviceips/10.96.0.5".to_string(), "n/s".to_string()),
                ("/registry/ranges/servicenodeports/30053".to_string(), "n/s".to_string()),
            ]
        );
    }
}
