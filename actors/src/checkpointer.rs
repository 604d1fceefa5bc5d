//! The Checkpointer: the only actor that makes anything durable or visible.
//!
//! It commits batches strictly in sequence order, each only once BOTH writers acked it: one
//! transaction holds the new checkpoint, the overlap ids, the dead letters and the staged
//! files with their final names; the files are published after it. Any failure — a nack, a
//! missing ack, a failed commit, a restarted actor — abandons everything after the last commit:
//! the epoch advances, stale messages are ignored and the Poller resumes from the checkpoint.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use futures::FutureExt;
use tracing::{error, info, warn};

use crate::backoff::Backoff;
use crate::failpoints::{self, crash_point};
use crate::mailbox::Mailbox;
use crate::messages::*;
use crate::metrics::{ActorMetrics, Metrics};
use crate::poller::Poller;
use crate::ports::{
    final_file_path, staged_prefix, CheckpointStore, CommitRecord, CommittedFile, CommittedState,
    FileSink, RowWriteReport, SinkError, StagedFile,
};

/// Checkpointer settings.
#[derive(Clone, Debug)]
pub struct CheckpointerConfig {
    pub account_id: String,
    /// The key of this stream's checkpoint, in the store and in file names: the account id
    /// for the live stream, a longer key for each backfill range (see `cfaudit backfill`).
    /// Staged files are named after it, and recovery deletes only its own.
    pub stream: String,
    pub safety_lag: Duration,
    /// A batch not acked by both writers within this time fails the epoch.
    pub ack_timeout: Duration,
    /// Back-off between recoveries after consecutive failures.
    pub backoff: Backoff,
}

#[derive(Default)]
struct Pending {
    expect: Option<ExpectBatch>,
    rows: Option<RowWriteReport>,
    files: Option<Vec<StagedFile>>,
}

impl Pending {
    fn complete(&self) -> bool {
        self.expect.is_some() && self.rows.is_some() && self.files.is_some()
    }
}

/// Connects the Poller after it is created (the actors form a cycle) and starts recovery.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Connect(pub Mailbox<Poller>);

#[derive(Message)]
#[rtype(result = "()")]
struct Recover;

pub struct Checkpointer {
    config: Arc<CheckpointerConfig>,
    store: Arc<dyn CheckpointStore>,
    files: Arc<dyn FileSink>,
    epoch: Epoch,
    poller: Option<Mailbox<Poller>>,
    metrics: Arc<Metrics>,
    actor: ActorMetrics,
    committed: CommittedState,
    pending: BTreeMap<u64, Pending>,
    next_seq: u64,
    recovering: bool,
    consecutive_failures: u32,
    /// The failure that started the current recovery, passed on to the Poller.
    failure: Option<String>,
}

impl Checkpointer {
    pub(crate) fn new(
        config: Arc<CheckpointerConfig>,
        store: Arc<dyn CheckpointStore>,
        files: Arc<dyn FileSink>,
        epoch: Epoch,
        metrics: Arc<Metrics>,
    ) -> Self {
        Checkpointer {
            actor: metrics.actor("checkpointer"),
            config,
            store,
            files,
            epoch,
            poller: None,
            metrics,
            committed: CommittedState::default(),
            pending: BTreeMap::new(),
            next_seq: 0,
            recovering: false,
            consecutive_failures: 0,
            failure: None,
        }
    }

    fn account(&self) -> &str {
        &self.config.account_id
    }

    /// Abandons everything after the last commit and recovers.
    fn fail_epoch(&mut self, reason: &str, ctx: &mut Context<Self>) {
        if self.recovering {
            return;
        }
        warn!(account = %self.account(), reason, "rewinding to the committed checkpoint");
        self.metrics
            .pipeline_rewinds
            .with_label_values(&[self.account()])
            .inc();
        self.consecutive_failures += 1;
        self.failure = Some(reason.to_owned());
        self.report_failure(reason);
        self.begin_recovery(ctx);
    }

    /// What `/readyz` shows until the next commit clears it.
    fn report_failure(&self, reason: &str) {
        let mut failures = self.metrics.health.sink_failures.lock().unwrap();
        failures.insert(self.config.account_id.clone(), reason.to_owned());
    }

    fn begin_recovery(&mut self, ctx: &mut Context<Self>) {
        self.recovering = true;
        self.epoch.advance();
        let staged: Vec<String> = std::mem::take(&mut self.pending)
            .into_values()
            .flat_map(|p| p.files.unwrap_or_default())
            .map(|f| f.staged_path)
            .collect();
        self.discard(staged, ctx);
        ctx.notify(Recover);
    }

    fn discard(&self, staged: Vec<String>, ctx: &mut Context<Self>) {
        if staged.is_empty() {
            return;
        }
        let files = self.files.clone();
        ctx.spawn(
            async move {
                if let Err(error) = files.discard(&staged).await {
                    warn!(%error, "could not delete abandoned staged files; start-up recovery will");
                }
            }
            .into_actor(self),
        );
    }

    fn try_commit(&mut self, ctx: &mut Context<Self>) {
        if self.recovering {
            return;
        }
        let Some(pending) = self.pending.get(&self.next_seq) else {
            return;
        };
        if !pending.complete() {
            return;
        }
        let pending = self.pending.remove(&self.next_seq).expect("present");
        let expect = pending.expect.expect("complete");
        let staged = pending.files.expect("complete");
        let record = self.commit_record(&expect, &staged);
        let epoch = expect.batch.epoch;
        let batch = expect.batch;
        let store = self.store.clone();
        let files = self.files.clone();
        let changed = record.state != self.committed || !record.dead_letters.is_empty();
        let commit = async move {
            let committed: Vec<CommittedFile> =
                record.files.iter().map(|(_, c)| c.clone()).collect();
            if !committed.is_empty() {
                crash_point(failpoints::STAGED_NOT_COMMITTED);
            }
            if changed {
                store.commit(&record).await?;
            }
            if !committed.is_empty() {
                crash_point(failpoints::COMMITTED_NOT_PUBLISHED);
                files.publish(&committed).await?;
                let finals: Vec<String> = committed.iter().map(|c| c.final_path.clone()).collect();
                store.mark_published(&finals).await?;
            }
            Ok::<_, SinkError>(record)
        };
        // `wait`: nothing else is handled until the commit is done, so commits and recoveries
        // never interleave.
        ctx.wait(
            guarded(commit)
                .into_actor(self)
                .map(move |result, act, ctx| {
                    if act.epoch.current() != epoch {
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
                        Some(Err(error)) => {
                            error!(account = %act.account(), %error, "commit failed");
                            act.fail_epoch(&format!("commit failed: {error}"), ctx);
                        }
                    }
                }),
        );
    }

    /// The state after `expect` commits, and its files with their final names.
    fn commit_record(&self, expect: &ExpectBatch, staged: &[StagedFile]) -> CommitRecord {
        let mut state = self.committed.clone();
        state.overlap_ids.extend(expect.seen.iter().cloned());
        if expect.advances_checkpoint {
            // Over the whole overlap set, not only this batch: with `desc` the ids of a
            // sweep's earlier batches are there too.
            let highest = state.overlap_ids.iter().map(|s| s.when).max();
            state.checkpoint = state.checkpoint.max(highest);
        }
        if let Some(checkpoint) = state.checkpoint {
            let horizon =
                checkpoint - chrono::Duration::from_std(self.config.safety_lag).unwrap_or_default();
            state.overlap_ids.retain(|s| s.when >= horizon);
        }
        let has_content = !expect.seen.is_empty() || !expect.dead_letters.is_empty();
        if has_content || state.checkpoint != self.committed.checkpoint {
            state.commit_seq += 1;
        }
        let files = staged
            .iter()
            .map(|f| {
                let final_path =
                    final_file_path(&f.partition, state.commit_seq, &self.config.stream);
                (
                    f.clone(),
                    CommittedFile {
                        staged_path: f.staged_path.clone(),
                        final_path,
                    },
                )
            })
            .collect();
        CommitRecord {
            account_id: self.config.stream.clone(),
            previous_commit_seq: self.committed.commit_seq,
            state,
            dead_letters: expect.dead_letters.clone(),
            files,
        }
    }

    fn after_commit(&mut self, batch: BatchId, record: CommitRecord) {
        let account = self.config.account_id.clone();
        self.metrics
            .batches_committed
            .with_label_values(&[&account])
            .inc();
        self.metrics
            .parquet_files_published
            .inc_by(record.files.len() as u64);
        if let Some(checkpoint) = record.state.checkpoint {
            self.metrics.set_checkpoint(&account, checkpoint);
        }
        self.committed = record.state;
        self.metrics
            .health
            .sink_failures
            .lock()
            .unwrap()
            .remove(&account);
        if let Some(poller) = &self.poller {
            poller.do_send(BatchCommitted {
                batch,
                checkpoint: self.committed.checkpoint,
            });
        }
    }
}

/// Runs a future, turning a panic into `None`: actix would drop the actor, not restart it.
async fn guarded<T>(fut: impl std::future::Future<Output = T>) -> Option<T> {
    std::panic::AssertUnwindSafe(fut).catch_unwind().await.ok()
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
        if self.poller.is_some() {
            self.fail_epoch("the Checkpointer restarted", ctx); // a supervised restart
        }
    }
}

impl Supervised for Checkpointer {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        self.actor.restarts.inc();
        warn!("Checkpointer restarted; reloading the committed state");
        self.recovering = false;
        self.pending.clear();
    }
}

impl Handler<Connect> for Checkpointer {
    type Result = ();

    fn handle(&mut self, msg: Connect, ctx: &mut Context<Self>) {
        self.poller = Some(msg.0);
        self.begin_recovery(ctx);
    }
}

impl Handler<Recover> for Checkpointer {
    type Result = ();

    /// Loads the committed state, publishes what was committed but not published, deletes
    /// staged files no commit refers to, then tells the Poller where to resume.
    fn handle(&mut self, _: Recover, ctx: &mut Context<Self>) {
        let store = self.store.clone();
        let files = self.files.clone();
        let account = self.config.stream.clone();
        let recover = async move {
            let state = store.load(&account).await?;
            let unpublished = store.unpublished(&account).await?;
            if !unpublished.is_empty() {
                info!(
                    account,
                    files = unpublished.len(),
                    "publishing files committed before a crash"
                );
                files.publish(&unpublished).await?;
                let finals: Vec<String> =
                    unpublished.iter().map(|c| c.final_path.clone()).collect();
                store.mark_published(&finals).await?;
            }
            let orphans: Vec<String> = files
                .list_staged(&staged_prefix(&account))
                .await?
                .into_iter()
                .filter(|path| !unpublished.iter().any(|c| &c.staged_path == path))
                .collect();
            if !orphans.is_empty() {
                info!(
                    account,
                    files = orphans.len(),
                    "deleting staged files of uncommitted batches"
                );
                files.discard(&orphans).await?;
            }
            Ok::<_, SinkError>(state)
        };
        ctx.wait(guarded(recover).into_actor(self).map(|result, act, ctx| match result {
            None => act.panicked(ctx),
            Some(Ok(state)) => {
                if let Some(checkpoint) = state.checkpoint {
                    act.metrics.set_checkpoint(act.account(), checkpoint);
                }
                act.committed = state.clone();
                act.pending.clear();
                act.next_seq = 0;
                act.recovering = false;
                let resume = Resume {
                    epoch: act.epoch.current(),
                    state,
                    delay: act.config.backoff.delay(act.consecutive_failures),
                    reason: act.failure.take(),
                };
                info!(account = %act.account(), epoch = resume.epoch, checkpoint = ?resume.state.checkpoint,
                    "resuming from the committed checkpoint");
                if let Some(poller) = &act.poller {
                    poller.do_send(resume);
                }
            }
            Some(Err(error)) => {
                act.consecutive_failures += 1;
                let delay = act.config.backoff.delay(act.consecutive_failures);
                error!(account = %act.account(), %error, retry_in = ?delay, "recovery failed");
                let reason = format!("recovery failed: {error}");
                act.report_failure(&reason);
                if let Some(poller) = &act.poller {
                    poller.do_send(RecoveryFailed { reason });
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
        if self.recovering || msg.batch.epoch != self.epoch.current() {
            return;
        }
        let batch = msg.batch;
        self.pending.entry(batch.seq).or_default().expect = Some(msg);
        ctx.run_later(self.config.ack_timeout, move |act, ctx| {
            let unacked = act.epoch.current() == batch.epoch
                && act.pending.get(&batch.seq).is_some_and(|p| !p.complete());
            if unacked {
                act.fail_epoch("a writer did not ack within the ack timeout", ctx);
            }
        });
        self.try_commit(ctx);
    }
}

impl Handler<WriterAck> for Checkpointer {
    type Result = ();

    fn handle(&mut self, msg: WriterAck, ctx: &mut Context<Self>) {
        let _timer = self.actor.handling();
        if self.recovering || msg.batch.epoch != self.epoch.current() {
            if let Ok(WriteOutcome::Staged(files)) = msg.result {
                self.discard(files.into_iter().map(|f| f.staged_path).collect(), ctx);
            }
            return;
        }
        match msg.result {
            Ok(WriteOutcome::Rows(report)) => {
                self.pending.entry(msg.batch.seq).or_default().rows = Some(report);
            }
            Ok(WriteOutcome::Staged(files)) => {
                self.pending.entry(msg.batch.seq).or_default().files = Some(files);
            }
            Err(error) => {
                let reason = format!("{} write failed: {error}", msg.sink.as_str());
                self.fail_epoch(&reason, ctx);
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
        self.fail_epoch(&format!("{} restarted", msg.actor), ctx);
    }
}

impl Handler<Flush> for Checkpointer {
    type Result = ();

    /// Handled only after a running commit (`ctx.wait`) is done.
    fn handle(&mut self, _: Flush, _ctx: &mut Context<Self>) {}
}
