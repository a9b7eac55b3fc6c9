//! containerd for the kubelet: the config file weft writes (everything under one directory, CRI's sandbox image
//! and CNI dirs given by the caller, runc with cgroupfs) and `weft image import` (a tarball into containerd's
//! `k8s.io` namespace, through `ctr`). Writes only the files and the socket it is pointed at.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The namespace CRI keeps its images and containers in.
pub const CRI_NAMESPACE: &str = "k8s.io";
/// The sandbox image scripts/images.sh builds.
pub const PAUSE_IMAGE: &str = "weft.local/pause:1";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("running {cmd}: {source}")]
    Spawn { cmd: String, source: std::io::Error },
    #[error("{cmd} failed ({status}): {stderr}")]
    Failed { cmd: String, status: std::process::ExitStatus, stderr: String },
    #[error("{what} {value:?} cannot go into a TOML string")]
    BadPath { what: &'static str, value: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Where one containerd keeps everything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub root: PathBuf,
    pub state: PathBuf,
    pub socket: PathBuf,
    pub sandbox_image: String,
    pub cni_conf_dir: PathBuf,
    pub cni_bin_dir: PathBuf,
    /// containerd's own oom_score_adj (None: leave it). Without CAP_SYS_RESOURCE nobody may lower a score, and
    /// the shim runs at containerd's + 1 while CRI asks for containerd's (or less): only 1000 works then.
    pub oom_score: Option<i32>,
}

impl Layout {
    /// root, state and socket under `dir`.
    pub fn under(dir: &Path, cni_conf_dir: &Path, cni_bin_dir: &Path) -> Layout {
        Layout {
            root: dir.join("root"),
            state: dir.join("state"),
            socket: dir.join("containerd.sock"),
            sandbox_image: PAUSE_IMAGE.to_string(),
            cni_conf_dir: cni_conf_dir.to_path_buf(),
            cni_bin_dir: cni_bin_dir.to_path_buf(),
            oom_score: None,
        }
    }
}

fn toml_str(what: &'static str, p: &str) -> Result<String> {
    if p.chars().any(|c| c == '"' || c == '\\' || c.is_control()) {
        return Err(Error::BadPath { what, value: p.to_string() });
    }
    Ok(format!("\"{p}\""))
}

fn path_str(what: &'static str, p: &Path) -> Result<String> {
    toml_str(what, &p.to_string_lossy())
}

/// containerd 1.6's config (version 2) for `layout`.
pub fn render_config(layout: &Layout) -> Result<String> {
    let root = path_str("root", &layout.root)?;
    let state = path_str("state", &layout.state)?;
    let sock = path_str("socket", &layout.socket)?;
    let ttrpc = toml_str("socket", &format!("{}.ttrpc", layout.socket.to_string_lossy()))?;
    let opt = path_str("root", &layout.root.join("opt"))?;
    let runc_root = path_str("state", &layout.state.join("runc"))?;
    let image = toml_str("sandbox image", &layout.sandbox_image)?;
    let conf = path_str("CNI conf dir", &layout.cni_conf_dir)?;
    let bin = path_str("CNI bin dir", &layout.cni_bin_dir)?;
    let cri = "plugins.\"io.containerd.grpc.v1.cri\"";
    let oom = layout.oom_score.map(|o| format!("oom_score = {o}\n")).unwrap_or_default();
    let mut s = String::new();
    // Writing to a String cannot fail.
    let _ = write!(
        s,
        r#"# Written by weft: one containerd whose root, state and socket live under one directory.
version = 2
root = {root}
state = {state}
{oom}# Snapshotters that cannot work here only log errors at start-up.
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]

[grpc]
  address = {sock}

[ttrpc]
  address = {ttrpc}

[plugins."io.containerd.internal.v1.opt"]
  path = {opt}

[{cri}]
  sandbox_image = {image}
  # Pod network namespaces under this containerd's state dir, not the machine's /var/run/netns.
  netns_mounts_under_state_dir = true
  enable_selinux = false
  tolerate_missing_hugetlb_controller = true
  disable_hugetlb_controller = true
  # Never ask for a lower oom_score_adj than containerd's own (-998 for sandboxes is refused without
  # CAP_SYS_RESOURCE, e.g. inside a VM's container or a lab).
  restrict_oom_score_adj = true
  # CRI Exec's streaming server, which the kubelet relays `weft exec -i/-t` to: the loopback address of the
  # namespace containerd and the kubelet share (never reachable from outside it), any free port, plain HTTP.
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_tls_streaming = false

[{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"

[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[{cri}.containerd.runtimes.runc.options]
  # PID 1 is not systemd on these machines: cgroupfs.
  SystemdCgroup = false
  # runc's state beside containerd's, not the machine-wide /run/containerd/runc.
  Root = {runc_root}

[{cri}.cni]
  bin_dir = {bin}
  conf_dir = {conf}
  max_conf_num = 1
"#
    );
    Ok(s)
}

/// True when this process may lower an oom_score_adj (CAP_SYS_RESOURCE in its effective set).
pub fn can_lower_oom_score() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let eff = status.lines().find_map(|l| l.strip_prefix("CapEff:")).map(str::trim).unwrap_or("0");
    u64::from_str_radix(eff, 16).is_ok_and(|caps| caps & (1 << 24) != 0)
}

/// Loads a docker-archive or OCI tarball into containerd's `k8s.io` namespace (unpacked, so CRI can run it).
/// Through `ctr`: containerd's content and image APIs would need their protos, and `ctr` is containerd's own
/// client for exactly this.
pub fn import_image(socket: &Path, file: &Path) -> Result<String> {
    let mut cmd = Command::new("ctr");
    cmd.arg("--address").arg(socket).args(["-n", CRI_NAMESPACE, "images", "import"]).arg(file);
    let desc = format!("{cmd:?}");
    let out = cmd.output().map_err(|source| Error::Spawn { cmd: desc.clone(), source })?;
    if !out.status.success() {
        return Err(Error::Failed {
            cmd: desc,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_puts_everything_under_the_directory() {
        let l = Layout::under(Path::new("/run/lab1/node-1/containerd"), Path::new("/etc/cni"), Path::new("/opt/cni"));
        let s = render_config(&l).unwrap();
        for want in [
            "root = \"/run/lab1/node-1/containerd/root\"",
            "state = \"/run/lab1/node-1/containerd/state\"",
            "address = \"/run/lab1/node-1/containerd/containerd.sock\"",
            "sandbox_image = \"weft.local/pause:1\"",
            "SystemdCgroup = false",
            "bin_dir = \"/opt/cni\"",
            "conf_dir = \"/etc/cni\"",
            "stream_server_address = \"127.0.0.1\"",
        ] {
            assert!(s.contains(want), "{want} missing from\n{s}");
        }
    }

    #[test]
    fn config_refuses_paths_that_would_break_the_toml() {
        let l = Layout::under(Path::new("/tmp/a\"b"), Path::new("/etc/cni"), Path::new("/opt/cni"));
        assert!(render_config(&l).is_err());
    }
}
