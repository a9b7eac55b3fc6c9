//! What a pod's spec becomes in CRI, as pure functions: the sandbox config (labels the kubelet adopts by,
//! resolv.conf from dnsPolicy + dnsConfig, cgroup parent), each container's config (environment with the
//! Service variables and the downward API, resources to Linux cgroup values), and the image pull policy.

use std::collections::{BTreeMap, HashMap};

use k8s_cri::v1 as cri;
use k8s_openapi::api::core::v1::{Container, EnvVar, Pod, Service};

use super::decide::{qos_class, spec_hash};

/// Labels on every sandbox and container the kubelet creates: how it finds (and adopts) them again.
pub const LABEL_POD_UID: &str = "io.kubernetes.pod.uid";
pub const LABEL_POD_NAME: &str = "io.kubernetes.pod.name";
pub const LABEL_POD_NAMESPACE: &str = "io.kubernetes.pod.namespace";
pub const LABEL_CONTAINER_NAME: &str = "io.kubernetes.container.name";
/// Marks what this kubelet manages (a containerd may hold other things).
pub const LABEL_MANAGED: &str = "weft.io/kubelet";
pub const LABEL_HASH: &str = "weft.io/container-hash";
pub const ANNOTATION_GRACE: &str = "io.kubernetes.pod.terminationGracePeriod";
pub const ANNOTATION_KIND: &str = "weft.io/container-kind";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// The pod asks for something this kubelet cannot give (Kubernetes' `CreateContainerConfigError`).
    #[error("{0}")]
    Unsupported(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The node's side of a pod's config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSettings {
    pub node_name: String,
    pub host_ip: String,
    /// cgroupfs parent of every pod (relative to each hierarchy), e.g. `/weft`.
    pub cgroup_parent: String,
    /// Pod log directories go under `<root_dir>/pods`.
    pub root_dir: String,
    pub cluster_dns: Vec<String>,
    pub cluster_domain: String,
    /// The node's own resolv.conf, parsed (for dnsPolicy Default).
    pub host_dns: ResolvConf,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResolvConf {
    pub servers: Vec<String>,
    pub searches: Vec<String>,
    pub options: Vec<String>,
}

/// Reads resolv.conf text; unknown lines are ignored.
pub fn parse_resolv_conf(text: &str) -> ResolvConf {
    let mut r = ResolvConf::default();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("nameserver") => r.servers.extend(words.next().map(str::to_string)),
            Some("search") | Some("domain") => r.searches = words.map(str::to_string).collect(),
            Some("options") => r.options.extend(words.map(str::to_string)),
            _ => {}
        }
    }
    r
}

/// `Always` for `:latest` and untagged images, else `IfNotPresent`, unless the spec says.
pub fn pull_policy(c: &Container) -> &str {
    if let Some(p) = c.image_pull_policy.as_deref().filter(|p| !p.is_empty()) {
        return p;
    }
    let image = c.image.as_deref().unwrap_or_default();
    if image.contains('@') {
        return "IfNotPresent";
    }
    let last = image.rsplit('/').next().unwrap_or(image);
    match last.split_once(':') {
        None => "Always",
        Some((_, "latest")) => "Always",
        Some(_) => "IfNotPresent",
    }
}

/// `REDIS_MASTER` for `redis-master`.
fn env_name(service: &str) -> String {
    service.to_uppercase().replace('-', "_")
}

/// The Service variables for a pod: the docker-link style set the kubelet writes for each Service with a
/// ClusterIP in the pod's namespace (and `kubernetes` from `default`), sorted by Service name.
pub fn service_env(services: &[Service], namespace: &str) -> Vec<(String, String)> {
    let mut chosen: BTreeMap<String, &Service> = BTreeMap::new();
    for s in services {
        let ns = s.metadata.namespace.as_deref().unwrap_or("default");
        let name = s.metadata.name.as_deref().unwrap_or_default();
        let ip = s.spec.as_ref().and_then(|sp| sp.cluster_ip.as_deref()).unwrap_or_default();
        if name.is_empty() || ip.is_empty() || ip == "None" || ip.parse::<std::net::IpAddr>().is_err() {
            continue;
        }
        if ns == namespace || (ns == "default" && name == "kubernetes") {
            chosen.insert(name.to_string(), s);
        }
    }
    let mut out = Vec::new();
    for (name, s) in chosen {
        let spec = s.spec.as_ref().expect("filtered above");
        let ip = spec.cluster_ip.clone().unwrap_or_default();
        let ports = spec.ports.as_deref().unwrap_or_default();
        let Some(first) = ports.first() else { continue };
        let n = env_name(&name);
        out.push((format!("{n}_SERVICE_HOST"), ip.clone()));
        out.push((format!("{n}_SERVICE_PORT"), first.port.to_string()));
        for p in ports {
            if let Some(pn) = p.name.as_deref().filter(|x| !x.is_empty()) {
                out.push((format!("{n}_SERVICE_PORT_{}", env_name(pn)), p.port.to_string()));
            }
        }
        let proto = |p: &k8s_openapi::api::core::v1::ServicePort| p.protocol.as_deref().unwrap_or("TCP").to_string();
        out.push((format!("{n}_PORT"), format!("{}://{ip}:{}", proto(first).to_lowercase(), first.port)));
        for p in ports {
            let pr = proto(p);
            let base = format!("{n}_PORT_{}_{}", p.port, pr.to_uppercase());
            out.push((base.clone(), format!("{}://{ip}:{}", pr.to_lowercase(), p.port)));
            out.push((format!("{base}_PROTO"), pr.to_lowercase()));
            out.push((format!("{base}_PORT"), p.port.to_string()));
            out.push((format!("{base}_ADDR"), ip.clone()));
        }
    }
    out
}

/// `$(VAR)` references to earlier variables expanded, `$$` an escaped `$`; unknown references stay as written.
pub fn expand(value: &str, vars: &HashMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = value;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(') {
            match inner.find(')') {
                Some(end) => {
                    let name = &inner[..end];
                    match vars.get(name) {
                        Some(v) => out.push_str(v),
                        None => out.push_str(&format!("$({name})")),
                    }
                    rest = &inner[end + 1..];
                }
                None => {
                    out.push_str(&rest[i..]);
                    rest = "";
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

fn field_ref(pod: &Pod, node: &NodeSettings, pod_ip: &str, path: &str) -> Result<String> {
    let meta = &pod.metadata;
    let label = |m: &Option<BTreeMap<String, String>>, key: &str| m.as_ref().and_then(|m| m.get(key)).cloned();
    let keyed = |prefix: &str| {
        path.strip_prefix(prefix)
            .and_then(|r| r.strip_prefix("['"))
            .and_then(|r| r.strip_suffix("']"))
            .map(str::to_string)
    };
    Ok(match path {
        "metadata.name" => meta.name.clone().unwrap_or_default(),
        "metadata.namespace" => meta.namespace.clone().unwrap_or_else(|| "default".into()),
        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
        "spec.nodeName" => node.node_name.clone(),
        "spec.serviceAccountName" => {
            pod.spec.as_ref().and_then(|s| s.service_account_name.clone()).unwrap_or_else(|| "default".into())
        }
        "status.hostIP" | "status.hostIPs" => node.host_ip.clone(),
        "status.podIP" | "status.podIPs" => pod_ip.to_string(),
        _ => {
            if let Some(k) = keyed("metadata.labels") {
                label(&meta.labels, &k).unwrap_or_default()
            } else if let Some(k) = keyed("metadata.annotations") {
                label(&meta.annotations, &k).unwrap_or_default()
            } else {
                return Err(Error::Unsupported(format!("fieldRef {path:?} is not supported")));
            }
        }
    })
}

fn env_value(
    pod: &Pod,
    c: &Container,
    node: &NodeSettings,
    pod_ip: &str,
    e: &EnvVar,
    vars: &HashMap<String, String>,
) -> Result<String> {
    if let Some(v) = &e.value {
        return Ok(expand(v, vars));
    }
    let Some(from) = &e.value_from else { return Ok(String::new()) };
    if let Some(f) = &from.field_ref {
        return field_ref(pod, node, pod_ip, &f.field_path);
    }
    if let Some(r) = &from.resource_field_ref {
        let res = c.resources.as_ref();
        let (kind, name) = r.resource.split_once('.').unwrap_or(("", ""));
        let m = match kind {
            "limits" => res.and_then(|x| x.limits.as_ref()),
            "requests" => res.and_then(|x| x.requests.as_ref()),
            _ => None,
        };
        let Some(q) = m.and_then(|m| m.get(name)).and_then(|q| crate::quantity::milli(&q.0)) else {
            return Err(Error::Unsupported(format!("resourceFieldRef {:?} has no value in the spec", r.resource)));
        };
        // Whole units, rounded up (cpu in cores, memory in bytes), as the downward API gives them.
        return Ok(((q + 999) / 1000).to_string());
    }
    Err(Error::Unsupported(format!(
        "env {:?}: secretKeyRef and configMapKeyRef are not supported by this kubelet",
        e.name
    )))
}

/// The container's environment: Service variables first, then `env` in order (later wins, `$(VAR)` expanded).
pub fn container_env(
    pod: &Pod,
    c: &Container,
    services: &[Service],
    node: &NodeSettings,
    pod_ip: &str,
) -> Result<Vec<(String, String)>> {
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let links = pod.spec.as_ref().and_then(|s| s.enable_service_links).unwrap_or(true);
    let mut order: Vec<String> = Vec::new();
    let mut vars: HashMap<String, String> = HashMap::new();
    let set = |k: String, v: String, order: &mut Vec<String>, vars: &mut HashMap<String, String>| {
        if vars.insert(k.clone(), v).is_none() {
            order.push(k);
        }
    };
    for (k, v) in service_env(services, ns) {
        if links || k.starts_with("KUBERNETES_") {
            set(k, v, &mut order, &mut vars);
        }
    }
    for e in c.env.iter().flatten() {
        let v = env_value(pod, c, node, pod_ip, e, &vars)?;
        set(e.name.clone(), v, &mut order, &mut vars);
    }
    Ok(order
        .into_iter()
        .map(|k| {
            let v = vars.get(&k).cloned().unwrap_or_default();
            (k, v)
        })
        .collect())
}

fn push_unique(list: &mut Vec<String>, items: impl IntoIterator<Item = String>) {
    for i in items {
        if !list.contains(&i) {
            list.push(i);
        }
    }
}

/// resolv.conf for the pod: dnsPolicy ClusterFirst (default; the node's resolv.conf when no cluster DNS is set),
/// Default (the node's), None (only dnsConfig), then dnsConfig merged in.
pub fn dns_config(pod: &Pod, node: &NodeSettings) -> cri::DnsConfig {
    let spec = pod.spec.as_ref();
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let mut policy = spec.and_then(|s| s.dns_policy.as_deref()).unwrap_or("ClusterFirst");
    // On the node's network the cluster DNS is only for pods that ask with ClusterFirstWithHostNet.
    if host_network(pod) && policy == "ClusterFirst" {
        policy = "Default";
    }
    let mut d = cri::DnsConfig::default();
    match policy {
        "None" => {}
        "Default" => {
            d.servers = node.host_dns.servers.clone();
            d.searches = node.host_dns.searches.clone();
            d.options = node.host_dns.options.clone();
        }
        _ if node.cluster_dns.is_empty() => {
            d.servers = node.host_dns.servers.clone();
            d.searches = node.host_dns.searches.clone();
            d.options = node.host_dns.options.clone();
        }
        _ => {
            let dom = &node.cluster_domain;
            d.servers = node.cluster_dns.clone();
            d.searches = vec![format!("{ns}.svc.{dom}"), format!("svc.{dom}"), dom.clone()];
            push_unique(&mut d.searches, node.host_dns.searches.iter().cloned());
            d.options = vec!["ndots:5".into()];
        }
    }
    if let Some(cfg) = spec.and_then(|s| s.dns_config.as_ref()) {
        push_unique(&mut d.servers, cfg.nameservers.iter().flatten().cloned());
        push_unique(&mut d.searches, cfg.searches.iter().flatten().cloned());
        for o in cfg.options.iter().flatten() {
            let Some(name) = o.name.as_deref() else { continue };
            d.options.retain(|x| x.split(':').next() != Some(name));
            d.options.push(match &o.value {
                Some(v) => format!("{name}:{v}"),
                None => name.to_string(),
            });
        }
    }
    d.servers.truncate(3);
    d.searches.truncate(32);
    d
}

/// requests and limits → cgroup values (`cpu.shares` from the request, CFS quota from the limit, memory limit),
/// and the OOM score adjustment of the pod's QoS class.
pub fn linux_resources(pod: &Pod, c: &Container) -> cri::LinuxContainerResources {
    let get = |limits: bool, r: &str| {
        let res = c.resources.as_ref();
        let m = if limits { res.and_then(|x| x.limits.as_ref()) } else { res.and_then(|x| x.requests.as_ref()) };
        m.and_then(|m| m.get(r)).and_then(|q| crate::quantity::milli(&q.0))
    };
    let cpu_limit = get(true, "cpu");
    // An unset request defaults to the limit (the API server's defaulting).
    let cpu_request = get(false, "cpu").or(cpu_limit);
    const PERIOD: i64 = 100_000;
    let shares = match cpu_request {
        Some(m) if m > 0 => ((m as i64) * 1024 / 1000).max(2),
        _ => 2,
    };
    let quota = cpu_limit.filter(|m| *m > 0).map(|m| ((m as i64) * PERIOD / 1000).max(1000)).unwrap_or(0);
    let memory = get(true, "memory").map(|m| (m / 1000) as i64).unwrap_or(0);
    let oom = match qos_class(pod) {
        "Guaranteed" => -997,
        "BestEffort" => 1000,
        _ => {
            let req = get(false, "memory").map(|m| (m / 1000) as i64).unwrap_or(0);
            let capacity = node_memory_bytes().max(1);
            (1000 - 1000 * req / capacity).clamp(2, 999)
        }
    };
    cri::LinuxContainerResources {
        cpu_shares: shares,
        cpu_period: if quota > 0 { PERIOD } else { 0 },
        cpu_quota: quota,
        memory_limit_in_bytes: memory,
        oom_score_adj: oom,
        ..Default::default()
    }
}

/// MemTotal in bytes (for the Burstable OOM score); 0 when unknown.
pub fn node_memory_bytes() -> i64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse::<i64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

fn pod_ids(pod: &Pod) -> (String, String, String) {
    let m = &pod.metadata;
    (
        m.name.clone().unwrap_or_default(),
        m.namespace.clone().unwrap_or_else(|| "default".into()),
        m.uid.clone().unwrap_or_default(),
    )
}

/// `<root>/pods/<uid>`: the pod's own files (its emptyDir volumes).
pub fn pod_dir(pod: &Pod, node: &NodeSettings) -> String {
    format!("{}/pods/{}", node.root_dir.trim_end_matches('/'), pod.metadata.uid.as_deref().unwrap_or_default())
}

/// Where emptyDir volume `name` of the pod lives on the node.
pub fn empty_dir_path(pod: &Pod, node: &NodeSettings, name: &str) -> String {
    format!("{}/volumes/{name}", pod_dir(pod, node))
}

/// The pod's emptyDir volumes' directories (the kubelet creates them before the containers).
pub fn empty_dirs(pod: &Pod, node: &NodeSettings) -> Vec<String> {
    let vols = pod.spec.as_ref().and_then(|s| s.volumes.as_ref());
    vols.into_iter().flatten().filter(|v| v.empty_dir.is_some()).map(|v| empty_dir_path(pod, node, &v.name)).collect()
}

/// The container's volumeMounts as CRI mounts: emptyDir (a directory of the pod on the node) and hostPath;
/// any other volume source is a config error.
pub fn mounts(pod: &Pod, c: &Container, node: &NodeSettings) -> Result<Vec<cri::Mount>> {
    let vols = pod.spec.as_ref().and_then(|s| s.volumes.as_deref()).unwrap_or_default();
    let mut out = Vec::new();
    for m in c.volume_mounts.iter().flatten() {
        let v = vols
            .iter()
            .find(|v| v.name == m.name)
            .ok_or_else(|| Error::Unsupported(format!("volumeMount {:?}: no volume of that name", m.name)))?;
        let base = if v.empty_dir.is_some() {
            empty_dir_path(pod, node, &v.name)
        } else if let Some(h) = &v.host_path {
            h.path.clone()
        } else {
            return Err(Error::Unsupported(format!(
                "volume {:?}: only emptyDir and hostPath volumes are supported by this kubelet",
                v.name
            )));
        };
        let sub = m.sub_path.as_deref().unwrap_or_default();
        if sub.split('/').any(|p| p == "..") || sub.starts_with('/') {
            return Err(Error::Unsupported(format!("volumeMount {:?}: subPath {sub:?} must be relative", m.name)));
        }
        let host_path = if sub.is_empty() { base } else { format!("{base}/{sub}") };
        out.push(cri::Mount {
            container_path: m.mount_path.clone(),
            host_path,
            readonly: m.read_only.unwrap_or(false),
            ..Default::default()
        });
    }
    Ok(out)
}

pub fn host_network(pod: &Pod) -> bool {
    pod.spec.as_ref().and_then(|s| s.host_network).unwrap_or(false)
}

/// The namespaces a pod's sandbox and containers get, as the kubelet chooses them: network and IPC shared by the
/// pod (or the node's with hostNetwork/hostIPC); PID per container unless `shareProcessNamespace` (pod) or
/// `hostPID` (node), so a container's own process is PID 1 as its image expects.
pub fn namespace_options(pod: &Pod) -> cri::NamespaceOption {
    let spec = pod.spec.as_ref();
    let flag = |f: fn(&k8s_openapi::api::core::v1::PodSpec) -> Option<bool>| spec.and_then(f).unwrap_or(false);
    let shared = |on_node: bool| if on_node { cri::NamespaceMode::Node } else { cri::NamespaceMode::Pod } as i32;
    let pid = if flag(|s| s.host_pid) {
        cri::NamespaceMode::Node
    } else if flag(|s| s.share_process_namespace) {
        cri::NamespaceMode::Pod
    } else {
        cri::NamespaceMode::Container
    };
    cri::NamespaceOption {
        network: shared(host_network(pod)),
        ipc: shared(flag(|s| s.host_ipc)),
        pid: pid as i32,
        ..Default::default()
    }
}

/// `<root>/pods/<namespace>_<name>_<uid>`
pub fn pod_log_dir(pod: &Pod, node: &NodeSettings) -> String {
    let (name, ns, uid) = pod_ids(pod);
    format!("{}/pods/{ns}_{name}_{uid}", node.root_dir.trim_end_matches('/'))
}

pub fn grace_period(pod: &Pod) -> i64 {
    pod.spec.as_ref().and_then(|s| s.termination_grace_period_seconds).unwrap_or(30).max(0)
}

/// The sandbox for `pod` (attempt `attempt`).
pub fn sandbox_config(pod: &Pod, attempt: u32, node: &NodeSettings) -> cri::PodSandboxConfig {
    let (name, ns, uid) = pod_ids(pod);
    let spec = pod.spec.as_ref();
    let mut labels: HashMap<String, String> = pod.metadata.labels.clone().unwrap_or_default().into_iter().collect();
    labels.insert(LABEL_POD_UID.into(), uid.clone());
    labels.insert(LABEL_POD_NAME.into(), name.clone());
    labels.insert(LABEL_POD_NAMESPACE.into(), ns.clone());
    labels.insert(LABEL_MANAGED.into(), node.node_name.clone());
    let mut annotations: HashMap<String, String> =
        pod.metadata.annotations.clone().unwrap_or_default().into_iter().collect();
    annotations.insert(ANNOTATION_GRACE.into(), grace_period(pod).to_string());
    // On the node's network the UTS namespace is the node's too: its hostname is not the pod's to set.
    let hostname = if host_network(pod) {
        String::new()
    } else {
        spec.and_then(|s| s.hostname.clone()).unwrap_or_else(|| name.clone())
    };
    let port_mappings = spec
        .map(|s| s.containers.iter().flat_map(|c| c.ports.iter().flatten()).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .filter(|p| p.host_port.is_some_and(|h| h > 0))
        .map(|p| cri::PortMapping {
            protocol: match p.protocol.as_deref() {
                Some("UDP") => cri::Protocol::Udp as i32,
                Some("SCTP") => cri::Protocol::Sctp as i32,
                _ => cri::Protocol::Tcp as i32,
            },
            container_port: p.container_port,
            host_port: p.host_port.unwrap_or_default(),
            host_ip: p.host_ip.clone().unwrap_or_default(),
        })
        .collect();
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata { name, uid, namespace: ns, attempt }),
        hostname: hostname.chars().take(63).collect(),
        log_directory: pod_log_dir(pod, node),
        dns_config: Some(dns_config(pod, node)),
        port_mappings,
        labels,
        annotations,
        linux: Some(cri::LinuxPodSandboxConfig {
            cgroup_parent: node.cgroup_parent.clone(),
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(namespace_options(pod)),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Container `c` of `pod`, attempt `attempt`, with its environment. `kind` is `init` or `app`.
pub fn container_config(
    pod: &Pod,
    c: &Container,
    kind: &str,
    attempt: u32,
    env: Vec<(String, String)>,
    image: &str,
    mounts: Vec<cri::Mount>,
) -> cri::ContainerConfig {
    let (name, ns, uid) = pod_ids(pod);
    let labels = HashMap::from([
        (LABEL_POD_UID.to_string(), uid),
        (LABEL_POD_NAME.to_string(), name),
        (LABEL_POD_NAMESPACE.to_string(), ns),
        (LABEL_CONTAINER_NAME.to_string(), c.name.clone()),
        (LABEL_HASH.to_string(), spec_hash(c)),
    ]);
    let annotations = HashMap::from([
        (ANNOTATION_GRACE.to_string(), grace_period(pod).to_string()),
        (ANNOTATION_KIND.to_string(), kind.to_string()),
        ("io.kubernetes.container.restartCount".to_string(), attempt.to_string()),
    ]);
    cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata { name: c.name.clone(), attempt }),
        image: Some(cri::ImageSpec { image: image.to_string(), ..Default::default() }),
        command: c.command.clone().unwrap_or_default(),
        args: c.args.clone().unwrap_or_default(),
        working_dir: c.working_dir.clone().unwrap_or_default(),
        envs: env.into_iter().map(|(key, value)| cri::KeyValue { key, value }).collect(),
        mounts,
        labels,
        annotations,
        log_path: format!("{}/{attempt}.log", c.name),
        stdin: c.stdin.unwrap_or(false),
        stdin_once: c.stdin_once.unwrap_or(false),
        tty: c.tty.unwrap_or(false),
        linux: Some(cri::LinuxContainerConfig {
            resources: Some(linux_resources(pod, c)),
            security_context: Some(cri::LinuxContainerSecurityContext {
                privileged: c.security_context.as_ref().and_then(|s| s.privileged).unwrap_or(false),
                namespace_options: Some(namespace_options(pod)),
                ..Default::default()
            }),
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node() -> NodeSettings {
        NodeSettings {
            node_name: "node-1".into(),
            host_ip: "192.168.56.11".into(),
            cgroup_parent: "/weft".into(),
            root_dir: "/var/lib/weft/kubelet".into(),
            cluster_dns: vec!["10.96.0.10".into()],
            cluster_domain: "cluster.local".into(),
            host_dns: parse_resolv_conf("nameserver 192.168.56.1\nsearch lab.example\noptions edns0\n"),
        }
    }

    fn pod(spec: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "web-1", "namespace": "shop", "uid": "u-1", "labels": {"app": "web"}},
            "spec": spec,
        }))
        .unwrap()
    }

    fn container(v: serde_json::Value) -> Container {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn pull_policy_defaults() {
        let cases = [
            ("nginx", None, "Always"),
            ("nginx:latest", None, "Always"),
            ("nginx:1.7.9", None, "IfNotPresent"),
            ("localhost:5000/nginx", None, "Always"),
            ("localhost:5000/nginx:1", None, "IfNotPresent"),
            ("weft.local/busybox:1", None, "IfNotPresent"),
            ("nginx@sha256:abc", None, "IfNotPresent"),
            ("nginx:1.7.9", Some("Always"), "Always"),
            ("nginx", Some("Never"), "Never"),
        ];
        for (image, set, want) in cases {
            let c = container(json!({"name": "c", "image": image, "imagePullPolicy": set}));
            assert_eq!(pull_policy(&c), want, "{image} {set:?}");
        }
    }

    fn svc(ns: &str, name: &str, ip: &str, ports: serde_json::Value) -> Service {
        serde_json::from_value(
            json!({"metadata": {"name": name, "namespace": ns}, "spec": {"clusterIP": ip, "ports": ports}}),
        )
        .unwrap()
    }

    #[test]
    fn service_variables_as_in_the_seeds() {
        let services = vec![
            svc("shop", "redis-master", "10.0.0.11", json!([{"port": 6379, "protocol": "TCP"}])),
            svc("other", "elsewhere", "10.0.0.12", json!([{"port": 80}])),
            svc("shop", "headless", "None", json!([{"port": 80}])),
        ];
        let got = service_env(&services, "shop");
        let want: Vec<(String, String)> = [
            ("REDIS_MASTER_SERVICE_HOST", "10.0.0.11"),
            ("REDIS_MASTER_SERVICE_PORT", "6379"),
            ("REDIS_MASTER_PORT", "tcp://10.0.0.11:6379"),
            ("REDIS_MASTER_PORT_6379_TCP", "tcp://10.0.0.11:6379"),
            ("REDIS_MASTER_PORT_6379_TCP_PROTO", "tcp"),
            ("REDIS_MASTER_PORT_6379_TCP_PORT", "6379"),
            ("REDIS_MASTER_PORT_6379_TCP_ADDR", "10.0.0.11"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn env_values_downward_api_and_expansion() {
        let c = container(json!({"name": "c", "env": [
            {"name": "GREETING", "value": "hello"},
            {"name": "MSG", "value": "$(GREETING) from $(POD_NAME) $$(x) $(MISSING)"},
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "POD_NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
            {"name": "HOST_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}},
            {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
        ]}));
        let p = pod(json!({"containers": [c.clone()]}));
        let services = vec![svc("shop", "db", "10.0.0.20", json!([{"port": 5432}]))];
        let env: HashMap<String, String> =
            container_env(&p, &c, &services, &node(), "10.244.1.5").unwrap().into_iter().collect();
        assert_eq!(env["GREETING"], "hello");
        // POD_NAME is defined after MSG, so its reference stays as written.
        assert_eq!(env["MSG"], "hello from $(POD_NAME) $(x) $(MISSING)");
        assert_eq!(env["POD_NAME"], "web-1");
        assert_eq!(env["POD_NS"], "shop");
        assert_eq!(env["POD_IP"], "10.244.1.5");
        assert_eq!(env["NODE"], "node-1");
        assert_eq!(env["HOST_IP"], "192.168.56.11");
        assert_eq!(env["APP"], "web");
        assert_eq!(env["DB_SERVICE_HOST"], "10.0.0.20");
        // enableServiceLinks: false drops the Service variables.
        let mut p2 = p.clone();
        p2.spec.as_mut().unwrap().enable_service_links = Some(false);
        let env2 = container_env(&p2, &c, &services, &node(), "10.244.1.5").unwrap();
        assert!(!env2.iter().any(|(k, _)| k.starts_with("DB_")));
        // A secret reference is a config error, not a crash.
        let bad = container(
            json!({"name": "c", "env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]}),
        );
        assert!(container_env(&p, &bad, &[], &node(), "").is_err());
    }

    #[test]
    fn resolv_conf_by_dns_policy() {
        let cases = [
            (
                json!({}),
                vec!["10.96.0.10"],
                vec!["shop.svc.cluster.local", "svc.cluster.local", "cluster.local", "lab.example"],
                vec!["ndots:5"],
            ),
            (
                json!({"dnsPolicy": "ClusterFirst"}),
                vec!["10.96.0.10"],
                vec!["shop.svc.cluster.local", "svc.cluster.local", "cluster.local", "lab.example"],
                vec!["ndots:5"],
            ),
            (json!({"dnsPolicy": "Default"}), vec!["192.168.56.1"], vec!["lab.example"], vec!["edns0"]),
            (
                json!({"dnsPolicy": "None", "dnsConfig": {"nameservers": ["1.2.3.4"], "searches": ["a.example"], "options": [{"name": "ndots", "value": "2"}]}}),
                vec!["1.2.3.4"],
                vec!["a.example"],
                vec!["ndots:2"],
            ),
            (
                json!({"dnsConfig": {"nameservers": ["1.2.3.4"], "options": [{"name": "ndots", "value": "1"}, {"name": "rotate"}]}}),
                vec!["10.96.0.10", "1.2.3.4"],
                vec!["shop.svc.cluster.local", "svc.cluster.local", "cluster.local", "lab.example"],
                vec!["ndots:1", "rotate"],
            ),
        ];
        for (extra, servers, searches, options) in cases {
            let mut spec = json!({"containers": [{"name": "c"}]});
            crate::testutil::merge(&mut spec, extra.clone());
            let d = dns_config(&pod(spec), &node());
            assert_eq!(
                (d.servers, d.searches, d.options),
                (
                    servers.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
                    searches.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
                    options.iter().map(|s| s.to_string()).collect::<Vec<_>>()
                ),
                "{extra}"
            );
        }
    }

    #[test]
    fn host_network_pods_use_the_node_network_and_its_dns() {
        let p = pod(json!({"hostNetwork": true, "containers": [{"name": "c"}]}));
        let sb = sandbox_config(&p, 0, &node());
        let ns = sb.linux.unwrap().security_context.unwrap().namespace_options.unwrap();
        assert_eq!(ns.network, cri::NamespaceMode::Node as i32);
        assert_eq!(dns_config(&p, &node()).servers, vec!["192.168.56.1".to_string()]);
        let p =
            pod(json!({"hostNetwork": true, "dnsPolicy": "ClusterFirstWithHostNet", "containers": [{"name": "c"}]}));
        assert_eq!(dns_config(&p, &node()).servers, vec!["10.96.0.10".to_string()]);
        let p = pod(json!({"containers": [{"name": "c"}]}));
        let ns = sandbox_config(&p, 0, &node()).linux.unwrap().security_context.unwrap().namespace_options.unwrap();
        assert_eq!(ns.network, cri::NamespaceMode::Pod as i32);
    }

    #[test]
    fn containers_get_their_own_pid_namespace_unless_the_pod_shares_it() {
        let cases = [
            (json!({"containers": [{"name": "c"}]}), cri::NamespaceMode::Container, cri::NamespaceMode::Pod),
            (
                json!({"shareProcessNamespace": true, "containers": [{"name": "c"}]}),
                cri::NamespaceMode::Pod,
                cri::NamespaceMode::Pod,
            ),
            (
                json!({"hostPID": true, "hostIPC": true, "containers": [{"name": "c"}]}),
                cri::NamespaceMode::Node,
                cri::NamespaceMode::Node,
            ),
        ];
        for (spec, pid, ipc) in cases {
            let p = pod(spec.clone());
            let ns = namespace_options(&p);
            assert_eq!((ns.pid, ns.ipc), (pid as i32, ipc as i32), "{spec}");
            let sb = sandbox_config(&p, 0, &node()).linux.unwrap().security_context.unwrap().namespace_options.unwrap();
            assert_eq!(sb, ns, "{spec}");
        }
    }

    #[test]
    fn volume_mounts_for_empty_dir_and_host_path() {
        let c = container(json!({"name": "c", "volumeMounts": [
            {"name": "work", "mountPath": "/work"},
            {"name": "work", "mountPath": "/sub", "subPath": "a/b", "readOnly": true},
            {"name": "host", "mountPath": "/host"},
        ]}));
        let p = pod(json!({"containers": [c.clone()], "volumes": [
            {"name": "work", "emptyDir": {}}, {"name": "host", "hostPath": {"path": "/srv/data"}},
            {"name": "cfg", "configMap": {"name": "x"}},
        ]}));
        let m = mounts(&p, &c, &node()).unwrap();
        let got: Vec<(&str, &str, bool)> =
            m.iter().map(|m| (m.container_path.as_str(), m.host_path.as_str(), m.readonly)).collect();
        assert_eq!(
            got,
            vec![
                ("/work", "/var/lib/weft/kubelet/pods/u-1/volumes/work", false),
                ("/sub", "/var/lib/weft/kubelet/pods/u-1/volumes/work/a/b", true),
                ("/host", "/srv/data", false),
            ]
        );
        assert_eq!(empty_dirs(&p, &node()), vec!["/var/lib/weft/kubelet/pods/u-1/volumes/work".to_string()]);
        for bad in [
            json!({"name": "c", "volumeMounts": [{"name": "cfg", "mountPath": "/cfg"}]}),
            json!({"name": "c", "volumeMounts": [{"name": "nope", "mountPath": "/x"}]}),
            json!({"name": "c", "volumeMounts": [{"name": "work", "mountPath": "/x", "subPath": "../../etc"}]}),
        ] {
            assert!(mounts(&p, &container(bad.clone()), &node()).is_err(), "{bad}");
        }
    }

    #[test]
    fn resources_become_cgroup_values() {
        let c = container(
            json!({"name": "c", "resources": {"requests": {"cpu": "100m", "memory": "100Mi"}, "limits": {"cpu": "500m", "memory": "128Mi"}}}),
        );
        let p = pod(json!({"containers": [c.clone()]}));
        let r = linux_resources(&p, &c);
        assert_eq!(
            (r.cpu_shares, r.cpu_period, r.cpu_quota, r.memory_limit_in_bytes),
            (102, 100_000, 50_000, 128 << 20)
        );
        assert!((2..=999).contains(&r.oom_score_adj), "Burstable");
        let none = container(json!({"name": "c"}));
        let p = pod(json!({"containers": [none.clone()]}));
        let r = linux_resources(&p, &none);
        assert_eq!((r.cpu_shares, r.cpu_quota, r.memory_limit_in_bytes, r.oom_score_adj), (2, 0, 0, 1000));
        let g = container(json!({"name": "c", "resources": {"limits": {"cpu": "1", "memory": "64Mi"}}}));
        let p = pod(json!({"containers": [g.clone()]}));
        let r = linux_resources(&p, &g);
        assert_eq!((r.cpu_shares, r.cpu_quota, r.oom_score_adj), (1024, 100_000, -997));
    }

    #[test]
    fn sandbox_and_container_carry_the_labels_the_kubelet_adopts_by() {
        let c =
            container(json!({"name": "web", "image": "weft.local/busybox:1", "command": ["httpd"], "args": ["-f"]}));
        let p = pod(json!({"containers": [c.clone()], "terminationGracePeriodSeconds": 5}));
        let sb = sandbox_config(&p, 2, &node());
        assert_eq!(sb.labels[LABEL_POD_UID], "u-1");
        assert_eq!(sb.labels["app"], "web");
        assert_eq!(sb.metadata.as_ref().unwrap().attempt, 2);
        assert_eq!(sb.log_directory, "/var/lib/weft/kubelet/pods/shop_web-1_u-1");
        assert_eq!(sb.linux.as_ref().unwrap().cgroup_parent, "/weft");
        assert_eq!(sb.annotations[ANNOTATION_GRACE], "5");
        let cc = container_config(&p, &c, "app", 3, vec![("A".into(), "1".into())], "weft.local/busybox:1", vec![]);
        assert_eq!(cc.labels[LABEL_CONTAINER_NAME], "web");
        assert_eq!(cc.labels[LABEL_HASH], spec_hash(&c));
        assert_eq!(
            (cc.command.clone(), cc.args.clone(), cc.log_path.clone()),
            (vec!["httpd".to_string()], vec!["-f".to_string()], "web/3.log".to_string())
        );
        assert_eq!(cc.metadata.unwrap().attempt, 3);
    }
}
