//! A faithful local emulator of the Cloudflare audit-log endpoints, v1 and v2 (`v2`).
//!
//! Tests and the demo run against it; the real client code is the same, only the base URL
//! differs. Data is synthetic and deterministic for a seed: bursts of events with identical
//! `when` (so they straddle page boundaries), every fractional precision, and the event
//! shapes the real API is known to send. Fault knobs cover 429 with `retry-after`, 5xx, `success:false` with
//! HTTP 200, truncated JSON and latency.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_web::http::StatusCode;
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use chrono::{DateTime, NaiveDate, SecondsFormat, SubsecRound, Utc};
use ipnetwork::IpNetwork;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

mod v2;

pub const DEMO_ACCOUNT: &str = "0123456789abcdef0123456789abcdef";
pub const DEMO_TOKEN: &str = "demo-token-not-a-secret";

/// Emulator settings; also the flags of `cfaudit-emulator`.
#[derive(clap::Args, Clone, Debug)]
pub struct EmulatorConfig {
    /// Address to listen on (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:8787")]
    pub listen: SocketAddr,
    /// The account the token may read.
    #[arg(long, default_value = DEMO_ACCOUNT)]
    pub account_id: String,
    /// The one valid API token.
    #[arg(long, default_value = DEMO_TOKEN)]
    pub token: String,
    /// The one valid legacy credential, `EMAIL:KEY` (`X-Auth-Email`, `X-Auth-Key`); none by
    /// default.
    #[arg(long, value_parser = parse_key_credential)]
    pub key_credential: Option<(String, String)>,
    /// Number of synthetic events.
    #[arg(long, default_value_t = 10_000)]
    pub events: usize,
    /// Seed of the synthetic data: same seed, same events.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// The events span this many days, ending at `--end`.
    #[arg(long, default_value_t = 30.0)]
    pub days: f64,
    /// Time of the newest event (RFC 3339); default: one hour ago, on the hour.
    #[arg(long)]
    pub end: Option<DateTime<Utc>>,
    /// Every Nth event is unusable (no id, or an invalid `when`) and must be dead-lettered.
    #[arg(long, default_value_t = 0)]
    pub invalid_every: usize,
    #[command(flatten)]
    pub faults: Faults,
    /// Requests per credential per window before the lockout.
    #[arg(long, default_value_t = 1200)]
    pub rate_limit: u32,
    #[arg(long, default_value_t = 300)]
    pub rate_window_seconds: u64,
    /// How long a credential over the limit gets 429 for every request.
    #[arg(long, default_value_t = 300)]
    pub lockout_seconds: u64,
    /// Add `result_info: {page, per_page}` to successes (the real v1 API does not).
    #[arg(long)]
    pub result_info: bool,
    /// Send `errors: null` instead of `[]`.
    #[arg(long)]
    pub errors_null: bool,
    /// Answer 400 on the page after an exactly full last page (the PostHog case).
    #[arg(long)]
    pub past_end_400: bool,
    /// Treat `before` as inclusive.
    #[arg(long)]
    pub before_inclusive: bool,
    /// Live mode: new events per second, added while the emulator runs (0: off).
    #[arg(long, default_value_t = 0.0)]
    pub live_per_second: f64,
    /// Live events carry a `when` up to this many seconds in the past (late arrivals).
    #[arg(long, default_value_t = 0)]
    pub live_late_seconds: u64,
    /// Number of synthetic v2 events (their own data set); default: as many as `--events`.
    #[arg(long)]
    pub v2_events: Option<usize>,
    /// v2: the most events a page holds, whatever `limit` asks (one collector reports 100).
    #[arg(long, default_value_t = 100)]
    pub v2_page_cap: usize,
    /// v2: `result_info.count` as a number instead of a string.
    #[arg(long)]
    pub v2_count_number: bool,
    /// v2: the cursor under `result_info.cursors.after`, as one SDK reads it.
    #[arg(long)]
    pub v2_cursors_after: bool,
    /// v2: `"cursor": ""` on the last page instead of no cursor.
    #[arg(long)]
    pub v2_empty_cursor: bool,
    /// v2: treat `since` as exclusive ("newer than", as its documentation now says).
    #[arg(long)]
    pub v2_since_exclusive: bool,
    /// More accounts the token may read, each with data sets of its own (as many events as
    /// the first, another seed); their ids are [`Emulator::accounts`].
    #[arg(long, default_value_t = 0)]
    pub extra_accounts: usize,
    /// Events of each extra account (v1 and v2); default: as many as the first account's.
    #[arg(long)]
    pub extra_account_events: Option<usize>,
    /// An account the token is a member of but may not read audit logs of: 403, code 10000.
    #[arg(long)]
    pub no_access_account: Option<String>,
    /// An account that no longer exists: 404, code 7003, and not in `/accounts`.
    #[arg(long)]
    pub deleted_account: Option<String>,
    /// `/accounts` ignores `page` and serves the first page for every page number (the
    /// pagination loop clients of that endpoint have met).
    #[arg(long)]
    pub accounts_ignore_page: bool,
    /// A second valid API token: it reads only the last `--second-token-accounts` accounts
    /// (of [`Emulator::accounts`]), which the first token then no longer reads or lists. Each
    /// token has its own rate-limit window.
    #[arg(long)]
    pub second_token: Option<String>,
    /// How many accounts, the last ones, are the second token's.
    #[arg(long, default_value_t = 0)]
    pub second_token_accounts: usize,
}

/// Injected faults, by request number: "every Nth request". 0 switches a fault off.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct Faults {
    /// Every Nth request gets HTTP 429 with `retry-after: --retry-after-seconds`.
    #[arg(long, default_value_t = 0)]
    pub fault_429_every: u64,
    #[arg(long, default_value_t = 1)]
    pub retry_after_seconds: u64,
    /// Every Nth request gets HTTP 500/502/503 with a failure envelope.
    #[arg(long, default_value_t = 0)]
    pub fault_5xx_every: u64,
    /// Every Nth request gets HTTP 200 with `success:false`.
    #[arg(long, default_value_t = 0)]
    pub fault_success_false_every: u64,
    /// Every Nth request gets a truncated JSON body.
    #[arg(long, default_value_t = 0)]
    pub fault_truncate_every: u64,
    /// Every Nth request has its connection cut in the middle of the body.
    #[arg(long, default_value_t = 0)]
    pub fault_reset_every: u64,
    /// Added latency of every request, in milliseconds.
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    /// Every Nth request is answered with the page the request before it got (an API or a
    /// cache that serves a stale page).
    #[arg(long, default_value_t = 0)]
    pub fault_repeat_every: u64,
}

/// Serve the Cloudflare audit-log API emulator (demo and tests).
#[derive(clap::Parser)]
#[command(name = "cfaudit-emulator", version, about)]
pub struct Cli {
    #[command(flatten)]
    pub config: EmulatorConfig,
}

impl EmulatorConfig {
    /// Defaults, as `cfaudit-emulator` with no flags.
    pub fn new(events: usize) -> Self {
        let mut config = EmulatorConfig::parse_args(["cfaudit-emulator"]).expect("the defaults");
        config.events = events;
        config
    }

    /// The command line of `cfaudit-emulator` (its first item is the program's name).
    pub fn parse_args<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        use clap::Parser;
        Cli::try_parse_from(args).map(|cli| cli.config)
    }
}

/// One stored event.
#[derive(Clone, Debug)]
pub struct StoredEvent {
    pub when: DateTime<Utc>,
    pub id: String,
    /// The bytes served for it: its JSON, or anything a test stores (invalid UTF-8, a raw
    /// control character, a number PostgreSQL cannot store).
    pub json: Vec<u8>,
    user_level: bool,
    action_type: Option<String>,
    actor_email: Option<String>,
    actor_ip: Option<IpAddr>,
    zone_name: Option<String>,
    /// v2: the values its filters match, by filter name.
    fields: Vec<(&'static str, String)>,
}

impl StoredEvent {
    /// Indexes a raw event at its `when`, or at `fallback` when `when` does not parse (the
    /// invalid events still have to be served inside some window).
    pub fn from_json(value: &Value, fallback: DateTime<Utc>) -> StoredEvent {
        let text = |a: &str, b: &str| {
            value
                .get(a)
                .and_then(|v| v.get(b))
                .and_then(Value::as_str)
                .map(str::to_owned)
        };
        StoredEvent {
            when: value
                .get("when")
                .and_then(Value::as_str)
                .and_then(|w| DateTime::parse_from_rfc3339(w).ok())
                .map(|w| w.with_timezone(&Utc))
                .unwrap_or(fallback),
            id: value
                .get("id")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned(),
            json: value.to_string().into_bytes(),
            user_level: text("resource", "type").as_deref() == Some("user"),
            action_type: text("action", "type"),
            actor_email: text("actor", "email"),
            actor_ip: text("actor", "ip").and_then(|ip| ip.parse().ok()),
            zone_name: text("metadata", "zone_name"),
            fields: Vec::new(),
        }
    }
}

impl StoredEvent {
    /// An event served exactly as `bytes`, at `when`, matching no filter.
    pub fn raw(when: DateTime<Utc>, id: &str, bytes: Vec<u8>) -> StoredEvent {
        StoredEvent {
            when,
            id: id.to_owned(),
            json: bytes,
            user_level: false,
            action_type: None,
            actor_email: None,
            actor_ip: None,
            zone_name: None,
            fields: Vec::new(),
        }
    }

    /// The served bytes as text, when they are UTF-8.
    pub fn text(&self) -> Option<&str> {
        std::str::from_utf8(&self.json).ok()
    }
}

/// Something a test has the emulator do to a store when a request arrives.
type StoreAction = Box<dyn FnOnce(&mut Vec<StoredEvent>) + Send>;

/// Which endpoint a request is for; each has its own data set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Api {
    /// `/accounts/{id}/audit_logs` and `/user/audit_logs`.
    V1,
    /// `/accounts/{id}/logs/audit`.
    V2,
}

struct RateWindow {
    started: Instant,
    count: u32,
    blocked_until: Option<Instant>,
}

/// Requests kept in the log.
const REQUEST_LOG_CAP: usize = 100_000;

/// What a request asked for and how it was answered (tests check what the client sends).
#[derive(Clone, Debug)]
pub struct RequestRecord {
    pub arrived: Instant,
    pub path: String,
    pub query: Vec<(String, String)>,
    /// The request's authentication headers, by lowercase name.
    pub auth_headers: Vec<(String, String)>,
    pub status: u16,
    /// The `Retry-After` of the answer, in seconds.
    pub retry_after: Option<u64>,
}

impl RequestRecord {
    /// The last value of a query parameter.
    pub fn param(&self, name: &str) -> Option<&str> {
        last_param(&self.query, name)
    }
}

/// The last value of a query parameter (a repeated one counts as given last).
pub(crate) fn last_param<'a>(query: &'a [(String, String)], name: &str) -> Option<&'a str> {
    query
        .iter()
        .rev()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// The data sets of one account.
struct AccountStores {
    events: Vec<StoredEvent>,
    v2_events: Vec<StoredEvent>,
}

impl AccountStores {
    /// The synthetic events of `config`'s account, both versions, sorted.
    fn generate(config: &EmulatorConfig) -> AccountStores {
        let mut events: Vec<StoredEvent> = generate(config)
            .iter()
            .map(|(when, event)| StoredEvent::from_json(event, *when))
            .collect();
        sort(&mut events);
        let mut v2_events: Vec<StoredEvent> = v2::generate(config)
            .iter()
            .map(|(time, event)| v2::stored(event, *time))
            .collect();
        sort(&mut v2_events);
        AccountStores { events, v2_events }
    }
}

struct State {
    events: Vec<StoredEvent>,
    v2_events: Vec<StoredEvent>,
    /// The extra accounts' data sets, by account id.
    others: BTreeMap<String, AccountStores>,
    faults: Faults,
    requests: u64,
    log: Vec<RequestRecord>,
    /// How often each fault was injected, by its flag's name.
    injected: BTreeMap<&'static str, u64>,
    /// The last page served by each endpoint (the repeat fault serves it again).
    previous_page: HashMap<Api, Vec<u8>>,
    windows: HashMap<String, RateWindow>,
    /// Actions run on a store when the request with that number arrives, before it is
    /// answered.
    on_request: Vec<(u64, Api, StoreAction)>,
}

/// The emulator's shared state; clone freely.
#[derive(Clone)]
pub struct Emulator {
    config: Arc<EmulatorConfig>,
    state: Arc<Mutex<State>>,
}

impl Emulator {
    pub fn new(config: EmulatorConfig) -> Emulator {
        let AccountStores { events, v2_events } = AccountStores::generate(&config);
        let others = (1..=config.extra_accounts)
            .map(|n| {
                let mut own = config.clone();
                own.account_id = extra_account_id(&config, n);
                own.seed = config.seed.wrapping_add(n as u64 * 7919);
                if let Some(events) = config.extra_account_events {
                    own.events = events;
                    own.v2_events = Some(events);
                }
                (own.account_id.clone(), AccountStores::generate(&own))
            })
            .collect();
        let faults = config.faults.clone();
        Emulator {
            config: Arc::new(config),
            state: Arc::new(Mutex::new(State {
                events,
                v2_events,
                others,
                faults,
                requests: 0,
                log: Vec::new(),
                injected: BTreeMap::new(),
                previous_page: HashMap::new(),
                windows: HashMap::new(),
                on_request: Vec::new(),
            })),
        }
    }

    /// The accounts the token may read: the first (`--account-id`), then the extra ones.
    pub fn accounts(&self) -> Vec<String> {
        let state = self.state.lock().unwrap();
        std::iter::once(self.config.account_id.clone())
            .chain(state.others.keys().cloned())
            .collect()
    }

    /// Every stored event of `account` for `api`.
    pub fn events_of(&self, account: &str, api: Api) -> Vec<StoredEvent> {
        let state = self.state.lock().unwrap();
        state
            .store(&self.config, account, api)
            .map(<[StoredEvent]>::to_vec)
            .unwrap_or_default()
    }

    /// Adds v1 events to `account` (an event several accounts see, such as a user's login).
    pub fn insert_into(&self, account: &str, events: &[Value]) {
        let mut state = self.state.lock().unwrap();
        let store = state
            .store_mut(&self.config, account, Api::V1)
            .expect("an account of the emulator");
        store.extend(events.iter().map(|e| StoredEvent::from_json(e, Utc::now())));
        sort(store);
    }

    /// Adds events (tests of late arrivals and of pages that shift).
    pub fn insert(&self, events: &[Value]) {
        let mut state = self.state.lock().unwrap();
        state
            .events
            .extend(events.iter().map(|e| StoredEvent::from_json(e, Utc::now())));
        sort(&mut state.events);
    }

    /// Adds one event served exactly as `bytes` (tests of events the pipeline must isolate).
    pub fn insert_raw(&self, when: DateTime<Utc>, id: &str, bytes: Vec<u8>) {
        let mut state = self.state.lock().unwrap();
        state.events.push(StoredEvent::raw(when, id, bytes));
        sort(&mut state.events);
    }

    /// Removes the `n` oldest events, as the API's 18-month retention does; returns them.
    pub fn expire_oldest(&self, n: usize) -> Vec<StoredEvent> {
        expire(&mut self.state.lock().unwrap().events, n)
    }

    /// When request number `n` arrives (1-based, every request counts), before it is
    /// answered, `action` changes the store: events expiring or arriving mid-sweep.
    pub fn on_request(&self, n: u64, action: impl FnOnce(&mut Vec<StoredEvent>) + Send + 'static) {
        self.on_request_to(Api::V1, n, action);
    }

    /// As [`Emulator::on_request`], on the store of `api`.
    pub fn on_request_to(
        &self,
        api: Api,
        n: u64,
        action: impl FnOnce(&mut Vec<StoredEvent>) + Send + 'static,
    ) {
        self.state
            .lock()
            .unwrap()
            .on_request
            .push((n, api, Box::new(action)));
    }

    /// Adds v2 events.
    pub fn insert_v2(&self, events: &[Value]) {
        let mut state = self.state.lock().unwrap();
        state
            .v2_events
            .extend(events.iter().map(|e| v2::stored(e, Utc::now())));
        sort(&mut state.v2_events);
    }

    /// Removes the `n` oldest v2 events; returns them.
    pub fn expire_oldest_v2(&self, n: usize) -> Vec<StoredEvent> {
        expire(&mut self.state.lock().unwrap().v2_events, n)
    }

    /// Every stored v2 event.
    pub fn events_v2(&self) -> Vec<StoredEvent> {
        self.state.lock().unwrap().v2_events.clone()
    }

    pub fn set_faults(&self, faults: Faults) {
        self.state.lock().unwrap().faults = faults;
    }

    pub fn requests(&self) -> u64 {
        self.state.lock().unwrap().requests
    }

    /// How often each enabled fault was injected so far, by its flag's name (a test shows
    /// that the faults it enables were hit).
    pub fn faults_injected(&self) -> BTreeMap<&'static str, u64> {
        let state = self.state.lock().unwrap();
        let f = &state.faults;
        [
            ("fault_429_every", f.fault_429_every),
            ("fault_5xx_every", f.fault_5xx_every),
            ("fault_success_false_every", f.fault_success_false_every),
            ("fault_truncate_every", f.fault_truncate_every),
            ("fault_reset_every", f.fault_reset_every),
            ("fault_repeat_every", f.fault_repeat_every),
        ]
        .into_iter()
        .filter(|(_, every)| *every > 0)
        .map(|(name, _)| (name, state.injected.get(name).copied().unwrap_or(0)))
        .collect()
    }

    /// Every audit-log request so far, in order of arrival.
    pub fn request_log(&self) -> Vec<RequestRecord> {
        self.state.lock().unwrap().log.clone()
    }

    /// Every stored event (tests compare the sinks against this).
    pub fn events(&self) -> Vec<StoredEvent> {
        self.state.lock().unwrap().events.clone()
    }

    /// Live mode: adds `live_per_second` events every second, timed now (or up to
    /// `live_late_seconds` earlier). Runs on the current actix system until it stops.
    pub fn start_live(&self) {
        if self.config.live_per_second <= 0.0 {
            return;
        }
        let emulator = self.clone();
        actix_rt::spawn(async move {
            // Seeded by the start time too: a restarted emulator (the compose demo) must not
            // hand out the same ids again with new times, which real Cloudflare never does.
            let started = Utc::now().timestamp_nanos_opt().unwrap_or_default() as u64;
            let mut rng = StdRng::seed_from_u64(emulator.config.seed ^ 0x11fe ^ started);
            let mut owed = 0.0;
            let mut index = emulator.config.events;
            let mut tick = actix_rt::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                owed += emulator.config.live_per_second;
                let (mut batch, mut v2_batch) = (Vec::new(), Vec::new());
                while owed >= 1.0 {
                    owed -= 1.0;
                    let late =
                        rng.random_range(0..=emulator.config.live_late_seconds * 1000) as i64;
                    let when = (Utc::now() - chrono::Duration::milliseconds(late)).trunc_subsecs(6);
                    batch.push(synthetic_event(index, when, 6, &mut rng, &emulator.config));
                    v2_batch.push(v2::event(index, when, &mut rng, &emulator.config));
                    index += 1;
                }
                emulator.insert(&batch);
                emulator.insert_v2(&v2_batch);
            }
        });
    }

    /// Serves on `config.listen` until the server is stopped; returns the bound address.
    pub fn serve(&self) -> std::io::Result<(SocketAddr, actix_web::dev::Server)> {
        let emulator = self.clone();
        let server = HttpServer::new(move || {
            App::new()
                .app_data(web::Data::new(emulator.clone()))
                .app_data(web::QueryConfig::default().error_handler(|e, _| {
                    actix_web::error::InternalError::from_response(
                        e,
                        Failure::bad_request("invalid query".into()).response(),
                    )
                    .into()
                }))
                .service(
                    web::resource("/client/v4/accounts/{account_id}/audit_logs")
                        .route(web::get().to(account_audit_logs))
                        .default_service(web::to(method_not_allowed)),
                )
                .service(
                    web::resource("/client/v4/accounts/{account_id}/logs/audit")
                        .route(web::get().to(account_logs_audit))
                        .default_service(web::to(method_not_allowed)),
                )
                .service(
                    web::resource("/client/v4/accounts")
                        .route(web::get().to(list_accounts))
                        .default_service(web::to(method_not_allowed)),
                )
                .service(
                    web::resource("/client/v4/user/audit_logs")
                        .route(web::get().to(user_audit_logs))
                        .default_service(web::to(method_not_allowed)),
                )
                // Not part of the Cloudflare API: the container health check of the demo, and
                // the admin calls that change the store (events arriving, events expiring).
                .route("/healthz", web::get().to(HttpResponse::Ok))
                .route("/__admin/events", web::post().to(admin_insert))
                .route("/__admin/expire", web::post().to(admin_expire))
                .default_service(web::to(no_route))
        })
        .workers(1)
        .disable_signals()
        .bind(self.config.listen)?;
        let addr = server.addrs()[0];
        Ok((addr, server.run()))
    }
}

impl State {
    /// The data set of `account` for `api`; `None` for an account the emulator does not have.
    fn store(&self, config: &EmulatorConfig, account: &str, api: Api) -> Option<&[StoredEvent]> {
        let (v1, v2) = if account == config.account_id {
            (&self.events, &self.v2_events)
        } else {
            let other = self.others.get(account)?;
            (&other.events, &other.v2_events)
        };
        Some(match api {
            Api::V1 => v1,
            Api::V2 => v2,
        })
    }

    fn store_mut(
        &mut self,
        config: &EmulatorConfig,
        account: &str,
        api: Api,
    ) -> Option<&mut Vec<StoredEvent>> {
        let (v1, v2) = if account == config.account_id {
            (&mut self.events, &mut self.v2_events)
        } else {
            let other = self.others.get_mut(account)?;
            (&mut other.events, &mut other.v2_events)
        };
        Some(match api {
            Api::V1 => v1,
            Api::V2 => v2,
        })
    }
}

/// The id of extra account `n` (1-based): 32 hex characters, deterministic for the seed.
pub fn extra_account_id(config: &EmulatorConfig, n: usize) -> String {
    format!("{:016x}{:016x}", config.seed ^ 0xacc0_acc0, n)
}

fn sort(events: &mut [StoredEvent]) {
    events.sort_by(|a, b| (a.when, &a.id).cmp(&(b.when, &b.id)));
}

/// Removes the `n` oldest of the (sorted) events; returns them.
pub fn expire(events: &mut Vec<StoredEvent>, n: usize) -> Vec<StoredEvent> {
    events.drain(..n.min(events.len())).collect()
}

/// A failure answer: `{"success":false,"errors":[…],"messages":[],"result":null}`.
struct Failure {
    status: StatusCode,
    errors: Value,
}

impl Failure {
    fn new(status: StatusCode, code: i64, message: &str) -> Failure {
        Failure {
            status,
            errors: json!([{"code": code, "message": message}]),
        }
    }

    /// 400/6003 "Invalid request headers" with the cause in `error_chain`.
    fn bad_headers(code: i64, message: &str) -> Failure {
        Failure {
            status: StatusCode::BAD_REQUEST,
            errors: json!([{"code": 6003, "message": "Invalid request headers", "error_chain": [{"code": code, "message": message}]}]),
        }
    }

    fn bad_request(message: String) -> Failure {
        Failure::new(StatusCode::BAD_REQUEST, 1001, &message)
    }

    fn response(self) -> HttpResponse {
        HttpResponse::build(self.status)
            .content_type("application/json")
            .body(
                json!({"success": false, "errors": self.errors, "messages": [], "result": null})
                    .to_string(),
            )
    }
}

/// `POST /__admin/events` with a JSON array of events: adds them.
async fn admin_insert(body: web::Bytes, emulator: web::Data<Emulator>) -> HttpResponse {
    match serde_json::from_slice::<Vec<Value>>(&body) {
        Ok(events) => {
            emulator.insert(&events);
            HttpResponse::Ok().json(json!({"inserted": events.len()}))
        }
        Err(e) => Failure::bad_request(format!("expected a JSON array of events: {e}")).response(),
    }
}

/// `POST /__admin/expire?oldest=N`: removes the N oldest events, as retention does.
async fn admin_expire(
    query: web::Query<Vec<(String, String)>>,
    emulator: web::Data<Emulator>,
) -> HttpResponse {
    let oldest = query
        .iter()
        .find(|(k, _)| k == "oldest")
        .and_then(|(_, v)| v.parse::<usize>().ok());
    match oldest {
        Some(n) => {
            let expired = emulator.expire_oldest(n);
            HttpResponse::Ok().json(json!({"expired": expired.len()}))
        }
        None => Failure::bad_request("give oldest=N".into()).response(),
    }
}

/// `GET /accounts`: the accounts the token is a member of (those it may read, and the one it
/// may not read audit logs of), by `page` and `per_page` (default 20, at most 50).
async fn list_accounts(
    req: HttpRequest,
    query: web::Query<Vec<(String, String)>>,
    emulator: web::Data<Emulator>,
) -> HttpResponse {
    let config = &emulator.config;
    let credential = match authenticate(&req, config, None, &[]) {
        Ok(credential) => credential,
        Err(failure) => return failure.response(),
    };
    let number = |name: &str, default: usize| {
        last_param(&query, name).map_or(Some(default), |v| {
            v.parse::<usize>().ok().filter(|n| *n >= 1)
        })
    };
    let (Some(page), Some(per_page)) = (number("page", 1), number("per_page", 20)) else {
        return Failure::bad_request("page and per_page must be positive integers".into())
            .response();
    };
    if per_page > 50 {
        return Failure::bad_request("per_page must be at most 50".into()).response();
    }
    let all = emulator.accounts();
    let mut members = readable(config, &credential, &all).to_vec();
    if config.second_token.as_ref() != Some(&credential) {
        members.extend(config.no_access_account.clone());
    }
    let total = members.len();
    let served = if config.accounts_ignore_page { 1 } else { page };
    let result: Vec<Value> = members
        .iter()
        .skip((served - 1) * per_page)
        .take(per_page)
        .map(|id| json!({"id": id, "name": format!("Account {}", &id[..8.min(id.len())]), "type": "standard"}))
        .collect();
    HttpResponse::Ok().json(json!({
        "success": true, "errors": [], "messages": [], "result": result,
        "result_info": {"page": page, "per_page": per_page, "count": result.len(),
                        "total_count": total, "total_pages": total.div_ceil(per_page)}
    }))
}

async fn no_route() -> HttpResponse {
    Failure::new(StatusCode::NOT_FOUND, 7003, "No route for the URI").response()
}

async fn method_not_allowed() -> HttpResponse {
    Failure::new(
        StatusCode::METHOD_NOT_ALLOWED,
        7001,
        "Method not allowed for this route",
    )
    .response()
}

async fn account_audit_logs(
    req: HttpRequest,
    path: web::Path<String>,
    query: web::Query<Vec<(String, String)>>,
    emulator: web::Data<Emulator>,
) -> HttpResponse {
    logged(
        &req,
        Api::V1,
        Some(path.into_inner()),
        query.into_inner(),
        &emulator,
    )
    .await
}

async fn account_logs_audit(
    req: HttpRequest,
    path: web::Path<String>,
    query: web::Query<Vec<(String, String)>>,
    emulator: web::Data<Emulator>,
) -> HttpResponse {
    logged(
        &req,
        Api::V2,
        Some(path.into_inner()),
        query.into_inner(),
        &emulator,
    )
    .await
}

async fn user_audit_logs(
    req: HttpRequest,
    query: web::Query<Vec<(String, String)>>,
    emulator: web::Data<Emulator>,
) -> HttpResponse {
    logged(&req, Api::V1, None, query.into_inner(), &emulator).await
}

/// Serves the page and notes the request in the log.
async fn logged(
    req: &HttpRequest,
    api: Api,
    account: Option<String>,
    query: Vec<(String, String)>,
    emulator: &Emulator,
) -> HttpResponse {
    let arrived = Instant::now();
    let auth_headers = ["authorization", "x-auth-email", "x-auth-key"]
        .iter()
        .filter_map(|name| {
            let value = req.headers().get(*name)?.to_str().ok()?;
            Some((name.to_string(), value.to_owned()))
        })
        .collect();
    let response = serve_page(req, api, account, query.clone(), emulator).await;
    let retry_after = response
        .headers()
        .get(actix_web::http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok()?.parse().ok());
    let mut state = emulator.state.lock().unwrap();
    if state.log.len() >= REQUEST_LOG_CAP {
        // A long-running emulator (the demo) keeps the recent half.
        state.log.drain(..REQUEST_LOG_CAP / 2);
    }
    state.log.push(RequestRecord {
        arrived,
        path: req.path().to_owned(),
        query,
        auth_headers,
        status: response.status().as_u16(),
        retry_after,
    });
    response
}

/// Who is asking: the credential key for rate limiting, or the failure to answer.
fn authenticate(
    req: &HttpRequest,
    config: &EmulatorConfig,
    account: Option<&str>,
    known_accounts: &[String],
) -> Result<String, Failure> {
    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
    let credential = if let Some(authorization) = header("authorization") {
        let Some(token) = authorization
            .strip_prefix("Bearer ")
            .filter(|t| !t.trim().is_empty() && !t.contains(' '))
        else {
            return Err(Failure::bad_headers(
                6111,
                "Invalid format for Authorization header",
            ));
        };
        if token != config.token && config.second_token.as_deref() != Some(token) {
            return Err(Failure::new(
                StatusCode::UNAUTHORIZED,
                9109,
                "Invalid access token",
            ));
        }
        token.to_owned()
    } else if let (Some(email), Some(key)) = (header("x-auth-email"), header("x-auth-key")) {
        if !email.contains('@') {
            return Err(Failure::bad_headers(
                6102,
                "Invalid format for X-Auth-Email header",
            ));
        }
        if key.len() != 37 || !key.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(Failure::bad_headers(
                6103,
                "Invalid format for X-Auth-Key header",
            ));
        }
        if config.key_credential.as_ref() != Some(&(email.to_owned(), key.to_owned())) {
            return Err(Failure::new(
                StatusCode::FORBIDDEN,
                9103,
                "Unknown X-Auth-Key or X-Auth-Email",
            ));
        }
        email.to_owned()
    } else {
        return Err(Failure::bad_headers(
            6111,
            "Invalid format for Authorization header",
        ));
    };
    if let Some(account) = account {
        if config.deleted_account.as_deref() == Some(account) {
            return Err(Failure::new(
                StatusCode::NOT_FOUND,
                7003,
                &format!(
                    "Could not route to {}, perhaps your object identifier is invalid?",
                    req.path()
                ),
            ));
        }
        if !readable(config, &credential, known_accounts)
            .iter()
            .any(|a| a == account)
        {
            return Err(Failure::new(
                StatusCode::FORBIDDEN,
                10000,
                "Authentication error",
            ));
        }
    }
    Ok(credential)
}

/// The accounts (of `known`, in order) `credential` may read: the second token the last
/// `--second-token-accounts`, every other credential the rest.
fn readable<'a>(config: &EmulatorConfig, credential: &str, known: &'a [String]) -> &'a [String] {
    let (first, second) =
        known.split_at(known.len() - config.second_token_accounts.min(known.len()));
    if config.second_token.as_deref() == Some(credential) {
        second
    } else {
        first
    }
}

/// `EMAIL:KEY` of `--key-credential`.
fn parse_key_credential(value: &str) -> Result<(String, String), String> {
    value
        .split_once(':')
        .map(|(email, key)| (email.to_owned(), key.to_owned()))
        .ok_or_else(|| "expected EMAIL:KEY".to_owned())
}

/// `YYYY-MM-DD` (UTC midnight) or RFC 3339 with any precision and offset.
fn parse_bound(value: &str) -> Option<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(value) {
        return Some(t.with_timezone(&Utc));
    }
    NaiveDate::parse_from_str(value, "%Y-%m-%d")
        .ok()
        .map(|d| d.and_hms_opt(0, 0, 0).unwrap().and_utc())
}

async fn serve_page(
    req: &HttpRequest,
    api: Api,
    account: Option<String>,
    query: Vec<(String, String)>,
    emulator: &Emulator,
) -> HttpResponse {
    let config = &emulator.config;
    // Every request counts, refused ones included.
    let (request_no, faults) = {
        let mut state = emulator.state.lock().unwrap();
        state.requests += 1;
        let request_no = state.requests;
        let due: Vec<(Api, StoreAction)> = {
            let (due, later) = std::mem::take(&mut state.on_request)
                .into_iter()
                .partition(|(n, _, _)| *n <= request_no);
            state.on_request = later;
            due.into_iter()
                .map(|(_, api, action)| (api, action))
                .collect()
        };
        for (api, action) in due {
            let store = match api {
                Api::V1 => &mut state.events,
                Api::V2 => &mut state.v2_events,
            };
            action(store);
            sort(store);
        }
        (request_no, state.faults.clone())
    };
    let credential = match authenticate(req, config, account.as_deref(), &emulator.accounts()) {
        Ok(credential) => credential,
        Err(failure) => return failure.response(),
    };
    if faults.latency_ms > 0 {
        actix_rt::time::sleep(Duration::from_millis(faults.latency_ms)).await;
    }
    // Rate limit: a fixed window per credential, then a lockout during which every request
    // gets 429 and does not count towards the next window.
    let (remaining, reset) = {
        let mut state = emulator.state.lock().unwrap();
        let now = Instant::now();
        let window = Duration::from_secs(config.rate_window_seconds);
        let w = state.windows.entry(credential).or_insert(RateWindow {
            started: now,
            count: 0,
            blocked_until: None,
        });
        if let Some(until) = w.blocked_until {
            if now < until {
                return too_many(until - now);
            }
            *w = RateWindow {
                started: now,
                count: 0,
                blocked_until: None,
            };
        }
        if now.duration_since(w.started) >= window {
            *w = RateWindow {
                started: now,
                count: 0,
                blocked_until: None,
            };
        }
        w.count += 1;
        if w.count > config.rate_limit {
            let lockout = Duration::from_secs(config.lockout_seconds);
            w.blocked_until = Some(now + lockout);
            return too_many(lockout);
        }
        (
            config.rate_limit - w.count,
            ceil_seconds(window.saturating_sub(now.duration_since(w.started))),
        )
    };
    let every = |n: u64| n > 0 && request_no % n == 0;
    let injected = |name: &'static str| {
        *emulator
            .state
            .lock()
            .unwrap()
            .injected
            .entry(name)
            .or_insert(0) += 1;
    };
    if every(faults.fault_429_every) {
        injected("fault_429_every");
        return too_many(Duration::from_secs(faults.retry_after_seconds));
    }
    if every(faults.fault_5xx_every) {
        injected("fault_5xx_every");
        let status = [
            StatusCode::INTERNAL_SERVER_ERROR,
            StatusCode::BAD_GATEWAY,
            StatusCode::SERVICE_UNAVAILABLE,
        ][(request_no % 3) as usize];
        return Failure::new(status, 10001, "Internal server error").response();
    }
    if every(faults.fault_success_false_every) {
        injected("fault_success_false_every");
        return Failure::new(StatusCode::OK, 10001, "Temporary failure, please retry").response();
    }
    let previous = emulator
        .state
        .lock()
        .unwrap()
        .previous_page
        .get(&api)
        .cloned();
    let body = match previous {
        Some(previous) if every(faults.fault_repeat_every) => {
            injected("fault_repeat_every");
            Ok(previous)
        }
        _ => {
            let state = emulator.state.lock().unwrap();
            let account = account.as_deref().unwrap_or(&config.account_id);
            let store = state.store(config, account, api).unwrap_or_default();
            match api {
                Api::V1 => page_body(&query, store, config),
                Api::V2 => v2::page_body(&query, store, config),
            }
        }
    };
    if let Ok(body) = &body {
        emulator
            .state
            .lock()
            .unwrap()
            .previous_page
            .insert(api, body.clone());
    }
    let mut response = match body {
        Ok(body) if every(faults.fault_reset_every) => {
            injected("fault_reset_every");
            // Half the body, a moment for it to reach the client, then the stream fails and
            // the server drops the connection.
            use futures::StreamExt;
            let half = actix_web::web::Bytes::from(body[..body.len() / 2].to_vec());
            let first = futures::stream::once(async move { Ok::<_, std::io::Error>(half) });
            let reset = futures::stream::once(async {
                actix_rt::time::sleep(Duration::from_millis(50)).await;
                Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionReset,
                    "emulated reset",
                ))
            });
            HttpResponse::Ok()
                .content_type("application/json")
                .streaming(first.chain(reset))
        }
        Ok(body) => {
            let body = if every(faults.fault_truncate_every) {
                injected("fault_truncate_every");
                body[..body.len() / 2].to_vec()
            } else {
                body
            };
            HttpResponse::Ok()
                .content_type("application/json")
                .body(body)
        }
        Err(failure) => failure.response(),
    };
    let headers = response.headers_mut();
    let value = |s: String| actix_web::http::header::HeaderValue::from_str(&s).expect("ascii");
    headers.insert(
        "ratelimit".parse().unwrap(),
        value(format!("\"default\";r={remaining};t={reset}")),
    );
    headers.insert(
        "ratelimit-policy".parse().unwrap(),
        value(format!(
            "\"default\";q={};w={}",
            config.rate_limit, config.rate_window_seconds
        )),
    );
    response
}

/// Whole seconds, rounded up: a client that waits this long is past the deadline.
fn ceil_seconds(wait: Duration) -> u64 {
    wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
}

fn too_many(wait: Duration) -> HttpResponse {
    let seconds = ceil_seconds(wait);
    let mut response = Failure::new(
        StatusCode::TOO_MANY_REQUESTS,
        971,
        "Please wait and consider throttling your request speed",
    )
    .response();
    response.headers_mut().insert(
        actix_web::http::header::RETRY_AFTER,
        actix_web::http::header::HeaderValue::from(seconds.max(1)),
    );
    response
}

/// The success body for one page, or a 400 failure for a bad parameter.
fn page_body(
    query: &[(String, String)],
    events: &[StoredEvent],
    config: &EmulatorConfig,
) -> Result<Vec<u8>, Failure> {
    let param = |name: &str| last_param(query, name);
    let number =
        |name: &str, default: usize| -> Result<usize, Failure> {
            match param(name) {
                None => Ok(default),
                Some(v) => v.parse::<usize>().ok().filter(|n| *n >= 1).ok_or_else(|| {
                    Failure::bad_request(format!("{name} must be a positive integer"))
                }),
            }
        };
    let per_page = number("per_page", 100)?;
    if per_page > 1000 {
        return Err(Failure::bad_request("per_page must be at most 1000".into()));
    }
    let page = number("page", 1)?;
    let bound = |name: &str| -> Result<Option<DateTime<Utc>>, Failure> {
        match param(name) {
            None => Ok(None),
            Some(v) => parse_bound(v).map(Some).ok_or_else(|| {
                Failure::bad_request(format!("{name} must be a date or an RFC 3339 time"))
            }),
        }
    };
    let since = bound("since")?;
    let before = bound("before")?;
    let desc = match param("direction") {
        None | Some("desc") => true,
        Some("asc") => false,
        Some(other) => {
            return Err(Failure::bad_request(format!(
                "direction {other:?} must be asc or desc"
            )))
        }
    };
    let hide_user_logs = param("hide_user_logs") == Some("true");
    let actor_ip =
        match param("actor.ip") {
            None => None,
            Some(v) => Some(v.parse::<IpNetwork>().map_err(|_| {
                Failure::bad_request("actor.ip must be an IP or a CIDR range".into())
            })?),
        };
    let retention = Utc::now() - chrono::Duration::days(548);

    let start = events.partition_point(|e| e.when < since.unwrap_or(retention).max(retention));
    let end = match before {
        Some(b) if config.before_inclusive => events.partition_point(|e| e.when <= b),
        Some(b) => events.partition_point(|e| e.when < b),
        None => events.len(),
    };
    let matches = |e: &&StoredEvent| {
        param("id").is_none_or(|id| e.id == id)
            && param("action.type").is_none_or(|t| e.action_type.as_deref() == Some(t))
            && param("actor.email").is_none_or(|m| {
                e.actor_email
                    .as_deref()
                    .is_some_and(|x| x.eq_ignore_ascii_case(m))
            })
            && param("zone.name").is_none_or(|z| e.zone_name.as_deref() == Some(z))
            && actor_ip.is_none_or(|net| e.actor_ip.is_some_and(|ip| net.contains(ip)))
            && !(hide_user_logs && e.user_level)
    };
    let window = &events[start..end.max(start)];
    let offset = (page - 1) * per_page;
    let selected: Vec<&StoredEvent> = if desc {
        window
            .iter()
            .rev()
            .filter(matches)
            .skip(offset)
            .take(per_page)
            .collect()
    } else {
        window
            .iter()
            .filter(matches)
            .skip(offset)
            .take(per_page)
            .collect()
    };
    if selected.is_empty() && config.past_end_400 && page > 1 {
        let total = window.iter().filter(matches).count();
        if total > 0 && total == offset {
            return Err(Failure::bad_request("page is out of range".into()));
        }
    }
    let mut body =
        Vec::with_capacity(selected.iter().map(|e| e.json.len() + 1).sum::<usize>() + 128);
    body.extend_from_slice(b"{\"success\":true,\"errors\":");
    body.extend_from_slice(if config.errors_null { b"null" } else { b"[]" });
    body.extend_from_slice(b",\"messages\":[],\"result\":[");
    for (i, event) in selected.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(&event.json);
    }
    body.push(b']');
    if config.result_info {
        body.extend_from_slice(
            format!(",\"result_info\":{{\"page\":{page},\"per_page\":{per_page}}}").as_bytes(),
        );
    }
    body.push(b'}');
    Ok(body)
}

/// The synthetic events with their times, deterministic for (seed, count, span, end).
pub fn generate(config: &EmulatorConfig) -> Vec<(DateTime<Utc>, Value)> {
    let mut rng = StdRng::seed_from_u64(config.seed);
    let end = config
        .end
        .unwrap_or_else(|| Utc::now().trunc_subsecs(0) - chrono::Duration::hours(1));
    let span_micros = (config.days * 86_400e6) as i64;
    let start = end - chrono::Duration::microseconds(span_micros);
    let n = config.events.max(1) as i64;
    let mut when = start;
    let mut precision = 0;
    let mut events = Vec::with_capacity(config.events);
    for i in 0..config.events {
        // 20 % of events share the previous one's exact `when`: bursts across page boundaries.
        if i == 0 || rng.random_range(0..10) >= 2 {
            let gap = rng.random_range(0..=(2 * span_micros / n).max(1));
            precision = [0, 3, 5, 6, 6, 9][i % 6];
            when = (when + chrono::Duration::microseconds(gap))
                .min(end)
                .trunc_subsecs(precision);
        }
        events.push((when, synthetic_event(i, when, precision, &mut rng, config)));
    }
    events
}

fn uuid_from(rng: &mut StdRng) -> String {
    uuid::Builder::from_random_bytes(rng.random())
        .into_uuid()
        .to_string()
}

fn format_when(t: DateTime<Utc>, precision: u16) -> String {
    let format = match precision {
        0 => SecondsFormat::Secs,
        3 => SecondsFormat::Millis,
        6 => SecondsFormat::Micros,
        _ => SecondsFormat::Nanos,
    };
    let text = t.to_rfc3339_opts(format, true);
    if precision == 5 {
        // Five digits, as Cloudflare drops a trailing zero: "…:48.87573Z".
        let micros = t.to_rfc3339_opts(SecondsFormat::Micros, true);
        return format!("{}Z", &micros[..micros.len() - 2]);
    }
    text
}

/// One event in a shape chosen by its index: mostly ordinary, with every shape the real API is known to send.
fn synthetic_event(
    i: usize,
    t: DateTime<Utc>,
    precision: u16,
    rng: &mut StdRng,
    config: &EmulatorConfig,
) -> Value {
    const ACTIONS: &[&str] = &[
        "change_setting",
        "rec_add",
        "rec_del",
        "login",
        "token_create",
        "token_revoke",
        "API_key_view",
        "purge",
        "delete",
    ];
    const RESOURCES: &[&str] = &[
        "zone",
        "account",
        "user",
        "DNS_record",
        "api_key",
        "d1.database",
    ];
    const INTERFACES: &[&str] = &["API", "UI", ""];
    const EMAILS: &[&str] = &[
        "alice@example.com",
        "bob@example.com",
        "zoë@exämple.com",
        "a+b@example.com",
        "OPS@EXAMPLE.COM",
    ];
    let id = uuid_from(rng);
    let action = ACTIONS[rng.random_range(0..ACTIONS.len())];
    let ip = if rng.random_bool(0.8) {
        format!("198.51.100.{}", rng.random_range(1..255))
    } else {
        format!(
            "2a02:cf40:add:4002:{:x}::{:x}",
            rng.random_range(0..0xffff),
            rng.random_range(1..0xffff)
        )
    };
    let mut e = json!({
        "id": id,
        "action": {"type": action, "result": rng.random_bool(0.9)},
        "actor": {"email": EMAILS[rng.random_range(0..EMAILS.len())], "id": format!("{:032x}", rng.random::<u128>()), "ip": ip, "type": "user"},
        "interface": INTERFACES[i % 3],
        "metadata": {"zone_name": format!("zone{}.example.com", i % 7)},
        "newValue": "", "oldValue": "",
        "owner": {"id": config.account_id},
        "resource": {"id": format!("{:032x}", rng.random::<u128>()), "type": RESOURCES[rng.random_range(0..RESOURCES.len())]},
        "when": format_when(t, precision),
    });
    match i % 29 {
        1 => e["actor"] = json!({"id": "1", "type": "system"}),
        2 => e["actor"]["ip"] = json!("1b11:a1b2:12b1:12a::11a:1b"),
        3 => e["actor"]["ip"] = json!(""),
        4 => e["actor"]["ip"] = Value::Null,
        5 => e["actor"]["type"] = json!(["admin", "Cloudflare", "robot"][i % 3]),
        6 => e["metadata"] = json!({}),
        7 => e["metadata"] = Value::Null,
        8 => {
            e.as_object_mut().unwrap().remove("metadata");
        }
        9 => e["metadata"] = [json!("text"), json!(42), json!([1, 2])][i % 3].clone(),
        10 => e["metadata"] = json!({"value": true, "ttl": 1, "nested": {"a": [1, {"b": null}]}}),
        11 => {
            e["newValue"] = json!("null");
            e["oldValue"] = json!("{\"a\":1}");
        }
        12 => {
            e["newValueJson"] = json!({"type": "A", "name": "www", "content": "192.0.2.1", "ttl": 300, "proxied": true})
        }
        13 => e["oldValueJson"] = json!(["not", "an", "object"]),
        14 => {
            e["action"]["info"] = json!("key digest: c6b5");
            e["action"]["result"] = json!(false);
        }
        15 => {
            e.as_object_mut().unwrap().remove("interface");
        }
        16 => e["when"] = json!(t.to_rfc3339_opts(SecondsFormat::Micros, false)), // "+00:00"
        17 => {
            let ist = chrono::FixedOffset::east_opt(5 * 3600 + 1800).unwrap();
            e["when"] = json!(t
                .with_timezone(&ist)
                .to_rfc3339_opts(SecondsFormat::AutoSi, false));
        }
        18 => e["resource"]["id"] = json!("10715065315"),
        19 => {
            e.as_object_mut().unwrap().remove("owner");
        }
        20 => e["foo"] = json!({"bar": [1, "two"], "unknown": true}),
        21 => e["actor"]["email"] = Value::Null,
        _ => {}
    }
    if config.invalid_every > 0 && i % config.invalid_every == config.invalid_every - 1 {
        if i.is_multiple_of(2) {
            e.as_object_mut().unwrap().remove("id");
        } else {
            e["when"] = json!("not-a-time");
        }
    }
    e
}
