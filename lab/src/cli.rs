//! `weft lab …`: the operator's front end to the lab harness (up, status, exec, pod, down).
//! It only parses and prints; everything it does to the machine goes through `crate::lab`.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::lab::{self, Lab, LabOptions, LabState, ETCD_ENDPOINT};
use crate::pki::Pki;

#[derive(Debug, clap::Subcommand)]
pub enum LabCommand {
    /// Build a lab: fabric with etcd and weft controller, N nodes each with weft agent, proxy, containerd and
    /// weft kubelet, weft dns behind 10.96.0.10, and a PKI for the kubelets' port.
    Up {
        #[arg(long, default_value = "default")]
        name: String,
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// vxlan or host-gw
        #[arg(long, default_value = "vxlan")]
        backend: String,
        #[arg(long, default_value = "10.244.0.0/16")]
        network: String,
        /// Build the namespaces and etcd only (no `weft agent`).
        #[arg(long)]
        no_agents: bool,
        /// An extra flag for every node's `weft agent` (repeatable), e.g. --agent-arg=--resync=1
        #[arg(long = "agent-arg", allow_hyphen_values = true)]
        agent_args: Vec<String>,
        /// The `weft proxy` mode on every node ("none" for no proxy)
        #[arg(long, default_value = "iptables")]
        proxy_mode: String,
        /// Run `weft dns` behind kube-system/kube-dns (10.96.0.10) and give pods a resolv.conf using it
        /// (the default; kept for older scripts)
        #[arg(long, conflicts_with = "no_dns")]
        dns: bool,
        /// No `weft dns`
        #[arg(long)]
        no_dns: bool,
        /// No containerd, `weft kubelet` or `weft controller`: the overlay, proxy and DNS only (bare pod namespaces)
        #[arg(long)]
        no_kubelet: bool,
        /// An extra flag for every node's `weft kubelet` (repeatable), e.g. --kubelet-arg=--sync-frequency=500ms
        #[arg(long = "kubelet-arg", allow_hyphen_values = true)]
        kubelet_args: Vec<String>,
        /// An extra flag for `weft controller` (repeatable), e.g. --controller-arg=--node-eviction-rate=1
        #[arg(long = "controller-arg", allow_hyphen_values = true)]
        controller_args: Vec<String>,
        /// The reference CNI plugins' directory (bridge, host-local); default: the first of $CNI_PATH,
        /// /opt/cni/bin, /usr/lib/cni, /usr/libexec/cni that has them
        #[arg(long, env = "WEFT_CNI_BIN_DIR")]
        cni_bin_dir: Option<std::path::PathBuf>,
    },
    /// Labs on this machine: nodes, addresses, subnets, agents, pods.
    Status {
        #[arg(long)]
        name: Option<String>,
    },
    /// Run a command in `fabric`, `node-N` or `node-N-<pod>` (e.g. `weft lab exec node-1 -- weft get pods`), with
    /// the lab's etcd and its kubelet client certificate (for `weft logs`, `weft exec`) in the environment.
    Exec {
        #[arg(long, default_value = "default")]
        name: String,
        target: String,
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// Remove every trace of a lab.
    Down {
        #[arg(long, default_value = "default")]
        name: String,
    },
    /// Add or delete a pod namespace wired by weft-cni.
    Pod {
        #[arg(long, default_value = "default")]
        name: String,
        #[command(subcommand)]
        action: PodAction,
    },
}

#[derive(Debug, clap::Subcommand)]
pub enum PodAction {
    /// `pod add node-1 web`
    Add { node: String, pod: String },
    /// `pod del node-1 web`
    Del { node: String, pod: String },
}

/// Runs one `weft lab` command; the result is the process exit code.
pub fn run(cmd: LabCommand) -> Result<i32> {
    match cmd {
        LabCommand::Up {
            name,
            nodes,
            backend,
            network,
            no_agents,
            agent_args,
            proxy_mode,
            dns: _,
            no_dns,
            no_kubelet,
            kubelet_args,
            controller_args,
            cni_bin_dir,
        } => {
            let proxy_mode = (proxy_mode != "none" && !no_agents).then_some(proxy_mode);
            let opts = LabOptions {
                id: Some(name),
                nodes,
                network,
                backend,
                start_agents: !no_agents,
                agent_args,
                // The cluster DNS is reached through its Service VIP: it needs the proxy.
                dns: !no_dns && proxy_mode.is_some(),
                proxy_mode,
                cni_bin_dir,
                kubelet: !no_kubelet && !no_agents,
                kubelet_args,
                controller_args,
            };
            up(opts)
        }
        LabCommand::Status { name } => status(name.as_deref()),
        LabCommand::Exec { name, target, cmd } => exec(&name, &target, &cmd),
        LabCommand::Down { name } => {
            Lab::down(&name)?;
            println!("lab {name}: removed");
            Ok(0)
        }
        LabCommand::Pod { name, action } => {
            let lab = Lab::open(&name)?;
            match action {
                PodAction::Add { node, pod } => {
                    let p = lab.add_pod(parse_node(&node)?, &pod)?;
                    println!("pod {pod} on {node}: {} (namespace {})", p.ip(), p.ns().name());
                }
                PodAction::Del { node, pod } => {
                    lab.del_pod(parse_node(&node)?, &pod)?;
                    println!("pod {pod} on {node}: deleted");
                }
            }
            Ok(0)
        }
    }
}

/// `node-3` or `3` → 3
pub fn parse_node(s: &str) -> Result<usize> {
    s.strip_prefix("node-").unwrap_or(s).parse().with_context(|| format!("{s:?} is not node-N"))
}

/// Maps `fabric`, `node-N` and `node-N-<pod>` to a namespace of lab `id`.
pub fn target_ns(id: &str, target: &str) -> Result<String> {
    let prefix = lab::ns_prefix(id);
    if target == "fabric" {
        return Ok(format!("{prefix}fabric"));
    }
    let Some(rest) = target.strip_prefix("node-") else {
        bail!("target {target:?} is not fabric, node-N or node-N-<pod>");
    };
    let (num, pod) = match rest.split_once('-') {
        Some((n, p)) => (n, Some(p)),
        None => (rest, None),
    };
    let n: usize = num.parse().with_context(|| format!("target {target:?}: {num:?} is not a node number"))?;
    Ok(match pod {
        Some(p) if !p.is_empty() => format!("{prefix}node-{n}-{p}"),
        _ => format!("{prefix}node-{n}"),
    })
}

fn up(opts: LabOptions) -> Result<i32> {
    let (name, nodes) = (opts.id.clone().unwrap_or_default(), opts.nodes);
    let lab = Lab::up(opts, &mut |step| println!("  {step}"))?;
    println!("lab {name} is up ({nodes} nodes, state in {}). Try:", lab.dir().display());
    let flag = if name == "default" { String::new() } else { format!(" --name {name}") };
    if lab.state().kubelet {
        println!("  weft lab exec{flag} node-1 -- weft get nodes");
        println!("  weft lab exec{flag} node-1 -- weft apply -f deployment.yaml");
        println!("  weft lab exec{flag} node-1 -- weft get pods -o wide");
    }
    println!("  weft lab exec{flag} node-1 -- weft routes");
    println!("  weft lab pod{flag} add node-1 a && weft lab pod{flag} add node-2 b");
    println!("  weft lab exec{flag} node-1-a -- ping -c1 <b's address>");
    println!("  weft lab status{flag}");
    println!("  weft lab down{flag}");
    lab.persist();
    Ok(0)
}

fn status(name: Option<&str>) -> Result<i32> {
    let ids = match name {
        Some(n) => vec![n.to_string()],
        None => Lab::list(),
    };
    if ids.is_empty() {
        println!("no labs (start one with `weft lab up`)");
    }
    let namespaces = lab::netns_list();
    for id in ids {
        let dir = lab::lab_dir(&id);
        let state: LabState = match std::fs::read(dir.join("state.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
        {
            Some(s) => s,
            None => {
                println!("lab {id}: no state in {} (remove leftovers with `weft lab down --name {id}`)", dir.display());
                continue;
            }
        };
        println!(
            "lab {id}: {} nodes, network {}, backend {}, etcd {}",
            state.nodes, state.network, state.backend, state.etcd
        );
        if state.kubelet {
            let up = lab::daemon_alive(&dir.join("controller.pid"), "controller");
            println!("  fabric  192.168.56.10  etcd, weft controller {}", if up { "up" } else { "down" });
        }
        for i in 1..=state.nodes {
            let node_dir = dir.join(format!("node-{i}"));
            let ns = format!("{}node-{i}", lab::ns_prefix(&id));
            let present = if namespaces.contains(&ns) { "" } else { "  (namespace missing!)" };
            let kube = if state.kubelet {
                let up = |f: &str, what: &str| if lab::daemon_alive(&node_dir.join(f), what) { "up" } else { "down" };
                format!("  containerd {}  kubelet {}", up("containerd.pid", "containerd"), up("kubelet.pid", "kubelet"))
            } else {
                String::new()
            };
            println!(
                "  node-{i}  192.168.56.{}  subnet {}  agent {}{kube}{present}",
                10 + i,
                subnet_of(&node_dir.join("subnet.env")),
                if lab::node_agent_alive(&node_dir) { "up" } else { "down" },
            );
            for (pod, ip) in lab::pods_in(&node_dir.join("pods")) {
                println!("    pod {pod}  {ip}");
            }
        }
    }
    Ok(0)
}

fn subnet_of(path: &Path) -> String {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| t.lines().find_map(|l| l.trim().strip_prefix("FLANNEL_SUBNET=").map(str::to_string)))
        .unwrap_or_else(|| "-".into())
}

fn exec(id: &str, target: &str, cmd: &[String]) -> Result<i32> {
    let ns = target_ns(id, target)?;
    if !lab::netns_list().contains(&ns) {
        bail!("no namespace {ns} (is lab {id} up? see `weft lab status`)");
    }
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &ns]).args(cmd).env("WEFT_ETCD_ENDPOINTS", ETCD_ENDPOINT);
    // `weft logs` and `weft exec` reach the kubelets' port with the lab's admin certificate.
    let pki = Pki::at(&lab::lab_dir(id).join("pki"));
    if pki.ca().cert.exists() {
        for (var, path) in pki.client_env() {
            c.env(var, path);
        }
    }
    // On a node, `weft routes` reads that node's subnet file, not the host's /run/flannel/subnet.env.
    if let Some(node) = target.strip_prefix("node-").and_then(|r| r.split('-').next()) {
        c.env("WEFT_SUBNET_FILE", lab::lab_dir(id).join(format!("node-{node}")).join("subnet.env"));
    }
    // `weft …` inside the lab is this same binary.
    if let Some(dir) = std::env::current_exe().ok().and_then(|e| e.parent().map(Path::to_path_buf)) {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let joined = std::env::join_paths(std::iter::once(dir).chain(std::env::split_paths(&path)))?;
        c.env("PATH", joined);
    }
    let status = c.status().with_context(|| format!("running {cmd:?} in {ns}"))?;
    Ok(status.code().unwrap_or(128 + 9))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_map_to_namespaces() {
        assert_eq!(target_ns("x1", "fabric").unwrap(), "weft-x1-fabric");
        assert_eq!(target_ns("x1", "node-2").unwrap(), "weft-x1-node-2");
        assert_eq!(target_ns("x1", "node-12-web-1").unwrap(), "weft-x1-node-12-web-1");
        assert!(target_ns("x1", "host").is_err());
        assert!(target_ns("x1", "node-x").is_err());
        assert_eq!(parse_node("node-3").unwrap(), 3);
        assert_eq!(parse_node("4").unwrap(), 4);
    }

    #[test]
    fn command_line_parses() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(subcommand)]
            lab: LabCommand,
        }
        let c = Cli::try_parse_from(["lab", "exec", "node-1", "--", "ping", "-c1", "10.0.0.1"]).unwrap();
        assert!(matches!(c.lab, LabCommand::Exec { ref name, ref target, ref cmd }
            if name == "default" && target == "node-1" && cmd == &["ping", "-c1", "10.0.0.1"]));
        let c = Cli::try_parse_from(["lab", "up"]).unwrap();
        assert!(matches!(c.lab, LabCommand::Up { nodes: 3, ref backend, no_kubelet: false, no_dns: false, .. }
            if backend == "vxlan"));
        let c = Cli::try_parse_from(["lab", "up", "--dns", "--kubelet-arg=--sync-frequency=500ms"]).unwrap();
        assert!(matches!(c.lab, LabCommand::Up { dns: true, ref kubelet_args, .. }
            if kubelet_args == &["--sync-frequency=500ms"]));
        assert!(Cli::try_parse_from(["lab", "up", "--dns", "--no-dns"]).is_err());
        let c = Cli::try_parse_from(["lab", "pod", "add", "node-1", "web"]).unwrap();
        assert!(matches!(c.lab, LabCommand::Pod { action: PodAction::Add { .. }, .. }));
    }
}
