//! Deterministic simulation of the whole pipeline, in the spirit of FoundationDB's and
//! TigerBeetle's simulators: one seed draws a world (an API with ties, expiry at the head, late
//! events, repeated and missing pages, malformed pages, poison events, 429s and 5xx; sinks that
//! fail, hang and lose their answers; processes that crash at any step, a second process that
//! takes the stream over; safety lag and direction changing between runs), runs it on virtual
//! time with no I/O, then checks the invariant:
//!
//! every event that exists in the API at the end and lies in the collected range is in both
//! sinks exactly once, with the same columns; nothing else is there (only events the API held,
//! an uncommitted row only for an event that expired since); the dead letters are exactly the
//! poison events; the staging area is empty and every committed file is published.
//!
//! `SIM_SEEDS` (default 2000) seeds run; `SIM_SEED=n` replays one with its trace. A failing
//! seed prints the command that replays it.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use cfaudit_actors::memory::*;
use cfaudit_actors::*;
use chrono::{DateTime, SecondsFormat, TimeZone, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::value::RawValue;

const STREAM: &str = "acc";
const BACKFILL: &str = "acc.backfill.sim";
const OVERLAP: &str = "acc.backfill.overlap";

fn base() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap()
}

// ---------------------------------------------------------------------------------------------
// The scenario a seed draws.

#[derive(Clone, Debug)]
struct Scenario {
    seed: u64,
    events: usize,
    per_page: u32,
    batch_max_events: usize,
    max_inflight: usize,
    max_pages: u32,
    before_inclusive: bool,
    /// `Some((since, until))`: a backfill stream; `None`: the live stream from `start`.
    bounded: Option<(DateTime<Utc>, DateTime<Utc>)>,
    start: DateTime<Utc>,
    /// Probabilities per API request.
    p_429: f64,
    p_5xx: f64,
    p_repeat: f64,
    p_missing: f64,
    /// The answer the API last gave to any request of any process (a process killed or a
    /// sweep rewound since): a cache or balancer that mixes up answers.
    p_foreign: f64,
    p_expire: f64,
    p_late: f64,
    /// Which API the world serves: v1 (page numbers) or v2 (cursors).
    api: ApiVersion,
    /// v2 reads `since` as exclusive ("newer than", as its documentation now says).
    since_exclusive: bool,
    /// Probabilities per sink call.
    p_fail: f64,
    p_hang: f64,
    p_lost_answer: f64,
    runs: Vec<RunPlan>,
}

#[derive(Clone, Debug)]
struct RunPlan {
    direction: Direction,
    lag: Duration,
    once: bool,
    /// Service mode: how long it runs before a graceful stop.
    service_for: Duration,
    /// The process crashes at this adapter call.
    crash_at: Option<u64>,
    /// A second process takes the stream over after this long (the first one's lease is gone
    /// with its connection, but it runs on).
    rival_after: Option<Duration>,
    /// After the run, the staging area is wiped (a lost volume): committed files not yet
    /// published are gone.
    wipe_staging: bool,
    /// A second stream over an overlapping range runs at the same time (streams are never
    /// registered so, but only the dataset's event index keeps the sinks exact if they are).
    overlap: bool,
}

fn chance(rng: &mut StdRng, p: f64) -> bool {
    rng.random_bool(p.clamp(0.0, 1.0))
}

impl Scenario {
    fn draw(seed: u64) -> Scenario {
        // Its own generator: the rest of a seed's scenario is the same for either API.
        let mut versions = StdRng::seed_from_u64(seed ^ 0x0002_0002);
        let api = if chance(&mut versions, 0.4) {
            ApiVersion::V2
        } else {
            ApiVersion::V1
        };
        let since_exclusive = api == ApiVersion::V2 && chance(&mut versions, 0.5);
        let mut rng = StdRng::seed_from_u64(seed);
        let faulty = chance(&mut rng, 0.7);
        let p = |rng: &mut StdRng, max: f64| {
            if faulty {
                rng.random_range(0.0..max)
            } else {
                0.0
            }
        };
        let events = rng.random_range(15..220);
        let bounded = chance(&mut rng, 0.25).then(|| {
            (
                base() - chrono::Duration::hours(3),
                base() - chrono::Duration::minutes(rng.random_range(5..90)),
            )
        });
        let lags = [0u64, 1, 5, 30, 120, 900, 3600, 86_400];
        let runs = (0..rng.random_range(1..5))
            .map(|_| RunPlan {
                direction: if chance(&mut rng, 0.35) {
                    Direction::Desc
                } else {
                    Direction::Asc
                },
                lag: Duration::from_secs(lags[rng.random_range(0..lags.len())]),
                once: chance(&mut rng, 0.6),
                service_for: Duration::from_millis(rng.random_range(50..20_000)),
                crash_at: chance(&mut rng, 0.45).then(|| rng.random_range(1..400)),
                rival_after: chance(&mut rng, 0.2)
                    .then(|| Duration::from_millis(rng.random_range(0..400))),
                wipe_staging: chance(&mut rng, 0.25),
                overlap: chance(&mut rng, 0.1),
            })
            .collect();
        Scenario {
            seed,
            events,
            per_page: rng.random_range(2..16),
            batch_max_events: rng.random_range(1..40),
            max_inflight: rng.random_range(1..5),
            max_pages: if chance(&mut rng, 0.3) {
                rng.random_range(1..6)
            } else {
                1000
            },
            before_inclusive: chance(&mut rng, 0.2),
            bounded,
            start: base() - chrono::Duration::hours(3),
            p_429: p(&mut rng, 0.08),
            p_5xx: p(&mut rng, 0.1),
            p_repeat: p(&mut rng, 0.08),
            p_missing: p(&mut rng, 0.08),
            p_expire: p(&mut rng, 0.15),
            p_late: p(&mut rng, 0.15),
            p_fail: p(&mut rng, 0.06),
            p_hang: p(&mut rng, 0.02),
            p_lost_answer: p(&mut rng, 0.04),
            p_foreign: p(&mut rng, 0.05),
            api,
            since_exclusive,
            runs,
        }
    }

    fn stream(&self) -> &'static str {
        if self.bounded.is_some() {
            BACKFILL
        } else {
            STREAM
        }
    }

    fn range(&self) -> (DateTime<Utc>, Option<DateTime<Utc>>) {
        match self.bounded {
            Some((since, until)) => (since, Some(until)),
            None => (self.start, None),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The API model.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Must become a row.
    Row,
    /// No usable id or `when`: a dead letter of the mapping.
    Invalid,
    /// Not JSON at all (invalid UTF-8 inside): a dead letter of the page.
    Unreadable,
    /// Valid, but the row sink refuses it (a value the database cannot store).
    Refused,
}

#[derive(Clone, Debug)]
struct ApiEvent {
    when: DateTime<Utc>,
    id: String,
    body: Vec<u8>,
    kind: Kind,
    /// Present from the start (not a late arrival).
    initial: bool,
}

impl ApiEvent {
    fn new(
        rng: &mut StdRng,
        api: ApiVersion,
        n: usize,
        when: DateTime<Utc>,
        initial: bool,
    ) -> ApiEvent {
        let id = format!("ev-{n:05}");
        let stamp = when.to_rfc3339_opts(SecondsFormat::AutoSi, true);
        // An event's time: v1 `"when":"…"`, v2 `"action":{"time":"…"}`.
        let time = |stamp: &str| match api {
            ApiVersion::V1 => format!(r#""when":"{stamp}""#),
            ApiVersion::V2 => format!(r#""action":{{"time":"{stamp}"}}"#),
        };
        let roll = rng.random_range(0..100);
        let t = time(&stamp);
        let (kind, body) = match roll {
            0..=2 => (
                Kind::Invalid,
                format!(r#"{{"id":"{id}",{}}}"#, time("not a time")).into_bytes(),
            ),
            3..=4 => (Kind::Unreadable, {
                let mut b = format!(r#"{{"id":"{id}",{t},"actor":{{"email":""#).into_bytes();
                b.extend_from_slice(b"\xff\xfe\"}}");
                b
            }),
            5..=7 => (
                Kind::Refused,
                format!(r#"{{"id":"{id}",{t},"poison":true}}"#).into_bytes(),
            ),
            // A member-chosen name holding the text `\u0000`, and a real NUL: both are rows.
            8..=10 => (Kind::Row, format!(r#"{{"id":"{id}",{t},"actor":{{"email":"a@b.c"}},"metadata":{{"token_name":"prod\\u0000hidden"}}}}"#).into_bytes()),
            11..=12 => (Kind::Row, format!(r#"{{"id":"{id}",{t},"metadata":{{"name":"nul\u0000here"}}}}"#).into_bytes()),
            _ => (
                Kind::Row,
                format!(r#"{{"id":"{id}",{t},"actor":{{"email":"a@example.com","ip":"192.0.2.7"}}}}"#)
                    .into_bytes(),
            ),
        };
        ApiEvent {
            when,
            id,
            body,
            kind,
            initial,
        }
    }
}

struct ApiState {
    /// The events the API holds now, sorted by `when`, then id.
    events: Vec<ApiEvent>,
    /// Every event it ever held, by id.
    ever: BTreeMap<String, ApiEvent>,
    expired: BTreeSet<String>,
    next_id: usize,
    /// Each process's previous request and its answer: a repeated page is the answer to the
    /// same query one page earlier (an API that ignores or mis-counts `page`).
    previous: BTreeMap<usize, (PageRequest, Vec<ApiEvent>)>,
    /// Faults and changes are off (the final, clean run).
    quiet: bool,
    /// Every request, with the process that made it.
    requests: Vec<(usize, PageRequest)>,
    /// Queries (by process) answered with a missing page or another request's answer: a
    /// glitch never answers the same query twice in a row (two would be the truth to any client).
    glitched: BTreeSet<String>,
    /// The last answer given, to whichever process and request, with its cursor.
    last_answer: Option<(Vec<ApiEvent>, Option<String>)>,
}

struct World {
    scenario: Scenario,
    rng: Arc<Mutex<StdRng>>,
    api: Mutex<ApiState>,
    rows: MemoryRowSink,
    files: MemoryFileSink,
    store: MemoryCheckpointStore,
    clock: Clock,
    trace: Mutex<Vec<String>>,
    /// Every process started: its liveness switch.
    processes: Mutex<Vec<Arc<AtomicBool>>>,
    /// Every answer of the API goes to the trace (a replayed seed).
    verbose: bool,
    /// Set when a process made far more calls than its work needs: a loop.
    runaway: Mutex<Option<String>>,
    /// How often each fault and each recovery path happened.
    stats: Mutex<BTreeMap<&'static str, u64>>,
}

/// No process needs this many adapter calls for a few hundred events: past it, it loops.
const RUNAWAY_CALLS: u64 = 200_000;

impl World {
    fn new(scenario: Scenario, clock: Clock) -> Arc<World> {
        let mut rng = StdRng::seed_from_u64(scenario.seed ^ 0x5eed);
        let mut events = Vec::new();
        let mut when = scenario.start + chrono::Duration::seconds(rng.random_range(0..60));
        let mut n = 0;
        while n < scenario.events {
            let tie = chance(&mut rng, 0.25);
            if !tie {
                when += chrono::Duration::milliseconds(rng.random_range(1..120_000));
            }
            // Now and then a run of equal `when` longer than two pages.
            let run = if chance(&mut rng, 0.04) {
                scenario.per_page as usize * 2 + 1
            } else {
                1
            };
            for _ in 0..run {
                events.push(ApiEvent::new(
                    &mut rng,
                    scenario.api,
                    n,
                    when.min(base()),
                    true,
                ));
                n += 1;
            }
        }
        events.sort_by(|a, b| (a.when, &a.id).cmp(&(b.when, &b.id)));
        let ever = events.iter().map(|e| (e.id.clone(), e.clone())).collect();
        let (rows, store) = MemoryRowSink::with_store();
        rows.refused.lock().unwrap().extend(
            events
                .iter()
                .filter(|e| e.kind == Kind::Refused)
                .map(|e| e.id.clone()),
        );
        let world = Arc::new(World {
            rng: Arc::new(Mutex::new(rng)),
            api: Mutex::new(ApiState {
                events,
                ever,
                expired: BTreeSet::new(),
                next_id: n,
                previous: BTreeMap::new(),
                quiet: false,
                requests: Vec::new(),
                glitched: BTreeSet::new(),
                last_answer: None,
            }),
            rows,
            files: MemoryFileSink::default(),
            store,
            clock,
            trace: Mutex::new(Vec::new()),
            processes: Mutex::new(Vec::new()),
            verbose: std::env::var_os("SIM_SEED").is_some(),
            runaway: Mutex::new(None),
            stats: Mutex::new(BTreeMap::new()),
            scenario,
        });
        world.plan_sink_faults();
        world
    }

    fn plan_sink_faults(self: &Arc<World>) {
        let plan = |world: &Arc<World>| -> FaultPlan {
            let (rng, s) = (world.rng.clone(), world.scenario.clone());
            Arc::new(move |_what, _call| {
                let mut rng = rng.lock().unwrap();
                let roll: f64 = rng.random();
                if roll < s.p_fail {
                    Some(Fault::Fail)
                } else if roll < s.p_fail + s.p_hang {
                    Some(Fault::Hang)
                } else if roll < s.p_fail + s.p_hang + s.p_lost_answer {
                    Some(Fault::FailAfter)
                } else {
                    None
                }
            })
        };
        self.rows.faults.plan(plan(self));
        self.files.faults.plan(plan(self));
        self.store.faults.plan(plan(self));
    }

    fn heal(&self) {
        self.rows.faults.heal();
        self.files.faults.heal();
        self.store.faults.heal();
        self.api.lock().unwrap().quiet = true;
    }

    fn count(&self, what: &'static str) {
        *self.stats.lock().unwrap().entry(what).or_default() += 1;
    }

    fn trace(&self, line: String) {
        if self.verbose {
            println!("{line}");
        }
        self.trace.lock().unwrap().push(line);
    }

    /// In a replayed seed's trace: what the API answered `request` with, when it was a fault.
    fn trace_answer(&self, process: usize, request: &PageRequest, answer: &str) {
        if self.verbose {
            self.trace(format!(
                "p{process} {:?} since {} before {} page {} -> {answer}",
                request.direction, request.since, request.before, request.page
            ));
        }
    }

    fn page(&self, process: usize, request: &PageRequest) -> Result<Page, SourceError> {
        let s = &self.scenario;
        let mut rng = self.rng.lock().unwrap();
        let mut api = self.api.lock().unwrap();
        api.requests.push((process, request.clone()));
        let now = self.clock.now();
        if !api.quiet {
            if chance(&mut rng, s.p_expire) && !api.events.is_empty() {
                // Retention is by time: everything up to the k-th oldest event's `when` goes.
                let k = rng.random_range(1..=api.events.len().div_ceil(8));
                let cutoff = api.events[k - 1].when;
                let k = api.events.partition_point(|e| e.when <= cutoff);
                let gone: Vec<ApiEvent> = api.events.drain(..k).collect();
                self.count("api: events expired at the head");
                for e in gone {
                    api.expired.insert(e.id);
                }
            }
            if chance(&mut rng, s.p_late) {
                let back = chrono::Duration::seconds(rng.random_range(0..7200));
                let mut when = (now - back).max(s.start);
                if chance(&mut rng, 0.3) && !api.events.is_empty() {
                    // A late event sharing the time of one already there.
                    when = api.events[rng.random_range(0..api.events.len())].when;
                }
                let n = api.next_id;
                api.next_id += 1;
                let event = ApiEvent::new(&mut rng, s.api, n, when, false);
                self.count("api: late events");
                if event.kind == Kind::Refused {
                    self.rows.refused.lock().unwrap().insert(event.id.clone());
                }
                api.ever.insert(event.id.clone(), event.clone());
                api.events.push(event);
                api.events
                    .sort_by(|a, b| (a.when, &a.id).cmp(&(b.when, &b.id)));
            }
            let roll: f64 = rng.random();
            if roll < s.p_429 {
                self.count("api: 429");
                return Err(SourceError::RateLimited {
                    retry_after: Some(Duration::from_secs(rng.random_range(1..40))),
                });
            }
            if roll < s.p_429 + s.p_5xx {
                self.count("api: 5xx");
                return Err(SourceError::Transient("HTTP 502".into()));
            }
            if roll < s.p_429 + s.p_5xx + s.p_repeat && s.api == ApiVersion::V2 {
                // v2: the page before, with the cursor just sent (an API that ignores it).
                if let (Some(cursor), Some((_, answer))) =
                    (&request.cursor, api.previous.get(&process))
                {
                    self.count("api: repeated pages");
                    return Ok(Page {
                        next_cursor: Some(cursor.clone()),
                        ..page_of(answer)
                    });
                }
            }
            if roll < s.p_429 + s.p_5xx + s.p_repeat {
                if let Some((asked, answer)) = api.previous.get(&process) {
                    let same_query = PageRequest {
                        page: request.page,
                        ..asked.clone()
                    } == *request;
                    if same_query && asked.page + 1 == request.page {
                        self.count("api: repeated pages");
                        self.trace_answer(process, request, "repeated page");
                        return Ok(page_of(answer));
                    }
                }
            }
            let query = format!("{process} {request:?}");
            let again = api.glitched.remove(&query);
            if roll < s.p_429 + s.p_5xx + s.p_repeat + s.p_missing && !again {
                api.glitched.insert(query);
                self.count("api: missing pages");
                self.trace_answer(process, request, "missing page");
                return Ok(Page::default());
            }
            // As with a missing page: answered wrongly twice in a row, a query has that answer
            // for any client. Not for a cursor's page: a cursor names where its chain goes on,
            // and the Poller trusts it (checking would cost a second request per page).
            let foreign = s.p_429 + s.p_5xx + s.p_repeat + s.p_missing + s.p_foreign;
            if roll < foreign && !again && request.cursor.is_none() {
                if let Some((answer, next_cursor)) = api.last_answer.clone() {
                    api.glitched.insert(query);
                    self.count("api: answers to another request");
                    self.trace_answer(process, request, "another request's answer");
                    return Ok(Page {
                        next_cursor,
                        ..page_of(&answer)
                    });
                }
            }
        }
        let inclusive = s.before_inclusive;
        let asked = PageRequest {
            before: if inclusive {
                request.before + chrono::Duration::nanoseconds(1)
            } else {
                request.before
            },
            since: if s.since_exclusive {
                request.since + chrono::Duration::nanoseconds(1)
            } else {
                request.since
            },
            ..request.clone()
        };
        let (selected, next_cursor): (Vec<ApiEvent>, Option<String>) = match s.api {
            ApiVersion::V1 => (
                v1_page(&api.events, |e| e.when, &asked)
                    .into_iter()
                    .cloned()
                    .collect(),
                None,
            ),
            ApiVersion::V2 => {
                let (page, next) = v2_page(&api.events, |e| (e.when, e.id.as_str()), &asked)?;
                (page.into_iter().cloned().collect(), next)
            }
        };
        api.previous
            .insert(process, (request.clone(), selected.clone()));
        api.last_answer = Some((selected.clone(), next_cursor.clone()));
        if self.verbose {
            self.trace(format!(
                "p{process} {:?} since {} before {} page {} -> {:?}",
                request.direction,
                request.since,
                request.before,
                request.page,
                selected
                    .iter()
                    .map(|e| format!("{}@{}", e.id, e.when.format("%H:%M:%S%.3f")))
                    .collect::<Vec<_>>()
            ));
        }
        Ok(Page {
            next_cursor,
            ..page_of(&selected)
        })
    }
}

fn page_of(events: &[ApiEvent]) -> Page {
    let mut page = Page::default();
    for event in events {
        match std::str::from_utf8(&event.body) {
            Ok(text) => match RawValue::from_string(text.to_owned()) {
                Ok(raw) => page.events.push(raw),
                Err(e) => page.unreadable.push(UnreadableEvent {
                    bytes: event.body.clone(),
                    reason: e.to_string(),
                }),
            },
            Err(e) => page.unreadable.push(UnreadableEvent {
                bytes: event.body.clone(),
                reason: e.to_string(),
            }),
        }
    }
    page
}

// ---------------------------------------------------------------------------------------------
// A process: the world's adapters behind a switch that a crash turns off.

#[derive(Clone)]
struct Process {
    id: usize,
    world: Arc<World>,
    alive: Arc<AtomicBool>,
    calls: Arc<AtomicU64>,
    crash_at: Option<u64>,
    dying: Arc<AtomicBool>,
}

impl Process {
    fn new(world: &Arc<World>, crash_at: Option<u64>) -> Process {
        let alive = Arc::new(AtomicBool::new(true));
        let mut processes = world.processes.lock().unwrap();
        processes.push(alive.clone());
        Process {
            id: processes.len(),
            world: world.clone(),
            alive,
            calls: Arc::default(),
            crash_at,
            dying: Arc::default(),
        }
    }

    fn alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }

    fn kill(&self) {
        self.alive.store(false, Ordering::SeqCst);
    }

    /// Every call of the process goes through here: a dead process never returns, and the
    /// crash happens before the call's effect or after it, before its answer.
    async fn call<T>(&self, call: impl Future<Output = T>) -> T {
        if !self.alive() {
            return std::future::pending().await;
        }
        let latency = self.world.rng.lock().unwrap().random_range(0..4);
        tokio::time::sleep(Duration::from_millis(latency)).await;
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        if n > RUNAWAY_CALLS {
            *self.world.runaway.lock().unwrap() =
                Some(format!("process {} made {n} calls: a loop", self.id));
            self.kill();
            return std::future::pending().await;
        }
        if Some(n) == self.crash_at {
            self.world.count("process crashes");
            if self.world.rng.lock().unwrap().random_bool(0.5) {
                self.world
                    .trace(format!("p{} crashes before call {n}", self.id));
                self.kill();
            } else {
                self.dying.store(true, Ordering::SeqCst);
            }
        }
        if !self.alive() {
            return std::future::pending().await;
        }
        let answer = call.await;
        if self.dying.load(Ordering::SeqCst) {
            self.world
                .trace(format!("p{} crashes after call {n}", self.id));
            self.kill();
            return std::future::pending().await;
        }
        answer
    }
}

#[async_trait]
impl AuditSource for Process {
    async fn fetch_page(&self, request: &PageRequest) -> Result<Page, SourceError> {
        self.call(async { self.world.page(self.id, request) }).await
    }
}

#[async_trait]
impl RowSink for Process {
    async fn write_rows(
        &self,
        fence: Option<&Fence>,
        rows: &[AuditRow],
    ) -> Result<RowWriteReport, SinkError> {
        let written = self.call(self.world.rows.write_rows(fence, rows)).await;
        match &written {
            Err(SinkError::Rejected(_)) => self.world.count("rows refused (poison isolated)"),
            Err(SinkError::Fenced(_)) => self.world.count("writes fenced"),
            _ => {}
        }
        written
    }
}

#[async_trait]
impl FileSink for Process {
    async fn stage(
        &self,
        stream: &str,
        lease: u64,
        rows: Arc<Vec<AuditRow>>,
    ) -> Result<Vec<StagedFile>, SinkError> {
        self.call(self.world.files.stage(stream, lease, rows)).await
    }

    /// File by file, each a copy then a delete (as on S3), with a crash point between any two.
    async fn publish(&self, files: &[CommittedFile]) -> Result<(), SinkError> {
        let sink = &self.world.files;
        for file in files {
            let copied = self
                .call(
                    sink.faults
                        .around("publish", || Ok(sink.copy_to_final(file))),
                )
                .await?;
            if copied {
                self.call(async {
                    sink.staged.lock().unwrap().remove(&file.staged_path);
                })
                .await;
            } else if !sink
                .published
                .lock()
                .unwrap()
                .contains_key(&file.final_path)
            {
                return Err(SinkError::Lost {
                    final_path: file.final_path.clone(),
                    message: "staged and final copies are both missing".into(),
                });
            }
        }
        Ok(())
    }

    async fn discard(&self, staged_paths: &[String]) -> Result<(), SinkError> {
        self.call(self.world.files.discard(staged_paths)).await
    }

    async fn list_staged(&self, prefix: &str) -> Result<Vec<String>, SinkError> {
        self.call(self.world.files.list_staged(prefix)).await
    }
}

#[async_trait]
impl CheckpointStore for Process {
    async fn load(&self, stream: &str) -> Result<CommittedState, SinkError> {
        self.call(self.world.store.load(stream)).await
    }

    async fn committed_ids(&self, events: &[SeenId]) -> Result<HashSet<String>, SinkError> {
        let found = self.call(self.world.store.committed_ids(events)).await;
        if self.world.verbose {
            let ids: Vec<&str> = events.iter().map(|e| e.id.as_str()).collect();
            self.world
                .trace(format!("p{} lookup {ids:?} -> {found:?}", self.id));
        }
        found
    }

    async fn commit(&self, record: &CommitRecord) -> Result<(), SinkError> {
        let result = self.call(self.world.store.commit(record)).await;
        match &result {
            Err(SinkError::Conflict(_)) => self
                .world
                .count("commits refused: event already in the dataset"),
            Err(SinkError::Fenced(_)) => self.world.count("commits fenced"),
            _ => {}
        }
        self.world.trace(format!(
            "p{} commit {} -> {:?} {:?}; events {:?}, dead letters {}, unfinished {:?}",
            self.id,
            record.state.commit_seq,
            record.state.checkpoint,
            result.as_ref().err(),
            record
                .events
                .iter()
                .map(|e| e.id.as_str())
                .collect::<Vec<_>>(),
            record.dead_letters.len(),
            record.state.unfinished.as_ref().map(|u| (u.anchor, u.page)),
        ));
        result
    }

    async fn unpublished(&self, stream: &str) -> Result<Vec<CommittedFile>, SinkError> {
        self.call(self.world.store.unpublished(stream)).await
    }

    async fn mark_published(&self, final_paths: &[String]) -> Result<(), SinkError> {
        self.call(self.world.store.mark_published(final_paths))
            .await
    }

    async fn forget_lost_file(&self, fence: &Fence, final_path: &str) -> Result<u64, SinkError> {
        self.world.count("lost files collected again");
        self.call(self.world.store.forget_lost_file(fence, final_path))
            .await
    }
}

// ---------------------------------------------------------------------------------------------
// Running the world.

fn parts(
    world: &Arc<World>,
    process: &Process,
    plan: &RunPlan,
    stream: &str,
    lease: u64,
) -> PipelineParts {
    let s = &world.scenario;
    let (start, end) = if stream == OVERLAP {
        (s.start, Some(s.start + chrono::Duration::hours(1)))
    } else {
        s.range()
    };
    let backoff = Backoff {
        initial: Duration::from_millis(50),
        max: Duration::from_secs(20),
    };
    let shared = Arc::new(process.clone());
    PipelineParts {
        poller: PollerConfig {
            account_id: STREAM.into(),
            api_version: s.api,
            per_page: s.per_page,
            direction: plan.direction,
            safety_lag: plan.lag,
            poll_interval: Duration::from_secs(30),
            start: Some(start),
            end,
            hide_user_logs: false,
            max_inflight_batches: s.max_inflight,
            batch_max_events: s.batch_max_events,
            batch_max_bytes: usize::MAX,
            max_pages_per_sweep: s.max_pages,
            backoff,
            default_retry_after: Duration::from_secs(5),
            max_server_wait: Duration::from_secs(600),
            auth_recheck: Duration::from_secs(600),
            once: plan.once.then_some(1_000_000),
        },
        checkpointer: CheckpointerConfig {
            account_id: STREAM.into(),
            api_version: s.api,
            stream: stream.into(),
            lease,
            ack_timeout: Duration::from_secs(60),
            sink_timeout: Duration::from_secs(30),
            backoff,
        },
        source: shared.clone(),
        sinks: vec![
            Arc::new(PgTarget(shared.clone())),
            Arc::new(ParquetTarget(shared.clone())),
        ],
        files: shared.clone(),
        store: shared,
        metrics: Metrics::new(),
        clock: world.clock.clone(),
        rng_seed: Some(s.seed ^ process.id as u64),
        process_budget: None,
    }
}

struct Running {
    process: Process,
    pipeline: Pipeline,
}

fn start(world: &Arc<World>, plan: &RunPlan, crash_at: Option<u64>) -> Running {
    start_on(world, plan, world.scenario.stream(), crash_at)
}

fn start_on(world: &Arc<World>, plan: &RunPlan, stream: &str, crash_at: Option<u64>) -> Running {
    let process = Process::new(world, crash_at);
    let lease = world.store.leases.acquire(stream);
    world.trace(format!(
        "p{} starts on {stream}: lease {lease}, {:?}, lag {:?}, once {}",
        process.id, plan.direction, plan.lag, plan.once
    ));
    let pipeline = Pipeline::start(parts(world, &process, plan, stream, lease));
    Running { process, pipeline }
}

/// Runs a process until it ends (once: its sweep completes or it fails; service: its time is
/// up and it drains), crashes, or `limit` passes. `true` when a once-run completed.
async fn run_process(
    world: &Arc<World>,
    running: &mut Running,
    plan: &RunPlan,
    limit: Duration,
) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    let stop_at = tokio::time::Instant::now() + plan.service_for;
    // One ticker for the whole run: a sleep made anew in each turn of the loop would start
    // over at every event, and a busy pipeline (an event per commit) would never let it fire.
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            biased;
            event = running.pipeline.next_event() => match event {
                Some(PipelineEvent::SweepCompleted { .. }) if plan.once => {
                    world.trace(format!("p{} completed", running.process.id));
                    // As `run --once` ends.
                    running.pipeline.finish(Duration::from_secs(30)).await;
                    return true;
                }
                Some(PipelineEvent::Failed { reason }) | Some(PipelineEvent::Fenced { reason }) => {
                    world.trace(format!("p{} ended: {reason}", running.process.id));
                    return false;
                }
                Some(_) => {}
                None => return false,
            },
            _ = tick.tick() => {
                if !running.process.alive() || tokio::time::Instant::now() >= deadline {
                    return false;
                }
                if !plan.once && tokio::time::Instant::now() >= stop_at {
                    tokio::time::timeout(Duration::from_secs(120), drain(&mut running.pipeline)).await.ok();
                    return false;
                }
            }
        }
    }
}

async fn drain(pipeline: &mut Pipeline) {
    pipeline.drain();
    while let Some(event) = pipeline.next_event().await {
        if event == PipelineEvent::Drained {
            return;
        }
    }
}

/// What the run left for the invariant.
struct Outcome {
    /// The oldest `since` of the final process's fresh sweep: it re-read everything from there.
    final_since: Option<DateTime<Utc>>,
    final_completed: bool,
}

async fn simulate(world: Arc<World>) -> Outcome {
    let plans = world.scenario.runs.clone();
    for plan in &plans {
        let mut first = start(&world, plan, plan.crash_at);
        let mut rival: Option<Running> = None;
        let overlap = plan.overlap.then(|| {
            world.count("overlapping streams");
            start_on(
                &world,
                &RunPlan {
                    once: false,
                    ..plan.clone()
                },
                OVERLAP,
                None,
            )
        });
        if let Some(after) = plan.rival_after {
            let ended = tokio::time::timeout(
                after,
                run_process(&world, &mut first, plan, Duration::from_secs(6 * 3600)),
            )
            .await;
            if ended.is_err() {
                // The first process's lease is gone (its connection died) but it runs on: the
                // second one takes the stream over.
                world.count("streams taken over by a second process");
                let mut second = start(&world, plan, None);
                run_process(&world, &mut second, plan, Duration::from_secs(6 * 3600)).await;
                rival = Some(second);
            }
        } else {
            run_process(&world, &mut first, plan, Duration::from_secs(6 * 3600)).await;
        }
        // Whatever still runs of this run stops here (a process ends with its run).
        first.process.kill();
        if let Some(overlap) = overlap {
            overlap.process.kill();
        }
        if let Some(second) = rival {
            second.process.kill();
        }
        if plan.wipe_staging {
            world.count("staging areas wiped");
            world.trace("staging wiped".into());
            world.files.staged.lock().unwrap().clear();
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // The final, clean run: no faults, no crash, the last run's settings, as a service: it
    // finishes whatever sweep is unfinished, then makes one fresh sweep (from the checkpoint
    // minus the lag), which every event from its start on must be in.
    world.heal();
    let mut plan = plans.last().cloned().expect("at least one run");
    plan.once = false;
    plan.crash_at = None;
    plan.rival_after = None;
    let mut last = start(&world, &plan, None);
    let mut fresh_from = None;
    let mut completed = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(48 * 3600);
    while let Ok(Some(event)) = tokio::time::timeout_at(deadline, last.pipeline.next_event()).await
    {
        match event {
            PipelineEvent::SweepCompleted { .. } if fresh_from.is_none() => {
                fresh_from = Some(world.api.lock().unwrap().requests.len());
            }
            PipelineEvent::SweepCompleted { .. } => {
                completed = true;
                break;
            }
            PipelineEvent::Failed { reason } | PipelineEvent::Fenced { reason } => {
                world.trace(format!("the final run ended: {reason}"));
                break;
            }
            _ => {}
        }
    }
    if completed {
        tokio::time::timeout(Duration::from_secs(600), drain(&mut last.pipeline))
            .await
            .ok();
    }
    last.process.kill();
    if plans.iter().any(|p| p.overlap) {
        // The overlapping stream's own recovery publishes and cleans up what it left.
        let once = RunPlan {
            once: true,
            ..plan.clone()
        };
        let mut other = start_on(&world, &once, OVERLAP, None);
        run_process(&world, &mut other, &once, Duration::from_secs(48 * 3600)).await;
        tokio::time::timeout(Duration::from_secs(600), drain(&mut other.pipeline))
            .await
            .ok();
        other.process.kill();
    }
    let requests = &world.api.lock().unwrap().requests;
    Outcome {
        final_since: requests[fresh_from.unwrap_or(requests.len())..]
            .iter()
            .filter(|(p, _)| *p == last.process.id)
            .map(|(_, r)| r.since)
            .min(),
        final_completed: completed,
    }
}

// ---------------------------------------------------------------------------------------------
// The invariant.

fn check(world: &World, outcome: &Outcome) -> Result<(), String> {
    let s = &world.scenario;
    if let Some(runaway) = world.runaway.lock().unwrap().clone() {
        return Err(runaway);
    }
    if !outcome.final_completed {
        return Err("the final run, with every fault healed, did not complete its sweep".into());
    }
    let (start, until) = s.range();
    let state = world.store.committed_state(s.stream());
    let swept_until = state
        .swept_until
        .ok_or("no sweep reached the end of its window")?;
    if let Some(until) = until {
        if swept_until != until {
            return Err(format!(
                "the backfill is complete up to {swept_until}, not {until}"
            ));
        }
    }
    if let Some(checkpoint) = state.checkpoint {
        if checkpoint > swept_until {
            return Err(format!(
                "checkpoint {checkpoint} is beyond the window's end {swept_until}"
            ));
        }
    }
    let final_since = outcome.final_since.ok_or("the final run made no request")?;
    let api = world.api.lock().unwrap();
    let required = |e: &ApiEvent| {
        e.when >= start && e.when < swept_until && (e.initial || e.when >= final_since)
    };
    let pg = world.rows.rows.lock().unwrap();
    let published = world.files.published.lock().unwrap();
    let mut parquet: BTreeMap<String, &AuditRow> = BTreeMap::new();
    for row in published.values().flatten() {
        if parquet.insert(row.event_id.clone(), row).is_some() {
            return Err(format!("event {} is twice in the dataset", row.event_id));
        }
    }
    let mut pg_ids: BTreeMap<String, &AuditRow> = BTreeMap::new();
    for row in pg.values() {
        if pg_ids.insert(row.event_id.clone(), row).is_some() {
            return Err(format!("event {} is twice in audit_logs", row.event_id));
        }
    }
    for e in api.events.iter().filter(|e| required(e)) {
        match e.kind {
            Kind::Row => {
                if !pg_ids.contains_key(&e.id) {
                    return Err(format!(
                        "event {} ({}) is missing from audit_logs",
                        e.id, e.when
                    ));
                }
                if !parquet.contains_key(&e.id) {
                    return Err(format!(
                        "event {} ({}) is missing from the dataset",
                        e.id, e.when
                    ));
                }
            }
            _ => {
                let escaped = mapping::escape_nul(std::str::from_utf8(&e.body).unwrap_or_default())
                    .into_owned();
                let dead = world.store.dead_letters.lock().unwrap();
                if !dead
                    .iter()
                    .any(|d| d.raw_event == e.body || d.raw_event == escaped.as_bytes())
                {
                    return Err(format!(
                        "poison event {} ({:?}) has no dead letter",
                        e.id, e.kind
                    ));
                }
            }
        }
    }
    for (id, row) in &parquet {
        let Some(event) = api.ever.get(id) else {
            return Err(format!("the dataset holds {id}, which the API never had"));
        };
        if event.kind != Kind::Row {
            return Err(format!("the dataset holds the poison event {id}"));
        }
        if event.when < start {
            return Err(format!(
                "the dataset holds {id} from before the stream's start"
            ));
        }
        if let Some(until) = until {
            let beyond = if s.before_inclusive {
                event.when > until
            } else {
                event.when >= until
            };
            if beyond {
                return Err(format!(
                    "the dataset holds {id} from after the backfill's end"
                ));
            }
        }
        match pg_ids.get(id) {
            None => return Err(format!("{id} is in the dataset but not in audit_logs")),
            Some(pg_row) if pg_row != row => {
                return Err(format!(
                    "{id} differs between the sinks: {pg_row:?} vs {row:?}"
                ))
            }
            _ => {}
        }
    }
    for id in pg_ids.keys() {
        let Some(event) = api.ever.get(id) else {
            return Err(format!("audit_logs holds {id}, which the API never had"));
        };
        if event.kind != Kind::Row {
            return Err(format!("audit_logs holds the poison event {id}"));
        }
        if !parquet.contains_key(id) && !api.expired.contains(id) {
            return Err(format!(
                "{id} is in audit_logs but not in the dataset, and still in the API"
            ));
        }
    }
    let dead = world.store.dead_letters.lock().unwrap();
    for letter in dead.iter() {
        let poison = api.ever.values().any(|e| {
            e.kind != Kind::Row
                && (letter.raw_event == e.body
                    || letter.raw_event
                        == mapping::escape_nul(std::str::from_utf8(&e.body).unwrap_or_default())
                            .as_bytes())
        });
        if !poison {
            return Err(format!(
                "a dead letter is not a poison event: {} ({})",
                String::from_utf8_lossy(&letter.raw_event),
                letter.reason
            ));
        }
    }
    let staged = world.files.staged.lock().unwrap();
    if !staged.is_empty() {
        return Err(format!(
            "staged files left: {:?}",
            staged.keys().collect::<Vec<_>>()
        ));
    }
    let dead_letter_twice = dead.iter().enumerate().any(|(i, d)| {
        dead[..i]
            .iter()
            .any(|e| e.account_id == d.account_id && e.raw_event == d.raw_event)
    });
    if dead_letter_twice {
        return Err("a dead letter is stored twice".into());
    }
    let files = world.store.files.lock().unwrap();
    if let Some(file) = files.iter().find(|f| !f.published) {
        return Err(format!(
            "committed file {} is not published",
            file.file.final_path
        ));
    }
    for file in files.iter() {
        if !published.contains_key(&file.file.final_path) {
            return Err(format!(
                "committed file {} is not in the dataset",
                file.file.final_path
            ));
        }
    }
    Ok(())
}

/// Runs one seed; the invariant's verdict and the trace.
fn run_seed(seed: u64) -> (Result<(), String>, Vec<String>) {
    let (verdict, trace, _) = run_seed_with_stats(seed);
    (verdict, trace)
}

type Stats = BTreeMap<&'static str, u64>;

fn run_seed_with_stats(seed: u64) -> (Result<(), String>, Vec<String>, Stats) {
    let scenario = Scenario::draw(seed);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a runtime");
    let system = actix_rt::System::with_tokio_rt(|| runtime);
    system.block_on(async move {
        let began = tokio::time::Instant::now();
        let clock = Clock::new(move || base() + (tokio::time::Instant::now() - began));
        let world = World::new(scenario, clock);
        let outcome = simulate(world.clone()).await;
        for alive in world.processes.lock().unwrap().iter() {
            alive.store(false, Ordering::SeqCst);
        }
        let verdict = check(&world, &outcome);
        let trace = std::mem::take(&mut *world.trace.lock().unwrap());
        let stats = std::mem::take(&mut *world.stats.lock().unwrap());
        (verdict, trace, stats)
    })
}

fn replay_command(seed: u64) -> String {
    format!("SIM_SEED={seed} cargo test -p cfaudit-actors --test simulation -- --nocapture")
}

#[test]
fn seeded_worlds_keep_every_event_exactly_once() {
    if let Some(seed) = std::env::var("SIM_SEED").ok().and_then(|s| s.parse().ok()) {
        tracing_subscriber::fmt()
            .with_test_writer()
            .without_time()
            .with_target(false)
            .init();
        println!("{:#?}", Scenario::draw(seed));
        let (verdict, _) = run_seed(seed);
        verdict.unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        return;
    }
    let seeds: u64 = std::env::var("SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000);
    let first: u64 = std::env::var("SIM_FIRST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(1, 4) as u64;
    let started = std::time::Instant::now();
    let mut stats = Stats::new();
    let failures: Vec<(u64, String)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                scope.spawn(move || {
                    let mut stats = Stats::new();
                    let mut failures = Vec::new();
                    for seed in (first + t..first + seeds).step_by(threads as usize) {
                        let (verdict, _, counted) = run_seed_with_stats(seed);
                        for (what, n) in counted {
                            *stats.entry(what).or_default() += n;
                        }
                        if let Err(error) = verdict {
                            failures.push((seed, error));
                        }
                    }
                    (failures, stats)
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| {
                let (failures, counted) = h.join().unwrap();
                for (what, n) in counted {
                    *stats.entry(what).or_default() += n;
                }
                failures
            })
            .collect()
    });
    println!(
        "simulation: {seeds} seeds in {:.1} s, {} failed",
        started.elapsed().as_secs_f64(),
        failures.len()
    );
    for (what, n) in &stats {
        println!("  {what}: {n}");
    }
    for (seed, error) in &failures {
        println!("seed {seed}: {error}\n  replay: {}", replay_command(*seed));
    }
    assert!(
        failures.is_empty(),
        "{} of {seeds} seeds broke the invariant",
        failures.len()
    );
    // The faults the worlds enable were hit, and every recovery path was taken.
    if seeds >= 500 {
        for what in [
            "api: 429",
            "api: 5xx",
            "api: repeated pages",
            "api: answers to another request",
            "api: missing pages",
            "api: events expired at the head",
            "api: late events",
            "process crashes",
            "streams taken over by a second process",
            "staging areas wiped",
            "rows refused (poison isolated)",
            "writes fenced",
            "commits fenced",
            "commits refused: event already in the dataset",
            "overlapping streams",
            "lost files collected again",
        ] {
            assert!(
                stats.get(what).copied().unwrap_or(0) > 0,
                "no seed hit: {what}"
            );
        }
    }
}

#[test]
fn a_seed_replays_identically() {
    for seed in [3, 17, 4242] {
        let (first, trace) = run_seed(seed);
        let (second, again) = run_seed(seed);
        assert_eq!(first, second);
        assert_eq!(trace, again, "seed {seed} ran differently twice");
    }
}
