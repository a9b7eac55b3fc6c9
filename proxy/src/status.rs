//! What the running proxy reports on `/services` for `weft services`: every service port with its
//! addresses, endpoints and what the dataplane programmed for it. `ProxyStatus` is the answer's model (what
//! the CLI reads); the daemon writes the answer's JSON straight from the synced table after each sync
//! (`to_json`), so it keeps one compact text instead of a string per endpoint (~100,000 small allocations
//! at 10,000 services × 10 endpoints).

use std::fmt::Display;

use serde::ser::{SerializeSeq, Serializer};
use serde::{Deserialize, Serialize};

use crate::dataplane::Dataplane;
use crate::model::{ServicePortName, ServiceTable};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceStatus {
    /// `ns/name:port`
    pub name: String,
    pub protocol: String,
    pub cluster_ip: Option<String>,
    pub port: u16,
    pub node_port: Option<u16>,
    pub external_ips: Vec<String>,
    pub load_balancer_ips: Vec<String>,
    /// ClientIP affinity timeout in seconds.
    pub affinity_seconds: Option<u64>,
    pub external_policy_local: bool,
    pub endpoints: Vec<String>,
    /// What the dataplane wrote for this port (e.g. its WEFT-SVC chain, or its proxy socket).
    pub programmed: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProxyStatus {
    pub mode: String,
    pub node: String,
    pub synced: bool,
    pub services: Vec<ServiceStatus>,
    /// Service ports left out because the kernel refused their rules: (`ns/name:port`, the tool's reason).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refused: Vec<(String, String)>,
}

/// The `/services` JSON of a synced table: what `ProxyStatus` would serialize to, written without building it.
pub fn to_json<'a>(
    table: &ServiceTable,
    dataplane: &dyn Dataplane,
    node: &str,
    refused: impl Iterator<Item = (&'a ServicePortName, &'a str)>,
) -> String {
    let view = StatusView {
        mode: dataplane.mode(),
        node,
        synced: true,
        services: PortsView { table, dataplane },
        refused: refused.map(|(k, r)| (k.to_string(), r)).collect(),
    };
    serde_json::to_string(&view).unwrap_or_default()
}

#[derive(Serialize)]
struct StatusView<'a> {
    mode: &'a str,
    node: &'a str,
    synced: bool,
    services: PortsView<'a>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    refused: Vec<(String, &'a str)>,
}

struct PortsView<'a> {
    table: &'a ServiceTable,
    dataplane: &'a dyn Dataplane,
}

impl Serialize for PortsView<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.table.len()))?;
        for (name, e) in self.table {
            let p = &e.port;
            seq.serialize_element(&PortView {
                name: Shown(name),
                protocol: Shown(name.protocol),
                cluster_ip: p.cluster_ip.map(Shown),
                port: p.port,
                node_port: p.node_port,
                external_ips: Each(&p.external_ips),
                load_balancer_ips: Each(&p.load_balancer_ips),
                affinity_seconds: p.session_affinity.map(|d| d.as_secs()),
                external_policy_local: p.external_policy_local,
                endpoints: Each(&e.endpoints),
                programmed: self.dataplane.describe(name),
            })?;
        }
        seq.end()
    }
}

/// `ServiceStatus`'s fields, borrowed from the table.
#[derive(Serialize)]
struct PortView<'a> {
    name: Shown<&'a ServicePortName>,
    protocol: Shown<crate::model::Protocol>,
    cluster_ip: Option<Shown<std::net::Ipv4Addr>>,
    port: u16,
    node_port: Option<u16>,
    external_ips: Each<'a, std::net::Ipv4Addr>,
    load_balancer_ips: Each<'a, std::net::Ipv4Addr>,
    affinity_seconds: Option<u64>,
    external_policy_local: bool,
    endpoints: Each<'a, crate::model::Endpoint>,
    programmed: Option<String>,
}

/// Serialized as its `Display` text.
struct Shown<T>(T);

impl<T: Display> Serialize for Shown<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

/// A list serialized as the `Display` texts of its items.
struct Each<'a, T>(&'a [T]);

impl<T: Display> Serialize for Each<'_, T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(Shown))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Endpoint, Protocol, ServiceEntry, ServicePort};
    use std::net::Ipv4Addr;
    use std::time::Duration;

    struct Described;

    impl Dataplane for Described {
        fn mode(&self) -> &'static str {
            "test"
        }
        fn describe(&self, port: &ServicePortName) -> Option<String> {
            (port.name != "bare").then(|| format!("chain for {}", port.name))
        }
        fn sync(
            &mut self,
            _: &ServiceTable,
            _: Option<&std::collections::BTreeSet<ServicePortName>>,
        ) -> crate::dataplane::Result<crate::dataplane::SyncStats> {
            Ok(Default::default())
        }
    }

    #[test]
    fn the_json_written_from_the_table_reads_back_as_every_port_with_its_endpoints() {
        let mut table = ServiceTable::new();
        let web = ServicePortName::new("default", "web", "http", Protocol::Tcp);
        let mut port = ServicePort::cluster_ip(Ipv4Addr::new(10, 96, 0, 10), 80);
        port.node_port = Some(30080);
        port.external_ips = vec![Ipv4Addr::new(192, 0, 2, 1)];
        port.load_balancer_ips = vec![Ipv4Addr::new(198, 51, 100, 7), Ipv4Addr::new(198, 51, 100, 8)];
        port.session_affinity = Some(Duration::from_secs(600));
        port.external_policy_local = true;
        let endpoints = vec![
            Endpoint::ready(Ipv4Addr::new(10, 244, 1, 2), 8080),
            Endpoint::ready(Ipv4Addr::new(10, 244, 2, 3), 8080),
        ];
        table.insert(web.clone(), ServiceEntry { port, endpoints });
        let bare = ServicePortName::new("kube-system", "bare", "", Protocol::Udp);
        table.insert(
            bare.clone(),
            ServiceEntry {
                port: ServicePort { cluster_ip: None, ..ServicePort::cluster_ip(Ipv4Addr::UNSPECIFIED, 53) },
                endpoints: vec![],
            },
        );

        let text = to_json(&table, &Described, "node-1", [(&bare, "Bad argument")].into_iter());
        let got: ProxyStatus = serde_json::from_str(&text).expect("the JSON reads as a ProxyStatus");
        let want = ProxyStatus {
            mode: "test".into(),
            node: "node-1".into(),
            synced: true,
            services: vec![
                ServiceStatus {
                    name: "default/web:http".into(),
                    protocol: "TCP".into(),
                    cluster_ip: Some("10.96.0.10".into()),
                    port: 80,
                    node_port: Some(30080),
                    external_ips: vec!["192.0.2.1".into()],
                    load_balancer_ips: vec!["198.51.100.7".into(), "198.51.100.8".into()],
                    affinity_seconds: Some(600),
                    external_policy_local: true,
                    endpoints: vec!["10.244.1.2:8080".into(), "10.244.2.3:8080".into()],
                    programmed: Some("chain for web".into()),
                },
                ServiceStatus {
                    name: "kube-system/bare".into(),
                    protocol: "UDP".into(),
                    cluster_ip: None,
                    port: 53,
                    node_port: None,
                    external_ips: vec![],
                    load_balancer_ips: vec![],
                    affinity_seconds: None,
                    external_policy_local: false,
                    endpoints: vec![],
                    programmed: None,
                },
            ],
            refused: vec![("kube-system/bare".into(), "Bad argument".into())],
        };
        // BTreeMap order: "default" < "kube-system".
        assert_eq!(got, want);
        // Without refusals the field is left out, as ProxyStatus serializes it.
        let text = to_json(&table, &Described, "node-1", std::iter::empty());
        assert!(!text.contains("refused"), "{text}");
    }
}
