//! Recovery: what a (re)starting pipeline does before it resumes, so that it starts from
//! exactly what is committed. The Checkpointer runs it at start-up and after every failure.

use std::sync::Arc;
use std::time::Duration;

use tracing::{error, info};

use crate::failpoints::{self, crash_point};
use crate::guard::deadline;
use crate::ports::{
    staged_lease, staged_prefix, CheckpointStore, CommittedState, Fence, FileSink, SinkError,
};

/// Loads the committed state of `fence`'s stream, publishes what was committed but not
/// published (a file lost for good is forgotten and its events collected again), and deletes
/// the staged files of this stream that no commit refers to, written under this lease or an
/// older one (a newer holder's files in flight are never touched). Every call gives up after
/// `limit`.
pub(crate) async fn recover(
    store: Arc<dyn CheckpointStore>,
    files: Arc<dyn FileSink>,
    fence: Fence,
    limit: Duration,
) -> Result<CommittedState, SinkError> {
    let stream = &fence.stream;
    let mut state = deadline(limit, "loading the checkpoint", store.load(stream)).await?;
    let unpublished = deadline(
        limit,
        "listing unpublished files",
        store.unpublished(stream),
    )
    .await?;
    let mut published = Vec::new();
    let mut forgotten = false;
    for file in &unpublished {
        match deadline(
            limit,
            "publishing",
            files.publish(std::slice::from_ref(file)),
        )
        .await
        {
            Ok(()) => published.push(file.final_path.clone()),
            Err(SinkError::Lost {
                final_path,
                message,
            }) => {
                let events = deadline(
                    limit,
                    "forgetting a lost file",
                    store.forget_lost_file(&fence, &final_path),
                )
                .await?;
                error!(stream, file = %final_path, events, %message,
                        "a committed Parquet file is gone (its staged and final copies are both missing); \
                         its events are collected again from the API");
                forgotten = true;
            }
            Err(error) => return Err(error),
        }
    }
    if !published.is_empty() {
        info!(
            stream,
            files = published.len(),
            "published files committed before a crash"
        );
        crash_point(failpoints::RECOVERED_NOT_MARKED);
        deadline(limit, "marking published", store.mark_published(&published)).await?;
    }
    if forgotten {
        state = deadline(limit, "loading the checkpoint", store.load(stream)).await?;
    }
    // Only files of this stream written under this lease or an older one: a newer
    // holder's files in flight are never touched.
    let orphans: Vec<String> = deadline(
        limit,
        "listing the staging area",
        files.list_staged(&staged_prefix(stream)),
    )
    .await?
    .into_iter()
    .filter(|name| staged_lease(stream, name).is_some_and(|lease| lease <= fence.lease))
    .filter(|name| !unpublished.iter().any(|c| &c.staged_path == name))
    .collect();
    if !orphans.is_empty() {
        info!(
            stream,
            files = orphans.len(),
            "deleting staged files of uncommitted batches"
        );
        deadline(limit, "deleting staged files", files.discard(&orphans)).await?;
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{MemoryFileSink, MemoryRowSink};
    use crate::ports::staged_name;

    /// Recovery under lease 5 deletes the staged files of lease 5 and older that no commit
    /// refers to, and leaves alone those of a newer holder (lease 6) and of other streams.
    #[tokio::test]
    async fn recovery_deletes_only_orphans_of_its_own_or_older_leases() {
        let (_, store) = MemoryRowSink::with_store();
        let files = MemoryFileSink::default();
        let names = [
            staged_name("acc", 4, "older"),
            staged_name("acc", 5, "mine"),
            staged_name("acc", 6, "newer"),
            staged_name("acc.backfill", 1, "other"),
        ];
        for name in &names {
            files
                .staged
                .lock()
                .unwrap()
                .insert(name.clone(), Vec::new());
        }
        let fence = Fence {
            stream: "acc".into(),
            lease: 5,
        };
        recover(
            Arc::new(store),
            Arc::new(files.clone()),
            fence,
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        let left: Vec<String> = files.staged.lock().unwrap().keys().cloned().collect();
        assert_eq!(left, [names[2].clone(), names[3].clone()]);
    }
}
