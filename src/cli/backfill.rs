//! `cfaudit backfill --since … --until …`: collects an explicit, closed range of the past as
//! its own stream (see [`crate::streams`]), through the same pipeline and commit protocol as the
//! service. Resumable: the same command again continues from the range's checkpoint, and a
//! finished range is not fetched again. It may run beside the service: ranges never overlap.

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

use cfaudit_actors::{ApiVersion, Metrics, SourceKey};
use chrono::{DateTime, SubsecRound, Utc};
use serde::Serialize;
use tracing::info;

use crate::app::{holder_name, Adapters};
use crate::settings::{ConfigError, Settings};
use crate::sinks::postgres::LeaseSession;
use crate::streams::{backfill_key, live_key, Stream};

/// What a backfill did, printed as one JSON line.
#[derive(Debug, Serialize)]
pub struct BackfillSummary {
    pub stream: String,
    pub since: DateTime<Utc>,
    pub until: DateTime<Utc>,
    /// Whether the range was already complete before this run (nothing was fetched).
    pub already_complete: bool,
    pub checkpoint: Option<DateTime<Utc>>,
    /// Rows of the account in PostgreSQL within the range.
    pub rows_in_postgres: i64,
    pub parquet_files: i64,
    pub parquet_rows: i64,
}

fn range_error(flag: &str, problem: String, fix: String) -> anyhow::Error {
    ConfigError {
        key: flag.to_owned(),
        problem,
        fix,
    }
    .into()
}

/// Runs the backfill of `[since, until)`; `until` defaults to where the live stream starts
/// (or now, before the service ever ran). Progress goes to a bar on a terminal and to log
/// lines otherwise.
pub async fn backfill(
    config: Settings,
    since: DateTime<Utc>,
    until: Option<DateTime<Utc>>,
    api_version: Option<ApiVersion>,
    account: Option<&str>,
) -> anyhow::Result<BackfillSummary> {
    let api_version = which_version(&config, api_version)?;
    let adapters = Adapters::open(&config, true).await?;
    let account = adapters.account(account)?;
    let live = live_key(&account, api_version);
    // Whole seconds: the default --until (now) must pass the range check itself.
    let now = Utc::now().trunc_subsecs(0);
    let stream = adapters
        .postgres
        .register_stream(&live, |streams| {
            let live_stream = streams.iter().find(|s| s.key == live);
            let until = until
                .or_else(|| live_stream.and_then(|l| l.covers_since))
                .unwrap_or(now);
            check_range(since, until, now)?;
            let key = backfill_key(&live, since, until);
            if let Some(other) = streams
                .iter()
                .find(|s| s.key != key && s.overlaps(since, until))
            {
                return Err(overlap_error(other, since, until));
            }
            Ok((key, since, Some(until)))
        })
        .await?;
    let until = stream.covers_until.expect("a backfill is bounded");
    if stream.completed_at.is_some() {
        info!(stream = %stream.key, "this range is already complete; nothing to fetch");
        return summarize(&adapters, &stream, true).await;
    }
    info!(stream = %stream.key, %since, %until, resume_from = ?stream.checkpoint, "backfill started");

    let source = SourceKey::new(&account, api_version);
    let progress = Progress::start(adapters.metrics.clone(), source.clone(), since, until);
    let session = LeaseSession::open(&adapters.postgres, &holder_name()).await?;
    let outcome = adapters.collect_once(&config, &session, &stream).await;
    session.close().await;
    progress.finish();
    let reached = adapters
        .metrics
        .health
        .checkpoints
        .lock()
        .unwrap()
        .get(&source)
        .copied()
        .or(stream.checkpoint);
    if outcome? {
        anyhow::bail!(
            "interrupted; what is committed stays. Run the same command again to resume from {}",
            reached.map_or("the start".to_owned(), |c| c.to_rfc3339())
        );
    }
    adapters.postgres.complete_stream(&stream.key).await?;
    adapters.postgres.refresh_aggregates(since, until).await;
    let stream = Stream {
        checkpoint: reached,
        ..stream
    };
    summarize(&adapters, &stream, false).await
}

/// The version to backfill: the one asked for, or the one configured.
fn which_version(config: &Settings, asked: Option<ApiVersion>) -> anyhow::Result<ApiVersion> {
    let configured = &config.cloudflare.api_versions.0;
    match (asked, configured.as_slice()) {
        (Some(version), _) => Ok(version),
        (None, [only]) => Ok(*only),
        (None, _) => Err(range_error(
            "--api-version",
            format!(
                "CLOUDFLARE_API_VERSIONS names {}: which one to backfill is not clear",
                config.cloudflare.api_versions
            ),
            "give --api-version v1 or --api-version v2 (each version is a backfill of its own)"
                .into(),
        )),
    }
}

fn check_range(
    since: DateTime<Utc>,
    until: DateTime<Utc>,
    now: DateTime<Utc>,
) -> anyhow::Result<()> {
    if since >= until {
        return Err(range_error(
            "--since",
            format!("{since} is not before --until {until}"),
            "give a --since earlier than --until (when --until is left out, it is where the live service started, or now)".into(),
        ));
    }
    if until > now {
        return Err(range_error(
            "--until",
            format!("{until} is in the future"),
            "a backfill covers the past; leave --until out or give a time before now (the service collects what comes next)".into(),
        ));
    }
    for (flag, time) in [("--since", since), ("--until", until)] {
        if time.timestamp_subsec_nanos() != 0 {
            return Err(range_error(
                flag,
                format!("{time} has a fraction of a second"),
                "give whole seconds, e.g. 2026-01-31T00:00:00Z or 2026-01-31".into(),
            ));
        }
    }
    Ok(())
}

fn overlap_error(other: &Stream, since: DateTime<Utc>, until: DateTime<Utc>) -> anyhow::Error {
    let what = if other.is_live() {
        "the live service's stream".to_owned()
    } else {
        format!("the backfill {}", other.key)
    };
    let fix = match (other.covers_since, other.covers_until) {
        (Some(start), _) if since < start => {
            format!("use --until {} or earlier", start.to_rfc3339())
        }
        (_, Some(end)) => format!("use --since {} or later", end.to_rfc3339()),
        _ => "choose a range before the live stream's start".into(),
    };
    range_error(
        "--since/--until",
        format!(
            "[{}, {}) overlaps {what}, which covers {}; two streams over the same events would write them twice to Parquet",
            since.to_rfc3339(),
            until.to_rfc3339(),
            other.range()
        ),
        fix,
    )
}

async fn summarize(
    adapters: &Adapters,
    stream: &Stream,
    already_complete: bool,
) -> anyhow::Result<BackfillSummary> {
    let (since, until) = (
        stream.covers_since.expect("registered with a start"),
        stream.covers_until.expect("a backfill is bounded"),
    );
    let (rows_in_postgres, parquet_files, parquet_rows) =
        adapters.postgres.backfill_counts(stream).await?;
    Ok(BackfillSummary {
        stream: stream.key.clone(),
        since,
        until,
        already_complete,
        checkpoint: stream.checkpoint,
        rows_in_postgres,
        parquet_files,
        parquet_rows,
    })
}

/// Reports progress from the pipeline's metrics: a bar on a terminal, a log line every 10 s
/// otherwise. The fraction is the committed checkpoint's position in the range.
struct Progress {
    task: tokio::task::JoinHandle<()>,
    bar: Option<indicatif::ProgressBar>,
}

impl Progress {
    fn start(
        metrics: Arc<Metrics>,
        source: SourceKey,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Progress {
        let total = (until - since).num_seconds().max(1) as u64;
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(total);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {wide_bar} {percent:>3}% {msg}",
                )
                .expect("a valid template"),
            );
            bar
        });
        let shown = bar.clone();
        let task = tokio::spawn(async move {
            let tick = if shown.is_some() { 250 } else { 10_000 };
            let mut interval = tokio::time::interval(Duration::from_millis(tick));
            loop {
                interval.tick().await;
                let checkpoint = metrics
                    .health
                    .checkpoints
                    .lock()
                    .unwrap()
                    .get(&source)
                    .copied();
                let covered = checkpoint.map_or(0, |c| {
                    (c - since).num_seconds().clamp(0, total as i64) as u64
                });
                let events = metrics
                    .events_written
                    .with_label_values(&["postgres"])
                    .get()
                    + metrics
                        .events_already_stored
                        .with_label_values(&["postgres"])
                        .get();
                let at = checkpoint.map_or("the start".to_owned(), |c| {
                    c.format("%Y-%m-%d %H:%M:%S").to_string()
                });
                match &shown {
                    Some(bar) => {
                        bar.set_position(covered);
                        bar.set_message(format!("{events} events, at {at}"));
                    }
                    None => info!(
                        percent = covered * 100 / total,
                        events,
                        checkpoint = %at,
                        "backfill progress"
                    ),
                }
            }
        });
        Progress { task, bar }
    }

    fn finish(self) {
        self.task.abort();
        if let Some(bar) = self.bar {
            bar.finish_and_clear();
        }
    }
}
