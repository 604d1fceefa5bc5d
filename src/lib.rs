//! cfaudit: Cloudflare audit logs, exactly once, in PostgreSQL/TimescaleDB and Parquet.
//!
//! The pipeline and its rules live in the `cfaudit-actors` crate; this crate holds the
//! adapters it is given (Cloudflare client, PostgreSQL, Parquet on object storage), the
//! configuration, the HTTP endpoints and the CLI.

pub mod app;
pub mod backfill;
pub mod check;
pub mod cloudflare;
pub mod config;
pub mod dataset;
pub mod http;
pub mod lake;
pub mod postgres;
pub mod replay;
pub mod status;
pub mod streams;
pub mod telemetry;
