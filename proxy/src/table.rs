//! Services + Endpoints → this node's desired `ServiceTable`: a pure function, no I/O.
//! Bad input is skipped with a reason (to be logged by the caller); every valid port is still served.

use std::borrow::Borrow;
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Endpoints, Service};
use weft_api::service::{is_dns1035_label, is_dns1123_label};

use crate::model::{
    Endpoint, Protocol, ServiceEntry, ServicePort, ServicePortName, ServiceTable, DEFAULT_AFFINITY_TIMEOUT,
};

/// Something in the input that was not served, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// `Service ns/name`, `Service ns/name:port`, `Endpoints ns/name` …
    pub object: String,
    pub reason: String,
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

/// Builds the desired table for `node_name`. Deterministic: the same input gives the same table.
pub fn desired_table<S: Borrow<Service>, E: Borrow<Endpoints>>(
    services: &[S],
    endpoints: &[E],
    node_name: &str,
) -> (ServiceTable, Vec<Skipped>) {
    let mut skipped = Vec::new();
    let mut by_name: BTreeMap<(&str, &str), &Endpoints> = BTreeMap::new();
    for ep in endpoints.iter().map(Borrow::borrow) {
        if let Some(name) = ep.metadata.name.as_deref() {
            let ns = ep.metadata.namespace.as_deref().unwrap_or("default");
            // Only a Service's (validated) name can match; anything else is never looked up or printed.
            if is_dns1123_label(ns) && is_dns1035_label(name) {
                by_name.insert((ns, name), ep);
            }
        }
    }
    let mut table = ServiceTable::new();
    for svc in services.iter().map(Borrow::borrow) {
        let ns = svc.metadata.namespace.as_deref().unwrap_or("default");
        let Some(name) = svc.metadata.name.as_deref() else {
            skip(&mut skipped, format!("Service {:?}/?", ns), "no metadata.name");
            continue;
        };
        // Names end up in rule comments and chain hashes: only what the API server would have accepted.
        if !is_dns1123_label(ns) || !is_dns1035_label(name) {
            skip(&mut skipped, format!("Service {ns:?}/{name:?}"), "namespace or name is not a DNS label");
            continue;
        }
        let ports = service_ports(svc, ns, name, &mut skipped);
        if ports.is_empty() {
            continue;
        }
        let mut eps =
            by_name.get(&(ns, name)).map(|e| endpoint_ports(e, ns, name, node_name, &mut skipped)).unwrap_or_default();
        for (spn, port) in ports {
            let endpoints: Vec<Endpoint> =
                eps.remove(&(spn.port.clone(), spn.protocol)).map(|set| set.into_iter().collect()).unwrap_or_default();
            table.insert(spn, ServiceEntry { port, endpoints });
        }
    }
    (table, skipped)
}

/// The service's ports as served on this node; empty for headless, ExternalName and invalid services.
fn service_ports(
    svc: &Service,
    ns: &str,
    name: &str,
    skipped: &mut Vec<Skipped>,
) -> Vec<(ServicePortName, ServicePort)> {
    let object = format!("Service {ns}/{name}");
    let Some(spec) = svc.spec.as_ref() else {
        skip(skipped, object, "no spec");
        return vec![];
    };
    let type_ = spec.type_.as_deref().unwrap_or("ClusterIP");
    let cluster_ip = match (type_, spec.cluster_ip.as_deref()) {
        ("ExternalName", _) | (_, Some("None")) => return vec![],
        (_, None | Some("")) => {
            skip(skipped, object, "no clusterIP allocated");
            return vec![];
        }
        (_, Some(ip)) => match ip.parse::<Ipv4Addr>() {
            Ok(ip) => ip,
            Err(_) => {
                skip(skipped, object, format!("clusterIP {ip:?} is not an IPv4 address"));
                return vec![];
            }
        },
    };
    let parse_ips = |ips: &mut dyn Iterator<Item = &str>, what: &str, skipped: &mut Vec<Skipped>| {
        let mut out = Vec::new();
        for ip in ips {
            match ip.parse::<Ipv4Addr>() {
                Ok(ip) if !out.contains(&ip) => out.push(ip),
                Ok(_) => {}
                Err(_) => {
                    skip(skipped, format!("Service {ns}/{name}"), format!("{what} {ip:?} is not an IPv4 address"))
                }
            }
        }
        out
    };
    let external_ips = parse_ips(&mut spec.external_ips.iter().flatten().map(String::as_str), "externalIP", skipped);
    let load_balancer_ips = if type_ == "LoadBalancer" {
        let ingress = svc.status.as_ref().and_then(|s| s.load_balancer.as_ref()).and_then(|lb| lb.ingress.as_ref());
        parse_ips(
            &mut ingress.into_iter().flatten().filter_map(|i| i.ip.as_deref()),
            "load balancer ingress IP",
            skipped,
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

    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    for p in spec.ports.iter().flatten() {
        let port_name = p.name.clone().unwrap_or_default();
        if !port_name.is_empty() && !is_dns1123_label(&port_name) {
            skip(skipped, format!("Service {ns}/{name}:{port_name:?}"), "port name is not a DNS-1123 label");
            continue;
        }
        let object = format!("Service {ns}/{name}:{port_name}");
        let Some((protocol, port)) = checked_port(skipped, &object, p.protocol.as_deref(), p.port) else {
            continue;
        };
        let node_port = match p.node_port.filter(|_| with_node_ports) {
            None => None,
            Some(np) => match port_u16(np) {
                Some(np) => Some(np),
                None => {
                    skip(skipped, object, format!("nodePort {np} out of range"));
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
            skip(skipped, object, "duplicate port name and protocol");
            continue;
        }
        out.push((spn, sp));
    }
    out
}

type EndpointsByPort = BTreeMap<(String, Protocol), BTreeSet<Endpoint>>;

/// Ready endpoints of an Endpoints object, keyed by (port name, protocol).
fn endpoint_ports(
    ep: &Endpoints,
    ns: &str,
    name: &str,
    node_name: &str,
    skipped: &mut Vec<Skipped>,
) -> EndpointsByPort {
    let mut out = EndpointsByPort::new();
    for subset in ep.subsets.iter().flatten() {
        let mut addrs = Vec::new();
        for a in subset.addresses.iter().flatten() {
            match a.ip.parse::<Ipv4Addr>() {
                Ok(ip) => addrs.push((ip, a.node_name.clone())),
                Err(_) => skip(
                    skipped,
                    format!("Endpoints {ns}/{name}"),
                    format!("address {:?} is not an IPv4 address", a.ip),
                ),
            }
        }
        for p in subset.ports.iter().flatten() {
            let port_name = p.name.clone().unwrap_or_default();
            let object = format!("Endpoints {ns}/{name}:{port_name:?}");
            let Some((protocol, port)) = checked_port(skipped, &object, p.protocol.as_deref(), p.port) else {
                continue;
            };
            let set = out.entry((port_name, protocol)).or_default();
            for (ip, node) in &addrs {
                set.insert(Endpoint {
                    ip: *ip,
                    port,
                    is_local: node.as_deref() == Some(node_name),
                    node_name: node.clone(),
                    ready: true,
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn svc(v: serde_json::Value) -> Service {
        serde_json::from_value(v).unwrap()
    }
    fn eps(v: serde_json::Value) -> Endpoints {
        serde_json::from_value(v).unwrap()
    }
    fn spn(name: &str, port: &str) -> ServicePortName {
        ServicePortName::new("default", name, port, Protocol::Tcp)
    }
    fn ep(ip: [u8; 4], port: u16, node: Option<&str>, local: bool) -> Endpoint {
        Endpoint { ip: ip.into(), port, node_name: node.map(Into::into), is_local: local, ready: true }
    }
    fn base(ip: [u8; 4], port: u16) -> ServicePort {
        ServicePort::cluster_ip(ip.into(), port)
    }
    fn my_service_endpoints() -> Endpoints {
        eps(json!({"metadata": {"name": "my-service", "namespace": "default"},
            "subsets": [{"addresses": [{"ip": "10.244.1.5", "nodeName": "node-1"},
                                       {"ip": "10.244.2.7", "nodeName": "node-2"}],
                         "notReadyAddresses": [{"ip": "10.244.1.9"}],
                         "ports": [{"port": 9376}]}]}))
    }

    struct Case {
        name: &'static str,
        service: serde_json::Value,
        endpoints: Option<Endpoints>,
        want: Vec<(ServicePortName, ServiceEntry)>,
        skipped: usize,
    }

    #[test]
    fn names_that_are_not_dns_labels_are_skipped_and_the_rest_served() {
        let hostile = [
            ("default", "evil", Some("a\" -j ACCEPT\n")),
            ("default", "Bad_Name", Some("http")),
            ("de\nfault", "web", None),
            ("default", "x", Some("")),
        ];
        let mut services: Vec<Service> = hostile
            .iter()
            .enumerate()
            .map(|(i, (ns, name, port))| {
                svc(json!({"metadata": {"name": name, "namespace": ns},
                    "spec": {"clusterIP": format!("10.96.0.{}", i + 1), "ports": [{"name": port, "port": 80}]}}))
            })
            .collect();
        services
            .push(svc(json!({"metadata": {"name": "dup", "namespace": "default"}, "spec": {"clusterIP": "10.96.1.1",
            "ports": [{"name": "a", "port": 80}, {"name": "a", "port": 81}]}})));
        let (table, skipped) = desired_table(&services, &[] as &[Endpoints], "node-1");
        let keys: Vec<String> = table.keys().map(ToString::to_string).collect();
        assert_eq!(keys, ["default/dup:a", "default/x"], "{skipped:?}");
        assert_eq!(skipped.len(), 4, "{skipped:?}");
        assert!(skipped.iter().all(|s| !s.object.contains('\n')), "{skipped:?}");
    }

    #[test]
    fn desired_table_cases() {
        let two =
            vec![ep([10, 244, 1, 5], 9376, Some("node-1"), true), ep([10, 244, 2, 7], 9376, Some("node-2"), false)];
        let cases = vec![
            Case {
                name: "selector app=MyApp, TCP 80 -> 9376, clusterIP given",
                service: json!({"metadata": {"name": "my-service"}, "spec": {"selector": {"app": "MyApp"},
                    "clusterIP": "10.0.171.239", "ports": [{"protocol": "TCP", "port": 80, "targetPort": 9376}]}}),
                endpoints: Some(my_service_endpoints()),
                want: vec![(
                    spn("my-service", ""),
                    ServiceEntry { port: base([10, 0, 171, 239], 80), endpoints: two.clone() },
                )],
                skipped: 0,
            },
            Case {
                name: "LoadBalancer: status ingress is served, spec.loadBalancerIP is not",
                service: json!({"metadata": {"name": "my-service", "namespace": "default"},
                    "spec": {"selector": {"app": "MyApp"},
                    "type": "LoadBalancer", "clusterIP": "10.0.171.239", "loadBalancerIP": "78.11.24.19",
                    "externalTrafficPolicy": "Local",
                    "ports": [{"protocol": "TCP", "port": 80, "targetPort": 9376, "nodePort": 30080}]},
                    "status": {"loadBalancer": {"ingress": [{"ip": "146.148.47.155"}]}}}),
                endpoints: Some(my_service_endpoints()),
                want: vec![(
                    spn("my-service", ""),
                    ServiceEntry {
                        port: ServicePort {
                            node_port: Some(30080),
                            load_balancer_ips: vec![[146, 148, 47, 155].into()],
                            external_policy_local: true,
                            ..base([10, 0, 171, 239], 80)
                        },
                        endpoints: two.clone(),
                    },
                )],
                skipped: 0,
            },
            Case {
                name: "externalIPs, named ports, ClientIP affinity with default timeout",
                service: json!({"metadata": {"name": "my-service"}, "spec": {"selector": {"app": "MyApp"},
                    "clusterIP": "10.0.171.239", "externalIPs": ["80.11.12.10"], "sessionAffinity": "ClientIP",
                    "externalTrafficPolicy": "Local", "internalTrafficPolicy": "Local",
                    "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 9376},
                              {"name": "dns", "protocol": "UDP", "port": 53}]}}),
                endpoints: Some(eps(json!({"metadata": {"name": "my-service"}, "subsets": [{
                    "addresses": [{"ip": "10.244.1.5", "nodeName": "node-1"}],
                    "ports": [{"name": "http", "port": 9376}, {"name": "dns", "port": 5353, "protocol": "UDP"}]}]}))),
                want: vec![
                    (
                        ServicePortName::new("default", "my-service", "dns", Protocol::Udp),
                        ServiceEntry {
                            port: ServicePort {
                                external_ips: vec![[80, 11, 12, 10].into()],
                                session_affinity: Some(DEFAULT_AFFINITY_TIMEOUT),
                                external_policy_local: true,
                                internal_policy_local: true,
                                ..base([10, 0, 171, 239], 53)
                            },
                            endpoints: vec![ep([10, 244, 1, 5], 5353, Some("node-1"), true)],
                        },
                    ),
                    (
                        spn("my-service", "http"),
                        ServiceEntry {
                            port: ServicePort {
                                external_ips: vec![[80, 11, 12, 10].into()],
                                session_affinity: Some(DEFAULT_AFFINITY_TIMEOUT),
                                external_policy_local: true,
                                internal_policy_local: true,
                                ..base([10, 0, 171, 239], 80)
                            },
                            endpoints: vec![ep([10, 244, 1, 5], 9376, Some("node-1"), true)],
                        },
                    ),
                ],
                skipped: 0,
            },
            Case {
                name: "no selector: hand-written Endpoints 1.2.3.4:9376",
                service: json!({"metadata": {"name": "my-service"}, "spec": {"clusterIP": "10.0.171.240",
                    "sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}},
                    "ports": [{"protocol": "TCP", "port": 80, "targetPort": 9376}]}}),
                endpoints: Some(eps(json!({"metadata": {"name": "my-service"},
                    "subsets": [{"addresses": [{"ip": "1.2.3.4"}], "ports": [{"port": 9376}]}]}))),
                want: vec![(
                    spn("my-service", ""),
                    ServiceEntry {
                        port: ServicePort {
                            session_affinity: Some(Duration::from_secs(60)),
                            ..base([10, 0, 171, 240], 80)
                        },
                        endpoints: vec![ep([1, 2, 3, 4], 9376, None, false)],
                    },
                )],
                skipped: 0,
            },
            Case {
                name: "headless service gets no entry",
                service: json!({"metadata": {"name": "my-service"}, "spec": {"clusterIP": "None",
                    "selector": {"app": "MyApp"}, "ports": [{"port": 80}]}}),
                endpoints: Some(my_service_endpoints()),
                want: vec![],
                skipped: 0,
            },
            Case {
                name: "ExternalName gets no entry",
                service: json!({"metadata": {"name": "my-service"}, "spec": {"type": "ExternalName",
                    "externalName": "my.database.example.com"}}),
                endpoints: None,
                want: vec![],
                skipped: 0,
            },
            Case {
                name: "no Endpoints object: entry with no endpoints",
                service: json!({"metadata": {"name": "my-service"}, "spec": {"clusterIP": "10.0.171.239",
                    "ports": [{"port": 80}]}}),
                endpoints: None,
                want: vec![(
                    spn("my-service", ""),
                    ServiceEntry { port: base([10, 0, 171, 239], 80), endpoints: vec![] },
                )],
                skipped: 0,
            },
            Case {
                name: "bad clusterIP skips the service",
                service: json!({"metadata": {"name": "my-service"}, "spec": {"clusterIP": "10.0.300.1",
                    "ports": [{"port": 80}]}}),
                endpoints: None,
                want: vec![],
                skipped: 1,
            },
            Case {
                name: "a bad port, a bad endpoint address and a bad external IP skip only themselves",
                service: json!({"metadata": {"name": "my-service"}, "spec": {"clusterIP": "10.0.171.239",
                    "externalIPs": ["nope"],
                    "ports": [{"name": "a", "port": 80}, {"name": "b", "port": 70000}, {"name": "c", "port": 81,
                    "protocol": "ICMP"}]}}),
                endpoints: Some(eps(json!({"metadata": {"name": "my-service"}, "subsets": [{
                    "addresses": [{"ip": "10.244.1.5"}, {"ip": "banana"}], "ports": [{"name": "a", "port": 8080},
                    {"name": "x", "port": -1}]}]}))),
                want: vec![(
                    spn("my-service", "a"),
                    ServiceEntry {
                        port: base([10, 0, 171, 239], 80),
                        endpoints: vec![ep([10, 244, 1, 5], 8080, None, false)],
                    },
                )],
                skipped: 5,
            },
            Case {
                name: "endpoint port names must match; protocol too",
                service: json!({"metadata": {"name": "my-service"}, "spec": {"clusterIP": "10.0.171.239",
                    "ports": [{"name": "http", "port": 80}]}}),
                endpoints: Some(eps(json!({"metadata": {"name": "my-service"}, "subsets": [{
                    "addresses": [{"ip": "10.244.1.5"}], "ports": [{"name": "other", "port": 8080},
                    {"name": "http", "port": 80, "protocol": "UDP"}]}]}))),
                want: vec![(
                    spn("my-service", "http"),
                    ServiceEntry { port: base([10, 0, 171, 239], 80), endpoints: vec![] },
                )],
                skipped: 0,
            },
        ];
        for c in cases {
            let (table, skipped) = desired_table(&[svc(c.service)], c.endpoints.as_slice(), "node-1");
            let want: ServiceTable = c.want.into_iter().collect();
            assert_eq!(table, want, "{}", c.name);
            assert_eq!(skipped.len(), c.skipped, "{}: {skipped:?}", c.name);
        }
    }

    #[test]
    fn endpoints_of_another_namespace_do_not_match() {
        let s = svc(json!({"metadata": {"name": "web", "namespace": "a"}, "spec": {"clusterIP": "10.96.0.5",
                "ports": [{"port": 80}]}}));
        let e = eps(json!({"metadata": {"name": "web", "namespace": "b"},
                "subsets": [{"addresses": [{"ip": "10.244.0.2"}], "ports": [{"port": 80}]}]}));
        let (table, _) = desired_table(&[s], &[e], "n");
        assert!(table.values().all(|e| e.endpoints.is_empty()));
    }
}
