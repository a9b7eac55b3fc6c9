//! `weft-cni` end to end: the built `weft` binary invoked as `weft-cni` inside a node namespace wires
//! pod namespaces through the reference `bridge` and `host-local` plugins, as a container runtime would.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use serde_json::Value;
use weft_lab::Netns;

struct Node {
    ns: Netns,
    dir: tempfile::TempDir,
}

impl Node {
    fn new() -> Node {
        let ns = Netns::create("cni-node").unwrap();
        ns.sysctl("net.ipv4.ip_forward", "1").unwrap();
        let dir = tempfile::Builder::new().prefix("weft-cni-test-").tempdir().unwrap();
        std::fs::create_dir(dir.path().join("bin")).unwrap();
        std::os::unix::fs::symlink(weft_lab::weft_bin(), dir.path().join("bin/weft-cni")).unwrap();
        Node { ns, dir }
    }

    fn subnet_file(&self) -> PathBuf {
        self.dir.path().join("subnet.env")
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn conf(&self) -> String {
        format!(
            r#"{{"cniVersion":"1.0.0","name":"weft","type":"weft-cni","subnetFile":"{}","dataDir":"{}"}}"#,
            self.subnet_file().display(),
            self.data_dir().display()
        )
    }

    /// Runs `weft-cni` in the node namespace: (exit code, stdout parsed as JSON or Null when empty).
    fn cni(&self, command: &str, id: Option<&str>, pod: Option<&Netns>, stdin: &str) -> (i32, Value) {
        let bin = self.dir.path().join("bin");
        let mut c = self.ns.command(bin.join("weft-cni"));
        let plugins = weft_lab::bins::cni_bin_dir(None).unwrap();
        c.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("CNI_COMMAND", command)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", std::env::join_paths([bin.as_path(), plugins.as_path()]).unwrap())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(id) = id {
            c.env("CNI_CONTAINERID", id);
        }
        if let Some(pod) = pod {
            c.env("CNI_NETNS", pod.path());
        }
        let mut child = c.spawn().unwrap();
        child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let v = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("stdout {text:?}: {e}"))
        };
        (out.status.code().unwrap_or(-1), v)
    }
}

fn pod_ip(result: &Value) -> String {
    let addr = result["ips"][0]["address"].as_str().unwrap_or_else(|| panic!("no ips in {result}"));
    addr.split('/').next().unwrap().to_string()
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

const SUBNET_ENV: &str =
    "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.7.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n";

#[test]
fn add_wires_pods_that_reach_each_other_and_del_is_idempotent() {
    let node = Node::new();
    write(&node.subnet_file(), SUBNET_ENV);
    let (a, b) = (Netns::create("cni-pod-a").unwrap(), Netns::create("cni-pod-b").unwrap());

    let (code, ra) = node.cni("ADD", Some("ctr-a"), Some(&a), &node.conf());
    assert_eq!(code, 0, "ADD a: {ra}");
    let (code, rb) = node.cni("ADD", Some("ctr-b"), Some(&b), &node.conf());
    assert_eq!(code, 0, "ADD b: {rb}");
    assert_eq!(ra["cniVersion"], "1.0.0");
    let (ip_a, ip_b) = (pod_ip(&ra), pod_ip(&rb));
    assert!(ip_a.starts_with("10.244.7.") && ip_b.starts_with("10.244.7.") && ip_a != ip_b, "{ip_a} {ip_b}");

    let eth0 = a.ip(&["-4", "addr", "show", "dev", "eth0"]).unwrap();
    assert!(eth0.contains(&format!("{ip_a}/24")), "{eth0}");
    assert!(eth0.contains("mtu 1450"), "{eth0}");
    let routes = a.ip(&["route"]).unwrap();
    assert!(routes.contains("10.244.0.0/16 via 10.244.7.1"), "{routes}");
    let cni0 = node.ns.ip(&["-4", "addr", "show", "dev", "cni0"]).unwrap();
    assert!(cni0.contains("10.244.7.1/24"), "{cni0}");
    // The delegate is kept for DEL, and host-local's state lives under this node's data dir.
    assert!(node.data_dir().join("ctr-a").is_file());
    assert!(node.data_dir().join("ipam/weft").is_dir());

    a.exec("ping", &["-c1", "-W2", &ip_b]).expect("pod a pings pod b");
    b.exec("ping", &["-c1", "-W2", "10.244.7.1"]).expect("pod b pings its gateway");

    // CHECK with the ADD result as prevResult.
    let mut conf: Value = serde_json::from_str(&node.conf()).unwrap();
    conf["prevResult"] = ra.clone();
    let (code, out) = node.cni("CHECK", Some("ctr-a"), Some(&a), &conf.to_string());
    assert_eq!(code, 0, "CHECK: {out}");

    // A changed subnet file does not change what DEL releases.
    write(&node.subnet_file(), &SUBNET_ENV.replace("10.244.7.1", "10.244.9.1"));
    let (code, out) = node.cni("DEL", Some("ctr-a"), Some(&a), &node.conf());
    assert_eq!(code, 0, "DEL: {out}");
    assert!(a.ip(&["link", "show", "eth0"]).is_err(), "eth0 must be gone");
    assert!(!node.data_dir().join("ctr-a").exists());
    let leases = std::fs::read_dir(node.data_dir().join("ipam/weft")).unwrap();
    assert!(!leases.flatten().any(|e| e.file_name().to_string_lossy() == ip_a), "{ip_a} still leased");
    for _ in 0..2 {
        let (code, out) = node.cni("DEL", Some("ctr-a"), Some(&a), &node.conf());
        assert_eq!((code, out), (0, Value::Null), "DEL again is a no-op");
    }
    let (code, out) = node.cni("DEL", Some("ctr-b"), None, &node.conf());
    assert_eq!(code, 0, "DEL without netns: {out}");
}

#[test]
fn missing_subnet_file_is_a_cni_error_naming_it() {
    let node = Node::new();
    let pod = Netns::create("cni-pod-x").unwrap();
    let (code, out) = node.cni("ADD", Some("ctr-x"), Some(&pod), &node.conf());
    assert_ne!(code, 0);
    assert_eq!(out["cniVersion"], "1.0.0");
    assert_eq!(out["code"], 11);
    let msg = out["msg"].as_str().unwrap();
    assert!(msg.contains(&node.subnet_file().display().to_string()), "{msg}");
}

#[test]
fn bad_input_is_reported_as_cni_errors() {
    let node = Node::new();
    write(&node.subnet_file(), SUBNET_ENV);
    let pod = Netns::create("cni-pod-y").unwrap();
    let (code, out) = node.cni("ADD", Some("c"), Some(&pod), "{\"name\": ");
    assert_ne!(code, 0);
    assert_eq!(out["code"], 6, "{out}");
    assert!(out["msg"].as_str().unwrap().contains("EOF"), "{out}");

    let (code, out) = node.cni("ADD", None, Some(&pod), &node.conf());
    assert_ne!(code, 0);
    assert_eq!(out["code"], 4);
    assert!(out["msg"].as_str().unwrap().contains("CNI_CONTAINERID"), "{out}");

    let conf = node.conf().replace("\"weft-cni\"", "\"weft-cni\",\"delegate\":{\"type\":\"nosuchplugin\"}");
    let (code, out) = node.cni("ADD", Some("c"), Some(&pod), &conf);
    assert_ne!(code, 0);
    assert!(out["msg"].as_str().unwrap().contains("nosuchplugin"), "{out}");
}

#[test]
fn version_lists_supported_versions() {
    let node = Node::new();
    let (code, out) = node.cni("VERSION", None, None, "{\"cniVersion\":\"1.0.0\"}");
    assert_eq!(code, 0);
    assert_eq!(out["cniVersion"], "1.0.0");
    assert_eq!(out["supportedVersions"], serde_json::json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0"]));
}
