//! `cfaudit status`: what is committed, per account, read from the database and the object
//! store; never from a running process, so it works whether the service runs or not.

use serde::Serialize;

use cfaudit_actors::ApiVersion;

use crate::settings::Settings;
use crate::sinks::lake::ParquetLake;
use crate::sinks::postgres::{AccountStatus, Postgres, Replica, StreamOwner, TimescaleState};
use crate::streams::account_of;

#[derive(Debug, Serialize)]
pub struct Status {
    pub accounts: Vec<AccountStatus>,
    /// The service replicas running now.
    pub replicas: Vec<Replica>,
    /// Every stream: who collects it now (or collected it last).
    pub streams: Vec<StreamOwner>,
    /// Files in the staging area: uncommitted work, or leftovers a start-up will clean.
    pub staged_files: usize,
    /// TimescaleDB's chunks and policies; `None` on plain PostgreSQL.
    pub timescaledb: Option<TimescaleState>,
}

pub async fn status(config: &Settings) -> anyhow::Result<Status> {
    let postgres = Postgres::connect(&config.database.url, 2, None).await?;
    let accounts = postgres.account_statuses().await?;
    let replicas = postgres.live_replicas().await?;
    let streams = postgres.stream_owners().await?;
    let lake = ParquetLake::open(&config.lake)?;
    let staged_files = lake
        .staged_names("")
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .len();
    let timescaledb = postgres.timescale_state().await?;
    Ok(Status {
        accounts,
        replicas,
        streams,
        staged_files,
        timescaledb,
    })
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.accounts.is_empty() {
            writeln!(f, "no account has committed anything yet")?;
        }
        for a in &self.accounts {
            let checkpoint = a.checkpoint.map_or("none".to_owned(), |c| c.to_rfc3339());
            let lag = a
                .lag_seconds
                .map_or(String::new(), |s| format!(" (lag {s} s)"));
            writeln!(f, "account {}", a.account_id)?;
            writeln!(f, "  checkpoint      {checkpoint}{lag}")?;
            if let Some(start) = a.collecting_since {
                writeln!(f, "  collecting since {}", start.to_rfc3339())?;
            }
            let sweep = a
                .last_sweep
                .map_or("none yet".to_owned(), |t| t.to_rfc3339());
            writeln!(f, "  last sweep      {sweep}")?;
            // The lines above are v1's live stream (the only one before v2 was collected).
            for live in a
                .live_streams
                .iter()
                .filter(|s| s.api_version() != ApiVersion::V1)
            {
                let checkpoint = live
                    .checkpoint
                    .map_or("none".to_owned(), |c| c.to_rfc3339());
                writeln!(f, "  {} checkpoint   {checkpoint}", live.api_version())?;
            }
            for owner in self
                .streams
                .iter()
                .filter(|o| account_of(&o.stream) == a.account_id)
            {
                let who = owner.holder.as_deref().unwrap_or("nobody yet");
                let state = if owner.held {
                    format!("collected by {who}")
                } else {
                    format!("not collected now (last by {who})")
                };
                writeln!(f, "  stream          {} {state}", owner.stream)?;
            }
            writeln!(
                f,
                "  last commit     {} ({} commits)",
                a.last_commit.to_rfc3339(),
                a.commits
            )?;
            writeln!(
                f,
                "  postgres        {} rows, {} dead letters",
                a.postgres_rows, a.dead_letters
            )?;
            writeln!(
                f,
                "  parquet         {} rows in {} files",
                a.parquet_rows, a.parquet_files
            )?;
            writeln!(
                f,
                "  unpublished     {} files (published at the next start)",
                a.unpublished_files
            )?;
            for b in &a.backfills {
                let state = match (b.completed_at, b.checkpoint) {
                    (Some(_), _) => "complete".to_owned(),
                    (None, Some(c)) => format!("in progress, at {}", c.to_rfc3339()),
                    (None, None) => "not started".to_owned(),
                };
                writeln!(
                    f,
                    "  backfill        {} {} {state}",
                    b.api_version(),
                    b.range()
                )?;
            }
        }
        let names: Vec<&str> = self.replicas.iter().map(|r| r.name.as_str()).collect();
        match names.as_slice() {
            [] => writeln!(f, "replicas        none running")?,
            names => writeln!(
                f,
                "replicas        {} running: {}",
                names.len(),
                names.join(", ")
            )?,
        }
        match &self.timescaledb {
            Some(state) => writeln!(f, "database        {state}")?,
            None => writeln!(f, "database        plain PostgreSQL (no TimescaleDB)")?,
        }
        write!(f, "staging         {} files", self.staged_files)
    }
}
