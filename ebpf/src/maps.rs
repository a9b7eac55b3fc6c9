//! `#[repr(C)]` mirrors of `bpf/lb.h`, one per map key and value (checked against the object's BTF by
//! `tests/layout.rs`), and the plain-data view of the LB maps the proxy plans against. No I/O here.

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;

/// Entries of every LB map unless `--bpf-lb-map-max` says otherwise (`LB_MAP_MAX_DEFAULT`).
pub const LB_MAP_MAX_DEFAULT: u32 = 131_072;

pub const LB_FLAG_AFFINITY: u16 = 1 << 0;
pub const LB_FLAG_LOCAL_ONLY: u16 = 1 << 1;
pub const LB_SCOPE_SOCKET: u8 = 0;
pub const LB_SCOPE_NODEPORT: u8 = 1;
pub const LB_BE_LOCAL: u8 = 1 << 0;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// Map names, as in the object and under the pin directory.
pub const MAP_SERVICES: &str = "weft_lb_svc";
pub const MAP_BACKENDS: &str = "weft_lb_be";
pub const MAP_AFFINITY: &str = "weft_lb_aff";
pub const MAP_REVNAT: &str = "weft_lb_rnat";
pub const MAP_CT: &str = "weft_lb_ct";
pub const MAPS: [&str; 5] = [MAP_SERVICES, MAP_BACKENDS, MAP_AFFINITY, MAP_REVNAT, MAP_CT];

/// `struct lb_svc_key`: one frontend (address, port, protocol, scope). Address and port in network order.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct SvcKey {
    pub vip: u32,
    pub port: u16,
    pub proto: u8,
    pub scope: u8,
}

/// `struct lb_svc_val`
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct SvcVal {
    pub id: u32,
    pub count: u16,
    pub flags: u16,
    pub affinity_secs: u32,
}

/// `struct lb_backend_key`
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct BackendKey {
    pub id: u32,
    pub slot: u32,
}

/// `struct lb_backend`
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Backend {
    pub ip: u32,
    pub port: u16,
    pub flags: u8,
    pub pad: u8,
}

/// `struct lb_affinity_key`
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct AffinityKey {
    pub netns_cookie: u64,
    pub id: u32,
    pub pad: u32,
}

/// `struct lb_affinity_val`
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct AffinityVal {
    pub last_used_ns: u64,
    pub ip: u32,
    pub port: u16,
    pub slot: u16,
}

/// `struct lb_rnat_key`
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct RevNatKey {
    pub cookie: u64,
    pub ip: u32,
    pub port: u16,
    pub pad: u16,
}

/// `struct lb_rnat_val`
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct RevNatVal {
    pub vip: u32,
    pub port: u16,
    pub pad: u16,
}

/// `struct lb_ct_key`: one direction of a north-south connection.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct CtKey {
    pub src: u32,
    pub dst: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub dir: u8,
    pub pad: u16,
}

/// `struct lb_ct_val`
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct CtVal {
    pub addr1: u32,
    pub addr2: u32,
    pub port1: u16,
    pub port2: u16,
    pub snat: u8,
    pub pad: [u8; 3],
}

// SAFETY: plain #[repr(C)] integers with explicit padding fields: every bit pattern is valid.
unsafe impl aya::Pod for SvcKey {}
unsafe impl aya::Pod for SvcVal {}
unsafe impl aya::Pod for BackendKey {}
unsafe impl aya::Pod for Backend {}
unsafe impl aya::Pod for AffinityKey {}
unsafe impl aya::Pod for AffinityVal {}
unsafe impl aya::Pod for RevNatKey {}
unsafe impl aya::Pod for RevNatVal {}
unsafe impl aya::Pod for CtKey {}
unsafe impl aya::Pod for CtVal {}

/// (Rust type, C struct, size, [(field, offset)]) for the layout test.
pub type Layout = (&'static str, usize, Vec<(&'static str, usize)>);

macro_rules! layout {
    ($c:literal, $t:ty, [$($f:ident),*]) => {
        ($c, std::mem::size_of::<$t>(), vec![$((stringify!($f), std::mem::offset_of!($t, $f))),*])
    };
}

/// Every mirrored struct's C name, size and field offsets, as Rust lays them out.
pub fn layouts() -> Vec<Layout> {
    vec![
        layout!("lb_svc_key", SvcKey, [vip, port, proto, scope]),
        layout!("lb_svc_val", SvcVal, [id, count, flags, affinity_secs]),
        layout!("lb_backend_key", BackendKey, [id, slot]),
        layout!("lb_backend", Backend, [ip, port, flags, pad]),
        layout!("lb_affinity_key", AffinityKey, [netns_cookie, id, pad]),
        layout!("lb_affinity_val", AffinityVal, [last_used_ns, ip, port, slot]),
        layout!("lb_rnat_key", RevNatKey, [cookie, ip, port, pad]),
        layout!("lb_rnat_val", RevNatVal, [vip, port, pad]),
        layout!("lb_ct_key", CtKey, [src, dst, sport, dport, proto, dir, pad]),
        layout!("lb_ct_val", CtVal, [addr1, addr2, port1, port2, snat, pad]),
    ]
}

impl SvcKey {
    /// A frontend from host-order values.
    pub fn new(vip: Ipv4Addr, port: u16, proto: u8, scope: u8) -> SvcKey {
        SvcKey { vip: u32::from(vip).to_be(), port: port.to_be(), proto, scope }
    }
    pub fn addr(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from_be(self.vip))
    }
    pub fn host_port(&self) -> u16 {
        u16::from_be(self.port)
    }
}

impl Backend {
    pub fn new(ip: Ipv4Addr, port: u16, local: bool) -> Backend {
        Backend { ip: u32::from(ip).to_be(), port: port.to_be(), flags: if local { LB_BE_LOCAL } else { 0 }, pad: 0 }
    }
    pub fn addr(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from_be(self.ip))
    }
    pub fn host_port(&self) -> u16 {
        u16::from_be(self.port)
    }
}

fn proto_name(p: u8) -> String {
    match p {
        IPPROTO_TCP => "tcp".into(),
        IPPROTO_UDP => "udp".into(),
        p => format!("proto-{p}"),
    }
}

/// `10.96.0.1:80/tcp` (node ports: `*:30080/tcp nodeport`).
impl fmt::Display for SvcKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scope = if self.scope == LB_SCOPE_NODEPORT { " nodeport" } else { "" };
        if self.vip == 0 && self.scope == LB_SCOPE_NODEPORT {
            write!(f, "*:{}/{}{scope}", self.host_port(), proto_name(self.proto))
        } else {
            write!(f, "{}:{}/{}{scope}", self.addr(), self.host_port(), proto_name(self.proto))
        }
    }
}

/// `id=3 count=2 flags=affinity affinity=10800s`
impl fmt::Display for SvcVal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "id={} count={}", self.id, self.count)?;
        if self.flags & LB_FLAG_AFFINITY != 0 {
            write!(f, " affinity={}s", self.affinity_secs)?;
        }
        if self.flags & LB_FLAG_LOCAL_ONLY != 0 {
            write!(f, " local-only")?;
        }
        Ok(())
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.addr(), self.host_port())?;
        if self.flags & LB_BE_LOCAL != 0 {
            write!(f, " local")?;
        }
        Ok(())
    }
}

/// The contents of the services and backends maps as plain data: what the kernel holds (dumped) or
/// what the proxy wants (planned). The affinity and reverse-NAT maps are the datapath's own (LRU).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MapState {
    pub services: BTreeMap<SvcKey, SvcVal>,
    pub backends: BTreeMap<BackendKey, Backend>,
}

impl MapState {
    /// One line per entry, services then backends, sorted: the golden-file form (and `weft services`').
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut services: Vec<_> = self.services.iter().collect();
        services.sort_by_key(|(k, _)| (k.scope, k.addr(), k.host_port(), k.proto));
        for (k, v) in services {
            out.push_str(&format!("svc {k} -> {v}\n"));
        }
        for (k, v) in &self.backends {
            out.push_str(&format!("be {}/{} -> {v}\n", k.id, k.slot));
        }
        out
    }
}

/// One map write, in the order the loader must apply them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapOp {
    PutBackend(BackendKey, Backend),
    PutService(SvcKey, SvcVal),
    DeleteBackend(BackendKey),
    DeleteService(SvcKey),
}

impl MapOp {
    pub fn map(&self) -> &'static str {
        match self {
            MapOp::PutBackend(..) | MapOp::DeleteBackend(_) => MAP_BACKENDS,
            MapOp::PutService(..) | MapOp::DeleteService(_) => MAP_SERVICES,
        }
    }
}

impl fmt::Display for MapOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MapOp::PutBackend(k, v) => write!(f, "put be {}/{} {v}", k.id, k.slot),
            MapOp::PutService(k, v) => write!(f, "put svc {k} {v}"),
            MapOp::DeleteBackend(k) => write!(f, "del be {}/{}", k.id, k.slot),
            MapOp::DeleteService(k) => write!(f, "del svc {k}"),
        }
    }
}

/// Applies ops to a `MapState`, as the kernel maps would (for plans checked without a kernel).
impl MapState {
    pub fn apply(&mut self, op: &MapOp) {
        match *op {
            MapOp::PutBackend(k, v) => {
                self.backends.insert(k, v);
            }
            MapOp::PutService(k, v) => {
                self.services.insert(k, v);
            }
            MapOp::DeleteBackend(k) => {
                self.backends.remove(&k);
            }
            MapOp::DeleteService(k) => {
                self.services.remove(&k);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_hold_network_order_and_print_host_order() {
        let k = SvcKey::new(Ipv4Addr::new(10, 96, 0, 1), 80, IPPROTO_TCP, LB_SCOPE_SOCKET);
        assert_eq!(k.vip.to_ne_bytes(), [10, 96, 0, 1]);
        assert_eq!(k.port.to_ne_bytes(), [0, 80]);
        assert_eq!(k.to_string(), "10.96.0.1:80/tcp");
        let b = Backend::new(Ipv4Addr::new(10, 244, 1, 5), 9376, true);
        assert_eq!(b.to_string(), "10.244.1.5:9376 local");
        let v = SvcVal { id: 3, count: 2, flags: LB_FLAG_AFFINITY, affinity_secs: 60 };
        assert_eq!(v.to_string(), "id=3 count=2 affinity=60s");
    }
}
