//! The proxy's model: one node's desired service table, independent of any dataplane.
//! Built by `table::desired_table` from the Service and Endpoints summaries (`summary`); read by every dataplane.

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

/// kube-proxy's default ClientIP affinity timeout (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT: Duration = Duration::from_secs(10800);

/// L4 protocol of a service port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// Parses the API's spelling (`TCP`, `UDP`, `SCTP`); a missing protocol is TCP.
    pub fn from_api(s: Option<&str>) -> Option<Protocol> {
        match s.unwrap_or("TCP") {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            "SCTP" => Some(Protocol::Sctp),
            _ => None,
        }
    }

    /// The lower-case name iptables and kube-proxy's chain hash use.
    pub fn lower(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        })
    }
}

/// One port of one service: the unit every dataplane programs.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServicePortName {
    pub namespace: String,
    pub name: String,
    /// The port's name ("" for a single unnamed port).
    pub port: String,
    pub protocol: Protocol,
}

impl ServicePortName {
    pub fn new(namespace: &str, name: &str, port: &str, protocol: Protocol) -> Self {
        ServicePortName { namespace: namespace.into(), name: name.into(), port: port.into(), protocol }
    }
}

/// `ns/name:port`, and `ns/name` for an unnamed port, exactly as kube-proxy prints it (it feeds the chain hashes).
impl fmt::Display for ServicePortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)?;
        if !self.port.is_empty() {
            write!(f, ":{}", self.port)?;
        }
        Ok(())
    }
}

/// Where and how a service port is reachable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    pub cluster_ip: Option<Ipv4Addr>,
    pub port: u16,
    pub node_port: Option<u16>,
    pub external_ips: Vec<Ipv4Addr>,
    /// From the service's `status.loadBalancer.ingress` (as kube-proxy: not `spec.loadBalancerIP`).
    pub load_balancer_ips: Vec<Ipv4Addr>,
    /// ClientIP affinity and its timeout.
    pub session_affinity: Option<Duration>,
    /// `externalTrafficPolicy: Local` on an externally reachable service.
    pub external_policy_local: bool,
    /// `internalTrafficPolicy: Local`.
    pub internal_policy_local: bool,
}

impl ServicePort {
    /// A plain ClusterIP port: no node port, external or LB IPs, affinity or Local policies. The base
    /// that variants are built from (`ServicePort { node_port: Some(..), ..ServicePort::cluster_ip(..) }`).
    pub fn cluster_ip(ip: Ipv4Addr, port: u16) -> ServicePort {
        ServicePort {
            cluster_ip: Some(ip),
            port,
            node_port: None,
            external_ips: vec![],
            load_balancer_ips: vec![],
            session_affinity: None,
            external_policy_local: false,
            internal_policy_local: false,
        }
    }

    /// Reachable from outside the cluster (node port, external or load-balancer IPs).
    pub fn is_external(&self) -> bool {
        self.node_port.is_some() || !self.external_ips.is_empty() || !self.load_balancer_ips.is_empty()
    }
}

/// One ready backend of a service port.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Endpoint {
    pub ip: Ipv4Addr,
    pub port: u16,
    /// Shared by every endpoint on the same node (`summary::NodeNames`).
    pub node_name: Option<Arc<str>>,
    /// Runs on this node (its `nodeName` is ours).
    pub is_local: bool,
    pub ready: bool,
}

impl Endpoint {
    /// A ready endpoint on no particular node.
    pub fn ready(ip: Ipv4Addr, port: u16) -> Endpoint {
        Endpoint { ip, port, node_name: None, is_local: false, ready: true }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.ip, self.port)
    }
}

/// A service port and its endpoints (sorted, deduplicated).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceEntry {
    pub port: ServicePort,
    pub endpoints: Vec<Endpoint>,
}

/// This node's desired state: every served service port, in a deterministic order.
pub type ServiceTable = BTreeMap<ServicePortName, ServiceEntry>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_matches_kube_proxy() {
        assert_eq!(ServicePortName::new("default", "web", "http", Protocol::Tcp).to_string(), "default/web:http");
        assert_eq!(ServicePortName::new("default", "web", "", Protocol::Udp).to_string(), "default/web");
    }
}
