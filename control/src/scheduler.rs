//! The scheduler: binds every pod without a node to one, in one pass over the cache. A node qualifies when it is
//! Ready, schedulable, tolerated (NoSchedule/NoExecute taints), matches the pod's nodeSelector and required node
//! affinity, and has room (cpu, memory, pod count) in its allocatable minus what is bound there. Among those, the
//! node with the fewest pods of the same owner wins, then the least requested one, then the name. A pod that fits
//! nowhere gets PodScheduled=False/Unschedulable with kube-scheduler's message. Writes pods only.

use std::collections::HashMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, NodeSelectorRequirement, Pod, PodCondition, PodSpec, Taint, Toleration};
use k8s_openapi::jiff::Timestamp;

use crate::action::{Action, Outcome};
use crate::cache::Cache;
use crate::obj::{controller_of, Obj};
use crate::{pod, quantity};

/// The schedulerName this scheduler answers to (pods without one get it by default).
pub const NAME: &str = "default-scheduler";

/// Unschedulable pods are tried again this often even if nothing seems to change.
pub const RETRY: Duration = Duration::from_secs(10);

/// The kubelet's default when a node does not say how many pods it takes.
const DEFAULT_MAX_PODS: i128 = 110;

pub const NOT_READY: &str = "node(s) were not ready";
pub const UNSCHEDULABLE: &str = "node(s) were unschedulable";
pub const AFFINITY: &str = "node(s) didn't match Pod's node affinity/selector";

pub fn node_ready(n: &Node) -> bool {
    node_condition(n, "Ready").is_some_and(|s| s == "True")
}

pub fn node_condition<'a>(n: &'a Node, type_: &str) -> Option<&'a str> {
    n.status.as_ref()?.conditions.as_ref()?.iter().find(|c| c.type_ == type_).map(|c| c.status.as_str())
}

pub fn node_name(n: &Node) -> &str {
    n.metadata.name.as_deref().unwrap_or("")
}

pub fn taints(n: &Node) -> &[Taint] {
    n.spec.as_ref().and_then(|s| s.taints.as_deref()).unwrap_or(&[])
}

/// `v1helper.TolerationsTolerateTaint`.
pub fn tolerates(t: &Toleration, taint: &Taint) -> bool {
    if t.effect.as_deref().is_some_and(|e| !e.is_empty() && e != taint.effect) {
        return false;
    }
    if t.key.as_deref().is_some_and(|k| !k.is_empty() && k != taint.key) {
        return false;
    }
    match t.operator.as_deref() {
        Some("Exists") => true,
        None | Some("") | Some("Equal") => t.value.as_deref().unwrap_or("") == taint.value.as_deref().unwrap_or(""),
        Some(_) => false,
    }
}

/// The first taint with an effect `effects` names that no toleration tolerates.
pub fn untolerated<'a>(taints: &'a [Taint], tolerations: &[Toleration], effects: &[&str]) -> Option<&'a Taint> {
    taints
        .iter()
        .filter(|t| effects.contains(&t.effect.as_str()))
        .find(|t| !tolerations.iter().any(|x| tolerates(x, t)))
}

fn requirement_matches(r: &NodeSelectorRequirement, value: Option<&str>) -> bool {
    let values = r.values.as_deref().unwrap_or(&[]);
    match r.operator.as_str() {
        "In" => value.is_some_and(|v| values.iter().any(|x| x == v)),
        "NotIn" => !value.is_some_and(|v| values.iter().any(|x| x == v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        "Gt" | "Lt" => {
            let (Some(v), Some(bound)) =
                (value.and_then(|v| v.parse::<i64>().ok()), values.first().and_then(|b| b.parse::<i64>().ok()))
            else {
                return false;
            };
            if r.operator == "Gt" {
                v > bound
            } else {
                v < bound
            }
        }
        _ => false,
    }
}

/// nodeSelector and requiredDuringSchedulingIgnoredDuringExecution (terms ORed; within one, everything ANDed;
/// matchFields knows `metadata.name`).
pub fn node_matches(spec: &PodSpec, n: &Node) -> bool {
    let labels = n.metadata.labels.as_ref();
    if !weft_api::labels::contains_all(labels, spec.node_selector.as_ref()) {
        return false;
    }
    let required = spec
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|a| a.required_during_scheduling_ignored_during_execution.as_ref());
    let Some(required) = required else { return true };
    required.node_selector_terms.iter().any(|term| {
        let exprs = term.match_expressions.as_deref().unwrap_or(&[]);
        let fields = term.match_fields.as_deref().unwrap_or(&[]);
        if exprs.is_empty() && fields.is_empty() {
            return false;
        }
        exprs.iter().all(|r| requirement_matches(r, labels.and_then(|l| l.get(&r.key)).map(String::as_str)))
            && fields.iter().all(|r| r.key == "metadata.name" && requirement_matches(r, Some(node_name(n))))
    })
}

/// The node a pod is meant for, by nodeName or by a DaemonSet-style `metadata.name In [node]` affinity.
pub fn target_node(p: &Pod) -> Option<String> {
    let spec = p.spec.as_ref()?;
    if let Some(n) = spec.node_name.as_ref().filter(|n| !n.is_empty()) {
        return Some(n.clone());
    }
    let terms = &spec
        .affinity
        .as_ref()?
        .node_affinity
        .as_ref()?
        .required_during_scheduling_ignored_during_execution
        .as_ref()?
        .node_selector_terms;
    terms.iter().flat_map(|t| t.match_fields.iter().flatten()).find_map(|r| {
        (r.key == "metadata.name" && r.operator == "In" && r.values.as_ref().is_some_and(|v| v.len() == 1))
            .then(|| r.values.as_ref().unwrap()[0].clone())
    })
}

/// What is bound to a node.
#[derive(Debug, Default, Clone, Copy)]
struct Usage {
    cpu: i128,
    memory: i128,
    pods: i128,
}

struct NodeInfo<'a> {
    node: &'a Node,
    cpu: i128,
    memory: i128,
    pods: i128,
    used: Usage,
}

fn allocatable(n: &Node, name: &str) -> Option<i128> {
    let s = n.status.as_ref()?;
    s.allocatable.as_ref().or(s.capacity.as_ref())?.get(name).and_then(|q| quantity::milli(&q.0))
}

/// Why `p` does not fit `n`; empty when it does.
fn filter(p: &Pod, spec: &PodSpec, n: &NodeInfo) -> Vec<String> {
    let tolerations = spec.tolerations.as_deref().unwrap_or(&[]);
    if !node_ready(n.node) {
        return vec![NOT_READY.into()];
    }
    let unschedulable = n.node.spec.as_ref().and_then(|s| s.unschedulable).unwrap_or(false);
    let unschedulable_taint =
        Taint { key: "node.kubernetes.io/unschedulable".into(), effect: "NoSchedule".into(), ..Default::default() };
    if unschedulable && !tolerations.iter().any(|t| tolerates(t, &unschedulable_taint)) {
        return vec![UNSCHEDULABLE.into()];
    }
    if let Some(t) = untolerated(taints(n.node), tolerations, &["NoSchedule", "NoExecute"]) {
        return vec![format!("node(s) had untolerated taint {{{}: {}}}", t.key, t.value.as_deref().unwrap_or(""))];
    }
    if !node_matches(spec, n.node) {
        return vec![AFFINITY.into()];
    }
    let mut why = Vec::new();
    if n.used.pods + 1 > n.pods {
        why.push("Too many pods".to_string());
    }
    let cpu = pod::requests(p, "cpu");
    if cpu > 0 && cpu > n.cpu - n.used.cpu {
        why.push("Insufficient cpu".to_string());
    }
    let memory = pod::requests(p, "memory");
    if memory > 0 && memory > n.memory - n.used.memory {
        why.push("Insufficient memory".to_string());
    }
    why
}

/// Least requested (0-100, higher is emptier) after placing `p`, with kube-scheduler's defaults for pods that
/// request nothing (100m cpu, 200Mi memory) so that empty pods still spread.
fn score(p: &Pod, n: &NodeInfo) -> i128 {
    let cpu = match pod::requests(p, "cpu") {
        0 => 100,
        c => c,
    };
    let memory = match pod::requests(p, "memory") {
        0 => 200 * 1024 * 1024 * 1000,
        m => m,
    };
    let part = |cap: i128, used: i128, req: i128| if cap <= 0 { 0 } else { ((cap - used - req).max(0) * 100) / cap };
    (part(n.cpu, n.used.cpu, cpu) + part(n.memory, n.used.memory, memory)) / 2
}

/// kube-scheduler's FitError text.
pub fn unschedulable_message(nodes: usize, reasons: &HashMap<String, usize>) -> String {
    if nodes == 0 {
        return "0/0 nodes are available: no nodes available to schedule pods.".to_string();
    }
    let mut parts: Vec<String> = reasons.iter().map(|(r, n)| format!("{n} {r}")).collect();
    parts.sort();
    format!("0/{nodes} nodes are available: {}.", parts.join(", "))
}

fn is_ours(p: &Pod) -> bool {
    pod::node_name(p).is_empty()
        && pod::is_active(p)
        && p.spec.as_ref().and_then(|s| s.scheduler_name.as_deref()).is_none_or(|s| s == NAME)
}

/// One scheduling pass over every pending pod, in priority order, then oldest first.
pub fn schedule(cache: &Cache, now: Timestamp) -> Outcome {
    let nodes = cache.nodes.list();
    let pods = cache.pods.list();
    let mut infos: Vec<NodeInfo> = nodes
        .iter()
        .map(|n| NodeInfo {
            node: n,
            cpu: allocatable(n, "cpu").unwrap_or(0),
            memory: allocatable(n, "memory").unwrap_or(0),
            pods: allocatable(n, "pods").map(|p| p / 1000).unwrap_or(DEFAULT_MAX_PODS),
            used: Usage::default(),
        })
        .collect();
    let index: HashMap<String, usize> =
        infos.iter().enumerate().map(|(i, n)| (node_name(n.node).to_string(), i)).collect();
    // (node index, owner uid) → pods of that owner there.
    let mut family: HashMap<(usize, String), usize> = HashMap::new();
    for p in pods.iter().filter(|p| !pod::is_terminal(p)) {
        let Some(&i) = index.get(pod::node_name(p)) else { continue };
        let u = &mut infos[i].used;
        u.cpu += pod::requests(p, "cpu");
        u.memory += pod::requests(p, "memory");
        u.pods += 1;
        if let Some(r) = controller_of(&p.metadata) {
            *family.entry((i, r.uid.clone())).or_default() += 1;
        }
    }

    let mut pending: Vec<&Pod> = pods.iter().map(|p| p.as_ref()).filter(|p| is_ours(p)).collect();
    let priority = |p: &Pod| p.spec.as_ref().and_then(|s| s.priority).unwrap_or(0);
    pending.sort_by(|a, b| {
        priority(b)
            .cmp(&priority(a))
            .then_with(|| a.metadata.creation_timestamp.cmp(&b.metadata.creation_timestamp))
            .then_with(|| a.metadata.name.cmp(&b.metadata.name))
    });

    let mut out = Outcome::default();
    let mut unschedulable = 0;
    for p in pending {
        let spec = p.spec.clone().unwrap_or_default();
        let owner = controller_of(&p.metadata).map(|r| r.uid.clone());
        let mut reasons: HashMap<String, usize> = HashMap::new();
        let mut best: Option<(usize, (usize, i128))> = None;
        for (i, n) in infos.iter().enumerate() {
            let why = filter(p, &spec, n);
            if !why.is_empty() {
                for r in why {
                    *reasons.entry(r).or_default() += 1;
                }
                continue;
            }
            let siblings = owner.as_ref().and_then(|o| family.get(&(i, o.clone()))).copied().unwrap_or(0);
            let rank = (siblings, -score(p, n));
            // Nodes are in name order, so the first of equals wins: strict improvement only.
            if best.as_ref().is_none_or(|(_, r)| rank < *r) {
                best = Some((i, rank));
            }
        }
        let mut new = p.clone();
        match best {
            Some((i, _)) => {
                let node = node_name(infos[i].node).to_string();
                let u = &mut infos[i].used;
                u.cpu += pod::requests(p, "cpu");
                u.memory += pod::requests(p, "memory");
                u.pods += 1;
                if let Some(o) = &owner {
                    *family.entry((i, o.clone())).or_default() += 1;
                }
                new.spec.get_or_insert_with(Default::default).node_name = Some(node.clone());
                let cond = PodCondition { type_: "PodScheduled".into(), status: "True".into(), ..Default::default() };
                pod::set_condition(&mut new, cond, now);
                out.actions.push(Action::update(Obj::Pod(new), format!("bind to {node}")));
            }
            None => {
                unschedulable += 1;
                let message = unschedulable_message(infos.len(), &reasons);
                let cond = PodCondition {
                    type_: "PodScheduled".into(),
                    status: "False".into(),
                    reason: Some("Unschedulable".into()),
                    message: Some(message.clone()),
                    ..Default::default()
                };
                if pod::set_condition(&mut new, cond, now) {
                    out.actions.push(Action::update(Obj::Pod(new), format!("unschedulable: {message}")));
                }
            }
        }
    }
    if unschedulable > 0 {
        out = out.requeue(RETRY);
    }
    out
}

#[cfg(test)]
mod tests;
