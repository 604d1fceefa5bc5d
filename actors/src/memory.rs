//! In-memory implementations of the ports, for deterministic tests of the pipeline rules.
//! Each can be told to fail or panic on chosen calls.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::value::RawValue;

use crate::event::{AuditRow, DeadLetter, RawEvent};
use crate::ports::*;

/// What an injected fault does to one call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    Fail,
    Panic,
}

/// Faults keyed by call number (1-based), shared with the test.
#[derive(Clone, Default)]
pub struct Faults {
    calls: Arc<AtomicU64>,
    planned: Arc<Mutex<HashMap<u64, Fault>>>,
    /// Every call from this one on fails (0: none).
    failing_from: Arc<AtomicU64>,
}

impl Faults {
    pub fn on_call(&self, call: u64, fault: Fault) {
        self.planned.lock().unwrap().insert(call, fault);
    }

    /// Every call from `call` on fails, until [`Faults::heal`].
    pub fn fail_from(&self, call: u64) {
        self.failing_from.store(call, Ordering::SeqCst);
    }

    pub fn heal(&self) {
        self.failing_from.store(0, Ordering::SeqCst);
    }

    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }

    fn next(&self, what: &str) -> Result<(), SinkError> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        let from = self.failing_from.load(Ordering::SeqCst);
        if from != 0 && call >= from {
            return Err(SinkError::new(format!(
                "injected failure of {what} call {call}"
            )));
        }
        let planned = self.planned.lock().unwrap().remove(&call);
        match planned {
            Some(Fault::Fail) => Err(SinkError::new(format!(
                "injected failure of {what} call {call}"
            ))),
            Some(Fault::Panic) => panic!("injected panic in {what} call {call}"),
            None => Ok(()),
        }
    }
}

/// An event of [`MemorySource`]: its time and id.
pub type TimedId = (DateTime<Utc>, String);

/// A v1-like source over a fixed list of `(when, id)` events: `since` inclusive, `before`
/// exclusive, ordered by `when` then `id`, page-number pagination.
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
}

#[async_trait]
impl AuditSource for MemorySource {
    async fn fetch_page(&self, request: &PageRequest) -> Result<Vec<RawEvent>, SourceError> {
        self.requests.lock().unwrap().push(request.clone());
        self.faults
            .next("source")
            .map_err(|e| SourceError::Transient(e.to_string()))?;
        let events = self.events.lock().unwrap();
        let mut window: Vec<_> = events
            .iter()
            .filter(|(when, _)| *when >= request.since && *when < request.before)
            .collect();
        if request.direction == Direction::Desc {
            window.reverse();
        }
        let start = (request.page as usize - 1) * request.per_page as usize;
        Ok(window
            .into_iter()
            .skip(start)
            .take(request.per_page as usize)
            .map(|(when, id)| raw_event(id, *when))
            .collect())
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

/// Rows keyed like the primary key; counts every attempted row too.
#[derive(Clone, Default)]
pub struct MemoryRowSink {
    pub rows: Arc<Mutex<BTreeMap<TimedId, AuditRow>>>,
    pub faults: Faults,
}

#[async_trait]
impl RowSink for MemoryRowSink {
    async fn write_rows(&self, rows: &[AuditRow]) -> Result<RowWriteReport, SinkError> {
        self.faults.next("row sink")?;
        let mut stored = self.rows.lock().unwrap();
        let mut report = RowWriteReport::default();
        for row in rows {
            let key = (row.timestamp, row.event_id.clone());
            match stored.entry(key) {
                std::collections::btree_map::Entry::Occupied(_) => report.duplicates += 1,
                std::collections::btree_map::Entry::Vacant(slot) => {
                    slot.insert(row.clone());
                    report.inserted += 1;
                }
            }
        }
        Ok(report)
    }
}

/// Staging and dataset as two maps of path → event ids.
#[derive(Clone, Default)]
pub struct MemoryFileSink {
    pub staged: Arc<Mutex<HashMap<String, Vec<String>>>>,
    pub published: Arc<Mutex<BTreeMap<String, Vec<String>>>>,
    pub faults: Faults,
    /// When set, `stage` waits for a permit: a test holds the writer back.
    pub gate: Option<Arc<tokio::sync::Semaphore>>,
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
            .cloned()
            .collect()
    }
}

#[async_trait]
impl FileSink for MemoryFileSink {
    async fn stage(
        &self,
        stream: &str,
        rows: Arc<Vec<AuditRow>>,
    ) -> Result<Vec<StagedFile>, SinkError> {
        if let Some(gate) = &self.gate {
            gate.acquire().await.expect("gate open").forget();
        }
        self.faults.next("file sink")?;
        let mut by_hour: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for row in rows.iter() {
            by_hour
                .entry(
                    row.timestamp
                        .format("year=%Y/month=%m/day=%d/hour=%H")
                        .to_string(),
                )
                .or_default()
                .push(row.event_id.clone());
        }
        let mut staged = self.staged.lock().unwrap();
        Ok(by_hour
            .into_iter()
            .map(|(partition, ids)| {
                let path = format!(
                    "{}{}.parquet",
                    crate::ports::staged_prefix(stream),
                    self.counter.fetch_add(1, Ordering::SeqCst)
                );
                let file = StagedFile {
                    staged_path: path.clone(),
                    partition,
                    rows: ids.len() as u64,
                    bytes: 0,
                };
                staged.insert(path, ids);
                file
            })
            .collect())
    }

    async fn publish(&self, files: &[CommittedFile]) -> Result<(), SinkError> {
        let mut staged = self.staged.lock().unwrap();
        let mut published = self.published.lock().unwrap();
        for file in files {
            match staged.remove(&file.staged_path) {
                Some(ids) => {
                    published.entry(file.final_path.clone()).or_insert(ids);
                }
                None if published.contains_key(&file.final_path) => {}
                None => return Err(SinkError::new(format!("{} is lost", file.staged_path))),
            }
        }
        Ok(())
    }

    async fn discard(&self, staged_paths: &[String]) -> Result<(), SinkError> {
        let mut staged = self.staged.lock().unwrap();
        for path in staged_paths {
            staged.remove(path);
        }
        Ok(())
    }

    async fn list_staged(&self, prefix: &str) -> Result<Vec<String>, SinkError> {
        let staged = self.staged.lock().unwrap();
        Ok(staged
            .keys()
            .filter(|path| path.starts_with(prefix))
            .cloned()
            .collect())
    }
}

/// The committed state, the files table and the dead letters, each commit atomic.
#[derive(Clone, Default)]
pub struct MemoryCheckpointStore {
    pub state: Arc<Mutex<HashMap<String, CommittedState>>>,
    pub files: Arc<Mutex<Vec<(CommittedFile, bool)>>>,
    pub dead_letters: Arc<Mutex<Vec<DeadLetter>>>,
    /// Every committed record, in order.
    pub commits: Arc<Mutex<Vec<CommitRecord>>>,
    pub faults: Faults,
}

impl MemoryCheckpointStore {
    pub fn checkpoint(&self, account: &str) -> Option<DateTime<Utc>> {
        self.state
            .lock()
            .unwrap()
            .get(account)
            .and_then(|s| s.checkpoint)
    }
}

#[async_trait]
impl CheckpointStore for MemoryCheckpointStore {
    async fn load(&self, account_id: &str) -> Result<CommittedState, SinkError> {
        Ok(self
            .state
            .lock()
            .unwrap()
            .get(account_id)
            .cloned()
            .unwrap_or_default())
    }

    async fn commit(&self, record: &CommitRecord) -> Result<(), SinkError> {
        self.faults.next("checkpoint store")?;
        let mut states = self.state.lock().unwrap();
        let current = states.entry(record.account_id.clone()).or_default();
        if current.commit_seq != record.previous_commit_seq {
            return Err(SinkError::new("commit_seq moved: another writer committed"));
        }
        *current = record.state.clone();
        let mut files = self.files.lock().unwrap();
        files.extend(record.files.iter().map(|(_, c)| (c.clone(), false)));
        let mut dead = self.dead_letters.lock().unwrap();
        let known: HashSet<_> = dead.iter().map(|d| d.raw_event.clone()).collect();
        dead.extend(
            record
                .dead_letters
                .iter()
                .filter(|d| !known.contains(&d.raw_event))
                .cloned(),
        );
        self.commits.lock().unwrap().push(record.clone());
        Ok(())
    }

    async fn unpublished(&self, _account_id: &str) -> Result<Vec<CommittedFile>, SinkError> {
        Ok(self
            .files
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, published)| !published)
            .map(|(c, _)| c.clone())
            .collect())
    }

    async fn mark_published(&self, final_paths: &[String]) -> Result<(), SinkError> {
        for (file, published) in self.files.lock().unwrap().iter_mut() {
            if final_paths.contains(&file.final_path) {
                *published = true;
            }
        }
        Ok(())
    }
}
