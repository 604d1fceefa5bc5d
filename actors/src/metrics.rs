//! Prometheus metrics of the pipeline and the health facts `/readyz` reads.
//! One registry, created once and shared: adapters register nothing of their own.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};

use crate::event::ApiVersion;

use prometheus::GaugeVec;
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

/// One account's audit log of one API version: what the per-account series and health facts
/// are kept by (labels `account` and `api_version`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceKey {
    pub account: String,
    pub api_version: ApiVersion,
}

impl SourceKey {
    pub fn new(account: &str, api_version: ApiVersion) -> SourceKey {
        SourceKey {
            account: account.to_owned(),
            api_version,
        }
    }

    fn labels(&self) -> [&str; 2] {
        [&self.account, self.api_version.as_str()]
    }
}

impl std::fmt::Display for SourceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.account, self.api_version)
    }
}

/// The `cfaudit_api_retries_total` reason of an answer that is not the answer to its request
/// (stale, repeated, or without the event read at the bound).
pub(crate) const OUT_OF_PLACE: &str = "out_of_place";

/// Every metric cfaudit exports. Names follow Prometheus conventions with a `cfaudit_` prefix.
pub struct Metrics {
    pub registry: Registry,
    pub mailbox_depth: IntGaugeVec,
    pub messages_handled: IntCounterVec,
    pub handler_duration: HistogramVec,
    pub restarts: IntCounterVec,
    pub events_fetched: IntCounterVec,
    pub events_written: IntCounterVec,
    pub events_already_stored: IntCounterVec,
    pub events_deduplicated: IntCounterVec,
    pub events_dead_lettered: IntCounterVec,
    pub api_requests: IntCounterVec,
    pub api_request_duration: Histogram,
    pub api_rate_limited: IntCounter,
    pub api_ratelimit_remaining: IntGaugeVec,
    pub api_retries: IntCounterVec,
    pub batches_committed: IntCounterVec,
    pub pipeline_rewinds: IntCounterVec,
    pub checkpoint_timestamp: GaugeVec,
    pub checkpoint_lag: GaugeVec,
    pub last_successful_sweep: GaugeVec,
    pub auth_failed: IntGaugeVec,
    pub parquet_files_published: IntCounter,
    pub health: PipelineHealth,
}

fn reg<C: prometheus::core::Collector + Clone + 'static>(registry: &Registry, c: C) -> C {
    registry
        .register(Box::new(c.clone()))
        .expect("metric names are unique");
    c
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let r = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            reg(
                &r,
                IntCounterVec::new(Opts::new(name, help), labels).unwrap(),
            )
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            reg(&r, GaugeVec::new(Opts::new(name, help), labels).unwrap())
        };
        let duration_buckets = prometheus::exponential_buckets(0.0005, 2.5, 14).unwrap();
        Arc::new(Metrics {
            mailbox_depth: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "cfaudit_actor_mailbox_depth",
                        "Messages sent to the actor and not yet handled.",
                    ),
                    &["actor"],
                )
                .unwrap(),
            ),
            messages_handled: counter(
                "cfaudit_actor_messages_handled_total",
                "Messages the actor started handling.",
                &["actor"],
            ),
            handler_duration: reg(
                &r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "cfaudit_actor_handler_duration_seconds",
                        "Time from the start of a handler to its reply, async work included.",
                    )
                    .buckets(duration_buckets.clone()),
                    &["actor"],
                )
                .unwrap(),
            ),
            restarts: counter(
                "cfaudit_actor_restarts_total",
                "Times the supervisor restarted the actor.",
                &["actor"],
            ),
            events_fetched: counter(
                "cfaudit_events_fetched_total",
                "Events received from the API, before deduplication.",
                &["account", "api_version"],
            ),
            events_written: counter(
                "cfaudit_events_written_total",
                "Events newly written per sink (Postgres rows inserted, Parquet rows staged).",
                &["sink"],
            ),
            events_already_stored: counter(
                "cfaudit_events_already_stored_total",
                "Rows the sink already held (primary-key conflicts), skipped.",
                &["sink"],
            ),
            events_deduplicated: counter(
                "cfaudit_events_deduplicated_total",
                "Events dropped before the writers because they were already committed or in flight.",
                &["account", "api_version"],
            ),
            events_dead_lettered: counter(
                "cfaudit_events_dead_lettered_total",
                "Events that could not be mapped and went to the dead-letter table.",
                &["account", "api_version"],
            ),
            api_requests: counter(
                "cfaudit_api_requests_total",
                "Cloudflare API requests by HTTP status class (2xx, 4xx, 429, 5xx, error).",
                &["status_class"],
            ),
            api_request_duration: reg(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "cfaudit_api_request_duration_seconds",
                        "Cloudflare API request latency, body included.",
                    )
                    .buckets(duration_buckets),
                )
                .unwrap(),
            ),
            api_rate_limited: reg(
                &r,
                IntCounter::new("cfaudit_api_rate_limited_total", "HTTP 429 answers.").unwrap(),
            ),
            api_ratelimit_remaining: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "cfaudit_api_ratelimit_remaining",
                        "Requests left in the token's current window, from the Ratelimit header (-1: unknown).",
                    ),
                    &["token"],
                )
                .unwrap(),
            ),
            api_retries: counter(
                "cfaudit_api_retries_total",
                "Page requests retried, by reason (out_of_place: an answer that is not the \
                 answer to the request, asked again).",
                &["reason"],
            ),
            batches_committed: counter(
                "cfaudit_batches_committed_total",
                "Batches committed after both sinks acknowledged them.",
                &["account", "api_version"],
            ),
            pipeline_rewinds: counter(
                "cfaudit_pipeline_rewinds_total",
                "Times the pipeline dropped uncommitted batches and resumed from the checkpoint.",
                &["account", "api_version"],
            ),
            checkpoint_timestamp: gauge(
                "cfaudit_checkpoint_timestamp_seconds",
                "The committed checkpoint (largest committed event time), Unix seconds.",
                &["account", "api_version"],
            ),
            checkpoint_lag: gauge(
                "cfaudit_checkpoint_lag_seconds",
                "Now minus the committed checkpoint, refreshed at every scrape.",
                &["account", "api_version"],
            ),
            last_successful_sweep: gauge(
                "cfaudit_last_successful_sweep_timestamp_seconds",
                "When the last sweep finished with everything committed, Unix seconds.",
                &["account", "api_version"],
            ),
            auth_failed: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "cfaudit_auth_failed",
                        "1 while polling of the account is stopped by an authentication error.",
                    ),
                    &["account", "api_version"],
                )
                .unwrap(),
            ),
            parquet_files_published: reg(
                &r,
                IntCounter::new(
                    "cfaudit_parquet_files_published_total",
                    "Parquet files moved from staging into the dataset.",
                )
                .unwrap(),
            ),
            health: PipelineHealth::default(),
            registry: r,
        })
    }

    /// Creates every labelled series of an account's log at zero, so dashboards and alerts see 0
    /// rather than nothing before the first rewind, retry or auth failure (a query on a series
    /// that does not exist yet returns no data, and `increase()` misses its first step).
    pub fn expose_source(&self, source: &SourceKey) {
        for family in [
            &self.events_fetched,
            &self.events_deduplicated,
            &self.events_dead_lettered,
            &self.batches_committed,
            &self.pipeline_rewinds,
        ] {
            family.with_label_values(&source.labels());
        }
        self.auth_failed.with_label_values(&source.labels()).set(0);
        for reason in ["rate_limited", "transient", "bad_request", OUT_OF_PLACE] {
            self.api_retries.with_label_values(&[reason]);
        }
    }

    /// The same for one sink's series.
    pub fn expose_sink(&self, sink: &str) {
        self.events_written.with_label_values(&[sink]);
        self.events_already_stored.with_label_values(&[sink]);
    }

    /// The per-actor handles, labelled once.
    pub fn actor(&self, actor: &'static str) -> ActorMetrics {
        ActorMetrics {
            depth: self.mailbox_depth.with_label_values(&[actor]),
            handled: self.messages_handled.with_label_values(&[actor]),
            duration: self.handler_duration.with_label_values(&[actor]),
            restarts: self.restarts.with_label_values(&[actor]),
        }
    }

    pub fn set_checkpoint(&self, source: &SourceKey, checkpoint: DateTime<Utc>) {
        let seconds = checkpoint.timestamp_micros() as f64 / 1e6;
        self.checkpoint_timestamp
            .with_label_values(&source.labels())
            .set(seconds);
        self.health
            .checkpoints
            .lock()
            .unwrap()
            .insert(source.clone(), checkpoint);
        self.refresh_lag(Utc::now());
    }

    /// Recomputes `cfaudit_checkpoint_lag_seconds`; called before each scrape.
    pub fn refresh_lag(&self, now: DateTime<Utc>) {
        for (source, checkpoint) in self.health.checkpoints.lock().unwrap().iter() {
            let lag = (now - *checkpoint).num_milliseconds() as f64 / 1e3;
            self.checkpoint_lag
                .with_label_values(&source.labels())
                .set(lag);
        }
    }

    /// The per-source handles, labelled once.
    pub fn source(&self, source: &SourceKey) -> SourceMetrics {
        let labels = source.labels();
        SourceMetrics {
            events_fetched: self.events_fetched.with_label_values(&labels),
            events_deduplicated: self.events_deduplicated.with_label_values(&labels),
            events_dead_lettered: self.events_dead_lettered.with_label_values(&labels),
            batches_committed: self.batches_committed.with_label_values(&labels),
            pipeline_rewinds: self.pipeline_rewinds.with_label_values(&labels),
            last_successful_sweep: self.last_successful_sweep.with_label_values(&labels),
            auth_failed: self.auth_failed.with_label_values(&labels),
        }
    }
}

/// Facts `/readyz` and `cfaudit status` read.
#[derive(Default)]
pub struct PipelineHealth {
    pub checkpoints: Mutex<HashMap<SourceKey, DateTime<Utc>>>,
    pub last_successful_sweep: Mutex<HashMap<SourceKey, DateTime<Utc>>>,
    /// Logs whose polling is stopped by an authentication error, with the reason.
    pub auth_failures: Mutex<HashMap<SourceKey, String>>,
    /// Logs whose pipeline is rewinding after a failure (a sink down, a failed commit), with
    /// the last reason; cleared by the next commit.
    pub sink_failures: Mutex<HashMap<SourceKey, String>>,
}

/// One source's series, labelled once (`account`, `api_version`).
#[derive(Clone)]
pub struct SourceMetrics {
    pub events_fetched: IntCounter,
    pub events_deduplicated: IntCounter,
    pub events_dead_lettered: IntCounter,
    pub batches_committed: IntCounter,
    pub pipeline_rewinds: IntCounter,
    pub last_successful_sweep: prometheus::Gauge,
    pub auth_failed: IntGauge,
}

/// One actor's metrics. Depth is "sent − started handling": actix has no queue-length API.
#[derive(Clone)]
pub struct ActorMetrics {
    depth: IntGauge,
    handled: IntCounter,
    duration: Histogram,
    pub restarts: IntCounter,
}

impl ActorMetrics {
    /// Call when a message is put into the actor's mailbox.
    pub fn enqueued(&self) {
        self.depth.inc();
    }

    /// Call at the start of a handler; the guard records the duration when dropped, so move
    /// it into the handler's future to time async work too.
    pub fn handling(&self) -> HandlerTimer {
        self.depth.dec();
        self.handled.inc();
        HandlerTimer(Some(self.duration.start_timer()))
    }
}

pub struct HandlerTimer(Option<prometheus::HistogramTimer>);

impl Drop for HandlerTimer {
    fn drop(&mut self) {
        if let Some(timer) = self.0.take() {
            timer.observe_duration();
        }
    }
}
