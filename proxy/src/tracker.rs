//! kube-proxy's change tracker: between two syncs, one `{previous, current}` pair per Service or
//! Endpoints summary; a change that ends where it began is dropped. `take` yields the service ports a
//! sync must rewrite, which is what makes a partial sync possible.

use std::collections::{BTreeMap, BTreeSet};

use crate::model::ServicePortName;
use crate::summary::{EndpointsSummary, ServiceSummary};

/// `namespace/name` of a Service or Endpoints object.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn new(namespace: &str, name: &str) -> Self {
        ObjectKey { namespace: namespace.into(), name: name.into() }
    }
}

/// An object whose change affects a known set of service ports.
pub trait Tracked: Clone + PartialEq {
    /// The service ports this object contributes to (by port name and protocol).
    fn port_names(&self, key: &ObjectKey) -> Vec<ServicePortName>;
}

impl Tracked for ServiceSummary {
    fn port_names(&self, _: &ObjectKey) -> Vec<ServicePortName> {
        self.ports.iter().map(|(spn, _)| spn.clone()).collect()
    }
}

impl Tracked for EndpointsSummary {
    fn port_names(&self, key: &ObjectKey) -> Vec<ServicePortName> {
        self.ports.iter().map(|p| ServicePortName::new(&key.namespace, &key.name, &p.name, p.protocol)).collect()
    }
}

// The proxy keeps the informer's shared summaries rather than copies.
impl<T: Tracked> Tracked for std::sync::Arc<T> {
    fn port_names(&self, key: &ObjectKey) -> Vec<ServicePortName> {
        (**self).port_names(key)
    }
}

#[derive(Debug, Clone)]
struct Pair<V> {
    previous: Option<V>,
    current: Option<V>,
}

/// Pending changes of one kind of object since the last `take`.
#[derive(Debug, Clone)]
pub struct ChangeTracker<V> {
    pending: BTreeMap<ObjectKey, Pair<V>>,
}

impl<V> Default for ChangeTracker<V> {
    fn default() -> Self {
        ChangeTracker { pending: BTreeMap::new() }
    }
}

impl<V: Tracked> ChangeTracker<V> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records an add (`prev` None), update, or delete (`cur` None) as the informer reported it.
    /// The first `prev` seen since the last `take` is kept: it is what the kernel was last synced to.
    pub fn update(&mut self, key: ObjectKey, prev: Option<V>, cur: Option<V>) {
        let pair = self.pending.entry(key.clone()).or_insert(Pair { previous: prev, current: None });
        pair.current = cur;
        if pair.previous == pair.current {
            self.pending.remove(&key);
        }
    }

    /// Objects with a change pending.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// The service ports touched by the pending changes (from both the old and new object), and resets.
    pub fn take(&mut self) -> BTreeSet<ServicePortName> {
        let mut out = BTreeSet::new();
        for (key, pair) in std::mem::take(&mut self.pending) {
            for v in pair.previous.iter().chain(pair.current.iter()) {
                out.extend(v.port_names(&key));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Protocol;
    use crate::summary;
    use serde_json::json;

    fn service(v: serde_json::Value) -> ServiceSummary {
        summary::service(serde_json::from_value(v).unwrap()).unwrap()
    }
    fn svc(port: i32) -> ServiceSummary {
        service(json!({"metadata": {"name": "web", "namespace": "ns"},
            "spec": {"clusterIP": "10.96.0.1", "ports": [{"name": "http", "port": port}]}}))
    }
    fn key() -> ObjectKey {
        ObjectKey::new("ns", "web")
    }

    #[test]
    fn change_that_ends_where_it_began_is_dropped() {
        let mut t = ChangeTracker::new();
        t.update(key(), Some(svc(80)), Some(svc(81)));
        t.update(key(), Some(svc(81)), Some(svc(80)));
        assert!(t.is_empty());
        // Add then delete before a sync: nothing to do either.
        t.update(key(), None, Some(svc(80)));
        t.update(key(), Some(svc(80)), None);
        assert!(t.take().is_empty());
    }

    #[test]
    fn take_reports_ports_of_old_and_new_objects_once() {
        let mut t = ChangeTracker::new();
        let renamed = service(json!({"metadata": {"name": "web", "namespace": "ns"},
            "spec": {"clusterIP": "10.96.0.1", "ports": [{"name": "web", "port": 80, "protocol": "UDP"}]}}));
        t.update(key(), Some(svc(80)), Some(svc(81)));
        t.update(key(), Some(svc(81)), Some(renamed));
        let got = t.take();
        let want: BTreeSet<_> = [
            ServicePortName::new("ns", "web", "http", Protocol::Tcp),
            ServicePortName::new("ns", "web", "web", Protocol::Udp),
        ]
        .into();
        assert_eq!(got, want);
        assert!(t.take().is_empty());
    }

    #[test]
    fn endpoints_changes_name_their_ports() {
        let mut t = ChangeTracker::new();
        let e = json!({"metadata": {"name": "web", "namespace": "ns"},
            "subsets": [{"addresses": [{"ip": "10.244.0.2"}], "ports": [{"port": 8080}]}]});
        let e = summary::endpoints(serde_json::from_value(e).unwrap(), "node-1", &Default::default()).unwrap();
        t.update(key(), None, Some(e));
        assert_eq!(t.take(), [ServicePortName::new("ns", "web", "", Protocol::Tcp)].into());
    }
}
