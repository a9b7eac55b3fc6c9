//! Node lifecycle: a node's heartbeat is its Lease `kube-node-lease/<node>` (renewTime) or its Ready condition's
//! lastHeartbeatTime. As Kubernetes does, those are only compared for change, never subtracted from our clock: the
//! controller notes its own time when it sees a heartbeat change (`observe`), so a node with a skewed clock is
//! judged by how long ago *we* saw it beat. A node silent past the grace period gets Ready (and its pressure
//! conditions) Unknown, the `node.kubernetes.io/unreachable:NoSchedule` taint, and its pods' Ready condition set
//! False; one not Ready for the eviction timeout loses its pods (DaemonSet pods stay), unless so many nodes are
//! down that the fault is more likely the control plane's view (Kubernetes' zone disruption rule). Pods bound to
//! nodes that no longer exist are deleted (pod GC). Writes Nodes and Pods.

use std::collections::HashMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, NodeCondition, Pod, PodCondition, Taint};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use weft_api::ObjectKey;

use crate::action::{Action, Outcome};
use crate::cache::Cache;
use crate::obj::{controller_of, key_of, uid, Kind, Obj};
use crate::pod;
use crate::scheduler::node_name;

pub const LEASE_NAMESPACE: &str = "kube-node-lease";
pub const UNREACHABLE: &str = "node.kubernetes.io/unreachable";
pub const NOT_READY: &str = "node.kubernetes.io/not-ready";

#[derive(Debug, Clone)]
pub struct Config {
    /// `--node-monitor-grace-period`
    pub grace_period: Duration,
    /// `--pod-eviction-timeout`
    pub eviction_timeout: Duration,
    /// `--node-monitor-period`
    pub monitor_period: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            grace_period: Duration::from_secs(40),
            eviction_timeout: Duration::from_secs(300),
            monitor_period: Duration::from_secs(5),
        }
    }
}

fn secs(d: Duration) -> SignedDuration {
    SignedDuration::try_from(d).unwrap_or(SignedDuration::MAX)
}

fn condition<'a>(n: &'a Node, type_: &str) -> Option<&'a NodeCondition> {
    n.status.as_ref()?.conditions.as_ref()?.iter().find(|c| c.type_ == type_)
}

/// The node's heartbeat values as the node wrote them (its Lease's renewTime, its Ready lastHeartbeatTime):
/// compared for change only, since they come from another machine's clock.
pub fn beat(n: &Node, cache: &Cache) -> (Option<Timestamp>, Option<Timestamp>) {
    let lease = cache
        .leases
        .get(&ObjectKey::new(Some(LEASE_NAMESPACE), node_name(n)))
        .and_then(|l| l.spec.as_ref().and_then(|s| s.renew_time.as_ref()).map(|t| t.0));
    let ready = condition(n, "Ready").and_then(|c| c.last_heartbeat_time.as_ref()).map(|t| t.0);
    (lease, ready)
}

fn ready_status(n: &Node) -> String {
    condition(n, "Ready").map(|c| c.status.clone()).unwrap_or_default()
}

/// What the controller last saw of one node, stamped with the controller's own clock.
#[derive(Debug, Clone, PartialEq)]
pub struct Observed {
    pub beat: (Option<Timestamp>, Option<Timestamp>),
    /// Our time when `beat` last changed, or when we first saw the node (a full grace period after a restart
    /// or a failover).
    pub probe: Timestamp,
    pub ready: String,
    /// Our time when the Ready status last changed (or first seen).
    pub ready_since: Timestamp,
}

/// Per node name: what `observe` saw. Kept by the controller between reconciles.
pub type Health = HashMap<String, Observed>;

/// Records, on our clock, which nodes' heartbeats or Ready status changed since the last look.
pub fn observe(health: &mut Health, cache: &Cache, now: Timestamp) {
    let nodes = cache.nodes.list();
    health.retain(|name, _| nodes.iter().any(|n| node_name(n) == name.as_str()));
    for n in &nodes {
        let (beat, ready) = (beat(n, cache), ready_status(n));
        match health.get_mut(node_name(n)) {
            None => {
                health.insert(node_name(n).to_string(), Observed { beat, probe: now, ready, ready_since: now });
            }
            Some(o) => {
                if o.beat != beat {
                    o.beat = beat;
                    o.probe = now;
                }
                if o.ready != ready {
                    o.ready = ready;
                    o.ready_since = now;
                }
            }
        }
    }
}

/// The node's last sign of life on our clock (now, for a node not observed yet).
fn last_seen(n: &Node, health: &Health, now: Timestamp) -> Timestamp {
    health.get(node_name(n)).map_or(now, |o| o.probe)
}

/// Ready (and the pressure conditions) Unknown: the kubelet stopped posting.
fn mark_unknown(n: &mut Node, now: Timestamp) -> bool {
    let status = n.status.get_or_insert_with(Default::default);
    let conds = status.conditions.get_or_insert_with(Vec::new);
    let mut changed = false;
    if !conds.iter().any(|c| c.type_ == "Ready") {
        conds.push(NodeCondition {
            type_: "Ready".into(),
            status: "Unknown".into(),
            reason: Some("NodeStatusNeverUpdated".into()),
            message: Some("Kubelet never posted node status.".into()),
            last_transition_time: Some(Time(now)),
            ..Default::default()
        });
        changed = true;
    }
    for c in conds.iter_mut() {
        if matches!(c.type_.as_str(), "Ready" | "MemoryPressure" | "DiskPressure" | "PIDPressure")
            && c.status != "Unknown"
        {
            c.status = "Unknown".into();
            c.reason = Some("NodeStatusUnknown".into());
            c.message = Some("Kubelet stopped posting node status.".into());
            c.last_transition_time = Some(Time(now));
            changed = true;
        }
    }
    changed
}

/// The NoSchedule taint the Ready condition calls for (none when Ready is True).
fn want_taint(n: &Node) -> Option<&'static str> {
    match condition(n, "Ready").map(|c| c.status.as_str()) {
        Some("True") => None,
        Some("False") => Some(NOT_READY),
        _ => Some(UNREACHABLE),
    }
}

fn sync_taints(n: &mut Node, now: Timestamp) -> bool {
    let want = want_taint(n);
    let spec = n.spec.get_or_insert_with(Default::default);
    let taints = spec.taints.get_or_insert_with(Vec::new);
    let before = taints.len();
    taints.retain(|t| {
        !(t.effect == "NoSchedule"
            && [UNREACHABLE, NOT_READY].contains(&t.key.as_str())
            && Some(t.key.as_str()) != want)
    });
    let mut changed = taints.len() != before;
    if let Some(key) = want {
        if !taints.iter().any(|t| t.key == key && t.effect == "NoSchedule") {
            taints.push(Taint {
                key: key.into(),
                effect: "NoSchedule".into(),
                time_added: Some(Time(now)),
                value: None,
            });
            changed = true;
        }
    }
    if taints.is_empty() {
        spec.taints = None;
    }
    changed
}

fn is_daemon_pod(p: &Pod) -> bool {
    controller_of(&p.metadata).is_some_and(|r| r.kind == "DaemonSet")
}

/// The pure decision, from the cache and what `observe` recorded.
pub fn reconcile(cache: &Cache, now: Timestamp, health: &Health, cfg: &Config) -> Outcome {
    let nodes = cache.nodes.list();
    let pods = cache.pods.list();
    let mut on_node: HashMap<&str, Vec<&Pod>> = HashMap::new();
    for p in &pods {
        on_node.entry(pod::node_name(p)).or_default().push(p);
    }
    let mut out = Outcome::default();
    let mut updated: Vec<Node> = Vec::new();
    for n in &nodes {
        let mut new = (**n).clone();
        let silent = now.duration_since(last_seen(n, health, now)) > secs(cfg.grace_period);
        let mut changed = silent && mark_unknown(&mut new, now);
        changed |= sync_taints(&mut new, now);
        if changed {
            let why = match condition(&new, "Ready").map(|c| c.status.as_str()) {
                Some("Unknown") if silent => format!("no heartbeat for over {:?}: Ready Unknown", cfg.grace_period),
                _ => "taints follow the Ready condition".to_string(),
            };
            out.actions.push(Action::update(Obj::Node(new.clone()), why));
        }
        updated.push(new);
    }

    // Zone disruption (one zone here): stop evicting when every node is down, or most of more than two are.
    let not_ready = updated.iter().filter(|n| want_taint(n).is_some()).count();
    let ready = updated.len() - not_ready;
    let evict = !((ready == 0 && not_ready > 0) || (not_ready > 2 && not_ready * 100 >= updated.len() * 55));

    for n in &updated {
        let Some(cond) = condition(n, "Ready").filter(|c| c.status != "True") else { continue };
        let pods = on_node.get(node_name(n)).map(Vec::as_slice).unwrap_or(&[]);
        let since = match cond.status.as_str() {
            // Unknown: counted from the last heartbeat we saw; False: from when we saw it become False.
            "Unknown" => last_seen(n, health, now),
            _ => health.get(node_name(n)).map_or(now, |o| o.ready_since),
        };
        let expired = now.duration_since(since) > secs(cfg.eviction_timeout);
        for p in pods.iter().filter(|p| p.metadata.deletion_timestamp.is_none()) {
            if expired && evict && !is_daemon_pod(p) {
                out.actions.push(Action::delete(
                    Kind::Pod,
                    key_of(&p.metadata),
                    uid(&p.metadata),
                    format!("node {} not ready for over {:?}", node_name(n), cfg.eviction_timeout),
                ));
            } else if pod::is_ready(p) && !pod::is_terminal(p) {
                let mut new = (*p).clone();
                let c = PodCondition { type_: "Ready".into(), status: "False".into(), ..Default::default() };
                pod::set_condition(&mut new, c, now);
                out.actions.push(Action::update(Obj::Pod(new), format!("node {} is not ready", node_name(n))));
            }
        }
    }

    // Pods bound to nodes that are gone (pod GC of orphans).
    let mut gone: Vec<&&str> =
        on_node.keys().filter(|n| !n.is_empty() && !nodes.iter().any(|x| node_name(x) == **n)).collect();
    gone.sort();
    for n in gone {
        for p in on_node[*n].iter().filter(|p| p.metadata.deletion_timestamp.is_none()) {
            out.actions.push(Action::delete(
                Kind::Pod,
                key_of(&p.metadata),
                uid(&p.metadata),
                format!("node {n} is gone"),
            ));
        }
    }
    // Group writes by kind for the runtime: nodes first, then pod updates, then pod deletions.
    out.actions.sort_by_key(|a| match (a.kind(), a.verb()) {
        (Kind::Node, _) => 0,
        (_, "update") => 1,
        _ => 2,
    });
    out
}

#[cfg(test)]
mod tests;
