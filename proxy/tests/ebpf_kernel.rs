//! The eBPF dataplane against the real kernel: a netns with backends on loopback addresses, a cgroup
//! v2 subtree holding the clients, a private bpffs for the pins (all removed by guards). Clients are
//! socat processes put in the cgroup before exec.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, ensure, Result};
use weft_lab::bpf::{Bpffs, Cgroup};
use weft_lab::lab::until;
use weft_lab::Netns;
use weft_proxy::ebpf::{self, Config, EbpfDataplane};
use weft_proxy::{Dataplane, Endpoint, Protocol, ServiceEntry, ServicePort, ServicePortName, ServiceTable};

struct Fixture {
    ns: Netns,
    cgroup: Cgroup,
    bpffs: Bpffs,
}

/// Backends 127.0.0.{1..4}:9376 answer "b1".."b4".
fn fixture(label: &str) -> Result<Fixture> {
    // eBPF mode's newest kernel need: tcx links for the NodePort programs (6.6); the sock_addr hooks are older.
    weft_lab::require_kernel(6, 6, "tcx links (eBPF mode's NodePort tc programs)");
    let ns = Netns::create(label)?;
    for i in 1..=4 {
        ns.command("socat")
            .args([format!("TCP-LISTEN:9376,bind=127.0.0.{i},reuseaddr,fork"), format!("SYSTEM:echo b{i}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()?;
    }
    Ok(Fixture { ns, cgroup: Cgroup::create(label)?, bpffs: Bpffs::mount()? })
}

impl Fixture {
    fn config(&self) -> Config {
        Config {
            cgroup: self.cgroup.path().into(),
            pin_base: self.bpffs.path().join("weft"),
            map_max: 4096,
            nodeport_interface: None,
        }
    }

    /// A shell script run inside the netns and the cgroup; its stdout.
    fn script(&self, script: &str) -> Result<String> {
        let mut cmd = self.ns.command("sh");
        cmd.args(["-c", script]).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        self.cgroup.enter(&mut cmd)?;
        let out = cmd.output()?;
        ensure!(out.status.success(), "{script}: {}", String::from_utf8_lossy(&out.stderr));
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn fetch(&self, addr: &str) -> Result<String> {
        Ok(self.script(&format!("socat -T 10 - TCP:{addr}"))?.trim().to_string())
    }
}

fn web() -> ServicePortName {
    ServicePortName::new("default", "web", "http", Protocol::Tcp)
}

fn table(backends: &[u8]) -> ServiceTable {
    let endpoints = backends.iter().map(|i| Endpoint::ready(Ipv4Addr::new(127, 0, 0, *i), 9376)).collect();
    [(web(), ServiceEntry { port: ServicePort::cluster_ip(Ipv4Addr::new(10, 96, 0, 1), 80), endpoints })].into()
}

#[test]
fn a_racing_client_never_sees_a_half_written_service() -> Result<()> {
    let fx = fixture("race")?;
    let mut dp = EbpfDataplane::load(&fx.config(), "node-1")?;
    dp.sync(&table(&[1, 2, 3]), None)?;
    ensure!(until("the VIP answers", 10, || fx.fetch("10.96.0.1:80"))?.starts_with('b'));

    // Flip between three backends and one (counts and slots both change) as fast as syncs go, while
    // the client connects in a loop. A count written before its slots, or a slot removed before the
    // count shrank, fails a connection.
    let stop = Arc::new(AtomicBool::new(false));
    let flipper = {
        let stop = stop.clone();
        std::thread::spawn(move || -> Result<usize> {
            let sets: [&[u8]; 4] = [&[4], &[1, 2, 3], &[2], &[3, 4, 1]];
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                dp.sync(&table(sets[n % sets.len()]), Some(&BTreeSet::from([web()])))?;
                n += 1;
            }
            Ok(n)
        })
    };
    let out = fx.script("for i in $(seq 300); do socat -T 10 - TCP:10.96.0.1:80 || echo FAILED; done");
    stop.store(true, Ordering::Relaxed);
    let flips = flipper.join().map_err(|_| anyhow::anyhow!("flipper panicked"))??;
    let out = out?;
    let answers: Vec<&str> = out.lines().collect();
    ensure!(answers.len() == 300, "{} answers of 300:\n{out}", answers.len());
    let bad: Vec<&&str> = answers.iter().filter(|a| !["b1", "b2", "b3", "b4"].contains(a)).collect();
    ensure!(bad.is_empty(), "{} failed connections during {flips} updates: {bad:?}", bad.len());
    ensure!(flips > 50, "the updates raced the client ({flips} syncs)");
    Ok(())
}

#[test]
fn a_restarted_dataplane_reuses_the_pinned_maps_and_rewrites_nothing() -> Result<()> {
    let fx = fixture("restart")?;
    let cfg = fx.config();
    let want = table(&[1, 2]);
    let mut dp = EbpfDataplane::load(&cfg, "node-1")?;
    let first = dp.sync(&want, None)?;
    ensure!(first.rules_written == 3, "2 slots + 1 service: {first:?}");
    // An established connection (a long-lived cat) across the restart.
    let mut cmd = fx.ns.command("socat");
    cmd.args(["-", "TCP:10.96.0.1:80"]).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::null());
    fx.cgroup.enter(&mut cmd)?;
    let mut conn = cmd.spawn()?;
    drop(dp);
    // Down: the pinned programs keep translating.
    ensure!(fx.fetch("10.96.0.1:80")?.starts_with('b'));
    let mut dp = EbpfDataplane::load(&cfg, "node-1")?;
    let again = dp.sync(&want, None)?;
    ensure!(again.rules_written == 0, "a restart with the same table writes nothing: {again:?}");
    ensure!(fx.fetch("10.96.0.1:80")?.starts_with('b'));
    // The connection made before the restart got its answer (socket LB translates at connect only).
    {
        use std::io::{BufRead, BufReader};
        let mut line = String::new();
        let stdout = conn.stdout.take().ok_or_else(|| anyhow::anyhow!("no stdout"))?;
        BufReader::new(stdout).read_line(&mut line)?;
        ensure!(line.trim().starts_with('b'), "the pre-restart connection answered {line:?}");
        let _ = conn.kill();
        let _ = conn.wait();
    }
    let entries = dp.describe(&web()).unwrap_or_default();
    ensure!(entries.starts_with("10.96.0.1:80/tcp id=1 count=2 [0]127.0.0.1:9376 [1]127.0.0.2:9376"), "{entries}");
    Ok(())
}

#[test]
fn switching_to_another_mode_leaves_no_program_attached_and_no_pin() -> Result<()> {
    let fx = fixture("switch")?;
    let cfg = fx.config();
    let mut dp = EbpfDataplane::load(&cfg, "node-1")?;
    dp.sync(&table(&[1]), None)?;
    drop(dp);
    ensure!(fx.fetch("10.96.0.1:80")? == "b1");
    ebpf::remove_leftovers(&cfg.pin_base, "node-1")?;
    ensure!(!cfg.pin_base.join("node-1").exists(), "pins left");
    until("the programs detach", 10, || {
        let out = Command::new("bpftool").args(["cgroup", "show"]).arg(fx.cgroup.path()).output()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if text.lines().skip(1).any(|l| !l.trim().is_empty()) {
            bail!("still attached:\n{text}");
        }
        Ok(())
    })?;
    ensure!(fx.fetch("10.96.0.1:80").is_err(), "the VIP is no longer translated");
    Ok(())
}
