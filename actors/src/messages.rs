//! Typed messages between the actors. Every batch message carries a [`BatchId`]: the pipeline
//! epoch and a sequence number within it. A message from an older epoch is ignored.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::Message;
use chrono::{DateTime, Utc};

use crate::event::{AuditRow, DeadLetter, RawEvent, SeenId};
use crate::ports::{CommittedState, RowWriteReport, StagedFile};

/// The pipeline epoch, shared by all actors. Only the Checkpointer advances it: on any failure
/// everything after the last commit is abandoned and the pipeline resumes from the checkpoint.
#[derive(Clone, Default, Debug)]
pub struct Epoch(Arc<AtomicU64>);

impl Epoch {
    pub fn current(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }

    pub(crate) fn advance(&self) -> u64 {
        self.0.fetch_add(1, Ordering::SeqCst) + 1
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BatchId {
    pub epoch: u64,
    /// 0, 1, 2, … within the epoch; the Checkpointer commits in this order.
    pub seq: u64,
}

/// Poller → Mapper: one API page.
#[derive(Message)]
#[rtype(result = "()")]
pub struct FetchedPage {
    pub batch: BatchId,
    pub events: Vec<RawEvent>,
    /// Whether committing this batch may move the checkpoint: every batch with `asc`, only the
    /// last batch of a sweep with `desc` (newest events come first).
    pub advances_checkpoint: bool,
    pub sweep_end: bool,
    /// Ids older than this can no longer come back in a window: the Mapper forgets them.
    pub forget_before: Option<DateTime<Utc>>,
}

/// Poller → Mapper, before the first page of an epoch: the committed overlap ids.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ResetDedup {
    pub epoch: u64,
    pub seen: Vec<SeenId>,
}

/// Mapper → Checkpointer: what the batch holds, sent before the writers get it.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct ExpectBatch {
    pub batch: BatchId,
    pub seen: Vec<SeenId>,
    pub dead_letters: Vec<DeadLetter>,
    pub advances_checkpoint: bool,
    pub sweep_end: bool,
}

/// Mapper → PgWriter and ParquetWriter.
#[derive(Message, Clone)]
#[rtype(result = "()")]
pub struct WriteBatch {
    pub batch: BatchId,
    pub rows: Arc<Vec<AuditRow>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sink {
    Postgres,
    Parquet,
}

impl Sink {
    pub fn as_str(self) -> &'static str {
        match self {
            Sink::Postgres => "postgres",
            Sink::Parquet => "parquet",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum WriteOutcome {
    Rows(RowWriteReport),
    Staged(Vec<StagedFile>),
}

/// Writer → Checkpointer.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct WriterAck {
    pub batch: BatchId,
    pub sink: Sink,
    pub result: Result<WriteOutcome, String>,
}

/// Checkpointer → Poller: start (again) from this committed state.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Resume {
    pub epoch: u64,
    pub state: CommittedState,
    /// Back-off before the first request, growing with consecutive failures.
    pub delay: Duration,
    /// Why the pipeline rewound; `None` at start-up.
    pub reason: Option<String>,
}

/// Checkpointer → Poller: recovery (reload, publish, clean staging) failed; it is retried
/// after a back-off. `run --once` counts it as a failed attempt.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct RecoveryFailed {
    pub reason: String,
}

/// Checkpointer → Poller: the batch and all before it are durable in both sinks.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct BatchCommitted {
    pub batch: BatchId,
    pub checkpoint: Option<DateTime<Utc>>,
}

/// Any supervised actor → Checkpointer, from `restarting()`: in-flight work was lost.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct ActorRestarted {
    pub actor: &'static str,
}

/// Runner → Poller: stop fetching; report [`PipelineEvent::Drained`] once nothing is in flight.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Drain;

/// Runner → writers and Checkpointer at shutdown: answered once everything queued before it
/// is done, so the threads can stop with no sink call in flight.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Flush;

/// What the pipeline tells whoever runs it.
#[derive(Debug, Clone, PartialEq)]
pub enum PipelineEvent {
    /// A sweep ended and everything it fetched is committed.
    SweepCompleted {
        account_id: String,
        checkpoint: Option<DateTime<Utc>>,
    },
    /// After [`Drain`]: no batch is in flight any more.
    Drained,
    /// `--once` cannot finish (authentication error, retries exhausted).
    Failed { reason: String },
}

pub type EventSender = tokio::sync::mpsc::UnboundedSender<PipelineEvent>;
