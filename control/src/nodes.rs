//! Node lifecycle: placeholder.
use std::time::Duration;

pub const LEASE_NAMESPACE: &str = "kube-node-lease";

#[derive(Debug, Clone)]
pub struct Config {
    pub grace_period: Duration,
    pub eviction_timeout: Duration,
    pub monitor_period: Duration,
}
