//! eBPF mode benchmark (issue 12), everything inside namespaces, a cgroup and a bpffs it creates:
//! 1. New connections (wrk, `Connection: close`) from a client namespace to a server namespace, through a
//!    Service VIP (socket LB: the client runs in the cgroup the programs are attached to), directly to the
//!    server's address, and through the same VIP in iptables mode (the same table synced by
//!    `IptablesDataplane` into the client namespace, whose OUTPUT chain DNATs it; wrk outside the cgroup, so
//!    no program sees it), alternating, at 10 and BENCH_SERVICES (10,000) services × 10 endpoints.
//! 2. Sync: a full sync of 10,000 × 10 into empty maps, a full resync with nothing to change, and
//!    BENCH_CHANGES (200) one-endpoint changes (partial syncs, p50/p99); the same table's full sync in
//!    iptables mode (real iptables-restore in a fresh namespace) in the same run, for the ratio.
//! 3. Map memory as `bpftool map show` reports it (memlock) at the default --bpf-lb-map-max.
//!
//! Prints markdown. Knobs: BENCH_SERVICES, BENCH_ROUNDS (3), BENCH_SECS (5), BENCH_CONNS (8), BENCH_CHANGES.

#[path = "common/mod.rs"]
mod common;

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use common::{env_or, median, parse_wrk, spread, tw_sysctls, HttpServer, Wrk, HTTP_PORT};
use weft_lab::bpf::{Bpffs, Cgroup};
use weft_lab::rounds::{self, Sample};
use weft_lab::Netns;
use weft_proxy::ebpf::{Config, EbpfDataplane};
use weft_proxy::iptables::{CommandRunner, IptablesDataplane};
use weft_proxy::{Dataplane, Endpoint, Protocol, ServiceEntry, ServicePort, ServicePortName, ServiceTable};

const SERVER: Ipv4Addr = Ipv4Addr::new(192, 168, 180, 1);
const MEASURED_VIP: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 1);

fn spn(i: u32) -> ServicePortName {
    ServicePortName::new("bench", &format!("svc-{i}"), "", Protocol::Tcp)
}

/// `n` services × `eps` endpoints (addresses that exist nowhere) plus the measured service, whose one
/// endpoint is the real server.
fn table(n: u32, eps: u32) -> ServiceTable {
    let mut t = ServiceTable::new();
    for i in 0..n {
        let vip = Ipv4Addr::from(0x0A60_0000 + i);
        let endpoints =
            (0..eps).map(|j| Endpoint::ready(Ipv4Addr::from(0x0AF4_0000 + i * eps + j), HTTP_PORT)).collect();
        t.insert(spn(i), ServiceEntry { port: ServicePort::cluster_ip(vip, 80), endpoints });
    }
    t.insert(
        ServicePortName::new("bench", "measured", "", Protocol::Tcp),
        ServiceEntry {
            port: ServicePort::cluster_ip(MEASURED_VIP, 80),
            endpoints: vec![Endpoint::ready(SERVER, HTTP_PORT)],
        },
    );
    t
}

/// wrk from the client namespace, inside the cgroup (socket LB) or not (iptables mode).
fn wrk(client: &Netns, cgroup: Option<&Cgroup>, url: &str, secs: u64, conns: u32) -> Result<Wrk> {
    let mut cmd = client.command("wrk");
    cmd.args(["-t1", &format!("-c{conns}"), &format!("-d{secs}s"), "--latency", "-H", "Connection: close", url]);
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    if let Some(cgroup) = cgroup {
        cgroup.enter(&mut cmd)?;
    }
    let out = cmd.output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    parse_wrk(&text)
        .ok_or_else(|| anyhow::anyhow!("wrk {url} gave no rate:\n{text}{}", String::from_utf8_lossy(&out.stderr)))
}

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// memlock bytes of every map pinned in `dir`, per `bpftool map show pinned`.
fn memlock(dir: &std::path::Path) -> Result<Vec<(String, u64, u64)>> {
    let mut out = Vec::new();
    for m in weft_ebpf::maps::MAPS {
        if !dir.join(m).exists() {
            continue; // weft_lb_ct exists only with --nodeport-interface
        }
        let o = Command::new("bpftool").args(["-j", "map", "show", "pinned"]).arg(dir.join(m)).output()?;
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).context("bpftool -j map show")?;
        out.push((m.to_string(), v["max_entries"].as_u64().unwrap_or(0), v["bytes_memlock"].as_u64().unwrap_or(0)));
    }
    Ok(out)
}

fn main() -> Result<()> {
    let big: u32 = env_or("BENCH_SERVICES", 10_000);
    let rounds: usize = env_or("BENCH_ROUNDS", 3);
    let secs: u64 = env_or("BENCH_SECS", 5);
    let conns: u32 = env_or("BENCH_CONNS", 8);
    let changes: usize = env_or("BENCH_CHANGES", 200);

    let client = Netns::create("ebc")?;
    let server = Netns::create("ebs")?;
    weft_lab::netns::run(Command::new("ip").args([
        "link",
        "add",
        "eth0",
        "netns",
        client.name(),
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        server.name(),
    ]))?;
    client.ip(&["addr", "add", "192.168.180.2/24", "dev", "eth0"])?;
    client.ip(&["link", "set", "eth0", "up"])?;
    server.ip(&["addr", "add", "192.168.180.1/24", "dev", "eth0"])?;
    server.ip(&["link", "set", "eth0", "up"])?;
    // A route for the VIPs, as a node has: iptables mode DNATs after connect() has found one.
    client.ip(&["route", "add", "default", "via", "192.168.180.1"])?;
    tw_sysctls(&client)?;
    tw_sysctls(&server)?;
    let http = HttpServer::start(&server)?;
    let cgroup = Cgroup::create("ebpf-bench")?;
    let bpffs = Bpffs::mount()?;
    let cfg = Config { cgroup: cgroup.path().into(), pin_base: bpffs.path().join("weft"), ..Config::default() };

    println!("## eBPF mode (socket LB): new connections through a VIP vs direct, sync cost, map memory\n");
    println!("wrk -t1 -c{conns} -d{secs}s `Connection: close`, {rounds} rounds, the three sides' order reversed every other round; client and server in two namespaces joined by a veth.\n");
    println!("| services × endpoints | direct, conn/s (median; min–max) | via VIP (eBPF), conn/s | eBPF VIP / direct (median of rounds) | via VIP (iptables mode), conn/s | iptables VIP / direct | wrk errors |");
    println!("|---|---|---|---|---|---|---|");
    // iptables mode in the client namespace itself (OUTPUT chain), for the same connections outside the cgroup.
    let mut client_ipt = IptablesDataplane::new(
        CommandRunner::with_prefix(["ip", "netns", "exec", client.name()]),
        weft_proxy::iptables::Config::default(),
    );
    let mut full_empty = Duration::ZERO;
    let mut noop = Duration::ZERO;
    let mut partial = Vec::new();
    let mut big_table = ServiceTable::new();
    for n in [10, big] {
        let t = table(n, 10);
        // A node name per scale: each starts from empty maps.
        let mut dp = EbpfDataplane::load(&cfg, &format!("bench-{n}"))?;
        let started = Instant::now();
        dp.sync(&t, None)?;
        let took = started.elapsed();
        client_ipt.sync(&t, None)?;
        let urls = [format!("http://{SERVER}:{HTTP_PORT}/"), format!("http://{MEASURED_VIP}:80/")];
        // (url, inside the cgroup): direct, VIP through socket LB, VIP through iptables mode.
        let sides = [(&urls[0], true), (&urls[1], true), (&urls[1], false)];
        let mut samples: [Vec<Sample>; 3] = [vec![], vec![], vec![]];
        for round in 0..rounds {
            // The sides take turns at running first.
            for k in rounds::order(round, 3) {
                let (url, in_cgroup) = sides[k];
                let w = wrk(&client, in_cgroup.then_some(&cgroup), url, secs, conns).unwrap_or_else(|e| {
                    eprintln!("round {}: {url} (cgroup: {in_cgroup}): {e:#}", round + 1);
                    Wrk { rps: f64::NAN, errors: 1, ..Wrk::default() }
                });
                samples[k].push(w.sample());
            }
        }
        let errors: u64 = samples.iter().flatten().map(|s| s.errors).sum();
        let valid =
            rounds::valid_rounds(&[("direct", &samples[0]), ("eBPF VIP", &samples[1]), ("iptables VIP", &samples[2])]);
        let direct = rounds::valid_rates(&samples[0], &valid);
        let vip = rounds::valid_rates(&samples[1], &valid);
        let ipt_vip = rounds::valid_rates(&samples[2], &valid);
        if direct.is_empty() {
            bail!("{n} services: no valid round ({})", rounds::summary(&valid));
        }
        let ratio: Vec<f64> = vip.iter().zip(&direct).map(|(v, d)| v / d).collect();
        let ipt_ratio: Vec<f64> = ipt_vip.iter().zip(&direct).map(|(v, d)| v / d).collect();
        println!(
            "| {n} × 10 | {:.0} ({}) | {:.0} ({}) | **{:.3}** ({}; {}) | {:.0} ({}) | {:.3} ({}) | {errors} |",
            median(direct.clone()),
            spread(&direct),
            median(vip.clone()),
            spread(&vip),
            median(ratio.clone()),
            spread(&ratio),
            rounds::summary(&valid),
            median(ipt_vip.clone()),
            spread(&ipt_vip),
            median(ipt_ratio.clone()),
            spread(&ipt_ratio),
        );
        if n == big {
            full_empty = took;
            let started = Instant::now();
            let stats = dp.sync(&t, None)?;
            noop = started.elapsed();
            if stats.rules_written != 0 {
                bail!("a full resync with nothing to change wrote {} entries", stats.rules_written);
            }
            // One endpoint of one service changes (removed, then back), as an Endpoints update does.
            let mut t = t;
            let mut x: u32 = 7;
            for c in 0..changes {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                let name = spn((x >> 8) % n);
                let e = t.get_mut(&name).context("service")?;
                if c % 2 == 0 {
                    e.endpoints.pop();
                } else {
                    e.endpoints.push(Endpoint::ready(Ipv4Addr::new(10, 250, 0, (c % 250) as u8), HTTP_PORT));
                }
                let started = Instant::now();
                dp.sync(&t, Some(&[name].into()))?;
                partial.push(started.elapsed().as_secs_f64() * 1000.0);
            }
            big_table = t;
        }
    }
    let mem = memlock(&cfg.pin_base.join(format!("bench-{big}")))?;
    http.stop();

    // iptables mode, same table, fresh namespace, real iptables-restore.
    let ipt_ns = Netns::create("ebi")?;
    let mut ipt = IptablesDataplane::new(
        CommandRunner::with_prefix(["ip", "netns", "exec", ipt_ns.name()]),
        weft_proxy::iptables::Config::default(),
    );
    let started = Instant::now();
    ipt.sync(&big_table, None)?;
    let ipt_full = started.elapsed();

    println!(
        "\n| sync at {big} services × 10 endpoints | eBPF mode | iptables mode (same run) | eBPF / iptables | target |"
    );
    println!("|---|---|---|---|---|");
    println!(
        "| full sync into empty maps / empty tables | {:.3} s | {:.3} s | **{:.3}** | ≤ 0.5 s and ≤ 0.05× |",
        full_empty.as_secs_f64(),
        ipt_full.as_secs_f64(),
        full_empty.as_secs_f64() / ipt_full.as_secs_f64()
    );
    println!("| full resync, nothing changed (dump + diff, 0 writes) | {:.3} s | | | |", noop.as_secs_f64());
    println!(
        "| one endpoint change ({} partial syncs): p50 / p99 | {:.2} / **{:.2}** ms | | | p99 ≤ 5 ms |",
        partial.len(),
        percentile(partial.clone(), 0.5),
        percentile(partial, 0.99)
    );
    let total: u64 = mem.iter().map(|m| m.2).sum();
    println!("\n| map (bpftool map show) | max_entries | memlock |");
    println!("|---|---|---|");
    for (name, max, bytes) in &mem {
        println!("| {name} | {max} | {:.1} MiB |", *bytes as f64 / 1048576.0);
    }
    println!("| total | | **{:.1} MiB** |", total as f64 / 1048576.0);
    drop(ipt_ns);
    weft_ebpf::remove(&cfg.pin_base.join("bench-10"))?;
    weft_ebpf::remove(&cfg.pin_base.join(format!("bench-{big}")))?;
    Ok(())
}
