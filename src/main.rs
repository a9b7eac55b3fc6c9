//! The `weft` binary: parses flags and hands over to the libraries. No logic lives here.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "weft", version, about = "A Kubernetes node data plane: overlay agent, lab and inspection tools")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the overlay agent on this node (flanneld's job)
    Agent(weft_agent::cli::AgentArgs),
    /// The pod network's config in etcd
    #[command(subcommand)]
    Network(weft_agent::cli::NetworkCommand),
    /// List every node's subnet lease from etcd
    Leases(weft_agent::cli::Common),
    /// Show this node's subnet and, for every other node, whether its route, neighbour and FDB entry are programmed
    /// (asks the local agent; the flags are for when it does not answer)
    Routes(weft_agent::cli::RoutesArgs),
    /// Run the service proxy on this node (kube-proxy's job)
    Proxy(weft_proxy::cli::ProxyArgs),
    /// Every service port the proxy on this node serves, its endpoints and what is programmed
    Services(weft_proxy::cli::ServicesArgs),
    /// Run the cluster DNS server (CoreDNS's job): the cluster zone from etcd, other names forwarded
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
    /// Run the scheduler and controllers (kube-controller-manager's and kube-scheduler's job)
    Controller(weft_control::cli::ControllerArgs),
    /// Run the pods bound to this node on containerd through CRI (the kubelet's job)
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

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("WEFT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let ansi = std::io::stderr().is_terminal();
    tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).init();
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

/// The error and its causes on one line, skipping a cause the message before it already quotes.
fn error_chain(e: &anyhow::Error) -> String {
    let mut msg = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !msg.contains(&c) {
            msg = format!("{msg}: {c}");
        }
    }
    msg
}

fn main() {
    // Called by a container runtime as a CNI plugin (through a `weft-cni` symlink).
    if invoked_as_cni() {
        std::process::exit(weft_agent::cni::main());
    }
    let cli = Cli::parse();
    init_logging();
    let result: anyhow::Result<i32> = match cli.command {
        Command::Agent(args) => {
            args.options().and_then(|o| Ok(runtime()?.block_on(weft_agent::run::run(o)).map(|_| 0)?))
        }
        Command::Network(cmd) => runtime().and_then(|rt| rt.block_on(weft_agent::cli::network(cmd))).map(|_| 0),
        Command::Leases(c) => runtime().and_then(|rt| rt.block_on(weft_agent::cli::leases(c))).map(|_| 0),
        Command::Routes(a) => runtime().and_then(|rt| rt.block_on(weft_agent::cli::routes(a))).map(|_| 0),
        Command::Lab(cmd) => weft_lab::cli::run(cmd),
        Command::Proxy(args) => (|| {
            let opts = args.options()?;
            // Worker threads on every core: the userspace mode relays every connection in this process.
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            rt.block_on(async {
                let dataplane = args.dataplane()?;
                weft_proxy::run::run(opts, dataplane).await?;
                Ok::<_, anyhow::Error>(0)
            })
        })(),
        Command::Dns(args) => args.options().and_then(|o| Ok(runtime()?.block_on(weft_dns::run::run(o)).map(|_| 0)?)),
        Command::Services(a) => runtime().and_then(|rt| rt.block_on(weft_proxy::cli::services(a))),
        Command::Apply(a) => runtime().and_then(|rt| rt.block_on(weft_cli::verbs::apply(a))).map(|_| 0),
        Command::Get(a) => runtime().and_then(|rt| rt.block_on(weft_cli::verbs::get(a))),
        Command::Describe(a) => runtime().and_then(|rt| rt.block_on(weft_cli::describe::describe(a))),
        Command::Delete(a) => runtime().and_then(|rt| rt.block_on(weft_cli::verbs::delete(a))),
        Command::Scale(a) => runtime().and_then(|rt| rt.block_on(weft_cli::scale::scale(a))),
        Command::Set(cmd) => runtime().and_then(|rt| rt.block_on(weft_cli::scale::set(cmd))),
        Command::Rollout(cmd) => runtime().and_then(|rt| rt.block_on(weft_cli::rollout::run(cmd))),
        Command::Controller(a) => runtime().and_then(|rt| rt.block_on(weft_control::cli::run(a))).map(|_| 0),
        Command::Kubelet(a) => runtime().and_then(|rt| rt.block_on(weft_control::kubelet::cli::kubelet(*a))),
        Command::Logs(a) => runtime().and_then(|rt| rt.block_on(weft_control::kubelet::client::logs(a))),
        Command::Exec(a) => runtime().and_then(|rt| rt.block_on(weft_control::kubelet::client::exec(a))),
        Command::Image(cmd) => weft_control::kubelet::cli::image(cmd),
        Command::ContainerdConfig(a) => weft_control::kubelet::cli::containerd_config(a),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("weft: {}", error_chain(&e));
            std::process::exit(1);
        }
    }
}
