//! cfaudit: Cloudflare audit logs, exactly once, in PostgreSQL/TimescaleDB and Parquet.
//!
//! The pipeline and its rules live in the `cfaudit-actors` crate; this crate holds what it is
//! given and the shell around it:
//! - [`sources`]: where events come from (the Cloudflare API client);
//! - [`sinks`]: where they land (PostgreSQL, the Parquet dataset and its row format);
//! - [`cli`]: the subcommands besides `run` (backfill, status, replay, check);
//! - [`app`] starts the service, [`settings`] its configuration, [`http`] its endpoints,
//!   [`streams`] what a stream is, [`telemetry`] its logs.

pub mod app;
pub mod cli;
pub mod http;
pub mod service;
pub mod settings;
pub mod sinks;
pub mod sources;
pub mod streams;
pub mod telemetry;
