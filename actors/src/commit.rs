//! Committing one batch: what its commit record says, and the commit itself (the store's
//! transaction, then the publishing of its files). The Checkpointer decides when, in order.

use std::time::Duration;

use crate::failpoints::{self, crash_point};
use crate::guard::deadline;
use crate::messages::ExpectBatch;
use crate::ports::{
    final_file_path, CheckpointStore, CommitRecord, CommittedFile, CommittedState, Direction,
    Fence, FileSink, SinkError, StagedFile,
};
use crate::sink::WriteOutcome;

/// A batch waiting for its commit: what it holds, and each sink's ack.
pub(crate) struct Pending {
    pub(crate) expect: Option<ExpectBatch>,
    /// By sink index.
    pub(crate) acks: Vec<Option<WriteOutcome>>,
}

impl Pending {
    pub(crate) fn new(sinks: usize) -> Self {
        Pending {
            expect: None,
            acks: vec![None; sinks],
        }
    }

    pub(crate) fn complete(&self) -> bool {
        self.expect.is_some() && self.acks.iter().all(Option::is_some)
    }

    /// The files the batch's writers staged.
    pub(crate) fn staged(&self) -> Vec<StagedFile> {
        self.acks
            .iter()
            .flatten()
            .flat_map(|ack| ack.staged().iter().cloned())
            .collect()
    }
}

/// The state after `expect` commits on top of `committed`, and its files with their final
/// names.
pub(crate) fn commit_record(
    committed: &CommittedState,
    fence: &Fence,
    expect: ExpectBatch,
    staged: &[StagedFile],
) -> CommitRecord {
    let mut state = committed.clone();
    // Oldest first, the checkpoint moves with every batch; newest first, only when the
    // sweep is complete (its oldest events come last).
    state.checkpoint = state.checkpoint.max(expect.progress.reached);
    state.unfinished = Some(expect.progress.position.clone());
    if let Some(end) = expect.completes {
        if let Some(done) = state.unfinished.take() {
            if done.direction == Direction::Desc {
                state.checkpoint = state.checkpoint.max(done.newest);
            }
        }
        state.swept_until = state.swept_until.max(Some(end));
    }
    let has_content =
        !expect.events.is_empty() || !expect.dead_letters.is_empty() || !staged.is_empty();
    if has_content || state != *committed {
        state.commit_seq += 1;
    }
    let files = staged
        .iter()
        .map(|f| {
            let final_path = final_file_path(
                &f.partition,
                state.commit_seq,
                &fence.stream,
                &f.staged_path,
            );
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
        fence: fence.clone(),
        previous_commit_seq: committed.commit_seq,
        state,
        ingestion_time: (!expect.events.is_empty()).then_some(expect.ingestion_time),
        events: expect.events,
        dead_letters: expect.dead_letters,
        files,
    }
}

/// Commits `record` (unless it changes nothing: `commit_record` then left the commit
/// sequence as it was), then publishes its files and marks them published. A crash point sits
/// between each step.
pub(crate) async fn commit_and_publish(
    store: &dyn CheckpointStore,
    files: &dyn FileSink,
    limit: Duration,
    record: CommitRecord,
) -> Result<CommitRecord, SinkError> {
    let committed: Vec<CommittedFile> = record.files.iter().map(|(_, c)| c.clone()).collect();
    if !committed.is_empty() {
        crash_point(failpoints::STAGED_NOT_COMMITTED);
    }
    if record.state.commit_seq != record.previous_commit_seq {
        deadline(limit, "the commit", store.commit(&record)).await?;
    }
    if !committed.is_empty() {
        crash_point(failpoints::COMMITTED_NOT_PUBLISHED);
        deadline(limit, "publishing", files.publish(&committed)).await?;
        crash_point(failpoints::PUBLISHED_NOT_MARKED);
        let finals: Vec<String> = committed.iter().map(|c| c.final_path.clone()).collect();
        deadline(limit, "marking published", store.mark_published(&finals)).await?;
    }
    Ok(record)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use chrono::{DateTime, TimeZone, Utc};

    use super::*;
    use crate::event::SeenId;
    use crate::messages::{BatchId, BatchPermit, SweepProgress};
    use crate::ports::{staged_name, RowWriteReport, UnfinishedSweep};

    fn at(minute: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 5, 1, 0, minute, 0).unwrap()
    }

    fn fence() -> Fence {
        Fence {
            stream: "acc".into(),
            lease: 3,
        }
    }

    /// A batch of events at the given minutes, `direction`, whose sweep reached `reached`.
    fn expect(
        minutes: &[u32],
        direction: Direction,
        reached: Option<DateTime<Utc>>,
        completes: Option<DateTime<Utc>>,
    ) -> ExpectBatch {
        let budget = Arc::new(tokio::sync::Semaphore::new(1));
        ExpectBatch {
            batch: BatchId { epoch: 1, seq: 0 },
            events: minutes
                .iter()
                .map(|&m| SeenId {
                    id: format!("ev-{m}"),
                    when: at(m),
                })
                .collect(),
            ingestion_time: at(59),
            dead_letters: vec![],
            progress: SweepProgress {
                reached,
                position: UnfinishedSweep {
                    direction,
                    since: at(0),
                    before: at(30),
                    anchor: at(0),
                    page: 1,
                    per_page: 100,
                    run: None,
                    previous_page: None,
                    newest: Some(at(29)),
                    bound_event: None,
                },
            },
            completes,
            permit: BatchPermit::new(budget.try_acquire_owned().unwrap()),
        }
    }

    #[test]
    fn oldest_first_the_checkpoint_moves_with_every_batch() {
        let committed = CommittedState::default();
        let record = commit_record(
            &committed,
            &fence(),
            expect(&[1, 2], Direction::Asc, Some(at(2)), None),
            &[],
        );
        assert_eq!(record.state.checkpoint, Some(at(2)));
        assert_eq!(record.state.commit_seq, 1);
        assert_eq!(record.previous_commit_seq, 0);
        assert_eq!(record.ingestion_time, Some(at(59)));
        assert!(record.state.unfinished.is_some(), "the sweep goes on");
        let done = commit_record(
            &record.state,
            &fence(),
            expect(&[], Direction::Asc, None, Some(at(30))),
            &[],
        );
        assert_eq!(done.state.checkpoint, Some(at(2)), "never backwards");
        assert_eq!(done.state.swept_until, Some(at(30)));
        assert_eq!(done.state.unfinished, None, "the sweep is complete");
    }

    #[test]
    fn newest_first_the_checkpoint_moves_only_when_the_sweep_completes() {
        let committed = CommittedState::default();
        let first = commit_record(
            &committed,
            &fence(),
            expect(&[29, 28], Direction::Desc, None, None),
            &[],
        );
        assert_eq!(first.state.checkpoint, None, "older events may still come");
        let last = commit_record(
            &first.state,
            &fence(),
            expect(&[1], Direction::Desc, None, Some(at(30))),
            &[],
        );
        assert_eq!(last.state.checkpoint, Some(at(29)), "the newest event read");
    }

    #[test]
    fn a_batch_that_changes_nothing_takes_no_commit_number() {
        let committed = commit_record(
            &CommittedState::default(),
            &fence(),
            expect(&[1], Direction::Asc, Some(at(1)), None),
            &[],
        )
        .state;
        let again = commit_record(
            &committed,
            &fence(),
            expect(&[], Direction::Asc, Some(at(1)), None),
            &[],
        );
        assert_eq!(again.state, committed);
        assert_eq!(again.ingestion_time, None);
    }

    #[test]
    fn staged_files_are_named_after_the_new_commit() {
        let staged = StagedFile {
            staged_path: staged_name("acc", 3, "u1"),
            partition: "year=2026/month=05/day=01/hour=00".into(),
            rows: 2,
            bytes: 10,
        };
        let record = commit_record(
            &CommittedState {
                commit_seq: 6,
                ..CommittedState::default()
            },
            &fence(),
            expect(&[1, 2], Direction::Asc, Some(at(2)), None),
            std::slice::from_ref(&staged),
        );
        assert_eq!(record.state.commit_seq, 7);
        let (file, committed) = &record.files[0];
        assert_eq!(file, &staged);
        assert_eq!(
            committed.final_path,
            "year=2026/month=05/day=01/hour=00/part-0000000007-acc-u1.parquet"
        );
        assert_eq!(committed.staged_path, staged.staged_path);
    }

    #[test]
    fn a_batch_is_complete_with_its_expectation_and_an_ack_from_every_sink() {
        let mut pending = Pending::new(3);
        pending.acks[0] = Some(WriteOutcome::Rows(RowWriteReport::default()));
        pending.acks[2] = Some(WriteOutcome::Nothing);
        pending.expect = Some(expect(&[1], Direction::Asc, Some(at(1)), None));
        assert!(!pending.complete(), "sink 1 has not acked");
        let staged = StagedFile {
            staged_path: staged_name("acc", 3, "u2"),
            partition: "year=2026/month=05/day=01/hour=00".into(),
            rows: 1,
            bytes: 5,
        };
        pending.acks[1] = Some(WriteOutcome::Staged(vec![staged.clone()]));
        assert!(pending.complete());
        assert_eq!(pending.staged(), vec![staged]);
    }
}
