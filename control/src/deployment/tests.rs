use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use serde_json::{json, Value};

use super::*;
use crate::testutil::*;

fn template(image: &str) -> PodTemplateSpec {
    from(json!({"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "web", "image": image}]}}))
}

fn dep(replicas: i32, image: &str, extra: Value) -> Deployment {
    let mut v = json!({
        "metadata": {"name": "web", "namespace": "default", "uid": "uid-web", "generation": 1, "resourceVersion": "5"},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": "web"}}, "template": template(image)}
    });
    merge(&mut v, extra);
    from(v)
}

/// A ReplicaSet of `d` for `image`: (spec replicas, available), its revision, created `age` seconds ago.
fn rs(d: &Deployment, image: &str, size: i32, available: i32, rev: i64, age: i64) -> ReplicaSet {
    let hash = template_hash(&template(image), None);
    let (surge, _) = fenceposts(d);
    let mut t = template(image);
    t.metadata.as_mut().unwrap().labels.as_mut().unwrap().insert(HASH_LABEL.into(), hash.clone());
    from(json!({
        "metadata": {"name": format!("web-{hash}"), "namespace": "default", "uid": format!("uid-{image}"),
                     "resourceVersion": "7", "generation": 1, "creationTimestamp": ago(age),
                     "labels": {"app": "web", HASH_LABEL: hash},
                     "annotations": {REVISION: rev.to_string(), DESIRED_REPLICAS: replicas(d).to_string(),
                                     MAX_REPLICAS: (replicas(d) + surge).to_string()},
                     "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": "web", "uid": "uid-web", "controller": true}]},
        "spec": {"replicas": size, "selector": {"matchLabels": {"app": "web", HASH_LABEL: hash}}, "template": t},
        "status": {"replicas": size, "readyReplicas": available, "availableReplicas": available, "observedGeneration": 1}
    }))
}

fn run(d: &Deployment, rss: Vec<ReplicaSet>) -> Outcome {
    let mut objs = vec![Obj::Deployment(d.clone())];
    objs.extend(rss.into_iter().map(Obj::ReplicaSet));
    reconcile(&ObjectKey::new(Some("default"), "web"), &Cache::of(objs), now())
}

/// (name suffix image, spec replicas) of every ReplicaSet the outcome creates or updates.
fn sizes(o: &Outcome) -> Vec<String> {
    o.actions
        .iter()
        .filter_map(|a| match a {
            Action::Create(Obj::ReplicaSet(r)) => Some(format!("create {}={}", image_of(r), r.spec.replicas.unwrap())),
            Action::Update { obj: Obj::ReplicaSet(r), .. } => {
                Some(format!("{}={}", image_of(r), r.spec.replicas.unwrap()))
            }
            _ => None,
        })
        .collect()
}

fn image_of(r: &ReplicaSet) -> String {
    r.spec.template.as_ref().unwrap().spec.as_ref().unwrap().containers[0].image.clone().unwrap()
}

fn deployment_update(o: &Outcome) -> Option<Deployment> {
    o.actions.iter().find_map(|a| match a {
        Action::Update { obj: Obj::Deployment(d), .. } => Some(d.clone()),
        _ => None,
    })
}

fn cond(d: &Deployment, type_: &str) -> (String, String) {
    let c = condition(d.status.as_ref().unwrap(), type_).unwrap();
    (c.status.clone().unwrap(), c.reason.clone().unwrap())
}

#[test]
fn template_hashes_are_stable_and_shaped_like_kubernetes() {
    let h = template_hash(&template("nginx:1.7.9"), None);
    assert_eq!(h, template_hash(&template("nginx:1.7.9"), None));
    assert_ne!(h, template_hash(&template("nginx:1.9.1"), None));
    assert_ne!(h, template_hash(&template("nginx:1.7.9"), Some(1)));
    assert!(h.len() >= 8 && h.len() <= 10 && h.chars().all(|c| "456789bcdf".contains(c)), "{h}");
    // Golden: a change here renames every ReplicaSet of every existing Deployment.
    assert_eq!(h, "5d86579f6", "template_hash changed");
}

#[test]
fn templates_compare_without_the_hash_label_and_empty_fields() {
    let mut with_hash = template("v1");
    with_hash.metadata.as_mut().unwrap().labels.as_mut().unwrap().insert(HASH_LABEL.into(), "abc".into());
    assert!(equal_ignore_hash(&with_hash, &template("v1")));
    let mut empty_ports: PodTemplateSpec = template("v1");
    empty_ports.spec.as_mut().unwrap().containers[0].ports = Some(vec![]);
    assert!(equal_ignore_hash(&empty_ports, &template("v1")));
    assert!(!equal_ignore_hash(&template("v2"), &template("v1")));
}

#[test]
fn fence_posts_round_surge_up_and_unavailable_down() {
    // (replicas, maxSurge, maxUnavailable) → (surge, unavailable)
    let cases = [
        (10, json!(null), json!(null), (3, 2)),
        (3, json!(null), json!(null), (1, 0)),
        (1, json!(null), json!(null), (1, 0)),
        (4, json!("50%"), json!(1), (2, 1)),
        (5, json!(0), json!(0), (0, 1)),
        (5, json!("0%"), json!("10%"), (0, 1)),
        (100, json!("1%"), json!("99%"), (1, 99)),
    ];
    for (replicas, surge, unavailable, want) in cases {
        let mut ru = json!({});
        if !surge.is_null() {
            ru["maxSurge"] = surge.clone();
        }
        if !unavailable.is_null() {
            ru["maxUnavailable"] = unavailable.clone();
        }
        let d = dep(replicas, "v1", json!({"spec": {"strategy": {"type": "RollingUpdate", "rollingUpdate": ru}}}));
        assert_eq!(fenceposts(&d), want, "{replicas} {surge} {unavailable}");
    }
    assert_eq!(fenceposts(&dep(3, "v1", json!({"spec": {"strategy": {"type": "Recreate"}}}))), (0, 0));
}

#[test]
fn a_new_deployment_gets_one_replicaset_with_every_replica() {
    let d = dep(1000, "nginx:1.7.9", json!({}));
    let out = run(&d, vec![]);
    assert_eq!(sizes(&out), ["create nginx:1.7.9=1000"]);
    let Action::Create(Obj::ReplicaSet(r)) = &out.actions[0] else { panic!() };
    let hash = template_hash(&d.spec.template, None);
    assert_eq!(r.metadata.name.as_deref(), Some(format!("web-{hash}").as_str()));
    assert_eq!(r.metadata.labels.as_ref().unwrap()[HASH_LABEL], hash);
    assert_eq!(r.spec.selector.match_labels.as_ref().unwrap()[HASH_LABEL], hash);
    assert_eq!(r.spec.template.as_ref().unwrap().metadata.as_ref().unwrap().labels.as_ref().unwrap()[HASH_LABEL], hash);
    let a = r.metadata.annotations.as_ref().unwrap();
    assert_eq!((a[REVISION].as_str(), a[DESIRED_REPLICAS].as_str(), a[MAX_REPLICAS].as_str()), ("1", "1000", "1250"));
    assert_eq!(r.metadata.owner_references.as_ref().unwrap()[0].uid, "uid-web");
    let d2 = deployment_update(&out).unwrap();
    assert_eq!(annotation(&d2.metadata, REVISION), Some("1"));
    assert_eq!(cond(&d2, PROGRESSING), ("True".into(), "NewReplicaSetCreated".into()));
    assert_eq!(cond(&d2, AVAILABLE), ("False".into(), "MinimumReplicasUnavailable".into()));
}

#[test]
fn rolling_update_steps_respect_the_fence_posts() {
    // 3 replicas: surge 1, unavailable 0. Each row: the ReplicaSets before → the sizes the step writes.
    let d = dep(3, "v2", json!({}));
    let cases: Vec<(&str, Vec<ReplicaSet>, Vec<&str>)> = vec![
        ("new template: a new ReplicaSet of one (surge)", vec![rs(&d, "v1", 3, 3, 1, 100)], vec!["create v2=1"]),
        ("the new pod is not available: wait", vec![rs(&d, "v1", 3, 3, 1, 100), rs(&d, "v2", 1, 0, 2, 10)], vec![]),
        (
            "the new pod is available: one old goes",
            vec![rs(&d, "v1", 3, 3, 1, 100), rs(&d, "v2", 1, 1, 2, 10)],
            vec!["v1=2"],
        ),
        ("room again: scale the new one up", vec![rs(&d, "v1", 2, 2, 1, 100), rs(&d, "v2", 1, 1, 2, 10)], vec!["v2=2"]),
        (
            "unavailable old pods go first, as far as the surge allows",
            vec![rs(&d, "v1", 2, 0, 1, 100), rs(&d, "v2", 2, 2, 2, 10)],
            vec!["v1=1"],
        ),
        ("done: the new one has everything", vec![rs(&d, "v1", 0, 0, 1, 100), rs(&d, "v2", 3, 3, 2, 10)], vec![]),
    ];
    for (what, rss, want) in cases {
        assert_eq!(sizes(&run(&d, rss)), want, "{what}");
    }
}

/// Drives a whole rolling update: after each step the ReplicaSets' pods exist, and become available one step
/// later. Checks the fence posts at every step.
fn simulate(d: &Deployment, mut rss: Vec<ReplicaSet>) -> (Vec<ReplicaSet>, Deployment, usize) {
    let (surge, unavailable) = fenceposts(d);
    let desired = replicas(d);
    let mut d = d.clone();
    for step in 0..200 {
        let out = run(&d, rss.clone());
        if out.actions.is_empty() {
            return (rss, d, step);
        }
        for a in out.actions {
            match a {
                Action::Create(Obj::ReplicaSet(mut r)) => {
                    r.metadata.uid = Some(format!("uid-{}", image_of(&r)));
                    r.metadata.creation_timestamp = Some(Time(now()));
                    rss.push(r);
                }
                Action::Update { obj: Obj::ReplicaSet(r), .. } => {
                    let i = rss.iter().position(|x| x.metadata.name == r.metadata.name).unwrap();
                    rss[i] = r;
                }
                Action::Update { obj: Obj::Deployment(n), .. } => d = n,
                Action::Delete { target, .. } => rss.retain(|x| x.metadata.name.as_deref() != Some(&target.key.name)),
                other => panic!("unexpected {other}"),
            }
        }
        let total: i32 = rss.iter().map(|r| r.spec.replicas.unwrap()).sum();
        assert!(total <= desired + surge, "step {step}: {total} pods > {desired} + {surge}");
        // The kubelet and ReplicaSet controller: pods that existed become available; new ones are not yet.
        for r in rss.iter_mut() {
            let spec = r.spec.replicas.unwrap();
            let s = r.status.get_or_insert_with(Default::default);
            let avail = s.replicas.min(spec);
            s.replicas = spec;
            s.available_replicas = Some(avail);
            s.ready_replicas = Some(avail);
        }
        let available: i32 = rss.iter().map(|r| r.status.as_ref().unwrap().available_replicas.unwrap()).sum();
        if step > 0 {
            assert!(
                available >= desired - unavailable,
                "step {step}: {available} available < {desired} - {unavailable}"
            );
        }
    }
    panic!("no steady state after 200 steps");
}

#[test]
fn a_rolling_update_completes_within_the_fence_posts() {
    for (replicas, strategy) in [
        (3, json!({})),
        (10, json!({})),
        (10, json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 3}})),
        (7, json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "100%", "maxUnavailable": 0}})),
    ] {
        let d = dep(replicas, "v2", json!({"spec": {"strategy": strategy}}));
        let (rss, d, _) = simulate(&d, vec![rs(&d, "v1", replicas, replicas, 1, 100)]);
        let got: Vec<String> = rss.iter().map(|r| format!("{}={}", image_of(r), r.spec.replicas.unwrap())).collect();
        assert_eq!(got, ["v1=0".to_string(), format!("v2={replicas}")], "{replicas} {strategy}");
        let s = d.status.clone().unwrap();
        assert_eq!(
            (s.replicas, s.updated_replicas, s.available_replicas),
            (Some(replicas), Some(replicas), Some(replicas))
        );
        assert_eq!(cond(&d, PROGRESSING), ("True".into(), "NewReplicaSetAvailable".into()));
        assert_eq!(cond(&d, AVAILABLE), ("True".into(), "MinimumReplicasAvailable".into()));
        assert_eq!(annotation(&d.metadata, REVISION), Some("2"));
        let msg = condition(s.conditions.as_ref().map(|_| &s).unwrap(), PROGRESSING).unwrap().message.clone().unwrap();
        assert!(msg.starts_with("ReplicaSet \"web-") && msg.ends_with("\" has successfully progressed."), "{msg}");
    }
}

#[test]
fn recreate_scales_everything_down_then_waits_for_the_pods_to_go() {
    let d = dep(3, "v2", json!({"spec": {"strategy": {"type": "Recreate"}}}));
    assert_eq!(sizes(&run(&d, vec![rs(&d, "v1", 3, 3, 1, 100)])), ["v1=0"]);
    // Scaled down but its pods still report: wait.
    assert_eq!(
        sizes(&run(&d, vec![rs(&d, "v1", 0, 0, 1, 100).tap(|r| r.status.as_mut().unwrap().replicas = 2)])),
        Vec::<String>::new()
    );
    // A pod of the old ReplicaSet that has not finished also holds the rollout.
    let old = rs(&d, "v1", 0, 0, 1, 100);
    let running = pod("old-pod").owner(Kind::ReplicaSet, old.metadata.name.as_deref().unwrap()).with(json!({"metadata": {"ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "x", "uid": "uid-v1", "controller": true}]}})).running();
    let mut objs = vec![Obj::Deployment(d.clone()), Obj::ReplicaSet(old.clone()), running.into()];
    let out = reconcile(&ObjectKey::new(Some("default"), "web"), &Cache::of(objs.clone()), now());
    assert!(sizes(&out).is_empty());
    objs.truncate(2);
    let out = reconcile(&ObjectKey::new(Some("default"), "web"), &Cache::of(objs), now());
    assert_eq!(sizes(&out), ["create v2=3"]);
}

trait Tap: Sized {
    fn tap(mut self, f: impl FnOnce(&mut Self)) -> Self {
        f(&mut self);
        self
    }
}
impl Tap for ReplicaSet {}

#[test]
fn rolling_back_makes_the_old_replicaset_current_with_the_next_revision() {
    // The CLI's undo copies revision 1's template into the Deployment.
    let d = dep(3, "v1", json!({}));
    let out = run(&d, vec![rs(&d, "v1", 0, 0, 1, 100), rs(&d, "v2", 3, 3, 2, 50)]);
    assert_eq!(sizes(&out), ["v1=1"], "the old ReplicaSet is the new one again, surged up");
    let Action::Update { obj: Obj::ReplicaSet(r), .. } = &out.actions[0] else { panic!() };
    assert_eq!(annotation(&r.metadata, REVISION), Some("3"));
    assert_eq!(annotation(&r.metadata, REVISION_HISTORY), Some("1"));
    assert_eq!(annotation(&deployment_update(&out).unwrap().metadata, REVISION), Some("3"));
    // Rolling back again (to revision 2's template) extends the other one's history.
    let d = dep(3, "v2", json!({}));
    let back = rs(&d, "v1", 3, 3, 3, 100).tap(|r| {
        r.metadata.annotations.as_mut().unwrap().insert(REVISION_HISTORY.into(), "1".into());
    });
    let out = run(&d, vec![back, rs(&d, "v2", 0, 0, 2, 50)]);
    let Action::Update { obj: Obj::ReplicaSet(r), .. } = &out.actions[0] else { panic!() };
    assert_eq!((annotation(&r.metadata, REVISION), annotation(&r.metadata, REVISION_HISTORY)), (Some("4"), Some("2")));
}

#[test]
fn old_replicasets_beyond_the_history_limit_are_deleted_oldest_revision_first() {
    let d = dep(
        2,
        "v9",
        json!({"spec": {"revisionHistoryLimit": 2},
        "status": {"observedGeneration": 1, "replicas": 2, "updatedReplicas": 2, "availableReplicas": 2, "readyReplicas": 2}}),
    );
    let mut rss: Vec<ReplicaSet> = (1..=6).map(|i| rs(&d, &format!("v{i}"), 0, 0, i, 1000 - i)).collect();
    // v2's ReplicaSet controller has not caught up with its last change: kept for now.
    rss[1].metadata.generation = Some(2);
    rss.push(rs(&d, "v9", 2, 2, 9, 10));
    let out = run(&d, rss);
    let want: Vec<String> =
        ["v1", "v3", "v4"].iter().map(|v| format!("web-{}", template_hash(&template(v), None))).collect();
    assert_eq!(deleted(&out), want, "{:?}", out.lines());
    // Not complete (an old pod still reports): nothing is deleted.
    let d = dep(2, "v9", json!({"spec": {"revisionHistoryLimit": 0}}));
    let old = rs(&d, "v1", 0, 0, 1, 100).tap(|r| r.status.as_mut().unwrap().replicas = 1);
    assert!(deleted(&run(&d, vec![old, rs(&d, "v9", 2, 2, 2, 10)])).is_empty());
}

#[test]
fn a_paused_deployment_takes_template_changes_without_rolling_and_still_scales() {
    let d = dep(3, "v2", json!({"spec": {"paused": true}}));
    let out = run(&d, vec![rs(&d, "v1", 3, 3, 1, 100)]);
    assert!(sizes(&out).is_empty(), "no new ReplicaSet while paused: {:?}", out.lines());
    let d2 = deployment_update(&out).unwrap();
    assert_eq!(cond(&d2, PROGRESSING), ("Unknown".into(), "DeploymentPaused".into()));
    assert_eq!(d2.status.as_ref().unwrap().updated_replicas, None);
    // Scaling while paused resizes the active ReplicaSet.
    let d = dep(5, "v2", json!({"spec": {"paused": true}}));
    assert_eq!(sizes(&run(&d, vec![rs(&dep(3, "v1", json!({})), "v1", 3, 3, 1, 100)])), ["v1=5"]);
    // Resumed: the rollout starts, and the condition says so.
    let d = dep(
        3,
        "v2",
        json!({"status": {"conditions": [{"type": "Progressing", "status": "Unknown", "reason": "DeploymentPaused"}]}}),
    );
    let out = run(&d, vec![rs(&d, "v1", 3, 3, 1, 100)]);
    assert_eq!(sizes(&out), ["create v2=1"]);
}

#[test]
fn scaling_mid_rollout_is_proportional() {
    // Kubernetes' documented example: 10 replicas, maxSurge 3, maxUnavailable 2, mid-rollout at 8 old + 5 new,
    // scaled to 15: 3 more for the old ReplicaSet, 2 for the new one.
    let strategy =
        json!({"spec": {"strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 3, "maxUnavailable": 2}}}});
    let before = dep(10, "v2", strategy.clone());
    let d = dep(15, "v2", strategy);
    let out = run(&d, vec![rs(&before, "v1", 8, 8, 1, 100), rs(&before, "v2", 5, 0, 2, 10)]);
    assert_eq!(sizes(&out), ["v1=11", "v2=7"]);
    for a in &out.actions {
        if let Action::Update { obj: Obj::ReplicaSet(r), .. } = a {
            assert_eq!(annotation(&r.metadata, DESIRED_REPLICAS), Some("15"));
            assert_eq!(annotation(&r.metadata, MAX_REPLICAS), Some("18"));
        }
    }
    // Scaling down: older first among equals, leftovers to the largest.
    let d = dep(
        5,
        "v2",
        json!({"spec": {"strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 3, "maxUnavailable": 2}}}}),
    );
    assert_eq!(
        sizes(&run(&d, vec![rs(&before, "v1", 8, 8, 1, 100), rs(&before, "v2", 5, 0, 2, 10)])),
        ["v1=5", "v2=3"]
    );
}

#[test]
fn a_single_active_replicaset_takes_a_new_replica_count_at_once() {
    let d = dep(10, "v1", json!({}));
    assert_eq!(sizes(&run(&d, vec![rs(&dep(3, "v1", json!({})), "v1", 3, 3, 1, 100)])), ["v1=10"]);
}

#[test]
fn orphan_replicasets_are_adopted_and_others_left_alone() {
    let d = dep(3, "v1", json!({}));
    let orphan = rs(&d, "v1", 3, 3, 1, 100).tap(|r| r.metadata.owner_references = None);
    let out = run(&d, vec![orphan]);
    assert_eq!(out.lines().len(), 1, "{:?}", out.lines());
    assert!(out.lines()[0].contains("adopted by Deployment web"));
    let theirs =
        rs(&d, "v1", 3, 3, 1, 100).tap(|r| r.metadata.owner_references.as_mut().unwrap()[0].uid = "other".into());
    assert_eq!(sizes(&run(&d, vec![theirs])), Vec::<String>::new(), "a collision: counted, nothing created");
}

#[test]
fn a_taken_name_bumps_the_collision_count() {
    let d = dep(3, "v1", json!({}));
    let theirs = rs(&d, "v1", 3, 3, 1, 100).tap(|r| {
        r.metadata.owner_references.as_mut().unwrap()[0].uid = "other".into();
    });
    let out = run(&d, vec![theirs]);
    assert_eq!(deployment_update(&out).unwrap().status.unwrap().collision_count, Some(1));
}

#[test]
fn a_steady_deployment_does_nothing() {
    let d = dep(3, "v1", json!({}));
    let (rss, d, _) = simulate(&d, vec![]);
    assert!(run(&d, rss).actions.is_empty());
}

#[test]
fn no_progress_past_the_deadline_times_out() {
    let d = dep(
        3,
        "v2",
        json!({"spec": {"progressDeadlineSeconds": 60},
        "status": {"observedGeneration": 1, "replicas": 4, "updatedReplicas": 1, "availableReplicas": 3, "readyReplicas": 3,
                   "conditions": [{"type": "Progressing", "status": "True", "reason": "ReplicaSetUpdated",
                                   "lastUpdateTime": ago(120), "lastTransitionTime": ago(120)}]}}),
    );
    let out = run(&d, vec![rs(&d, "v1", 3, 3, 1, 100), rs(&d, "v2", 1, 0, 2, 10)]);
    assert_eq!(
        cond(&deployment_update(&out).unwrap(), PROGRESSING),
        ("False".into(), "ProgressDeadlineExceeded".into())
    );
    let d = dep(
        3,
        "v2",
        json!({"spec": {"progressDeadlineSeconds": 600},
        "status": {"observedGeneration": 1, "replicas": 4, "updatedReplicas": 1, "availableReplicas": 3, "readyReplicas": 3,
                   "conditions": [{"type": "Progressing", "status": "True", "reason": "ReplicaSetUpdated",
                                   "lastUpdateTime": ago(120), "lastTransitionTime": ago(120)},
                                  {"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable"}]}}),
    );
    let out = run(&d, vec![rs(&d, "v1", 3, 3, 1, 100), rs(&d, "v2", 1, 0, 2, 10)]);
    assert_eq!(out.requeue_after, Some(Duration::from_secs(481)), "woken when the deadline passes");
}
