//! The TimescaleDB path, on a real TimescaleDB cluster (`make test` starts it from
//! `../shared/tools/timescaledb`): the migrations make `audit_logs` a hypertable with 1-day
//! chunks, and a backfill lands exactly once, column for column. Without the cluster each test
//! says loudly that TimescaleDB was not tested; where it is required (CI) that is a failure.

use crate::common::*;

#[actix_rt::test]
async fn migrations_apply_twice_and_make_audit_logs_a_hypertable_with_one_day_chunks() {
    let test = "migrations_apply_twice_and_make_audit_logs_a_hypertable_with_one_day_chunks";
    let Some((db, pg)) = TestDb::migrated(Cluster::Timescaledb, test).await else {
        return;
    };
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
    let aggregates = count(
        &pool,
        "SELECT count(*) FROM timescaledb_information.continuous_aggregates \
         WHERE view_name IN ('audit_events_hourly', 'audit_actors_hourly')",
    )
    .await;
    assert_eq!(
        aggregates, 2,
        "both hourly aggregates are continuous aggregates"
    );
    // An index a migration dropped by name is gone here too, where an aggregate's indexes
    // live outside the search path (and each chunk has a copy).
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM pg_class WHERE relname LIKE '%audit_actors_daily_logins_idx'"
        )
        .await,
        0,
        "migration 14's index for the logins panel, dropped by 16 and 17"
    );
    println!("timescaledb: audit_logs is a hypertable on {column}, chunks of {interval}");
    pool.close().await;
    db.drop_db().await;
}

/// A fresh database's migrations start the aggregates' refresh jobs (migration 2) and later
/// replace those aggregates (migration 9): a job that runs in between made the replacement
/// fail with "tuple concurrently deleted" about once in six fresh databases, and with it the
/// first start of cfaudit. Twenty-four fresh databases in a row all migrate.
#[actix_rt::test]
async fn fresh_databases_migrate_while_the_refresh_jobs_they_start_run() {
    let test = "fresh_databases_migrate_while_the_refresh_jobs_they_start_run";
    let Some(admin) = Cluster::Timescaledb.admin_url(test) else {
        return;
    };
    for attempt in 1..=24 {
        let db = TestDb::on(&admin).await;
        let pg = cfaudit::sinks::postgres::Postgres::connect(&secret(&db.url), 2, None)
            .await
            .unwrap();
        let migrated = pg.migrate().await;
        pg.pool().close().await;
        db.drop_db().await;
        migrated.unwrap_or_else(|error| panic!("fresh database {attempt}: {error:#}"));
    }
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
    let chunks = count(
        &pool,
        "SELECT count(*) FROM timescaledb_information.chunks WHERE hypertable_name = 'audit_logs'",
    )
    .await;
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
    let compressed = count(&pool, "SELECT count(compress_chunk(c, if_not_compressed => TRUE)) FROM show_chunks('audit_logs') c").await;
    let uncompressed = count(
        &pool,
        "SELECT count(*) FROM timescaledb_information.chunks \
         WHERE hypertable_name = 'audit_logs' AND NOT is_compressed",
    )
    .await;
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
    let stored = count(
        &pool,
        "SELECT count(*) FROM audit_logs WHERE event_id = 'late-into-compressed'",
    )
    .await;
    assert_eq!(stored, 1);
    h.assert_exact().await;
    println!("timescaledb: a late event into a compressed chunk stored once, both sinks exact");
    pool.close().await;
    h.finish().await;
}

/// Does now what each aggregate's refresh policy does every five minutes: refreshes the window
/// its configuration names (from `start_offset` to `end_offset` before now). Not `run_job`:
/// the background jobs of the TimescaleDB build the tests use fail as they finish ("cannot
/// drop portal"), whereas this call is the policy's own work and succeeds.
async fn run_refresh_policies(pool: &sqlx::PgPool) {
    let policies: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT format('%I.%I', hypertable_schema, hypertable_name), \
                config->>'start_offset', config->>'end_offset' \
         FROM timescaledb_information.jobs \
         WHERE proc_name = 'policy_refresh_continuous_aggregate' \
         ORDER BY job_id",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    // In the order they were created: an aggregate built on another refreshes after it.
    assert_eq!(policies.len(), 6, "a refresh policy per aggregate");
    for (view, start, end) in policies {
        let call = format!(
            "CALL refresh_continuous_aggregate('{view}', now() - '{start}'::interval, \
                                               now() - '{end}'::interval)"
        );
        // A refresh of cfaudit's (or a policy's job) may cover part of the window: TimescaleDB
        // refuses this one until that one is done, so ask again, as cfaudit does.
        let mut refused = 0;
        loop {
            match sqlx::raw_sql(sqlx::AssertSqlSafe(call.clone()))
                .execute(pool)
                .await
            {
                Err(sqlx::Error::Database(e))
                    if e.code().as_deref() == Some("55P03") && refused < 60 =>
                {
                    refused += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                }
                result => {
                    result.unwrap();
                    break;
                }
            }
        }
    }
}

/// Waits until the aggregates agree with `audit_logs` bucket by bucket, their refresh
/// policies having run (a policy materializes its last days only, after which the aggregates
/// read every older bucket as materialized), and the panels' reading of whole days from the
/// daily rollup agrees with their reading of the hours.
async fn wait_aggregates_agree(pool: &sqlx::PgPool, what: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        run_refresh_policies(pool).await;
        let mismatches = aggregate_mismatches(pool).await;
        if mismatches.none() {
            assert_eq!(rollup_mismatches(pool).await, [], "{what}");
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: groups where the aggregates disagree with audit_logs: {mismatches:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

/// A run ends with every hour of the aggregates materialized as its rows are. cfaudit
/// refreshes the hours older than the policies' window while the writers go on (one refresh
/// at a time, asked for by the commits) and once more at the end. A real-time aggregate reads
/// a materialized hour as it was materialized, so an hour written after its last refresh would
/// disagree with `audit_logs`. Checked straight after the run: the policies are run first only
/// for the window they own, which leaves every older hour as cfaudit left it.
#[actix_rt::test]
async fn a_run_ends_with_the_aggregates_materialized_while_it_wrote() {
    let test = "a_run_ends_with_the_aggregates_materialized_while_it_wrote";
    let Some(mut h) = Harness::on_timescale(test, emulator_config(20_000)).await else {
        return;
    };
    // 200 commits over 30 days: refreshes run while hours are still being written.
    h.set("CLOUDFLARE_PER_PAGE", "100");
    h.set("BATCH_MAX_EVENTS", "100");
    // The binary: its refreshes end with the process, as they do in production.
    let run = finish(cfaudit(&["run", "--once"], &h.env)).await;
    assert!(run.success, "run --once failed: {}", run.stderr);
    let pool = h.db.pool().await;
    // Materialized past the newest row older than the policies' window: below that point
    // (the watermark) the aggregates read the hours as materialized. Before any refresh they
    // read audit_logs itself, and agree trivially.
    let behind = count(
        &pool,
        "SELECT count(*) FROM _timescaledb_catalog.continuous_agg \
         WHERE _timescaledb_functions.to_timestamp( \
                 _timescaledb_functions.cagg_watermark(mat_hypertable_id)) \
               <= (SELECT max(timestamp) FROM audit_logs \
                   WHERE timestamp < now() - INTERVAL '4 days')",
    )
    .await;
    assert_eq!(
        behind, 0,
        "aggregates not materialized up to the policies' window"
    );
    run_refresh_policies(&pool).await;
    assert_eq!(
        aggregate_mismatches(&pool).await,
        AggregateMismatches::default(),
        "groups where the aggregates disagree with audit_logs"
    );
    assert_eq!(rollup_mismatches(&pool).await, []);
    h.assert_exact().await;
    pool.close().await;
    h.finish().await;
}

/// The service's first catch-up materializes the hours it has written while it is still
/// writing, not once the whole backlog is in: a dashboard opened during a long first sweep
/// shows what is committed from materialized hours. Before, the refresh ran only once a sweep
/// had ended, and the materialized part held nothing older than the policies' window until
/// every row was in.
#[actix_rt::test]
async fn the_catch_up_is_materialized_while_it_writes() {
    let test = "the_catch_up_is_materialized_while_it_writes";
    let Some(mut h) = Harness::on_timescale(test, emulator_config(6_000)).await else {
        return;
    };
    // About 70 requests at 5 a second: a sweep of about 12 s.
    h.set("CLOUDFLARE_PER_PAGE", "100");
    h.set("BATCH_MAX_EVENTS", "100");
    h.set("CLOUDFLARE_REQUESTS_PER_5_MINUTES", "1500");
    h.set("CLOUDFLARE_REQUEST_BURST", "5");
    h.set("METRICS_ADDR", &format!("127.0.0.1:{}", free_port()));
    let migrated = finish(cfaudit(&["migrate"], &h.env)).await;
    assert!(migrated.success, "{}", migrated.stderr);
    let pool = h.db.pool().await;
    let total = valid_ids(&h.emu.emulator).len() as i64;
    let (materialization,): (String,) = sqlx::query_as(
        "SELECT format('%I.%I', m.schema_name, m.table_name) \
         FROM _timescaledb_catalog.continuous_agg c \
         JOIN _timescaledb_catalog.hypertable m ON m.id = c.mat_hypertable_id \
         WHERE c.user_view_name = 'audit_events_hourly'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    // Materialized hours older than the policies' window, which only cfaudit refreshes.
    let materialized = format!(
        "SELECT coalesce(sum(events), 0)::bigint FROM {materialization} \
         WHERE bucket < now() - INTERVAL '4 days'"
    );
    let child = cfaudit(&["run"], &h.env);
    let mut seen_while_writing = None;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        // Materialized first, then the rows: a sample with every row in counts as after.
        let done = count(&pool, &materialized).await;
        let rows = count(&pool, "SELECT count(*) FROM audit_logs").await;
        if rows >= total {
            break;
        }
        if done > 0 && seen_while_writing.is_none() {
            seen_while_writing = Some((done, rows));
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{rows} of {total} rows after 120 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let (done, rows) = seen_while_writing
        .expect("no hour was materialized before the catch-up had written every row");
    assert!(done <= rows);
    // The refresh after the last commits catches up while the service polls on.
    wait_aggregates_agree(&pool, "after the catch-up").await;
    signal(&child, "-TERM");
    let stopped = finish(child).await;
    assert_eq!(stopped.code, Some(0), "{}", stopped.stderr);
    h.assert_exact().await;
    println!(
        "timescaledb: {done} events in materialized hours while {rows} of {total} rows were in"
    );
    pool.close().await;
    h.finish().await;
}

/// The dashboards' continuous aggregates agree with `audit_logs` once their refresh policy has
/// run: after the live stream's catch-up over 30 days, and after live polling that collects
/// new events and a late one 10 days back (reached by the safety lag). A policy materializes
/// only its last 3 days and then reads every older hour as materialized: without cfaudit's own
/// refresh of those hours, they would vanish from the dashboards.
#[actix_rt::test]
async fn continuous_aggregates_agree_with_audit_logs_after_the_catch_up_and_live_polling() {
    let test = "continuous_aggregates_agree_with_audit_logs_after_the_catch_up_and_live_polling";
    let mut config = emulator_config(3_000);
    config.invalid_every = 500;
    let Some(mut h) = Harness::on_timescale(test, config).await else {
        return;
    };
    let event = |id: String, when: chrono::DateTime<chrono::Utc>, result: bool| {
        serde_json::json!({
            "id": id,
            "when": when.to_rfc3339(),
            "action": {"type": "zone_setting_change", "result": result},
            "actor": {"email": "live@example.com", "type": "user", "ip": "192.0.2.7"},
            "resource": {"type": "zone", "id": "z1"},
        })
    };
    // Events inside the policy's window too, in whole hours, so that its refresh materializes
    // something and moves the point before which the aggregates read materialized hours only.
    let now = chrono::Utc::now();
    let recent: Vec<_> = (0..48)
        .map(|i| {
            event(
                format!("recent-{i}"),
                now - chrono::Duration::hours(2 + i),
                i % 4 == 0,
            )
        })
        .collect();
    h.emu.emulator.insert(&recent);
    run_once(h.config()).await.unwrap();
    let pool = h.db.pool().await;
    wait_aggregates_agree(&pool, "after the catch-up").await;

    h.emu.emulator.insert(&[event(
        "late-ten-days".into(),
        now - chrono::Duration::days(10),
        false,
    )]);
    h.set(
        "CLOUDFLARE_SINCE_SAFETY_LAG_SECONDS",
        &(11 * 86_400).to_string(),
    );
    h.set("POLL_INTERVAL_SECONDS", "1");
    h.set("METRICS_ADDR", &format!("127.0.0.1:{}", free_port()));
    let child = cfaudit(&["run"], &h.env);
    for round in 0..3 {
        let now = chrono::Utc::now();
        let arrivals: Vec<_> = (0..20)
            .map(|i| {
                event(
                    format!("live-{round}-{i}"),
                    now - chrono::Duration::hours(2) - chrono::Duration::seconds(i),
                    i % 3 == 0,
                )
            })
            .collect();
        h.emu.emulator.insert(&arrivals);
        wait_for_rows(&pool, valid_ids(&h.emu.emulator).len() as i64).await;
        wait_aggregates_agree(&pool, &format!("after live round {round}")).await;
    }
    signal(&child, "-TERM");
    let stopped = finish(child).await;
    assert_eq!(stopped.code, Some(0), "{}", stopped.stderr);
    let late = count(
        &pool,
        "SELECT coalesce(sum(events), 0)::bigint FROM audit_actors_hourly \
         WHERE actor_email = 'live@example.com' AND bucket < now() - INTERVAL '9 days'",
    )
    .await;
    assert_eq!(late, 1, "the late event is in the dashboards' aggregate");
    h.assert_exact().await;
    println!(
        "timescaledb: aggregates agree with audit_logs after the catch-up and 3 live rounds \
         (policies run, a late event 10 days back included)"
    );
    pool.close().await;
    h.finish().await;
}
