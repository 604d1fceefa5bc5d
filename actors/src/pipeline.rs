//! Wiring: one supervised actor of each kind per stream (a writer per sink), all on the
//! current arbiter.
//!
//! One arbiter on purpose: each actix arbiter is its own Tokio runtime, and database, HTTP and
//! object-store connections belong to the runtime that opened them. Sharing one connection
//! pool across arbiters breaks as soon as one of them stops. CPU-heavy work (Parquet encoding)
//! goes to Tokio's blocking pool instead, so the second core is still used.

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use tokio::sync::mpsc;

use crate::checkpointer::{Checkpointer, CheckpointerConfig, CheckpointerDeps, Connect, Upstream};
use crate::clock::{jitter_rng, Clock};
use crate::epoch::{Epoch, EpochView};
use crate::mapper::{Mapper, MapperDeps};
use crate::messages::{Drain, Flush, InflightBudget, PipelineEvent, SinkId};
use crate::metrics::{Metrics, SourceKey};
use crate::outbox::{Outbox, WeakOutbox};
use crate::poller::{Poller, PollerConfig, PollerDeps};
use crate::ports::{AuditSource, CheckpointStore, FileSink};
use crate::sink::SinkTarget;
use crate::writer::{Writer, WriterDeps};

/// Everything one stream's pipeline is given.
pub struct PipelineParts {
    pub poller: PollerConfig,
    pub checkpointer: CheckpointerConfig,
    pub source: Arc<dyn AuditSource>,
    /// Every sink a batch is written to, each by its own writer; a batch commits once all
    /// of them acked it.
    pub sinks: Vec<Arc<dyn SinkTarget>>,
    /// Where staged files are published after their commit (and recovered after a crash).
    pub files: Arc<dyn FileSink>,
    pub store: Arc<dyn CheckpointStore>,
    pub metrics: Arc<Metrics>,
    /// The wall clock (the simulation's own in its tests).
    pub clock: Clock,
    /// Seeds the back-off jitter; `None`: from the OS.
    pub rng_seed: Option<u64>,
    /// Batch slots shared by every pipeline of the process, beside the stream's own
    /// `max_inflight_batches`: one memory bound whatever the number of streams (`None`: the
    /// stream's alone).
    pub process_budget: Option<Arc<tokio::sync::Semaphore>>,
}

/// A running pipeline; [`Pipeline::shutdown`] stops it. Dropped, it halts, and its actors stop
/// once what they had scheduled has run.
pub struct Pipeline {
    poller: Addr<Poller>,
    mapper: Addr<Mapper>,
    writers: Vec<Addr<Writer>>,
    checkpointer: Addr<Checkpointer>,
    epoch: Epoch,
    pub events: mpsc::UnboundedReceiver<PipelineEvent>,
}

impl Pipeline {
    /// Starts the actors; must be called inside an actix system. The only place that names
    /// the concrete actors: each of them is given outboxes for the messages it sends.
    pub fn start(parts: PipelineParts) -> Pipeline {
        let PipelineParts {
            poller,
            checkpointer,
            source,
            sinks,
            files,
            store,
            metrics,
            clock,
            rng_seed,
            process_budget,
        } = parts;
        let account: Arc<str> = Arc::from(poller.account_id.as_str());
        metrics.expose_source(&SourceKey::new(&account, poller.api_version));
        // Credits (in-flight batches) never exceed the mailbox capacity, so hot-path sends
        // never wait on a full mailbox and batches stay in order.
        let capacity = poller.max_inflight_batches + 16;
        let budget = InflightBudget::new(poller.max_inflight_batches, process_budget);
        let epoch = Epoch::default();
        let (events_tx, events) = mpsc::unbounded_channel();
        let sink_timeout = checkpointer.sink_timeout;
        let fence = Arc::new(checkpointer.fence());

        let checkpointer_config = Arc::new(checkpointer);
        let checkpointer_addr = {
            let deps = CheckpointerDeps {
                store: store.clone(),
                files,
                epoch: EpochView::following(epoch.clone()),
                sinks: sinks.len(),
                events: events_tx.clone(),
                metrics: metrics.clone(),
                rng: jitter_rng(rng_seed, 0xc4ec),
            };
            Supervisor::start(move |ctx: &mut Context<_>| {
                ctx.set_mailbox_capacity(capacity);
                Checkpointer::new(checkpointer_config, deps)
            })
        };
        let checkpointer_metrics = metrics.actor("checkpointer");

        let writers: Vec<(Addr<Writer>, Outbox<_>)> = sinks
            .into_iter()
            .enumerate()
            .map(|(index, target)| {
                metrics.expose_sink(target.name());
                let deps = WriterDeps {
                    sink: SinkId {
                        index,
                        name: target.name(),
                    },
                    fence: fence.clone(),
                    timeout: sink_timeout,
                    acks: Outbox::to(&checkpointer_addr, &checkpointer_metrics),
                    restarted: Outbox::to(&checkpointer_addr, &checkpointer_metrics),
                    epoch: EpochView::following(epoch.clone()),
                    metrics: metrics.clone(),
                };
                let actor_metrics = metrics.actor(target.actor());
                let addr = Supervisor::start(move |ctx: &mut Context<_>| {
                    ctx.set_mailbox_capacity(capacity);
                    Writer::new(target, deps)
                });
                let outbox = Outbox::to(&addr, &actor_metrics);
                (addr, outbox)
            })
            .collect();
        let mapper_addr = {
            let deps = MapperDeps {
                account_id: account.clone(),
                api_version: poller.api_version,
                expect: Outbox::to(&checkpointer_addr, &checkpointer_metrics),
                failed: Outbox::to(&checkpointer_addr, &checkpointer_metrics),
                restarted: Outbox::to(&checkpointer_addr, &checkpointer_metrics),
                writers: writers.iter().map(|(_, outbox)| outbox.clone()).collect(),
                store,
                epoch: EpochView::joining(epoch.clone()),
                metrics: metrics.clone(),
                clock: clock.clone(),
                lookup_timeout: sink_timeout,
            };
            Supervisor::start(move |ctx: &mut Context<_>| {
                ctx.set_mailbox_capacity(capacity);
                Mapper::new(deps)
            })
        };
        let mapper_metrics = metrics.actor("mapper");
        let poller_addr = {
            let deps = PollerDeps {
                source,
                pages: Outbox::to(&mapper_addr, &mapper_metrics),
                reset_dedup: Outbox::to(&mapper_addr, &mapper_metrics),
                committed: Outbox::to(&mapper_addr, &mapper_metrics),
                restarted: Outbox::to(&checkpointer_addr, &checkpointer_metrics),
                metrics: metrics.clone(),
                events: events_tx,
                clock,
                rng: jitter_rng(rng_seed, 0x9011),
                epoch: EpochView::joining(epoch.clone()),
                budget,
            };
            let config = Arc::new(poller);
            Supervisor::start(move |ctx: &mut Context<_>| {
                ctx.set_mailbox_capacity(capacity);
                Poller::new(config, deps)
            })
        };
        let poller_metrics = metrics.actor("poller");
        checkpointer_addr.do_send(Connect(Upstream {
            resume: WeakOutbox::to(&poller_addr, &poller_metrics),
            committed: WeakOutbox::to(&poller_addr, &poller_metrics),
            recovery_failed: WeakOutbox::to(&poller_addr, &poller_metrics),
        }));
        Pipeline {
            poller: poller_addr,
            mapper: mapper_addr,
            writers: writers.into_iter().map(|(addr, _)| addr).collect(),
            checkpointer: checkpointer_addr,
            epoch,
            events,
        }
    }

    /// Stops the pipeline at once and for good: nothing in flight is committed (it is
    /// fetched again by whoever holds the stream next). For a lease lost to another process.
    pub fn halt(&self) {
        self.epoch.halt();
    }

    /// Stops fetching; [`PipelineEvent::Drained`] follows once in-flight batches are done.
    pub fn drain(&self) {
        self.poller.do_send(Drain);
    }

    /// Stops the pipeline: no new pages, and in-flight batches commit (within `timeout`); the
    /// actors stay, idle. `false` when the timeout cut it short: uncommitted work is abandoned,
    /// never half-done, and the next run fetches it again.
    pub async fn shutdown(mut self, timeout: Duration) -> bool {
        self.finish(timeout).await
        // Dropped here: it halts.
    }

    /// [`Pipeline::shutdown`] for a runner that keeps the pipeline (and halts it later).
    pub async fn finish(&mut self, timeout: Duration) -> bool {
        self.drain();
        let clean = tokio::time::timeout(timeout, async {
            while let Some(event) = self.events.recv().await {
                if event == PipelineEvent::Drained {
                    break;
                }
            }
            let _ = self.mapper.send(Flush).await;
            // The writers first: a write they finish now acks to the Checkpointer, which then
            // deletes its staged file before its own Flush is answered.
            let flushes = self.writers.iter().map(|writer| writer.send(Flush));
            futures::future::join_all(flushes).await;
            let _ = self.checkpointer.send(Flush).await;
        })
        .await
        .is_ok();
        clean
    }

    /// Waits for the next event of interest.
    pub async fn next_event(&mut self) -> Option<PipelineEvent> {
        self.events.recv().await
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        self.halt();
    }
}

#[cfg(test)]
mod tests {
    use chrono::{TimeZone, Utc};

    use super::*;
    use crate::backoff::Backoff;
    use crate::event::{ApiVersion, SeenId};
    use crate::memory::{MemoryCheckpointStore, MemoryFileSink, MemoryRowSink, MemorySource};
    use crate::messages::*;
    use crate::ports::{Direction, SinkError, UnfinishedSweep, UnreadableEvent};
    use crate::sink::{ParquetTarget, PgTarget, WriteOutcome};

    const STREAM: &str = "acc";

    async fn next_sweep(pipeline: &mut Pipeline) {
        tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(event) = pipeline.next_event().await {
                if matches!(event, PipelineEvent::SweepCompleted { .. }) {
                    return;
                }
            }
        })
        .await
        .expect("a sweep completes")
    }

    struct World {
        start: chrono::DateTime<Utc>,
        source: MemorySource,
        rows: MemoryRowSink,
        store: MemoryCheckpointStore,
        metrics: Arc<Metrics>,
    }

    /// A pipeline on 200 events, one per second from `start`, polled every 50 ms.
    fn start_pipeline() -> (Pipeline, World) {
        let start = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        let events = (0..200)
            .map(|i| (start + chrono::Duration::seconds(i), format!("ev-{i:04}")))
            .collect();
        let source = MemorySource::new(events);
        let (rows, store) = MemoryRowSink::with_store();
        let files = MemoryFileSink::default();
        let metrics = Metrics::new();
        let backoff = Backoff {
            initial: Duration::from_millis(5),
            max: Duration::from_millis(20),
        };
        let pipeline = Pipeline::start(PipelineParts {
            poller: PollerConfig {
                account_id: STREAM.into(),
                api_version: ApiVersion::V1,
                per_page: 50,
                direction: Direction::Asc,
                safety_lag: Duration::from_secs(30),
                poll_interval: Duration::from_millis(50),
                start: Some(start - chrono::Duration::days(1)),
                end: None,
                hide_user_logs: false,
                max_inflight_batches: 4,
                batch_max_events: 50,
                batch_max_bytes: usize::MAX,
                max_pages_per_sweep: 1_000,
                backoff,
                default_retry_after: Duration::from_millis(10),
                max_server_wait: Duration::from_secs(1),
                auth_recheck: Duration::from_millis(50),
                once: None,
            },
            checkpointer: CheckpointerConfig {
                account_id: STREAM.into(),
                api_version: ApiVersion::V1,
                stream: STREAM.into(),
                lease: 0,
                ack_timeout: Duration::from_millis(100),
                sink_timeout: Duration::from_secs(5),
                backoff,
            },
            source: Arc::new(source.clone()),
            sinks: vec![
                Arc::new(PgTarget(Arc::new(rows.clone()))),
                Arc::new(ParquetTarget(Arc::new(files.clone()))),
            ],
            files: Arc::new(files.clone()),
            store: Arc::new(store.clone()),
            metrics: metrics.clone(),
            clock: Clock::system(),
            rng_seed: Some(7),
            process_budget: None,
        });
        (
            pipeline,
            World {
                start,
                source,
                rows,
                store,
                metrics,
            },
        )
    }

    /// Sent to each actor after the pipeline has moved to a later epoch, a message of every
    /// kind that is stamped with an epoch has no effect: no rewind, no row, no dead letter, no
    /// commit, no checkpoint. (The two messages that start an epoch, `Resume` and
    /// `ResetDedup`, are what makes an actor join one.)
    #[actix_rt::test]
    async fn a_stale_message_of_each_kind_is_ignored() {
        let (mut pipeline, world) = start_pipeline();
        let World {
            start,
            source,
            rows,
            store,
            metrics,
        } = world;
        next_sweep(&mut pipeline).await;

        let rewinds = || {
            metrics
                .pipeline_rewinds
                .with_label_values(&[STREAM, "v1"])
                .get()
        };
        let dead_lettered = || {
            metrics
                .events_dead_lettered
                .with_label_values(&[STREAM, "v1"])
                .get()
        };
        let commits_before = store.commits.lock().unwrap().len();
        let (rewinds_before, dead_before) = (rewinds(), dead_lettered());
        let rows_before = rows.rows.lock().unwrap().len();
        let requests_before = source.requests.lock().unwrap().len();
        assert_eq!(rows_before, 200);

        // Of the epoch before the current one, at every sequence number the current epoch
        // has used or is about to use: without the staleness rule, one of them would be the
        // batch the Checkpointer waits for next.
        let old_epoch = pipeline.epoch.current() - 1;
        let stale_batches: Vec<BatchId> = (0..64)
            .map(|seq| BatchId {
                epoch: old_epoch,
                seq,
            })
            .collect();
        let stale = stale_batches[0];
        let budget = Arc::new(tokio::sync::Semaphore::new(1024));
        let permit = || BatchPermit::new(budget.clone().try_acquire_owned().unwrap());
        let row = crate::mapping::map_v1(
            r#"{"id":"stale-row","when":"2026-01-01T00:00:00Z"}"#,
            STREAM,
            start,
        )
        .unwrap();
        let progress = SweepProgress {
            reached: Some(start + chrono::Duration::days(365)),
            position: UnfinishedSweep {
                direction: Direction::Asc,
                since: start,
                before: start,
                anchor: start,
                page: 1,
                per_page: 50,
                run: None,
                previous_page: None,
                newest: None,
                bound_event: None,
            },
        };
        let far_future = Utc.with_ymd_and_hms(2100, 1, 1, 0, 0, 0).unwrap();

        pipeline.mapper.do_send(FetchedPage {
            batch: stale,
            events: vec![],
            unreadable: vec![UnreadableEvent {
                bytes: b"{".to_vec(),
                reason: "stale".into(),
            }],
            progress: progress.clone(),
            completes: None,
            permit: permit(),
        });
        for writer in &pipeline.writers {
            writer.do_send(WriteBatch {
                batch: stale,
                rows: Arc::new(vec![row.clone()]),
                permit: permit(),
            });
        }
        let stale_event = SeenId {
            id: "stale-row".into(),
            when: start,
        };
        for &batch in &stale_batches {
            pipeline.checkpointer.do_send(ExpectBatch {
                batch,
                events: vec![stale_event.clone()],
                ingestion_time: start,
                dead_letters: vec![],
                progress: SweepProgress {
                    reached: Some(far_future),
                    ..progress.clone()
                },
                completes: None,
                permit: permit(),
            });
            for (index, name) in [(0, "postgres"), (1, "parquet")] {
                pipeline.checkpointer.do_send(WriterAck {
                    batch,
                    sink: SinkId { index, name },
                    result: Ok(WriteOutcome::Nothing),
                });
            }
        }
        pipeline.checkpointer.do_send(WriterAck {
            batch: stale,
            sink: SinkId {
                index: 0,
                name: "postgres",
            },
            result: Err(SinkError::transient("stale")),
        });
        pipeline.checkpointer.do_send(BatchFailed {
            batch: stale,
            reason: "stale".into(),
        });
        pipeline.poller.do_send(BatchCommitted {
            batch: stale,
            checkpoint: Some(far_future),
        });
        // Past the ack timeout, and two more sweeps.
        tokio::time::sleep(Duration::from_millis(300)).await;
        next_sweep(&mut pipeline).await;
        next_sweep(&mut pipeline).await;

        assert_eq!(rewinds(), rewinds_before, "a stale message caused a rewind");
        assert_eq!(dead_lettered(), dead_before, "a stale page was mapped");
        let commits = store.commits.lock().unwrap().clone();
        assert!(
            commits.len() > commits_before,
            "the pipeline kept committing"
        );
        for commit in &commits {
            assert!(
                !commit.events.iter().any(|e| e.id == "stale-row"),
                "a stale batch was committed"
            );
            assert!(
                commit.state.checkpoint < Some(far_future),
                "a stale batch's progress was committed"
            );
        }
        let stored: Vec<String> = rows
            .rows
            .lock()
            .unwrap()
            .keys()
            .map(|(_, id)| id.clone())
            .collect();
        assert_eq!(stored.len(), rows_before, "a stale batch was written");
        assert!(!stored.iter().any(|id| id == "stale-row"));
        let requests = source.requests.lock().unwrap().clone();
        assert!(
            requests.len() > requests_before,
            "the pipeline kept polling"
        );
        let newest = start + chrono::Duration::seconds(199);
        assert!(
            requests.iter().all(|r| r.since <= newest),
            "a stale commit moved the checkpoint"
        );
        assert!(store.checkpoint(STREAM) < Some(far_future));
        assert!(pipeline.shutdown(Duration::from_secs(10)).await);
    }

    /// A dropped pipeline (a lost lease) leaves nothing running: every actor stops once what
    /// it had scheduled has run, here within the ack timeout.
    #[actix_rt::test]
    async fn a_dropped_pipeline_stops_all_its_actors() {
        let (mut pipeline, world) = start_pipeline();
        next_sweep(&mut pipeline).await;
        let poller = pipeline.poller.downgrade();
        let mapper = pipeline.mapper.downgrade();
        let writers: Vec<_> = pipeline.writers.iter().map(Addr::downgrade).collect();
        let checkpointer = pipeline.checkpointer.downgrade();
        drop(pipeline);
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(poller.upgrade().is_none(), "the poller still runs");
        assert!(mapper.upgrade().is_none(), "the mapper still runs");
        assert!(
            writers.iter().all(|w| w.upgrade().is_none()),
            "a writer still runs"
        );
        assert!(
            checkpointer.upgrade().is_none(),
            "the checkpointer still runs"
        );
        let requests = world.source.requests.lock().unwrap().len();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            world.source.requests.lock().unwrap().len(),
            requests,
            "nothing polls any more"
        );
    }
}
