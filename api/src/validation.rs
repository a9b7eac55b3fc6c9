//! The API server's checks for every kind the store holds, in one place: metadata (names, namespace, labels) for
//! all kinds, then the kind's own rules (`service`, `workload`, Endpoints here). The store runs them on every
//! write (`Object::apply_defaults` + `Object::validate`) and every reader runs them again on what it decodes.
//! Pure functions; nothing here touches etcd.

use std::any::Any;
use std::net::IpAddr;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{Endpoints, Pod, ReplicationController, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::service::{
    self, is_dns1035_label, is_dns1123_label, is_dns1123_subdomain, is_label_key, is_label_value, FieldError,
    FieldErrors, ServiceRanges,
};
use crate::workload;

/// What a Service's addresses may be checked against without knowing the API server's flags: any IPv4
/// address (but 0.0.0.0 and 255.255.255.255) and any port. `service::create` checks the configured ranges.
fn any_range() -> ServiceRanges {
    ServiceRanges {
        cidr: ipnetwork::Ipv4Network::new(std::net::Ipv4Addr::UNSPECIFIED, 0).unwrap_or_else(|_| unreachable!()),
        node_ports: 1..=65535,
    }
}

fn push(errs: &mut FieldErrors, path: impl Into<String>, message: impl Into<String>) {
    errs.0.push(FieldError { path: path.into(), message: message.into() });
}

/// Name rules per kind, as the API server's: Services and Namespaces are DNS labels, the rest DNS subdomains.
fn name_ok(kind: &str, name: &str) -> bool {
    match kind {
        "Service" => is_dns1035_label(name),
        "Namespace" => is_dns1123_label(name),
        _ => is_dns1123_subdomain(name),
    }
}

/// Metadata every object must have right: a name of the kind's syntax, a DNS-1123 label namespace for
/// namespaced kinds (none for the others), valid label keys and values.
pub fn validate_meta(kind: &str, namespaced: bool, meta: &ObjectMeta) -> FieldErrors {
    let mut errs = FieldErrors::default();
    match meta.name.as_deref() {
        None | Some("") => push(&mut errs, "metadata.name", "Required value: name or generateName is required"),
        Some(n) if !name_ok(kind, n) => {
            push(&mut errs, "metadata.name", format!("Invalid value: {:?}: not a valid {kind} name", truncate(n)))
        }
        _ => {}
    }
    // A cluster-scoped object's namespace is ignored (the store clears it on write), as the API server does.
    if let Some(ns) = meta.namespace.as_deref().filter(|ns| namespaced && !is_dns1123_label(ns)) {
        push(
            &mut errs,
            "metadata.namespace",
            format!("Invalid value: {:?}: a namespace must be a DNS-1123 label", truncate(ns)),
        );
    }
    for (k, v) in meta.labels.iter().flatten() {
        if !is_label_key(k) {
            push(&mut errs, "metadata.labels", format!("Invalid value: {:?}: not a valid label key", truncate(k)));
        }
        if !is_label_value(v) {
            push(
                &mut errs,
                format!("metadata.labels[{}]", truncate(k)),
                format!("Invalid value: {:?}: not a valid label value", truncate(v)),
            );
        }
    }
    errs
}

/// Long hostile values are quoted in errors and logs only in part.
fn truncate(s: &str) -> String {
    const MAX: usize = 64;
    if s.len() <= MAX {
        return s.to_string();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…({} bytes)", &s[..end], s.len())
}

/// Endpoints as the API server checks them: every address an IP, ports in range with a known protocol, port
/// names DNS labels (required when there are several), unique per subset.
pub fn validate_endpoints(e: &Endpoints) -> Result<(), FieldErrors> {
    let mut errs = FieldErrors::default();
    for (i, subset) in e.subsets.iter().flatten().enumerate() {
        let path = format!("subsets[{i}]");
        let addrs = subset.addresses.iter().flatten().map(|a| ("addresses", a));
        let not_ready = subset.not_ready_addresses.iter().flatten().map(|a| ("notReadyAddresses", a));
        for (j, (field, a)) in addrs.chain(not_ready).enumerate() {
            if a.ip.parse::<IpAddr>().is_err() {
                push(
                    &mut errs,
                    format!("{path}.{field}[{j}].ip"),
                    format!("Invalid value: {:?}: must be a valid IP address", truncate(&a.ip)),
                );
            }
            if let Some(n) = a.node_name.as_deref().filter(|n| !is_dns1123_subdomain(n)) {
                push(
                    &mut errs,
                    format!("{path}.{field}[{j}].nodeName"),
                    format!("Invalid value: {:?}: must be a DNS-1123 subdomain", truncate(n)),
                );
            }
        }
        let ports = subset.ports.as_deref().unwrap_or_default();
        let mut names = std::collections::HashSet::new();
        for (j, p) in ports.iter().enumerate() {
            let ppath = format!("{path}.ports[{j}]");
            match p.name.as_deref() {
                None | Some("") if ports.len() > 1 => push(&mut errs, format!("{ppath}.name"), "Required value"),
                None | Some("") => {}
                Some(n) if !is_dns1123_label(n) => push(
                    &mut errs,
                    format!("{ppath}.name"),
                    format!("Invalid value: {:?}: must be a DNS-1123 label", truncate(n)),
                ),
                Some(n) if !names.insert(n) => {
                    push(&mut errs, format!("{ppath}.name"), format!("Duplicate value: {n:?}"))
                }
                Some(_) => {}
            }
            if !(1..=65535).contains(&p.port) {
                push(
                    &mut errs,
                    format!("{ppath}.port"),
                    format!("Invalid value: {}: must be between 1 and 65535, inclusive", p.port),
                );
            }
            if let Some(proto) = p.protocol.as_deref().filter(|p| !["TCP", "UDP", "SCTP"].contains(p)) {
                push(
                    &mut errs,
                    format!("{ppath}.protocol"),
                    format!("Unsupported value: {:?}: supported values: \"SCTP\", \"TCP\", \"UDP\"", truncate(proto)),
                );
            }
        }
    }
    into_result(errs)
}

fn into_result(errs: FieldErrors) -> Result<(), FieldErrors> {
    if errs.0.is_empty() {
        Ok(())
    } else {
        Err(errs)
    }
}

/// The kind's defaults (what the API server fills in on a write). Idempotent; kinds without defaults are left
/// alone.
pub fn default_object(obj: &mut dyn Any) {
    if let Some(s) = obj.downcast_mut::<Service>() {
        service::apply_defaults(s);
    }
}

/// Admission on create only (the API server's mutating plugins that run on create): Pods get
/// `DefaultTolerationSeconds` (`workload::add_default_tolerations`). Idempotent.
pub fn admit_create(obj: &mut dyn Any) {
    if let Some(p) = obj.downcast_mut::<Pod>() {
        workload::add_default_tolerations(p);
    }
}

/// Metadata, then the kind's own rules. Kinds without rules of their own get the metadata checks.
pub fn validate_object(kind: &str, namespaced: bool, meta: &ObjectMeta, obj: &dyn Any) -> Result<(), FieldErrors> {
    let mut errs = validate_meta(kind, namespaced, meta);
    let own = if let Some(s) = obj.downcast_ref::<Service>() {
        // A stored Service has its defaults; validating a copy with them keeps a reader's check equal to the gate's.
        let mut s = s.clone();
        service::apply_defaults(&mut s);
        service::validate(&s, &any_range())
    } else if let Some(e) = obj.downcast_ref::<Endpoints>() {
        validate_endpoints(e)
    } else if let Some(p) = obj.downcast_ref::<Pod>() {
        workload::validate_pod(p)
    } else if let Some(d) = obj.downcast_ref::<Deployment>() {
        workload::validate_deployment(d)
    } else if let Some(r) = obj.downcast_ref::<ReplicaSet>() {
        workload::validate_replicaset(r)
    } else if let Some(d) = obj.downcast_ref::<DaemonSet>() {
        workload::validate_daemonset(d)
    } else if let Some(r) = obj.downcast_ref::<ReplicationController>() {
        workload::validate_replicationcontroller(r)
    } else {
        Ok(())
    };
    if let Err(e) = own {
        // The metadata checks already named the name; the kind's checks would name it again.
        errs.0.extend(e.0.into_iter().filter(|f| !f.path.starts_with("metadata.")));
    }
    into_result(errs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Namespace;
    use serde_json::json;

    fn errors<K: crate::store::Object>(v: serde_json::Value) -> Vec<String> {
        let o: K = serde_json::from_value(v).unwrap();
        match crate::store::Object::validate(&o) {
            Ok(()) => vec![],
            Err(e) => e.0.iter().map(|e| e.to_string()).collect(),
        }
    }

    #[test]
    fn every_kind_gets_metadata_and_its_own_rules() {
        let svc = |name: &str, port_name: &str| {
            json!({"metadata": {"name": name, "namespace": "default"},
                   "spec": {"clusterIP": "10.96.0.1", "ports": [{"name": port_name, "port": 80}]}})
        };
        assert_eq!(errors::<Service>(svc("web", "http")), Vec::<String>::new());
        assert_eq!(
            errors::<Service>(svc("web", "a\"\n")),
            ["spec.ports[0].name: Invalid value: \"a\\\"\\n\": must be a DNS-1123 label"]
        );
        assert_eq!(
            errors::<Service>(svc("Web", "http")),
            ["metadata.name: Invalid value: \"Web\": not a valid Service name"]
        );
        let long = "a".repeat(70_000);
        let got = errors::<Service>(svc(&long, "http"));
        assert_eq!(got.len(), 1);
        assert!(got[0].len() < 200, "a 64 KiB name is not repeated in full: {}", got[0].len());
        assert_eq!(
            errors::<Endpoints>(json!({"metadata": {"name": "web", "namespace": "default"},
                "subsets": [{"addresses": [{"ip": "10.0.0.1"}, {"ip": "fd00::1"}, {"ip": "999.1.1.1"}],
                             "ports": [{"name": "a", "port": 80}, {"name": "a", "port": 0}]}]})),
            [
                "subsets[0].addresses[2].ip: Invalid value: \"999.1.1.1\": must be a valid IP address",
                "subsets[0].ports[1].name: Duplicate value: \"a\"",
                "subsets[0].ports[1].port: Invalid value: 0: must be between 1 and 65535, inclusive",
            ]
        );
        assert_eq!(
            errors::<Namespace>(json!({"metadata": {"name": "a.b"}})),
            ["metadata.name: Invalid value: \"a.b\": not a valid Namespace name"]
        );
        assert_eq!(
            errors::<Pod>(json!({"metadata": {"name": "p", "namespace": "x y", "labels": {"a": "b c"}},
                "spec": {"containers": [{"name": "c", "image": "i"}]}})),
            [
                "metadata.namespace: Invalid value: \"x y\": a namespace must be a DNS-1123 label",
                "metadata.labels[a]: Invalid value: \"b c\": not a valid label value",
            ]
        );
        assert_eq!(
            errors::<Pod>(json!({"metadata": {"name": "p"}, "spec": {"containers": []}})),
            ["spec.containers: Required value"]
        );
    }

    #[test]
    fn defaults_are_idempotent() {
        let mut s: Service =
            serde_json::from_value(json!({"metadata": {"name": "s"}, "spec": {"ports": [{"port": 80}]}})).unwrap();
        crate::store::Object::apply_defaults(&mut s);
        let once = s.clone();
        crate::store::Object::apply_defaults(&mut s);
        assert_eq!(s, once);
        assert_eq!(s.spec.unwrap().ports.unwrap()[0].protocol.as_deref(), Some("TCP"));
    }
}
