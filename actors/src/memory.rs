//! In-memory implementations of the ports, for deterministic tests of the pipeline rules and
//! for the simulation. Each can be told to fail, hang, panic or lose its answer on chosen
//! calls.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::value::RawValue;

use crate::event::{ApiVersion, AuditRow, DeadLetter, RawEvent, SeenId};
use crate::ports::*;

/// What an injected fault does to one call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Fails before doing anything.
    Fail,
    Panic,
    /// Never answers (a lock, a stalled request).
    Hang,
    /// Does its work, then fails: the connection was lost before the answer came back.
    FailAfter,
}

/// Decides the fault of a call from its kind and number; the simulation's seeded plan.
pub type FaultPlan = Arc<dyn Fn(&'static str, u64) -> Option<Fault> + Send + Sync>;

/// Faults keyed by call number (1-based), shared with the test.
#[derive(Clone, Default)]
pub struct Faults {
    calls: Arc<AtomicU64>,
    planned: Arc<Mutex<HashMap<u64, Fault>>>,
    /// Every call from this one on fails (0: none).
    failing_from: Arc<AtomicU64>,
    plan: Arc<Mutex<Option<FaultPlan>>>,
    /// Only calls of this kind are counted and faulted (all when `None`).
    only: Arc<Mutex<Option<&'static str>>>,
}

impl Faults {
    /// Counts and faults only the calls of kind `what` (e.g. `"commit"`).
    pub fn only(&self, what: &'static str) {
        *self.only.lock().unwrap() = Some(what);
    }

    pub fn on_call(&self, call: u64, fault: Fault) {
        self.planned.lock().unwrap().insert(call, fault);
    }

    /// Every call from `call` on fails, until [`Faults::heal`].
    pub fn fail_from(&self, call: u64) {
        self.failing_from.store(call, Ordering::SeqCst);
    }

    /// Asks `plan` for the fault of every call, until [`Faults::heal`].
    pub fn plan(&self, plan: FaultPlan) {
        *self.plan.lock().unwrap() = Some(plan);
    }

    pub fn heal(&self) {
        self.failing_from.store(0, Ordering::SeqCst);
        *self.plan.lock().unwrap() = None;
    }

    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }

    /// The fault of the next call of kind `what`.
    pub fn next(&self, what: &'static str) -> Option<Fault> {
        if self.only.lock().unwrap().is_some_and(|only| only != what) {
            return None;
        }
        let call = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        let from = self.failing_from.load(Ordering::SeqCst);
        if from != 0 && call >= from {
            return Some(Fault::Fail);
        }
        if let Some(fault) = self.planned.lock().unwrap().remove(&call) {
            return Some(fault);
        }
        let plan = self.plan.lock().unwrap().clone();
        plan.and_then(|plan| plan(what, call))
    }

    /// Applies the fault of the next call around `effect` (which runs unless the call fails
    /// first): the result the caller sees.
    pub async fn around<T>(
        &self,
        what: &'static str,
        effect: impl FnOnce() -> Result<T, SinkError>,
    ) -> Result<T, SinkError> {
        let failure = || SinkError::transient(format!("injected failure of {what}"));
        match self.next(what) {
            None => effect(),
            Some(Fault::Fail) => Err(failure()),
            Some(Fault::Panic) => panic!("injected panic in {what}"),
            Some(Fault::Hang) => {
                std::future::pending::<()>().await;
                unreachable!()
            }
            Some(Fault::FailAfter) => effect().and_then(|_| Err(failure())),
        }
    }
}

/// An event of [`MemorySource`]: its time and id.
pub type TimedId = (DateTime<Utc>, String);

/// A v1-like source over a list of `(when, id)` events: `since` inclusive, `before`
/// exclusive, ordered by `when` then `id`, page-number pagination over the current list.
#[derive(Clone, Default)]
pub struct MemorySource {
    events: Arc<Mutex<Vec<TimedId>>>,
    pub faults: Faults,
    pub requests: Arc<Mutex<Vec<PageRequest>>>,
}

impl MemorySource {
    pub fn new(events: Vec<TimedId>) -> Self {
        let source = MemorySource::default();
        source.add(events);
        source
    }

    pub fn add(&self, events: Vec<TimedId>) {
        let mut all = self.events.lock().unwrap();
        all.extend(events);
        all.sort();
    }

    /// Removes the `n` oldest events, as the API's retention does.
    pub fn expire_oldest(&self, n: usize) {
        let mut all = self.events.lock().unwrap();
        let n = n.min(all.len());
        all.drain(..n);
    }

    /// The events as they are now.
    pub fn events(&self) -> Vec<TimedId> {
        self.events.lock().unwrap().clone()
    }
}

/// One page of `events` (sorted by `when`, then id) for a v1 request.
pub fn v1_page<'a, T>(
    events: &'a [T],
    time: impl Fn(&T) -> DateTime<Utc>,
    request: &PageRequest,
) -> Vec<&'a T> {
    let start = events.partition_point(|e| time(e) < request.since);
    let end = events.partition_point(|e| time(e) < request.before);
    let window = &events[start..end.max(start)];
    let offset = (request.page.max(1) as usize - 1) * request.per_page as usize;
    let take = request.per_page as usize;
    match request.direction {
        Direction::Asc => window.iter().skip(offset).take(take).collect(),
        Direction::Desc => window.iter().rev().skip(offset).take(take).collect(),
    }
}

/// The v2 cursor of the event at `time` with `id`: opaque to the pipeline, it resumes
/// strictly after that event, whatever was added or expired meanwhile.
fn v2_cursor(time: DateTime<Utc>, id: &str) -> String {
    format!("{}|{id}", time.timestamp_micros())
}

/// One page of `events` (sorted by time, then id) for a v2 request: the window's events after
/// the cursor's, in the request's direction, and the next cursor while any remain.
pub fn v2_page<'a, T>(
    events: &'a [T],
    key: impl Fn(&T) -> (DateTime<Utc>, &str),
    request: &PageRequest,
) -> Result<(Vec<&'a T>, Option<String>), SourceError> {
    let after = match &request.cursor {
        None => None,
        Some(cursor) => {
            let bad = || SourceError::BadRequest(format!("invalid cursor {cursor:?}"));
            let (micros, id) = cursor.split_once('|').ok_or_else(bad)?;
            let micros: i64 = micros.parse().map_err(|_| bad())?;
            Some((
                DateTime::from_timestamp_micros(micros).ok_or_else(bad)?,
                id.to_owned(),
            ))
        }
    };
    let in_window = |e: &&T| {
        let (time, _) = key(e);
        time >= request.since && time < request.before
    };
    let past_cursor = |e: &&T| match &after {
        None => true,
        Some((time, id)) => {
            let (t, i) = key(e);
            match request.direction {
                Direction::Asc => (t, i) > (*time, id.as_str()),
                Direction::Desc => (t, i) < (*time, id.as_str()),
            }
        }
    };
    let ordered: Vec<&T> = match request.direction {
        Direction::Asc => events
            .iter()
            .filter(in_window)
            .filter(past_cursor)
            .collect(),
        Direction::Desc => events
            .iter()
            .rev()
            .filter(in_window)
            .filter(past_cursor)
            .collect(),
    };
    let take = request.per_page as usize;
    let page: Vec<&T> = ordered.iter().take(take).copied().collect();
    let next = (ordered.len() > take)
        .then(|| page.last().map(|e| v2_cursor(key(e).0, key(e).1)))
        .flatten();
    Ok((page, next))
}

#[async_trait]
impl AuditSource for MemorySource {
    async fn fetch_page(&self, request: &PageRequest) -> Result<Page, SourceError> {
        self.requests.lock().unwrap().push(request.clone());
        match self.faults.next("source") {
            None => {}
            Some(Fault::Panic) => panic!("injected panic in the source"),
            Some(Fault::Hang) => {
                std::future::pending::<()>().await;
                unreachable!()
            }
            Some(_) => return Err(SourceError::Transient("injected source failure".into())),
        }
        let events = self.events.lock().unwrap();
        match request.api_version {
            ApiVersion::V1 => Ok(Page::from(
                v1_page(&events, |e| e.0, request)
                    .into_iter()
                    .map(|(when, id)| raw_event(id, *when))
                    .collect::<Vec<_>>(),
            )),
            ApiVersion::V2 => {
                let (page, next_cursor) = v2_page(&events, |e| (e.0, e.1.as_str()), request)?;
                Ok(Page {
                    events: page
                        .into_iter()
                        .map(|(when, id)| raw_event_v2(id, *when))
                        .collect(),
                    unreadable: Vec::new(),
                    next_cursor,
                })
            }
        }
    }
}

/// A minimal v1 event.
pub fn raw_event(id: &str, when: DateTime<Utc>) -> RawEvent {
    let json = serde_json::json!({
        "id": id,
        "when": when.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        "action": {"type": "login", "result": true},
        "actor": {"email": "a@example.com", "type": "user", "ip": "192.0.2.1"},
    });
    RawValue::from_string(json.to_string()).expect("valid JSON")
}

/// A minimal v2 event.
pub fn raw_event_v2(id: &str, time: DateTime<Utc>) -> RawEvent {
    let json = serde_json::json!({
        "id": id,
        "action": {"type": "login", "result": "success",
                   "time": time.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)},
        "actor": {"email": "a@example.com", "type": "user", "ip_address": "192.0.2.1",
                  "context": "dash"},
    });
    RawValue::from_string(json.to_string()).expect("valid JSON")
}

/// The stream leases of a [`MemoryCheckpointStore`]: a stream without an entry is at lease 0.
#[derive(Clone, Default)]
pub struct Leases(Arc<Mutex<HashMap<String, u64>>>);

impl Leases {
    pub fn current(&self, stream: &str) -> u64 {
        self.0.lock().unwrap().get(stream).copied().unwrap_or(0)
    }

    /// A new lease on the stream: writes and commits under any older one are fenced.
    pub fn acquire(&self, stream: &str) -> u64 {
        let mut leases = self.0.lock().unwrap();
        let lease = leases.entry(stream.to_owned()).or_insert(0);
        *lease += 1;
        *lease
    }

    pub fn check(&self, fence: &Fence) -> Result<(), SinkError> {
        let current = self.current(&fence.stream);
        if current == fence.lease {
            Ok(())
        } else {
            Err(SinkError::Fenced(format!(
                "stream {} is leased to {current}, not {}",
                fence.stream, fence.lease
            )))
        }
    }
}

/// The rows of `audit_logs`, keyed like its primary key.
pub type Rows = Arc<Mutex<BTreeMap<TimedId, AuditRow>>>;

/// The dataset's event index of a [`MemoryCheckpointStore`], keyed like `audit_logs`.
pub type EventIndex = Arc<Mutex<HashMap<TimedId, IndexedEvent>>>;

/// Rows keyed like the primary key. Rows whose id is in `refused` are refused as a database
/// refuses a value it cannot store.
#[derive(Clone, Default)]
pub struct MemoryRowSink {
    pub rows: Rows,
    pub faults: Faults,
    pub refused: Arc<Mutex<HashSet<String>>>,
    /// The store's leases: writes are fenced on them.
    pub leases: Leases,
    /// The store's event index: the row of a committed event is never changed.
    pub index: EventIndex,
}

impl MemoryRowSink {
    /// A row sink and a checkpoint store over one database: shared leases, index and rows.
    pub fn with_store() -> (MemoryRowSink, MemoryCheckpointStore) {
        let rows = MemoryRowSink::default();
        let store = MemoryCheckpointStore {
            leases: rows.leases.clone(),
            index: rows.index.clone(),
            rows: rows.rows.clone(),
            ..MemoryCheckpointStore::default()
        };
        (rows, store)
    }
}

#[async_trait]
impl RowSink for MemoryRowSink {
    async fn write_rows(
        &self,
        fence: Option<&Fence>,
        rows: &[AuditRow],
    ) -> Result<RowWriteReport, SinkError> {
        self.faults
            .around("row sink", || {
                if let Some(fence) = fence {
                    self.leases.check(fence)?;
                }
                let refused = self.refused.lock().unwrap();
                if let Some(row) = rows.iter().find(|r| refused.contains(&r.event_id)) {
                    return Err(SinkError::Rejected(format!(
                        "invalid input syntax in event {}",
                        row.event_id
                    )));
                }
                let mut stored = self.rows.lock().unwrap();
                let index = self.index.lock().unwrap();
                let mut report = RowWriteReport::default();
                for row in rows {
                    let key = (row.timestamp, row.event_id.clone());
                    let committed = index.contains_key(&key);
                    match stored.entry(key) {
                        std::collections::btree_map::Entry::Occupied(mut slot) => {
                            // The insert's ON CONFLICT: the retry's ingestion time wins, unless
                            // the event is committed (its time is the one in the dataset).
                            if !committed {
                                slot.get_mut().ingestion_time = row.ingestion_time;
                            }
                            report.duplicates += 1;
                        }
                        std::collections::btree_map::Entry::Vacant(slot) => {
                            slot.insert(row.clone());
                            report.inserted += 1;
                        }
                    }
                }
                Ok(report)
            })
            .await
    }
}

/// Staging and dataset as two maps of path → rows.
#[derive(Clone, Default)]
pub struct MemoryFileSink {
    pub staged: Arc<Mutex<BTreeMap<String, Vec<AuditRow>>>>,
    pub published: Arc<Mutex<BTreeMap<String, Vec<AuditRow>>>>,
    pub faults: Faults,
    /// When set, `stage` waits for a permit: a test holds the writer back.
    pub gate: Option<Arc<tokio::sync::Semaphore>>,
    /// When set, `discard` takes this long first: an object store answering slowly.
    pub discard_delay: Option<std::time::Duration>,
    counter: Arc<AtomicU64>,
}

impl MemoryFileSink {
    /// Every event id in the dataset, with repeats.
    pub fn published_ids(&self) -> Vec<String> {
        self.published
            .lock()
            .unwrap()
            .values()
            .flatten()
            .map(|row| row.event_id.clone())
            .collect()
    }

    /// Copies a staged file to its final name unless a file is there; `false` when the staged
    /// file is gone. Half of a publish: the other half deletes the staged copy.
    pub fn copy_to_final(&self, file: &CommittedFile) -> bool {
        let staged = self.staged.lock().unwrap();
        let Some(rows) = staged.get(&file.staged_path) else {
            return false;
        };
        self.published
            .lock()
            .unwrap()
            .entry(file.final_path.clone())
            .or_insert_with(|| rows.clone());
        true
    }

    /// Publishes one file as a rename that never overwrites does; [`SinkError::Lost`] when
    /// the staged and final copies are both gone.
    pub fn publish_one(&self, file: &CommittedFile) -> Result<(), SinkError> {
        if self.copy_to_final(file) {
            self.staged.lock().unwrap().remove(&file.staged_path);
            return Ok(());
        }
        if self
            .published
            .lock()
            .unwrap()
            .contains_key(&file.final_path)
        {
            return Ok(());
        }
        Err(SinkError::Lost {
            final_path: file.final_path.clone(),
            message: format!(
                "staged file {} and final file are both missing",
                file.staged_path
            ),
        })
    }
}

#[async_trait]
impl FileSink for MemoryFileSink {
    async fn stage(
        &self,
        stream: &str,
        lease: u64,
        rows: Arc<Vec<AuditRow>>,
    ) -> Result<Vec<StagedFile>, SinkError> {
        if let Some(gate) = &self.gate {
            gate.acquire().await.expect("gate open").forget();
        }
        self.faults
            .around("file sink", || {
                let mut by_hour: BTreeMap<String, Vec<AuditRow>> = BTreeMap::new();
                for row in rows.iter() {
                    by_hour
                        .entry(partition_of(row.timestamp))
                        .or_default()
                        .push(row.clone());
                }
                let mut staged = self.staged.lock().unwrap();
                Ok(by_hour
                    .into_iter()
                    .map(|(partition, rows)| {
                        let unique = self.counter.fetch_add(1, Ordering::SeqCst).to_string();
                        let path = staged_name(stream, lease, &unique);
                        let file = StagedFile {
                            staged_path: path.clone(),
                            partition,
                            rows: rows.len() as u64,
                            bytes: 0,
                        };
                        staged.insert(path, rows);
                        file
                    })
                    .collect())
            })
            .await
    }

    async fn publish(&self, files: &[CommittedFile]) -> Result<(), SinkError> {
        self.faults
            .around("publish", || {
                files.iter().try_for_each(|file| self.publish_one(file))
            })
            .await
    }

    async fn discard(&self, staged_paths: &[String]) -> Result<(), SinkError> {
        if let Some(delay) = self.discard_delay {
            tokio::time::sleep(delay).await;
        }
        self.faults
            .around("discard", || {
                let mut staged = self.staged.lock().unwrap();
                for path in staged_paths {
                    staged.remove(path);
                }
                Ok(())
            })
            .await
    }

    async fn list_staged(&self, prefix: &str) -> Result<Vec<String>, SinkError> {
        self.faults
            .around("list staged", || {
                let staged = self.staged.lock().unwrap();
                Ok(staged
                    .keys()
                    .filter(|path| path.starts_with(prefix))
                    .cloned()
                    .collect())
            })
            .await
    }
}

/// An entry of the dataset's event index.
#[derive(Clone, Debug, PartialEq)]
pub struct IndexedEvent {
    pub stream: String,
    pub commit_seq: u64,
}

/// A committed file and whether it is published.
#[derive(Clone, Debug, PartialEq)]
pub struct FileRecord {
    pub file: CommittedFile,
    pub stream: String,
    pub commit_seq: u64,
    pub partition: String,
    pub published: bool,
}

/// The committed state, the leases, the event index, the files table and the dead letters;
/// each commit atomic.
#[derive(Clone, Default)]
pub struct MemoryCheckpointStore {
    pub state: Arc<Mutex<HashMap<String, CommittedState>>>,
    pub leases: Leases,
    pub index: EventIndex,
    /// The row sink's rows: a commit sets its events' ingestion time on them.
    pub rows: Rows,
    pub files: Arc<Mutex<Vec<FileRecord>>>,
    pub dead_letters: Arc<Mutex<Vec<DeadLetter>>>,
    /// Every committed record, in order.
    pub commits: Arc<Mutex<Vec<CommitRecord>>>,
    pub faults: Faults,
}

impl MemoryCheckpointStore {
    pub fn checkpoint(&self, stream: &str) -> Option<DateTime<Utc>> {
        self.state
            .lock()
            .unwrap()
            .get(stream)
            .and_then(|s| s.checkpoint)
    }

    pub fn committed_state(&self, stream: &str) -> CommittedState {
        self.state
            .lock()
            .unwrap()
            .get(stream)
            .cloned()
            .unwrap_or_default()
    }

    fn apply(&self, record: &CommitRecord) -> Result<(), SinkError> {
        self.leases.check(&record.fence)?;
        let stream = &record.fence.stream;
        let mut states = self.state.lock().unwrap();
        let current = states.entry(stream.clone()).or_default();
        if current.commit_seq != record.previous_commit_seq {
            return Err(SinkError::transient(format!(
                "commit_seq of {stream} moved: another writer committed"
            )));
        }
        let mut index = self.index.lock().unwrap();
        if let Some(seen) = record
            .events
            .iter()
            .find(|e| index.contains_key(&(e.when, e.id.clone())))
        {
            return Err(SinkError::Conflict(format!(
                "event {} is already in the dataset",
                seen.id
            )));
        }
        *current = record.state.clone();
        let commit_seq = record.state.commit_seq;
        if let Some(ingestion_time) = record.ingestion_time {
            let mut rows = self.rows.lock().unwrap();
            for event in &record.events {
                if let Some(row) = rows.get_mut(&(event.when, event.id.clone())) {
                    row.ingestion_time = ingestion_time;
                }
            }
        }
        for event in &record.events {
            index.insert(
                (event.when, event.id.clone()),
                IndexedEvent {
                    stream: stream.clone(),
                    commit_seq,
                },
            );
        }
        self.files
            .lock()
            .unwrap()
            .extend(record.files.iter().map(|(staged, file)| FileRecord {
                file: file.clone(),
                stream: stream.clone(),
                commit_seq,
                partition: staged.partition.clone(),
                published: false,
            }));
        let mut dead = self.dead_letters.lock().unwrap();
        for letter in &record.dead_letters {
            let known = dead
                .iter()
                .any(|d| d.account_id == letter.account_id && d.raw_event == letter.raw_event);
            if !known {
                dead.push(letter.clone());
            }
        }
        self.commits.lock().unwrap().push(record.clone());
        Ok(())
    }
}

#[async_trait]
impl CheckpointStore for MemoryCheckpointStore {
    async fn load(&self, stream: &str) -> Result<CommittedState, SinkError> {
        self.faults
            .around("load", || Ok(self.committed_state(stream)))
            .await
    }

    async fn committed_ids(&self, events: &[SeenId]) -> Result<HashSet<String>, SinkError> {
        self.faults
            .around("committed ids", || {
                let index = self.index.lock().unwrap();
                Ok(events
                    .iter()
                    .filter(|e| index.contains_key(&(e.when, e.id.clone())))
                    .map(|e| e.id.clone())
                    .collect())
            })
            .await
    }

    async fn commit(&self, record: &CommitRecord) -> Result<(), SinkError> {
        self.faults.around("commit", || self.apply(record)).await
    }

    async fn unpublished(&self, stream: &str) -> Result<Vec<CommittedFile>, SinkError> {
        self.faults
            .around("unpublished", || {
                Ok(self
                    .files
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|f| f.stream == stream && !f.published)
                    .map(|f| f.file.clone())
                    .collect())
            })
            .await
    }

    async fn mark_published(&self, final_paths: &[String]) -> Result<(), SinkError> {
        self.faults
            .around("mark published", || {
                for record in self.files.lock().unwrap().iter_mut() {
                    if final_paths.contains(&record.file.final_path) {
                        record.published = true;
                    }
                }
                Ok(())
            })
            .await
    }

    async fn forget_lost_file(&self, fence: &Fence, final_path: &str) -> Result<u64, SinkError> {
        self.faults
            .around("forget lost file", || {
                self.leases.check(fence)?;
                let mut files = self.files.lock().unwrap();
                let Some(at) = files
                    .iter()
                    .position(|f| f.file.final_path == final_path && f.stream == fence.stream)
                else {
                    return Ok(0);
                };
                let lost = files.remove(at);
                let mut index = self.index.lock().unwrap();
                let forgotten: Vec<TimedId> = index
                    .iter()
                    .filter(|((when, _), e)| {
                        e.stream == lost.stream
                            && e.commit_seq == lost.commit_seq
                            && partition_of(*when) == lost.partition
                    })
                    .map(|(key, _)| key.clone())
                    .collect();
                let oldest = forgotten.iter().map(|(when, _)| *when).min();
                for key in &forgotten {
                    index.remove(key);
                }
                let mut states = self.state.lock().unwrap();
                let state = states.entry(fence.stream.clone()).or_default();
                if let Some(oldest) = oldest {
                    state.checkpoint = state.checkpoint.map(|c| c.min(oldest));
                    state.swept_until = state.swept_until.map(|s| s.min(oldest));
                }
                state.unfinished = None;
                state.commit_seq += 1;
                Ok(forgotten.len() as u64)
            })
            .await
    }
}

/// A sink of a third kind, for tests that the pipeline takes any number of sinks: it keeps
/// every row it is given, each attempt's (a rewound batch is kept again), and its calls can
/// be faulted like the others'.
#[derive(Clone, Default)]
pub struct MemoryArchive {
    pub written: Arc<Mutex<Vec<AuditRow>>>,
    pub faults: Faults,
}

#[async_trait]
impl crate::sink::SinkTarget for MemoryArchive {
    fn name(&self) -> &'static str {
        "archive"
    }

    fn actor(&self) -> &'static str {
        "archive_writer"
    }

    async fn write(
        &self,
        _fence: &Fence,
        rows: Arc<Vec<AuditRow>>,
    ) -> Result<crate::sink::WriteOutcome, SinkError> {
        self.faults
            .around("archive write", || {
                self.written.lock().unwrap().extend(rows.iter().cloned());
                Ok(crate::sink::WriteOutcome::Rows(RowWriteReport {
                    inserted: rows.len() as u64,
                    ..RowWriteReport::default()
                }))
            })
            .await
    }
}
