//! `weft kubelet` end to end: a real containerd + runc + CNI (bridge, host-local) in a namespace of its own, a real
//! etcd and the kubelet beside it, pods written through `weft apply`. One containerd and one kubelet serve every
//! test of this file (they run in parallel, each with its own pods); shortened back-off and sync periods. The
//! test that kills the kubelet runs alone: a kubelet killed in the middle of another test's StartContainer leaves
//! that container exited with StartError ("context canceled"), as it would in a real cluster.

use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde_json::Value;
use weft_lab::containerd::{ContainerdFixture, POD_SUBNET};
use weft_lab::NsRuntime;

const NODE: &str = "node-k1";
const ETCD: &str = "http://127.0.0.1:2379";

struct Env {
    fx: ContainerdFixture,
    ns: NsRuntime,
    kubelet: Mutex<Option<Child>>,
    client: etcd_client::Client,
}

static ENV: OnceLock<Mutex<Option<Arc<Env>>>> = OnceLock::new();

/// Tests share the kubelet (read); the one that kills it holds it alone (write).
static KUBELET_USE: RwLock<()> = RwLock::new(());

/// The shared environment, held for the length of a test.
struct Held<G> {
    env: Arc<Env>,
    _use: G,
}

impl<G> std::ops::Deref for Held<G> {
    type Target = Env;
    fn deref(&self) -> &Env {
        &self.env
    }
}

extern "C" fn teardown() {
    if let Some(m) = ENV.get() {
        let env = m.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(env) = env {
            if let Some(mut k) = env.kubelet.lock().unwrap_or_else(|p| p.into_inner()).take() {
                let _ = k.kill();
                let _ = k.wait();
            }
            drop(env);
        }
    }
}

/// The environment, shared with the other tests running now.
fn env() -> Held<RwLockReadGuard<'static, ()>> {
    let _use = KUBELET_USE.read().unwrap_or_else(|p| p.into_inner());
    Held { env: shared_env(), _use }
}

/// The environment with no other test running (for a test that stops the kubelet).
fn env_alone() -> Held<RwLockWriteGuard<'static, ()>> {
    let _use = KUBELET_USE.write().unwrap_or_else(|p| p.into_inner());
    Held { env: shared_env(), _use }
}

fn shared_env() -> Arc<Env> {
    let m = ENV.get_or_init(|| Mutex::new(None));
    let mut g = m.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(e) = g.as_ref() {
        return e.clone();
    }
    let e = Arc::new(start_env().expect("kubelet environment"));
    // The harness exits the process after the last test: clean up then.
    // SAFETY: registering a plain extern "C" function with no arguments.
    unsafe { libc::atexit(teardown) };
    *g = Some(e.clone());
    e
}

/// A small PKI in `dir`: a cluster CA, the kubelet's serving certificate (for 10.88.0.1), an admin client
/// certificate, and a client certificate from another CA (which the kubelet must refuse).
fn make_pki(dir: &std::path::Path) -> Result<()> {
    let script = r#"set -e
ec="-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"
openssl req -x509 $ec -keyout ca.key -out ca.crt -days 2 -subj /CN=weft-test-ca 2>/dev/null
openssl req -x509 $ec -keyout rogue-ca.key -out rogue-ca.crt -days 2 -subj /CN=rogue-ca 2>/dev/null
printf 'subjectAltName=IP:10.88.0.1,IP:127.0.0.1
extendedKeyUsage=serverAuth
' > server.ext
printf 'extendedKeyUsage=clientAuth
' > client.ext
sign() { # name cn ca ext
  openssl req $ec -keyout $1.key -out $1.csr -subj /CN=$2 2>/dev/null
  openssl x509 -req -in $1.csr -CA $3.crt -CAkey $3.key -CAcreateserial -out $1.crt -days 2 -extfile $4 2>/dev/null
}
sign kubelet node-k1 ca server.ext
sign admin admin ca client.ext
sign rogue admin rogue-ca client.ext
"#;
    let out = Command::new("bash").arg("-c").arg(script).current_dir(dir).output()?;
    if !out.status.success() {
        bail!("making the test PKI: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

fn start_env() -> Result<Env> {
    let mut fx = ContainerdFixture::start()?;
    fx.start_etcd()?;
    std::fs::create_dir_all(fx.dir().join("pki"))?;
    make_pki(&fx.dir().join("pki"))?;
    std::fs::write(fx.dir().join("resolv.conf"), "nameserver 192.0.2.53\nsearch example.test\n")?;
    let ns = fx.netns().runtime()?;
    let client = ns.block_on(async { etcd_client::Client::connect([ETCD], None).await })??;
    let env = Env { fx, ns, kubelet: Mutex::new(None), client };
    env.start_kubelet()?;
    Ok(env)
}

impl Env {
    fn kubelet_log(&self) -> std::path::PathBuf {
        self.fx.dir().join("kubelet.log")
    }

    fn pki(&self, f: &str) -> std::path::PathBuf {
        self.fx.dir().join("pki").join(f)
    }

    /// `weft` with what `weft logs` / `weft exec` need to reach kubelets.
    fn weft_cmd(&self, args: &[&str]) -> Command {
        let mut c = self.client_env(self.fx.net_command(weft_lab::weft_bin()));
        c.args(args);
        c
    }

    /// `program` in the namespace with the environment `weft_cmd` gives (for `script`, which runs weft itself).
    fn client_env(&self, mut c: Command) -> Command {
        c.env("WEFT_ETCD_ENDPOINTS", ETCD)
            .env("WEFT_KUBELET_CA", self.pki("ca.crt"))
            .env("WEFT_KUBELET_CLIENT_CERT", self.pki("admin.crt"))
            .env("WEFT_KUBELET_CLIENT_KEY", self.pki("admin.key"));
        c
    }

    fn start_kubelet(&self) -> Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.kubelet_log())?;
        let child = self
            .fx
            .net_command(weft_lab::weft_bin())
            .args(["kubelet", "--etcd-endpoints", ETCD, "--hostname-override", NODE, "--node-ip", "10.88.0.1"])
            .arg("--container-runtime-endpoint")
            .arg(self.fx.endpoint())
            .arg("--cgroup-parent")
            .arg(self.fx.cgroup_parent())
            .arg("--root-dir")
            .arg(self.fx.dir().join("kubelet"))
            .arg("--resolv-conf")
            .arg(self.fx.dir().join("resolv.conf"))
            .args(["--pod-cidr", POD_SUBNET, "--sync-frequency", "300ms", "--node-status-update-frequency", "1s"])
            .args(["--node-lease-renew-interval", "1s", "--backoff-initial", "1s", "--backoff-max", "4s"])
            .args(["--backoff-reset", "2m", "--healthz-bind-address", "127.0.0.1:10248"])
            .arg("--tls-cert-file")
            .arg(self.pki("kubelet.crt"))
            .arg("--tls-private-key-file")
            .arg(self.pki("kubelet.key"))
            .arg("--client-ca-file")
            .arg(self.pki("ca.crt"))
            .env("WEFT_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        *self.kubelet.lock().unwrap_or_else(|p| p.into_inner()) = Some(child);
        Ok(())
    }

    fn kill_kubelet(&self) {
        if let Some(mut k) = self.kubelet.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = k.kill();
            let _ = k.wait();
        }
    }

    fn kubelet_alive(&self) -> bool {
        let mut g = self.kubelet.lock().unwrap_or_else(|p| p.into_inner());
        g.as_mut().is_some_and(|k| matches!(k.try_wait(), Ok(None)))
    }

    fn weft(&self, args: &[&str], stdin: Option<&str>) -> Result<String> {
        use std::io::Write;
        let mut child = self
            .fx
            .net_command(weft_lab::weft_bin())
            .args(args)
            .env("WEFT_ETCD_ENDPOINTS", ETCD)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        if let (Some(text), Some(mut input)) = (stdin, child.stdin.take()) {
            input.write_all(text.as_bytes())?;
        }
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!("weft {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn apply(&self, manifest: &str) {
        self.weft(&["apply", "-f", "-"], Some(manifest)).expect("weft apply");
    }

    fn get_key(&self, key: &str) -> Option<Value> {
        let mut c = self.client.clone();
        let key = key.to_string();
        let resp = self.ns.block_on(async move { c.get(key, None).await }).ok()?.ok()?;
        resp.kvs().first().and_then(|kv| serde_json::from_slice(kv.value()).ok())
    }

    fn put_key(&self, key: &str, v: &Value) {
        let mut c = self.client.clone();
        let (key, v) = (key.to_string(), serde_json::to_vec(v).unwrap());
        self.ns.block_on(async move { c.put(key, v, None).await }).unwrap().unwrap();
    }

    fn pod(&self, name: &str) -> Option<Value> {
        self.get_key(&format!("/registry/pods/default/{name}"))
    }

    /// Polls the pod until `cond` holds; fails with the pod and the kubelet's log tail.
    fn wait_pod(&self, name: &str, limit: Duration, what: &str, mut cond: impl FnMut(&Value) -> bool) -> Value {
        let deadline = Instant::now() + limit;
        let mut last = None;
        while Instant::now() < deadline {
            if let Some(p) = self.pod(name) {
                if cond(&p) {
                    return p;
                }
                last = Some(p);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let log = std::fs::read_to_string(self.kubelet_log()).unwrap_or_default();
        let about = format!("pod=default/{name} ");
        let mine: Vec<&str> = log.lines().filter(|l| l.contains(&about)).take(40).collect();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        panic!(
            "pod {name}: timed out waiting for {what}; last seen:\n{}\nkubelet log about it:\n{}\nkubelet log (newest first):\n{}",
            serde_json::to_string_pretty(&last.unwrap_or(Value::Null)).unwrap_or_default(),
            mine.join("\n"),
            tail.join("\n")
        );
    }

    /// Runs `cmd` in a container through containerd (the task id is the CRI container id).
    fn exec(&self, container_id: &str, cmd: &[&str]) -> Result<String> {
        let id = container_id.trim_start_matches("containerd://");
        let out = Command::new("ctr")
            .arg("--address")
            .arg(self.fx.socket())
            .args(["-n", "k8s.io", "tasks", "exec", "--exec-id", &format!("t{}", weft_lab::unique_id()), id])
            .args(cmd)
            .output()?;
        if !out.status.success() {
            bail!("exec {cmd:?} in {id}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn kill_task(&self, container_id: &str) -> Result<()> {
        let id = container_id.trim_start_matches("containerd://");
        let out = Command::new("ctr")
            .arg("--address")
            .arg(self.fx.socket())
            .args(["-n", "k8s.io", "tasks", "kill", "-s", "KILL", id])
            .output()?;
        if !out.status.success() {
            bail!("kill {id}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    /// The id of the pod's running sandbox, from containerd's own labels.
    fn sandbox_of(&self, uid: &str) -> Option<String> {
        let out = Command::new("ctr")
            .arg("--address")
            .arg(self.fx.socket())
            .args(["-n", "k8s.io", "containers", "ls", "-q"])
            .arg(format!("labels.\"io.kubernetes.pod.uid\"=={uid},labels.\"io.cri-containerd.kind\"==sandbox"))
            .output()
            .ok()?;
        let ids: Vec<String> = String::from_utf8_lossy(&out.stdout).split_whitespace().map(str::to_string).collect();
        // Only one runs at a time; an old one may linger until the kubelet removes it.
        ids.into_iter().find(|id| {
            Command::new("ctr")
                .arg("--address")
                .arg(self.fx.socket())
                .args(["-n", "k8s.io", "tasks", "ls"])
                .output()
                .is_ok_and(|o| {
                    String::from_utf8_lossy(&o.stdout)
                        .lines()
                        .any(|l| l.starts_with(id.as_str()) && l.contains("RUNNING"))
                })
        })
    }

    fn container_exists(&self, container_id: &str) -> bool {
        let id = container_id.trim_start_matches("containerd://");
        Command::new("ctr")
            .arg("--address")
            .arg(self.fx.socket())
            .args(["-n", "k8s.io", "containers", "info", id])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }
}

fn pod_yaml(name: &str, restart: &str, containers: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: default\n  labels:\n    app: {name}\nspec:\n  nodeName: {NODE}\n  restartPolicy: {restart}\n  terminationGracePeriodSeconds: 1\n  containers:\n{containers}"
    )
}

fn container(name: &str, script: &str) -> String {
    format!(
        "  - name: {name}\n    image: weft.local/busybox:1\n    command: [\"sh\", \"-c\", {}]\n",
        serde_json::to_string(script).unwrap()
    )
}

fn phase(p: &Value) -> &str {
    p["status"]["phase"].as_str().unwrap_or("")
}

fn cstatus<'a>(p: &'a Value, name: &str) -> &'a Value {
    p["status"]["containerStatuses"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["name"] == name))
        .unwrap_or(&Value::Null)
}

fn restarts(p: &Value, name: &str) -> i64 {
    cstatus(p, name)["restartCount"].as_i64().unwrap_or(0)
}

fn condition(p: &Value, t: &str) -> String {
    p["status"]["conditions"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["type"] == t))
        .and_then(|c| c["status"].as_str())
        .unwrap_or("")
        .to_string()
}

const T: Duration = Duration::from_secs(60);

#[test]
fn a_pod_runs_gets_an_address_and_the_node_registers() {
    let env = env();
    env.apply(&pod_yaml("web", "Always", &container("httpd", "httpd -f -p 80 -h /var/www")));
    let p = env.wait_pod("web", T, "Running and Ready", |p| phase(p) == "Running" && condition(p, "Ready") == "True");
    let ip: std::net::Ipv4Addr = p["status"]["podIP"].as_str().unwrap().parse().unwrap();
    let net: ipnetwork::Ipv4Network = POD_SUBNET.parse().unwrap();
    assert!(net.contains(ip), "{ip} in {POD_SUBNET}");
    assert_eq!(p["status"]["hostIP"], "10.88.0.1");
    assert!(cstatus(&p, "httpd")["containerID"].as_str().unwrap().starts_with("containerd://"));
    // The pod serves on its address, from the node's namespace.
    // Running means started, not yet listening: poll.
    let deadline = Instant::now() + T;
    loop {
        let out =
            env.fx.net_command("curl").args(["-sS", "--max-time", "5", &format!("http://{ip}/")]).output().unwrap();
        if String::from_utf8_lossy(&out.stdout).contains("hello from weft.local/busybox:1") {
            break;
        }
        assert!(Instant::now() < deadline, "the pod does not serve on {ip}: {out:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // The Node: Ready, the runtime named, the pod CIDR set; the Lease renewed.
    let node =
        env.get_key(&format!("/registry/minions/{NODE}")).or_else(|| env.get_key(&format!("/registry/nodes/{NODE}")));
    let node = node.expect("node registered");
    assert_eq!(node["spec"]["podCIDR"], POD_SUBNET);
    assert!(node["status"]["nodeInfo"]["containerRuntimeVersion"].as_str().unwrap().starts_with("containerd://"));
    let ready = node["status"]["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Ready").unwrap().clone();
    assert_eq!(ready["status"], "True");
    let lease = env.get_key(&format!("/registry/leases/kube-node-lease/{NODE}")).expect("lease");
    assert_eq!(lease["spec"]["holderIdentity"], NODE);
    let healthz =
        env.fx.net_command("curl").args(["-sS", "--max-time", "5", "http://127.0.0.1:10248/healthz"]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&healthz.stdout).trim(), "ok");
}

#[test]
fn each_restart_policy_gives_the_pod_phase_and_restarts_kubernetes_gives() {
    let env = env();
    // (pod, policy, containers, final phase, container → restarts at least)
    type Row<'a> = (&'a str, &'a str, String, &'a str, Vec<(&'a str, i64)>);
    let rows: Vec<Row> = vec![
        ("ok-always", "Always", container("c", "exit 0"), "Running", vec![("c", 1)]),
        ("ok-onfailure", "OnFailure", container("c", "exit 0"), "Succeeded", vec![]),
        ("ok-never", "Never", container("c", "exit 0"), "Succeeded", vec![]),
        ("fail-always", "Always", container("c", "exit 3"), "Running", vec![("c", 1)]),
        ("fail-onfailure", "OnFailure", container("c", "exit 3"), "Running", vec![("c", 1)]),
        ("fail-never", "Never", container("c", "exit 3"), "Failed", vec![]),
        ("two-never", "Never", container("bad", "exit 1") + &container("good", "sleep 1000"), "Running", vec![]),
        ("two-always", "Always", container("bad", "exit 1") + &container("good", "sleep 1000"), "Running", vec![("bad", 1)]),
        ("two-both-never", "Never", container("bad", "exit 1") + &container("later", "sleep 1; exit 2"), "Failed", vec![]),
        ("oom-never", "Never", "  - name: c\n    image: weft.local/busybox:1\n    command: [\"sh\", \"-c\", \"x=$(head -c 200000000 /dev/zero | tr '\\\\0' a)\"]\n    resources:\n      limits:\n        memory: 16Mi\n".to_string(), "Failed", vec![]),
    ];
    for (name, policy, cs, _, _) in &rows {
        env.apply(&pod_yaml(name, policy, cs));
    }
    for (name, policy, _, want, restarted) in &rows {
        let p = env.wait_pod(name, T, &format!("phase {want} ({policy})"), |p| {
            // Running is also what a pod is before its failing container exits: wait for the exit too.
            let exited = *name != "two-never" || cstatus(p, "bad")["state"]["terminated"].is_object();
            phase(p) == *want && exited && restarted.iter().all(|(c, n)| restarts(p, c) >= *n)
        });
        if *name == "two-never" {
            let bad = cstatus(&p, "bad");
            assert_eq!(bad["state"]["terminated"]["exitCode"], 1, "{bad}");
            assert!(cstatus(&p, "good")["state"]["running"].is_object());
        }
        if *name == "fail-never" {
            assert_eq!(cstatus(&p, "c")["state"]["terminated"]["reason"], "Error", "{}", cstatus(&p, "c"));
        }
        if *name == "oom-never" {
            assert_eq!(cstatus(&p, "c")["state"]["terminated"]["reason"], "OOMKilled", "{p}");
        }
        if *want == "Succeeded" {
            assert_eq!(cstatus(&p, "c")["state"]["terminated"]["reason"], "Completed", "{}", cstatus(&p, "c"));
        }
    }
}

#[test]
fn a_crash_loop_backs_off_with_crashloopbackoff() {
    let env = env();
    env.apply(&pod_yaml("crasher", "Always", &container("c", "echo attempt $HOSTNAME; exit 1")));
    let mut saw_backoff = false;
    let p = env.wait_pod("crasher", T, "3 restarts with CrashLoopBackOff in between", |p| {
        let c = cstatus(p, "c");
        if c["state"]["waiting"]["reason"] == "CrashLoopBackOff" {
            saw_backoff = true;
            assert_eq!(c["lastState"]["terminated"]["exitCode"], 1);
        }
        saw_backoff && restarts(p, "c") >= 3
    });
    assert_eq!(phase(&p), "Running");
    // The previous attempt's output, through the kubelet server.
    let out = env.weft_cmd(&["logs", "crasher", "--previous"]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "attempt crasher", "{out:?}");
}

#[test]
fn init_containers_run_in_order_before_the_app() {
    let env = env();
    // Each init container appends to a file on an emptyDir volume the app container sees.
    let mount = "    volumeMounts:\n    - name: work\n      mountPath: /work\n";
    let y = format!(
        "{}{mount}  initContainers:\n  - name: first\n    image: weft.local/busybox:1\n    command: [\"sh\", \"-c\", \"sleep 1; echo first >> /work/order\"]\n{mount}  - name: second\n    image: weft.local/busybox:1\n    command: [\"sh\", \"-c\", \"echo second >> /work/order\"]\n{mount}  volumes:\n  - name: work\n    emptyDir: {{}}\n",
        pod_yaml("inits", "Always", &container("app", "sleep 1000"))
    );
    env.apply(&y);
    let p = env.wait_pod("inits", T, "Running after its init containers", |p| phase(p) == "Running");
    let inits = p["status"]["initContainerStatuses"].as_array().unwrap();
    let t = |i: usize, f: &str| inits[i]["state"]["terminated"][f].as_str().unwrap().to_string();
    assert_eq!(inits[0]["state"]["terminated"]["exitCode"], 0);
    assert_eq!(inits[1]["state"]["terminated"]["exitCode"], 0);
    assert!(t(0, "finishedAt") <= t(1, "startedAt"), "first finished before second started");
    assert_eq!(condition(&p, "Initialized"), "True");
    let app = cstatus(&p, "app")["containerID"].as_str().unwrap().to_string();
    assert_eq!(env.exec(&app, &["cat", "/work/order"]).unwrap(), "first\nsecond\n");

    // A failing init container blocks the app and is retried.
    let y = format!(
        "{}  initContainers:\n  - name: broken\n    image: weft.local/busybox:1\n    command: [\"sh\", \"-c\", \"exit 1\"]\n",
        pod_yaml("init-fails", "Always", &container("app", "sleep 1000"))
    );
    env.apply(&y);
    let p = env.wait_pod("init-fails", T, "the init container retried", |p| {
        p["status"]["initContainerStatuses"][0]["restartCount"].as_i64().unwrap_or(0) >= 2
    });
    assert_eq!(phase(&p), "Pending");
    assert_eq!(condition(&p, "Initialized"), "False");
    assert!(cstatus(&p, "app")["containerID"].is_null(), "the app never started");
    assert_eq!(cstatus(&p, "app")["state"]["waiting"]["reason"], "PodInitializing");
}

#[test]
fn failing_probes_make_the_pod_unready_and_restart_it_then_it_recovers() {
    let env = env();
    let y = format!(
        "{}    readinessProbe:\n      exec:\n        command: [\"test\", \"-e\", \"/tmp/ready\"]\n      periodSeconds: 1\n      failureThreshold: 1\n    livenessProbe:\n      httpGet:\n        path: /index.html\n        port: 80\n      periodSeconds: 1\n      failureThreshold: 2\n  - name: tcp\n    image: weft.local/busybox:1\n    command: [\"sh\", \"-c\", \"sleep 2; httpd -f -p 8080 -h /var/www\"]\n    readinessProbe:\n      tcpSocket:\n        port: 8080\n      periodSeconds: 1\n",
        pod_yaml("probed", "Always", &container("web", "httpd -f -p 80 -h /var/www"))
    );
    env.apply(&y);
    let p = env.wait_pod("probed", T, "running, tcp ready, web not ready", |p| {
        phase(p) == "Running" && cstatus(p, "tcp")["ready"] == true && cstatus(p, "web")["ready"] == false
    });
    assert_eq!(condition(&p, "Ready"), "False");
    let id = cstatus(&p, "web")["containerID"].as_str().unwrap().to_string();
    env.exec(&id, &["touch", "/tmp/ready"]).unwrap();
    env.wait_pod("probed", T, "Ready after the readiness file appears", |p| condition(p, "Ready") == "True");
    env.exec(&id, &["rm", "/tmp/ready"]).unwrap();
    env.wait_pod("probed", T, "not Ready after it goes", |p| condition(p, "Ready") == "False");
    // Liveness: the page disappears → the container is restarted (a fresh one serves it again).
    env.exec(&id, &["rm", "/var/www/index.html"]).unwrap();
    let p = env.wait_pod("probed", T, "web restarted by its liveness probe", |p| {
        restarts(p, "web") >= 1 && cstatus(p, "web")["state"]["running"].is_object()
    });
    assert_ne!(cstatus(&p, "web")["containerID"].as_str().unwrap(), id);
}

#[test]
fn env_downward_api_and_service_variables_inside_the_container() {
    let env = env();
    env.apply(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: redis-master\n  namespace: default\nspec:\n  clusterIP: 10.96.0.11\n  ports:\n  - port: 6379\n    protocol: TCP\n",
    );
    let y = format!(
        "{}    env:\n    - name: GREETING\n      value: hello\n    - name: POD_NAME\n      valueFrom:\n        fieldRef:\n          fieldPath: metadata.name\n    - name: POD_NAMESPACE\n      valueFrom:\n        fieldRef:\n          fieldPath: metadata.namespace\n    - name: POD_IP\n      valueFrom:\n        fieldRef:\n          fieldPath: status.podIP\n    - name: NODE_NAME\n      valueFrom:\n        fieldRef:\n          fieldPath: spec.nodeName\n    - name: HOST_IP\n      valueFrom:\n        fieldRef:\n          fieldPath: status.hostIP\n",
        pod_yaml("envy", "Always", &container("c", "sleep 1000"))
    );
    env.apply(&y);
    let p = env.wait_pod("envy", T, "Running", |p| phase(p) == "Running");
    let id = cstatus(&p, "c")["containerID"].as_str().unwrap().to_string();
    let out = env.exec(&id, &["env"]).unwrap();
    let ip = p["status"]["podIP"].as_str().unwrap();
    for want in [
        "GREETING=hello".to_string(),
        "POD_NAME=envy".into(),
        "POD_NAMESPACE=default".into(),
        format!("POD_IP={ip}"),
        format!("NODE_NAME={NODE}"),
        "HOST_IP=10.88.0.1".into(),
        "REDIS_MASTER_SERVICE_HOST=10.96.0.11".into(),
        "REDIS_MASTER_SERVICE_PORT=6379".into(),
        "REDIS_MASTER_PORT=tcp://10.96.0.11:6379".into(),
        "REDIS_MASTER_PORT_6379_TCP=tcp://10.96.0.11:6379".into(),
        "REDIS_MASTER_PORT_6379_TCP_PROTO=tcp".into(),
        "REDIS_MASTER_PORT_6379_TCP_PORT=6379".into(),
        "REDIS_MASTER_PORT_6379_TCP_ADDR=10.96.0.11".into(),
    ] {
        assert!(out.lines().any(|l| l == want), "{want} missing from:\n{out}");
    }
    let resolv = env.exec(&id, &["cat", "/etc/resolv.conf"]).unwrap();
    assert!(resolv.contains("nameserver 10.96.0.10"), "{resolv}");
    assert!(
        resolv.contains("search default.svc.cluster.local svc.cluster.local cluster.local example.test"),
        "{resolv}"
    );
    assert!(resolv.contains("ndots:5"), "{resolv}");
}

#[test]
fn a_killed_container_is_recreated_and_a_deleted_pod_stopped() {
    let env = env();
    env.apply(&pod_yaml("victim", "Always", &container("c", "sleep 1000")));
    let p = env.wait_pod("victim", T, "Running", |p| phase(p) == "Running");
    let id = cstatus(&p, "c")["containerID"].as_str().unwrap().to_string();
    env.kill_task(&id).unwrap();
    let p = env.wait_pod("victim", T, "a new container after the kill", |p| {
        restarts(p, "c") >= 1 && cstatus(p, "c")["state"]["running"].is_object()
    });
    assert_eq!(cstatus(&p, "c")["lastState"]["terminated"]["exitCode"], 137);
    // The sandbox killed by hand: a new one (new address possible), the container started again in it.
    let uid = p["metadata"]["uid"].as_str().unwrap().to_string();
    let sandbox = env.sandbox_of(&uid).expect("the pod's sandbox");
    env.kill_task(&sandbox).unwrap();
    let p = env.wait_pod("victim", T, "running again in a new sandbox", |p| {
        restarts(p, "c") >= 2 && cstatus(p, "c")["state"]["running"].is_object() && condition(p, "Ready") == "True"
    });
    assert_ne!(env.sandbox_of(&uid).as_deref(), Some(sandbox.as_str()));
    let id2 = cstatus(&p, "c")["containerID"].as_str().unwrap().to_string();
    // Deleted from the store outright: its containers are stopped and removed.
    env.weft(&["delete", "pod", "victim"], None).unwrap();
    let deadline = Instant::now() + T;
    while env.container_exists(&id2) {
        assert!(Instant::now() < deadline, "container {id2} still there after the pod was deleted");
        std::thread::sleep(Duration::from_millis(200));
    }
    // Graceful deletion (deletionTimestamp set): the kubelet stops it, then deletes the object.
    env.apply(&pod_yaml("graceful", "Always", &container("c", "sleep 1000")));
    let p = env.wait_pod("graceful", T, "Running", |p| phase(p) == "Running");
    let id3 = cstatus(&p, "c")["containerID"].as_str().unwrap().to_string();
    let mut v = p.clone();
    v["metadata"]["deletionTimestamp"] = Value::String(weft_lab::kube_time(std::time::SystemTime::now(), false));
    v["metadata"]["deletionGracePeriodSeconds"] = Value::from(1);
    env.put_key("/registry/pods/default/graceful", &v);
    let deadline = Instant::now() + T;
    while env.pod("graceful").is_some() || env.container_exists(&id3) {
        assert!(Instant::now() < deadline, "graceful pod not terminated and deleted");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn missing_image_and_bad_command_get_kubernetes_reasons() {
    let env = env();
    env.apply(&pod_yaml("noimage", "Always", "  - name: c\n    image: weft.local/nothere:1\n"));
    env.apply(&pod_yaml(
        "badcmd",
        "Always",
        "  - name: c\n    image: weft.local/busybox:1\n    command: [\"/no/such/binary\"]\n",
    ));
    env.apply(&format!(
        "{}    readinessProbe:\n      tcpSocket:\n        port: nope\n      periodSeconds: 1\n",
        pod_yaml("badport", "Always", &container("c", "sleep 1000"))
    ));
    let mut reasons = std::collections::BTreeSet::new();
    env.wait_pod("noimage", T, "ErrImagePull then ImagePullBackOff", |p| {
        if let Some(r) = cstatus(p, "c")["state"]["waiting"]["reason"].as_str() {
            reasons.insert(r.to_string());
        }
        reasons.contains("ErrImagePull") && reasons.contains("ImagePullBackOff")
    });
    let p = env.wait_pod("badcmd", T, "StartError and a crash loop", |p| {
        let c = cstatus(p, "c");
        let term = if c["state"]["terminated"].is_object() {
            &c["state"]["terminated"]
        } else {
            &c["lastState"]["terminated"]
        };
        term["reason"] == "StartError" && restarts(p, "c") >= 1
    });
    assert_eq!(phase(&p), "Running", "restartPolicy Always keeps it Running (restarting)");
    // A probe naming a port the container does not have fails (never Ready); nothing crashes.
    let p = env.wait_pod("badport", T, "Running", |p| phase(p) == "Running");
    assert_eq!(condition(&p, "Ready"), "False");
    assert!(env.kubelet_alive(), "the kubelet survives pods it cannot run");
}

#[test]
fn a_restarted_kubelet_adopts_running_containers() {
    let env = env_alone();
    let y = format!(
        "{}    readinessProbe:\n      exec:\n        command: [\"true\"]\n      periodSeconds: 1\n",
        pod_yaml("steady", "Always", &container("c", "sleep 1000"))
    );
    env.apply(&y);
    let p =
        env.wait_pod("steady", T, "Running and Ready", |p| phase(p) == "Running" && condition(p, "Ready") == "True");
    let id = cstatus(&p, "c")["containerID"].as_str().unwrap().to_string();
    let sandbox_ip = p["status"]["podIP"].as_str().unwrap().to_string();
    env.kill_kubelet();
    let before = env.get_key(&format!("/registry/leases/kube-node-lease/{NODE}")).unwrap()["spec"]["renewTime"].clone();
    env.start_kubelet().unwrap();
    // The new kubelet is at work once it renews the lease; then give it several sync passes.
    let deadline = Instant::now() + T;
    let mut renewals = 0;
    let mut last = before;
    while renewals < 3 {
        assert!(Instant::now() < deadline, "the restarted kubelet does not renew its lease");
        let now =
            env.get_key(&format!("/registry/leases/kube-node-lease/{NODE}")).unwrap()["spec"]["renewTime"].clone();
        if now != last {
            renewals += 1;
            last = now;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let p = env.pod("steady").unwrap();
    let log = std::fs::read_to_string(env.kubelet_log()).unwrap_or_default();
    let kills: Vec<&str> = log.lines().filter(|l| l.contains("kill") || l.contains("sandbox")).collect();
    assert_eq!(
        cstatus(&p, "c")["containerID"].as_str().unwrap(),
        id,
        "same container; kubelet log:\n{}",
        kills.join("\n")
    );
    assert_eq!(restarts(&p, "c"), 0);
    assert_eq!(p["status"]["podIP"].as_str().unwrap(), sandbox_ip);
    assert_eq!((phase(&p), condition(&p, "Ready")), ("Running", "True".to_string()));
    assert!(env.container_exists(&id));
}

#[test]
fn logs_and_exec_go_through_the_kubelet_server_with_client_certificates() {
    let env = env();
    env.apply(&pod_yaml(
        "talker",
        "Always",
        &container("c", "echo one; echo two; echo three; i=0; while true; do echo tick$i; i=$((i+1)); sleep 0.2; done"),
    ));
    env.wait_pod("talker", T, "Running", |p| phase(p) == "Running");
    // Logs, once the first lines are written.
    let deadline = Instant::now() + T;
    let logs = loop {
        let out = env.weft_cmd(&["logs", "talker"]).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        if text.contains("tick1") {
            break text;
        }
        assert!(Instant::now() < deadline, "weft logs: {out:?}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(logs.starts_with("one\ntwo\nthree\n"), "{logs}");
    let out = env.weft_cmd(&["logs", "talker", "-c", "c", "--tail", "1"]).output().unwrap();
    let last = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(last.lines().count(), 1, "{last}");
    assert!(last.starts_with("tick"), "{last}");
    // Follow: new lines keep coming.
    let mut follow =
        env.weft_cmd(&["logs", "-f", "talker"]).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    let mut stdout = follow.stdout.take().unwrap();
    let seen = std::thread::spawn(move || {
        use std::io::Read;
        let mut all = String::new();
        let mut buf = [0u8; 4096];
        let start = Instant::now();
        while start.elapsed() < T {
            let n = stdout.read(&mut buf).unwrap_or(0);
            if n == 0 {
                break;
            }
            all.push_str(&String::from_utf8_lossy(&buf[..n]));
            let ticks = all.lines().filter(|l| l.starts_with("tick")).count();
            if ticks >= 2 && all.lines().last().is_some_and(|l| l.starts_with("tick")) {
                // Lines beyond what a one-shot read had: the stream follows.
                if all.contains(&format!("tick{}", ticks + 5)) || ticks > 30 {
                    return true;
                }
            }
        }
        false
    });
    let followed = seen.join().unwrap();
    let _ = follow.kill();
    let _ = follow.wait();
    assert!(followed, "weft logs -f did not stream new lines");
    // Exec: output and exit code.
    let out =
        env.weft_cmd(&["exec", "talker", "--", "sh", "-c", "echo from inside $HOSTNAME; exit 3"]).output().unwrap();
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "from inside talker");
    // The port refuses clients without a certificate, and with one from another CA.
    let url = "https://10.88.0.1:10250/healthz";
    let curl = |extra: &[&str]| {
        env.fx
            .net_command("curl")
            .args(["-sS", "--max-time", "5", "--cacert"])
            .arg(env.pki("ca.crt"))
            .args(extra)
            .arg(url)
            .output()
            .unwrap()
    };
    let ok = curl(&["--cert", env.pki("admin.crt").to_str().unwrap(), "--key", env.pki("admin.key").to_str().unwrap()]);
    assert_eq!(String::from_utf8_lossy(&ok.stdout).trim(), "ok", "{ok:?}");
    assert!(!curl(&[]).status.success(), "served a client without a certificate");
    let rogue =
        curl(&["--cert", env.pki("rogue.crt").to_str().unwrap(), "--key", env.pki("rogue.key").to_str().unwrap()]);
    assert!(
        !rogue.status.success() || !String::from_utf8_lossy(&rogue.stdout).contains("ok"),
        "served a client of another CA"
    );
}

#[test]
fn a_host_network_pod_runs_on_the_node_network() {
    let env = env();
    let y = pod_yaml("hostnet", "Always", &container("c", "sleep 1000"))
        .replace("  restartPolicy:", "  hostNetwork: true\n  restartPolicy:");
    env.apply(&y);
    let p = env.wait_pod("hostnet", T, "Running", |p| phase(p) == "Running");
    assert_eq!(p["status"]["podIP"], "10.88.0.1", "the node's address: {p}");
    let id = cstatus(&p, "c")["containerID"].as_str().unwrap().to_string();
    // The node's interfaces (its CNI bridge among them) are the container's.
    let dev = env.exec(&id, &["cat", "/proc/net/dev"]).unwrap();
    assert!(dev.contains("cni0"), "{dev}");
}

/// Runs `cmd` (stdin from `input`, then closed), killing it if it has not ended within `limit`.
fn output_within(mut cmd: Command, input: &[u8], limit: Duration) -> std::process::Output {
    use std::io::Write;
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let pid = child.id() as i32;
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            // SAFETY: signalling the child this test spawned, by its pid.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("{cmd:?} did not end within {limit:?}");
        }
    }
}

/// A shell line quoted for `sh -c` (single quotes).
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[test]
fn exec_with_stdin_and_a_tty_streams_through_the_kubelet_and_passes_the_exit_code() {
    let env = env();
    env.apply(&pod_yaml("shell", "Always", &container("c", "exec sleep 3600")));
    env.wait_pod("shell", T, "Running", |p| phase(p) == "Running");
    let limit = Duration::from_secs(60);
    // -i: piped stdin reaches the command, stdout and stderr stay apart, the exit code is the command's.
    let out = output_within(
        env.weft_cmd(&["exec", "-i", "shell", "--", "sh", "-c", "read x; echo got $x; echo on-stderr >&2; exit 7"]),
        b"hello\n",
        limit,
    );
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "got hello\n", "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "on-stderr\n", "{out:?}");
    // Success is exit code 0; a command that cannot start is an error, not a hang.
    let out = output_within(env.weft_cmd(&["exec", "-i", "shell", "--", "true"]), b"", limit);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let out = output_within(env.weft_cmd(&["exec", "-i", "shell", "--", "/no/such/program"]), b"", limit);
    assert!(!out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("no/such/program"), "{out:?}");
    // -it with stdin from a pipe: as kubectl, a warning and no terminal (a terminal would echo the input back).
    let out = output_within(
        env.weft_cmd(&["exec", "-it", "shell", "--", "sh", "-c", "read x; tty; echo got $x"]),
        b"piped\n",
        limit,
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("Unable to use a TTY"), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "not a tty\ngot piped\n", "{out:?}");
    // -t alone: the command has a terminal (under `script`, which gives weft one too).
    let weft = weft_lab::weft_bin();
    let weft = sh_quote(&weft.to_string_lossy());
    // `script` gives weft a terminal of its own (a pty) and runs `line` through sh in the namespace.
    let script = |line: String| {
        let mut c = env.client_env(env.fx.net_command("script"));
        c.args(["-qec", &line, "/dev/null"]);
        c
    };
    let out = output_within(
        script(format!("{weft} exec -t shell -- sh -c 'tty; [ -t 0 ] && [ -t 1 ] && echo both-terminals; exit 4'")),
        b"",
        limit,
    );
    let text = String::from_utf8_lossy(&out.stdout).replace('\r', "");
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    assert!(text.lines().any(|l| l.starts_with("/dev/pts/")), "{text}\n{out:?}");
    assert!(text.contains("both-terminals"), "{text}");
    // -it: typed input reaches the command through its terminal, the window size is passed at start, and the
    // local terminal is the same after as before (raw mode undone).
    // The size follows the start by a moment (containerd starts the command as the kubelet connects, then
    // applies resizes), as with kubectl: poll for it inside the container.
    let size = concat!(
        "i=0; while [ $i -lt 50 ]; do s=$(stty size 2>/dev/null); ",
        "case \"$s\" in \"\"|\"0 0\") ;; *) break;; esac; i=$((i+1)); sleep 0.1; done"
    );
    let remote = format!("{size}; echo size=$s; read x; echo got-$x; exit 3");
    let line = format!(
        "stty cols 123 rows 45; before=$(stty -g); {weft} exec -it shell -- sh -c {}; rc=$?; \
         [ \"$(stty -g)\" = \"$before\" ] && echo terminal-restored; exit $rc",
        sh_quote(&remote)
    );
    let out = output_within(script(line), b"typed-line\r", limit);
    let text = String::from_utf8_lossy(&out.stdout).replace('\r', "");
    assert_eq!(out.status.code(), Some(3), "{out:?}\n{text}");
    assert!(text.contains("size=45 123"), "{text}");
    assert!(text.contains("got-typed-line"), "{text}");
    assert!(text.contains("terminal-restored"), "{text}");
    // A resize while it runs (the terminal's size set from another process of the session, which signals weft
    // SIGWINCH) reaches the container: only once the command has seen the first size, so that the new one can
    // only have come through the resize.
    let remote = format!(
        "{size}; echo size=$s; i=0; while [ $i -lt 100 ]; do s=$(stty size); [ \"$s\" = \"22 77\" ] && break; \
         i=$((i+1)); sleep 0.1; done; echo now=$s"
    );
    let line = format!(
        "stty cols 123 rows 45; out=$(mktemp); \
         (i=0; while [ $i -lt 300 ] && ! grep -q 'size=45 123' $out; do i=$((i+1)); sleep 0.1; done; \
          stty cols 77 rows 22 </dev/tty) & \
         {weft} exec -it shell -- sh -c {} | tee $out; wait; rm -f $out",
        sh_quote(&remote)
    );
    let out = output_within(script(line), b"", limit);
    let text = String::from_utf8_lossy(&out.stdout).replace('\r', "");
    assert!(text.contains("size=45 123") && text.contains("now=22 77"), "{text}\n{out:?}");
    // The streaming endpoint checks client certificates like the rest of the port: one from another CA runs
    // nothing.
    let mut rogue = env.weft_cmd(&["exec", "-i", "shell", "--", "touch", "/tmp/rogue-ran"]);
    rogue.env("WEFT_KUBELET_CLIENT_CERT", env.pki("rogue.crt")).env("WEFT_KUBELET_CLIENT_KEY", env.pki("rogue.key"));
    let out = output_within(rogue, b"", limit);
    assert!(!out.status.success(), "served a client of another CA: {out:?}");
    let out = env.weft_cmd(&["exec", "shell", "--", "test", "-e", "/tmp/rogue-ran"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "the rogue client's command ran: {out:?}");
}
