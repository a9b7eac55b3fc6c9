//! The kubelet's per-pod decision, without I/O (`computePodActions`): from the pod's spec, what CRI shows for it,
//! the restart back-off, the last start errors and the liveness results, what to do now; and the pod's status
//! (phase, conditions, container states) from the same inputs (`status`). Reads nothing, writes nothing.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{
    Container, ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting, ContainerStatus,
    HostIP, Pod, PodCondition, PodIP, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};

/// What CRI says about one container (one attempt of one container of the pod).
#[derive(Debug, Clone, PartialEq)]
pub struct ContainerObs {
    pub id: String,
    pub name: String,
    pub attempt: u32,
    pub state: RunState,
    pub exit_code: i32,
    /// CRI's reason for an exit (`OOMKilled`, `Error`, `Completed`) or empty.
    pub reason: String,
    pub message: String,
    pub created_at: Option<Timestamp>,
    pub started_at: Option<Timestamp>,
    pub finished_at: Option<Timestamp>,
    pub image: String,
    pub image_ref: String,
    /// The spec hash the kubelet labelled it with: a changed spec means a new container.
    pub hash: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    Created,
    Running,
    Exited,
    Unknown,
}

/// The pod's newest sandbox.
#[derive(Debug, Clone, PartialEq)]
pub struct SandboxObs {
    pub id: String,
    pub ready: bool,
    pub ip: Option<String>,
    pub attempt: u32,
}

/// Everything CRI shows for one pod.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Observed {
    pub sandbox: Option<SandboxObs>,
    /// Every container of the pod (all attempts still kept, init and app alike).
    pub containers: Vec<ContainerObs>,
}

impl Observed {
    /// The newest attempt of container `name`, and the one before it.
    pub fn latest(&self, name: &str) -> (Option<&ContainerObs>, Option<&ContainerObs>) {
        let mut all: Vec<&ContainerObs> = self.containers.iter().filter(|c| c.name == name).collect();
        all.sort_by_key(|c| std::cmp::Reverse((c.attempt, c.created_at)));
        (all.first().copied(), all.get(1).copied())
    }
}

/// Restart back-off: `initial`, doubling to `max`; forgotten when the last exit is older than `reset_after`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffPolicy {
    pub initial: Duration,
    pub max: Duration,
    pub reset_after: Duration,
}

impl Default for BackoffPolicy {
    fn default() -> Self {
        BackoffPolicy {
            initial: Duration::from_secs(10),
            max: Duration::from_secs(300),
            reset_after: Duration::from_secs(600),
        }
    }
}

/// One container's back-off: the delay that applies after the exit (or failure) at `since`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub delay: Duration,
    pub since: Timestamp,
}

fn add(t: Timestamp, d: Duration) -> Timestamp {
    t.saturating_add(SignedDuration::try_from(d).unwrap_or(SignedDuration::MAX)).unwrap_or(t)
}

impl BackoffPolicy {
    /// How long to wait still before restarting after an event (an exit, a failed start) at `at`, if at all
    /// (`IsInBackOffSince`): the entry's delay counts from the latest event, unless the entry has expired.
    pub fn remaining(&self, entry: Option<&Backoff>, at: Timestamp, now: Timestamp) -> Option<Duration> {
        let e = entry?;
        if at > add(e.since, self.reset_after) {
            return None;
        }
        let until = add(at, e.delay);
        (now < until).then(|| Duration::try_from(until.duration_since(now)).unwrap_or_default())
    }

    /// The entry after a restart for an event at `at` (`Next`): doubled, capped; reset when the previous event
    /// is long past (the container ran long enough).
    pub fn next(&self, entry: Option<&Backoff>, at: Timestamp) -> Backoff {
        match entry {
            Some(e) if add(e.since, self.reset_after) > at => Backoff { delay: (e.delay * 2).min(self.max), since: at },
            _ => Backoff { delay: self.initial, since: at },
        }
    }
}

/// Why the last attempt to start a container failed, Kubernetes' waiting reasons.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartError {
    /// `ErrImagePull`, `ErrImageNeverPull`, `CreateContainerConfigError`, `CreateContainerError`,
    /// `RunContainerError`.
    pub reason: String,
    pub message: String,
    pub at: Timestamp,
}

/// The kubelet's memory for one pod, kept across syncs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PodMemory {
    pub backoff: BTreeMap<String, Backoff>,
    pub start_errors: BTreeMap<String, StartError>,
    /// Container ids whose liveness (or startup) probe has failed: they are killed.
    pub liveness_failed: BTreeMap<String, String>,
    /// Container ids whose readiness probe passes.
    pub ready: BTreeMap<String, bool>,
    /// Container ids whose startup probe has passed (or that have none).
    pub started: BTreeMap<String, bool>,
}

/// What a sync does for one pod, in this order: kill the pod, or kill containers; then create the sandbox; then
/// start the next init container or the app containers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodActions {
    /// Stop every container and the sandbox (the pod is done, or its sandbox is gone).
    pub kill_pod: Option<String>,
    pub create_sandbox: Option<u32>,
    /// (container id, name, reason)
    pub kill: Vec<(String, String, String)>,
    pub start_init: Option<usize>,
    /// Indexes into spec.containers.
    pub start: Vec<usize>,
    /// Sync again after this long (a back-off ends).
    pub requeue_after: Option<Duration>,
}

pub fn restart_policy(pod: &Pod) -> &str {
    pod.spec.as_ref().and_then(|s| s.restart_policy.as_deref()).unwrap_or("Always")
}

fn should_restart(policy: &str, exit_code: i32) -> bool {
    match policy {
        "Never" => false,
        "OnFailure" => exit_code != 0,
        _ => true,
    }
}

pub fn init_containers(pod: &Pod) -> &[Container] {
    pod.spec.as_ref().and_then(|s| s.init_containers.as_deref()).unwrap_or(&[])
}

pub fn app_containers(pod: &Pod) -> &[Container] {
    pod.spec.as_ref().map(|s| s.containers.as_slice()).unwrap_or(&[])
}

/// The key of a container's back-off and start errors.
pub fn key(name: &str) -> String {
    name.to_string()
}

/// The back-off key of the pod's sandbox (no container may have this name: it is not a DNS label).
pub const SANDBOX_KEY: &str = "<sandbox>";

/// Where initialization stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Init {
    Done,
    /// Init container i is next (not started, or to restart).
    Next(usize),
    /// Init container i runs.
    Running(usize),
    /// Init container i failed and the policy is Never.
    Failed(usize),
}

fn init_state(pod: &Pod, obs: &Observed) -> Init {
    // Any app container seen means the pod was initialized (a restarted sandbox re-runs init, below).
    if app_containers(pod).iter().any(|c| obs.latest(&c.name).0.is_some()) {
        return Init::Done;
    }
    for (i, c) in init_containers(pod).iter().enumerate() {
        match obs.latest(&c.name).0 {
            None => return Init::Next(i),
            Some(o) => match o.state {
                RunState::Exited if o.exit_code == 0 => continue,
                RunState::Exited if restart_policy(pod) == "Never" => return Init::Failed(i),
                RunState::Exited | RunState::Created | RunState::Unknown => return Init::Next(i),
                RunState::Running => return Init::Running(i),
            },
        }
    }
    Init::Done
}

/// The spec hash the kubelet labels a container with: what, if changed, needs a new container.
pub fn spec_hash(c: &Container) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let json = serde_json::json!({
        "image": c.image, "command": c.command, "args": c.args, "env": c.env, "workingDir": c.working_dir,
        "resources": c.resources, "ports": c.ports,
    });
    json.to_string().hash(&mut h);
    format!("{:016x}", h.finish())
}

/// Decides what to do with `obs` for `pod` now (`computePodActions`). `pod` must not be terminal nor deleted:
/// the caller stops those.
pub fn compute_pod_actions(
    pod: &Pod,
    obs: &Observed,
    mem: &PodMemory,
    policy: &BackoffPolicy,
    now: Timestamp,
) -> PodActions {
    let mut a = PodActions::default();
    let restart = restart_policy(pod);
    let sandbox_ok = obs.sandbox.as_ref().is_some_and(|s| s.ready);
    if !sandbox_ok {
        let attempt = obs.sandbox.as_ref().map(|s| s.attempt + 1).unwrap_or(0);
        // A pod that never restarts and whose containers already ran is over: no new sandbox for it.
        if restart == "Never" && obs.sandbox.is_some() && !obs.containers.is_empty() {
            a.kill_pod = Some("the pod's sandbox is gone and its restart policy is Never".into());
            return a;
        }
        // Every app container finished for good (e.g. all succeeded under OnFailure): the pod is done.
        let apps = app_containers(pod);
        let finished = !apps.is_empty()
            && apps.iter().all(|c| {
                obs.latest(&c.name)
                    .0
                    .is_some_and(|o| o.state == RunState::Exited && !should_restart(restart, o.exit_code))
            });
        if finished {
            a.kill_pod = Some("every container has terminated and none restarts".into());
            return a;
        }
        if obs.sandbox.is_some() || obs.containers.iter().any(|c| c.state == RunState::Running) {
            a.kill_pod = Some("the pod's sandbox changed; it is re-created".into());
        }
        // A sandbox that failed to start is retried after its back-off.
        let failed_at = mem.start_errors.get(SANDBOX_KEY).map(|e| e.at);
        if let Some(wait) = failed_at.and_then(|at| policy.remaining(mem.backoff.get(SANDBOX_KEY), at, now)) {
            min_requeue(&mut a, wait);
            return a;
        }
        a.create_sandbox = Some(attempt);
        // Containers of the old sandbox do not count: start from the first init container again.
        let fresh = Observed { sandbox: None, containers: Vec::new() };
        let next = compute_pod_actions_in_sandbox(pod, &fresh, mem, policy, now);
        a.start_init = next.start_init;
        a.start = next.start;
        a.requeue_after = next.requeue_after;
        return a;
    }
    let inner = compute_pod_actions_in_sandbox(pod, obs, mem, policy, now);
    a.kill = inner.kill;
    a.start_init = inner.start_init;
    a.start = inner.start;
    a.requeue_after = inner.requeue_after;
    a.kill_pod = inner.kill_pod;
    a
}

/// Whether a start may happen now given the back-off after the last exit or start error; else the wait left.
fn gate(
    name: &str,
    last_event: Option<Timestamp>,
    mem: &PodMemory,
    policy: &BackoffPolicy,
    now: Timestamp,
) -> Option<Duration> {
    let at = last_event?;
    policy.remaining(mem.backoff.get(&key(name)), at, now)
}

fn min_requeue(a: &mut PodActions, d: Duration) {
    a.requeue_after = Some(a.requeue_after.map_or(d, |r| r.min(d)));
}

/// The latest event that a restart of `name` backs off from: its last exit or its last start error.
fn last_event(name: &str, latest: Option<&ContainerObs>, mem: &PodMemory) -> Option<Timestamp> {
    let exit = latest.filter(|c| c.state == RunState::Exited).and_then(|c| c.finished_at.or(c.created_at));
    let err = mem.start_errors.get(&key(name)).map(|e| e.at);
    exit.max(err)
}

fn compute_pod_actions_in_sandbox(
    pod: &Pod,
    obs: &Observed,
    mem: &PodMemory,
    policy: &BackoffPolicy,
    now: Timestamp,
) -> PodActions {
    let mut a = PodActions::default();
    let restart = restart_policy(pod);
    match init_state(pod, obs) {
        Init::Running(_) => return a,
        Init::Failed(i) => {
            a.kill_pod = Some(format!("init container {:?} failed", init_containers(pod)[i].name));
            return a;
        }
        Init::Next(i) => {
            let name = &init_containers(pod)[i].name;
            let latest = obs.latest(name).0;
            if let Some(c) = latest.filter(|c| c.state != RunState::Exited) {
                a.kill.push((c.id.clone(), c.name.clone(), "init container did not start; it is re-created".into()));
            }
            match gate(name, last_event(name, latest, mem), mem, policy, now) {
                Some(wait) => min_requeue(&mut a, wait),
                None => a.start_init = Some(i),
            }
            return a;
        }
        Init::Done => {}
    }
    let mut keep = 0;
    for (i, c) in app_containers(pod).iter().enumerate() {
        let latest = obs.latest(&c.name).0;
        let restart_now = match latest {
            None => true,
            Some(o) => match o.state {
                RunState::Running => {
                    if let Some(why) = mem.liveness_failed.get(&o.id) {
                        a.kill.push((o.id.clone(), c.name.clone(), why.clone()));
                        should_restart(restart, 1)
                    } else if !o.hash.is_empty() && o.hash != spec_hash(c) {
                        a.kill.push((o.id.clone(), c.name.clone(), "its spec changed; it is re-created".into()));
                        true
                    } else {
                        keep += 1;
                        false
                    }
                }
                RunState::Exited => should_restart(restart, o.exit_code),
                RunState::Created | RunState::Unknown => {
                    a.kill.push((o.id.clone(), c.name.clone(), "it did not start; it is re-created".into()));
                    true
                }
            },
        };
        if !restart_now {
            continue;
        }
        match gate(&c.name, last_event(&c.name, latest, mem), mem, policy, now) {
            Some(wait) => {
                keep += 1;
                min_requeue(&mut a, wait);
            }
            None => a.start.push(i),
        }
    }
    if keep == 0 && a.start.is_empty() && a.kill.is_empty() {
        a.kill_pod = Some("every container has terminated and none restarts".into());
    }
    a
}

/// The node-side facts a status needs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StatusInputs {
    pub host_ip: String,
    /// The phase the pod had before (terminal phases never change).
    pub previous: Option<PodStatus>,
}

fn ts(t: Option<Timestamp>) -> Option<Time> {
    t.map(Time)
}

fn terminated(o: &ContainerObs) -> ContainerStateTerminated {
    let reason = if !o.reason.is_empty() {
        o.reason.clone()
    } else if o.exit_code == 0 {
        "Completed".into()
    } else {
        "Error".into()
    };
    ContainerStateTerminated {
        container_id: Some(format!("containerd://{}", o.id)),
        exit_code: o.exit_code,
        reason: Some(reason),
        message: Some(o.message.clone()).filter(|m| !m.is_empty()),
        started_at: ts(o.started_at),
        finished_at: ts(o.finished_at),
        signal: None,
    }
}

fn waiting(reason: &str, message: Option<String>) -> ContainerState {
    ContainerState {
        waiting: Some(ContainerStateWaiting { reason: Some(reason.into()), message }),
        ..Default::default()
    }
}

/// One container's status.
fn container_status(
    pod: &Pod,
    c: &Container,
    obs: &Observed,
    mem: &PodMemory,
    policy: &BackoffPolicy,
    now: Timestamp,
    initializing: bool,
) -> ContainerStatus {
    let (latest, previous) = obs.latest(&c.name);
    let mut s = ContainerStatus {
        name: c.name.clone(),
        image: c.image.clone().unwrap_or_default(),
        image_id: String::new(),
        restart_count: latest.map(|o| o.attempt as i32).unwrap_or(0),
        ready: false,
        started: Some(false),
        ..Default::default()
    };
    let err = mem.start_errors.get(&key(&c.name));
    if let Some(o) = latest {
        s.container_id = Some(format!("containerd://{}", o.id));
        s.image_id = o.image_ref.clone();
    }
    let last_terminated = |o: Option<&ContainerObs>| {
        o.filter(|o| o.state == RunState::Exited)
            .map(|o| ContainerState { terminated: Some(terminated(o)), ..Default::default() })
    };
    match latest {
        Some(o) if o.state == RunState::Running => {
            s.state = Some(ContainerState {
                running: Some(ContainerStateRunning { started_at: ts(o.started_at) }),
                ..Default::default()
            });
            s.last_state = last_terminated(previous);
            let started = mem.started.get(&o.id).copied().unwrap_or(true);
            s.started = Some(started);
            s.ready = started && mem.ready.get(&o.id).copied().unwrap_or(c.readiness_probe.is_none());
        }
        Some(o) if o.state == RunState::Exited => {
            let restarts = should_restart(restart_policy(pod), o.exit_code);
            let at = o.finished_at.or(o.created_at);
            let backing_off = at.and_then(|at| policy.remaining(mem.backoff.get(&key(&c.name)), at, now));
            if let (true, Some(e)) = (restarts, err.filter(|e| at.is_none_or(|at| e.at >= at))) {
                s.state = Some(waiting(&pull_reason(e, policy, mem, &c.name, now), Some(e.message.clone())));
                s.last_state = last_terminated(Some(o));
            } else if let (true, Some(_)) = (restarts, backing_off) {
                let delay = mem.backoff.get(&key(&c.name)).map(|b| b.delay).unwrap_or(policy.initial);
                let pod_name = pod.metadata.name.as_deref().unwrap_or_default();
                let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
                let uid = pod.metadata.uid.as_deref().unwrap_or_default();
                let msg = format!(
                    "back-off {} restarting failed container={} pod={pod_name}_{ns}({uid})",
                    human(delay),
                    c.name
                );
                s.state = Some(waiting("CrashLoopBackOff", Some(msg)));
                s.last_state = last_terminated(Some(o));
            } else {
                s.state = Some(ContainerState { terminated: Some(terminated(o)), ..Default::default() });
                s.last_state = last_terminated(previous);
            }
        }
        _ => {
            s.last_state = last_terminated(previous);
            s.state = Some(match err {
                Some(e) => waiting(&pull_reason(e, policy, mem, &c.name, now), Some(e.message.clone())),
                None if initializing => waiting("PodInitializing", None),
                None => waiting("ContainerCreating", None),
            });
        }
    }
    s
}

fn pull_reason(e: &StartError, _policy: &BackoffPolicy, _mem: &PodMemory, _name: &str, _now: Timestamp) -> String {
    e.reason.clone()
}

/// After a sync that left a container whose image pull failed waiting out its back-off, its reason turns from
/// `ErrImagePull` into `ImagePullBackOff` (and back to `ErrImagePull` when the next pull fails), as Kubernetes
/// shows it.
pub fn mark_pull_backoff(pod: &Pod, actions: &PodActions, mem: &mut PodMemory) {
    let starting: Vec<&str> = actions
        .start
        .iter()
        .filter_map(|i| app_containers(pod).get(*i))
        .chain(actions.start_init.and_then(|i| init_containers(pod).get(i)))
        .map(|c| c.name.as_str())
        .collect();
    for (name, e) in mem.start_errors.iter_mut() {
        if e.reason == "ErrImagePull" && !starting.contains(&name.as_str()) {
            e.reason = "ImagePullBackOff".into();
        }
    }
}

/// `10s`, `1m20s`, `5m0s` as Go prints durations.
pub fn human(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 60 {
        format!("{}m{}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

fn condition(type_: &str, ok: bool, reason: Option<&str>, prev: Option<&PodStatus>, now: Timestamp) -> PodCondition {
    let status = if ok { "True" } else { "False" };
    let old = prev.and_then(|p| p.conditions.as_ref()).and_then(|cs| cs.iter().find(|c| c.type_ == type_));
    let since = match old {
        Some(o) if o.status == status => o.last_transition_time.clone(),
        _ => Some(Time(now)),
    };
    PodCondition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.filter(|_| !ok).map(str::to_string),
        last_transition_time: since,
        ..Default::default()
    }
}

/// The pod's phase from its containers' statuses (`getPhase`).
pub fn phase(pod: &Pod, init: &[ContainerStatus], app: &[ContainerStatus]) -> &'static str {
    let restart = restart_policy(pod);
    let is_term = |s: &ContainerStatus| s.state.as_ref().and_then(|st| st.terminated.as_ref()).map(|t| t.exit_code);
    for s in init {
        if let Some(code) = is_term(s) {
            if code != 0 && restart == "Never" {
                return "Failed";
            }
        }
    }
    let init_done = init.iter().all(|s| is_term(s) == Some(0));
    let any_app_seen = app.iter().any(|s| s.container_id.is_some());
    if !init_done && !any_app_seen {
        return "Pending";
    }
    let (mut running, mut waiting, mut stopped, mut succeeded) = (0, 0, 0, 0);
    for s in app {
        let st = s.state.as_ref();
        if st.and_then(|x| x.running.as_ref()).is_some() {
            running += 1;
        } else if let Some(code) = is_term(s) {
            stopped += 1;
            if code == 0 {
                succeeded += 1;
            }
        } else if s.last_state.as_ref().and_then(|l| l.terminated.as_ref()).is_some() {
            // Waiting to restart after an exit: it has run.
            stopped += 1;
        } else {
            waiting += 1;
        }
    }
    if waiting > 0 {
        return "Pending";
    }
    if running > 0 {
        return "Running";
    }
    if stopped > 0 {
        if restart == "Always" {
            return "Running";
        }
        if stopped == succeeded {
            return "Succeeded";
        }
        if restart == "Never" {
            return "Failed";
        }
        return "Running";
    }
    "Pending"
}

/// The pod's status as the kubelet writes it.
pub fn pod_status(
    pod: &Pod,
    obs: &Observed,
    mem: &PodMemory,
    policy: &BackoffPolicy,
    inputs: &StatusInputs,
    now: Timestamp,
) -> PodStatus {
    let prev = inputs.previous.as_ref();
    let init_done = init_state(pod, obs) == Init::Done;
    let init: Vec<ContainerStatus> =
        init_containers(pod).iter().map(|c| container_status(pod, c, obs, mem, policy, now, false)).collect();
    let app: Vec<ContainerStatus> =
        app_containers(pod).iter().map(|c| container_status(pod, c, obs, mem, policy, now, !init_done)).collect();
    let prev_phase = prev.and_then(|p| p.phase.as_deref());
    let ph = match prev_phase {
        Some(p @ ("Succeeded" | "Failed")) => {
            if p == "Succeeded" {
                "Succeeded"
            } else {
                "Failed"
            }
        }
        _ => phase(pod, &init, &app),
    };
    let initialized = init_done
        || init.iter().all(|s| s.state.as_ref().and_then(|x| x.terminated.as_ref()).is_some_and(|t| t.exit_code == 0));
    let all_ready = !app.is_empty() && app.iter().all(|s| s.ready);
    let pending_init =
        init.iter().filter(|s| s.state.as_ref().and_then(|x| x.terminated.as_ref()).is_none_or(|t| t.exit_code != 0));
    let init_reason = (!initialized).then(|| {
        let names: Vec<&str> = pending_init.map(|s| s.name.as_str()).collect();
        format!("containers with incomplete status: [{}]", names.join(" "))
    });
    let not_ready: Vec<&str> = app.iter().filter(|s| !s.ready).map(|s| s.name.as_str()).collect();
    let ready_msg =
        (!not_ready.is_empty()).then(|| format!("containers with unready status: [{}]", not_ready.join(" ")));
    let terminal = matches!(ph, "Succeeded" | "Failed");
    let ready_reason = if terminal { "PodCompleted" } else { "ContainersNotReady" };
    let init_cond_reason = if terminal { "PodCompleted" } else { "ContainersNotInitialized" };
    let mut conditions = vec![
        condition("PodScheduled", true, None, prev, now),
        condition("Initialized", initialized, Some(init_cond_reason), prev, now),
        condition("ContainersReady", all_ready && !terminal, Some(ready_reason), prev, now),
        condition("Ready", all_ready && !terminal, Some(ready_reason), prev, now),
    ];
    if let Some(c) = conditions.get_mut(1) {
        if !initialized && !terminal {
            c.message = init_reason;
        }
    }
    for c in conditions.iter_mut().skip(2) {
        if c.status == "False" && !terminal {
            c.message = ready_msg.clone();
        }
    }
    let host_net = pod.spec.as_ref().and_then(|s| s.host_network).unwrap_or(false);
    let sandbox_ip = obs.sandbox.as_ref().filter(|s| s.ready).and_then(|s| {
        // On the node's network the pod's address is the node's.
        if host_net {
            Some(inputs.host_ip.clone()).filter(|h| !h.is_empty())
        } else {
            s.ip.clone()
        }
    });
    let ip = sandbox_ip.or_else(|| {
        // A finished pod keeps the address it had.
        prev.and_then(|p| p.pod_ip.clone()).filter(|_| terminal)
    });
    PodStatus {
        phase: Some(ph.into()),
        conditions: Some(conditions),
        host_ip: Some(inputs.host_ip.clone()).filter(|h| !h.is_empty()),
        host_ips: Some(vec![HostIP { ip: inputs.host_ip.clone() }]).filter(|_| !inputs.host_ip.is_empty()),
        pod_ip: ip.clone(),
        pod_ips: ip.map(|ip| vec![PodIP { ip }]),
        start_time: prev.and_then(|p| p.start_time.clone()).or(Some(Time(now))),
        init_container_statuses: Some(init).filter(|v| !v.is_empty()),
        container_statuses: Some(app),
        qos_class: Some(qos_class(pod).into()),
        ..Default::default()
    }
}

/// Guaranteed (every container's requests = limits for cpu and memory), BestEffort (none set), else Burstable.
pub fn qos_class(pod: &Pod) -> &'static str {
    let all: Vec<&Container> = init_containers(pod).iter().chain(app_containers(pod)).collect();
    let get = |c: &Container, limits: bool, r: &str| {
        let res = c.resources.as_ref();
        let m = if limits { res.and_then(|x| x.limits.as_ref()) } else { res.and_then(|x| x.requests.as_ref()) };
        m.and_then(|m| m.get(r)).and_then(|q| crate::quantity::milli(&q.0))
    };
    let any = all.iter().any(|c| {
        ["cpu", "memory"]
            .iter()
            .any(|r| get(c, true, r).is_some_and(|v| v > 0) || get(c, false, r).is_some_and(|v| v > 0))
    });
    if !any {
        return "BestEffort";
    }
    let guaranteed = all.iter().all(|c| {
        ["cpu", "memory"].iter().all(|r| {
            let lim = get(c, true, r);
            lim.is_some_and(|l| l > 0) && get(c, false, r).is_none_or(|q| Some(q) == lim)
        })
    });
    if guaranteed {
        "Guaranteed"
    } else {
        "Burstable"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn now() -> Timestamp {
        "2024-05-01T12:00:00Z".parse().unwrap()
    }
    fn at(secs_ago: i64) -> Timestamp {
        now() - SignedDuration::from_secs(secs_ago)
    }

    fn pod(policy: &str, containers: &[&str], inits: &[&str]) -> Pod {
        let c = |n: &&str| json!({"name": n, "image": "weft.local/busybox:1"});
        let mut spec = json!({"restartPolicy": policy, "containers": containers.iter().map(c).collect::<Vec<_>>()});
        if !inits.is_empty() {
            spec["initContainers"] = json!(inits.iter().map(c).collect::<Vec<_>>());
        }
        serde_json::from_value(json!({"metadata": {"name": "p", "namespace": "default", "uid": "u1"}, "spec": spec}))
            .unwrap()
    }

    fn sandbox() -> Option<SandboxObs> {
        Some(SandboxObs { id: "sb".into(), ready: true, ip: Some("10.88.0.5".into()), attempt: 0 })
    }

    fn running(name: &str, attempt: u32) -> ContainerObs {
        ContainerObs {
            id: format!("{name}-{attempt}"),
            name: name.into(),
            attempt,
            state: RunState::Running,
            exit_code: 0,
            reason: String::new(),
            message: String::new(),
            created_at: Some(at(100)),
            started_at: Some(at(100)),
            finished_at: None,
            image: "weft.local/busybox:1".into(),
            image_ref: "sha256:abc".into(),
            hash: String::new(),
        }
    }

    fn exited(name: &str, attempt: u32, code: i32, reason: &str, secs_ago: i64) -> ContainerObs {
        ContainerObs {
            state: RunState::Exited,
            exit_code: code,
            reason: reason.into(),
            finished_at: Some(at(secs_ago)),
            ..running(name, attempt)
        }
    }

    fn obs(cs: Vec<ContainerObs>) -> Observed {
        Observed { sandbox: sandbox(), containers: cs }
    }

    fn decide(p: &Pod, o: &Observed) -> (PodActions, PodStatus) {
        let mem = PodMemory::default();
        let pol = BackoffPolicy::default();
        let a = compute_pod_actions(p, o, &mem, &pol, now());
        let s = pod_status(p, o, &mem, &pol, &StatusInputs { host_ip: "192.168.56.11".into(), previous: None }, now());
        (a, s)
    }

    /// The seeds' table: every row, with the action and the phase.
    #[test]
    fn restart_policy_table() {
        /// Per policy (Always, OnFailure, Never): the containers restarted and the phase.
        type Outcomes = [(&'static [usize], &'static str); 3];
        let rows: Vec<(&str, Vec<&str>, Vec<ContainerObs>, Outcomes)> = vec![
            (
                "1 exits 0",
                vec!["a"],
                vec![exited("a", 0, 0, "Completed", 1)],
                [(&[0], "Running"), (&[], "Succeeded"), (&[], "Succeeded")],
            ),
            (
                "1 fails",
                vec!["a"],
                vec![exited("a", 0, 1, "Error", 1)],
                [(&[0], "Running"), (&[0], "Running"), (&[], "Failed")],
            ),
            (
                "2: one fails, other runs",
                vec!["a", "b"],
                vec![exited("a", 0, 1, "Error", 1), running("b", 0)],
                [(&[0], "Running"), (&[0], "Running"), (&[], "Running")],
            ),
            (
                "2: one down, other fails",
                vec!["a", "b"],
                vec![exited("a", 0, 1, "Error", 30), exited("b", 0, 1, "Error", 1)],
                [(&[0, 1], "Running"), (&[0, 1], "Running"), (&[], "Failed")],
            ),
            (
                "1 OOM",
                vec!["a"],
                vec![exited("a", 0, 137, "OOMKilled", 1)],
                [(&[0], "Running"), (&[0], "Running"), (&[], "Failed")],
            ),
        ];
        for (what, containers, observed, outcomes) in rows {
            for (policy, (restart, phase)) in ["Always", "OnFailure", "Never"].into_iter().zip(outcomes) {
                let p = pod(policy, &containers, &[]);
                let (a, s) = decide(&p, &obs(observed.clone()));
                assert_eq!(a.start, restart, "{what} / {policy}: restarts");
                assert_eq!(s.phase.as_deref(), Some(phase), "{what} / {policy}: phase");
                // Nothing left to run: the sandbox goes too.
                let done = restart.is_empty() && !observed.iter().any(|o| o.state == RunState::Running);
                assert_eq!(a.kill_pod.is_some(), done, "{what} / {policy}: kill pod");
            }
        }
    }

    #[test]
    fn oom_shows_as_the_termination_reason() {
        let p = pod("Never", &["a"], &[]);
        let (_, s) = decide(&p, &obs(vec![exited("a", 0, 137, "OOMKilled", 1)]));
        let t = s.container_statuses.unwrap()[0].state.clone().unwrap().terminated.unwrap();
        assert_eq!((t.exit_code, t.reason.as_deref()), (137, Some("OOMKilled")));
    }

    #[test]
    fn backoff_doubles_to_the_cap_and_resets() {
        let pol = BackoffPolicy::default();
        let mut e: Option<Backoff> = None;
        let mut delays = Vec::new();
        for i in 0..7 {
            // Exits 1 s apart: a crash loop.
            let b = pol.next(e.as_ref(), at(100 - i));
            delays.push(b.delay.as_secs());
            e = Some(b);
        }
        assert_eq!(delays, vec![10, 20, 40, 80, 160, 300, 300]);
        // After running longer than reset_after, the next exit starts from the initial delay again.
        let later = at(94) + SignedDuration::from_secs(601);
        assert_eq!(pol.next(e.as_ref(), later).delay.as_secs(), 10);
        // Durations are parameters.
        let short = BackoffPolicy {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(2),
            reset_after: Duration::from_secs(4),
        };
        let b1 = short.next(None, at(10));
        let b2 = short.next(Some(&b1), at(9));
        let b3 = short.next(Some(&b2), at(8));
        let b4 = short.next(Some(&b3), at(7));
        assert_eq!([b1.delay, b2.delay, b3.delay, b4.delay].map(|d| d.as_millis()), [500, 1000, 2000, 2000]);
    }

    #[test]
    fn a_crash_loop_waits_out_its_backoff_with_crashloopbackoff() {
        let p = pod("Always", &["a"], &[]);
        let pol = BackoffPolicy::default();
        let o = obs(vec![exited("a", 3, 1, "Error", 5)]);
        let mut mem = PodMemory::default();
        mem.backoff.insert(key("a"), Backoff { delay: Duration::from_secs(40), since: at(5) });
        let a = compute_pod_actions(&p, &o, &mem, &pol, now());
        assert!(a.start.is_empty());
        assert!(a.kill_pod.is_none(), "a backing-off container keeps its pod");
        assert_eq!(a.requeue_after, Some(Duration::from_secs(35)));
        let s = pod_status(&p, &o, &mem, &pol, &StatusInputs::default(), now());
        let cs = &s.container_statuses.unwrap()[0];
        let w = cs.state.clone().unwrap().waiting.unwrap();
        assert_eq!(w.reason.as_deref(), Some("CrashLoopBackOff"));
        assert!(w.message.unwrap().starts_with("back-off 40s restarting failed container=a pod=p_default(u1)"));
        assert_eq!(cs.restart_count, 3);
        assert_eq!(cs.last_state.clone().unwrap().terminated.unwrap().exit_code, 1);
        assert_eq!(s.phase.as_deref(), Some("Running"));
        // Once the back-off has passed it restarts.
        let later = now() + SignedDuration::from_secs(36);
        assert_eq!(compute_pod_actions(&p, &o, &mem, &pol, later).start, vec![0]);
    }

    #[test]
    fn init_containers_run_in_order_each_to_success() {
        let p = pod("Always", &["app"], &["i1", "i2"]);
        type Step = (Vec<ContainerObs>, Option<usize>, Vec<usize>, &'static str, bool);
        let steps: Vec<Step> = vec![
            (vec![], Some(0), vec![], "Pending", false),
            (vec![running("i1", 0)], None, vec![], "Pending", false),
            (vec![exited("i1", 0, 0, "Completed", 1)], Some(1), vec![], "Pending", false),
            // A failing init container is retried (Always) and blocks the app.
            (
                vec![exited("i1", 0, 0, "Completed", 9), exited("i2", 0, 1, "Error", 1)],
                Some(1),
                vec![],
                "Pending",
                false,
            ),
            (
                vec![exited("i1", 0, 0, "Completed", 9), exited("i2", 1, 0, "Completed", 1)],
                None,
                vec![0],
                "Pending",
                true,
            ),
            (
                vec![exited("i1", 0, 0, "Completed", 9), exited("i2", 1, 0, "Completed", 5), running("app", 0)],
                None,
                vec![],
                "Running",
                true,
            ),
        ];
        for (i, (cs, init, start, phase, initialized)) in steps.into_iter().enumerate() {
            let (a, s) = decide(&p, &obs(cs));
            assert_eq!((a.start_init, a.start.clone()), (init, start), "step {i}");
            assert_eq!(s.phase.as_deref(), Some(phase), "step {i}");
            let cond = s.conditions.unwrap().into_iter().find(|c| c.type_ == "Initialized").unwrap();
            assert_eq!(cond.status == "True", initialized, "step {i}");
        }
        // With restartPolicy Never a failed init container fails the pod.
        let p = pod("Never", &["app"], &["i1"]);
        let (a, s) = decide(&p, &obs(vec![exited("i1", 0, 2, "Error", 1)]));
        assert!(a.kill_pod.is_some() && a.start.is_empty() && a.start_init.is_none());
        assert_eq!(s.phase.as_deref(), Some("Failed"));
    }

    #[test]
    fn a_new_sandbox_starts_over_and_a_dead_one_is_killed() {
        let p = pod("Always", &["a"], &["i"]);
        let none = Observed::default();
        let (a, s) = decide(&p, &none);
        assert_eq!((a.create_sandbox, a.start_init, a.kill_pod.is_some()), (Some(0), Some(0), false));
        assert_eq!(s.phase.as_deref(), Some("Pending"));
        let dead = Observed {
            sandbox: Some(SandboxObs { id: "sb".into(), ready: false, ip: None, attempt: 2 }),
            containers: vec![exited("i", 0, 0, "Completed", 50), running("a", 0)],
        };
        let (a, _) = decide(&p, &dead);
        assert_eq!((a.create_sandbox, a.start_init, a.kill_pod.is_some()), (Some(3), Some(0), true));
        // Never: a pod whose sandbox died after its containers ran is not re-created.
        let p = pod("Never", &["a"], &[]);
        let dead = Observed {
            sandbox: Some(SandboxObs { ready: false, ..sandbox().unwrap() }),
            containers: vec![running("a", 0)],
        };
        let (a, _) = decide(&p, &dead);
        assert_eq!((a.create_sandbox, a.kill_pod.is_some()), (None, true));
        // OnFailure: a pod whose containers all succeeded gets no new sandbox either.
        let p = pod("OnFailure", &["a"], &[]);
        let done = Observed {
            sandbox: Some(SandboxObs { ready: false, ..sandbox().unwrap() }),
            containers: vec![exited("a", 0, 0, "Completed", 3)],
        };
        let (a, s) = decide(&p, &done);
        assert_eq!((a.create_sandbox, a.kill_pod.is_some()), (None, true));
        assert_eq!(s.phase.as_deref(), Some("Succeeded"));
    }

    #[test]
    fn a_failed_sandbox_is_retried_after_its_backoff() {
        let p = pod("Always", &["a"], &[]);
        let pol = BackoffPolicy::default();
        let mut mem = PodMemory::default();
        mem.start_errors.insert(
            SANDBOX_KEY.into(),
            StartError { reason: "FailedCreatePodSandBox".into(), message: "x".into(), at: at(3) },
        );
        mem.backoff.insert(SANDBOX_KEY.into(), Backoff { delay: Duration::from_secs(10), since: at(3) });
        let a = compute_pod_actions(&p, &Observed::default(), &mem, &pol, now());
        assert_eq!((a.create_sandbox, a.requeue_after), (None, Some(Duration::from_secs(7))));
        let a = compute_pod_actions(&p, &Observed::default(), &mem, &pol, now() + SignedDuration::from_secs(8));
        assert_eq!(a.create_sandbox, Some(0));
    }

    #[test]
    fn liveness_failure_kills_and_the_policy_decides_the_restart() {
        for (policy, restarts) in [("Always", true), ("OnFailure", true), ("Never", false)] {
            let p = pod(policy, &["a"], &[]);
            let o = obs(vec![running("a", 0)]);
            let mut mem = PodMemory::default();
            mem.liveness_failed.insert("a-0".into(), "Container a failed liveness probe, will be restarted".into());
            let a = compute_pod_actions(&p, &o, &mem, &BackoffPolicy::default(), now());
            assert_eq!(a.kill.len(), 1, "{policy}");
            assert_eq!(!a.start.is_empty(), restarts, "{policy}");
        }
    }

    #[test]
    fn readiness_drives_ready_and_containers_ready() {
        let mut p = pod("Always", &["a"], &[]);
        p.spec.as_mut().unwrap().containers[0].readiness_probe = Some(Default::default());
        let o = obs(vec![running("a", 0)]);
        let pol = BackoffPolicy::default();
        let cond = |mem: &PodMemory| {
            let s = pod_status(&p, &o, mem, &pol, &StatusInputs::default(), now());
            let c = s.conditions.unwrap();
            let get = |t: &str| c.iter().find(|x| x.type_ == t).unwrap().status.clone();
            (get("Ready"), get("ContainersReady"), s.container_statuses.unwrap()[0].ready)
        };
        let mut mem = PodMemory::default();
        assert_eq!(cond(&mem), ("False".into(), "False".into(), false), "no result yet: not ready");
        mem.ready.insert("a-0".into(), true);
        assert_eq!(cond(&mem), ("True".into(), "True".into(), true));
        mem.ready.insert("a-0".into(), false);
        assert_eq!(cond(&mem), ("False".into(), "False".into(), false));
    }

    #[test]
    fn start_errors_show_kubernetes_reasons() {
        let p = pod("Always", &["a"], &[]);
        let pol = BackoffPolicy::default();
        let o = obs(vec![]);
        let mut mem = PodMemory::default();
        let reason = |mem: &PodMemory, t: Timestamp| {
            let s = pod_status(&p, &o, mem, &pol, &StatusInputs::default(), t);
            s.container_statuses.unwrap()[0].state.clone().unwrap().waiting.unwrap().reason.unwrap()
        };
        assert_eq!(reason(&mem, now()), "ContainerCreating");
        mem.start_errors
            .insert(key("a"), StartError { reason: "ErrImagePull".into(), message: "not found".into(), at: at(1) });
        assert_eq!(reason(&mem, now()), "ErrImagePull");
        mem.backoff.insert(key("a"), Backoff { delay: Duration::from_secs(10), since: at(1) });
        let a = compute_pod_actions(&p, &o, &mem, &pol, now());
        assert!(a.start.is_empty() && a.requeue_after.is_some(), "no pull during the back-off");
        mark_pull_backoff(&p, &a, &mut mem);
        assert_eq!(reason(&mem, now()), "ImagePullBackOff");
        // When the back-off has passed the pull is retried.
        let later = now() + SignedDuration::from_secs(10);
        let a = compute_pod_actions(&p, &o, &mem, &pol, later);
        assert_eq!(a.start, vec![0]);
        mem.start_errors.insert(
            key("a"),
            StartError { reason: "CreateContainerError".into(), message: "exec: nope".into(), at: at(1) },
        );
        assert_eq!(reason(&mem, now()), "CreateContainerError");
        let s = pod_status(&p, &o, &mem, &pol, &StatusInputs::default(), now());
        assert_eq!(s.phase.as_deref(), Some("Pending"));
    }

    #[test]
    fn terminal_phase_sticks() {
        let p = pod("Always", &["a"], &[]);
        let prev = PodStatus { phase: Some("Failed".into()), ..Default::default() };
        let s = pod_status(
            &p,
            &obs(vec![running("a", 0)]),
            &PodMemory::default(),
            &BackoffPolicy::default(),
            &StatusInputs { host_ip: String::new(), previous: Some(prev) },
            now(),
        );
        assert_eq!(s.phase.as_deref(), Some("Failed"));
    }

    #[test]
    fn a_host_network_pod_has_the_node_address() {
        let mut p = pod("Always", &["a"], &[]);
        p.spec.as_mut().unwrap().host_network = Some(true);
        let o = Observed {
            sandbox: Some(SandboxObs { ip: None, ..sandbox().unwrap() }),
            containers: vec![running("a", 0)],
        };
        let (_, s) = decide(&p, &o);
        assert_eq!(s.pod_ip.as_deref(), Some("192.168.56.11"));
    }

    #[test]
    fn qos_classes() {
        let mk = |res: serde_json::Value| -> Pod {
            serde_json::from_value(json!({"spec": {"containers": [{"name": "a", "resources": res}]}})).unwrap()
        };
        assert_eq!(qos_class(&mk(json!({}))), "BestEffort");
        assert_eq!(qos_class(&mk(json!({"requests": {"cpu": "100m"}}))), "Burstable");
        assert_eq!(qos_class(&mk(json!({"limits": {"cpu": "1", "memory": "1Gi"}}))), "Guaranteed");
        assert_eq!(
            qos_class(&mk(json!({"limits": {"cpu": "1", "memory": "1Gi"}, "requests": {"cpu": "500m"}}))),
            "Burstable"
        );
    }
}
