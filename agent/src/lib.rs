//! weft's overlay agent, flanneld's job in Rust: lease a pod subnet in etcd, program the kernel so
//! every other node's subnet is reachable (vxlan or host-gw), write `subnet.env`, masquerade pod
//! traffic leaving the pod network, and act as the `weft-cni` plugin on the node.
//! It touches etcd (under its prefix), the kernel of the namespace it runs in, and its own files.

pub mod alloc;
pub mod cli;
pub mod cni;
pub mod config;
pub mod ethtool;
pub mod healthz;
pub mod ipmasq;
pub mod kernel;
pub mod lease;
pub mod plan;
pub mod run;
pub mod status;
pub mod subnet;
pub mod subnet_env;
