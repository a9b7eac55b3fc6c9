//! What a reconcile decides, as data: create, update (compare-and-swap at the resourceVersion the decision was
//! made on) or delete an object. The runtime applies actions in order; reconciles never write themselves.

use std::fmt;
use std::time::Duration;

use weft_api::ObjectKey;

use crate::obj::{Kind, Obj};

/// One object, as the decision saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub kind: Kind,
    pub key: ObjectKey,
    /// Deleted only while the stored object still has this uid (a recreated object of the same name is left alone).
    pub uid: String,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind, self.key)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Create the object; a `metadata.generateName` without a name gets 5 random characters, as the API server does.
    Create(Obj),
    /// Write the object if the store still holds the resourceVersion it carries (else: conflict, reconcile again).
    Update { obj: Obj, why: String },
    /// Delete the object if it still has `target.uid`, and only if the store (not the cache) confirms that every one
    /// of `owners_gone` is absent: the garbage collector's check against a cache that may lag.
    Delete { target: Target, why: String, owners_gone: Vec<Target> },
}

impl Action {
    pub fn update(obj: Obj, why: impl Into<String>) -> Action {
        Action::Update { obj, why: why.into() }
    }

    pub fn delete(kind: Kind, key: ObjectKey, uid: &str, why: impl Into<String>) -> Action {
        Action::Delete { target: Target { kind, key, uid: uid.to_string() }, why: why.into(), owners_gone: Vec::new() }
    }

    pub fn kind(&self) -> Kind {
        match self {
            Action::Create(o) | Action::Update { obj: o, .. } => o.kind(),
            Action::Delete { target, .. } => target.kind,
        }
    }

    pub fn verb(&self) -> &'static str {
        match self {
            Action::Create(_) => "create",
            Action::Update { .. } => "update",
            Action::Delete { .. } => "delete",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Create(o) => {
                let m = o.metadata();
                let ns = m.namespace.as_deref().map(|n| format!("{n}/")).unwrap_or_default();
                let name = m.name.clone().or_else(|| m.generate_name.clone()).unwrap_or_default();
                write!(f, "create {} {ns}{name}", o.kind())
            }
            Action::Update { obj, why } => write!(f, "update {} {} ({why})", obj.kind(), obj.key()),
            Action::Delete { target, why, .. } => write!(f, "delete {target} ({why})"),
        }
    }
}

/// A reconcile's result: actions to apply in order, and when to look again even if nothing changes.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Outcome {
    pub actions: Vec<Action>,
    pub requeue_after: Option<Duration>,
}

impl Outcome {
    pub fn new(actions: Vec<Action>) -> Outcome {
        Outcome { actions, requeue_after: None }
    }

    pub fn requeue(mut self, after: Duration) -> Outcome {
        self.requeue_after = Some(self.requeue_after.map_or(after, |d| d.min(after)));
        self
    }

    /// Every action rendered on one line each (what tests compare and logs print).
    pub fn lines(&self) -> Vec<String> {
        self.actions.iter().map(ToString::to_string).collect()
    }
}
