//! Hostile input (issue 10): objects written straight into etcd by another client, bypassing `weft apply`'s
//! checks. One lab for the whole table — node-1 runs the iptables proxy, `weft dns` and a server pod; node-2 the
//! userspace proxy; the fabric `weft controller`; both nodes `weft agent`. After each row every daemon keeps
//! serving, a valid Service written afterwards works end to end (through both proxies and the overlay, and by
//! name), and the daemons that read the row's kind name its key in exactly one warning.

use std::net::SocketAddr;
use std::process::{Child, Stdio};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use weft_lab::lab::{fetch, until};
use weft_lab::lab::{Lab, LabOptions, Pod};

/// Writes raw bytes at `key`, as any etcd client can (NULs and all).
fn put(lab: &Lab, key: &str, value: Vec<u8>) -> Result<()> {
    let key = key.to_string();
    lab.etcd(move |mut c| async move {
        c.put(key, value, None).await?;
        Ok(())
    })
}

/// Kills a background daemon even if the test panics.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Who must warn about a row: the daemons that read its kind.
#[derive(Clone, Copy, PartialEq)]
enum Readers {
    /// Services and Endpoints: both proxies, dns and the controller.
    ProxyDns,
    /// Pods: dns and the controller.
    Dns,
    /// Other registry kinds: the controller.
    Controller,
    /// Flannel subnet leases: the agents.
    Agent,
    /// Accepted (unknown fields are ignored on read, as the API machinery ignores them): served, not warned.
    None,
}

struct Row {
    what: &'static str,
    key: String,
    value: Vec<u8>,
    readers: Readers,
}

fn row(what: &'static str, key: &str, value: impl Into<Vec<u8>>, readers: Readers) -> Row {
    Row { what, key: key.to_string(), value: value.into(), readers }
}

fn json(v: serde_json::Value) -> Vec<u8> {
    v.to_string().into_bytes()
}

/// `free` are two lease keys' subnets no node holds (the lab allocates node subnets at random).
fn rows(free: [String; 2]) -> Vec<Row> {
    use serde_json::json as j;
    use Readers::*;
    let svc = |name: &str, spec: serde_json::Value| j!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "default"}, "spec": spec});
    let ports80 = j!([{"name": "http", "port": 80, "protocol": "TCP"}]);
    let big = "a".repeat(64 * 1024);
    let ep = |name: &str, subsets: serde_json::Value| j!({"apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": name, "namespace": "default"}, "subsets": subsets});
    let pod = |name: &str, spec: serde_json::Value| j!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default"}, "spec": spec});
    let s = "/registry/services/default/";
    let e = "/registry/endpoints/default/";
    vec![
        row(
            "wrong types",
            &format!("{s}h-types"),
            json(svc("h-types", j!({"clusterIP": 5, "ports": "eighty"}))),
            ProxyDns,
        ),
        row(
            "a name that is no DNS label",
            &format!("{s}Bad_Name"),
            json(svc("Bad_Name", j!({"clusterIP": "10.96.70.2", "ports": ports80}))),
            ProxyDns,
        ),
        row(
            "a name that is not its key's",
            &format!("{s}h-mismatch"),
            json(svc("other", j!({"clusterIP": "10.96.70.3", "ports": ports80}))),
            ProxyDns,
        ),
        row(
            "a quote, a newline and a NUL in a port name",
            &format!("{s}h-quote"),
            json(svc(
                "h-quote",
                j!({"clusterIP": "10.96.70.4", "ports": [{"name": "a\" -j ACCEPT\n-A INPUT -j DROP #\u{0}", "port": 80}]}),
            )),
            ProxyDns,
        ),
        row(
            "a 64 KiB port name",
            &format!("{s}h-big"),
            json(svc("h-big", j!({"clusterIP": "10.96.70.5", "ports": [{"name": big, "port": 80}]}))),
            ProxyDns,
        ),
        row(
            "duplicate ports",
            &format!("{s}h-dup"),
            json(svc(
                "h-dup",
                j!({"clusterIP": "10.96.70.6", "ports": [{"name": "a", "port": 80}, {"name": "a", "port": 80}]}),
            )),
            ProxyDns,
        ),
        row(
            "an IPv6 clusterIP",
            &format!("{s}h-v6"),
            json(svc("h-v6", j!({"clusterIP": "fd00::1", "ports": ports80}))),
            ProxyDns,
        ),
        row(
            "a bad clusterIP",
            &format!("{s}h-badip"),
            json(svc("h-badip", j!({"clusterIP": "999.1.1.1", "ports": ports80}))),
            ProxyDns,
        ),
        row(
            "no spec",
            &format!("{s}h-nospec"),
            json(j!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "h-nospec", "namespace": "default"}})),
            ProxyDns,
        ),
        row("a JSON array", &format!("{s}h-array"), "[1, 2, 3]", ProxyDns),
        row(
            "truncated JSON",
            &format!("{s}h-trunc"),
            "{\"apiVersion\": \"v1\", \"kind\": \"Service\", \"metadata\": {\"name\": \"h-tr",
            ProxyDns,
        ),
        row("NUL bytes", &format!("{s}h-nul"), b"{\"a\":\0\0}".to_vec(), ProxyDns),
        row(
            "a key with an extra segment",
            &format!("{s}h-extra/x"),
            json(svc("x", j!({"clusterIP": "10.96.70.9", "ports": ports80}))),
            ProxyDns,
        ),
        row(
            "a bad endpoint address",
            &format!("{e}h-ep-bad"),
            json(ep("h-ep-bad", j!([{"addresses": [{"ip": "1.2.3"}], "ports": [{"port": 80}]}]))),
            ProxyDns,
        ),
        row(
            "an endpoint port out of range",
            &format!("{e}h-ep-port"),
            json(ep("h-ep-port", j!([{"addresses": [{"ip": "10.244.1.1"}], "ports": [{"port": 70000}]}]))),
            ProxyDns,
        ),
        row("subsets of the wrong type", &format!("{e}h-ep-type"), json(ep("h-ep-type", j!("many"))), ProxyDns),
        row(
            "a pod without containers",
            "/registry/pods/default/h-pod",
            json(pod("h-pod", j!({"containers": [], "hostname": "a\"b"}))),
            Dns,
        ),
        row("a truncated pod", "/registry/pods/default/h-pod-trunc", "{\"metadata\": {", Dns),
        row(
            "a deployment with replicas as text",
            "/registry/deployments/default/h-deploy",
            json(
                j!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "h-deploy", "namespace": "default"}, "spec": {"replicas": "three"}}),
            ),
            Controller,
        ),
        row(
            "a replicaset with negative replicas",
            "/registry/replicasets/default/h-rs",
            json(
                j!({"apiVersion": "apps/v1", "kind": "ReplicaSet", "metadata": {"name": "h-rs", "namespace": "default"},
                "spec": {"replicas": -5, "selector": {"matchLabels": {"a": "b"}}, "template": {"metadata": {"labels": {"a": "b"}}, "spec": {"containers": [{"name": "c", "image": "i"}]}}}}),
            ),
            Controller,
        ),
        row(
            "a node whose name is not its key's",
            "/registry/nodes/h-node",
            json(j!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "someone-else"}})),
            Controller,
        ),
        row("a garbage subnet lease", &format!("/coreos.com/network/subnets/{}", free[0]), "{not json", Agent),
        row(
            "a lease with an IPv6 public address and a bad MAC",
            &format!("/coreos.com/network/subnets/{}", free[1]),
            json(j!({"PublicIP": "fd00::1", "BackendType": "vxlan", "BackendData": {"VNI": 1, "VtepMAC": "zz"}})),
            Agent,
        ),
        row(
            "unknown fields (ignored, the object is served)",
            &format!("{s}h-unknown"),
            json(j!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "h-unknown", "namespace": "default"},
                "spec": {"clusterIP": "10.96.71.1", "ports": ports80, "frobnicate": true}, "extra": [1]})),
            None,
        ),
    ]
}

struct Env {
    lab: Lab,
    client1: Pod,
    client2: Pod,
    server: Pod,
    controller_log: std::path::PathBuf,
    _controller: ChildGuard,
    _dir: tempfile::TempDir,
}

const CONTROLLER_HEALTH: &str = "http://127.0.0.1:10257/healthz";

fn setup() -> Result<Env> {
    let mut lab = Lab::up(LabOptions { nodes: 2, ..LabOptions::default() }, &mut |_| {})?;
    let client1 = lab.add_pod(1, "client")?;
    let client2 = lab.add_pod(2, "client")?;
    let server = lab.add_pod(1, "server")?;
    server
        .ns()
        .command("socat")
        .args(["TCP-LISTEN:9376,reuseaddr,fork", "SYSTEM:echo server"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    lab.start_proxy(1, "iptables", &["--min-sync-period".into(), "100ms".into()])?;
    lab.start_proxy(2, "userspace", &["--min-sync-period".into(), "100ms".into()])?;
    lab.start_dns()?;
    let dir = tempfile::Builder::new().prefix("weft-hostile-").tempdir()?;
    let controller_log = dir.path().join("controller.log");
    let child = lab
        .fabric()
        .command(weft_lab::weft_bin())
        .args(["controller", "--etcd-endpoints", "http://127.0.0.1:2379"])
        .args(["--healthz-bind-address", "127.0.0.1:10257", "--metrics-bind-address", "127.0.0.1:10257"])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&controller_log)?)
        .stderr(std::fs::File::options().append(true).open(&controller_log)?)
        .spawn()?;
    let env = Env { lab, client1, client2, server, controller_log, _controller: ChildGuard(child), _dir: dir };
    until("the controller is healthy", 30, || env.lab.fabric().exec("curl", &["-sf", CONTROLLER_HEALTH]))?;
    Ok(env)
}

/// A valid Service `ok-<i>` at 10.96.60.<i> with Endpoints naming the server pod, written as `weft apply` does.
fn valid_service(env: &Env, i: usize) -> Result<()> {
    let yaml = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: ok-{i}}}\nspec:\n  clusterIP: 10.96.60.{i}\n  ports: [{{name: http, port: 80, targetPort: 9376}}]\n---\n\
         apiVersion: v1\nkind: Endpoints\nmetadata: {{name: ok-{i}}}\nsubsets: [{{addresses: [{{ip: \"{}\", nodeName: node-1}}], ports: [{{name: http, port: 9376}}]}}]\n",
        env.server.ip()
    );
    env.lab.weft(&["apply", "-f", "-"], Some(&yaml)).map(|_| ())
}

/// Every daemon still serves, and a Service written now works through both proxies and by name.
fn still_serving(env: &Env, i: usize, ip: &str) -> Result<()> {
    let addr: SocketAddr = format!("{ip}:80").parse()?;
    let via = |client: &Pod, mode: &str| {
        until(&format!("{ip}:80 through the {mode} proxy"), 20, || match fetch(client.ns(), addr)?.as_str() {
            "server" => Ok(()),
            other => bail!("answered {other:?}"),
        })
    };
    via(&env.client1, "iptables")?;
    via(&env.client2, "userspace (across the overlay)")?;
    let name = if i == 0 { "h-unknown".to_string() } else { format!("ok-{i}") };
    until(&format!("{name} by name"), 20, || {
        let out = env.lab.fabric().exec(
            "dig",
            &["+short", "+time=1", "+tries=1", "@192.168.56.11", &format!("{name}.default.svc.cluster.local")],
        )?;
        ensure!(out.trim() == ip, "dig answered {out:?}");
        Ok(())
    })?;
    for n in 1..=2 {
        env.lab.node(n).ns().exec("curl", &["-sf", "http://127.0.0.1:10256/healthz"]).context("proxy healthz")?;
        env.lab.node(n).ns().exec("curl", &["-sf", "http://127.0.0.1:8285/healthz"]).context("agent healthz")?;
    }
    env.lab.node(1).ns().exec("curl", &["-sf", "http://127.0.0.1:8080/healthz"]).context("dns healthz")?;
    env.lab.fabric().exec("curl", &["-sf", CONTROLLER_HEALTH]).context("controller healthz")?;
    Ok(())
}

fn log(path: &std::path::Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Lines of `text` naming `key` (as the warnings print it: Debug-quoted, or plain).
fn mentions(text: &str, key: &str) -> usize {
    let quoted = format!("{key:?}");
    text.lines().filter(|l| l.contains(&quoted) || l.contains(&format!("key={key} "))).count()
}

fn check_warned(env: &Env, r: &Row) -> Result<()> {
    let proxy = [env.lab.node(1).proxy_log_path(), env.lab.node(2).proxy_log_path()];
    let dns = env.lab.dns_log_path();
    let must: Vec<std::path::PathBuf> = match r.readers {
        Readers::ProxyDns => vec![proxy[0].clone(), proxy[1].clone(), dns],
        Readers::Dns => vec![dns],
        Readers::Controller => vec![env.controller_log.clone()],
        Readers::Agent => vec![env.lab.node(1).agent_log_path()],
        Readers::None => vec![],
    };
    for path in &must {
        until(&format!("a warning naming {:?} in {}", r.key, path.display()), 10, || {
            ensure!(mentions(&log(path), &r.key) >= 1);
            Ok(())
        })?;
        // The agent's own lease watch is not ours to change: it may repeat on resync; the readers here may not.
        if r.readers != Readers::Agent {
            let n = mentions(&log(path), &r.key);
            ensure!(n == 1, "{} names {:?} {n} times:\n{}", path.display(), r.key, log(path));
        }
    }
    Ok(())
}

#[test]
fn hostile_objects_in_etcd_are_skipped_with_one_warning_and_every_daemon_keeps_serving() {
    let env = setup().unwrap_or_else(|e| panic!("setup: {e:#}"));
    let held: Vec<String> = (1..=2)
        .map(|n| {
            let text = std::fs::read_to_string(env.lab.node(n).subnet_env_path()).unwrap_or_default();
            let subnet = text.lines().find_map(|l| l.strip_prefix("FLANNEL_SUBNET=")).unwrap_or_default();
            subnet.split('/').next().unwrap_or_default().to_string()
        })
        .collect();
    let mut free =
        (250..=254).map(|o| format!("10.244.{o}.0")).filter(|s| !held.iter().any(|h| h.starts_with(&s[..s.len() - 1])));
    let free =
        [format!("{}-24", free.next().expect("a free subnet")), format!("{}-24", free.next().expect("a free subnet"))];
    let rows = rows(free);
    let mut failures = Vec::new();
    for (i, r) in rows.iter().enumerate() {
        let i = i + 1;
        let started = Instant::now();
        let result = put(&env.lab, &r.key, r.value.clone())
            .and_then(|_| if r.readers == Readers::None { Ok(()) } else { valid_service(&env, i) })
            .and_then(|_| {
                if r.readers == Readers::None {
                    // The accepted object needs its Endpoints to be served.
                    let yaml = format!("apiVersion: v1\nkind: Endpoints\nmetadata: {{name: h-unknown}}\nsubsets: [{{addresses: [{{ip: \"{}\", nodeName: node-1}}], ports: [{{name: http, port: 9376}}]}}]\n", env.server.ip());
                    env.lab.weft(&["apply", "-f", "-"], Some(&yaml))?;
                    still_serving(&env, 0, "10.96.71.1")
                } else {
                    still_serving(&env, i, &format!("10.96.60.{i}"))
                }
            })
            .and_then(|_| check_warned(&env, r));
        match result {
            Ok(()) => eprintln!("ok   {} ({:?})", r.what, started.elapsed()),
            Err(e) => {
                eprintln!("FAIL {}: {e:#}", r.what);
                failures.push(format!("{}: {e:#}", r.what));
            }
        }
    }
    let saved = env.lab.node(1).ns().exec("iptables-save", &[]).unwrap_or_default();
    if saved.contains("-A INPUT -j DROP") {
        failures.push(format!("a hostile name injected a rule:\n{saved}"));
    }
    if !failures.is_empty() {
        let tail = |p: &std::path::Path| log(p).lines().rev().take(15).collect::<Vec<_>>().join("\n");
        panic!(
            "{} of {} rows failed:\n{}\n-- node-1 proxy log (newest first):\n{}\n-- controller log:\n{}",
            failures.len(),
            rows.len(),
            failures.join("\n"),
            tail(&env.lab.node(1).proxy_log_path()),
            tail(&env.controller_log)
        );
    }
}
