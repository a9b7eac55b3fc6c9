//! The multi-node lab on one machine: a `fabric` namespace (bridge `br0` + a real etcd) and one namespace
//! per node joined to it by veth, pods as namespaces wired by `weft-cni`, or (with `kubelet`) a whole cluster:
//! per node its own containerd and `weft kubelet`, per lab `weft controller`, `weft dns` and a small PKI. Every
//! namespace is named `weft-<id>-…`, every file lives under `/run/weft/lab/<id>/`, every cgroup under
//! `/weft-lab-<id>`; teardown removes exactly those.

use std::fs::File;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::cluster::{self, KubeletSetup};
use crate::netns::{Netns, NsRuntime};
use crate::pki::Pki;

/// Where every lab keeps its state.
pub const LAB_ROOT: &str = "/run/weft/lab";
/// The fabric's address on `br0`, where etcd listens (the same plan as `vagrant/`).
pub const FABRIC_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 56, 10);
pub const ETCD_ENDPOINT: &str = "http://192.168.56.10:2379";
/// The network config key flannel and weft read.
pub const NETWORK_CONFIG_KEY: &str = "/coreos.com/network/config";
/// The cluster DNS Service's address (`kube-system/kube-dns`) and the node whose `weft dns` serves it.
pub const CLUSTER_DNS: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
pub const DNS_NODE: usize = 1;

#[derive(Debug, Clone)]
pub struct LabOptions {
    /// The lab's id (letters and digits); a fresh unique one when `None`.
    pub id: Option<String>,
    pub nodes: usize,
    pub network: String,
    /// `vxlan` or `host-gw`.
    pub backend: String,
    pub start_agents: bool,
    /// Extra arguments for every `weft agent`.
    pub agent_args: Vec<String>,
    /// Start `weft proxy --proxy-mode <mode>` on every node (after the agents).
    pub proxy_mode: Option<String>,
    /// Start `weft dns` on node-1 behind the Service `kube-system/kube-dns` at 10.96.0.10, and give every
    /// pod a resolv.conf that uses it.
    pub dns: bool,
    /// The reference CNI plugins (`bridge`, `host-local`); `None`: `$WEFT_CNI_BIN_DIR`, else searched
    /// (`crate::bins::cni_bin_dir`). They are linked into the lab's own `cni-bin` beside `weft-cni`.
    pub cni_bin_dir: Option<PathBuf>,
    /// Run a whole cluster: the lab's PKI, `weft controller` in the fabric, and on every node its own
    /// containerd (with weft's local images imported) and `weft kubelet`. Needs the agents (for the subnets).
    pub kubelet: bool,
    /// Extra arguments for every `weft kubelet` (e.g. `--sync-frequency=500ms`).
    pub kubelet_args: Vec<String>,
    /// Extra arguments for `weft controller` (e.g. `--node-monitor-grace-period=8s`).
    pub controller_args: Vec<String>,
}

impl Default for LabOptions {
    fn default() -> Self {
        LabOptions {
            id: None,
            nodes: 2,
            network: "10.244.0.0/16".into(),
            backend: "vxlan".into(),
            start_agents: true,
            agent_args: Vec::new(),
            proxy_mode: None,
            dns: false,
            cni_bin_dir: None,
            kubelet: false,
            kubelet_args: Vec::new(),
            controller_args: Vec::new(),
        }
    }
}

/// What `state.json` records, so a later process can find, report on and tear down the lab.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabState {
    pub id: String,
    pub nodes: usize,
    pub network: String,
    pub backend: String,
    pub etcd: String,
    /// Pods get a resolv.conf pointing at the cluster DNS.
    #[serde(default)]
    pub dns: bool,
    /// Every node runs containerd and `weft kubelet`; the fabric runs `weft controller`.
    #[serde(default)]
    pub kubelet: bool,
}

/// One node: a namespace with `eth0` on the fabric.
#[derive(Debug)]
pub struct Node {
    index: usize,
    name: String,
    ns: Netns,
    ip: Ipv4Addr,
    dir: PathBuf,
    agent: Option<Child>,
    proxy: Option<Child>,
    containerd: Option<Child>,
    kubelet: Option<Child>,
}

impl Node {
    /// `node-<i>`
    pub fn name(&self) -> &str {
        &self.name
    }
    /// 1-based.
    pub fn index(&self) -> usize {
        self.index
    }
    pub fn ns(&self) -> &Netns {
        &self.ns
    }
    /// Its underlay address, `192.168.56.(10+i)`.
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }
    /// `/run/weft/lab/<id>/node-<i>`
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn subnet_env_path(&self) -> PathBuf {
        self.dir.join("subnet.env")
    }
    pub fn agent_log_path(&self) -> PathBuf {
        self.dir.join("agent.log")
    }
    /// The CNI network config `weft-cni` gets on this node.
    pub fn cni_conf_path(&self) -> PathBuf {
        self.dir.join("cni/weft.conf")
    }
    fn agent_pid_path(&self) -> PathBuf {
        self.dir.join("agent.pid")
    }
    pub fn proxy_log_path(&self) -> PathBuf {
        self.dir.join("proxy.log")
    }
    fn proxy_pid_path(&self) -> PathBuf {
        self.dir.join("proxy.pid")
    }
    fn pods_dir(&self) -> PathBuf {
        self.dir.join("pods")
    }
    /// containerd's root, state, socket and config live here.
    pub fn containerd_dir(&self) -> PathBuf {
        self.dir.join("containerd")
    }
    pub fn containerd_socket(&self) -> PathBuf {
        self.containerd_dir().join("containerd.sock")
    }
    pub fn containerd_log_path(&self) -> PathBuf {
        self.dir.join("containerd.log")
    }
    fn containerd_pid_path(&self) -> PathBuf {
        self.dir.join("containerd.pid")
    }
    pub fn kubelet_log_path(&self) -> PathBuf {
        self.dir.join("kubelet.log")
    }
    fn kubelet_pid_path(&self) -> PathBuf {
        self.dir.join("kubelet.pid")
    }
    /// The kubelet's `--root-dir` (pod logs under `pods/`).
    pub fn kubelet_root(&self) -> PathBuf {
        self.dir.join("kubelet")
    }
}

/// A pod: a namespace behind its node's `cni0`.
#[derive(Debug)]
pub struct Pod {
    name: String,
    node: usize,
    ns: Netns,
    ip: Ipv4Addr,
}

impl Pod {
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn node(&self) -> usize {
        self.node
    }
    pub fn ns(&self) -> &Netns {
        &self.ns
    }
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }
}

/// A running lab; dropping it tears everything down unless it was `persist`ed.
pub struct Lab {
    state: LabState,
    dir: PathBuf,
    fabric: Netns,
    nodes: Vec<Node>,
    etcd: Option<Child>,
    dns: Option<Child>,
    controller: Option<Child>,
    rt: Option<NsRuntime>,
    keep: bool,
}

/// Ids become namespace prefixes: letters and digits only, so one lab's prefix never matches another's.
fn check_id(id: &str) -> Result<()> {
    if id.is_empty() || id.len() > 24 || !id.chars().all(|c| c.is_ascii_alphanumeric()) {
        bail!("lab id {id:?} must be 1-24 letters or digits");
    }
    Ok(())
}

/// Pod names become part of a namespace name and a CNI container id.
fn check_pod_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 32 || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        bail!("pod name {name:?} must be 1-32 letters, digits or '-'");
    }
    Ok(())
}

pub fn lab_dir(id: &str) -> PathBuf {
    Path::new(LAB_ROOT).join(id)
}

/// The namespace prefix of lab `id`.
pub fn ns_prefix(id: &str) -> String {
    format!("weft-{id}-")
}

/// Every namespace `ip netns list` shows.
pub fn netns_list() -> Vec<String> {
    Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter_map(|l| l.split_whitespace().next())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default()
}

/// The binary to run as agent and CNI plugin: `$WEFT_BIN`, this process when it is `weft` (`weft lab`),
/// else the workspace's `target/debug/weft` (tests).
fn weft_binary() -> PathBuf {
    if std::env::var_os("WEFT_BIN").is_none() {
        if let Ok(exe) = std::env::current_exe() {
            if exe.file_name() == Some(std::ffi::OsStr::new("weft")) {
                return exe;
            }
        }
    }
    crate::weft_bin()
}

/// Polls `cond` every 50 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// See `Lab::write_bad_service_input`.
pub const BAD_SERVICE_KEY: &str = "/registry/services/default/garbage";
pub const BAD_ENDPOINTS_KEY: &str = "/registry/endpoints/default/halfbad";
pub const BAD_ADDRESS: &str = "999.1.1.1";

/// Polls `f` every 200 ms until it succeeds, or returns its last error with `what` once `secs` have passed.
pub fn until<T>(what: &str, secs: u64, mut f: impl FnMut() -> Result<T>) -> Result<T> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() > deadline => return Err(e.context(format!("{what}: not within {secs}s"))),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// `until` for a check that can also say "not yet" (`Ok(None)`) without an error.
pub fn until_some<T>(what: &str, secs: u64, mut f: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    until(what, secs, || f()?.ok_or_else(|| anyhow!("not yet")))
}

/// Connects to `addr` from inside `ns` and reads what the server says (the lab's test servers say their
/// name) until it closes.
pub fn fetch(ns: &Netns, addr: std::net::SocketAddr) -> Result<String> {
    ns.block_on(move || async move {
        use std::io::Read;
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))
            .with_context(|| format!("connect {addr}"))?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok::<_, anyhow::Error>(out.trim().to_string())
    })?
}

/// A Service manifest: `extra_spec` is indented spec lines (e.g. `"  clusterIP: 10.96.100.1\n"`).
pub fn service_yaml(name: &str, extra_spec: &str, port_name: &str, port: u16, target: u16, proto: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n{extra_spec}  ports: [{{name: {port_name}, port: {port}, targetPort: {target}, protocol: {proto}}}]\n---\n"
    )
}

/// An Endpoints manifest naming `pods` (each with its node) on one port.
pub fn endpoints_yaml(name: &str, pods: &[&Pod], port_name: &str, port: u16, proto: &str) -> String {
    let addrs: Vec<String> =
        pods.iter().map(|p| format!("{{ip: \"{}\", nodeName: node-{}}}", p.ip(), p.node())).collect();
    let subsets = if pods.is_empty() {
        "[]".to_string()
    } else {
        format!(
            "[{{addresses: [{}], ports: [{{name: {port_name}, port: {port}, protocol: {proto}}}]}}]",
            addrs.join(", ")
        )
    };
    format!("apiVersion: v1\nkind: Endpoints\nmetadata: {{name: {name}}}\nsubsets: {subsets}\n---\n")
}

/// `weft args…` in `ns` against the lab's etcd, `stdin` piped in; stdout, or an error with stderr.
fn run_weft(ns: &Netns, args: &[&str], stdin: Option<&str>) -> Result<String> {
    let mut cmd = ns.command(weft_binary());
    cmd.args(args).args(["--etcd-endpoints", ETCD_ENDPOINT]);
    cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().context("running weft")?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        use std::io::Write;
        pipe.write_all(text.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("weft {args:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn tail(path: &Path, lines: usize) -> String {
    tail_text(&std::fs::read_to_string(path).unwrap_or_default(), lines)
}

fn tail_text(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn log_file(path: &Path) -> Result<File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))
}

/// Starts `program args` inside `ns` in its own session with output to `log`, so it outlives us.
fn spawn_in(ns: &Netns, program: &Path, args: &[String], log: &Path, pid_file: &Path) -> Result<Child> {
    let out = log_file(log)?;
    // `ip netns exec` and `setsid` both exec in place: the child's pid is the daemon's.
    let child = ns
        .command("setsid")
        .arg(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .with_context(|| format!("starting {} in {}", program.display(), ns.name()))?;
    std::fs::write(pid_file, child.id().to_string())?;
    Ok(child)
}

/// Like `spawn_in`, but entering only the namespace's network (`nsenter --net`): `ip netns exec` also remounts
/// /sys in a mount namespace of its own, which hides the cgroup hierarchies runc needs and the mounts
/// containerd makes from everyone else.
fn spawn_net(ns: &Netns, program: &Path, args: &[String], log: &Path, pid_file: &Path) -> Result<Child> {
    let out = log_file(log)?;
    let child = Command::new("nsenter")
        .arg(format!("--net={}", ns.path().display()))
        .arg("--")
        .arg("setsid")
        .arg(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .with_context(|| format!("starting {} in {}", program.display(), ns.name()))?;
    std::fs::write(pid_file, child.id().to_string())?;
    Ok(child)
}

/// SIGTERM (or `sig`), then wait up to `grace` before SIGKILL; reaps the child.
fn stop_child(child: &mut Child, sig: i32, grace: Duration) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    // SAFETY: kill(2) on our own child, which is not yet reaped, so the pid cannot be reused.
    unsafe { libc::kill(child.id() as i32, sig) };
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Kills a daemon from a pid file written by an earlier process, if it is still the program we started.
/// Stops a daemon: the child this process started, or (a lab opened from its state) the one its pid file names.
fn stop_daemon(child: Option<Child>, pid_file: &Path, what: &str, sig: i32, grace: Duration) {
    match child {
        Some(mut child) => stop_child(&mut child, sig, grace),
        None => kill_pid_file(pid_file, what),
    }
}

fn kill_pid_file(pid_file: &Path, expect: &str) {
    let Some(pid) = std::fs::read_to_string(pid_file).ok().and_then(|s| s.trim().parse::<i32>().ok()) else {
        return;
    };
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    if pid > 1 && String::from_utf8_lossy(&cmdline).contains(expect) {
        // SAFETY: kill(2) on a pid whose command line we just checked.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// Removes every trace of lab `id`: its processes, its `weft-<id>-*` namespaces and its state dir.
/// Safe on a lab that is partly or wholly gone.
pub fn teardown(id: &str) -> Result<()> {
    check_id(id)?;
    let dir = lab_dir(id);
    let prefix = ns_prefix(id);
    let names: Vec<String> = netns_list().into_iter().filter(|n| n.starts_with(&prefix)).collect();
    // Everything dies before any namespace goes: a process in a deleted namespace would be unreachable.
    // Nodes and pods first, so agents do not spend their last breath on a vanished etcd.
    // Kubelets and the controller go first, so nothing recreates what is being removed; then the containers
    // (by the lab's cgroup subtree: they live in pod namespaces no `ip netns` lists).
    kill_pid_file(&dir.join("controller.pid"), "controller");
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries.flatten() {
            kill_pid_file(&e.path().join("kubelet.pid"), "kubelet");
        }
    }
    let subtree = cluster::cgroup_subtree(id);
    cluster::kill_cgroup(&subtree, Duration::from_secs(10));
    let (fabric, others): (Vec<&String>, Vec<&String>) = names.iter().partition(|n| n.ends_with("-fabric"));
    for n in others.iter().chain(fabric.iter()) {
        Netns::attach(n).kill_all();
    }
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries.flatten() {
            kill_pid_file(&e.path().join("agent.pid"), "agent");
            kill_pid_file(&e.path().join("proxy.pid"), "proxy");
            kill_pid_file(&e.path().join("dns.pid"), "dns");
            kill_pid_file(&e.path().join("containerd.pid"), "containerd");
        }
    }
    kill_pid_file(&dir.join("etcd.pid"), "etcd");
    cluster::kill_cgroup(&subtree, Duration::from_secs(5));
    // Sandboxes' namespaces, container root filesystems and shm mounts under containerd's state.
    let mounts = cluster::unmount_under(&dir);
    // A killed container can take a moment to leave its cgroup (its shim reaps it first).
    let mut cgroups = cluster::remove_cgroup(&subtree);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cgroups.is_empty() && Instant::now() < deadline {
        cluster::kill_cgroup(&subtree, Duration::from_secs(1));
        std::thread::sleep(Duration::from_millis(100));
        cgroups = cluster::remove_cgroup(&subtree);
    }
    for n in &names {
        let _ = Command::new("ip").args(["netns", "del", n]).output();
        let _ = std::fs::remove_dir_all(netns_etc(n));
    }
    if !mounts.is_empty() {
        bail!("mounts left after teardown of lab {id}: {mounts:?}");
    }
    if !cgroups.is_empty() {
        bail!("cgroups left after teardown of lab {id}: {cgroups:?}");
    }
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    let left: Vec<String> = netns_list().into_iter().filter(|n| n.starts_with(&prefix)).collect();
    if !left.is_empty() {
        bail!("namespaces left after teardown of lab {id}: {left:?}");
    }
    Ok(())
}

/// `/etc/netns/<ns>`: files there are bind-mounted over `/etc` by `ip netns exec` (resolv.conf for pods).
pub fn netns_etc(ns: &str) -> PathBuf {
    Path::new("/etc/netns").join(ns)
}

/// A pod's resolv.conf as the kubelet writes it for `dnsPolicy: ClusterFirst`.
pub fn pod_resolv_conf(namespace: &str) -> String {
    format!(
        "search {namespace}.svc.cluster.local svc.cluster.local cluster.local\nnameserver {CLUSTER_DNS}\noptions ndots:5\n"
    )
}

fn write_resolv_conf(ns: &str, namespace: &str) -> Result<()> {
    let dir = netns_etc(ns);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(dir.join("resolv.conf"), pod_resolv_conf(namespace))?;
    Ok(())
}

/// Runs `weft-cni` in `node`'s namespace as a runtime would; returns (exit code, stdout).
pub fn run_cni(
    lab_dir: &Path,
    node: &Node,
    command: &str,
    container_id: &str,
    netns: Option<&Path>,
) -> Result<(i32, String)> {
    let conf = std::fs::read(node.cni_conf_path())?;
    let bin = lab_dir.join("cni-bin");
    let mut c = node.ns.command(bin.join("weft-cni"));
    c.env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container_id)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", &bin)
        .env_remove("CNI_ARGS")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    match netns {
        Some(p) => c.env("CNI_NETNS", p),
        None => c.env_remove("CNI_NETNS"),
    };
    let mut child = c.spawn().context("running weft-cni")?;
    if let Some(mut stdin) = child.stdin.take() {
        use std::io::Write;
        stdin.write_all(&conf)?;
    }
    let out = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.stderr.is_empty() {
        let log = node.dir.join("cni.log");
        let _ = std::io::Write::write_all(&mut log_file(&log)?, &out.stderr);
    }
    Ok((out.status.code().unwrap_or(-1), stdout))
}

impl Lab {
    /// Everything the containers of pod `pod` (namespace default) wrote, from the CRI log files under node
    /// `node`'s kubelet root: what `weft logs` would show, read without the kubelet.
    pub fn pod_logs(&self, node: usize, pod: &str) -> String {
        let mut out = String::new();
        let dir = self.node(node).kubelet_root().join("pods");
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if !e.file_name().to_string_lossy().starts_with(&format!("default_{pod}_")) {
                continue;
            }
            for c in std::fs::read_dir(e.path()).into_iter().flatten().flatten() {
                for f in std::fs::read_dir(c.path()).into_iter().flatten().flatten() {
                    out.push_str(&std::fs::read_to_string(f.path()).unwrap_or_default());
                }
            }
        }
        out
    }

    /// Builds the lab step by step, reporting each step; on any failure everything built is removed.
    pub fn up(opts: LabOptions, progress: &mut dyn FnMut(&str)) -> Result<Lab> {
        let id = opts.id.clone().unwrap_or_else(crate::unique_id);
        check_id(&id)?;
        if !(1..=200).contains(&opts.nodes) {
            bail!("a lab has 1 to 200 nodes, not {}", opts.nodes);
        }
        let dir = lab_dir(&id);
        let prefix = ns_prefix(&id);
        if dir.exists() || netns_list().iter().any(|n| n.starts_with(&prefix)) {
            bail!("lab {id} already exists (remove it with `weft lab down --name {id}`)");
        }
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let state = LabState {
            id: id.clone(),
            nodes: opts.nodes,
            network: opts.network.clone(),
            backend: opts.backend.clone(),
            etcd: ETCD_ENDPOINT.into(),
            dns: opts.dns,
            kubelet: opts.kubelet,
        };
        // From here on, an early return drops `lab`, and its Drop removes what was built.
        let mut lab = Lab {
            state,
            fabric: Netns::attach(&format!("{prefix}fabric")),
            dir,
            nodes: Vec::new(),
            etcd: None,
            dns: None,
            controller: None,
            rt: None,
            keep: false,
        };
        std::fs::write(lab.dir.join("state.json"), serde_json::to_vec_pretty(&lab.state)?)?;
        lab.build(&opts, progress)?;
        Ok(lab)
    }

    fn build(&mut self, opts: &LabOptions, progress: &mut dyn FnMut(&str)) -> Result<()> {
        let id = self.state.id.clone();
        progress(&format!("fabric: namespace {} with br0 {FABRIC_IP}/24", self.fabric.name()));
        Netns::create_named(self.fabric.name())?.persist();
        self.fabric.ip(&["link", "add", "br0", "type", "bridge"])?;
        self.fabric.ip(&["addr", "add", &format!("{FABRIC_IP}/24"), "dev", "br0"])?;
        self.fabric.ip(&["link", "set", "br0", "up"])?;

        progress(&format!("etcd: {ETCD_ENDPOINT} (data in {})", self.dir.join("etcd").display()));
        self.start_etcd()?;
        self.rt = Some(self.fabric.runtime()?);
        let config = serde_json::json!({"Network": opts.network, "Backend": {"Type": opts.backend}}).to_string();
        progress(&format!("etcd: {NETWORK_CONFIG_KEY} = {config}"));
        self.etcd(move |mut c| async move {
            c.put(NETWORK_CONFIG_KEY, config, None).await?;
            Ok(())
        })?;

        let bin_dir = self.dir.join("cni-bin");
        std::fs::create_dir_all(&bin_dir)?;
        std::os::unix::fs::symlink(weft_binary(), bin_dir.join("weft-cni"))?;
        let plugins = crate::bins::cni_bin_dir(opts.cni_bin_dir.as_deref())?;
        progress(&format!("cni: weft-cni and the plugins of {} linked in {}", plugins.display(), bin_dir.display()));
        for plugin in crate::bins::CNI_PLUGINS {
            std::os::unix::fs::symlink(plugins.join(plugin), bin_dir.join(plugin))?;
        }
        // containerd's CRI brings up each sandbox's `lo` with the reference `loopback` plugin.
        if opts.kubelet {
            let lo = plugins.join("loopback");
            if !lo.exists() {
                bail!("{} lacks the CNI plugin `loopback` that containerd's CRI needs", plugins.display());
            }
            std::os::unix::fs::symlink(lo, bin_dir.join("loopback"))?;
        }
        for i in 1..=opts.nodes {
            let node = self.make_node(&id, i)?;
            progress(&format!("{}: namespace {} eth0 {}/24", node.name, node.ns.name(), node.ip));
            self.nodes.push(node);
        }
        if opts.start_agents {
            for i in 1..=opts.nodes {
                progress(&format!("node-{i}: weft agent (log {})", self.node(i).agent_log_path().display()));
                self.start_agent(i, &opts.agent_args)?;
            }
            for i in 1..=opts.nodes {
                self.wait_for_subnet(i, Duration::from_secs(60))?;
                let env = std::fs::read_to_string(self.node(i).subnet_env_path()).unwrap_or_default();
                let subnet = env.lines().find_map(|l| l.strip_prefix("FLANNEL_SUBNET=")).unwrap_or("?").to_string();
                progress(&format!("node-{i}: subnet {subnet}"));
            }
        }
        if let Some(mode) = &opts.proxy_mode {
            for i in 1..=opts.nodes {
                progress(&format!(
                    "node-{i}: weft proxy --proxy-mode {mode} (log {})",
                    self.node(i).proxy_log_path().display()
                ));
                self.start_proxy(i, mode, &[])?;
            }
        }
        if opts.dns {
            progress(&format!(
                "node-{DNS_NODE}: weft dns on :53 behind kube-system/kube-dns {CLUSTER_DNS} (log {})",
                self.dns_log_path().display()
            ));
            self.start_dns()?;
        }
        if opts.kubelet {
            if !opts.start_agents {
                bail!("the kubelets need the agents (their subnet files give the nodes' pod CIDRs)");
            }
            self.start_cluster(opts, progress)?;
        }
        Ok(())
    }

    /// `<lab>/pki`: the cluster CA, the kubelets' serving certificates and the admin client certificate.
    pub fn pki(&self) -> Pki {
        Pki::at(&self.dir.join("pki"))
    }

    pub fn controller_log_path(&self) -> PathBuf {
        self.dir.join("controller.log")
    }

    /// The PKI, the controller, then every node's containerd (images imported) and kubelet; waits for every
    /// Node to be Ready.
    fn start_cluster(&mut self, opts: &LabOptions, progress: &mut dyn FnMut(&str)) -> Result<()> {
        let pki = self.pki();
        progress(&format!(
            "pki: cluster CA, kubelet serving certificates and an admin client certificate in {}",
            pki.dir().display()
        ));
        let nodes: Vec<(String, Ipv4Addr)> = self.nodes.iter().map(|n| (n.name.clone(), n.ip)).collect();
        pki.create(&self.state.id, &nodes)?;
        progress(&format!("fabric: weft controller (log {})", self.controller_log_path().display()));
        self.start_controller(&opts.controller_args)?;
        let images = crate::containerd::images_dir().context("building weft's local images (scripts/images.sh)")?;
        for i in 1..=self.nodes.len() {
            progress(&format!(
                "node-{i}: containerd in {} (log {})",
                self.node(i).containerd_dir().display(),
                self.node(i).containerd_log_path().display()
            ));
            self.start_containerd(i)?;
            self.import_images(i, &[images.join("pause.tar"), images.join("busybox.tar")])?;
        }
        for i in 1..=self.nodes.len() {
            progress(&format!("node-{i}: weft kubelet (log {})", self.node(i).kubelet_log_path().display()));
            self.start_kubelet(i, &opts.kubelet_args)?;
        }
        let n = self.nodes.len();
        let mut ready = 0;
        let waited = wait_until(Duration::from_secs(90), "every Node to be Ready", || {
            ready = self.ready_nodes().len();
            ready == n
        });
        if let Err(e) = waited {
            let logs: Vec<String> =
                (1..=n).map(|i| format!("node-{i} kubelet:\n{}", tail(&self.node(i).kubelet_log_path(), 8))).collect();
            bail!("{e} ({ready} of {n} Ready)\n{}", logs.join("\n"));
        }
        progress(&format!("{n} nodes Ready"));
        // The controller's /healthz at its default address, unless the caller moved it.
        if !opts.controller_args.iter().any(|a| a.starts_with("--healthz-bind-address")) {
            let fabric = Netns::attach(self.fabric.name());
            let log = self.controller_log_path();
            wait_until(Duration::from_secs(30), "weft controller's /healthz", || {
                fabric.exec("curl", &["-sf", "http://127.0.0.1:10257/healthz"]).is_ok()
            })
            .with_context(|| tail(&log, 10))?;
        }
        Ok(())
    }

    /// Names of the Nodes whose Ready condition is True.
    pub fn ready_nodes(&self) -> Vec<String> {
        let Ok(out) = self.weft(&["get", "nodes", "-o", "json"], None) else {
            return Vec::new();
        };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&out) else {
            return Vec::new();
        };
        let items = match v.get("items").and_then(|i| i.as_array()) {
            Some(items) => items.clone(),
            None => vec![v],
        };
        items
            .iter()
            .filter(|n| {
                n.pointer("/status/conditions")
                    .and_then(|c| c.as_array())
                    .is_some_and(|c| c.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"))
            })
            .filter_map(|n| n.pointer("/metadata/name").and_then(|s| s.as_str()).map(String::from))
            .collect()
    }

    /// Starts `weft controller` in the fabric against the lab's etcd.
    pub fn start_controller(&mut self, extra_args: &[String]) -> Result<()> {
        if let Some(c) = self.controller.as_mut() {
            if c.try_wait()?.is_none() {
                bail!("the controller is already running");
            }
        }
        let mut args: Vec<String> = vec!["controller".into(), "--etcd-endpoints".into(), ETCD_ENDPOINT.into()];
        args.extend(extra_args.iter().cloned());
        let log = self.controller_log_path();
        let child = spawn_in(&self.fabric, &weft_binary(), &args, &log, &self.dir.join("controller.pid"))?;
        self.controller = Some(child);
        Ok(())
    }

    /// Writes node `i`'s containerd config (with the kubelet crate's writer, `weft containerd-config`: sandbox
    /// image weft.local/pause:1, CNI conf dir the node's `cni/`, plugins the lab's `cni-bin`), starts
    /// containerd in the node's network namespace under the lab's cgroup subtree, and waits for its socket.
    pub fn start_containerd(&mut self, i: usize) -> Result<()> {
        let bin = weft_binary();
        let id = self.state.id.clone();
        let cni_bin = self.dir.join("cni-bin");
        let containerd = crate::bins::find("containerd", "WEFT_CONTAINERD_BIN")?;
        let node = self.node_mut(i)?;
        let dir = node.containerd_dir();
        std::fs::create_dir_all(&dir)?;
        let config = dir.join("config.toml");
        crate::netns::run(
            Command::new(&bin)
                .args(["containerd-config", "--dir"])
                .arg(&dir)
                .arg("--cni-conf-dir")
                .arg(node.dir.join("cni"))
                .arg("--cni-bin-dir")
                .arg(&cni_bin)
                .arg("-o")
                .arg(&config),
        )?;
        let mut text = std::fs::read_to_string(&config)?;
        text.push_str(&cluster::containerd_cgroup_section(&cluster::containerd_cgroup(&id, &node.name)));
        std::fs::write(&config, text)?;
        let args = vec!["--config".to_string(), config.to_string_lossy().into_owned()];
        let mut child =
            spawn_net(&node.ns, &containerd, &args, &node.containerd_log_path(), &node.containerd_pid_path())?;
        let socket = node.containerd_socket();
        let log = node.containerd_log_path();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait()? {
                bail!("containerd on {} exited ({status}):\n{}", node.name, tail(&log, 10));
            }
            let ok = Command::new("ctr")
                .arg("--address")
                .arg(&socket)
                .arg("version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("containerd on {} not ready within 30s:\n{}", node.name, tail(&log, 10));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        node.containerd = Some(child);
        Ok(())
    }

    /// `weft image import` of `tarballs` into node `i`'s containerd.
    pub fn import_images(&self, i: usize, tarballs: &[PathBuf]) -> Result<()> {
        let node = self.node(i);
        crate::netns::run(
            Command::new(weft_binary())
                .args(["image", "import", "--address"])
                .arg(node.containerd_socket())
                .args(tarballs),
        )?;
        Ok(())
    }

    /// Starts `weft kubelet` on node `i`: its own containerd, its address, its subnet file, the cluster DNS, pods
    /// under the lab's cgroup subtree; the serving certificate when this kubelet takes the TLS flags.
    pub fn start_kubelet(&mut self, i: usize, extra_args: &[String]) -> Result<()> {
        let bin = weft_binary();
        let id = self.state.id.clone();
        let pki = self.pki();
        let tls_flags = ["--tls-cert-file", "--tls-private-key-file", "--client-ca-file"];
        let tls_ok = cluster::accepts_flags(&cluster::kubelet_help(&bin), &tls_flags);
        let node = self.node_mut(i)?;
        if let Some(child) = node.kubelet.as_mut() {
            if child.try_wait()?.is_none() {
                bail!("the kubelet on {} is already running", node.name);
            }
        }
        let resolv = node.dir.join("resolv.conf");
        // Pods with dnsPolicy Default get the node's resolver: the fabric, where nothing answers (no way out).
        std::fs::write(&resolv, format!("nameserver {FABRIC_IP}\n"))?;
        let serving = pki.kubelet(&node.name);
        let setup = KubeletSetup {
            etcd: ETCD_ENDPOINT.into(),
            node: node.name.clone(),
            ip: node.ip,
            socket: node.containerd_socket(),
            cgroup_parent: cluster::pods_cgroup(&id, &node.name),
            root_dir: node.kubelet_root(),
            subnet_file: node.subnet_env_path(),
            resolv_conf: resolv,
            cluster_dns: CLUSTER_DNS,
            tls: (tls_ok && serving.cert.exists()).then(|| (serving.cert, serving.key, pki.ca().cert)),
        };
        let args = cluster::kubelet_args(&setup, extra_args);
        let child = spawn_net(&node.ns, &bin, &args, &node.kubelet_log_path(), &node.kubelet_pid_path())?;
        node.kubelet = Some(child);
        Ok(())
    }

    /// SIGTERM node `i`'s kubelet and wait for it to exit (its containers keep running in containerd).
    pub fn stop_kubelet(&mut self, i: usize) -> Result<()> {
        let node = self.node_mut(i)?;
        stop_daemon(node.kubelet.take(), &node.kubelet_pid_path(), "kubelet", libc::SIGTERM, Duration::from_secs(10));
        Ok(())
    }

    pub fn dns_log_path(&self) -> PathBuf {
        self.node(DNS_NODE).dir.join("dns.log")
    }

    /// Starts `weft dns` on node-1 (all addresses, port 53) and publishes it as the selector-less Service
    /// `kube-system/kube-dns` at 10.96.0.10 with Endpoints naming node-1's address. Names outside the
    /// cluster are forwarded to the fabric, where nothing answers: the lab has no way out.
    pub fn start_dns(&mut self) -> Result<()> {
        let bin = weft_binary();
        let log = self.dns_log_path();
        let node = self.node(DNS_NODE);
        let args: Vec<String> = [
            "dns",
            "--etcd-endpoints",
            ETCD_ENDPOINT,
            "--listen",
            "0.0.0.0:53",
            "--upstream",
            &FABRIC_IP.to_string(),
            "--cluster-cidr",
            &self.state.network,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let child = spawn_in(&node.ns, &bin, &args, &log, &node.dir.join("dns.pid"))?;
        self.dns = Some(child);
        let manifest = format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: kube-system}}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {{name: kube-dns, namespace: kube-system}}\n\
             spec:\n  clusterIP: {CLUSTER_DNS}\n  ports: [{{name: dns, port: 53, protocol: UDP}}, {{name: dns-tcp, port: 53, protocol: TCP}}]\n---\n\
             apiVersion: v1\nkind: Endpoints\nmetadata: {{name: kube-dns, namespace: kube-system}}\n\
             subsets: [{{addresses: [{{ip: \"{}\"}}], ports: [{{name: dns, port: 53, protocol: UDP}}, {{name: dns-tcp, port: 53, protocol: TCP}}]}}]\n",
            self.node(DNS_NODE).ip
        );
        self.weft(&["apply", "-f", "-"], Some(&manifest))?;
        let node_ns = Netns::attach(self.node(DNS_NODE).ns.name());
        let mut last = String::new();
        let ready = wait_until(Duration::from_secs(30), "weft dns to sync", || {
            match node_ns.exec("curl", &["-sf", "http://127.0.0.1:8080/healthz"]) {
                Ok(_) => true,
                Err(e) => {
                    last = e.to_string();
                    false
                }
            }
        });
        ready.with_context(|| format!("{last}\n{}", tail(&log, 15)))
    }

    /// Runs `weft args…` (this lab's binary) in the fabric against the lab's etcd, `stdin` piped in.
    pub fn weft(&self, args: &[&str], stdin: Option<&str>) -> Result<String> {
        run_weft(&self.fabric, args, stdin)
    }

    /// `weft args…` on node `i` (for the commands that ask the node's own daemons, e.g. `weft services`).
    pub fn weft_on(&self, i: usize, args: &[&str], stdin: Option<&str>) -> Result<String> {
        run_weft(self.node(i).ns(), args, stdin)
    }

    /// Stops the lab's etcd (SIGKILL, as a crash or partition would), keeping its data.
    pub fn stop_etcd(&mut self) -> Result<()> {
        stop_daemon(self.etcd.take(), &self.dir.join("etcd.pid"), "etcd", libc::SIGKILL, Duration::from_secs(5));
        Ok(())
    }

    /// Starts the lab's etcd on its data dir and waits until it is healthy.
    pub fn start_etcd(&mut self) -> Result<()> {
        let data = self.dir.join("etcd");
        let mut cmd = crate::etcd::etcd_command(&data, "lab", &format!("{FABRIC_IP}:2379"), "127.0.0.1:2380")?;
        // The last --listen-client-urls wins: the fabric address for nodes, loopback for the lab's client.
        cmd.arg(format!("--listen-client-urls=http://{FABRIC_IP}:2379,http://127.0.0.1:2379"));
        let args: Vec<String> = cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        let log = self.dir.join("etcd.log");
        let program = PathBuf::from(cmd.get_program());
        self.etcd = Some(spawn_in(&self.fabric, &program, &args, &log, &self.dir.join("etcd.pid"))?);
        let fabric = Netns::attach(self.fabric.name());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(Ok(Some(status))) = self.etcd.as_mut().map(Child::try_wait) {
                bail!("etcd exited ({status}):\n{}", tail(&log, 10));
            }
            if fabric.block_on(|| async { crate::etcd::health("127.0.0.1:2379") })? {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("etcd not healthy within 30s:\n{}", tail(&log, 10));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn make_node(&self, id: &str, i: usize) -> Result<Node> {
        let name = format!("node-{i}");
        let ns_name = format!("{}{name}", ns_prefix(id));
        let ip = Ipv4Addr::new(192, 168, 56, 10 + u8::try_from(i).context("node index")?);
        let dir = self.dir.join(&name);
        std::fs::create_dir_all(dir.join("cni"))?;
        std::fs::create_dir_all(dir.join("pods"))?;
        Netns::create_named(&ns_name)?.persist();
        let ns = Netns::attach(&ns_name);
        let veth = format!("node{i}");
        // Created inside the fabric, so not even a transient link appears in the host namespace.
        self.fabric.ip(&["link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns_name])?;
        self.fabric.ip(&["link", "set", &veth, "master", "br0", "up"])?;
        ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        ns.ip(&["route", "add", "default", "via", &FABRIC_IP.to_string()])?;
        ns.sysctl("net.ipv4.ip_forward", "1")?;
        let node = Node { index: i, name, ns, ip, dir, agent: None, proxy: None, containerd: None, kubelet: None };
        let conf = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "weft",
            "type": "weft-cni",
            "subnetFile": node.subnet_env_path(),
            "dataDir": node.dir.join("cni/data"),
            // As kube-flannel deploys it: pods get a default route through cni0.
            "delegate": { "hairpinMode": true, "isDefaultGateway": true },
        });
        std::fs::write(node.cni_conf_path(), serde_json::to_vec_pretty(&conf)?)?;
        Ok(node)
    }

    /// Attaches to a lab a (possibly earlier) process left running; dropping it leaves the lab alone.
    pub fn open(id: &str) -> Result<Lab> {
        check_id(id)?;
        let dir = lab_dir(id);
        let state: LabState = serde_json::from_slice(
            &std::fs::read(dir.join("state.json")).with_context(|| format!("lab {id} not found under {LAB_ROOT}"))?,
        )
        .with_context(|| format!("reading {}/state.json", dir.display()))?;
        let prefix = ns_prefix(id);
        let nodes = (1..=state.nodes)
            .map(|i| Node {
                index: i,
                name: format!("node-{i}"),
                ns: Netns::attach(&format!("{prefix}node-{i}")),
                ip: Ipv4Addr::new(192, 168, 56, 10 + i as u8),
                dir: dir.join(format!("node-{i}")),
                agent: None,
                proxy: None,
                containerd: None,
                kubelet: None,
            })
            .collect();
        Ok(Lab {
            fabric: Netns::attach(&format!("{prefix}fabric")),
            state,
            dir,
            nodes,
            etcd: None,
            dns: None,
            controller: None,
            rt: None,
            keep: true,
        })
    }

    pub fn id(&self) -> &str {
        &self.state.id
    }
    pub fn state(&self) -> &LabState {
        &self.state
    }
    /// `/run/weft/lab/<id>`
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    /// `http://192.168.56.10:2379`, reachable from every node.
    pub fn etcd_endpoint(&self) -> &str {
        &self.state.etcd
    }
    pub fn fabric(&self) -> &Netns {
        &self.fabric
    }
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// Node `i`, 1-based. Panics on an index the lab does not have (a test's own mistake).
    pub fn node(&self, i: usize) -> &Node {
        assert!(i >= 1 && i <= self.nodes.len(), "lab {} has nodes 1..={}, not {i}", self.id(), self.nodes.len());
        &self.nodes[i - 1]
    }

    fn node_mut(&mut self, i: usize) -> Result<&mut Node> {
        let n = self.nodes.len();
        self.nodes.get_mut(i.wrapping_sub(1)).ok_or_else(|| anyhow!("lab has nodes 1..={n}, not {i}"))
    }

    /// Runs `f` with an etcd client connected from inside the fabric.
    pub fn etcd<F, Fut, T>(&self, f: F) -> Result<T>
    where
        F: FnOnce(etcd_client::Client) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<T>> + Send + 'static,
        T: Send + 'static,
    {
        let fut = async move {
            let client = etcd_client::Client::connect(["http://127.0.0.1:2379"], None).await?;
            f(client).await
        };
        match &self.rt {
            Some(rt) => rt.block_on(fut)?,
            None => self.fabric.runtime()?.block_on(fut)?,
        }
    }

    /// The service conformance table's pods: `client` on node 1, and servers s1 (node 1), s2 and s3 (node 2), each
    /// answering its name on 9376/TCP and 9377/UDP and echoing on 7000/TCP (socat).
    pub fn add_service_table_pods(&self) -> Result<(Pod, std::collections::BTreeMap<String, Pod>)> {
        let client = self.add_pod(1, "client")?;
        let mut servers = std::collections::BTreeMap::new();
        for (name, node) in [("s1", 1), ("s2", 2), ("s3", 2)] {
            let pod = self.add_pod(node, name)?;
            for args in [
                vec!["TCP-LISTEN:9376,reuseaddr,fork".to_string(), format!("SYSTEM:echo {name}")],
                // It reads the datagram first: an echo exiting before socat writes to it loses the reply.
                vec!["UDP-RECVFROM:9377,fork".to_string(), format!("SYSTEM:read x; echo {name}")],
                vec!["TCP-LISTEN:7000,reuseaddr,fork".to_string(), "EXEC:cat".to_string()],
            ] {
                pod.ns()
                    .command("socat")
                    .args(&args)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()?;
            }
            servers.insert(name.to_string(), pod);
        }
        Ok((client, servers))
    }

    /// The service table's bad-input row: garbage where a Service should be (`BAD_SERVICE_KEY`), and an Endpoints
    /// object (`BAD_ENDPOINTS_KEY`) with `BAD_ADDRESS` beside the good address `good`, written straight into etcd
    /// as no API server would store them. Readers skip both whole (issue 10), with a warning naming each.
    pub fn write_bad_service_input(&self, good: Ipv4Addr) -> Result<()> {
        let endpoints = format!(
            r#"{{"apiVersion":"v1","kind":"Endpoints","metadata":{{"name":"halfbad","namespace":"default"}},"subsets":[{{"addresses":[{{"ip":"{BAD_ADDRESS}"}},{{"ip":"{good}","nodeName":"node-1"}}],"ports":[{{"name":"http","port":9376,"protocol":"TCP"}}]}}]}}"#
        );
        self.etcd(move |mut c| async move {
            c.put(BAD_SERVICE_KEY, "{not json", None).await?;
            c.put(BAD_ENDPOINTS_KEY, endpoints, None).await?;
            Ok(())
        })
    }

    pub fn delete_bad_service_input(&self) -> Result<()> {
        self.etcd(|mut c| async move {
            c.delete(BAD_SERVICE_KEY, None).await?;
            c.delete(BAD_ENDPOINTS_KEY, None).await?;
            Ok(())
        })
    }

    /// Ok once node `i`'s proxy log names the bad Service's key and the bad address.
    pub fn proxy_warned_of_bad_input(&self, i: usize) -> Result<()> {
        let log = std::fs::read_to_string(self.node(i).proxy_log_path())?;
        if log.contains(BAD_ADDRESS) && log.contains(BAD_SERVICE_KEY) {
            return Ok(());
        }
        bail!("node-{i}'s proxy log does not name both {BAD_SERVICE_KEY} and {BAD_ADDRESS}:\n{}", tail_text(&log, 15))
    }

    /// Starts `weft agent` on node `i` against the lab's etcd, writing the node's subnet.env.
    pub fn start_agent(&mut self, i: usize, extra_args: &[String]) -> Result<()> {
        let bin = weft_binary();
        let node = self.node_mut(i)?;
        if let Some(child) = node.agent.as_mut() {
            if child.try_wait()?.is_none() {
                bail!("the agent on {} is already running", node.name);
            }
        }
        let mut args: Vec<String> =
            ["agent", "--etcd-endpoints", ETCD_ENDPOINT, "--subnet-file"].iter().map(|s| s.to_string()).collect();
        args.push(node.subnet_env_path().to_string_lossy().into_owned());
        args.extend(["--healthz-addr".to_string(), "127.0.0.1:8285".to_string()]);
        // As kube-flannel runs flanneld: the agent masquerades traffic leaving the pod network, so the
        // bridge plugin does not, and pod-to-pod traffic keeps its source address across nodes.
        if !extra_args.iter().any(|a| a == "--ip-masq") {
            args.push("--ip-masq".to_string());
        }
        args.extend(extra_args.iter().cloned());
        let child = spawn_in(&node.ns, &bin, &args, &node.agent_log_path(), &node.agent_pid_path())?;
        node.agent = Some(child);
        Ok(())
    }

    /// Starts `weft proxy --proxy-mode <mode>` on node `i` against the lab's etcd (node name `node-<i>`,
    /// cluster CIDR the lab's network), logging to the node's proxy.log.
    pub fn start_proxy(&mut self, i: usize, mode: &str, extra_args: &[String]) -> Result<()> {
        let bin = weft_binary();
        let network = self.state.network.clone();
        let node = self.node_mut(i)?;
        if let Some(child) = node.proxy.as_mut() {
            if child.try_wait()?.is_none() {
                bail!("the proxy on {} is already running", node.name);
            }
        }
        let mut args: Vec<String> = vec![
            "proxy".into(),
            "--proxy-mode".into(),
            mode.into(),
            "--etcd-endpoints".into(),
            ETCD_ENDPOINT.into(),
            "--hostname-override".into(),
            node.name.clone(),
            "--cluster-cidr".into(),
            network,
        ];
        args.extend(extra_args.iter().cloned());
        let child = spawn_in(&node.ns, &bin, &args, &node.proxy_log_path(), &node.proxy_pid_path())?;
        node.proxy = Some(child);
        Ok(())
    }

    /// SIGTERM the proxy and wait for it to exit (its rules stay in the kernel).
    pub fn stop_proxy(&mut self, i: usize) -> Result<()> {
        let node = self.node_mut(i)?;
        stop_daemon(node.proxy.take(), &node.proxy_pid_path(), "proxy", libc::SIGTERM, Duration::from_secs(10));
        Ok(())
    }

    /// SIGTERM and wait for it to exit (SIGKILL after 10 s).
    pub fn stop_agent(&mut self, i: usize) -> Result<()> {
        let node = self.node_mut(i)?;
        stop_daemon(node.agent.take(), &node.agent_pid_path(), "agent", libc::SIGTERM, Duration::from_secs(10));
        Ok(())
    }

    /// SIGKILL, as a crash would.
    pub fn kill_agent(&mut self, i: usize) -> Result<()> {
        let node = self.node_mut(i)?;
        stop_daemon(node.agent.take(), &node.agent_pid_path(), "agent", libc::SIGKILL, Duration::from_secs(5));
        Ok(())
    }

    pub fn agent_running(&mut self, i: usize) -> bool {
        match self.node_mut(i) {
            Ok(node) => match node.agent.as_mut() {
                Some(child) => matches!(child.try_wait(), Ok(None)),
                None => agent_alive(&node.agent_pid_path()),
            },
            Err(_) => false,
        }
    }

    /// Waits until node `i` has a subnet file, failing early (with its log) if its agent died.
    pub fn wait_for_subnet(&mut self, i: usize, timeout: Duration) -> Result<()> {
        let path = self.node(i).subnet_env_path();
        let log = self.node(i).agent_log_path();
        let deadline = Instant::now() + timeout;
        while !path.exists() {
            if !self.agent_running(i) {
                bail!("the agent on node-{i} is not running; its log:\n{}", tail(&log, 15));
            }
            if Instant::now() > deadline {
                bail!("node-{i} wrote no {} within {timeout:?}; agent log:\n{}", path.display(), tail(&log, 15));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// Creates namespace `weft-<id>-node-<i>-<name>` and wires it with `weft-cni ADD` on node `i`.
    pub fn add_pod(&self, node: usize, name: &str) -> Result<Pod> {
        check_pod_name(name)?;
        if node == 0 || node > self.nodes.len() {
            bail!("lab {} has nodes 1..={}, not {node}", self.id(), self.nodes.len());
        }
        let n = self.node(node);
        let ns_name = format!("{}-{name}", n.ns.name());
        Netns::create_named(&ns_name)?.persist();
        let ns = Netns::attach(&ns_name);
        if self.state.dns {
            write_resolv_conf(&ns_name, "default")?;
        }
        let added = run_cni(&self.dir, n, "ADD", name, Some(&ns.path())).and_then(|(code, out)| {
            let v: serde_json::Value =
                serde_json::from_str(&out).with_context(|| format!("weft-cni ADD printed {out:?}"))?;
            if code != 0 {
                bail!("weft-cni ADD for pod {name} on {} failed ({code}): {out}", n.name);
            }
            let addr = v.pointer("/ips/0/address").and_then(|a| a.as_str()).ok_or_else(|| anyhow!("no ips in {v}"))?;
            let ip: Ipv4Addr = addr.split('/').next().unwrap_or_default().parse().context("pod address")?;
            std::fs::write(n.pods_dir().join(format!("{name}.json")), out.as_bytes())?;
            Ok(ip)
        });
        match added {
            Ok(ip) => Ok(Pod { name: name.to_string(), node, ns, ip }),
            Err(e) => {
                let _ = run_cni(&self.dir, n, "DEL", name, Some(&ns.path()));
                ns.delete();
                let _ = std::fs::remove_dir_all(netns_etc(ns.name()));
                Err(e)
            }
        }
    }

    /// `weft-cni DEL`, then the pod's namespace goes.
    pub fn del_pod(&self, node: usize, name: &str) -> Result<()> {
        check_pod_name(name)?;
        if node == 0 || node > self.nodes.len() {
            bail!("lab {} has nodes 1..={}, not {node}", self.id(), self.nodes.len());
        }
        let n = self.node(node);
        let ns = Netns::attach(&format!("{}-{name}", n.ns.name()));
        let netns = ns.path();
        let (code, out) = run_cni(&self.dir, n, "DEL", name, netns.exists().then_some(netns.as_path()))?;
        if code != 0 {
            bail!("weft-cni DEL for pod {name} on {} failed ({code}): {out}", n.name);
        }
        ns.delete();
        let _ = std::fs::remove_dir_all(netns_etc(ns.name()));
        let _ = std::fs::remove_file(n.pods_dir().join(format!("{name}.json")));
        Ok(())
    }

    /// The pods on node `i` (name, address) as recorded by `add_pod`.
    pub fn pods(&self, i: usize) -> Vec<(String, String)> {
        pods_in(&self.node(i).pods_dir())
    }

    pub fn wait_until(&self, timeout: Duration, what: &str, cond: impl FnMut() -> bool) -> Result<()> {
        wait_until(timeout, what, cond)
    }

    /// Leaves everything running (for `weft lab up`); `Lab::down(id)` removes it later.
    pub fn persist(mut self) {
        self.keep = true;
        // Reap the daemons whenever they die (e.g. `Lab::down` from this same process): no zombies.
        let children = self
            .nodes
            .iter_mut()
            .flat_map(|n| [n.agent.take(), n.proxy.take(), n.kubelet.take(), n.containerd.take()])
            .flatten()
            .chain(self.controller.take())
            .chain(self.dns.take())
            .chain(self.etcd.take());
        for mut child in children {
            std::thread::spawn(move || child.wait());
        }
    }

    /// Tears down lab `id` from what is on the machine; fine if it is partly or wholly gone.
    pub fn down(id: &str) -> Result<()> {
        teardown(id)
    }

    /// Ids of the labs under `/run/weft/lab`.
    pub fn list() -> Vec<String> {
        let mut ids: Vec<String> = std::fs::read_dir(LAB_ROOT)
            .map(|d| d.flatten().filter_map(|e| e.file_name().into_string().ok()).collect())
            .unwrap_or_default();
        ids.sort();
        ids
    }
}

fn agent_alive(pid_file: &Path) -> bool {
    daemon_alive(pid_file, "agent")
}

pub(crate) fn pods_in(dir: &Path) -> Vec<(String, String)> {
    let mut pods: Vec<(String, String)> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().strip_suffix(".json")?.to_string();
                    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok()?;
                    let ip = v.pointer("/ips/0/address").and_then(|a| a.as_str()).unwrap_or("?").to_string();
                    Some((name, ip))
                })
                .collect()
        })
        .unwrap_or_default();
    pods.sort();
    pods
}

pub(crate) fn node_agent_alive(node_dir: &Path) -> bool {
    agent_alive(&node_dir.join("agent.pid"))
}

/// Whether the daemon of `pid_file` runs (its command line names `what`, and it is not a zombie).
pub(crate) fn daemon_alive(pid_file: &Path, what: &str) -> bool {
    let Some(pid) = std::fs::read_to_string(pid_file).ok().and_then(|s| s.trim().parse::<i32>().ok()) else {
        return false;
    };
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    String::from_utf8_lossy(&cmdline).contains(what) && !status.contains("State:\tZ")
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        // Our own children first, so they are reaped rather than left as zombies.
        if let Some(mut c) = self.controller.take() {
            stop_child(&mut c, libc::SIGTERM, Duration::from_secs(5));
        }
        for node in &mut self.nodes {
            for mut c in [node.kubelet.take(), node.agent.take(), node.proxy.take()].into_iter().flatten() {
                stop_child(&mut c, libc::SIGTERM, Duration::from_secs(5));
            }
        }
        // The containers die first (by the lab's cgroup subtree), then their containerd.
        cluster::kill_cgroup(&cluster::cgroup_subtree(&self.state.id), Duration::from_secs(5));
        for node in &mut self.nodes {
            if let Some(mut c) = node.containerd.take() {
                stop_child(&mut c, libc::SIGKILL, Duration::from_secs(5));
            }
        }
        if let Some(mut c) = self.dns.take() {
            stop_child(&mut c, libc::SIGTERM, Duration::from_secs(5));
        }
        self.rt = None;
        if let Some(mut c) = self.etcd.take() {
            stop_child(&mut c, libc::SIGTERM, Duration::from_secs(5));
        }
        if let Err(e) = teardown(&self.state.id) {
            eprintln!("lab {}: teardown: {e:#}", self.state.id);
        }
    }
}
