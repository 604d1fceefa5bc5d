//! The Poller: sweeps the API window by window (design-notes §2) and sends each page on.
//!
//! A sweep covers `[checkpoint − safety lag, now)` with `before` fixed at its start (a
//! backfill: `[max(checkpoint − safety lag, start), end)`). Pages are
//! fetched one at a time; at most `max_inflight_batches` may be uncommitted at once, which is
//! the pipeline's backpressure: a slow sink stops the fetching, and memory stays bounded.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use chrono::{DateTime, Utc};
use futures::FutureExt;
use tracing::{error, info, warn};

use crate::backoff::Backoff;
use crate::checkpointer::Checkpointer;
use crate::mailbox::Mailbox;
use crate::mapper::Mapper;
use crate::messages::*;
use crate::metrics::{ActorMetrics, Metrics};
use crate::ports::{AuditSource, Direction, PageRequest, SourceError};

/// How the Poller sweeps. Built by the service from its configuration.
#[derive(Clone, Debug)]
pub struct PollerConfig {
    pub account_id: String,
    pub per_page: u32,
    pub direction: Direction,
    /// Re-read this much before the checkpoint: late events and equal timestamps.
    pub safety_lag: Duration,
    pub poll_interval: Duration,
    /// Where this stream's coverage begins: the first sweep starts here and no sweep reads
    /// before it (the safety lag is clamped), so a live stream and the backfills before it
    /// never fetch the same event. `None`: one poll interval before the first sweep, no floor.
    pub start: Option<DateTime<Utc>>,
    /// Where a bounded stream (a backfill) ends, exclusive: its sweeps stop here instead of
    /// now. `None` for the live stream.
    pub end: Option<DateTime<Utc>>,
    pub hide_user_logs: bool,
    pub max_inflight_batches: usize,
    /// Pages are coalesced into one batch up to this many events…
    pub batch_max_events: usize,
    /// …or this many bytes of raw JSON, whichever comes first; the last page of a sweep
    /// always closes its batch. Fewer, larger batches mean fewer commits and Parquet files.
    pub batch_max_bytes: usize,
    /// A sweep never fetches more pages than this (a misbehaving API cannot loop for ever).
    pub max_pages_per_sweep: u32,
    pub backoff: Backoff,
    /// Wait used on a 429 without `retry-after`.
    pub default_retry_after: Duration,
    /// How often a stopped (authentication-failed) account is tried again.
    pub auth_recheck: Duration,
    /// `run --once`: one sweep, then report; give up after this many failed attempts in a row.
    pub once: Option<u32>,
}

struct Sweep {
    since: DateTime<Utc>,
    before: DateTime<Utc>,
    next_page: u32,
    previous_first_id: Option<String>,
    previous_len: usize,
    /// Sequence number of the sweep's last batch, once sent.
    last_seq: Option<u64>,
    failed_attempts: u32,
}

pub struct Poller {
    config: Arc<PollerConfig>,
    source: Arc<dyn AuditSource>,
    mapper: Mailbox<Mapper>,
    checkpointer: Mailbox<Checkpointer>,
    metrics: Arc<Metrics>,
    actor: ActorMetrics,
    events: EventSender,
    /// `None` until the Checkpointer's first [`Resume`].
    epoch: Option<u64>,
    checkpoint: Option<DateTime<Utc>>,
    sweep: Option<Sweep>,
    /// Pages fetched and not yet sent: the batch being filled.
    pending: Vec<crate::event::RawEvent>,
    pending_bytes: usize,
    next_seq: u64,
    inflight: usize,
    fetching: bool,
    draining: bool,
    auth_failed: bool,
    /// Rewinds since the last commit (`--once` gives up after `once` of them).
    rewinds_without_commit: u32,
}

impl Poller {
    pub(crate) fn new(
        config: Arc<PollerConfig>,
        source: Arc<dyn AuditSource>,
        mapper: Mailbox<Mapper>,
        checkpointer: Mailbox<Checkpointer>,
        metrics: Arc<Metrics>,
        events: EventSender,
    ) -> Self {
        Poller {
            actor: metrics.actor("poller"),
            config,
            source,
            mapper,
            checkpointer,
            metrics,
            events,
            epoch: None,
            checkpoint: None,
            sweep: None,
            pending: Vec::new(),
            pending_bytes: 0,
            next_seq: 0,
            inflight: 0,
            fetching: false,
            draining: false,
            auth_failed: false,
            rewinds_without_commit: 0,
        }
    }

    fn lag(&self) -> chrono::Duration {
        chrono::Duration::from_std(self.config.safety_lag).unwrap_or(chrono::Duration::zero())
    }

    fn start_sweep(&mut self, epoch: u64, ctx: &mut Context<Self>) {
        if self.epoch != Some(epoch) || self.sweep.is_some() || self.draining {
            return;
        }
        let now = Utc::now();
        let since = match (self.checkpoint, self.config.start) {
            (Some(checkpoint), start) => (checkpoint - self.lag()).max(start.unwrap_or_default()),
            (None, Some(start)) => start,
            (None, None) => {
                now - chrono::Duration::from_std(self.config.poll_interval).unwrap_or_default()
            }
        };
        self.sweep = Some(Sweep {
            since,
            before: self.config.end.unwrap_or(now),
            next_page: 1,
            previous_first_id: None,
            previous_len: 0,
            last_seq: None,
            failed_attempts: 0,
        });
        self.fetch_next(ctx);
    }

    fn fetch_next(&mut self, ctx: &mut Context<Self>) {
        let Some(epoch) = self.epoch else { return };
        let Some(sweep) = &self.sweep else { return };
        if self.fetching
            || self.draining
            || sweep.last_seq.is_some()
            || self.inflight >= self.config.max_inflight_batches
        {
            return;
        }
        self.fetching = true;
        let request = PageRequest {
            account_id: self.config.account_id.clone(),
            since: sweep.since,
            before: sweep.before,
            direction: self.config.direction,
            page: sweep.next_page,
            per_page: self.config.per_page,
            hide_user_logs: self.config.hide_user_logs,
        };
        let source = self.source.clone();
        let fetch = async move {
            let result = AssertUnwindSafe(source.fetch_page(&request))
                .catch_unwind()
                .await;
            (request, result)
        };
        ctx.spawn(
            fetch
                .into_actor(self)
                .map(move |(request, result), act, ctx| match result {
                    Ok(result) => act.on_page(epoch, request, result, ctx),
                    Err(_) => {
                        error!(
                            page = request.page,
                            "the source panicked; restarting the Poller"
                        );
                        ctx.stop();
                    }
                }),
        );
    }

    fn on_page(
        &mut self,
        epoch: u64,
        request: PageRequest,
        result: Result<Vec<crate::event::RawEvent>, SourceError>,
        ctx: &mut Context<Self>,
    ) {
        self.fetching = false;
        if self.draining {
            // Nothing of this page was sent, so nothing is lost: the next run fetches it again.
            self.report_drained();
            return;
        }
        let Some(sweep) = self.sweep.as_mut() else {
            return;
        };
        if self.epoch != Some(epoch)
            || sweep.next_page != request.page
            || sweep.since != request.since
        {
            return; // a rewind happened while the request was out
        }
        let per_page = self.config.per_page as usize;
        match result {
            Ok(events) => {
                sweep.failed_attempts = 0;
                if self.auth_failed {
                    self.auth_failed = false;
                    self.set_auth_failure(None);
                    info!(account = %self.config.account_id, "API access works again; polling resumes");
                }
                self.metrics
                    .events_fetched
                    .with_label_values(&[&self.config.account_id])
                    .inc_by(events.len() as u64);
                let first_id = events.first().map(|e| first_id(e.get()));
                let sweep = self.sweep.as_mut().expect("checked above");
                if request.page > 1 && first_id.is_some() && first_id == sweep.previous_first_id {
                    warn!(account = %self.config.account_id, page = request.page,
                        "the API returned the same page again; ending the sweep here");
                    self.push_page(Vec::new(), true, ctx);
                    return;
                }
                let short = events.len() < per_page;
                let capped = request.page >= self.config.max_pages_per_sweep;
                if capped && !short {
                    warn!(account = %self.config.account_id, pages = request.page,
                        "page cap reached; the rest of the window is left for the next sweep");
                }
                sweep.previous_first_id = first_id;
                sweep.previous_len = events.len();
                sweep.next_page += 1;
                self.push_page(events, short || capped, ctx);
            }
            Err(SourceError::BadRequest(_))
                if request.page > 1 && sweep.previous_len == per_page =>
            {
                // The PostHog case: a 400 on the page after an exactly full one is the end.
                self.push_page(Vec::new(), true, ctx);
            }
            Err(SourceError::Auth(reason)) => {
                if !self.auth_failed {
                    error!(account = %self.config.account_id, %reason,
                        "Cloudflare refused the credential: check that CLOUDFLARE_API_TOKEN is valid and has \
                         'Account Settings: Read', and that CLOUDFLARE_ACCOUNT_ID is right. Polling of this \
                         account is stopped and retried every {:?}.", self.config.auth_recheck);
                    self.auth_failed = true;
                    self.set_auth_failure(Some(reason.clone()));
                }
                if self.config.once.is_some() {
                    let _ = self.events.send(PipelineEvent::Failed {
                        reason: format!("authentication failed: {reason}"),
                    });
                    return;
                }
                self.retry_later(epoch, self.config.auth_recheck, ctx);
            }
            Err(error) => {
                sweep.failed_attempts += 1;
                let attempts = sweep.failed_attempts;
                let (reason, delay) = match &error {
                    SourceError::RateLimited { retry_after } => {
                        self.metrics.api_rate_limited.inc();
                        (
                            "rate_limited",
                            retry_after.unwrap_or(self.config.default_retry_after),
                        )
                    }
                    SourceError::BadRequest(_) => {
                        ("bad_request", self.config.backoff.delay(attempts))
                    }
                    _ => ("transient", self.config.backoff.delay(attempts)),
                };
                self.metrics.api_retries.with_label_values(&[reason]).inc();
                if let Some(max_attempts) = self.config.once {
                    if attempts >= max_attempts {
                        let _ = self.events.send(PipelineEvent::Failed {
                            reason: format!(
                                "page {} failed {attempts} times: {error}",
                                request.page
                            ),
                        });
                        return;
                    }
                }
                warn!(account = %self.config.account_id, page = request.page, attempt = attempts,
                    retry_in = ?delay, %error, "page request failed; retrying");
                self.retry_later(epoch, delay, ctx);
            }
        }
    }

    fn retry_later(&mut self, epoch: u64, delay: Duration, ctx: &mut Context<Self>) {
        ctx.run_later(delay, move |act, ctx| {
            if act.epoch == Some(epoch) {
                act.fetch_next(ctx);
            }
        });
    }

    fn set_auth_failure(&self, reason: Option<String>) {
        let account = &self.config.account_id;
        let mut failures = self.metrics.health.auth_failures.lock().unwrap();
        match reason {
            Some(reason) => {
                failures.insert(account.clone(), reason);
                self.metrics
                    .auth_failed
                    .with_label_values(&[account])
                    .set(1);
            }
            None => {
                failures.remove(account);
                self.metrics
                    .auth_failed
                    .with_label_values(&[account])
                    .set(0);
            }
        }
    }

    /// Adds a page to the batch being filled; sends the batch when it is full or `last`.
    fn push_page(
        &mut self,
        events: Vec<crate::event::RawEvent>,
        last: bool,
        ctx: &mut Context<Self>,
    ) {
        self.pending_bytes += events.iter().map(|e| e.get().len()).sum::<usize>();
        self.pending.extend(events);
        let full = self.pending.len() >= self.config.batch_max_events
            || self.pending_bytes >= self.config.batch_max_bytes;
        if last || full {
            let batch = std::mem::take(&mut self.pending);
            self.pending_bytes = 0;
            self.send_batch(batch, last, ctx);
        } else {
            self.fetch_next(ctx);
        }
    }

    fn send_batch(
        &mut self,
        events: Vec<crate::event::RawEvent>,
        last: bool,
        ctx: &mut Context<Self>,
    ) {
        let (Some(epoch), Some(sweep)) = (self.epoch, self.sweep.as_mut()) else {
            return;
        };
        let batch = BatchId {
            epoch,
            seq: self.next_seq,
        };
        self.next_seq += 1;
        self.inflight += 1;
        if last {
            sweep.last_seq = Some(batch.seq);
        }
        let page = FetchedPage {
            batch,
            events,
            advances_checkpoint: self.config.direction == Direction::Asc || last,
            sweep_end: last,
            forget_before: self.checkpoint.map(|c| c - self.lag()),
        };
        // The mailbox is never full here (credits ≤ capacity), so this enqueues at once and
        // batches stay in order; the spawned future only waits for the Mapper's reply.
        ctx.spawn(
            self.mapper
                .send(page)
                .into_actor(self)
                .map(|result, _, ctx| {
                    if result.is_err() {
                        error!("the Mapper's mailbox is closed; restarting the Poller");
                        ctx.stop();
                    }
                }),
        );
        self.fetch_next(ctx);
    }

    fn report_drained(&self) {
        if self.draining && self.inflight == 0 {
            let _ = self.events.send(PipelineEvent::Drained);
        }
    }
}

fn first_id(raw: &str) -> String {
    #[derive(serde::Deserialize)]
    struct IdOnly {
        id: Option<serde_json::Value>,
    }
    serde_json::from_str::<IdOnly>(raw)
        .ok()
        .and_then(|e| e.id)
        .map(|id| id.to_string())
        .unwrap_or_else(|| raw.to_owned())
}

impl Actor for Poller {
    type Context = Context<Self>;
}

impl Supervised for Poller {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        self.actor.restarts.inc();
        warn!(account = %self.config.account_id, "Poller restarted; resuming from the committed checkpoint");
        self.epoch = None;
        self.sweep = None;
        self.pending.clear();
        self.pending_bytes = 0;
        self.inflight = 0;
        self.fetching = false;
        self.checkpointer
            .do_send(ActorRestarted { actor: "poller" });
    }
}

impl Handler<Resume> for Poller {
    type Result = ();

    fn handle(&mut self, msg: Resume, ctx: &mut Context<Self>) {
        let _timer = self.actor.handling();
        self.epoch = Some(msg.epoch);
        self.checkpoint = msg.state.checkpoint;
        self.sweep = None;
        self.pending.clear();
        self.pending_bytes = 0;
        self.next_seq = 0;
        self.inflight = 0;
        self.fetching = false;
        self.mapper.do_send(ResetDedup {
            epoch: msg.epoch,
            seen: msg.state.overlap_ids,
        });
        if let Some(reason) = msg.reason {
            if self.count_failure(&reason) {
                return;
            }
        }
        if self.draining {
            self.report_drained();
            return;
        }
        let epoch = msg.epoch;
        ctx.run_later(msg.delay, move |act, ctx| act.start_sweep(epoch, ctx));
    }
}

impl Poller {
    /// Counts a failed attempt (a rewind or a failed recovery) since the last commit; `true`
    /// when `run --once` has now failed for good.
    fn count_failure(&mut self, reason: &str) -> bool {
        self.rewinds_without_commit += 1;
        match self.config.once {
            Some(max_attempts) if self.rewinds_without_commit >= max_attempts => {
                let _ = self.events.send(PipelineEvent::Failed {
                    reason: format!(
                        "{} attempts in a row failed; the last: {reason}",
                        self.rewinds_without_commit
                    ),
                });
                true
            }
            _ => false,
        }
    }
}

impl Handler<RecoveryFailed> for Poller {
    type Result = ();

    fn handle(&mut self, msg: RecoveryFailed, _ctx: &mut Context<Self>) {
        let _timer = self.actor.handling();
        self.count_failure(&msg.reason);
    }
}

impl Handler<BatchCommitted> for Poller {
    type Result = ();

    fn handle(&mut self, msg: BatchCommitted, ctx: &mut Context<Self>) {
        let _timer = self.actor.handling();
        if self.epoch != Some(msg.batch.epoch) {
            return;
        }
        self.inflight = self.inflight.saturating_sub(1);
        self.rewinds_without_commit = 0;
        self.checkpoint = msg.checkpoint.or(self.checkpoint);
        let sweep_done = self
            .sweep
            .as_ref()
            .is_some_and(|s| s.last_seq == Some(msg.batch.seq));
        if sweep_done {
            self.sweep = None;
            let now = Utc::now();
            let account = &self.config.account_id;
            self.metrics
                .last_successful_sweep
                .with_label_values(&[account])
                .set(now.timestamp_millis() as f64 / 1e3);
            self.metrics
                .health
                .last_successful_sweep
                .lock()
                .unwrap()
                .insert(account.clone(), now);
            let _ = self.events.send(PipelineEvent::SweepCompleted {
                account_id: account.clone(),
                checkpoint: self.checkpoint,
            });
            if self.config.once.is_none() && !self.draining {
                let epoch = msg.batch.epoch;
                ctx.run_later(self.config.poll_interval, move |act, ctx| {
                    act.start_sweep(epoch, ctx)
                });
            }
        } else {
            self.fetch_next(ctx);
        }
        self.report_drained();
    }
}

impl Handler<Drain> for Poller {
    type Result = ();

    fn handle(&mut self, _: Drain, _ctx: &mut Context<Self>) {
        info!(account = %self.config.account_id, inflight = self.inflight, "draining: no new pages");
        self.draining = true;
        self.report_drained();
    }
}
