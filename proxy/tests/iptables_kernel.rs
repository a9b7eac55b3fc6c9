//! The iptables dataplane against the real kernel, inside namespaces this test creates:
//! client ── node ──┬── server-a
//!                  └── server-b
//! `IptablesDataplane` runs `iptables-restore` inside the node namespace; traffic is checked with socat.

use std::collections::{BTreeSet, HashSet};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use weft_lab::Netns;
use weft_proxy::iptables::{endpoint_chain, service_chains, CommandRunner, Config, IptablesDataplane};
use weft_proxy::{Dataplane, Endpoint, Protocol, ServiceEntry, ServicePort, ServicePortName, ServiceTable};

struct Lab {
    client: Netns,
    node: Netns,
    servers: Vec<Netns>,
    _socats: Vec<ChildGuard>,
}

/// Kills a background server even if the test panics before the namespace guard does.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Wires `ns` to the node with a veth created inside the node namespace: node side `.1`, far side `.2`.
fn wire(node: &Netns, ns: &Netns, node_if: &str, subnet: &str) -> Result<()> {
    node.ip(&["link", "add", node_if, "type", "veth", "peer", "name", "eth0", "netns", ns.name()])?;
    node.ip(&["addr", "add", &format!("{subnet}.1/24"), "dev", node_if])?;
    node.ip(&["link", "set", node_if, "up"])?;
    ns.ip(&["addr", "add", &format!("{subnet}.2/24"), "dev", "eth0"])?;
    ns.ip(&["link", "set", "eth0", "up"])?;
    ns.ip(&["route", "add", "default", "via", &format!("{subnet}.1")])?;
    Ok(())
}

fn lab() -> Result<Lab> {
    let client = Netns::create("pxc")?;
    let node = Netns::create("pxn")?;
    let a = Netns::create("pxa")?;
    let b = Netns::create("pxb")?;
    wire(&node, &client, "vc", "10.244.0")?;
    wire(&node, &a, "va", "10.244.1")?;
    wire(&node, &b, "vb", "10.244.2")?;
    node.sysctl("net.ipv4.ip_forward", "1")?;
    // Without a route to the service network a packet to a VIP with no endpoints would be dropped
    // by routing before the filter table could REJECT it.
    node.ip(&["route", "add", "10.96.0.0/12", "via", "10.244.1.2"])?;
    let mut socats = Vec::new();
    for (ns, name) in [(&a, "server-a"), (&b, "server-b")] {
        let child = ns
            .command("socat")
            .args(["TCP-LISTEN:8080,fork,reuseaddr", &format!("SYSTEM:echo {name}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .context("spawning socat")?;
        socats.push(ChildGuard(child));
    }
    for ip in ["10.244.1.2", "10.244.2.2"] {
        let deadline = Instant::now() + Duration::from_secs(5);
        while fetch(&client, ip, 8080).is_err() {
            if Instant::now() > deadline {
                bail!("server {ip} never answered");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(Lab { client, node, servers: vec![a, b], _socats: socats })
}

/// One TCP connection from `ns`; returns what the server said.
fn fetch(ns: &Netns, ip: &str, port: u16) -> Result<String> {
    let out = ns.exec("socat", &["-u", &format!("TCP:{ip}:{port},connect-timeout=3"), "-"])?;
    Ok(out.trim().to_string())
}

fn spn(name: &str) -> ServicePortName {
    ServicePortName::new("default", name, "http", Protocol::Tcp)
}

fn entry(vip: [u8; 4], backends: &[[u8; 4]]) -> ServiceEntry {
    ServiceEntry {
        port: ServicePort::cluster_ip(vip.into(), 80),
        endpoints: backends.iter().map(|ip| Endpoint::ready((*ip).into(), 8080)).collect(),
    }
}

const A: [u8; 4] = [10, 244, 1, 2];
const B: [u8; 4] = [10, 244, 2, 2];

fn save(node: &Netns) -> Result<String> {
    node.exec("iptables-save", &["-c"])
}

/// `-A <chain> …` lines of one chain in `iptables-save -c` output, counters included.
fn chain_lines<'a>(save: &'a str, chain: &str) -> Vec<&'a str> {
    let tag = format!("-A {chain} ");
    save.lines().filter(|l| l.contains(&tag)).collect()
}

fn dataplane(node: &Netns) -> IptablesDataplane {
    let runner = CommandRunner::with_prefix(["ip", "netns", "exec", node.name()]);
    // Tiny batches, so that a full sync really runs as several restores in dependency order.
    let cfg =
        Config { cluster_cidr: Some("10.244.0.0/16".parse().unwrap()), restore_batch_rules: 4, ..Config::default() };
    IptablesDataplane::new(runner, cfg)
}

#[test]
fn iptables_dataplane_serves_rejects_and_sweeps_in_a_real_kernel() -> Result<()> {
    let lab = lab()?;
    let mut table = ServiceTable::new();
    table.insert(spn("web"), entry([10, 96, 0, 10], &[A, B]));
    table.insert(spn("empty"), entry([10, 96, 0, 11], &[]));
    table.insert(spn("gone"), entry([10, 96, 0, 12], &[A]));
    table.insert(spn("other"), entry([10, 96, 0, 13], &[B]));
    let mut dp = dataplane(&lab.node);
    let stats = dp.sync(&table, None)?;
    assert!(stats.full);

    // The VIP reaches both servers.
    let mut seen = HashSet::new();
    for _ in 0..40 {
        seen.insert(fetch(&lab.client, "10.96.0.10", 80)?);
        if seen.len() == 2 {
            break;
        }
    }
    assert_eq!(seen, HashSet::from(["server-a".to_string(), "server-b".to_string()]));
    assert_eq!(fetch(&lab.client, "10.96.0.13", 80)?, "server-b");

    // No endpoints: refused at once, not a timeout.
    let started = Instant::now();
    let err = fetch(&lab.client, "10.96.0.11", 80).expect_err("a service without endpoints must refuse");
    assert!(started.elapsed() < Duration::from_secs(1), "took {:?}", started.elapsed());
    assert!(format!("{err:#}").contains("refused"), "{err:#}");

    let before = save(&lab.node)?;
    for chain in ["WEFT-SERVICES", "WEFT-POSTROUTING", "WEFT-MARK-MASQ", "WEFT-FORWARD", "WEFT-EXTERNAL-SERVICES"] {
        assert!(before.contains(&format!(":{chain} ")), "{chain} missing:\n{before}");
    }
    let web = service_chains(&spn("web")).svc;
    let gone = service_chains(&spn("gone")).svc;
    let other = service_chains(&spn("other")).svc;
    assert!(before.contains(&format!(":{gone} ")));
    assert!(chain_lines(&before, &other).iter().any(|l| !l.starts_with("[0:0]")), "other's counters moved");

    // Partial: web loses server-b, gone is removed. Only their chains (and the dispatch) are written.
    table.get_mut(&spn("web")).unwrap().endpoints.retain(|e| e.ip == std::net::Ipv4Addr::from(A));
    table.remove(&spn("gone"));
    let changed: BTreeSet<_> = [spn("web"), spn("gone")].into();
    let stats = dp.sync(&table, Some(&changed))?;
    assert!(!stats.full);
    // web's SVC chain, WEFT-SERVICES, and WEFT-HAIRPIN (server-b, without a node name, might be local).
    assert!(stats.chains_written <= 3, "{stats:?}");
    assert!(stats.chains_deleted >= 1, "{stats:?}"); // gone's SVC chain
    let after = save(&lab.node)?;
    assert!(!after.contains(&format!(":{gone} ")), "gone's chain was swept:\n{after}");
    // Services without affinity DNAT from their SVC chain: no endpoint chains at all.
    let web_b = endpoint_chain(&spn("web"), &entry([0; 4], &[B]).endpoints[0]);
    assert!(!before.contains(&format!(":{web_b} ")) && !before.contains(":WEFT-SEP-"), "{before}");
    let b = std::net::Ipv4Addr::from(B);
    assert!(chain_lines(&before, &web).iter().any(|l| l.contains(&format!("--to-destination {b}:"))));
    assert!(!chain_lines(&after, &web).iter().any(|l| l.contains(&format!("--to-destination {b}:"))));
    let hairpin =
        |save: &str| chain_lines(save, "WEFT-HAIRPIN").iter().any(|l| l.contains(&format!("-s {b}/32 -d {b}/32")));
    assert!(hairpin(&before) && hairpin(&after), "server-b still serves `other`");
    // other's chains were not rewritten: their counters survived.
    assert_eq!(chain_lines(&before, &other), chain_lines(&after, &other));
    assert_ne!(chain_lines(&before, &web), chain_lines(&after, &web));
    for _ in 0..10 {
        assert_eq!(fetch(&lab.client, "10.96.0.10", 80)?, "server-a");
    }
    assert!(fetch(&lab.client, "10.96.0.12", 80).is_err(), "gone no longer DNATs");

    // A restarted proxy (fresh dataplane) sweeps what the table no longer claims, found by iptables-save.
    table.remove(&spn("other"));
    let mut restarted = dataplane(&lab.node);
    let stats = restarted.sync(&table, Some(&BTreeSet::new()))?;
    assert!(stats.full, "the first sync of a dataplane is full");
    let swept = save(&lab.node)?;
    assert!(!swept.contains(&format!(":{other} ")), "{swept}");
    assert!(swept.contains(&format!(":{web} ")));
    assert!(!hairpin(&swept), "server-b serves nothing any more: no hairpin rule");
    // Hooks were not added twice.
    assert_eq!(swept.matches("-j WEFT-POSTROUTING").count(), 1, "{swept}");
    assert_eq!(fetch(&lab.client, "10.96.0.10", 80)?, "server-a");
    Ok(())
}

#[test]
fn failed_restore_reports_stderr_and_next_sync_is_full() -> Result<()> {
    let node = Netns::create("pxf")?;
    let mut dp = dataplane(&node);
    let mut table = ServiceTable::new();
    table.insert(spn("web"), entry([10, 96, 0, 10], &[A]));
    dp.sync(&table, None)?;
    // Break the kernel side: a foreign rule referencing one of our chains makes its deletion fail.
    let svc = service_chains(&spn("web")).svc;
    node.exec("iptables", &["-t", "nat", "-N", "FOREIGN"])?;
    node.exec("iptables", &["-t", "nat", "-A", "FOREIGN", "-j", &svc])?;
    table.remove(&spn("web"));
    let err = dp.sync(&table, Some(&[spn("web")].into())).expect_err("deleting a referenced chain fails");
    let msg = format!("{:#}", anyhow::Error::from(err));
    // The error carries iptables-restore's own words, naming the chain it could not delete.
    assert!(msg.contains("iptables-restore") && msg.contains(&svc), "{msg}");
    assert!(dp.state().is_none(), "a failure forgets the state so the next sync is full");
    node.exec("iptables", &["-t", "nat", "-F", "FOREIGN"])?;
    let stats = dp.sync(&table, Some(&BTreeSet::new()))?;
    assert!(stats.full);
    assert!(!node.exec("iptables-save", &[])?.contains(&svc));
    Ok(())
}

/// One UDP datagram from a fixed source port (so it belongs to the same conntrack flow each time).
fn udp_ask(ns: &Netns, ip: &str, port: u16) -> Result<String> {
    let out = ns.sh(&format!("echo ask | socat -t 2 -T 2 - UDP:{ip}:{port},sourceport=40000,reuseaddr"))?;
    Ok(out.trim().to_string())
}

/// Asks until some server answers (a datagram can go unanswered on a loaded machine), within 10 s.
fn udp_answer(ns: &Netns, ip: &str, port: u16) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let answer = udp_ask(ns, ip, port)?;
        if !answer.is_empty() || Instant::now() > deadline {
            return Ok(answer);
        }
    }
}

#[test]
fn removed_udp_endpoint_gets_no_more_datagrams_of_an_existing_flow() -> Result<()> {
    let lab = lab()?;
    let mut udp_servers = Vec::new();
    for (ns, name) in [(&lab.servers[0], "server-a"), (&lab.servers[1], "server-b")] {
        let child = ns
            .command("socat")
            .args(["UDP-RECVFROM:5353,fork,reuseaddr", &format!("SYSTEM:echo {name}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .context("spawning socat")?;
        udp_servers.push(ChildGuard(child));
    }
    let dns = ServicePortName::new("kube-system", "dns", "dns", Protocol::Udp);
    let with = |ip: [u8; 4]| {
        let mut e = entry([10, 96, 0, 53], &[ip]);
        e.port.port = 53;
        e.endpoints[0].port = 5353;
        ServiceTable::from([(dns.clone(), e)])
    };
    let mut dp = dataplane(&lab.node);
    dp.sync(&with(A), None)?;
    // The first answer also tells us the UDP server is up (datagrams before that are lost).
    assert_eq!(udp_answer(&lab.client, "10.96.0.53", 53)?, "server-a");
    assert_eq!(udp_answer(&lab.client, "10.96.0.53", 53)?, "server-a");
    // server-a leaves the service (it keeps running): the flow must move, not keep its old DNAT.
    dp.sync(&with(B), Some(&[dns.clone()].into()))?;
    assert_eq!(udp_answer(&lab.client, "10.96.0.53", 53)?, "server-b");
    Ok(())
}

#[test]
fn quoted_comments_reach_the_kernel_as_one_argument() -> Result<()> {
    use weft_proxy::restore::{comment, restore, save};
    let node = Netns::create("pxq")?;
    let mut runner = CommandRunner::with_prefix(["ip", "netns", "exec", node.name()]);
    let hostile = "a\" -j ACCEPT\n-A INPUT -j DROP # it's \\ café\0";
    let input = format!("*filter\n:WEFT-QUOTE - [0:0]\n-A WEFT-QUOTE {} -j RETURN\nCOMMIT\n", comment(hostile));
    restore(&mut runner, input.as_bytes())?;
    let saved = save(&mut runner)?;
    let rules: Vec<&str> = saved.lines().filter(|l| l.starts_with("-A ")).collect();
    assert_eq!(rules.len(), 1, "one rule, nothing injected:\n{saved}");
    assert!(rules[0].contains("-A INPUT -j DROP # it") && rules[0].ends_with("-j RETURN"), "{}", rules[0]);
    Ok(())
}

#[test]
fn a_table_is_checked_with_iptables_restore_test_and_nothing_is_committed() -> Result<()> {
    use weft_proxy::restore::{save, test_restore};
    let node = Netns::create("pxt")?;
    let mut dp = dataplane(&node);
    let mut table = ServiceTable::new();
    table.insert(spn("web"), entry([10, 96, 0, 10], &[A, B]));
    dp.check(&table)?;
    let mut runner = CommandRunner::with_prefix(["ip", "netns", "exec", node.name()]);
    assert!(!save(&mut runner)?.contains("WEFT-"), "a check commits nothing");
    // What the kernel tool refuses is an error naming the line, and still nothing is committed.
    let bad = "*nat\n:WEFT-BAD - [0:0]\n-A WEFT-BAD --no-such-option -j RETURN\nCOMMIT\n";
    let err = test_restore(&mut runner, bad.as_bytes()).unwrap_err();
    assert!(err.to_string().contains("iptables-restore"), "{err}");
    assert!(!save(&mut runner)?.contains("WEFT-"));
    Ok(())
}
