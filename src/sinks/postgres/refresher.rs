//! The dashboards' aggregates kept up to date behind the writers, by one task per process:
//! TimescaleDB's continuous aggregates materialized, plain PostgreSQL's daily aggregates folded
//! (`cfaudit_fold_days()`).
//!
//! TimescaleDB's refresh policy looks at the last few days only; older hours (a backfill, a
//! first catch-up) used to be materialized once a sweep had ended, so a 200,000-event backfill
//! waited about 3 s for it after its last commit (`make bench`). Refreshing while the writers
//! go on spreads that work over the run, on a connection of its own (not the pool's), beside
//! the writers; the refresh that ends a run finds little left. Both work only on what was
//! written since the last refresh (TimescaleDB its hours, the fold its days, each whole), so
//! a refresh with nothing new costs a few milliseconds.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use tokio::sync::{Mutex, Notify};
use tracing::warn;

use super::Postgres;

/// Cheap to clone; every clone asks the same task.
#[derive(Clone)]
pub struct AggregateRefresher {
    inner: Arc<Inner>,
}

struct Inner {
    postgres: Postgres,
    wake: Arc<Notify>,
    /// Requests made so far.
    requested: AtomicU64,
    /// One refresh at a time in the process (TimescaleDB refuses a second one on an
    /// overlapping window); it holds how many requests the last refresh to start covered.
    covered: Mutex<u64>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The task wakes, finds the refresher gone and ends.
        self.wake.notify_one();
    }
}

impl AggregateRefresher {
    /// Starts the task.
    pub fn start(postgres: &Postgres) -> AggregateRefresher {
        let wake = Arc::new(Notify::new());
        let inner = Arc::new(Inner {
            postgres: postgres.clone(),
            wake: wake.clone(),
            requested: AtomicU64::new(0),
            covered: Mutex::new(0),
        });
        let task: Weak<Inner> = Arc::downgrade(&inner);
        tokio::spawn(async move {
            // Whether refreshing is plain PostgreSQL's fold, asked at the first refresh.
            let mut folds = None;
            loop {
                wake.notified().await;
                let Some(inner) = task.upgrade() else { return };
                if folds.is_none() {
                    folds = inner.postgres.has_timescaledb().await.ok().map(|t| !t);
                }
                let started = Instant::now();
                inner.run(false).await;
                drop(inner);
                // Back to back, each refresh would recompute the day being written again. A
                // fold computes every waiting day whole again (TimescaleDB only the hours
                // written), so a long one (a busy day) is followed by a pause four times as
                // long.
                let pause = match folds {
                    Some(true) => REFRESH_GAP.max(started.elapsed() * 4),
                    _ => REFRESH_GAP,
                };
                tokio::time::sleep(pause).await;
            }
        });
        AggregateRefresher { inner }
    }

    /// Asks for a refresh in the background; requests made while one runs are served by one
    /// more after it.
    pub fn request(&self) {
        self.inner.requested.fetch_add(1, Ordering::SeqCst);
        self.inner.wake.notify_one();
    }

    /// Refreshes now, after the refresh under way, and returns once done: the end of a run,
    /// whose aggregates must read as the rows do. It covers the requests made before it, so
    /// none of them starts another refresh after it.
    pub async fn refresh(&self) {
        self.inner.run(true).await;
    }
}

/// The least time between the end of one background refresh and the start of the next: the
/// commits in between are served together, and the day being written is not recomputed
/// after every batch. On plain PostgreSQL, after a fold that took longer than a quarter of
/// this, the pause is four times its length: folding takes at most a fifth of the time.
/// (On 2 cores, gaps of 0, 0.5 and 2 s gave backfill times within the run-to-run noise of
/// each other.)
const REFRESH_GAP: Duration = Duration::from_secs(1);

/// After a refresh that failed, the next is tried this much later (or at the next commit).
const RETRY_AFTER: Duration = Duration::from_secs(30);

impl Inner {
    async fn run(&self, always: bool) {
        let mut covered = self.covered.lock().await;
        let requested = self.requested.load(Ordering::SeqCst);
        if !always && *covered >= requested {
            return;
        }
        let before = std::mem::replace(&mut *covered, requested);
        if let Err(error) = self.postgres.refresh_settled_aggregates().await {
            // Not done: the requests it was to serve are still owed.
            *covered = before;
            if always {
                let fix = self.postgres.refresh_fix().await;
                warn!(
                    error = format!("{error:#}"),
                    fix, "the dashboards' aggregates were not all brought up to date"
                );
            } else {
                warn!(error = format!("{error:#}"), retry_in = ?RETRY_AFTER, "could not bring the dashboards' aggregates up to date; tried again");
            }
            let wake = self.wake.clone();
            tokio::spawn(async move {
                tokio::time::sleep(RETRY_AFTER).await;
                wake.notify_one();
            });
        }
    }
}
