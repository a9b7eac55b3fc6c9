//! Kubelet benchmarks (issue 14), against a real containerd + runc + CNI and a real etcd in one namespace
//! (`weft_lab::containerd`) and a real `weft kubelet` ($WEFT_BIN):
//! 1. pod start latency, from the pod written bound (spec.nodeName) to phase Running as seen through an etcd watch,
//!    p50/p99 over BENCH_PODS (50) pods written at once, and the pods started per second;
//! 2. the same latency over BENCH_PACED (50) pods written at a steady BENCH_RATE (2) pods/s: the load Kubernetes'
//!    pod-startup SLO is measured under (creations spread over time, not a burst larger than a node can start
//!    in the time asked);
//! 3. the kubelet's RSS with BENCH_SCALE (100, at least the pods above) pods running.
//!
//! BENCH_PARALLEL (16) is the kubelet's `--parallel-pod-starts`.
//! Pods are busybox `sleep` (the local image `weft.local/busybox:1`). Prints a markdown summary on stdout.

use std::collections::HashMap;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use etcd_client::{EventType, WatchOptions};
use serde_json::{json, Value};
use weft_lab::containerd::{ContainerdFixture, POD_SUBNET};

const NODE: &str = "bench-node";

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn pod(name: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "uid": format!("uid-{name}-{}", weft_lab::unique_id()),
                     "creationTimestamp": weft_lab::kube_time(SystemTime::now(), false)},
        "spec": {"nodeName": NODE, "terminationGracePeriodSeconds": 0,
                 "containers": [{"name": "c", "image": "weft.local/busybox:1", "command": ["sleep", "100000"]}]},
        "status": {"phase": "Pending"},
    })
}

fn rss_kb(pid: u32) -> (u64, u64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let get = |k: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (get("VmRSS:"), get("VmHWM:"))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[i.clamp(1, sorted.len()) - 1]
}

fn main() -> Result<()> {
    let n = env_usize("BENCH_PODS", 50);
    let paced = env_usize("BENCH_PACED", 50);
    let rate: f64 = std::env::var("BENCH_RATE").ok().and_then(|v| v.parse().ok()).filter(|r| *r > 0.0).unwrap_or(2.0);
    let scale = env_usize("BENCH_SCALE", 100).max(n + paced);
    let mut fx = ContainerdFixture::start()?;
    let etcd = fx.start_etcd()?;
    std::fs::write(fx.dir().join("resolv.conf"), "nameserver 192.0.2.53\n")?;
    let log = std::fs::File::create(fx.dir().join("kubelet.log"))?;
    let mut kubelet: Child = fx
        .net_command(weft_lab::weft_bin())
        .args(["kubelet", "--etcd-endpoints", &etcd, "--hostname-override", NODE, "--node-ip", "10.88.0.1"])
        .arg("--container-runtime-endpoint")
        .arg(fx.endpoint())
        .arg("--cgroup-parent")
        .arg(fx.cgroup_parent())
        .arg("--root-dir")
        .arg(fx.dir().join("kubelet"))
        .arg("--resolv-conf")
        .arg(fx.dir().join("resolv.conf"))
        .args(["--pod-cidr", POD_SUBNET, "--healthz-bind-address", ""])
        .args(["--parallel-pod-starts", &env_usize("BENCH_PARALLEL", 16).to_string()])
        .env("WEFT_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    let pid = kubelet.id();
    let rt = fx.netns().runtime()?;
    let result = rt.block_on(bench(etcd.clone(), n, paced, rate, scale, pid))?;
    let _ = kubelet.kill();
    let _ = kubelet.wait();
    let Outcome { burst: lat, paced: lat_paced, wall, rss_idle, rss_n, rss_scale, hwm } = result??;
    let paced_sorted = sorted(lat_paced);
    let sorted = sorted(lat);
    println!("## Kubelet: pod start latency and memory (--parallel-pod-starts {})\n", env_usize("BENCH_PARALLEL", 16));
    println!("| measurement | value | target |");
    println!("|---|---|---|");
    println!("| bind → Running, p50 over {n} pods written at once | **{:.2} s** | |", percentile(&sorted, 50.0));
    println!("| bind → Running, p99 | **{:.2} s** | ≤ 2.5 s (SLO anchor ≤ 5 s) |", percentile(&sorted, 99.0));
    println!("| bind → Running, max | {:.2} s | |", sorted.last().copied().unwrap_or(f64::NAN));
    println!("| {n} pods: first written → all Running | {wall:.2} s ({:.1} pods/s) | |", n as f64 / wall);
    println!(
        "| bind → Running, p50 / p99 / max over {paced} pods written at {rate} pods/s | {:.2} / **{:.2}** / {:.2} s | p99 ≤ 2.5 s |",
        percentile(&paced_sorted, 50.0),
        percentile(&paced_sorted, 99.0),
        paced_sorted.last().copied().unwrap_or(f64::NAN)
    );
    println!("| kubelet VmRSS idle / {n} pods / {scale} pods (peak VmHWM) | {:.1} / {:.1} / **{:.1} MB** ({:.1}) | ≤ 50 MB at 100 pods |",
        rss_idle as f64 / 1024.0, rss_n as f64 / 1024.0, rss_scale as f64 / 1024.0, hwm as f64 / 1024.0);
    Ok(())
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v
}

struct Outcome {
    /// Latencies (s) of the pods written at once, and of the pods written at a steady rate.
    burst: Vec<f64>,
    paced: Vec<f64>,
    /// First burst pod written → last burst pod Running (s).
    wall: f64,
    rss_idle: u64,
    rss_n: u64,
    rss_scale: u64,
    hwm: u64,
}

async fn bench(etcd: String, n: usize, paced: usize, rate: f64, scale: usize, pid: u32) -> Result<Result<Outcome>> {
    Ok(run(etcd, n, paced, rate, scale, pid).await)
}

async fn run(etcd: String, n: usize, paced: usize, rate: f64, scale: usize, pid: u32) -> Result<Outcome> {
    let client = etcd_client::Client::connect([etcd.as_str()], None).await?;
    // Wait for the kubelet's Node: it is up.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = client.kv_client().get(format!("/registry/nodes/{NODE}"), None).await?;
        if !r.kvs().is_empty() {
            break;
        }
        if Instant::now() > deadline {
            bail!("the kubelet did not register its node");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (rss_idle, _) = rss_kb(pid);
    let written: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let running: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let (_w, mut stream) = client
        .watch_client()
        .watch("/registry/pods/", Some(WatchOptions::new().with_prefix()))
        .await
        .context("watch")?;
    let run2 = running.clone();
    tokio::spawn(async move {
        while let Ok(Some(resp)) = stream.message().await {
            for ev in resp.events() {
                if ev.event_type() != EventType::Put {
                    continue;
                }
                let Some(kv) = ev.kv() else { continue };
                let Ok(v) = serde_json::from_slice::<Value>(kv.value()) else { continue };
                if v["status"]["phase"] == "Running" {
                    let key = String::from_utf8_lossy(kv.key()).to_string();
                    run2.lock().unwrap().entry(key).or_insert_with(Instant::now);
                }
            }
        }
    });
    let write = |from: usize, to: usize| {
        let client = client.clone();
        let written = written.clone();
        async move {
            let mut kv = client.kv_client();
            for i in from..to {
                let name = format!("bench-{i}");
                let key = format!("/registry/pods/default/{name}");
                written.lock().unwrap().insert(key.clone(), Instant::now());
                kv.put(key, serde_json::to_vec(&pod(&name))?, None).await?;
            }
            anyhow::Ok(())
        }
    };
    let start = Instant::now();
    write(0, n).await?;
    let wait_all = |count: usize, limit: Duration| {
        let running = running.clone();
        async move {
            let deadline = Instant::now() + limit;
            while running.lock().unwrap().len() < count {
                if Instant::now() > deadline {
                    bail!("only {} of {count} pods Running", running.lock().unwrap().len());
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            anyhow::Ok(())
        }
    };
    wait_all(n, Duration::from_secs(300)).await?;
    let wall = running.lock().unwrap().values().max().map(|t| t.duration_since(start).as_secs_f64()).unwrap_or(0.0);
    // Latencies of pods bench-{from}..bench-{to}.
    let latencies = |from: usize, to: usize| -> Vec<f64> {
        let w = written.lock().unwrap();
        let r = running.lock().unwrap();
        (from..to)
            .filter_map(|i| {
                let key = format!("/registry/pods/default/bench-{i}");
                Some(r.get(&key)?.duration_since(*w.get(&key)?).as_secs_f64())
            })
            .collect()
    };
    let burst = latencies(0, n);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (rss_n, _) = rss_kb(pid);
    // One pod every 1/rate s, each written on its own schedule (not after the previous one runs).
    let every = Duration::from_secs_f64(1.0 / rate);
    let paced_start = tokio::time::Instant::now();
    for i in n..n + paced {
        tokio::time::sleep_until(paced_start + every * (i - n) as u32).await;
        write(i, i + 1).await?;
    }
    wait_all(n + paced, Duration::from_secs(300)).await?;
    let paced_lat = latencies(n, n + paced);
    write(n + paced, scale).await?;
    wait_all(scale, Duration::from_secs(600)).await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (rss_scale, hwm) = rss_kb(pid);
    Ok(Outcome { burst, paced: paced_lat, wall, rss_idle, rss_n, rss_scale, hwm })
}
