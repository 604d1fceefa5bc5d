//! The two writers. Each takes batches in order, writes them to its sink and acks the
//! Checkpointer. The ack/failure rules are shared; only the sink call differs.
//!
//! Every sink call has a deadline (`sink_timeout`): a sink that hangs (a lock on the table, a
//! stalled request) fails the batch instead of holding it, and its memory, for ever.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use async_trait::async_trait;
use futures::FutureExt;
use tracing::{error, warn};

use crate::checkpointer::Checkpointer;
use crate::event::AuditRow;
use crate::mailbox::Mailbox;
use crate::messages::*;
use crate::metrics::{ActorMetrics, Metrics};
use crate::ports::{Fence, FileSink, RejectedRow, RowSink, RowWriteReport, SinkError};

/// What distinguishes the PgWriter from the ParquetWriter: the sink and how it is called.
#[async_trait]
pub trait SinkTarget: Send + Sync + 'static {
    const SINK: Sink;
    const ACTOR: &'static str;
    /// `fence` names the stream and the lease it is written under.
    async fn write(
        &self,
        fence: &Fence,
        rows: Arc<Vec<AuditRow>>,
    ) -> Result<WriteOutcome, SinkError>;
}

/// Writes rows to PostgreSQL.
pub struct PgTarget(pub Arc<dyn RowSink>);

/// Stages Parquet files; the Checkpointer publishes them after the commit.
pub struct ParquetTarget(pub Arc<dyn FileSink>);

#[async_trait]
impl SinkTarget for PgTarget {
    const SINK: Sink = Sink::Postgres;
    const ACTOR: &'static str = "pg_writer";
    async fn write(
        &self,
        fence: &Fence,
        rows: Arc<Vec<AuditRow>>,
    ) -> Result<WriteOutcome, SinkError> {
        match self.0.write_rows(Some(fence), &rows).await {
            Err(SinkError::Rejected(_)) => isolate_rejected(&*self.0, fence, &rows).await,
            other => other,
        }
        .map(WriteOutcome::Rows)
    }
}

/// The sink refused the batch for its data: splits it in halves, again and again, until the
/// rows it refuses are found one by one. Everything else is written; the refused rows are
/// reported (they become dead letters, see the Checkpointer).
pub async fn isolate_rejected(
    sink: &dyn RowSink,
    fence: &Fence,
    rows: &[AuditRow],
) -> Result<RowWriteReport, SinkError> {
    let mut report = RowWriteReport::default();
    let mid = rows.len() / 2;
    let mut parts = vec![(mid, rows.len()), (0, mid)];
    while let Some((start, end)) = parts.pop() {
        if start == end {
            continue;
        }
        match sink.write_rows(Some(fence), &rows[start..end]).await {
            Ok(written) => {
                report.inserted += written.inserted;
                report.duplicates += written.duplicates;
                report.rejected.extend(written.rejected);
            }
            Err(SinkError::Rejected(reason)) if end - start == 1 => {
                report.rejected.push(RejectedRow {
                    event_id: rows[start].event_id.clone(),
                    reason,
                });
            }
            Err(SinkError::Rejected(_)) => {
                let mid = (start + end) / 2;
                parts.push((mid, end));
                parts.push((start, mid));
            }
            Err(other) => return Err(other),
        }
    }
    Ok(report)
}

#[async_trait]
impl SinkTarget for ParquetTarget {
    const SINK: Sink = Sink::Parquet;
    const ACTOR: &'static str = "parquet_writer";
    async fn write(
        &self,
        fence: &Fence,
        rows: Arc<Vec<AuditRow>>,
    ) -> Result<WriteOutcome, SinkError> {
        self.0
            .stage(&fence.stream, fence.lease, rows)
            .await
            .map(WriteOutcome::Staged)
    }
}

pub type PgWriter = Writer<PgTarget>;
pub type ParquetWriter = Writer<ParquetTarget>;

pub struct Writer<T: SinkTarget> {
    target: Arc<T>,
    fence: Arc<Fence>,
    timeout: Duration,
    checkpointer: Mailbox<Checkpointer>,
    epoch: Epoch,
    metrics: Arc<Metrics>,
    actor: ActorMetrics,
}

impl<T: SinkTarget> Writer<T> {
    pub(crate) fn new(
        target: T,
        fence: Arc<Fence>,
        timeout: Duration,
        checkpointer: Mailbox<Checkpointer>,
        epoch: Epoch,
        metrics: Arc<Metrics>,
    ) -> Self {
        Writer {
            actor: metrics.actor(T::ACTOR),
            target: Arc::new(target),
            fence,
            timeout,
            checkpointer,
            epoch,
            metrics,
        }
    }
}

impl<T: SinkTarget> Actor for Writer<T> {
    type Context = Context<Self>;
}

impl<T: SinkTarget> Supervised for Writer<T> {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        self.actor.restarts.inc();
        warn!(actor = T::ACTOR, "writer restarted");
        self.checkpointer
            .do_send(ActorRestarted { actor: T::ACTOR });
    }
}

impl<T: SinkTarget> Handler<WriteBatch> for Writer<T> {
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, msg: WriteBatch, _ctx: &mut Context<Self>) -> Self::Result {
        let timer = self.actor.handling();
        let batch = msg.batch;
        if self.epoch.current() != batch.epoch {
            return AtomicResponse::new(Box::pin(actix::fut::ready(())));
        }
        let target = self.target.clone();
        let fence = self.fence.clone();
        let timeout = self.timeout;
        let write = async move {
            // Held until the write is done: the slot of the in-flight budget comes back then.
            let _permit = msg.permit;
            if msg.rows.is_empty() {
                return Some(Ok(match T::SINK {
                    Sink::Postgres => WriteOutcome::Rows(Default::default()),
                    Sink::Parquet => WriteOutcome::Staged(Vec::new()),
                }));
            }
            // A panic in the sink must not kill the arbiter: it becomes a failed ack and a
            // supervised restart (actix itself does not restart on a panic).
            let call = AssertUnwindSafe(target.write(&fence, msg.rows)).catch_unwind();
            match tokio::time::timeout(timeout, call).await {
                Ok(Ok(result)) => Some(result),
                Ok(Err(_)) => None,
                Err(_) => Some(Err(SinkError::transient(format!(
                    "{} did not answer within {timeout:?}",
                    T::SINK.as_str()
                )))),
            }
        };
        AtomicResponse::new(Box::pin(write.into_actor(self).map(
            move |result, act, ctx| {
                drop(timer);
                let result = match result {
                    Some(Ok(outcome)) => {
                        act.count(&outcome);
                        Ok(outcome)
                    }
                    Some(Err(error)) => {
                        warn!(actor = T::ACTOR, ?batch, %error, "write failed");
                        Err(error)
                    }
                    None => {
                        error!(
                            actor = T::ACTOR,
                            ?batch,
                            "the writer panicked; restarting it"
                        );
                        ctx.stop();
                        Err(SinkError::transient(format!("{} panicked", T::ACTOR)))
                    }
                };
                act.checkpointer.do_send(WriterAck {
                    batch,
                    sink: T::SINK,
                    result,
                });
            },
        )))
    }
}

impl<T: SinkTarget> Writer<T> {
    fn count(&self, outcome: &WriteOutcome) {
        let sink = T::SINK.as_str();
        match outcome {
            WriteOutcome::Rows(report) => {
                self.metrics
                    .events_written
                    .with_label_values(&[sink])
                    .inc_by(report.inserted);
                self.metrics
                    .events_already_stored
                    .with_label_values(&[sink])
                    .inc_by(report.duplicates);
            }
            WriteOutcome::Staged(files) => {
                let rows: u64 = files.iter().map(|f| f.rows).sum();
                self.metrics
                    .events_written
                    .with_label_values(&[sink])
                    .inc_by(rows);
            }
        }
    }
}

impl<T: SinkTarget> Handler<Flush> for Writer<T> {
    type Result = ();

    fn handle(&mut self, _: Flush, _ctx: &mut Context<Self>) {}
}
