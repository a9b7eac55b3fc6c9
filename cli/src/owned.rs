//! A Deployment's ReplicaSets as kubectl sees them: which ReplicaSets it owns, which of them is new (same pod
//! template apart from the hash label), and their revisions. Pure, except `replicasets_of`, which reads the store.
//! `describe` and `rollout` both build on it.

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::Value;
use weft_api::labels::Selector;
use weft_api::store::Store;

/// The revision a Deployment controller writes on a Deployment and its ReplicaSets.
pub const REVISION_ANNOTATION: &str = "deployment.kubernetes.io/revision";
/// The label a Deployment controller adds to a ReplicaSet's template (and selector) to tell templates apart.
pub const POD_TEMPLATE_HASH: &str = "pod-template-hash";

/// An object's revision annotation: 0 when absent, `None` when it is not a number (such objects are skipped).
pub fn revision(meta: &ObjectMeta) -> Option<i64> {
    match meta.annotations.as_ref().and_then(|a| a.get(REVISION_ANNOTATION)) {
        None => Some(0),
        Some(v) => v.parse().ok(),
    }
}

/// Whether `meta`'s controller ownerReference names the object with `uid`.
pub fn controlled_by(meta: &ObjectMeta, uid: &str) -> bool {
    meta.owner_references.iter().flatten().any(|r| r.controller == Some(true) && r.uid == uid)
}

/// The ReplicaSets a Deployment owns: selected by its selector and controlled by it, oldest first (ties by name).
pub fn owned_replicasets(d: &Deployment, all: &[ReplicaSet]) -> Vec<ReplicaSet> {
    let Ok(selector) = Selector::from_label_selector(Some(&d.spec.selector)) else { return Vec::new() };
    if selector.is_everything() {
        return Vec::new();
    }
    let uid = d.metadata.uid.clone().unwrap_or_default();
    let mut owned: Vec<ReplicaSet> = all
        .iter()
        .filter(|rs| rs.metadata.namespace == d.metadata.namespace)
        .filter(|rs| selector.matches(rs.metadata.labels.as_ref()) && controlled_by(&rs.metadata, &uid))
        .cloned()
        .collect();
    owned.sort_by(|a, b| {
        let t = |rs: &ReplicaSet| rs.metadata.creation_timestamp.as_ref().map(|t| t.0);
        t(a).cmp(&t(b)).then_with(|| a.metadata.name.cmp(&b.metadata.name))
    });
    owned
}

/// The template as JSON without the hash label and without empty values, for comparisons that ignore the label
/// the controller adds and the difference between an absent and an empty field.
fn normalized(t: &PodTemplateSpec) -> Value {
    let mut v = serde_json::to_value(t).unwrap_or_default();
    if let Some(labels) = v.pointer_mut("/metadata/labels").and_then(Value::as_object_mut) {
        labels.remove(POD_TEMPLATE_HASH);
    }
    prune(&mut v);
    v
}

fn prune(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.values_mut().for_each(prune);
            m.retain(|_, v| {
                !(v.is_null()
                    || v.as_object().is_some_and(|o| o.is_empty())
                    || v.as_array().is_some_and(|a| a.is_empty()))
            });
        }
        Value::Array(a) => a.iter_mut().for_each(prune),
        _ => {}
    }
}

/// kubectl's `EqualIgnoreHash`: the same pod template apart from the `pod-template-hash` label.
pub fn equal_ignore_hash(a: &PodTemplateSpec, b: &PodTemplateSpec) -> bool {
    normalized(a) == normalized(b)
}

/// The Deployment's new ReplicaSet (the oldest owned one whose template is the Deployment's) and the others.
pub fn new_and_old(d: &Deployment, owned: &[ReplicaSet]) -> (Option<ReplicaSet>, Vec<ReplicaSet>) {
    let new = owned.iter().find(|rs| rs.spec.template.as_ref().is_some_and(|t| equal_ignore_hash(t, &d.spec.template)));
    let old = owned.iter().filter(|rs| Some(*rs) != new).cloned().collect();
    (new.cloned(), old)
}

/// The ReplicaSets a Deployment owns, read from the store.
pub async fn replicasets_of(store: &Store, d: &Deployment) -> anyhow::Result<Vec<ReplicaSet>> {
    let (all, _) = store.list::<ReplicaSet>(d.metadata.namespace.as_deref()).await?;
    Ok(owned_replicasets(d, &all))
}
