//! Replicas: several service processes on one database and dataset divide the streams among
//! themselves through PostgreSQL. One is SIGKILLed (its streams are taken over within two poll
//! intervals) and started again, another joins mid-run (the streams are rebalanced), and every
//! account ends exactly once in both sinks, no stream ever committed by two processes.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use crate::common::*;

const POLL_SECONDS: u64 = 5;

/// Each live stream's holder (`None`: free), read from the database: the lock held by a live
/// session, and the lease's last holder.
async fn holders(pool: &sqlx::PgPool) -> BTreeMap<String, Option<String>> {
    let rows: Vec<(String, Option<String>, bool)> = sqlx::query_as(
        "SELECT account_id, lease_holder, cfaudit_lock_held('cfaudit.stream.' || account_id) \
         FROM cfaudit_checkpoints",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    rows.into_iter()
        .map(|(stream, holder, held)| (stream, holder.filter(|_| held)))
        .collect()
}

/// How many streams each replica holds.
fn shares(holders: &BTreeMap<String, Option<String>>) -> BTreeMap<String, usize> {
    let mut shares = BTreeMap::new();
    for holder in holders.values().flatten() {
        *shares.entry(holder.clone()).or_default() += 1;
    }
    shares
}

/// Waits until the streams are held by exactly `replicas`, balanced (shares differ by one at
/// most), and returns how long that took.
async fn wait_balanced(pool: &sqlx::PgPool, streams: usize, replicas: &[&str]) -> Duration {
    let started = Instant::now();
    loop {
        let now = holders(pool).await;
        let shares = shares(&now);
        let names: BTreeSet<&str> = shares.keys().map(String::as_str).collect();
        let held: usize = shares.values().sum();
        let (most, least) = (
            shares.values().max().copied().unwrap_or(0),
            shares.values().min().copied().unwrap_or(0),
        );
        if held == streams && names == replicas.iter().copied().collect() && most - least <= 1 {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "not balanced over {replicas:?} within 60 s: {shares:?} ({held} of {streams} held)"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until every stream is held by some live replica; how long that took.
async fn wait_all_held(pool: &sqlx::PgPool, streams: usize, not_by: &str) -> Duration {
    let started = Instant::now();
    loop {
        let now = holders(pool).await;
        let held = now
            .values()
            .flatten()
            .filter(|holder| holder.as_str() != not_by)
            .count();
        if held == streams {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "streams not taken over within 60 s: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[actix_web::test]
async fn replicas_share_the_accounts_survive_a_sigkill_and_a_newcomer_and_end_exact() {
    const ACCOUNTS: usize = 20;
    const EVENTS: usize = 5_000;
    let mut config = emulator_config(EVENTS);
    config.extra_accounts = ACCOUNTS - 1;
    config.rate_limit = 1_000_000;
    let mut h = Harness::new(config).await;
    let accounts = h.emu.emulator.accounts();
    assert_eq!(accounts.len(), ACCOUNTS);
    h.set("CLOUDFLARE_ACCOUNT_IDS", &accounts.join(","));
    h.set("POLL_INTERVAL_SECONDS", &POLL_SECONDS.to_string());
    h.set("CFAUDIT_REBALANCE_INTERVAL_SECONDS", "1");
    h.set("CLOUDFLARE_PER_PAGE", "100");
    // A paced budget (the token's, divided among the replicas running: about 10 requests a
    // second each with three), so the backlog lasts through the kill and the newcomer.
    h.set("CLOUDFLARE_REQUESTS_PER_5_MINUTES", "9000");
    h.set("CLOUDFLARE_REQUEST_BURST", "15");
    // Batches of 5 pages: every stream commits as it goes, so a stream taken over has commits
    // of two replicas.
    h.set("BATCH_MAX_EVENTS", "500");
    let expected: BTreeMap<String, BTreeSet<String>> = accounts
        .iter()
        .map(|a| (a.clone(), valid_ids_of(&h.emu.emulator, a)))
        .collect();
    let all: BTreeSet<String> = expected.values().flatten().cloned().collect();
    let total = all.len() as i64;
    cfaudit(&["migrate"], &h.env).wait().await.unwrap();
    let pool = h.db.pool().await;

    // Kept when the test fails, for the replicas' own account of it.
    let logs = std::env::temp_dir().join(format!("cfaudit-replicas-{}", std::process::id()));
    std::fs::create_dir_all(&logs).unwrap();
    eprintln!("replica logs: {}", logs.display());
    let replica = |name: &str| {
        let mut env = h.env.clone();
        set(&mut env, "CFAUDIT_REPLICA_NAME", name);
        set(
            &mut env,
            "METRICS_ADDR",
            &format!("127.0.0.1:{}", free_port()),
        );
        let log = logs.join(format!("{name}-{}.log", free_port()));
        cfaudit_logged(&["run"], &env, &log)
    };
    let mut running = BTreeMap::new();
    for name in ["r1", "r2", "r3"] {
        running.insert(name, replica(name));
    }
    wait_balanced(&pool, ACCOUNTS, &["r1", "r2", "r3"]).await;
    wait_for_rows(&pool, total / 5).await;

    // r2 dies: its streams are taken over by r1 and r3 within two poll intervals.
    let killed = running.remove("r2").unwrap();
    signal(&killed, "-KILL");
    let takeover = wait_all_held(&pool, ACCOUNTS, "r2").await;
    let _ = finish(killed).await;
    eprintln!("takeover after SIGKILL: {takeover:?}");
    assert!(
        takeover < Duration::from_secs(2 * POLL_SECONDS),
        "takeover took {takeover:?}, more than two poll intervals"
    );
    let rows_at_kill = rows(&pool).await;
    assert!(rows_at_kill < total, "the kill came before the end");
    wait_balanced(&pool, ACCOUNTS, &["r1", "r3"]).await;

    // A newcomer joins: the streams are rebalanced over three again.
    wait_for_rows(&pool, (rows_at_kill + total) / 2).await;
    running.insert("r4", replica("r4"));
    let rebalanced = wait_balanced(&pool, ACCOUNTS, &["r1", "r3", "r4"]).await;
    eprintln!("rebalanced to a newcomer in {rebalanced:?}");
    // r2 comes back under its name: four replicas.
    running.insert("r2", replica("r2"));
    wait_balanced(&pool, ACCOUNTS, &["r1", "r2", "r3", "r4"]).await;

    // Everything lands; then every replica stops cleanly.
    wait_for_rows(&pool, total).await;
    let live: Vec<&str> = running.keys().copied().collect();
    for (name, child) in running {
        signal(&child, "-TERM");
        let stopped = finish(child).await;
        assert!(stopped.success, "{name}: {}", stopped.stderr);
    }

    // No stream was ever committed by two processes: every committed file names the lease it
    // was committed under, each lease one holder (the log of every lease taken), and along a
    // stream's commits the lease never goes back to an earlier one (two processes committing
    // in turn would).
    let unlogged = count(
        &pool,
        "SELECT count(*) FROM cfaudit_parquet_files f \
         WHERE NOT EXISTS (SELECT 1 FROM cfaudit_lease_log l \
                           WHERE l.stream = f.account_id AND l.lease_token = f.lease_token)",
    )
    .await;
    assert_eq!(
        unlogged, 0,
        "every committed file's lease is in the lease log"
    );
    let backwards = count(
        &pool,
        "SELECT count(*) FROM (SELECT lease_token < max(lease_token) OVER ( \
                 PARTITION BY account_id ORDER BY commit_seq \
                 ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS back \
               FROM cfaudit_parquet_files) c WHERE back",
    )
    .await;
    assert_eq!(
        backwards, 0,
        "a stream's commits went back to an earlier lease"
    );
    let handed_over = count(
        &pool,
        "SELECT count(*) FROM (SELECT f.account_id FROM cfaudit_parquet_files f \
               JOIN cfaudit_lease_log l ON l.stream = f.account_id AND l.lease_token = f.lease_token \
               GROUP BY f.account_id HAVING count(DISTINCT l.holder) > 1) s",
    )
    .await;
    eprintln!("streams committed by more than one replica in turn: {handed_over} of {ACCOUNTS}; replicas at the end: {live:?}");
    assert!(handed_over > 0, "the test moved streams between replicas");
    pool.close().await;

    h.assert_exact_ids(&all).await;
    let pool = h.db.pool().await;
    let by_account: Vec<(String, i64)> =
        sqlx::query_as("SELECT account_id, count(*) FROM audit_logs GROUP BY account_id")
            .fetch_all(&pool)
            .await
            .unwrap();
    pool.close().await;
    let by_account: BTreeMap<String, i64> = by_account.into_iter().collect();
    for (account, ids) in &expected {
        assert_eq!(
            by_account.get(account),
            Some(&(ids.len() as i64)),
            "{account}"
        );
    }
    h.finish().await;
    std::fs::remove_dir_all(&logs).unwrap();
}
