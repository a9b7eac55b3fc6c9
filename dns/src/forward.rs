//! The forwarder for every name outside our zones: the upstream resolvers in order, each within a bounded
//! time (the whole exchange never exceeds `timeout`, then SERVFAIL), over UDP and over TCP when the answer
//! was truncated and the client asked over TCP; and a bounded cache of answers keyed by question, with
//! the clock passed in so expiry is tested without waiting.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::RecordType;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

/// The longest an answer is kept, whatever its TTL says; negative answers at most `NEGATIVE_MAX`.
const POSITIVE_MAX: Duration = Duration::from_secs(3600);
const NEGATIVE_MAX: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    /// Lowercase, with the trailing dot.
    name: String,
    qtype: u16,
    qclass: u16,
    dnssec_ok: bool,
}

impl Key {
    pub fn of(req: &Message) -> Option<Key> {
        let q = req.query()?;
        Some(Key {
            name: q.name().to_lowercase().to_ascii(),
            qtype: q.query_type().into(),
            qclass: q.query_class().into(),
            dnssec_ok: req.extensions().as_ref().is_some_and(|e| e.flags().dnssec_ok),
        })
    }
}

struct Entry {
    msg: Message,
    stored: Instant,
    ttl: Duration,
}

/// A bounded answer cache: at most `cap` entries; when full, expired entries go first, then arbitrary ones.
pub struct Cache {
    map: HashMap<Key, Entry>,
    cap: usize,
}

/// How long an upstream answer may be cached: the smallest TTL among its records (the SOA minimum for
/// negative answers, RFC 2308); `None` for answers not to cache (errors, truncated).
pub fn cache_ttl(msg: &Message) -> Option<Duration> {
    if msg.truncated() {
        return None;
    }
    match msg.response_code() {
        ResponseCode::NoError if !msg.answers().is_empty() => {
            let ttl = msg.answers().iter().chain(msg.additionals()).map(|r| r.ttl()).min().unwrap_or(0);
            Some(Duration::from_secs(ttl.into()).min(POSITIVE_MAX))
        }
        ResponseCode::NoError | ResponseCode::NXDomain => {
            let soa = msg.name_servers().iter().find(|r| r.record_type() == RecordType::SOA)?;
            let min = match soa.data() {
                hickory_proto::rr::RData::SOA(s) => s.minimum().min(soa.ttl()),
                _ => soa.ttl(),
            };
            Some(Duration::from_secs(min.into()).min(NEGATIVE_MAX))
        }
        _ => None,
    }
}

impl Cache {
    pub fn new(cap: usize) -> Cache {
        Cache { map: HashMap::new(), cap }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The cached answer for `req` as of `now`, its TTLs counted down, its id and question `req`'s.
    pub fn get(&mut self, req: &Message, now: Instant) -> Option<Message> {
        let key = Key::of(req)?;
        let e = self.map.get(&key)?;
        let age = now.saturating_duration_since(e.stored);
        if age >= e.ttl {
            self.map.remove(&key);
            return None;
        }
        let mut m = e.msg.clone();
        let age = u32::try_from(age.as_secs()).unwrap_or(u32::MAX);
        let age_out = |rs: &mut Vec<hickory_proto::rr::Record>| {
            for r in rs {
                let ttl = r.ttl().saturating_sub(age);
                r.set_ttl(ttl);
            }
        };
        age_out(m.answers_mut());
        age_out(m.name_servers_mut());
        age_out(m.additionals_mut());
        m.set_id(req.id());
        *m.queries_mut() = req.queries().to_vec();
        m.set_recursion_desired(req.recursion_desired());
        Some(m)
    }

    /// Keeps `resp` (the answer to `req`) if it may be cached.
    pub fn put(&mut self, req: &Message, resp: &Message, now: Instant) {
        if self.cap == 0 {
            return;
        }
        let (Some(key), Some(ttl)) = (Key::of(req), cache_ttl(resp)) else { return };
        if ttl.is_zero() {
            return;
        }
        if self.map.len() >= self.cap && !self.map.contains_key(&key) {
            self.map.retain(|_, e| now.saturating_duration_since(e.stored) < e.ttl);
            while self.map.len() >= self.cap {
                let Some(k) = self.map.keys().next().cloned() else { break };
                self.map.remove(&k);
            }
        }
        self.map.insert(key, Entry { msg: resp.clone(), stored: now, ttl });
    }
}

/// The nameservers of a resolv.conf text, port 53.
pub fn parse_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("nameserver")).then(|| w.next()).flatten()
        })
        .filter_map(|ip| ip.split('%').next()?.parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

/// `1.1.1.1`, `1.1.1.1:5353`, `[fd00::1]:53` or `fd00::1`.
pub fn parse_upstream(s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    s.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, 53))
        .map_err(|_| format!("{s:?} is not an address or address:port"))
}

pub struct Forwarder {
    upstreams: Vec<SocketAddr>,
    timeout: Duration,
    cache: Mutex<Cache>,
}

/// What a forwarded query came to.
pub struct Forwarded {
    pub msg: Message,
    pub cache_hit: bool,
}

impl Forwarder {
    pub fn new(upstreams: Vec<SocketAddr>, timeout: Duration, cache_size: usize) -> Forwarder {
        Forwarder { upstreams, timeout, cache: Mutex::new(Cache::new(cache_size)) }
    }

    pub fn upstreams(&self) -> &[SocketAddr] {
        &self.upstreams
    }

    pub fn cache_len(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The answer to `req` (whose wire form is `raw`): from the cache, else from the first upstream that
    /// answers within the time left; SERVFAIL when none does.
    pub async fn forward(&self, req: &Message, raw: &[u8], tcp: bool) -> Forwarded {
        if let Some(msg) = self.lock().get(req, Instant::now()) {
            return Forwarded { msg, cache_hit: true };
        }
        let deadline = tokio::time::Instant::now() + self.timeout;
        let n = self.upstreams.len().max(1) as u32;
        for (i, up) in self.upstreams.iter().enumerate() {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                break;
            }
            // Each upstream gets its share of what is left, the last one all of it.
            let share = if i + 1 == self.upstreams.len() { left } else { left / (n - i as u32) };
            let got = tokio::time::timeout(share, exchange(*up, raw, tcp)).await;
            if let Ok(Ok(resp)) = got {
                if resp.response_code() == ResponseCode::ServFail && i + 1 < self.upstreams.len() {
                    continue;
                }
                let mut resp = resp;
                self.lock().put(req, &resp, Instant::now());
                resp.set_id(req.id());
                return Forwarded { msg: resp, cache_hit: false };
            }
        }
        let mut m = Message::error_msg(req.id(), req.op_code(), ResponseCode::ServFail);
        m.add_queries(req.queries().iter().cloned());
        m.set_recursion_desired(req.recursion_desired()).set_recursion_available(true);
        Forwarded { msg: m, cache_hit: false }
    }
}

/// Whether `resp` answers `query` (RFC 5452 §9.1): a response under the query's id, with the same question —
/// name (compared without case), type and class. A spoofer must then guess id, port and question.
pub fn answers(query: &Message, resp: &Message) -> bool {
    let same_question = match (query.query(), resp.query()) {
        (Some(q), Some(r)) => {
            q.name().to_lowercase() == r.name().to_lowercase()
                && q.query_type() == r.query_type()
                && q.query_class() == r.query_class()
        }
        _ => false,
    };
    resp.id() == query.id()
        && resp.message_type() == MessageType::Response
        && same_question
        && resp.queries().len() == 1
}

/// A UDP socket on a random source port (RFC 5452 §9.2: ids alone are 16 bits); the kernel's choice if a few
/// random ports are taken.
async fn random_port_socket(up: SocketAddr) -> std::io::Result<UdpSocket> {
    let ip: IpAddr = if up.is_ipv4() { IpAddr::from([0u8; 4]) } else { IpAddr::from([0u16; 8]) };
    for _ in 0..8 {
        let port = rand::random::<u16>().max(1024);
        if let Ok(s) = UdpSocket::bind(SocketAddr::new(ip, port)).await {
            return Ok(s);
        }
    }
    UdpSocket::bind(SocketAddr::new(ip, 0)).await
}

/// One query to one upstream under a fresh id: UDP, then TCP when truncated and the client is on TCP.
async fn exchange(up: SocketAddr, raw: &[u8], tcp: bool) -> std::io::Result<Message> {
    let id: u16 = rand::random();
    let mut q = raw.to_vec();
    q[0..2].copy_from_slice(&id.to_be_bytes());
    let sent = Message::from_vec(&q).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let sock = random_port_socket(up).await?;
    sock.connect(up).await?;
    sock.send(&q).await?;
    let mut buf = vec![0u8; 65535];
    let resp = loop {
        let n = sock.recv(&mut buf).await?;
        // Only the answer to our question, under our id: anything else is dropped.
        if let Ok(m) = Message::from_vec(&buf[..n]) {
            if answers(&sent, &m) {
                break m;
            }
        }
    };
    if !(resp.truncated() && tcp) {
        return Ok(resp);
    }
    let mut s = TcpStream::connect(up).await?;
    let mut framed = Vec::with_capacity(q.len() + 2);
    framed.extend_from_slice(&(q.len() as u16).to_be_bytes());
    framed.extend_from_slice(&q);
    s.write_all(&framed).await?;
    let len = s.read_u16().await?;
    let mut body = vec![0u8; usize::from(len)];
    s.read_exact(&mut body).await?;
    let m = Message::from_vec(&body).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    if !answers(&sent, &m) {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "the TCP answer is not to our question"));
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;
    use hickory_proto::rr::rdata::{A, SOA};
    use hickory_proto::rr::{Name, RData, Record};

    fn query(name: &str, t: RecordType, id: u16) -> Message {
        let mut m = Message::new();
        m.set_id(id).add_query(Query::query(Name::from_ascii(name).unwrap(), t));
        m
    }

    fn answer(req: &Message, ttl: u32) -> Message {
        let mut m = req.clone();
        m.set_message_type(MessageType::Response);
        m.add_answer(Record::from_rdata(req.query().unwrap().name().clone(), ttl, RData::A(A::new(192, 0, 2, 1))));
        m
    }

    #[test]
    fn cache_counts_ttls_down_and_expires() {
        let t0 = Instant::now();
        let mut c = Cache::new(10);
        let req = query("example.com.", RecordType::A, 1);
        c.put(&req, &answer(&req, 30), t0);
        let again = query("EXAMPLE.com.", RecordType::A, 2);
        let hit = c.get(&again, t0 + Duration::from_secs(10)).expect("cached");
        assert_eq!(hit.id(), 2);
        assert_eq!(hit.answers()[0].ttl(), 20);
        assert_eq!(hit.query().unwrap().name().to_ascii(), "EXAMPLE.com.", "the question's case is the asker's");
        assert!(c.get(&again, t0 + Duration::from_secs(30)).is_none(), "expired at its TTL");
        assert!(c.get(&query("example.com.", RecordType::AAAA, 3), t0).is_none(), "keyed by type");
    }

    #[test]
    fn cache_is_bounded_and_skips_errors() {
        let t0 = Instant::now();
        let mut c = Cache::new(3);
        for i in 0..10 {
            let req = query(&format!("n{i}.example."), RecordType::A, i);
            c.put(&req, &answer(&req, 60), t0);
            assert!(c.len() <= 3);
        }
        let req = query("fail.example.", RecordType::A, 1);
        let mut fail = req.clone();
        fail.set_message_type(MessageType::Response).set_response_code(ResponseCode::ServFail);
        let mut c = Cache::new(3);
        c.put(&req, &fail, t0);
        assert!(c.is_empty(), "SERVFAIL is not cached");
        let mut nx = fail.clone();
        nx.set_response_code(ResponseCode::NXDomain);
        let soa = SOA::new(Name::root(), Name::root(), 1, 1, 1, 1, 5);
        nx.add_name_server(Record::from_rdata(Name::from_ascii("example.").unwrap(), 900, RData::SOA(soa)));
        assert_eq!(cache_ttl(&nx), Some(Duration::from_secs(5)), "negative TTL is the SOA minimum");
    }

    #[test]
    fn only_an_answer_to_our_id_and_question_is_accepted() {
        let q = query("example.com.", RecordType::A, 7);
        let ok = answer(&q, 60);
        assert!(answers(&q, &ok));
        let mut case = answer(&query("EXAMPLE.com.", RecordType::A, 7), 60);
        assert!(answers(&q, &case), "names compare without case");
        case.set_id(8);
        assert!(!answers(&q, &case), "another id");
        assert!(!answers(&q, &answer(&query("example.org.", RecordType::A, 7), 60)), "another name");
        assert!(!answers(&q, &answer(&query("example.com.", RecordType::AAAA, 7), 60)), "another type");
        let mut not_resp = ok.clone();
        not_resp.set_message_type(MessageType::Query);
        assert!(!answers(&q, &not_resp), "a query is no answer");
        let mut none = ok.clone();
        none.queries_mut().clear();
        assert!(!answers(&q, &none), "no question");
        let mut two = ok;
        two.add_query(Query::query(Name::from_ascii("evil.").unwrap(), RecordType::A));
        assert!(!answers(&q, &two), "an extra question");
    }

    #[tokio::test]
    async fn a_spoofed_answer_is_dropped_and_the_real_one_taken() {
        // An upstream on loopback that first sends a reply with a wrong question, then the right one.
        let up = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = up.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 512];
            let (n, from) = up.recv_from(&mut buf).await.unwrap();
            let req = Message::from_vec(&buf[..n]).unwrap();
            let mut spoof = answer(&query("evil.example.", RecordType::A, req.id()), 60);
            spoof.set_id(req.id());
            up.send_to(&spoof.to_vec().unwrap(), from).await.unwrap();
            up.send_to(&answer(&req, 60).to_vec().unwrap(), from).await.unwrap();
        });
        let req = query("example.com.", RecordType::A, 1);
        let f = Forwarder::new(vec![addr], Duration::from_secs(2), 0);
        let got = f.forward(&req, &req.to_vec().unwrap(), false).await;
        assert_eq!(got.msg.query().unwrap().name().to_ascii(), "example.com.");
        assert_eq!(got.msg.answers().len(), 1);
        assert_eq!(got.msg.id(), 1);
    }

    #[test]
    fn upstream_addresses() {
        let conf = "# comment\nsearch x\nnameserver 10.0.0.2\nnameserver fe80::1%eth0\nnameserver  1.1.1.1 \noptions ndots:5\n";
        assert_eq!(parse_resolv_conf(conf), vec![sa("10.0.0.2:53"), sa("[fe80::1]:53"), sa("1.1.1.1:53")]);
        assert_eq!(parse_upstream("127.0.0.1:5353"), Ok(sa("127.0.0.1:5353")));
        assert_eq!(parse_upstream("9.9.9.9"), Ok(sa("9.9.9.9:53")));
        assert!(parse_upstream("dns.example").is_err());
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }
}
