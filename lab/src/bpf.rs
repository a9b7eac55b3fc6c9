//! Fixtures for eBPF tests: a private bpffs instance mounted on a temporary directory, and a cgroup v2
//! directory `weft-<id>-<label>` just below the v2 root, reached through a cgroup2 mount on a temporary
//! directory (`ip netns exec` remounts /sys, so a daemon started that way would not see
//! /sys/fs/cgroup/unified). Both are removed on drop (processes left in the cgroup are killed first).
//! Never the root cgroup, never the host's /sys/fs/bpf.

use std::ffi::CString;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// A filesystem of type `fstype` mounted on a fresh temporary directory; unmounted on drop.
struct Mount {
    dir: tempfile::TempDir,
}

impl Mount {
    fn new(fstype: &str) -> Result<Mount> {
        let dir = tempfile::Builder::new().prefix(&format!("weft-{fstype}-")).tempdir()?;
        let target = CString::new(dir.path().as_os_str().as_bytes())?;
        let fs = CString::new(fstype)?;
        // SAFETY: valid NUL-terminated strings; mounting on our own empty directory.
        let r = unsafe { libc::mount(fs.as_ptr(), target.as_ptr(), fs.as_ptr(), 0, std::ptr::null()) };
        if r != 0 {
            bail!("mount -t {fstype} on {}: {}", dir.path().display(), std::io::Error::last_os_error());
        }
        Ok(Mount { dir })
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Ok(target) = CString::new(self.dir.path().as_os_str().as_bytes()) {
            // SAFETY: unmounting what we mounted; lazily, so an open fd cannot keep it busy.
            unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// A bpffs instance of its own (pins in it are invisible under /sys/fs/bpf); unmounted on drop.
pub struct Bpffs {
    mount: Mount,
}

impl Bpffs {
    pub fn mount() -> Result<Bpffs> {
        Ok(Bpffs { mount: Mount::new("bpf")? })
    }

    pub fn path(&self) -> &Path {
        self.mount.dir.path()
    }
}

/// A cgroup v2 directory `weft-<id>-<label>` under the v2 root; its processes are killed and the
/// directory removed on drop.
pub struct Cgroup {
    path: PathBuf,
    // Dropped after the directory is removed (fields drop in order, after Drop::drop).
    _root: Mount,
}

impl Cgroup {
    pub fn create(label: &str) -> Result<Cgroup> {
        let root = Mount::new("cgroup2")?;
        let path = root.dir.path().join(format!("weft-{}-{label}", crate::unique_id()));
        std::fs::create_dir(&path).with_context(|| format!("creating cgroup {}", path.display()))?;
        Ok(Cgroup { path, _root: root })
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

/// The cgroup v2 hierarchy mounted on a temporary directory, so a daemon started by `ip netns exec` (which
/// remounts /sys) can be given a cgroup v2 directory that exists elsewhere, e.g. the kubelet's pods cgroup.
/// Unmounted on drop; the directories in it are left to whoever owns them.
pub struct Cgroup2Root {
    mount: Mount,
}

impl Cgroup2Root {
    pub fn mount() -> Result<Cgroup2Root> {
        Ok(Cgroup2Root { mount: Mount::new("cgroup2")? })
    }

    /// `rel` (a path from the v2 root, e.g. `/weft-lab-<id>/node-1/pods`) under this mount.
    pub fn join(&self, rel: &str) -> PathBuf {
        self.mount.dir.path().join(rel.trim_start_matches('/'))
    }
}
