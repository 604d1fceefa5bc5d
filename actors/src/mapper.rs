//! The Mapper: raw events → rows and dead letters, deduplicated, then fanned out to both
//! writers.
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
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use chrono::SubsecRound;
use futures::FutureExt;
use tracing::{error, warn};

use crate::checkpointer::Checkpointer;
use crate::clock::Clock;
use crate::event::{AuditRow, DeadLetter, SeenId};
use crate::mailbox::Mailbox;
use crate::mapping::map_or_dead_letter;
use crate::messages::*;
use crate::metrics::{ActorMetrics, Metrics};
use crate::ports::{CheckpointStore, SinkError};
use crate::writer::{ParquetWriter, PgWriter};

pub struct Mapper {
    account_id: Arc<str>,
    checkpointer: Mailbox<Checkpointer>,
    pg: Mailbox<PgWriter>,
    parquet: Mailbox<ParquetWriter>,
    store: Arc<dyn CheckpointStore>,
    epoch: Epoch,
    metrics: Arc<Metrics>,
    actor: ActorMetrics,
    clock: Clock,
    lookup_timeout: Duration,
    /// The epoch whose dedup set this is; pages of other epochs are stale.
    dedup_epoch: Option<u64>,
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
    pub checkpointer: Mailbox<Checkpointer>,
    pub pg: Mailbox<PgWriter>,
    pub parquet: Mailbox<ParquetWriter>,
    pub store: Arc<dyn CheckpointStore>,
    pub epoch: Epoch,
    pub metrics: Arc<Metrics>,
    pub clock: Clock,
    pub lookup_timeout: Duration,
}

impl Mapper {
    pub(crate) fn new(deps: MapperDeps) -> Self {
        Mapper {
            actor: deps.metrics.actor("mapper"),
            account_id: deps.account_id,
            checkpointer: deps.checkpointer,
            pg: deps.pg,
            parquet: deps.parquet,
            store: deps.store,
            epoch: deps.epoch,
            metrics: deps.metrics,
            clock: deps.clock,
            lookup_timeout: deps.lookup_timeout,
            dedup_epoch: None,
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
            match map_or_dead_letter(raw.get(), &self.account_id, now) {
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
        let account = &*self.account_id;
        self.metrics
            .events_deduplicated
            .with_label_values(&[account])
            .inc_by(mapped.duplicates);
        self.metrics
            .events_dead_lettered
            .with_label_values(&[account])
            .inc_by(mapped.dead_letters.len() as u64);
        let events = seen_ids(&mapped.rows);
        // The Checkpointer learns of the batch before either writer can ack it.
        self.checkpointer.do_send(ExpectBatch {
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
        let to_pg = self.pg.send(write.clone());
        let to_parquet = self.parquet.send(write);
        ctx.spawn(
            async move {
                let (a, b) = futures::join!(to_pg, to_parquet);
                a.is_ok() && b.is_ok()
            }
            .into_actor(self)
            .map(|delivered, _, _| {
                if !delivered {
                    error!("a writer's mailbox is closed");
                }
            }),
        );
    }

    fn stale(&self, batch: BatchId) -> bool {
        self.dedup_epoch != Some(batch.epoch) || self.epoch.current() != batch.epoch
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
        self.dedup_epoch = None;
        self.in_flight.clear();
        self.checkpointer
            .do_send(ActorRestarted { actor: "mapper" });
    }
}

impl Handler<ResetDedup> for Mapper {
    type Result = ();

    fn handle(&mut self, msg: ResetDedup, _ctx: &mut Context<Self>) {
        let _timer = self.actor.handling();
        self.dedup_epoch = Some(msg.epoch);
        self.in_flight.clear();
        self.quarantine = msg.quarantine;
    }
}

impl Handler<BatchCommitted> for Mapper {
    type Result = ();

    fn handle(&mut self, msg: BatchCommitted, _ctx: &mut Context<Self>) {
        let _timer = self.actor.handling();
        if self.dedup_epoch == Some(msg.batch.epoch) {
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
        if self.stale(page.batch) {
            return done(); // the pipeline has rewound since this page was fetched
        }
        let mapped = match catch_unwind(AssertUnwindSafe(|| self.map_batch(&mut page))) {
            Ok(mapped) => mapped,
            Err(_) => {
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
            let lookup = AssertUnwindSafe(store.committed_ids(&ids)).catch_unwind();
            match tokio::time::timeout(timeout, lookup).await {
                Ok(Ok(result)) => result,
                Ok(Err(_)) => Err(SinkError::transient("the event index lookup panicked")),
                Err(_) => Err(SinkError::transient(format!(
                    "the event index did not answer within {timeout:?}"
                ))),
            }
        };
        AtomicResponse::new(Box::pin(lookup.into_actor(self).map(
            move |result, act, ctx| {
                if act.stale(page.batch) {
                    return;
                }
                match result {
                    Ok(committed) => act.dispatch(page, mapped, committed, ctx),
                    Err(error) => act.checkpointer.do_send(BatchFailed {
                        batch: page.batch,
                        reason: format!("reading the dataset's event index failed: {error}"),
                    }),
                }
            },
        )))
    }
}
