//! Golden files for `weft get` tables and `weft describe` text: the objects in testdata/tables.yaml rendered at a
//! fixed "now" must match testdata/*.golden byte for byte. `UPDATE_GOLDEN=1 cargo test -p weft-cli --test golden`
//! rewrites them.

use std::path::PathBuf;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Event;
use k8s_openapi::jiff::Timestamp;
use weft_api::labels::Selector;
use weft_api::manifest::{self, AnyObject};
use weft_api::{DaemonSet, Deployment, Endpoints, Namespace, Node, Pod, ReplicaSet, ReplicationController, Service};
use weft_cli::describe;
use weft_cli::table::{self, Columns, Tabular};
use weft_cli::{owned, rollout};

fn testdata(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata").join(name)
}

fn check(name: &str, got: &str) {
    let path = testdata(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, got).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (UPDATE_GOLDEN=1 writes it)", path.display()));
    assert_eq!(got, want, "{name} differs; UPDATE_GOLDEN=1 rewrites it after review");
}

#[derive(Default)]
struct Objects {
    svcs: Vec<Service>,
    eps: Vec<Endpoints>,
    pods: Vec<Pod>,
    nodes: Vec<Node>,
    nss: Vec<Namespace>,
    deploys: Vec<Deployment>,
    rss: Vec<ReplicaSet>,
    dss: Vec<DaemonSet>,
    rcs: Vec<ReplicationController>,
    leases: Vec<Lease>,
}

fn objects() -> Objects {
    let docs = manifest::load(&[testdata("tables.yaml")]).unwrap();
    let mut o = Objects::default();
    for d in docs {
        assert!(d.unknown_fields.is_empty(), "{}: {:?} did not survive decoding", d.source, d.unknown_fields);
        match d.object {
            AnyObject::Service(s) => o.svcs.push(s),
            AnyObject::Endpoints(e) => o.eps.push(e),
            AnyObject::Pod(p) => o.pods.push(p),
            AnyObject::Node(n) => o.nodes.push(n),
            AnyObject::Namespace(n) => o.nss.push(n),
            AnyObject::Deployment(d) => o.deploys.push(d),
            AnyObject::ReplicaSet(r) => o.rss.push(r),
            AnyObject::DaemonSet(d) => o.dss.push(d),
            AnyObject::ReplicationController(r) => o.rcs.push(r),
            AnyObject::Lease(l) => o.leases.push(l),
        }
    }
    o
}

fn now() -> Timestamp {
    "2026-01-02T00:00:00Z".parse().unwrap()
}

#[test]
fn tables_match_golden_files() {
    let o = objects();
    let now = now();
    let default_svcs: Vec<_> =
        o.svcs.iter().filter(|s| s.metadata.namespace.as_deref() == Some("default")).cloned().collect();
    let plain = Columns::default();
    let wide = Columns { wide: true, ..Default::default() };
    let all = Columns { namespace: true, ..Default::default() };
    check("get-svc.golden", &table::get_table(&default_svcs, plain, now));
    check("get-svc-wide.golden", &table::get_table(&default_svcs, wide, now));
    check("get-svc-all-namespaces.golden", &table::get_table(&o.svcs, all, now));
    check("get-ep.golden", &table::get_table(&o.eps, plain, now));
    check("get-po.golden", &table::get_table(&o.pods, plain, now));
    check("get-po-wide.golden", &table::get_table(&o.pods, wide, now));
    check("get-no.golden", &table::get_table(&o.nodes, plain, now));
    check("get-no-wide.golden", &table::get_table(&o.nodes, wide, now));
    check("get-ns.golden", &table::get_table(&o.nss, plain, now));
    check("get-deploy.golden", &table::get_table(&o.deploys, plain, now));
    check("get-deploy-wide.golden", &table::get_table(&o.deploys, wide, now));
    check("get-rs.golden", &table::get_table(&o.rss, plain, now));
    check("get-rs-wide.golden", &table::get_table(&o.rss, wide, now));
    check("get-ds.golden", &table::get_table(&o.dss, plain, now));
    check("get-ds-wide.golden", &table::get_table(&o.dss, wide, now));
    check("get-rc.golden", &table::get_table(&o.rcs, plain, now));
    check("get-rc-wide.golden", &table::get_table(&o.rcs, wide, now));
    check("get-lease-all-namespaces.golden", &Lease::table(&o.leases, all, now).render());

    // `weft get svc,ep`: one table per kind, names prefixed with the kind, a blank line between.
    let svc =
        Service::table(&default_svcs, Columns { kind_prefix: Some(weft_api::Kind::Service), ..plain }, now).render();
    let ep = Endpoints::table(&o.eps, Columns { kind_prefix: Some(weft_api::Kind::Endpoints), ..plain }, now).render();
    check("get-svc-ep.golden", &format!("{svc}\n{ep}"));

    // `-l` with a set-based selector picks the rows.
    let sel = Selector::parse("app in (nginx,guestbook),!pod-template-hash").unwrap();
    let picked: Vec<_> = o.rss.iter().filter(|r| sel.matches(r.metadata.labels.as_ref())).cloned().collect();
    check("get-rs-selector.golden", &table::get_table(&picked, plain, now));
}

fn named<'a, T: k8s_openapi::Metadata<Ty = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>>(
    items: &'a [T],
    name: &str,
) -> &'a T {
    items.iter().find(|o| o.metadata().name.as_deref() == Some(name)).unwrap_or_else(|| panic!("no {name}"))
}

fn scaled_event() -> Event {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": "nginx-deployment.1", "namespace": "default"},
        "involvedObject": {"kind": "Deployment", "name": "nginx-deployment", "namespace": "default",
                           "uid": "0c5e6e5a-0000-4000-8000-000000000001"},
        "type": "Normal",
        "reason": "ScalingReplicaSet",
        "message": "Scaled up replica set nginx-deployment-5d59d67564 to 3",
        "source": {"component": "deployment-controller"},
        "firstTimestamp": "2026-01-01T23:30:00Z",
        "lastTimestamp": "2026-01-01T23:30:00Z",
        "count": 1
    }))
    .unwrap()
}

#[test]
fn describe_matches_golden_files() {
    let o = objects();
    let now = now();
    let none: &[Event] = &[];

    let pod = named(&o.pods, "nginx-deployment-5d59d67564-7hx2k");
    check("describe-pod.golden", &describe::describe_pod(pod, Some(none), now));
    check("describe-pod-pending.golden", &describe::describe_pod(named(&o.pods, "new"), Some(none), now));

    let d = named(&o.deploys, "nginx-deployment");
    let owned = owned::owned_replicasets(d, &o.rss);
    let (new, old) = owned::new_and_old(d, &owned);
    assert_eq!(new.as_ref().and_then(|r| r.metadata.name.as_deref()), Some("nginx-deployment-5d59d67564"));
    check(
        "describe-deploy.golden",
        &describe::describe_deployment(d, &old, new.as_ref(), Some(&[scaled_event()]), now),
    );

    let frontend = named(&o.rss, "frontend");
    let counts = describe::PodCounts { running: 2, waiting: 1, ..Default::default() };
    check("describe-rs.golden", &describe::describe_replicaset(frontend, counts, Some(none), now));
    let rs = named(&o.rss, "nginx-deployment-5d59d67564");
    let sel = Selector::from_label_selector(Some(&rs.spec.selector)).unwrap();
    let counts = describe::pod_counts(&o.pods, &sel, rs.metadata.uid.as_deref().unwrap());
    assert_eq!(counts, describe::PodCounts { running: 1, ..Default::default() });
    check("describe-rs-owned.golden", &describe::describe_replicaset(rs, counts, None, now));

    let rc = named(&o.rcs, "nginx");
    check("describe-rc.golden", &describe::describe_replicationcontroller(rc, Default::default(), Some(none), now));
    let ds = named(&o.dss, "fluentd");
    check("describe-ds.golden", &describe::describe_daemonset(ds, Default::default(), Some(none), now));

    let svc = named(&o.svcs, "my-service");
    let ep = named(&o.eps, "my-service");
    check("describe-svc.golden", &describe::describe_service(svc, Some(ep), Some(none), now));
    check("describe-svc-lb.golden", &describe::describe_service(named(&o.svcs, "lb"), None, Some(none), now));
    check("describe-ep.golden", &describe::describe_endpoints(named(&o.eps, "many"), Some(none), now));

    let node = named(&o.nodes, "node-1");
    let lease = Err("leases.coordination.k8s.io \"node-1\" not found".to_string());
    check("describe-node.golden", &describe::describe_node(node, &o.pods, Some(&lease), Some(none), now));
    check("describe-ns.golden", &describe::describe_namespace(named(&o.nss, "default")));

    // `rollout history` and `--revision`.
    let h = rollout::history(&owned);
    check("rollout-history.golden", &rollout::history_table(&h));
    check("rollout-history-revision.golden", &describe::pod_template_raw(&h[&2]));
}
