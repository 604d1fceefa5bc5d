//! Start-up and the run loop: build the adapters from the configuration, start the pipeline,
//! and stop it cleanly on a signal or, with `--once`, after one committed sweep.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use cfaudit_actors::{
    ApiVersion, CheckpointStore, Clock, Metrics, ParquetTarget, PgTarget, Pipeline, PipelineEvent,
    PipelineParts,
};
use chrono::{DateTime, Utc};
use tracing::{info, warn};

use crate::settings::{DatabaseSettings, Settings, TokenAccounts};
use crate::sinks::lake::ParquetLake;
use crate::sinks::postgres::{AggregateRefresher, Lease, LeaseSession, Postgres};
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
#[derive(Clone)]
pub struct Adapters {
    /// The accounts collected, in order.
    pub accounts: Vec<String>,
    pub metrics: Arc<Metrics>,
    pub postgres: Postgres,
    pub lake: Arc<ParquetLake>,
    /// Every credential configured, with its client and request budget.
    pub tokens: Arc<Vec<TokenSource>>,
    /// Which of `tokens` collects each account.
    token_of: HashMap<String, usize>,
    /// Batch slots shared by every pipeline (`MAX_INFLIGHT_BATCHES_TOTAL`).
    process_budget: Arc<tokio::sync::Semaphore>,
    /// TimescaleDB's aggregates, materialized behind every pipeline's commits.
    pub refresher: AggregateRefresher,
}

/// One credential, with its client (and so its request budget) and its accounts.
pub struct TokenSource {
    pub accounts: TokenAccounts,
    pub client: Arc<CloudflareClient>,
}

impl TokenSource {
    /// Its accounts: those named for it, then, with discovery on, every other account the
    /// token is a member of (`GET /accounts`), in the order listed.
    async fn accounts(&self) -> anyhow::Result<Vec<String>> {
        let mut accounts = self.accounts.listed.clone();
        if !self.accounts.discover {
            return Ok(accounts);
        }
        let listed = self.client.list_accounts().await.map_err(|error| {
            anyhow::anyhow!(
                "listing the accounts of token {} failed: {error}. Fix: check the token and \
                 CLOUDFLARE_API_BASE_URL, or name its accounts instead of discovering them",
                self.accounts.label
            )
        })?;
        for account in listed {
            if !accounts.contains(&account) {
                accounts.push(account);
            }
        }
        Ok(accounts)
    }
}

/// The accounts of every token, each with the index of the first token that has it. A token
/// whose listing fails keeps the accounts it had in `known` and those named for it; only when
/// that leaves no account at all is it an error.
pub async fn discover_accounts(
    tokens: &[TokenSource],
    known: &HashMap<String, usize>,
) -> anyhow::Result<Vec<(String, usize)>> {
    let mut found: Vec<(String, usize)> = Vec::new();
    let mut failed = None;
    for (index, token) in tokens.iter().enumerate() {
        let accounts = match token.accounts().await {
            Ok(accounts) => accounts,
            Err(error) => {
                warn!(
                    error = format!("{error:#}"),
                    token = %token.accounts.label,
                    "collecting the accounts this token had until a listing succeeds"
                );
                failed.get_or_insert(error);
                let mut had: Vec<String> = known
                    .iter()
                    .filter(|(_, t)| **t == index)
                    .map(|(a, _)| a.clone())
                    .collect();
                had.sort_unstable();
                let mut kept = token.accounts.listed.clone();
                kept.extend(
                    had.into_iter()
                        .filter(|a| !token.accounts.listed.contains(a)),
                );
                kept
            }
        };
        for account in accounts {
            if !found.iter().any(|(a, _)| *a == account) {
                found.push((account, index));
            }
        }
    }
    match failed {
        Some(error) if found.is_empty() => Err(error),
        _ => Ok(found),
    }
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

impl Adapters {
    /// Connects to the database (applying the migrations unless told not to), the object
    /// store and the API client.
    pub async fn open(config: &Settings, migrate: bool) -> anyhow::Result<Adapters> {
        // Checked before any connection: a configuration error is told first.
        config.cloudflare.tokens()?;
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
        let tokens = config
            .cloudflare
            .tokens()?
            .into_iter()
            .map(|accounts| {
                let client = CloudflareClient::new(&config.cloudflare, &accounts, metrics.clone())?;
                Ok(TokenSource {
                    accounts,
                    client: Arc::new(client),
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let found = discover_accounts(&tokens, &HashMap::new()).await?;
        let refresher = AggregateRefresher::start(&postgres);
        let mut adapters = Adapters {
            accounts: Vec::new(),
            metrics,
            postgres,
            lake,
            tokens: Arc::new(tokens),
            token_of: HashMap::new(),
            process_budget: Arc::new(tokio::sync::Semaphore::new(
                config.pipeline.max_inflight_batches_total,
            )),
            refresher,
        };
        adapters.set_accounts(found);
        Ok(adapters)
    }

    /// The accounts collected and the token of each, as [`discover_accounts`] found them.
    pub fn set_accounts(&mut self, found: Vec<(String, usize)>) {
        self.accounts = found.iter().map(|(a, _)| a.clone()).collect();
        self.token_of = found.into_iter().collect();
    }

    /// Which token collects each account, by index in `tokens`.
    pub fn token_of(&self) -> &HashMap<String, usize> {
        &self.token_of
    }

    /// The client of the token that collects `account`.
    pub fn source(&self, account: &str) -> Arc<CloudflareClient> {
        let token = self.token_of.get(account).copied().unwrap_or_else(|| {
            panic!("account {account} is collected, so some token was found for it")
        });
        self.tokens[token].client.clone()
    }

    /// Divides every token's request budget among `replicas` processes.
    pub fn share_budget(&self, replicas: u32) {
        for token in self.tokens.iter() {
            token.client.share_budget(replicas);
        }
    }

    /// The one account configured; commands that act on one account (a backfill) name it
    /// with `--account` where several are configured.
    pub fn account(&self, asked: Option<&str>) -> anyhow::Result<String> {
        match (asked, self.accounts.as_slice()) {
            (Some(asked), accounts) if accounts.iter().any(|a| a == asked) => Ok(asked.to_owned()),
            (Some(asked), accounts) => Err(crate::settings::config_error(
                "--account",
                format!("{asked} is not among the accounts configured"),
                format!("name one of {}", accounts.join(", ")),
            )
            .into()),
            (None, [only]) => Ok(only.clone()),
            (None, accounts) => Err(crate::settings::config_error(
                "--account",
                format!(
                    "{} accounts are configured: which one is not clear",
                    accounts.len()
                ),
                format!("name one of {}", accounts.join(", ")),
            )
            .into()),
        }
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
        let account = stream.account();
        Pipeline::start(PipelineParts {
            poller: config.poller(
                account,
                stream.api_version(),
                stream.covers_since,
                stream.covers_until,
                once,
            ),
            checkpointer: config.checkpointer(account, stream.api_version(), &stream.key, lease),
            source: self.source(account),
            sinks: vec![
                Arc::new(PgTarget(Arc::new(self.postgres.clone()))),
                Arc::new(ParquetTarget(self.lake.clone())),
            ],
            files: self.lake.clone(),
            store: Arc::new(self.postgres.clone()),
            metrics: self.metrics.clone(),
            clock: Clock::system(),
            rng_seed: None,
            process_budget: Some(self.process_budget.clone()),
        })
    }

    /// Collects `stream` once, under its lease in `session`, to the end of its window (a
    /// backfill's range, or now for a live stream): the stream held by another process is
    /// refused, with who holds it. `Ok(true)` when a signal cut it short.
    pub async fn collect_once(
        &self,
        config: &Settings,
        session: &LeaseSession,
        stream: &Stream,
    ) -> anyhow::Result<bool> {
        let mut signals = Signals::new()?;
        let mut lease = match session.try_lease(&stream.key).await? {
            Ok(lease) => lease,
            Err(busy) => anyhow::bail!(
                "stream {} is being collected by {busy}: another cfaudit (a service replica, `run --once` or the same backfill) holds it, and two processes on one stream would interfere. Stop it, or run this again when it has finished",
                stream.key
            ),
        };
        info!(stream = %stream.key, lease = lease.token, holder = %session.holder(), "stream leased");
        let mut pipeline = self.start_pipeline(config, stream, true, lease.token);
        let end = drive(
            &mut pipeline,
            true,
            self,
            &stream.key,
            &mut lease,
            signals.recv(),
        )
        .await;
        if let Ok(RunEnd::Lost(reason)) = end {
            pipeline.halt();
            lease.release().await;
            anyhow::bail!("{reason}; run the command again once the other process has finished");
        }
        if matches!(end, Ok(RunEnd::Stopped)) {
            info!(
                timeout = ?config.service.shutdown_timeout,
                "signal received: no new pages; committing what is in flight"
            );
        }
        if !pipeline.shutdown(config.service.shutdown_timeout).await {
            warn!(timeout = ?config.service.shutdown_timeout, "in-flight batches did not commit in time; they are abandoned and fetched again next run");
        }
        lease.release().await;
        end.map(|end| end == RunEnd::Stopped)
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
    /// Asked to stop: a signal, or the stream handed over to another replica.
    Stopped,
    /// Another process holds the stream now.
    Lost(String),
}

/// Registers the live stream of one account's log of one API version: it starts at
/// INITIAL_CHECKPOINT (default one poll interval ago), or after the log's latest backfill if
/// one ends later; a committed stream keeps its start.
pub async fn register_live_stream(
    postgres: &Postgres,
    config: &Settings,
    account: &str,
    api_version: ApiVersion,
) -> anyhow::Result<Stream> {
    let wanted = config.sweep.initial_checkpoint.unwrap_or_else(|| {
        Utc::now() - chrono::Duration::from_std(config.sweep.poll_interval).unwrap_or_default()
    });
    let key = live_key(account, api_version);
    let stream = postgres
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

/// The live streams of the configuration: each account's log of each API version.
pub async fn register_live_streams(
    adapters: &Adapters,
    config: &Settings,
) -> anyhow::Result<Vec<Stream>> {
    let mut streams = Vec::new();
    for account in &adapters.accounts {
        for &api_version in &config.cloudflare.api_versions.0 {
            streams.push(
                register_live_stream(&adapters.postgres, config, account, api_version).await?,
            );
        }
    }
    Ok(streams)
}

/// Runs the service until a signal, or with `once` one sweep of every live stream up to now;
/// then the counts of each account (`once` only: a service stopped by SIGTERM while its
/// database is down still exits cleanly). Every stream is collected on its own: one that
/// fails (an account the token may not read, a deleted account) is reported and never stops
/// the others.
pub async fn run(config: Settings, options: RunOptions) -> anyhow::Result<Vec<RunSummary>> {
    let adapters = Adapters::open(&config, !options.skip_migrations).await?;
    let streams = register_live_streams(&adapters, &config).await?;
    if !options.once {
        crate::service::serve(adapters, config, streams).await?;
        return Ok(Vec::new());
    }
    let session = LeaseSession::open(&adapters.postgres, &holder_name()).await?;
    let collecting = streams.iter().map(|stream| {
        info!(account = %stream.account(), api_version = %stream.api_version(), once = true,
            start = ?stream.covers_since, "collecting");
        adapters.collect_once(&config, &session, stream)
    });
    let outcomes = futures::future::join_all(collecting).await;
    session.close().await;
    let mut failures = Vec::new();
    let mut interrupted = false;
    for (stream, outcome) in streams.iter().zip(outcomes) {
        match outcome {
            Ok(cut_short) => interrupted |= cut_short,
            Err(error) => failures.push(format!("stream {}: {error:#}", stream.key)),
        }
    }
    if !failures.is_empty() {
        anyhow::bail!(
            "{} of {} streams failed (the others completed): {}",
            failures.len(),
            streams.len(),
            failures.join("; ")
        );
    }
    let mut summaries = Vec::new();
    for account in &adapters.accounts {
        let own: Vec<Stream> = streams
            .iter()
            .filter(|s| s.account() == account)
            .cloned()
            .collect();
        summaries.push(summary(&adapters.postgres, account, &own, interrupted).await?);
    }
    Ok(summaries)
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
/// window; otherwise `stop`), recording each completed sweep of `stream` and having the
/// aggregates refreshed behind the commits.
pub async fn drive(
    pipeline: &mut Pipeline,
    once: bool,
    adapters: &Adapters,
    stream: &str,
    lease: &mut Lease,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<RunEnd> {
    let mut stop = std::pin::pin!(stop);
    loop {
        tokio::select! {
            event = pipeline.next_event() => match event {
                Some(PipelineEvent::SweepCompleted { account_id, checkpoint }) => {
                    info!(account = %account_id, %stream, ?checkpoint, "sweep committed");
                    if let Err(error) = adapters.postgres.record_sweep(stream).await {
                        warn!(%error, "could not record the sweep's time (cfaudit status shows it)");
                    }
                    if once {
                        adapters.refresher.refresh().await;
                        return Ok(RunEnd::Done);
                    }
                    adapters.refresher.request();
                }
                Some(PipelineEvent::EventsCommitted) => adapters.refresher.request(),
                Some(PipelineEvent::Failed { reason }) => anyhow::bail!("run failed: {reason}"),
                Some(PipelineEvent::Fenced { reason }) => return Ok(RunEnd::Lost(reason)),
                Some(PipelineEvent::Drained) => {}
                None => anyhow::bail!("the pipeline stopped unexpectedly"),
            },
            reason = lease.lost() => return Ok(RunEnd::Lost(reason)),
            _ = &mut stop => return Ok(RunEnd::Stopped),
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
