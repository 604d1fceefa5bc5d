//! The six ways exactly-once broke with ordinary inputs, each end to end: the real binary,
//! PostgreSQL, the emulator, and the Parquet dataset read back by pyarrow and DuckDB. Every
//! test counts both sinks against the emulator's events, and compares every column with a
//! ground truth derived from the API facts, not by the mapper under test.
//!
//! `CFAUDIT_BIN=<an older build>` runs them against another binary (each failed before its
//! fix).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::common::*;
use cfaudit_emulator::expire;
use chrono::{DateTime, SecondsFormat, Utc};

fn stamp(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// Both sinks hold exactly `expected`, once, column for column (the ground truth: the
/// emulator's events now, or `before` for events that expired since).
async fn assert_exact_columns(h: &Harness, expected: &BTreeSet<String>) {
    assert_exact_columns_of(h, expected, &h.emu.emulator.events()).await;
}

async fn assert_exact_columns_of(
    h: &Harness,
    expected: &BTreeSet<String>,
    events: &[cfaudit_emulator::StoredEvent],
) {
    let pool = h.db.pool().await;
    assert_exact(&pool, &h.lake, &h.reader_env, expected).await;
    assert_columns_match_ground_truth(&pool, &h.lake, &h.reader_env, events, expected).await;
    pool.close().await;
}

async fn dead_letters(h: &Harness) -> Vec<(String, Vec<u8>)> {
    let pool = h.db.pool().await;
    let rows = sqlx::query_as("SELECT reason, raw_bytes FROM cfaudit_dead_letters ORDER BY id")
        .fetch_all(&pool)
        .await
        .unwrap();
    pool.close().await;
    rows
}

async fn run_once(h: &Harness) -> Finished {
    let run = finish(cfaudit(&["run", "--once"], &h.env)).await;
    assert!(run.success, "run --once failed: {}", run.stderr);
    run
}

/// 1. A backfill near the API's 18-month edge sees the oldest events expire while it pages.
/// With page numbers as offsets every expired event shifted the later pages, and as many
/// surviving events were skipped for good (1,425 of 20,000, exit 0). Keyset paging continues
/// from the last `when` it holds.
#[actix_web::test]
async fn events_expiring_at_the_head_during_an_oldest_first_sweep_skip_nothing() {
    let mut h = Harness::new(emulator_config(20_000)).await;
    h.set("CLOUDFLARE_PER_PAGE", "100");
    // Everything exists when the sweep starts: the events read before they expire are in
    // the sinks too.
    let expected = valid_ids(&h.emu.emulator);
    let before = h.emu.emulator.events();
    // After twenty pages, the 1,500 oldest events (all read by then) expire.
    h.emu.emulator.on_request(21, |events| {
        expire(events, 1_500);
    });
    run_once(&h).await;
    assert!(h.emu.emulator.events().len() < 20_000, "the events expired");
    assert_exact_columns_of(&h, &expected, &before).await;
    h.finish().await;
}

/// 2. One event PostgreSQL cannot store (a number beyond `numeric`, an id beyond the primary
/// key index's row size) made the whole batch fail, rewind and fail again: `run --once`
/// exited 1 with nothing stored. A page with one unreadable element (invalid UTF-8, a raw
/// control character) was retried for ever. Now each is a dead letter with its reason and
/// its exact bytes, and the rest lands.
#[actix_web::test]
async fn events_postgresql_cannot_store_become_dead_letters_and_the_rest_lands() {
    let h = Harness::new(emulator_config(3_000)).await;
    let events = h.emu.emulator.events();
    let when = |i: usize| stamp(events[i].when);
    let tiny = format!(
        r#"{{"id":"tiny-number","when":"{}","action":{{"type":"login","result":true}},"metadata":{{"x":1e-99999}}}}"#,
        when(100)
    );
    let long_id: String = (0..600)
        .map(|i| {
            format!(
                "{:032x}",
                (i as u128).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835)
            )
        })
        .collect();
    let long = format!(r#"{{"id":"{long_id}","when":"{}"}}"#, when(900));
    let mut invalid_utf8 = format!(
        r#"{{"id":"bad-utf8","when":"{}","actor":{{"email":""#,
        when(1_500)
    )
    .into_bytes();
    invalid_utf8.extend_from_slice(b"\xff\xfe@example.com\"}}");
    let raw_tab = format!(
        "{{\"id\":\"raw-tab\",\"when\":\"{}\",\"metadata\":{{\"name\":\"a\tb\"}}}}",
        when(2_500)
    )
    .into_bytes();
    let poison: Vec<Vec<u8>> = vec![tiny.into_bytes(), long.into_bytes(), invalid_utf8, raw_tab];
    for (event, at) in poison.iter().zip([100, 900, 1_500, 2_500]) {
        h.emu
            .emulator
            .insert_raw(events[at].when, "poison", event.clone());
    }
    let mut expected = valid_ids(&h.emu.emulator);
    expected.remove("tiny-number");
    expected.remove(&long_id);
    assert_eq!(expected.len(), 3_000);

    run_once(&h).await;
    assert_exact_columns(&h, &expected).await;
    let letters = dead_letters(&h).await;
    assert_eq!(letters.len(), 4, "{letters:?}");
    for bytes in &poison {
        let (reason, _) = letters
            .iter()
            .find(|(_, raw)| raw == bytes)
            .unwrap_or_else(|| panic!("no dead letter holds {}", String::from_utf8_lossy(bytes)));
        assert!(!reason.is_empty());
    }
    let reasons: Vec<&str> = letters.iter().map(|(r, _)| r.as_str()).collect();
    assert_eq!(
        reasons
            .iter()
            .filter(|r| r.contains("PostgreSQL refused"))
            .count(),
        2,
        "{reasons:?}"
    );
    assert_eq!(
        reasons
            .iter()
            .filter(|r| r.contains("not readable JSON"))
            .count(),
        2,
        "{reasons:?}"
    );

    // A second run over the same events stores nothing twice.
    run_once(&h).await;
    assert_eq!(dead_letters(&h).await.len(), 4);
    assert_exact_columns(&h, &expected).await;
    h.finish().await;
}

/// A lone surrogate escape (`\ud800`) is valid JSON syntax but no text: PostgreSQL's `jsonb`
/// refuses it. The mapping reads only the members it maps and skips the rest, so a skipped
/// member must still be checked as a full parse checks it: wherever the escape is (a member
/// the mapping skips, v1's `metadata`, a mapped member), the event is a dead letter named by
/// the mapping, and everything else lands once in both sinks, again on a second run.
#[actix_web::test]
async fn a_lone_surrogate_anywhere_in_an_event_makes_a_dead_letter_and_the_rest_lands() {
    let h = Harness::new(emulator_config(1_000)).await;
    let events = h.emu.emulator.events();
    let with = |id: &str, member: &str, at: usize| {
        format!(
            r#"{{"id":"{id}","when":"{}","action":{{"type":"login","result":true}},{member}}}"#,
            stamp(events[at].when)
        )
        .into_bytes()
    };
    let poison = [
        (
            with(
                "surrogate-skipped",
                r#""newValue":{"name":"a\ud800b"}"#,
                100,
            ),
            100,
        ),
        (
            with(
                "surrogate-metadata",
                r#""metadata":{"zone_name":"\udc00"}"#,
                500,
            ),
            500,
        ),
        (
            with(
                "surrogate-mapped",
                r#""actor":{"email":"x\ud83d@example.com"}"#,
                900,
            ),
            900,
        ),
    ];
    for (event, at) in &poison {
        h.emu
            .emulator
            .insert_raw(events[*at].when, "poison", event.clone());
    }
    let expected = valid_ids(&h.emu.emulator);
    assert_eq!(expected.len(), 1_000, "the ground truth takes none of them");

    run_once(&h).await;
    assert_exact_columns(&h, &expected).await;
    let letters = dead_letters(&h).await;
    assert_eq!(letters.len(), poison.len(), "{letters:?}");
    for (event, _) in &poison {
        let (reason, _) = letters
            .iter()
            .find(|(_, raw)| raw == event)
            .unwrap_or_else(|| panic!("no dead letter holds {}", String::from_utf8_lossy(event)));
        // Refused by the mapping (serde_json names the escape), not left to PostgreSQL.
        assert!(reason.starts_with("event is not valid JSON"), "{reason}");
        assert!(
            reason.contains("escape") || reason.contains("surrogate"),
            "{reason}"
        );
    }

    run_once(&h).await;
    assert_eq!(dead_letters(&h).await.len(), poison.len());
    assert_exact_columns(&h, &expected).await;
    h.finish().await;
}

/// 3. A member-chosen name holding the six characters `\u0000` was dead-lettered: the event
/// was missing from `audit_logs` and the dataset. Only a real NUL is special, and even that
/// event is stored, its NUL kept as that text.
#[actix_web::test]
async fn a_name_holding_the_text_u0000_is_stored_and_so_is_a_real_nul() {
    let h = Harness::new(emulator_config(200)).await;
    let events = h.emu.emulator.events();
    let text = format!(
        r#"{{"id":"nul-text","when":"{}","action":{{"type":"token_create","result":true}},"actor":{{"email":"member@example.com"}},"metadata":{{"token_name":"prod\\u0000hidden"}}}}"#,
        stamp(events[50].when)
    );
    let real = format!(
        r#"{{"id":"nul-real","when":"{}","action":{{"type":"token_create","result":true}},"actor":{{"email":"mem\u0000ber@example.com"}},"metadata":{{"token_name":"prod\u0000hidden"}}}}"#,
        stamp(events[60].when)
    );
    h.emu
        .emulator
        .insert_raw(events[50].when, "nul-text", text.into_bytes());
    h.emu
        .emulator
        .insert_raw(events[60].when, "nul-real", real.into_bytes());
    let expected = valid_ids(&h.emu.emulator);
    assert!(expected.contains("nul-text") && expected.contains("nul-real"));

    run_once(&h).await;
    assert_exact_columns(&h, &expected).await;
    assert!(dead_letters(&h).await.is_empty());
    let pool = h.db.pool().await;
    let names: Vec<(String, Option<String>, Option<String>)> = sqlx::query_as(
        "SELECT event_id, metadata->>'token_name', actor_email FROM audit_logs \
         WHERE event_id IN ('nul-text', 'nul-real') ORDER BY event_id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        names,
        [
            (
                "nul-real".to_owned(),
                Some(r"prod\u0000hidden".to_owned()),
                Some(r"mem\u0000ber@example.com".to_owned())
            ),
            (
                "nul-text".to_owned(),
                Some(r"prod\u0000hidden".to_owned()),
                Some("member@example.com".to_owned())
            ),
        ]
    );
    pool.close().await;
    h.finish().await;
}

/// 4. Raising CLOUDFLARE_SINCE_SAFETY_LAG_SECONDS between runs wrote the events of the wider
/// window to Parquet again (2,741 duplicates): the overlap ids only reached as far back as the
/// old lag. The dataset's event index knows every committed event, whatever the lag was.
#[actix_web::test]
async fn raising_the_safety_lag_between_runs_writes_nothing_twice() {
    let mut config = emulator_config(20_000);
    config.days = 2.0;
    let mut h = Harness::new(config).await;
    h.set("CLOUDFLARE_SINCE_SAFETY_LAG_SECONDS", "10");
    let expected = valid_ids(&h.emu.emulator);
    run_once(&h).await;
    h.set("CLOUDFLARE_SINCE_SAFETY_LAG_SECONDS", "86400");
    let wide = run_once(&h).await;
    assert!(
        wide.stdout.contains("\"rows_in_postgres\""),
        "{}",
        wide.stdout
    );
    assert_exact_columns(&h, &expected).await;
    h.finish().await;
}

/// 5. Newest first, a sweep cut short (at most 5 pages per sweep) moved the checkpoint to the
/// newest event: 50 of 500 events were stored after 12 sweeps and the rest never would be. The
/// same for any early end: a 400 after a full page, a repeated page. A sweep cut short now
/// leaves its position committed, and the next one goes on from it.
#[actix_web::test]
async fn newest_first_sweeps_cut_short_lose_nothing() {
    let mut config = emulator_config(500);
    config.past_end_400 = true;
    config.faults.fault_repeat_every = 7;
    let mut h = Harness::new(config).await;
    h.set("CLOUDFLARE_DIRECTION", "desc");
    h.set("CLOUDFLARE_PER_PAGE", "10");
    h.set("MAX_PAGES_PER_SWEEP", "5");
    let expected = valid_ids(&h.emu.emulator);
    run_once(&h).await;
    assert_faults_hit(&h.emu.emulator);
    assert_exact_columns(&h, &expected).await;
    // The sweeps of five pages really were cut short, and went on.
    assert!(
        h.emu.emulator.requests() > 500 / 10,
        "{} requests",
        h.emu.emulator.requests()
    );
    h.finish().await;
}

/// 6. Two processes on one stream (`run --once` beside the service): the start-up recovery of
/// one deleted the other's staged files in flight, that one committed a batch whose files
/// were gone, Parquet missed 20,000 of 40,000 events for good and every later start failed on
/// "staged file and final file are both missing". Now a stream is leased to one process:
/// `run --once` refuses clearly while the service holds it.
#[actix_web::test]
async fn a_second_process_on_a_stream_is_refused_and_the_first_ends_exact() {
    let mut config = emulator_config(40_000);
    config.faults.latency_ms = 30;
    let mut h = Harness::new(config).await;
    h.set("CLOUDFLARE_PER_PAGE", "500");
    h.set("BATCH_MAX_EVENTS", "2000");
    h.set("METRICS_ADDR", &format!("127.0.0.1:{}", free_port()));
    let expected = valid_ids(&h.emu.emulator);
    let pool = h.db.pool().await;
    let service = cfaudit(&["run"], &h.env);
    wait_for_rows(&pool, 2_000).await;
    let second = finish(cfaudit(&["run", "--once"], &h.env)).await;
    assert_eq!(second.code, Some(1), "{}", second.stderr);
    assert!(
        second.stderr.contains("is being collected by") && second.stderr.contains(":"),
        "the refusal names the holder: {}",
        second.stderr
    );
    wait_for_rows(&pool, expected.len() as i64).await;
    signal(&service, "-TERM");
    let stopped = finish(service).await;
    assert_eq!(stopped.code, Some(0), "{}", stopped.stderr);
    pool.close().await;
    assert_exact_columns(&h, &expected).await;
    h.finish().await;
}

/// 6, a rolling update with surge: the new service waits for the old one's lease and takes
/// the stream over when it stops; nothing is lost or doubled.
#[actix_web::test]
async fn a_rolling_update_hands_the_stream_over() {
    let mut config = emulator_config(30_000);
    config.faults.latency_ms = 30;
    let mut h = Harness::new(config).await;
    h.set("CLOUDFLARE_PER_PAGE", "500");
    h.set("BATCH_MAX_EVENTS", "2000");
    let expected = valid_ids(&h.emu.emulator);
    let pool = h.db.pool().await;
    let mut old_env = h.env.clone();
    set(
        &mut old_env,
        "METRICS_ADDR",
        &format!("127.0.0.1:{}", free_port()),
    );
    let mut new_env = h.env.clone();
    set(
        &mut new_env,
        "METRICS_ADDR",
        &format!("127.0.0.1:{}", free_port()),
    );
    let old = cfaudit(&["run"], &old_env);
    wait_for_rows(&pool, 3_000).await;
    let new = cfaudit(&["run"], &new_env);
    tokio::time::sleep(Duration::from_secs(2)).await;
    signal(&old, "-TERM");
    let old = finish(old).await;
    assert_eq!(old.code, Some(0), "{}", old.stderr);
    wait_for_rows(&pool, expected.len() as i64).await;
    // The new one collects on: wait until its commits reach the end of the events.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let counts = h.parquet_counts(false);
        if counts["pyarrow_rows"].as_i64() == Some(expected.len() as i64) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{counts}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    signal(&new, "-TERM");
    let new = finish(new).await;
    assert_eq!(new.code, Some(0), "{}", new.stderr);
    assert!(
        new.stderr.contains("stream leased"),
        "the new process took the stream over: {}",
        new.stderr
    );
    pool.close().await;
    assert_exact_columns(&h, &expected).await;
    h.finish().await;
}

/// 6, the same backfill started twice: the second refuses clearly, the first ends exact.
#[actix_web::test]
async fn the_same_backfill_started_twice_is_refused() {
    let mut config = emulator_config(20_000);
    config.faults.latency_ms = 30;
    let mut h = Harness::new(config).await;
    h.set("CLOUDFLARE_PER_PAGE", "500");
    let expected = valid_ids(&h.emu.emulator);
    let until = Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string();
    let range = ["backfill", "--since", "2000-01-01", "--until", &until];
    let first = cfaudit(&range, &h.env);
    let pool = h.db.pool().await;
    wait_for_rows(&pool, 1_000).await;
    let second = finish(cfaudit(&range, &h.env)).await;
    assert_eq!(second.code, Some(1), "{}", second.stderr);
    assert!(
        second.stderr.contains("is being collected by"),
        "{}",
        second.stderr
    );
    let first = finish(first).await;
    assert!(first.success, "{}", first.stderr);
    pool.close().await;
    assert_exact_columns(&h, &expected).await;
    h.finish().await;
}

/// 6, a committed batch whose files are gone (the staging area lost between the commit and
/// the publish) no longer wedges the stream: the files are forgotten and their events are
/// collected again from the API.
#[actix_web::test]
async fn committed_files_lost_before_publishing_are_collected_again() {
    let mut h = Harness::new(emulator_config(5_000)).await;
    h.set("CLOUDFLARE_PER_PAGE", "500");
    h.set("BATCH_MAX_EVENTS", "500");
    let expected = valid_ids(&h.emu.emulator);
    let mut crashing = h.env.clone();
    set(
        &mut crashing,
        "FAILPOINTS",
        "cfaudit::committed_not_published=2*off->return",
    );
    let crashed = finish(cfaudit(&["run", "--once"], &crashing)).await;
    assert!(!crashed.success, "{}", crashed.stderr);
    let staging = std::path::PathBuf::from(format!("{}.staging", h.lake));
    let lost = std::fs::read_dir(&staging).unwrap().count();
    assert!(lost > 0, "the crash left committed files unpublished");
    std::fs::remove_dir_all(&staging).unwrap();
    let run = run_once(&h).await;
    assert!(
        run.stderr.contains("collected again"),
        "the lost files were named: {}",
        run.stderr
    );
    assert_exact_columns(&h, &expected).await;
    let pool = h.db.pool().await;
    let unpublished = unpublished_files(&pool).await;
    assert_eq!(unpublished, 0);
    pool.close().await;
    h.finish().await;
}

/// A lease on `stream`, in a session of its own, and the fence writes carry under it.
async fn leased(
    pg: &cfaudit::sinks::postgres::Postgres,
    stream: &str,
) -> (
    cfaudit::sinks::postgres::Lease,
    cfaudit_actors::ports::Fence,
) {
    let session = cfaudit::sinks::postgres::LeaseSession::open(pg, "test")
        .await
        .unwrap();
    let lease = session.try_lease(stream).await.unwrap().unwrap();
    let fence = cfaudit_actors::ports::Fence {
        stream: stream.into(),
        lease: lease.token,
    };
    (lease, fence)
}

/// The PostgreSQL adapter keeps `ingestion_time` equal to the dataset's, whatever order the
/// attempts of a batch wrote in: a rewound attempt's write after the commit leaves a committed
/// row alone, and the commit sets its own time on rows another attempt rewrote.
/// And it refuses a commit whose batch holds an event the dataset has already (a dedup miss):
/// nothing of it is kept, and the batch without that event commits.
async fn a_committed_rows_ingestion_time_is_the_datasets_whichever_attempt_wrote_last(
    cluster: Cluster,
) {
    use cfaudit_actors::ports::{
        CheckpointStore, CommitRecord, CommittedState, RowSink, SinkError,
    };
    let test = "a_committed_rows_ingestion_time_is_the_datasets_whichever_attempt_wrote_last";
    let Some((db, pg)) = TestDb::migrated(cluster, test).await else {
        return;
    };
    let stream = "acct-ingestion";
    let (lease, fence) = leased(&pg, stream).await;
    let at = |s: &str| DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc);
    let (committed_time, rewound_time) = (at("2026-06-01T00:00:00Z"), at("2026-06-01T00:05:00Z"));
    let rows_at = |ids: &[&str], ingestion_time| {
        ids.iter()
            .map(|id| {
                let raw = format!(r#"{{"id":"{id}","when":"2026-05-01T00:00:00Z"}}"#);
                cfaudit_actors::mapping::map_v1(&raw, stream, ingestion_time).unwrap()
            })
            .collect::<Vec<_>>()
    };
    let commit = |seq: u64, ids: &[&str], ingestion_time| CommitRecord {
        fence: fence.clone(),
        previous_commit_seq: seq - 1,
        state: CommittedState {
            checkpoint: Some(at("2026-05-01T00:00:00Z")),
            commit_seq: seq,
            ..CommittedState::default()
        },
        events: rows_at(ids, ingestion_time)
            .iter()
            .map(|r| cfaudit_actors::SeenId {
                id: r.event_id.clone(),
                when: r.timestamp,
            })
            .collect(),
        ingestion_time: Some(ingestion_time),
        dead_letters: vec![],
        files: vec![],
    };
    // a: committed, then an attempt that lagged behind writes it again.
    pg.write_rows(Some(&fence), &rows_at(&["a"], committed_time))
        .await
        .unwrap();
    pg.commit(&commit(1, &["a"], committed_time)).await.unwrap();
    pg.write_rows(Some(&fence), &rows_at(&["a"], rewound_time))
        .await
        .unwrap();
    // b: written by the committing attempt, rewritten by another, then committed.
    pg.write_rows(Some(&fence), &rows_at(&["b"], committed_time))
        .await
        .unwrap();
    pg.write_rows(Some(&fence), &rows_at(&["b"], rewound_time))
        .await
        .unwrap();
    pg.commit(&commit(2, &["b"], committed_time)).await.unwrap();
    let times: Vec<(String, DateTime<Utc>)> =
        sqlx::query_as("SELECT event_id, ingestion_time FROM audit_logs ORDER BY event_id")
            .fetch_all(pg.pool())
            .await
            .unwrap();
    assert_eq!(
        times,
        vec![("a".into(), committed_time), ("b".into(), committed_time)]
    );

    // c with a again: refused as a conflict, and nothing of it is committed.
    pg.write_rows(Some(&fence), &rows_at(&["c"], committed_time))
        .await
        .unwrap();
    let refused = pg.commit(&commit(3, &["a", "c"], committed_time)).await;
    assert!(
        matches!(refused, Err(SinkError::Conflict(_))),
        "{refused:?}"
    );
    let indexed = || async {
        let ids: Vec<(String,)> =
            sqlx::query_as("SELECT event_id FROM cfaudit_lake_events ORDER BY event_id")
                .fetch_all(pg.pool())
                .await
                .unwrap();
        ids.into_iter().map(|(id,)| id).collect::<Vec<_>>()
    };
    assert_eq!(indexed().await, ["a", "b"]);
    assert_eq!(pg.load(stream).await.unwrap().commit_seq, 2);
    pg.commit(&commit(3, &["c"], committed_time)).await.unwrap();
    assert_eq!(indexed().await, ["a", "b", "c"]);
    assert_eq!(pg.load(stream).await.unwrap().commit_seq, 3);
    lease.release().await;
    pg.pool().close().await;
    db.drop_db().await;
}

on_both_clusters!(a_committed_rows_ingestion_time_is_the_datasets_whichever_attempt_wrote_last);

/// A batch of new rows is stored by COPY, one with a row already there by the upsert: both
/// store every column alike (escapes, NULLs, addresses, JSON, sub-microsecond times), count
/// inserted and present rows, store nothing of a refused batch, and obey the fence.
async fn the_bulk_copy_and_the_upsert_store_the_same_rows(cluster: Cluster) {
    use cfaudit::sinks::postgres::BulkWrite;
    use cfaudit_actors::ports::{Fence, RowSink, SinkError};
    use cfaudit_actors::ApiVersion;
    let test = "the_bulk_copy_and_the_upsert_store_the_same_rows";
    let Some((db, pg)) = TestDb::migrated(cluster, test).await else {
        return;
    };
    let stream = "acct-bulk";
    let (lease, fence) = leased(&pg, stream).await;
    // Not a whole microsecond: both paths must truncate alike.
    let ingestion_time = DateTime::parse_from_rfc3339("2026-06-01T00:00:00.123456789Z")
        .unwrap()
        .with_timezone(&Utc);
    let map = |version, raw: &str| {
        cfaudit_actors::mapping::map_event(version, raw, stream, ingestion_time).unwrap()
    };
    let awkward = vec![
        map(
            ApiVersion::V1,
            r#"{"id":"v1-escapes","when":"2026-05-01T10:00:00.5Z","actor":{"email":"a\\b\tc\nd\re","ip":"2001:db8::1","type":"user"},"action":{"type":"zone_update","result":true},"resource":{"type":"zone","id":"\\N"},"metadata":{"zone_name":"example.com","path":"C:\\x","note":"tab\there, \"quoted\", \u00e9"}}"#,
        ),
        map(
            ApiVersion::V1,
            r#"{"id":"v1-sparse","when":"2026-05-01T10:00:01Z","actor":{"ip":"not an address"},"metadata":null}"#,
        ),
        map(
            ApiVersion::V2,
            r#"{"id":"v2-detail","action":{"time":"2026-05-01T10:00:02.000001Z","type":"update","result":"success","description":"line one\nline two"},"actor":{"id":"u1","email":"x@example.com","ip_address":"192.0.2.7","context":"api_token","token_id":"t1","token_name":"deploy\\bot"},"resource":{"product":"dns","scope":{"k":"v"}},"zone":{"id":"z1","name":"example.org"},"raw":{"method":"PATCH","uri":"/zones/z1?a=1&b=\\t","cf_ray_id":"ray","user_agent":"curl/8","status_code":200}}"#,
        ),
    ];
    let sentinel = map(
        ApiVersion::V1,
        r#"{"id":"sentinel","when":"2026-05-01T09:00:00Z"}"#,
    );
    // Every column of every row but the sentinel, as PostgreSQL renders it.
    let stored = || async {
        let rows: Vec<(String,)> = sqlx::query_as(
            "SELECT to_jsonb(a)::text FROM audit_logs a WHERE event_id <> 'sentinel' ORDER BY event_id",
        )
        .fetch_all(pg.pool())
        .await
        .unwrap();
        rows.into_iter().map(|(row,)| row).collect::<Vec<_>>()
    };

    // All new: COPY.
    let copied = pg.copy_new_rows(Some(&fence), &awkward).await.unwrap();
    assert_eq!(copied, BulkWrite::Stored(3));
    let by_copy = stored().await;
    assert_eq!(by_copy.len(), 3);
    assert!(
        by_copy[0].contains(r#""actor_email": "a\\b\tc\nd\re""#),
        "{}",
        by_copy[0]
    );
    assert!(
        by_copy[0].contains(r#""resource_id": "\\N""#),
        "{}",
        by_copy[0]
    );
    assert!(
        by_copy[1].contains(r#""ip_address": null"#),
        "{}",
        by_copy[1]
    );
    assert!(by_copy[0].contains(r#""ingestion_time": "2026-06-01T00:00:00.123456+00:00""#));

    // The same rows by the upsert.
    sqlx::query("DELETE FROM audit_logs")
        .execute(pg.pool())
        .await
        .unwrap();
    let report = pg.upsert_rows(Some(&fence), &awkward).await.unwrap();
    assert_eq!((report.inserted, report.duplicates), (3, 0));
    assert_eq!(stored().await, by_copy);

    // With one row there already, the bulk path declines and the sink upserts, counting it.
    sqlx::query("DELETE FROM audit_logs")
        .execute(pg.pool())
        .await
        .unwrap();
    pg.write_rows(Some(&fence), std::slice::from_ref(&sentinel))
        .await
        .unwrap();
    let mut batch = awkward.clone();
    batch.push(sentinel.clone());
    let declined = pg.copy_new_rows(Some(&fence), &batch).await.unwrap();
    assert_eq!(declined, BulkWrite::Declined);
    let report = pg.write_rows(Some(&fence), &batch).await.unwrap();
    assert_eq!((report.inserted, report.duplicates), (3, 1));
    assert_eq!(stored().await, by_copy);

    // TimescaleDB: the rows in compressed chunks are found as present, and a new row COPYs
    // into a compressed chunk's day.
    let count = || async {
        let (rows,): (i64,) = sqlx::query_as("SELECT count(*) FROM audit_logs")
            .fetch_one(pg.pool())
            .await
            .unwrap();
        rows
    };
    if cluster == Cluster::Timescaledb {
        sqlx::raw_sql("SELECT compress_chunk(c) FROM show_chunks('audit_logs') c")
            .execute(pg.pool())
            .await
            .unwrap();
        let declined = pg.copy_new_rows(Some(&fence), &awkward).await.unwrap();
        assert_eq!(declined, BulkWrite::Declined);
        let late = map(
            ApiVersion::V1,
            r#"{"id":"late","when":"2026-05-01T10:30:00Z"}"#,
        );
        let copied = pg
            .copy_new_rows(Some(&fence), std::slice::from_ref(&late))
            .await
            .unwrap();
        assert_eq!(copied, BulkWrite::Stored(1));
        let mut batch = awkward.clone();
        batch.push(map(
            ApiVersion::V1,
            r#"{"id":"later","when":"2026-05-01T10:31:00Z"}"#,
        ));
        let report = pg.write_rows(Some(&fence), &batch).await.unwrap();
        assert_eq!((report.inserted, report.duplicates), (1, 3));
        assert_eq!(count().await, 6);
    }
    let rows_before = count().await;

    // A batch PostgreSQL refuses (an index row over its size limit; the id does not compress):
    // nothing of it stays, neither the COPY's rows nor the upsert's.
    let mut refused = vec![map(
        ApiVersion::V1,
        r#"{"id":"fine","when":"2026-05-01T11:00:00Z"}"#,
    )];
    let long_id: String = (0..600u128)
        .map(|i| {
            format!(
                "{:032x}",
                i.wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835)
            )
        })
        .collect();
    refused.push(map(
        ApiVersion::V1,
        &format!(r#"{{"id":"{long_id}","when":"2026-05-01T11:00:01Z"}}"#),
    ));
    let outcome = pg.write_rows(Some(&fence), &refused).await;
    assert!(
        matches!(outcome, Err(SinkError::Rejected(_))),
        "{outcome:?}"
    );
    assert_eq!(count().await, rows_before);

    // Under a lease that is not the stream's: refused, nothing stored.
    let stale = Fence {
        stream: stream.into(),
        lease: lease.token + 1,
    };
    let fresh = [map(
        ApiVersion::V1,
        r#"{"id":"fenced","when":"2026-05-01T12:00:00Z"}"#,
    )];
    let outcome = pg.write_rows(Some(&stale), &fresh).await;
    assert!(matches!(outcome, Err(SinkError::Fenced(_))), "{outcome:?}");
    assert_eq!(count().await, rows_before);

    // A write cut short inside the COPY (the writer's deadline, while another transaction's
    // row with the same key holds it) leaves the pool's connections sound: every later
    // statement reads its own reply.
    let other = db.pool().await;
    let mut holder = other.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO audit_logs (event_id, timestamp) VALUES ('held', '2026-05-01T13:00:00Z')",
    )
    .execute(&mut *holder)
    .await
    .unwrap();
    let held = [map(
        ApiVersion::V1,
        r#"{"id":"held","when":"2026-05-01T13:00:00Z"}"#,
    )];
    let cut = tokio::time::timeout(
        Duration::from_millis(500),
        pg.write_rows(Some(&fence), &held),
    )
    .await;
    assert!(cut.is_err(), "the COPY waits for the holder: {cut:?}");
    holder.rollback().await.unwrap();
    other.close().await;
    for minute in 0..10 {
        assert_eq!(count().await, rows_before + minute);
        let next = [map(
            ApiVersion::V1,
            &format!(r#"{{"id":"after-{minute}","when":"2026-05-01T14:{minute:02}:00Z"}}"#),
        )];
        let report = pg.write_rows(Some(&fence), &next).await.unwrap();
        assert_eq!((report.inserted, report.duplicates), (1, 0));
    }
    lease.release().await;
    pg.pool().close().await;
    db.drop_db().await;
}

on_both_clusters!(the_bulk_copy_and_the_upsert_store_the_same_rows);

/// A user-level event is visible in every account its user belongs to: one row for the
/// organisation, attributed to the account whose stream committed it, in PostgreSQL as in the
/// dataset, whatever order the two accounts' attempts wrote and committed in.
async fn an_event_two_accounts_see_is_one_row_of_the_account_that_committed_it(cluster: Cluster) {
    use cfaudit_actors::ports::{
        CheckpointStore, CommitRecord, CommittedState, Fence, RowSink, SinkError,
    };
    let test = "an_event_two_accounts_see_is_one_row_of_the_account_that_committed_it";
    let Some((db, pg)) = TestDb::migrated(cluster, test).await else {
        return;
    };
    let session = cfaudit::sinks::postgres::LeaseSession::open(&pg, "test")
        .await
        .unwrap();
    let at = |s: &str| DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc);
    let mut fences = BTreeMap::new();
    let mut leases = Vec::new();
    for account in ["accta", "acctb"] {
        let lease = session.try_lease(account).await.unwrap().unwrap();
        fences.insert(
            account,
            Fence {
                stream: account.into(),
                lease: lease.token,
            },
        );
        leases.push(lease);
    }
    let time_of = |account: &str| match account {
        "accta" => at("2026-06-01T00:00:00Z"),
        _ => at("2026-06-02T00:00:00Z"),
    };
    let row = |id: &str, account: &str| {
        let raw = format!(
            r#"{{"id":"{id}","when":"2026-05-01T00:00:00Z","resource":{{"type":"user"}}}}"#
        );
        cfaudit_actors::mapping::map_v1(&raw, account, time_of(account)).unwrap()
    };
    let mut seqs: BTreeMap<&str, u64> = BTreeMap::new();
    let commit = |account: &'static str, id: &str, seq: u64| CommitRecord {
        fence: fences[account].clone(),
        previous_commit_seq: seq - 1,
        state: CommittedState {
            checkpoint: Some(at("2026-05-01T00:00:00Z")),
            commit_seq: seq,
            ..CommittedState::default()
        },
        events: vec![cfaudit_actors::SeenId {
            id: id.into(),
            when: at("2026-05-01T00:00:00Z"),
        }],
        ingestion_time: Some(time_of(account)),
        dead_letters: vec![],
        files: vec![],
    };
    // For each event: both accounts write it, `first` commits it, the other is refused.
    for (id, first, second) in [("e1", "acctb", "accta"), ("e2", "accta", "acctb")] {
        pg.write_rows(Some(&fences["accta"]), &[row(id, "accta")])
            .await
            .unwrap();
        pg.write_rows(Some(&fences["acctb"]), &[row(id, "acctb")])
            .await
            .unwrap();
        let seq = *seqs.entry(first).and_modify(|s| *s += 1).or_insert(1);
        pg.commit(&commit(first, id, seq)).await.unwrap();
        let next = seqs.get(second).copied().unwrap_or(0) + 1;
        let refused = pg.commit(&commit(second, id, next)).await;
        assert!(
            matches!(refused, Err(SinkError::Conflict(_))),
            "{refused:?}"
        );
        // The refused account's next attempt writes it again: the committed row stays.
        pg.write_rows(Some(&fences[second]), &[row(id, second)])
            .await
            .unwrap();
        let (account, ingestion_time, rows): (String, DateTime<Utc>, i64) = sqlx::query_as(
            "SELECT min(account_id), min(ingestion_time), count(*) FROM audit_logs WHERE event_id = $1",
        )
        .bind(id)
        .fetch_one(pg.pool())
        .await
        .unwrap();
        assert_eq!(rows, 1, "{id}: one row for the organisation");
        assert_eq!(
            (account.as_str(), ingestion_time),
            (first, time_of(first)),
            "{id}: the row is the committing account's, as its Parquet file says"
        );
        let (indexed_by,): (String,) =
            sqlx::query_as("SELECT stream FROM cfaudit_lake_events WHERE event_id = $1")
                .bind(id)
                .fetch_one(pg.pool())
                .await
                .unwrap();
        assert_eq!(indexed_by, first, "{id}");
    }
    for lease in leases {
        lease.release().await;
    }
    session.close().await;
    pg.pool().close().await;
    db.drop_db().await;
}

on_both_clusters!(an_event_two_accounts_see_is_one_row_of_the_account_that_committed_it);

/// A process cut off from the database (its lease session killed by the server, as after a
/// partition) loses its stream to another process: from then on its writes and commits are
/// refused by the fence, and its session reports the lease lost instead of taking it again.
async fn a_process_cut_off_from_the_database_cannot_write_or_commit_after_a_takeover(
    cluster: Cluster,
) {
    use cfaudit::sinks::postgres::LeaseSession;
    use cfaudit_actors::ports::{
        CheckpointStore, CommitRecord, CommittedState, Fence, RowSink, SinkError,
    };
    let test = "a_process_cut_off_from_the_database_cannot_write_or_commit_after_a_takeover";
    let Some((db, pg)) = TestDb::migrated(cluster, test).await else {
        return;
    };
    let stream = "acctpartition";
    let cut_off = LeaseSession::open(&pg, "cut-off").await.unwrap();
    let mut old = cut_off.try_lease(stream).await.unwrap().unwrap();
    // The server drops the session, as it does when keepalives fail across a partition.
    let (killed,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE application_name = 'cfaudit leases' AND datname = current_database()) k",
    )
    .fetch_one(pg.pool())
    .await
    .unwrap();
    assert_eq!(killed, 1);
    let other = LeaseSession::open(&pg, "other").await.unwrap();
    let new = other.try_lease(stream).await.unwrap().unwrap();
    assert!(new.token > old.token);

    let at = DateTime::parse_from_rfc3339("2026-05-01T00:00:00Z")
        .unwrap()
        .with_timezone(&Utc);
    let raw = r#"{"id":"late","when":"2026-05-01T00:00:00Z"}"#;
    let row = cfaudit_actors::mapping::map_v1(raw, stream, at).unwrap();
    let fence = Fence {
        stream: stream.into(),
        lease: old.token,
    };
    let written = pg.write_rows(Some(&fence), &[row]).await;
    assert!(matches!(written, Err(SinkError::Fenced(_))), "{written:?}");
    let committed = pg
        .commit(&CommitRecord {
            fence,
            previous_commit_seq: 0,
            state: CommittedState {
                checkpoint: Some(at),
                commit_seq: 1,
                ..CommittedState::default()
            },
            events: vec![cfaudit_actors::SeenId {
                id: "late".into(),
                when: at,
            }],
            ingestion_time: Some(at),
            dead_letters: vec![],
            files: vec![],
        })
        .await;
    assert!(
        matches!(committed, Err(SinkError::Fenced(_))),
        "{committed:?}"
    );
    assert_eq!(count(pg.pool(), "SELECT count(*) FROM audit_logs").await, 0);
    assert_eq!(
        count(pg.pool(), "SELECT count(*) FROM cfaudit_lake_events").await,
        0
    );
    // Its session comes back, finds the token moved and reports the stream lost.
    let lost = tokio::time::timeout(Duration::from_secs(20), old.lost())
        .await
        .expect("the cut-off session noticed within 20 s");
    assert!(lost.contains("taken over"), "{lost}");
    new.release().await;
    other.close().await;
    cut_off.close().await;
    pg.pool().close().await;
    db.drop_db().await;
}

on_both_clusters!(a_process_cut_off_from_the_database_cannot_write_or_commit_after_a_takeover);
