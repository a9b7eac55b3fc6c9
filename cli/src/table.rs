//! `weft get`'s tables, as kubectl prints them: pure functions from objects (and the time now) to rows, laid out as
//! kubectl's tabwriter lays them out, so golden files can pin them. Also Go's `text/tabwriter` itself (what
//! `describe` and `rollout history` align with) and the ways kubectl formats labels and selectors. Nothing here does I/O.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{
    Container, Endpoints, Namespace, Node, Pod, PodTemplateSpec, ReplicationController, Service,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use weft_api::labels::Selector;

/// Options that change columns: `-o wide`, a NAMESPACE column for `-A`, and the `kind/` prefix on names that
/// kubectl adds when one command prints several kinds (`weft get svc,ep`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Columns {
    pub wide: bool,
    pub namespace: bool,
    /// The kind whose `singular[.group]` prefixes names.
    pub kind_prefix: Option<weft_api::Kind>,
}

/// Headers and rows of one kind's table.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Table {
    pub headers: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

/// kubectl's tabwriter for tables: columns at least 6 wide, 3 spaces of padding.
const TABLE_MIN_WIDTH: usize = 6;
const TABLE_PADDING: usize = 3;

impl Table {
    /// The whole table, header first.
    pub fn render(&self) -> String {
        TableWriter::default().write(self, true)
    }
}

/// Lays rows out as kubectl's tabwriter does with `RememberWidths`: a column is as wide as its widest cell seen so
/// far plus padding, so the rows `get -w` prints one by one line up with the table before them.
#[derive(Debug, Clone, Default)]
pub struct TableWriter {
    widths: Vec<usize>,
}

impl TableWriter {
    /// `table`'s rows (and its header when `header`), widening remembered columns as needed.
    pub fn write(&mut self, table: &Table, header: bool) -> String {
        let mut lines: Vec<&[String]> = Vec::new();
        if header {
            lines.push(&table.headers);
        }
        lines.extend(table.rows.iter().map(Vec::as_slice));
        for line in &lines {
            // The last cell of a line is not part of a column.
            for (i, cell) in line.iter().enumerate().take(line.len().saturating_sub(1)) {
                let w = (cell.chars().count() + TABLE_PADDING).max(TABLE_MIN_WIDTH);
                match self.widths.get_mut(i) {
                    Some(have) => *have = (*have).max(w),
                    None => self.widths.push(w),
                }
            }
        }
        let mut out = String::new();
        for line in lines {
            let mut l = String::new();
            for (i, cell) in line.iter().enumerate() {
                l.push_str(cell);
                if i + 1 < line.len() {
                    l.push_str(&" ".repeat(self.widths[i].saturating_sub(cell.chars().count())));
                }
            }
            out.push_str(l.trim_end());
            out.push('\n');
        }
        out
    }
}

/// Lays rows out as kubectl's tabwriter does: left aligned, three spaces between columns.
pub fn render(headers: &[&str], rows: &[Vec<String>]) -> String {
    Table { headers: headers.iter().map(|h| h.to_string()).collect(), rows: rows.to_vec() }.render()
}

/// Go's `text/tabwriter` (no flags, spaces for padding), which kubectl's `describe` and `rollout history` write
/// through: a tab ends a cell; consecutive lines that have a cell in the same column form a block, aligned to its
/// widest cell plus `padding` (at least `minwidth`); the text after a line's last tab is not aligned.
pub fn tabwrite(text: &str, minwidth: usize, padding: usize) -> String {
    let lines: Vec<Vec<&str>> = text.split('\n').map(|l| l.split('\t').collect()).collect();
    let mut out = String::new();
    let mut widths = Vec::new();
    format_block(&mut out, &lines, &mut widths, 0, lines.len(), minwidth, padding);
    out
}

fn format_block(
    out: &mut String,
    lines: &[Vec<&str>],
    widths: &mut Vec<usize>,
    line0: usize,
    line1: usize,
    minwidth: usize,
    padding: usize,
) {
    let column = widths.len();
    let mut line0 = line0;
    let mut this = line0;
    while this < line1 {
        if column + 1 >= lines[this].len() {
            this += 1;
            continue;
        }
        write_lines(out, lines, widths, line0, this);
        line0 = this;
        let mut width = minwidth;
        while this < line1 && column + 1 < lines[this].len() {
            width = width.max(lines[this][column].chars().count() + padding);
            this += 1;
        }
        widths.push(width);
        format_block(out, lines, widths, line0, this, minwidth, padding);
        widths.pop();
        line0 = this;
    }
    write_lines(out, lines, widths, line0, line1);
}

fn write_lines(out: &mut String, lines: &[Vec<&str>], widths: &[usize], line0: usize, line1: usize) {
    for (i, line) in lines.iter().enumerate().take(line1).skip(line0) {
        for (j, cell) in line.iter().enumerate() {
            out.push_str(cell);
            if let Some(w) = widths.get(j) {
                out.push_str(&" ".repeat(w.saturating_sub(cell.chars().count())));
            }
        }
        if i + 1 < lines.len() {
            out.push('\n');
        }
    }
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

/// RFC 1123 with a numeric zone, in UTC, as kubectl's describe prints times: `Fri, 02 Jan 2026 00:00:00 +0000`.
pub fn rfc1123z(t: &Timestamp) -> String {
    t.strftime("%a, %d %b %Y %H:%M:%S +0000").to_string()
}

pub fn none_if_empty(s: String) -> String {
    if s.is_empty() {
        "<none>".into()
    } else {
        s
    }
}

fn name(meta: &ObjectMeta) -> String {
    meta.name.clone().unwrap_or_default()
}

/// The kinds `weft get` prints, each with kubectl's columns (the `-o wide` ones last).
pub trait Tabular: Sized {
    const HEADERS: &'static [&'static str];
    const WIDE: &'static [&'static str];
    fn meta(&self) -> &ObjectMeta;
    /// Every cell, wide ones included; the NAME cell first.
    fn cells(&self, now: Timestamp) -> Vec<String>;

    fn table(items: &[Self], cols: Columns, now: Timestamp) -> Table {
        let mut headers: Vec<String> = Vec::new();
        if cols.namespace {
            headers.push("NAMESPACE".into());
        }
        headers.extend(Self::HEADERS.iter().map(|h| h.to_string()));
        if cols.wide {
            headers.extend(Self::WIDE.iter().map(|h| h.to_string()));
        }
        let rows = items
            .iter()
            .map(|o| {
                let mut r = Vec::new();
                if cols.namespace {
                    r.push(o.meta().namespace.clone().unwrap_or_default());
                }
                let mut cells = o.cells(now);
                if !cols.wide {
                    cells.truncate(Self::HEADERS.len());
                }
                if let (Some(kind), Some(first)) = (cols.kind_prefix, cells.first_mut()) {
                    *first = format!("{}/{first}", kind.info().qualified_singular());
                }
                r.extend(cells);
                r
            })
            .collect();
        Table { headers, rows }
    }
}

/// `labels.FormatLabels`: `k=v,k2=v2` sorted by key, `<none>` when empty.
pub fn format_labels(labels: Option<&BTreeMap<String, String>>) -> String {
    none_if_empty(labels.into_iter().flatten().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(","))
}

/// `metav1.FormatLabelSelector`: the selector's string form, `<none>` when it selects everything, `<error>` when
/// it does not parse.
pub fn format_label_selector(sel: &LabelSelector) -> String {
    match Selector::from_label_selector(Some(sel)) {
        Ok(s) => none_if_empty(s.to_string()),
        Err(_) => "<error>".into(),
    }
}

/// A selector's string form as the wide SELECTOR column shows it (`<invalid>` when it does not parse).
fn selector_cell(sel: &LabelSelector) -> String {
    Selector::from_label_selector(Some(sel)).map(|s| s.to_string()).unwrap_or_else(|_| "<invalid>".into())
}

/// The CONTAINERS and IMAGES cells of a workload.
fn container_cells(template: Option<&PodTemplateSpec>) -> (String, String) {
    let containers: &[Container] =
        template.and_then(|t| t.spec.as_ref()).map(|s| s.containers.as_slice()).unwrap_or(&[]);
    let names: Vec<&str> = containers.iter().map(|c| c.name.as_str()).collect();
    let images: Vec<&str> = containers.iter().map(|c| c.image.as_deref().unwrap_or("")).collect();
    (names.join(","), images.join(","))
}

impl Tabular for Service {
    const HEADERS: &'static [&'static str] = &["NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)", "AGE"];
    const WIDE: &'static [&'static str] = &["SELECTOR"];
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn cells(&self, now: Timestamp) -> Vec<String> {
        let s = self;
        let spec = s.spec.clone().unwrap_or_default();
        let type_ = spec.type_.clone().unwrap_or_else(|| "ClusterIP".into());
        let mut external: Vec<String> = Vec::new();
        if type_ == "ExternalName" {
            external.extend(spec.external_name.clone());
        }
        if type_ == "LoadBalancer" {
            let ingress = s.status.as_ref().and_then(|st| st.load_balancer.as_ref()).and_then(|lb| lb.ingress.as_ref());
            external.extend(ingress.into_iter().flatten().filter_map(|i| i.ip.clone().or_else(|| i.hostname.clone())));
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
            format_labels(spec.selector.as_ref()),
        ]
    }
}

/// kubectl's `formatEndpoints`: `ip:port` per port (only ports named in `ports`, if given) and address, at most
/// three then `+ N more...`; `<none>` without subsets.
pub fn format_endpoints(ep: &Endpoints, ports: Option<&str>) -> String {
    let subsets = ep.subsets.as_deref().unwrap_or(&[]);
    if subsets.is_empty() {
        return "<none>".into();
    }
    const MAX: usize = 3;
    let (mut list, mut count) = (Vec::new(), 0);
    let mut add = |s: String| {
        if list.len() < MAX {
            list.push(s);
        }
        count += 1;
    };
    for ss in subsets {
        let addrs = ss.addresses.as_deref().unwrap_or(&[]);
        match ss.ports.as_deref() {
            None | Some([]) => addrs.iter().for_each(|a| add(a.ip.clone())),
            Some(sports) => {
                for p in sports {
                    if ports.is_none_or(|want| p.name.as_deref().unwrap_or("") == want) {
                        addrs.iter().for_each(|a| add(join_host_port(&a.ip, p.port)));
                    }
                }
            }
        }
    }
    let text = list.join(",");
    if count > MAX {
        format!("{text} + {} more...", count - MAX)
    } else {
        text
    }
}

fn join_host_port(ip: &str, port: i32) -> String {
    if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}

impl Tabular for Endpoints {
    const HEADERS: &'static [&'static str] = &["NAME", "ENDPOINTS", "AGE"];
    const WIDE: &'static [&'static str] = &[];
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn cells(&self, now: Timestamp) -> Vec<String> {
        vec![name(&self.metadata), format_endpoints(self, None), age(self.metadata.creation_timestamp.as_ref(), now)]
    }
}

/// The pod's STATUS and READY, RESTARTS cells as kubectl's `printPod` computes them (init containers, waiting and
/// terminated reasons, Terminating).
pub fn pod_status(p: &Pod, now: Timestamp) -> (String, String, String) {
    let status = p.status.clone().unwrap_or_default();
    let spec = p.spec.clone().unwrap_or_default();
    // Without an API server nothing sets the phase of a new pod: show what the API server would have set.
    let phase = status.phase.clone().unwrap_or_else(|| "Pending".into());
    let mut reason = status.reason.clone().filter(|r| !r.is_empty()).unwrap_or_else(|| phase.clone());
    for c in status.conditions.iter().flatten() {
        if c.type_ == "PodScheduled" && c.reason.as_deref() == Some("SchedulingGated") {
            reason = "SchedulingGated".into();
        }
    }
    let mut restarts = 0;
    let mut last_restart: Option<Timestamp> = None;
    let mut ready = 0;
    let total = spec.containers.len();
    let note_restart = |cs: &k8s_openapi::api::core::v1::ContainerStatus, last: &mut Option<Timestamp>| {
        let finished = cs.last_state.as_ref().and_then(|s| s.terminated.as_ref()).and_then(|t| t.finished_at.as_ref());
        if let Some(t) = finished {
            if last.is_none_or(|l| l < t.0) {
                *last = Some(t.0);
            }
        }
    };
    let mut initializing = false;
    let init_count = spec.init_containers.as_ref().map_or(0, Vec::len);
    for (i, cs) in status.init_container_statuses.iter().flatten().enumerate() {
        restarts += cs.restart_count;
        note_restart(cs, &mut last_restart);
        let state = cs.state.clone().unwrap_or_default();
        match (&state.terminated, &state.waiting) {
            (Some(t), _) if t.exit_code == 0 => continue,
            (Some(t), _) => {
                reason = match (t.reason.as_deref().filter(|r| !r.is_empty()), t.signal.filter(|s| *s != 0)) {
                    (Some(r), _) => format!("Init:{r}"),
                    (None, Some(sig)) => format!("Init:Signal:{sig}"),
                    (None, None) => format!("Init:ExitCode:{}", t.exit_code),
                };
            }
            (None, Some(w)) if w.reason.as_deref().is_some_and(|r| !r.is_empty() && r != "PodInitializing") => {
                reason = format!("Init:{}", w.reason.clone().unwrap_or_default());
            }
            _ => reason = format!("Init:{i}/{init_count}"),
        }
        initializing = true;
        break;
    }
    if !initializing {
        restarts = 0;
        last_restart = None;
        let mut has_running = false;
        for cs in status.container_statuses.iter().flatten().rev() {
            restarts += cs.restart_count;
            note_restart(cs, &mut last_restart);
            let state = cs.state.clone().unwrap_or_default();
            if let Some(r) = state.waiting.as_ref().and_then(|w| w.reason.clone()).filter(|r| !r.is_empty()) {
                reason = r;
            } else if let Some(t) = &state.terminated {
                reason = match (t.reason.clone().filter(|r| !r.is_empty()), t.signal.filter(|s| *s != 0)) {
                    (Some(r), _) => r,
                    (None, Some(sig)) => format!("Signal:{sig}"),
                    (None, None) => format!("ExitCode:{}", t.exit_code),
                };
            } else if cs.ready && state.running.is_some() {
                has_running = true;
                ready += 1;
            }
        }
        if reason == "Completed" && has_running {
            let pod_ready = status.conditions.iter().flatten().any(|c| c.type_ == "Ready" && c.status == "True");
            reason = if pod_ready { "Running" } else { "NotReady" }.into();
        }
    }
    if p.metadata.deletion_timestamp.is_some() {
        if status.reason.as_deref() == Some("NodeLost") {
            reason = "Unknown".into();
        } else if phase != "Succeeded" && phase != "Failed" {
            reason = "Terminating".into();
        }
    }
    let restarts = match last_restart {
        Some(t) if restarts != 0 => format!("{restarts} ({} ago)", human_duration(now.as_second() - t.as_second())),
        _ => restarts.to_string(),
    };
    (format!("{ready}/{total}"), reason, restarts)
}

impl Tabular for Pod {
    const HEADERS: &'static [&'static str] = &["NAME", "READY", "STATUS", "RESTARTS", "AGE"];
    const WIDE: &'static [&'static str] = &["IP", "NODE", "NOMINATED NODE", "READINESS GATES"];
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn cells(&self, now: Timestamp) -> Vec<String> {
        let p = self;
        let (ready, status, restarts) = pod_status(p, now);
        let st = p.status.as_ref();
        let ip = st
            .and_then(|s| s.pod_ips.as_ref())
            .and_then(|ips| ips.first())
            .map(|i| i.ip.clone())
            .or_else(|| st.and_then(|s| s.pod_ip.clone()))
            .unwrap_or_default();
        let gates = p.spec.as_ref().and_then(|s| s.readiness_gates.as_ref()).filter(|g| !g.is_empty());
        let gates = match gates {
            None => "<none>".to_string(),
            Some(gates) => {
                let conds = st.and_then(|s| s.conditions.as_ref());
                let ok = gates
                    .iter()
                    .filter(|g| {
                        conds
                            .into_iter()
                            .flatten()
                            .find(|c| c.type_ == g.condition_type)
                            .is_some_and(|c| c.status == "True")
                    })
                    .count();
                format!("{ok}/{}", gates.len())
            }
        };
        vec![
            name(&p.metadata),
            ready,
            status,
            restarts,
            age(p.metadata.creation_timestamp.as_ref(), now),
            none_if_empty(ip),
            none_if_empty(p.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_default()),
            none_if_empty(st.and_then(|s| s.nominated_node_name.clone()).unwrap_or_default()),
            gates,
        ]
    }
}

/// A node's roles: `node-role.kubernetes.io/<role>` label keys and the `kubernetes.io/role` label's value, sorted.
pub fn node_roles(n: &Node) -> Vec<String> {
    let mut roles = BTreeSet::new();
    for (k, v) in n.metadata.labels.iter().flatten() {
        if let Some(role) = k.strip_prefix("node-role.kubernetes.io/").filter(|r| !r.is_empty()) {
            roles.insert(role.to_string());
        } else if k == "kubernetes.io/role" && !v.is_empty() {
            roles.insert(v.clone());
        }
    }
    roles.into_iter().collect()
}

/// `Ready`, `NotReady` or `Unknown` (no Ready condition), plus `,SchedulingDisabled` when cordoned.
pub fn node_status(n: &Node) -> String {
    let conds = n.status.as_ref().and_then(|s| s.conditions.as_ref());
    let mut status = match conds.into_iter().flatten().find(|c| c.type_ == "Ready").map(|c| c.status.as_str()) {
        Some("True") => "Ready".to_string(),
        Some(_) => "NotReady".to_string(),
        None => "Unknown".to_string(),
    };
    if n.spec.as_ref().and_then(|s| s.unschedulable) == Some(true) {
        status.push_str(",SchedulingDisabled");
    }
    status
}

impl Tabular for Node {
    const HEADERS: &'static [&'static str] = &["NAME", "STATUS", "ROLES", "AGE", "VERSION"];
    const WIDE: &'static [&'static str] =
        &["INTERNAL-IP", "EXTERNAL-IP", "OS-IMAGE", "KERNEL-VERSION", "CONTAINER-RUNTIME"];
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn cells(&self, now: Timestamp) -> Vec<String> {
        let n = self;
        let st = n.status.as_ref();
        let info = st.and_then(|s| s.node_info.clone()).unwrap_or_default();
        let address = |type_: &str| {
            st.and_then(|s| s.addresses.as_ref())
                .and_then(|a| a.iter().find(|a| a.type_ == type_))
                .map(|a| a.address.clone())
                .unwrap_or_default()
        };
        let unknown = |s: String| if s.is_empty() { "<unknown>".to_string() } else { s };
        vec![
            name(&n.metadata),
            node_status(n),
            none_if_empty(node_roles(n).join(",")),
            age(n.metadata.creation_timestamp.as_ref(), now),
            info.kubelet_version.clone(),
            none_if_empty(address("InternalIP")),
            none_if_empty(address("ExternalIP")),
            unknown(info.os_image.clone()),
            unknown(info.kernel_version.clone()),
            unknown(info.container_runtime_version.clone()),
        ]
    }
}

impl Tabular for Namespace {
    const HEADERS: &'static [&'static str] = &["NAME", "STATUS", "AGE"];
    const WIDE: &'static [&'static str] = &[];
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn cells(&self, now: Timestamp) -> Vec<String> {
        vec![
            name(&self.metadata),
            self.status.as_ref().and_then(|s| s.phase.clone()).unwrap_or_else(|| "Active".into()),
            age(self.metadata.creation_timestamp.as_ref(), now),
        ]
    }
}

/// `kubectl get leases`: who holds each (a node's heartbeat, the controller's leader election).
impl Tabular for Lease {
    const HEADERS: &'static [&'static str] = &["NAME", "HOLDER", "AGE"];
    const WIDE: &'static [&'static str] = &[];
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn cells(&self, now: Timestamp) -> Vec<String> {
        vec![
            name(&self.metadata),
            self.spec.as_ref().and_then(|s| s.holder_identity.clone()).unwrap_or_default(),
            age(self.metadata.creation_timestamp.as_ref(), now),
        ]
    }
}

impl Tabular for Deployment {
    const HEADERS: &'static [&'static str] = &["NAME", "READY", "UP-TO-DATE", "AVAILABLE", "AGE"];
    const WIDE: &'static [&'static str] = &["CONTAINERS", "IMAGES", "SELECTOR"];
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn cells(&self, now: Timestamp) -> Vec<String> {
        let d = self;
        let want = d.spec.replicas.unwrap_or(1);
        let st = d.status.clone().unwrap_or_default();
        let (containers, images) = container_cells(Some(&d.spec.template));
        vec![
            name(&d.metadata),
            format!("{}/{want}", st.ready_replicas.unwrap_or(0)),
            st.updated_replicas.unwrap_or(0).to_string(),
            st.available_replicas.unwrap_or(0).to_string(),
            age(d.metadata.creation_timestamp.as_ref(), now),
            containers,
            images,
            selector_cell(&d.spec.selector),
        ]
    }
}

impl Tabular for ReplicaSet {
    const HEADERS: &'static [&'static str] = &["NAME", "DESIRED", "CURRENT", "READY", "AGE"];
    const WIDE: &'static [&'static str] = &["CONTAINERS", "IMAGES", "SELECTOR"];
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn cells(&self, now: Timestamp) -> Vec<String> {
        let st = self.status.clone().unwrap_or_default();
        let counts = [self.spec.replicas.unwrap_or(1), st.replicas, st.ready_replicas.unwrap_or(0)];
        replica_cells(&self.metadata, counts, self.spec.template.as_ref(), selector_cell(&self.spec.selector), now)
    }
}

/// NAME DESIRED CURRENT READY AGE, then the wide CONTAINERS IMAGES SELECTOR: ReplicaSets and
/// ReplicationControllers print alike.
fn replica_cells(
    meta: &ObjectMeta,
    [desired, current, ready]: [i32; 3],
    template: Option<&PodTemplateSpec>,
    selector: String,
    now: Timestamp,
) -> Vec<String> {
    let (containers, images) = container_cells(template);
    vec![
        name(meta),
        desired.to_string(),
        current.to_string(),
        ready.to_string(),
        age(meta.creation_timestamp.as_ref(), now),
        containers,
        images,
        selector,
    ]
}

impl Tabular for ReplicationController {
    const HEADERS: &'static [&'static str] = &["NAME", "DESIRED", "CURRENT", "READY", "AGE"];
    const WIDE: &'static [&'static str] = &["CONTAINERS", "IMAGES", "SELECTOR"];
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn cells(&self, now: Timestamp) -> Vec<String> {
        let spec = self.spec.clone().unwrap_or_default();
        let st = self.status.clone().unwrap_or_default();
        let counts = [spec.replicas.unwrap_or(1), st.replicas, st.ready_replicas.unwrap_or(0)];
        replica_cells(&self.metadata, counts, spec.template.as_ref(), format_labels(spec.selector.as_ref()), now)
    }
}

impl Tabular for DaemonSet {
    const HEADERS: &'static [&'static str] =
        &["NAME", "DESIRED", "CURRENT", "READY", "UP-TO-DATE", "AVAILABLE", "NODE SELECTOR", "AGE"];
    const WIDE: &'static [&'static str] = &["CONTAINERS", "IMAGES", "SELECTOR"];
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn cells(&self, now: Timestamp) -> Vec<String> {
        let d = self;
        let st = d.status.clone().unwrap_or_default();
        let node_selector = d.spec.template.spec.as_ref().and_then(|s| s.node_selector.as_ref());
        let (containers, images) = container_cells(Some(&d.spec.template));
        vec![
            name(&d.metadata),
            st.desired_number_scheduled.to_string(),
            st.current_number_scheduled.to_string(),
            st.number_ready.to_string(),
            st.updated_number_scheduled.unwrap_or(0).to_string(),
            st.number_available.unwrap_or(0).to_string(),
            format_labels(node_selector),
            age(d.metadata.creation_timestamp.as_ref(), now),
            containers,
            images,
            selector_cell(&d.spec.selector),
        ]
    }
}

/// `kubectl get`'s table of `items`, rendered.
pub fn get_table<K: Tabular>(items: &[K], cols: Columns, now: Timestamp) -> String {
    K::table(items, cols, now).render()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

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

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn label_selectors_match_and_print_as_kubectl_does() {
        // The seeds' `frontend` ReplicaSet selector.
        let frontend = LabelSelector {
            match_labels: Some(labels(&[("tier", "frontend")])),
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "tier".into(),
                operator: "In".into(),
                values: Some(vec!["frontend".into()]),
            }]),
        };
        let sel = Selector::from_label_selector(Some(&frontend)).unwrap();
        assert_eq!(sel.to_string(), "tier=frontend,tier in (frontend)");
        assert!(sel.matches(Some(&labels(&[("app", "guestbook"), ("tier", "frontend")]))));
        assert!(!sel.matches(Some(&labels(&[("tier", "backend")]))));
        assert!(!sel.matches(None));

        let expr = |key: &str, op: &str, values: &[&str]| LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: (!values.is_empty()).then(|| values.iter().map(|v| v.to_string()).collect()),
        };
        let mixed = LabelSelector {
            match_labels: Some(labels(&[("b", "1"), ("a", "2")])),
            match_expressions: Some(vec![
                expr("env", "NotIn", &["z", "x"]),
                expr("gpu", "Exists", &[]),
                expr("legacy", "DoesNotExist", &[]),
            ]),
        };
        assert_eq!(format_label_selector(&mixed), "a=2,b=1,env notin (x,z),gpu,!legacy");
        assert_eq!(format_label_selector(&LabelSelector::default()), "<none>");
        let bad = LabelSelector { match_expressions: Some(vec![expr("a", "Near", &["b"])]), ..Default::default() };
        assert_eq!(format_label_selector(&bad), "<error>");
        assert!(Selector::from_label_selector(Some(&LabelSelector {
            match_expressions: Some(vec![expr("a", "In", &[])]),
            ..Default::default()
        }))
        .is_err());
        assert_eq!(format_labels(Some(&labels(&[("b", "2"), ("a", "1")]))), "a=1,b=2");
        assert_eq!(format_labels(None), "<none>");
    }

    #[test]
    fn render_pads_like_tabwriter() {
        let got = render(&["NAME", "AGE"], &[vec!["a-long-name".into(), "5s".into()], vec!["b".into(), "10d".into()]]);
        assert_eq!(got, "NAME          AGE\na-long-name   5s\nb             10d\n");
        // Columns are at least 6 wide, as kubectl's tabwriter makes them.
        assert_eq!(render(&["A", "B"], &[vec!["x".into(), "y".into()]]), "A     B\nx     y\n");
    }

    #[test]
    fn watch_rows_line_up_with_the_table_and_widen_it() {
        let mut w = TableWriter::default();
        let t = |rows: &[[&str; 3]]| Table {
            headers: vec!["NAME".into(), "STATUS".into(), "AGE".into()],
            rows: rows.iter().map(|r| r.iter().map(|c| c.to_string()).collect()).collect(),
        };
        assert_eq!(w.write(&t(&[["web-1", "Running", "5s"]]), true), "NAME    STATUS    AGE\nweb-1   Running   5s\n");
        assert_eq!(w.write(&t(&[["web-1", "Pending", "6s"]]), false), "web-1   Pending   6s\n");
        assert_eq!(w.write(&t(&[["web-1", "Terminating", "7s"]]), false), "web-1   Terminating   7s\n");
        assert_eq!(w.write(&t(&[["web-1", "Running", "8s"]]), false), "web-1   Running       8s\n");
    }

    #[test]
    fn tabwrite_aligns_blocks_as_go_does() {
        // A line without a tab ends the block: the two blocks align separately.
        let text = "Name:\tnginx\nNamespace:\tdefault\nPod Template:\n  Labels:\tapp=nginx\n  Containers:\n   nginx:\n    Image:\tnginx:1.7.9\n    Environment:\t<none>\n  Volumes:\t<none>\n";
        let want = "Name:       nginx\nNamespace:  default\nPod Template:\n  Labels:  app=nginx\n  Containers:\n   nginx:\n    Image:        nginx:1.7.9\n    Environment:  <none>\n  Volumes:        <none>\n";
        assert_eq!(tabwrite(text, 0, 2), want);
        // Nested columns: the second column is aligned only over the lines that have it.
        let text = "  Type\tStatus\tReason\n  ----\t------\t------\n  Progressing \tTrue\tNewReplicaSetAvailable\nOldReplicaSets:\t<none>\n";
        let want = "  Type           Status  Reason\n  ----           ------  ------\n  Progressing    True    NewReplicaSetAvailable\nOldReplicaSets:  <none>\n";
        assert_eq!(tabwrite(text, 0, 2), want);
        // No trailing newline: the last line is written as is.
        assert_eq!(tabwrite("a\tb", 0, 2), "a  b");
    }

    #[test]
    fn endpoints_list_ports_then_addresses_at_most_three() {
        let ep: Endpoints = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "e"},
            "subsets": [{"addresses": [{"ip": "10.0.0.1"}, {"ip": "10.0.0.2"}],
                         "ports": [{"name": "http", "port": 80}, {"name": "https", "port": 443}]}]
        }))
        .unwrap();
        assert_eq!(format_endpoints(&ep, None), "10.0.0.1:80,10.0.0.2:80,10.0.0.1:443 + 1 more...");
        assert_eq!(format_endpoints(&ep, Some("https")), "10.0.0.1:443,10.0.0.2:443");
        assert_eq!(format_endpoints(&ep, Some("dns")), "");
        assert_eq!(format_endpoints(&Endpoints::default(), None), "<none>");
    }
}
