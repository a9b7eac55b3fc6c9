//! What the lab needs to run a node's containerd and kubelet and to remove every trace of them: the kubelet's and
//! the controller's command lines (pure), the lab's cgroup subtree (`/weft-lab-<id>` in every hierarchy, never the
//! root cgroup) and the mounts containerd leaves under the lab's directory. Touches only that subtree and those mounts.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// Where cgroup hierarchies are mounted (cgroup v1 controllers and, on hybrid machines, `unified`).
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The lab's cgroup subtree, relative to each hierarchy's root.
pub fn cgroup_subtree(id: &str) -> String {
    format!("/weft-lab-{id}")
}

/// The cgroup parent of node `node`'s pods (the kubelet's `--cgroup-parent`).
pub fn pods_cgroup(id: &str, node: &str) -> String {
    format!("{}/{node}/pods", cgroup_subtree(id))
}

/// The cgroup node `node`'s containerd (and, through it, its shims) runs in.
pub fn containerd_cgroup(id: &str, node: &str) -> String {
    format!("{}/{node}/containerd", cgroup_subtree(id))
}

/// What one node's kubelet is given.
#[derive(Debug, Clone)]
pub struct KubeletSetup {
    pub etcd: String,
    pub node: String,
    pub ip: Ipv4Addr,
    pub socket: PathBuf,
    pub cgroup_parent: String,
    pub root_dir: PathBuf,
    pub subnet_file: PathBuf,
    pub resolv_conf: PathBuf,
    pub cluster_dns: Ipv4Addr,
    /// (serving cert, key, client CA) when the kubelet accepts the TLS flags.
    pub tls: Option<(PathBuf, PathBuf, PathBuf)>,
}

/// `weft kubelet …` arguments for `s`, then `extra` (later flags win).
pub fn kubelet_args(s: &KubeletSetup, extra: &[String]) -> Vec<String> {
    let p = |p: &Path| p.to_string_lossy().into_owned();
    let mut a: Vec<String> = vec![
        "kubelet".into(),
        "--etcd-endpoints".into(),
        s.etcd.clone(),
        "--hostname-override".into(),
        s.node.clone(),
        "--node-ip".into(),
        s.ip.to_string(),
        "--container-runtime-endpoint".into(),
        format!("unix://{}", p(&s.socket)),
        "--cgroup-parent".into(),
        s.cgroup_parent.clone(),
        "--root-dir".into(),
        p(&s.root_dir),
        "--subnet-file".into(),
        p(&s.subnet_file),
        "--resolv-conf".into(),
        p(&s.resolv_conf),
        "--cluster-dns".into(),
        s.cluster_dns.to_string(),
    ];
    if let Some((cert, key, ca)) = &s.tls {
        a.extend(["--tls-cert-file".into(), p(cert), "--tls-private-key-file".into(), p(key)]);
        a.extend(["--client-ca-file".into(), p(ca)]);
    }
    a.extend(extra.iter().cloned());
    a
}

/// True when `help` (a `weft kubelet --help` text) lists every flag of `flags`.
pub fn accepts_flags(help: &str, flags: &[&str]) -> bool {
    flags.iter().all(|f| help.split(|c: char| c.is_whitespace() || c == ',' || c == '=').any(|w| w == *f))
}

/// `weft kubelet --help` of `bin`, or "" when it cannot run.
pub fn kubelet_help(bin: &Path) -> String {
    Command::new(bin)
        .args(["kubelet", "--help"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// `[cgroup] path` appended to a containerd config: containerd places itself there (and its shims follow).
pub fn containerd_cgroup_section(path: &str) -> String {
    format!("\n# Added by weft lab: containerd and its shims under the lab's cgroup subtree.\n[cgroup]\n  path = \"{path}\"\n")
}

/// Every directory of `subtree` in every mounted hierarchy.
fn cgroup_dirs(subtree: &str) -> Vec<PathBuf> {
    let rel = subtree.trim_start_matches('/');
    let mut out = Vec::new();
    if rel.is_empty() {
        return out;
    }
    if let Ok(rd) = std::fs::read_dir(CGROUP_ROOT) {
        for e in rd.flatten() {
            let p = e.path().join(rel);
            if p.is_dir() {
                out.push(p);
            }
        }
    }
    out
}

fn pids_under(dir: &Path, out: &mut Vec<i32>) {
    if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        out.extend(text.split_whitespace().filter_map(|p| p.parse::<i32>().ok()));
    }
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                pids_under(&e.path(), out);
            }
        }
    }
}

/// Every process in the subtree (any hierarchy).
pub fn cgroup_pids(subtree: &str) -> Vec<i32> {
    let mut pids = Vec::new();
    for d in cgroup_dirs(subtree) {
        pids_under(&d, &mut pids);
    }
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// SIGKILLs every process in the subtree until none is left (or `limit` passes).
pub fn kill_cgroup(subtree: &str, limit: Duration) {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let pids = cgroup_pids(subtree);
        if pids.is_empty() || std::time::Instant::now() > deadline {
            return;
        }
        for p in pids.into_iter().filter(|p| *p > 1) {
            // SAFETY: kill(2) on a pid listed in the lab's own cgroup subtree; at worst ESRCH.
            unsafe { libc::kill(p, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn rmdir_tree(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                rmdir_tree(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// Removes the subtree's (empty) cgroup directories; returns those left.
pub fn remove_cgroup(subtree: &str) -> Vec<PathBuf> {
    for d in cgroup_dirs(subtree) {
        rmdir_tree(&d);
    }
    cgroup_dirs(subtree)
}

/// Mount points at or under `dir`, deepest first (`/proc/self/mountinfo` escapes spaces as `\040`).
pub fn mounts_under(mountinfo: &str, dir: &Path) -> Vec<String> {
    let prefix = dir.to_string_lossy().trim_end_matches('/').to_string();
    let mut points: Vec<String> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| p.replace("\\040", " "))
        .filter(|p| *p == prefix || p.starts_with(&format!("{prefix}/")))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    points.dedup();
    points
}

/// Lazily unmounts everything under `dir`; returns the mount points still there.
pub fn unmount_under(dir: &Path) -> Vec<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for p in mounts_under(&info, dir) {
        let _ = Command::new("umount").arg("-l").arg(&p).stderr(Stdio::null()).status();
    }
    mounts_under(&std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default(), dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(tls: bool) -> KubeletSetup {
        KubeletSetup {
            etcd: "http://192.168.56.10:2379".into(),
            node: "node-2".into(),
            ip: Ipv4Addr::new(192, 168, 56, 12),
            socket: "/run/weft/lab/x/node-2/containerd/containerd.sock".into(),
            cgroup_parent: pods_cgroup("x", "node-2"),
            root_dir: "/run/weft/lab/x/node-2/kubelet".into(),
            subnet_file: "/run/weft/lab/x/node-2/subnet.env".into(),
            resolv_conf: "/run/weft/lab/x/node-2/resolv.conf".into(),
            cluster_dns: Ipv4Addr::new(10, 96, 0, 10),
            tls: tls.then(|| ("/p/k.crt".into(), "/p/k.key".into(), "/p/ca.crt".into())),
        }
    }

    #[test]
    fn kubelet_flags_point_at_the_nodes_own_runtime_subnet_and_cgroup() {
        let a = kubelet_args(&setup(false), &["--sync-frequency=500ms".into()]).join(" ");
        assert_eq!(
            a,
            "kubelet --etcd-endpoints http://192.168.56.10:2379 --hostname-override node-2 --node-ip 192.168.56.12 \
             --container-runtime-endpoint unix:///run/weft/lab/x/node-2/containerd/containerd.sock \
             --cgroup-parent /weft-lab-x/node-2/pods --root-dir /run/weft/lab/x/node-2/kubelet \
             --subnet-file /run/weft/lab/x/node-2/subnet.env --resolv-conf /run/weft/lab/x/node-2/resolv.conf \
             --cluster-dns 10.96.0.10 --sync-frequency=500ms"
        );
        let a = kubelet_args(&setup(true), &[]).join(" ");
        assert!(
            a.ends_with("--tls-cert-file /p/k.crt --tls-private-key-file /p/k.key --client-ca-file /p/ca.crt"),
            "{a}"
        );
    }

    #[test]
    fn flags_are_found_only_as_whole_words_of_the_help() {
        let help = "      --tls-cert-file <FILE>  serving cert\n      --tls-private-key-file=<F>\n";
        assert!(accepts_flags(help, &["--tls-cert-file", "--tls-private-key-file"]));
        assert!(!accepts_flags(help, &["--tls-cert-file", "--client-ca-file"]));
        assert!(!accepts_flags("--tls-cert-file-x", &["--tls-cert-file"]));
    }

    #[test]
    fn mounts_under_a_directory_come_deepest_first_and_only_below_it() {
        let info = "\
36 35 0:30 / /run rw - tmpfs tmpfs rw
90 36 0:50 / /run/weft/lab/a/node-1/containerd/state/netns/cni-1 rw - nsfs nsfs rw
91 36 0:51 / /run/weft/lab/a/node-1/containerd/state/io.containerd.runtime.v2.task/k8s.io/abc/rootfs rw - overlay overlay rw
92 36 0:52 / /run/weft/lab/ab/node-1/x rw - tmpfs tmpfs rw
93 36 0:53 / /run/weft/lab/a/with\\040space rw - tmpfs tmpfs rw
";
        let got = mounts_under(info, Path::new("/run/weft/lab/a"));
        assert_eq!(
            got,
            [
                "/run/weft/lab/a/node-1/containerd/state/io.containerd.runtime.v2.task/k8s.io/abc/rootfs",
                "/run/weft/lab/a/node-1/containerd/state/netns/cni-1",
                "/run/weft/lab/a/with space",
            ]
        );
    }

    #[test]
    fn cgroup_names_stay_inside_the_labs_subtree() {
        assert_eq!(cgroup_subtree("x1"), "/weft-lab-x1");
        assert!(pods_cgroup("x1", "node-1").starts_with("/weft-lab-x1/"));
        assert!(containerd_cgroup("x1", "node-1").starts_with("/weft-lab-x1/"));
        assert!(cgroup_dirs("/").is_empty(), "the root cgroup is never a lab's subtree");
        assert!(containerd_cgroup_section("/weft-lab-x1/node-1/containerd")
            .contains("[cgroup]\n  path = \"/weft-lab-x1/node-1/containerd\"\n"));
    }
}
