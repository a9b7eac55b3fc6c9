//! etcd access shared by every weft daemon and command: the `--etcd-*` flags and a connected client.
//! Nothing here knows about Kubernetes objects; `store` builds on the client this returns.

use std::path::PathBuf;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};

/// The flags every command that talks to etcd takes, named as flanneld names them.
#[derive(Debug, Clone, clap::Args)]
pub struct EtcdArgs {
    /// etcd endpoints, comma separated (e.g. http://192.168.56.10:2379)
    #[arg(
        long = "etcd-endpoints",
        env = "WEFT_ETCD_ENDPOINTS",
        default_value = "http://127.0.0.1:2379",
        value_delimiter = ','
    )]
    pub endpoints: Vec<String>,
    /// CA certificate (PEM) that signed etcd's server certificate
    #[arg(long = "etcd-cafile")]
    pub cafile: Option<PathBuf>,
    /// client certificate (PEM) for etcd
    #[arg(long = "etcd-certfile", requires = "keyfile")]
    pub certfile: Option<PathBuf>,
    /// client key (PEM) for etcd
    #[arg(long = "etcd-keyfile", requires = "certfile")]
    pub keyfile: Option<PathBuf>,
}

impl EtcdArgs {
    pub fn new(endpoints: Vec<String>) -> Self {
        EtcdArgs { endpoints, cafile: None, certfile: None, keyfile: None }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading {path}: {source}")]
    ReadFile { path: PathBuf, source: std::io::Error },
    #[error("connecting to etcd at {endpoints}: {source}")]
    Connect { endpoints: String, source: etcd_client::Error },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn read(path: &PathBuf) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| Error::ReadFile { path: path.clone(), source })
}

/// Connects to etcd with the given flags. The connection is lazy in etcd-client's sense only for
/// reconnects: an unreachable cluster at start-up is an error the caller retries.
pub async fn connect(args: &EtcdArgs) -> Result<Client> {
    let mut opts = ConnectOptions::new()
        .with_connect_timeout(std::time::Duration::from_secs(3))
        .with_keep_alive(std::time::Duration::from_secs(10), std::time::Duration::from_secs(5));
    if args.cafile.is_some() || args.certfile.is_some() {
        let mut tls = TlsOptions::new();
        if let Some(ca) = &args.cafile {
            tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
        }
        if let (Some(cert), Some(key)) = (&args.certfile, &args.keyfile) {
            tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        opts = opts.with_tls(tls);
    }
    Client::connect(&args.endpoints, Some(opts))
        .await
        .map_err(|source| Error::Connect { endpoints: args.endpoints.join(","), source })
}
