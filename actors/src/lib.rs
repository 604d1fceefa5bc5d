//! The cfaudit pipeline: `Poller → Mapper → a writer per sink (PostgreSQL, Parquet) →
//! Checkpointer`.
//!
//! This crate holds the ordering and failure rules and nothing else: it knows no HTTP, SQL or
//! object storage, only the traits in [`ports`]. Every rule is tested in memory with the
//! implementations in [`memory`].

pub mod backoff;
pub mod checkpointer;
pub mod clock;
pub mod epoch;
pub mod event;
pub mod failpoints;
pub mod mapper;
pub mod mapping;
pub mod memory;
pub mod messages;
pub mod metrics;
pub mod outbox;
pub mod pipeline;
pub mod poller;
pub mod ports;
pub mod sink;
pub mod writer;

pub use backoff::Backoff;
pub use checkpointer::CheckpointerConfig;
pub use clock::Clock;
pub use event::{AuditRow, DeadLetter, RawEvent, SeenId};
pub use messages::PipelineEvent;
pub use metrics::Metrics;
pub use pipeline::{Pipeline, PipelineParts};
pub use poller::PollerConfig;
pub use ports::*;
pub use sink::{ParquetTarget, PgTarget, SinkTarget, WriteOutcome};
