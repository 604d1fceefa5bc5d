//! Audit Logs v2 end to end: the real service against the emulator's v2 endpoint, real
//! PostgreSQL and a Parquet folder read back by pyarrow and DuckDB. Cursor paging, v1 and v2
//! side by side, the API's variants (count as a number, the cursor under `cursors.after` or
//! empty on the last page, `since` read as exclusive) and its faults.

use std::collections::BTreeSet;

use crate::common::*;

/// The v2 events that must land, and nothing of v1.
fn v2_only(h: &Harness) -> BTreeSet<String> {
    valid_ids_v2(&h.emu.emulator)
}

async fn api_versions(h: &Harness) -> Vec<(String, i64)> {
    let pool = h.db.pool().await;
    let rows = sqlx::query_as("SELECT api_version, count(*) FROM audit_logs GROUP BY 1 ORDER BY 1")
        .fetch_all(&pool)
        .await
        .unwrap();
    pool.close().await;
    rows
}

/// A 50,000-event v2 backfill lands exactly once in both sinks, every column as the API
/// facts say, and a second run adds nothing.
#[actix_web::test]
async fn a_v2_backfill_lands_exactly_once_and_a_second_run_adds_nothing() {
    let mut config = emulator_config(1);
    config.v2_events = Some(50_000);
    config.invalid_every = 997;
    config.days = 20.0;
    let mut h = Harness::new(config).await;
    h.set("CLOUDFLARE_API_VERSIONS", "v2");
    h.set("CLOUDFLARE_V2_LIMIT", "1000");
    let first = run_once(h.config()).await.unwrap();
    assert!(first.checkpoints.contains_key("v2"), "{first:?}");
    let expected = v2_only(&h);
    assert!(expected.len() > 49_900, "{}", expected.len());
    assert_eq!(first.rows_in_postgres, expected.len() as i64);
    let pool = h.db.pool().await;
    assert_exact(&pool, &h.lake, &h.reader_env, &expected).await;
    assert_columns_match_ground_truth(
        &pool,
        &h.lake,
        &h.reader_env,
        &h.emu.emulator.events_v2(),
        &expected,
    )
    .await;
    let dead = count(&pool, "SELECT count(*) FROM cfaudit_dead_letters").await;
    assert_eq!(
        dead as usize,
        50_000 - expected.len(),
        "the invalid ones are dead letters"
    );
    let requests = h.emu.emulator.request_log();
    assert!(requests.iter().all(|r| r.path.ends_with("/logs/audit")));
    assert!(
        requests
            .iter()
            .filter(|r| r.param("cursor").is_some())
            .count()
            >= 49,
        "paged by cursor, 100 events a page at most (the emulator's cap)"
    );
    pool.close().await;

    let again = run_once(h.config()).await.unwrap();
    assert_eq!(again.rows_in_postgres, first.rows_in_postgres);
    assert_eq!(again.parquet_rows, first.parquet_rows);
    h.assert_exact_ids(&expected).await;
    assert_eq!(
        api_versions(&h).await,
        [("v2".to_owned(), expected.len() as i64)]
    );
    h.finish().await;
}

/// v1 and v2 of one account side by side: two record sets, each once, told apart by
/// `api_version`, each with its own checkpoint; and both again add nothing.
#[actix_web::test]
async fn v1_and_v2_together_on_one_account() {
    let mut config = emulator_config(3_000);
    config.v2_events = Some(2_500);
    let mut h = Harness::new(config).await;
    h.set("CLOUDFLARE_API_VERSIONS", "v1,v2");
    let summary = run_once(h.config()).await.unwrap();
    let (v1, v2) = (valid_ids(&h.emu.emulator), v2_only(&h));
    assert!(
        v1.is_disjoint(&v2),
        "different ids for different record sets"
    );
    let both: BTreeSet<String> = v1.union(&v2).cloned().collect();
    h.assert_exact_ids(&both).await;
    assert_eq!(
        api_versions(&h).await,
        [
            ("v1".to_owned(), v1.len() as i64),
            ("v2".to_owned(), v2.len() as i64)
        ]
    );
    assert_eq!(summary.checkpoints.len(), 2, "{summary:?}");
    assert!(summary.checkpoints.values().all(Option::is_some));
    assert_eq!(
        summary.checkpoint,
        summary.checkpoints.values().copied().min().flatten()
    );
    run_once(h.config()).await.unwrap();
    h.assert_exact_ids(&both).await;
    h.finish().await;
}

/// Cursor paging where it is hard: a run of 250 events at one instant across many pages,
/// pages shorter than the limit that carry a cursor, events arriving behind the cursor and
/// the oldest expiring between pages; under each of the API's variants.
#[actix_web::test]
async fn cursor_paging_survives_ties_short_pages_and_a_changing_store() {
    for variant in 0..4 {
        let mut config = emulator_config(1);
        config.v2_events = Some(3_000);
        config.v2_page_cap = 7;
        match variant {
            0 => {}
            1 => config.v2_count_number = true,
            2 => config.v2_cursors_after = true,
            _ => {
                config.v2_empty_cursor = true;
                config.v2_since_exclusive = true;
            }
        }
        let mut h = Harness::new(config).await;
        h.set("CLOUDFLARE_API_VERSIONS", "v2");
        h.set("CLOUDFLARE_V2_LIMIT", "10");
        let emulator = h.emu.emulator.clone();
        let at = emulator.events_v2()[1_500].when;
        let tie: Vec<serde_json::Value> = (0..250)
            .map(|i| {
                serde_json::json!({"id": format!("tie{i:04}"),
                    "action": {"time": at.to_rfc3339(), "type": "update", "result": "success"},
                    "actor": {"email": "tie@example.com"}})
            })
            .collect();
        emulator.insert_v2(&tie);
        // Mid-sweep: an event behind the cursor (the next run's overlap reads it) and the
        // oldest events expiring (already read, they must not shift the cursor).
        let behind = emulator.events_v2()[10].when;
        let expiring: Vec<String> = emulator.events_v2()[..5]
            .iter()
            .map(|e| e.id.clone())
            .filter(|id| !id.is_empty())
            .collect();
        emulator.on_request_to(cfaudit_emulator::Api::V2, 60, move |store| {
            store.push(cfaudit_emulator::StoredEvent::raw(
                behind,
                "late-arrival",
                serde_json::json!({"id": "late-arrival",
                    "action": {"time": behind.to_rfc3339(), "type": "create", "result": "success"}})
                .to_string()
                .into_bytes(),
            ));
            store.drain(..5);
        });
        run_once(h.config()).await.unwrap();
        // Everything that was there from the start (the expired ones included: read before
        // they went), and the late arrival after a run whose overlap reaches it.
        h.set("CLOUDFLARE_SINCE_SAFETY_LAG_SECONDS", "31536000");
        run_once(h.config()).await.unwrap();
        let mut expected = v2_only(&h);
        expected.extend(expiring);
        let pool = h.db.pool().await;
        let stored: BTreeSet<String> =
            sqlx::query_as::<_, (String,)>("SELECT event_id FROM audit_logs")
                .fetch_all(&pool)
                .await
                .unwrap()
                .into_iter()
                .map(|(id,)| id)
                .collect();
        pool.close().await;
        assert!(stored.contains("late-arrival"), "variant {variant}");
        assert!(
            stored.contains("tie0000") && stored.contains("tie0249"),
            "variant {variant}"
        );
        assert!(
            expected.is_subset(&stored),
            "variant {variant}: {} missing",
            expected.difference(&stored).count()
        );
        let counts = h.parquet_counts(true);
        assert_eq!(
            counts["pyarrow_rows"], counts["pyarrow_distinct_ids"],
            "variant {variant}"
        );
        assert_eq!(
            counts["pyarrow_rows"].as_u64().unwrap() as usize,
            stored.len()
        );
        h.assert_exact_ids(&stored).await;
        h.finish().await;
    }
}

/// v2 under every fault class the emulator has: exactly once, and every fault was hit.
#[actix_web::test]
async fn v2_under_every_fault_class_lands_exactly_once() {
    let mut config = emulator_config(1);
    config.v2_events = Some(4_000);
    config.faults.fault_429_every = 17;
    config.faults.retry_after_seconds = 1;
    config.faults.fault_5xx_every = 13;
    config.faults.fault_success_false_every = 19;
    config.faults.fault_truncate_every = 11;
    config.faults.fault_reset_every = 23;
    config.faults.fault_repeat_every = 7;
    let mut h = Harness::new(config).await;
    h.set("CLOUDFLARE_API_VERSIONS", "v2");
    h.set("CLOUDFLARE_V2_LIMIT", "100");
    run_once(h.config()).await.unwrap();
    assert_faults_hit(&h.emu.emulator);
    h.assert_exact_ids(&v2_only(&h)).await;
    h.finish().await;
}
