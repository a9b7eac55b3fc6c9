//! `weft kubelet`: runs the Pods bound to this node on containerd through CRI. Pure decisions (what to do with a
//! pod, its status, its containers' config) are apart from the one trait that talks to the runtime (`cri`) and
//! the daemon that reads and writes the store (`run`, `node`).

pub mod cli;
pub mod client;
pub mod config;
pub mod containerd;
pub mod cri;
pub mod decide;
pub mod node;
pub mod probe;
pub mod run;
pub mod server;
pub mod stream;
pub mod term;
