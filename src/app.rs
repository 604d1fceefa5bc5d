//! Start-up and the run loop: build the adapters from the configuration, start the pipeline,
//! and stop it cleanly on a signal or, with `--once`, after one committed sweep.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use cfaudit_actors::{
    ApiVersion, CheckpointStore, Clock, Metrics, ParquetTarget, PgTarget, Pipeline, PipelineEvent,
    PipelineParts,
};
use chrono::{DateTime, Utc};
use tracing::{info, warn};

use crate::settings::{DatabaseSettings, Settings};
use crate::sinks::lake::ParquetLake;
use crate::sinks::postgres::{Lease, Postgres};
use crate::sources::cloudflare::CloudflareClient;
use crate::streams::{live_key, live_start, Stream};

#[derive(Clone, Copy, Debug, Default)]
pub struct RunOptions {
    /// One sweep up to now, commit, return.
    pub once: bool,
    /// Do not apply migrations at start.
    pub skip_migrations: bool,
}

/// What a run did, for the `--once` summary (printed as one JSON line).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RunSummary {
    pub account_id: String,
    /// The oldest checkpoint of the versions collected: everything before it is committed.
    pub checkpoint: Option<DateTime<Utc>>,
    /// Each version's live checkpoint.
    pub checkpoints: BTreeMap<String, Option<DateTime<Utc>>>,
    pub rows_in_postgres: i64,
    pub parquet_files: i64,
    pub parquet_rows: i64,
    pub dead_letters: i64,
    pub interrupted: bool,
}

/// The adapters a pipeline runs on, opened from the configuration.
pub struct Adapters {
    pub account_id: String,
    pub metrics: Arc<Metrics>,
    pub postgres: Postgres,
    pub lake: Arc<ParquetLake>,
    pub source: Arc<CloudflareClient>,
}

/// Forgets the indexed events the API no longer has; a failure only delays that.
async fn prune_event_index(postgres: &Postgres) {
    match postgres.prune_event_index().await {
        Ok(0) => {}
        Ok(pruned) => info!(
            pruned,
            "forgot indexed events older than the API's retention"
        ),
        Err(error) => {
            warn!(%error, "could not prune the dataset's event index; it is retried at the next start")
        }
    }
}

/// Brings the dashboards' aggregates up to date where their own refresh policy does not look;
/// a failure only delays that to the next sweep.
async fn refresh_settled_aggregates(postgres: &Postgres) {
    if let Err(error) = postgres.refresh_settled_aggregates().await {
        warn!(%error, "could not refresh the dashboards' aggregates older than their policy's window; retried after the next sweep");
    }
}

impl Adapters {
    /// Connects to the database (applying the migrations unless told not to), the object
    /// store and the API client.
    pub async fn open(config: &Settings, migrate: bool) -> anyhow::Result<Adapters> {
        let account_id = config.cloudflare.require_source()?.to_owned();
        for warning in config.warnings() {
            warn!("{warning}");
        }
        let metrics = Metrics::new();
        if migrate {
            // Without the statement timeout: a migration may take longer than one statement
            // of the pipeline should.
            let admin = Postgres::connect(&config.database.url, 1, None).await?;
            admin.migrate().await?;
            apply_policies(&admin, &config.database).await?;
            prune_event_index(&admin).await;
            admin.pool().close().await;
        }
        let postgres = Postgres::connect(
            &config.database.url,
            config.database.max_connections,
            Some(config.pipeline.sink_timeout),
        )
        .await?;
        if !migrate {
            // In the background, where no connection is open already for it.
            let pruning = postgres.clone();
            tokio::spawn(async move { prune_event_index(&pruning).await });
        }
        let lake = Arc::new(ParquetLake::open(&config.lake)?);
        lake.check_layout()?;
        let source = Arc::new(CloudflareClient::new(&config.cloudflare, metrics.clone())?);
        Ok(Adapters {
            account_id,
            metrics,
            postgres,
            lake,
            source,
        })
    }

    /// Starts the pipeline on one stream under `lease`; `once` ends it after the first sweep
    /// that reaches the end of its window.
    pub fn start_pipeline(
        &self,
        config: &Settings,
        stream: &Stream,
        once: bool,
        lease: u64,
    ) -> Pipeline {
        Pipeline::start(PipelineParts {
            poller: config.poller(
                &self.account_id,
                stream.api_version(),
                stream.covers_since,
                stream.covers_until,
                once,
            ),
            checkpointer: config.checkpointer(
                &self.account_id,
                stream.api_version(),
                &stream.key,
                lease,
            ),
            source: self.source.clone(),
            sinks: vec![
                Arc::new(PgTarget(Arc::new(self.postgres.clone()))),
                Arc::new(ParquetTarget(self.lake.clone())),
            ],
            files: self.lake.clone(),
            store: Arc::new(self.postgres.clone()),
            metrics: self.metrics.clone(),
            clock: Clock::system(),
            rng_seed: None,
        })
    }

    /// Collects `stream` under its lease until the run ends: with `once`, the first sweep
    /// that reaches the end of its window; otherwise a signal. A lease lost to another process
    /// halts the pipeline; the service then waits to take the stream again, `once` fails.
    /// `Ok(true)` when a signal cut it short.
    pub async fn collect(
        &self,
        config: &Settings,
        stream: &Stream,
        once: bool,
    ) -> anyhow::Result<bool> {
        let holder = holder_name();
        let mut signals = Signals::new()?;
        let timeout = config.service.shutdown_timeout;
        loop {
            let Some(mut lease) = self.lease(stream, &holder, once, &mut signals).await? else {
                return Ok(true);
            };
            info!(stream = %stream.key, lease = lease.token, holder = %holder, "stream leased");
            let mut pipeline = self.start_pipeline(config, stream, once, lease.token);
            let end = drive(
                &mut pipeline,
                once,
                &self.postgres,
                &stream.key,
                &mut lease,
                &mut signals,
            )
            .await;
            match end {
                Ok(RunEnd::Lost(reason)) => {
                    pipeline.halt();
                    lease.release().await;
                    if once {
                        anyhow::bail!(
                            "{reason}; run the command again once the other process has finished"
                        );
                    }
                    warn!(stream = %stream.key, %reason, "the stream was taken over; waiting to take it again");
                    continue;
                }
                end => {
                    if matches!(end, Ok(RunEnd::Signal)) {
                        info!(
                            ?timeout,
                            "signal received: no new pages; committing what is in flight"
                        );
                    }
                    if !pipeline.shutdown(timeout).await {
                        warn!(?timeout, "in-flight batches did not commit in time; they are abandoned and fetched again next run");
                    }
                    lease.release().await;
                    return end.map(|end| end == RunEnd::Signal);
                }
            }
        }
    }

    /// The stream's lease. Held by another process: `once` refuses with who holds it, the
    /// service waits (a rolling update: the old process lets go when it stops). `None` when
    /// a signal came while waiting.
    async fn lease(
        &self,
        stream: &Stream,
        holder: &str,
        once: bool,
        signals: &mut Signals,
    ) -> anyhow::Result<Option<Lease>> {
        let mut told = None;
        loop {
            let wait = match self.postgres.try_lease(&stream.key, holder).await {
                Ok(Ok(lease)) => return Ok(Some(lease)),
                Ok(Err(busy)) if once => anyhow::bail!(
                    "stream {} is being collected by {busy}: another cfaudit (a service replica, `run --once` or the same backfill) holds it, and two processes on one stream would interfere. Stop it, or run this again when it has finished",
                    stream.key
                ),
                Ok(Err(busy)) => {
                    let now = std::time::Instant::now();
                    if told.is_none_or(|at: std::time::Instant| now - at > Duration::from_secs(60)) {
                        info!(stream = %stream.key, holder = %busy,
                            "the stream is held by another process; waiting to take it over when it stops");
                        told = Some(now);
                    }
                    Duration::from_secs(1)
                }
                Err(error) if once => return Err(error),
                Err(error) => {
                    warn!(%error, stream = %stream.key, "could not take the stream's lease; retrying");
                    Duration::from_secs(5)
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = signals.recv() => return Ok(None),
            }
        }
    }
}

/// Who this process is, for the leases it holds: host and process id.
pub fn holder_name() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown-host".into());
    format!("{host}:{}", std::process::id())
}

/// SIGTERM and SIGINT.
pub struct Signals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl Signals {
    pub fn new() -> std::io::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
        })
    }

    pub async fn recv(&mut self) {
        tokio::select! {
            _ = self.terminate.recv() => {}
            _ = self.interrupt.recv() => {}
        }
    }
}

/// How a run of the pipeline ended.
#[derive(Debug, PartialEq, Eq)]
pub enum RunEnd {
    /// `once`: a sweep reached the end of its window.
    Done,
    Signal,
    /// Another process holds the stream now.
    Lost(String),
}

/// Registers the live stream of one API version: it starts at INITIAL_CHECKPOINT (default one
/// poll interval ago), or after the version's latest backfill if one ends later; a committed
/// stream keeps its start.
async fn register_live_stream(
    adapters: &Adapters,
    config: &Settings,
    api_version: ApiVersion,
) -> anyhow::Result<Stream> {
    let wanted = config.sweep.initial_checkpoint.unwrap_or_else(|| {
        Utc::now() - chrono::Duration::from_std(config.sweep.poll_interval).unwrap_or_default()
    });
    let account = adapters.account_id.clone();
    let key = live_key(&account, api_version);
    let stream = adapters
        .postgres
        .register_stream(&key, |streams| {
            let start = live_start(wanted, streams);
            let fresh = !streams.iter().any(|s| s.key == key && s.checkpoint.is_some());
            let last_backfill = streams.iter().filter_map(|s| s.covers_until).max();
            match last_backfill {
                _ if !fresh => {}
                Some(_) if start != wanted => warn!(account = %account, %wanted, %start,
                    "INITIAL_CHECKPOINT falls inside a backfilled range: the live stream starts where the latest backfill ends"),
                Some(end) if end < start => {
                    let (from, to) = (end.to_rfc3339(), start.to_rfc3339());
                    warn!(account = %account, "events from {from} to {to} are in no stream (after the latest backfill, before the live stream's start): collect them with `cfaudit backfill --since {from} --until {to}`");
                }
                _ => {}
            }
            Ok((key.clone(), start, None))
        })
        .await?;
    Ok(stream)
}

/// Runs the service until a signal (or one sweep with `once`). The counts summary is for
/// `--once` only: a service stopped by SIGTERM while its database is down still exits cleanly.
pub async fn run(config: Settings, options: RunOptions) -> anyhow::Result<Option<RunSummary>> {
    let adapters = Adapters::open(&config, !options.skip_migrations).await?;
    let mut streams = Vec::new();
    for &api_version in &config.cloudflare.api_versions.0 {
        streams.push(register_live_stream(&adapters, &config, api_version).await?);
    }
    let account_id = adapters.account_id.clone();

    let http = if options.once {
        None
    } else {
        let state = crate::http::HealthState {
            metrics: adapters.metrics.clone(),
            database: Postgres::lazy_pool(&config.database.url)?,
            max_sweep_age: config.sweep.poll_interval * 3
                + config.cloudflare.request_timeout * 4
                + Duration::from_secs(60),
            started: Utc::now(),
        };
        let (addr, server) = crate::http::serve(config.service.metrics_addr, state)?;
        info!(%addr, "serving /metrics, /healthz and /readyz");
        let handle = server.handle();
        actix_rt::spawn(server);
        Some(handle)
    };

    // Each API version is a stream of its own, collected side by side (one request budget).
    // The first stream to fail ends the run, the others cut short as by a crash (they resume
    // from their checkpoints): a failed stream must not stop silently while another runs on.
    let collecting = streams.iter().map(|stream| {
        info!(account = %account_id, api_version = %stream.api_version(), once = options.once,
            start = ?stream.covers_since, "collecting");
        adapters.collect(&config, stream, options.once)
    });
    let outcome = futures::future::try_join_all(collecting).await;
    if let Some(handle) = http {
        handle.stop(true).await;
    }
    let interrupted = outcome?.into_iter().any(|interrupted| interrupted);
    if !options.once {
        return Ok(None);
    }
    summary(&adapters.postgres, &account_id, &streams, interrupted)
        .await
        .map(Some)
}

/// TimescaleDB's compression and retention policies from the configuration.
pub async fn apply_policies(
    postgres: &Postgres,
    database: &DatabaseSettings,
) -> anyhow::Result<()> {
    let (compress, retention) = (
        database.timescale_compress_after_days,
        database.retention_days,
    );
    if postgres
        .apply_timescale_policies(compress, retention)
        .await?
    {
        info!(
            compress_after_days = compress,
            retention_days = retention,
            "TimescaleDB policies applied"
        );
    } else {
        info!("plain PostgreSQL (no TimescaleDB): audit_logs is neither compressed nor pruned; see README");
    }
    Ok(())
}

/// Waits for the end of the run (with `once`, the first sweep that reaches the end of its
/// window), recording each completed sweep of `stream`.
pub async fn drive(
    pipeline: &mut Pipeline,
    once: bool,
    postgres: &Postgres,
    stream: &str,
    lease: &mut Lease,
    signals: &mut Signals,
) -> anyhow::Result<RunEnd> {
    // In the background, one at a time: a first refresh over a long backlog takes a while,
    // and signals and a lost lease must still be heard meanwhile.
    let mut refreshing: Option<tokio::task::JoinHandle<()>> = None;
    loop {
        tokio::select! {
            event = pipeline.next_event() => match event {
                Some(PipelineEvent::SweepCompleted { account_id, checkpoint }) => {
                    info!(account = %account_id, ?checkpoint, "sweep committed");
                    if let Err(error) = postgres.record_sweep(stream).await {
                        warn!(%error, "could not record the sweep's time (cfaudit status shows it)");
                    }
                    if once {
                        refresh_settled_aggregates(postgres).await;
                        return Ok(RunEnd::Done);
                    }
                    if refreshing.as_ref().is_none_or(|r| r.is_finished()) {
                        let postgres = postgres.clone();
                        refreshing = Some(tokio::spawn(async move {
                            refresh_settled_aggregates(&postgres).await
                        }));
                    }
                }
                Some(PipelineEvent::Failed { reason }) => anyhow::bail!("run failed: {reason}"),
                Some(PipelineEvent::Fenced { reason }) => return Ok(RunEnd::Lost(reason)),
                Some(PipelineEvent::Drained) => {}
                None => anyhow::bail!("the pipeline stopped unexpectedly"),
            },
            reason = lease.lost() => return Ok(RunEnd::Lost(reason)),
            _ = signals.recv() => return Ok(RunEnd::Signal),
        }
    }
}

/// Counts of what is committed for the account, over all its streams (live and backfills, of
/// every version), with the checkpoints of the live `streams` collected.
pub async fn summary(
    postgres: &Postgres,
    account_id: &str,
    streams: &[Stream],
    interrupted: bool,
) -> anyhow::Result<RunSummary> {
    let counts = postgres.account_counts(account_id).await?;
    let mut checkpoints = BTreeMap::new();
    for stream in streams {
        let state = postgres.load(&stream.key).await?;
        checkpoints.insert(stream.api_version().to_string(), state.checkpoint);
    }
    Ok(RunSummary {
        account_id: account_id.to_owned(),
        // Everything before it is committed, whichever version.
        checkpoint: checkpoints.values().copied().min().flatten(),
        checkpoints,
        rows_in_postgres: counts.rows_in_postgres,
        parquet_files: counts.parquet_files,
        parquet_rows: counts.parquet_rows,
        dead_letters: counts.dead_letters,
        interrupted,
    })
}
