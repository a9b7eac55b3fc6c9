//! What of ipvs mode the host kernel can check (it has no IPVS and no dummy link; the rest runs in the
//! QEMU lab, tests/tests/ipvs_qemu.rs): its ipsets and rules load into the real ipset and iptables in a
//! namespace this test creates, and `cleanup_leftovers` (run when a node switches to another mode) removes
//! them and the iptables mode's chains stay alone.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Result;
use weft_lab::Netns;
use weft_proxy::iptables::{CommandRunner, Runner};
use weft_proxy::ipvs::plan::{desired, PlanConfig};
use weft_proxy::ipvs::rules::{render_ipsets, render_rules, RuleConfig};
use weft_proxy::{Endpoint, Protocol, ServiceEntry, ServicePort, ServicePortName, ServiceTable};

fn table() -> ServiceTable {
    let web = ServicePortName::new("default", "web", "http", Protocol::Tcp);
    let entry = ServiceEntry {
        port: ServicePort { node_port: Some(30080), ..ServicePort::cluster_ip([10, 96, 0, 10].into(), 80) },
        endpoints: vec![Endpoint::ready([10, 244, 1, 5].into(), 8080)],
    };
    [(web, entry)].into()
}

#[test]
fn ipvs_rules_and_sets_load_and_cleanup_removes_them() -> Result<()> {
    let ns = Netns::create("ipvsh")?;
    let mut runner = CommandRunner::with_prefix(["ip", "netns", "exec", ns.name()]);
    let d = desired(&table(), &[[192, 168, 56, 11].into()], &PlanConfig::default());
    let sets: BTreeMap<&'static str, BTreeSet<String>> = d.ipsets.clone();
    runner.run("ipset", &["restore"], Some(render_ipsets(&sets).as_bytes()))?;
    // Refilling through the twin again (a second full sync) must work while the rules reference the sets.
    let cfg = RuleConfig { cluster_cidr: Some("10.244.0.0/16".parse()?), masquerade_bit: 14 };
    runner.run("iptables-restore", &["--noflush"], Some(render_rules(&cfg, "").as_bytes()))?;
    runner.run("ipset", &["restore"], Some(render_ipsets(&sets).as_bytes()))?;
    // A second rules sync sees its hooks and does not add them twice.
    let save = String::from_utf8(runner.run("iptables-save", &[], None)?)?;
    runner.run("iptables-restore", &["--noflush"], Some(render_rules(&cfg, &save).as_bytes()))?;
    let save = String::from_utf8(runner.run("iptables-save", &[], None)?)?;
    assert_eq!(save.matches("-j WEFT-IPVS-SERVICES").count(), 2, "PREROUTING and OUTPUT, once each:\n{save}");
    let members = String::from_utf8(runner.run("ipset", &["list", "WEFT-CLUSTER-IP"], None)?)?;
    assert!(members.contains("10.96.0.10,tcp:80"), "{members}");
    assert!(!String::from_utf8(runner.run("ipset", &["list", "-n"], None)?)?.contains("-TMP"), "twins destroyed");

    // A chain of another weft component in the same table must survive the cleanup.
    runner.run("iptables", &["-t", "nat", "-N", "WEFT-POSTRTG"], None)?;
    let removed = ns.block_on(|| async { weft_proxy::ipvs::cleanup_leftovers(&mut CommandRunner::new()) })?;
    assert!(removed.iter().any(|r| r == "ipvs-mode chains") && removed.iter().any(|r| r == "ipsets"), "{removed:?}");
    let save = String::from_utf8(runner.run("iptables-save", &[], None)?)?;
    assert!(!save.contains("WEFT-IPVS"), "{save}");
    assert!(save.contains(":WEFT-POSTRTG"), "{save}");
    let sets = String::from_utf8(runner.run("ipset", &["list", "-n"], None)?)?;
    assert!(!sets.contains("WEFT-"), "{sets}");
    // Nothing left: a second cleanup has nothing to do.
    let again = ns.block_on(|| async { weft_proxy::ipvs::cleanup_leftovers(&mut CommandRunner::new()) })?;
    assert!(again.is_empty(), "{again:?}");
    Ok(())
}

/// A big first sync adds thousands of addresses in batches; more outstanding answers than the receive
/// buffer holds once lost them (ENOBUFS). Thousands of /32s on `lo` of a fresh namespace, and back.
#[test]
fn thousands_of_addresses_are_added_and_removed_in_batches() -> Result<()> {
    let ns = Netns::create("ipvsb")?;
    let ips: Vec<std::net::Ipv4Addr> = (0..3000u32).map(|i| std::net::Ipv4Addr::from(0x0A60_0001 + i)).collect();
    let count =
        |ns: &Netns| -> Result<usize> { Ok(ns.ip(&["-4", "-o", "addr", "show", "dev", "lo"])?.lines().count()) };
    let before = count(&ns)?;
    let batch = ips.clone();
    ns.block_on(move || async move {
        let mut rt = weft_proxy::ipvs::link::RtSocket::connect()?;
        let lo = rt.link_index("lo")?.ok_or_else(|| anyhow::anyhow!("no lo"))?;
        rt.addresses_batch(lo, &batch, true)?;
        // Adding again is a no-op, not an error (a sync after a crash finds them there).
        rt.addresses_batch(lo, &batch, true)?;
        anyhow::Ok(())
    })??;
    assert_eq!(count(&ns)?, before + ips.len());
    ns.block_on(move || async move {
        let mut rt = weft_proxy::ipvs::link::RtSocket::connect()?;
        let lo = rt.link_index("lo")?.ok_or_else(|| anyhow::anyhow!("no lo"))?;
        rt.addresses_batch(lo, &ips, false)?;
        anyhow::Ok(())
    })??;
    assert_eq!(count(&ns)?, before);
    Ok(())
}
