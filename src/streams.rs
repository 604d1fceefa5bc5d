//! Streams: the ranges of one account's audit log of one API version that cfaudit collects,
//! each with its own checkpoint row. The live stream (key: [`live_key`], the account id for v1)
//! covers `[start, ∞)`; each `cfaudit backfill` covers an explicit `[since, until)` under its
//! own key. Streams of one log never overlap and never read outside their range (the Poller
//! clamps the safety lag to the stream's start), so no event is fetched by two streams and the
//! Parquet dataset, which has no primary key, holds each event once. The two versions are
//! different record sets (their ids differ), each with streams of its own.

use cfaudit_actors::ApiVersion;
use chrono::{DateTime, Utc};
use serde::Serialize;

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

    /// The account the stream collects.
    pub fn account(&self) -> &str {
        account_of(&self.key)
    }

    /// The API the stream reads: v2 keys carry `.v2` after the account (see [`live_key`]).
    pub fn api_version(&self) -> ApiVersion {
        match self.key.split('.').nth(1) {
            Some("v2") => ApiVersion::V2,
            _ => ApiVersion::V1,
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

/// The account a stream key belongs to: what comes before its first `.`.
pub fn account_of(key: &str) -> &str {
    key.split('.').next().unwrap_or(key)
}

/// The key of an account's live stream of one API version: the account id for v1 (as before
/// v2 was collected), `<account>.v2` for v2. Every other stream of that log starts with it.
pub fn live_key(account_id: &str, api_version: ApiVersion) -> String {
    match api_version {
        ApiVersion::V1 => account_id.to_owned(),
        ApiVersion::V2 => format!("{account_id}.v2"),
    }
}

/// The key of a backfill's stream: [`backfill_key_prefix`] and the range. Account ids are
/// alphanumeric and the times carry no `-`, so keys never contain one (staged file names rely
/// on that, see `staged_prefix`), and the account is what comes before the first `.` (the SQL
/// of the PostgreSQL adapter relies on that).
pub fn backfill_key(live_key: &str, since: DateTime<Utc>, until: DateTime<Utc>) -> String {
    const COMPACT: &str = "%Y%m%dT%H%M%SZ";
    format!(
        "{}{}_{}",
        backfill_key_prefix(live_key),
        since.format(COMPACT),
        until.format(COMPACT)
    )
}

/// What every backfill key of the log whose live stream is `live_key` starts with.
pub fn backfill_key_prefix(live_key: &str) -> String {
    format!("{live_key}.backfill.")
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

    /// Each version's keys tell their account and version; v1's are those from before v2.
    #[test]
    fn keys_tell_account_and_version() {
        for version in [ApiVersion::V1, ApiVersion::V2] {
            let live = live_key("0123abcd", version);
            for key in [live.clone(), backfill_key(&live, at(1), at(2))] {
                let stream = Stream {
                    key: key.clone(),
                    ..stream(None, None)
                };
                assert_eq!(stream.account(), "0123abcd", "{key}");
                assert_eq!(stream.api_version(), version, "{key}");
                assert!(!key.contains('-'));
            }
        }
        assert_eq!(live_key("0123abcd", ApiVersion::V1), "0123abcd");
        assert!(!backfill_key("0123abcd", at(1), at(2))
            .starts_with(&live_key("0123abcd", ApiVersion::V2)));
    }
}
