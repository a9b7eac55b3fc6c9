//! The userspace dataplane against the real kernel, inside namespaces this test creates:
//! client 192.168.77.2 ── node 192.168.77.1 ──┬── server-a 10.244.1.2
//!                                            └── server-b 10.244.2.2
//! The dataplane's sockets live on a runtime inside the node namespace and its rules are applied there;
//! clients are tokio sockets on a runtime inside the client namespace. socat servers answer their name.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use weft_lab::{Netns, NsRuntime};
use weft_proxy::iptables::CommandRunner;
use weft_proxy::userspace::{Config, UserspaceDataplane};
use weft_proxy::{Dataplane, Endpoint, Protocol, ServiceEntry, ServicePort, ServicePortName, ServiceTable};

/// Kills a background server even if the test panics before the namespace guard does.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Lab {
    // Field order is drop order: runtimes stop before their namespaces go.
    client_rt: NsRuntime,
    node_rt: NsRuntime,
    _server_rts: Vec<NsRuntime>,
    _socats: Vec<ChildGuard>,
    _client: Netns,
    node: Netns,
    _servers: Vec<Netns>,
}

const NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 1);
const A: [u8; 4] = [10, 244, 1, 2];
const B: [u8; 4] = [10, 244, 2, 2];

/// A veth created inside the node namespace, its peer moved into `ns`: node side `<subnet>.1`, far side `.2`.
fn wire(node: &Netns, ns: &Netns, node_if: &str, subnet: &str) -> Result<()> {
    node.ip(&["link", "add", node_if, "type", "veth", "peer", "name", "eth0", "netns", ns.name()])?;
    node.ip(&["addr", "add", &format!("{subnet}.1/24"), "dev", node_if])?;
    node.ip(&["link", "set", node_if, "up"])?;
    ns.ip(&["addr", "add", &format!("{subnet}.2/24"), "dev", "eth0"])?;
    ns.ip(&["link", "set", "eth0", "up"])?;
    Ok(())
}

fn serve(ns: &Netns, listen: &str, answer: &str) -> Result<ChildGuard> {
    let child = ns
        .command("socat")
        .args([listen, answer])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("spawning socat")?;
    Ok(ChildGuard(child))
}

fn lab() -> Result<Lab> {
    let client = Netns::create("usc")?;
    let node = Netns::create("usn")?;
    let a = Netns::create("usa")?;
    let b = Netns::create("usb")?;
    wire(&node, &client, "vc", "192.168.77")?;
    wire(&node, &a, "va", "10.244.1")?;
    wire(&node, &b, "vb", "10.244.2")?;
    // Only the service network goes to the node: the client reaches servers through the proxy alone.
    client.ip(&["route", "add", "10.96.0.0/12", "via", "192.168.77.1"])?;
    // A node needs some route to the service network for its own connections to reach OUTPUT's nat rules
    // (real nodes have a default route); where it points does not matter.
    node.ip(&["route", "add", "10.96.0.0/12", "via", "10.244.1.2"])?;
    a.ip(&["route", "add", "default", "via", "10.244.1.1"])?;
    b.ip(&["route", "add", "default", "via", "10.244.2.1"])?;
    let mut socats = Vec::new();
    for (ns, name) in [(&a, "server-a"), (&b, "server-b")] {
        socats.push(serve(ns, "TCP-LISTEN:8080,fork,reuseaddr", &format!("SYSTEM:echo {name}"))?);
        socats.push(serve(ns, "TCP-LISTEN:8081,fork,reuseaddr", "EXEC:cat")?);
    }
    for ip in ["10.244.1.2", "10.244.2.2"] {
        let deadline = Instant::now() + Duration::from_secs(10);
        while node.exec("socat", &["-u", &format!("TCP:{ip}:8080,connect-timeout=2"), "-"]).is_err() {
            if Instant::now() > deadline {
                bail!("server {ip} never answered");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    // UDP servers in-process: socat's forking UDP server can lose datagrams sent back to back.
    let mut server_rts = Vec::new();
    for (ns, name) in [(&a, "server-a"), (&b, "server-b")] {
        let rt = ns.runtime()?;
        let s = rt.block_on(UdpSocket::bind("0.0.0.0:5353"))??;
        rt.handle().spawn(async move {
            let mut buf = [0u8; 512];
            while let Ok((_, peer)) = s.recv_from(&mut buf).await {
                let _ = s.send_to(format!("{name}\n").as_bytes(), peer).await;
            }
        });
        server_rts.push(rt);
    }
    Ok(Lab {
        client_rt: client.runtime()?,
        node_rt: node.runtime()?,
        _server_rts: server_rts,
        _socats: socats,
        _client: client,
        node,
        _servers: vec![a, b],
    })
}

fn dataplane(lab: &Lab) -> UserspaceDataplane {
    let runner = CommandRunner::with_prefix(["ip", "netns", "exec", lab.node.name()]);
    // Long UDP sessions: on a busy machine a reply may come late.
    let cfg = Config { udp_idle_timeout: Duration::from_secs(5), ..Config::default() };
    UserspaceDataplane::new(runner, cfg, lab.node_rt.handle().clone())
}

fn spn(name: &str, protocol: Protocol) -> ServicePortName {
    ServicePortName::new("default", name, "", protocol)
}

fn entry(vip: [u8; 4], port: u16, backends: &[([u8; 4], u16)]) -> ServiceEntry {
    ServiceEntry {
        port: ServicePort::cluster_ip(vip.into(), port),
        endpoints: backends.iter().map(|(ip, port)| Endpoint::ready((*ip).into(), *port)).collect(),
    }
}

fn addr(ip: [u8; 4], port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip.into(), port)
}

const WAIT: Duration = Duration::from_secs(5);

/// One TCP connection: what the server said, or the connect error (e.g. `ConnectionRefused`).
async fn fetch(to: SocketAddrV4) -> io::Result<String> {
    let mut s = tokio::time::timeout(WAIT, TcpStream::connect(to)).await??;
    let mut out = String::new();
    tokio::time::timeout(WAIT, s.read_to_string(&mut out)).await??;
    Ok(out.trim().to_string())
}

fn fetch_n(rt: &NsRuntime, to: SocketAddrV4, n: usize) -> Result<BTreeMap<String, usize>> {
    let mut seen = BTreeMap::new();
    for _ in 0..n {
        let answer = rt.block_on(fetch(to))?.with_context(|| format!("connecting to {to}"))?;
        *seen.entry(answer).or_default() += 1;
    }
    Ok(seen)
}

/// One datagram from a fresh socket (a new client port); retried, since UDP may drop.
async fn query(to: SocketAddrV4) -> io::Result<String> {
    let s = UdpSocket::bind("0.0.0.0:0").await?;
    s.connect(to).await?;
    ask(&s).await
}

/// One question on a connected socket; resent, since UDP may drop.
async fn ask(s: &UdpSocket) -> io::Result<String> {
    let mut last = io::Error::new(io::ErrorKind::TimedOut, "no answer");
    for _ in 0..3 {
        s.send(b"hi\n").await?;
        let mut buf = [0u8; 512];
        match tokio::time::timeout(Duration::from_secs(2), s.recv(&mut buf)).await {
            Ok(Ok(n)) => return Ok(String::from_utf8_lossy(&buf[..n]).trim().to_string()),
            Ok(Err(e)) => last = e,
            Err(_) => {}
        }
    }
    Err(last)
}

fn save(node: &Netns) -> Result<String> {
    node.exec("iptables-save", &[])
}

/// Waits until `f` holds; the dataplane closes sockets asynchronously.
fn eventually(what: &str, mut f: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f()? {
        if Instant::now() > deadline {
            bail!("never happened: {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

#[test]
fn userspace_tcp_balances_sticks_fails_over_refuses_and_sweeps() -> Result<()> {
    let lab = lab()?;
    let rt = &lab.client_rt;
    let mut web = entry([10, 96, 0, 20], 80, &[(A, 8080), (B, 8080)]);
    web.port.node_port = Some(30080);
    let mut sticky = entry([10, 96, 0, 21], 80, &[(A, 8080), (B, 8080)]);
    sticky.port.session_affinity = Some(Duration::from_secs(10800));
    let mut table = ServiceTable::new();
    table.insert(spn("web", Protocol::Tcp), web);
    table.insert(spn("sticky", Protocol::Tcp), sticky);
    table.insert(spn("empty", Protocol::Tcp), entry([10, 96, 0, 22], 80, &[]));
    table.insert(spn("echo", Protocol::Tcp), entry([10, 96, 0, 23], 81, &[(A, 8081)]));
    // Port 9 on server-a is closed: every connection must fail over to server-b.
    table.insert(spn("failover", Protocol::Tcp), entry([10, 96, 0, 25], 80, &[(A, 9), (B, 8080)]));
    table.insert(spn("sctp", Protocol::Sctp), entry([10, 96, 0, 26], 80, &[(A, 8080)]));
    let mut dp = dataplane(&lab);
    let stats = dp.sync(&table, None)?;
    assert!(stats.full);
    let ports: BTreeMap<String, u16> = dp.sockets().map(|(n, p)| (n.name.clone(), p)).collect();
    assert!(!ports.contains_key("sctp"), "SCTP is skipped: {ports:?}");
    assert_eq!(ports.len(), 5);

    // Round robin over both servers, from the client and from the node itself (OUTPUT path).
    let seen = fetch_n(rt, addr([10, 96, 0, 20], 80), 10)?;
    assert_eq!(seen.keys().collect::<Vec<_>>(), ["server-a", "server-b"], "{seen:?}");
    assert!(seen.values().all(|n| *n >= 4), "round robin spreads evenly: {seen:?}");
    let local = lab.node.exec("socat", &["-u", "TCP:10.96.0.20:80,connect-timeout=5", "-"])?;
    assert!(local.starts_with("server-"), "node-local client: {local:?}");

    // The NodePort on the node's address.
    let seen = fetch_n(rt, SocketAddrV4::new(NODE, 30080), 4)?;
    assert_eq!(seen.len(), 2, "node port reaches both servers: {seen:?}");

    // ClientIP affinity keeps one server.
    let seen = fetch_n(rt, addr([10, 96, 0, 21], 80), 8)?;
    assert_eq!(seen.len(), 1, "affinity: {seen:?}");

    // A refused connect goes to the next endpoint.
    let seen = fetch_n(rt, addr([10, 96, 0, 25], 80), 4)?;
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), [("server-b".to_string(), 4)]);

    // No endpoints: refused, not a timeout and not an accepted-then-closed connection.
    let err = rt.block_on(fetch(addr([10, 96, 0, 22], 80)))?.expect_err("no endpoints must refuse");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");

    // An established connection survives its endpoint's removal; new connections are refused.
    let stream = rt.block_on(async {
        let mut s = TcpStream::connect(addr([10, 96, 0, 23], 81)).await?;
        roundtrip(&mut s, b"one").await?;
        io::Result::Ok(s)
    })??;
    table.get_mut(&spn("echo", Protocol::Tcp)).context("echo")?.endpoints.clear();
    // An endpoint removed from web: no new connection goes to server-b.
    table.get_mut(&spn("web", Protocol::Tcp)).context("web")?.endpoints.retain(|e| e.ip == Ipv4Addr::from(A));
    let changed: BTreeSet<_> = [spn("echo", Protocol::Tcp), spn("web", Protocol::Tcp)].into();
    let stats = dp.sync(&table, Some(&changed))?;
    assert!(!stats.full);
    rt.block_on(async move {
        let mut s = stream;
        roundtrip(&mut s, b"two").await
    })??;
    let err = rt.block_on(fetch(addr([10, 96, 0, 23], 81)))?.expect_err("endpoint removed");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");
    let seen = fetch_n(rt, addr([10, 96, 0, 20], 80), 6)?;
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), [("server-a".to_string(), 6)]);

    // A removed service loses its rules and its socket.
    let sticky_port = ports["sticky"];
    table.remove(&spn("sticky", Protocol::Tcp));
    dp.sync(&table, None)?;
    let rules = save(&lab.node)?;
    assert!(!rules.contains("10.96.0.21") && rules.contains("10.96.0.20"), "{rules}");
    let proxy = SocketAddrV4::new(NODE, sticky_port);
    eventually("the removed service's socket closes", || {
        Ok(rt.block_on(fetch(proxy))?.is_err_and(|e| e.kind() == io::ErrorKind::ConnectionRefused))
    })?;
    assert_eq!(dp.sockets().count(), 4);

    // Cleanup leaves nothing of ours.
    dp.cleanup()?;
    let rules = save(&lab.node)?;
    assert!(!rules.contains("WEFT-PORTALS"), "{rules}");
    Ok(())
}

async fn roundtrip(s: &mut TcpStream, msg: &[u8]) -> io::Result<()> {
    s.write_all(msg).await?;
    let mut buf = vec![0u8; msg.len()];
    tokio::time::timeout(WAIT, s.read_exact(&mut buf)).await??;
    if buf != msg {
        return Err(io::Error::other(format!("echo returned {buf:?}")));
    }
    Ok(())
}

#[test]
fn userspace_udp_balances_keeps_sessions_and_follows_endpoints() -> Result<()> {
    let lab = lab()?;
    let rt = &lab.client_rt;
    let dns = spn("dns", Protocol::Udp);
    let mut table = ServiceTable::new();
    table.insert(dns.clone(), entry([10, 96, 0, 24], 53, &[(A, 5353), (B, 5353)]));
    table.insert(spn("nothing", Protocol::Udp), entry([10, 96, 0, 27], 53, &[]));
    let mut dp = dataplane(&lab);
    dp.sync(&table, None)?;
    let vip = addr([10, 96, 0, 24], 53);

    let mut seen = BTreeMap::<String, usize>::new();
    for _ in 0..8 {
        *seen.entry(rt.block_on(query(vip))??).or_default() += 1;
    }
    assert_eq!(seen.keys().collect::<Vec<_>>(), ["server-a", "server-b"], "{seen:?}");

    // One client socket is one session: every datagram goes to the same server.
    let answers = rt.block_on(async move {
        let s = UdpSocket::bind("0.0.0.0:0").await?;
        s.connect(vip).await?;
        let mut answers = BTreeSet::new();
        for _ in 0..4 {
            answers.insert(ask(&s).await?);
        }
        io::Result::Ok(answers)
    })??;
    assert_eq!(answers.len(), 1, "{answers:?}");

    // No endpoints: the client's socket sees the port unreachable.
    let err = rt.block_on(query(addr([10, 96, 0, 27], 53)))?.expect_err("no endpoints");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");

    // A removed endpoint gets no new datagrams.
    table.get_mut(&dns).context("dns")?.endpoints.retain(|e| e.ip == Ipv4Addr::from(B));
    dp.sync(&table, Some(&[dns.clone()].into()))?;
    for _ in 0..6 {
        assert_eq!(rt.block_on(query(vip))??, "server-b");
    }
    Ok(())
}
