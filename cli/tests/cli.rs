//! `weft apply|get|delete` end to end: the built binary against a real etcd, with the Kubernetes documentation's
//! `my-service` manifests (testdata/my-service/). etcdctl checks what was written. Needs `cargo build` first.

use std::path::PathBuf;
use std::process::{Command, Output};

use weft_lab::EtcdFixture;

fn testdata(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata").join(name).display().to_string()
}

struct Weft<'a> {
    etcd: &'a EtcdFixture,
}

impl Weft<'_> {
    fn run(&self, args: &[&str]) -> Output {
        self.run_stdin(args, None)
    }

    fn run_stdin(&self, args: &[&str], stdin: Option<&str>) -> Output {
        weft_lab::run_weft(self.etcd.endpoint(), args, stdin).unwrap()
    }

    /// Runs and expects success; returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(out.status.success(), "weft {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs and expects failure; returns stderr.
    fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(!out.status.success(), "weft {args:?} should fail: {}", String::from_utf8_lossy(&out.stdout));
        String::from_utf8(out.stderr).unwrap()
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        serde_json::from_str(&self.ok(args)).unwrap()
    }
}

fn etcd_keys(etcd: &EtcdFixture, prefix: &str) -> Vec<String> {
    let out = Command::new("etcdctl")
        .args(["--endpoints", etcd.endpoint(), "get", "--prefix", "--keys-only", prefix])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().lines().filter(|l| !l.is_empty()).map(str::to_string).collect()
}

#[test]
fn apply_get_delete_the_documentation_services() {
    let etcd = EtcdFixture::start().unwrap();
    let weft = Weft { etcd: &etcd };

    assert_eq!(weft.ok(&["apply", "-f", &testdata("my-service/service.yaml")]), "service/my-service created\n");
    assert_eq!(weft.ok(&["apply", "-f", &testdata("my-service/service.yaml")]), "service/my-service unchanged\n");
    let svc = weft.json(&["get", "svc", "my-service", "-o", "json"]);
    let ip = svc["spec"]["clusterIP"].as_str().unwrap().to_string();
    assert!(ip.starts_with("10.9") || ip.starts_with("10.10") || ip.starts_with("10.11"), "{ip} not in 10.96.0.0/12");
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], 9376);
    assert_eq!(svc["spec"]["selector"]["app"], "MyApp");
    assert_eq!(etcd_keys(&etcd, "/registry/ranges/"), [format!("/registry/ranges/serviceips/{ip}")]);

    let table = weft.ok(&["get", "services"]);
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("NAME         TYPE        CLUSTER-IP"), "{table}");
    let row: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(row[..5], ["my-service", "ClusterIP", ip.as_str(), "<none>", "80/TCP"], "{table}");

    // externalIPs: configured in place, the ClusterIP kept.
    assert_eq!(weft.ok(&["apply", "-f", &testdata("my-service/external-ips.yaml")]), "service/my-service configured\n");
    let row = weft.ok(&["get", "svc", "my-service"]);
    assert!(row.contains(&format!("{ip}   80.11.12.10   80/TCP")), "{row}");

    // The LoadBalancer example asks for 10.0.171.239, outside 10.96.0.0/12: refused, nothing changes.
    let before = weft.json(&["get", "svc", "my-service", "-o", "json"]);
    let err = weft.fails(&["apply", "-f", &testdata("my-service/load-balancer.yaml")]);
    assert!(err.contains("load-balancer.yaml (document 0)"), "{err}");
    assert!(
        err.contains("spec.clusterIP: Invalid value: \"10.0.171.239\": provided IP is not in the valid range. The range of valid IPs is 10.96.0.0/12"),
        "{err}"
    );
    assert_eq!(weft.json(&["get", "svc", "my-service", "-o", "json"]), before);

    // In a cluster whose service network is 10.0.0.0/16 it is accepted (after the old one is gone: the IP is
    // immutable); the manifest's status is not taken, so the external IP is pending.
    assert_eq!(weft.ok(&["delete", "svc", "my-service"]), "service \"my-service\" deleted\n");
    assert!(etcd_keys(&etcd, "/registry/").is_empty(), "delete releases the IP");
    let out = weft.ok(&[
        "apply",
        "--service-cluster-ip-range",
        "10.0.0.0/16",
        "-f",
        &testdata("my-service/load-balancer.yaml"),
    ]);
    assert_eq!(out, "service/my-service created\n");
    let row = weft.ok(&["get", "svc"]);
    let cells: Vec<&str> = row.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(cells[..4], ["my-service", "LoadBalancer", "10.0.171.239", "<pending>"], "{row}");
    assert!(cells[4].starts_with("80:3") && cells[4].ends_with("/TCP"), "a node port is allocated: {row}");
    weft.ok(&["delete", "service", "my-service"]);
    assert!(etcd_keys(&etcd, "/registry/ranges/").is_empty(), "IP and node port released");

    // Without a selector, with hand-written Endpoints; then deleted by the same file.
    let out = weft.ok(&["apply", "-f", &testdata("my-service/without-selector.yaml")]);
    assert_eq!(out, "service/my-service created\nendpoints/my-service created\n");
    let ep = weft.ok(&["get", "ep"]);
    assert!(ep.lines().nth(1).unwrap().starts_with("my-service   1.2.3.4:9376   "), "{ep}");
    assert_eq!(weft.json(&["get", "svc", "my-service", "-o", "json"])["spec"].get("selector"), None);

    // Headless: no ClusterIP, shown as None.
    weft.ok(&["apply", "-f", &testdata("my-service/headless.yaml")]);
    let row = weft.ok(&["get", "svc", "my-headless"]);
    assert!(row.lines().nth(1).unwrap().starts_with("my-headless   ClusterIP   None   "), "{row}");

    // -o yaml of several objects is a List; -A adds NAMESPACE.
    let list: serde_norway::Value = serde_norway::from_str(&weft.ok(&["get", "svc", "-o", "yaml"])).unwrap();
    assert_eq!(list["kind"], "List");
    assert_eq!(list["items"].as_sequence().unwrap().len(), 2);
    assert!(weft.ok(&["get", "svc", "-A"]).starts_with("NAMESPACE   NAME"));
    assert_eq!(weft.ok(&["get", "svc", "-l", "app=my-headless", "-o", "name"]), "service/my-headless\n");

    let out = weft.ok(&["delete", "-f", &testdata("my-service/without-selector.yaml")]);
    assert_eq!(out, "service \"my-service\" deleted\nendpoints \"my-service\" deleted\n");
    let err = weft.fails(&["delete", "svc", "my-service"]);
    assert!(err.contains("Error from server (NotFound): services \"my-service\" not found"), "{err}");
    weft.ok(&["delete", "svc", "my-headless"]);
    let out = weft.run(&["get", "svc"]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stderr), "No resources found in default namespace.\n");
    assert!(etcd_keys(&etcd, "/registry/").is_empty());
}

#[test]
fn a_bad_manifest_writes_nothing_and_names_document_field_and_problem() {
    let etcd = EtcdFixture::start().unwrap();
    let weft = Weft { etcd: &etcd };
    let err = weft.fails(&["apply", "-f", &testdata("bad-second-document.yaml")]);
    assert!(err.contains("bad-second-document.yaml (document 1)"), "{err}");
    assert!(err.contains("spec.ports[1].port: Invalid value: 70000: must be between 1 and 65535, inclusive"), "{err}");
    assert!(etcd_keys(&etcd, "/registry/").is_empty(), "the valid first document was not written either");

    let out = weft.run_stdin(&["apply", "-f", "-"], Some("apiVersion: v1\nkind: Gadget\nmetadata: {name: g}\n"));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("<stdin> (document 0): kind: no kind \"Gadget\" is registered for version \"v1\""), "{err}");
}

#[test]
fn apply_reads_stdin_json_lists_and_old_group_versions() {
    let etcd = EtcdFixture::start().unwrap();
    let weft = Weft { etcd: &etcd };
    let list = r#"{"apiVersion":"v1","kind":"List","items":[
        {"apiVersion":"v1","kind":"Namespace","metadata":{"name":"prod"}},
        {"apiVersion":"extensions/v1beta1","kind":"Deployment","metadata":{"name":"web","namespace":"prod"},
         "spec":{"replicas":2,"template":{"metadata":{"labels":{"app":"web"}},"spec":{"containers":[{"name":"c","image":"nginx"}]}}}}]}"#;
    let out = weft.run_stdin(&["apply", "-f", "-"], Some(list));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "namespace/prod created\ndeployment.apps/web created\n");
    let d = weft.json(&["get", "deploy", "web", "-n", "prod", "-o", "json"]);
    assert_eq!(d["apiVersion"], "apps/v1");
    assert_eq!(d["spec"]["selector"]["matchLabels"]["app"], "web");
    assert_eq!(etcd_keys(&etcd, "/registry/deployments/"), ["/registry/deployments/prod/web"]);
    assert!(weft.ok(&["get", "ns"]).contains("prod   Active"));
}
