//! The small HTTP/1.1 endpoints every weft daemon exposes (`/healthz`, `/metrics`, status JSON), and
//! the matching one-shot GET for the CLI. Loopback-only by default; not a general web server.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
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

/// The path of a request's first line (`GET /healthz HTTP/1.1` → `/healthz`), query string dropped.
pub fn request_path(head: &str) -> &str {
    let target = head.lines().next().and_then(|l| l.split_whitespace().nth(1)).unwrap_or("");
    target.split('?').next().unwrap_or("")
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        404 => "Not Found",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

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

async fn answer(mut sock: TcpStream, handler: Handler) {
    let mut buf = [0u8; 2048];
    let n = match tokio::time::timeout(Duration::from_secs(2), sock.read(&mut buf)).await {
        Ok(Ok(n)) => n,
        _ => return,
    };
    let head = String::from_utf8_lossy(&buf[..n]);
    let r = handler(request_path(&head));
    let out = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
        r.status,
        reason(r.status),
        r.content_type,
        r.body.len(),
        r.body
    );
    let _ = sock.write_all(out.as_bytes()).await;
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("GET http://{addr}{path}: {source}")]
    Io { addr: SocketAddr, path: String, source: std::io::Error },
    #[error("GET http://{addr}{path}: status {status}: {body}")]
    Status { addr: SocketAddr, path: String, status: u16, body: String },
    #[error("GET http://{addr}{path}: no answer within {0:?}", .timeout)]
    Timeout { addr: SocketAddr, path: String, timeout: Duration },
}

/// A one-shot `GET path` against a weft daemon's endpoint; the body on 200.
pub async fn get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<String, Error> {
    let io = |source| Error::Io { addr, path: path.to_string(), source };
    let fut = async {
        let mut s = TcpStream::connect(addr).await.map_err(io)?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).await.map_err(io)?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.map_err(io)?;
        Ok::<_, Error>(String::from_utf8_lossy(&raw).into_owned())
    };
    let raw = tokio::time::timeout(timeout, fut).await.map_err(|_| Error::Timeout {
        addr,
        path: path.to_string(),
        timeout,
    })??;
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((raw.as_str(), ""));
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    if status != 200 {
        return Err(Error::Status { addr, path: path.to_string(), status, body: body.trim().to_string() });
    }
    Ok(body.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn request_paths() {
        for (head, want) in [
            ("GET /healthz HTTP/1.1\r\nHost: x\r\n", "/healthz"),
            ("GET /metrics?x=1 HTTP/1.0", "/metrics"),
            ("garbage", ""),
            ("", ""),
        ] {
            assert_eq!(request_path(head), want, "{head:?}");
        }
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
        let err = get(addr, "/nope", Duration::from_secs(5)).await.unwrap_err();
        assert!(matches!(err, Error::Status { status: 404, .. }), "{err}");
    }
}
