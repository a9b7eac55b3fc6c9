//! The ReplicaSet controller, which is also the ReplicationController's (equality selector, optional template):
//! keep `replicas` active pods that match the selector, adopting orphans, releasing pods that stop matching,
//! replacing pods that finished or vanished, choosing scale-down victims the Kubernetes way, and reporting status.
//! Reads pods and the ReplicaSet; writes pods and the ReplicaSet's status.

use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::ReplicaSetStatus;
use k8s_openapi::api::core::v1::{Pod, PodTemplateSpec, ReplicationController, ReplicationControllerStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;
use weft_api::labels::{self, Selector};
use weft_api::ObjectKey;

use crate::action::{Action, Outcome};
use crate::cache::Cache;
use crate::claim::{self, Claim};
use crate::obj::{controller_of, controller_ref, is_deleting, name, namespace, uid, Kind, Obj};
use crate::pod;

/// At most this many creations or deletions per sync (`burstReplicas`).
pub const BURST_REPLICAS: usize = 500;

/// What the two kinds have in common.
struct View<'a> {
    kind: Kind,
    meta: &'a ObjectMeta,
    replicas: i32,
    selector: Selector,
    template: Option<&'a PodTemplateSpec>,
    min_ready_seconds: i32,
}

/// The counts a status reports.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub replicas: i32,
    pub fully_labeled: i32,
    pub ready: i32,
    pub available: i32,
}

/// Zero is left out of the JSON, as Kubernetes' `omitempty` does.
pub fn nz(v: i32) -> Option<i32> {
    (v != 0).then_some(v)
}

pub fn reconcile_replicaset(key: &ObjectKey, cache: &Cache, now: Timestamp) -> Outcome {
    let Some(rs) = cache.replicasets.get(key) else { return Outcome::default() };
    let spec = &rs.spec;
    let selector = match Selector::from_label_selector(Some(&spec.selector)) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(replicaset = %key, error = %e, "invalid selector; not managing pods");
            return Outcome::default();
        }
    };
    let view = View {
        kind: Kind::ReplicaSet,
        meta: &rs.metadata,
        replicas: spec.replicas.unwrap_or(1),
        selector,
        template: spec.template.as_ref(),
        min_ready_seconds: spec.min_ready_seconds.unwrap_or(0),
    };
    let (mut out, counts) = manage(&view, cache, now);
    let old = rs.status.clone().unwrap_or_default();
    let status = ReplicaSetStatus {
        replicas: counts.replicas,
        fully_labeled_replicas: nz(counts.fully_labeled),
        ready_replicas: nz(counts.ready),
        available_replicas: nz(counts.available),
        observed_generation: rs.metadata.generation,
        ..old.clone()
    };
    if status != old {
        let mut new = (*rs).clone();
        new.status = Some(status);
        out.actions.push(Action::update(Obj::ReplicaSet(new), status_why(&counts)));
    }
    out
}

pub fn reconcile_rc(key: &ObjectKey, cache: &Cache, now: Timestamp) -> Outcome {
    let Some(rc) = cache.rcs.get(key) else { return Outcome::default() };
    let spec = rc.spec.clone().unwrap_or_default();
    let template_labels = spec.template.as_ref().and_then(|t| t.metadata.as_ref()).and_then(|m| m.labels.clone());
    // The API server defaults an empty selector to the template's labels.
    let selector = match spec.selector.as_ref().filter(|s| !s.is_empty()).or(template_labels.as_ref()) {
        Some(s) => Selector::from_map(s),
        None => Selector::Nothing,
    };
    let view = View {
        kind: Kind::ReplicationController,
        meta: &rc.metadata,
        replicas: spec.replicas.unwrap_or(1),
        selector,
        template: spec.template.as_ref(),
        min_ready_seconds: spec.min_ready_seconds.unwrap_or(0),
    };
    let (mut out, counts) = manage(&view, cache, now);
    let old = rc.status.clone().unwrap_or_default();
    let status = ReplicationControllerStatus {
        replicas: counts.replicas,
        fully_labeled_replicas: nz(counts.fully_labeled),
        ready_replicas: nz(counts.ready),
        available_replicas: nz(counts.available),
        observed_generation: rc.metadata.generation,
        ..old.clone()
    };
    if status != old {
        let mut new: ReplicationController = (*rc).clone();
        new.status = Some(status);
        out.actions.push(Action::update(Obj::ReplicationController(new), status_why(&counts)));
    }
    out
}

fn status_why(c: &Counts) -> String {
    format!("status: {} replicas, {} ready, {} available", c.replicas, c.ready, c.available)
}

/// Claims pods, creates or deletes to reach `replicas`, and counts for status (from the pods before this sync's
/// actions, as Kubernetes does: what is created now shows up in the next sync).
fn manage(v: &View, cache: &Cache, now: Timestamp) -> (Outcome, Counts) {
    let ns = namespace(v.meta);
    let all = cache.pods.in_namespace(ns);
    let mut out = Outcome::default();
    let mut owned: Vec<Arc<Pod>> = Vec::new();
    for p in all.iter().filter(|p| pod::is_active(p)) {
        match claim::claim(v.meta, &v.selector, &p.metadata) {
            Claim::Owned => owned.push(p.clone()),
            Claim::Adopt => {
                let mut new = (**p).clone();
                claim::adopt(&mut new.metadata, controller_ref(v.kind, v.meta));
                out.actions.push(Action::update(Obj::Pod(new), format!("adopted by {} {}", v.kind, name(v.meta))));
                owned.push(p.clone());
            }
            Claim::Release => {
                let mut new = (**p).clone();
                claim::release(&mut new.metadata, uid(v.meta));
                out.actions.push(Action::update(Obj::Pod(new), format!("released by {} {}", v.kind, name(v.meta))));
            }
            Claim::Ignore => {}
        }
    }

    if !is_deleting(v.meta) {
        let diff = owned.len() as i64 - v.replicas.max(0) as i64;
        if diff < 0 {
            if let Some(t) = v.template {
                let n = ((-diff) as usize).min(BURST_REPLICAS);
                let owner = controller_ref(v.kind, v.meta);
                for _ in 0..n {
                    let p = pod::from_template(t, ns, &pod::name_prefix(name(v.meta)), owner.clone());
                    out.actions.push(Action::Create(Obj::Pod(p)));
                }
            }
        } else if diff > 0 {
            let related = related_pods(v, cache, &all, &owned);
            for p in victims(&owned, &related, (diff as usize).min(BURST_REPLICAS)) {
                out.actions.push(Action::delete(
                    Kind::Pod,
                    crate::obj::key_of(&p.metadata),
                    uid(&p.metadata),
                    format!("{} {} has {} too many", v.kind, name(v.meta), diff),
                ));
            }
        }
    }

    let template_labels = v.template.and_then(|t| t.metadata.as_ref()).and_then(|m| m.labels.as_ref());
    let mut counts = Counts { replicas: owned.len() as i32, ..Default::default() };
    for p in &owned {
        if labels::contains_all(pod::labels(p), template_labels) {
            counts.fully_labeled += 1;
        }
        if pod::is_ready(p) {
            counts.ready += 1;
            if pod::is_available(p, v.min_ready_seconds, now) {
                counts.available += 1;
            }
        }
    }
    // A ready pod becomes available minReadySeconds later without any event: look again then.
    if v.min_ready_seconds > 0 && counts.ready > counts.available {
        out = out.requeue(Duration::from_secs(v.min_ready_seconds as u64));
    }
    (out, counts)
}

/// The pods that count for co-location ranking: ours, plus those of ReplicaSets with the same controller (the
/// other ReplicaSets of one Deployment).
fn related_pods(v: &View, cache: &Cache, all: &[Arc<Pod>], owned: &[Arc<Pod>]) -> Vec<Arc<Pod>> {
    let Some(parent) = controller_of(v.meta).map(|r| r.uid.clone()) else { return owned.to_vec() };
    let mut siblings: HashSet<String> = cache
        .replicasets
        .in_namespace(namespace(v.meta))
        .iter()
        .filter(|rs| controller_of(&rs.metadata).is_some_and(|r| r.uid == parent))
        .map(|rs| uid(&rs.metadata).to_string())
        .collect();
    siblings.insert(uid(v.meta).to_string());
    all.iter()
        .filter(|p| pod::is_active(p) && controller_of(&p.metadata).is_some_and(|r| siblings.contains(&r.uid)))
        .cloned()
        .collect()
}

/// The first `n` pods to delete, ranked as `controller.ActivePodsWithRanks` ranks them.
pub fn victims(pods: &[Arc<Pod>], related: &[Arc<Pod>], n: usize) -> Vec<Arc<Pod>> {
    let mut on_node: HashMap<&str, usize> = HashMap::new();
    for p in related.iter().filter(|p| pod::is_active(p)) {
        *on_node.entry(pod::node_name(p)).or_default() += 1;
    }
    let mut ranked: Vec<(usize, &Arc<Pod>)> =
        pods.iter().map(|p| (on_node.get(pod::node_name(p)).copied().unwrap_or(0), p)).collect();
    ranked.sort_by(|a, b| deletion_order(a.1, a.0, b.1, b.0));
    ranked.into_iter().take(n).map(|(_, p)| p.clone()).collect()
}

fn phase_ordinal(p: &Pod) -> u8 {
    match pod::phase(p) {
        "Unknown" => 1,
        "Running" => 2,
        _ => 0, // Pending, or not reported yet
    }
}

fn deletion_cost(p: &Pod) -> i64 {
    crate::obj::annotation(&p.metadata, "controller.kubernetes.io/pod-deletion-cost")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Newer first, and a missing time before any time (`afterOrZero`).
fn newer_first(a: Option<Timestamp>, b: Option<Timestamp>) -> Ordering {
    match (a, b) {
        (None, None) => Ordering::Equal,
        (None, Some(_)) => Ordering::Less,
        (Some(_), None) => Ordering::Greater,
        (Some(a), Some(b)) => b.cmp(&a),
    }
}

/// Less = delete first: unscheduled before scheduled; Pending < Unknown < Running; not ready before ready; lower
/// pod-deletion-cost first; more pods of the same family on its node first; ready for less time first; more
/// restarts first; newer first; then by name so that the order is total.
fn deletion_order(a: &Pod, rank_a: usize, b: &Pod, rank_b: usize) -> Ordering {
    let (na, nb) = (pod::node_name(a), pod::node_name(b));
    if na != nb && (na.is_empty() || nb.is_empty()) {
        return if na.is_empty() { Ordering::Less } else { Ordering::Greater };
    }
    phase_ordinal(a)
        .cmp(&phase_ordinal(b))
        .then_with(|| pod::is_ready(a).cmp(&pod::is_ready(b)))
        .then_with(|| deletion_cost(a).cmp(&deletion_cost(b)))
        .then_with(|| rank_b.cmp(&rank_a))
        .then_with(|| {
            if pod::is_ready(a) && pod::is_ready(b) {
                newer_first(pod::ready_since(a), pod::ready_since(b))
            } else {
                Ordering::Equal
            }
        })
        .then_with(|| pod::max_restarts(b).cmp(&pod::max_restarts(a)))
        .then_with(|| {
            newer_first(
                a.metadata.creation_timestamp.as_ref().map(|t| t.0),
                b.metadata.creation_timestamp.as_ref().map(|t| t.0),
            )
        })
        .then_with(|| a.metadata.name.cmp(&b.metadata.name))
}

/// Slow-start batch sizes for `n` creations: 1, 2, 4, … (`slowStartBatch`); the runtime stops at the first batch
/// with a failure, so a template that cannot be created costs one call, not `n`.
pub fn slow_start_batches(n: usize) -> Vec<usize> {
    let mut out = Vec::new();
    let (mut left, mut size) = (n, 1usize);
    while left > 0 {
        let b = size.min(left);
        out.push(b);
        left -= b;
        size *= 2;
    }
    out
}

/// Template labels for status' fullyLabeledReplicas (exposed for the Deployment controller's tests).
pub fn template_labels(t: Option<&PodTemplateSpec>) -> Option<&BTreeMap<String, String>> {
    t.and_then(|t| t.metadata.as_ref()).and_then(|m| m.labels.as_ref())
}

#[cfg(test)]
mod tests;
