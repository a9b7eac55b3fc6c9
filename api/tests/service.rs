//! Service writes against a real etcd: ClusterIP and NodePort allocation is atomic with the object, distinct under
//! concurrency, refused when taken or out of range, and released on delete. etcdctl checks the allocation keys.

use std::collections::HashSet;
use std::process::Command;

use weft_api::service::{self, ServiceRanges};
use weft_api::{EtcdArgs, Service, Store};
use weft_lab::EtcdFixture;

async fn store(etcd: &EtcdFixture) -> Store {
    Store::new(weft_api::connect(&EtcdArgs::new(vec![etcd.endpoint().to_string()])).await.unwrap())
}

fn svc(yaml: &str) -> Service {
    serde_norway::from_str(yaml).unwrap()
}

fn my_service(extra: &str) -> Service {
    svc(&format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: my-service}}\nspec:\n  selector: {{app: MyApp}}\n  ports: [{{protocol: TCP, port: 80, targetPort: 9376}}]\n{extra}"
    ))
}

fn etcd_keys(etcd: &EtcdFixture, prefix: &str) -> Vec<String> {
    let out = Command::new("etcdctl")
        .args(["--endpoints", etcd.endpoint(), "get", "--prefix", "--keys-only", prefix])
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().lines().filter(|l| !l.is_empty()).map(str::to_string).collect()
}

fn cluster_ip(s: &Service) -> String {
    s.spec.as_ref().unwrap().cluster_ip.clone().unwrap()
}

#[tokio::test]
async fn create_allocates_a_cluster_ip_in_the_range_and_delete_releases_it() {
    let etcd = EtcdFixture::start().unwrap();
    let s = store(&etcd).await;
    let ranges = ServiceRanges::default();
    let created = service::create(&s, &ranges, &my_service("")).await.unwrap();
    let ip: std::net::Ipv4Addr = cluster_ip(&created).parse().unwrap();
    assert!(ranges.cidr.contains(ip) && ip != ranges.cidr.network() && ip != ranges.cidr.broadcast());
    assert_eq!(created.spec.as_ref().unwrap().cluster_ips, Some(vec![ip.to_string()]));
    assert_eq!(etcd_keys(&etcd, "/registry/ranges/"), [format!("/registry/ranges/serviceips/{ip}")]);
    let owner = Command::new("etcdctl")
        .args([
            "--endpoints",
            etcd.endpoint(),
            "get",
            "--print-value-only",
            &format!("/registry/ranges/serviceips/{ip}"),
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&owner.stdout).trim(), "default/my-service");

    // Apply-style update without a clusterIP keeps it; changing it is refused.
    let mut again = my_service("");
    again.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].target_port =
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(8080));
    let updated = service::update(&s, &ranges, &again).await.unwrap();
    assert_eq!(cluster_ip(&updated), ip.to_string());
    let moved = my_service("  clusterIP: 10.96.0.77\n");
    let err = service::update(&s, &ranges, &moved).await.unwrap_err();
    assert!(err.to_string().contains("spec.clusterIP: Invalid value: \"10.96.0.77\": field is immutable"), "{err}");

    service::delete(&s, None, "my-service", None).await.unwrap();
    assert!(etcd_keys(&etcd, "/registry/").is_empty(), "the IP goes with the service");

    // The released IP can be requested again by another service.
    let mut other = my_service(&format!("  clusterIP: {ip}\n"));
    other.metadata.name = Some("other".into());
    let other = service::create(&s, &ranges, &other).await.unwrap();
    assert_eq!(cluster_ip(&other), ip.to_string());
}

#[tokio::test]
async fn requested_ip_or_node_port_in_use_or_out_of_range_is_a_clear_error_and_writes_nothing() {
    let etcd = EtcdFixture::start().unwrap();
    let s = store(&etcd).await;
    let ranges = ServiceRanges::default();
    let first = service::create(&s, &ranges, &my_service("  clusterIP: 10.96.0.50\n")).await.unwrap();
    assert_eq!(cluster_ip(&first), "10.96.0.50");

    let mut clash = my_service("  clusterIP: 10.96.0.50\n");
    clash.metadata.name = Some("clash".into());
    let err = service::create(&s, &ranges, &clash).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "Service \"default/clash\" is invalid: spec.clusterIP: Invalid value: \"10.96.0.50\": provided IP is already allocated"
    );
    assert!(etcd_keys(&etcd, "/registry/services/default/clash").is_empty());

    let outside = my_service("  clusterIP: 10.0.171.239\n");
    let err = service::create(&s, &ranges, &outside).await.unwrap_err();
    assert!(
        err.to_string().contains("provided IP is not in the valid range. The range of valid IPs is 10.96.0.0/12"),
        "{err}"
    );
    // The same manifest is fine for a cluster whose service network is 10.0.0.0/16.
    let wide = ServiceRanges::parse("10.0.0.0/16", "30000-32767").unwrap();
    let mut ok = outside.clone();
    ok.metadata.name = Some("in-wide".into());
    assert_eq!(cluster_ip(&service::create(&s, &wide, &ok).await.unwrap()), "10.0.171.239");

    let np = |name: &str, port: i32| {
        svc(&format!(
            "metadata: {{name: {name}}}\nspec:\n  type: NodePort\n  ports: [{{port: 80, nodePort: {port}}}]\n"
        ))
    };
    service::create(&s, &ranges, &np("np1", 30080)).await.unwrap();
    let err = service::create(&s, &ranges, &np("np2", 30080)).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "Service \"default/np2\" is invalid: spec.ports[0].nodePort: Invalid value: 30080: provided port is already allocated"
    );
    let err = service::create(&s, &ranges, &np("np3", 8080)).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("spec.ports[0].nodePort: Invalid value: 8080: provided port is not in the valid range"),
        "{err}"
    );
    // Neither refused create left an IP behind.
    let ips = etcd_keys(&etcd, "/registry/ranges/serviceips/");
    assert_eq!(ips.len(), 3, "{ips:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_get_distinct_ips() {
    let etcd = EtcdFixture::start().unwrap();
    let s = store(&etcd).await;
    // A /26 (62 usable) for 50 services makes random picks collide, so the retry path is exercised.
    let ranges = ServiceRanges::parse("10.96.0.0/26", "30000-30099").unwrap();
    let mut tasks = Vec::new();
    for i in 0..50 {
        let (s, ranges) = (s.clone(), ranges.clone());
        tasks.push(tokio::spawn(async move {
            let x = svc(&format!("metadata: {{name: s{i}}}\nspec:\n  type: NodePort\n  ports: [{{port: 80}}]\n"));
            service::create(&s, &ranges, &x).await
        }));
    }
    let mut ips = HashSet::new();
    let mut ports = HashSet::new();
    for t in tasks {
        let created = t.await.unwrap().unwrap();
        assert!(ips.insert(cluster_ip(&created)), "duplicate IP");
        let np = created.spec.as_ref().unwrap().ports.as_ref().unwrap()[0].node_port.unwrap();
        assert!((30000..=30099).contains(&np));
        assert!(ports.insert(np), "duplicate node port {np}");
    }
    assert_eq!(etcd_keys(&etcd, "/registry/ranges/serviceips/").len(), 50);
    assert_eq!(etcd_keys(&etcd, "/registry/ranges/servicenodeports/").len(), 50);
}

#[tokio::test]
async fn node_ports_follow_type_changes_and_are_reusable_after_delete() {
    let etcd = EtcdFixture::start().unwrap();
    let s = store(&etcd).await;
    let ranges = ServiceRanges::default();
    let lb = service::create(&s, &ranges, &my_service("  type: LoadBalancer\n")).await.unwrap();
    let np = lb.spec.as_ref().unwrap().ports.as_ref().unwrap()[0].node_port.expect("LoadBalancer gets a node port");
    let key = format!("/registry/ranges/servicenodeports/{np}");
    assert_eq!(etcd_keys(&etcd, "/registry/ranges/servicenodeports/"), [key]);

    // Back to ClusterIP: the node port is released in the same write.
    let plain = service::update(&s, &ranges, &my_service("")).await.unwrap();
    assert_eq!(plain.spec.as_ref().unwrap().ports.as_ref().unwrap()[0].node_port, None);
    assert!(etcd_keys(&etcd, "/registry/ranges/servicenodeports/").is_empty());

    // NodePort again asking for a specific port; then delete frees it for another service.
    let fixed = service::update(&s, &ranges, &my_service("  type: NodePort\n  ports: [{port: 80, nodePort: 30080}]\n"))
        .await
        .unwrap();
    assert_eq!(fixed.spec.as_ref().unwrap().ports.as_ref().unwrap()[0].node_port, Some(30080));
    assert_eq!(etcd_keys(&etcd, "/registry/ranges/servicenodeports/"), ["/registry/ranges/servicenodeports/30080"]);
    service::delete(&s, None, "my-service", None).await.unwrap();
    assert!(etcd_keys(&etcd, "/registry/ranges/").is_empty());
    let mut reuse = my_service("  type: NodePort\n  ports: [{port: 80, nodePort: 30080}]\n");
    reuse.metadata.name = Some("reuse".into());
    service::create(&s, &ranges, &reuse).await.unwrap();
}

#[tokio::test]
async fn headless_and_external_name_services_get_no_ip() {
    let etcd = EtcdFixture::start().unwrap();
    let s = store(&etcd).await;
    let ranges = ServiceRanges::default();
    let headless = service::create(&s, &ranges, &my_service("  clusterIP: None\n")).await.unwrap();
    assert_eq!(cluster_ip(&headless), "None");
    let ext = svc("metadata: {name: db}\nspec:\n  type: ExternalName\n  externalName: my.database.example.com\n");
    let ext = service::create(&s, &ranges, &ext).await.unwrap();
    assert_eq!(ext.spec.as_ref().unwrap().cluster_ip, None);
    assert!(etcd_keys(&etcd, "/registry/ranges/").is_empty());
}

#[tokio::test]
async fn releasing_never_frees_an_allocation_another_service_holds() {
    let etcd = EtcdFixture::start().unwrap();
    let s = store(&etcd).await;
    let ranges = ServiceRanges::default();
    let owned = service::create(&s, &ranges, &my_service("  clusterIP: 10.96.0.9\n")).await.unwrap();
    // A Service written around the allocator (plain store) that claims the same IP must not release it on delete.
    let mut rogue = owned.clone();
    rogue.metadata = Default::default();
    rogue.metadata.name = Some("rogue".into());
    s.create(&rogue).await.unwrap();
    service::delete(&s, None, "rogue", None).await.unwrap();
    assert_eq!(etcd_keys(&etcd, "/registry/ranges/serviceips/"), ["/registry/ranges/serviceips/10.96.0.9"]);
}
