//! `weft dns`: binds its sockets first (names outside the cluster zone are forwarded from the start; cluster
//! names get SERVFAIL until the first sync), then follows Services, Endpoints and Pods (a summary of each,
//! see `watch`) and swaps in a freshly built index after every batch of changes. `/metrics` and `/healthz` report on it.
//! It reads etcd and writes nothing anywhere.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::core::v1::{Endpoints, Pod, Service};
use std::collections::HashMap;

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use tracing::{info, warn};
use weft_api::http::{self, Response};
use weft_api::{ObjectKey, Store};

use crate::forward::Forwarder;
use crate::index::{self, Config, EpInfo, PodInfo, SvcInfo};
use crate::metrics::{self, Gauges};
use crate::server::{self, Server};
use crate::watch::{self, Change};

/// Everything `weft dns` is told on its command line, resolved.
#[derive(Debug, Clone)]
pub struct DnsOptions {
    pub etcd: weft_api::EtcdArgs,
    pub listen: SocketAddr,
    pub config: Config,
    pub upstreams: Vec<SocketAddr>,
    pub upstream_timeout: Duration,
    pub cache_size: usize,
    pub udp_sockets: usize,
    pub metrics_addr: Option<SocketAddr>,
    pub healthz_addr: Option<SocketAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("listening on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
}

fn serial_now() -> u32 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs() as u32).unwrap_or(1)
}

/// Runs the DNS server until SIGTERM/SIGINT.
pub async fn run(opts: DnsOptions) -> Result<(), Error> {
    // glibc's default is up to 8 arenas per core, each keeping freed pages: one per serving thread (so they
    // never wait on each other's malloc lock) plus one for the runtime and one for the index builds.
    let arenas = libc::c_int::try_from(opts.udp_sockets + 2).unwrap_or(8);
    // SAFETY: mallopt only tunes the allocator; called before the serving threads start.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, arenas) };
    let (udp, tcp, addr) =
        server::bind(opts.listen, opts.udp_sockets).map_err(|source| Error::Listen { addr: opts.listen, source })?;
    let forwarder = Forwarder::new(opts.upstreams.clone(), opts.upstream_timeout, opts.cache_size);
    let server = Arc::new(Server::new(opts.config.clone(), forwarder, udp.len()));
    let rt = tokio::runtime::Handle::current();
    for (i, sock) in udp.into_iter().enumerate() {
        let (server, rt) = (server.clone(), rt.clone());
        std::thread::Builder::new()
            .name(format!("dns-udp-{i}"))
            .spawn(move || server::serve_udp(server, sock, i, rt))
            .map_err(|source| Error::Listen { addr, source })?;
    }
    tokio::spawn(server::serve_tcp(server.clone(), tcp));
    info!(%addr, zone = %opts.config.zone, upstreams = ?opts.upstreams, sockets = opts.udp_sockets, "serving DNS over UDP and TCP");

    let gauges = Arc::new(Mutex::new(Gauges::default()));
    serve_endpoints(&opts, server.clone(), gauges.clone()).await?;

    let store = connect(&opts.etcd).await;
    let (svc_tx, svc_rx) = unbounded_channel();
    let (ep_tx, ep_rx) = unbounded_channel();
    let (pod_tx, pod_rx) = unbounded_channel();
    tokio::spawn(watch::follow::<Service>(store.clone(), SvcInfo::of, svc_tx));
    tokio::spawn(watch::follow::<Endpoints>(store.clone(), EpInfo::of, ep_tx));
    tokio::spawn(watch::follow::<Pod>(store, PodInfo::of, pod_tx));
    let indexer = index_loop(server, gauges, svc_rx, ep_rx, pod_rx);

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|source| Error::Listen { addr, source })?;
    tokio::select! {
        _ = indexer => {}
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    info!("dns stopping");
    Ok(())
}

/// Connects to etcd, retrying until it answers: forwarding works meanwhile.
async fn connect(args: &weft_api::EtcdArgs) -> Store {
    let mut delay = Duration::from_millis(200);
    loop {
        match weft_api::connect(args).await {
            Ok(c) => return Store::new(c),
            Err(e) => {
                warn!(error = %weft_api::error_chain(&e), retry_in = ?delay, "etcd not reachable");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// The summaries of every object, by key; `None` until the kind's first list.
#[derive(Default, Clone)]
struct State {
    services: Option<HashMap<ObjectKey, SvcInfo>>,
    endpoints: Option<HashMap<ObjectKey, EpInfo>>,
    pods: Option<HashMap<ObjectKey, PodInfo>>,
}

/// Applies one change; true when it replaced the whole kind (a list or relist: the next build is a full sync).
fn apply<T>(map: &mut Option<HashMap<ObjectKey, T>>, change: Change<T>) -> bool {
    match change {
        Change::Replace(m) => {
            *map = Some(m);
            return true;
        }
        Change::Upsert(k, v) => {
            map.get_or_insert_with(HashMap::new).insert(k, v);
        }
        Change::Remove(k) => {
            if let Some(m) = map.as_mut() {
                m.remove(&k);
            }
        }
    }
    false
}

/// The info line a build deserves: the first one (the zone is now answered), and every full sync (a kind was
/// listed again, after a compaction or a broken watch), so the log shows that the server is serving and current.
/// Builds for ordinary watch events log at debug only.
pub fn sync_message(first: bool, relisted: bool) -> Option<&'static str> {
    match (first, relisted) {
        (true, _) => Some("first sync: answering for the cluster zone"),
        (false, true) => Some("full sync: index rebuilt from a fresh list"),
        (false, false) => None,
    }
}

async fn index_loop(
    server: Arc<Server>,
    gauges: Arc<Mutex<Gauges>>,
    mut svc_rx: UnboundedReceiver<Change<SvcInfo>>,
    mut ep_rx: UnboundedReceiver<Change<EpInfo>>,
    mut pod_rx: UnboundedReceiver<Change<PodInfo>>,
) {
    // Shared with the build on a blocking thread; the build has ended before the next change lands,
    // so `make_mut` never copies.
    let mut state = Arc::new(State::default());
    let mut first = true;
    // A relist seen since the last build (kept across batches that wait for the other kinds' first list).
    let mut relisted = false;
    loop {
        relisted |= tokio::select! {
            Some(c) = svc_rx.recv() => apply(&mut Arc::make_mut(&mut state).services, c),
            Some(c) = ep_rx.recv() => apply(&mut Arc::make_mut(&mut state).endpoints, c),
            Some(c) = pod_rx.recv() => apply(&mut Arc::make_mut(&mut state).pods, c),
            else => return,
        };
        // Everything that arrived so far goes into this build; what arrives during it, into the next.
        {
            let st = Arc::make_mut(&mut state);
            while let Ok(c) = svc_rx.try_recv() {
                relisted |= apply(&mut st.services, c);
            }
            while let Ok(c) = ep_rx.try_recv() {
                relisted |= apply(&mut st.endpoints, c);
            }
            while let Ok(c) = pod_rx.try_recv() {
                relisted |= apply(&mut st.pods, c);
            }
        }
        if state.services.is_none() || state.endpoints.is_none() || state.pods.is_none() {
            continue;
        }
        let (st, cfg) = (state.clone(), server.cfg.clone());
        let started = Instant::now();
        let built = tokio::task::spawn_blocking(move || {
            let (s, e, p) = (
                st.services.iter().flat_map(|m| m.values()),
                st.endpoints.iter().flat_map(|m| m.values()),
                st.pods.iter().flat_map(|m| m.values()),
            );
            index::build_from(&cfg, s, e, p, serial_now())
        })
        .await;
        let Ok(idx) = built else { continue };
        let took = started.elapsed();
        {
            let mut g = gauges.lock().unwrap_or_else(|p| p.into_inner());
            g.synced = true;
            g.services = idx.services;
            g.names = idx.names();
            g.records = idx.records;
            g.rebuilds += 1;
            g.last_rebuild = took;
        }
        match sync_message(first, relisted) {
            Some(msg) => info!(services = idx.services, names = idx.names(), records = idx.records, ?took, "{msg}"),
            None => tracing::debug!(services = idx.services, names = idx.names(), ?took, "index rebuilt"),
        }
        (first, relisted) = (false, false);
        server.index.store(Some(Arc::new(idx)));
        // The previous index is freed once no query holds it; give its pages back rather than keep the peak.
        // SAFETY: malloc_trim only returns free memory to the kernel.
        unsafe { libc::malloc_trim(0) };
    }
}

async fn serve_endpoints(opts: &DnsOptions, server: Arc<Server>, gauges: Arc<Mutex<Gauges>>) -> Result<(), Error> {
    let handler: http::Handler = Arc::new(move |path: &str| {
        let mut g = gauges.lock().unwrap_or_else(|p| p.into_inner()).clone();
        match path {
            "/metrics" => {
                g.cache_entries = server.forwarder.cache_len();
                Response {
                    status: 200,
                    content_type: weft_api::metrics::CONTENT_TYPE,
                    body: metrics::render(&server.shards, &g),
                }
            }
            "/healthz" | "/ready" | "/readyz" => {
                if g.synced {
                    Response::text(200, "ok\n")
                } else {
                    Response::text(503, "not synced from etcd yet\n")
                }
            }
            "/livez" => Response::text(200, "ok\n"),
            _ => Response::not_found(),
        }
    });
    let mut addrs: Vec<SocketAddr> = opts.metrics_addr.into_iter().collect();
    addrs.extend(opts.healthz_addr.filter(|h| Some(*h) != opts.metrics_addr));
    for addr in addrs {
        let srv = http::bind(addr, handler.clone()).await.map_err(|source| Error::Listen { addr, source })?;
        info!(%addr, "serving /metrics and /healthz");
        tokio::spawn(srv);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_build_and_every_full_sync_log_one_info_line() {
        // (first build, a kind was relisted, logs at info)
        let cases = [(true, true, true), (true, false, true), (false, true, true), (false, false, false)];
        for (first, relisted, info) in cases {
            assert_eq!(sync_message(first, relisted).is_some(), info, "first={first} relisted={relisted}");
        }
        let mut m = None;
        assert!(apply(&mut m, Change::<u8>::Replace(HashMap::new())), "a list replaces the kind");
        assert!(!apply(&mut m, Change::Upsert(ObjectKey::new(Some("default"), "a"), 1)), "an event does not");
        assert!(!apply(&mut m, Change::<u8>::Remove(ObjectKey::new(Some("default"), "a"))));
    }
}
