//! IPVS mode in a real kernel: the QEMU kernel lab boots Debian's kernel (the host has no IPVS and no
//! dummy driver) and runs `ipvs_qemu.sh`, the service conformance table in ipvs mode, in one boot.
//! Skipped, loudly, only when QEMU is not installed.

use weft_lab::qemu::{GuestRun, KernelLab};

/// Every check the scenario must report (a check that never ran fails as surely as one that failed).
const CHECKS: &[&str] = &[
    "pod to ClusterIP",
    "pod to a single-endpoint service",
    "pod to ClusterIP across nodes",
    "NodePort from an outside host, on the other node",
    "a pod reaches itself through its own service (hairpin)",
    "NodePort from an outside host",
    "externalIPs from an outside host",
    "load spread over every endpoint (30 connections)",
    "ClientIP affinity",
    "affinity is IPVS persistence with the Service's timeout",
    "UDP",
    "no endpoints: refused at once",
    "a service address on no service port is refused",
    "ClusterIPs are /32 addresses on the NOARP dummy weft-ipvs0",
    "ipsets hold cluster IPs, node ports and hairpin endpoints",
    "a headless service gets no virtual server",
    "IPVS sysctls set in the node's namespace",
    "--ipvs-*-timeout flags",
    "weft services shows virtual and real servers with weights and connections",
    "metrics and healthz",
    "bad input is skipped and every valid service still served",
    "a removed TCP real server goes to weight 0",
    "a removed endpoint gets no new connection",
    "a draining real server is deleted at its deadline",
    "a removed UDP real server is deleted at once",
    "UDP flows to a removed real server are cleared from conntrack",
    "proxy restart: established connections survive",
    "ipvs -> iptables leaves nothing of ipvs mode",
    "iptables -> ipvs leaves nothing of iptables mode",
    "--ipvs-scheduler mh",
];

#[test]
fn ipvs_mode_passes_the_service_table_in_a_real_kernel() {
    if let Some(why) = weft_lab::qemu::unavailable() {
        eprintln!("\n!!!!!!!! SKIPPED ipvs_qemu: {why} !!!!!!!!\n");
        return;
    }
    let lab = KernelLab::build().expect("building the QEMU kernel lab");
    let mut run = GuestRun::new(include_str!("ipvs_qemu.sh"));
    run.files.push((weft_lab::weft_bin(), "/usr/bin/weft".into()));
    let out = lab.boot(&run).unwrap_or_else(|e| panic!("{e:#}"));
    eprintln!("guest {} finished in {:?}", lab.version, out.took);
    let failed: Vec<String> = out
        .checks
        .iter()
        .filter(|c| !c.passed)
        .map(|c| format!("FAIL {}: {}", c.name, c.detail))
        .chain(
            CHECKS
                .iter()
                .filter(|name| !out.checks.iter().any(|c| c.name == **name))
                .map(|name| format!("MISSING {name}")),
        )
        .collect();
    for c in &out.checks {
        eprintln!("{} {}", if c.passed { "pass" } else { "FAIL" }, c.name);
    }
    assert!(failed.is_empty(), "{}\n--- console tail:\n{}", failed.join("\n"), out.tail(120));
}
