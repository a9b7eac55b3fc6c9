//! Prometheus metrics of `weft dns`: queries by type and rcode, a latency histogram, forwarder cache hits
//! and misses, and the index's size. Counters are atomics in one shard per serving thread (no lock and no
//! shared cache line on the hot path); rendering sums the shards into prometheus-client's OpenMetrics text.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use weft_api::metrics::{encode, HistogramSnapshot};

/// The query types counted by name; everything else is `other`.
pub const TYPES: [(&str, u16); 9] =
    [("A", 1), ("NS", 2), ("CNAME", 5), ("SOA", 6), ("PTR", 12), ("TXT", 16), ("AAAA", 28), ("SRV", 33), ("ANY", 255)];
const OTHER_TYPE: usize = TYPES.len();
/// The response codes counted by name (low 4 bits of the header); everything else is `other`.
pub const RCODES: [(&str, u8); 6] =
    [("NOERROR", 0), ("FORMERR", 1), ("SERVFAIL", 2), ("NXDOMAIN", 3), ("NOTIMP", 4), ("REFUSED", 5)];
const OTHER_RCODE: usize = RCODES.len();

/// Upper bounds of the latency buckets in seconds (CoreDNS's request duration buckets, from 25 µs).
pub const BUCKETS: [f64; 14] =
    [0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5];

#[derive(Default)]
pub struct Shard {
    queries: [[AtomicU64; RCODES.len() + 1]; TYPES.len() + 1],
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_ns: AtomicU64,
    cache_hits: AtomicU64,
    cache_misses: AtomicU64,
    dropped: AtomicU64,
}

impl Shard {
    /// One answered query: its type, the rcode sent and the time from receive to send.
    pub fn observe(&self, qtype: u16, rcode: u8, took: Duration) {
        let t = TYPES.iter().position(|(_, v)| *v == qtype).unwrap_or(OTHER_TYPE);
        let r = RCODES.iter().position(|(_, v)| *v == rcode).unwrap_or(OTHER_RCODE);
        self.queries[t][r].fetch_add(1, Relaxed);
        let secs = took.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|le| secs <= *le) {
            self.buckets[i].fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_ns.fetch_add(u64::try_from(took.as_nanos()).unwrap_or(u64::MAX), Relaxed);
    }

    pub fn cache(&self, hit: bool) {
        if hit { &self.cache_hits } else { &self.cache_misses }.fetch_add(1, Relaxed);
    }

    /// A packet that got no answer (not a query, or too short to say whose it was).
    pub fn dropped(&self) {
        self.dropped.fetch_add(1, Relaxed);
    }
}

/// What the index and the forwarder report at render time.
#[derive(Debug, Default, Clone)]
pub struct Gauges {
    pub synced: bool,
    pub services: usize,
    pub names: usize,
    pub records: usize,
    pub rebuilds: u64,
    pub last_rebuild: Duration,
    pub updates: u64,
    pub last_update: Duration,
    pub cache_entries: usize,
}

/// The shards summed and the gauges, as OpenMetrics text (`weft_api::metrics::CONTENT_TYPE`) built by
/// prometheus-client.
pub fn render(shards: &[Shard], g: &Gauges) -> String {
    let sum = |f: &dyn Fn(&Shard) -> u64| shards.iter().map(f).sum::<u64>();
    let mut r = Registry::default();
    // Counters are registered without `_total`: the encoder appends it.
    let requests = Family::<[(&str, &str); 2], Counter>::default();
    for t in 0..=TYPES.len() {
        for rc in 0..=RCODES.len() {
            let n = sum(&|s| s.queries[t][rc].load(Relaxed));
            if n == 0 {
                continue;
            }
            let tn = TYPES.get(t).map_or("other", |x| x.0);
            let rn = RCODES.get(rc).map_or("other", |x| x.0);
            requests.get_or_create(&[("type", tn), ("rcode", rn)]).inc_by(n);
        }
    }
    r.register("weft_dns_requests", "Queries answered, by query type and response code", requests);
    let per_bucket: Vec<u64> = (0..BUCKETS.len()).map(|i| sum(&|s| s.buckets[i].load(Relaxed))).collect();
    r.register(
        "weft_dns_request_duration_seconds",
        "Time from receiving a query to sending its answer",
        HistogramSnapshot::new(
            &BUCKETS,
            &per_bucket,
            sum(&|s| s.count.load(Relaxed)),
            sum(&|s| s.sum_ns.load(Relaxed)) as f64 / 1e9,
        ),
    );
    r.register(
        "weft_dns_cache_hits",
        "Forwarded queries answered from the cache",
        ConstCounter::new(sum(&|s| s.cache_hits.load(Relaxed))),
    );
    r.register(
        "weft_dns_cache_misses",
        "Forwarded queries sent upstream",
        ConstCounter::new(sum(&|s| s.cache_misses.load(Relaxed))),
    );
    r.register("weft_dns_cache_entries", "Answers in the forwarder's cache", ConstGauge::new(g.cache_entries));
    r.register("weft_dns_dropped", "Packets that got no answer", ConstCounter::new(sum(&|s| s.dropped.load(Relaxed))));
    r.register(
        "weft_dns_synced",
        "1 once the first full sync from etcd is in the index",
        ConstGauge::new(i64::from(g.synced)),
    );
    r.register("weft_dns_index_services", "Services in the index", ConstGauge::new(g.services));
    r.register("weft_dns_index_names", "Names in the index", ConstGauge::new(g.names));
    r.register("weft_dns_index_records", "Records in the index", ConstGauge::new(g.records));
    r.register(
        "weft_dns_index_rebuilds",
        "Whole-index builds (the first sync and each relist)",
        ConstCounter::new(g.rebuilds),
    );
    r.register(
        "weft_dns_index_rebuild_seconds",
        "Duration of the last whole-index build",
        ConstGauge::new(g.last_rebuild.as_secs_f64()),
    );
    r.register("weft_dns_index_updates", "Changes applied to the index in place", ConstCounter::new(g.updates));
    r.register(
        "weft_dns_index_update_seconds",
        "Duration of the last in-place update (one batch of changes)",
        ConstGauge::new(g.last_update.as_secs_f64()),
    );
    encode(&r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_sum_and_histogram_is_cumulative() {
        let shards = [Shard::default(), Shard::default()];
        shards[0].observe(1, 0, Duration::from_micros(20));
        shards[1].observe(1, 0, Duration::from_micros(300));
        shards[1].observe(33, 3, Duration::from_millis(3));
        shards[0].observe(99, 9, Duration::from_secs(10));
        shards[0].cache(true);
        let text = render(&shards, &Gauges { synced: true, names: 7, ..Gauges::default() });
        for line in [
            "weft_dns_requests_total{type=\"A\",rcode=\"NOERROR\"} 2",
            "weft_dns_requests_total{type=\"SRV\",rcode=\"NXDOMAIN\"} 1",
            "weft_dns_requests_total{type=\"other\",rcode=\"other\"} 1",
            "weft_dns_request_duration_seconds_bucket{le=\"0.000025\"} 1",
            "weft_dns_request_duration_seconds_bucket{le=\"0.0005\"} 2",
            "weft_dns_request_duration_seconds_bucket{le=\"2.5\"} 3",
            "weft_dns_request_duration_seconds_bucket{le=\"+Inf\"} 4",
            "weft_dns_cache_hits_total 1",
            "weft_dns_synced 1",
            "weft_dns_index_names 7",
            "# EOF",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
    }
}
