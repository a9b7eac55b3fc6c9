//! The proxy's Prometheus metrics: sync duration histogram, what is programmed, last sync time and
//! sync errors, rendered as OpenMetrics text by prometheus-client from a snapshot (a pure function).

use std::time::{Duration, SystemTime};

use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;
use weft_api::metrics::{encode, HistogramSnapshot};

use crate::dataplane::SyncStats;

/// Upper bounds of the sync-duration buckets, in seconds (1 ms … ~16 s, doubling, as kube-proxy's).
pub const BUCKETS: [f64; 15] =
    [0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024, 2.048, 4.096, 8.192, 16.384];

#[derive(Debug, Clone, Default)]
pub struct Metrics {
    /// Cumulative counts per bucket of `BUCKETS`.
    buckets: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
    pub sync_errors: u64,
    pub last_sync: Option<SystemTime>,
    pub last_full_sync: Option<SystemTime>,
    pub service_ports: usize,
    pub endpoints: usize,
    /// Rules (iptables) or sockets (userspace) written by the last sync.
    pub rules_written: usize,
    pub partial_syncs: u64,
    pub full_syncs: u64,
    /// Objects in etcd this process refused to read (once per key and revision; `weft_api::store::rejected_total`).
    pub invalid_objects: u64,
    /// Service and Endpoints input the last sync could not serve.
    pub skipped: usize,
    /// Service ports left out because the kernel refused their rules.
    pub refused: usize,
    /// Syncs that failed because an eBPF LB map was full (ebpf mode).
    pub bpf_map_full: u64,
}

impl Metrics {
    pub fn observe_sync(&mut self, d: Duration, stats: &SyncStats, now: SystemTime) {
        let secs = d.as_secs_f64();
        for (i, le) in BUCKETS.iter().enumerate() {
            if secs <= *le {
                self.buckets[i] += 1;
            }
        }
        self.count += 1;
        self.sum += secs;
        self.last_sync = Some(now);
        self.rules_written = stats.rules_written;
        if stats.full {
            self.full_syncs += 1;
            self.last_full_sync = Some(now);
        } else {
            self.partial_syncs += 1;
        }
    }

    /// The metrics as OpenMetrics text (`weft_api::metrics::CONTENT_TYPE`), built by prometheus-client from a
    /// snapshot of this struct.
    pub fn render(&self, mode: &str) -> String {
        let ts = |t: Option<SystemTime>| {
            t.and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok()).map_or(0.0, |d| d.as_secs_f64())
        };
        // `buckets` is cumulative; the encoder wants each bucket's own count.
        let per_bucket: Vec<u64> =
            self.buckets.iter().scan(0, |prev, &c| Some(c - std::mem::replace(prev, c))).collect();
        let mut r = Registry::default();
        r.register(
            "weft_proxy_sync_proxy_rules_duration_seconds",
            "Time to sync the dataplane to the service table",
            HistogramSnapshot::new(&BUCKETS, &per_bucket, self.count, self.sum),
        );
        r.register(
            "weft_proxy_sync_proxy_rules_last_timestamp_seconds",
            "Time of the last successful sync",
            ConstGauge::new(ts(self.last_sync)),
        );
        r.register(
            "weft_proxy_sync_full_proxy_rules_last_timestamp_seconds",
            "Time of the last successful full sync",
            ConstGauge::new(ts(self.last_full_sync)),
        );
        // Counters are registered without `_total`: the encoder appends it.
        r.register("weft_proxy_sync_errors", "Syncs that failed", ConstCounter::new(self.sync_errors));
        let syncs = Family::<[(&str, &str); 1], Counter>::default();
        syncs.get_or_create(&[("kind", "full")]).inc_by(self.full_syncs);
        syncs.get_or_create(&[("kind", "partial")]).inc_by(self.partial_syncs);
        r.register("weft_proxy_syncs", "Successful syncs by kind", syncs);
        r.register("weft_proxy_service_ports", "Service ports in the table", ConstGauge::new(self.service_ports));
        r.register("weft_proxy_endpoints", "Ready endpoints in the table", ConstGauge::new(self.endpoints));
        r.register(
            "weft_proxy_rules_written",
            "Rules or sockets written by the last sync",
            ConstGauge::new(self.rules_written),
        );
        r.register(
            "weft_proxy_invalid_objects",
            "Objects read from etcd that failed validation and were skipped (once per key and revision)",
            ConstCounter::new(self.invalid_objects),
        );
        r.register(
            "weft_proxy_skipped_inputs",
            "Service or Endpoints input the last sync could not serve",
            ConstGauge::new(self.skipped),
        );
        r.register(
            "weft_proxy_refused_service_ports",
            "Service ports left out because the kernel refused their rules",
            ConstGauge::new(self.refused),
        );
        if mode == "ebpf" {
            r.register(
                "weft_proxy_bpf_map_full",
                "Syncs refused because an eBPF LB map was full (raise --bpf-lb-map-max)",
                ConstCounter::new(self.bpf_map_full),
            );
        }
        let info = Family::<[(&str, String); 1], Gauge>::default();
        info.get_or_create(&[("mode", mode.to_string())]).set(1);
        r.register("weft_proxy_info", "The proxy's mode", info);
        encode(&r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative_and_gauges_follow_syncs() {
        let mut m = Metrics::default();
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        m.observe_sync(Duration::from_millis(3), &SyncStats { full: true, rules_written: 40, ..Default::default() }, t);
        m.observe_sync(
            Duration::from_millis(300),
            &SyncStats { full: false, rules_written: 5, ..Default::default() },
            t,
        );
        m.sync_errors = 1;
        let text = m.render("iptables");
        for line in [
            "weft_proxy_sync_proxy_rules_duration_seconds_bucket{le=\"0.002\"} 0",
            "weft_proxy_sync_proxy_rules_duration_seconds_bucket{le=\"0.004\"} 1",
            "weft_proxy_sync_proxy_rules_duration_seconds_bucket{le=\"0.512\"} 2",
            "weft_proxy_sync_proxy_rules_duration_seconds_bucket{le=\"+Inf\"} 2",
            "weft_proxy_sync_proxy_rules_duration_seconds_count 2",
            "weft_proxy_sync_proxy_rules_last_timestamp_seconds 1000.0",
            "weft_proxy_sync_errors_total 1",
            "weft_proxy_syncs_total{kind=\"full\"} 1",
            "weft_proxy_syncs_total{kind=\"partial\"} 1",
            "weft_proxy_rules_written 5",
            "weft_proxy_info{mode=\"iptables\"} 1",
            "# EOF",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
    }
}
