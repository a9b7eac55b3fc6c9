//! `weft scale` and `weft set image`: kubectl's two imperative edits of a workload, each a compare-and-swap update
//! retried on conflict. The edits themselves are pure functions over the object (`set_replicas`, `set_images`) so
//! their rules (the `--current-replicas` precondition, containers named or `*`, init containers too, an unknown
//! container refusing the whole change) are tested without etcd.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use anyhow::{anyhow, bail};
use k8s_openapi::api::core::v1::{Container, PodSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::verbs::{self, namespace_of, object_name, parse_targets, Kind, KindNames};
use weft_api::labels::Selector;
use weft_api::store::{Object, Store};
use weft_api::{DaemonSet, Deployment, EtcdArgs, Pod, ReplicaSet, ReplicationController};

#[derive(Debug, Clone, clap::Args)]
pub struct ScaleArgs {
    /// deployment/NAME, deployment NAME, rs, rc (several names may follow one kind)
    pub args: Vec<String>,
    /// the new number of replicas
    #[arg(long = "replicas", required = true)]
    pub replicas: i32,
    /// scale only if the current number of replicas is this (-1: any)
    #[arg(long = "current-replicas", default_value_t = -1, allow_negative_numbers = true)]
    pub current_replicas: i32,
    /// scale only if the object's resourceVersion is this
    #[arg(long = "resource-version")]
    pub resource_version: Option<String>,
    #[arg(short = 'n', long = "namespace")]
    pub namespace: Option<String>,
    /// scale the objects of KIND this label selector selects
    #[arg(short = 'l', long = "selector")]
    pub selector: Option<String>,
    /// scale every object of KIND in the namespace
    #[arg(long = "all")]
    pub all: bool,
    /// wait this long for status.replicas to reach --replicas (0: do not wait), e.g. 30s
    #[arg(long = "timeout", value_parser = verbs::parse_duration, default_value = "0s")]
    pub timeout: Duration,
    /// record the command line in the kubernetes.io/change-cause annotation
    #[arg(long = "record", num_args = 0..=1, require_equals = true, default_missing_value = "true",
          action = clap::ArgAction::Set, default_value_t = false)]
    pub record: bool,
    #[command(flatten)]
    pub etcd: EtcdArgs,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum SetCommand {
    /// Update the image of containers in a pod template (or pod)
    Image(SetImageArgs),
}

#[derive(Debug, Clone, clap::Args)]
pub struct SetImageArgs {
    /// KIND/NAME... (or KIND NAME...) then CONTAINER=IMAGE... (`*=IMAGE` for every container)
    #[arg(required = true)]
    pub args: Vec<String>,
    #[arg(short = 'n', long = "namespace")]
    pub namespace: Option<String>,
    /// update the objects of KIND this label selector selects
    #[arg(short = 'l', long = "selector")]
    pub selector: Option<String>,
    /// update every object of KIND in the namespace
    #[arg(long = "all")]
    pub all: bool,
    /// record the command line in the kubernetes.io/change-cause annotation
    #[arg(long = "record", num_args = 0..=1, require_equals = true, default_missing_value = "true",
          action = clap::ArgAction::Set, default_value_t = false)]
    pub record: bool,
    #[command(flatten)]
    pub etcd: EtcdArgs,
}

/// kubectl's scale precondition failure: `Expected replicas to be 3, was 10`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Expected {what} to be {expected}, was {actual}")]
pub struct PreconditionError {
    pub what: &'static str,
    pub expected: String,
    pub actual: String,
}

/// Sets `replicas` after checking the preconditions against what is stored; `Ok(false)` if it is already so.
pub fn set_replicas(
    current: &mut Option<i32>,
    meta: &ObjectMeta,
    replicas: i32,
    current_replicas: i32,
    resource_version: Option<&str>,
) -> Result<bool, PreconditionError> {
    let now = current.unwrap_or(1);
    if current_replicas != -1 && now != current_replicas {
        return Err(PreconditionError {
            what: "replicas",
            expected: current_replicas.to_string(),
            actual: now.to_string(),
        });
    }
    if let Some(rv) = resource_version.filter(|rv| !rv.is_empty()) {
        let actual = meta.resource_version.clone().unwrap_or_default();
        if actual != rv {
            return Err(PreconditionError { what: "resource version", expected: rv.to_string(), actual });
        }
    }
    let changed = *current != Some(replicas);
    *current = Some(replicas);
    Ok(changed)
}

/// Sets the image of each named container (init containers included; `*` names them all). Refuses the whole change,
/// naming the container, if one is not in the spec. Returns whether anything changed.
pub fn set_images(spec: &mut PodSpec, images: &BTreeMap<String, String>) -> anyhow::Result<bool> {
    let mut changed = false;
    let mut missing = Vec::new();
    for (name, image) in images {
        let mut found = false;
        let containers: Vec<&mut Container> =
            spec.init_containers.iter_mut().flatten().chain(spec.containers.iter_mut()).collect();
        for c in containers {
            if c.name == *name || name == "*" {
                found = true;
                if c.image.as_deref() != Some(image.as_str()) {
                    c.image = Some(image.clone());
                    changed = true;
                }
            }
        }
        if !found {
            missing.push(format!("unable to find container named {name:?}"));
        }
    }
    if !missing.is_empty() {
        bail!("{}", missing.join("\n"));
    }
    Ok(changed)
}

/// Splits `set image` arguments: resources first, then `name=image` pairs (kubectl's GetResourcesAndPairs).
pub fn resources_and_images(args: &[String]) -> anyhow::Result<(Vec<String>, BTreeMap<String, String>)> {
    let mut resources = Vec::new();
    let mut images = BTreeMap::new();
    for a in args {
        match a.split_once('=') {
            Some((name, image)) => {
                if name.is_empty() || image.is_empty() {
                    bail!("invalid image argument {a:?}: expected CONTAINER=IMAGE");
                }
                images.insert(name.to_string(), image.to_string());
            }
            None if images.is_empty() => resources.push(a.clone()),
            None => bail!("all resources must be specified before image changes: {a}"),
        }
    }
    if resources.is_empty() {
        bail!("one or more resources must be specified as <resource> <name> or <resource>/<name>");
    }
    if images.is_empty() {
        bail!("at least one image update is required");
    }
    if images.len() > 1 && images.contains_key("*") {
        bail!("all containers are already specified by *, but saw more than one container_name=container_image pairs");
    }
    Ok((resources, images))
}

/// With `--record`, writes the command line into the change-cause annotation; true if that changed it.
fn record(meta: &mut ObjectMeta, yes: bool) -> bool {
    if !yes {
        return false;
    }
    let cause = verbs::command_line();
    let annotations = meta.annotations.get_or_insert_with(Default::default);
    annotations.insert(verbs::CHANGE_CAUSE.into(), cause.clone()).as_ref() != Some(&cause)
}

/// The objects the arguments name (or `-l`/`--all` select) in `ns`, as (kind, name).
async fn objects(
    store: &Store,
    resources: &[String],
    ns: &str,
    selector: Option<&str>,
    all: bool,
) -> anyhow::Result<Vec<(Kind, String)>> {
    let selector = selector.map(Selector::parse).transpose()?;
    let mut out = Vec::new();
    for t in parse_targets(resources)? {
        if t.names.is_empty() {
            if selector.is_none() && !all {
                bail!("resource(s) were provided, but no name was specified");
            }
            let names =
                weft_api::with_kind!(t.kind, K => verbs::list_names::<K>(store, Some(ns), selector.as_ref()).await?);
            out.extend(names.into_iter().map(|n| (t.kind, n)));
        } else {
            out.extend(t.names.into_iter().map(|n| (t.kind, n)));
        }
    }
    Ok(out)
}

fn not_found_or(kind: Kind, name: &str, e: anyhow::Error) -> anyhow::Error {
    if verbs::is_not_found(&e) {
        verbs::not_found(kind, name)
    } else {
        e
    }
}

pub async fn scale(args: ScaleArgs) -> anyhow::Result<i32> {
    let store = verbs::open(&args.etcd).await?;
    scale_to(&store, &args, &mut std::io::stdout()).await
}

pub async fn scale_to(store: &Store, args: &ScaleArgs, out: &mut dyn Write) -> anyhow::Result<i32> {
    if args.replicas < 0 {
        bail!("The --replicas=COUNT flag is required, and COUNT must be greater than or equal to 0");
    }
    if args.current_replicas < -1 {
        bail!("The --current-replicas must specify an integer of -1 or greater");
    }
    if args.args.is_empty() {
        bail!("You must provide one or more resources by argument or filename.");
    }
    let ns = namespace_of(&args.namespace);
    let targets = objects(store, &args.args, &ns, args.selector.as_deref(), args.all).await?;
    if targets.is_empty() {
        bail!("no objects passed to scale");
    }
    if args.resource_version.is_some() && targets.len() > 1 {
        bail!("cannot use --resource-version with multiple resources");
    }
    let rv = args.resource_version.as_deref();
    for (kind, name) in &targets {
        let (want, cur) = (args.replicas, args.current_replicas);
        let result = match kind {
            Kind::Deployment => verbs::update_with::<Deployment>(store, Some(&ns), name, |d| {
                let changed = set_replicas(&mut d.spec.replicas, &d.metadata, want, cur, rv)?;
                Ok(record(&mut d.metadata, args.record) || changed)
            })
            .await
            .map(drop),
            Kind::ReplicaSet => verbs::update_with::<ReplicaSet>(store, Some(&ns), name, |r| {
                let changed = set_replicas(&mut r.spec.replicas, &r.metadata, want, cur, rv)?;
                Ok(record(&mut r.metadata, args.record) || changed)
            })
            .await
            .map(drop),
            Kind::ReplicationController => verbs::update_with::<ReplicationController>(store, Some(&ns), name, |r| {
                let meta = r.metadata.clone();
                let spec = r.spec.get_or_insert_with(Default::default);
                let changed = set_replicas(&mut spec.replicas, &meta, want, cur, rv)?;
                Ok(record(&mut r.metadata, args.record) || changed)
            })
            .await
            .map(drop),
            other => bail!(
                "{} {name:?} cannot be scaled: only deployments, replicasets and replicationcontrollers have replicas",
                other.plural()
            ),
        };
        result.map_err(|e| not_found_or(*kind, name, e))?;
        writeln!(out, "{} scaled", object_name(*kind, name))?;
    }
    if !args.timeout.is_zero() {
        let deadline = tokio::time::Instant::now() + args.timeout;
        for (kind, name) in &targets {
            wait_for_replicas(store, *kind, &ns, name, args.replicas, deadline).await?;
        }
    }
    Ok(0)
}

/// Waits until the controller reports `replicas` (status.replicas, at the current generation).
async fn wait_for_replicas(
    store: &Store,
    kind: Kind,
    ns: &str,
    name: &str,
    replicas: i32,
    deadline: tokio::time::Instant,
) -> anyhow::Result<()> {
    loop {
        let (generation, observed, have) = match kind {
            Kind::Deployment => {
                let d: Deployment = store.get(Some(ns), name).await?;
                let st = d.status.unwrap_or_default();
                (d.metadata.generation, st.observed_generation, st.replicas.unwrap_or(0))
            }
            Kind::ReplicaSet => {
                let r: ReplicaSet = store.get(Some(ns), name).await?;
                let st = r.status.unwrap_or_default();
                (r.metadata.generation, st.observed_generation, st.replicas)
            }
            _ => {
                let r: ReplicationController = store.get(Some(ns), name).await?;
                let st = r.status.unwrap_or_default();
                (r.metadata.generation, st.observed_generation, st.replicas)
            }
        };
        if generation.unwrap_or(0) <= observed.unwrap_or(0) && have == replicas {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(anyhow!("timed out waiting for the condition"));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

pub async fn set(cmd: SetCommand) -> anyhow::Result<i32> {
    match cmd {
        SetCommand::Image(args) => {
            let store = verbs::open(&args.etcd).await?;
            set_image_to(&store, &args, &mut std::io::stdout()).await
        }
    }
}

pub async fn set_image_to(store: &Store, args: &SetImageArgs, out: &mut dyn Write) -> anyhow::Result<i32> {
    let (resources, images) = resources_and_images(&args.args)?;
    let ns = namespace_of(&args.namespace);
    let targets = objects(store, &resources, &ns, args.selector.as_deref(), args.all).await?;
    for (kind, name) in &targets {
        let edit = |spec: &mut PodSpec, meta: &mut ObjectMeta| -> anyhow::Result<bool> {
            if !set_images(spec, &images)? {
                return Ok(false);
            }
            record(meta, args.record);
            Ok(true)
        };
        let changed = match kind {
            Kind::Deployment => update_template::<Deployment>(store, &ns, name, |d| {
                edit(d.spec.template.spec.get_or_insert_with(Default::default), &mut d.metadata)
            })
            .await,
            Kind::DaemonSet => update_template::<DaemonSet>(store, &ns, name, |d| {
                edit(d.spec.template.spec.get_or_insert_with(Default::default), &mut d.metadata)
            })
            .await,
            Kind::ReplicaSet => update_template::<ReplicaSet>(store, &ns, name, |r| {
                let t = r.spec.template.get_or_insert_with(Default::default);
                edit(t.spec.get_or_insert_with(Default::default), &mut r.metadata)
            })
            .await,
            Kind::ReplicationController => update_template::<ReplicationController>(store, &ns, name, |r| {
                let spec = r.spec.get_or_insert_with(Default::default);
                let t = spec.template.get_or_insert_with(Default::default);
                edit(t.spec.get_or_insert_with(Default::default), &mut r.metadata)
            })
            .await,
            Kind::Pod => update_template::<Pod>(store, &ns, name, |p| {
                edit(p.spec.get_or_insert_with(Default::default), &mut p.metadata)
            })
            .await,
            other => bail!("{} {name:?} has no pod template: set image works on deployments, daemonsets, replicasets, replicationcontrollers and pods", other.plural()),
        };
        if changed.map_err(|e| not_found_or(*kind, name, e))? {
            writeln!(out, "{} image updated", object_name(*kind, name))?;
        }
    }
    Ok(0)
}

async fn update_template<K: Object>(
    store: &Store,
    ns: &str,
    name: &str,
    change: impl FnMut(&mut K) -> anyhow::Result<bool>,
) -> anyhow::Result<bool> {
    Ok(verbs::update_with::<K>(store, Some(ns), name, change).await?.is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn replicas_and_preconditions() {
        let meta = ObjectMeta { resource_version: Some("42".into()), ..Default::default() };
        // (stored replicas, --replicas, --current-replicas, --resource-version, result)
        type Case = (Option<i32>, i32, i32, Option<&'static str>, Result<(Option<i32>, bool), &'static str>);
        let cases: &[Case] = &[
            (Some(3), 10, -1, None, Ok((Some(10), true))),
            (Some(10), 10, -1, None, Ok((Some(10), false))),
            (None, 1, -1, None, Ok((Some(1), true))),
            (Some(3), 10, 3, None, Ok((Some(10), true))),
            (Some(3), 10, 2, None, Err("Expected replicas to be 2, was 3")),
            (None, 5, 2, None, Err("Expected replicas to be 2, was 1")),
            (Some(3), 5, -1, Some("42"), Ok((Some(5), true))),
            (Some(3), 5, -1, Some("41"), Err("Expected resource version to be 41, was 42")),
        ];
        for (now, want, cur, rv, expect) in cases {
            let mut replicas = *now;
            let got =
                set_replicas(&mut replicas, &meta, *want, *cur, *rv).map(|c| (replicas, c)).map_err(|e| e.to_string());
            assert_eq!(got, expect.map_err(str::to_string), "{now:?} → {want} if {cur} / {rv:?}");
        }
    }

    fn spec() -> PodSpec {
        serde_norway::from_str(
            "initContainers: [{name: setup, image: busybox}]\ncontainers: [{name: nginx, image: nginx:1.7.9}, {name: sidecar, image: envoy:1}]\n",
        )
        .unwrap()
    }

    fn images(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn images_are_set_by_container_name() {
        let mut s = spec();
        assert!(set_images(&mut s, &images(&[("nginx", "nginx:1.9.1")])).unwrap());
        assert_eq!(s.containers[0].image.as_deref(), Some("nginx:1.9.1"));
        assert_eq!(s.containers[1].image.as_deref(), Some("envoy:1"));
        assert!(!set_images(&mut s, &images(&[("nginx", "nginx:1.9.1")])).unwrap(), "the same image is no change");
        assert!(set_images(&mut s, &images(&[("setup", "busybox:2")])).unwrap(), "init containers too");
        assert!(set_images(&mut s, &images(&[("*", "scratch")])).unwrap());
        assert!(s
            .containers
            .iter()
            .chain(s.init_containers.iter().flatten())
            .all(|c| c.image.as_deref() == Some("scratch")));

        let mut s = spec();
        let err = set_images(&mut s, &images(&[("nginx", "nginx:2"), ("ngnix", "nginx:2")])).unwrap_err();
        assert_eq!(err.to_string(), "unable to find container named \"ngnix\"");
        assert_eq!(
            s.containers[0].image.as_deref(),
            Some("nginx:2"),
            "the caller discards the spec: nothing is written"
        );
    }

    #[test]
    fn set_image_arguments() {
        let (r, i) = resources_and_images(&strings(&["deployment/nginx-deployment", "nginx=nginx:1.9.1"])).unwrap();
        assert_eq!(r, ["deployment/nginx-deployment"]);
        assert_eq!(i, images(&[("nginx", "nginx:1.9.1")]));
        let (r, i) = resources_and_images(&strings(&["deployment", "web", "a=x:1", "b=y:2"])).unwrap();
        assert_eq!(r, ["deployment", "web"]);
        assert_eq!(i.len(), 2);
        let err = |v: &[&str]| resources_and_images(&strings(v)).unwrap_err().to_string();
        assert!(err(&["deployment/web"]).contains("at least one image update is required"));
        assert!(err(&["a=b"]).contains("one or more resources"));
        assert!(err(&["deployment/web", "a=b", "deployment/other"]).contains("before image changes"));
        assert!(err(&["deployment/web", "*=x", "a=y"]).contains("all containers are already specified by *"));
        assert!(err(&["deployment/web", "a="]).contains("expected CONTAINER=IMAGE"));
    }
}
