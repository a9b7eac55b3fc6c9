//! What the API server checks on Pods, Deployments, ReplicaSets, ReplicationControllers and DaemonSets before
//! storing them, as pure functions over the typed object: selectors that parse and match the template's labels,
//! containers with names and images, replicas not negative, restartPolicy Always for controllers. Errors read as
//! the API server's (`spec.selector: Required value`). `manifest::validate` runs them before anything is written.

use std::collections::{BTreeMap, HashSet};

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{Pod, PodSpec, PodTemplateSpec, ReplicationController, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use crate::labels::Selector;
use crate::service::{FieldError, FieldErrors};

fn push(errs: &mut FieldErrors, path: impl Into<String>, message: impl Into<String>) {
    errs.0.push(FieldError { path: path.into(), message: message.into() });
}

fn required(errs: &mut FieldErrors, path: impl Into<String>) {
    push(errs, path, "Required value");
}

/// Go's `%#v` of a label map, as the API server quotes template labels: `map[string]string{"app":"nginx"}`.
fn go_map(labels: Option<&BTreeMap<String, String>>) -> String {
    let pairs: Vec<String> = labels.into_iter().flatten().map(|(k, v)| format!("{k:?}:{v:?}")).collect();
    format!("map[string]string{{{}}}", pairs.join(", "))
}

fn replicas(errs: &mut FieldErrors, replicas: Option<i32>) {
    if let Some(r) = replicas.filter(|r| *r < 0) {
        push(errs, "spec.replicas", format!("Invalid value: {r}: must be greater than or equal to 0"));
    }
}

/// A set-based selector: present, not empty, parses, and selects the template's labels.
fn label_selector(errs: &mut FieldErrors, sel: &LabelSelector, template: Option<&PodTemplateSpec>) {
    if sel.match_labels.as_ref().is_none_or(BTreeMap::is_empty)
        && sel.match_expressions.as_ref().is_none_or(Vec::is_empty)
    {
        push(errs, "spec.selector", "Required value");
        return;
    }
    for (k, v) in sel.match_labels.iter().flatten() {
        label_pair(errs, "spec.selector.matchLabels", k, v);
    }
    for (i, e) in sel.match_expressions.iter().flatten().enumerate() {
        let path = format!("spec.selector.matchExpressions[{i}]");
        if !crate::service::is_label_key(&e.key) {
            push(errs, format!("{path}.key"), format!("Invalid value: {:?}: not a valid label key", e.key));
        }
        let n = e.values.as_ref().map_or(0, Vec::len);
        match e.operator.as_str() {
            "In" | "NotIn" if n == 0 => push(
                errs,
                format!("{path}.values"),
                "Required value: must be specified when `operator` is 'In' or 'NotIn'",
            ),
            "Exists" | "DoesNotExist" if n > 0 => push(
                errs,
                format!("{path}.values"),
                "Forbidden: may not be specified when `operator` is 'Exists' or 'DoesNotExist'",
            ),
            "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
            op => {
                push(errs, format!("{path}.operator"), format!("Invalid value: {op:?}: not a valid selector operator"))
            }
        }
    }
    if !errs.0.is_empty() {
        return;
    }
    if let (Ok(s), Some(t)) = (Selector::from_label_selector(Some(sel)), template) {
        let labels = t.metadata.as_ref().and_then(|m| m.labels.as_ref());
        if !s.matches(labels) {
            push(
                errs,
                "spec.template.metadata.labels",
                format!("Invalid value: {}: `selector` does not match template `labels`", go_map(labels)),
            );
        }
    }
}

fn label_pair(errs: &mut FieldErrors, path: &str, k: &str, v: &str) {
    if !crate::service::is_label_key(k) {
        push(errs, path, format!("Invalid value: {k:?}: not a valid label key"));
    }
    if !crate::service::is_label_value(v) {
        push(errs, path, format!("Invalid value: {v:?}: not a valid label value"));
    }
}

/// Containers (and init containers): at least one, each named (a DNS-1123 label, unique) with an image, ports in range.
fn pod_spec(errs: &mut FieldErrors, path: &str, spec: Option<&PodSpec>, controller: bool) {
    let Some(spec) = spec else {
        required(errs, format!("{path}.containers"));
        return;
    };
    if spec.containers.is_empty() {
        required(errs, format!("{path}.containers"));
    }
    let mut names = HashSet::new();
    let init =
        spec.init_containers.iter().flatten().enumerate().map(|(i, c)| (format!("{path}.initContainers[{i}]"), c));
    let main = spec.containers.iter().enumerate().map(|(i, c)| (format!("{path}.containers[{i}]"), c));
    for (cpath, c) in init.chain(main) {
        if c.name.is_empty() {
            required(errs, format!("{cpath}.name"));
        } else if !crate::service::is_dns1123_label(&c.name) {
            push(
                errs,
                format!("{cpath}.name"),
                format!("Invalid value: {:?}: a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character", c.name),
            );
        } else if !names.insert(c.name.clone()) {
            push(errs, format!("{cpath}.name"), format!("Duplicate value: {:?}", c.name));
        }
        if c.image.as_deref().is_none_or(|i| i.trim().is_empty()) {
            required(errs, format!("{cpath}.image"));
        }
        for (j, p) in c.ports.iter().flatten().enumerate() {
            if !(1..=65535).contains(&p.container_port) {
                push(
                    errs,
                    format!("{cpath}.ports[{j}].containerPort"),
                    format!("Invalid value: {}: must be between 1 and 65535, inclusive", p.container_port),
                );
            }
        }
    }
    if let Some(policy) = spec.restart_policy.as_deref() {
        let supported: &[&str] = if controller { &["Always"] } else { &["Always", "OnFailure", "Never"] };
        if !supported.contains(&policy) {
            let s: Vec<String> = supported.iter().map(|s| format!("{s:?}")).collect();
            push(
                errs,
                format!("{path}.restartPolicy"),
                format!("Unsupported value: {policy:?}: supported values: {}", s.join(", ")),
            );
        }
    }
}

fn template(errs: &mut FieldErrors, t: Option<&PodTemplateSpec>) {
    match t {
        None => required(errs, "spec.template"),
        Some(t) => {
            for (k, v) in t.metadata.as_ref().and_then(|m| m.labels.as_ref()).into_iter().flatten() {
                label_pair(errs, "spec.template.metadata.labels", k, v);
            }
            pod_spec(errs, "spec.template.spec", t.spec.as_ref(), true)
        }
    }
}

fn result(errs: FieldErrors) -> Result<(), FieldErrors> {
    if errs.0.is_empty() {
        Ok(())
    } else {
        Err(errs)
    }
}

/// The NoExecute taints the node lifecycle controller puts on a failed node.
pub const NOT_READY_TAINT: &str = "node.kubernetes.io/not-ready";
pub const UNREACHABLE_TAINT: &str = "node.kubernetes.io/unreachable";
/// `--default-not-ready-toleration-seconds` / `--default-unreachable-toleration-seconds` of the API server.
pub const DEFAULT_TOLERATION_SECONDS: i64 = 300;

/// The API server's `DefaultTolerationSeconds` admission: a Pod created without a toleration for the not-ready
/// (or unreachable) NoExecute taint gets one, `Exists`, `NoExecute`, 300 s, so it leaves a failed node after five
/// minutes. A toleration with that key (or an empty key, which tolerates every taint) and effect NoExecute or
/// empty counts as present, whatever its seconds. Idempotent.
pub fn add_default_tolerations(p: &mut Pod) {
    let spec = p.spec.get_or_insert_with(Default::default);
    for key in [NOT_READY_TAINT, UNREACHABLE_TAINT] {
        let list = spec.tolerations.as_deref().unwrap_or(&[]);
        let has = list.iter().any(|t| {
            matches!(t.key.as_deref(), None | Some("")) || t.key.as_deref() == Some(key)
        } && matches!(t.effect.as_deref(), None | Some("") | Some("NoExecute")));
        if !has {
            spec.tolerations.get_or_insert_with(Vec::new).push(Toleration {
                key: Some(key.into()),
                operator: Some("Exists".into()),
                effect: Some("NoExecute".into()),
                toleration_seconds: Some(DEFAULT_TOLERATION_SECONDS),
                value: None,
            });
        }
    }
}

pub fn validate_pod(p: &Pod) -> Result<(), FieldErrors> {
    let mut errs = FieldErrors::default();
    pod_spec(&mut errs, "spec", p.spec.as_ref(), false);
    result(errs)
}

pub fn validate_deployment(d: &Deployment) -> Result<(), FieldErrors> {
    let mut errs = FieldErrors::default();
    replicas(&mut errs, d.spec.replicas);
    label_selector(&mut errs, &d.spec.selector, Some(&d.spec.template));
    template(&mut errs, Some(&d.spec.template));
    if let Some(s) = &d.spec.strategy {
        match s.type_.as_deref() {
            None | Some("RollingUpdate") => {}
            Some("Recreate") if s.rolling_update.is_some() => push(
                &mut errs,
                "spec.strategy.rollingUpdate",
                "Forbidden: may not be specified when strategy `type` is 'Recreate'",
            ),
            Some("Recreate") => {}
            Some(t) => push(
                &mut errs,
                "spec.strategy.type",
                format!("Unsupported value: {t:?}: supported values: \"Recreate\", \"RollingUpdate\""),
            ),
        }
    }
    result(errs)
}

pub fn validate_replicaset(r: &ReplicaSet) -> Result<(), FieldErrors> {
    let mut errs = FieldErrors::default();
    replicas(&mut errs, r.spec.replicas);
    label_selector(&mut errs, &r.spec.selector, r.spec.template.as_ref());
    template(&mut errs, r.spec.template.as_ref());
    result(errs)
}

pub fn validate_daemonset(d: &DaemonSet) -> Result<(), FieldErrors> {
    let mut errs = FieldErrors::default();
    label_selector(&mut errs, &d.spec.selector, Some(&d.spec.template));
    template(&mut errs, Some(&d.spec.template));
    result(errs)
}

/// ReplicationControllers have an equality selector (defaulted from the template's labels when absent).
pub fn validate_replicationcontroller(rc: &ReplicationController) -> Result<(), FieldErrors> {
    let mut errs = FieldErrors::default();
    let spec = rc.spec.clone().unwrap_or_default();
    replicas(&mut errs, spec.replicas);
    let selector = spec.selector.clone().unwrap_or_default();
    if selector.is_empty() {
        required(&mut errs, "spec.selector");
    }
    for (k, v) in &selector {
        label_pair(&mut errs, "spec.selector", k, v);
    }
    if let Some(t) = &spec.template {
        let labels = t.metadata.as_ref().and_then(|m| m.labels.as_ref());
        if !selector.is_empty() && !Selector::from_map(&selector).matches(labels) {
            push(
                &mut errs,
                "spec.template.metadata.labels",
                format!("Invalid value: {}: `selector` does not match template `labels`", go_map(labels)),
            );
        }
    }
    template(&mut errs, spec.template.as_ref());
    result(errs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deployment(yaml: &str) -> Deployment {
        serde_norway::from_str(yaml).unwrap()
    }

    #[test]
    fn pods_get_default_not_ready_and_unreachable_tolerations_unless_they_tolerate_the_key() {
        // (tolerations written, the (key, effect, seconds) after admission)
        let nr = "node.kubernetes.io/not-ready";
        let un = "node.kubernetes.io/unreachable";
        type Want<'a> = &'a [(&'a str, &'a str, Option<i64>)];
        let cases: &[(&str, Want)] = &[
            ("[]", &[(nr, "NoExecute", Some(300)), (un, "NoExecute", Some(300))]),
            (
                "[{key: node.kubernetes.io/unreachable, operator: Exists, effect: NoExecute, tolerationSeconds: 5}]",
                &[(un, "NoExecute", Some(5)), (nr, "NoExecute", Some(300))],
            ),
            (
                "[{key: node.kubernetes.io/not-ready, operator: Exists}]",
                &[(nr, "", None), (un, "NoExecute", Some(300))],
            ),
            // A NoSchedule toleration of the key does not count: the NoExecute default is still added.
            (
                "[{key: node.kubernetes.io/not-ready, operator: Exists, effect: NoSchedule}]",
                &[(nr, "NoSchedule", None), (nr, "NoExecute", Some(300)), (un, "NoExecute", Some(300))],
            ),
            // An empty key with Exists tolerates everything, forever: nothing added.
            ("[{operator: Exists}]", &[("", "", None)]),
        ];
        for (written, want) in cases {
            let mut p: Pod = serde_norway::from_str(&format!(
                "metadata: {{name: p}}\nspec:\n  containers: [{{name: c, image: i}}]\n  tolerations: {written}\n"
            ))
            .unwrap();
            add_default_tolerations(&mut p);
            let once = p.clone();
            add_default_tolerations(&mut p);
            assert_eq!(p, once, "idempotent: {written}");
            let got: Vec<(String, String, Option<i64>)> = p
                .spec
                .unwrap()
                .tolerations
                .unwrap_or_default()
                .into_iter()
                .map(|t| (t.key.unwrap_or_default(), t.effect.unwrap_or_default(), t.toleration_seconds))
                .collect();
            let want: Vec<(String, String, Option<i64>)> =
                want.iter().map(|(k, e, s)| (k.to_string(), e.to_string(), *s)).collect();
            assert_eq!(got, want, "{written}");
        }
    }

    #[test]
    fn deployments_are_checked_as_the_api_server_checks_them() {
        let ok = "metadata: {name: d}\nspec:\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}}\n    spec: {containers: [{name: web, image: nginx}]}\n";
        let cases: &[(&str, &str)] = &[
            (ok, ""),
            (
                "metadata: {name: d}\nspec:\n  selector: {}\n  template:\n    metadata: {labels: {app: web}}\n    spec: {containers: [{name: web, image: nginx}]}\n",
                "spec.selector: Required value",
            ),
            (
                "metadata: {name: d}\nspec:\n  selector: {matchLabels: {app: db}}\n  template:\n    metadata: {labels: {app: web}}\n    spec: {containers: [{name: web, image: nginx}]}\n",
                "spec.template.metadata.labels: Invalid value: map[string]string{\"app\":\"web\"}: `selector` does not match template `labels`",
            ),
            (
                "metadata: {name: d}\nspec:\n  replicas: -1\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}}\n    spec: {containers: [{name: web, image: nginx}]}\n",
                "spec.replicas: Invalid value: -1: must be greater than or equal to 0",
            ),
            (
                "metadata: {name: d}\nspec:\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}}\n    spec: {containers: [{name: web}]}\n",
                "spec.template.spec.containers[0].image: Required value",
            ),
            (
                "metadata: {name: d}\nspec:\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}}\n    spec: {containers: []}\n",
                "spec.template.spec.containers: Required value",
            ),
            (
                "metadata: {name: d}\nspec:\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}}\n    spec: {containers: [{name: a, image: x}, {name: a, image: y}]}\n",
                "spec.template.spec.containers[1].name: Duplicate value: \"a\"",
            ),
            (
                "metadata: {name: d}\nspec:\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}}\n    spec: {restartPolicy: Never, containers: [{name: a, image: x}]}\n",
                "spec.template.spec.restartPolicy: Unsupported value: \"Never\": supported values: \"Always\"",
            ),
            (
                "metadata: {name: d}\nspec:\n  selector: {matchExpressions: [{key: app, operator: Near, values: [web]}]}\n  template:\n    metadata: {labels: {app: web}}\n    spec: {containers: [{name: a, image: x}]}\n",
                "spec.selector.matchExpressions[0].operator: Invalid value: \"Near\": not a valid selector operator",
            ),
            (
                "metadata: {name: d}\nspec:\n  strategy: {type: Recreate, rollingUpdate: {maxSurge: 1}}\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}}\n    spec: {containers: [{name: a, image: x}]}\n",
                "spec.strategy.rollingUpdate: Forbidden",
            ),
        ];
        for (yaml, want) in cases {
            let got = validate_deployment(&deployment(yaml)).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(
                if want.is_empty() { got.is_empty() } else { got.starts_with(want) },
                "{yaml}\ngot:  {got}\nwant: {want}"
            );
        }
    }

    #[test]
    fn replication_controllers_need_a_selector_that_matches() {
        let rc = |yaml: &str| -> String {
            let rc: ReplicationController = serde_norway::from_str(yaml).unwrap();
            validate_replicationcontroller(&rc).err().map(|e| e.to_string()).unwrap_or_default()
        };
        let ok = "metadata: {name: r}\nspec:\n  selector: {app: web}\n  template:\n    metadata: {labels: {app: web}}\n    spec: {containers: [{name: a, image: x}]}\n";
        assert_eq!(rc(ok), "");
        assert!(rc(&ok.replace("selector: {app: web}", "selector: {app: db}"))
            .starts_with("spec.template.metadata.labels: Invalid value"));
        assert!(rc("metadata: {name: r}\nspec: {}\n").starts_with("spec.selector: Required value"));
    }
}
