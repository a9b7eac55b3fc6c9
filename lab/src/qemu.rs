//! The QEMU kernel lab: a real Debian kernel with what the host kernel lacks (IPVS, dummy), booted under
//! QEMU (software emulation) from an initramfs holding busybox, kernel modules, `weft` and the tools,
//! running one scenario script and handing its output back over the serial console.
//! Builds once into `target/qemu-lab/` (the kernel package is downloaded with apt, unpacked, never
//! installed); touches nothing outside that directory and the QEMU process it starts.

use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Bump when the base image's contents change, so cached images are rebuilt.
const BASE_VERSION: u32 = 3;

/// Host programs copied into the guest (each with its `ldd` closure): found on `PATH` (or where the variable
/// names), put at the guest path its scenario scripts call them by.
const TOOLS: &[(&str, &str, &str)] = &[
    ("ip", "WEFT_IP_BIN", "/bin/ip"),
    ("ipvsadm", "WEFT_IPVSADM_BIN", "/usr/sbin/ipvsadm"),
    ("ipset", "WEFT_IPSET_BIN", "/usr/sbin/ipset"),
    ("xtables-nft-multi", "WEFT_XTABLES_BIN", "/usr/sbin/xtables-nft-multi"),
    ("etcd", crate::bins::ETCD_BIN_VAR, "/usr/bin/etcd"),
    ("etcdctl", "WEFT_ETCDCTL_BIN", "/usr/bin/etcdctl"),
    ("curl", "WEFT_CURL_BIN", "/usr/bin/curl"),
    ("socat", "WEFT_SOCAT_BIN", "/usr/bin/socat"),
    ("conntrack", "WEFT_CONNTRACK_BIN", "/usr/sbin/conntrack"),
];

/// Names the multi-call iptables binary answers to in the guest (the nf_tables backend).
const XTABLES_LINKS: &[&str] = &["iptables", "iptables-save", "iptables-restore", "iptables-nft"];

/// Modules the guest loads at boot (their modules.dep closure comes along); others load on demand.
pub const MODULES: &[&str] = &[
    "ip_vs",
    "ip_vs_rr",
    "ip_vs_lc",
    "ip_vs_wrr",
    "ip_vs_sh",
    "ip_vs_mh",
    "dummy",
    "veth",
    "bridge",
    "vxlan",
    "nf_conntrack",
    "nf_nat",
    "nf_tables",
    "nft_compat",
    "nft_chain_nat",
    "nf_reject_ipv4",
    "ip_set",
    "ip_set_hash_ip",
    "ip_set_hash_ipport",
    "ip_set_hash_ipportip",
    "ip_set_bitmap_port",
    "xt_set",
    "xt_mark",
    "xt_MASQUERADE",
    "xt_addrtype",
    "xt_comment",
    "xt_conntrack",
    "xt_tcpudp",
    "xt_statistic",
    "xt_recent",
    "xt_nat",
    "xt_multiport",
    "ipt_REJECT",
];

/// Module directories copied whole (so modules the kernel asks for on demand are there too).
const MODULE_DIRS: &[&str] = &["kernel/net", "kernel/lib", "kernel/crypto"];

/// Where the lab keeps its cache: `$CARGO_TARGET_DIR/qemu-lab` or this workspace's `target/qemu-lab`.
pub fn cache_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("qemu-lab")
}

/// Why QEMU tests cannot run here (None: they can).
pub fn unavailable() -> Option<String> {
    let ok = Command::new("qemu-system-x86_64")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    (!ok).then(|| "qemu-system-x86_64 is not installed (scripts/setup.sh installs qemu-system-x86)".to_string())
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("spawning {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The package `linux-image-amd64` depends on, e.g. `linux-image-6.1.0-57-amd64`.
fn kernel_package() -> Result<String> {
    let deps = run(Command::new("apt-cache").args(["depends", "linux-image-amd64"]))?;
    deps.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-"))
        .map(str::to_string)
        .context("apt-cache names no linux-image package behind linux-image-amd64")
}

/// A built lab: a kernel and a base initramfs (everything but the per-run files).
#[derive(Debug, Clone)]
pub struct KernelLab {
    pub dir: PathBuf,
    /// `uname -r` of the guest, e.g. `6.1.0-57-amd64`.
    pub version: String,
    pub kernel: PathBuf,
    pub base_initrd: PathBuf,
}

/// Serialises builds between tests of one process; different processes use a lock file.
static BUILD: Mutex<()> = Mutex::new(());

impl KernelLab {
    /// Builds the lab, or reuses what an earlier build cached.
    pub fn build() -> Result<KernelLab> {
        let _guard = BUILD.lock().unwrap_or_else(|p| p.into_inner());
        let dir = cache_dir();
        std::fs::create_dir_all(&dir)?;
        let lock = std::fs::File::create(dir.join(".lock"))?;
        // SAFETY: flock on a file descriptor we own; released when `lock` is dropped.
        unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) };
        let kernel_root = Self::kernel(&dir)?;
        let version = std::fs::read_dir(kernel_root.join("lib/modules"))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .next()
            .context("the kernel package has no lib/modules/<version>")?;
        let kernel = kernel_root.join(format!("boot/vmlinuz-{version}"));
        let base_initrd = dir.join(format!("base-{version}-v{BASE_VERSION}.cpio.gz"));
        if !base_initrd.exists() {
            Self::build_base(&dir, &kernel_root, &version, &base_initrd)?;
        }
        Ok(KernelLab { dir, version, kernel, base_initrd })
    }

    /// Downloads and unpacks the kernel package once; returns the unpacked root.
    fn kernel(dir: &Path) -> Result<PathBuf> {
        // A cached kernel is used as is (so a machine without apt access still runs the lab).
        if let Some(done) = std::fs::read_dir(dir)?.filter_map(|e| e.ok()).map(|e| e.path()).find(|p| {
            p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("linux-image-")) && p.join(".done").exists()
        }) {
            return Ok(done);
        }
        let pkg = kernel_package()?;
        let root = dir.join(&pkg);
        let dl = dir.join("download");
        let _ = std::fs::remove_dir_all(&dl);
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&dl)?;
        run(Command::new("apt-get").arg("download").arg(&pkg).current_dir(&dl))
            .with_context(|| format!("apt-get download {pkg}"))?;
        let deb = std::fs::read_dir(&dl)?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "deb"))
            .context("apt-get download left no .deb")?;
        unpack_kernel_parts(&deb, &root)?;
        std::fs::remove_dir_all(&dl)?;
        std::fs::write(root.join(".done"), &pkg)?;
        Ok(root)
    }

    fn build_base(dir: &Path, kroot: &Path, version: &str, out: &Path) -> Result<()> {
        let stage = dir.join("stage-base");
        let _ = std::fs::remove_dir_all(&stage);
        std::fs::create_dir_all(&stage)?;
        for d in ["bin", "sbin", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "tmp", "run", "var/run", "root"] {
            std::fs::create_dir_all(stage.join(d))?;
        }
        let busybox = crate::bins::find("busybox", "WEFT_BUSYBOX_BIN").context("busybox (busybox-static)")?;
        std::fs::copy(busybox, stage.join("bin/busybox"))?;
        for (program, var, guest) in TOOLS {
            let host = crate::bins::find(program, var).with_context(|| format!("{program}, for the guest"))?;
            copy_with_libs_to(&host, Path::new(guest), &stage)?;
        }
        for l in XTABLES_LINKS {
            std::os::unix::fs::symlink("xtables-nft-multi", stage.join("usr/sbin").join(l))?;
        }
        let xt = xtables_dir()?;
        for e in std::fs::read_dir(&xt).context("the iptables extensions")? {
            copy_with_libs(&e?.path(), &stage)?;
        }
        for f in ["/etc/protocols", "/etc/services", "/etc/ethertypes"] {
            if Path::new(f).exists() {
                copy_file(Path::new(f), &stage)?;
            }
        }
        std::fs::write(stage.join("etc/hosts"), "127.0.0.1 localhost\n")?;
        std::fs::write(stage.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")?;
        std::fs::write(stage.join("etc/group"), "root:x:0:\n")?;
        std::fs::write(stage.join("etc/nsswitch.conf"), "hosts: files\nprotocols: files\nservices: files\n")?;
        // Modules: whole directories plus the closure of MODULES, then depmod inside the stage.
        let mods = kroot.join("lib/modules").join(version);
        let dst = stage.join("lib/modules").join(version);
        for d in MODULE_DIRS {
            copy_tree(&mods.join(d), &dst.join(d))?;
        }
        for f in ["modules.order", "modules.builtin", "modules.builtin.modinfo"] {
            if mods.join(f).exists() {
                std::fs::copy(mods.join(f), dst.join(f))?;
            }
        }
        run(Command::new("depmod").arg("-b").arg(kroot).arg(version)).context("depmod of the kernel package")?;
        let dep = std::fs::read_to_string(mods.join("modules.dep"))?;
        for path in module_closure(&dep, MODULES)? {
            let to = dst.join(&path);
            if !to.exists() {
                std::fs::create_dir_all(to.parent().context("module path")?)?;
                std::fs::copy(mods.join(&path), &to)?;
            }
        }
        run(Command::new("depmod").arg("-b").arg(&stage).arg(version)).context("depmod of the guest's modules")?;
        pack(&stage, out)?;
        std::fs::remove_dir_all(&stage)?;
        Ok(())
    }

    /// Boots the guest with the base image plus `guest`'s files, runs its script, returns the console.
    pub fn boot(&self, guest: &GuestRun) -> Result<GuestOutput> {
        let run_dir = tempfile::Builder::new().prefix("run-").tempdir_in(&self.dir)?;
        let stage = run_dir.path().join("stage");
        std::fs::create_dir_all(stage.join("etc"))?;
        for (host, at) in &guest.files {
            let to = stage.join(at.trim_start_matches('/'));
            std::fs::create_dir_all(to.parent().context("guest path")?)?;
            if guest.strip && is_elf(host) {
                // Debug info makes `weft` ~300 MB; the guest unpacks the initramfs into RAM.
                run(Command::new("objcopy").arg("--strip-debug").arg(host).arg(&to))?;
            } else {
                std::fs::copy(host, &to).with_context(|| format!("copying {}", host.display()))?;
            }
            if is_elf(host) {
                copy_libs(host, &stage)?;
            }
        }
        std::fs::write(stage.join("scenario.sh"), &guest.script)?;
        std::fs::write(stage.join("init"), init_script(&guest.modules))?;
        use std::os::unix::fs::PermissionsExt;
        for f in ["init", "scenario.sh"] {
            std::fs::set_permissions(stage.join(f), std::fs::Permissions::from_mode(0o755))?;
        }
        let extra = run_dir.path().join("run.cpio.gz");
        pack(&stage, &extra)?;
        // The kernel unpacks concatenated archives in order: the run's files land on top of the base.
        let initrd = run_dir.path().join("initrd.gz");
        let mut bytes = std::fs::read(&self.base_initrd)?;
        bytes.extend(std::fs::read(&extra)?);
        std::fs::write(&initrd, bytes)?;

        let mut child = Command::new("qemu-system-x86_64")
            .args(["-m", &guest.memory_mb.to_string(), "-smp", &guest.cpus.to_string()])
            .args(["-cpu", "max", "-nographic", "-no-reboot", "-nic", "none"])
            .arg("-kernel")
            .arg(&self.kernel)
            .arg("-initrd")
            .arg(&initrd)
            // no_timer_check: under TCG on a loaded host the kernel's IO-APIC timer check can miss the emulated
            // timer and panic at boot ("IO-APIC + timer doesn't work!"); the timer works, the check is too hasty.
            .args(["-append", "console=ttyS0 quiet panic=-1 rdinit=/init no_timer_check"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting qemu-system-x86_64")?;
        let console = Arc::new(Mutex::new(Vec::<u8>::new()));
        let mut stdout = child.stdout.take().context("qemu stdout")?;
        let reader = {
            let console = console.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 8192];
                while let Ok(n) = stdout.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    console.lock().unwrap_or_else(|p| p.into_inner()).extend_from_slice(&buf[..n]);
                }
            })
        };
        let started = Instant::now();
        let mut timed_out = false;
        loop {
            if child.try_wait()?.is_some() {
                break;
            }
            if started.elapsed() > guest.deadline {
                timed_out = true;
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let _ = reader.join();
        let mut stderr = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut stderr);
        }
        let text = String::from_utf8_lossy(&console.lock().unwrap_or_else(|p| p.into_inner())).replace('\r', "");
        let out = GuestOutput::parse(&text, started.elapsed());
        if timed_out {
            bail!("the guest did not finish within {:?}; console tail:\n{}\n{stderr}", guest.deadline, out.tail(60));
        }
        if !out.finished {
            bail!("the guest stopped before the scenario finished; console tail:\n{}\n{stderr}", out.tail(60));
        }
        Ok(out)
    }
}

/// The parts of the kernel package the lab uses: the kernel image, the module lists, and the module trees the
/// guest's modules and their dependencies live in: about 50 MB instead of the package's 400 MB, which matters
/// on a CI machine with little free disk.
const KERNEL_PARTS: &[&str] = &[
    "./boot/vmlinuz-*",
    "./lib/modules/*/modules.*",
    "./lib/modules/*/kernel/net",
    "./lib/modules/*/kernel/lib",
    "./lib/modules/*/kernel/crypto",
    "./lib/modules/*/kernel/drivers/net/*.ko",
    "./lib/modules/*/kernel/drivers/net/vxlan",
    "./lib/modules/*/kernel/drivers/net/ipvlan",
];

fn unpack_kernel_parts(deb: &Path, root: &Path) -> Result<()> {
    std::fs::create_dir_all(root)?;
    let mut fsys = Command::new("dpkg-deb")
        .arg("--fsys-tarfile")
        .arg(deb)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawning dpkg-deb --fsys-tarfile")?;
    let tar_in = fsys.stdout.take().context("dpkg-deb's stdout")?;
    let tar = Command::new("tar")
        .arg("-x")
        .arg("-C")
        .arg(root)
        .args(["--wildcards", "--no-wildcards-match-slash"])
        .args(KERNEL_PARTS)
        .stdin(tar_in)
        .output()
        .context("spawning tar")?;
    let deb_out = fsys.wait_with_output().context("waiting for dpkg-deb")?;
    if !deb_out.status.success() {
        bail!("dpkg-deb --fsys-tarfile {} failed: {}", deb.display(), String::from_utf8_lossy(&deb_out.stderr).trim());
    }
    if !tar.status.success() {
        bail!("unpacking {} failed ({}): {}", deb.display(), tar.status, String::from_utf8_lossy(&tar.stderr).trim());
    }
    Ok(())
}

fn is_elf(p: &Path) -> bool {
    let mut magic = [0u8; 4];
    std::fs::File::open(p).and_then(|mut f| f.read_exact(&mut magic)).is_ok() && magic == *b"\x7fELF"
}

/// Copies a file to the same path under `root` (following symlinks for the content).
fn copy_file(src: &Path, root: &Path) -> Result<()> {
    let to = root.join(src.strip_prefix("/").unwrap_or(src));
    if to.exists() {
        return Ok(());
    }
    std::fs::create_dir_all(to.parent().context("a path with a parent")?)?;
    std::fs::copy(src, &to).with_context(|| format!("copying {}", src.display()))?;
    Ok(())
}

/// The shared libraries `ldd` lists for `bin` (absolute paths), including the loader.
fn libs(bin: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(bin).output()?;
    // A static binary: ldd says so and exits non-zero.
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = match l.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next(),
                None => l.split_whitespace().next(),
            }?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

fn copy_libs(bin: &Path, root: &Path) -> Result<()> {
    for lib in libs(bin)? {
        copy_file(&lib, root)?;
    }
    Ok(())
}

fn copy_with_libs(bin: &Path, root: &Path) -> Result<()> {
    copy_file(bin, root)?;
    copy_libs(bin, root)
}

/// Copies the host's `bin` to `guest` inside `root` (where the scenario calls it), with its libraries.
fn copy_with_libs_to(bin: &Path, guest: &Path, root: &Path) -> Result<()> {
    let to = root.join(guest.strip_prefix("/").unwrap_or(guest));
    std::fs::create_dir_all(to.parent().context("a path with a parent")?)?;
    std::fs::copy(bin, &to).with_context(|| format!("copying {}", bin.display()))?;
    copy_libs(bin, root)
}

/// iptables' extensions: `$XTABLES_LIBDIR`, else the `xtables` directory beside the `libxtables` that
/// `xtables-nft-multi` links (its real path, which is where libxtables looks for them on the guest too).
fn xtables_dir() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("XTABLES_LIBDIR").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(d));
    }
    let multi = crate::bins::find("xtables-nft-multi", "WEFT_XTABLES_BIN")?;
    let lib = libs(&multi)?
        .into_iter()
        .find(|l| l.file_name().is_some_and(|n| n.to_string_lossy().starts_with("libxtables.so")))
        .context("xtables-nft-multi links no libxtables")?;
    let real = std::fs::canonicalize(&lib)?;
    Ok(real.parent().context("libxtables' directory")?.join("xtables"))
}

fn copy_tree(src: &Path, dst: &Path) -> Result<()> {
    std::fs::create_dir_all(dst)?;
    for e in std::fs::read_dir(src).with_context(|| format!("reading {}", src.display()))? {
        let e = e?;
        let to = dst.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_tree(&e.path(), &to)?;
        } else {
            std::fs::copy(e.path(), &to)?;
        }
    }
    Ok(())
}

/// The module files (relative to lib/modules/<version>) that `names` need, after modules.dep.
pub fn module_closure(modules_dep: &str, names: &[&str]) -> Result<BTreeSet<String>> {
    let mut deps = std::collections::BTreeMap::new();
    for line in modules_dep.lines() {
        let Some((module, rest)) = line.split_once(':') else { continue };
        deps.insert(module.to_string(), rest.split_whitespace().map(str::to_string).collect::<Vec<_>>());
    }
    let stem = |path: &str| {
        let file = path.rsplit('/').next().unwrap_or(path);
        file.split(".ko").next().unwrap_or(file).replace('-', "_")
    };
    let mut out = BTreeSet::new();
    for name in names {
        let want = name.replace('-', "_");
        let Some(path) = deps.keys().find(|p| stem(p) == want) else {
            bail!("module {name} is not in modules.dep (built in, or missing from the package?)");
        };
        let mut stack = vec![path.clone()];
        while let Some(p) = stack.pop() {
            if out.insert(p.clone()) {
                stack.extend(deps.get(&p).into_iter().flatten().cloned());
            }
        }
    }
    Ok(out)
}

/// `find . | cpio -o -H newc | gzip` of `dir` into `out`.
fn pack(dir: &Path, out: &Path) -> Result<()> {
    let status = Command::new("sh")
        .arg("-c")
        .arg("find . -print0 | cpio --null -o -H newc --owner 0:0 --quiet | gzip -1 > \"$1\"")
        .arg("pack")
        .arg(out)
        .current_dir(dir)
        .status()?;
    if !status.success() {
        bail!("packing {} failed ({status})", dir.display());
    }
    Ok(())
}

/// The guest's PID 1: mounts, busybox applets, modules, then the scenario; powers off at the end.
fn init_script(modules: &[String]) -> String {
    format!(
        r#"#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sys /sys
/bin/busybox mount -t devtmpfs dev /dev
/bin/busybox mount -t tmpfs tmp /tmp
/bin/busybox mount -t tmpfs run /run
/bin/busybox --install -s
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
echo /sbin/modprobe > /proc/sys/kernel/modprobe
mkdir -p /run/netns /var/run/netns
for m in {mods}; do modprobe $m || echo "WEFT-LAB modprobe $m failed"; done
hostname weft-guest
ip() {{ /bin/ip "$@"; }}
/bin/ip link set lo up
echo "WEFT-LAB booted $(uname -r)"
sh /scenario.sh 2>&1
echo "WEFT-LAB scenario exit $?"
echo WEFT-LAB-DONE
poweroff -f
"#,
        mods = modules.join(" ")
    )
}

/// What one boot runs.
#[derive(Debug, Clone)]
pub struct GuestRun {
    /// (host file, path in the guest); ELF files bring their shared libraries.
    pub files: Vec<(PathBuf, String)>,
    /// A busybox `sh` script; its output (stdout and stderr) reaches the console.
    pub script: String,
    /// Modules loaded before the script runs.
    pub modules: Vec<String>,
    /// The whole boot is killed after this.
    pub deadline: Duration,
    pub memory_mb: u32,
    pub cpus: u32,
    /// Strip debug info from ELF files on the way in.
    pub strip: bool,
}

impl GuestRun {
    pub fn new(script: impl Into<String>) -> GuestRun {
        GuestRun {
            files: vec![],
            script: script.into(),
            modules: MODULES.iter().map(|m| m.to_string()).collect(),
            deadline: Duration::from_secs(240),
            memory_mb: 1536,
            cpus: 2,
            strip: true,
        }
    }
}

/// One `WEFT-CHECK PASS|FAIL name[ :: detail]` line of the scenario.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub name: String,
    pub passed: bool,
    pub detail: String,
}

/// The console of a finished boot and the checks the scenario reported.
#[derive(Debug, Clone)]
pub struct GuestOutput {
    pub console: String,
    pub checks: Vec<Check>,
    pub finished: bool,
    pub took: Duration,
}

impl GuestOutput {
    pub fn parse(console: &str, took: Duration) -> GuestOutput {
        let mut checks = Vec::new();
        for line in console.lines() {
            let Some(rest) = line.trim().strip_prefix("WEFT-CHECK ") else { continue };
            let (passed, rest) = match rest.split_once(' ') {
                Some(("PASS", r)) => (true, r),
                Some(("FAIL", r)) => (false, r),
                _ => continue,
            };
            let (name, detail) = rest.split_once(" ::").unwrap_or((rest, ""));
            let detail = detail.trim();
            checks.push(Check { name: name.trim().into(), passed, detail: detail.into() });
        }
        GuestOutput {
            console: console.to_string(),
            checks,
            finished: console.lines().any(|l| l.trim() == "WEFT-LAB-DONE"),
            took,
        }
    }

    /// The last `n` lines of the console.
    pub fn tail(&self, n: usize) -> String {
        let lines: Vec<&str> = self.console.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// `key value` from a `WEFT-VALUE key value` line (for benchmarks).
    pub fn value(&self, key: &str) -> Option<String> {
        self.console.lines().find_map(|l| {
            let rest = l.trim().strip_prefix("WEFT-VALUE ")?;
            let (k, v) = rest.split_once(' ')?;
            (k == key).then(|| v.trim().to_string())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_closure_follows_modules_dep() {
        let dep = "kernel/net/netfilter/ipvs/ip_vs.ko: kernel/net/netfilter/nf_conntrack.ko kernel/lib/libcrc32c.ko
kernel/net/netfilter/nf_conntrack.ko: kernel/net/ipv4/netfilter/nf_defrag_ipv4.ko kernel/lib/libcrc32c.ko
kernel/net/ipv4/netfilter/nf_defrag_ipv4.ko:
kernel/lib/libcrc32c.ko:
kernel/drivers/net/dummy.ko:
kernel/net/netfilter/ipvs/ip_vs_rr.ko: kernel/net/netfilter/ipvs/ip_vs.ko kernel/net/netfilter/nf_conntrack.ko kernel/lib/libcrc32c.ko
";
        let got = module_closure(dep, &["ip_vs_rr", "dummy"]).unwrap();
        assert_eq!(got.len(), 6, "{got:?}");
        assert!(got.contains("kernel/net/ipv4/netfilter/nf_defrag_ipv4.ko"));
        assert!(module_closure(dep, &["wireguard"]).is_err());
    }

    #[test]
    fn console_checks_are_parsed() {
        let out = GuestOutput::parse(
            "noise\r\nWEFT-CHECK PASS ClusterIP: TCP :: s2\nWEFT-CHECK FAIL UDP :: no answer\nWEFT-VALUE rate 123\nWEFT-LAB-DONE\n",
            Duration::from_secs(1),
        );
        assert!(out.finished);
        assert_eq!(out.checks.len(), 2);
        assert_eq!(out.checks[0].name, "ClusterIP: TCP");
        assert_eq!(out.checks[1], Check { name: "UDP".into(), passed: false, detail: "no answer".into() });
        assert_eq!(out.value("rate").as_deref(), Some("123"));
    }
}
