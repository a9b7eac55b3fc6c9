//! ipvs mode (kube-proxy's IPVS design with our names).
pub mod netlink;
pub mod plan;
