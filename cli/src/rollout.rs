//! `weft rollout status|history|undo|pause|resume`: kubectl's rollout commands over Deployments (and `status` over
//! DaemonSets). The decisions are pure functions with kubectl's rules and messages: which ReplicaSets a Deployment
//! owns and which of them is new, the status line of a Deployment, its history, and what `undo` writes back.
//! The commands around them read the store, write with compare-and-swap, and watch for `status`.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use anyhow::{anyhow, bail};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::PodTemplateSpec;
use serde_json::Value;

use crate::owned::{equal_ignore_hash, replicasets_of, revision, POD_TEMPLATE_HASH, REVISION_ANNOTATION};
use crate::verbs::{self, namespace_of, object_name, parse_targets, Kind, KindNames};
use weft_api::store::{Object, Store, WatchEvent};
use weft_api::EtcdArgs;

/// The Progressing condition's reason when the deployment ran past progressDeadlineSeconds.
pub const TIMED_OUT_REASON: &str = "ProgressDeadlineExceeded";

/// Annotations `undo` keeps from the Deployment rather than copying from the ReplicaSet.
const ANNOTATIONS_TO_SKIP: [&str; 6] = [
    "kubectl.kubernetes.io/last-applied-configuration",
    REVISION_ANNOTATION,
    "deployment.kubernetes.io/revision-history",
    "deployment.kubernetes.io/desired-replicas",
    "deployment.kubernetes.io/max-replicas",
    "deprecated.deployment.rollback.to",
];

/// `rollout status`'s line for a Deployment and whether the rollout is done; an error when it can never be
/// (past its progress deadline) or `revision` (if not 0) is not the running one.
pub fn deployment_status(d: &Deployment, revision_wanted: i64) -> Result<(String, bool), String> {
    let name = d.metadata.name.clone().unwrap_or_default();
    if revision_wanted > 0 {
        let running = revision(&d.metadata).ok_or_else(|| format!("cannot get the revision of deployment {name:?}"))?;
        if running != revision_wanted {
            return Err(format!(
                "desired revision ({revision_wanted}) is different from the running revision ({running})"
            ));
        }
    }
    let st = d.status.clone().unwrap_or_default();
    if d.metadata.generation.unwrap_or(0) > st.observed_generation.unwrap_or(0) {
        return Ok(("Waiting for deployment spec update to be observed...".into(), false));
    }
    let progressing = st.conditions.iter().flatten().find(|c| c.type_.as_deref() == Some("Progressing"));
    if progressing.is_some_and(|c| c.reason.as_deref() == Some(TIMED_OUT_REASON)) {
        return Err(format!("deployment {name:?} exceeded its progress deadline"));
    }
    let (updated, replicas, available) =
        (st.updated_replicas.unwrap_or(0), st.replicas.unwrap_or(0), st.available_replicas.unwrap_or(0));
    let want = d.spec.replicas.unwrap_or(1);
    if updated < want {
        return Ok((
            format!("Waiting for deployment {name:?} rollout to finish: {updated} out of {want} new replicas have been updated..."),
            false,
        ));
    }
    if replicas > updated {
        return Ok((
            format!(
                "Waiting for deployment {name:?} rollout to finish: {} old replicas are pending termination...",
                replicas - updated
            ),
            false,
        ));
    }
    if available < updated {
        return Ok((
            format!("Waiting for deployment {name:?} rollout to finish: {available} of {updated} updated replicas are available..."),
            false,
        ));
    }
    Ok((format!("deployment {name:?} successfully rolled out"), true))
}

/// `rollout status`'s line for a DaemonSet (RollingUpdate only) and whether it is done.
pub fn daemonset_status(d: &DaemonSet) -> Result<(String, bool), String> {
    let name = d.metadata.name.clone().unwrap_or_default();
    let strategy = d.spec.update_strategy.as_ref().and_then(|s| s.type_.as_deref()).unwrap_or("RollingUpdate");
    if strategy != "RollingUpdate" {
        return Err("rollout status is only available for RollingUpdate strategy type".into());
    }
    let st = d.status.clone().unwrap_or_default();
    if d.metadata.generation.unwrap_or(0) > st.observed_generation.unwrap_or(0) {
        return Ok(("Waiting for daemon set spec update to be observed...".into(), false));
    }
    let (updated, desired, available) =
        (st.updated_number_scheduled.unwrap_or(0), st.desired_number_scheduled, st.number_available.unwrap_or(0));
    if updated < desired {
        return Ok((
            format!("Waiting for daemon set {name:?} rollout to finish: {updated} out of {desired} new pods have been updated..."),
            false,
        ));
    }
    if available < desired {
        return Ok((
            format!("Waiting for daemon set {name:?} rollout to finish: {available} of {desired} updated pods are available..."),
            false,
        ));
    }
    Ok((format!("daemon set {name:?} successfully rolled out"), true))
}

/// Revision → the pod template of that revision, with the ReplicaSet's change-cause annotation on it.
pub fn history(owned: &[ReplicaSet]) -> BTreeMap<i64, PodTemplateSpec> {
    let mut out = BTreeMap::new();
    for rs in owned {
        let Some(rev) = revision(&rs.metadata) else { continue };
        let mut template = rs.spec.template.clone().unwrap_or_default();
        let cause = rs.metadata.annotations.as_ref().and_then(|a| a.get(verbs::CHANGE_CAUSE)).filter(|c| !c.is_empty());
        if let Some(cause) = cause {
            template
                .metadata
                .get_or_insert_with(Default::default)
                .annotations
                .get_or_insert_with(Default::default)
                .insert(verbs::CHANGE_CAUSE.into(), cause.clone());
        }
        out.insert(rev, template);
    }
    out
}

/// `rollout history`'s table: REVISION and CHANGE-CAUSE, aligned as kubectl's tabwriter does.
pub fn history_table(history: &BTreeMap<i64, PodTemplateSpec>) -> String {
    if history.is_empty() {
        return "No rollout history found.".into();
    }
    let mut text = String::from("REVISION\tCHANGE-CAUSE\n");
    for (rev, t) in history {
        let cause = t
            .metadata
            .as_ref()
            .and_then(|m| m.annotations.as_ref())
            .and_then(|a| a.get(verbs::CHANGE_CAUSE))
            .filter(|c| !c.is_empty())
            .map(String::as_str)
            .unwrap_or("<none>");
        text.push_str(&format!("{rev}\t{cause}\n"));
    }
    crate::table::tabwrite(&text, 0, 2)
}

/// Why `undo` cannot go back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UndoError {
    #[error("unable to find specified revision {0} in history")]
    RevisionNotFound(i64),
    #[error("no rollout history found for deployment {0:?}")]
    NoHistory(String),
    #[error("you cannot rollback a paused deployment; resume it first with 'weft rollout resume' and try again")]
    Paused,
}

/// What `undo` does.
#[derive(Debug, Clone, PartialEq)]
pub enum Undo {
    /// Write this template (the revision's, without the hash label) and these annotations into the Deployment.
    Rollback { revision: i64, template: Box<PodTemplateSpec>, annotations: BTreeMap<String, String> },
    /// The Deployment already runs that revision's template.
    Skip { revision: i64 },
}

/// kubectl's rollback decision: the ReplicaSet at `to_revision`, or (0) the one with the second-highest revision;
/// its template minus the hash label; the Deployment's annotations on the skip list kept, the ReplicaSet's others
/// copied (its change-cause among them).
pub fn undo_target(d: &Deployment, owned: &[ReplicaSet], to_revision: i64) -> Result<Undo, UndoError> {
    if to_revision < 0 {
        return Err(UndoError::RevisionNotFound(to_revision));
    }
    let mut latest: Option<(i64, &ReplicaSet)> = None;
    let mut previous: Option<(i64, &ReplicaSet)> = None;
    let mut target = None;
    for rs in owned {
        let Some(v) = revision(&rs.metadata) else { continue };
        if to_revision == 0 {
            if latest.is_none_or(|(l, _)| l < v) {
                previous = latest;
                latest = Some((v, rs));
            } else if previous.is_none_or(|(p, _)| p < v) {
                previous = Some((v, rs));
            }
        } else if v == to_revision {
            target = Some((v, rs));
            break;
        }
    }
    let (revision, rs) = match (to_revision, target, previous) {
        (0, _, Some(p)) => p,
        (0, _, None) => return Err(UndoError::NoHistory(d.metadata.name.clone().unwrap_or_default())),
        (_, Some(t), _) => t,
        (n, None, _) => return Err(UndoError::RevisionNotFound(n)),
    };
    if d.spec.paused == Some(true) {
        return Err(UndoError::Paused);
    }
    let mut template = rs.spec.template.clone().unwrap_or_default();
    if equal_ignore_hash(&template, &d.spec.template) {
        return Ok(Undo::Skip { revision });
    }
    if let Some(labels) = template.metadata.as_mut().and_then(|m| m.labels.as_mut()) {
        labels.remove(POD_TEMPLATE_HASH);
    }
    let mut annotations = BTreeMap::new();
    for k in ANNOTATIONS_TO_SKIP {
        if let Some(v) = d.metadata.annotations.as_ref().and_then(|a| a.get(k)) {
            annotations.insert(k.to_string(), v.clone());
        }
    }
    for (k, v) in rs.metadata.annotations.iter().flatten() {
        if !ANNOTATIONS_TO_SKIP.contains(&k.as_str()) {
            annotations.insert(k.clone(), v.clone());
        }
    }
    Ok(Undo::Rollback { revision, template: Box::new(template), annotations })
}

// ---- the commands ----

#[derive(Debug, Clone, clap::Subcommand)]
pub enum RolloutCommand {
    /// Show the status of the rollout, waiting for it to finish unless --watch=false
    Status(StatusArgs),
    /// Revisions of a deployment, from the ReplicaSets it owns
    History(HistoryArgs),
    /// Roll back to the previous revision (or --to-revision)
    Undo(UndoArgs),
    /// Stop rolling out template changes (spec.paused)
    Pause(TargetArgs),
    /// Roll out again (spec.paused false)
    Resume(TargetArgs),
}

#[derive(Debug, Clone, clap::Args)]
pub struct TargetArgs {
    /// deployment/NAME, or deployment NAME
    #[arg(required = true)]
    pub args: Vec<String>,
    #[arg(short = 'n', long = "namespace")]
    pub namespace: Option<String>,
    #[command(flatten)]
    pub etcd: EtcdArgs,
}

#[derive(Debug, Clone, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// keep watching until the rollout is done
    #[arg(short = 'w', long = "watch", default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1,
          require_equals = true, default_missing_value = "true")]
    pub watch: bool,
    /// fail unless the deployment runs this revision (0: the latest)
    #[arg(long = "revision", default_value_t = 0)]
    pub revision: i64,
    /// how long to watch, e.g. 30s, 2m (0: forever)
    #[arg(long = "timeout", value_parser = verbs::parse_duration, default_value = "0s")]
    pub timeout: Duration,
}

#[derive(Debug, Clone, clap::Args)]
pub struct HistoryArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// show the pod template of this revision
    #[arg(long = "revision", default_value_t = 0)]
    pub revision: i64,
}

#[derive(Debug, Clone, clap::Args)]
pub struct UndoArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// the revision to go back to (0: the previous one)
    #[arg(long = "to-revision", default_value_t = 0)]
    pub to_revision: i64,
}

pub async fn run(cmd: RolloutCommand) -> anyhow::Result<i32> {
    let mut out = std::io::stdout();
    match cmd {
        RolloutCommand::Status(a) => status(&verbs::open(&a.target.etcd).await?, &a, &mut out).await,
        RolloutCommand::History(a) => history_cmd(&verbs::open(&a.target.etcd).await?, &a, &mut out).await,
        RolloutCommand::Undo(a) => undo(&verbs::open(&a.target.etcd).await?, &a, &mut out).await,
        RolloutCommand::Pause(a) => pause(&verbs::open(&a.etcd).await?, &a, true, &mut out).await,
        RolloutCommand::Resume(a) => pause(&verbs::open(&a.etcd).await?, &a, false, &mut out).await,
    }
}

/// The kind and name of each object the arguments name.
fn objects(args: &TargetArgs, supported: &[Kind]) -> anyhow::Result<Vec<(Kind, String)>> {
    let mut out = Vec::new();
    for t in parse_targets(&args.args)? {
        if !supported.contains(&t.kind) {
            bail!(
                "no rollout support for {}: only {}",
                t.kind.plural(),
                supported.iter().map(|k| k.plural()).collect::<Vec<_>>().join(", ")
            );
        }
        if t.names.is_empty() {
            bail!("required resource name not specified");
        }
        out.extend(t.names.into_iter().map(|n| (t.kind, n)));
    }
    Ok(out)
}

async fn get_or_not_found<K: Object>(store: &Store, kind: Kind, ns: &str, name: &str) -> anyhow::Result<K> {
    match store.get::<K>(Some(ns), name).await {
        Ok(o) => Ok(o),
        Err(e) if e.is_not_found() => Err(verbs::not_found(kind, name)),
        Err(e) => Err(e.into()),
    }
}

pub async fn status(store: &Store, args: &StatusArgs, out: &mut dyn Write) -> anyhow::Result<i32> {
    let ns = namespace_of(&args.target.namespace);
    for (kind, name) in objects(&args.target, &[Kind::Deployment, Kind::DaemonSet])? {
        let wait = watch_status(store, kind, &ns, &name, args, out);
        if args.timeout.is_zero() {
            wait.await?;
        } else {
            tokio::time::timeout(args.timeout, wait)
                .await
                .map_err(|_| anyhow!("timed out waiting for the condition"))??;
        }
    }
    Ok(0)
}

fn status_of(kind: Kind, v: &Value, revision_wanted: i64) -> anyhow::Result<(String, bool)> {
    let r = match kind {
        Kind::Deployment => deployment_status(&serde_json::from_value(v.clone())?, revision_wanted),
        _ => daemonset_status(&serde_json::from_value(v.clone())?),
    };
    r.map_err(|e| anyhow!(e))
}

async fn watch_status(
    store: &Store,
    kind: Kind,
    ns: &str,
    name: &str,
    args: &StatusArgs,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let (current, rev) = match kind {
        Kind::Deployment => typed_value::<Deployment>(store, kind, ns, name).await?,
        _ => typed_value::<DaemonSet>(store, kind, ns, name).await?,
    };
    let report = |v: &Value, out: &mut dyn Write| -> anyhow::Result<bool> {
        let (line, done) = status_of(kind, v, args.revision)?;
        writeln!(out, "{line}")?;
        out.flush()?;
        Ok(done || !args.watch)
    };
    if report(&current, out)? {
        return Ok(());
    }
    match kind {
        Kind::Deployment => follow::<Deployment>(store, ns, name, rev, |v, out| report(v, out), out).await,
        _ => follow::<DaemonSet>(store, ns, name, rev, |v, out| report(v, out), out).await,
    }
}

async fn typed_value<K: Object>(store: &Store, kind: Kind, ns: &str, name: &str) -> anyhow::Result<(Value, i64)> {
    let o: K = get_or_not_found(store, kind, ns, name).await?;
    Ok((serde_json::to_value(&o)?, weft_api::store::rev_of(&o)))
}

/// Feeds every later version of one object to `step` until it says done; a deletion ends it with an error.
async fn follow<K: Object>(
    store: &Store,
    ns: &str,
    name: &str,
    from: i64,
    mut step: impl FnMut(&Value, &mut dyn Write) -> anyhow::Result<bool>,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let mut watch = store.watch::<K>(Some(ns), from + 1).await?;
    loop {
        let event = watch.next().await?;
        if event.object().metadata().name.as_deref() != Some(name) {
            continue;
        }
        match event {
            WatchEvent::Deleted(_) => bail!("object has been deleted"),
            WatchEvent::Added(o) | WatchEvent::Modified(o) => {
                if step(&serde_json::to_value(&o)?, out)? {
                    return Ok(());
                }
            }
        }
    }
}

pub async fn history_cmd(store: &Store, args: &HistoryArgs, out: &mut dyn Write) -> anyhow::Result<i32> {
    let ns = namespace_of(&args.target.namespace);
    for (kind, name) in objects(&args.target, &[Kind::Deployment])? {
        let d: Deployment = get_or_not_found(store, kind, &ns, &name).await?;
        let h = history(&replicasets_of(store, &d).await?);
        if args.revision > 0 {
            let template = h.get(&args.revision).ok_or_else(|| anyhow!("unable to find the specified revision"))?;
            let template = crate::describe::pod_template_raw(template);
            write!(out, "{} with revision #{}\n{template}\n", object_name(kind, &name), args.revision)?;
        } else {
            write!(out, "{} \n{}\n", object_name(kind, &name), history_table(&h))?;
        }
    }
    Ok(0)
}

pub async fn undo(store: &Store, args: &UndoArgs, out: &mut dyn Write) -> anyhow::Result<i32> {
    let ns = namespace_of(&args.target.namespace);
    for (kind, name) in objects(&args.target, &[Kind::Deployment])? {
        let d: Deployment = get_or_not_found(store, kind, &ns, &name).await?;
        let owned = replicasets_of(store, &d).await?;
        let mut message = String::new();
        verbs::update_with::<Deployment>(store, Some(&ns), &name, |d| {
            match undo_target(d, &owned, args.to_revision)? {
                Undo::Skip { revision } => {
                    message = format!("skipped rollback (current template already matches revision {revision})");
                    Ok(false)
                }
                Undo::Rollback { template, annotations, .. } => {
                    d.spec.template = *template;
                    d.metadata.annotations = (!annotations.is_empty()).then_some(annotations);
                    message = "rolled back".into();
                    Ok(true)
                }
            }
        })
        .await?;
        writeln!(out, "{} {message}", object_name(kind, &name))?;
    }
    Ok(0)
}

pub async fn pause(store: &Store, args: &TargetArgs, paused: bool, out: &mut dyn Write) -> anyhow::Result<i32> {
    let ns = namespace_of(&args.namespace);
    let mut code = 0;
    for (kind, name) in objects(args, &[Kind::Deployment])? {
        get_or_not_found::<Deployment>(store, kind, &ns, &name).await?;
        let changed = verbs::update_with::<Deployment>(store, Some(&ns), &name, |d| {
            let now = d.spec.paused.unwrap_or(false);
            d.spec.paused = Some(paused);
            Ok(now != paused)
        })
        .await?;
        if changed.is_some() {
            writeln!(out, "{} {}", object_name(kind, &name), if paused { "paused" } else { "resumed" })?;
        } else {
            eprintln!("error: {} {name:?} is {}", kind.plural(), if paused { "already paused" } else { "not paused" });
            code = 1;
        }
    }
    Ok(code)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::owned::{new_and_old, owned_replicasets};

    fn deployment(yaml: &str) -> Deployment {
        serde_norway::from_str(yaml).unwrap()
    }

    const BASE: &str = "metadata: {name: web, namespace: default, uid: d-1, generation: 2}\nspec:\n  replicas: 3\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}}\n    spec: {containers: [{name: nginx, image: nginx:1.9.1}]}\n";

    fn with_status(status: &str) -> Deployment {
        deployment(&format!("{BASE}status: {status}\n"))
    }

    #[test]
    fn status_lines_follow_kubectl() {
        type Want = Result<(&'static str, bool), &'static str>;
        let cases: &[(&str, Want)] = &[
            ("{observedGeneration: 1}", Ok(("Waiting for deployment spec update to be observed...", false))),
            (
                "{observedGeneration: 2, replicas: 3, updatedReplicas: 1, availableReplicas: 1}",
                Ok(("Waiting for deployment \"web\" rollout to finish: 1 out of 3 new replicas have been updated...", false)),
            ),
            (
                "{observedGeneration: 2, replicas: 4, updatedReplicas: 3, availableReplicas: 3}",
                Ok(("Waiting for deployment \"web\" rollout to finish: 1 old replicas are pending termination...", false)),
            ),
            (
                "{observedGeneration: 2, replicas: 3, updatedReplicas: 3, availableReplicas: 1}",
                Ok(("Waiting for deployment \"web\" rollout to finish: 1 of 3 updated replicas are available...", false)),
            ),
            (
                "{observedGeneration: 2, replicas: 3, updatedReplicas: 3, availableReplicas: 3}",
                Ok(("deployment \"web\" successfully rolled out", true)),
            ),
            (
                "{observedGeneration: 2, replicas: 3, updatedReplicas: 1, conditions: [{type: Progressing, status: \"False\", reason: ProgressDeadlineExceeded}]}",
                Err("deployment \"web\" exceeded its progress deadline"),
            ),
            (
                // An older observation is not judged against the deadline.
                "{observedGeneration: 1, conditions: [{type: Progressing, status: \"False\", reason: ProgressDeadlineExceeded}]}",
                Ok(("Waiting for deployment spec update to be observed...", false)),
            ),
        ];
        for (status, want) in cases {
            let got = deployment_status(&with_status(status), 0);
            let want = want.map(|(l, d)| (l.to_string(), d)).map_err(str::to_string);
            assert_eq!(got, want, "{status}");
        }
        let mut d = with_status("{observedGeneration: 2, replicas: 3, updatedReplicas: 3, availableReplicas: 3}");
        d.metadata.annotations = Some([(REVISION_ANNOTATION.to_string(), "2".to_string())].into());
        assert!(deployment_status(&d, 2).is_ok());
        assert_eq!(
            deployment_status(&d, 3),
            Err("desired revision (3) is different from the running revision (2)".to_string())
        );
    }

    #[test]
    fn daemonset_status_lines() {
        let ds = |status: &str, strategy: &str| -> DaemonSet {
            serde_norway::from_str(&format!("metadata: {{name: agent, generation: 1}}\nspec:\n  selector: {{matchLabels: {{app: a}}}}\n  updateStrategy: {{type: {strategy}}}\n  template: {{metadata: {{labels: {{app: a}}}}}}\nstatus: {status}\n")).unwrap()
        };
        let base = "{observedGeneration: 1, currentNumberScheduled: 3, numberMisscheduled: 0, numberReady: 3, desiredNumberScheduled: 3";
        assert_eq!(
            daemonset_status(&ds(&format!("{base}, updatedNumberScheduled: 2, numberAvailable: 3}}"), "RollingUpdate")),
            Ok((
                "Waiting for daemon set \"agent\" rollout to finish: 2 out of 3 new pods have been updated...".into(),
                false
            ))
        );
        assert_eq!(
            daemonset_status(&ds(&format!("{base}, updatedNumberScheduled: 3, numberAvailable: 3}}"), "RollingUpdate")),
            Ok(("daemon set \"agent\" successfully rolled out".into(), true))
        );
        assert!(daemonset_status(&ds(&format!("{base}}}"), "OnDelete")).is_err());
    }

    /// A ReplicaSet of `web` at `revision` running `image`, created `minute` minutes into the hour.
    fn rs(name: &str, revision: Option<&str>, image: &str, minute: u32, owner: &str) -> ReplicaSet {
        let annotations = match revision {
            Some(r) => format!("annotations: {{deployment.kubernetes.io/revision: \"{r}\", deployment.kubernetes.io/desired-replicas: \"3\", kubernetes.io/change-cause: \"set {image}\"}}, "),
            None => String::new(),
        };
        serde_norway::from_str(&format!(
            "metadata: {{name: {name}, namespace: default, {annotations}creationTimestamp: \"2026-01-01T00:{minute:02}:00Z\", labels: {{app: web, pod-template-hash: h{minute}}}, ownerReferences: [{{apiVersion: apps/v1, kind: Deployment, name: web, uid: {owner}, controller: true}}]}}\nspec:\n  replicas: 0\n  selector: {{matchLabels: {{app: web, pod-template-hash: h{minute}}}}}\n  template:\n    metadata: {{labels: {{app: web, pod-template-hash: h{minute}}}}}\n    spec: {{containers: [{{name: nginx, image: \"{image}\"}}]}}\n"
        ))
        .unwrap()
    }

    #[test]
    fn owned_replicasets_are_selected_and_controlled_oldest_first() {
        let d = deployment(BASE);
        let mut stranger = rs("stranger", Some("9"), "nginx:x", 0, "someone-else");
        stranger.metadata.name = Some("stranger".into());
        let mut unlabelled = rs("unlabelled", Some("8"), "nginx:y", 1, "d-1");
        unlabelled.metadata.labels = None;
        let all = vec![
            rs("web-b", Some("2"), "nginx:1.9.1", 5, "d-1"),
            stranger,
            unlabelled,
            rs("web-a", Some("1"), "nginx:1.7.9", 2, "d-1"),
        ];
        let owned = owned_replicasets(&d, &all);
        let names: Vec<_> = owned.iter().map(|r| r.metadata.name.clone().unwrap()).collect();
        assert_eq!(names, ["web-a", "web-b"]);
        let (new, old) = new_and_old(&d, &owned);
        assert_eq!(new.unwrap().metadata.name.as_deref(), Some("web-b"), "the template matches, hash label aside");
        assert_eq!(old.len(), 1);
    }

    #[test]
    fn undo_targets() {
        let d = deployment(BASE); // running nginx:1.9.1 (revision 2)
        let owned = vec![
            rs("web-a", Some("1"), "nginx:1.7.9", 1, "d-1"),
            rs("web-b", Some("2"), "nginx:1.9.1", 2, "d-1"),
            rs("web-c", Some("3"), "nginx:1.10", 3, "d-1"),
            rs("web-x", Some("junk"), "nginx:junk", 4, "d-1"),
        ];
        let image = |u: &Result<Undo, UndoError>| match u {
            Ok(Undo::Rollback { template, .. }) => template.spec.as_ref().unwrap().containers[0].image.clone().unwrap(),
            other => format!("{other:?}"),
        };
        // Default: the second-highest revision, whatever runs now.
        assert_eq!(
            undo_target(&d, &owned, 0),
            Ok(Undo::Skip { revision: 2 }),
            "revision 2 is what runs: nothing to do"
        );
        assert_eq!(image(&undo_target(&d, &owned, 1)), "nginx:1.7.9");
        assert_eq!(image(&undo_target(&d, &owned, 3)), "nginx:1.10");
        assert_eq!(undo_target(&d, &owned, 7), Err(UndoError::RevisionNotFound(7)));
        assert_eq!(undo_target(&d, &owned, -1), Err(UndoError::RevisionNotFound(-1)));
        assert_eq!(UndoError::RevisionNotFound(7).to_string(), "unable to find specified revision 7 in history");
        assert_eq!(undo_target(&d, &owned[..1], 0), Err(UndoError::NoHistory("web".into())));
        assert_eq!(undo_target(&d, &[], 0), Err(UndoError::NoHistory("web".into())));

        // The template comes back without the hash label; annotations: the Deployment's skip-listed ones kept,
        // the ReplicaSet's others (the change-cause) copied, its revision and desired-replicas not.
        let mut d2 = d.clone();
        d2.metadata.annotations = Some(
            [(REVISION_ANNOTATION.to_string(), "3".to_string()), ("note".to_string(), "dropped".to_string())].into(),
        );
        let Ok(Undo::Rollback { revision, template, annotations }) = undo_target(&d2, &owned, 1) else { panic!() };
        assert_eq!(revision, 1);
        let labels = template.metadata.unwrap().labels.unwrap();
        assert_eq!(labels.get(POD_TEMPLATE_HASH), None);
        assert_eq!(labels.get("app").map(String::as_str), Some("web"));
        let want: BTreeMap<String, String> = [
            (REVISION_ANNOTATION.to_string(), "3".to_string()),
            (verbs::CHANGE_CAUSE.to_string(), "set nginx:1.7.9".to_string()),
        ]
        .into();
        assert_eq!(annotations, want);

        let mut paused = d.clone();
        paused.spec.paused = Some(true);
        assert_eq!(undo_target(&paused, &owned, 1), Err(UndoError::Paused));
        assert_eq!(
            undo_target(&paused, &owned, 9),
            Err(UndoError::RevisionNotFound(9)),
            "a missing revision is reported first"
        );
    }

    #[test]
    fn history_lists_revisions_with_change_causes() {
        let mut plain = rs("web-c", Some("3"), "nginx:1.10", 3, "d-1");
        plain.metadata.annotations.as_mut().unwrap().remove(verbs::CHANGE_CAUSE);
        let owned = vec![
            rs("web-b", Some("2"), "nginx:1.9.1", 2, "d-1"),
            plain,
            rs("web-a", Some("1"), "nginx:1.7.9", 1, "d-1"),
        ];
        let h = history(&owned);
        assert_eq!(
            history_table(&h),
            "REVISION  CHANGE-CAUSE\n1         set nginx:1.7.9\n2         set nginx:1.9.1\n3         <none>\n"
        );
        assert_eq!(history_table(&BTreeMap::new()), "No rollout history found.");
        // A ReplicaSet without the annotation is revision 0, as kubectl counts it.
        let h = history(&[rs("old", None, "nginx:0", 0, "d-1")]);
        assert_eq!(h.keys().copied().collect::<Vec<_>>(), [0]);
    }
}
