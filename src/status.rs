//! `cfaudit status`: what is committed, per account, read from the database and the object
//! store; never from a running process, so it works whether the service runs or not.

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::config::Config;
use crate::lake::ParquetLake;
use crate::postgres::{Postgres, TimescaleState};
use crate::streams::Stream;

#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct AccountStatus {
    pub account_id: String,
    /// The live stream's checkpoint (the backfills have their own, below).
    pub checkpoint: Option<DateTime<Utc>>,
    pub lag_seconds: Option<i64>,
    /// Where the live stream's collection starts.
    pub collecting_since: Option<DateTime<Utc>>,
    /// When the live stream's last sweep finished with everything committed.
    pub last_sweep: Option<DateTime<Utc>>,
    /// The last commit of any of the account's streams.
    pub last_commit: DateTime<Utc>,
    pub commits: i64,
    pub postgres_rows: i64,
    pub dead_letters: i64,
    /// Over all the account's streams.
    pub parquet_files: i64,
    pub parquet_rows: i64,
    /// Committed but not yet visible: published at the next start.
    pub unpublished_files: i64,
    #[sqlx(skip)]
    pub backfills: Vec<Stream>,
}

#[derive(Debug, Serialize)]
pub struct Status {
    pub accounts: Vec<AccountStatus>,
    /// Files in the staging area: uncommitted work, or leftovers a start-up will clean.
    pub staged_files: usize,
    /// TimescaleDB's chunks and policies; `None` on plain PostgreSQL.
    pub timescaledb: Option<TimescaleState>,
}

pub async fn status(config: &Config) -> anyhow::Result<Status> {
    let postgres = Postgres::connect(&config.database_url, 2, None).await?;
    let mut accounts: Vec<AccountStatus> = sqlx::query_as(
        "WITH s AS (SELECT split_part(account_id, '.', 1) AS account, * FROM cfaudit_checkpoints), \
              f AS (SELECT split_part(account_id, '.', 1) AS account, * FROM cfaudit_parquet_files) \
         SELECT s.account AS account_id, \
                max(s.checkpoint) FILTER (WHERE s.account_id = s.account) AS checkpoint, \
                extract(epoch FROM now() - max(s.checkpoint) FILTER (WHERE s.account_id = s.account))::bigint AS lag_seconds, \
                max(s.covers_since) FILTER (WHERE s.account_id = s.account) AS collecting_since, \
                max(s.last_sweep_at) FILTER (WHERE s.account_id = s.account) AS last_sweep, \
                max(s.updated_at) AS last_commit, sum(s.commit_seq)::bigint AS commits, \
                (SELECT count(*) FROM audit_logs a WHERE a.account_id = s.account) AS postgres_rows, \
                (SELECT count(*) FROM cfaudit_dead_letters d WHERE d.account_id = s.account) AS dead_letters, \
                (SELECT count(*) FROM f WHERE f.account = s.account AND f.published_at IS NOT NULL) AS parquet_files, \
                (SELECT coalesce(sum(rows), 0)::bigint FROM f \
                  WHERE f.account = s.account AND f.published_at IS NOT NULL) AS parquet_rows, \
                (SELECT count(*) FROM f WHERE f.account = s.account AND f.published_at IS NULL) AS unpublished_files \
         FROM s GROUP BY s.account ORDER BY s.account",
    )
    .fetch_all(postgres.pool())
    .await
    .map_err(|e| {
        anyhow::anyhow!("reading the committed state: {e}. Fix: run `cfaudit migrate`, or check DATABASE_URL")
    })?;
    for account in &mut accounts {
        account.backfills = postgres
            .streams(&account.account_id)
            .await?
            .into_iter()
            .filter(|s| !s.is_live())
            .collect();
    }
    let lake = ParquetLake::open(&config.parquet_url, &config.storage_options)?;
    let staged_files = lake
        .staged_names("")
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .len();
    let timescaledb = postgres.timescale_state().await?;
    Ok(Status {
        accounts,
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
                writeln!(f, "  backfill        {} {state}", b.range())?;
            }
        }
        match &self.timescaledb {
            Some(state) => writeln!(f, "database        {state}")?,
            None => writeln!(f, "database        plain PostgreSQL (no TimescaleDB)")?,
        }
        write!(f, "staging         {} files", self.staged_files)
    }
}
