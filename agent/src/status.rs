//! What the running agent tells `weft routes` on its health address (`GET /state`, JSON): its network config,
//! subnet, device, MTU, the leases it routes to and the kernel objects it last programmed. The agent's loop
//! publishes a snapshot after every apply; the document is built from it, and read back, by pure functions.

use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};

use ipnetwork::Ipv4Network;
use serde::{Deserialize, Serialize};

use crate::config::{NetworkConfig, RawConfig};
use crate::lease::{Lease, LeaseAttrs};
use crate::plan::KernelState;

/// The `/state` document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentState {
    /// The etcd prefix the agent reads (`/coreos.com/network`).
    pub prefix: String,
    /// The network config as flannel's JSON, defaults filled in.
    pub config: RawConfig,
    pub subnet: Ipv4Network,
    pub public_ip: Ipv4Addr,
    pub backend: String,
    pub device: String,
    pub mtu: u32,
    /// The valid leases, this node's included.
    pub leases: Vec<StateLease>,
    /// The kernel objects the last apply made sure of, as `ip route|neigh` and `bridge fdb` would show them.
    pub programmed: Programmed,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateLease {
    pub subnet: Ipv4Network,
    /// The lease's value as flannel writes it.
    pub attrs: LeaseAttrs,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Programmed {
    pub routes: Vec<String>,
    pub neighbours: Vec<String>,
    pub fdb: Vec<String>,
}

/// What the loop publishes: cheap to hand over (clones of what it already holds), rendered only when asked.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub prefix: String,
    pub config: NetworkConfig,
    pub subnet: Ipv4Network,
    pub public_ip: Ipv4Addr,
    pub device: String,
    pub mtu: u32,
    pub leases: Vec<Lease>,
    pub programmed: KernelState,
}

/// The last snapshot, shared by the loop (writer) and the health server (reader).
#[derive(Debug, Clone, Default)]
pub struct StateCell(Arc<Mutex<Option<Arc<Snapshot>>>>);

impl StateCell {
    pub fn publish(&self, s: Snapshot) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(s));
    }

    pub fn get(&self) -> Option<Arc<Snapshot>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Pure: the document for a snapshot.
pub fn render(s: &Snapshot) -> AgentState {
    let p = &s.programmed;
    AgentState {
        prefix: s.prefix.clone(),
        config: s.config.to_raw(),
        subnet: s.subnet,
        public_ip: s.public_ip,
        backend: s.config.backend.type_name().to_string(),
        device: s.device.clone(),
        mtu: s.mtu,
        leases: s.leases.iter().map(|l| StateLease { subnet: l.subnet, attrs: l.attrs.clone() }).collect(),
        programmed: Programmed {
            routes: p
                .routes
                .iter()
                .map(|r| format!("{} via {}{}", r.dst, r.gateway, if r.onlink { " onlink" } else { "" }))
                .collect(),
            neighbours: p.neighs.iter().map(|n| format!("{} lladdr {}", n.ip, n.mac)).collect(),
            fdb: p.fdbs.iter().map(|f| format!("{} dst {}", f.mac, f.dst)).collect(),
        },
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the agent's /state is not a state document: {0}")]
    Json(#[from] serde_json::Error),
    #[error("the agent's /state config: {0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("the agent's /state: subnet {subnet} is not inside its network {network}")]
    Subnet { subnet: Ipv4Network, network: Ipv4Network },
}

/// What `weft routes` takes from the agent's answer, checked as anything read from a socket is: the config
/// validated as the agent validates etcd's, the leases kept only when they fit it.
#[derive(Debug, Clone, PartialEq)]
pub struct Parsed {
    pub state: AgentState,
    pub config: NetworkConfig,
    pub leases: Vec<Lease>,
}

pub fn parse(body: &str) -> Result<Parsed, Error> {
    let state: AgentState = serde_json::from_str(body)?;
    let config = NetworkConfig::from_raw(&state.config)?;
    if !config.network.contains(state.subnet.network()) {
        return Err(Error::Subnet { subnet: state.subnet, network: config.network });
    }
    let leases = state
        .leases
        .iter()
        .filter(|l| l.subnet.prefix() == config.subnet_len && config.network.contains(l.subnet.network()))
        .map(|l| Lease { subnet: l.subnet, attrs: l.attrs.clone(), etcd_lease: 0, mod_revision: 0, create_revision: 0 })
        .collect();
    Ok(Parsed { state, config, leases })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::vtep_mac;
    use crate::plan;

    fn snapshot() -> Snapshot {
        let config = NetworkConfig::parse(br#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#).unwrap();
        let lease = |subnet: &str, ip: Ipv4Addr| Lease {
            subnet: subnet.parse().unwrap(),
            attrs: LeaseAttrs::vxlan(ip, 1, vtep_mac(ip, 1)),
            etcd_lease: 7,
            mod_revision: 3,
            create_revision: 3,
        };
        let (a, b) = (Ipv4Addr::new(192, 168, 56, 11), Ipv4Addr::new(192, 168, 56, 12));
        let leases = vec![lease("10.244.1.0/24", a), lease("10.244.2.0/24", b)];
        let subnet: Ipv4Network = "10.244.1.0/24".parse().unwrap();
        let programmed = plan::desired_vxlan(subnet, 1, 5, &leases);
        Snapshot {
            prefix: "/coreos.com/network".into(),
            config,
            subnet,
            public_ip: a,
            device: "flannel.1".into(),
            mtu: 1450,
            leases,
            programmed,
        }
    }

    #[test]
    fn the_state_document_round_trips_and_shows_what_was_programmed() {
        let s = snapshot();
        let doc = render(&s);
        let mac = vtep_mac(Ipv4Addr::new(192, 168, 56, 12), 1);
        assert_eq!(doc.programmed.routes, ["10.244.2.0/24 via 10.244.2.0 onlink"]);
        assert_eq!(doc.programmed.neighbours, [format!("10.244.2.0 lladdr {mac}")]);
        assert_eq!(doc.programmed.fdb, [format!("{mac} dst 192.168.56.12")]);
        let parsed = parse(&serde_json::to_string(&doc).unwrap()).unwrap();
        assert_eq!(parsed.config, s.config);
        assert_eq!(
            parsed.leases.iter().map(|l| (l.subnet, &l.attrs)).collect::<Vec<_>>(),
            s.leases.iter().map(|l| (l.subnet, &l.attrs)).collect::<Vec<_>>()
        );
        assert_eq!(parsed.state, doc);
    }

    #[test]
    fn a_bad_answer_is_refused_and_unfitting_leases_are_dropped() {
        let mut doc = render(&snapshot());
        doc.leases.push(StateLease { subnet: "10.9.0.0/24".parse().unwrap(), attrs: doc.leases[0].attrs.clone() });
        doc.leases.push(StateLease { subnet: "10.244.3.0/25".parse().unwrap(), attrs: doc.leases[0].attrs.clone() });
        assert_eq!(parse(&serde_json::to_string(&doc).unwrap()).unwrap().leases.len(), 2);
        doc.subnet = "10.9.0.0/24".parse().unwrap();
        assert!(matches!(parse(&serde_json::to_string(&doc).unwrap()), Err(Error::Subnet { .. })));
        doc.config.network = Some("not a network".into());
        assert!(matches!(parse(&serde_json::to_string(&doc).unwrap()), Err(Error::Config(_))));
        assert!(matches!(parse("<html>"), Err(Error::Json(_))));
    }
}
