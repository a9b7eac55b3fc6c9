//! Controller benchmarks (issue 5), against a real etcd on loopback and a real `weft controller` ($WEFT_BIN):
//! 1. from `weft apply` of a 1,000-replica Deployment to 1,000 pods bound (target ≤ 10 s);
//! 2. a rolling update of it (new image, maxSurge/maxUnavailable 25 %) to completion;
//! 3. the controller's RSS with 10,000 pods (the Deployment scaled up).
//!
//! This program plays every kubelet: it renews the nodes' Leases and gives each bound pod phase Running, Ready and
//! an IP as soon as it sees it bound (one compare-and-swap per pod). Prints a markdown summary on stdout.
//! Knobs: BENCH_NODES (20), BENCH_REPLICAS (1000), BENCH_SCALE (10000).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, ensure, Context, Result};
use etcd_client::{Client, Compare, CompareOp, EventType, Txn, TxnOp, WatchOptions};
use serde_json::{json, Value};
use weft_lab::EtcdFixture;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn rfc3339(micros: bool) -> String {
    weft_lab::kube_time(SystemTime::now(), micros)
}

/// What the watch has seen of the pods.
#[derive(Default)]
struct Pods {
    /// key → (bound, ready, image)
    all: HashMap<String, (bool, bool, String)>,
}

impl Pods {
    fn count(&self, f: impl Fn(&(bool, bool, String)) -> bool) -> usize {
        self.all.values().filter(|p| f(p)).count()
    }
}

struct Bench {
    c: Client,
    etcd: String,
    pods: Arc<Mutex<Pods>>,
    status_writes: Arc<Mutex<u64>>,
}

fn deployment(replicas: usize, image: &str) -> String {
    format!(
        "apiVersion: apps/v1
kind: Deployment
metadata: {{name: bench, namespace: default}}
spec:
  replicas: {replicas}
  selector: {{matchLabels: {{app: bench}}}}
  template:
    metadata: {{labels: {{app: bench}}}}
    spec:
      containers:
      - name: app
        image: {image}
        resources: {{requests: {{cpu: 10m, memory: 16Mi}}}}
        ports: [{{containerPort: 8080}}]
"
    )
}

impl Bench {
    fn apply(&self, yaml: &str) -> Result<()> {
        let mut child = Command::new(weft_lab::weft_bin())
            .args(["apply", "-f", "-", "--etcd-endpoints", &self.etcd])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        child.stdin.take().context("stdin")?.write_all(yaml.as_bytes())?;
        let out = child.wait_with_output()?;
        ensure!(out.status.success(), "weft apply: {}", String::from_utf8_lossy(&out.stderr));
        Ok(())
    }

    async fn add_nodes(&self, n: usize, max_pods: usize) -> Result<()> {
        for i in 1..=n {
            let name = format!("node-{i}");
            let node = json!({"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": name, "uid": format!("node-uid-{i}"), "creationTimestamp": rfc3339(false),
                             "labels": {"kubernetes.io/hostname": name}},
                "spec": {},
                "status": {"allocatable": {"cpu": "64", "memory": "256Gi", "pods": max_pods.to_string()},
                           "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                                           "lastHeartbeatTime": rfc3339(false), "lastTransitionTime": rfc3339(false)}]}});
            self.c.clone().put(format!("/registry/nodes/{name}"), serde_json::to_vec(&node)?, None).await?;
        }
        let c = self.c.clone();
        tokio::spawn(async move {
            loop {
                for i in 1..=n {
                    let name = format!("node-{i}");
                    let lease = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                        "metadata": {"name": name, "namespace": "kube-node-lease"},
                        "spec": {"holderIdentity": name, "leaseDurationSeconds": 40, "renewTime": rfc3339(true)}});
                    let _ = c
                        .clone()
                        .put(
                            format!("/registry/leases/kube-node-lease/{name}"),
                            serde_json::to_vec(&lease).unwrap_or_default(),
                            None,
                        )
                        .await;
                }
                tokio::time::sleep(Duration::from_secs(10)).await;
            }
        });
        Ok(())
    }

    /// Watches pods; every pod seen bound and not yet Running/Ready is handed to the kubelet workers.
    async fn watch(&self) -> Result<()> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        for _ in 0..32 {
            let (c, rx, writes) = (self.c.clone(), rx.clone(), self.status_writes.clone());
            tokio::spawn(async move {
                loop {
                    let key = match rx.lock().await.recv().await {
                        Some(k) => k,
                        None => return,
                    };
                    if kubelet(&c, &key).await.unwrap_or(false) {
                        *writes.lock().unwrap() += 1;
                    }
                }
            });
        }
        let (_w, mut stream) = self.c.clone().watch("/registry/pods/", Some(WatchOptions::new().with_prefix())).await?;
        let pods = self.pods.clone();
        tokio::spawn(async move {
            let _keep = _w;
            while let Ok(Some(resp)) = stream.message().await {
                for ev in resp.events() {
                    let Some(kv) = ev.kv() else { continue };
                    let key = String::from_utf8_lossy(kv.key()).into_owned();
                    if ev.event_type() == EventType::Delete {
                        pods.lock().unwrap().all.remove(&key);
                        continue;
                    }
                    let Ok(p) = serde_json::from_slice::<Value>(kv.value()) else { continue };
                    if !p["metadata"]["deletionTimestamp"].is_null() {
                        pods.lock().unwrap().all.remove(&key);
                        continue;
                    }
                    let bound = p["spec"]["nodeName"].is_string();
                    let ready = p["status"]["conditions"]
                        .as_array()
                        .is_some_and(|cs| cs.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"));
                    let image = p["spec"]["containers"][0]["image"].as_str().unwrap_or("").to_string();
                    pods.lock().unwrap().all.insert(key.clone(), (bound, ready, image));
                    if bound && !ready {
                        let _ = tx.send(key);
                    }
                }
            }
        });
        Ok(())
    }

    async fn wait(&self, what: &str, limit: Duration, f: impl Fn(&Pods) -> bool) -> Result<Duration> {
        let start = Instant::now();
        loop {
            if f(&self.pods.lock().unwrap()) {
                return Ok(start.elapsed());
            }
            if start.elapsed() > limit {
                let p = self.pods.lock().unwrap();
                bail!(
                    "{what}: not within {limit:?} ({} pods, {} bound, {} ready)",
                    p.all.len(),
                    p.count(|x| x.0),
                    p.count(|x| x.1)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The sum of the ReplicaSets' spec.replicas (what maxSurge bounds).
    async fn spec_total(&self) -> Result<i64> {
        let r = self
            .c
            .clone()
            .get("/registry/replicasets/default/", Some(etcd_client::GetOptions::new().with_prefix()))
            .await?;
        let mut total = 0;
        for kv in r.kvs() {
            let rs: Value = serde_json::from_slice(kv.value())?;
            total += rs["spec"]["replicas"].as_i64().unwrap_or(0);
        }
        Ok(total)
    }

    async fn deployment_status(&self) -> Result<Value> {
        let r = self.c.clone().get("/registry/deployments/default/bench", None).await?;
        let kv = r.kvs().first().context("no deployment")?;
        Ok(serde_json::from_slice(kv.value())?)
    }
}

/// The kubelet's status write for one pod: Running, Ready, an IP. False if there was nothing to do.
async fn kubelet(c: &Client, key: &str) -> Result<bool> {
    for _ in 0..10 {
        let r = c.clone().get(key, None).await?;
        let Some(kv) = r.kvs().first() else { return Ok(false) };
        let mut p: Value = serde_json::from_slice(kv.value())?;
        let node = p["spec"]["nodeName"].as_str().unwrap_or("").to_string();
        if node.is_empty() || !p["metadata"]["deletionTimestamp"].is_null() {
            return Ok(false);
        }
        let ready = p["status"]["conditions"]
            .as_array()
            .is_some_and(|cs| cs.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"));
        if ready {
            return Ok(false);
        }
        let n: u32 = node.trim_start_matches("node-").parse().unwrap_or(0);
        let h = kv.create_revision() as u32;
        let t = rfc3339(false);
        p["status"] = json!({"phase": "Running", "podIP": format!("10.{}.{}.{}", 100 + n / 250, (h >> 8) & 255, h & 255),
            "hostIP": format!("192.168.56.{}", 10 + n), "startTime": t,
            "conditions": [{"type": "PodScheduled", "status": "True", "lastTransitionTime": t},
                           {"type": "Initialized", "status": "True", "lastTransitionTime": t},
                           {"type": "ContainersReady", "status": "True", "lastTransitionTime": t},
                           {"type": "Ready", "status": "True", "lastTransitionTime": t}]});
        let txn = Txn::new()
            .when([Compare::mod_revision(key, CompareOp::Equal, kv.mod_revision())])
            .and_then([TxnOp::put(key, serde_json::to_vec(&p)?, None)]);
        if c.clone().txn(txn).await?.succeeded() {
            return Ok(true);
        }
    }
    Ok(false)
}

struct Controller {
    child: Child,
    port: u16,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Controller {
    fn start(etcd: &str) -> Result<Controller> {
        let dir = tempfile::Builder::new().prefix("weft-control-bench-").tempdir()?;
        let log = dir.path().join("controller.log");
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let addr = format!("127.0.0.1:{port}");
        let child = Command::new(weft_lab::weft_bin())
            .args([
                "controller",
                "--etcd-endpoints",
                etcd,
                "--healthz-bind-address",
                &addr,
                "--metrics-bind-address",
                &addr,
            ])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log)?)
            .stderr(std::fs::File::options().append(true).open(&log)?)
            .spawn()?;
        Ok(Controller { child, port, log, _dir: dir })
    }

    fn metrics(&self) -> String {
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else { return String::new() };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let _ = s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out.split_once("\r\n\r\n").map(|x| x.1.to_string()).unwrap_or_default()
    }

    fn metric(&self, name: &str) -> f64 {
        self.metrics()
            .lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// (VmRSS, VmHWM) in kB.
    fn memory(&self) -> Result<(u64, u64)> {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        let field = |n: &str| {
            s.lines()
                .find(|l| l.starts_with(n))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        Ok((field("VmRSS:"), field("VmHWM:")))
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let nodes = env_usize("BENCH_NODES", 20);
    let replicas = env_usize("BENCH_REPLICAS", 1000);
    let scale = env_usize("BENCH_SCALE", 10_000);
    let max_pods = (scale * 12 / 10).div_ceil(nodes).max(110);
    let etcd = EtcdFixture::start()?;
    let c = etcd.client().await?;
    let b = Bench { c, etcd: etcd.endpoint().to_string(), pods: Arc::default(), status_writes: Arc::default() };
    b.add_nodes(nodes, max_pods).await?;
    b.watch().await?;
    let ctl = Controller::start(etcd.endpoint())?;
    let started = Instant::now();
    while ctl.metric("weft_controller_informers_synced") < 1.0 {
        ensure!(
            started.elapsed() < Duration::from_secs(30),
            "controller did not start: {}",
            std::fs::read_to_string(&ctl.log)?
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (rss_idle, _) = ctl.memory()?;
    eprintln!("controller up in {:?}; {nodes} nodes, {max_pods} pods each", started.elapsed());

    // 1. apply → every pod bound.
    let t0 = Instant::now();
    b.apply(&deployment(replicas, "app:v1"))?;
    let applied = t0.elapsed();
    b.wait("pods created", Duration::from_secs(120), |p| p.all.len() >= replicas).await?;
    let created = t0.elapsed();
    b.wait("pods bound", Duration::from_secs(120), |p| p.count(|x| x.0) >= replicas).await?;
    let bound = t0.elapsed();
    b.wait("pods ready", Duration::from_secs(180), |p| p.count(|x| x.1) >= replicas).await?;
    let ready = t0.elapsed();
    eprintln!("{replicas} pods: created {created:?}, bound {bound:?}, ready {ready:?} after apply");
    let bind_start = Instant::now();
    loop {
        let d = b.deployment_status().await?;
        if d["status"]["availableReplicas"] == replicas && d["status"]["updatedReplicas"] == replicas {
            break;
        }
        ensure!(bind_start.elapsed() < Duration::from_secs(120), "deployment never available: {}", d["status"]);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let available = t0.elapsed();

    // 2. a rolling update to completion.
    let t1 = Instant::now();
    b.apply(&deployment(replicas, "app:v2"))?;
    let mut peak_pods = 0;
    let mut peak_spec = 0;
    let mut min_ready = usize::MAX;
    let rolled = loop {
        peak_spec = peak_spec.max(b.spec_total().await?);
        {
            let p = b.pods.lock().unwrap();
            peak_pods = peak_pods.max(p.all.len());
            min_ready = min_ready.min(p.count(|x| x.1));
        }
        let d = b.deployment_status().await?;
        let s = &d["status"];
        let done = s["updatedReplicas"] == replicas
            && s["availableReplicas"] == replicas
            && s["replicas"] == replicas
            && s["observedGeneration"] == d["metadata"]["generation"];
        let old_left = b.pods.lock().unwrap().count(|x| x.2 == "app:v1");
        if done && old_left == 0 {
            break t1.elapsed();
        }
        ensure!(t1.elapsed() < Duration::from_secs(300), "rolling update did not finish: {s}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!("rolling update done in {rolled:?}; peak {peak_pods} pods ({peak_spec} in ReplicaSet specs), at least {min_ready} ready");
    let (rss_1k, _) = ctl.memory()?;

    // 3. 10,000 pods.
    let t2 = Instant::now();
    b.apply(&deployment(scale, "app:v2"))?;
    b.wait("all bound", Duration::from_secs(600), |p| p.count(|x| x.0) >= scale).await?;
    let bound_10k = t2.elapsed();
    b.wait("all ready", Duration::from_secs(600), |p| p.count(|x| x.1) >= scale).await?;
    let ready_10k = t2.elapsed();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (rss, hwm) = ctl.memory()?;
    let writes = *b.status_writes.lock().unwrap();
    let conflicts = ctl.metric("weft_controller_action_errors_total{");
    let actions = ctl.metric("weft_controller_actions_total{");
    let reconciles = ctl.metric("weft_controller_reconciles_total{");
    eprintln!("{scale} pods: bound {bound_10k:?}, ready {ready_10k:?}; VmRSS {rss} kB (peak {hwm} kB)");

    let mb = |kb: u64| kb as f64 / 1024.0;
    println!("## Controllers ({nodes} nodes, {} s in all)", started.elapsed().as_secs());
    println!();
    println!("| measurement | result | target | result / target |");
    println!("|---|---|---|---|");
    println!(
        "| `weft apply` of a {replicas}-replica Deployment → {replicas} pods bound | **{:.2} s** (created {:.2} s, `weft apply` itself {:.2} s) | ≤ 10 s | {:.2} |",
        bound.as_secs_f64(),
        created.as_secs_f64(),
        applied.as_secs_f64(),
        bound.as_secs_f64() / 10.0
    );
    println!(
        "| … → {replicas} pods Running and Ready (status written by this program) / Deployment available | {:.2} s / {:.2} s | none set | |",
        ready.as_secs_f64(),
        available.as_secs_f64()
    );
    println!(
        "| rolling update of {replicas} replicas (maxSurge 25 %, maxUnavailable 25 %) to completion | **{:.2} s** (ReplicaSet sizes summed to at most {peak_spec}; at most {peak_pods} pods existed, never fewer than {min_ready} Ready) | none set | |",
        rolled.as_secs_f64()
    );
    println!(
        "| scale to {scale}: all bound / all Ready | {:.2} s / {:.2} s | none set | |",
        bound_10k.as_secs_f64(),
        ready_10k.as_secs_f64()
    );
    println!(
        "| controller VmRSS at {scale} pods (peak VmHWM) | **{:.1} MB** ({:.1} MB) | none set | |",
        mb(rss),
        mb(hwm)
    );
    println!(
        "| controller VmRSS idle / after the {replicas}-pod rollout | {:.1} MB / {:.1} MB | | |",
        mb(rss_idle),
        mb(rss_1k)
    );
    println!();
    println!(
        "controller: {actions:.0} writes, {conflicts:.0} failed (conflicts, reconciled again), {reconciles:.0} reconciles; this program: {writes} pod status writes"
    );
    Ok(())
}
