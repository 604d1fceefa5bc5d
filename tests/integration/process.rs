//! The real binary, as an operator runs it: stopped half-way by SIGTERM or SIGKILL and
//! restarted, and its HTTP endpoints. The emulator runs in the test process.

use std::time::{Duration, Instant};

use crate::common::*;
use cfaudit_emulator::DEMO_TOKEN;

/// A slow emulator (latency per page), so a run can be caught half-way.
async fn slow_harness(events: usize) -> Harness {
    let mut config = emulator_config(events);
    config.faults.latency_ms = 25;
    let mut h = Harness::new(config).await;
    h.set("CLOUDFLARE_PER_PAGE", "200");
    h
}

#[actix_web::test]
async fn sigterm_half_way_commits_what_is_in_flight_and_a_restart_ends_exact() {
    let h = slow_harness(20_000).await;
    let env = &h.env;
    let expected = valid_ids(&h.emu.emulator);
    cfaudit(&["migrate"], env).wait().await.unwrap();
    let pool = h.db.pool().await;

    let child = cfaudit(&["run", "--once"], env);
    wait_for_rows(&pool, 3_000).await;
    signal(&child, "-TERM");
    let stopped = finish(child).await;
    assert!(stopped.success, "SIGTERM exits 0: {}", stopped.stderr);
    let summary: serde_json::Value = serde_json::from_str(stopped.stdout.trim()).unwrap();
    assert_eq!(summary["interrupted"], true);
    let partial = rows(&pool).await;
    assert!(
        partial < expected.len() as i64,
        "stopped half-way ({partial} rows)"
    );
    // Everything in flight was committed: both sinks hold the same rows.
    let counts = h.parquet_counts(false);
    assert_eq!(counts["duckdb_rows"], partial, "{counts}");
    assert_eq!(counts["duckdb_distinct_ids"], partial, "{counts}");
    assert_eq!(summary["rows_in_postgres"], partial);

    let resumed = finish(cfaudit(&["run", "--once"], env)).await;
    assert!(resumed.success, "{}", resumed.stderr);
    assert_exact(&pool, &h.lake, &h.reader_env, &expected).await;
    pool.close().await;
    h.finish().await;
}

#[actix_web::test]
async fn sigkill_at_any_moment_then_restart_ends_exact_with_no_orphans() {
    let h = slow_harness(24_000).await;
    let env = &h.env;
    let expected = valid_ids(&h.emu.emulator);
    cfaudit(&["migrate"], env).wait().await.unwrap();
    let pool = h.db.pool().await;

    for at_least in [2_500, 9_000, 16_000] {
        let mut child = cfaudit(&["run", "--once"], env);
        wait_for_rows(&pool, at_least).await;
        child.start_kill().unwrap(); // SIGKILL: no chance to clean up
        child.wait().await.unwrap();
    }
    let finished = finish(cfaudit(&["run", "--once"], env)).await;
    assert!(finished.success, "{}", finished.stderr);
    assert_exact(&pool, &h.lake, &h.reader_env, &expected).await;
    assert_eq!(unpublished_files(&pool).await, 0);
    pool.close().await;
    h.finish().await;
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[actix_web::test]
async fn the_service_serves_metrics_and_readiness_and_never_shows_the_token() {
    let mut h = Harness::new(emulator_config(3_000)).await;
    let expected = valid_ids(&h.emu.emulator);
    let addr = format!("127.0.0.1:{}", free_port());
    h.set("METRICS_ADDR", &addr);
    h.set("POLL_INTERVAL_SECONDS", "1");
    let child = cfaudit(&["run"], &h.env);
    let http = reqwest::Client::new();

    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        // Ready during the start-up grace too; wait for the first committed sweep.
        let ready = http.get(format!("http://{addr}/readyz")).send().await;
        if let Ok(response) = ready {
            let ok = response.status() == 200;
            let body: serde_json::Value = response.json().await.unwrap();
            if ok && !body["last_successful_sweep"].is_null() {
                break;
            }
        }
        assert!(Instant::now() < deadline, "no committed sweep after 60 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let health = http
        .get(format!("http://{addr}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let metrics = scrape(&addr).await;
    let value = |series: &str| metric(&metrics, series);
    let n = expected.len() as f64;
    assert_eq!(value("cfaudit_events_written_total{sink=\"postgres\"}"), n);
    assert_eq!(value("cfaudit_events_written_total{sink=\"parquet\"}"), n);
    for actor in [
        "poller",
        "mapper",
        "pg_writer",
        "parquet_writer",
        "checkpointer",
    ] {
        assert!(
            value(&format!(
                "cfaudit_actor_messages_handled_total{{actor=\"{actor}\"}}"
            )) > 0.0,
            "{actor}"
        );
        let depth = value(&format!("cfaudit_actor_mailbox_depth{{actor=\"{actor}\"}}"));
        assert!((0.0..=20.0).contains(&depth), "{actor} depth {depth}");
        assert!(metrics.contains(&format!(
            "cfaudit_actor_handler_duration_seconds_count{{actor=\"{actor}\"}}"
        )));
    }
    assert!(
        value("cfaudit_batches_committed_total") >= 1.0,
        "3 pages coalesce into one batch"
    );
    assert!(value("cfaudit_checkpoint_lag_seconds") > 0.0);
    assert!(value("cfaudit_last_successful_sweep_timestamp_seconds") > 1.7e9);
    assert!(value("cfaudit_api_requests_total{status_class=\"2xx\"}") >= 3.0);
    assert!(!metrics.contains(DEMO_TOKEN), "the token is in the metrics");

    // The container health check: 0 against the running service, 1 once it is gone.
    let probe = finish(cfaudit(&["healthcheck"], &h.env)).await;
    assert_eq!(probe.code, Some(0), "{}", probe.stderr);
    signal(&child, "-TERM");
    let stopped = finish(child).await;
    assert_eq!(stopped.code, Some(0), "{}", stopped.stderr);
    let probe = finish(cfaudit(&["healthcheck"], &h.env)).await;
    assert_eq!(probe.code, Some(1), "{}", probe.stderr);
    assert!(
        stopped.stderr.contains("sweep committed"),
        "logs are JSON lines on stderr"
    );
    assert!(
        !stopped.stderr.contains(DEMO_TOKEN) && !stopped.stdout.contains(DEMO_TOKEN),
        "the token is in the logs"
    );
    h.finish().await;
}

#[actix_web::test]
async fn a_config_error_names_the_key_and_exits_2() {
    let finished = finish(cfaudit(
        &["run", "--once"],
        &[("CLOUDFLARE_PER_PAGE".into(), "5000".into())],
    ))
    .await;
    assert_eq!(finished.code, Some(2));
    assert!(
        finished.stderr.contains("CLOUDFLARE_PER_PAGE") && finished.stderr.contains("Fix:"),
        "{}",
        finished.stderr
    );
    let finished = finish(cfaudit(&["run", "--once"], &[])).await;
    assert_eq!(finished.code, Some(2), "{}", finished.stderr);
    assert!(
        finished.stderr.contains("CLOUDFLARE_ACCOUNT_ID"),
        "{}",
        finished.stderr
    );
}

/// Files are published by renaming them from the staging folder: a dataset folder that is a
/// mount point of its own (here /dev/shm, a tmpfs, whose staging folder falls in /dev) is
/// refused at start, naming the setting and the fix, before anything is written.
#[actix_web::test]
async fn a_dataset_on_another_filesystem_than_its_staging_is_refused_at_start() {
    use std::os::unix::fs::MetadataExt;
    let (dataset, staging) = ("/dev/shm", "/dev/shm.staging");
    let device = |path: &str| std::fs::metadata(path).unwrap().dev();
    assert_ne!(
        device("/dev"),
        device(dataset),
        "this test needs /dev/shm mounted on its own"
    );
    let existed = std::path::Path::new(staging).exists();
    let h = Harness::new(emulator_config(10)).await;
    let mut env = h.env.clone();
    set(&mut env, "PARQUET_URL", &format!("file://{dataset}"));
    let refused = finish(cfaudit(&["run", "--once"], &env)).await;
    if !existed {
        let _ = std::fs::remove_dir(staging);
    }
    assert_eq!(refused.code, Some(2), "{}", refused.stderr);
    for needle in ["PARQUET_URL", "different filesystems", "Fix:"] {
        assert!(
            refused.stderr.contains(needle),
            "{needle}: {}",
            refused.stderr
        );
    }
    let pool = h.db.pool().await;
    assert_eq!(
        rows(&pool).await,
        0,
        "nothing is written before the refusal"
    );
    pool.close().await;
    h.finish().await;
}

#[actix_web::test]
async fn check_reports_each_dependency_and_names_what_fails() {
    let mut h = Harness::with_s3(emulator_config(10)).await;
    assert!(finish(cfaudit(&["migrate"], &h.env)).await.success);
    let ok = finish(cfaudit(&["check"], &h.env)).await;
    assert_eq!(ok.code, Some(0), "{}\n{}", ok.stdout, ok.stderr);
    for name in [
        "configuration",
        "database",
        "object store",
        "Cloudflare API",
    ] {
        assert!(
            ok.stdout.contains(&format!("PASS  {name}:")),
            "{}",
            ok.stdout
        );
    }

    // A database nobody listens on, a revoked token, the S3 server down.
    let mut bad = h.env.clone();
    let db = format!(
        "postgres://postgres:pw-secret-1@127.0.0.1:{}/x",
        free_port()
    );
    set(&mut bad, "DATABASE_URL", &db);
    set(&mut bad, "CLOUDFLARE_API_TOKEN", "revoked-token-77");
    h.s3.as_mut().unwrap().stop();
    let failed = finish(cfaudit(&["check"], &bad)).await;
    assert_eq!(failed.code, Some(1), "{}\n{}", failed.stdout, failed.stderr);
    let out = &failed.stdout;
    assert!(out.contains("PASS  configuration:"), "{out}");
    assert!(
        out.contains("FAIL  database:") && out.contains("DATABASE_URL"),
        "{out}"
    );
    assert!(
        out.contains("FAIL  object store:") && out.contains("Fix:"),
        "{out}"
    );
    assert!(
        out.contains("FAIL  Cloudflare API:") && out.contains("9109"),
        "{out}"
    );
    for secret in ["pw-secret-1", "revoked-token-77", S3_SECRET_KEY] {
        assert!(
            !out.contains(secret) && !failed.stderr.contains(secret),
            "{secret} was printed"
        );
    }
    h.s3.as_mut().unwrap().restart();
    h.finish().await;
}

on_both_clusters!(
    status_reports_what_is_committed_and_fails_clearly_without_a_database,
    replay_rebuilds_the_table_from_parquet_exactly_once,
);

async fn status_reports_what_is_committed_and_fails_clearly_without_a_database(cluster: Cluster) {
    let test = "status_reports_what_is_committed_and_fails_clearly_without_a_database";
    let mut config = emulator_config(3_000);
    config.invalid_every = 1000;
    let Some(h) = Harness::on_cluster(cluster, test, config).await else {
        return;
    };
    let h = h.into_s3();
    let ran = finish(cfaudit(&["run", "--once"], &h.env)).await;
    assert!(ran.success, "{}", ran.stderr);
    let pool = h.db.pool().await;
    assert_runs_on(&pool, cluster).await;
    pool.close().await;
    let status = finish(cfaudit(&["status", "--json"], &h.env)).await;
    assert!(status.success, "{}", status.stderr);
    let status: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    let account = &status["accounts"][0];
    let counts = h.parquet_counts(false);
    assert_eq!(account["postgres_rows"], 2_997);
    assert_eq!(account["parquet_rows"], 2_997);
    assert_eq!(account["parquet_files"], counts["files"]);
    assert_eq!(account["dead_letters"], 3);
    assert_eq!(account["unpublished_files"], 0);
    assert_eq!(status["staged_files"], 0);
    assert!(account["lag_seconds"].as_i64().unwrap() > 0);
    let last_sweep: chrono::DateTime<chrono::Utc> =
        serde_json::from_value(account["last_sweep"].clone()).expect("a recorded sweep");
    assert!(
        (chrono::Utc::now() - last_sweep).num_seconds() < 120,
        "{status}"
    );
    assert_eq!(
        account["collecting_since"], "2000-01-01T00:00:00Z",
        "{status}"
    );
    let text = finish(cfaudit(&["status"], &h.env)).await;
    let database = match cluster {
        Cluster::Postgres => "database        plain PostgreSQL (no TimescaleDB)",
        Cluster::Timescaledb => "database        TimescaleDB 2.",
    };
    assert!(text.stdout.contains(database), "{}", text.stdout);
    assert!(
        text.stdout.contains("2997 rows in")
            && text.stdout.contains("checkpoint")
            && text.stdout.contains("last sweep      20"),
        "{}",
        text.stdout
    );

    let mut down = h.env.clone();
    set(
        &mut down,
        "DATABASE_URL",
        &format!("postgres://postgres@127.0.0.1:{}/x", free_port()),
    );
    let failed = finish(cfaudit(&["status"], &down)).await;
    assert_eq!(failed.code, Some(1));
    assert!(failed.stderr.contains("DATABASE_URL"), "{}", failed.stderr);
    h.finish().await;
}

async fn replay_rebuilds_the_table_from_parquet_exactly_once(cluster: Cluster) {
    let test = "replay_rebuilds_the_table_from_parquet_exactly_once";
    let mut config = emulator_config(4_000);
    config.invalid_every = 1000;
    let Some(h) = Harness::on_cluster(cluster, test, config).await else {
        return;
    };
    assert!(finish(cfaudit(&["run", "--once"], &h.env)).await.success);
    let pool = h.db.pool().await;
    assert_runs_on(&pool, cluster).await;
    // A fingerprint of every column of every row.
    let fingerprint = || table_fingerprint(&pool);
    let before = fingerprint().await;
    assert_eq!(before.1, 3_996);
    sqlx::raw_sql("TRUNCATE audit_logs")
        .execute(&pool)
        .await
        .unwrap();

    let replayed = finish(cfaudit(&["replay"], &h.env)).await;
    assert!(replayed.success, "{}", replayed.stderr);
    let summary: serde_json::Value = serde_json::from_str(replayed.stdout.trim()).unwrap();
    assert_eq!(
        (summary["rows_read"].as_i64(), summary["inserted"].as_i64()),
        (Some(3_996), Some(3_996))
    );
    assert_eq!(
        fingerprint().await,
        before,
        "the rebuilt table differs from the original"
    );

    let again = finish(cfaudit(&["replay"], &h.env)).await;
    let summary: serde_json::Value = serde_json::from_str(again.stdout.trim()).unwrap();
    assert_eq!(
        (
            summary["inserted"].as_i64(),
            summary["already_present"].as_i64()
        ),
        (Some(0), Some(3_996))
    );
    assert_eq!(fingerprint().await, before);
    pool.close().await;
    h.finish().await;
}
