//! Streams: the ranges of one account's audit log that cfaudit collects, each with its own
//! checkpoint row. The live stream (key = the account id) covers `[start, ∞)`; each
//! `cfaudit backfill` covers an explicit `[since, until)` under its own key. Streams of one
//! account never overlap and never read outside their range (the Poller clamps the safety lag
//! to the stream's start), so no event is fetched by two streams and the Parquet dataset,
//! which has no primary key, holds each event once.

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::postgres::Postgres;

/// One stream as stored in `cfaudit_checkpoints`.
#[derive(Clone, Debug, PartialEq, Serialize, sqlx::FromRow)]
pub struct Stream {
    /// `account_id` column: the account for the live stream, a backfill key otherwise.
    #[sqlx(rename = "account_id")]
    pub key: String,
    pub covers_since: Option<DateTime<Utc>>,
    pub covers_until: Option<DateTime<Utc>>,
    pub checkpoint: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
}

impl Stream {
    /// Whether `[since, until)` shares an instant with what this stream covers. A stream
    /// without a start covers nothing yet.
    pub fn overlaps(&self, since: DateTime<Utc>, until: DateTime<Utc>) -> bool {
        match self.covers_since {
            None => false,
            Some(start) => start < until && self.covers_until.is_none_or(|end| since < end),
        }
    }

    pub fn is_live(&self) -> bool {
        self.covers_until.is_none()
    }

    /// The coverage as text for messages: `[since, until)`.
    pub fn range(&self) -> String {
        let show = |t: Option<DateTime<Utc>>| t.map_or("…".to_owned(), |t| t.to_rfc3339());
        format!("[{}, {})", show(self.covers_since), show(self.covers_until))
    }
}

/// The key of a backfill's stream. Account ids are alphanumeric and the times carry no `-`,
/// so keys never contain one (staged file names rely on that, see `staged_prefix`).
pub fn backfill_key(account_id: &str, since: DateTime<Utc>, until: DateTime<Utc>) -> String {
    const COMPACT: &str = "%Y%m%dT%H%M%SZ";
    format!(
        "{account_id}.backfill.{}_{}",
        since.format(COMPACT),
        until.format(COMPACT)
    )
}

/// Where the live stream starts: `wanted` (INITIAL_CHECKPOINT or one poll interval ago),
/// moved past every backfill that ends after it, so the two never fetch the same event.
pub fn live_start(wanted: DateTime<Utc>, streams: &[Stream]) -> DateTime<Utc> {
    streams
        .iter()
        .filter_map(|s| s.covers_until)
        .filter(|&end| end > wanted)
        .max()
        .unwrap_or(wanted)
}

/// Every stream of an account: its live stream and its backfills.
const ACCOUNT_STREAMS: &str =
    "SELECT account_id, covers_since, covers_until, checkpoint, completed_at \
     FROM cfaudit_checkpoints \
     WHERE account_id = $1 OR account_id LIKE $1 || '.backfill.%' \
     ORDER BY covers_since NULLS FIRST, account_id";

impl Postgres {
    /// Every stream of the account (the live one and its backfills).
    pub async fn streams(&self, account_id: &str) -> anyhow::Result<Vec<Stream>> {
        Ok(sqlx::query_as(ACCOUNT_STREAMS)
            .bind(account_id)
            .fetch_all(self.pool())
            .await?)
    }

    /// Registers a stream, deciding its range from the account's other streams under a lock,
    /// so a backfill and a starting service cannot both claim the same range. `plan` gets the
    /// account's streams and returns the new stream's `(key, since, until)` or an error.
    /// An existing stream keeps its range once it has committed something.
    pub async fn register_stream(
        &self,
        account_id: &str,
        plan: impl FnOnce(&[Stream]) -> anyhow::Result<(String, DateTime<Utc>, Option<DateTime<Utc>>)>,
    ) -> anyhow::Result<Stream> {
        let mut tx = self.pool().begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('cfaudit.streams.' || $1))")
            .bind(account_id)
            .execute(&mut *tx)
            .await?;
        let streams: Vec<Stream> = sqlx::query_as(ACCOUNT_STREAMS)
            .bind(account_id)
            .fetch_all(&mut *tx)
            .await?;
        let (key, since, until) = plan(&streams)?;
        let stream: Stream = sqlx::query_as(
            "INSERT INTO cfaudit_checkpoints (account_id, covers_since, covers_until) \
             VALUES ($1, $2, $3) \
             ON CONFLICT (account_id) DO UPDATE \
               SET covers_since = CASE WHEN cfaudit_checkpoints.checkpoint IS NULL \
                                       THEN EXCLUDED.covers_since \
                                       ELSE cfaudit_checkpoints.covers_since END \
             RETURNING account_id, covers_since, covers_until, checkpoint, completed_at",
        )
        .bind(&key)
        .bind(since)
        .bind(until)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(stream)
    }

    /// Records that a sweep of the stream finished with everything committed.
    pub async fn record_sweep(&self, key: &str) -> anyhow::Result<()> {
        sqlx::query("UPDATE cfaudit_checkpoints SET last_sweep_at = now() WHERE account_id = $1")
            .bind(key)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    /// Marks a bounded stream as having committed its whole range; refused unless a sweep
    /// of it reached the range's end (`swept_until`), whatever ended the run.
    pub async fn complete_stream(&self, key: &str) -> anyhow::Result<()> {
        let completed = sqlx::query(
            "UPDATE cfaudit_checkpoints SET completed_at = now() \
             WHERE account_id = $1 AND covers_until IS NOT NULL AND swept_until >= covers_until",
        )
        .bind(key)
        .execute(self.pool())
        .await?;
        anyhow::ensure!(
            completed.rows_affected() == 1,
            "stream {key} is not collected to its end yet; run the same command again to continue"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(day: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, day, 0, 0, 0).unwrap()
    }

    fn stream(since: Option<u32>, until: Option<u32>) -> Stream {
        Stream {
            key: "k".into(),
            covers_since: since.map(at),
            covers_until: until.map(at),
            checkpoint: None,
            completed_at: None,
        }
    }

    #[test]
    fn ranges_are_half_open() {
        let backfill = stream(Some(10), Some(20));
        assert!(!backfill.overlaps(at(20), at(25)), "adjacent after");
        assert!(!backfill.overlaps(at(5), at(10)), "adjacent before");
        assert!(backfill.overlaps(at(19), at(21)));
        assert!(backfill.overlaps(at(1), at(30)), "containing");
        let live = stream(Some(10), None);
        assert!(live.overlaps(at(25), at(26)));
        assert!(!live.overlaps(at(1), at(10)));
        assert!(
            !stream(None, None).overlaps(at(1), at(30)),
            "no start: covers nothing"
        );
    }

    #[test]
    fn the_live_stream_starts_after_the_latest_backfill() {
        let backfills = [stream(Some(1), Some(10)), stream(Some(10), Some(15))];
        assert_eq!(live_start(at(12), &backfills), at(15));
        assert_eq!(live_start(at(20), &backfills), at(20));
    }

    #[test]
    fn keys_carry_no_dash() {
        let key = backfill_key("0123abcd", at(1), at(2));
        assert_eq!(key, "0123abcd.backfill.20260101T000000Z_20260102T000000Z");
        assert!(!key.contains('-'));
    }
}
