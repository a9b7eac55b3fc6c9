//! Stale UDP conntrack entries, as kube-proxy clears them: UDP has no connection to close, so without
//! this a client keeps talking to a removed endpoint (or to nothing) until its flow times out.
//! `stale_udp` is pure (old table, new table → deletions); `ConntrackDelete::args` is the `conntrack` call.

use std::net::Ipv4Addr;

use crate::model::{Protocol, ServiceTable};
use crate::restore::{Error, Runner};

/// One `conntrack -D` to run after a sync.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum ConntrackDelete {
    /// Flows to a service address DNATed to an endpoint that is gone.
    ToEndpoint { dst: Ipv4Addr, endpoint: Ipv4Addr },
    /// Flows to a node port DNATed to an endpoint that is gone.
    NodePortToEndpoint { port: u16, endpoint: Ipv4Addr },
    /// Flows to a service address that had no endpoints (rejected or stuck) and now has some.
    ToAddress { dst: Ipv4Addr },
    /// Likewise for a node port.
    ToNodePort { port: u16 },
}

impl ConntrackDelete {
    pub fn args(&self) -> Vec<String> {
        let mut a: Vec<String> = ["-D", "-p", "udp"].map(String::from).to_vec();
        match self {
            ConntrackDelete::ToEndpoint { dst, endpoint } => {
                a.extend(["--orig-dst".into(), dst.to_string(), "--dst-nat".into(), endpoint.to_string()])
            }
            ConntrackDelete::NodePortToEndpoint { port, endpoint } => {
                a.extend(["--orig-port-dst".into(), port.to_string(), "--dst-nat".into(), endpoint.to_string()])
            }
            ConntrackDelete::ToAddress { dst } => a.extend(["--orig-dst".into(), dst.to_string()]),
            ConntrackDelete::ToNodePort { port } => a.extend(["--orig-port-dst".into(), port.to_string()]),
        }
        a
    }
}

/// The deletions that the change from `old` to `new` calls for (UDP ports only), sorted and deduplicated.
pub fn stale_udp(old: &ServiceTable, new: &ServiceTable) -> Vec<ConntrackDelete> {
    let mut out = Vec::new();
    for (spn, before) in old.iter().filter(|(k, _)| k.protocol == Protocol::Udp) {
        let after = new.get(spn);
        let sp = &before.port;
        let dsts: Vec<Ipv4Addr> =
            sp.cluster_ip.iter().chain(&sp.external_ips).chain(&sp.load_balancer_ips).copied().collect();
        for ep in &before.endpoints {
            if after.is_some_and(|a| a.endpoints.iter().any(|e| e.ip == ep.ip && e.port == ep.port)) {
                continue;
            }
            out.extend(dsts.iter().map(|d| ConntrackDelete::ToEndpoint { dst: *d, endpoint: ep.ip }));
            if let Some(port) = sp.node_port {
                out.push(ConntrackDelete::NodePortToEndpoint { port, endpoint: ep.ip });
            }
        }
    }
    for (spn, after) in new.iter().filter(|(k, _)| k.protocol == Protocol::Udp) {
        let had_none = old.get(spn).is_none_or(|b| b.endpoints.is_empty());
        if had_none && !after.endpoints.is_empty() {
            let sp = &after.port;
            let dsts = sp.cluster_ip.iter().chain(&sp.external_ips).chain(&sp.load_balancer_ips);
            out.extend(dsts.map(|d| ConntrackDelete::ToAddress { dst: *d }));
            if let Some(port) = sp.node_port {
                out.push(ConntrackDelete::ToNodePort { port });
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// The UDP service ports of the last synced table, to clear what the next one makes stale. Used by the
/// modes whose NAT goes through conntrack (iptables and ipvs with `net/ipv4/vs/conntrack=1`).
#[derive(Debug, Default)]
pub struct StaleUdpFlows {
    last: Option<ServiceTable>,
}

impl StaleUdpFlows {
    /// Runs the `conntrack -D` calls the change to `table` calls for (none on the first sync: nothing
    /// to compare with). Failures are logged, not fatal: the rules are right, only old flows linger
    /// until they time out.
    pub fn clear(&mut self, runner: &mut dyn Runner, table: &ServiceTable) {
        let udp: ServiceTable =
            table.iter().filter(|(k, _)| k.protocol == Protocol::Udp).map(|(k, v)| (k.clone(), v.clone())).collect();
        let Some(old) = self.last.replace(udp) else { return };
        let Some(new) = self.last.as_ref() else { return };
        for del in stale_udp(&old, new) {
            let args = del.args();
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            match runner.run("conntrack", &args, None) {
                Ok(_) => {}
                // conntrack exits 1 when nothing matched.
                Err(Error::Failed { stderr, .. }) if stderr.contains("0 flow entries") => {}
                Err(e) => tracing::warn!(error = %e, ?del, "clearing stale UDP flows failed"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Endpoint, ServiceEntry, ServicePort, ServicePortName};

    fn entry(node_port: Option<u16>, eps: &[[u8; 4]]) -> ServiceEntry {
        ServiceEntry {
            port: ServicePort { node_port, ..ServicePort::cluster_ip([10, 96, 0, 10].into(), 53) },
            endpoints: eps.iter().map(|ip| Endpoint::ready((*ip).into(), 53)).collect(),
        }
    }

    #[test]
    fn removed_udp_endpoint_and_first_endpoint_clear_flows() {
        let dns = ServicePortName::new("kube-system", "dns", "dns", Protocol::Udp);
        let web = ServicePortName::new("default", "web", "", Protocol::Tcp);
        let old: ServiceTable = [
            (dns.clone(), entry(Some(30053), &[[10, 244, 1, 2], [10, 244, 2, 2]])),
            (web.clone(), entry(None, &[[1, 1, 1, 1]])),
        ]
        .into();
        let new: ServiceTable = [(dns.clone(), entry(Some(30053), &[[10, 244, 1, 2]])), (web, entry(None, &[]))].into();
        let gone: Ipv4Addr = [10, 244, 2, 2].into();
        assert_eq!(
            stale_udp(&old, &new),
            vec![
                ConntrackDelete::ToEndpoint { dst: [10, 96, 0, 10].into(), endpoint: gone },
                ConntrackDelete::NodePortToEndpoint { port: 30053, endpoint: gone },
            ],
            "TCP changes need no conntrack work"
        );
        let empty: ServiceTable = [(dns.clone(), entry(None, &[]))].into();
        let back: ServiceTable = [(dns, entry(None, &[[10, 244, 1, 2]]))].into();
        assert_eq!(stale_udp(&empty, &back), vec![ConntrackDelete::ToAddress { dst: [10, 96, 0, 10].into() }]);
        assert_eq!(
            ConntrackDelete::ToEndpoint { dst: [10, 96, 0, 10].into(), endpoint: gone }.args().join(" "),
            "-D -p udp --orig-dst 10.96.0.10 --dst-nat 10.244.2.2"
        );
    }

    /// Records the calls; fails like `conntrack` does when nothing matched.
    #[derive(Default)]
    struct Recorder(Vec<String>);

    impl Runner for Recorder {
        fn run(&mut self, program: &str, args: &[&str], _stdin: Option<&[u8]>) -> crate::restore::Result<Vec<u8>> {
            self.0.push(format!("{program} {}", args.join(" ")));
            Err(Error::Failed {
                program: program.into(),
                status: "exit status: 1".into(),
                stderr: "conntrack v1.4.7 (conntrack-tools): 0 flow entries have been deleted.".into(),
            })
        }
    }

    #[test]
    fn stale_udp_flows_are_cleared_from_the_second_sync_on() {
        let dns = ServicePortName::new("kube-system", "dns", "dns", Protocol::Udp);
        let two: ServiceTable = [(dns.clone(), entry(None, &[[10, 244, 1, 2], [10, 244, 2, 2]]))].into();
        let one: ServiceTable = [(dns, entry(None, &[[10, 244, 1, 2]]))].into();
        let (mut flows, mut r) = (StaleUdpFlows::default(), Recorder::default());
        flows.clear(&mut r, &two);
        assert!(r.0.is_empty(), "the first sync has nothing to compare with");
        flows.clear(&mut r, &two);
        assert!(r.0.is_empty(), "no change, no deletion");
        flows.clear(&mut r, &one);
        assert_eq!(r.0, ["conntrack -D -p udp --orig-dst 10.96.0.10 --dst-nat 10.244.2.2"]);
    }
}
