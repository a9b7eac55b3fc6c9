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

/// Binds `addr` (an error here is a start-up error) and returns the serving future.
pub async fn bind(addr: SocketAddr, handler: Handler) -> std::io::Result<impl std::future::Future<Output = ()>> {
    let listener = TcpListener::bind(addr).await?;
    Ok(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else { continue };
            tokio::spawn(answer(sock, handler.clone()));
        }
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
