//! The operator's commands around the overlay: `weft agent` flags (named as flanneld's),
//! `weft network config get|set`, `weft leases` and `weft routes`. Reports are built by pure
//! functions from what etcd and the kernel say, then printed as a table or JSON.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use ipnetwork::Ipv4Network;
use serde::Serialize;

use crate::config::{Backend, BackendConfig, NetworkConfig, RawConfig};
use crate::kernel::{ChecksumOffload, Netlink};
use crate::lease::Lease;
use crate::plan::{self, KernelState};
use crate::run::AgentOptions;
use crate::subnet::SubnetManager;
use crate::subnet_env;

pub const DEFAULT_PREFIX: &str = "/coreos.com/network";
pub const DEFAULT_SUBNET_FILE: &str = "/run/flannel/subnet.env";

/// `weft agent`: flanneld's job. Leases a pod subnet in etcd and programs routes to every other node.
#[derive(Debug, clap::Args)]
pub struct AgentArgs {
    #[command(flatten)]
    pub etcd: weft_api::EtcdArgs,
    /// etcd prefix of the network config and subnet leases
    #[arg(long, default_value = DEFAULT_PREFIX)]
    pub etcd_prefix: String,
    /// interface (name or IPv4 address) for node-to-node traffic [default: the default route's interface,
    /// else the first non-loopback one]
    #[arg(long)]
    pub iface: Option<String>,
    /// IP other nodes reach this node at [default: the interface's address]
    #[arg(long)]
    pub public_ip: Option<Ipv4Addr>,
    /// where to write FLANNEL_NETWORK, FLANNEL_SUBNET, FLANNEL_MTU and FLANNEL_IPMASQ for the CNI plugin
    #[arg(long, env = "WEFT_SUBNET_FILE", default_value = DEFAULT_SUBNET_FILE)]
    pub subnet_file: PathBuf,
    /// masquerade pod traffic that leaves the pod network (iptables rules in this namespace)
    #[arg(long)]
    pub ip_masq: bool,
    /// renew the subnet lease this many minutes before it expires
    #[arg(long, default_value_t = 60)]
    pub subnet_lease_renew_margin: u64,
    /// seconds between checks that the ip-masq rules are still in place
    #[arg(long, default_value_t = 5)]
    pub iptables_resync: u64,
    /// seconds between full re-reads of the kernel's routes, neighbours and FDB (undoes manual changes)
    #[arg(long, default_value_t = 5)]
    pub resync: u64,
    /// address of the /healthz endpoint ("" to disable)
    #[arg(long, default_value = "127.0.0.1:8285")]
    pub healthz_addr: String,
    /// TX checksum offload on flannel.<VNI>: `off` works around the kernel bug that corrupts checksums of
    /// NATed VXLAN packets (fixed in Linux 5.7) at a large cost in throughput; `auto` turns it off only on
    /// older kernels or when --public-ip differs from the interface's address (the node is behind NAT)
    #[arg(long, value_enum, default_value = "auto")]
    pub vxlan_tx_checksum_offload: OffloadArg,
    /// TTL of the subnet lease in etcd, in seconds (flannel uses 24 h)
    #[arg(long, default_value_t = 24 * 3600, hide = true)]
    pub subnet_lease_ttl: u64,
}

impl AgentArgs {
    pub fn options(&self) -> Result<AgentOptions> {
        let healthz_addr = if self.healthz_addr.is_empty() {
            None
        } else {
            Some(
                self.healthz_addr
                    .parse::<SocketAddr>()
                    .with_context(|| format!("--healthz-addr {:?} is not host:port", self.healthz_addr))?,
            )
        };
        anyhow::ensure!(self.iptables_resync > 0, "--iptables-resync must be at least 1 second");
        anyhow::ensure!(self.resync > 0, "--resync must be at least 1 second");
        Ok(AgentOptions {
            etcd: self.etcd.clone(),
            prefix: self.etcd_prefix.clone(),
            iface: self.iface.clone(),
            public_ip: self.public_ip,
            subnet_file: self.subnet_file.clone(),
            ip_masq: self.ip_masq,
            renew_margin: Duration::from_secs(self.subnet_lease_renew_margin * 60),
            iptables_resync: Duration::from_secs(self.iptables_resync),
            resync: Duration::from_secs(self.resync),
            healthz_addr,
            // etcd refuses TTLs below a few seconds; tests use short ones to see renewals happen.
            lease_ttl: Duration::from_secs(self.subnet_lease_ttl.max(5)),
            checksum_offload: match self.vxlan_tx_checksum_offload {
                OffloadArg::Auto => ChecksumOffload::Auto,
                OffloadArg::On => ChecksumOffload::On,
                OffloadArg::Off => ChecksumOffload::Off,
            },
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OffloadArg {
    Auto,
    On,
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
}

/// Flags shared by the read-only commands.
#[derive(Debug, clap::Args)]
pub struct Common {
    #[command(flatten)]
    pub etcd: weft_api::EtcdArgs,
    /// etcd prefix of the network config and subnet leases
    #[arg(long, default_value = DEFAULT_PREFIX)]
    pub etcd_prefix: String,
    /// output format
    #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
    pub output: Output,
}

#[derive(Debug, clap::Subcommand)]
pub enum NetworkCommand {
    /// Show or write the network config key (`<prefix>/config`)
    #[command(subcommand)]
    Config(ConfigCommand),
}

#[derive(Debug, clap::Subcommand)]
pub enum ConfigCommand {
    /// Print the stored network config
    Get {
        #[command(flatten)]
        common: Common,
    },
    /// Write the network config (validated first; nothing is written if it is invalid)
    Set {
        #[command(flatten)]
        etcd: weft_api::EtcdArgs,
        #[arg(long, default_value = DEFAULT_PREFIX)]
        etcd_prefix: String,
        /// the pod network, e.g. 10.244.0.0/16
        #[arg(long)]
        network: String,
        /// prefix length of each node's subnet [default: 24, or 2 more than a network smaller than /22]
        #[arg(long)]
        subnet_len: Option<u8>,
        /// vxlan or host-gw
        #[arg(long, default_value = "vxlan")]
        backend: String,
        /// VXLAN network identifier
        #[arg(long)]
        vni: Option<u32>,
        /// VXLAN UDP port
        #[arg(long)]
        port: Option<u16>,
    },
}

async fn manager(etcd: &weft_api::EtcdArgs, prefix: &str) -> Result<SubnetManager> {
    Ok(SubnetManager::new(weft_api::connect(etcd).await?, prefix))
}

pub async fn network(cmd: NetworkCommand) -> Result<()> {
    let NetworkCommand::Config(cmd) = cmd;
    match cmd {
        ConfigCommand::Get { common } => {
            let mut mgr = manager(&common.etcd, &common.etcd_prefix).await?;
            let cfg = mgr.get_config().await?;
            match common.output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&cfg.to_raw())?),
                Output::Table => print!("{}", render_config(&cfg)),
            }
        }
        ConfigCommand::Set { etcd, etcd_prefix, network, subnet_len, backend, vni, port } => {
            let raw = RawConfig {
                network: Some(network),
                subnet_len,
                subnet_min: None,
                subnet_max: None,
                backend: BackendConfig { kind: backend, vni, port },
            };
            let cfg = NetworkConfig::from_raw(&raw)?;
            let mut mgr = manager(&etcd, &etcd_prefix).await?;
            mgr.put_config(&raw).await?;
            print!("{}", render_config(&cfg));
        }
    }
    Ok(())
}

fn render_config(cfg: &NetworkConfig) -> String {
    let backend = match cfg.backend {
        Backend::Vxlan { vni, port } => format!("vxlan (VNI {vni}, UDP {port})"),
        Backend::HostGw => "host-gw".into(),
    };
    format!(
        "Network:    {}\nSubnetLen:  {}\nSubnetMin:  {}\nSubnetMax:  {}\nBackend:    {backend}\n",
        cfg.network, cfg.subnet_len, cfg.subnet_min, cfg.subnet_max
    )
}

/// One row of `weft leases`.
#[derive(Debug, Serialize, PartialEq)]
pub struct LeaseRow {
    pub subnet: Ipv4Network,
    pub public_ip: Ipv4Addr,
    pub backend: String,
    pub vtep_mac: Option<String>,
    /// Seconds until the lease expires; None for a reservation.
    pub expires_in: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct LeasesReport {
    pub leases: Vec<LeaseRow>,
    pub skipped: Vec<Skipped>,
}

#[derive(Debug, Serialize)]
pub struct Skipped {
    pub key: String,
    pub reason: String,
}

pub async fn leases(common: Common) -> Result<()> {
    let mut mgr = manager(&common.etcd, &common.etcd_prefix).await?;
    let cfg = mgr.get_config().await?;
    let (table, _) = mgr.list().await?;
    let mut rows = Vec::new();
    for l in table.valid(&cfg) {
        let ttl = if l.is_reservation() { None } else { mgr.time_to_live(l.etcd_lease).await?.map(|d| d.as_secs()) };
        rows.push(LeaseRow {
            subnet: l.subnet,
            public_ip: l.attrs.public_ip,
            backend: l.attrs.backend_type.clone(),
            vtep_mac: l.attrs.vxlan_data().map(|d| d.vtep_mac.to_string()),
            expires_in: ttl,
        });
    }
    rows.sort_by_key(|r| (u32::from(r.subnet.network()), r.subnet.prefix()));
    let skipped = table.skipped(&cfg).into_iter().map(|(key, reason)| Skipped { key, reason }).collect();
    let report = LeasesReport { leases: rows, skipped };
    match common.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Output::Table => print!("{}", render_leases(&report)),
    }
    Ok(())
}

fn human(secs: u64) -> String {
    match secs {
        s if s >= 3600 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        s if s >= 60 => format!("{}m{:02}s", s / 60, s % 60),
        s => format!("{s}s"),
    }
}

/// Left-aligned columns sized to their widest cell.
fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> =
        (0..cols).map(|c| rows.iter().filter_map(|r| r.get(c)).map(|s| s.len()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r.iter().enumerate().map(|(i, s)| format!("{s:<w$}", w = widths[i])).collect();
        out.push_str(line.join("   ").trim_end());
        out.push('\n');
    }
    out
}

pub fn render_leases(r: &LeasesReport) -> String {
    let mut rows = vec![["SUBNET", "PUBLIC IP", "BACKEND", "VTEP MAC", "EXPIRES IN"].map(String::from).to_vec()];
    for l in &r.leases {
        rows.push(vec![
            l.subnet.to_string(),
            l.public_ip.to_string(),
            l.backend.clone(),
            l.vtep_mac.clone().unwrap_or_else(|| "-".into()),
            l.expires_in.map(human).unwrap_or_else(|| "never (reservation)".into()),
        ]);
    }
    let mut out = table(&rows);
    for s in &r.skipped {
        out.push_str(&format!("skipped {}: {}\n", s.key, s.reason));
    }
    out
}

/// `weft routes`: what this node should have programmed, and whether the kernel has it. The local agent is asked
/// first (its `/state`); when none answers, the subnet file and etcd (the flags below) tell the same.
#[derive(Debug, clap::Args)]
pub struct RoutesArgs {
    #[command(flatten)]
    pub common: Common,
    /// the local agent's --healthz-addr, asked first for its network, subnet and leases ("" to skip it)
    #[arg(long, env = "WEFT_AGENT_ADDRESS", default_value = "127.0.0.1:8285")]
    pub agent_address: String,
    /// the agent's subnet file (tells this node's own subnet when the agent does not answer)
    #[arg(long, env = "WEFT_SUBNET_FILE", default_value = DEFAULT_SUBNET_FILE)]
    pub subnet_file: PathBuf,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct LocalInfo {
    pub subnet: Ipv4Network,
    pub backend: String,
    pub device: String,
    pub mtu: u32,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct RemoteRow {
    pub subnet: Ipv4Network,
    pub public_ip: Ipv4Addr,
    pub vtep_mac: Option<String>,
    /// Each is None when the backend does not use that kind of object (host-gw: no neighbour/FDB).
    pub route: bool,
    pub neigh: Option<bool>,
    pub fdb: Option<bool>,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct RoutesReport {
    /// Where the network, subnet and leases came from: `agent <address>`, or `etcd` (with the subnet file).
    pub source: String,
    /// How many routes, neighbours and FDB entries the agent says it programmed (absent without an agent).
    pub programmed: Option<[usize; 3]>,
    pub local: LocalInfo,
    pub remotes: Vec<RemoteRow>,
    /// Kernel objects on our device that no lease claims (the agent removes them at its next resync).
    pub stale: Vec<String>,
}

/// Pure: compares what each lease needs with what the kernel holds.
pub fn routes_report(
    local: LocalInfo,
    cfg: &NetworkConfig,
    leases: &[Lease],
    ifindex: u32,
    observed: &KernelState,
) -> RoutesReport {
    let desired_for = |ls: &[Lease]| match cfg.backend {
        Backend::Vxlan { vni, .. } => plan::desired_vxlan(local.subnet, vni, ifindex, ls),
        Backend::HostGw => plan::desired_host_gw(local.subnet, ifindex, ls),
    };
    let mut remotes = Vec::new();
    for l in leases.iter().filter(|l| l.subnet != local.subnet) {
        let want = desired_for(std::slice::from_ref(l));
        if want.routes.is_empty() {
            continue; // a lease this backend cannot route (other backend type or VNI)
        }
        let vx = matches!(cfg.backend, Backend::Vxlan { .. });
        remotes.push(RemoteRow {
            subnet: l.subnet,
            public_ip: l.attrs.public_ip,
            vtep_mac: l.attrs.vxlan_data().map(|d| d.vtep_mac.to_string()),
            route: want.routes.is_subset(&observed.routes),
            neigh: vx.then(|| want.neighs.is_subset(&observed.neighs)),
            fdb: vx.then(|| want.fdbs.is_subset(&observed.fdbs)),
        });
    }
    remotes.sort_by_key(|r| u32::from(r.subnet.network()));
    let all = desired_for(leases);
    let mut stale: Vec<String> =
        observed.routes.difference(&all.routes).map(|r| format!("route {} via {}", r.dst, r.gateway)).collect();
    stale.extend(observed.neighs.difference(&all.neighs).map(|n| format!("neighbour {} lladdr {}", n.ip, n.mac)));
    stale.extend(observed.fdbs.difference(&all.fdbs).map(|f| format!("fdb {} dst {}", f.mac, f.dst)));
    RoutesReport { source: String::new(), programmed: None, local, remotes, stale }
}

pub fn render_routes(r: &RoutesReport) -> String {
    let yes = |b: bool| if b { "ok" } else { "MISSING" }.to_string();
    let opt = |b: Option<bool>| b.map(yes).unwrap_or_else(|| "-".into());
    let mut out = format!(
        "local subnet {}  backend {}  device {}  mtu {}  (from {})\n",
        r.local.subnet, r.local.backend, r.local.device, r.local.mtu, r.source
    );
    if let Some([routes, neighs, fdbs]) = r.programmed {
        out.push_str(&format!("the agent programmed {routes} routes, {neighs} neighbours, {fdbs} FDB entries\n"));
    }
    out.push('\n');
    let mut rows = vec![["SUBNET", "PUBLIC IP", "VTEP MAC", "ROUTE", "NEIGH", "FDB"].map(String::from).to_vec()];
    for x in &r.remotes {
        rows.push(vec![
            x.subnet.to_string(),
            x.public_ip.to_string(),
            x.vtep_mac.clone().unwrap_or_else(|| "-".into()),
            yes(x.route),
            opt(x.neigh),
            opt(x.fdb),
        ]);
    }
    out.push_str(&table(&rows));
    if r.remotes.is_empty() {
        out.push_str("(no other nodes have leases)\n");
    }
    for s in &r.stale {
        out.push_str(&format!("stale (no lease): {s}\n"));
    }
    out
}

/// The local agent's `/state`, or why there is none at `addr`.
async fn ask_agent(addr: &str) -> Result<crate::status::Parsed, String> {
    if addr.is_empty() {
        return Err("--agent-address is empty".into());
    }
    let sock: SocketAddr = addr.parse().map_err(|e| format!("--agent-address {addr:?}: {e}"))?;
    match weft_api::http::get(sock, "/state", Duration::from_secs(3)).await {
        Ok(body) => crate::status::parse(&body).map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

/// The device the backend programs, its index and what the kernel holds there.
async fn observe(nl: &Netlink, cfg: &NetworkConfig, subnet: Ipv4Network) -> Result<(String, u32, KernelState)> {
    Ok(match cfg.backend {
        Backend::Vxlan { vni, .. } => {
            let name = format!("flannel.{vni}");
            match nl.link_index(&name).await? {
                Some(i) => (name, i, nl.observe_vxlan(i).await?),
                None => (format!("{name} (MISSING)"), 0, KernelState::default()),
            }
        }
        Backend::HostGw => {
            // host-gw routes sit on the underlay; find it from any route into the network.
            let under = nl.find_underlay(None).await?;
            let obs = nl.observe_host_gw(under.ifindex, cfg.network, subnet).await?;
            (under.name, under.ifindex, obs)
        }
    })
}

pub async fn routes(args: RoutesArgs) -> Result<()> {
    let (source, cfg, leases, subnet, mtu, programmed) = match ask_agent(&args.agent_address).await {
        Ok(p) => {
            let pr = &p.state.programmed;
            let counts = [pr.routes.len(), pr.neighbours.len(), pr.fdb.len()];
            (format!("agent {}", args.agent_address), p.config, p.leases, p.state.subnet, p.state.mtu, Some(counts))
        }
        Err(why) => {
            eprintln!("weft routes: no answer from the agent ({why}); reading {} and etcd", args.subnet_file.display());
            let env = subnet_env::SubnetEnv::read(&args.subnet_file)
                .context("is `weft agent` running on this node? (see --agent-address, --subnet-file)")?;
            let mut mgr = manager(&args.common.etcd, &args.common.etcd_prefix).await?;
            let cfg = mgr.get_config().await?;
            let (table, _) = mgr.list().await?;
            ("etcd".to_string(), cfg, table.valid(&cfg), env.subnet, env.mtu, None)
        }
    };
    let nl = Netlink::new()?;
    let (device, ifindex, observed) = observe(&nl, &cfg, subnet).await?;
    let local = LocalInfo { subnet, backend: cfg.backend.type_name().into(), device, mtu };
    let report = RoutesReport { source, programmed, ..routes_report(local, &cfg, &leases, ifindex, &observed) };
    match args.common.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Output::Table => print!("{}", render_routes(&report)),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::vtep_mac;
    use crate::lease::LeaseAttrs;
    use crate::plan::Route;

    fn lease(subnet: &str, ip: [u8; 4]) -> Lease {
        let ip = Ipv4Addr::from(ip);
        Lease {
            subnet: subnet.parse().unwrap(),
            attrs: LeaseAttrs::vxlan(ip, 1, vtep_mac(ip, 1)),
            etcd_lease: 1,
            mod_revision: 1,
            create_revision: 1,
        }
    }

    #[test]
    fn routes_report_marks_what_the_kernel_lacks_and_what_no_lease_claims() {
        let cfg = NetworkConfig::parse(br#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#).unwrap();
        let local: Ipv4Network = "10.244.1.0/24".parse().unwrap();
        let leases = [
            lease("10.244.1.0/24", [192, 168, 56, 11]),
            lease("10.244.2.0/24", [192, 168, 56, 12]),
            lease("10.244.3.0/24", [192, 168, 56, 13]),
        ];
        // The kernel has everything for node-2, only the route for node-3, and a route nobody leases.
        let mut observed = plan::desired_vxlan(local, 1, 5, &leases[..2]);
        observed.routes.extend(plan::desired_vxlan(local, 1, 5, &leases[2..]).routes);
        let stale = Route {
            dst: "10.244.9.0/24".parse().unwrap(),
            gateway: Ipv4Addr::new(10, 244, 9, 0),
            ifindex: 5,
            onlink: true,
        };
        observed.routes.insert(stale);
        let info = LocalInfo { subnet: local, backend: "vxlan".into(), device: "flannel.1".into(), mtu: 1450 };
        let mut report = routes_report(info, &cfg, &leases, 5, &observed);
        let rows: Vec<_> = report.remotes.iter().map(|r| (r.subnet.to_string(), r.route, r.neigh, r.fdb)).collect();
        assert_eq!(
            rows,
            [
                ("10.244.2.0/24".to_string(), true, Some(true), Some(true)),
                ("10.244.3.0/24".to_string(), true, Some(false), Some(false)),
            ]
        );
        assert_eq!(report.stale, ["route 10.244.9.0/24 via 10.244.9.0"]);
        report.source = "agent 127.0.0.1:8285".into();
        report.programmed = Some([2, 2, 2]);
        let text = render_routes(&report);
        assert!(text.starts_with("local subnet 10.244.1.0/24  backend vxlan  device flannel.1  mtu 1450  (from agent 127.0.0.1:8285)\nthe agent programmed 2 routes, 2 neighbours, 2 FDB entries\n"), "{text}");
        assert!(
            text.contains("MISSING") && text.ends_with("stale (no lease): route 10.244.9.0/24 via 10.244.9.0\n"),
            "{text}"
        );
    }
}
