use serde_json::{json, Value};

use super::*;
use crate::testutil::*;

fn ds(extra: Value) -> DaemonSet {
    let mut v = json!({
        "metadata": {"name": "logs", "namespace": "default", "uid": "uid-logs", "generation": 1, "resourceVersion": "3"},
        "spec": {"selector": {"matchLabels": {"app": "logs"}},
                 "template": {"metadata": {"labels": {"app": "logs"}}, "spec": {"containers": [{"name": "c", "image": "fluentd:v1"}]}}}
    });
    merge(&mut v, extra);
    from(v)
}

fn node(name: &str, extra: Value) -> Obj {
    let mut v = json!({"metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
                       "status": {"conditions": [{"type": "Ready", "status": "True"}]}});
    merge(&mut v, extra);
    Obj::Node(from(v))
}

fn hash(d: &DaemonSet) -> String {
    template_hash(&d.spec.template, None)
}

/// A pod of `d` on `node`, of the current template or not.
fn dpod(d: &DaemonSet, name: &str, node: &str, current: bool) -> PodB {
    let h = if current { hash(d) } else { "old".to_string() };
    pod(name).labels(&[("app", "logs"), (HASH_LABEL, &h)]).owner(Kind::DaemonSet, "logs").node(node)
}

fn run(d: &DaemonSet, mut objs: Vec<Obj>) -> Outcome {
    objs.push(Obj::DaemonSet(d.clone()));
    reconcile(&ObjectKey::new(Some("default"), "logs"), &Cache::of(objs), now())
}

fn created_for(o: &Outcome) -> Vec<String> {
    created_pods(o).iter().map(|p| target_node(p).unwrap()).collect()
}

#[test]
fn one_pod_per_eligible_node() {
    let d = ds(json!({"spec": {"template": {"spec": {"nodeSelector": {"role": "worker"}}}}}));
    let worker = json!({"metadata": {"labels": {"role": "worker"}}});
    let cases: Vec<(&str, Obj, bool)> = vec![
        ("a worker", node("n", worker.clone()), true),
        ("not selected", node("n", json!({})), false),
        (
            "NoSchedule taint",
            node(
                "n",
                json!({"metadata": {"labels": {"role": "worker"}}, "spec": {"taints": [{"key": "gpu", "effect": "NoSchedule"}]}}),
            ),
            false,
        ),
        (
            "unschedulable (tolerated by every daemon pod)",
            node(
                "n",
                json!({"metadata": {"labels": {"role": "worker"}}, "spec": {"unschedulable": true,
            "taints": [{"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}]}}),
            ),
            true,
        ),
        (
            "not ready (tolerated)",
            node(
                "n",
                json!({"metadata": {"labels": {"role": "worker"}}, "spec": {
            "taints": [{"key": "node.kubernetes.io/not-ready", "effect": "NoExecute"}]}}),
            ),
            true,
        ),
        (
            "memory pressure (tolerated)",
            node(
                "n",
                json!({"metadata": {"labels": {"role": "worker"}}, "spec": {
            "taints": [{"key": "node.kubernetes.io/memory-pressure", "effect": "NoSchedule"}]}}),
            ),
            true,
        ),
        (
            "network unavailable (only host-network pods tolerate it)",
            node(
                "n",
                json!({"metadata": {"labels": {"role": "worker"}}, "spec": {
            "taints": [{"key": "node.kubernetes.io/network-unavailable", "effect": "NoSchedule"}]}}),
            ),
            false,
        ),
    ];
    for (what, n, want) in cases {
        let out = run(&d, vec![n]);
        assert_eq!(created_for(&out), if want { vec!["n".to_string()] } else { vec![] }, "{what}");
    }
    let p = &created_pods(&run(&d, vec![node("n", worker)]))[0];
    assert_eq!(p.metadata.generate_name.as_deref(), Some("logs-"));
    assert_eq!(label(&p.metadata, HASH_LABEL), Some(hash(&d).as_str()));
    assert_eq!(label(&p.metadata, GENERATION_LABEL), Some("1"));
    assert_eq!(pod::node_name(p), "", "the scheduler binds it");
    let keys: Vec<String> = p
        .spec
        .as_ref()
        .unwrap()
        .tolerations
        .as_ref()
        .unwrap()
        .iter()
        .map(|t| format!("{}:{}", t.key.clone().unwrap(), t.effect.clone().unwrap()))
        .collect();
    assert_eq!(
        keys,
        [
            "node.kubernetes.io/not-ready:NoExecute",
            "node.kubernetes.io/unreachable:NoExecute",
            "node.kubernetes.io/disk-pressure:NoSchedule",
            "node.kubernetes.io/memory-pressure:NoSchedule",
            "node.kubernetes.io/pid-pressure:NoSchedule",
            "node.kubernetes.io/unschedulable:NoSchedule"
        ]
    );
}

#[test]
fn pods_follow_nodes_joining_leaving_and_changing() {
    let d = ds(json!({}));
    let out = run(&d, vec![node("n1", json!({})), node("n2", json!({})), dpod(&d, "a", "n1", true).into()]);
    assert_eq!(created_for(&out), ["n2"], "a node joined");
    let out = run(&d, vec![node("n1", json!({})), dpod(&d, "a", "n1", true).into(), dpod(&d, "b", "n2", true).into()]);
    assert_eq!(deleted(&out), ["b"], "a node left");
    let noexec = json!({"spec": {"taints": [{"key": "dedicated", "effect": "NoExecute"}]}});
    let out = run(&d, vec![node("n1", noexec), dpod(&d, "a", "n1", true).into()]);
    assert_eq!(deleted(&out), ["a"], "an untolerated NoExecute taint evicts");
    let nosched = json!({"spec": {"taints": [{"key": "dedicated", "effect": "NoSchedule"}]}});
    let out = run(&d, vec![node("n1", nosched), dpod(&d, "a", "n1", true).into()]);
    assert!(deleted(&out).is_empty() && created_pods(&out).is_empty(), "NoSchedule keeps out new pods only");
}

#[test]
fn failed_and_duplicate_pods_are_deleted() {
    let d = ds(json!({}));
    let out = run(&d, vec![node("n1", json!({})), dpod(&d, "a", "n1", true).phase("Failed").into()]);
    assert_eq!(deleted(&out), ["a"]);
    let out = run(
        &d,
        vec![
            node("n1", json!({})),
            dpod(&d, "old", "n1", true).ready(60).created(600).into(),
            dpod(&d, "new", "n1", true).ready(60).created(60).into(),
        ],
    );
    assert_eq!(deleted(&out), ["new"], "the oldest stays");
}

#[test]
fn rolling_update_replaces_within_max_unavailable() {
    let three = |d: &DaemonSet, pods: Vec<PodB>| {
        let mut objs = vec![node("n1", json!({})), node("n2", json!({})), node("n3", json!({}))];
        objs.extend(pods.into_iter().map(Obj::from));
        run(d, objs)
    };
    let d = ds(json!({}));
    let all_old = || {
        vec![
            dpod(&d, "a", "n1", false).ready(60),
            dpod(&d, "b", "n2", false).ready(60),
            dpod(&d, "c", "n3", false).ready(60),
        ]
    };
    assert_eq!(deleted(&three(&d, all_old())), ["a"], "default maxUnavailable 1");
    let two =
        ds(json!({"spec": {"updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 2}}}}));
    let all_old2 = vec![
        dpod(&two, "a", "n1", false).ready(60),
        dpod(&two, "b", "n2", false).ready(60),
        dpod(&two, "c", "n3", false).ready(60),
    ];
    assert_eq!(deleted(&three(&two, all_old2)), ["a", "b"]);
    let waiting = vec![
        dpod(&d, "a", "n1", true).running(),
        dpod(&d, "b", "n2", false).ready(60),
        dpod(&d, "c", "n3", false).ready(60),
    ];
    assert!(deleted(&three(&d, waiting)).is_empty(), "the new pod is not available yet");
    let next = vec![
        dpod(&d, "a", "n1", true).ready(5),
        dpod(&d, "b", "n2", false).ready(60),
        dpod(&d, "c", "n3", false).ready(60),
    ];
    assert_eq!(deleted(&three(&d, next)), ["b"]);
    let broken = vec![
        dpod(&d, "a", "n1", true).running(),
        dpod(&d, "b", "n2", false).running(),
        dpod(&d, "c", "n3", false).ready(60),
    ];
    assert_eq!(deleted(&three(&d, broken)), ["b"], "an unavailable old pod is replaced whatever the budget");
    let on_delete = ds(json!({"spec": {"updateStrategy": {"type": "OnDelete"}}}));
    let olds = vec![dpod(&on_delete, "a", "n1", false).ready(60)];
    assert!(deleted(&three(&on_delete, olds)).is_empty());
}

#[test]
fn status_counts_nodes_and_pods() {
    let d = ds(json!({"spec": {"template": {"spec": {"nodeSelector": {"role": "worker"}}}}}));
    let w = json!({"metadata": {"labels": {"role": "worker"}}});
    let out = run(
        &d,
        vec![
            node("n1", w.clone()),
            node("n2", w.clone()),
            node("n3", w),
            node("n4", json!({})),
            dpod(&d, "a", "n1", true).ready(60).into(),
            dpod(&d, "b", "n2", false).running().into(),
            dpod(&d, "c", "n4", true).ready(60).into(),
        ],
    );
    let st = updates(&out).last().unwrap()["status"].clone();
    assert_eq!(
        st,
        json!({"desiredNumberScheduled": 3, "currentNumberScheduled": 2, "numberMisscheduled": 1,
        "numberReady": 1, "numberAvailable": 1, "numberUnavailable": 2, "updatedNumberScheduled": 1, "observedGeneration": 1})
    );
}
