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
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let base = format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}", rem / 3600, rem % 3600 / 60, rem % 60);
    if micros {
        format!("{base}.{:06}Z", d.subsec_micros())
    } else {
        format!("{base}Z")
    }
}
