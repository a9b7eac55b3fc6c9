//! The object store and informer against a real etcd: create/get/list/update/delete, conflicts, watch and
//! compaction, and an informer that follows changes through an etcd restart. etcdctl is the independent check.

use std::process::Command;
use std::time::Duration;

use weft_api::informer::Backoff;
use weft_api::store::{Error, WatchEvent};
use weft_api::{EtcdArgs, Informer, Namespace, ObjectKey, Service, Store};
use weft_lab::EtcdFixture;

async fn store(etcd: &EtcdFixture) -> Store {
    let _ = tracing_subscriber::fmt().with_test_writer().with_env_filter("weft_api=info").try_init();
    Store::new(weft_api::connect(&EtcdArgs::new(vec![etcd.endpoint().to_string()])).await.unwrap())
}

fn svc(name: &str, port: i32) -> Service {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {"selector": {"app": "MyApp"}, "ports": [{"port": port, "targetPort": 9376}]}
    }))
    .unwrap()
}

fn etcdctl(etcd: &EtcdFixture, args: &[&str]) -> String {
    let out = Command::new("etcdctl").arg("--endpoints").arg(etcd.endpoint()).args(args).output().unwrap();
    assert!(out.status.success(), "etcdctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test]
async fn create_get_list_update_delete_round_trip_through_etcd() {
    let etcd = EtcdFixture::start().unwrap();
    let s = store(&etcd).await;

    let created = s.create(&svc("web", 80)).await.unwrap();
    let meta = &created.metadata;
    assert_eq!(meta.namespace.as_deref(), Some("default"), "namespaced kinds default to `default`");
    assert_eq!(meta.generation, Some(1));
    assert!(meta.creation_timestamp.is_some());
    let uid = meta.uid.clone().unwrap();
    assert_eq!(uid.len(), 36);

    // What etcdctl sees is Kubernetes JSON with apiVersion and kind, and the resourceVersion is the mod revision.
    let raw = etcdctl(&etcd, &["get", "/registry/services/default/web", "--print-value-only"]);
    let v: serde_json::Value = serde_json::from_str(raw.trim()).unwrap();
    assert_eq!(v["apiVersion"], "v1");
    assert_eq!(v["kind"], "Service");
    assert_eq!(v["metadata"]["uid"], uid.as_str());
    assert!(v["metadata"].get("resourceVersion").is_none(), "the revision is etcd's, not stored: {v}");
    let json = etcdctl(&etcd, &["get", "/registry/services/default/web", "-w", "json"]);
    let mod_rev = serde_json::from_str::<serde_json::Value>(&json).unwrap()["kvs"][0]["mod_revision"].as_i64().unwrap();
    assert_eq!(meta.resource_version.as_deref(), Some(mod_rev.to_string().as_str()));

    let again = s.create(&svc("web", 80)).await.unwrap_err();
    assert!(again.is_already_exists(), "{again}");

    let got: Service = s.get(Some("default"), "web").await.unwrap();
    assert_eq!(got, created);
    let missing = s.get::<Service>(Some("default"), "nope").await.unwrap_err();
    assert!(missing.is_not_found(), "{missing}");

    s.create(&svc("api", 81)).await.unwrap();
    let mut other = svc("web", 82);
    other.metadata.namespace = Some("prod".into());
    s.create(&other).await.unwrap();
    let (all, rev) = s.list::<Service>(None).await.unwrap();
    assert_eq!(all.len(), 3);
    assert!(rev >= mod_rev);
    let (default, _) = s.list::<Service>(Some("default")).await.unwrap();
    let names: Vec<_> = default.iter().map(|s| s.metadata.name.clone().unwrap()).collect();
    assert_eq!(names, ["api", "web"]);

    // Update with the current resourceVersion: spec changed → generation 2; uid and creationTimestamp kept.
    let mut changed = got.clone();
    changed.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].port = 8080;
    changed.metadata.uid = Some("forged".into());
    let updated = s.update(&changed).await.unwrap();
    assert_eq!(updated.metadata.generation, Some(2));
    assert_eq!(updated.metadata.uid.as_deref(), Some(uid.as_str()));
    assert_ne!(updated.metadata.resource_version, got.metadata.resource_version);

    // A label-only change keeps the generation.
    let mut relabel = updated.clone();
    relabel.metadata.labels.as_mut().unwrap().insert("tier".into(), "fe".into());
    let relabeled = s.update(&relabel).await.unwrap();
    assert_eq!(relabeled.metadata.generation, Some(2));

    // The stale copy conflicts and writes nothing.
    let stale = s.update(&changed).await.unwrap_err();
    assert!(stale.is_conflict(), "{stale}");
    let now: Service = s.get(Some("default"), "web").await.unwrap();
    assert_eq!(now, relabeled);

    // Delete with a stale precondition conflicts; with the right one it deletes and returns the last version.
    let bad = s.delete::<Service>(Some("default"), "web", got.metadata.resource_version.as_deref()).await.unwrap_err();
    assert!(bad.is_conflict(), "{bad}");
    let last =
        s.delete::<Service>(Some("default"), "web", relabeled.metadata.resource_version.as_deref()).await.unwrap();
    assert_eq!(last.metadata.uid.as_deref(), Some(uid.as_str()));
    assert!(etcdctl(&etcd, &["get", "/registry/services/default/web"]).is_empty());
    assert!(s.delete::<Service>(Some("default"), "web", None).await.unwrap_err().is_not_found());

    // Cluster-scoped kinds have no namespace segment.
    let mut ns = Namespace::default();
    ns.metadata.name = Some("prod".into());
    ns.metadata.namespace = Some("ignored".into());
    s.create(&ns).await.unwrap();
    assert!(!etcdctl(&etcd, &["get", "/registry/namespaces/prod"]).is_empty());
}

#[tokio::test]
async fn undecodable_values_are_skipped_not_fatal() {
    let etcd = EtcdFixture::start().unwrap();
    let s = store(&etcd).await;
    s.create(&svc("good", 80)).await.unwrap();
    etcdctl(&etcd, &["put", "/registry/services/default/garbage", "{not json"]);
    etcdctl(&etcd, &["put", "/registry/services/default/wrongtype", r#"{"spec":{"ports":"eighty"}}"#]);
    etcdctl(&etcd, &["put", "/registry/services/too/many/segments", "{}"]);
    s.create(&svc("also-good", 80)).await.unwrap();
    let (items, _) = s.list::<Service>(None).await.unwrap();
    let names: Vec<_> = items.iter().map(|s| s.metadata.name.clone().unwrap()).collect();
    assert_eq!(names, ["also-good", "good"]);
}

#[tokio::test]
async fn watch_reports_changes_in_order_and_compaction_as_an_error() {
    let etcd = EtcdFixture::start().unwrap();
    let s = store(&etcd).await;
    let (_, rev) = s.list::<Service>(None).await.unwrap();
    let mut w = s.watch::<Service>(None, rev + 1).await.unwrap();

    let a = s.create(&svc("a", 80)).await.unwrap();
    etcdctl(&etcd, &["put", "/registry/services/default/garbage", "{not json"]);
    let mut a2 = a.clone();
    a2.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].port = 81;
    let a2 = s.update(&a2).await.unwrap();
    let gone = s.delete::<Service>(None, "a", None).await.unwrap();

    assert_eq!(next(&mut w).await, WatchEvent::Added(a.clone()));
    // A value readers refuse reads as the deletion of its key (a cache drops what it held there), with no content.
    match next(&mut w).await {
        WatchEvent::Deleted(g) => assert_eq!((g.metadata.name.as_deref(), g.spec), (Some("garbage"), None)),
        other => panic!("expected the refused value as Deleted, got {other:?}"),
    }
    assert_eq!(next(&mut w).await, WatchEvent::Modified(a2.clone()));
    match next(&mut w).await {
        WatchEvent::Deleted(last) => {
            assert_eq!(last.spec, a2.spec, "a deletion carries the last stored object");
            assert_eq!(last.metadata.resource_version, gone.metadata.resource_version);
        }
        other => panic!("expected Deleted, got {other:?}"),
    }
    assert!(w.revision() > a2.metadata.resource_version.as_deref().unwrap().parse::<i64>().unwrap());

    // Compact past the start revision: a new watch from there must say so, so the caller relists.
    let (_, head) = s.list::<Service>(None).await.unwrap();
    etcdctl(&etcd, &["compaction", &head.to_string()]);
    let mut old = s.watch::<Service>(None, rev + 1).await.unwrap();
    let err = tokio::time::timeout(Duration::from_secs(5), old.next()).await.expect("an answer").unwrap_err();
    assert!(matches!(err, Error::Compacted { .. }), "{err}");
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..200 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn informer_follows_changes_and_survives_an_etcd_restart() {
    let mut etcd = EtcdFixture::start().unwrap();
    let s = store(&etcd).await;
    s.create(&svc("before", 80)).await.unwrap();

    let (inf, mut events, run) = Informer::<Service>::new(s.clone(), None);
    let task = tokio::spawn(run);
    tokio::time::timeout(Duration::from_secs(10), inf.wait_synced()).await.unwrap();
    assert!(inf.has_synced());
    let ev = events.recv().await.unwrap();
    assert_eq!(ev.key, ObjectKey::new(Some("default"), "before"));
    assert!(ev.old.is_none() && ev.new.is_some());

    let b = s.create(&svc("b", 80)).await.unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(5), events.recv()).await.unwrap().unwrap();
    assert_eq!(ev.new.as_deref(), Some(&b));
    let mut b2 = b.clone();
    b2.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].port = 90;
    let b2 = s.update(&b2).await.unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(5), events.recv()).await.unwrap().unwrap();
    assert_eq!((ev.old.as_deref(), ev.new.as_deref()), (Some(&b), Some(&b2)));
    s.delete::<Service>(None, "before", None).await.unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(5), events.recv()).await.unwrap().unwrap();
    assert_eq!(ev.key.name, "before");
    assert!(ev.new.is_none());
    assert_eq!(inf.list().len(), 1);

    // etcd goes away; changes made while the watch is broken arrive once it is back.
    etcd.restart().unwrap();
    let c = s.create(&svc("c", 80)).await.unwrap();
    s.delete::<Service>(None, "b", None).await.unwrap();
    let key_c = ObjectKey::new(Some("default"), "c");
    wait_for("the informer to see c and lose b", || {
        inf.get(&key_c).as_deref() == Some(&c) && inf.get(&ObjectKey::new(Some("default"), "b")).is_none()
    })
    .await;
    let mut seen = Vec::new();
    while let Ok(ev) = events.try_recv() {
        seen.push((ev.key.name.clone(), ev.new.is_some()));
    }
    assert_eq!(seen, [("c".to_string(), true), ("b".to_string(), false)]);
    task.abort();
}

/// The first port of a Service, kept by a transformed informer; Services on port 1 are "not interesting".
fn first_port(s: Service) -> Option<i32> {
    s.spec?.ports?.first().map(|p| p.port).filter(|p| *p != 1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transformed_informer_caches_the_transform_and_drops_what_it_rejects() {
    let etcd = EtcdFixture::start().unwrap();
    let s = store(&etcd).await;
    s.create(&svc("a", 80)).await.unwrap();
    s.create(&svc("ignored", 1)).await.unwrap();

    let (inf, mut events, run) =
        Informer::<i32>::transformed::<Service>(s.clone(), None, Backoff::default(), first_port);
    let task = tokio::spawn(run);
    tokio::time::timeout(Duration::from_secs(10), inf.wait_synced()).await.unwrap();
    let a = ObjectKey::new(Some("default"), "a");
    assert_eq!(inf.get(&a).as_deref(), Some(&80));
    assert_eq!(inf.len(), 1, "the service the transform rejects is not cached");
    let ev = events.recv().await.unwrap();
    assert_eq!((ev.key.clone(), ev.old.as_deref(), ev.new.as_deref()), (a.clone(), None, Some(&80)));

    // A change is transformed; a change the transform rejects is a delete to the reader; a rejected object
    // that becomes interesting is an add.
    let mut cur = s.get::<Service>(None, "a").await.unwrap();
    cur.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].port = 90;
    let cur = s.update(&cur).await.unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(5), events.recv()).await.unwrap().unwrap();
    assert_eq!((ev.old.as_deref(), ev.new.as_deref()), (Some(&80), Some(&90)));
    let mut cur = cur;
    cur.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].port = 1;
    s.update(&cur).await.unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(5), events.recv()).await.unwrap().unwrap();
    assert_eq!((ev.key.clone(), ev.old.as_deref(), ev.new.as_deref()), (a.clone(), Some(&90), None));
    assert!(inf.get(&a).is_none());
    let mut ignored = s.get::<Service>(None, "ignored").await.unwrap();
    ignored.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].port = 53;
    s.update(&ignored).await.unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(5), events.recv()).await.unwrap().unwrap();
    assert_eq!((ev.key.name.as_str(), ev.old.as_deref(), ev.new.as_deref()), ("ignored", None, Some(&53)));
    assert_eq!(inf.list().iter().map(|p| **p).collect::<Vec<_>>(), [53]);
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn informer_relists_after_compaction_and_emits_the_differences() {
    let mut etcd = EtcdFixture::start().unwrap();
    let s = store(&etcd).await;
    s.create(&svc("keep", 80)).await.unwrap();
    s.create(&svc("drop", 80)).await.unwrap();
    // A long backoff holds the informer off after its watch breaks, long enough to compact its revision away.
    let slow = Backoff { min: Duration::from_secs(4), max: Duration::from_secs(4) };
    let (inf, mut events, run) = Informer::<Service>::with_backoff(s.clone(), Some("default".into()), slow);
    let task = tokio::spawn(run);
    inf.wait_synced().await;
    assert_eq!(inf.lists(), 1, "the first list is counted once it is in the cache");
    let _ = (events.recv().await, events.recv().await);
    // An event proves the watch is established before etcd goes away.
    s.create(&svc("sentinel", 80)).await.unwrap();
    assert_eq!(events.recv().await.unwrap().key.name, "sentinel");

    etcd.restart().unwrap();
    s.delete::<Service>(None, "drop", None).await.unwrap();
    let new = s.create(&svc("new", 80)).await.unwrap();
    let (_, head) = s.list::<Service>(None).await.unwrap();
    etcdctl(&etcd, &["compaction", &head.to_string()]);

    wait_for("the relisted cache", || {
        inf.list().len() == 3 && inf.get(&ObjectKey::new(Some("default"), "drop")).is_none()
    })
    .await;
    assert_eq!(inf.get(&ObjectKey::new(Some("default"), "new")).as_deref(), Some(&new));
    let mut seen = Vec::new();
    while let Ok(ev) = events.try_recv() {
        seen.push((ev.key.name.clone(), ev.old.is_some(), ev.new.is_some()));
    }
    assert_eq!(seen, [("drop".to_string(), true, false), ("new".to_string(), false, true)]);
    assert!(inf.lists() >= 2, "a relist is counted, so readers can tell a full sync from events");
    task.abort();
}

async fn next(w: &mut weft_api::store::Watch<Service>) -> WatchEvent<Service> {
    tokio::time::timeout(Duration::from_secs(5), w.next()).await.expect("watch event").unwrap()
}

#[tokio::test]
async fn lists_are_paged_at_one_revision_and_skip_garbage() {
    let etcd = EtcdFixture::start().unwrap();
    let s = store(&etcd).await.with_page_size(3);
    for i in 0..10 {
        s.create(&svc(&format!("web{i:02}"), 80)).await.unwrap();
    }
    etcdctl(&etcd, &["put", "/registry/services/default/web04x", "{not json"]);
    let (all, rev) = s.list::<Service>(None).await.unwrap();
    let names: Vec<String> = all.iter().filter_map(|o| o.metadata.name.clone()).collect();
    let want: Vec<String> = (0..10).map(|i| format!("web{i:02}")).collect();
    assert_eq!(names, want, "every object once, in key order, the garbage one skipped");
    assert!(rev > 0);
    let (in_default, _) = s.list::<Service>(Some("default")).await.unwrap();
    assert_eq!(in_default.len(), 10);
}

#[tokio::test]
async fn a_list_larger_than_one_grpc_message_is_read_whole() {
    // 1,100 objects of ~4.5 KB: ~5 MB, over the client's 4 MiB reply limit for a single range request.
    let etcd = EtcdFixture::start().unwrap();
    let s = store(&etcd).await;
    let mut client = s.client();
    let filler = "x".repeat(4500);
    for chunk in (0..1100).collect::<Vec<_>>().chunks(100) {
        let ops: Vec<etcd_client::TxnOp> = chunk
            .iter()
            .map(|i| {
                let name = format!("big{i:04}");
                let v = serde_json::json!({"apiVersion": "v1", "kind": "Service",
                    "metadata": {"name": name, "namespace": "default", "annotations": {"filler": filler}},
                    "spec": {"ports": [{"port": 80}]}});
                etcd_client::TxnOp::put(format!("/registry/services/default/{name}"), v.to_string(), None)
            })
            .collect();
        client.txn(etcd_client::Txn::new().and_then(ops)).await.unwrap();
    }
    let (all, _) = s.list::<Service>(None).await.unwrap();
    assert_eq!(all.len(), 1100);
    // The same list in one request is what used to fail.
    assert!(s.clone().with_page_size(1_000_000).list::<Service>(None).await.is_err(), "one reply over 4 MiB");
}
