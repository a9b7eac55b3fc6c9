//! The overlay's kernel state as plain data, and the pure decisions about it: which routes,
//! neighbours and FDB entries the leases call for, and the ordered ops that turn what the kernel
//! has into that. No I/O here; `kernel.rs` observes and applies.

use std::collections::BTreeSet;
use std::fmt;
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use serde::Serialize;

use crate::lease::{Lease, Mac};

/// `ip route replace <dst> via <gateway> dev <ifindex> [onlink]`, main table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Route {
    pub dst: Ipv4Network,
    pub gateway: Ipv4Addr,
    pub ifindex: u32,
    pub onlink: bool,
}

/// `ip neigh replace <ip> lladdr <mac> dev <ifindex> nud permanent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Neigh {
    pub ip: Ipv4Addr,
    pub mac: Mac,
    pub ifindex: u32,
}

/// `bridge fdb replace <mac> dev <ifindex> dst <dst> self permanent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Fdb {
    pub mac: Mac,
    pub dst: Ipv4Addr,
    pub ifindex: u32,
}

/// Everything the overlay owns in the kernel (desired, or observed on our devices).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize)]
pub struct KernelState {
    pub routes: BTreeSet<Route>,
    pub neighs: BTreeSet<Neigh>,
    pub fdbs: BTreeSet<Fdb>,
}

impl KernelState {
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty() && self.neighs.is_empty() && self.fdbs.is_empty()
    }
}

/// One change to the kernel. Adds have replace semantics, deletes of what is gone are no-ops.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(tag = "op", content = "object", rename_all = "snake_case")]
pub enum Op {
    AddRoute(Route),
    DelRoute(Route),
    AddNeigh(Neigh),
    DelNeigh(Neigh),
    AddFdb(Fdb),
    DelFdb(Fdb),
}

/// Renders an op as the iproute2 command an operator would type (ifindex in place of the name).
impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let route = |f: &mut fmt::Formatter<'_>, verb: &str, r: &Route| {
            let onlink = if r.onlink { " onlink" } else { "" };
            write!(f, "ip route {verb} {} via {} dev #{}{onlink}", r.dst, r.gateway, r.ifindex)
        };
        match self {
            Op::AddRoute(r) => route(f, "replace", r),
            Op::DelRoute(r) => route(f, "del", r),
            Op::AddNeigh(n) => write!(f, "ip neigh replace {} lladdr {} dev #{} nud permanent", n.ip, n.mac, n.ifindex),
            Op::DelNeigh(n) => write!(f, "ip neigh del {} lladdr {} dev #{}", n.ip, n.mac, n.ifindex),
            Op::AddFdb(e) => write!(f, "bridge fdb replace {} dev #{} dst {} self permanent", e.mac, e.ifindex, e.dst),
            Op::DelFdb(e) => write!(f, "bridge fdb del {} dev #{} dst {} self", e.mac, e.ifindex, e.dst),
        }
    }
}

/// What the vxlan backend wants for these leases: per remote vxlan lease of our VNI, a route to its
/// subnet via the subnet's network address (the remote VTEP's address, as flannel does), a
/// permanent neighbour for that address, and an FDB entry sending its MAC to its PublicIP.
/// Leases of another backend, with malformed data or another VNI are not routed.
pub fn desired_vxlan(local_subnet: Ipv4Network, vni: u32, vtep_ifindex: u32, leases: &[Lease]) -> KernelState {
    let mut state = KernelState::default();
    for lease in leases {
        if lease.subnet == local_subnet {
            continue;
        }
        let Some(data) = lease.attrs.vxlan_data() else { continue };
        if data.vni != vni {
            continue;
        }
        let vtep_ip = lease.subnet.network();
        state.routes.insert(Route { dst: lease.subnet, gateway: vtep_ip, ifindex: vtep_ifindex, onlink: true });
        state.neighs.insert(Neigh { ip: vtep_ip, mac: data.vtep_mac, ifindex: vtep_ifindex });
        state.fdbs.insert(Fdb { mac: data.vtep_mac, dst: lease.attrs.public_ip, ifindex: vtep_ifindex });
    }
    state
}

/// What the host-gw backend wants: per remote host-gw lease, a route to its subnet via its PublicIP.
pub fn desired_host_gw(local_subnet: Ipv4Network, iface_ifindex: u32, leases: &[Lease]) -> KernelState {
    let mut state = KernelState::default();
    for lease in leases {
        if lease.subnet == local_subnet || lease.attrs.backend_type != "host-gw" {
            continue;
        }
        let gateway = lease.attrs.public_ip;
        state.routes.insert(Route { dst: lease.subnet, gateway, ifindex: iface_ifindex, onlink: false });
    }
    state
}

/// The ops that turn `observed` (already restricted to what we own) into `desired`. Deletes come
/// first so a changed object is removed before its replacement lands, and route adds come last so
/// a route never points at a neighbour or FDB entry that is not there yet.
pub fn diff(desired: &KernelState, observed: &KernelState) -> Vec<Op> {
    let mut ops = Vec::new();
    ops.extend(observed.routes.difference(&desired.routes).map(|r| Op::DelRoute(*r)));
    ops.extend(observed.neighs.difference(&desired.neighs).map(|n| Op::DelNeigh(*n)));
    ops.extend(observed.fdbs.difference(&desired.fdbs).map(|e| Op::DelFdb(*e)));
    ops.extend(desired.neighs.difference(&observed.neighs).map(|n| Op::AddNeigh(*n)));
    ops.extend(desired.fdbs.difference(&observed.fdbs).map(|e| Op::AddFdb(*e)));
    ops.extend(desired.routes.difference(&observed.routes).map(|r| Op::AddRoute(*r)));
    ops
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::LeaseAttrs;

    fn net(s: &str) -> Ipv4Network {
        s.parse().unwrap()
    }

    fn mac(last: u8) -> Mac {
        Mac([0x0e, 0, 0, 0, 0, last])
    }

    fn lease(subnet: &str, attrs: LeaseAttrs) -> Lease {
        Lease { subnet: net(subnet), attrs, etcd_lease: 7, mod_revision: 1, create_revision: 1 }
    }

    fn vx(subnet: &str, public: [u8; 4], vni: u32, m: u8) -> Lease {
        lease(subnet, LeaseAttrs::vxlan(public.into(), vni, mac(m)))
    }

    const LOCAL: &str = "10.244.1.0/24";
    const DEV: u32 = 9;

    fn route(dst: &str, gw: [u8; 4], onlink: bool) -> Route {
        Route { dst: net(dst), gateway: gw.into(), ifindex: DEV, onlink }
    }

    #[test]
    fn desired_vxlan_routes_only_remote_leases_of_our_vni() {
        let mut malformed = vx("10.244.6.0/24", [192, 168, 56, 16], 1, 6);
        malformed.attrs.backend_data = Some(serde_json::json!({"VNI": 1, "VtepMAC": "not-a-mac"}));
        let mut no_data = vx("10.244.7.0/24", [192, 168, 56, 17], 1, 7);
        no_data.attrs.backend_data = None;
        let cases: Vec<(&str, Vec<Lease>, Vec<&str>)> = vec![
            ("no leases", vec![], vec![]),
            ("only our own", vec![vx(LOCAL, [192, 168, 56, 11], 1, 1)], vec![]),
            ("one remote", vec![vx("10.244.2.0/24", [192, 168, 56, 12], 1, 2)], vec!["10.244.2.0/24"]),
            (
                "own, remote, other vni, host-gw, malformed, no data",
                vec![
                    vx(LOCAL, [192, 168, 56, 11], 1, 1),
                    vx("10.244.2.0/24", [192, 168, 56, 12], 1, 2),
                    vx("10.244.3.0/24", [192, 168, 56, 13], 2, 3),
                    lease("10.244.4.0/24", LeaseAttrs::host_gw([192, 168, 56, 14].into())),
                    malformed,
                    no_data,
                ],
                vec!["10.244.2.0/24"],
            ),
        ];
        for (name, leases, want) in cases {
            let got = desired_vxlan(net(LOCAL), 1, DEV, &leases);
            let dsts: Vec<String> = got.routes.iter().map(|r| r.dst.to_string()).collect();
            assert_eq!(dsts, want, "{name}");
            assert_eq!(got.neighs.len(), want.len(), "{name}");
            assert_eq!(got.fdbs.len(), want.len(), "{name}");
        }
    }

    #[test]
    fn desired_vxlan_is_flannels_triple() {
        let got = desired_vxlan(net(LOCAL), 1, DEV, &[vx("10.244.3.0/24", [192, 168, 56, 13], 1, 3)]);
        let vtep = Ipv4Addr::new(10, 244, 3, 0);
        assert_eq!(got.routes, BTreeSet::from([route("10.244.3.0/24", [10, 244, 3, 0], true)]));
        assert_eq!(got.neighs, BTreeSet::from([Neigh { ip: vtep, mac: mac(3), ifindex: DEV }]));
        assert_eq!(got.fdbs, BTreeSet::from([Fdb { mac: mac(3), dst: [192, 168, 56, 13].into(), ifindex: DEV }]));
    }

    #[test]
    fn desired_host_gw_routes_via_public_ip() {
        let leases = [
            lease(LOCAL, LeaseAttrs::host_gw([192, 168, 56, 11].into())),
            lease("10.244.2.0/24", LeaseAttrs::host_gw([192, 168, 56, 12].into())),
            vx("10.244.3.0/24", [192, 168, 56, 13], 1, 3),
        ];
        let got = desired_host_gw(net(LOCAL), DEV, &leases);
        assert_eq!(got.routes, BTreeSet::from([route("10.244.2.0/24", [192, 168, 56, 12], false)]));
        assert!(got.neighs.is_empty() && got.fdbs.is_empty());
    }

    fn kinds(ops: &[Op]) -> Vec<&'static str> {
        ops.iter()
            .map(|op| match op {
                Op::AddRoute(_) => "+route",
                Op::DelRoute(_) => "-route",
                Op::AddNeigh(_) => "+neigh",
                Op::DelNeigh(_) => "-neigh",
                Op::AddFdb(_) => "+fdb",
                Op::DelFdb(_) => "-fdb",
            })
            .collect()
    }

    #[test]
    fn diff_table() {
        let a = vx("10.244.2.0/24", [192, 168, 56, 12], 1, 2);
        let b = vx("10.244.3.0/24", [192, 168, 56, 13], 1, 3);
        // b's node came back with another PublicIP: same route and neighbour, new FDB dst.
        let b_moved = vx("10.244.3.0/24", [192, 168, 56, 23], 1, 3);
        // b's subnet now leased by a node with another MAC: new neighbour and FDB, same route.
        let b_new_mac = vx("10.244.3.0/24", [192, 168, 56, 13], 1, 4);
        let st = |ls: Vec<Lease>| desired_vxlan(net(LOCAL), 1, DEV, &ls);
        let cases: Vec<(&str, KernelState, KernelState, Vec<&str>)> = vec![
            ("nothing to do", st(vec![a.clone()]), st(vec![a.clone()]), vec![]),
            (
                "fresh node",
                st(vec![a.clone(), b.clone()]),
                st(vec![]),
                vec!["+neigh", "+neigh", "+fdb", "+fdb", "+route", "+route"],
            ),
            ("lease gone", st(vec![a.clone()]), st(vec![a.clone(), b.clone()]), vec!["-route", "-neigh", "-fdb"]),
            ("public ip moved", st(vec![b_moved]), st(vec![b.clone()]), vec!["-fdb", "+fdb"]),
            ("mac changed", st(vec![b_new_mac]), st(vec![b.clone()]), vec!["-neigh", "-fdb", "+neigh", "+fdb"]),
            (
                "everything gone",
                st(vec![]),
                st(vec![a.clone(), b.clone()]),
                vec!["-route", "-route", "-neigh", "-neigh", "-fdb", "-fdb"],
            ),
        ];
        for (name, desired, observed, want) in cases {
            assert_eq!(kinds(&diff(&desired, &observed)), want, "{name}");
        }
    }

    #[test]
    fn diff_replaces_a_route_whose_gateway_changed() {
        let mut desired = KernelState::default();
        desired.routes.insert(route("10.244.2.0/24", [192, 168, 56, 12], false));
        let mut observed = KernelState::default();
        observed.routes.insert(route("10.244.2.0/24", [192, 168, 56, 99], false));
        observed.routes.insert(route("10.244.9.0/24", [192, 168, 56, 19], false));
        let ops = diff(&desired, &observed);
        assert_eq!(
            ops,
            vec![
                Op::DelRoute(route("10.244.2.0/24", [192, 168, 56, 99], false)),
                Op::DelRoute(route("10.244.9.0/24", [192, 168, 56, 19], false)),
                Op::AddRoute(route("10.244.2.0/24", [192, 168, 56, 12], false)),
            ]
        );
    }

    #[test]
    fn diff_of_applied_state_is_empty() {
        let desired = desired_vxlan(net(LOCAL), 1, DEV, &[vx("10.244.2.0/24", [192, 168, 56, 12], 1, 2)]);
        assert!(diff(&desired, &desired.clone()).is_empty());
    }

    #[test]
    fn ops_render_as_iproute2_commands_and_json() {
        let op = Op::AddRoute(route("10.244.3.0/24", [10, 244, 3, 0], true));
        assert_eq!(op.to_string(), "ip route replace 10.244.3.0/24 via 10.244.3.0 dev #9 onlink");
        assert_eq!(
            serde_json::to_string(&op).unwrap(),
            r#"{"op":"add_route","object":{"dst":"10.244.3.0/24","gateway":"10.244.3.0","ifindex":9,"onlink":true}}"#
        );
        let fdb = Op::AddFdb(Fdb { mac: mac(3), dst: [192, 168, 56, 13].into(), ifindex: DEV });
        assert_eq!(fdb.to_string(), "bridge fdb replace 0e:00:00:00:00:03 dev #9 dst 192.168.56.13 self permanent");
    }
}
