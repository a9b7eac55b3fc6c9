//! The kernel seam against the real kernel: every test builds a node in its own network namespace
//! (a veth underlay at 192.168.56.11), drives `weft_agent::kernel` inside it, and checks the result
//! with the operator's tools (`ip`, `bridge`, `ethtool`). Nothing touches the host namespace.

use std::future::Future;
use std::io::Read;
use std::net::Ipv4Addr;
use std::process::Stdio;
use std::time::Duration;

use ipnetwork::Ipv4Network;
use weft_agent::kernel::{self, vtep_mac, Netlink, Underlay, VxlanSpec};
use weft_agent::lease::{Lease, LeaseAttrs, Mac};
use weft_agent::plan::{self, Op};
use weft_lab::Netns;

type TestResult<T = ()> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

const LOCAL: &str = "10.244.1.0/24";

fn net(s: &str) -> Ipv4Network {
    s.parse().unwrap()
}

/// A namespace with `eth0` (192.168.56.11/24, up) whose veth peer `eth0p` stays inside it too.
fn node(label: &str) -> TestResult<Netns> {
    let ns = Netns::create(label)?;
    ns.sh("ip link add eth0 type veth peer name eth0p && ip addr add 192.168.56.11/24 dev eth0 \
         && ip link set eth0 up && ip link set eth0p up")?;
    Ok(ns)
}

/// Runs `f` with a fresh `Netlink` on a thread inside `ns`.
fn with_nl<T, F, Fut>(ns: &Netns, f: F) -> TestResult<T>
where
    T: Send + 'static,
    F: FnOnce(Netlink) -> Fut + Send + 'static,
    Fut: Future<Output = kernel::Result<T>>,
{
    Ok(ns.block_on(move || async move { f(Netlink::new()?).await })??)
}

fn underlay(ns: &Netns) -> TestResult<Underlay> {
    with_nl(ns, |nl| async move { nl.find_underlay(Some("eth0")).await })
}

fn ensure(ns: &Netns, spec: VxlanSpec) -> TestResult<u32> {
    with_nl(ns, move |nl| async move { nl.ensure_vxlan(&spec).await })
}

/// One vxlan sync (observe, diff, apply) for these leases; asserts no op failed and returns the ops.
fn sync_vxlan(ns: &Netns, ifindex: u32, leases: Vec<Lease>) -> TestResult<Vec<Op>> {
    let (ops, failed) = with_nl(ns, move |nl| async move {
        let desired = plan::desired_vxlan(net(LOCAL), 1, ifindex, &leases);
        let observed = nl.observe_vxlan(ifindex).await?;
        let ops = plan::diff(&desired, &observed);
        let failed: Vec<String> = nl.apply(&ops).await.into_iter().map(|(op, e)| format!("{op}: {e}")).collect();
        Ok((ops, failed))
    })?;
    assert!(failed.is_empty(), "failed ops: {failed:?}");
    Ok(ops)
}

/// The tool's output as trimmed, sorted lines with single spaces.
fn lines(out: String) -> Vec<String> {
    let mut v: Vec<String> =
        out.lines().map(|l| l.split_whitespace().collect::<Vec<_>>().join(" ")).filter(|l| !l.is_empty()).collect();
    v.sort();
    v
}

fn vxlan_lease(subnet: &str, public: [u8; 4]) -> Lease {
    let ip = Ipv4Addr::from(public);
    Lease {
        subnet: net(subnet),
        attrs: LeaseAttrs::vxlan(ip, 1, vtep_mac(ip, 1)),
        etcd_lease: 1,
        mod_revision: 1,
        create_revision: 1,
    }
}

fn host_gw_lease(subnet: &str, public: [u8; 4]) -> Lease {
    Lease {
        subnet: net(subnet),
        attrs: LeaseAttrs::host_gw(public.into()),
        etcd_lease: 1,
        mod_revision: 1,
        create_revision: 1,
    }
}

fn link_json(ns: &Netns, dev: &str) -> TestResult<serde_json::Value> {
    let out = ns.ip(&["-d", "-j", "link", "show", dev])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    Ok(v[0].clone())
}

fn tx_checksum(ns: &Netns, dev: &str) -> TestResult<String> {
    let out = ns.exec("ethtool", &["-k", dev])?;
    let line = out.lines().find(|l| l.trim_start().starts_with("tx-checksum-ip-generic:")).unwrap_or_default();
    Ok(line.trim().to_string())
}

#[test]
fn ensure_vxlan_makes_flannels_device() -> TestResult {
    let ns = node("vxdev")?;
    ns.ip(&["link", "set", "eth0", "mtu", "1400"])?;
    let u = underlay(&ns)?;
    assert_eq!((u.name.as_str(), u.ip, u.mtu), ("eth0", Ipv4Addr::new(192, 168, 56, 11), 1400));
    let spec = VxlanSpec::new(&u, 1, 8472, net(LOCAL));
    let ifindex = ensure(&ns, spec)?;
    assert_eq!(tx_checksum(&ns, "flannel.1")?, "tx-checksum-ip-generic: on", "offload kept by default");
    let spec = VxlanSpec { tx_checksum_offload: false, ..spec };
    assert_eq!(ensure(&ns, spec)?, ifindex, "switching offload off keeps the device");

    let l = link_json(&ns, "flannel.1")?;
    assert_eq!(l["ifindex"], ifindex);
    assert_eq!(l["mtu"], 1350, "underlay MTU - 50");
    assert_eq!(l["address"], spec.mac.to_string());
    assert!(l["flags"].as_array().unwrap().iter().any(|f| f == "UP"), "{l}");
    let info = &l["linkinfo"]["info_data"];
    assert_eq!(l["linkinfo"]["info_kind"], "vxlan");
    assert_eq!(info["id"], 1);
    assert_eq!(info["local"], "192.168.56.11");
    assert_eq!(info["port"], 8472);
    assert_eq!(info["learning"], false, "nolearning: {info}");
    assert_eq!(info["link"], "eth0");

    let addrs = lines(ns.ip(&["-4", "-o", "addr", "show", "dev", "flannel.1"])?);
    assert_eq!(addrs.len(), 1, "{addrs:?}");
    assert!(addrs[0].contains("inet 10.244.1.0/32"), "{addrs:?}");
    assert_eq!(tx_checksum(&ns, "flannel.1")?, "tx-checksum-ip-generic: off");
    ensure(&ns, VxlanSpec { tx_checksum_offload: true, ..spec })?;
    assert_eq!(tx_checksum(&ns, "flannel.1")?, "tx-checksum-ip-generic: on", "and back on");
    Ok(())
}

#[test]
fn ensure_vxlan_twice_changes_nothing() -> TestResult {
    let ns = node("vxidem")?;
    let spec = VxlanSpec::new(&underlay(&ns)?, 1, 8472, net(LOCAL));
    let first = ensure(&ns, spec)?;
    let before = link_json(&ns, "flannel.1")?;

    // Any link or address change the second call made would show up here.
    let mut monitor = ns.command("ip").args(["-o", "monitor", "link", "address"]).stdout(Stdio::piped()).spawn()?;
    std::thread::sleep(Duration::from_millis(300));
    let second = ensure(&ns, spec)?;
    std::thread::sleep(Duration::from_millis(300));
    monitor.kill()?;
    let mut seen = String::new();
    monitor.stdout.take().unwrap().read_to_string(&mut seen)?;
    monitor.wait()?;

    assert_eq!(first, second);
    assert_eq!(seen, "", "the second ensure_vxlan changed something");
    let after = link_json(&ns, "flannel.1")?;
    assert_eq!(before["linkinfo"], after["linkinfo"]);
    assert_eq!(before["address"], after["address"]);
    Ok(())
}

#[test]
fn vxlan_device_deleted_by_hand_comes_back_with_its_mac() -> TestResult {
    let ns = node("vxgone")?;
    let spec = VxlanSpec { tx_checksum_offload: false, ..VxlanSpec::new(&underlay(&ns)?, 1, 8472, net(LOCAL)) };
    let first = ensure(&ns, spec)?;
    ns.ip(&["link", "del", "flannel.1"])?;
    let second = ensure(&ns, spec)?;
    assert_ne!(first, second, "a new device");
    let l = link_json(&ns, "flannel.1")?;
    assert_eq!(l["address"], spec.mac.to_string(), "same MAC, so the lease stays valid");
    assert_eq!(tx_checksum(&ns, "flannel.1")?, "tx-checksum-ip-generic: off");
    let mac: Mac = with_nl(&ns, move |nl| async move { nl.link_mac(second).await })?;
    assert_eq!(mac, spec.mac);
    Ok(())
}

#[test]
fn vxlan_device_with_other_vni_or_port_is_recreated() -> TestResult {
    let ns = node("vxdiff")?;
    let spec = VxlanSpec::new(&underlay(&ns)?, 1, 8472, net(LOCAL));
    for (what, args) in [
        ("vni", "id 7 local 192.168.56.11 dstport 8472"),
        ("port", "id 1 local 192.168.56.11 dstport 4789"),
        ("learning", "id 1 local 192.168.56.11 dstport 8472"),
    ] {
        ns.sh(&format!("ip link add flannel.1 type vxlan {args} dev eth0 && ip addr add 10.9.9.9/24 dev flannel.1"))?;
        ensure(&ns, spec)?;
        let info = link_json(&ns, "flannel.1")?["linkinfo"]["info_data"].clone();
        assert_eq!((info["id"].clone(), info["port"].clone()), (1.into(), 8472.into()), "{what}: {info}");
        assert_eq!(info["learning"], false, "{what}");
        let addrs = lines(ns.ip(&["-4", "-o", "addr", "show", "dev", "flannel.1"])?);
        assert!(addrs.len() == 1 && addrs[0].contains("inet 10.244.1.0/32"), "{what}: {addrs:?}");
        ns.ip(&["link", "del", "flannel.1"])?;
    }
    Ok(())
}

#[test]
fn stray_address_on_the_vxlan_device_is_removed() -> TestResult {
    let ns = node("vxaddr")?;
    let spec = VxlanSpec::new(&underlay(&ns)?, 1, 8472, net(LOCAL));
    ensure(&ns, spec)?;
    ns.ip(&["addr", "add", "10.244.7.0/32", "dev", "flannel.1"])?;
    ensure(&ns, spec)?;
    let addrs = lines(ns.ip(&["-4", "-o", "addr", "show", "dev", "flannel.1"])?);
    assert!(addrs.len() == 1 && addrs[0].contains("inet 10.244.1.0/32"), "{addrs:?}");
    Ok(())
}

fn shown(ns: &Netns) -> TestResult<(Vec<String>, Vec<String>, Vec<String>)> {
    Ok((
        lines(ns.ip(&["route", "show", "dev", "flannel.1"])?),
        lines(ns.ip(&["neigh", "show", "dev", "flannel.1", "nud", "permanent"])?),
        lines(ns.exec("bridge", &["fdb", "show", "dev", "flannel.1"])?),
    ))
}

fn expected(leases: &[([u8; 3], [u8; 4])]) -> (Vec<String>, Vec<String>, Vec<String>) {
    let mut routes = Vec::new();
    let mut neighs = Vec::new();
    let mut fdbs = Vec::new();
    for ([a, b, c], public) in leases {
        let public = Ipv4Addr::from(*public);
        let mac = vtep_mac(public, 1);
        routes.push(format!("{a}.{b}.{c}.0/24 via {a}.{b}.{c}.0 onlink"));
        neighs.push(format!("{a}.{b}.{c}.0 lladdr {mac} PERMANENT"));
        fdbs.push(format!("{mac} dst {public} self permanent"));
    }
    routes.sort();
    neighs.sort();
    fdbs.sort();
    (routes, neighs, fdbs)
}

#[test]
fn vxlan_sync_programs_routes_neighbours_and_fdb_and_repairs_them() -> TestResult {
    let ns = node("vxsync")?;
    let spec = VxlanSpec::new(&underlay(&ns)?, 1, 8472, net(LOCAL));
    let ifindex = ensure(&ns, spec)?;
    let own = vxlan_lease(LOCAL, [192, 168, 56, 11]);
    let (a, b, c) = (
        vxlan_lease("10.244.2.0/24", [192, 168, 56, 12]),
        vxlan_lease("10.244.3.0/24", [192, 168, 56, 13]),
        vxlan_lease("10.244.4.0/24", [192, 168, 56, 14]),
    );
    let all = vec![own.clone(), a.clone(), b.clone(), c.clone()];

    let ops = sync_vxlan(&ns, ifindex, all.clone())?;
    assert_eq!(ops.len(), 9, "{ops:?}");
    let want = expected(&[
        ([10, 244, 2], [192, 168, 56, 12]),
        ([10, 244, 3], [192, 168, 56, 13]),
        ([10, 244, 4], [192, 168, 56, 14]),
    ]);
    assert_eq!(shown(&ns)?, want);

    // Level-triggered: a second sync finds nothing to do.
    assert_eq!(sync_vxlan(&ns, ifindex, all.clone())?, vec![]);

    // A route deleted by hand is restored, and only it.
    ns.ip(&["route", "del", "10.244.3.0/24", "dev", "flannel.1"])?;
    let ops = sync_vxlan(&ns, ifindex, all.clone())?;
    assert!(matches!(ops.as_slice(), [Op::AddRoute(r)] if r.dst == net("10.244.3.0/24")), "{ops:?}");
    assert_eq!(shown(&ns)?, want);

    // So are a neighbour and an FDB entry deleted by hand.
    ns.ip(&["neigh", "del", "10.244.2.0", "dev", "flannel.1"])?;
    let mac_c = vtep_mac(Ipv4Addr::new(192, 168, 56, 14), 1).to_string();
    ns.exec("bridge", &["fdb", "del", &mac_c, "dev", "flannel.1", "dst", "192.168.56.14", "self"])?;
    assert_eq!(sync_vxlan(&ns, ifindex, all)?.len(), 2);
    assert_eq!(shown(&ns)?, want);

    // A lease gone: its route, neighbour and FDB entry go with it.
    let ops = sync_vxlan(&ns, ifindex, vec![own, a, c])?;
    assert_eq!(ops.len(), 3, "{ops:?}");
    assert!(ops.iter().all(|op| matches!(op, Op::DelRoute(_) | Op::DelNeigh(_) | Op::DelFdb(_))), "{ops:?}");
    assert_eq!(shown(&ns)?, expected(&[([10, 244, 2], [192, 168, 56, 12]), ([10, 244, 4], [192, 168, 56, 14])]));
    Ok(())
}

#[test]
fn vxlan_peer_with_new_public_ip_gets_its_fdb_entry_moved() -> TestResult {
    let ns = node("vxmove")?;
    let spec = VxlanSpec::new(&underlay(&ns)?, 1, 8472, net(LOCAL));
    let ifindex = ensure(&ns, spec)?;
    let old = vxlan_lease("10.244.2.0/24", [192, 168, 56, 12]);
    sync_vxlan(&ns, ifindex, vec![old.clone()])?;
    let mut moved = old;
    let mac = moved.attrs.vxlan_data().unwrap().vtep_mac;
    moved.attrs = LeaseAttrs::vxlan(Ipv4Addr::new(192, 168, 56, 22), 1, mac);
    sync_vxlan(&ns, ifindex, vec![moved])?;
    let fdb = lines(ns.exec("bridge", &["fdb", "show", "dev", "flannel.1"])?);
    assert_eq!(fdb, vec![format!("{mac} dst 192.168.56.22 self permanent")]);
    Ok(())
}

#[test]
fn host_gw_sync_owns_only_pod_network_routes() -> TestResult {
    let ns = node("hostgw")?;
    // Not ours: outside the pod network.
    ns.ip(&["route", "add", "10.99.0.0/16", "via", "192.168.56.99", "dev", "eth0"])?;
    let network = net("10.244.0.0/16");
    let sync = |leases: Vec<Lease>| -> TestResult<Vec<Op>> {
        let (ops, failed) = with_nl(&ns, move |nl| async move {
            let u = nl.find_underlay(Some("eth0")).await?;
            let desired = plan::desired_host_gw(net(LOCAL), u.ifindex, &leases);
            let observed = nl.observe_host_gw(u.ifindex, network, net(LOCAL)).await?;
            let ops = plan::diff(&desired, &observed);
            let failed = nl.apply(&ops).await.len();
            Ok((ops, failed))
        })?;
        assert_eq!(failed, 0);
        Ok(ops)
    };
    let show = || -> TestResult<Vec<String>> { Ok(lines(ns.ip(&["route", "show", "dev", "eth0"])?)) };
    let (a, b) =
        (host_gw_lease("10.244.2.0/24", [192, 168, 56, 12]), host_gw_lease("10.244.3.0/24", [192, 168, 56, 13]));
    let own = host_gw_lease(LOCAL, [192, 168, 56, 11]);

    assert_eq!(sync(vec![own.clone(), a.clone(), b.clone()])?.len(), 2);
    let kernel_route = "192.168.56.0/24 proto kernel scope link src 192.168.56.11".to_string();
    let mut want = vec![
        "10.244.2.0/24 via 192.168.56.12".to_string(),
        "10.244.3.0/24 via 192.168.56.13".to_string(),
        "10.99.0.0/16 via 192.168.56.99".to_string(),
        kernel_route.clone(),
    ];
    want.sort();
    assert_eq!(show()?, want);
    assert_eq!(sync(vec![own.clone(), a, b])?, vec![]);

    // Lease b gone and a's node moved: b's route is removed, a's replaced; 10.99/16 untouched.
    let a_moved = host_gw_lease("10.244.2.0/24", [192, 168, 56, 22]);
    assert_eq!(sync(vec![own, a_moved])?.len(), 3);
    let mut want =
        vec!["10.244.2.0/24 via 192.168.56.22".to_string(), "10.99.0.0/16 via 192.168.56.99".to_string(), kernel_route];
    want.sort();
    assert_eq!(show()?, want);
    Ok(())
}

#[test]
fn find_underlay_by_name_address_default_route_and_fallback() -> TestResult {
    let ns = node("under")?;
    ns.sh("ip link add eth1 type veth peer name eth1p && ip addr add 192.168.57.11/24 dev eth1 \
         && ip link set eth1 up && ip link set eth1p up \
         && ip link add eth2 type veth peer name eth2p && ip link set eth2 up && ip link set eth2p up")?;
    let find = |spec: Option<&'static str>| {
        with_nl(&ns, move |nl| async move { Ok(nl.find_underlay(spec).await.map_err(|e| e.to_string())) })
    };
    let name_ip = |r: Result<Underlay, String>| r.map(|u| (u.name, u.ip.to_string()));

    assert_eq!(name_ip(find(Some("eth1"))?), Ok(("eth1".into(), "192.168.57.11".into())));
    assert_eq!(name_ip(find(Some("192.168.56.11"))?), Ok(("eth0".into(), "192.168.56.11".into())));
    // No default route: the first interface that is up with IPv4.
    assert_eq!(name_ip(find(None)?), Ok(("eth0".into(), "192.168.56.11".into())));
    // A default route (to a peer inside this namespace) decides.
    ns.ip(&["route", "add", "default", "via", "192.168.57.1", "dev", "eth1"])?;
    assert_eq!(name_ip(find(None)?), Ok(("eth1".into(), "192.168.57.11".into())));

    let err = find(Some("eth2"))?.unwrap_err();
    assert_eq!(err, "interface eth2 has no IPv4 address (the underlay needs one for VXLAN)");
    ns.ip(&["route", "replace", "default", "dev", "eth2"])?;
    let err = find(None)?.unwrap_err();
    assert!(err.contains("eth2 has no IPv4 address"), "{err}");
    assert_eq!(find(Some("nope0"))?.unwrap_err(), "no interface named \"nope0\"");
    assert_eq!(find(Some("10.1.2.3"))?.unwrap_err(), "no interface has the IPv4 address 10.1.2.3");
    Ok(())
}

#[test]
fn apply_tolerates_deleting_what_is_gone_and_reports_real_failures() -> TestResult {
    let ns = node("apply")?;
    let spec = VxlanSpec::new(&underlay(&ns)?, 1, 8472, net(LOCAL));
    let ifindex = ensure(&ns, spec)?;
    let desired = plan::desired_vxlan(net(LOCAL), 1, ifindex, &[vxlan_lease("10.244.2.0/24", [192, 168, 56, 12])]);
    let deletes: Vec<Op> = plan::diff(&Default::default(), &desired);
    assert_eq!(deletes.len(), 3);
    let bad = Op::AddRoute(plan::Route {
        dst: net("10.244.9.0/24"),
        gateway: [10, 244, 9, 0].into(),
        ifindex: 9999,
        onlink: true,
    });
    let mut ops = deletes;
    ops.push(bad);
    let failed = with_nl(&ns, move |nl| async move {
        Ok(nl.apply(&ops).await.into_iter().map(|(op, e)| (op, e.to_string())).collect::<Vec<_>>())
    })?;
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0].0, bad);
    assert!(failed[0].1.starts_with("netlink replace route failed"), "{}", failed[0].1);
    // delete_link says whether there was one.
    assert!(with_nl(&ns, |nl| async move { nl.delete_link("flannel.1").await })?);
    assert!(!with_nl(&ns, |nl| async move { nl.delete_link("flannel.1").await })?);
    Ok(())
}
