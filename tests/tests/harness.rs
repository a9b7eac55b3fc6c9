//! The harness itself: etcd answers, namespaces are isolated and vanish with their guard.

use weft_lab::{EtcdFixture, Netns};

#[test]
fn etcd_fixture_serves_and_restarts_with_its_data() {
    let mut etcd = EtcdFixture::start().expect("etcd starts");
    let ep = etcd.endpoint().to_string();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut c = etcd_client::Client::connect([ep.as_str()], None).await.unwrap();
        c.put("/k", "v", None).await.unwrap();
    });
    etcd.restart().expect("etcd restarts");
    let v = rt.block_on(async {
        let mut c = etcd_client::Client::connect([ep.as_str()], None).await.unwrap();
        c.get("/k", None).await.unwrap().kvs()[0].value_str().unwrap().to_string()
    });
    assert_eq!(v, "v");
}

#[test]
fn netns_is_isolated_and_removed_on_drop() {
    let name;
    {
        let ns = Netns::create("iso").unwrap();
        name = ns.name().to_string();
        ns.ip(&["addr", "add", "10.9.9.9/32", "dev", "lo"]).unwrap();
        assert!(ns.ip(&["addr", "show", "lo"]).unwrap().contains("10.9.9.9"));
        // A socket opened by code running in the namespace binds the namespace's address.
        let bound = ns.block_on(|| async { std::net::TcpListener::bind("10.9.9.9:0").is_ok() }).unwrap();
        assert!(bound, "bind inside the namespace");
        assert!(std::net::TcpListener::bind("10.9.9.9:0").is_err(), "the host namespace must not have it");
        let mut child = ns.command("sleep").arg("60").spawn().unwrap();
        // `ip netns exec` enters the namespace a moment after spawn returns.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while ns.pids().is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert!(!ns.pids().is_empty(), "the sleep runs inside the namespace");
        drop(ns);
        let _ = child.wait();
    }
    let list = std::process::Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&list.stdout).contains(&name), "{name} still listed");
}
