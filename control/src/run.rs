//! The runtime around the reconciles: informers for every kind, a dispatcher that turns their events into work-queue
//! keys, workers that reconcile a key against the cache and apply the actions through the store (creations in
//! slow-start batches, writes as compare-and-swap, conflicts answered by reconciling again), a fence that keeps a
//! key from being reconciled again before the cache shows its own last writes, periodic resyncs, leader election,
//! `/healthz` and `/metrics`. It writes only what reconciles decide.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Endpoints, Node, Pod, ReplicationController, Service};
use k8s_openapi::jiff::Timestamp;
use k8s_openapi::Metadata;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::time::Instant;
use weft_api::http::{self, Response};
use weft_api::store::rev_of;
use weft_api::{Informer, InformerEvent, Object, ObjectKey, Store};

use crate::action::{Action, Outcome, Target};
use crate::cache::{Cache, Objects};
use crate::events::{self, Ctl, Key};
use crate::leader::{self, Leadership};
use crate::obj::{Kind, Obj};
use crate::queue::Queue;
use crate::{daemonset, deployment, endpoints, gc, nodes, replicaset, scheduler};

/// Everything `weft controller` is told on its command line, resolved.
#[derive(Debug, Clone)]
pub struct Options {
    pub etcd: weft_api::EtcdArgs,
    /// None: no leader election (`--leader-elect=false`): act at once.
    pub leader: Option<leader::Config>,
    pub controllers: HashSet<Ctl>,
    pub nodes: nodes::Config,
    pub healthz_addr: Option<SocketAddr>,
    pub metrics_addr: Option<SocketAddr>,
    pub workers: usize,
    /// Every key is reconciled at least this often.
    pub resync: Duration,
    /// Writes in flight at once within one reconcile's group of actions.
    pub write_concurrency: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Etcd(#[from] weft_api::etcd::Error),
    #[error(transparent)]
    Leader(#[from] leader::Error),
    #[error("listening on {addr}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("signal handler")]
    Signal(#[source] std::io::Error),
}

/// A write that failed, and whether it was a lost compare-and-swap (expected) or something else.
#[derive(Debug)]
pub enum ApplyError {
    Conflict(String),
    Failed(String),
    NotLeader,
}

/// How soon a key whose write lost a compare-and-swap is reconciled again.
const CONFLICT_RETRY: Duration = Duration::from_millis(100);

/// How long a key waits for the cache to show its writes before reconciling anyway.
const FENCE_TIMEOUT: Duration = Duration::from_secs(30);

enum Want {
    /// The kind's informer has seen this revision (the write is in the cache, or something newer is).
    Revision(i64),
    /// No object with this uid at the key.
    Gone(String),
}

struct Fence {
    kind: Kind,
    key: ObjectKey,
    want: Want,
    until: Instant,
}

#[derive(Default)]
pub struct Metrics {
    reconciles: BTreeMap<Ctl, u64>,
    actions: BTreeMap<(Ctl, &'static str, Kind), u64>,
    errors: BTreeMap<(Ctl, &'static str), u64>,
    leader: bool,
    synced: bool,
    queue_depth: usize,
}

impl Metrics {
    /// The metrics as OpenMetrics text (`weft_api::metrics::CONTENT_TYPE`), built by prometheus-client.
    pub fn render(&self) -> String {
        let mut r = Registry::default();
        r.register(
            "weft_controller_leader",
            "1 while this process holds the leader lease and acts",
            ConstGauge::new(i64::from(self.leader)),
        );
        r.register(
            "weft_controller_informers_synced",
            "1 once every informer has listed its kind",
            ConstGauge::new(i64::from(self.synced)),
        );
        r.register("weft_controller_queue_depth", "Keys waiting for a reconcile", ConstGauge::new(self.queue_depth));
        // Counters are registered without `_total`: the encoder appends it.
        let reconciles = Family::<[(&str, String); 1], Counter>::default();
        for (c, n) in &self.reconciles {
            reconciles.get_or_create(&[("controller", c.to_string())]).inc_by(*n);
        }
        r.register("weft_controller_reconciles", "Reconciles run, by controller", reconciles);
        let actions = Family::<[(&str, String); 3], Counter>::default();
        for ((c, v, k), n) in &self.actions {
            actions
                .get_or_create(&[("controller", c.to_string()), ("verb", v.to_string()), ("kind", k.to_string())])
                .inc_by(*n);
        }
        r.register("weft_controller_actions", "Writes that succeeded, by controller, verb and kind", actions);
        let errors = Family::<[(&str, String); 2], Counter>::default();
        for ((c, reason), n) in &self.errors {
            errors.get_or_create(&[("controller", c.to_string()), ("reason", reason.to_string())]).inc_by(*n);
        }
        r.register("weft_controller_action_errors", "Writes that failed: conflict (reconciled again) or error", errors);
        weft_api::metrics::encode(&r)
    }

    /// Writes that succeeded, over all controllers (tests read it).
    pub fn total_actions(&self) -> u64 {
        self.actions.values().sum()
    }
}

/// The controllers' shared state: what the workers and the dispatcher use.
pub struct Controllers {
    store: Store,
    cache: Cache,
    queue: Queue<Key>,
    enabled: HashSet<Ctl>,
    leadership: Leadership,
    nodes: nodes::Config,
    /// Node lifecycle's observations of heartbeats, on this process's clock.
    health: Mutex<nodes::Health>,
    write_concurrency: usize,
    /// Highest resourceVersion each kind's informer has delivered.
    seen: Mutex<HashMap<Kind, i64>>,
    fences: Mutex<HashMap<Key, Vec<Fence>>>,
    pub metrics: Arc<Mutex<Metrics>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Completes `generateName` as the API server does: at most 58 characters of prefix, then 5 random characters
/// from an alphabet without vowels or look-alikes.
pub fn generate_name(prefix: &str) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let prefix: String = prefix.chars().take(58).collect();
    let suffix: String = (0..5).map(|_| ALPHABET[rand::random::<usize>() % ALPHABET.len()] as char).collect();
    format!("{prefix}{suffix}")
}

fn store_error(e: weft_api::store::Error) -> ApplyError {
    if e.is_fenced() {
        return ApplyError::NotLeader;
    }
    if e.is_conflict() || e.is_not_found() {
        ApplyError::Conflict(weft_api::error_chain(&e))
    } else {
        ApplyError::Failed(weft_api::error_chain(&e))
    }
}

impl Controllers {
    pub fn new(store: Store, cache: Cache, opts: &Options, leadership: Leadership) -> Controllers {
        Controllers {
            store,
            cache,
            queue: Queue::new(Duration::from_millis(50), Duration::from_secs(30)),
            enabled: opts.controllers.clone(),
            leadership,
            nodes: opts.nodes.clone(),
            health: Mutex::default(),
            write_concurrency: opts.write_concurrency.max(1),
            seen: Mutex::default(),
            fences: Mutex::default(),
            metrics: Arc::default(),
        }
    }

    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    pub fn enqueue(&self, keys: impl IntoIterator<Item = Key>) {
        for k in keys {
            if self.enabled.contains(&k.ctl) {
                self.queue.add(k);
            }
        }
    }

    /// Records what an informer delivered and wakes the reconciles it concerns.
    pub fn observe<K: Object>(&self, kind: Kind, ev: &InformerEvent<K>, keys: Vec<Key>) {
        if let Some(n) = &ev.new {
            let mut seen = lock(&self.seen);
            let r = seen.entry(kind).or_default();
            *r = (*r).max(rev_of(n.as_ref()));
        }
        self.enqueue(keys);
    }

    /// The pure part: what this key's controller would do now.
    pub fn reconcile(&self, key: &Key, now: Timestamp) -> Outcome {
        let c = &self.cache;
        match key.ctl {
            Ctl::ReplicaSet => replicaset::reconcile_replicaset(&key.obj, c, now),
            Ctl::ReplicationController => replicaset::reconcile_rc(&key.obj, c, now),
            Ctl::Scheduler => scheduler::schedule(c, now),
            Ctl::Deployment => deployment::reconcile(&key.obj, c, now),
            Ctl::Endpoints => endpoints::reconcile(&key.obj, c, now),
            Ctl::DaemonSet => daemonset::reconcile(&key.obj, c, now),
            Ctl::NodeLifecycle => {
                let mut health = lock(&self.health);
                nodes::observe(&mut health, c, now);
                nodes::reconcile(c, now, &health, &self.nodes)
            }
            Ctl::GarbageCollector => gc::collect(c, now),
        }
    }

    /// True once every write this key made is in the cache (or waited for long enough).
    pub fn fenced_in(&self, key: &Key) -> bool {
        let mut fences = lock(&self.fences);
        let Some(list) = fences.get_mut(key) else { return true };
        let now = Instant::now();
        let seen = lock(&self.seen);
        list.retain(|f| {
            let met = match &f.want {
                Want::Revision(r) => seen.get(&f.kind).copied().unwrap_or(0) >= *r,
                Want::Gone(uid) => self.cache.meta(f.kind, &f.key).is_none_or(|m| m.uid.as_deref() != Some(uid)),
            };
            !met && now < f.until
        });
        if list.is_empty() {
            fences.remove(key);
            true
        } else {
            false
        }
    }

    fn fence(&self, key: &Key, kind: Kind, obj: ObjectKey, want: Want) {
        let f = Fence { kind, key: obj, want, until: Instant::now() + FENCE_TIMEOUT };
        lock(&self.fences).entry(key.clone()).or_default().push(f);
    }

    fn count_action(&self, ctl: Ctl, verb: &'static str, kind: Kind) {
        *lock(&self.metrics).actions.entry((ctl, verb, kind)).or_default() += 1;
    }

    fn count_error(&self, ctl: Ctl, reason: &'static str) {
        *lock(&self.metrics).errors.entry((ctl, reason)).or_default() += 1;
    }

    /// One worker: take a key, wait for its fence, reconcile, apply, requeue as the outcome and errors say.
    pub async fn work(self: Arc<Self>) {
        loop {
            let key = self.queue.get().await;
            if !self.leadership.is_leader() {
                // The process is about to stop (leadership lost): do nothing more.
                self.queue.done(&key);
                return;
            }
            if !self.fenced_in(&key) {
                self.queue.done(&key);
                // The informer event that lifts the fence enqueues the key; this is the fallback.
                self.queue.add_after(key, Duration::from_millis(500));
                continue;
            }
            let outcome = self.reconcile(&key, weft_api::store::now_timestamp());
            *lock(&self.metrics).reconciles.entry(key.ctl).or_default() += 1;
            let result = self.apply(&key, outcome.actions).await;
            match result {
                Ok(()) => {
                    self.queue.forget(&key);
                    if let Some(d) = outcome.requeue_after {
                        self.queue.add_after(key.clone(), d);
                    }
                }
                Err(ApplyError::NotLeader) => {}
                Err(ApplyError::Conflict(e)) => {
                    // Expected under concurrent writers: the cache is a moment behind. Look again soon, without
                    // the growing backoff that real errors get (the fence does not cover a write that failed).
                    tracing::debug!(key = %key, error = %e, "conflict; reconciling again");
                    self.count_error(key.ctl, "conflict");
                    self.queue.add_after(key.clone(), CONFLICT_RETRY);
                }
                Err(ApplyError::Failed(e)) => {
                    tracing::warn!(key = %key, error = %e, "applying actions failed; retrying with backoff");
                    self.count_error(key.ctl, "error");
                    self.queue.add_rate_limited(key.clone());
                }
            }
            self.queue.done(&key);
            lock(&self.metrics).queue_depth = self.queue.len();
        }
    }

    /// Applies actions in order. A run of consecutive actions with the same verb and kind is one group: its writes
    /// go out together (creations in slow-start batches 1, 2, 4, …), and a group with a failure ends the apply.
    pub async fn apply(&self, key: &Key, actions: Vec<Action>) -> Result<(), ApplyError> {
        let mut groups: Vec<Vec<Action>> = Vec::new();
        for a in actions {
            match groups.last_mut() {
                Some(g) if g[0].verb() == a.verb() && g[0].kind() == a.kind() => g.push(a),
                _ => groups.push(vec![a]),
            }
        }
        for group in groups {
            if !self.leadership.is_leader() {
                return Err(ApplyError::NotLeader);
            }
            if group[0].verb() == "create" {
                let mut rest = group.into_iter();
                for size in replicaset::slow_start_batches(rest.len()) {
                    let batch: Vec<Action> = rest.by_ref().take(size).collect();
                    self.apply_all(key, batch).await?;
                    if !self.leadership.is_leader() {
                        return Err(ApplyError::NotLeader);
                    }
                }
            } else {
                self.apply_all(key, group).await?;
            }
        }
        Ok(())
    }

    async fn apply_all(&self, key: &Key, actions: Vec<Action>) -> Result<(), ApplyError> {
        let owners_checked: Mutex<HashMap<(Kind, ObjectKey), bool>> = Mutex::default();
        let results: Vec<Result<(), ApplyError>> = futures::stream::iter(actions)
            .map(|a| self.apply_one(key, a, &owners_checked))
            .buffer_unordered(self.write_concurrency)
            .collect()
            .await;
        // A lost compare-and-swap is the common failure; report another kind of error first if there is one.
        let mut conflict = None;
        for r in results {
            match r {
                Ok(()) => {}
                Err(ApplyError::Conflict(e)) => conflict = Some(e),
                Err(e) => return Err(e),
            }
        }
        conflict.map_or(Ok(()), |e| Err(ApplyError::Conflict(e)))
    }

    async fn apply_one(
        &self,
        key: &Key,
        action: Action,
        owners_checked: &Mutex<HashMap<(Kind, ObjectKey), bool>>,
    ) -> Result<(), ApplyError> {
        let (verb, kind) = (action.verb(), action.kind());
        // Checked per write, not only per group: a group's writes start as earlier ones finish, and a process
        // that was paused past its renew deadline must not send one more.
        if !self.leadership.is_leader() {
            return Err(ApplyError::NotLeader);
        }
        tracing::debug!(key = %key, action = %action, "applying");
        match action {
            Action::Create(obj) => {
                let (okey, rev) = self.create(obj).await?;
                self.fence(key, kind, okey, Want::Revision(rev));
            }
            Action::Update { obj, .. } => {
                let okey = obj.key();
                let rev = weft_api::with_object!(obj, o => self.store.update(&o).await.map(|n| rev_of(&n)))
                    .map_err(store_error)?;
                self.fence(key, kind, okey, Want::Revision(rev));
            }
            Action::Delete { target, owners_gone, .. } => {
                for owner in owners_gone {
                    let cached = lock(owners_checked).get(&(owner.kind, owner.key.clone())).copied();
                    let exists = match cached {
                        Some(e) => e,
                        None => {
                            let e = self.exists(&owner).await?;
                            lock(owners_checked).insert((owner.kind, owner.key.clone()), e);
                            e
                        }
                    };
                    if exists {
                        tracing::debug!(key = %key, owner = %owner, "owner exists after all; not collecting");
                        return Ok(());
                    }
                }
                self.delete(&target).await?;
                self.fence(key, kind, target.key.clone(), Want::Gone(target.uid.clone()));
            }
        }
        self.count_action(key.ctl, verb, kind);
        Ok(())
    }

    async fn create(&self, mut obj: Obj) -> Result<(ObjectKey, i64), ApplyError> {
        let generate = obj.metadata().name.is_none().then(|| obj.metadata().generate_name.clone().unwrap_or_default());
        for _ in 0..5 {
            if let Some(prefix) = &generate {
                obj.metadata_mut().name = Some(generate_name(prefix));
            }
            let r =
                weft_api::with_object!(&obj, o => self.store.create(o).await.map(|n| (ObjectKey::of(&n), rev_of(&n))));
            match r {
                Ok(x) => return Ok(x),
                Err(e) if e.is_already_exists() && generate.is_some() => continue,
                Err(e) if e.is_already_exists() => return Err(ApplyError::Conflict(weft_api::error_chain(&e))),
                Err(e) => return Err(store_error(e)),
            }
        }
        Err(ApplyError::Failed(format!("no free name for {:?} after 5 tries", generate)))
    }

    /// Does the store hold `t` (same uid)? Read from etcd, not the cache.
    async fn exists(&self, t: &Target) -> Result<bool, ApplyError> {
        let ns = t.key.namespace.as_deref();
        weft_api::with_kind!(t.kind, K => match self.store.get::<K>(ns, &t.key.name).await {
            Ok(o) => Ok(o.metadata().uid.as_deref() == Some(t.uid.as_str())),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(ApplyError::Failed(weft_api::error_chain(&e))),
        })
    }

    /// Deletes `t` if the store still holds it with its uid (a compare-and-swap on the revision read).
    async fn delete(&self, t: &Target) -> Result<(), ApplyError> {
        let ns = t.key.namespace.as_deref();
        for _ in 0..5 {
            let r: Result<bool, weft_api::store::Error> = weft_api::with_kind!(t.kind, K => {
                match self.store.get_unchecked::<K>(ns, &t.key.name).await {
                    Ok(cur) if cur.metadata().uid.as_deref() == Some(t.uid.as_str()) => {
                        let rv = rev_of(&cur).to_string();
                        self.store.delete::<K>(ns, &t.key.name, Some(&rv)).await.map(|_| true)
                    }
                    Ok(_) => Ok(true), // another object of that name now: ours is gone
                    Err(e) => Err(e),
                }
            });
            match r {
                Ok(_) => return Ok(()),
                Err(e) if e.is_not_found() => return Ok(()),
                Err(e) if e.is_conflict() => continue,
                Err(e) => return Err(store_error(e)),
            }
        }
        Err(ApplyError::Conflict(format!("{t} kept changing while being deleted")))
    }
}

/// Everything the informers need driving: their handles' futures and event receivers.
struct Feeds {
    pods: UnboundedReceiver<InformerEvent<Pod>>,
    replicasets: UnboundedReceiver<InformerEvent<ReplicaSet>>,
    rcs: UnboundedReceiver<InformerEvent<ReplicationController>>,
    deployments: UnboundedReceiver<InformerEvent<Deployment>>,
    daemonsets: UnboundedReceiver<InformerEvent<DaemonSet>>,
    services: UnboundedReceiver<InformerEvent<Service>>,
    endpoints: UnboundedReceiver<InformerEvent<Endpoints>>,
    nodes: UnboundedReceiver<InformerEvent<Node>>,
    leases: UnboundedReceiver<InformerEvent<Lease>>,
}

fn informer<K: Object>(store: &Store) -> (Objects<K>, UnboundedReceiver<InformerEvent<K>>) {
    let (i, rx, fut) = Informer::<K>::new(store.clone(), None);
    tokio::spawn(fut);
    (Objects::Live(i), rx)
}

/// Starts the informers (their futures are spawned) and waits for their first lists.
pub async fn start_informers(store: &Store) -> (Cache, impl FnOnce(Arc<Controllers>) -> tokio::task::JoinHandle<()>) {
    let (pods, pods_rx) = informer::<Pod>(store);
    let (replicasets, rs_rx) = informer::<ReplicaSet>(store);
    let (rcs, rc_rx) = informer::<ReplicationController>(store);
    let (deployments, d_rx) = informer::<Deployment>(store);
    let (daemonsets, ds_rx) = informer::<DaemonSet>(store);
    let (services, svc_rx) = informer::<Service>(store);
    let (endpoints, ep_rx) = informer::<Endpoints>(store);
    let (nodes, node_rx) = informer::<Node>(store);
    let (leases, lease_rx) = informer::<Lease>(store);
    let cache = Cache { pods, replicasets, rcs, deployments, daemonsets, services, endpoints, nodes, leases };
    for_each_live(&cache).await;
    let feeds = Feeds {
        pods: pods_rx,
        replicasets: rs_rx,
        rcs: rc_rx,
        deployments: d_rx,
        daemonsets: ds_rx,
        services: svc_rx,
        endpoints: ep_rx,
        nodes: node_rx,
        leases: lease_rx,
    };
    (cache, move |c: Arc<Controllers>| tokio::spawn(dispatch(c, feeds)))
}

async fn for_each_live(cache: &Cache) {
    async fn wait<K: Object>(o: &Objects<K>) {
        if let Objects::Live(i) = o {
            i.wait_synced().await;
        }
    }
    wait(&cache.pods).await;
    wait(&cache.replicasets).await;
    wait(&cache.rcs).await;
    wait(&cache.deployments).await;
    wait(&cache.daemonsets).await;
    wait(&cache.services).await;
    wait(&cache.endpoints).await;
    wait(&cache.nodes).await;
    wait(&cache.leases).await;
}

/// Turns informer events into keys until every informer is gone.
async fn dispatch(c: Arc<Controllers>, mut f: Feeds) {
    loop {
        let cache = c.cache.clone();
        let cache = &cache;
        tokio::select! {
            Some(ev) = f.pods.recv() => {
                let keys = events::for_pod(cache, ev.old.as_deref(), ev.new.as_deref());
                c.observe(Kind::Pod, &ev, keys);
            }
            Some(ev) = f.replicasets.recv() => {
                let keys = events::for_replicaset(cache, ev.old.as_deref(), ev.new.as_deref());
                c.observe(Kind::ReplicaSet, &ev, keys);
            }
            Some(ev) = f.rcs.recv() => {
                let keys = events::for_owner(cache, Ctl::ReplicationController, ev.old.as_deref(), ev.new.as_deref());
                c.observe(Kind::ReplicationController, &ev, keys);
            }
            Some(ev) = f.deployments.recv() => {
                let keys = events::for_owner(cache, Ctl::Deployment, ev.old.as_deref(), ev.new.as_deref());
                c.observe(Kind::Deployment, &ev, keys);
            }
            Some(ev) = f.daemonsets.recv() => {
                let keys = events::for_owner(cache, Ctl::DaemonSet, ev.old.as_deref(), ev.new.as_deref());
                c.observe(Kind::DaemonSet, &ev, keys);
            }
            Some(ev) = f.services.recv() => {
                let keys = events::for_service(ev.old.as_deref(), ev.new.as_deref());
                c.observe(Kind::Service, &ev, keys);
            }
            Some(ev) = f.endpoints.recv() => {
                let keys = events::for_endpoints(cache, ev.old.as_deref(), ev.new.as_deref());
                c.observe(Kind::Endpoints, &ev, keys);
            }
            Some(ev) = f.nodes.recv() => {
                let keys = events::for_node(cache, ev.old.as_deref(), ev.new.as_deref());
                c.observe(Kind::Node, &ev, keys);
            }
            Some(ev) = f.leases.recv() => {
                let keys = events::for_lease(ev.old.as_deref(), ev.new.as_deref());
                c.observe(Kind::Lease, &ev, keys);
            }
            else => return,
        }
    }
}

async fn serve(addr: Option<SocketAddr>, metrics: Arc<Mutex<Metrics>>) -> Result<(), Error> {
    let Some(addr) = addr else { return Ok(()) };
    let handler: http::Handler = Arc::new(move |path: &str| match path {
        "/healthz" | "/readyz" | "/livez" => Response::text(200, "ok"),
        "/metrics" => {
            Response { status: 200, content_type: weft_api::metrics::CONTENT_TYPE, body: lock(&metrics).render() }
        }
        _ => Response::not_found(),
    });
    let server = http::bind(addr, handler).await.map_err(|source| Error::Listen { addr, source })?;
    tokio::spawn(server);
    Ok(())
}

/// Runs the controllers until SIGTERM/SIGINT (Ok) or until leadership is lost (an error: the caller exits, and a
/// supervisor starts a new candidate).
pub async fn run(opts: Options) -> Result<(), Error> {
    let metrics: Arc<Mutex<Metrics>> = Arc::default();
    serve(opts.healthz_addr, metrics.clone()).await?;
    if opts.metrics_addr != opts.healthz_addr {
        serve(opts.metrics_addr, metrics.clone()).await?;
    }
    let client = weft_api::connect(&opts.etcd).await?;
    let mut store = Store::new(client.clone());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).map_err(Error::Signal)?;

    let (leadership, lost, release) = match &opts.leader {
        None => (Leadership::always(), None, None),
        Some(cfg) => {
            tracing::info!(identity = %cfg.identity, lease = %cfg.key(), "waiting to become leader");
            let elected = tokio::select! {
                e = leader::acquire(client.clone(), cfg.clone()) => e?,
                _ = term.recv() => return Ok(()),
                _ = tokio::signal::ctrl_c() => return Ok(()),
            };
            let leadership = elected.leadership();
            // Every write compares the Lease key's etcd lease: an ex-leader's in-flight writes fail whole.
            store = store.with_fence(weft_api::store::Fence { key: cfg.key(), lease_id: elected.lease_id() });
            let release = (elected.client(), elected.lease_id());
            (leadership, Some(tokio::spawn(elected.keep())), Some(release))
        }
    };
    lock(&metrics).leader = true;

    let (cache, start_dispatch) = start_informers(&store).await;
    lock(&metrics).synced = true;
    let mut controllers = Controllers::new(store, cache, &opts, leadership.clone());
    controllers.metrics = metrics.clone();
    let controllers = Arc::new(controllers);
    tracing::info!(
        controllers = ?{ let mut v: Vec<&str> = opts.controllers.iter().map(|c| c.name()).collect(); v.sort(); v },
        "caches synced; controllers starting"
    );
    controllers.enqueue(events::all_keys(&controllers.cache));
    start_dispatch(controllers.clone());
    for _ in 0..opts.workers.max(1) {
        tokio::spawn(controllers.clone().work());
    }
    {
        let c = controllers.clone();
        let resync = opts.resync;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(resync).await;
                c.enqueue(events::all_keys(&c.cache));
            }
        });
    }
    {
        let c = controllers.clone();
        let period = opts.nodes.monitor_period;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(period).await;
                c.enqueue([Key::all(Ctl::NodeLifecycle)]);
            }
        });
    }

    let lost = async move {
        match lost {
            Some(h) => h.await.unwrap_or_else(|e| leader::Error::Lost(format!("renewal task ended: {e}"))),
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        e = lost => {
            lock(&metrics).leader = false;
            tracing::error!(error = %e, "stopping: leadership lost");
            return Err(e.into());
        }
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    leadership.stop();
    lock(&metrics).leader = false;
    if let Some((mut client, id)) = release {
        leader::Elected::release(&mut client, id).await;
        tracing::info!("released the leader lease");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_render_keeps_names_and_labels() {
        let mut m = Metrics { leader: true, synced: true, queue_depth: 3, ..Metrics::default() };
        m.reconciles.insert(Ctl::ReplicaSet, 4);
        m.actions.insert((Ctl::ReplicaSet, "create", Kind::Pod), 2);
        m.errors.insert((Ctl::Deployment, "conflict"), 1);
        let text = m.render();
        let pod = Kind::Pod;
        for line in [
            "weft_controller_leader 1".to_string(),
            "weft_controller_informers_synced 1".to_string(),
            "weft_controller_queue_depth 3".to_string(),
            "# TYPE weft_controller_reconciles counter".to_string(),
            "weft_controller_reconciles_total{controller=\"replicaset\"} 4".to_string(),
            format!("weft_controller_actions_total{{controller=\"replicaset\",verb=\"create\",kind=\"{pod}\"}} 2"),
            "weft_controller_action_errors_total{controller=\"deployment\",reason=\"conflict\"} 1".to_string(),
            "# EOF".to_string(),
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
        assert_eq!(m.total_actions(), 2);
    }
}
