//! `cfaudit backfill`: an explicit range, resumable, beside the live stream without overlap,
//! and `replay` of what it wrote gives the same rows. Counted in PostgreSQL and, by pyarrow
//! and DuckDB, in the Parquet dataset. Each test runs on plain PostgreSQL and on TimescaleDB.

use std::collections::BTreeSet;

use crate::common::*;
use chrono::{DateTime, Duration, DurationRound, Utc};

/// The valid events whose time lies in `[since, until)`.
fn ids_in(h: &Harness, since: DateTime<Utc>, until: DateTime<Utc>) -> BTreeSet<String> {
    let valid = valid_ids(&h.emu.emulator);
    h.emu
        .emulator
        .events()
        .into_iter()
        .filter(|e| e.when >= since && e.when < until && valid.contains(&e.id))
        .map(|e| e.id)
        .collect()
}

/// The emulator's oldest event, floored to the hour: range bounds fall between events.
fn first_hour(h: &Harness) -> DateTime<Utc> {
    let first = h
        .emu
        .emulator
        .events()
        .iter()
        .map(|e| e.when)
        .min()
        .unwrap();
    first.duration_trunc(Duration::hours(1)).unwrap()
}

fn json(stdout: &str) -> serde_json::Value {
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

on_both_clusters!(
    a_backfilled_range_is_exact_resumable_and_replays_to_the_same_rows,
    backfills_and_the_live_stream_cover_adjacent_ranges_exactly_once,
);

async fn backfill(h: &Harness, args: &[&str]) -> Finished {
    let mut all = vec!["backfill"];
    all.extend_from_slice(args);
    finish(cfaudit(&all, &h.env)).await
}

async fn a_backfilled_range_is_exact_resumable_and_replays_to_the_same_rows(cluster: Cluster) {
    let mut config = emulator_config(6_000);
    config.faults.fault_5xx_every = 11;
    config.faults.latency_ms = 40;
    let test = "a_backfilled_range_is_exact_resumable_and_replays_to_the_same_rows";
    let Some(mut h) = Harness::on_cluster(cluster, test, config).await else {
        return;
    };
    h.set("CLOUDFLARE_PER_PAGE", "100");
    h.set("BATCH_MAX_EVENTS", "100");
    let since = first_hour(&h) + Duration::days(5);
    let until = since + Duration::days(15);
    let expected = ids_in(&h, since, until);
    assert!(expected.len() > 2_000, "{}", expected.len());
    let (since_arg, until_arg) = (since.to_rfc3339(), until.to_rfc3339());
    let range = ["--since", since_arg.as_str(), "--until", until_arg.as_str()];

    // Killed half-way, then the same command again: it resumes, nothing lost or doubled.
    let mut all = vec!["backfill"];
    all.extend_from_slice(&range);
    let child = cfaudit(&all, &h.env);
    let pool = h.db.pool().await;
    wait_for_rows(&pool, 800).await;
    assert_runs_on(&pool, cluster).await;
    signal(&child, "-KILL");
    let _ = finish(child).await;
    assert!(rows(&pool).await < expected.len() as i64, "killed too late");

    let done = backfill(&h, &range).await;
    assert!(done.success, "{}", done.stderr);
    assert_faults_hit(&h.emu.emulator);
    let summary = json(&done.stdout);
    assert_eq!(summary["already_complete"], false);
    assert_eq!(summary["rows_in_postgres"], expected.len());
    assert_eq!(summary["parquet_rows"], expected.len());
    assert!(
        done.stderr.contains("backfill progress") || done.stderr.contains("backfill started"),
        "plain log lines when not on a terminal: {}",
        done.stderr
    );
    assert_exact(&pool, &h.lake, &h.reader_env, &expected).await;

    // Once complete, the same command fetches nothing.
    let requests = h.emu.emulator.requests();
    let again = backfill(&h, &range).await;
    assert!(again.success, "{}", again.stderr);
    assert_eq!(json(&again.stdout)["already_complete"], true);
    assert_eq!(h.emu.emulator.requests(), requests, "no request");

    // Replay into an empty table gives the same rows, column for column.
    let fingerprint = || table_fingerprint(&pool);
    let before = fingerprint().await;
    sqlx::raw_sql("TRUNCATE audit_logs")
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(fingerprint().await.1, 0);
    let replayed = finish(cfaudit(&["replay"], &h.env)).await;
    assert!(replayed.success, "{}", replayed.stderr);
    assert_eq!(json(&replayed.stdout)["inserted"], expected.len());
    assert_eq!(
        fingerprint().await,
        before,
        "replay differs from the backfill"
    );

    // A service started a day after the backfill's end names the gap and how to fill it.
    let mut env = h.env.clone();
    set(
        &mut env,
        "INITIAL_CHECKPOINT",
        &(until + Duration::days(1)).to_rfc3339(),
    );
    let live = finish(cfaudit(&["run", "--once"], &env)).await;
    assert!(live.success, "{}", live.stderr);
    assert!(
        live.stderr.contains("in no stream") && live.stderr.contains(&until_arg[..19]),
        "{}",
        live.stderr
    );
    pool.close().await;
    h.finish().await;
}

/// Backfills before and after the live stream starts, with a one-day safety lag that reaches
/// across every boundary: each event once in both sinks. Overlapping and future ranges are
/// refused with the flag and the fix named.
async fn backfills_and_the_live_stream_cover_adjacent_ranges_exactly_once(cluster: Cluster) {
    let test = "backfills_and_the_live_stream_cover_adjacent_ranges_exactly_once";
    let Some(mut h) = Harness::on_cluster(cluster, test, emulator_config(5_000)).await else {
        return;
    };
    h.set("CLOUDFLARE_SINCE_SAFETY_LAG_SECONDS", "86400");
    let first = first_hour(&h);
    let (a, m) = (first + Duration::days(6), first + Duration::days(18));
    let (a_arg, m_arg) = (a.to_rfc3339(), m.to_rfc3339());

    // A backfill before the service ever ran…
    let middle = backfill(&h, &["--since", &a_arg, "--until", &m_arg]).await;
    assert!(middle.success, "{}", middle.stderr);
    // …makes the service start where it ends, whatever INITIAL_CHECKPOINT says.
    h.set("INITIAL_CHECKPOINT", &(a - Duration::days(3)).to_rfc3339());
    let live = finish(cfaudit(&["run", "--once"], &h.env)).await;
    assert!(live.success, "{}", live.stderr);
    assert!(
        live.stderr
            .contains("starts where the latest backfill ends"),
        "{}",
        live.stderr
    );
    let pool = h.db.pool().await;
    assert_runs_on(&pool, cluster).await;
    assert_exact(&pool, &h.lake, &h.reader_env, &ids_in(&h, a, Utc::now())).await;

    // Overlapping the live stream or the first backfill: refused, nothing written.
    let files_before = h.parquet_counts(false)["pyarrow_rows"].clone();
    for (since, until) in [
        (m - Duration::days(1), m + Duration::days(1)),
        (first, a + Duration::hours(1)),
    ] {
        let refused = backfill(
            &h,
            &[
                "--since",
                &since.to_rfc3339(),
                "--until",
                &until.to_rfc3339(),
            ],
        )
        .await;
        assert_eq!(refused.code, Some(2), "{}", refused.stderr);
        assert!(
            refused.stderr.contains("--since/--until") && refused.stderr.contains("Fix: use --"),
            "{}",
            refused.stderr
        );
    }
    let future = backfill(&h, &["--since", &a_arg, "--until", "2999-01-01"]).await;
    assert_eq!(future.code, Some(2), "{}", future.stderr);
    assert!(
        future.stderr.contains("--until") && future.stderr.contains("future"),
        "{}",
        future.stderr
    );
    let bad = backfill(&h, &["--since", "last week"]).await;
    assert_eq!(bad.code, Some(2), "{}", bad.stderr);
    assert!(bad.stderr.contains("--since"), "{}", bad.stderr);
    assert_eq!(h.parquet_counts(false)["pyarrow_rows"], files_before);

    // The gap before the first backfill (left out, --until would default to the live
    // stream's start and overlap the first backfill): then everything is there once.
    let before = backfill(&h, &["--since", "2000-01-01", "--until", &a_arg]).await;
    assert!(before.success, "{}", before.stderr);
    assert_exact(&pool, &h.lake, &h.reader_env, &valid_ids(&h.emu.emulator)).await;

    // A later sweep of the live stream adds nothing; status shows both backfills complete.
    let live = finish(cfaudit(&["run", "--once"], &h.env)).await;
    assert!(live.success, "{}", live.stderr);
    assert_exact(&pool, &h.lake, &h.reader_env, &valid_ids(&h.emu.emulator)).await;
    let status = finish(cfaudit(&["status"], &h.env)).await;
    assert!(status.success, "{}", status.stderr);
    assert_eq!(
        status.stdout.matches("complete").count(),
        2,
        "{}",
        status.stdout
    );
    assert!(
        status.stdout.contains(&format!("collecting since {m_arg}")),
        "{}",
        status.stdout
    );
    let status: serde_json::Value =
        json(&finish(cfaudit(&["status", "--json"], &h.env)).await.stdout);
    let account = &status["accounts"][0];
    assert_eq!(status["accounts"].as_array().unwrap().len(), 1, "{status}");
    assert_eq!(
        account["postgres_rows"], account["parquet_rows"],
        "{status}"
    );
    pool.close().await;
    h.finish().await;
}

/// The valid v2 events whose time lies in `[since, until)`.
fn v2_ids_in(h: &Harness, since: DateTime<Utc>, until: DateTime<Utc>) -> BTreeSet<String> {
    let valid = valid_ids_v2(&h.emu.emulator);
    h.emu
        .emulator
        .events_v2()
        .into_iter()
        .filter(|e| e.when >= since && e.when < until && valid.contains(&e.id))
        .map(|e| e.id)
        .collect()
}

/// `cfaudit backfill --api-version v2`: a range of v2's own log, exact in both sinks and
/// complete on a second call. With both versions configured a backfill must name its version;
/// a v1 backfill of the same range is another log's stream and is allowed.
#[actix_web::test]
async fn a_v2_backfill_is_a_stream_of_its_own() {
    let mut config = emulator_config(2_000);
    config.v2_events = Some(3_000);
    config.faults.fault_5xx_every = 7;
    let mut h = Harness::new(config).await;
    h.set("CLOUDFLARE_API_VERSIONS", "v1,v2");
    h.set("CLOUDFLARE_V2_LIMIT", "100");
    let first = h
        .emu
        .emulator
        .events_v2()
        .iter()
        .map(|e| e.when)
        .min()
        .unwrap();
    let since = first.duration_trunc(Duration::hours(1)).unwrap() + Duration::days(2);
    let until = since + Duration::days(10);
    let expected_v2 = v2_ids_in(&h, since, until);
    assert!(expected_v2.len() > 500, "{}", expected_v2.len());
    let (since_arg, until_arg) = (since.to_rfc3339(), until.to_rfc3339());
    let range = ["--since", since_arg.as_str(), "--until", until_arg.as_str()];
    let with_version = |version: &'static str| {
        let mut args = vec!["--api-version", version];
        args.extend_from_slice(&range);
        args
    };

    let unclear = backfill(&h, &range).await;
    assert!(!unclear.success, "{}", unclear.stdout);
    assert!(
        unclear
            .stderr
            .contains("--api-version v1 or --api-version v2"),
        "{}",
        unclear.stderr
    );
    assert_eq!(h.emu.emulator.requests(), 0, "refused before any request");

    let done = backfill(&h, &with_version("v2")).await;
    assert!(done.success, "{}", done.stderr);
    assert_faults_hit(&h.emu.emulator);
    let summary = json(&done.stdout);
    assert_eq!(summary["rows_in_postgres"], expected_v2.len());
    assert_eq!(summary["parquet_rows"], expected_v2.len());
    let requests = h.emu.emulator.request_log();
    assert!(requests.iter().all(|r| r.path.ends_with("/logs/audit")));
    let pool = h.db.pool().await;
    assert_exact(&pool, &h.lake, &h.reader_env, &expected_v2).await;
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM cfaudit_checkpoints WHERE account_id LIKE '%.v2.backfill.%'"
        )
        .await,
        1,
        "the v2 backfill's stream"
    );

    let again = backfill(&h, &with_version("v2")).await;
    assert!(again.success, "{}", again.stderr);
    assert_eq!(json(&again.stdout)["already_complete"], true);

    // The same range of v1: another log, another stream; both land, each once.
    let v1 = backfill(&h, &with_version("v1")).await;
    assert!(v1.success, "{}", v1.stderr);
    let mut both = expected_v2.clone();
    both.extend(ids_in(&h, since, until));
    assert!(both.len() > expected_v2.len() + 300);
    assert_exact(&pool, &h.lake, &h.reader_env, &both).await;
    pool.close().await;
    h.finish().await;
}
