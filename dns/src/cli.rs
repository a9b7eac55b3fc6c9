//! `weft dns` flags (CoreDNS's defaults where it has one: metrics on 9153, health on 8080) resolved into
//! `DnsOptions`. Pure apart from reading /etc/resolv.conf when no `--upstream` is given.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use ipnetwork::IpNetwork;

use crate::forward;
use crate::index::Config;
use crate::run::DnsOptions;

/// `weft dns`: the cluster DNS server (CoreDNS's job), authoritative for the cluster zone and the reverse
/// zones of the service and pod networks, forwarding every other name.
#[derive(Debug, clap::Args)]
pub struct DnsArgs {
    #[command(flatten)]
    pub etcd: weft_api::EtcdArgs,
    /// address to serve DNS on, UDP and TCP
    #[arg(long, default_value = "0.0.0.0:53")]
    pub listen: SocketAddr,
    /// the cluster zone
    #[arg(long, default_value = "cluster.local")]
    pub zone: String,
    /// TTL of every record served from the cluster (and the SOA minimum), seconds
    #[arg(long, default_value_t = 30)]
    pub ttl: u32,
    /// resolvers for names outside the cluster, comma separated (ip or ip:port) [default: the nameservers of /etc/resolv.conf]
    #[arg(long, value_delimiter = ',')]
    pub upstream: Vec<String>,
    /// how long a forwarded query may take before the answer is SERVFAIL (e.g. 2s, 500ms)
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub upstream_timeout: Duration,
    /// answers from upstream kept at most (0 disables the cache)
    #[arg(long, default_value_t = 10_000)]
    pub cache_size: usize,
    /// the service network(s), comma separated: their reverse zones are served
    #[arg(long, default_value = "10.96.0.0/12", value_delimiter = ',')]
    pub service_cluster_ip_range: Vec<IpNetwork>,
    /// the pod network(s), comma separated: their reverse zones are served
    #[arg(long, default_value = "10.244.0.0/16", value_delimiter = ',')]
    pub cluster_cidr: Vec<IpNetwork>,
    /// UDP sockets sharing the port (SO_REUSEPORT), each with its own thread [default: one per CPU]
    #[arg(long)]
    pub udp_sockets: Option<usize>,
    /// address of /metrics ("" to disable)
    #[arg(long, default_value = "127.0.0.1:9153")]
    pub metrics_bind_address: String,
    /// address of /healthz, ready only after the first sync from etcd ("" to disable)
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub healthz_bind_address: String,
}

/// Go-style durations: the one parser in weft-api.
pub use weft_api::duration::parse as parse_duration;

fn addr(flag: &str, v: &str) -> Result<Option<SocketAddr>> {
    if v.is_empty() {
        return Ok(None);
    }
    Ok(Some(v.parse().with_context(|| format!("{flag} {v:?} is not host:port"))?))
}

fn valid_zone(z: &str) -> bool {
    let z = z.trim_end_matches('.');
    !z.is_empty()
        && z.len() < 254
        && z.split('.')
            .all(|l| !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
}

impl DnsArgs {
    pub fn options(&self) -> Result<DnsOptions> {
        if !valid_zone(&self.zone) {
            bail!("--zone {:?} is not a domain name", self.zone);
        }
        let upstreams = if self.upstream.is_empty() {
            let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
            forward::parse_resolv_conf(&text)
        } else {
            self.upstream
                .iter()
                .map(|u| forward::parse_upstream(u))
                .collect::<Result<Vec<_>, _>>()
                .map_err(anyhow::Error::msg)?
        };
        if upstreams.is_empty() {
            tracing::warn!(
                "no upstream resolvers (--upstream, /etc/resolv.conf): names outside the cluster get SERVFAIL"
            );
        }
        let mut reverse = self.service_cluster_ip_range.clone();
        reverse.extend(self.cluster_cidr.iter().copied());
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        Ok(DnsOptions {
            etcd: self.etcd.clone(),
            listen: self.listen,
            config: Config::new(&self.zone, self.ttl, reverse),
            upstreams,
            upstream_timeout: self.upstream_timeout,
            cache_size: self.cache_size,
            udp_sockets: self.udp_sockets.unwrap_or(cores).clamp(1, 64),
            metrics_addr: addr("--metrics-bind-address", &self.metrics_bind_address)?,
            healthz_addr: addr("--healthz-bind-address", &self.healthz_bind_address)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        dns: DnsArgs,
    }

    #[test]
    fn flags_resolve() {
        let c = Cli::try_parse_from([
            "dns",
            "--listen",
            "127.0.0.1:5353",
            "--zone",
            "Example.Internal.",
            "--ttl",
            "5",
            "--upstream",
            "127.0.0.1:5300,9.9.9.9",
            "--upstream-timeout",
            "300ms",
            "--cluster-cidr",
            "10.244.0.0/16,fd00:10:244::/56",
            "--metrics-bind-address",
            "",
        ])
        .unwrap();
        let o = c.dns.options().unwrap();
        assert_eq!(o.listen, "127.0.0.1:5353".parse().unwrap());
        assert_eq!(o.config.zone, "example.internal");
        assert_eq!(o.config.ttl, 5);
        assert_eq!(o.upstreams, vec!["127.0.0.1:5300".parse().unwrap(), "9.9.9.9:53".parse().unwrap()]);
        assert_eq!(o.upstream_timeout, Duration::from_millis(300));
        assert_eq!(o.config.reverse.len(), 3);
        assert_eq!(o.metrics_addr, None);
        assert_eq!(o.healthz_addr, Some("127.0.0.1:8080".parse().unwrap()));
        assert!(Cli::try_parse_from(["dns", "--zone", "bad zone"]).unwrap().dns.options().is_err());
        assert!(parse_duration("2").is_err());
    }
}
