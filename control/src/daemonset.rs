//! The DaemonSet controller: one pod per eligible node — its nodeSelector and required affinity match, and its
//! taints are tolerated once the tolerations Kubernetes adds to every daemon pod are counted — created with a
//! node affinity for that node (the scheduler binds it), removed when the node leaves or stops qualifying, a
//! failed one replaced; RollingUpdate (maxUnavailable, default 1) replaces out-of-date pods, OnDelete waits for
//! someone to delete them. Pods carry `controller-revision-hash` (the template's hash). Writes pods and status.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{DaemonSet, DaemonSetStatus};
use k8s_openapi::api::core::v1::{
    Affinity, Node, NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, Pod, PodSpec,
    PodTemplateSpec, Toleration,
};
use k8s_openapi::jiff::Timestamp;
use weft_api::labels::Selector;
use weft_api::ObjectKey;

use crate::action::{Action, Outcome};
use crate::cache::Cache;
use crate::claim::{self, Claim};
use crate::deployment::{scaled_value, template_hash};
use crate::obj::{controller_ref, is_deleting, key_of, label, name, namespace, uid, Kind, Obj};
use crate::pod;
use crate::replicaset::nz;
use crate::scheduler::{node_matches, node_name, taints, target_node, untolerated};

pub const HASH_LABEL: &str = "controller-revision-hash";
pub const GENERATION_LABEL: &str = "pod-template-generation";

/// The tolerations every daemon pod gets (`AddOrUpdateDaemonPodTolerations`): node problems must not evict or
/// keep out the pods that may be there to fix them.
pub fn add_daemon_tolerations(spec: &mut PodSpec) {
    let mut add = |key: &str, effect: &str| {
        let t = Toleration {
            key: Some(key.into()),
            operator: Some("Exists".into()),
            effect: Some(effect.into()),
            ..Default::default()
        };
        let list = spec.tolerations.get_or_insert_with(Vec::new);
        match list
            .iter_mut()
            .find(|x| x.key == t.key && x.effect == t.effect && x.operator == t.operator && x.value == t.value)
        {
            Some(x) => *x = t,
            None => list.push(t),
        }
    };
    add("node.kubernetes.io/not-ready", "NoExecute");
    add("node.kubernetes.io/unreachable", "NoExecute");
    add("node.kubernetes.io/disk-pressure", "NoSchedule");
    add("node.kubernetes.io/memory-pressure", "NoSchedule");
    add("node.kubernetes.io/pid-pressure", "NoSchedule");
    add("node.kubernetes.io/unschedulable", "NoSchedule");
    if spec.host_network == Some(true) {
        add("node.kubernetes.io/network-unavailable", "NoSchedule");
    }
}

/// `NodeShouldRunDaemonPod`: (should run there, may keep running there).
pub fn should_run(template: &PodTemplateSpec, n: &Node) -> (bool, bool) {
    let mut spec = template.spec.clone().unwrap_or_default();
    if spec.node_name.as_deref().is_some_and(|x| !x.is_empty() && x != node_name(n)) {
        return (false, false);
    }
    add_daemon_tolerations(&mut spec);
    if !node_matches(&spec, n) {
        return (false, false);
    }
    let tolerations = spec.tolerations.as_deref().unwrap_or(&[]);
    if untolerated(taints(n), tolerations, &["NoSchedule", "NoExecute"]).is_some() {
        return (false, untolerated(taints(n), tolerations, &["NoExecute"]).is_none());
    }
    (true, true)
}

/// The pod for `node`: the template with the revision labels, the daemon tolerations and a required affinity for
/// that node only (`ReplaceDaemonSetPodNodeNameNodeAffinity`).
fn pod_for(ds: &DaemonSet, hash: &str, node: &str) -> Pod {
    let mut t = ds.spec.template.clone();
    let labels = t.metadata.get_or_insert_with(Default::default).labels.get_or_insert_with(BTreeMap::new);
    labels.insert(HASH_LABEL.into(), hash.into());
    labels.insert(GENERATION_LABEL.into(), ds.metadata.generation.unwrap_or(1).to_string());
    let spec = t.spec.get_or_insert_with(Default::default);
    add_daemon_tolerations(spec);
    let term = NodeSelectorTerm {
        match_fields: Some(vec![NodeSelectorRequirement {
            key: "metadata.name".into(),
            operator: "In".into(),
            values: Some(vec![node.into()]),
        }]),
        match_expressions: None,
    };
    let affinity = spec.affinity.get_or_insert_with(Affinity::default);
    affinity
        .node_affinity
        .get_or_insert_with(NodeAffinity::default)
        .required_during_scheduling_ignored_during_execution = Some(NodeSelector { node_selector_terms: vec![term] });
    pod::from_template(
        &t,
        namespace(&ds.metadata),
        &pod::name_prefix(name(&ds.metadata)),
        controller_ref(Kind::DaemonSet, &ds.metadata),
    )
}

fn is_updated(p: &Pod, hash: &str) -> bool {
    label(&p.metadata, HASH_LABEL) == Some(hash)
}

/// Oldest first, a running pod before others of the same age.
fn by_age(a: &Arc<Pod>, b: &Arc<Pod>) -> std::cmp::Ordering {
    a.metadata
        .creation_timestamp
        .cmp(&b.metadata.creation_timestamp)
        .then_with(|| (pod::phase(b) == "Running").cmp(&(pod::phase(a) == "Running")))
        .then_with(|| a.metadata.name.cmp(&b.metadata.name))
}

fn delete(p: &Pod, why: String) -> Action {
    Action::delete(Kind::Pod, key_of(&p.metadata), uid(&p.metadata), why)
}

pub fn reconcile(key: &ObjectKey, cache: &Cache, now: Timestamp) -> Outcome {
    let Some(ds) = cache.daemonsets.get(key) else { return Outcome::default() };
    if is_deleting(&ds.metadata) {
        return Outcome::default();
    }
    let selector = match Selector::from_label_selector(Some(&ds.spec.selector)) {
        Ok(s) if !s.is_everything() => s,
        _ => {
            tracing::warn!(daemonset = %key, "selector is empty or invalid; not managing pods");
            return Outcome::default();
        }
    };
    let collision = ds.status.as_ref().and_then(|s| s.collision_count);
    let hash = template_hash(&ds.spec.template, collision);
    let dsname = name(&ds.metadata).to_string();
    let mut out = Outcome::default();

    // Claim pods, by the node each is for.
    let mut by_node: HashMap<String, Vec<Arc<Pod>>> = HashMap::new();
    for p in cache.pods.in_namespace(namespace(&ds.metadata)) {
        let owned = match claim::claim(&ds.metadata, &selector, &p.metadata) {
            Claim::Owned => true,
            Claim::Adopt => {
                let mut new = (*p).clone();
                claim::adopt(&mut new.metadata, controller_ref(Kind::DaemonSet, &ds.metadata));
                out.actions.push(Action::update(Obj::Pod(new), format!("adopted by DaemonSet {dsname}")));
                true
            }
            Claim::Release => {
                let mut new = (*p).clone();
                claim::release(&mut new.metadata, uid(&ds.metadata));
                out.actions.push(Action::update(Obj::Pod(new), format!("released by DaemonSet {dsname}")));
                false
            }
            Claim::Ignore => false,
        };
        if owned {
            if let Some(n) = target_node(&p) {
                by_node.entry(n).or_default().push(p);
            }
        }
    }
    for pods in by_node.values_mut() {
        pods.sort_by(by_age);
    }
    if !out.actions.is_empty() {
        return out;
    }

    let nodes = cache.nodes.list();
    let mut create = Vec::new();
    let mut deletes = Vec::new();
    let empty = Vec::new();
    for n in &nodes {
        let nn = node_name(n);
        let pods = by_node.get(nn).unwrap_or(&empty);
        let (run, keep) = should_run(&ds.spec.template, n);
        if run && pods.is_empty() {
            create.push(nn.to_string());
        } else if keep && !pods.is_empty() {
            let mut running = Vec::new();
            for p in pods.iter().filter(|p| !is_deleting(&p.metadata)) {
                if pod::phase(p) == "Failed" {
                    deletes.push(delete(p, format!("failed on {nn}; DaemonSet {dsname} replaces it")));
                } else {
                    running.push(p);
                }
            }
            for p in running.iter().skip(1) {
                deletes.push(delete(p, format!("more than one pod of DaemonSet {dsname} on {nn}")));
            }
        } else if !keep {
            for p in pods.iter().filter(|p| !is_deleting(&p.metadata)) {
                deletes.push(delete(p, format!("{nn} no longer runs DaemonSet {dsname}")));
            }
        }
    }
    // Pods for nodes that left.
    let mut gone: Vec<&String> = by_node.keys().filter(|n| !nodes.iter().any(|x| node_name(x) == n.as_str())).collect();
    gone.sort();
    for n in gone {
        for p in by_node[n].iter().filter(|p| !is_deleting(&p.metadata)) {
            deletes.push(delete(p, format!("node {n} is gone")));
        }
    }
    out.actions.extend(deletes);
    out.actions.extend(create.iter().map(|n| Action::Create(Obj::Pod(pod_for(&ds, &hash, n)))));

    // Rolling update once placement is settled (an old pod deleted here is replaced by the next sync's creation).
    let min_ready = ds.spec.min_ready_seconds.unwrap_or(0);
    let desired = nodes.iter().filter(|n| should_run(&ds.spec.template, n).0).count() as i32;
    let strategy = ds.spec.update_strategy.clone().unwrap_or_default();
    if out.actions.is_empty() && strategy.type_.as_deref() != Some("OnDelete") {
        let max_unavailable = strategy
            .rolling_update
            .as_ref()
            .and_then(|r| r.max_unavailable.clone())
            .map(|v| scaled_value(&v, desired, true))
            .unwrap_or(1);
        let max_unavailable = if desired > 0 && max_unavailable == 0 { 1 } else { max_unavailable };
        let mut unavailable = 0;
        let mut replace = Vec::new();
        let mut candidates = Vec::new();
        let mut names: Vec<&String> = by_node.keys().collect();
        names.sort();
        for n in names {
            let live: Vec<&Arc<Pod>> = by_node[n].iter().filter(|p| !is_deleting(&p.metadata)).collect();
            let new: Vec<&Arc<Pod>> = live.iter().copied().filter(|p| is_updated(p, &hash)).collect();
            let old: Vec<&Arc<Pod>> = live.iter().copied().filter(|p| !is_updated(p, &hash)).collect();
            match (new.len(), old.len()) {
                (0, 0) | (1, 1) => unavailable += 1,
                (1, 0) => {
                    if !pod::is_available(new[0], min_ready, now) {
                        unavailable += 1;
                    }
                }
                (0, 1) => {
                    if !pod::is_available(old[0], min_ready, now) {
                        replace.push(old[0]);
                    } else if unavailable < max_unavailable {
                        candidates.push(old[0]);
                    }
                }
                _ => unavailable += 1, // more than one: the placement step cleans up
            }
        }
        let room = (max_unavailable - unavailable).max(0) as usize;
        for p in replace.into_iter().chain(candidates.into_iter().take(room)) {
            out.actions.push(delete(p, format!("out of date (DaemonSet {dsname} rolling update)")));
        }
    }

    // Status, from the pods as they are.
    let mut s = DaemonSetStatus { observed_generation: ds.metadata.generation, ..Default::default() };
    let mut available = 0;
    let mut waiting = false;
    for n in &nodes {
        let (run, _) = should_run(&ds.spec.template, n);
        let pods = by_node.get(node_name(n)).unwrap_or(&empty);
        if run {
            s.desired_number_scheduled += 1;
            if let Some(p) = pods.first() {
                s.current_number_scheduled += 1;
                if pod::is_ready(p) {
                    s.number_ready += 1;
                    if pod::is_available(p, min_ready, now) {
                        available += 1;
                    } else {
                        waiting = true;
                    }
                }
                if is_updated(p, &hash) {
                    *s.updated_number_scheduled.get_or_insert(0) += 1;
                }
            }
        } else if !pods.is_empty() {
            s.number_misscheduled += 1;
        }
    }
    s.number_available = nz(available);
    s.number_unavailable = nz(s.desired_number_scheduled - available);
    let old = ds.status.clone().unwrap_or_default();
    s.collision_count = old.collision_count;
    s.conditions = old.conditions.clone();
    if s != old {
        let mut new = (*ds).clone();
        let why = format!(
            "status: {} desired, {} scheduled, {} ready",
            s.desired_number_scheduled, s.current_number_scheduled, s.number_ready
        );
        new.status = Some(s);
        out.actions.push(Action::update(Obj::DaemonSet(new), why));
    }
    if waiting && min_ready > 0 {
        out = out.requeue(Duration::from_secs(min_ready as u64));
    }
    out
}

#[cfg(test)]
mod tests;
