//! The Mapper: raw events → rows and dead letters, deduplicated, then fanned out to every
//! writer.
//!
//! Deduplication is what keeps the Parquet dataset, which has no primary key, free of repeats.
//! It has two parts, and neither depends on a setting remembered from an earlier run:
//! * events already in the dataset: the store's event index (every committed event, by id,
//!   whatever stream or safety lag committed it) is asked for each batch;
//! * events of batches in flight, not committed yet: a set held here, from which a batch's
//!   events leave when it commits (the index has them then), so it holds at most the
//!   in-flight batches.
//!
//! The store refuses a commit that would write an indexed event again, so a dedup miss (two
//! processes, a second stream) costs a rewind, never a duplicate.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use chrono::SubsecRound;
use tracing::{error, warn};

use crate::clock::Clock;
use crate::epoch::EpochView;
use crate::event::{ApiVersion, AuditRow, DeadLetter, SeenId};
use crate::guard::{catch_panic_now, guarded};
use crate::mapping::map_or_dead_letter;
use crate::messages::*;
use crate::metrics::{ActorMetrics, Metrics, SourceKey, SourceMetrics};
use crate::outbox::Outbox;
use crate::ports::{CheckpointStore, SinkError};

pub struct Mapper {
    account_id: Arc<str>,
    api_version: ApiVersion,
    counters: SourceMetrics,
    expect: Outbox<ExpectBatch>,
    failed: Outbox<BatchFailed>,
    restarted: Outbox<ActorRestarted>,
    writers: Vec<Outbox<WriteBatch>>,
    store: Arc<dyn CheckpointStore>,
    /// Joined by [`ResetDedup`]: the dedup set is of that epoch, pages of others are stale.
    epoch: EpochView,
    actor: ActorMetrics,
    clock: Clock,
    lookup_timeout: Duration,
    /// Events passed on in this epoch and not committed yet, with their batch's sequence
    /// number. Every event passed on in the epoch is here or in the store's index.
    in_flight: HashMap<String, u64>,
    /// Events the row sink refused: dead letters (id → reason).
    quarantine: Arc<BTreeMap<String, String>>,
}

/// What one batch maps to, before the store is asked which events it already holds.
struct MappedBatch {
    ingestion_time: chrono::DateTime<chrono::Utc>,
    rows: Vec<AuditRow>,
    dead_letters: Vec<DeadLetter>,
    duplicates: u64,
}

/// What a Mapper is started with.
pub(crate) struct MapperDeps {
    pub account_id: Arc<str>,
    pub api_version: ApiVersion,
    /// The Checkpointer learns of each batch here, before any writer gets it.
    pub expect: Outbox<ExpectBatch>,
    pub failed: Outbox<BatchFailed>,
    pub restarted: Outbox<ActorRestarted>,
    /// One per sink.
    pub writers: Vec<Outbox<WriteBatch>>,
    pub store: Arc<dyn CheckpointStore>,
    pub epoch: EpochView,
    pub metrics: Arc<Metrics>,
    pub clock: Clock,
    pub lookup_timeout: Duration,
}

impl Mapper {
    pub(crate) fn new(deps: MapperDeps) -> Self {
        Mapper {
            actor: deps.metrics.actor("mapper"),
            counters: deps
                .metrics
                .source(&SourceKey::new(&deps.account_id, deps.api_version)),
            account_id: deps.account_id,
            api_version: deps.api_version,
            expect: deps.expect,
            failed: deps.failed,
            restarted: deps.restarted,
            writers: deps.writers,
            store: deps.store,
            epoch: deps.epoch,
            clock: deps.clock,
            lookup_timeout: deps.lookup_timeout,
            in_flight: HashMap::new(),
            quarantine: Arc::default(),
        }
    }

    fn map_batch(&mut self, page: &mut FetchedPage) -> MappedBatch {
        // Microseconds, as PostgreSQL keeps them: both sinks hold the same value.
        let now = self.clock.now().trunc_subsecs(6);
        let mut mapped = MappedBatch {
            ingestion_time: now,
            rows: Vec::with_capacity(page.events.len()),
            dead_letters: Vec::new(),
            duplicates: 0,
        };
        for unreadable in page.unreadable.drain(..) {
            warn!(account = %self.account_id, reason = %unreadable.reason, "unreadable event dead-lettered");
            mapped.dead_letters.push(DeadLetter {
                account_id: self.account_id.to_string(),
                reason: format!("the event is not readable JSON: {}", unreadable.reason),
                raw_event: unreadable.bytes,
                first_seen: now,
            });
        }
        for raw in &page.events {
            match map_or_dead_letter(self.api_version, raw.get(), &self.account_id, now) {
                Ok(row) => {
                    if let Some(reason) = self.quarantine.get(&row.event_id) {
                        mapped.dead_letters.push(DeadLetter {
                            account_id: self.account_id.to_string(),
                            reason: reason.clone(),
                            raw_event: row.raw_event.as_bytes().to_vec(),
                            first_seen: now,
                        });
                        continue;
                    }
                    if self.in_flight.contains_key(&row.event_id) {
                        mapped.duplicates += 1;
                        continue;
                    }
                    self.in_flight.insert(row.event_id.clone(), page.batch.seq);
                    mapped.rows.push(row);
                }
                Err(dead) => {
                    warn!(account = %self.account_id, reason = %dead.reason, "event dead-lettered");
                    mapped.dead_letters.push(dead);
                }
            }
        }
        mapped
    }

    /// Leaves out the events the dataset already holds, then sends the batch on.
    fn dispatch(
        &mut self,
        page: FetchedPage,
        mut mapped: MappedBatch,
        committed: HashSet<String>,
        ctx: &mut Context<Self>,
    ) {
        if !committed.is_empty() {
            let before = mapped.rows.len();
            mapped.rows.retain(|row| !committed.contains(&row.event_id));
            mapped.duplicates += (before - mapped.rows.len()) as u64;
        }
        self.counters.events_deduplicated.inc_by(mapped.duplicates);
        self.counters
            .events_dead_lettered
            .inc_by(mapped.dead_letters.len() as u64);
        let events = seen_ids(&mapped.rows);
        // The Checkpointer learns of the batch before any writer can ack it.
        self.expect.do_send(ExpectBatch {
            batch: page.batch,
            events,
            ingestion_time: mapped.ingestion_time,
            dead_letters: mapped.dead_letters,
            progress: page.progress,
            completes: page.completes,
            permit: page.permit.clone(),
        });
        let write = WriteBatch {
            batch: page.batch,
            rows: Arc::new(mapped.rows),
            permit: page.permit,
        };
        let sends: Vec<_> = self
            .writers
            .iter()
            .map(|writer| writer.send(write.clone()))
            .collect();
        ctx.spawn(
            futures::future::join_all(sends)
                .into_actor(self)
                .map(|delivered, _, _| {
                    if delivered.iter().any(Result::is_err) {
                        error!("a writer's mailbox is closed");
                    }
                }),
        );
    }
}

/// The key of each row: what the event index and the Checkpointer know an event by.
fn seen_ids(rows: &[AuditRow]) -> Vec<SeenId> {
    rows.iter()
        .map(|row| SeenId {
            id: row.event_id.clone(),
            when: row.timestamp,
        })
        .collect()
}

impl Actor for Mapper {
    type Context = Context<Self>;
}

impl Supervised for Mapper {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        self.actor.restarts.inc();
        warn!("Mapper restarted");
        self.epoch.leave();
        self.in_flight.clear();
        self.restarted.do_send(ActorRestarted { actor: "mapper" });
    }
}

impl Handler<Flush> for Mapper {
    type Result = ();

    /// Answered once every page queued before it is passed on.
    fn handle(&mut self, _: Flush, _ctx: &mut Context<Self>) {}
}

impl Handler<ResetDedup> for Mapper {
    type Result = ();

    fn handle(&mut self, msg: ResetDedup, _ctx: &mut Context<Self>) {
        let _timer = self.actor.handling();
        self.epoch.join(msg.epoch);
        self.in_flight.clear();
        self.quarantine = msg.quarantine;
    }
}

impl Handler<BatchCommitted> for Mapper {
    type Result = ();

    fn handle(&mut self, msg: BatchCommitted, _ctx: &mut Context<Self>) {
        let _timer = self.actor.handling();
        if !self.epoch.is_stale(&msg) {
            self.in_flight.retain(|_, seq| *seq > msg.batch.seq);
        }
    }
}

impl Handler<FetchedPage> for Mapper {
    type Result = AtomicResponse<Self, ()>;

    /// Atomic: the next batch is mapped only once this one is sent on, so batches keep their
    /// order and the in-flight set is complete when the next batch is checked against it.
    fn handle(&mut self, mut page: FetchedPage, ctx: &mut Context<Self>) -> Self::Result {
        let _timer = self.actor.handling();
        let done = || AtomicResponse::new(Box::pin(actix::fut::ready(())));
        if self.epoch.is_stale(&page) {
            return done(); // the pipeline has rewound since this page was fetched
        }
        let mapped = match catch_panic_now(|| self.map_batch(&mut page)) {
            Some(mapped) => mapped,
            None => {
                error!(batch = ?page.batch, "the Mapper panicked; restarting it");
                ctx.stop();
                return done();
            }
        };
        let ids = seen_ids(&mapped.rows);
        let store = self.store.clone();
        let timeout = self.lookup_timeout;
        let lookup = async move {
            if ids.is_empty() {
                return Ok(HashSet::new());
            }
            guarded(timeout, "the event index", store.committed_ids(&ids))
                .await
                .unwrap_or_else(|| Err(SinkError::transient("the event index lookup panicked")))
        };
        AtomicResponse::new(Box::pin(lookup.into_actor(self).map(
            move |result, act, ctx| {
                if act.epoch.is_stale(&page) {
                    return;
                }
                match result {
                    Ok(committed) => act.dispatch(page, mapped, committed, ctx),
                    Err(error) => act.failed.do_send(BatchFailed {
                        batch: page.batch,
                        reason: format!("reading the dataset's event index failed: {error}"),
                    }),
                }
            },
        )))
    }
}
