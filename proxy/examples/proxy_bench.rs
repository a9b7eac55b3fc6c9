//! Service proxy benchmarks (iptables mode): weft's prefix-tree dispatch beside kube-proxy's own layout
//! (a linear WEFT-SERVICES list, `dispatch_leaf: usize::MAX`), measured side by side in one run.
//!
//! 1. Data path, new connections: wrk (`Connection: close`) from a client namespace through a node
//!    namespace (routes, ip_forward, the rules) to a server namespace answering every endpoint address
//!    (`local 10.244.0.0/15` on lo) with a tiny HTTP server. One node namespace per variant — no rules,
//!    10 services (weft, kube-proxy layout), N services × 10 endpoints (weft, kube-proxy layout) — each
//!    with its own client namespace and its own link to the one server namespace, so every variant is
//!    loaded once and the rounds alternate between them. Targets per variant: a VIP (the median address,
//!    so kube-proxy's sorted list is walked half-way), one of its endpoints directly (same path, no DNAT),
//!    and pass-through (an address that is no service, routed to the server).
//! 2. Control plane: the two N-service node namespaces are loaded as the control-plane measurement:
//!    weft's full sync (`IptablesDataplane::sync`, batched restores, including its `iptables-save` and
//!    render) vs one `iptables-restore --noflush` of kube-proxy's layout; repeated in fresh namespaces.
//!    Then one endpoint removed, alternating: weft's partial sync vs the minimal `--noflush` restore of
//!    kube-proxy's layout (the changed SVC chain + the deleted SEP chain), and vs what kube-proxy ≥ 1.27
//!    writes on a partial sync (the same plus its whole KUBE-SERVICES chain).
//! 3. Memory: a real `weft proxy` (WEFT_BIN, else target/release/weft) in its own namespace with its own
//!    etcd, fed N Services + N Endpoints; VmRSS/VmHWM after its first full sync.
//!
//! `WEFT_BIN=target/release/weft cargo run --release -p weft-proxy --example proxy_bench`
//! Env: BENCH_ROUNDS (3), BENCH_SECS (5), BENCH_SERVICES (10000), BENCH_CP_REPS (2: full syncs),
//! BENCH_PARTIAL_REPS (5), BENCH_WRK_CONNS (16), BENCH_ONLY=memory (just part 3). Markdown on stdout, progress on stderr; exits non-zero
//! only when a measurement could not be taken (never because a target was missed).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use weft_lab::Netns;
use weft_proxy::iptables::{
    endpoint_chain, render_partial, render_sync_full, service_chains, CommandRunner, Config, Existing,
    IptablesDataplane,
};
mod common;
use common::{conntrack_sysctls, env_or, median, spread, tw_sysctls, wrk, HttpServer, Wrk, HTTP_PORT};
use weft_lab::rounds::{self, Sample};
use weft_proxy::{Dataplane, Endpoint, Protocol, ServiceEntry, ServicePort, ServicePortName, ServiceTable};

/// Endpoint addresses (`big_table`: 10.244.0.0 + i * eps + j) all answer in the server namespace.
const ENDPOINT_NET: &str = "10.244.0.0/15";
/// Addresses that are no service: routed to the server, which answers on them too.
const PASS_NET: &str = "172.20.0.0/16";
const PASS_ADDR: &str = "172.20.0.1";
const TARGET_VIP_DIRECT: f64 = 0.9;
const TARGET_FULL: f64 = 0.5;
const TARGET_PARTIAL: f64 = 1.5;
/// How `daemon_rss` reports a proxy that cannot list its objects (etcd-client's 4 MiB gRPC message limit).
const TOO_LARGE: &str = "the proxy's etcd list exceeds the gRPC message limit";
/// Below that limit with 10 endpoints per service (10,000 Endpoints objects are 4.36 MB).
const RSS_FALLBACK_SERVICES: u32 = 9_000;

/// Set by SIGINT/SIGTERM: the program stops at the next step and its guards remove every namespace (a
/// Ctrl-C also reaches the running wrk or iptables-restore, whose failure ends the step early).
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::Relaxed) {
        bail!("interrupted");
    }
    Ok(())
}

/// `n` services with random-looking VIPs in 10.96.0.0/12 (as an allocator spreads them), `eps` endpoints
/// each, port 80 → 8080.
fn big_table(n: u32, eps: u32) -> ServiceTable {
    let mut t = ServiceTable::new();
    let mut used = BTreeSet::new();
    let mut x: u32 = 12345;
    for i in 0..n {
        let vip = loop {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            let vip = Ipv4Addr::from(0x0A60_0000 | (x >> 12) & 0x000F_FFFF);
            if used.insert(vip) {
                break vip;
            }
        };
        let endpoints = (0..eps)
            .map(|j| {
                let k = i * eps + j;
                Endpoint {
                    ip: Ipv4Addr::from(0x0AF4_0000 + k),
                    port: HTTP_PORT,
                    node_name: Some(node_of(k).into()),
                    is_local: node_of(k) == BENCH_NODE,
                    ready: true,
                }
            })
            .collect();
        let port = ServicePort::cluster_ip(vip, 80);
        t.insert(spn(i), ServiceEntry { port, endpoints });
    }
    t
}

/// The endpoints' pods are spread over `NODES` nodes, as the Endpoints controller names them; the
/// measured node is one of them (so 1 % of the endpoints are local and get a hairpin rule in weft's layout).
const NODES: u32 = 100;
const BENCH_NODE: &str = "node-0";
fn node_of(k: u32) -> String {
    format!("node-{}", k % NODES)
}

fn spn(i: u32) -> ServicePortName {
    ServicePortName::new("bench", &format!("svc-{i}"), "", Protocol::Tcp)
}

fn tree_cfg() -> Config {
    Config::default()
}

/// kube-proxy's layout (a linear service list, a SEP chain per endpoint), written in one restore as kube-proxy does.
fn linear_cfg() -> Config {
    Config { dispatch_leaf: usize::MAX, restore_batch_rules: usize::MAX, endpoint_chains: true, ..Config::default() }
}

/// The service whose VIP is the median address: kube-proxy's list (sorted here) is walked half-way.
fn median_service(t: &ServiceTable) -> (Ipv4Addr, Ipv4Addr) {
    let mut v: Vec<(Ipv4Addr, Ipv4Addr)> =
        t.values().map(|e| (e.port.cluster_ip.unwrap(), e.endpoints[0].ip)).collect();
    v.sort();
    v[v.len() / 2]
}

/// One `iptables-restore --noflush` in `ns`; with a limit, None when it was killed at the limit.
fn restore(ns: &Netns, text: &str, limit: Option<Duration>) -> Result<Option<Duration>> {
    let started = Instant::now();
    let mut cmd = match limit {
        Some(l) => {
            let mut c = ns.command("timeout");
            c.arg(format!("{}", l.as_secs().max(1))).arg("iptables-restore");
            c
        }
        None => ns.command("iptables-restore"),
    };
    let mut child = cmd
        .args(["-w", "5", "--noflush"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut stdin = child.stdin.take().ok_or_else(|| anyhow!("no stdin"))?;
    let data = text.as_bytes().to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&data));
    let out = child.wait_with_output()?;
    let elapsed = started.elapsed();
    let _ = writer.join();
    if limit.is_some() && out.status.code() == Some(124) {
        return Ok(None);
    }
    if !out.status.success() {
        bail!("iptables-restore in {}: {}", ns.name(), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(Some(elapsed))
}

fn count_chains(ns: &Netns, prefix: &str) -> Result<usize> {
    Ok(ns.exec("iptables-save", &["-t", "nat"])?.lines().filter(|l| l.starts_with(prefix)).count())
}

// ---------------------------------------------------------------------------------------------------------
// Topology

/// One node namespace with its client namespace, linked to the shared server namespace.
struct Path {
    label: &'static str,
    client: Netns,
    node: Netns,
}

fn build_path(k: usize, label: &'static str, server: &Netns) -> Result<Path> {
    let client = Netns::create(&format!("pc{k}"))?;
    let node = Netns::create(&format!("pn{k}"))?;
    let (cn, nn, sn) = (client.name(), node.name(), server.name());
    let c_net = format!("192.168.{}", 100 + k);
    let s_net = format!("192.168.{}", 200 + k);
    let run = |args: &[&str]| weft_lab::netns::run(Command::new("ip").args(args)).map(|_| ());
    // client eth0 <-> node c ; node s <-> server n<k>
    run(&["link", "add", "eth0", "netns", cn, "type", "veth", "peer", "name", "c", "netns", nn])?;
    let srv_if = format!("n{k}");
    run(&["link", "add", "s", "netns", nn, "type", "veth", "peer", "name", &srv_if, "netns", sn])?;
    client.ip(&["addr", "add", &format!("{c_net}.2/24"), "dev", "eth0"])?;
    client.ip(&["link", "set", "eth0", "up"])?;
    client.ip(&["route", "add", "default", "via", &format!("{c_net}.1")])?;
    node.ip(&["addr", "add", &format!("{c_net}.1/24"), "dev", "c"])?;
    node.ip(&["addr", "add", &format!("{s_net}.1/24"), "dev", "s"])?;
    node.ip(&["link", "set", "c", "up"])?;
    node.ip(&["link", "set", "s", "up"])?;
    node.ip(&["route", "add", ENDPOINT_NET, "via", &format!("{s_net}.2")])?;
    node.ip(&["route", "add", PASS_NET, "via", &format!("{s_net}.2")])?;
    node.sysctl("net.ipv4.ip_forward", "1")?;
    server.ip(&["addr", "add", &format!("{s_net}.2/24"), "dev", &srv_if])?;
    server.ip(&["link", "set", &srv_if, "up"])?;
    server.ip(&["route", "add", &format!("{c_net}.0/24"), "via", &format!("{s_net}.1")])?;
    tw_sysctls(&client)?;
    Ok(Path { label, client, node })
}

/// After rules exist in the node namespace (conntrack is per namespace and loaded by then).
fn node_conntrack_sysctl(node: &Netns) {
    if let Err(e) = conntrack_sysctls(node) {
        eprintln!("  note: {}: {e:#}", node.name());
    }
}

// ---------------------------------------------------------------------------------------------------------
// Control plane

struct FullSync {
    weft: Duration,
    weft_render: Duration,
    /// kube-proxy's layout in the same 2,000-rule `--noflush` restores weft uses.
    kube: Duration,
    kube_rules: usize,
    kube_batches: usize,
    weft_rules: usize,
    weft_batches: usize,
}

/// Loads weft's tree into `weft_ns` (a real full sync: `iptables-save`, render, batched restores) and
/// kube-proxy's layout into `kube_ns` in the same batches (restore time only), back to back; returns
/// the dataplane (for partial syncs) and the timings.
fn full_syncs(
    table: &ServiceTable,
    weft_ns: &Netns,
    kube_ns: &Netns,
    weft_first: bool,
) -> Result<(IptablesDataplane, FullSync)> {
    let started = Instant::now();
    let rendered = render_sync_full(table, &tree_cfg(), &Existing::default());
    let weft_render = started.elapsed();
    let (weft_rules, weft_batches) = (rendered.stats.rules_written, rendered.batches.len());
    drop(rendered);
    let kube_cfg = Config { restore_batch_rules: tree_cfg().restore_batch_rules, ..linear_cfg() };
    let kube_r = render_sync_full(table, &kube_cfg, &Existing::default());
    let (kube_rules, kube_batches) = (kube_r.stats.rules_written, kube_r.batches.len());
    let mut dp =
        IptablesDataplane::new(CommandRunner::with_prefix(["ip", "netns", "exec", weft_ns.name()]), tree_cfg());
    let mut weft = Duration::ZERO;
    let mut kube = Duration::ZERO;
    for step in 0..2 {
        if (step == 0) == weft_first {
            eprintln!("  weft full sync into {} ...", weft_ns.name());
            weft = dp.sync(table, None).context("weft full sync")?.duration;
            eprintln!("  weft full sync: {:.2} s", weft.as_secs_f64());
        } else {
            eprintln!("  kube-proxy layout, {kube_batches} iptables-restore --noflush into {} ...", kube_ns.name());
            for b in &kube_r.batches {
                check_interrupted()?;
                kube += restore(kube_ns, b, None)?.ok_or_else(|| anyhow!("restore timed out"))?;
            }
            eprintln!("  kube-proxy layout, batched: {:.2} s", kube.as_secs_f64());
        }
    }
    Ok((dp, FullSync { weft, weft_render, kube, kube_rules, kube_batches, weft_rules, weft_batches }))
}

/// kube-proxy's own way: the whole ruleset in one `iptables-restore --noflush` (one COMMIT per table),
/// into a fresh namespace, given up after `limit` (None: it did not finish in time).
fn one_restore(table: &ServiceTable, limit: Duration) -> Result<Option<Duration>> {
    let ns = Netns::create("pone")?;
    let text = render_sync_full(table, &linear_cfg(), &Existing::default()).text();
    eprintln!("  kube-proxy layout, ONE iptables-restore --noflush ({} bytes), limit {limit:?} ...", text.len());
    let r = restore(&ns, &text, Some(limit))?;
    match r {
        Some(d) => eprintln!("  kube-proxy layout, one restore: {:.2} s", d.as_secs_f64()),
        None => eprintln!("  kube-proxy layout, one restore: not done after {limit:?}, killed"),
    }
    Ok(r)
}

struct Partial {
    weft: Duration,
    kube_min: Duration,
    kube_real: Duration,
    weft_bytes: usize,
    kube_min_bytes: usize,
    kube_real_bytes: usize,
}

/// Removes the last endpoint of service `i`: weft's partial sync in `weft_ns`, and kube-proxy's minimal
/// restore (and kube-proxy's real partial restore, with the whole KUBE-SERVICES) in `kube_ns`.
fn partial_syncs(
    table: &mut ServiceTable,
    kube_state: &mut weft_proxy::iptables::ChainState,
    services_chain: &str,
    dp: &mut IptablesDataplane,
    kube_ns: &Netns,
    i: u32,
) -> Result<Partial> {
    let name = spn(i);
    let entry = table.get_mut(&name).ok_or_else(|| anyhow!("no svc-{i}"))?;
    let removed = entry.endpoints.pop().ok_or_else(|| anyhow!("svc-{i} has no endpoints"))?;
    let changed: BTreeSet<ServicePortName> = [name.clone()].into();
    let stats = dp.sync(table, Some(&changed)).context("weft partial sync")?;
    if stats.full {
        bail!("weft's partial sync went full");
    }
    let p = render_partial(table, &changed, &linear_cfg(), kube_state);
    let text = p.text();
    // What kube-proxy's minimal form is: only the changed chains, nothing else.
    let svc = service_chains(&name).svc;
    let sep = endpoint_chain(&name, &removed);
    if !(text.contains(&format!(":{svc} ")) && text.contains(&format!("-X {sep}"))) || text.contains(":WEFT-SERVICES ")
    {
        bail!("unexpected minimal restore:\n{}", text);
    }
    *kube_state = p.state;
    let done = |d: Option<Duration>| d.ok_or_else(|| anyhow!("restore timed out"));
    let kube_min = done(restore(kube_ns, &text, None)?)?;
    // kube-proxy (≥ 1.27, MinimizeIPTablesRestore) still rewrites its top-level chains, KUBE-SERVICES
    // included, on every partial sync. Same change again (a no-op for the kernel) with that chain added.
    let real = text.replacen("*nat\n", &format!("*nat\n:WEFT-SERVICES - [0:0]\n{services_chain}"), 1);
    let kube_real = done(restore(kube_ns, &real, None)?)?;
    Ok(Partial {
        weft: stats.duration,
        kube_min,
        kube_real,
        weft_bytes: stats.bytes,
        kube_min_bytes: text.len(),
        kube_real_bytes: real.len(),
    })
}

// ---------------------------------------------------------------------------------------------------------
// Memory of the real daemon

struct Rss {
    rss_kb: u64,
    hwm_kb: u64,
    /// VmRSS 15 s later (steady state: no change in between).
    later_kb: u64,
    sync_s: f64,
    syncs: f64,
    svc_chains: usize,
}

fn proc_status_kb(pid: u32, field: &str) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("no {field} for pid {pid}"))
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

fn daemon_rss(table: &ServiceTable, weft_bin: &std::path::Path) -> Result<Rss> {
    let ns = Netns::create("prss")?;
    let dir = tempfile::Builder::new().prefix("weft-pbench-").tempdir()?;
    let etcd_log = std::fs::File::create(dir.path().join("etcd.log"))?;
    let mut etcd = ns
        .command(weft_lab::bins::etcd()?)
        .arg("--name=bench")
        .arg(format!("--data-dir={}", dir.path().join("etcd").display()))
        .args([
            "--listen-client-urls=http://127.0.0.1:2379",
            "--advertise-client-urls=http://127.0.0.1:2379",
            "--listen-peer-urls=http://127.0.0.1:2380",
            "--initial-advertise-peer-urls=http://127.0.0.1:2380",
            "--initial-cluster=bench=http://127.0.0.1:2380",
            "--initial-cluster-state=new",
            "--log-level=error",
        ])
        .env("ETCD_UNSUPPORTED_ARCH", "")
        .stdin(Stdio::null())
        .stdout(etcd_log.try_clone()?)
        .stderr(etcd_log)
        .spawn()
        .context("starting etcd")?;
    let result = (|| -> Result<Rss> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while ns.exec("curl", &["-sf", "-m", "1", "http://127.0.0.1:2379/health"]).is_err() {
            if Instant::now() > deadline {
                bail!("etcd in {} not healthy", ns.name());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // Services and Endpoints as the API server stores them (JSON under /registry).
        let mut kvs = Vec::new();
        for (name, e) in table {
            let vip = e.port.cluster_ip.unwrap();
            let svc = serde_json::json!({"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": name.name, "namespace": name.namespace},
                "spec": {"clusterIP": vip.to_string(), "ports": [{"port": e.port.port, "protocol": "TCP"}]}});
            let addrs: Vec<_> = e
                .endpoints
                .iter()
                .map(|ep| serde_json::json!({"ip": ep.ip.to_string(), "nodeName": ep.node_name.as_deref()}))
                .collect();
            let eps = serde_json::json!({"apiVersion": "v1", "kind": "Endpoints",
                "metadata": {"name": name.name, "namespace": name.namespace},
                "subsets": [{"addresses": addrs, "ports": [{"port": HTTP_PORT, "protocol": "TCP"}]}]});
            kvs.push((format!("/registry/services/{}/{}", name.namespace, name.name), svc.to_string()));
            kvs.push((format!("/registry/endpoints/{}/{}", name.namespace, name.name), eps.to_string()));
        }
        let n = kvs.len();
        ns.block_on(move || async move {
            let mut c = etcd_client::Client::connect(["http://127.0.0.1:2379"], None).await?;
            for chunk in kvs.chunks(128) {
                let ops: Vec<etcd_client::TxnOp> =
                    chunk.iter().map(|(k, v)| etcd_client::TxnOp::put(k.as_str(), v.as_str(), None)).collect();
                c.txn(etcd_client::Txn::new().and_then(ops)).await?;
            }
            anyhow::Ok(())
        })??;
        eprintln!("  {n} objects in etcd; starting weft proxy in {}", ns.name());
        let log = std::fs::File::create(dir.path().join("proxy.log"))?;
        let mut proxy = ns
            .command(weft_bin)
            .args(["proxy", "--proxy-mode", "iptables", "--hostname-override", BENCH_NODE])
            .args(["--etcd-endpoints", "http://127.0.0.1:2379", "--cluster-cidr", "10.244.0.0/15"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting weft proxy")?;
        let pid = proxy.id();
        let r = (|| -> Result<Rss> {
            let deadline = Instant::now() + Duration::from_secs(240);
            // Synced at least once, and every service is in the kernel.
            let (sync_s, syncs, svc_chains) = loop {
                check_interrupted()?;
                if let Some(st) = proxy.try_wait()? {
                    bail!("weft proxy exited ({st})");
                }
                if let Ok(m) = ns.exec("curl", &["-sf", "-m", "2", "http://127.0.0.1:10249/metrics"]) {
                    let count = metric(&m, "weft_proxy_sync_proxy_rules_duration_seconds_count").unwrap_or(0.0);
                    if count >= 1.0 {
                        let chains = count_chains(&ns, ":WEFT-SVC-")?;
                        if chains == table.len() {
                            let sum =
                                metric(&m, "weft_proxy_sync_proxy_rules_duration_seconds_sum").unwrap_or(f64::NAN);
                            break (sum, count, chains);
                        }
                    }
                }
                let log = std::fs::read_to_string(dir.path().join("proxy.log")).unwrap_or_default();
                if let Some(l) = log.lines().find(|l| l.contains("message length too large")) {
                    bail!("{TOO_LARGE}: {}", l.split("error=").nth(1).unwrap_or(l));
                }
                if Instant::now() > deadline {
                    bail!("weft proxy did not sync every service within 240 s");
                }
                std::thread::sleep(Duration::from_millis(500));
            };
            std::thread::sleep(Duration::from_secs(2));
            let rss_kb = proc_status_kb(pid, "VmRSS:")?;
            let hwm_kb = proc_status_kb(pid, "VmHWM:")?;
            std::thread::sleep(Duration::from_secs(15));
            let later_kb = proc_status_kb(pid, "VmRSS:")?;
            Ok(Rss { rss_kb, hwm_kb, later_kb, sync_s, syncs, svc_chains })
        })();
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        let _ = proxy.wait();
        // What an operator sees: the daemon's own line for each completed first or full sync.
        let log = std::fs::read_to_string(dir.path().join("proxy.log")).unwrap_or_default();
        for l in log.lines().filter(|l| l.contains("sync complete")) {
            eprintln!("  proxy log: {l}");
        }
        if r.is_err() {
            let log = std::fs::read_to_string(dir.path().join("proxy.log")).unwrap_or_default();
            eprintln!("  proxy log tail:\n{}", log.lines().rev().take(10).collect::<Vec<_>>().join("\n"));
        }
        r
    })();
    let _ = etcd.kill();
    let _ = etcd.wait();
    drop(ns);
    result
}

// ---------------------------------------------------------------------------------------------------------
// Summary helpers

fn main() -> Result<()> {
    let rounds: usize = env_or("BENCH_ROUNDS", 3);
    let secs: u64 = env_or("BENCH_SECS", 5);
    let n: u32 = env_or("BENCH_SERVICES", 10_000);
    let cp_reps: usize = env_or("BENCH_CP_REPS", 2).max(1);
    let partial_reps: u32 = env_or("BENCH_PARTIAL_REPS", 5);
    let conns: u32 = env_or("BENCH_WRK_CONNS", 16);
    let one_limit = Duration::from_secs(env_or("BENCH_ONE_RESTORE_LIMIT", 30));
    let weft_bin = std::env::var_os("WEFT_BIN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/weft"));
    let started = Instant::now();
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t);
    }

    // BENCH_ONLY=memory: just the daemon's memory (section 3), for checking a change to it.
    if std::env::var("BENCH_ONLY").as_deref() == Ok("memory") {
        let r = daemon_rss(&big_table(n, 10), &weft_bin)?;
        println!(
            "weft proxy at {n} services x 10: VmRSS {:.1} MB, VmHWM {:.1} MB, VmRSS 15 s later {:.1} MB ({} chains, {} syncs, {:.2} s)",
            r.rss_kb as f64 / 1024.0,
            r.hwm_kb as f64 / 1024.0,
            r.later_kb as f64 / 1024.0,
            r.svc_chains,
            r.syncs,
            r.sync_s
        );
        return Ok(());
    }
    let small = big_table(10, 10);
    let mut large = big_table(n, 10);

    // ---- topology and rules
    eprintln!("== service proxy: building 5 paths (client ns -> node ns -> one server ns)");
    let server = Netns::create("psrv")?;
    tw_sysctls(&server)?;
    server.ip(&["route", "add", "local", ENDPOINT_NET, "dev", "lo"])?;
    server.ip(&["route", "add", "local", PASS_NET, "dev", "lo"])?;
    let labels =
        ["no rules", "10 × 10, weft", "10 × 10, kube-proxy layout", "N × 10, weft", "N × 10, kube-proxy layout"];
    let mut paths = Vec::new();
    for (k, label) in labels.iter().enumerate() {
        paths.push(build_path(k, label, &server)?);
    }
    let http = HttpServer::start(&server)?;

    let mut small_dps = Vec::new();
    for (k, cfg) in [(1, tree_cfg()), (2, linear_cfg())] {
        let mut dp =
            IptablesDataplane::new(CommandRunner::with_prefix(["ip", "netns", "exec", paths[k].node.name()]), cfg);
        dp.sync(&small, None).context("loading 10 services")?;
        small_dps.push(dp);
    }

    eprintln!("== control plane: full sync of {n} services x 10 endpoints, rep 1/{cp_reps} (loads the data path)");
    let mut fulls = Vec::new();
    let (mut dp_large, first) = full_syncs(&large, &paths[3].node, &paths[4].node, true)?;
    fulls.push(first);
    for (k, p) in paths.iter().enumerate() {
        if k > 0 {
            node_conntrack_sysctl(&p.node);
        }
    }
    // The rules really are there.
    let (tree_svc, lin_svc) =
        (count_chains(&paths[3].node, ":WEFT-SVC-")?, count_chains(&paths[4].node, ":WEFT-SVC-")?);
    if tree_svc != n as usize || lin_svc != n as usize {
        bail!("expected {n} service chains, found {tree_svc} (weft) and {lin_svc} (kube-proxy layout)");
    }

    // ---- data path
    let (vip_small, ep_small) = median_service(&small);
    let (vip_large, ep_large) = median_service(&large);
    let targets = |k: usize| -> Vec<(&'static str, String)> {
        let (vip, ep) = if k >= 3 { (vip_large, ep_large) } else { (vip_small, ep_small) };
        let mut t = vec![];
        if k > 0 {
            t.push(("vip", format!("http://{vip}:80/")));
        }
        t.push(("direct", format!("http://{ep}:{HTTP_PORT}/")));
        t.push(("pass", format!("http://{PASS_ADDR}:{HTTP_PORT}/")));
        t
    };
    // Everything answers before anything is timed.
    for (k, p) in paths.iter().enumerate() {
        for (what, url) in targets(k) {
            p.client.exec("curl", &["-sf", "-m", "3", &url]).with_context(|| format!("{}: {what} {url}", p.label))?;
        }
    }
    eprintln!(
        "== data path: wrk -t1 -c{conns} -d{secs}s -H 'Connection: close', {rounds} rounds, variants alternating"
    );
    // results[(variant, target)] = one Wrk per round
    let mut results: BTreeMap<(usize, &'static str), Vec<Wrk>> = BTreeMap::new();
    for round in 0..rounds {
        for k in rounds::order(round, paths.len()) {
            for (what, url) in targets(k) {
                check_interrupted()?;
                // A wrk that fails outright is a rejected round, not the end of the benchmark.
                let w = wrk(&paths[k].client, &url, secs, conns).unwrap_or_else(|e| {
                    eprintln!("   round {}: {} {what}: {e:#}", round + 1, paths[k].label);
                    Wrk { rps: f64::NAN, lat_avg_ms: f64::NAN, lat_p99_ms: f64::NAN, errors: 1 }
                });
                eprintln!(
                    "   round {}: {:<22} {:<6} {:>8.0} conn/s, latency avg {:.2} ms p99 {:.2} ms{}",
                    round + 1,
                    paths[k].label,
                    what,
                    w.rps,
                    w.lat_avg_ms,
                    w.lat_p99_ms,
                    if w.errors > 0 { format!(", {} errors", w.errors) } else { String::new() }
                );
                results.entry((k, what)).or_default().push(w);
            }
        }
    }
    http.stop();

    // ---- control plane: endpoint changes, then further full syncs
    eprintln!("== control plane: {partial_reps} single-endpoint changes at {n} services, alternating");
    let mut kube_state = render_sync_full(&large, &linear_cfg(), &Existing::default()).state;
    let services_chain: String = render_sync_full(&large, &linear_cfg(), &Existing::default())
        .text()
        .lines()
        .filter(|l| l.starts_with("-A WEFT-SERVICES "))
        .map(|l| format!("{l}\n"))
        .collect();
    let mut partials = Vec::new();
    for r in 0..partial_reps {
        check_interrupted()?;
        let p = partial_syncs(&mut large, &mut kube_state, &services_chain, &mut dp_large, &paths[4].node, n / 2 + r)?;
        eprintln!(
            "   change {}: weft partial {:.1} ms ({} B), kube-proxy minimal restore {:.1} ms ({} B), kube-proxy with KUBE-SERVICES {:.1} ms ({} B)",
            r + 1,
            p.weft.as_secs_f64() * 1e3,
            p.weft_bytes,
            p.kube_min.as_secs_f64() * 1e3,
            p.kube_min_bytes,
            p.kube_real.as_secs_f64() * 1e3,
            p.kube_real_bytes
        );
        partials.push(p);
    }
    drop(dp_large);
    drop(small_dps);
    drop(paths);
    drop(server);

    let full_table = big_table(n, 10);
    for rep in 1..cp_reps {
        check_interrupted()?;
        eprintln!("== control plane: full sync, rep {}/{cp_reps} in fresh namespaces", rep + 1);
        let (a, b) = (Netns::create("pcpw")?, Netns::create("pcpk")?);
        let (_, f) = full_syncs(&full_table, &a, &b, rep % 2 == 0)?;
        fulls.push(f);
    }

    check_interrupted()?;
    // kube-proxy's own single restore: at N (given up at the limit), and at N/10 beside weft's full sync.
    eprintln!("== control plane: kube-proxy's layout in ONE restore, as kube-proxy writes it");
    let one_large = one_restore(&full_table, one_limit)?;
    let tenth = big_table((n / 10).max(1), 10);
    let one_small = one_restore(&tenth, one_limit)?;
    let weft_small = {
        let ns = Netns::create("pcps")?;
        let mut dp = IptablesDataplane::new(CommandRunner::with_prefix(["ip", "netns", "exec", ns.name()]), tree_cfg());
        let d = dp.sync(&tenth, None).context("weft full sync at N/10")?.duration;
        eprintln!("  weft full sync at {} services: {:.2} s", tenth.len(), d.as_secs_f64());
        d
    };

    check_interrupted()?;
    // ---- memory
    eprintln!("== memory: weft proxy ({}) fed {n} Services + Endpoints from etcd", weft_bin.display());
    let mut rss_notes = Vec::new();
    let mut rss = None;
    if !weft_bin.exists() {
        rss_notes.push(format!("{} missing: not measured (cargo build --release builds it)", weft_bin.display()));
    } else {
        match daemon_rss(&full_table, &weft_bin) {
            Ok(r) => rss = Some((n, r)),
            Err(e) => {
                eprintln!("  at {n} services: {e:#}");
                rss_notes.push(format!("at {n} services the proxy never synced: {e:#}"));
                if format!("{e:#}").contains(TOO_LARGE) && n > RSS_FALLBACK_SERVICES {
                    let m = RSS_FALLBACK_SERVICES;
                    eprintln!("== memory: again with {m} Services + Endpoints");
                    match daemon_rss(&big_table(m, 10), &weft_bin) {
                        Ok(r) => rss = Some((m, r)),
                        Err(e) => rss_notes.push(format!("at {m} services: {e:#}")),
                    }
                }
            }
        }
    }

    // ---- summary
    let samples = |k: usize, t: &str| -> Vec<Sample> { results[&(k, t)].iter().map(Wrk::sample).collect() };
    // Ratios between the two sides' samples of the same round, over the rounds where neither saw wrk errors
    // or a collapsed rate (`weft_lab::rounds`); the rejected ones are listed after the table.
    let rejected_notes = std::cell::RefCell::new(Vec::new());
    let per_round = |a: (usize, &str), b: (usize, &str)| -> Vec<f64> {
        let (sa, sb) = (samples(a.0, a.1), samples(b.0, b.1));
        let (la, lb) = (format!("{} {}", labels[a.0], a.1), format!("{} {}", labels[b.0], b.1));
        let (r, rejected) = rounds::ratios((&la, &sa), (&lb, &sb));
        for (round, why) in rejected {
            rejected_notes.borrow_mut().push(format!("{la} / {lb}: round {} rejected ({why})", round + 1));
        }
        r
    };
    println!("## Service proxy: new connections through the node (wrk, `Connection: close`, {rounds} alternating rounds x {secs}s, -t1 -c{conns})");
    println!();
    println!("| node namespace holds | target | conn/s (median of valid rounds; min–max) | latency avg / p99, ms (median) | wrk errors (all rounds) |");
    println!("|---|---|---|---|---|");
    for (k, label) in labels.iter().enumerate() {
        let label = label.replace("N ×", &format!("{n} ×"));
        for (what, _) in targets(k) {
            let ws = &results[&(k, what)];
            // This target's valid rounds only (no wrk errors, no collapsed rate).
            let verdicts = rounds::judge(&samples(k, what));
            let ws: Vec<&Wrk> = ws.iter().zip(&verdicts).filter(|(_, v)| v.is_valid()).map(|(w, _)| w).collect();
            let r: Vec<f64> = ws.iter().map(|w| w.rps).collect();
            println!(
                "| {label} | {what} | {:.0} ({:.0}–{:.0}) | {:.2} / {:.2} | {} |",
                median(r.clone()),
                r.iter().copied().fold(f64::INFINITY, f64::min),
                r.iter().copied().fold(0.0, f64::max),
                median(ws.iter().map(|w| w.lat_avg_ms).collect()),
                median(ws.iter().map(|w| w.lat_p99_ms).collect()),
                results[&(k, what)].iter().map(|w| w.errors).sum::<u64>()
            );
        }
    }
    println!();
    println!("| ratio (per round, median; min–max) | result | target | result / target |");
    println!("|---|---|---|---|");
    let row = |name: &str, v: Vec<f64>, target: Option<f64>| {
        let m = median(v.clone());
        match target {
            Some(t) => println!("| {name} | **{m:.2}** ({}) | ≥ {t} | {:.2} |", spread(&v), m / t),
            None => println!("| {name} | {m:.2} ({}) | — | — |", spread(&v)),
        }
    };
    row("10 services, weft: VIP / direct", per_round((1, "vip"), (1, "direct")), Some(TARGET_VIP_DIRECT));
    row("10 services, kube-proxy layout: VIP / direct", per_round((2, "vip"), (2, "direct")), None);
    row(&format!("{n} services: VIP, weft / kube-proxy layout"), per_round((3, "vip"), (4, "vip")), Some(1.0));
    row(
        &format!("{n} services: pass-through, weft / kube-proxy layout"),
        per_round((3, "pass"), (4, "pass")),
        Some(1.0),
    );
    row(&format!("{n} services: direct, weft / kube-proxy layout"), per_round((3, "direct"), (4, "direct")), None);
    row(&format!("{n} services, weft: VIP / direct"), per_round((3, "vip"), (3, "direct")), None);
    row(&format!("{n} services, weft: pass-through / no rules"), per_round((3, "pass"), (0, "pass")), None);
    row(
        &format!("{n} services, kube-proxy layout: pass-through / no rules"),
        per_round((4, "pass"), (0, "pass")),
        None,
    );
    row("10 services, weft: pass-through / no rules", per_round((1, "pass"), (0, "pass")), None);
    println!();
    let notes = rejected_notes.into_inner();
    if notes.is_empty() {
        println!("All {rounds} rounds of every ratio valid (no wrk errors, no collapsed rate).");
    } else {
        for n in notes {
            println!("- {n}");
        }
    }
    println!();

    println!("## Service proxy: control plane at {n} services × 10 endpoints");
    println!();
    println!(
        "| measurement | weft | kube-proxy layout | weft / kube-proxy (median; min–max) | target | result / target |"
    );
    println!("|---|---|---|---|---|---|");
    let full_r: Vec<f64> = fulls.iter().map(|f| f.weft.as_secs_f64() / f.kube.as_secs_f64()).collect();
    let fm = median(full_r.clone());
    println!(
        "| full sync, s (median of {}), vs kube-proxy's layout in the same 2,000-rule restores | {:.2} | {:.2} | **{fm:.2}** ({}) | ≤ {TARGET_FULL} | {:.2} |",
        fulls.len(),
        median(fulls.iter().map(|f| f.weft.as_secs_f64()).collect()),
        median(fulls.iter().map(|f| f.kube.as_secs_f64()).collect()),
        spread(&full_r),
        fm / TARGET_FULL
    );
    let weft_full = median(fulls.iter().map(|f| f.weft.as_secs_f64()).collect());
    match one_large {
        Some(d) => println!(
            "| full sync, s, vs kube-proxy's ONE restore (1 run) | {weft_full:.2} | {:.2} | **{:.2}** | ≤ {TARGET_FULL} | {:.2} |",
            d.as_secs_f64(),
            weft_full / d.as_secs_f64(),
            weft_full / d.as_secs_f64() / TARGET_FULL
        ),
        None => println!(
            "| full sync, s, vs kube-proxy's ONE restore (1 run) | {weft_full:.2} | > {:.0} (killed) | **< {:.2}** | ≤ {TARGET_FULL} | < {:.2} |",
            one_limit.as_secs_f64(),
            weft_full / one_limit.as_secs_f64(),
            weft_full / one_limit.as_secs_f64() / TARGET_FULL
        ),
    }
    let ws = weft_small.as_secs_f64();
    match one_small {
        Some(d) => println!(
            "| at {} services: full sync, s, vs kube-proxy's ONE restore (1 run) | {ws:.2} | {:.2} | {:.2} | ≤ {TARGET_FULL} | {:.2} |",
            tenth.len(),
            d.as_secs_f64(),
            ws / d.as_secs_f64(),
            ws / d.as_secs_f64() / TARGET_FULL
        ),
        None => println!(
            "| at {} services: full sync, s, vs kube-proxy's ONE restore (1 run) | {ws:.2} | > {:.0} (killed) | < {:.2} | ≤ {TARGET_FULL} | — |",
            tenth.len(),
            one_limit.as_secs_f64(),
            ws / one_limit.as_secs_f64()
        ),
    }
    if !partials.is_empty() {
        let pr: Vec<f64> = partials.iter().map(|p| p.weft.as_secs_f64() / p.kube_min.as_secs_f64()).collect();
        let pm = median(pr.clone());
        println!(
            "| one endpoint removed, ms (median of {}) vs kube-proxy's minimal restore | {:.1} | {:.1} | **{pm:.2}** ({}) | ≤ {TARGET_PARTIAL} | {:.2} |",
            partials.len(),
            median(partials.iter().map(|p| p.weft.as_secs_f64() * 1e3).collect()),
            median(partials.iter().map(|p| p.kube_min.as_secs_f64() * 1e3).collect()),
            spread(&pr),
            pm / TARGET_PARTIAL
        );
        let rr: Vec<f64> = partials.iter().map(|p| p.weft.as_secs_f64() / p.kube_real.as_secs_f64()).collect();
        println!(
            "| the same vs kube-proxy's partial restore with its KUBE-SERVICES | {:.1} | {:.1} | {:.2} ({}) | — | — |",
            median(partials.iter().map(|p| p.weft.as_secs_f64() * 1e3).collect()),
            median(partials.iter().map(|p| p.kube_real.as_secs_f64() * 1e3).collect()),
            median(rr.clone()),
            spread(&rr)
        );
    }
    println!();
    for (i, f) in fulls.iter().enumerate() {
        println!(
            "full sync rep {}: weft {:.2} s ({} rules in {} restores; render alone {:.2} s), kube-proxy layout {:.2} s ({} rules in {} restores)",
            i + 1,
            f.weft.as_secs_f64(),
            f.weft_rules,
            f.weft_batches,
            f.weft_render.as_secs_f64(),
            f.kube.as_secs_f64(),
            f.kube_rules,
            f.kube_batches
        );
    }
    if let Some(p) = partials.first() {
        println!(
            "partial sync input: weft {} B, kube-proxy minimal {} B, with KUBE-SERVICES {} B",
            p.weft_bytes, p.kube_min_bytes, p.kube_real_bytes
        );
    }
    println!();
    println!("## Service proxy: memory");
    println!();
    for note in &rss_notes {
        println!("- {note}");
    }
    if let Some((m, r)) = &rss {
        println!(
            "`weft proxy` (iptables mode, release) fed {m} Services + {m} Endpoints (10 addresses each) from etcd in its own namespace: \
             **VmRSS {:.1} MB** (peak VmHWM {:.1} MB; 15 s later {:.1} MB) once every service was in the kernel \
             ({} WEFT-SVC chains; its own metric: {} sync(s) taking {:.2} s in all).",
            r.rss_kb as f64 / 1024.0,
            r.hwm_kb as f64 / 1024.0,
            r.later_kb as f64 / 1024.0,
            r.svc_chains,
            r.syncs,
            r.sync_s
        );
        println!();
    }
    println!("(service proxy benchmark took {:.0} s)", started.elapsed().as_secs_f64());
    if rss.is_none() {
        bail!("the proxy's memory could not be measured");
    }
    Ok(())
}
