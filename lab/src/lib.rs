//! The lab harness every weft test and `weft lab` use: a real etcd fixture, network namespaces
//! as hosts and pods (guards that remove everything on drop), and the multi-node lab built from them.
//! It touches only namespaces, files and processes it created itself, all named with a unique id.

pub mod bins;
pub mod bpf;
pub mod cli;
pub mod cluster;
pub mod containerd;
pub mod etcd;
pub mod lab;
pub mod netns;
pub mod pki;
pub mod qemu;
pub mod rounds;

pub use etcd::EtcdFixture;
pub use lab::{Lab, LabOptions, Node, Pod};
pub use netns::{unique_id, Netns, NsRuntime};

/// The `weft` binary the tests drive: `$WEFT_BIN`, else `target/debug/weft` of this workspace.
pub fn weft_bin() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("WEFT_BIN") {
        return p.into();
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let bin = target.join("debug/weft");
    assert!(bin.exists(), "{} is missing: run `cargo build` first (make test does)", bin.display());
    bin
}

/// Runs `weft args` against the etcd at `endpoint` (through `WEFT_ETCD_ENDPOINTS`, as an operator's shell would),
/// feeding `stdin`; returns its status and output. For CLI tests.
pub fn run_weft(endpoint: &str, args: &[&str], stdin: Option<&str>) -> std::io::Result<std::process::Output> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new(weft_bin())
        .args(args)
        .env("WEFT_ETCD_ENDPOINTS", endpoint)
        .env_remove("WEFT_LOG")
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    if let (Some(text), Some(mut input)) = (stdin, child.stdin.take()) {
        input.write_all(text.as_bytes())?;
    }
    child.wait_with_output()
}

/// `t` as Kubernetes writes timestamps: RFC 3339 in UTC, to the second (`Time`) or with microseconds
/// (`MicroTime`, e.g. a Lease's renewTime). For tests and benchmarks that stand in for a kubelet.
pub fn kube_time(t: std::time::SystemTime, micros: bool) -> String {
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
    let ts = jiff::Timestamp::new(secs, d.subsec_nanos() as i32).unwrap_or(jiff::Timestamp::MAX);
    ts.strftime(if micros { "%Y-%m-%dT%H:%M:%S%.6fZ" } else { "%Y-%m-%dT%H:%M:%SZ" }).to_string()
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn kube_time_writes_rfc3339_utc_like_the_api_server() {
        // (seconds, microseconds, Time, MicroTime)
        let cases = [
            (0, 0, "1970-01-01T00:00:00Z", "1970-01-01T00:00:00.000000Z"),
            (951_782_400, 7, "2000-02-29T00:00:00Z", "2000-02-29T00:00:00.000007Z"),
            (1_767_225_599, 999_999, "2025-12-31T23:59:59Z", "2025-12-31T23:59:59.999999Z"),
        ];
        for (secs, us, time, micro) in cases {
            let t = UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_micros(us);
            assert_eq!((super::kube_time(t, false).as_str(), super::kube_time(t, true).as_str()), (time, micro));
        }
    }
}

/// The running kernel's `major.minor` (from `/proc/sys/kernel/osrelease`, e.g. `6.1.0-57-amd64` → (6, 1)).
pub fn kernel_version() -> Option<(u32, u32)> {
    parse_kernel_version(&std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?)
}

fn parse_kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// Kernel-version assumptions made explicit: a test that needs `feature` (first in Linux `major.minor`) calls
/// this first and fails at once with a message naming the feature and both versions, instead of failing later
/// with an obscure EINVAL from the kernel.
pub fn require_kernel(major: u32, minor: u32, feature: &str) {
    match kernel_version() {
        Some(v) if v >= (major, minor) => {}
        Some((a, b)) => panic!("this test needs Linux >= {major}.{minor} for {feature}; the running kernel is {a}.{b}"),
        None => panic!("this test needs Linux >= {major}.{minor} for {feature}; the kernel version is unreadable"),
    }
}

#[cfg(test)]
mod kernel_version_tests {
    #[test]
    fn kernel_releases_parse_to_major_minor() {
        for (release, want) in [
            ("6.1.0-57-amd64\n", Some((6, 1))),
            ("6.12.9", Some((6, 12))),
            ("5.15.0-1051-azure", Some((5, 15))),
            ("4.19", Some((4, 19))),
            ("garbage", None),
            ("", None),
        ] {
            assert_eq!(super::parse_kernel_version(release), want, "{release:?}");
        }
    }
}
