//! What controllers ask of a Pod (`podutil` in Kubernetes): active, ready, available, where it runs, what it
//! requests, and how a controller makes one from its template.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Pod, PodCondition, PodStatus, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use k8s_openapi::jiff::{SignedDuration, Timestamp};

use crate::quantity;

pub fn phase(p: &Pod) -> &str {
    p.status.as_ref().and_then(|s| s.phase.as_deref()).unwrap_or("")
}

pub fn node_name(p: &Pod) -> &str {
    p.spec.as_ref().and_then(|s| s.node_name.as_deref()).unwrap_or("")
}

pub fn is_terminal(p: &Pod) -> bool {
    matches!(phase(p), "Succeeded" | "Failed")
}

/// `controller.IsPodActive`: not finished and not being deleted.
pub fn is_active(p: &Pod) -> bool {
    !is_terminal(p) && p.metadata.deletion_timestamp.is_none()
}

pub fn condition<'a>(p: &'a Pod, type_: &str) -> Option<&'a PodCondition> {
    p.status.as_ref()?.conditions.as_ref()?.iter().find(|c| c.type_ == type_)
}

pub fn is_ready(p: &Pod) -> bool {
    condition(p, "Ready").is_some_and(|c| c.status == "True")
}

/// When the pod became ready (None if it is not ready or does not say).
pub fn ready_since(p: &Pod) -> Option<Timestamp> {
    condition(p, "Ready").filter(|c| c.status == "True").and_then(|c| c.last_transition_time.as_ref()).map(|t| t.0)
}

/// `podutil.IsPodAvailable`: ready for at least `min_ready_seconds`.
pub fn is_available(p: &Pod, min_ready_seconds: i32, now: Timestamp) -> bool {
    if !is_ready(p) {
        return false;
    }
    if min_ready_seconds <= 0 {
        return true;
    }
    ready_since(p).is_some_and(|t| t + SignedDuration::from_secs(min_ready_seconds as i64) <= now)
}

/// The IP the pod answers on, if it has one.
pub fn ip(p: &Pod) -> Option<&str> {
    let s = p.status.as_ref()?;
    s.pod_ip.as_deref().filter(|i| !i.is_empty()).or_else(|| s.pod_ips.as_ref()?.first().map(|i| i.ip.as_str()))
}

pub fn max_restarts(p: &Pod) -> i32 {
    p.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .into_iter()
        .flatten()
        .map(|c| c.restart_count)
        .max()
        .unwrap_or(0)
}

/// What the pod asks of a node, in thousandths (cpu: millicores, memory: millibytes): the larger of the sum over
/// app containers and any one init container, plus overhead (`resourcehelper.PodRequests`).
pub fn requests(p: &Pod, resource: &str) -> i128 {
    let Some(spec) = p.spec.as_ref() else { return 0 };
    let req = |c: &k8s_openapi::api::core::v1::Container| {
        quantity::get(c.resources.as_ref().and_then(|r| r.requests.as_ref()), resource)
    };
    let sum: i128 = spec.containers.iter().map(req).sum();
    let init = spec.init_containers.iter().flatten().map(req).max().unwrap_or(0);
    sum.max(init) + quantity::get(spec.overhead.as_ref(), resource)
}

/// A pod for `template`, owned by `owner`, named by the store from `generate_name` (`controller.GetPodFromTemplate`).
/// Status is what the API server gives a new pod: phase Pending.
pub fn from_template(template: &PodTemplateSpec, namespace: &str, generate_name: &str, owner: OwnerReference) -> Pod {
    let tm = template.metadata.clone().unwrap_or_default();
    Pod {
        metadata: ObjectMeta {
            generate_name: Some(generate_name.to_string()),
            namespace: Some(namespace.to_string()),
            labels: tm.labels,
            annotations: tm.annotations,
            finalizers: tm.finalizers,
            owner_references: Some(vec![owner]),
            ..Default::default()
        },
        spec: template.spec.clone(),
        status: Some(PodStatus { phase: Some("Pending".into()), ..Default::default() }),
    }
}

/// The name prefix for a controller's pods: `<name>-` (`getPodsPrefix`).
pub fn name_prefix(owner: &str) -> String {
    format!("{owner}-")
}

/// Sets (or replaces) a condition, keeping lastTransitionTime when the status does not change. True if it changed.
pub fn set_condition(p: &mut Pod, mut c: PodCondition, now: Timestamp) -> bool {
    let status = p.status.get_or_insert_with(Default::default);
    let conds = status.conditions.get_or_insert_with(Vec::new);
    match conds.iter_mut().find(|x| x.type_ == c.type_) {
        Some(old) => {
            if old.status == c.status && old.reason == c.reason && old.message == c.message {
                return false;
            }
            c.last_transition_time =
                if old.status == c.status { old.last_transition_time.clone() } else { Some(Time(now)) };
            *old = c;
        }
        None => {
            c.last_transition_time = Some(Time(now));
            conds.push(c);
        }
    }
    true
}

pub fn labels(p: &Pod) -> Option<&BTreeMap<String, String>> {
    p.metadata.labels.as_ref()
}
