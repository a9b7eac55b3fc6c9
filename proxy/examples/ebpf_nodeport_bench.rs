//! NodePort throughput, eBPF mode beside iptables mode (issue 12): a 2-node lab (vxlan), an iperf3 server
//! in a pod on node-2, a NodePort service for it; `iperf3 -c <node-1>:<nodePort>` from the fabric (an
//! outside host) goes through node-1 to the remote backend — the tc programs (DNAT + SNAT + redirect into
//! flannel.1) in eBPF mode, kube-proxy-style rules in iptables mode. The proxy on node-1 switches mode
//! between rounds (BENCH_ROUNDS, 3, of BENCH_SECS, 5; the modes swap who runs first every round; a round in
//! which iperf3 failed or a rate collapsed is rejected, `weft_lab::rounds`). Prints markdown.

#[path = "common/mod.rs"]
mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use common::{env_or, median, spread};
use weft_lab::bpf::{Bpffs, Cgroup};
use weft_lab::lab::{Lab, LabOptions};
use weft_lab::rounds::{self, Sample};

fn gbps(json: &str) -> Result<f64> {
    let v: serde_json::Value = serde_json::from_str(json).context("iperf3 -J output")?;
    if let Some(e) = v.get("error") {
        bail!("iperf3: {e}");
    }
    v.pointer("/end/sum_received/bits_per_second").and_then(|b| b.as_f64()).map(|b| b / 1e9).context("no rate")
}

/// Our own iperf3 server, killed by pid when dropped.
struct Srv(std::process::Child);

impl Drop for Srv {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn main() -> Result<()> {
    let rounds: usize = env_or("BENCH_ROUNDS", 3);
    let secs: u64 = env_or("BENCH_SECS", 5);
    // NAT into VXLAN with TX checksum offload on corrupts bulk (GSO) traffic on this kernel (BENCHMARKS
    // section 1): both modes NAT here, so the overlay runs with the workaround.
    let opts =
        LabOptions { nodes: 2, agent_args: vec!["--vxlan-tx-checksum-offload=off".into()], ..LabOptions::default() };
    let mut lab = Lab::up(opts, &mut |_| {})?;
    let server = lab.add_pod(2, "iperf")?;
    let yaml = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: iperf}}\nspec:\n  type: NodePort\n  clusterIP: 10.96.100.50\n  ports: [{{name: t, port: 5201, targetPort: 5201, nodePort: 30201}}]\n---\napiVersion: v1\nkind: Endpoints\nmetadata: {{name: iperf}}\nsubsets: [{{addresses: [{{ip: \"{}\", nodeName: node-2}}], ports: [{{name: t, port: 5201}}]}}]\n",
        server.ip()
    );
    lab.weft(&["apply", "-f", "-"], Some(&yaml))?;
    let cgroup = Cgroup::create("np-bench")?;
    let bpffs = Bpffs::mount()?;
    let pin_base = bpffs.path().join("weft").display().to_string();
    let ebpf_args: Vec<String> = [
        "--cgroup-path",
        &cgroup.path().display().to_string(),
        "--bpf-pin-dir",
        &pin_base,
        "--nodeport-interface",
        "eth0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let ipt_args: Vec<String> = vec!["--bpf-pin-dir".into(), pin_base.clone()];

    let run = |lab: &mut Lab, mode: &str, args: &[String]| -> Result<f64> {
        lab.stop_proxy(1)?;
        lab.start_proxy(1, mode, args)?;
        // A fresh server per mode: a test cut by the switch would leave the old one "busy" for minutes.
        let mut srv = Srv(server
            .ns()
            .command("iperf3")
            .arg("-s")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?);
        let _ = &mut srv;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = lab
                .fabric()
                .command("iperf3")
                .args(["-c", "192.168.56.11", "-p", "30201", "-t", "1", "-J"])
                .output()?;
            let got = gbps(&String::from_utf8_lossy(&out.stdout));
            if got.is_ok() {
                break;
            }
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(lab.node(1).proxy_log_path()).unwrap_or_default();
                bail!("{mode}: node port 30201 not served within 30 s: {got:?}\n{log}");
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        let out = lab
            .fabric()
            .command("iperf3")
            .args(["-c", "192.168.56.11", "-p", "30201", "-t", &secs.to_string(), "-J"])
            .output()?;
        gbps(&String::from_utf8_lossy(&out.stdout))
    };
    lab.start_proxy(2, "iptables", &[])?;
    lab.start_proxy(1, "iptables", &ipt_args)?;
    // samples[0] = ebpf, samples[1] = iptables; an iperf3 that failed is a rejected round (`weft_lab::rounds`).
    let mut samples: [Vec<Sample>; 2] = [vec![], vec![]];
    let mut failures = vec![];
    for r in 0..rounds {
        // The two modes swap who runs first every round.
        for k in rounds::order(r, 2) {
            let (mode, args) = if k == 0 { ("ebpf", &ebpf_args) } else { ("iptables", &ipt_args) };
            let got = run(&mut lab, mode, args)
                .map_err(|e| {
                    failures.push(format!("round {} {mode}: {}", r + 1, format!("{e:#}").lines().next().unwrap_or("")))
                })
                .ok();
            eprintln!("round {}: {mode} {got:?} Gbit/s", r + 1);
            samples[k].push(got.map_or_else(Sample::failed, |g| Sample::new(g, 0)));
        }
    }
    let valid = rounds::valid_rounds(&[("ebpf", &samples[0]), ("iptables", &samples[1])]);
    let (ebpf, ipt) = (rounds::valid_rates(&samples[0], &valid), rounds::valid_rates(&samples[1], &valid));
    let ratio: Vec<f64> = ebpf.iter().zip(&ipt).map(|(e, i)| e / i).collect();
    let show = |v: &Vec<f64>| {
        if v.is_empty() {
            "no valid round".to_string()
        } else {
            format!("{:.3} ({}; {} of {rounds} rounds)", median(v.clone()), spread(v), v.len())
        }
    };
    println!("## eBPF mode: NodePort throughput to a remote backend (iperf3 from the fabric, 1 TCP stream, {rounds} alternating rounds x {secs}s)\n");
    println!("| node-1 mode | Gbit/s (median; min–max) |");
    println!("|---|---|");
    println!("| ebpf (tc: DNAT + SNAT + redirect into flannel.1) | {} |", show(&ebpf));
    println!("| iptables | {} |", show(&ipt));
    println!("\nebpf / iptables (median of valid rounds): {}; {}", show(&ratio), rounds::summary(&valid));
    for f in &failures {
        println!("\n- failed: {f}");
    }
    lab.stop_proxy(1)?;
    lab.stop_proxy(2)?;
    drop(lab);
    Ok(())
}
