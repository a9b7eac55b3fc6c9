//! The small HTTP/1.1 endpoints every weft daemon exposes (`/healthz`, `/metrics`, status JSON), and
//! the matching one-shot GET for the CLI, on hyper (the protocol) behind one bounded accept loop.
//! Loopback-only by default; not a general web server.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Response {
    pub fn text(status: u16, body: impl Into<String>) -> Response {
        Response { status, content_type: "text/plain; charset=utf-8", body: body.into() }
    }
    pub fn json(body: impl Into<String>) -> Response {
        Response { status: 200, content_type: "application/json", body: body.into() }
    }
    pub fn not_found() -> Response {
        Response::text(404, "not found\n")
    }
}

/// Maps a request path to a response; called for every request.
pub type Handler = Arc<dyn Fn(&str) -> Response + Send + Sync>;

/// Connections a daemon's accept loop serves at once; the next `accept` waits for a slot (the kernel's backlog
/// holds the rest), so a flood of clients cannot exhaust file descriptors or memory.
pub const MAX_CONNECTIONS: usize = 128;

/// How long an accept loop waits after its `failures`-th consecutive error (EMFILE, ENFILE, ENOBUFS…):
/// 10 ms doubling to 1 s, so it neither spins on a full descriptor table nor gives up serving.
pub fn accept_backoff(failures: u32) -> Duration {
    let ms = 10u64.saturating_mul(1u64 << failures.saturating_sub(1).min(10));
    Duration::from_millis(ms.min(1000))
}

/// The one accept loop of weft's TCP servers: at most `limit` connections served at once (each on its own task,
/// by `serve`), errors logged and backed off (`accept_backoff`, reset by a success). Never returns.
pub async fn accept_loop<F, Fut>(listener: TcpListener, limit: usize, what: &str, serve: F)
where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(tokio::sync::Semaphore::new(limit.max(1)));
    let mut failures = 0u32;
    loop {
        // The semaphore is never closed, so this only waits.
        let Ok(permit) = slots.clone().acquire_owned().await else { return };
        match listener.accept().await {
            Ok((sock, peer)) => {
                failures = 0;
                let fut = serve(sock, peer);
                tokio::spawn(async move {
                    fut.await;
                    drop(permit);
                });
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                let wait = accept_backoff(failures);
                if failures == 1 || wait == accept_backoff(u32::MAX) {
                    tracing::warn!(server = what, error = %e, ?wait, "accept failed; backing off");
                }
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// Binds `addr` (an error here is a start-up error) and returns the serving future.
pub async fn bind(addr: SocketAddr, handler: Handler) -> std::io::Result<impl std::future::Future<Output = ()>> {
    let listener = TcpListener::bind(addr).await?;
    Ok(async move {
        accept_loop(listener, MAX_CONNECTIONS, "http", move |sock, _| answer(sock, handler.clone())).await;
    })
}

/// How long a client may take to send its request head (a slow client must not hold one of the slots).
const HEADER_TIMEOUT: Duration = Duration::from_secs(2);

async fn answer(sock: TcpStream, handler: Handler) {
    let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let r = handler(req.uri().path());
        async move {
            hyper::Response::builder()
                .status(r.status)
                .header(hyper::header::CONTENT_TYPE, r.content_type)
                .body(http_body_util::Full::new(hyper::body::Bytes::from(r.body)))
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .keep_alive(false)
        .serve_connection(hyper_util::rt::TokioIo::new(sock), service);
    if let Err(e) = conn.await {
        tracing::debug!(error = %e, "http connection ended with an error");
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("GET http://{addr}{path}: {source}")]
    Io { addr: SocketAddr, path: String, source: std::io::Error },
    #[error("GET http://{addr}{path}: {source}")]
    Http { addr: SocketAddr, path: String, source: hyper::Error },
    #[error("GET http://{addr}{path}: status {status}: {body}")]
    Status { addr: SocketAddr, path: String, status: u16, body: String },
    #[error("GET http://{addr}{path}: no answer within {0:?}", .timeout)]
    Timeout { addr: SocketAddr, path: String, timeout: Duration },
}

/// A one-shot `GET path` against a weft daemon's endpoint; the body on 200.
pub async fn get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<String, Error> {
    use http_body_util::BodyExt;
    let io = |source| Error::Io { addr, path: path.to_string(), source };
    let http = |source| Error::Http { addr, path: path.to_string(), source };
    let fut = async {
        let s = TcpStream::connect(addr).await.map_err(io)?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(s)).await.map_err(http)?;
        let conn = tokio::spawn(conn);
        let req = hyper::Request::get(path)
            .header(hyper::header::HOST, addr.to_string())
            .body(http_body_util::Empty::<hyper::body::Bytes>::new())
            .map_err(|e| io(std::io::Error::new(std::io::ErrorKind::InvalidInput, e)))?;
        let resp = sender.send_request(req).await.map_err(http)?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.map_err(http)?.to_bytes();
        conn.abort();
        Ok::<_, Error>((status, String::from_utf8_lossy(&body).into_owned()))
    };
    let (status, body) = tokio::time::timeout(timeout, fut).await.map_err(|_| Error::Timeout {
        addr,
        path: path.to_string(),
        timeout,
    })??;
    if status != 200 {
        return Err(Error::Status { addr, path: path.to_string(), status, body: body.trim().to_string() });
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn accept_errors_back_off_from_10ms_doubling_to_1s() {
        let ms = |f| accept_backoff(f).as_millis();
        let got: Vec<u128> = [1, 2, 3, 4, 5, 6, 7, 8, 100, u32::MAX].into_iter().map(ms).collect();
        assert_eq!(got, [10, 20, 40, 80, 160, 320, 640, 1000, 1000, 1000]);
    }

    #[tokio::test]
    async fn the_accept_loop_serves_at_most_its_limit_at_once_and_the_rest_after() {
        use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let active = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let (a, m, g) = (active.clone(), most.clone(), gate.clone());
        tokio::spawn(accept_loop(listener, 2, "test", move |mut sock, _| {
            let (a, m, g) = (a.clone(), m.clone(), g.clone());
            async move {
                m.fetch_max(a.fetch_add(1, SeqCst) + 1, SeqCst);
                let _ = g.acquire().await.map(|p| p.forget());
                a.fetch_sub(1, SeqCst);
                let _ = sock.write_all(b"done").await;
            }
        }));
        let clients: Vec<_> = (0..5)
            .map(|_| {
                tokio::spawn(async move {
                    let mut s = TcpStream::connect(addr).await.unwrap();
                    let mut out = String::new();
                    s.read_to_string(&mut out).await.unwrap();
                    out
                })
            })
            .collect();
        // Two are being served and held; the other three wait in the backlog.
        for _ in 0..500 {
            if active.load(SeqCst) == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(active.load(SeqCst), 2);
        gate.add_permits(5);
        for c in clients {
            assert_eq!(c.await.unwrap(), "done");
        }
        assert_eq!(most.load(SeqCst), 2, "never more than the limit at once");
    }

    #[tokio::test]
    async fn serves_and_gets() {
        let handler: Handler = Arc::new(|p: &str| match p {
            "/ok" => Response::text(200, "fine"),
            _ => Response::not_found(),
        });
        let std = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = std.local_addr().unwrap();
        drop(std);
        let server = bind(addr, handler).await.unwrap();
        tokio::spawn(server);
        assert_eq!(get(addr, "/ok", Duration::from_secs(5)).await.unwrap(), "fine");
        assert_eq!(get(addr, "/ok?verbose=1", Duration::from_secs(5)).await.unwrap(), "fine", "query dropped");
        let err = get(addr, "/nope", Duration::from_secs(5)).await.unwrap_err();
        assert!(matches!(err, Error::Status { status: 404, .. }), "{err}");
    }
}
