//! The answer function: a query message and the current index → the response message, or "forward it".
//! Pure (no sockets, no clock): the server encodes what it returns, the tests call it with a table.
//! Authoritative for the cluster zone and the reverse zones of the configured networks; every other
//! name is the forwarder's.

use std::net::IpAddr;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME, NS, PTR, SOA, SRV, TXT};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use ipnetwork::IpNetwork;

use crate::index::{undashed, Config, Index, Rdata};

/// The UDP payload size this server announces and answers within (the DNS flag day 2020 value).
pub const MAX_UDP_PAYLOAD: u16 = 1232;

#[derive(Debug)]
pub enum Decision {
    /// Send this response.
    Reply(Message),
    /// Not ours: ask the upstream resolvers.
    Forward,
    /// Not a query (e.g. a response sent to us): say nothing.
    Drop,
}

/// Which of our zones a name falls in, and its apex.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Zone {
    Cluster,
    Reverse(String),
}

/// The reverse zone apex serving `name` (lowercase, no trailing dot), if a configured network owns it.
/// A network is served as zones on label boundaries: 10.96.0.0/12 as `96.10.in-addr.arpa` … `111.10…`.
pub fn reverse_zone(reverse: &[IpNetwork], name: &str) -> Option<String> {
    if let Some(rest) = name.strip_suffix(".in-addr.arpa") {
        let labels: Vec<&str> = rest.split('.').rev().collect();
        let octets: Vec<u8> = labels.iter().map_while(|l| l.parse::<u8>().ok()).collect();
        if octets.len() != labels.len() || octets.len() > 4 {
            return None;
        }
        for net in reverse {
            let IpNetwork::V4(n) = net else { continue };
            let k = usize::from(n.prefix()).div_ceil(8).max(1);
            if octets.len() < k {
                continue;
            }
            let mut o = [0u8; 4];
            o[..k].copy_from_slice(&octets[..k]);
            if n.contains(o.into()) {
                let apex: Vec<String> = octets[..k].iter().rev().map(u8::to_string).collect();
                return Some(format!("{}.in-addr.arpa", apex.join(".")));
            }
        }
        return None;
    }
    if let Some(rest) = name.strip_suffix(".ip6.arpa") {
        let labels: Vec<&str> = rest.split('.').rev().collect();
        let nibbles: Vec<u8> =
            labels.iter().map_while(|l| (l.len() == 1).then(|| u8::from_str_radix(l, 16).ok()).flatten()).collect();
        if nibbles.len() != labels.len() || nibbles.len() > 32 {
            return None;
        }
        for net in reverse {
            let IpNetwork::V6(n) = net else { continue };
            let k = usize::from(n.prefix()).div_ceil(4).max(1);
            if nibbles.len() < k {
                continue;
            }
            let mut o = [0u8; 16];
            for (i, nb) in nibbles[..k].iter().enumerate() {
                o[i / 2] |= if i % 2 == 0 { nb << 4 } else { *nb };
            }
            if n.contains(o.into()) {
                let apex: Vec<String> = nibbles[..k].iter().rev().map(|n| format!("{n:x}")).collect();
                return Some(format!("{}.ip6.arpa", apex.join(".")));
            }
        }
    }
    None
}

pub fn zone_of(cfg: &Config, name: &str) -> Option<Zone> {
    let z = cfg.zone.as_str();
    if name == z || (name.len() > z.len() && name.ends_with(z) && name.as_bytes()[name.len() - z.len() - 1] == b'.') {
        return Some(Zone::Cluster);
    }
    reverse_zone(&cfg.reverse, name).map(Zone::Reverse)
}

/// A name from the index (lowercase, no trailing dot) as a hickory `Name`.
fn fqdn(s: &str) -> Name {
    let mut n = Name::from_ascii(s).unwrap_or_else(|_| Name::root());
    n.set_fqdn(true);
    n
}

fn soa_rdata(cfg: &Config, serial: u32) -> RData {
    let zone = &cfg.zone;
    RData::SOA(SOA::new(
        fqdn(&format!("ns.dns.{zone}")),
        fqdn(&format!("hostmaster.{zone}")),
        serial,
        7200,
        1800,
        86400,
        cfg.ttl,
    ))
}

fn to_rdata(cfg: &Config, serial: u32, r: &Rdata) -> RData {
    match r {
        Rdata::A(ip) => RData::A(A(*ip)),
        Rdata::Aaaa(ip) => RData::AAAA(AAAA(*ip)),
        Rdata::Srv { priority, weight, port, target } => RData::SRV(SRV::new(*priority, *weight, *port, fqdn(target))),
        Rdata::Ptr(n) => RData::PTR(PTR(fqdn(n))),
        Rdata::Cname(n) => RData::CNAME(CNAME(fqdn(n))),
        Rdata::Txt(t) => RData::TXT(TXT::new(vec![t.to_string()])),
        Rdata::Soa => soa_rdata(cfg, serial),
        Rdata::Ns(n) => RData::NS(NS(fqdn(n))),
    }
}

fn rec(owner: &Name, ttl: u32, data: RData) -> Record {
    Record::from_rdata(owner.clone(), ttl, data)
}

fn matches(qtype: RecordType, r: &Rdata) -> bool {
    qtype == RecordType::ANY || u16::from(qtype) == r.rtype()
}

/// What the zone holds at a name: the index, plus the pod names computed from the name itself
/// (`a-b-c-d.<ns>.pod.<zone>`, CoreDNS's `pods insecure`).
fn records_at(cfg: &Config, index: &Index, name: &str) -> Option<Vec<Rdata>> {
    if let Some(rs) = index.get(name) {
        return Some(rs.to_vec());
    }
    let rel = name.strip_suffix(cfg.zone.as_str())?.strip_suffix('.')?;
    let labels: Vec<&str> = rel.split('.').collect();
    match labels.as_slice() {
        [_ns, "pod"] => Some(Vec::new()),
        [ip, _ns, "pod"] => match undashed(ip)? {
            IpAddr::V4(v4) => Some(vec![Rdata::A(v4)]),
            IpAddr::V6(v6) => Some(vec![Rdata::Aaaa(v6)]),
        },
        _ => None,
    }
}

/// The response skeleton for `req`: id, opcode, RD/CD copied, RA set, the question echoed, EDNS if asked.
fn skeleton(req: &Message) -> Message {
    let mut resp = Message::new();
    resp.set_id(req.id())
        .set_message_type(MessageType::Response)
        .set_op_code(req.op_code())
        .set_recursion_desired(req.recursion_desired())
        .set_checking_disabled(req.checking_disabled())
        .set_recursion_available(true);
    resp.add_queries(req.queries().iter().cloned());
    if req.extensions().is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(MAX_UDP_PAYLOAD).set_version(0);
        resp.set_edns(edns);
    }
    resp
}

/// Answers one query. `index` is `None` until the first full sync (then cluster names get SERVFAIL).
pub fn answer(cfg: &Config, index: Option<&Index>, req: &Message) -> Decision {
    if req.message_type() != MessageType::Query {
        return Decision::Drop;
    }
    let mut resp = skeleton(req);
    if req.extensions().as_ref().is_some_and(|e| e.version() > 0) {
        resp.set_response_code(ResponseCode::BADVERS);
        return Decision::Reply(resp);
    }
    if req.op_code() != OpCode::Query {
        resp.set_response_code(ResponseCode::NotImp);
        return Decision::Reply(resp);
    }
    let [q] = req.queries() else {
        resp.set_response_code(ResponseCode::FormErr);
        return Decision::Reply(resp);
    };
    let lower = q.name().to_lowercase().to_ascii();
    let name = lower.strip_suffix('.').unwrap_or(&lower);
    let Some(zone) = zone_of(cfg, name) else {
        return match q.query_type() {
            RecordType::AXFR | RecordType::IXFR => {
                resp.set_response_code(ResponseCode::Refused);
                Decision::Reply(resp)
            }
            _ => Decision::Forward,
        };
    };
    let qtype = q.query_type();
    if matches!(qtype, RecordType::AXFR | RecordType::IXFR) || !matches!(q.query_class(), DNSClass::IN | DNSClass::ANY)
    {
        resp.set_response_code(ResponseCode::Refused);
        return Decision::Reply(resp);
    }
    let Some(index) = index else {
        resp.set_response_code(ResponseCode::ServFail);
        return Decision::Reply(resp);
    };
    resp.set_authoritative(true);
    let apex = match &zone {
        Zone::Cluster => cfg.zone.clone(),
        Zone::Reverse(a) => a.clone(),
    };
    authoritative(cfg, index, q, name, &apex, &mut resp);
    Decision::Reply(resp)
}

fn authoritative(cfg: &Config, index: &Index, q: &Query, name: &str, apex: &str, resp: &mut Message) {
    let ttl = cfg.ttl;
    let serial = index.serial;
    let qtype = q.query_type();
    let negative = |resp: &mut Message, rcode: ResponseCode| {
        resp.set_response_code(rcode);
        resp.add_name_server(rec(&fqdn(apex), ttl, soa_rdata(cfg, serial)));
    };
    // A reverse zone's apex holds its SOA and NS (the cluster zone's are in the index).
    let reverse_apex = name == apex && apex != cfg.zone;
    let records = if reverse_apex {
        Some(vec![Rdata::Soa, Rdata::Ns(format!("ns.dns.{}", cfg.zone).into())])
    } else {
        records_at(cfg, index, name)
    };
    let Some(records) = records else {
        negative(resp, ResponseCode::NXDomain);
        return;
    };
    // A CNAME stands alone at its name: follow it while it stays in the cluster zone.
    let mut owner = q.name().clone();
    let mut records = records;
    for _ in 0..8 {
        let Some(Rdata::Cname(target)) = records.iter().find(|r| matches!(r, Rdata::Cname(_))).cloned() else {
            break;
        };
        if qtype == RecordType::CNAME || qtype == RecordType::ANY {
            break;
        }
        resp.add_answer(rec(&owner, ttl, RData::CNAME(CNAME(fqdn(&target)))));
        owner = fqdn(&target);
        match zone_of(cfg, &target) {
            Some(Zone::Cluster) => match records_at(cfg, index, &target) {
                Some(next) => records = next,
                None => {
                    negative(resp, ResponseCode::NXDomain);
                    return;
                }
            },
            // Out of our zone: the client's resolver follows it.
            _ => return,
        }
    }
    let mut answered = false;
    let mut glue: Vec<std::sync::Arc<str>> = Vec::new();
    for r in records.iter().filter(|r| matches(qtype, r)) {
        if let Rdata::Srv { target, .. } = r {
            if !glue.contains(target) {
                glue.push(target.clone());
            }
        }
        resp.add_answer(rec(&owner, ttl, to_rdata(cfg, serial, r)));
        answered = true;
    }
    if !answered {
        // NODATA: the name exists without this type.
        negative(resp, ResponseCode::NoError);
        return;
    }
    for target in glue {
        let Some(rs) = index.get(&target) else { continue };
        let owner = fqdn(&target);
        for r in rs.iter().filter(|r| matches!(r, Rdata::A(_) | Rdata::Aaaa(_))) {
            resp.add_additional(rec(&owner, ttl, to_rdata(cfg, serial, r)));
        }
    }
}

/// Encodes `resp` within `max` bytes: when the whole answer does not fit, the header with TC set, the
/// question and EDNS only (the client retries over TCP).
pub fn encode(resp: &Message, max: usize) -> Vec<u8> {
    match resp.to_vec() {
        Ok(b) if b.len() <= max => b,
        Ok(_) => resp.truncate().to_vec().unwrap_or_default(),
        Err(_) => {
            let mut m = Message::error_msg(resp.id(), resp.op_code(), ResponseCode::ServFail);
            m.add_queries(resp.queries().iter().cloned());
            m.to_vec().unwrap_or_default()
        }
    }
}

/// The largest UDP response `req` accepts: its EDNS payload size (within 512 and ours), else 512.
pub fn udp_limit(req: &Message) -> usize {
    match req.extensions() {
        Some(e) => usize::from(e.max_payload().clamp(512, MAX_UDP_PAYLOAD)),
        None => 512,
    }
}

/// A reply to bytes that do not parse as a message: FORMERR with their id when the header is there.
pub fn formerr(raw: &[u8]) -> Option<Vec<u8>> {
    if raw.len() < 12 || raw[2] & 0x80 != 0 {
        return None;
    }
    let id = u16::from_be_bytes([raw[0], raw[1]]);
    let op = OpCode::from_u8((raw[2] >> 3) & 0xf);
    Message::error_msg(id, op, ResponseCode::FormErr).to_vec().ok()
}
