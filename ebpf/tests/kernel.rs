//! The loader and the programs against the real kernel: each test owns a netns, a cgroup v2 subtree and
//! a private bpffs (guards remove them); clients are socat processes put in the cgroup before exec.

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use anyhow::{bail, ensure, Result};
use weft_ebpf::maps::{IPPROTO_TCP, IPPROTO_UDP, LB_FLAG_AFFINITY, LB_SCOPE_SOCKET};
use weft_ebpf::{Backend, BackendKey, Config, MapOp, SockLb, SvcKey, SvcVal};
use weft_lab::bpf::{Bpffs, Cgroup};
use weft_lab::lab::until;
use weft_lab::Netns;

struct Fixture {
    ns: Netns,
    cgroup: Cgroup,
    bpffs: Bpffs,
}

impl Fixture {
    fn new(label: &str) -> Result<Fixture> {
        // The socket LB's hooks: cgroup connect4/sendmsg4/recvmsg4 (≤ 5.2), getpeername4 and
        // bpf_get_netns_cookie in sock_addr programs (5.8).
        weft_lab::require_kernel(5, 8, "cgroup/getpeername4 and bpf_get_netns_cookie in sock_addr programs");
        let ns = Netns::create(label)?;
        // Backends on loopback addresses of the namespace: 127.0.0.1 answers "a", 127.0.0.2 "b".
        for (ip, name) in [("127.0.0.1", "a"), ("127.0.0.2", "b")] {
            for args in [
                vec![format!("TCP-LISTEN:9376,bind={ip},reuseaddr,fork"), format!("SYSTEM:echo {name}")],
                // It reads the datagram first: an echo exiting before socat writes to it loses the reply.
                vec![format!("UDP-RECVFROM:9377,bind={ip},fork"), format!("SYSTEM:read x; echo {name}")],
            ] {
                ns.command("socat").args(&args).stdin(Stdio::null()).stdout(Stdio::null()).spawn()?;
            }
        }
        Ok(Fixture { ns, cgroup: Cgroup::create(label)?, bpffs: Bpffs::mount()? })
    }

    fn config(&self, map_max: u32) -> Config {
        Config { cgroup: self.cgroup.path().to_path_buf(), pin_dir: self.bpffs.path().join("weft/node-1"), map_max }
    }

    /// socat inside the netns and the cgroup; its stdout, trimmed.
    /// A TCP client sends nothing (the server's close would reset a connection with unread data).
    fn client(&self, address: &str) -> Result<String> {
        let mut cmd = self.ns.command("socat");
        cmd.args(["-T", "10", "-t", "10", "-", address])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        self.cgroup.enter(&mut cmd)?;
        let mut child = cmd.spawn()?;
        if let Some(mut stdin) = child.stdin.take() {
            use std::io::Write;
            if address.starts_with("UDP") {
                let _ = stdin.write_all(b"hi\n");
            }
        }
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!("socat {address}: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }
}

fn vip(port: u16, proto: u8) -> SvcKey {
    SvcKey::new(Ipv4Addr::new(10, 96, 0, 1), port, proto, LB_SCOPE_SOCKET)
}

fn service(lb: &mut SockLb, key: SvcKey, id: u32, backends: &[[u8; 4]], port: u16, flags: u16) -> Result<()> {
    for (slot, ip) in backends.iter().enumerate() {
        let be = Backend::new((*ip).into(), port, false);
        lb.maps.apply(&MapOp::PutBackend(BackendKey { id, slot: slot as u32 }, be))?;
    }
    let val = SvcVal { id, count: backends.len() as u16, flags, affinity_secs: 60 };
    lb.maps.apply(&MapOp::PutService(key, val))?;
    Ok(())
}

/// Programs attached to the cgroup, as `bpftool cgroup show` lists them (attach type names).
fn attached(cgroup: &std::path::Path) -> Result<Vec<String>> {
    let out = Command::new("bpftool").args(["cgroup", "show"]).arg(cgroup).output()?;
    ensure!(out.status.success(), "bpftool cgroup show: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text.lines().skip(1).filter_map(|l| l.split_whitespace().nth(1).map(String::from)).collect())
}

#[test]
fn tcp_and_udp_to_a_vip_reach_a_backend_inside_the_cgroup_only() -> Result<()> {
    let fx = Fixture::new("sock-lb")?;
    let mut lb = SockLb::load(&fx.config(1024))?;
    service(&mut lb, vip(80, IPPROTO_TCP), 1, &[[127, 0, 0, 1]], 9376, 0)?;
    service(&mut lb, vip(53, IPPROTO_UDP), 2, &[[127, 0, 0, 2]], 9377, 0)?;
    ensure!(until("TCP via the VIP", 10, || fx.client("TCP:10.96.0.1:80"))? == "a");
    // Unconnected UDP: sendmsg4 translates the destination, recvmsg4 rewrites the reply's source to the VIP.
    ensure!(until("UDP sendto via the VIP", 10, || fx.client("UDP-SENDTO:10.96.0.1:53"))? == "b");
    // Connected UDP: connect4 translates, getpeername4 answers with the VIP.
    ensure!(until("connected UDP via the VIP", 10, || fx.client("UDP:10.96.0.1:53"))? == "b");
    // A process outside the cgroup is not translated: nothing answers on the VIP.
    let mut outside = fx.ns.command("socat");
    outside.args(["-T", "1", "-", "TCP:10.96.0.1:80,connect-timeout=1"]).stdin(Stdio::null()).stderr(Stdio::null());
    ensure!(!outside.status()?.success(), "a process outside the cgroup reached the VIP");
    Ok(())
}

#[test]
fn a_service_without_backends_refuses_at_once() -> Result<()> {
    let fx = Fixture::new("refuse")?;
    let mut lb = SockLb::load(&fx.config(1024))?;
    service(&mut lb, vip(80, IPPROTO_TCP), 1, &[], 9376, 0)?;
    let err = fx.client("TCP:10.96.0.1:80").expect_err("no backend, no connection");
    ensure!(err.to_string().contains("Connection refused"), "{err:#}");
    Ok(())
}

#[test]
fn affinity_keeps_one_backend_and_random_choice_spreads() -> Result<()> {
    let fx = Fixture::new("affinity")?;
    let mut lb = SockLb::load(&fx.config(1024))?;
    let two = [[127, 0, 0, 1], [127, 0, 0, 2]];
    service(&mut lb, vip(80, IPPROTO_TCP), 1, &two, 9376, 0)?;
    service(&mut lb, vip(81, IPPROTO_TCP), 2, &two, 9376, LB_FLAG_AFFINITY)?;
    let mut spread = std::collections::BTreeSet::new();
    let mut sticky = std::collections::BTreeSet::new();
    for _ in 0..20 {
        spread.insert(fx.client("TCP:10.96.0.1:80")?);
        sticky.insert(fx.client("TCP:10.96.0.1:81")?);
    }
    ensure!(spread.len() == 2, "random choice used both backends: {spread:?}");
    ensure!(sticky.len() == 1, "affinity kept one backend: {sticky:?}");
    Ok(())
}

#[test]
fn a_reload_reuses_pinned_maps_and_replaces_the_links_and_remove_detaches_everything() -> Result<()> {
    let fx = Fixture::new("pins")?;
    let cfg = fx.config(1024);
    let mut lb = SockLb::load(&cfg)?;
    service(&mut lb, vip(80, IPPROTO_TCP), 1, &[[127, 0, 0, 1]], 9376, 0)?;
    drop(lb);
    // The "proxy" is gone: the pinned links keep translating.
    ensure!(fx.client("TCP:10.96.0.1:80")? == "a");
    let lb = SockLb::load(&cfg)?;
    let state = lb.maps.dump()?;
    ensure!(state.services.len() == 1 && state.backends.len() == 1, "the maps were re-used: {state:?}");
    let mut hooks = attached(fx.cgroup.path())?;
    hooks.sort();
    hooks.dedup();
    ensure!(hooks.len() == 4 && attached(fx.cgroup.path())?.len() == 4, "one program per hook: {hooks:?}");
    ensure!(fx.client("TCP:10.96.0.1:80")? == "a");
    drop(lb);

    // A bigger --bpf-lb-map-max cannot silently reuse smaller pinned maps.
    let err = SockLb::load(&fx.config(2048)).err().expect("a size mismatch is an error");
    ensure!(err.to_string().contains("--bpf-lb-map-max"), "{err}");

    let removed = weft_ebpf::remove(&cfg.pin_dir)?;
    ensure!(removed.links.len() == 4 && removed.maps.len() == 4, "{removed:?}");
    ensure!(!cfg.pin_dir.exists(), "the pin directory is gone");
    until("the programs detach", 10, || {
        let hooks = attached(fx.cgroup.path())?;
        ensure!(hooks.is_empty(), "still attached: {hooks:?}");
        Ok(())
    })?;
    Ok(())
}

#[test]
fn a_full_map_is_a_clear_error() -> Result<()> {
    let fx = Fixture::new("full")?;
    let mut lb = SockLb::load(&fx.config(4))?;
    let be = Backend::new(Ipv4Addr::LOCALHOST, 1, false);
    for slot in 0..4 {
        lb.maps.apply(&MapOp::PutBackend(BackendKey { id: 1, slot }, be))?;
    }
    let err = lb.maps.apply(&MapOp::PutBackend(BackendKey { id: 1, slot: 4 }, be)).expect_err("a fifth entry");
    ensure!(err.is_map_full(), "{err:?}");
    ensure!(err.to_string() == "map weft_lb_be is full (4 entries): raise --bpf-lb-map-max", "{err}");
    Ok(())
}

#[test]
fn load_outside_bpffs_names_the_problem() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cfg = Config { cgroup: "/nonexistent".into(), pin_dir: dir.path().join("weft"), map_max: 16 };
    let err = SockLb::load(&cfg).err().expect("not bpffs");
    ensure!(err.to_string().contains("not on a bpf filesystem"), "{err}");
    Ok(())
}
