//! Builders for the unit tests' tables: objects from JSON with the few fields a rule looks at.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use crate::action::{Action, Outcome};
use crate::obj::{Kind, Obj};

/// The tests' "now".
pub fn now() -> Timestamp {
    ts("2024-05-01T12:00:00Z")
}

pub fn ts(s: &str) -> Timestamp {
    s.parse().unwrap()
}

/// `now` minus `secs` seconds, as RFC 3339.
pub fn ago(secs: i64) -> String {
    (now() - k8s_openapi::jiff::SignedDuration::from_secs(secs)).to_string()
}

pub fn from<T: DeserializeOwned>(v: Value) -> T {
    serde_json::from_value(v).unwrap()
}

/// Merges `patch` into `base` (objects recursively; anything else replaces).
pub fn merge(base: &mut Value, patch: Value) {
    match (base, patch) {
        (Value::Object(b), Value::Object(p)) => {
            for (k, v) in p {
                merge(b.entry(k).or_insert(Value::Null), v);
            }
        }
        (b, p) => *b = p,
    }
}

pub fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// A pod builder: `pod("a").labels(..).owner(..).node("n1").running().ready(60)`.
#[derive(Clone)]
pub struct PodB(pub Value);

pub fn pod(name: &str) -> PodB {
    PodB(json!({
        "metadata": {"name": name, "namespace": "default", "uid": format!("uid-{name}"), "resourceVersion": "1",
                     "creationTimestamp": ago(3600)},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]},
        "status": {"phase": "Pending"}
    }))
}

impl PodB {
    pub fn with(mut self, patch: Value) -> Self {
        merge(&mut self.0, patch);
        self
    }
    pub fn labels(self, pairs: &[(&str, &str)]) -> Self {
        self.with(json!({"metadata": {"labels": labels(pairs)}}))
    }
    pub fn owner(self, kind: Kind, name: &str) -> Self {
        let r = json!([{"apiVersion": kind.api_version(), "kind": kind.name(), "name": name,
                        "uid": format!("uid-{name}"), "controller": true, "blockOwnerDeletion": true}]);
        self.with(json!({"metadata": {"ownerReferences": r}}))
    }
    pub fn node(self, n: &str) -> Self {
        self.with(json!({"spec": {"nodeName": n}}))
    }
    pub fn phase(self, p: &str) -> Self {
        self.with(json!({"status": {"phase": p}}))
    }
    pub fn running(self) -> Self {
        self.phase("Running")
    }
    /// Running and Ready for `secs` seconds.
    pub fn ready(self, secs: i64) -> Self {
        self.running().with(json!({"status": {"conditions": [
            {"type": "Ready", "status": "True", "lastTransitionTime": ago(secs)}]}}))
    }
    pub fn not_ready(self) -> Self {
        self.with(
            json!({"status": {"conditions": [{"type": "Ready", "status": "False", "lastTransitionTime": ago(60)}]}}),
        )
    }
    pub fn created(self, secs_ago: i64) -> Self {
        self.with(json!({"metadata": {"creationTimestamp": ago(secs_ago)}}))
    }
    pub fn ip(self, ip: &str) -> Self {
        self.with(json!({"status": {"podIP": ip}}))
    }
    pub fn deleting(self) -> Self {
        self.with(json!({"metadata": {"deletionTimestamp": ago(1)}}))
    }
    pub fn restarts(self, n: i32) -> Self {
        self.with(json!({"status": {"containerStatuses": [{"name": "c", "image": "busybox", "imageID": "",
            "ready": true, "restartCount": n}]}}))
    }
    pub fn requests(self, cpu: &str, mem: &str) -> Self {
        self.with(json!({"spec": {"containers": [{"name": "c", "image": "busybox",
            "resources": {"requests": {"cpu": cpu, "memory": mem}}}]}}))
    }
    pub fn build(self) -> Pod {
        from(self.0)
    }
}

impl From<PodB> for Obj {
    fn from(p: PodB) -> Obj {
        Obj::Pod(p.build())
    }
}

/// The pods an outcome creates.
pub fn created_pods(o: &Outcome) -> Vec<Pod> {
    o.actions
        .iter()
        .filter_map(|a| match a {
            Action::Create(Obj::Pod(p)) => Some(p.clone()),
            _ => None,
        })
        .collect()
}

/// The objects an outcome updates, as JSON (so tests can pick any field).
pub fn updates(o: &Outcome) -> Vec<Value> {
    o.actions
        .iter()
        .filter_map(|a| match a {
            Action::Update { obj, .. } => Some(weft_api::with_object!(obj, x => serde_json::to_value(x).unwrap())),
            _ => None,
        })
        .collect()
}

/// The names an outcome deletes, in order.
pub fn deleted(o: &Outcome) -> Vec<String> {
    o.actions
        .iter()
        .filter_map(|a| match a {
            Action::Delete { target, .. } => Some(target.key.name.clone()),
            _ => None,
        })
        .collect()
}
