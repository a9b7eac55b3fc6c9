//! Node lifecycle: a node's heartbeat is its Lease `kube-node-lease/<node>` (renewTime) or its Ready condition's
//! lastHeartbeatTime. As Kubernetes does, those are only compared for change, never subtracted from our clock: the
//! controller notes its own time when it sees a heartbeat change (`observe`), so a node with a skewed clock is
//! judged by how long ago *we* saw it beat. A node silent past the grace period gets Ready (and its pressure
//! conditions) Unknown and its pods' Ready condition set False. Taint-based eviction, as Kubernetes does it now:
//! a node not Ready carries `node.kubernetes.io/unreachable` (Unknown) or `not-ready` (False) as NoSchedule and
//! NoExecute taints (NoExecute ones added at `--node-eviction-rate`, none while so many nodes are down that the fault
//! is more likely the control plane's view: the zone disruption rule); a pod on a NoExecute-tainted node is deleted
//! once the taint is older than its toleration allows (`taint_eviction`). Pods bound to nodes that no longer exist
//! are deleted (pod GC). Writes Nodes and Pods.

use std::collections::HashMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, NodeCondition, Pod, PodCondition, Taint, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use weft_api::ObjectKey;

use crate::action::{Action, Outcome};
use crate::cache::Cache;
use crate::obj::{key_of, uid, Kind, Obj};
use crate::pod;
use crate::scheduler::{node_name, tolerates};

pub const LEASE_NAMESPACE: &str = "kube-node-lease";
pub const UNREACHABLE: &str = "node.kubernetes.io/unreachable";
pub const NOT_READY: &str = "node.kubernetes.io/not-ready";

#[derive(Debug, Clone)]
pub struct Config {
    /// `--node-monitor-grace-period`
    pub grace_period: Duration,
    /// `--pod-eviction-timeout`: accepted for compatibility and ignored, as in Kubernetes since taint-based
    /// eviction: how long a pod stays on a failed node is its NoExecute toleration's `tolerationSeconds`.
    pub eviction_timeout: Duration,
    /// `--node-monitor-period`
    pub monitor_period: Duration,
    /// `--node-eviction-rate`: nodes per second that may get a NoExecute taint (0 or less: none).
    pub eviction_rate: f64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            grace_period: Duration::from_secs(40),
            eviction_timeout: Duration::from_secs(300),
            monitor_period: Duration::from_secs(5),
            eviction_rate: 0.1,
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
    /// Per NoExecute taint key on the node: our time when we first saw it (a taint's age is measured on our
    /// clock, never from its `timeAdded`, which another controller's clock may have written).
    pub taints: HashMap<String, Timestamp>,
}

/// Per node name: what `observe` saw. Kept by the controller between reconciles.
pub type Health = HashMap<String, Observed>;

/// Records, on our clock, which nodes' heartbeats or Ready status changed since the last look.
pub fn observe(health: &mut Health, cache: &Cache, now: Timestamp) {
    let nodes = cache.nodes.list();
    health.retain(|name, _| nodes.iter().any(|n| node_name(n) == name.as_str()));
    for n in &nodes {
        let (beat, ready) = (beat(n, cache), ready_status(n));
        let o = health.entry(node_name(n).to_string()).or_insert_with(|| Observed {
            beat,
            probe: now,
            ready: ready.clone(),
            ready_since: now,
            taints: HashMap::new(),
        });
        let keys: Vec<&str> = no_execute(n).map(|t| t.key.as_str()).collect();
        o.taints.retain(|k, _| keys.contains(&k.as_str()));
        for k in keys {
            o.taints.entry(k.to_string()).or_insert(now);
        }
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

/// The taint key the Ready condition calls for (none when Ready is True).
fn want_taint(n: &Node) -> Option<&'static str> {
    match condition(n, "Ready").map(|c| c.status.as_str()) {
        Some("True") => None,
        Some("False") => Some(NOT_READY),
        _ => Some(UNREACHABLE),
    }
}

fn no_execute(n: &Node) -> impl Iterator<Item = &Taint> {
    n.spec.as_ref().and_then(|s| s.taints.as_deref()).unwrap_or(&[]).iter().filter(|t| t.effect == "NoExecute")
}

fn is_ours(t: &Taint) -> bool {
    [UNREACHABLE, NOT_READY].contains(&t.key.as_str())
}

/// What may happen to the node's NoExecute taint of ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NoExecute {
    /// Added if the Ready condition calls for it (a rate-limit token is free).
    Add,
    /// Kept if present, not added (the rate limit).
    Keep,
    /// Removed (zone disruption: the nodes are treated as reachable, as Kubernetes does).
    Remove,
}

/// Makes the node's unreachable/not-ready taints follow its Ready condition: the NoSchedule one always, the
/// NoExecute one as `ne` says. Stale ones of ours are removed. Returns (changed, a NoExecute taint was added).
fn sync_taints(n: &mut Node, now: Timestamp, ne: NoExecute) -> (bool, bool) {
    let want = want_taint(n);
    let spec = n.spec.get_or_insert_with(Default::default);
    let taints = spec.taints.get_or_insert_with(Vec::new);
    let before = taints.len();
    taints.retain(|t| match t.effect.as_str() {
        _ if !is_ours(t) => true,
        "NoSchedule" => Some(t.key.as_str()) == want,
        "NoExecute" => Some(t.key.as_str()) == want && ne != NoExecute::Remove,
        _ => true,
    });
    let mut changed = taints.len() != before;
    let mut added = false;
    if let Some(key) = want {
        for effect in ["NoSchedule", "NoExecute"] {
            if effect == "NoExecute" && ne != NoExecute::Add {
                continue;
            }
            if !taints.iter().any(|t| t.key == key && t.effect == effect) {
                taints.push(Taint { key: key.into(), effect: effect.into(), time_added: Some(Time(now)), value: None });
                changed = true;
                added |= effect == "NoExecute";
            }
        }
    }
    if taints.is_empty() {
        spec.taints = None;
    }
    (changed, added)
}

/// What the taint eviction decides for one pod on a node with NoExecute taints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Eviction {
    /// Every taint is tolerated for good (no `tolerationSeconds`), or there is no NoExecute taint.
    Keep,
    /// Tolerated for now; evicted after this much more time (re-checked every monitor period).
    After(Duration),
    /// A taint nobody tolerates, or one older than its toleration allows: delete the pod.
    Now,
}

/// The taint-eviction decision (Kubernetes' taint manager): `taints` are the node's NoExecute taints with their
/// age on our clock. Per taint, the tolerations that match it: none means evict at once; the smallest
/// `tolerationSeconds` among them (≤ 0 counts as 0) is how long the pod may stay; if none of them has
/// `tolerationSeconds`, it tolerates the taint forever. The pod goes as soon as any taint says so.
pub fn taint_eviction(taints: &[(&Taint, Duration)], tolerations: &[Toleration]) -> Eviction {
    let mut verdict = Eviction::Keep;
    for (taint, age) in taints.iter().filter(|(t, _)| t.effect == "NoExecute") {
        let matching: Vec<&Toleration> = tolerations.iter().filter(|x| tolerates(x, taint)).collect();
        if matching.is_empty() {
            return Eviction::Now;
        }
        let Some(allowed) = matching.iter().filter_map(|x| x.toleration_seconds).min() else { continue };
        let allowed = Duration::from_secs(allowed.max(0).unsigned_abs());
        let Some(left) = allowed.checked_sub(*age).filter(|l| !l.is_zero()) else { return Eviction::Now };
        verdict = match verdict {
            Eviction::After(d) if d <= left => verdict,
            _ => Eviction::After(left),
        };
    }
    verdict
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

    // Conditions first: the zone rule and the taints follow the Ready status this pass writes.
    let mut updated: Vec<(Node, bool, bool)> = Vec::new();
    for n in &nodes {
        let mut new = (**n).clone();
        let silent = now.duration_since(last_seen(n, health, now)) > secs(cfg.grace_period);
        let changed = silent && mark_unknown(&mut new, now);
        updated.push((new, silent, changed));
    }

    // Zone disruption (one zone here): no NoExecute taints and no evictions when every node is down, or most
    // of more than two are.
    let not_ready = updated.iter().filter(|(n, ..)| want_taint(n).is_some()).count();
    let evict =
        !((updated.len() == not_ready && not_ready > 0) || (not_ready > 2 && not_ready * 100 >= updated.len() * 55));
    // Rate limit (one token every 1/rate s, burst 1): a NoExecute taint of ours that we first saw within the
    // interval holds the token; at most one node is tainted per pass.
    let interval =
        (cfg.eviction_rate > 0.0).then(|| Duration::try_from_secs_f64(1.0 / cfg.eviction_rate).ok()).flatten();
    let mut token = interval.is_some_and(|iv| {
        !health
            .values()
            .flat_map(|o| o.taints.iter())
            .any(|(k, seen)| [UNREACHABLE, NOT_READY].contains(&k.as_str()) && now.duration_since(*seen) < secs(iv))
    });

    for (new, silent, changed) in &mut updated {
        let ne = match (evict, token) {
            (false, _) => NoExecute::Remove,
            (true, true) => NoExecute::Add,
            (true, false) => NoExecute::Keep,
        };
        let (taints_changed, added) = sync_taints(new, now, ne);
        token &= !added;
        if *changed || taints_changed {
            let why = match condition(new, "Ready").map(|c| c.status.as_str()) {
                Some("Unknown") if *silent => format!("no heartbeat for over {:?}: Ready Unknown", cfg.grace_period),
                _ => "taints follow the Ready condition".to_string(),
            };
            out.actions.push(Action::update(Obj::Node(new.clone()), why));
        }
    }

    for (n, ..) in &updated {
        let pods = on_node.get(node_name(n)).map(Vec::as_slice).unwrap_or(&[]);
        let seen = health.get(node_name(n));
        // A taint's age on our clock: from when `observe` first saw it (zero for one added in this pass).
        let taints: Vec<(&Taint, Duration)> = no_execute(n)
            .map(|t| {
                let since = seen.and_then(|o| o.taints.get(&t.key)).copied().unwrap_or(now);
                (t, now.duration_since(since).try_into().unwrap_or(Duration::ZERO))
            })
            .collect();
        let not_ready = condition(n, "Ready").is_some_and(|c| c.status != "True");
        for p in pods.iter().filter(|p| p.metadata.deletion_timestamp.is_none()) {
            let tolerations = p.spec.as_ref().and_then(|s| s.tolerations.as_deref()).unwrap_or(&[]);
            if !taints.is_empty() && taint_eviction(&taints, tolerations) == Eviction::Now {
                let why = match taints.iter().find(|(t, _)| is_ours(t)) {
                    Some((t, age)) => {
                        format!("node {} has taint {}:NoExecute for {}s", node_name(n), t.key, age.as_secs())
                    }
                    None => format!("node {} has a NoExecute taint the pod does not tolerate", node_name(n)),
                };
                out.actions.push(Action::delete(Kind::Pod, key_of(&p.metadata), uid(&p.metadata), why));
            } else if not_ready && pod::is_ready(p) && !pod::is_terminal(p) {
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
