//! The whole cluster in one lab (real etcd, containerd + runc + weft-cni per node, `weft kubelet`, `weft controller`,
//! `weft proxy`, `weft dns`): a Deployment becomes Running containers on two nodes with addresses from their nodes'
//! subnets, a Service with a selector answers HTTP 200 by DNS name from a pod on another node, `weft logs` and
//! `weft exec` reach another node's kubelet with the lab's certificates, a deleted pod is
//! recreated, `rollout undo` replaces the containers, and a node whose kubelet stops loses its pods to the other
//! node after the (shortened) grace periods. One lab for every check, to keep the file within a few minutes.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use anyhow::{anyhow, Context, Result};
use serde_json::Value;
use weft_lab::lab::until_some as until;
use weft_lab::{cluster, Lab, LabOptions};

const REPLICAS: usize = 4;

fn deployment(version: &str) -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: web}}
spec:
  replicas: {REPLICAS}
  selector: {{matchLabels: {{app: web}}}}
  template:
    metadata: {{labels: {{app: web}}}}
    spec:
      terminationGracePeriodSeconds: 2
      # Leave a lost node after 2 s, not the default 300 s (taint-based eviction).
      tolerations:
      - {{key: node.kubernetes.io/unreachable, operator: Exists, effect: NoExecute, tolerationSeconds: 2}}
      - {{key: node.kubernetes.io/not-ready, operator: Exists, effect: NoExecute, tolerationSeconds: 2}}
      containers:
      - name: httpd
        image: weft.local/busybox:1
        env: [{{name: VERSION, value: "{version}"}}]
        command: ["sh", "-c", "mkdir -p /www && echo \"hello from $(hostname) $VERSION\" > /www/index.html && exec httpd -f -p 80 -h /www"]
        ports: [{{containerPort: 80}}]
        readinessProbe: {{httpGet: {{path: /, port: 80}}, periodSeconds: 1}}
"#
    )
}

const SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  selector: {app: web}\n  ports: [{name: http, port: 80, targetPort: 80}]\n";

/// One web pod as the store shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct WebPod {
    name: String,
    node: String,
    ip: String,
    ready: bool,
    deleting: bool,
    version: String,
    container_ids: Vec<String>,
}

fn web_pods(lab: &Lab) -> Result<Vec<WebPod>> {
    let out = lab.weft(&["get", "pods", "-l", "app=web", "-o", "json"], None)?;
    let v: Value = serde_json::from_str(&out).context("weft get pods -o json")?;
    let items = v.get("items").and_then(Value::as_array).cloned().unwrap_or_default();
    Ok(items
        .iter()
        .map(|p| {
            let s = |ptr: &str| p.pointer(ptr).and_then(Value::as_str).unwrap_or_default().to_string();
            let conditions = p.pointer("/status/conditions").and_then(Value::as_array).cloned().unwrap_or_default();
            let ready = s("/status/phase") == "Running"
                && conditions.iter().any(|c| c["type"] == "Ready" && c["status"] == "True");
            let env = p.pointer("/spec/containers/0/env").and_then(Value::as_array).cloned().unwrap_or_default();
            let version = env
                .iter()
                .find(|e| e["name"] == "VERSION")
                .and_then(|e| e["value"].as_str())
                .unwrap_or_default()
                .to_string();
            let statuses =
                p.pointer("/status/containerStatuses").and_then(Value::as_array).cloned().unwrap_or_default();
            WebPod {
                name: s("/metadata/name"),
                node: s("/spec/nodeName"),
                ip: s("/status/podIP"),
                ready,
                deleting: p.pointer("/metadata/deletionTimestamp").is_some(),
                version,
                container_ids: statuses.iter().filter_map(|c| c["containerID"].as_str().map(String::from)).collect(),
            }
        })
        .collect())
}

/// `n` live pods of `version`, all Running and Ready, and no other pod of the Deployment left.
fn wait_web(lab: &Lab, n: usize, version: &str, secs: u64) -> Result<Vec<WebPod>> {
    let mut seen = Vec::new();
    until(&format!("{n} ready web pods of {version}"), secs, || {
        let pods = web_pods(lab)?;
        seen = pods.clone();
        let ok = pods.len() == n && pods.iter().all(|p| p.ready && !p.deleting && p.version == version);
        Ok(ok.then_some(pods))
    })
    .with_context(|| format!("pods seen: {seen:#?}"))
}

fn subnet_of(lab: &Lab, node: usize) -> Result<ipnetwork::Ipv4Network> {
    let env = std::fs::read_to_string(lab.node(node).subnet_env_path())?;
    let s = env.lines().find_map(|l| l.strip_prefix("FLANNEL_SUBNET=")).ok_or_else(|| anyhow!("no FLANNEL_SUBNET"))?;
    Ok(s.parse()?)
}

fn node_index(name: &str) -> Result<usize> {
    name.strip_prefix("node-").and_then(|n| n.parse().ok()).ok_or_else(|| anyhow!("{name:?} is not a lab node"))
}

fn pod_phase(lab: &Lab, pod: &str) -> Result<String> {
    let v: Value = serde_json::from_str(&lab.weft(&["get", "pod", pod, "-o", "json"], None)?)?;
    Ok(v.pointer("/status/phase").and_then(Value::as_str).unwrap_or_default().to_string())
}

/// curl from a bare pod namespace of the lab: (HTTP status, body).
fn curl(lab: &Lab, ns: &weft_lab::Netns, url: &str) -> Result<(String, String)> {
    let _ = lab;
    let out = ns.exec("curl", &["-s", "-m", "3", "-w", "\n%{http_code}", url])?;
    let (body, code) = out.rsplit_once('\n').ok_or_else(|| anyhow!("curl printed {out:?}"))?;
    Ok((code.to_string(), body.to_string()))
}

/// `weft lab exec` hands `weft logs`/`weft exec` the lab's admin certificate and CA, and every kubelet's serving
/// certificate is signed by that CA for its node's address.
fn lab_exec_carries_the_labs_client_certificate(lab: &Lab) -> Result<()> {
    let script = "test -s \"$WEFT_KUBELET_CLIENT_KEY\" && openssl verify -purpose sslclient -CAfile \"$WEFT_KUBELET_CA\" \"$WEFT_KUBELET_CLIENT_CERT\"";
    let out = std::process::Command::new(weft_lab::weft_bin())
        .args(["lab", "exec", "--name", lab.id(), "node-1", "--", "sh", "-c", script])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && text.contains(": OK"), "{text}");
    let pki = lab.pki();
    for node in lab.nodes() {
        let cert = pki.kubelet(node.name()).cert;
        let out = std::process::Command::new("openssl")
            .args(["verify", "-purpose", "sslserver", "-verify_ip", &node.ip().to_string(), "-CAfile"])
            .arg(pki.ca().cert)
            .arg(&cert)
            .output()?;
        assert!(out.status.success(), "{}: {}", cert.display(), String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

fn pods_run_on_two_nodes_in_their_subnets(lab: &Lab) -> Result<Vec<WebPod>> {
    lab.weft(&["apply", "-f", "-"], Some(&format!("{}---\n{SERVICE}", deployment("v1"))))?;
    let pods = wait_web(lab, REPLICAS, "v1", 120)?;
    let nodes: BTreeSet<&str> = pods.iter().map(|p| p.node.as_str()).collect();
    assert_eq!(nodes.len(), 2, "the scheduler spreads {REPLICAS} pods over both nodes: {pods:#?}");
    // Sandboxes and containers (pause + httpd per pod) live under each node's pods cgroup in the lab's subtree,
    // containerd itself under the subtree too: nothing of the lab is in the machine's root cgroup.
    let id = lab.id();
    let in_pods: usize =
        (1..=2).map(|i| cluster::cgroup_pids(&cluster::pods_cgroup(id, lab.node(i).name())).len()).sum();
    assert!(in_pods >= 2 * REPLICAS, "{in_pods} processes under the pods' cgroups");
    let lab_pids = cluster::cgroup_pids(&cluster::cgroup_subtree(id));
    for i in 1..=2 {
        let pid: i32 = std::fs::read_to_string(lab.node(i).dir().join("containerd.pid"))?.trim().parse()?;
        assert!(lab_pids.contains(&pid), "containerd of node-{i} ({pid}) is outside the lab's cgroup subtree");
    }
    for p in &pods {
        let ip: Ipv4Addr = p.ip.parse().with_context(|| format!("pod {} has no address", p.name))?;
        let subnet = subnet_of(lab, node_index(&p.node)?)?;
        assert!(subnet.contains(ip), "pod {} on {} has {ip}, outside its node's subnet {subnet}", p.name, p.node);
    }
    Ok(pods)
}

fn service_answers_by_name_from_a_pod_on_another_node(lab: &Lab, pods: &[WebPod]) -> Result<()> {
    let on_node1: Vec<&WebPod> = pods.iter().filter(|p| p.node == "node-1").collect();
    let target = on_node1.first().ok_or_else(|| anyhow!("no web pod on node-1"))?;
    until("3 ready addresses per pod in Endpoints web", 60, || {
        let v: Value = serde_json::from_str(&lab.weft(&["get", "ep", "web", "-o", "json"], None)?)?;
        let addrs: BTreeSet<String> = v
            .pointer("/subsets")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .flat_map(|s| s["addresses"].as_array().cloned().unwrap_or_default())
            .filter_map(|a| a["ip"].as_str().map(String::from))
            .collect();
        let want: BTreeSet<String> = pods.iter().map(|p| p.ip.clone()).collect();
        Ok((addrs == want).then_some(()))
    })?;
    // A container on node-2: the Service by its DNS name, then a node-1 pod by its address. busybox's wget
    // exits non-zero unless the status is 2xx, so Succeeded means every fetch got a 200.
    let client = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: client}}\nspec:\n  nodeName: node-2\n  restartPolicy: Never\n  \
         containers:\n  - name: wget\n    image: weft.local/busybox:1\n    command: [\"sh\", \"-c\", \
         \"wget -q -O - http://web.default.svc.cluster.local/ && wget -q -O - http://{}/\"]\n",
        target.ip
    );
    lab.weft(&["apply", "-f", "-"], Some(&client))?;
    let phase = until("pod client to finish", 90, || {
        let phase = pod_phase(lab, "client")?;
        Ok(matches!(phase.as_str(), "Succeeded" | "Failed").then_some(phase))
    })?;
    let logs = lab.pod_logs(2, "client");
    assert_eq!(phase, "Succeeded", "the client's fetches failed; its log:\n{logs}");
    assert!(logs.contains(&format!("hello from {} v1", target.name)), "node-1's pod answered node-2's client: {logs}");
    assert!(logs.matches("hello from web-").count() >= 2, "{logs}");
    // And curl from a bare namespace behind node-2's cni0: the name, the status code.
    let probe = lab.add_pod(2, "probe")?;
    let (code, body) = until("curl http://web.default.svc.cluster.local/ from node-2", 30, || {
        Ok(curl(lab, probe.ns(), "http://web.default.svc.cluster.local/").ok())
    })?;
    assert_eq!(code, "200", "{body}");
    assert!(body.starts_with("hello from web-"), "{body}");
    Ok(())
}

/// `weft logs` and `weft exec` from node-1 reach pods on node-2 through its kubelet's port with the lab's
/// certificates (as `weft lab exec` sets them); the port refuses a client without a certificate.
fn logs_and_exec_reach_another_nodes_kubelet(lab: &Lab, pods: &[WebPod]) -> Result<()> {
    let lab_exec = |cmd: &[&str]| -> Result<(bool, String)> {
        let out = std::process::Command::new(weft_lab::weft_bin())
            .args(["lab", "exec", "--name", lab.id(), "node-1", "--"])
            .args(cmd)
            .output()?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
        ))
    };
    let target = pods.iter().find(|p| p.node == "node-2").ok_or_else(|| anyhow!("no web pod on node-2"))?;
    let (ok, out) = lab_exec(&["weft", "exec", &target.name, "--", "cat", "/www/index.html"])?;
    assert!(ok && out.contains(&format!("hello from {} v1", target.name)), "weft exec: {out}");
    let (ok, out) = lab_exec(&["weft", "exec", &target.name, "--", "sh", "-c", "exit 3"])?;
    assert!(!ok, "weft exec passes the command's failure on: {out}");
    // -i: stdin streamed to the command across nodes (the kubelet relays to its containerd's streaming server).
    let script =
        format!("printf 'hello\\n' | weft exec -i {} -- sh -c 'read x; echo got $x; exit 7'; echo rc=$?", target.name);
    let (_, out) = lab_exec(&["sh", "-c", &script])?;
    assert!(out.contains("got hello") && out.contains("rc=7"), "weft exec -i: {out}");
    let (ok, out) = lab_exec(&["weft", "logs", "client"])?;
    assert!(ok && out.contains("hello from web-"), "weft logs client: {out}");
    let (ok, _) = lab_exec(&["curl", "-sk", "-m", "3", "https://192.168.56.12:10250/healthz"])?;
    assert!(!ok, "the kubelet port served a client without a certificate");
    Ok(())
}

fn a_deleted_pod_is_recreated(lab: &Lab, pods: &[WebPod]) -> Result<()> {
    let victim = &pods[0].name;
    lab.weft(&["delete", "pod", victim], None)?;
    let after = until("the deleted pod to be replaced", 90, || {
        let now = web_pods(lab)?;
        let ok = now.len() == REPLICAS
            && now.iter().all(|p| p.ready && !p.deleting)
            && !now.iter().any(|p| p.name == *victim);
        Ok(ok.then_some(now))
    })?;
    assert!(after.iter().all(|p| p.version == "v1"));
    Ok(())
}

fn rollout_undo_replaces_the_containers(lab: &Lab) -> Result<()> {
    let before: BTreeSet<String> =
        wait_web(lab, REPLICAS, "v1", 60)?.into_iter().flat_map(|p| p.container_ids).collect();
    assert_eq!(before.len(), REPLICAS, "one container per pod: {before:?}");
    lab.weft(&["apply", "-f", "-"], Some(&deployment("v2")))?;
    let v2: BTreeSet<String> = wait_web(lab, REPLICAS, "v2", 180)?.into_iter().flat_map(|p| p.container_ids).collect();
    assert!(v2.is_disjoint(&before), "v2 runs in new containers");
    lab.weft(&["rollout", "undo", "deployment/web"], None)?;
    let after: BTreeSet<String> =
        wait_web(lab, REPLICAS, "v1", 180)?.into_iter().flat_map(|p| p.container_ids).collect();
    assert!(
        after.is_disjoint(&before) && after.is_disjoint(&v2),
        "the undo started new containers: {before:?} {v2:?} {after:?}"
    );
    // The pages the containers serve say so (through the Service, from node-2's bare namespace).
    let probe = weft_lab::Netns::attach(&format!("{}-probe", lab.node(2).ns().name()));
    until("the Service to serve v1 pages only", 30, || {
        let pages: Vec<String> = (0..6).filter_map(|_| curl(lab, &probe, "http://web/").ok().map(|(_, b)| b)).collect();
        Ok((pages.len() == 6 && pages.iter().all(|b| b.trim_end().ends_with(" v1"))).then_some(()))
    })?;
    Ok(())
}

fn a_stopped_kubelet_loses_its_pods_to_the_other_node(lab: &mut Lab) -> Result<()> {
    let before = wait_web(lab, REPLICAS, "v1", 60)?;
    assert!(before.iter().any(|p| p.node == "node-2"), "{before:#?}");
    lab.stop_kubelet(2)?;
    let moved = until("every live web pod to run on node-1", 120, || {
        let pods = web_pods(lab)?;
        let live: Vec<&WebPod> = pods.iter().filter(|p| !p.deleting).collect();
        let ok = live.len() == REPLICAS && live.iter().all(|p| p.ready && p.node == "node-1");
        Ok(ok.then_some(pods))
    })?;
    let per_node: BTreeMap<&str, usize> = moved.iter().filter(|p| !p.deleting).fold(BTreeMap::new(), |mut m, p| {
        *m.entry(p.node.as_str()).or_default() += 1;
        m
    });
    assert_eq!(per_node, BTreeMap::from([("node-1", REPLICAS)]));
    assert_eq!(lab.ready_nodes(), ["node-1"], "node-2 is no longer Ready once its Lease is stale");
    Ok(())
}

#[test]
fn deployment_runs_on_containerd_across_nodes_behind_a_service_and_survives_deletes_undo_and_a_lost_node() {
    let opts = LabOptions {
        nodes: 2,
        proxy_mode: Some("iptables".into()),
        dns: true,
        kubelet: true,
        kubelet_args: vec!["--node-lease-renew-interval=1s".into(), "--node-status-update-frequency=1s".into()],
        controller_args: vec!["--node-monitor-period=1s".into(), "--node-monitor-grace-period=6s".into()],
        ..LabOptions::default()
    };
    let mut lab = Lab::up(opts, &mut |_| {}).expect("lab up with kubelets");
    let logs = |lab: &Lab| {
        let mut s = String::new();
        for i in 1..=2 {
            let text = std::fs::read_to_string(lab.node(i).kubelet_log_path()).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            s.push_str(&format!("--- node-{i} kubelet\n{}\n", lines[lines.len().saturating_sub(15)..].join("\n")));
        }
        let text = std::fs::read_to_string(lab.controller_log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        s.push_str(&format!("--- controller\n{}\n", lines[lines.len().saturating_sub(15)..].join("\n")));
        s
    };
    lab_exec_carries_the_labs_client_certificate(&lab).unwrap_or_else(|e| panic!("{e:#}"));
    let pods = pods_run_on_two_nodes_in_their_subnets(&lab).unwrap_or_else(|e| panic!("{e:#}\n{}", logs(&lab)));
    service_answers_by_name_from_a_pod_on_another_node(&lab, &pods).unwrap_or_else(|e| panic!("{e:#}\n{}", logs(&lab)));
    logs_and_exec_reach_another_nodes_kubelet(&lab, &pods).unwrap_or_else(|e| panic!("{e:#}\n{}", logs(&lab)));
    a_deleted_pod_is_recreated(&lab, &pods).unwrap_or_else(|e| panic!("{e:#}\n{}", logs(&lab)));
    rollout_undo_replaces_the_containers(&lab).unwrap_or_else(|e| panic!("{e:#}\n{}", logs(&lab)));
    a_stopped_kubelet_loses_its_pods_to_the_other_node(&mut lab).unwrap_or_else(|e| panic!("{e:#}\n{}", logs(&lab)));

    // `weft lab down`'s teardown (from what is on the machine, not from this process's children) leaves no
    // container, mount, cgroup or namespace of the lab.
    let (id, dir) = (lab.id().to_string(), lab.dir().to_path_buf());
    lab.persist();
    Lab::down(&id).expect("lab down");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    assert!(!mounts.contains(&dir.to_string_lossy().to_string()), "mounts left under {}", dir.display());
    assert!(cluster::cgroup_pids(&cluster::cgroup_subtree(&id)).is_empty());
    assert!(!weft_lab::lab::netns_list().iter().any(|n| n.starts_with(&weft_lab::lab::ns_prefix(&id))));
    assert!(!dir.exists());
}
