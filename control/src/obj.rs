//! The kinds the controllers read and write (weft-api's registry of kinds and its enum of typed objects, so that
//! actions and the garbage collector can name any of them), and the ownerReference helpers every controller shares.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use weft_api::ObjectKey;

/// The kinds come from weft-api's registry (`weft_api::kind`); a controller's write is any registered object.
pub use weft_api::kind::{AnyObject as Obj, Kind};

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
