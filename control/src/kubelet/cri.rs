//! The kubelet's one seam to the container runtime: a narrow `Runtime` trait over CRI `runtime.v1`, and its real
//! implementation on containerd's unix socket (tonic, `k8s-cri`). It touches nothing but that socket.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::{Channel, Endpoint, Uri};

pub use cri::{
    Container, ContainerConfig, ContainerFilter, ContainerState, ContainerStatus, PodSandbox, PodSandboxConfig,
    PodSandboxFilter, PodSandboxState, PodSandboxStatus,
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("connecting to the container runtime at {endpoint}")]
    Connect { endpoint: String, source: tonic::transport::Error },
    #[error("CRI {call} failed: {}", .source.message())]
    Rpc { call: &'static str, source: tonic::Status },
    #[error("CRI {call}: the runtime's answer has no {what}")]
    Missing { call: &'static str, what: &'static str },
}

impl Error {
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::Rpc { source, .. } if source.code() == tonic::Code::NotFound)
    }
    /// The runtime's own message (what Kubernetes shows as a container's waiting message).
    pub fn message(&self) -> String {
        match self {
            Error::Rpc { source, .. } => source.message().to_string(),
            e => e.to_string(),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What ExecSync returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecResult {
    pub exit_code: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// Which streams a streaming exec carries (CRI refuses `tty` together with `stderr`: a terminal has one output).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExecStreams {
    pub tty: bool,
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
}

/// The CRI calls the kubelet makes; everything else about containers is decided from their results.
pub trait Runtime: Clone + Send + Sync + 'static {
    /// (runtime name, runtime version), e.g. ("containerd", "1.6.20~ds1").
    fn version(&self) -> impl Future<Output = Result<(String, String)>> + Send;
    fn run_pod_sandbox(&self, config: PodSandboxConfig) -> impl Future<Output = Result<String>> + Send;
    fn stop_pod_sandbox(&self, id: &str) -> impl Future<Output = Result<()>> + Send;
    fn remove_pod_sandbox(&self, id: &str) -> impl Future<Output = Result<()>> + Send;
    fn pod_sandbox_status(&self, id: &str) -> impl Future<Output = Result<PodSandboxStatus>> + Send;
    fn list_pod_sandbox(
        &self,
        filter: Option<PodSandboxFilter>,
    ) -> impl Future<Output = Result<Vec<PodSandbox>>> + Send;
    fn create_container(
        &self,
        sandbox_id: &str,
        config: ContainerConfig,
        sandbox_config: PodSandboxConfig,
    ) -> impl Future<Output = Result<String>> + Send;
    fn start_container(&self, id: &str) -> impl Future<Output = Result<()>> + Send;
    /// SIGTERM, then SIGKILL after `timeout`.
    fn stop_container(&self, id: &str, timeout: Duration) -> impl Future<Output = Result<()>> + Send;
    fn remove_container(&self, id: &str) -> impl Future<Output = Result<()>> + Send;
    fn list_containers(&self, filter: Option<ContainerFilter>) -> impl Future<Output = Result<Vec<Container>>> + Send;
    fn container_status(&self, id: &str) -> impl Future<Output = Result<ContainerStatus>> + Send;
    fn exec_sync(
        &self,
        id: &str,
        cmd: Vec<String>,
        timeout: Duration,
    ) -> impl Future<Output = Result<ExecResult>> + Send;
    /// Prepares a streaming exec (CRI `Exec`): the URL on the runtime's streaming server that runs `cmd` once a
    /// client connects to it.
    fn exec(&self, id: &str, cmd: Vec<String>, streams: ExecStreams) -> impl Future<Output = Result<String>> + Send;
    /// Pulls `image`; returns the image reference the runtime resolved it to.
    fn pull_image(&self, image: &str, sandbox_config: PodSandboxConfig) -> impl Future<Output = Result<String>> + Send;
    /// The image's id if the runtime has it.
    fn image_status(&self, image: &str) -> impl Future<Output = Result<Option<String>>> + Send;
}

/// containerd (or any CRI runtime) on a unix socket.
#[derive(Clone)]
pub struct CriRuntime {
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
}

/// `unix:///run/containerd/containerd.sock` or a bare path → the socket path.
pub fn socket_path(endpoint: &str) -> PathBuf {
    PathBuf::from(endpoint.strip_prefix("unix://").unwrap_or(endpoint))
}

impl CriRuntime {
    /// A client for the socket at `endpoint`; connects lazily (and reconnects) on first use.
    pub fn connect(endpoint: &str) -> Result<CriRuntime> {
        let path = socket_path(endpoint);
        let channel = Endpoint::try_from("http://[::]:50051")
            .map_err(|source| Error::Connect { endpoint: endpoint.to_string(), source })?
            .connect_timeout(Duration::from_secs(5))
            .connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?)) }
            }));
        Ok(CriRuntime {
            runtime: RuntimeServiceClient::new(channel.clone()).max_decoding_message_size(64 << 20),
            images: ImageServiceClient::new(channel).max_decoding_message_size(64 << 20),
        })
    }

    pub fn socket_exists(endpoint: &str) -> bool {
        Path::new(&socket_path(endpoint)).exists()
    }
}

fn rpc(call: &'static str) -> impl FnOnce(tonic::Status) -> Error {
    move |source| Error::Rpc { call, source }
}

impl Runtime for CriRuntime {
    async fn version(&self) -> Result<(String, String)> {
        let r = self
            .runtime
            .clone()
            .version(cri::VersionRequest { version: "v1".into() })
            .await
            .map_err(rpc("Version"))?
            .into_inner();
        Ok((r.runtime_name, r.runtime_version))
    }

    async fn run_pod_sandbox(&self, config: PodSandboxConfig) -> Result<String> {
        let req = cri::RunPodSandboxRequest { config: Some(config), runtime_handler: String::new() };
        Ok(self.runtime.clone().run_pod_sandbox(req).await.map_err(rpc("RunPodSandbox"))?.into_inner().pod_sandbox_id)
    }

    async fn stop_pod_sandbox(&self, id: &str) -> Result<()> {
        let req = cri::StopPodSandboxRequest { pod_sandbox_id: id.to_string() };
        self.runtime.clone().stop_pod_sandbox(req).await.map_err(rpc("StopPodSandbox"))?;
        Ok(())
    }

    async fn remove_pod_sandbox(&self, id: &str) -> Result<()> {
        let req = cri::RemovePodSandboxRequest { pod_sandbox_id: id.to_string() };
        self.runtime.clone().remove_pod_sandbox(req).await.map_err(rpc("RemovePodSandbox"))?;
        Ok(())
    }

    async fn pod_sandbox_status(&self, id: &str) -> Result<PodSandboxStatus> {
        let req = cri::PodSandboxStatusRequest { pod_sandbox_id: id.to_string(), verbose: false };
        self.runtime
            .clone()
            .pod_sandbox_status(req)
            .await
            .map_err(rpc("PodSandboxStatus"))?
            .into_inner()
            .status
            .ok_or(Error::Missing { call: "PodSandboxStatus", what: "status" })
    }

    async fn list_pod_sandbox(&self, filter: Option<PodSandboxFilter>) -> Result<Vec<PodSandbox>> {
        let req = cri::ListPodSandboxRequest { filter };
        Ok(self.runtime.clone().list_pod_sandbox(req).await.map_err(rpc("ListPodSandbox"))?.into_inner().items)
    }

    async fn create_container(
        &self,
        sandbox_id: &str,
        config: ContainerConfig,
        sandbox_config: PodSandboxConfig,
    ) -> Result<String> {
        let req = cri::CreateContainerRequest {
            pod_sandbox_id: sandbox_id.to_string(),
            config: Some(config),
            sandbox_config: Some(sandbox_config),
        };
        Ok(self.runtime.clone().create_container(req).await.map_err(rpc("CreateContainer"))?.into_inner().container_id)
    }

    async fn start_container(&self, id: &str) -> Result<()> {
        let req = cri::StartContainerRequest { container_id: id.to_string() };
        self.runtime.clone().start_container(req).await.map_err(rpc("StartContainer"))?;
        Ok(())
    }

    async fn stop_container(&self, id: &str, timeout: Duration) -> Result<()> {
        let req = cri::StopContainerRequest { container_id: id.to_string(), timeout: timeout.as_secs() as i64 };
        let mut req = tonic::Request::new(req);
        // The call itself takes up to the grace period; give it that plus a margin.
        req.set_timeout(timeout + Duration::from_secs(30));
        self.runtime.clone().stop_container(req).await.map_err(rpc("StopContainer"))?;
        Ok(())
    }

    async fn remove_container(&self, id: &str) -> Result<()> {
        let req = cri::RemoveContainerRequest { container_id: id.to_string() };
        self.runtime.clone().remove_container(req).await.map_err(rpc("RemoveContainer"))?;
        Ok(())
    }

    async fn list_containers(&self, filter: Option<ContainerFilter>) -> Result<Vec<Container>> {
        let req = cri::ListContainersRequest { filter };
        Ok(self.runtime.clone().list_containers(req).await.map_err(rpc("ListContainers"))?.into_inner().containers)
    }

    async fn container_status(&self, id: &str) -> Result<ContainerStatus> {
        let req = cri::ContainerStatusRequest { container_id: id.to_string(), verbose: false };
        self.runtime
            .clone()
            .container_status(req)
            .await
            .map_err(rpc("ContainerStatus"))?
            .into_inner()
            .status
            .ok_or(Error::Missing { call: "ContainerStatus", what: "status" })
    }

    async fn exec_sync(&self, id: &str, cmd: Vec<String>, timeout: Duration) -> Result<ExecResult> {
        let secs = timeout.as_secs().max(1) as i64;
        let mut req = tonic::Request::new(cri::ExecSyncRequest { container_id: id.to_string(), cmd, timeout: secs });
        req.set_timeout(timeout + Duration::from_secs(5));
        let r = self.runtime.clone().exec_sync(req).await.map_err(rpc("ExecSync"))?.into_inner();
        Ok(ExecResult { exit_code: r.exit_code, stdout: r.stdout, stderr: r.stderr })
    }

    async fn exec(&self, id: &str, cmd: Vec<String>, streams: ExecStreams) -> Result<String> {
        let req = cri::ExecRequest {
            container_id: id.to_string(),
            cmd,
            tty: streams.tty,
            stdin: streams.stdin,
            stdout: streams.stdout,
            stderr: streams.stderr,
        };
        Ok(self.runtime.clone().exec(req).await.map_err(rpc("Exec"))?.into_inner().url)
    }

    async fn pull_image(&self, image: &str, sandbox_config: PodSandboxConfig) -> Result<String> {
        let req = cri::PullImageRequest {
            image: Some(cri::ImageSpec { image: image.to_string(), ..Default::default() }),
            auth: None,
            sandbox_config: Some(sandbox_config),
        };
        let mut req = tonic::Request::new(req);
        req.set_timeout(Duration::from_secs(120));
        Ok(self.images.clone().pull_image(req).await.map_err(rpc("PullImage"))?.into_inner().image_ref)
    }

    async fn image_status(&self, image: &str) -> Result<Option<String>> {
        let req = cri::ImageStatusRequest {
            image: Some(cri::ImageSpec { image: image.to_string(), ..Default::default() }),
            verbose: false,
        };
        let r = self.images.clone().image_status(req).await.map_err(rpc("ImageStatus"))?.into_inner();
        Ok(r.image.map(|i| i.id))
    }
}
