//! The Poller: sweeps the API window by window and sends the pages on in batches.
//!
//! A sweep covers `[checkpoint − safety lag, now)` with `before` fixed at its start (a
//! backfill: `[max(checkpoint − safety lag, start), end)`). Inside a sweep it pages by
//! *keyset*: each request starts from the `when` of the last event it holds (`since` oldest
//! first, `before` newest first), and the page number only counts pages within one such bound
//! (a run of events sharing one `when` that is longer than a page). Events expiring at the head
//! of the window or arriving behind the current position cannot shift what is still to come,
//! so nothing that exists is skipped; the events at the bound come back and are deduplicated.
//!
//! At most `max_inflight_batches` batches hold data at once (a [`BatchPermit`] each), which is
//! the pipeline's backpressure: a slow or hung sink stops the fetching, and memory stays
//! bounded, across rewinds too.

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use chrono::{DateTime, Utc};
use rand::rngs::StdRng;
use tracing::{error, info, warn};

use crate::backoff::Backoff;
use crate::clock::Clock;
use crate::epoch::EpochView;
use crate::event::{ApiVersion, RawEvent};
use crate::guard::catch_panic;
use crate::mapping::event_time;
use crate::messages::*;
use crate::metrics::{ActorMetrics, Metrics, SourceKey, SourceMetrics, OUT_OF_PLACE};
use crate::outbox::Outbox;
use crate::ports::{
    AuditSource, Direction, Page, PageRequest, SourceError, UnfinishedSweep, UnreadableEvent,
};

/// How the Poller sweeps. Built by the service from its configuration.
#[derive(Clone, Debug)]
pub struct PollerConfig {
    pub account_id: String,
    /// Which API the stream reads; the time of an event is where this version puts it.
    pub api_version: ApiVersion,
    pub per_page: u32,
    pub direction: Direction,
    /// Re-read this much before the checkpoint: late events and equal timestamps.
    pub safety_lag: Duration,
    pub poll_interval: Duration,
    /// Where this stream's coverage begins: the first sweep starts here and no sweep reads
    /// before it (the safety lag is clamped). `None`: one poll interval before the first sweep.
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
    /// A sweep never fetches more pages than this (a misbehaving API cannot loop for ever);
    /// the next sweep continues from what is committed.
    pub max_pages_per_sweep: u32,
    pub backoff: Backoff,
    /// Wait used on a 429 without `retry-after`.
    pub default_retry_after: Duration,
    /// The longest wait a server may ask for (`retry-after`): a broken proxy cannot stall the
    /// stream for a day.
    pub max_server_wait: Duration,
    /// How often a stopped (authentication-failed) account is tried again.
    pub auth_recheck: Duration,
    /// `run --once`: sweep until one reaches the end of its window, then report; give up
    /// after this many failed attempts in a row.
    pub once: Option<u32>,
}

/// A page answered with the same first event as the page before it is asked again this many
/// times before the sweep gives up on the API.
const REPEATED_PAGE_RETRIES: u32 = 3;

/// An answer that must be confirmed (see [`Sweep::reach`]) is asked for at most this many
/// times without two answers agreeing before the sweep gives up on the API.
const UNCONFIRMED_ANSWER_ASKS: u32 = 6;

/// The smallest step of `when` (the pipeline keeps microseconds).
fn tick() -> chrono::Duration {
    chrono::Duration::microseconds(1)
}

/// What an answer to the sweep's request must show before it is read (see [`Sweep::reach`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reach {
    /// It holds this event (its fingerprint), one the sweep read at the bound.
    Holds(u64),
    /// Nothing read fixes where it starts: a second answer to the same request confirms it.
    Confirm,
    /// Nothing to check.
    Trusted,
}

/// An answer held until a second one confirms it: the request, the page's fingerprint, and
/// its first event's fingerprint and `when`.
type Unconfirmed = (PageRequest, u64, Option<(u64, DateTime<Utc>)>);

/// How a sweep ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SweepEnd {
    /// It reached the end of its window.
    Complete,
    /// Cut short (page cap, an API that repeats a page): the next sweep continues.
    CutShort,
}

struct Sweep {
    direction: Direction,
    /// The window: `[since, before)`, fixed for the sweep.
    since: DateTime<Utc>,
    before: DateTime<Utc>,
    /// Oldest first: the next request's `since`; newest first: its `before`.
    anchor: DateTime<Utc>,
    /// The page within the anchor…
    page: u32,
    /// …counted among the events at exactly this instant, a run of equal `when` longer than
    /// a page (see [`Sweep::in_run`]).
    run: Option<DateTime<Utc>>,
    /// Where the sweep started, to tell whether a sweep cut short made progress.
    first: (DateTime<Utc>, u32),
    per_page: u32,
    /// Pages answered in this sweep (the cap).
    pages: u32,
    /// Oldest first: the `when` of the last event read (the checkpoint it allows).
    reached: Option<DateTime<Utc>>,
    /// Newest first: the newest event read, this sweep or the unfinished one it resumes.
    newest: Option<DateTime<Utc>>,
    /// The fingerprint of the page before `page` within the bound.
    previous_page: Option<u64>,
    previous_full: bool,
    /// A short answer asks for a second one before it ends the window (or a run of equal
    /// `when`): a short, unmoved answer to exactly this request is that confirmation.
    confirm: Option<PageRequest>,
    repeats: u32,
    /// Whether this sweep has read its run of equal `when` again from its first page (see
    /// [`Sweep::restart_run`]); once per sweep, so an API that ignores the page number cannot
    /// keep it going.
    run_restarted: bool,
    /// Sequence number of the sweep's last batch and how the sweep ended, once sent.
    last_seq: Option<u64>,
    end: Option<SweepEnd>,
    failed_attempts: u32,
    /// A fresh sweep commits its window before it fetches anything (so before anything it
    /// fetches can reach a sink): whatever stops it, the next run finishes it, and re-reads
    /// what it wrote and did not commit. `Some(seq)` while that commit is on its way.
    announce: bool,
    announcing: Option<u64>,
    /// See [`UnfinishedSweep::bound_event`].
    bound_event: Option<u64>,
    /// An answer that had to be confirmed: the request, the page's fingerprint and its first
    /// event (fingerprint and `when`), and how many answers were asked for without two
    /// agreeing.
    unconfirmed: Option<Unconfirmed>,
    confirm_asks: u32,
    /// v2: the cursor of the next page of the chain being read, and the window the chain was
    /// started with (a cursor belongs to its query); while an end is confirmed, the request
    /// that ended the chain, sent again as it was. Never committed: a resumed sweep starts a
    /// new chain from its bound.
    cursor: Option<String>,
    chain: Option<(DateTime<Utc>, DateTime<Utc>)>,
}

impl Sweep {
    fn resume(at: &UnfinishedSweep, per_page: u32) -> Sweep {
        // Inside a run of equal `when`, page numbers only mean something with the page size
        // they were counted in.
        let per_page = if at.page > 1 { at.per_page } else { per_page };
        Sweep {
            direction: at.direction,
            since: at.since,
            before: at.before,
            anchor: at.anchor,
            page: at.page,
            run: at.run,
            first: (at.anchor, at.page),
            per_page,
            pages: 0,
            reached: None,
            newest: at.newest,
            previous_page: at.previous_page,
            bound_event: at.bound_event,
            previous_full: false,
            confirm: None,
            repeats: 0,
            run_restarted: false,
            last_seq: None,
            end: None,
            failed_attempts: 0,
            announce: false,
            announcing: None,
            unconfirmed: None,
            confirm_asks: 0,
            cursor: None,
            chain: None,
        }
    }

    /// Paging inside a run of events sharing one `when` (more than a page of them): the window
    /// is that instant alone, so an event expiring or arriving anywhere else cannot shift the
    /// page offsets.
    fn in_run(&self) -> bool {
        self.run.is_some()
    }

    /// The request for the sweep's position. `before` is sent as the exclusive bound it is,
    /// or one microsecond less to an API found to treat it as inclusive. A v2 chain's pages
    /// (and its confirmation) are sent with the chain's window.
    fn request(&self, config: &PollerConfig, before_inclusive: bool) -> PageRequest {
        let (since, before) = match self.chain {
            Some(window) => window,
            None => {
                let (since, before) = match (self.run, self.direction) {
                    (Some(at), _) => (at, at + tick()),
                    (None, Direction::Asc) => (self.anchor, self.before),
                    (None, Direction::Desc) => (self.since, self.anchor),
                };
                // v2 documents `since` as "newer than": a chain starts a microsecond before
                // its bound, so the bound's events are read (again, deduplicated), never
                // skipped.
                let since = match config.api_version {
                    ApiVersion::V1 => since,
                    ApiVersion::V2 => since - tick(),
                };
                let before = if before_inclusive {
                    before - tick()
                } else {
                    before
                };
                (since, before)
            }
        };
        PageRequest {
            account_id: config.account_id.clone(),
            api_version: config.api_version,
            since,
            before,
            direction: self.direction,
            page: self.page,
            per_page: self.per_page,
            cursor: self.cursor.clone(),
            hide_user_logs: config.hide_user_logs,
        }
    }

    /// v2: the page ended its chain (no cursor): the next request starts a new one from the
    /// bound.
    fn end_chain(&mut self) {
        self.cursor = None;
        self.chain = None;
    }

    /// Whether a page cannot be the answer to `request`: it holds an event on the far side of
    /// the bound the sweep has moved (a stale or repeated page). Read as the answer, it would
    /// move the page number past a page never seen.
    fn stale(&self, request: &PageRequest, whens: &[Option<DateTime<Utc>>]) -> bool {
        whens.iter().flatten().any(|&when| match self.direction {
            Direction::Asc => when < request.since,
            Direction::Desc => when > request.before,
        })
    }

    /// What an answer to `request` must show before it is read. Keyset paging reads the
    /// events at the bound again, so an answer without them skipped events, or answers another
    /// request: a cache or balancer that mixes up answers, or the answer last given to a
    /// process killed since (found by the chaos test, then by the simulation). Once the sweep
    /// has moved its bound it knows such an event. Where it does not (the first page of a
    /// window, a run's next page, the page after a run), a second answer to the same request
    /// confirms the first. That includes the live stream's polls oldest first: checking only
    /// that the first page starts by the checkpoint let the previous sweep's last page through,
    /// and the events that arrived late in front of it were lost (found by the simulation).
    fn reach(&self, request: &PageRequest) -> Reach {
        if request.cursor.is_some() {
            // A cursor's page continues the chain its first page (no cursor) started.
            return Reach::Trusted;
        }
        if request.page > 1 {
            // A run's pages hold none of the pages before; other pages after the first follow
            // a page with no usable `when`, whose events are not the bound's.
            return if self.in_run() {
                Reach::Confirm
            } else {
                Reach::Trusted
            };
        }
        match self.bound_event {
            Some(event) => Reach::Holds(event),
            None => Reach::Confirm,
        }
    }

    /// After `page` (the answer to `request`) moved the bound: the first event on it at the
    /// bound, which the answer from the bound starts with (the events at the bound come first,
    /// from the first one: v1 pages a run of them longer than a page by number). `None` where
    /// the bound is not an event's `when` (clamped to the window), or where the run may have
    /// begun on the page before (a cursor's page that starts at the bound).
    fn note_bound_event(
        &mut self,
        request: &PageRequest,
        page: &Page,
        whens: &[Option<DateTime<Utc>>],
    ) {
        let last = whens.iter().rev().find_map(|&when| when);
        self.bound_event = last
            .filter(|&t| Some(t) == self.boundary(whens))
            .and_then(|t| whens.iter().position(|&when| when == Some(t)))
            .filter(|&i| i > 0 || request.cursor.is_none())
            .and_then(|i| page.event_fingerprints().nth(i));
    }

    /// Whether `page` holds `event` after nothing but events whose `when` passes `ahead`.
    fn holds_after(
        page: &Page,
        whens: &[Option<DateTime<Utc>>],
        event: u64,
        ahead: impl Fn(DateTime<Utc>) -> bool,
    ) -> bool {
        page.event_fingerprints()
            .position(|f| f == event)
            .is_some_and(|i| whens[..i].iter().all(|when| when.is_some_and(&ahead)))
    }

    /// Whether an answer lacks what [`Sweep::reach`] asked of it. The bound's event must come
    /// after nothing but events at the bound (ones that arrived late at that instant may sort
    /// before it): an answer to another request may hold it further down.
    fn misses(&self, reach: Reach, page: &Page, whens: &[Option<DateTime<Utc>>]) -> bool {
        match reach {
            Reach::Holds(event) => {
                let at = match self.direction {
                    Direction::Asc => self.anchor,
                    Direction::Desc => self.anchor - tick(),
                };
                let at = self.run.unwrap_or(at);
                !Sweep::holds_after(page, whens, event, |when| when == at)
            }
            Reach::Confirm | Reach::Trusted => false,
        }
    }

    /// Whether `page` confirms the answer to the same request before it: the same page, or
    /// one that holds that answer's first event after nothing but events on the near side of
    /// it, which arrived meanwhile (on a busy account the top of a window newest first changes
    /// between two requests; demanding the same page, a stream could never get past it). An
    /// answer to another request may share that event further down, after older events or
    /// elements that cannot be read (found by the simulation). If not confirmed, `page` is the
    /// answer the next one must confirm.
    fn confirmed_by(
        &mut self,
        request: &PageRequest,
        page: &Page,
        whens: &[Option<DateTime<Utc>>],
    ) -> bool {
        let Some(fingerprint) = page.fingerprint() else {
            return false;
        };
        let direction = self.direction;
        let confirmed = self
            .unconfirmed
            .take()
            .is_some_and(|(asked, before, first)| {
                let extends = || {
                    first.is_some_and(|(event, at)| {
                        page.unreadable.is_empty()
                            && Sweep::holds_after(page, whens, event, |when| match direction {
                                Direction::Desc => when >= at,
                                Direction::Asc => when <= at,
                            })
                    })
                };
                asked == *request && (before == fingerprint || extends())
            });
        if !confirmed {
            let first = page
                .event_fingerprints()
                .next()
                .zip(whens.first().copied().flatten());
            self.unconfirmed = Some((request.clone(), fingerprint, first));
            self.confirm_asks += 1;
        }
        confirmed
    }

    /// Whether the page holds an event at exactly the request's `before`: the API treats it
    /// as inclusive.
    fn includes_before(request: &PageRequest, whens: &[Option<DateTime<Utc>>]) -> bool {
        whens.iter().flatten().any(|&when| when == request.before)
    }

    /// The `when` of a page's last event with a usable one, within the window: a `when` at or
    /// after `before` (an API that ignores it) never moves anything past it.
    fn boundary(&self, whens: &[Option<DateTime<Utc>>]) -> Option<DateTime<Utc>> {
        whens
            .iter()
            .rev()
            .find_map(|&when| when)
            .map(|t| t.clamp(self.since, self.before))
    }

    /// Moves the keyset bound to the last event of a page; `true` when it moved (the page held
    /// events past the previous bound).
    fn advance(&mut self, whens: &[Option<DateTime<Utc>>]) -> bool {
        let clamp = |t: DateTime<Utc>| t.clamp(self.since, self.before);
        let boundary = self.boundary(whens);
        let next = match self.direction {
            Direction::Asc => {
                self.reached = self.reached.max(boundary);
                boundary.filter(|&b| b > self.anchor)
            }
            Direction::Desc => {
                let first = whens.iter().find_map(|&when| when).map(clamp);
                self.newest = self.newest.max(first);
                boundary
                    .map(|b| b + tick())
                    .filter(|&next| next < self.anchor)
            }
        };
        match next {
            Some(anchor) => {
                self.move_anchor(anchor);
                true
            }
            None => false,
        }
    }

    /// v2: where a page of a cursor chain leaves the sweep; `Some` when it ends. The chain goes
    /// on while the API sends a cursor, whatever the page's length. Without one the window is
    /// read, once confirmed where a wrong end would lose events (newest first, a backfill), or
    /// where the page moved nothing: a new chain from the bound must find nothing past it.
    fn after_cursor_page(
        &mut self,
        request: &PageRequest,
        next_cursor: Option<String>,
        whens: &[Option<DateTime<Utc>>],
        config: &PollerConfig,
    ) -> Option<SweepEnd> {
        let read_from = (self.anchor, self.reached, self.bound_event);
        self.advance(whens);
        let confirmed = self.confirm.take().is_some_and(|c| &c == request);
        if let Some(cursor) = next_cursor {
            self.chain.get_or_insert((request.since, request.before));
            self.cursor = Some(cursor);
            // A cursor cannot be committed, so a sweep cut short resumes from its bound. Cut
            // where the bound has not moved (more events at one instant than the cap's pages
            // hold), every sweep would read the same pages again and never get past them: the
            // chain goes on past the cap until the bound moves.
            let capped = self.pages >= config.max_pages_per_sweep;
            return (capped && self.progressed()).then_some(SweepEnd::CutShort);
        }
        self.end_chain();
        // Every end is confirmed, as v1's short pages are: an end taken on a dropped page
        // would leave the rest of the window unread, and a run that ends there (`--once`, a
        // re-read after a rewind) would never read it (found by the simulation).
        if confirmed {
            return Some(SweepEnd::Complete);
        }
        // The confirmation is the request that ended the chain, sent again as it was (its
        // cursor and window): an API that dropped a page answers it right the second time,
        // while a new chain from the bound is another request that may be dropped as well.
        self.cursor = request.cursor.clone();
        self.chain = Some((request.since, request.before));
        self.confirm = Some(request.clone());
        // The confirmation reads again from where this request did, so it can bring events
        // that arrived behind the bound this page moved. A batch sent meanwhile commits the
        // position the confirmation reads from: committed past them, a rewind would never read
        // them again while a failed batch may have written them to one sink (found by the
        // simulation).
        let (anchor, reached, bound_event) = read_from;
        self.move_anchor(anchor);
        self.reached = reached;
        self.bound_event = bound_event;
        None
    }

    fn move_anchor(&mut self, anchor: DateTime<Utc>) {
        self.anchor = anchor;
        self.page = 1;
        self.run = None;
        self.previous_page = None;
        self.bound_event = None;
    }

    /// Every event of the run of equal `when` at the bound is read (a short page of the run, or
    /// the API's 400 for the page after an exactly full one): the sweep moves just past it.
    fn skip_run(&mut self) {
        let Some(at) = self.run else { return };
        let next = match self.direction {
            Direction::Asc => at + tick(),
            Direction::Desc => at,
        };
        self.move_anchor(next);
    }

    /// A page of a run of equal `when` keeps answering like the page before it. Besides an API
    /// that ignores the page number, events added at that instant since the offsets were
    /// counted do this: they sort before the offset and shift every page of the run by their
    /// number, so the next page holds what the page before held (the simulation found a stream
    /// stuck for good at such a committed offset). The run is read again from its first page
    /// (what is read twice is deduplicated); `false` when this sweep did so already.
    fn restart_run(&mut self) -> bool {
        if !self.in_run() || self.page == 1 || self.run_restarted {
            return false;
        }
        self.run_restarted = true;
        self.page = 1;
        self.previous_page = None;
        self.repeats = 0;
        true
    }

    fn progress(&self) -> SweepProgress {
        // Page offsets in the whole window (after pages with no usable `when`) shift when
        // events expire or arrive before them: a resumed sweep starts such pages again from the
        // bound. Offsets within a run of equal `when` are safe to resume from.
        let (page, previous_page) = if self.in_run() {
            (self.page, self.previous_page)
        } else {
            (1, None)
        };
        SweepProgress {
            reached: self.reached,
            position: UnfinishedSweep {
                direction: self.direction,
                since: self.since,
                before: self.before,
                anchor: self.anchor,
                page,
                per_page: self.per_page,
                run: self.run,
                previous_page,
                newest: self.newest,
                bound_event: self.bound_event,
            },
        }
    }

    /// Whether the position can be committed as it is (see [`Sweep::progress`]).
    fn resumable(&self) -> bool {
        self.in_run() || self.page == 1
    }

    /// Whether the sweep moved what the next sweep resumes from forwards (a run read again
    /// from its first page and left at an earlier page than it started from did not).
    fn progressed(&self) -> bool {
        let at = self.progress().position;
        let (anchor, page) = self.first;
        match self.direction {
            Direction::Asc if at.anchor != anchor => at.anchor > anchor,
            Direction::Desc if at.anchor != anchor => at.anchor < anchor,
            _ => at.page > page,
        }
    }
}

pub struct Poller {
    config: Arc<PollerConfig>,
    /// The log this Poller reads, as metrics and health facts know it.
    source_key: SourceKey,
    counters: SourceMetrics,
    source: Arc<dyn AuditSource>,
    pages: Outbox<FetchedPage>,
    reset_dedup: Outbox<ResetDedup>,
    committed: Outbox<BatchCommitted>,
    restarted: Outbox<ActorRestarted>,
    metrics: Arc<Metrics>,
    actor: ActorMetrics,
    events: EventSender,
    clock: Clock,
    rng: StdRng,
    /// Joined by [`Resume`]: the sweep and the batches in flight are of that epoch.
    epoch: EpochView,
    /// The in-flight budget: one permit per batch holding data.
    budget: InflightBudget,
    /// The permit of the batch being filled.
    permit: Option<BatchPermit>,
    waiting_for_permit: bool,
    checkpoint: Option<DateTime<Utc>>,
    /// The committed unfinished newest-first sweep, resumed by the next one.
    unfinished: Option<UnfinishedSweep>,
    sweep: Option<Sweep>,
    /// Pages fetched and not yet sent: the batch being filled.
    pending: Vec<RawEvent>,
    pending_unreadable: Vec<UnreadableEvent>,
    pending_bytes: usize,
    next_seq: u64,
    /// Batches of this epoch sent and not yet committed.
    inflight: usize,
    fetching: bool,
    draining: bool,
    auth_failed: bool,
    /// Learned from the API's answers: it returns events at exactly `before`.
    before_inclusive: bool,
    /// Rewinds since the last commit (`--once` gives up after `once` of them).
    rewinds_without_commit: u32,
}

/// What a Poller is started with besides its configuration.
pub(crate) struct PollerDeps {
    pub source: Arc<dyn AuditSource>,
    /// Batches go there (the Mapper).
    pub pages: Outbox<FetchedPage>,
    pub reset_dedup: Outbox<ResetDedup>,
    /// Committed batches are passed on there (the Mapper forgets their events).
    pub committed: Outbox<BatchCommitted>,
    pub restarted: Outbox<ActorRestarted>,
    pub metrics: Arc<Metrics>,
    pub events: EventSender,
    pub clock: Clock,
    pub rng: StdRng,
    pub epoch: EpochView,
    pub budget: InflightBudget,
}

impl Poller {
    pub(crate) fn new(config: Arc<PollerConfig>, deps: PollerDeps) -> Self {
        let source_key = SourceKey::new(&config.account_id, config.api_version);
        Poller {
            actor: deps.metrics.actor("poller"),
            counters: deps.metrics.source(&source_key),
            source_key,
            config,
            source: deps.source,
            pages: deps.pages,
            reset_dedup: deps.reset_dedup,
            committed: deps.committed,
            restarted: deps.restarted,
            metrics: deps.metrics,
            events: deps.events,
            clock: deps.clock,
            rng: deps.rng,
            epoch: deps.epoch,
            budget: deps.budget,
            permit: None,
            waiting_for_permit: false,
            checkpoint: None,
            unfinished: None,
            sweep: None,
            pending: Vec::new(),
            pending_unreadable: Vec::new(),
            pending_bytes: 0,
            next_seq: 0,
            inflight: 0,
            fetching: false,
            draining: false,
            auth_failed: false,
            before_inclusive: false,
            rewinds_without_commit: 0,
        }
    }

    fn lag(&self) -> chrono::Duration {
        chrono::Duration::from_std(self.config.safety_lag).unwrap_or(chrono::Duration::zero())
    }

    /// End-of-window answers are checked with one more request where a wrong "end" would
    /// lose events: newest first (the checkpoint jumps to the newest event) and in a bounded
    /// stream (a backfill is complete once).
    fn verifies_end(&self, direction: Direction) -> bool {
        direction == Direction::Desc || self.config.end.is_some()
    }

    fn start_sweep(&mut self, epoch: u64, ctx: &mut Context<Self>) {
        if self.epoch.is_stale(&epoch) || self.sweep.is_some() || self.draining {
            return;
        }
        let now = self.clock.now();
        let direction = self.config.direction;
        let sweep = match &self.unfinished {
            // The sweep before was cut short or interrupted: go on from where it stopped, in its
            // own direction (a changed CLOUDFLARE_DIRECTION applies from the next sweep), so
            // whatever it fetched and did not commit is fetched again.
            Some(u) => Sweep::resume(u, self.config.per_page),
            _ => {
                let since = match (self.checkpoint, self.config.start) {
                    (Some(checkpoint), start) => {
                        (checkpoint - self.lag()).max(start.unwrap_or(DateTime::<Utc>::MIN_UTC))
                    }
                    (None, Some(start)) => start,
                    (None, None) => {
                        now - chrono::Duration::from_std(self.config.poll_interval)
                            .unwrap_or_default()
                    }
                };
                let before = self.config.end.unwrap_or(now);
                let anchor = match direction {
                    Direction::Asc => since,
                    Direction::Desc => before,
                };
                let mut sweep = Sweep::resume(
                    &UnfinishedSweep {
                        direction,
                        since,
                        before,
                        anchor,
                        page: 1,
                        per_page: self.config.per_page,
                        run: None,
                        previous_page: None,
                        newest: None,
                        bound_event: None,
                    },
                    self.config.per_page,
                );
                sweep.announce = true;
                sweep
            }
        };
        self.sweep = Some(sweep);
        self.fetch_next(ctx);
    }

    fn fetch_next(&mut self, ctx: &mut Context<Self>) {
        let Some(epoch) = self.epoch.joined() else {
            return;
        };
        let Some(sweep) = &self.sweep else { return };
        if self.fetching
            || self.draining
            || sweep.last_seq.is_some()
            || sweep.announcing.is_some()
            || self.epoch.halted()
        {
            return;
        }
        if self.permit.is_none() {
            match self.budget.try_acquire() {
                Some(permit) => self.permit = Some(permit),
                None => {
                    self.wait_for_permit(ctx);
                    return;
                }
            }
        }
        if sweep.announce {
            let seq = self.next_seq;
            let sweep = self.sweep.as_mut().expect("checked above");
            sweep.announce = false;
            sweep.announcing = Some(seq);
            self.send_batch(None, ctx);
            return;
        }
        let request = sweep.request(&self.config, self.before_inclusive);
        self.fetching = true;
        let source = self.source.clone();
        let fetch = async move {
            let result = catch_panic(source.fetch_page(&request)).await;
            (request, result)
        };
        ctx.spawn(
            fetch
                .into_actor(self)
                .map(move |(request, result), act, ctx| match result {
                    Some(result) => act.on_page(epoch, request, result, ctx),
                    None => {
                        error!(
                            page = request.page,
                            "the source panicked; restarting the Poller"
                        );
                        ctx.stop();
                    }
                }),
        );
    }

    /// Every slot of the in-flight budget is taken (batches not committed yet, or abandoned
    /// ones a hung sink still holds): fetch again once one comes back.
    fn wait_for_permit(&mut self, ctx: &mut Context<Self>) {
        if self.waiting_for_permit {
            return;
        }
        self.waiting_for_permit = true;
        let budget = self.budget.clone();
        ctx.spawn(budget.acquire().into_actor(self).map(|permit, act, ctx| {
            act.waiting_for_permit = false;
            if let Some(permit) = permit {
                if act.permit.is_none() {
                    act.permit = Some(permit);
                }
                act.fetch_next(ctx);
            }
        }));
    }

    fn on_page(
        &mut self,
        epoch: u64,
        request: PageRequest,
        result: Result<Page, SourceError>,
        ctx: &mut Context<Self>,
    ) {
        self.fetching = false;
        if self.draining {
            // Nothing of this page was sent, so nothing is lost: the next run fetches it again.
            self.report_drained();
            return;
        }
        if self.epoch.is_stale(&epoch) {
            return;
        }
        let Some(sweep) = self.sweep.as_mut() else {
            return;
        };
        if sweep.last_seq.is_some() || sweep.request(&self.config, self.before_inclusive) != request
        {
            return; // a rewind or a new sweep happened while the request was out
        }
        match result {
            Ok(page) => self.on_answer(epoch, request, page, ctx),
            Err(SourceError::BadRequest(_)) if request.page > 1 && sweep.previous_full => {
                // The PostHog case: a 400 on the page after an exactly full one means "no such
                // page": the run of equal `when` is read entirely, or the window is.
                if sweep.in_run() {
                    sweep.skip_run();
                    self.fetch_next(ctx);
                } else {
                    self.on_answer(epoch, request, Page::default(), ctx);
                }
            }
            Err(SourceError::BadRequest(reason)) if request.cursor.is_some() => {
                // The cursor is refused (expired, or no longer the API's): a new chain from the
                // bound reads the rest, and what it reads again is deduplicated.
                sweep.end_chain();
                sweep.failed_attempts += 1;
                let attempts = sweep.failed_attempts;
                let delay = self.config.backoff.delay(attempts, &mut self.rng);
                self.metrics
                    .api_retries
                    .with_label_values(&["bad_request"])
                    .inc();
                if self.config.once.is_some_and(|max| attempts >= max) {
                    let _ = self.events.send(PipelineEvent::Failed {
                        reason: format!("the API refused {attempts} cursors in a row: {reason}"),
                    });
                    return;
                }
                warn!(account = %self.config.account_id, attempt = attempts, retry_in = ?delay,
                    %reason, "the API refused a cursor; reading on from the sweep's bound");
                self.retry_later(epoch, delay, ctx);
            }
            Err(SourceError::TooLarge { limit }) if sweep.per_page > 1 => {
                // Smaller pages; the page number is rescaled so the offset stays the same.
                let offset = (sweep.page - 1) * sweep.per_page;
                sweep.per_page /= 2;
                sweep.page = offset / sweep.per_page + 1;
                warn!(account = %self.config.account_id, limit, per_page = sweep.per_page,
                    "a page was larger than the response size limit; asking for smaller pages");
                self.fetch_next(ctx);
            }
            Err(SourceError::Auth(reason)) => {
                if !self.auth_failed {
                    error!(account = %self.config.account_id, %reason,
                        "Cloudflare refused the credential (or the account): check that CLOUDFLARE_API_TOKEN is valid and has \
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
                        let asked = retry_after.unwrap_or(self.config.default_retry_after);
                        ("rate_limited", asked.min(self.config.max_server_wait))
                    }
                    SourceError::BadRequest(_) => (
                        "bad_request",
                        self.config.backoff.delay(attempts, &mut self.rng),
                    ),
                    _ => (
                        "transient",
                        self.config.backoff.delay(attempts, &mut self.rng),
                    ),
                };
                self.metrics.api_retries.with_label_values(&[reason]).inc();
                if let Some(max_attempts) = self.config.once {
                    if attempts >= max_attempts {
                        let _ = self.events.send(PipelineEvent::Failed {
                            reason: format!("a page request failed {attempts} times: {error}"),
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

    fn on_answer(
        &mut self,
        epoch: u64,
        request: PageRequest,
        mut page: Page,
        ctx: &mut Context<Self>,
    ) {
        if self.auth_failed {
            self.auth_failed = false;
            self.set_auth_failure(None);
            info!(account = %self.config.account_id, "API access works again; polling resumes");
        }
        self.counters.events_fetched.inc_by(page.len() as u64);
        let max_pages = self.config.max_pages_per_sweep;
        let direction = self.sweep.as_ref().expect("checked by on_page").direction;
        let verifies_end = self.verifies_end(direction);
        // Each event's `when`, read once: every decision below is made on them.
        let whens: Vec<_> = page
            .events
            .iter()
            .map(|e| event_time(self.config.api_version, e.get()))
            .collect();
        let sweep = self.sweep.as_mut().expect("checked by on_page");
        sweep.failed_attempts = 0;
        let fingerprint = page.fingerprint();
        let next_cursor = page.next_cursor.take().filter(|c| !c.is_empty());
        // The next page answered like the page before it (v2: the same cursor again): the API
        // repeated a page.
        let repeated =
            (request.page > 1 && fingerprint.is_some() && fingerprint == sweep.previous_page)
                || (request.cursor.is_some() && next_cursor == request.cursor);
        if repeated || sweep.stale(&request, &whens) {
            sweep.repeats += 1;
            self.metrics
                .api_retries
                .with_label_values(&[OUT_OF_PLACE])
                .inc();
            if sweep.repeats <= REPEATED_PAGE_RETRIES {
                let delay = self.config.backoff.delay(sweep.repeats, &mut self.rng);
                warn!(account = %self.config.account_id, page = request.page, retry_in = ?delay,
                    "the API answered with a page seen before (or out of the requested range); asking again");
                self.retry_later(epoch, delay, ctx);
            } else if repeated && sweep.restart_run() {
                warn!(account = %self.config.account_id, page = request.page,
                    "a page of events sharing one time keeps answering like the page before it \
                     (events added at that time shift the pages); reading them again from the first page");
                self.fetch_next(ctx);
            } else {
                warn!(account = %self.config.account_id, page = request.page,
                    "the API keeps answering with a page seen before; the sweep ends here and the next one goes on from it");
                self.push_page(Page::default(), Some(SweepEnd::CutShort), ctx);
            }
            return;
        }
        let learns_inclusive = !self.before_inclusive && Sweep::includes_before(&request, &whens);
        let reach = match sweep.reach(&request) {
            _ if page.is_empty() => Reach::Trusted,
            // Where an element could not be read, its place (and `when`) is unknown: the page
            // cannot be shown to start at the bound, so two answers must agree.
            Reach::Holds(_) if !page.unreadable.is_empty() => Reach::Confirm,
            // How the API reads `before` is learned once, for good: from an answer to this
            // request (an answer to another one may hold an event at exactly this `before`).
            Reach::Trusted if learns_inclusive => Reach::Confirm,
            reach => reach,
        };
        let misplaced = sweep.misses(reach, &page, &whens);
        let agreed = misplaced || reach == Reach::Confirm;
        if agreed && !sweep.confirmed_by(&request, &page, &whens) {
            // Events came back: an empty answer before this one was a glitch, and cannot be
            // confirmed by one after it.
            sweep.confirm = None;
            let asks = sweep.confirm_asks;
            if misplaced {
                self.metrics
                    .api_retries
                    .with_label_values(&[OUT_OF_PLACE])
                    .inc();
                warn!(account = %self.config.account_id, since = %request.since,
                    before = %request.before, "an answer does not reach back to the events the sweep \
                    read last (an answer to another request, or those events are gone); asking again");
            }
            if asks < UNCONFIRMED_ANSWER_ASKS {
                // A first answer is confirmed at once; an answer found out of place, and any
                // disagreement, wait first (a proxy's mix-up may last a moment).
                let delay = match (asks, misplaced) {
                    (1, false) => Duration::ZERO,
                    _ => self.config.backoff.delay(asks, &mut self.rng),
                };
                self.retry_later(epoch, delay, ctx);
            } else {
                warn!(account = %self.config.account_id, asks,
                    "the API answers the same request differently every time; the sweep ends here and the next one goes on from it");
                sweep.unconfirmed = None;
                sweep.confirm_asks = 0;
                self.push_page(Page::default(), Some(SweepEnd::CutShort), ctx);
            }
            return;
        }
        sweep.unconfirmed = None;
        sweep.confirm_asks = 0;
        if agreed {
            // Two answers to this request that agree confirm an end as well.
            sweep.confirm = Some(request.clone());
        }
        if learns_inclusive {
            // `before` is inclusive for this API: ask again for one microsecond less, as from
            // now on, so no bound counts twice.
            info!(account = %self.config.account_id,
                "the API returns events at exactly `before`: it is inclusive; asking for one microsecond less");
            self.before_inclusive = true;
            self.fetch_next(ctx);
            return;
        }
        sweep.repeats = 0;
        sweep.pages += 1;
        if self.config.api_version == ApiVersion::V2 {
            let anchor = sweep.anchor;
            let end = sweep.after_cursor_page(&request, next_cursor, &whens, &self.config);
            if sweep.anchor != anchor {
                sweep.note_bound_event(&request, &page, &whens);
            }
            if end == Some(SweepEnd::CutShort) {
                warn!(account = %self.config.account_id, pages = sweep.pages,
                    "page cap reached; the next sweep goes on from here");
            }
            self.push_page(page, end, ctx);
            return;
        }
        let full = page.len() >= sweep.per_page as usize;
        let moved = sweep.advance(&whens);
        if moved {
            sweep.note_bound_event(&request, &page, &whens);
        }
        sweep.previous_full = full;
        let confirmed = sweep.confirm.take().is_some_and(|c| c == request);
        let end = if sweep.in_run() && !moved && !full {
            // The run is read to its end, once a second short answer confirms it.
            if confirmed {
                sweep.skip_run();
            } else {
                sweep.confirm = Some(request);
            }
            None
        } else if full {
            if !moved {
                // A run of equal `when` longer than a page, or (no event with a usable `when`)
                // simply the next page of the window.
                if sweep.run.is_none() {
                    sweep.run = sweep.boundary(&whens);
                }
                sweep.page += 1;
                sweep.previous_page = fingerprint;
            }
            // The cap ends a sweep where the next one can resume exactly.
            (sweep.pages >= max_pages && sweep.resumable()).then(|| {
                warn!(account = %self.config.account_id, pages = sweep.pages,
                    "page cap reached; the next sweep goes on from here");
                SweepEnd::CutShort
            })
        } else if !moved {
            // Nothing past the bound: the end of the window, once a second answer to the same
            // request confirms it (an empty page can be a glitch).
            if confirmed {
                Some(SweepEnd::Complete)
            } else {
                sweep.confirm = Some(request);
                None
            }
        } else if !verifies_end {
            // A short page past the bound: the end. Were it wrong, the next sweep's overlap
            // would read the rest.
            Some(SweepEnd::Complete)
        } else if agreed {
            // Two answers to this request agreed: a confirmation as good as the next
            // request's (newest first, a quiet sweep costs two requests, as before).
            Some(SweepEnd::Complete)
        } else {
            // Newest first or in a backfill a wrong end would lose events: the next request,
            // from the new bound, must confirm it.
            sweep.confirm = Some(sweep.request(&self.config, self.before_inclusive));
            None
        };
        self.push_page(page, end, ctx);
    }

    fn retry_later(&mut self, epoch: u64, delay: Duration, ctx: &mut Context<Self>) {
        ctx.run_later(delay, move |act, ctx| {
            if !act.epoch.is_stale(&epoch) {
                act.fetch_next(ctx);
            }
        });
    }

    fn set_auth_failure(&self, reason: Option<String>) {
        let mut failures = self.metrics.health.auth_failures.lock().unwrap();
        match reason {
            Some(reason) => {
                failures.insert(self.source_key.clone(), reason);
                self.counters.auth_failed.set(1);
            }
            None => {
                failures.remove(&self.source_key);
                self.counters.auth_failed.set(0);
            }
        }
    }

    /// Adds a page to the batch being filled; sends the batch when it is full or the sweep
    /// ends.
    fn push_page(&mut self, page: Page, end: Option<SweepEnd>, ctx: &mut Context<Self>) {
        self.pending_bytes += page.events.iter().map(|e| e.get().len()).sum::<usize>()
            + page.unreadable.iter().map(|e| e.bytes.len()).sum::<usize>();
        self.pending.extend(page.events);
        self.pending_unreadable.extend(page.unreadable);
        let full = self.pending.len() + self.pending_unreadable.len()
            >= self.config.batch_max_events
            || self.pending_bytes >= self.config.batch_max_bytes;
        if end.is_some() || full {
            self.send_batch(end, ctx);
        } else {
            self.fetch_next(ctx);
        }
    }

    fn send_batch(&mut self, end: Option<SweepEnd>, ctx: &mut Context<Self>) {
        let (Some(epoch), Some(sweep)) = (self.epoch.joined(), self.sweep.as_mut()) else {
            return;
        };
        let Some(permit) = self.permit.take() else {
            error!("a batch without an in-flight slot; this is a bug");
            return;
        };
        let batch = BatchId {
            epoch,
            seq: self.next_seq,
        };
        self.next_seq += 1;
        self.inflight += 1;
        if end.is_some() {
            sweep.last_seq = Some(batch.seq);
            sweep.end = end;
        }
        let page = FetchedPage {
            batch,
            events: std::mem::take(&mut self.pending),
            unreadable: std::mem::take(&mut self.pending_unreadable),
            progress: sweep.progress(),
            completes: (end == Some(SweepEnd::Complete)).then_some(sweep.before),
            permit,
        };
        self.pending_bytes = 0;
        // The mailbox is never full here (credits ≤ capacity), so this enqueues at once and
        // batches stay in order; the spawned future only waits for the Mapper's reply.
        ctx.spawn(
            self.pages
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

    /// The sweep's last batch is committed: report, and plan the next sweep.
    fn sweep_done(&mut self, epoch: u64, ctx: &mut Context<Self>) {
        let Some(sweep) = self.sweep.take() else {
            return;
        };
        let account = self.config.account_id.clone();
        match sweep.end {
            Some(SweepEnd::Complete) => {
                self.unfinished = None;
                let now = self.clock.now();
                self.counters
                    .last_successful_sweep
                    .set(now.timestamp_millis() as f64 / 1e3);
                self.metrics
                    .health
                    .last_successful_sweep
                    .lock()
                    .unwrap()
                    .insert(self.source_key.clone(), now);
                let _ = self.events.send(PipelineEvent::SweepCompleted {
                    account_id: account,
                    checkpoint: self.checkpoint,
                });
                if self.config.once.is_none() && !self.draining {
                    ctx.run_later(self.config.poll_interval, move |act, ctx| {
                        act.start_sweep(epoch, ctx)
                    });
                }
            }
            _ => {
                self.unfinished = Some(sweep.progress().position);
                if sweep.progressed() {
                    ctx.run_later(Duration::ZERO, move |act, ctx| act.start_sweep(epoch, ctx));
                } else if self.config.once.is_some() {
                    let _ = self.events.send(PipelineEvent::Failed {
                        reason: format!(
                            "the sweep cannot get past {}: the API answered {} pages without a newer event (a run of events sharing one time longer than MAX_PAGES_PER_SWEEP pages, or an API that ignores the page number)",
                            sweep.anchor.to_rfc3339(),
                            sweep.pages
                        ),
                    });
                } else if !self.draining {
                    warn!(account = %account, at = %sweep.anchor.to_rfc3339(),
                        "the sweep made no progress; trying again after the poll interval");
                    ctx.run_later(self.config.poll_interval, move |act, ctx| {
                        act.start_sweep(epoch, ctx)
                    });
                }
            }
        }
    }
}

impl Actor for Poller {
    type Context = Context<Self>;
}

impl Supervised for Poller {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        self.actor.restarts.inc();
        warn!(account = %self.config.account_id, "Poller restarted; resuming from the committed checkpoint");
        self.epoch.leave();
        self.sweep = None;
        self.pending.clear();
        self.pending_unreadable.clear();
        self.pending_bytes = 0;
        self.permit = None;
        self.waiting_for_permit = false;
        self.inflight = 0;
        self.fetching = false;
        self.restarted.do_send(ActorRestarted { actor: "poller" });
    }
}

impl Handler<Resume> for Poller {
    type Result = ();

    fn handle(&mut self, msg: Resume, ctx: &mut Context<Self>) {
        let _timer = self.actor.handling();
        self.epoch.join(msg.epoch);
        self.checkpoint = msg.state.checkpoint;
        self.unfinished = msg.state.unfinished;
        self.sweep = None;
        self.pending.clear();
        self.pending_unreadable.clear();
        self.pending_bytes = 0;
        self.next_seq = 0;
        self.inflight = 0;
        self.fetching = false;
        self.reset_dedup.do_send(ResetDedup {
            epoch: msg.epoch,
            quarantine: msg.quarantine,
        });
        if let Some(reason) = msg.reason {
            if msg.failed && self.count_failure(&reason) {
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
        if self.epoch.is_stale(&msg) {
            return;
        }
        // The Mapper forgets the committed events: the store's index holds them now.
        self.committed.do_send(msg.clone());
        self.inflight = self.inflight.saturating_sub(1);
        self.rewinds_without_commit = 0;
        self.checkpoint = msg.checkpoint.or(self.checkpoint);
        if let Some(sweep) = self.sweep.as_mut() {
            if sweep.announcing == Some(msg.batch.seq) {
                sweep.announcing = None;
            }
        }
        let last = self
            .sweep
            .as_ref()
            .is_some_and(|s| s.last_seq == Some(msg.batch.seq));
        if last {
            self.sweep_done(msg.batch.epoch, ctx);
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

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    fn at(minute: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 5, 1, 0, minute, 0).unwrap()
    }

    fn config() -> PollerConfig {
        PollerConfig {
            account_id: "acc".into(),
            api_version: ApiVersion::V1,
            per_page: 100,
            direction: Direction::Asc,
            safety_lag: Duration::ZERO,
            poll_interval: Duration::from_secs(60),
            start: None,
            end: None,
            hide_user_logs: false,
            max_inflight_batches: 4,
            batch_max_events: 100,
            batch_max_bytes: usize::MAX,
            max_pages_per_sweep: 100,
            backoff: Backoff {
                initial: Duration::from_millis(1),
                max: Duration::from_millis(1),
            },
            default_retry_after: Duration::from_secs(1),
            max_server_wait: Duration::from_secs(1),
            auth_recheck: Duration::from_secs(1),
            once: None,
        }
    }

    /// A fresh sweep of `[at(0), at(30))`.
    fn sweep(direction: Direction) -> Sweep {
        let anchor = match direction {
            Direction::Asc => at(0),
            Direction::Desc => at(30),
        };
        Sweep::resume(
            &UnfinishedSweep {
                direction,
                since: at(0),
                before: at(30),
                anchor,
                page: 1,
                per_page: 100,
                run: None,
                previous_page: None,
                newest: None,
                bound_event: None,
            },
            100,
        )
    }

    #[test]
    fn oldest_first_the_bound_moves_to_a_pages_last_event_and_never_past_before() {
        let mut s = sweep(Direction::Asc);
        assert!(s.advance(&[Some(at(1)), None, Some(at(5))]));
        assert_eq!((s.anchor, s.page, s.reached), (at(5), 1, Some(at(5))));
        let request = s.request(&config(), false);
        assert_eq!((request.since, request.before), (at(5), at(30)));
        assert!(
            !s.advance(&[Some(at(5)), Some(at(5))]),
            "a page at the bound alone"
        );
        assert!(
            s.advance(&[Some(at(45))]),
            "an event past before is clamped to it"
        );
        assert_eq!((s.anchor, s.reached), (at(30), Some(at(30))));
    }

    #[test]
    fn newest_first_the_bound_moves_below_a_pages_oldest_event() {
        let mut s = sweep(Direction::Desc);
        assert!(s.advance(&[Some(at(29)), Some(at(20)), Some(at(10))]));
        assert_eq!(s.anchor, at(10) + tick(), "events at 10 are asked again");
        assert_eq!(s.newest, Some(at(29)));
        assert_eq!(s.reached, None, "newest first reaches no checkpoint");
        let request = s.request(&config(), false);
        assert_eq!((request.since, request.before), (at(0), at(10) + tick()));
        assert_eq!(
            s.request(&config(), true).before,
            at(10),
            "an inclusive before"
        );
    }

    #[test]
    fn inside_a_run_of_equal_when_the_instant_alone_is_paged() {
        let mut s = sweep(Direction::Asc);
        s.run = Some(at(7));
        s.page = 3;
        let request = s.request(&config(), false);
        assert_eq!(
            (request.since, request.before, request.page),
            (at(7), at(7) + tick(), 3)
        );
        assert_eq!(s.progress().position.page, 3, "offsets inside a run resume");
        s.skip_run();
        assert_eq!((s.anchor, s.page, s.run), (at(7) + tick(), 1, None));
    }

    #[test]
    fn page_offsets_outside_a_run_are_not_resumed() {
        let mut s = sweep(Direction::Asc);
        s.page = 4;
        let position = s.progress().position;
        assert_eq!((position.anchor, position.page), (at(0), 1));
        assert!(!s.resumable());
        assert!(!s.progressed(), "the bound did not move");
    }

    #[test]
    fn a_page_from_beyond_the_bound_is_stale() {
        let mut s = sweep(Direction::Asc);
        s.advance(&[Some(at(10))]);
        let request = s.request(&config(), false);
        assert!(s.stale(&request, &[Some(at(9))]));
        assert!(!s.stale(&request, &[Some(at(10)), Some(at(11))]));
    }

    fn v2_config() -> PollerConfig {
        PollerConfig {
            api_version: ApiVersion::V2,
            max_pages_per_sweep: 3,
            ..config()
        }
    }

    /// v2, oldest first: a chain of cursors in the window the chain began with, whatever the
    /// pages' lengths; the end when no cursor comes; the bound moved for a resumed sweep.
    #[test]
    fn a_v2_sweep_follows_cursors_and_ends_without_one() {
        let config = v2_config();
        let mut s = sweep(Direction::Asc);
        let first = s.request(&config, false);
        assert_eq!(
            (first.since, first.before, first.cursor.as_deref()),
            (at(0) - tick(), at(30), None),
            "v2 may read `since` as exclusive: the bound's instant is asked for too"
        );
        // A short page with a cursor: not the end.
        let end = s.after_cursor_page(&first, Some("c1".into()), &[Some(at(2))], &config);
        assert_eq!(end, None);
        let second = s.request(&config, false);
        assert_eq!(
            (second.since, second.before, second.cursor.as_deref()),
            (at(0) - tick(), at(30), Some("c1")),
            "the cursor goes with its chain's window, not the moved bound"
        );
        assert_eq!((s.anchor, s.reached), (at(2), Some(at(2))));
        let end = s.after_cursor_page(&second, None, &[Some(at(7))], &config);
        assert_eq!(
            end, None,
            "no cursor: the same request again confirms the end"
        );
        let again = s.request(&config, false);
        assert_eq!(again, second);
        let end = s.after_cursor_page(&again, None, &[Some(at(7))], &config);
        assert_eq!(end, Some(SweepEnd::Complete), "confirmed: the end");
        assert_eq!(s.reached, Some(at(7)));
    }

    /// Where a wrong end would lose events (newest first, a backfill), a page without a
    /// cursor is confirmed by a new chain from the bound, which must find nothing past it.
    #[test]
    fn a_v2_end_is_confirmed_where_a_wrong_end_would_lose_events() {
        let config = v2_config();
        let mut s = sweep(Direction::Desc);
        let first = s.request(&config, false);
        let end = s.after_cursor_page(&first, None, &[Some(at(20)), Some(at(10))], &config);
        assert_eq!(end, None, "not yet: confirmed first");
        let confirm = s.request(&config, false);
        assert_eq!(
            confirm, first,
            "the request that ended the chain, again (an API that dropped a page answers it right)"
        );
        // The same request answered again without a cursor: the end.
        let end = s.after_cursor_page(&confirm, None, &[Some(at(20)), Some(at(10))], &config);
        assert_eq!(end, Some(SweepEnd::Complete));
        assert_eq!(s.newest, Some(at(20)));
    }

    /// Oldest first, the newest instant holding more events than a page: a chain that moved
    /// nothing ends on a page without a cursor, and that page's request, sent again with its
    /// cursor, confirms the end (found by the simulation: confirmed by a new chain from the
    /// bound, every chain's end asked for another one, for ever).
    #[test]
    fn a_confirmation_spans_the_pages_of_its_chain() {
        let config = v2_config();
        let mut s = sweep(Direction::Asc);
        let first = s.request(&config, false);
        let end = s.after_cursor_page(&first, None, &[Some(at(9))], &config);
        assert_eq!(end, None, "every end is confirmed, moved or not");
        let mut s = sweep(Direction::Asc);
        s.move_anchor(at(9));
        let request = s.request(&config, false);
        let end = s.after_cursor_page(
            &request,
            Some("tie-2".into()),
            &[Some(at(9)), Some(at(9))],
            &config,
        );
        assert_eq!(end, None);
        let second = s.request(&config, false);
        let end = s.after_cursor_page(&second, None, &[Some(at(9))], &config);
        assert_eq!(end, None, "nothing moved: confirmed first");
        let again = s.request(&config, false);
        assert_eq!(again, second, "the same request, its cursor included");
        let end = s.after_cursor_page(&again, None, &[Some(at(9))], &config);
        assert_eq!(end, Some(SweepEnd::Complete));
    }

    /// A chain's end is confirmed by its last request sent again, which reads from the bound
    /// before that page: a batch sent while it is out commits that bound (and no checkpoint
    /// past it), so an event that arrived behind the page's last one, read by the confirmation
    /// and lost with a failed batch, is read again after the rewind (found by the simulation:
    /// it stayed in one sink only).
    #[test]
    fn while_an_end_is_confirmed_the_position_is_where_the_confirmation_reads() {
        let config = v2_config();
        for direction in [Direction::Asc, Direction::Desc] {
            let (first, later, last) = match direction {
                Direction::Asc => (at(2), at(10), at(20)),
                Direction::Desc => (at(20), at(10), at(2)),
            };
            let mut s = sweep(direction);
            let request = s.request(&config, false);
            s.after_cursor_page(&request, Some("c1".into()), &[Some(first)], &config);
            let bound = s.progress().position.anchor;
            let ending = s.request(&config, false);
            let end = s.after_cursor_page(&ending, None, &[Some(last)], &config);
            assert_eq!(end, None, "{direction:?}: confirmed first");
            let position = s.progress();
            assert_eq!(
                position.position.anchor, bound,
                "{direction:?}: not past what the confirmation reads"
            );
            if direction == Direction::Asc {
                assert_eq!(
                    position.reached,
                    Some(first),
                    "no checkpoint past it either"
                );
            }
            // The confirmation brings a late event behind `last`, and a cursor: the chain
            // goes on from that event.
            let again = s.request(&config, false);
            assert_eq!(again, ending);
            let end = s.after_cursor_page(&again, Some("c2".into()), &[Some(later)], &config);
            assert_eq!(end, None);
            let expected = match direction {
                Direction::Asc => later,
                Direction::Desc => later + tick(),
            };
            assert_eq!(s.progress().position.anchor, expected, "{direction:?}");
            let ending = s.request(&config, false);
            assert_eq!(
                s.after_cursor_page(&ending, None, &[Some(last)], &config),
                None
            );
            let again = s.request(&config, false);
            let end = s.after_cursor_page(&again, None, &[Some(last)], &config);
            assert_eq!(end, Some(SweepEnd::Complete), "{direction:?}");
        }
    }

    /// The page cap cuts a chain; the sweep resumes from its bound with a new chain, started
    /// a microsecond before it (v2 may read `since` as exclusive).
    #[test]
    fn a_v2_chain_cut_by_the_page_cap_resumes_from_its_bound() {
        let config = v2_config();
        let mut s = sweep(Direction::Asc);
        let request = s.request(&config, false);
        s.pages = 1;
        let end = s.after_cursor_page(&request, Some("c1".into()), &[Some(at(5))], &config);
        assert_eq!(end, None);
        let request = s.request(&config, false);
        s.pages = 3; // counted by the Poller for each page answered
        let end = s.after_cursor_page(&request, Some("c2".into()), &[Some(at(6))], &config);
        assert_eq!(end, Some(SweepEnd::CutShort));
        let resumed = Sweep::resume(&s.progress().position, 100);
        let request = resumed.request(&config, false);
        assert_eq!(request.cursor, None, "cursors are never committed");
        assert_eq!(request.since, at(6) - tick());
        assert_eq!(request.before, at(30));
    }

    /// Newest first, resumed at an instant that holds more events than the cap's pages: the
    /// chain goes on past the cap until the bound moves, or every sweep would read the same
    /// pages (found by the simulation).
    #[test]
    fn a_v2_chain_is_not_cut_where_the_bound_has_not_moved() {
        let config = v2_config();
        let mut fresh = sweep(Direction::Desc);
        let request = fresh.request(&config, false);
        fresh.pages = 1;
        let end = fresh.after_cursor_page(
            &request,
            Some("c1".into()),
            &[Some(at(20)), Some(at(20))],
            &config,
        );
        assert_eq!(end, None);
        let mut s = Sweep::resume(&fresh.progress().position, 100);
        assert_eq!(s.anchor, at(20) + tick());
        for page in 1..=5 {
            let request = s.request(&config, false);
            s.pages = page;
            let end = s.after_cursor_page(
                &request,
                Some(format!("c{page}")),
                &[Some(at(20)), Some(at(20))],
                &config,
            );
            assert_eq!(end, None, "page {page}: cut where nothing moved");
        }
        let request = s.request(&config, false);
        s.pages = 6;
        let end = s.after_cursor_page(
            &request,
            Some("c6".into()),
            &[Some(at(20)), Some(at(19))],
            &config,
        );
        assert_eq!(end, Some(SweepEnd::CutShort), "the bound moved: cut");
        assert_eq!(s.progress().position.anchor, at(19) + tick());
    }
}
