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
