//! The Deployment controller, after Kubernetes' `pkg/controller/deployment`: one ReplicaSet per pod template
//! (named `<deployment>-<pod-template-hash>`), RollingUpdate within maxSurge/maxUnavailable or Recreate, revision
//! annotations (a rollback makes an old ReplicaSet current again with the next revision), revisionHistoryLimit,
//! paused deployments, proportional scaling mid-rollout, status and the Progressing/Available conditions.
//! One reconcile takes one step, as Kubernetes' does; the ReplicaSets' own status changes bring the next.
//! Reads Deployments, ReplicaSets and pods; writes ReplicaSets and the Deployment's annotations and status.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentCondition, DeploymentStatus, ReplicaSet, ReplicaSetSpec};
use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use weft_api::labels::Selector;
use weft_api::ObjectKey;

use crate::action::{Action, Outcome};
use crate::cache::Cache;
use crate::claim::{self, Claim};
use crate::obj::{
    annotation, by_creation, controller_of, controller_ref, is_deleting, name, namespace, uid, Kind, Obj,
};
use crate::pod;
use crate::replicaset::nz;

pub const REVISION: &str = "deployment.kubernetes.io/revision";
pub const REVISION_HISTORY: &str = "deployment.kubernetes.io/revision-history";
pub const DESIRED_REPLICAS: &str = "deployment.kubernetes.io/desired-replicas";
pub const MAX_REPLICAS: &str = "deployment.kubernetes.io/max-replicas";
pub const HASH_LABEL: &str = "pod-template-hash";
const MAX_REV_HISTORY_CHARS: usize = 2000;

pub const PROGRESSING: &str = "Progressing";
pub const AVAILABLE: &str = "Available";

/// Annotations a Deployment does not pass on to its ReplicaSets.
const NOT_COPIED: &[&str] = &[
    "kubectl.kubernetes.io/last-applied-configuration",
    REVISION,
    REVISION_HISTORY,
    DESIRED_REPLICAS,
    MAX_REPLICAS,
    "deprecated.deployment.rollback.to",
];

// ---- the template hash ----

fn fnv1a32(data: &[u8], mut h: u32) -> u32 {
    for b in data {
        h ^= *b as u32;
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// `rand.SafeEncodeString`: each character mapped into an alphabet without vowels or look-alikes.
fn safe_encode(s: &str) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    s.bytes().map(|b| ALPHABET[b as usize % ALPHABET.len()] as char).collect()
}

/// `controller.ComputeHash`: FNV-1a over the template (here its canonical JSON), then the collision count, encoded.
pub fn template_hash(t: &PodTemplateSpec, collision_count: Option<i32>) -> String {
    let json = serde_json::to_vec(t).unwrap_or_default();
    let mut h = fnv1a32(&json, 0x811c_9dc5);
    if let Some(c) = collision_count {
        h = fnv1a32(&(c as u32).to_le_bytes(), h);
    }
    safe_encode(&h.to_string())
}

/// The template as JSON without the hash label and without empty values (null, {}, []): an absent and an empty
/// field are the same template, as `weft rollout` compares them too.
fn normalized(t: &PodTemplateSpec) -> serde_json::Value {
    fn prune(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(m) => {
                m.values_mut().for_each(prune);
                m.retain(|_, v| {
                    !(v.is_null()
                        || v.as_object().is_some_and(|o| o.is_empty())
                        || v.as_array().is_some_and(|a| a.is_empty()))
                });
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(prune),
            _ => {}
        }
    }
    let mut v = serde_json::to_value(t).unwrap_or_default();
    if let Some(labels) = v.pointer_mut("/metadata/labels").and_then(serde_json::Value::as_object_mut) {
        labels.remove(HASH_LABEL);
    }
    prune(&mut v);
    v
}

/// `EqualIgnoreHash`: the same template but for the pod-template-hash label.
pub fn equal_ignore_hash(a: &PodTemplateSpec, b: &PodTemplateSpec) -> bool {
    normalized(a) == normalized(b)
}

// ---- fence posts ----

/// `intstr.GetScaledValueFromIntOrPercent`.
pub fn scaled_value(v: &IntOrString, total: i32, round_up: bool) -> i32 {
    match v {
        IntOrString::Int(i) => *i,
        IntOrString::String(s) => {
            let pct: f64 = s.trim_end_matches('%').parse().unwrap_or(0.0);
            let x = pct * total as f64 / 100.0;
            (if round_up { x.ceil() } else { x.floor() }) as i32
        }
    }
}

fn is_recreate(d: &Deployment) -> bool {
    d.spec.strategy.as_ref().and_then(|s| s.type_.as_deref()) == Some("Recreate")
}

pub fn replicas(d: &Deployment) -> i32 {
    d.spec.replicas.unwrap_or(1)
}

/// (maxSurge, maxUnavailable) for the deployment (`ResolveFenceposts`): surge rounds up, unavailable down, both
/// default 25%, and both zero means one unavailable. Recreate has neither.
pub fn fenceposts(d: &Deployment) -> (i32, i32) {
    if is_recreate(d) {
        return (0, 0);
    }
    let ru = d.spec.strategy.as_ref().and_then(|s| s.rolling_update.as_ref());
    let pct = IntOrString::String("25%".into());
    let surge = ru.and_then(|r| r.max_surge.clone()).unwrap_or_else(|| pct.clone());
    let unavailable = ru.and_then(|r| r.max_unavailable.clone()).unwrap_or(pct);
    let desired = replicas(d);
    let s = scaled_value(&surge, desired, true);
    let u = scaled_value(&unavailable, desired, false);
    if s == 0 && u == 0 {
        return (0, 1);
    }
    (s, u)
}

fn max_unavailable(d: &Deployment) -> i32 {
    let (_, u) = fenceposts(d);
    if is_recreate(d) || replicas(d) == 0 {
        return 0;
    }
    u.min(replicas(d))
}

// ---- ReplicaSet helpers ----

fn rs_replicas(rs: &ReplicaSet) -> i32 {
    rs.spec.replicas.unwrap_or(1)
}

fn rs_status(rs: &ReplicaSet) -> (i32, i32, i32) {
    let s = rs.status.clone().unwrap_or_default();
    (s.replicas, s.ready_replicas.unwrap_or(0), s.available_replicas.unwrap_or(0))
}

fn revision(rs: &ReplicaSet) -> i64 {
    annotation(&rs.metadata, REVISION).and_then(|v| v.parse().ok()).unwrap_or(0)
}

fn int_annotation(m: &ObjectMeta, key: &str) -> Option<i32> {
    annotation(m, key).and_then(|v| v.parse().ok())
}

fn set_annotation(m: &mut ObjectMeta, key: &str, value: String) -> bool {
    let a = m.annotations.get_or_insert_with(BTreeMap::new);
    if a.get(key) == Some(&value) {
        return false;
    }
    a.insert(key.to_string(), value);
    true
}

// ---- conditions ----

fn condition<'a>(s: &'a DeploymentStatus, type_: &str) -> Option<&'a DeploymentCondition> {
    s.conditions.as_ref()?.iter().find(|c| c.type_.as_deref() == Some(type_))
}

fn new_condition(type_: &str, status: &str, reason: &str, message: String, now: Timestamp) -> DeploymentCondition {
    DeploymentCondition {
        type_: Some(type_.into()),
        status: Some(status.into()),
        reason: Some(reason.into()),
        message: Some(message),
        last_update_time: Some(Time(now)),
        last_transition_time: Some(Time(now)),
    }
}

/// `SetDeploymentCondition`: no change for the same status and reason; the transition time kept for the same status.
fn set_condition(s: &mut DeploymentStatus, mut c: DeploymentCondition) {
    if let Some(cur) = condition(s, c.type_.as_deref().unwrap_or("")) {
        if cur.status == c.status && cur.reason == c.reason {
            return;
        }
        if cur.status == c.status {
            c.last_transition_time = cur.last_transition_time.clone();
        }
    }
    remove_condition(s, c.type_.as_deref().unwrap_or(""));
    s.conditions.get_or_insert_with(Vec::new).push(c);
}

fn remove_condition(s: &mut DeploymentStatus, type_: &str) {
    if let Some(cs) = s.conditions.as_mut() {
        cs.retain(|c| c.type_.as_deref() != Some(type_));
        if cs.is_empty() {
            s.conditions = None;
        }
    }
}

/// One sync of one Deployment: working copies of everything it may change, turned into actions at the end.
struct Sync {
    d: Deployment,
    orig_d: Deployment,
    now: Timestamp,
    /// Claimed ReplicaSets (working copies), oldest first; `created` ones are not in the store yet.
    rss: Vec<ReplicaSet>,
    orig: Vec<Option<ReplicaSet>>,
    /// Order in which ReplicaSets were first changed, for the order of updates.
    touched: Vec<usize>,
    why: BTreeMap<usize, String>,
    deletes: Vec<usize>,
    pre: Vec<Action>,
    requeue: Option<Duration>,
    /// Every ReplicaSet in the namespace, ours or not (a new one's name may be taken).
    existing: std::collections::HashSet<ObjectKey>,
}

impl Sync {
    fn touch(&mut self, i: usize, why: String) {
        if !self.touched.contains(&i) {
            self.touched.push(i);
        }
        self.why.entry(i).and_modify(|w| *w = format!("{w}; {why}")).or_insert(why);
    }

    fn is_new(&self, i: usize) -> bool {
        equal_ignore_hash(self.rss[i].spec.template.as_ref().unwrap_or(&Default::default()), &self.d.spec.template)
    }

    /// `FindNewReplicaSet`: the oldest ReplicaSet whose template is the Deployment's.
    fn new_rs(&self) -> Option<usize> {
        (0..self.rss.len()).find(|&i| self.is_new(i) && !self.deletes.contains(&i))
    }

    fn olds(&self, new: Option<usize>) -> Vec<usize> {
        (0..self.rss.len()).filter(|&i| Some(i) != new && !self.deletes.contains(&i)).collect()
    }

    fn active(&self, idx: &[usize]) -> Vec<usize> {
        idx.iter().copied().filter(|&i| rs_replicas(&self.rss[i]) > 0).collect()
    }

    fn sum_replicas(&self, idx: &[usize]) -> i32 {
        idx.iter().map(|&i| rs_replicas(&self.rss[i])).sum()
    }

    fn max_old_revision(&self, olds: &[usize]) -> i64 {
        olds.iter().map(|&i| revision(&self.rss[i])).max().unwrap_or(0)
    }

    /// `scaleReplicaSet`: size and the desired/max annotations.
    fn scale(&mut self, i: usize, size: i32) -> bool {
        let desired = replicas(&self.d);
        let (surge, _) = fenceposts(&self.d);
        let rs = &mut self.rss[i];
        let old = rs_replicas(rs);
        let mut changed = false;
        if old != size {
            rs.spec.replicas = Some(size);
            changed = true;
        }
        let a = set_annotation(&mut rs.metadata, DESIRED_REPLICAS, desired.to_string());
        let b = set_annotation(&mut rs.metadata, MAX_REPLICAS, (desired + surge).to_string());
        if changed || a || b {
            let why = if old != size { format!("scale {old} → {size}") } else { "replica annotations".to_string() };
            self.touch(i, why);
        }
        old != size
    }

    /// `SetNewReplicaSetAnnotations` for an existing or a to-be-created ReplicaSet.
    fn set_new_rs_annotations(&mut self, i: usize, new_revision: i64, exists: bool) -> bool {
        let d_annotations = self.d.metadata.annotations.clone().unwrap_or_default();
        let desired = replicas(&self.d);
        let (surge, _) = fenceposts(&self.d);
        let rs = &mut self.rss[i];
        let mut changed = false;
        for (k, v) in d_annotations.iter().filter(|(k, _)| !NOT_COPIED.contains(&k.as_str())) {
            changed |= set_annotation(&mut rs.metadata, k, v.clone());
        }
        let old_rev_text = annotation(&rs.metadata, REVISION).map(str::to_string);
        let old_rev: i64 = match &old_rev_text {
            Some(t) => match t.parse() {
                Ok(v) => v,
                Err(_) => return changed,
            },
            None => 0,
        };
        if old_rev < new_revision {
            set_annotation(&mut rs.metadata, REVISION, new_revision.to_string());
            changed = true;
            if let Some(old) = old_rev_text {
                // Rolled back to this ReplicaSet: remember the revisions it had.
                let history = annotation(&rs.metadata, REVISION_HISTORY).unwrap_or("").to_string();
                let mut list: Vec<String> = history.split(',').filter(|s| !s.is_empty()).map(str::to_string).collect();
                list.push(old);
                while list.join(",").len() > MAX_REV_HISTORY_CHARS && list.len() > 1 {
                    list.remove(0);
                }
                set_annotation(&mut rs.metadata, REVISION_HISTORY, list.join(","));
            }
        }
        if !exists {
            changed |= set_annotation(&mut rs.metadata, DESIRED_REPLICAS, desired.to_string());
            changed |= set_annotation(&mut rs.metadata, MAX_REPLICAS, (desired + surge).to_string());
        }
        if changed && exists {
            self.touch(i, format!("revision {new_revision}"));
        }
        changed
    }

    /// `getAllReplicaSetsAndSyncRevision`: the new ReplicaSet (created when asked and missing) and the old ones.
    fn all_and_sync_revision(&mut self, create: bool) -> (Option<usize>, Vec<usize>) {
        let new = self.new_rs();
        let olds = self.olds(new);
        let new_revision = self.max_old_revision(&olds) + 1;
        let progress_deadline = self.d.spec.progress_deadline_seconds.unwrap_or(600) > 0;
        match new {
            Some(i) => {
                let min_ready = self.d.spec.min_ready_seconds;
                self.set_new_rs_annotations(i, new_revision, true);
                if self.rss[i].spec.min_ready_seconds != min_ready {
                    self.rss[i].spec.min_ready_seconds = min_ready;
                    self.touch(i, "minReadySeconds".into());
                }
                let rev = annotation(&self.rss[i].metadata, REVISION).unwrap_or("").to_string();
                set_annotation(&mut self.d.metadata, REVISION, rev);
                let status = self.d.status.get_or_insert_with(Default::default);
                if progress_deadline && condition(status, PROGRESSING).is_none() {
                    let msg = format!("Found new replica set {:?}", name(&self.rss[i].metadata));
                    set_condition(status, new_condition(PROGRESSING, "True", "FoundNewReplicaSet", msg, self.now));
                }
                (Some(i), olds)
            }
            None if !create => (None, olds),
            None => match self.create_new_rs(&olds, new_revision, progress_deadline) {
                Some(i) => (Some(i), olds),
                None => (None, olds),
            },
        }
    }

    fn create_new_rs(&mut self, olds: &[usize], new_revision: i64, progress_deadline: bool) -> Option<usize> {
        let collision = self.d.status.as_ref().and_then(|s| s.collision_count);
        let hash = template_hash(&self.d.spec.template, collision);
        let mut template = self.d.spec.template.clone();
        let labels = template.metadata.get_or_insert_with(Default::default).labels.get_or_insert_with(BTreeMap::new);
        labels.insert(HASH_LABEL.into(), hash.clone());
        let labels = labels.clone();
        let mut selector: LabelSelector = self.d.spec.selector.clone();
        selector.match_labels.get_or_insert_with(BTreeMap::new).insert(HASH_LABEL.into(), hash.clone());
        let rs_name = format!("{}-{hash}", name(&self.d.metadata));
        let mut rs = ReplicaSet {
            metadata: ObjectMeta {
                name: Some(rs_name.clone()),
                namespace: Some(namespace(&self.d.metadata).to_string()),
                owner_references: Some(vec![controller_ref(Kind::Deployment, &self.d.metadata)]),
                labels: Some(labels),
                ..Default::default()
            },
            spec: ReplicaSetSpec {
                replicas: Some(0),
                min_ready_seconds: self.d.spec.min_ready_seconds,
                selector,
                template: Some(template),
            },
            status: None,
        };
        // A ReplicaSet of that name that is not ours, or holds another template: a hash collision. Count it and
        // try again with another hash next time (`collisionCount`).
        let key = ObjectKey::new(Some(namespace(&self.d.metadata)), &rs_name);
        if self.orig.iter().flatten().chain(self.rss.iter()).any(|r| crate::obj::key_of(&r.metadata) == key)
            || self.taken(&key)
        {
            let status = self.d.status.get_or_insert_with(Default::default);
            status.collision_count = Some(collision.unwrap_or(0) + 1);
            return None;
        }
        let mut all = olds.to_vec();
        self.rss.push(rs.clone());
        self.orig.push(None);
        let i = self.rss.len() - 1;
        all.push(i);
        let size = self.new_rs_replicas(&all, i);
        rs.spec.replicas = Some(size);
        self.rss[i].spec.replicas = Some(size);
        self.set_new_rs_annotations(i, new_revision, false);
        set_annotation(&mut self.d.metadata, REVISION, new_revision.to_string());
        if progress_deadline {
            let msg = format!("Created new replica set {rs_name:?}");
            let status = self.d.status.get_or_insert_with(Default::default);
            set_condition(status, new_condition(PROGRESSING, "True", "NewReplicaSetCreated", msg, self.now));
        }
        Some(i)
    }

    fn taken(&self, key: &ObjectKey) -> bool {
        self.existing.contains(key)
    }

    /// `NewRSNewReplicas`.
    fn new_rs_replicas(&self, all: &[usize], new: usize) -> i32 {
        let desired = replicas(&self.d);
        if is_recreate(&self.d) {
            return desired;
        }
        let (surge, _) = fenceposts(&self.d);
        let current = self.sum_replicas(all);
        let max_total = desired + surge;
        let new_size = rs_replicas(&self.rss[new]);
        if current >= max_total {
            return new_size;
        }
        let up = (max_total - current).min(desired - new_size);
        new_size + up
    }

    // ---- rolling update ----

    fn rollout_rolling(&mut self) {
        let (new, olds) = self.all_and_sync_revision(true);
        let mut all = olds.clone();
        all.extend(new);
        if let Some(n) = new {
            if self.reconcile_new_rs(&all, n) {
                return self.sync_rollout_status(&all, new);
            }
        }
        let active_olds = self.active(&olds);
        if self.reconcile_old_rss(&all, &active_olds, new) {
            return self.sync_rollout_status(&all, new);
        }
        if self.complete(&self.calculate_status(&all, new)) {
            self.cleanup(&olds);
        }
        self.sync_rollout_status(&all, new)
    }

    fn reconcile_new_rs(&mut self, all: &[usize], new: usize) -> bool {
        let desired = replicas(&self.d);
        let size = rs_replicas(&self.rss[new]);
        if size == desired {
            return false;
        }
        if size > desired {
            return self.scale(new, desired);
        }
        let target = self.new_rs_replicas(all, new);
        self.scale(new, target)
    }

    fn reconcile_old_rss(&mut self, all: &[usize], olds: &[usize], new: Option<usize>) -> bool {
        let old_pods = self.sum_replicas(olds);
        if old_pods == 0 {
            return false;
        }
        let all_pods = self.sum_replicas(all);
        let min_available = replicas(&self.d) - max_unavailable(&self.d);
        let new_unavailable = new.map(|n| rs_replicas(&self.rss[n]) - rs_status(&self.rss[n]).2).unwrap_or(0);
        let max_scaled_down = all_pods - min_available - new_unavailable;
        if max_scaled_down <= 0 {
            return false;
        }
        // Unhealthy replicas first: they are not available anyway.
        let mut olds = olds.to_vec();
        olds.sort_by(|&a, &b| by_creation(&self.rss[a].metadata, &self.rss[b].metadata));
        let mut cleaned = 0;
        for &i in &olds {
            if cleaned >= max_scaled_down {
                break;
            }
            let size = rs_replicas(&self.rss[i]);
            let available = rs_status(&self.rss[i]).2;
            if size == 0 || available == size {
                continue;
            }
            let down = (max_scaled_down - cleaned).min(size - available);
            self.scale(i, size - down);
            cleaned += down;
        }
        // Then healthy ones, as far as availability allows.
        let mut all_now: Vec<usize> = olds.clone();
        all_now.extend(new);
        let available: i32 = all_now.iter().map(|&i| rs_status(&self.rss[i]).2).sum();
        let mut scaled = 0;
        if available > min_available {
            let total = available - min_available;
            for &i in &olds {
                if scaled >= total {
                    break;
                }
                let size = rs_replicas(&self.rss[i]);
                if size == 0 {
                    continue;
                }
                let down = size.min(total - scaled);
                self.scale(i, size - down);
                scaled += down;
            }
        }
        cleaned + scaled > 0
    }

    // ---- recreate ----

    fn rollout_recreate(&mut self, cache: &Cache) {
        let (mut new, mut olds) = self.all_and_sync_revision(false);
        let mut all = olds.clone();
        all.extend(new);
        let active_olds = self.active(&olds);
        let mut scaled_down = false;
        for i in active_olds {
            scaled_down |= self.scale(i, 0);
        }
        if scaled_down {
            return self.sync_rollout_status(&all, new);
        }
        if self.old_pods_running(cache, &olds) {
            return self.sync_rollout_status(&all, new);
        }
        if new.is_none() {
            (new, olds) = self.all_and_sync_revision(true);
            all = olds.clone();
            all.extend(new);
        }
        if let Some(n) = new {
            self.scale(n, replicas(&self.d));
        }
        if self.complete(&self.calculate_status(&all, new)) {
            self.cleanup(&olds);
        }
        self.sync_rollout_status(&all, new)
    }

    /// Pods of old ReplicaSets that have not finished (Recreate waits for them to be gone).
    fn old_pods_running(&self, cache: &Cache, olds: &[usize]) -> bool {
        if olds.iter().any(|&i| rs_status(&self.rss[i]).0 > 0) {
            return true;
        }
        let uids: Vec<&str> = olds.iter().map(|&i| uid(&self.rss[i].metadata)).collect();
        cache
            .pods
            .in_namespace(namespace(&self.d.metadata))
            .iter()
            .any(|p| !pod::is_terminal(p) && controller_of(&p.metadata).is_some_and(|r| uids.contains(&r.uid.as_str())))
    }

    // ---- scaling ----

    /// `isScalingEvent`: an active ReplicaSet was sized for another replica count.
    fn is_scaling_event(&mut self) -> bool {
        let (new, olds) = self.all_and_sync_revision(false);
        let mut all = olds;
        all.extend(new);
        let desired = replicas(&self.d);
        self.active(&all)
            .iter()
            .any(|&i| int_annotation(&self.rss[i].metadata, DESIRED_REPLICAS).is_some_and(|v| v != desired))
    }

    /// `sync`: scale only (paused deployments and scaling events), then status.
    fn sync_scale(&mut self) {
        let (new, olds) = self.all_and_sync_revision(false);
        self.scale_all(new, &olds);
        if self.d.spec.paused == Some(true) {
            self.cleanup(&olds);
        }
        let mut all = olds;
        all.extend(new);
        self.sync_status(&all, new);
    }

    /// `scale`: one active ReplicaSet takes the whole count; a saturated new one lets the old go; otherwise the
    /// change is spread over the active ReplicaSets in proportion to their size.
    fn scale_all(&mut self, new: Option<usize>, olds: &[usize]) {
        let desired = replicas(&self.d);
        let mut all = olds.to_vec();
        all.extend(new);
        let active = self.active(&all);
        let target = match active.len() {
            0 => new.or_else(|| {
                let mut o = olds.to_vec();
                o.sort_by(|&a, &b| by_creation(&self.rss[b].metadata, &self.rss[a].metadata));
                o.first().copied()
            }),
            1 => Some(active[0]),
            _ => None,
        };
        if active.len() <= 1 {
            if let Some(i) = target {
                if rs_replicas(&self.rss[i]) != desired {
                    self.scale(i, desired);
                }
            }
            return;
        }
        if let Some(n) = new {
            let rs = &self.rss[n];
            let saturated = rs_replicas(rs) == desired
                && int_annotation(&rs.metadata, DESIRED_REPLICAS) == Some(desired)
                && rs_status(rs).2 == desired;
            if saturated {
                for i in self.active(olds) {
                    self.scale(i, 0);
                }
                return;
            }
        }
        if is_recreate(&self.d) {
            return;
        }
        let (surge, _) = fenceposts(&self.d);
        let total = self.sum_replicas(&active);
        let allowed = if desired > 0 { desired + surge } else { 0 };
        let to_add = allowed - total;
        let mut order = active.clone();
        // Larger first; newer first when scaling up, older first when scaling down.
        order.sort_by(|&a, &b| {
            let (ra, rb) = (&self.rss[a], &self.rss[b]);
            rs_replicas(rb).cmp(&rs_replicas(ra)).then_with(|| {
                if to_add > 0 {
                    by_creation(&rb.metadata, &ra.metadata)
                } else {
                    by_creation(&ra.metadata, &rb.metadata)
                }
            })
        });
        let status_replicas = self.d.status.as_ref().and_then(|s| s.replicas).unwrap_or(0);
        let mut added = 0;
        let mut sizes: Vec<(usize, i32)> = Vec::new();
        for &i in &order {
            let size = rs_replicas(&self.rss[i]);
            if to_add == 0 {
                sizes.push((i, size));
                continue;
            }
            let proportion = if size == 0 || to_add == added {
                0
            } else {
                let fraction = if desired == 0 {
                    -size
                } else {
                    let annotated = int_annotation(&self.rss[i].metadata, MAX_REPLICAS).unwrap_or(status_replicas);
                    let x = (size as f64 * (desired + surge) as f64) / annotated.max(1) as f64;
                    x.round() as i32 - size
                };
                let allowed = to_add - added;
                if to_add > 0 {
                    fraction.min(allowed)
                } else {
                    fraction.max(allowed)
                }
            };
            sizes.push((i, size + proportion));
            added += proportion;
        }
        for (n, (i, size)) in sizes.into_iter().enumerate() {
            let size = if n == 0 && to_add != 0 { (size + to_add - added).max(0) } else { size };
            self.scale(i, size);
        }
    }

    // ---- history ----

    /// `cleanupDeployment`: the oldest scaled-down ReplicaSets beyond revisionHistoryLimit are deleted.
    fn cleanup(&mut self, olds: &[usize]) {
        let limit = self.d.spec.revision_history_limit.unwrap_or(10).max(0) as usize;
        let mut cleanable: Vec<usize> = olds.iter().copied().filter(|&i| !is_deleting(&self.rss[i].metadata)).collect();
        if cleanable.len() <= limit {
            return;
        }
        let diff = cleanable.len() - limit;
        cleanable.sort_by(|&a, &b| {
            revision(&self.rss[a])
                .cmp(&revision(&self.rss[b]))
                .then_with(|| by_creation(&self.rss[a].metadata, &self.rss[b].metadata))
        });
        for &i in cleanable.iter().take(diff) {
            let rs = &self.rss[i];
            let observed = rs.status.as_ref().and_then(|s| s.observed_generation).unwrap_or(0);
            if rs_status(rs).0 != 0 || rs_replicas(rs) != 0 || rs.metadata.generation.unwrap_or(0) > observed {
                continue;
            }
            if self.orig[i].is_some() {
                self.deletes.push(i);
            }
        }
    }

    // ---- status ----

    fn calculate_status(&self, all: &[usize], new: Option<usize>) -> DeploymentStatus {
        let available: i32 = all.iter().map(|&i| rs_status(&self.rss[i]).2).sum();
        let total = self.sum_replicas(all);
        let old = self.d.status.clone().unwrap_or_default();
        let mut s = DeploymentStatus {
            observed_generation: self.d.metadata.generation,
            replicas: nz(all.iter().map(|&i| rs_status(&self.rss[i]).0).sum()),
            updated_replicas: nz(new.map(|n| rs_status(&self.rss[n]).0).unwrap_or(0)),
            ready_replicas: nz(all.iter().map(|&i| rs_status(&self.rss[i]).1).sum()),
            available_replicas: nz(available),
            unavailable_replicas: nz((total - available).max(0)),
            collision_count: old.collision_count,
            conditions: old.conditions.clone(),
            terminating_replicas: old.terminating_replicas,
        };
        if available >= replicas(&self.d) - max_unavailable(&self.d) {
            let c = new_condition(
                AVAILABLE,
                "True",
                "MinimumReplicasAvailable",
                "Deployment has minimum availability.".into(),
                self.now,
            );
            set_condition(&mut s, c);
        } else {
            let c = new_condition(
                AVAILABLE,
                "False",
                "MinimumReplicasUnavailable",
                "Deployment does not have minimum availability.".into(),
                self.now,
            );
            set_condition(&mut s, c);
        }
        s
    }

    /// `DeploymentComplete`.
    fn complete(&self, s: &DeploymentStatus) -> bool {
        let r = replicas(&self.d);
        s.updated_replicas.unwrap_or(0) == r
            && s.replicas.unwrap_or(0) == r
            && s.available_replicas.unwrap_or(0) == r
            && s.observed_generation.unwrap_or(0) >= self.d.metadata.generation.unwrap_or(0)
    }

    fn sync_status(&mut self, all: &[usize], new: Option<usize>) {
        let s = self.calculate_status(all, new);
        self.d.status = Some(s);
    }

    /// `syncRolloutStatus`: status plus the Progressing condition (complete, progressing, or timed out).
    fn sync_rollout_status(&mut self, all: &[usize], new: Option<usize>) {
        let mut s = self.calculate_status(all, new);
        let deadline = self.d.spec.progress_deadline_seconds.unwrap_or(600);
        if deadline <= 0 {
            remove_condition(&mut s, PROGRESSING);
        }
        let before = self.d.status.clone().unwrap_or_default();
        let current = condition(&before, PROGRESSING).cloned();
        let complete_already = s.replicas == s.updated_replicas
            && current.as_ref().is_some_and(|c| c.reason.as_deref() == Some("NewReplicaSetAvailable"));
        let new_name = new.map(|n| name(&self.rss[n].metadata).to_string()).unwrap_or_default();
        if deadline > 0 && !complete_already {
            if self.complete(&s) {
                let msg = format!("ReplicaSet {new_name:?} has successfully progressed.");
                set_condition(&mut s, new_condition(PROGRESSING, "True", "NewReplicaSetAvailable", msg, self.now));
            } else if progressing(&before, &s) {
                let msg = format!("ReplicaSet {new_name:?} is progressing.");
                let mut c = new_condition(PROGRESSING, "True", "ReplicaSetUpdated", msg, self.now);
                if let Some(cur) = &current {
                    if cur.status.as_deref() == Some("True") {
                        c.last_transition_time = cur.last_transition_time.clone();
                    }
                    remove_condition(&mut s, PROGRESSING);
                }
                set_condition(&mut s, c);
            } else if let Some(left) = self.time_left(&s, deadline) {
                if left <= SignedDuration::ZERO {
                    let msg = format!("ReplicaSet {new_name:?} has timed out progressing.");
                    set_condition(
                        &mut s,
                        new_condition(PROGRESSING, "False", "ProgressDeadlineExceeded", msg, self.now),
                    );
                } else {
                    // Nothing else will wake us when the deadline passes.
                    let secs = left.as_secs().max(1) as u64;
                    self.requeue = Some(Duration::from_secs(secs + 1));
                }
            }
        }
        self.d.status = Some(s);
    }

    /// Time until the Progressing condition's last update plus the deadline, None if it cannot time out.
    fn time_left(&self, s: &DeploymentStatus, deadline: i32) -> Option<SignedDuration> {
        let c = condition(s, PROGRESSING)?;
        match c.reason.as_deref() {
            Some("NewReplicaSetAvailable") | Some("ProgressDeadlineExceeded") => None,
            _ => {
                let from = c.last_update_time.as_ref()?.0;
                Some((from + SignedDuration::from_secs(deadline as i64)).duration_since(self.now))
            }
        }
    }

    /// `checkPausedConditions`.
    fn check_paused(&mut self) {
        if self.d.spec.progress_deadline_seconds.unwrap_or(600) <= 0 {
            return;
        }
        let paused = self.d.spec.paused == Some(true);
        let now = self.now;
        let s = self.d.status.get_or_insert_with(Default::default);
        let cond = condition(s, PROGRESSING);
        if cond.is_some_and(|c| c.reason.as_deref() == Some("ProgressDeadlineExceeded")) {
            return;
        }
        let paused_cond = cond.is_some_and(|c| c.reason.as_deref() == Some("DeploymentPaused"));
        if paused && !paused_cond {
            set_condition(
                s,
                new_condition(PROGRESSING, "Unknown", "DeploymentPaused", "Deployment is paused".into(), now),
            );
        } else if !paused && paused_cond {
            set_condition(
                s,
                new_condition(PROGRESSING, "Unknown", "DeploymentResumed", "Deployment is resumed".into(), now),
            );
        }
    }

    /// The actions, in the order that keeps a half-applied sync harmless: ownership, the new ReplicaSet, sizes and
    /// annotations, history deletions, then the Deployment itself.
    fn actions(mut self) -> Outcome {
        let mut out = Outcome::default();
        out.actions.append(&mut self.pre);
        for (i, orig) in self.orig.iter().enumerate() {
            if orig.is_none() {
                out.actions.push(Action::Create(Obj::ReplicaSet(self.rss[i].clone())));
            }
        }
        for &i in &self.touched {
            if self.orig[i].is_some() && self.orig[i].as_ref() != Some(&self.rss[i]) {
                let why = self.why.get(&i).cloned().unwrap_or_default();
                out.actions.push(Action::update(Obj::ReplicaSet(self.rss[i].clone()), why));
            }
        }
        for &i in &self.deletes {
            let m = &self.rss[i].metadata;
            out.actions.push(Action::delete(
                Kind::ReplicaSet,
                crate::obj::key_of(m),
                uid(m),
                format!("beyond revisionHistoryLimit of Deployment {}", name(&self.d.metadata)),
            ));
        }
        if self.d != self.orig_d {
            let s = self.d.status.clone().unwrap_or_default();
            let why = format!(
                "status: {} replicas, {} updated, {} ready, {} available",
                s.replicas.unwrap_or(0),
                s.updated_replicas.unwrap_or(0),
                s.ready_replicas.unwrap_or(0),
                s.available_replicas.unwrap_or(0)
            );
            out.actions.push(Action::update(Obj::Deployment(self.d.clone()), why));
        }
        out.requeue_after = self.requeue;
        out
    }
}

/// `DeploymentProgressing`: more updated, fewer old, more ready or more available replicas than before.
fn progressing(old: &DeploymentStatus, new: &DeploymentStatus) -> bool {
    let g = |v: Option<i32>| v.unwrap_or(0);
    let old_old = g(old.replicas) - g(old.updated_replicas);
    let new_old = g(new.replicas) - g(new.updated_replicas);
    g(new.updated_replicas) > g(old.updated_replicas)
        || new_old < old_old
        || g(new.ready_replicas) > g(old.ready_replicas)
        || g(new.available_replicas) > g(old.available_replicas)
}

pub fn reconcile(key: &ObjectKey, cache: &Cache, now: Timestamp) -> Outcome {
    let Some(d) = cache.deployments.get(key) else { return Outcome::default() };
    let d = (*d).clone();
    let everything = d.spec.selector == LabelSelector::default();
    let selector = match Selector::from_label_selector(Some(&d.spec.selector)) {
        Ok(s) if !everything => s,
        Ok(_) | Err(_) => {
            // Kubernetes refuses to act on a selector that selects everything (or nothing valid).
            tracing::warn!(deployment = %key, "selector is empty or invalid; not managing ReplicaSets");
            let mut new = d.clone();
            let s = new.status.get_or_insert_with(Default::default);
            if s.observed_generation < d.metadata.generation {
                s.observed_generation = d.metadata.generation;
                return Outcome::new(vec![Action::update(Obj::Deployment(new), "observedGeneration")]);
            }
            return Outcome::default();
        }
    };
    let mut sync = Sync {
        orig_d: d.clone(),
        d,
        now,
        rss: Vec::new(),
        orig: Vec::new(),
        touched: Vec::new(),
        why: BTreeMap::new(),
        deletes: Vec::new(),
        pre: Vec::new(),
        requeue: None,
        existing: Default::default(),
    };
    // Claim ReplicaSets (`getReplicaSetsForDeployment`).
    let mut rss = cache.replicasets.in_namespace(namespace(&sync.d.metadata));
    rss.sort_by(|a, b| by_creation(&a.metadata, &b.metadata));
    sync.existing = rss.iter().map(|r| crate::obj::key_of(&r.metadata)).collect();
    for rs in rss {
        match claim::claim(&sync.d.metadata, &selector, &rs.metadata) {
            Claim::Owned => {}
            Claim::Adopt => {
                let mut new = (*rs).clone();
                claim::adopt(&mut new.metadata, controller_ref(Kind::Deployment, &sync.d.metadata));
                sync.pre.push(Action::update(
                    Obj::ReplicaSet(new),
                    format!("adopted by Deployment {}", name(&sync.d.metadata)),
                ));
            }
            Claim::Release => {
                let mut new = (*rs).clone();
                claim::release(&mut new.metadata, uid(&sync.d.metadata));
                sync.pre.push(Action::update(
                    Obj::ReplicaSet(new),
                    format!("released by Deployment {}", name(&sync.d.metadata)),
                ));
                continue;
            }
            Claim::Ignore => continue,
        }
        sync.rss.push((*rs).clone());
        sync.orig.push(Some((*rs).clone()));
    }
    if !sync.pre.is_empty() {
        // Ownership first; the ReplicaSet events it causes bring the next sync.
        return sync.actions();
    }
    if is_deleting(&sync.d.metadata) {
        let (new, olds) = sync.all_and_sync_revision(false);
        let mut all = olds;
        all.extend(new);
        sync.sync_status(&all, new);
        return sync.actions();
    }
    sync.check_paused();
    if sync.d.spec.paused == Some(true) || sync.is_scaling_event() {
        sync.sync_scale();
        return sync.actions();
    }
    if is_recreate(&sync.d) {
        sync.rollout_recreate(cache);
    } else {
        sync.rollout_rolling();
    }
    sync.actions()
}

#[cfg(test)]
mod tests;
