//! What the running proxy reports on `/services` for `weft services`: every service port with its
//! addresses, endpoints and what the dataplane programmed for it. Built by a pure function per sync.

use serde::{Deserialize, Serialize};

use crate::dataplane::Dataplane;
use crate::model::ServiceTable;

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

pub fn build(table: &ServiceTable, dataplane: &dyn Dataplane, node: &str) -> ProxyStatus {
    let services = table
        .iter()
        .map(|(name, e)| ServiceStatus {
            name: name.to_string(),
            protocol: name.protocol.lower().to_uppercase(),
            cluster_ip: e.port.cluster_ip.map(|ip| ip.to_string()),
            port: e.port.port,
            node_port: e.port.node_port,
            external_ips: e.port.external_ips.iter().map(ToString::to_string).collect(),
            load_balancer_ips: e.port.load_balancer_ips.iter().map(ToString::to_string).collect(),
            affinity_seconds: e.port.session_affinity.map(|d| d.as_secs()),
            external_policy_local: e.port.external_policy_local,
            endpoints: e.endpoints.iter().map(ToString::to_string).collect(),
            programmed: dataplane.describe(name),
        })
        .collect();
    ProxyStatus { mode: dataplane.mode().to_string(), node: node.to_string(), synced: true, services, refused: vec![] }
}
