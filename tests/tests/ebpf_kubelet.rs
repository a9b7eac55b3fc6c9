//! eBPF mode with pods run by the kubelet (issue 12): a 2-node lab with containerd + `weft kubelet` per node, whose
//! `weft proxy --proxy-mode ebpf` attaches to the cgroup v2 directory of that node's pods (where runc puts the
//! containers) and pins in a private bpffs. A Deployment's httpd pods on node-1 answer a busybox client pod on node-2
//! by ClusterIP and by DNS name (the DNS Service is balanced by the same programs), `weft services` shows the map
//! entries, and with no `--nodeport-interface` the tc programs land on the interface holding the node address.

use anyhow::{anyhow, ensure, Context, Result};
use serde_json::Value;
use weft_lab::bpf::{Bpffs, Cgroup2Root};
use weft_lab::lab::until_some as until;
use weft_lab::{cluster, Lab, LabOptions};

const WEB: &str = r#"apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      nodeSelector: {kubernetes.io/hostname: node-1}
      terminationGracePeriodSeconds: 1
      containers:
      - name: httpd
        image: weft.local/busybox:1
        command: ["sh", "-c", "mkdir -p /www && echo \"hello from $(hostname)\" > /www/index.html && exec httpd -f -p 80 -h /www"]
        ports: [{containerPort: 80}]
        readinessProbe: {httpGet: {path: /, port: 80}, periodSeconds: 1}
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  type: NodePort
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 80, nodePort: 30090}]
"#;

fn json(lab: &Lab, args: &[&str]) -> Result<Value> {
    serde_json::from_str(&lab.weft(args, None)?).with_context(|| format!("weft {args:?}"))
}

/// Ready web pods' addresses.
fn ready_web_ips(lab: &Lab) -> Result<Vec<String>> {
    let v = json(lab, &["get", "pods", "-l", "app=web", "-o", "json"])?;
    let items = v.get("items").and_then(Value::as_array).cloned().unwrap_or_default();
    Ok(items
        .iter()
        .filter(|p| {
            let conditions = p.pointer("/status/conditions").and_then(Value::as_array).cloned().unwrap_or_default();
            p.pointer("/status/phase") == Some(&Value::from("Running"))
                && conditions.iter().any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
        .filter_map(|p| p.pointer("/status/podIP").and_then(Value::as_str).map(String::from))
        .collect())
}

/// The `0::` (cgroup v2) path of process `pid`, as the host's cgroup namespace sees it.
fn v2_path(pid: i32) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines().find_map(|l| l.strip_prefix("0::")).map(String::from)
}

/// weft's tcx programs on `interface` of node `i` (queried inside the node's namespace).
fn tc_programs(lab: &Lab, i: usize, interface: &'static str) -> Result<Vec<String>> {
    let path = lab.node(i).ns().path();
    std::thread::spawn(move || -> Result<Vec<String>> {
        weft_lab::netns::enter(&path)?;
        Ok(weft_ebpf::loader::tcx_programs(interface)?.into_iter().filter(|n| n.starts_with("weft_")).collect())
    })
    .join()
    .map_err(|_| anyhow!("thread panicked"))?
}

fn run(lab: &mut Lab, root: &Cgroup2Root, bpffs: &Bpffs) -> Result<()> {
    let id = lab.id().to_string();
    let pins = bpffs.path().join("weft");
    for i in 1..=2 {
        // The kubelet's pods cgroup, in the v2 hierarchy: the proxy attaches there before the first pod starts.
        let pods = root.join(&cluster::pods_cgroup(&id, lab.node(i).name()));
        std::fs::create_dir_all(&pods).with_context(|| format!("creating {}", pods.display()))?;
        // No --nodeport-interface: the default is the interface holding the node address (eth0, the default
        // route's), which the NodePort check below goes through.
        let args: Vec<String> = vec![
            "--min-sync-period".into(),
            "100ms".into(),
            "--cgroup-path".into(),
            pods.display().to_string(),
            "--bpf-pin-dir".into(),
            pins.display().to_string(),
        ];
        lab.start_proxy(i, "ebpf", &args)?;
    }
    for i in 1..=2 {
        until(&format!("node-{i}'s proxy to be healthy"), 20, || {
            Ok(lab.node(i).ns().exec("curl", &["-sf", "http://127.0.0.1:10256/healthz"]).ok())
        })?;
        let tc = tc_programs(lab, i, "eth0")?;
        ensure!(tc.len() == 2, "node-{i}: one tc program per direction on eth0 by default: {tc:?}");
    }

    lab.weft(&["apply", "-f", "-"], Some(WEB))?;
    until("2 ready web pods", 60, || {
        let ips = ready_web_ips(lab)?;
        Ok((ips.len() == 2).then_some(()))
    })?;
    // runc puts the containers in the pods cgroup of the v2 hierarchy too, so the programs see their sockets.
    let pods_cgroup = cluster::pods_cgroup(&id, "node-1");
    let pids = cluster::cgroup_pids(&pods_cgroup);
    ensure!(!pids.is_empty(), "no process under {pods_cgroup}");
    for pid in pids {
        let path = v2_path(pid).unwrap_or_default();
        ensure!(
            path.starts_with(&format!("{pods_cgroup}/")),
            "pid {pid} is in v2 cgroup {path:?}, not under {pods_cgroup}"
        );
    }
    let cluster_ip = json(lab, &["get", "svc", "web", "-o", "json"])?
        .pointer("/spec/clusterIP")
        .and_then(Value::as_str)
        .map(String::from)
        .context("web has no clusterIP")?;
    until("Endpoints web with both pods", 30, || {
        let v = json(lab, &["get", "ep", "web", "-o", "json"])?;
        let n = v.pointer("/subsets/0/addresses").and_then(Value::as_array).map_or(0, Vec::len);
        Ok((n == 2).then_some(()))
    })?;

    // The client on node-2: the Service by ClusterIP, then by its short name (resolved through the kube-dns VIP,
    // UDP through the same programs). busybox's wget fails unless it gets a 2xx.
    let client = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: client}}\nspec:\n  nodeName: node-2\n  restartPolicy: Never\n  \
         containers:\n  - name: wget\n    image: weft.local/busybox:1\n    command: [\"sh\", \"-c\", \
         \"wget -q -O - http://{cluster_ip}/ && wget -q -O - http://web/\"]\n"
    );
    lab.weft(&["apply", "-f", "-"], Some(&client))?;
    let phase = until("pod client to finish", 45, || {
        let v = json(lab, &["get", "pod", "client", "-o", "json"])?;
        let phase = v.pointer("/status/phase").and_then(Value::as_str).unwrap_or_default().to_string();
        Ok(matches!(phase.as_str(), "Succeeded" | "Failed").then_some(phase))
    })?;
    let logs = lab.pod_logs(2, "client");
    ensure!(phase == "Succeeded", "the client's fetches failed; its log:\n{logs}");
    ensure!(logs.matches("hello from web-").count() == 2, "both fetches answered by a web pod: {logs}");

    // `weft services` on node-2 shows the map entries behind the Service.
    let out = lab.node(2).ns().command(weft_lab::weft_bin()).args(["services", "-o", "json"]).output()?;
    let status: Value = serde_json::from_slice(&out.stdout).context("weft services -o json")?;
    ensure!(status["mode"] == "ebpf", "{status}");
    let services = status["services"].as_array().cloned().unwrap_or_default();
    let web = services.iter().find(|s| s["name"] == "default/web:http").context("web listed")?;
    let programmed = web["programmed"].as_str().unwrap_or("");
    // One entry per frontend (the node port, the ClusterIP), each counting both backends.
    let entry = |frontend: &str| programmed.split(", ").any(|e| e.starts_with(frontend) && e.contains(" count=2"));
    ensure!(entry(&format!("{cluster_ip}:80/tcp id=")) && entry("*:30090/tcp nodeport id="), "{programmed}");
    let dns = services.iter().find(|s| s["name"] == "kube-system/kube-dns:dns").context("kube-dns listed")?;
    ensure!(dns["programmed"].as_str().unwrap_or("").contains("10.96.0.10:53/udp id="), "{dns}");

    // North-south through the default interface: node-2 has no web pod, so the backend is remote (SNAT).
    let body = until("node port 30090 on node-2 from the fabric", 20, || {
        Ok(lab.fabric().exec("curl", &["-sf", "-m", "3", "http://192.168.56.12:30090/"]).ok())
    })?;
    ensure!(body.starts_with("hello from web-"), "{body}");
    Ok(())
}

#[test]
fn ebpf_mode_balances_kubelet_pods_by_cluster_ip_and_dns_name() {
    let opts = LabOptions { nodes: 2, dns: true, kubelet: true, ..LabOptions::default() };
    let mut lab = Lab::up(opts, &mut |_| {}).expect("lab up with kubelets");
    let root = Cgroup2Root::mount().expect("cgroup2 mount");
    let bpffs = Bpffs::mount().expect("bpffs mount");
    let result = run(&mut lab, &root, &bpffs);
    if let Err(e) = result {
        let mut s = String::new();
        for i in 1..=2 {
            for log in [lab.node(i).proxy_log_path(), lab.node(i).kubelet_log_path()] {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                s.push_str(&format!("--- {}\n{}\n", log.display(), lines[lines.len().saturating_sub(12)..].join("\n")));
            }
        }
        panic!("{e:#}\n{s}");
    }
    // Guard order: the lab (its proxies, pods and cgroups) goes before the mounts.
    drop(lab);
    drop(bpffs);
    drop(root);
}
