//! What the `weft` binary and the daemons' own binaries (`src/bin/weft-*.rs`) share: logging, the runtime,
//! error printing, and the hand-over from `weft <daemon>` to `weft-<daemon>`.
//!
//! Why the daemons have binaries of their own: a process maps the pages of its binary that it touches, and the
//! kernel maps file pages in 64 KiB runs around each one touched, so a daemon started from the merged `weft`
//! (every daemon, the lab and the kubectl verbs: ~43 MB) carries ~14 MB of it in its RSS, about twice what a
//! binary holding only its own code costs (`weft dns` idle: 14.1 MB file-backed vs 7.1 MB). `weft agent …` therefore
//! runs `weft-agent` when it is installed beside `weft` — by `exec`, so the process keeps its pid and its
//! command line `weft agent …` — and runs the daemon in its own process when it is not.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;

use clap::{ArgMatches, Args, FromArgMatches};

pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("WEFT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let ansi = std::io::stderr().is_terminal();
    tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).init();
}

/// One thread: what every daemon but the proxy needs (the proxy relays connections on every core).
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

/// The error and its causes on one line, skipping a cause the message before it already quotes.
pub fn error_chain(e: &anyhow::Error) -> String {
    let mut msg = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !msg.contains(&c) {
            msg.push_str(": ");
            msg.push_str(&c);
        }
    }
    msg
}

/// Exits with the command's code, or 1 after printing its error.
pub fn exit_with(result: anyhow::Result<i32>) -> ! {
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("weft: {}", error_chain(&e));
            std::process::exit(1);
        }
    }
}

/// The daemon's own binary beside this one, if installed: `weft-<name>`.
pub fn daemon_binary(name: &str) -> Option<std::path::PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let own = exe.with_file_name(format!("weft-{name}"));
    (own != exe && own.is_file()).then_some(own)
}

/// Replaces this process by `weft-<name>` with the same arguments (`weft <name> …`) and returns only when
/// that binary is not installed or cannot be run (then the caller runs the daemon itself).
pub fn exec_daemon(name: &str) {
    let Some(own) = daemon_binary(name) else { return };
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_else(|| "weft".into());
    let err = std::process::Command::new(&own).arg0(arg0).args(args).exec();
    eprintln!("weft: running {}: {err}; running {name} in this process", own.display());
}

/// A daemon's own binary: parses `[weft] <name> FLAGS…` (as `weft` hands it over) or `weft-<name> FLAGS…`
/// (run directly), starts logging and runs the daemon.
pub fn daemon_main<A: Args + FromArgMatches>(
    name: &str,
    about: &'static str,
    run: impl FnOnce(A) -> anyhow::Result<i32>,
) -> ! {
    let argv = own_arguments(name, std::env::args_os().collect());
    // Named as `weft` names it, in help and errors (built once per process: leaking it is free).
    let title: &'static str = Box::leak(format!("weft {name}").into_boxed_str());
    let cmd =
        A::augment_args(clap::Command::new(title)).bin_name(title).about(about).version(env!("CARGO_PKG_VERSION"));
    let matches: ArgMatches = cmd.get_matches_from(argv);
    let args = match A::from_arg_matches(&matches) {
        Ok(a) => a,
        Err(e) => e.exit(),
    };
    init_logging();
    exit_with(run(args))
}

/// The daemon's flags from its command line: `weft <name> FLAGS…` (handed over by `weft`, which keeps its command
/// line) and `weft-<name> FLAGS…` (run directly) give the same.
fn own_arguments(name: &str, mut argv: Vec<OsString>) -> Vec<OsString> {
    if argv.get(1).is_some_and(|a| a == name) {
        argv.remove(1);
    }
    argv
}

/// The daemons, as `weft <name>` and `weft-<name>` both run them; `about` is their `--help` line.
pub mod daemons {
    use super::runtime;

    pub const AGENT: &str = "Run the overlay agent on this node (flanneld's job)";
    pub const PROXY: &str = "Run the service proxy on this node (kube-proxy's job)";
    pub const DNS: &str =
        "Run the cluster DNS server (CoreDNS's job): the cluster zone from etcd, other names forwarded";
    pub const CONTROLLER: &str =
        "Run the scheduler and controllers (kube-controller-manager's and kube-scheduler's job)";
    pub const KUBELET: &str = "Run the pods bound to this node on containerd through CRI (the kubelet's job)";

    pub fn agent(args: weft_agent::cli::AgentArgs) -> anyhow::Result<i32> {
        let o = args.options()?;
        runtime()?.block_on(weft_agent::run::run(o))?;
        Ok(0)
    }

    pub fn proxy(args: weft_proxy::cli::ProxyArgs) -> anyhow::Result<i32> {
        let opts = args.options()?;
        // Worker threads on every core: the userspace mode relays every connection in this process.
        let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
        rt.block_on(async {
            let dataplane = args.dataplane()?;
            weft_proxy::run::run(opts, dataplane).await?;
            Ok(0)
        })
    }

    pub fn dns(args: weft_dns::cli::DnsArgs) -> anyhow::Result<i32> {
        let o = args.options()?;
        runtime()?.block_on(weft_dns::run::run(o))?;
        Ok(0)
    }

    pub fn controller(args: weft_control::cli::ControllerArgs) -> anyhow::Result<i32> {
        runtime()?.block_on(weft_control::cli::run(args))?;
        Ok(0)
    }

    pub fn kubelet(args: weft_control::kubelet::cli::KubeletArgs) -> anyhow::Result<i32> {
        runtime()?.block_on(weft_control::kubelet::cli::kubelet(args))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_daemon_reads_the_same_flags_handed_over_by_weft_or_run_directly() {
        let os = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        let cases: &[(&[&str], &[&str])] = &[
            (
                &["/usr/local/bin/weft", "dns", "--listen", "0.0.0.0:53"],
                &["/usr/local/bin/weft", "--listen", "0.0.0.0:53"],
            ),
            (
                &["/usr/local/bin/weft-dns", "--listen", "0.0.0.0:53"],
                &["/usr/local/bin/weft-dns", "--listen", "0.0.0.0:53"],
            ),
            (&["weft", "dns"], &["weft"]),
            // Only the first argument is the daemon's name: a flag value `dns` stays.
            (&["weft-dns", "--zone", "dns"], &["weft-dns", "--zone", "dns"]),
        ];
        for (argv, want) in cases {
            assert_eq!(own_arguments("dns", os(argv)), os(want), "{argv:?}");
        }
    }
}
