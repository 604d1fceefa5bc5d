//! Chaos: the real binary killed with SIGKILL at random moments, again and again, during a
//! backfill with API faults on (429, 5xx, truncated bodies, connection resets), then one run to
//! the end, then counting: nothing missing, nothing doubled, in PostgreSQL and in Parquet.
//!
//! Three times: oldest first on the local filesystem, newest first on S3 with stale pages too,
//! and both API versions side by side (v2 by cursor) on the local filesystem.
//! Sized for CI by default; `make chaos` runs at least 20 kills over 200,000 events each
//! (CHAOS_KILLS, CHAOS_EVENTS, CHAOS_SEED).

use std::time::{Duration, Instant};

use crate::common::*;
use rand::{Rng, SeedableRng};

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[derive(Clone, Copy, Debug)]
enum Lake {
    Local,
    S3,
}

#[actix_web::test]
async fn repeated_sigkills_during_a_faulty_backfill_end_exact() {
    chaos(Lake::Local, "asc", "v1").await;
}

#[actix_web::test]
async fn repeated_sigkills_during_a_faulty_newest_first_backfill_on_s3_end_exact() {
    chaos(Lake::S3, "desc", "v1").await;
}

/// v1 and v2 collected side by side, each stream its own checkpoint, both killed together;
/// the API's faults hit both (the emulator counts requests across versions).
#[actix_web::test]
async fn repeated_sigkills_while_collecting_v1_and_v2_end_exact() {
    chaos(Lake::Local, "asc", "v1,v2").await;
}

async fn chaos(lake: Lake, direction: &str, versions: &str) {
    let kills: usize = env_or("CHAOS_KILLS", 6);
    let events: usize = env_or("CHAOS_EVENTS", 40_000);
    let seed: u64 = env_or("CHAOS_SEED", rand::random());
    let mut config = emulator_config(events);
    config.faults.fault_429_every = 29;
    config.faults.retry_after_seconds = 1;
    config.faults.fault_5xx_every = 13;
    config.faults.fault_truncate_every = 17;
    config.faults.fault_reset_every = 23;
    config.faults.latency_ms = 15;
    config.invalid_every = 997;
    let with_v2 = versions.contains("v2");
    if with_v2 {
        config.v2_events = Some(events / 2);
    }
    if direction == "desc" {
        // Stale pages: with newest first, a page from before the last one.
        config.faults.fault_repeat_every = 31;
    }
    let mut h = match lake {
        Lake::S3 => Harness::with_s3(config).await,
        Lake::Local => Harness::new(config).await,
    };
    h.set("CLOUDFLARE_DIRECTION", direction);
    h.set("CLOUDFLARE_PER_PAGE", "500");
    h.set("BATCH_MAX_EVENTS", "1000");
    h.set("CLOUDFLARE_API_VERSIONS", versions);
    h.set("CLOUDFLARE_V2_LIMIT", "500");
    let mut expected = valid_ids(&h.emu.emulator);
    if with_v2 {
        expected.extend(valid_ids_v2(&h.emu.emulator));
    }
    assert!(finish(cfaudit(&["migrate"], &h.env)).await.success);
    let pool = h.db.pool().await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let started = Instant::now();

    // Each cycle: start, wait until the restarted process writes new rows (its recovery
    // time), let it work a random while, SIGKILL it.
    let mut recoveries = Vec::new();
    for _ in 0..kills {
        let before = rows(&pool).await;
        let mut child = cfaudit(&["run", "--once"], &h.env);
        let restarted = Instant::now();
        loop {
            if rows(&pool).await > before {
                recoveries.push(restarted.elapsed());
                break;
            }
            assert!(
                child.try_wait().unwrap().is_none(),
                "the run ended before it wrote anything"
            );
            assert!(
                restarted.elapsed() < Duration::from_secs(120),
                "no progress 120 s after a restart"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(100..900))).await;
        if child.try_wait().unwrap().is_some() {
            break; // finished before the kill: the backfill is shorter than the chaos
        }
        child.start_kill().unwrap();
        child.wait().await.unwrap();
    }
    let killed = recoveries.len();
    let last = finish(cfaudit(&["run", "--once"], &h.env)).await;
    assert!(last.success, "{}", last.stderr);
    let faults = assert_faults_hit(&h.emu.emulator);

    // Count, then assert: the figures are printed either way.
    let (pg_rows, pg_keys, _) = pg_counts(&pool).await;
    let pg_ids = pg_ids(&pool).await;
    let parquet = h.parquet_counts(true);
    let parquet_ids: std::collections::BTreeSet<String> =
        serde_json::from_value(parquet["ids"].clone()).unwrap();
    let missing_pg = expected.difference(&pg_ids).count();
    let missing_parquet = expected.difference(&parquet_ids).count();
    let doubled_pg = pg_rows - pg_keys;
    let doubled_parquet = parquet["pyarrow_rows"].as_i64().unwrap()
        - parquet["pyarrow_distinct_ids"].as_i64().unwrap();
    let recover_ms: Vec<u128> = recoveries.iter().map(|d| d.as_millis()).collect();
    println!(
        "chaos: lake={lake:?} direction={direction} versions={versions} seed={seed} kills={killed} events={} expected_rows={} missing_pg={missing_pg} missing_parquet={missing_parquet} \
         duplicated_pg={doubled_pg} duplicated_parquet={doubled_parquet} staged_orphans={} faults={faults:?} total_s={:.1} \
         recover_ms(min/median/max)={}/{}/{} recover_ms={recover_ms:?}",
        events,
        expected.len(),
        parquet["staged_orphans"],
        started.elapsed().as_secs_f64(),
        recover_ms.iter().min().unwrap_or(&0),
        { let mut v = recover_ms.clone(); v.sort(); v.get(v.len() / 2).copied().unwrap_or(0) },
        recover_ms.iter().max().unwrap_or(&0),
    );
    assert_eq!(
        killed, kills,
        "the backfill ended before every kill: raise CHAOS_EVENTS"
    );
    assert_eq!(
        (missing_pg, missing_parquet, doubled_pg, doubled_parquet),
        (0, 0, 0, 0)
    );
    h.assert_exact_ids(&expected).await;
    if with_v2 {
        let v2_rows = count(
            &pool,
            "SELECT count(*) FROM audit_logs WHERE api_version = 'v2'",
        )
        .await;
        assert_eq!(v2_rows as usize, valid_ids_v2(&h.emu.emulator).len());
    }
    pool.close().await;
    h.finish().await;
}
