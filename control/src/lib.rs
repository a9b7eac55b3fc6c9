//! weft's controllers (`weft controller`): each is a pure reconcile from an object and the informer cache to
//! actions (`action`), table-tested; `run` is the runtime around them — informers, a work queue, optimistic
//! concurrency, leader election. Everything they touch is in etcd under `/registry/`.

pub mod action;
pub mod cache;
pub mod claim;
pub mod cli;
pub mod daemonset;
pub mod deployment;
pub mod endpoints;
pub mod events;
pub mod gc;
pub mod kubelet;
pub mod leader;
pub mod nodes;
pub mod obj;
pub mod pod;
pub mod quantity;
pub mod queue;
pub mod replicaset;
pub mod run;
pub mod scheduler;

#[cfg(test)]
mod testutil;

pub use action::{Action, Outcome};
pub use cache::Cache;
pub use obj::{Kind, Obj};
