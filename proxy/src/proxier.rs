//! The proxy's loop body without the loop: keeps the latest Services and Endpoints, their pending
//! changes, and the table last synced; `sync` turns them into one `Dataplane::sync` — partial when
//! it can, full when asked (periodic resync) or after a failure. Feeding it from an informer and
//! calling `sync` from a `BoundedRunner` is the daemon's job.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Endpoints, Service};

use crate::dataplane::{self, Dataplane, SyncStats};
use crate::model::{ServicePortName, ServiceTable};
use crate::table::{desired_table, Skipped};
use crate::tracker::{ChangeTracker, ObjectKey};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("dataplane sync failed")]
    Dataplane(#[from] dataplane::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What one sync did.
#[derive(Debug, Clone, Default)]
pub struct SyncOutcome {
    pub stats: SyncStats,
    /// Service ports rewritten (all of them on a full sync).
    pub changed: usize,
    /// Input that could not be served (to be logged).
    pub skipped: Vec<Skipped>,
}

pub struct Proxier<D> {
    node_name: String,
    // The informer's shared objects: the proxy holds no copies of its own.
    services: BTreeMap<ObjectKey, Arc<Service>>,
    endpoints: BTreeMap<ObjectKey, Arc<Endpoints>>,
    service_changes: ChangeTracker<Arc<Service>>,
    endpoints_changes: ChangeTracker<Arc<Endpoints>>,
    /// The table the dataplane was last synced to successfully.
    synced: Option<ServiceTable>,
    dataplane: D,
}

impl<D: Dataplane> Proxier<D> {
    pub fn new(node_name: &str, dataplane: D) -> Self {
        Proxier {
            node_name: node_name.to_string(),
            services: BTreeMap::new(),
            endpoints: BTreeMap::new(),
            service_changes: ChangeTracker::new(),
            endpoints_changes: ChangeTracker::new(),
            synced: None,
            dataplane,
        }
    }

    /// A Service was added or updated (`Some`) or deleted (`None`).
    pub fn on_service(&mut self, key: ObjectKey, current: Option<Arc<Service>>) {
        let previous = match &current {
            Some(s) => self.services.insert(key.clone(), s.clone()),
            None => self.services.remove(&key),
        };
        self.service_changes.update(key, previous, current);
    }

    /// An Endpoints object was added or updated (`Some`) or deleted (`None`).
    pub fn on_endpoints(&mut self, key: ObjectKey, current: Option<Arc<Endpoints>>) {
        let previous = match &current {
            Some(e) => self.endpoints.insert(key.clone(), e.clone()),
            None => self.endpoints.remove(&key),
        };
        self.endpoints_changes.update(key, previous, current);
    }

    /// Changes are waiting for a sync.
    pub fn has_pending(&self) -> bool {
        !self.service_changes.is_empty() || !self.endpoints_changes.is_empty()
    }

    /// The table last synced (for `weft services`).
    pub fn table(&self) -> Option<&ServiceTable> {
        self.synced.as_ref()
    }

    pub fn dataplane(&self) -> &D {
        &self.dataplane
    }

    /// Syncs the dataplane to the current objects; `full` forces a full sync.
    pub fn sync(&mut self, full: bool) -> Result<SyncOutcome> {
        let mut touched = self.service_changes.take();
        touched.extend(self.endpoints_changes.take());
        let services: Vec<&Service> = self.services.values().map(|s| &**s).collect();
        let endpoints: Vec<&Endpoints> = self.endpoints.values().map(|e| &**e).collect();
        let (table, skipped) = desired_table(&services, &endpoints, &self.node_name);
        let changed: Option<BTreeSet<ServicePortName>> = match (&self.synced, full) {
            // Only ports whose entry really differs: an annotation-only update rewrites nothing.
            (Some(old), false) => Some(touched.into_iter().filter(|k| old.get(k) != table.get(k)).collect()),
            _ => None,
        };
        let n = changed.as_ref().map_or(table.len(), BTreeSet::len);
        // Forget the synced table first: if the sync fails, the next one is full.
        self.synced = None;
        let stats = self.dataplane.sync(&table, changed.as_ref())?;
        self.synced = Some(table);
        Ok(SyncOutcome { stats, changed: n, skipped })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Protocol;
    use serde_json::json;

    /// Records what it was asked to do; fails on demand.
    #[derive(Default)]
    struct Recorder {
        calls: Vec<(usize, Option<BTreeSet<ServicePortName>>)>,
        fail_next: bool,
    }

    impl Dataplane for Recorder {
        fn sync(
            &mut self,
            table: &ServiceTable,
            changed: Option<&BTreeSet<ServicePortName>>,
        ) -> dataplane::Result<SyncStats> {
            self.calls.push((table.len(), changed.cloned()));
            if std::mem::take(&mut self.fail_next) {
                let e =
                    crate::restore::Error::Failed { program: "x".into(), status: "1".into(), stderr: "boom".into() };
                return Err(e.into());
            }
            Ok(SyncStats { full: changed.is_none(), ..SyncStats::default() })
        }

        fn mode(&self) -> &'static str {
            "recorder"
        }
    }

    fn svc(name: &str, ip: &str, annotation: &str) -> Arc<Service> {
        serde_json::from_value(json!({"metadata": {"name": name, "namespace": "ns", "annotations": {"a": annotation}},
            "spec": {"clusterIP": ip, "ports": [{"port": 80}]}}))
        .map(Arc::new)
        .unwrap()
    }
    fn eps(name: &str, ip: &str) -> Arc<Endpoints> {
        serde_json::from_value(json!({"metadata": {"name": name, "namespace": "ns"},
            "subsets": [{"addresses": [{"ip": ip}], "ports": [{"port": 8080}]}]}))
        .map(Arc::new)
        .unwrap()
    }
    fn k(name: &str) -> ObjectKey {
        ObjectKey::new("ns", name)
    }
    fn spn(name: &str) -> ServicePortName {
        ServicePortName::new("ns", name, "", Protocol::Tcp)
    }

    #[test]
    fn first_sync_full_then_partial_then_full_after_failure() {
        let mut p = Proxier::new("node-1", Recorder::default());
        p.on_service(k("a"), Some(svc("a", "10.96.0.1", "x")));
        p.on_service(k("b"), Some(svc("b", "10.96.0.2", "x")));
        p.sync(false).unwrap();
        assert_eq!(p.dataplane().calls.last().unwrap(), &(2, None));

        p.on_endpoints(k("a"), Some(eps("a", "10.244.0.5")));
        p.on_service(k("b"), Some(svc("b", "10.96.0.2", "changed annotation only")));
        p.sync(false).unwrap();
        assert_eq!(p.dataplane().calls.last().unwrap(), &(2, Some([spn("a")].into())));

        p.dataplane.fail_next = true;
        p.on_service(k("b"), None);
        assert!(p.sync(false).is_err());
        p.sync(false).unwrap();
        assert_eq!(p.dataplane().calls.last().unwrap(), &(1, None), "after a failure the next sync is full");
        assert!(!p.has_pending());
    }
}
