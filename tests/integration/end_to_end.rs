//! End to end against real PostgreSQL, a local Parquet folder read back by pyarrow and DuckDB,
//! and the emulator: exactly once, counted.

use crate::common::*;
use serde_json::{json, Value};

#[actix_web::test]
async fn a_50k_backfill_lands_exactly_once_and_a_second_run_adds_nothing() {
    let mut config = emulator_config(50_000);
    config.invalid_every = 1000;
    let h = Harness::new(config).await;
    let expected = valid_ids(&h.emu.emulator);
    assert_eq!(expected.len(), 50_000 - 50);

    let first = run_once(h.config()).await.unwrap();
    assert_eq!(first.rows_in_postgres, expected.len() as i64);
    assert_eq!(first.parquet_rows, expected.len() as i64);
    assert_eq!(first.dead_letters, 50);
    let pool = h.db.pool().await;
    let counts = assert_exact(&pool, &h.lake, &h.reader_env, &expected).await;
    assert_eq!(counts["compression"], json!(["ZSTD"]));
    assert_eq!(counts["schema"]["timestamp"], "timestamp[ns, tz=UTC]");
    assert_eq!(counts["schema"]["ingestion_time"], "timestamp[ns, tz=UTC]");
    let files_after_first = counts["files"].clone();

    let requests_before = h.emu.emulator.requests();
    let second = run_once(h.config()).await.unwrap();
    assert!(
        h.emu.emulator.requests() > requests_before,
        "the second run polled"
    );
    assert_eq!(second.rows_in_postgres, first.rows_in_postgres);
    assert_eq!(
        second.dead_letters, 50,
        "dead letters seen again are stored once"
    );
    let counts = assert_exact(&pool, &h.lake, &h.reader_env, &expected).await;
    assert_eq!(
        counts["files"], files_after_first,
        "the second run wrote no file"
    );

    // The rows are the mapping of the events, checked on a few columns in SQL.
    let (ipv6, system, non_object_meta): (i64, i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE family(ip_address) = 6), count(*) FILTER (WHERE actor_type = 'system'), \
                count(*) FILTER (WHERE jsonb_typeof(metadata) <> 'object') FROM audit_logs",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(
        ipv6 > 0 && system > 0 && non_object_meta > 0,
        "{ipv6} {system} {non_object_meta}"
    );
    pool.close().await;
    h.finish().await;
}

#[actix_web::test]
async fn identical_timestamps_across_pages_and_overlapping_windows_give_no_duplicates() {
    let mut config = emulator_config(3_000);
    config.days = 0.5;
    let mut h = Harness::new(config).await;
    // Bursts of equal `when` straddle boundaries of 7-event pages.
    let events = h.emu.emulator.events();
    let straddling = (1..events.len() / 7)
        .filter(|k| events[k * 7 - 1].when == events[k * 7].when)
        .count();
    assert!(
        straddling > 10,
        "only {straddling} page boundaries inside a burst"
    );
    h.set("CLOUDFLARE_PER_PAGE", "7");
    // An hour of lag: every window re-reads the last hour, bursts included.
    h.set("CLOUDFLARE_SINCE_SAFETY_LAG_SECONDS", "3600");

    run_once(h.config()).await.unwrap();
    // Late events with the exact time of already committed ones, inside the lag.
    let last = events.last().unwrap();
    let late: Vec<_> = (0..5)
        .map(|i| json!({"id": format!("late-{i}"), "when": last.when.to_rfc3339(), "action": {"type": "login", "result": true}}))
        .collect();
    h.emu.emulator.insert(&late);
    run_once(h.config()).await.unwrap();
    run_once(h.config()).await.unwrap();

    let pool = h.db.pool().await;
    let expected = valid_ids(&h.emu.emulator);
    assert_exact(&pool, &h.lake, &h.reader_env, &expected).await;
    let deduplicated: (i64,) =
        sqlx::query_as("SELECT count(*) FROM audit_logs WHERE event_id LIKE 'late-%'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(deduplicated.0, 5);
    pool.close().await;
    h.finish().await;
}

#[actix_web::test]
async fn api_faults_are_retried_and_the_result_is_still_exact_429_5xx_truncated_resets() {
    let mut config = emulator_config(8_000);
    config.faults.fault_429_every = 7;
    config.faults.retry_after_seconds = 1;
    config.faults.fault_5xx_every = 5;
    config.faults.fault_truncate_every = 6;
    config.faults.fault_reset_every = 9;
    config.faults.fault_success_false_every = 11;
    config.errors_null = true;
    config.result_info = true;
    let mut h = Harness::new(config).await;
    h.set("CLOUDFLARE_PER_PAGE", "250");
    run_once(h.config()).await.unwrap();
    assert_eq!(assert_faults_hit(&h.emu.emulator).len(), 5);
    h.assert_exact().await;
    h.finish().await;
}

#[actix_web::test]
async fn an_exactly_full_last_page_followed_by_400_ends_the_sweep() {
    let mut config = emulator_config(1_000);
    config.past_end_400 = true;
    let mut h = Harness::new(config).await;
    h.set("CLOUDFLARE_PER_PAGE", "100"); // 1000 events: page 11 is past the end
    let summary = run_once(h.config()).await.unwrap();
    assert_eq!(summary.rows_in_postgres, 1_000);
    h.assert_exact().await;
    h.finish().await;
}

#[actix_web::test]
async fn a_bad_token_fails_once_with_a_clear_cause_and_commits_nothing() {
    let mut h = Harness::new(emulator_config(100)).await;
    h.set("CLOUDFLARE_API_TOKEN", "wrong-token-123");
    let error = run_once(h.config()).await.unwrap_err().to_string();
    assert!(
        error.contains("authentication failed") && error.contains("9109"),
        "{error}"
    );
    assert!(
        !error.contains("wrong-token-123"),
        "the token leaked into the error"
    );
    let pool = h.db.pool().await;
    assert_eq!(pg_counts(&pool).await.0, 0);
    pool.close().await;
    h.finish().await;
}

#[actix_web::test]
async fn desc_direction_lands_the_same_rows() {
    let mut h = Harness::new(emulator_config(2_500)).await;
    h.set("CLOUDFLARE_DIRECTION", "desc");
    h.set("CLOUDFLARE_PER_PAGE", "300");
    run_once(h.config()).await.unwrap();
    run_once(h.config()).await.unwrap();
    h.assert_exact().await;
    h.finish().await;
}

#[actix_web::test]
async fn migrations_apply_twice_and_give_the_expected_schema() {
    let db = TestDb::new().await;
    let pool = db.pool().await;
    cfaudit::sinks::postgres::MIGRATOR.run(&pool).await.unwrap();
    cfaudit::sinks::postgres::MIGRATOR.run(&pool).await.unwrap();
    // The statements themselves are idempotent too (a hand-applied file, a reset history).
    let sql = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/migrations/20260101000001_init.sql"
    ))
    .unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.clone()))
        .execute(&pool)
        .await
        .unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .execute(&pool)
        .await
        .unwrap();
    let columns: Vec<(String, String)> = sqlx::query_as(
        "SELECT column_name::text, data_type::text FROM information_schema.columns WHERE table_name = 'audit_logs' ORDER BY ordinal_position",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let expected = [
        ("event_id", "text"),
        ("timestamp", "timestamp with time zone"),
        ("account_id", "text"),
        ("actor_email", "text"),
        ("actor_type", "text"),
        ("action_type", "text"),
        ("action_result", "text"),
        ("resource_type", "text"),
        ("resource_id", "text"),
        ("ip_address", "inet"),
        ("metadata", "jsonb"),
        ("raw_event", "jsonb"),
        ("ingestion_time", "timestamp with time zone"),
        ("api_version", "text"),
        ("actor_id", "text"),
        ("actor_context", "text"),
        ("actor_token_id", "text"),
        ("actor_token_name", "text"),
        ("action_description", "text"),
        ("resource_product", "text"),
        ("resource_scope", "text"),
        ("zone_id", "text"),
        ("zone_name", "text"),
        ("raw_method", "text"),
        ("raw_uri", "text"),
        ("raw_cf_ray_id", "text"),
        ("raw_user_agent", "text"),
        ("raw_status_code", "integer"),
    ];
    let got: Vec<(&str, &str)> = columns
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    assert_eq!(got, expected);
    let (pk,): (String,) = sqlx::query_as(
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = 'audit_logs'::regclass AND contype = 'p'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(pk, "PRIMARY KEY (\"timestamp\", event_id)");
    for table in [
        "cfaudit_checkpoints",
        "cfaudit_dead_letters",
        "cfaudit_parquet_files",
    ] {
        let (exists,): (bool,) = sqlx::query_as("SELECT to_regclass($1) IS NOT NULL")
            .bind(table)
            .fetch_one(&pool)
            .await
            .unwrap();
        assert!(exists, "{table}");
    }
    // The dashboards' aggregates: plain views here, the same names as the TimescaleDB ones.
    sqlx::raw_sql(
        "INSERT INTO audit_logs (event_id, timestamp, account_id, actor_email, action_type, action_result) VALUES \
         ('a', '2026-01-01 10:05+00', 'acc', 'x@y', 'login', 'true'), ('b', '2026-01-01 10:55+00', 'acc', 'x@y', 'login', 'false'), \
         ('c', '2026-01-01 11:00+00', 'acc', 'z@y', 'purge', 'true')",
    )
    .execute(&pool)
    .await
    .unwrap();
    let hourly: Vec<(chrono::DateTime<chrono::Utc>, String, i64)> = sqlx::query_as(
        "SELECT bucket, action_type, sum(events)::bigint FROM audit_events_hourly GROUP BY 1, 2 ORDER BY 1, 2",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let hour = |h| chrono::TimeZone::with_ymd_and_hms(&chrono::Utc, 2026, 1, 1, h, 0, 0).unwrap();
    assert_eq!(
        hourly,
        vec![(hour(10), "login".into(), 2), (hour(11), "purge".into(), 1)]
    );
    let failed = count(
        &pool,
        "SELECT sum(failed_events)::bigint FROM audit_actors_hourly",
    )
    .await;
    assert_eq!(failed, 1);

    // The TimescaleDB branches cannot run here (no extension), but PostgreSQL's own PL/pgSQL
    // validator parses every statement of a function body at CREATE time: each migration's
    // DO blocks, each wrapped in a function that is never called, must be accepted.
    let blocks = cfaudit::sinks::postgres::MIGRATOR
        .iter()
        .flat_map(|migration| {
            // Every DO block: from `DO $$` to the `$$;` that closes it.
            let sql = migration.sql.as_str();
            sql.match_indices("DO $$")
                .enumerate()
                .map(move |(n, (start, _))| {
                    let body = &sql[start + "DO $$".len()..];
                    (migration.version, n, &body[..body.find("$$;").unwrap()])
                })
        });
    for (version, n, body) in blocks {
        let check = format!(
            "CREATE FUNCTION pg_temp.check_{version}_{n}() RETURNS void LANGUAGE plpgsql \
             AS $check${body}$check$"
        );
        let mut conn = pool.acquire().await.unwrap();
        sqlx::raw_sql("SET check_function_bodies = on")
            .execute(&mut *conn)
            .await
            .unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(check))
            .execute(&mut *conn)
            .await
            .unwrap_or_else(|e| {
                panic!("migration {version} has invalid PL/pgSQL in DO block {n}: {e}")
            });
    }
    let applied: (i64,) = sqlx::query_as("SELECT count(*) FROM _sqlx_migrations")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        applied.0,
        cfaudit::sinks::postgres::MIGRATOR.iter().count() as i64
    );
    pool.close().await;
    db.drop_db().await;
}

#[actix_web::test]
async fn request_timeouts_are_retried_until_the_api_answers() {
    let mut config = emulator_config(2_000);
    config.faults.latency_ms = 2_500;
    let mut h = Harness::new(config).await;
    h.set("CLOUDFLARE_REQUEST_TIMEOUT_SECONDS", "1");
    let emulator = h.emu.emulator.clone();
    actix_rt::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_secs(3)).await;
        emulator.set_faults(cfaudit_emulator::Faults::default());
    });
    run_once(h.config()).await.unwrap();
    // Two pages of 1000 (plus an empty third), after at least two timed-out attempts.
    assert!(
        h.emu.emulator.requests() >= 4,
        "{} requests",
        h.emu.emulator.requests()
    );
    h.assert_exact().await;
    h.finish().await;
}

#[actix_web::test]
async fn hostile_events_are_stored_or_dead_lettered_and_never_block() {
    let h = Harness::new(emulator_config(300)).await;
    let events = h.emu.emulator.events();
    let when = |i: usize| {
        events[i]
            .when
            .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
    };
    let huge = "x".repeat(1 << 20);
    let ok = |id: &str, i: usize| json!({"id": id, "when": when(i), "action": {"type": "login", "result": true}});
    let mut hostile = vec![
        // Dead letters: no usable id or when.
        json!({"id": "bad-when", "when": "yesterday"}),
        json!({"when": when(10)}),
        json!({"id": 42, "when": when(11)}),
        // A NUL, which PostgreSQL cannot store, is kept as the text `\u0000`: the event is
        // stored, never dropped.
        json!({"id": "nul", "when": when(12), "actor": {"email": "a\u{0}b"}}),
        // Stored, as they are.
        json!({"id": "meta-text", "when": when(20), "metadata": "text"}),
        json!({"id": "meta-number", "when": when(21), "metadata": 42}),
        json!({"id": "ip-garbage", "when": when(22), "actor": {"ip": "999.1.1.1"}}),
        json!({"id": "ip-words", "when": when(23), "actor": {"ip": "not an ip"}}),
        json!({"id": "huge", "when": when(24), "newValue": huge, "oldValueJson": {"deep": [[[{"a": [1, {"b": null}]}]]]}}),
        json!({"id": "unknown-fields", "when": when(25), "foo": {"bar": [1, "two"]}, "zzz": null}),
    ];
    // The same event twice, inside one page (same id, same when).
    hostile.push(ok("twice", 30));
    hostile.push(ok("twice", 30));
    h.emu.emulator.insert(&hostile);
    let expected = valid_ids(&h.emu.emulator);
    assert_eq!(expected.len(), 300 + 8);

    let summary = run_once(h.config()).await.unwrap();
    assert_eq!(summary.dead_letters, 3);
    assert_eq!(summary.rows_in_postgres, expected.len() as i64);
    h.assert_exact().await;
    let last = events.last().unwrap().when;
    assert!(
        summary.checkpoint.unwrap() >= last,
        "the checkpoint moved past the hostile events"
    );

    let pool = h.db.pool().await;
    let (ip, meta, raw_len): (Option<String>, Option<String>, i32) = sqlx::query_as(
        "SELECT (SELECT host(ip_address) FROM audit_logs WHERE event_id = 'ip-garbage'), \
                (SELECT metadata::text FROM audit_logs WHERE event_id = 'meta-number'), \
                (SELECT length(raw_event::text) FROM audit_logs WHERE event_id = 'huge')",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((ip, meta.as_deref()), (None, Some("42")));
    assert!(raw_len > 1 << 20);
    let reasons: Vec<(String,)> =
        sqlx::query_as("SELECT reason FROM cfaudit_dead_letters ORDER BY reason")
            .fetch_all(&pool)
            .await
            .unwrap();
    let reasons: Vec<&str> = reasons.iter().map(|r| r.0.as_str()).collect();
    assert!(reasons.iter().any(|r| r.contains("`when`")), "{reasons:?}");
    assert!(
        reasons.iter().any(|r| r.contains("`id` is missing")),
        "{reasons:?}"
    );
    let (email,): (Option<String>,) =
        sqlx::query_as("SELECT actor_email FROM audit_logs WHERE event_id = 'nul'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        email.as_deref(),
        Some("a\\u0000b"),
        "the NUL is kept as text"
    );
    pool.close().await;

    let again = run_once(h.config()).await.unwrap();
    assert_eq!(
        (again.rows_in_postgres, again.dead_letters),
        (summary.rows_in_postgres, 3)
    );
    h.assert_exact().await;
    h.finish().await;
}

/// The migrations of the previous release (9ed785e): every file before the exactly-once work.
const PREVIOUS_RELEASE_MIGRATIONS: i64 = 20260101000004;

/// Turns a database written by this release back into the previous release's: what migrations
/// 5, 6, 8, 10 and 11 added is dropped (7 only comments on columns, which the comparison leaves
/// aside), and what they converted is restored (the overlap ids of events at and after each
/// stream's checkpoint, the dead letters' text digest); the aggregates 9 and 12 recreated (12:
/// tables kept by triggers, on plain PostgreSQL) are dropped here and created again as views by
/// migrations 2 and 4 ([`AGGREGATES_OF_PREVIOUS_RELEASE`]), and 13's to 16's daily rollups,
/// their reading functions and 18's fold (plain PostgreSQL) are dropped.
const DOWNGRADE_TO_PREVIOUS_RELEASE: &str = "
DROP FUNCTION audit_actors_between;
DROP FUNCTION audit_actor_activity_between;
DROP FUNCTION audit_address_activity_between;
DROP FUNCTION audit_actor_pairs_between;
DROP FUNCTION audit_address_pairs_between;
DROP FUNCTION audit_logins_between;
DROP FUNCTION cfaudit_create_reading_function;
DROP FUNCTION cfaudit_last_day_is_whole;
DROP FUNCTION cfaudit_first_whole_day;
DROP FUNCTION cfaudit_whole_days_end;
DROP FUNCTION cfaudit_utc_day;
DO $$
BEGIN
  IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') THEN
    DROP MATERIALIZED VIEW audit_actor_activity_daily;
    DROP MATERIALIZED VIEW audit_address_activity_daily;
    DROP MATERIALIZED VIEW audit_logins_daily;
    DROP MATERIALIZED VIEW audit_actors_daily;
    DROP MATERIALIZED VIEW audit_events_hourly;
    DROP MATERIALIZED VIEW audit_actors_hourly;
  ELSE
    DROP FUNCTION cfaudit_fold_days;
    DROP FUNCTION cfaudit_folded_days_end;
    DROP TABLE cfaudit_unfolded_days;
    DROP FUNCTION cfaudit_recount_login_days;
    DROP TABLE audit_logins_daily;
    DROP FUNCTION cfaudit_recount_actor_and_address_days;
    DROP TABLE audit_actor_activity_daily;
    DROP TABLE audit_address_activity_daily;
    DROP TRIGGER audit_logs_count_inserted ON audit_logs;
    DROP TRIGGER audit_logs_count_updated ON audit_logs;
    DROP TRIGGER audit_logs_count_deleted ON audit_logs;
    DROP TRIGGER audit_logs_count_truncated ON audit_logs;
    DROP FUNCTION cfaudit_count_rows;
    DROP TABLE audit_events_hourly;
    DROP TABLE audit_actors_hourly;
    DROP TABLE audit_actors_daily;
  END IF;
END
$$;
DROP INDEX audit_logs_actor_time_idx, audit_logs_ip_time_idx, audit_logs_resource_time_idx,
  audit_logs_zone_time_idx, audit_logs_failed_time_idx;
ALTER TABLE audit_logs DROP COLUMN api_version, DROP COLUMN actor_id, DROP COLUMN actor_context,
  DROP COLUMN actor_token_id, DROP COLUMN actor_token_name, DROP COLUMN action_description,
  DROP COLUMN resource_product, DROP COLUMN resource_scope, DROP COLUMN zone_id, DROP COLUMN zone_name,
  DROP COLUMN raw_method, DROP COLUMN raw_uri, DROP COLUMN raw_cf_ray_id, DROP COLUMN raw_user_agent,
  DROP COLUMN raw_status_code;
UPDATE cfaudit_checkpoints c SET overlap_ids = coalesce((
    SELECT jsonb_agg(jsonb_build_object('id', a.event_id, 'when', a.timestamp))
    FROM audit_logs a
    WHERE a.account_id = split_part(c.account_id, '.', 1) AND a.timestamp >= c.checkpoint), '[]');
DROP FUNCTION cfaudit_in_lake;
DROP FUNCTION cfaudit_lock_held;
DROP TABLE cfaudit_replicas;
DROP TABLE cfaudit_lease_log;
ALTER TABLE cfaudit_parquet_files DROP COLUMN lease_token;
DROP TABLE cfaudit_lake_events;
DROP TABLE cfaudit_rewritten_rows;
ALTER TABLE cfaudit_checkpoints DROP COLUMN lease_token, DROP COLUMN lease_holder,
  DROP COLUMN leased_at, DROP COLUMN unfinished_sweep, DROP COLUMN swept_until;
DROP INDEX cfaudit_dead_letters_raw_idx;
ALTER TABLE cfaudit_dead_letters
  ADD COLUMN raw_md5 TEXT GENERATED ALWAYS AS (md5(raw_event)) STORED,
  ADD UNIQUE (account_id, raw_md5);
ALTER TABLE cfaudit_dead_letters DROP COLUMN raw_bytes;
DELETE FROM _sqlx_migrations WHERE version > 20260101000004;
";

/// Rewrites every Parquet file under the folder `argv[1]` with the previous release's columns
/// only (those before `api_version`), as that release wrote them; prints `{path: bytes}`.
const PARQUET_OF_PREVIOUS_RELEASE: &str = r#"
import json, pathlib, sys
import pyarrow.parquet as pq
sizes = {}
for path in pathlib.Path(sys.argv[1]).rglob("*.parquet"):
    table = pq.read_table(path, partitioning=None)
    names = table.schema.names
    table = table.select(names[: names.index("api_version")])
    pq.write_table(table, path, compression="zstd")
    sizes[str(path.relative_to(sys.argv[1]))] = path.stat().st_size
print(json.dumps(sizes))
"#;

/// DuckDB over old and new files together, schemas merged by name: `[rows, rows without
/// api_version, rows that are v1 once the old ones count as v1]`.
const DUCKDB_OLD_AND_NEW: &str = r#"
import json, sys, duckdb
rows = duckdb.sql(
    "SELECT count(*), count(*) FILTER (WHERE api_version IS NULL), "
    "count(*) FILTER (WHERE coalesce(api_version, 'v1') = 'v1') FROM read_parquet('"
    + sys.argv[1] + "/**/*.parquet', hive_partitioning = true, union_by_name = true)").fetchall()[0]
print(json.dumps(list(rows)))
"#;

fn run_python(script: &str, root: &str) -> Value {
    let out = std::process::Command::new(python())
        .args(["-c", script, root])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The aggregates as the previous release had them: its own migrations' text.
const AGGREGATES_OF_PREVIOUS_RELEASE: [&str; 2] = [
    include_str!("../../migrations/20260101000002_aggregates.sql"),
    include_str!("../../migrations/20260101000004_realtime_aggregates.sql"),
];

/// The public schema, order aside: every column with its type, nullability and default, every
/// index and constraint, every table and view by name.
async fn schema_of(pool: &sqlx::PgPool) -> Vec<String> {
    let rows: Vec<(String,)> = sqlx::query_as(
        "SELECT format('column %s.%s %s %s %s %s', table_name, column_name, data_type, \
                       is_nullable, coalesce(column_default, ''), coalesce(generation_expression, '')) \
         FROM information_schema.columns WHERE table_schema = 'public' \
         UNION ALL SELECT format('index %s', indexdef) FROM pg_indexes WHERE schemaname = 'public' \
         UNION ALL SELECT format('constraint %s %s %s', conrelid::regclass, conname, \
                                 pg_get_constraintdef(oid)) \
                   FROM pg_constraint WHERE connamespace = 'public'::regnamespace \
         UNION ALL SELECT format('relation %s %s', relname, relkind) FROM pg_class \
                   WHERE relnamespace = 'public'::regnamespace AND relkind IN ('r', 'v', 'm', 'p') \
         UNION ALL SELECT format('migration %s %s', version, encode(checksum, 'hex')) \
                   FROM _sqlx_migrations \
         ORDER BY 1",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    rows.into_iter().map(|(row,)| row).collect()
}

/// Every column the previous release had, of every row collected before the upgrade.
async fn fingerprint_before_upgrade(pool: &sqlx::PgPool) -> (Option<String>, i64) {
    sqlx::query_as(
        "SELECT md5(string_agg(row(event_id, timestamp, account_id, actor_email, actor_type, \
                    action_type, action_result, resource_type, resource_id, ip_address, metadata, \
                    raw_event, ingestion_time)::text, '|' ORDER BY timestamp, event_id)), count(*) \
         FROM audit_logs t WHERE event_id NOT LIKE 'after-upgrade-%'",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

/// A database filled by the previous release's schema (on TimescaleDB with every chunk
/// compressed) takes today's migrations: every row unchanged, dead letters kept, the event
/// index built from what was committed, the policies intact; collecting goes on from the
/// checkpoint, a new event at the very instant of the last committed one included, and a
/// re-read of the whole range changes nothing.
async fn a_database_of_the_previous_release_upgrades_with_nothing_lost(cluster: Cluster) {
    let test = "a_database_of_the_previous_release_upgrades_with_nothing_lost";
    let mut config = emulator_config(3_000);
    config.invalid_every = 500;
    let Some(mut h) = Harness::on_cluster(cluster, test, config).await else {
        return;
    };
    assert!(finish(cfaudit(&["run", "--once"], &h.env)).await.success);
    let pool = h.db.pool().await;
    assert_runs_on(&pool, cluster).await;
    sqlx::raw_sql(DOWNGRADE_TO_PREVIOUS_RELEASE)
        .execute(&pool)
        .await
        .unwrap();
    for migration in AGGREGATES_OF_PREVIOUS_RELEASE {
        sqlx::raw_sql(migration).execute(&pool).await.unwrap();
    }
    // The dataset as the previous release wrote it: its columns only, its byte counts.
    let sizes = run_python(PARQUET_OF_PREVIOUS_RELEASE, &h.lake);
    let old_files = sizes.as_object().unwrap();
    assert!(old_files.len() > 10, "{sizes}");
    for (path, bytes) in old_files {
        let updated = sqlx::query("UPDATE cfaudit_parquet_files SET bytes = $1 WHERE final_path = $2 OR final_path LIKE '%/' || $2")
            .bind(bytes.as_i64().unwrap())
            .bind(path)
            .execute(&pool)
            .await
            .unwrap()
            .rows_affected();
        assert_eq!(updated, 1, "{path}");
    }

    // The downgraded database has exactly the schema the previous release's migrations give.
    let reference = TestDb::on(&h.db.admin).await;
    let reference_pool = reference.pool().await;
    cfaudit::sinks::postgres::MIGRATOR
        .run_to(PREVIOUS_RELEASE_MIGRATIONS, &reference_pool)
        .await
        .unwrap();
    assert_eq!(
        schema_of(&pool).await,
        schema_of(&reference_pool).await,
        "the downgrade does not give the previous release's schema"
    );
    reference_pool.close().await;
    reference.drop_db().await;

    let timescale = cluster == Cluster::Timescaledb;
    if timescale {
        sqlx::raw_sql(
            "SELECT compress_chunk(c, if_not_compressed => TRUE) FROM show_chunks('audit_logs') c",
        )
        .execute(&pool)
        .await
        .unwrap();
    }
    let policies_sql = "SELECT count(*) FROM timescaledb_information.jobs \
                        WHERE hypertable_name = 'audit_logs' \
                           OR proc_name = 'policy_refresh_continuous_aggregate'";
    let policies = if timescale {
        count(&pool, policies_sql).await
    } else {
        0
    };
    let compressed_sql = "SELECT count(*) FROM timescaledb_information.chunks \
                          WHERE hypertable_name = 'audit_logs' AND is_compressed";
    let compressed = if timescale {
        count(&pool, compressed_sql).await
    } else {
        0
    };
    let before = fingerprint_before_upgrade(&pool).await;
    let dead_letters = count(&pool, "SELECT count(*) FROM cfaudit_dead_letters").await;
    assert!(
        dead_letters > 0 && before.1 > 2_900,
        "{before:?} {dead_letters}"
    );

    // New events: after the checkpoint, and one at the very instant of the newest committed
    // event (the previous release's overlap ids told that instant's events apart).
    let newest = h
        .emu
        .emulator
        .events()
        .iter()
        .map(|e| e.when)
        .max()
        .unwrap();
    let event = |id: &str, when: chrono::DateTime<chrono::Utc>| {
        json!({"id": id, "when": when.to_rfc3339(),
               "action": {"type": "member_add", "result": true},
               "actor": {"email": "upgrade@example.com", "type": "user"}})
    };
    h.emu.emulator.insert(&[
        event("after-upgrade-tie", newest),
        event("after-upgrade-1", newest + chrono::Duration::minutes(5)),
        event("after-upgrade-2", newest + chrono::Duration::minutes(9)),
    ]);
    let upgraded = finish(cfaudit(&["run", "--once"], &h.env)).await;
    assert!(upgraded.success, "{}", upgraded.stderr);

    assert_eq!(
        fingerprint_before_upgrade(&pool).await,
        before,
        "rows of the previous release changed"
    );
    let counts = h.assert_exact().await;
    let rows = count(&pool, "SELECT count(*) FROM audit_logs").await;
    assert_eq!(rows, before.1 + 3);
    let read = run_python(DUCKDB_OLD_AND_NEW, &h.lake);
    assert_eq!(
        read,
        json!([rows, before.1, rows]),
        "DuckDB reads the previous release's files with the new ones; theirs are v1"
    );
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM audit_logs WHERE api_version = 'v1'"
        )
        .await,
        rows,
        "the rows from before are v1 rows, and so are the new ones"
    );
    assert_eq!(
        count(&pool, "SELECT count(*) FROM cfaudit_lake_events").await,
        rows,
        "every committed event is in the dataset's event index"
    );
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM cfaudit_dead_letters WHERE raw_bytes IS NOT NULL"
        )
        .await,
        dead_letters
    );
    // The aggregates came back by version and hold every row (the address rollup every row
    // with an address), the compressed history too (on TimescaleDB materialized by the run's
    // refresh and the real-time part).
    let with_address = count(
        &pool,
        "SELECT count(*) FROM audit_logs WHERE api_version = 'v1' AND ip_address IS NOT NULL",
    )
    .await;
    assert!(with_address > 0 && with_address < rows, "{with_address}");
    for (view, expected) in [
        ("audit_events_hourly", rows),
        ("audit_actors_hourly", rows),
        ("audit_actors_daily", rows),
        ("audit_actor_activity_daily", rows),
        ("audit_address_activity_daily", with_address),
    ] {
        let sql =
            format!("SELECT coalesce(sum(events), 0)::bigint FROM {view} WHERE api_version = 'v1'");
        assert_eq!(
            count(&pool, &sql).await,
            expected,
            "{view} after the upgrade"
        );
    }
    assert_eq!(
        count(
            &pool,
            "SELECT coalesce(sum(logins), 0)::bigint FROM audit_logins_daily WHERE api_version = 'v1'"
        )
        .await,
        count(
            &pool,
            "SELECT count(*) FROM audit_logs WHERE api_version = 'v1' AND action_type = 'login'"
        )
        .await,
        "audit_logins_daily after the upgrade"
    );
    if timescale {
        assert_eq!(
            count(&pool, policies_sql).await,
            policies + 4,
            "policies intact, and the daily rollups' refresh policies added"
        );
        assert!(
            policies >= 4,
            "compression, retention and two refresh policies"
        );
        assert!(
            count(&pool, compressed_sql).await >= compressed,
            "compressed chunks stay compressed"
        );
    }

    // A re-read of the whole range after the upgrade: nothing new, nothing doubled.
    h.set("CLOUDFLARE_SINCE_SAFETY_LAG_SECONDS", "4000000");
    let reread = finish(cfaudit(&["run", "--once"], &h.env)).await;
    assert!(reread.success, "{}", reread.stderr);
    assert_eq!(fingerprint_before_upgrade(&pool).await, before);
    assert_eq!(h.assert_exact().await, counts);
    println!(
        "{cluster:?}: previous release's database ({} rows, {dead_letters} dead letters, \
         {compressed} compressed chunks, {policies} policies) upgraded; 3 new events, exact: {counts}",
        before.1
    );
    pool.close().await;
    h.finish().await;
}

on_both_clusters!(a_database_of_the_previous_release_upgrades_with_nothing_lost);
