use serde_json::{json, Value};

use super::*;
use crate::testutil::*;

fn cfg() -> Config {
    Config {
        grace_period: Duration::from_secs(40),
        eviction_timeout: Duration::from_secs(300),
        monitor_period: Duration::from_secs(5),
    }
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
        health.insert(node_name(&n).to_string(), Observed { beat: b, probe: when, ready, ready_since: since });
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
    objs.push(pod("p").node("n1").ready(600).into());
    objs.push(pod("elsewhere").node("n2").ready(600).into());
    let out = run(objs, 3600);
    let n = node_update(&out, "n1").expect("n1 updated");
    assert_eq!(conds(&n), ["Ready=Unknown", "MemoryPressure=Unknown"]);
    assert_eq!(n["status"]["conditions"][0]["reason"], "NodeStatusUnknown");
    assert_eq!(n["status"]["conditions"][0]["message"], "Kubelet stopped posting node status.");
    assert_eq!(taint_keys(&n), ["node.kubernetes.io/unreachable:NoSchedule"]);
    assert_eq!(out.lines()[1], "update Pod default/p (node n1 is not ready)");
    assert_eq!(out.actions.len(), 2, "{:?}", out.lines());
    assert!(deleted(&out).is_empty(), "not yet past the eviction timeout");
}

#[test]
fn a_restarted_controller_gives_every_node_a_grace_period() {
    let mut objs = node("n1", "True", 300, Some(60));
    objs.extend(healthy());
    assert!(run(objs, 10).actions.is_empty());
}

#[test]
fn pods_are_evicted_after_the_timeout_except_daemon_pods() {
    let mut objs = node("n1", "Unknown", 400, Some(400));
    objs.extend(healthy());
    objs.push(pod("web-1").node("n1").owner(Kind::ReplicaSet, "web").running().into());
    objs.push(pod("logs-1").node("n1").owner(Kind::DaemonSet, "logs").running().into());
    objs.push(pod("leaving").node("n1").deleting().into());
    let out = run(objs, 3600);
    assert_eq!(deleted(&out), ["web-1"]);
}

#[test]
fn a_node_reported_not_ready_is_evicted_from_its_transition() {
    let mut objs = node("n1", "False", 100, Some(1)); // heartbeating, but the kubelet says NotReady since 100 s
    objs.extend(healthy());
    objs.push(pod("a").node("n1").running().into());
    let out = run(objs.clone(), 3600);
    assert_eq!(taint_keys(&node_update(&out, "n1").unwrap()), ["node.kubernetes.io/not-ready:NoSchedule"]);
    assert!(deleted(&out).is_empty());
    let mut late = node("n1", "False", 400, Some(1));
    late.extend(healthy());
    late.push(pod("a").node("n1").running().into());
    assert_eq!(deleted(&run(late, 3600)), ["a"]);
}

#[test]
fn no_evictions_when_every_node_is_down() {
    let objs = [
        node("n1", "Unknown", 400, Some(400)),
        node("n2", "Unknown", 400, Some(400)),
        vec![pod("a").node("n1").running().into()],
    ]
    .concat();
    assert!(deleted(&run(objs, 3600)).is_empty(), "full disruption: the fault is more likely ours");
}

#[test]
fn a_node_ready_again_loses_the_taint() {
    let objs = node("n1", "True", 1, Some(1));
    let Obj::Node(mut n) = objs[0].clone() else { panic!() };
    n.spec = Some(from(
        json!({"taints": [{"key": "node.kubernetes.io/unreachable", "effect": "NoSchedule"}, {"key": "gpu", "effect": "NoSchedule"}]}),
    ));
    let out = run(vec![Obj::Node(n)], 3600);
    assert_eq!(taint_keys(&node_update(&out, "n1").unwrap()), ["gpu:NoSchedule"]);
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
