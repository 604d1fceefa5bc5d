//! API behaviour against the emulator: the client-side request budget, the `Ratelimit`
//! header, and authentication failures in service mode.

mod common;

use std::time::{Duration, Instant};

use common::*;

/// 1,000 events in pages of 100: ten full pages and an empty one.
const PAGES: u64 = 11;

async fn timed_run(h: &Harness) -> Duration {
    let started = Instant::now();
    run_once(h.config()).await.unwrap();
    started.elapsed()
}

#[actix_web::test]
async fn the_request_budget_paces_requests() {
    let mut h = Harness::new(emulator_config(1_000)).await;
    h.set("CLOUDFLARE_PER_PAGE", "100");
    // Control: no effective budget, the run is fast.
    let unpaced = timed_run(&h).await;
    // 600 per 5 minutes = 2 per second, 2 back to back: 11 requests need ≥ 4.5 s.
    let mut paced = Harness::new(emulator_config(1_000)).await;
    paced.set("CLOUDFLARE_PER_PAGE", "100");
    paced.set("CLOUDFLARE_REQUESTS_PER_5_MINUTES", "600");
    paced.set("CLOUDFLARE_REQUEST_BURST", "2");
    let elapsed = timed_run(&paced).await;
    assert!(
        unpaced < Duration::from_secs(3),
        "control run took {unpaced:?}"
    );
    assert!(
        elapsed >= Duration::from_millis(4_400),
        "the budget did not pace: {elapsed:?}"
    );
    assert_eq!(paced.emu.emulator.requests(), PAGES);
    paced.assert_exact().await;
    h.finish().await;
    paced.finish().await;
}

#[actix_web::test]
async fn an_exhausted_ratelimit_header_waits_for_the_reset_instead_of_earning_a_lockout() {
    // 6 requests per 2-second window, then a 30-second lockout for the credential.
    let mut config = emulator_config(1_000);
    config.rate_limit = 6;
    config.rate_window_seconds = 2;
    config.lockout_seconds = 30;
    let mut h = Harness::new(config).await;
    h.set("CLOUDFLARE_PER_PAGE", "100");
    let elapsed = timed_run(&h).await;
    // No 429 (it would have cost a retry and 30 s): the client paused when `r=0`.
    assert_eq!(h.emu.emulator.requests(), PAGES, "a request hit the limit");
    assert!(
        elapsed >= Duration::from_secs(1) && elapsed < Duration::from_secs(20),
        "{elapsed:?}"
    );
    h.assert_exact().await;
    h.finish().await;
}

#[actix_web::test]
async fn an_auth_failure_stops_polling_without_a_crash_loop_and_shows_in_readiness() {
    let mut h = Harness::new(emulator_config(100)).await;
    let addr = format!("127.0.0.1:{}", free_port());
    h.set("METRICS_ADDR", &addr);
    h.set("POLL_INTERVAL_SECONDS", "1");
    h.set("CLOUDFLARE_API_TOKEN", "revoked-token-42");
    let child = cfaudit(&["run"], &h.env);
    let deadline = Instant::now() + Duration::from_secs(30);
    let body = loop {
        if let Ok(response) = reqwest::get(format!("http://{addr}/readyz")).await {
            if response.status() == 503 {
                let body: serde_json::Value = response.json().await.unwrap();
                if body["problems"].to_string().contains("authentication") {
                    break body;
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "/readyz never reported the auth failure"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(body["problems"].to_string().contains("9109"), "{body}");
    // Several poll intervals later: one request, not a loop.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        h.emu.emulator.requests(),
        1,
        "polling retried a refused credential"
    );
    let metrics = scrape(&addr).await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("cfaudit_auth_failed{") && l.ends_with(" 1")),
        "{metrics}"
    );
    signal(&child, "-TERM");
    let stopped = finish(child).await;
    assert_eq!(stopped.code, Some(0), "{}", stopped.stderr);
    let errors: Vec<_> = stopped
        .stderr
        .lines()
        .filter(|l| l.contains("refused the credential"))
        .collect();
    assert_eq!(errors.len(), 1, "one clear log line: {errors:?}");
    assert!(
        errors[0].contains("Account Settings: Read") && errors[0].contains("CLOUDFLARE_ACCOUNT_ID")
    );
    assert!(!stopped.stderr.contains("revoked-token-42") && !metrics.contains("revoked-token-42"));
    h.finish().await;
}

#[actix_web::test]
async fn late_events_inside_the_safety_lag_are_not_missed_in_live_mode() {
    // 20 events a second, each up to 5 s in the past when it appears; lag 30 s.
    let mut config = emulator_config(0);
    config.live_per_second = 20.0;
    config.live_late_seconds = 5;
    let mut h = Harness::new(config).await;
    h.emu.emulator.start_live();
    let addr = format!("127.0.0.1:{}", free_port());
    h.set("METRICS_ADDR", &addr);
    h.set("POLL_INTERVAL_SECONDS", "1");
    h.set("CLOUDFLARE_SINCE_SAFETY_LAG_SECONDS", "30");
    let start = chrono::Utc::now();
    h.set("INITIAL_CHECKPOINT", &start.to_rfc3339());
    let child = cfaudit(&["run"], &h.env);

    // Every event the emulator holds, from the stream's start on, once more than 100 (a few
    // seconds), late ones included, must land: the stream never reads before its start.
    let valid = || valid_ids(&h.emu.emulator);
    let since_start = || -> std::collections::BTreeSet<String> {
        let valid = valid();
        h.emu
            .emulator
            .events()
            .into_iter()
            .filter(|e| e.when >= start && valid.contains(&e.id))
            .map(|e| e.id)
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while since_start().len() <= 100 {
        assert!(
            Instant::now() < deadline,
            "the emulator made too few live events"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let snapshot = since_start();
    let pool = h.db.pool().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !snapshot.is_subset(&pg_ids(&pool).await) {
        assert!(Instant::now() < deadline, "late events were missed");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    signal(&child, "-TERM");
    assert_eq!(finish(child).await.code, Some(0));
    // And nothing twice, in either sink.
    let (rows, keys, ids) = pg_counts(&pool).await;
    assert_eq!((rows, keys), (ids, ids));
    let counts = h.parquet_counts(true);
    let parquet: std::collections::BTreeSet<String> =
        serde_json::from_value(counts["ids"].clone()).unwrap();
    assert_eq!(parquet, pg_ids(&pool).await, "{counts}");
    assert_eq!(counts["pyarrow_rows"], rows, "{counts}");
    pool.close().await;
    h.finish().await;
}
