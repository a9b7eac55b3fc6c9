//! A list + watch of one kind that keeps only a summary of each object (`SvcInfo`, `EpInfo`, `PodInfo`):
//! the informer's protocol (relist on compaction or an unresumable watch, resume a broken watch from the
//! last revision, back off on errors) without its cache of whole objects, which at 10,000 Services was
//! most of the server's memory. Reads etcd only.

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::mpsc::UnboundedSender;
use weft_api::store::Object;
use weft_api::{ObjectKey, Store, WatchEvent};

/// A change to the summaries of one kind. `Replace` carries a whole (re)list.
#[derive(Debug)]
pub enum Change<T> {
    Replace(HashMap<ObjectKey, T>),
    Upsert(ObjectKey, T),
    Remove(ObjectKey),
}

const MIN: Duration = Duration::from_millis(100);
const MAX: Duration = Duration::from_secs(5);

/// Follows kind `K` until the receiver is gone. `summary` returning `None` means "not interesting"
/// (e.g. a pod without hostname and subdomain): such an object is reported as removed.
pub async fn follow<K: Object + Summarized>(
    store: Store,
    summary: fn(&K) -> Option<K::Summary>,
    tx: UnboundedSender<Change<K::Summary>>,
) {
    let mut delay = MIN;
    loop {
        let revision = match store.list::<K>(None).await {
            Ok((items, revision)) => {
                let map = items.iter().filter_map(|o| Some((ObjectKey::of(o), summary(o)?))).collect();
                if tx.send(Change::Replace(map)).is_err() {
                    return;
                }
                delay = MIN;
                revision
            }
            Err(e) => {
                tracing::warn!(kind = K::KIND, error = %weft_api::error_chain(&e), retry_in = ?delay, "list failed");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(MAX);
                continue;
            }
        };
        if !watch_from(&store, revision, summary, &tx).await {
            return;
        }
        tokio::time::sleep(MIN).await;
    }
}

/// The summary type of a kind.
pub trait Summarized {
    type Summary: Send + 'static;
}

impl Summarized for k8s_openapi::api::core::v1::Service {
    type Summary = crate::index::SvcInfo;
}
impl Summarized for k8s_openapi::api::core::v1::Endpoints {
    type Summary = crate::index::EpInfo;
}
impl Summarized for k8s_openapi::api::core::v1::Pod {
    type Summary = crate::index::PodInfo;
}

/// Follows the watch from `revision` until it must relist (true) or the receiver is gone (false).
async fn watch_from<K: Object + Summarized>(
    store: &Store,
    mut revision: i64,
    summary: fn(&K) -> Option<K::Summary>,
    tx: &UnboundedSender<Change<K::Summary>>,
) -> bool {
    let mut delay = MIN;
    loop {
        let mut w = match store.watch::<K>(None, revision + 1).await {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(kind = K::KIND, error = %weft_api::error_chain(&e), "watch failed; relisting");
                return true;
            }
        };
        loop {
            let change = match w.next().await {
                Ok(WatchEvent::Added(o)) | Ok(WatchEvent::Modified(o)) => match summary(&o) {
                    Some(s) => Change::Upsert(ObjectKey::of(&o), s),
                    None => Change::Remove(ObjectKey::of(&o)),
                },
                Ok(WatchEvent::Deleted(o)) => Change::Remove(ObjectKey::of(&o)),
                Err(e) if e.is_compacted() => {
                    tracing::info!(kind = K::KIND, error = %e, "watch compacted; relisting");
                    return true;
                }
                Err(e) => {
                    revision = revision.max(w.revision());
                    tracing::warn!(kind = K::KIND, error = %weft_api::error_chain(&e), retry_in = ?delay, "watch broke; resuming");
                    break;
                }
            };
            delay = MIN;
            revision = w.revision();
            if tx.send(change).is_err() {
                return false;
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(MAX);
    }
}
