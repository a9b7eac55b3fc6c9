//! The lab harness every weft test and `weft lab` use: a real etcd fixture, network namespaces
//! as hosts and pods (guards that remove everything on drop), and the multi-node lab built from them.
//! It touches only namespaces, files and processes it created itself, all named with a unique id.

pub mod cli;
pub mod etcd;
pub mod lab;
pub mod netns;

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
