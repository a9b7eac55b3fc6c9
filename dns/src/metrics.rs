//! Prometheus metrics of `weft dns`: queries by type and rcode, a latency histogram, forwarder cache hits
//! and misses, and the index's size. Counters are atomics in one shard per serving thread (no lock and no
//! shared cache line on the hot path); rendering sums the shards.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

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
    pub cache_entries: usize,
}

pub fn render(shards: &[Shard], g: &Gauges) -> String {
    let mut o = String::new();
    let sum = |f: &dyn Fn(&Shard) -> u64| shards.iter().map(f).sum::<u64>();
    let _ = writeln!(o, "# HELP weft_dns_requests_total Queries answered, by query type and response code.");
    let _ = writeln!(o, "# TYPE weft_dns_requests_total counter");
    for t in 0..=TYPES.len() {
        for r in 0..=RCODES.len() {
            let n = sum(&|s| s.queries[t][r].load(Relaxed));
            if n == 0 {
                continue;
            }
            let tn = TYPES.get(t).map_or("other", |x| x.0);
            let rn = RCODES.get(r).map_or("other", |x| x.0);
            let _ = writeln!(o, "weft_dns_requests_total{{type=\"{tn}\",rcode=\"{rn}\"}} {n}");
        }
    }
    let _ = writeln!(o, "# HELP weft_dns_request_duration_seconds Time from receiving a query to sending its answer.");
    let _ = writeln!(o, "# TYPE weft_dns_request_duration_seconds histogram");
    let mut cum = 0;
    for (i, le) in BUCKETS.iter().enumerate() {
        cum += sum(&|s| s.buckets[i].load(Relaxed));
        let _ = writeln!(o, "weft_dns_request_duration_seconds_bucket{{le=\"{le}\"}} {cum}");
    }
    let count = sum(&|s| s.count.load(Relaxed));
    let _ = writeln!(o, "weft_dns_request_duration_seconds_bucket{{le=\"+Inf\"}} {count}");
    let _ = writeln!(o, "weft_dns_request_duration_seconds_sum {}", sum(&|s| s.sum_ns.load(Relaxed)) as f64 / 1e9);
    let _ = writeln!(o, "weft_dns_request_duration_seconds_count {count}");
    let lines: [(&str, &str, &str, String); 10] = [
        (
            "weft_dns_cache_hits_total",
            "counter",
            "Forwarded queries answered from the cache.",
            sum(&|s| s.cache_hits.load(Relaxed)).to_string(),
        ),
        (
            "weft_dns_cache_misses_total",
            "counter",
            "Forwarded queries sent upstream.",
            sum(&|s| s.cache_misses.load(Relaxed)).to_string(),
        ),
        ("weft_dns_cache_entries", "gauge", "Answers in the forwarder's cache.", g.cache_entries.to_string()),
        (
            "weft_dns_dropped_total",
            "counter",
            "Packets that got no answer.",
            sum(&|s| s.dropped.load(Relaxed)).to_string(),
        ),
        (
            "weft_dns_synced",
            "gauge",
            "1 once the first full sync from etcd is in the index.",
            u8::from(g.synced).to_string(),
        ),
        ("weft_dns_index_services", "gauge", "Services in the index.", g.services.to_string()),
        ("weft_dns_index_names", "gauge", "Names in the index.", g.names.to_string()),
        ("weft_dns_index_records", "gauge", "Records in the index.", g.records.to_string()),
        ("weft_dns_index_rebuilds_total", "counter", "Index rebuilds.", g.rebuilds.to_string()),
        (
            "weft_dns_index_rebuild_seconds",
            "gauge",
            "Duration of the last index rebuild.",
            g.last_rebuild.as_secs_f64().to_string(),
        ),
    ];
    for (name, kind, help, value) in lines {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
    }
    o
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
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
    }
}
