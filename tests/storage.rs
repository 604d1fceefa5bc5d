//! Exactly once on real object storage: a real S3-compatible server (s3s-fs, signatures
//! checked) and the local filesystem, with the process aborted between "staged" and
//! "committed" and between "committed" and "published" (failpoints), then restarted.

mod common;

use cfaudit_actors::failpoints::{COMMITTED_NOT_PUBLISHED, STAGED_NOT_COMMITTED};
use common::*;

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
    let (unpublished,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM cfaudit_parquet_files WHERE published_at IS NULL")
            .fetch_one(&pool)
            .await
            .unwrap();
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
