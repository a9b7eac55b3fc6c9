//! The library side of `weft apply`, `weft get` and `weft delete`: flags, kubectl's resource arguments
//! (`svc,ep`, `deployment/NAME`), and commands that read and write the store the way kubectl talks to an API server
//! (Services through `service`, so allocation happens). Output goes to the writer the caller gives; `src/main.rs`
//! passes stdout. Commands return the process's exit code; errors kubectl reports per object go to stderr.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use k8s_openapi::jiff::Timestamp;
use serde_json::Value;

use crate::table::{Columns, Table, TableWriter, Tabular};
use weft_api::labels::Selector;
use weft_api::manifest::{self, AnyObject, Document};
use weft_api::service::{self, ServiceRanges};
use weft_api::store::{Error as StoreError, Object, Store, WatchEvent};
use weft_api::{EtcdArgs, Service};

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
    /// KIND[,KIND...] [NAME...] or KIND/NAME...; kinds: po, svc, ep, no, ns, deploy, rs, ds, rc (or their full
    /// names), `all`
    #[arg(required = true)]
    pub args: Vec<String>,
    #[arg(short = 'n', long = "namespace")]
    pub namespace: Option<String>,
    /// every namespace
    #[arg(short = 'A', long = "all-namespaces")]
    pub all_namespaces: bool,
    #[arg(short = 'o', long = "output", value_enum)]
    pub output: Option<Output>,
    /// label selector, e.g. app=web,tier!=db,'env in (a,b)',!legacy
    #[arg(short = 'l', long = "selector")]
    pub selector: Option<String>,
    /// after the list, print a line for every change (until interrupted)
    #[arg(short = 'w', long = "watch")]
    pub watch: bool,
    /// print only the changes, not the list first
    #[arg(long = "watch-only")]
    pub watch_only: bool,
    /// with -w: say what happened to each object (an EVENT column, or {type, object} documents)
    #[arg(long = "output-watch-events")]
    pub output_watch_events: bool,
    /// a LABELS column
    #[arg(long = "show-labels")]
    pub show_labels: bool,
    /// no header line
    #[arg(long = "no-headers")]
    pub no_headers: bool,
    #[command(flatten)]
    pub etcd: EtcdArgs,
}

/// What `delete` does with the objects an owner owns (their ownerReferences name it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cascade {
    /// The owner is deleted now; the controller's garbage collector then deletes its dependents.
    Background,
    /// The owner gets a deletionTimestamp and the `foregroundDeletion` finalizer; the garbage collector deletes
    /// its dependents, then the owner.
    Foreground,
    /// The owner's ownerReferences are removed from its dependents (which then stand alone), then it is deleted.
    Orphan,
}

/// `--cascade` as kubectl takes it: background|foreground|orphan, and the deprecated true (background) / false
/// (orphan).
pub fn parse_cascade(s: &str) -> Result<Cascade, String> {
    match s {
        "background" | "true" => Ok(Cascade::Background),
        "foreground" => Ok(Cascade::Foreground),
        "orphan" | "false" => Ok(Cascade::Orphan),
        _ => Err(format!("invalid cascade value ({s}). Must be \"background\", \"foreground\", or \"orphan\"")),
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct DeleteArgs {
    /// KIND NAME..., KIND/NAME..., or KIND with -l/--all; nothing with -f
    pub args: Vec<String>,
    /// manifests naming what to delete
    #[arg(short = 'f', long = "filename")]
    pub filenames: Vec<PathBuf>,
    #[arg(short = 'n', long = "namespace")]
    pub namespace: Option<String>,
    /// delete the objects of KIND this label selector selects
    #[arg(short = 'l', long = "selector")]
    pub selector: Option<String>,
    /// delete every object of KIND in the namespace
    #[arg(long = "all")]
    pub all: bool,
    /// succeed when an object is already gone
    #[arg(long = "ignore-not-found")]
    pub ignore_not_found: bool,
    /// dependents: background (the garbage collector deletes them after the owner), foreground (it deletes them
    /// before the owner, which waits with a deletionTimestamp), orphan (they are released and kept)
    #[arg(long = "cascade", value_parser = parse_cascade, default_value = "background", num_args = 0..=1,
          require_equals = true, default_missing_value = "background")]
    pub cascade: Cascade,
    /// wait until the objects are gone (a foreground deletion waits for the garbage collector)
    #[arg(long = "wait", default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1,
          require_equals = true, default_missing_value = "true")]
    pub wait: bool,
    /// how long --wait waits, e.g. 30s, 2m (0: a week)
    #[arg(long = "timeout", value_parser = parse_duration, default_value = "0s")]
    pub timeout: Duration,
    #[command(flatten)]
    pub etcd: EtcdArgs,
}

/// Go-style durations: the one parser in weft-api.
pub use weft_api::duration::parse as parse_duration;

/// The kinds come from weft-api's registry; this crate adds kubectl's words for them and the printers
/// (`table::Tabular`, `describe`).
pub use weft_api::kind::Kind;
pub use weft_api::with_kind;

/// kubectl's names for a kind, from the registry.
pub trait KindNames: Sized {
    /// A resource name on the command line (`svc`, `deployments.apps`, `Pod`).
    fn parse(s: &str) -> anyhow::Result<Self>;
    /// The resource name in kubectl's messages: `services`, `deployments.apps`.
    fn plural(self) -> String;
    /// kubectl's word in `service "x" deleted` and `deployment.apps/x scaled`.
    fn word(self) -> String;
}

impl KindNames for Kind {
    fn parse(s: &str) -> anyhow::Result<Kind> {
        Kind::from_resource(s).ok_or_else(|| anyhow!("the server doesn't have a resource type {s:?}"))
    }
    fn plural(self) -> String {
        self.info().qualified_resource()
    }
    fn word(self) -> String {
        self.info().qualified_singular()
    }
}

/// What `kubectl get all` lists, in its order.
pub const GET_ALL: [Kind; 6] =
    [Kind::Pod, Kind::ReplicationController, Kind::Service, Kind::DaemonSet, Kind::Deployment, Kind::ReplicaSet];

/// One kind and the names a command gave for it (none: every object of the kind, or those `-l` selects).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub kind: Kind,
    pub names: Vec<String>,
}

/// kubectl's resource arguments: `KIND[,KIND...] [NAME...]` or `KIND/NAME...` (kinds may repeat: each gets its
/// names, in the order given). `all` expands to kubectl's `all` category.
pub fn parse_targets(args: &[String]) -> anyhow::Result<Vec<Target>> {
    let Some(first) = args.first() else {
        bail!("You must specify the type of resource to get. Use \"weft get all\" for the common kinds.");
    };
    if args.iter().any(|a| a.contains('/')) {
        let mut targets: Vec<Target> = Vec::new();
        for a in args {
            let Some((kind, name)) = a.split_once('/') else {
                bail!("there is no need to specify a resource type as a separate argument when passing arguments in resource/name form (e.g. 'weft get resource/<resource_name>' instead of 'weft get resource resource/<resource_name>'");
            };
            if name.is_empty() || name.contains('/') {
                bail!("arguments in resource/name form must have a single resource and name");
            }
            let kind = Kind::parse(kind)?;
            match targets.iter_mut().find(|t| t.kind == kind) {
                Some(t) => t.names.push(name.to_string()),
                None => targets.push(Target { kind, names: vec![name.to_string()] }),
            }
        }
        return Ok(targets);
    }
    let mut kinds = Vec::new();
    for k in first.split(',').filter(|k| !k.is_empty()) {
        if k == "all" {
            kinds.extend(GET_ALL);
        } else {
            kinds.push(Kind::parse(k)?);
        }
    }
    kinds.dedup();
    let names = args[1..].to_vec();
    Ok(kinds.into_iter().map(|kind| Target { kind, names: names.clone() }).collect())
}

/// kubectl's refusal of names together with `-l` (or `--all`), worded as it words it for each form of argument.
pub fn names_and_selector(args: &[String]) -> &'static str {
    if args.iter().any(|a| a.contains('/')) {
        "selectors and the all flag cannot be used when passing resource/name arguments"
    } else {
        "name cannot be provided when a selector is specified"
    }
}

/// kubectl's `resource.group/name` for messages: `deployment.apps/nginx-deployment`.
pub fn object_name(kind: Kind, name: &str) -> String {
    format!("{}/{name}", kind.word())
}

/// kubectl's error for a missing object: `Error from server (NotFound): deployments.apps "x" not found`.
pub fn not_found(kind: Kind, name: &str) -> anyhow::Error {
    anyhow!("Error from server (NotFound): {} {name:?} not found", kind.plural())
}

pub(crate) fn now() -> Timestamp {
    weft_api::store::now_timestamp()
}

pub(crate) async fn open(etcd: &EtcdArgs) -> anyhow::Result<Store> {
    Ok(Store::new(weft_api::connect(etcd).await?))
}

/// The namespace a command works in: `-n`, else `default`.
pub fn namespace_of(ns: &Option<String>) -> String {
    ns.clone().filter(|n| !n.is_empty()).unwrap_or_else(|| "default".into())
}

/// Reads, changes and writes back one object with compare-and-swap, retrying on conflict as kubectl's patches
/// effectively do. `change` returns `Ok(false)` when there is nothing to write.
pub async fn update_with<K: Object>(
    store: &Store,
    namespace: Option<&str>,
    name: &str,
    mut change: impl FnMut(&mut K) -> anyhow::Result<bool>,
) -> anyhow::Result<Option<K>> {
    for _ in 0..20 {
        let mut obj: K = store.get(namespace, name).await?;
        if !change(&mut obj)? {
            return Ok(None);
        }
        match store.update(&obj).await {
            Ok(o) => return Ok(Some(o)),
            Err(e) if e.is_conflict() => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(anyhow!("{}/{name}: gave up after repeated conflicts", K::KIND.to_lowercase()))
}

/// `kubernetes.io/change-cause`, as `--record` writes it: the command line that made the change.
pub const CHANGE_CAUSE: &str = "kubernetes.io/change-cause";

/// The command line as `--record` records it: `weft set image deployment/x c=img --record=true`.
pub fn command_line() -> String {
    let mut args = std::env::args();
    let prog = args
        .next()
        .map(|a| std::path::Path::new(&a).file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or(a))
        .unwrap_or_else(|| "weft".into());
    std::iter::once(prog).chain(args).collect::<Vec<_>>().join(" ")
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
    weft_api::with_object!(obj, o => is_namespaced(o))
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
        other => weft_api::with_object!(other, o => apply_generic(store, o).await),
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
                    .map_err(|errors| service::Error::Invalid { key: weft_api::ObjectKey::of(svc), errors })?;
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

/// `weft get`; the exit code is 1 when a named object was not found (the others are still printed).
pub async fn get(args: GetArgs) -> anyhow::Result<i32> {
    let store = open(&args.etcd).await?;
    let mut out = std::io::stdout();
    get_to(&store, &args, &mut out).await
}

/// One kind's objects as `get` found them.
struct Found {
    kind: Kind,
    table: Table,
    values: Vec<Value>,
    names: Vec<String>,
}

pub async fn get_to(store: &Store, args: &GetArgs, out: &mut dyn Write) -> anyhow::Result<i32> {
    let targets = parse_targets(&args.args)?;
    let selector = args.selector.as_deref().map(Selector::parse).transpose()?;
    let named = targets.iter().any(|t| !t.names.is_empty());
    if named && args.all_namespaces {
        bail!("a resource cannot be retrieved by name across all namespaces");
    }
    if named && selector.is_some() {
        bail!("{}", names_and_selector(&args.args));
    }
    if args.watch || args.watch_only {
        let [target] = targets.as_slice() else {
            bail!("watch is only supported on individual resources and resource collections, but {} resource types were found", targets.len());
        };
        return with_kind!(target.kind, K => watch_kind::<K>(store, args, target, selector.as_ref(), out).await);
    }
    let ns = namespace_of(&args.namespace);
    let several_kinds = targets.len() > 1;
    let mut code = 0;
    let mut found = Vec::new();
    for t in &targets {
        let f = with_kind!(t.kind, K => find::<K>(store, args, t, selector.as_ref(), several_kinds, &mut code).await?);
        found.push(f);
    }
    let single = targets.len() == 1 && targets[0].names.len() == 1;
    let total: usize = found.iter().map(|f| f.values.len()).sum();
    if total == 0 {
        if code == 0 {
            let namespaced = targets.iter().any(|t| t.kind.namespaced());
            if namespaced && !args.all_namespaces {
                eprintln!("No resources found in {ns} namespace.");
            } else {
                eprintln!("No resources found");
            }
        }
        return Ok(code);
    }
    match args.output {
        Some(Output::Yaml) | Some(Output::Json) => {
            let values: Vec<Value> = found.into_iter().flat_map(|f| f.values).collect();
            let doc = if single && values.len() == 1 {
                values.into_iter().next().unwrap_or_default()
            } else {
                serde_json::json!({"apiVersion": "v1", "kind": "List", "items": values, "metadata": {"resourceVersion": ""}})
            };
            if args.output == Some(Output::Yaml) {
                out.write_all(serde_norway::to_string(&doc)?.as_bytes())?;
            } else {
                out.write_all(format!("{}\n", serde_json::to_string_pretty(&doc)?).as_bytes())?;
            }
        }
        Some(Output::Name) => {
            for f in &found {
                for n in &f.names {
                    writeln!(out, "{}", object_name(f.kind, n))?;
                }
            }
        }
        _ => {
            let mut first = true;
            for f in found.iter().filter(|f| !f.table.rows.is_empty()) {
                if !first {
                    writeln!(out)?;
                }
                first = false;
                out.write_all(TableWriter::default().write(&f.table, !args.no_headers).as_bytes())?;
            }
        }
    }
    Ok(code)
}

fn columns<K: Object>(args: &GetArgs, kind: Kind, prefix: bool) -> Columns {
    Columns {
        wide: args.output == Some(Output::Wide),
        namespace: args.all_namespaces && K::NAMESPACED,
        kind_prefix: prefix.then_some(kind),
    }
}

/// The table of `items`, with a LABELS column for `--show-labels`.
fn table_of<K: Object + Tabular>(items: &[K], args: &GetArgs, cols: Columns) -> Table {
    let mut table = K::table(items, cols, now());
    if args.show_labels {
        table.headers.push("LABELS".into());
        for (row, o) in table.rows.iter_mut().zip(items) {
            row.push(crate::table::format_labels(o.metadata().labels.as_ref()));
        }
    }
    table
}

async fn find<K: Object + Tabular>(
    store: &Store,
    args: &GetArgs,
    target: &Target,
    selector: Option<&Selector>,
    prefix: bool,
    code: &mut i32,
) -> anyhow::Result<Found> {
    let ns = namespace_of(&args.namespace);
    let mut items: Vec<K> = Vec::new();
    if target.names.is_empty() {
        let scope = if args.all_namespaces { None } else { Some(ns.as_str()) };
        items = store.list::<K>(scope).await?.0;
        if let Some(sel) = selector {
            items.retain(|o| sel.matches(o.metadata().labels.as_ref()));
        }
    } else {
        for name in &target.names {
            match store.get::<K>(Some(&ns), name).await {
                Ok(o) => items.push(o),
                Err(e) if e.is_not_found() => {
                    eprintln!("{}", not_found(target.kind, name));
                    *code = 1;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    let table = table_of(&items, args, columns::<K>(args, target.kind, prefix));
    let values = items.iter().map(serde_json::to_value).collect::<Result<_, _>>()?;
    let names = items.iter().map(|o| o.metadata().name.clone().unwrap_or_default()).collect();
    Ok(Found { kind: target.kind, table, values, names })
}

/// `get -w`: the list (unless --watch-only), then a line (or document) per change from the store's watch, until
/// the process is interrupted or the watch breaks. An object that stops matching `-l` is printed once more, as
/// the API server's watch reports it deleted. `--output-watch-events` adds an EVENT column (ADDED, MODIFIED,
/// DELETED).
async fn watch_kind<K: Object + Tabular>(
    store: &Store,
    args: &GetArgs,
    target: &Target,
    selector: Option<&Selector>,
    out: &mut dyn Write,
) -> anyhow::Result<i32> {
    let ns = namespace_of(&args.namespace);
    let scope = if args.all_namespaces { None } else { Some(ns.as_str()) };
    let (listed, revision) = store.list::<K>(scope).await?;
    let wanted = |o: &K| target.names.is_empty() || target.names.iter().any(|n| o.metadata().name.as_ref() == Some(n));
    let selected = |o: &K| selector.is_none_or(|s| s.matches(o.metadata().labels.as_ref()));
    let initial: Vec<K> = listed.into_iter().filter(|o| wanted(o) && selected(o)).collect();
    if let Some(missing) = target.names.iter().find(|n| !initial.iter().any(|o| o.metadata().name.as_ref() == Some(n)))
    {
        return Err(not_found(target.kind, missing));
    }
    let key = |o: &K| weft_api::ObjectKey::of(o).to_string();
    let mut shown: std::collections::HashSet<String> = initial.iter().map(key).collect();
    let cols = columns::<K>(args, target.kind, false);
    let mut writer = TableWriter::default();
    let mut header = !args.no_headers;
    let mut print = |o: &K, event: &str, out: &mut dyn Write| -> anyhow::Result<()> {
        match args.output {
            Some(Output::Json) if args.output_watch_events => {
                let ev = serde_json::json!({"type": event, "object": o});
                writeln!(out, "{}", serde_json::to_string_pretty(&ev)?)?
            }
            Some(Output::Json) => writeln!(out, "{}", serde_json::to_string_pretty(o)?)?,
            Some(Output::Yaml) if args.output_watch_events => {
                let ev = serde_json::json!({"type": event, "object": o});
                write!(out, "---\n{}", serde_norway::to_string(&ev)?)?
            }
            Some(Output::Yaml) => write!(out, "---\n{}", serde_norway::to_string(o)?)?,
            Some(Output::Name) => {
                writeln!(out, "{}", object_name(target.kind, o.metadata().name.as_deref().unwrap_or("")))?
            }
            _ => {
                let mut table = table_of(std::slice::from_ref(o), args, cols);
                if args.output_watch_events {
                    table.headers.insert(0, "EVENT".into());
                    table.rows.iter_mut().for_each(|r| r.insert(0, event.to_string()));
                }
                out.write_all(writer.write(&table, header).as_bytes())?;
                header = false;
            }
        }
        out.flush()?;
        Ok(())
    };
    if !args.watch_only {
        for o in &initial {
            print(o, "ADDED", out)?;
        }
    }
    let mut watch = store.watch::<K>(scope, revision + 1).await?;
    loop {
        let event = watch.next().await?;
        let obj = event.object();
        if !wanted(obj) {
            continue;
        }
        let k = key(obj);
        let was_shown = shown.contains(&k);
        let (show, kind) = match &event {
            WatchEvent::Deleted(_) => (was_shown, "DELETED"),
            _ if selected(obj) => (true, if was_shown { "MODIFIED" } else { "ADDED" }),
            _ => (was_shown, "DELETED"),
        };
        if kind == "DELETED" {
            shown.remove(&k);
        } else {
            shown.insert(k);
        }
        if show {
            print(obj, kind, out)?;
        }
    }
}

// ---- delete ----

/// `weft delete`; the exit code is 1 when a named object was not found.
pub async fn delete(args: DeleteArgs) -> anyhow::Result<i32> {
    let store = open(&args.etcd).await?;
    delete_to(&store, &args, &mut std::io::stdout()).await
}

/// What `delete` will delete: kind, namespace, name.
type Doomed = (Kind, Option<String>, String);

pub async fn delete_to(store: &Store, args: &DeleteArgs, out: &mut dyn Write) -> anyhow::Result<i32> {
    let mut targets: Vec<Doomed> = Vec::new();
    let ns = namespace_of(&args.namespace);
    if !args.filenames.is_empty() {
        if !args.args.is_empty() {
            bail!("give either KIND NAME... or -f FILE, not both");
        }
        let mut docs = manifest::load(&args.filenames)?;
        set_namespaces(&mut docs, args.namespace.as_deref())?;
        for d in docs {
            let kind = d.object.kind();
            let meta = d.object.metadata();
            targets.push((kind, meta.namespace.clone(), meta.name.clone().unwrap_or_default()));
        }
    } else {
        if args.args.is_empty() {
            bail!("You must provide one or more resources by argument or filename.");
        }
        let selector = args.selector.as_deref().map(Selector::parse).transpose()?;
        for t in parse_targets(&args.args)? {
            if t.names.is_empty() {
                if selector.is_none() && !args.all {
                    bail!("resource(s) were provided, but no name was specified");
                }
                let names = with_kind!(t.kind, K => list_names::<K>(store, t.kind.namespaced().then_some(ns.as_str()), selector.as_ref()).await?);
                targets.extend(names.into_iter().map(|n| (t.kind, Some(ns.clone()), n)));
            } else {
                if selector.is_some() || args.all {
                    bail!("{}", names_and_selector(&args.args));
                }
                targets.extend(t.names.iter().map(|n| (t.kind, Some(ns.clone()), n.clone())));
            }
        }
        if targets.is_empty() {
            writeln!(out, "No resources found")?;
            return Ok(0);
        }
    }
    let mut code = 0;
    let mut deleted = Vec::new();
    for (kind, ns, name) in targets {
        let ns = ns.as_deref().filter(|_| kind.namespaced());
        match delete_one(store, kind, ns, &name, args.cascade).await {
            Ok(uid) => {
                writeln!(out, "{} {name:?} deleted", kind.word())?;
                out.flush()?;
                deleted.push((kind, ns.map(str::to_string), name, uid));
            }
            Err(e) if is_not_found(&e) => {
                if !args.ignore_not_found {
                    eprintln!("{}", not_found(kind, &name));
                    code = 1;
                }
            }
            Err(e) => return Err(e),
        }
    }
    if args.wait {
        let timeout = if args.timeout.is_zero() { Duration::from_secs(7 * 24 * 3600) } else { args.timeout };
        let deadline = tokio::time::Instant::now() + timeout;
        for (kind, ns, name, uid) in deleted {
            with_kind!(kind, K => wait_gone::<K>(store, kind, ns.as_deref(), &name, &uid, deadline).await?);
        }
    }
    Ok(code)
}

pub(crate) async fn list_names<K: Object>(
    store: &Store,
    ns: Option<&str>,
    selector: Option<&Selector>,
) -> anyhow::Result<Vec<String>> {
    let (items, _) = store.list::<K>(ns).await?;
    Ok(items
        .into_iter()
        .filter(|o| selector.is_none_or(|s| s.matches(o.metadata().labels.as_ref())))
        .filter_map(|o| o.metadata().name.clone())
        .collect())
}

/// Finalizers the garbage collector acts on, as Kubernetes names them.
pub const FOREGROUND_FINALIZER: &str = "foregroundDeletion";
pub const ORPHAN_FINALIZER: &str = "orphan";

/// Deletes one object the way the API server does for the given propagation policy and returns its uid.
async fn delete_one(
    store: &Store,
    kind: Kind,
    ns: Option<&str>,
    name: &str,
    cascade: Cascade,
) -> anyhow::Result<String> {
    with_kind!(kind, K => delete_typed::<K>(store, kind, ns, name, cascade).await)
}

async fn delete_typed<K: Object>(
    store: &Store,
    kind: Kind,
    ns: Option<&str>,
    name: &str,
    cascade: Cascade,
) -> anyhow::Result<String> {
    let uid = store.get::<K>(ns, name).await?.metadata().uid.clone().unwrap_or_default();
    match cascade {
        Cascade::Background => {
            // An object with finalizers is only marked; whoever removes the last finalizer deletes it.
            let marked = update_with::<K>(store, ns, name, |o| Ok(mark_if_finalized(o.metadata_mut()))).await?;
            if marked.is_none() && !being_deleted::<K>(store, ns, name).await? {
                remove(store, kind, ns, name).await?;
            }
        }
        Cascade::Foreground => {
            update_with::<K>(store, ns, name, |o| Ok(mark(o.metadata_mut(), FOREGROUND_FINALIZER))).await?;
        }
        Cascade::Orphan => {
            // The orphan finalizer first, so that the garbage collector finishes the job if this process dies.
            update_with::<K>(store, ns, name, |o| Ok(mark(o.metadata_mut(), ORPHAN_FINALIZER))).await?;
            let finish = async {
                orphan_dependents(store, ns, &uid).await?;
                update_with::<K>(store, ns, name, |o| {
                    let fins = o.metadata_mut().finalizers.get_or_insert_with(Vec::new);
                    let before = fins.len();
                    fins.retain(|f| f != ORPHAN_FINALIZER);
                    Ok(fins.len() != before)
                })
                .await?;
                let now: K = store.get(ns, name).await?;
                if now.metadata().finalizers.as_ref().is_none_or(Vec::is_empty) {
                    remove(store, kind, ns, name).await?;
                }
                anyhow::Ok(())
            };
            // A running garbage collector may finish the orphaning (and delete the owner) before we do.
            if let Err(e) = finish.await {
                let gone = e.chain().any(|c| c.downcast_ref::<StoreError>().is_some_and(StoreError::is_not_found));
                if !gone {
                    return Err(e);
                }
            }
        }
    }
    Ok(uid)
}

/// Sets deletionTimestamp if the object has finalizers and is not yet being deleted; true if it changed.
fn mark_if_finalized(meta: &mut weft_api::ObjectMeta) -> bool {
    if meta.finalizers.as_ref().is_none_or(Vec::is_empty) || meta.deletion_timestamp.is_some() {
        return false;
    }
    meta.deletion_timestamp = Some(weft_api::store::now());
    true
}

/// Sets deletionTimestamp (once) and adds `finalizer` (once); true if anything changed.
fn mark(meta: &mut weft_api::ObjectMeta, finalizer: &str) -> bool {
    let mut changed = false;
    if meta.deletion_timestamp.is_none() {
        meta.deletion_timestamp = Some(weft_api::store::now());
        changed = true;
    }
    let fins = meta.finalizers.get_or_insert_with(Vec::new);
    if !fins.iter().any(|f| f == finalizer) {
        fins.push(finalizer.to_string());
        changed = true;
    }
    changed
}

async fn being_deleted<K: Object>(store: &Store, ns: Option<&str>, name: &str) -> anyhow::Result<bool> {
    let o: K = store.get(ns, name).await?;
    Ok(o.metadata().deletion_timestamp.is_some() && o.metadata().finalizers.as_ref().is_some_and(|f| !f.is_empty()))
}

/// Deletes the object now (a Service releases its ClusterIP and NodePorts in the same transaction).
async fn remove(store: &Store, kind: Kind, ns: Option<&str>, name: &str) -> anyhow::Result<()> {
    match kind {
        Kind::Service => service::delete(store, ns, name, None).await.map(drop).map_err(Into::into),
        other => with_kind!(other, K => store.delete::<K>(ns, name, None).await.map(drop).map_err(Into::into)),
    }
}

/// Kinds that can be dependents (carry ownerReferences).
const DEPENDENT_KINDS: [Kind; 7] = [
    Kind::Pod,
    Kind::ReplicaSet,
    Kind::ReplicationController,
    Kind::Deployment,
    Kind::DaemonSet,
    Kind::Service,
    Kind::Endpoints,
];

/// Removes the ownerReferences naming `owner_uid` from every object in the owner's namespace (every namespace for
/// a cluster-scoped owner). Returns how many objects were released.
pub async fn orphan_dependents(store: &Store, ns: Option<&str>, owner_uid: &str) -> anyhow::Result<usize> {
    let mut released = 0;
    for kind in DEPENDENT_KINDS {
        released += with_kind!(kind, K => release::<K>(store, ns, owner_uid).await?);
    }
    Ok(released)
}

async fn release<K: Object>(store: &Store, ns: Option<&str>, owner_uid: &str) -> anyhow::Result<usize> {
    let (items, _) = store.list::<K>(ns).await?;
    let mut released = 0;
    for o in items.iter().filter(|o| owns(o.metadata(), owner_uid)) {
        let key = weft_api::ObjectKey::of(o);
        let changed = update_with::<K>(store, key.namespace.as_deref(), &key.name, |o| {
            Ok(without_owner(o.metadata_mut(), owner_uid))
        })
        .await;
        match changed {
            Ok(Some(_)) => released += 1,
            Ok(None) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(released)
}

fn owns(meta: &weft_api::ObjectMeta, owner_uid: &str) -> bool {
    meta.owner_references.iter().flatten().any(|r| r.uid == owner_uid)
}

/// Drops the ownerReferences naming `owner_uid`; true if there were any.
pub fn without_owner(meta: &mut weft_api::ObjectMeta, owner_uid: &str) -> bool {
    let Some(refs) = meta.owner_references.as_mut() else { return false };
    let before = refs.len();
    refs.retain(|r| r.uid != owner_uid);
    let changed = refs.len() != before;
    if refs.is_empty() {
        meta.owner_references = None;
    }
    changed
}

/// Waits until the object is gone (or replaced by one with another uid), as `kubectl delete --wait` does.
async fn wait_gone<K: Object>(
    store: &Store,
    kind: Kind,
    ns: Option<&str>,
    name: &str,
    uid: &str,
    deadline: tokio::time::Instant,
) -> anyhow::Result<()> {
    loop {
        match store.get::<K>(ns, name).await {
            Err(e) if e.is_not_found() => return Ok(()),
            Err(e) => return Err(e.into()),
            Ok(o) if o.metadata().uid.as_deref() != Some(uid) => return Ok(()),
            Ok(_) => {}
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out waiting for the condition on {}/{name}", kind.plural());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub(crate) fn is_not_found(e: &anyhow::Error) -> bool {
    e.downcast_ref::<weft_api::store::Error>().is_some_and(|e| e.is_not_found())
        || e.downcast_ref::<service::Error>().is_some_and(|e| e.is_not_found())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn resource_arguments_read_as_kubectl_reads_them() {
        let t = |v: &[&str]| parse_targets(&strings(v)).map_err(|e| e.to_string());
        assert_eq!(
            t(&["svc,ep"]).unwrap(),
            [Target { kind: Kind::Service, names: vec![] }, Target { kind: Kind::Endpoints, names: vec![] }]
        );
        assert_eq!(t(&["deploy", "a", "b"]).unwrap(), [Target { kind: Kind::Deployment, names: strings(&["a", "b"]) }]);
        assert_eq!(
            t(&["deployment/nginx", "rs/x", "deployments.apps/web"]).unwrap(),
            [
                Target { kind: Kind::Deployment, names: strings(&["nginx", "web"]) },
                Target { kind: Kind::ReplicaSet, names: strings(&["x"]) }
            ]
        );
        assert_eq!(t(&["rc"]).unwrap()[0].kind, Kind::ReplicationController);
        assert_eq!(t(&["all"]).unwrap().len(), 6);
        assert!(t(&["deploy", "deploy/x"]).unwrap_err().contains("resource/name form"));
        assert!(t(&["widgets"]).unwrap_err().contains("doesn't have a resource type \"widgets\""));
    }

    #[test]
    fn cascade_and_durations_parse_as_kubectl_does() {
        assert_eq!(parse_cascade("orphan"), Ok(Cascade::Orphan));
        assert_eq!(parse_cascade("false"), Ok(Cascade::Orphan));
        assert_eq!(parse_cascade("true"), Ok(Cascade::Background));
        assert_eq!(parse_cascade("foreground"), Ok(Cascade::Foreground));
        assert!(parse_cascade("sideways").is_err());
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert!(parse_duration("2").is_err(), "Go wants a unit");
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn deletion_marks_and_releases() {
        let mut meta = weft_api::ObjectMeta::default();
        assert!(!mark_if_finalized(&mut meta), "no finalizers: deleted outright");
        assert!(mark(&mut meta, FOREGROUND_FINALIZER));
        assert!(meta.deletion_timestamp.is_some());
        assert!(!mark(&mut meta, FOREGROUND_FINALIZER), "marking twice changes nothing");
        assert_eq!(meta.finalizers.as_deref(), Some(&[FOREGROUND_FINALIZER.to_string()][..]));

        let owner = |uid: &str| k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
            api_version: "apps/v1".into(),
            kind: "ReplicaSet".into(),
            name: "rs".into(),
            uid: uid.into(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        };
        let mut pod =
            weft_api::ObjectMeta { owner_references: Some(vec![owner("a"), owner("b")]), ..Default::default() };
        assert!(without_owner(&mut pod, "a"));
        assert_eq!(pod.owner_references.as_ref().map(Vec::len), Some(1));
        assert!(!without_owner(&mut pod, "a"));
        assert!(without_owner(&mut pod, "b"));
        assert_eq!(pod.owner_references, None, "no empty list is left behind");
    }
}
