//! The typed object store: Kubernetes objects as their API JSON under `/registry/<resource>/[<namespace>/]<name>`,
//! with `metadata.resourceVersion` = the etcd mod revision. Create, get, list, compare-and-swap update, delete and
//! watch; it touches only keys under `/registry/`.

use std::collections::BTreeMap;
use std::fmt;

use etcd_client::{Client, Compare, CompareOp, EventType, GetOptions, KeyValue, Txn, TxnOp, WatchOptions};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::{ClusterResourceScope, Metadata, NamespaceResourceScope, Resource};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Every key this crate writes starts with this.
pub const REGISTRY: &str = "/registry";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{kind} \"{key}\" not found")]
    NotFound { kind: &'static str, key: ObjectKey },
    #[error("{kind} \"{key}\" already exists")]
    AlreadyExists { kind: &'static str, key: ObjectKey },
    #[error(
        "{kind} \"{key}\": the object has been modified (resourceVersion {expected}, now {actual}); \
         apply your changes to the latest version and try again"
    )]
    Conflict { kind: &'static str, key: ObjectKey, expected: String, actual: i64 },
    /// An allocation key (e.g. a ClusterIP) that a write meant to claim is held by another object.
    #[error("{key} is already allocated")]
    Claimed { key: String },
    #[error("{kind} \"{key}\": {reason}")]
    Invalid { kind: &'static str, key: ObjectKey, reason: String },
    #[error("etcd {op} {key}")]
    Etcd { op: &'static str, key: String, source: etcd_client::Error },
    #[error("encoding {kind} \"{key}\"")]
    Encode { kind: &'static str, key: ObjectKey, source: serde_json::Error },
    #[error("decoding {key:?}")]
    Decode { key: String, source: serde_json::Error },
    /// A stored value a reader refuses: it decodes, but is not what a valid write would have stored.
    #[error("{key:?} is invalid: {reason}")]
    Rejected { key: String, reason: String },
    /// The watch's start revision is gone: list again and watch from the list's revision.
    #[error("watch on {prefix} from revision {requested}: compacted (oldest kept is {compact_revision})")]
    Compacted { prefix: String, requested: i64, compact_revision: i64 },
    #[error("watch on {prefix} ended: {reason}")]
    WatchClosed { prefix: String, reason: String },
    /// The write's fence (`Store::with_fence`) no longer holds: this process is not the leader any more, and
    /// nothing of the write was applied.
    #[error("fenced: {key} is no longer held by etcd lease {lease_id:x}; the write was not applied")]
    Fenced { key: String, lease_id: i64 },
}

impl Error {
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::NotFound { .. })
    }
    pub fn is_conflict(&self) -> bool {
        matches!(self, Error::Conflict { .. })
    }
    pub fn is_already_exists(&self) -> bool {
        matches!(self, Error::AlreadyExists { .. })
    }
    pub fn is_compacted(&self) -> bool {
        matches!(self, Error::Compacted { .. })
    }
    pub fn is_fenced(&self) -> bool {
        matches!(self, Error::Fenced { .. })
    }
}

/// What every write of a fenced store also compares, in the same transaction: the leader election key is still
/// attached to this process's etcd lease. A paused or partitioned ex-leader's in-flight writes then fail whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub key: String,
    pub lease_id: i64,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Whether a resource lives in a namespace, read from k8s-openapi's scope marker types.
pub trait Scope {
    const NAMESPACED: bool;
}
impl Scope for NamespaceResourceScope {
    const NAMESPACED: bool = true;
}
impl Scope for ClusterResourceScope {
    const NAMESPACED: bool = false;
}

/// A Kubernetes object type the store can hold: any k8s-openapi top-level resource.
pub trait Object:
    Resource + Metadata<Ty = ObjectMeta> + Serialize + DeserializeOwned + Clone + Default + Send + Sync + 'static
{
    const NAMESPACED: bool;

    /// The API server's defaults for this kind (`validation::default_object`); idempotent.
    fn apply_defaults(&mut self) {
        crate::validation::default_object(self);
    }

    /// The API server's validation for this kind (`validation::validate_object`): every error names its field.
    fn validate(&self) -> Result<(), crate::service::FieldErrors> {
        crate::validation::validate_object(Self::KIND, Self::NAMESPACED, self.metadata(), self)
    }
}

impl<K> Object for K
where
    K: Resource + Metadata<Ty = ObjectMeta> + Serialize + DeserializeOwned + Clone + Default + Send + Sync + 'static,
    K::Scope: Scope,
{
    const NAMESPACED: bool = <K::Scope as Scope>::NAMESPACED;
}

/// `namespace/name`, or just `name` for cluster-scoped objects.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    pub namespace: Option<String>,
    pub name: String,
}

impl ObjectKey {
    pub fn new(namespace: Option<&str>, name: &str) -> Self {
        ObjectKey { namespace: namespace.map(str::to_string), name: name.to_string() }
    }

    /// The key of an object as stored (namespaced kinds without a namespace get "default").
    pub fn of<K: Object>(obj: &K) -> Self {
        let meta = obj.metadata();
        let ns = meta.namespace.clone().filter(|n| !n.is_empty());
        let namespace = K::NAMESPACED.then(|| ns.unwrap_or_else(|| "default".into()));
        ObjectKey { namespace, name: meta.name.clone().unwrap_or_default() }
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{ns}/{}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

/// `/registry/<plural>/` or `/registry/<plural>/<ns>/`: what list and watch read.
pub fn prefix<K: Object>(namespace: Option<&str>) -> String {
    match namespace.filter(|_| K::NAMESPACED) {
        Some(ns) => format!("{REGISTRY}/{}/{ns}/", K::URL_PATH_SEGMENT),
        None => format!("{REGISTRY}/{}/", K::URL_PATH_SEGMENT),
    }
}

pub fn key_path<K: Object>(key: &ObjectKey) -> String {
    match (&key.namespace, K::NAMESPACED) {
        (Some(ns), true) => format!("{REGISTRY}/{}/{ns}/{}", K::URL_PATH_SEGMENT, key.name),
        (None, true) => format!("{REGISTRY}/{}/default/{}", K::URL_PATH_SEGMENT, key.name),
        (_, false) => format!("{REGISTRY}/{}/{}", K::URL_PATH_SEGMENT, key.name),
    }
}

/// The object key an etcd key names, if it has the shape this kind's keys have.
pub fn parse_key<K: Object>(etcd_key: &str) -> Option<ObjectKey> {
    let rest = etcd_key.strip_prefix(&prefix::<K>(None))?;
    let parts: Vec<&str> = rest.split('/').collect();
    match (K::NAMESPACED, parts.as_slice()) {
        (true, [ns, name]) if !ns.is_empty() && !name.is_empty() => Some(ObjectKey::new(Some(ns), name)),
        (false, [name]) if !name.is_empty() => Some(ObjectKey::new(None, name)),
        _ => None,
    }
}

/// A change seen by a watch. A deleted object is the last stored version, with the deletion's revision.
#[derive(Debug, Clone, PartialEq)]
pub enum WatchEvent<K> {
    Added(K),
    Modified(K),
    Deleted(K),
}

impl<K> WatchEvent<K> {
    pub fn object(&self) -> &K {
        match self {
            WatchEvent::Added(o) | WatchEvent::Modified(o) | WatchEvent::Deleted(o) => o,
        }
    }
}

/// Keys a write claims (must not exist; created holding the owner's name) and releases (deleted only while they
/// still hold that owner), in the same transaction as the object: how Service allocations stay consistent with
/// the Services that hold them.
#[derive(Debug, Clone, Default)]
pub struct Claims {
    pub claim: Vec<(String, String)>,
    pub release: Vec<(String, String)>,
}

impl Claims {
    /// Adds the claims (create-if-absent) and releases to a transaction writing an object.
    fn add_to(&self, when: &mut Vec<Compare>, ops: &mut Vec<TxnOp>) {
        for (k, v) in &self.claim {
            when.push(Compare::version(k.clone(), CompareOp::Equal, 0));
            ops.push(TxnOp::put(k.clone(), v.clone(), None));
        }
        ops.extend(self.release.iter().map(release_op));
    }
}

fn release_op((key, owner): &(String, String)) -> TxnOp {
    // Nested so that a key someone else holds is left alone without failing the whole write.
    TxnOp::txn(
        Txn::new()
            .when([Compare::value(key.clone(), CompareOp::Equal, owner.clone())])
            .and_then([TxnOp::delete(key.clone(), None)]),
    )
}

/// A cheap clonable handle on the object store.
#[derive(Clone)]
pub struct Store {
    client: Client,
    /// Compared by every write when set (`with_fence`).
    fence: Option<Fence>,
    /// Keys per range request when listing: one reply must stay under the client's 4 MiB message limit
    /// (10,000 Endpoints of 10 addresses are ~4.4 MB), so lists are paged at one revision.
    page_size: i64,
}

/// Keys per page of a list; an object is at most a few KB, so a page stays far below 4 MiB.
pub const LIST_PAGE: i64 = 500;

/// The end of the key range that holds every key starting with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0] // the whole key space
}

fn etcd<'a>(op: &'static str, key: &'a str) -> impl FnOnce(etcd_client::Error) -> Error + 'a {
    move |source| Error::Etcd { op, key: key.to_string(), source }
}

/// A random version-4 UUID, formatted as Kubernetes formats metadata.uid.
pub fn new_uid() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Now, to the second, as the API server stamps creationTimestamp.
pub fn now() -> Time {
    Time(now_timestamp())
}

/// The system clock as a Timestamp, to the second (k8s-openapi's jiff is built without its clock).
pub fn now_timestamp() -> k8s_openapi::jiff::Timestamp {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    k8s_openapi::jiff::Timestamp::from_second(secs as i64).unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH)
}

/// Decodes a stored value into `K` with resourceVersion set to the key's mod revision.
pub fn decode<K: Object>(kv: &KeyValue) -> Result<K> {
    let key = String::from_utf8_lossy(kv.key()).into_owned();
    let mut obj: K = serde_json::from_slice(kv.value()).map_err(|source| Error::Decode { key, source })?;
    obj.metadata_mut().resource_version = Some(kv.mod_revision().to_string());
    Ok(obj)
}

/// `decode`, then what every reader checks before trusting a value another writer may have put in etcd: the key
/// names an object of this kind, the object's name and namespace are the key's, and the kind's validation passes.
pub fn decode_checked<K: Object>(kv: &KeyValue) -> Result<K> {
    check_value(kv.key(), kv.value(), kv.mod_revision())
}

/// `decode_checked` on a raw key and value (what the etcd decoders' fuzz test drives).
pub fn check_value<K: Object>(key: &[u8], value: &[u8], mod_revision: i64) -> Result<K> {
    let key = String::from_utf8_lossy(key).into_owned();
    let Some(okey) = parse_key::<K>(&key) else {
        return Err(Error::Rejected { key, reason: "the key does not name an object of this kind".into() });
    };
    let mut obj: K = serde_json::from_slice(value).map_err(|source| Error::Decode { key: key.clone(), source })?;
    obj.metadata_mut().resource_version = Some(mod_revision.to_string());
    // A namespaced object without a namespace is in its key's (hand-written values often omit it); a different
    // one, or a different name, is refused: readers index objects by what they say, caches by the key.
    if K::NAMESPACED && obj.metadata().namespace.as_deref().is_none_or(str::is_empty) {
        obj.metadata_mut().namespace = okey.namespace.clone();
    }
    let meta = obj.metadata();
    let ns = meta.namespace.as_deref().filter(|n| !n.is_empty());
    if meta.name.as_deref() != Some(okey.name.as_str()) || (K::NAMESPACED && ns != okey.namespace.as_deref()) {
        return Err(Error::Rejected { key, reason: "metadata.name/namespace differ from the key".into() });
    }
    obj.validate().map_err(|errors| Error::Rejected { key, reason: errors.to_string() })?;
    Ok(obj)
}

/// Values readers refused (`decode_checked`), counted once per key and revision: the metric behind
/// `weft_*_invalid_objects_total`.
static REJECTED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many distinct (key, revision) values this process refused to read.
pub fn rejected_total() -> u64 {
    REJECTED.load(std::sync::atomic::Ordering::Relaxed)
}

/// Logs one warning per key and revision (a relist or a second informer on the same kind does not repeat it)
/// and counts it.
fn rejected<K: Object>(kv: &KeyValue, e: &Error) {
    use std::collections::HashMap;
    use std::sync::Mutex;
    static SEEN: Mutex<Option<HashMap<Vec<u8>, i64>>> = Mutex::new(None);
    let mut seen = SEEN.lock().unwrap_or_else(|p| p.into_inner());
    let seen = seen.get_or_insert_with(HashMap::new);
    if seen.get(kv.key()) == Some(&kv.mod_revision()) {
        return;
    }
    // Bounded: a flood of distinct bad keys forgets old ones (at worst a key is warned about twice).
    if seen.len() >= 10_000 {
        seen.clear();
    }
    seen.insert(kv.key().to_vec(), kv.mod_revision());
    REJECTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let key = String::from_utf8_lossy(kv.key());
    tracing::warn!(key = ?key, revision = kv.mod_revision(), kind = K::KIND, error = %crate::error_chain(e), "skipping an object that fails validation");
}

/// The parts of an object that describe intent: what decides whether generation moves.
fn spec_of<K: Serialize>(obj: &K) -> Option<serde_json::Value> {
    serde_json::to_value(obj).ok().and_then(|mut v| v.get_mut("spec").map(serde_json::Value::take))
}

impl Store {
    pub fn new(client: Client) -> Self {
        Store { client, fence: None, page_size: LIST_PAGE }
    }

    /// The same store listing `page_size` keys per request (tests use small pages).
    pub fn with_page_size(mut self, page_size: i64) -> Self {
        self.page_size = page_size.max(1);
        self
    }

    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// The same store with every write (create, update, delete) fenced on `fence`.
    pub fn with_fence(mut self, fence: Fence) -> Self {
        self.fence = Some(fence);
        self
    }

    fn add_fence(&self, when: &mut Vec<Compare>) {
        if let Some(f) = &self.fence {
            when.push(Compare::lease(f.key.as_str(), CompareOp::Equal, f.lease_id));
        }
    }

    /// After a failed write: `Fenced` if the fence is what failed it.
    async fn check_fence(&self) -> Result<()> {
        let Some(f) = &self.fence else { return Ok(()) };
        let resp = self.client.clone().get(f.key.as_str(), None).await.map_err(etcd("get", &f.key))?;
        match resp.kvs().first() {
            Some(kv) if kv.lease() == f.lease_id => Ok(()),
            _ => Err(Error::Fenced { key: f.key.clone(), lease_id: f.lease_id }),
        }
    }

    fn encode<K: Object>(key: &ObjectKey, obj: &K) -> Result<Vec<u8>> {
        // resourceVersion is the key's mod revision, never part of the stored value.
        let mut obj = obj.clone();
        obj.metadata_mut().resource_version = None;
        serde_json::to_vec(&obj).map_err(|source| Error::Encode { kind: K::KIND, key: key.clone(), source })
    }

    /// The write gate every create and update passes, whoever calls it: the kind's defaults, then its
    /// validation (errors name the field, as the API server's do).
    fn admit<K: Object>(obj: &K) -> Result<K> {
        let mut obj = obj.clone();
        if !K::NAMESPACED {
            // As the API server: a cluster-scoped object's namespace is cleared, not an error.
            obj.metadata_mut().namespace = None;
        }
        obj.apply_defaults();
        obj.validate().map_err(|errors| Error::Invalid {
            kind: K::KIND,
            key: ObjectKey::of(&obj),
            reason: errors.to_string(),
        })?;
        Ok(obj)
    }

    fn check_name<K: Object>(obj: &K) -> Result<ObjectKey> {
        let key = ObjectKey::of(obj);
        if key.name.is_empty() || key.name.contains('/') || key.namespace.as_deref().is_some_and(|n| n.contains('/')) {
            return Err(Error::Invalid {
                kind: K::KIND,
                key,
                reason: "metadata.name: a valid name is required".into(),
            });
        }
        Ok(key)
    }

    /// The object as create stores it: namespace defaulted, uid, creationTimestamp and generation set.
    pub fn prepare_create<K: Object>(obj: &K) -> Result<(ObjectKey, K)> {
        let key = Self::check_name(obj)?;
        let mut obj = Self::admit(obj)?;
        crate::validation::admit_create(&mut obj);
        let meta = obj.metadata_mut();
        meta.namespace = key.namespace.clone();
        meta.uid = Some(new_uid());
        meta.creation_timestamp = Some(now());
        meta.generation = Some(1);
        meta.resource_version = None;
        meta.deletion_timestamp = None;
        Ok((key, obj))
    }

    /// Creates the object; `AlreadyExists` if its key is taken.
    pub async fn create<K: Object>(&self, obj: &K) -> Result<K> {
        self.create_claiming(obj, &Claims::default()).await
    }

    /// Creates the object and claims `claims.claim` in one transaction: all or nothing.
    pub async fn create_claiming<K: Object>(&self, obj: &K, claims: &Claims) -> Result<K> {
        let (key, mut obj) = Self::prepare_create(obj)?;
        let path = key_path::<K>(&key);
        let value = Self::encode(&key, &obj)?;
        let mut when = vec![Compare::version(path.clone(), CompareOp::Equal, 0)];
        let mut ops = vec![TxnOp::put(path.clone(), value, None)];
        claims.add_to(&mut when, &mut ops);
        self.add_fence(&mut when);
        let resp = self.client.clone().txn(Txn::new().when(when).and_then(ops)).await.map_err(etcd("txn", &path))?;
        if !resp.succeeded() {
            self.check_fence().await?;
            if self.exists(&path).await? {
                return Err(Error::AlreadyExists { kind: K::KIND, key });
            }
            return Err(self.which_claimed(claims).await?);
        }
        let rev = resp.header().map(|h| h.revision()).unwrap_or_default();
        obj.metadata_mut().resource_version = Some(rev.to_string());
        Ok(obj)
    }

    async fn exists(&self, key: &str) -> Result<bool> {
        let resp =
            self.client.clone().get(key, Some(GetOptions::new().with_count_only())).await.map_err(etcd("get", key))?;
        Ok(resp.count() > 0)
    }

    async fn which_claimed(&self, claims: &Claims) -> Result<Error> {
        for (k, _) in &claims.claim {
            if self.exists(k).await? {
                return Ok(Error::Claimed { key: k.clone() });
            }
        }
        // Taken and released again between the transaction and this check: report the first one.
        Ok(Error::Claimed { key: claims.claim.first().map(|c| c.0.clone()).unwrap_or_default() })
    }

    /// The stored object and its etcd mod revision; an object that fails the reader's checks (`decode_checked`)
    /// is an error naming why.
    pub async fn get<K: Object>(&self, namespace: Option<&str>, name: &str) -> Result<K> {
        let key = ObjectKey::new(namespace.filter(|_| K::NAMESPACED).or(K::NAMESPACED.then_some("default")), name);
        let path = key_path::<K>(&key);
        let resp = self.client.clone().get(path.as_str(), None).await.map_err(etcd("get", &path))?;
        match resp.kvs().first() {
            Some(kv) => decode_checked(kv),
            None => Err(Error::NotFound { kind: K::KIND, key }),
        }
    }

    /// `get` without the reader's checks, for writers that replace or delete what is stored, whatever it is.
    /// The object's name and namespace are those of its key.
    pub async fn get_unchecked<K: Object>(&self, namespace: Option<&str>, name: &str) -> Result<K> {
        let key = ObjectKey::new(namespace.filter(|_| K::NAMESPACED).or(K::NAMESPACED.then_some("default")), name);
        let path = key_path::<K>(&key);
        let resp = self.client.clone().get(path.as_str(), None).await.map_err(etcd("get", &path))?;
        match resp.kvs().first() {
            Some(kv) => {
                let mut obj: K = decode(kv)?;
                obj.metadata_mut().name = Some(key.name.clone());
                obj.metadata_mut().namespace = key.namespace.clone();
                Ok(obj)
            }
            None => Err(Error::NotFound { kind: K::KIND, key }),
        }
    }

    /// Every object of the kind (in one namespace, or all), sorted by key, and the revision the list is
    /// consistent at (watch from `revision + 1`). Values that do not decode are logged and skipped.
    pub async fn list<K: Object>(&self, namespace: Option<&str>) -> Result<(Vec<K>, i64)> {
        self.list_map(namespace, Some).await
    }

    /// `list`, passing each object through `keep` as it is decoded: what `keep` returns (None: drop it) is all
    /// that stays in memory, so a reader that needs a summary never holds every whole object at once.
    pub async fn list_map<K: Object, T>(
        &self,
        namespace: Option<&str>,
        mut keep: impl FnMut(K) -> Option<T>,
    ) -> Result<(Vec<T>, i64)> {
        let pfx = prefix::<K>(namespace);
        let end = prefix_end(pfx.as_bytes());
        let mut start = pfx.as_bytes().to_vec();
        let mut revision = 0;
        let mut out = Vec::new();
        loop {
            // Every page at the first page's revision, so the list is one consistent snapshot.
            let mut opts = GetOptions::new().with_range(end.clone()).with_limit(self.page_size);
            if revision > 0 {
                opts = opts.with_revision(revision);
            }
            let resp = self.client.clone().get(start.clone(), Some(opts)).await.map_err(etcd("list", &pfx))?;
            if revision == 0 {
                revision = resp.header().map(|h| h.revision()).unwrap_or_default();
            }
            for kv in resp.kvs() {
                match decode_checked::<K>(kv) {
                    Ok(o) => out.extend(keep(o)),
                    Err(e) => rejected::<K>(kv, &e),
                }
            }
            match resp.kvs().last() {
                Some(last) if resp.more() => {
                    start = last.key().to_vec();
                    start.push(0);
                }
                _ => break,
            }
        }
        Ok((out, revision))
    }

    /// Compare-and-swap: writes `obj` if the stored object's revision is `obj`'s resourceVersion (or, without one,
    /// whatever is stored when this reads it). Keeps uid and creationTimestamp; bumps generation when spec changed.
    pub async fn update<K: Object>(&self, obj: &K) -> Result<K> {
        self.update_claiming(obj, &Claims::default()).await
    }

    /// `update` that also claims and releases keys in the same transaction.
    pub async fn update_claiming<K: Object>(&self, obj: &K, claims: &Claims) -> Result<K> {
        let key = Self::check_name(obj)?;
        let obj = &Self::admit(obj)?;
        let expected = obj.metadata().resource_version.clone().filter(|v| !v.is_empty());
        let expected_rev = match &expected {
            Some(v) => Some(v.parse::<i64>().map_err(|_| Error::Invalid {
                kind: K::KIND,
                key: key.clone(),
                reason: format!("metadata.resourceVersion: {v:?} is not a revision"),
            })?),
            None => None,
        };
        let current: K = self.get_unchecked(key.namespace.as_deref(), &key.name).await?;
        let current_rev = rev_of(&current);
        if let Some(exp) = expected_rev {
            if exp != current_rev {
                return Err(Error::Conflict {
                    kind: K::KIND,
                    key,
                    expected: expected.unwrap_or_default(),
                    actual: current_rev,
                });
            }
        }
        let mut new = obj.clone();
        let generation = current.metadata().generation.unwrap_or(1);
        {
            let cur = current.metadata();
            let meta = new.metadata_mut();
            meta.namespace = key.namespace.clone();
            meta.uid = cur.uid.clone();
            meta.creation_timestamp = cur.creation_timestamp.clone();
            meta.generation = Some(generation);
        }
        if spec_of(&new) != spec_of(&current) {
            new.metadata_mut().generation = Some(generation + 1);
        }
        let path = key_path::<K>(&key);
        let value = Self::encode(&key, &new)?;
        let mut when = vec![Compare::mod_revision(path.clone(), CompareOp::Equal, current_rev)];
        let mut ops = vec![TxnOp::put(path.clone(), value, None)];
        claims.add_to(&mut when, &mut ops);
        self.add_fence(&mut when);
        let resp = self.client.clone().txn(Txn::new().when(when).and_then(ops)).await.map_err(etcd("txn", &path))?;
        if !resp.succeeded() {
            self.check_fence().await?;
            let now: K = self.get_unchecked(key.namespace.as_deref(), &key.name).await?;
            if rev_of(&now) != current_rev {
                return Err(Error::Conflict {
                    kind: K::KIND,
                    key,
                    expected: expected.unwrap_or_else(|| current_rev.to_string()),
                    actual: rev_of(&now),
                });
            }
            return Err(self.which_claimed(claims).await?);
        }
        let rev = resp.header().map(|h| h.revision()).unwrap_or_default();
        new.metadata_mut().resource_version = Some(rev.to_string());
        Ok(new)
    }

    /// Deletes the object (if `precondition` is set, only at that resourceVersion) and returns its last version.
    pub async fn delete<K: Object>(
        &self,
        namespace: Option<&str>,
        name: &str,
        precondition: Option<&str>,
    ) -> Result<K> {
        self.delete_releasing(namespace, name, precondition, |_: &K| Vec::new()).await
    }

    /// `delete` that also releases the keys `releases(&object)` names (key, owner), in the same transaction.
    pub async fn delete_releasing<K: Object>(
        &self,
        namespace: Option<&str>,
        name: &str,
        precondition: Option<&str>,
        releases: impl Fn(&K) -> Vec<(String, String)>,
    ) -> Result<K> {
        loop {
            // Unchecked: an object that fails validation can still be deleted (under the key it is stored at).
            let current: K = self.get_unchecked(namespace, name).await?;
            let key = ObjectKey::of(&current);
            let rev = rev_of(&current);
            if let Some(p) = precondition {
                if p != rev.to_string() {
                    return Err(Error::Conflict { kind: K::KIND, key, expected: p.to_string(), actual: rev });
                }
            }
            let path = key_path::<K>(&key);
            let mut ops = vec![TxnOp::delete(path.clone(), None)];
            ops.extend(releases(&current).iter().map(release_op));
            let mut when = vec![Compare::mod_revision(path.clone(), CompareOp::Equal, rev)];
            self.add_fence(&mut when);
            let txn = Txn::new().when(when).and_then(ops);
            let resp = self.client.clone().txn(txn).await.map_err(etcd("txn", &path))?;
            if !resp.succeeded() {
                self.check_fence().await?;
            }
            if resp.succeeded() {
                let mut last = current;
                if let Some(h) = resp.header() {
                    last.metadata_mut().resource_version = Some(h.revision().to_string());
                }
                return Ok(last);
            }
            // Changed under us: with a precondition that is a conflict (the next get reports it), else retry.
        }
    }

    /// Watches the kind (in one namespace, or all) from `from_revision` (0 = from now).
    pub async fn watch<K: Object>(&self, namespace: Option<&str>, from_revision: i64) -> Result<Watch<K>> {
        let pfx = prefix::<K>(namespace);
        let mut opts = WatchOptions::new().with_prefix().with_prev_key().with_progress_notify();
        if from_revision > 0 {
            opts = opts.with_start_revision(from_revision);
        }
        let (watcher, stream) =
            self.client.clone().watch(pfx.as_str(), Some(opts)).await.map_err(etcd("watch", &pfx))?;
        Ok(Watch {
            prefix: pfx,
            requested: from_revision,
            revision: (from_revision - 1).max(0),
            _watcher: watcher,
            stream,
            pending: std::collections::VecDeque::new(),
            _kind: std::marker::PhantomData,
        })
    }

    /// Every key under `prefix` with its value (for allocation tables).
    pub async fn keys(&self, prefix: &str) -> Result<BTreeMap<String, String>> {
        let resp = self
            .client
            .clone()
            .get(prefix, Some(GetOptions::new().with_prefix()))
            .await
            .map_err(etcd("list", prefix))?;
        Ok(resp
            .kvs()
            .iter()
            .map(|kv| {
                (String::from_utf8_lossy(kv.key()).into_owned(), String::from_utf8_lossy(kv.value()).into_owned())
            })
            .collect())
    }
}

/// The resourceVersion of an object read from the store, as a revision.
pub fn rev_of<K: Object>(obj: &K) -> i64 {
    obj.metadata().resource_version.as_deref().and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// A typed watch on one kind. `next` yields events in revision order; values that do not decode are skipped with
/// a warning (their revision still counts).
pub struct Watch<K> {
    prefix: String,
    requested: i64,
    revision: i64,
    _watcher: etcd_client::Watcher,
    stream: etcd_client::WatchStream,
    pending: std::collections::VecDeque<WatchEvent<K>>,
    _kind: std::marker::PhantomData<K>,
}

impl<K: Object> Watch<K> {
    /// The last revision this watch has seen: resume from `revision() + 1`.
    pub fn revision(&self) -> i64 {
        self.revision
    }

    /// The next event; `Compacted` means list again, `WatchClosed` that the connection or watch broke.
    pub async fn next(&mut self) -> Result<WatchEvent<K>> {
        loop {
            if let Some(ev) = self.pending.pop_front() {
                return Ok(ev);
            }
            let resp = match self.stream.message().await {
                Ok(Some(r)) => r,
                Ok(None) => return Err(self.closed("the stream ended".into())),
                Err(e) => return Err(self.closed(crate::error_chain(&e))),
            };
            if resp.compact_revision() > 0 {
                return Err(Error::Compacted {
                    prefix: self.prefix.clone(),
                    requested: self.requested,
                    compact_revision: resp.compact_revision(),
                });
            }
            if resp.canceled() {
                return Err(self.closed(format!("canceled by the server: {}", resp.cancel_reason())));
            }
            if resp.events().is_empty() {
                // A progress notification: nothing changed up to the header's revision. Not so for the response
                // that confirms creation: its header is the head revision, before the replayed events arrive.
                if let Some(h) = resp.header().filter(|_| !resp.created()) {
                    self.revision = self.revision.max(h.revision());
                }
                continue;
            }
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                self.revision = self.revision.max(kv.mod_revision());
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                let Some(okey) = parse_key::<K>(&key) else {
                    rejected::<K>(kv, &Error::Rejected { key, reason: "the key does not name an object".into() });
                    continue;
                };
                // An object with just the key's name: what a refused value or a delete without history leaves.
                let stub = || {
                    let mut o = K::default();
                    o.metadata_mut().name = Some(okey.name.clone());
                    o.metadata_mut().namespace = okey.namespace.clone();
                    o.metadata_mut().resource_version = Some(kv.mod_revision().to_string());
                    o
                };
                let event = match ev.event_type() {
                    EventType::Put => match decode_checked::<K>(kv) {
                        Ok(o) if kv.create_revision() == kv.mod_revision() => WatchEvent::Added(o),
                        Ok(o) => WatchEvent::Modified(o),
                        Err(e) => {
                            // As if deleted: a cache must not keep serving the valid version this replaced.
                            rejected::<K>(kv, &e);
                            WatchEvent::Deleted(stub())
                        }
                    },
                    EventType::Delete => {
                        // The last stored version if it passes the checks, else the stub.
                        let mut last = ev.prev_kv().and_then(|p| decode_checked::<K>(p).ok()).unwrap_or_else(stub);
                        last.metadata_mut().resource_version = Some(kv.mod_revision().to_string());
                        WatchEvent::Deleted(last)
                    }
                };
                self.pending.push_back(event);
            }
        }
    }

    fn closed(&self, reason: String) -> Error {
        Error::WatchClosed { prefix: self.prefix.clone(), reason }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Namespace, Service};

    #[test]
    fn keys_follow_the_registry_layout() {
        let k = ObjectKey::new(Some("kube-system"), "kube-dns");
        assert_eq!(key_path::<Service>(&k), "/registry/services/kube-system/kube-dns");
        assert_eq!(key_path::<Namespace>(&ObjectKey::new(None, "prod")), "/registry/namespaces/prod");
        assert_eq!(prefix::<Service>(Some("a")), "/registry/services/a/");
        assert_eq!(prefix::<Service>(None), "/registry/services/");
        assert_eq!(parse_key::<Service>("/registry/services/a/b"), Some(ObjectKey::new(Some("a"), "b")));
        assert_eq!(parse_key::<Service>("/registry/services/a/b/c"), None);
        assert_eq!(parse_key::<Service>("/registry/services/a"), None);
        assert_eq!(parse_key::<Namespace>("/registry/namespaces/x"), Some(ObjectKey::new(None, "x")));
    }

    #[test]
    fn readers_refuse_values_that_are_not_their_keys_objects() {
        let svc = |name: &str, ns: Option<&str>| {
            let mut v = serde_json::json!({"metadata": {"name": name},
                "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 80}]}});
            if let Some(ns) = ns {
                v["metadata"]["namespace"] = ns.into();
            }
            v.to_string().into_bytes()
        };
        let key = b"/registry/services/default/web";
        let ok: Service = check_value(key, &svc("web", Some("default")), 9).unwrap();
        assert_eq!(ok.metadata.resource_version.as_deref(), Some("9"));
        let no_ns: Service = check_value(key, &svc("web", None), 9).unwrap();
        assert_eq!(no_ns.metadata.namespace.as_deref(), Some("default"), "the key's namespace");
        for (k, v, why) in [
            (&key[..], svc("other", Some("default")), "differ from the key"),
            (&key[..], svc("web", Some("kube-system")), "differ from the key"),
            (&b"/registry/services/default/web/x"[..], svc("web", Some("default")), "does not name"),
            (&key[..], b"[1,2]".to_vec(), "decoding"),
            (&key[..], b"{\"metadata\": {".to_vec(), "decoding"),
        ] {
            let e = check_value::<Service>(k, &v, 1).unwrap_err().to_string();
            assert!(e.contains(why), "{e}");
        }
    }

    #[test]
    fn uids_are_version_4() {
        let u = new_uid();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
        assert!(matches!(&u[19..20], "8" | "9" | "a" | "b"), "{u}");
        assert_ne!(u, new_uid());
    }

    #[test]
    fn object_key_defaults_the_namespace_only_for_namespaced_kinds() {
        let mut s = Service::default();
        s.metadata.name = Some("x".into());
        assert_eq!(ObjectKey::of(&s), ObjectKey::new(Some("default"), "x"));
        let mut n = Namespace::default();
        n.metadata.name = Some("x".into());
        n.metadata.namespace = Some("ignored".into());
        assert_eq!(ObjectKey::of(&n), ObjectKey::new(None, "x"));
    }
}
