//! North-south against the real kernel. Namespaces (removed by guards):
//!   client (192.168.77.2, and 10.244.2.2 = a "remote" backend behind it) ── ext ── node (192.168.77.1)
//!   node ── pod veth ── pod (10.244.1.2, a local backend)
//! The node's tc programs on `ext` balance node port 30080, 30081 (externalTrafficPolicy Local) and
//! the external IP 203.0.113.10:80; the client connects with socat and reads who answered.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::process::Stdio;

use anyhow::{ensure, Result};
use weft_ebpf::loader::{attach_nodeport, NodePort};
use weft_ebpf::maps::{IPPROTO_TCP, LB_FLAG_LOCAL_ONLY, LB_SCOPE_NODEPORT, LB_SCOPE_SOCKET};
use weft_ebpf::{Backend, BackendKey, Config, MapOp, SockLb, SvcKey, SvcVal};
use weft_lab::bpf::{Bpffs, Cgroup};
use weft_lab::lab::until;
use weft_lab::netns::run;
use weft_lab::Netns;

#[test]
fn node_ports_and_external_ips_reach_local_and_remote_backends() -> Result<()> {
    weft_lab::require_kernel(6, 6, "tcx links (the NodePort tc programs)");
    let client = Netns::create("npc")?;
    let node = Netns::create("npn")?;
    let pod = Netns::create("npp")?;
    let ip = |args: &[&str]| run(std::process::Command::new("ip").args(args)).map(|_| ());
    ip(&["link", "add", "ext", "netns", node.name(), "type", "veth", "peer", "name", "eth0", "netns", client.name()])?;
    ip(&["link", "add", "pod", "netns", node.name(), "type", "veth", "peer", "name", "eth0", "netns", pod.name()])?;
    node.ip(&["addr", "add", "192.168.77.1/24", "dev", "ext"])?;
    node.ip(&["addr", "add", "10.244.1.1/24", "dev", "pod"])?;
    node.ip(&["link", "set", "ext", "up"])?;
    node.ip(&["link", "set", "pod", "up"])?;
    node.ip(&["route", "add", "10.244.2.0/24", "via", "192.168.77.2"])?;
    node.sysctl("net.ipv4.ip_forward", "1")?;
    client.ip(&["addr", "add", "192.168.77.2/24", "dev", "eth0"])?;
    client.ip(&["addr", "add", "10.244.2.2/32", "dev", "eth0"])?;
    client.ip(&["link", "set", "eth0", "up"])?;
    client.ip(&["route", "add", "203.0.113.10/32", "via", "192.168.77.1"])?;
    pod.ip(&["addr", "add", "10.244.1.2/24", "dev", "eth0"])?;
    pod.ip(&["link", "set", "eth0", "up"])?;
    pod.ip(&["route", "add", "default", "via", "10.244.1.1"])?;
    for (ns, bind, name) in [(&pod, "10.244.1.2", "local"), (&client, "10.244.2.2", "remote")] {
        ns.command("socat")
            .args([format!("TCP-LISTEN:9376,bind={bind},reuseaddr,fork"), format!("SYSTEM:echo {name}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()?;
    }

    let (cgroup, bpffs) = (Cgroup::create("np")?, Bpffs::mount()?);
    let cfg = Config { cgroup: cgroup.path().into(), pin_dir: bpffs.path().join("weft/node-1"), map_max: 1024 };
    let mut lb = SockLb::load(&cfg)?;
    // tcx attach happens inside the node namespace (the interface lives there).
    let np = NodePort { interface: "ext".into(), node_ip: Ipv4Addr::new(192, 168, 77, 1) };
    let path = node.path();
    let cfg2 = cfg.clone();
    std::thread::spawn(move || -> Result<()> {
        weft_lab::netns::enter(&path)?;
        attach_nodeport(&cfg2, Some(&np))?;
        Ok(())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("attach thread panicked"))??;

    let local = Backend::new([10, 244, 1, 2].into(), 9376, true);
    let remote = Backend::new([10, 244, 2, 2].into(), 9376, false);
    for (id, flags, frontends) in [
        (
            1,
            0,
            vec![
                SvcKey::new(Ipv4Addr::UNSPECIFIED, 30080, IPPROTO_TCP, LB_SCOPE_NODEPORT),
                SvcKey::new([203, 0, 113, 10].into(), 80, IPPROTO_TCP, LB_SCOPE_SOCKET),
            ],
        ),
        (2, LB_FLAG_LOCAL_ONLY, vec![SvcKey::new(Ipv4Addr::UNSPECIFIED, 30081, IPPROTO_TCP, LB_SCOPE_NODEPORT)]),
    ] {
        lb.maps.apply(&MapOp::PutBackend(BackendKey { id, slot: 0 }, local))?;
        lb.maps.apply(&MapOp::PutBackend(BackendKey { id, slot: 1 }, remote))?;
        for k in frontends {
            lb.maps.apply(&MapOp::PutService(k, SvcVal { id, count: 2, flags, affinity_secs: 0 }))?;
        }
    }
    let fetch = |addr: &str| client.exec("socat", &["-T", "10", "-", &format!("TCP:{addr},connect-timeout=5")]);
    let seen = |addr: &str| -> Result<BTreeSet<String>> {
        let mut s = BTreeSet::new();
        for _ in 0..30 {
            s.insert(fetch(addr)?.trim().to_string());
        }
        Ok(s)
    };
    until("node port 30080", 10, || fetch("192.168.77.1:30080"))?;
    let both: BTreeSet<String> = ["local".to_string(), "remote".to_string()].into();
    ensure!(seen("192.168.77.1:30080")? == both, "node port reaches the local and the remote backend");
    ensure!(seen("203.0.113.10:80")? == both, "external IP reaches both");
    ensure!(seen("192.168.77.1:30081")? == ["local".to_string()].into(), "Local policy: local backends only");

    // Attached as tcx programs; a re-attach (a restarted proxy) replaces them; removal detaches them.
    let in_node = |f: Box<dyn FnOnce() -> Result<Vec<String>> + Send>| -> Result<Vec<String>> {
        let path = node.path();
        std::thread::spawn(move || {
            weft_lab::netns::enter(&path)?;
            f()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread panicked"))?
    };
    let names = || -> Result<Vec<String>> { Ok(weft_ebpf::loader::tcx_programs("ext")?) };
    ensure!(in_node(Box::new(names))? == ["weft_nodeport_i", "weft_nodeport_o"], "one program per direction");
    let (cfg2, np2) = (cfg.clone(), NodePort { interface: "ext".into(), node_ip: Ipv4Addr::new(192, 168, 77, 1) });
    in_node(Box::new(move || {
        attach_nodeport(&cfg2, Some(&np2))?;
        Ok(vec![])
    }))?;
    ensure!(in_node(Box::new(names))?.len() == 2, "a re-attach replaces, never adds");
    ensure!(seen("192.168.77.1:30080")? == both, "still balanced after the re-attach");
    weft_ebpf::remove(&cfg.pin_dir)?;
    // The kernel releases a link once its last reference (the unpinned file) is gone, not within remove's call.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !in_node(Box::new(names))?.is_empty() {
        ensure!(std::time::Instant::now() < deadline, "removal detaches the tc programs");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Ok(())
}
