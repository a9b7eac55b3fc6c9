//! The service conformance table in eBPF mode (issue 12): a 2-node lab with real etcd, agents and
//! `weft proxy --proxy-mode ebpf` processes; each node's pods run their clients inside that node's own
//! cgroup v2 subtree (never the root cgroup), where the proxy attached its programs; pins live in a
//! private bpffs; NodePort and externalIPs from the fabric go through the tc programs on each node's eth0.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use weft_lab::bpf::{Bpffs, Cgroup};
use weft_lab::lab::{endpoints_yaml, service_yaml as service, until};
use weft_lab::lab::{Lab, LabOptions, Pod};

struct Env {
    lab: Lab,
    client: Pod,
    servers: BTreeMap<String, Pod>,
    /// Node i's pods' cgroup at index i-1.
    cgroups: Vec<Cgroup>,
    bpffs: Bpffs,
}

fn apply(env: &Env, yaml: &str) -> Result<()> {
    env.lab.weft(&["apply", "-f", "-"], Some(yaml)).map(|_| ())
}

/// An Endpoints object naming some of the servers (port `http` 9376/TCP, `dns` 9377/UDP, `echo` 7000).
fn endpoints(env: &Env, name: &str, servers: &[&str], port_name: &str, port: u16, proto: &str) -> String {
    let pods: Vec<&Pod> = servers.iter().map(|s| &env.servers[*s]).collect();
    endpoints_yaml(name, &pods, port_name, port, proto)
}

impl Env {
    fn proxy_args(&self, node: usize) -> Vec<String> {
        vec![
            "--min-sync-period".into(),
            "100ms".into(),
            "--cgroup-path".into(),
            self.cgroups[node - 1].path().display().to_string(),
            "--bpf-pin-dir".into(),
            self.pin_base().display().to_string(),
            "--nodeport-interface".into(),
            "eth0".into(),
        ]
    }

    /// What answers `addr` from the fabric (an outside host: no cgroup, no socket LB), `n` times.
    fn spread_outside(&self, addr: &str, n: usize) -> Result<BTreeMap<String, usize>> {
        let mut seen = BTreeMap::new();
        for _ in 0..n {
            let got = self.lab.fabric().exec("socat", &["-T", "10", "-", &format!("TCP:{addr},connect-timeout=5")])?;
            *seen.entry(got.trim().to_string()).or_insert(0) += 1;
        }
        Ok(seen)
    }

    fn pin_base(&self) -> PathBuf {
        self.bpffs.path().join("weft")
    }

    /// `sh -c script` in a pod, inside its node's cgroup; stdout, or an error with stderr.
    fn in_pod(&self, pod: &Pod, script: &str) -> Result<String> {
        let mut cmd = pod.ns().command("sh");
        cmd.args(["-c", script]).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        self.cgroups[pod.node() - 1].enter(&mut cmd)?;
        let out = cmd.output()?;
        ensure!(out.status.success(), "{script}: {}", String::from_utf8_lossy(&out.stderr).trim());
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    fn fetch(&self, pod: &Pod, addr: &str) -> Result<String> {
        self.in_pod(pod, &format!("socat -T 10 - TCP:{addr},connect-timeout=5"))
    }

    /// `n` connections from the client pod; how many each server answered.
    fn spread(&self, addr: &str, n: usize) -> Result<BTreeMap<String, usize>> {
        let out = self.in_pod(&self.client, &format!("for i in $(seq {n}); do socat -T 10 - TCP:{addr}; done"))?;
        let mut seen = BTreeMap::new();
        for l in out.lines() {
            *seen.entry(l.trim().to_string()).or_insert(0) += 1;
        }
        Ok(seen)
    }
}

/// weft's tcx programs on a node's eth0 (queried inside the node's namespace).
fn tc_programs(env: &Env, node: usize) -> Result<Vec<String>> {
    let path = env.lab.node(node).ns().path();
    std::thread::spawn(move || -> Result<Vec<String>> {
        weft_lab::netns::enter(&path)?;
        Ok(weft_ebpf::loader::tcx_programs("eth0")?.into_iter().filter(|n| n.starts_with("weft_")).collect())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("thread panicked"))?
}

/// Programs attached to a cgroup, as `bpftool cgroup show` lists them.
fn attached(cgroup: &Cgroup) -> Result<usize> {
    let out = Command::new("bpftool").args(["cgroup", "show"]).arg(cgroup.path()).output()?;
    ensure!(out.status.success(), "bpftool cgroup show: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).lines().skip(1).filter(|l| !l.trim().is_empty()).count())
}

/// Kernel assumptions of eBPF mode: tcx links for the NodePort tc programs (Linux 6.6); the cgroup sock_addr
/// hooks (connect4/sendmsg4/recvmsg4: 4.17–5.2, getpeername4 and bpf_get_netns_cookie there: 5.8) are older.
const EBPF_KERNEL: (u32, u32, &str) = (6, 6, "tcx links (the NodePort tc programs)");

fn setup() -> Result<Env> {
    weft_lab::require_kernel(EBPF_KERNEL.0, EBPF_KERNEL.1, EBPF_KERNEL.2);
    let lab = Lab::up(LabOptions { nodes: 2, ..LabOptions::default() }, &mut |_| {})?;
    let (client, servers) = lab.add_service_table_pods()?;
    let cgroups = vec![Cgroup::create("node-1-pods")?, Cgroup::create("node-2-pods")?];
    let env = Env { lab, client, servers, cgroups, bpffs: Bpffs::mount()? };
    let mut yaml = String::new();
    yaml += &service("web", "  clusterIP: 10.96.100.1\n", "http", 80, 9376, "TCP");
    yaml += &endpoints(&env, "web", &["s2", "s3"], "http", 9376, "TCP");
    yaml += &service("local", "  clusterIP: 10.96.100.2\n", "http", 80, 9376, "TCP");
    yaml += &endpoints(&env, "local", &["s1"], "http", 9376, "TCP");
    yaml += &service("spread", "  clusterIP: 10.96.100.5\n", "http", 80, 9376, "TCP");
    yaml += &endpoints(&env, "spread", &["s1", "s2", "s3"], "http", 9376, "TCP");
    yaml += &service("sticky", "  clusterIP: 10.96.100.6\n  sessionAffinity: ClientIP\n", "http", 80, 9376, "TCP");
    yaml += &endpoints(&env, "sticky", &["s1", "s2", "s3"], "http", 9376, "TCP");
    yaml += &service("dns", "  clusterIP: 10.96.100.7\n", "dns", 53, 9377, "UDP");
    yaml += &endpoints(&env, "dns", &["s2", "s3"], "dns", 9377, "UDP");
    yaml += &service("shrink", "  clusterIP: 10.96.100.8\n", "http", 80, 9376, "TCP");
    yaml += &endpoints(&env, "shrink", &["s1", "s2"], "http", 9376, "TCP");
    yaml += &service("empty", "  clusterIP: 10.96.100.9\n", "http", 80, 9376, "TCP");
    yaml += &endpoints(&env, "empty", &[], "http", 9376, "TCP");
    yaml += &service("my-service", "  clusterIP: 10.96.100.10\n", "http", 80, 9376, "TCP");
    yaml += &endpoints(&env, "my-service", &["s3"], "http", 9376, "TCP");
    yaml += &service("headless", "  clusterIP: None\n  selector: {app: h}\n", "http", 80, 9376, "TCP");
    yaml += &endpoints(&env, "headless", &["s1"], "http", 9376, "TCP");
    yaml += &service("hairpin", "  clusterIP: 10.96.100.12\n", "http", 80, 9376, "TCP");
    yaml += &endpoints(&env, "hairpin", &["s1"], "http", 9376, "TCP");
    yaml += &service("long", "  clusterIP: 10.96.100.11\n", "echo", 7000, 7000, "TCP");
    yaml += &endpoints(&env, "long", &["s2"], "echo", 7000, "TCP");
    yaml += "apiVersion: v1\nkind: Service\nmetadata: {name: np}\nspec:\n  type: NodePort\n  clusterIP: 10.96.100.3\n  ports: [{name: http, port: 80, targetPort: 9376, nodePort: 30080}]\n---\n";
    yaml += &endpoints(&env, "np", &["s1", "s2", "s3"], "http", 9376, "TCP");
    yaml += "apiVersion: v1\nkind: Service\nmetadata: {name: np-local}\nspec:\n  type: NodePort\n  clusterIP: 10.96.100.13\n  externalTrafficPolicy: Local\n  ports: [{name: http, port: 80, targetPort: 9376, nodePort: 30081}]\n---\n";
    yaml += &endpoints(&env, "np-local", &["s1", "s2", "s3"], "http", 9376, "TCP");
    yaml += &service("ext", "  clusterIP: 10.96.100.4\n  externalIPs: [203.0.113.10]\n", "http", 80, 9376, "TCP");
    yaml += &endpoints(&env, "ext", &["s2"], "http", 9376, "TCP");
    // A route for the externalIP through node-1, from the outside host (the fabric) only.
    env.lab.fabric().ip(&["route", "add", "203.0.113.10/32", "via", "192.168.56.11"])?;
    apply(&env, &yaml)?;
    let mut env = env;
    for i in 1..=2 {
        let args = env.proxy_args(i);
        env.lab.start_proxy(i, "ebpf", &args)?;
    }
    until("the proxy on node-1 serves the first service", 30, || env.fetch(&env.client, "10.96.100.1:80"))?;
    Ok(env)
}

type Scenario = fn(&mut Env) -> Result<()>;

const SCENARIOS: &[(&str, Scenario)] = &[
    ("NodePort from an outside host, on each node, to local and remote backends", |env| {
        until("node port 30080 on node-1", 10, || env.spread_outside("192.168.56.11:30080", 1))?;
        let seen = env.spread_outside("192.168.56.11:30080", 40)?;
        ensure!(seen.contains_key("s1"), "node-1's local backend: {seen:?}");
        ensure!(seen.contains_key("s2") || seen.contains_key("s3"), "a remote backend (SNAT): {seen:?}");
        ensure!(seen.keys().all(|k| ["s1", "s2", "s3"].contains(&k.as_str())), "{seen:?}");
        let seen = until("node port 30080 on node-2", 10, || env.spread_outside("192.168.56.12:30080", 10))?;
        ensure!(seen.keys().all(|k| ["s1", "s2", "s3"].contains(&k.as_str())), "{seen:?}");
        Ok(())
    }),
    ("externalTrafficPolicy Local: only the node's own backends", |env| {
        let seen = until("node port 30081", 10, || env.spread_outside("192.168.56.11:30081", 20))?;
        ensure!(seen.keys().collect::<Vec<_>>() == ["s1"], "{seen:?}");
        Ok(())
    }),
    ("externalIPs from an outside host", |env| {
        let seen = until("externalIP", 10, || env.spread_outside("203.0.113.10:80", 5))?;
        ensure!(seen.keys().collect::<Vec<_>>() == ["s2"], "{seen:?}");
        Ok(())
    }),
    ("pod to ClusterIP across nodes", |env| {
        let got = env.fetch(&env.client, "10.96.100.1:80")?;
        ensure!(got == "s2" || got == "s3", "answered by {got:?}");
        Ok(())
    }),
    ("pod to a backend on its own node", |env| {
        ensure!(env.fetch(&env.client, "10.96.100.2:80")? == "s1");
        Ok(())
    }),
    ("a pod reaches itself through its own service (hairpin)", |env| {
        ensure!(env.fetch(&env.servers["s1"], "10.96.100.12:80")? == "s1");
        Ok(())
    }),
    ("load spread over 300 connections", |env| {
        let seen = env.spread("10.96.100.5:80", 300)?;
        ensure!(seen.len() == 3, "every endpoint used: {seen:?}");
        ensure!(seen.values().all(|n| *n <= 2 * 300 / 3), "none over twice its share: {seen:?}");
        ensure!(seen.values().sum::<usize>() == 300, "every connection answered: {seen:?}");
        Ok(())
    }),
    ("ClientIP affinity", |env| {
        let seen = env.spread("10.96.100.6:80", 30)?;
        ensure!(seen.len() == 1, "one client, one endpoint: {seen:?}");
        Ok(())
    }),
    ("UDP (unconnected sendto, reply from the VIP)", |env| {
        let got =
            until("UDP answer", 10, || env.in_pod(&env.client, "echo who | socat -T 2 - UDP-SENDTO:10.96.100.7:53"))?;
        ensure!(got == "s2" || got == "s3", "{got:?}");
        Ok(())
    }),
    ("a removed endpoint gets no new connections once the proxy has synced", |env| {
        let before = env.spread("10.96.100.8:80", 40)?;
        ensure!(before.contains_key("s2"), "s2 served before: {before:?}");
        apply(env, &endpoints(env, "shrink", &["s1"], "http", 9376, "TCP"))?;
        // Polled until the proxy's sync took s2 out, then 100 connections in a row must all avoid it.
        let after = until("s2 out of the rotation", 20, || {
            let after = env.spread("10.96.100.8:80", 100)?;
            ensure!(!after.contains_key("s2"), "s2 still served after its removal: {after:?}");
            Ok(after)
        })?;
        ensure!(after.contains_key("s1"), "s1 serves: {after:?}");
        Ok(())
    }),
    ("no endpoints: refused at once", |env| {
        let started = Instant::now();
        let err = env.fetch(&env.client, "10.96.100.9:80").expect_err("no endpoint, no connection");
        let took = started.elapsed();
        ensure!(format!("{err:#}").contains("Connection refused"), "{err:#}");
        ensure!(took < Duration::from_secs(2), "refused, but only after {took:?}");
        Ok(())
    }),
    ("a service without selector uses hand-written Endpoints", |env| {
        ensure!(env.fetch(&env.client, "10.96.100.10:80")? == "s3");
        Ok(())
    }),
    ("bad input is skipped and every valid service still served", |env| {
        env.lab.write_bad_service_input(env.servers["s1"].ip())?;
        until("a warning naming the bad key and address", 10, || env.lab.proxy_warned_of_bad_input(1))?;
        ensure!(env.fetch(&env.client, "10.96.100.2:80")? == "s1", "other services unaffected");
        ensure!(env.fetch(&env.client, "10.96.100.10:80")? == "s3", "other services unaffected");
        env.lab.delete_bad_service_input()
    }),
    ("weft services shows the map entries; a headless service gets none", |env| {
        let out = env.lab.node(1).ns().command(weft_lab::weft_bin()).args(["services", "-o", "json"]).output()?;
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).context("weft services -o json")?;
        ensure!(status["mode"] == "ebpf", "{status}");
        let services = status["services"].as_array().cloned().unwrap_or_default();
        ensure!(!services.iter().any(|s| s["name"].as_str().unwrap_or("").starts_with("default/headless")));
        let web = services.iter().find(|s| s["name"] == "default/web:http").context("web listed")?;
        let programmed = web["programmed"].as_str().unwrap_or("");
        ensure!(programmed.starts_with("10.96.100.1:80/tcp id=") && programmed.contains("count=2"), "{programmed}");
        // The pinned maps read the same with the operator's tool.
        let dump = Command::new("bpftool")
            .args(["map", "dump", "pinned"])
            .arg(env.pin_base().join("node-1/weft_lb_svc"))
            .output()?;
        ensure!(dump.status.success(), "bpftool map dump: {}", String::from_utf8_lossy(&dump.stderr));
        let text = String::from_utf8_lossy(&dump.stdout);
        ensure!(text.contains("\"count\": 2"), "{text}");
        Ok(())
    }),
    ("metrics and healthz", |env| {
        let ns = env.lab.node(1).ns();
        let metrics = ns.exec("curl", &["-sf", "http://127.0.0.1:10249/metrics"])?;
        let value =
            |name: &str| -> Option<f64> { metrics.lines().find_map(|l| l.strip_prefix(name)?.trim().parse().ok()) };
        ensure!(value("weft_proxy_sync_proxy_rules_duration_seconds_count ").is_some_and(|n| n >= 1.0), "{metrics}");
        ensure!(value("weft_proxy_service_ports ").is_some_and(|n| n >= 10.0), "{metrics}");
        ensure!(value("weft_proxy_bpf_map_full_total ") == Some(0.0), "{metrics}");
        ensure!(metrics.contains("weft_proxy_info{mode=\"ebpf\"} 1"), "{metrics}");
        ensure!(ns.exec("curl", &["-sf", "http://127.0.0.1:10256/healthz"])?.trim() == "ok");
        Ok(())
    }),
    ("proxy restart: established connections survive, new ones work while it is down", |env| {
        let mut cmd = env.client.ns().command("socat");
        cmd.args(["-", "TCP:10.96.100.11:7000"]).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::null());
        env.cgroups[0].enter(&mut cmd)?;
        let mut conn = Conn(cmd.spawn()?);
        let mut lines = BufReader::new(conn.0.stdout.take().context("stdout")?).lines();
        let mut stdin = conn.0.stdin.take().context("stdin")?;
        let mut echo = |msg: &str| -> Result<String> {
            writeln!(stdin, "{msg}")?;
            stdin.flush()?;
            Ok(lines.next().context("connection closed")??)
        };
        ensure!(echo("before")? == "before");
        env.lab.stop_proxy(1)?;
        ensure!(env.fetch(&env.client, "10.96.100.2:80")? == "s1", "new connections while the proxy is down");
        let args = env.proxy_args(1);
        env.lab.start_proxy(1, "ebpf", &args)?;
        until("the restarted proxy is healthy", 20, || {
            env.lab.node(1).ns().exec("curl", &["-sf", "http://127.0.0.1:10256/healthz"]).map(|_| ())
        })?;
        ensure!(echo("after")? == "after", "the connection did not survive");
        ensure!(attached(&env.cgroups[0])? == 4, "one program per hook after the restart");
        let tc = tc_programs(env, 1)?;
        ensure!(tc.len() == 2, "one tc program per direction after the restart: {tc:?}");
        Ok(())
    }),
    ("switching the node to iptables mode leaves no program and no pin", |env| {
        env.lab.stop_proxy(1)?;
        // The same pin directory flag as before, as an operator switching modes keeps their flags.
        let args =
            ["--min-sync-period".into(), "100ms".into(), "--bpf-pin-dir".into(), env.pin_base().display().to_string()];
        env.lab.start_proxy(1, "iptables", &args)?;
        until("the iptables proxy serves the service", 20, || {
            let got = env.fetch(&env.client, "10.96.100.2:80")?;
            ensure!(got == "s1");
            Ok(())
        })?;
        ensure!(!env.pin_base().join("node-1").exists(), "node-1's pins are gone");
        ensure!(env.pin_base().join("node-2").exists(), "node-2's pins are untouched");
        until("node-1's programs detach", 10, || {
            let n = attached(&env.cgroups[0])?;
            ensure!(n == 0, "{n} programs still attached");
            let tc = tc_programs(env, 1)?;
            ensure!(tc.is_empty(), "tc programs still attached: {tc:?}");
            Ok(())
        })?;
        ensure!(tc_programs(env, 2)?.len() == 2, "node-2 keeps its tc programs");
        Ok(())
    }),
];

/// Kills the long-lived client even if a scenario fails half-way.
struct Conn(Child);

impl Drop for Conn {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn ebpf_mode_passes_the_service_table() {
    let mut env = setup().unwrap_or_else(|e| panic!("ebpf: setup: {e:#}"));
    let mut failures = Vec::new();
    for (name, scenario) in SCENARIOS {
        let started = Instant::now();
        match scenario(&mut env) {
            Ok(()) => eprintln!("ebpf: ok   {name} ({:?})", started.elapsed()),
            Err(e) => {
                eprintln!("ebpf: FAIL {name}: {e:#}");
                failures.push(format!("{name}: {e:#}"));
            }
        }
    }
    if !failures.is_empty() {
        let log = std::fs::read_to_string(env.lab.node(1).proxy_log_path()).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        panic!(
            "ebpf mode failed {} of {} scenarios:\n{}\nnode-1 proxy log (last lines, newest first):\n{}",
            failures.len(),
            SCENARIOS.len(),
            failures.join("\n"),
            tail.join("\n")
        );
    }
    // Guard order: the lab (and its proxies) go before the cgroups and the bpffs.
    let Env { lab, client, servers, cgroups, bpffs } = env;
    drop((client, servers));
    drop(lab);
    drop(cgroups);
    drop(bpffs);
}
