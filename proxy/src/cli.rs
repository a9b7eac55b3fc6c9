//! `weft proxy` (kube-proxy's flags) and `weft services` (what the proxy on this node serves and has
//! programmed). Flag parsing and reports are pure; the daemon lives in `run`.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use ipnetwork::Ipv4Network;

use crate::dataplane::Dataplane;
use crate::iptables::{CommandRunner, Config, IptablesDataplane};
use crate::run::ProxyOptions;
use crate::status::ProxyStatus;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    Userspace,
    Iptables,
    Ipvs,
    Ebpf,
}

/// `weft proxy`: kube-proxy's job. Programs this node so Service VIPs, NodePorts and externalIPs reach endpoints.
#[derive(Debug, clap::Args)]
pub struct ProxyArgs {
    #[command(flatten)]
    pub etcd: weft_api::EtcdArgs,
    /// how to program services: userspace, iptables or ipvs (ebpf comes later)
    #[arg(long, value_enum, default_value = "iptables")]
    pub proxy_mode: Mode,
    /// this node's name, as Pods' and Endpoints' nodeName carry it [default: the host name]
    #[arg(long = "hostname-override", visible_alias = "node-name")]
    pub hostname_override: Option<String>,
    /// the pod network; traffic to a ClusterIP from outside it is masqueraded
    #[arg(long)]
    pub cluster_cidr: Option<Ipv4Network>,
    /// comma-separated CIDRs of node addresses that accept NodePorts [default: every local address]
    #[arg(long, value_delimiter = ',')]
    pub nodeport_addresses: Vec<Ipv4Network>,
    /// address of /metrics, /services and /healthz (loopback: metrics are not for the network); "" to disable
    #[arg(long, default_value = "127.0.0.1:10249")]
    pub metrics_bind_address: String,
    /// address of /healthz, all addresses as kube-proxy's (load balancers probe it); "" to disable
    #[arg(long, default_value = "0.0.0.0:10256")]
    pub healthz_bind_address: String,
    /// minimum time between syncs; changes within it are coalesced (e.g. 1s, 500ms)
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub min_sync_period: Duration,
    /// a full sync at least this often (e.g. 30s, 1m)
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub sync_period: Duration,
    /// bit of the packet mark that asks for masquerade (0-31)
    #[arg(long, default_value_t = 14, value_parser = clap::value_parser!(u8).range(0..32))]
    pub iptables_masquerade_bit: u8,
    /// ebpf mode: the cgroup v2 directory whose processes get socket-level load balancing [default: the cgroup v2 root]
    #[arg(long)]
    pub cgroup_path: Option<std::path::PathBuf>,
    /// ebpf mode: bpffs directory for pinned maps and links; this node's live in <dir>/<node name>
    #[arg(long, default_value = crate::ebpf::DEFAULT_PIN_BASE)]
    pub bpf_pin_dir: std::path::PathBuf,
    /// ebpf mode: entries of every load-balancer map (services, backend slots, affinity, reverse NAT)
    #[arg(long, default_value_t = weft_ebpf::maps::LB_MAP_MAX_DEFAULT, value_parser = clap::value_parser!(u32).range(16..))]
    pub bpf_lb_map_max: u32,
    /// ebpf mode: the interface whose node address serves NodePorts and external IPs to the outside (tc programs); `none` or "" turns north-south off [default: the interface holding the node address]
    #[arg(long)]
    pub nodeport_interface: Option<String>,
    /// the node's address (kube-proxy's flag); ebpf mode: the default --nodeport-interface is the interface holding it (0.0.0.0: the interface of the IPv4 default route)
    #[arg(long, default_value = "0.0.0.0")]
    pub bind_address: std::net::Ipv4Addr,
    #[command(flatten)]
    pub ipvs: IpvsArgs,
}

/// kube-proxy's `--ipvs-*` flags (ipvs mode only).
#[derive(Debug, Clone, clap::Args)]
pub struct IpvsArgs {
    /// ipvs mode: the IPVS scheduler of every virtual server
    #[arg(long = "ipvs-scheduler", value_enum, default_value = "rr")]
    pub scheduler: crate::ipvs::plan::Scheduler,
    /// ipvs mode: arp_ignore=1 and arp_announce=2, so the node answers no ARP for service addresses
    #[arg(long = "ipvs-strict-arp")]
    pub strict_arp: bool,
    /// ipvs mode: IPVS timeout of idle TCP connections (0s leaves the kernel's)
    #[arg(long = "ipvs-tcp-timeout", default_value = "0s", value_parser = parse_duration)]
    pub tcp_timeout: Duration,
    /// ipvs mode: IPVS timeout of TCP connections after a FIN (0s leaves the kernel's)
    #[arg(long = "ipvs-tcpfin-timeout", default_value = "0s", value_parser = parse_duration)]
    pub tcpfin_timeout: Duration,
    /// ipvs mode: IPVS timeout of UDP flows (0s leaves the kernel's)
    #[arg(long = "ipvs-udp-timeout", default_value = "0s", value_parser = parse_duration)]
    pub udp_timeout: Duration,
    /// ipvs mode: how long a removed TCP real server keeps its connections (at weight 0) before it is deleted
    #[arg(long = "ipvs-graceful-termination-period", default_value = "15m", value_parser = parse_duration)]
    pub graceful_period: Duration,
}

impl IpvsArgs {
    fn timeouts(&self) -> crate::ipvs::netlink::Timeouts {
        let secs = |d: Duration| u32::try_from(d.as_secs()).unwrap_or(u32::MAX);
        crate::ipvs::netlink::Timeouts {
            tcp: secs(self.tcp_timeout),
            tcp_fin: secs(self.tcpfin_timeout),
            udp: secs(self.udp_timeout),
        }
    }
}

/// Go-style durations: the one parser in weft-api.
pub use weft_api::duration::parse as parse_duration;

fn addr(flag: &str, v: &str) -> Result<Option<SocketAddr>> {
    if v.is_empty() {
        return Ok(None);
    }
    Ok(Some(v.parse().with_context(|| format!("{flag} {v:?} is not host:port"))?))
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default()
}

impl ProxyArgs {
    pub fn options(&self) -> Result<ProxyOptions> {
        let node_name = self.hostname_override.clone().unwrap_or_else(hostname);
        if node_name.is_empty() {
            bail!("no node name: pass --hostname-override");
        }
        Ok(ProxyOptions {
            etcd: self.etcd.clone(),
            node_name,
            metrics_addr: addr("--metrics-bind-address", &self.metrics_bind_address)?,
            healthz_addr: addr("--healthz-bind-address", &self.healthz_bind_address)?,
            min_sync: self.min_sync_period,
            sync: self.sync_period.max(self.min_sync_period),
        })
    }

    /// `--nodeport-interface` resolved against `--bind-address` and this namespace (ebpf mode; `None`: off).
    fn nodeport_interface(&self) -> Result<Option<String>> {
        let route = std::fs::read_to_string("/proc/net/route").unwrap_or_default();
        let default_route = crate::ebpf::default_route_interface(&route);
        let chosen = crate::ebpf::nodeport_interface(
            self.nodeport_interface.as_deref(),
            self.bind_address,
            &crate::ebpf::interface_addresses(),
            default_route.as_deref(),
        )?;
        if chosen.is_none() && self.nodeport_interface.is_none() {
            tracing::warn!("no IPv4 default route and no --bind-address: north-south (NodePort, externalIPs) is off");
        }
        Ok(chosen)
    }

    /// The dataplane for `--proxy-mode`.
    pub fn dataplane(&self) -> Result<Box<dyn Dataplane + Send>> {
        let node = self.hostname_override.clone().unwrap_or_else(hostname);
        if self.proxy_mode != Mode::Ebpf {
            // Switching away from ebpf mode: no program may keep translating behind this mode's back.
            // Not fatal: this mode can still serve; the leftovers are named in the warning.
            if let Err(e) = crate::ebpf::remove_leftovers(&self.bpf_pin_dir, &node) {
                tracing::warn!("removing the ebpf mode's pins: {}", weft_api::error_chain(&e));
            }
        }
        if self.proxy_mode != Mode::Ipvs {
            // A node switched away from ipvs mode keeps nothing of it (its VIPs on weft-ipvs0 would shadow ours).
            let removed = crate::ipvs::cleanup_leftovers(&mut CommandRunner::new());
            if !removed.is_empty() {
                tracing::info!(?removed, "removed what ipvs mode left");
            }
        }
        match self.proxy_mode {
            Mode::Ebpf => {
                let cfg = crate::ebpf::Config {
                    cgroup: self.cgroup_path.clone().unwrap_or_else(crate::ebpf::default_cgroup),
                    pin_base: self.bpf_pin_dir.clone(),
                    map_max: self.bpf_lb_map_max,
                    nodeport_interface: self.nodeport_interface()?,
                };
                Ok(Box::new(crate::ebpf::EbpfDataplane::load(&cfg, &node)?))
            }
            Mode::Iptables => {
                let cfg = Config {
                    cluster_cidr: self.cluster_cidr,
                    nodeport_addresses: self.nodeport_addresses.clone(),
                    masquerade_bit: self.iptables_masquerade_bit,
                    ..Config::default()
                };
                Ok(Box::new(IptablesDataplane::new(CommandRunner::new(), cfg)))
            }
            // Its sockets live in this namespace and run on the daemon's runtime: call this inside it.
            Mode::Userspace => Ok(Box::new(crate::userspace::UserspaceDataplane::new(
                CommandRunner::new(),
                crate::userspace::Config {
                    nodeport_addresses: self.nodeport_addresses.clone(),
                    ..crate::userspace::Config::default()
                },
                tokio::runtime::Handle::try_current().context("the userspace mode needs the daemon's runtime")?,
            ))),
            Mode::Ipvs => Ok(Box::new(crate::ipvs::IpvsDataplane::new(
                CommandRunner::new(),
                crate::ipvs::Config {
                    scheduler: self.ipvs.scheduler,
                    cluster_cidr: self.cluster_cidr,
                    nodeport_addresses: self.nodeport_addresses.clone(),
                    masquerade_bit: self.iptables_masquerade_bit,
                    strict_arp: self.ipvs.strict_arp,
                    timeouts: self.ipvs.timeouts(),
                    graceful_period: self.ipvs.graceful_period,
                    ..crate::ipvs::Config::default()
                },
            ))),
        }
    }
}

/// `weft services`: asks the proxy on this node, and checks the kernel with the operator's own tools.
#[derive(Debug, clap::Args)]
pub struct ServicesArgs {
    /// the proxy's --metrics-bind-address
    #[arg(long, default_value = "127.0.0.1:10249")]
    pub proxy_address: SocketAddr,
    /// output format
    #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
    pub output: Output,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
}

/// Marks each service whose programmed object the kernel does not show (iptables mode: its chain
/// missing from `iptables-save`). Pure over the saved text.
pub fn check_programmed(status: &mut ProxyStatus, iptables_save: Option<&str>) -> usize {
    let mut missing = 0;
    if status.mode != "iptables" {
        return 0;
    }
    let Some(saved) = iptables_save else { return 0 };
    for s in &mut status.services {
        if let Some(chain) = &s.programmed {
            if !saved.lines().any(|l| l == format!(":{chain} - [0:0]") || l.starts_with(&format!(":{chain} "))) {
                s.programmed = Some(format!("{chain} MISSING"));
                missing += 1;
            }
        }
    }
    missing
}

pub fn render_services(status: &ProxyStatus) -> String {
    let mut rows =
        vec![["SERVICE", "PROTO", "CLUSTER-IP", "PORT", "NODE-PORT", "EXTERNAL-IPS", "ENDPOINTS", "PROGRAMMED"]
            .map(String::from)
            .to_vec()];
    let or_none = |v: String| if v.is_empty() { "<none>".to_string() } else { v };
    for s in &status.services {
        let eps = if s.endpoints.len() > 3 {
            format!("{} + {} more", s.endpoints[..3].join(","), s.endpoints.len() - 3)
        } else {
            s.endpoints.join(",")
        };
        let mut ext = s.external_ips.clone();
        ext.extend(s.load_balancer_ips.iter().cloned());
        rows.push(vec![
            s.name.clone(),
            s.protocol.clone(),
            s.cluster_ip.clone().unwrap_or_else(|| "<none>".into()),
            s.port.to_string(),
            s.node_port.map(|p| p.to_string()).unwrap_or_else(|| "<none>".into()),
            or_none(ext.join(",")),
            or_none(eps),
            s.programmed.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    let widths: Vec<usize> = (0..rows[0].len()).map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0)).collect();
    let mut out = format!("mode {}  node {}  service ports {}\n", status.mode, status.node, status.services.len());
    for r in rows {
        let line: Vec<String> = r.iter().enumerate().map(|(i, s)| format!("{s:<w$}", w = widths[i])).collect();
        out.push_str(line.join("   ").trim_end());
        out.push('\n');
    }
    for (name, reason) in &status.refused {
        // Debug-quoted: the reason is a tool's stderr.
        out.push_str(&format!("REFUSED {name}: {reason:?}\n"));
    }
    out
}

pub async fn services(args: ServicesArgs) -> Result<i32> {
    let body = weft_api::http::get(args.proxy_address, "/services", Duration::from_secs(5))
        .await
        .context("is `weft proxy` running on this node? (see --proxy-address)")?;
    let mut status: ProxyStatus = serde_json::from_str(&body).context("the proxy's /services answer")?;
    let saved = if status.mode == "iptables" {
        std::process::Command::new("iptables-save")
            .args(["-t", "nat"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
    } else {
        None
    };
    let missing = check_programmed(&mut status, saved.as_deref());
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&status)?),
        Output::Table => print!("{}", render_services(&status)),
    }
    if status.mode == "ipvs" && args.output == Output::Table {
        // The kernel's own view, with weights and connection counts (what `ipvsadm -Ln` shows).
        match crate::ipvs::report() {
            Ok(text) => print!("\n{text}"),
            Err(e) => eprintln!("reading IPVS: {}", weft_api::error_chain(&e)),
        }
    }
    Ok(if missing > 0 { 1 } else { 0 })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::ServiceStatus;

    #[test]
    fn durations() {
        for (s, ms) in [("500ms", 500), ("1s", 1000), ("1.5s", 1500), ("2m", 120_000), ("1h", 3_600_000)] {
            assert_eq!(parse_duration(s), Ok(Duration::from_millis(ms)), "{s}");
        }
        for bad in ["", "10", "s", "1x", "-1s", "abc", "1e300h", "NaNs", "infs"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    fn svc(name: &str, chain: &str) -> ServiceStatus {
        ServiceStatus {
            name: name.into(),
            protocol: "TCP".into(),
            cluster_ip: Some("10.96.0.10".into()),
            port: 80,
            node_port: Some(30080),
            external_ips: vec!["80.11.12.10".into()],
            load_balancer_ips: vec![],
            affinity_seconds: None,
            external_policy_local: false,
            endpoints: vec!["10.244.1.2:9376".into(), "10.244.2.2:9376".into()],
            programmed: Some(chain.into()),
        }
    }

    #[test]
    fn programmed_is_checked_against_iptables_save() {
        let mut st = ProxyStatus {
            refused: vec![],
            mode: "iptables".into(),
            node: "node-1".into(),
            synced: true,
            services: vec![svc("default/a:http", "WEFT-SVC-AAAA"), svc("default/b:http", "WEFT-SVC-BBBB")],
        };
        let saved = "*nat\n:WEFT-SVC-AAAA - [0:0]\n:WEFT-SERVICES - [0:0]\nCOMMIT\n";
        assert_eq!(check_programmed(&mut st, Some(saved)), 1);
        assert_eq!(st.services[0].programmed.as_deref(), Some("WEFT-SVC-AAAA"));
        assert_eq!(st.services[1].programmed.as_deref(), Some("WEFT-SVC-BBBB MISSING"));
        let table = render_services(&st);
        assert!(table.contains("default/a:http   TCP     10.96.0.10   80     30080       80.11.12.10    10.244.1.2:9376,10.244.2.2:9376   WEFT-SVC-AAAA"), "{table}");
        st.refused = vec![("default/c:http".into(), "`iptables-restore` failed: line 4\nBad argument".into())];
        let table = render_services(&st);
        assert!(
            table.ends_with("REFUSED default/c:http: \"`iptables-restore` failed: line 4\\nBad argument\"\n"),
            "a refused port is listed, its reason on one line:\n{table}"
        );
    }
}
