//! `weft describe`: kubectl's describe text for Pods, Deployments, ReplicaSets, ReplicationControllers,
//! DaemonSets, Services, Endpoints, Nodes and Namespaces. Each describer is a pure function from the object (and
//! the objects it shows with it: ReplicaSets, pods, Endpoints, Events) to text written as kubectl's PrefixWriter
//! writes it and aligned by Go's tabwriter, so golden files pin it. `describe` reads those objects from the store.
//! Times print in UTC.

use std::collections::BTreeMap;
use std::io::Write;

use anyhow::bail;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{
    Container, ContainerState, ContainerStatus, Endpoints, Event, Namespace, Node, Pod, PodTemplateSpec, Probe,
    ReplicationController, ResourceRequirements, Service, Toleration, Volume,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::Timestamp;

use crate::owned;
use crate::table::{format_endpoints, format_label_selector, format_labels, human_duration, rfc1123z};
use crate::verbs::{self, namespace_of, parse_targets, Kind};
use weft_api::labels::Selector;
use weft_api::quantity::Quantity;
use weft_api::store::{Object, Store};
use weft_api::EtcdArgs;

/// kubectl's PrefixWriter: every write is indented two spaces per level; tabs separate cells for the tabwriter.
#[derive(Default)]
struct W(String);

impl W {
    fn w(&mut self, level: usize, text: &str) {
        self.0.push_str(&"  ".repeat(level));
        self.0.push_str(text);
    }
    /// The text aligned as `tabbedString` aligns it (tabwriter: minwidth 0, padding 2).
    fn done(self) -> String {
        crate::table::tabwrite(&self.0, 0, 2)
    }
}

fn name(meta: &ObjectMeta) -> &str {
    meta.name.as_deref().unwrap_or("")
}

fn ns(meta: &ObjectMeta) -> &str {
    meta.namespace.as_deref().unwrap_or("")
}

fn time(t: Option<&Time>) -> String {
    t.map(|t| rfc1123z(&t.0)).unwrap_or_else(|| "Mon, 01 Jan 0001 00:00:00 +0000".into())
}

fn since(t: Option<&Timestamp>, now: Timestamp) -> String {
    t.map(|t| human_duration(now.as_second() - t.as_second())).unwrap_or_else(|| "<unknown>".into())
}

fn labels_multiline(w: &mut W, initial_indent: &str, title: &str, labels: Option<&BTreeMap<String, String>>) {
    w.w(0, &format!("{initial_indent}{title}:\t"));
    let labels: Vec<(&String, &String)> = labels.into_iter().flatten().collect();
    if labels.is_empty() {
        w.w(0, "<none>\n");
        return;
    }
    for (i, (k, v)) in labels.iter().enumerate() {
        if i != 0 {
            w.w(0, &format!("{initial_indent}\t"));
        }
        w.w(0, &format!("{k}={v}\n"));
    }
}

const MAX_ANNOTATION_LEN: usize = 140;

fn annotations_multiline(w: &mut W, title: &str, annotations: Option<&BTreeMap<String, String>>) {
    w.w(0, &format!("{title}:\t"));
    let keys: Vec<(&String, &String)> = annotations
        .into_iter()
        .flatten()
        .filter(|(k, _)| k.as_str() != "kubectl.kubernetes.io/last-applied-configuration")
        .collect();
    if keys.is_empty() {
        w.w(0, "<none>\n");
        return;
    }
    for (i, (k, v)) in keys.iter().enumerate() {
        if i != 0 {
            w.w(0, "\t");
        }
        let value = v.strip_suffix('\n').unwrap_or(v);
        if value.len() + k.len() + 2 > MAX_ANNOTATION_LEN || value.contains('\n') {
            w.w(0, &format!("{k}:\n"));
            for line in value.split('\n') {
                let short = if line.len() > MAX_ANNOTATION_LEN - 2 {
                    let mut end = MAX_ANNOTATION_LEN - 2;
                    while !line.is_char_boundary(end) {
                        end -= 1;
                    }
                    format!("{}...", &line[..end])
                } else {
                    line.to_string()
                };
                w.w(0, &format!("\t  {short}\n"));
            }
        } else {
            w.w(0, &format!("{k}: {value}\n"));
        }
    }
}

fn tolerations_multiline(w: &mut W, initial_indent: &str, title: &str, tolerations: Option<&Vec<Toleration>>) {
    w.w(0, &format!("{initial_indent}{title}:\t"));
    let mut tols: Vec<&Toleration> = tolerations.into_iter().flatten().collect();
    if tols.is_empty() {
        w.w(0, "<none>\n");
        return;
    }
    tols.sort_by(|a, b| a.key.cmp(&b.key));
    for (i, t) in tols.iter().enumerate() {
        if i != 0 {
            w.w(0, &format!("{initial_indent}\t"));
        }
        let (key, value, effect) =
            (t.key.as_deref().unwrap_or(""), t.value.as_deref().unwrap_or(""), t.effect.as_deref().unwrap_or(""));
        let mut s = key.to_string();
        if !value.is_empty() {
            s.push_str(&format!("={value}"));
        }
        if !effect.is_empty() {
            s.push_str(&format!(":{effect}"));
        }
        if t.operator.as_deref() == Some("Exists") && value.is_empty() {
            s.push_str(if !key.is_empty() || !effect.is_empty() { " op=Exists" } else { "op=Exists" });
        }
        if let Some(secs) = t.toleration_seconds {
            s.push_str(&format!(" for {secs}s"));
        }
        w.w(0, &format!("{s}\n"));
    }
}

fn events_section(w: &mut W, events: Option<&[Event]>, now: Timestamp) {
    let Some(events) = events else { return };
    if events.is_empty() {
        w.w(0, "Events:\t<none>\n");
        return;
    }
    let mut events: Vec<&Event> = events.iter().collect();
    let last = |e: &Event| {
        e.last_timestamp
            .as_ref()
            .map(|t| t.0)
            .or(e.event_time.as_ref().map(|t| t.0))
            .or(e.first_timestamp.as_ref().map(|t| t.0))
    };
    events.sort_by_key(|e| last(e));
    w.w(0, "Events:\n  Type\tReason\tAge\tFrom\tMessage\n");
    w.w(1, "----\t------\t----\t----\t-------\n");
    for e in events {
        let first = match &e.event_time {
            Some(t) => since(Some(&t.0), now),
            None => since(e.first_timestamp.as_ref().map(|t| &t.0), now),
        };
        let count = e.count.unwrap_or(0);
        let interval = if count > 1 {
            format!("{} (x{count} over {first})", since(e.last_timestamp.as_ref().map(|t| &t.0), now))
        } else {
            first
        };
        let source = e
            .source
            .as_ref()
            .and_then(|s| s.component.clone())
            .filter(|c| !c.is_empty())
            .or(e.reporting_component.clone())
            .unwrap_or_default();
        let mut message = e.message.clone().unwrap_or_default().trim().to_string();
        if let Some(fp) = e.involved_object.field_path.as_deref().filter(|f| !f.is_empty()) {
            message = format!("{fp}: {message}");
        }
        w.w(
            1,
            &format!(
                "{}\t{}\t{interval}\t{source}\t{message}\n",
                e.type_.as_deref().unwrap_or(""),
                e.reason.as_deref().unwrap_or("")
            ),
        );
    }
}

fn controller_of(meta: &ObjectMeta) -> Option<String> {
    meta.owner_references
        .iter()
        .flatten()
        .find(|r| r.controller == Some(true))
        .map(|r| format!("{}/{}", r.kind, r.name))
}

fn protocol(p: Option<&String>) -> &str {
    p.map(String::as_str).filter(|p| !p.is_empty()).unwrap_or("TCP")
}

fn container_ports(c: &Container, host: bool) -> String {
    let ports: Vec<String> = c
        .ports
        .iter()
        .flatten()
        .map(|p| {
            let port = if host { p.host_port.unwrap_or(0) } else { p.container_port };
            let mut s = format!("{port}/{}", protocol(p.protocol.as_ref()));
            if let Some(n) = p.name.as_deref().filter(|n| !n.is_empty()) {
                s.push_str(&format!(" ({n})"));
            }
            s
        })
        .collect();
    ports.join(", ")
}

fn int_or_string(v: &IntOrString) -> String {
    match v {
        IntOrString::Int(i) => i.to_string(),
        IntOrString::String(s) => s.clone(),
    }
}

fn probe(p: &Probe) -> String {
    let attrs = format!(
        "delay={}s timeout={}s period={}s successThreshold={} failureThreshold={}",
        p.initial_delay_seconds.unwrap_or(0),
        p.timeout_seconds.unwrap_or(1),
        p.period_seconds.unwrap_or(10),
        p.success_threshold.unwrap_or(1),
        p.failure_threshold.unwrap_or(3)
    );
    if let Some(e) = &p.exec {
        return format!("exec [{}] {attrs}", e.command.clone().unwrap_or_default().join(" "));
    }
    if let Some(h) = &p.http_get {
        let scheme = h.scheme.as_deref().unwrap_or("HTTP").to_lowercase();
        let host = h.host.clone().unwrap_or_default();
        let port = int_or_string(&h.port);
        let host = if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") };
        return format!("http-get {scheme}://{host}{} {attrs}", h.path.as_deref().unwrap_or(""));
    }
    if let Some(t) = &p.tcp_socket {
        return format!("tcp-socket {}:{} {attrs}", t.host.as_deref().unwrap_or(""), int_or_string(&t.port));
    }
    if let Some(g) = &p.grpc {
        return format!("grpc <pod>:{} {} {attrs}", g.port, g.service.as_deref().unwrap_or(""));
    }
    format!("unknown {attrs}")
}

fn resources(w: &mut W, r: Option<&ResourceRequirements>, level: usize) {
    let Some(r) = r else { return };
    for (title, list) in [("Limits", &r.limits), ("Requests", &r.requests)] {
        let Some(list) = list.as_ref().filter(|l| !l.is_empty()) else { continue };
        w.w(level, &format!("{title}:\n"));
        for (k, q) in list {
            let shown = Quantity::parse(&q.0).map(|q| q.to_string()).unwrap_or_else(|| q.0.clone());
            w.w(level + 1, &format!("{k}:\t{shown}\n"));
        }
    }
}

fn container_state(w: &mut W, title: &str, state: Option<&ContainerState>) {
    let state = state.cloned().unwrap_or_default();
    if let Some(r) = &state.running {
        w.w(2, &format!("{title}:\tRunning\n"));
        w.w(3, &format!("Started:\t{}\n", time(r.started_at.as_ref())));
    } else if let Some(wt) = &state.waiting {
        w.w(2, &format!("{title}:\tWaiting\n"));
        if let Some(r) = wt.reason.as_deref().filter(|r| !r.is_empty()) {
            w.w(3, &format!("Reason:\t{r}\n"));
        }
    } else if let Some(t) = &state.terminated {
        w.w(2, &format!("{title}:\tTerminated\n"));
        if let Some(r) = t.reason.as_deref().filter(|r| !r.is_empty()) {
            w.w(3, &format!("Reason:\t{r}\n"));
        }
        if let Some(m) = t.message.as_deref().filter(|m| !m.is_empty()) {
            w.w(3, &format!("Message:\t{m}\n"));
        }
        w.w(3, &format!("Exit Code:\t{}\n", t.exit_code));
        if let Some(sig) = t.signal.filter(|s| *s > 0) {
            w.w(3, &format!("Signal:\t{sig}\n"));
        }
        w.w(3, &format!("Started:\t{}\n", time(t.started_at.as_ref())));
        w.w(3, &format!("Finished:\t{}\n", time(t.finished_at.as_ref())));
    } else {
        w.w(2, &format!("{title}:\tWaiting\n"));
    }
}

fn containers(w: &mut W, label: &str, containers: &[Container], statuses: Option<&Vec<ContainerStatus>>, space: &str) {
    let none = if containers.is_empty() { " <none>" } else { "" };
    w.w(0, &format!("{space}{label}:{none}\n"));
    let name_indent = if space.is_empty() { "" } else { " " };
    for c in containers {
        let status = statuses.into_iter().flatten().find(|s| s.name == c.name);
        w.w(1, &format!("{name_indent}{}:\n", c.name));
        if let Some(s) = status {
            w.w(2, &format!("Container ID:\t{}\n", s.container_id.as_deref().unwrap_or("")));
        }
        w.w(2, &format!("Image:\t{}\n", c.image.as_deref().unwrap_or("")));
        if let Some(s) = status {
            w.w(2, &format!("Image ID:\t{}\n", s.image_id));
        }
        let ports = container_ports(c, false);
        if ports.contains(',') {
            w.w(2, &format!("Ports:\t{ports}\n"));
        } else {
            w.w(2, &format!("Port:\t{}\n", crate::table::none_if_empty(ports)));
        }
        let host_ports = container_ports(c, true);
        if host_ports.contains(',') {
            w.w(2, &format!("Host Ports:\t{host_ports}\n"));
        } else {
            w.w(2, &format!("Host Port:\t{}\n", crate::table::none_if_empty(host_ports)));
        }
        for (title, lines) in [("Command", &c.command), ("Args", &c.args)] {
            if let Some(lines) = lines.as_ref().filter(|l| !l.is_empty()) {
                w.w(2, &format!("{title}:\n"));
                for l in lines.iter().flat_map(|l| l.split('\n')) {
                    w.w(3, &format!("{l}\n"));
                }
            }
        }
        if let Some(s) = status {
            container_state(w, "State", s.state.as_ref());
            if s.last_state.as_ref().is_some_and(|l| l.terminated.is_some()) {
                container_state(w, "Last State", s.last_state.as_ref());
            }
            w.w(2, &format!("Ready:\t{}\n", if s.ready { "True" } else { "False" }));
            w.w(2, &format!("Restart Count:\t{}\n", s.restart_count));
        }
        resources(w, c.resources.as_ref(), 2);
        for (title, p) in
            [("Liveness", &c.liveness_probe), ("Readiness", &c.readiness_probe), ("Startup", &c.startup_probe)]
        {
            if let Some(p) = p {
                w.w(2, &format!("{title}:\t{}\n", probe(p)));
            }
        }
        let env = c.env.as_deref().unwrap_or(&[]);
        w.w(2, &format!("Environment:{}\n", if env.is_empty() { "\t<none>" } else { "" }));
        for e in env {
            match &e.value_from {
                None => {
                    for (i, line) in e.value.as_deref().unwrap_or("").split('\n').enumerate() {
                        if i == 0 {
                            w.w(3, &format!("{}:\t{line}\n", e.name));
                        } else {
                            w.w(3, &format!("\t{line}\n"));
                        }
                    }
                }
                Some(from) => {
                    if let Some(f) = &from.field_ref {
                        w.w(
                            3,
                            &format!("{}:\t ({}:{})\n", e.name, f.api_version.as_deref().unwrap_or("v1"), f.field_path),
                        );
                    } else if let Some(r) = &from.resource_field_ref {
                        w.w(3, &format!("{}:\t ({})\n", e.name, r.resource));
                    } else if let Some(s) = &from.secret_key_ref {
                        w.w(
                            3,
                            &format!(
                                "{}:\t<set to the key '{}' in secret '{}'>\tOptional: {}\n",
                                e.name,
                                s.key,
                                s.name,
                                s.optional.unwrap_or(false)
                            ),
                        );
                    } else if let Some(c) = &from.config_map_key_ref {
                        w.w(
                            3,
                            &format!(
                                "{}:\t<set to the key '{}' of config map '{}'>\tOptional: {}\n",
                                e.name,
                                c.key,
                                c.name,
                                c.optional.unwrap_or(false)
                            ),
                        );
                    }
                }
            }
        }
        let mut mounts: Vec<_> = c.volume_mounts.iter().flatten().collect();
        w.w(2, &format!("Mounts:{}\n", if mounts.is_empty() { "\t<none>" } else { "" }));
        mounts.sort_by(|a, b| a.mount_path.cmp(&b.mount_path));
        for m in mounts {
            let mut flags = vec![if m.read_only == Some(true) { "ro".to_string() } else { "rw".to_string() }];
            if let Some(sp) = m.sub_path.as_deref().filter(|s| !s.is_empty()) {
                flags.push(format!("path={sp:?}"));
            }
            w.w(3, &format!("{} from {} ({})\n", m.mount_path, m.name, flags.join(",")));
        }
    }
}

fn volumes(w: &mut W, volumes: Option<&Vec<Volume>>, space: &str) {
    let volumes = volumes.map(Vec::as_slice).unwrap_or(&[]);
    if volumes.is_empty() {
        w.w(0, &format!("{space}Volumes:\t<none>\n"));
        return;
    }
    w.w(0, &format!("{space}Volumes:\n"));
    let name_indent = if space.is_empty() { "" } else { " " };
    for v in volumes {
        w.w(1, &format!("{name_indent}{}:\n", v.name));
        if let Some(h) = &v.host_path {
            w.w(
                2,
                &format!(
                    "Type:\tHostPath (bare host directory volume)\n    Path:\t{}\n    HostPathType:\t{}\n",
                    h.path,
                    h.type_.as_deref().unwrap_or("<none>")
                ),
            );
        } else if let Some(e) = &v.empty_dir {
            let limit = e.size_limit.as_ref().map(|q| q.0.clone()).unwrap_or_else(|| "<unset>".into());
            w.w(
                2,
                &format!(
                    "Type:\tEmptyDir (a temporary directory that shares a pod's lifetime)\n    Medium:\t{}\n    SizeLimit:\t{limit}\n",
                    e.medium.as_deref().unwrap_or("")
                ),
            );
        } else if let Some(s) = &v.secret {
            w.w(
                2,
                &format!(
                    "Type:\tSecret (a volume populated by a Secret)\n    SecretName:\t{}\n    Optional:\t{}\n",
                    s.secret_name.as_deref().unwrap_or(""),
                    s.optional.unwrap_or(false)
                ),
            );
        } else if let Some(c) = &v.config_map {
            w.w(
                2,
                &format!(
                    "Type:\tConfigMap (a volume populated by a ConfigMap)\n    Name:\t{}\n    Optional:\t{}\n",
                    c.name,
                    c.optional.unwrap_or(false)
                ),
            );
        } else if let Some(c) = &v.persistent_volume_claim {
            w.w(
                2,
                &format!(
                    "Type:\tPersistentVolumeClaim (a reference to a PersistentVolumeClaim in the same namespace)\n    ClaimName:\t{}\n    ReadOnly:\t{}\n",
                    c.claim_name,
                    c.read_only.unwrap_or(false)
                ),
            );
        } else {
            w.w(1, "<unknown>\n");
        }
    }
}

/// kubectl's `DescribePodTemplate`.
fn pod_template(w: &mut W, t: Option<&PodTemplateSpec>) {
    w.w(0, "Pod Template:\n");
    let Some(t) = t else {
        w.w(1, "<unset>");
        return;
    };
    let meta = t.metadata.clone().unwrap_or_default();
    let spec = t.spec.clone().unwrap_or_default();
    labels_multiline(w, "", "  Labels", meta.labels.as_ref());
    if meta.annotations.as_ref().is_some_and(|a| !a.is_empty()) {
        annotations_multiline(w, "  Annotations", meta.annotations.as_ref());
    }
    if let Some(sa) = spec.service_account_name.as_deref().filter(|s| !s.is_empty()) {
        w.w(1, &format!("Service Account:\t{sa}\n"));
    }
    if let Some(init) = spec.init_containers.as_ref().filter(|c| !c.is_empty()) {
        containers(w, "Init Containers", init, None, "  ");
    }
    containers(w, "Containers", &spec.containers, None, "  ");
    volumes(w, spec.volumes.as_ref(), "  ");
    if let Some(pc) = spec.priority_class_name.as_deref().filter(|s| !s.is_empty()) {
        w.w(1, &format!("Priority Class Name:\t{pc}\n"));
    }
    labels_multiline(w, "", "  Node-Selectors", spec.node_selector.as_ref());
    tolerations_multiline(w, "", "  Tolerations", spec.tolerations.as_ref());
}

/// The pod template as `rollout history --revision` prints it: kubectl's describe text without alignment.
pub fn pod_template_raw(t: &PodTemplateSpec) -> String {
    let mut w = W::default();
    pod_template(&mut w, Some(t));
    w.0
}

/// Requests (or limits) of a pod: the sum over containers, at least the largest init container's.
fn pod_resources(p: &Pod, limits: bool) -> BTreeMap<String, Quantity> {
    let spec = p.spec.clone().unwrap_or_default();
    let list = |c: &Container| -> BTreeMap<String, Quantity> {
        let r = c.resources.as_ref().and_then(|r| if limits { r.limits.as_ref() } else { r.requests.as_ref() });
        r.into_iter().flatten().filter_map(|(k, q)| Some((k.clone(), Quantity::parse(&q.0)?))).collect()
    };
    let mut sum: BTreeMap<String, Quantity> = BTreeMap::new();
    for c in &spec.containers {
        for (k, q) in list(c) {
            let e = sum.entry(k).or_default();
            *e = e.plus(q);
        }
    }
    for c in spec.init_containers.iter().flatten() {
        for (k, q) in list(c) {
            let e = sum.entry(k).or_default();
            if q > *e {
                *e = q;
            }
        }
    }
    sum
}

/// The pod's QoS class: the status's, else computed as the kubelet does.
pub fn qos_class(p: &Pod) -> String {
    if let Some(q) = p.status.as_ref().and_then(|s| s.qos_class.clone()).filter(|q| !q.is_empty()) {
        return q;
    }
    let spec = p.spec.clone().unwrap_or_default();
    let (mut requests, mut limits) = (BTreeMap::<String, Quantity>::new(), BTreeMap::<String, Quantity>::new());
    let mut guaranteed = true;
    for c in spec.containers.iter().chain(spec.init_containers.iter().flatten()) {
        let r = c.resources.clone().unwrap_or_default();
        let parse = |m: &Option<BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>>| -> BTreeMap<String, Quantity> {
            m.iter()
                .flatten()
                .filter(|(k, _)| k.as_str() == "cpu" || k.as_str() == "memory")
                .filter_map(|(k, q)| Some((k.clone(), Quantity::parse(&q.0)?)))
                .filter(|(_, q)| !q.is_zero())
                .collect()
        };
        let lim = parse(&r.limits);
        // Requests default to limits, as the API server defaults them.
        let mut req = lim.clone();
        req.extend(parse(&r.requests));
        for (k, q) in &req {
            let e = requests.entry(k.clone()).or_default();
            *e = e.plus(*q);
        }
        for (k, q) in &lim {
            let e = limits.entry(k.clone()).or_default();
            *e = e.plus(*q);
        }
        if !(lim.contains_key("cpu") && lim.contains_key("memory")) {
            guaranteed = false;
        }
    }
    if requests.is_empty() && limits.is_empty() {
        return "BestEffort".into();
    }
    let same = requests.len() == limits.len()
        && requests.iter().all(|(k, q)| limits.get(k).is_some_and(|l| l.nanos == q.nanos));
    if guaranteed && same {
        "Guaranteed".into()
    } else {
        "Burstable".into()
    }
}

/// `kubectl describe pod`.
pub fn describe_pod(p: &Pod, events: Option<&[Event]>, now: Timestamp) -> String {
    let mut w = W::default();
    let spec = p.spec.clone().unwrap_or_default();
    let status = p.status.clone().unwrap_or_default();
    w.w(0, &format!("Name:\t{}\n", name(&p.metadata)));
    w.w(0, &format!("Namespace:\t{}\n", ns(&p.metadata)));
    if let Some(pr) = spec.priority {
        w.w(0, &format!("Priority:\t{pr}\n"));
    }
    if let Some(pc) = spec.priority_class_name.as_deref().filter(|s| !s.is_empty()) {
        w.w(0, &format!("Priority Class Name:\t{pc}\n"));
    }
    if let Some(rc) = spec.runtime_class_name.as_deref().filter(|s| !s.is_empty()) {
        w.w(0, &format!("Runtime Class Name:\t{rc}\n"));
    }
    if let Some(sa) = spec.service_account_name.as_deref().filter(|s| !s.is_empty()) {
        w.w(0, &format!("Service Account:\t{sa}\n"));
    }
    match spec.node_name.as_deref().filter(|n| !n.is_empty()) {
        None => w.w(0, "Node:\t<none>\n"),
        Some(node) => w.w(0, &format!("Node:\t{node}/{}\n", status.host_ip.as_deref().unwrap_or(""))),
    }
    if let Some(t) = &status.start_time {
        w.w(0, &format!("Start Time:\t{}\n", rfc1123z(&t.0)));
    }
    labels_multiline(&mut w, "", "Labels", p.metadata.labels.as_ref());
    annotations_multiline(&mut w, "Annotations", p.metadata.annotations.as_ref());
    let phase = status.phase.clone().unwrap_or_else(|| "Pending".into());
    match &p.metadata.deletion_timestamp {
        Some(t) if phase != "Failed" && phase != "Succeeded" => {
            w.w(0, &format!("Status:\tTerminating (lasts {})\n", since(Some(&t.0), now)));
            w.w(0, &format!("Termination Grace Period:\t{}s\n", p.metadata.deletion_grace_period_seconds.unwrap_or(0)));
        }
        _ => w.w(0, &format!("Status:\t{phase}\n")),
    }
    if let Some(r) = status.reason.as_deref().filter(|s| !s.is_empty()) {
        w.w(0, &format!("Reason:\t{r}\n"));
    }
    if let Some(m) = status.message.as_deref().filter(|s| !s.is_empty()) {
        w.w(0, &format!("Message:\t{m}\n"));
    }
    w.w(0, &format!("IP:\t{}\n", status.pod_ip.as_deref().unwrap_or("")));
    let ips: Vec<String> = match status.pod_ips.as_ref().filter(|i| !i.is_empty()) {
        Some(ips) => ips.iter().map(|i| i.ip.clone()).collect(),
        None => status.pod_ip.iter().filter(|i| !i.is_empty()).cloned().collect(),
    };
    if ips.is_empty() {
        w.w(0, "IPs:\t<none>\n");
    } else {
        w.w(0, "IPs:\n");
        for ip in ips {
            w.w(1, &format!("IP:\t{ip}\n"));
        }
    }
    if let Some(c) = controller_of(&p.metadata) {
        w.w(0, &format!("Controlled By:\t{c}\n"));
    }
    if let Some(n) = status.nominated_node_name.as_deref().filter(|s| !s.is_empty()) {
        w.w(0, &format!("NominatedNodeName:\t{n}\n"));
    }
    if let Some(init) = spec.init_containers.as_ref().filter(|c| !c.is_empty()) {
        containers(&mut w, "Init Containers", init, status.init_container_statuses.as_ref(), "");
    }
    containers(&mut w, "Containers", &spec.containers, status.container_statuses.as_ref(), "");
    if let Some(gates) = spec.readiness_gates.as_ref().filter(|g| !g.is_empty()) {
        w.w(0, "Readiness Gates:\n  Type\tStatus\n");
        for g in gates {
            let st = status
                .conditions
                .iter()
                .flatten()
                .find(|c| c.type_ == g.condition_type)
                .map(|c| c.status.clone())
                .unwrap_or_else(|| "<none>".into());
            w.w(1, &format!("{} \t{st} \n", g.condition_type));
        }
    }
    if let Some(conds) = status.conditions.as_ref().filter(|c| !c.is_empty()) {
        w.w(0, "Conditions:\n  Type\tStatus\n");
        for c in conds {
            w.w(1, &format!("{} \t{} \n", c.type_, c.status));
        }
    }
    volumes(&mut w, spec.volumes.as_ref(), "");
    w.w(0, &format!("QoS Class:\t{}\n", qos_class(p)));
    labels_multiline(&mut w, "", "Node-Selectors", spec.node_selector.as_ref());
    tolerations_multiline(&mut w, "", "Tolerations", spec.tolerations.as_ref());
    events_section(&mut w, events, now);
    w.done()
}

/// Phases of the pods a controller controls: running, waiting (pending), succeeded, failed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PodCounts {
    pub running: usize,
    pub waiting: usize,
    pub succeeded: usize,
    pub failed: usize,
}

/// Counts the pods `selector` selects whose controller is `uid`, as kubectl's `getPodStatusForController` does.
pub fn pod_counts(pods: &[Pod], selector: &Selector, uid: &str) -> PodCounts {
    let mut c = PodCounts::default();
    for p in pods {
        if !selector.matches(p.metadata.labels.as_ref()) || !owned::controlled_by(&p.metadata, uid) {
            continue;
        }
        match p.status.as_ref().and_then(|s| s.phase.as_deref()).unwrap_or("Pending") {
            "Running" => c.running += 1,
            "Pending" => c.waiting += 1,
            "Succeeded" => c.succeeded += 1,
            "Failed" => c.failed += 1,
            _ => {}
        }
    }
    c
}

fn pods_status(w: &mut W, c: PodCounts) {
    w.w(
        0,
        &format!(
            "Pods Status:\t{} Running / {} Waiting / {} Succeeded / {} Failed\n",
            c.running, c.waiting, c.succeeded, c.failed
        ),
    );
}

fn conditions3<'a>(w: &mut W, conds: impl Iterator<Item = (&'a str, &'a str, &'a str)>) {
    let conds: Vec<_> = conds.collect();
    if conds.is_empty() {
        return;
    }
    w.w(0, "Conditions:\n  Type\tStatus\tReason\n");
    w.w(1, "----\t------\t------\n");
    for (t, s, r) in conds {
        w.w(1, &format!("{t} \t{s}\t{r}\n"));
    }
}

fn replicasets_line(rss: &[&ReplicaSet]) -> String {
    let parts: Vec<String> = rss
        .iter()
        .map(|rs| {
            format!(
                "{} ({}/{} replicas created)",
                name(&rs.metadata),
                rs.status.as_ref().map_or(0, |s| s.replicas),
                rs.spec.replicas.unwrap_or(1)
            )
        })
        .collect();
    crate::table::none_if_empty(parts.join(", "))
}

/// `kubectl describe deployment`: `old` and `new` are the ReplicaSets it owns (see `owned::new_and_old`).
pub fn describe_deployment(
    d: &Deployment,
    old: &[ReplicaSet],
    new: Option<&ReplicaSet>,
    events: Option<&[Event]>,
    now: Timestamp,
) -> String {
    let mut w = W::default();
    let st = d.status.clone().unwrap_or_default();
    w.w(0, &format!("Name:\t{}\n", name(&d.metadata)));
    w.w(0, &format!("Namespace:\t{}\n", ns(&d.metadata)));
    w.w(0, &format!("CreationTimestamp:\t{}\n", time(d.metadata.creation_timestamp.as_ref())));
    labels_multiline(&mut w, "", "Labels", d.metadata.labels.as_ref());
    annotations_multiline(&mut w, "Annotations", d.metadata.annotations.as_ref());
    let selector = Selector::from_label_selector(Some(&d.spec.selector)).map(|s| s.to_string()).unwrap_or_default();
    w.w(0, &format!("Selector:\t{selector}\n"));
    w.w(
        0,
        &format!(
            "Replicas:\t{} desired | {} updated | {} total | {} available | {} unavailable\n",
            d.spec.replicas.unwrap_or(1),
            st.updated_replicas.unwrap_or(0),
            st.replicas.unwrap_or(0),
            st.available_replicas.unwrap_or(0),
            st.unavailable_replicas.unwrap_or(0)
        ),
    );
    let strategy = d.spec.strategy.clone().unwrap_or_default();
    let type_ = strategy.type_.clone().unwrap_or_else(|| "RollingUpdate".into());
    w.w(0, &format!("StrategyType:\t{type_}\n"));
    w.w(0, &format!("MinReadySeconds:\t{}\n", d.spec.min_ready_seconds.unwrap_or(0)));
    if type_ == "RollingUpdate" {
        let ru = strategy.rolling_update.clone().unwrap_or_default();
        let pct = || IntOrString::String("25%".into());
        w.w(
            0,
            &format!(
                "RollingUpdateStrategy:\t{} max unavailable, {} max surge\n",
                int_or_string(&ru.max_unavailable.unwrap_or_else(pct)),
                int_or_string(&ru.max_surge.unwrap_or_else(pct))
            ),
        );
    }
    pod_template(&mut w, Some(&d.spec.template));
    conditions3(
        &mut w,
        st.conditions.iter().flatten().map(|c| {
            (c.type_.as_deref().unwrap_or(""), c.status.as_deref().unwrap_or(""), c.reason.as_deref().unwrap_or(""))
        }),
    );
    if !old.is_empty() || new.is_some() {
        w.w(0, &format!("OldReplicaSets:\t{}\n", replicasets_line(&old.iter().collect::<Vec<_>>())));
        w.w(0, &format!("NewReplicaSet:\t{}\n", replicasets_line(&new.into_iter().collect::<Vec<_>>())));
    }
    events_section(&mut w, events, now);
    w.done()
}

/// `kubectl describe replicaset`.
pub fn describe_replicaset(rs: &ReplicaSet, counts: PodCounts, events: Option<&[Event]>, now: Timestamp) -> String {
    let mut w = W::default();
    w.w(0, &format!("Name:\t{}\n", name(&rs.metadata)));
    w.w(0, &format!("Namespace:\t{}\n", ns(&rs.metadata)));
    w.w(0, &format!("Selector:\t{}\n", format_label_selector(&rs.spec.selector)));
    labels_multiline(&mut w, "", "Labels", rs.metadata.labels.as_ref());
    annotations_multiline(&mut w, "Annotations", rs.metadata.annotations.as_ref());
    if let Some(c) = controller_of(&rs.metadata) {
        w.w(0, &format!("Controlled By:\t{c}\n"));
    }
    w.w(
        0,
        &format!(
            "Replicas:\t{} current / {} desired\n",
            rs.status.as_ref().map_or(0, |s| s.replicas),
            rs.spec.replicas.unwrap_or(1)
        ),
    );
    pods_status(&mut w, counts);
    pod_template(&mut w, rs.spec.template.as_ref());
    let conds = rs.status.as_ref().and_then(|s| s.conditions.as_ref());
    conditions3(
        &mut w,
        conds.into_iter().flatten().map(|c| {
            (c.type_.as_deref().unwrap_or(""), c.status.as_deref().unwrap_or(""), c.reason.as_deref().unwrap_or(""))
        }),
    );
    events_section(&mut w, events, now);
    w.done()
}

/// `kubectl describe replicationcontroller`.
pub fn describe_replicationcontroller(
    rc: &ReplicationController,
    counts: PodCounts,
    events: Option<&[Event]>,
    now: Timestamp,
) -> String {
    let mut w = W::default();
    let spec = rc.spec.clone().unwrap_or_default();
    w.w(0, &format!("Name:\t{}\n", name(&rc.metadata)));
    w.w(0, &format!("Namespace:\t{}\n", ns(&rc.metadata)));
    w.w(0, &format!("Selector:\t{}\n", format_labels(spec.selector.as_ref())));
    labels_multiline(&mut w, "", "Labels", rc.metadata.labels.as_ref());
    annotations_multiline(&mut w, "Annotations", rc.metadata.annotations.as_ref());
    w.w(
        0,
        &format!(
            "Replicas:\t{} current / {} desired\n",
            rc.status.as_ref().map_or(0, |s| s.replicas),
            spec.replicas.unwrap_or(1)
        ),
    );
    pods_status(&mut w, counts);
    pod_template(&mut w, spec.template.as_ref());
    let conds = rc.status.as_ref().and_then(|s| s.conditions.as_ref());
    conditions3(
        &mut w,
        conds.into_iter().flatten().map(|c| (c.type_.as_str(), c.status.as_str(), c.reason.as_deref().unwrap_or(""))),
    );
    events_section(&mut w, events, now);
    w.done()
}

/// `kubectl describe daemonset`.
pub fn describe_daemonset(ds: &DaemonSet, counts: PodCounts, events: Option<&[Event]>, now: Timestamp) -> String {
    let mut w = W::default();
    let st = ds.status.clone().unwrap_or_default();
    w.w(0, &format!("Name:\t{}\n", name(&ds.metadata)));
    w.w(0, &format!("Namespace:\t{}\n", ns(&ds.metadata)));
    let selector = Selector::from_label_selector(Some(&ds.spec.selector)).map(|s| s.to_string()).unwrap_or_default();
    w.w(0, &format!("Selector:\t{selector}\n"));
    let node_selector = ds.spec.template.spec.as_ref().and_then(|s| s.node_selector.as_ref());
    w.w(0, &format!("Node-Selector:\t{}\n", format_labels(node_selector)));
    labels_multiline(&mut w, "", "Labels", ds.metadata.labels.as_ref());
    annotations_multiline(&mut w, "Annotations", ds.metadata.annotations.as_ref());
    w.w(0, &format!("Desired Number of Nodes Scheduled: {}\n", st.desired_number_scheduled));
    w.w(0, &format!("Current Number of Nodes Scheduled: {}\n", st.current_number_scheduled));
    w.w(0, &format!("Number of Nodes Scheduled with Up-to-date Pods: {}\n", st.updated_number_scheduled.unwrap_or(0)));
    w.w(0, &format!("Number of Nodes Scheduled with Available Pods: {}\n", st.number_available.unwrap_or(0)));
    w.w(0, &format!("Number of Nodes Misscheduled: {}\n", st.number_misscheduled));
    pods_status(&mut w, counts);
    pod_template(&mut w, Some(&ds.spec.template));
    events_section(&mut w, events, now);
    w.done()
}

/// `kubectl describe service`; `endpoints` is the Service's Endpoints object, if there is one.
pub fn describe_service(
    svc: &Service,
    endpoints: Option<&Endpoints>,
    events: Option<&[Event]>,
    now: Timestamp,
) -> String {
    let mut svc = svc.clone();
    weft_api::service::apply_defaults(&mut svc);
    let spec = svc.spec.clone().unwrap_or_default();
    let mut w = W::default();
    w.w(0, &format!("Name:\t{}\n", name(&svc.metadata)));
    w.w(0, &format!("Namespace:\t{}\n", ns(&svc.metadata)));
    labels_multiline(&mut w, "", "Labels", svc.metadata.labels.as_ref());
    annotations_multiline(&mut w, "Annotations", svc.metadata.annotations.as_ref());
    w.w(0, &format!("Selector:\t{}\n", format_labels(spec.selector.as_ref())));
    w.w(0, &format!("Type:\t{}\n", spec.type_.as_deref().unwrap_or("ClusterIP")));
    if let Some(p) = &spec.ip_family_policy {
        w.w(0, &format!("IP Family Policy:\t{p}\n"));
    }
    let families = spec.ip_families.clone().unwrap_or_default();
    w.w(0, &format!("IP Families:\t{}\n", crate::table::none_if_empty(families.join(","))));
    w.w(0, &format!("IP:\t{}\n", spec.cluster_ip.as_deref().unwrap_or("")));
    let ips = spec.cluster_ips.clone().unwrap_or_default();
    w.w(0, &format!("IPs:\t{}\n", crate::table::none_if_empty(ips.join(","))));
    if let Some(ext) = spec.external_ips.as_ref().filter(|e| !e.is_empty()) {
        w.w(0, &format!("External IPs:\t{}\n", ext.join(",")));
    }
    if let Some(ip) = spec.load_balancer_ip.as_deref().filter(|s| !s.is_empty()) {
        w.w(0, &format!("Desired LoadBalancer IP:\t{ip}\n"));
    }
    if let Some(n) = spec.external_name.as_deref().filter(|s| !s.is_empty()) {
        w.w(0, &format!("External Name:\t{n}\n"));
    }
    let ingress = svc.status.as_ref().and_then(|s| s.load_balancer.as_ref()).and_then(|l| l.ingress.as_ref());
    if let Some(ingress) = ingress.filter(|i| !i.is_empty()) {
        let list: Vec<String> = ingress
            .iter()
            .map(|i| match (&i.ip, &i.ip_mode) {
                (Some(ip), Some(mode)) if !ip.is_empty() => format!("{ip} ({mode})"),
                (Some(ip), None) if !ip.is_empty() => ip.clone(),
                _ => i.hostname.clone().unwrap_or_default(),
            })
            .collect();
        w.w(0, &format!("LoadBalancer Ingress:\t{}\n", list.join(", ")));
    }
    let empty = Endpoints::default();
    for p in spec.ports.iter().flatten() {
        let pname = p.name.clone().filter(|n| !n.is_empty());
        let shown = pname.clone().unwrap_or_else(|| "<unset>".into());
        let proto = protocol(p.protocol.as_ref());
        w.w(0, &format!("Port:\t{shown}\t{}/{proto}\n", p.port));
        let target = p.target_port.as_ref().map(int_or_string).unwrap_or_else(|| p.port.to_string());
        w.w(0, &format!("TargetPort:\t{target}/{proto}\n"));
        if let Some(ap) = &p.app_protocol {
            w.w(0, &format!("AppProtocol:\t{ap}\n"));
        }
        if let Some(np) = p.node_port.filter(|n| *n != 0) {
            w.w(0, &format!("NodePort:\t{shown}\t{np}/{proto}\n"));
        }
        let ep = endpoints.unwrap_or(&empty);
        w.w(0, &format!("Endpoints:\t{}\n", format_endpoints(ep, Some(pname.as_deref().unwrap_or("")))));
    }
    w.w(0, &format!("Session Affinity:\t{}\n", spec.session_affinity.as_deref().unwrap_or("")));
    if let Some(p) = spec.external_traffic_policy.as_deref().filter(|s| !s.is_empty()) {
        w.w(0, &format!("External Traffic Policy:\t{p}\n"));
    }
    if let Some(p) = &spec.internal_traffic_policy {
        w.w(0, &format!("Internal Traffic Policy:\t{p}\n"));
    }
    if let Some(np) = spec.health_check_node_port.filter(|n| *n != 0) {
        w.w(0, &format!("HealthCheck NodePort:\t{np}\n"));
    }
    if let Some(r) = spec.load_balancer_source_ranges.as_ref().filter(|r| !r.is_empty()) {
        w.w(0, &format!("LoadBalancer Source Ranges:\t{}\n", r.join(",")));
    }
    events_section(&mut w, events, now);
    w.done()
}

/// `kubectl describe endpoints`.
pub fn describe_endpoints(ep: &Endpoints, events: Option<&[Event]>, now: Timestamp) -> String {
    let mut w = W::default();
    w.w(0, &format!("Name:\t{}\n", name(&ep.metadata)));
    w.w(0, &format!("Namespace:\t{}\n", ns(&ep.metadata)));
    labels_multiline(&mut w, "", "Labels", ep.metadata.labels.as_ref());
    annotations_multiline(&mut w, "Annotations", ep.metadata.annotations.as_ref());
    w.w(0, "Subsets:\n");
    for ss in ep.subsets.iter().flatten() {
        let ips = |a: &Option<Vec<k8s_openapi::api::core::v1::EndpointAddress>>| {
            crate::table::none_if_empty(a.iter().flatten().map(|a| a.ip.clone()).collect::<Vec<_>>().join(","))
        };
        w.w(1, &format!("Addresses:\t{}\n", ips(&ss.addresses)));
        w.w(1, &format!("NotReadyAddresses:\t{}\n", ips(&ss.not_ready_addresses)));
        if let Some(ports) = ss.ports.as_ref().filter(|p| !p.is_empty()) {
            w.w(1, "Ports:\n");
            w.w(2, "Name\tPort\tProtocol\n");
            w.w(2, "----\t----\t--------\n");
            for p in ports {
                let pname = p.name.clone().filter(|n| !n.is_empty()).unwrap_or_else(|| "<unset>".into());
                w.w(2, &format!("{pname}\t{}\t{}\n", p.port, protocol(p.protocol.as_ref())));
            }
        }
        w.w(0, "\n");
    }
    events_section(&mut w, events, now);
    w.done()
}

/// The node's Lease in `kube-node-lease`, or why there is none.
pub type LeaseInfo = Result<Lease, String>;

/// `kubectl describe node`; `pods` are every pod (those bound to the node and not finished are shown).
pub fn describe_node(
    n: &Node,
    pods: &[Pod],
    lease: Option<&LeaseInfo>,
    events: Option<&[Event]>,
    now: Timestamp,
) -> String {
    let mut w = W::default();
    let spec = n.spec.clone().unwrap_or_default();
    let st = n.status.clone().unwrap_or_default();
    let node_name = name(&n.metadata);
    w.w(0, &format!("Name:\t{node_name}\n"));
    w.w(0, &format!("Roles:\t{}\n", crate::table::none_if_empty(crate::table::node_roles(n).join(","))));
    labels_multiline(&mut w, "", "Labels", n.metadata.labels.as_ref());
    annotations_multiline(&mut w, "Annotations", n.metadata.annotations.as_ref());
    w.w(0, &format!("CreationTimestamp:\t{}\n", time(n.metadata.creation_timestamp.as_ref())));
    w.w(0, "Taints:\t");
    let mut taints = spec.taints.clone().unwrap_or_default();
    if taints.is_empty() {
        w.w(0, "<none>\n");
    }
    taints.sort_by_key(|t| format!("{},{}", t.effect, t.key));
    for (i, t) in taints.iter().enumerate() {
        if i != 0 {
            w.w(0, "\t");
        }
        let value = t.value.clone().unwrap_or_default();
        let s = match (t.effect.is_empty(), value.is_empty()) {
            (true, true) => t.key.clone(),
            (true, false) => format!("{}={value}:", t.key),
            (false, true) => format!("{}:{}", t.key, t.effect),
            (false, false) => format!("{}={value}:{}", t.key, t.effect),
        };
        w.w(0, &format!("{s}\n"));
    }
    w.w(0, &format!("Unschedulable:\t{}\n", spec.unschedulable.unwrap_or(false)));
    match lease {
        None => {}
        Some(Ok(l)) => {
            let s = l.spec.clone().unwrap_or_default();
            w.w(0, "Lease:\n");
            w.w(1, &format!("HolderIdentity:\t{}\n", s.holder_identity.as_deref().unwrap_or("<unset>")));
            let t = |t: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime>| {
                t.map(|t| rfc1123z(&t.0)).unwrap_or_else(|| "<unset>".into())
            };
            w.w(1, &format!("AcquireTime:\t{}\n", t(s.acquire_time.as_ref())));
            w.w(1, &format!("RenewTime:\t{}\n", t(s.renew_time.as_ref())));
        }
        Some(Err(e)) => w.w(0, &format!("Lease:\tFailed to get lease: {e}\n")),
    }
    if let Some(conds) = st.conditions.as_ref().filter(|c| !c.is_empty()) {
        w.w(0, "Conditions:\n  Type\tStatus\tLastHeartbeatTime\tLastTransitionTime\tReason\tMessage\n");
        w.w(1, "----\t------\t-----------------\t------------------\t------\t-------\n");
        for c in conds {
            w.w(
                1,
                &format!(
                    "{} \t{} \t{} \t{} \t{} \t{}\n",
                    c.type_,
                    c.status,
                    time(c.last_heartbeat_time.as_ref()),
                    time(c.last_transition_time.as_ref()),
                    c.reason.as_deref().unwrap_or(""),
                    c.message.as_deref().unwrap_or("")
                ),
            );
        }
    }
    w.w(0, "Addresses:\n");
    for a in st.addresses.iter().flatten() {
        w.w(1, &format!("{}:\t{}\n", a.type_, a.address));
    }
    for (title, list) in [("Capacity", &st.capacity), ("Allocatable", &st.allocatable)] {
        if let Some(list) = list.as_ref().filter(|l| !l.is_empty()) {
            w.w(0, &format!("{title}:\n"));
            for (k, q) in list {
                let shown = Quantity::parse(&q.0).map(|q| q.to_string()).unwrap_or_else(|| q.0.clone());
                w.w(0, &format!("  {k}:\t{shown}\n"));
            }
        }
    }
    let info = st.node_info.clone().unwrap_or_default();
    w.w(0, "System Info:\n");
    for (k, v) in [
        ("Machine ID", &info.machine_id),
        ("System UUID", &info.system_uuid),
        ("Boot ID", &info.boot_id),
        ("Kernel Version", &info.kernel_version),
        ("OS Image", &info.os_image),
        ("Operating System", &info.operating_system),
        ("Architecture", &info.architecture),
        ("Container Runtime Version", &info.container_runtime_version),
        ("Kubelet Version", &info.kubelet_version),
    ] {
        w.w(0, &format!("  {k}:\t{v}\n"));
    }
    if let Some(c) = spec.pod_cidr.as_deref().filter(|s| !s.is_empty()) {
        w.w(0, &format!("PodCIDR:\t{c}\n"));
    }
    if let Some(c) = spec.pod_cidrs.as_ref().filter(|c| !c.is_empty()) {
        w.w(0, &format!("PodCIDRs:\t{}\n", c.join(",")));
    }
    if let Some(p) = spec.provider_id.as_deref().filter(|s| !s.is_empty()) {
        w.w(0, &format!("ProviderID:\t{p}\n"));
    }
    // Non-terminated pods and what they ask of the node.
    let on_node: Vec<&Pod> = pods
        .iter()
        .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node_name))
        .filter(|p| !matches!(p.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed")))
        .collect();
    let allocatable = st.allocatable.clone().filter(|a| !a.is_empty()).or(st.capacity.clone()).unwrap_or_default();
    let alloc = |k: &str| allocatable.get(k).and_then(|q| Quantity::parse(&q.0)).unwrap_or_default();
    let pct = |part: i128, whole: i128| if whole == 0 { 0 } else { (part as f64 / whole as f64 * 100.0) as i64 };
    let (cpu, mem) = (alloc("cpu").milli(), alloc("memory").value());
    w.w(0, &format!("Non-terminated Pods:\t({} in total)\n", on_node.len()));
    w.w(1, "Namespace\tName\t\tCPU Requests\tCPU Limits\tMemory Requests\tMemory Limits\tAge\n");
    w.w(1, "---------\t----\t\t------------\t----------\t---------------\t-------------\t---\n");
    let (mut reqs, mut limits) = (BTreeMap::<String, Quantity>::new(), BTreeMap::<String, Quantity>::new());
    for p in &on_node {
        let (r, l) = (pod_resources(p, false), pod_resources(p, true));
        let get = |m: &BTreeMap<String, Quantity>, k: &str| m.get(k).copied().unwrap_or_default();
        let (cr, cl, mr, ml) = (get(&r, "cpu"), get(&l, "cpu"), get(&r, "memory"), get(&l, "memory"));
        w.w(
            1,
            &format!(
                "{}\t{}\t\t{cr} ({}%)\t{cl} ({}%)\t{mr} ({}%)\t{ml} ({}%)\t{}\n",
                ns(&p.metadata),
                name(&p.metadata),
                pct(cr.milli(), cpu),
                pct(cl.milli(), cpu),
                pct(mr.value(), mem),
                pct(ml.value(), mem),
                since(p.metadata.creation_timestamp.as_ref().map(|t| &t.0), now)
            ),
        );
        for (k, q) in r {
            let e = reqs.entry(k).or_default();
            *e = e.plus(q);
        }
        for (k, q) in l {
            let e = limits.entry(k).or_default();
            *e = e.plus(q);
        }
    }
    w.w(0, "Allocated resources:\n  (Total limits may be over 100 percent, i.e., overcommitted.)\n");
    w.w(1, "Resource\tRequests\tLimits\n");
    w.w(1, "--------\t--------\t------\n");
    let get = |m: &BTreeMap<String, Quantity>, k: &str| m.get(k).copied().unwrap_or_default();
    for (k, whole, milli) in
        [("cpu", cpu, true), ("memory", mem, false), ("ephemeral-storage", alloc("ephemeral-storage").value(), false)]
    {
        let (r, l) = (get(&reqs, k), get(&limits, k));
        let amount = |q: Quantity| if milli { q.milli() } else { q.value() };
        w.w(1, &format!("{k}\t{r} ({}%)\t{l} ({}%)\n", pct(amount(r), whole), pct(amount(l), whole)));
    }
    for k in allocatable.keys().filter(|k| k.starts_with("hugepages-")) {
        let (r, l) = (get(&reqs, k), get(&limits, k));
        let whole = alloc(k).value();
        w.w(1, &format!("{k}\t{r} ({}%)\t{l} ({}%)\n", pct(r.value(), whole), pct(l.value(), whole)));
    }
    let standard = ["cpu", "memory", "ephemeral-storage", "pods"];
    for k in allocatable.keys().filter(|k| !k.starts_with("hugepages-") && !standard.contains(&k.as_str())) {
        w.w(1, &format!("{k}\t{}\t{}\n", get(&reqs, k), get(&limits, k)));
    }
    events_section(&mut w, events, now);
    w.done()
}

/// `kubectl describe namespace` (weft has no ResourceQuotas or LimitRanges).
pub fn describe_namespace(n: &Namespace) -> String {
    let mut w = W::default();
    w.w(0, &format!("Name:\t{}\n", name(&n.metadata)));
    labels_multiline(&mut w, "", "Labels", n.metadata.labels.as_ref());
    annotations_multiline(&mut w, "Annotations", n.metadata.annotations.as_ref());
    w.w(
        0,
        &format!("Status:\t{}\n", n.status.as_ref().and_then(|s| s.phase.clone()).unwrap_or_else(|| "Active".into())),
    );
    w.w(0, "\nNo resource quota.\n");
    w.w(0, "\nNo LimitRange resource.\n");
    w.done()
}

// ---- the command ----

#[derive(Debug, Clone, clap::Args)]
pub struct DescribeArgs {
    /// KIND [NAME_PREFIX...] or KIND/NAME...
    #[arg(required = true)]
    pub args: Vec<String>,
    #[arg(short = 'n', long = "namespace")]
    pub namespace: Option<String>,
    /// every namespace
    #[arg(short = 'A', long = "all-namespaces")]
    pub all_namespaces: bool,
    /// label selector
    #[arg(short = 'l', long = "selector")]
    pub selector: Option<String>,
    /// show Events (when one object is described; set explicitly to show them for several)
    #[arg(long = "show-events", action = clap::ArgAction::Set, num_args = 0..=1, require_equals = true,
          default_missing_value = "true")]
    pub show_events: Option<bool>,
    #[command(flatten)]
    pub etcd: EtcdArgs,
}

pub async fn describe(args: DescribeArgs) -> anyhow::Result<i32> {
    let store = verbs::open(&args.etcd).await?;
    describe_to(&store, &args, &mut std::io::stdout()).await
}

pub async fn describe_to(store: &Store, args: &DescribeArgs, out: &mut dyn Write) -> anyhow::Result<i32> {
    let targets = parse_targets(&args.args)?;
    let selector = args.selector.as_deref().map(Selector::parse).transpose()?;
    let ns = namespace_of(&args.namespace);
    let scope = if args.all_namespaces { None } else { Some(ns.as_str()) };
    let mut code = 0;
    let mut found: Vec<(Kind, String, String)> = Vec::new(); // kind, namespace, name
    for t in &targets {
        let names = weft_api::with_kind!(t.kind, K => names_of::<K>(store, t.kind, scope, &t.names, selector.as_ref(), args.args.len() == 2 && !args.args[0].contains('/'), &mut code).await?);
        found.extend(names.into_iter().map(|(n, name)| (t.kind, n, name)));
    }
    if found.is_empty() && code == 0 {
        if args.all_namespaces {
            eprintln!("No resources found");
        } else {
            eprintln!("No resources found in {ns} namespace.");
        }
        return Ok(0);
    }
    let events = args.show_events.unwrap_or(found.len() == 1);
    let now = verbs::now();
    for (i, (kind, namespace, name)) in found.iter().enumerate() {
        let text = describe_one(store, *kind, namespace, name, events, now).await?;
        if i > 0 {
            out.write_all(b"\n\n")?;
        }
        out.write_all(text.as_bytes())?;
    }
    Ok(code)
}

/// The (namespace, name) of each object to describe: the named ones (a name that matches nothing is taken as a
/// prefix, as kubectl does when given one kind and one name), or every one the selector selects.
async fn names_of<K: Object>(
    store: &Store,
    kind: Kind,
    scope: Option<&str>,
    names: &[String],
    selector: Option<&Selector>,
    prefix_allowed: bool,
    code: &mut i32,
) -> anyhow::Result<Vec<(String, String)>> {
    let key =
        |o: &K| (o.metadata().namespace.clone().unwrap_or_default(), o.metadata().name.clone().unwrap_or_default());
    if names.is_empty() {
        let (items, _) = store.list::<K>(scope).await?;
        return Ok(items
            .iter()
            .filter(|o| selector.is_none_or(|s| s.matches(o.metadata().labels.as_ref())))
            .map(key)
            .collect());
    }
    if selector.is_some() {
        bail!("{}", verbs::names_and_selector(names));
    }
    let mut out = Vec::new();
    for name in names {
        match store.get::<K>(scope, name).await {
            Ok(o) => out.push(key(&o)),
            Err(e) if e.is_not_found() => {
                let (items, _) = store.list::<K>(scope).await?;
                let matching: Vec<_> = items
                    .iter()
                    .filter(|o| {
                        prefix_allowed && o.metadata().name.as_deref().is_some_and(|n| n.starts_with(name.as_str()))
                    })
                    .map(key)
                    .collect();
                if matching.is_empty() {
                    eprintln!("{}", verbs::not_found(kind, name));
                    *code = 1;
                }
                out.extend(matching);
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(out)
}

/// Events about the object with `uid` (or, for nodes, named by the node's name as kubelets do).
async fn events_for(store: &Store, ns: Option<&str>, uid: &str, alt_uid: Option<&str>) -> anyhow::Result<Vec<Event>> {
    let (all, _) = store.list::<Event>(ns).await?;
    Ok(all
        .into_iter()
        .filter(|e| {
            let u = e.involved_object.uid.as_deref();
            u == Some(uid) || (alt_uid.is_some() && u == alt_uid)
        })
        .collect())
}

async fn describe_one(
    store: &Store,
    kind: Kind,
    namespace: &str,
    name: &str,
    show_events: bool,
    now: Timestamp,
) -> anyhow::Result<String> {
    let ns = Some(namespace).filter(|n| !n.is_empty());
    macro_rules! events {
        ($meta:expr) => {
            if show_events {
                Some(events_for(store, ns, $meta.uid.as_deref().unwrap_or(""), None).await?)
            } else {
                None
            }
        };
    }
    let pods = || async { Ok::<_, anyhow::Error>(store.list::<Pod>(ns).await?.0) };
    Ok(match kind {
        Kind::Pod => {
            let p: Pod = store.get(ns, name).await?;
            describe_pod(&p, events!(p.metadata).as_deref(), now)
        }
        Kind::Deployment => {
            let d: Deployment = store.get(ns, name).await?;
            let owned = owned::replicasets_of(store, &d).await?;
            let (new, old) = owned::new_and_old(&d, &owned);
            describe_deployment(&d, &old, new.as_ref(), events!(d.metadata).as_deref(), now)
        }
        Kind::ReplicaSet => {
            let rs: ReplicaSet = store.get(ns, name).await?;
            let sel = Selector::from_label_selector(Some(&rs.spec.selector)).unwrap_or_default();
            let counts = pod_counts(&pods().await?, &sel, rs.metadata.uid.as_deref().unwrap_or(""));
            describe_replicaset(&rs, counts, events!(rs.metadata).as_deref(), now)
        }
        Kind::ReplicationController => {
            let rc: ReplicationController = store.get(ns, name).await?;
            let sel = Selector::from_map(&rc.spec.as_ref().and_then(|s| s.selector.clone()).unwrap_or_default());
            let counts = pod_counts(&pods().await?, &sel, rc.metadata.uid.as_deref().unwrap_or(""));
            describe_replicationcontroller(&rc, counts, events!(rc.metadata).as_deref(), now)
        }
        Kind::DaemonSet => {
            let ds: DaemonSet = store.get(ns, name).await?;
            let sel = Selector::from_label_selector(Some(&ds.spec.selector)).unwrap_or_default();
            let counts = pod_counts(&pods().await?, &sel, ds.metadata.uid.as_deref().unwrap_or(""));
            describe_daemonset(&ds, counts, events!(ds.metadata).as_deref(), now)
        }
        Kind::Service => {
            let svc: Service = store.get(ns, name).await?;
            let ep = store.get::<Endpoints>(ns, name).await.ok();
            describe_service(&svc, ep.as_ref(), events!(svc.metadata).as_deref(), now)
        }
        Kind::Endpoints => {
            let ep: Endpoints = store.get(ns, name).await?;
            describe_endpoints(&ep, events!(ep.metadata).as_deref(), now)
        }
        Kind::Node => {
            let n: Node = store.get(None, name).await?;
            let lease = match store.get::<Lease>(Some("kube-node-lease"), name).await {
                Ok(l) => Ok(l),
                Err(e) if e.is_not_found() => Err(format!("leases.coordination.k8s.io {name:?} not found")),
                Err(e) => Err(weft_api::error_chain(&e)),
            };
            let events = if show_events {
                Some(events_for(store, None, n.metadata.uid.as_deref().unwrap_or(""), Some(name)).await?)
            } else {
                None
            };
            let pods = store.list::<Pod>(None).await?.0;
            describe_node(&n, &pods, Some(&lease), events.as_deref(), now)
        }
        Kind::Namespace => describe_namespace(&store.get::<Namespace>(None, name).await?),
        Kind::Lease => bail!("describe does not print leases yet: use `weft get leases -o yaml`"),
    })
}
