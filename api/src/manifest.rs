//! Manifests as `kubectl apply -f` reads them: files, directories or stdin holding multi-document YAML or JSON
//! (a `kind: List` too), decoded by apiVersion/kind into typed objects, older group versions converted first.
//! Everything is parsed and checked before the caller writes anything; this module never touches etcd.

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::{Metadata, Resource};
use serde::Deserialize;
use serde_json::Value;

use crate::kind::Kind;
use crate::service::{self, ServiceRanges};
use crate::workload;

/// Where a document came from: `file` and its 0-based index, plus `items[i]` inside a List.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub file: String,
    pub index: usize,
    pub item: Option<usize>,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (document {})", self.file, self.index)?;
        if let Some(i) = self.item {
            write!(f, " items[{i}]")?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading {path}")]
    Read { path: String, source: std::io::Error },
    #[error("{source_}: not valid YAML or JSON")]
    Syntax { source_: Source, source: serde_norway::Error },
    #[error("{source_}: {field}: {problem}")]
    Document { source_: Source, field: String, problem: String },
    #[error("{source_}: {kind} {name:?}: {errors}")]
    Invalid { source_: Source, kind: &'static str, name: String, errors: service::FieldErrors },
    #[error("no objects in {0}")]
    Empty(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Every kind `weft apply` knows, as its current version's type: the registry's enum.
pub use crate::kind::AnyObject;

/// kubectl's `resource[.group]/name` of a typed object, e.g. `deployment.apps/web`.
pub fn display_name<K: Resource + Metadata<Ty = ObjectMeta>>(o: &K) -> String {
    let kind = K::KIND.to_lowercase();
    let name = o.metadata().name.clone().unwrap_or_default();
    if K::GROUP.is_empty() {
        format!("{kind}/{name}")
    } else {
        format!("{kind}.{}/{name}", K::GROUP)
    }
}

/// One decoded object and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    pub source: Source,
    pub object: AnyObject,
    /// Fields the manifest has that the type does not know (typos, or fields of a newer version), as paths.
    pub unknown_fields: Vec<String>,
}

/// Reads `-f` arguments: files, directories (their `.yaml`, `.yml` and `.json` files, sorted), or `-` for stdin.
pub fn load(paths: &[PathBuf]) -> Result<Vec<Document>> {
    let mut docs = Vec::new();
    for path in paths {
        if path.as_os_str() == "-" {
            let mut text = String::new();
            std::io::stdin().read_to_string(&mut text).map_err(|source| Error::Read { path: "-".into(), source })?;
            docs.extend(parse("<stdin>", &text)?);
        } else if path.is_dir() {
            for file in manifest_files(path)? {
                docs.extend(parse_file(&file)?);
            }
        } else {
            docs.extend(parse_file(path)?);
        }
    }
    if docs.is_empty() {
        let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
        return Err(Error::Empty(names.join(", ")));
    }
    Ok(docs)
}

fn manifest_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let read = |source| Error::Read { path: dir.display().to_string(), source };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read)? {
        let path = entry.map_err(read)?.path();
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        if path.is_file() && matches!(ext, "yaml" | "yml" | "json") {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

fn parse_file(path: &Path) -> Result<Vec<Document>> {
    let text =
        std::fs::read_to_string(path).map_err(|source| Error::Read { path: path.display().to_string(), source })?;
    parse(&path.display().to_string(), &text)
}

/// Parses one file's text: YAML documents separated by `---`, or JSON (a JSON document is YAML too).
pub fn parse(file: &str, text: &str) -> Result<Vec<Document>> {
    let mut docs = Vec::new();
    for (index, de) in serde_norway::Deserializer::from_str(text).enumerate() {
        let source = Source { file: file.to_string(), index, item: None };
        let value = Value::deserialize(de).map_err(|e| Error::Syntax { source_: source.clone(), source: e })?;
        if value.is_null() {
            continue; // an empty document, e.g. a trailing `---`
        }
        if value.get("kind").and_then(Value::as_str) == Some("List") {
            let items = match value.get("items") {
                Some(Value::Array(items)) => items.clone(),
                None | Some(Value::Null) => Vec::new(),
                Some(_) => return Err(doc_error(&source, "items", "must be a list")),
            };
            for (i, item) in items.into_iter().enumerate() {
                let source = Source { item: Some(i), ..source.clone() };
                let (object, unknown_fields) = decode(&source, item)?;
                docs.push(Document { object, unknown_fields, source });
            }
        } else {
            let (object, unknown_fields) = decode(&source, value)?;
            docs.push(Document { object, unknown_fields, source });
        }
    }
    Ok(docs)
}

fn doc_error(source: &Source, field: &str, problem: impl fmt::Display) -> Error {
    Error::Document { source_: source.clone(), field: field.to_string(), problem: problem.to_string() }
}

/// Decodes into `K` (errors carry the field's path) and lists the fields `K` dropped.
fn typed<K: serde::de::DeserializeOwned + serde::Serialize>(source: &Source, value: Value) -> Result<(K, Vec<String>)> {
    let obj: K = serde_path_to_error::deserialize(&value).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." { "(root)".to_string() } else { path };
        doc_error(source, &field, e.into_inner())
    })?;
    let back = serde_json::to_value(&obj).map_err(|e| doc_error(source, "(root)", e))?;
    let mut unknown = Vec::new();
    dropped_fields(&value, &back, "", &mut unknown);
    Ok((obj, unknown))
}

/// Paths present in `input` but not in `output` (the typed object serialized back). Nulls count as absent.
pub fn dropped_fields(input: &Value, output: &Value, path: &str, out: &mut Vec<String>) {
    match (input, output) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                let p = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                match b.get(k) {
                    _ if v.is_null() => {}
                    Some(w) => dropped_fields(v, w, &p, out),
                    None => out.push(p),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            for (i, (v, w)) in a.iter().zip(b).enumerate() {
                dropped_fields(v, w, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

/// Decodes one object by apiVersion and kind; older group versions go through `convert` first.
pub fn decode(source: &Source, value: Value) -> Result<(AnyObject, Vec<String>)> {
    if !value.is_object() {
        return Err(doc_error(source, "(root)", "an object must be a mapping"));
    }
    let api_version = value.get("apiVersion").and_then(Value::as_str).unwrap_or("").to_string();
    let kind = value.get("kind").and_then(Value::as_str).unwrap_or("").to_string();
    if api_version.is_empty() {
        return Err(doc_error(source, "apiVersion", "required"));
    }
    if kind.is_empty() {
        return Err(doc_error(source, "kind", "required"));
    }
    let value = convert(&api_version, &kind, value);
    let api_version = value.get("apiVersion").and_then(Value::as_str).unwrap_or("");
    let Some(k) = Kind::from_api(api_version, &kind) else {
        let known: Vec<String> = Kind::ALL.iter().map(|k| format!("{} {}", k.api_version(), k.name())).collect();
        return Err(doc_error(
            source,
            "kind",
            format!("no kind {kind:?} is registered for version {api_version:?} (known: {})", known.join(", ")),
        ));
    };
    let obj = crate::with_kind!(k, K => typed::<K>(source, value).map(|(o, u)| (AnyObject::from(o), u))?);
    Ok(obj)
}

/// Brings an older group version up to the one we store, as the API server's defaulting and conversion do (the
/// defaults are those of the version the manifest names, so an `extensions/v1beta1` Deployment keeps its old
/// rolling-update defaults). v1 ReplicationControllers get the defaults v1 gives them. Unknown pairs are returned
/// unchanged (and refused by `decode`).
pub fn convert(api_version: &str, kind: &str, mut value: Value) -> Value {
    if (api_version, kind) == ("v1", "ReplicationController") {
        default_from_template_labels(&mut value, |labels| labels.clone());
        return value;
    }
    let old_workload = matches!(api_version, "extensions/v1beta1" | "apps/v1beta1" | "apps/v1beta2")
        && matches!(kind, "Deployment" | "ReplicaSet" | "DaemonSet");
    if !old_workload {
        return value;
    }
    value["apiVersion"] = Value::from("apps/v1");
    // apps/v1 requires a selector; the old versions defaulted it (and the object's labels) from the template's.
    default_from_template_labels(&mut value, |labels| serde_json::json!({ "matchLabels": labels.clone() }));
    let Some(spec) = value.get_mut("spec").and_then(Value::as_object_mut) else { return value };
    // Fields apps/v1 dropped.
    spec.remove("rollbackTo");
    spec.remove("templateGeneration");
    let unset = |spec: &serde_json::Map<String, Value>, k: &str| spec.get(k).is_none_or(Value::is_null);
    match (api_version, kind) {
        ("extensions/v1beta1", "Deployment") => {
            // extensions/v1beta1 defaulted to surge 1 / unavailable 1, kept every old ReplicaSet and never timed out.
            let strategy = spec.entry("strategy").or_insert_with(|| serde_json::json!({}));
            if let Some(st) = strategy.as_object_mut() {
                if st.get("type").is_none_or(Value::is_null) {
                    st.insert("type".into(), Value::from("RollingUpdate"));
                }
                if st.get("type").and_then(Value::as_str) == Some("RollingUpdate") {
                    let ru = st.entry("rollingUpdate").or_insert_with(|| serde_json::json!({}));
                    if let Some(ru) = ru.as_object_mut() {
                        ru.entry("maxSurge").or_insert(Value::from(1));
                        ru.entry("maxUnavailable").or_insert(Value::from(1));
                    }
                }
            }
            for field in ["revisionHistoryLimit", "progressDeadlineSeconds"] {
                if unset(spec, field) {
                    spec.insert(field.into(), Value::from(i32::MAX));
                }
            }
        }
        ("apps/v1beta1", "Deployment") if unset(spec, "revisionHistoryLimit") => {
            spec.insert("revisionHistoryLimit".into(), Value::from(2));
        }
        // extensions/v1beta1 DaemonSets were updated only when their pods were deleted.
        ("extensions/v1beta1", "DaemonSet") if unset(spec, "updateStrategy") => {
            spec.insert("updateStrategy".into(), serde_json::json!({"type": "OnDelete"}));
        }
        _ => {}
    }
    value
}

/// Sets `spec.selector` (as `make(labels)`) and `metadata.labels` from the template's labels where they are absent
/// or empty, as the old versions' (and v1 ReplicationController's) defaulting does.
fn default_from_template_labels(value: &mut Value, make: impl Fn(&Value) -> Value) {
    let labels = value
        .get("spec")
        .and_then(|s| s.get("template"))
        .and_then(|t| t.get("metadata"))
        .and_then(|m| m.get("labels"))
        .filter(|l| l.as_object().is_some_and(|o| !o.is_empty()))
        .cloned();
    let Some(labels) = labels else { return };
    let empty = |v: Option<&Value>| v.is_none_or(|v| v.is_null() || v.as_object().is_some_and(|o| o.is_empty()));
    if let Some(spec) = value.get_mut("spec").and_then(Value::as_object_mut) {
        if empty(spec.get("selector")) {
            spec.insert("selector".into(), make(&labels));
        }
    }
    if let Some(meta) = value.get_mut("metadata").and_then(Value::as_object_mut) {
        if empty(meta.get("labels")) {
            meta.insert("labels".into(), labels);
        }
    }
}

/// kubectl's default strict field validation: a field the type does not know is an error naming it.
pub fn check_unknown_fields(docs: &[Document]) -> Result<()> {
    match docs.iter().find(|d| !d.unknown_fields.is_empty()) {
        Some(d) => Err(doc_error(
            &d.source,
            &d.unknown_fields.join(", "),
            "unknown field (strict decoding; --validate=warn accepts it)",
        )),
        None => Ok(()),
    }
}

/// Checks what the API server would refuse, before anything is written: names, Services in full, and the
/// selectors, templates and containers of Pods and workloads (`workload`).
pub fn validate(docs: &[Document], ranges: &ServiceRanges) -> Result<()> {
    for doc in docs {
        let meta = doc.object.metadata();
        let name = meta.name.clone().unwrap_or_default();
        if name.is_empty() {
            return Err(doc_error(&doc.source, "metadata.name", "required"));
        }
        if !service::is_dns1123_subdomain(&name) {
            return Err(doc_error(&doc.source, "metadata.name", format!("{name:?} must be a DNS-1123 subdomain")));
        }
        if let Some(ns) = meta.namespace.as_deref() {
            if !service::is_dns1123_label(ns) {
                return Err(doc_error(&doc.source, "metadata.namespace", format!("{ns:?} must be a DNS-1123 label")));
            }
        }
        let checked = match &doc.object {
            AnyObject::Service(s) => {
                let mut s = s.clone();
                service::apply_defaults(&mut s);
                service::validate(&s, ranges)
            }
            AnyObject::Pod(p) => workload::validate_pod(p),
            AnyObject::Deployment(d) => workload::validate_deployment(d),
            AnyObject::ReplicaSet(r) => workload::validate_replicaset(r),
            AnyObject::DaemonSet(d) => workload::validate_daemonset(d),
            AnyObject::ReplicationController(r) => workload::validate_replicationcontroller(r),
            AnyObject::Endpoints(_) | AnyObject::Node(_) | AnyObject::Namespace(_) | AnyObject::Lease(_) => Ok(()),
        };
        checked.map_err(|errors| Error::Invalid {
            source_: doc.source.clone(),
            kind: doc.object.kind().name(),
            name: name.clone(),
            errors,
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        let checked = parse("f.yaml", text).and_then(|d| {
            check_unknown_fields(&d)?;
            validate(&d, &ServiceRanges::default())
        });
        match checked {
            Ok(()) => String::new(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn multi_document_yaml_and_json_lists() {
        let docs = parse(
            "a.yaml",
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\n---\napiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: 80}]}\n",
        )
        .unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[0].object.display_name(), "namespace/a");
        assert_eq!(docs[1].object.display_name(), "service/s");
        assert_eq!(docs[1].source.index, 2, "empty documents still count");
        let json = r#"{"apiVersion":"v1","kind":"List","items":[{"apiVersion":"v1","kind":"Pod","metadata":{"name":"p"}},{"apiVersion":"v1","kind":"Endpoints","metadata":{"name":"e"}}]}"#;
        let docs = parse("l.json", json).unwrap();
        assert_eq!(docs.iter().map(|d| d.object.kind().name()).collect::<Vec<_>>(), ["Pod", "Endpoints"]);
        assert_eq!(docs[1].source.to_string(), "l.json (document 0) items[1]");
    }

    #[test]
    fn bad_manifests_name_document_field_and_problem() {
        let cases: &[(&str, &str)] = &[
            ("apiVersion: v1\nkind: Pod\nmetadata: {name: ok}\nspec: {containers: [{name: c, image: nginx}]}\n", ""),
            ("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n", "f.yaml (document 0): Pod \"p\": spec.containers: Required value"),
            (
                "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\nspec:\n  selector: {matchLabels: {app: db}}\n  template:\n    metadata: {labels: {app: web}}\n    spec: {containers: [{name: c, image: nginx}]}\n",
                "f.yaml (document 0): Deployment \"d\": spec.template.metadata.labels: Invalid value: map[string]string{\"app\":\"web\"}: `selector` does not match template `labels`",
            ),
            (
                "apiVersion: extensions/v1beta1\nkind: ReplicaSet\nmetadata: {name: r}\nspec:\n  selector: {matchExpressions: [{key: tier, operator: In}]}\n  template:\n    metadata: {labels: {tier: fe}}\n    spec: {containers: [{name: c, image: nginx}]}\n",
                "f.yaml (document 0): ReplicaSet \"r\": spec.selector.matchExpressions[0].values: Required value",
            ),
            (
                "apiVersion: v1\nkind: ReplicationController\nmetadata: {name: r}\nspec:\n  selector: {app: db}\n  template:\n    metadata: {labels: {app: web}}\n    spec: {containers: [{name: c, image: nginx}]}\n",
                "f.yaml (document 0): ReplicationController \"r\": spec.template.metadata.labels: Invalid value",
            ),
            (
                "apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {name: d}\nspec:\n  selector: {matchLabels: {app: x}}\n  template:\n    metadata: {labels: {app: x}}\n    spec: {containers: [{name: c}]}\n",
                "f.yaml (document 0): DaemonSet \"d\": spec.template.spec.containers[0].image: Required value",
            ),
            ("apiVersion: v1\nkind: Widget\nmetadata: {name: w}\n", "f.yaml (document 0): kind: no kind \"Widget\" is registered for version \"v1\""),
            ("kind: Pod\nmetadata: {name: p}\n", "f.yaml (document 0): apiVersion: required"),
            ("apiVersion: v1\nkind: Pod\nmetadata: {}\n", "f.yaml (document 0): metadata.name: required"),
            ("apiVersion: v1\nkind: Pod\nmetadata: {name: Bad_Name}\n", "f.yaml (document 0): metadata.name: \"Bad_Name\" must be a DNS-1123 subdomain"),
            (
                "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec:\n  ports: [{port: eighty}]\n",
                "f.yaml (document 1): spec.ports[0].port: invalid type: string \"eighty\", expected i32",
            ),
            (
                "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec:\n  ports: [{name: a, port: 80}, {name: b, port: 70000}]\n",
                "f.yaml (document 0): Service \"s\": spec.ports[1].port: Invalid value: 70000: must be between 1 and 65535, inclusive",
            ),
            ("apiVersion: v1\nkind: Service\nmetadata: {name: s\n", "f.yaml (document 0): not valid YAML or JSON"),
            ("- 1\n- 2\n", "f.yaml (document 0): (root): an object must be a mapping"),
            (
                "apiVersion: v1\nkind: Service\nmetadata: {name: s, creationTimestamp: null}\nspec:\n  ports: [{port: 80, targetport: 9376}]\n  selector: {}\n",
                "f.yaml (document 0): spec.ports[0].targetport: unknown field",
            ),
        ];
        for (text, want) in cases {
            let got = err(text);
            assert!(
                if want.is_empty() { got.is_empty() } else { got.starts_with(want) },
                "manifest:\n{text}\ngot:  {got}\nwant: {want}"
            );
        }
    }

    #[test]
    fn extensions_v1beta1_deployment_is_converted_with_a_default_selector() {
        let text = "apiVersion: extensions/v1beta1\nkind: Deployment\nmetadata: {name: web}\nspec:\n  replicas: 2\n  rollbackTo: {revision: 1}\n  template:\n    metadata: {labels: {app: web}}\n    spec: {containers: [{name: c, image: nginx}]}\n";
        let docs = parse("d.yaml", text).unwrap();
        let AnyObject::Deployment(d) = &docs[0].object else { panic!("{:?}", docs[0].object) };
        let spec = &d.spec;
        assert_eq!(spec.selector.match_labels.as_ref().unwrap().get("app").map(String::as_str), Some("web"));
        assert_eq!(spec.replicas, Some(2));
        assert_eq!(docs[0].object.display_name(), "deployment.apps/web");
        // extensions/v1beta1's defaults, not apps/v1's, and the object's labels from the template's.
        let v = serde_json::to_value(d).unwrap();
        assert_eq!(
            v["spec"]["strategy"],
            serde_json::json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 1}})
        );
        assert_eq!(v["spec"]["revisionHistoryLimit"], i32::MAX);
        assert_eq!(v["spec"]["progressDeadlineSeconds"], i32::MAX);
        assert_eq!(v["metadata"]["labels"], serde_json::json!({"app": "web"}));
        assert!(docs[0].unknown_fields.is_empty(), "{:?}", docs[0].unknown_fields);
    }

    #[test]
    fn the_seeds_frontend_replicaset_and_a_replication_controller_decode() {
        let frontend = "apiVersion: extensions/v1beta1\nkind: ReplicaSet\nmetadata:\n  name: frontend\nspec:\n  replicas: 3\n  selector:\n    matchLabels:\n      tier: frontend\n    matchExpressions:\n      - {key: tier, operator: In, values: [frontend]}\n  template:\n    metadata:\n      labels:\n        app: guestbook\n        tier: frontend\n    spec:\n      containers:\n      - name: php-redis\n        image: gcr.io/google_samples/gb-frontend:v3\n        resources:\n          requests:\n            cpu: 100m\n            memory: 100Mi\n        ports:\n        - containerPort: 80\n";
        let docs = parse("frontend.yaml", frontend).unwrap();
        check_unknown_fields(&docs).unwrap();
        validate(&docs, &ServiceRanges::default()).unwrap();
        let AnyObject::ReplicaSet(rs) = &docs[0].object else { panic!("{:?}", docs[0].object) };
        assert_eq!(rs.spec.selector.match_expressions.as_ref().unwrap()[0].operator, "In");
        assert_eq!(docs[0].object.display_name(), "replicaset.apps/frontend");

        // A v1 ReplicationController without a selector takes the template's labels, as the API server defaults it.
        let rc = "apiVersion: v1\nkind: ReplicationController\nmetadata: {name: nginx}\nspec:\n  replicas: 3\n  template:\n    metadata: {labels: {app: nginx}}\n    spec: {containers: [{name: nginx, image: nginx}]}\n";
        let docs = parse("rc.yaml", rc).unwrap();
        validate(&docs, &ServiceRanges::default()).unwrap();
        let AnyObject::ReplicationController(rc) = &docs[0].object else { panic!("{:?}", docs[0].object) };
        let selector = rc.spec.as_ref().and_then(|s| s.selector.as_ref()).unwrap();
        assert_eq!(selector.get("app").map(String::as_str), Some("nginx"));
        assert_eq!(docs[0].object.display_name(), "replicationcontroller/nginx");
    }
}
