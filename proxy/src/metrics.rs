//! The proxy's Prometheus metrics: sync duration histogram, what is programmed, last sync time and
//! sync errors, rendered in the text exposition format by a pure function.

use std::fmt::Write;
use std::time::{Duration, SystemTime};

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

    pub fn render(&self, mode: &str) -> String {
        let mut o = String::new();
        let ts = |t: Option<SystemTime>| {
            t.and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok()).map_or(0.0, |d| d.as_secs_f64())
        };
        let _ = writeln!(
            o,
            "# HELP weft_proxy_sync_proxy_rules_duration_seconds Time to sync the dataplane to the service table."
        );
        let _ = writeln!(o, "# TYPE weft_proxy_sync_proxy_rules_duration_seconds histogram");
        for (i, le) in BUCKETS.iter().enumerate() {
            let _ =
                writeln!(o, "weft_proxy_sync_proxy_rules_duration_seconds_bucket{{le=\"{le}\"}} {}", self.buckets[i]);
        }
        let _ = writeln!(o, "weft_proxy_sync_proxy_rules_duration_seconds_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(o, "weft_proxy_sync_proxy_rules_duration_seconds_sum {}", self.sum);
        let _ = writeln!(o, "weft_proxy_sync_proxy_rules_duration_seconds_count {}", self.count);
        let gauges: [(&str, &str, &str, String); 11] = [
            (
                "weft_proxy_sync_proxy_rules_last_timestamp_seconds",
                "gauge",
                "Time of the last successful sync.",
                ts(self.last_sync).to_string(),
            ),
            (
                "weft_proxy_sync_full_proxy_rules_last_timestamp_seconds",
                "gauge",
                "Time of the last successful full sync.",
                ts(self.last_full_sync).to_string(),
            ),
            ("weft_proxy_sync_errors_total", "counter", "Syncs that failed.", self.sync_errors.to_string()),
            (
                "weft_proxy_syncs_total{kind=\"full\"}",
                "counter",
                "Successful syncs by kind.",
                self.full_syncs.to_string(),
            ),
            ("weft_proxy_syncs_total{kind=\"partial\"}", "", "", self.partial_syncs.to_string()),
            ("weft_proxy_service_ports", "gauge", "Service ports in the table.", self.service_ports.to_string()),
            ("weft_proxy_endpoints", "gauge", "Ready endpoints in the table.", self.endpoints.to_string()),
            (
                "weft_proxy_rules_written",
                "gauge",
                "Rules or sockets written by the last sync.",
                self.rules_written.to_string(),
            ),
            (
                "weft_proxy_invalid_objects_total",
                "counter",
                "Objects read from etcd that failed validation and were skipped (once per key and revision).",
                self.invalid_objects.to_string(),
            ),
            (
                "weft_proxy_skipped_inputs",
                "gauge",
                "Service or Endpoints input the last sync could not serve.",
                self.skipped.to_string(),
            ),
            (
                "weft_proxy_refused_service_ports",
                "gauge",
                "Service ports left out because the kernel refused their rules.",
                self.refused.to_string(),
            ),
        ];
        for (name, kind, help, value) in gauges {
            let base = name.split('{').next().unwrap_or(name);
            if !kind.is_empty() {
                let _ = writeln!(o, "# HELP {base} {help}");
                let _ = writeln!(o, "# TYPE {base} {kind}");
            }
            let _ = writeln!(o, "{name} {value}");
        }
        if mode == "ebpf" {
            let _ = writeln!(o, "# HELP weft_proxy_bpf_map_full_total Syncs refused because an eBPF LB map was full (raise --bpf-lb-map-max).\n# TYPE weft_proxy_bpf_map_full_total counter\nweft_proxy_bpf_map_full_total {}", self.bpf_map_full);
        }
        let _ = writeln!(o, "# HELP weft_proxy_info The proxy's mode.\n# TYPE weft_proxy_info gauge\nweft_proxy_info{{mode=\"{mode}\"}} 1");
        o
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
            "weft_proxy_sync_proxy_rules_last_timestamp_seconds 1000",
            "weft_proxy_sync_errors_total 1",
            "weft_proxy_syncs_total{kind=\"full\"} 1",
            "weft_proxy_syncs_total{kind=\"partial\"} 1",
            "weft_proxy_rules_written 5",
            "weft_proxy_info{mode=\"iptables\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
    }
}
