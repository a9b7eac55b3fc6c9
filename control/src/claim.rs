//! Ownership of dependents (`ControllerRefManager`): a controller owns what carries its controllerRef and matches
//! its selector, adopts matching orphans, releases what it owns but no longer selects, and leaves alone whatever
//! another controller owns.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use weft_api::labels::Selector;

use crate::obj::{controller_of, is_deleting, namespace, uid};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// Ours and selected.
    Owned,
    /// An orphan we select: add our controllerRef.
    Adopt,
    /// Ours but no longer selected: remove our ownerReference.
    Release,
    /// Someone else's, or not for us.
    Ignore,
}

/// What `owner` (with `selector`) does about `dependent`.
pub fn claim(owner: &ObjectMeta, selector: &Selector, dependent: &ObjectMeta) -> Claim {
    let matches = selector.matches(dependent.labels.as_ref());
    match controller_of(dependent) {
        Some(r) if r.uid != uid(owner) => Claim::Ignore,
        Some(_) if matches => Claim::Owned,
        Some(_) if is_deleting(owner) => Claim::Ignore,
        Some(_) => Claim::Release,
        None => {
            if is_deleting(owner) || !matches || is_deleting(dependent) || namespace(owner) != namespace(dependent) {
                Claim::Ignore
            } else {
                Claim::Adopt
            }
        }
    }
}

/// The dependent's metadata with `r` added as its controllerRef.
pub fn adopt(meta: &mut ObjectMeta, r: OwnerReference) {
    let refs = meta.owner_references.get_or_insert_with(Vec::new);
    refs.retain(|x| x.uid != r.uid);
    refs.push(r);
}

/// The dependent's metadata without any reference to `owner_uid`.
pub fn release(meta: &mut ObjectMeta, owner_uid: &str) {
    if let Some(refs) = meta.owner_references.as_mut() {
        refs.retain(|x| x.uid != owner_uid);
        if refs.is_empty() {
            meta.owner_references = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn meta(v: serde_json::Value) -> ObjectMeta {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn claims_follow_the_controller_ref_manager() {
        let owner = meta(json!({"name": "rs", "namespace": "default", "uid": "u1"}));
        let deleting = meta(
            json!({"name": "rs", "namespace": "default", "uid": "u1", "deletionTimestamp": "2024-01-01T00:00:00Z"}),
        );
        let sel = Selector::from_map(&[("app".to_string(), "web".to_string())].into());
        let ours =
            json!([{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "rs", "uid": "u1", "controller": true}]);
        let theirs =
            json!([{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "x", "uid": "u2", "controller": true}]);
        let cases = [
            ("ours, matching", &owner, json!({"labels": {"app": "web"}, "ownerReferences": ours}), Claim::Owned),
            (
                "ours, no longer matching",
                &owner,
                json!({"labels": {"app": "db"}, "ownerReferences": ours}),
                Claim::Release,
            ),
            (
                "ours, owner being deleted",
                &deleting,
                json!({"labels": {"app": "db"}, "ownerReferences": ours}),
                Claim::Ignore,
            ),
            (
                "another controller's",
                &owner,
                json!({"labels": {"app": "web"}, "ownerReferences": theirs}),
                Claim::Ignore,
            ),
            ("orphan, matching", &owner, json!({"labels": {"app": "web"}}), Claim::Adopt),
            ("orphan, not matching", &owner, json!({"labels": {"app": "db"}}), Claim::Ignore),
            ("orphan, owner being deleted", &deleting, json!({"labels": {"app": "web"}}), Claim::Ignore),
            (
                "orphan being deleted",
                &owner,
                json!({"labels": {"app": "web"}, "deletionTimestamp": "2024-01-01T00:00:00Z"}),
                Claim::Ignore,
            ),
            (
                "orphan in another namespace",
                &owner,
                json!({"namespace": "other", "labels": {"app": "web"}}),
                Claim::Ignore,
            ),
        ];
        for (what, o, dep, want) in cases {
            assert_eq!(claim(o, &sel, &meta(dep)), want, "{what}");
        }
    }
}
