//! Leader election on an etcd lease: the leader holds a coordination.k8s.io/v1 Lease object at
//! `/registry/leases/<namespace>/<name>`, written with create-if-absent in a transaction and attached to an etcd
//! lease whose TTL is the lease duration, so that it vanishes when its holder stops renewing. The holder renews
//! every retry period and counts itself leader only until `renew deadline` after its last successful renewal,
//! which is shorter than the TTL: a paused or partitioned leader stops acting before anyone else can start.
//! Touches only that one key and its etcd lease.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, PutOptions, Txn, TxnOp};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use tokio::time::Instant;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("leader election: etcd {op} {key}")]
    Etcd { op: &'static str, key: String, source: etcd_client::Error },
    #[error("leader election lost: {0}")]
    Lost(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, Clone)]
pub struct Config {
    pub namespace: String,
    pub name: String,
    /// Who we are, as the Lease's holderIdentity shows it.
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

impl Config {
    pub fn key(&self) -> String {
        format!("{}/leases/{}/{}", weft_api::store::REGISTRY, self.namespace, self.name)
    }
}

/// Whether we may act now: always without election, else until the renew deadline after the last renewal, and
/// never again once stopped. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Leadership {
    /// None: no election.
    until: Arc<Mutex<Option<Instant>>>,
    stopped: Arc<std::sync::atomic::AtomicBool>,
}

impl Leadership {
    pub fn always() -> Leadership {
        Leadership { until: Arc::new(Mutex::new(None)), stopped: Arc::default() }
    }

    fn until(t: Instant) -> Leadership {
        Leadership { until: Arc::new(Mutex::new(Some(t))), stopped: Arc::default() }
    }

    pub fn is_leader(&self) -> bool {
        if self.stopped.load(std::sync::atomic::Ordering::SeqCst) {
            return false;
        }
        match *self.until.lock().unwrap_or_else(|p| p.into_inner()) {
            None => true,
            Some(t) => Instant::now() < t,
        }
    }

    /// Stops acting for good (before the lease is released on shutdown).
    pub fn stop(&self) {
        self.stopped.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn deadline(&self) -> Option<Instant> {
        *self.until.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn extend(&self, t: Instant) {
        *self.until.lock().unwrap_or_else(|p| p.into_inner()) = Some(t);
    }
}

/// A held leadership: renew it with `keep`, give it up with `release`.
pub struct Elected {
    client: Client,
    config: Config,
    lease_id: i64,
    lease: Lease,
    leadership: Leadership,
}

fn etcd<'a>(op: &'static str, key: &'a str) -> impl FnOnce(etcd_client::Error) -> Error + 'a {
    move |source| Error::Etcd { op, key: key.to_string(), source }
}

fn lease_object(config: &Config, transitions: i32) -> Lease {
    let now = MicroTime(weft_api::store::now_timestamp());
    Lease {
        metadata: ObjectMeta {
            name: Some(config.name.clone()),
            namespace: Some(config.namespace.clone()),
            uid: Some(weft_api::store::new_uid()),
            creation_timestamp: Some(weft_api::store::now()),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(config.identity.clone()),
            lease_duration_seconds: Some(config.lease_duration.as_secs().max(1) as i32),
            acquire_time: Some(now.clone()),
            renew_time: Some(now),
            lease_transitions: Some(transitions),
            ..Default::default()
        }),
    }
}

/// Tries until this process holds the lease. Logs who holds it meanwhile.
pub async fn acquire(client: Client, config: Config) -> Result<Elected> {
    let key = config.key();
    let mut last_holder = None;
    let mut transitions = 0;
    loop {
        let start = Instant::now();
        match try_acquire(&client, &config, transitions).await {
            Ok(Ok((lease_id, lease))) => {
                tracing::info!(identity = %config.identity, lease = %key, "became leader");
                let leadership = Leadership::until(start + config.renew_deadline);
                return Ok(Elected { client, config, lease_id, lease, leadership });
            }
            Ok(Err(holder)) => {
                if let Some(h) = holder.as_ref().and_then(|l| l.spec.as_ref()) {
                    transitions = h.lease_transitions.unwrap_or(0) + 1;
                    if last_holder.as_ref() != h.holder_identity.as_ref() {
                        tracing::info!(holder = ?h.holder_identity, lease = %key, "another controller is leader; waiting");
                        last_holder = h.holder_identity.clone();
                    }
                }
            }
            Err(e) => tracing::warn!(error = %weft_api::error_chain(&e), "leader election attempt failed"),
        }
        tokio::time::sleep(config.retry_period).await;
    }
}

/// Ok(Ok(..)) when acquired; Ok(Err(current holder)) when someone else holds it.
async fn try_acquire(
    client: &Client,
    config: &Config,
    transitions: i32,
) -> Result<std::result::Result<(i64, Lease), Option<Lease>>> {
    let key = config.key();
    let mut c = client.clone();
    let ttl = config.lease_duration.as_secs().max(1) as i64;
    let grant = c.lease_grant(ttl, None).await.map_err(etcd("lease grant", &key))?;
    let lease = lease_object(config, transitions);
    let value = serde_json::to_vec(&lease).unwrap_or_default();
    let txn = Txn::new()
        .when([Compare::version(key.as_str(), CompareOp::Equal, 0)])
        .and_then([TxnOp::put(key.as_str(), value, Some(PutOptions::new().with_lease(grant.id())))])
        .or_else([TxnOp::get(key.as_str(), None)]);
    let resp = c.txn(txn).await.map_err(etcd("txn", &key))?;
    if resp.succeeded() {
        return Ok(Ok((grant.id(), lease)));
    }
    let _ = c.lease_revoke(grant.id()).await;
    let holder = resp.op_responses().into_iter().find_map(|r| match r {
        etcd_client::TxnOpResponse::Get(g) => g.kvs().first().and_then(|kv| serde_json::from_slice(kv.value()).ok()),
        _ => None,
    });
    Ok(Err(holder))
}

impl Elected {
    pub fn leadership(&self) -> Leadership {
        self.leadership.clone()
    }

    /// Renews every retry period until a renewal cannot be completed within the renew deadline, then returns the
    /// reason: the caller must stop acting (the daemon exits, as kube-controller-manager does).
    pub async fn keep(mut self) -> Error {
        let key = self.config.key();
        let (mut keeper, mut stream) = match self.client.lease_keep_alive(self.lease_id).await {
            Ok(k) => k,
            Err(e) => return Error::Lost(format!("keep-alive on {key}: {e}")),
        };
        loop {
            tokio::time::sleep(self.config.retry_period).await;
            let start = Instant::now();
            let Some(deadline) = self.leadership.deadline() else { return Error::Lost("no deadline".into()) };
            let renewed = tokio::time::timeout_at(deadline, self.renew(&mut keeper, &mut stream)).await;
            match renewed {
                Ok(Ok(())) => self.leadership.extend(start + self.config.renew_deadline),
                Ok(Err(e)) if matches!(e, Error::Lost(_)) => return e,
                Ok(Err(e)) => {
                    tracing::warn!(error = %weft_api::error_chain(&e), "renewing leadership failed; retrying");
                    if Instant::now() >= deadline {
                        return Error::Lost(format!("no renewal of {key} within the renew deadline"));
                    }
                }
                Err(_) => return Error::Lost(format!("no renewal of {key} within the renew deadline")),
            }
        }
    }

    async fn renew(
        &mut self,
        keeper: &mut etcd_client::LeaseKeeper,
        stream: &mut etcd_client::LeaseKeepAliveStream,
    ) -> Result<()> {
        let key = self.config.key();
        keeper.keep_alive().await.map_err(etcd("lease keep-alive", &key))?;
        match stream.message().await.map_err(etcd("lease keep-alive", &key))? {
            Some(r) if r.ttl() > 0 => {}
            _ => return Err(Error::Lost(format!("the etcd lease of {key} expired"))),
        }
        // The key must still be ours (deleted by hand, or the lease expired and someone else took it).
        if let Some(spec) = self.lease.spec.as_mut() {
            spec.renew_time = Some(MicroTime(weft_api::store::now_timestamp()));
        }
        let value = serde_json::to_vec(&self.lease).unwrap_or_default();
        let txn = Txn::new()
            .when([Compare::lease(key.as_str(), CompareOp::Equal, self.lease_id)])
            .and_then([TxnOp::put(key.as_str(), value, Some(PutOptions::new().with_lease(self.lease_id)))]);
        let resp = self.client.txn(txn).await.map_err(etcd("txn", &key))?;
        if !resp.succeeded() {
            return Err(Error::Lost(format!("{key} is no longer held by this process")));
        }
        Ok(())
    }

    /// Gives the lease up at once (on a clean shutdown) so a standby takes over without waiting for the TTL.
    pub async fn release(client: &mut Client, lease_id: i64) {
        let _ = client.lease_revoke(lease_id).await;
    }

    pub fn lease_id(&self) -> i64 {
        self.lease_id
    }

    pub fn client(&self) -> Client {
        self.client.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn leadership_lasts_until_the_renew_deadline_and_never_after_stop() {
        let l = Leadership::until(Instant::now() + Duration::from_secs(2));
        assert!(l.is_leader());
        tokio::time::advance(Duration::from_millis(1999)).await;
        assert!(l.is_leader());
        tokio::time::advance(Duration::from_millis(2)).await;
        assert!(!l.is_leader(), "past the renew deadline: stop acting even before anyone else can start");
        l.extend(Instant::now() + Duration::from_secs(2));
        assert!(l.is_leader(), "a renewal extends it");
        l.clone().stop();
        assert!(!l.is_leader(), "stopped for good, in every clone");
        l.extend(Instant::now() + Duration::from_secs(2));
        assert!(!l.is_leader());
        let always = Leadership::always();
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert!(always.is_leader());
    }

    #[test]
    fn the_lease_lives_under_the_registry() {
        let c = Config {
            namespace: "kube-system".into(),
            name: "weft-controller".into(),
            identity: "me".into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        };
        assert_eq!(c.key(), "/registry/leases/kube-system/weft-controller");
        let l = lease_object(&c, 3);
        let spec = l.spec.unwrap();
        assert_eq!(
            (spec.holder_identity.as_deref(), spec.lease_duration_seconds, spec.lease_transitions),
            (Some("me"), Some(15), Some(3))
        );
    }
}
