//! A subnet lease as flanneld stores it: key `<prefix>/subnets/10.244.3.0-24`, value
//! `{"PublicIP":"…","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"…"}}`.
//! Field names and shapes match flannel exactly so both can share one network.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use ipnetwork::Ipv4Network;
use serde::{Deserialize, Serialize};

/// A MAC address written as flannel writes it: `aa:bb:cc:dd:ee:ff`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mac(pub [u8; 6]);

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
    }
}

impl FromStr for Mac {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for b in out.iter_mut() {
            let p = parts.next().ok_or_else(|| format!("{s:?} is not a MAC address"))?;
            *b = u8::from_str_radix(p, 16).map_err(|_| format!("{s:?} is not a MAC address"))?;
        }
        if parts.next().is_some() {
            return Err(format!("{s:?} is not a MAC address"));
        }
        Ok(Mac(out))
    }
}

impl Serialize for Mac {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Mac {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// vxlan's `BackendData`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VxlanData {
    #[serde(rename = "VNI")]
    pub vni: u32,
    #[serde(rename = "VtepMAC")]
    pub vtep_mac: Mac,
}

/// The lease value. `BackendData` stays raw so a backend we do not know is carried unchanged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeaseAttrs {
    #[serde(rename = "PublicIP")]
    pub public_ip: Ipv4Addr,
    #[serde(rename = "PublicIPv6", default)]
    pub public_ipv6: Option<String>,
    #[serde(rename = "BackendType", default)]
    pub backend_type: String,
    #[serde(rename = "BackendData", default, skip_serializing_if = "Option::is_none")]
    pub backend_data: Option<serde_json::Value>,
}

impl LeaseAttrs {
    pub fn vxlan(public_ip: Ipv4Addr, vni: u32, vtep_mac: Mac) -> LeaseAttrs {
        LeaseAttrs {
            public_ip,
            public_ipv6: None,
            backend_type: "vxlan".into(),
            backend_data: serde_json::to_value(VxlanData { vni, vtep_mac }).ok(),
        }
    }

    pub fn host_gw(public_ip: Ipv4Addr) -> LeaseAttrs {
        LeaseAttrs { public_ip, public_ipv6: None, backend_type: "host-gw".into(), backend_data: None }
    }

    /// The vxlan data, when this lease is a vxlan lease with well-formed data.
    pub fn vxlan_data(&self) -> Option<VxlanData> {
        if self.backend_type != "vxlan" {
            return None;
        }
        serde_json::from_value(self.backend_data.clone()?).ok()
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// One lease as read from etcd.
#[derive(Debug, Clone, PartialEq)]
pub struct Lease {
    pub subnet: Ipv4Network,
    pub attrs: LeaseAttrs,
    /// The etcd lease the key is bound to; 0 means a reservation (no expiry).
    pub etcd_lease: i64,
    pub mod_revision: i64,
    pub create_revision: i64,
}

impl Lease {
    pub fn is_reservation(&self) -> bool {
        self.etcd_lease == 0
    }
}

/// `10.244.3.0/24` ⇄ `10.244.3.0-24`, the last segment of a subnet key.
pub fn subnet_key_name(subnet: Ipv4Network) -> String {
    format!("{}-{}", subnet.network(), subnet.prefix())
}

pub fn parse_subnet_key_name(name: &str) -> Result<Ipv4Network, String> {
    let (ip, len) = name.split_once('-').ok_or_else(|| format!("{name:?} is not of the form 10.244.3.0-24"))?;
    let ip: Ipv4Addr = ip.parse().map_err(|_| format!("{name:?}: {ip:?} is not an IPv4 address"))?;
    let len: u8 = len.parse().map_err(|_| format!("{name:?}: {len:?} is not a prefix length"))?;
    let net = Ipv4Network::new(ip, len).map_err(|e| format!("{name:?}: {e}"))?;
    if net.network() != ip {
        return Err(format!("{name:?}: {ip} is not the network address of a /{len}"));
    }
    Ok(net)
}

/// The etcd key of a subnet: `<prefix>/subnets/10.244.3.0-24`.
pub fn subnet_key(prefix: &str, subnet: Ipv4Network) -> String {
    format!("{}/subnets/{}", prefix.trim_end_matches('/'), subnet_key_name(subnet))
}

pub fn subnets_prefix(prefix: &str) -> String {
    format!("{}/subnets/", prefix.trim_end_matches('/'))
}

pub fn config_key(prefix: &str) -> String {
    format!("{}/config", prefix.trim_end_matches('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vxlan_lease_json_is_flannels() {
        let mac: Mac = "82:1e:3a:4b:5c:6d".parse().unwrap();
        let a = LeaseAttrs::vxlan(Ipv4Addr::new(192, 168, 56, 11), 1, mac);
        assert_eq!(
            a.to_json(),
            r#"{"PublicIP":"192.168.56.11","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"82:1e:3a:4b:5c:6d"}}"#
        );
        // What a real flanneld wrote (with a field we do not use) reads back the same.
        let flannel = r#"{"PublicIP":"192.168.56.11","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"82:1e:3a:4b:5c:6d"},"BackendV6Data":null}"#;
        let back: LeaseAttrs = serde_json::from_str(flannel).unwrap();
        assert_eq!(back, a);
        assert_eq!(back.vxlan_data(), Some(VxlanData { vni: 1, vtep_mac: mac }));
    }

    #[test]
    fn host_gw_lease_has_no_backend_data() {
        let a = LeaseAttrs::host_gw(Ipv4Addr::new(192, 168, 56, 12));
        assert_eq!(a.to_json(), r#"{"PublicIP":"192.168.56.12","PublicIPv6":null,"BackendType":"host-gw"}"#);
        assert_eq!(a.vxlan_data(), None);
    }

    #[test]
    fn subnet_key_names() {
        let n: Ipv4Network = "10.244.3.0/24".parse().unwrap();
        assert_eq!(subnet_key("/coreos.com/network/", n), "/coreos.com/network/subnets/10.244.3.0-24");
        assert_eq!(parse_subnet_key_name("10.244.3.0-24"), Ok(n));
        for bad in ["10.244.3.0", "10.244.3.1-24", "10.244.3.0-33", "x-24", "10.244.3.0-x"] {
            assert!(parse_subnet_key_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn mac_parse_rejects_garbage() {
        for bad in ["", "82:1e:3a:4b:5c", "82:1e:3a:4b:5c:6d:7e", "zz:1e:3a:4b:5c:6d"] {
            assert!(bad.parse::<Mac>().is_err(), "{bad}");
        }
    }
}
