//! The Service and Endpoints summaries (`summary`) → this node's desired `ServiceTable`: a pure join, no I/O.
//! What the summaries left out is reported with a reason (to be logged by the caller); every valid port is served.

use std::borrow::Borrow;
use std::collections::BTreeMap;

use crate::model::{ServiceEntry, ServiceTable};
use crate::summary::{EndpointsSummary, ServiceSummary};
use crate::tracker::ObjectKey;

/// Something in the input that was not served, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// `Service ns/name`, `Service ns/name:port`, `Endpoints ns/name` …
    pub object: String,
    pub reason: String,
}

/// Builds the desired table from every Service and Endpoints summary, by object key. Deterministic: the
/// same input gives the same table. An Endpoints object's skips are reported only when a Service uses it.
pub fn desired_table<S: Borrow<ServiceSummary>, E: Borrow<EndpointsSummary>>(
    services: &BTreeMap<ObjectKey, S>,
    endpoints: &BTreeMap<ObjectKey, E>,
) -> (ServiceTable, Vec<Skipped>) {
    let mut skipped = Vec::new();
    let mut table = ServiceTable::new();
    for (key, svc) in services {
        let svc = svc.borrow();
        skipped.extend(svc.skipped.iter().cloned());
        if svc.ports.is_empty() {
            continue;
        }
        let eps = endpoints.get(key).map(Borrow::borrow);
        if let Some(e) = eps {
            skipped.extend(e.skipped.iter().cloned());
        }
        for (spn, port) in &svc.ports {
            let endpoints = eps.and_then(|e| e.endpoints(&spn.port, spn.protocol)).map(<[_]>::to_vec);
            table.insert(spn.clone(), ServiceEntry { port: port.clone(), endpoints: endpoints.unwrap_or_default() });
        }
    }
    (table, skipped)
}

/// What the daemon does, for tests: each object through its informer transform, then the join.
#[cfg(test)]
pub(crate) fn from_objects(
    services: Vec<k8s_openapi::api::core::v1::Service>,
    endpoints: Vec<k8s_openapi::api::core::v1::Endpoints>,
    node: &str,
) -> (ServiceTable, Vec<Skipped>) {
    use crate::summary;
    let key_of = |m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
        ObjectKey::new(m.namespace.as_deref().unwrap_or("default"), m.name.as_deref().unwrap_or(""))
    };
    let nodes = summary::NodeNames::default();
    let s: BTreeMap<ObjectKey, ServiceSummary> =
        services.into_iter().filter_map(|s| Some((key_of(&s.metadata), summary::service(s)?))).collect();
    let e: BTreeMap<ObjectKey, EndpointsSummary> = endpoints
        .into_iter()
        .filter_map(|e| Some((key_of(&e.metadata), summary::endpoints(e, node, &nodes)?)))
        .collect();
    desired_table(&s, &e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Endpoint, Protocol, ServicePort, ServicePortName, DEFAULT_AFFINITY_TIMEOUT};
    use k8s_openapi::api::core::v1::{Endpoints, Service};
    use serde_json::json;
    use std::time::Duration;

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
        let (table, skipped) = from_objects(services, vec![], "node-1");
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
            let (table, skipped) = from_objects(vec![svc(c.service)], c.endpoints.into_iter().collect(), "node-1");
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
        let (table, _) = from_objects(vec![s], vec![e], "n");
        assert!(table.values().all(|e| e.endpoints.is_empty()));
    }
}
