//! DNS benchmark: `weft dns` against Knot DNS serving the same records, side by side in one run.
//!
//! 1. A real etcd (loopback, temporary data dir) gets 10,000 Services in namespace `bench`: 9,000 with a
//!    ClusterIP and a named port (`http`/TCP 80), 1,000 headless with Endpoints of 10 ready addresses each.
//! 2. `weft dns` (release, `$WEFT_BIN`) serves them on a loopback port; the same services are written as a
//!    zone file (`cluster.local`, the records the specification gives them: A, SRV, per-endpoint A) that
//!    `knotd` (Knot DNS, 2 UDP workers like weft's 2 sockets) serves on another port.
//! 3. dnsperf sends one query file (100,000 queries, seeded: 60 % A of a ClusterIP service, 10 % A of a
//!    headless service (10 answers), 10 % A of an endpoint name, 10 % SRV of a ClusterIP service, 5 %
//!    NXDOMAIN, 5 % AAAA NODATA) to each server in turn, `BENCH_DNS_ROUNDS` (2) alternating rounds of
//!    `BENCH_DNS_SECS` (10) seconds at saturation; then each once at a fixed 10,000 QPS with `-v` for
//!    per-query latency percentiles.
//! 4. `weft dns`'s VmRSS (and VmHWM) from /proc, after the sync and after the load.
//! 5. Update latency: `BENCH_DNS_UPDATES` (200) times, one Service's cluster IP is changed in etcd, and the time
//!    from etcd's acknowledgement of the write until `weft dns` answers the new address (polled with a UDP
//!    query every 0.2 ms) is taken; p50 / p99 / max.
//!
//! `WEFT_BIN=target/release/weft cargo run --release -p weft-tests --example dns_bench`
//! Prints a markdown summary on stdout, progress on stderr; exits non-zero only when a measurement could
//! not be taken (never because a target was missed).

use std::io::Write;
use std::net::{TcpListener, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use etcd_client::{Txn, TxnOp};
use rand::{Rng, SeedableRng};
use weft_lab::rounds::{self, median, Sample};
use weft_lab::EtcdFixture;

const SERVICES: usize = 10_000;
const HEADLESS: usize = 1_000;
const ENDPOINTS_PER: usize = 10;
const QUERIES: usize = 100_000;
const TXN_MAX: usize = 128;
const TARGET_RATIO: f64 = 0.5;
const TARGET_RSS_KB: u64 = 32 * 1024;
const TARGET_UPDATE_P99_MS: f64 = 10.0;

fn free_port() -> u16 {
    loop {
        let t = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = t.local_addr().expect("addr").port();
        if UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

struct Svc {
    name: String,
    /// None: headless.
    ip: Option<String>,
    endpoints: Vec<String>,
}

fn services() -> Vec<Svc> {
    (0..SERVICES)
        .map(|i| {
            if i < SERVICES - HEADLESS {
                let n = 0x0A64_0000u32 + i as u32 + 1; // 10.100.0.0/16 and up, inside 10.96.0.0/12
                let ip = std::net::Ipv4Addr::from(n).to_string();
                Svc { name: format!("svc-{i}"), ip: Some(ip), endpoints: vec![] }
            } else {
                let h = i - (SERVICES - HEADLESS);
                let eps = (0..ENDPOINTS_PER)
                    .map(|e| {
                        let n = 0x0AF4_0000u32 + (h * ENDPOINTS_PER + e) as u32 + 1; // 10.244.0.0/16
                        std::net::Ipv4Addr::from(n).to_string()
                    })
                    .collect();
                Svc { name: format!("hl-{h}"), ip: None, endpoints: eps }
            }
        })
        .collect()
}

async fn load_etcd(endpoint: &str, svcs: &[Svc]) -> Result<()> {
    let mut c = etcd_client::Client::connect([endpoint], None).await?;
    let mut ops = Vec::new();
    for s in svcs {
        let spec = match &s.ip {
            Some(ip) => {
                serde_json::json!({"clusterIP": ip, "clusterIPs": [ip], "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]})
            }
            None => {
                serde_json::json!({"clusterIP": "None", "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]})
            }
        };
        let svc = serde_json::json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": s.name, "namespace": "bench"}, "spec": spec});
        ops.push(TxnOp::put(format!("/registry/services/bench/{}", s.name), svc.to_string(), None));
        if !s.endpoints.is_empty() {
            let addrs: Vec<serde_json::Value> = s.endpoints.iter().map(|ip| serde_json::json!({"ip": ip})).collect();
            let ep = serde_json::json!({
                "apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": s.name, "namespace": "bench"},
                "subsets": [{"addresses": addrs, "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}]
            });
            ops.push(TxnOp::put(format!("/registry/endpoints/bench/{}", s.name), ep.to_string(), None));
        }
    }
    for chunk in ops.chunks(TXN_MAX) {
        c.txn(Txn::new().and_then(chunk.to_vec())).await?;
    }
    Ok(())
}

/// The zone file Knot serves: what the specification says these services publish.
fn zone_file(svcs: &[Svc]) -> String {
    let mut z = String::with_capacity(SERVICES * 200);
    z.push_str("$ORIGIN cluster.local.\n$TTL 30\n");
    z.push_str("@ IN SOA ns.dns.cluster.local. hostmaster.cluster.local. 1 7200 1800 86400 30\n");
    z.push_str("@ IN NS ns.dns.cluster.local.\nns.dns IN A 127.0.0.1\ndns-version IN TXT \"1.1.0\"\n");
    for s in svcs {
        let base = format!("{}.bench.svc", s.name);
        match &s.ip {
            Some(ip) => {
                z.push_str(&format!("{base} IN A {ip}\n"));
                z.push_str(&format!("_http._tcp.{base} IN SRV 0 100 80 {base}\n"));
            }
            None => {
                let w = 100 / s.endpoints.len();
                for ip in &s.endpoints {
                    let host = ip.replace('.', "-");
                    z.push_str(&format!("{base} IN A {ip}\n{host}.{base} IN A {ip}\n"));
                    z.push_str(&format!("_http._tcp.{base} IN SRV 0 {w} 80 {host}.{base}\n"));
                }
            }
        }
    }
    z
}

fn query_file(svcs: &[Svc]) -> String {
    let mut rng = rand::rngs::StdRng::seed_from_u64(53);
    let (cip, hl): (Vec<&Svc>, Vec<&Svc>) = svcs.iter().partition(|s| s.ip.is_some());
    let mut q = String::with_capacity(QUERIES * 48);
    for _ in 0..QUERIES {
        let line = match rng.gen_range(0..100) {
            0..=59 => format!("{}.bench.svc.cluster.local A", cip[rng.gen_range(0..cip.len())].name),
            60..=69 => format!("{}.bench.svc.cluster.local A", hl[rng.gen_range(0..hl.len())].name),
            70..=79 => {
                let s = hl[rng.gen_range(0..hl.len())];
                let ip = &s.endpoints[rng.gen_range(0..s.endpoints.len())];
                format!("{}.{}.bench.svc.cluster.local A", ip.replace('.', "-"), s.name)
            }
            80..=89 => format!("_http._tcp.{}.bench.svc.cluster.local SRV", cip[rng.gen_range(0..cip.len())].name),
            90..=94 => format!("missing-{}.bench.svc.cluster.local A", rng.gen_range(0..SERVICES)),
            _ => format!("{}.bench.svc.cluster.local AAAA", cip[rng.gen_range(0..cip.len())].name),
        };
        q.push_str(&line);
        q.push('\n');
    }
    q
}

struct Guard(Child);
impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn http_get(addr: &str, path: &str) -> Option<String> {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes()).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.contains(" 200 ").then(|| out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
}

/// VmRSS, VmHWM and RssAnon (the private part: VmRSS also counts the pages of the 26 MB `weft` binary the
/// process touched, about 8 MB, shared with every other weft daemon).
fn rss_kb(pid: u32) -> (u64, u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"), field("RssAnon:"))
}

fn dig_ok(port: u16, name: &str, want: &str) -> bool {
    Command::new("dig")
        .args(["@127.0.0.1", "-p", &port.to_string(), name, "+short", "+time=1", "+tries=1"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == want)
        .unwrap_or(false)
}

#[derive(Debug, Clone, Default)]
struct Perf {
    qps: f64,
    avg_ms: f64,
    lost: String,
    sent: u64,
}

impl Perf {
    /// The round's sample for `weft_lab::rounds`: QPS, and dnsperf's lost queries beyond the tolerance as
    /// errors (no count printed: all lost).
    fn sample(&self) -> Sample {
        let lost = self.lost.split_whitespace().next().and_then(|n| n.parse::<u64>().ok()).unwrap_or(self.sent);
        Sample::from_loss(self.qps, lost, self.sent)
    }
}

fn dnsperf(port: u16, queries: &Path, secs: u64) -> Result<Perf> {
    let out = Command::new("dnsperf")
        .args(["-s", "127.0.0.1", "-p", &port.to_string(), "-d"])
        .arg(queries)
        .args(["-l", &secs.to_string(), "-c", "4", "-q", "500", "-T", "1"])
        .output()
        .context("running dnsperf (is it installed? run scripts/setup.sh)")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let num = |key: &str| -> Option<f64> {
        text.lines().find_map(|l| l.trim().strip_prefix(key)).and_then(|v| v.split_whitespace().next()?.parse().ok())
    };
    let lost = text.lines().find_map(|l| l.trim().strip_prefix("Queries lost:")).unwrap_or("?").trim().to_string();
    match (num("Queries per second:"), num("Average Latency (s):")) {
        (Some(qps), Some(avg)) => {
            Ok(Perf { qps, avg_ms: avg * 1000.0, lost, sent: num("Queries sent:").map_or(0, |n| n as u64) })
        }
        _ => bail!("dnsperf printed no result:\n{text}{}", String::from_utf8_lossy(&out.stderr)),
    }
}

/// Per-query latencies (ms) at a fixed rate, from dnsperf's verbose lines: p50, p90, p99, p99.9, max.
fn latency(port: u16, queries: &Path, qps: u32, secs: u64) -> Result<[f64; 5]> {
    let out = Command::new("dnsperf")
        .args(["-s", "127.0.0.1", "-p", &port.to_string(), "-d"])
        .arg(queries)
        .args(["-l", &secs.to_string(), "-Q", &qps.to_string(), "-v"])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    // "> NOERROR name type 0.000123"
    let mut lat: Vec<f64> = text
        .lines()
        .filter(|l| l.starts_with("> "))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .map(|s| s * 1000.0)
        .collect();
    ensure!(
        lat.len() > 100,
        "dnsperf -v gave {} latencies:\n{}",
        lat.len(),
        text.lines().take(20).collect::<Vec<_>>().join("\n")
    );
    lat.sort_by(|a, b| a.total_cmp(b));
    let p = |q: f64| lat[((lat.len() as f64 * q).ceil() as usize).clamp(1, lat.len()) - 1];
    Ok([p(0.5), p(0.9), p(0.99), p(0.999), p(1.0)])
}

/// A DNS query for `name` A, id `id`, recursion desired.
fn a_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = Vec::with_capacity(64);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// Skips a (possibly compressed) name at `at`; the offset after it.
fn skip_name(m: &[u8], mut at: usize) -> Option<usize> {
    loop {
        let len = *m.get(at)?;
        if len & 0xc0 == 0xc0 {
            return Some(at + 2);
        }
        if len == 0 {
            return Some(at + 1);
        }
        at += 1 + usize::from(len);
    }
}

/// The first A record of a response to query `id`.
fn first_a(m: &[u8], id: u16) -> Option<std::net::Ipv4Addr> {
    if m.len() < 12 || u16::from_be_bytes([m[0], m[1]]) != id {
        return None;
    }
    let (qd, an) = (u16::from_be_bytes([m[4], m[5]]), u16::from_be_bytes([m[6], m[7]]));
    let mut at = 12;
    for _ in 0..qd {
        at = skip_name(m, at)? + 4;
    }
    for _ in 0..an {
        at = skip_name(m, at)?;
        let rtype = u16::from_be_bytes([*m.get(at)?, *m.get(at + 1)?]);
        let rdlen = usize::from(u16::from_be_bytes([*m.get(at + 8)?, *m.get(at + 9)?]));
        at += 10;
        if rtype == 1 && rdlen == 4 {
            let r = m.get(at..at + 4)?;
            return Some(std::net::Ipv4Addr::new(r[0], r[1], r[2], r[3]));
        }
        at += rdlen;
    }
    None
}

/// Changes the cluster IP of `n` services (`svc-8999` down) one at a time and returns, for each, the milliseconds from
/// etcd's acknowledgement until `weft dns` on `port` answers the new address.
fn update_latencies(rt: &tokio::runtime::Runtime, endpoint: &str, port: u16, n: usize) -> Result<Vec<f64>> {
    let mut c = rt.block_on(etcd_client::Client::connect([endpoint], None))?;
    let sock = UdpSocket::bind("127.0.0.1:0")?;
    sock.connect(("127.0.0.1", port))?;
    sock.set_read_timeout(Some(Duration::from_millis(50)))?;
    let mut out = Vec::with_capacity(n);
    let mut buf = [0u8; 1500];
    for i in 0..n {
        // 10.101.0.0/16: not used before. From the last ClusterIP service down: `svc-0` is the probe both servers
        // must answer alike.
        let ip = std::net::Ipv4Addr::from(0x0A65_0000u32 + i as u32 + 1);
        let name = format!("svc-{}", SERVICES - HEADLESS - 1 - i);
        let svc = serde_json::json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "bench"},
            "spec": {"clusterIP": ip.to_string(), "clusterIPs": [ip.to_string()],
                "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}});
        rt.block_on(c.put(format!("/registry/services/bench/{name}"), svc.to_string(), None))?;
        let written = Instant::now();
        let qname = format!("{name}.bench.svc.cluster.local");
        let mut id = 0u16;
        loop {
            id = id.wrapping_add(1);
            sock.send(&a_query(id, &qname))?;
            // Replies to earlier, timed-out queries carry other ids and are skipped.
            let seen = loop {
                match sock.recv(&mut buf) {
                    Ok(_) if u16::from_be_bytes([buf[0], buf[1]]) != id => continue,
                    Ok(len) => break first_a(&buf[..len], id),
                    Err(_) => break None,
                }
            };
            if seen == Some(ip) {
                out.push(written.elapsed().as_secs_f64() * 1000.0);
                break;
            }
            ensure!(written.elapsed() < Duration::from_secs(30), "{qname} never answered {ip}");
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    Ok(out)
}

fn main() -> Result<()> {
    let rounds: usize = std::env::var("BENCH_DNS_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(2);
    let secs: u64 = std::env::var("BENCH_DNS_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(10);
    let updates: usize = std::env::var("BENCH_DNS_UPDATES").ok().and_then(|v| v.parse().ok()).unwrap_or(200);
    let weft = weft_lab::weft_bin();
    let dir = tempfile::Builder::new().prefix("weft-dnsbench-").tempdir()?;
    let svcs = services();

    eprintln!("dns bench: etcd with {SERVICES} services ({HEADLESS} headless x {ENDPOINTS_PER} endpoints)");
    let etcd = EtcdFixture::start()?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(load_etcd(etcd.endpoint(), &svcs))?;

    let (wport, kport) = (free_port(), free_port());
    let metrics = format!("127.0.0.1:{}", free_port());
    let wlog = std::fs::File::create(dir.path().join("weft-dns.log"))?;
    let started = Instant::now();
    let wchild = Command::new(&weft)
        .args(["dns", "--listen", &format!("127.0.0.1:{wport}"), "--etcd-endpoints", etcd.endpoint()])
        .args(["--upstream", "127.0.0.1:9", "--metrics-bind-address", &metrics, "--healthz-bind-address", ""])
        .stdin(Stdio::null())
        .stdout(wlog.try_clone()?)
        .stderr(wlog)
        .spawn()
        .with_context(|| format!("starting {}", weft.display()))?;
    let wpid = wchild.id();
    let _w = Guard(wchild);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(m) = http_get(&metrics, "/metrics") {
            if m.lines().any(|l| l == format!("weft_dns_index_services {SERVICES}")) {
                break;
            }
        }
        if Instant::now() > deadline {
            bail!(
                "weft dns did not sync {SERVICES} services: {}",
                std::fs::read_to_string(dir.path().join("weft-dns.log"))?
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let sync_took = started.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    let rss_synced = rss_kb(wpid);
    let m = http_get(&metrics, "/metrics").unwrap_or_default();
    let gauge = |k: &str| m.lines().find_map(|l| l.strip_prefix(k)).unwrap_or("?").trim().to_string();
    let (names, records, rebuild) =
        (gauge("weft_dns_index_names "), gauge("weft_dns_index_records "), gauge("weft_dns_index_rebuild_seconds "));
    eprintln!("dns bench: weft dns synced in {sync_took:?} ({names} names, {records} records, index built in {rebuild} s), VmRSS {} kB, RssAnon {} kB", rss_synced.0, rss_synced.2);
    let mut upd = update_latencies(&rt, etcd.endpoint(), wport, updates)?;
    upd.sort_by(|a, b| a.total_cmp(b));
    let pct = |q: f64| upd[((upd.len() as f64 * q).ceil() as usize).clamp(1, upd.len()) - 1];
    let (u50, u99, umax) = (pct(0.5), pct(0.99), pct(1.0));
    eprintln!("dns bench: {updates} service changes visible after p50 {u50:.2} ms, p99 {u99:.2} ms, max {umax:.2} ms");

    let zone = dir.path().join("cluster.local.zone");
    std::fs::write(&zone, zone_file(&svcs))?;
    let kdir = dir.path().join("knot");
    std::fs::create_dir_all(&kdir)?;
    let conf = format!(
        "server:\n    listen: 127.0.0.1@{kport}\n    rundir: \"{d}\"\n    udp-workers: 2\n    tcp-workers: 1\n    background-workers: 1\n\
         database:\n    storage: \"{d}\"\nlog:\n  - target: stderr\n    any: warning\n\
         zone:\n  - domain: cluster.local\n    storage: \"{z}\"\n    file: \"cluster.local.zone\"\n    journal-content: none\n    zonefile-sync: -1\n",
        d = kdir.display(),
        z = dir.path().display()
    );
    std::fs::write(kdir.join("knot.conf"), conf)?;
    let klog = std::fs::File::create(dir.path().join("knot.log"))?;
    let kchild = Command::new("knotd")
        .arg("-c")
        .arg(kdir.join("knot.conf"))
        .stdin(Stdio::null())
        .stdout(klog.try_clone()?)
        .stderr(klog)
        .spawn()
        .context("starting knotd (is knot installed? run scripts/setup.sh)")?;
    let _k = Guard(kchild);
    let probe = "svc-0.bench.svc.cluster.local";
    let deadline = Instant::now() + Duration::from_secs(60);
    while !dig_ok(kport, probe, "10.100.0.1") {
        if Instant::now() > deadline {
            bail!("knotd does not answer: {}", std::fs::read_to_string(dir.path().join("knot.log"))?);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    ensure!(dig_ok(wport, probe, "10.100.0.1"), "weft dns does not answer {probe}");

    let queries = dir.path().join("queries.txt");
    std::fs::write(&queries, query_file(&svcs))?;
    let (mut ws, mut ks) = (Vec::new(), Vec::new());
    let mut rows = Vec::new();
    for r in 1..=rounds {
        // weft and Knot swap who runs first every round; a dnsperf that fails outright is a rejected round.
        let (mut w, mut k) = (None, None);
        for side in rounds::order(r - 1, 2) {
            let (port, slot) = if side == 0 { (wport, &mut w) } else { (kport, &mut k) };
            *slot = Some(dnsperf(port, &queries, secs).unwrap_or_else(|e| {
                eprintln!("dns bench: round {r}: {e:#}");
                Perf { qps: f64::NAN, avg_ms: f64::NAN, lost: "?".into(), sent: 0 }
            }));
        }
        let (Some(w), Some(k)) = (w, k) else { bail!("round {r} measured neither side") };
        eprintln!(
            "dns bench: round {r}: weft dns {:.0} QPS (avg {:.3} ms, lost {}), knot {:.0} QPS (avg {:.3} ms, lost {}), ratio {:.2}",
            w.qps, w.avg_ms, w.lost, k.qps, k.avg_ms, k.lost, w.qps / k.qps
        );
        rows.push(format!(
            "| {r} | {:.0} ({:.3} ms avg, lost {}) | {:.0} ({:.3} ms avg, lost {}) | {:.2} |",
            w.qps,
            w.avg_ms,
            w.lost,
            k.qps,
            k.avg_ms,
            k.lost,
            w.qps / k.qps
        ));
        ws.push(w.sample());
        ks.push(k.sample());
    }
    // Rounds with lost queries or a collapsed rate on either side do not count.
    let valid = rounds::valid_rounds(&[("weft dns", &ws), ("Knot", &ks)]);
    let report = rounds::summary(&valid);
    eprintln!("dns bench: {report}");
    ensure!(valid.iter().any(|v| v.is_ok()), "no valid round: {report}");
    let (wq, kq) = (rounds::valid_rates(&ws, &valid), rounds::valid_rates(&ks, &valid));
    let rss_loaded = rss_kb(wpid);
    let wl = latency(wport, &queries, 10_000, 3)?;
    let kl = latency(kport, &queries, 10_000, 3)?;
    let ratio = median(&wq) / median(&kq);

    println!("## DNS: weft dns vs Knot DNS ({SERVICES} services, {HEADLESS} headless x {ENDPOINTS_PER} endpoints)");
    println!();
    println!("`dnsperf -c 4 -q 500 -T 1 -l {secs}` from the same 100,000-query file, alternating rounds (UDP, loopback, 2 cores shared by client and server):");
    println!();
    println!("| round | weft dns, QPS | Knot {}, QPS | weft / Knot |", knot_version());
    println!("|---|---|---|---|");
    for r in rows {
        println!("{r}");
    }
    println!();
    println!(
        "{report} (a round in which either side lost more than {:.1} % of its queries or its rate collapsed is rejected).",
        rounds::LOSS_TOLERANCE * 100.0
    );
    println!();
    println!("| measurement | weft dns | Knot | target | result |");
    println!("|---|---|---|---|---|");
    println!(
        "| QPS, median of valid rounds | {:.0} | {:.0} | ≥ {TARGET_RATIO}× Knot | {ratio:.2}× ({}) |",
        median(&wq),
        median(&kq),
        if ratio >= TARGET_RATIO { "met" } else { "missed" }
    );
    let fmt = |l: [f64; 5]| format!("{:.3} / {:.3} / {:.3} / {:.3} / {:.3}", l[0], l[1], l[2], l[3], l[4]);
    println!("| latency at 10,000 QPS, ms: p50 / p90 / p99 / p99.9 / max | {} | {} | none set | |", fmt(wl), fmt(kl));
    let within = rss_synced.0.max(rss_loaded.0) <= TARGET_RSS_KB;
    println!(
        "| `weft dns` VmRSS after sync / after load (peak VmHWM) | {:.1} MB / {:.1} MB ({:.1} MB) | | ≤ 32 MB | {} |",
        rss_synced.0 as f64 / 1024.0,
        rss_loaded.0 as f64 / 1024.0,
        rss_loaded.1 as f64 / 1024.0,
        if within { "met" } else { "missed" }
    );
    println!(
        "| `weft dns` RssAnon (private memory, without the binary's pages) after sync / after load | {:.1} MB / {:.1} MB | | | |",
        rss_synced.2 as f64 / 1024.0,
        rss_loaded.2 as f64 / 1024.0
    );
    println!(
        "| one Service change → answered ({updates} changes, from etcd's ack), ms: p50 / p99 / max | {u50:.2} / {u99:.2} / {umax:.2} | | ≤ {TARGET_UPDATE_P99_MS} ms p99 | {} |",
        if u99 <= TARGET_UPDATE_P99_MS { "met" } else { "missed" }
    );
    println!("| first sync of {SERVICES} services (start → index served) | {:.2} s ({names} names, {records} records; index build {rebuild} s) | | | |", sync_took.as_secs_f64());
    Ok(())
}

fn knot_version() -> String {
    Command::new("knotd")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).split_whitespace().last().map(String::from))
        .unwrap_or_default()
}
