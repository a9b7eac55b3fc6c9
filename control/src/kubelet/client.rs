//! `weft logs` and `weft exec`: find the pod's node in the store, then ask that node's kubelet over HTTPS with a
//! client certificate (the kubelet refuses clients without one signed by the cluster CA). `weft exec -i/-t`
//! upgrades that connection to a WebSocket (`stream`) and puts the local terminal in raw mode (`term`).

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use k8s_openapi::api::core::v1::{Node, Pod};

use super::server::{client_config, encode};
use super::{stream, term};

/// How to reach kubelets: the cluster CA and a client certificate it signed.
#[derive(Debug, Clone, clap::Args)]
pub struct KubeletClientArgs {
    /// CA certificate (PEM) that signed the kubelets' serving certificates
    #[arg(long, env = "WEFT_KUBELET_CA")]
    pub kubelet_certificate_authority: PathBuf,
    /// client certificate (PEM) signed by the cluster CA
    #[arg(long, env = "WEFT_KUBELET_CLIENT_CERT")]
    pub kubelet_client_certificate: PathBuf,
    /// its key (PEM)
    #[arg(long, env = "WEFT_KUBELET_CLIENT_KEY")]
    pub kubelet_client_key: PathBuf,
}

/// `weft logs POD [-c C] [-f] [--tail N] [--previous]`
#[derive(Debug, Clone, clap::Args)]
pub struct LogsArgs {
    pub pod: String,
    #[arg(short = 'c', long = "container")]
    pub container: Option<String>,
    #[arg(short = 'n', long = "namespace", default_value = "default")]
    pub namespace: String,
    /// keep streaming new output
    #[arg(short = 'f', long = "follow")]
    pub follow: bool,
    /// only the last N lines
    #[arg(long = "tail")]
    pub tail: Option<i64>,
    /// the previous (terminated) instance of the container
    #[arg(short = 'p', long = "previous")]
    pub previous: bool,
    #[command(flatten)]
    pub kubelet: KubeletClientArgs,
    #[command(flatten)]
    pub etcd: weft_api::EtcdArgs,
}

/// `weft exec POD [-c C] [-i] [-t] -- CMD...`
#[derive(Debug, Clone, clap::Args)]
#[command(after_help = "Without -i/-t the command runs to completion and its output is printed (CRI ExecSync). \
With -i and/or -t it is streamed over a WebSocket on the kubelet's port (CRI Exec): -i passes stdin to the \
command; -t gives it a terminal, with the local terminal in raw mode while it runs (restored on exit) and the \
window size passed at start and on every resize. As with kubectl, -t together with -i needs stdin to be a \
terminal (otherwise it runs without one, with a warning). The end of piped stdin is not passed on: the \
channel protocol this containerd speaks has no way to close stdin alone, so a command must end by itself \
(e.g. `read` a line and exit). Exit code: the command's.")]
pub struct ExecArgs {
    pub pod: String,
    #[arg(short = 'c', long = "container")]
    pub container: Option<String>,
    #[arg(short = 'n', long = "namespace", default_value = "default")]
    pub namespace: String,
    /// pass stdin to the container
    #[arg(short = 'i', long = "stdin")]
    pub stdin: bool,
    /// allocate a TTY for the command (the local terminal goes raw while it runs)
    #[arg(short = 't', long = "tty")]
    pub tty: bool,
    /// the command and its arguments (after --)
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
    #[command(flatten)]
    pub kubelet: KubeletClientArgs,
    #[command(flatten)]
    pub etcd: weft_api::EtcdArgs,
}

/// The pod, its container name and the address of its node's kubelet.
async fn locate(
    etcd: &weft_api::EtcdArgs,
    ns: &str,
    pod: &str,
    container: Option<&str>,
) -> Result<(String, SocketAddr)> {
    let store = weft_api::Store::new(weft_api::connect(etcd).await?);
    let p: Pod = store.get(Some(ns), pod).await?;
    let spec = p.spec.as_ref().context("pod has no spec")?;
    let name = match container {
        Some(c) => {
            if !spec.containers.iter().chain(spec.init_containers.iter().flatten()).any(|x| x.name == c) {
                bail!("container {c} is not valid for pod {pod}");
            }
            c.to_string()
        }
        None => spec.containers.first().map(|c| c.name.clone()).context("pod has no containers")?,
    };
    let node_name = spec
        .node_name
        .clone()
        .filter(|n| !n.is_empty())
        .with_context(|| format!("pod {pod} is not bound to a node"))?;
    let node: Node = store.get(None, &node_name).await?;
    let status = node.status.as_ref().context("node has no status")?;
    let ip = status
        .addresses
        .iter()
        .flatten()
        .find(|a| a.type_ == "InternalIP")
        .map(|a| a.address.clone())
        .with_context(|| format!("node {node_name} has no InternalIP"))?;
    let port =
        status.daemon_endpoints.as_ref().and_then(|d| d.kubelet_endpoint.as_ref()).map(|e| e.port).unwrap_or(10250);
    let addr: SocketAddr = format!("{ip}:{port}").parse().with_context(|| format!("node address {ip:?}"))?;
    Ok((name, addr))
}

async fn tls_connect(
    k: &KubeletClientArgs,
    addr: SocketAddr,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let cfg = client_config(&k.kubelet_certificate_authority, &k.kubelet_client_certificate, &k.kubelet_client_key)?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let tcp =
        tokio::net::TcpStream::connect(addr).await.with_context(|| format!("connecting to the kubelet at {addr}"))?;
    let server_name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    connector.connect(server_name, tcp).await.with_context(|| format!("TLS with the kubelet at {addr}"))
}

async fn get(k: &KubeletClientArgs, addr: SocketAddr, path: &str, out: &mut dyn Write) -> Result<()> {
    let tls = tls_connect(k, addr).await?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = hyper::Request::builder()
        .method("GET")
        .uri(path)
        .header("Host", addr.to_string())
        .body(Empty::<Bytes>::new())?;
    let mut resp = send.send_request(req).await?;
    let status = resp.status();
    if !status.is_success() {
        let body = resp.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        driver.abort();
        bail!("{}", String::from_utf8_lossy(&body).trim());
    }
    while let Some(frame) = resp.body_mut().frame().await {
        if let Ok(data) = frame?.into_data() {
            out.write_all(&data)?;
            out.flush()?;
        }
    }
    driver.abort();
    Ok(())
}

pub async fn logs(a: LogsArgs) -> Result<i32> {
    let (container, addr) = locate(&a.etcd, &a.namespace, &a.pod, a.container.as_deref()).await?;
    let mut path = format!("/containerLogs/{}/{}/{container}?", a.namespace, a.pod);
    if a.follow {
        path.push_str("follow=true&");
    }
    if a.previous {
        path.push_str("previous=true&");
    }
    if let Some(n) = a.tail.filter(|n| *n >= 0) {
        path.push_str(&format!("tailLines={n}&"));
    }
    get(&a.kubelet, addr, path.trim_end_matches(['?', '&']), &mut std::io::stdout()).await?;
    Ok(0)
}

/// The exec path with its query: the command, then `extra` flags.
fn exec_path(ns: &str, pod: &str, container: &str, command: &[String], extra: &[(&str, bool)]) -> String {
    let mut q: Vec<String> = command.iter().map(|c| format!("command={}", encode(c))).collect();
    q.extend(extra.iter().map(|(k, v)| format!("{k}={v}")));
    format!("/exec/{ns}/{pod}/{container}?{}", q.join("&"))
}

pub async fn exec(a: ExecArgs) -> Result<i32> {
    if a.stdin || a.tty {
        return exec_stream(a).await;
    }
    let (container, addr) = locate(&a.etcd, &a.namespace, &a.pod, a.container.as_deref()).await?;
    let path = exec_path(&a.namespace, &a.pod, &container, &a.command, &[]);
    let mut body = Vec::new();
    get(&a.kubelet, addr, &path, &mut body).await?;
    let v: serde_json::Value = serde_json::from_slice(&body).context("the kubelet's exec answer")?;
    print!("{}", v["stdout"].as_str().unwrap_or(""));
    eprint!("{}", v["stderr"].as_str().unwrap_or(""));
    Ok(v["exitCode"].as_i64().unwrap_or(1) as i32)
}

/// `-i`/`-t`: a WebSocket on the kubelet's port (same TLS and client certificate), stdin sent as it comes,
/// output written as it arrives, the exit code from the status channel.
async fn exec_stream(a: ExecArgs) -> Result<i32> {
    use futures::{SinkExt, StreamExt};
    use std::io::IsTerminal;
    use tokio_tungstenite::tungstenite::{client::IntoClientRequest, Error as WsError, Message};

    let mut tty = a.tty;
    if a.stdin && a.tty && !std::io::stdin().is_terminal() {
        // kubectl's rule: a terminal fed from a pipe would echo and mangle the input.
        eprintln!("Unable to use a TTY - input is not a terminal or the right kind of file");
        tty = false;
    }
    let (container, addr) = locate(&a.etcd, &a.namespace, &a.pod, a.container.as_deref()).await?;
    let path = exec_path(
        &a.namespace,
        &a.pod,
        &container,
        &a.command,
        &[("stdin", a.stdin), ("stdout", true), ("stderr", !tty), ("tty", tty)],
    );
    let mut request = format!("wss://{addr}{path}").into_client_request()?;
    request.headers_mut().insert("Sec-WebSocket-Protocol", stream::PROTOCOL.parse()?);
    let tls = tls_connect(&a.kubelet, addr).await?;
    let mut ws = match tokio_tungstenite::client_async(request, tls).await {
        Ok((ws, _)) => ws,
        Err(WsError::Http(resp)) => {
            let body = resp.body().as_deref().map(String::from_utf8_lossy).unwrap_or_default();
            let body = body.trim();
            bail!("{}", if body.is_empty() { resp.status().to_string() } else { body.to_string() });
        }
        Err(e) => return Err(e).with_context(|| format!("exec through the kubelet at {addr}")),
    };

    // Stdin from a thread of its own: a blocking read that never returns must not hold up the runtime's exit.
    let (stdin_tx, mut stdin_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(8);
    if a.stdin {
        std::thread::spawn(move || {
            use std::io::Read;
            let mut input = std::io::stdin().lock();
            let mut buf = vec![0u8; 8192];
            while let Ok(n) = input.read(&mut buf) {
                if n == 0 || stdin_tx.blocking_send(buf[..n].to_vec()).is_err() {
                    return;
                }
            }
        });
    } else {
        drop(stdin_tx);
    }
    let raw =
        if tty && a.stdin { Some(term::RawMode::enter().context("putting the terminal in raw mode")?) } else { None };
    let result = async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut winch = signal(SignalKind::window_change())?;
        let mut term = signal(SignalKind::terminate())?;
        let mut hup = signal(SignalKind::hangup())?;
        let mut last_size = None;
        if tty {
            last_size = term::window_size();
            if let Some((w, h)) = last_size {
                ws.send(Message::Binary(stream::resize(w, h).into())).await?;
            }
        }
        let mut stdin_open = a.stdin;
        loop {
            tokio::select! {
                m = ws.next() => {
                    let data = match m {
                        Some(Ok(Message::Binary(b))) => b,
                        Some(Ok(Message::Close(_))) | None => {
                            bail!("the kubelet closed the exec stream without the command's exit status")
                        }
                        Some(Ok(_)) => continue,
                        Some(Err(e)) => return Err(e).context("the exec stream"),
                    };
                    let Some((channel, payload)) = stream::split(&data) else { continue };
                    match channel {
                        stream::STDOUT => {
                            let mut out = std::io::stdout().lock();
                            out.write_all(payload)?;
                            out.flush()?;
                        }
                        stream::STDERR => {
                            let mut err = std::io::stderr().lock();
                            err.write_all(payload)?;
                            err.flush()?;
                        }
                        stream::STATUS => {
                            let _ = ws.close(None).await;
                            return match stream::outcome(payload) {
                                stream::Outcome::Exited(code) => Ok(code),
                                stream::Outcome::Failed(msg) => Err(anyhow::anyhow!(msg)),
                            };
                        }
                        _ => {}
                    }
                }
                d = stdin_rx.recv(), if stdin_open => match d {
                    Some(d) => ws.send(Message::Binary(stream::frame(stream::STDIN, &d).into())).await?,
                    None => stdin_open = false,
                },
                _ = winch.recv(), if tty => {
                    let size = term::window_size();
                    if size != last_size {
                        last_size = size;
                        if let Some((w, h)) = size {
                            ws.send(Message::Binary(stream::resize(w, h).into())).await?;
                        }
                    }
                }
                _ = term.recv() => bail!("terminated"),
                _ = hup.recv() => bail!("hung up"),
            }
        }
    }
    .await;
    // The terminal back as it was before anything is printed about how it went.
    drop(raw);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_paths_carry_the_command_then_the_stream_flags() {
        let cmd = |c: &[&str]| c.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        type Case<'a> = (&'a [&'a str], &'a [(&'a str, bool)], &'a str);
        let cases: &[Case] = &[
            (&["ls"], &[], "/exec/ns/p/c?command=ls"),
            (&["sh", "-c", "echo a b"], &[], "/exec/ns/p/c?command=sh&command=-c&command=echo%20a%20b"),
            (
                &["cat"],
                &[("stdin", true), ("stdout", true), ("stderr", false), ("tty", true)],
                "/exec/ns/p/c?command=cat&stdin=true&stdout=true&stderr=false&tty=true",
            ),
        ];
        for (command, flags, want) in cases {
            assert_eq!(exec_path("ns", "p", "c", &cmd(command), flags), *want);
        }
    }
}
