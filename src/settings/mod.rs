//! Settings: built-in defaults < TOML file (`--config` / `CFAUDIT_CONFIG`) < environment.
//!
//! The structs below are the reference. They are nested by concern (the Cloudflare API, the
//! sweep, the database, the lake, the pipeline, the service), but every setting keeps one flat
//! name: its environment variable in upper case (the names of the original spec, such as
//! `POLL_INTERVAL_SECONDS`), the same name in lower case in the TOML file. The serde name of a
//! field is that flat name; its Rust name and type say what it is (`poll_interval: Duration`).
//! The README's table and `cfaudit.env` are generated from these structs (`reference`).

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::LazyLock;
use std::time::Duration;

use cfaudit_actors::{ApiVersion, Backoff, CheckpointerConfig, Direction, PollerConfig};
use chrono::{DateTime, NaiveDate, Utc};
use figment::providers::{Format, Serialized, Toml};
use figment::Figment;
use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize};
use serde_with::{
    serde_as, DeserializeFromStr, DurationMilliSeconds, DurationSeconds, SerializeDisplay,
};

#[cfg(test)]
mod reference;

/// A value that must never reach a log, an error or a metric.
#[derive(Clone, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
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
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(default)]
pub struct Settings {
    /// The Cloudflare API: credentials, account, and what each request asks for.
    pub cloudflare: CloudflareSettings,
    /// How the account's log is swept.
    pub sweep: SweepSettings,
    /// PostgreSQL or TimescaleDB.
    pub database: DatabaseSettings,
    /// The Parquet dataset.
    pub lake: LakeSettings,
    /// Batching, acknowledgement and retries between the API and the sinks.
    pub pipeline: PipelineSettings,
    /// The process: its HTTP endpoints, logs and shutdown.
    pub service: ServiceSettings,
}

/// The Cloudflare API: credentials, account, and what each request asks for.
#[serde_as]
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(default)]
pub struct CloudflareSettings {
    /// API token with "Account Settings: Read" (sent as `Authorization: Bearer`).
    /// Also read from the file named by `CLOUDFLARE_API_TOKEN_FILE`.
    #[serde(rename = "cloudflare_api_token")]
    pub api_token: Option<Secret>,
    /// Legacy global API key auth: the account e-mail (`X-Auth-Email`), with `CLOUDFLARE_API_KEY`.
    #[serde(rename = "cloudflare_api_email")]
    pub api_email: Option<String>,
    /// Legacy global API key (`X-Auth-Key`). Also from `CLOUDFLARE_API_KEY_FILE`.
    #[serde(rename = "cloudflare_api_key")]
    pub api_key: Option<Secret>,
    /// The account whose audit logs are collected (32 hex characters). For several, use
    /// `CLOUDFLARE_ACCOUNT_IDS`; both may be set (the union is collected).
    #[serde(rename = "cloudflare_account_id")]
    pub account_id: Option<String>,
    /// Several accounts, comma-separated: each is collected as streams of its own (its own
    /// checkpoint, dead letters and failures), all on `CLOUDFLARE_API_TOKEN` and its request
    /// budget (accounts of other tokens: `CLOUDFLARE_API_TOKENS`).
    #[serde(rename = "cloudflare_account_ids")]
    #[schemars(with = "Option<String>")]
    pub account_ids: Option<AccountIds>,
    /// Also collect every account the token is a member of (`GET /accounts`), listed again
    /// every `CLOUDFLARE_DISCOVERY_INTERVAL_SECONDS`: new accounts are collected from then on,
    /// accounts that left the list stop being collected (what they stored stays).
    #[serde(rename = "cloudflare_discover_accounts")]
    pub discover_accounts: bool,
    /// Further tokens, for accounts that do not share one: entries `token=account,account`
    /// (those accounts) or `token=*` (every account the token is a member of, listed again
    /// every discovery interval), separated by `;` or new lines; `#` starts a comment line.
    /// Each token has its own request budget. Best given as a file
    /// (`CLOUDFLARE_API_TOKENS_FILE`). An account belongs to one token: listed under two, it
    /// is refused; found by two listings, the first token in order collects it
    /// (`CLOUDFLARE_API_TOKEN` first).
    #[serde(rename = "cloudflare_api_tokens")]
    #[schemars(with = "Option<String>")]
    pub api_tokens: Option<TokenList>,
    /// Seconds between two listings of the token's accounts (with discovery on).
    #[serde(rename = "cloudflare_discovery_interval_seconds")]
    #[serde_as(as = "DurationSeconds<u64>")]
    #[schemars(with = "u64")]
    pub discovery_interval: Duration,
    /// API base URL; point it at the emulator for demos and tests.
    #[serde(rename = "cloudflare_api_base_url")]
    pub api_base_url: String,
    /// Events per page, 1–1000.
    #[serde(rename = "cloudflare_per_page")]
    pub per_page: u32,
    /// `asc` (checkpoint advances page by page) or `desc` (only when a sweep is complete).
    #[serde(rename = "cloudflare_direction")]
    #[schemars(with = "String")]
    pub direction: Direction,
    /// Sends `hide_user_logs=true`: leaves out user-level events such as logins.
    #[serde(rename = "cloudflare_hide_user_logs")]
    pub hide_user_logs: bool,
    /// Timeout of one API request, body included, in seconds.
    #[serde(rename = "cloudflare_request_timeout_seconds")]
    #[serde_as(as = "DurationSeconds<u64>")]
    #[schemars(with = "u64")]
    pub request_timeout: Duration,
    /// Client-side request budget per 5 minutes, kept below Cloudflare's 1,200 (whose breach
    /// blocks the token for 5 minutes). At most `budget + burst` requests go out in any
    /// 5-minute window. The token's: N service replicas running take 1/N of it each.
    #[serde(rename = "cloudflare_requests_per_5_minutes")]
    pub requests_per_5_minutes: u32,
    /// Requests that may go out back to back before the budget's pace applies.
    #[serde(rename = "cloudflare_request_burst")]
    pub request_burst: u32,
    /// The longest wait, in seconds, the API may impose through `retry-after` or its
    /// `Ratelimit` reset; a longer one (a broken proxy) is cut to this.
    #[serde(rename = "cloudflare_max_retry_after_seconds")]
    #[serde_as(as = "DurationSeconds<u64>")]
    #[schemars(with = "u64")]
    pub max_retry_after: Duration,
    /// A response body larger than this many bytes is not read; the page is asked for again
    /// in smaller pages.
    #[serde(rename = "cloudflare_max_response_bytes")]
    pub max_response_bytes: u64,
    /// Which audit-log APIs to collect: `v1`, `v2` or `v1,v2`. v1 (`/audit_logs`) has
    /// before/after values; v2 (`/logs/audit`, generally available since 2026-03) covers more
    /// products and records logins. They are different record sets (the same action has a
    /// different id in each): `v1,v2` stores both, told apart by `api_version`.
    #[serde(rename = "cloudflare_api_versions")]
    #[schemars(with = "String")]
    pub api_versions: ApiVersions,
    /// v2 events per page (`limit`), 1–1000. A page may come back shorter; paging follows the
    /// API's cursor, never the page's length.
    #[serde(rename = "cloudflare_v2_limit")]
    pub v2_limit: u32,
    /// v2 filters, `name=value,value;name.not=value`, for instance
    /// `action_type.not=view;zone_name=example.com`. Names are v2's (`action_type`,
    /// `actor_email`, `resource_type`, `zone_name`, … each also with `.not`). A filtered
    /// stream is not a complete audit trail.
    #[serde(rename = "cloudflare_v2_filters")]
    #[schemars(with = "String")]
    pub v2_filters: V2Filters,
}

/// The audit-log APIs to collect, each once, in the order given.
#[derive(Clone, Debug, PartialEq, Eq, SerializeDisplay, DeserializeFromStr)]
pub struct ApiVersions(pub Vec<ApiVersion>);

impl std::str::FromStr for ApiVersions {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut versions = Vec::new();
        for part in text.split(',').map(str::trim) {
            let version = ApiVersion::parse(&part.to_lowercase())
                .ok_or_else(|| format!("{part:?} is neither v1 nor v2"))?;
            if versions.contains(&version) {
                return Err(format!("{part} is named twice"));
            }
            versions.push(version);
        }
        Ok(ApiVersions(versions))
    }
}

impl fmt::Display for ApiVersions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.0.iter().map(|v| v.as_str()).collect();
        f.write_str(&names.join(","))
    }
}

/// The filters v2 takes, each also as `<name>.not`.
pub const V2_FILTER_NAMES: &[&str] = &[
    "id",
    "account_name",
    "action_result",
    "action_type",
    "actor_context",
    "actor_email",
    "actor_id",
    "actor_ip_address",
    "actor_token_id",
    "actor_token_name",
    "actor_type",
    "product_category",
    "raw_cf_ray_id",
    "raw_method",
    "raw_status_code",
    "raw_uri",
    "resource_id",
    "resource_product",
    "resource_scope",
    "resource_type",
    "zone_id",
    "zone_name",
];

/// v2 filters: each a name and the values it matches (any of them).
#[derive(Clone, Debug, Default, PartialEq, Eq, SerializeDisplay, DeserializeFromStr)]
pub struct V2Filters(pub Vec<(String, Vec<String>)>);

impl std::str::FromStr for V2Filters {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut filters: Vec<(String, Vec<String>)> = Vec::new();
        for filter in text.split(';').map(str::trim).filter(|f| !f.is_empty()) {
            let (name, values) = filter
                .split_once('=')
                .ok_or_else(|| format!("{filter:?} is not name=value"))?;
            let name = name.trim();
            if !V2_FILTER_NAMES.contains(&name.strip_suffix(".not").unwrap_or(name)) {
                return Err(format!("{name:?} is no v2 filter"));
            }
            let values: Vec<String> = values
                .split(',')
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .map(str::to_owned)
                .collect();
            if values.is_empty() {
                return Err(format!("{name} has no value"));
            }
            if filters.iter().any(|(n, _)| n == name) {
                return Err(format!("{name} is given twice; list its values together"));
            }
            filters.push((name.to_owned(), values));
        }
        Ok(V2Filters(filters))
    }
}

impl fmt::Display for V2Filters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let filters: Vec<String> = self
            .0
            .iter()
            .map(|(name, values)| format!("{name}={}", values.join(",")))
            .collect();
        f.write_str(&filters.join(";"))
    }
}

impl Default for CloudflareSettings {
    fn default() -> Self {
        CloudflareSettings {
            api_token: None,
            api_email: None,
            api_key: None,
            account_id: None,
            account_ids: None,
            discover_accounts: false,
            api_tokens: None,
            discovery_interval: Duration::from_secs(3600),
            api_base_url: "https://api.cloudflare.com/client/v4".into(),
            per_page: 1000,
            direction: Direction::Asc,
            hide_user_logs: false,
            request_timeout: Duration::from_secs(30),
            requests_per_5_minutes: 1000,
            request_burst: 100,
            max_retry_after: Duration::from_secs(600),
            max_response_bytes: 128 << 20,
            api_versions: ApiVersions(vec![ApiVersion::V1]),
            v2_limit: 100,
            v2_filters: V2Filters::default(),
        }
    }
}

/// How a request is authorised.
#[derive(Clone, Debug)]
pub enum Credential {
    Token(Secret),
    Key { email: String, key: Secret },
}

/// One credential and the accounts collected with it.
#[derive(Clone, Debug)]
pub struct TokenAccounts {
    /// How the token is named in logs, errors and metrics (never the token itself):
    /// `api_token` for `CLOUDFLARE_API_TOKEN` (or the global key), `api_tokens.N` for the Nth
    /// entry of `CLOUDFLARE_API_TOKENS`.
    pub label: String,
    pub credential: Credential,
    /// The accounts named for it, in order.
    pub listed: Vec<String>,
    /// Also every account the token is a member of.
    pub discover: bool,
}

impl CloudflareSettings {
    /// The credentials and the accounts of each, once what polling needs is checked: at least
    /// one credential, and for each at least one account or discovery; no account named
    /// under two tokens.
    pub fn tokens(&self) -> Result<Vec<TokenAccounts>, ConfigError> {
        let mut listed: Vec<String> = Vec::new();
        let named = self.account_ids.iter().flat_map(|ids| ids.0.iter());
        for id in self.account_id.iter().chain(named) {
            if !listed.contains(id) {
                listed.push(id.clone());
            }
        }
        if let Some(id) = listed.iter().find(|id| !is_account_id(id)) {
            return Err(config_error(
                "cloudflare_account_id",
                format!("{id:?} is not an account id"),
                "use the 32-hex account id from the dashboard URL",
            ));
        }
        let extra = self.api_tokens.as_ref().map_or(&[][..], |t| &t.0[..]);
        let credential = match (&self.api_token, &self.api_email, &self.api_key) {
            (Some(token), _, _) => Some(Credential::Token(token.clone())),
            (None, Some(email), Some(key)) => Some(Credential::Key {
                email: email.clone(),
                key: key.clone(),
            }),
            _ => None,
        };
        let mut tokens = Vec::new();
        let has_accounts = !listed.is_empty() || self.discover_accounts;
        match credential {
            Some(credential) if has_accounts => tokens.push(TokenAccounts {
                label: "api_token".to_owned(),
                credential,
                listed,
                discover: self.discover_accounts,
            }),
            _ if !has_accounts && extra.is_empty() => {
                return Err(config_error(
                    "cloudflare_account_id",
                    "not set",
                    "set CLOUDFLARE_ACCOUNT_ID to the 32-hex account id from the dashboard URL, \
                     CLOUDFLARE_ACCOUNT_IDS to several, comma-separated, or \
                     CLOUDFLARE_DISCOVER_ACCOUNTS=true for every account the token is a member of",
                ))
            }
            Some(_) => {
                return Err(config_error(
                    "cloudflare_api_token",
                    "set, but no account is collected with it",
                    "name its accounts in CLOUDFLARE_ACCOUNT_IDS, set CLOUDFLARE_DISCOVER_ACCOUNTS=true, \
                     or leave it unset when CLOUDFLARE_API_TOKENS lists every token",
                ))
            }
            None if has_accounts => {
                return Err(config_error(
                    "cloudflare_api_token",
                    "not set",
                    "create an API token with 'Account Settings: Read' and set CLOUDFLARE_API_TOKEN (or CLOUDFLARE_API_TOKEN_FILE)",
                ))
            }
            None => {}
        }
        for (n, entry) in extra.iter().enumerate() {
            let label = format!("api_tokens.{}", n + 1);
            for account in entry.accounts.iter() {
                if let Some(first) = tokens.iter().find(|t| t.listed.contains(account)) {
                    return Err(config_error(
                        "cloudflare_api_tokens",
                        format!(
                            "account {account} is named for two tokens ({} and {label})",
                            first.label
                        ),
                        "name each account for one token only",
                    ));
                }
            }
            tokens.push(TokenAccounts {
                label,
                credential: Credential::Token(entry.token.clone()),
                listed: entry.accounts.clone(),
                discover: entry.discover,
            });
        }
        Ok(tokens)
    }

    /// The accounts named in the configuration, in order, once what polling needs is checked
    /// ([`CloudflareSettings::tokens`]).
    pub fn require_accounts(&self) -> Result<Vec<String>, ConfigError> {
        Ok(self.tokens()?.into_iter().flat_map(|t| t.listed).collect())
    }
}

/// `CLOUDFLARE_API_TOKENS`: further tokens, each with its accounts.
#[derive(Clone, Debug, PartialEq, Eq, DeserializeFromStr)]
pub struct TokenList(pub Vec<TokenEntry>);

/// One entry of `CLOUDFLARE_API_TOKENS`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenEntry {
    pub token: Secret,
    /// The accounts named for the token.
    pub accounts: Vec<String>,
    /// `*`: every account the token is a member of.
    pub discover: bool,
}

impl std::str::FromStr for TokenList {
    type Err = String;

    /// Errors name the entry by its number, never by its token.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut entries: Vec<TokenEntry> = Vec::new();
        let lines = text
            .split(['\n', ';'])
            .map(str::trim)
            .filter(|line| !line.is_empty() && !line.starts_with('#'));
        for (n, line) in lines.enumerate() {
            let n = n + 1;
            let Some((token, accounts)) = line.split_once('=') else {
                return Err(format!(
                    "entry {n} has no `=`: write token=account,account or token=*"
                ));
            };
            let token = token.trim();
            if token.is_empty() || token.chars().any(char::is_whitespace) {
                return Err(format!("entry {n} has no token before its `=`"));
            }
            let (accounts, discover) = match accounts.trim() {
                "*" => (Vec::new(), true),
                "" => {
                    return Err(format!(
                        "entry {n} names no account: write token=account,account or token=*"
                    ))
                }
                ids => (
                    ids.parse::<AccountIds>()
                        .map_err(|problem| format!("entry {n}: {problem}"))?
                        .0,
                    false,
                ),
            };
            if entries.iter().any(|e| e.token.expose() == token) {
                return Err(format!(
                    "entry {n} repeats the token of an earlier entry: give each token one entry"
                ));
            }
            entries.push(TokenEntry {
                token: Secret::new(token),
                accounts,
                discover,
            });
        }
        Ok(TokenList(entries))
    }
}

/// Serialised without its tokens: settings are serialised only for defaults and the
/// reference, never to be read back.
impl Serialize for TokenList {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let entries: Vec<String> = self
            .0
            .iter()
            .map(|e| {
                let accounts = if e.discover {
                    "*".to_owned()
                } else {
                    e.accounts.join(",")
                };
                format!("[redacted]={accounts}")
            })
            .collect();
        serializer.serialize_str(&entries.join(";"))
    }
}

/// Account ids are alphanumeric: stream keys put a `.` after them and never a `-`.
fn is_account_id(id: &str) -> bool {
    !id.is_empty() && id.chars().all(|c| c.is_ascii_alphanumeric())
}

/// Accounts, comma-separated; blanks around commas are ignored.
#[derive(Clone, Debug, PartialEq, Eq, SerializeDisplay, DeserializeFromStr)]
pub struct AccountIds(pub Vec<String>);

impl std::str::FromStr for AccountIds {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut ids: Vec<String> = Vec::new();
        for id in text.split(',').map(str::trim).filter(|id| !id.is_empty()) {
            if !is_account_id(id) {
                return Err(format!(
                    "{id:?} is not an account id (32 hex characters from the dashboard URL)"
                ));
            }
            if ids.iter().any(|known| known == id) {
                return Err(format!("{id} is named twice"));
            }
            ids.push(id.to_owned());
        }
        Ok(AccountIds(ids))
    }
}

impl fmt::Display for AccountIds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join(","))
    }
}

/// How the account's log is swept.
#[serde_as]
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(default)]
pub struct SweepSettings {
    /// Seconds between the end of one sweep and the start of the next.
    #[serde(rename = "poll_interval_seconds")]
    #[serde_as(as = "DurationSeconds<u64>")]
    #[schemars(with = "u64")]
    pub poll_interval: Duration,
    /// Each sweep re-reads this many seconds before the checkpoint, for late events; the
    /// overlap is deduplicated.
    #[serde(rename = "cloudflare_since_safety_lag_seconds")]
    #[serde_as(as = "DurationSeconds<u64>")]
    #[schemars(with = "u64")]
    pub safety_lag: Duration,
    /// Where a fresh account starts: RFC 3339 time or `YYYY-MM-DD`. Default: one poll
    /// interval ago. Ignored once a checkpoint is committed.
    #[serde(deserialize_with = "operator_time")]
    #[schemars(with = "Option<String>")]
    pub initial_checkpoint: Option<DateTime<Utc>>,
    /// A sweep stops after this many pages (protects against an API that repeats pages).
    #[serde(rename = "max_pages_per_sweep")]
    pub max_pages: u32,
    /// `run --once` gives up after this many failed attempts of one page.
    pub once_max_attempts: u32,
}

impl Default for SweepSettings {
    fn default() -> Self {
        SweepSettings {
            poll_interval: Duration::from_secs(60),
            safety_lag: Duration::from_secs(120),
            initial_checkpoint: None,
            max_pages: 100_000,
            once_max_attempts: 8,
        }
    }
}

/// PostgreSQL or TimescaleDB.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(default)]
pub struct DatabaseSettings {
    /// PostgreSQL/TimescaleDB URL. Also from `DATABASE_URL_FILE`.
    #[serde(rename = "database_url")]
    pub url: Secret,
    /// Maximum connections in the database pool.
    #[serde(rename = "database_max_connections")]
    pub max_connections: u32,
    /// TimescaleDB only: compress `audit_logs` chunks older than this many days (0: never).
    pub timescale_compress_after_days: u32,
    /// TimescaleDB only: drop `audit_logs` chunks older than this many days (0: keep all).
    /// On plain PostgreSQL nothing is dropped (README, "TimescaleDB and plain PostgreSQL", shows how to prune).
    pub retention_days: u32,
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        DatabaseSettings {
            url: Secret::new("postgres://postgres@127.0.0.1:5432/cfaudit"),
            max_connections: 8,
            timescale_compress_after_days: 30,
            retention_days: 90,
        }
    }
}

/// The Parquet dataset.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(default)]
pub struct LakeSettings {
    /// Parquet dataset root as an object_store URL: `file:///path` or `s3://bucket/prefix`.
    pub parquet_url: String,
    /// Object-store options: every `AWS_*` variable of the environment (lower-cased), passed
    /// to object_store as it is (`AWS_ENDPOINT`, `AWS_ALLOW_HTTP`, `AWS_ACCESS_KEY_ID`, …).
    #[serde(skip)]
    pub storage_options: Vec<(String, Secret)>,
}

impl Default for LakeSettings {
    fn default() -> Self {
        let parquet_dir = std::env::current_dir()
            .unwrap_or_else(|_| "/var/lib/cfaudit".into())
            .join("data/parquet");
        LakeSettings {
            parquet_url: format!("file://{}", parquet_dir.display()),
            storage_options: Vec::new(),
        }
    }
}

/// Batching, acknowledgement and retries between the API and the sinks.
#[serde_as]
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(default)]
pub struct PipelineSettings {
    /// Batches of one stream fetched but not yet committed, at most. Bounds memory when a
    /// sink is slow. Two keep the next batch fetching while one is written, which keeps the
    /// PostgreSQL writer busy from the first batch to the last: three were no faster on 2 cores
    /// (`make bench`).
    pub max_inflight_batches: usize,
    /// Batches of all streams of the process together (every account and API version)
    /// fetched but not yet committed, at most: one memory bound whatever the number of
    /// accounts. Handed out first come, first served, so a backlog on one account cannot hold
    /// them all.
    pub max_inflight_batches_total: usize,
    /// Pages are coalesced into one batch (one commit, one Parquet file per touched hour) of
    /// up to this many events… Larger batches mean fewer, larger files and commits, and more
    /// memory: 2,000 keeps a backfill near 40-46 MiB; 10,000 was about 10 % faster at 78 MiB
    /// (`make bench`, 2 cores).
    pub batch_max_events: usize,
    /// …or this many bytes of raw JSON. Memory in flight is bounded by
    /// `MAX_INFLIGHT_BATCHES_TOTAL × BATCH_MAX_BYTES` (and, for one stream,
    /// `MAX_INFLIGHT_BATCHES × BATCH_MAX_BYTES`).
    pub batch_max_bytes: usize,
    /// A batch not acknowledged by every writer within this many seconds is retried.
    #[serde(rename = "ack_timeout_seconds")]
    #[serde_as(as = "DurationSeconds<u64>")]
    #[schemars(with = "u64")]
    pub ack_timeout: Duration,
    /// Every database statement and every storage call gives up after this many seconds (a
    /// lock held on `audit_logs`, a stalled request), and the batch is retried.
    #[serde(rename = "sink_timeout_seconds")]
    #[serde_as(as = "DurationSeconds<u64>")]
    #[schemars(with = "u64")]
    pub sink_timeout: Duration,
    /// First retry delay, in milliseconds, after an API or sink error; doubles, with jitter…
    #[serde(rename = "retry_initial_millis")]
    #[serde_as(as = "DurationMilliSeconds<u64>")]
    #[schemars(with = "u64")]
    pub retry_initial: Duration,
    /// …up to this many seconds.
    #[serde(rename = "retry_max_seconds")]
    #[serde_as(as = "DurationSeconds<u64>")]
    #[schemars(with = "u64")]
    pub retry_max: Duration,
}

impl Default for PipelineSettings {
    fn default() -> Self {
        PipelineSettings {
            max_inflight_batches: 2,
            max_inflight_batches_total: 8,
            batch_max_events: 2_000,
            batch_max_bytes: 8 << 20,
            ack_timeout: Duration::from_secs(300),
            sink_timeout: Duration::from_secs(120),
            retry_initial: Duration::from_millis(500),
            retry_max: Duration::from_secs(60),
        }
    }
}

impl PipelineSettings {
    pub fn backoff(&self) -> Backoff {
        Backoff {
            initial: self.retry_initial,
            max: self.retry_max,
        }
    }
}

/// How logs are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Text on a terminal, JSON otherwise.
    Auto,
    Text,
    Json,
}

/// The process: its HTTP endpoints, logs and shutdown.
#[serde_as]
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(default)]
pub struct ServiceSettings {
    /// Address of the HTTP server for `/metrics`, `/healthz` and `/readyz`.
    #[schemars(with = "String")]
    pub metrics_addr: SocketAddr,
    /// On SIGTERM/SIGINT, in-flight batches get this many seconds to commit before exit.
    #[serde(rename = "shutdown_timeout_seconds")]
    #[serde_as(as = "DurationSeconds<u64>")]
    #[schemars(with = "u64")]
    pub shutdown_timeout: Duration,
    /// `text`, `json`, or `auto` (text on a terminal, JSON otherwise). The level comes from
    /// `RUST_LOG` (default `info,sqlx=warn`).
    pub log_format: LogFormat,
    /// This process's name among the replicas sharing the database (each must differ).
    /// Default: the host name and process id.
    #[serde(rename = "cfaudit_replica_name")]
    pub replica_name: Option<String>,
    /// How often a replica looks at which replicas are alive and takes or hands over streams:
    /// a stream of a replica that died is taken over within this time, plus the start of its
    /// pipeline.
    #[serde(rename = "cfaudit_rebalance_interval_seconds")]
    #[serde_as(as = "DurationSeconds<u64>")]
    #[schemars(with = "u64")]
    pub rebalance_interval: Duration,
}

impl Default for ServiceSettings {
    fn default() -> Self {
        ServiceSettings {
            metrics_addr: "127.0.0.1:9464".parse().expect("valid"),
            shutdown_timeout: Duration::from_secs(30),
            log_format: LogFormat::Auto,
            replica_name: None,
            rebalance_interval: Duration::from_secs(2),
        }
    }
}

/// Cloudflare's request limit per token and 5 minutes.
pub const CLOUDFLARE_REQUESTS_PER_5_MINUTES: u64 = 1200;

/// Every setting's flat name (its environment variable in lower case) with its section.
/// Derived from the structs themselves: a new field is a new setting, with nothing else to list.
static SETTINGS: LazyLock<Vec<(String, String)>> = LazyLock::new(|| {
    let defaults = serde_json::to_value(Settings::default()).expect("plain data");
    let sections = defaults.as_object().expect("a struct");
    sections
        .iter()
        .flat_map(|(section, fields)| {
            let fields = fields.as_object().expect("a section is a struct");
            fields
                .keys()
                .map(move |name| (name.clone(), section.clone()))
        })
        .collect()
});

/// Every setting's flat name, lower case: the environment variable and the TOML key.
pub fn names() -> impl Iterator<Item = &'static str> {
    SETTINGS.iter().map(|(name, _)| name.as_str())
}

/// The section holding the setting of this flat name.
pub fn section_of(name: &str) -> Option<&'static str> {
    SETTINGS
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, section)| section.as_str())
}

/// The default of a setting as written in a configuration; `None` when unset by default.
pub fn default_of(name: &str) -> Option<String> {
    let section = section_of(name)?;
    match &serde_json::to_value(Settings::default()).expect("plain data")[section][name] {
        serde_json::Value::Null => None,
        serde_json::Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

/// Secrets that may be given as a path in `<NAME>_FILE` instead.
const FILE_SECRETS: &[&str] = &[
    "cloudflare_api_token",
    "cloudflare_api_tokens",
    "cloudflare_api_key",
    "database_url",
];

/// A configuration error, always naming the setting and the fix.
#[derive(Debug, thiserror::Error)]
#[error("configuration: {key}: {problem}. Fix: {fix}")]
pub struct ConfigError {
    pub key: String,
    pub problem: String,
    pub fix: String,
}

pub fn config_error(key: &str, problem: impl Into<String>, fix: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.to_uppercase(),
        problem: problem.into(),
        fix: fix.into(),
    }
}

impl Settings {
    /// Loads defaults, then the TOML file if given, then the environment.
    pub fn load(file: Option<&Path>) -> Result<Settings, ConfigError> {
        Self::load_from(file, std::env::vars())
    }

    /// As [`Settings::load`], with an explicit environment (tests).
    pub fn load_from(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Settings, ConfigError> {
        let env: Vec<(String, String)> = env.into_iter().collect();
        let mut figment = Figment::from(Serialized::defaults(Settings::default()));
        if let Some(file) = file {
            for (name, value) in read_file(file)? {
                figment = figment.merge((nested(&name), value));
            }
        }
        for (name, value) in &env {
            let key = name.to_lowercase();
            if section_of(&key).is_some() && !value.is_empty() {
                figment = figment.merge((nested(&key), value.clone()));
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
                figment = figment.merge((nested(secret), content.trim().to_owned()));
            }
        }
        let mut settings: Settings = figment.extract_lossy().map_err(|e| {
            let key = e.path.last().cloned().unwrap_or_default();
            config_error(&key, e.kind.to_string(), fix_for(&key))
        })?;
        settings.lake.storage_options = env
            .iter()
            .filter(|(name, _)| name.starts_with("AWS_"))
            .map(|(name, value)| (name.to_lowercase(), Secret::new(value.clone())))
            .collect();
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let cloudflare = &self.cloudflare;
        if !(1..=1000).contains(&cloudflare.per_page) {
            return Err(config_error(
                "cloudflare_per_page",
                format!("{} is out of range", cloudflare.per_page),
                "use a value from 1 to 1000 (the API's maximum)",
            ));
        }
        if !(1..=1000).contains(&cloudflare.v2_limit) {
            return Err(config_error(
                "cloudflare_v2_limit",
                format!("{} is out of range", cloudflare.v2_limit),
                "use a value from 1 to 1000",
            ));
        }
        if cloudflare.api_versions.0.is_empty() {
            return Err(config_error(
                "cloudflare_api_versions",
                "no version",
                "use v1, v2 or v1,v2",
            ));
        }
        if self.pipeline.batch_max_events == 0 || self.pipeline.batch_max_bytes == 0 {
            return Err(config_error(
                "batch_max_events",
                "0 would make empty batches",
                "use 1 or more (default 2000; BATCH_MAX_BYTES default 8388608)",
            ));
        }
        if cloudflare.requests_per_5_minutes == 0 || cloudflare.request_burst == 0 {
            return Err(config_error(
                "cloudflare_requests_per_5_minutes",
                "0 would never send a request",
                "use 1 or more (defaults: 1000 per 5 minutes, burst 100: at most 1100 in any window, below Cloudflare's 1200)",
            ));
        }
        let at_least_one: [(&str, bool, &str); 9] = [
            ("poll_interval_seconds", self.sweep.poll_interval.is_zero(), "0 would poll in a busy loop"),
            ("max_inflight_batches", self.pipeline.max_inflight_batches == 0, "0 would never fetch"),
            ("max_inflight_batches_total", self.pipeline.max_inflight_batches_total == 0, "0 would never fetch"),
            ("max_pages_per_sweep", self.sweep.max_pages == 0, "0 pages would never sweep"),
            ("ack_timeout_seconds", self.pipeline.ack_timeout.is_zero(), "0 s would fail every batch before its writers could answer"),
            ("sink_timeout_seconds", self.pipeline.sink_timeout.is_zero(), "0 s would fail every write"),
            ("once_max_attempts", self.sweep.once_max_attempts == 0, "0 attempts would never try"),
            ("cloudflare_max_retry_after_seconds", cloudflare.max_retry_after.is_zero(), "0 s would retry a rate-limited token at once, which prolongs Cloudflare's 5-minute block"),
            ("cloudflare_request_timeout_seconds", cloudflare.request_timeout.is_zero(), "0 is no timeout"),
        ];
        for (key, zero, problem) in at_least_one {
            if zero {
                return Err(config_error(
                    key,
                    problem,
                    format!(
                        "use 1 or more (default {})",
                        default_of(key).expect("a default")
                    ),
                ));
            }
        }
        for (key, zero) in [
            (
                "retry_initial_millis",
                self.pipeline.retry_initial.is_zero(),
            ),
            ("retry_max_seconds", self.pipeline.retry_max.is_zero()),
        ] {
            if zero {
                return Err(config_error(
                    key,
                    "0 would retry a failing API or sink in a busy loop",
                    format!(
                        "use 1 or more (default {})",
                        default_of(key).expect("a default")
                    ),
                ));
            }
        }
        if cloudflare.max_response_bytes < 1 << 20 {
            return Err(config_error(
                "cloudflare_max_response_bytes",
                format!(
                    "{} bytes cannot hold a page of events",
                    cloudflare.max_response_bytes
                ),
                "use 1048576 (1 MiB) or more (default 134217728)",
            ));
        }
        url::Url::parse(&cloudflare.api_base_url).map_err(|e| {
            config_error(
                "cloudflare_api_base_url",
                e.to_string(),
                "give an absolute URL such as https://api.cloudflare.com/client/v4",
            )
        })?;
        url::Url::parse(&self.lake.parquet_url).map_err(|e| {
            config_error(
                "parquet_url",
                e.to_string(),
                "give a URL such as file:///var/lib/cfaudit/parquet or s3://bucket/prefix",
            )
        })?;
        Ok(())
    }

    /// Settings that work but that an operator should hear about at start.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        let cloudflare = &self.cloudflare;
        let most =
            u64::from(cloudflare.requests_per_5_minutes) + u64::from(cloudflare.request_burst);
        if most > CLOUDFLARE_REQUESTS_PER_5_MINUTES {
            warnings.push(format!(
                "CLOUDFLARE_REQUESTS_PER_5_MINUTES={} with CLOUDFLARE_REQUEST_BURST={} allows {most} requests in 5 minutes, \
                 above Cloudflare's {CLOUDFLARE_REQUESTS_PER_5_MINUTES} per token: past it Cloudflare blocks every call of the \
                 token for 5 minutes (HTTP 429). Keep it only with a raised limit from Cloudflare, or against an emulator",
                cloudflare.requests_per_5_minutes, cloudflare.request_burst
            ));
        }
        warnings
    }

    /// What the Poller of one stream is given: `[start, end)` is the stream's window (`end`
    /// `None` for the live stream); `once` ends it after the first sweep that reaches its end.
    pub fn poller(
        &self,
        account_id: &str,
        api_version: ApiVersion,
        start: Option<DateTime<Utc>>,
        end: Option<DateTime<Utc>>,
        once: bool,
    ) -> PollerConfig {
        let (cloudflare, sweep, pipeline) = (&self.cloudflare, &self.sweep, &self.pipeline);
        PollerConfig {
            account_id: account_id.to_owned(),
            api_version,
            per_page: match api_version {
                ApiVersion::V1 => cloudflare.per_page,
                ApiVersion::V2 => cloudflare.v2_limit,
            },
            direction: cloudflare.direction,
            safety_lag: sweep.safety_lag,
            poll_interval: sweep.poll_interval,
            start,
            end,
            hide_user_logs: cloudflare.hide_user_logs,
            max_inflight_batches: pipeline.max_inflight_batches,
            batch_max_events: pipeline.batch_max_events,
            batch_max_bytes: pipeline.batch_max_bytes,
            max_pages_per_sweep: sweep.max_pages,
            backoff: pipeline.backoff(),
            default_retry_after: Duration::from_secs(60),
            max_server_wait: cloudflare.max_retry_after,
            auth_recheck: Duration::from_secs(600),
            once: once.then_some(sweep.once_max_attempts),
        }
    }

    /// What the Checkpointer of one stream, held under `lease`, is given.
    pub fn checkpointer(
        &self,
        account_id: &str,
        api_version: ApiVersion,
        stream: &str,
        lease: u64,
    ) -> CheckpointerConfig {
        CheckpointerConfig {
            account_id: account_id.to_owned(),
            api_version,
            stream: stream.to_owned(),
            lease,
            ack_timeout: self.pipeline.ack_timeout,
            sink_timeout: self.pipeline.sink_timeout,
            backoff: self.pipeline.backoff(),
        }
    }
}

/// The figment path of a setting: its section, then its flat name.
fn nested(name: &str) -> String {
    format!("{}.{name}", section_of(name).expect("a setting"))
}

/// The settings of a TOML file: flat names, as in the environment but lower case. A name that
/// is no setting is refused rather than ignored: a typo would otherwise silently keep the default.
fn read_file(file: &Path) -> Result<Vec<(String, figment::value::Value)>, ConfigError> {
    if !file.exists() {
        return Err(config_error(
            "CFAUDIT_CONFIG",
            format!("the file {} does not exist", file.display()),
            "give the path of a TOML file, or leave it unset",
        ));
    }
    let values: std::collections::BTreeMap<String, figment::value::Value> =
        Figment::from(Toml::file(file)).extract().map_err(|e| {
            config_error(
            "CFAUDIT_CONFIG",
            format!(
                "{} is not a TOML file of settings: {}",
                file.display(),
                e.kind
            ),
            "write one `name = value` line per setting, names as in the README's table, lower case",
        )
        })?;
    for name in values.keys() {
        if section_of(name).is_none() {
            return Err(config_error(
                "CFAUDIT_CONFIG",
                format!("{} sets {name:?}, which is no setting", file.display()),
                "use the names of the README's table, lower case",
            ));
        }
    }
    Ok(values.into_iter().collect())
}

/// Reads `INITIAL_CHECKPOINT` as operators write it.
fn operator_time<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<DateTime<Utc>>, D::Error> {
    let Some(value) = Option::<String>::deserialize(deserializer)? else {
        return Ok(None);
    };
    parse_time(&value).map(Some).ok_or_else(|| {
        serde::de::Error::custom(format!("{value:?} is neither an RFC 3339 time nor a date"))
    })
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
        "initial_checkpoint" => "use e.g. 2026-01-31T00:00:00Z or 2026-01-31".into(),
        "log_format" => "use auto, text or json".into(),
        "cloudflare_api_versions" => "use v1, v2 or v1,v2".into(),
        "cloudflare_v2_filters" => format!(
            "write name=value,value;name.not=value with names among {}",
            V2_FILTER_NAMES.join(", ")
        ),
        k if k.ends_with("_seconds")
            || k.ends_with("_millis")
            || k.ends_with("_bytes")
            || k.ends_with("_events")
            || k.ends_with("_batches")
            || k.ends_with("_days")
            || k.ends_with("_minutes")
            || k.ends_with("_burst")
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
mod tests;
