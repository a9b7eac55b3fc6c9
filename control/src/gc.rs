//! The garbage collector: ownerReferences cascade. A dependent whose owners are all gone is deleted (background
//! cascade; the owners' absence is confirmed against the store first); a dependent that keeps some owner loses the
//! references to the gone ones. An object being deleted (deletionTimestamp set) runs our two finalizers as the API
//! server and garbage collector would: `orphan` strips its dependents' references to it, `foregroundDeletion`
//! deletes its dependents first (marking those that have dependents of their own for foreground deletion too);
//! when no finalizer is left the object is deleted. Touches only objects of the kinds the controllers cache.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use weft_api::ObjectKey;

use crate::action::{Action, Outcome, Target};
use crate::cache::{Cache, MetaOf};
use crate::obj::{has_finalizer, key_of, name, namespace, uid, Kind, Obj};

pub const ORPHAN: &str = "orphan";
pub const FOREGROUND: &str = "foregroundDeletion";

struct Item {
    kind: Kind,
    meta: Arc<dyn MetaOf>,
}

impl Item {
    fn m(&self) -> &ObjectMeta {
        self.meta.meta()
    }

    fn key(&self) -> ObjectKey {
        if self.kind.namespaced() {
            key_of(self.m())
        } else {
            ObjectKey::new(None, name(self.m()))
        }
    }

    fn target(&self) -> Target {
        Target { kind: self.kind, key: self.key(), uid: uid(self.m()).to_string() }
    }
}

/// The cached object with `edit` applied, as an update (None if it vanished from the cache).
fn edit(cache: &Cache, it: &Item, why: String, f: impl FnOnce(&mut ObjectMeta)) -> Option<Action> {
    let mut obj: Obj = cache.obj(it.kind, &it.key())?;
    f(obj.metadata_mut());
    Some(Action::update(obj, why))
}

fn without_finalizer(cache: &Cache, it: &Item, finalizer: &str) -> Option<Action> {
    let left: Vec<String> = it.m().finalizers.iter().flatten().filter(|f| *f != finalizer).cloned().collect();
    if left.is_empty() {
        return Some(Action::delete(it.kind, it.key(), uid(it.m()), format!("{finalizer} finished")));
    }
    edit(cache, it, format!("{finalizer} finished"), |m| m.finalizers = Some(left))
}

pub fn collect(cache: &Cache, now: Timestamp) -> Outcome {
    let items: Vec<Item> = cache.all_meta().into_iter().map(|(kind, meta)| Item { kind, meta }).collect();
    // owner uid → dependents (by index)
    let mut dependents: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, it) in items.iter().enumerate() {
        for r in it.m().owner_references.iter().flatten() {
            dependents.entry(r.uid.as_str()).or_default().push(i);
        }
    }
    let has_dependents = |it: &Item| dependents.get(uid(it.m())).is_some_and(|d| !d.is_empty());
    let mut actions: Vec<Action> = Vec::new();
    let mut done: HashSet<(Kind, ObjectKey)> = HashSet::new();
    let mut push = |a: Option<Action>, actions: &mut Vec<Action>| {
        if let Some(a) = a {
            let k = match &a {
                Action::Update { obj, .. } | Action::Create(obj) => (obj.kind(), obj.key()),
                Action::Delete { target, .. } => (target.kind, target.key.clone()),
            };
            if done.insert(k) {
                actions.push(a);
            }
        }
    };

    // Objects being deleted: our finalizers.
    for it in items.iter().filter(|it| it.m().deletion_timestamp.is_some()) {
        let owner_uid = uid(it.m()).to_string();
        let deps: Vec<&Item> = dependents.get(owner_uid.as_str()).into_iter().flatten().map(|&i| &items[i]).collect();
        let what = format!("{} {}", it.kind, it.key());
        if has_finalizer(it.m(), ORPHAN) {
            if deps.is_empty() {
                push(without_finalizer(cache, it, ORPHAN), &mut actions);
            }
            for d in deps {
                let a = edit(cache, d, format!("orphaned: {what} deleted with --cascade=orphan"), |m| {
                    crate::claim::release(m, &owner_uid)
                });
                push(a, &mut actions);
            }
        } else if has_finalizer(it.m(), FOREGROUND) {
            if deps.is_empty() {
                push(without_finalizer(cache, it, FOREGROUND), &mut actions);
            }
            for d in deps.into_iter().filter(|d| d.m().deletion_timestamp.is_none()) {
                if has_dependents(d) {
                    let a = edit(cache, d, format!("foreground deletion of {what}"), |m| {
                        m.deletion_timestamp = Some(Time(now));
                        m.finalizers.get_or_insert_with(Vec::new).push(FOREGROUND.into());
                    });
                    push(a, &mut actions);
                } else {
                    push(
                        Some(Action::delete(d.kind, d.key(), uid(d.m()), format!("foreground deletion of {what}"))),
                        &mut actions,
                    );
                }
            }
        } else if it.m().finalizers.iter().flatten().next().is_none() {
            push(
                Some(Action::delete(it.kind, it.key(), &owner_uid, "deletion requested, no finalizers left")),
                &mut actions,
            );
        }
    }

    // Dependents whose owners are gone.
    for it in items.iter().filter(|it| it.m().deletion_timestamp.is_none()) {
        let refs = it.m().owner_references.as_deref().unwrap_or(&[]);
        if refs.is_empty() {
            continue;
        }
        let mut dangling = Vec::new();
        let mut solid = 0;
        for r in refs {
            let Some(kind) = Kind::of_owner(r) else {
                solid += 1; // a kind we do not cache: assume it exists
                continue;
            };
            let okey = if kind.namespaced() {
                ObjectKey::new(Some(namespace(it.m())), &r.name)
            } else {
                ObjectKey::new(None, &r.name)
            };
            match cache.meta(kind, &okey) {
                Some(o) if o.uid.as_deref() == Some(r.uid.as_str()) => solid += 1,
                _ => dangling.push(Target { kind, key: okey, uid: r.uid.clone() }),
            }
        }
        if dangling.is_empty() {
            continue;
        }
        if solid > 0 {
            let gone: Vec<String> = dangling.iter().map(|t| t.uid.clone()).collect();
            let a = edit(
                cache,
                it,
                format!(
                    "dropping references to deleted owners {}",
                    dangling.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
                ),
                |m| {
                    for u in &gone {
                        crate::claim::release(m, u);
                    }
                },
            );
            push(a, &mut actions);
        } else {
            let why =
                format!("owner {} is gone", dangling.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "));
            push(Some(Action::Delete { target: it.target(), why, owners_gone: dangling }), &mut actions);
        }
    }
    // Updates before deletions, grouped by kind, so the runtime sends each group together.
    actions.sort_by_key(|a| (a.verb() == "delete", a.kind()));
    Outcome::new(actions)
}

#[cfg(test)]
mod tests;
