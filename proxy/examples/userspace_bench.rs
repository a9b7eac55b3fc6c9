//! Userspace mode beside HAProxy doing the same job on the same node, measured side by side in one run.
//!
//! Topology: client namespace → node namespace → server namespace (the server answers every endpoint
//! address, `local 10.244.0.0/15` on lo, with the tiny HTTP server). In the node, at the same time:
//! - weft's `UserspaceDataplane` (the code `weft proxy --proxy-mode userspace` runs, on a multi-thread tokio
//!   runtime with one worker per CPU as the daemon uses; BENCH_WORKERS overrides) serving one Service VIP 10.96.0.1:80 → 10 endpoints, reached through its
//!   `REDIRECT` portal rule;
//! - HAProxy (`mode tcp`, `balance roundrobin`, the same 10 servers, its default threads: one per CPU)
//!   listening on the node's address, port 8081, and reached through VIP 10.96.0.2:80 by one `REDIRECT` rule
//!   of the same kind as weft's portal.
//!
//! Two pairs are compared: both relays through a VIP (the userspace mode's job: the target), and both straight
//! on their own port at the node's address (no NAT: the relays alone).
//!
//! Plus "direct": the client to one endpoint, routed through the node (no proxy). wrk with `Connection:
//! close` (new connection, one small request/response, close), rounds alternating the order (weft and HAProxy
//! swap who runs first every round). The node namespace tracks TIME_WAIT for 1 s (its own conntrack table only):
//! with the default 120 s the table filled in the third round and HAProxy fell to ~10 conn/s. A round in which
//! wrk saw errors or a rate collapsed is rejected (`weft_lab::rounds`) and named in the output.
//!
//! `cargo run --release -p weft-proxy --example userspace_bench`
//! Env: BENCH_ROUNDS (3), BENCH_SECS (5), BENCH_WRK_CONNS (16), BENCH_WORKERS (CPUs). Markdown on stdout, progress on stderr.

mod common;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use common::{conntrack_count, conntrack_sysctls, env_or, median, spread, tw_sysctls, wrk, HttpServer, Wrk, HTTP_PORT};
use weft_lab::rounds::{self, Sample};
use weft_lab::Netns;
use weft_proxy::iptables::CommandRunner;
use weft_proxy::userspace::{Config, UserspaceDataplane};
use weft_proxy::{Dataplane, Endpoint, Protocol, ServiceEntry, ServicePort, ServicePortName, ServiceTable};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);
/// A second VIP, REDIRECTed to HAProxy by one rule of the same kind as weft's portal: HAProxy doing the same job.
const HAPROXY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 2);
const NODE_CLIENT_SIDE: &str = "192.168.150.1";
const HAPROXY_PORT: u16 = 8081;
const ENDPOINTS: u32 = 10;

fn endpoint(j: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 244, 0, 1)) + j)
}

/// Kills a child process on drop (HAProxy), even when the benchmark fails half-way.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A tokio runtime whose worker threads live in `ns` (threads inherit the namespace of the thread that
/// creates them, so the runtime is built on a thread that entered it first).
struct NsMultiRuntime {
    handle: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NsMultiRuntime {
    fn start(ns: &Netns, workers: usize) -> Result<NsMultiRuntime> {
        let path = ns.path();
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = weft_lab::netns::enter(&path).and_then(|_| {
                Ok(tokio::runtime::Builder::new_multi_thread().worker_threads(workers).enable_all().build()?)
            });
            match rt {
                Ok(rt) => {
                    let _ = tx.send(Ok(rt.handle().clone()));
                    rt.block_on(async {
                        let _ = stopped.await;
                    });
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
            }
        });
        let handle = rx.recv().context("runtime thread died")??;
        Ok(NsMultiRuntime { handle, stop: Some(stop), thread: Some(thread) })
    }
}

impl Drop for NsMultiRuntime {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn haproxy_config() -> String {
    let mut cfg = String::from(
        "global\n  maxconn 8000\n\ndefaults\n  mode tcp\n  timeout connect 2s\n  timeout client 10s\n  timeout server 10s\n\n",
    );
    cfg += &format!("frontend svc\n  bind {NODE_CLIENT_SIDE}:{HAPROXY_PORT}\n  default_backend eps\n\n");
    cfg += "backend eps\n  balance roundrobin\n";
    for j in 0..ENDPOINTS {
        cfg += &format!("  server ep{j} {}:{HTTP_PORT}\n", endpoint(j));
    }
    cfg
}

fn main() -> Result<()> {
    let rounds: usize = env_or("BENCH_ROUNDS", 3);
    let secs: u64 = env_or("BENCH_SECS", 5);
    let conns: u32 = env_or("BENCH_WRK_CONNS", 16);
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    let workers: usize = env_or("BENCH_WORKERS", cpus);
    let started = Instant::now();

    eprintln!("== userspace vs HAProxy: client ns -> node ns -> server ns");
    let client = Netns::create("uc")?;
    let node = Netns::create("un")?;
    let server = Netns::create("us")?;
    let run = |args: &[&str]| weft_lab::netns::run(Command::new("ip").args(args)).map(|_| ());
    run(&["link", "add", "eth0", "netns", client.name(), "type", "veth", "peer", "name", "c", "netns", node.name()])?;
    run(&["link", "add", "s", "netns", node.name(), "type", "veth", "peer", "name", "eth0", "netns", server.name()])?;
    client.ip(&["addr", "add", "192.168.150.2/24", "dev", "eth0"])?;
    client.ip(&["link", "set", "eth0", "up"])?;
    client.ip(&["route", "add", "default", "via", NODE_CLIENT_SIDE])?;
    node.ip(&["addr", "add", &format!("{NODE_CLIENT_SIDE}/24"), "dev", "c"])?;
    node.ip(&["addr", "add", "192.168.250.1/24", "dev", "s"])?;
    node.ip(&["link", "set", "c", "up"])?;
    node.ip(&["link", "set", "s", "up"])?;
    node.ip(&["link", "set", "lo", "up"])?;
    node.ip(&["route", "add", "10.244.0.0/15", "via", "192.168.250.2"])?;
    node.sysctl("net.ipv4.ip_forward", "1")?;
    server.ip(&["addr", "add", "192.168.250.2/24", "dev", "eth0"])?;
    server.ip(&["link", "set", "eth0", "up"])?;
    server.ip(&["route", "add", "default", "via", "192.168.250.1"])?;
    server.ip(&["route", "add", "local", "10.244.0.0/15", "dev", "lo"])?;
    for ns in [&client, &node, &server] {
        tw_sysctls(ns)?;
    }
    let http = HttpServer::start(&server)?;

    // weft's userspace dataplane, as the daemon runs it.
    let rt = NsMultiRuntime::start(&node, workers)?;
    let runner = CommandRunner::with_prefix(["ip", "netns", "exec", node.name()]);
    let mut dp = UserspaceDataplane::new(runner, Config::default(), rt.handle.clone());
    let mut table = ServiceTable::new();
    table.insert(
        ServicePortName::new("bench", "web", "", Protocol::Tcp),
        ServiceEntry {
            port: ServicePort::cluster_ip(VIP, 80),
            endpoints: (0..ENDPOINTS).map(|j| Endpoint::ready(endpoint(j), HTTP_PORT)).collect(),
        },
    );
    dp.sync(&table, None).context("userspace sync")?;
    // The portal's NAT rules exist now, and with them the node's conntrack table.
    conntrack_sysctls(&node).context("shortening the node namespace's conntrack TIME_WAIT")?;

    // HAProxy beside it.
    let dir = tempfile::Builder::new().prefix("weft-usbench-").tempdir()?;
    let cfg_path = dir.path().join("haproxy.cfg");
    std::fs::write(&cfg_path, haproxy_config())?;
    let log = std::fs::File::create(dir.path().join("haproxy.log"))?;
    let cfg_arg = cfg_path.display().to_string();
    let haproxy = ChildGuard(
        node.command("haproxy")
            .args(["-f", &cfg_arg, "-db"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting haproxy (scripts/setup.sh installs it)")?,
    );

    // The same REDIRECT for HAProxy as weft's portal rule does for weft (nat PREROUTING, in the node).
    let redirect = format!("-d {HAPROXY_VIP}/32 -p tcp --dport 80 -j REDIRECT --to-ports {HAPROXY_PORT}");
    node.exec(
        "iptables",
        &["-w", "-t", "nat", "-I", "PREROUTING"].iter().copied().chain(redirect.split(' ')).collect::<Vec<_>>(),
    )
    .context("the REDIRECT rule for HAProxy's VIP")?;
    let proxy_port = dp.sockets().next().map(|(_, p)| p).context("the userspace proxy socket's port")?;
    // Two pairs: through a VIP (each relay behind one REDIRECT rule: the userspace mode's job) and straight to each
    // relay's own port on the node's address (no NAT: the relays alone).
    let targets: [(&str, String); 5] = [
        ("direct (no proxy)", format!("http://{}:{HTTP_PORT}/", endpoint(0))),
        ("weft userspace, VIP", format!("http://{VIP}:80/")),
        ("HAProxy, VIP", format!("http://{HAPROXY_VIP}:80/")),
        ("weft userspace, its port", format!("http://{NODE_CLIENT_SIDE}:{proxy_port}/")),
        ("HAProxy, its port", format!("http://{NODE_CLIENT_SIDE}:{HAPROXY_PORT}/")),
    ];
    for (what, url) in &targets {
        let deadline = Instant::now() + Duration::from_secs(10);
        while client.exec("curl", &["-sf", "-m", "2", url]).is_err() {
            if Instant::now() > deadline {
                bail!("{what} ({url}) never answered");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    eprintln!(
        "== wrk -t1 -c{conns} -d{secs}s -H 'Connection: close', {rounds} rounds, alternating; weft on {workers} workers"
    );
    let mut results: BTreeMap<usize, Vec<Wrk>> = BTreeMap::new();
    for round in 0..rounds {
        // Reversed every other round: weft and HAProxy swap who runs first.
        for k in rounds::order(round, targets.len()) {
            let (what, url) = &targets[k];
            // A wrk that fails outright is a rejected round, not the end of the benchmark.
            let w = wrk(&client, url, secs, conns).unwrap_or_else(|e| {
                eprintln!("   round {}: {what}: {e:#}", round + 1);
                Wrk { rps: f64::NAN, lat_avg_ms: f64::NAN, lat_p99_ms: f64::NAN, errors: 1 }
            });
            eprintln!(
                "   round {}: {what:<18} {:>8.0} conn/s, latency avg {:.2} ms p99 {:.2} ms{}; node conntrack entries {}",
                round + 1,
                w.rps,
                w.lat_avg_ms,
                w.lat_p99_ms,
                if w.errors > 0 { format!(", {} errors", w.errors) } else { String::new() },
                conntrack_count(&node).map_or("?".into(), |n| n.to_string())
            );
            results.entry(k).or_default().push(w);
        }
    }
    drop(haproxy);
    dp.cleanup().context("userspace cleanup")?;
    drop(dp);
    drop(rt);
    http.stop();

    let samples = |k: usize| -> Vec<Sample> { results[&k].iter().map(Wrk::sample).collect() };
    let all: Vec<Vec<Sample>> = (0..targets.len()).map(samples).collect();
    let sides: Vec<(&str, &[Sample])> = targets.iter().zip(&all).map(|((what, _), s)| (*what, s.as_slice())).collect();
    let valid = rounds::valid_rounds(&sides);
    let kept = |k: usize, f: fn(&Wrk) -> f64| -> Vec<f64> {
        results[&k].iter().zip(&valid).filter(|(_, v)| v.is_ok()).map(|(w, _)| f(w)).collect()
    };
    let rate = |k: usize| median(kept(k, |w| w.rps));
    let p99 = |k: usize| median(kept(k, |w| w.lat_p99_ms));
    let avg = |k: usize| median(kept(k, |w| w.lat_avg_ms));
    let errors = |k: usize| results[&k].iter().map(|w| w.errors).sum::<u64>();
    let report = rounds::summary(&valid);
    eprintln!("   {report}");
    if valid.iter().all(|v| v.is_err()) {
        bail!("no valid round: {report}");
    }
    let n_valid = valid.iter().filter(|v| v.is_ok()).count();
    // Per valid round: weft / HAProxy, so a noisy round shows as spread, not as a shifted median.
    let ratio = |a: usize, b: usize| -> Vec<f64> {
        kept(a, |w| w.rps).iter().zip(kept(b, |w| w.rps)).map(|(x, y)| x / y).collect()
    };
    let (ratios, port_ratios, old_ratios) = (ratio(1, 2), ratio(3, 4), ratio(1, 4));
    println!("| path | new connections/s (median of {n_valid} valid rounds) | latency avg, ms | p99, ms | wrk errors (all rounds) |");
    println!("|---|---|---|---|---|");
    for (k, (what, _)) in targets.iter().enumerate() {
        println!("| {what} | {:.0} | {:.2} | {:.2} | {} |", rate(k), avg(k), p99(k), errors(k));
    }
    println!();
    println!(
        "weft userspace / HAProxy, both through a VIP, connection rate: **{:.2}** (per valid round {}; target ≥ 1.0); \
         p99 latency ratio {:.2}; both on their own port (no NAT): **{:.2}** ({}); weft through its VIP / HAProxy on its \
         port (what runs before 2026-12-06 compared): {:.2} ({}); HAProxy / direct {:.2}, weft / direct {:.2}; \
         weft on {workers} runtime workers; {report}. Took {:.0} s.",
        median(ratios.clone()),
        spread(&ratios),
        p99(1) / p99(2),
        median(port_ratios.clone()),
        spread(&port_ratios),
        median(old_ratios.clone()),
        spread(&old_ratios),
        rate(2) / rate(0),
        rate(1) / rate(0),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
