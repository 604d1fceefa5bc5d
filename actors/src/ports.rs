//! What the pipeline is given: an audit-log source, a row sink, a file sink and a checkpoint
//! store. The adapters (HTTP, SQL, object storage) live in the `cfaudit` crate; the tests of this
//! crate use the in-memory versions in [`crate::memory`].

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::event::{ApiVersion, AuditRow, DeadLetter, RawEvent, SeenId};

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

/// One page request. v1: the Poller pages by keyset: `since` (oldest first) or `before`
/// (newest first) follows the last event it holds, and `page` only counts pages within one
/// such bound (a run of events sharing one `when` longer than a page). v2: a chain of cursors
/// inside a fixed window, each page's `result_info.cursor` asking for the next.
#[derive(Clone, Debug, PartialEq)]
pub struct PageRequest {
    pub account_id: String,
    pub api_version: ApiVersion,
    /// Inclusive lower bound.
    pub since: DateTime<Utc>,
    /// Exclusive upper bound.
    pub before: DateTime<Utc>,
    pub direction: Direction,
    /// v1 only (v2 ignores page numbers): the page within the bound.
    pub page: u32,
    /// v1 `per_page`, v2 `limit`.
    pub per_page: u32,
    /// v2 only: the cursor the previous page of the chain ended with; `None` starts a chain
    /// at the window's first event.
    pub cursor: Option<String>,
    /// v1 only.
    pub hide_user_logs: bool,
}

/// An element of a page's `result` that is not a JSON value (invalid UTF-8, a raw control
/// character, nesting too deep). It is kept as bytes and dead-lettered, so one bad event never
/// blocks the page around it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnreadableEvent {
    pub bytes: Vec<u8>,
    pub reason: String,
}

/// One page of the source, in the API's order.
#[derive(Debug, Default)]
pub struct Page {
    pub events: Vec<RawEvent>,
    pub unreadable: Vec<UnreadableEvent>,
    /// v2: the cursor of the next page; `None` (or empty, as the API may send it) on the last
    /// page of the chain, whatever the page's length.
    pub next_cursor: Option<String>,
}

impl Page {
    /// A fingerprint of the page's content, readable or not (`None` when empty): a page
    /// answered again tells itself by it.
    pub fn fingerprint(&self) -> Option<u64> {
        use std::hash::{Hash, Hasher};
        if self.is_empty() {
            return None;
        }
        let mut hasher = twox_hash::XxHash64::with_seed(0);
        for event in &self.events {
            event.get().hash(&mut hasher);
        }
        for event in &self.unreadable {
            event.bytes.hash(&mut hasher);
        }
        Some(hasher.finish())
    }

    /// A fingerprint of each readable event, in the page's order: whether two answers share
    /// an event.
    pub fn event_fingerprints(&self) -> impl Iterator<Item = u64> + '_ {
        self.events
            .iter()
            .map(|event| twox_hash::XxHash64::oneshot(0, event.get().as_bytes()))
    }

    /// Elements on the page, readable or not: what tells a full page from a short one.
    pub fn len(&self) -> usize {
        self.events.len() + self.unreadable.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl From<Vec<RawEvent>> for Page {
    fn from(events: Vec<RawEvent>) -> Page {
        Page {
            events,
            unreadable: Vec::new(),
            next_cursor: None,
        }
    }
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
    /// The credential is invalid or lacks access, or the account does not exist: retrying
    /// soon cannot help.
    #[error("authentication failed: {0}")]
    Auth(String),
    /// Any other 400. After an exactly full page this means "no more pages".
    #[error("the API rejected the request: {0}")]
    BadRequest(String),
    /// The response body passed the size limit: the Poller asks for smaller pages.
    #[error("the response is larger than the limit of {limit} bytes")]
    TooLarge { limit: u64 },
}

#[async_trait]
pub trait AuditSource: Send + Sync + 'static {
    async fn fetch_page(&self, request: &PageRequest) -> Result<Page, SourceError>;
}

/// A sink or store failure, by what the pipeline must do about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SinkError {
    /// Network, timeout, server down: nothing after the last commit counts; retry after a
    /// back-off.
    #[error("{0}")]
    Transient(String),
    /// The data itself cannot be stored, whatever the retries (a value PostgreSQL refuses):
    /// the writer isolates the events responsible.
    #[error("{0}")]
    Rejected(String),
    /// Another process holds the stream now: this pipeline must stop, not retry.
    #[error("{0}")]
    Fenced(String),
    /// An event of the batch was committed meanwhile by someone else: rewind, and the next
    /// attempt leaves it out.
    #[error("{0}")]
    Conflict(String),
    /// A committed file's staged and final copies are both gone.
    #[error("{final_path}: {message}")]
    Lost { final_path: String, message: String },
}

impl SinkError {
    pub fn transient(message: impl std::fmt::Display) -> Self {
        SinkError::Transient(message.to_string())
    }
}

/// A row the sink refused, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RejectedRow {
    pub event_id: String,
    pub reason: String,
}

/// What a row insert did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RowWriteReport {
    pub inserted: u64,
    /// Rows the primary key already held (left by an attempt that never committed).
    pub duplicates: u64,
    /// Rows the sink cannot store (see [`SinkError::Rejected`]); everything else is written.
    pub rejected: Vec<RejectedRow>,
}

/// Who may write for a stream: its key and the lease the writing process holds. A write or a
/// commit under a lease that is no longer the stream's fails with [`SinkError::Fenced`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fence {
    pub stream: String,
    pub lease: u64,
}

/// The PostgreSQL side: idempotent inserts keyed by `(timestamp, event_id)`.
#[async_trait]
pub trait RowSink: Send + Sync + 'static {
    /// Writes the rows; with a fence, only while the fence's lease is the stream's. A row of an
    /// event already committed to the dataset is left as it is.
    async fn write_rows(
        &self,
        fence: Option<&Fence>,
        rows: &[AuditRow],
    ) -> Result<RowWriteReport, SinkError>;
}

/// A Parquet file written to the staging area, not yet visible in the dataset.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StagedFile {
    /// Name in the staging area (see [`staged_name`]).
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

/// The hive partition of an event time: `year=YYYY/month=MM/day=DD/hour=HH` of its UTC hour.
pub fn partition_of(timestamp: DateTime<Utc>) -> String {
    timestamp
        .format("year=%Y/month=%m/day=%d/hour=%H")
        .to_string()
}

/// The first instant of a partition made by [`partition_of`].
pub fn partition_start(partition: &str) -> Option<DateTime<Utc>> {
    chrono::NaiveDateTime::parse_from_str(
        &format!("{partition}:00"),
        "year=%Y/month=%m/day=%d/hour=%H:%M",
    )
    .ok()
    .map(|t| t.and_utc())
}

/// The name of a staged file: `<stream>-<lease>-<unique>.parquet`. The stream key never
/// contains a `-`, so one stream's prefix never matches another's files; the lease tells a
/// recovery which files an earlier holder of the stream left (it deletes those, never the
/// files of a newer holder in flight).
pub fn staged_name(stream: &str, lease: u64, unique: &str) -> String {
    format!("{stream}-{lease:010}-{unique}.parquet")
}

/// The prefix of a stream's staged files.
pub fn staged_prefix(stream: &str) -> String {
    format!("{stream}-")
}

/// The lease a staged file of `stream` was written under; names of the format before leases
/// (`<stream>-<unique>.parquet`) count as lease 0.
pub fn staged_lease(stream: &str, name: &str) -> Option<u64> {
    let rest = name.strip_prefix(&staged_prefix(stream))?;
    Some(
        rest.split_once('-')
            .and_then(|(lease, _)| lease.parse().ok())
            .unwrap_or(0),
    )
}

/// The final name of a file, `<partition>/part-<commit>-<account>-<unique>.parquet`: decided in
/// the commit and unique to its content (a piece of the staged file's unique name is in it),
/// so publishing again is idempotent, and a restored database, whose commit numbers go back,
/// never has a new file mistaken for one already published. The account tells the accounts
/// sharing a dataset apart.
pub fn final_file_path(
    partition: &str,
    commit_seq: u64,
    stream: &str,
    staged_path: &str,
) -> String {
    let account = stream.split('.').next().unwrap_or(stream);
    let stem = staged_path.strip_suffix(".parquet").unwrap_or(staged_path);
    let unique = stem.rsplit('-').next().unwrap_or(stem);
    let unique = &unique[..unique.len().min(8)];
    format!("{partition}/part-{commit_seq:010}-{account}-{unique}.parquet")
}

/// The object-storage side: files are staged, then published only after their batch commits,
/// so a reader never sees a file whose events were not committed.
#[async_trait]
pub trait FileSink: Send + Sync + 'static {
    /// Writes the rows as one file per hour partition into the staging area, named with
    /// [`staged_name`], durably: a crash after it returns loses none of them.
    async fn stage(
        &self,
        stream: &str,
        lease: u64,
        rows: Arc<Vec<AuditRow>>,
    ) -> Result<Vec<StagedFile>, SinkError>;
    /// Moves committed files to their final names, durably. Idempotent. A file whose staged
    /// and final copies are both gone fails with [`SinkError::Lost`].
    async fn publish(&self, files: &[CommittedFile]) -> Result<(), SinkError>;
    /// Deletes staged files whose batch will never commit.
    async fn discard(&self, staged_paths: &[String]) -> Result<(), SinkError>;
    /// The files in the staging area whose name starts with `prefix` (see [`staged_prefix`]).
    async fn list_staged(&self, prefix: &str) -> Result<Vec<String>, SinkError>;
}

/// A sweep that has not reached the end of its window yet (cut short by the page cap or by
/// an API that repeats a page, or interrupted): the next sweep in the same direction resumes
/// it where it stopped, so no sweep repeats the work of the one before it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UnfinishedSweep {
    pub direction: Direction,
    /// The window, `[since, before)`.
    pub since: DateTime<Utc>,
    pub before: DateTime<Utc>,
    /// Where the next request starts: its `since` oldest first, its `before` newest first…
    pub anchor: DateTime<Utc>,
    /// …and the page within that bound, of pages of `per_page` events…
    pub page: u32,
    pub per_page: u32,
    /// …counted among the events at exactly this instant (a run of equal `when` longer than a
    /// page), or, when `None`, in the whole window (pages whose events had no usable `when`).
    #[serde(default)]
    pub run: Option<DateTime<Utc>>,
    /// A fingerprint of the page before `page` within the bound: an API repeating a page is
    /// recognised after a restart too.
    #[serde(default)]
    pub previous_page: Option<u64>,
    /// Newest first: the newest event read, the checkpoint once the sweep is complete.
    pub newest: Option<DateTime<Utc>>,
    /// A fingerprint of an event at the bound that the answer to the first page from `anchor`
    /// holds again: an answer without it is not that answer (see the Poller's `Reach`).
    #[serde(default)]
    pub bound_event: Option<u64>,
}

/// What is durably committed for one stream.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CommittedState {
    /// Every event up to here (ties at it excepted) is committed: the largest committed
    /// `when`, never beyond a sweep's `before`. `None` before the first commit.
    pub checkpoint: Option<DateTime<Utc>>,
    /// The sweep in progress, if any: the next sweep in its direction resumes it.
    pub unfinished: Option<UnfinishedSweep>,
    /// The end of the last sweep that reached the end of its window: the stream's range is
    /// collected up to here.
    pub swept_until: Option<DateTime<Utc>>,
    /// Number of commits so far; fences concurrent writers and names files.
    pub commit_seq: u64,
}

/// One atomic commit: the new state, the batch's events in the lake's event index, its dead
/// letters and its staged files with their final names.
#[derive(Clone, Debug, PartialEq)]
pub struct CommitRecord {
    pub fence: Fence,
    /// The `commit_seq` this commit builds on; the store refuses the commit if it moved.
    pub previous_commit_seq: u64,
    pub state: CommittedState,
    /// The events the batch writes to the dataset. The store refuses the commit with
    /// [`SinkError::Conflict`] if any of them is already committed: the dataset, which has no
    /// primary key, holds each event once.
    pub events: Vec<SeenId>,
    /// The `ingestion_time` the batch's rows carry (in its Parquet files): the commit sets it
    /// on the batch's rows in PostgreSQL too, whoever wrote them last, so the sinks agree.
    pub ingestion_time: Option<DateTime<Utc>>,
    pub dead_letters: Vec<DeadLetter>,
    pub files: Vec<(StagedFile, CommittedFile)>,
}

#[async_trait]
pub trait CheckpointStore: Send + Sync + 'static {
    async fn load(&self, stream: &str) -> Result<CommittedState, SinkError>;
    /// Which of these events (an id at its `when`, the key of `audit_logs`) are committed to
    /// the dataset, by any stream; their ids.
    async fn committed_ids(&self, events: &[SeenId]) -> Result<HashSet<String>, SinkError>;
    async fn commit(&self, record: &CommitRecord) -> Result<(), SinkError>;
    /// Files committed but not yet marked published (a crash between commit and publish).
    async fn unpublished(&self, stream: &str) -> Result<Vec<CommittedFile>, SinkError>;
    async fn mark_published(&self, final_paths: &[String]) -> Result<(), SinkError>;
    /// A committed file is gone for good (its staged and final copies both missing): forget
    /// it and its events, and move the stream's checkpoint back before them, so the stream
    /// collects them again from the source. Returns how many events that is.
    async fn forget_lost_file(&self, fence: &Fence, final_path: &str) -> Result<u64, SinkError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_round_trip() {
        let t = DateTime::parse_from_rfc3339("2026-03-04T05:06:07.123Z")
            .unwrap()
            .with_timezone(&Utc);
        let partition = partition_of(t);
        assert_eq!(partition, "year=2026/month=03/day=04/hour=05");
        assert_eq!(
            partition_start(&partition).unwrap().to_rfc3339(),
            "2026-03-04T05:00:00+00:00"
        );
    }

    #[test]
    fn staged_names_carry_stream_and_lease() {
        let name = staged_name("acc", 7, "abc");
        assert_eq!(name, "acc-0000000007-abc.parquet");
        assert_eq!(staged_lease("acc", &name), Some(7));
        assert_eq!(staged_lease("acc", "acc-0123abcdef.parquet"), Some(0));
        assert_eq!(staged_lease("acc.backfill.x_y", &name), None);
        assert_eq!(
            final_file_path("year=2026/month=01/day=01/hour=00", 3, "acc", &name),
            "year=2026/month=01/day=01/hour=00/part-0000000003-acc-abc.parquet"
        );
        let long = staged_name("acc.backfill.x_y", 2, "0123456789abcdef");
        assert_eq!(
            final_file_path("p", 4, "acc.backfill.x_y", &long),
            "p/part-0000000004-acc-01234567.parquet"
        );
    }
}
