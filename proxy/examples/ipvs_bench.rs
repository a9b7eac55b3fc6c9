//! ipvs mode beside iptables mode, in one QEMU guest (the host kernel has no IPVS): the guest's CPU is
//! emulated, so only ratios measured side by side mean anything.
//!
//! 1. New connections per second from a client namespace through a node namespace to a server namespace
//!    (which answers on every endpoint address): direct to an endpoint, through a VIP in ipvs mode and in
//!    iptables mode, with 10 and with N services × 10 endpoints programmed.
//! 2. Syncs at N services × 10 endpoints: the first full sync of each mode, then one endpoint changed
//!    (a partial sync), BENCH_PARTIAL_REPS times.
//!
//! One measurement per mode and target (the guest's emulated CPU makes rounds expensive): a measurement in
//! which connections failed is rejected and shown as NaN.
//!
//! Run on the host: `cargo run --release -p weft-proxy --example ipvs_bench` (boots the QEMU lab and copies
//! itself into the guest, where the same binary runs the `guest-*` subcommands). Env: BENCH_IPVS_SERVICES
//! (10000), BENCH_IPVS_SECS (5), BENCH_PARTIAL_REPS (5). Markdown on stdout.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use weft_proxy::iptables::{CommandRunner, IptablesDataplane};
use weft_proxy::ipvs::IpvsDataplane;
use weft_proxy::{Dataplane, Endpoint, Protocol, ServiceEntry, ServicePort, ServicePortName, ServiceTable};

const PORT: u16 = 8080;
const TARGET_FLAT: f64 = 0.9;
const TARGET_FULL: f64 = 0.25;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// N services: VIP 10.96.0.0 + i + 1, endpoints 10.244.0.0 + i * eps + j + 1 (all answered by the server).
fn table(n: u32, eps: u32) -> ServiceTable {
    (0..n)
        .map(|i| {
            let vip = Ipv4Addr::from(0x0A60_0001 + i);
            // Pods spread over 100 nodes, as proxy_bench has them: 1 % are this node's (hairpin members).
            let endpoints = (0..eps)
                .map(|j| {
                    let k = i * eps + j;
                    let node = format!("node-{}", k % 100);
                    Endpoint {
                        is_local: node == "node-0",
                        node_name: Some(node.into()),
                        ..Endpoint::ready(Ipv4Addr::from(0x0AF4_0001 + k), PORT)
                    }
                })
                .collect();
            let name = ServicePortName::new("bench", &format!("svc-{i}"), "", Protocol::Tcp);
            (name, ServiceEntry { port: ServicePort::cluster_ip(vip, 80), endpoints })
        })
        .collect()
}

fn dataplane(mode: &str) -> Result<Box<dyn Dataplane + Send>> {
    Ok(match mode {
        "ipvs" => Box::new(IpvsDataplane::new(CommandRunner::new(), weft_proxy::ipvs::Config::default())),
        "iptables" => Box::new(IptablesDataplane::new(CommandRunner::new(), weft_proxy::iptables::Config::default())),
        _ => bail!("unknown mode {mode}"),
    })
}

/// `guest-program MODE N`: programs N services in MODE in this namespace (removing the other mode's state),
/// reports the full sync and the partial syncs of one endpoint change, and leaves the rules in place.
fn guest_program(mode: &str, n: u32) -> Result<()> {
    // Clear both modes first: an empty full sync of iptables mode sweeps its chains; the ipvs cleanup the rest.
    weft_proxy::ipvs::cleanup_leftovers(&mut CommandRunner::new());
    dataplane("iptables")?.sync(&ServiceTable::new(), None)?;
    let mut t = table(n, 10);
    let mut dp = dataplane(mode)?;
    let started = Instant::now();
    dp.sync(&t, None).with_context(|| format!("{mode}: full sync of {n} services"))?;
    println!("WEFT-VALUE {mode}-{n}-full-ms {}", started.elapsed().as_millis());
    let reps = env_or("BENCH_PARTIAL_REPS", 5);
    let mut times = vec![];
    for r in 0..reps {
        let name = ServicePortName::new("bench", &format!("svc-{}", n / 2), "", Protocol::Tcp);
        if let Some(e) = t.get_mut(&name) {
            // Replace the last endpoint with another address the server answers on, and back.
            let last = e.endpoints.len() - 1;
            e.endpoints[last].ip = Ipv4Addr::from(0x0AF4_0001 + n * 10 + (r as u32 % 2));
        }
        let changed: BTreeSet<ServicePortName> = [name].into();
        let started = Instant::now();
        dp.sync(&t, Some(&changed))?;
        times.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    println!("WEFT-VALUE {mode}-{n}-partial-ms {:.2}", times[times.len() / 2]);
    Ok(())
}

/// `guest-serve`: answers every connection with one byte and closes (threads; the server namespace).
fn guest_serve() -> Result<()> {
    let l = TcpListener::bind(("0.0.0.0", PORT))?;
    for s in l.incoming() {
        let Ok(mut s) = s else { continue };
        std::thread::spawn(move || {
            let _ = s.write_all(b"x");
        });
    }
    Ok(())
}

/// `guest-connect ADDR SECS`: new connections per second (connect, read to EOF, close), 4 in parallel.
fn guest_connect(addr: SocketAddr, secs: u64) -> Result<()> {
    let until = Instant::now() + Duration::from_secs(secs);
    let threads: Vec<_> = (0..4)
        .map(|_| {
            std::thread::spawn(move || {
                let (mut ok, mut failed) = (0u64, 0u64);
                while Instant::now() < until {
                    match TcpStream::connect_timeout(&addr, Duration::from_secs(2)).and_then(|mut s| {
                        let mut b = Vec::new();
                        s.read_to_end(&mut b).map(|_| b)
                    }) {
                        Ok(b) if b == b"x" => ok += 1,
                        _ => failed += 1,
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    let (mut ok, mut failed) = (0, 0);
    for t in threads {
        let (o, f) = t.join().unwrap_or((0, 0));
        ok += o;
        failed += f;
    }
    if ok == 0 {
        bail!("no connection to {addr} succeeded ({failed} failed)");
    }
    println!("{:.1} {failed}", ok as f64 / secs as f64);
    Ok(())
}

fn guest_script(n: u32, secs: u64) -> String {
    format!(
        r#"
nsx() {{ ns=$1; shift; /bin/ip netns exec "$ns" "$@"; }}
for x in node client server; do /bin/ip netns add $x; /bin/ip -n $x link set lo up; done
/bin/ip -n node link add c0 type veth peer name eth0 netns client
/bin/ip -n node link add s0 type veth peer name eth0 netns server
/bin/ip -n node addr add 10.250.0.1/24 dev c0; /bin/ip -n node link set c0 up
/bin/ip -n node addr add 10.251.0.1/24 dev s0; /bin/ip -n node link set s0 up
/bin/ip -n client addr add 10.250.0.2/24 dev eth0; /bin/ip -n client link set eth0 up
/bin/ip -n client route add default via 10.250.0.1
/bin/ip -n server addr add 10.251.0.2/24 dev eth0; /bin/ip -n server link set eth0 up
/bin/ip -n server route add default via 10.251.0.1
/bin/ip -n server route add local 10.244.0.0/15 dev lo
/bin/ip -n node route add 10.244.0.0/15 via 10.251.0.2
nsx node sh -c 'echo 1 > /proc/sys/net/ipv4/ip_forward; echo 1 > /proc/sys/net/netfilter/nf_conntrack_tcp_timeout_time_wait'
for x in client server; do
    nsx $x sh -c 'echo 1024 > /proc/sys/net/ipv4/tcp_max_tw_buckets; echo 1 > /proc/sys/net/ipv4/tcp_tw_reuse; echo "1024 65535" > /proc/sys/net/ipv4/ip_local_port_range'
done
nsx server ipvs_bench guest-serve &
sleep 1
# "<conn/s> <failed connections>"
rate() {{ nsx client ipvs_bench guest-connect "$1" {secs}; }}
# VIP of the middle service, and one of its endpoints.
mid=$(({n} / 2)); vip=$(printf '10.96.%d.%d' $(((mid + 1) / 256)) $(((mid + 1) % 256)))
ep=$(printf '10.244.%d.%d' $(((mid * 10 + 1) / 256)) $(((mid * 10 + 1) % 256)))
small_vip=10.96.0.6; small_ep=10.244.0.51
for mode in ipvs iptables; do
    nsx node ipvs_bench guest-program $mode 10 > /tmp/p 2>&1 || {{ echo "program $mode 10 failed"; cat /tmp/p; }}
    echo "WEFT-VALUE $mode-10-rate $(rate $small_vip:80)"
    echo "WEFT-VALUE direct-10-$mode-rate $(rate $small_ep:8080)"
    nsx node ipvs_bench guest-program $mode {n} > /tmp/p 2>&1 || {{ echo "program $mode {n} failed"; tail -n 20 /tmp/p; }}
    grep WEFT-VALUE /tmp/p
    echo "WEFT-VALUE $mode-{n}-rate $(rate $vip:80)"
    echo "WEFT-VALUE direct-{n}-$mode-rate $(rate $ep:8080)"
done
"#
    )
}

fn host() -> Result<()> {
    if let Some(why) = weft_lab::qemu::unavailable() {
        bail!("{why}");
    }
    let n = env_or("BENCH_IPVS_SERVICES", 10_000) as u32;
    let secs = env_or("BENCH_IPVS_SECS", 5);
    let lab = weft_lab::qemu::KernelLab::build()?;
    let mut run = weft_lab::qemu::GuestRun::new(guest_script(n, secs));
    run.files.push((std::env::current_exe()?, "/usr/bin/ipvs_bench".into()));
    run.deadline = Duration::from_secs(1800);
    eprintln!("ipvs_bench: booting the guest ({n} services; this takes minutes under emulation)");
    let out = lab.boot(&run)?;
    let v = |k: &str| out.value(k).and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok());
    let get = |k: &str| v(k).with_context(|| format!("no {k} in the guest's output:\n{}", out.tail(40)));
    // A rate measurement whose connections failed is rejected (`weft_lab::rounds`), not reported as a rate.
    let mut rejected = vec![];
    let mut rate = |k: &str| -> Result<f64> {
        let r = get(k)?;
        let failed = out.value(k).and_then(|v| v.split_whitespace().nth(1)?.parse::<u64>().ok()).unwrap_or(0);
        match weft_lab::rounds::judge(&[weft_lab::rounds::Sample::new(r, failed)])[0] {
            weft_lab::rounds::Verdict::Valid => Ok(r),
            why => {
                rejected.push(format!("{k}: {why}"));
                Ok(f64::NAN)
            }
        }
    };
    println!("## ipvs mode vs iptables mode (QEMU guest, kernel {}, emulated CPU: ratios only)\n", lab.version);
    println!("| new connections/s | 10 services | {n} services | {n} / 10 |");
    println!("|---|---|---|---|");
    let mut rows = vec![];
    for mode in ["ipvs", "iptables"] {
        let (a, b) = (rate(&format!("{mode}-10-rate"))?, rate(&format!("{mode}-{n}-rate"))?);
        let (da, db) = (rate(&format!("direct-10-{mode}-rate"))?, rate(&format!("direct-{n}-{mode}-rate"))?);
        println!("| {mode} VIP | {a:.0} ({:.2}× direct) | {b:.0} ({:.2}× direct) | {:.2} |", a / da, b / db, b / a);
        rows.push((mode, a, b));
    }
    let (ipvs_flat, ipvs_vs_ipt) = (rows[0].2 / rows[0].1, rows[0].2 / rows[1].2);
    println!(
        "\nipvs at {n} services: {ipvs_flat:.2}× its 10-service rate (target ≥ {TARGET_FLAT}: {}), {ipvs_vs_ipt:.2}× iptables mode (target ≥ 1: {})\n",
        if ipvs_flat >= TARGET_FLAT { "met" } else { "missed" },
        if ipvs_vs_ipt >= 1.0 { "met" } else { "missed" }
    );
    for r in &rejected {
        println!("- rejected (shown as NaN): {r}");
    }
    let (fi, ft) = (get(&format!("ipvs-{n}-full-ms"))?, get(&format!("iptables-{n}-full-ms"))?);
    let (pi, pt) = (get(&format!("ipvs-{n}-partial-ms"))?, get(&format!("iptables-{n}-partial-ms"))?);
    println!("| sync of {n} services × 10 endpoints | ipvs | iptables | ipvs / iptables |");
    println!("|---|---|---|---|");
    println!("| first full sync | {fi:.0} ms | {ft:.0} ms | {:.2} (target ≤ {TARGET_FULL}) |", fi / ft);
    println!("| one endpoint changed (median) | {pi:.1} ms | {pt:.1} ms | {:.2} |", pi / pt);
    println!("\n(guest run {:?}; times are emulated-CPU times)", out.took);
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        None => host(),
        Some("guest-program") => guest_program(&args[2], args[3].parse()?),
        Some("guest-serve") => guest_serve(),
        Some("guest-connect") => guest_connect(args[2].parse()?, args[3].parse()?),
        Some(other) => bail!("unknown subcommand {other}"),
    }
}
