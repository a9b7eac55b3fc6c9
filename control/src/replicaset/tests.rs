use k8s_openapi::api::apps::v1::ReplicaSet;
use serde_json::json;

use super::*;
use crate::testutil::*;

fn rs(name: &str, replicas: i32, extra: serde_json::Value) -> ReplicaSet {
    let mut v = json!({
        "metadata": {"name": name, "namespace": "default", "uid": format!("uid-{name}"), "generation": 2,
                     "resourceVersion": "10"},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": "web"}},
                 "template": {"metadata": {"labels": {"app": "web", "tier": "fe"}},
                              "spec": {"containers": [{"name": "c", "image": "nginx"}]}}}
    });
    merge(&mut v, extra);
    from(v)
}

fn key(name: &str) -> ObjectKey {
    ObjectKey::new(Some("default"), name)
}

fn web(name: &str) -> PodB {
    pod(name).labels(&[("app", "web"), ("tier", "fe")]).owner(Kind::ReplicaSet, "web")
}

fn run(objs: Vec<Obj>) -> Outcome {
    reconcile_replicaset(&key("web"), &Cache::of(objs), now())
}

#[test]
fn creates_missing_pods_from_the_template_with_a_controller_ref() {
    let out = run(vec![Obj::ReplicaSet(rs("web", 3, json!({}))), web("web-a").ready(60).into()]);
    let pods = created_pods(&out);
    assert_eq!(pods.len(), 2);
    let p = &pods[0];
    assert_eq!(p.metadata.generate_name.as_deref(), Some("web-"));
    assert_eq!(p.metadata.name, None, "the store completes the name");
    assert_eq!(p.metadata.labels, Some(labels(&[("app", "web"), ("tier", "fe")])));
    let r = &p.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!((r.kind.as_str(), r.name.as_str(), r.uid.as_str()), ("ReplicaSet", "web", "uid-web"));
    assert_eq!((r.controller, r.block_owner_deletion), (Some(true), Some(true)));
    assert_eq!(r.api_version, "apps/v1");
    assert_eq!(pod::phase(p), "Pending");
}

#[test]
fn the_seeds_frontend_with_match_expressions_gets_three_pods() {
    let frontend: ReplicaSet = from(json!({
        "metadata": {"name": "frontend", "namespace": "default", "uid": "uid-frontend", "resourceVersion": "3"},
        "spec": {"replicas": 3,
                 "selector": {"matchLabels": {"tier": "frontend"},
                              "matchExpressions": [{"key": "tier", "operator": "In", "values": ["frontend"]}]},
                 "template": {"metadata": {"labels": {"app": "guestbook", "tier": "frontend"}},
                              "spec": {"containers": [{"name": "php-redis", "image": "gcr.io/google_samples/gb-frontend:v3",
                                        "resources": {"requests": {"cpu": "100m", "memory": "100Mi"}},
                                        "ports": [{"containerPort": 80}]}]}}}
    }));
    let out = reconcile_replicaset(&key("frontend"), &Cache::of(vec![Obj::ReplicaSet(frontend)]), now());
    assert_eq!(created_pods(&out).len(), 3);
    assert!(created_pods(&out).iter().all(|p| p.metadata.generate_name.as_deref() == Some("frontend-")));
}

#[test]
fn pods_that_finished_or_are_being_deleted_do_not_count_and_are_replaced() {
    let out = run(vec![
        Obj::ReplicaSet(rs("web", 3, json!({}))),
        web("a").ready(60).into(),
        web("b").phase("Failed").into(),
        web("c").phase("Succeeded").into(),
        web("d").ready(60).deleting().into(),
    ]);
    assert_eq!(created_pods(&out).len(), 2);
    assert!(deleted(&out).is_empty(), "finished pods are not the ReplicaSet's to delete");
}

#[test]
fn ownership_rules() {
    // (what, pod, expected action lines before creations)
    let cases: Vec<(&str, PodB, Vec<&str>)> = vec![
        (
            "orphan that matches is adopted",
            pod("o").labels(&[("app", "web")]),
            vec!["update Pod default/o (adopted by ReplicaSet web)"],
        ),
        ("orphan that does not match is left alone", pod("o").labels(&[("app", "db")]), vec![]),
        (
            "owned pod that stopped matching is released",
            pod("o").labels(&[("app", "db")]).owner(Kind::ReplicaSet, "web"),
            vec!["update Pod default/o (released by ReplicaSet web)"],
        ),
        (
            "another controller's pod is left alone",
            pod("o").labels(&[("app", "web")]).owner(Kind::ReplicaSet, "other"),
            vec![],
        ),
    ];
    for (what, p, want) in cases {
        let out = run(vec![Obj::ReplicaSet(rs("web", 1, json!({}))), p.into()]);
        let lines: Vec<String> = out.lines().into_iter().filter(|l| l.starts_with("update Pod")).collect();
        assert_eq!(lines, want, "{what}");
    }
    // The adopted pod counts: nothing is created for replicas 1.
    let out = run(vec![Obj::ReplicaSet(rs("web", 1, json!({}))), pod("o").labels(&[("app", "web")]).into()]);
    assert!(created_pods(&out).is_empty());
    let adopted = &updates(&out)[0];
    assert_eq!(adopted["metadata"]["ownerReferences"][0]["uid"], "uid-web");
    assert_eq!(adopted["metadata"]["ownerReferences"][0]["controller"], true);
    assert_eq!(adopted["metadata"]["resourceVersion"], "1", "written at the revision the decision saw");
}

#[test]
fn a_replicaset_being_deleted_neither_creates_nor_adopts() {
    let out = run(vec![
        Obj::ReplicaSet(rs("web", 3, json!({"metadata": {"deletionTimestamp": ago(1)}}))),
        pod("o").labels(&[("app", "web")]).into(),
    ]);
    assert!(created_pods(&out).is_empty());
    assert!(out.lines().iter().all(|l| !l.contains("adopted")), "{:?}", out.lines());
}

#[test]
fn scale_down_victims_are_ranked_like_kubernetes() {
    // Each case: two pods; the first named must be deleted before the second.
    let cases: Vec<(&str, PodB, PodB)> = vec![
        ("unscheduled before scheduled", web("x"), web("y").node("n1").ready(60)),
        ("pending before unknown", web("x").node("n1"), web("y").node("n1").phase("Unknown")),
        ("unknown before running", web("x").node("n1").phase("Unknown"), web("y").node("n1").running()),
        ("not ready before ready", web("x").node("n1").running().not_ready(), web("y").node("n1").ready(60)),
        (
            "lower deletion cost first",
            web("x")
                .node("n1")
                .ready(60)
                .with(json!({"metadata": {"annotations": {"controller.kubernetes.io/pod-deletion-cost": "-5"}}})),
            web("y").node("n2").ready(60),
        ),
        ("doubled up before alone", web("x").node("n1").ready(60), web("y").node("n2").ready(60)),
        ("ready for less time first", web("x").node("n3").ready(10), web("y").node("n4").ready(1000)),
        ("more restarts first", web("x").node("n3").ready(60).restarts(5), web("y").node("n4").ready(60)),
        ("newer first", web("x").node("n3").ready(60).created(100), web("y").node("n4").ready(60).created(5000)),
    ];
    for (what, x, y) in cases {
        // A third pod on n1 makes n1 doubled up (only matters for the co-location case).
        let extra = web("z").node("n1").ready(60).created(1);
        let pods: Vec<Arc<Pod>> = vec![Arc::new(y.clone().build()), Arc::new(x.clone().build())];
        let related: Vec<Arc<Pod>> = pods.iter().cloned().chain([Arc::new(extra.build())]).collect();
        let order: Vec<String> = victims(&pods, &related, 2).iter().map(|p| p.metadata.name.clone().unwrap()).collect();
        assert_eq!(order, ["x", "y"], "{what}");
    }
}

#[test]
fn scaling_down_deletes_the_lowest_ranked_pods() {
    let out = run(vec![
        Obj::ReplicaSet(rs("web", 2, json!({}))),
        web("ready-old").node("n1").ready(600).created(900).into(),
        web("ready-new").node("n2").ready(600).created(700).into(),
        web("pending").node("n1").into(),
        web("unscheduled").into(),
    ]);
    assert_eq!(deleted(&out), ["unscheduled", "pending"]);
    assert!(created_pods(&out).is_empty());
}

#[test]
fn creations_and_deletions_are_capped_per_sync() {
    let out = run(vec![Obj::ReplicaSet(rs("web", 1200, json!({})))]);
    assert_eq!(created_pods(&out).len(), BURST_REPLICAS);
    assert_eq!(slow_start_batches(10), [1, 2, 4, 3]);
    assert_eq!(slow_start_batches(500), [1, 2, 4, 8, 16, 32, 64, 128, 245]);
    assert!(slow_start_batches(0).is_empty());
}

#[test]
fn status_counts_pods_before_this_syncs_actions() {
    let objs = vec![
        Obj::ReplicaSet(rs("web", 4, json!({"spec": {"minReadySeconds": 30}}))),
        web("a").node("n1").ready(60).into(),
        web("b").node("n1").ready(10).into(), // ready, not yet available
        pod("c").labels(&[("app", "web")]).owner(Kind::ReplicaSet, "web").node("n2").running().into(), // not fully labeled
    ];
    let out = run(objs);
    let status = updates(&out).last().unwrap()["status"].clone();
    assert_eq!(
        status,
        json!({"replicas": 3, "fullyLabeledReplicas": 2, "readyReplicas": 2,
                               "availableReplicas": 1, "observedGeneration": 2})
    );
    assert_eq!(out.requeue_after, Some(Duration::from_secs(30)), "look again when b becomes available");
    assert_eq!(created_pods(&out).len(), 1);
}

#[test]
fn an_unchanged_status_is_not_written_and_a_steady_state_does_nothing() {
    let set = rs(
        "web",
        1,
        json!({"status": {"replicas": 1, "fullyLabeledReplicas": 1, "readyReplicas": 1,
                                             "availableReplicas": 1, "observedGeneration": 2}}),
    );
    let out = run(vec![Obj::ReplicaSet(set), web("a").node("n1").ready(60).into()]);
    assert_eq!(out, Outcome::default(), "safe to run twice: nothing to do");
}

#[test]
fn replication_controllers_use_equality_selectors_defaulted_from_the_template() {
    let rc = |selector: serde_json::Value| -> ReplicationController {
        let mut v = json!({
            "metadata": {"name": "nginx", "namespace": "default", "uid": "uid-nginx", "resourceVersion": "4"},
            "spec": {"replicas": 2, "template": {"metadata": {"labels": {"app": "nginx"}},
                                                 "spec": {"containers": [{"name": "nginx", "image": "nginx"}]}}}
        });
        merge(&mut v, json!({"spec": {"selector": selector}}));
        from(v)
    };
    let mine = pod("a").labels(&[("app", "nginx")]).owner(Kind::ReplicationController, "nginx").ready(60);
    for selector in [json!({"app": "nginx"}), serde_json::Value::Null] {
        let out = reconcile_rc(
            &key("nginx"),
            &Cache::of(vec![Obj::ReplicationController(rc(selector.clone())), mine.clone().into()]),
            now(),
        );
        assert_eq!(created_pods(&out).len(), 1, "selector {selector}");
        let r = &created_pods(&out)[0].metadata.owner_references.clone().unwrap()[0];
        assert_eq!((r.api_version.as_str(), r.kind.as_str()), ("v1", "ReplicationController"));
        assert_eq!(updates(&out).last().unwrap()["status"]["readyReplicas"], 1);
    }
}
