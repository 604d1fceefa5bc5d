//! Configuration: built-in defaults < TOML file (`--config` / `CFAUDIT_CONFIG`) < environment.
//!
//! The struct is the reference: every field is one setting, its environment variable is the
//! field name in upper case (the names of the original spec, e.g. `POLL_INTERVAL_SECONDS`), and
//! the TOML file uses the field name as written. the README lists them all (a test keeps it complete).

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use cfaudit_actors::Direction;
use chrono::{DateTime, NaiveDate, Utc};
use figment::providers::{Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

/// A value that must never reach a log, an error or a metric.
#[derive(Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Every setting of cfaudit.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Config {
    /// API token with "Account Settings: Read" (sent as `Authorization: Bearer`).
    /// Also read from the file named by `CLOUDFLARE_API_TOKEN_FILE`.
    pub cloudflare_api_token: Option<Secret>,
    /// Legacy global API key auth: the account e-mail (`X-Auth-Email`), with `CLOUDFLARE_API_KEY`.
    pub cloudflare_api_email: Option<String>,
    /// Legacy global API key (`X-Auth-Key`). Also from `CLOUDFLARE_API_KEY_FILE`.
    pub cloudflare_api_key: Option<Secret>,
    /// The account whose audit logs are collected (32 hex characters).
    pub cloudflare_account_id: Option<String>,
    /// API base URL; point it at the emulator for demos and tests.
    pub cloudflare_api_base_url: String,
    /// Seconds between the end of one sweep and the start of the next.
    pub poll_interval_seconds: u64,
    /// Events per page, 1–1000.
    pub cloudflare_per_page: u32,
    /// `asc` (checkpoint advances page by page) or `desc` (only when a sweep is complete).
    pub cloudflare_direction: Direction,
    /// Each sweep re-reads this many seconds before the checkpoint, for late events; the
    /// overlap is deduplicated.
    pub cloudflare_since_safety_lag_seconds: u64,
    /// Sends `hide_user_logs=true`: leaves out user-level events such as logins.
    pub cloudflare_hide_user_logs: bool,
    /// Timeout of one API request, body included.
    pub cloudflare_request_timeout_seconds: u64,
    /// Client-side request budget per 5 minutes, kept below Cloudflare's 1,200 (whose breach
    /// blocks the token for 5 minutes). At most `budget + burst` requests go out in any
    /// 5-minute window.
    pub cloudflare_requests_per_5_minutes: u32,
    /// Requests that may go out back to back before the budget's pace applies.
    pub cloudflare_request_burst: u32,
    /// The longest wait the API may impose through `retry-after` or its `Ratelimit` reset; a
    /// longer one (a broken proxy) is cut to this.
    pub cloudflare_max_retry_after_seconds: u64,
    /// A response body larger than this is not read; the page is asked for again in smaller
    /// pages.
    pub cloudflare_max_response_bytes: u64,
    /// Where a fresh account starts: RFC 3339 time or `YYYY-MM-DD`. Default: one poll
    /// interval ago. Ignored once a checkpoint is committed.
    pub initial_checkpoint: Option<String>,
    /// PostgreSQL/TimescaleDB URL. Also from `DATABASE_URL_FILE`.
    pub database_url: Secret,
    /// Maximum connections in the database pool.
    pub database_max_connections: u32,
    /// TimescaleDB only: compress `audit_logs` chunks older than this many days (0: never).
    pub timescale_compress_after_days: u32,
    /// TimescaleDB only: drop `audit_logs` chunks older than this many days (0: keep all).
    /// On plain PostgreSQL nothing is dropped (README, "TimescaleDB and plain PostgreSQL", shows how to prune).
    pub retention_days: u32,
    /// Parquet dataset root as an object_store URL: `file:///path` or `s3://bucket/prefix`.
    pub parquet_url: String,
    /// Address of the HTTP server for `/metrics`, `/healthz` and `/readyz`.
    pub metrics_addr: SocketAddr,
    /// Batches fetched but not yet committed, at most. Bounds memory when a sink is slow.
    pub max_inflight_batches: usize,
    /// Pages are coalesced into one batch (one commit, one Parquet file per touched hour) of
    /// up to this many events…
    pub batch_max_events: usize,
    /// …or this many bytes of raw JSON. Memory in flight is bounded by
    /// `MAX_INFLIGHT_BATCHES × BATCH_MAX_BYTES`.
    pub batch_max_bytes: usize,
    /// A batch not acknowledged by every writer within this many seconds is retried.
    pub ack_timeout_seconds: u64,
    /// Every database statement and every storage call gives up after this many seconds (a
    /// lock held on `audit_logs`, a stalled request), and the batch is retried.
    pub sink_timeout_seconds: u64,
    /// A sweep stops after this many pages (protects against an API that repeats pages).
    pub max_pages_per_sweep: u32,
    /// `run --once` gives up after this many failed attempts of one page.
    pub once_max_attempts: u32,
    /// First retry delay after an API or sink error; doubles, with jitter…
    pub retry_initial_millis: u64,
    /// …up to this.
    pub retry_max_seconds: u64,
    /// On SIGTERM/SIGINT, in-flight batches get this long to commit before exit.
    pub shutdown_timeout_seconds: u64,
    /// `text`, `json`, or `auto` (text on a terminal, JSON otherwise). The level comes from
    /// `RUST_LOG` (default `info,sqlx=warn`).
    pub log_format: String,
    /// Object-store options: every `AWS_*` variable of the environment (lower-cased), passed
    /// to object_store as it is (`AWS_ENDPOINT`, `AWS_ALLOW_HTTP`, `AWS_ACCESS_KEY_ID`, …).
    #[serde(skip)]
    pub storage_options: Vec<(String, Secret)>,
}

impl Default for Config {
    fn default() -> Self {
        let parquet_dir = std::env::current_dir()
            .unwrap_or_else(|_| "/var/lib/cfaudit".into())
            .join("data/parquet");
        Config {
            cloudflare_api_token: None,
            cloudflare_api_email: None,
            cloudflare_api_key: None,
            cloudflare_account_id: None,
            cloudflare_api_base_url: "https://api.cloudflare.com/client/v4".into(),
            poll_interval_seconds: 60,
            cloudflare_per_page: 1000,
            cloudflare_direction: Direction::Asc,
            cloudflare_since_safety_lag_seconds: 120,
            cloudflare_hide_user_logs: false,
            cloudflare_request_timeout_seconds: 30,
            cloudflare_requests_per_5_minutes: 1000,
            cloudflare_request_burst: 100,
            cloudflare_max_retry_after_seconds: 600,
            cloudflare_max_response_bytes: 128 << 20,
            initial_checkpoint: None,
            database_url: Secret::new("postgres://postgres@127.0.0.1:5432/cfaudit"),
            database_max_connections: 8,
            timescale_compress_after_days: 30,
            retention_days: 90,
            parquet_url: format!("file://{}", parquet_dir.display()),
            metrics_addr: "127.0.0.1:9464".parse().expect("valid"),
            max_inflight_batches: 4,
            batch_max_events: 10_000,
            batch_max_bytes: 32 << 20,
            ack_timeout_seconds: 300,
            sink_timeout_seconds: 120,
            max_pages_per_sweep: 100_000,
            once_max_attempts: 8,
            retry_initial_millis: 500,
            retry_max_seconds: 60,
            shutdown_timeout_seconds: 30,
            log_format: "auto".into(),
            storage_options: Vec::new(),
        }
    }
}

/// The environment variable of each setting: the field name in upper case.
pub const KEYS: &[&str] = &[
    "cloudflare_api_token",
    "cloudflare_api_email",
    "cloudflare_api_key",
    "cloudflare_account_id",
    "cloudflare_api_base_url",
    "poll_interval_seconds",
    "cloudflare_per_page",
    "cloudflare_direction",
    "cloudflare_since_safety_lag_seconds",
    "cloudflare_hide_user_logs",
    "cloudflare_request_timeout_seconds",
    "cloudflare_requests_per_5_minutes",
    "cloudflare_request_burst",
    "cloudflare_max_retry_after_seconds",
    "cloudflare_max_response_bytes",
    "initial_checkpoint",
    "database_url",
    "database_max_connections",
    "timescale_compress_after_days",
    "retention_days",
    "parquet_url",
    "metrics_addr",
    "max_inflight_batches",
    "batch_max_events",
    "batch_max_bytes",
    "ack_timeout_seconds",
    "sink_timeout_seconds",
    "max_pages_per_sweep",
    "once_max_attempts",
    "retry_initial_millis",
    "retry_max_seconds",
    "shutdown_timeout_seconds",
    "log_format",
];

/// Cloudflare's request limit per token and 5 minutes.
pub const CLOUDFLARE_REQUESTS_PER_5_MINUTES: u64 = 1200;

/// The default of a setting, as written in a configuration.
fn default_of(key: &str) -> String {
    match &serde_json::to_value(Config::default()).expect("plain data")[key] {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Secrets that may be given as a path in `<NAME>_FILE` instead.
const FILE_SECRETS: &[&str] = &["cloudflare_api_token", "cloudflare_api_key", "database_url"];

/// A configuration error, always naming the setting and the fix.
#[derive(Debug, thiserror::Error)]
#[error("configuration: {key}: {problem}. Fix: {fix}")]
pub struct ConfigError {
    pub key: String,
    pub problem: String,
    pub fix: String,
}

fn config_error(key: &str, problem: impl Into<String>, fix: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.to_uppercase(),
        problem: problem.into(),
        fix: fix.into(),
    }
}

impl Config {
    /// Loads defaults, then the TOML file if given, then the environment.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_from(file, std::env::vars())
    }

    /// As [`Config::load`], with an explicit environment (tests).
    pub fn load_from(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let env: Vec<(String, String)> = env.into_iter().collect();
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(file) = file {
            if !file.exists() {
                return Err(config_error(
                    "CFAUDIT_CONFIG",
                    format!("the file {} does not exist", file.display()),
                    "give the path of a TOML file, or leave it unset",
                ));
            }
            figment = figment.merge(Toml::file(file));
        }
        for (name, value) in &env {
            let key = name.to_lowercase();
            if KEYS.contains(&key.as_str()) && !value.is_empty() {
                figment = figment.merge((key.clone(), value.clone()));
            }
            if let Some(secret) = key
                .strip_suffix("_file")
                .filter(|k| FILE_SECRETS.contains(k))
            {
                let content = std::fs::read_to_string(value).map_err(|e| {
                    config_error(
                        name,
                        format!("cannot read {value}: {e}"),
                        "point it at a readable file holding the secret",
                    )
                })?;
                figment = figment.merge((secret.to_owned(), content.trim().to_owned()));
            }
        }
        let mut config: Config = figment.extract_lossy().map_err(|e| {
            let key = e.path.join(".");
            config_error(&key, e.kind.to_string(), fix_for(&key))
        })?;
        config.storage_options = env
            .iter()
            .filter(|(name, _)| name.starts_with("AWS_"))
            .map(|(name, value)| (name.to_lowercase(), Secret::new(value.clone())))
            .collect();
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=1000).contains(&self.cloudflare_per_page) {
            return Err(config_error(
                "cloudflare_per_page",
                format!("{} is out of range", self.cloudflare_per_page),
                "use a value from 1 to 1000 (the API's maximum)",
            ));
        }
        if self.poll_interval_seconds == 0 {
            return Err(config_error(
                "poll_interval_seconds",
                "0 would poll in a busy loop",
                "use 1 or more",
            ));
        }
        if self.batch_max_events == 0 || self.batch_max_bytes == 0 {
            return Err(config_error(
                "batch_max_events",
                "0 would make empty batches",
                "use 1 or more (default 10000; BATCH_MAX_BYTES default 33554432)",
            ));
        }
        if self.cloudflare_requests_per_5_minutes == 0 || self.cloudflare_request_burst == 0 {
            return Err(config_error(
                "cloudflare_requests_per_5_minutes",
                "0 would never send a request",
                "use 1 or more (defaults: 1000 per 5 minutes, burst 100: at most 1100 in any window, below Cloudflare's 1200)",
            ));
        }
        let at_least_one: [(&str, u64, &str); 6] = [
            ("max_inflight_batches", self.max_inflight_batches as u64, "0 would never fetch"),
            ("max_pages_per_sweep", self.max_pages_per_sweep.into(), "0 pages would never sweep"),
            ("ack_timeout_seconds", self.ack_timeout_seconds, "0 s would fail every batch before its writers could answer"),
            ("sink_timeout_seconds", self.sink_timeout_seconds, "0 s would fail every write"),
            ("once_max_attempts", self.once_max_attempts.into(), "0 attempts would never try"),
            ("cloudflare_max_retry_after_seconds", self.cloudflare_max_retry_after_seconds, "0 s would retry a rate-limited token at once, which prolongs Cloudflare's 5-minute block"),
        ];
        for (key, value, problem) in at_least_one {
            if value == 0 {
                return Err(config_error(
                    key,
                    problem,
                    format!("use 1 or more (default {})", default_of(key)),
                ));
            }
        }
        if self.cloudflare_max_response_bytes < 1 << 20 {
            return Err(config_error(
                "cloudflare_max_response_bytes",
                format!(
                    "{} bytes cannot hold a page of events",
                    self.cloudflare_max_response_bytes
                ),
                "use 1048576 (1 MiB) or more (default 134217728)",
            ));
        }
        if self.cloudflare_request_timeout_seconds == 0 {
            return Err(config_error(
                "cloudflare_request_timeout_seconds",
                "0 is no timeout",
                "use 1 or more",
            ));
        }
        url::Url::parse(&self.cloudflare_api_base_url).map_err(|e| {
            config_error(
                "cloudflare_api_base_url",
                e.to_string(),
                "give an absolute URL such as https://api.cloudflare.com/client/v4",
            )
        })?;
        url::Url::parse(&self.parquet_url).map_err(|e| {
            config_error(
                "parquet_url",
                e.to_string(),
                "give a URL such as file:///var/lib/cfaudit/parquet or s3://bucket/prefix",
            )
        })?;
        if !matches!(self.log_format.as_str(), "auto" | "text" | "json") {
            return Err(config_error(
                "log_format",
                format!("{:?} is unknown", self.log_format),
                "use auto, text or json",
            ));
        }
        self.initial_checkpoint()?;
        Ok(())
    }

    /// Settings that work but that an operator should hear about at start.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        let most = u64::from(self.cloudflare_requests_per_5_minutes)
            + u64::from(self.cloudflare_request_burst);
        if most > CLOUDFLARE_REQUESTS_PER_5_MINUTES {
            warnings.push(format!(
                "CLOUDFLARE_REQUESTS_PER_5_MINUTES={} with CLOUDFLARE_REQUEST_BURST={} allows {most} requests in 5 minutes, \
                 above Cloudflare's {CLOUDFLARE_REQUESTS_PER_5_MINUTES} per token: past it Cloudflare blocks every call of the \
                 token for 5 minutes (HTTP 429). Keep it only with a raised limit from Cloudflare, or against an emulator",
                self.cloudflare_requests_per_5_minutes, self.cloudflare_request_burst
            ));
        }
        warnings
    }

    /// Checks what polling needs: credentials and an account id.
    pub fn require_source(&self) -> Result<(), ConfigError> {
        match &self.cloudflare_account_id {
            None => {
                return Err(config_error(
                    "cloudflare_account_id",
                    "not set",
                    "set it to the 32-hex account id from the dashboard URL",
                ))
            }
            Some(id) if id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric()) => {
                return Err(config_error(
                    "cloudflare_account_id",
                    format!("{id:?} is not an account id"),
                    "use the 32-hex account id from the dashboard URL",
                ));
            }
            Some(_) => {}
        }
        let key_auth = self.cloudflare_api_email.is_some() && self.cloudflare_api_key.is_some();
        if self.cloudflare_api_token.is_none() && !key_auth {
            return Err(config_error(
                "cloudflare_api_token",
                "not set",
                "create an API token with 'Account Settings: Read' and set CLOUDFLARE_API_TOKEN (or CLOUDFLARE_API_TOKEN_FILE)",
            ));
        }
        Ok(())
    }

    pub fn initial_checkpoint(&self) -> Result<Option<DateTime<Utc>>, ConfigError> {
        let Some(value) = self.initial_checkpoint.as_deref() else {
            return Ok(None);
        };
        if let Some(time) = parse_time(value) {
            return Ok(Some(time));
        }
        Err(config_error(
            "initial_checkpoint",
            format!("{value:?} is neither an RFC 3339 time nor a date"),
            "use e.g. 2026-01-31T00:00:00Z or 2026-01-31",
        ))
    }

    pub fn poll_interval(&self) -> Duration {
        Duration::from_secs(self.poll_interval_seconds)
    }

    pub fn safety_lag(&self) -> Duration {
        Duration::from_secs(self.cloudflare_since_safety_lag_seconds)
    }

    pub fn sink_timeout(&self) -> Duration {
        Duration::from_secs(self.sink_timeout_seconds)
    }

    pub fn backoff(&self) -> cfaudit_actors::Backoff {
        cfaudit_actors::Backoff {
            initial: Duration::from_millis(self.retry_initial_millis.max(1)),
            max: Duration::from_secs(self.retry_max_seconds.max(1)),
        }
    }
}

/// A point in time as operators write it: RFC 3339, or a date meaning its midnight UTC.
pub fn parse_time(value: &str) -> Option<DateTime<Utc>> {
    if let Ok(time) = DateTime::parse_from_rfc3339(value) {
        return Some(time.with_timezone(&Utc));
    }
    NaiveDate::parse_from_str(value, "%Y-%m-%d")
        .ok()
        .map(|date| date.and_hms_opt(0, 0, 0).expect("midnight").and_utc())
}

fn fix_for(key: &str) -> String {
    match key {
        "cloudflare_direction" => "use asc or desc".into(),
        "cloudflare_hide_user_logs" => "use true or false".into(),
        "metrics_addr" => "use host:port, e.g. 0.0.0.0:9464".into(),
        k if k.ends_with("_seconds")
            || k.ends_with("_millis")
            || k.starts_with("max_")
            || k.ends_with("_page")
            || k.ends_with("_attempts")
            || k.ends_with("_connections") =>
        {
            "use a whole number".into()
        }
        _ => "see the Configuration section of README.md".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_original_env_names_work() {
        let config = Config::load_from(
            None,
            env(&[
                ("CLOUDFLARE_API_TOKEN", "tok"),
                ("CLOUDFLARE_ACCOUNT_ID", "abc123"),
                ("POLL_INTERVAL_SECONDS", "15"),
                ("CLOUDFLARE_PER_PAGE", "250"),
                ("CLOUDFLARE_DIRECTION", "desc"),
                ("CLOUDFLARE_SINCE_SAFETY_LAG_SECONDS", "30"),
                ("CLOUDFLARE_HIDE_USER_LOGS", "true"),
                ("CLOUDFLARE_REQUEST_TIMEOUT_SECONDS", "9"),
                ("INITIAL_CHECKPOINT", "2026-01-02"),
                ("PATH", "/usr/bin"),
            ]),
        )
        .unwrap();
        assert_eq!(
            config.cloudflare_api_token.as_ref().unwrap().expose(),
            "tok"
        );
        assert_eq!(config.cloudflare_account_id.as_deref(), Some("abc123"));
        assert_eq!(config.poll_interval_seconds, 15);
        assert_eq!(config.cloudflare_per_page, 250);
        assert_eq!(config.cloudflare_direction, Direction::Desc);
        assert_eq!(config.cloudflare_since_safety_lag_seconds, 30);
        assert!(config.cloudflare_hide_user_logs);
        assert_eq!(config.cloudflare_request_timeout_seconds, 9);
        assert_eq!(
            config.initial_checkpoint().unwrap().unwrap().to_rfc3339(),
            "2026-01-02T00:00:00+00:00"
        );
        config.require_source().unwrap();
    }

    #[test]
    fn env_overrides_file_overrides_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("cfaudit.toml");
        std::fs::write(
            &file,
            "poll_interval_seconds = 7\ncloudflare_per_page = 10\n",
        )
        .unwrap();
        let config = Config::load_from(Some(&file), env(&[("CLOUDFLARE_PER_PAGE", "20")])).unwrap();
        assert_eq!(config.poll_interval_seconds, 7);
        assert_eq!(config.cloudflare_per_page, 20);
        assert_eq!(config.cloudflare_since_safety_lag_seconds, 120);
    }

    #[test]
    fn bad_values_name_the_key_and_the_fix() {
        let cases = [
            ("POLL_INTERVAL_SECONDS", "soon", "POLL_INTERVAL_SECONDS"),
            ("CLOUDFLARE_PER_PAGE", "5000", "CLOUDFLARE_PER_PAGE"),
            ("CLOUDFLARE_DIRECTION", "sideways", "CLOUDFLARE_DIRECTION"),
            (
                "CLOUDFLARE_HIDE_USER_LOGS",
                "maybe",
                "CLOUDFLARE_HIDE_USER_LOGS",
            ),
            ("INITIAL_CHECKPOINT", "last tuesday", "INITIAL_CHECKPOINT"),
            ("METRICS_ADDR", "nowhere", "METRICS_ADDR"),
        ];
        for (name, value, key) in cases {
            let error = Config::load_from(None, env(&[(name, value)])).unwrap_err();
            assert_eq!(error.key, key, "{error}");
            assert!(error.to_string().contains("Fix: "), "{error}");
        }
    }

    #[test]
    fn settings_that_cannot_work_are_refused_by_name() {
        for name in [
            "MAX_PAGES_PER_SWEEP",
            "ACK_TIMEOUT_SECONDS",
            "SINK_TIMEOUT_SECONDS",
            "MAX_INFLIGHT_BATCHES",
            "ONCE_MAX_ATTEMPTS",
            "CLOUDFLARE_MAX_RETRY_AFTER_SECONDS",
        ] {
            let error = Config::load_from(None, env(&[(name, "0")])).unwrap_err();
            assert_eq!(error.key, name, "{error}");
            assert!(error.fix.contains("1 or more"), "{error}");
        }
        let error =
            Config::load_from(None, env(&[("CLOUDFLARE_MAX_RESPONSE_BYTES", "100")])).unwrap_err();
        assert_eq!(error.key, "CLOUDFLARE_MAX_RESPONSE_BYTES");
    }

    #[test]
    fn a_budget_above_cloudflares_limit_is_allowed_but_warned_about() {
        let config = Config::load_from(None, env(&[])).unwrap();
        assert!(
            config.warnings().is_empty(),
            "the defaults stay below the limit"
        );
        let config =
            Config::load_from(None, env(&[("CLOUDFLARE_REQUESTS_PER_5_MINUTES", "5000")])).unwrap();
        let warnings = config.warnings();
        assert_eq!(warnings.len(), 1);
        assert!(
            warnings[0].contains("5 minutes") && warnings[0].contains("1200"),
            "{warnings:?}"
        );
    }

    #[test]
    fn missing_credentials_are_named() {
        let config = Config::load_from(None, env(&[("CLOUDFLARE_ACCOUNT_ID", "abc")])).unwrap();
        let error = config.require_source().unwrap_err();
        assert_eq!(error.key, "CLOUDFLARE_API_TOKEN");
        let config = Config::load_from(None, env(&[("CLOUDFLARE_API_TOKEN", "t")])).unwrap();
        assert_eq!(
            config.require_source().unwrap_err().key,
            "CLOUDFLARE_ACCOUNT_ID"
        );
    }

    #[test]
    fn secrets_from_files_and_never_in_debug() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "s3cr3t-token\n").unwrap();
        let config = Config::load_from(
            None,
            env(&[("CLOUDFLARE_API_TOKEN_FILE", file.to_str().unwrap())]),
        )
        .unwrap();
        assert_eq!(
            config.cloudflare_api_token.as_ref().unwrap().expose(),
            "s3cr3t-token"
        );
        assert!(!format!("{config:?}").contains("s3cr3t"));
    }
}

#[cfg(test)]
mod docs {
    //! The configuration reference is generated from the struct above: each field's doc
    //! comment and its default. The README's table, `cfaudit.env` (systemd) and the
    //! environment-variable list cannot drift from it: this test fails when they differ, and
    //! `UPDATE_DOCS=1 cargo test -p cfaudit --lib docs` rewrites them.

    use super::*;

    /// `(field, doc)` of every field of `Config`, in order, read from this file.
    fn fields() -> Vec<(String, String)> {
        let source = include_str!("config.rs");
        let start = source.find("pub struct Config {").unwrap();
        let body = &source[start..source[start..].find("\n}\n").unwrap() + start];
        let mut fields = Vec::new();
        let mut doc: Vec<&str> = Vec::new();
        for line in body.lines().skip(1).map(str::trim) {
            if let Some(text) = line.strip_prefix("///") {
                doc.push(text.trim());
            } else if let Some(field) = line.strip_prefix("pub ") {
                let name = field.split(':').next().unwrap().to_owned();
                assert!(!doc.is_empty(), "Config::{name} has no doc comment");
                fields.push((name, doc.join(" ")));
                doc.clear();
            }
        }
        fields
    }

    /// The default as an operator writes it; computed defaults are named in words.
    fn default_of(key: &str) -> String {
        match key {
            "initial_checkpoint" => "one poll interval ago".into(),
            "parquet_url" => "`file://$PWD/data/parquet`".into(),
            _ => match &serde_json::to_value(Config::default()).unwrap()[key] {
                serde_json::Value::Null => "—".into(),
                serde_json::Value::String(s) => format!("`{s}`"),
                other => format!("`{other}`"),
            },
        }
    }

    fn readme_table() -> String {
        let mut out = String::from("| environment variable | default | meaning |\n|---|---|---|\n");
        for (name, doc) in fields() {
            let env = if name == "storage_options" {
                "AWS_*".into()
            } else {
                name.to_uppercase()
            };
            let default = if name == "storage_options" {
                "—".into()
            } else {
                default_of(&name)
            };
            out.push_str(&format!(
                "| `{env}` | {default} | {} |\n",
                doc.replace('|', "\\|")
            ));
        }
        out
    }

    /// The systemd environment file: every setting, commented out at its default.
    fn env_file() -> String {
        let head = include_str!("../cfaudit.env");
        let head = &head[..head
            .find(GENERATED)
            .expect("cfaudit.env has the generated marker")];
        let mut out = format!("{head}{GENERATED}\n");
        for (name, doc) in fields()
            .into_iter()
            .filter(|(n, _)| KEYS.contains(&n.as_str()))
        {
            let value = match (
                name.as_str(),
                &serde_json::to_value(Config::default()).unwrap()[&name],
            ) {
                // The default depends on the working directory; this is the unit's.
                ("parquet_url", _) => "file:///var/lib/cfaudit/parquet".into(),
                (_, serde_json::Value::Null) => String::new(),
                (_, serde_json::Value::String(s)) => s.clone(),
                (_, other) => other.to_string(),
            };
            out.push_str(&format!("\n# {doc}\n#{}={value}\n", name.to_uppercase()));
        }
        out
    }

    const GENERATED: &str =
        "# --- Every setting, at its default (generated from src/config.rs) ---";
    const START: &str = "<!-- configuration reference: generated from src/config.rs -->\n";
    const END: &str = "<!-- end of the configuration reference -->";

    fn check(path: &str, current: &str, wanted: &str) {
        if current == wanted {
            return;
        }
        if std::env::var_os("UPDATE_DOCS").is_some() {
            let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
            std::fs::write(file, wanted).unwrap();
            return;
        }
        panic!("{path} is out of date with src/config.rs: run UPDATE_DOCS=1 cargo test -p cfaudit --lib docs");
    }

    #[test]
    fn keys_are_the_fields() {
        let names: Vec<String> = fields()
            .into_iter()
            .map(|(n, _)| n)
            .filter(|n| n != "storage_options")
            .collect();
        assert_eq!(names, KEYS);
    }

    #[test]
    fn the_readme_reference_is_generated_from_the_struct() {
        let readme = include_str!("../README.md");
        let start = readme
            .find(START)
            .expect("README has the reference start marker")
            + START.len();
        let end = readme
            .find(END)
            .expect("README has the reference end marker");
        let wanted = format!("{}{}{}", &readme[..start], readme_table(), &readme[end..]);
        check("README.md", readme, &wanted);
    }

    #[test]
    fn the_systemd_env_file_is_generated_from_the_struct() {
        let current = include_str!("../cfaudit.env");
        let wanted = env_file();
        check("cfaudit.env", current, &wanted);
        // And, uncommented, it is a valid configuration.
        let generated = &wanted[wanted.find(GENERATED).unwrap()..];
        let env: Vec<(String, String)> = generated
            .lines()
            .filter_map(|l| l.strip_prefix('#'))
            .filter_map(|l| l.split_once('='))
            .filter(|(k, _)| KEYS.contains(&k.to_lowercase().as_str()))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        assert_eq!(env.len(), KEYS.len());
        Config::load_from(None, env).unwrap();
    }
}
