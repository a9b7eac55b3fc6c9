//! The text ipvs mode hands to `ipset restore` and `iptables-restore` (pure renderers): the ipsets in one
//! batch (each set refilled in a temporary twin and swapped in, so no packet sees a half-filled set), and
//! the constant handful of rules for masquerade, hairpin and NodePort marking, plus the sweep of the
//! iptables mode's chains. Every name is a constant and every member is built from addresses, ports and
//! protocol enums, so nothing from etcd reaches these tools as free text.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use ipnetwork::Ipv4Network;

use crate::iptables::{scan_save, SavedHook, Table};

use super::plan::SETS;

pub const SERVICES: &str = "WEFT-IPVS-SERVICES";
pub const POSTROUTING: &str = "WEFT-IPVS-POSTROUTING";
pub const NODE_PORT: &str = "WEFT-IPVS-NODE-PORT";
pub const MARK_MASQ: &str = "WEFT-IPVS-MARK-MASQ";
pub const FILTER: &str = "WEFT-IPVS-FILTER";
pub const FORWARD: &str = "WEFT-IPVS-FORWARD";

const NAT_CHAINS: [&str; 4] = [SERVICES, POSTROUTING, NODE_PORT, MARK_MASQ];
const FILTER_CHAINS: [&str; 2] = [FILTER, FORWARD];

/// Whether a chain belongs to ipvs mode (the iptables mode never claims these names, nor we theirs).
pub fn is_ipvs_chain(name: &str) -> bool {
    NAT_CHAINS.contains(&name) || FILTER_CHAINS.contains(&name)
}

/// The jumps from built-in chains into ours: (table, built-in chain, target).
const HOOKS: [(Table, &str, &str); 5] = [
    (Table::Nat, "PREROUTING", SERVICES),
    (Table::Nat, "OUTPUT", SERVICES),
    (Table::Nat, "POSTROUTING", POSTROUTING),
    (Table::Filter, "INPUT", FILTER),
    (Table::Filter, "FORWARD", FORWARD),
];

/// Settings the rules depend on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleConfig {
    pub cluster_cidr: Option<Ipv4Network>,
    pub masquerade_bit: u8,
}

fn set_create(name: &str, kind: &str) -> String {
    if kind.starts_with("bitmap:port") {
        format!("create {name} {kind} range 0-65535 -exist\n")
    } else {
        format!("create {name} {kind} family inet hashsize 1024 maxelem 1048576 -exist\n")
    }
}

/// One `ipset restore` input refilling the sets in `members` (only those; others are left as they are).
pub fn render_ipsets(members: &BTreeMap<&'static str, BTreeSet<String>>) -> String {
    let mut out = String::new();
    for (name, kind) in SETS {
        let Some(m) = members.get(name) else { continue };
        let tmp = format!("{name}-TMP");
        out.push_str(&set_create(name, kind));
        out.push_str(&set_create(&tmp, kind));
        let _ = writeln!(out, "flush {tmp}");
        for member in m {
            let _ = writeln!(out, "add {tmp} {member}");
        }
        let _ = writeln!(out, "swap {tmp} {name}");
        let _ = writeln!(out, "destroy {tmp}");
    }
    out
}

/// `ipset restore` input taking the sets from `have` to `want`, member by member.
pub fn render_ipset_changes(
    have: &BTreeMap<&'static str, BTreeSet<String>>,
    want: &BTreeMap<&'static str, BTreeSet<String>>,
) -> String {
    let empty = BTreeSet::new();
    let mut out = String::new();
    for (name, _) in SETS {
        let (h, w) = (have.get(name).unwrap_or(&empty), want.get(name).unwrap_or(&empty));
        for m in h.difference(w) {
            let _ = writeln!(out, "del {name} {m} -exist");
        }
        for m in w.difference(h) {
            let _ = writeln!(out, "add {name} {m} -exist");
        }
    }
    out
}

/// `ipset restore` input destroying our sets (after the rules that use them are gone).
pub fn render_ipset_destroy(existing: &str) -> String {
    let mut out = String::new();
    for name in existing.lines().map(str::trim) {
        if SETS.iter().any(|(n, _)| *n == name || format!("{n}-TMP") == name) {
            let _ = writeln!(out, "destroy {name}");
        }
    }
    out
}

/// The `iptables-restore --noflush` input for ipvs mode, given the current `iptables-save` text: our
/// chains (rewritten whole), the hooks that are missing, and the sweep of the iptables mode's chains
/// and hooks (a node switched from iptables to ipvs keeps nothing of the other).
pub fn render_rules(cfg: &RuleConfig, save: &str) -> String {
    let mark = 1u32 << cfg.masquerade_bit;
    let mark = format!("{mark:#x}");
    let (_, our_hooks) = scan_save(save, is_ipvs_chain);
    let (old_chains, old_hooks) = scan_save(save, crate::iptables::is_proxy_chain);
    let mut nat = String::from("*nat\n");
    let mut filter = String::from("*filter\n");
    for c in NAT_CHAINS {
        let _ = writeln!(nat, ":{c} - [0:0]");
    }
    for c in FILTER_CHAINS {
        let _ = writeln!(filter, ":{c} - [0:0]");
    }
    for (t, c) in &old_chains {
        let out = if *t == Table::Nat { &mut nat } else { &mut filter };
        let _ = writeln!(out, ":{c} - [0:0]");
    }
    // nat: what needs masquerading is marked on the way in, and masqueraded on the way out.
    let set = |name: &str, dirs: &str| format!("-m set --match-set {name} {dirs}");
    let _ = writeln!(nat, "-A {MARK_MASQ} -j MARK --or-mark {mark}");
    let _ = writeln!(
        nat,
        "-A {POSTROUTING} {} -m comment --comment \"weft hairpin\" -j MASQUERADE",
        set("WEFT-LOOP-BACK", "dst,dst,src")
    );
    let _ = writeln!(nat, "-A {POSTROUTING} -m mark ! --mark {mark}/{mark} -j RETURN");
    let _ = writeln!(nat, "-A {POSTROUTING} -j MARK --xor-mark {mark}");
    let _ =
        writeln!(nat, "-A {POSTROUTING} -m comment --comment \"weft service traffic requiring SNAT\" -j MASQUERADE");
    if let Some(cidr) = cfg.cluster_cidr {
        let _ = writeln!(nat, "-A {SERVICES} ! -s {cidr} {} -j {MARK_MASQ}", set("WEFT-CLUSTER-IP", "dst,dst"));
    }
    for s in ["WEFT-EXTERNAL-IP", "WEFT-LOAD-BALANCER"] {
        let _ = writeln!(nat, "-A {SERVICES} {} -j {MARK_MASQ}", set(s, "dst,dst"));
    }
    let _ = writeln!(nat, "-A {SERVICES} -m addrtype --dst-type LOCAL -j {NODE_PORT}");
    for s in ["WEFT-CLUSTER-IP", "WEFT-EXTERNAL-IP", "WEFT-LOAD-BALANCER"] {
        let _ = writeln!(nat, "-A {SERVICES} {} -j ACCEPT", set(s, "dst,dst"));
    }
    for (p, s) in [("tcp", "WEFT-NODE-PORT-TCP"), ("udp", "WEFT-NODE-PORT-UDP"), ("sctp", "WEFT-NODE-PORT-SCTP")] {
        let _ = writeln!(nat, "-A {NODE_PORT} -p {p} {} -j {MARK_MASQ}", set(s, "dst"));
    }
    // filter: service addresses answer only on service ports; marked service traffic may be forwarded.
    for s in ["WEFT-CLUSTER-IP", "WEFT-EXTERNAL-IP", "WEFT-LOAD-BALANCER"] {
        let _ = writeln!(filter, "-A {FILTER} {} -j RETURN", set(s, "dst,dst"));
    }
    let _ = writeln!(filter, "-A {FILTER} -m conntrack --ctstate NEW {} -j REJECT", set("WEFT-IPVS-IPS", "dst"));
    let _ = writeln!(filter, "-A {FORWARD} -m mark --mark {mark}/{mark} -j ACCEPT");
    let _ = writeln!(filter, "-A {FORWARD} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT");
    for (t, chain, target) in HOOKS {
        if our_hooks.iter().any(|(ht, hc, _, htarget)| *ht == t && hc == chain && htarget == target) {
            continue;
        }
        let out = if t == Table::Nat { &mut nat } else { &mut filter };
        let _ = writeln!(out, "-I {chain} 1 -m comment --comment \"weft ipvs\" -j {target}");
    }
    sweep(&mut nat, &mut filter, &old_chains, &old_hooks);
    nat.push_str("COMMIT\n");
    filter.push_str("COMMIT\n");
    nat + &filter
}

fn sweep(nat: &mut String, filter: &mut String, chains: &BTreeSet<(Table, String)>, hooks: &[SavedHook]) {
    for (t, chain, rest, _) in hooks {
        let out = if *t == Table::Nat { &mut *nat } else { &mut *filter };
        let _ = writeln!(out, "-D {chain} {rest}");
    }
    for (t, c) in chains {
        let out = if *t == Table::Nat { &mut *nat } else { &mut *filter };
        let _ = writeln!(out, "-X {c}");
    }
}

/// `iptables-restore --noflush` input removing everything of ipvs mode (None when there is nothing).
pub fn render_cleanup(save: &str) -> Option<String> {
    let (chains, hooks) = scan_save(save, is_ipvs_chain);
    if chains.is_empty() && hooks.is_empty() {
        return None;
    }
    let (mut nat, mut filter) = (String::from("*nat\n"), String::from("*filter\n"));
    for (t, c) in &chains {
        let out = if *t == Table::Nat { &mut nat } else { &mut filter };
        let _ = writeln!(out, ":{c} - [0:0]");
    }
    sweep(&mut nat, &mut filter, &chains, &hooks);
    Some(nat + "COMMIT\n" + &filter + "COMMIT\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAVE_AFTER_IPTABLES_MODE: &str = "*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:WEFT-SERVICES - [0:0]
:WEFT-SVC-ABCDEF - [0:0]
:WEFT-POSTRTG - [0:0]
-A PREROUTING -m comment --comment \"weft service portals\" -j WEFT-SERVICES
-A POSTROUTING -j WEFT-POSTRTG
-A WEFT-SERVICES -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -j WEFT-SVC-ABCDEF
COMMIT
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:WEFT-IPVS-FORWARD - [0:0]
-A FORWARD -m comment --comment \"weft ipvs\" -j WEFT-IPVS-FORWARD
COMMIT
";

    #[test]
    fn rules_golden() {
        let cfg = RuleConfig { cluster_cidr: Some("10.244.0.0/16".parse().unwrap()), masquerade_bit: 14 };
        let got = render_rules(&cfg, SAVE_AFTER_IPTABLES_MODE);
        let want = r#"*nat
:WEFT-IPVS-SERVICES - [0:0]
:WEFT-IPVS-POSTROUTING - [0:0]
:WEFT-IPVS-NODE-PORT - [0:0]
:WEFT-IPVS-MARK-MASQ - [0:0]
:WEFT-SERVICES - [0:0]
:WEFT-SVC-ABCDEF - [0:0]
-A WEFT-IPVS-MARK-MASQ -j MARK --or-mark 0x4000
-A WEFT-IPVS-POSTROUTING -m set --match-set WEFT-LOOP-BACK dst,dst,src -m comment --comment "weft hairpin" -j MASQUERADE
-A WEFT-IPVS-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A WEFT-IPVS-POSTROUTING -j MARK --xor-mark 0x4000
-A WEFT-IPVS-POSTROUTING -m comment --comment "weft service traffic requiring SNAT" -j MASQUERADE
-A WEFT-IPVS-SERVICES ! -s 10.244.0.0/16 -m set --match-set WEFT-CLUSTER-IP dst,dst -j WEFT-IPVS-MARK-MASQ
-A WEFT-IPVS-SERVICES -m set --match-set WEFT-EXTERNAL-IP dst,dst -j WEFT-IPVS-MARK-MASQ
-A WEFT-IPVS-SERVICES -m set --match-set WEFT-LOAD-BALANCER dst,dst -j WEFT-IPVS-MARK-MASQ
-A WEFT-IPVS-SERVICES -m addrtype --dst-type LOCAL -j WEFT-IPVS-NODE-PORT
-A WEFT-IPVS-SERVICES -m set --match-set WEFT-CLUSTER-IP dst,dst -j ACCEPT
-A WEFT-IPVS-SERVICES -m set --match-set WEFT-EXTERNAL-IP dst,dst -j ACCEPT
-A WEFT-IPVS-SERVICES -m set --match-set WEFT-LOAD-BALANCER dst,dst -j ACCEPT
-A WEFT-IPVS-NODE-PORT -p tcp -m set --match-set WEFT-NODE-PORT-TCP dst -j WEFT-IPVS-MARK-MASQ
-A WEFT-IPVS-NODE-PORT -p udp -m set --match-set WEFT-NODE-PORT-UDP dst -j WEFT-IPVS-MARK-MASQ
-A WEFT-IPVS-NODE-PORT -p sctp -m set --match-set WEFT-NODE-PORT-SCTP dst -j WEFT-IPVS-MARK-MASQ
-I PREROUTING 1 -m comment --comment "weft ipvs" -j WEFT-IPVS-SERVICES
-I OUTPUT 1 -m comment --comment "weft ipvs" -j WEFT-IPVS-SERVICES
-I POSTROUTING 1 -m comment --comment "weft ipvs" -j WEFT-IPVS-POSTROUTING
-D PREROUTING -m comment --comment "weft service portals" -j WEFT-SERVICES
-X WEFT-SERVICES
-X WEFT-SVC-ABCDEF
COMMIT
*filter
:WEFT-IPVS-FILTER - [0:0]
:WEFT-IPVS-FORWARD - [0:0]
-A WEFT-IPVS-FILTER -m set --match-set WEFT-CLUSTER-IP dst,dst -j RETURN
-A WEFT-IPVS-FILTER -m set --match-set WEFT-EXTERNAL-IP dst,dst -j RETURN
-A WEFT-IPVS-FILTER -m set --match-set WEFT-LOAD-BALANCER dst,dst -j RETURN
-A WEFT-IPVS-FILTER -m conntrack --ctstate NEW -m set --match-set WEFT-IPVS-IPS dst -j REJECT
-A WEFT-IPVS-FORWARD -m mark --mark 0x4000/0x4000 -j ACCEPT
-A WEFT-IPVS-FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-I INPUT 1 -m comment --comment "weft ipvs" -j WEFT-IPVS-FILTER
COMMIT
"#;
        assert_eq!(got, want, "the agent's WEFT-POSTRTG stays; the FORWARD hook is not doubled");
        let cleanup = render_cleanup(SAVE_AFTER_IPTABLES_MODE).unwrap();
        assert_eq!(
            cleanup,
            "*nat\nCOMMIT\n*filter\n:WEFT-IPVS-FORWARD - [0:0]\n-D FORWARD -m comment --comment \"weft ipvs\" -j WEFT-IPVS-FORWARD\n-X WEFT-IPVS-FORWARD\nCOMMIT\n"
        );
        assert_eq!(render_cleanup("*nat\n:WEFT-SERVICES - [0:0]\nCOMMIT\n"), None);
    }

    #[test]
    fn ipsets_refill_through_a_twin() {
        let members: BTreeMap<&'static str, BTreeSet<String>> = [
            ("WEFT-CLUSTER-IP", ["10.96.0.10,tcp:80".to_string()].into()),
            ("WEFT-NODE-PORT-TCP", ["30080".to_string()].into()),
        ]
        .into();
        assert_eq!(
            render_ipsets(&members),
            "create WEFT-CLUSTER-IP hash:ip,port family inet hashsize 1024 maxelem 1048576 -exist
create WEFT-CLUSTER-IP-TMP hash:ip,port family inet hashsize 1024 maxelem 1048576 -exist
flush WEFT-CLUSTER-IP-TMP
add WEFT-CLUSTER-IP-TMP 10.96.0.10,tcp:80
swap WEFT-CLUSTER-IP-TMP WEFT-CLUSTER-IP
destroy WEFT-CLUSTER-IP-TMP
create WEFT-NODE-PORT-TCP bitmap:port range 0-65535 -exist
create WEFT-NODE-PORT-TCP-TMP bitmap:port range 0-65535 -exist
flush WEFT-NODE-PORT-TCP-TMP
add WEFT-NODE-PORT-TCP-TMP 30080
swap WEFT-NODE-PORT-TCP-TMP WEFT-NODE-PORT-TCP
destroy WEFT-NODE-PORT-TCP-TMP
"
        );
        let mut next = members.clone();
        next.insert("WEFT-CLUSTER-IP", ["10.96.0.11,udp:53".to_string()].into());
        assert_eq!(
            render_ipset_changes(&members, &next),
            "del WEFT-CLUSTER-IP 10.96.0.10,tcp:80 -exist\nadd WEFT-CLUSTER-IP 10.96.0.11,udp:53 -exist\n"
        );
        assert_eq!(render_ipset_changes(&next, &next), "");
        assert_eq!(render_ipset_destroy("KUBE-X\nWEFT-CLUSTER-IP\nWEFT-OTHER\n"), "destroy WEFT-CLUSTER-IP\n");
    }
}
