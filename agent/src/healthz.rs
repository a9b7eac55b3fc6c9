//! `--healthz-addr`: the agent's liveness endpoint, like flanneld's. `/healthz` answers 200 once the
//! agent holds its lease and has programmed the kernel, 503 before; `/state` is the JSON `weft routes` reads
//! (network, subnet, leases, what was programmed; see `status`), 503 before the first apply; anything else is 404.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use weft_api::http::{self, Response};

use crate::status::{self, Snapshot, StateCell};

/// Shared readiness flag set by the agent's loop.
#[derive(Debug, Clone, Default)]
pub struct Health(Arc<AtomicBool>);

impl Health {
    pub fn set_ready(&self, ready: bool) {
        self.0.store(ready, Ordering::Relaxed);
    }
    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// The response for a path: pure, so the routing is tested without sockets.
pub fn respond(path: &str, ready: bool, state: Option<&Snapshot>) -> Response {
    match (path, ready) {
        ("/healthz" | "/", true) => Response::text(200, "ok\n"),
        ("/healthz" | "/", false) => Response::text(503, "not ready: no lease or kernel not programmed yet\n"),
        ("/state", _) => match state.map(|s| serde_json::to_string(&status::render(s))) {
            Some(Ok(json)) => Response::json(json),
            Some(Err(e)) => Response::text(500, format!("rendering the state: {e}\n")),
            None => Response::text(503, "no state yet: no lease or kernel not programmed yet\n"),
        },
        _ => Response::not_found(),
    }
}

/// Binds `addr` now (a taken port is a start-up error) and returns the serving future.
pub async fn bind(
    addr: SocketAddr,
    health: Health,
    state: StateCell,
) -> std::io::Result<impl std::future::Future<Output = ()>> {
    tracing::info!(%addr, "healthz listening");
    http::bind(addr, Arc::new(move |path: &str| respond(path, health.is_ready(), state.get().as_deref()))).await
}

#[cfg(test)]
mod tests {
    use super::respond;

    #[test]
    fn routes() {
        let cases = [
            ("/healthz", true, 200),
            ("/healthz", false, 503),
            ("/", true, 200),
            ("/state", false, 503),
            ("/metrics", true, 404),
            ("", false, 404),
        ];
        for (path, ready, code) in cases {
            assert_eq!(respond(path, ready, None).status, code, "{path:?} ready={ready}");
        }
    }
}
