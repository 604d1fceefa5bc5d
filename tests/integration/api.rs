//! API behaviour against the emulator: the client-side request budget, the `Ratelimit`
//! header, and authentication failures in service mode.

use std::time::{Duration, Instant};

use crate::common::*;
use cfaudit_emulator::{EmulatorConfig, RequestRecord, DEMO_ACCOUNT, DEMO_TOKEN};

/// 1,000 events in pages of 100: ten full pages and an empty one, the first asked twice (nothing
/// read yet fixes where a stream's first window starts, so two answers must agree).
const PAGES: u64 = 12;

/// 1,000 events, pages of 100.
async fn harness(config: EmulatorConfig) -> Harness {
    let mut h = Harness::new(config).await;
    h.set("CLOUDFLARE_PER_PAGE", "100");
    h
}

/// Time from the first request to each request, as the emulator saw them arrive.
fn arrivals(log: &[RequestRecord]) -> Vec<Duration> {
    log.iter()
        .map(|r| r.arrived.duration_since(log[0].arrived))
        .collect()
}

#[actix_web::test]
async fn the_request_budget_paces_requests() {
    // 600 per 5 minutes = one every 0.5 s, 2 back to back: request k (from 0) is not sent
    // before (k - 1) × 0.5 s. Lower bounds only: a slow machine cannot fail them.
    let mut h = harness(emulator_config(1_000)).await;
    h.set("CLOUDFLARE_REQUESTS_PER_5_MINUTES", "600");
    h.set("CLOUDFLARE_REQUEST_BURST", "2");
    run_once(h.config()).await.unwrap();
    let log = h.emu.emulator.request_log();
    assert_eq!(log.len() as u64, PAGES);
    for (k, at) in arrivals(&log).into_iter().enumerate().skip(2) {
        // The emulator notes arrival a little after the client's limiter let it go.
        let earliest = Duration::from_millis(500 * (k as u64 - 1)).saturating_sub(TIMER_SLACK);
        assert!(at >= earliest, "request {k} came {at:?} after the first");
    }
    h.assert_exact().await;
    h.finish().await;
}

/// How much earlier than its timer a request may reach the emulator (the client's clock read
/// before the limiter's is not the emulator's).
const TIMER_SLACK: Duration = Duration::from_millis(20);

#[actix_web::test]
async fn an_exhausted_ratelimit_header_waits_for_the_reset_instead_of_earning_a_lockout() {
    // 6 requests per 2-second window, then a 30-second lockout for the credential.
    let mut config = emulator_config(1_000);
    config.rate_limit = 6;
    config.rate_window_seconds = 2;
    config.lockout_seconds = 30;
    let h = harness(config).await;
    run_once(h.config()).await.unwrap();
    let log = h.emu.emulator.request_log();
    // No 429 (it would have cost a retry and 30 s): the client paused when `r=0`.
    assert_eq!(log.len() as u64, PAGES, "a request hit the limit");
    assert!(log.iter().all(|r| r.status == 200), "{log:?}");
    let at = arrivals(&log);
    assert!(
        at[6] - at[5] >= Duration::from_secs(1),
        "the client did not wait after `r=0`: {at:?}"
    );
    h.assert_exact().await;
    h.finish().await;
}

#[actix_web::test]
async fn a_429_is_never_retried_before_its_retry_after_and_a_long_one_is_capped() {
    for (asked, cap, waited) in [(2, None, 2), (600, Some("1"), 1)] {
        let mut config = emulator_config(1_000);
        config.faults.fault_429_every = 4;
        config.faults.retry_after_seconds = asked;
        let mut h = harness(config).await;
        if let Some(cap) = cap {
            h.set("CLOUDFLARE_MAX_RETRY_AFTER_SECONDS", cap);
        }
        run_once(h.config()).await.unwrap();
        let log = h.emu.emulator.request_log();
        let at = arrivals(&log);
        let refused: Vec<usize> = (0..log.len()).filter(|&i| log[i].status == 429).collect();
        assert!(refused.len() >= 2, "the fault was hit: {log:?}");
        for i in refused {
            assert_eq!(log[i].retry_after, Some(asked));
            let gap = at[i + 1] - at[i];
            // Measured from the 429's arrival: the client's wait starts later still.
            assert!(
                gap >= Duration::from_secs(waited),
                "retried {gap:?} after a 429 asking for {asked} s (cap {cap:?})"
            );
            if cap.is_some() {
                assert!(
                    gap < Duration::from_secs(asked),
                    "the wait was not capped: {gap:?}"
                );
            }
        }
        h.assert_exact().await;
        h.finish().await;
    }
}

#[actix_web::test]
async fn the_request_settings_change_what_is_sent() {
    // Defaults: oldest first, user logs included, bearer token.
    let h = harness(emulator_config(300)).await;
    run_once(h.config()).await.unwrap();
    let log = h.emu.emulator.request_log();
    assert!(!log.is_empty());
    for r in &log {
        assert_eq!(
            r.path,
            format!("/client/v4/accounts/{DEMO_ACCOUNT}/audit_logs")
        );
        assert_eq!(
            (
                r.param("direction"),
                r.param("per_page"),
                r.param("hide_user_logs")
            ),
            (Some("asc"), Some("100"), None),
            "{r:?}"
        );
        assert_eq!(
            r.auth_headers,
            vec![("authorization".to_owned(), format!("Bearer {DEMO_TOKEN}"))]
        );
    }
    h.assert_exact().await;
    let default_commits = commits(&h).await;
    h.finish().await;

    // Newest first, user logs hidden, the legacy key, one page per batch.
    let email = "secops@example.com";
    let key = "0123456789abcdef0123456789abcdef01234";
    let mut config = emulator_config(300);
    config.key_credential = Some((email.to_owned(), key.to_owned()));
    let mut h = harness(config).await;
    h.env.retain(|(k, _)| k != "CLOUDFLARE_API_TOKEN");
    h.set("CLOUDFLARE_API_EMAIL", email);
    h.set("CLOUDFLARE_API_KEY", key);
    h.set("CLOUDFLARE_DIRECTION", "desc");
    h.set("CLOUDFLARE_HIDE_USER_LOGS", "true");
    h.set("BATCH_MAX_BYTES", "1");
    run_once(h.config()).await.unwrap();
    let log = h.emu.emulator.request_log();
    assert!(!log.is_empty());
    for r in &log {
        assert_eq!(
            (r.param("direction"), r.param("hide_user_logs")),
            (Some("desc"), Some("true")),
            "{r:?}"
        );
        assert_eq!(
            r.auth_headers,
            vec![
                ("x-auth-email".to_owned(), email.to_owned()),
                ("x-auth-key".to_owned(), key.to_owned())
            ]
        );
    }
    // Exactly the account-level events: the user-level ones (the emulator's rule:
    // `resource.type` is "user") stay hidden.
    let user_level: std::collections::BTreeSet<String> = h
        .emu
        .emulator
        .events()
        .into_iter()
        .filter(|e| {
            serde_json::from_slice::<serde_json::Value>(&e.json)
                .is_ok_and(|event| event["resource"]["type"] == "user")
        })
        .map(|e| e.id)
        .collect();
    assert!(!user_level.is_empty());
    let expected = &valid_ids(&h.emu.emulator) - &user_level;
    let pool = h.db.pool().await;
    assert_exact(&pool, &h.lake, &h.reader_env, &expected).await;
    pool.close().await;
    // Three pages of events, each its own batch and commit; by default they share one.
    let small_batch_commits = commits(&h).await;
    assert!(
        small_batch_commits >= default_commits + 2,
        "BATCH_MAX_BYTES=1: {small_batch_commits} commits, default: {default_commits}"
    );
    h.finish().await;
}

/// The live stream's commit count.
async fn commits(h: &Harness) -> i64 {
    let pool = h.db.pool().await;
    let (seq,): (i64,) =
        sqlx::query_as("SELECT commit_seq FROM cfaudit_checkpoints WHERE account_id = $1")
            .bind(DEMO_ACCOUNT)
            .fetch_one(&pool)
            .await
            .unwrap();
    pool.close().await;
    seq
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

/// v1 and v2 collected side by side share one budget: Cloudflare counts both versions'
/// requests against the same token, so the pace holds over the two streams' requests together.
#[actix_web::test]
async fn one_request_budget_paces_both_api_versions_together() {
    let mut config = emulator_config(1_000);
    config.v2_events = Some(1_000);
    let mut h = harness(config).await;
    h.set("CLOUDFLARE_API_VERSIONS", "v1,v2");
    h.set("CLOUDFLARE_V2_LIMIT", "100");
    h.set("CLOUDFLARE_REQUESTS_PER_5_MINUTES", "600");
    h.set("CLOUDFLARE_REQUEST_BURST", "2");
    run_once(h.config()).await.unwrap();
    let log = h.emu.emulator.request_log();
    let v2 = log
        .iter()
        .filter(|r| r.path.ends_with("/logs/audit"))
        .count();
    assert!(v2 >= 10 && log.len() - v2 >= 10, "{v2} of {}", log.len());
    for (k, at) in arrivals(&log).into_iter().enumerate().skip(2) {
        let earliest = Duration::from_millis(500 * (k as u64 - 1)).saturating_sub(TIMER_SLACK);
        assert!(at >= earliest, "request {k} came {at:?} after the first");
    }
    let mut both = valid_ids(&h.emu.emulator);
    both.extend(valid_ids_v2(&h.emu.emulator));
    h.assert_exact_ids(&both).await;
    h.finish().await;
}
