//! What the proxy keeps of a Service or an Endpoints object: the informers' transforms (client-go's
//! `SetTransform`) turn each object, as it arrives, into the ports and ready endpoints this node serves, parsed
//! once. The k8s-openapi objects are dropped right after; at 10,000 services × 10 endpoints the proxy holds
//! about a tenth of what the whole objects took. Pure functions, no I/O.
//!
//! What cannot be served is not dropped silently: a summary carries its skip reasons (a bad port, a bad
//! address, or — with no ports at all — why the whole Service is refused), which every sync reports and the
//! daemon logs once.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Endpoints, Service};
use weft_api::service::{is_dns1035_label, is_dns1123_label};

use crate::model::{Endpoint, Protocol, ServicePort, ServicePortName, DEFAULT_AFFINITY_TIMEOUT};
use crate::table::Skipped;

/// A Service as the proxy serves it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceSummary {
    /// Its valid ports, in the Service's order.
    pub ports: Vec<(ServicePortName, ServicePort)>,
    /// What was left out, and why; a refused Service has no ports and one entry here.
    pub skipped: Vec<Skipped>,
}

/// One port of an Endpoints object: its ready endpoints, sorted and deduplicated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointPort {
    /// The port's name ("" for a single unnamed port).
    pub name: String,
    pub protocol: Protocol,
    pub endpoints: Vec<Endpoint>,
}

/// An Endpoints object as the proxy serves it, for one node (`Endpoint::is_local` is decided here).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndpointsSummary {
    /// Sorted by (name, protocol).
    pub ports: Vec<EndpointPort>,
    pub skipped: Vec<Skipped>,
}

impl EndpointsSummary {
    /// The ready endpoints of the port named `name` with `protocol`.
    pub fn endpoints(&self, name: &str, protocol: Protocol) -> Option<&[Endpoint]> {
        let i = self.ports.binary_search_by(|p| (p.name.as_str(), p.protocol).cmp(&(name, protocol))).ok()?;
        Some(&self.ports[i].endpoints)
    }
}

fn skip(out: &mut Vec<Skipped>, object: String, reason: impl Into<String>) {
    out.push(Skipped { object, reason: reason.into() });
}

/// A Service or Endpoints port's protocol and number, or a skip naming what is wrong with it.
fn checked_port(
    skipped: &mut Vec<Skipped>,
    object: &str,
    protocol: Option<&str>,
    port: i32,
) -> Option<(Protocol, u16)> {
    let Some(protocol) = Protocol::from_api(protocol) else {
        skip(skipped, object.to_string(), format!("unknown protocol {:?}", protocol.unwrap_or("")));
        return None;
    };
    let Some(port) = port_u16(port) else {
        skip(skipped, object.to_string(), format!("port {port} out of range"));
        return None;
    };
    Some((protocol, port))
}

fn port_u16(p: i32) -> Option<u16> {
    u16::try_from(p).ok().filter(|p| *p != 0)
}

fn refused(object: String, reason: impl Into<String>) -> Option<ServiceSummary> {
    let mut skipped = Vec::new();
    skip(&mut skipped, object, reason);
    Some(ServiceSummary { ports: vec![], skipped })
}

/// The informer's Service transform. None: nothing to serve and nothing wrong (headless, ExternalName).
pub fn service(svc: Service) -> Option<ServiceSummary> {
    let ns = svc.metadata.namespace.as_deref().unwrap_or("default");
    let Some(name) = svc.metadata.name.as_deref() else {
        return refused(format!("Service {ns:?}/?"), "no metadata.name");
    };
    // Names end up in rule comments and chain hashes: only what the API server would have accepted.
    if !is_dns1123_label(ns) || !is_dns1035_label(name) {
        return refused(format!("Service {ns:?}/{name:?}"), "namespace or name is not a DNS label");
    }
    let object = format!("Service {ns}/{name}");
    let Some(spec) = svc.spec.as_ref() else {
        return refused(object, "no spec");
    };
    let type_ = spec.type_.as_deref().unwrap_or("ClusterIP");
    let cluster_ip = match (type_, spec.cluster_ip.as_deref()) {
        ("ExternalName", _) | (_, Some("None")) => return None,
        (_, None | Some("")) => return refused(object, "no clusterIP allocated"),
        (_, Some(ip)) => match ip.parse::<Ipv4Addr>() {
            Ok(ip) => ip,
            Err(_) => return refused(object, format!("clusterIP {ip:?} is not an IPv4 address")),
        },
    };
    let mut skipped = Vec::new();
    let parse_ips = |ips: &mut dyn Iterator<Item = &str>, what: &str, skipped: &mut Vec<Skipped>| {
        let mut out = Vec::new();
        for ip in ips {
            match ip.parse::<Ipv4Addr>() {
                Ok(ip) if !out.contains(&ip) => out.push(ip),
                Ok(_) => {}
                Err(_) => skip(skipped, object.clone(), format!("{what} {ip:?} is not an IPv4 address")),
            }
        }
        out
    };
    let external_ips =
        parse_ips(&mut spec.external_ips.iter().flatten().map(String::as_str), "externalIP", &mut skipped);
    let load_balancer_ips = if type_ == "LoadBalancer" {
        let ingress = svc.status.as_ref().and_then(|s| s.load_balancer.as_ref()).and_then(|lb| lb.ingress.as_ref());
        parse_ips(
            &mut ingress.into_iter().flatten().filter_map(|i| i.ip.as_deref()),
            "load balancer ingress IP",
            &mut skipped,
        )
    } else {
        vec![]
    };
    let session_affinity = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        spec.session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .and_then(|t| u64::try_from(t).ok())
            .filter(|t| *t > 0)
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_AFFINITY_TIMEOUT)
    });
    let with_node_ports = matches!(type_, "NodePort" | "LoadBalancer");
    let internal_policy_local = spec.internal_traffic_policy.as_deref() == Some("Local");
    let external_local = spec.external_traffic_policy.as_deref() == Some("Local");

    let mut ports = Vec::new();
    let mut seen = BTreeSet::new();
    for p in spec.ports.iter().flatten() {
        let port_name = p.name.clone().unwrap_or_default();
        if !port_name.is_empty() && !is_dns1123_label(&port_name) {
            skip(&mut skipped, format!("Service {ns}/{name}:{port_name:?}"), "port name is not a DNS-1123 label");
            continue;
        }
        let object = format!("Service {ns}/{name}:{port_name}");
        let Some((protocol, port)) = checked_port(&mut skipped, &object, p.protocol.as_deref(), p.port) else {
            continue;
        };
        let node_port = match p.node_port.filter(|_| with_node_ports) {
            None => None,
            Some(np) => match port_u16(np) {
                Some(np) => Some(np),
                None => {
                    skip(&mut skipped, object, format!("nodePort {np} out of range"));
                    continue;
                }
            },
        };
        let mut sp = ServicePort {
            cluster_ip: Some(cluster_ip),
            port,
            node_port,
            external_ips: external_ips.clone(),
            load_balancer_ips: load_balancer_ips.clone(),
            session_affinity,
            external_policy_local: false,
            internal_policy_local,
        };
        // As kube-proxy: the external policy only means something for externally reachable services.
        sp.external_policy_local = external_local && sp.is_external();
        let spn = ServicePortName::new(ns, name, &port_name, protocol);
        if !seen.insert(spn.clone()) {
            skip(&mut skipped, object, "duplicate port name and protocol");
            continue;
        }
        ports.push((spn, sp));
    }
    Some(ServiceSummary { ports, skipped })
}

/// Node names shared by every endpoint on the same node: 100,000 endpoints on 100 nodes hold 100 strings.
#[derive(Debug, Default)]
pub struct NodeNames(Mutex<HashSet<Arc<str>>>);

impl NodeNames {
    /// Past this many names the set starts over (names still in use stay shared by those who hold them):
    /// a cluster whose nodes come and go must not grow it forever.
    const MAX: usize = 50_000;

    pub fn get(&self, name: &str) -> Arc<str> {
        let mut set = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = set.get(name) {
            return n.clone();
        }
        if set.len() >= Self::MAX {
            set.clear();
        }
        let n: Arc<str> = name.into();
        set.insert(n.clone());
        n
    }
}

/// The informer's Endpoints transform for the proxy on `node`. None: a name no Service can have (one warning).
pub fn endpoints(ep: Endpoints, node: &str, nodes: &NodeNames) -> Option<EndpointsSummary> {
    let ns = ep.metadata.namespace.as_deref().unwrap_or("default");
    let name = ep.metadata.name.as_deref().unwrap_or("");
    // Only a Service's (validated) name can match; anything else is never looked up.
    if !is_dns1123_label(ns) || !is_dns1035_label(name) {
        tracing::warn!(namespace = ?ns, name = ?name, "Endpoints ignored: namespace or name is not a DNS label");
        return None;
    }
    let mut skipped = Vec::new();
    let mut by_port: BTreeMap<(String, Protocol), BTreeSet<Endpoint>> = BTreeMap::new();
    for subset in ep.subsets.iter().flatten() {
        let mut addrs = Vec::new();
        for a in subset.addresses.iter().flatten() {
            match a.ip.parse::<Ipv4Addr>() {
                Ok(ip) => addrs.push((ip, a.node_name.as_deref().map(|n| nodes.get(n)))),
                Err(_) => skip(
                    &mut skipped,
                    format!("Endpoints {ns}/{name}"),
                    format!("address {:?} is not an IPv4 address", a.ip),
                ),
            }
        }
        for p in subset.ports.iter().flatten() {
            let port_name = p.name.clone().unwrap_or_default();
            let object = format!("Endpoints {ns}/{name}:{port_name:?}");
            let Some((protocol, port)) = checked_port(&mut skipped, &object, p.protocol.as_deref(), p.port) else {
                continue;
            };
            let set = by_port.entry((port_name, protocol)).or_default();
            for (ip, node_name) in &addrs {
                set.insert(Endpoint {
                    ip: *ip,
                    port,
                    is_local: node_name.as_deref() == Some(node),
                    node_name: node_name.clone(),
                    ready: true,
                });
            }
        }
    }
    let ports = by_port
        .into_iter()
        .map(|((name, protocol), set)| EndpointPort { name, protocol, endpoints: set.into_iter().collect() })
        .collect();
    Some(EndpointsSummary { ports, skipped })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn svc(v: serde_json::Value) -> Service {
        serde_json::from_value(v).unwrap()
    }
    fn spn(name: &str, port: &str, protocol: Protocol) -> ServicePortName {
        ServicePortName::new("default", name, port, protocol)
    }

    /// Every field the proxy keeps of a Service, what it drops, and what it refuses with exactly one reason.
    #[test]
    fn service_summary_keeps_what_the_proxy_serves_and_refuses_with_one_reason() {
        struct Case {
            name: &'static str,
            service: serde_json::Value,
            /// None: not kept at all.
            ports: Option<Vec<(ServicePortName, ServicePort)>>,
            /// The skip reasons, in order.
            reasons: Vec<&'static str>,
        }
        let base = |port| ServicePort::cluster_ip([10, 96, 0, 1].into(), port);
        let cases = vec![
            Case {
                name: "every field the dataplanes read is kept; labels, selector, targetPort are not",
                service: json!({"metadata": {"name": "web", "labels": {"a": "b"}, "annotations": {"x": "y"}},
                    "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.1", "selector": {"app": "web"},
                    "externalIPs": ["80.11.12.10", "80.11.12.10"], "sessionAffinity": "ClientIP",
                    "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}},
                    "externalTrafficPolicy": "Local", "internalTrafficPolicy": "Local",
                    "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080},
                              {"name": "dns", "port": 53, "protocol": "UDP", "nodePort": 30053}]},
                    "status": {"loadBalancer": {"ingress": [{"ip": "146.148.47.155"}, {"hostname": "lb.example"}]}}}),
                ports: Some(
                    [("http", 80, 30080, Protocol::Tcp), ("dns", 53, 30053, Protocol::Udp)]
                        .into_iter()
                        .map(|(n, p, np, proto)| {
                            (
                                spn("web", n, proto),
                                ServicePort {
                                    node_port: Some(np),
                                    external_ips: vec![[80, 11, 12, 10].into()],
                                    load_balancer_ips: vec![[146, 148, 47, 155].into()],
                                    session_affinity: Some(Duration::from_secs(60)),
                                    external_policy_local: true,
                                    internal_policy_local: true,
                                    ..base(p)
                                },
                            )
                        })
                        .collect(),
                ),
                reasons: vec![],
            },
            Case {
                name: "ClusterIP: node ports, LB ingress and an external policy without external reach are ignored",
                service: json!({"metadata": {"name": "web", "namespace": "default"}, "spec": {"clusterIP": "10.96.0.1",
                    "externalTrafficPolicy": "Local", "sessionAffinity": "ClientIP",
                    "ports": [{"port": 80, "nodePort": 30080}]},
                    "status": {"loadBalancer": {"ingress": [{"ip": "146.148.47.155"}]}}}),
                ports: Some(vec![(
                    spn("web", "", Protocol::Tcp),
                    ServicePort { session_affinity: Some(DEFAULT_AFFINITY_TIMEOUT), ..base(80) },
                )]),
                reasons: vec![],
            },
            Case {
                name: "headless: not kept, no warning",
                service: json!({"metadata": {"name": "web"}, "spec": {"clusterIP": "None", "ports": [{"port": 80}]}}),
                ports: None,
                reasons: vec![],
            },
            Case {
                name: "ExternalName: not kept, no warning",
                service: json!({"metadata": {"name": "web"}, "spec": {"type": "ExternalName",
                    "externalName": "db.example.com"}}),
                ports: None,
                reasons: vec![],
            },
            Case {
                name: "a name that is not a DNS label is refused",
                service: json!({"metadata": {"name": "Bad_Name"}, "spec": {"clusterIP": "10.96.0.1",
                    "ports": [{"port": 80}]}}),
                ports: Some(vec![]),
                reasons: vec!["namespace or name is not a DNS label"],
            },
            Case {
                name: "no name is refused",
                service: json!({"metadata": {}, "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 80}]}}),
                ports: Some(vec![]),
                reasons: vec!["no metadata.name"],
            },
            Case {
                name: "no spec is refused",
                service: json!({"metadata": {"name": "web"}}),
                ports: Some(vec![]),
                reasons: vec!["no spec"],
            },
            Case {
                name: "no clusterIP is refused",
                service: json!({"metadata": {"name": "web"}, "spec": {"ports": [{"port": 80}]}}),
                ports: Some(vec![]),
                reasons: vec!["no clusterIP allocated"],
            },
            Case {
                name: "an IPv6 clusterIP is refused",
                service: json!({"metadata": {"name": "web"}, "spec": {"clusterIP": "fd00::1",
                    "ports": [{"port": 80}]}}),
                ports: Some(vec![]),
                reasons: vec!["clusterIP \"fd00::1\" is not an IPv4 address"],
            },
            Case {
                name: "bad ports and a bad external IP are left out one reason each, the rest kept",
                service: json!({"metadata": {"name": "web"}, "spec": {"type": "NodePort", "clusterIP": "10.96.0.1",
                    "externalIPs": ["nope"],
                    "ports": [{"name": "a", "port": 80}, {"name": "b", "port": 70000},
                              {"name": "c", "port": 81, "protocol": "ICMP"}, {"name": "a", "port": 82},
                              {"name": "Bad_Port", "port": 83}, {"name": "d", "port": 84, "nodePort": 70000}]}}),
                ports: Some(vec![(spn("web", "a", Protocol::Tcp), base(80))]),
                reasons: vec![
                    "externalIP \"nope\" is not an IPv4 address",
                    "port 70000 out of range",
                    "unknown protocol \"ICMP\"",
                    "duplicate port name and protocol",
                    "port name is not a DNS-1123 label",
                    "nodePort 70000 out of range",
                ],
            },
        ];
        for c in cases {
            let got = service(svc(c.service));
            match (got, c.ports) {
                (None, None) => assert!(c.reasons.is_empty(), "{}", c.name),
                (Some(s), Some(ports)) => {
                    assert_eq!(s.ports, ports, "{}", c.name);
                    let reasons: Vec<&str> = s.skipped.iter().map(|s| s.reason.as_str()).collect();
                    assert_eq!(reasons, c.reasons, "{}", c.name);
                    assert!(s.skipped.iter().all(|s| s.object.starts_with("Service ")), "{}: {s:?}", c.name);
                }
                (got, want) => panic!("{}: got {got:?}, want ports {want:?}", c.name),
            }
        }
    }

    #[test]
    fn endpoints_summary_keeps_ready_addresses_per_port_and_marks_this_nodes() {
        /// (ip, port, node, local)
        type Ep = ([u8; 4], u16, Option<&'static str>, bool);
        struct Case {
            name: &'static str,
            endpoints: serde_json::Value,
            /// (port name, protocol, [(ip, port, node, local)]); None: not kept.
            want: Option<Vec<(&'static str, Protocol, Vec<Ep>)>>,
            skipped: usize,
        }
        let cases = vec![
            Case {
                name: "ready addresses × ports, sorted and deduplicated; not-ready addresses and targetRef dropped",
                endpoints: json!({"metadata": {"name": "web", "labels": {"a": "b"}}, "subsets": [
                    {"addresses": [{"ip": "10.244.2.7", "nodeName": "node-2", "targetRef": {"kind": "Pod", "name": "p"}},
                                   {"ip": "10.244.1.5", "nodeName": "node-1"}, {"ip": "10.244.1.5", "nodeName": "node-1"}],
                     "notReadyAddresses": [{"ip": "10.244.1.9"}],
                     "ports": [{"name": "http", "port": 8080}, {"name": "dns", "port": 5353, "protocol": "UDP"}]},
                    {"addresses": [{"ip": "1.2.3.4"}], "ports": [{"name": "http", "port": 8080}]}]}),
                want: Some(vec![
                    (
                        "dns",
                        Protocol::Udp,
                        vec![
                            ([10, 244, 1, 5], 5353, Some("node-1"), true),
                            ([10, 244, 2, 7], 5353, Some("node-2"), false),
                        ],
                    ),
                    (
                        "http",
                        Protocol::Tcp,
                        vec![
                            ([1, 2, 3, 4], 8080, None, false),
                            ([10, 244, 1, 5], 8080, Some("node-1"), true),
                            ([10, 244, 2, 7], 8080, Some("node-2"), false),
                        ],
                    ),
                ]),
                skipped: 0,
            },
            Case {
                name: "a bad address and a bad port are skipped with one reason each",
                endpoints: json!({"metadata": {"name": "web"}, "subsets": [{"addresses": [{"ip": "banana"},
                    {"ip": "10.244.1.5"}], "ports": [{"port": 8080}, {"name": "x", "port": -1}]}]}),
                want: Some(vec![("", Protocol::Tcp, vec![([10, 244, 1, 5], 8080, None, false)])]),
                skipped: 2,
            },
            Case {
                name: "a name no Service can have is not kept",
                endpoints: json!({"metadata": {"name": "a\nb"}, "subsets": []}),
                want: None,
                skipped: 0,
            },
        ];
        let nodes = NodeNames::default();
        for c in cases {
            let e: Endpoints = serde_json::from_value(c.endpoints).unwrap();
            let got = endpoints(e, "node-1", &nodes);
            let want = c.want.map(|ports| {
                ports
                    .into_iter()
                    .map(|(name, protocol, eps)| EndpointPort {
                        name: name.into(),
                        protocol,
                        endpoints: eps
                            .into_iter()
                            .map(|(ip, port, node, is_local)| Endpoint {
                                ip: ip.into(),
                                port,
                                node_name: node.map(Into::into),
                                is_local,
                                ready: true,
                            })
                            .collect(),
                    })
                    .collect::<Vec<_>>()
            });
            assert_eq!(got.as_ref().map(|g| &g.ports), want.as_ref(), "{}", c.name);
            assert_eq!(got.map_or(0, |g| g.skipped.len()), c.skipped, "{}", c.name);
        }
    }

    #[test]
    fn endpoints_on_one_node_share_its_name() {
        let nodes = NodeNames::default();
        let e: Endpoints = serde_json::from_value(json!({"metadata": {"name": "web"}, "subsets": [{"addresses":
            [{"ip": "10.244.1.5", "nodeName": "node-7"}, {"ip": "10.244.1.6", "nodeName": "node-7"}],
            "ports": [{"port": 80}]}]}))
        .unwrap();
        let s = endpoints(e, "node-1", &nodes).unwrap();
        let names: Vec<&Arc<str>> = s.ports[0].endpoints.iter().filter_map(|e| e.node_name.as_ref()).collect();
        assert_eq!(names.len(), 2);
        assert!(Arc::ptr_eq(names[0], names[1]));
        assert_eq!(s.endpoints("", Protocol::Tcp).map(<[_]>::len), Some(2));
        assert_eq!(s.endpoints("", Protocol::Udp), None);
    }
}
