//! The sockets: several `SO_REUSEPORT` UDP sockets, each read by its own thread (the kernel spreads queries
//! over them, so every core answers), and a TCP listener on the runtime. Authoritative answers are computed
//! on the receiving thread under the index's read lock (held for one answer; the indexer takes the write lock
//! for the few records one change touches); forwarded queries
//! become tasks on the runtime, at most `MAX_FORWARDS` at once (beyond that: SERVFAIL at once).

use std::net::{SocketAddr, UdpSocket};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, Query};
use hickory_proto::rr::Name;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::answer::{self, Decision};
use crate::forward::Forwarder;
use crate::index::{Config, Index};
use crate::metrics::Shard;
use crate::udp::PktSocket;

/// Forwarded queries in flight at once.
pub const MAX_FORWARDS: usize = 1024;
/// TCP connections at once, and how long one may sit idle between queries.
pub const MAX_TCP: usize = 256;
pub const TCP_IDLE: Duration = Duration::from_secs(10);

/// What every serving thread and task shares.
pub struct Server {
    pub cfg: Config,
    /// `None` until the first sync.
    pub index: RwLock<Option<Index>>,
    pub forwarder: Forwarder,
    /// One per UDP socket, plus one for TCP.
    pub shards: Box<[Shard]>,
    forwards: Arc<Semaphore>,
}

/// The outcome of one packet on the receiving thread.
pub enum Handled {
    Reply {
        bytes: Vec<u8>,
        qtype: u16,
        rcode: u8,
    },
    Forward(Message),
    /// Our answer ends in a CNAME out of our zones: ask upstream for its target and append.
    Chase(Message, Box<Message>, Name),
    Drop,
}

fn qtype_of(m: &Message) -> u16 {
    m.query().map(|q| q.query_type().into()).unwrap_or(0)
}

impl Server {
    pub fn new(cfg: Config, forwarder: Forwarder, udp_sockets: usize) -> Server {
        Server {
            cfg,
            index: RwLock::new(None),
            forwarder,
            shards: (0..=udp_sockets).map(|_| Shard::default()).collect(),
            forwards: Arc::new(Semaphore::new(MAX_FORWARDS)),
        }
    }

    /// Answers one packet from the index, or says it must be forwarded. `limit`: the largest reply.
    pub fn handle(&self, raw: &[u8], tcp: bool) -> Handled {
        let req = match Message::from_vec(raw) {
            Ok(m) => m,
            Err(_) => {
                return match answer::formerr(raw) {
                    Some(bytes) => Handled::Reply { bytes, qtype: 0, rcode: 1 },
                    None => Handled::Drop,
                }
            }
        };
        let decision = {
            // Held for this answer only. Poisoned = the indexer panicked mid-change: answer from what is there.
            let index = self.index.read().unwrap_or_else(|p| p.into_inner());
            answer::answer(&self.cfg, index.as_ref(), &req)
        };
        match decision {
            Decision::Reply(resp) => {
                if let Some(target) = answer::external_target(&self.cfg, &resp) {
                    return Handled::Chase(req, Box::new(resp), target);
                }
                let limit = if tcp { usize::from(u16::MAX) } else { answer::udp_limit(&req) };
                let bytes = answer::encode(&resp, limit);
                Handled::Reply { bytes, qtype: qtype_of(&req), rcode: resp.response_code().low() }
            }
            Decision::Forward => Handled::Forward(req),
            Decision::Drop => Handled::Drop,
        }
    }

    /// The answer to a forwarded query, encoded within `limit`.
    async fn forwarded(&self, req: &Message, tcp: bool, shard: &Shard) -> (Vec<u8>, u8) {
        let limit = if tcp { usize::from(u16::MAX) } else { answer::udp_limit(req) };
        let raw = match req.to_vec() {
            Ok(r) => r,
            Err(_) => return (answer::formerr(&[0; 12]).unwrap_or_default(), 1),
        };
        let f = self.forwarder.forward(req, &raw, tcp).await;
        shard.cache(f.cache_hit);
        (answer::encode(&f.msg, limit), f.msg.response_code().low())
    }

    /// Our CNAME answer plus what the upstream resolvers say about its target.
    async fn chased(&self, req: &Message, mut resp: Message, target: Name, tcp: bool, shard: &Shard) -> (Vec<u8>, u8) {
        let limit = if tcp { usize::from(u16::MAX) } else { answer::udp_limit(req) };
        let mut q = Message::new();
        let qtype = req.query().map(|q| q.query_type()).unwrap_or(hickory_proto::rr::RecordType::A);
        q.set_id(rand::random()).set_recursion_desired(true).add_query(Query::query(target, qtype));
        if let Ok(raw) = q.to_vec() {
            let f = self.forwarder.forward(&q, &raw, tcp).await;
            shard.cache(f.cache_hit);
            resp.add_answers(f.msg.answers().iter().cloned());
            if f.msg.response_code() != hickory_proto::op::ResponseCode::NoError {
                resp.set_response_code(f.msg.response_code());
            }
        }
        (answer::encode(&resp, limit), resp.response_code().low())
    }

    fn servfail(req: &Message) -> Vec<u8> {
        let mut m = Message::error_msg(req.id(), req.op_code(), hickory_proto::op::ResponseCode::ServFail);
        m.add_queries(req.queries().iter().cloned());
        m.to_vec().unwrap_or_default()
    }
}

/// A UDP socket on `addr` that shares its port with its siblings (`SO_REUSEPORT`).
pub fn udp_socket(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    // A burst of queries waits in the kernel rather than being dropped; the default is ~200 kB.
    let _ = s.set_recv_buffer_size(4 << 20);
    s.bind(&addr.into())?;
    Ok(s.into())
}

/// Binds `n` UDP sockets and the TCP listener on `addr`; port 0 picks one port free for all of them.
pub fn bind(addr: SocketAddr, n: usize) -> std::io::Result<(Vec<UdpSocket>, std::net::TcpListener, SocketAddr)> {
    let mut last = None;
    for _ in 0..16 {
        let first = udp_socket(addr)?;
        let actual = first.local_addr()?;
        let tcp = match std::net::TcpListener::bind(actual) {
            Ok(t) => t,
            // Port 0 gave a UDP port whose TCP twin is taken: try another.
            Err(e) if addr.port() == 0 => {
                last = Some(e);
                continue;
            }
            Err(e) => return Err(e),
        };
        let mut socks = vec![first];
        for _ in 1..n.max(1) {
            socks.push(udp_socket(actual)?);
        }
        tcp.set_nonblocking(true)?;
        return Ok((socks, tcp, actual));
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no free port")))
}

/// Serves one UDP socket on the calling thread, forever.
pub fn serve_udp(server: Arc<Server>, sock: UdpSocket, shard: usize, rt: tokio::runtime::Handle) {
    let sock = match PktSocket::new(sock) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            tracing::error!(error = %e, "UDP socket {shard}: cannot track destinations (IP_PKTINFO); not serving on it");
            return;
        }
    };
    let mut buf = vec![0u8; 65535];
    loop {
        let (n, peer, local) = match sock.recv(&mut buf) {
            Ok(x) => x,
            Err(_) => continue,
        };
        let t0 = Instant::now();
        match server.handle(&buf[..n], false) {
            Handled::Reply { bytes, qtype, rcode } => {
                let _ = sock.send(&bytes, peer, local);
                server.shards[shard].observe(qtype, rcode, t0.elapsed());
            }
            Handled::Forward(req) => {
                let Ok(permit) = server.forwards.clone().try_acquire_owned() else {
                    let _ = sock.send(&Server::servfail(&req), peer, local);
                    server.shards[shard].observe(qtype_of(&req), 2, t0.elapsed());
                    continue;
                };
                let (server, sock) = (server.clone(), sock.clone());
                rt.spawn(async move {
                    let s = &server.shards[shard];
                    let (bytes, rcode) = server.forwarded(&req, false, s).await;
                    let _ = sock.send(&bytes, peer, local);
                    s.observe(qtype_of(&req), rcode, t0.elapsed());
                    drop(permit);
                });
            }
            Handled::Chase(req, resp, target) => {
                let Ok(permit) = server.forwards.clone().try_acquire_owned() else {
                    let _ = sock.send(&Server::servfail(&req), peer, local);
                    server.shards[shard].observe(qtype_of(&req), 2, t0.elapsed());
                    continue;
                };
                let (server, sock) = (server.clone(), sock.clone());
                rt.spawn(async move {
                    let s = &server.shards[shard];
                    let (bytes, rcode) = server.chased(&req, *resp, target, false, s).await;
                    let _ = sock.send(&bytes, peer, local);
                    s.observe(qtype_of(&req), rcode, t0.elapsed());
                    drop(permit);
                });
            }
            Handled::Drop => server.shards[shard].dropped(),
        }
    }
}

/// Accepts TCP connections (at most `MAX_TCP` at once) and serves each on its own task; accept errors back off
/// (the shared loop, `weft_api::http::accept_loop`).
pub async fn serve_tcp(server: Arc<Server>, listener: std::net::TcpListener) -> std::io::Result<()> {
    let listener = TcpListener::from_std(listener)?;
    weft_api::http::accept_loop(listener, MAX_TCP, "dns tcp", move |stream, _| {
        let server = server.clone();
        async move {
            let _ = tcp_connection(&server, stream).await;
        }
    })
    .await;
    Ok(())
}

/// Length-prefixed queries on one connection until the client closes it, it idles, or sends garbage.
async fn tcp_connection(server: &Server, mut stream: TcpStream) -> std::io::Result<()> {
    let shard = &server.shards[server.shards.len() - 1];
    loop {
        let len = match tokio::time::timeout(TCP_IDLE, stream.read_u16()).await {
            Ok(Ok(l)) => usize::from(l),
            _ => return Ok(()),
        };
        let mut body = vec![0u8; len];
        if tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut body)).await.is_err() {
            return Ok(());
        }
        let t0 = Instant::now();
        let (bytes, qtype, rcode) = match server.handle(&body, true) {
            Handled::Reply { bytes, qtype, rcode } => (bytes, qtype, rcode),
            Handled::Forward(req) => {
                let (bytes, rcode) = server.forwarded(&req, true, shard).await;
                (bytes, qtype_of(&req), rcode)
            }
            Handled::Chase(req, resp, target) => {
                let (bytes, rcode) = server.chased(&req, *resp, target, true, shard).await;
                (bytes, qtype_of(&req), rcode)
            }
            Handled::Drop => {
                shard.dropped();
                return Ok(());
            }
        };
        let mut out = Vec::with_capacity(bytes.len() + 2);
        out.extend_from_slice(&u16::try_from(bytes.len()).unwrap_or(0).to_be_bytes());
        out.extend_from_slice(&bytes);
        stream.write_all(&out).await?;
        shard.observe(qtype, rcode, t0.elapsed());
    }
}
