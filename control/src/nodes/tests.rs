use serde_json::{json, Value};

use super::*;
use crate::testutil::*;

fn cfg() -> Config {
    Config {
        grace_period: Duration::from_secs(40),
        eviction_timeout: Duration::from_secs(300),
        monitor_period: Duration::from_secs(5),
        eviction_rate: 0.1,
    }
}

/// A pod as the API server admits it: with the default 300 s not-ready/unreachable tolerations.
fn admitted(p: PodB) -> Obj {
    let mut p = p.build();
    weft_api::workload::add_default_tolerations(&mut p);
    Obj::Pod(p)
}

/// A pod tolerating `key:NoExecute` for `secs` (forever for None).
fn tolerating(p: PodB, key: &str, secs: Option<i64>) -> PodB {
    p.with(json!({"spec": {"tolerations": [{"key": key, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": secs}]}}))
}

/// The node (first object) with a NoExecute taint `key` added `ago` seconds ago.
fn tainted(mut objs: Vec<Obj>, key: &str, ago_s: i64) -> Vec<Obj> {
    if let Obj::Node(n) = &mut objs[0] {
        let t: Taint = from(json!({"key": key, "effect": "NoExecute", "timeAdded": ago(ago_s)}));
        n.spec.get_or_insert_with(Default::default).taints.get_or_insert_with(Vec::new).push(t);
    }
    objs
}

/// A node created long ago, Ready=True as of `beat_ago`, with a Lease renewed `lease_ago` seconds ago.
fn node(name: &str, ready: &str, beat_ago: i64, lease_ago: Option<i64>) -> Vec<Obj> {
    let mut out = vec![Obj::Node(from(json!({
        "metadata": {"name": name, "uid": format!("uid-{name}"), "resourceVersion": "2", "creationTimestamp": ago(86400)},
        "status": {"conditions": [
            {"type": "Ready", "status": ready, "reason": "KubeletReady", "lastHeartbeatTime": ago(beat_ago), "lastTransitionTime": ago(beat_ago)},
            {"type": "MemoryPressure", "status": "False", "lastHeartbeatTime": ago(beat_ago)}]}
    })))];
    if let Some(l) = lease_ago {
        out.push(Obj::Lease(from(json!({"metadata": {"name": name, "namespace": "kube-node-lease"},
            "spec": {"holderIdentity": name, "renewTime": format!("{}", (now() - SignedDuration::from_secs(l)).strftime("%Y-%m-%dT%H:%M:%S%.6fZ"))}}))));
    }
    out
}

/// The controller has watched these nodes for `watched` seconds and saw each heartbeat (and Ready transition)
/// at the time the node's object says (the test's clocks agree; the skew tests below make them disagree).
fn run(objs: Vec<Obj>, watched: i64) -> Outcome {
    let cache = Cache::of(objs);
    let first = now() - SignedDuration::from_secs(watched);
    let mut health = Health::new();
    for n in cache.nodes.list() {
        let b = beat(&n, &cache);
        let when = [b.0, b.1].into_iter().flatten().max().unwrap_or(first).max(first);
        let ready = condition(&n, "Ready").map(|c| c.status.clone()).unwrap_or_default();
        let since =
            condition(&n, "Ready").and_then(|c| c.last_transition_time.as_ref()).map_or(first, |t| t.0.max(first));
        // The test's clocks agree: the controller first saw each taint when it was added.
        let taints =
            no_execute(&n).map(|t| (t.key.clone(), t.time_added.as_ref().map_or(first, |x| x.0.max(first)))).collect();
        health.insert(node_name(&n).to_string(), Observed { beat: b, probe: when, ready, ready_since: since, taints });
    }
    reconcile(&cache, now(), &health, &cfg())
}

fn node_update(o: &Outcome, name: &str) -> Option<Value> {
    o.actions.iter().find_map(|a| match a {
        Action::Update { obj: Obj::Node(n), .. } if n.metadata.name.as_deref() == Some(name) => {
            Some(serde_json::to_value(n).unwrap())
        }
        _ => None,
    })
}

fn conds(n: &Value) -> Vec<String> {
    n["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| format!("{}={}", c["type"].as_str().unwrap(), c["status"].as_str().unwrap()))
        .collect()
}

fn taint_keys(n: &Value) -> Vec<String> {
    n["spec"]["taints"]
        .as_array()
        .map(|t| {
            t.iter().map(|x| format!("{}:{}", x["key"].as_str().unwrap(), x["effect"].as_str().unwrap())).collect()
        })
        .unwrap_or_default()
}

fn healthy() -> Vec<Obj> {
    [node("n2", "True", 5, Some(2)), node("n3", "True", 5, Some(2))].concat()
}

#[test]
fn a_fresh_lease_keeps_a_node_ready() {
    let mut objs = node("n1", "True", 300, Some(5)); // status posted long ago, lease fresh: alive
    objs.extend(healthy());
    objs.push(pod("p").node("n1").ready(60).into());
    assert!(run(objs, 3600).actions.is_empty());
}

#[test]
fn a_silent_node_goes_unknown_and_its_pods_unready() {
    let mut objs = node("n1", "True", 300, Some(60));
    objs.extend(healthy());
    objs.push(admitted(pod("p").node("n1").ready(600)));
    objs.push(admitted(pod("elsewhere").node("n2").ready(600)));
    let out = run(objs, 3600);
    let n = node_update(&out, "n1").expect("n1 updated");
    assert_eq!(conds(&n), ["Ready=Unknown", "MemoryPressure=Unknown"]);
    assert_eq!(n["status"]["conditions"][0]["reason"], "NodeStatusUnknown");
    assert_eq!(n["status"]["conditions"][0]["message"], "Kubelet stopped posting node status.");
    assert_eq!(
        taint_keys(&n),
        ["node.kubernetes.io/unreachable:NoSchedule", "node.kubernetes.io/unreachable:NoExecute"]
    );
    assert_eq!(out.lines()[1], "update Pod default/p (node n1 is not ready)");
    assert_eq!(out.actions.len(), 2, "{:?}", out.lines());
    assert!(deleted(&out).is_empty(), "the NoExecute taint is new: 300 s of toleration left");
}

#[test]
fn a_restarted_controller_gives_every_node_a_grace_period() {
    let mut objs = node("n1", "True", 300, Some(60));
    objs.extend(healthy());
    assert!(run(objs, 10).actions.is_empty());
}

#[test]
fn pods_leave_when_the_unreachable_taint_outlives_their_toleration_and_forever_tolerations_stay() {
    let mut objs = tainted(node("n1", "Unknown", 400, Some(400)), UNREACHABLE, 360);
    objs.extend(healthy());
    objs.push(admitted(pod("web-1").node("n1").owner(Kind::ReplicaSet, "web").running())); // 300 s: gone
    objs.push(tolerating(pod("patient").node("n1").running(), UNREACHABLE, Some(3600)).into()); // 3600 s: stays
    objs.push(tolerating(pod("forever").node("n1").running(), UNREACHABLE, None).into());
    let mut daemon = pod("logs-1").node("n1").owner(Kind::DaemonSet, "logs").running().build();
    crate::daemonset::add_daemon_tolerations(daemon.spec.get_or_insert_with(Default::default));
    objs.push(Obj::Pod(daemon));
    objs.push(pod("leaving").node("n1").deleting().into());
    let out = run(objs, 3600);
    assert_eq!(deleted(&out), ["web-1"]);
    assert!(out.lines().iter().any(|l| l.contains("has taint node.kubernetes.io/unreachable:NoExecute for 360s")));
}

#[test]
fn a_pod_without_a_matching_toleration_is_evicted_at_once() {
    let mut objs = tainted(node("n1", "Unknown", 60, Some(60)), UNREACHABLE, 1);
    objs.extend(healthy());
    objs.push(pod("bare").node("n1").running().into());
    objs.push(tolerating(pod("wrong-key").node("n1").running(), NOT_READY, None).into());
    objs.push(admitted(pod("admitted").node("n1").running()));
    assert_eq!(deleted(&run(objs, 3600)), ["bare", "wrong-key"]);
}

#[test]
fn a_node_reported_not_ready_gets_the_not_ready_taint_and_evicts_when_the_toleration_runs_out() {
    let mut objs = node("n1", "False", 100, Some(1)); // heartbeating, but the kubelet says NotReady since 100 s
    objs.extend(healthy());
    objs.push(admitted(pod("a").node("n1").running()));
    let out = run(objs.clone(), 3600);
    assert_eq!(
        taint_keys(&node_update(&out, "n1").unwrap()),
        ["node.kubernetes.io/not-ready:NoSchedule", "node.kubernetes.io/not-ready:NoExecute"]
    );
    assert!(deleted(&out).is_empty());
    let mut late = tainted(node("n1", "False", 400, Some(1)), NOT_READY, 301);
    late.extend(healthy());
    late.push(admitted(pod("a").node("n1").running()));
    assert_eq!(deleted(&run(late, 3600)), ["a"]);
}

#[test]
fn no_taints_and_no_evictions_when_every_node_is_down() {
    let objs = [
        tainted(node("n1", "Unknown", 400, Some(400)), UNREACHABLE, 360),
        node("n2", "Unknown", 400, Some(400)),
        vec![pod("a").node("n1").running().into()],
    ]
    .concat();
    let out = run(objs, 3600);
    assert!(deleted(&out).is_empty(), "full disruption: the fault is more likely ours");
    // The NoExecute taint is taken off (the nodes are treated as reachable); the NoSchedule ones stay.
    assert_eq!(taint_keys(&node_update(&out, "n1").unwrap()), ["node.kubernetes.io/unreachable:NoSchedule"]);
    assert_eq!(taint_keys(&node_update(&out, "n2").unwrap()), ["node.kubernetes.io/unreachable:NoSchedule"]);
}

#[test]
fn no_execute_taints_are_added_at_the_eviction_rate() {
    // Ten healthy nodes, two silent: one NoExecute taint per pass, none while the last is younger than 1/rate.
    let mut objs: Vec<Obj> = (0..10).flat_map(|i| node(&format!("ok{i}"), "True", 5, Some(2))).collect();
    objs.extend(node("n1", "True", 300, Some(60)));
    objs.extend(node("n2", "True", 300, Some(60)));
    // The nodes this pass gave a NoExecute taint (added just now, not carried over).
    let no_execute_on = |out: &Outcome| -> Vec<String> {
        let fresh = |v: &Value| {
            v["spec"]["taints"].as_array().is_some_and(|list| {
                list.iter().any(|t| {
                    t["effect"] == "NoExecute"
                        && t["timeAdded"]
                            .as_str()
                            .is_some_and(|a| now().duration_since(ts(a)) < SignedDuration::from_secs(2))
                })
            })
        };
        ["n1", "n2"].into_iter().filter(|n| node_update(out, n).is_some_and(|v| fresh(&v))).map(String::from).collect()
    };
    let n1 = objs.iter().position(|o| matches!(o, Obj::Node(n) if n.metadata.name.as_deref() == Some("n1"))).unwrap();
    assert_eq!(no_execute_on(&run(objs.clone(), 3600)), ["n1"]);
    // n1 got its taint 5 s ago (< 10 s at 0.1 nodes/s): n2 waits; 11 s ago: n2's turn.
    let mut recent = objs.clone();
    recent[n1] = tainted(vec![recent[n1].clone()], UNREACHABLE, 5).remove(0);
    assert_eq!(no_execute_on(&run(recent, 3600)), Vec::<String>::new());
    let mut older = objs.clone();
    older[n1] = tainted(vec![older[n1].clone()], UNREACHABLE, 11).remove(0);
    assert_eq!(no_execute_on(&run(older, 3600)), ["n2"]);
    // Rate 0: no NoExecute taints at all (the NoSchedule ones still follow Ready).
    let cache = Cache::of(objs);
    let mut health = Health::new();
    observe(&mut health, &cache, now() - SignedDuration::from_secs(3600));
    let out = reconcile(&cache, now(), &health, &Config { eviction_rate: 0.0, ..cfg() });
    assert_eq!(taint_keys(&node_update(&out, "n1").unwrap()), ["node.kubernetes.io/unreachable:NoSchedule"]);
    assert_eq!(no_execute_on(&out), Vec::<String>::new());
}

#[test]
fn the_taint_eviction_decision() {
    let t = |key: &str| Taint { key: key.into(), effect: "NoExecute".into(), ..Default::default() };
    let (un, nr, other) = (t(UNREACHABLE), t(NOT_READY), t("dedicated"));
    let tol = |key: &str, secs: Option<i64>| Toleration {
        key: Some(key.into()),
        operator: Some("Exists".into()),
        effect: Some("NoExecute".into()),
        toleration_seconds: secs,
        value: None,
    };
    let s = Duration::from_secs;
    type Case<'a> = (&'a str, Vec<(&'a Taint, Duration)>, Vec<Toleration>, Eviction);
    #[rustfmt::skip]
    let cases: Vec<Case> = vec![
        ("no taint", vec![], vec![], Eviction::Keep),
        ("no toleration", vec![(&un, s(0))], vec![], Eviction::Now),
        ("toleration for another key", vec![(&un, s(0))], vec![tol(NOT_READY, None)], Eviction::Now),
        ("within tolerationSeconds", vec![(&un, s(100))], vec![tol(UNREACHABLE, Some(300))], Eviction::After(s(200))),
        ("at tolerationSeconds", vec![(&un, s(300))], vec![tol(UNREACHABLE, Some(300))], Eviction::Now),
        ("past tolerationSeconds", vec![(&un, s(301))], vec![tol(UNREACHABLE, Some(300))], Eviction::Now),
        ("forever", vec![(&un, s(99999))], vec![tol(UNREACHABLE, None)], Eviction::Keep),
        ("zero seconds", vec![(&un, s(0))], vec![tol(UNREACHABLE, Some(0))], Eviction::Now),
        ("negative seconds count as zero", vec![(&un, s(0))], vec![tol(UNREACHABLE, Some(-5))], Eviction::Now),
        ("the smallest seconds of the matching ones", vec![(&un, s(10))],
         vec![tol(UNREACHABLE, None), tol(UNREACHABLE, Some(60)), tol(UNREACHABLE, Some(30))], Eviction::After(s(20))),
        ("two taints: the sooner one", vec![(&un, s(10)), (&nr, s(0))],
         vec![tol(UNREACHABLE, Some(300)), tol(NOT_READY, Some(30))], Eviction::After(s(30))),
        ("two taints: one untolerated", vec![(&un, s(0)), (&other, s(0))], vec![tol(UNREACHABLE, None)], Eviction::Now),
        ("empty key Exists tolerates all, forever", vec![(&other, s(5))],
         vec![Toleration { operator: Some("Exists".into()), ..Default::default() }], Eviction::Keep),
        ("a NoSchedule toleration does not count", vec![(&un, s(0))],
         vec![Toleration { effect: Some("NoSchedule".into()), ..tol(UNREACHABLE, None) }], Eviction::Now),
    ];
    for (name, taints, tols, want) in cases {
        assert_eq!(taint_eviction(&taints, &tols), want, "{name}");
    }
}

#[test]
fn pods_on_nodes_that_are_gone_are_deleted() {
    let mut objs = healthy();
    objs.push(pod("orphan").node("n9").running().into());
    objs.push(pod("unbound").into());
    assert_eq!(deleted(&run(objs, 3600)), ["orphan"]);
}

/// A node whose Lease says `renew` (its own clock).
fn beating(renew: Timestamp) -> Vec<Obj> {
    let mut objs = node("n1", "True", 0, None);
    objs.push(Obj::Lease(from(json!({"metadata": {"name": "n1", "namespace": "kube-node-lease"},
        "spec": {"holderIdentity": "n1", "renewTime": format!("{}", renew.strftime("%Y-%m-%dT%H:%M:%S%.6fZ"))}}))));
    objs
}

#[test]
fn a_skewed_node_clock_neither_keeps_a_dead_node_ready_nor_flaps_a_live_one() {
    for skew in [-600i64, 600] {
        let t0 = now();
        let at = |s: i64| t0 + SignedDuration::from_secs(s);
        let node_clock = |s: i64| at(s + skew);
        let mut health = Health::new();
        // Alive: renewing every 10 s on its own (skewed) clock; checked every 10 s on ours for two minutes.
        let mut last = Outcome::default();
        for t in (0..120).step_by(10) {
            let cache = Cache::of(beating(node_clock(t)));
            observe(&mut health, &cache, at(t));
            last = reconcile(&cache, at(t), &health, &cfg());
            assert!(node_update(&last, "n1").is_none(), "skew {skew}: a live node flapped at {t}s: {:?}", last.lines());
        }
        assert!(last.actions.is_empty());
        // Dead: its Lease stops changing at 110 s. Within the grace period it is still Ready; past it, Unknown,
        // however far in the future its last renewTime reads.
        let dead = Cache::of(beating(node_clock(110)));
        observe(&mut health, &dead, at(140));
        assert!(node_update(&reconcile(&dead, at(140), &health, &cfg()), "n1").is_none(), "skew {skew}");
        observe(&mut health, &dead, at(151));
        let out = reconcile(&dead, at(151), &health, &cfg());
        let n = node_update(&out, "n1").unwrap_or_else(|| panic!("skew {skew}: a dead node kept Ready"));
        assert_eq!(conds(&n)[0], "Ready=Unknown", "skew {skew}");
    }
}

#[test]
fn a_restarted_controller_observes_first_and_gives_a_grace_period() {
    // Heartbeats that stopped long ago by the node's clock: a fresh controller has not seen them stop.
    let cache = Cache::of([node("n1", "True", 3600, Some(3600)), healthy()].concat());
    let mut health = Health::new();
    observe(&mut health, &cache, now());
    assert!(reconcile(&cache, now(), &health, &cfg()).actions.is_empty());
    let later = now() + SignedDuration::from_secs(41);
    observe(&mut health, &cache, later);
    let out = reconcile(&cache, later, &health, &cfg());
    assert!(node_update(&out, "n1").is_some() && node_update(&out, "n2").is_some(), "{:?}", out.lines());
}
