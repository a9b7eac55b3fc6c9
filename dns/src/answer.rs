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

/// The target of a CNAME chain that left our zones without reaching the asked type (an ExternalName
/// service asked for A or AAAA): the server asks the upstream resolvers for it, as CoreDNS does, because stub
/// resolvers do not follow a CNAME themselves.
pub fn external_target(cfg: &Config, resp: &Message) -> Option<Name> {
    let q = resp.query()?;
    if resp.response_code() != ResponseCode::NoError
        || matches!(q.query_type(), RecordType::CNAME | RecordType::ANY)
        || resp.answers().iter().any(|r| r.record_type() == q.query_type())
    {
        return None;
    }
    let RData::CNAME(target) = resp.answers().last()?.data() else { return None };
    let lower = target.0.to_lowercase().to_ascii();
    zone_of(cfg, lower.trim_end_matches('.')).is_none().then(|| target.0.clone())
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

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Endpoints, Pod, Service};
    use std::sync::Arc;

    fn obj<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Arc<T> {
        Arc::new(serde_json::from_value(v).unwrap())
    }

    fn svc(name: &str, spec: serde_json::Value) -> Arc<Service> {
        obj(serde_json::json!({"metadata": {"name": name, "namespace": "default"}, "spec": spec}))
    }

    /// The cluster every case below asks about.
    fn fixture() -> (Config, Index) {
        let cfg = Config::new(
            "cluster.local",
            30,
            vec!["10.96.0.0/12".parse().unwrap(), "10.244.0.0/16".parse().unwrap(), "fd00:96::/112".parse().unwrap()],
        );
        let http = serde_json::json!([{"name": "http", "port": 80, "protocol": "TCP"}, {"name": "dns", "port": 53, "protocol": "UDP"}]);
        let services = vec![
            svc("web", serde_json::json!({"clusterIP": "10.96.0.20", "ports": http})),
            svc(
                "v6",
                serde_json::json!({"clusterIP": "fd00:96::20", "clusterIPs": ["fd00:96::20"], "ports": [{"port": 80}]}),
            ),
            svc("dual", serde_json::json!({"clusterIP": "10.96.0.21", "clusterIPs": ["10.96.0.21", "fd00:96::21"]})),
            svc("hl", serde_json::json!({"clusterIP": "None", "ports": [{"name": "http", "port": 80}]})),
            svc("hlpub", serde_json::json!({"clusterIP": "None", "publishNotReadyAddresses": true})),
            svc("empty", serde_json::json!({"clusterIP": "None"})),
            svc("ext", serde_json::json!({"type": "ExternalName", "externalName": "example.com"})),
            svc("alias", serde_json::json!({"type": "ExternalName", "externalName": "web.default.svc.cluster.local."})),
        ];
        let ep = |name: &str, subsets: serde_json::Value| -> Arc<Endpoints> {
            obj(serde_json::json!({"metadata": {"name": name, "namespace": "default"}, "subsets": subsets}))
        };
        let endpoints = vec![
            ep(
                "hl",
                serde_json::json!([{
                    "addresses": [{"ip": "10.244.1.5"}, {"ip": "10.244.2.6", "hostname": "db-0"}],
                    "notReadyAddresses": [{"ip": "10.244.3.7"}],
                    "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]
                }]),
            ),
            ep("hlpub", serde_json::json!([{"notReadyAddresses": [{"ip": "10.244.3.8"}]}])),
            ep("empty", serde_json::json!([{"notReadyAddresses": [{"ip": "10.244.3.9"}]}])),
        ];
        let pods: Vec<Arc<Pod>> = vec![obj(serde_json::json!({
            "metadata": {"name": "p1", "namespace": "default"},
            "spec": {"hostname": "p1", "subdomain": "hl", "containers": []},
            "status": {"podIP": "10.244.1.9", "conditions": [{"type": "Ready", "status": "True"}]}
        }))];
        let index = crate::index::build(&cfg, &services, &endpoints, &pods, 7);
        (cfg, index)
    }

    fn ask(cfg: &Config, index: Option<&Index>, name: &str, t: RecordType) -> Decision {
        let mut req = Message::new();
        req.set_id(42).set_recursion_desired(true).add_query(Query::query(Name::from_ascii(name).unwrap(), t));
        answer(cfg, index, &req)
    }

    fn show(rs: &[Record]) -> Vec<String> {
        rs.iter().map(|r| format!("{} {} {} {}", r.name(), r.ttl(), r.record_type(), r.data())).collect()
    }

    /// (name, type, rcode, answer, authority, additional)
    type Case = (&'static str, RecordType, ResponseCode, Vec<&'static str>, Vec<&'static str>, Vec<&'static str>);

    const ZONE_SOA: &str = "cluster.local. 30 SOA ns.dns.cluster.local. hostmaster.cluster.local. 7 7200 1800 86400 30";

    #[test]
    fn answers_follow_the_specification() {
        let (cfg, index) = fixture();
        use RecordType::*;
        // (name, type, rcode, answer, authority, additional)
        let table: Vec<Case> = vec![
            ("dns-version.cluster.local.", TXT, ResponseCode::NoError, vec!["dns-version.cluster.local. 30 TXT 1.1.0"], vec![], vec![]),
            ("web.default.svc.cluster.local.", A, ResponseCode::NoError, vec!["web.default.svc.cluster.local. 30 A 10.96.0.20"], vec![], vec![]),
            // Case-insensitive, the asker's case kept.
            ("WeB.Default.SVC.cluster.local.", A, ResponseCode::NoError, vec!["WeB.Default.SVC.cluster.local. 30 A 10.96.0.20"], vec![], vec![]),
            ("web.default.svc.cluster.local.", AAAA, ResponseCode::NoError, vec![], vec![ZONE_SOA], vec![]),
            ("v6.default.svc.cluster.local.", AAAA, ResponseCode::NoError, vec!["v6.default.svc.cluster.local. 30 AAAA fd00:96::20"], vec![], vec![]),
            ("dual.default.svc.cluster.local.", A, ResponseCode::NoError, vec!["dual.default.svc.cluster.local. 30 A 10.96.0.21"], vec![], vec![]),
            ("dual.default.svc.cluster.local.", AAAA, ResponseCode::NoError, vec!["dual.default.svc.cluster.local. 30 AAAA fd00:96::21"], vec![], vec![]),
            (
                "_http._tcp.web.default.svc.cluster.local.", SRV, ResponseCode::NoError,
                vec!["_http._tcp.web.default.svc.cluster.local. 30 SRV 0 100 80 web.default.svc.cluster.local."],
                vec![], vec!["web.default.svc.cluster.local. 30 A 10.96.0.20"],
            ),
            (
                "_dns._udp.web.default.svc.cluster.local.", SRV, ResponseCode::NoError,
                vec!["_dns._udp.web.default.svc.cluster.local. 30 SRV 0 100 53 web.default.svc.cluster.local."],
                vec![], vec!["web.default.svc.cluster.local. 30 A 10.96.0.20"],
            ),
            ("_dns._tcp.web.default.svc.cluster.local.", SRV, ResponseCode::NXDomain, vec![], vec![ZONE_SOA], vec![]),
            // _tcp.<svc> exists (an empty non-terminal above the SRV name).
            ("_tcp.web.default.svc.cluster.local.", SRV, ResponseCode::NoError, vec![], vec![ZONE_SOA], vec![]),
            ("20.0.96.10.in-addr.arpa.", PTR, ResponseCode::NoError, vec!["20.0.96.10.in-addr.arpa. 30 PTR web.default.svc.cluster.local."], vec![], vec![]),
            (
                "1.2.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.6.9.0.0.0.0.d.f.ip6.arpa.", PTR, ResponseCode::NoError,
                vec!["1.2.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.6.9.0.0.0.0.d.f.ip6.arpa. 30 PTR dual.default.svc.cluster.local."],
                vec![], vec![],
            ),
            (
                "99.0.96.10.in-addr.arpa.", PTR, ResponseCode::NXDomain, vec![],
                vec!["96.10.in-addr.arpa. 30 SOA ns.dns.cluster.local. hostmaster.cluster.local. 7 7200 1800 86400 30"], vec![],
            ),
            // Headless: every ready endpoint, not the unready one.
            (
                "hl.default.svc.cluster.local.", A, ResponseCode::NoError,
                vec!["hl.default.svc.cluster.local. 30 A 10.244.1.5", "hl.default.svc.cluster.local. 30 A 10.244.2.6"], vec![], vec![],
            ),
            ("db-0.hl.default.svc.cluster.local.", A, ResponseCode::NoError, vec!["db-0.hl.default.svc.cluster.local. 30 A 10.244.2.6"], vec![], vec![]),
            ("10-244-1-5.hl.default.svc.cluster.local.", A, ResponseCode::NoError, vec!["10-244-1-5.hl.default.svc.cluster.local. 30 A 10.244.1.5"], vec![], vec![]),
            ("10-244-3-7.hl.default.svc.cluster.local.", A, ResponseCode::NXDomain, vec![], vec![ZONE_SOA], vec![]),
            (
                "_http._tcp.hl.default.svc.cluster.local.", SRV, ResponseCode::NoError,
                vec![
                    "_http._tcp.hl.default.svc.cluster.local. 30 SRV 0 50 8080 10-244-1-5.hl.default.svc.cluster.local.",
                    "_http._tcp.hl.default.svc.cluster.local. 30 SRV 0 50 8080 db-0.hl.default.svc.cluster.local.",
                ],
                vec![],
                vec!["10-244-1-5.hl.default.svc.cluster.local. 30 A 10.244.1.5", "db-0.hl.default.svc.cluster.local. 30 A 10.244.2.6"],
            ),
            ("6.2.244.10.in-addr.arpa.", PTR, ResponseCode::NoError, vec!["6.2.244.10.in-addr.arpa. 30 PTR db-0.hl.default.svc.cluster.local."], vec![], vec![]),
            ("hlpub.default.svc.cluster.local.", A, ResponseCode::NoError, vec!["hlpub.default.svc.cluster.local. 30 A 10.244.3.8"], vec![], vec![]),
            // Headless without a ready endpoint: no such name.
            ("empty.default.svc.cluster.local.", A, ResponseCode::NXDomain, vec![], vec![ZONE_SOA], vec![]),
            // hostname + subdomain naming a headless service.
            ("p1.hl.default.svc.cluster.local.", A, ResponseCode::NoError, vec!["p1.hl.default.svc.cluster.local. 30 A 10.244.1.9"], vec![], vec![]),
            ("ext.default.svc.cluster.local.", A, ResponseCode::NoError, vec!["ext.default.svc.cluster.local. 30 CNAME example.com."], vec![], vec![]),
            ("ext.default.svc.cluster.local.", CNAME, ResponseCode::NoError, vec!["ext.default.svc.cluster.local. 30 CNAME example.com."], vec![], vec![]),
            (
                "alias.default.svc.cluster.local.", A, ResponseCode::NoError,
                vec!["alias.default.svc.cluster.local. 30 CNAME web.default.svc.cluster.local.", "web.default.svc.cluster.local. 30 A 10.96.0.20"],
                vec![], vec![],
            ),
            ("10-244-3-4.kube-system.pod.cluster.local.", A, ResponseCode::NoError, vec!["10-244-3-4.kube-system.pod.cluster.local. 30 A 10.244.3.4"], vec![], vec![]),
            ("fd00--1.default.pod.cluster.local.", AAAA, ResponseCode::NoError, vec!["fd00--1.default.pod.cluster.local. 30 AAAA fd00::1"], vec![], vec![]),
            ("10-244-3-4.kube-system.pod.cluster.local.", AAAA, ResponseCode::NoError, vec![], vec![ZONE_SOA], vec![]),
            ("web.default.pod.cluster.local.", A, ResponseCode::NXDomain, vec![], vec![ZONE_SOA], vec![]),
            ("default.svc.cluster.local.", A, ResponseCode::NoError, vec![], vec![ZONE_SOA], vec![]),
            ("svc.cluster.local.", A, ResponseCode::NoError, vec![], vec![ZONE_SOA], vec![]),
            ("nothere.default.svc.cluster.local.", A, ResponseCode::NXDomain, vec![], vec![ZONE_SOA], vec![]),
            ("web.nons.svc.cluster.local.", A, ResponseCode::NXDomain, vec![], vec![ZONE_SOA], vec![]),
            ("a.b.web.default.svc.cluster.local.", A, ResponseCode::NXDomain, vec![], vec![ZONE_SOA], vec![]),
            ("cluster.local.", SOA, ResponseCode::NoError, vec![ZONE_SOA], vec![], vec![]),
            ("cluster.local.", NS, ResponseCode::NoError, vec!["cluster.local. 30 NS ns.dns.cluster.local."], vec![], vec![]),
            ("cluster.local.", AXFR, ResponseCode::Refused, vec![], vec![], vec![]),
            ("cluster.local.", IXFR, ResponseCode::Refused, vec![], vec![], vec![]),
        ];
        let mut failures = Vec::new();
        for (name, t, rcode, ans, auth, add) in &table {
            let Decision::Reply(resp) = ask(&cfg, Some(&index), name, *t) else {
                failures.push(format!("{name} {t}: not answered"));
                continue;
            };
            let got = (resp.response_code(), show(resp.answers()), show(resp.name_servers()), show(resp.additionals()));
            let want = (
                *rcode,
                ans.iter().map(|s| s.to_string()).collect(),
                auth.iter().map(|s| s.to_string()).collect(),
                add.iter().map(|s| s.to_string()).collect(),
            );
            if got != want {
                failures.push(format!("{name} {t}:\n  got  {got:?}\n  want {want:?}"));
            }
            assert_eq!(resp.id(), 42);
            assert!(resp.recursion_desired() && resp.recursion_available());
            assert_eq!(resp.authoritative(), *rcode != ResponseCode::Refused, "{name} {t}");
        }
        assert!(failures.is_empty(), "{} of {} cases differ:\n{}", failures.len(), table.len(), failures.join("\n"));
    }

    #[test]
    fn cname_chains_leaving_the_zone_are_followed_upstream() {
        let (cfg, index) = fixture();
        let reply = |name: &str, t| match ask(&cfg, Some(&index), name, t) {
            Decision::Reply(r) => r,
            d => panic!("{d:?}"),
        };
        let ext = reply("ext.default.svc.cluster.local.", RecordType::A);
        assert_eq!(external_target(&cfg, &ext).map(|n| n.to_ascii()), Some("example.com.".into()));
        assert_eq!(external_target(&cfg, &reply("ext.default.svc.cluster.local.", RecordType::CNAME)), None);
        assert_eq!(external_target(&cfg, &reply("alias.default.svc.cluster.local.", RecordType::A)), None);
        assert_eq!(external_target(&cfg, &reply("web.default.svc.cluster.local.", RecordType::A)), None);
    }

    #[test]
    fn other_names_are_forwarded_and_cluster_names_wait_for_the_first_sync() {
        let (cfg, index) = fixture();
        assert!(matches!(ask(&cfg, Some(&index), "example.com.", RecordType::A), Decision::Forward));
        assert!(matches!(ask(&cfg, Some(&index), "notcluster.local.", RecordType::A), Decision::Forward));
        // Reverse names outside our networks are someone else's.
        assert!(matches!(ask(&cfg, Some(&index), "1.0.0.127.in-addr.arpa.", RecordType::PTR), Decision::Forward));
        let Decision::Reply(r) = ask(&cfg, None, "web.default.svc.cluster.local.", RecordType::A) else { panic!() };
        assert_eq!(r.response_code(), ResponseCode::ServFail);
        let Decision::Reply(r) = ask(&cfg, Some(&index), "example.com.", RecordType::AXFR) else { panic!() };
        assert_eq!(r.response_code(), ResponseCode::Refused);
    }

    #[test]
    fn reverse_zones_follow_label_boundaries() {
        let nets: Vec<IpNetwork> =
            vec!["10.96.0.0/12".parse().unwrap(), "10.244.0.0/16".parse().unwrap(), "fd00:96::/112".parse().unwrap()];
        for (name, want) in [
            ("1.0.96.10.in-addr.arpa", Some("96.10.in-addr.arpa")),
            ("1.0.111.10.in-addr.arpa", Some("111.10.in-addr.arpa")),
            ("1.0.112.10.in-addr.arpa", None),
            ("96.10.in-addr.arpa", Some("96.10.in-addr.arpa")),
            ("10.in-addr.arpa", None),
            ("5.1.244.10.in-addr.arpa", Some("244.10.in-addr.arpa")),
            ("x.1.244.10.in-addr.arpa", None),
            (
                "1.2.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.6.9.0.0.0.0.d.f.ip6.arpa",
                Some("0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.6.9.0.0.0.0.d.f.ip6.arpa"),
            ),
            ("1.ip6.arpa", None),
        ] {
            assert_eq!(reverse_zone(&nets, name).as_deref(), want, "{name}");
        }
    }

    #[test]
    fn edns_truncation_and_errors() {
        let (cfg, _) = fixture();
        // 200 ready endpoints: far more than 512 bytes of A records.
        let addrs: Vec<serde_json::Value> =
            (0..200).map(|i| serde_json::json!({"ip": format!("10.244.{}.{}", i / 200, i % 200 + 1)})).collect();
        let services = vec![svc("big", serde_json::json!({"clusterIP": "None"}))];
        let eps: Vec<Arc<Endpoints>> = vec![obj(
            serde_json::json!({"metadata": {"name": "big", "namespace": "default"}, "subsets": [{"addresses": addrs}]}),
        )];
        let index = crate::index::build(&cfg, &services, &eps, &[], 1);
        let mut req = Message::new();
        req.set_id(9)
            .add_query(Query::query(Name::from_ascii("big.default.svc.cluster.local.").unwrap(), RecordType::A));
        let Decision::Reply(resp) = answer(&cfg, Some(&index), &req) else { panic!() };
        assert_eq!(resp.answers().len(), 200);
        let udp = Message::from_vec(&encode(&resp, udp_limit(&req))).unwrap();
        assert!(udp.truncated() && udp.answers().is_empty(), "over UDP without EDNS: truncated");
        let tcp = Message::from_vec(&encode(&resp, 65535)).unwrap();
        assert!(!tcp.truncated() && tcp.answers().len() == 200, "over TCP: everything");
        let mut edns = Edns::new();
        edns.set_max_payload(4096);
        req.set_edns(edns);
        assert_eq!(udp_limit(&req), usize::from(MAX_UDP_PAYLOAD));
        let Decision::Reply(resp) = answer(&cfg, Some(&index), &req) else { panic!() };
        assert_eq!(resp.extensions().as_ref().map(|e| e.max_payload()), Some(MAX_UDP_PAYLOAD));
        // EDNS version 1: BADVERS.
        req.extensions_mut().as_mut().unwrap().set_version(1);
        let Decision::Reply(resp) = answer(&cfg, Some(&index), &req) else { panic!() };
        let back = Message::from_vec(&resp.to_vec().unwrap()).unwrap();
        // BADVERS and BADSIG share the code 16; hickory names it BADSIG when reading.
        assert_eq!(u16::from(back.response_code()), 16);
        // Not a query, garbage, and a header alone.
        assert!(formerr(&[1, 2, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0]).is_none(), "a response gets no answer");
        assert!(formerr(&[1, 2, 3]).is_none());
        let f = Message::from_vec(&formerr(&[1, 2, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xff]).unwrap()).unwrap();
        assert_eq!((f.id(), f.response_code()), (0x0102, ResponseCode::FormErr));
    }
}
