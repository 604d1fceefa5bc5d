//! Exactly once on real object storage: a real S3-compatible server (s3s-fs, signatures
//! checked) and the local filesystem, with the process aborted at every crash point of the
//! commit protocol (failpoints): between "staged" and "committed", "committed" and
//! "published", "published" and "marked", between two files of a publish, between the copy
//! and the delete of a file, and during start-up recovery; then restarted.

use crate::common::*;
use cfaudit_actors::failpoints::{
    BETWEEN_DISCARDED_FILES, BETWEEN_PUBLISHED_FILES, COMMITTED_NOT_PUBLISHED, COPIED_NOT_DELETED,
    PUBLISHED_NOT_MARKED, RECOVERED_NOT_MARKED, STAGED_NOT_COMMITTED,
};

#[actix_web::test]
async fn an_s3_backfill_lands_exactly_once_and_leaves_nothing_in_staging() {
    let mut config = emulator_config(12_000);
    config.invalid_every = 1000;
    let mut h = Harness::with_s3(config).await;
    h.set("BATCH_MAX_EVENTS", "3000");
    let first = run_once(h.config()).await.unwrap();
    assert_eq!(first.parquet_rows, 12_000 - 12);
    let counts = h.assert_exact().await;
    assert_eq!(counts["staged_orphans"], 0, "{counts}");
    assert_eq!(
        counts["other_objects"], 0,
        "only Parquet files under the dataset root: {counts}"
    );
    let files = counts["files"].clone();
    run_once(h.config()).await.unwrap();
    let counts = h.assert_exact().await;
    assert_eq!(counts["files"], files, "a second run writes nothing");
    h.finish().await;
}

#[actix_web::test]
async fn a_wrong_s3_secret_fails_clearly_and_never_shows_the_secret() {
    let mut h = Harness::with_s3(emulator_config(500)).await;
    h.set("AWS_SECRET_ACCESS_KEY", "wrong-secret-7a1c9e");
    h.set("ONCE_MAX_ATTEMPTS", "2");
    let error = format!("{:#}", run_once(h.config()).await.unwrap_err());
    assert!(
        error.contains("attempts in a row failed") && error.contains("parquet"),
        "{error}"
    );
    assert!(
        !error.contains("wrong-secret-7a1c9e") && !error.contains(S3_SECRET_KEY),
        "{error}"
    );
    assert!(
        !format!("{:?}", h.config()).contains("wrong-secret-7a1c9e"),
        "the config's Debug shows the secret"
    );
    h.finish().await;
}

/// Aborts the real binary at `failpoint` during its third commit that carries files, checks
/// the crash left the state it should, restarts, and counts.
async fn crash_and_recover(mut h: Harness, failpoint: &str) {
    h.set("CLOUDFLARE_PER_PAGE", "500");
    h.set("BATCH_MAX_EVENTS", "500");
    let migrate = tokio::process::Command::new(env!("CARGO_BIN_EXE_cfaudit"))
        .arg("migrate")
        .envs(h.env.iter().cloned())
        .output()
        .await
        .unwrap();
    assert!(migrate.status.success());

    let mut crashing = h.env.clone();
    set(
        &mut crashing,
        "FAILPOINTS",
        &format!("{failpoint}=2*off->return"),
    );
    let crashed = tokio::process::Command::new(env!("CARGO_BIN_EXE_cfaudit"))
        .args(["run", "--once"])
        .envs(crashing)
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&crashed.stderr);
    assert!(
        !crashed.status.success() && stderr.contains(&format!("failpoint {failpoint}")),
        "the run did not abort at {failpoint}; the crash hooks exist only with --features failpoints \
         (make test sets it). stderr: {stderr}"
    );

    let pool = h.db.pool().await;
    let (files, unpublished): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE published_at IS NULL) FROM cfaudit_parquet_files",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let counts = h.parquet_counts(false);
    if failpoint == STAGED_NOT_COMMITTED {
        assert!(
            counts["staged_orphans"].as_i64().unwrap() > 0,
            "the crash left staged files: {counts}"
        );
        assert_eq!(unpublished, 0);
        assert_eq!(
            counts["files"].as_i64().unwrap(),
            files,
            "only committed files are visible"
        );
    } else {
        assert!(
            unpublished > 0,
            "the crash left committed files unpublished"
        );
        assert_eq!(
            counts["files"].as_i64().unwrap(),
            files - unpublished,
            "unpublished files are not visible"
        );
    }

    let restarted = tokio::process::Command::new(env!("CARGO_BIN_EXE_cfaudit"))
        .args(["run", "--once"])
        .envs(h.env.iter().cloned())
        .output()
        .await
        .unwrap();
    assert!(
        restarted.status.success(),
        "{}",
        String::from_utf8_lossy(&restarted.stderr)
    );
    let counts = h.assert_exact().await;
    assert_eq!(counts["staged_orphans"], 0, "{counts}");
    let unpublished = unpublished_files(&pool).await;
    assert_eq!(unpublished, 0);
    pool.close().await;
    h.finish().await;
}

#[actix_web::test]
async fn s3_crash_between_staged_and_committed() {
    crash_and_recover(
        Harness::with_s3(emulator_config(6_000)).await,
        STAGED_NOT_COMMITTED,
    )
    .await;
}

#[actix_web::test]
async fn s3_crash_between_committed_and_published() {
    crash_and_recover(
        Harness::with_s3(emulator_config(6_000)).await,
        COMMITTED_NOT_PUBLISHED,
    )
    .await;
}

#[actix_web::test]
async fn local_crash_between_staged_and_committed() {
    crash_and_recover(
        Harness::new(emulator_config(6_000)).await,
        STAGED_NOT_COMMITTED,
    )
    .await;
}

#[actix_web::test]
async fn local_crash_between_committed_and_published() {
    crash_and_recover(
        Harness::new(emulator_config(6_000)).await,
        COMMITTED_NOT_PUBLISHED,
    )
    .await;
}

/// Runs `run --once` once per `(failpoint, spec)`, each of which must abort the process at that
/// point; after every crash the dataset shows committed files only. Then runs without
/// failpoints and counts: exact, no staged file left, every committed file published.
async fn crash_in_turn_then_recover(mut h: Harness, crashes: &[(&str, &str)]) {
    h.set("CLOUDFLARE_PER_PAGE", "500");
    h.set("BATCH_MAX_EVENTS", "500");
    assert!(finish(cfaudit(&["migrate"], &h.env)).await.success);
    let pool = h.db.pool().await;
    let committed_files = || async {
        let files = count(&pool, "SELECT count(*) FROM cfaudit_parquet_files").await;
        files
    };
    for (failpoint, spec) in crashes {
        let mut crashing = h.env.clone();
        set(&mut crashing, "FAILPOINTS", &format!("{failpoint}={spec}"));
        let crashed = finish(cfaudit(&["run", "--once"], &crashing)).await;
        assert!(
            !crashed.success && crashed.stderr.contains(&format!("failpoint {failpoint}")),
            "the run did not abort at {failpoint} ({spec}); stderr: {}",
            crashed.stderr
        );
        let counts = h.parquet_counts(false);
        assert!(
            counts["files"].as_i64().unwrap() <= committed_files().await,
            "after a crash at {failpoint}, a file no commit names is visible: {counts}"
        );
    }
    let clean = finish(cfaudit(&["run", "--once"], &h.env)).await;
    assert!(clean.success, "{}", clean.stderr);
    let counts = h.assert_exact().await;
    assert_eq!(counts["staged_orphans"], 0, "{counts}");
    assert_eq!(counts["files"].as_i64().unwrap(), committed_files().await);
    let unpublished = unpublished_files(&pool).await;
    assert_eq!(unpublished, 0);
    pool.close().await;
    h.finish().await;
}

/// Every crash point after the commit, in a commit and in the start-up recovery that
/// follows one: each batch of 500 events spans several days, so each commit has several files.
async fn every_later_crash_point(
    lake: impl Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = Harness>>>,
) {
    let third = "2*off->return";
    crash_in_turn_then_recover(lake().await, &[(PUBLISHED_NOT_MARKED, third)]).await;
    crash_in_turn_then_recover(lake().await, &[(BETWEEN_PUBLISHED_FILES, third)]).await;
    crash_in_turn_then_recover(lake().await, &[(COPIED_NOT_DELETED, third)]).await;
    // Recovery publishes what the first crash left, and crashes before it marks them.
    crash_in_turn_then_recover(
        lake().await,
        &[
            (COMMITTED_NOT_PUBLISHED, third),
            (RECOVERED_NOT_MARKED, "return"),
        ],
    )
    .await;
    // Recovery crashes between the copy and the delete of a file it publishes.
    crash_in_turn_then_recover(
        lake().await,
        &[
            (COMMITTED_NOT_PUBLISHED, third),
            (COPIED_NOT_DELETED, "return"),
        ],
    )
    .await;
    // Recovery crashes part-way through deleting the staged files of an uncommitted batch.
    crash_in_turn_then_recover(
        lake().await,
        &[
            (STAGED_NOT_COMMITTED, third),
            (BETWEEN_DISCARDED_FILES, "return"),
        ],
    )
    .await;
}

#[actix_web::test]
async fn s3_crashes_at_every_later_crash_point_and_in_recovery_end_exact() {
    every_later_crash_point(|| Box::pin(Harness::with_s3(emulator_config(6_000)))).await;
}

#[actix_web::test]
async fn local_crashes_at_every_later_crash_point_and_in_recovery_end_exact() {
    every_later_crash_point(|| Box::pin(Harness::new(emulator_config(6_000)))).await;
}
