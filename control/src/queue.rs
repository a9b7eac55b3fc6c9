//! A work queue in the manner of client-go's: an item added many times before a worker takes it is handed out
//! once; an item is never handed to two workers at once (added while processing, it comes back after `done`);
//! `add_after` delays an item, and `add_rate_limited` backs it off exponentially until `forget`. Time is tokio's.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::hash::Hash;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

pub struct Queue<T> {
    state: Mutex<State<T>>,
    notify: Notify,
    backoff_min: Duration,
    backoff_max: Duration,
}

struct State<T> {
    queue: VecDeque<T>,
    dirty: HashSet<T>,
    processing: HashSet<T>,
    /// Delayed items by when they are due (a sequence number keeps equal deadlines apart).
    delayed: BTreeMap<(Instant, u64), T>,
    /// The earliest deadline each delayed item has, so a later add_after does not push it back.
    due: HashMap<T, Instant>,
    failures: HashMap<T, u32>,
    seq: u64,
}

impl<T: Clone + Eq + Hash> Queue<T> {
    pub fn new(backoff_min: Duration, backoff_max: Duration) -> Self {
        Queue {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                dirty: HashSet::new(),
                processing: HashSet::new(),
                delayed: BTreeMap::new(),
                due: HashMap::new(),
                failures: HashMap::new(),
                seq: 0,
            }),
            notify: Notify::new(),
            backoff_min,
            backoff_max,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn add(&self, item: T) {
        if self.lock().add(item) {
            self.notify.notify_one();
        }
    }

    /// Adds `item` once `after` has passed (at once for zero).
    pub fn add_after(&self, item: T, after: Duration) {
        if after.is_zero() {
            return self.add(item);
        }
        let at = Instant::now() + after;
        let mut s = self.lock();
        if s.due.get(&item).is_some_and(|d| *d <= at) {
            return;
        }
        if let Some(old) = s.due.insert(item.clone(), at) {
            s.delayed.retain(|(d, _), v| !(*d == old && *v == item));
        }
        s.seq += 1;
        let seq = s.seq;
        s.delayed.insert((at, seq), item);
        drop(s);
        // A worker sleeping until a later deadline must recompute.
        self.notify.notify_one();
    }

    /// Adds `item` after its backoff: `backoff_min` doubled per failure since the last `forget`, up to `backoff_max`.
    pub fn add_rate_limited(&self, item: T) {
        let n = {
            let mut s = self.lock();
            let n = s.failures.entry(item.clone()).or_insert(0);
            *n += 1;
            *n
        };
        let d = self.backoff_min.saturating_mul(1u32 << (n - 1).min(20)).min(self.backoff_max);
        self.add_after(item, d);
    }

    pub fn forget(&self, item: &T) {
        self.lock().failures.remove(item);
    }

    /// The next item to work on; the caller must call `done` with it.
    pub async fn get(&self) -> T {
        loop {
            let next_due = {
                let mut s = self.lock();
                s.promote(Instant::now());
                if let Some(item) = s.queue.pop_front() {
                    s.dirty.remove(&item);
                    s.processing.insert(item.clone());
                    return item;
                }
                s.delayed.keys().next().map(|(d, _)| *d)
            };
            match next_due {
                Some(d) => {
                    tokio::select! {
                        _ = self.notify.notified() => {}
                        _ = tokio::time::sleep_until(d) => {}
                    }
                }
                None => self.notify.notified().await,
            }
        }
    }

    pub fn done(&self, item: &T) {
        let mut s = self.lock();
        s.processing.remove(item);
        if s.dirty.contains(item) {
            s.queue.push_back(item.clone());
            drop(s);
            self.notify.notify_one();
        }
    }

    /// Items waiting (not counting delayed ones or those being processed).
    pub fn len(&self) -> usize {
        self.lock().queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<T: Clone + Eq + Hash> State<T> {
    /// True if a worker should be woken.
    fn add(&mut self, item: T) -> bool {
        if self.dirty.contains(&item) {
            return false;
        }
        self.dirty.insert(item.clone());
        if self.processing.contains(&item) {
            return false;
        }
        self.queue.push_back(item);
        true
    }

    fn promote(&mut self, now: Instant) {
        while let Some(entry) = self.delayed.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let item = entry.remove();
            self.due.remove(&item);
            self.add(item);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn q() -> Arc<Queue<&'static str>> {
        Arc::new(Queue::new(Duration::from_millis(100), Duration::from_secs(1)))
    }

    #[tokio::test(start_paused = true)]
    async fn adds_before_a_get_are_deduplicated() {
        let q = q();
        q.add("a");
        q.add("b");
        q.add("a");
        assert_eq!(q.len(), 2);
        assert_eq!(q.get().await, "a");
        assert_eq!(q.get().await, "b");
        assert!(q.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn an_item_added_while_processing_comes_back_after_done_never_to_two_workers() {
        let q = q();
        q.add("a");
        let a = q.get().await;
        q.add("a");
        assert!(q.is_empty(), "not handed out while a worker holds it");
        q.done(&a);
        assert_eq!(q.len(), 1);
        assert_eq!(q.get().await, "a");
    }

    #[tokio::test(start_paused = true)]
    async fn delayed_items_come_at_their_time_and_the_earliest_deadline_wins() {
        let q = q();
        let start = Instant::now();
        q.add_after("late", Duration::from_secs(5));
        q.add_after("soon", Duration::from_secs(2));
        q.add_after("soon", Duration::from_secs(4));
        assert_eq!(q.get().await, "soon");
        assert_eq!(Instant::now() - start, Duration::from_secs(2));
        assert_eq!(q.get().await, "late");
        assert_eq!(Instant::now() - start, Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn failures_back_off_exponentially_until_forgotten() {
        let q = q();
        let mut waits = Vec::new();
        for _ in 0..6 {
            let start = Instant::now();
            q.add_rate_limited("a");
            let a = q.get().await;
            waits.push((Instant::now() - start).as_millis());
            q.done(&a);
        }
        assert_eq!(waits, [100, 200, 400, 800, 1000, 1000]);
        q.forget(&"a");
        let start = Instant::now();
        q.add_rate_limited("a");
        q.get().await;
        assert_eq!((Instant::now() - start).as_millis(), 100);
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_worker_wakes_for_a_new_item() {
        let q = q();
        let q2 = q.clone();
        let h = tokio::spawn(async move { q2.get().await });
        tokio::time::sleep(Duration::from_millis(10)).await;
        q.add("x");
        assert_eq!(h.await.unwrap(), "x");
    }
}
