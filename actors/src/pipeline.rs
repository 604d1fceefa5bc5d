//! Wiring: one supervised actor of each kind per account, all on the current arbiter.
//!
//! One arbiter on purpose: each actix arbiter is its own Tokio runtime, and database, HTTP and
//! object-store connections belong to the runtime that opened them. Sharing one connection
//! pool across arbiters breaks as soon as one of them stops. CPU-heavy work (Parquet encoding)
//! goes to Tokio's blocking pool instead, so the second core is still used.

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use tokio::sync::mpsc;

use crate::checkpointer::{Checkpointer, CheckpointerConfig, CheckpointerDeps, Connect};
use crate::clock::{jitter_rng, Clock};
use crate::mailbox::Mailbox;
use crate::mapper::{Mapper, MapperDeps};
use crate::messages::{Drain, Epoch, Flush, PipelineEvent};
use crate::metrics::Metrics;
use crate::poller::{Poller, PollerConfig, PollerDeps};
use crate::ports::{AuditSource, CheckpointStore, Fence, FileSink, RowSink};
use crate::writer::{ParquetTarget, ParquetWriter, PgTarget, PgWriter, SinkTarget, Writer};

/// Everything one account's pipeline is given.
pub struct PipelineParts {
    pub poller: PollerConfig,
    pub checkpointer: CheckpointerConfig,
    pub source: Arc<dyn AuditSource>,
    pub rows: Arc<dyn RowSink>,
    pub files: Arc<dyn FileSink>,
    pub store: Arc<dyn CheckpointStore>,
    pub metrics: Arc<Metrics>,
    /// The wall clock (the simulation's own in its tests).
    pub clock: Clock,
    /// Seeds the back-off jitter; `None`: from the OS.
    pub rng_seed: Option<u64>,
}

/// A running pipeline; [`Pipeline::shutdown`] stops it.
pub struct Pipeline {
    poller: Addr<Poller>,
    pg: Addr<PgWriter>,
    parquet: Addr<ParquetWriter>,
    checkpointer: Addr<Checkpointer>,
    epoch: Epoch,
    pub events: mpsc::UnboundedReceiver<PipelineEvent>,
}

impl Pipeline {
    /// Starts the actors; must be called inside an actix system.
    pub fn start(parts: PipelineParts) -> Pipeline {
        let PipelineParts {
            poller,
            checkpointer,
            source,
            rows,
            files,
            store,
            metrics,
            clock,
            rng_seed,
        } = parts;
        let account: Arc<str> = Arc::from(poller.account_id.as_str());
        metrics.expose_account(&account);
        // Credits (in-flight batches) never exceed the mailbox capacity, so hot-path sends
        // never wait on a full mailbox and batches stay in order.
        let capacity = poller.max_inflight_batches + 16;
        let budget = Arc::new(tokio::sync::Semaphore::new(poller.max_inflight_batches));
        let epoch = Epoch::default();
        let (events_tx, events) = mpsc::unbounded_channel();
        let sink_timeout = checkpointer.sink_timeout;
        let fence = Arc::new(checkpointer.fence());

        let checkpointer_config = Arc::new(checkpointer);
        let checkpointer_addr = {
            let deps = CheckpointerDeps {
                store: store.clone(),
                files: files.clone(),
                epoch: epoch.clone(),
                events: events_tx.clone(),
                metrics: metrics.clone(),
                rng: jitter_rng(rng_seed, 0xc4ec),
            };
            Supervisor::start(move |ctx: &mut Context<_>| {
                ctx.set_mailbox_capacity(capacity);
                Checkpointer::new(checkpointer_config, deps)
            })
        };
        let checkpointer = Mailbox::new(checkpointer_addr.clone(), metrics.actor("checkpointer"));

        let writers = WriterDeps {
            fence,
            timeout: sink_timeout,
            checkpointer: checkpointer.clone(),
            epoch: epoch.clone(),
            metrics: metrics.clone(),
            capacity,
        };
        let pg = writers.start(PgTarget(rows));
        let pg_addr = pg.addr().clone();
        let parquet = writers.start(ParquetTarget(files.clone()));
        let parquet_addr = parquet.addr().clone();
        let mapper = {
            let deps = MapperDeps {
                account_id: account.clone(),
                checkpointer: checkpointer.clone(),
                pg,
                parquet,
                store,
                epoch: epoch.clone(),
                metrics: metrics.clone(),
                clock: clock.clone(),
                lookup_timeout: sink_timeout,
            };
            let addr = Supervisor::start(move |ctx: &mut Context<_>| {
                ctx.set_mailbox_capacity(capacity);
                Mapper::new(deps)
            });
            Mailbox::new(addr, metrics.actor("mapper"))
        };
        let poller_addr = {
            let deps = PollerDeps {
                source,
                mapper,
                checkpointer: checkpointer.clone(),
                metrics: metrics.clone(),
                events: events_tx,
                clock,
                rng: jitter_rng(rng_seed, 0x9011),
                stop: epoch.clone(),
                budget,
            };
            let config = Arc::new(poller);
            Supervisor::start(move |ctx: &mut Context<_>| {
                ctx.set_mailbox_capacity(capacity);
                Poller::new(config, deps)
            })
        };
        checkpointer_addr.do_send(Connect(Mailbox::new(
            poller_addr.clone(),
            metrics.actor("poller"),
        )));
        Pipeline {
            poller: poller_addr,
            pg: pg_addr,
            parquet: parquet_addr,
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
        self.drain();
        let clean = tokio::time::timeout(timeout, async {
            while let Some(event) = self.events.recv().await {
                if event == PipelineEvent::Drained {
                    break;
                }
            }
            let _ = futures::join!(
                self.pg.send(Flush),
                self.parquet.send(Flush),
                self.checkpointer.send(Flush)
            );
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

/// What both writers are started with.
struct WriterDeps {
    /// The stream and lease the writes are made under.
    fence: Arc<Fence>,
    timeout: Duration,
    checkpointer: Mailbox<Checkpointer>,
    epoch: Epoch,
    metrics: Arc<Metrics>,
    capacity: usize,
}

impl WriterDeps {
    fn start<T: SinkTarget>(&self, target: T) -> Mailbox<Writer<T>> {
        let (fence, checkpointer, epoch, metrics) = (
            self.fence.clone(),
            self.checkpointer.clone(),
            self.epoch.clone(),
            self.metrics.clone(),
        );
        let (capacity, timeout) = (self.capacity, self.timeout);
        let addr = Supervisor::start(move |ctx: &mut Context<_>| {
            ctx.set_mailbox_capacity(capacity);
            Writer::new(target, fence, timeout, checkpointer, epoch, metrics)
        });
        Mailbox::new(addr, self.metrics.actor(T::ACTOR))
    }
}
