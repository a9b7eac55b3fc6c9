//! What reconciles read: one view per kind, either an informer's live cache (the daemon) or a fixed set of objects
//! (unit tests). Reads never wait for etcd.

use std::collections::HashMap;
use std::sync::Arc;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Endpoints, Node, Pod, ReplicationController, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use weft_api::{Informer, Object, ObjectKey};

use crate::obj::{Kind, Obj};

/// The objects of one kind.
pub enum Objects<K> {
    Live(Informer<K>),
    Fixed(Arc<HashMap<ObjectKey, Arc<K>>>),
}

impl<K> Clone for Objects<K> {
    fn clone(&self) -> Self {
        match self {
            Objects::Live(i) => Objects::Live(i.clone()),
            Objects::Fixed(m) => Objects::Fixed(m.clone()),
        }
    }
}

impl<K: Object> Default for Objects<K> {
    fn default() -> Self {
        Objects::Fixed(Arc::default())
    }
}

impl<K: Object> Objects<K> {
    pub fn fixed(items: impl IntoIterator<Item = K>) -> Self {
        Objects::Fixed(Arc::new(items.into_iter().map(|o| (ObjectKey::of(&o), Arc::new(o))).collect()))
    }

    pub fn get(&self, key: &ObjectKey) -> Option<Arc<K>> {
        match self {
            Objects::Live(i) => i.get(key),
            Objects::Fixed(m) => m.get(key).cloned(),
        }
    }

    /// Every object, sorted by key.
    pub fn list(&self) -> Vec<Arc<K>> {
        match self {
            Objects::Live(i) => i.list(),
            Objects::Fixed(m) => {
                let mut v: Vec<(&ObjectKey, &Arc<K>)> = m.iter().collect();
                v.sort_by(|a, b| a.0.cmp(b.0));
                v.into_iter().map(|(_, o)| o.clone()).collect()
            }
        }
    }

    pub fn in_namespace(&self, ns: &str) -> Vec<Arc<K>> {
        let mut v = self.list();
        v.retain(|o| o.metadata().namespace.as_deref().unwrap_or("default") == ns);
        v
    }

    pub fn len(&self) -> usize {
        match self {
            Objects::Live(i) => i.len(),
            Objects::Fixed(m) => m.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Every kind the controllers watch.
#[derive(Clone, Default)]
pub struct Cache {
    pub pods: Objects<Pod>,
    pub replicasets: Objects<ReplicaSet>,
    pub rcs: Objects<ReplicationController>,
    pub deployments: Objects<Deployment>,
    pub daemonsets: Objects<DaemonSet>,
    pub services: Objects<Service>,
    pub endpoints: Objects<Endpoints>,
    pub nodes: Objects<Node>,
    pub leases: Objects<Lease>,
}

impl Cache {
    /// A fixed cache holding exactly these objects (tests).
    pub fn of(objs: impl IntoIterator<Item = Obj>) -> Cache {
        let mut c = (vec![], vec![], vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
        for o in objs {
            match o {
                Obj::Pod(x) => c.0.push(x),
                Obj::ReplicaSet(x) => c.1.push(x),
                Obj::ReplicationController(x) => c.2.push(x),
                Obj::Deployment(x) => c.3.push(x),
                Obj::DaemonSet(x) => c.4.push(x),
                Obj::Service(x) => c.5.push(x),
                Obj::Endpoints(x) => c.6.push(x),
                Obj::Node(x) => c.7.push(x),
                Obj::Lease(x) => c.8.push(x),
                // The controllers do not cache namespaces.
                Obj::Namespace(_) => {}
            }
        }
        Cache {
            pods: Objects::fixed(c.0),
            replicasets: Objects::fixed(c.1),
            rcs: Objects::fixed(c.2),
            deployments: Objects::fixed(c.3),
            daemonsets: Objects::fixed(c.4),
            services: Objects::fixed(c.5),
            endpoints: Objects::fixed(c.6),
            nodes: Objects::fixed(c.7),
            leases: Objects::fixed(c.8),
        }
    }

    /// The metadata of any cached object (owner lookups).
    pub fn meta(&self, kind: Kind, key: &ObjectKey) -> Option<ObjectMeta> {
        fn m<K: Object>(o: &Objects<K>, key: &ObjectKey) -> Option<ObjectMeta> {
            o.get(key).map(|x| x.metadata().clone())
        }
        let key = &if kind.namespaced() { key.clone() } else { ObjectKey::new(None, &key.name) };
        match kind {
            Kind::Pod => m(&self.pods, key),
            Kind::ReplicaSet => m(&self.replicasets, key),
            Kind::ReplicationController => m(&self.rcs, key),
            Kind::Deployment => m(&self.deployments, key),
            Kind::DaemonSet => m(&self.daemonsets, key),
            Kind::Service => m(&self.services, key),
            Kind::Endpoints => m(&self.endpoints, key),
            Kind::Node => m(&self.nodes, key),
            Kind::Lease => m(&self.leases, key),
            Kind::Namespace => None,
        }
    }

    /// Every cached object of the kinds that can own or be owned, as (kind, metadata).
    pub fn all_meta(&self) -> Vec<(Kind, Arc<dyn MetaOf>)> {
        fn add<K: Object>(out: &mut Vec<(Kind, Arc<dyn MetaOf>)>, kind: Kind, o: &Objects<K>) {
            out.extend(o.list().into_iter().map(|x| (kind, x as Arc<dyn MetaOf>)));
        }
        let mut out = Vec::new();
        add(&mut out, Kind::Pod, &self.pods);
        add(&mut out, Kind::ReplicaSet, &self.replicasets);
        add(&mut out, Kind::ReplicationController, &self.rcs);
        add(&mut out, Kind::Deployment, &self.deployments);
        add(&mut out, Kind::DaemonSet, &self.daemonsets);
        add(&mut out, Kind::Endpoints, &self.endpoints);
        out
    }

    /// The cached object as an `Obj` (the garbage collector edits finalizers and ownerReferences of any kind).
    pub fn obj(&self, kind: Kind, key: &ObjectKey) -> Option<Obj> {
        let key = &if kind.namespaced() { key.clone() } else { ObjectKey::new(None, &key.name) };
        Some(match kind {
            Kind::Pod => Obj::Pod((*self.pods.get(key)?).clone()),
            Kind::ReplicaSet => Obj::ReplicaSet((*self.replicasets.get(key)?).clone()),
            Kind::ReplicationController => Obj::ReplicationController((*self.rcs.get(key)?).clone()),
            Kind::Deployment => Obj::Deployment((*self.deployments.get(key)?).clone()),
            Kind::DaemonSet => Obj::DaemonSet((*self.daemonsets.get(key)?).clone()),
            Kind::Service => Obj::Service((*self.services.get(key)?).clone()),
            Kind::Endpoints => Obj::Endpoints((*self.endpoints.get(key)?).clone()),
            Kind::Node => Obj::Node((*self.nodes.get(key)?).clone()),
            Kind::Lease => Obj::Lease((*self.leases.get(key)?).clone()),
            Kind::Namespace => return None,
        })
    }
}

/// Object metadata behind a trait object, so one list can hold every kind.
pub trait MetaOf: Send + Sync {
    fn meta(&self) -> &ObjectMeta;
}

impl<K: Object> MetaOf for K {
    fn meta(&self) -> &ObjectMeta {
        self.metadata()
    }
}
