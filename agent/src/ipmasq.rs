//! `--ip-masq`: the iptables rules flanneld installs, under weft's own chains, in the node's namespace.
//! Pod traffic leaving the pod network is masqueraded; traffic inside it keeps its source address.
//! Rules are rendered by a pure function and applied in one `iptables-restore --noflush`.

use std::io::Write;
use std::process::{Command, Stdio};

use ipnetwork::Ipv4Network;

pub const POSTRTG_CHAIN: &str = "WEFT-POSTRTG";
pub const FWD_CHAIN: &str = "WEFT-FWD";
const MASQ_COMMENT: &str = "weft masq";
const FWD_COMMENT: &str = "weft forward";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("running {cmd}: {source}")]
    Spawn { cmd: String, source: std::io::Error },
    #[error("{cmd} failed: {stderr}")]
    Failed { cmd: String, stderr: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The jump rules from the built-in chains, one per table: (table, chain, rule spec).
pub fn jump_rules() -> [(&'static str, &'static str, Vec<String>); 2] {
    let spec = |comment: &str, target: &str| {
        ["-m", "comment", "--comment", comment, "-j", target].iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    [("nat", "POSTROUTING", spec(MASQ_COMMENT, POSTRTG_CHAIN)), ("filter", "FORWARD", spec(FWD_COMMENT, FWD_CHAIN))]
}

/// The rules of our chains, as `iptables-save` prints them (table → lines), in flannel's order.
pub fn chain_rules(network: Ipv4Network, subnet: Ipv4Network) -> Vec<(&'static str, Vec<String>)> {
    let m = format!("-m comment --comment \"{MASQ_COMMENT}\"");
    let f = format!("-m comment --comment \"{FWD_COMMENT}\"");
    let c = POSTRTG_CHAIN;
    let nat = vec![
        // Packets kube-proxy (or weft proxy) marked for masquerade are its business.
        format!("-A {c} -m mark --mark 0x4000/0x4000 {m} -j RETURN"),
        // Pod to pod: keep the source, on this node and across the overlay.
        format!("-A {c} -s {subnet} -d {network} {m} -j RETURN"),
        format!("-A {c} -s {network} -d {subnet} {m} -j RETURN"),
        // From outside to a local pod: nothing to hide.
        format!("-A {c} ! -s {network} -d {subnet} {m} -j RETURN"),
        // Pods to the world (multicast excluded).
        format!("-A {c} -s {network} ! -d 224.0.0.0/4 {m} -j MASQUERADE --random-fully"),
        // The node itself to a remote pod: use an address the return path knows.
        format!("-A {c} ! -s {network} -d {network} {m} -j MASQUERADE --random-fully"),
    ];
    let filter = vec![
        format!("-A {FWD_CHAIN} -s {network} {f} -j ACCEPT"),
        format!("-A {FWD_CHAIN} -d {network} {f} -j ACCEPT"),
    ];
    vec![("nat", nat), ("filter", filter)]
}

/// `iptables-restore --noflush` input that replaces our chains' contents and nothing else.
pub fn render(network: Ipv4Network, subnet: Ipv4Network) -> String {
    let mut out = String::new();
    for (table, rules) in chain_rules(network, subnet) {
        let chain = if table == "nat" { POSTRTG_CHAIN } else { FWD_CHAIN };
        out.push_str(&format!("*{table}\n:{chain} - [0:0]\n"));
        for r in rules {
            out.push_str(&r);
            out.push('\n');
        }
        out.push_str("COMMIT\n");
    }
    out
}

/// True when `iptables-save` output (all tables) already holds exactly our rules and both jumps.
/// Compared chain by chain: iptables-save's table order is its own.
pub fn in_sync(saved: &str, network: Ipv4Network, subnet: Ipv4Network) -> bool {
    let chain_ok = |chain: &str, want: &[String]| {
        let head = format!("-A {chain} ");
        let have: Vec<&str> = saved.lines().filter(|l| l.starts_with(&head)).collect();
        have.len() == want.len() && have.iter().zip(want).all(|(a, b)| *a == b.as_str())
    };
    let jump_ok = |from: &str, to: &str| {
        saved.lines().any(|l| l.starts_with(&format!("-A {from} ")) && l.ends_with(&format!("-j {to}")))
    };
    let rules = chain_rules(network, subnet);
    jump_ok("POSTROUTING", POSTRTG_CHAIN)
        && jump_ok("FORWARD", FWD_CHAIN)
        && chain_ok(POSTRTG_CHAIN, &rules[0].1)
        && chain_ok(FWD_CHAIN, &rules[1].1)
}

fn run(cmd: &str, args: &[&str], stdin: Option<&str>) -> Result<(bool, String)> {
    let name = format!("{cmd} {}", args.join(" "));
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| Error::Spawn { cmd: name.clone(), source })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes()).map_err(|source| Error::Spawn { cmd: name.clone(), source })?;
    }
    let out = child.wait_with_output().map_err(|source| Error::Spawn { cmd: name.clone(), source })?;
    if !out.status.success() && stdin.is_some() {
        return Err(Error::Failed { cmd: name, stderr: String::from_utf8_lossy(&out.stderr).trim().to_string() });
    }
    Ok((out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned()))
}

/// Makes the namespace's iptables hold our masquerade rules; returns true when it had to change them.
pub fn ensure(network: Ipv4Network, subnet: Ipv4Network) -> Result<bool> {
    let (_, saved) = run("iptables-save", &[], None)?;
    if in_sync(&saved, network, subnet) {
        return Ok(false);
    }
    run("iptables-restore", &["--noflush"], Some(&render(network, subnet)))?;
    for (table, chain, spec) in jump_rules() {
        let spec: Vec<&str> = spec.iter().map(String::as_str).collect();
        let (present, _) = run("iptables", &[&["-t", table, "-C", chain], spec.as_slice()].concat(), None)?;
        if !present {
            let (ok, _) = run("iptables", &[&["-t", table, "-I", chain, "1"], spec.as_slice()].concat(), None)?;
            if !ok {
                return Err(Error::Failed { cmd: format!("iptables -t {table} -I {chain}"), stderr: String::new() });
            }
        }
    }
    Ok(true)
}

/// Removes our chains and jumps if present (ip-masq turned off).
pub fn remove() -> Result<()> {
    for (table, chain, spec) in jump_rules() {
        let spec: Vec<&str> = spec.iter().map(String::as_str).collect();
        while run("iptables", &[&["-t", table, "-D", chain], spec.as_slice()].concat(), None)?.0 {}
        let ours = if table == "nat" { POSTRTG_CHAIN } else { FWD_CHAIN };
        run("iptables", &["-t", table, "-F", ours], None)?;
        run("iptables", &["-t", table, "-X", ours], None)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_matches_golden() {
        let got = render("10.244.0.0/16".parse().unwrap(), "10.244.1.0/24".parse().unwrap());
        let golden = include_str!("../testdata/ipmasq.golden");
        assert_eq!(got, golden, "regenerate agent/testdata/ipmasq.golden if the change is intended");
    }

    #[test]
    fn in_sync_needs_exact_rules_and_jumps() {
        let (n, s) = ("10.244.0.0/16".parse().unwrap(), "10.244.1.0/24".parse().unwrap());
        let rules: Vec<String> = chain_rules(n, s).into_iter().flat_map(|(_, r)| r).collect();
        let jumps = "-A POSTROUTING -m comment --comment \"weft masq\" -j WEFT-POSTRTG\n-A FORWARD -m comment --comment \"weft forward\" -j WEFT-FWD\n";
        let full = format!("{jumps}{}\n", rules.join("\n"));
        // iptables-save prints the filter table before nat.
        let saved_order = format!("{}\n{}\n{jumps}", rules[6..].join("\n"), rules[..6].join("\n"));
        assert!(in_sync(&saved_order, n, s));
        assert!(in_sync(&full, n, s));
        assert!(!in_sync(&rules.join("\n"), n, s), "jumps missing");
        let other_subnet = "10.244.2.0/24".parse().unwrap();
        assert!(!in_sync(&full, n, other_subnet), "rules for another subnet");
        let missing_one = full.replacen(&format!("{}\n", rules[1]), "", 1);
        assert!(!in_sync(&missing_one, n, s), "a rule deleted by hand");
    }
}
