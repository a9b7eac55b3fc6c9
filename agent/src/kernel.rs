//! The kernel seam of the overlay, over rtnetlink: find the underlay, keep `flannel.<vni>` as
//! flannel makes it, read back the routes, neighbours and FDB entries we own, and apply `plan::Op`s.
//! It touches only the namespace of the thread that called `Netlink::new`, and only our objects.

use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use ipnetwork::Ipv4Network;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{LinkUnspec, LinkVxlan, RouteMessageBuilder};

use crate::ethtool;
use crate::lease::Mac;
use crate::plan::{Fdb, KernelState, Neigh, Op, Route};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("opening a netlink socket failed: {0}")]
    Connect(#[source] std::io::Error),
    #[error("Netlink::new must run inside a tokio runtime")]
    NoRuntime,
    #[error("netlink {op} failed: {source}")]
    Netlink {
        op: &'static str,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("no interface named {0:?}")]
    NoSuchInterface(String),
    #[error("no interface has the IPv4 address {0}")]
    NoInterfaceWithAddress(Ipv4Addr),
    #[error("interface {iface} has no IPv4 address (the underlay needs one for VXLAN)")]
    NoIpv4 { iface: String },
    #[error("no underlay: no IPv4 default route and no interface that is up with an IPv4 address")]
    NoUnderlay,
    #[error("the kernel's reply for link #{index} lacks its {what}")]
    Malformed { index: u32, what: &'static str },
    #[error("disabling TX checksum offload on {iface}: {source}")]
    Ethtool {
        iface: String,
        #[source]
        source: ethtool::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    fn errno(&self) -> Option<i32> {
        match self {
            Error::Netlink { source: rtnetlink::Error::NetlinkError(m), .. } => Some(-m.raw_code()),
            _ => None,
        }
    }

    /// The object was not there (deleting what is gone, or asking for a missing link).
    pub fn is_not_found(&self) -> bool {
        matches!(self.errno(), Some(libc::ENOENT | libc::ESRCH | libc::ENODEV))
            || matches!(self, Error::NoSuchInterface(_))
    }

    pub fn is_exists(&self) -> bool {
        self.errno() == Some(libc::EEXIST)
    }
}

fn nl(op: &'static str) -> impl FnOnce(rtnetlink::Error) -> Error {
    move |source| Error::Netlink { op, source }
}

/// The interface VXLAN packets leave by, and the address they come from (the lease's PublicIP).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Underlay {
    pub name: String,
    pub ifindex: u32,
    pub ip: Ipv4Addr,
    pub mtu: u32,
}

/// What `flannel.<vni>` must look like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VxlanSpec {
    pub vni: u32,
    pub port: u16,
    pub local_ip: Ipv4Addr,
    pub underlay_ifindex: u32,
    /// Underlay MTU − 50 (the VXLAN encapsulation overhead).
    pub mtu: u32,
    /// The local subnet's network address, set as a /32.
    pub address: Ipv4Addr,
    pub mac: Mac,
    /// Whether `tx-checksum-ip-generic` stays on. Turning it off also turns off segmentation
    /// offload (about 4x less throughput), so it is off only where the kernel bug can bite.
    pub tx_checksum_offload: bool,
}

/// `--vxlan-tx-checksum-offload`: what to do about the VXLAN checksum bug.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ChecksumOffload {
    /// Off only where the bug can bite: kernels before 5.7, or a public IP other than the
    /// interface's (the node is behind NAT, the case flannel's troubleshooting guide names).
    #[default]
    Auto,
    On,
    Off,
}

/// Whether to keep TX checksum offload on `flannel.<vni>`. Pure, so the rule is tested as a table.
/// The bug: the kernel computed wrong UDP checksums for VXLAN packets that were then NATed;
/// fixed in Linux 5.7 (and 5.6.13, 5.4.41, 4.19.123, 4.14.181 — treated as affected here, to be safe).
pub fn keep_checksum_offload(
    mode: ChecksumOffload,
    kernel_release: &str,
    public_ip: Ipv4Addr,
    iface_ip: Ipv4Addr,
) -> bool {
    match mode {
        ChecksumOffload::On => true,
        ChecksumOffload::Off => false,
        ChecksumOffload::Auto => {
            let mut nums = kernel_release.split(|c: char| !c.is_ascii_digit()).filter_map(|p| p.parse::<u32>().ok());
            let fixed_kernel = match (nums.next(), nums.next()) {
                (Some(major), Some(minor)) => (major, minor) >= (5, 7),
                _ => false, // unknown: assume affected
            };
            fixed_kernel && public_ip == iface_ip
        }
    }
}

impl VxlanSpec {
    /// The flannel-compatible spec for this underlay, VNI, port and local subnet.
    pub fn new(underlay: &Underlay, vni: u32, port: u16, local_subnet: Ipv4Network) -> VxlanSpec {
        VxlanSpec {
            vni,
            port,
            local_ip: underlay.ip,
            underlay_ifindex: underlay.ifindex,
            mtu: underlay.mtu.saturating_sub(50),
            address: local_subnet.network(),
            mac: vtep_mac(underlay.ip, vni),
            tx_checksum_offload: true,
        }
    }

    pub fn name(&self) -> String {
        vxlan_name(self.vni)
    }
}

/// `flannel.<vni>`, the device name flannel uses.
pub fn vxlan_name(vni: u32) -> String {
    format!("flannel.{vni}")
}

/// A stable, locally administered unicast MAC for our VTEP: `0e:<vni>:<public ip>`. Derived rather
/// than random so a device recreated after a deletion or a restart keeps the MAC its lease carries,
/// and unique per PublicIP within one VNI.
pub fn vtep_mac(public_ip: Ipv4Addr, vni: u32) -> Mac {
    let [a, b, c, d] = public_ip.octets();
    let v = vni.to_be_bytes();
    Mac([0x0e, v[1] ^ v[2] ^ v[3], a, b, c, d])
}

/// What we read about a link.
#[derive(Debug, Clone)]
struct Link {
    index: u32,
    name: String,
    up: bool,
    loopback: bool,
    mtu: u32,
    mac: Option<Mac>,
    vxlan: Option<Vec<InfoVxlan>>,
}

impl Link {
    fn from_msg(m: LinkMessage) -> Link {
        let mut l = Link {
            index: m.header.index,
            name: String::new(),
            up: m.header.flags.contains(LinkFlags::Up),
            loopback: m.header.flags.contains(LinkFlags::Loopback),
            mtu: 0,
            mac: None,
            vxlan: None,
        };
        for a in m.attributes {
            match a {
                LinkAttribute::IfName(n) => l.name = n,
                LinkAttribute::Mtu(mtu) => l.mtu = mtu,
                LinkAttribute::Address(a) => l.mac = <[u8; 6]>::try_from(a.as_slice()).ok().map(Mac),
                LinkAttribute::LinkInfo(infos) => {
                    let is_vxlan = infos.iter().any(|i| matches!(i, LinkInfo::Kind(InfoKind::Vxlan)));
                    for i in infos {
                        if let (true, LinkInfo::Data(InfoData::Vxlan(d))) = (is_vxlan, i) {
                            l.vxlan = Some(d);
                        }
                    }
                    if is_vxlan && l.vxlan.is_none() {
                        l.vxlan = Some(Vec::new());
                    }
                }
                _ => {}
            }
        }
        l
    }

    /// Whether an existing VXLAN device can be kept for `spec`: flannel recreates on a different
    /// VNI, local address or port, since those cannot be changed on a live device.
    fn vxlan_matches(&self, spec: &VxlanSpec) -> bool {
        let Some(data) = &self.vxlan else { return false };
        let (mut vni, mut local, mut port, mut learning) = (None, None, None, None);
        for d in data {
            match d {
                InfoVxlan::Id(v) => vni = Some(*v),
                InfoVxlan::Local(a) => local = Some(*a),
                InfoVxlan::Port(p) => port = Some(*p),
                InfoVxlan::Learning(l) => learning = Some(*l),
                _ => {}
            }
        }
        vni == Some(spec.vni) && local == Some(spec.local_ip) && port == Some(spec.port) && learning == Some(false)
    }
}

fn route_dst(m: &RouteMessage) -> Option<Ipv4Network> {
    let ip = m
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Destination(RouteAddress::Inet(ip)) => Some(*ip),
            _ => None,
        })
        .unwrap_or(Ipv4Addr::UNSPECIFIED);
    Ipv4Network::new(ip, m.header.destination_prefix_length).ok()
}

fn route_gateway(m: &RouteMessage) -> Option<Ipv4Addr> {
    m.attributes.iter().find_map(|a| match a {
        RouteAttribute::Gateway(RouteAddress::Inet(ip)) => Some(*ip),
        _ => None,
    })
}

fn route_oif(m: &RouteMessage) -> Option<u32> {
    m.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(i) => Some(*i),
        _ => None,
    })
}

fn route_table(m: &RouteMessage) -> u32 {
    m.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(m.header.table as u32)
}

fn addr_v4(m: &AddressMessage) -> Option<Ipv4Addr> {
    let find = |local: bool| {
        m.attributes.iter().find_map(|a| match (local, a) {
            (true, AddressAttribute::Local(IpAddr::V4(ip))) | (false, AddressAttribute::Address(IpAddr::V4(ip))) => {
                Some(*ip)
            }
            _ => None,
        })
    };
    find(true).or_else(|| find(false))
}

fn route_msg(r: &Route) -> RouteMessage {
    // proto boot, as flanneld's (and `ip route`'s) routes are, so both look the same to operators.
    let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
        .protocol(RouteProtocol::Boot)
        .destination_prefix(r.dst.network(), r.dst.prefix())
        .gateway(r.gateway)
        .output_interface(r.ifindex);
    if r.onlink {
        b = b.onlink();
    }
    b.build()
}

fn neigh_del_msg(family: AddressFamily, ifindex: u32, dst: Ipv4Addr, mac: Option<Mac>) -> NeighbourMessage {
    let mut m = NeighbourMessage::default();
    m.header.family = family;
    m.header.ifindex = ifindex;
    m.attributes.push(NeighbourAttribute::Destination(NeighbourAddress::Inet(dst)));
    if let Some(mac) = mac {
        m.attributes.push(NeighbourAttribute::LinkLayerAddress(mac.0.to_vec()));
    }
    m
}

/// An rtnetlink connection in the calling thread's network namespace.
#[derive(Debug, Clone)]
pub struct Netlink {
    handle: rtnetlink::Handle,
}

impl Netlink {
    /// Opens the socket (in this thread's namespace) and spawns its connection on the current
    /// tokio runtime.
    pub fn new() -> Result<Netlink> {
        let rt = tokio::runtime::Handle::try_current().map_err(|_| Error::NoRuntime)?;
        let (conn, handle, _) = rtnetlink::new_connection().map_err(Error::Connect)?;
        rt.spawn(conn);
        Ok(Netlink { handle })
    }

    async fn links(&self) -> Result<Vec<Link>> {
        let msgs: Vec<LinkMessage> =
            self.handle.link().get().execute().try_collect().await.map_err(nl("dump links"))?;
        Ok(msgs.into_iter().map(Link::from_msg).collect())
    }

    async fn link_by_name(&self, name: &str) -> Result<Option<Link>> {
        let mut s = self.handle.link().get().match_name(name).execute();
        match s.try_next().await.map_err(nl("get link by name")) {
            Ok(m) => Ok(m.map(Link::from_msg)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn link_by_index(&self, index: u32) -> Result<Link> {
        let mut s = self.handle.link().get().match_index(index).execute();
        match s.try_next().await.map_err(nl("get link by index"))? {
            Some(m) => Ok(Link::from_msg(m)),
            None => Err(Error::NoSuchInterface(format!("#{index}"))),
        }
    }

    /// The index of the interface called `name`, if there is one.
    pub async fn link_index(&self, name: &str) -> Result<Option<u32>> {
        Ok(self.link_by_name(name).await?.map(|l| l.index))
    }

    /// The MAC address of a link.
    pub async fn link_mac(&self, ifindex: u32) -> Result<Mac> {
        self.link_by_index(ifindex).await?.mac.ok_or(Error::Malformed { index: ifindex, what: "MAC address" })
    }

    /// Deletes the link called `name`; returns whether there was one.
    pub async fn delete_link(&self, name: &str) -> Result<bool> {
        let Some(link) = self.link_by_name(name).await? else { return Ok(false) };
        match self.handle.link().del(link.index).execute().await.map_err(nl("delete link")) {
            Ok(()) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn ipv4_addrs(&self) -> Result<Vec<AddressMessage>> {
        let msgs: Vec<AddressMessage> =
            self.handle.address().get().execute().try_collect().await.map_err(nl("dump addresses"))?;
        Ok(msgs.into_iter().filter(|m| m.header.family == AddressFamily::Inet).collect())
    }

    async fn ipv4_routes(&self) -> Result<Vec<RouteMessage>> {
        // Without strict checking the kernel ignores the request's filters and dumps every IPv4
        // route of every table; we filter here.
        let req = RouteMessageBuilder::<Ipv4Addr>::new().build();
        let msgs: Vec<RouteMessage> =
            self.handle.route().get(req).execute().try_collect().await.map_err(nl("dump routes"))?;
        Ok(msgs
            .into_iter()
            .filter(|m| {
                m.header.address_family == AddressFamily::Inet && route_table(m) == RouteHeader::RT_TABLE_MAIN as u32
            })
            .collect())
    }

    /// The underlay, chosen as flanneld's `--iface` does: `spec` is an interface name or one of
    /// its IPv4 addresses; without it, the interface of the IPv4 default route, else the first
    /// non-loopback interface that is up and has an IPv4 address.
    pub async fn find_underlay(&self, spec: Option<&str>) -> Result<Underlay> {
        let addrs = self.ipv4_addrs().await?;
        let first_ip = |index: u32| addrs.iter().filter(|a| a.header.index == index).find_map(addr_v4);
        let pick = |link: Link, ip: Option<Ipv4Addr>| match ip {
            Some(ip) => Ok(Underlay { name: link.name, ifindex: link.index, ip, mtu: link.mtu }),
            None => Err(Error::NoIpv4 { iface: link.name }),
        };
        if let Some(spec) = spec {
            if let Ok(ip) = spec.parse::<Ipv4Addr>() {
                let index = addrs
                    .iter()
                    .find(|a| addr_v4(a) == Some(ip))
                    .map(|a| a.header.index)
                    .ok_or(Error::NoInterfaceWithAddress(ip))?;
                return pick(self.link_by_index(index).await?, Some(ip));
            }
            let link = self.link_by_name(spec).await?.ok_or_else(|| Error::NoSuchInterface(spec.into()))?;
            let ip = first_ip(link.index);
            return pick(link, ip);
        }
        let default_oif = self
            .ipv4_routes()
            .await?
            .iter()
            .filter(|r| r.header.destination_prefix_length == 0 && r.header.kind == RouteType::Unicast)
            .find_map(route_oif);
        if let Some(index) = default_oif {
            let link = self.link_by_index(index).await?;
            let ip = first_ip(index);
            return pick(link, ip);
        }
        let mut links = self.links().await?;
        links.sort_by_key(|l| l.index);
        let link =
            links.into_iter().find(|l| l.up && !l.loopback && first_ip(l.index).is_some()).ok_or(Error::NoUnderlay)?;
        let ip = first_ip(link.index);
        pick(link, ip)
    }

    /// Makes `flannel.<vni>` exactly as `spec` says (recreating it when its VNI, local address or
    /// port differ), with only its /32 address, up, and TX checksum offload off. Idempotent: when
    /// everything is right it changes nothing. Returns the device's ifindex.
    pub async fn ensure_vxlan(&self, spec: &VxlanSpec) -> Result<u32> {
        let name = spec.name();
        let mut link = self.link_by_name(&name).await?;
        if let Some(l) = &link {
            if !l.vxlan_matches(spec) {
                tracing::warn!(device = %name, "existing device does not match the VXLAN config; recreating it");
                self.handle.link().del(l.index).execute().await.map_err(nl("delete mismatched vxlan link"))?;
                link = None;
            }
        }
        let link = match link {
            Some(l) => l,
            None => {
                let msg = LinkVxlan::new(&name, spec.vni)
                    .dev(spec.underlay_ifindex)
                    .local(spec.local_ip)
                    .port(spec.port)
                    .learning(false)
                    .mtu(spec.mtu)
                    .address(spec.mac.0.to_vec())
                    .build();
                match self.handle.link().add(msg).execute().await.map_err(nl("add vxlan link")) {
                    Ok(()) => {}
                    // Someone made it between our look and our add: check it like any other.
                    Err(e) if e.is_exists() => {}
                    Err(e) => return Err(e),
                }
                self.link_by_name(&name).await?.ok_or_else(|| Error::NoSuchInterface(name.clone()))?
            }
        };
        let index = link.index;

        if link.mtu != spec.mtu || link.mac != Some(spec.mac) {
            let msg = LinkUnspec::new_with_index(index).mtu(spec.mtu).address(spec.mac.0.to_vec()).build();
            self.handle.link().set(msg).execute().await.map_err(nl("set vxlan mtu/mac"))?;
        }

        let mut have = false;
        for a in self.ipv4_addrs().await?.into_iter().filter(|a| a.header.index == index) {
            if addr_v4(&a) == Some(spec.address) && a.header.prefix_len == 32 {
                have = true;
            } else {
                self.handle.address().del(a).execute().await.map_err(nl("delete stray vxlan address"))?;
            }
        }
        if !have {
            let add = self.handle.address().add(index, IpAddr::V4(spec.address), 32);
            add.execute().await.map_err(nl("add vxlan address"))?;
        }

        if !link.up {
            let msg = LinkUnspec::new_with_index(index).up().build();
            self.handle.link().set(msg).execute().await.map_err(nl("set vxlan up"))?;
        }

        ethtool::set_feature(&name, ethtool::TX_CHECKSUM_IP_GENERIC, spec.tx_checksum_offload)
            .map_err(|source| Error::Ethtool { iface: name.clone(), source })?;
        Ok(index)
    }

    /// What we own on the VXLAN device: main-table IPv4 routes via a gateway out of it, its
    /// permanent IPv4 neighbours, and its FDB entries that carry a remote (NDA_DST).
    pub async fn observe_vxlan(&self, ifindex: u32) -> Result<KernelState> {
        let mut state = KernelState::default();
        for m in self.ipv4_routes().await? {
            // The kernel's own routes (proto kernel, link scope) carry no gateway and are not ours.
            if route_oif(&m) != Some(ifindex) || m.header.protocol == RouteProtocol::Kernel {
                continue;
            }
            if let (Some(dst), Some(gateway)) = (route_dst(&m), route_gateway(&m)) {
                let onlink = m.header.flags.contains(RouteFlags::Onlink);
                state.routes.insert(Route { dst, gateway, ifindex, onlink });
            }
        }

        let neighs: Vec<NeighbourMessage> = self
            .handle
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Inet)
            .execute()
            .try_collect()
            .await
            .map_err(nl("dump neighbours"))?;
        for m in neighs {
            if m.header.ifindex != ifindex || m.header.state != NeighbourState::Permanent {
                continue;
            }
            let (mut ip, mut mac) = (None, None);
            for a in &m.attributes {
                match a {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(v)) => ip = Some(*v),
                    NeighbourAttribute::LinkLayerAddress(l) => mac = <[u8; 6]>::try_from(l.as_slice()).ok(),
                    _ => {}
                }
            }
            if let (Some(ip), Some(mac)) = (ip, mac) {
                state.neighs.insert(Neigh { ip, mac: Mac(mac), ifindex });
            }
        }

        let fdbs: Vec<NeighbourMessage> = self
            .handle
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Bridge)
            .execute()
            .try_collect()
            .await
            .map_err(nl("dump fdb"))?;
        for m in fdbs {
            if m.header.ifindex != ifindex {
                continue;
            }
            let (mut dst, mut mac) = (None, None);
            for a in &m.attributes {
                match a {
                    // AF_BRIDGE replies carry NDA_DST as raw bytes (4 for an IPv4 remote).
                    NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => {
                        dst = <[u8; 4]>::try_from(b.as_slice()).ok().map(Ipv4Addr::from)
                    }
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(v)) => dst = Some(*v),
                    NeighbourAttribute::LinkLayerAddress(l) => mac = <[u8; 6]>::try_from(l.as_slice()).ok(),
                    _ => {}
                }
            }
            // The all-zero MAC is a default (flood) entry, which we never make.
            if let (Some(dst), Some(mac)) = (dst, mac) {
                if mac != [0; 6] {
                    state.fdbs.insert(Fdb { mac: Mac(mac), dst, ifindex });
                }
            }
        }
        Ok(state)
    }

    /// What the host-gw backend owns: main-table routes via a gateway out of `ifindex` whose
    /// destination lies inside the pod `network` (and is not our own subnet). Nothing else.
    pub async fn observe_host_gw(
        &self,
        ifindex: u32,
        network: Ipv4Network,
        local_subnet: Ipv4Network,
    ) -> Result<KernelState> {
        let mut state = KernelState::default();
        for m in self.ipv4_routes().await? {
            if route_oif(&m) != Some(ifindex) || m.header.kind != RouteType::Unicast {
                continue;
            }
            let (Some(dst), Some(gateway)) = (route_dst(&m), route_gateway(&m)) else { continue };
            let inside = dst.prefix() >= network.prefix() && network.contains(dst.network());
            if inside && dst != local_subnet {
                let onlink = m.header.flags.contains(RouteFlags::Onlink);
                state.routes.insert(Route { dst, gateway, ifindex, onlink });
            }
        }
        Ok(state)
    }

    /// Applies every op with replace semantics; deleting what is already gone is not an error.
    /// Carries on after a failure and returns the ops that failed, with why.
    pub async fn apply(&self, ops: &[Op]) -> Vec<(Op, Error)> {
        let mut failed = Vec::new();
        for op in ops {
            let res = self.apply_one(op).await;
            match res {
                Err(e) if matches!(op, Op::DelRoute(_) | Op::DelNeigh(_) | Op::DelFdb(_)) && e.is_not_found() => {}
                // The caller logs failures with its own context.
                Err(e) => failed.push((*op, e)),
                Ok(()) => tracing::debug!(%op, "applied"),
            }
        }
        failed
    }

    async fn apply_one(&self, op: &Op) -> Result<()> {
        let h = &self.handle;
        match op {
            Op::AddRoute(r) => h.route().add(route_msg(r)).replace().execute().await.map_err(nl("replace route")),
            Op::DelRoute(r) => {
                let mut m = route_msg(r);
                // Match whoever added it (proto boot by hand, static by us) like `ip route del`.
                m.header.protocol = RouteProtocol::Unspec;
                m.header.scope = RouteScope::NoWhere;
                h.route().del(m).execute().await.map_err(nl("delete route"))
            }
            Op::AddNeigh(n) => h
                .neighbours()
                .add(n.ifindex, IpAddr::V4(n.ip))
                .link_layer_address(&n.mac.0)
                .state(NeighbourState::Permanent)
                .replace()
                .execute()
                .await
                .map_err(nl("replace neighbour")),
            Op::DelNeigh(n) => {
                let m = neigh_del_msg(AddressFamily::Inet, n.ifindex, n.ip, None);
                h.neighbours().del(m).execute().await.map_err(nl("delete neighbour"))
            }
            Op::AddFdb(e) => h
                .neighbours()
                .add_bridge(e.ifindex, &e.mac.0)
                .destination(IpAddr::V4(e.dst))
                .flags(NeighbourFlags::Own)
                .state(NeighbourState::Permanent)
                .replace()
                .execute()
                .await
                .map_err(nl("replace fdb entry")),
            Op::DelFdb(e) => {
                let mut m = neigh_del_msg(AddressFamily::Bridge, e.ifindex, e.dst, Some(e.mac));
                m.header.flags = NeighbourFlags::Own;
                h.neighbours().del(m).execute().await.map_err(nl("delete fdb entry"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_offload_is_kept_unless_the_bug_can_bite() {
        let (a, b) = (Ipv4Addr::new(192, 168, 56, 11), Ipv4Addr::new(203, 0, 113, 7));
        use ChecksumOffload::*;
        let cases = [
            (Auto, "6.18.44-fc-v669", a, a, true),
            (Auto, "5.7.0", a, a, true),
            (Auto, "5.10.0-28-amd64", a, a, true),
            (Auto, "5.6.19", a, a, false),
            (Auto, "4.19.0-26-amd64", a, a, false),
            (Auto, "garbage", a, a, false),
            (Auto, "6.1.0-13-amd64", b, a, false), // public IP is not the interface's: NAT
            (On, "4.19.0", b, a, true),
            (Off, "6.18.0", a, a, false),
        ];
        for (mode, release, public, iface, want) in cases {
            assert_eq!(
                keep_checksum_offload(mode, release, public, iface),
                want,
                "{mode:?} {release} {public} {iface}"
            );
        }
    }

    #[test]
    fn vtep_mac_is_stable_local_unicast_and_per_node() {
        let a = vtep_mac(Ipv4Addr::new(192, 168, 56, 11), 1);
        assert_eq!(a, vtep_mac(Ipv4Addr::new(192, 168, 56, 11), 1));
        assert_eq!(a.to_string(), "0e:01:c0:a8:38:0b");
        assert_eq!(a.0[0] & 0b11, 0b10, "locally administered, unicast");
        assert_ne!(a, vtep_mac(Ipv4Addr::new(192, 168, 56, 12), 1));
        assert_ne!(a, vtep_mac(Ipv4Addr::new(192, 168, 56, 11), 2));
    }

    #[test]
    fn spec_from_underlay_follows_flannel_defaults() {
        let u = Underlay { name: "eth0".into(), ifindex: 2, ip: Ipv4Addr::new(192, 168, 56, 11), mtu: 1500 };
        let s = VxlanSpec::new(&u, 1, 8472, "10.244.3.0/24".parse().unwrap());
        assert_eq!(s.name(), "flannel.1");
        assert_eq!((s.mtu, s.address, s.local_ip, s.underlay_ifindex), (1450, Ipv4Addr::new(10, 244, 3, 0), u.ip, 2));
    }
}
