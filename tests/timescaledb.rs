//! The TimescaleDB path, on a real TimescaleDB cluster (`make test` starts it from
//! `../shared/tools/timescaledb`): the migrations make `audit_logs` a hypertable with 1-day
//! chunks, and a backfill lands exactly once, column for column. Without the cluster each test
//! says loudly that TimescaleDB was not tested; where it is required (CI) that is a failure.

mod common;

use common::*;

#[actix_rt::test]
async fn migrations_apply_twice_and_make_audit_logs_a_hypertable_with_one_day_chunks() {
    let test = "migrations_apply_twice_and_make_audit_logs_a_hypertable_with_one_day_chunks";
    let Some(admin) = timescale_admin_url(test) else {
        return;
    };
    let db = TestDb::on(&admin).await;
    let pg = cfaudit::postgres::Postgres::connect(&secret(&db.url), 2, None)
        .await
        .unwrap();
    pg.migrate().await.unwrap();
    pg.migrate().await.unwrap();
    assert!(pg.has_timescaledb().await.unwrap());
    let pool = db.pool().await;
    let (column, interval): (String, String) = sqlx::query_as(
        "SELECT column_name::text, time_interval::text FROM timescaledb_information.dimensions \
         WHERE hypertable_name = 'audit_logs'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((column.as_str(), interval.as_str()), ("timestamp", "1 day"));
    let (aggregates,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM timescaledb_information.continuous_aggregates \
         WHERE view_name IN ('audit_events_hourly', 'audit_actors_hourly')",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        aggregates, 2,
        "both hourly aggregates are continuous aggregates"
    );
    println!("timescaledb: audit_logs is a hypertable on {column}, chunks of {interval}");
    pool.close().await;
    db.drop_db().await;
}

#[actix_rt::test]
async fn a_backfill_lands_exactly_once_on_timescaledb_column_for_column() {
    let test = "a_backfill_lands_exactly_once_on_timescaledb_column_for_column";
    let mut config = emulator_config(3_000);
    config.invalid_every = 97;
    let Some(h) = Harness::on_timescale(test, config).await else {
        return;
    };
    run_once(h.config()).await.unwrap();
    // A second run over the same range adds nothing.
    run_once(h.config()).await.unwrap();
    let expected = valid_ids(&h.emu.emulator);
    let pool = h.db.pool().await;
    let counts = assert_exact(&pool, &h.lake, &h.reader_env, &expected).await;
    assert_columns_match_ground_truth(
        &pool,
        &h.lake,
        &h.reader_env,
        &h.emu.emulator.events(),
        &expected,
    )
    .await;
    let (chunks,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM timescaledb_information.chunks WHERE hypertable_name = 'audit_logs'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(chunks >= 1);
    println!(
        "timescaledb: {} events exact in both sinks, {chunks} chunks: {counts}",
        expected.len()
    );
    pool.close().await;
    h.finish().await;
}

/// The hypertable's policy jobs: (policy, its interval), sorted.
async fn policies(pool: &sqlx::PgPool) -> Vec<(String, String)> {
    sqlx::query_as(
        "SELECT proc_name::text, coalesce(config->>'compress_after', config->>'drop_after') \
         FROM timescaledb_information.jobs WHERE hypertable_name = 'audit_logs' ORDER BY 1",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

#[actix_rt::test]
async fn policies_follow_the_configuration_at_every_start_and_zero_removes_them() {
    let test = "policies_follow_the_configuration_at_every_start_and_zero_removes_them";
    let Some(mut h) = Harness::on_timescale(test, emulator_config(100)).await else {
        return;
    };
    let pool = h.db.pool().await;
    let expect = |compress: &str, retention: &str| {
        vec![
            ("policy_compression".to_owned(), compress.to_owned()),
            ("policy_retention".to_owned(), retention.to_owned()),
        ]
    };
    run_once(h.config()).await.unwrap();
    assert_eq!(
        policies(&pool).await,
        expect("30 days", "90 days"),
        "the defaults"
    );
    h.set("TIMESCALE_COMPRESS_AFTER_DAYS", "7");
    h.set("RETENTION_DAYS", "14");
    run_once(h.config()).await.unwrap();
    assert_eq!(
        policies(&pool).await,
        expect("7 days", "14 days"),
        "changed and restarted"
    );
    let status = finish(cfaudit(&["status"], &h.env)).await;
    assert!(
        status
            .stdout
            .contains("compression after 7 days; retention 14 days"),
        "{}",
        status.stdout
    );
    let check = finish(cfaudit(&["check"], &h.env)).await;
    assert!(
        check.stdout.contains("PASS  database:") && check.stdout.contains("TimescaleDB 2."),
        "{}",
        check.stdout
    );
    h.set("TIMESCALE_COMPRESS_AFTER_DAYS", "0");
    h.set("RETENTION_DAYS", "0");
    run_once(h.config()).await.unwrap();
    assert_eq!(policies(&pool).await, vec![], "0 removes both");
    let status = finish(cfaudit(&["status"], &h.env)).await;
    assert!(
        status
            .stdout
            .contains("no compression policy; no retention policy"),
        "{}",
        status.stdout
    );
    println!("timescaledb: policies 30/90 -> 7/14 -> none, as configured");
    pool.close().await;
    h.finish().await;
}

/// With every chunk compressed, a replay of the whole dataset and a re-read of the range
/// insert nothing and fail nowhere; the table is unchanged.
#[actix_rt::test]
async fn compressed_chunks_take_a_replay_and_a_re_read_without_change() {
    let test = "compressed_chunks_take_a_replay_and_a_re_read_without_change";
    let Some(mut h) = Harness::on_timescale(test, emulator_config(2_000)).await else {
        return;
    };
    run_once(h.config()).await.unwrap();
    let pool = h.db.pool().await;
    let before = table_fingerprint(&pool).await;
    let (compressed,): (i64,) = sqlx::query_as(
        "SELECT count(compress_chunk(c, if_not_compressed => TRUE)) FROM show_chunks('audit_logs') c",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let (uncompressed,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM timescaledb_information.chunks \
         WHERE hypertable_name = 'audit_logs' AND NOT is_compressed",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(
        compressed > 0 && uncompressed == 0,
        "{compressed} compressed, {uncompressed} not"
    );

    let replayed = finish(cfaudit(&["replay"], &h.env)).await;
    assert!(replayed.success, "{}", replayed.stderr);
    let summary: serde_json::Value = serde_json::from_str(replayed.stdout.trim()).unwrap();
    assert_eq!(summary["inserted"].as_i64(), Some(0), "{summary}");

    // A re-read of the whole range: a day of safety lag.
    h.set("CLOUDFLARE_SINCE_SAFETY_LAG_SECONDS", "86400");
    run_once(h.config()).await.unwrap();
    assert_eq!(table_fingerprint(&pool).await, before, "the table changed");
    h.assert_exact().await;
    println!("timescaledb: {compressed} compressed chunks, replay and re-read inserted nothing");
    pool.close().await;
    h.finish().await;
}

/// An event that turns up late, at a time whose chunk is compressed already, is stored: a
/// sweep whose safety lag reaches back to it collects it (and nothing twice).
#[actix_rt::test]
async fn a_late_event_into_a_compressed_chunk_is_stored() {
    let test = "a_late_event_into_a_compressed_chunk_is_stored";
    let Some(mut h) = Harness::on_timescale(test, emulator_config(2_000)).await else {
        return;
    };
    run_once(h.config()).await.unwrap();
    let pool = h.db.pool().await;
    sqlx::raw_sql(
        "SELECT compress_chunk(c, if_not_compressed => TRUE) FROM show_chunks('audit_logs') c",
    )
    .execute(&pool)
    .await
    .unwrap();
    let events = h.emu.emulator.events();
    let middle = events[events.len() / 2].when;
    let late = serde_json::json!({
        "id": "late-into-compressed",
        "when": middle.to_rfc3339(),
        "action": {"type": "token_create", "result": true},
        "actor": {"email": "late@example.com", "type": "user"},
    });
    h.emu.emulator.insert(&[late]);
    let (compressed,): (bool,) = sqlx::query_as(
        "SELECT bool_and(is_compressed) FROM timescaledb_information.chunks \
         WHERE hypertable_name = 'audit_logs' AND $1 >= range_start AND $1 < range_end",
    )
    .bind(middle)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(compressed, "the late event's chunk is compressed");

    // The live stream re-reads back to it: a safety lag reaching an hour before it.
    let lag = (chrono::Utc::now() - middle).num_seconds() + 3_600;
    h.set("CLOUDFLARE_SINCE_SAFETY_LAG_SECONDS", &lag.to_string());
    run_once(h.config()).await.unwrap();
    let (stored,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM audit_logs WHERE event_id = 'late-into-compressed'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(stored, 1);
    h.assert_exact().await;
    println!("timescaledb: a late event into a compressed chunk stored once, both sinks exact");
    pool.close().await;
    h.finish().await;
}
