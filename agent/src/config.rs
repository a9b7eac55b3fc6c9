//! The network config flanneld reads from `<prefix>/config`, with flannel's defaults and a
//! validation that names the key at fault, so an operator's typo is a clear log line, not a crash.

use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use serde::{Deserialize, Serialize};

/// Backend section: `{"Type":"vxlan","VNI":1,"Port":8472}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendConfig {
    #[serde(rename = "Type", default = "default_backend")]
    pub kind: String,
    #[serde(rename = "VNI", default, skip_serializing_if = "Option::is_none")]
    pub vni: Option<u32>,
    #[serde(rename = "Port", default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

fn default_backend() -> String {
    "vxlan".into()
}

impl Default for BackendConfig {
    fn default() -> Self {
        BackendConfig { kind: default_backend(), vni: None, port: None }
    }
}

/// The config key as stored (flannel's field names; unknown fields are ignored, as flanneld does).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RawConfig {
    #[serde(rename = "Network")]
    pub network: Option<String>,
    #[serde(rename = "SubnetLen", default, skip_serializing_if = "Option::is_none")]
    pub subnet_len: Option<u8>,
    #[serde(rename = "SubnetMin", default, skip_serializing_if = "Option::is_none")]
    pub subnet_min: Option<String>,
    #[serde(rename = "SubnetMax", default, skip_serializing_if = "Option::is_none")]
    pub subnet_max: Option<String>,
    #[serde(rename = "Backend", default)]
    pub backend: BackendConfig,
}

/// Which way packets reach other nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `flannel.<vni>` VXLAN device, UDP `port`.
    Vxlan { vni: u32, port: u16 },
    /// Direct routes via each peer's PublicIP (all nodes on one L2 segment).
    HostGw,
}

impl Backend {
    /// The name flannel writes in a lease's `BackendType`.
    pub fn type_name(&self) -> &'static str {
        match self {
            Backend::Vxlan { .. } => "vxlan",
            Backend::HostGw => "host-gw",
        }
    }
}

/// A validated network config with flannel's defaults filled in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetworkConfig {
    pub network: Ipv4Network,
    pub subnet_len: u8,
    /// First and last subnet network addresses that may be leased.
    pub subnet_min: Ipv4Addr,
    pub subnet_max: Ipv4Addr,
    pub backend: Backend,
}

pub const DEFAULT_VNI: u32 = 1;
pub const DEFAULT_VXLAN_PORT: u16 = 8472;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("config is not valid JSON: {0}")]
    Json(String),
    #[error("config key {key}: {problem}")]
    Invalid { key: &'static str, problem: String },
}

fn invalid(key: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key, problem: problem.into() }
}

impl NetworkConfig {
    /// Parses and validates the JSON stored under `<prefix>/config`.
    pub fn parse(json: &[u8]) -> Result<NetworkConfig, ConfigError> {
        let raw: RawConfig = serde_json::from_slice(json).map_err(|e| ConfigError::Json(e.to_string()))?;
        NetworkConfig::from_raw(&raw)
    }

    pub fn from_raw(raw: &RawConfig) -> Result<NetworkConfig, ConfigError> {
        let net_s = raw.network.as_deref().ok_or_else(|| invalid("Network", "missing (e.g. \"10.244.0.0/16\")"))?;
        let parsed: Ipv4Network =
            net_s.parse().map_err(|e| invalid("Network", format!("{net_s:?} is not an IPv4 CIDR: {e}")))?;
        // Normalise 10.244.1.7/16 to 10.244.0.0/16, as flannel does.
        let network =
            Ipv4Network::new(parsed.network(), parsed.prefix()).map_err(|e| invalid("Network", e.to_string()))?;
        if network.prefix() > 28 {
            return Err(invalid("Network", format!("{network} is too small (at most /28)")));
        }
        // flannel: /24 unless the network is smaller than /22, then two bits longer than it.
        let default_len = if network.prefix() < 22 { 24 } else { network.prefix() + 2 };
        let subnet_len = raw.subnet_len.unwrap_or(default_len);
        if subnet_len <= network.prefix() || subnet_len > 30 {
            return Err(invalid(
                "SubnetLen",
                format!("{subnet_len} must be longer than the network's /{} and at most 30", network.prefix()),
            ));
        }
        let size = 1u32 << (32 - subnet_len);
        let first = u32::from(network.network());
        let last = u32::from(network.broadcast()) - size + 1;
        let bound = |key: &'static str, v: &Option<String>, default: u32| -> Result<Ipv4Addr, ConfigError> {
            let Some(s) = v else {
                return Ok(Ipv4Addr::from(default));
            };
            let a: Ipv4Addr = s.parse().map_err(|_| invalid(key, format!("{s:?} is not an IPv4 address")))?;
            if !network.contains(a) {
                return Err(invalid(key, format!("{a} is outside Network {network}")));
            }
            if u32::from(a) % size != 0 {
                return Err(invalid(key, format!("{a} is not aligned to a /{subnet_len} subnet")));
            }
            Ok(a)
        };
        // flannel leaves the network's first subnet out by default (it holds the network address).
        let subnet_min = bound("SubnetMin", &raw.subnet_min, first + size)?;
        let subnet_max = bound("SubnetMax", &raw.subnet_max, last)?;
        if u32::from(subnet_min) > u32::from(subnet_max) {
            return Err(invalid("SubnetMax", format!("{subnet_max} is below SubnetMin {subnet_min}")));
        }
        let backend = match raw.backend.kind.as_str() {
            "vxlan" => Backend::Vxlan {
                vni: raw.backend.vni.unwrap_or(DEFAULT_VNI),
                port: match raw.backend.port {
                    None | Some(0) => DEFAULT_VXLAN_PORT,
                    Some(p) => p,
                },
            },
            "host-gw" => Backend::HostGw,
            other => {
                return Err(invalid("Backend.Type", format!("{other:?} is not supported (vxlan or host-gw)")));
            }
        };
        if let Backend::Vxlan { vni, .. } = backend {
            if vni >= 1 << 24 {
                return Err(invalid("Backend.VNI", format!("{vni} does not fit in 24 bits")));
            }
        }
        Ok(NetworkConfig { network, subnet_len, subnet_min, subnet_max, backend })
    }

    /// The JSON to store for this config (as `weft network config set` writes it).
    pub fn to_raw(&self) -> RawConfig {
        let (vni, port) = match self.backend {
            Backend::Vxlan { vni, port } => (Some(vni), Some(port)),
            Backend::HostGw => (None, None),
        };
        RawConfig {
            network: Some(self.network.to_string()),
            subnet_len: Some(self.subnet_len),
            subnet_min: None,
            subnet_max: None,
            backend: BackendConfig { kind: self.backend.type_name().into(), vni, port },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_flannel() {
        let c = NetworkConfig::parse(br#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#).unwrap();
        assert_eq!(c.subnet_len, 24);
        assert_eq!(c.subnet_min, Ipv4Addr::new(10, 244, 1, 0));
        assert_eq!(c.subnet_max, Ipv4Addr::new(10, 244, 255, 0));
        assert_eq!(c.backend, Backend::Vxlan { vni: 1, port: 8472 });
        let small = NetworkConfig::parse(br#"{"Network":"10.5.0.0/23"}"#).unwrap();
        assert_eq!(small.subnet_len, 25);
    }

    #[test]
    fn errors_name_the_key() {
        let cases: &[(&str, &str)] = &[
            (r#"{"Backend":{"Type":"vxlan"}}"#, "Network"),
            (r#"{"Network":"10.244.0.0/33"}"#, "Network"),
            (r#"{"Network":"10.244.0.0/16","SubnetLen":16}"#, "SubnetLen"),
            (r#"{"Network":"10.244.0.0/16","SubnetMin":"10.245.0.0"}"#, "SubnetMin"),
            (r#"{"Network":"10.244.0.0/16","SubnetMax":"10.244.3.7"}"#, "SubnetMax"),
            (r#"{"Network":"10.244.0.0/16","Backend":{"Type":"udp"}}"#, "Backend.Type"),
            (r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","VNI":16777216}}"#, "Backend.VNI"),
        ];
        for (json, key) in cases {
            match NetworkConfig::parse(json.as_bytes()) {
                Err(ConfigError::Invalid { key: k, .. }) => assert_eq!(k, *key, "{json}"),
                other => panic!("{json}: expected an error about {key}, got {other:?}"),
            }
        }
        assert!(matches!(NetworkConfig::parse(b"{not json"), Err(ConfigError::Json(_))));
    }

    #[test]
    fn round_trips_through_raw() {
        let c = NetworkConfig::parse(br#"{"Network":"10.244.0.0/16","SubnetLen":26,"Backend":{"Type":"host-gw"}}"#)
            .unwrap();
        let json = serde_json::to_vec(&c.to_raw()).unwrap();
        assert_eq!(NetworkConfig::parse(&json).unwrap(), c);
    }
}
