//! `weft logs` and `weft exec`: find the pod's node in the store, then ask that node's kubelet over HTTPS with a
//! client certificate (the kubelet refuses clients without one signed by the cluster CA).

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use k8s_openapi::api::core::v1::{Node, Pod};

use super::server::{client_config, encode};

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

/// `weft exec POD [-c C] -- CMD...` (non-interactive: the command's output and exit code)
#[derive(Debug, Clone, clap::Args)]
pub struct ExecArgs {
    pub pod: String,
    #[arg(short = 'c', long = "container")]
    pub container: Option<String>,
    #[arg(short = 'n', long = "namespace", default_value = "default")]
    pub namespace: String,
    /// pass stdin to the container (not supported by this kubelet: exec is non-interactive)
    #[arg(short = 'i', long = "stdin")]
    pub stdin: bool,
    /// allocate a TTY (not supported: exec is non-interactive)
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

async fn get(k: &KubeletClientArgs, addr: SocketAddr, path: &str, out: &mut dyn Write) -> Result<()> {
    let cfg = client_config(&k.kubelet_certificate_authority, &k.kubelet_client_certificate, &k.kubelet_client_key)?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let tcp =
        tokio::net::TcpStream::connect(addr).await.with_context(|| format!("connecting to the kubelet at {addr}"))?;
    let server_name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    let tls = connector.connect(server_name, tcp).await.with_context(|| format!("TLS with the kubelet at {addr}"))?;
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

pub async fn exec(a: ExecArgs) -> Result<i32> {
    if a.stdin || a.tty {
        eprintln!("weft exec: -i/-t are not supported (this kubelet runs commands non-interactively); running without");
    }
    let (container, addr) = locate(&a.etcd, &a.namespace, &a.pod, a.container.as_deref()).await?;
    let cmd: Vec<String> = a.command.iter().map(|c| format!("command={}", encode(c))).collect();
    let path = format!("/exec/{}/{}/{container}?{}", a.namespace, a.pod, cmd.join("&"));
    let mut body = Vec::new();
    get(&a.kubelet, addr, &path, &mut body).await?;
    let v: serde_json::Value = serde_json::from_slice(&body).context("the kubelet's exec answer")?;
    print!("{}", v["stdout"].as_str().unwrap_or(""));
    eprint!("{}", v["stderr"].as_str().unwrap_or(""));
    Ok(v["exitCode"].as_i64().unwrap_or(1) as i32)
}
