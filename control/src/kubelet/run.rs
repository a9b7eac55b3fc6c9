//! The kubelet daemon: a level-triggered loop that lists CRI's sandboxes and containers every sync period (and on
//! every change to a pod), groups them by pod uid (from the labels the kubelet puts on them, so a restarted
//! kubelet adopts what runs) and hands each pod to its own worker, which runs probes, applies the pure decision
//! (`decide`) through the `Runtime`, and writes the pod's status. Reads pods and Services; writes pod status,
//! deletes pods it finished terminating, and its Node and Lease (`node`).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_cri::v1 as cri;
use k8s_openapi::api::core::v1::{Pod, PodStatus, Service};
use k8s_openapi::jiff::Timestamp;
use tokio::sync::watch;
use weft_api::{EtcdArgs, Informer, Store};

use super::config::{self, NodeSettings};
use super::cri::{ContainerState, PodSandboxState, Runtime};
use super::decide::{self, BackoffPolicy, ContainerObs, Observed, PodMemory, RunState, SandboxObs, StartError};
use super::{node, probe};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("etcd")]
    Etcd(#[from] weft_api::etcd::Error),
    #[error("kubelet server")]
    Server(#[from] super::server::Error),
    #[error("healthz on {addr}")]
    Healthz { addr: SocketAddr, source: std::io::Error },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, Clone)]
pub struct Options {
    pub etcd: EtcdArgs,
    pub settings: NodeSettings,
    pub pod_cidr: Option<String>,
    pub subnet_file: PathBuf,
    pub backoff: BackoffPolicy,
    /// How often CRI's view is compared with the bound pods (and probes are considered).
    pub sync_period: Duration,
    pub node_status_update: Duration,
    pub node_status_report: Duration,
    pub lease_renew: Duration,
    pub lease_duration_secs: i32,
    pub healthz: Option<SocketAddr>,
    /// Pods whose sandbox and containers are being created at once: the runtime does them on the same cores, so
    /// a bounded number finish early instead of all finishing late.
    pub parallel_starts: usize,
    /// The kubelet's HTTPS server (logs, exec): address and certificates; None leaves it off.
    pub server: Option<(SocketAddr, super::server::TlsFiles)>,
}

/// One pod's sandboxes and containers as CRI lists them.
#[derive(Debug, Clone, Default)]
pub struct PodRaw {
    /// (sandbox, created_at, grace seconds from its annotation)
    pub sandboxes: Vec<(SandboxObs, i64, i64)>,
    /// (container, sandbox id)
    pub containers: Vec<(ContainerObs, String)>,
}

impl PodRaw {
    fn newest_sandbox(&self) -> Option<&SandboxObs> {
        self.sandboxes.iter().max_by_key(|(s, created, _)| (s.attempt, *created)).map(|(s, _, _)| s)
    }

    /// What the decision looks at: the newest sandbox and the containers in it.
    pub fn observed(&self) -> Observed {
        let sandbox = self.newest_sandbox().cloned();
        let sid = sandbox.as_ref().map(|s| s.id.clone()).unwrap_or_default();
        let containers = self.containers.iter().filter(|(_, s)| *s == sid).map(|(c, _)| c.clone()).collect();
        Observed { sandbox, containers }
    }

    fn grace(&self) -> i64 {
        self.sandboxes.iter().max_by_key(|(s, c, _)| (s.attempt, *c)).map(|(_, _, g)| *g).unwrap_or(30)
    }
}

fn ts_nanos(n: i64) -> Option<Timestamp> {
    (n > 0).then(|| Timestamp::from_nanosecond(n as i128).ok()).flatten()
}

struct Shared<R> {
    rt: R,
    store: Store,
    opts: Options,
    services: Informer<Service>,
    /// Container statuses by id, refreshed when the listed state changes.
    statuses: Mutex<HashMap<String, ContainerObs>>,
    /// Sandbox addresses by id (fixed for a sandbox's life).
    ips: Mutex<HashMap<String, Option<String>>>,
    starts: tokio::sync::Semaphore,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<R: Runtime> Shared<R> {
    /// CRI's view of the pods this kubelet manages, by pod uid (`uid` Some: only that pod).
    async fn observe(&self, uid: Option<&str>) -> Result<HashMap<String, PodRaw>, super::cri::Error> {
        let mut labels = HashMap::from([(config::LABEL_MANAGED.to_string(), self.opts.settings.node_name.clone())]);
        if let Some(u) = uid {
            labels.insert(config::LABEL_POD_UID.to_string(), u.to_string());
        }
        let filter = cri::PodSandboxFilter { label_selector: labels, ..Default::default() };
        let sandboxes = self.rt.list_pod_sandbox(Some(filter)).await?;
        let mut out: HashMap<String, PodRaw> = HashMap::new();
        let mut owner: HashMap<String, String> = HashMap::new();
        for sb in sandboxes {
            let Some(u) = sb.labels.get(config::LABEL_POD_UID).cloned() else { continue };
            let ready = sb.state == PodSandboxState::SandboxReady as i32;
            let cached = lock(&self.ips).get(&sb.id).cloned();
            let ip = match cached {
                Some(ip) => ip,
                None if ready => {
                    let ip = match self.rt.pod_sandbox_status(&sb.id).await {
                        Ok(st) => st.network.map(|n| n.ip).filter(|ip| !ip.is_empty()),
                        Err(e) => {
                            tracing::warn!(sandbox = %sb.id, error = %e, "sandbox status");
                            None
                        }
                    };
                    lock(&self.ips).insert(sb.id.clone(), ip.clone());
                    ip
                }
                None => None,
            };
            let attempt = sb.metadata.as_ref().map(|m| m.attempt).unwrap_or(0);
            let grace = sb.annotations.get(config::ANNOTATION_GRACE).and_then(|g| g.parse().ok()).unwrap_or(30);
            owner.insert(sb.id.clone(), u.clone());
            out.entry(u).or_default().sandboxes.push((
                SandboxObs { id: sb.id.clone(), ready, ip, attempt },
                sb.created_at,
                grace,
            ));
        }
        let containers = if uid.is_some() {
            let mut all = Vec::new();
            for sid in owner.keys() {
                let f = cri::ContainerFilter { pod_sandbox_id: sid.clone(), ..Default::default() };
                all.extend(self.rt.list_containers(Some(f)).await?);
            }
            all
        } else {
            self.rt.list_containers(None).await?
        };
        let mut seen = Vec::new();
        for c in containers {
            let Some(u) = owner.get(&c.pod_sandbox_id) else { continue };
            seen.push(c.id.clone());
            let state = match c.state {
                s if s == ContainerState::ContainerCreated as i32 => RunState::Created,
                s if s == ContainerState::ContainerRunning as i32 => RunState::Running,
                s if s == ContainerState::ContainerExited as i32 => RunState::Exited,
                _ => RunState::Unknown,
            };
            let cached = lock(&self.statuses).get(&c.id).cloned().filter(|o| o.state == state);
            let obs = match cached {
                Some(o) => o,
                None => match self.rt.container_status(&c.id).await {
                    Ok(st) => {
                        let o = ContainerObs {
                            id: c.id.clone(),
                            name: c.metadata.as_ref().map(|m| m.name.clone()).unwrap_or_default(),
                            attempt: c.metadata.as_ref().map(|m| m.attempt).unwrap_or(0),
                            state,
                            exit_code: st.exit_code,
                            reason: st.reason.clone(),
                            message: st.message.clone(),
                            created_at: ts_nanos(st.created_at),
                            started_at: ts_nanos(st.started_at),
                            finished_at: ts_nanos(st.finished_at),
                            image: c.image.as_ref().map(|i| i.image.clone()).unwrap_or_default(),
                            image_ref: st.image_ref.clone(),
                            hash: c.labels.get(config::LABEL_HASH).cloned().unwrap_or_default(),
                        };
                        lock(&self.statuses).insert(c.id.clone(), o.clone());
                        o
                    }
                    Err(e) if e.is_not_found() => continue,
                    Err(e) => return Err(e),
                },
            };
            out.entry(u.clone()).or_default().containers.push((obs, c.pod_sandbox_id.clone()));
        }
        if uid.is_none() {
            lock(&self.statuses).retain(|id, _| seen.contains(id));
            let live: Vec<String> = out.values().flat_map(|r| r.sandboxes.iter().map(|s| s.0.id.clone())).collect();
            lock(&self.ips).retain(|id, _| live.contains(id));
        }
        Ok(out)
    }
}

/// What a worker is handed each pass: the pod (None: it is gone from the store) and CRI's view of it.
#[derive(Clone)]
struct Input {
    pod: Option<Arc<Pod>>,
    raw: PodRaw,
    /// When the runtime was listed: a view older than the worker's last change is listed again.
    taken: std::time::Instant,
}

struct Worker {
    tx: watch::Sender<Option<Input>>,
    handle: tokio::task::JoinHandle<()>,
}

/// `weft kubelet`.
pub async fn run<R: Runtime>(opts: Options, rt: R) -> Result<()> {
    let client = weft_api::connect(&opts.etcd).await?;
    let store = Store::new(client);
    let (pods, mut pod_events, pods_fut) = Informer::<Pod>::new(store.clone(), None);
    let (services, _svc_events, svc_fut) = Informer::<Service>::new(store.clone(), None);
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(pods_fut);
    tasks.spawn(svc_fut);
    if let Some(addr) = opts.healthz {
        let handler: weft_api::http::Handler = Arc::new(|path: &str| match path {
            "/healthz" => weft_api::http::Response::text(200, "ok"),
            _ => weft_api::http::Response::not_found(),
        });
        let serve = weft_api::http::bind(addr, handler).await.map_err(|source| Error::Healthz { addr, source })?;
        tasks.spawn(serve);
    }
    if let Some((addr, files)) = &opts.server {
        let serve =
            super::server::bind(*addr, files, rt.clone(), pods.clone(), opts.settings.node_name.clone()).await?;
        tracing::info!(%addr, "kubelet server listening (client certificates required)");
        tasks.spawn(serve);
    }
    tasks.spawn(node_loop(store.clone(), rt.clone(), opts.clone()));
    tasks.spawn(lease_loop(store.clone(), opts.clone()));
    pods.wait_synced().await;
    services.wait_synced().await;
    tracing::info!(node = %opts.settings.node_name, "kubelet started");
    let shared = Arc::new(Shared {
        rt,
        store,
        opts: opts.clone(),
        services,
        statuses: Mutex::new(HashMap::new()),
        ips: Mutex::new(HashMap::new()),
        starts: tokio::sync::Semaphore::new(opts.parallel_starts.max(1)),
    });
    let mut workers: HashMap<String, Worker> = HashMap::new();
    let mut tick = tokio::time::interval(opts.sync_period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            ev = pod_events.recv() => {
                if ev.is_none() {
                    return Ok(());
                }
                // Coalesce a burst of changes into one pass.
                while pod_events.try_recv().is_ok() {}
            }
        }
        let taken = std::time::Instant::now();
        let snapshot = match shared.observe(None).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %weft_api::error_chain(&e), "listing the runtime's pods failed");
                continue;
            }
        };
        let mine: HashMap<String, Arc<Pod>> = pods
            .list()
            .into_iter()
            .filter(|p| crate::pod::node_name(p) == opts.settings.node_name)
            .filter_map(|p| p.metadata.uid.clone().filter(|u| !u.is_empty()).map(|u| (u, p)))
            .collect();
        workers.retain(|_, w| !w.handle.is_finished());
        let mut uids: Vec<String> = mine.keys().cloned().collect();
        uids.extend(snapshot.keys().filter(|u| !mine.contains_key(*u)).cloned());
        for uid in &uids {
            let input =
                Input { pod: mine.get(uid).cloned(), raw: snapshot.get(uid).cloned().unwrap_or_default(), taken };
            let w = workers.entry(uid.clone()).or_insert_with(|| {
                let (tx, rx) = watch::channel(None);
                let handle = tokio::spawn(worker(shared.clone(), uid.clone(), rx));
                Worker { tx, handle }
            });
            w.tx.send_replace(Some(input));
        }
        // Workers whose pod is gone from both the store and the runtime stop.
        workers.retain(|uid, _| uids.contains(uid));
    }
}

async fn node_loop<R: Runtime>(store: Store, rt: R, opts: Options) {
    let mut tick = tokio::time::interval(opts.node_status_update);
    loop {
        tick.tick().await;
        let mut facts = node::host_facts(
            &opts.settings.node_name,
            &opts.settings.host_ip,
            opts.pod_cidr.clone(),
            &opts.subnet_file,
        );
        facts.runtime_version = match rt.version().await {
            Ok((name, version)) => Some(format!("{name}://{version}")),
            Err(e) => {
                tracing::warn!(error = %e, "container runtime is down");
                None
            }
        };
        if let Err(e) = node::sync_node(&store, &facts, opts.node_status_report).await {
            tracing::warn!(error = %weft_api::error_chain(&e), "updating the node status failed");
        }
    }
}

async fn lease_loop(store: Store, opts: Options) {
    let mut tick = tokio::time::interval(opts.lease_renew);
    loop {
        tick.tick().await;
        if let Err(e) = node::renew_lease(&store, &opts.settings.node_name, opts.lease_duration_secs).await {
            tracing::warn!(error = %weft_api::error_chain(&e), "renewing the node lease failed");
        }
    }
}

type ProbeKey = (String, &'static str);

struct PodWorker<R> {
    shared: Arc<Shared<R>>,
    uid: String,
    mem: PodMemory,
    probes: HashMap<ProbeKey, probe::State>,
    last_written: Option<PodStatus>,
    /// When this worker last changed something in the runtime.
    acted_at: Option<std::time::Instant>,
}

async fn worker<R: Runtime>(shared: Arc<Shared<R>>, uid: String, mut rx: watch::Receiver<Option<Input>>) {
    let mut w = PodWorker {
        shared,
        uid,
        mem: PodMemory::default(),
        probes: HashMap::new(),
        last_written: None,
        acted_at: None,
    };
    while rx.changed().await.is_ok() {
        let Some(mut input) = rx.borrow_and_update().clone() else { continue };
        // A list taken while this worker was still changing things (a container created, not yet started)
        // would undo its own work: list this pod again.
        if w.acted_at.is_some_and(|a| input.taken < a) {
            match w.shared.observe(Some(&w.uid)).await {
                Ok(mut m) => input.raw = m.remove(&w.uid).unwrap_or_default(),
                Err(e) => {
                    tracing::warn!(uid = %w.uid, error = %e, "listing the pod's containers failed");
                    continue;
                }
            }
        }
        let done = match &input.pod {
            None => w.clean_orphan(&input.raw).await,
            Some(pod) => w.sync(pod, &input.raw).await,
        };
        w.acted_at = Some(std::time::Instant::now());
        if done {
            return;
        }
    }
}

fn pod_name(p: &Pod) -> String {
    format!("{}/{}", p.metadata.namespace.as_deref().unwrap_or("default"), p.metadata.name.as_deref().unwrap_or(""))
}

impl<R: Runtime> PodWorker<R> {
    fn rt(&self) -> &R {
        &self.shared.rt
    }

    /// Stops every running container (SIGTERM, SIGKILL after `grace`) at once, then every ready sandbox.
    async fn kill_all(&self, raw: &PodRaw, grace: i64) {
        let grace = Duration::from_secs(grace.max(0) as u64);
        let stops = raw
            .containers
            .iter()
            .filter(|(c, _)| matches!(c.state, RunState::Running | RunState::Created | RunState::Unknown))
            .map(|(c, _)| async move {
                if let Err(e) = self.rt().stop_container(&c.id, grace).await {
                    tracing::warn!(container = %c.id, error = %e, "stopping a container failed");
                }
            });
        futures::future::join_all(stops).await;
        for (s, _, _) in raw.sandboxes.iter().filter(|(s, _, _)| s.ready) {
            if let Err(e) = self.rt().stop_pod_sandbox(&s.id).await {
                tracing::warn!(sandbox = %s.id, error = %e, "stopping a sandbox failed");
            }
        }
    }

    async fn remove_all(&self, raw: &PodRaw) -> bool {
        let mut ok = true;
        for (s, _, _) in &raw.sandboxes {
            if let Err(e) = self.rt().stop_pod_sandbox(&s.id).await {
                ok &= e.is_not_found();
            }
            if let Err(e) = self.rt().remove_pod_sandbox(&s.id).await {
                tracing::warn!(sandbox = %s.id, error = %e, "removing a sandbox failed");
                ok &= e.is_not_found();
            }
        }
        ok
    }

    /// Containers of a pod no longer in the store: stopped with the grace period they were started with, removed.
    async fn clean_orphan(&mut self, raw: &PodRaw) -> bool {
        if raw.sandboxes.is_empty() {
            return true;
        }
        tracing::info!(uid = %self.uid, "stopping the containers of a pod that is gone");
        self.kill_all(raw, raw.grace()).await;
        let done = self.remove_all(raw).await;
        if done && !self.uid.is_empty() && !self.uid.contains('/') {
            let _ = std::fs::remove_dir_all(format!("{}/pods/{}", self.shared.opts.settings.root_dir, self.uid));
        }
        done
    }

    /// One level-triggered pass for a pod; true when the worker is done (the pod was deleted).
    async fn sync(&mut self, pod: &Arc<Pod>, raw: &PodRaw) -> bool {
        let shared = self.shared.clone();
        let opts = &shared.opts;
        if pod.metadata.deletion_timestamp.is_some() {
            let grace = pod.metadata.deletion_grace_period_seconds.unwrap_or_else(|| config::grace_period(pod));
            self.kill_all(raw, grace).await;
            if !self.remove_all(raw).await {
                return false;
            }
            self.remove_pod_dirs(pod);
            self.delete_pod_object(pod).await;
            return true;
        }
        let now = weft_api::store::now_timestamp();
        if crate::pod::is_terminal(pod) {
            // Finished: nothing runs again; containers stay for their logs until the pod is deleted.
            if raw.containers.iter().any(|(c, _)| c.state == RunState::Running)
                || raw.sandboxes.iter().any(|s| s.0.ready)
            {
                self.kill_all(raw, config::grace_period(pod)).await;
            }
            return false;
        }
        let mut obs = raw.observed();
        self.run_probes(pod, &obs).await;
        let actions = decide::compute_pod_actions(pod, &obs, &self.mem, &opts.backoff, now);
        let creates = actions.create_sandbox.is_some() || actions.start_init.is_some() || !actions.start.is_empty();
        let permit = if creates { shared.starts.acquire().await.ok() } else { None };
        let acted = self.execute(pod, &obs, raw, &actions, now).await;
        decide::mark_pull_backoff(pod, &actions, &mut self.mem);
        if acted {
            match self.shared.observe(Some(&self.uid)).await {
                Ok(mut m) => obs = m.remove(&self.uid).unwrap_or_default().observed(),
                Err(e) => tracing::warn!(pod = %pod_name(pod), error = %e, "observing the pod after changes"),
            }
        }
        let inputs = decide::StatusInputs { host_ip: opts.settings.host_ip.clone(), previous: pod.status.clone() };
        let status = decide::pod_status(pod, &obs, &self.mem, &opts.backoff, &inputs, weft_api::store::now_timestamp());
        drop(permit);
        self.write_status(pod, status).await;
        self.collect_garbage(raw).await;
        false
    }

    /// The pod's emptyDir volumes and logs, once its containers are gone.
    fn remove_pod_dirs(&self, pod: &Pod) {
        let settings = &self.shared.opts.settings;
        for d in [config::pod_dir(pod, settings), config::pod_log_dir(pod, settings)] {
            if pod.metadata.uid.as_deref().is_some_and(|u| !u.is_empty()) {
                let _ = std::fs::remove_dir_all(d);
            }
        }
    }

    async fn delete_pod_object(&self, pod: &Pod) {
        let store = &self.shared.store;
        let ns = pod.metadata.namespace.as_deref();
        let name = pod.metadata.name.as_deref().unwrap_or_default();
        match store.get::<Pod>(ns, name).await {
            Ok(cur) if cur.metadata.uid == pod.metadata.uid => {
                // Finalizers are someone else's to remove; only an object without them is deleted here.
                if cur.metadata.finalizers.as_ref().is_some_and(|f| !f.is_empty()) {
                    return;
                }
                let rv = cur.metadata.resource_version.clone();
                match store.delete::<Pod>(ns, name, rv.as_deref()).await {
                    Ok(_) => tracing::info!(pod = %pod_name(pod), "pod terminated and deleted"),
                    Err(e) => tracing::warn!(pod = %pod_name(pod), error = %weft_api::error_chain(&e), "deleting pod"),
                }
            }
            _ => {}
        }
    }

    async fn run_probes(&mut self, pod: &Pod, obs: &Observed) {
        let now = weft_api::store::now_timestamp();
        let ip = obs.sandbox.as_ref().and_then(|s| s.ip.clone()).unwrap_or_default();
        let mut live_ids = Vec::new();
        for c in decide::app_containers(pod) {
            let Some(o) = obs.latest(&c.name).0.filter(|o| o.state == RunState::Running) else { continue };
            live_ids.push(o.id.clone());
            let started_at = o.started_at.unwrap_or(now);
            let mut started = true;
            if let Some(p) = &c.startup_probe {
                let params = probe::params(p, probe::Kind::Startup);
                let st = self
                    .probes
                    .entry((o.id.clone(), "startup"))
                    .or_insert_with(|| probe::State::new(probe::Kind::Startup));
                if !st.ok && st.due(&params, started_at, now) {
                    let (ok, msg) = probe::run(&self.shared.rt, p, &params, c, &o.id, &ip).await;
                    st.record(&params, ok, msg, now);
                    if !st.ok && st.failures >= params.failure_threshold {
                        self.mem.liveness_failed.insert(
                            o.id.clone(),
                            format!(
                                "Container {} failed startup probe, will be restarted: {}",
                                c.name, st.last_message
                            ),
                        );
                    }
                }
                started = st.ok;
            }
            self.mem.started.insert(o.id.clone(), started);
            if !started {
                continue;
            }
            if let Some(p) = &c.liveness_probe {
                let params = probe::params(p, probe::Kind::Liveness);
                let st = self
                    .probes
                    .entry((o.id.clone(), "liveness"))
                    .or_insert_with(|| probe::State::new(probe::Kind::Liveness));
                if st.due(&params, started_at, now) {
                    let (ok, msg) = probe::run(&self.shared.rt, p, &params, c, &o.id, &ip).await;
                    st.record(&params, ok, msg, now);
                    if !st.ok {
                        tracing::info!(pod = %pod_name(pod), container = %c.name, reason = %st.last_message, "liveness probe failed");
                        self.mem.liveness_failed.insert(
                            o.id.clone(),
                            format!(
                                "Container {} failed liveness probe, will be restarted: {}",
                                c.name, st.last_message
                            ),
                        );
                    }
                }
            }
            if let Some(p) = &c.readiness_probe {
                let params = probe::params(p, probe::Kind::Readiness);
                let st = self
                    .probes
                    .entry((o.id.clone(), "readiness"))
                    .or_insert_with(|| probe::State::new(probe::Kind::Readiness));
                if st.due(&params, started_at, now) {
                    let (ok, msg) = probe::run(&self.shared.rt, p, &params, c, &o.id, &ip).await;
                    st.record(&params, ok, msg, now);
                }
                self.mem.ready.insert(o.id.clone(), st.ok);
            }
        }
        self.probes.retain(|(id, _), _| live_ids.contains(id));
        self.mem.ready.retain(|id, _| live_ids.contains(id));
        self.mem.started.retain(|id, _| live_ids.contains(id));
        self.mem.liveness_failed.retain(|id, _| live_ids.contains(id));
    }

    /// Carries out the decision; true if anything changed in the runtime.
    async fn execute(
        &mut self,
        pod: &Pod,
        obs: &Observed,
        raw: &PodRaw,
        a: &decide::PodActions,
        now: Timestamp,
    ) -> bool {
        let name = pod_name(pod);
        let grace = config::grace_period(pod);
        let mut acted = false;
        if let Some(why) = &a.kill_pod {
            let anything_up = raw.containers.iter().any(|(c, _)| c.state == RunState::Running)
                || raw.sandboxes.iter().any(|(s, _, _)| s.ready);
            if anything_up {
                tracing::info!(pod = %name, reason = %why, "killing the pod");
                self.kill_all(raw, grace).await;
                acted = true;
            }
        }
        for (id, cname, why) in &a.kill {
            tracing::info!(pod = %name, container = %cname, reason = %why, "killing container");
            if let Err(e) = self.rt().stop_container(id, Duration::from_secs(grace as u64)).await {
                tracing::warn!(pod = %name, container = %cname, error = %e, "stopping container failed");
            }
            self.mem.liveness_failed.remove(id);
            acted = true;
        }
        let settings = &self.shared.opts.settings;
        let (sandbox_id, sandbox_ip, sandbox_cfg) = match a.create_sandbox {
            Some(attempt) => {
                let cfg = config::sandbox_config(pod, attempt, settings);
                if let Err(e) = std::fs::create_dir_all(&cfg.log_directory) {
                    tracing::warn!(pod = %name, dir = %cfg.log_directory, error = %e, "creating the log directory");
                }
                acted = true;
                match self.rt().run_pod_sandbox(cfg.clone()).await {
                    Ok(id) => {
                        self.mem.start_errors.remove(decide::SANDBOX_KEY);
                        let ip = self.rt().pod_sandbox_status(&id).await.ok().and_then(|s| s.network).map(|n| n.ip);
                        tracing::info!(pod = %name, sandbox = %id, ip = ?ip, "sandbox created");
                        (id, ip.unwrap_or_default(), cfg)
                    }
                    Err(e) => {
                        tracing::warn!(pod = %name, error = %e.message(), "creating the sandbox failed");
                        let key = decide::SANDBOX_KEY.to_string();
                        let next = self.shared.opts.backoff.next(self.mem.backoff.get(&key), now);
                        self.mem.backoff.insert(key.clone(), next);
                        let err = StartError { reason: "FailedCreatePodSandBox".into(), message: e.message(), at: now };
                        self.mem.start_errors.insert(key, err);
                        return acted;
                    }
                }
            }
            None => match &obs.sandbox {
                Some(s) => {
                    let attempt = s.attempt;
                    (s.id.clone(), s.ip.clone().unwrap_or_default(), config::sandbox_config(pod, attempt, settings))
                }
                None => return acted,
            },
        };
        let fresh = a.create_sandbox.is_some();
        let sandbox_ip = if config::host_network(pod) { settings.host_ip.clone() } else { sandbox_ip };
        let mut starts: Vec<(&k8s_openapi::api::core::v1::Container, &str)> = Vec::new();
        if let Some(i) = a.start_init {
            starts.extend(decide::init_containers(pod).get(i).map(|c| (c, "init")));
        }
        starts.extend(a.start.iter().filter_map(|i| decide::app_containers(pod).get(*i)).map(|c| (c, "app")));
        for (c, kind) in starts {
            let latest = if fresh { None } else { obs.latest(&c.name).0 };
            // In a new sandbox the count goes on from the containers of the old one (restartCount).
            let before = raw.containers.iter().filter(|(o, _)| o.name == c.name).map(|(o, _)| o.attempt + 1).max();
            let attempt = latest.map(|o| o.attempt + 1).or(before).unwrap_or(0);
            // A restart after an exit moves the back-off on.
            if let Some(at) = latest.filter(|o| o.state == RunState::Exited).and_then(|o| o.finished_at) {
                let next = self.shared.opts.backoff.next(self.mem.backoff.get(&decide::key(&c.name)), at);
                self.mem.backoff.insert(decide::key(&c.name), next);
            }
            self.start_container(pod, c, kind, attempt, &sandbox_id, &sandbox_ip, &sandbox_cfg, now).await;
            acted = true;
        }
        acted
    }

    #[allow(clippy::too_many_arguments)]
    async fn start_container(
        &mut self,
        pod: &Pod,
        c: &k8s_openapi::api::core::v1::Container,
        kind: &str,
        attempt: u32,
        sandbox_id: &str,
        pod_ip: &str,
        sandbox_cfg: &cri::PodSandboxConfig,
        now: Timestamp,
    ) {
        let name = pod_name(pod);
        let key = decide::key(&c.name);
        let fail = |this: &mut Self, reason: &str, message: String| {
            tracing::warn!(pod = %name, container = %c.name, reason, message = %message, "container did not start");
            this.mem.start_errors.insert(key.clone(), StartError { reason: reason.into(), message, at: now });
            let next = this.shared.opts.backoff.next(this.mem.backoff.get(&key), now);
            this.mem.backoff.insert(key.clone(), next);
        };
        let image = c.image.clone().unwrap_or_default();
        if image.is_empty() {
            return fail(self, "CreateContainerConfigError", "spec.containers[].image is empty".into());
        }
        let present = match self.rt().image_status(&image).await {
            Ok(p) => p.is_some(),
            Err(e) => return fail(self, "ErrImagePull", e.message()),
        };
        match config::pull_policy(c) {
            "Never" if !present => {
                let msg = format!("Container image \"{image}\" is not present with pull policy of Never");
                return fail(self, "ErrImageNeverPull", msg);
            }
            "Never" => {}
            "IfNotPresent" if present => {}
            _ => {
                if let Err(e) = self.rt().pull_image(&image, sandbox_cfg.clone()).await {
                    return fail(self, "ErrImagePull", e.message());
                }
            }
        }
        let services = self.shared.services.list();
        let services: Vec<Service> = services.iter().map(|s| (**s).clone()).collect();
        let env = match config::container_env(pod, c, &services, &self.shared.opts.settings, pod_ip) {
            Ok(env) => env,
            Err(e) => return fail(self, "CreateContainerConfigError", e.to_string()),
        };
        let mounts = match config::mounts(pod, c, &self.shared.opts.settings) {
            Ok(m) => m,
            Err(e) => return fail(self, "CreateContainerConfigError", e.to_string()),
        };
        for d in config::empty_dirs(pod, &self.shared.opts.settings) {
            if let Err(e) = std::fs::create_dir_all(&d) {
                return fail(self, "CreateContainerConfigError", format!("emptyDir {d}: {e}"));
            }
        }
        let log_dir = std::path::Path::new(&sandbox_cfg.log_directory).join(&c.name);
        let _ = std::fs::create_dir_all(&log_dir);
        let cfg = config::container_config(pod, c, kind, attempt, env, &image, mounts);
        let id = match self.rt().create_container(sandbox_id, cfg, sandbox_cfg.clone()).await {
            Ok(id) => id,
            Err(e) => return fail(self, "CreateContainerError", e.message()),
        };
        self.mem.start_errors.remove(&key);
        if let Err(e) = self.rt().start_container(&id).await {
            // The runtime records the failed start as an exit (reason StartError, code 128): the restart policy
            // and back-off take it from there.
            tracing::warn!(pod = %name, container = %c.name, error = %e.message(), "starting container failed");
            return;
        }
        tracing::info!(pod = %name, container = %c.name, id = %id, attempt, "container started");
    }

    async fn write_status(&mut self, pod: &Pod, status: PodStatus) {
        if self.last_written.as_ref() == Some(&status) || pod.status.as_ref() == Some(&status) {
            self.last_written = Some(status);
            return;
        }
        let store = &self.shared.store;
        let ns = pod.metadata.namespace.as_deref();
        let name = pod.metadata.name.as_deref().unwrap_or_default();
        for _ in 0..5 {
            let mut cur = match store.get::<Pod>(ns, name).await {
                Ok(p) if p.metadata.uid == pod.metadata.uid => p,
                Ok(_) => return,
                Err(e) => {
                    if !e.is_not_found() {
                        tracing::warn!(pod = %pod_name(pod), error = %weft_api::error_chain(&e), "reading pod");
                    }
                    return;
                }
            };
            // Terminal phases never change, even if this kubelet computed otherwise after a restart.
            let mut status = status.clone();
            if crate::pod::is_terminal(&cur) {
                status.phase = cur.status.as_ref().and_then(|s| s.phase.clone());
            }
            cur.status = Some(status.clone());
            match store.update(&cur).await {
                Ok(_) => {
                    self.last_written = Some(status);
                    return;
                }
                Err(e) if e.is_conflict() => continue,
                Err(e) => {
                    tracing::warn!(pod = %pod_name(pod), error = %weft_api::error_chain(&e), "writing pod status");
                    return;
                }
            }
        }
    }

    /// Old sandboxes (stopped, then removed) and exited attempts beyond the latest two of each container.
    async fn collect_garbage(&self, raw: &PodRaw) {
        let Some(newest) = raw.newest_sandbox().map(|s| s.id.clone()) else { return };
        for (s, _, _) in raw.sandboxes.iter().filter(|(s, _, _)| s.id != newest) {
            let _ = self.rt().stop_pod_sandbox(&s.id).await;
            if let Err(e) = self.rt().remove_pod_sandbox(&s.id).await {
                tracing::warn!(sandbox = %s.id, error = %e, "removing an old sandbox failed");
            }
        }
        let mut by_name: BTreeMap<&str, Vec<&ContainerObs>> = BTreeMap::new();
        for (c, sid) in &raw.containers {
            if *sid == newest {
                by_name.entry(c.name.as_str()).or_default().push(c);
            }
        }
        for (_, mut cs) in by_name {
            cs.sort_by_key(|c| std::cmp::Reverse((c.attempt, c.created_at)));
            for c in cs.iter().skip(2).filter(|c| c.state == RunState::Exited) {
                if let Err(e) = self.rt().remove_container(&c.id).await {
                    tracing::warn!(container = %c.id, error = %e, "removing an old container failed");
                }
            }
        }
    }
}
