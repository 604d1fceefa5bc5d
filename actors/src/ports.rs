//! What the pipeline is given: an audit-log source, a row sink, a file sink and a checkpoint
//! store. The adapters (HTTP, SQL, object storage) live in the `cfaudit` crate; the tests of this
//! crate use the in-memory versions in [`crate::memory`].

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::event::{AuditRow, DeadLetter, RawEvent, SeenId};

/// Sort order of a sweep (`CLOUDFLARE_DIRECTION`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Asc,
    Desc,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Asc => "asc",
            Direction::Desc => "desc",
        }
    }
}

/// One page request of the v1 endpoint.
#[derive(Clone, Debug, PartialEq)]
pub struct PageRequest {
    pub account_id: String,
    /// Inclusive lower bound.
    pub since: DateTime<Utc>,
    /// Upper bound, fixed for the whole sweep so page numbers stay meaningful.
    pub before: DateTime<Utc>,
    pub direction: Direction,
    pub page: u32,
    pub per_page: u32,
    pub hide_user_logs: bool,
}

/// How a page request failed; the Poller decides what each kind means for the sweep.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SourceError {
    /// HTTP 429. Never retry before `retry_after`.
    #[error("rate limited by the API (retry after {retry_after:?})")]
    RateLimited { retry_after: Option<Duration> },
    /// 5xx, timeout, reset, truncated or non-JSON body, `success:false` with HTTP 200.
    #[error("transient API failure: {0}")]
    Transient(String),
    /// The credential is invalid or lacks access: retrying soon cannot help.
    #[error("authentication failed: {0}")]
    Auth(String),
    /// Any other 400. After an exactly full page this means "no more pages".
    #[error("the API rejected the request: {0}")]
    BadRequest(String),
}

#[async_trait]
pub trait AuditSource: Send + Sync + 'static {
    async fn fetch_page(&self, request: &PageRequest) -> Result<Vec<RawEvent>, SourceError>;
}

/// A sink failure. Always answered the same way: nothing after the last commit counts.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct SinkError(pub String);

impl SinkError {
    pub fn new(message: impl fmt::Display) -> Self {
        SinkError(message.to_string())
    }
}

/// What a row insert did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RowWriteReport {
    pub inserted: u64,
    /// Rows the primary key already held (overlap or retry).
    pub duplicates: u64,
}

/// The PostgreSQL side: idempotent inserts keyed by `(timestamp, event_id)`.
#[async_trait]
pub trait RowSink: Send + Sync + 'static {
    async fn write_rows(&self, rows: &[AuditRow]) -> Result<RowWriteReport, SinkError>;
}

/// A Parquet file written to the staging area, not yet visible in the dataset.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StagedFile {
    /// Path in the staging area.
    pub staged_path: String,
    /// Hive partition, `year=YYYY/month=MM/day=DD/hour=HH`.
    pub partition: String,
    pub rows: u64,
    pub bytes: u64,
}

/// A staged file whose batch committed, with the final name decided in that commit.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CommittedFile {
    pub staged_path: String,
    /// Path relative to the dataset root.
    pub final_path: String,
}

/// The final name of a file: decided in the commit, so publishing again is idempotent. The
/// account keeps names unique when several accounts share one dataset.
pub fn final_file_path(partition: &str, commit_seq: u64, account_id: &str) -> String {
    format!("{partition}/part-{commit_seq:010}-{account_id}.parquet")
}

/// Staged files of a stream start with this; the stream key ends before the `-`, and keys
/// never contain one, so one stream's prefix never matches another's files.
pub fn staged_prefix(stream: &str) -> String {
    format!("{stream}-")
}

/// The object-storage side: files are staged, then published only after their batch commits
/// (design-notes §3.2), so a reader never sees a file whose events were not committed.
#[async_trait]
pub trait FileSink: Send + Sync + 'static {
    /// Writes the rows as one file per hour partition into the staging area, named with
    /// [`staged_prefix`] of the stream.
    async fn stage(
        &self,
        stream: &str,
        rows: Arc<Vec<AuditRow>>,
    ) -> Result<Vec<StagedFile>, SinkError>;
    /// Moves committed files to their final names. Idempotent.
    async fn publish(&self, files: &[CommittedFile]) -> Result<(), SinkError>;
    /// Deletes staged files whose batch will never commit.
    async fn discard(&self, staged_paths: &[String]) -> Result<(), SinkError>;
    /// The files in the staging area whose name starts with `prefix` (see [`staged_prefix`]):
    /// a stream's recovery must never touch another stream's files in flight.
    async fn list_staged(&self, prefix: &str) -> Result<Vec<String>, SinkError>;
}

/// What is durably committed for one account.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CommittedState {
    /// The largest committed `when`; `None` before the first commit.
    pub checkpoint: Option<DateTime<Utc>>,
    /// Ids committed at or after `checkpoint − safety lag`: the overlap of the next window.
    pub overlap_ids: Vec<SeenId>,
    /// Number of commits so far; fences concurrent writers and names files.
    pub commit_seq: u64,
}

/// One atomic commit: checkpoint, overlap ids, dead letters and the staged files with their
/// final names, in one transaction.
#[derive(Clone, Debug, PartialEq)]
pub struct CommitRecord {
    pub account_id: String,
    /// The `commit_seq` this commit builds on; the store refuses the commit if it moved.
    pub previous_commit_seq: u64,
    pub state: CommittedState,
    pub dead_letters: Vec<DeadLetter>,
    pub files: Vec<(StagedFile, CommittedFile)>,
}

#[async_trait]
pub trait CheckpointStore: Send + Sync + 'static {
    async fn load(&self, account_id: &str) -> Result<CommittedState, SinkError>;
    async fn commit(&self, record: &CommitRecord) -> Result<(), SinkError>;
    /// Files committed but not yet marked published (a crash between commit and publish).
    async fn unpublished(&self, account_id: &str) -> Result<Vec<CommittedFile>, SinkError>;
    async fn mark_published(&self, final_paths: &[String]) -> Result<(), SinkError>;
}
