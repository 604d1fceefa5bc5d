//! The two writers. Each takes batches in order, writes them to its sink and acks the
//! Checkpointer. The ack/failure rules are shared; only the sink call differs.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use actix::prelude::*;
use async_trait::async_trait;
use futures::FutureExt;
use tracing::{error, warn};

use crate::checkpointer::Checkpointer;
use crate::event::AuditRow;
use crate::mailbox::Mailbox;
use crate::messages::*;
use crate::metrics::{ActorMetrics, Metrics};
use crate::ports::{FileSink, RowSink, SinkError};

/// What distinguishes the PgWriter from the ParquetWriter: the sink and how it is called.
#[async_trait]
pub trait SinkTarget: Send + Sync + 'static {
    const SINK: Sink;
    const ACTOR: &'static str;
    /// `stream` names the staged files (see [`crate::ports::staged_prefix`]).
    async fn write(
        &self,
        stream: &str,
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
        _stream: &str,
        rows: Arc<Vec<AuditRow>>,
    ) -> Result<WriteOutcome, SinkError> {
        self.0.write_rows(&rows).await.map(WriteOutcome::Rows)
    }
}

#[async_trait]
impl SinkTarget for ParquetTarget {
    const SINK: Sink = Sink::Parquet;
    const ACTOR: &'static str = "parquet_writer";
    async fn write(
        &self,
        stream: &str,
        rows: Arc<Vec<AuditRow>>,
    ) -> Result<WriteOutcome, SinkError> {
        self.0.stage(stream, rows).await.map(WriteOutcome::Staged)
    }
}

pub type PgWriter = Writer<PgTarget>;
pub type ParquetWriter = Writer<ParquetTarget>;

pub struct Writer<T: SinkTarget> {
    target: Arc<T>,
    stream: Arc<str>,
    checkpointer: Mailbox<Checkpointer>,
    epoch: Epoch,
    metrics: Arc<Metrics>,
    actor: ActorMetrics,
}

impl<T: SinkTarget> Writer<T> {
    pub(crate) fn new(
        target: T,
        stream: Arc<str>,
        checkpointer: Mailbox<Checkpointer>,
        epoch: Epoch,
        metrics: Arc<Metrics>,
    ) -> Self {
        Writer {
            actor: metrics.actor(T::ACTOR),
            target: Arc::new(target),
            stream,
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
        let stream = self.stream.clone();
        let write = async move {
            if msg.rows.is_empty() {
                return Ok(Ok(match T::SINK {
                    Sink::Postgres => WriteOutcome::Rows(Default::default()),
                    Sink::Parquet => WriteOutcome::Staged(Vec::new()),
                }));
            }
            // A panic in the sink must not kill the arbiter: it becomes a failed ack and a
            // supervised restart (actix itself does not restart on a panic).
            AssertUnwindSafe(target.write(&stream, msg.rows))
                .catch_unwind()
                .await
        };
        AtomicResponse::new(Box::pin(write.into_actor(self).map(
            move |result, act, ctx| {
                drop(timer);
                let result = match result {
                    Ok(Ok(outcome)) => {
                        act.count(&outcome);
                        Ok(outcome)
                    }
                    Ok(Err(error)) => {
                        warn!(actor = T::ACTOR, ?batch, %error, "write failed");
                        Err(error.to_string())
                    }
                    Err(_) => {
                        error!(
                            actor = T::ACTOR,
                            ?batch,
                            "the writer panicked; restarting it"
                        );
                        ctx.stop();
                        Err(format!("{} panicked", T::ACTOR))
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
