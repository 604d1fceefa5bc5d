//! Shared test fixtures: a fresh PostgreSQL database per test, the emulator on a free port,
//! and the independent Parquet reader.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use cfaudit::settings::{Secret, Settings};
use cfaudit_emulator::{Emulator, EmulatorConfig, DEMO_ACCOUNT, DEMO_TOKEN};
use serde_json::{json, Value};
use sqlx::{Connection, PgConnection};

pub fn admin_url() -> String {
    std::env::var("CFAUDIT_TEST_ADMIN_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// The TimescaleDB cluster's admin URL (`make test` starts it from `../shared/tools/timescaledb`
/// and sets `CFAUDIT_TEST_TIMESCALE_URL`). Without it a test says loudly that TimescaleDB was
/// not tested and returns `None`; where `CFAUDIT_REQUIRE_TIMESCALEDB=1` (CI) it fails instead.
pub fn timescale_admin_url(test: &str) -> Option<String> {
    if let Some(url) = std::env::var("CFAUDIT_TEST_TIMESCALE_URL")
        .ok()
        .filter(|url| !url.is_empty())
    {
        return Some(url);
    }
    let required = std::env::var("CFAUDIT_REQUIRE_TIMESCALEDB").is_ok_and(|v| v == "1");
    assert!(
        !required,
        "{test}: TimescaleDB is required here but CFAUDIT_TEST_TIMESCALE_URL is not set \
         (make test starts the cluster from ../shared/tools/timescaledb)"
    );
    eprintln!(
        "WARNING: {test}: TimescaleDB NOT TESTED: CFAUDIT_TEST_TIMESCALE_URL is not set \
         (make test sets it where ../shared/tools/timescaledb exists)"
    );
    None
}

/// The PostgreSQL clusters a schema or SQL test runs on: plain PostgreSQL (127.0.0.1:5432) and
/// TimescaleDB (127.0.0.1:5440, started by `make test`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cluster {
    Postgres,
    Timescaledb,
}

impl Cluster {
    /// The cluster's admin URL; `None` (said loudly, or a failure where TimescaleDB is
    /// required) for TimescaleDB where it is not available.
    pub fn admin_url(self, test: &str) -> Option<String> {
        match self {
            Cluster::Postgres => Some(admin_url()),
            Cluster::Timescaledb => timescale_admin_url(test),
        }
    }
}

/// The database behind `pool` is of `cluster`'s kind: on TimescaleDB `audit_logs` is a
/// hypertable, on plain PostgreSQL there is no TimescaleDB, so a test shows which path it took.
pub async fn assert_runs_on(pool: &sqlx::PgPool, cluster: Cluster) {
    let (extension,): (bool,) =
        sqlx::query_as("SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')")
            .fetch_one(pool)
            .await
            .unwrap();
    let hypertable = extension && {
        let (found,): (bool,) = sqlx::query_as(
            "SELECT EXISTS (SELECT 1 FROM timescaledb_information.hypertables \
                            WHERE hypertable_name = 'audit_logs')",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        found
    };
    assert_eq!(
        hypertable,
        cluster == Cluster::Timescaledb,
        "audit_logs is a hypertable exactly on TimescaleDB ({cluster:?})"
    );
}

/// Runs each named `async fn(Cluster)` as two tests, `<name>::postgres` and
/// `<name>::timescaledb`, so every schema or SQL path is tested on both clusters.
macro_rules! on_both_clusters {
    ($($(#[$meta:meta])* $name:ident),* $(,)?) => {
        $(
            mod $name {
                $(#[$meta])*
                #[actix_web::test]
                async fn postgres() {
                    super::$name($crate::common::Cluster::Postgres).await
                }
                $(#[$meta])*
                #[actix_web::test]
                async fn timescaledb() {
                    super::$name($crate::common::Cluster::Timescaledb).await
                }
            }
        )*
    };
}

/// A database of its own, dropped by [`TestDb::drop_db`].
pub struct TestDb {
    pub name: String,
    pub url: String,
    /// The cluster's maintenance database, where this one is created and dropped.
    pub admin: String,
}

impl TestDb {
    /// On the plain PostgreSQL cluster.
    pub async fn new() -> TestDb {
        TestDb::on(&admin_url()).await
    }

    /// On the cluster of `admin` (a URL of its maintenance database).
    pub async fn on(admin: &str) -> TestDb {
        let name = format!("cfaudit_test_{}", uuid::Uuid::new_v4().simple());
        let mut connection = PgConnection::connect(admin).await.unwrap_or_else(|e| {
            panic!("PostgreSQL must answer at {admin} (make test starts it; CFAUDIT_TEST_ADMIN_URL changes it): {e}")
        });
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut connection)
            .await
            .unwrap();
        let mut url = url::Url::parse(admin).unwrap();
        url.set_path(&name);
        TestDb {
            name,
            url: url.to_string(),
            admin: admin.to_owned(),
        }
    }

    /// A fresh database on `cluster`, migrated, with the PostgreSQL adapter over it; `None`
    /// where that cluster is not available (see [`Cluster::admin_url`]).
    pub async fn migrated(
        cluster: Cluster,
        test: &str,
    ) -> Option<(TestDb, cfaudit::sinks::postgres::Postgres)> {
        let db = TestDb::on(&cluster.admin_url(test)?).await;
        let pg = cfaudit::sinks::postgres::Postgres::connect(&secret(&db.url), 2, None)
            .await
            .unwrap();
        pg.migrate().await.unwrap();
        Some((db, pg))
    }

    pub async fn pool(&self) -> sqlx::PgPool {
        sqlx::PgPool::connect(&self.url).await.unwrap()
    }

    pub async fn drop_db(self) {
        let mut admin = PgConnection::connect(&self.admin).await.unwrap();
        let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        )))
        .execute(&mut admin)
        .await;
    }
}

/// The emulator, serving in this actix system on a free port.
pub struct RunningEmulator {
    pub emulator: Emulator,
    pub base_url: String,
    pub handle: actix_web::dev::ServerHandle,
}

pub fn emulator_config(events: usize) -> EmulatorConfig {
    let mut config = EmulatorConfig::new(events);
    config.listen = "127.0.0.1:0".parse().unwrap();
    config
}

pub fn spawn_emulator(config: EmulatorConfig) -> RunningEmulator {
    let emulator = Emulator::new(config);
    let (addr, server) = emulator.serve().unwrap();
    let handle = server.handle();
    actix_rt::spawn(server);
    RunningEmulator {
        emulator,
        base_url: format!("http://{addr}/client/v4"),
        handle,
    }
}

/// Environment for a run against `emulator`, `db` and a Parquet folder.
pub fn run_env(base_url: &str, db: &TestDb, parquet: &Path) -> Vec<(String, String)> {
    [
        ("CLOUDFLARE_API_TOKEN", DEMO_TOKEN.to_owned()),
        ("CLOUDFLARE_ACCOUNT_ID", DEMO_ACCOUNT.to_owned()),
        ("CLOUDFLARE_API_BASE_URL", base_url.to_owned()),
        ("DATABASE_URL", db.url.clone()),
        ("PARQUET_URL", format!("file://{}", parquet.display())),
        ("INITIAL_CHECKPOINT", "2000-01-01".to_owned()),
        ("CLOUDFLARE_PER_PAGE", "1000".to_owned()),
        ("RETRY_INITIAL_MILLIS", "20".to_owned()),
        ("RETRY_MAX_SECONDS", "1".to_owned()),
        ("LOG_FORMAT", "json".to_owned()),
        // The emulator answers fast: the real budget would only slow the tests down.
        ("CLOUDFLARE_REQUESTS_PER_5_MINUTES", "1000000".to_owned()),
        ("CLOUDFLARE_REQUEST_BURST", "1000".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

pub fn config_from(env: &[(String, String)]) -> Settings {
    Settings::load_from(None, env.to_vec()).expect("valid test config")
}

pub fn set(env: &mut Vec<(String, String)>, key: &str, value: &str) {
    env.retain(|(k, _)| k != key);
    env.push((key.to_owned(), value.to_owned()));
}

/// The ids of the events the emulator holds that must become rows: a JSON object with a
/// non-empty string `id` and an RFC 3339 `when`. Decided here from the API facts, not by the
/// mapper under test.
pub fn valid_ids(emulator: &Emulator) -> std::collections::BTreeSet<String> {
    valid_v1_ids(&emulator.events())
}

/// As [`valid_ids`], for the v1 events of one of the emulator's accounts.
pub fn valid_ids_of(emulator: &Emulator, account: &str) -> std::collections::BTreeSet<String> {
    valid_v1_ids(&emulator.events_of(account, cfaudit_emulator::Api::V1))
}

fn valid_v1_ids(events: &[cfaudit_emulator::StoredEvent]) -> std::collections::BTreeSet<String> {
    events
        .iter()
        .filter_map(|e| {
            let event: Value = serde_json::from_slice(&e.json).ok()?;
            let id = event
                .get("id")?
                .as_str()
                .filter(|id| !id.trim().is_empty())?;
            let when = event.get("when")?.as_str()?;
            chrono::DateTime::parse_from_rfc3339(when.trim()).ok()?;
            Some(id.to_owned())
        })
        .collect()
}

/// The ids of the emulator's v2 events that must become rows: a JSON object with a non-empty
/// string `id` and an RFC 3339 `action.time`.
pub fn valid_ids_v2(emulator: &Emulator) -> std::collections::BTreeSet<String> {
    emulator
        .events_v2()
        .iter()
        .filter_map(|e| {
            let event: Value = serde_json::from_slice(&e.json).ok()?;
            let id = event
                .get("id")?
                .as_str()
                .filter(|id| !id.trim().is_empty())?;
            let time = event.get("action")?.get("time")?.as_str()?;
            chrono::DateTime::parse_from_rfc3339(time.trim()).ok()?;
            Some(id.to_owned())
        })
        .collect()
}

/// Every fault the emulator has enabled was injected at least once (a test's faults are real,
/// not switched on and never reached); returns the counts.
pub fn assert_faults_hit(emulator: &Emulator) -> BTreeMap<&'static str, u64> {
    let injected = emulator.faults_injected();
    assert!(
        injected.values().all(|&n| n > 0),
        "faults enabled but never injected: {injected:?}"
    );
    injected
}

/// Rows, distinct keys and distinct ids in `audit_logs`.
pub async fn pg_counts(pool: &sqlx::PgPool) -> (i64, i64, i64) {
    sqlx::query_as("SELECT count(*), count(DISTINCT (timestamp, event_id)), count(DISTINCT event_id) FROM audit_logs")
        .fetch_one(pool)
        .await
        .unwrap()
}

pub async fn pg_ids(pool: &sqlx::PgPool) -> std::collections::BTreeSet<String> {
    let ids: Vec<(String,)> = sqlx::query_as("SELECT event_id FROM audit_logs")
        .fetch_all(pool)
        .await
        .unwrap();
    ids.into_iter().map(|(id,)| id).collect()
}

/// The Python with the independent Parquet readers (pyarrow, DuckDB).
pub fn python() -> PathBuf {
    if let Ok(python) = std::env::var("CFAUDIT_PYTHON") {
        return python.into();
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    assert!(venv.exists(), "no Python with pyarrow and duckdb: run `make test` (it creates .venv) or set CFAUDIT_PYTHON");
    venv
}

/// Every row of the dataset, column by column, keyed by event id, from the independent reader.
pub fn parquet_rows(root: &str, env: &[(String, String)]) -> Value {
    let mut env = env.to_vec();
    env.push(("PARQUET_CHECK_ROWS".into(), "1".into()));
    let mut counts = parquet_counts(root, &env, false);
    counts["rows"].take()
}

/// The row an API event must become, derived here from the API facts and the design notes'
/// mapping, not by the mapper under test: every column as text (timestamps in RFC 3339 with
/// microseconds, JSON columns as parsed values).
pub fn expected_row(raw: &[u8]) -> Option<BTreeMap<&'static str, Value>> {
    let event: Value = serde_json::from_slice(raw).ok()?;
    // v1 events have `when`, v2 events `action.time`.
    let v2 =
        event.get("when").is_none() && event.get("action").and_then(|a| a.get("time")).is_some();
    let id = event
        .get("id")?
        .as_str()
        .filter(|id| !id.trim().is_empty())?;
    let time = match v2 {
        false => event.get("when")?.as_str()?,
        true => event["action"]["time"].as_str()?,
    };
    let when = chrono::DateTime::parse_from_rfc3339(time.trim()).ok()?;
    let stamp = chrono::DateTime::<chrono::Utc>::from_timestamp_micros(
        when.with_timezone(&chrono::Utc).timestamp_micros(),
    )
    .unwrap()
    .format("%Y-%m-%dT%H:%M:%S%.6fZ")
    .to_string();
    // PostgreSQL cannot hold a NUL: the design stores it as the text `\u0000`.
    fn without_nul(value: &Value) -> Value {
        match value {
            Value::String(s) => Value::String(s.replace('\0', "\\u0000")),
            Value::Array(items) => Value::Array(items.iter().map(without_nul).collect()),
            Value::Object(map) => Value::Object(
                map.iter()
                    .map(|(k, v)| (k.replace('\0', "\\u0000"), without_nul(v)))
                    .collect(),
            ),
            other => other.clone(),
        }
    }
    let event = without_nul(&event);
    let text = |object: &str, field: &str| match event.get(object).and_then(|o| o.get(field)) {
        None | Some(Value::Null) => Value::Null,
        Some(Value::String(s)) => Value::String(s.clone()),
        Some(other) => Value::String(other.to_string()),
    };
    let ip = match text("actor", if v2 { "ip_address" } else { "ip" }) {
        Value::String(ip) => ip
            .trim()
            .parse::<std::net::IpAddr>()
            .map_or(Value::Null, |ip| Value::String(ip.to_string())),
        _ => Value::Null,
    };
    let mut row = BTreeMap::from([
        ("event_id", Value::String(id.replace('\0', "\\u0000"))),
        ("timestamp", Value::String(stamp)),
        ("account_id", Value::String(DEMO_ACCOUNT.to_owned())),
        (
            "api_version",
            Value::String(if v2 { "v2" } else { "v1" }.into()),
        ),
        ("actor_email", text("actor", "email")),
        ("actor_type", text("actor", "type")),
        ("action_type", text("action", "type")),
        ("action_result", text("action", "result")),
        ("resource_type", text("resource", "type")),
        ("resource_id", text("resource", "id")),
        ("ip_address", ip),
        ("raw_event", event.clone()),
    ]);
    // The detail columns: v2's from its fields of those names; v1 has only the actor's id and
    // `metadata.zone_name`, and its metadata.
    const DETAIL: [(&str, &str, &str); 13] = [
        ("actor_id", "actor", "id"),
        ("actor_context", "actor", "context"),
        ("actor_token_id", "actor", "token_id"),
        ("actor_token_name", "actor", "token_name"),
        ("action_description", "action", "description"),
        ("resource_product", "resource", "product"),
        ("resource_scope", "resource", "scope"),
        ("zone_id", "zone", "id"),
        ("zone_name", "zone", "name"),
        ("raw_method", "raw", "method"),
        ("raw_uri", "raw", "uri"),
        ("raw_cf_ray_id", "raw", "cf_ray_id"),
        ("raw_user_agent", "raw", "user_agent"),
    ];
    for (column, object, field) in DETAIL {
        row.insert(column, if v2 { text(object, field) } else { Value::Null });
    }
    if v2 {
        let status = match event.get("raw").and_then(|r| r.get("status_code")) {
            Some(Value::Number(n)) => n.as_i64().map_or(Value::Null, |n| json!(n)),
            Some(Value::String(s)) => s.trim().parse::<i64>().map_or(Value::Null, |n| json!(n)),
            _ => Value::Null,
        };
        row.insert("raw_status_code", status);
        row.insert("metadata", Value::Null);
    } else {
        row.insert("raw_status_code", Value::Null);
        row.insert(
            "metadata",
            event.get("metadata").cloned().unwrap_or(Value::Null),
        );
        row.insert("actor_id", text("actor", "id"));
        let zone_name = match event.get("metadata").and_then(|m| m.get("zone_name")) {
            Some(Value::String(name)) if !name.is_empty() => Value::String(name.clone()),
            _ => Value::Null,
        };
        row.insert("zone_name", zone_name);
    }
    Some(row)
}

/// Every column of every row in both sinks equals the ground truth of the API's events
/// (those in `ids`), and `ingestion_time` is the same in both: read by the independent
/// reader on the Parquet side and in SQL on the PostgreSQL side.
pub async fn assert_columns_match_ground_truth(
    pool: &sqlx::PgPool,
    lake: &str,
    reader_env: &[(String, String)],
    events: &[cfaudit_emulator::StoredEvent],
    ids: &std::collections::BTreeSet<String>,
) {
    let truth: BTreeMap<String, BTreeMap<&'static str, Value>> = events
        .iter()
        .filter_map(|e| expected_row(&e.json))
        .map(|row| (row["event_id"].as_str().unwrap().to_owned(), row))
        .filter(|(id, _)| ids.contains(id))
        .collect();
    assert_eq!(
        truth.len(),
        ids.len(),
        "every expected id has a ground truth"
    );
    let parquet = parquet_rows(lake, reader_env);
    let pg: Vec<(Value,)> = sqlx::query_as(
        "SELECT json_build_object('event_id', event_id, \
            'timestamp', to_char(timestamp AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), \
            'account_id', account_id, 'actor_email', actor_email, 'actor_type', actor_type, \
            'action_type', action_type, 'action_result', action_result, 'resource_type', resource_type, \
            'resource_id', resource_id, 'ip_address', host(ip_address), 'metadata', metadata, \
            'raw_event', raw_event, \
            'ingestion_time', to_char(ingestion_time AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), \
            'api_version', api_version, 'actor_id', actor_id, 'actor_context', actor_context, \
            'actor_token_id', actor_token_id, 'actor_token_name', actor_token_name, \
            'action_description', action_description, 'resource_product', resource_product, \
            'resource_scope', resource_scope, 'zone_id', zone_id, 'zone_name', zone_name, \
            'raw_method', raw_method, 'raw_uri', raw_uri, 'raw_cf_ray_id', raw_cf_ray_id, \
            'raw_user_agent', raw_user_agent, 'raw_status_code', raw_status_code) \
         FROM audit_logs",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let pg: BTreeMap<String, Value> = pg
        .into_iter()
        .map(|(row,)| (row["event_id"].as_str().unwrap().to_owned(), row))
        .collect();
    for (id, want) in &truth {
        let in_pg = pg
            .get(id)
            .unwrap_or_else(|| panic!("{id} is not in audit_logs"));
        let in_parquet = &parquet[id.as_str()];
        assert!(!in_parquet.is_null(), "{id} is not in the dataset");
        for (column, expected) in want {
            let from_pg = &in_pg[*column];
            let from_parquet = match (&in_parquet[*column], *column) {
                // JSON columns are JSON text in Parquet.
                (Value::String(text), "metadata" | "raw_event") => {
                    serde_json::from_str(text).unwrap_or_else(|e| panic!("{id}: {column}: {e}"))
                }
                (other, _) => other.clone(),
            };
            assert_eq!(from_pg, expected, "{id}: audit_logs.{column}");
            assert_eq!(&from_parquet, expected, "{id}: Parquet {column}");
        }
        assert_eq!(
            in_pg["ingestion_time"], in_parquet["ingestion_time"],
            "{id}: ingestion_time differs between the sinks"
        );
    }
}

/// Counts from the independent reader (pyarrow and DuckDB, hive partitioning). `root` is a
/// folder or `s3://bucket/prefix`; `env` carries the S3 credentials for the reader.
pub fn parquet_counts(root: &str, env: &[(String, String)], with_ids: bool) -> Value {
    try_parquet_counts(root, env, with_ids).unwrap_or_else(|error| panic!("{error}"))
}

/// As [`parquet_counts`], with the reader's failure as an error: for polling a dataset that is
/// still changing (an S3 listing can fail while objects are moved under it).
pub fn try_parquet_counts(
    root: &str,
    env: &[(String, String)],
    with_ids: bool,
) -> Result<Value, String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/parquet_check.py");
    let mut command = Command::new(python());
    command.arg(script).arg(root).envs(env.iter().cloned());
    if with_ids {
        command.env("PARQUET_CHECK_IDS", "1");
    }
    let output = command.output().expect("run the Parquet reader");
    if !output.status.success() {
        return Err(format!(
            "reader failed: {}",
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(serde_json::from_slice(&output.stdout).expect("reader prints JSON"))
}

/// Asserts both sinks hold exactly `expected`, once each, and nothing is left in staging.
pub async fn assert_exact(
    pool: &sqlx::PgPool,
    lake: &str,
    reader_env: &[(String, String)],
    expected: &std::collections::BTreeSet<String>,
) -> Value {
    let n = expected.len() as i64;
    let (rows, keys, ids) = pg_counts(pool).await;
    assert_eq!(
        (rows, keys, ids),
        (n, n, n),
        "postgres: rows, distinct keys, distinct ids"
    );
    assert_eq!(
        &pg_ids(pool).await,
        expected,
        "postgres holds exactly the emulator's events"
    );
    let mut counts = parquet_counts(lake, reader_env, true);
    let parquet_ids: std::collections::BTreeSet<String> =
        serde_json::from_value(counts["ids"].take()).unwrap();
    assert_eq!(counts["pyarrow_rows"], n, "{counts}");
    assert_eq!(counts["pyarrow_distinct_ids"], n, "{counts}");
    assert_eq!(counts["duckdb_rows"], n, "{counts}");
    assert_eq!(counts["duckdb_distinct_ids"], n, "{counts}");
    assert_eq!(counts["rows_in_wrong_partition"], 0, "{counts}");
    assert_eq!(counts["staged_orphans"], 0, "{counts}");
    assert_eq!(
        &parquet_ids, expected,
        "parquet holds exactly the emulator's events"
    );
    counts
}

pub fn secret(s: &str) -> Secret {
    Secret::new(s)
}

/// One test's world: a fresh database, a Parquet folder, the emulator and the run environment.
pub struct Harness {
    pub db: TestDb,
    /// The local Parquet folder's parent, deleted when the harness is dropped.
    _dir: tempfile::TempDir,
    /// The dataset root: a folder, or `s3://bucket/prefix`.
    pub lake: String,
    pub emu: RunningEmulator,
    pub env: Vec<(String, String)>,
    /// What the Parquet reader needs (S3 credentials and endpoint).
    pub reader_env: Vec<(String, String)>,
    pub s3: Option<S3Server>,
}

impl Harness {
    pub async fn new(config: EmulatorConfig) -> Harness {
        Harness::on(TestDb::new().await, config)
    }

    /// As [`Harness::new`], with the database on the TimescaleDB cluster; `None` (said loudly)
    /// where that cluster is not available.
    pub async fn on_timescale(test: &str, config: EmulatorConfig) -> Option<Harness> {
        let admin = timescale_admin_url(test)?;
        Some(Harness::on(TestDb::on(&admin).await, config))
    }

    /// As [`Harness::new`], on `cluster`; `None` where that cluster is not available (see
    /// [`Cluster::admin_url`]).
    pub async fn on_cluster(
        cluster: Cluster,
        test: &str,
        config: EmulatorConfig,
    ) -> Option<Harness> {
        let admin = cluster.admin_url(test)?;
        Some(Harness::on(TestDb::on(&admin).await, config))
    }

    fn on(db: TestDb, config: EmulatorConfig) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let parquet = dir.path().join("parquet");
        let emu = spawn_emulator(config);
        let env = run_env(&emu.base_url, &db, &parquet);
        let lake = parquet.to_str().unwrap().to_owned();
        Harness {
            db,
            _dir: dir,
            lake,
            emu,
            env,
            reader_env: Vec::new(),
            s3: None,
        }
    }

    /// As [`Harness::new`], with the dataset in a bucket of a real S3-compatible server.
    pub async fn with_s3(config: EmulatorConfig) -> Harness {
        Harness::new(config).await.into_s3()
    }

    /// This harness with its dataset in a bucket of a real S3-compatible server.
    pub fn into_s3(self) -> Harness {
        let mut h = self;
        let s3 = S3Server::start("cfaudit");
        h.reader_env = s3.env();
        h.lake = "s3://cfaudit/lake".to_owned();
        for (key, value) in s3.env() {
            h.set(&key, &value);
        }
        let lake = h.lake.clone();
        h.set("PARQUET_URL", &lake);
        h.s3 = Some(s3);
        h
    }

    pub fn parquet_counts(&self, with_ids: bool) -> Value {
        parquet_counts(&self.lake, &self.reader_env, with_ids)
    }

    pub fn set(&mut self, key: &str, value: &str) {
        set(&mut self.env, key, value);
    }

    pub fn config(&self) -> Settings {
        config_from(&self.env)
    }

    /// Both sinks hold exactly the emulator's valid events, once.
    pub async fn assert_exact(&self) -> Value {
        self.assert_exact_ids(&valid_ids(&self.emu.emulator)).await
    }

    /// As [`Harness::assert_exact`], for the events `expected` (v2's, or both versions').
    pub async fn assert_exact_ids(&self, expected: &std::collections::BTreeSet<String>) -> Value {
        let pool = self.db.pool().await;
        let counts = assert_exact(&pool, &self.lake, &self.reader_env, expected).await;
        pool.close().await;
        counts
    }

    pub async fn finish(self) {
        self.db.drop_db().await;
    }
}

/// A free port *below* the kernel's ephemeral range (32768 and up on Linux). A server on an
/// ephemeral port that is stopped and started again (the outage tests) can find its port
/// taken: a client connecting to a port nobody listens on may be handed that very port as its
/// source and connect to itself (TCP self-connect), holding it.
pub fn free_port() -> u16 {
    loop {
        let port = rand::random_range(20_000..32_000);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A real S3-compatible server (s3s-fs: signatures checked, conditional writes honoured) with
/// one bucket, on a free port, killed when dropped.
pub struct S3Server {
    child: std::process::Child,
    pub endpoint: String,
    binary: PathBuf,
    port: u16,
    root: tempfile::TempDir,
}

pub const S3_ACCESS_KEY: &str = "cfaudit-test-access";
pub const S3_SECRET_KEY: &str = "cfaudit-test-secret-5d41402abc4b2a76";

impl S3Server {
    pub fn start(bucket: &str) -> S3Server {
        let binary = std::env::var("CFAUDIT_S3S_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|_| {
                Path::new(&std::env::var("HOME").unwrap()).join(".cargo/bin/s3s-fs")
            });
        assert!(
            binary.exists(),
            "{} is missing: run `make test` (tests/support/ensure-s3.sh installs it)",
            binary.display()
        );
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join(bucket)).unwrap();
        let port = free_port();
        let child = Self::spawn(&binary, port, root.path());
        S3Server {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
            binary,
            port,
            root,
        }
    }

    fn spawn(binary: &Path, port: u16, root: &Path) -> std::process::Child {
        let mut child = Command::new(binary)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", S3_ACCESS_KEY, "--secret-key", S3_SECRET_KEY])
            .arg(root)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start s3s-fs");
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return child;
            }
            std::thread::sleep(std::time::Duration::from_millis(25));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("s3s-fs did not listen on {port}");
    }

    /// An outage: the server is killed; its data stays.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The same server again: same port, same data.
    pub fn restart(&mut self) {
        self.child = Self::spawn(&self.binary, self.port, self.root.path());
    }

    /// The standard variables, as an operator would set them for MinIO.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY),
            ("AWS_SECRET_ACCESS_KEY", S3_SECRET_KEY),
            ("AWS_ENDPOINT_URL", self.endpoint.as_str()),
            ("AWS_ALLOW_HTTP", "true"),
            ("AWS_REGION", "us-east-1"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A PostgreSQL cluster of its own (initdb in a temporary folder, a free port, trust auth),
/// so a test can stop and start it without disturbing the shared server.
pub struct PrivatePostgres {
    dir: tempfile::TempDir,
    pub port: u16,
    bin: PathBuf,
    timescaledb: bool,
}

impl PrivatePostgres {
    pub fn start() -> PrivatePostgres {
        PrivatePostgres::start_as(Cluster::Postgres)
    }

    /// A private cluster like `cluster`: for TimescaleDB, one that preloads it (the extension
    /// is installed into this PostgreSQL by `make test`).
    pub fn start_as(cluster: Cluster) -> PrivatePostgres {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .and_then(|versions| {
                versions
                    .flatten()
                    .map(|v| v.path().join("bin"))
                    .find(|b| b.join("initdb").exists())
            })
            .expect("PostgreSQL server binaries under /usr/lib/postgresql/<version>/bin");
        let dir = tempfile::Builder::new()
            .prefix("cfaudit-pg")
            .tempdir_in("/tmp")
            .unwrap();
        let pg = PrivatePostgres {
            dir,
            port: free_port(),
            bin,
            timescaledb: cluster == Cluster::Timescaledb,
        };
        // initdb and postgres refuse to run as root: hand the folder to the postgres user.
        if Self::is_root() {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(pg.dir.path())
                .status()
                .unwrap();
            assert!(status.success());
        }
        let data = pg.data();
        pg.run(
            "initdb",
            &["-D", &data, "-U", "postgres", "--auth=trust", "-E", "UTF8"],
        );
        pg.start_again();
        pg
    }

    fn is_root() -> bool {
        Command::new("id")
            .arg("-u")
            .output()
            .map(|o| o.stdout.starts_with(b"0\n"))
            .unwrap_or(false)
    }

    fn data(&self) -> String {
        self.dir.path().join("data").to_str().unwrap().to_owned()
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let program = self.bin.join(tool);
        let output = if Self::is_root() {
            Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(&program)
                .args(args)
                .output()
        } else {
            Command::new(&program).args(args).output()
        }
        .unwrap();
        assert!(
            output.status.success(),
            "{tool} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    pub fn start_again(&self) {
        let mut options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        if self.timescaledb {
            options.push_str(" -c shared_preload_libraries=timescaledb");
        }
        let log = self.dir.path().join("log").to_str().unwrap().to_owned();
        let data = self.data();
        self.run(
            "pg_ctl",
            &["-D", &data, "-o", &options, "-l", &log, "-w", "start"],
        );
    }

    /// An outage: fast shutdown, connections cut.
    pub fn stop(&self) {
        let data = self.data();
        self.run("pg_ctl", &["-D", &data, "-m", "fast", "-w", "stop"]);
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let data = self.data();
        let program = self.bin.join("pg_ctl");
        let args = ["-D", data.as_str(), "-m", "immediate", "stop"];
        let _ = if Self::is_root() {
            Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(program)
                .args(args)
                .output()
        } else {
            Command::new(program).args(args).output()
        };
    }
}

// The real binary, as an operator runs it.

/// The binary under test: this build's, or `CFAUDIT_BIN` (to show that a test fails with an
/// older build).
pub fn cfaudit_bin() -> String {
    std::env::var("CFAUDIT_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_cfaudit").to_owned())
}

/// A running `cfaudit`. Its output goes to files, never to a pipe: a pipe nobody reads fills
/// up and stops a long-running process at its next log line.
pub struct Process {
    child: tokio::process::Child,
    stdout: PathBuf,
    stderr: PathBuf,
    _dir: Option<tempfile::TempDir>,
}

impl Process {
    /// What the process wrote to stderr (its log) so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// The last `lines` lines of the log, to show in a failure.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let tail: Vec<&str> = log.lines().rev().take(lines).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }
}

impl std::ops::Deref for Process {
    type Target = tokio::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.child
    }
}

impl std::ops::DerefMut for Process {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.child
    }
}

/// The binary with only `env` (and PATH) for environment.
fn spawn(
    args: &[&str],
    env: &[(String, String)],
    stdout: std::fs::File,
    stderr: std::fs::File,
) -> tokio::process::Child {
    tokio::process::Command::new(cfaudit_bin())
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().cloned())
        .stdout(stdout)
        .stderr(stderr)
        .kill_on_drop(true)
        .spawn()
        .expect("spawn cfaudit")
}

pub fn cfaudit(args: &[&str], env: &[(String, String)]) -> Process {
    let dir = tempfile::Builder::new()
        .prefix("cfaudit-out")
        .tempdir()
        .unwrap();
    let stdout = dir.path().join("stdout");
    let stderr = dir.path().join("stderr");
    let child = spawn(
        args,
        env,
        std::fs::File::create(&stdout).unwrap(),
        std::fs::File::create(&stderr).unwrap(),
    );
    Process {
        child,
        stdout,
        stderr,
        _dir: Some(dir),
    }
}

/// As [`cfaudit`], with stdout and stderr both in `log` (kept after the process is gone).
pub fn cfaudit_logged(args: &[&str], env: &[(String, String)], log: &Path) -> Process {
    let file = std::fs::File::create(log).expect("create the log file");
    let child = spawn(args, env, file.try_clone().unwrap(), file);
    Process {
        child,
        stdout: log.to_owned(),
        stderr: log.to_owned(),
        _dir: None,
    }
}

pub fn signal(child: &tokio::process::Child, signal: &str) {
    let pid = child.id().expect("running").to_string();
    let status = std::process::Command::new("kill")
        .args([signal, &pid])
        .status()
        .unwrap();
    assert!(status.success());
}

pub async fn rows(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_as::<_, (i64,)>("SELECT count(*) FROM audit_logs")
        .fetch_one(pool)
        .await
        .map(|r| r.0)
        .unwrap_or(0)
}

pub async fn wait_for_rows(pool: &sqlx::PgPool, at_least: i64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while rows(pool).await < at_least {
        assert!(
            std::time::Instant::now() < deadline,
            "fewer than {at_least} rows after 120 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

pub struct Finished {
    pub success: bool,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

pub async fn finish(mut process: Process) -> Finished {
    let status = tokio::time::timeout(std::time::Duration::from_secs(180), process.child.wait())
        .await
        .expect("cfaudit exited within 180 s")
        .unwrap();
    Finished {
        success: status.success(),
        code: status.code(),
        stdout: std::fs::read_to_string(&process.stdout).unwrap_or_default(),
        stderr: process.log(),
    }
}

/// `cfaudit run --once` in this process, on one account; its counts summary.
pub async fn run_once(config: Settings) -> anyhow::Result<cfaudit::app::RunSummary> {
    let mut summaries = run_once_all(config).await?;
    assert_eq!(summaries.len(), 1, "one account configured");
    Ok(summaries.remove(0))
}

/// `cfaudit run --once` in this process; the counts summary of each account.
pub async fn run_once_all(config: Settings) -> anyhow::Result<Vec<cfaudit::app::RunSummary>> {
    let options = cfaudit::app::RunOptions {
        once: true,
        skip_migrations: false,
    };
    cfaudit::app::run(config, options).await
}

/// What the service's `/readyz` answers: status and body (`None` while it does not answer).
pub async fn readyz(addr: &str) -> Option<(u16, Value)> {
    let response = reqwest::get(format!("http://{addr}/readyz")).await.ok()?;
    let status = response.status().as_u16();
    Some((status, response.json().await.ok()?))
}

/// The service's `/metrics` page.
pub async fn scrape(addr: &str) -> String {
    reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The sum of the samples whose line starts with `series` (a name, or a name with labels);
/// panics when there is none, so a renamed metric fails the test.
pub fn metric(metrics: &str, series: &str) -> f64 {
    let samples: Vec<f64> = metrics
        .lines()
        .filter(|l| l.starts_with(series))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .collect();
    assert!(!samples.is_empty(), "no {series} in\n{metrics}");
    samples.iter().sum()
}

/// A fingerprint of every column of every row of `audit_logs`, and the row count: equal
/// fingerprints mean identical tables.
/// The single number `sql` selects (a count).
pub async fn count(pool: &sqlx::PgPool, sql: &str) -> i64 {
    let (n,): (i64,) = sqlx::query_as(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_one(pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    n
}

/// Parquet files committed and not yet published.
pub async fn unpublished_files(pool: &sqlx::PgPool) -> i64 {
    count(
        pool,
        "SELECT count(*) FROM cfaudit_parquet_files WHERE published_at IS NULL",
    )
    .await
}

pub async fn table_fingerprint(pool: &sqlx::PgPool) -> (Option<String>, i64) {
    sqlx::query_as(
        "SELECT md5(string_agg(t::text, '|' ORDER BY timestamp, event_id)), count(*) FROM audit_logs t",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Per aggregate, the groups where it and a GROUP BY over `audit_logs` disagree, in either
/// direction: every grouped column, every count and (daily) every last hour. Hours and days are UTC, as both databases bucket them.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct AggregateMismatches {
    pub events_hourly: i64,
    pub actors_hourly: i64,
    pub actors_daily: i64,
    pub actor_activity_daily: i64,
    pub address_activity_daily: i64,
    pub logins_daily: i64,
}

impl AggregateMismatches {
    pub fn none(&self) -> bool {
        *self == Self::default()
    }
}

pub async fn aggregate_mismatches(pool: &sqlx::PgPool) -> AggregateMismatches {
    let events = differing_rows(
        pool,
        "SELECT date_trunc('hour', timestamp, 'UTC') AS bucket, account_id, api_version, \
                             action_type, action_result, resource_type, resource_product, \
                             count(*) AS events \
                      FROM audit_logs GROUP BY 1, 2, 3, 4, 5, 6, 7",
        "SELECT bucket, account_id, api_version, action_type, action_result, \
                             resource_type, resource_product, events FROM audit_events_hourly",
    )
    .await;
    let actors = differing_rows(
        pool,
        "SELECT date_trunc('hour', timestamp, 'UTC') AS bucket, account_id, api_version, \
                             actor_email, actor_type, ip_address, count(*) AS events, \
                             count(*) FILTER (WHERE action_result IN ('false', 'failure')) AS failed, \
                             count(*) FILTER (WHERE action_type = 'login') AS logins, \
                             count(*) FILTER (WHERE action_type = 'login' \
                                                AND action_result IN ('false', 'failure')) AS failed_logins \
                      FROM audit_logs GROUP BY 1, 2, 3, 4, 5, 6",
        "SELECT bucket, account_id, api_version, actor_email, actor_type, ip_address, \
                             events, failed_events, logins, failed_logins FROM audit_actors_hourly",
    )
    .await;
    let daily = differing_rows(
        pool,
        "SELECT date_trunc('day', timestamp, 'UTC') AS bucket, account_id, api_version, \
                             actor_email, actor_type, ip_address, count(*) AS events, \
                             count(*) FILTER (WHERE action_result IN ('false', 'failure')) AS failed, \
                             count(*) FILTER (WHERE action_type = 'login') AS logins, \
                             count(*) FILTER (WHERE action_type = 'login' \
                                                AND action_result IN ('false', 'failure')) AS failed_logins, \
                             max(date_trunc('hour', timestamp, 'UTC')) AS last_hour, \
                             max(date_trunc('hour', timestamp, 'UTC')) \
                               FILTER (WHERE action_result IN ('false', 'failure')) AS last_failure_hour, \
                             max(date_trunc('hour', timestamp, 'UTC')) \
                               FILTER (WHERE action_type = 'login') AS last_login_hour \
                      FROM audit_logs GROUP BY 1, 2, 3, 4, 5, 6",
        "SELECT bucket, account_id, api_version, actor_email, actor_type, ip_address, \
                             events, failed_events, logins, failed_logins, last_hour, \
                             last_failure_hour, last_login_hour FROM audit_actors_daily",
    )
    .await;
    let actor_activity = differing_rows(
        pool,
        "SELECT date_trunc('day', timestamp, 'UTC') AS bucket, account_id, api_version, \
                             actor_email, actor_type, count(*) AS events, \
                             count(*) FILTER (WHERE action_result IN ('false', 'failure')) AS failed, \
                             max(date_trunc('hour', timestamp, 'UTC')) AS last_hour, \
                             max(date_trunc('hour', timestamp, 'UTC')) \
                               FILTER (WHERE action_result IN ('false', 'failure')) AS last_failure_hour \
                      FROM audit_logs GROUP BY 1, 2, 3, 4, 5",
        "SELECT bucket, account_id, api_version, actor_email, actor_type, events, \
                             failed_events, last_hour, last_failure_hour \
                      FROM audit_actor_activity_daily",
    )
    .await;
    let address_activity = differing_rows(
        pool,
        "SELECT date_trunc('day', timestamp, 'UTC') AS bucket, account_id, api_version, \
                             ip_address, count(*) AS events, \
                             count(*) FILTER (WHERE action_result IN ('false', 'failure')) AS failed, \
                             max(date_trunc('hour', timestamp, 'UTC')) AS last_hour \
                      FROM audit_logs WHERE ip_address IS NOT NULL GROUP BY 1, 2, 3, 4",
        "SELECT bucket, account_id, api_version, ip_address, events, failed_events, \
                             last_hour FROM audit_address_activity_daily",
    )
    .await;
    let logins = differing_rows(
        pool,
        "SELECT date_trunc('day', timestamp, 'UTC') AS bucket, account_id, api_version, \
                             actor_email, actor_type, ip_address, count(*) AS logins, \
                             count(*) FILTER (WHERE action_result IN ('false', 'failure')) AS failed, \
                             max(date_trunc('hour', timestamp, 'UTC')) AS last_hour \
                      FROM audit_logs WHERE action_type = 'login' GROUP BY 1, 2, 3, 4, 5, 6",
        "SELECT bucket, account_id, api_version, actor_email, actor_type, ip_address, \
                             logins, failed_logins, last_hour FROM audit_logins_daily",
    )
    .await;
    AggregateMismatches {
        events_hourly: events,
        actors_hourly: actors,
        actors_daily: daily,
        actor_activity_daily: actor_activity,
        address_activity_daily: address_activity,
        logins_daily: logins,
    }
}

/// The rows in one query's result and not the other's, in either direction (as multisets).
async fn differing_rows(pool: &sqlx::PgPool, raw: &str, agg: &str) -> i64 {
    let sql = format!(
        "WITH raw AS ({raw}), agg AS ({agg}) \
         SELECT count(*) FROM ((SELECT * FROM raw EXCEPT ALL SELECT * FROM agg) \
                     UNION ALL (SELECT * FROM agg EXCEPT ALL SELECT * FROM raw)) d"
    );
    let (rows,): (i64,) = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .fetch_one(pool)
        .await
        .unwrap();
    rows
}

/// Per range `[$1, $2]`: the groups where `audit_actor_activity_between` (per actor),
/// `audit_address_activity_between` (per address) and the pairs of every other actor
/// (`audit_actor_pairs_between`, the actors without an e-mail among them) and of every other
/// address (`audit_address_pairs_between`) disagree with `audit_actors_hourly`'s hours of the
/// range grouped the same way (and filtered the same way); and the groups where
/// `audit_logins_between` and those hours' pairs with logins disagree.
const ACTIVITY_MISMATCHES: &str = "
WITH hours AS (SELECT * FROM audit_actors_hourly WHERE bucket BETWEEN $1 AND $2),
     rolled_actors AS (
       SELECT account_id, api_version, actor_email, actor_type, sum(events), sum(failed_events),
              max(last_hour), max(last_failure_hour)
       FROM audit_actor_activity_between($1, $2) GROUP BY 1, 2, 3, 4),
     hourly_actors AS (
       SELECT account_id, api_version, actor_email, actor_type, sum(events), sum(failed_events),
              max(bucket), max(bucket) FILTER (WHERE failed_events > 0)
       FROM hours GROUP BY 1, 2, 3, 4),
     rolled_addresses AS (
       SELECT account_id, api_version, ip_address, sum(events), sum(failed_events), max(last_hour)
       FROM audit_address_activity_between($1, $2) GROUP BY 1, 2, 3),
     hourly_addresses AS (
       SELECT account_id, api_version, ip_address, sum(events), sum(failed_events), max(bucket)
       FROM hours WHERE ip_address IS NOT NULL GROUP BY 1, 2, 3),
     some_actors AS (
       SELECT array_agg(actor_email) AS emails
       FROM (SELECT actor_email, row_number() OVER (ORDER BY actor_email NULLS FIRST) AS n
             FROM (SELECT DISTINCT actor_email FROM hours) d) o
       WHERE n % 2 = 1),
     some_addresses AS (
       SELECT array_agg(ip_address) AS addresses
       FROM (SELECT ip_address, row_number() OVER (ORDER BY ip_address) AS n
             FROM (SELECT DISTINCT ip_address FROM hours WHERE ip_address IS NOT NULL) d) o
       WHERE n % 2 = 1),
     rolled_actor_pairs AS (
       SELECT account_id, api_version, actor_email, actor_type, ip_address, sum(events),
              sum(failed_events), sum(logins), max(last_hour)
       FROM some_actors, audit_actor_pairs_between($1, $2, ARRAY['%'], NULL, some_actors.emails)
       GROUP BY 1, 2, 3, 4, 5),
     hourly_actor_pairs AS (
       SELECT account_id, api_version, actor_email, actor_type, ip_address, sum(events),
              sum(failed_events), sum(logins), max(bucket)
       FROM hours, some_actors
       WHERE actor_email = ANY (emails) OR (actor_email IS NULL AND array_position(emails, NULL) IS NOT NULL)
       GROUP BY 1, 2, 3, 4, 5),
     rolled_address_pairs AS (
       SELECT account_id, api_version, actor_email, actor_type, ip_address, sum(events),
              sum(failed_events), sum(logins), max(last_hour)
       FROM some_addresses,
            audit_address_pairs_between($1, $2, ARRAY['%'], NULL, some_addresses.addresses)
       GROUP BY 1, 2, 3, 4, 5),
     hourly_address_pairs AS (
       SELECT account_id, api_version, actor_email, actor_type, ip_address, sum(events),
              sum(failed_events), sum(logins), max(bucket)
       FROM hours, some_addresses WHERE ip_address = ANY (addresses)
       GROUP BY 1, 2, 3, 4, 5),
     rolled_logins AS (
       SELECT account_id, api_version, actor_email, actor_type, ip_address, sum(logins),
              sum(failed_logins), max(last_login_hour)
       FROM audit_logins_between($1, $2) GROUP BY 1, 2, 3, 4, 5),
     hourly_logins AS (
       SELECT account_id, api_version, actor_email, actor_type, ip_address, sum(logins),
              sum(failed_logins), max(bucket)
       FROM hours WHERE logins > 0 GROUP BY 1, 2, 3, 4, 5)
SELECT (SELECT count(*) FROM ((SELECT * FROM rolled_actors EXCEPT ALL SELECT * FROM hourly_actors)
                  UNION ALL (SELECT * FROM hourly_actors EXCEPT ALL SELECT * FROM rolled_actors)) d)
     + (SELECT count(*) FROM ((SELECT * FROM rolled_actor_pairs EXCEPT ALL SELECT * FROM hourly_actor_pairs)
                  UNION ALL (SELECT * FROM hourly_actor_pairs EXCEPT ALL SELECT * FROM rolled_actor_pairs)) d),
       (SELECT count(*) FROM ((SELECT * FROM rolled_addresses EXCEPT ALL SELECT * FROM hourly_addresses)
                  UNION ALL (SELECT * FROM hourly_addresses EXCEPT ALL SELECT * FROM rolled_addresses)) d)
     + (SELECT count(*) FROM ((SELECT * FROM rolled_address_pairs EXCEPT ALL SELECT * FROM hourly_address_pairs)
                  UNION ALL (SELECT * FROM hourly_address_pairs EXCEPT ALL SELECT * FROM rolled_address_pairs)) d),
       (SELECT count(*) FROM ((SELECT * FROM rolled_logins EXCEPT ALL SELECT * FROM hourly_logins)
                  UNION ALL (SELECT * FROM hourly_logins EXCEPT ALL SELECT * FROM rolled_logins)) d)
";

/// Ranges over the rows' own span, whole days and hours in the middle of days alike, where
/// a reading function (whole days from a daily aggregate, the rest from the hourly one)
/// disagrees with the same grouping of the hourly aggregate's hours in the range, as the
/// dashboards group them: `audit_actors_between` by actor and address,
/// `audit_actor_activity_between` by actor, `audit_address_activity_between` by address, and
/// `audit_actor_pairs_between` and `audit_address_pairs_between` for some actors and addresses
/// by actor and address, `audit_logins_between` by actor and address.
/// `(since, until, mismatched groups)` of every range that disagrees. Also checks that some
/// range read whole days (a daily row's last hour is after its bucket; an hourly row's is its
/// bucket).
pub async fn rollup_mismatches(pool: &sqlx::PgPool) -> Vec<(String, String, i64)> {
    let (wrong, read_days) = readings_against_hours(pool).await;
    assert!(
        read_days,
        "no range read a whole day from audit_actors_daily"
    );
    wrong
}

/// [`rollup_mismatches`] where the reading functions may read no whole day from the daily
/// aggregates: plain PostgreSQL's days not folded yet are read hour by hour.
pub async fn unfolded_rollup_mismatches(pool: &sqlx::PgPool) -> Vec<(String, String, i64)> {
    readings_against_hours(pool).await.0
}

/// [`rollup_mismatches`]'s ranges that disagree, and whether some range read a whole day.
async fn readings_against_hours(pool: &sqlx::PgPool) -> (Vec<(String, String, i64)>, bool) {
    let (first, last): (chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>) =
        sqlx::query_as("SELECT min(timestamp), max(timestamp) FROM audit_logs")
            .fetch_one(pool)
            .await
            .unwrap();
    let hours = |h: i64| chrono::Duration::hours(h);
    let midnight =
        |t: chrono::DateTime<chrono::Utc>| t.date_naive().and_hms_opt(0, 0, 0).unwrap().and_utc();
    let ranges = [
        (first - hours(48), last + hours(48)),
        (midnight(first), midnight(last) + hours(24)),
        (
            first + hours(1) + chrono::Duration::minutes(30),
            last - hours(2),
        ),
        (midnight(first) + hours(24), midnight(first) + hours(47)),
        (midnight(first) + hours(24), midnight(first) + hours(46)),
        (midnight(first) + hours(27), midnight(first) + hours(29)),
        (
            midnight(first) + hours(24) - chrono::Duration::seconds(1),
            last,
        ),
        // Ending just after the newest row, as a range ending now does: on plain PostgreSQL
        // its last day is read whole from the daily rollups. Ending before the newest rows:
        // it is not.
        (
            midnight(first) + hours(24),
            last + chrono::Duration::minutes(1),
        ),
        (
            midnight(first) + hours(24),
            last - chrono::Duration::minutes(90),
        ),
    ];
    let mut wrong = Vec::new();
    let mut read_days = false;
    for (since, until) in ranges {
        let (mismatched, days): (i64, i64) = sqlx::query_as(
            "WITH rolled AS (SELECT account_id, api_version, actor_email, actor_type, ip_address, \
                                    sum(events), sum(failed_events), sum(logins), sum(failed_logins), \
                                    max(last_hour), max(last_failure_hour), max(last_login_hour) \
                             FROM audit_actors_between($1, $2) GROUP BY 1, 2, 3, 4, 5), \
                  hourly AS (SELECT account_id, api_version, actor_email, actor_type, ip_address, \
                                    sum(events), sum(failed_events), sum(logins), sum(failed_logins), \
                                    max(bucket), max(bucket) FILTER (WHERE failed_events > 0), \
                                    max(bucket) FILTER (WHERE logins > 0) \
                             FROM audit_actors_hourly WHERE bucket BETWEEN $1 AND $2 \
                             GROUP BY 1, 2, 3, 4, 5) \
             SELECT (SELECT count(*) FROM ((SELECT * FROM rolled EXCEPT ALL SELECT * FROM hourly) \
                                 UNION ALL (SELECT * FROM hourly EXCEPT ALL SELECT * FROM rolled)) d), \
                    (SELECT count(*) FROM audit_actors_between($1, $2) \
                     WHERE last_hour > bucket)",
        )
        .bind(since)
        .bind(until)
        .fetch_one(pool)
        .await
        .unwrap();
        let (actors, addresses, logins): (i64, i64, i64) = sqlx::query_as(ACTIVITY_MISMATCHES)
            .bind(since)
            .bind(until)
            .fetch_one(pool)
            .await
            .unwrap();
        let mismatched = mismatched + actors + addresses + logins;
        read_days |= days > 0;
        if mismatched != 0 {
            wrong.push((since.to_rfc3339(), until.to_rfc3339(), mismatched));
        }
    }
    (wrong, read_days)
}
