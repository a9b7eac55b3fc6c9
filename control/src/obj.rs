//! The kinds the controllers read and write, one enum over their typed objects so that actions and the garbage
//! collector can name any of them, and the ownerReference helpers every controller shares.

use std::fmt;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Endpoints, Node, Pod, ReplicationController, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::{Metadata, Resource};
use weft_api::ObjectKey;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Pod,
    ReplicaSet,
    ReplicationController,
    Deployment,
    DaemonSet,
    Service,
    Endpoints,
    Node,
    Lease,
}

impl Kind {
    pub const ALL: [Kind; 9] = [
        Kind::Pod,
        Kind::ReplicaSet,
        Kind::ReplicationController,
        Kind::Deployment,
        Kind::DaemonSet,
        Kind::Service,
        Kind::Endpoints,
        Kind::Node,
        Kind::Lease,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Pod => Pod::KIND,
            Kind::ReplicaSet => ReplicaSet::KIND,
            Kind::ReplicationController => ReplicationController::KIND,
            Kind::Deployment => Deployment::KIND,
            Kind::DaemonSet => DaemonSet::KIND,
            Kind::Service => Service::KIND,
            Kind::Endpoints => Endpoints::KIND,
            Kind::Node => Node::KIND,
            Kind::Lease => Lease::KIND,
        }
    }

    pub fn api_version(self) -> &'static str {
        match self {
            Kind::Pod => Pod::API_VERSION,
            Kind::ReplicaSet => ReplicaSet::API_VERSION,
            Kind::ReplicationController => ReplicationController::API_VERSION,
            Kind::Deployment => Deployment::API_VERSION,
            Kind::DaemonSet => DaemonSet::API_VERSION,
            Kind::Service => Service::API_VERSION,
            Kind::Endpoints => Endpoints::API_VERSION,
            Kind::Node => Node::API_VERSION,
            Kind::Lease => Lease::API_VERSION,
        }
    }

    pub fn namespaced(self) -> bool {
        self != Kind::Node
    }

    /// The kind an ownerReference names; older group versions (extensions/v1beta1, apps/v1beta2) name the same kinds.
    pub fn of_owner(r: &OwnerReference) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == r.kind)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Any object a controller creates, updates or deletes.
#[derive(Debug, Clone, PartialEq)]
pub enum Obj {
    Pod(Pod),
    ReplicaSet(ReplicaSet),
    ReplicationController(ReplicationController),
    Deployment(Deployment),
    DaemonSet(DaemonSet),
    Service(Service),
    Endpoints(Endpoints),
    Node(Node),
    Lease(Lease),
}

/// Evaluates `$body` with `$o` bound to the typed object inside any `Obj`.
#[macro_export]
macro_rules! with_obj {
    ($obj:expr, $o:ident => $body:expr) => {
        match $obj {
            $crate::obj::Obj::Pod($o) => $body,
            $crate::obj::Obj::ReplicaSet($o) => $body,
            $crate::obj::Obj::ReplicationController($o) => $body,
            $crate::obj::Obj::Deployment($o) => $body,
            $crate::obj::Obj::DaemonSet($o) => $body,
            $crate::obj::Obj::Service($o) => $body,
            $crate::obj::Obj::Endpoints($o) => $body,
            $crate::obj::Obj::Node($o) => $body,
            $crate::obj::Obj::Lease($o) => $body,
        }
    };
}

impl Obj {
    pub fn kind(&self) -> Kind {
        match self {
            Obj::Pod(_) => Kind::Pod,
            Obj::ReplicaSet(_) => Kind::ReplicaSet,
            Obj::ReplicationController(_) => Kind::ReplicationController,
            Obj::Deployment(_) => Kind::Deployment,
            Obj::DaemonSet(_) => Kind::DaemonSet,
            Obj::Service(_) => Kind::Service,
            Obj::Endpoints(_) => Kind::Endpoints,
            Obj::Node(_) => Kind::Node,
            Obj::Lease(_) => Kind::Lease,
        }
    }

    pub fn meta(&self) -> &ObjectMeta {
        with_obj!(self, o => o.metadata())
    }

    pub fn meta_mut(&mut self) -> &mut ObjectMeta {
        with_obj!(self, o => o.metadata_mut())
    }

    /// Its store key (namespace defaulted for namespaced kinds).
    pub fn key(&self) -> ObjectKey {
        with_obj!(self, o => ObjectKey::of(o))
    }
}

/// `ns/name` of the object as the store keys it.
pub fn key_of(meta: &ObjectMeta) -> ObjectKey {
    ObjectKey::new(Some(meta.namespace.as_deref().unwrap_or("default")), meta.name.as_deref().unwrap_or(""))
}

pub fn namespace(meta: &ObjectMeta) -> &str {
    meta.namespace.as_deref().unwrap_or("default")
}

pub fn name(meta: &ObjectMeta) -> &str {
    meta.name.as_deref().unwrap_or("")
}

pub fn uid(meta: &ObjectMeta) -> &str {
    meta.uid.as_deref().unwrap_or("")
}

pub fn is_deleting(meta: &ObjectMeta) -> bool {
    meta.deletion_timestamp.is_some()
}

/// The ownerReference with `controller: true`, if any (`metav1.GetControllerOf`).
pub fn controller_of(meta: &ObjectMeta) -> Option<&OwnerReference> {
    meta.owner_references.iter().flatten().find(|r| r.controller == Some(true))
}

/// The controllerRef a controller puts on what it creates or adopts.
pub fn controller_ref(kind: Kind, meta: &ObjectMeta) -> OwnerReference {
    OwnerReference {
        api_version: kind.api_version().to_string(),
        kind: kind.name().to_string(),
        name: name(meta).to_string(),
        uid: uid(meta).to_string(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

pub fn has_finalizer(meta: &ObjectMeta, f: &str) -> bool {
    meta.finalizers.iter().flatten().any(|x| x == f)
}

/// A label value, if the object has the label.
pub fn label<'a>(meta: &'a ObjectMeta, key: &str) -> Option<&'a str> {
    meta.labels.as_ref().and_then(|l| l.get(key)).map(String::as_str)
}

pub fn annotation<'a>(meta: &'a ObjectMeta, key: &str) -> Option<&'a str> {
    meta.annotations.as_ref().and_then(|l| l.get(key)).map(String::as_str)
}

/// Orders objects oldest first, ties by name (`controller.ReplicaSetsByCreationTimestamp` and friends).
pub fn by_creation(a: &ObjectMeta, b: &ObjectMeta) -> std::cmp::Ordering {
    a.creation_timestamp.cmp(&b.creation_timestamp).then_with(|| a.name.cmp(&b.name))
}
