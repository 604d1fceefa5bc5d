//! PostgreSQL: the row sink (`audit_logs`) and the checkpoint store, one pool.

use std::time::Duration;

use async_trait::async_trait;
use cfaudit_actors::{
    AuditRow, CheckpointStore, CommitRecord, CommittedFile, CommittedState, RowSink,
    RowWriteReport, SeenId, SinkError,
};
use chrono::{DateTime, DurationRound, Utc};
use ipnetwork::IpNetwork;
use sqlx::migrate::MigrateDatabase;
use sqlx::postgres::PgPoolOptions;
use sqlx::types::Json;
use sqlx::PgPool;
use tracing::{info, warn};

use crate::config::Secret;

/// Embedded at compile time: the binary carries its schema.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[derive(Clone)]
pub struct Postgres {
    pool: PgPool,
}

/// The URL without its password, for messages.
pub fn redacted_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) => {
            if parsed.password().is_some() {
                let _ = parsed.set_password(Some("***"));
            }
            parsed.to_string()
        }
        Err(_) => "(unparseable DATABASE_URL)".into(),
    }
}

fn sink_error(what: &str, error: sqlx::Error) -> SinkError {
    SinkError::new(format!("postgres {what}: {error}"))
}

impl Postgres {
    pub async fn connect(url: &Secret, max_connections: u32) -> anyhow::Result<Postgres> {
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(10))
            .connect(url.expose())
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot connect to DATABASE_URL {}: {e}",
                    redacted_url(url.expose())
                )
            })?;
        Ok(Postgres { pool })
    }

    /// Creates the database named in the URL if it does not exist (demo and tests).
    pub async fn create_database_if_missing(url: &Secret) -> anyhow::Result<()> {
        let exists = sqlx::Postgres::database_exists(url.expose())
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot reach DATABASE_URL {}: {e}",
                    redacted_url(url.expose())
                )
            })?;
        if !exists {
            sqlx::Postgres::create_database(url.expose()).await?;
        }
        Ok(())
    }

    pub async fn migrate(&self) -> anyhow::Result<()> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    /// Whether the TimescaleDB extension is installed in this database.
    pub async fn has_timescaledb(&self) -> anyhow::Result<bool> {
        let (present,): (bool,) = sqlx::query_as(
            "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(present)
    }

    /// Applies the compression and retention policies of the configuration (TimescaleDB
    /// only; `0` removes a policy). Replaced on every start, so a changed setting takes effect
    /// without a migration. Returns `false` on plain PostgreSQL, where nothing is done.
    pub async fn apply_timescale_policies(
        &self,
        compress_after_days: u32,
        retention_days: u32,
    ) -> anyhow::Result<bool> {
        if !self.has_timescaledb().await? {
            return Ok(false);
        }
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT remove_compression_policy('audit_logs', if_exists => TRUE)")
            .execute(&mut *tx)
            .await?;
        if compress_after_days > 0 {
            sqlx::query("SELECT add_compression_policy('audit_logs', compress_after => make_interval(days => $1))")
                .bind(compress_after_days as i32)
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query("SELECT remove_retention_policy('audit_logs', if_exists => TRUE)")
            .execute(&mut *tx)
            .await?;
        if retention_days > 0 {
            sqlx::query("SELECT add_retention_policy('audit_logs', drop_after => make_interval(days => $1))")
                .bind(retention_days as i32)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    /// TimescaleDB only: materializes the hourly aggregates over `[since, until)`, widened to
    /// whole hours. Their refresh policy only looks at the last 3 days, so rows written
    /// further back (a backfill, a replay) need this. Plain PostgreSQL's views are always
    /// current. A failure loses nothing (the rows are committed): it is logged with the
    /// command that fixes it.
    pub async fn refresh_aggregates(&self, since: DateTime<Utc>, until: DateTime<Utc>) {
        match self.try_refresh_aggregates(since, until).await {
            Ok(true) => info!(%since, %until, "continuous aggregates refreshed over the range"),
            Ok(false) => {}
            Err(error) => warn!(%error, %since, %until,
                "the dashboards' aggregates were not refreshed; run CALL refresh_continuous_aggregate('audit_events_hourly', since, until) and the same for audit_actors_hourly"),
        }
    }

    /// `false` on plain PostgreSQL.
    async fn try_refresh_aggregates(
        &self,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> anyhow::Result<bool> {
        if !self.has_timescaledb().await? {
            return Ok(false);
        }
        let hour = chrono::Duration::hours(1);
        let since = since.duration_trunc(hour)?;
        let until = until.duration_trunc(hour)? + hour;
        for view in ["audit_events_hourly", "audit_actors_hourly"] {
            // CALL refuses to run in a transaction block: simple protocol, and the bounds are
            // our own timestamps, not input.
            let call = format!(
                "CALL refresh_continuous_aggregate('{view}', '{}'::timestamptz, '{}'::timestamptz)",
                since.to_rfc3339(),
                until.to_rfc3339()
            );
            sqlx::raw_sql(sqlx::AssertSqlSafe(call))
                .execute(&self.pool)
                .await?;
        }
        Ok(true)
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// A one-connection pool that connects on first use, for another thread's runtime.
    pub fn lazy_pool(url: &Secret) -> anyhow::Result<PgPool> {
        Ok(PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(3))
            .connect_lazy(url.expose())?)
    }
}

#[async_trait]
impl RowSink for Postgres {
    /// One statement per batch: UNNEST keeps the bind count at 13 whatever the batch size.
    /// A row already present (left by an attempt that never committed, or replayed) takes
    /// the new `ingestion_time`: the one the Parquet file of the committing batch carries,
    /// so both sinks agree column for column. `xmax = 0` tells inserted rows from updated.
    async fn write_rows(&self, rows: &[AuditRow]) -> Result<RowWriteReport, SinkError> {
        let texts = |f: fn(&AuditRow) -> Option<&str>| rows.iter().map(f).collect::<Vec<_>>();
        let ips: Vec<Option<IpNetwork>> = rows
            .iter()
            .map(|r| r.ip_address.map(IpNetwork::from))
            .collect();
        let (inserted,): (i64,) = sqlx::query_as(
            "WITH written AS (INSERT INTO audit_logs (event_id, timestamp, account_id, actor_email, actor_type, action_type, \
                                     action_result, resource_type, resource_id, ip_address, metadata, raw_event, ingestion_time) \
             SELECT e, t, a, ae, aty, ty, r, rt, ri, ip, m::jsonb, raw::jsonb, it \
             FROM UNNEST($1::text[], $2::timestamptz[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], \
                         $8::text[], $9::text[], $10::inet[], $11::text[], $12::text[], $13::timestamptz[]) \
                  AS u(e, t, a, ae, aty, ty, r, rt, ri, ip, m, raw, it) \
             ON CONFLICT (timestamp, event_id) DO UPDATE SET ingestion_time = EXCLUDED.ingestion_time \
             RETURNING (xmax = 0) AS inserted) \
             SELECT count(*) FILTER (WHERE inserted) FROM written",
        )
        .bind(rows.iter().map(|r| r.event_id.as_str()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.timestamp).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.account_id.as_str()).collect::<Vec<_>>())
        .bind(texts(|r| r.actor_email.as_deref()))
        .bind(texts(|r| r.actor_type.as_deref()))
        .bind(texts(|r| r.action_type.as_deref()))
        .bind(texts(|r| r.action_result.as_deref()))
        .bind(texts(|r| r.resource_type.as_deref()))
        .bind(texts(|r| r.resource_id.as_deref()))
        .bind(ips)
        .bind(texts(|r| r.metadata.as_deref()))
        .bind(rows.iter().map(|r| &*r.raw_event).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.ingestion_time).collect::<Vec<_>>())
        .fetch_one(&self.pool)
        .await
        .map_err(|e| sink_error("insert into audit_logs", e))?;
        let inserted = inserted as u64;
        Ok(RowWriteReport {
            inserted,
            duplicates: rows.len() as u64 - inserted,
        })
    }
}

#[async_trait]
impl CheckpointStore for Postgres {
    async fn load(&self, account_id: &str) -> Result<CommittedState, SinkError> {
        let row: Option<(Option<DateTime<Utc>>, Json<Vec<SeenId>>, i64)> = sqlx::query_as(
            "SELECT checkpoint, overlap_ids, commit_seq FROM cfaudit_checkpoints WHERE account_id = $1",
        )
        .bind(account_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| sink_error("load checkpoint", e))?;
        Ok(match row {
            Some((checkpoint, Json(overlap_ids), commit_seq)) => CommittedState {
                checkpoint,
                overlap_ids,
                commit_seq: commit_seq as u64,
            },
            None => CommittedState::default(),
        })
    }

    async fn commit(&self, record: &CommitRecord) -> Result<(), SinkError> {
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(|e| sink_error("begin", e))?;
        // Fenced on commit_seq: a second instance on the same account cannot interleave.
        let updated = sqlx::query(
            "INSERT INTO cfaudit_checkpoints (account_id, checkpoint, overlap_ids, commit_seq, updated_at) \
             VALUES ($1, $2, $3, $4, NOW()) \
             ON CONFLICT (account_id) DO UPDATE \
               SET checkpoint = EXCLUDED.checkpoint, overlap_ids = EXCLUDED.overlap_ids, \
                   commit_seq = EXCLUDED.commit_seq, updated_at = NOW() \
             WHERE cfaudit_checkpoints.commit_seq = $5",
        )
        .bind(&record.account_id)
        .bind(record.state.checkpoint)
        .bind(Json(&record.state.overlap_ids))
        .bind(record.state.commit_seq as i64)
        .bind(record.previous_commit_seq as i64)
        .execute(&mut *tx)
        .await
        .map_err(|e| sink_error("write checkpoint", e))?;
        if updated.rows_affected() != 1 {
            return Err(SinkError::new(format!(
                "checkpoint of account {} moved under us (expected commit {}): is another cfaudit running on it?",
                record.account_id, record.previous_commit_seq
            )));
        }
        if !record.dead_letters.is_empty() {
            let d = &record.dead_letters;
            sqlx::query(
                "INSERT INTO cfaudit_dead_letters (account_id, reason, raw_event, first_seen) \
                 SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::timestamptz[]) \
                 ON CONFLICT (account_id, raw_md5) DO NOTHING",
            )
            .bind(d.iter().map(|x| x.account_id.as_str()).collect::<Vec<_>>())
            .bind(d.iter().map(|x| x.reason.as_str()).collect::<Vec<_>>())
            .bind(d.iter().map(|x| x.raw_event.as_str()).collect::<Vec<_>>())
            .bind(d.iter().map(|x| x.first_seen).collect::<Vec<_>>())
            .execute(&mut *tx)
            .await
            .map_err(|e| sink_error("insert dead letters", e))?;
        }
        if !record.files.is_empty() {
            let f = &record.files;
            sqlx::query(
                "INSERT INTO cfaudit_parquet_files (final_path, account_id, commit_seq, staged_path, partition, rows, bytes) \
                 SELECT u.final_path, $2, $3, u.staged_path, u.partition, u.rows, u.bytes \
                 FROM UNNEST($1::text[], $4::text[], $5::text[], $6::bigint[], $7::bigint[]) \
                      AS u(final_path, staged_path, partition, rows, bytes)",
            )
            .bind(f.iter().map(|(_, c)| c.final_path.as_str()).collect::<Vec<_>>())
            .bind(&record.account_id)
            .bind(record.state.commit_seq as i64)
            .bind(f.iter().map(|(s, _)| s.staged_path.as_str()).collect::<Vec<_>>())
            .bind(f.iter().map(|(s, _)| s.partition.as_str()).collect::<Vec<_>>())
            .bind(f.iter().map(|(s, _)| s.rows as i64).collect::<Vec<_>>())
            .bind(f.iter().map(|(s, _)| s.bytes as i64).collect::<Vec<_>>())
            .execute(&mut *tx)
            .await
            .map_err(|e| sink_error("record parquet files", e))?;
        }
        tx.commit().await.map_err(|e| sink_error("commit", e))
    }

    async fn unpublished(&self, account_id: &str) -> Result<Vec<CommittedFile>, SinkError> {
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT staged_path, final_path FROM cfaudit_parquet_files \
             WHERE account_id = $1 AND published_at IS NULL ORDER BY commit_seq, final_path",
        )
        .bind(account_id)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| sink_error("list unpublished files", e))?;
        Ok(rows
            .into_iter()
            .map(|(staged_path, final_path)| CommittedFile {
                staged_path,
                final_path,
            })
            .collect())
    }

    async fn mark_published(&self, final_paths: &[String]) -> Result<(), SinkError> {
        sqlx::query("UPDATE cfaudit_parquet_files SET published_at = NOW() WHERE final_path = ANY($1) AND published_at IS NULL")
            .bind(final_paths)
            .execute(&self.pool)
            .await
            .map_err(|e| sink_error("mark files published", e))?;
        Ok(())
    }
}
