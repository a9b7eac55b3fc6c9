//! The kubelet's own server on the node address (port 10250): HTTPS that accepts only clients whose certificate
//! the cluster CA signed, serving container logs (`/containerLogs/<ns>/<pod>/<container>`) and exec
//! (`/exec/<ns>/<pod>/<container>?command=…`): a plain GET runs the command through CRI ExecSync and answers its
//! output and exit code; a WebSocket upgrade (`v4.channel.k8s.io`, `stdin`/`tty` flags) streams it through CRI
//! Exec and the runtime's streaming server. Reads the pods informer, CRI and the containers' log files; changes
//! nothing but what an exec'd command does.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::header::HeaderValue;
use hyper::{Request, Response, StatusCode};
use k8s_cri::v1 as cri;
use k8s_openapi::api::core::v1::Pod;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;
use weft_api::Informer;

use super::config;
use super::cri::{ExecStreams, Runtime};
use super::stream;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading {path}: {message}")]
    Pem { path: PathBuf, message: String },
    #[error("TLS configuration: {0}")]
    Tls(String),
    #[error("binding {addr}")]
    Bind { addr: SocketAddr, source: std::io::Error },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
}

fn pem_err(path: &Path) -> impl FnOnce(rustls::pki_types::pem::Error) -> Error + '_ {
    move |e| Error::Pem { path: path.to_path_buf(), message: e.to_string() }
}

pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs: Vec<_> =
        CertificateDer::pem_file_iter(path).map_err(pem_err(path))?.collect::<Result<_, _>>().map_err(pem_err(path))?;
    if certs.is_empty() {
        return Err(Error::Pem { path: path.to_path_buf(), message: "no certificate".into() });
    }
    Ok(certs)
}

pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path).map_err(pem_err(path))
}

pub fn roots(path: &Path) -> Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    for c in load_certs(path)? {
        roots.add(c).map_err(|e| Error::Tls(e.to_string()))?;
    }
    Ok(roots)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The server side: our certificate, and client certificates required and checked against the CA.
pub fn server_config(files: &TlsFiles) -> Result<rustls::ServerConfig> {
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots(&files.client_ca)?), provider())
            .build()
            .map_err(|e| Error::Tls(e.to_string()))?;
    rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(&files.cert)?, load_key(&files.key)?)
        .map_err(|e| Error::Tls(e.to_string()))
}

/// The client side (`weft logs`, `weft exec`): the CA that signed the kubelets' certificates, our certificate.
pub fn client_config(ca: &Path, cert: &Path, key: &Path) -> Result<rustls::ClientConfig> {
    rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_root_certificates(roots(ca)?)
        .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
        .map_err(|e| Error::Tls(e.to_string()))
}

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn text(status: StatusCode, body: impl Into<String>) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body.into())).boxed());
    *r.status_mut() = status;
    r
}

/// `a=1&b=2` → pairs, percent-decoded.
pub fn query_pairs(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                match u8::from_str_radix(std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz"), 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Percent-encodes a query value.
pub fn encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The content of CRI log lines (`<time> <stream> <P|F> <content>`): partial lines joined, others kept as is.
pub fn parse_cri_log(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let mut parts = line.splitn(4, ' ');
        let (_, stream, tag, content) = (parts.next(), parts.next(), parts.next(), parts.next());
        match (stream, tag) {
            (Some("stdout" | "stderr"), Some("P")) => out.push_str(content.unwrap_or("")),
            (Some("stdout" | "stderr"), Some(_)) => {
                out.push_str(content.unwrap_or(""));
                out.push('\n');
            }
            _ => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

fn tail(text: &str, n: Option<usize>) -> String {
    let Some(n) = n else { return text.to_string() };
    let lines: Vec<&str> = text.lines().collect();
    let mut out = lines[lines.len().saturating_sub(n)..].join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    out
}

struct Server<R> {
    rt: R,
    pods: Informer<Pod>,
    node_name: String,
}

impl<R: Runtime> Server<R> {
    /// The container (`previous`: the attempt before the newest) of a pod bound to this node.
    async fn container(
        &self,
        ns: &str,
        pod: &str,
        name: &str,
        previous: bool,
    ) -> Result<cri::ContainerStatus, (StatusCode, String)> {
        let key = weft_api::ObjectKey::new(Some(ns), pod);
        let p = self.pods.get(&key).ok_or((StatusCode::NOT_FOUND, format!("pod {ns}/{pod} not found on this node")))?;
        if crate::pod::node_name(&p) != self.node_name {
            return Err((StatusCode::NOT_FOUND, format!("pod {ns}/{pod} is not on node {}", self.node_name)));
        }
        let uid = p.metadata.uid.clone().unwrap_or_default();
        let filter = cri::ContainerFilter {
            label_selector: [
                (config::LABEL_POD_UID.to_string(), uid),
                (config::LABEL_CONTAINER_NAME.to_string(), name.to_string()),
            ]
            .into(),
            ..Default::default()
        };
        let mut cs =
            self.rt.list_containers(Some(filter)).await.map_err(|e| (StatusCode::BAD_GATEWAY, e.to_string()))?;
        cs.sort_by_key(|c| std::cmp::Reverse((c.metadata.as_ref().map(|m| m.attempt).unwrap_or(0), c.created_at)));
        let c = cs.get(usize::from(previous)).ok_or_else(|| {
            let what = if previous { "previous terminated container" } else { "container" };
            (StatusCode::NOT_FOUND, format!("{what} {name:?} in pod {ns}/{pod} not found"))
        })?;
        self.rt.container_status(&c.id).await.map_err(|e| (StatusCode::BAD_GATEWAY, e.to_string()))
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path().to_string();
        let query = query_pairs(req.uri().query().unwrap_or(""));
        let get = |k: &str| query.iter().find(|(q, _)| q == k).map(|(_, v)| v.clone());
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        match parts.as_slice() {
            ["healthz"] => text(StatusCode::OK, "ok"),
            ["containerLogs", ns, pod, name] => {
                let previous = get("previous").is_some_and(|v| v == "true");
                let follow = get("follow").is_some_and(|v| v == "true");
                let tail_lines = get("tailLines").and_then(|v| v.parse().ok());
                match self.container(ns, pod, name, previous).await {
                    Ok(st) => self.logs(st, follow, tail_lines).await,
                    Err((code, msg)) => text(code, msg),
                }
            }
            ["exec", ns, pod, name] => {
                let cmd: Vec<String> = query.iter().filter(|(k, _)| k == "command").map(|(_, v)| v.clone()).collect();
                if cmd.is_empty() {
                    return text(StatusCode::BAD_REQUEST, "no command");
                }
                let header = |h: hyper::header::HeaderName| req.headers().get(h).and_then(|v| v.to_str().ok());
                if stream::is_websocket_upgrade(header(hyper::header::UPGRADE), header(hyper::header::CONNECTION)) {
                    let flag = |k: &str, default: bool| get(k).map_or(default, |v| v == "true" || v == "1");
                    let tty = flag("tty", false);
                    // A terminal has one output stream (CRI refuses tty with stderr). With a terminal, containerd's
                    // WebSocket path reads stdin even when it was not asked for, finds it at its end at once, and
                    // closes the terminal's output with it: so a terminal always gets stdin (the client then sends
                    // nothing on it, and the command sees a terminal nobody types on).
                    let streams = ExecStreams {
                        tty,
                        stdin: flag("stdin", false) || tty,
                        stdout: flag("stdout", true),
                        stderr: flag("stderr", !tty) && !tty,
                    };
                    let (ns, pod, name) = (ns.to_string(), pod.to_string(), name.to_string());
                    return self.exec_stream(req, &ns, &pod, &name, cmd, streams).await;
                }
                let st = match self.container(ns, pod, name, false).await {
                    Ok(st) => st,
                    Err((code, msg)) => return text(code, msg),
                };
                match self.rt.exec_sync(&st.id, cmd, Duration::from_secs(300)).await {
                    Ok(r) => {
                        let body = serde_json::json!({
                            "exitCode": r.exit_code,
                            "stdout": String::from_utf8_lossy(&r.stdout),
                            "stderr": String::from_utf8_lossy(&r.stderr),
                        });
                        text(StatusCode::OK, body.to_string())
                    }
                    Err(e) => text(StatusCode::BAD_GATEWAY, e.message()),
                }
            }
            _ => text(StatusCode::NOT_FOUND, "not found"),
        }
    }

    /// Interactive exec: CRI `Exec` gives a URL on the runtime's streaming server; once connected there, the
    /// client's request is upgraded to a WebSocket and the two are relayed. Everything that can fail before the
    /// upgrade is an ordinary HTTP error, so the client shows the reason.
    async fn exec_stream(
        &self,
        req: Request<Incoming>,
        ns: &str,
        pod: &str,
        name: &str,
        cmd: Vec<String>,
        streams: ExecStreams,
    ) -> Response<Body> {
        let headers = req.headers();
        let Some(key) = headers.get(hyper::header::SEC_WEBSOCKET_KEY).map(|k| derive_accept_key(k.as_bytes())) else {
            return text(StatusCode::BAD_REQUEST, "WebSocket upgrade without Sec-WebSocket-Key");
        };
        let offered = headers.get(hyper::header::SEC_WEBSOCKET_PROTOCOL).and_then(|v| v.to_str().ok());
        if !offered.is_some_and(stream::offers_protocol) {
            return text(StatusCode::BAD_REQUEST, format!("exec needs the WebSocket subprotocol {}", stream::PROTOCOL));
        }
        if !streams.stdin && !streams.stdout && !streams.stderr {
            return text(StatusCode::BAD_REQUEST, "exec needs at least one of stdin, stdout and stderr");
        }
        let st = match self.container(ns, pod, name, false).await {
            Ok(st) => st,
            Err((code, msg)) => return text(code, msg),
        };
        let url = match self.rt.exec(&st.id, cmd, streams).await {
            Ok(u) => u,
            Err(e) => return text(StatusCode::BAD_GATEWAY, e.message()),
        };
        let runtime = match connect_runtime(&url).await {
            Ok(ws) => ws,
            Err(e) => return text(StatusCode::BAD_GATEWAY, format!("the runtime's streaming server ({url}): {e}")),
        };
        let upgrade = hyper::upgrade::on(req);
        tokio::spawn(async move {
            match upgrade.await {
                Ok(upgraded) => {
                    let io = hyper_util::rt::TokioIo::new(upgraded);
                    let client = WebSocketStream::from_raw_socket(io, Role::Server, None).await;
                    stream::relay(client, runtime).await;
                }
                Err(e) => tracing::info!(error = %e, "kubelet server: exec upgrade failed"),
            }
        });
        let mut r = Response::new(Full::new(Bytes::new()).boxed());
        *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let h = r.headers_mut();
        h.insert(hyper::header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(hyper::header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(hyper::header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(stream::PROTOCOL));
        if let Ok(v) = HeaderValue::from_str(&key) {
            h.insert(hyper::header::SEC_WEBSOCKET_ACCEPT, v);
        }
        r
    }

    async fn logs(&self, st: cri::ContainerStatus, follow: bool, tail_lines: Option<usize>) -> Response<Body> {
        let path = PathBuf::from(&st.log_path);
        let raw = tokio::fs::read(&path).await.unwrap_or_default();
        let first = tail(&parse_cri_log(&String::from_utf8_lossy(&raw)), tail_lines);
        if !follow {
            return text(StatusCode::OK, first);
        }
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(16);
        let rt = self.rt.clone();
        let id = st.id.clone();
        tokio::spawn(async move {
            if tx.send(Bytes::from(first)).await.is_err() {
                return;
            }
            let mut offset = raw.len();
            let mut pending = String::new();
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let data = tokio::fs::read(&path).await.unwrap_or_default();
                if data.len() > offset {
                    pending.push_str(&String::from_utf8_lossy(&data[offset..]));
                    offset = data.len();
                    // Only whole lines; a partial one waits for its end.
                    if let Some(end) = pending.rfind('\n') {
                        let whole: String = pending.drain(..=end).collect();
                        if tx.send(Bytes::from(parse_cri_log(&whole))).await.is_err() {
                            return;
                        }
                    }
                }
                let running = rt
                    .container_status(&id)
                    .await
                    .is_ok_and(|s| s.state == cri::ContainerState::ContainerRunning as i32);
                if !running || tx.is_closed() {
                    return;
                }
            }
        });
        let stream = futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
        });
        Response::new(StreamBody::new(stream).boxed())
    }
}

/// Connects to the URL CRI `Exec` returned (containerd serves plain HTTP on a loopback address of the node's
/// namespace) and opens the WebSocket there.
async fn connect_runtime(url: &str) -> std::result::Result<WebSocketStream<tokio::net::TcpStream>, String> {
    let ws_url = match url.split_once("://") {
        Some(("http", rest)) => format!("ws://{rest}"),
        Some(("ws", _)) => url.to_string(),
        _ => {
            return Err("only plain http streaming URLs are supported (containerd's enable_tls_streaming is off)".into())
        }
    };
    let mut request = ws_url.as_str().into_client_request().map_err(|e| e.to_string())?;
    let authority = request.uri().authority().map(|a| a.to_string()).ok_or("the URL has no host")?;
    request.headers_mut().insert(hyper::header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(stream::PROTOCOL));
    let tcp = tokio::time::timeout(Duration::from_secs(10), tokio::net::TcpStream::connect(&authority))
        .await
        .map_err(|_| "connecting timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let (ws, _) = tokio_tungstenite::client_async(request, tcp).await.map_err(|e| e.to_string())?;
    Ok(ws)
}

/// Binds `addr` and returns the serving future (the caller spawns it).
pub async fn bind<R: Runtime>(
    addr: SocketAddr,
    files: &TlsFiles,
    rt: R,
    pods: Informer<Pod>,
    node_name: String,
) -> Result<impl std::future::Future<Output = ()>> {
    let tls = tokio_rustls::TlsAcceptor::from(Arc::new(server_config(files)?));
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|source| Error::Bind { addr, source })?;
    let server = Arc::new(Server { rt, pods, node_name });
    Ok(async move {
        // The shared accept loop: at most MAX_CONNECTIONS at once, accept errors backed off.
        weft_api::http::accept_loop(listener, weft_api::http::MAX_CONNECTIONS, "kubelet", move |sock, peer| {
            let tls = tls.clone();
            let server = server.clone();
            async move {
                let stream = match tls.accept(sock).await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::info!(peer = %peer, error = %e, "kubelet server: TLS handshake refused");
                        return;
                    }
                };
                let svc = hyper::service::service_fn(move |req| {
                    let server = server.clone();
                    async move { Ok::<_, Infallible>(server.handle(req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .with_upgrades()
                    .await;
            }
        })
        .await;
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cri_log_lines_become_their_content() {
        let log = "2024-05-01T12:00:00.000000001Z stdout F hello\n2024-05-01T12:00:00.1Z stderr P par\n2024-05-01T12:00:00.2Z stderr F tial\n";
        assert_eq!(parse_cri_log(log), "hello\npartial\n");
        assert_eq!(tail("a\nb\nc\n", Some(2)), "b\nc\n");
        assert_eq!(tail("a\nb\n", None), "a\nb\n");
    }

    #[test]
    fn query_values_round_trip() {
        let cmd = "sh -c 'echo a&b=c'";
        let q = format!("command={}&command=x&tailLines=5", encode(cmd));
        assert_eq!(
            query_pairs(&q),
            vec![("command".into(), cmd.into()), ("command".into(), "x".into()), ("tailLines".into(), "5".into())]
        );
    }
}
