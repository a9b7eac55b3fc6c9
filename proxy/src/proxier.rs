//! The proxy's loop body without the loop: keeps the latest Service and Endpoints summaries, their pending
//! changes, and the table last synced; `sync` turns them into one `Dataplane::sync` — partial when
//! it can, full when asked (periodic resync) or after a failure. Feeding it from an informer and
//! calling `sync` from a `BoundedRunner` is the daemon's job.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::dataplane::{self, Dataplane, SyncStats};
use crate::model::{ServicePortName, ServiceTable};
use crate::summary::{EndpointsSummary, ServiceSummary};
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
    /// Service ports whose rules the kernel refused this sync (found by bisecting with `Dataplane::check`):
    /// left out, the rest applied.
    pub refused: Vec<(ServicePortName, String)>,
}

/// A service port the kernel refused, and the entry it refused: retried only once the entry changes.
#[derive(Debug, Clone)]
struct Refused {
    entry: crate::model::ServiceEntry,
    reason: String,
}

pub struct Proxier<D> {
    // The informers' shared summaries: the proxy holds no copies of its own.
    services: BTreeMap<ObjectKey, Arc<ServiceSummary>>,
    endpoints: BTreeMap<ObjectKey, Arc<EndpointsSummary>>,
    service_changes: ChangeTracker<Arc<ServiceSummary>>,
    endpoints_changes: ChangeTracker<Arc<EndpointsSummary>>,
    /// The table the dataplane was last synced to successfully.
    synced: Option<ServiceTable>,
    refused: BTreeMap<ServicePortName, Refused>,
    dataplane: D,
}

impl<D: Dataplane> Proxier<D> {
    /// The node's name is not needed here: the Endpoints summaries already say which endpoints are local.
    pub fn new(dataplane: D) -> Self {
        Proxier {
            services: BTreeMap::new(),
            endpoints: BTreeMap::new(),
            service_changes: ChangeTracker::new(),
            endpoints_changes: ChangeTracker::new(),
            synced: None,
            refused: BTreeMap::new(),
            dataplane,
        }
    }

    /// A Service was added or updated (`Some`) or deleted (`None`).
    pub fn on_service(&mut self, key: ObjectKey, current: Option<Arc<ServiceSummary>>) {
        let previous = match &current {
            Some(s) => self.services.insert(key.clone(), s.clone()),
            None => self.services.remove(&key),
        };
        self.service_changes.update(key, previous, current);
    }

    /// An Endpoints object was added or updated (`Some`) or deleted (`None`).
    pub fn on_endpoints(&mut self, key: ObjectKey, current: Option<Arc<EndpointsSummary>>) {
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

    /// Service ports left out because the kernel refused their rules, with the tool's reason.
    pub fn refused(&self) -> impl Iterator<Item = (&ServicePortName, &str)> {
        self.refused.iter().map(|(k, r)| (k, r.reason.as_str()))
    }

    /// Syncs the dataplane to the current objects; `full` forces a full sync.
    pub fn sync(&mut self, full: bool) -> Result<SyncOutcome> {
        let mut touched = self.service_changes.take();
        touched.extend(self.endpoints_changes.take());
        let (mut table, skipped) = desired_table(&self.services, &self.endpoints);
        // A port the kernel refused stays out while its entry is what was refused; a changed entry is tried again.
        self.refused.retain(|k, r| table.get(k) == Some(&r.entry));
        for k in self.refused.keys() {
            table.remove(k);
        }
        let changed: Option<BTreeSet<ServicePortName>> = match (&self.synced, full) {
            // Only ports whose entry really differs: an annotation-only update rewrites nothing.
            (Some(old), false) => Some(touched.into_iter().filter(|k| old.get(k) != table.get(k)).collect()),
            _ => None,
        };
        let n = changed.as_ref().map_or(table.len(), BTreeSet::len);
        // Forget the synced table first: if the sync fails, the next one is full.
        self.synced = None;
        let mut refused = Vec::new();
        let stats = match self.dataplane.sync(&table, changed.as_ref()) {
            Ok(stats) => stats,
            Err(e) => {
                // One bad service must not keep the others out: find what the kernel refuses, leave it out, and
                // retry at once with a full sync of the rest.
                let keys: Vec<ServicePortName> = table.keys().cloned().collect();
                refused = self.bisect(&table, &keys);
                if refused.is_empty() {
                    return Err(e.into());
                }
                for (k, reason) in &refused {
                    if let Some(entry) = table.remove(k) {
                        self.refused.insert(k.clone(), Refused { entry, reason: reason.clone() });
                    }
                }
                self.dataplane.sync(&table, None)?
            }
        };
        self.synced = Some(table);
        Ok(SyncOutcome { stats, changed: n, skipped, refused })
    }

    /// The ports of `keys` whose rules `Dataplane::check` refuses, each with the tool's reason: halves are
    /// checked until the refused ports stand alone (a few checks per bad port, not one per port).
    fn bisect(&mut self, table: &ServiceTable, keys: &[ServicePortName]) -> Vec<(ServicePortName, String)> {
        let sub: ServiceTable = keys.iter().filter_map(|k| Some((k.clone(), table.get(k)?.clone()))).collect();
        let err = match self.dataplane.check(&sub) {
            Ok(()) => return vec![],
            Err(e) => e,
        };
        if keys.len() == 1 {
            return vec![(keys[0].clone(), weft_api::error_chain(&err))];
        }
        let (a, b) = keys.split_at(keys.len() / 2);
        let mut out = self.bisect(table, a);
        out.extend(self.bisect(table, b));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Protocol;
    use serde_json::json;

    /// Records what it was asked to do; fails on demand, and refuses any table holding a port named `poison`.
    #[derive(Default)]
    struct Recorder {
        calls: Vec<(usize, Option<BTreeSet<ServicePortName>>)>,
        fail_next: bool,
        checks: usize,
    }

    fn poisoned(table: &ServiceTable) -> bool {
        table.keys().any(|k| k.name.starts_with("poison"))
    }

    fn refuse() -> dataplane::Error {
        crate::restore::Error::Failed { program: "x".into(), status: "2".into(), stderr: "Bad argument".into() }.into()
    }

    impl Dataplane for Recorder {
        fn sync(
            &mut self,
            table: &ServiceTable,
            changed: Option<&BTreeSet<ServicePortName>>,
        ) -> dataplane::Result<SyncStats> {
            self.calls.push((table.len(), changed.cloned()));
            if poisoned(table) {
                return Err(refuse());
            }
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

        fn check(&mut self, table: &ServiceTable) -> dataplane::Result<()> {
            self.checks += 1;
            if poisoned(table) {
                return Err(refuse());
            }
            Ok(())
        }
    }

    #[test]
    fn ports_the_kernel_refuses_are_left_out_and_the_rest_applied() {
        let mut p = Proxier::new(Recorder::default());
        for i in 0..30 {
            p.on_service(k(&format!("s{i}")), Some(svc(&format!("s{i}"), &format!("10.96.0.{i}"), "x")));
        }
        p.on_service(k("poison-a"), Some(svc("poison-a", "10.96.1.1", "x")));
        p.on_service(k("poison-b"), Some(svc("poison-b", "10.96.1.2", "x")));
        let out = p.sync(false).unwrap();
        let refused: Vec<String> = out.refused.iter().map(|(k, _)| k.name.clone()).collect();
        assert_eq!(refused, ["poison-a", "poison-b"]);
        assert_eq!(p.table().unwrap().len(), 30, "every other port applied");
        assert_eq!(p.dataplane().calls.last().unwrap(), &(30, None), "retried at once as a full sync");
        assert!(p.dataplane().checks <= 20, "bisected, not one check per port: {}", p.dataplane().checks);
        assert_eq!(p.refused().count(), 2, "reported for `weft services`");
        // Unchanged, they stay out without another bisection; a fixed one comes back.
        let checks = p.dataplane().checks;
        p.on_service(k("s1"), Some(svc("s1", "10.96.0.1", "y")));
        p.sync(false).unwrap();
        assert_eq!(p.dataplane().checks, checks);
        p.on_service(k("poison-b"), None);
        p.on_service(k("poison-b"), Some(svc("poison-b", "10.96.1.3", "x")));
        p.sync(false).unwrap();
        assert!(p.dataplane().checks > checks, "a changed entry is tried again");
        assert_eq!(p.refused().count(), 2, "and refused again");
    }

    fn svc(name: &str, ip: &str, annotation: &str) -> Arc<ServiceSummary> {
        let s = json!({"metadata": {"name": name, "namespace": "ns", "annotations": {"a": annotation}},
            "spec": {"clusterIP": ip, "ports": [{"port": 80}]}});
        Arc::new(crate::summary::service(serde_json::from_value(s).unwrap()).unwrap())
    }
    fn eps(name: &str, ip: &str) -> Arc<EndpointsSummary> {
        let e = json!({"metadata": {"name": name, "namespace": "ns"},
            "subsets": [{"addresses": [{"ip": ip}], "ports": [{"port": 8080}]}]});
        let nodes = crate::summary::NodeNames::default();
        Arc::new(crate::summary::endpoints(serde_json::from_value(e).unwrap(), "node-1", &nodes).unwrap())
    }
    fn k(name: &str) -> ObjectKey {
        ObjectKey::new("ns", name)
    }
    fn spn(name: &str) -> ServicePortName {
        ServicePortName::new("ns", name, "", Protocol::Tcp)
    }

    #[test]
    fn first_sync_full_then_partial_then_full_after_failure() {
        let mut p = Proxier::new(Recorder::default());
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
