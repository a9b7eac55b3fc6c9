//! Subnet allocation, pure: which `/SubnetLen` subnets of the network are free, and which one a node
//! should try next. Lazy over the candidate range so a /8 of /24s with thousands of leases stays cheap.

use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use rand::Rng;

use crate::config::NetworkConfig;

/// How many free subnets a node picks from at random; flannel uses 100, which spreads nodes that
/// start at the same instant apart so their create transactions rarely collide.
pub const PICK_AMONG: usize = 100;

/// Iterator over the free subnets of a network, in address order from `SubnetMin` to `SubnetMax`.
#[derive(Debug, Clone)]
pub struct FreeSubnets {
    /// Next candidate's network address (u64 so stepping past 255.255.255.x cannot overflow).
    next: u64,
    last: u64,
    size: u64,
    len: u8,
    /// Taken address ranges `[start, end]`, sorted and merged.
    taken: Vec<(u64, u64)>,
    /// Index of the first taken range that may still overlap a candidate at or after `next`.
    cursor: usize,
}

impl Iterator for FreeSubnets {
    type Item = Ipv4Network;

    fn next(&mut self) -> Option<Ipv4Network> {
        while self.next <= self.last {
            let (start, end) = (self.next, self.next + self.size - 1);
            while self.cursor < self.taken.len() && self.taken[self.cursor].1 < start {
                self.cursor += 1;
            }
            match self.taken.get(self.cursor) {
                Some(&(t_start, t_end)) if t_start <= end => {
                    // Jump straight past the taken range to the next aligned candidate.
                    self.next = (t_end + 1).div_ceil(self.size) * self.size;
                }
                _ => {
                    self.next += self.size;
                    let ip = Ipv4Addr::from(u32::try_from(start).ok()?);
                    return Ipv4Network::new(ip, self.len).ok();
                }
            }
        }
        None
    }
}

/// Every `/SubnetLen` between `SubnetMin` and `SubnetMax` that overlaps none of `taken`.
pub fn free_subnets(cfg: &NetworkConfig, taken: &[Ipv4Network]) -> FreeSubnets {
    let size = 1u64 << (32 - u32::from(cfg.subnet_len.min(32)));
    let mut ranges: Vec<(u64, u64)> =
        taken.iter().map(|n| (u64::from(u32::from(n.network())), u64::from(u32::from(n.broadcast())))).collect();
    ranges.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (s, e) in ranges {
        match merged.last_mut() {
            Some(last) if s <= last.1.saturating_add(1) => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    FreeSubnets {
        next: u64::from(u32::from(cfg.subnet_min)),
        last: u64::from(u32::from(cfg.subnet_max)),
        size,
        len: cfg.subnet_len,
        taken: merged,
        cursor: 0,
    }
}

/// A random one of the first [`PICK_AMONG`] free subnets, or `None` when the network is full.
pub fn pick_free_subnet(cfg: &NetworkConfig, taken: &[Ipv4Network], rng: &mut impl Rng) -> Option<Ipv4Network> {
    let first: Vec<Ipv4Network> = free_subnets(cfg, taken).take(PICK_AMONG).collect();
    if first.is_empty() {
        return None;
    }
    first.get(rng.gen_range(0..first.len())).copied()
}

/// Whether `subnet` is one this network may lease: the right length, inside the network, within
/// `[SubnetMin, SubnetMax]`.
pub fn is_leasable(cfg: &NetworkConfig, subnet: Ipv4Network) -> bool {
    subnet.prefix() == cfg.subnet_len
        && cfg.network.contains(subnet.network())
        && subnet.network() == subnet.ip()
        && u32::from(subnet.network()) >= u32::from(cfg.subnet_min)
        && u32::from(subnet.network()) <= u32::from(cfg.subnet_max)
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use rand::rngs::StdRng;
    use rand::SeedableRng;

    use super::*;

    fn cfg(json: &str) -> NetworkConfig {
        NetworkConfig::parse(json.as_bytes()).unwrap()
    }

    fn nets(v: &[&str]) -> Vec<Ipv4Network> {
        v.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn free_subnets_table() {
        struct Case {
            name: &'static str,
            config: &'static str,
            taken: &'static [&'static str],
            first: &'static [&'static str],
            count: usize,
        }
        let cases = [
            Case {
                name: "empty /16 starts after the network's first subnet",
                config: r#"{"Network":"10.244.0.0/16"}"#,
                taken: &[],
                first: &["10.244.1.0/24", "10.244.2.0/24"],
                count: 255,
            },
            Case {
                name: "taken /24s are skipped",
                config: r#"{"Network":"10.244.0.0/16"}"#,
                taken: &["10.244.1.0/24", "10.244.3.0/24"],
                first: &["10.244.2.0/24", "10.244.4.0/24"],
                count: 253,
            },
            Case {
                name: "a wider taken range covers several candidates",
                config: r#"{"Network":"10.244.0.0/16"}"#,
                taken: &["10.244.0.0/22"],
                first: &["10.244.4.0/24"],
                count: 252,
            },
            Case {
                name: "a narrower taken range blocks its whole /24",
                config: r#"{"Network":"10.244.0.0/16"}"#,
                taken: &["10.244.1.128/25", "10.244.2.7/32"],
                first: &["10.244.3.0/24"],
                count: 253,
            },
            Case {
                name: "taken ranges outside the network change nothing",
                config: r#"{"Network":"10.244.0.0/16"}"#,
                taken: &["10.245.1.0/24", "192.168.0.0/16"],
                first: &["10.244.1.0/24"],
                count: 255,
            },
            Case {
                name: "SubnetMin and SubnetMax bound the range",
                config: r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.10.0","SubnetMax":"10.244.12.0"}"#,
                taken: &["10.244.11.0/24"],
                first: &["10.244.10.0/24", "10.244.12.0/24"],
                count: 2,
            },
            Case {
                name: "full network",
                config: r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.10.0","SubnetMax":"10.244.11.0"}"#,
                taken: &["10.244.10.0/24", "10.244.11.0/24"],
                first: &[],
                count: 0,
            },
            Case {
                name: "top of the address space does not overflow",
                config: r#"{"Network":"255.255.255.0/24","SubnetLen":26}"#,
                taken: &["255.255.255.64/26"],
                first: &["255.255.255.128/26", "255.255.255.192/26"],
                count: 2,
            },
        ];
        for c in cases {
            let free: Vec<Ipv4Network> = free_subnets(&cfg(c.config), &nets(c.taken)).collect();
            assert_eq!(free.len(), c.count, "{}", c.name);
            assert_eq!(&free[..c.first.len()], &nets(c.first)[..], "{}", c.name);
            let taken = nets(c.taken);
            for f in &free {
                assert!(!taken.iter().any(|t| t.contains(f.network()) || f.contains(t.network())), "{}: {f}", c.name);
            }
        }
    }

    #[test]
    fn slash8_with_thousands_taken_is_fast_and_exact() {
        let c = cfg(r#"{"Network":"10.0.0.0/8","SubnetLen":24}"#);
        // Every other /24 of the first 4,000, in shuffled order.
        let mut taken: Vec<Ipv4Network> = (0..2000u32)
            .map(|i| Ipv4Network::new(Ipv4Addr::from(0x0a00_0000 + (2 * i + 1) * 256), 24).unwrap())
            .collect();
        taken.reverse();
        let start = std::time::Instant::now();
        let free: Vec<Ipv4Network> = free_subnets(&c, &taken).collect();
        assert!(start.elapsed() < std::time::Duration::from_secs(1), "took {:?}", start.elapsed());
        // 65,535 candidates (10.0.0.0/24 excluded by default SubnetMin) minus 2,000 taken.
        assert_eq!(free.len(), 65_535 - 2_000);
        assert_eq!(free[0], "10.0.2.0/24".parse::<Ipv4Network>().unwrap());
        let taken: HashSet<Ipv4Network> = taken.into_iter().collect();
        assert!(free.iter().all(|f| !taken.contains(f)));
    }

    #[test]
    fn pick_is_among_the_first_hundred_free() {
        let c = cfg(r#"{"Network":"10.244.0.0/16"}"#);
        let taken = nets(&["10.244.1.0/24", "10.244.2.0/24"]);
        let allowed: HashSet<Ipv4Network> = free_subnets(&c, &taken).take(PICK_AMONG).collect();
        let mut rng = StdRng::seed_from_u64(7);
        let picks: HashSet<Ipv4Network> = (0..500).map(|_| pick_free_subnet(&c, &taken, &mut rng).unwrap()).collect();
        assert!(picks.is_subset(&allowed));
        // Random, not always the lowest: concurrent nodes must spread out.
        assert!(picks.len() > 50, "only {} distinct picks", picks.len());
    }

    #[test]
    fn pick_on_full_network_is_none() {
        let c = cfg(r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.10.0","SubnetMax":"10.244.10.0"}"#);
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(pick_free_subnet(&c, &nets(&["10.244.10.0/24"]), &mut rng), None);
        assert_eq!(pick_free_subnet(&c, &[], &mut rng), Some("10.244.10.0/24".parse().unwrap()));
    }

    #[test]
    fn leasable_table() {
        let c = cfg(r#"{"Network":"10.244.0.0/16","SubnetMax":"10.244.200.0"}"#);
        let cases = [
            ("10.244.5.0/24", true),
            ("10.244.0.0/24", false),   // below the default SubnetMin
            ("10.244.201.0/24", false), // above SubnetMax
            ("10.244.5.0/25", false),   // wrong length
            ("10.245.5.0/24", false),   // outside the network
        ];
        for (n, want) in cases {
            assert_eq!(is_leasable(&c, n.parse().unwrap()), want, "{n}");
        }
    }
}
