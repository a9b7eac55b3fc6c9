//! The lab harness itself (without agents): nodes on one fabric reach each other and etcd, pods wired by
//! weft-cni reach each other on a node, and teardown leaves no namespace, process or file behind.

use std::path::Path;

use weft_lab::cli::{self, LabCommand};
use weft_lab::lab::{self, Lab, LabOptions};

fn opts(nodes: usize) -> LabOptions {
    LabOptions { nodes, start_agents: false, ..LabOptions::default() }
}

fn lab_namespaces(id: &str) -> Vec<String> {
    lab::netns_list().into_iter().filter(|n| n.starts_with(&lab::ns_prefix(id))).collect()
}

fn etcd_pid(dir: &Path) -> i32 {
    std::fs::read_to_string(dir.join("etcd.pid")).unwrap().trim().parse().unwrap()
}

/// Nothing of lab `id` is left: namespaces, the etcd process, the state dir.
fn assert_gone(id: &str, dir: &Path, etcd: i32) {
    assert_eq!(lab_namespaces(id), Vec::<String>::new(), "namespaces left");
    assert!(!dir.exists(), "{} left", dir.display());
    let cmdline = std::fs::read(format!("/proc/{etcd}/cmdline")).unwrap_or_default();
    assert!(!String::from_utf8_lossy(&cmdline).contains("etcd"), "etcd {etcd} still runs");
}

#[test]
fn two_nodes_reach_each_other_and_etcd_and_leave_nothing() {
    let mut steps = Vec::new();
    let lab = Lab::up(opts(2), &mut |s| steps.push(s.to_string())).expect("lab up");
    assert!(steps.iter().any(|s| s.contains("etcd")), "{steps:?}");
    let (id, dir) = (lab.id().to_string(), lab.dir().to_path_buf());
    assert_eq!(lab_namespaces(&id).len(), 3);
    assert_eq!(lab.node(1).ip().to_string(), "192.168.56.11");
    assert_eq!(lab.node(2).name(), "node-2");

    let n1 = lab.node(1).ns();
    n1.exec("ping", &["-c1", "-W2", "192.168.56.12"]).expect("node-1 pings node-2");
    n1.exec("ping", &["-c1", "-W2", "192.168.56.10"]).expect("node-1 pings the fabric");
    let health = lab
        .node(2)
        .ns()
        .command("etcdctl")
        .args(["--endpoints", lab.etcd_endpoint(), "endpoint", "health"])
        .env("ETCDCTL_API", "3")
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&health.stdout), String::from_utf8_lossy(&health.stderr));
    assert!(health.status.success() && text.contains("is healthy"), "{text}");
    let config = lab
        .etcd(|mut c| async move {
            let r = c.get(lab::NETWORK_CONFIG_KEY, None).await?;
            Ok(r.kvs().first().map(|kv| kv.value_str().unwrap_or_default().to_string()))
        })
        .unwrap();
    assert_eq!(config.as_deref(), Some(r#"{"Backend":{"Type":"vxlan"},"Network":"10.244.0.0/16"}"#));
    // The host namespace never gets the lab's addresses (read only: no traffic leaves the lab).
    let host = std::process::Command::new("ip").args(["-4", "addr"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&host.stdout).contains("192.168.56."));

    let etcd = etcd_pid(&dir);
    drop(lab);
    assert_gone(&id, &dir, etcd);
}

#[test]
fn persisted_lab_is_removed_by_down_and_a_panic_removes_its_lab() {
    let lab = Lab::up(opts(1), &mut |_| {}).expect("lab up");
    let (id, dir) = (lab.id().to_string(), lab.dir().to_path_buf());
    let etcd = etcd_pid(&dir);
    lab.persist();
    assert_eq!(lab_namespaces(&id).len(), 2, "persisted lab stays");
    assert!(Lab::list().contains(&id));
    let opened = Lab::open(&id).unwrap();
    opened.node(1).ns().exec("ping", &["-c1", "-W2", "192.168.56.10"]).expect("reopened lab works");
    drop(opened);
    // The CLI on the persisted lab: exec returns the command's exit code, status and pods work.
    let exec = |target: &str, cmd: &[&str]| {
        let cmd = cmd.iter().map(|s| s.to_string()).collect();
        cli::run(LabCommand::Exec { name: id.clone(), target: target.into(), cmd }).unwrap()
    };
    assert_eq!(exec("node-1", &["ping", "-c1", "-W2", "192.168.56.10"]), 0);
    assert_eq!(exec("fabric", &["sh", "-c", "exit 3"]), 3);
    assert_eq!(exec("node-1", &["sh", "-c", "test \"$WEFT_ETCD_ENDPOINTS\" = http://192.168.56.10:2379"]), 0);
    assert!(cli::run(LabCommand::Exec { name: id.clone(), target: "node-9".into(), cmd: vec!["true".into()] }).is_err());
    assert_eq!(cli::run(LabCommand::Status { name: Some(id.clone()) }).unwrap(), 0);
    assert_eq!(lab_namespaces(&id).len(), 2, "dropping an opened lab leaves it");
    Lab::down(&id).unwrap();
    assert_gone(&id, &dir, etcd);
    Lab::down(&id).expect("down of a lab already gone");

    let mut seen = None;
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let lab = Lab::up(opts(1), &mut |_| {}).expect("lab up");
        seen = Some((lab.id().to_string(), lab.dir().to_path_buf(), etcd_pid(lab.dir())));
        panic!("test failure inside a lab");
    }));
    assert!(r.is_err());
    let (id, dir, etcd) = seen.unwrap();
    assert_gone(&id, &dir, etcd);
}

#[test]
fn pods_on_a_node_reach_each_other() {
    let lab = Lab::up(opts(2), &mut |_| {}).expect("lab up");
    for i in 1..=2 {
        std::fs::write(
            lab.node(i).subnet_env_path(),
            format!("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.{i}.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"),
        )
        .unwrap();
    }
    let a = lab.add_pod(1, "a").expect("pod a");
    let b = lab.add_pod(1, "b").expect("pod b");
    let c = lab.add_pod(2, "c").expect("pod c");
    assert_eq!(a.ns().name(), format!("weft-{}-node-1-a", lab.id()));
    assert!(a.ip().to_string().starts_with("10.244.1.") && c.ip().to_string().starts_with("10.244.2."));
    assert_ne!(a.ip(), b.ip());
    a.ns().exec("ping", &["-c1", "-W2", &b.ip().to_string()]).expect("a pings b on the same node");
    c.ns().exec("ping", &["-c1", "-W2", "10.244.2.1"]).expect("c pings its node's cni0");
    // Two nodes on one machine keep separate host-local state.
    let names: Vec<String> = lab.pods(1).into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["a", "b"]);

    lab.del_pod(1, "b").expect("del b");
    assert!(!lab::netns_list().contains(&b.ns().name().to_string()));
    assert!(a.ns().exec("ping", &["-c1", "-W1", &b.ip().to_string()]).is_err());
    let d = lab.add_pod(1, "d").expect("pod d reuses the freed range");
    assert!(d.ip().to_string().starts_with("10.244.1."));
    assert!(lab.add_pod(1, "bad/name").is_err());
}

#[test]
fn lab_up_fails_cleanly_when_an_agent_dies() {
    let id = weft_lab::unique_id();
    let o = LabOptions {
        id: Some(id.clone()),
        nodes: 1,
        start_agents: true,
        agent_args: vec!["--no-such-flag".into()],
        ..LabOptions::default()
    };
    let err = Lab::up(o, &mut |_| {}).err().expect("an agent that exits fails the lab");
    assert!(format!("{err:#}").contains("not running"), "{err:#}");
    assert_eq!(lab_namespaces(&id), Vec::<String>::new());
    assert!(!lab::lab_dir(&id).exists());
}
