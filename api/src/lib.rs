//! Kubernetes API objects in etcd for every weft component: the etcd connection flags, a typed object store
//! (create/get/list/update/delete/watch with optimistic concurrency), informers (list + watch → local cache and
//! change events), what the API server does for Services (validation, ClusterIP and NodePort allocation),
//! manifests, label selectors and quantities. The kubectl-like commands that print and edit these objects live in
//! the `weft-cli` crate, which no daemon links.

pub mod duration;
pub mod etcd;
pub mod http;
pub mod informer;
pub mod kind;
pub mod labels;
pub mod manifest;
pub mod metrics;
pub mod quantity;
pub mod service;
pub mod store;
pub mod validation;
pub mod workload;

pub use etcd::{connect, EtcdArgs};
pub use informer::{Informer, InformerEvent};
pub use kind::{AnyObject, Kind};
pub use service::ServiceRanges;
pub use store::{Object, ObjectKey, Store, WatchEvent};

/// The object types weft stores, re-exported so that callers name one crate.
pub use k8s_openapi;
pub use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet};
pub use k8s_openapi::api::core::v1::{Endpoints, Namespace, Node, Pod, ReplicationController, Service};
pub use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// An error and its causes on one line, skipping a cause the message before it already quotes (for logs).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let s = c.to_string();
        if !msg.contains(&s) {
            msg = format!("{msg}: {s}");
        }
        cur = c.source();
    }
    msg
}
