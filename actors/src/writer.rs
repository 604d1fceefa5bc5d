//! The writers, one per sink. Each takes batches in order, writes them to its sink and acks
//! the Checkpointer. The ack/failure rules are the same for every sink; only the sink call,
//! a [`SinkTarget`], differs.
//!
//! Every sink call has a deadline (`sink_timeout`): a sink that hangs (a lock on the table, a
//! stalled request) fails the batch instead of holding it, and its memory, for ever.

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use tracing::{error, warn};

use crate::epoch::EpochView;
use crate::guard::guarded;
use crate::messages::*;
use crate::metrics::{ActorMetrics, Metrics};
use crate::outbox::Outbox;
use crate::ports::{Fence, SinkError};
use crate::sink::{SinkTarget, WriteOutcome};

/// What a writer is started with.
pub(crate) struct WriterDeps {
    pub sink: SinkId,
    /// The stream and lease the writes are made under.
    pub fence: Arc<Fence>,
    pub timeout: Duration,
    pub acks: Outbox<WriterAck>,
    pub restarted: Outbox<ActorRestarted>,
    pub epoch: EpochView,
    pub metrics: Arc<Metrics>,
}

pub struct Writer {
    target: Arc<dyn SinkTarget>,
    deps: WriterDeps,
    actor: ActorMetrics,
}

impl Writer {
    pub(crate) fn new(target: Arc<dyn SinkTarget>, deps: WriterDeps) -> Self {
        Writer {
            actor: deps.metrics.actor(target.actor()),
            target,
            deps,
        }
    }
}

impl Actor for Writer {
    type Context = Context<Self>;
}

impl Supervised for Writer {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        self.actor.restarts.inc();
        let actor = self.target.actor();
        warn!(actor, "writer restarted");
        self.deps.restarted.do_send(ActorRestarted { actor });
    }
}

impl Handler<WriteBatch> for Writer {
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, msg: WriteBatch, _ctx: &mut Context<Self>) -> Self::Result {
        let timer = self.actor.handling();
        if self.deps.epoch.is_stale(&msg) {
            return AtomicResponse::new(Box::pin(actix::fut::ready(())));
        }
        let batch = msg.batch;
        let target = self.target.clone();
        let fence = self.deps.fence.clone();
        let timeout = self.deps.timeout;
        let write = async move {
            // Held until the write is done: the slot of the in-flight budget comes back then.
            let _permit = msg.permit;
            if msg.rows.is_empty() {
                return Some(Ok(WriteOutcome::Nothing));
            }
            // A panic becomes a failed ack and a supervised restart.
            guarded(timeout, target.name(), target.write(&fence, msg.rows)).await
        };
        AtomicResponse::new(Box::pin(write.into_actor(self).map(
            move |result, act, ctx| {
                drop(timer);
                let actor = act.target.actor();
                let result = match result {
                    Some(Ok(outcome)) => {
                        act.count(&outcome);
                        Ok(outcome)
                    }
                    Some(Err(error)) => {
                        warn!(actor, ?batch, %error, "write failed");
                        Err(error)
                    }
                    None => {
                        error!(actor, ?batch, "the writer panicked; restarting it");
                        ctx.stop();
                        Err(SinkError::transient(format!("{actor} panicked")))
                    }
                };
                act.deps.acks.do_send(WriterAck {
                    batch,
                    sink: act.deps.sink,
                    result,
                });
            },
        )))
    }
}

impl Writer {
    fn count(&self, outcome: &WriteOutcome) {
        let sink = self.target.name();
        let metrics = &self.deps.metrics;
        match outcome {
            WriteOutcome::Rows(report) => {
                metrics
                    .events_written
                    .with_label_values(&[sink])
                    .inc_by(report.inserted);
                metrics
                    .events_already_stored
                    .with_label_values(&[sink])
                    .inc_by(report.duplicates);
            }
            WriteOutcome::Staged(files) => {
                let rows: u64 = files.iter().map(|f| f.rows).sum();
                metrics
                    .events_written
                    .with_label_values(&[sink])
                    .inc_by(rows);
            }
            WriteOutcome::Nothing => {}
        }
    }
}

impl Handler<Flush> for Writer {
    type Result = ();

    fn handle(&mut self, _: Flush, _ctx: &mut Context<Self>) {}
}
