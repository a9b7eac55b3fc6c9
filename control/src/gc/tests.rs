use serde_json::{json, Value};

use super::*;
use crate::testutil::*;

fn rs(name: &str, extra: Value) -> Obj {
    let mut v = json!({"metadata": {"name": name, "namespace": "default", "uid": format!("uid-{name}"), "resourceVersion": "4"},
                       "spec": {"selector": {"matchLabels": {"app": name}}}});
    merge(&mut v, extra);
    Obj::ReplicaSet(from(v))
}

fn deploy(name: &str, extra: Value) -> Obj {
    let mut v = json!({"metadata": {"name": name, "namespace": "default", "uid": format!("uid-{name}"), "resourceVersion": "4"},
                       "spec": {"selector": {"matchLabels": {"app": name}}, "template": {}}});
    merge(&mut v, extra);
    Obj::Deployment(from(v))
}

fn deleting(finalizers: &[&str]) -> Value {
    json!({"metadata": {"deletionTimestamp": ago(5), "finalizers": finalizers}})
}

fn owned_by(kind: Kind, owner: &str) -> Value {
    json!({"metadata": {"ownerReferences": [{"apiVersion": kind.api_version(), "kind": kind.name(), "name": owner,
        "uid": format!("uid-{owner}"), "controller": true, "blockOwnerDeletion": true}]}})
}

fn run(objs: Vec<Obj>) -> Outcome {
    collect(&Cache::of(objs), now())
}

#[test]
fn dependents_of_a_deleted_owner_are_deleted_once_the_store_confirms_it_is_gone() {
    let out = run(vec![pod("web-a").owner(Kind::ReplicaSet, "web").into(), pod("other").into()]);
    assert_eq!(out.lines(), ["delete Pod default/web-a (owner ReplicaSet default/web is gone)"]);
    let Action::Delete { owners_gone, .. } = &out.actions[0] else { panic!() };
    assert_eq!(
        owners_gone,
        &[Target { kind: Kind::ReplicaSet, key: ObjectKey::new(Some("default"), "web"), uid: "uid-web".into() }]
    );
    // Same name, another uid: the owner it names is still gone.
    let out =
        run(vec![pod("web-a").owner(Kind::ReplicaSet, "web").into(), rs("web", json!({"metadata": {"uid": "new"}}))]);
    assert_eq!(deleted(&out), ["web-a"]);
    // Owner present: nothing to do.
    assert!(run(vec![pod("web-a").owner(Kind::ReplicaSet, "web").into(), rs("web", json!({}))]).actions.is_empty());
}

#[test]
fn a_dependent_with_another_owner_only_loses_the_dangling_reference() {
    let two = pod("p").owner(Kind::ReplicaSet, "web").with(json!({"metadata": {"ownerReferences": [
        {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web", "uid": "uid-web", "controller": true},
        {"apiVersion": "apps/v1", "kind": "DaemonSet", "name": "gone", "uid": "uid-gone"}]}}));
    let out = run(vec![two.into(), rs("web", json!({}))]);
    assert_eq!(out.actions.len(), 1);
    let refs = &updates(&out)[0]["metadata"]["ownerReferences"];
    assert_eq!(refs.as_array().unwrap().len(), 1);
    assert_eq!(refs[0]["uid"], "uid-web");
}

#[test]
fn owners_of_kinds_we_do_not_cache_are_assumed_to_exist() {
    let p = pod("db-0").with(json!({"metadata": {"ownerReferences": [{"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "db", "uid": "u"}]}}));
    assert!(run(vec![p.into()]).actions.is_empty());
}

#[test]
fn cascade_orphan_strips_references_then_lets_the_owner_go() {
    let out = run(vec![
        rs("web", deleting(&["orphan"])),
        pod("web-a").owner(Kind::ReplicaSet, "web").into(),
        pod("web-b").owner(Kind::ReplicaSet, "web").into(),
    ]);
    assert_eq!(
        out.lines(),
        [
            "update Pod default/web-a (orphaned: ReplicaSet default/web deleted with --cascade=orphan)",
            "update Pod default/web-b (orphaned: ReplicaSet default/web deleted with --cascade=orphan)",
        ]
    );
    assert!(updates(&out)[0]["metadata"]["ownerReferences"].is_null());
    // No dependents left: the finalizer is done and with it the object.
    assert_eq!(
        run(vec![rs("web", deleting(&["orphan"]))]).lines(),
        ["delete ReplicaSet default/web (orphan finished)"]
    );
    // Another finalizer keeps it.
    let out = run(vec![rs("web", deleting(&["orphan", "example.com/keep"]))]);
    assert_eq!(updates(&out)[0]["metadata"]["finalizers"], json!(["example.com/keep"]));
}

#[test]
fn foreground_deletion_removes_dependents_first() {
    // Deployment → ReplicaSet → pods: the ReplicaSet is marked for foreground deletion, its pods deleted.
    let out = run(vec![
        deploy("web", deleting(&["foregroundDeletion"])),
        rs("web-1", owned_by(Kind::Deployment, "web")),
        pod("web-1-a").owner(Kind::ReplicaSet, "web-1").into(),
    ]);
    assert_eq!(out.lines(), ["update ReplicaSet default/web-1 (foreground deletion of Deployment default/web)"]);
    let marked = &updates(&out)[0];
    assert_eq!(marked["metadata"]["finalizers"], json!(["foregroundDeletion"]));
    assert!(marked["metadata"]["deletionTimestamp"].is_string());
    let mut rs_deleting = owned_by(Kind::Deployment, "web");
    merge(&mut rs_deleting, deleting(&["foregroundDeletion"]));
    let out = run(vec![
        deploy("web", deleting(&["foregroundDeletion"])),
        rs("web-1", rs_deleting.clone()),
        pod("web-1-a").owner(Kind::ReplicaSet, "web-1").into(),
    ]);
    assert_eq!(out.lines(), ["delete Pod default/web-1-a (foreground deletion of ReplicaSet default/web-1)"]);
    let out = run(vec![deploy("web", deleting(&["foregroundDeletion"])), rs("web-1", rs_deleting)]);
    assert_eq!(out.lines(), ["delete ReplicaSet default/web-1 (foregroundDeletion finished)"]);
    let out = run(vec![deploy("web", deleting(&["foregroundDeletion"]))]);
    assert_eq!(out.lines(), ["delete Deployment default/web (foregroundDeletion finished)"]);
}

#[test]
fn an_object_marked_for_deletion_without_finalizers_is_deleted() {
    assert_eq!(
        run(vec![rs("web", deleting(&[]))]).lines(),
        ["delete ReplicaSet default/web (deletion requested, no finalizers left)"]
    );
    assert!(run(vec![rs("web", deleting(&["example.com/keep"]))]).actions.is_empty());
}
