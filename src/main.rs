//! The `weft` binary: parses flags and hands over to the libraries. No logic lives here.

use clap::{Parser, Subcommand};
use weft::{daemons, exec_daemon, exit_with, init_logging, runtime};

#[derive(Parser)]
#[command(name = "weft", version, about = "A Kubernetes node data plane: overlay agent, lab and inspection tools")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    #[command(about = daemons::AGENT)]
    Agent(weft_agent::cli::AgentArgs),
    /// The pod network's config in etcd
    #[command(subcommand)]
    Network(weft_agent::cli::NetworkCommand),
    /// List every node's subnet lease from etcd
    Leases(weft_agent::cli::Common),
    /// Show this node's subnet and, for every other node, whether its route, neighbour and FDB entry are programmed
    /// (asks the local agent; the flags are for when it does not answer)
    Routes(weft_agent::cli::RoutesArgs),
    #[command(about = daemons::PROXY)]
    Proxy(weft_proxy::cli::ProxyArgs),
    /// Every service port the proxy on this node serves, its endpoints and what is programmed
    Services(weft_proxy::cli::ServicesArgs),
    #[command(about = daemons::DNS)]
    Dns(weft_dns::cli::DnsArgs),
    /// A multi-node lab of network namespaces on this machine
    #[command(subcommand)]
    Lab(weft_lab::cli::LabCommand),
    /// Create or update objects from manifests (kubectl apply)
    Apply(weft_cli::verbs::ApplyArgs),
    /// Show objects (kubectl get)
    Get(weft_cli::verbs::GetArgs),
    /// Show an object in detail, with related objects and events (kubectl describe)
    Describe(weft_cli::describe::DescribeArgs),
    /// Delete objects (kubectl delete)
    Delete(weft_cli::verbs::DeleteArgs),
    /// Set the number of replicas of a deployment, replica set or replication controller (kubectl scale)
    Scale(weft_cli::scale::ScaleArgs),
    /// Change a field of objects (kubectl set)
    #[command(subcommand)]
    Set(weft_cli::scale::SetCommand),
    /// Manage the rollout of a deployment (kubectl rollout)
    #[command(subcommand)]
    Rollout(weft_cli::rollout::RolloutCommand),
    #[command(about = daemons::CONTROLLER)]
    Controller(weft_control::cli::ControllerArgs),
    #[command(about = daemons::KUBELET)]
    Kubelet(Box<weft_control::kubelet::cli::KubeletArgs>),
    /// Print a container's logs, through its node's kubelet (kubectl logs)
    Logs(weft_control::kubelet::client::LogsArgs),
    /// Run a command in a container, through its node's kubelet (kubectl exec; -i stdin, -t a terminal)
    Exec(weft_control::kubelet::client::ExecArgs),
    /// Container images in containerd (what the kubelet runs)
    #[command(subcommand)]
    Image(weft_control::kubelet::cli::ImageCommand),
    /// Write a containerd config for the kubelet (root, state and socket under one directory)
    ContainerdConfig(weft_control::kubelet::cli::ContainerdConfigArgs),
}

fn invoked_as_cni() -> bool {
    std::env::args_os()
        .next()
        .map(|a| std::path::Path::new(&a).file_name() == Some(std::ffi::OsStr::new("weft-cni")))
        .unwrap_or(false)
}

fn main() {
    // Called by a container runtime as a CNI plugin (through a `weft-cni` symlink).
    if invoked_as_cni() {
        std::process::exit(weft_agent::cni::main());
    }
    let cli = Cli::parse();
    // A daemon runs from its own binary when that is installed beside this one (see `weft::exec_daemon`).
    let daemon = match &cli.command {
        Command::Agent(_) => Some("agent"),
        Command::Proxy(_) => Some("proxy"),
        Command::Dns(_) => Some("dns"),
        Command::Controller(_) => Some("controller"),
        Command::Kubelet(_) => Some("kubelet"),
        _ => None,
    };
    if let Some(name) = daemon {
        exec_daemon(name);
    }
    init_logging();
    exit_with(match cli.command {
        Command::Agent(args) => daemons::agent(args),
        Command::Network(cmd) => runtime().and_then(|rt| rt.block_on(weft_agent::cli::network(cmd))).map(|_| 0),
        Command::Leases(c) => runtime().and_then(|rt| rt.block_on(weft_agent::cli::leases(c))).map(|_| 0),
        Command::Routes(a) => runtime().and_then(|rt| rt.block_on(weft_agent::cli::routes(a))).map(|_| 0),
        Command::Lab(cmd) => weft_lab::cli::run(cmd),
        Command::Proxy(args) => daemons::proxy(args),
        Command::Dns(args) => daemons::dns(args),
        Command::Services(a) => runtime().and_then(|rt| rt.block_on(weft_proxy::cli::services(a))),
        Command::Apply(a) => runtime().and_then(|rt| rt.block_on(weft_cli::verbs::apply(a))).map(|_| 0),
        Command::Get(a) => runtime().and_then(|rt| rt.block_on(weft_cli::verbs::get(a))),
        Command::Describe(a) => runtime().and_then(|rt| rt.block_on(weft_cli::describe::describe(a))),
        Command::Delete(a) => runtime().and_then(|rt| rt.block_on(weft_cli::verbs::delete(a))),
        Command::Scale(a) => runtime().and_then(|rt| rt.block_on(weft_cli::scale::scale(a))),
        Command::Set(cmd) => runtime().and_then(|rt| rt.block_on(weft_cli::scale::set(cmd))),
        Command::Rollout(cmd) => runtime().and_then(|rt| rt.block_on(weft_cli::rollout::run(cmd))),
        Command::Controller(a) => daemons::controller(a),
        Command::Kubelet(a) => daemons::kubelet(*a),
        Command::Logs(a) => runtime().and_then(|rt| rt.block_on(weft_control::kubelet::client::logs(a))),
        Command::Exec(a) => runtime().and_then(|rt| rt.block_on(weft_control::kubelet::client::exec(a))),
        Command::Image(cmd) => weft_control::kubelet::cli::image(cmd),
        Command::ContainerdConfig(a) => weft_control::kubelet::cli::containerd_config(a),
    })
}
