//! The dashboards' aggregates on plain PostgreSQL (hourly, and the daily actor rollups):
//! hourly tables that statement triggers on `audit_logs` keep current, daily ones folded from
//! them by `cfaudit_fold_days()` (TimescaleDB's continuous aggregates are tested in
//! `timescaledb`). After a real run and after every kind of write that can reach `audit_logs`
//! (racing writers on the same hours with folds among them, rows moved between accounts and in
//! time, deletes, a truncate): before the fold, the hourly tables equal a GROUP BY over the
//! table and the panels' reading functions, reading the days not folded hour by hour, equal
//! their reading of the hours; after it, every aggregate equals the GROUP BY, group for group
//! and count for count, and so do the readings of whole days from the daily rollups.

use crate::common::*;

/// The run's rows of one hour moved to writer `$1`'s own account by an upsert, as the
/// pipeline's moves them.
const MOVE_AN_HOUR: &str = "INSERT INTO audit_logs (event_id, timestamp, account_id, actor_email, \
                                                    action_type, action_result, api_version) \
     SELECT event_id, timestamp, 'writer-' || $1, actor_email, action_type, action_result, api_version \
     FROM audit_logs \
     WHERE date_trunc('hour', timestamp) = (SELECT date_trunc('hour', min(timestamp)) \
                                                   + make_interval(hours => $2 % 4) FROM audit_logs) \
     ORDER BY timestamp, event_id \
     ON CONFLICT (timestamp, event_id) DO UPDATE SET account_id = EXCLUDED.account_id";

/// Ten new rows of writer `$1`, round `$2`, in the same hours.
const ADD_ROWS: &str = "INSERT INTO audit_logs (event_id, timestamp, account_id, actor_email, \
                                                action_type, action_result) \
     SELECT format('new-%s-%s-%s', $1, $2, i), min_t + make_interval(mins => i * 7), \
            'writer-' || $1, 'racer@example.com', \
            (ARRAY['login', 'update'])[1 + i % 2], (ARRAY['success', 'failure'])[1 + i % 3 / 2] \
     FROM generate_series(1, 10) AS i, (SELECT min(timestamp) AS min_t FROM audit_logs) m \
     ORDER BY 2, 1";

/// One round of writer `w`. Writers moving the same rows can deadlock on `audit_logs` itself,
/// as any two upserts may: the pipeline retries such an error, and so does this writer.
async fn write_round(pool: &sqlx::PgPool, w: i32, round: i32) -> u32 {
    let mut deadlocks = 0;
    for sql in [MOVE_AN_HOUR, ADD_ROWS] {
        loop {
            match sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(w)
                .bind(round)
                .execute(pool)
                .await
            {
                Ok(_) => break,
                Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("40P01") => {
                    deadlocks += 1
                }
                Err(e) => panic!("writer {w}: {e}"),
            }
        }
    }
    deadlocks
}

/// Before the fold, the hourly aggregates equal a GROUP BY over `audit_logs` and the panels'
/// readings equal those of the hours, with `unfolded` days recorded (none: the run folded them
/// at its end; some: the write recorded its days); after it, every aggregate equals the GROUP
/// BY and the readings of whole days from the daily rollups equal those of the hours.
async fn assert_aggregates_exact(pool: &sqlx::PgPool, after: &str, unfolded: bool) {
    let days = count(pool, "SELECT count(*) FROM cfaudit_unfolded_days").await;
    assert_eq!(days > 0, unfolded, "days to fold after {after}: {days}");
    let before = aggregate_mismatches(pool).await;
    assert_eq!(
        (before.events_hourly, before.actors_hourly),
        (0, 0),
        "the hourly tables before the fold, after {after}"
    );
    assert_eq!(
        unfolded_rollup_mismatches(pool).await,
        [],
        "the readings before the fold, after {after}"
    );
    let folded = count(pool, "SELECT cfaudit_fold_days()::bigint").await;
    assert_eq!(folded > 0, unfolded, "days folded after {after}");
    assert_eq!(
        aggregate_mismatches(pool).await,
        AggregateMismatches::default(),
        "after {after} and the fold"
    );
    assert_eq!(
        rollup_mismatches(pool).await,
        [],
        "after {after} and the fold"
    );
}

async fn sum_of_events(pool: &sqlx::PgPool) -> i64 {
    count(
        pool,
        "SELECT coalesce(sum(events), 0)::bigint FROM audit_events_hourly",
    )
    .await
}

#[actix_rt::test]
async fn plain_aggregates_equal_a_group_by_after_every_kind_of_write() {
    let mut h = Harness::new(emulator_config(3_000)).await;
    h.set("CLOUDFLARE_API_VERSIONS", "v1,v2");
    run_once(h.config()).await.unwrap();
    let pool = h.db.pool().await;
    let kind: (String,) =
        sqlx::query_as("SELECT relkind::text FROM pg_class WHERE relname = 'audit_events_hourly'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(kind.0, "r", "a table on plain PostgreSQL, not a view");
    let rows = count(&pool, "SELECT count(*) FROM audit_logs").await;
    assert_eq!(sum_of_events(&pool).await, rows);
    assert_aggregates_exact(&pool, "the run", false).await;

    // Four writers at once, ten rounds each, on the same hours, and a fold after another
    // meanwhile, as cfaudit's refresher folds behind its writers.
    let writing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let folder = {
        let (pool, writing) = (pool.clone(), writing.clone());
        actix_rt::spawn(async move {
            let mut folds = 0;
            while writing.load(std::sync::atomic::Ordering::SeqCst) {
                sqlx::query("SELECT cfaudit_fold_days()")
                    .execute(&pool)
                    .await
                    .unwrap();
                folds += 1;
            }
            folds
        })
    };
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let pool = pool.clone();
            actix_rt::spawn(async move {
                let mut deadlocks = 0;
                for round in 0..10 {
                    deadlocks += write_round(&pool, w, round).await;
                }
                deadlocks
            })
        })
        .collect();
    let mut deadlocks = 0;
    for writer in writers {
        deadlocks += writer.await.unwrap();
    }
    writing.store(false, std::sync::atomic::Ordering::SeqCst);
    let folds = folder.await.unwrap();
    assert!(folds > 1, "folds among the writers: {folds}");
    let rows_now = count(&pool, "SELECT count(*) FROM audit_logs").await;
    assert_eq!(rows_now, rows + 4 * 10 * 10, "every new row once");
    assert!(
        count(
            &pool,
            "SELECT count(DISTINCT account_id) FROM audit_logs WHERE account_id LIKE 'writer-%'"
        )
        .await
            > 0
    );
    // The writers' last statements may all have been folded: one more row makes sure that
    // the readings are also checked with a day not folded.
    sqlx::query(
        "INSERT INTO audit_logs (event_id, timestamp, account_id, actor_email, action_type) \
         SELECT 'after-the-race', max(timestamp), 'writer-0', 'racer@example.com', 'update' \
         FROM audit_logs",
    )
    .execute(&pool)
    .await
    .unwrap();
    let after = format!("racing writers ({deadlocks} deadlocks retried, {folds} folds among them)");
    assert_aggregates_exact(&pool, &after, true).await;

    // One statement swaps two rows of the same hour, actor and address between accounts: a
    // failed one leaves a group as a succeeded one joins it, so only its failures change. In
    // the middle of the rows' days: the readings take the days before from the daily
    // aggregates and the rest hour by hour.
    sqlx::query(
        "INSERT INTO audit_logs (event_id, timestamp, account_id, actor_email, action_type, \
                                 action_result, ip_address) \
         SELECT id, t, acc, 'swapper@example.com', 'login', result, '10.9.9.9' \
         FROM (SELECT date_trunc('hour', min(timestamp) + (max(timestamp) - min(timestamp)) / 2) AS hour \
               FROM audit_logs) h, \
              (VALUES ('swap-a', 'acct-x', 'failure', 1), ('swap-b', 'acct-y', 'success', 2)) \
                AS v(id, acc, result, second), \
              LATERAL (SELECT h.hour + make_interval(secs => v.second) AS t) s",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        "UPDATE audit_logs SET account_id = CASE account_id WHEN 'acct-x' THEN 'acct-y' \
                                                            ELSE 'acct-x' END \
         WHERE event_id IN ('swap-a', 'swap-b')",
    )
    .execute(&pool)
    .await
    .unwrap();
    assert_aggregates_exact(&pool, "a swap that changes failures only", true).await;

    // An operator moves rows in time, to another hour and day (the key changes: the
    // statement's old and new rows share no key).
    sqlx::query(
        "UPDATE audit_logs SET timestamp = timestamp + INTERVAL '1 day 7 minutes' \
         WHERE (timestamp, event_id) IN (SELECT timestamp, event_id FROM audit_logs \
                                         ORDER BY timestamp, event_id LIMIT 25)",
    )
    .execute(&pool)
    .await
    .unwrap();
    assert_aggregates_exact(&pool, "rows moved in time", true).await;

    // An operator's retention by hand, and an update that moves nothing.
    sqlx::query("DELETE FROM audit_logs WHERE timestamp < (SELECT min(timestamp) + interval '3 hours' FROM audit_logs)")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("UPDATE audit_logs SET ingestion_time = now()")
        .execute(&pool)
        .await
        .unwrap();
    assert_aggregates_exact(&pool, "a delete", true).await;
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM audit_events_hourly WHERE events = 0"
        )
        .await,
        0,
        "no empty groups left behind"
    );

    // A replay into an emptied table counts every row again, once.
    sqlx::query("TRUNCATE audit_logs")
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(sum_of_events(&pool).await, 0, "after a truncate");
    for rollup in [
        "audit_actors_daily",
        "audit_actor_activity_daily",
        "audit_address_activity_daily",
        "audit_logins_daily",
    ] {
        let sql = format!("SELECT count(*) FROM {rollup}");
        assert_eq!(count(&pool, &sql).await, 0, "{rollup} after a truncate");
    }
    let replayed = cfaudit::cli::replay::replay(&h.config()).await.unwrap();
    assert_eq!(replayed.inserted as i64, rows);
    assert_eq!(sum_of_events(&pool).await, rows);
    assert_aggregates_exact(&pool, "a replay", false).await;
    println!(
        "aggregates: exact after a run of {rows} rows, 4 racing writers ({deadlocks} deadlocks \
         retried), a delete, a truncate and a replay"
    );
    pool.close().await;
    h.finish().await;
}
