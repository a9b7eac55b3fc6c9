//! Subnet leases in etcd, the way flanneld keeps them: acquire (reuse ours, reclaim the previous one,
//! or race for a random free one with a create-if-absent transaction), renew, and watch everyone's.
//! It touches only keys under `<prefix>/` and the etcd leases it grants. Validation of what others wrote is pure.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::sync::Mutex;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, EventType, GetOptions, PutOptions, Txn, TxnOp, WatchOptions, WatchStream, Watcher,
};
use ipnetwork::Ipv4Network;
use tracing::{debug, info, warn};

use crate::alloc::{is_leasable, pick_free_subnet};
use crate::config::{ConfigError, NetworkConfig, RawConfig};
use crate::lease::{config_key, parse_subnet_key_name, subnet_key, subnets_prefix, Lease, LeaseAttrs};

/// How many lost create races `acquire` tolerates before giving up; each retry relists, so this
/// only runs out when many nodes keep colliding on the same few free subnets.
pub const ACQUIRE_TRIES: u32 = 10;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("etcd {op} failed: {source}")]
    Etcd {
        op: &'static str,
        #[source]
        source: etcd_client::Error,
    },
    #[error("network config {key} is missing in etcd")]
    ConfigMissing { key: String },
    #[error("network config in etcd: {0}")]
    Config(#[from] ConfigError),
    #[error("encoding {what}: {source}")]
    Encode {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("no free subnet left in {network}")]
    NoFreeSubnet { network: Ipv4Network },
    #[error("the lease on {subnet} was lost (deleted, expired or taken by another node)")]
    LeaseLost { subnet: Ipv4Network },
    #[error("watch history was compacted at revision {revision}: relist and watch again")]
    Compacted { revision: i64 },
    #[error("etcd closed the watch stream")]
    WatchClosed,
    #[error("gave up acquiring a subnet after losing {tries} races")]
    Contention { tries: u32 },
}

impl Error {
    pub fn is_lease_lost(&self) -> bool {
        matches!(self, Error::LeaseLost { .. })
    }

    pub fn is_compacted(&self) -> bool {
        matches!(self, Error::Compacted { .. })
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn etcd(op: &'static str) -> impl FnOnce(etcd_client::Error) -> Error {
    move |source| Error::Etcd { op, source }
}

#[derive(Debug, Clone)]
enum Entry {
    Lease(Lease),
    Bad { mod_revision: i64, reason: String },
}

/// The raw contents of `<prefix>/subnets/`, each key parsed or kept with the reason it is unusable.
/// Kept raw so a watch can apply puts and deletes; what counts as valid depends on the config.
#[derive(Debug, Default)]
pub struct LeaseTable {
    entries: BTreeMap<String, Entry>,
    /// Last (mod_revision, reason) warned about per key, so a bad key is logged once, not on every resync.
    warned: Mutex<HashMap<String, (i64, String)>>,
}

impl LeaseTable {
    pub fn new() -> LeaseTable {
        LeaseTable::default()
    }

    pub fn apply_put(&mut self, key: &str, value: &[u8], etcd_lease: i64, mod_revision: i64, create_revision: i64) {
        let name = key.rsplit('/').next().unwrap_or(key);
        let entry = match parse_subnet_key_name(name) {
            Err(reason) => Entry::Bad { mod_revision, reason: format!("key: {reason}") },
            Ok(subnet) => match serde_json::from_slice::<LeaseAttrs>(value) {
                Err(e) => Entry::Bad { mod_revision, reason: format!("value is not a lease: {e}") },
                Ok(attrs) => Entry::Lease(Lease { subnet, attrs, etcd_lease, mod_revision, create_revision }),
            },
        };
        self.entries.insert(key.to_string(), entry);
    }

    pub fn apply_delete(&mut self, key: &str) {
        self.entries.remove(key);
        self.warned.lock().unwrap_or_else(|p| p.into_inner()).remove(key);
    }

    pub fn apply(&mut self, event: &WatchEvent) {
        match event {
            WatchEvent::Put { key, value, lease, mod_revision, create_revision } => {
                self.apply_put(key, value, *lease, *mod_revision, *create_revision)
            }
            WatchEvent::Delete { key, .. } => self.apply_delete(key),
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Every well-formed lease, fitting the config or not.
    pub fn leases(&self) -> impl Iterator<Item = &Lease> {
        self.entries.values().filter_map(|e| match e {
            Entry::Lease(l) => Some(l),
            Entry::Bad { .. } => None,
        })
    }

    /// Every subnet that has a key, usable or not: a node must never create over someone's key,
    /// even one we cannot read.
    pub fn taken(&self) -> Vec<Ipv4Network> {
        self.entries
            .iter()
            .filter_map(|(key, e)| match e {
                Entry::Lease(l) => Some(l.subnet),
                Entry::Bad { .. } => parse_subnet_key_name(key.rsplit('/').next().unwrap_or(key)).ok(),
            })
            .collect()
    }

    /// The leases usable under `cfg`, ordered by subnet. Skipped entries are logged once per revision.
    pub fn valid(&self, cfg: &NetworkConfig) -> Vec<Lease> {
        self.classify(cfg).0
    }

    /// `(key, reason)` for each entry `valid` leaves out.
    pub fn skipped(&self, cfg: &NetworkConfig) -> Vec<(String, String)> {
        self.classify(cfg).1
    }

    fn classify(&self, cfg: &NetworkConfig) -> (Vec<Lease>, Vec<(String, String)>) {
        let mut skipped: Vec<(String, i64, String)> = Vec::new();
        let mut fitting: Vec<(&String, &Lease)> = Vec::new();
        for (key, e) in &self.entries {
            match e {
                Entry::Bad { mod_revision, reason } => skipped.push((key.clone(), *mod_revision, reason.clone())),
                Entry::Lease(l) if l.subnet.prefix() != cfg.subnet_len => skipped.push((
                    key.clone(),
                    l.mod_revision,
                    format!("{} is a /{} but SubnetLen is {}", l.subnet, l.subnet.prefix(), cfg.subnet_len),
                )),
                Entry::Lease(l) if !cfg.network.contains(l.subnet.network()) => skipped.push((
                    key.clone(),
                    l.mod_revision,
                    format!("{} is outside Network {}", l.subnet, cfg.network),
                )),
                Entry::Lease(l) => fitting.push((key, l)),
            }
        }
        // Two leases claiming one PublicIP would route one subnet to the wrong node; the older one wins.
        let mut owner: HashMap<Ipv4Addr, (i64, &String, &Lease)> = HashMap::new();
        for &(key, l) in &fitting {
            let cand = (l.create_revision, key, l);
            owner
                .entry(l.attrs.public_ip)
                .and_modify(|cur| {
                    if (cand.0, cand.1) < (cur.0, cur.1) {
                        *cur = cand;
                    }
                })
                .or_insert(cand);
        }
        let mut valid = Vec::with_capacity(fitting.len());
        for (key, l) in fitting {
            match owner.get(&l.attrs.public_ip) {
                Some(&(_, winner_key, winner)) if winner_key != key => skipped.push((
                    key.clone(),
                    l.mod_revision,
                    format!("PublicIP {} already holds {} (an older lease)", l.attrs.public_ip, winner.subnet),
                )),
                _ => valid.push(l.clone()),
            }
        }
        valid.sort_by_key(|l| (u32::from(l.subnet.network()), l.subnet.prefix()));
        self.warn_once(&skipped);
        (valid, skipped.into_iter().map(|(k, _, r)| (k, r)).collect())
    }

    fn warn_once(&self, skipped: &[(String, i64, String)]) {
        let mut warned = self.warned.lock().unwrap_or_else(|p| p.into_inner());
        for (key, rev, reason) in skipped {
            let seen = warned.get(key).is_some_and(|(r, why)| r == rev && why == reason);
            if !seen {
                warn!(key = %key, mod_revision = rev, "skipping subnet lease: {reason}");
                warned.insert(key.clone(), (*rev, reason.clone()));
            }
        }
    }
}

/// One change under `<prefix>/subnets/`, raw: validation happens when it is applied to a [`LeaseTable`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    Put { key: String, value: Vec<u8>, lease: i64, mod_revision: i64, create_revision: i64 },
    Delete { key: String, mod_revision: i64 },
}

/// A watch on `<prefix>/subnets/`. The `Watcher` is held because dropping it ends the request
/// stream, and etcd then closes the watch.
pub struct LeaseWatch {
    _watcher: Watcher,
    stream: WatchStream,
    revision: i64,
}

impl LeaseWatch {
    /// The next batch of events (never empty). `Compacted` means history is gone: relist, then watch
    /// from the list's revision + 1. Any other error means the stream broke: retry with backoff.
    pub async fn next(&mut self) -> Result<Vec<WatchEvent>> {
        loop {
            let resp = self.stream.message().await.map_err(etcd("watch"))?.ok_or(Error::WatchClosed)?;
            if resp.compact_revision() > 0 || resp.canceled() {
                return Err(Error::Compacted { revision: resp.compact_revision() });
            }
            let mut out = Vec::with_capacity(resp.events().len());
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                self.revision = self.revision.max(kv.mod_revision());
                out.push(match ev.event_type() {
                    EventType::Put => WatchEvent::Put {
                        key,
                        value: kv.value().to_vec(),
                        lease: kv.lease(),
                        mod_revision: kv.mod_revision(),
                        create_revision: kv.create_revision(),
                    },
                    EventType::Delete => WatchEvent::Delete { key, mod_revision: kv.mod_revision() },
                });
            }
            if !out.is_empty() {
                return Ok(out);
            }
        }
    }

    /// The revision of the last event delivered; after a broken stream, watch again from this + 1.
    pub fn revision(&self) -> i64 {
        self.revision
    }
}

/// Acquires, renews and watches subnet leases under one etcd prefix (`/coreos.com/network` for flannel).
pub struct SubnetManager {
    client: Client,
    prefix: String,
}

/// flannel's compatibility test for an existing lease: inside the network, of the configured length.
fn fits(cfg: &NetworkConfig, subnet: Ipv4Network) -> bool {
    subnet.prefix() == cfg.subnet_len && cfg.network.contains(subnet.network())
}

fn ttl_secs(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX).max(1)
}

fn header_revision(h: Option<&etcd_client::ResponseHeader>) -> i64 {
    h.map(|h| h.revision()).unwrap_or(0)
}

impl SubnetManager {
    pub fn new(client: Client, prefix: impl Into<String>) -> SubnetManager {
        SubnetManager { client, prefix: prefix.into().trim_end_matches('/').to_string() }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn key(&self, subnet: Ipv4Network) -> String {
        subnet_key(&self.prefix, subnet)
    }

    pub async fn get_config(&mut self) -> Result<NetworkConfig> {
        let key = config_key(&self.prefix);
        let resp = self.client.get(key.as_str(), None).await.map_err(etcd("get config"))?;
        let kv = resp.kvs().first().ok_or(Error::ConfigMissing { key })?;
        Ok(NetworkConfig::parse(kv.value())?)
    }

    pub async fn put_config(&mut self, raw: &RawConfig) -> Result<()> {
        let json = serde_json::to_string(raw).map_err(|source| Error::Encode { what: "network config", source })?;
        self.client.put(config_key(&self.prefix), json, None).await.map_err(etcd("put config"))?;
        Ok(())
    }

    /// Every key under `<prefix>/subnets/` and the revision of the read, to watch from revision + 1.
    pub async fn list(&mut self) -> Result<(LeaseTable, i64)> {
        let resp = self
            .client
            .get(subnets_prefix(&self.prefix), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(etcd("list subnets"))?;
        let mut table = LeaseTable::new();
        for kv in resp.kvs() {
            let key = String::from_utf8_lossy(kv.key());
            table.apply_put(&key, kv.value(), kv.lease(), kv.mod_revision(), kv.create_revision());
        }
        Ok((table, header_revision(resp.header())))
    }

    /// flannel's rules: reuse the lease holding our PublicIP; else reclaim `previous` (from subnet.env)
    /// when it is still leasable and free; else race for a random free subnet. Creation is a
    /// create-if-absent transaction, so two nodes never get one subnet; the loser relists and retries.
    pub async fn acquire(
        &mut self,
        cfg: &NetworkConfig,
        attrs: &LeaseAttrs,
        previous: Option<Ipv4Network>,
        ttl: Duration,
    ) -> Result<Lease> {
        for attempt in 1..=ACQUIRE_TRIES {
            let (table, _) = self.list().await?;
            if let Some(mine) = table.valid(cfg).into_iter().find(|l| l.attrs.public_ip == attrs.public_ip) {
                match self.rebind(&mine, attrs, ttl).await? {
                    Some(l) => {
                        info!(subnet = %l.subnet, reservation = l.is_reservation(), "reusing our subnet lease");
                        return Ok(l);
                    }
                    None => {
                        debug!(subnet = %mine.subnet, attempt, "our lease changed while reusing it, relisting");
                        continue;
                    }
                }
            }
            // flannel: a lease of ours that no longer fits the config (the network changed) is deleted,
            // not left to block its subnet and confuse peers for up to a day. Reservations are the operator's.
            for stale in table.leases().filter(|l| l.attrs.public_ip == attrs.public_ip && !l.is_reservation()) {
                if !fits(cfg, stale.subnet) {
                    info!(subnet = %stale.subnet, network = %cfg.network, "deleting our lease that no longer fits the network");
                    self.delete_if_unchanged(stale).await?;
                }
            }
            let taken = table.taken();
            let free = |n: Ipv4Network| !taken.iter().any(|t| t.contains(n.network()) || n.contains(t.network()));
            let subnet = match previous.filter(|p| is_leasable(cfg, *p) && free(*p)) {
                Some(p) => p,
                None => {
                    let picked = pick_free_subnet(cfg, &taken, &mut rand::thread_rng());
                    picked.ok_or(Error::NoFreeSubnet { network: cfg.network })?
                }
            };
            if let Some(l) = self.create(subnet, attrs, ttl).await? {
                info!(subnet = %l.subnet, reclaimed = previous == Some(subnet), "acquired subnet lease");
                return Ok(l);
            }
            debug!(%subnet, attempt, "another node created this subnet first, relisting");
        }
        Err(Error::Contention { tries: ACQUIRE_TRIES })
    }

    /// Creates `subnet` bound to a fresh etcd lease, only if no key exists. `None` when another node won.
    async fn create(&mut self, subnet: Ipv4Network, attrs: &LeaseAttrs, ttl: Duration) -> Result<Option<Lease>> {
        let key = self.key(subnet);
        let id = self.client.lease_grant(ttl_secs(ttl), None).await.map_err(etcd("lease grant"))?.id();
        let txn = Txn::new().when([Compare::version(key.as_str(), CompareOp::Equal, 0)]).and_then([TxnOp::put(
            key.as_str(),
            attrs.to_json(),
            Some(PutOptions::new().with_lease(id)),
        )]);
        let resp = match self.client.txn(txn).await {
            Ok(r) => r,
            Err(e) => {
                self.revoke_quietly(id).await;
                return Err(Error::Etcd { op: "create subnet", source: e });
            }
        };
        if !resp.succeeded() {
            self.revoke_quietly(id).await;
            return Ok(None);
        }
        let rev = header_revision(resp.header());
        Ok(Some(Lease { subnet, attrs: attrs.clone(), etcd_lease: id, mod_revision: rev, create_revision: rev }))
    }

    /// Re-puts `existing` with `attrs`, on a fresh etcd lease (a reservation stays without one), only
    /// if the key is unchanged since we read it. `None` when it changed. The old etcd lease is revoked.
    async fn rebind(&mut self, existing: &Lease, attrs: &LeaseAttrs, ttl: Duration) -> Result<Option<Lease>> {
        let key = self.key(existing.subnet);
        let id = if existing.is_reservation() {
            0
        } else {
            self.client.lease_grant(ttl_secs(ttl), None).await.map_err(etcd("lease grant"))?.id()
        };
        let opts = (id != 0).then(|| PutOptions::new().with_lease(id));
        let txn = Txn::new()
            .when([Compare::mod_revision(key.as_str(), CompareOp::Equal, existing.mod_revision)])
            .and_then([TxnOp::put(key.as_str(), attrs.to_json(), opts)]);
        let resp = match self.client.txn(txn).await {
            Ok(r) => r,
            Err(e) => {
                self.revoke_quietly(id).await;
                return Err(Error::Etcd { op: "update subnet", source: e });
            }
        };
        if !resp.succeeded() {
            self.revoke_quietly(id).await;
            return Ok(None);
        }
        if existing.etcd_lease != 0 && existing.etcd_lease != id {
            // The key now lives on the new lease; the old one would otherwise linger until its TTL.
            self.revoke_quietly(existing.etcd_lease).await;
        }
        Ok(Some(Lease {
            subnet: existing.subnet,
            attrs: attrs.clone(),
            etcd_lease: id,
            mod_revision: header_revision(resp.header()),
            create_revision: existing.create_revision,
        }))
    }

    async fn delete_if_unchanged(&mut self, lease: &Lease) -> Result<()> {
        let key = self.key(lease.subnet);
        let txn = Txn::new()
            .when([Compare::mod_revision(key.as_str(), CompareOp::Equal, lease.mod_revision)])
            .and_then([TxnOp::delete(key.as_str(), None)]);
        // Revoking would delete the key too, so only once we know the key we read is gone.
        if self.client.txn(txn).await.map_err(etcd("delete subnet"))?.succeeded() {
            self.revoke_quietly(lease.etcd_lease).await;
        }
        Ok(())
    }

    async fn revoke_quietly(&mut self, id: i64) {
        if id == 0 {
            return;
        }
        if let Err(e) = self.client.lease_revoke(id).await {
            // Harmless: an unrevoked lease expires at its TTL, and an expired one is already gone.
            debug!(lease = id, "revoking etcd lease: {e}");
        }
    }

    /// Reads the key of `lease` again: `Some` (the current lease) when it still holds our PublicIP.
    async fn reread_ours(&mut self, lease: &Lease, public_ip: Ipv4Addr) -> Result<Option<Lease>> {
        let resp = self.client.get(self.key(lease.subnet), None).await.map_err(etcd("get subnet"))?;
        let Some(kv) = resp.kvs().first() else {
            return Ok(None);
        };
        match serde_json::from_slice::<LeaseAttrs>(kv.value()) {
            Ok(attrs) if attrs.public_ip == public_ip => Ok(Some(Lease {
                subnet: lease.subnet,
                attrs,
                etcd_lease: kv.lease(),
                mod_revision: kv.mod_revision(),
                create_revision: kv.create_revision(),
            })),
            _ => Ok(None),
        }
    }

    /// Moves our key to a fresh etcd lease with `ttl`, if it is still ours, and revokes the old lease.
    /// A reservation needs nothing. `LeaseLost` when the key is gone or holds another node's PublicIP.
    pub async fn renew(&mut self, lease: &Lease, attrs: &LeaseAttrs, ttl: Duration) -> Result<Lease> {
        if lease.is_reservation() {
            return Ok(lease.clone());
        }
        let mut current = lease.clone();
        // A changed key that is still ours (e.g. an operator rewrote it) is retried, a few times at most.
        for _ in 0..3 {
            if let Some(l) = self.rebind(&current, attrs, ttl).await? {
                return Ok(l);
            }
            match self.reread_ours(&current, attrs.public_ip).await? {
                Some(now) => current = now,
                None => return Err(Error::LeaseLost { subnet: lease.subnet }),
            }
        }
        Err(Error::LeaseLost { subnet: lease.subnet })
    }

    /// Rewrites our lease's value (e.g. a new VtepMAC) keeping its etcd lease, if the key is still ours.
    pub async fn update_attrs(&mut self, lease: &Lease, attrs: &LeaseAttrs) -> Result<Lease> {
        let key = self.key(lease.subnet);
        let opts = (lease.etcd_lease != 0).then(|| PutOptions::new().with_lease(lease.etcd_lease));
        let txn = Txn::new()
            .when([Compare::mod_revision(key.as_str(), CompareOp::Equal, lease.mod_revision)])
            .and_then([TxnOp::put(key.as_str(), attrs.to_json(), opts)]);
        let resp = self.client.txn(txn).await.map_err(etcd("update subnet"))?;
        if !resp.succeeded() {
            return Err(Error::LeaseLost { subnet: lease.subnet });
        }
        Ok(Lease { attrs: attrs.clone(), mod_revision: header_revision(resp.header()), ..lease.clone() })
    }

    /// Remaining TTL of an etcd lease; `None` for a reservation (0) or a lease that has expired.
    pub async fn time_to_live(&mut self, etcd_lease: i64) -> Result<Option<Duration>> {
        if etcd_lease == 0 {
            return Ok(None);
        }
        let resp = self.client.lease_time_to_live(etcd_lease, None).await.map_err(etcd("lease time-to-live"))?;
        Ok(u64::try_from(resp.ttl()).ok().map(Duration::from_secs))
    }

    /// Watches `<prefix>/subnets/` from `from_revision` (inclusive; 0 = from now).
    pub async fn watch(&mut self, from_revision: i64) -> Result<LeaseWatch> {
        let opts = WatchOptions::new().with_prefix().with_start_revision(from_revision);
        let (watcher, stream) =
            self.client.watch(subnets_prefix(&self.prefix), Some(opts)).await.map_err(etcd("watch"))?;
        Ok(LeaseWatch { _watcher: watcher, stream, revision: (from_revision - 1).max(0) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::Mac;

    fn cfg() -> NetworkConfig {
        NetworkConfig::parse(br#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#).unwrap()
    }

    fn attrs(ip: &str) -> String {
        LeaseAttrs::vxlan(ip.parse().unwrap(), 1, Mac([2, 0, 0, 0, 0, 1])).to_json()
    }

    const P: &str = "/coreos.com/network/subnets/";

    #[test]
    fn validation_table() {
        struct Put {
            name: &'static str,
            value: String,
            create: i64,
        }
        let put = |name, value: String, create| Put { name, value, create };
        /// (case name, entries, expected valid subnets, expected skipped (key name, reason fragment))
        type Case = (&'static str, Vec<Put>, Vec<&'static str>, Vec<(&'static str, &'static str)>);
        let cases: Vec<Case> = vec![
            (
                "good leases are kept in subnet order",
                vec![put("10.244.9.0-24", attrs("192.168.56.12"), 2), put("10.244.3.0-24", attrs("192.168.56.11"), 1)],
                vec!["10.244.3.0/24", "10.244.9.0/24"],
                vec![],
            ),
            (
                "key not of the form 10.244.3.0-24",
                vec![put("10.244.3.0_24", attrs("192.168.56.11"), 1), put("10.244.3.5-24", attrs("192.168.56.12"), 2)],
                vec![],
                vec![("10.244.3.0_24", "not of the form"), ("10.244.3.5-24", "not the network address")],
            ),
            (
                "garbage JSON",
                vec![put("10.244.3.0-24", "{not json".into(), 1), put("10.244.4.0-24", attrs("192.168.56.11"), 2)],
                vec!["10.244.4.0/24"],
                vec![("10.244.3.0-24", "not a lease")],
            ),
            (
                "outside the network or wrong length",
                vec![put("10.245.3.0-24", attrs("192.168.56.11"), 1), put("10.244.8.0-25", attrs("192.168.56.12"), 2)],
                vec![],
                vec![("10.245.3.0-24", "outside Network 10.244.0.0/16"), ("10.244.8.0-25", "SubnetLen is 24")],
            ),
            (
                "duplicate PublicIP: the oldest lease wins",
                vec![
                    put("10.244.3.0-24", attrs("192.168.56.11"), 7),
                    put("10.244.4.0-24", attrs("192.168.56.11"), 5),
                    put("10.244.5.0-24", attrs("192.168.56.12"), 6),
                ],
                vec!["10.244.4.0/24", "10.244.5.0/24"],
                vec![("10.244.3.0-24", "already holds 10.244.4.0/24")],
            ),
        ];
        for (name, puts, want_valid, want_skipped) in cases {
            let mut t = LeaseTable::new();
            for (i, p) in puts.iter().enumerate() {
                t.apply_put(&format!("{P}{}", p.name), p.value.as_bytes(), 100 + i as i64, p.create + 10, p.create);
            }
            let valid: Vec<String> = t.valid(&cfg()).iter().map(|l| l.subnet.to_string()).collect();
            assert_eq!(valid, want_valid, "{name}");
            let skipped = t.skipped(&cfg());
            assert_eq!(skipped.len(), want_skipped.len(), "{name}: {skipped:?}");
            for (key, frag) in want_skipped {
                let hit = skipped.iter().find(|(k, _)| k == &format!("{P}{key}"));
                let (_, reason) = hit.unwrap_or_else(|| panic!("{name}: {key} not skipped: {skipped:?}"));
                assert!(reason.contains(frag), "{name}: {key}: {reason:?} lacks {frag:?}");
            }
            // Every key blocks allocation, usable or not, so no node creates over it.
            assert_eq!(
                t.taken().len(),
                puts.iter().filter(|p| parse_subnet_key_name(p.name).is_ok()).count(),
                "{name}"
            );
        }
    }

    #[test]
    fn lease_fields_come_from_the_put() {
        let mut t = LeaseTable::new();
        t.apply_put(&format!("{P}10.244.3.0-24"), attrs("192.168.56.11").as_bytes(), 0, 12, 11);
        let l = &t.valid(&cfg())[0];
        assert!(l.is_reservation());
        assert_eq!((l.mod_revision, l.create_revision), (12, 11));
        assert_eq!(l.attrs.public_ip, "192.168.56.11".parse::<Ipv4Addr>().unwrap());
    }

    #[test]
    fn delete_and_overwrite_update_the_table() {
        let mut t = LeaseTable::new();
        let k3 = format!("{P}10.244.3.0-24");
        t.apply_put(&k3, b"garbage", 1, 2, 2);
        assert_eq!(t.skipped(&cfg()).len(), 1);
        t.apply_put(&k3, attrs("192.168.56.11").as_bytes(), 1, 3, 2);
        assert_eq!(t.valid(&cfg()).len(), 1);
        assert!(t.skipped(&cfg()).is_empty());
        t.apply(&WatchEvent::Delete { key: k3.clone(), mod_revision: 4 });
        assert!(t.is_empty());
        assert!(t.valid(&cfg()).is_empty());
    }

    #[test]
    fn skips_are_recorded_once_per_revision() {
        let mut t = LeaseTable::new();
        let k = format!("{P}10.244.3.0-24");
        t.apply_put(&k, b"garbage", 1, 5, 5);
        t.valid(&cfg());
        t.valid(&cfg());
        let warned = |t: &LeaseTable| t.warned.lock().unwrap().get(&k).map(|(r, _)| *r);
        assert_eq!(warned(&t), Some(5));
        t.apply_put(&k, b"still garbage", 1, 6, 5);
        t.valid(&cfg());
        assert_eq!(warned(&t), Some(6), "a new revision of a bad key is logged again");
        t.apply_delete(&k);
        assert_eq!(warned(&t), None, "a deleted key is forgotten");
    }
}
