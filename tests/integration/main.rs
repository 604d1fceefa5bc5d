//! Every integration test, in one binary: the real service (in-process or as its binary)
//! against real PostgreSQL (plain and TimescaleDB), a local folder or a real S3-compatible
//! server, the emulator, and independent Parquet readers. Shared fixtures are in `common`.
//! One module per concern; `cargo test --test integration <module>::` runs one of them
//! (`make chaos` runs `chaos::`).

#[macro_use]
mod common;

mod accounts;
mod aggregates;
mod api;
mod backfill;
mod chaos;
mod dashboards;
mod emulator;
mod end_to_end;
mod exactly_once;
mod observability;
mod outage;
mod process;
mod replicas;
mod storage;
mod timescaledb;
mod v2;
