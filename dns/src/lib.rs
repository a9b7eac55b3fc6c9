//! weft dns: the cluster DNS server. Services, Endpoints and Pods from etcd → a record index (`index`: built
//! whole at the first sync, then updated per service name by pure functions) → the answer function (`answer`, pure) behind UDP and TCP sockets
//! (`server`), with a forwarder and its bounded cache for every other name (`forward`).

pub mod answer;
pub mod cli;
pub mod forward;
pub mod index;
pub mod metrics;
pub mod run;
pub mod server;
pub mod udp;

pub use answer::{answer, Decision};
pub use index::{build, Config, Index, Rdata};
