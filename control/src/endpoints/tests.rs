use k8s_openapi::jiff::Timestamp;
use serde_json::{json, Value};

use super::*;
use crate::testutil::*;

fn svc(extra: Value) -> Service {
    let mut v = json!({
        "metadata": {"name": "my-service", "namespace": "default", "uid": "uid-svc", "labels": {"team": "a"}},
        "spec": {"selector": {"app": "MyApp"}, "clusterIP": "10.96.0.20",
                 "ports": [{"protocol": "TCP", "port": 80, "targetPort": 9376}]}
    });
    merge(&mut v, extra);
    from(v)
}

fn app(name: &str, ip: &str) -> PodB {
    pod(name).labels(&[("app", "MyApp")]).node("n1").ip(ip)
}

fn run(objs: Vec<Obj>) -> Outcome {
    reconcile(&ObjectKey::new(Some("default"), "my-service"), &Cache::of(objs), Timestamp::UNIX_EPOCH)
}

fn written(o: &Outcome) -> Value {
    match &o.actions[..] {
        [Action::Create(Obj::Endpoints(e))] | [Action::Update { obj: Obj::Endpoints(e), .. }] => {
            serde_json::to_value(e).unwrap()
        }
        other => panic!("expected one Endpoints write, got {other:?}"),
    }
}

fn ips(subset: &Value, field: &str) -> Vec<String> {
    subset[field]
        .as_array()
        .map(|a| a.iter().map(|x| x["ip"].as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

#[test]
fn ready_pods_are_addresses_and_the_rest_not_ready_addresses() {
    let out = run(vec![
        Obj::Service(svc(json!({}))),
        app("a", "10.244.1.10").ready(10).into(),
        app("b", "10.244.1.9").ready(10).into(),
        app("c", "10.244.2.5").running().not_ready().into(),
        app("nolabel", "10.244.2.6").ready(10).with(json!({"metadata": {"labels": {"app": "Other"}}})).into(),
        app("noip", "").ready(10).with(json!({"status": {"podIP": null}})).into(),
        app("leaving", "10.244.2.7").ready(10).deleting().into(),
    ]);
    let e = written(&out);
    assert_eq!(e["metadata"]["name"], "my-service");
    assert_eq!(e["metadata"]["labels"], json!({"team": "a"}));
    let s = &e["subsets"][0];
    assert_eq!(ips(s, "addresses"), ["10.244.1.9", "10.244.1.10"], "sorted numerically");
    assert_eq!(ips(s, "notReadyAddresses"), ["10.244.2.5"]);
    assert_eq!(s["ports"], json!([{"port": 9376, "protocol": "TCP"}]));
    assert_eq!(s["addresses"][0]["nodeName"], "n1");
    assert_eq!(
        s["addresses"][0]["targetRef"],
        json!({"kind": "Pod", "namespace": "default", "name": "b", "uid": "uid-b"})
    );
}

#[test]
fn publish_not_ready_addresses_puts_everyone_in_addresses() {
    let out = run(vec![
        Obj::Service(svc(json!({"spec": {"publishNotReadyAddresses": true}}))),
        app("a", "10.0.0.1").running().not_ready().into(),
        app("b", "10.0.0.2").ready(1).deleting().into(),
    ]);
    let s = &written(&out)["subsets"][0];
    assert_eq!(ips(s, "addresses"), ["10.0.0.1", "10.0.0.2"]);
    assert!(s["notReadyAddresses"].is_null());
}

#[test]
fn finished_pods_leave_by_restart_policy() {
    // (restartPolicy, phase, included)
    let cases = [
        ("Always", "Failed", true),
        ("Never", "Failed", false),
        ("Never", "Succeeded", false),
        ("OnFailure", "Succeeded", false),
        ("OnFailure", "Failed", true),
    ];
    for (policy, phase, included) in cases {
        let p = app("a", "10.0.0.1").phase(phase).with(json!({"spec": {"restartPolicy": policy}}));
        let out = run(vec![Obj::Service(svc(json!({}))), p.into()]);
        assert_eq!(written(&out)["subsets"].is_array(), included, "{policy} {phase}");
    }
}

#[test]
fn named_target_ports_resolve_per_pod() {
    let named = json!({"spec": {"ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": "web"},
                                          {"name": "metrics", "protocol": "TCP", "port": 9100, "targetPort": 9100}]}});
    let with_port = |name: &str, ip: &str, port: i32| {
        app(name, ip).ready(5).with(json!({"spec": {"containers": [{"name": "c", "image": "x",
            "ports": [{"name": "web", "containerPort": port, "protocol": "TCP"}]}]}}))
    };
    let out = run(vec![
        Obj::Service(svc(named)),
        with_port("a", "10.0.0.1", 8080).into(),
        with_port("b", "10.0.0.2", 8080).into(),
        with_port("c", "10.0.0.3", 9090).into(),
        app("d", "10.0.0.4").ready(5).into(), // no port named web: only in metrics
    ]);
    let e = written(&out);
    let subsets: Vec<(Vec<String>, Value)> =
        e["subsets"].as_array().unwrap().iter().map(|s| (ips(s, "addresses"), s["ports"].clone())).collect();
    assert_eq!(
        subsets,
        vec![
            (vec!["10.0.0.1".into(), "10.0.0.2".into()], json!([{"name": "http", "port": 8080, "protocol": "TCP"}])),
            (vec!["10.0.0.3".into()], json!([{"name": "http", "port": 9090, "protocol": "TCP"}])),
            (
                vec!["10.0.0.1".into(), "10.0.0.2".into(), "10.0.0.3".into(), "10.0.0.4".into()],
                json!([{"name": "metrics", "port": 9100, "protocol": "TCP"}])
            ),
        ]
    );
}

#[test]
fn headless_services_carry_hostnames_and_may_have_no_ports() {
    let headless = json!({"metadata": {"name": "my-service"}, "spec": {"clusterIP": "None", "ports": null}});
    let out = run(vec![
        Obj::Service(svc(headless)),
        app("a", "10.0.0.1").ready(5).with(json!({"spec": {"hostname": "web-0", "subdomain": "my-service"}})).into(),
        app("b", "10.0.0.2").ready(5).with(json!({"spec": {"hostname": "web-1", "subdomain": "elsewhere"}})).into(),
    ]);
    let e = written(&out);
    assert_eq!(e["metadata"]["labels"], json!({"team": "a", "service.kubernetes.io/headless": ""}));
    let s = &e["subsets"][0];
    assert!(s["ports"].is_null());
    assert_eq!(s["addresses"][0]["hostname"], "web-0");
    assert!(s["addresses"][1]["hostname"].is_null(), "its subdomain is another service");
}

#[test]
fn writes_only_what_changed() {
    let objs = vec![Obj::Service(svc(json!({}))), app("a", "10.0.0.1").ready(5).into()];
    let first = run(objs.clone());
    let mut ep: Endpoints = from(written(&first));
    ep.metadata.uid = Some("uid-ep".into());
    ep.metadata.resource_version = Some("3".into());
    let mut with_ep = objs.clone();
    with_ep.push(Obj::Endpoints(ep.clone()));
    assert!(run(with_ep.clone()).actions.is_empty(), "unchanged: no write");
    with_ep.push(app("b", "10.0.0.2").ready(5).into());
    let changed = run(with_ep);
    assert_eq!(changed.lines(), ["update Endpoints default/my-service (2 ready, 0 not ready)"]);
    assert_eq!(written(&changed)["metadata"]["resourceVersion"], "3");
    // No pods: an Endpoints object without subsets.
    let empty = run(vec![Obj::Service(svc(json!({})))]);
    assert!(written(&empty)["subsets"].is_null());
}

#[test]
fn services_without_selector_keep_hand_written_endpoints_and_a_deleted_service_takes_its_own() {
    // The seeds' my-service without a selector plus a manual Endpoints at 1.2.3.4:9376.
    let manual: Endpoints = from(json!({"metadata": {"name": "my-service", "namespace": "default", "uid": "uid-ep"},
        "subsets": [{"addresses": [{"ip": "1.2.3.4"}], "ports": [{"port": 9376}]}]}));
    let no_selector = svc(json!({"spec": {"selector": null}}));
    assert!(run(vec![Obj::Service(no_selector), Obj::Endpoints(manual.clone())]).actions.is_empty());
    assert_eq!(
        run(vec![Obj::Endpoints(manual)]).lines(),
        ["delete Endpoints default/my-service (its Service is gone)"]
    );
}
