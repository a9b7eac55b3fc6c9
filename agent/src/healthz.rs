//! `--healthz-addr`: a tiny HTTP endpoint for liveness checks, like flanneld's. `/healthz` answers
//! 200 once the agent holds its lease and has programmed the kernel, 503 before; anything else is 404.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

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

/// The response for one request line: pure, so the routing is tested without sockets.
pub fn respond(request_line: &str, ready: bool) -> (u16, &'static str) {
    let path = request_line.split_whitespace().nth(1).unwrap_or("");
    match (path, ready) {
        ("/healthz" | "/", true) => (200, "ok\n"),
        ("/healthz" | "/", false) => (503, "not ready: no lease or kernel not programmed yet\n"),
        _ => (404, "not found\n"),
    }
}

/// Binds `addr` and serves until the task is dropped.
pub async fn serve(addr: SocketAddr, health: Health) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    tracing::info!(%addr, "healthz listening");
    loop {
        let (mut sock, _) = listener.accept().await?;
        let health = health.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let n = match tokio::time::timeout(std::time::Duration::from_secs(2), sock.read(&mut buf)).await {
                Ok(Ok(n)) => n,
                _ => return,
            };
            let head = String::from_utf8_lossy(&buf[..n]);
            let (code, body) = respond(head.lines().next().unwrap_or(""), health.is_ready());
            let reason = match code {
                200 => "OK",
                503 => "Service Unavailable",
                _ => "Not Found",
            };
            let resp = format!(
                "HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::respond;

    #[test]
    fn routes() {
        let cases = [
            ("GET /healthz HTTP/1.1", true, 200),
            ("GET /healthz HTTP/1.1", false, 503),
            ("GET / HTTP/1.0", true, 200),
            ("GET /metrics HTTP/1.1", true, 404),
            ("garbage", true, 404),
            ("", false, 404),
        ];
        for (line, ready, code) in cases {
            assert_eq!(respond(line, ready).0, code, "{line:?} ready={ready}");
        }
    }
}
