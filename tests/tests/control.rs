//! The controllers end to end (issue 5): a real etcd, real `weft controller` processes, manifests through
//! `weft apply`, and the test standing in for the kubelet — it keeps each live node's Lease renewed and gives pods
//! bound to live nodes phase Running, Ready and an IP — writing the JSON the API server would.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, ensure, Context, Result};
use etcd_client::{Client, Compare, CompareOp, EventType, GetOptions, Txn, TxnOp, WatchOptions};
use serde_json::{json, Value};
use weft_lab::EtcdFixture;

// ---- time and JSON ----

fn now(micros: bool) -> String {
    weft_lab::kube_time(SystemTime::now(), micros)
}

fn uid() -> String {
    let b: [u8; 16] = rand::random();
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{}-{}-4{}-a{}-{}", &h[0..8], &h[8..12], &h[13..16], &h[17..20], &h[20..32])
}

// ---- etcd as the API server would use it ----

async fn get(c: &Client, key: &str) -> Result<Option<(Value, i64)>> {
    let r = c.clone().get(key, None).await?;
    Ok(match r.kvs().first() {
        Some(kv) => Some((serde_json::from_slice(kv.value())?, kv.mod_revision())),
        None => None,
    })
}

async fn list(c: &Client, prefix: &str) -> Result<Vec<(String, Value, i64)>> {
    let r = c.clone().get(prefix, Some(GetOptions::new().with_prefix())).await?;
    r.kvs()
        .iter()
        .map(|kv| Ok((kv.key_str()?.to_string(), serde_json::from_slice(kv.value())?, kv.mod_revision())))
        .collect()
}

async fn put(c: &Client, key: &str, v: &Value) -> Result<()> {
    c.clone().put(key, serde_json::to_vec(v)?, None).await?;
    Ok(())
}

async fn delete(c: &Client, key: &str) -> Result<()> {
    c.clone().delete(key, None).await?;
    Ok(())
}

/// A compare-and-swap edit, retried on conflict; generation moves when spec does (the store's rule).
async fn update(c: &Client, key: &str, mut f: impl FnMut(&mut Value)) -> Result<Value> {
    for _ in 0..50 {
        let (old, rev) = get(c, key).await?.with_context(|| format!("{key} not found"))?;
        let mut new = old.clone();
        f(&mut new);
        if new["spec"] != old["spec"] {
            new["metadata"]["generation"] = json!(old["metadata"]["generation"].as_i64().unwrap_or(1) + 1);
        }
        let txn = Txn::new().when([Compare::mod_revision(key, CompareOp::Equal, rev)]).and_then([TxnOp::put(
            key,
            serde_json::to_vec(&new)?,
            None,
        )]);
        if c.clone().txn(txn).await?.succeeded() {
            return Ok(new);
        }
    }
    bail!("{key}: too many conflicts")
}

macro_rules! eventually {
    ($secs:expr, $what:expr, $body:expr) => {{
        let deadline = Instant::now() + Duration::from_secs_f64($secs as f64);
        let mut last_err = String::new();
        loop {
            let r: Result<Option<_>> = $body.await;
            match r {
                Ok(Some(v)) => break v,
                Ok(None) => {}
                Err(e) => last_err = format!("{e:#}"),
            }
            if Instant::now() > deadline {
                bail!("timed out after {}s waiting for {} {}", $secs, $what, last_err);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }};
}

// ---- the processes ----

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A `weft controller` with short timeouts; killed on drop.
struct Controller {
    child: Child,
    port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

const FAST: &[&str] = &[
    "--leader-elect-lease-duration=3s",
    "--leader-elect-renew-deadline=2s",
    "--leader-elect-retry-period=500ms",
    "--node-monitor-grace-period=3s",
    "--node-monitor-period=500ms",
    "--resync-period=5s",
];

impl Controller {
    fn start(etcd: &str, extra: &[&str]) -> Result<Controller> {
        let dir = tempfile::Builder::new().prefix("weft-controller-").tempdir()?;
        let log = dir.path().join("controller.log");
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let child = Command::new(weft_lab::weft_bin())
            .arg("controller")
            .args(["--etcd-endpoints", etcd, "--healthz-bind-address", &addr, "--metrics-bind-address", &addr])
            .args(FAST)
            .args(extra)
            .env("WEFT_LOG", "info,weft_control=debug")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log)?)
            .stderr(std::fs::File::options().append(true).open(&log)?)
            .spawn()?;
        Ok(Controller { child, port, log, _dir: dir })
    }

    fn metrics(&self) -> Result<String> {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out.split_once("\r\n\r\n").map(|x| x.1.to_string()).unwrap_or_default())
    }

    /// The sum of every sample of a metric (0 when absent).
    fn metric(&self, name: &str) -> f64 {
        self.metrics()
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, sig: &str) {
        let _ = Command::new("kill").args([sig, &self.child.id().to_string()]).stderr(Stdio::null()).status();
    }

    fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.signal("-CONT");
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() || std::env::var_os("WEFT_TEST_LOGS").is_some() {
            eprintln!("---- controller log ----\n{}", self.log());
        }
    }
}

/// The kubelet's part, played by the test: leases for live nodes; Running, Ready and an IP for their pods.
#[derive(Clone, Default)]
struct Kubelet {
    alive: Arc<Mutex<BTreeSet<String>>>,
    /// Pods (by name) whose readiness probe fails.
    unready: Arc<Mutex<BTreeSet<String>>>,
}

impl Kubelet {
    fn set_alive(&self, node: &str, alive: bool) {
        let mut a = self.alive.lock().unwrap();
        if alive {
            a.insert(node.to_string());
        } else {
            a.remove(node);
        }
    }

    fn set_ready(&self, pod: &str, ready: bool) {
        let mut u = self.unready.lock().unwrap();
        if ready {
            u.remove(pod);
        } else {
            u.insert(pod.to_string());
        }
    }

    async fn run(self, c: Client) {
        let mut next_ip: BTreeMap<String, u32> = BTreeMap::new();
        loop {
            let _ = self.once(&c, &mut next_ip).await;
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    }

    async fn once(&self, c: &Client, next_ip: &mut BTreeMap<String, u32>) -> Result<()> {
        let alive = self.alive.lock().unwrap().clone();
        for n in &alive {
            let lease = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": n, "namespace": "kube-node-lease", "uid": format!("lease-{n}")},
                "spec": {"holderIdentity": n, "leaseDurationSeconds": 40, "renewTime": now(true)}});
            put(c, &format!("/registry/leases/kube-node-lease/{n}"), &lease).await?;
        }
        let unready = self.unready.lock().unwrap().clone();
        for (key, p, rev) in list(c, "/registry/pods/").await? {
            let node = p["spec"]["nodeName"].as_str().unwrap_or("").to_string();
            if !alive.contains(&node) || !p["metadata"]["deletionTimestamp"].is_null() {
                continue;
            }
            if matches!(p["status"]["phase"].as_str(), Some("Failed" | "Succeeded")) {
                continue;
            }
            let name = p["metadata"]["name"].as_str().unwrap_or("").to_string();
            let mut new = p.clone();
            let ip = match p["status"]["podIP"].as_str() {
                Some(ip) => ip.to_string(),
                None => {
                    let idx: u32 = node.trim_start_matches(|ch: char| !ch.is_ascii_digit()).parse().unwrap_or(0);
                    let n = next_ip.entry(node.clone()).or_insert(1);
                    *n += 1;
                    format!("10.244.{idx}.{}", *n)
                }
            };
            let ready = if unready.contains(&name) { "False" } else { "True" };
            let old_ready = p["status"]["conditions"]
                .as_array()
                .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready"))
                .and_then(|c| c["status"].as_str())
                .unwrap_or("");
            if p["status"]["phase"] == "Running" && p["status"]["podIP"] == json!(ip) && old_ready == ready {
                continue;
            }
            let t = now(false);
            new["status"]["phase"] = json!("Running");
            new["status"]["podIP"] = json!(ip);
            new["status"]["hostIP"] = json!("192.168.56.11");
            new["status"]["conditions"] = json!([
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": t},
                {"type": "ContainersReady", "status": ready, "lastTransitionTime": t},
                {"type": "Ready", "status": ready, "lastTransitionTime": t}]);
            let txn = Txn::new()
                .when([Compare::mod_revision(key.as_str(), CompareOp::Equal, rev)])
                .and_then([TxnOp::put(key.as_str(), serde_json::to_vec(&new)?, None)]);
            c.clone().txn(txn).await?;
        }
        Ok(())
    }
}

struct Env {
    etcd: EtcdFixture,
    c: Client,
    kubelet: Kubelet,
}

impl Env {
    async fn new() -> Result<Env> {
        let etcd = EtcdFixture::start()?;
        let c = etcd.client().await?;
        let kubelet = Kubelet::default();
        tokio::spawn(kubelet.clone().run(c.clone()));
        Ok(Env { etcd, c, kubelet })
    }

    fn endpoint(&self) -> &str {
        self.etcd.endpoint()
    }

    fn controller(&self, extra: &[&str]) -> Result<Controller> {
        Controller::start(self.endpoint(), extra)
    }

    /// A Ready node with room for plenty of pods, heartbeating from now on.
    async fn add_node(&self, name: &str) -> Result<()> {
        let node = json!({"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "uid": uid(), "creationTimestamp": now(false), "labels": {"kubernetes.io/hostname": name}},
            "spec": {},
            "status": {"allocatable": {"cpu": "4", "memory": "8Gi", "pods": "110"},
                       "capacity": {"cpu": "4", "memory": "8Gi", "pods": "110"},
                       "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                                       "lastHeartbeatTime": now(false), "lastTransitionTime": now(false)}]}});
        put(&self.c, &format!("/registry/nodes/{name}"), &node).await?;
        self.kubelet.set_alive(name, true);
        Ok(())
    }

    fn apply(&self, yaml: &str) -> Result<()> {
        let mut child = Command::new(weft_lab::weft_bin())
            .args(["apply", "-f", "-", "--etcd-endpoints", self.endpoint()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        child.stdin.take().unwrap().write_all(yaml.as_bytes())?;
        let out = child.wait_with_output()?;
        ensure!(out.status.success(), "weft apply: {}", String::from_utf8_lossy(&out.stderr));
        Ok(())
    }

    /// `weft args` against this etcd, as an operator would run it; its stdout, or an error with its stderr.
    fn weft(&self, args: &[&str]) -> Result<String> {
        let out = weft_lab::run_weft(self.endpoint(), args, None)?;
        ensure!(out.status.success(), "weft {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Pods (not being deleted) whose labels include `sel`.
    async fn pods(&self, sel: &[(&str, &str)]) -> Result<Vec<Value>> {
        Ok(list(&self.c, "/registry/pods/")
            .await?
            .into_iter()
            .map(|(_, p, _)| p)
            .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
            .filter(|p| sel.iter().all(|(k, v)| p["metadata"]["labels"][*k] == *v))
            .collect())
    }
}

fn is_ready(p: &Value) -> bool {
    p["status"]["conditions"]
        .as_array()
        .is_some_and(|cs| cs.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"))
}

fn image(p: &Value) -> &str {
    p["spec"]["containers"][0]["image"].as_str().unwrap_or("")
}

fn name(v: &Value) -> String {
    v["metadata"]["name"].as_str().unwrap_or("").to_string()
}

const NGINX: &str = "apiVersion: extensions/v1beta1
kind: Deployment
metadata:
  name: nginx-deployment
spec:
  replicas: 3
  template:
    metadata:
      labels:
        app: nginx
    spec:
      containers:
      - name: nginx
        image: nginx:1.7.9
        ports:
        - containerPort: 80
";

const FRONTEND: &str = "apiVersion: apps/v1
kind: ReplicaSet
metadata:
  name: frontend
  labels: {app: guestbook, tier: frontend}
spec:
  replicas: 3
  selector:
    matchLabels: {tier: frontend}
    matchExpressions:
      - {key: tier, operator: In, values: [frontend]}
  template:
    metadata:
      labels: {app: guestbook, tier: frontend}
    spec:
      containers:
      - name: php-redis
        image: gcr.io/google_samples/gb-frontend:v3
        resources:
          requests: {cpu: 100m, memory: 100Mi}
        ports:
        - containerPort: 80
";

/// Every pod of `sel` Running, Ready, bound, with `image`, and exactly `n` of them.
async fn settled(env: &Env, sel: &[(&str, &str)], n: usize, img: &str) -> Result<Option<Vec<Value>>> {
    let pods = env.pods(sel).await?;
    let ok =
        pods.len() == n && pods.iter().all(|p| is_ready(p) && image(p) == img && p["spec"]["nodeName"].is_string());
    Ok(ok.then_some(pods))
}

const DEPLOY_KEY: &str = "/registry/deployments/default/nginx-deployment";

async fn replicasets(env: &Env) -> Result<Vec<Value>> {
    Ok(list(&env.c, "/registry/replicasets/default/").await?.into_iter().map(|(_, v, _)| v).collect())
}

fn revision(rs: &Value) -> &str {
    rs["metadata"]["annotations"]["deployment.kubernetes.io/revision"].as_str().unwrap_or("")
}

/// A rollout to `img` completes with ready pods never below `min_ready` and pods never above `max_pods`.
async fn rollout(env: &Env, img: &str, min_ready: usize, max_pods: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let pods = env.pods(&[("app", "nginx")]).await?;
        let ready = pods.iter().filter(|p| is_ready(p)).count();
        ensure!(pods.len() <= max_pods, "{} pods during the rollout to {img} (max {max_pods})", pods.len());
        ensure!(ready >= min_ready, "{ready} ready pods during the rollout to {img} (min {min_ready})");
        if pods.len() == 3 && pods.iter().all(|p| image(p) == img && is_ready(p)) {
            let (d, _) = get(&env.c, DEPLOY_KEY).await?.context("deployment")?;
            let s = &d["status"];
            if s["updatedReplicas"] == 3 && s["availableReplicas"] == 3 && s["replicas"] == 3 {
                return Ok(());
            }
        }
        ensure!(Instant::now() < deadline, "rollout to {img} did not finish");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_rolls_out_rolls_back_and_pauses() -> Result<()> {
    let env = Env::new().await?;
    for n in ["node-1", "node-2", "node-3"] {
        env.add_node(n).await?;
    }
    let _ctl = env.controller(&[])?;
    env.apply(NGINX)?;
    let pods = eventually!(30, "3 nginx:1.7.9 pods", settled(&env, &[("app", "nginx")], 3, "nginx:1.7.9"));
    let nodes: BTreeSet<&str> = pods.iter().map(|p| p["spec"]["nodeName"].as_str().unwrap()).collect();
    assert_eq!(nodes.len(), 3, "one replica per node");
    let d = eventually!(20, "a complete deployment", async {
        let (d, _) = get(&env.c, DEPLOY_KEY).await?.context("deployment")?;
        let progressing =
            d["status"]["conditions"].as_array().and_then(|cs| cs.iter().find(|c| c["type"] == "Progressing")).cloned();
        Ok(progressing.filter(|c| c["reason"] == "NewReplicaSetAvailable").map(|_| d))
    });
    assert_eq!(d["metadata"]["annotations"]["deployment.kubernetes.io/revision"], "1");

    // kubectl set image deployment/nginx-deployment nginx=nginx:1.9.1. The manifest is extensions/v1beta1, whose
    // defaults (stored by apply, as the API server does) are maxSurge 1 and maxUnavailable 1: 2 ready, 4 pods.
    let strategy = &d["spec"]["strategy"]["rollingUpdate"];
    assert_eq!((&strategy["maxSurge"], &strategy["maxUnavailable"]), (&json!(1), &json!(1)), "{strategy}");
    env.apply(&NGINX.replace("nginx:1.7.9", "nginx:1.9.1"))?;
    rollout(&env, "nginx:1.9.1", 2, 4).await?;
    let rss = replicasets(&env).await?;
    assert_eq!(rss.len(), 2);
    let old = rss.iter().find(|r| revision(r) == "1").context("revision 1 kept")?;
    assert_eq!(old["spec"]["replicas"], 0);

    // `weft rollout undo` (kubectl's): the CLI copies revision 1's template (without its hash label) into the
    // Deployment; the controller then scales the old ReplicaSet back up.
    let out = env.weft(&["rollout", "undo", "deployment/nginx-deployment"])?;
    assert!(out.contains("nginx-deployment rolled back"), "weft rollout undo printed {out:?}");
    rollout(&env, "nginx:1.7.9", 2, 4).await?;
    let rss = replicasets(&env).await?;
    assert_eq!(rss.len(), 2, "no third ReplicaSet: the old one is current again");
    let back = rss.iter().find(|r| r["spec"]["replicas"] == 3).context("active ReplicaSet")?;
    assert_eq!(name(back), name(old));
    assert_eq!(revision(back), "3");
    assert_eq!(back["metadata"]["annotations"]["deployment.kubernetes.io/revision-history"], "1");
    let (d, _) = get(&env.c, DEPLOY_KEY).await?.unwrap();
    assert_eq!(d["metadata"]["annotations"]["deployment.kubernetes.io/revision"], "3");

    // Paused: a template change rolls nothing; resumed, it rolls.
    update(&env.c, DEPLOY_KEY, |d| d["spec"]["paused"] = json!(true)).await?;
    update(&env.c, DEPLOY_KEY, |d| d["spec"]["template"]["spec"]["containers"][0]["image"] = json!("nginx:1.10"))
        .await?;
    eventually!(10, "the Paused condition", async {
        let (d, _) = get(&env.c, DEPLOY_KEY).await?.unwrap();
        let cs = d["status"]["conditions"].as_array().cloned().unwrap_or_default();
        Ok(cs.iter().any(|c| c["type"] == "Progressing" && c["reason"] == "DeploymentPaused").then_some(()))
    });
    // The controller has seen the paused template change (observedGeneration caught up): only now does the
    // absence of a new ReplicaSet mean anything.
    eventually!(10, "the controller to observe the paused template", async {
        let (d, _) = get(&env.c, DEPLOY_KEY).await?.unwrap();
        Ok((d["status"]["observedGeneration"] == d["metadata"]["generation"]).then_some(()))
    });
    assert_eq!(replicasets(&env).await?.len(), 2, "no ReplicaSet for the new template while paused");
    assert!(env.pods(&[("app", "nginx")]).await?.iter().all(|p| image(p) == "nginx:1.7.9"));
    // Scaling while paused still works.
    update(&env.c, DEPLOY_KEY, |d| d["spec"]["replicas"] = json!(5)).await?;
    eventually!(20, "5 paused replicas", settled(&env, &[("app", "nginx")], 5, "nginx:1.7.9"));
    update(&env.c, DEPLOY_KEY, |d| {
        d["spec"]["replicas"] = json!(3);
        d["spec"]["paused"] = json!(false);
    })
    .await?;
    rollout(&env, "nginx:1.10", 2, 6).await?;
    assert_eq!(replicasets(&env).await?.len(), 3);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replicaset_heals_and_the_seeds_frontend_gets_three_pods() -> Result<()> {
    let env = Env::new().await?;
    env.add_node("node-1").await?;
    env.add_node("node-2").await?;
    let _ctl = env.controller(&[])?;
    env.apply(FRONTEND)?;
    let img = "gcr.io/google_samples/gb-frontend:v3";
    let pods = eventually!(30, "3 frontend pods", settled(&env, &[("tier", "frontend")], 3, img));
    for p in &pods {
        assert!(name(p).starts_with("frontend-") && name(p).len() == "frontend-".len() + 5, "{}", name(p));
        assert_eq!(p["metadata"]["ownerReferences"][0]["kind"], "ReplicaSet");
        assert_eq!(p["metadata"]["ownerReferences"][0]["controller"], true);
    }
    // A deleted pod is replaced.
    let victim = name(&pods[0]);
    delete(&env.c, &format!("/registry/pods/default/{victim}")).await?;
    let healed = eventually!(20, "a replacement", async {
        let pods = settled(&env, &[("tier", "frontend")], 3, img).await?;
        Ok(pods.filter(|ps| ps.iter().all(|p| name(p) != victim)))
    });
    assert_eq!(healed.len(), 3);
    // A failed pod is replaced too (and left for inspection).
    let failed = name(&healed[0]);
    update(&env.c, &format!("/registry/pods/default/{failed}"), |p| p["status"]["phase"] = json!("Failed")).await?;
    eventually!(20, "3 active pods besides the failed one", async {
        let pods = env.pods(&[("tier", "frontend")]).await?;
        let active = pods.iter().filter(|p| p["status"]["phase"] != "Failed" && is_ready(p)).count();
        Ok((active == 3 && pods.len() == 4).then_some(()))
    });
    // An orphan with matching labels is adopted, and then one pod too many is deleted.
    let orphan = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "stray", "namespace": "default", "uid": uid(), "creationTimestamp": now(false),
                     "labels": {"tier": "frontend"}},
        "spec": {"containers": [{"name": "c", "image": img}], "nodeName": "node-1"}});
    put(&env.c, "/registry/pods/default/stray", &orphan).await?;
    eventually!(20, "3 active pods after adoption", async {
        let pods = env.pods(&[("tier", "frontend")]).await?;
        let active: Vec<&Value> = pods.iter().filter(|p| p["status"]["phase"] != "Failed").collect();
        let owned = active.iter().all(|p| p["metadata"]["ownerReferences"][0]["name"] == "frontend");
        Ok((active.len() == 3 && owned).then_some(()))
    });
    let (rs, _) = get(&env.c, "/registry/replicasets/default/frontend").await?.unwrap();
    eventually!(10, "status", async {
        let (rs, _) = get(&env.c, "/registry/replicasets/default/frontend").await?.unwrap();
        let s = &rs["status"];
        Ok((s["replicas"] == 3
            && s["readyReplicas"] == 3
            && s["availableReplicas"] == 3
            && s["fullyLabeledReplicas"].as_i64() >= Some(2))
        .then_some(()))
    });
    assert!(rs["status"]["observedGeneration"].is_number());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemonset_follows_nodes_joining_and_leaving() -> Result<()> {
    let env = Env::new().await?;
    env.add_node("node-1").await?;
    env.add_node("node-2").await?;
    let _ctl = env.controller(&[])?;
    env.apply(
        "apiVersion: apps/v1
kind: DaemonSet
metadata: {name: logs, namespace: kube-system}
spec:
  selector: {matchLabels: {app: logs}}
  template:
    metadata: {labels: {app: logs}}
    spec:
      containers: [{name: fluentd, image: fluentd:v1}]
",
    )?;
    let on = |pods: &[Value]| -> BTreeSet<String> {
        pods.iter().map(|p| p["spec"]["nodeName"].as_str().unwrap_or("").to_string()).collect()
    };
    let pods = eventually!(30, "a pod on each node", settled(&env, &[("app", "logs")], 2, "fluentd:v1"));
    assert_eq!(on(&pods), BTreeSet::from(["node-1".to_string(), "node-2".to_string()]));
    env.add_node("node-3").await?;
    let pods = eventually!(30, "a pod on the new node", settled(&env, &[("app", "logs")], 3, "fluentd:v1"));
    assert_eq!(on(&pods).len(), 3);
    env.kubelet.set_alive("node-2", false);
    delete(&env.c, "/registry/nodes/node-2").await?;
    let pods =
        eventually!(30, "the pod of the node that left gone", settled(&env, &[("app", "logs")], 2, "fluentd:v1"));
    assert_eq!(on(&pods), BTreeSet::from(["node-1".to_string(), "node-3".to_string()]));
    eventually!(10, "DaemonSet status", async {
        let (ds, _) = get(&env.c, "/registry/daemonsets/kube-system/logs").await?.unwrap();
        let s = &ds["status"];
        Ok((s["desiredNumberScheduled"] == 2 && s["numberReady"] == 2 && s["numberAvailable"] == 2).then_some(()))
    });
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_stops_heartbeating_loses_its_pods_to_the_others() -> Result<()> {
    let env = Env::new().await?;
    for n in ["node-1", "node-2", "node-3"] {
        env.add_node(n).await?;
    }
    let _ctl = env.controller(&[])?;
    // The pods tolerate an unreachable node for 5 s instead of the default 300 s.
    env.apply(&NGINX.replace(
        "      containers:",
        "      tolerations:\n      - {key: node.kubernetes.io/unreachable, operator: Exists, effect: NoExecute, tolerationSeconds: 5}\n      containers:",
    ))?;
    let pods = eventually!(30, "3 pods", settled(&env, &[("app", "nginx")], 3, "nginx:1.7.9"));
    let lost = pods.iter().find(|p| p["spec"]["nodeName"] == "node-1").map(name).context("a pod on node-1")?;
    // The API server's default toleration for the other key was added at creation.
    let (p, _) = get(&env.c, &format!("/registry/pods/default/{lost}")).await?.context("the pod")?;
    let tolerations: Vec<(String, Value)> = p["spec"]["tolerations"]
        .as_array()
        .map(|ts| {
            ts.iter().map(|t| (t["key"].as_str().unwrap_or("").to_string(), t["tolerationSeconds"].clone())).collect()
        })
        .unwrap_or_default();
    assert_eq!(
        tolerations,
        [
            ("node.kubernetes.io/unreachable".to_string(), json!(5)),
            ("node.kubernetes.io/not-ready".to_string(), json!(300))
        ]
    );
    env.kubelet.set_alive("node-1", false);
    // Past the 3 s grace period: Unknown, tainted NoSchedule and NoExecute, its pod not ready.
    eventually!(15, "node-1 Unknown", async {
        let (n, _) = get(&env.c, "/registry/nodes/node-1").await?.unwrap();
        let ready =
            n["status"]["conditions"].as_array().and_then(|cs| cs.iter().find(|c| c["type"] == "Ready")).cloned();
        let tainted = |effect: &str| {
            n["spec"]["taints"].as_array().is_some_and(|ts| {
                ts.iter().any(|t| t["key"] == "node.kubernetes.io/unreachable" && t["effect"] == effect)
            })
        };
        Ok((ready.is_some_and(|c| c["status"] == "Unknown") && tainted("NoSchedule") && tainted("NoExecute"))
            .then_some(()))
    });
    eventually!(10, "its pod not ready", async {
        let p = get(&env.c, &format!("/registry/pods/default/{lost}")).await?;
        Ok(p.filter(|(p, _)| !is_ready(p)).map(|_| ()))
    });
    // Past its 5 s toleration: the pod is deleted and replaced on a live node.
    let pods = eventually!(30, "3 pods on the live nodes", async {
        let pods = settled(&env, &[("app", "nginx")], 3, "nginx:1.7.9").await?;
        Ok(pods.filter(|ps| ps.iter().all(|p| p["spec"]["nodeName"] != "node-1")))
    });
    assert!(pods.iter().all(|p| name(p) != lost));
    Ok(())
}

/// Every pod create and delete etcd commits, in revision order, seen through one watch on `/registry/`
/// (so a barrier key written under it orders after every earlier write).
#[derive(Clone, Default)]
struct PodWrites(Arc<Mutex<Vec<(&'static str, String)>>>);

const BARRIER: &str = "/registry/weft-test-barrier";

impl PodWrites {
    async fn watch(c: &Client) -> Result<PodWrites> {
        let (watcher, mut stream) = c.clone().watch("/registry/", Some(WatchOptions::new().with_prefix())).await?;
        let writes = PodWrites::default();
        let w = writes.clone();
        tokio::spawn(async move {
            let _keep = watcher; // dropping the watcher would cancel the watch
            while let Ok(Some(resp)) = stream.message().await {
                for ev in resp.events() {
                    let Some(kv) = ev.kv() else { continue };
                    let key = kv.key_str().unwrap_or("").to_string();
                    let what = match ev.event_type() {
                        EventType::Put if key == BARRIER => "barrier",
                        EventType::Put if kv.version() == 1 => "create",
                        EventType::Put => "update",
                        EventType::Delete => "delete",
                    };
                    if key.starts_with("/registry/pods/") || what == "barrier" {
                        w.0.lock().unwrap().push((what, key));
                    }
                }
            }
        });
        Ok(writes)
    }

    fn count(&self, what: &str) -> usize {
        self.0.lock().unwrap().iter().filter(|(w, _)| *w == what).count()
    }

    /// Returns once the watch has delivered every write committed before now: writes a barrier key and waits
    /// for it (one watch delivers in revision order).
    async fn sync(&self, c: &Client) -> Result<()> {
        let before = self.count("barrier");
        c.clone().put(BARRIER, "x", None).await?;
        eventually!(10, "the watch to deliver the barrier", async {
            Ok((self.count("barrier") > before).then_some(()))
        });
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_controllers_never_both_act_every_pod_write_counted_by_watch() -> Result<()> {
    let env = Env::new().await?;
    let writes = PodWrites::watch(&env.c).await?;
    env.add_node("node-1").await?;
    let mut a = env.controller(&[])?;
    eventually!(10, "a leader", async { Ok((a.metric("weft_controller_leader") == 1.0).then_some(())) });
    let b = env.controller(&[])?;
    eventually!(10, "b waiting", async { Ok(b.log().contains("another controller is leader").then_some(())) });
    env.apply(&FRONTEND.replace("replicas: 3", "replicas: 5"))?;
    eventually!(30, "5 pods", settled(&env, &[("tier", "frontend")], 5, "gcr.io/google_samples/gb-frontend:v3"));
    assert!(a.metric("weft_controller_actions_total") > 0.0);
    assert_eq!(b.metric("weft_controller_leader"), 0.0);
    assert_eq!(b.metric("weft_controller_actions_total"), 0.0, "the standby wrote nothing");
    assert_eq!(b.metric("weft_controller_reconciles_total"), 0.0, "the standby reconciled nothing");
    writes.sync(&env.c).await?;
    assert_eq!((writes.count("create"), writes.count("delete")), (5, 0), "one leader: exactly 5 pods created");

    // The leader freezes (as a stopped VM would): the standby takes over once the lease expires.
    a.signal("-STOP");
    eventually!(15, "b leads", async { Ok((b.metric("weft_controller_leader") == 1.0).then_some(())) });
    env.apply(&FRONTEND.replace("replicas: 3", "replicas: 7"))?;
    // The old leader wakes up: it must notice it lost the lease before doing anything, and stop.
    a.signal("-CONT");
    eventually!(15, "a gone and 7 pods", async {
        let n = env.pods(&[("tier", "frontend")]).await?.len();
        Ok((a.exited() && n == 7).then_some(()))
    });
    assert!(a.log().contains("leadership lost"), "{}", a.log());
    // Every pod write up to now (a has exited, so none of its writes is still to come): had both acted, a
    // ReplicaSet would have been scaled twice — more than 7 creates, and deletes to correct them.
    writes.sync(&env.c).await?;
    let seen = writes.0.lock().unwrap().clone();
    let creates: BTreeSet<&str> = seen.iter().filter(|(w, _)| *w == "create").map(|(_, k)| k.as_str()).collect();
    assert_eq!(writes.count("create"), 7, "pods created: {seen:?}");
    assert_eq!(creates.len(), 7, "a key created twice: {seen:?}");
    assert_eq!(writes.count("delete"), 0, "pods deleted: {seen:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_follow_ready_pods() -> Result<()> {
    let env = Env::new().await?;
    env.add_node("node-1").await?;
    let _ctl = env.controller(&[])?;
    env.apply(
        "apiVersion: v1
kind: Service
metadata: {name: my-service}
spec:
  selector: {app: MyApp}
  ports: [{name: http, protocol: TCP, port: 80, targetPort: web}]
---
apiVersion: v1
kind: Service
metadata: {name: manual}
spec:
  ports: [{protocol: TCP, port: 80, targetPort: 9376}]
---
apiVersion: v1
kind: Endpoints
metadata: {name: manual}
subsets: [{addresses: [{ip: 1.2.3.4}], ports: [{port: 9376}]}]
---
apiVersion: apps/v1
kind: ReplicaSet
metadata: {name: myapp}
spec:
  replicas: 2
  selector: {matchLabels: {app: MyApp}}
  template:
    metadata: {labels: {app: MyApp}}
    spec:
      containers: [{name: c, image: busybox, ports: [{name: web, containerPort: 9376}]}]
",
    )?;
    let pods = eventually!(30, "2 pods", settled(&env, &[("app", "MyApp")], 2, "busybox"));
    let ips = |ep: &Value, field: &str| -> BTreeSet<String> {
        ep["subsets"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|s| s[field].as_array().cloned().unwrap_or_default())
            .map(|a| a["ip"].as_str().unwrap_or("").to_string())
            .collect()
    };
    let all: BTreeSet<String> = pods.iter().map(|p| p["status"]["podIP"].as_str().unwrap().to_string()).collect();
    let ep = eventually!(15, "2 ready addresses", async {
        let ep = get(&env.c, "/registry/endpoints/default/my-service").await?.map(|x| x.0);
        Ok(ep.filter(|e| ips(e, "addresses") == all))
    });
    assert_eq!(ep["subsets"][0]["ports"], json!([{"name": "http", "port": 9376, "protocol": "TCP"}]));
    assert_eq!(ep["subsets"][0]["addresses"][0]["targetRef"]["kind"], "Pod");
    assert_eq!(ep["subsets"][0]["addresses"][0]["nodeName"], "node-1");
    // A failing readiness probe moves the pod to notReadyAddresses.
    let sick = name(&pods[0]);
    let sick_ip = pods[0]["status"]["podIP"].as_str().unwrap().to_string();
    env.kubelet.set_ready(&sick, false);
    eventually!(15, "the pod not ready", async {
        let ep = get(&env.c, "/registry/endpoints/default/my-service").await?.map(|x| x.0);
        Ok(ep.filter(|e| {
            ips(e, "notReadyAddresses") == BTreeSet::from([sick_ip.clone()]) && ips(e, "addresses").len() == 1
        }))
    });
    let (manual, _) = get(&env.c, "/registry/endpoints/default/manual").await?.unwrap();
    assert_eq!(ips(&manual, "addresses"), BTreeSet::from(["1.2.3.4".to_string()]), "hand-written Endpoints untouched");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_references_cascade_and_orphan() -> Result<()> {
    let env = Env::new().await?;
    env.add_node("node-1").await?;
    let _ctl = env.controller(&[])?;
    env.apply(NGINX)?;
    eventually!(30, "3 pods", settled(&env, &[("app", "nginx")], 3, "nginx:1.7.9"));
    // --cascade=orphan: the ReplicaSet goes, its pods stay, without owner.
    let rs = replicasets(&env).await?.pop().context("a ReplicaSet")?;
    let rs_key = format!("/registry/replicasets/default/{}", name(&rs));
    // The Deployment would recreate the ReplicaSet: delete it first (background: its ReplicaSet is collected,
    // unless orphaned, which is the case here).
    update(&env.c, DEPLOY_KEY, |d| {
        d["metadata"]["deletionTimestamp"] = json!(now(false));
        d["metadata"]["finalizers"] = json!(["orphan"]);
    })
    .await?;
    eventually!(15, "the Deployment gone", async { Ok(get(&env.c, DEPLOY_KEY).await?.is_none().then_some(())) });
    let (rs, _) = get(&env.c, &rs_key).await?.context("the orphaned ReplicaSet stays")?;
    assert!(rs["metadata"]["ownerReferences"].is_null());
    update(&env.c, &rs_key, |r| {
        r["metadata"]["deletionTimestamp"] = json!(now(false));
        r["metadata"]["finalizers"] = json!(["orphan"]);
    })
    .await?;
    eventually!(15, "the ReplicaSet gone", async { Ok(get(&env.c, &rs_key).await?.is_none().then_some(())) });
    let pods = env.pods(&[("app", "nginx")]).await?;
    assert_eq!(pods.len(), 3);
    assert!(pods.iter().all(|p| p["metadata"]["ownerReferences"].is_null()));

    // Background: a new ReplicaSet deleted outright takes its pods with it.
    env.apply(&FRONTEND.replace("replicas: 3", "replicas: 2"))?;
    eventually!(
        30,
        "2 frontend pods",
        settled(&env, &[("tier", "frontend")], 2, "gcr.io/google_samples/gb-frontend:v3")
    );
    delete(&env.c, "/registry/replicasets/default/frontend").await?;
    eventually!(15, "its pods collected", async {
        Ok(env.pods(&[("tier", "frontend")]).await?.is_empty().then_some(()))
    });

    // Foreground: the Deployment waits for its ReplicaSet and pods.
    env.apply(&NGINX.replace("nginx-deployment", "web").replace("app: nginx", "app: web"))?;
    eventually!(30, "3 web pods", settled(&env, &[("app", "web")], 3, "nginx:1.7.9"));
    let key = "/registry/deployments/default/web";
    update(&env.c, key, |d| {
        d["metadata"]["deletionTimestamp"] = json!(now(false));
        d["metadata"]["finalizers"] = json!(["foregroundDeletion"]);
    })
    .await?;
    eventually!(20, "everything gone", async {
        let d = get(&env.c, key).await?;
        let rss = replicasets(&env).await?.into_iter().filter(|r| name(r).starts_with("web-")).count();
        let pods = env.pods(&[("app", "web")]).await?.len();
        Ok((d.is_none() && rss == 0 && pods == 0).then_some(()))
    });
    Ok(())
}
