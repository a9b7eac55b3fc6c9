//! `weft proxy`: informers on Services and Endpoints, each keeping only its summary (`summary`: the ports and
//! ready endpoints this node serves, not the objects), feed the `Proxier`; a bounded-frequency runner
//! syncs the dataplane (partial on changes, full every `--sync-period` and after a failure); `/metrics`,
//! `/healthz` and `/services` report on it. It touches etcd (read only) and this namespace's kernel.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::core::v1::{Endpoints, Service};
use tracing::{info, warn};
use weft_api::http::{self, Response};
use weft_api::informer::Backoff;
use weft_api::{Informer, InformerEvent, Store};

use crate::bounded::{BoundedRunner, Intervals};
use crate::dataplane::Dataplane;
use crate::metrics::Metrics;
use crate::proxier::Proxier;
use crate::status::{self, ProxyStatus};

use crate::summary::{self, EndpointsSummary, NodeNames, ServiceSummary};
use crate::tracker::ObjectKey;

/// Everything `weft proxy` is told on its command line, resolved.
pub struct ProxyOptions {
    pub etcd: weft_api::EtcdArgs,
    pub node_name: String,
    pub metrics_addr: Option<SocketAddr>,
    pub healthz_addr: Option<SocketAddr>,
    pub min_sync: Duration,
    pub sync: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Etcd(#[from] weft_api::etcd::Error),
    #[error("listening on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
}

/// What the HTTP endpoints read: updated after every sync, never held during one.
#[derive(Default)]
struct Shared {
    metrics: Metrics,
    /// The `/services` answer (JSON of a `ProxyStatus`), written after each sync.
    status: String,
    last_ok: Option<Instant>,
    /// The skipped inputs already warned about (what the last successful sync skipped).
    warned: std::collections::HashSet<(String, String)>,
}

fn key(k: &weft_api::ObjectKey) -> ObjectKey {
    ObjectKey::new(k.namespace.as_deref().unwrap_or("default"), &k.name)
}

/// Healthy once a sync succeeded, and as long as syncs keep succeeding (kube-proxy's rule of thumb:
/// the last success is younger than twice the sync period, with a floor for short periods).
pub fn healthy(last_ok: Option<Instant>, now: Instant, sync: Duration) -> bool {
    last_ok.is_some_and(|t| now.duration_since(t) <= (sync * 2).max(Duration::from_secs(60)))
}

/// Runs the proxy until SIGTERM/SIGINT. The dataplane is chosen and built by the caller.
pub async fn run(opts: ProxyOptions, dataplane: Box<dyn Dataplane + Send>) -> Result<(), Error> {
    let mode = dataplane.mode();
    let shared = Arc::new(Mutex::new(Shared::default()));
    let waiting = ProxyStatus { mode: mode.to_string(), ..ProxyStatus::default() };
    shared.lock().unwrap_or_else(|p| p.into_inner()).status = serde_json::to_string(&waiting).unwrap_or_default();
    serve_endpoints(&opts, shared.clone(), mode).await?;

    let client = weft_api::connect(&opts.etcd).await?;
    let store = Store::new(client);
    // Each object is summarized as it arrives (the first list page by page): the caches never hold the objects.
    let (services, mut svc_events, svc_run) =
        Informer::<ServiceSummary>::transformed::<Service>(store.clone(), None, Backoff::default(), summary::service);
    let (node, nodes) = (opts.node_name.clone(), NodeNames::default());
    let (endpoints, mut ep_events, ep_run) =
        Informer::<EndpointsSummary>::transformed::<Endpoints>(store, None, Backoff::default(), move |e| {
            summary::endpoints(e, &node, &nodes)
        });
    tokio::spawn(svc_run);
    tokio::spawn(ep_run);
    info!(mode, node = %opts.node_name, "proxy starting; waiting for the first list of Services and Endpoints");
    services.wait_synced().await;
    endpoints.wait_synced().await;

    let proxier = Arc::new(Mutex::new(Proxier::new(dataplane)));
    // The first list is queued whole by now: feed all of it before any sync, so the first sync never sees
    // half of it (a restarted ipvs proxy would delete the other half's virtual servers and their connections).
    {
        let mut p = proxier.lock().unwrap_or_else(|e| e.into_inner());
        while let Ok(InformerEvent { key: k, new, .. }) = svc_events.try_recv() {
            p.on_service(key(&k), new);
        }
        while let Ok(InformerEvent { key: k, new, .. }) = ep_events.try_recv() {
            p.on_endpoints(key(&k), new);
        }
    }
    let runner = BoundedRunner::new(Intervals { min: opts.min_sync, max: opts.sync, retry: Duration::from_secs(1) });
    let trigger = runner.trigger();

    // Informer events go to the change trackers; each asks for a (coalesced) sync.
    let feeder = {
        let proxier = proxier.clone();
        async move {
            loop {
                tokio::select! {
                    Some(InformerEvent { key: k, new, .. }) = svc_events.recv() => {
                        proxier.lock().unwrap_or_else(|p| p.into_inner()).on_service(key(&k), new);
                    }
                    Some(InformerEvent { key: k, new, .. }) = ep_events.recv() => {
                        proxier.lock().unwrap_or_else(|p| p.into_inner()).on_endpoints(key(&k), new);
                    }
                    else => break,
                }
                trigger.run();
            }
        }
    };
    tokio::spawn(feeder);

    let node = opts.node_name.clone();
    let sync_loop = runner.run(move |forced| {
        let (proxier, shared, node) = (proxier.clone(), shared.clone(), node.clone());
        // Off the runtime: an iptables-restore of seconds must not stall /healthz, /metrics or userspace relays.
        async move {
            tokio::task::spawn_blocking(move || sync_once(&proxier, &shared, &node, forced)).await.unwrap_or(Err(()))
        }
    });
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|source| Error::Listen { addr: SocketAddr::from(([0, 0, 0, 0], 0)), source })?;
    tokio::select! {
        _ = sync_loop => {}
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    // Rules stay: established and new connections keep working until a successor takes over.
    info!("proxy stopping; rules stay in place");
    Ok(())
}

fn sync_once(
    proxier: &Mutex<Proxier<Box<dyn Dataplane + Send>>>,
    shared: &Mutex<Shared>,
    node: &str,
    full: bool,
) -> Result<(), ()> {
    let mut p = proxier.lock().unwrap_or_else(|e| e.into_inner());
    if !full && !p.has_pending() && p.table().is_some() {
        return Ok(());
    }
    let started = Instant::now();
    let result = p.sync(full);
    let took = started.elapsed();
    let mut s = shared.lock().unwrap_or_else(|e| e.into_inner());
    match result {
        Ok(outcome) => {
            // One warning per problem, not one per sync: only what the last sync did not already report.
            let now: std::collections::HashSet<(String, String)> =
                outcome.skipped.iter().map(|k| (k.object.clone(), k.reason.clone())).collect();
            for (object, reason) in now.difference(&s.warned) {
                warn!(object = %object, "skipped: {reason}");
            }
            s.warned = now;
            for (port, reason) in &outcome.refused {
                warn!(service = %port, reason = ?reason, "the kernel refused this service port's rules; left out, the rest applied");
            }
            if let Some(table) = p.table() {
                s.status = status::to_json(table, p.dataplane(), node, p.refused());
                s.metrics.service_ports = table.len();
                s.metrics.endpoints = table.values().map(|e| e.endpoints.len()).sum();
            }
            s.metrics.skipped = outcome.skipped.len();
            s.metrics.refused = p.refused().count();
            s.metrics.observe_sync(took, &outcome.stats, SystemTime::now());
            let first = s.last_ok.is_none();
            s.last_ok = Some(Instant::now());
            if outcome.stats.full || first {
                // One line an operator can find: the proxy is serving, and how big and slow a full sync is.
                info!(
                    first,
                    full = outcome.stats.full,
                    service_ports = p.table().map_or(0, |t| t.len()),
                    rules = outcome.stats.rules_written,
                    chains = outcome.stats.chains_written,
                    skipped = outcome.skipped.len(),
                    duration_ms = took.as_millis() as u64,
                    "{}",
                    if first { "first sync complete" } else { "full sync complete" }
                );
            }
            if outcome.stats.full {
                release_freed_memory();
            }
            tracing::debug!(full = outcome.stats.full, changed = outcome.changed, ?took, "synced");
            Ok(())
        }
        Err(e) => {
            s.metrics.sync_errors += 1;
            if matches!(&e, crate::proxier::Error::Dataplane(d) if d.is_map_full()) {
                s.metrics.bpf_map_full += 1;
            }
            warn!("sync failed (next sync is full): {}", weft_api::error_chain(&e));
            Err(())
        }
    }
}

/// glibc keeps freed memory in its arenas: the objects decoded by the first list (freed as soon as they were
/// summarized) and a full sync's short-lived buffers would otherwise stay in the RSS. A full sync follows the
/// first list, so trimming after each one returns both.
fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free heap pages to the kernel; it touches no live allocation.
    unsafe {
        libc::malloc_trim(0);
    }
}

async fn serve_endpoints(opts: &ProxyOptions, shared: Arc<Mutex<Shared>>, mode: &'static str) -> Result<(), Error> {
    let sync = opts.sync;
    let handler = |full: bool| -> http::Handler {
        let shared = shared.clone();
        Arc::new(move |path: &str| {
            let s = shared.lock().unwrap_or_else(|e| e.into_inner());
            match path {
                "/metrics" if full => {
                    let mut m = s.metrics.clone();
                    m.invalid_objects = weft_api::store::rejected_total();
                    Response { status: 200, content_type: weft_api::metrics::CONTENT_TYPE, body: m.render(mode) }
                }
                "/services" if full => Response::json(s.status.clone()),
                "/healthz" | "/livez" => {
                    if healthy(s.last_ok, Instant::now(), sync) {
                        Response::text(200, "ok\n")
                    } else {
                        Response::text(503, "no successful sync yet (or none recently)\n")
                    }
                }
                _ => Response::not_found(),
            }
        })
    };
    if let Some(addr) = opts.metrics_addr {
        let server = http::bind(addr, handler(true)).await.map_err(|source| Error::Listen { addr, source })?;
        info!(%addr, "serving /metrics, /healthz and /services");
        tokio::spawn(server);
    }
    // The health address is often every address (a load balancer probes it): it answers /healthz only.
    if let Some(addr) = opts.healthz_addr.filter(|h| Some(*h) != opts.metrics_addr) {
        let server = http::bind(addr, handler(false)).await.map_err(|source| Error::Listen { addr, source })?;
        info!(%addr, "serving /healthz");
        tokio::spawn(server);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_follows_recent_successful_syncs() {
        let now = Instant::now();
        let sync = Duration::from_secs(30);
        assert!(!healthy(None, now, sync), "not before the first sync");
        assert!(healthy(Some(now), now, sync));
        assert!(healthy(now.checked_sub(Duration::from_secs(59)), now, sync));
        assert!(!healthy(now.checked_sub(Duration::from_secs(61)), now, sync));
        assert!(healthy(now.checked_sub(Duration::from_secs(119)), now, Duration::from_secs(60)));
    }
}
