//! The Endpoints controller: for every Service with a selector, the pods it selects as addresses (ready) and
//! notReadyAddresses (not ready, unless the Service publishes them anyway), each Service port resolved per pod
//! (named targetPorts through the pod's containerPorts), hostnames for pods whose subdomain is the Service, a
//! targetRef to the pod and its nodeName; grouped into subsets as Kubernetes' `RepackSubsets` does. Written only
//! when different; removed with its Service. Services without a selector keep their hand-written Endpoints.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    EndpointAddress, EndpointPort, EndpointSubset, Endpoints, ObjectReference, Pod, Service, ServicePort,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use weft_api::ObjectKey;

use crate::action::{Action, Outcome};
use crate::cache::Cache;
use crate::events::service_selector;
use crate::obj::{key_of, namespace, uid, Kind, Obj};
use crate::pod;

pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";

fn protocol(p: Option<&String>) -> &str {
    p.map(String::as_str).filter(|p| !p.is_empty()).unwrap_or("TCP")
}

/// `podutil.FindPort`: a number is used as is; a name is looked up among the pod's containerPorts with the
/// Service port's protocol. No targetPort means the Service port.
pub fn find_port(p: &Pod, sp: &ServicePort) -> Option<i32> {
    match &sp.target_port {
        None => Some(sp.port),
        Some(IntOrString::Int(0)) => Some(sp.port),
        Some(IntOrString::Int(n)) => Some(*n),
        Some(IntOrString::String(name)) => {
            if let Ok(n) = name.parse::<i32>() {
                return Some(n);
            }
            let spec = p.spec.as_ref()?;
            spec.containers.iter().flat_map(|c| c.ports.iter().flatten()).find_map(|cp| {
                (cp.name.as_deref() == Some(name.as_str())
                    && protocol(cp.protocol.as_ref()) == protocol(sp.protocol.as_ref()))
                .then_some(cp.container_port)
            })
        }
    }
}

/// `endpointsliceutil.ShouldPodBeInEndpoints`.
fn belongs(p: &Pod, include_terminating: bool) -> bool {
    if pod::ip(p).is_none() {
        return false;
    }
    if !include_terminating && p.metadata.deletion_timestamp.is_some() {
        return false;
    }
    match p.spec.as_ref().and_then(|s| s.restart_policy.as_deref()) {
        Some("Never") => !pod::is_terminal(p),
        Some("OnFailure") => pod::phase(p) != "Succeeded",
        _ => true,
    }
}

fn address(svc: &Service, p: &Pod) -> EndpointAddress {
    let spec = p.spec.as_ref();
    let hostname = spec.and_then(|s| s.hostname.clone()).filter(|h| {
        !h.is_empty()
            && spec.and_then(|s| s.subdomain.as_deref()) == svc.metadata.name.as_deref()
            && namespace(&svc.metadata) == namespace(&p.metadata)
    });
    EndpointAddress {
        ip: pod::ip(p).unwrap_or_default().to_string(),
        hostname,
        node_name: Some(pod::node_name(p).to_string()).filter(|n| !n.is_empty()),
        target_ref: Some(ObjectReference {
            kind: Some("Pod".into()),
            namespace: Some(namespace(&p.metadata).to_string()),
            name: p.metadata.name.clone(),
            uid: p.metadata.uid.clone(),
            ..Default::default()
        }),
    }
}

fn is_headless(svc: &Service) -> bool {
    svc.spec.as_ref().and_then(|s| s.cluster_ip.as_deref()) == Some("None")
}

/// A sortable identity for an EndpointPort (name, port, protocol, appProtocol).
type PortKey = (String, i32, String, String);

/// An address by (ip, pod uid), with whether it is ready.
type Addresses = BTreeMap<(String, String), (EndpointAddress, bool)>;

fn port_key(p: &EndpointPort) -> PortKey {
    (
        p.name.clone().unwrap_or_default(),
        p.port,
        p.protocol.clone().unwrap_or_default(),
        p.app_protocol.clone().unwrap_or_default(),
    )
}

/// The subsets for a Service: per port the set of (address, ready), then ports with the same set of addresses
/// share a subset (`RepackSubsets`). Sorted: addresses by IP, ports by name and number, subsets by first port.
pub fn subsets(svc: &Service, pods: &[&Pod]) -> Vec<EndpointSubset> {
    let spec = svc.spec.clone().unwrap_or_default();
    let tolerate = spec.publish_not_ready_addresses == Some(true);
    let ports = spec.ports.clone().unwrap_or_default();
    // port (None: the address-only sentinel of headless Services without ports) → ip → (address, ready)
    let mut by_port: BTreeMap<Option<PortKey>, (Option<EndpointPort>, Addresses)> = BTreeMap::new();
    for p in pods.iter().filter(|p| belongs(p, tolerate)) {
        let addr = address(svc, p);
        let ready = tolerate || pod::is_ready(p);
        let akey = (addr.ip.clone(), uid(&p.metadata).to_string());
        if ports.is_empty() {
            if is_headless(svc) {
                by_port.entry(None).or_insert((None, BTreeMap::new())).1.insert(akey, (addr, ready));
            }
            continue;
        }
        for sp in &ports {
            let Some(n) = find_port(p, sp) else { continue };
            let ep = EndpointPort {
                name: sp.name.clone().filter(|n| !n.is_empty()),
                port: n,
                protocol: Some(protocol(sp.protocol.as_ref()).to_string()),
                app_protocol: sp.app_protocol.clone(),
            };
            by_port
                .entry(Some(port_key(&ep)))
                .or_insert((Some(ep), BTreeMap::new()))
                .1
                .insert(akey.clone(), (addr.clone(), ready));
        }
    }
    // Group ports by their exact set of addresses.
    type Group = (Vec<EndpointPort>, Vec<(EndpointAddress, bool)>);
    type Members = Vec<((String, String), bool)>;
    let mut groups: BTreeMap<Members, Group> = BTreeMap::new();
    for (_, (port, addrs)) in by_port {
        let key: Members = addrs.iter().map(|(k, (_, r))| (k.clone(), *r)).collect();
        let g = groups.entry(key).or_insert_with(|| (Vec::new(), addrs.into_values().collect()));
        g.0.extend(port);
    }
    let mut out: Vec<EndpointSubset> = groups
        .into_values()
        .map(|(mut ports, addrs)| {
            ports.sort_by_key(port_key);
            let (ready, not): (Vec<_>, Vec<_>) = addrs.into_iter().partition(|(_, r)| *r);
            let list = |v: Vec<(EndpointAddress, bool)>| {
                let mut a: Vec<EndpointAddress> = v.into_iter().map(|(a, _)| a).collect();
                a.sort_by(|x, y| ip_order(&x.ip, &y.ip));
                (!a.is_empty()).then_some(a)
            };
            EndpointSubset {
                addresses: list(ready),
                not_ready_addresses: list(not),
                ports: (!ports.is_empty()).then_some(ports),
            }
        })
        .collect();
    out.sort_by(|a, b| {
        let first = |s: &EndpointSubset| s.ports.as_ref().and_then(|p| p.first()).map(port_key);
        first(a).cmp(&first(b))
    });
    out
}

/// IPv4 addresses in numeric order, anything else after them as text.
fn ip_order(a: &str, b: &str) -> std::cmp::Ordering {
    match (a.parse::<std::net::IpAddr>(), b.parse::<std::net::IpAddr>()) {
        (Ok(x), Ok(y)) => x.cmp(&y),
        _ => a.cmp(b),
    }
}

fn labels_for(svc: &Service) -> Option<BTreeMap<String, String>> {
    let mut l = svc.metadata.labels.clone().unwrap_or_default();
    if is_headless(svc) {
        l.insert(HEADLESS_LABEL.into(), String::new());
    } else {
        l.remove(HEADLESS_LABEL);
    }
    (!l.is_empty()).then_some(l)
}

pub fn reconcile(key: &ObjectKey, cache: &Cache, _now: k8s_openapi::jiff::Timestamp) -> Outcome {
    let existing = cache.endpoints.get(key);
    let Some(svc) = cache.services.get(key) else {
        // The Service is gone: so are its Endpoints (hand-written ones too, as in Kubernetes).
        return match existing {
            Some(e) => Outcome::new(vec![Action::delete(
                Kind::Endpoints,
                key.clone(),
                uid(&e.metadata),
                "its Service is gone",
            )]),
            None => Outcome::default(),
        };
    };
    let Some(selector) = service_selector(&svc) else { return Outcome::default() };
    if svc.metadata.deletion_timestamp.is_some() {
        return Outcome::default();
    }
    let pods = cache.pods.in_namespace(namespace(&svc.metadata));
    let selected: Vec<&Pod> = pods.iter().map(|p| p.as_ref()).filter(|p| selector.matches(pod::labels(p))).collect();
    let subsets = subsets(&svc, &selected);
    let subsets = (!subsets.is_empty()).then_some(subsets);
    let labels = labels_for(&svc);
    let count =
        |s: &Option<Vec<EndpointSubset>>, f: fn(&EndpointSubset) -> usize| s.iter().flatten().map(f).sum::<usize>();
    let why = format!(
        "{} ready, {} not ready",
        count(&subsets, |s| s.addresses.as_ref().map_or(0, Vec::len)),
        count(&subsets, |s| s.not_ready_addresses.as_ref().map_or(0, Vec::len))
    );
    match existing {
        None => Outcome::new(vec![Action::Create(Obj::Endpoints(Endpoints {
            metadata: ObjectMeta {
                name: Some(key.name.clone()),
                namespace: Some(namespace(&svc.metadata).to_string()),
                labels,
                ..Default::default()
            },
            subsets,
        }))]),
        Some(e) => {
            let current = e.subsets.clone().filter(|s| !s.is_empty());
            if current == subsets && e.metadata.labels == labels {
                return Outcome::default();
            }
            let mut new = (*e).clone();
            new.subsets = subsets;
            new.metadata.labels = labels;
            debug_assert_eq!(key_of(&new.metadata), *key);
            Outcome::new(vec![Action::update(Obj::Endpoints(new), why)])
        }
    }
}

#[cfg(test)]
mod tests;
