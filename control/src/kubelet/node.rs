//! The kubelet's Node: the object it registers (addresses, capacity from the host, podCIDR from the overlay's
//! subnet file, Ready condition, nodeInfo), its status kept current, and its `kube-node-lease` Lease renewed.
//! Writes only its own Node and Lease.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{
    DaemonEndpoint, Node, NodeAddress, NodeCondition, NodeDaemonEndpoints, NodeSpec, NodeStatus, NodeSystemInfo,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use weft_api::Store;

/// What the host and runtime look like now: the inputs of the Node's status.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostFacts {
    pub node_name: String,
    pub node_ip: String,
    pub pod_cidr: Option<String>,
    pub cpus: u32,
    pub memory_kib: u64,
    pub max_pods: u32,
    pub kernel: String,
    pub os_image: String,
    pub machine_id: String,
    pub boot_id: String,
    /// e.g. `containerd://1.6.20~ds1`; None while the runtime does not answer.
    pub runtime_version: Option<String>,
    pub kubelet_port: i32,
}

fn read_trim(p: &str) -> String {
    std::fs::read_to_string(p).map(|s| s.trim().to_string()).unwrap_or_default()
}

/// The node's name: the override, else the host name.
pub fn node_name(override_: Option<&str>) -> String {
    override_
        .filter(|s| !s.is_empty())
        .map(str::to_lowercase)
        .unwrap_or_else(|| read_trim("/proc/sys/kernel/hostname").to_lowercase())
}

/// `FLANNEL_SUBNET=10.244.3.1/24` → `10.244.3.0/24` (the node's pod CIDR).
pub fn pod_cidr_from_subnet_env(text: &str) -> Option<String> {
    let v = text.lines().find_map(|l| l.trim().strip_prefix("FLANNEL_SUBNET="))?;
    let net: ipnetwork::IpNetwork = v.trim().parse().ok()?;
    let base = ipnetwork::IpNetwork::new(net.network(), net.prefix()).ok()?;
    Some(base.to_string())
}

/// Reads what the host says about itself.
pub fn host_facts(node_name: &str, node_ip: &str, pod_cidr: Option<String>, subnet_file: &Path) -> HostFacts {
    let pod_cidr =
        pod_cidr.or_else(|| std::fs::read_to_string(subnet_file).ok().and_then(|t| pod_cidr_from_subnet_env(&t)));
    let os = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    let os_image = os
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim_matches('"').to_string())
        .unwrap_or_else(|| "Linux".into());
    HostFacts {
        node_name: node_name.to_string(),
        node_ip: node_ip.to_string(),
        pod_cidr,
        cpus: std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1),
        memory_kib: (super::config::node_memory_bytes() / 1024) as u64,
        max_pods: 110,
        kernel: read_trim("/proc/sys/kernel/osrelease"),
        os_image,
        machine_id: read_trim("/etc/machine-id"),
        boot_id: read_trim("/proc/sys/kernel/random/boot_id"),
        runtime_version: None,
        kubelet_port: 10250,
    }
}

fn condition(
    type_: &str,
    ok: bool,
    reason: &str,
    message: &str,
    prev: Option<&NodeStatus>,
    now: Timestamp,
) -> NodeCondition {
    let status = if ok { "True" } else { "False" };
    let old = prev.and_then(|p| p.conditions.as_ref()).and_then(|cs| cs.iter().find(|c| c.type_ == type_));
    let since = match old {
        Some(o) if o.status == status => o.last_transition_time.clone(),
        _ => Some(Time(now)),
    };
    NodeCondition {
        type_: type_.into(),
        status: status.into(),
        reason: Some(reason.into()),
        message: Some(message.into()),
        last_heartbeat_time: Some(Time(now)),
        last_transition_time: since,
    }
}

/// The Node's status from the host's facts (heartbeat times = `now`, transitions kept from `prev`).
pub fn node_status(f: &HostFacts, prev: Option<&NodeStatus>, now: Timestamp) -> NodeStatus {
    let q = |s: String| Quantity(s);
    let resources: BTreeMap<String, Quantity> = BTreeMap::from([
        ("cpu".into(), q(f.cpus.to_string())),
        ("memory".into(), q(format!("{}Ki", f.memory_kib))),
        ("pods".into(), q(f.max_pods.to_string())),
        ("ephemeral-storage".into(), q("10Gi".into())),
    ]);
    let ready = f.runtime_version.is_some();
    let (reason, message) = if ready {
        ("KubeletReady", "kubelet is posting ready status")
    } else {
        ("KubeletNotReady", "container runtime is down")
    };
    let mut addresses = Vec::new();
    if !f.node_ip.is_empty() {
        addresses.push(NodeAddress { type_: "InternalIP".into(), address: f.node_ip.clone() });
    }
    addresses.push(NodeAddress { type_: "Hostname".into(), address: f.node_name.clone() });
    NodeStatus {
        addresses: Some(addresses),
        capacity: Some(resources.clone()),
        allocatable: Some(resources),
        conditions: Some(vec![
            condition(
                "MemoryPressure",
                false,
                "KubeletHasSufficientMemory",
                "kubelet has sufficient memory available",
                prev,
                now,
            ),
            condition("DiskPressure", false, "KubeletHasNoDiskPressure", "kubelet has no disk pressure", prev, now),
            condition(
                "PIDPressure",
                false,
                "KubeletHasSufficientPID",
                "kubelet has sufficient PID available",
                prev,
                now,
            ),
            condition("Ready", ready, reason, message, prev, now),
        ]),
        daemon_endpoints: Some(NodeDaemonEndpoints { kubelet_endpoint: Some(DaemonEndpoint { port: f.kubelet_port }) }),
        node_info: Some(NodeSystemInfo {
            architecture: std::env::consts::ARCH.replace("x86_64", "amd64").replace("aarch64", "arm64"),
            boot_id: f.boot_id.clone(),
            container_runtime_version: f.runtime_version.clone().unwrap_or_default(),
            kernel_version: f.kernel.clone(),
            kube_proxy_version: String::new(),
            kubelet_version: format!("v1.32.0-weft.{}", env!("CARGO_PKG_VERSION")),
            machine_id: f.machine_id.clone(),
            operating_system: "linux".into(),
            os_image: f.os_image.clone(),
            system_uuid: f.machine_id.clone(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The status with heartbeat times blanked: two statuses that differ only in heartbeats need no write.
fn without_heartbeats(s: &NodeStatus) -> NodeStatus {
    let mut s = s.clone();
    for c in s.conditions.iter_mut().flatten() {
        c.last_heartbeat_time = None;
    }
    s
}

/// Whether the stored status must be rewritten: it changed, or the last write is older than `report_every`.
pub fn needs_write(stored: Option<&NodeStatus>, new: &NodeStatus, now: Timestamp, report_every: Duration) -> bool {
    let Some(old) = stored else { return true };
    if without_heartbeats(old) != without_heartbeats(new) {
        return true;
    }
    let last = old
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "Ready")
        .and_then(|c| c.last_heartbeat_time.as_ref())
        .map(|t| t.0);
    last.is_none_or(|l| now.duration_since(l).as_secs_f64() >= report_every.as_secs_f64())
}

pub fn new_node(f: &HostFacts, now: Timestamp) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(f.node_name.clone()),
            labels: Some(BTreeMap::from([
                ("kubernetes.io/hostname".to_string(), f.node_name.clone()),
                ("kubernetes.io/os".to_string(), "linux".to_string()),
                ("kubernetes.io/arch".to_string(), "amd64".to_string()),
            ])),
            ..Default::default()
        },
        spec: Some(NodeSpec {
            pod_cidr: f.pod_cidr.clone(),
            pod_cidrs: f.pod_cidr.clone().map(|c| vec![c]),
            ..Default::default()
        }),
        status: Some(node_status(f, None, now)),
    }
}

/// Creates or updates the Node; returns what was stored. `force` writes even without a change.
pub async fn sync_node(store: &Store, f: &HostFacts, report_every: Duration) -> Result<Node, weft_api::store::Error> {
    let now = weft_api::store::now_timestamp();
    for _ in 0..5 {
        match store.get::<Node>(None, &f.node_name).await {
            Err(e) if e.is_not_found() => match store.create(&new_node(f, now)).await {
                Err(e) if e.is_already_exists() => continue,
                r => return r,
            },
            Err(e) => return Err(e),
            Ok(mut node) => {
                let status = node_status(f, node.status.as_ref(), now);
                let spec = node.spec.get_or_insert_with(Default::default);
                let cidr_missing = spec.pod_cidr.is_none() && f.pod_cidr.is_some();
                if cidr_missing {
                    spec.pod_cidr = f.pod_cidr.clone();
                    spec.pod_cidrs = f.pod_cidr.clone().map(|c| vec![c]);
                }
                if !cidr_missing && !needs_write(node.status.as_ref(), &status, now, report_every) {
                    return Ok(node);
                }
                node.status = Some(status);
                match store.update(&node).await {
                    Err(e) if e.is_conflict() => continue,
                    r => return r,
                }
            }
        }
    }
    store.get::<Node>(None, &f.node_name).await
}

/// Renews (or creates) `kube-node-lease/<node>`.
pub async fn renew_lease(store: &Store, node: &str, duration_secs: i32) -> Result<Lease, weft_api::store::Error> {
    let now = MicroTime(weft_api::store::now_timestamp());
    for _ in 0..5 {
        match store.get::<Lease>(Some("kube-node-lease"), node).await {
            Err(e) if e.is_not_found() => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(node.to_string()),
                        namespace: Some("kube-node-lease".into()),
                        ..Default::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(node.to_string()),
                        lease_duration_seconds: Some(duration_secs),
                        renew_time: Some(now.clone()),
                        ..Default::default()
                    }),
                };
                match store.create(&lease).await {
                    Err(e) if e.is_already_exists() => continue,
                    r => return r,
                }
            }
            Err(e) => return Err(e),
            Ok(mut lease) => {
                let spec = lease.spec.get_or_insert_with(Default::default);
                spec.holder_identity = Some(node.to_string());
                spec.lease_duration_seconds = Some(duration_secs);
                spec.renew_time = Some(now.clone());
                match store.update(&lease).await {
                    Err(e) if e.is_conflict() => continue,
                    r => return r,
                }
            }
        }
    }
    store.get::<Lease>(Some("kube-node-lease"), node).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::SignedDuration;

    fn facts() -> HostFacts {
        HostFacts {
            node_name: "node-1".into(),
            node_ip: "192.168.56.11".into(),
            pod_cidr: Some("10.244.1.0/24".into()),
            cpus: 2,
            memory_kib: 1024,
            max_pods: 110,
            runtime_version: Some("containerd://1.6.20".into()),
            kubelet_port: 10250,
            ..Default::default()
        }
    }

    #[test]
    fn pod_cidr_comes_from_the_overlay_subnet_file() {
        let env = "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.3.1/24\nFLANNEL_MTU=1450\n";
        assert_eq!(pod_cidr_from_subnet_env(env).as_deref(), Some("10.244.3.0/24"));
        assert_eq!(pod_cidr_from_subnet_env("FLANNEL_SUBNET=garbage"), None);
    }

    #[test]
    fn status_says_ready_with_the_runtime_and_not_without() {
        let now = Timestamp::from_second(1_700_000_000).unwrap();
        let s = node_status(&facts(), None, now);
        let ready = s.conditions.as_ref().unwrap().iter().find(|c| c.type_ == "Ready").unwrap();
        assert_eq!((ready.status.as_str(), ready.reason.as_deref()), ("True", Some("KubeletReady")));
        assert_eq!(s.node_info.as_ref().unwrap().container_runtime_version, "containerd://1.6.20");
        assert_eq!(s.capacity.as_ref().unwrap()["cpu"].0, "2");
        assert_eq!(s.addresses.as_ref().unwrap()[0].address, "192.168.56.11");
        let down = HostFacts { runtime_version: None, ..facts() };
        let s2 = node_status(&down, Some(&s), now);
        let ready = s2.conditions.as_ref().unwrap().iter().find(|c| c.type_ == "Ready").unwrap();
        assert_eq!((ready.status.as_str(), ready.reason.as_deref()), ("False", Some("KubeletNotReady")));
    }

    #[test]
    fn written_on_change_and_at_least_every_report_period() {
        let t0 = Timestamp::from_second(1_700_000_000).unwrap();
        let every = Duration::from_secs(300);
        let s0 = node_status(&facts(), None, t0);
        let t1 = t0 + SignedDuration::from_secs(10);
        let s1 = node_status(&facts(), Some(&s0), t1);
        assert!(!needs_write(Some(&s0), &s1, t1, every), "only heartbeats differ");
        let t2 = t0 + SignedDuration::from_secs(300);
        assert!(needs_write(Some(&s0), &node_status(&facts(), Some(&s0), t2), t2, every), "report period passed");
        let changed = node_status(&HostFacts { cpus: 4, ..facts() }, Some(&s0), t1);
        assert!(needs_write(Some(&s0), &changed, t1, every));
        assert!(needs_write(None, &s1, t1, every));
    }
}
