//! Typed messages between the actors. Every message of a batch carries a [`BatchId`]: the
//! pipeline epoch and a sequence number within it. Every message made in an epoch is
//! [`Stamped`]; a stale one is ignored (see [`crate::epoch`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use actix::Message;
use chrono::{DateTime, Utc};

use crate::epoch::Stamped;
use crate::event::{AuditRow, DeadLetter, RawEvent, SeenId};
use crate::ports::{CommittedState, SinkError, UnfinishedSweep, UnreadableEvent};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::sink::WriteOutcome;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BatchId {
    pub epoch: u64,
    /// 0, 1, 2, … within the epoch; the Checkpointer commits in this order.
    pub seq: u64,
}

/// A slot of the in-flight budget (`max_inflight_batches`). A batch's data holds it wherever
/// the data is (the Mapper, both writers, the Checkpointer's pending entry), and the slot comes
/// back when the last holder drops it. A batch abandoned by a rewind keeps its slot until a
/// hung sink lets go of it, so rewinds never raise the memory in flight.
#[derive(Clone, Debug)]
pub struct BatchPermit(
    #[allow(dead_code)] Arc<(OwnedSemaphorePermit, Option<OwnedSemaphorePermit>)>,
);

impl BatchPermit {
    /// A slot of the stream's budget alone (unit tests make batches without a Poller).
    #[cfg(test)]
    pub(crate) fn new(permit: OwnedSemaphorePermit) -> Self {
        BatchPermit(Arc::new((permit, None)))
    }
}

/// The slots a batch takes before its first page is fetched: one of its stream's
/// (`max_inflight_batches`) and, where the process bounds the memory of all its streams
/// together, one of the process's (shared by every pipeline; tokio's semaphore hands slots out
/// first come, first served, so no stream starves).
#[derive(Clone, Debug)]
pub struct InflightBudget {
    stream: Arc<Semaphore>,
    process: Option<Arc<Semaphore>>,
}

impl InflightBudget {
    pub fn new(stream_slots: usize, process: Option<Arc<Semaphore>>) -> Self {
        InflightBudget {
            stream: Arc::new(Semaphore::new(stream_slots)),
            process,
        }
    }

    /// Both slots at once, or none.
    pub(crate) fn try_acquire(&self) -> Option<BatchPermit> {
        let stream = self.stream.clone().try_acquire_owned().ok()?;
        let process = match &self.process {
            Some(process) => Some(process.clone().try_acquire_owned().ok()?),
            None => None,
        };
        Some(BatchPermit(Arc::new((stream, process))))
    }

    /// Both slots, the stream's first (a stream waits for the process's slot with one of its
    /// own, so it holds at most one it is not using); `None` once a semaphore is closed.
    pub(crate) async fn acquire(self) -> Option<BatchPermit> {
        let stream = self.stream.acquire_owned().await.ok()?;
        let process = match self.process {
            Some(process) => Some(process.acquire_owned().await.ok()?),
            None => None,
        };
        Some(BatchPermit(Arc::new((stream, process))))
    }
}

/// Where a sweep stands after a batch, which is what committing the batch lets the committed
/// state say.
#[derive(Clone, Debug, PartialEq)]
pub struct SweepProgress {
    /// Oldest first: every event before this is in this batch or an earlier one (events at it
    /// may continue in the next): the checkpoint it allows. `None` newest first, or before the
    /// first event.
    pub reached: Option<DateTime<Utc>>,
    /// Where the sweep resumes.
    pub position: UnfinishedSweep,
}

/// Poller → Mapper: one batch of pages.
#[derive(Message)]
#[rtype(result = "()")]
pub struct FetchedPage {
    pub batch: BatchId,
    pub events: Vec<RawEvent>,
    pub unreadable: Vec<UnreadableEvent>,
    /// Where the sweep stands after this batch.
    pub progress: SweepProgress,
    /// On the last batch of a sweep that reached the end of its window: that end.
    pub completes: Option<DateTime<Utc>>,
    pub permit: BatchPermit,
}

/// Poller → Mapper, before the first page of an epoch.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ResetDedup {
    pub epoch: u64,
    /// Events the row sink refused (id → reason): dead letters from now on.
    pub quarantine: Arc<BTreeMap<String, String>>,
}

/// Mapper → Checkpointer: what the batch holds, sent before the writers get it.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct ExpectBatch {
    pub batch: BatchId,
    /// The events the batch writes (not yet in the dataset), and the `ingestion_time` their
    /// rows carry.
    pub events: Vec<SeenId>,
    pub ingestion_time: DateTime<Utc>,
    pub dead_letters: Vec<DeadLetter>,
    pub progress: SweepProgress,
    pub completes: Option<DateTime<Utc>>,
    pub permit: BatchPermit,
}

/// Mapper → Checkpointer: the batch could not be prepared (the dataset's event index could
/// not be read); the epoch fails.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct BatchFailed {
    pub batch: BatchId,
    pub reason: String,
}

/// Mapper → PgWriter and ParquetWriter.
#[derive(Message, Clone)]
#[rtype(result = "()")]
pub struct WriteBatch {
    pub batch: BatchId,
    pub rows: Arc<Vec<AuditRow>>,
    pub permit: BatchPermit,
}

/// One of the pipeline's sinks: its place among them (the Checkpointer waits for an ack from
/// each) and its name, in logs and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SinkId {
    pub index: usize,
    pub name: &'static str,
}

/// Writer → Checkpointer.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct WriterAck {
    pub batch: BatchId,
    pub sink: SinkId,
    pub result: Result<WriteOutcome, SinkError>,
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
    /// Whether the rewind counts as a failed attempt (`run --once` gives up after some): a
    /// rewind that only sets refused events aside is progress, not a failure.
    pub failed: bool,
    pub quarantine: Arc<BTreeMap<String, String>>,
}

/// Checkpointer → Poller: recovery (reload, publish, clean staging) failed; it is retried
/// after a back-off. `run --once` counts it as a failed attempt.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct RecoveryFailed {
    pub reason: String,
}

/// Checkpointer → Poller, and Poller → Mapper: the batch and all before it are durable in
/// both sinks.
#[derive(Message, Debug, Clone)]
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
    /// A sweep reached the end of its window and everything it fetched is committed.
    SweepCompleted {
        account_id: String,
        checkpoint: Option<DateTime<Utc>>,
    },
    /// A batch that wrote events is committed: a cue for work that follows the writers (the
    /// runner keeps TimescaleDB's aggregates materialized behind them).
    EventsCommitted,
    /// After [`Drain`]: no batch is in flight any more.
    Drained,
    /// `--once` cannot finish (authentication error, retries exhausted, no progress).
    Failed { reason: String },
    /// Another process holds the stream now; this pipeline has halted.
    Fenced { reason: String },
}

pub type EventSender = tokio::sync::mpsc::UnboundedSender<PipelineEvent>;

impl Stamped for BatchId {
    fn epoch(&self) -> u64 {
        self.epoch
    }
}

/// The messages of a batch are stamped with its epoch.
macro_rules! stamped_by_batch {
    ($($message:ty),*) => {
        $(impl Stamped for $message {
            fn epoch(&self) -> u64 {
                self.batch.epoch
            }
        })*
    };
}

stamped_by_batch!(
    FetchedPage,
    ExpectBatch,
    BatchFailed,
    WriteBatch,
    WriterAck,
    BatchCommitted
);

/// The messages that start an epoch are stamped with it.
macro_rules! stamped_by_epoch {
    ($($message:ty),*) => {
        $(impl Stamped for $message {
            fn epoch(&self) -> u64 {
                self.epoch
            }
        })*
    };
}

stamped_by_epoch!(ResetDedup, Resume);
