//! Hostile input (issue 10): objects written straight into etcd by another client, bypassing `weft apply`'s
//! checks. One lab for the whole table: after each row the daemons keep serving and a valid Service added
//! afterwards works end to end.

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use weft_lab::lab::{Lab, LabOptions, Pod};
use weft_lab::Netns;

fn until<T>(what: &str, secs: u64, mut f: impl FnMut() -> Result<T>) -> Result<T> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() > deadline => return Err(e.context(format!("{what}: not within {secs}s"))),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// Connects from inside `ns` and reads what the server says until it closes.
fn fetch(ns: &Netns, addr: SocketAddr) -> Result<String> {
    ns.block_on(move || async move {
        let mut s =
            TcpStream::connect_timeout(&addr, Duration::from_secs(2)).with_context(|| format!("connect {addr}"))?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok::<_, anyhow::Error>(out.trim().to_string())
    })?
}

fn etcdctl(lab: &Lab, args: &[&str]) -> Result<String> {
    let mut all = vec!["--endpoints", "http://127.0.0.1:2379"];
    all.extend_from_slice(args);
    lab.fabric().exec("etcdctl", &all)
}

/// A Service at `ip:80` and its Endpoints naming `server` (port 9376), as a valid client writes them.
fn valid_service(name: &str, ip: &str, server: &Pod) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  clusterIP: {ip}\n  ports: [{{name: http, port: 80, targetPort: 9376}}]\n---\n\
         apiVersion: v1\nkind: Endpoints\nmetadata: {{name: {name}}}\nsubsets: [{{addresses: [{{ip: \"{}\", nodeName: node-{}}}], ports: [{{name: http, port: 9376}}]}}]\n",
        server.ip(),
        server.node()
    )
}

struct Env {
    lab: Lab,
    client: Pod,
    server: Pod,
}

fn setup(mode: &str) -> Result<Env> {
    let mut lab = Lab::up(LabOptions { nodes: 1, ..LabOptions::default() }, &mut |_| {})?;
    let client = lab.add_pod(1, "client")?;
    let server = lab.add_pod(1, "server")?;
    server
        .ns()
        .command("socat")
        .args(["TCP-LISTEN:9376,reuseaddr,fork", "SYSTEM:echo server"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    lab.start_proxy(1, mode, &["--min-sync-period".into(), "100ms".into()])?;
    Ok(Env { lab, client, server })
}

#[test]
fn a_quote_and_newline_in_a_port_name_written_into_etcd_do_not_stop_other_services() -> Result<()> {
    let env = setup("iptables")?;
    // A Service no `weft apply` would accept: its port name breaks out of an iptables-restore comment.
    let hostile = serde_json::json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "evil", "namespace": "default", "uid": "1"},
        "spec": {"clusterIP": "10.96.50.1", "ports": [{"name": "a\" -j ACCEPT\n-A INPUT -j DROP #", "port": 80, "protocol": "TCP"}]}});
    etcdctl(&env.lab, &["put", "/registry/services/default/evil", &hostile.to_string()])?;
    env.lab.weft(&["apply", "-f", "-"], Some(&valid_service("after", "10.96.50.2", &env.server)))?;
    let got = until("the Service applied after the hostile one", 30, || {
        fetch(env.client.ns(), "10.96.50.2:80".parse().expect("address"))
    });
    let log = std::fs::read_to_string(env.lab.node(1).proxy_log_path()).unwrap_or_default();
    ensure!(got.as_deref().ok() == Some("server"), "{got:?}\nproxy log:\n{log}");
    let saved = env.lab.node(1).ns().exec("iptables-save", &[])?;
    ensure!(!saved.contains("-A INPUT -j DROP"), "the hostile name injected a rule:\n{saved}");
    Ok(())
}
