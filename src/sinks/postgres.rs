//! PostgreSQL: the row sink (`audit_logs`), the checkpoint store (with the dataset's event
//! index) and the stream leases, on one pool.

use std::collections::HashSet;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use cfaudit_actors::{
    partition_start, AuditRow, CheckpointStore, CommitRecord, CommittedFile, CommittedState, Fence,
    RowSink, RowWriteReport, SeenId, SinkError, UnfinishedSweep,
};
use chrono::{DateTime, DurationRound, Utc};
use ipnetwork::IpNetwork;
use sqlx::migrate::MigrateDatabase;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::types::Json;
use sqlx::Connection as _;
use sqlx::PgPool;
use tracing::{debug, info, warn};

use crate::settings::Secret;

mod copy;
mod leases;
mod refresher;
use crate::sinks::dataset::{DetailField, DETAIL_TEXT};
use crate::streams::{backfill_key_prefix, Stream};
pub use leases::{Lease, LeaseHolder, LeaseSession, Replica, StreamOwner};
pub use refresher::AggregateRefresher;

/// Embedded at compile time: the binary carries its schema.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// How far back the API can return events (18 months) plus a margin: the dataset's event
/// index forgets events older than this, which no sweep can fetch again.
const INDEX_HORIZON_DAYS: i32 = 550;

/// The longest wait before asking again for a refresh that another refresh blocked (waits
/// double from 0.5 s: about 30 s in all, per view).
const MAX_REFRESH_PAUSE: Duration = Duration::from_secs(16);

/// TimescaleDB's "could not refresh continuous aggregate … due to a concurrent refresh".
fn is_concurrent_refresh(error: &sqlx::Error) -> bool {
    error
        .as_database_error()
        .and_then(|e| e.code())
        .is_some_and(|code| code == "55P03")
}

/// How far back the continuous aggregates' refresh policy looks (`start_offset` in the
/// aggregates' migration); older hours are refreshed by cfaudit itself.
const AGGREGATE_POLICY_DAYS: i64 = 3;

/// TimescaleDB's continuous aggregates with their bucket in hours, in the order they are
/// refreshed: an aggregate built on another (the actor and address rollups on
/// `audit_actors_daily`) after it.
const CONTINUOUS_AGGREGATES: [(&str, i64); 6] = [
    ("audit_events_hourly", 1),
    ("audit_actors_hourly", 1),
    ("audit_actors_daily", 24),
    ("audit_actor_activity_daily", 24),
    ("audit_address_activity_daily", 24),
    ("audit_logins_daily", 24),
];

/// The continuous aggregates' names, for messages that tell an operator what to refresh.
fn continuous_aggregate_names() -> String {
    CONTINUOUS_AGGREGATES.map(|(view, _)| view).join(", ")
}

#[derive(Clone)]
pub struct Postgres {
    pool: PgPool,
    options: PgConnectOptions,
}

/// The URL without its password (in the user info or a `password` parameter), for messages.
pub fn redacted_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) => {
            if parsed.password().is_some() {
                let _ = parsed.set_password(Some("***"));
            }
            let secret = |key: &str| {
                let key = key.to_ascii_lowercase();
                key.contains("password") || key == "sslkey" || key == "passfile"
            };
            if parsed.query_pairs().any(|(k, _)| secret(&k)) {
                let pairs: Vec<(String, String)> = parsed
                    .query_pairs()
                    .map(|(k, v)| {
                        let v = if secret(&k) {
                            "***".into()
                        } else {
                            v.into_owned()
                        };
                        (k.into_owned(), v)
                    })
                    .collect();
                parsed.query_pairs_mut().clear().extend_pairs(pairs);
            }
            parsed.to_string()
        }
        Err(_) => "(unparseable DATABASE_URL)".into(),
    }
}

/// A failed statement, by what the pipeline must do about it: a value PostgreSQL cannot store
/// (data exceptions, class 22, and program limits, class 54) is [`SinkError::Rejected`] and
/// gets isolated; anything else is transient.
fn sink_error(what: &str, error: sqlx::Error) -> SinkError {
    let rejected = match &error {
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|code| code.starts_with("22") || code.starts_with("54")),
        sqlx::Error::Encode(_) => true,
        _ => false,
    };
    let message = format!("postgres {what}: {error}");
    if rejected {
        SinkError::Rejected(message)
    } else {
        SinkError::Transient(message)
    }
}

fn connect_error(url: &Secret, error: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!(
        "cannot connect to DATABASE_URL {}: {error}",
        redacted_url(url.expose())
    )
}

impl Postgres {
    /// A pool of `max_connections`; every statement of its connections gives up after
    /// `statement_timeout` (a lock held on a table, a server that stopped answering).
    pub async fn connect(
        url: &Secret,
        max_connections: u32,
        statement_timeout: Option<Duration>,
    ) -> anyhow::Result<Postgres> {
        let mut options =
            PgConnectOptions::from_str(url.expose()).map_err(|e| connect_error(url, e))?;
        if let Some(timeout) = statement_timeout {
            let millis = timeout.as_millis().to_string();
            options = options.options([("statement_timeout", millis.as_str())]);
        }
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options.clone())
            .await
            .map_err(|e| connect_error(url, e))?;
        Ok(Postgres { pool, options })
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

    /// Applies the migrations not applied yet, each in its own transaction.
    ///
    /// On TimescaleDB a fresh database's migrations start the aggregates' refresh jobs and a
    /// later one replaces those aggregates: a job running at that moment fails it ("tuple
    /// concurrently deleted", or a deadlock). Rolled back whole, it is applied again after a
    /// pause.
    pub async fn migrate(&self) -> anyhow::Result<()> {
        let mut attempt = 1;
        loop {
            let mut connection = self.pool.acquire().await?;
            let error = match MIGRATOR.run(&mut *connection).await {
                Ok(()) => return Ok(()),
                Err(error) => error,
            };
            // The migrator keeps its advisory lock when it fails: the connection is closed
            // rather than handed back to the pool, which releases the lock.
            let _ = connection.close().await;
            if attempt >= MIGRATION_ATTEMPTS || !met_a_background_job(&error) {
                return Err(error.into());
            }
            warn!(attempt, %error, "a migration met a TimescaleDB background job; applying it again");
            tokio::time::sleep(Duration::from_millis(250 * attempt)).await;
            attempt += 1;
        }
    }

    /// Forgets the indexed events older than the API's retention: no sweep can fetch them
    /// again.
    pub async fn prune_event_index(&self) -> anyhow::Result<u64> {
        let pruned = sqlx::query(
            "DELETE FROM cfaudit_lake_events WHERE event_time < now() - make_interval(days => $1)",
        )
        .bind(INDEX_HORIZON_DAYS)
        .execute(&self.pool)
        .await?;
        // Rows rewritten by a batch that never committed; the API no longer has them.
        sqlx::query(
            "DELETE FROM cfaudit_rewritten_rows WHERE event_time < now() - make_interval(days => $1)",
        )
        .bind(INDEX_HORIZON_DAYS)
        .execute(&self.pool)
        .await?;
        Ok(pruned.rows_affected())
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

    /// What TimescaleDB does with `audit_logs` in this database; `None` on plain PostgreSQL.
    pub async fn timescale_state(&self) -> anyhow::Result<Option<TimescaleState>> {
        if !self.has_timescaledb().await? {
            return Ok(None);
        }
        let (version, chunks, compressed_chunks, compress_after, drop_after) = sqlx::query_as(
            "SELECT (SELECT extversion::text FROM pg_extension WHERE extname = 'timescaledb'), \
                    (SELECT count(*) FROM timescaledb_information.chunks WHERE hypertable_name = 'audit_logs'), \
                    (SELECT count(*) FROM timescaledb_information.chunks \
                      WHERE hypertable_name = 'audit_logs' AND is_compressed), \
                    (SELECT config->>'compress_after' FROM timescaledb_information.jobs \
                      WHERE hypertable_name = 'audit_logs' AND proc_name = 'policy_compression'), \
                    (SELECT config->>'drop_after' FROM timescaledb_information.jobs \
                      WHERE hypertable_name = 'audit_logs' AND proc_name = 'policy_retention')",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(Some(TimescaleState {
            version,
            chunks,
            compressed_chunks,
            compress_after,
            drop_after,
        }))
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

    /// Brings the dashboards' aggregates up to date after rows were written over
    /// `[since, until)`. TimescaleDB: materializes the continuous aggregates over the range,
    /// widened to whole buckets (hours, days); their refresh policy only looks at the last
    /// [`AGGREGATE_POLICY_DAYS`], so rows written further back (a backfill, a replay) need
    /// this. Plain PostgreSQL: folds the days written since the last fold into the daily
    /// aggregates (the hourly ones are kept by triggers). A failure loses nothing (the rows are
    /// committed): it is logged with the command that fixes it.
    pub async fn refresh_aggregates(&self, since: DateTime<Utc>, until: DateTime<Utc>) {
        match self.try_refresh_aggregates(Some(since), until).await {
            Ok(true) => {
                info!(%since, %until, "the dashboards' aggregates brought up to date over the range")
            }
            Ok(false) => {}
            Err(error) => {
                let fix = self.refresh_fix().await;
                warn!(%error, %since, %until, fix, "the dashboards' aggregates were not brought up to date")
            }
        }
    }

    /// Brings the aggregates up to date behind the writers. TimescaleDB: everywhere their
    /// refresh policy does not look (older than [`AGGREGATE_POLICY_DAYS`]). Once the policy
    /// has run, the aggregates read as materialized everything before its window, so rows the
    /// live stream commits there (its first catch-up, a late event reached by the safety lag)
    /// would be missing from the dashboards. TimescaleDB recomputes only the hours that
    /// changed since the last refresh, so a call with nothing new costs a few milliseconds.
    /// Plain PostgreSQL: folds the days written since the last fold (none: a fraction of a
    /// millisecond).
    pub async fn refresh_settled_aggregates(&self) -> anyhow::Result<bool> {
        let until = Utc::now() - chrono::Duration::days(AGGREGATE_POLICY_DAYS);
        self.try_refresh_aggregates(None, until).await
    }

    /// What an operator runs to do what a failed refresh left undone.
    pub async fn refresh_fix(&self) -> String {
        match self.has_timescaledb().await {
            Ok(false) => "SELECT cfaudit_fold_days() (until then the dashboards read the days not \
                          folded hour by hour: exact, slower); the next refresh tries again"
                .to_owned(),
            _ => format!(
                "CALL refresh_continuous_aggregate(view, NULL, now() - INTERVAL '{AGGREGATE_POLICY_DAYS} days') \
                 for each of the views {}, in that order; the next run refreshes them",
                continuous_aggregate_names()
            ),
        }
    }

    /// `false` when there was nothing to do (plain PostgreSQL, no day to fold). `since`
    /// `None` is the beginning of time.
    async fn try_refresh_aggregates(
        &self,
        since: Option<DateTime<Utc>>,
        until: DateTime<Utc>,
    ) -> anyhow::Result<bool> {
        let timescaledb = self.has_timescaledb().await?;
        // Plain PostgreSQL: nothing to fold (an idle service's every sweep asks) costs one
        // query on the pool, not a connection.
        if !timescaledb
            && !sqlx::query_scalar::<_, bool>("SELECT EXISTS (SELECT 1 FROM cfaudit_unfolded_days)")
                .fetch_one(&self.pool)
                .await?
        {
            return Ok(false);
        }
        // A connection of its own, not one of the pool's, which the writers and commits
        // need meanwhile; without the timeout: materializing or folding a long backlog can
        // take longer than one statement of the pipeline may.
        let mut connection = sqlx::PgConnection::connect_with(&self.options).await?;
        sqlx::raw_sql("SET statement_timeout = 0; SET application_name = 'cfaudit refresh'")
            .execute(&mut connection)
            .await?;
        if !timescaledb {
            // The fold takes every day written since the last one, whatever the range.
            let folded = sqlx::query_scalar::<_, i32>("SELECT cfaudit_fold_days()")
                .fetch_one(&mut connection)
                .await
                .map_err(|error| {
                    anyhow::Error::from(error).context("folding the daily aggregates")
                });
            let _ = connection.close().await;
            let days = folded?;
            debug!(days, "daily aggregates folded");
            return Ok(days > 0);
        }
        // Every view is asked even when one fails: the first failure is reported.
        let mut failed = None;
        for (view, hours) in CONTINUOUS_AGGREGATES {
            let bucket = chrono::Duration::hours(hours);
            // A bucket is materialized only when the window covers it whole: the range
            // widened to whole buckets.
            let floor = |t: DateTime<Utc>| t.duration_trunc(bucket).expect("a bucket divides time");
            let since = since.map_or("NULL".to_owned(), |since| {
                format!("'{}'::timestamptz", floor(since).to_rfc3339())
            });
            let until = floor(until) + bucket;
            // CALL refuses to run in a transaction block: simple protocol, and the bounds are
            // our own timestamps, not input.
            let call = format!(
                "CALL refresh_continuous_aggregate('{view}', {since}, '{}'::timestamptz)",
                until.to_rfc3339()
            );
            // TimescaleDB refuses a refresh while another one (its policy's job, another
            // process) covers part of the window: that one ends, so wait and ask again.
            let mut pause = Duration::from_millis(500);
            loop {
                match sqlx::raw_sql(sqlx::AssertSqlSafe(call.clone()))
                    .execute(&mut connection)
                    .await
                {
                    Err(error) if is_concurrent_refresh(&error) && pause <= MAX_REFRESH_PAUSE => {
                        debug!(
                            view,
                            ?pause,
                            "another refresh covers the window; waiting for it"
                        );
                        tokio::time::sleep(pause).await;
                        pause *= 2;
                    }
                    Err(error) => {
                        failed.get_or_insert(
                            anyhow::Error::from(error).context(format!("refreshing {view}")),
                        );
                        break;
                    }
                    Ok(_) => break,
                }
            }
        }
        let _ = connection.close().await;
        match failed {
            Some(error) => Err(error),
            None => Ok(true),
        }
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

/// Every stream of an account's log of one API version: its live stream (key $1) and its
/// backfills (keys starting with $2, see `streams::backfill_key_prefix`).
const LOG_STREAMS: &str =
    "SELECT account_id, covers_since, covers_until, checkpoint, completed_at \
     FROM cfaudit_checkpoints \
     WHERE account_id = $1 OR starts_with(account_id, $2) \
     ORDER BY covers_since NULLS FIRST, account_id";

/// Streams: the checkpoint rows of one account's live collection and backfills.
impl Postgres {
    /// Every stream of the account, of every API version (live ones and backfills).
    pub async fn account_streams(&self, account_id: &str) -> anyhow::Result<Vec<Stream>> {
        Ok(sqlx::query_as(
            "SELECT account_id, covers_since, covers_until, checkpoint, completed_at \
             FROM cfaudit_checkpoints WHERE split_part(account_id, '.', 1) = $1 \
             ORDER BY covers_since NULLS FIRST, account_id",
        )
        .bind(account_id)
        .fetch_all(self.pool())
        .await?)
    }

    /// Registers a stream of the log whose live stream is `live_key`, deciding its range from
    /// the log's other streams under a lock, so a backfill and a starting service cannot both
    /// claim the same range. `plan` gets the log's streams and returns the new stream's
    /// `(key, since, until)` or an error. An existing stream keeps its range once it has
    /// committed something.
    pub async fn register_stream(
        &self,
        live_key: &str,
        plan: impl FnOnce(&[Stream]) -> anyhow::Result<(String, DateTime<Utc>, Option<DateTime<Utc>>)>,
    ) -> anyhow::Result<Stream> {
        let mut tx = self.pool().begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('cfaudit.streams.' || $1))")
            .bind(live_key)
            .execute(&mut *tx)
            .await?;
        let streams: Vec<Stream> = sqlx::query_as(LOG_STREAMS)
            .bind(live_key)
            .bind(backfill_key_prefix(live_key))
            .fetch_all(&mut *tx)
            .await?;
        let (key, since, until) = plan(&streams)?;
        let stream: Stream = sqlx::query_as(
            "INSERT INTO cfaudit_checkpoints (account_id, covers_since, covers_until) \
             VALUES ($1, $2, $3) \
             ON CONFLICT (account_id) DO UPDATE \
               SET covers_since = CASE WHEN cfaudit_checkpoints.checkpoint IS NULL \
                                       THEN EXCLUDED.covers_since \
                                       ELSE cfaudit_checkpoints.covers_since END \
             RETURNING account_id, covers_since, covers_until, checkpoint, completed_at",
        )
        .bind(&key)
        .bind(since)
        .bind(until)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(stream)
    }

    /// Records that a sweep of the stream finished with everything committed.
    pub async fn record_sweep(&self, key: &str) -> anyhow::Result<()> {
        sqlx::query("UPDATE cfaudit_checkpoints SET last_sweep_at = now() WHERE account_id = $1")
            .bind(key)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    /// Marks a bounded stream as having committed its whole range; refused unless a sweep
    /// of it reached the range's end (`swept_until`), whatever ended the run.
    pub async fn complete_stream(&self, key: &str) -> anyhow::Result<()> {
        let completed = sqlx::query(
            "UPDATE cfaudit_checkpoints SET completed_at = now() \
             WHERE account_id = $1 AND covers_until IS NOT NULL AND swept_until >= covers_until",
        )
        .bind(key)
        .execute(self.pool())
        .await?;
        anyhow::ensure!(
            completed.rows_affected() == 1,
            "stream {key} is not collected to its end yet; run the same command again to continue"
        );
        Ok(())
    }
}

/// What is committed for an account, over all its streams (live and backfills, every API
/// version).
#[derive(Debug, Clone, PartialEq)]
pub struct AccountCounts {
    pub rows_in_postgres: i64,
    pub parquet_files: i64,
    pub parquet_rows: i64,
    pub dead_letters: i64,
}

/// One account as `cfaudit status` shows it.
#[derive(Debug, serde::Serialize, sqlx::FromRow)]
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
    /// The live stream of each API version collected (the fields above are v1's).
    #[sqlx(skip)]
    pub live_streams: Vec<Stream>,
    #[sqlx(skip)]
    pub backfills: Vec<Stream>,
}

/// Counts and facts for the CLI (`run --once`, `backfill`, `status`, `check`) and `/readyz`.
impl Postgres {
    pub async fn account_counts(&self, account_id: &str) -> anyhow::Result<AccountCounts> {
        // A stream's account is its key up to the first `.` (see `streams::live_key`).
        let (rows_in_postgres,): (i64,) =
            sqlx::query_as("SELECT count(*) FROM audit_logs WHERE account_id = $1")
                .bind(account_id)
                .fetch_one(&self.pool)
                .await?;
        let (parquet_files, parquet_rows): (i64, i64) = sqlx::query_as(
            "SELECT count(*), coalesce(sum(rows), 0)::bigint FROM cfaudit_parquet_files \
             WHERE split_part(account_id, '.', 1) = $1 AND published_at IS NOT NULL",
        )
        .bind(account_id)
        .fetch_one(&self.pool)
        .await?;
        let (dead_letters,): (i64,) =
            sqlx::query_as("SELECT count(*) FROM cfaudit_dead_letters WHERE account_id = $1")
                .bind(account_id)
                .fetch_one(&self.pool)
                .await?;
        Ok(AccountCounts {
            rows_in_postgres,
            parquet_files,
            parquet_rows,
            dead_letters,
        })
    }

    /// A backfill's rows in `audit_logs` (of the account and the API version, in its range)
    /// and the files and rows its stream published.
    pub async fn backfill_counts(&self, stream: &Stream) -> anyhow::Result<(i64, i64, i64)> {
        let account = stream.account();
        let (rows,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM audit_logs \
             WHERE account_id = $1 AND timestamp >= $2 AND timestamp < $3 AND api_version = $4",
        )
        .bind(account)
        .bind(stream.covers_since)
        .bind(stream.covers_until)
        .bind(stream.api_version().as_str())
        .fetch_one(&self.pool)
        .await?;
        let (files, file_rows): (i64, i64) = sqlx::query_as(
            "SELECT count(*), coalesce(sum(rows), 0)::bigint FROM cfaudit_parquet_files \
             WHERE account_id = $1 AND published_at IS NOT NULL",
        )
        .bind(&stream.key)
        .fetch_one(&self.pool)
        .await?;
        Ok((rows, files, file_rows))
    }

    /// Every account with a stream, and what is committed for it.
    pub async fn account_statuses(&self) -> anyhow::Result<Vec<AccountStatus>> {
        // A stream's account is its key up to the first `.` (see `streams::backfill_key`).
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
        .fetch_all(&self.pool)
        .await
        .map_err(|e| {
            anyhow::anyhow!("reading the committed state: {e}. Fix: run `cfaudit migrate`, or check DATABASE_URL")
        })?;
        for account in &mut accounts {
            let (live, backfills) = self
                .account_streams(&account.account_id)
                .await?
                .into_iter()
                .partition(|s| s.is_live());
            account.live_streams = live;
            account.backfills = backfills;
        }
        Ok(accounts)
    }

    /// The server's version, and how many migrations are applied (0 before the first).
    pub async fn version_and_migrations(&self) -> Result<(String, i64), sqlx::Error> {
        let (version,): (String,) = sqlx::query_as("SHOW server_version")
            .fetch_one(&self.pool)
            .await?;
        let applied: i64 =
            sqlx::query_as::<_, (i64,)>("SELECT count(*) FROM _sqlx_migrations WHERE success")
                .fetch_one(&self.pool)
                .await
                .map(|r| r.0)
                .unwrap_or(0);
        Ok((version, applied))
    }
}

/// Attempts at the migrations when one meets a background job.
const MIGRATION_ATTEMPTS: u64 = 6;

/// A migration failed because a TimescaleDB background job changed a catalog row it was
/// changing too (an internal error of PostgreSQL's, known by its message only), or because
/// the two deadlocked (seen on a fresh database: migration 9 against a refresh job).
fn met_a_background_job(error: &sqlx::migrate::MigrateError) -> bool {
    use sqlx::migrate::MigrateError;
    let (MigrateError::Execute(sqlx::Error::Database(db))
    | MigrateError::ExecuteMigration(sqlx::Error::Database(db), _)) = error
    else {
        return false;
    };
    db.code().as_deref() == Some("40P01")
        || db.message().contains("tuple concurrently deleted")
        || db.message().contains("tuple concurrently updated")
}

/// Whether the database behind `pool` answers.
pub async fn answers(pool: &PgPool) -> bool {
    sqlx::query("SELECT 1").execute(pool).await.is_ok()
}

/// SQL that is true when a write may go ahead: without a fence (parameter `$stream` NULL, a
/// replay), or while the fence's lease (parameter `$lease`) is the stream's. Both row-writing
/// statements read it.
macro_rules! fenced_in {
    ($stream:literal, $lease:literal) => {
        concat!(
            "($",
            $stream,
            "::text IS NULL OR EXISTS (SELECT 1 FROM cfaudit_checkpoints \
             WHERE account_id = $",
            $stream,
            " AND lease_token = $",
            $lease,
            "))"
        )
    };
}

/// What the bulk path did with a batch.
#[derive(Debug, PartialEq, Eq)]
pub enum BulkWrite {
    /// Every row was new and is stored.
    Stored(u64),
    /// Some rows are there already, or PostgreSQL refused the COPY: the upsert decides.
    Declined,
}

#[async_trait]
impl RowSink for Postgres {
    /// A batch whose rows are all new (a backfill, live polling) is stored by COPY, at the
    /// speed of PostgreSQL's own bulk load; one with rows already there (a retry after a failed
    /// commit, an event another account stored), or one the COPY fails on (a value PostgreSQL
    /// refuses, a row a concurrent writer stored meanwhile), by the upsert, which tells
    /// inserted from present rows and isolates refused ones.
    async fn write_rows(
        &self,
        fence: Option<&Fence>,
        rows: &[AuditRow],
    ) -> Result<RowWriteReport, SinkError> {
        match self.copy_new_rows(fence, rows).await? {
            BulkWrite::Stored(inserted) => Ok(RowWriteReport {
                inserted,
                duplicates: 0,
                rejected: Vec::new(),
            }),
            BulkWrite::Declined => self.upsert_rows(fence, rows).await,
        }
    }
}

impl Postgres {
    /// In one transaction: the fence, whether any row is there already, and the COPY of all
    /// rows when none is. The fence is read as the upsert reads it, once, at the start.
    pub async fn copy_new_rows(
        &self,
        fence: Option<&Fence>,
        rows: &[AuditRow],
    ) -> Result<BulkWrite, SinkError> {
        if rows.is_empty() {
            return Ok(BulkWrite::Stored(0));
        }
        let mut connection =
            CopyConnection(Some(self.pool.acquire().await.map_err(|e| {
                sink_error("acquire a connection for the bulk write", e)
            })?));
        let mut tx = sqlx::Connection::begin(&mut **connection.get())
            .await
            .map_err(|e| sink_error("begin the bulk write", e))?;
        let (fenced_in, present): (bool, bool) = sqlx::query_as(concat!(
            "SELECT ",
            fenced_in!(3, 4),
            ", EXISTS (SELECT 1 FROM UNNEST($1::timestamptz[], $2::text[]) AS u(t, e) \
                       WHERE EXISTS (SELECT 1 FROM audit_logs a \
                                     WHERE a.timestamp = u.t AND a.event_id = u.e \
                                       AND a.timestamp BETWEEN $5 AND $6))",
        ))
        .bind(rows.iter().map(|r| r.timestamp).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.event_id.as_str()).collect::<Vec<_>>())
        .bind(fence.map(|f| f.stream.as_str()))
        .bind(fence.map_or(0, |f| f.lease as i64))
        .bind(rows.iter().map(|r| r.timestamp).min())
        .bind(rows.iter().map(|r| r.timestamp).max())
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| sink_error("look up the batch's rows", e))?;
        if !fenced_in || present {
            drop(tx); // rolled back before the connection's next use
            connection.release();
            return if fenced_in {
                Ok(BulkWrite::Declined)
            } else {
                Err(fenced(fence))
            };
        }
        let stored = async {
            let mut copy = tx.copy_in_raw(copy::COPY_AUDIT_LOGS).await?;
            let mut buffer = Vec::with_capacity(COPY_CHUNK_BYTES + COPY_CHUNK_BYTES / 4);
            for row in rows {
                copy::encode_row(row, &mut buffer);
                if buffer.len() >= COPY_CHUNK_BYTES {
                    copy.send(buffer.as_slice()).await?;
                    buffer.clear();
                }
            }
            copy.send(buffer.as_slice()).await?;
            let stored = copy.finish().await?;
            tx.commit().await?;
            Ok::<u64, sqlx::Error>(stored)
        }
        .await;
        match stored {
            Ok(stored) => {
                connection.release();
                Ok(BulkWrite::Stored(stored))
            }
            // Refused for the data (a value, a key stored meanwhile) or by a deadlock: the
            // transaction is rolled back whole and the upsert, the authority on values and
            // present rows, has its say. Anything else (a timeout, a server going away) is
            // for the writer to retry.
            Err(sqlx::Error::Database(error)) => {
                // The server's answer was read: the connection is in step.
                connection.release();
                let code = error.code();
                if !upsert_decides(code.as_deref()) {
                    return Err(sink_error(
                        "copy into audit_logs",
                        sqlx::Error::Database(error),
                    ));
                }
                if code.as_deref() == Some("23505") {
                    debug!(%error, "a row of the batch was stored meanwhile; the upsert writes it");
                } else {
                    warn!(%error, rows = rows.len(), "COPY refused the batch; the upsert writes it");
                }
                Ok(BulkWrite::Declined)
            }
            Err(other) => Err(sink_error("copy into audit_logs", other)),
        }
    }

    /// One statement per batch: UNNEST keeps the bind count fixed whatever the batch size.
    /// A row already present (left by an attempt that never committed, of this stream or of
    /// another account that sees the same user-level event) takes the new `ingestion_time`
    /// and `account_id`: those the Parquet file of the committing batch carries, so both
    /// sinks agree column for column; a committed row keeps the dataset's, except
    /// in a replay (no fence), which copies the dataset's. `xmax = 0` tells inserted rows
    /// from updated.
    /// With a fence, nothing is written unless the fence's lease is the stream's: a process
    /// that lost its stream cannot overwrite the rows of the one that holds it now.
    pub async fn upsert_rows(
        &self,
        fence: Option<&Fence>,
        rows: &[AuditRow],
    ) -> Result<RowWriteReport, SinkError> {
        let texts = |f: fn(&AuditRow) -> Option<&str>| rows.iter().map(f).collect::<Vec<_>>();
        let ips: Vec<Option<IpNetwork>> = rows
            .iter()
            .map(|r| r.ip_address.map(IpNetwork::from))
            .collect();
        let details = |f: DetailField| rows.iter().map(|r| f(&r.detail)).collect::<Vec<_>>();
        let query = sqlx::query_as(
            concat!(
            "WITH fence AS (SELECT ",
            fenced_in!(14, 15),
            " AS ok), \
             written AS (INSERT INTO audit_logs (",
            copy::audit_columns!(),
            ") \
             SELECT e, t, a, ae, aty, ty, r, rt, ri, ip, m::jsonb, raw::jsonb, it, \
                    v, d1, d2, d3, d4, d5, d6, d7, d8, d9, d10, d11, d12, d13, sc \
             FROM UNNEST($1::text[], $2::timestamptz[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], \
                         $8::text[], $9::text[], $10::inet[], $11::text[], $12::text[], $13::timestamptz[], \
                         $16::text[], $17::text[], $18::text[], $19::text[], $20::text[], $21::text[], $22::text[], \
                         $23::text[], $24::text[], $25::text[], $26::text[], $27::text[], $28::text[], $29::text[], \
                         $30::int[]) \
                  AS u(e, t, a, ae, aty, ty, r, rt, ri, ip, m, raw, it, \
                       v, d1, d2, d3, d4, d5, d6, d7, d8, d9, d10, d11, d12, d13, sc) \
             WHERE (SELECT ok FROM fence) \
             ON CONFLICT (timestamp, event_id) DO UPDATE SET ingestion_time = EXCLUDED.ingestion_time, \
                                                             account_id = EXCLUDED.account_id \
                WHERE $14::text IS NULL OR NOT cfaudit_in_lake(audit_logs.timestamp, audit_logs.event_id) \
             RETURNING (xmax = 0) AS inserted, timestamp, event_id), \
             rewritten AS (INSERT INTO cfaudit_rewritten_rows (event_time, event_id) \
                           SELECT timestamp, event_id FROM written WHERE NOT inserted AND $14::text IS NOT NULL \
                           ON CONFLICT DO NOTHING) \
             SELECT (SELECT ok FROM fence), count(*) FILTER (WHERE inserted) FROM written"
            ),
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
        .bind(fence.map(|f| f.stream.as_str()))
        .bind(fence.map_or(0, |f| f.lease as i64))
        .bind(rows.iter().map(|r| r.api_version.as_str()).collect::<Vec<_>>());
        let query = DETAIL_TEXT
            .iter()
            .fold(query, |query, (_, field, _)| query.bind(details(*field)));
        let (fenced_in, inserted): (bool, i64) = query
            .bind(
                rows.iter()
                    .map(|r| r.detail.raw_status_code)
                    .collect::<Vec<_>>(),
            )
            .fetch_one(&self.pool)
            .await
            .map_err(|e| sink_error("insert into audit_logs", e))?;
        if !fenced_in {
            return Err(fenced(fence));
        }
        let inserted = inserted as u64;
        Ok(RowWriteReport {
            inserted,
            duplicates: rows.len() as u64 - inserted,
            rejected: Vec::new(),
        })
    }
}

/// Errors of a COPY the upsert may answer otherwise: a unique violation (a row stored
/// meanwhile), data exceptions and program limits (class 22 and 54: the upsert isolates the
/// refused rows, and stores rows a COPY-only error would have refused), serialization failures
/// and deadlocks (class 40).
fn upsert_decides(code: Option<&str>) -> bool {
    code.is_some_and(|code| {
        code == "23505"
            || code.starts_with("22")
            || code.starts_with("54")
            || code.starts_with("40")
    })
}

/// The connection of a bulk write. sqlx does not count the reply a COPY awaits: a write cut
/// short inside one (the writer's deadline) would leave that reply on the connection, and the
/// next statement would read it as its own. So the connection goes back to the pool only by
/// [`CopyConnection::release`], once the exchange completed; dropped otherwise, it is closed.
struct CopyConnection(Option<sqlx::pool::PoolConnection<sqlx::Postgres>>);

impl CopyConnection {
    fn get(&mut self) -> &mut sqlx::pool::PoolConnection<sqlx::Postgres> {
        self.0.as_mut().expect("released only at the end")
    }

    fn release(mut self) {
        drop(self.0.take());
    }
}

impl Drop for CopyConnection {
    fn drop(&mut self) {
        if let Some(mut connection) = self.0.take() {
            connection.close_on_drop();
        }
    }
}

/// How much COPY data is encoded before it is sent: the batch is never held twice over.
const COPY_CHUNK_BYTES: usize = 256 * 1024;

/// A write refused by the fence of `fence` (only a fence can refuse).
fn fenced(fence: Option<&Fence>) -> SinkError {
    let fence = fence.expect("only a fence can refuse");
    SinkError::Fenced(format!(
        "stream {} is no longer leased to this process (lease {}): another cfaudit holds it",
        fence.stream, fence.lease
    ))
}

/// Text for a column that cannot hold NUL or invalid UTF-8: the exact bytes go next to it.
fn readable(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).replace('\0', "\u{FFFD}")
}

#[async_trait]
impl CheckpointStore for Postgres {
    async fn load(&self, stream: &str) -> Result<CommittedState, SinkError> {
        type Row = (
            Option<DateTime<Utc>>,
            Option<Json<UnfinishedSweep>>,
            Option<DateTime<Utc>>,
            i64,
        );
        let row: Option<Row> = sqlx::query_as(
            "SELECT checkpoint, unfinished_sweep, swept_until, commit_seq FROM cfaudit_checkpoints WHERE account_id = $1",
        )
        .bind(stream)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| sink_error("load checkpoint", e))?;
        Ok(match row {
            Some((checkpoint, unfinished, swept_until, commit_seq)) => CommittedState {
                checkpoint,
                unfinished: unfinished.map(|Json(u)| u),
                swept_until,
                commit_seq: commit_seq as u64,
            },
            None => CommittedState::default(),
        })
    }

    async fn committed_ids(&self, events: &[SeenId]) -> Result<HashSet<String>, SinkError> {
        let (Some(oldest), Some(newest)) = (
            events.iter().map(|e| e.when).min(),
            events.iter().map(|e| e.when).max(),
        ) else {
            return Ok(HashSet::new());
        };
        // A batch of events the index holds nothing near (a backfill, new events) costs one
        // probe of the key's time range instead of one per event.
        let found: Vec<(String,)> = sqlx::query_as(
            "SELECT l.event_id FROM UNNEST($1::timestamptz[], $2::text[]) AS u(t, id) \
             JOIN cfaudit_lake_events l ON l.event_time = u.t AND l.event_id = u.id \
             WHERE EXISTS (SELECT 1 FROM cfaudit_lake_events WHERE event_time BETWEEN $3 AND $4)",
        )
        .bind(events.iter().map(|e| e.when).collect::<Vec<_>>())
        .bind(events.iter().map(|e| e.id.as_str()).collect::<Vec<_>>())
        .bind(oldest)
        .bind(newest)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| sink_error("read the dataset's event index", e))?;
        Ok(found.into_iter().map(|(id,)| id).collect())
    }

    async fn commit(&self, record: &CommitRecord) -> Result<(), SinkError> {
        let stream = &record.fence.stream;
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(|e| sink_error("begin", e))?;
        // Fenced on the lease (a process that lost the stream) and on commit_seq.
        let updated = sqlx::query(
            "UPDATE cfaudit_checkpoints \
               SET checkpoint = $2, unfinished_sweep = $3, swept_until = $4, commit_seq = $5, updated_at = NOW() \
             WHERE account_id = $1 AND commit_seq = $6 AND lease_token = $7",
        )
        .bind(stream)
        .bind(record.state.checkpoint)
        .bind(record.state.unfinished.as_ref().map(Json))
        .bind(record.state.swept_until)
        .bind(record.state.commit_seq as i64)
        .bind(record.previous_commit_seq as i64)
        .bind(record.fence.lease as i64)
        .execute(&mut *tx)
        .await
        .map_err(|e| sink_error("write checkpoint", e))?;
        if updated.rows_affected() != 1 {
            let current: Option<(i64, i64)> = sqlx::query_as(
                "SELECT lease_token, commit_seq FROM cfaudit_checkpoints WHERE account_id = $1",
            )
            .bind(stream)
            .fetch_optional(&mut *tx)
            .await
            .map_err(|e| sink_error("read checkpoint", e))?;
            return Err(match current {
                Some((lease, _)) if lease as u64 != record.fence.lease => SinkError::Fenced(format!(
                    "stream {stream} is leased to another process now (lease {lease}, this process holds {})",
                    record.fence.lease
                )),
                Some((_, seq)) => SinkError::transient(format!(
                    "the checkpoint of stream {stream} moved under us (commit {seq}, expected {})",
                    record.previous_commit_seq
                )),
                None => SinkError::transient(format!("stream {stream} is not registered")),
            });
        }
        if !record.events.is_empty() {
            let e = &record.events;
            // A plain insert (no ON CONFLICT, which costs a second write per row): an event
            // indexed already fails it, and the whole commit with it.
            sqlx::query(
                "INSERT INTO cfaudit_lake_events (event_id, event_time, stream, commit_seq) \
                 SELECT u.id, u.t, $3, $4 FROM UNNEST($1::text[], $2::timestamptz[]) AS u(id, t)",
            )
            .bind(e.iter().map(|x| x.id.as_str()).collect::<Vec<_>>())
            .bind(e.iter().map(|x| x.when).collect::<Vec<_>>())
            .bind(stream)
            .bind(record.state.commit_seq as i64)
            .execute(&mut *tx)
            .await
            .map_err(|error| match &error {
                sqlx::Error::Database(db) if db.code().as_deref() == Some("23505") => {
                    SinkError::Conflict(format!(
                        "an event of the batch is in the dataset already (committed by another \
                         stream or process): {}",
                        db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                            .and_then(|pg| pg.detail())
                            .unwrap_or_else(|| db.message())
                    ))
                }
                _ => sink_error("index the batch's events", error),
            })?;
            if let Some(ingestion_time) = record.ingestion_time {
                // The rows carry the batch's time already, unless another attempt wrote one
                // again after this batch did: such rows are listed by the write that changed
                // them, and only those are set back (a check of an empty list otherwise).
                sqlx::query(
                    "WITH fixed AS (DELETE FROM cfaudit_rewritten_rows r \
                                    USING UNNEST($1::text[], $2::timestamptz[]) AS u(id, t) \
                                    WHERE r.event_time = u.t AND r.event_id = u.id \
                                      AND EXISTS (SELECT 1 FROM cfaudit_rewritten_rows) \
                                    RETURNING r.event_time, r.event_id) \
                     UPDATE audit_logs a SET ingestion_time = $3, account_id = split_part($4, '.', 1) \
                     FROM fixed f \
                     WHERE a.timestamp = f.event_time AND a.event_id = f.event_id \
                       AND (a.ingestion_time IS DISTINCT FROM $3 \
                            OR a.account_id IS DISTINCT FROM split_part($4, '.', 1))",
                )
                .bind(e.iter().map(|x| x.id.as_str()).collect::<Vec<_>>())
                .bind(e.iter().map(|x| x.when).collect::<Vec<_>>())
                .bind(ingestion_time)
                .bind(stream)
                .execute(&mut *tx)
                .await
                .map_err(|e| sink_error("set the batch's ingestion_time", e))?;
            }
        }
        if !record.dead_letters.is_empty() {
            let d = &record.dead_letters;
            sqlx::query(
                "INSERT INTO cfaudit_dead_letters (account_id, reason, raw_event, raw_bytes, first_seen) \
                 SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bytea[], $5::timestamptz[]) \
                 ON CONFLICT DO NOTHING",
            )
            .bind(d.iter().map(|x| x.account_id.as_str()).collect::<Vec<_>>())
            .bind(d.iter().map(|x| readable(x.reason.as_bytes())).collect::<Vec<_>>())
            .bind(d.iter().map(|x| readable(&x.raw_event)).collect::<Vec<_>>())
            .bind(d.iter().map(|x| x.raw_event.as_slice()).collect::<Vec<_>>())
            .bind(d.iter().map(|x| x.first_seen).collect::<Vec<_>>())
            .execute(&mut *tx)
            .await
            .map_err(|e| sink_error("insert dead letters", e))?;
        }
        if !record.files.is_empty() {
            let f = &record.files;
            sqlx::query(
                "INSERT INTO cfaudit_parquet_files (final_path, account_id, commit_seq, staged_path, partition, rows, bytes, lease_token) \
                 SELECT u.final_path, $2, $3, u.staged_path, u.partition, u.rows, u.bytes, $8 \
                 FROM UNNEST($1::text[], $4::text[], $5::text[], $6::bigint[], $7::bigint[]) \
                      AS u(final_path, staged_path, partition, rows, bytes)",
            )
            .bind(f.iter().map(|(_, c)| c.final_path.as_str()).collect::<Vec<_>>())
            .bind(stream)
            .bind(record.state.commit_seq as i64)
            .bind(f.iter().map(|(s, _)| s.staged_path.as_str()).collect::<Vec<_>>())
            .bind(f.iter().map(|(s, _)| s.partition.as_str()).collect::<Vec<_>>())
            .bind(f.iter().map(|(s, _)| s.rows as i64).collect::<Vec<_>>())
            .bind(f.iter().map(|(s, _)| s.bytes as i64).collect::<Vec<_>>())
            .bind(record.fence.lease as i64)
            .execute(&mut *tx)
            .await
            .map_err(|e| sink_error("record parquet files", e))?;
        }
        tx.commit().await.map_err(|e| sink_error("commit", e))
    }

    async fn unpublished(&self, stream: &str) -> Result<Vec<CommittedFile>, SinkError> {
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT staged_path, final_path FROM cfaudit_parquet_files \
             WHERE account_id = $1 AND published_at IS NULL ORDER BY commit_seq, final_path",
        )
        .bind(stream)
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

    async fn forget_lost_file(&self, fence: &Fence, final_path: &str) -> Result<u64, SinkError> {
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(|e| sink_error("begin", e))?;
        let lease: Option<(i64,)> = sqlx::query_as(
            "SELECT lease_token FROM cfaudit_checkpoints WHERE account_id = $1 FOR UPDATE",
        )
        .bind(&fence.stream)
        .fetch_optional(&mut *tx)
        .await
        .map_err(|e| sink_error("read the lease", e))?;
        if lease.map(|(l,)| l as u64) != Some(fence.lease) {
            return Err(SinkError::Fenced(format!(
                "stream {} is leased to another process now",
                fence.stream
            )));
        }
        let file: Option<(i64, String)> = sqlx::query_as(
            "DELETE FROM cfaudit_parquet_files WHERE final_path = $1 AND account_id = $2 \
             RETURNING commit_seq, partition",
        )
        .bind(final_path)
        .bind(&fence.stream)
        .fetch_optional(&mut *tx)
        .await
        .map_err(|e| sink_error("forget the lost file", e))?;
        let Some((commit_seq, partition)) = file else {
            return Ok(0);
        };
        let hour = partition_start(&partition).ok_or_else(|| {
            SinkError::transient(format!("{final_path}: unreadable partition {partition:?}"))
        })?;
        let (events, oldest): (i64, Option<DateTime<Utc>>) = sqlx::query_as(
            "WITH gone AS (DELETE FROM cfaudit_lake_events \
                           WHERE stream = $1 AND commit_seq = $2 AND event_time >= $3 AND event_time < $4 \
                           RETURNING event_time) \
             SELECT count(*), min(event_time) FROM gone",
        )
        .bind(&fence.stream)
        .bind(commit_seq)
        .bind(hour)
        .bind(hour + chrono::Duration::hours(1))
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| sink_error("forget the lost file's events", e))?;
        // Back before them: the stream collects them again; a finished backfill is reopened.
        sqlx::query(
            "UPDATE cfaudit_checkpoints \
               SET checkpoint = CASE WHEN $2::timestamptz IS NULL THEN checkpoint ELSE least(checkpoint, $2) END, \
                   swept_until = CASE WHEN $2::timestamptz IS NULL THEN swept_until ELSE least(swept_until, $2) END, \
                   unfinished_sweep = NULL, completed_at = NULL, commit_seq = commit_seq + 1, updated_at = NOW() \
             WHERE account_id = $1",
        )
        .bind(&fence.stream)
        .bind(oldest)
        .execute(&mut *tx)
        .await
        .map_err(|e| sink_error("move the checkpoint back", e))?;
        tx.commit().await.map_err(|e| sink_error("commit", e))?;
        Ok(events as u64)
    }
}

/// What TimescaleDB does with `audit_logs`: its chunks and its policies.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct TimescaleState {
    pub version: String,
    pub chunks: i64,
    pub compressed_chunks: i64,
    /// The compression policy's age, `None` without one.
    pub compress_after: Option<String>,
    /// The retention policy's age, `None` without one.
    pub drop_after: Option<String>,
}

impl std::fmt::Display for TimescaleState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "TimescaleDB {}: audit_logs in {} chunks ({} compressed); ",
            self.version, self.chunks, self.compressed_chunks
        )?;
        match &self.compress_after {
            Some(age) => write!(f, "compression after {age}; ")?,
            None => write!(f, "no compression policy; ")?,
        }
        match &self.drop_after {
            Some(age) => write!(f, "retention {age}"),
            None => write!(f, "no retention policy"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_show() {
        assert_eq!(
            redacted_url("postgres://u:s3cret@db:5432/cfaudit"),
            "postgres://u:***@db:5432/cfaudit"
        );
        let shown = redacted_url("postgres://u@db/cfaudit?sslmode=require&password=s3cret");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("sslmode=require"), "{shown}");
        let shown = redacted_url("postgres://u@db/cfaudit?PassWord=s3cret");
        assert!(!shown.contains("s3cret"), "{shown}");
    }
}
