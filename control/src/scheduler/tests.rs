use serde_json::{json, Value};

use super::*;
use crate::obj::Kind;
use crate::testutil::*;

#[derive(Clone)]
struct NodeB(Value);

fn node(name: &str) -> NodeB {
    NodeB(json!({
        "metadata": {"name": name, "uid": format!("uid-{name}"), "resourceVersion": "1", "labels": {"kubernetes.io/hostname": name}},
        "status": {"allocatable": {"cpu": "2", "memory": "4Gi", "pods": "110"},
                   "conditions": [{"type": "Ready", "status": "True"}]}
    }))
}

impl NodeB {
    fn with(mut self, patch: Value) -> Self {
        merge(&mut self.0, patch);
        self
    }
    fn cpu(self, cpu: &str) -> Self {
        self.with(json!({"status": {"allocatable": {"cpu": cpu}}}))
    }
    fn taint(self, key: &str, value: &str, effect: &str) -> Self {
        self.with(json!({"spec": {"taints": [{"key": key, "value": value, "effect": effect}]}}))
    }
}

impl From<NodeB> for Obj {
    fn from(n: NodeB) -> Obj {
        Obj::Node(from(n.0))
    }
}

fn binds(o: &Outcome) -> Vec<String> {
    updates(o)
        .iter()
        .filter(|u| u["spec"]["nodeName"].is_string())
        .map(|u| format!("{}->{}", u["metadata"]["name"].as_str().unwrap(), u["spec"]["nodeName"].as_str().unwrap()))
        .collect()
}

fn messages(o: &Outcome) -> Vec<String> {
    updates(o)
        .iter()
        .filter(|u| !u["spec"]["nodeName"].is_string())
        .map(|u| {
            let c = u["status"]["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "PodScheduled").unwrap();
            assert_eq!((c["status"].as_str(), c["reason"].as_str()), (Some("False"), Some("Unschedulable")));
            c["message"].as_str().unwrap().to_string()
        })
        .collect()
}

fn run(objs: Vec<Obj>) -> Outcome {
    schedule(&Cache::of(objs), now())
}

#[test]
fn filters_decide_where_a_pod_may_go() {
    // (what, node, pod, fits)
    let cases: Vec<(&str, NodeB, PodB, bool)> = vec![
        ("a ready node", node("n1"), pod("p"), true),
        ("not ready", node("n1").with(json!({"status": {"conditions": [{"type": "Ready", "status": "False"}]}})), pod("p"), false),
        ("ready unknown", node("n1").with(json!({"status": {"conditions": [{"type": "Ready", "status": "Unknown"}]}})), pod("p"), false),
        ("unschedulable", node("n1").with(json!({"spec": {"unschedulable": true}})), pod("p"), false),
        ("unschedulable, tolerated", node("n1").with(json!({"spec": {"unschedulable": true}})),
         pod("p").with(json!({"spec": {"tolerations": [{"key": "node.kubernetes.io/unschedulable", "operator": "Exists", "effect": "NoSchedule"}]}})), true),
        ("nodeSelector matches", node("n1").with(json!({"metadata": {"labels": {"disk": "ssd"}}})),
         pod("p").with(json!({"spec": {"nodeSelector": {"disk": "ssd"}}})), true),
        ("nodeSelector does not match", node("n1"), pod("p").with(json!({"spec": {"nodeSelector": {"disk": "ssd"}}})), false),
        ("NoSchedule taint", node("n1").taint("dedicated", "gpu", "NoSchedule"), pod("p"), false),
        ("NoExecute taint", node("n1").taint("dedicated", "gpu", "NoExecute"), pod("p"), false),
        ("PreferNoSchedule is only a preference", node("n1").taint("dedicated", "gpu", "PreferNoSchedule"), pod("p"), true),
        ("Equal toleration", node("n1").taint("dedicated", "gpu", "NoSchedule"),
         pod("p").with(json!({"spec": {"tolerations": [{"key": "dedicated", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}]}})), true),
        ("Equal toleration, other value", node("n1").taint("dedicated", "gpu", "NoSchedule"),
         pod("p").with(json!({"spec": {"tolerations": [{"key": "dedicated", "value": "cpu"}]}})), false),
        ("Exists toleration without effect", node("n1").taint("dedicated", "gpu", "NoSchedule"),
         pod("p").with(json!({"spec": {"tolerations": [{"key": "dedicated", "operator": "Exists"}]}})), true),
        ("toleration for another effect", node("n1").taint("dedicated", "gpu", "NoSchedule"),
         pod("p").with(json!({"spec": {"tolerations": [{"key": "dedicated", "operator": "Exists", "effect": "NoExecute"}]}})), false),
        ("empty key Exists tolerates everything", node("n1").taint("dedicated", "gpu", "NoSchedule"),
         pod("p").with(json!({"spec": {"tolerations": [{"operator": "Exists"}]}})), true),
        ("requests fit", node("n1").cpu("1"), pod("p").requests("1", "1Gi"), true),
        ("cpu does not fit", node("n1").cpu("500m"), pod("p").requests("600m", "1Gi"), false),
        ("memory does not fit", node("n1"), pod("p").requests("1", "5Gi"), false),
        ("affinity on metadata.name", node("n1"), pod("p").with(json!({"spec": {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n1"]}]}]}}}}})), true),
        ("affinity on another name", node("n1"), pod("p").with(json!({"spec": {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n2"]}]}]}}}}})), false),
        ("affinity Gt", node("n1").with(json!({"metadata": {"labels": {"cores": "16"}}})), pod("p").with(json!({"spec": {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [{"key": "cores", "operator": "Gt", "values": ["8"]}]}]}}}}})), true),
        ("affinity terms are ORed", node("n1"), pod("p").with(json!({"spec": {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [{"key": "zone", "operator": "Exists"}]},
                                  {"matchExpressions": [{"key": "zone", "operator": "DoesNotExist"}]}]}}}}})), true),
    ];
    for (what, n, p, fits) in cases {
        let out = run(vec![n.into(), p.into()]);
        assert_eq!(binds(&out), if fits { vec!["p->n1".to_string()] } else { vec![] }, "{what}");
        assert_eq!(messages(&out).len(), usize::from(!fits), "{what}");
    }
}

#[test]
fn bound_pods_use_up_allocatable_until_they_finish() {
    let n = node("n1").cpu("1");
    let busy = pod("busy").requests("800m", "1Gi").node("n1").running();
    let out = run(vec![n.clone().into(), busy.clone().into(), pod("p").requests("300m", "1Gi").into()]);
    assert_eq!(messages(&out), ["0/1 nodes are available: 1 Insufficient cpu."]);
    let done = busy.phase("Succeeded");
    let out = run(vec![n.into(), done.into(), pod("p").requests("300m", "1Gi").into()]);
    assert_eq!(binds(&out), ["p->n1"]);
}

#[test]
fn the_message_counts_reasons_like_kube_scheduler() {
    let out = run(vec![
        node("n1").taint("dedicated", "gpu", "NoSchedule").into(),
        node("n2").cpu("100m").into(),
        node("n3").cpu("100m").into(),
        pod("p").requests("1", "100Mi").into(),
    ]);
    assert_eq!(
        messages(&out),
        ["0/3 nodes are available: 1 node(s) had untolerated taint {dedicated: gpu}, 2 Insufficient cpu."]
    );
    assert_eq!(out.requeue_after, Some(RETRY));
    let out = run(vec![
        node("n1").cpu("100m").with(json!({"status": {"allocatable": {"memory": "1Mi"}}})).into(),
        pod("p").requests("1", "100Mi").into(),
    ]);
    assert_eq!(messages(&out), ["0/1 nodes are available: 1 Insufficient cpu, 1 Insufficient memory."]);
    assert_eq!(
        messages(&run(vec![pod("p").into()])),
        ["0/0 nodes are available: no nodes available to schedule pods."]
    );
}

#[test]
fn an_unchanged_unschedulable_condition_is_not_written_again() {
    let first = run(vec![pod("p").into()]);
    let written: Pod = from(updates(&first)[0].clone());
    let again = schedule(&Cache::of(vec![Obj::Pod(written)]), now());
    assert!(again.actions.is_empty());
}

#[test]
fn replicas_of_one_owner_spread_then_the_least_requested_node_wins() {
    let web = |n: &str| pod(n).owner(Kind::ReplicaSet, "web").requests("100m", "100Mi");
    let out = run(vec![
        node("n1").into(),
        node("n2").into(),
        node("n3").into(),
        // n1 already has one of web's pods; n2 is busier with someone else's pod.
        web("old").node("n1").running().into(),
        pod("other").requests("1", "2Gi").node("n2").running().into(),
        web("a").created(30).into(),
        web("b").created(20).into(),
        web("c").created(10).into(),
    ]);
    // a: n2 and n3 have none of web's pods; n3 is emptier. b: n2 (the only node without one). c: all have one;
    // n3 and n1 tie on requests, the name decides.
    assert_eq!(binds(&out), ["a->n3", "b->n2", "c->n1"]);
    let bound = &updates(&out)[0];
    assert_eq!(bound["status"]["conditions"][0]["type"], "PodScheduled");
    assert_eq!(bound["status"]["conditions"][0]["status"], "True");
}

#[test]
fn pods_are_placed_by_priority_then_age_and_others_are_left_alone() {
    let out = run(vec![
        node("n1").cpu("1").into(),
        pod("old").requests("1", "1Mi").created(100).into(),
        pod("urgent").requests("1", "1Mi").created(10).with(json!({"spec": {"priority": 1000}})).into(),
        pod("custom").with(json!({"spec": {"schedulerName": "my-scheduler"}})).into(),
        pod("gone").deleting().into(),
        pod("failed").phase("Failed").into(),
    ]);
    assert_eq!(binds(&out), ["urgent->n1"]);
    assert_eq!(messages(&out), ["0/1 nodes are available: 1 Insufficient cpu."]);
}

#[test]
fn the_pod_count_limit_holds() {
    let n = node("n1").with(json!({"status": {"allocatable": {"pods": "1"}}}));
    let out = run(vec![n.into(), pod("a").created(20).into(), pod("b").created(10).into()]);
    assert_eq!(binds(&out), ["a->n1"]);
    assert_eq!(messages(&out), ["0/1 nodes are available: 1 Too many pods."]);
}

#[test]
fn target_nodes_come_from_node_name_or_daemonset_affinity() {
    assert_eq!(target_node(&pod("p").node("n1").build()), Some("n1".into()));
    let p = pod("p")
        .with(json!({"spec": {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n2"]}]}]}}}}}));
    assert_eq!(target_node(&p.build()), Some("n2".into()));
    assert_eq!(target_node(&pod("p").build()), None);
}
