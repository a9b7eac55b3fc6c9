//! `weft dns`: binds its sockets first (names outside the cluster zone are forwarded from the start; cluster
//! names get SERVFAIL until the first sync), then follows Services, Endpoints and Pods with informers that keep
//! a summary of each (`SvcInfo`, `EpInfo`, `PodInfo`). The first sync, and each relist, build the whole index;
//! every other change updates in place only the records of the service name it touches (`index::State`).
//! `/metrics` and `/healthz` report on it.
//! It reads etcd and writes nothing anywhere.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::core::v1::{Endpoints, Pod, Service};
use tokio::sync::mpsc::UnboundedReceiver;
use tracing::{info, warn};
use weft_api::http::{self, Response};
use weft_api::informer::{Backoff, Informer, InformerEvent};
use weft_api::Store;

use crate::forward::Forwarder;
use crate::index::{Config, Delta, EpInfo, PodInfo, State, SvcInfo};
use crate::metrics::{self, Gauges};
use crate::server::{self, Server};

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
    // Each informer keeps only the summary the index needs of an object, made as it is decoded.
    let b = Backoff::default();
    let (svc, svc_rx, run) = Informer::transformed(store.clone(), None, b, |s: Service| SvcInfo::of(&s));
    tokio::spawn(run);
    let (ep, ep_rx, run) = Informer::transformed(store.clone(), None, b, |e: Endpoints| EpInfo::of(&e));
    tokio::spawn(run);
    let (pod, pod_rx, run) = Informer::transformed(store, None, b, |p: Pod| PodInfo::of(&p));
    tokio::spawn(run);
    let informers = Informers { svc, ep, pod };
    let indexer = index_loop(server, gauges, informers, Receivers { svc: svc_rx, ep: ep_rx, pod: pod_rx });

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

/// One informer event, of any of the three kinds.
enum Event {
    Svc(InformerEvent<SvcInfo>),
    Ep(InformerEvent<EpInfo>),
    Pod(InformerEvent<PodInfo>),
}

/// Applies one event to the state; with a zone (after the first build), returns what it changed in the records.
fn apply(state: &mut State, zone: Option<&str>, ev: Event) -> Delta {
    match ev {
        Event::Svc(e) => state.service(zone, e.key.namespace.as_deref().unwrap_or("default"), &e.key.name, e.new),
        Event::Ep(e) => state.endpoints(zone, e.key.namespace.as_deref().unwrap_or("default"), &e.key.name, e.new),
        Event::Pod(e) => state.pod(zone, e.old.as_deref(), e.new),
    }
}

/// The info line a build deserves: the first one (the zone is now answered), and every full sync (a kind was
/// listed again, after a compaction or a broken watch), so the log shows that the server is serving and current.
/// Changes from ordinary watch events are applied in place and logged at debug only.
pub fn sync_message(first: bool) -> &'static str {
    if first {
        "first sync: answering for the cluster zone"
    } else {
        "full sync: index rebuilt after a relist"
    }
}

struct Informers {
    svc: Informer<SvcInfo>,
    ep: Informer<EpInfo>,
    pod: Informer<PodInfo>,
}

impl Informers {
    /// Lists completed by all three: a change means a relist happened.
    fn lists(&self) -> u64 {
        self.svc.lists() + self.ep.lists() + self.pod.lists()
    }
}

struct Receivers {
    svc: UnboundedReceiver<InformerEvent<SvcInfo>>,
    ep: UnboundedReceiver<InformerEvent<EpInfo>>,
    pod: UnboundedReceiver<InformerEvent<PodInfo>>,
}

impl Receivers {
    async fn recv(&mut self) -> Option<Event> {
        tokio::select! {
            Some(e) = self.svc.recv() => Some(Event::Svc(e)),
            Some(e) = self.ep.recv() => Some(Event::Ep(e)),
            Some(e) = self.pod.recv() => Some(Event::Pod(e)),
            else => None,
        }
    }

    fn try_recv(&mut self) -> Option<Event> {
        if let Ok(e) = self.svc.try_recv() {
            return Some(Event::Svc(e));
        }
        if let Ok(e) = self.ep.try_recv() {
            return Some(Event::Ep(e));
        }
        self.pod.try_recv().ok().map(Event::Pod)
    }
}

/// Builds the whole index from `state` on a blocking thread, swaps it in and logs it.
async fn full_build(server: &Server, gauges: &Mutex<Gauges>, state: Arc<State>, first: bool) {
    let cfg = server.cfg.clone();
    let started = Instant::now();
    let idx = match tokio::task::spawn_blocking(move || state.build(&cfg, serial_now())).await {
        Ok(idx) => idx,
        Err(e) => {
            // A bug: keep serving the index there is (and keep updating it).
            tracing::error!(error = %e, "index build failed");
            return;
        }
    };
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
    info!(services = idx.services, names = idx.names(), records = idx.records, ?took, "{}", sync_message(first));
    let old = server.index.write().unwrap_or_else(|p| p.into_inner()).replace(idx);
    // Freed outside the lock; then give its pages back rather than keep the peak.
    drop(old);
    // SAFETY: malloc_trim only returns free memory to the kernel.
    unsafe { libc::malloc_trim(0) };
}

async fn index_loop(server: Arc<Server>, gauges: Arc<Mutex<Gauges>>, informers: Informers, mut rx: Receivers) {
    // The first sync: every kind listed (its events are queued by then), the state built from them at once.
    tokio::join!(informers.svc.wait_synced(), informers.ep.wait_synced(), informers.pod.wait_synced());
    let mut state = State::default();
    while let Some(ev) = rx.try_recv() {
        apply(&mut state, None, ev);
    }
    let mut lists = informers.lists();
    // Shared with the build's thread; the build has ended before the next change, so `make_mut` never copies.
    let mut state = Arc::new(state);
    full_build(&server, &gauges, state.clone(), true).await;
    let zone = server.cfg.zone.clone();
    // A relist that changed nothing sends no event: the tick notices it, so that every full sync is logged.
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        let first = tokio::select! {
            ev = rx.recv() => match ev {
                Some(ev) => Some(ev),
                None => return,
            },
            _ = tick.tick() => None,
        };
        let started = Instant::now();
        // Everything that arrived so far goes into this update.
        let st = Arc::make_mut(&mut state);
        let mut deltas: Vec<Delta> = first.into_iter().map(|ev| apply(st, Some(&zone), ev)).collect();
        while let Some(ev) = rx.try_recv() {
            deltas.push(apply(st, Some(&zone), ev));
        }
        if informers.lists() != lists {
            // A relist: its differences are in the state now; rebuild from it, so that the index is exactly
            // what the objects give even if an update went wrong, and say so in the log.
            lists = informers.lists();
            full_build(&server, &gauges, state.clone(), false).await;
            continue;
        }
        if deltas.is_empty() {
            continue;
        }
        let (services, names, records) = {
            let mut guard = server.index.write().unwrap_or_else(|p| p.into_inner());
            let Some(idx) = guard.as_mut() else { continue };
            for d in deltas.iter().filter(|d| !d.is_empty()) {
                idx.apply(d);
            }
            idx.serial = serial_now();
            (idx.services, idx.names(), idx.records)
        };
        let took = started.elapsed();
        let mut g = gauges.lock().unwrap_or_else(|p| p.into_inner());
        (g.services, g.names, g.records) = (services, names, records);
        g.updates += deltas.len() as u64;
        g.last_update = took;
        tracing::debug!(changes = deltas.len(), services, names, ?took, "index updated");
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
    fn the_first_build_and_every_full_sync_log_distinct_info_lines() {
        assert!(sync_message(true).starts_with("first sync"));
        assert!(sync_message(false).starts_with("full sync"));
    }
}
