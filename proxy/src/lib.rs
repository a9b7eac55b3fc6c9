//! weft proxy: the kube-proxy replacement. Services + Endpoints, summarized as they arrive (`summary`) → one
//! desired `ServiceTable` for this node (`table`, pure) → a `Dataplane` per mode that makes the kernel match it
//! (`iptables`, `ipvs`, `userspace`, `ebpf`).

pub mod bounded;
pub mod cli;
pub mod conntrack;
pub mod dataplane;
pub mod ebpf;
pub mod iptables;
pub mod ipvs;
pub mod metrics;
pub mod model;
pub mod proxier;
pub mod restore;
pub mod run;
pub mod status;
pub mod summary;
pub mod table;
pub mod tracker;
pub mod userspace;

pub use dataplane::{Dataplane, SyncStats};
pub use model::{Endpoint, Protocol, ServiceEntry, ServicePort, ServicePortName, ServiceTable};
pub use table::{desired_table, Skipped};
