//! The seam between the model and the kernel: one `Dataplane` per proxy mode makes the kernel match a
//! `ServiceTable`. Level-triggered: a full sync is always safe; a partial sync names the ports that changed.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::model::{ServicePortName, ServiceTable};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("iptables sync failed")]
    Iptables(#[from] crate::restore::Error),
    #[error("userspace sync failed")]
    Userspace(#[from] crate::userspace::Error),
    #[error("ipvs sync failed")]
    Ipvs(#[from] crate::ipvs::Error),
    #[error("ebpf sync failed")]
    Ebpf(#[from] crate::ebpf::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What one sync did (for logs and metrics).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncStats {
    pub full: bool,
    pub chains_written: usize,
    pub chains_deleted: usize,
    pub rules_written: usize,
    /// Size of what was handed to the kernel tool (e.g. `iptables-restore` input).
    pub bytes: usize,
    pub duration: Duration,
}

pub trait Dataplane {
    /// Makes the kernel match `table`. `changed: None` asks for a full sync; `Some` lists the only
    /// ports that changed since the last successful sync (the dataplane may still decide to go full).
    fn sync(&mut self, table: &ServiceTable, changed: Option<&BTreeSet<ServicePortName>>) -> Result<SyncStats>;

    /// The mode's name, as `--proxy-mode` spells it.
    fn mode(&self) -> &'static str;

    /// What this dataplane put in the kernel for a port (a chain name, a socket), for `weft services`.
    fn describe(&self, _port: &ServicePortName) -> Option<String> {
        None
    }

    /// Whether the kernel tool would take `table`'s rules, applying nothing (e.g. `iptables-restore --test`).
    /// When a sync fails, the proxy bisects the table with this to find the service ports the kernel refuses,
    /// skips them and applies the rest. The default cannot tell: every table passes.
    fn check(&mut self, _table: &ServiceTable) -> Result<()> {
        Ok(())
    }
}

/// The daemon picks its mode at run time.
impl<D: Dataplane + ?Sized> Dataplane for Box<D> {
    fn sync(&mut self, table: &ServiceTable, changed: Option<&BTreeSet<ServicePortName>>) -> Result<SyncStats> {
        (**self).sync(table, changed)
    }
    fn mode(&self) -> &'static str {
        (**self).mode()
    }
    fn describe(&self, port: &ServicePortName) -> Option<String> {
        (**self).describe(port)
    }
    fn check(&mut self, table: &ServiceTable) -> Result<()> {
        (**self).check(table)
    }
}
