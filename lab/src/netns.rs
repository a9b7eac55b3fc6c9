//! Network namespaces owned by a guard: created with `ip netns add` under a unique name, and on drop
//! every process inside is killed and the namespace deleted. Code that must open sockets inside a
//! namespace (an etcd client, netlink) runs on a thread that has entered it: a socket keeps the
//! namespace it was created in, so everything a runtime on that thread opens lives there.

use std::future::Future;
use std::os::fd::AsFd;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// A short id unique to this process and call, for names that must not collide with parallel runs.
pub fn unique_id() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{:x}{}{:02x}", std::process::id(), n, rand::random::<u8>())
}

/// Runs a command, failing with its stderr when it exits non-zero.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("spawning {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(out)
}

/// A named network namespace, deleted (with every process in it) when dropped unless `persist`ed.
#[derive(Debug)]
pub struct Netns {
    name: String,
    keep: bool,
}

impl Netns {
    /// Creates `weft-<unique id>-<label>` with its loopback up.
    pub fn create(label: &str) -> Result<Netns> {
        Self::create_named(&format!("weft-{}-{label}", unique_id()))
    }

    /// Creates a namespace with exactly this name (the lab chooses names carrying its own id).
    pub fn create_named(name: &str) -> Result<Netns> {
        run(Command::new("ip").args(["netns", "add", name]))?;
        let ns = Netns { name: name.to_string(), keep: false };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Takes charge of an existing namespace (e.g. to tear down a lab made by an earlier process).
    pub fn adopt(name: &str) -> Netns {
        Netns { name: name.to_string(), keep: false }
    }

    /// A handle on an existing namespace that never deletes it (the lab deletes its namespaces by prefix).
    pub fn attach(name: &str) -> Netns {
        Netns { name: name.to_string(), keep: true }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> std::path::PathBuf {
        std::path::PathBuf::from("/run/netns").join(&self.name)
    }

    /// Leaves the namespace in place when the guard drops (for `weft lab up`).
    pub fn persist(mut self) {
        self.keep = true;
    }

    /// A command that runs inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Runs `program args…` inside the namespace; an error carries its stderr.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String> {
        let out = run(self.command(program).args(args))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `ip -n <ns> args…`
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let out = run(Command::new("ip").args(["-n", &self.name]).args(args))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// A shell script inside the namespace.
    pub fn sh(&self, script: &str) -> Result<String> {
        self.exec("sh", &["-c", script])
    }

    /// Sets a per-namespace sysctl, e.g. `net.ipv4.ip_forward`.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.exec("sysctl", &["-q", "-w", &format!("{key}={value}")]).map(|_| ())
    }

    /// Pids of the processes whose network namespace this is.
    pub fn pids(&self) -> Vec<i32> {
        Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).split_whitespace().filter_map(|p| p.parse().ok()).collect())
            .unwrap_or_default()
    }

    /// Runs a future on a fresh thread that has entered this namespace, on a current-thread runtime.
    pub fn block_on<F, Fut>(&self, f: F) -> Result<Fut::Output>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future,
        Fut::Output: Send + 'static,
    {
        let path = self.path();
        std::thread::spawn(move || -> Result<Fut::Output> {
            enter(&path)?;
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            Ok(rt.block_on(f()))
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread in netns panicked"))?
    }

    /// A runtime whose thread lives in this namespace, for clients kept across many calls.
    pub fn runtime(&self) -> Result<NsRuntime> {
        NsRuntime::start(self.path())
    }

    /// Kills every process in the namespace (TERM, then KILL after a grace period).
    pub fn kill_all(&self) {
        for sig in [libc::SIGTERM, libc::SIGKILL] {
            let pids = self.pids();
            if pids.is_empty() {
                return;
            }
            for p in &pids {
                // SAFETY: kill(2) with a pid read from `ip netns pids`; at worst ESRCH.
                unsafe { libc::kill(*p, sig) };
            }
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline && !self.pids().is_empty() {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Kills everything inside and deletes the namespace; safe to call on one already gone.
    pub fn delete(&self) {
        self.kill_all();
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if !self.keep {
            self.delete();
        }
    }
}

/// Moves the calling thread into the namespace at `path`.
pub fn enter(path: &std::path::Path) -> Result<()> {
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("setns into {}", path.display()))?;
    Ok(())
}

/// A tokio runtime driven by one thread inside a namespace; `block_on` runs futures there.
pub struct NsRuntime {
    handle: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NsRuntime {
    fn start(path: std::path::PathBuf) -> Result<NsRuntime> {
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = match enter(&path)
                .and_then(|_| Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?))
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            let _ = tx.send(Ok(rt.handle().clone()));
            rt.block_on(async {
                let _ = stopped.await;
            });
        });
        let handle = rx.recv().context("namespace runtime thread died")??;
        Ok(NsRuntime { handle, stop: Some(stop), thread: Some(thread) })
    }

    /// Runs the future on the namespace's thread and waits for its output.
    pub fn block_on<Fut>(&self, fut: Fut) -> Result<Fut::Output>
    where
        Fut: Future + Send + 'static,
        Fut::Output: Send + 'static,
    {
        let (tx, rx) = std::sync::mpsc::channel();
        self.handle.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv().context("future in namespace runtime panicked")
    }

    pub fn handle(&self) -> &tokio::runtime::Handle {
        &self.handle
    }
}

impl Drop for NsRuntime {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
