//! A bounded-frequency runner, after kube-proxy's: triggers are coalesced, runs are at least
//! `min_interval` apart, a failed run is retried after `retry_interval` (doubling while runs keep failing, up to
//! `max_interval`), and a run happens at least
//! every `max_interval` even without triggers. Time is tokio's, so tests pause and advance it.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::{sleep_until, Instant};

/// Requests a run; cheap to clone, never blocks. Many triggers before a run make one run.
#[derive(Debug, Clone)]
pub struct Trigger(Arc<Notify>);

impl Trigger {
    pub fn run(&self) {
        self.0.notify_one();
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Intervals {
    pub min: Duration,
    pub max: Duration,
    pub retry: Duration,
}

#[derive(Debug)]
pub struct BoundedRunner {
    intervals: Intervals,
    notify: Arc<Notify>,
}

impl BoundedRunner {
    pub fn new(intervals: Intervals) -> Self {
        BoundedRunner { intervals, notify: Arc::new(Notify::new()) }
    }

    pub fn trigger(&self) -> Trigger {
        Trigger(self.notify.clone())
    }

    /// Runs `f` forever under the bounds; the first run happens at once. `f` gets `true` when the
    /// run is due to the max interval or a retry (a caller may then do a full sync).
    pub async fn run<F, Fut, E>(self, mut f: F)
    where
        F: FnMut(bool) -> Fut,
        Fut: Future<Output = Result<(), E>>,
    {
        let Intervals { min, max, retry } = self.intervals;
        let mut forced = true;
        // Consecutive failures double the retry interval, up to the max interval.
        let mut failures: u32 = 0;
        loop {
            let started = Instant::now();
            let ok = f(forced).await.is_ok();
            failures = if ok { 0 } else { failures.saturating_add(1) };
            let backoff = retry.saturating_mul(1u32 << failures.saturating_sub(1).min(16)).min(max.max(retry));
            let earliest = started + min;
            let deadline = if ok { started + max } else { (started + backoff).max(earliest) };
            forced = tokio::select! {
                _ = self.notify.notified() => false,
                _ = sleep_until(deadline) => true,
            };
            if !forced {
                // Triggered: wait out the minimum interval; triggers meanwhile coalesce into this run.
                sleep_until(earliest).await;
                // Drain a trigger that arrived while waiting: this run covers it.
                tokio::select! {
                    biased;
                    _ = self.notify.notified() => {}
                    _ = std::future::ready(()) => {}
                }
                if !ok && Instant::now() >= deadline {
                    forced = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    type Log = Arc<Mutex<Vec<(u64, bool)>>>;

    fn spawn(intervals: Intervals, fail_first: usize) -> (Trigger, Log, Instant) {
        let runner = BoundedRunner::new(intervals);
        let trigger = runner.trigger();
        let log: Log = Arc::default();
        let start = Instant::now();
        let l = log.clone();
        let mut failures = fail_first;
        tokio::spawn(runner.run(move |forced| {
            l.lock().unwrap().push((start.elapsed().as_millis() as u64, forced));
            let r = if failures > 0 {
                failures -= 1;
                Err(())
            } else {
                Ok(())
            };
            async move { r }
        }));
        (trigger, log, start)
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    async fn advance(n: u64) {
        for _ in 0..n {
            tokio::time::advance(ms(1)).await;
            tokio::task::yield_now().await;
        }
    }

    const IV: Intervals = Intervals {
        min: Duration::from_millis(100),
        max: Duration::from_millis(1000),
        retry: Duration::from_millis(300),
    };

    #[tokio::test(start_paused = true)]
    async fn triggers_coalesce_and_respect_min_interval() {
        let (t, log, _) = spawn(IV, 0);
        advance(1).await;
        for _ in 0..5 {
            t.run();
        }
        advance(150).await;
        t.run();
        advance(10).await;
        t.run();
        advance(200).await;
        let runs: Vec<u64> = log.lock().unwrap().iter().map(|r| r.0).collect();
        assert_eq!(runs.len(), 3, "{runs:?}");
        assert!(runs[0] <= 1, "{runs:?}");
        assert!((100..=102).contains(&runs[1]), "{runs:?}");
        assert!(runs[2] >= runs[1] + 100, "{runs:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn runs_every_max_interval_without_triggers() {
        let (_t, log, _) = spawn(IV, 0);
        advance(2050).await;
        let runs = log.lock().unwrap().clone();
        assert_eq!(runs.len(), 3, "{runs:?}");
        assert!(runs[1].1 && runs[2].1, "periodic runs are forced: {runs:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn failure_is_retried() {
        let (_t, log, _) = spawn(IV, 1);
        advance(350).await;
        let runs = log.lock().unwrap().clone();
        assert_eq!(runs.len(), 2, "{runs:?}");
        assert!((300..=302).contains(&runs[1].0) && runs[1].1, "{runs:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn repeated_failures_back_off_up_to_the_max_interval() {
        let (_t, log, _) = spawn(IV, 5);
        advance(3000).await;
        let runs: Vec<u64> = log.lock().unwrap().iter().map(|r| r.0).collect();
        let gaps: Vec<u64> = runs.windows(2).map(|w| w[1] - w[0]).collect();
        // 300, 600, then capped at the max interval (1000).
        assert!(gaps.len() >= 3, "{runs:?}");
        for (gap, want) in gaps.iter().zip([300, 600, 1000]) {
            assert!((want..=want + 3).contains(gap), "gaps {gaps:?}");
        }
    }
}
