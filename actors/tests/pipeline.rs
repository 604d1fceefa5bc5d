//! The pipeline's ordering and failure rules, deterministically in memory.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use cfaudit_actors::memory::*;
use cfaudit_actors::*;
use chrono::{DateTime, TimeZone, Utc};

const ACCOUNT: &str = "acc";

/// `n` events, four per timestamp, so equal times straddle page boundaries.
fn events(n: usize) -> Vec<(DateTime<Utc>, String)> {
    let start = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
    (0..n)
        .map(|i| {
            (
                start + chrono::Duration::seconds((i / 4) as i64 * 7),
                format!("ev-{i:06}"),
            )
        })
        .collect()
}

fn initial_checkpoint() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2025, 12, 31, 0, 0, 0).unwrap()
}

struct World {
    source: MemorySource,
    rows: MemoryRowSink,
    files: MemoryFileSink,
    store: MemoryCheckpointStore,
    metrics: Arc<Metrics>,
}

impl World {
    fn new(events: Vec<(DateTime<Utc>, String)>) -> World {
        World {
            source: MemorySource::new(events),
            rows: MemoryRowSink::default(),
            files: MemoryFileSink::default(),
            store: MemoryCheckpointStore::default(),
            metrics: Metrics::new(),
        }
    }

    fn start(&self, direction: Direction, once: Option<u32>) -> Pipeline {
        Pipeline::start(self.parts(direction, once))
    }

    fn parts(&self, direction: Direction, once: Option<u32>) -> PipelineParts {
        let backoff = Backoff {
            initial: Duration::from_millis(5),
            max: Duration::from_millis(20),
        };
        PipelineParts {
            poller: PollerConfig {
                account_id: ACCOUNT.into(),
                api_version: ApiVersion::V1,
                per_page: 50,
                direction,
                safety_lag: Duration::from_secs(30),
                poll_interval: Duration::from_millis(50),
                start: Some(initial_checkpoint()),
                end: None,
                hide_user_logs: false,
                max_inflight_batches: 4,
                // One page, one batch: the tests below count commits per page.
                batch_max_events: 1,
                batch_max_bytes: usize::MAX,
                max_pages_per_sweep: 10_000,
                backoff,
                default_retry_after: Duration::from_millis(10),
                max_server_wait: Duration::from_secs(60),
                auth_recheck: Duration::from_millis(50),
                once,
            },
            checkpointer: CheckpointerConfig {
                account_id: ACCOUNT.into(),
                api_version: ApiVersion::V1,
                stream: ACCOUNT.into(),
                lease: 0,
                ack_timeout: Duration::from_secs(5),
                sink_timeout: Duration::from_secs(5),
                backoff,
            },
            source: Arc::new(self.source.clone()),
            sinks: vec![
                Arc::new(PgTarget(Arc::new(self.rows.clone()))),
                Arc::new(ParquetTarget(Arc::new(self.files.clone()))),
            ],
            files: Arc::new(self.files.clone()),
            store: Arc::new(self.store.clone()),
            metrics: self.metrics.clone(),
            clock: Clock::system(),
            rng_seed: None,
            process_budget: None,
        }
    }

    /// Runs one sweep to completion (`run --once`).
    async fn once(&self, direction: Direction) -> PipelineEvent {
        self.once_with(direction, |_| {}).await
    }

    /// As [`World::once`], with the parts changed first.
    async fn once_with(
        &self,
        direction: Direction,
        change: impl FnOnce(&mut PipelineParts),
    ) -> PipelineEvent {
        let mut parts = self.parts(direction, Some(1000));
        change(&mut parts);
        let mut pipeline = Pipeline::start(parts);
        let event = wait_for(&mut pipeline, |e| !matches!(e, PipelineEvent::Drained)).await;
        assert!(
            pipeline.shutdown(Duration::from_secs(10)).await,
            "clean shutdown"
        );
        event
    }

    /// Every event exactly once in both sinks, nothing left in staging, checkpoint at the end.
    fn assert_exact(&self, expected: &[(DateTime<Utc>, String)]) {
        self.assert_exact_ids(expected);
        let last = expected.iter().map(|(w, _)| *w).max();
        assert_eq!(self.store.checkpoint(ACCOUNT), last, "checkpoint");
    }

    /// Every event exactly once in both sinks and nothing left in staging.
    fn assert_exact_ids(&self, expected: &[(DateTime<Utc>, String)]) {
        let want: HashSet<&str> = expected.iter().map(|(_, id)| id.as_str()).collect();
        let rows = self.rows.rows.lock().unwrap();
        assert_eq!(rows.len(), want.len(), "postgres rows");
        assert!(rows.keys().all(|(_, id)| want.contains(id.as_str())));
        let published = self.files.published_ids();
        assert_eq!(
            published.len(),
            want.len(),
            "parquet rows (duplicates count twice)"
        );
        assert_eq!(
            published.iter().collect::<HashSet<_>>().len(),
            want.len(),
            "distinct parquet ids"
        );
        assert!(
            self.files.staged.lock().unwrap().is_empty(),
            "staged orphans"
        );
        let last = expected.iter().map(|(w, _)| *w).max();
        assert_eq!(self.store.checkpoint(ACCOUNT), last, "checkpoint");
    }

    /// One labelled counter of the pipeline's metrics, e.g. `self.counter(|m| &m.restarts, "poller")`.
    fn counter(&self, family: impl Fn(&Metrics) -> &prometheus::IntCounterVec, label: &str) -> u64 {
        family(&self.metrics).with_label_values(&[label]).get()
    }

    /// One counter of the account's v1 log.
    fn source_counter(&self, family: impl Fn(&Metrics) -> &prometheus::IntCounterVec) -> u64 {
        family(&self.metrics)
            .with_label_values(&[ACCOUNT, "v1"])
            .get()
    }

    /// Commits that wrote events (each sweep also commits its window before it starts).
    fn commits(&self) -> usize {
        self.data_commits().len()
    }

    fn data_commits(&self) -> Vec<CommitRecord> {
        self.store
            .commits
            .lock()
            .unwrap()
            .iter()
            .filter(|c| !c.events.is_empty())
            .cloned()
            .collect()
    }
}

async fn wait_for(pipeline: &mut Pipeline, want: impl Fn(&PipelineEvent) -> bool) -> PipelineEvent {
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let event = pipeline.next_event().await.expect("pipeline alive");
            // A cue for the runner, after every commit: no test here waits for one.
            if event != PipelineEvent::EventsCommitted && want(&event) {
                return event;
            }
        }
    })
    .await
    .expect("the pipeline did not report in 30 s")
}

async fn until(what: &str, condition: impl Fn() -> bool) {
    for _ in 0..3000 {
        if condition() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

fn completed(event: &PipelineEvent) {
    assert!(
        matches!(event, PipelineEvent::SweepCompleted { .. }),
        "{event:?}"
    );
}

#[actix_rt::test]
async fn a_sweep_lands_every_event_once_in_both_sinks() {
    let all = events(1003);
    let world = World::new(all.clone());
    completed(&world.once(Direction::Asc).await);
    world.assert_exact(&all);
    // Pages of 50, each from the `when` of the last event held (ties come back): one commit
    // each, and the short last page ends the sweep without an extra request. The stream's
    // first page is asked twice: nothing read yet fixes where it starts.
    let requests = world.source.requests.lock().unwrap().clone();
    assert_eq!(requests[0], requests[1]);
    assert!(
        (22..=24).contains(&requests.len()),
        "{} requests",
        requests.len()
    );
    assert_eq!(world.commits(), requests.len() - 1);
}

#[actix_rt::test]
async fn a_second_sweep_over_the_overlap_adds_nothing() {
    let all = events(400);
    let world = World::new(all.clone());
    completed(&world.once(Direction::Asc).await);
    let files_before = world.files.published.lock().unwrap().len();
    completed(&world.once(Direction::Asc).await);
    world.assert_exact(&all);
    assert_eq!(
        world.files.published.lock().unwrap().len(),
        files_before,
        "no new files"
    );
    let overlap = world.source.requests.lock().unwrap().last().unwrap().since;
    assert!(
        overlap < all.last().unwrap().0,
        "the second window overlaps on purpose"
    );
    let deduplicated = world.source_counter(|m| &m.events_deduplicated);
    assert!(
        deduplicated > 0,
        "the overlap was fetched again and dropped"
    );
}

#[actix_rt::test]
async fn no_commit_while_one_writer_fails_after_the_other_succeeded() {
    let all = events(500);
    let world = World::new(all.clone());
    world.files.faults.only("file sink");
    world.files.faults.fail_from(3); // batches 0 and 1 stage, every later stage fails
    let mut pipeline = world.start(Direction::Asc, None);
    let pg_rows_beyond_commit = || world.rows.rows.lock().unwrap().len() > 100;
    until(
        "postgres to hold more than the committed batches",
        pg_rows_beyond_commit,
    )
    .await;
    until("a rewind", || {
        world.source_counter(|m| &m.pipeline_rewinds) >= 2
    })
    .await;
    // Parquet fails batch 2 and every retry; Postgres holds rows past the last commit, yet
    // nothing past the batches Parquet staged (at most 0 and 1) is committed or visible.
    let commits = world.commits();
    assert!(commits <= 2, "{commits} commits");
    let published = world.files.published_ids();
    assert_eq!(published.len(), world.store.index.lock().unwrap().len());
    assert!(world.rows.rows.lock().unwrap().len() > published.len());
    let newest_published = world
        .files
        .published
        .lock()
        .unwrap()
        .values()
        .flatten()
        .map(|row| row.timestamp)
        .max();
    assert_eq!(world.store.checkpoint(ACCOUNT), newest_published);
    world.files.faults.heal();
    wait_for(&mut pipeline, |e| {
        matches!(e, PipelineEvent::SweepCompleted { .. })
    })
    .await;
    assert!(pipeline.shutdown(Duration::from_secs(10)).await);
    world.assert_exact(&all);
}

/// A third sink is one more `SinkTarget` in the parts: the real Checkpointer waits for its
/// ack like the others', so nothing commits past what it acked while it fails, and the sweep
/// ends exact once it heals.
#[actix_rt::test]
async fn a_third_sink_is_waited_for_like_the_others() {
    let all = events(500);
    let world = World::new(all.clone());
    let archive = MemoryArchive::default();
    archive.faults.fail_from(3); // batches 0 and 1 are archived, every later write fails
    let mut parts = world.parts(Direction::Asc, None);
    parts.sinks.push(Arc::new(archive.clone()));
    let mut pipeline = Pipeline::start(parts);
    until("a rewind", || {
        world.source_counter(|m| &m.pipeline_rewinds) >= 2
    })
    .await;
    let archived = || -> HashSet<String> {
        let written = archive.written.lock().unwrap();
        written.iter().map(|row| row.event_id.clone()).collect()
    };
    let commits = world.data_commits();
    assert!(commits.len() <= 2, "{} commits", commits.len());
    let committed: Vec<String> = commits
        .iter()
        .flat_map(|c| c.events.iter().map(|e| e.id.clone()))
        .collect();
    assert!(committed.iter().all(|id| archived().contains(id)));
    assert!(world.rows.rows.lock().unwrap().len() > committed.len());
    archive.faults.heal();
    wait_for(&mut pipeline, |e| {
        matches!(e, PipelineEvent::SweepCompleted { .. })
    })
    .await;
    assert!(pipeline.shutdown(Duration::from_secs(10)).await);
    world.assert_exact(&all);
    let want: HashSet<String> = all.iter().map(|(_, id)| id.clone()).collect();
    assert_eq!(archived(), want, "every event reached the third sink");
    assert!(
        world
            .metrics
            .events_written
            .with_label_values(&["archive"])
            .get()
            >= all.len() as u64
    );
}

#[actix_rt::test]
async fn acks_out_of_order_commit_in_order() {
    let all = events(400);
    let mut world = World::new(all.clone());
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    world.files.gate = Some(gate.clone());
    let mut pipeline = world.start(Direction::Asc, Some(1000));
    // Postgres acks batches 0..3 while Parquet still holds batch 0.
    until("postgres to ack four batches", || {
        world.rows.faults.calls() == 4
    })
    .await;
    assert_eq!(
        world.commits(),
        0,
        "nothing commits before both writers acked"
    );
    gate.add_permits(1000);
    completed(&wait_for(&mut pipeline, |_| true).await);
    assert!(pipeline.shutdown(Duration::from_secs(10)).await);
    let checkpoints: Vec<_> = world
        .store
        .commits
        .lock()
        .unwrap()
        .iter()
        .map(|c| c.state.checkpoint)
        .collect();
    assert!(
        checkpoints.windows(2).all(|w| w[0] < w[1]),
        "commits in batch order: {checkpoints:?}"
    );
    let seqs: Vec<_> = world
        .store
        .commits
        .lock()
        .unwrap()
        .iter()
        .map(|c| c.state.commit_seq)
        .collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    world.assert_exact(&all);
}

#[actix_rt::test]
async fn a_panicking_writer_is_restarted_and_the_pipeline_resumes_from_the_checkpoint() {
    let all = events(600);
    let world = World::new(all.clone());
    world.rows.faults.on_call(4, Fault::Panic);
    completed(&world.once(Direction::Asc).await);
    world.assert_exact(&all);
    assert_eq!(world.counter(|m| &m.restarts, "pg_writer"), 1);
    // The panic made the pipeline go back: a request older than the one before it, from
    // the initial checkpoint or from a committed checkpoint minus the lag.
    let lag = chrono::Duration::seconds(30);
    let mut allowed: HashSet<DateTime<Utc>> = HashSet::from([initial_checkpoint()]);
    for commit in world.store.commits.lock().unwrap().iter() {
        allowed.extend(commit.state.checkpoint.map(|c| c - lag));
    }
    let requests = world.source.requests.lock().unwrap();
    let rewinds: Vec<_> = requests
        .windows(2)
        .filter(|w| w[1].since < w[0].since)
        .map(|w| w[1].since)
        .collect();
    assert!(!rewinds.is_empty(), "no resume");
    assert!(
        rewinds.iter().all(|since| allowed.contains(since)),
        "{rewinds:?} not in {allowed:?}"
    );
}

#[actix_rt::test]
async fn a_panicking_source_restarts_the_poller_without_loss() {
    let all = events(300);
    let world = World::new(all.clone());
    world.source.faults.on_call(3, Fault::Panic);
    completed(&world.once(Direction::Asc).await);
    world.assert_exact(&all);
    assert_eq!(world.counter(|m| &m.restarts, "poller"), 1);
}

#[actix_rt::test]
async fn a_failing_commit_rewinds_and_ends_exact() {
    let all = events(500);
    let world = World::new(all.clone());
    world.store.faults.only("commit");
    world.store.faults.on_call(3, Fault::Fail);
    world.store.faults.on_call(5, Fault::Panic);
    completed(&world.once(Direction::Asc).await);
    world.assert_exact(&all);
    assert_eq!(world.counter(|m| &m.restarts, "checkpointer"), 1);
    assert!(world.source_counter(|m| &m.pipeline_rewinds) >= 2);
}

/// A write that never answers holds its writer until the sink timeout; the ack timeout,
/// shorter here, gives up on the batch first and the sweep ends exact.
#[actix_rt::test]
async fn a_batch_not_acked_within_the_ack_timeout_is_rewound_and_ends_exact() {
    let all = events(100);
    let world = World::new(all.clone());
    world.rows.faults.only("row sink");
    world.rows.faults.on_call(2, Fault::Hang);
    let mut parts = world.parts(Direction::Asc, Some(1000));
    parts.checkpointer.ack_timeout = Duration::from_millis(200);
    parts.checkpointer.sink_timeout = Duration::from_secs(3);
    let mut pipeline = Pipeline::start(parts);
    until("a rewind for the ack timeout", || {
        let failures = world.metrics.health.sink_failures.lock().unwrap();
        failures.values().any(|r| r.contains("ack timeout"))
    })
    .await;
    completed(&wait_for(&mut pipeline, |e| !matches!(e, PipelineEvent::Drained)).await);
    assert!(pipeline.shutdown(Duration::from_secs(10)).await);
    world.assert_exact(&all);
    assert!(world.source_counter(|m| &m.pipeline_rewinds) >= 1);
}

#[actix_rt::test]
async fn transient_source_errors_are_retried() {
    let all = events(300);
    let world = World::new(all.clone());
    world.source.faults.on_call(2, Fault::Fail);
    world.source.faults.on_call(3, Fault::Fail);
    completed(&world.once(Direction::Asc).await);
    world.assert_exact(&all);
    assert_eq!(world.counter(|m| &m.api_retries, "transient"), 2);
}

#[actix_rt::test]
async fn once_mode_gives_up_after_its_attempts() {
    let world = World::new(events(100));
    world.source.faults.fail_from(1);
    let mut pipeline = world.start(Direction::Asc, Some(3));
    let event = wait_for(&mut pipeline, |_| true).await;
    assert!(pipeline.shutdown(Duration::from_secs(10)).await);
    assert!(
        matches!(&event, PipelineEvent::Failed { reason } if reason.contains("3 times")),
        "{event:?}"
    );
    assert_eq!(world.commits(), 0);
}

#[actix_rt::test]
async fn desc_advances_the_checkpoint_only_when_the_sweep_is_committed() {
    let all = events(260);
    let world = World::new(all.clone());
    completed(&world.once(Direction::Desc).await);
    world.assert_exact(&all);
    let commits = world.store.commits.lock().unwrap();
    let (last, earlier) = commits.split_last().unwrap();
    assert!(
        earlier.iter().all(|c| c.state.checkpoint.is_none()),
        "checkpoint moved mid-sweep"
    );
    assert_eq!(last.state.checkpoint, Some(all.last().unwrap().0));
}

#[actix_rt::test]
async fn late_events_inside_the_safety_lag_are_picked_up_by_the_next_sweep() {
    let all = events(200);
    let world = World::new(all.clone());
    completed(&world.once(Direction::Asc).await);
    // An event that appears late, 10 s before the checkpoint (inside the 30 s lag).
    let late = (
        all.last().unwrap().0 - chrono::Duration::seconds(10),
        "late-1".to_owned(),
    );
    world.source.add(vec![late.clone()]);
    completed(&world.once(Direction::Asc).await);
    let mut expected = all.clone();
    expected.push(late);
    world.assert_exact(&expected);
}

#[actix_rt::test]
async fn drain_stops_fetching_and_leaves_a_resumable_state() {
    let all = events(2000);
    let mut world = World::new(all.clone());
    let gate = Arc::new(tokio::sync::Semaphore::new(3));
    world.files.gate = Some(gate.clone());
    let mut pipeline = world.start(Direction::Asc, Some(1000));
    until("three commits", || world.commits() == 3).await;
    pipeline.drain();
    gate.add_permits(1000);
    wait_for(&mut pipeline, |e| matches!(e, PipelineEvent::Drained)).await;
    assert!(pipeline.shutdown(Duration::from_secs(10)).await);
    let partial = world.rows.rows.lock().unwrap().len();
    assert!(partial < all.len(), "drained before the end");
    world.files.gate = None;
    completed(&world.once(Direction::Asc).await);
    world.assert_exact(&all);
}

#[actix_rt::test]
async fn the_same_id_twice_in_a_page_or_on_two_pages_lands_once() {
    // "dup-a" twice inside one page, "dup-b" on both sides of the
    // boundary between pages 1 and 2 (50 per page).
    let mut all = events(120);
    let t = all[10].0;
    all.push((t, "dup-a".into()));
    all.push((t, "dup-a".into()));
    let boundary = all[49].0;
    all.push((boundary, "dup-b".into()));
    all.push((boundary + chrono::Duration::seconds(7), "dup-b".into()));
    let world = World::new(all.clone());
    completed(&world.once(Direction::Asc).await);
    let mut unique = all.clone();
    unique.sort();
    unique.dedup_by(|a, b| a.1 == b.1);
    world.assert_exact_ids(&unique);
    assert!(world.source_counter(|m| &m.events_deduplicated) >= 2);
}

/// A source that answers the requests with these numbers (from 0) with `foreign`, a page it
/// served to another request: a proxy that mixes up answers, or the emulator's repeat fault
/// answering a restarted process with the page a killed one read last.
struct MixesUpAnswers {
    source: MemorySource,
    foreign: Vec<(DateTime<Utc>, String)>,
    at: Vec<usize>,
}

#[async_trait::async_trait]
impl AuditSource for MixesUpAnswers {
    async fn fetch_page(&self, request: &PageRequest) -> Result<Page, SourceError> {
        let answer = self.source.fetch_page(request).await;
        let number = self.source.requests.lock().unwrap().len() - 1;
        if !self.at.contains(&number) {
            return answer;
        }
        Ok(Page::from(
            self.foreign
                .iter()
                .map(|(when, id)| raw_event(id, *when))
                .collect::<Vec<_>>(),
        ))
    }
}

/// A page from deep in the window, answered to the first request of a sweep and to requests
/// in the middle of it, is never read as their answer: the first page of a window is asked
/// until two answers agree, a later one must hold the event the sweep read at its bound. Read
/// as the answer, it moved the bound past every event in between (the chaos test lost 994
/// events this way, newest first on S3).
#[actix_rt::test]
async fn an_answer_to_another_request_is_never_read_as_this_ones() {
    for direction in [Direction::Asc, Direction::Desc] {
        let all = events(500);
        let world = World::new(all.clone());
        let mut foreign = all[200..250].to_vec();
        if direction == Direction::Desc {
            foreign.reverse();
        }
        let mut parts = world.parts(direction, Some(3));
        parts.source = Arc::new(MixesUpAnswers {
            source: world.source.clone(),
            foreign,
            at: vec![0, 4, 9],
        });
        let mut pipeline = Pipeline::start(parts);
        completed(&wait_for(&mut pipeline, |_| true).await);
        assert!(pipeline.shutdown(Duration::from_secs(10)).await);
        world.assert_exact(&all);
        // Asked again: the first page (twice more, as its first answer was the foreign one),
        // and the two mixed-up answers in the middle (once each).
        let mut requests = world.source.requests.lock().unwrap().clone();
        let asked = requests.len();
        requests.dedup();
        assert_eq!(asked - requests.len(), 4, "{direction:?}");
        let retried = world
            .metrics
            .api_retries
            .with_label_values(&["out_of_place"])
            .get();
        assert_eq!(retried, 2, "{direction:?}");
    }
}

/// A source that ignores `page` and returns page 1 for ever.
struct IgnoresPage(MemorySource);

#[async_trait::async_trait]
impl AuditSource for IgnoresPage {
    async fn fetch_page(&self, request: &PageRequest) -> Result<Page, SourceError> {
        let mut first = request.clone();
        first.page = 1;
        self.0.fetch_page(&first).await
    }
}

/// Keyset paging needs page numbers only inside a run of equal `when` longer than a page. An
/// API that ignores them is harmless elsewhere, and inside such a run it cannot make the
/// Poller loop: the repeated page is asked again a few times, then `run --once` stops with
/// the reason, everything before the run committed.
#[actix_rt::test]
async fn an_api_that_ignores_page_cannot_loop_for_ever() {
    let mut all = events(200);
    let tie = all[120].0;
    all.extend((0..120).map(|i| (tie, format!("tie-{i:03}"))));
    let world = World::new(all.clone());
    let mut parts = world.parts(Direction::Asc, Some(1000));
    parts.source = Arc::new(IgnoresPage(world.source.clone()));
    let mut pipeline = Pipeline::start(parts);
    let event = wait_for(&mut pipeline, |_| true).await;
    assert!(pipeline.shutdown(Duration::from_secs(10)).await);
    match &event {
        PipelineEvent::Failed { reason } => {
            assert!(reason.contains("cannot get past"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    // Per sweep: the repeated page and its retries, the run read again from its first page
    // once, and its repeated second page with retries; two sweeps (the second makes no
    // progress).
    let requests = world.source.requests.lock().unwrap().len();
    assert!(requests < 30, "{requests} requests");
    let before: Vec<_> = all.iter().filter(|(w, _)| *w < tie).cloned().collect();
    let rows = world.rows.rows.lock().unwrap();
    assert!(before
        .iter()
        .all(|(w, id)| rows.contains_key(&(*w, id.clone()))));
}

/// A source that adds events at one instant just before it answers the second page of the
/// run of events at that instant (as an API does when they arrive late).
struct AddsToRun {
    source: MemorySource,
    at: DateTime<Utc>,
    late: std::sync::Mutex<Vec<(DateTime<Utc>, String)>>,
}

#[async_trait::async_trait]
impl AuditSource for AddsToRun {
    async fn fetch_page(&self, request: &PageRequest) -> Result<Page, SourceError> {
        if request.page == 2 && request.since == self.at {
            self.source
                .add(std::mem::take(&mut *self.late.lock().unwrap()));
        }
        self.source.fetch_page(request).await
    }
}

/// Events added at an instant whose run of events is being paged sort before the page
/// reached and shift every page after it: page 2 then answers what page 1 did. The sweep
/// reads the run again from its first page instead of taking it for a repeated page at the
/// same offset for ever (found by the simulation: a stream stuck at such a committed
/// offset), and every event, the added ones included, lands once.
#[actix_rt::test]
async fn events_added_inside_a_run_of_equal_when_do_not_stall_the_sweep() {
    let mut all = events(100);
    let tie = all[60].0 + chrono::Duration::seconds(1);
    all.extend((100..220).map(|i| (tie, format!("tie-{i:03}"))));
    let late: Vec<_> = (0..50).map(|i| (tie, format!("tie-{i:03}"))).collect();
    let world = World::new(all.clone());
    let mut parts = world.parts(Direction::Asc, Some(1000));
    parts.source = Arc::new(AddsToRun {
        source: world.source.clone(),
        at: tie,
        late: std::sync::Mutex::new(late.clone()),
    });
    let mut pipeline = Pipeline::start(parts);
    completed(&wait_for(&mut pipeline, |_| true).await);
    assert!(pipeline.shutdown(Duration::from_secs(10)).await);
    all.extend(late);
    world.assert_exact_ids(&all);
}

#[actix_rt::test]
async fn pages_are_coalesced_into_batches() {
    let all = events(1003);
    let world = World::new(all.clone());
    let mut parts = world.parts(Direction::Asc, Some(1000));
    parts.poller.batch_max_events = 200; // four pages of 50
    let mut pipeline = Pipeline::start(parts);
    completed(&wait_for(&mut pipeline, |_| true).await);
    assert!(pipeline.shutdown(Duration::from_secs(10)).await);
    world.assert_exact(&all);
    // About 21 pages: batches of four pages, then the short last page.
    let requests = world.source.requests.lock().unwrap().len();
    assert_eq!(world.commits(), requests.div_ceil(4));
}

#[actix_rt::test]
async fn once_mode_gives_up_when_a_sink_keeps_failing_and_says_why() {
    let world = World::new(events(100));
    world.rows.faults.fail_from(1);
    let mut pipeline = world.start(Direction::Asc, Some(3));
    let event = wait_for(&mut pipeline, |_| true).await;
    assert!(pipeline.shutdown(Duration::from_secs(10)).await);
    match &event {
        PipelineEvent::Failed { reason } => {
            assert!(
                reason.contains("3 attempts") && reason.contains("injected failure of row sink"),
                "{reason}"
            )
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(world.commits(), 0);
}

#[actix_rt::test]
async fn the_page_cap_ends_a_sweep_and_the_next_sweep_goes_on() {
    let all = events(500);
    let world = World::new(all.clone());
    let mut parts = world.parts(Direction::Asc, Some(1000));
    parts.poller.max_pages_per_sweep = 3;
    let mut pipeline = Pipeline::start(parts);
    completed(&wait_for(&mut pipeline, |_| true).await);
    assert!(pipeline.shutdown(Duration::from_secs(10)).await);
    world.assert_exact(&all);
    // The first sweep stopped at three pages; the next one went on from where it stopped (no
    // page read twice), and so on until one reached the end of the window.
    let first_sweep_end = world.data_commits()[2].state.checkpoint.unwrap();
    let mut requests = world.source.requests.lock().unwrap().clone();
    // A request asked twice in a row (the stream's first page) is one page read.
    requests.dedup();
    assert_eq!(requests[3].since, first_sweep_end);
    assert!(requests.len() >= 500 / 50, "{} requests", requests.len());
}

/// A backfill is a bounded stream with its own checkpoint key; the live stream starts where
/// it ends. Even with a safety lag reaching across the boundary, neither reads the other's
/// range, so the shared sinks hold every event once.
#[actix_rt::test]
async fn a_backfill_and_the_live_stream_share_the_sinks_without_overlap() {
    let all = events(400);
    let boundary = all[200].0; // events 200..=203 share this time: the backfill ends before it
    assert_eq!(all[199].0 + chrono::Duration::seconds(7), boundary);
    let world = World::new(all.clone());
    let lag = Duration::from_secs(86_400);
    let live = |parts: &mut PipelineParts| {
        parts.poller.start = Some(boundary);
        parts.poller.safety_lag = lag;
    };
    let backfill_key = "acc.backfill.a_b";
    let backfill = |parts: &mut PipelineParts| {
        parts.poller.start = Some(initial_checkpoint());
        parts.poller.end = Some(boundary);
        parts.poller.safety_lag = lag;
        parts.checkpointer.stream = backfill_key.into();
    };
    completed(&world.once_with(Direction::Asc, live).await);
    completed(&world.once_with(Direction::Asc, live).await);
    let live_requests = world.source.requests.lock().unwrap().len();
    completed(&world.once_with(Direction::Asc, backfill).await);
    completed(&world.once_with(Direction::Asc, backfill).await);
    world.assert_exact_ids(&all);
    let requests = world.source.requests.lock().unwrap();
    assert!(requests[..live_requests]
        .iter()
        .all(|r| r.since >= boundary && r.before > boundary));
    assert!(requests[live_requests..]
        .iter()
        .all(|r| r.since >= initial_checkpoint() && r.before == boundary));
    assert_eq!(world.store.checkpoint(backfill_key), Some(all[199].0));
    let files = world.store.files.lock().unwrap();
    assert!(files
        .iter()
        .any(|f| f.stream == backfill_key && f.published));
}

/// A writer that finishes a batch after the pipeline rewound past it stages a file no commit
/// will name; its deletion is still under way when the sweep ends. `run --once` ends with
/// shutdown and then the process: shutdown must wait for the deletion, or the file stays in
/// the staging area for good (a last run has no next start to sweep it). The simulation found
/// this path; here the late ack and the slow deletion are built on purpose.
#[actix_rt::test]
async fn shutdown_waits_for_the_deletion_of_a_file_staged_after_a_rewind() {
    let all = events(100);
    let mut world = World::new(all.clone());
    // Parquet holds the first batch while PostgreSQL fails it: the pipeline rewinds.
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    world.files.gate = Some(gate.clone());
    world.files.discard_delay = Some(Duration::from_secs(2));
    world.rows.faults.only("row sink");
    world.rows.faults.on_call(1, Fault::Fail);
    let mut pipeline = world.start(Direction::Asc, Some(1000));
    // Recovery is done (its sweep of orphans found none) once the rewound batch is written
    // again; only then may the first batch's file appear, too late for that sweep.
    until("the first batch written again after the rewind", || {
        world.source_counter(|m| &m.pipeline_rewinds) >= 1
            && !world.rows.rows.lock().unwrap().is_empty()
    })
    .await;
    gate.add_permits(1000);
    completed(&wait_for(&mut pipeline, |e| !matches!(e, PipelineEvent::Drained)).await);
    assert!(
        !world.files.staged.lock().unwrap().is_empty(),
        "the abandoned file is still being deleted when the sweep ends (or this test proves nothing)"
    );
    assert!(pipeline.shutdown(Duration::from_secs(10)).await);
    world.assert_exact(&all);
}

/// Recovery deletes its own stream's staged orphans and never another stream's files in
/// flight (a backfill may run beside the live service).
#[actix_rt::test]
async fn recovery_deletes_only_its_own_staged_orphans() {
    let all = events(100);
    let world = World::new(all.clone());
    {
        let mut staged = world.files.staged.lock().unwrap();
        staged.insert("acc-orphan.parquet".into(), Vec::new());
        staged.insert("acc.backfill.a_b-inflight.parquet".into(), Vec::new());
    }
    completed(&world.once(Direction::Asc).await);
    let staged = world.files.staged.lock().unwrap();
    assert_eq!(
        staged.keys().collect::<Vec<_>>(),
        vec!["acc.backfill.a_b-inflight.parquet"]
    );
}

/// Dashboards and alerts see 0, not "no data", before the first rewind, retry or auth failure.
#[actix_rt::test]
async fn labelled_series_exist_at_zero_from_the_start() {
    let world = World::new(events(10));
    completed(&world.once(Direction::Asc).await);
    let families = world.metrics.registry.gather();
    let series = |name: &str| -> Vec<String> {
        families
            .iter()
            .filter(|f| f.name() == name)
            .flat_map(|f| f.get_metric())
            .map(|m| {
                m.get_label()
                    .iter()
                    .map(|l| l.value().to_owned())
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .collect()
    };
    let labels = format!("{ACCOUNT},v1");
    assert_eq!(series("cfaudit_pipeline_rewinds_total"), [labels.as_str()]);
    assert_eq!(series("cfaudit_auth_failed"), [labels.as_str()]);
    assert_eq!(
        series("cfaudit_events_dead_lettered_total"),
        [labels.as_str()]
    );
    let mut reasons = series("cfaudit_api_retries_total");
    reasons.sort();
    assert_eq!(
        reasons,
        ["bad_request", "out_of_place", "rate_limited", "transient"]
    );
    assert_eq!(world.source_counter(|m| &m.pipeline_rewinds), 0);
}

/// v2: cursor paging inside the sweep's window lands every event once, newest or oldest
/// first, with runs of equal times across page ends, pages shorter than the limit that carry a
/// cursor, and events arriving and expiring between pages.
#[actix_rt::test]
async fn a_v2_sweep_pages_by_cursor_and_lands_every_event_once() {
    for direction in [Direction::Asc, Direction::Desc] {
        let all = events(503);
        let world = World::new(all.clone());
        let arrived = (all[250].0, "ev-late-arrival".to_owned());
        let event = world
            .once_with(direction, |parts| {
                parts.poller.api_version = ApiVersion::V2;
                parts.poller.per_page = 37;
            })
            .await;
        assert!(
            matches!(event, PipelineEvent::SweepCompleted { .. }),
            "{direction:?}: {event:?}"
        );
        world.assert_exact(&all);
        let requests = world.source.requests.lock().unwrap().clone();
        assert!(requests.iter().all(|r| r.api_version == ApiVersion::V2));
        assert!(
            requests.iter().filter(|r| r.cursor.is_some()).count() >= 503 / 37,
            "{direction:?}: paged by cursor"
        );
        // A second sweep after an event arrived behind the checkpoint and the oldest expired:
        // the arrival lands once, nothing lands twice.
        world.source.add(vec![arrived.clone()]);
        world.source.expire_oldest(20);
        let event = world
            .once_with(direction, |parts| {
                parts.poller.api_version = ApiVersion::V2;
                parts.poller.per_page = 37;
                parts.poller.safety_lag = Duration::from_secs(86_400);
            })
            .await;
        assert!(matches!(event, PipelineEvent::SweepCompleted { .. }));
        let mut expected = all.clone();
        expected.push(arrived);
        world.assert_exact_ids(&expected);
    }
}

/// Streams sharing one process budget of two batch slots (fewer than one stream alone may
/// take): every stream completes exactly once, the slots are used, never more than two, and
/// all come back.
#[actix_rt::test]
async fn streams_sharing_one_process_budget_all_complete_within_it() {
    const SLOTS: usize = 2;
    let process = Arc::new(tokio::sync::Semaphore::new(SLOTS));
    let events = events(400);
    let worlds: Vec<World> = (0..4).map(|_| World::new(events.clone())).collect();
    let watching = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let watcher = {
        let (process, watching) = (process.clone(), watching.clone());
        tokio::spawn(async move {
            let mut most = 0;
            while watching.load(std::sync::atomic::Ordering::SeqCst) {
                most = most.max(SLOTS - process.available_permits());
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
            most
        })
    };
    let runs = worlds.iter().map(|world| {
        let process = process.clone();
        world.once_with(Direction::Asc, move |parts| {
            parts.process_budget = Some(process);
        })
    });
    let ends = futures::future::join_all(runs).await;
    watching.store(false, std::sync::atomic::Ordering::SeqCst);
    let most_in_use = watcher.await.unwrap();
    for (end, world) in ends.iter().zip(&worlds) {
        assert!(
            matches!(end, PipelineEvent::SweepCompleted { .. }),
            "{end:?}"
        );
        world.assert_exact(&events);
    }
    assert!(most_in_use >= 1, "the process's slots were taken");
    assert_eq!(process.available_permits(), SLOTS, "every slot came back");
}
