//! Control-plane cost at 10,000 services × 10 endpoints, our dispatch tree beside kube-proxy's linear
//! layout (`dispatch_leaf: usize::MAX`), each in a fresh namespace, in one run. Heavy: `--ignored`.
//! `cargo test -p weft-proxy --test scale -- --ignored --nocapture`

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::Result;
use weft_lab::Netns;
use weft_proxy::iptables::{render_full, CommandRunner, Config, IptablesDataplane};
use weft_proxy::{Dataplane, Endpoint, Protocol, ServiceEntry, ServicePort, ServicePortName, ServiceTable};

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
            .map(|j| Endpoint {
                ip: Ipv4Addr::from(0x0AF4_0000 + i * eps + j),
                port: 8080,
                node_name: None,
                is_local: false,
                ready: true,
            })
            .collect();
        let port = ServicePort {
            cluster_ip: Some(vip),
            port: 80,
            node_port: None,
            external_ips: vec![],
            load_balancer_ips: vec![],
            session_affinity: None,
            external_policy_local: false,
            internal_policy_local: false,
        };
        t.insert(
            ServicePortName::new("bench", &format!("svc-{i}"), "", Protocol::Tcp),
            ServiceEntry { port, endpoints },
        );
    }
    t
}

struct Run {
    full: Duration,
    partial: Duration,
    partial_bytes: usize,
    bytes: usize,
}

fn measure(cfg: Config, table: &ServiceTable) -> Result<Run> {
    let node = Netns::create("pxs")?;
    let dp_cfg = &cfg.clone();
    let mut dp = IptablesDataplane::new(CommandRunner::with_prefix(["ip", "netns", "exec", node.name()]), cfg);
    let full = dp.sync(table, None)?;
    let mut changed_table = table.clone();
    let spn = ServicePortName::new("bench", &format!("svc-{}", table.len() / 2), "", Protocol::Tcp);
    if let Some(e) = changed_table.get_mut(&spn) {
        e.endpoints.pop();
    }
    let changed = [spn].into();
    let started = Instant::now();
    if let Some(state) = dp.state() {
        let _ = weft_proxy::iptables::render_partial(&changed_table, &changed, dp_cfg, state);
        println!("  render_partial alone: {:?}", started.elapsed());
    }
    let partial = dp.sync(&changed_table, Some(&changed))?;
    Ok(Run { full: full.duration, partial: partial.duration, partial_bytes: partial.bytes, bytes: full.bytes })
}

#[test]
#[ignore]
fn sync_cost_at_10000_services() -> Result<()> {
    let n = std::env::var("WEFT_SCALE_SERVICES").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000);
    let table = big_table(n, 10);
    if let Ok(dir) = std::env::var("WEFT_SCALE_DUMP") {
        std::fs::write(format!("{dir}/tree.rules"), render_full(&table, &Config::default()))?;
        let linear = Config { dispatch_leaf: usize::MAX, ..Config::default() };
        std::fs::write(format!("{dir}/linear.rules"), render_full(&table, &linear))?;
        return Ok(());
    }
    let started = Instant::now();
    let text = render_full(&table, &Config::default());
    println!("render_full: {:?}, {} bytes, {} rules", started.elapsed(), text.len(), text.matches("\n-A ").count());
    let linear = Config { dispatch_leaf: usize::MAX, ..Config::default() };
    let batch = std::env::var("WEFT_SCALE_BATCH").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000);
    let linear = Config { restore_batch_rules: batch, ..linear };
    let tree = Config { restore_batch_rules: batch, ..Config::default() };
    let one_run = |c: &Config| Config { restore_batch_rules: usize::MAX, ..c.clone() };
    let mut variants =
        vec![("linear (kube-proxy layout), batched", linear.clone()), ("weft tree, batched", tree.clone())];
    // One restore per sync is quadratic: only at sizes where it finishes in reasonable time.
    if n <= 2000 {
        variants.push(("linear, one restore", one_run(&linear)));
        variants.push(("weft tree, one restore", one_run(&tree)));
    }
    for (name, cfg) in variants {
        let r = measure(cfg, &table)?;
        println!(
            "{name}: full {:?} ({} bytes), one endpoint removed {:?} ({} bytes)",
            r.full, r.bytes, r.partial, r.partial_bytes
        );
    }
    Ok(())
}
