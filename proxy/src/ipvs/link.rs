//! The dummy interface `weft-ipvs0` and its /32 service addresses, over a blocking rtnetlink socket
//! (netlink-packet-route messages, one request at a time). Touches only that interface, and reads the
//! namespace's addresses (the node addresses NodePorts listen on).

use std::collections::BTreeSet;
use std::io;
use std::net::{IpAddr, Ipv4Addr};

use netlink_packet_core::{
    NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

/// The dummy interface that holds every ClusterIP, externalIP and LB IP (kube-proxy's `kube-ipvs0`).
pub const DUMMY: &str = "weft-ipvs0";

#[derive(Debug, thiserror::Error)]
#[error("`{call}` failed: {source}")]
pub struct Error {
    pub call: String,
    #[source]
    pub source: io::Error,
}

impl Error {
    pub fn errno(&self) -> Option<i32> {
        self.source.raw_os_error()
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub struct RtSocket {
    sock: Socket,
    seq: u32,
}

impl RtSocket {
    pub fn connect() -> Result<RtSocket> {
        let err = |source| Error { call: "socket(NETLINK_ROUTE)".into(), source };
        let mut sock = Socket::new(NETLINK_ROUTE).map_err(err)?;
        sock.bind_auto().map_err(err)?;
        sock.connect(&SocketAddr::new(0, 0)).map_err(err)?;
        sock.set_rx_buf_sz(super::netlink::RCVBUF).map_err(err)?;
        Ok(RtSocket { sock, seq: 0 })
    }

    fn request(&mut self, msg: RouteNetlinkMessage, flags: u16, call: &str) -> Result<Vec<RouteNetlinkMessage>> {
        let fail = |source| Error { call: call.to_string(), source };
        self.seq = self.seq.wrapping_add(1);
        let buf = super::netlink::request_bytes(msg, flags, self.seq);
        self.sock.send(&buf, 0).map_err(fail)?;
        let mut out = Vec::new();
        loop {
            let (data, _) = self.sock.recv_from_full().map_err(fail)?;
            let mut offset = 0;
            while offset < data.len() {
                let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[offset..])
                    .map_err(|e| fail(io::Error::new(io::ErrorKind::InvalidData, e.to_string())))?;
                let len = reply.header.length as usize;
                if len == 0 {
                    return Err(fail(io::Error::new(io::ErrorKind::InvalidData, "zero-length netlink message")));
                }
                offset += (len + 3) & !3;
                if reply.header.sequence_number != self.seq {
                    continue;
                }
                match reply.payload {
                    NetlinkPayload::Error(e) if e.code.is_some() => return Err(fail(e.to_io())),
                    NetlinkPayload::Error(_) | NetlinkPayload::Done(_) => return Ok(out),
                    NetlinkPayload::InnerMessage(m) => out.push(m),
                    _ => {}
                }
            }
        }
    }

    /// The index of link `name`, if it exists.
    pub fn link_index(&mut self, name: &str) -> Result<Option<u32>> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        match self.request(
            RouteNetlinkMessage::GetLink(msg),
            NLM_F_REQUEST | NLM_F_ACK,
            &format!("ip link show {name}"),
        ) {
            Ok(replies) => Ok(replies.iter().find_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(l.header.index),
                _ => None,
            })),
            Err(e) if e.errno() == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Creates the dummy link (NOARP, left down as kube-proxy leaves kube-ipvs0) unless it exists.
    pub fn ensure_dummy(&mut self, name: &str) -> Result<u32> {
        if let Some(i) = self.link_index(name)? {
            return Ok(i);
        }
        let mut msg = LinkMessage::default();
        msg.header.flags = LinkFlags::Noarp;
        msg.header.change_mask = LinkFlags::Noarp;
        msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        msg.attributes.push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(InfoKind::Dummy)]));
        let call = format!("ip link add {name} type dummy");
        match self.request(
            RouteNetlinkMessage::NewLink(msg),
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
            &call,
        ) {
            Ok(_) => {}
            Err(e) if e.errno() == Some(libc::EEXIST) => {}
            Err(e) => return Err(e),
        }
        self.link_index(name)?.ok_or_else(|| Error { call, source: io::Error::from_raw_os_error(libc::ENODEV) })
    }

    pub fn delete_link(&mut self, index: u32, name: &str) -> Result<()> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        self.request(RouteNetlinkMessage::DelLink(msg), NLM_F_REQUEST | NLM_F_ACK, &format!("ip link del {name}"))
            .map(|_| ())
    }

    /// Every IPv4 address of the namespace, with its link index.
    pub fn addresses(&mut self) -> Result<Vec<(u32, Ipv4Addr)>> {
        let mut msg = AddressMessage::default();
        msg.header.family = AddressFamily::Inet;
        let replies =
            self.request(RouteNetlinkMessage::GetAddress(msg), NLM_F_REQUEST | NLM_F_DUMP, "ip -4 addr show")?;
        let mut out = Vec::new();
        for r in replies {
            if let RouteNetlinkMessage::NewAddress(a) = r {
                let local = a.attributes.iter().find_map(|x| match x {
                    AddressAttribute::Local(IpAddr::V4(ip)) => Some(*ip),
                    _ => None,
                });
                let addr = a.attributes.iter().find_map(|x| match x {
                    AddressAttribute::Address(IpAddr::V4(ip)) => Some(*ip),
                    _ => None,
                });
                if let Some(ip) = local.or(addr) {
                    out.push((a.header.index, ip));
                }
            }
        }
        Ok(out)
    }

    fn address_msg(index: u32, ip: Ipv4Addr) -> AddressMessage {
        let mut msg = AddressMessage::default();
        msg.header.family = AddressFamily::Inet;
        msg.header.prefix_len = 32;
        msg.header.index = index;
        msg.attributes.push(AddressAttribute::Local(IpAddr::V4(ip)));
        msg.attributes.push(AddressAttribute::Address(IpAddr::V4(ip)));
        msg
    }

    /// Adds (`add`) or deletes addresses on link `index` in few system calls; "exists" on an add and
    /// "not there" on a delete count as done.
    pub fn addresses_batch(&mut self, index: u32, ips: &[Ipv4Addr], add: bool) -> Result<()> {
        let requests: Vec<(u32, Vec<u8>)> = ips
            .iter()
            .map(|ip| {
                self.seq = self.seq.wrapping_add(1);
                let msg = Self::address_msg(index, *ip);
                let (msg, flags) = if add {
                    (RouteNetlinkMessage::NewAddress(msg), NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL)
                } else {
                    (RouteNetlinkMessage::DelAddress(msg), NLM_F_REQUEST | NLM_F_ACK)
                };
                (self.seq, super::netlink::request_bytes(msg, flags, self.seq))
            })
            .collect();
        let verb = if add { "add" } else { "del" };
        let codes = super::netlink::send_batch(&self.sock, &requests)
            .map_err(|source| Error { call: format!("ip addr {verb} (batch)"), source })?;
        for (code, ip) in codes.into_iter().zip(ips) {
            let ok = code == 0 || (add && -code == libc::EEXIST) || (!add && -code == libc::EADDRNOTAVAIL);
            if !ok {
                return Err(Error {
                    call: format!("ip addr {verb} {ip}/32 dev {DUMMY}"),
                    source: io::Error::from_raw_os_error(-code),
                });
            }
        }
        Ok(())
    }
}

/// Addresses on link `index`, and every other address of the namespace.
pub fn split_addresses(all: &[(u32, Ipv4Addr)], index: Option<u32>) -> (BTreeSet<Ipv4Addr>, Vec<Ipv4Addr>) {
    let mut on = BTreeSet::new();
    let mut others = Vec::new();
    for (i, ip) in all {
        if Some(*i) == index {
            on.insert(*ip);
        } else {
            others.push(*ip);
        }
    }
    (on, others)
}
