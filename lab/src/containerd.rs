//! A real containerd for tests: its own netns (where CNI's bridge + host-local give sandboxes addresses), its own
//! root/state/socket in a temporary directory, its own cgroup parent (never the root cgroup), weft's local images
//! imported. On drop: containers killed through their cgroups, containerd and its shims killed, mounts under the
//! directory unmounted, the directory, cgroups and netns removed.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::netns::{run, unique_id, Netns};

/// The pod subnet CNI hands out inside a fixture's namespace (each fixture has its own namespace).
pub const POD_SUBNET: &str = "10.88.0.0/24";

pub struct ContainerdFixture {
    id: String,
    dir: tempfile::TempDir,
    child: Option<Child>,
    etcd: Option<Child>,
    ns: Netns,
}

/// Builds (if needed) weft's local images with scripts/images.sh; returns the directory holding the tarballs.
pub fn images_dir() -> Result<PathBuf> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/images.sh");
    let out = run(Command::new("bash").arg(&script))?;
    let dir = String::from_utf8_lossy(&out.stdout).trim().lines().last().unwrap_or_default().to_string();
    Ok(PathBuf::from(dir))
}

impl ContainerdFixture {
    /// Starts containerd in a fresh namespace and imports `weft.local/pause:1` and `weft.local/busybox:1`.
    pub fn start() -> Result<ContainerdFixture> {
        let id = unique_id();
        let ns = Netns::create_named(&format!("weft-{id}-ctd"))?;
        let dir = tempfile::Builder::new().prefix("weft-ctd-").tempdir()?;
        let mut f = ContainerdFixture { id, dir, child: None, etcd: None, ns };
        let net_d = f.dir().join("net.d");
        std::fs::create_dir_all(&net_d)?;
        let conf = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "weft-test",
            "plugins": [{
                "type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false,
                "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_SUBNET}]],
                         "dataDir": f.dir().join("ipam")},
            }],
        });
        std::fs::write(net_d.join("10-weft-test.conflist"), serde_json::to_vec_pretty(&conf)?)?;
        let config = f.dir().join("config.toml");
        run(Command::new(crate::weft_bin())
            .args(["containerd-config", "--dir"])
            .arg(f.dir())
            .arg("--cni-conf-dir")
            .arg(&net_d)
            .arg("--cni-bin-dir")
            .arg(crate::bins::cni_bin_dir(None)?)
            .arg("-o")
            .arg(&config))?;
        let log = std::fs::File::create(f.log_path())?;
        let child = f
            .net_command("containerd")
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting containerd (run scripts/setup.sh)")?;
        f.child = Some(child);
        f.wait_ready(Duration::from_secs(30))?;
        let images = images_dir()?;
        run(Command::new(crate::weft_bin())
            .args(["image", "import", "--address"])
            .arg(f.socket())
            .arg(images.join("pause.tar"))
            .arg(images.join("busybox.tar")))?;
        Ok(f)
    }

    fn wait_ready(&mut self, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(c) = self.child.as_mut() {
                if let Some(status) = c.try_wait()? {
                    bail!("containerd exited ({status}): {}", self.log_tail(10));
                }
            }
            let ok = Command::new("ctr")
                .arg("--address")
                .arg(self.socket())
                .arg("version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("containerd not ready within {limit:?}: {}", self.log_tail(10))
    }

    /// Starts a real etcd inside the namespace on 127.0.0.1:2379 (the namespace's own loopback), for a kubelet
    /// running in the namespace; the test reaches it through `self.netns().runtime()`.
    pub fn start_etcd(&mut self) -> Result<String> {
        let data = self.dir().join("etcd");
        let log = std::fs::File::create(self.dir().join("etcd.log"))?;
        let child = self
            .net_command(crate::bins::etcd()?)
            .args(["--name", "node", "--data-dir"])
            .arg(&data)
            .args([
                "--listen-client-urls=http://127.0.0.1:2379",
                "--advertise-client-urls=http://127.0.0.1:2379",
                "--listen-peer-urls=http://127.0.0.1:2380",
                "--initial-advertise-peer-urls=http://127.0.0.1:2380",
                "--initial-cluster=node=http://127.0.0.1:2380",
                "--log-level=error",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.etcd = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            let ok =
                self.ns.command("etcdctl").args(["--endpoints=http://127.0.0.1:2379", "endpoint", "health"]).output();
            if ok.is_ok_and(|o| o.status.success()) {
                return Ok("http://127.0.0.1:2379".into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("etcd in {} not healthy", self.ns.name())
    }

    /// A command in the namespace's network only. Not `ip netns exec`: that also remounts /sys in a new mount
    /// namespace, which hides the cgroup mounts runc needs.
    pub fn net_command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.ns.path().display())).arg("--").arg(program);
        c
    }

    pub fn id(&self) -> &str {
        &self.id
    }
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
    pub fn netns(&self) -> &Netns {
        &self.ns
    }
    pub fn socket(&self) -> PathBuf {
        self.dir().join("containerd.sock")
    }
    /// `unix://…` as `--container-runtime-endpoint` takes it.
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket().display())
    }
    /// The cgroupfs parent (relative to each hierarchy's root) the pods of this fixture go under.
    pub fn cgroup_parent(&self) -> String {
        format!("/weft-test-{}", self.id)
    }
    pub fn log_path(&self) -> PathBuf {
        self.dir().join("containerd.log")
    }
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

/// Kills every process in the cgroup `parent` (relative to each hierarchy, as `--cgroup-parent` takes it): what
/// a node's pods run in. For teardown (the lab's too): then kill containerd and its shims, `unmount_under` its
/// directory, and `remove_cgroups(parent)`.
pub fn kill_cgroup(parent: &str) {
    crate::cluster::kill_cgroup(parent, Duration::from_secs(5));
}

/// Removes the (empty) cgroup directories of `parent` in every hierarchy.
pub fn remove_cgroups(parent: &str) {
    crate::cluster::remove_cgroup(parent);
}

/// Lazily unmounts everything mounted at or under `dir` (containers' rootfs, sandboxes' shm and netns), deepest
/// first.
pub fn unmount_under(dir: &Path) {
    crate::cluster::unmount_under(dir);
}

impl Drop for ContainerdFixture {
    fn drop(&mut self) {
        let parent = self.cgroup_parent();
        kill_cgroup(&parent);
        for c in [self.child.as_mut(), self.etcd.as_mut()].into_iter().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // containerd's shims live in the namespace too.
        self.ns.kill_all();
        unmount_under(self.dir.path());
        remove_cgroups(&parent);
    }
}
