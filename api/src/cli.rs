//! The library side of `weft apply`, `weft get` and `weft delete`: flags, and commands that read and write the
//! store the way kubectl talks to an API server (Services through `service`, so allocation happens). Output goes to
//! the writer the caller gives; `src/main.rs` passes stdout.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context};
use k8s_openapi::jiff::Timestamp;
use serde_json::Value;

use crate::manifest::{self, AnyObject, Document};
use crate::service::{self, ServiceRanges};
use crate::store::{Object, Store};
use crate::table::{self, Columns, Selector};
use crate::{DaemonSet, Deployment, Endpoints, EtcdArgs, Namespace, Node, Pod, ReplicaSet, Service};

/// The service network and NodePort range, named as kube-apiserver names them.
#[derive(Debug, Clone, clap::Args)]
pub struct RangeArgs {
    /// the network ClusterIPs are allocated from
    #[arg(long = "service-cluster-ip-range", env = "WEFT_SERVICE_CLUSTER_IP_RANGE", default_value = "10.96.0.0/12")]
    pub service_cluster_ip_range: String,
    /// the port range NodePorts are allocated from
    #[arg(long = "service-node-port-range", env = "WEFT_SERVICE_NODE_PORT_RANGE", default_value = "30000-32767")]
    pub service_node_port_range: String,
}

impl RangeArgs {
    pub fn ranges(&self) -> anyhow::Result<ServiceRanges> {
        Ok(ServiceRanges::parse(&self.service_cluster_ip_range, &self.service_node_port_range)?)
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct ApplyArgs {
    /// manifest file, directory, or - for stdin (repeatable)
    #[arg(short = 'f', long = "filename", required = true)]
    pub filenames: Vec<PathBuf>,
    /// namespace for objects that name none
    #[arg(short = 'n', long = "namespace")]
    pub namespace: Option<String>,
    /// unknown fields: strict refuses the manifest (kubectl's default), warn prints them, ignore says nothing
    #[arg(long = "validate", value_enum, default_value = "strict")]
    pub validate: Validate,
    #[command(flatten)]
    pub ranges: RangeArgs,
    #[command(flatten)]
    pub etcd: EtcdArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Validate {
    Strict,
    Warn,
    Ignore,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Wide,
    Yaml,
    Json,
    Name,
}

#[derive(Debug, Clone, clap::Args)]
pub struct GetArgs {
    /// kind: svc, ep, po, no, ns, deploy, rs, ds (or their full names)
    pub kind: String,
    /// one object's name
    pub name: Option<String>,
    #[arg(short = 'n', long = "namespace")]
    pub namespace: Option<String>,
    /// every namespace
    #[arg(short = 'A', long = "all-namespaces")]
    pub all_namespaces: bool,
    #[arg(short = 'o', long = "output", value_enum)]
    pub output: Option<Output>,
    /// label selector, e.g. app=web,tier!=db
    #[arg(short = 'l', long = "selector")]
    pub selector: Option<String>,
    #[command(flatten)]
    pub etcd: EtcdArgs,
}

#[derive(Debug, Clone, clap::Args)]
pub struct DeleteArgs {
    /// kind then names (`svc my-service`), or nothing with -f
    pub args: Vec<String>,
    /// manifests naming what to delete
    #[arg(short = 'f', long = "filename")]
    pub filenames: Vec<PathBuf>,
    #[arg(short = 'n', long = "namespace")]
    pub namespace: Option<String>,
    /// succeed when an object is already gone
    #[arg(long = "ignore-not-found")]
    pub ignore_not_found: bool,
    #[command(flatten)]
    pub etcd: EtcdArgs,
}

/// The kinds `get` and `delete` know, with kubectl's names for them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Service,
    Endpoints,
    Pod,
    Node,
    Namespace,
    Deployment,
    ReplicaSet,
    DaemonSet,
}

impl Kind {
    pub fn parse(s: &str) -> anyhow::Result<Kind> {
        // kubectl accepts `kind.group` too (services.v1 is rare; deployments.apps is common).
        let base = s.split('.').next().unwrap_or(s).to_lowercase();
        Ok(match base.as_str() {
            "svc" | "service" | "services" => Kind::Service,
            "ep" | "endpoints" => Kind::Endpoints,
            "po" | "pod" | "pods" => Kind::Pod,
            "no" | "node" | "nodes" => Kind::Node,
            "ns" | "namespace" | "namespaces" => Kind::Namespace,
            "deploy" | "deployment" | "deployments" => Kind::Deployment,
            "rs" | "replicaset" | "replicasets" => Kind::ReplicaSet,
            "ds" | "daemonset" | "daemonsets" => Kind::DaemonSet,
            _ => bail!("the server doesn't have a resource type {s:?}"),
        })
    }

    /// The resource name in URLs and kubectl's messages: `services`.
    pub fn plural(self) -> &'static str {
        match self {
            Kind::Service => "services",
            Kind::Endpoints => "endpoints",
            Kind::Pod => "pods",
            Kind::Node => "nodes",
            Kind::Namespace => "namespaces",
            Kind::Deployment => "deployments.apps",
            Kind::ReplicaSet => "replicasets.apps",
            Kind::DaemonSet => "daemonsets.apps",
        }
    }

    /// kubectl's word in `service "x" deleted`.
    pub fn word(self) -> &'static str {
        match self {
            Kind::Service => "service",
            Kind::Endpoints => "endpoints",
            Kind::Pod => "pod",
            Kind::Node => "node",
            Kind::Namespace => "namespace",
            Kind::Deployment => "deployment.apps",
            Kind::ReplicaSet => "replicaset.apps",
            Kind::DaemonSet => "daemonset.apps",
        }
    }
}

fn now() -> Timestamp {
    crate::store::now_timestamp()
}

async fn open(etcd: &EtcdArgs) -> anyhow::Result<Store> {
    Ok(Store::new(crate::connect(etcd).await?))
}

// ---- apply ----

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Created,
    Configured,
    Unchanged,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Outcome::Created => "created",
            Outcome::Configured => "configured",
            Outcome::Unchanged => "unchanged",
        })
    }
}

/// `weft apply`: every manifest is parsed and validated first; only then is anything written.
pub async fn apply(args: ApplyArgs) -> anyhow::Result<()> {
    apply_to(&args, &mut std::io::stdout()).await
}

pub async fn apply_to(args: &ApplyArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let ranges = args.ranges.ranges()?;
    let mut docs = manifest::load(&args.filenames)?;
    set_namespaces(&mut docs, args.namespace.as_deref())?;
    match args.validate {
        Validate::Strict => manifest::check_unknown_fields(&docs)?,
        Validate::Warn => {
            for d in docs.iter().filter(|d| !d.unknown_fields.is_empty()) {
                eprintln!("Warning: {}: unknown field(s) {}", d.source, d.unknown_fields.join(", "));
            }
        }
        Validate::Ignore => {}
    }
    manifest::validate(&docs, &ranges)?;
    let store = open(&args.etcd).await?;
    for doc in &docs {
        let outcome = apply_object(&store, &ranges, &doc.object)
            .await
            .with_context(|| format!("applying {} from {}", doc.object.display_name(), doc.source))?;
        writeln!(out, "{} {outcome}", doc.object.display_name())?;
    }
    Ok(())
}

fn namespaced(obj: &AnyObject) -> bool {
    crate::with_object!(obj, o => is_namespaced(o))
}

fn is_namespaced<K: Object>(_: &K) -> bool {
    K::NAMESPACED
}

/// `-n` fills in a missing namespace and must agree with one the manifest names, as with kubectl.
fn set_namespaces(docs: &mut [Document], namespace: Option<&str>) -> anyhow::Result<()> {
    for doc in docs {
        if !namespaced(&doc.object) {
            continue;
        }
        let meta = doc.object.metadata_mut();
        match (meta.namespace.as_deref(), namespace) {
            (Some(have), Some(want)) if have != want => bail!(
                "{}: the namespace from the provided object {have:?} does not match the namespace {want:?}. You must pass '--namespace={have}' to perform this operation.",
                doc.source
            ),
            (None, ns) => meta.namespace = Some(ns.unwrap_or("default").to_string()),
            _ => {}
        }
    }
    Ok(())
}

/// Creates the object, or updates it to the manifest keeping what the cluster owns (uid, allocations, status).
pub async fn apply_object(store: &Store, ranges: &ServiceRanges, obj: &AnyObject) -> anyhow::Result<Outcome> {
    match obj {
        AnyObject::Service(s) => apply_service(store, ranges, s).await,
        other => crate::with_object!(other, o => apply_generic(store, o).await),
    }
}

/// What an update from a manifest stores: the manifest, with the stored metadata (uid, creationTimestamp…)
/// except labels and annotations, and the stored status.
pub fn merge_for_apply<K: Object>(current: &K, desired: &K) -> anyhow::Result<K> {
    let cur = serde_json::to_value(current)?;
    let mut new = serde_json::to_value(desired)?;
    let mut meta = cur.get("metadata").cloned().unwrap_or_else(|| Value::Object(Default::default()));
    for field in ["labels", "annotations"] {
        match new.get("metadata").and_then(|m| m.get(field)).cloned() {
            Some(v) => meta[field] = v,
            None => {
                if let Some(m) = meta.as_object_mut() {
                    m.remove(field);
                }
            }
        }
    }
    new["metadata"] = meta;
    match cur.get("status") {
        Some(st) => new["status"] = st.clone(),
        None => {
            if let Some(o) = new.as_object_mut() {
                o.remove("status");
            }
        }
    }
    Ok(serde_json::from_value(new)?)
}

/// Status is the cluster's to write: a manifest's is ignored, as the API server ignores it on create.
fn without_status<K: Object>(obj: &K) -> anyhow::Result<K> {
    let mut v = serde_json::to_value(obj)?;
    if let Some(o) = v.as_object_mut() {
        o.remove("status");
    }
    Ok(serde_json::from_value(v)?)
}

fn same<K: Object>(a: &K, b: &K) -> bool {
    serde_json::to_value(a).ok() == serde_json::to_value(b).ok()
}

async fn apply_generic<K: Object>(store: &Store, obj: &K) -> anyhow::Result<Outcome> {
    let meta = obj.metadata();
    let name = meta.name.clone().unwrap_or_default();
    for _ in 0..10 {
        match store.get::<K>(meta.namespace.as_deref(), &name).await {
            Err(e) if e.is_not_found() => match store.create(&without_status(obj)?).await {
                Ok(_) => return Ok(Outcome::Created),
                Err(e) if e.is_already_exists() => continue,
                Err(e) => return Err(e.into()),
            },
            Err(e) => return Err(e.into()),
            Ok(current) => {
                let merged = merge_for_apply(&current, obj)?;
                if same(&current, &merged) {
                    return Ok(Outcome::Unchanged);
                }
                match store.update(&merged).await {
                    Ok(_) => return Ok(Outcome::Configured),
                    Err(e) if e.is_conflict() => continue,
                    Err(e) => return Err(e.into()),
                }
            }
        }
    }
    Err(anyhow!("{}: gave up after repeated conflicts", manifest::display_name(obj)))
}

async fn apply_service(store: &Store, ranges: &ServiceRanges, svc: &Service) -> anyhow::Result<Outcome> {
    let name = svc.metadata.name.clone().unwrap_or_default();
    for _ in 0..10 {
        match store.get::<Service>(svc.metadata.namespace.as_deref(), &name).await {
            Err(e) if e.is_not_found() => match service::create(store, ranges, &without_status(svc)?).await {
                Ok(_) => return Ok(Outcome::Created),
                Err(e) if e.is_already_exists() => continue,
                Err(e) => return Err(e.into()),
            },
            Err(e) => return Err(e.into()),
            Ok(current) => {
                let prepared = service::prepare_update(&current, svc)
                    .map_err(|errors| service::Error::Invalid { key: crate::ObjectKey::of(svc), errors })?;
                let mut merged = merge_for_apply(&current, &prepared)?;
                if same(&current, &merged) {
                    return Ok(Outcome::Unchanged);
                }
                merged.metadata.resource_version = current.metadata.resource_version.clone();
                match service::update(store, ranges, &merged).await {
                    Ok(_) => return Ok(Outcome::Configured),
                    Err(e) if e.is_conflict() => continue,
                    Err(e) => return Err(e.into()),
                }
            }
        }
    }
    Err(anyhow!("service/{name}: gave up after repeated conflicts"))
}

// ---- get ----

/// `weft get`.
pub async fn get(args: GetArgs) -> anyhow::Result<()> {
    let store = open(&args.etcd).await?;
    let mut out = std::io::stdout();
    get_to(&store, &args, &mut out).await
}

pub async fn get_to(store: &Store, args: &GetArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let kind = Kind::parse(&args.kind)?;
    match kind {
        Kind::Service => get_kind::<Service>(store, args, table::services, out).await,
        Kind::Endpoints => get_kind::<Endpoints>(store, args, table::endpoints, out).await,
        Kind::Pod => get_kind::<Pod>(store, args, table::pods, out).await,
        Kind::Node => get_kind::<Node>(store, args, table::nodes, out).await,
        Kind::Namespace => get_kind::<Namespace>(store, args, table::namespaces, out).await,
        Kind::Deployment => get_kind::<Deployment>(store, args, table::deployments, out).await,
        Kind::ReplicaSet => get_kind::<ReplicaSet>(store, args, table::replicasets, out).await,
        Kind::DaemonSet => get_kind::<DaemonSet>(store, args, table::daemonsets, out).await,
    }
}

/// kubectl's error for a missing object: `services "x" not found`.
fn not_found<K: Object>(name: &str) -> anyhow::Error {
    let group = if K::GROUP.is_empty() { String::new() } else { format!(".{}", K::GROUP) };
    anyhow!("Error from server (NotFound): {}{group} {name:?} not found", K::URL_PATH_SEGMENT)
}

async fn get_kind<K: Object>(
    store: &Store,
    args: &GetArgs,
    render: fn(&[K], Columns, Timestamp) -> String,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let ns = args.namespace.clone().unwrap_or_else(|| "default".into());
    if args.name.is_some() && args.all_namespaces {
        bail!("a resource cannot be retrieved by name across all namespaces");
    }
    let items: Vec<K> = match &args.name {
        Some(name) => match store.get::<K>(Some(&ns), name).await {
            Ok(o) => vec![o],
            Err(e) if e.is_not_found() => return Err(not_found::<K>(name)),
            Err(e) => return Err(e.into()),
        },
        None => {
            let scope = if args.all_namespaces { None } else { Some(ns.as_str()) };
            let (mut items, _) = store.list::<K>(scope).await?;
            if let Some(sel) = &args.selector {
                let sel = Selector::parse(sel)?;
                items.retain(|o| sel.matches(o.metadata().labels.as_ref()));
            }
            items
        }
    };
    if items.is_empty() {
        if K::NAMESPACED && !args.all_namespaces {
            eprintln!("No resources found in {ns} namespace.");
        } else {
            eprintln!("No resources found");
        }
        return Ok(());
    }
    match args.output {
        Some(Output::Yaml) => {
            out.write_all(serde_yaml::to_string(&printable(&items, args.name.is_some())?)?.as_bytes())?
        }
        Some(Output::Json) => {
            let mut text = serde_json::to_string_pretty(&printable(&items, args.name.is_some())?)?;
            text.push('\n');
            out.write_all(text.as_bytes())?
        }
        Some(Output::Name) => {
            for o in &items {
                writeln!(out, "{}", manifest::display_name(o))?;
            }
        }
        wide => {
            let cols = Columns { wide: wide == Some(Output::Wide), namespace: args.all_namespaces && K::NAMESPACED };
            out.write_all(render(&items, cols, now()).as_bytes())?
        }
    }
    Ok(())
}

/// One object as stored, or a `List` of them, as `kubectl get -o yaml|json` prints.
fn printable<K: Object>(items: &[K], single: bool) -> anyhow::Result<Value> {
    if single {
        if let Some(o) = items.first() {
            return Ok(serde_json::to_value(o)?);
        }
    }
    let items: Vec<Value> = items.iter().map(serde_json::to_value).collect::<Result<_, _>>()?;
    Ok(serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items, "metadata": {"resourceVersion": ""}}))
}

// ---- delete ----

/// `weft delete`.
pub async fn delete(args: DeleteArgs) -> anyhow::Result<()> {
    let store = open(&args.etcd).await?;
    delete_to(&store, &args, &mut std::io::stdout()).await
}

pub async fn delete_to(store: &Store, args: &DeleteArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let mut targets: Vec<(Kind, Option<String>, String)> = Vec::new();
    if !args.filenames.is_empty() {
        if !args.args.is_empty() {
            bail!("give either KIND NAME... or -f FILE, not both");
        }
        let mut docs = manifest::load(&args.filenames)?;
        set_namespaces(&mut docs, args.namespace.as_deref())?;
        for d in docs {
            let kind = Kind::parse(d.object.kind())?;
            let meta = d.object.metadata();
            targets.push((kind, meta.namespace.clone(), meta.name.clone().unwrap_or_default()));
        }
    } else {
        let [kind, names @ ..] = args.args.as_slice() else { bail!("give KIND NAME... or -f FILE") };
        if names.is_empty() {
            bail!("resource(s) were provided, but no name was specified");
        }
        let kind = Kind::parse(kind)?;
        let ns = args.namespace.clone().unwrap_or_else(|| "default".into());
        targets.extend(names.iter().map(|n| (kind, Some(ns.clone()), n.clone())));
    }
    let mut failed = Vec::new();
    for (kind, ns, name) in targets {
        let ns = ns.as_deref();
        let result: anyhow::Result<()> = match kind {
            Kind::Service => service::delete(store, ns, &name, None).await.map(drop).map_err(Into::into),
            Kind::Endpoints => store.delete::<Endpoints>(ns, &name, None).await.map(drop).map_err(Into::into),
            Kind::Pod => store.delete::<Pod>(ns, &name, None).await.map(drop).map_err(Into::into),
            Kind::Node => store.delete::<Node>(ns, &name, None).await.map(drop).map_err(Into::into),
            Kind::Namespace => store.delete::<Namespace>(ns, &name, None).await.map(drop).map_err(Into::into),
            Kind::Deployment => store.delete::<Deployment>(ns, &name, None).await.map(drop).map_err(Into::into),
            Kind::ReplicaSet => store.delete::<ReplicaSet>(ns, &name, None).await.map(drop).map_err(Into::into),
            Kind::DaemonSet => store.delete::<DaemonSet>(ns, &name, None).await.map(drop).map_err(Into::into),
        };
        match result {
            Ok(()) => writeln!(out, "{} {name:?} deleted", kind.word())?,
            Err(e) if is_not_found(&e) => {
                if !args.ignore_not_found {
                    eprintln!("Error from server (NotFound): {} {name:?} not found", kind.plural());
                    failed.push(name);
                }
            }
            Err(e) => return Err(e),
        }
    }
    if !failed.is_empty() {
        bail!("not found: {}", failed.join(", "));
    }
    Ok(())
}

fn is_not_found(e: &anyhow::Error) -> bool {
    e.downcast_ref::<crate::store::Error>().is_some_and(|e| e.is_not_found())
        || e.downcast_ref::<service::Error>().is_some_and(|e| e.is_not_found())
}
