//! weft's eBPF datapath: C programs under `bpf/` (built by build.rs with clang) and their loader on
//! aya. `maps` mirrors the shared header `bpf/lb.h`; `loader` loads, attaches, pins and detaches.

pub mod loader;
pub mod maps;
mod sys;

pub use loader::{remove, Config, Error, LbMaps, SockLb};
pub use maps::{Backend, BackendKey, MapOp, MapState, SvcKey, SvcVal};
