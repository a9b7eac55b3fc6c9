//! An informer: list + watch of one kind → a local cache of `Arc` objects that readers use without waiting for
//! the writer, and a channel of change events. On a compacted or broken watch it relists (with backoff) and emits
//! the differences, so a consumer that applies events stays equal to etcd. It only reads from the store.
//!
//! A transform (client-go's `SetTransform`) turns each object into what the reader keeps, as it arrives: a
//! reader that needs a summary of 10,000 Services holds 10,000 summaries, never the whole objects.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use crate::store::{rev_of, Object, ObjectKey, Store, WatchEvent};

/// One change: `old` None = added, `new` None = deleted.
#[derive(Debug)]
pub struct InformerEvent<K> {
    pub key: ObjectKey,
    pub old: Option<Arc<K>>,
    pub new: Option<Arc<K>>,
}

// Derived Clone would require K: Clone on the Arcs' contents for no reason.
impl<K> Clone for InformerEvent<K> {
    fn clone(&self) -> Self {
        InformerEvent { key: self.key.clone(), old: self.old.clone(), new: self.new.clone() }
    }
}

/// Each cached value with the revision of the object it came from (a transformed value may not carry it).
type Cache<T> = Arc<RwLock<HashMap<ObjectKey, (i64, Arc<T>)>>>;

/// The reading side of an informer: cheap to clone, never blocks on etcd.
pub struct Informer<K> {
    cache: Cache<K>,
    synced: watch::Receiver<bool>,
    lists: Arc<AtomicU64>,
}

impl<K> Clone for Informer<K> {
    fn clone(&self) -> Self {
        Informer { cache: self.cache.clone(), synced: self.synced.clone(), lists: self.lists.clone() }
    }
}

/// Backoff between relists after failures: doubles from `min` up to `max`.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub min: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { min: Duration::from_millis(100), max: Duration::from_secs(5) }
    }
}

impl<K: Object> Informer<K> {
    /// The informer's handle, its events, and the future that keeps it up to date. The caller spawns the future
    /// (the library never spawns tasks); dropping it stops the informer. Events are sent only after the cache
    /// holds them; an unread receiver may be dropped.
    pub fn new(
        store: Store,
        namespace: Option<String>,
    ) -> (Informer<K>, mpsc::UnboundedReceiver<InformerEvent<K>>, impl std::future::Future<Output = ()> + Send) {
        Self::with_backoff(store, namespace, Backoff::default())
    }

    pub fn with_backoff(
        store: Store,
        namespace: Option<String>,
        backoff: Backoff,
    ) -> (Informer<K>, mpsc::UnboundedReceiver<InformerEvent<K>>, impl std::future::Future<Output = ()> + Send) {
        Informer::transformed(store, namespace, backoff, Some::<K>)
    }
}

impl<T: Send + Sync + 'static> Informer<T> {
    /// An informer of kind `K` that caches `transform(object)` instead of the object; `None` means "not kept"
    /// (reported as deleted if it was kept before). `transform` runs once per object received.
    pub fn transformed<K: Object>(
        store: Store,
        namespace: Option<String>,
        backoff: Backoff,
        transform: impl Fn(K) -> Option<T> + Send + Sync + 'static,
    ) -> (Informer<T>, mpsc::UnboundedReceiver<InformerEvent<T>>, impl std::future::Future<Output = ()> + Send) {
        let cache: Cache<T> = Arc::default();
        let (synced_tx, synced) = watch::channel(false);
        let (tx, rx) = mpsc::unbounded_channel();
        let lists = Arc::new(AtomicU64::new(0));
        let runner = Runner::<K, T, _> {
            store,
            namespace,
            cache: cache.clone(),
            tx,
            synced: synced_tx,
            lists: lists.clone(),
            backoff,
            transform,
            kind: std::marker::PhantomData,
        };
        (Informer { cache, synced, lists }, rx, runner.run())
    }

    /// How many lists have completed: 1 after the first sync, one more for each relist (after a compaction or
    /// a watch that could not be resumed). A list's events are sent before it is counted, so a reader that sees
    /// the count change knows a full sync happened (e.g. to log it or rebuild what it derives from the events).
    pub fn lists(&self) -> u64 {
        self.lists.load(Ordering::Acquire)
    }

    /// True once the first list is in the cache.
    pub fn has_synced(&self) -> bool {
        *self.synced.borrow()
    }

    /// Waits until the first list is in the cache.
    pub async fn wait_synced(&self) {
        let mut rx = self.synced.clone();
        // Err only if the runner is gone, and then there is nothing to wait for.
        let _ = rx.wait_for(|s| *s).await;
    }

    pub fn get(&self, key: &ObjectKey) -> Option<Arc<T>> {
        self.read().get(key).map(|(_, v)| v.clone())
    }

    /// Every cached value, sorted by key.
    pub fn list(&self) -> Vec<Arc<T>> {
        let mut items: Vec<(ObjectKey, Arc<T>)> =
            self.read().iter().map(|(k, (_, v))| (k.clone(), v.clone())).collect();
        items.sort_by(|a, b| a.0.cmp(&b.0));
        items.into_iter().map(|(_, v)| v).collect()
    }

    pub fn len(&self) -> usize {
        self.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.read().is_empty()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<ObjectKey, (i64, Arc<T>)>> {
        // A panic while holding the lock leaves a consistent map (single inserts/removes): keep reading.
        self.cache.read().unwrap_or_else(|p| p.into_inner())
    }
}

struct Runner<K, T, F> {
    store: Store,
    namespace: Option<String>,
    cache: Cache<T>,
    tx: mpsc::UnboundedSender<InformerEvent<T>>,
    synced: watch::Sender<bool>,
    lists: Arc<AtomicU64>,
    backoff: Backoff,
    transform: F,
    kind: std::marker::PhantomData<fn(K)>,
}

impl<K: Object, T: Send + Sync + 'static, F: Fn(K) -> Option<T> + Send + Sync + 'static> Runner<K, T, F> {
    async fn run(self) {
        let ns = self.namespace.as_deref();
        let mut delay = self.backoff.min;
        loop {
            let listed = self.store.list_map::<K, _>(ns, |o| {
                let (key, rev) = (ObjectKey::of(&o), rev_of(&o));
                (self.transform)(o).map(|v| (key, (rev, Arc::new(v))))
            });
            let revision = match listed.await {
                Ok((items, revision)) => {
                    self.replace(items.into_iter().collect());
                    self.lists.fetch_add(1, Ordering::Release);
                    self.synced.send_replace(true);
                    revision
                }
                Err(e) => {
                    tracing::warn!(kind = K::KIND, error = %crate::error_chain(&e), retry_in = ?delay, "list failed");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(self.backoff.max);
                    continue;
                }
            };
            delay = self.backoff.min;
            self.watch_from(revision).await;
            tokio::time::sleep(delay).await;
        }
    }

    /// Follows the watch from `revision`, resuming after breaks, until it is compacted or cannot be resumed.
    async fn watch_from(&self, mut revision: i64) {
        let ns = self.namespace.as_deref();
        let mut delay = self.backoff.min;
        loop {
            let mut w = match self.store.watch::<K>(ns, revision + 1).await {
                Ok(w) => w,
                Err(e) => {
                    tracing::warn!(kind = K::KIND, error = %crate::error_chain(&e), "watch failed; relisting");
                    return;
                }
            };
            loop {
                match w.next().await {
                    Ok(ev) => {
                        delay = self.backoff.min;
                        self.apply(ev);
                        revision = w.revision();
                    }
                    Err(e) if e.is_compacted() => {
                        tracing::info!(kind = K::KIND, error = %e, "watch compacted; relisting");
                        return;
                    }
                    Err(e) => {
                        revision = revision.max(w.revision());
                        tracing::warn!(kind = K::KIND, error = %crate::error_chain(&e), retry_in = ?delay, "watch broke; resuming");
                        break;
                    }
                }
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(self.backoff.max);
        }
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<ObjectKey, (i64, Arc<T>)>> {
        self.cache.write().unwrap_or_else(|p| p.into_inner())
    }

    fn send(&self, key: ObjectKey, old: Option<Arc<T>>, new: Option<Arc<T>>) {
        // Nobody listening is fine: the cache is still kept.
        let _ = self.tx.send(InformerEvent { key, old, new });
    }

    fn apply(&self, ev: WatchEvent<K>) {
        match ev {
            WatchEvent::Added(o) | WatchEvent::Modified(o) => {
                let (key, rev) = (ObjectKey::of(&o), rev_of(&o));
                let Some(new) = (self.transform)(o).map(Arc::new) else {
                    // Not kept any more: to the reader it is gone.
                    let old = self.write().remove(&key);
                    if let Some((_, old)) = old {
                        self.send(key, Some(old), None);
                    }
                    return;
                };
                let old = self.write().insert(key.clone(), (rev, new.clone()));
                // A resumed watch may replay what a relist already brought in.
                if old.as_ref().is_some_and(|(old_rev, _)| *old_rev == rev) {
                    return;
                }
                self.send(key, old.map(|(_, v)| v), Some(new));
            }
            WatchEvent::Deleted(o) => {
                let key = ObjectKey::of(&o);
                let old = self.write().remove(&key);
                if let Some((_, old)) = old {
                    self.send(key, Some(old), None);
                }
            }
        }
    }

    /// Replaces the cache with a fresh list and emits what differs from before.
    fn replace(&self, mut fresh: HashMap<ObjectKey, (i64, Arc<T>)>) {
        let mut events = Vec::new();
        {
            let mut cache = self.write();
            for (key, (old_rev, old)) in cache.iter() {
                match fresh.get(key) {
                    None => events.push(InformerEvent { key: key.clone(), old: Some(old.clone()), new: None }),
                    Some((rev, new)) if rev != old_rev => {
                        events.push(InformerEvent { key: key.clone(), old: Some(old.clone()), new: Some(new.clone()) })
                    }
                    Some(_) => {}
                }
            }
            for (key, new) in fresh.iter_mut() {
                match cache.get(key) {
                    // Unchanged: keep the Arc readers already hold.
                    Some(old) if old.0 == new.0 => *new = old.clone(),
                    Some(_) => {}
                    None => events.push(InformerEvent { key: key.clone(), old: None, new: Some(new.1.clone()) }),
                }
            }
            *cache = fresh;
        }
        events.sort_by(|a, b| a.key.cmp(&b.key));
        for e in events {
            let _ = self.tx.send(e);
        }
    }
}
