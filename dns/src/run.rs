//! `weft dns`: binds its sockets first (names outside the cluster zone are forwarded from the start; cluster
//! names get SERVFAIL until the first sync), then follows Services, Endpoints and Pods with informers and
//! swaps in a freshly built index after every batch of changes. `/metrics` and `/healthz` report on it.
//! It reads etcd and writes nothing anywhere.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::core::v1::{Endpoints, Pod, Service};
use tokio::sync::mpsc::UnboundedReceiver;
use tracing::{info, warn};
use weft_api::http::{self, Response};
use weft_api::{Informer, InformerEvent, Store};

use crate::forward::Forwarder;
use crate::index::{self, Config};
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
    let (services, svc_ev, svc_run) = Informer::<Service>::new(store.clone(), None);
    let (endpoints, ep_ev, ep_run) = Informer::<Endpoints>::new(store.clone(), None);
    let (pods, pod_ev, pod_run) = Informer::<Pod>::new(store, None);
    tokio::spawn(svc_run);
    tokio::spawn(ep_run);
    tokio::spawn(pod_run);
    let indexer = index_loop(server, gauges, services, endpoints, pods, svc_ev, ep_ev, pod_ev);

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

#[allow(clippy::too_many_arguments)]
async fn index_loop(
    server: Arc<Server>,
    gauges: Arc<Mutex<Gauges>>,
    services: Informer<Service>,
    endpoints: Informer<Endpoints>,
    pods: Informer<Pod>,
    mut svc_ev: UnboundedReceiver<InformerEvent<Service>>,
    mut ep_ev: UnboundedReceiver<InformerEvent<Endpoints>>,
    mut pod_ev: UnboundedReceiver<InformerEvent<Pod>>,
) {
    services.wait_synced().await;
    endpoints.wait_synced().await;
    pods.wait_synced().await;
    let mut first = true;
    loop {
        // Everything that arrived so far goes into this build; what arrives during it, into the next.
        while svc_ev.try_recv().is_ok() || ep_ev.try_recv().is_ok() || pod_ev.try_recv().is_ok() {}
        let (s, e, p) = (services.list(), endpoints.list(), pods.list());
        let cfg = server.cfg.clone();
        let started = Instant::now();
        let built = tokio::task::spawn_blocking(move || index::build(&cfg, &s, &e, &p, serial_now())).await;
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
        if first {
            info!(
                services = idx.services,
                names = idx.names(),
                records = idx.records,
                ?took,
                "first sync: answering for the cluster zone"
            );
            first = false;
        } else {
            tracing::debug!(services = idx.services, names = idx.names(), ?took, "index rebuilt");
        }
        server.index.store(Some(Arc::new(idx)));
        tokio::select! {
            Some(_) = svc_ev.recv() => {}
            Some(_) = ep_ev.recv() => {}
            Some(_) = pod_ev.recv() => {}
            else => return,
        }
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
                    content_type: "text/plain; version=0.0.4",
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
