//! The kubectl-like CLI end to end: the built `weft` binary against a real etcd, with the seeds' examples as
//! written (the `frontend` ReplicaSet and `nginx-deployment` in `extensions/v1beta1`, the `my-service` Services).
//! No controller runs: where one would act (ReplicaSets with revision annotations, status), the test writes the
//! objects itself, straight into etcd with etcdctl, and checks what the CLI reads and writes there.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::{json, Value};
use weft_lab::EtcdFixture;

const FRONTEND: &str = "\
apiVersion: extensions/v1beta1
kind: ReplicaSet
metadata:
  name: frontend
spec:
  replicas: 3
  selector:
    matchLabels:
      tier: frontend
    matchExpressions:
      - {key: tier, operator: In, values: [frontend]}
  template:
    metadata:
      labels:
        app: guestbook
        tier: frontend
    spec:
      containers:
      - name: php-redis
        image: gcr.io/google_samples/gb-frontend:v3
        resources:
          requests:
            cpu: 100m
            memory: 100Mi
        ports:
        - containerPort: 80
";

const NGINX_DEPLOYMENT: &str = "\
apiVersion: extensions/v1beta1
kind: Deployment
metadata:
  name: nginx-deployment
spec:
  replicas: 3
  template:
    metadata:
      labels:
        app: nginx
    spec:
      containers:
      - name: nginx
        image: nginx:1.7.9
        ports:
        - containerPort: 80
";

fn my_service(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../cli/testdata/my-service").join(name).display().to_string()
}

struct Weft<'a> {
    etcd: &'a EtcdFixture,
}

impl Weft<'_> {
    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(weft_lab::weft_bin());
        c.args(args).env("WEFT_ETCD_ENDPOINTS", self.etcd.endpoint()).env_remove("WEFT_LOG");
        c
    }

    fn run(&self, args: &[&str], stdin: Option<&str>) -> Output {
        weft_lab::run_weft(self.etcd.endpoint(), args, stdin).unwrap()
    }

    /// Runs and expects success; returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args, None);
        assert!(out.status.success(), "weft {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs and expects failure; returns stderr.
    fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args, None);
        assert!(!out.status.success(), "weft {args:?} should fail: {}", String::from_utf8_lossy(&out.stdout));
        String::from_utf8(out.stderr).unwrap()
    }

    fn apply(&self, yaml: &str) -> String {
        let out = self.run(&["apply", "-f", "-"], Some(yaml));
        assert!(out.status.success(), "apply failed: {}\n{yaml}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    /// A process left running (`get -w`, `rollout status`): its stdout lines arrive on a channel.
    fn spawn(&self, args: &[&str]) -> Running {
        let mut child =
            self.command(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Running { child, lines: rx }
    }
}

struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Running {
    fn line(&self) -> String {
        self.lines.recv_timeout(Duration::from_secs(20)).expect("a line of output within 20s")
    }

    /// Waits for the process to end; its exit status and stderr.
    fn wait(mut self) -> (std::process::ExitStatus, String) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let mut err = String::new();
                std::io::Read::read_to_string(self.child.stderr.as_mut().unwrap(), &mut err).unwrap();
                return (status, err);
            }
            assert!(std::time::Instant::now() < deadline, "the process did not end");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn etcdctl(etcd: &EtcdFixture, args: &[&str]) -> String {
    let out = Command::new("etcdctl")
        .arg("--endpoints")
        .arg(etcd.endpoint())
        .args(args)
        .env("ETCDCTL_API", "3")
        .output()
        .unwrap();
    assert!(out.status.success(), "etcdctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// The object stored at `key`, as the JSON in etcd.
fn stored(etcd: &EtcdFixture, key: &str) -> Option<Value> {
    let out = etcdctl(etcd, &["get", "--print-value-only", key]);
    (!out.trim().is_empty()).then(|| serde_json::from_str(out.trim()).unwrap())
}

/// Writes an object straight into etcd, as a controller writing status would (no resourceVersion stored).
fn put(etcd: &EtcdFixture, key: &str, mut obj: Value) {
    if let Some(m) = obj["metadata"].as_object_mut() {
        m.remove("resourceVersion");
    }
    etcdctl(etcd, &["put", key, &obj.to_string()]);
}

fn keys(etcd: &EtcdFixture, prefix: &str) -> Vec<String> {
    etcdctl(etcd, &["get", "--prefix", "--keys-only", prefix])
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

/// The cells of each line of a table, with the AGE column (whatever its position) dropped: ages depend on the clock.
fn cells(table: &str) -> Vec<Vec<String>> {
    let mut lines = table.lines();
    let header = lines.next().unwrap_or("");
    let heads: Vec<&str> = header.split("   ").map(str::trim).filter(|h| !h.is_empty()).collect();
    let age = heads.iter().position(|h| *h == "AGE");
    std::iter::once(header)
        .chain(lines)
        .map(|l| {
            let mut c: Vec<String> = l.split_whitespace().map(str::to_string).collect();
            if let Some(i) = age {
                if i < c.len() {
                    c.remove(i);
                }
            }
            c
        })
        .collect()
}

fn strs(rows: &[&[&str]]) -> Vec<Vec<String>> {
    rows.iter().map(|r| r.iter().map(|c| c.to_string()).collect()).collect()
}

#[test]
fn the_seeds_frontend_and_nginx_deployment_apply_as_written_and_show_as_kubectl_shows_them() {
    let etcd = EtcdFixture::start().unwrap();
    let weft = Weft { etcd: &etcd };
    assert_eq!(weft.apply(FRONTEND), "replicaset.apps/frontend created\n");
    assert_eq!(weft.apply(NGINX_DEPLOYMENT), "deployment.apps/nginx-deployment created\n");
    assert_eq!(weft.apply(FRONTEND), "replicaset.apps/frontend unchanged\n");

    // Stored as apps/v1: the set-based selector kept, the deployment's selector taken from its template labels.
    let rs = stored(&etcd, "/registry/replicasets/default/frontend").unwrap();
    assert_eq!(rs["apiVersion"], "apps/v1");
    assert_eq!(
        rs["spec"]["selector"]["matchExpressions"],
        json!([{"key": "tier", "operator": "In", "values": ["frontend"]}])
    );
    assert_eq!(rs["metadata"]["labels"], json!({"app": "guestbook", "tier": "frontend"}));
    let d = stored(&etcd, "/registry/deployments/default/nginx-deployment").unwrap();
    assert_eq!(d["spec"]["selector"], json!({"matchLabels": {"app": "nginx"}}));
    assert_eq!(
        d["spec"]["strategy"]["rollingUpdate"],
        json!({"maxSurge": 1, "maxUnavailable": 1}),
        "extensions/v1beta1 defaults"
    );

    // Several kinds in one call: a table each, names prefixed with the kind.
    let out = weft.ok(&["get", "rs,deploy"]);
    let (rs_table, deploy_table) = out.split_once("\n\n").expect("a blank line between the tables");
    assert_eq!(
        cells(rs_table),
        strs(&[&["NAME", "DESIRED", "CURRENT", "READY"], &["replicaset.apps/frontend", "3", "0", "0"]])
    );
    assert_eq!(
        cells(deploy_table),
        strs(&[&["NAME", "READY", "UP-TO-DATE", "AVAILABLE"], &["deployment.apps/nginx-deployment", "0/3", "0", "0"]])
    );
    let wide = weft.ok(&["get", "rs", "frontend", "-o", "wide"]);
    assert!(wide.starts_with("NAME       DESIRED   CURRENT   READY   AGE   CONTAINERS   IMAGES "), "{wide}");
    assert!(
        wide.lines()
            .nth(1)
            .unwrap()
            .ends_with("   php-redis    gcr.io/google_samples/gb-frontend:v3   tier=frontend,tier in (frontend)"),
        "{wide}"
    );

    // -l: equality, set-based and existence selectors.
    assert_eq!(weft.ok(&["get", "rs", "-l", "tier in (frontend,backend)", "-o", "name"]), "replicaset.apps/frontend\n");
    assert_eq!(
        weft.ok(&["get", "rs,deploy", "-l", "app", "-o", "name"]),
        "replicaset.apps/frontend\ndeployment.apps/nginx-deployment\n"
    );
    assert_eq!(weft.ok(&["get", "deploy", "-l", "!tier", "-o", "name"]), "deployment.apps/nginx-deployment\n");
    let out = weft.run(&["get", "rs", "-l", "tier notin (frontend)"], None);
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stderr), "No resources found in default namespace.\n");
    assert!(weft.fails(&["get", "rs", "-l", "tier in (frontend"]).contains("invalid label selector"));

    // -o json of one object is the object; of a kind, a List.
    let one: Value = serde_json::from_str(&weft.ok(&["get", "deployment/nginx-deployment", "-o", "json"])).unwrap();
    assert_eq!(one["kind"], "Deployment");
    let list: Value = serde_json::from_str(&weft.ok(&["get", "rs,deploy", "-o", "json"])).unwrap();
    assert_eq!(list["kind"], "List");
    assert_eq!(list["items"].as_array().unwrap().len(), 2);

    // A missing name is reported and fails the command; the others are still printed.
    let out = weft.run(&["get", "deploy", "nginx-deployment", "nope"], None);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("nginx-deployment"));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "Error from server (NotFound): deployments.apps \"nope\" not found\n"
    );

    // describe, by name and by prefix.
    let text = weft.ok(&["describe", "rs", "frontend"]);
    assert!(
        text.starts_with(
            "Name:         frontend\nNamespace:    default\nSelector:     tier=frontend,tier in (frontend)\n"
        ),
        "{text}"
    );
    assert!(text.contains("Pods Status:  0 Running / 0 Waiting / 0 Succeeded / 0 Failed\n"), "{text}");
    assert!(
        text.contains("    Requests:\n      cpu:         100m\n      memory:      100Mi\n    Environment:   <none>\n"),
        "{text}"
    );
    assert!(text.ends_with("Events:            <none>\n"), "{text}");
    let text = weft.ok(&["describe", "deploy", "nginx"]);
    assert!(text.starts_with("Name:                   nginx-deployment\n"), "{text}");
    assert!(text.contains("RollingUpdateStrategy:  1 max unavailable, 1 max surge\n"), "{text}");
    assert!(weft.fails(&["describe", "deploy", "zzz"]).contains("deployments.apps \"zzz\" not found"));
}

#[test]
fn scale_and_set_image_change_the_seeds_deployment_with_kubectls_messages() {
    let etcd = EtcdFixture::start().unwrap();
    let weft = Weft { etcd: &etcd };
    weft.apply(NGINX_DEPLOYMENT);
    weft.apply(FRONTEND);
    let key = "/registry/deployments/default/nginx-deployment";

    assert_eq!(
        weft.ok(&["scale", "deployment", "nginx-deployment", "--replicas", "10"]),
        "deployment.apps/nginx-deployment scaled\n"
    );
    let d = stored(&etcd, key).unwrap();
    assert_eq!(d["spec"]["replicas"], 10);
    assert_eq!(d["metadata"]["generation"], 2, "a spec change moves the generation");

    // --current-replicas is a precondition: a wrong one changes nothing.
    let before = etcdctl(&etcd, &["get", "-w", "json", key]);
    let err = weft.fails(&["scale", "deployment/nginx-deployment", "--replicas", "5", "--current-replicas", "3"]);
    assert!(err.contains("Expected replicas to be 3, was 10"), "{err}");
    assert_eq!(etcdctl(&etcd, &["get", "-w", "json", key]).split("\"kvs\"").nth(1), before.split("\"kvs\"").nth(1));
    assert_eq!(
        weft.ok(&["scale", "deployment/nginx-deployment", "--replicas", "5", "--current-replicas", "10"]),
        "deployment.apps/nginx-deployment scaled\n"
    );
    assert_eq!(weft.ok(&["scale", "rs/frontend", "--replicas", "2"]), "replicaset.apps/frontend scaled\n");
    assert_eq!(stored(&etcd, "/registry/replicasets/default/frontend").unwrap()["spec"]["replicas"], 2);
    assert!(weft.fails(&["scale", "deploy/nope", "--replicas", "1"]).contains("deployments.apps \"nope\" not found"));
    assert!(weft.fails(&["scale", "svc/x", "--replicas", "1"]).contains("cannot be scaled"));

    assert_eq!(
        weft.ok(&["set", "image", "deployment/nginx-deployment", "nginx=nginx:1.9.1"]),
        "deployment.apps/nginx-deployment image updated\n"
    );
    let d = stored(&etcd, key).unwrap();
    assert_eq!(d["spec"]["template"]["spec"]["containers"][0]["image"], "nginx:1.9.1");
    assert_eq!(d["spec"]["replicas"], 5, "set image leaves replicas alone");
    // The same image again is no change and prints nothing, as kubectl.
    assert_eq!(weft.ok(&["set", "image", "deployment/nginx-deployment", "nginx=nginx:1.9.1"]), "");
    // An unknown container is named, and nothing is written (the known one is not changed either).
    let before = stored(&etcd, key).unwrap();
    let err = weft.fails(&["set", "image", "deployment/nginx-deployment", "nginx=nginx:2", "ngnix=nginx:2"]);
    assert!(err.contains("unable to find container named \"ngnix\""), "{err}");
    assert_eq!(stored(&etcd, key).unwrap(), before);
    // --record writes the change-cause the deployment controller copies to the new ReplicaSet.
    weft.ok(&["set", "image", "deployment", "nginx-deployment", "nginx=nginx:1.10", "--record"]);
    let cause = stored(&etcd, key).unwrap()["metadata"]["annotations"]["kubernetes.io/change-cause"].clone();
    assert!(
        cause.as_str().unwrap().ends_with("set image deployment nginx-deployment nginx=nginx:1.10 --record"),
        "{cause}"
    );
}

/// The ReplicaSet a Deployment controller would have made for `image` at `revision`.
fn replicaset(deploy: &Value, hash: &str, revision: u32, image: &str, replicas: u32, cause: Option<&str>) -> Value {
    let mut annotations = json!({"deployment.kubernetes.io/revision": revision.to_string()});
    if let Some(c) = cause {
        annotations["kubernetes.io/change-cause"] = json!(c);
    }
    json!({
        "apiVersion": "apps/v1", "kind": "ReplicaSet",
        "metadata": {
            "name": format!("nginx-deployment-{hash}"), "namespace": "default",
            "uid": format!("rs-{hash}"), "creationTimestamp": format!("2026-01-01T00:0{revision}:00Z"),
            "labels": {"app": "nginx", "pod-template-hash": hash},
            "annotations": annotations,
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": "nginx-deployment",
                                 "uid": deploy["metadata"]["uid"], "controller": true, "blockOwnerDeletion": true}]
        },
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": "nginx", "pod-template-hash": hash}},
            "template": {
                "metadata": {"labels": {"app": "nginx", "pod-template-hash": hash}},
                "spec": {"containers": [{"name": "nginx", "image": image, "ports": [{"containerPort": 80}]}]}
            }
        },
        "status": {"replicas": replicas}
    })
}

#[test]
fn rollout_history_and_undo_read_the_deployments_replicasets() {
    let etcd = EtcdFixture::start().unwrap();
    let weft = Weft { etcd: &etcd };
    let key = "/registry/deployments/default/nginx-deployment";
    weft.apply(NGINX_DEPLOYMENT);
    assert_eq!(
        weft.ok(&["rollout", "history", "deployment/nginx-deployment"]),
        "deployment.apps/nginx-deployment \nNo rollout history found.\n"
    );
    let err = weft.fails(&["rollout", "undo", "deployment/nginx-deployment"]);
    assert!(err.contains("no rollout history found for deployment \"nginx-deployment\""), "{err}");

    // `set image` as the seeds do, then the ReplicaSets a controller would keep: revision 1 (nginx:1.7.9) scaled
    // down, revision 2 (nginx:1.9.1) running. A ReplicaSet owned by another deployment is not history.
    weft.ok(&["set", "image", "deployment/nginx-deployment", "nginx=nginx:1.9.1"]);
    let d = stored(&etcd, key).unwrap();
    put(
        &etcd,
        "/registry/replicasets/default/nginx-deployment-6b474476c4",
        replicaset(&d, "6b474476c4", 1, "nginx:1.7.9", 0, None),
    );
    let cause = "kubectl set image deployment/nginx-deployment nginx=nginx:1.9.1 --record=true";
    put(
        &etcd,
        "/registry/replicasets/default/nginx-deployment-5d59d67564",
        replicaset(&d, "5d59d67564", 2, "nginx:1.9.1", 3, Some(cause)),
    );
    let mut stranger = replicaset(&d, "0000000000", 7, "evil:1", 0, None);
    stranger["metadata"]["ownerReferences"][0]["uid"] = json!("someone-else");
    put(&etcd, "/registry/replicasets/default/nginx-deployment-0000000000", stranger);

    assert_eq!(
        weft.ok(&["rollout", "history", "deployment/nginx-deployment"]),
        format!("deployment.apps/nginx-deployment \nREVISION  CHANGE-CAUSE\n1         <none>\n2         {cause}\n\n")
    );
    let rev1 = weft.ok(&["rollout", "history", "deployment", "nginx-deployment", "--revision", "1"]);
    assert!(rev1.starts_with("deployment.apps/nginx-deployment with revision #1\nPod Template:\n  Labels:\tapp=nginx\n\tpod-template-hash=6b474476c4\n"), "{rev1}");
    assert!(rev1.contains("    Image:\tnginx:1.7.9\n"), "{rev1}");
    assert!(weft
        .fails(&["rollout", "history", "deployment/nginx-deployment", "--revision", "9"])
        .contains("unable to find the specified revision"));

    // describe shows the new and old ReplicaSets.
    let text = weft.ok(&["describe", "deployment", "nginx-deployment"]);
    assert!(text.contains("OldReplicaSets:    nginx-deployment-6b474476c4 (0/0 replicas created)\nNewReplicaSet:     nginx-deployment-5d59d67564 (3/3 replicas created)\n"), "{text}");

    // A revision that does not exist: kubectl's message, nothing written.
    let before = stored(&etcd, key).unwrap();
    let err = weft.fails(&["rollout", "undo", "deployment/nginx-deployment", "--to-revision", "5"]);
    assert!(err.contains("unable to find specified revision 5 in history"), "{err}");
    assert_eq!(stored(&etcd, key).unwrap(), before);

    // Paused deployments are not rolled back.
    assert_eq!(
        weft.ok(&["rollout", "pause", "deployment/nginx-deployment"]),
        "deployment.apps/nginx-deployment paused\n"
    );
    assert_eq!(stored(&etcd, key).unwrap()["spec"]["paused"], true);
    let err = weft.fails(&["rollout", "pause", "deployment/nginx-deployment"]);
    assert!(err.contains("deployments.apps \"nginx-deployment\" is already paused"), "{err}");
    assert!(weft
        .fails(&["rollout", "undo", "deployment/nginx-deployment"])
        .contains("you cannot rollback a paused deployment"));
    assert_eq!(
        weft.ok(&["rollout", "resume", "deployment/nginx-deployment"]),
        "deployment.apps/nginx-deployment resumed\n"
    );
    assert_eq!(stored(&etcd, key).unwrap()["spec"]["paused"], false);

    // undo: the previous revision's template, without the hash label, goes back into the deployment.
    assert_eq!(
        weft.ok(&["rollout", "undo", "deployment/nginx-deployment"]),
        "deployment.apps/nginx-deployment rolled back\n"
    );
    let d = stored(&etcd, key).unwrap();
    assert_eq!(d["spec"]["template"]["spec"]["containers"][0]["image"], "nginx:1.7.9");
    assert_eq!(d["spec"]["template"]["metadata"]["labels"], json!({"app": "nginx"}));
    assert_eq!(
        weft.ok(&["rollout", "undo", "deployment/nginx-deployment", "--to-revision", "1"]),
        "deployment.apps/nginx-deployment skipped rollback (current template already matches revision 1)\n"
    );
    assert_eq!(
        weft.ok(&["rollout", "undo", "deployment/nginx-deployment", "--to-revision", "2"]),
        "deployment.apps/nginx-deployment rolled back\n"
    );
    let d = stored(&etcd, key).unwrap();
    assert_eq!(d["spec"]["template"]["spec"]["containers"][0]["image"], "nginx:1.9.1");
    assert_eq!(
        d["metadata"]["annotations"]["kubernetes.io/change-cause"], cause,
        "the revision's change-cause comes back"
    );
}

/// Writes `status` into the stored deployment (and, with `generation`, observes that generation).
fn set_status(etcd: &EtcdFixture, key: &str, status: Value) {
    let mut d = stored(etcd, key).unwrap();
    d["status"] = status;
    put(etcd, key, d);
}

#[test]
fn rollout_status_follows_the_deployment_until_it_is_rolled_out_or_fails() {
    let etcd = EtcdFixture::start().unwrap();
    let weft = Weft { etcd: &etcd };
    let key = "/registry/deployments/default/nginx-deployment";
    weft.apply(NGINX_DEPLOYMENT);

    let status = weft.spawn(&["rollout", "status", "deployment/nginx-deployment"]);
    assert_eq!(status.line(), "Waiting for deployment spec update to be observed...");
    set_status(&etcd, key, json!({"observedGeneration": 1, "replicas": 1, "updatedReplicas": 1}));
    assert_eq!(
        status.line(),
        "Waiting for deployment \"nginx-deployment\" rollout to finish: 1 out of 3 new replicas have been updated..."
    );
    set_status(
        &etcd,
        key,
        json!({"observedGeneration": 1, "replicas": 4, "updatedReplicas": 3, "availableReplicas": 3}),
    );
    assert_eq!(
        status.line(),
        "Waiting for deployment \"nginx-deployment\" rollout to finish: 1 old replicas are pending termination..."
    );
    set_status(
        &etcd,
        key,
        json!({"observedGeneration": 1, "replicas": 3, "updatedReplicas": 3, "availableReplicas": 1}),
    );
    assert_eq!(
        status.line(),
        "Waiting for deployment \"nginx-deployment\" rollout to finish: 1 of 3 updated replicas are available..."
    );
    set_status(
        &etcd,
        key,
        json!({"observedGeneration": 1, "replicas": 3, "updatedReplicas": 3, "availableReplicas": 3}),
    );
    assert_eq!(status.line(), "deployment \"nginx-deployment\" successfully rolled out");
    let (code, _) = status.wait();
    assert!(code.success());

    // Done already: one line, exit 0.
    assert_eq!(
        weft.ok(&["rollout", "status", "deployment", "nginx-deployment"]),
        "deployment \"nginx-deployment\" successfully rolled out\n"
    );

    // A new template, then the controller reports the progress deadline passed: non-zero exit, kubectl's message.
    weft.ok(&["set", "image", "deployment/nginx-deployment", "nginx=nginx:1.9.1"]);
    let status = weft.spawn(&["rollout", "status", "deployment/nginx-deployment"]);
    assert_eq!(status.line(), "Waiting for deployment spec update to be observed...");
    set_status(
        &etcd,
        key,
        json!({"observedGeneration": 2, "replicas": 4, "updatedReplicas": 1, "availableReplicas": 3,
               "conditions": [{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}]}),
    );
    let (code, err) = status.wait();
    assert!(!code.success());
    assert!(err.contains("deployment \"nginx-deployment\" exceeded its progress deadline"), "{err}");

    // --watch=false prints once; --timeout gives up with an error.
    set_status(&etcd, key, json!({"observedGeneration": 2, "replicas": 4, "updatedReplicas": 1}));
    assert_eq!(
        weft.ok(&["rollout", "status", "deployment/nginx-deployment", "--watch=false"]),
        "Waiting for deployment \"nginx-deployment\" rollout to finish: 1 out of 3 new replicas have been updated...\n"
    );
    let err = weft.fails(&["rollout", "status", "deployment/nginx-deployment", "--timeout=1s"]);
    assert!(err.contains("timed out waiting for the condition"), "{err}");
    assert!(weft.fails(&["rollout", "status", "deployment/nope"]).contains("deployments.apps \"nope\" not found"));
}

#[test]
fn get_watch_prints_the_table_then_a_line_per_change() {
    let etcd = EtcdFixture::start().unwrap();
    let weft = Weft { etcd: &etcd };
    let pod = |name: &str, app: &str| {
        format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, labels: {{app: {app}}}}}\nspec: {{containers: [{{name: c, image: nginx}}]}}\n")
    };
    weft.apply(&pod("web-1", "web"));

    let watch = weft.spawn(&["get", "pods", "-w", "-l", "app=web"]);
    let header = watch.line();
    assert!(header.starts_with("NAME    READY   STATUS    RESTARTS   AGE"), "{header}");
    assert!(watch.line().starts_with("web-1   0/1     Pending   0          "));
    weft.apply(&pod("web-2", "web"));
    assert!(watch.line().starts_with("web-2   0/1     Pending   0          "));
    weft.apply(&pod("db-1", "db")); // not selected: no line
                                    // The pod's status changes (a kubelet's write): a line with the new STATUS, columns kept aligned.
    let mut p = stored(&etcd, "/registry/pods/default/web-1").unwrap();
    p["status"] = json!({"phase": "Running", "containerStatuses": [{"name": "c", "image": "nginx", "imageID": "", "ready": false, "restartCount": 0, "state": {"waiting": {"reason": "ContainerCreating"}}}]});
    put(&etcd, "/registry/pods/default/web-1", p);
    assert!(watch.line().starts_with("web-1   0/1     ContainerCreating   0          "));
    weft.ok(&["delete", "pod", "web-2"]);
    // A deleted pod is printed once more; the STATUS column stays as wide as it has become.
    assert!(watch.line().starts_with("web-2   0/1     Pending             0          "));
    drop(watch);

    // --output-watch-events names each change.
    let watch = weft.spawn(&["get", "pod", "web-1", "-w", "--output-watch-events"]);
    assert!(watch.line().starts_with("EVENT   NAME    READY   STATUS              RESTARTS   AGE"));
    assert!(watch.line().starts_with("ADDED   web-1   0/1     ContainerCreating   0          "));
    weft.ok(&["delete", "pod", "web-1"]);
    assert!(watch.line().starts_with("DELETED   web-1   0/1     ContainerCreating   0          "));
    drop(watch);

    assert!(weft.fails(&["get", "pods,svc", "-w"]).contains("watch is only supported on individual resources"));
    assert!(weft.fails(&["get", "pod", "gone", "-w"]).contains("pods \"gone\" not found"));
}

#[test]
fn delete_cascade_orphan_releases_dependents_and_foreground_leaves_the_owner_to_the_collector() {
    let etcd = EtcdFixture::start().unwrap();
    let weft = Weft { etcd: &etcd };
    weft.apply(NGINX_DEPLOYMENT);
    let d = stored(&etcd, "/registry/deployments/default/nginx-deployment").unwrap();
    put(
        &etcd,
        "/registry/replicasets/default/nginx-deployment-6b474476c4",
        replicaset(&d, "6b474476c4", 1, "nginx:1.7.9", 2, None),
    );
    for name in ["a", "b"] {
        let pod = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("nginx-deployment-6b474476c4-{name}"), "namespace": "default", "uid": format!("pod-{name}"),
                         "labels": {"app": "nginx", "pod-template-hash": "6b474476c4"},
                         "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "nginx-deployment-6b474476c4",
                                              "uid": "rs-6b474476c4", "controller": true},
                                             {"apiVersion": "v1", "kind": "Node", "name": "n", "uid": "other-owner"}]},
            "spec": {"containers": [{"name": "nginx", "image": "nginx:1.7.9"}]}
        });
        put(&etcd, &format!("/registry/pods/default/nginx-deployment-6b474476c4-{name}"), pod);
    }
    let text = weft.ok(&["describe", "rs", "nginx-deployment-6b474476c4"]);
    assert!(text.contains("Controlled By:  Deployment/nginx-deployment\n"), "{text}");
    assert!(text.contains("Pods Status:    0 Running / 2 Waiting / 0 Succeeded / 0 Failed\n"), "{text}");

    // orphan: the pods lose this owner (and keep their other one), then the ReplicaSet is gone.
    assert_eq!(
        weft.ok(&["delete", "rs", "nginx-deployment-6b474476c4", "--cascade=orphan"]),
        "replicaset.apps \"nginx-deployment-6b474476c4\" deleted\n"
    );
    assert_eq!(stored(&etcd, "/registry/replicasets/default/nginx-deployment-6b474476c4"), None);
    for name in ["a", "b"] {
        let p = stored(&etcd, &format!("/registry/pods/default/nginx-deployment-6b474476c4-{name}")).unwrap();
        assert_eq!(
            p["metadata"]["ownerReferences"],
            json!([{"apiVersion": "v1", "kind": "Node", "name": "n", "uid": "other-owner"}])
        );
    }

    // foreground: deletionTimestamp and the foregroundDeletion finalizer; the garbage collector finishes it.
    assert_eq!(
        weft.ok(&["delete", "deployment/nginx-deployment", "--cascade=foreground", "--wait=false"]),
        "deployment.apps \"nginx-deployment\" deleted\n"
    );
    let d = stored(&etcd, "/registry/deployments/default/nginx-deployment").unwrap();
    assert!(d["metadata"]["deletionTimestamp"].is_string(), "{d}");
    assert_eq!(d["metadata"]["finalizers"], json!(["foregroundDeletion"]));
    // With --wait (the default) delete waits for the collector, up to --timeout.
    let err = weft.fails(&["delete", "deployment/nginx-deployment", "--cascade=foreground", "--timeout=1s"]);
    assert!(err.contains("timed out waiting for the condition on deployments.apps/nginx-deployment"), "{err}");
    // The collector removes the finalizer and the object; delete --wait sees it go.
    let waiting = weft.spawn(&["delete", "deployment/nginx-deployment", "--cascade=foreground"]);
    assert_eq!(waiting.line(), "deployment.apps \"nginx-deployment\" deleted");
    etcdctl(&etcd, &["del", "/registry/deployments/default/nginx-deployment"]);
    let (code, _) = waiting.wait();
    assert!(code.success());

    // background (the default): gone at once; dependents are left for the collector.
    assert_eq!(
        weft.ok(&["delete", "pods", "-l", "app=nginx"]),
        "pod \"nginx-deployment-6b474476c4-a\" deleted\npod \"nginx-deployment-6b474476c4-b\" deleted\n"
    );
    assert_eq!(keys(&etcd, "/registry/"), Vec::<String>::new());
    assert!(weft.fails(&["delete", "rs", "x", "--cascade=sideways"]).contains("invalid cascade value"));
}

#[test]
fn the_my_service_variants_show_in_get_and_describe() {
    let etcd = EtcdFixture::start().unwrap();
    let weft = Weft { etcd: &etcd };
    weft.ok(&["apply", "-f", &my_service("without-selector.yaml")]);
    weft.ok(&["apply", "-f", &my_service("headless.yaml")]);
    let ip = stored(&etcd, "/registry/services/default/my-service").unwrap()["spec"]["clusterIP"]
        .as_str()
        .unwrap()
        .to_string();

    let out = weft.ok(&["get", "svc,ep"]);
    let (svc, ep) = out.split_once("\n\n").unwrap();
    assert_eq!(
        cells(svc),
        strs(&[
            &["NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)"],
            &["service/my-headless", "ClusterIP", "None", "<none>", "80/TCP"],
            &["service/my-service", "ClusterIP", &ip, "<none>", "80/TCP"],
        ])
    );
    assert_eq!(cells(ep), strs(&[&["NAME", "ENDPOINTS"], &["endpoints/my-service", "1.2.3.4:9376"]]));

    let text = weft.ok(&["describe", "svc", "my-service"]);
    let want = format!(
        "Name:                     my-service\nNamespace:                default\nLabels:                   <none>\nAnnotations:              <none>\nSelector:                 <none>\nType:                     ClusterIP\nIP Family Policy:         SingleStack\nIP Families:              IPv4\nIP:                       {ip}\nIPs:                      {ip}\nPort:                     <unset>  80/TCP\nTargetPort:               9376/TCP\nEndpoints:                1.2.3.4:9376\nSession Affinity:         None\nInternal Traffic Policy:  Cluster\nEvents:                   <none>\n"
    );
    assert_eq!(text, want);
    let text = weft.ok(&["describe", "ep", "my-service"]);
    assert!(text.contains("Subsets:\n  Addresses:          1.2.3.4\n  NotReadyAddresses:  <none>\n"), "{text}");
    // Two objects: separated by a blank line, without events.
    let text = weft.ok(&["describe", "svc"]);
    assert_eq!(text.matches("Name:").count(), 2);
    assert!(text.contains("\n\n\nName:") && !text.contains("Events:"), "{text}");

    // externalIPs, then the LoadBalancer example in a cluster whose service network holds its clusterIP.
    weft.ok(&["delete", "-f", &my_service("without-selector.yaml")]);
    weft.ok(&["apply", "-f", &my_service("external-ips.yaml")]);
    assert!(weft.ok(&["describe", "service", "my-service"]).contains("\nExternal IPs:             80.11.12.10\n"));
    weft.ok(&["delete", "svc", "my-service"]);
    weft.ok(&["apply", "--service-cluster-ip-range", "10.0.0.0/16", "-f", &my_service("load-balancer.yaml")]);
    let row = cells(&weft.ok(&["get", "svc", "my-service", "-o", "wide"]));
    assert_eq!(row[1][..4], ["my-service", "LoadBalancer", "10.0.171.239", "<pending>"]);
    assert_eq!(row[1].last().unwrap(), "app=MyApp");
}

#[test]
fn a_bad_manifest_changes_nothing_and_names_the_document_and_field() {
    let etcd = EtcdFixture::start().unwrap();
    let weft = Weft { etcd: &etcd };
    let cases: &[(&str, &str)] = &[
        (
            // The selector no longer matches the template: the whole file is refused, the namespace too.
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: web}\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web, namespace: web}\nspec:\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: api}}\n    spec: {containers: [{name: web, image: nginx}]}\n",
            "<stdin> (document 1): Deployment \"web\": spec.template.metadata.labels: Invalid value: map[string]string{\"app\":\"api\"}: `selector` does not match template `labels`",
        ),
        (
            &FRONTEND.replace("operator: In", "operator: Near"),
            "<stdin> (document 0): ReplicaSet \"frontend\": spec.selector.matchExpressions[0].operator: Invalid value: \"Near\": not a valid selector operator",
        ),
        (
            &NGINX_DEPLOYMENT.replace("image: nginx:1.7.9", "imag: nginx:1.7.9"),
            "<stdin> (document 0): spec.template.spec.containers[0].imag: unknown field",
        ),
        (
            "apiVersion: v1\nkind: ReplicationController\nmetadata: {name: rc}\nspec:\n  replicas: -2\n  template:\n    metadata: {labels: {app: x}}\n    spec: {containers: [{name: c, image: nginx}]}\n",
            "<stdin> (document 0): ReplicationController \"rc\": spec.replicas: Invalid value: -2: must be greater than or equal to 0",
        ),
    ];
    for (yaml, want) in cases {
        let out = weft.run(&["apply", "-f", "-"], Some(yaml));
        assert!(!out.status.success(), "{yaml}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{yaml}\ngot:  {err}\nwant: {want}");
        assert_eq!(keys(&etcd, "/registry/"), Vec::<String>::new(), "nothing written for\n{yaml}");
    }

    // A ReplicationController without a selector takes its template's labels, and shows as kubectl shows it.
    let rc = "apiVersion: v1\nkind: ReplicationController\nmetadata: {name: nginx}\nspec:\n  replicas: 3\n  template:\n    metadata: {labels: {app: nginx}}\n    spec: {containers: [{name: nginx, image: nginx, ports: [{containerPort: 80}]}]}\n";
    assert_eq!(weft.apply(rc), "replicationcontroller/nginx created\n");
    assert_eq!(
        stored(&etcd, "/registry/replicationcontrollers/default/nginx").unwrap()["spec"]["selector"],
        json!({"app": "nginx"})
    );
    assert_eq!(
        cells(&weft.ok(&["get", "rc", "-o", "wide"])),
        strs(&[
            &["NAME", "DESIRED", "CURRENT", "READY", "CONTAINERS", "IMAGES", "SELECTOR"],
            &["nginx", "3", "0", "0", "nginx", "nginx", "app=nginx"],
        ])
    );
    assert_eq!(weft.ok(&["scale", "rc", "nginx", "--replicas", "1"]), "replicationcontroller/nginx scaled\n");
    assert_eq!(stored(&etcd, "/registry/replicationcontrollers/default/nginx").unwrap()["spec"]["replicas"], 1);
    assert_eq!(weft.ok(&["delete", "rc", "nginx"]), "replicationcontroller \"nginx\" deleted\n");
}
