//! SubnetManager against a real etcd: the keys and JSON it writes are flannel's, concurrent nodes never
//! share a subnet, restarts and reservations behave as flanneld's do, renew and watch survive real etcd semantics.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::Client;
use ipnetwork::Ipv4Network;
use weft_agent::config::{NetworkConfig, RawConfig};
use weft_agent::lease::{LeaseAttrs, Mac};
use weft_agent::subnet::{Error, SubnetManager, WatchEvent};
use weft_lab::EtcdFixture;

const PREFIX: &str = "/coreos.com/network";
const DAY: Duration = Duration::from_secs(24 * 3600);

fn node(n: u8) -> LeaseAttrs {
    LeaseAttrs::vxlan(Ipv4Addr::new(192, 168, 56, n), 1, Mac([0x82, 0x1e, 0, 0, 0, n]))
}

fn net(s: &str) -> Ipv4Network {
    s.parse().unwrap()
}

/// etcd with a network config stored, and a manager on it.
async fn setup(config: &str) -> (EtcdFixture, Client, SubnetManager, NetworkConfig) {
    let etcd = EtcdFixture::start().unwrap();
    let client = etcd.client().await.unwrap();
    let mut m = SubnetManager::new(client.clone(), PREFIX);
    let raw: RawConfig = serde_json::from_str(config).unwrap();
    m.put_config(&raw).await.unwrap();
    let cfg = m.get_config().await.unwrap();
    (etcd, client, m, cfg)
}

async fn raw_get(client: &mut Client, key: &str) -> Option<(String, i64)> {
    let resp = client.get(key, None).await.unwrap();
    resp.kvs().first().map(|kv| (kv.value_str().unwrap().to_string(), kv.lease()))
}

#[tokio::test]
async fn config_missing_invalid_and_stored() {
    let etcd = EtcdFixture::start().unwrap();
    let mut client = etcd.client().await.unwrap();
    let mut m = SubnetManager::new(client.clone(), PREFIX);
    match m.get_config().await {
        Err(Error::ConfigMissing { key }) => assert_eq!(key, "/coreos.com/network/config"),
        other => panic!("expected ConfigMissing, got {other:?}"),
    }
    client.put("/coreos.com/network/config", r#"{"Network":"10.244.0.0/16","SubnetLen":8}"#, None).await.unwrap();
    assert!(matches!(m.get_config().await, Err(Error::Config(_))));
    // What flannel's docs tell operators to write is read as is.
    client
        .put("/coreos.com/network/config", r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#, None)
        .await
        .unwrap();
    let cfg = m.get_config().await.unwrap();
    assert_eq!(cfg.network, net("10.244.0.0/16"));
    assert_eq!(cfg.subnet_len, 24);
}

#[tokio::test]
async fn acquire_writes_flannel_json_on_a_24h_lease() {
    let (_etcd, mut client, mut m, cfg) = setup(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#).await;
    let lease = m.acquire(&cfg, &node(11), None, DAY).await.unwrap();
    assert!(cfg.network.contains(lease.subnet.network()));
    assert_eq!(lease.subnet.prefix(), 24);
    assert_ne!(lease.subnet, net("10.244.0.0/24"), "the network's first subnet is never leased");
    let key = format!("/coreos.com/network/subnets/10.244.{}.0-24", lease.subnet.network().octets()[2]);
    let (value, etcd_lease) = raw_get(&mut client, &key).await.expect("lease key written");
    assert_eq!(
        value,
        format!(
            r#"{{"PublicIP":"192.168.56.11","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"82:1e:00:00:00:0b"}}}}"#
        )
    );
    assert_eq!(etcd_lease, lease.etcd_lease);
    let ttl = client.lease_time_to_live(etcd_lease, None).await.unwrap();
    assert!(ttl.granted_ttl() == 86_400 && ttl.ttl() > 86_300, "granted {} left {}", ttl.granted_ttl(), ttl.ttl());
    let left = m.time_to_live(lease.etcd_lease).await.unwrap().unwrap();
    assert!(left > Duration::from_secs(86_300) && left <= DAY, "{left:?}");
    assert_eq!(m.time_to_live(0).await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_nodes_never_share_a_subnet() {
    let (etcd, _client, _m, cfg) = setup(r#"{"Network":"10.244.0.0/16"}"#).await;
    const NODES: usize = 20;
    let barrier = Arc::new(tokio::sync::Barrier::new(NODES));
    let mut tasks = Vec::new();
    for i in 0..NODES {
        let client = etcd.client().await.unwrap();
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            let mut m = SubnetManager::new(client, PREFIX);
            barrier.wait().await;
            m.acquire(&cfg, &node(20 + i as u8), None, DAY).await
        }));
    }
    let mut subnets = HashSet::new();
    for t in tasks {
        let lease = t.await.unwrap().unwrap();
        assert!(subnets.insert(lease.subnet), "{} handed out twice", lease.subnet);
    }
    let (table, _) = SubnetManager::new(etcd.client().await.unwrap(), PREFIX).list().await.unwrap();
    let stored: HashSet<Ipv4Network> = table.valid(&cfg).iter().map(|l| l.subnet).collect();
    assert_eq!(stored, subnets);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_nodes_racing_for_the_last_subnets_never_share() {
    // Only 5 subnets for 8 nodes: every create races, 5 win distinct subnets and 3 are told it is full.
    let (etcd, _client, _m, cfg) =
        setup(r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.1.0","SubnetMax":"10.244.5.0"}"#).await;
    let barrier = Arc::new(tokio::sync::Barrier::new(8));
    let mut tasks = Vec::new();
    for i in 0..8u8 {
        let client = etcd.client().await.unwrap();
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            let mut m = SubnetManager::new(client, PREFIX);
            barrier.wait().await;
            m.acquire(&cfg, &node(40 + i), None, DAY).await
        }));
    }
    let (mut won, mut full) = (HashSet::new(), 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok(l) => assert!(won.insert(l.subnet), "{} handed out twice", l.subnet),
            Err(Error::NoFreeSubnet { .. }) => full += 1,
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    assert_eq!((won.len(), full), (5, 3));
}

#[tokio::test]
async fn restarted_agent_keeps_its_subnet() {
    let (etcd, mut client, mut m, cfg) = setup(r#"{"Network":"10.244.0.0/16"}"#).await;
    let first = m.acquire(&cfg, &node(11), None, DAY).await.unwrap();
    m.acquire(&cfg, &node(12), None, DAY).await.unwrap();
    drop(m);
    // A new process: new client, no subnet file, same PublicIP (and a new VtepMAC).
    let mut again = SubnetManager::new(etcd.client().await.unwrap(), PREFIX);
    let mut attrs = node(11);
    attrs.backend_data = LeaseAttrs::vxlan(attrs.public_ip, 1, Mac([2, 2, 2, 2, 2, 2])).backend_data;
    let second = again.acquire(&cfg, &attrs, None, DAY).await.unwrap();
    assert_eq!(second.subnet, first.subnet);
    assert_eq!(second.create_revision, first.create_revision);
    let (value, lease) = raw_get(&mut client, &again.key(second.subnet)).await.unwrap();
    assert!(value.contains("02:02:02:02:02:02"), "{value}");
    assert_eq!(lease, second.etcd_lease);
    assert_eq!(again.time_to_live(first.etcd_lease).await.unwrap(), None, "old etcd lease revoked");
}

#[tokio::test]
async fn previous_subnet_is_reclaimed_only_when_free() {
    let (_etcd, _client, mut m, cfg) = setup(r#"{"Network":"10.244.0.0/16"}"#).await;
    let prev = net("10.244.77.0/24");
    let a = m.acquire(&cfg, &node(11), Some(prev), DAY).await.unwrap();
    assert_eq!(a.subnet, prev);
    // Another node whose subnet file names the same subnet must not get it while node 11 holds it.
    let b = m.acquire(&cfg, &node(12), Some(prev), DAY).await.unwrap();
    assert_ne!(b.subnet, prev);
    // A previous subnet outside the network (the config changed) is ignored.
    let c = m.acquire(&cfg, &node(13), Some(net("10.99.77.0/24")), DAY).await.unwrap();
    assert!(cfg.network.contains(c.subnet.network()));
}

#[tokio::test]
async fn our_lease_outside_a_changed_network_is_replaced_and_deleted() {
    let (_etcd, mut client, mut m, old_cfg) = setup(r#"{"Network":"10.99.0.0/16"}"#).await;
    let old = m.acquire(&old_cfg, &node(11), None, DAY).await.unwrap();
    let other = m.acquire(&old_cfg, &node(12), None, DAY).await.unwrap();
    m.put_config(&serde_json::from_str(r#"{"Network":"10.244.0.0/16"}"#).unwrap()).await.unwrap();
    let cfg = m.get_config().await.unwrap();
    let new = m.acquire(&cfg, &node(11), Some(old.subnet), DAY).await.unwrap();
    assert!(cfg.network.contains(new.subnet.network()), "{}", new.subnet);
    assert!(raw_get(&mut client, &m.key(old.subnet)).await.is_none(), "stale lease deleted");
    assert_eq!(m.time_to_live(old.etcd_lease).await.unwrap(), None);
    // Another node's stale lease is left for that node to clean up.
    assert!(raw_get(&mut client, &m.key(other.subnet)).await.is_some());
}

#[tokio::test]
async fn reservation_is_never_taken_and_its_owner_keeps_it_without_ttl() {
    let (_etcd, mut client, mut m, cfg) =
        setup(r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.5.0","SubnetMax":"10.244.6.0"}"#).await;
    let key = m.key(net("10.244.5.0/24"));
    client.put(key.as_str(), node(11).to_json(), None).await.unwrap();
    // Node 12 gets the one other subnet, even when its subnet file names the reserved one.
    let b = m.acquire(&cfg, &node(12), Some(net("10.244.5.0/24")), DAY).await.unwrap();
    assert_eq!(b.subnet, net("10.244.6.0/24"));
    assert!(matches!(m.acquire(&cfg, &node(13), None, DAY).await, Err(Error::NoFreeSubnet { .. })));
    // Node 11 takes its reservation, which stays without an etcd lease.
    let mut attrs = node(11);
    attrs.backend_data = LeaseAttrs::vxlan(attrs.public_ip, 1, Mac([3, 3, 3, 3, 3, 3])).backend_data;
    let a = m.acquire(&cfg, &attrs, None, DAY).await.unwrap();
    assert_eq!(a.subnet, net("10.244.5.0/24"));
    assert!(a.is_reservation());
    let (value, lease) = raw_get(&mut client, &key).await.unwrap();
    assert_eq!(lease, 0);
    assert!(value.contains("03:03:03:03:03:03"), "value updated: {value}");
    // Renewing a reservation changes nothing.
    let r = m.renew(&a, &attrs, DAY).await.unwrap();
    assert_eq!(r, a);
    assert_eq!(raw_get(&mut client, &key).await.unwrap().1, 0);
}

#[tokio::test]
async fn malformed_entries_are_skipped_and_valid_ones_kept() {
    let (_etcd, mut client, mut m, cfg) =
        setup(r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.3.0","SubnetMax":"10.244.4.0"}"#).await;
    let s = "/coreos.com/network/subnets/";
    client.put(format!("{s}10.244.3.0-24"), "{garbage", None).await.unwrap();
    client.put(format!("{s}10.245.1.0-24"), node(13).to_json(), None).await.unwrap();
    client.put(format!("{s}hello"), node(14).to_json(), None).await.unwrap();
    client.put(format!("{s}10.244.9.0-24"), node(15).to_json(), None).await.unwrap();
    let (table, rev) = m.list().await.unwrap();
    assert!(rev > 0);
    let valid: Vec<Ipv4Network> = table.valid(&cfg).iter().map(|l| l.subnet).collect();
    assert_eq!(valid, vec![net("10.244.9.0/24")]);
    let mut skipped: Vec<String> = table.skipped(&cfg).into_iter().map(|(k, _)| k).collect();
    skipped.sort();
    assert_eq!(
        skipped,
        vec![format!("{s}10.244.3.0-24"), format!("{s}10.245.1.0-24"), format!("{s}hello")],
        "{:?}",
        table.skipped(&cfg)
    );
    // The garbage key still blocks its subnet: the only free one left is 10.244.4.0.
    let l = m.acquire(&cfg, &node(11), None, DAY).await.unwrap();
    assert_eq!(l.subnet, net("10.244.4.0/24"));
    assert_eq!(raw_get(&mut client, &format!("{s}10.244.3.0-24")).await.unwrap().0, "{garbage");
}

#[tokio::test]
async fn renew_moves_the_key_to_a_new_lease_and_revokes_theold_cfg() {
    let (_etcd, mut client, mut m, cfg) = setup(r#"{"Network":"10.244.0.0/16"}"#).await;
    let l1 = m.acquire(&cfg, &node(11), None, Duration::from_secs(60)).await.unwrap();
    let l2 = m.renew(&l1, &node(11), DAY).await.unwrap();
    assert_eq!(l2.subnet, l1.subnet);
    assert_ne!(l2.etcd_lease, l1.etcd_lease);
    assert!(l2.mod_revision > l1.mod_revision);
    let (_, bound) = raw_get(&mut client, &m.key(l1.subnet)).await.unwrap();
    assert_eq!(bound, l2.etcd_lease);
    assert_eq!(m.time_to_live(l1.etcd_lease).await.unwrap(), None, "old lease revoked");
    assert!(m.time_to_live(l2.etcd_lease).await.unwrap().unwrap() > Duration::from_secs(86_300));
    // Renewing with the stale lease (old mod revision) still works: the key is ours.
    let l3 = m.renew(&l1, &node(11), DAY).await.unwrap();
    assert_eq!(raw_get(&mut client, &m.key(l1.subnet)).await.unwrap().1, l3.etcd_lease);
}

#[tokio::test]
async fn renew_after_the_key_is_gone_or_taken_is_lease_lost() {
    let (_etcd, mut client, mut m, cfg) = setup(r#"{"Network":"10.244.0.0/16"}"#).await;
    let l = m.acquire(&cfg, &node(11), None, DAY).await.unwrap();
    client.delete(m.key(l.subnet), None).await.unwrap();
    match m.renew(&l, &node(11), DAY).await {
        Err(Error::LeaseLost { subnet }) => assert_eq!(subnet, l.subnet),
        other => panic!("expected LeaseLost, got {other:?}"),
    }
    assert!(raw_get(&mut client, &m.key(l.subnet)).await.is_none(), "renew must not recreate the key");

    let l = m.acquire(&cfg, &node(11), None, DAY).await.unwrap();
    client.put(m.key(l.subnet), node(99).to_json(), None).await.unwrap();
    let err = m.renew(&l, &node(11), DAY).await.unwrap_err();
    assert!(err.is_lease_lost(), "{err}");
    assert!(raw_get(&mut client, &m.key(l.subnet)).await.unwrap().0.contains("192.168.56.99"));
    assert!(m.update_attrs(&l, &node(11)).await.unwrap_err().is_lease_lost());
}

#[tokio::test]
async fn watch_sees_puts_and_deletes() {
    let (_etcd, mut client, mut m, cfg) = setup(r#"{"Network":"10.244.0.0/16"}"#).await;
    let (mut table, rev) = m.list().await.unwrap();
    let mut w = m.watch(rev + 1).await.unwrap();
    let l = m.acquire(&cfg, &node(11), None, DAY).await.unwrap();
    let key = m.key(l.subnet);
    let ev = tokio::time::timeout(Duration::from_secs(10), w.next()).await.unwrap().unwrap();
    match &ev[..] {
        [WatchEvent::Put { key: k, value, lease, mod_revision, .. }] => {
            assert_eq!(k, &key);
            assert_eq!(value, node(11).to_json().as_bytes());
            assert_eq!((*lease, *mod_revision), (l.etcd_lease, l.mod_revision));
        }
        other => panic!("expected one put, got {other:?}"),
    }
    for e in &ev {
        table.apply(e);
    }
    assert_eq!(table.valid(&cfg), vec![l.clone()]);
    client.delete(key.as_str(), None).await.unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(10), w.next()).await.unwrap().unwrap();
    assert!(matches!(&ev[..], [WatchEvent::Delete { key: k, .. }] if k == &key), "{ev:?}");
    table.apply(&ev[0]);
    assert!(table.is_empty());
    assert!(w.revision() > l.mod_revision);
}

#[tokio::test]
async fn watch_from_a_compacted_revision_is_compacted() {
    let (_etcd, mut client, mut m, _cfg) = setup(r#"{"Network":"10.244.0.0/16"}"#).await;
    let s = "/coreos.com/network/subnets/";
    let mut last = 0;
    for i in 1..=5 {
        let r = client.put(format!("{s}10.244.{i}.0-24"), node(i).to_json(), None).await.unwrap();
        last = r.header().unwrap().revision();
    }
    client.compact(last, None).await.unwrap();
    let mut w = m.watch(last - 3).await.unwrap();
    match tokio::time::timeout(Duration::from_secs(10), w.next()).await.unwrap() {
        Err(Error::Compacted { revision }) => assert_eq!(revision, last),
        other => panic!("expected Compacted, got {other:?}"),
    }
    // The caller's recovery: relist and watch from the list's revision.
    let (table, rev) = m.list().await.unwrap();
    assert_eq!(table.len(), 5);
    let mut w = m.watch(rev + 1).await.unwrap();
    client.delete(format!("{s}10.244.1.0-24"), None).await.unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(10), w.next()).await.unwrap().unwrap();
    assert!(matches!(&ev[..], [WatchEvent::Delete { .. }]), "{ev:?}");
}

#[tokio::test]
async fn watch_errors_when_etcd_goes_away() {
    let (mut etcd, _client, mut m, _cfg) = setup(r#"{"Network":"10.244.0.0/16"}"#).await;
    let mut w = m.watch(0).await.unwrap();
    etcd.stop().unwrap();
    let res = tokio::time::timeout(Duration::from_secs(20), w.next()).await.expect("watch must not hang");
    assert!(res.is_err(), "{res:?}");
}
