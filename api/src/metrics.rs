//! What the daemons' `/metrics` endpoints share: the OpenMetrics text of a `prometheus-client` registry, its
//! content type, and a histogram taken from counts the caller already keeps (a snapshot, not a live metric).

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

/// The content type of what `encode` returns (prometheus-client's OpenMetrics text).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The registry as OpenMetrics text, ending in `# EOF`.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail; an encoder error would mean an invalid name, caught by the unit tests.
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, registry) {
        tracing::warn!("encoding metrics: {e}");
    }
    out
}

/// A histogram from per-bucket (not cumulative) counts: `buckets[i]` observations fell in `(upper[i-1], upper[i]]`,
/// the rest of `count` above the last bound.
#[derive(Debug, Clone)]
pub struct HistogramSnapshot {
    sum: f64,
    count: u64,
    buckets: Vec<(f64, u64)>,
}

impl HistogramSnapshot {
    pub fn new(upper: &[f64], per_bucket: &[u64], count: u64, sum: f64) -> HistogramSnapshot {
        let mut buckets: Vec<(f64, u64)> = upper.iter().copied().zip(per_bucket.iter().copied()).collect();
        let below: u64 = buckets.iter().map(|b| b.1).sum();
        buckets.push((f64::INFINITY, count.saturating_sub(below)));
        HistogramSnapshot { sum, count, buckets }
    }
}

impl EncodeMetric for HistogramSnapshot {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_histogram::<NoLabelSet>(self.sum, self.count, &self.buckets, None)
    }
    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_buckets_are_cumulative_with_inf_and_eof() {
        let mut r = Registry::default();
        r.register("t_seconds", "A test histogram.", HistogramSnapshot::new(&[0.000025, 0.5, 2.0], &[1, 0, 2], 4, 9.5));
        let text = encode(&r);
        for line in [
            "# TYPE t_seconds histogram",
            "t_seconds_bucket{le=\"0.000025\"} 1",
            "t_seconds_bucket{le=\"0.5\"} 1",
            "t_seconds_bucket{le=\"2.0\"} 3",
            "t_seconds_bucket{le=\"+Inf\"} 4",
            "t_seconds_count 4",
            "t_seconds_sum 9.5",
            "# EOF",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
    }
}
