//! `cfaudit status`: what is committed, per account, read from the database and the object
//! store; never from a running process, so it works whether the service runs or not.

use cfaudit_actors::FileSink;
use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::config::Config;
use crate::lake::ParquetLake;
use crate::postgres::Postgres;

#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct AccountStatus {
    pub account_id: String,
    pub checkpoint: Option<DateTime<Utc>>,
    pub lag_seconds: Option<i64>,
    pub last_commit: DateTime<Utc>,
    pub commits: i64,
    pub postgres_rows: i64,
    pub dead_letters: i64,
    pub parquet_files: i64,
    pub parquet_rows: i64,
    /// Committed but not yet visible: published at the next start.
    pub unpublished_files: i64,
}

#[derive(Debug, Serialize)]
pub struct Status {
    pub accounts: Vec<AccountStatus>,
    /// Files in the staging area: uncommitted work, or leftovers a start-up will clean.
    pub staged_files: usize,
}

pub async fn status(config: &Config) -> anyhow::Result<Status> {
    let postgres = Postgres::connect(&config.database_url, 2).await?;
    let accounts: Vec<AccountStatus> = sqlx::query_as(
        "SELECT c.account_id, c.checkpoint, \
                extract(epoch FROM now() - c.checkpoint)::bigint AS lag_seconds, \
                c.updated_at AS last_commit, c.commit_seq AS commits, \
                (SELECT count(*) FROM audit_logs a WHERE a.account_id = c.account_id) AS postgres_rows, \
                (SELECT count(*) FROM cfaudit_dead_letters d WHERE d.account_id = c.account_id) AS dead_letters, \
                (SELECT count(*) FROM cfaudit_parquet_files f \
                  WHERE f.account_id = c.account_id AND f.published_at IS NOT NULL) AS parquet_files, \
                (SELECT coalesce(sum(rows), 0)::bigint FROM cfaudit_parquet_files f \
                  WHERE f.account_id = c.account_id AND f.published_at IS NOT NULL) AS parquet_rows, \
                (SELECT count(*) FROM cfaudit_parquet_files f \
                  WHERE f.account_id = c.account_id AND f.published_at IS NULL) AS unpublished_files \
         FROM cfaudit_checkpoints c ORDER BY c.account_id",
    )
    .fetch_all(postgres.pool())
    .await
    .map_err(|e| {
        anyhow::anyhow!("reading the committed state: {e}. Fix: run `cfaudit migrate`, or check DATABASE_URL")
    })?;
    let lake = ParquetLake::open(&config.parquet_url, &config.storage_options)?;
    let staged_files = lake
        .list_staged()
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .len();
    Ok(Status {
        accounts,
        staged_files,
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
        }
        write!(f, "staging         {} files", self.staged_files)
    }
}
