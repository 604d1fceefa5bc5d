//! The Mapper: raw events → rows and dead letters, deduplicated against everything committed
//! or in flight in this epoch, then fanned out to both writers.
//!
//! Deduplication here is what keeps the Parquet dataset free of overlap duplicates: the
//! Checkpointer's committed overlap ids seed the set at each epoch (design-notes §3.1), and the
//! ids of batches in flight are added as they pass.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use actix::prelude::*;
use chrono::{DateTime, Utc};
use tracing::{error, warn};

use crate::checkpointer::Checkpointer;
use crate::event::{AuditRow, DeadLetter, SeenId};
use crate::mailbox::Mailbox;
use crate::mapping::map_or_dead_letter;
use crate::messages::*;
use crate::metrics::{ActorMetrics, Metrics};
use crate::writer::{ParquetWriter, PgWriter};

pub struct Mapper {
    account_id: Arc<str>,
    checkpointer: Mailbox<Checkpointer>,
    pg: Mailbox<PgWriter>,
    parquet: Mailbox<ParquetWriter>,
    epoch: Epoch,
    metrics: Arc<Metrics>,
    actor: ActorMetrics,
    /// The epoch whose dedup set this is; pages of other epochs are stale.
    dedup_epoch: Option<u64>,
    seen: HashMap<String, DateTime<Utc>>,
}

/// The result of mapping one page.
struct MappedPage {
    rows: Vec<AuditRow>,
    seen: Vec<SeenId>,
    dead_letters: Vec<DeadLetter>,
    duplicates: u64,
}

impl Mapper {
    pub(crate) fn new(
        account_id: Arc<str>,
        checkpointer: Mailbox<Checkpointer>,
        pg: Mailbox<PgWriter>,
        parquet: Mailbox<ParquetWriter>,
        epoch: Epoch,
        metrics: Arc<Metrics>,
    ) -> Self {
        Mapper {
            actor: metrics.actor("mapper"),
            account_id,
            checkpointer,
            pg,
            parquet,
            epoch,
            metrics,
            dedup_epoch: None,
            seen: HashMap::new(),
        }
    }

    fn map_page(&mut self, page: &FetchedPage) -> MappedPage {
        if let Some(horizon) = page.forget_before {
            self.seen.retain(|_, when| *when >= horizon);
        }
        let now = Utc::now();
        let mut mapped = MappedPage {
            rows: Vec::with_capacity(page.events.len()),
            seen: Vec::with_capacity(page.events.len()),
            dead_letters: Vec::new(),
            duplicates: 0,
        };
        for raw in &page.events {
            match map_or_dead_letter(raw.get(), &self.account_id, now) {
                Ok(row) => {
                    if self.seen.contains_key(&row.event_id) {
                        mapped.duplicates += 1;
                        continue;
                    }
                    self.seen.insert(row.event_id.clone(), row.timestamp);
                    mapped.seen.push(SeenId {
                        id: row.event_id.clone(),
                        when: row.timestamp,
                    });
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
}

impl Actor for Mapper {
    type Context = Context<Self>;
}

impl Supervised for Mapper {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        self.actor.restarts.inc();
        warn!("Mapper restarted");
        self.dedup_epoch = None;
        self.seen.clear();
        self.checkpointer
            .do_send(ActorRestarted { actor: "mapper" });
    }
}

impl Handler<ResetDedup> for Mapper {
    type Result = ();

    fn handle(&mut self, msg: ResetDedup, _ctx: &mut Context<Self>) {
        let _timer = self.actor.handling();
        self.dedup_epoch = Some(msg.epoch);
        self.seen = msg.seen.into_iter().map(|s| (s.id, s.when)).collect();
    }
}

impl Handler<FetchedPage> for Mapper {
    type Result = ();

    fn handle(&mut self, page: FetchedPage, ctx: &mut Context<Self>) {
        let _timer = self.actor.handling();
        if self.dedup_epoch != Some(page.batch.epoch) || self.epoch.current() != page.batch.epoch {
            return; // stale: the pipeline has rewound since this page was fetched
        }
        let mapped = match catch_unwind(AssertUnwindSafe(|| self.map_page(&page))) {
            Ok(mapped) => mapped,
            Err(_) => {
                error!(batch = ?page.batch, "the Mapper panicked; restarting it");
                ctx.stop();
                return;
            }
        };
        let account = &*self.account_id;
        self.metrics
            .events_deduplicated
            .with_label_values(&[account])
            .inc_by(mapped.duplicates);
        self.metrics
            .events_dead_lettered
            .with_label_values(&[account])
            .inc_by(mapped.dead_letters.len() as u64);
        // The Checkpointer learns of the batch before either writer can ack it.
        self.checkpointer.do_send(ExpectBatch {
            batch: page.batch,
            seen: mapped.seen,
            dead_letters: mapped.dead_letters,
            advances_checkpoint: page.advances_checkpoint,
            sweep_end: page.sweep_end,
        });
        let write = WriteBatch {
            batch: page.batch,
            rows: Arc::new(mapped.rows),
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
}
