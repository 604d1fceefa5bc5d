//! The cfaudit pipeline: `Poller → Mapper → a writer per sink (PostgreSQL, Parquet) →
//! Checkpointer`.
//!
//! This crate holds the ordering and failure rules and nothing else: it knows no HTTP, SQL or
//! object storage, only the traits in [`ports`]. Every rule is tested in memory with the
//! implementations in `memory` (feature `testing`).

mod backoff;
mod checkpointer;
mod clock;
mod commit;
mod epoch;
mod event;
pub mod failpoints;
mod guard;
mod mapper;
pub mod mapping;
#[cfg(any(test, feature = "testing"))]
pub mod memory;
mod messages;
pub mod metrics;
mod outbox;
mod pipeline;
mod poller;
pub mod ports;
mod recovery;
mod sink;
mod writer;

pub use backoff::Backoff;
pub use checkpointer::CheckpointerConfig;
pub use clock::Clock;
pub use event::{ApiVersion, AuditRow, DeadLetter, EventDetail, RawEvent, SeenId};
pub use messages::PipelineEvent;
pub use metrics::{Metrics, SourceKey};
pub use pipeline::{Pipeline, PipelineParts};
pub use poller::PollerConfig;
pub use ports::*;
pub use sink::{ParquetTarget, PgTarget, SinkTarget, WriteOutcome};
