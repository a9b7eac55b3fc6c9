//! Which reconciles a change wakes: a work-queue key is a controller plus the object it reconciles (the scheduler,
//! node lifecycle and garbage collector reconcile everything at once under one key each). Pure: from the cache and
//! the object before and after the change.

use std::fmt;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Endpoints, Node, Pod, ReplicationController, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use weft_api::labels::Selector;
use weft_api::ObjectKey;

use crate::cache::Cache;
use crate::obj::{controller_of, key_of, namespace, Kind};
use crate::pod;

/// The controllers, by their kube-controller-manager names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Ctl {
    ReplicaSet,
    ReplicationController,
    Deployment,
    DaemonSet,
    Endpoints,
    Scheduler,
    NodeLifecycle,
    GarbageCollector,
}

impl Ctl {
    pub const ALL: [Ctl; 8] = [
        Ctl::ReplicaSet,
        Ctl::ReplicationController,
        Ctl::Deployment,
        Ctl::DaemonSet,
        Ctl::Endpoints,
        Ctl::Scheduler,
        Ctl::NodeLifecycle,
        Ctl::GarbageCollector,
    ];

    /// The name `--controllers` takes.
    pub fn name(self) -> &'static str {
        match self {
            Ctl::ReplicaSet => "replicaset",
            Ctl::ReplicationController => "replicationcontroller",
            Ctl::Deployment => "deployment",
            Ctl::DaemonSet => "daemonset",
            Ctl::Endpoints => "endpoint",
            Ctl::Scheduler => "scheduler",
            Ctl::NodeLifecycle => "nodelifecycle",
            Ctl::GarbageCollector => "garbagecollector",
        }
    }

    pub fn parse(s: &str) -> Option<Ctl> {
        Ctl::ALL.into_iter().find(|c| c.name() == s || (s == "endpoints" && *c == Ctl::Endpoints))
    }
}

impl fmt::Display for Ctl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    pub ctl: Ctl,
    pub obj: ObjectKey,
}

impl Key {
    pub fn new(ctl: Ctl, obj: ObjectKey) -> Key {
        Key { ctl, obj }
    }

    /// The one key of a controller that reconciles everything at once.
    pub fn all(ctl: Ctl) -> Key {
        Key { ctl, obj: ObjectKey::new(None, "") }
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.obj.name.is_empty() {
            write!(f, "{}", self.ctl)
        } else {
            write!(f, "{} {}", self.ctl, self.obj)
        }
    }
}

fn owner_key(meta: &ObjectMeta, kind: Kind, ctl: Ctl) -> Option<Key> {
    let r = controller_of(meta)?;
    (Kind::of_owner(r) == Some(kind)).then(|| Key::new(ctl, ObjectKey::new(Some(namespace(meta)), &r.name)))
}

fn selected_by<K>(
    meta: &ObjectMeta,
    candidates: Vec<std::sync::Arc<K>>,
    selector: impl Fn(&K) -> Selector,
    ctl: Ctl,
    key: impl Fn(&K) -> ObjectKey,
) -> Vec<Key> {
    candidates.iter().filter(|c| selector(c).matches(meta.labels.as_ref())).map(|c| Key::new(ctl, key(c))).collect()
}

fn rs_selector(rs: &ReplicaSet) -> Selector {
    Selector::from_label_selector(Some(&rs.spec.selector)).unwrap_or(Selector::Nothing)
}

fn rc_selector(rc: &ReplicationController) -> Selector {
    let spec = rc.spec.as_ref();
    let template =
        spec.and_then(|s| s.template.as_ref()).and_then(|t| t.metadata.as_ref()).and_then(|m| m.labels.as_ref());
    match spec.and_then(|s| s.selector.as_ref()).filter(|s| !s.is_empty()).or(template) {
        Some(s) => Selector::from_map(s),
        None => Selector::Nothing,
    }
}

/// A Service's selector for its Endpoints; Services without one get hand-written Endpoints.
pub fn service_selector(svc: &Service) -> Option<Selector> {
    svc.spec.as_ref()?.selector.as_ref().filter(|s| !s.is_empty()).map(Selector::from_map)
}

/// True when the garbage collector should look: an object went away (its dependents may be orphans now), is
/// being deleted (finalizers to run), or names an owner the cache does not hold.
fn gc_interest(cache: &Cache, new: Option<&ObjectMeta>) -> bool {
    match new {
        None => true,
        Some(m) => m.deletion_timestamp.is_some() || has_missing_owner(cache, m),
    }
}

fn has_missing_owner(cache: &Cache, m: &ObjectMeta) -> bool {
    m.owner_references.iter().flatten().any(|r| match Kind::of_owner(r) {
        Some(kind) => cache
            .meta(kind, &ObjectKey::new(Some(namespace(m)), &r.name))
            .is_none_or(|o| o.uid.as_deref() != Some(r.uid.as_str()) || o.deletion_timestamp.is_some()),
        None => false,
    })
}

fn schedulable(p: &Pod) -> bool {
    pod::node_name(p).is_empty()
        && pod::is_active(p)
        && p.spec.as_ref().and_then(|s| s.scheduler_name.as_deref()).is_none_or(|s| s == crate::scheduler::NAME)
}

pub fn for_pod(cache: &Cache, old: Option<&Pod>, new: Option<&Pod>) -> Vec<Key> {
    let mut keys = Vec::new();
    for p in [old, new].into_iter().flatten() {
        let m = &p.metadata;
        keys.extend(owner_key(m, Kind::ReplicaSet, Ctl::ReplicaSet));
        keys.extend(owner_key(m, Kind::ReplicationController, Ctl::ReplicationController));
        keys.extend(owner_key(m, Kind::DaemonSet, Ctl::DaemonSet));
        let ns = namespace(m);
        for svc in cache.services.in_namespace(ns) {
            if service_selector(&svc).is_some_and(|s| s.matches(m.labels.as_ref())) {
                keys.push(Key::new(Ctl::Endpoints, key_of(&svc.metadata)));
            }
        }
    }
    if let Some(p) = new.filter(|p| controller_of(&p.metadata).is_none() && pod::is_active(p)) {
        let m = &p.metadata;
        let ns = namespace(m);
        keys.extend(selected_by(m, cache.replicasets.in_namespace(ns), rs_selector, Ctl::ReplicaSet, |x| {
            key_of(&x.metadata)
        }));
        keys.extend(selected_by(m, cache.rcs.in_namespace(ns), rc_selector, Ctl::ReplicationController, |x| {
            key_of(&x.metadata)
        }));
        keys.extend(selected_by(
            m,
            cache.daemonsets.in_namespace(ns),
            |d: &DaemonSet| Selector::from_label_selector(Some(&d.spec.selector)).unwrap_or(Selector::Nothing),
            Ctl::DaemonSet,
            |x| key_of(&x.metadata),
        ));
    }
    // The scheduler cares about pods waiting for a node and about bound pods that stop using one.
    let freed = old.is_some_and(|o| !pod::node_name(o).is_empty() && pod::is_active(o))
        && new.is_none_or(|n| !pod::is_active(n));
    if new.is_some_and(schedulable) || freed {
        keys.push(Key::all(Ctl::Scheduler));
    }
    // A deleted pod matters to the collector only when its owner waits for it (foreground deletion).
    let owner_waits = |p: &Pod| {
        p.metadata.owner_references.iter().flatten().any(|r| {
            Kind::of_owner(r).is_some_and(|k| {
                cache
                    .meta(k, &ObjectKey::new(Some(namespace(&p.metadata)), &r.name))
                    .is_some_and(|o| o.deletion_timestamp.is_some())
            })
        })
    };
    let gc = match new {
        None => old.is_some_and(owner_waits),
        Some(n) => gc_interest(cache, Some(&n.metadata)),
    };
    if gc {
        keys.push(Key::all(Ctl::GarbageCollector));
    }
    dedup(keys)
}

pub fn for_replicaset(cache: &Cache, old: Option<&ReplicaSet>, new: Option<&ReplicaSet>) -> Vec<Key> {
    let mut keys = Vec::new();
    for rs in [old, new].into_iter().flatten() {
        keys.push(Key::new(Ctl::ReplicaSet, key_of(&rs.metadata)));
        keys.extend(owner_key(&rs.metadata, Kind::Deployment, Ctl::Deployment));
    }
    if let Some(rs) = new.filter(|r| controller_of(&r.metadata).is_none()) {
        let m = &rs.metadata;
        keys.extend(selected_by(
            m,
            cache.deployments.in_namespace(namespace(m)),
            |d: &Deployment| Selector::from_label_selector(Some(&d.spec.selector)).unwrap_or(Selector::Nothing),
            Ctl::Deployment,
            |x| key_of(&x.metadata),
        ));
    }
    if gc_interest(cache, new.map(|n| &n.metadata)) {
        keys.push(Key::all(Ctl::GarbageCollector));
    }
    dedup(keys)
}

/// Deployments, DaemonSets and ReplicationControllers: their own key, and the collector's when it should look.
pub fn for_owner<K: weft_api::Object>(cache: &Cache, ctl: Ctl, old: Option<&K>, new: Option<&K>) -> Vec<Key> {
    let mut keys: Vec<Key> = [old, new].into_iter().flatten().map(|o| Key::new(ctl, key_of(o.metadata()))).collect();
    if gc_interest(cache, new.map(|n| n.metadata())) {
        keys.push(Key::all(Ctl::GarbageCollector));
    }
    dedup(keys)
}

pub fn for_service(old: Option<&Service>, new: Option<&Service>) -> Vec<Key> {
    dedup([old, new].into_iter().flatten().map(|s| Key::new(Ctl::Endpoints, key_of(&s.metadata))).collect())
}

/// An Endpoints change matters only for a Service with a selector (its Endpoints are ours to keep right).
pub fn for_endpoints(cache: &Cache, old: Option<&Endpoints>, new: Option<&Endpoints>) -> Vec<Key> {
    let mut keys = Vec::new();
    for e in [old, new].into_iter().flatten() {
        let k = key_of(&e.metadata);
        if cache.services.get(&k).is_some_and(|s| service_selector(&s).is_some()) {
            keys.push(Key::new(Ctl::Endpoints, k));
        }
    }
    if new.is_some() && gc_interest(cache, new.map(|n| &n.metadata)) {
        keys.push(Key::all(Ctl::GarbageCollector));
    }
    dedup(keys)
}

pub fn for_node(cache: &Cache, _old: Option<&Node>, _new: Option<&Node>) -> Vec<Key> {
    let mut keys: Vec<Key> =
        cache.daemonsets.list().iter().map(|d| Key::new(Ctl::DaemonSet, key_of(&d.metadata))).collect();
    keys.push(Key::all(Ctl::Scheduler));
    keys.push(Key::all(Ctl::NodeLifecycle));
    keys
}

pub fn for_lease(old: Option<&Lease>, new: Option<&Lease>) -> Vec<Key> {
    let node_lease = [old, new]
        .into_iter()
        .flatten()
        .any(|l| l.metadata.namespace.as_deref() == Some(crate::nodes::LEASE_NAMESPACE));
    if node_lease {
        vec![Key::all(Ctl::NodeLifecycle)]
    } else {
        vec![]
    }
}

/// Every key: what a periodic resync enqueues.
pub fn all_keys(cache: &Cache) -> Vec<Key> {
    let mut keys = Vec::new();
    keys.extend(cache.replicasets.list().iter().map(|o| Key::new(Ctl::ReplicaSet, key_of(&o.metadata))));
    keys.extend(cache.rcs.list().iter().map(|o| Key::new(Ctl::ReplicationController, key_of(&o.metadata))));
    keys.extend(cache.deployments.list().iter().map(|o| Key::new(Ctl::Deployment, key_of(&o.metadata))));
    keys.extend(cache.daemonsets.list().iter().map(|o| Key::new(Ctl::DaemonSet, key_of(&o.metadata))));
    keys.extend(cache.services.list().iter().map(|o| Key::new(Ctl::Endpoints, key_of(&o.metadata))));
    keys.push(Key::all(Ctl::Scheduler));
    keys.push(Key::all(Ctl::NodeLifecycle));
    keys.push(Key::all(Ctl::GarbageCollector));
    keys
}

fn dedup(mut keys: Vec<Key>) -> Vec<Key> {
    keys.sort();
    keys.dedup();
    keys
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::obj::Obj;
    use crate::testutil::*;
    use serde_json::json;

    fn names(keys: Vec<Key>) -> Vec<String> {
        keys.iter().map(ToString::to_string).collect()
    }

    fn cache() -> Cache {
        Cache::of(vec![
            Obj::ReplicaSet(from(json!({"metadata": {"name": "web", "namespace": "default", "uid": "uid-web"},
                "spec": {"selector": {"matchLabels": {"app": "web"}}}}))),
            Obj::Service(from(json!({"metadata": {"name": "web-svc", "namespace": "default"},
                "spec": {"selector": {"app": "web"}}}))),
            Obj::Service(from(json!({"metadata": {"name": "manual", "namespace": "default"}, "spec": {}}))),
        ])
    }

    #[test]
    fn pod_changes_wake_their_owner_services_scheduler_and_collector() {
        let c = cache();
        let owned = pod("a").labels(&[("app", "web")]).owner(Kind::ReplicaSet, "web").build();
        assert_eq!(
            names(for_pod(&c, None, Some(&owned))),
            ["replicaset default/web", "endpoint default/web-svc", "scheduler"]
        );
        let bound = pod("a").labels(&[("app", "web")]).owner(Kind::ReplicaSet, "web").node("n1").build();
        assert_eq!(
            names(for_pod(&c, Some(&bound), Some(&bound))),
            ["replicaset default/web", "endpoint default/web-svc"]
        );
        assert_eq!(
            names(for_pod(&c, Some(&bound), None)),
            ["replicaset default/web", "endpoint default/web-svc", "scheduler"],
            "a deleted bound pod frees room on its node"
        );
        let orphan = pod("o").labels(&[("app", "web")]).node("n1").build();
        assert_eq!(
            names(for_pod(&c, None, Some(&orphan))),
            ["replicaset default/web", "endpoint default/web-svc"],
            "an orphan wakes the ReplicaSets that select it"
        );
        let lost = pod("l").owner(Kind::ReplicaSet, "gone").node("n1").build();
        assert_eq!(names(for_pod(&c, None, Some(&lost))), ["replicaset default/gone", "garbagecollector"]);
    }

    #[test]
    fn other_kinds() {
        let c = cache();
        let svc: Service = from(json!({"metadata": {"name": "web-svc", "namespace": "default"}}));
        assert_eq!(names(for_service(None, Some(&svc))), ["endpoint default/web-svc"]);
        let ep = |n: &str| -> Endpoints { from(json!({"metadata": {"name": n, "namespace": "default"}})) };
        assert_eq!(names(for_endpoints(&c, None, Some(&ep("web-svc")))), ["endpoint default/web-svc"]);
        assert!(for_endpoints(&c, None, Some(&ep("manual"))).is_empty(), "hand-written Endpoints are not ours");
        let rs: ReplicaSet = from(json!({"metadata": {"name": "web", "namespace": "default", "uid": "uid-web"}}));
        assert_eq!(names(for_replicaset(&c, Some(&rs), None)), ["replicaset default/web", "garbagecollector"]);
        let lease: Lease = from(json!({"metadata": {"name": "n1", "namespace": "kube-node-lease"}}));
        assert_eq!(names(for_lease(None, Some(&lease))), ["nodelifecycle"]);
        assert_eq!(Ctl::parse("endpoints"), Some(Ctl::Endpoints));
    }
}
