//! Pieces the proxy benchmarks share: the tiny HTTP server, wrk and its output, per-namespace sysctls for
//! new-connection benchmarks, and summary statistics. Which rounds count is `weft_lab::rounds`.

#![allow(dead_code)] // each example uses its own subset

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Result};
use weft_lab::Netns;

pub const HTTP_PORT: u16 = 8080;

pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The tiny HTTP server: answers every connection with one fixed response and closes. Two threads
/// accept on one listener bound (inside the server namespace) to 0.0.0.0:8080.
pub struct HttpServer {
    listener: TcpListener,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl HttpServer {
    pub fn start(ns: &Netns) -> Result<HttpServer> {
        let path = ns.path();
        let listener = std::thread::spawn(move || -> Result<TcpListener> {
            weft_lab::netns::enter(&path)?;
            Ok(TcpListener::bind(("0.0.0.0", HTTP_PORT))?)
        })
        .join()
        .map_err(|_| anyhow!("server thread panicked"))??;
        listener.set_nonblocking(false)?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for _ in 0..2 {
            let l = listener.try_clone()?;
            let stop = stop.clone();
            threads.push(std::thread::spawn(move || {
                const RESP: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok";
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((mut s, _)) = l.accept() else { continue };
                    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                    let mut got = Vec::new();
                    while let Ok(n) = s.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        got.extend_from_slice(&buf[..n]);
                        if got.windows(4).any(|w| w == b"\r\n\r\n") {
                            let _ = s.write_all(RESP);
                            break;
                        }
                    }
                }
            }));
        }
        Ok(HttpServer { listener, stop, threads })
    }

    /// Wakes the accepting threads (shutdown(2) on a listening socket fails every accept) and joins them.
    pub fn stop(self) {
        use std::os::fd::AsRawFd;
        self.stop.store(true, Ordering::Relaxed);
        // SAFETY: shutdown(2) on a socket we own.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        for t in self.threads {
            let _ = t.join();
        }
    }
}

pub fn tw_sysctls(ns: &Netns) -> Result<()> {
    ns.sysctl("net.ipv4.tcp_max_tw_buckets", "1024")?;
    ns.sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
    ns.sysctl("net.ipv4.tcp_tw_reuse", "1")
}

/// In a namespace whose iptables rules use conntrack (a node with NAT rules: call it after the first sync, when
/// the namespace's conntrack exists), track TIME_WAIT for 1 s instead of 120 s: tens of thousands of new
/// connections per second otherwise fill the table (`nf_conntrack: table full, dropping packet`) within a
/// few rounds and the next round measures the drops. Only this namespace's table changes.
pub fn conntrack_sysctls(ns: &Netns) -> Result<()> {
    ns.sysctl("net.netfilter.nf_conntrack_tcp_timeout_time_wait", "1")
}

/// Conntrack entries in `ns` now (None when the namespace has no conntrack).
pub fn conntrack_count(ns: &Netns) -> Option<u64> {
    ns.exec("cat", &["/proc/sys/net/netfilter/nf_conntrack_count"]).ok()?.trim().parse().ok()
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Wrk {
    pub rps: f64,
    pub lat_avg_ms: f64,
    pub lat_p99_ms: f64,
    pub errors: u64,
}

impl Wrk {
    /// The round's sample for `weft_lab::rounds`: its rate and wrk's socket errors + non-2xx answers.
    pub fn sample(&self) -> weft_lab::rounds::Sample {
        weft_lab::rounds::Sample::new(self.rps, self.errors)
    }
}

pub fn parse_ms(s: &str) -> Option<f64> {
    let (num, unit) = s.split_at(s.find(|c: char| c.is_ascii_alphabetic())?);
    let v: f64 = num.parse().ok()?;
    Some(match unit {
        "us" => v / 1000.0,
        "ms" => v,
        "s" => v * 1000.0,
        "m" => v * 60_000.0,
        _ => return None,
    })
}

pub fn wrk(client: &Netns, url: &str, secs: u64, conns: u32) -> Result<Wrk> {
    let out = client.exec(
        "wrk",
        &["-t1", &format!("-c{conns}"), &format!("-d{secs}s"), "--latency", "-H", "Connection: close", url],
    )?;
    parse_wrk(&out).ok_or_else(|| anyhow!("wrk {url} gave no rate:\n{out}"))
}

/// wrk's report: rate, latency, and its socket errors plus non-2xx/3xx answers as `errors` (None without a rate).
pub fn parse_wrk(out: &str) -> Option<Wrk> {
    let mut w = Wrk::default();
    for line in out.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Requests/sec:", v, ..] => w.rps = v.parse().ok()?,
            ["Latency", avg, ..] if parse_ms(avg).is_some() => w.lat_avg_ms = parse_ms(avg).unwrap_or(f64::NAN),
            ["99%", v] => w.lat_p99_ms = parse_ms(v).unwrap_or(f64::NAN),
            ["Socket", "errors:", rest @ ..] => {
                w.errors += rest.iter().filter_map(|t| t.trim_end_matches(',').parse::<u64>().ok()).sum::<u64>()
            }
            ["Non-2xx", "or", "3xx", "responses:", n] => w.errors += n.parse::<u64>().unwrap_or(0),
            _ => {}
        }
    }
    (w.rps > 0.0).then_some(w)
}

pub fn median(v: Vec<f64>) -> f64 {
    weft_lab::rounds::median(&v)
}

pub fn spread(v: &[f64]) -> String {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{min:.2}–{max:.2}")
}
