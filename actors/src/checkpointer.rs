//! The Checkpointer: the only actor that makes anything durable or visible.
//!
//! It commits batches strictly in sequence order, each only once EVERY writer acked it: one
//! transaction holds the new state, the batch's events in the dataset's event index, its dead
//! letters and its staged files with their final names; the files are published after it. Any
//! failure — a nack, a missing ack, a failed commit, a restarted actor — abandons everything
//! after the last commit: the epoch advances, stale messages are ignored and the Poller resumes
//! from the checkpoint. A commit refused because the stream's lease moved on halts the
//! pipeline instead: another process owns the stream now.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use rand::rngs::StdRng;
use tracing::{error, info, warn};

use crate::backoff::Backoff;
use crate::commit::{commit_and_publish, commit_record, Pending};
use crate::epoch::EpochView;
use crate::event::ApiVersion;
use crate::guard::{catch_panic, deadline};
use crate::messages::*;
use crate::metrics::{ActorMetrics, Metrics, SourceKey, SourceMetrics};
use crate::outbox::WeakOutbox;
use crate::ports::{
    CheckpointStore, CommitRecord, CommittedState, Fence, FileSink, RowWriteReport, SinkError,
};
use crate::recovery;
use crate::sink::WriteOutcome;

/// Checkpointer settings.
#[derive(Clone, Debug)]
pub struct CheckpointerConfig {
    pub account_id: String,
    pub api_version: ApiVersion,
    /// The key of this stream's checkpoint, in the store and in file names: the account id
    /// for the live stream, a longer key for each backfill range (see `cfaudit backfill`).
    pub stream: String,
    /// The stream's lease held by this process: staged files carry it and every write and
    /// commit is fenced on it.
    pub lease: u64,
    /// A batch not acked by every writer within this time fails the epoch.
    pub ack_timeout: Duration,
    /// Every store and file-sink call gives up after this long.
    pub sink_timeout: Duration,
    /// Back-off between recoveries after consecutive failures.
    pub backoff: Backoff,
}

impl CheckpointerConfig {
    pub fn fence(&self) -> Fence {
        Fence {
            stream: self.stream.clone(),
            lease: self.lease,
        }
    }
}

/// Events refused by the row sink are remembered (and dead-lettered when they come back) up
/// to this many; past it the memory is cleared, which costs a rewind per refused event.
const MAX_QUARANTINE: usize = 10_000;

/// Where the Checkpointer tells the source side what to do: the pipeline's one back-edge.
/// Weak: the source side keeps the Checkpointer alive, not the other way round, so a dropped
/// pipeline's actors all stop.
pub struct Upstream {
    /// Start (again) from the committed state.
    pub resume: WeakOutbox<Resume>,
    /// A batch is committed.
    pub committed: WeakOutbox<BatchCommitted>,
    /// Recovery failed; it is retried.
    pub recovery_failed: WeakOutbox<RecoveryFailed>,
}

/// Connects the upstream after it is created (the actors form a cycle) and starts recovery.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Connect(pub Upstream);

#[derive(Message)]
#[rtype(result = "()")]
struct Recover;

/// Why the pipeline rewinds, for the Poller and `/readyz`.
struct Failure {
    reason: String,
    /// Counts as a failed attempt (not a rewind that only set refused events aside).
    failed: bool,
}

pub struct Checkpointer {
    config: Arc<CheckpointerConfig>,
    /// The log this stream reads, as metrics and health facts know it.
    source: SourceKey,
    counters: SourceMetrics,
    store: Arc<dyn CheckpointStore>,
    files: Arc<dyn FileSink>,
    /// Owned here: only the Checkpointer advances or halts it.
    epoch: EpochView,
    /// How many writers ack each batch.
    sinks: usize,
    upstream: Option<Upstream>,
    events: EventSender,
    metrics: Arc<Metrics>,
    actor: ActorMetrics,
    rng: StdRng,
    committed: CommittedState,
    pending: BTreeMap<u64, Pending>,
    next_seq: u64,
    recovering: bool,
    consecutive_failures: u32,
    failure: Option<Failure>,
    quarantine: BTreeMap<String, String>,
    /// Deletions of abandoned staged files under way, and the [`Flush`]es waiting for them.
    discarding: usize,
    flushes: Vec<tokio::sync::oneshot::Sender<()>>,
}

/// What a Checkpointer is started with besides its configuration.
pub(crate) struct CheckpointerDeps {
    pub store: Arc<dyn CheckpointStore>,
    pub files: Arc<dyn FileSink>,
    pub epoch: EpochView,
    pub sinks: usize,
    pub events: EventSender,
    pub metrics: Arc<Metrics>,
    pub rng: StdRng,
}

impl Checkpointer {
    pub(crate) fn new(config: Arc<CheckpointerConfig>, deps: CheckpointerDeps) -> Self {
        let source = SourceKey::new(&config.account_id, config.api_version);
        Checkpointer {
            actor: deps.metrics.actor("checkpointer"),
            counters: deps.metrics.source(&source),
            source,
            config,
            store: deps.store,
            files: deps.files,
            epoch: deps.epoch,
            sinks: deps.sinks,
            upstream: None,
            events: deps.events,
            metrics: deps.metrics,
            rng: deps.rng,
            committed: CommittedState::default(),
            pending: BTreeMap::new(),
            next_seq: 0,
            recovering: false,
            consecutive_failures: 0,
            failure: None,
            quarantine: BTreeMap::new(),
            discarding: 0,
            flushes: Vec::new(),
        }
    }

    fn account(&self) -> &str {
        &self.config.account_id
    }

    fn pending_mut(&mut self, seq: u64) -> &mut Pending {
        let sinks = self.sinks;
        self.pending
            .entry(seq)
            .or_insert_with(|| Pending::new(sinks))
    }

    /// Abandons everything after the last commit and recovers. `failed`: whether this counts
    /// as a failure (back-off, `--once` attempts).
    fn fail_epoch(&mut self, reason: &str, failed: bool, ctx: &mut Context<Self>) {
        if self.recovering || self.epoch.halted() {
            return;
        }
        warn!(account = %self.account(), stream = %self.config.stream, reason, "rewinding to the committed checkpoint");
        self.counters.pipeline_rewinds.inc();
        if failed {
            self.consecutive_failures += 1;
            self.report_failure(reason);
        }
        self.failure = Some(Failure {
            reason: reason.to_owned(),
            failed,
        });
        self.begin_recovery(ctx);
    }

    /// Another process holds the stream: stop everything, for good.
    fn halt(&mut self, reason: &str, ctx: &mut Context<Self>) {
        if self.epoch.halted() {
            return;
        }
        error!(account = %self.account(), stream = %self.config.stream, reason,
            "the stream's lease has moved to another process: this pipeline stops");
        self.epoch.shared().halt();
        self.discard_pending(ctx);
        self.report_failure(reason);
        let _ = self.events.send(PipelineEvent::Fenced {
            reason: reason.to_owned(),
        });
    }

    /// What `/readyz` shows until the next commit clears it.
    fn report_failure(&self, reason: &str) {
        let mut failures = self.metrics.health.sink_failures.lock().unwrap();
        failures.insert(self.source.clone(), reason.to_owned());
    }

    fn begin_recovery(&mut self, ctx: &mut Context<Self>) {
        if self.epoch.halted() {
            return;
        }
        self.recovering = true;
        self.epoch.shared().advance();
        self.discard_pending(ctx);
        ctx.notify(Recover);
    }

    /// Forgets the pending batches and deletes their staged files.
    fn discard_pending(&mut self, ctx: &mut Context<Self>) {
        let staged: Vec<String> = std::mem::take(&mut self.pending)
            .into_values()
            .flat_map(|p| p.staged())
            .map(|f| f.staged_path)
            .collect();
        self.discard(staged, ctx);
    }

    fn discard(&mut self, staged: Vec<String>, ctx: &mut Context<Self>) {
        if staged.is_empty() {
            return;
        }
        let files = self.files.clone();
        let limit = self.config.sink_timeout;
        self.discarding += 1;
        ctx.spawn(
            async move {
                if let Err(error) = deadline(limit, "discard", files.discard(&staged)).await {
                    warn!(%error, "could not delete abandoned staged files; a recovery will");
                }
            }
            .into_actor(self)
            .map(|(), act, _| {
                act.discarding -= 1;
                act.answer_flushes();
            }),
        );
    }

    /// Answers the Flushes waiting for deletions once none is under way.
    fn answer_flushes(&mut self) {
        if self.discarding == 0 {
            for flush in self.flushes.drain(..) {
                let _ = flush.send(());
            }
        }
    }

    fn try_commit(&mut self, ctx: &mut Context<Self>) {
        if self.recovering || self.epoch.halted() {
            return;
        }
        let Some(pending) = self.pending.get(&self.next_seq) else {
            return;
        };
        if !pending.complete() {
            return;
        }
        let pending = self.pending.remove(&self.next_seq).expect("present");
        let staged = pending.staged();
        let expect = pending.expect.expect("complete");
        let batch = expect.batch;
        let permit = expect.permit.clone();
        let record = commit_record(&self.committed, &self.config.fence(), expect, &staged);
        let store = self.store.clone();
        let files = self.files.clone();
        let limit = self.config.sink_timeout;
        let commit = async move {
            let _permit = permit;
            commit_and_publish(&*store, &*files, limit, record).await
        };
        // `wait`: nothing else is handled until the commit is done, so commits and recoveries
        // never interleave.
        ctx.wait(
            catch_panic(commit)
                .into_actor(self)
                .map(move |result, act, ctx| {
                    if act.epoch.is_stale(&batch) {
                        return; // recovery reloads from the store whatever this commit did
                    }
                    match result {
                        None => act.panicked(ctx),
                        Some(Ok(record)) => {
                            act.consecutive_failures = 0;
                            act.after_commit(batch, record);
                            act.next_seq += 1;
                            act.try_commit(ctx);
                        }
                        Some(Err(SinkError::Fenced(reason))) => act.halt(&reason, ctx),
                        Some(Err(error)) => {
                            error!(account = %act.account(), %error, "commit failed");
                            act.fail_epoch(&format!("commit failed: {error}"), true, ctx);
                        }
                    }
                }),
        );
    }

    fn after_commit(&mut self, batch: BatchId, record: CommitRecord) {
        self.counters.batches_committed.inc();
        if !record.events.is_empty() {
            let _ = self.events.send(PipelineEvent::EventsCommitted);
        }
        self.metrics
            .parquet_files_published
            .inc_by(record.files.len() as u64);
        if let Some(checkpoint) = record.state.checkpoint {
            self.metrics.set_checkpoint(&self.source, checkpoint);
        }
        self.committed = record.state;
        self.metrics
            .health
            .sink_failures
            .lock()
            .unwrap()
            .remove(&self.source);
        if let Some(upstream) = &self.upstream {
            upstream.committed.do_send(BatchCommitted {
                batch,
                checkpoint: self.committed.checkpoint,
            });
        }
    }

    /// The row sink refused some events: remember them (the Mapper turns them into dead
    /// letters when they come back) and rewind, without counting it as a failure.
    fn set_aside(&mut self, report: &RowWriteReport, ctx: &mut Context<Self>) {
        if self.quarantine.len() + report.rejected.len() > MAX_QUARANTINE {
            warn!(
                account = %self.account(),
                "more than {MAX_QUARANTINE} refused events remembered; forgetting them"
            );
            self.quarantine.clear();
        }
        for rejected in &report.rejected {
            warn!(account = %self.account(), event = %rejected.event_id, reason = %rejected.reason,
                "PostgreSQL refused the event; it becomes a dead letter");
            self.quarantine.insert(
                rejected.event_id.clone(),
                format!("PostgreSQL refused the event: {}", rejected.reason),
            );
        }
        let reason = format!(
            "{} events PostgreSQL cannot store are set aside as dead letters",
            report.rejected.len()
        );
        self.fail_epoch(&reason, false, ctx);
    }
}

impl Checkpointer {
    fn panicked(&mut self, ctx: &mut Context<Self>) {
        error!(account = %self.account(), "the Checkpointer panicked; restarting it");
        ctx.stop();
    }
}

impl Actor for Checkpointer {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        if self.upstream.is_some() {
            // A supervised restart.
            self.fail_epoch("the Checkpointer restarted", true, ctx);
        }
    }
}

impl Supervised for Checkpointer {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        self.actor.restarts.inc();
        warn!("Checkpointer restarted; reloading the committed state");
        self.recovering = false;
        self.pending.clear();
        // The restart dropped the deletions under way: a Flush must not wait for them (the
        // next start's recovery deletes what they left).
        self.discarding = 0;
        self.answer_flushes();
    }
}

impl Handler<Connect> for Checkpointer {
    type Result = ();

    fn handle(&mut self, msg: Connect, ctx: &mut Context<Self>) {
        self.upstream = Some(msg.0);
        self.begin_recovery(ctx);
    }
}

impl Handler<Recover> for Checkpointer {
    type Result = ();

    /// Loads the committed state, publishes what was committed but not published (a file
    /// lost for good is forgotten and its events collected again), deletes staged files no
    /// commit refers to, then tells the Poller where to resume.
    fn handle(&mut self, _: Recover, ctx: &mut Context<Self>) {
        if self.epoch.halted() {
            return;
        }
        let store = self.store.clone();
        let files = self.files.clone();
        let fence = self.config.fence();
        let limit = self.config.sink_timeout;
        let recover = recovery::recover(store, files, fence, limit);
        ctx.wait(catch_panic(recover).into_actor(self).map(|result, act, ctx| match result {
            None => act.panicked(ctx),
            Some(Ok(state)) => {
                if let Some(checkpoint) = state.checkpoint {
                    act.metrics.set_checkpoint(&act.source, checkpoint);
                }
                act.committed = state.clone();
                act.pending.clear();
                act.next_seq = 0;
                act.recovering = false;
                let failure = act.failure.take();
                let resume = Resume {
                    epoch: act.epoch.current(),
                    state,
                    delay: act.config.backoff.delay(act.consecutive_failures, &mut act.rng),
                    failed: failure.as_ref().is_some_and(|f| f.failed),
                    reason: failure.map(|f| f.reason),
                    quarantine: Arc::new(act.quarantine.clone()),
                };
                info!(account = %act.account(), epoch = resume.epoch, checkpoint = ?resume.state.checkpoint,
                    "resuming from the committed checkpoint");
                if let Some(upstream) = &act.upstream {
                    upstream.resume.do_send(resume);
                }
            }
            Some(Err(SinkError::Fenced(reason))) => act.halt(&reason, ctx),
            Some(Err(error)) => {
                act.consecutive_failures += 1;
                let delay = act.config.backoff.delay(act.consecutive_failures, &mut act.rng);
                error!(account = %act.account(), %error, retry_in = ?delay, "recovery failed");
                let reason = format!("recovery failed: {error}");
                act.report_failure(&reason);
                if let Some(upstream) = &act.upstream {
                    upstream.recovery_failed.do_send(RecoveryFailed { reason });
                }
                ctx.run_later(delay, |_, ctx| ctx.notify(Recover));
            }
        }));
    }
}

impl Handler<ExpectBatch> for Checkpointer {
    type Result = ();

    fn handle(&mut self, msg: ExpectBatch, ctx: &mut Context<Self>) {
        let _timer = self.actor.handling();
        if self.recovering || self.epoch.is_stale(&msg) {
            return;
        }
        let batch = msg.batch;
        self.pending_mut(batch.seq).expect = Some(msg);
        ctx.run_later(self.config.ack_timeout, move |act, ctx| {
            let unacked = !act.epoch.is_stale(&batch)
                && act.pending.get(&batch.seq).is_some_and(|p| !p.complete());
            if unacked {
                act.fail_epoch("a writer did not ack within the ack timeout", true, ctx);
            }
        });
        self.try_commit(ctx);
    }
}

impl Handler<BatchFailed> for Checkpointer {
    type Result = ();

    fn handle(&mut self, msg: BatchFailed, ctx: &mut Context<Self>) {
        let _timer = self.actor.handling();
        if self.recovering || self.epoch.is_stale(&msg) {
            return;
        }
        self.fail_epoch(&msg.reason, true, ctx);
    }
}

impl Handler<WriterAck> for Checkpointer {
    type Result = ();

    fn handle(&mut self, msg: WriterAck, ctx: &mut Context<Self>) {
        let _timer = self.actor.handling();
        if self.recovering || self.epoch.is_stale(&msg) {
            if let Ok(outcome) = msg.result {
                let staged = outcome.staged().iter().map(|f| f.staged_path.clone());
                self.discard(staged.collect(), ctx);
            }
            return;
        }
        match msg.result {
            Ok(WriteOutcome::Rows(report)) if !report.rejected.is_empty() => {
                self.set_aside(&report, ctx);
                return;
            }
            Ok(outcome) => {
                self.pending_mut(msg.batch.seq).acks[msg.sink.index] = Some(outcome);
            }
            Err(SinkError::Fenced(reason)) => {
                self.halt(&reason, ctx);
                return;
            }
            Err(error) => {
                let reason = format!("{} write failed: {error}", msg.sink.name);
                self.fail_epoch(&reason, true, ctx);
                return;
            }
        }
        self.try_commit(ctx);
    }
}

impl Handler<ActorRestarted> for Checkpointer {
    type Result = ();

    fn handle(&mut self, msg: ActorRestarted, ctx: &mut Context<Self>) {
        let _timer = self.actor.handling();
        self.fail_epoch(&format!("{} restarted", msg.actor), true, ctx);
    }
}

impl Handler<Flush> for Checkpointer {
    type Result = ResponseFuture<()>;

    /// Handled only after a running commit (`ctx.wait`) is done; answered once abandoned
    /// staged files are deleted too. A `--once` run that ended right after a rewind left
    /// the file of a batch its writer finished late (the simulation found it): the next start
    /// would have deleted it, but a last run has no next start.
    fn handle(&mut self, _: Flush, _ctx: &mut Context<Self>) -> Self::Result {
        if self.discarding == 0 {
            return Box::pin(async {});
        }
        let (done, wait) = tokio::sync::oneshot::channel();
        self.flushes.push(done);
        Box::pin(async move {
            let _ = wait.await;
        })
    }
}
