//! Convergence benchmark for `weft agent` (VXLAN backend), in a one-node lab with network 10.0.0.0/8.
//!
//! Per repetition (a fresh lab each time):
//! 1. bulk: 1,000 fake remote leases go into etcd as fast as possible (transactions of at most 128 puts,
//!    etcd's default limit); measured from the first write until the node has a route for every one of
//!    them, then checked: 1,000 routes, permanent neighbours and FDB entries on flannel.1.
//! 2. one at a time: 100 more leases, each timed from its etcd put until its route appears (p50, p99).
//! 3. the agent's VmRSS (and VmHWM) from /proc with 1,100 remote leases.
//!
//! Routes are seen without polling: `ip -n <node> monitor route` runs for the whole repetition and a
//! thread timestamps the first appearance of each destination. The agent adds a lease's route after its
//! neighbour and FDB entry, so a route means the lease is fully programmed.
//!
//! `WEFT_BIN=target/release/weft cargo run --release -p weft-tests --example overlay_bench`
//! Env: `BENCH_REPS` (default 3), `BENCH_JSON` (write the results there as JSON as well).
//! Prints a markdown summary on stdout, progress on stderr; exits non-zero only when a measurement
//! could not be taken (never because a target was missed).

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use etcd_client::{Txn, TxnOp};
use weft_lab::lab::{Lab, LabOptions};
use weft_lab::Netns;

const SUBNETS: &str = "/coreos.com/network/subnets";
const NETWORK: &str = "10.0.0.0/8";
const BULK: usize = 1000;
const SEQ: usize = 100;
/// etcd's default `--max-txn-ops`.
const TXN_MAX: usize = 128;
const TARGET_CONVERGE: Duration = Duration::from_secs(1);
const TARGET_P99: Duration = Duration::from_millis(50);
const TARGET_RSS_KB: u64 = 30 * 1024;
/// A route destination the bench itself adds to learn that the monitor is listening.
const SENTINEL: &str = "198.51.100.0/24";

type Seen = Arc<Mutex<HashMap<String, Instant>>>;

/// `ip monitor route` in the node's namespace; remembers when each destination first appeared.
struct RouteMonitor {
    child: Child,
    seen: Seen,
    reader: Option<JoinHandle<()>>,
}

impl RouteMonitor {
    fn start(ns: &Netns) -> Result<RouteMonitor> {
        let mut child = Command::new("ip")
            .args(["-n", ns.name(), "monitor", "route"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting ip monitor route")?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("ip monitor has no stdout"))?;
        let seen: Seen = Arc::default();
        let map = seen.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let now = Instant::now();
                if line.starts_with("Deleted") {
                    continue;
                }
                // `10.1.2.0/24 via 10.1.2.0 dev flannel.1 onlink`, `blackhole 198.51.100.0/24`.
                if let Some(dst) = line.split_whitespace().find(|t| t.contains('/')) {
                    map.lock().unwrap().entry(dst.to_string()).or_insert(now);
                }
            }
        });
        let mon = RouteMonitor { child, seen, reader: Some(reader) };
        // Listening yet? (It subscribes some time after it starts.) Add and remove a route of our own
        // until the monitor reports it.
        for _ in 0..100 {
            ns.ip(&["route", "add", "blackhole", SENTINEL])?;
            let ready = wait_for(Duration::from_millis(100), || mon.get(SENTINEL).is_some());
            ns.ip(&["route", "del", "blackhole", SENTINEL])?;
            if ready {
                return Ok(mon);
            }
        }
        bail!("ip monitor route reported nothing within 10 s")
    }

    fn get(&self, dst: &str) -> Option<Instant> {
        self.seen.lock().unwrap().get(dst).copied()
    }

    /// When each of `dsts` first appeared (None for those not seen yet).
    fn times(&self, dsts: &[String]) -> Vec<Option<Instant>> {
        let m = self.seen.lock().unwrap();
        dsts.iter().map(|d| m.get(d).copied()).collect()
    }
}

impl Drop for RouteMonitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A fake remote node: its subnet, a PublicIP in 172.16.0.0/12 that exists nowhere, its own VTEP MAC.
#[derive(Clone)]
struct FakeLease {
    dst: String,
    key: String,
    value: String,
}

fn fake_leases(n: usize, own: &str) -> Vec<FakeLease> {
    let mut out = Vec::with_capacity(n);
    let mut i = 0usize;
    while out.len() < n {
        // 10.1.0.0/24, 10.1.1.0/24, …: away from where the node's own subnet is picked (10.0.x).
        let (a, b) = (1 + i / 256, i % 256);
        let (x, y) = (i / 250, 1 + i % 250);
        i += 1;
        let dst = format!("10.{a}.{b}.0/24");
        if dst == own {
            continue;
        }
        let value = serde_json::json!({
            "PublicIP": format!("172.16.{x}.{y}"),
            "PublicIPv6": null,
            "BackendType": "vxlan",
            "BackendData": {"VNI": 1, "VtepMAC": format!("0e:01:ac:10:{x:02x}:{y:02x}")},
        })
        .to_string();
        out.push(FakeLease { key: format!("{SUBNETS}/10.{a}.{b}.0-24"), dst, value });
    }
    out
}

#[derive(Debug, Default, Clone, serde::Serialize)]
struct Rep {
    /// First write to the last of the 1,000 routes.
    converge_ms: f64,
    /// First write to the last transaction acknowledged by etcd.
    etcd_write_ms: f64,
    /// First write to the first route.
    first_route_ms: f64,
    routes: usize,
    neighs: usize,
    fdbs: usize,
    /// Put to route, one lease at a time, sorted.
    seq_ms: Vec<f64>,
    /// Put to etcd's acknowledgement, for the same puts, sorted.
    seq_put_ms: Vec<f64>,
    rss_kb: u64,
    hwm_kb: u64,
    /// VmRSS split: private memory, and pages of mapped files (the binary, libraries).
    anon_kb: u64,
    file_kb: u64,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Nearest-rank percentile of sorted values.
fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn proc_status_kb(pid: i32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).context("reading the agent's status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow!("no {field} in /proc/{pid}/status"))
}

fn own_subnet(lab: &Lab) -> Result<String> {
    let env = std::fs::read_to_string(lab.node(1).subnet_env_path())?;
    let s = env.lines().find_map(|l| l.strip_prefix("FLANNEL_SUBNET=")).ok_or_else(|| anyhow!("no FLANNEL_SUBNET"))?;
    // 10.0.7.1/24 → 10.0.7.0/24
    let (ip, len) = s.split_once('/').ok_or_else(|| anyhow!("bad FLANNEL_SUBNET {s}"))?;
    let ip: Ipv4Addr = ip.parse()?;
    let len: u32 = len.parse()?;
    let net = u32::from(ip) & (u32::MAX << (32 - len));
    Ok(format!("{}/{len}", Ipv4Addr::from(net)))
}

fn one_rep(rep: usize) -> Result<Rep> {
    let opts = LabOptions { nodes: 1, network: NETWORK.into(), backend: "vxlan".into(), ..LabOptions::default() };
    let lab = Lab::up(opts, &mut |_| {}).context("lab up")?;
    let node = lab.node(1);
    let ns = node.ns();
    // Ready = holds its lease, watches etcd and has programmed the (empty) kernel state.
    let ready = wait_for(Duration::from_secs(30), || {
        ns.exec("curl", &["-sf", "-m", "1", "http://127.0.0.1:8285/healthz"]).is_ok()
    });
    if !ready {
        bail!("agent on node-1 not ready within 30 s");
    }
    let own = own_subnet(&lab)?;
    let all = fake_leases(BULK + SEQ, &own);
    let (bulk, seq) = all.split_at(BULK);
    let mon = RouteMonitor::start(ns)?;
    eprintln!("rep {rep}: lab {} up, node-1 subnet {own}; writing {BULK} leases", lab.id());

    // 1. Bulk: every transaction as soon as the previous one is acknowledged.
    let batches: Vec<Vec<(String, String)>> =
        bulk.chunks(TXN_MAX).map(|c| c.iter().map(|l| (l.key.clone(), l.value.clone())).collect()).collect();
    let (t0, t_written) = lab.etcd(move |mut client| async move {
        let t0 = Instant::now();
        for batch in batches {
            let ops: Vec<TxnOp> = batch.into_iter().map(|(k, v)| TxnOp::put(k, v, None)).collect();
            client.txn(Txn::new().and_then(ops)).await?;
        }
        Ok((t0, Instant::now()))
    })?;
    let dsts: Vec<String> = bulk.iter().map(|l| l.dst.clone()).collect();
    let done = wait_for(Duration::from_secs(60), || mon.times(&dsts).iter().all(Option::is_some));
    let times = mon.times(&dsts);
    let missing = times.iter().filter(|t| t.is_none()).count();
    if !done {
        bail!("rep {rep}: {missing} of {BULK} routes still missing after 60 s");
    }
    let times: Vec<Instant> = times.into_iter().flatten().collect();
    let last = *times.iter().max().expect("routes");
    let first = *times.iter().min().expect("routes");
    let mut r = Rep {
        converge_ms: ms(last.saturating_duration_since(t0)),
        etcd_write_ms: ms(t_written - t0),
        first_route_ms: ms(first.saturating_duration_since(t0)),
        ..Rep::default()
    };

    // Everything the agent must program, counted by the stock tools.
    let want: HashSet<&str> = dsts.iter().map(String::as_str).collect();
    let routes = ns.ip(&["route", "show", "dev", "flannel.1"])?;
    r.routes = routes.lines().filter(|l| l.split_whitespace().next().is_some_and(|d| want.contains(d))).count();
    let neighs = ns.ip(&["neigh", "show", "dev", "flannel.1", "nud", "permanent"])?;
    r.neighs = neighs.lines().filter(|l| l.starts_with("10.")).count();
    let fdb = ns.exec("bridge", &["fdb", "show", "dev", "flannel.1"])?;
    r.fdbs = fdb.lines().filter(|l| l.contains(" dst 172.16.")).count();
    eprintln!(
        "rep {rep}: {BULK} leases programmed {:.0} ms after the first write (etcd took {:.0} ms; first route at {:.0} ms); \
         counted {} routes, {} neighbours, {} fdb entries",
        r.converge_ms, r.etcd_write_ms, r.first_route_ms, r.routes, r.neighs, r.fdbs
    );
    if (r.routes, r.neighs, r.fdbs) != (BULK, BULK, BULK) {
        bail!("rep {rep}: expected {BULK} of each, got routes {} neighs {} fdbs {}", r.routes, r.neighs, r.fdbs);
    }

    // 2. One lease at a time: put, then wait for its route before the next.
    let seen = mon.seen.clone();
    let seq_leases = seq.to_vec();
    let (mut lat, mut put) = lab.etcd(move |mut client| async move {
        let mut lat = Vec::with_capacity(seq_leases.len());
        let mut put = Vec::with_capacity(seq_leases.len());
        for l in seq_leases {
            let t0 = Instant::now();
            client.put(l.key.clone(), l.value.clone(), None).await?;
            put.push(ms(t0.elapsed()));
            loop {
                if let Some(t) = seen.lock().unwrap().get(&l.dst).copied() {
                    lat.push(ms(t.saturating_duration_since(t0)));
                    break;
                }
                if t0.elapsed() > Duration::from_secs(10) {
                    bail!("route for {} not seen within 10 s of its put", l.dst);
                }
                tokio::time::sleep(Duration::from_micros(500)).await;
            }
        }
        Ok((lat, put))
    })?;
    lat.sort_by(f64::total_cmp);
    put.sort_by(f64::total_cmp);
    r.seq_ms = lat;
    r.seq_put_ms = put;
    eprintln!(
        "rep {rep}: {SEQ} single adds: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (etcd put alone: p50 {:.1} ms)",
        pct(&r.seq_ms, 50.0),
        pct(&r.seq_ms, 99.0),
        pct(&r.seq_ms, 100.0),
        pct(&r.seq_put_ms, 50.0)
    );

    // 3. Memory with 1,100 remote leases (the kernel holds 3,300 objects it told us about).
    let pid: i32 = std::fs::read_to_string(node.dir().join("agent.pid"))?.trim().parse()?;
    r.rss_kb = proc_status_kb(pid, "VmRSS:")?;
    r.hwm_kb = proc_status_kb(pid, "VmHWM:")?;
    r.anon_kb = proc_status_kb(pid, "RssAnon:")?;
    r.file_kb = proc_status_kb(pid, "RssFile:")?;
    eprintln!(
        "rep {rep}: agent VmRSS {} kB (peak {} kB; RssAnon {} kB, RssFile {} kB)",
        r.rss_kb, r.hwm_kb, r.anon_kb, r.file_kb
    );
    drop(mon);
    drop(lab);
    Ok(r)
}

fn median(v: Vec<f64>) -> f64 {
    weft_lab::rounds::median(&v)
}

fn main() -> Result<()> {
    let reps: usize = std::env::var("BENCH_REPS").ok().and_then(|s| s.parse().ok()).unwrap_or(3).max(1);
    let started = Instant::now();
    let mut results = Vec::new();
    for rep in 1..=reps {
        results.push(one_rep(rep)?);
    }
    let conv: Vec<f64> = results.iter().map(|r| r.converge_ms).collect();
    let (cmin, cmax) = conv.iter().fold((f64::MAX, f64::MIN), |(a, b), &x| (a.min(x), b.max(x)));
    let cmed = median(conv.clone());
    let mut pooled: Vec<f64> = results.iter().flat_map(|r| r.seq_ms.iter().copied()).collect();
    pooled.sort_by(f64::total_cmp);
    let (p50, p99) = (pct(&pooled, 50.0), pct(&pooled, 99.0));
    let rss = median(results.iter().map(|r| r.rss_kb as f64).collect());
    let hwm = results.iter().map(|r| r.hwm_kb).max().unwrap_or(0);

    let list = |f: &dyn Fn(&Rep) -> String| results.iter().map(f).collect::<Vec<_>>().join(", ");
    println!("## Convergence (1 node, {NETWORK}, {reps} fresh labs, {:.1} s in all)", started.elapsed().as_secs_f64());
    println!();
    println!("| measurement | result | target | result / target |");
    println!("|---|---|---|---|");
    println!(
        "| {BULK} leases, first write → all routes (median of {reps}; min–max) | {cmed:.0} ms ({cmin:.0}–{cmax:.0}) | ≤ {} ms | {:.2} |",
        TARGET_CONVERGE.as_millis(),
        cmed / ms(TARGET_CONVERGE)
    );
    println!(
        "| {SEQ} single adds × {reps}, put → route, p50 / p99 | {p50:.1} / {p99:.1} ms | p99 ≤ {} ms | {:.2} |",
        TARGET_P99.as_millis(),
        p99 / ms(TARGET_P99)
    );
    println!(
        "| agent VmRSS at {} remote leases (median; peak VmHWM) | {:.1} MB ({:.1} MB) | ≤ {} MB | {:.2} |",
        BULK + SEQ,
        rss / 1024.0,
        hwm as f64 / 1024.0,
        TARGET_RSS_KB / 1024,
        rss / TARGET_RSS_KB as f64
    );
    println!();
    println!("per run: converge {} ms", list(&|r| format!("{:.0}", r.converge_ms)));
    println!("per run: etcd writes done {} ms", list(&|r| format!("{:.0}", r.etcd_write_ms)));
    println!("per run: first route {} ms", list(&|r| format!("{:.0}", r.first_route_ms)));
    println!(
        "per run: single add p50/p99/max {} ms",
        list(&|r| format!("{:.1}/{:.1}/{:.1}", pct(&r.seq_ms, 50.0), pct(&r.seq_ms, 99.0), pct(&r.seq_ms, 100.0)))
    );
    println!(
        "per run: etcd put acknowledged p50/p99 {} ms",
        list(&|r| format!("{:.1}/{:.1}", pct(&r.seq_put_ms, 50.0), pct(&r.seq_put_ms, 99.0)))
    );
    println!("per run: VmRSS {} kB", list(&|r| r.rss_kb.to_string()));
    println!("per run: RssAnon / RssFile {} kB", list(&|r| format!("{} / {}", r.anon_kb, r.file_kb)));
    println!("per run: counted routes/neighs/fdbs {}", list(&|r| format!("{}/{}/{}", r.routes, r.neighs, r.fdbs)));

    if let Ok(path) = std::env::var("BENCH_JSON") {
        let json = serde_json::json!({
            "reps": results,
            "converge_ms": {"median": cmed, "min": cmin, "max": cmax, "target": ms(TARGET_CONVERGE)},
            "single_add_ms": {"p50": p50, "p99": p99, "target_p99": ms(TARGET_P99)},
            "rss_kb": {"median": rss, "peak_hwm": hwm, "target": TARGET_RSS_KB},
        });
        std::fs::write(&path, serde_json::to_vec_pretty(&json)?).with_context(|| format!("writing {path}"))?;
    }
    Ok(())
}
