//! `weft get`'s tables, as kubectl prints them: pure functions from objects (and the time now) to text, so
//! golden files can pin them. Also label selectors (`-l`), which decide what a table shows.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{Endpoints, Namespace, Node, Pod, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid label selector {selector:?}: {problem}")]
    Selector { selector: String, problem: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Options that change columns: `-o wide`, and a NAMESPACE column for `-A`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Columns {
    pub wide: bool,
    pub namespace: bool,
}

/// Lays rows out as kubectl's tabwriter does: left aligned, three spaces between columns.
pub fn render(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            l.push_str(c);
            if i < last {
                l.push_str(&" ".repeat(widths[i] - c.chars().count() + 3));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(headers.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

/// kubectl's human duration: `45s`, `5m10s`, `3h`, `4d5h`, `2y30d`.
pub fn human_duration(secs: i64) -> String {
    let s = secs.max(0);
    let (m, h, d) = (s / 60, s / 3600, s / 86400);
    if s < 120 {
        format!("{s}s")
    } else if m < 10 {
        if s % 60 == 0 {
            format!("{m}m")
        } else {
            format!("{m}m{}s", s % 60)
        }
    } else if m < 180 {
        format!("{m}m")
    } else if h < 8 {
        if m % 60 == 0 {
            format!("{h}h")
        } else {
            format!("{h}h{}m", m % 60)
        }
    } else if h < 48 {
        format!("{h}h")
    } else if h < 24 * 8 {
        if h % 24 == 0 {
            format!("{d}d")
        } else {
            format!("{d}d{}h", h % 24)
        }
    } else if h < 24 * 365 * 2 {
        format!("{d}d")
    } else if h < 24 * 365 * 8 {
        let y = d / 365;
        if d % 365 == 0 {
            format!("{y}y")
        } else {
            format!("{y}y{}d", d % 365)
        }
    } else {
        format!("{}y", d / 365)
    }
}

pub fn age(created: Option<&Time>, now: Timestamp) -> String {
    match created {
        Some(t) => human_duration(now.as_second() - t.0.as_second()),
        None => "<unknown>".into(),
    }
}

fn none_if_empty(s: String) -> String {
    if s.is_empty() {
        "<none>".into()
    } else {
        s
    }
}

fn name(meta: &ObjectMeta) -> String {
    meta.name.clone().unwrap_or_default()
}

/// Builds a table of `objects`: the kind's headers and one row each (NAMESPACE first with `-A`).
fn table<K>(
    objects: &[K],
    cols: Columns,
    headers: &[&str],
    wide: &[&str],
    meta: impl Fn(&K) -> &ObjectMeta,
    row: impl Fn(&K) -> Vec<String>,
) -> String {
    let mut h: Vec<&str> = Vec::new();
    if cols.namespace {
        h.push("NAMESPACE");
    }
    h.extend_from_slice(headers);
    let n = h.len();
    if cols.wide {
        h.extend_from_slice(wide);
    }
    let rows: Vec<Vec<String>> = objects
        .iter()
        .map(|o| {
            let mut r = Vec::new();
            if cols.namespace {
                r.push(meta(o).namespace.clone().unwrap_or_default());
            }
            let mut cells = row(o);
            if !cols.wide {
                cells.truncate(n - usize::from(cols.namespace));
            }
            r.extend(cells);
            r
        })
        .collect();
    render(&h, &rows)
}

fn selector_text(sel: Option<&BTreeMap<String, String>>) -> String {
    none_if_empty(sel.into_iter().flatten().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(","))
}

pub fn services(items: &[Service], cols: Columns, now: Timestamp) -> String {
    table(
        items,
        cols,
        &["NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)", "AGE"],
        &["SELECTOR"],
        |s| &s.metadata,
        |s| {
            let spec = s.spec.clone().unwrap_or_default();
            let type_ = spec.type_.clone().unwrap_or_else(|| "ClusterIP".into());
            let mut external: Vec<String> = Vec::new();
            if type_ == "ExternalName" {
                external.extend(spec.external_name.clone());
            }
            if type_ == "LoadBalancer" {
                let ingress =
                    s.status.as_ref().and_then(|st| st.load_balancer.as_ref()).and_then(|lb| lb.ingress.as_ref());
                external
                    .extend(ingress.into_iter().flatten().filter_map(|i| i.ip.clone().or_else(|| i.hostname.clone())));
            }
            external.extend(spec.external_ips.clone().unwrap_or_default());
            let external = if external.is_empty() && type_ == "LoadBalancer" {
                "<pending>".to_string()
            } else {
                none_if_empty(external.join(","))
            };
            let ports: Vec<String> = spec
                .ports
                .iter()
                .flatten()
                .map(|p| {
                    let proto = p.protocol.clone().unwrap_or_else(|| "TCP".into());
                    match p.node_port {
                        Some(np) => format!("{}:{np}/{proto}", p.port),
                        None => format!("{}/{proto}", p.port),
                    }
                })
                .collect();
            vec![
                name(&s.metadata),
                type_,
                none_if_empty(spec.cluster_ip.clone().unwrap_or_default()),
                external,
                none_if_empty(ports.join(",")),
                age(s.metadata.creation_timestamp.as_ref(), now),
                selector_text(spec.selector.as_ref()),
            ]
        },
    )
}

/// `ip:port` of ready addresses, at most three then `+ N more...`, as kubectl shows them.
fn endpoints_text(ep: &Endpoints) -> String {
    let mut all = Vec::new();
    for subset in ep.subsets.iter().flatten() {
        let ports = subset.ports.clone().unwrap_or_default();
        for addr in subset.addresses.iter().flatten() {
            if ports.is_empty() {
                all.push(addr.ip.clone());
            }
            for p in &ports {
                all.push(format!("{}:{}", addr.ip, p.port));
            }
        }
    }
    if all.len() > 3 {
        format!("{} + {} more...", all[..3].join(","), all.len() - 3)
    } else {
        none_if_empty(all.join(","))
    }
}

pub fn endpoints(items: &[Endpoints], cols: Columns, now: Timestamp) -> String {
    table(
        items,
        cols,
        &["NAME", "ENDPOINTS", "AGE"],
        &[],
        |e| &e.metadata,
        |e| vec![name(&e.metadata), endpoints_text(e), age(e.metadata.creation_timestamp.as_ref(), now)],
    )
}

fn pod_status(p: &Pod) -> String {
    if p.metadata.deletion_timestamp.is_some() {
        return "Terminating".into();
    }
    let status = p.status.clone().unwrap_or_default();
    let mut reason = status.reason.clone().or(status.phase.clone()).unwrap_or_else(|| "Pending".into());
    for cs in status.container_statuses.iter().flatten() {
        let st = cs.state.as_ref();
        if let Some(r) = st.and_then(|s| s.waiting.as_ref()).and_then(|w| w.reason.clone()) {
            reason = r;
        } else if let Some(t) = st.and_then(|s| s.terminated.as_ref()) {
            reason = t.reason.clone().unwrap_or_else(|| format!("ExitCode:{}", t.exit_code));
        }
    }
    reason
}

pub fn pods(items: &[Pod], cols: Columns, now: Timestamp) -> String {
    table(
        items,
        cols,
        &["NAME", "READY", "STATUS", "RESTARTS", "AGE"],
        &["IP", "NODE"],
        |p| &p.metadata,
        |p| {
            let total = p.spec.as_ref().map(|s| s.containers.len()).unwrap_or(0);
            let statuses = p.status.as_ref().and_then(|s| s.container_statuses.clone()).unwrap_or_default();
            let ready = statuses.iter().filter(|c| c.ready).count();
            let restarts: i32 = statuses.iter().map(|c| c.restart_count).sum();
            vec![
                name(&p.metadata),
                format!("{ready}/{total}"),
                pod_status(p),
                restarts.to_string(),
                age(p.metadata.creation_timestamp.as_ref(), now),
                none_if_empty(p.status.as_ref().and_then(|s| s.pod_ip.clone()).unwrap_or_default()),
                none_if_empty(p.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_default()),
            ]
        },
    )
}

pub fn nodes(items: &[Node], cols: Columns, now: Timestamp) -> String {
    table(
        items,
        cols,
        &["NAME", "STATUS", "ROLES", "AGE", "VERSION"],
        &["INTERNAL-IP"],
        |n| &n.metadata,
        |n| {
            let conds = n.status.as_ref().and_then(|s| s.conditions.clone()).unwrap_or_default();
            let mut status = match conds.iter().find(|c| c.type_ == "Ready").map(|c| c.status.as_str()) {
                Some("True") => "Ready".to_string(),
                Some("False") => "NotReady".to_string(),
                _ => "Unknown".to_string(),
            };
            if n.spec.as_ref().and_then(|s| s.unschedulable) == Some(true) {
                status.push_str(",SchedulingDisabled");
            }
            let roles: Vec<String> = n
                .metadata
                .labels
                .iter()
                .flatten()
                .filter_map(|(k, _)| k.strip_prefix("node-role.kubernetes.io/").map(str::to_string))
                .filter(|r| !r.is_empty())
                .collect();
            let status_ref = n.status.as_ref();
            let version =
                status_ref.and_then(|s| s.node_info.as_ref()).map(|i| i.kubelet_version.clone()).unwrap_or_default();
            let internal = status_ref
                .and_then(|s| s.addresses.as_ref())
                .and_then(|a| a.iter().find(|a| a.type_ == "InternalIP"))
                .map(|a| a.address.clone())
                .unwrap_or_default();
            vec![
                name(&n.metadata),
                status,
                none_if_empty(roles.join(",")),
                age(n.metadata.creation_timestamp.as_ref(), now),
                version,
                none_if_empty(internal),
            ]
        },
    )
}

pub fn namespaces(items: &[Namespace], cols: Columns, now: Timestamp) -> String {
    table(
        items,
        cols,
        &["NAME", "STATUS", "AGE"],
        &[],
        |n| &n.metadata,
        |n| {
            vec![
                name(&n.metadata),
                n.status.as_ref().and_then(|s| s.phase.clone()).unwrap_or_else(|| "Active".into()),
                age(n.metadata.creation_timestamp.as_ref(), now),
            ]
        },
    )
}

pub fn deployments(items: &[Deployment], cols: Columns, now: Timestamp) -> String {
    table(
        items,
        cols,
        &["NAME", "READY", "UP-TO-DATE", "AVAILABLE", "AGE"],
        &[],
        |d| &d.metadata,
        |d| {
            let want = d.spec.replicas.unwrap_or(1);
            let st = d.status.clone().unwrap_or_default();
            vec![
                name(&d.metadata),
                format!("{}/{want}", st.ready_replicas.unwrap_or(0)),
                st.updated_replicas.unwrap_or(0).to_string(),
                st.available_replicas.unwrap_or(0).to_string(),
                age(d.metadata.creation_timestamp.as_ref(), now),
            ]
        },
    )
}

pub fn replicasets(items: &[ReplicaSet], cols: Columns, now: Timestamp) -> String {
    table(
        items,
        cols,
        &["NAME", "DESIRED", "CURRENT", "READY", "AGE"],
        &[],
        |r| &r.metadata,
        |r| {
            let st = r.status.clone().unwrap_or_default();
            vec![
                name(&r.metadata),
                r.spec.replicas.unwrap_or(1).to_string(),
                st.replicas.to_string(),
                st.ready_replicas.unwrap_or(0).to_string(),
                age(r.metadata.creation_timestamp.as_ref(), now),
            ]
        },
    )
}

pub fn daemonsets(items: &[DaemonSet], cols: Columns, now: Timestamp) -> String {
    table(
        items,
        cols,
        &["NAME", "DESIRED", "CURRENT", "READY", "UP-TO-DATE", "AVAILABLE", "AGE"],
        &[],
        |d| &d.metadata,
        |d| {
            let st = d.status.clone().unwrap_or_default();
            vec![
                name(&d.metadata),
                st.desired_number_scheduled.to_string(),
                st.current_number_scheduled.to_string(),
                st.number_ready.to_string(),
                st.updated_number_scheduled.unwrap_or(0).to_string(),
                st.number_available.unwrap_or(0).to_string(),
                age(d.metadata.creation_timestamp.as_ref(), now),
            ]
        },
    )
}

/// One requirement of an equality- or set-based label selector.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Requirement {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// A parsed `-l` selector: `app=web,tier!=db,env in (a,b),!legacy`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Selector(Vec<Requirement>);

/// Splits on commas that are not inside parentheses.
fn split_top(s: &str) -> Vec<&str> {
    let (mut depth, mut start, mut out) = (0, 0, Vec::new());
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

impl Selector {
    pub fn parse(s: &str) -> Result<Selector> {
        let err = |problem: &str| Error::Selector { selector: s.to_string(), problem: problem.to_string() };
        let mut reqs = Vec::new();
        for part in split_top(s).into_iter().map(str::trim).filter(|p| !p.is_empty()) {
            let set = |rest: &str| -> Result<Vec<String>> {
                let inner = rest
                    .trim()
                    .strip_prefix('(')
                    .and_then(|r| r.strip_suffix(')'))
                    .ok_or_else(|| err("expected (values)"))?;
                Ok(inner.split(',').map(|v| v.trim().to_string()).collect())
            };
            let req = if let Some((k, v)) = part.split_once("!=") {
                Requirement::NotEq(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                Requirement::Eq(k.trim().into(), v.trim().into())
            } else if let Some((k, rest)) = part.split_once(" notin ") {
                Requirement::NotIn(k.trim().into(), set(rest)?)
            } else if let Some((k, rest)) = part.split_once(" in ") {
                Requirement::In(k.trim().into(), set(rest)?)
            } else if let Some(k) = part.strip_prefix('!') {
                Requirement::NotExists(k.trim().into())
            } else {
                Requirement::Exists(part.into())
            };
            let key = match &req {
                Requirement::Eq(k, _)
                | Requirement::NotEq(k, _)
                | Requirement::In(k, _)
                | Requirement::NotIn(k, _)
                | Requirement::Exists(k)
                | Requirement::NotExists(k) => k,
            };
            if !crate::service::is_label_key(key) {
                return Err(err(&format!("{key:?} is not a valid label key")));
            }
            reqs.push(req);
        }
        Ok(Selector(reqs))
    }

    pub fn matches(&self, labels: Option<&BTreeMap<String, String>>) -> bool {
        let get = |k: &str| labels.and_then(|l| l.get(k)).map(String::as_str);
        self.0.iter().all(|r| match r {
            Requirement::Eq(k, v) => get(k) == Some(v.as_str()),
            Requirement::NotEq(k, v) => get(k) != Some(v.as_str()),
            Requirement::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            Requirement::NotIn(k, vs) => !get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            Requirement::Exists(k) => get(k).is_some(),
            Requirement::NotExists(k) => get(k).is_none(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_durations_match_kubectl() {
        let cases = [
            (0, "0s"),
            (59, "59s"),
            (119, "119s"),
            (120, "2m"),
            (125, "2m5s"),
            (600, "10m"),
            (179 * 60, "179m"),
            (3 * 3600 + 60, "3h1m"),
            (8 * 3600, "8h"),
            (47 * 3600, "47h"),
            (50 * 3600, "2d2h"),
            (10 * 86400, "10d"),
            (800 * 86400, "2y70d"),
            (9 * 365 * 86400, "9y"),
        ];
        for (secs, want) in cases {
            assert_eq!(human_duration(secs), want, "{secs}s");
        }
    }

    #[test]
    fn selectors() {
        let labels: BTreeMap<String, String> =
            [("app", "web"), ("tier", "fe")].iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let cases = [
            ("app=web", true),
            ("app==web,tier=fe", true),
            ("app=db", false),
            ("app!=db", true),
            ("tier in (fe, be)", true),
            ("tier notin (fe)", false),
            ("app", true),
            ("!app", false),
            ("!legacy", true),
            ("", true),
        ];
        for (sel, want) in cases {
            assert_eq!(Selector::parse(sel).unwrap().matches(Some(&labels)), want, "{sel}");
        }
        assert!(Selector::parse("bad key=x").is_err());
    }

    #[test]
    fn render_pads_like_tabwriter() {
        let got = render(&["NAME", "AGE"], &[vec!["a-long-name".into(), "5s".into()], vec!["b".into(), "10d".into()]]);
        assert_eq!(got, "NAME          AGE\na-long-name   5s\nb             10d\n");
    }
}
