//! The kubelet's commands: `weft kubelet` (the daemon's flags), `weft image import`, `weft containerd-config`.

use std::path::PathBuf;

use anyhow::{Context, Result};

use super::containerd::{self, Layout};

/// `weft image ...`
#[derive(Debug, Clone, clap::Subcommand)]
pub enum ImageCommand {
    /// Load a docker-archive or OCI tarball into containerd's k8s.io namespace (where CRI finds images)
    Import(ImportArgs),
}

#[derive(Debug, Clone, clap::Args)]
pub struct ImportArgs {
    /// the tarball (e.g. target/images/busybox.tar from scripts/images.sh)
    pub files: Vec<PathBuf>,
    /// containerd's socket
    #[arg(long, default_value = "/run/containerd/containerd.sock")]
    pub address: PathBuf,
}

/// `weft containerd-config`: a containerd config with root, state and socket under one directory.
#[derive(Debug, Clone, clap::Args)]
pub struct ContainerdConfigArgs {
    /// containerd's directory: root/, state/ and containerd.sock go under it
    #[arg(long)]
    pub dir: PathBuf,
    /// where CRI reads CNI network configs
    #[arg(long, default_value = "/etc/cni/net.d")]
    pub cni_conf_dir: PathBuf,
    /// where CRI finds CNI plugins
    #[arg(long, default_value = "/usr/lib/cni")]
    pub cni_bin_dir: PathBuf,
    /// the sandbox ("pause") image
    #[arg(long, default_value = containerd::PAUSE_IMAGE)]
    pub sandbox_image: String,
    /// containerd's own oom_score_adj; default: 1000 when this process lacks CAP_SYS_RESOURCE (then no process
    /// may lower its score, and runc would fail to give containers a lower one than their shim's), else unset
    #[arg(long, allow_hyphen_values = true)]
    pub oom_score: Option<i32>,
    /// write the config here (default: stdout)
    #[arg(short, long)]
    pub output: Option<PathBuf>,
}

pub fn image(cmd: ImageCommand) -> Result<i32> {
    match cmd {
        ImageCommand::Import(a) => {
            anyhow::ensure!(!a.files.is_empty(), "give one or more tarballs to import");
            for f in &a.files {
                let out =
                    containerd::import_image(&a.address, f).with_context(|| format!("importing {}", f.display()))?;
                if !out.is_empty() {
                    println!("{out}");
                }
            }
            Ok(0)
        }
    }
}

pub fn containerd_config(a: ContainerdConfigArgs) -> Result<i32> {
    let mut layout = Layout::under(&a.dir, &a.cni_conf_dir, &a.cni_bin_dir);
    layout.sandbox_image = a.sandbox_image;
    layout.oom_score = a.oom_score.or((!containerd::can_lower_oom_score()).then_some(1000));
    let text = containerd::render_config(&layout)?;
    match a.output {
        Some(p) => std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))?,
        None => print!("{text}"),
    }
    Ok(0)
}

/// `weft kubelet`: runs the pods bound to this node on containerd (CRI), registers the Node, renews its Lease.
#[derive(Debug, Clone, clap::Args)]
pub struct KubeletArgs {
    #[command(flatten)]
    pub etcd: weft_api::EtcdArgs,
    /// the node's name (default: the host name)
    #[arg(long)]
    pub hostname_override: Option<String>,
    /// the node's address (InternalIP; status.hostIP of its pods); default: the first non-loopback IPv4 address
    #[arg(long)]
    pub node_ip: Option<String>,
    /// CRI endpoint of the container runtime
    #[arg(long, default_value = "unix:///run/containerd/containerd.sock")]
    pub container_runtime_endpoint: String,
    /// cgroupfs parent of every pod (under each hierarchy; never the root)
    #[arg(long, default_value = "/weft")]
    pub cgroup_parent: String,
    /// the kubelet's directory (pod logs under pods/)
    #[arg(long, default_value = "/var/lib/weft/kubelet")]
    pub root_dir: PathBuf,
    /// the cluster DNS server(s) pods with dnsPolicy ClusterFirst use (comma separated; "" for none)
    #[arg(long, default_value = "10.96.0.10", value_delimiter = ',')]
    pub cluster_dns: Vec<String>,
    #[arg(long, default_value = "cluster.local")]
    pub cluster_domain: String,
    /// the resolv.conf pods with dnsPolicy Default get
    #[arg(long, default_value = "/etc/resolv.conf")]
    pub resolv_conf: PathBuf,
    /// spec.podCIDR of the Node (default: from --subnet-file)
    #[arg(long)]
    pub pod_cidr: Option<String>,
    /// the overlay's subnet file (FLANNEL_SUBNET gives spec.podCIDR)
    #[arg(long, default_value = "/run/flannel/subnet.env")]
    pub subnet_file: PathBuf,
    /// how often the runtime's containers are compared with the bound pods
    #[arg(long, default_value = "1s", value_parser = crate::cli::parse_duration)]
    pub sync_frequency: std::time::Duration,
    /// how often the node's status is computed (written when it changed)
    #[arg(long, default_value = "10s", value_parser = crate::cli::parse_duration)]
    pub node_status_update_frequency: std::time::Duration,
    /// the node's status is written at least this often
    #[arg(long, default_value = "5m", value_parser = crate::cli::parse_duration)]
    pub node_status_report_frequency: std::time::Duration,
    /// how often the kube-node-lease Lease is renewed
    #[arg(long, default_value = "10s", value_parser = crate::cli::parse_duration)]
    pub node_lease_renew_interval: std::time::Duration,
    #[arg(long, default_value_t = 40)]
    pub node_lease_duration_seconds: i32,
    /// the first restart back-off (CrashLoopBackOff, ImagePullBackOff)
    #[arg(long, default_value = "10s", value_parser = crate::cli::parse_duration)]
    pub backoff_initial: std::time::Duration,
    /// the back-off doubles up to this
    #[arg(long, default_value = "5m", value_parser = crate::cli::parse_duration)]
    pub backoff_max: std::time::Duration,
    /// the back-off starts over when the last exit is this long ago
    #[arg(long, default_value = "10m", value_parser = crate::cli::parse_duration)]
    pub backoff_reset: std::time::Duration,
    /// the address the kubelet server (logs, exec; HTTPS with client certificates) listens on
    #[arg(long, default_value = "0.0.0.0")]
    pub address: String,
    /// its port
    #[arg(long, default_value_t = 10250)]
    pub port: u16,
    /// the server's certificate (PEM); without it, its key and --client-ca-file the server stays off
    #[arg(long)]
    pub tls_cert_file: Option<PathBuf>,
    #[arg(long)]
    pub tls_private_key_file: Option<PathBuf>,
    /// the CA whose client certificates the server accepts (no other client is served)
    #[arg(long)]
    pub client_ca_file: Option<PathBuf>,
    /// pods whose sandbox and containers are created at once (the rest wait their turn)
    #[arg(long, default_value_t = 16)]
    pub parallel_pod_starts: usize,
    /// address of /healthz ("" to disable)
    #[arg(long, default_value = "127.0.0.1:10248")]
    pub healthz_bind_address: String,
}

/// The first IPv4 address of this host's network namespace that is not loopback.
fn first_ipv4() -> Option<String> {
    // `hostname -I` is not everywhere; a UDP socket "connected" to a documentation address picks the source
    // address the routing table would use, without sending anything.
    let s = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    if s.connect("192.0.2.1:9").is_ok() {
        if let Ok(a) = s.local_addr() {
            if !a.ip().is_unspecified() {
                return Some(a.ip().to_string());
            }
        }
    }
    None
}

impl KubeletArgs {
    pub fn options(&self) -> Result<super::run::Options> {
        use super::config::{parse_resolv_conf, NodeSettings};
        let node_name = super::node::node_name(self.hostname_override.as_deref());
        anyhow::ensure!(!node_name.is_empty(), "no node name: give --hostname-override");
        let host_ip = match &self.node_ip {
            Some(ip) => {
                ip.parse::<std::net::IpAddr>().with_context(|| format!("--node-ip {ip:?} is not an IP address"))?;
                ip.clone()
            }
            None => first_ipv4().unwrap_or_default(),
        };
        for d in self.cluster_dns.iter().filter(|d| !d.is_empty()) {
            d.parse::<std::net::IpAddr>().with_context(|| format!("--cluster-dns {d:?} is not an IP address"))?;
        }
        anyhow::ensure!(
            !self.cgroup_parent.trim_matches('/').is_empty(),
            "--cgroup-parent must name a cgroup below the root"
        );
        if let Some(c) = &self.pod_cidr {
            c.parse::<ipnetwork::IpNetwork>().with_context(|| format!("--pod-cidr {c:?} is not a CIDR"))?;
        }
        let host_dns = parse_resolv_conf(&std::fs::read_to_string(&self.resolv_conf).unwrap_or_default());
        let healthz = if self.healthz_bind_address.is_empty() {
            None
        } else {
            Some(self.healthz_bind_address.parse().with_context(|| "--healthz-bind-address is not host:port")?)
        };
        Ok(super::run::Options {
            etcd: self.etcd.clone(),
            settings: NodeSettings {
                node_name,
                host_ip,
                cgroup_parent: format!("/{}", self.cgroup_parent.trim_matches('/')),
                root_dir: self.root_dir.to_string_lossy().to_string(),
                cluster_dns: self.cluster_dns.iter().filter(|d| !d.is_empty()).cloned().collect(),
                cluster_domain: self.cluster_domain.trim_matches('.').to_string(),
                host_dns,
            },
            pod_cidr: self.pod_cidr.clone(),
            subnet_file: self.subnet_file.clone(),
            backoff: super::decide::BackoffPolicy {
                initial: self.backoff_initial,
                max: self.backoff_max.max(self.backoff_initial),
                reset_after: self.backoff_reset,
            },
            sync_period: self.sync_frequency.max(std::time::Duration::from_millis(100)),
            node_status_update: self.node_status_update_frequency.max(std::time::Duration::from_millis(100)),
            node_status_report: self.node_status_report_frequency,
            lease_renew: self.node_lease_renew_interval.max(std::time::Duration::from_millis(100)),
            lease_duration_secs: self.node_lease_duration_seconds,
            healthz,
            parallel_starts: self.parallel_pod_starts.max(1),
            server: self.server()?,
        })
    }
}

impl KubeletArgs {
    fn server(&self) -> Result<Option<(std::net::SocketAddr, super::server::TlsFiles)>> {
        match (&self.tls_cert_file, &self.tls_private_key_file, &self.client_ca_file) {
            (Some(cert), Some(key), Some(ca)) => {
                let ip: std::net::IpAddr = self
                    .address
                    .parse()
                    .with_context(|| format!("--address {:?} is not an IP address", self.address))?;
                let files = super::server::TlsFiles { cert: cert.clone(), key: key.clone(), client_ca: ca.clone() };
                Ok(Some((std::net::SocketAddr::new(ip, self.port), files)))
            }
            (None, None, None) => {
                tracing::warn!("kubelet server off: give --tls-cert-file, --tls-private-key-file and --client-ca-file");
                Ok(None)
            }
            _ => anyhow::bail!(
                "the kubelet server needs all of --tls-cert-file, --tls-private-key-file, --client-ca-file"
            ),
        }
    }
}

/// `weft kubelet`.
pub async fn kubelet(args: KubeletArgs) -> Result<i32> {
    let opts = args.options()?;
    let rt = super::cri::CriRuntime::connect(&args.container_runtime_endpoint)?;
    super::run::run(opts, rt).await?;
    Ok(0)
}
