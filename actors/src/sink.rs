//! The sinks as the pipeline sees them: a [`SinkTarget`] per sink, written by its own writer
//! (see `writer.rs`), and what a write reports. The PostgreSQL and Parquet targets are here;
//! a new sink is one more target given to the pipeline.

use std::sync::Arc;

use async_trait::async_trait;

use crate::event::AuditRow;
use crate::ports::{Fence, FileSink, RejectedRow, RowSink, RowWriteReport, SinkError, StagedFile};

/// What a writer reports of a batch it wrote.
#[derive(Clone, Debug, PartialEq)]
pub enum WriteOutcome {
    /// Rows written (some may have been refused: they become dead letters).
    Rows(RowWriteReport),
    /// Files staged, published by the Checkpointer after the commit.
    Staged(Vec<StagedFile>),
    /// The batch held no rows: nothing was written.
    Nothing,
}

impl WriteOutcome {
    /// The staged files this outcome holds.
    pub fn staged(&self) -> &[StagedFile] {
        match self {
            WriteOutcome::Staged(files) => files,
            _ => &[],
        }
    }
}

/// A sink as its writer sees it: how a batch is written to it. A new sink is a new
/// `SinkTarget` given to the pipeline (`PipelineParts::sinks`); nothing else in the pipeline
/// changes.
#[async_trait]
pub trait SinkTarget: Send + Sync + 'static {
    /// The sink's name, in logs and in metrics' `sink` label.
    fn name(&self) -> &'static str;
    /// Its writer's name, in the actor metrics' `actor` label.
    fn actor(&self) -> &'static str;
    /// `fence` names the stream and the lease it is written under.
    async fn write(
        &self,
        fence: &Fence,
        rows: Arc<Vec<AuditRow>>,
    ) -> Result<WriteOutcome, SinkError>;
}

/// Writes rows to PostgreSQL.
pub struct PgTarget(pub Arc<dyn RowSink>);

/// Stages Parquet files; the Checkpointer publishes them after the commit.
pub struct ParquetTarget(pub Arc<dyn FileSink>);

#[async_trait]
impl SinkTarget for PgTarget {
    fn name(&self) -> &'static str {
        "postgres"
    }
    fn actor(&self) -> &'static str {
        "pg_writer"
    }
    async fn write(
        &self,
        fence: &Fence,
        rows: Arc<Vec<AuditRow>>,
    ) -> Result<WriteOutcome, SinkError> {
        match self.0.write_rows(Some(fence), &rows).await {
            Err(SinkError::Rejected(_)) => isolate_rejected(&*self.0, fence, &rows).await,
            other => other,
        }
        .map(WriteOutcome::Rows)
    }
}

/// The sink refused the batch for its data: splits it in halves, again and again, until the
/// rows it refuses are found one by one. Everything else is written; the refused rows are
/// reported (they become dead letters, see the Checkpointer).
pub async fn isolate_rejected(
    sink: &dyn RowSink,
    fence: &Fence,
    rows: &[AuditRow],
) -> Result<RowWriteReport, SinkError> {
    let mut report = RowWriteReport::default();
    let mid = rows.len() / 2;
    let mut parts = vec![(mid, rows.len()), (0, mid)];
    while let Some((start, end)) = parts.pop() {
        if start == end {
            continue;
        }
        match sink.write_rows(Some(fence), &rows[start..end]).await {
            Ok(written) => {
                report.inserted += written.inserted;
                report.duplicates += written.duplicates;
                report.rejected.extend(written.rejected);
            }
            Err(SinkError::Rejected(reason)) if end - start == 1 => {
                report.rejected.push(RejectedRow {
                    event_id: rows[start].event_id.clone(),
                    reason,
                });
            }
            Err(SinkError::Rejected(_)) => {
                let mid = (start + end) / 2;
                parts.push((mid, end));
                parts.push((start, mid));
            }
            Err(other) => return Err(other),
        }
    }
    Ok(report)
}

#[async_trait]
impl SinkTarget for ParquetTarget {
    fn name(&self) -> &'static str {
        "parquet"
    }
    fn actor(&self) -> &'static str {
        "parquet_writer"
    }
    async fn write(
        &self,
        fence: &Fence,
        rows: Arc<Vec<AuditRow>>,
    ) -> Result<WriteOutcome, SinkError> {
        self.0
            .stage(&fence.stream, fence.lease, rows)
            .await
            .map(WriteOutcome::Staged)
    }
}
