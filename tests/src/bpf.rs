//! Fixtures for eBPF tests: a private bpffs instance mounted on a temporary directory, and a cgroup v2
//! directory under `/sys/fs/cgroup/unified` named with a unique id. Both are removed on drop (processes
//! left in the cgroup are killed first). Never the root cgroup, never the host's /sys/fs/bpf.

use std::ffi::CString;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// The cgroup v2 hierarchy on these machines (hybrid layout).
pub const CGROUP2_ROOT: &str = "/sys/fs/cgroup/unified";

/// A bpffs mounted on a fresh temporary directory; unmounted on drop.
pub struct Bpffs {
    dir: tempfile::TempDir,
}

impl Bpffs {
    pub fn mount() -> Result<Bpffs> {
        let dir = tempfile::Builder::new().prefix("weft-bpffs-").tempdir()?;
        let target = CString::new(dir.path().as_os_str().as_bytes())?;
        // SAFETY: valid NUL-terminated strings; mounting a new bpffs instance on our own empty directory.
        let r = unsafe { libc::mount(c"bpf".as_ptr(), target.as_ptr(), c"bpf".as_ptr(), 0, std::ptr::null()) };
        if r != 0 {
            bail!("mount -t bpf on {}: {}", dir.path().display(), std::io::Error::last_os_error());
        }
        Ok(Bpffs { dir })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        if let Ok(target) = CString::new(self.dir.path().as_os_str().as_bytes()) {
            // SAFETY: unmounting the bpffs we mounted; lazily, so an open fd cannot keep it.
            unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// A cgroup v2 directory `weft-<id>-<label>` under the v2 root; its processes are killed and the
/// directory removed on drop.
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    pub fn create(label: &str) -> Result<Cgroup> {
        let path = Path::new(CGROUP2_ROOT).join(format!("weft-{}-{label}", crate::unique_id()));
        std::fs::create_dir(&path).with_context(|| format!("creating cgroup {}", path.display()))?;
        Ok(Cgroup { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `cmd` joins this cgroup between fork and exec (so every socket it opens is subject to the
    /// programs attached here).
    pub fn enter(&self, cmd: &mut Command) -> Result<()> {
        let procs = std::fs::OpenOptions::new().write(true).open(self.path.join("cgroup.procs"))?;
        // SAFETY: the closure only calls write(2) on an fd opened above (kept alive by the move).
        unsafe {
            cmd.pre_exec(move || {
                let n = libc::write(procs.as_raw_fd(), b"0\n".as_ptr().cast(), 2);
                if n < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(())
    }

    /// Pids now in the cgroup.
    pub fn pids(&self) -> Vec<i32> {
        std::fs::read_to_string(self.path.join("cgroup.procs"))
            .map(|s| s.split_whitespace().filter_map(|p| p.parse().ok()).collect())
            .unwrap_or_default()
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let pids = self.pids();
            if pids.is_empty() || Instant::now() > deadline {
                break;
            }
            for pid in pids {
                // SAFETY: signalling processes we put in our own cgroup.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Err(e) = std::fs::remove_dir(&self.path) {
            let _ = writeln!(std::io::stderr(), "removing cgroup {}: {e}", self.path.display());
        }
    }
}
