//! `weft controller`: kube-controller-manager's (and kube-scheduler's) flags, resolved into `run::Options`.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::events::Ctl;
use crate::run::Options;
use crate::{leader, nodes};

/// `weft controller`: the scheduler and the controllers that turn Deployments, ReplicaSets, DaemonSets and
/// Services into Pods on nodes and Endpoints.
#[derive(Debug, Clone, clap::Args)]
pub struct ControllerArgs {
    #[command(flatten)]
    pub etcd: weft_api::EtcdArgs,
    /// elect a leader through an etcd lease so that only one of several `weft controller`s acts
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub leader_elect: bool,
    /// how long a leader's lease lasts without renewal (the etcd lease TTL)
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    pub leader_elect_lease_duration: Duration,
    /// a leader that could not renew for this long stops acting (must be shorter than the lease duration)
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub leader_elect_renew_deadline: Duration,
    /// how often to renew, and how often a candidate tries to acquire
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub leader_elect_retry_period: Duration,
    /// the Lease object leaders hold
    #[arg(long, default_value = "weft-controller")]
    pub leader_elect_resource_name: String,
    /// the namespace of that Lease
    #[arg(long, default_value = "kube-system")]
    pub leader_elect_resource_namespace: String,
    /// a node whose heartbeat (its Lease in kube-node-lease) is older than this is marked Unknown
    #[arg(long, default_value = "40s", value_parser = parse_duration)]
    pub node_monitor_grace_period: Duration,
    /// DEPRECATED, accepted and ignored (as in Kubernetes with taint-based eviction): pods leave a failed node
    /// when their NoExecute toleration's tolerationSeconds run out (300 s by default, added at pod creation)
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    pub pod_eviction_timeout: Duration,
    /// nodes per second that may get a NoExecute taint (node.kubernetes.io/unreachable or not-ready) and so lose
    /// their pods; 0 taints none
    #[arg(long, default_value_t = 0.1, value_parser = parse_rate)]
    pub node_eviction_rate: f64,
    /// how often node health is checked
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub node_monitor_period: Duration,
    /// controllers to run: `*` for all, a name to add, `-name` to leave out (replicaset, replicationcontroller,
    /// deployment, daemonset, endpoint, scheduler, nodelifecycle, garbagecollector)
    #[arg(long, default_value = "*", value_delimiter = ',')]
    pub controllers: Vec<String>,
    /// address of /healthz ("" to disable)
    #[arg(long, default_value = "127.0.0.1:10257")]
    pub healthz_bind_address: String,
    /// address of /metrics ("" to disable; the same address as /healthz serves both)
    #[arg(long, default_value = "127.0.0.1:10257")]
    pub metrics_bind_address: String,
    /// keys reconciled at once
    #[arg(long, default_value_t = 8)]
    pub workers: usize,
    /// every object is reconciled at least this often
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub resync_period: Duration,
}

/// Go-style durations: the one parser in weft-api.
pub use weft_api::duration::parse as parse_duration;

/// A finite, non-negative rate (`--node-eviction-rate`).
fn parse_rate(v: &str) -> Result<f64, String> {
    match v.trim().parse::<f64>() {
        Ok(r) if r.is_finite() && r >= 0.0 => Ok(r),
        _ => Err(format!("{v:?} is not a non-negative number")),
    }
}

fn addr(flag: &str, v: &str) -> Result<Option<SocketAddr>> {
    if v.is_empty() {
        return Ok(None);
    }
    Ok(Some(v.parse().with_context(|| format!("--{flag} {v:?} is not host:port"))?))
}

/// `*`, `name`, `-name` as kube-controller-manager's `--controllers` reads them.
pub fn enabled_controllers(list: &[String]) -> Result<HashSet<Ctl>> {
    let mut on = HashSet::new();
    let mut off = HashSet::new();
    for item in list.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
        if item == "*" {
            on.extend(Ctl::ALL);
        } else if let Some(name) = item.strip_prefix('-') {
            off.insert(Ctl::parse(name).with_context(|| format!("--controllers: unknown controller {name:?}"))?);
        } else {
            on.insert(Ctl::parse(item).with_context(|| format!("--controllers: unknown controller {item:?}"))?);
        }
    }
    Ok(on.difference(&off).copied().collect())
}

fn identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default();
    format!("{host}_{}", weft_api::store::new_uid())
}

impl ControllerArgs {
    pub fn options(&self) -> Result<Options> {
        if self.leader_elect && self.leader_elect_renew_deadline >= self.leader_elect_lease_duration {
            bail!("--leader-elect-renew-deadline must be shorter than --leader-elect-lease-duration");
        }
        if self.leader_elect && self.leader_elect_retry_period >= self.leader_elect_renew_deadline {
            bail!("--leader-elect-retry-period must be shorter than --leader-elect-renew-deadline");
        }
        let leader = self.leader_elect.then(|| leader::Config {
            namespace: self.leader_elect_resource_namespace.clone(),
            name: self.leader_elect_resource_name.clone(),
            identity: identity(),
            lease_duration: self.leader_elect_lease_duration,
            renew_deadline: self.leader_elect_renew_deadline,
            retry_period: self.leader_elect_retry_period,
        });
        Ok(Options {
            etcd: self.etcd.clone(),
            leader,
            controllers: enabled_controllers(&self.controllers)?,
            nodes: nodes::Config {
                grace_period: self.node_monitor_grace_period,
                eviction_timeout: self.pod_eviction_timeout,
                eviction_rate: self.node_eviction_rate,
                monitor_period: self.node_monitor_period.max(Duration::from_millis(100)),
            },
            healthz_addr: addr("healthz-bind-address", &self.healthz_bind_address)?,
            metrics_addr: addr("metrics-bind-address", &self.metrics_bind_address)?,
            workers: self.workers.max(1),
            resync: self.resync_period.max(Duration::from_secs(1)),
            write_concurrency: 64,
        })
    }
}

/// `weft controller`.
pub async fn run(args: ControllerArgs) -> Result<()> {
    let opts = args.options()?;
    crate::run::run(opts).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_eviction_rate_takes_finite_non_negative_numbers_only() {
        for (v, ok) in
            [("0.1", true), ("0", true), ("3", true), ("-1", false), ("NaN", false), ("inf", false), ("x", false)]
        {
            assert_eq!(parse_rate(v).is_ok(), ok, "{v}");
        }
    }

    #[test]
    fn controllers_flag() {
        let all = enabled_controllers(&["*".into()]).unwrap();
        assert_eq!(all.len(), Ctl::ALL.len());
        let some = enabled_controllers(&["*".into(), "-nodelifecycle".into(), "-garbagecollector".into()]).unwrap();
        assert!(!some.contains(&Ctl::NodeLifecycle) && some.contains(&Ctl::Scheduler));
        assert_eq!(enabled_controllers(&["scheduler".into()]).unwrap(), HashSet::from([Ctl::Scheduler]));
        assert!(enabled_controllers(&["nope".into()]).is_err());
    }
}
