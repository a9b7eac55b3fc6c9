//! The overlay end to end: real etcd in the lab's fabric, real `weft agent` processes in node
//! namespaces, pods wired by weft-cni, checked with ping, socat, ip, iptables-save and etcdctl.

use std::time::{Duration, Instant};

use serde_json::Value;
use weft_lab::lab::{Lab, LabOptions};

const PREFIX: &str = "/coreos.com/network";

fn lab(nodes: usize, backend: &str, agent_args: &[&str]) -> Lab {
    let opts = LabOptions {
        nodes,
        backend: backend.into(),
        agent_args: agent_args.iter().map(|s| s.to_string()).collect(),
        ..LabOptions::default()
    };
    Lab::up(opts, &mut |_| {}).expect("lab comes up")
}

/// `etcdctl` run inside the fabric namespace against the lab's etcd: the real client.
fn etcdctl(lab: &Lab, args: &[&str]) -> String {
    let mut all = vec!["--endpoints", "http://127.0.0.1:2379"];
    all.extend_from_slice(args);
    lab.fabric().exec("etcdctl", &all).expect("etcdctl")
}

/// The FLANNEL_SUBNET's network, e.g. 10.244.3.0/24, from the node's subnet file.
fn subnet(lab: &Lab, node: usize) -> String {
    let env = std::fs::read_to_string(lab.node(node).subnet_env_path()).expect("subnet file");
    let line = env.lines().find_map(|l| l.strip_prefix("FLANNEL_SUBNET=")).expect("FLANNEL_SUBNET");
    let net: ipnetwork::Ipv4Network = line.parse().expect("FLANNEL_SUBNET parses");
    format!("{}/{}", net.network(), net.prefix())
}

fn routes_on(lab: &Lab, node: usize, dev: &str) -> String {
    lab.node(node).ns().ip(&["route", "show", "dev", dev]).unwrap_or_default()
}

fn weft_json(lab: &Lab, node: usize, args: &[&str]) -> Value {
    let n = lab.node(node);
    let sf = n.subnet_env_path();
    let mut cmd = n.ns().command(weft_lab::weft_bin());
    cmd.args(args).args(["-o", "json", "--etcd-endpoints", lab.etcd_endpoint()]);
    if args[0] == "routes" {
        cmd.arg("--subnet-file").arg(&sf);
    }
    let out = weft_lab::netns::run(&mut cmd).expect("weft command");
    serde_json::from_slice(&out.stdout).expect("json output")
}

fn wait(lab: &Lab, secs: u64, what: &str, cond: impl FnMut() -> bool) {
    lab.wait_until(Duration::from_secs(secs), what, cond).unwrap_or_else(|e| panic!("{e:#}"));
}

fn ping(from: &weft_lab::lab::Pod, to: &str) -> bool {
    from.ns().exec("ping", &["-c", "1", "-W", "2", to]).is_ok()
}

fn put_fake_lease(lab: &Lab, subnet_key: &str, public_ip: &str, mac: &str) {
    let v = format!(
        r#"{{"PublicIP":"{public_ip}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}}}"#
    );
    etcdctl(lab, &["put", &format!("{PREFIX}/subnets/{subnet_key}"), &v]);
}

#[test]
fn pods_ping_and_connect_across_nodes() {
    let lab = lab(3, "vxlan", &[]);
    let pods: Vec<_> = (1..=3).map(|i| lab.add_pod(i, &format!("p{i}")).expect("pod")).collect();
    // Every node's subnet is distinct and each pod's address is inside its node's subnet.
    let subnets: Vec<String> = (1..=3).map(|i| subnet(&lab, i)).collect();
    assert_eq!(subnets.iter().collect::<std::collections::BTreeSet<_>>().len(), 3, "{subnets:?}");
    for (i, p) in pods.iter().enumerate() {
        let net: ipnetwork::Ipv4Network = subnets[i].parse().unwrap();
        assert!(net.contains(p.ip()), "pod {} has {} outside {}", p.name(), p.ip(), net);
    }
    wait(&lab, 20, "routes to both other nodes on node-1", || {
        let r = routes_on(&lab, 1, "flannel.1");
        subnets[1..].iter().all(|s| r.contains(&format!("{s} via {} onlink", &s[..s.len() - 3])))
    });
    for a in &pods {
        for b in &pods {
            if a.name() != b.name() {
                let target = b.ip().to_string();
                wait(&lab, 20, &format!("{} pings {}", a.name(), b.name()), || ping(a, &target));
            }
        }
    }
    // A TCP connection across the overlay.
    let mut server = pods[2]
        .ns()
        .command("socat")
        .args(["TCP-LISTEN:7000,reuseaddr,fork", "SYSTEM:echo hello-from-node-3"])
        .spawn()
        .unwrap();
    let target = format!("TCP:{}:7000,connect-timeout=2", pods[2].ip());
    let mut got = String::new();
    wait(&lab, 10, "TCP through the overlay", || {
        got = pods[0].ns().exec("socat", &["-T2", "-", &target]).unwrap_or_default();
        got.contains("hello-from-node-3")
    });
    let _ = server.kill();
    let _ = server.wait();
    // The kernel holds flannel's three objects per remote node.
    let neigh = lab.node(1).ns().ip(&["neigh", "show", "dev", "flannel.1", "nud", "permanent"]).unwrap();
    let fdb = lab.node(1).ns().exec("bridge", &["fdb", "show", "dev", "flannel.1"]).unwrap();
    for i in [2, 3] {
        let vtep_ip = subnets[i - 1].trim_end_matches("/24");
        assert!(neigh.contains(vtep_ip), "neighbour for {vtep_ip} in {neigh}");
        assert!(fdb.contains(&format!("dst {}", lab.node(i).ip())), "fdb to node-{i} in {fdb}");
    }
    // And `weft routes` says so, for people and for scripts.
    let report = weft_json(&lab, 1, &["routes"]);
    let remotes = report["remotes"].as_array().expect("remotes");
    assert_eq!(remotes.len(), 2, "{report}");
    for r in remotes {
        assert_eq!(
            (r["route"].as_bool(), r["neigh"].as_bool(), r["fdb"].as_bool()),
            (Some(true), Some(true), Some(true))
        );
    }
    assert_eq!(report["local"]["subnet"], subnets[0]);
    let leases = weft_json(&lab, 2, &["leases"]);
    assert_eq!(leases["leases"].as_array().map(Vec::len), Some(3), "{leases}");
}

/// `weft routes -o json` in node `node`'s namespace with no etcd endpoint and a subnet file that does not exist, so
/// only the local agent can answer; `extra` adds flags. Returns (success, stdout, stderr).
fn bare_routes(lab: &Lab, node: usize, extra: &[&str]) -> (bool, String, String) {
    let out = lab
        .node(node)
        .ns()
        .command(weft_lab::weft_bin())
        .args(["routes", "-o", "json"])
        .args(extra)
        .env_remove("WEFT_ETCD_ENDPOINTS")
        .env_remove("WEFT_AGENT_ADDRESS")
        .env("WEFT_SUBNET_FILE", lab.dir().join("no-such-subnet.env"))
        .output()
        .expect("weft runs");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

#[test]
fn routes_without_flags_asks_the_local_agent_and_the_flags_work_when_it_is_down() {
    let mut lab = lab(2, "vxlan", &[]);
    let (s1, s2) = (subnet(&lab, 1), subnet(&lab, 2));
    wait(&lab, 20, "route to node-2", || routes_on(&lab, 1, "flannel.1").contains(&s2));
    let (ok, out, err) = bare_routes(&lab, 1, &[]);
    assert!(ok, "weft routes failed: {err}");
    let report: Value = serde_json::from_str(&out).expect("json output");
    assert_eq!(report["source"], "agent 127.0.0.1:8285", "{report}");
    assert_eq!(report["local"]["subnet"], s1);
    assert_eq!(report["local"]["device"], "flannel.1");
    assert_eq!(report["programmed"], serde_json::json!([1, 1, 1]), "one route, neighbour and FDB entry to node-2");
    let remotes = report["remotes"].as_array().expect("remotes");
    assert_eq!(remotes.len(), 1, "{report}");
    assert_eq!(remotes[0]["subnet"], s2);
    assert_eq!((remotes[0]["route"].as_bool(), remotes[0]["fdb"].as_bool()), (Some(true), Some(true)));

    // The agent stops (its routes stay): without flags there is nothing to ask, and the error says which flags help.
    lab.stop_agent(1).expect("agent stops");
    let (ok, _, err) = bare_routes(&lab, 1, &[]);
    assert!(!ok, "weft routes succeeded with neither an agent nor a subnet file");
    assert!(err.contains("no answer from the agent") && err.contains("--subnet-file"), "{err}");
    let sf = lab.node(1).subnet_env_path();
    let flags = ["--subnet-file", sf.to_str().expect("utf-8 path"), "--etcd-endpoints", lab.etcd_endpoint()];
    let (ok, out, err) = bare_routes(&lab, 1, &flags);
    assert!(ok, "weft routes with flags failed: {err}");
    let report: Value = serde_json::from_str(&out).expect("json output");
    assert_eq!((report["source"].as_str(), report["local"]["subnet"].as_str()), (Some("etcd"), Some(s1.as_str())));
    assert_eq!(report["remotes"][0]["route"], true, "{report}");
}

#[test]
fn deleted_lease_removes_routes_on_the_others_and_stopping_keeps_them() {
    let mut lab = lab(3, "vxlan", &[]);
    let s3 = subnet(&lab, 3);
    let p1 = lab.add_pod(1, "a").unwrap();
    let p3 = lab.add_pod(3, "c").unwrap();
    let t1 = p1.ip().to_string();
    wait(&lab, 20, "node-3 pod reaches node-1 pod", || ping(&p3, &t1));
    // Stopping node-3's agent leaves its routes: traffic keeps flowing.
    lab.stop_agent(3).unwrap();
    assert!(ping(&p3, &t1), "traffic keeps flowing after the agent stopped");
    // node-3 vanishes: its lease is deleted and the others drop their routes to it quickly.
    let key = format!("{PREFIX}/subnets/{}", s3.replace('/', "-"));
    let t0 = Instant::now();
    etcdctl(&lab, &["del", &key]);
    wait(&lab, 2, "node-1 and node-2 drop node-3's route", || {
        !routes_on(&lab, 1, "flannel.1").contains(&s3) && !routes_on(&lab, 2, "flannel.1").contains(&s3)
    });
    eprintln!("routes gone after {:?}", t0.elapsed());
    let neigh = lab.node(1).ns().ip(&["neigh", "show", "dev", "flannel.1"]).unwrap();
    assert!(!neigh.contains(s3.trim_end_matches("/24")), "neighbour removed too: {neigh}");
}

#[test]
fn restarted_agent_keeps_its_subnet_and_drops_no_packets() {
    let mut lab = lab(2, "vxlan", &[]);
    let before = subnet(&lab, 2);
    let p1 = lab.add_pod(1, "a").unwrap();
    let p2 = lab.add_pod(2, "b").unwrap();
    let t2 = p2.ip().to_string();
    wait(&lab, 20, "pods reach each other", || ping(&p1, &t2));
    // 150 pings at 20 ms while node-2's agent is restarted in the middle.
    let mut pinger = p1
        .ns()
        .command("ping")
        .args(["-c", "150", "-i", "0.02", "-W", "1", &t2])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Restart only once replies are flowing (the first reply line), not after a guessed delay.
    let mut lines = std::io::BufReader::new(pinger.stdout.take().unwrap());
    let mut text = String::new();
    while !text.contains("bytes from") {
        let mut line = String::new();
        if std::io::BufRead::read_line(&mut lines, &mut line).unwrap() == 0 {
            panic!("ping ended before any reply: {text}");
        }
        text.push_str(&line);
    }
    lab.stop_agent(2).unwrap();
    lab.start_agent(2, &[]).unwrap();
    std::io::Read::read_to_string(&mut lines, &mut text).unwrap();
    pinger.wait().unwrap();
    assert!(text.contains(" 0% packet loss"), "packets lost across the restart: {text}");
    // The restarted agent is ready (it holds its lease and has synced) before its lease is checked.
    wait(&lab, 20, "the restarted agent's /healthz", || {
        lab.node(2).ns().exec("curl", &["-s", "-f", "http://127.0.0.1:8285/healthz"]).is_ok_and(|h| h.trim() == "ok")
    });
    assert_eq!(subnet(&lab, 2), before, "the restarted agent keeps its subnet");
    let leases = weft_json(&lab, 1, &["leases"]);
    assert_eq!(leases["leases"].as_array().map(Vec::len), Some(2), "no second lease: {leases}");
}

#[test]
fn route_deleted_by_hand_and_device_deleted_are_restored() {
    let lab = lab(2, "vxlan", &["--resync", "1"]);
    let s2 = subnet(&lab, 2);
    wait(&lab, 20, "route to node-2", || routes_on(&lab, 1, "flannel.1").contains(&s2));
    lab.node(1).ns().ip(&["route", "del", &s2]).unwrap();
    assert!(!routes_on(&lab, 1, "flannel.1").contains(&s2));
    wait(&lab, 15, "the resync restores the deleted route", || routes_on(&lab, 1, "flannel.1").contains(&s2));
    lab.node(1).ns().ip(&["link", "del", "flannel.1"]).unwrap();
    wait(&lab, 15, "the device and its route come back", || routes_on(&lab, 1, "flannel.1").contains(&s2));
    let p1 = lab.add_pod(1, "a").unwrap();
    let p2 = lab.add_pod(2, "b").unwrap();
    let t2 = p2.ip().to_string();
    wait(&lab, 20, "traffic flows over the re-created device", || ping(&p1, &t2));
}

#[test]
fn garbage_in_etcd_is_skipped_and_valid_leases_served() {
    let mut lab = lab(2, "vxlan", &[]);
    etcdctl(&lab, &["put", &format!("{PREFIX}/subnets/10.244.77.0-24"), "{this is not json"]);
    etcdctl(&lab, &["put", &format!("{PREFIX}/subnets/not-a-subnet"), "{}"]);
    put_fake_lease(&lab, "10.99.0.0-24", "192.168.56.99", "0e:00:00:00:00:99"); // outside the network
    put_fake_lease(&lab, "10.244.88.0-24", "192.168.56.88", "0e:00:00:00:00:88"); // valid
    wait(&lab, 10, "the valid fake lease is routed", || routes_on(&lab, 1, "flannel.1").contains("10.244.88.0/24"));
    let r = routes_on(&lab, 1, "flannel.1");
    assert!(!r.contains("10.244.77.0") && !r.contains("10.99.0.0"), "malformed leases routed: {r}");
    assert!(lab.agent_running(1), "the agent survives garbage");
    let log = std::fs::read_to_string(lab.node(1).dir().join("agent.log")).unwrap_or_default();
    assert!(log.contains("10.244.77.0-24"), "a warning names the bad key: {log}");
    let leases = weft_json(&lab, 1, &["leases"]);
    let skipped: Vec<String> =
        leases["skipped"].as_array().unwrap().iter().map(|s| s["key"].as_str().unwrap_or("").to_string()).collect();
    assert!(skipped.iter().any(|k| k.ends_with("10.244.77.0-24")), "{skipped:?}");
}

#[test]
fn agent_keeps_its_routes_through_an_etcd_outage_logs_it_once_and_catches_up() {
    let mut lab = lab(2, "vxlan", &[]);
    let s2 = subnet(&lab, 2);
    wait(&lab, 20, "route to node-2", || routes_on(&lab, 1, "flannel.1").contains(&s2));
    lab.stop_etcd().unwrap();
    // Once the agent has noticed the outage (its log says so), its routes must still be there.
    let outage_logged = |lab: &Lab| {
        std::fs::read_to_string(lab.node(1).agent_log_path())
            .unwrap_or_default()
            .contains("keeping the last known state")
    };
    wait(&lab, 30, "node-1's agent to notice etcd is away", || outage_logged(&lab));
    assert!(routes_on(&lab, 1, "flannel.1").contains(&s2), "routes stay while etcd is away");
    assert!(lab.agent_running(1) && lab.agent_running(2));
    // Not synchronisation: the outage lasts a few retry periods, so the one-line-per-state check below means
    // something.
    std::thread::sleep(Duration::from_secs(3));
    assert!(routes_on(&lab, 1, "flannel.1").contains(&s2), "routes stay through the retries");
    lab.start_etcd().unwrap();
    put_fake_lease(&lab, "10.244.99.0-24", "192.168.56.99", "0e:00:00:00:00:99");
    wait(&lab, 30, "the agent catches up after etcd returns", || {
        routes_on(&lab, 1, "flannel.1").contains("10.244.99.0/24")
    });
    // The outage is logged once per change of state, not once per retry.
    let log = std::fs::read_to_string(lab.node(1).agent_log_path()).unwrap_or_default();
    eprintln!("{log}");
    let outage_lines = log.lines().filter(|l| l.contains("keeping the last known state")).count();
    assert!((1..=3).contains(&outage_lines), "{outage_lines} outage lines:\n{log}");
    assert!(log.contains("recovered"), "{log}");
}

#[test]
fn agents_started_at_the_same_instant_get_different_subnets() {
    let opts = LabOptions { nodes: 4, start_agents: false, ..LabOptions::default() };
    let mut lab = Lab::up(opts, &mut |_| {}).unwrap();
    for i in 1..=4 {
        lab.start_agent(i, &[]).unwrap();
    }
    wait(&lab, 30, "all four subnet files", || (1..=4).all(|i| lab.node(i).subnet_env_path().exists()));
    let subnets: std::collections::BTreeSet<String> = (1..=4).map(|i| subnet(&lab, i)).collect();
    assert_eq!(subnets.len(), 4, "{subnets:?}");
}

#[test]
fn missing_config_is_reported_then_picked_up() {
    let opts = LabOptions { nodes: 1, start_agents: false, ..LabOptions::default() };
    let mut lab = Lab::up(opts, &mut |_| {}).unwrap();
    let saved = etcdctl(&lab, &["get", "--print-value-only", &format!("{PREFIX}/config")]);
    etcdctl(&lab, &["del", &format!("{PREFIX}/config")]);
    lab.start_agent(1, &[]).unwrap();
    let log_path = lab.node(1).dir().join("agent.log");
    wait(&lab, 15, "a log line naming the missing key", || {
        std::fs::read_to_string(&log_path).unwrap_or_default().contains("/coreos.com/network/config")
    });
    assert!(lab.agent_running(1), "a missing config is not fatal");
    etcdctl(&lab, &["put", &format!("{PREFIX}/config"), saved.trim()]);
    wait(&lab, 15, "the agent leases a subnet once the config exists", || lab.node(1).subnet_env_path().exists());
}

#[test]
fn host_gw_backend_routes_via_public_ips() {
    let lab = lab(2, "host-gw", &[]);
    let s2 = subnet(&lab, 2);
    wait(&lab, 20, "host-gw route", || {
        lab.node(1).ns().ip(&["route", "show", &s2]).unwrap_or_default().contains(&format!("via {}", lab.node(2).ip()))
    });
    assert!(lab.node(1).ns().ip(&["link", "show", "flannel.1"]).is_err(), "no VXLAN device in host-gw mode");
    let p1 = lab.add_pod(1, "a").unwrap();
    let p2 = lab.add_pod(2, "b").unwrap();
    let t2 = p2.ip().to_string();
    wait(&lab, 20, "pods reach each other over host-gw", || ping(&p1, &t2));
}

#[test]
fn ip_masq_rules_hide_pods_from_the_outside_and_come_back() {
    let lab = lab(1, "vxlan", &["--ip-masq", "--iptables-resync", "1"]);
    let p = lab.add_pod(1, "a").unwrap();
    // The fabric has no route to the pod network: only a masqueraded ping gets its reply.
    wait(&lab, 20, "a pod reaches the fabric through masquerade", || ping(&p, "192.168.56.10"));
    let saved = lab.node(1).ns().exec("iptables-save", &["-t", "nat"]).unwrap();
    assert!(saved.contains("-A POSTROUTING -m comment --comment \"weft masq\" -j WEFT-POSTRTG"), "{saved}");
    assert!(saved.contains("-j MASQUERADE --random-fully"), "{saved}");
    let env = std::fs::read_to_string(lab.node(1).subnet_env_path()).unwrap();
    assert!(env.contains("FLANNEL_IPMASQ=true"), "{env}");
    lab.node(1).ns().exec("iptables", &["-t", "nat", "-F", "WEFT-POSTRTG"]).unwrap();
    wait(&lab, 15, "the rules are restored", || {
        lab.node(1).ns().exec("iptables-save", &["-t", "nat"]).unwrap_or_default().contains("MASQUERADE --random-fully")
    });
}

#[test]
fn network_config_cli_writes_valid_configs_and_refuses_bad_ones() {
    let opts = LabOptions { nodes: 1, start_agents: false, ..LabOptions::default() };
    let lab = Lab::up(opts, &mut |_| {}).unwrap();
    let weft = |args: &[&str]| {
        lab.node(1)
            .ns()
            .command(weft_lab::weft_bin())
            .args(args)
            .args(["--etcd-endpoints", lab.etcd_endpoint()])
            .output()
            .unwrap()
    };
    let out =
        weft(&["network", "config", "set", "--network", "10.250.0.0/16", "--subnet-len", "26", "--backend", "host-gw"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stored: Value =
        serde_json::from_str(&etcdctl(&lab, &["get", "--print-value-only", &format!("{PREFIX}/config")])).unwrap();
    assert_eq!(stored["Network"], "10.250.0.0/16");
    assert_eq!(stored["SubnetLen"], 26);
    assert_eq!(stored["Backend"]["Type"], "host-gw");
    let got = weft(&["network", "config", "get", "-o", "json"]);
    let got: Value = serde_json::from_slice(&got.stdout).unwrap();
    assert_eq!(got["Network"], "10.250.0.0/16");
    // Invalid input names what is wrong and writes nothing.
    for (bad, key) in [(["--network", "10.250.0.0/33"], "Network"), (["--network", "banana"], "Network")] {
        let out = weft(&[&["network", "config", "set"][..], &bad[..]].concat());
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(key), "error should name {key}: {err}");
    }
    let out = weft(&["network", "config", "set", "--network", "10.250.0.0/16", "--subnet-len", "8"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("SubnetLen"));
    let after: Value =
        serde_json::from_str(&etcdctl(&lab, &["get", "--print-value-only", &format!("{PREFIX}/config")])).unwrap();
    assert_eq!(after, stored, "a refused config must not be written");
}

#[test]
fn lease_is_renewed_before_it_expires_and_healthz_answers() {
    // A 5 s TTL (hidden flag) with the default 60 min margin: renewals every 2.5 s.
    let lab = lab(1, "vxlan", &["--subnet-lease-ttl", "5"]);
    let key = format!("{PREFIX}/subnets/{}", subnet(&lab, 1).replace('/', "-"));
    let lease_id = |lab: &Lab| -> Option<i64> {
        let v: Value = serde_json::from_str(&etcdctl(lab, &["get", &key, "-w", "json"])).ok()?;
        v["kvs"][0]["lease"].as_i64()
    };
    let first = lease_id(&lab).expect("the key is bound to an etcd lease");
    // Polled, not slept: the key moves to a fresh etcd lease at a renewal, and is never absent meanwhile.
    wait(&lab, 30, "the renewal to move the key to a fresh etcd lease", || {
        let later = lease_id(&lab).expect("the key outlived its first TTL");
        later != first
    });
    let health = lab.node(1).ns().exec("curl", &["-s", "-f", "http://127.0.0.1:8285/healthz"]).unwrap();
    assert_eq!(health.trim(), "ok");
}

#[test]
fn own_lease_deleted_while_running_is_taken_again() {
    let lab = lab(2, "vxlan", &[]);
    let s1 = subnet(&lab, 1);
    let key = format!("{PREFIX}/subnets/{}", s1.replace('/', "-"));
    etcdctl(&lab, &["del", &key]);
    wait(&lab, 10, "node-1 writes its lease again", || {
        etcdctl(&lab, &["get", &key, "--print-value-only"]).contains("192.168.56.11")
    });
    assert_eq!(subnet(&lab, 1), s1, "the same subnet is taken back");
    wait(&lab, 10, "node-2 routes to node-1 again", || routes_on(&lab, 2, "flannel.1").contains(&s1));
}

#[test]
fn an_interface_without_ipv4_is_a_clear_error() {
    let ns = weft_lab::Netns::create("noip").unwrap();
    ns.ip(&["link", "add", "eth9", "type", "veth", "peer", "name", "eth9p"]).unwrap();
    ns.ip(&["link", "set", "eth9", "up"]).unwrap();
    let out =
        ns.command(weft_lab::weft_bin()).args(["agent", "--iface", "eth9", "--healthz-addr", ""]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("eth9 has no IPv4 address"), "{err}");
}

#[test]
fn vxlan_checksum_offload_follows_the_flag() {
    // This kernel has the fix, and public IP == interface IP: `auto` keeps offload; `off` removes it.
    let mut lab = lab(2, "vxlan", &[]);
    let csum = |lab: &Lab, node: usize| {
        let out = lab.node(node).ns().exec("ethtool", &["-k", "flannel.1"]).unwrap_or_default();
        out.lines().find(|l| l.trim_start().starts_with("tx-checksum-ip-generic:")).unwrap_or("").trim().to_string()
    };
    assert_eq!(csum(&lab, 1), "tx-checksum-ip-generic: on");
    lab.stop_agent(2).unwrap();
    lab.start_agent(2, &["--vxlan-tx-checksum-offload".into(), "off".into()]).unwrap();
    wait(&lab, 15, "node-2 turns offload off", || csum(&lab, 2) == "tx-checksum-ip-generic: off");
    let p1 = lab.add_pod(1, "a").unwrap();
    let p2 = lab.add_pod(2, "b").unwrap();
    let t2 = p2.ip().to_string();
    wait(&lab, 20, "traffic flows with offload on one side only", || ping(&p1, &t2));
}
