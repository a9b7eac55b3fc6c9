//! The runtime's writes against a real etcd: creations in slow-start batches that stop at the first failing batch,
//! generated names, deletes only of the object the decision saw, the garbage collector's owner check against the
//! store, and the fence that holds a key until the cache shows its writes.

use std::collections::HashSet;
use std::time::Duration;

use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::Pod;
use serde_json::json;
use weft_api::{ObjectKey, Store};
use weft_control::action::{Action, Target};
use weft_control::events::{Ctl, Key};
use weft_control::leader::Leadership;
use weft_control::run::{ApplyError, Controllers, Options};
use weft_control::{Cache, Kind, Obj};
use weft_lab::EtcdFixture;

fn options(etcd: &str) -> Options {
    Options {
        etcd: weft_api::EtcdArgs::new(vec![etcd.to_string()]),
        leader: None,
        controllers: Ctl::ALL.into_iter().collect::<HashSet<_>>(),
        nodes: Default::default(),
        healthz_addr: None,
        metrics_addr: None,
        workers: 1,
        resync: Duration::from_secs(30),
        write_concurrency: 4,
    }
}

fn pod_named(generate_name: &str) -> Action {
    let p: Pod = serde_json::from_value(json!({
        "metadata": {"generateName": generate_name, "namespace": "default", "labels": {"app": "web"}},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]}
    }))
    .unwrap();
    Action::Create(Obj::Pod(p))
}

async fn setup() -> (EtcdFixture, Store, Controllers) {
    let etcd = EtcdFixture::start().unwrap();
    let store = Store::new(etcd.client().await.unwrap());
    let c = Controllers::new(store.clone(), Cache::default(), &options(etcd.endpoint()), Leadership::always());
    (etcd, store, c)
}

fn key() -> Key {
    Key::new(Ctl::ReplicaSet, ObjectKey::new(Some("default"), "web"))
}

#[tokio::test]
async fn creations_go_in_slow_start_batches_and_stop_at_the_first_failing_one() {
    let (_etcd, store, c) = setup().await;
    // Batches 1, 2, 4, 3: the second creation is invalid (a name with a slash), so the second batch fails and
    // the remaining seven are never sent.
    let mut actions: Vec<Action> = (0..10).map(|_| pod_named("web-")).collect();
    actions[1] = pod_named("bad/");
    let err = c.apply(&key(), actions).await.unwrap_err();
    assert!(matches!(err, ApplyError::Failed(ref e) if e.contains("name")), "{err:?}");
    let (pods, _) = store.list::<Pod>(Some("default")).await.unwrap();
    assert_eq!(pods.len(), 2, "the first batch and the valid half of the second");
    for p in &pods {
        let name = p.metadata.name.as_deref().unwrap();
        assert!(name.starts_with("web-") && name.len() == 9, "{name}");
        assert!(name[4..].chars().all(|ch| "bcdfghjklmnpqrstvwxz2456789".contains(ch)), "{name}");
    }
    assert!(!c.fenced_in(&key()), "the key waits until the cache shows its two pods");
}

#[tokio::test]
async fn deletes_touch_only_the_object_the_decision_saw() {
    let (_etcd, store, c) = setup().await;
    let p: Pod = serde_json::from_value(json!({"metadata": {"name": "p", "namespace": "default"},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]}}))
    .unwrap();
    let first = store.create(&p).await.unwrap();
    store.delete::<Pod>(Some("default"), "p", None).await.unwrap();
    let second = store.create(&p).await.unwrap();
    // The decision was about the first pod; the second one (same name, new uid) stays.
    let old_uid = first.metadata.uid.clone().unwrap();
    c.apply(&key(), vec![Action::delete(Kind::Pod, ObjectKey::new(Some("default"), "p"), &old_uid, "test")])
        .await
        .unwrap();
    let still: Pod = store.get(Some("default"), "p").await.unwrap();
    assert_eq!(still.metadata.uid, second.metadata.uid);
    let uid = second.metadata.uid.clone().unwrap();
    c.apply(&key(), vec![Action::delete(Kind::Pod, ObjectKey::new(Some("default"), "p"), &uid, "test")]).await.unwrap();
    assert!(store.get::<Pod>(Some("default"), "p").await.unwrap_err().is_not_found());
}

#[tokio::test]
async fn the_collector_checks_the_store_before_deleting_a_dependent() {
    let (_etcd, store, c) = setup().await;
    let rs: ReplicaSet = serde_json::from_value(json!({"metadata": {"name": "web", "namespace": "default"},
        "spec": {"selector": {"matchLabels": {"app": "web"}}, "template": {"metadata": {"labels": {"app": "web"}},
            "spec": {"containers": [{"name": "c", "image": "busybox"}]}}}}))
    .unwrap();
    let rs = store.create(&rs).await.unwrap();
    let p: Pod = serde_json::from_value(json!({"metadata": {"name": "web-a", "namespace": "default"},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]}}))
    .unwrap();
    let p = store.create(&p).await.unwrap();
    let owner = Target {
        kind: Kind::ReplicaSet,
        key: ObjectKey::new(Some("default"), "web"),
        uid: rs.metadata.uid.clone().unwrap(),
    };
    let delete = Action::Delete {
        target: Target {
            kind: Kind::Pod,
            key: ObjectKey::new(Some("default"), "web-a"),
            uid: p.metadata.uid.clone().unwrap(),
        },
        why: "owner gone".into(),
        owners_gone: vec![owner],
    };
    let gc = Key::all(Ctl::GarbageCollector);
    // A cache that lags said the owner was gone; the store says otherwise: nothing is deleted.
    c.apply(&gc, vec![delete.clone()]).await.unwrap();
    assert!(store.get::<Pod>(Some("default"), "web-a").await.is_ok());
    store.delete::<ReplicaSet>(Some("default"), "web", None).await.unwrap();
    c.apply(&gc, vec![delete]).await.unwrap();
    assert!(store.get::<Pod>(Some("default"), "web-a").await.unwrap_err().is_not_found());
}

#[tokio::test]
async fn updates_are_compare_and_swap_and_nothing_is_written_without_leadership() {
    let etcd = EtcdFixture::start().unwrap();
    let store = Store::new(etcd.client().await.unwrap());
    let p: Pod = serde_json::from_value(json!({"metadata": {"name": "p", "namespace": "default"},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]}}))
    .unwrap();
    let seen = store.create(&p).await.unwrap();
    let mut newer = seen.clone();
    newer.metadata.labels = Some([("x".to_string(), "1".to_string())].into());
    store.update(&newer).await.unwrap();
    let c = Controllers::new(store.clone(), Cache::default(), &options(etcd.endpoint()), Leadership::always());
    let mut stale = seen.clone();
    stale.metadata.annotations = Some([("stale".to_string(), "1".to_string())].into());
    let err = c.apply(&key(), vec![Action::update(Obj::Pod(stale.clone()), "bind")]).await.unwrap_err();
    assert!(matches!(err, ApplyError::Conflict(_)), "{err:?}");
    let stopped = Leadership::always();
    stopped.stop();
    let c = Controllers::new(store.clone(), Cache::default(), &options(etcd.endpoint()), stopped);
    let err = c.apply(&key(), vec![pod_named("web-")]).await.unwrap_err();
    assert!(matches!(err, ApplyError::NotLeader), "{err:?}");
    assert_eq!(store.list::<Pod>(Some("default")).await.unwrap().0.len(), 1);
}

#[tokio::test]
async fn an_ex_leaders_writes_fail_whole_once_the_lease_key_is_not_its_own() {
    use weft_api::store::Fence;
    let etcd = EtcdFixture::start().unwrap();
    let mut client = etcd.client().await.unwrap();
    let lease_key = "/registry/leases/kube-system/weft-controller";
    let ours = client.lease_grant(60, None).await.unwrap().id();
    let opts = etcd_client::PutOptions::new().with_lease(ours);
    client.put(lease_key, "{}", Some(opts)).await.unwrap();
    let store = Store::new(client.clone()).with_fence(Fence { key: lease_key.into(), lease_id: ours });
    let p: Pod = serde_json::from_value(json!({"metadata": {"name": "p", "namespace": "default"},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]}}))
    .unwrap();
    let created = store.create(&p).await.unwrap();
    // Another controller takes the key over (our etcd lease expired while we were paused).
    let theirs = client.lease_grant(60, None).await.unwrap().id();
    client.put(lease_key, "{}", Some(etcd_client::PutOptions::new().with_lease(theirs))).await.unwrap();
    let mut q = p.clone();
    q.metadata.name = Some("q".into());
    assert!(store.create(&q).await.unwrap_err().is_fenced());
    let mut changed = created.clone();
    changed.metadata.labels = Some([("x".to_string(), "1".to_string())].into());
    assert!(store.update(&changed).await.unwrap_err().is_fenced());
    assert!(store.delete::<Pod>(Some("default"), "p", None).await.unwrap_err().is_fenced());
    let plain = Store::new(client.clone());
    let (pods, _) = plain.list::<Pod>(Some("default")).await.unwrap();
    assert_eq!(pods.len(), 1, "nothing of the fenced writes landed");
    assert_eq!(pods[0].metadata.labels, None);
    // Through the controllers' runtime, a fenced write reads as lost leadership.
    let c = Controllers::new(store, Cache::default(), &options(etcd.endpoint()), Leadership::always());
    let err = c.apply(&key(), vec![pod_named("web-")]).await.unwrap_err();
    assert!(matches!(err, ApplyError::NotLeader), "{err:?}");
}
