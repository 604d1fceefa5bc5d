//! `audit_logs` rows in the text format of `COPY ... FROM STDIN`: the bulk path of the row
//! sink, at the speed of PostgreSQL's own bulk load. Values are spelled as the row sink's
//! INSERT binds them (timestamps truncated to microseconds, addresses as hosts), so a row
//! stored either way is the same row.

use std::io::Write;

use cfaudit_actors::AuditRow;
use chrono::{DateTime, Utc};

use crate::sinks::dataset::DETAIL_TEXT;

/// The columns of `audit_logs` cfaudit writes, in the order the INSERT and the COPY name them
/// and [`encode_row`] writes them: the core columns, the detail columns in [`DETAIL_TEXT`]'s
/// order, then `raw_status_code`.
macro_rules! audit_columns {
    () => {
        "event_id, timestamp, account_id, actor_email, actor_type, action_type, action_result, \
         resource_type, resource_id, ip_address, metadata, raw_event, ingestion_time, api_version, \
         actor_id, actor_context, actor_token_id, actor_token_name, action_description, \
         resource_product, resource_scope, zone_id, zone_name, raw_method, raw_uri, raw_cf_ray_id, \
         raw_user_agent, raw_status_code"
    };
}
pub(super) use audit_columns;

/// The statement the rows of [`encode_row`] are sent to.
pub(super) const COPY_AUDIT_LOGS: &str =
    concat!("COPY audit_logs (", audit_columns!(), ") FROM STDIN");

/// Appends one row, one line, to `out`.
pub(super) fn encode_row(row: &AuditRow, out: &mut Vec<u8>) {
    text(out, Some(&row.event_id));
    out.push(b'\t');
    time(out, row.timestamp);
    out.push(b'\t');
    for value in [
        Some(row.account_id.as_str()),
        row.actor_email.as_deref(),
        row.actor_type.as_deref(),
        row.action_type.as_deref(),
        row.action_result.as_deref(),
        row.resource_type.as_deref(),
        row.resource_id.as_deref(),
    ] {
        text(out, value);
        out.push(b'\t');
    }
    match row.ip_address {
        Some(ip) => write!(out, "{ip}").expect("writing to a Vec"),
        None => out.extend_from_slice(NULL),
    }
    out.push(b'\t');
    text(out, row.metadata.as_deref());
    out.push(b'\t');
    text(out, Some(&row.raw_event));
    out.push(b'\t');
    time(out, row.ingestion_time);
    out.push(b'\t');
    text(out, Some(row.api_version.as_str()));
    for (_, field, _) in DETAIL_TEXT {
        out.push(b'\t');
        text(out, field(&row.detail));
    }
    out.push(b'\t');
    match row.detail.raw_status_code {
        Some(code) => write!(out, "{code}").expect("writing to a Vec"),
        None => out.extend_from_slice(NULL),
    }
    out.push(b'\n');
}

/// COPY's text format's NULL.
const NULL: &[u8] = b"\\N";

/// A text value with the four characters the format gives a meaning escaped. A NUL stays as
/// it is: PostgreSQL refuses it in text, as it refuses it bound to the INSERT.
fn text(out: &mut Vec<u8>, value: Option<&str>) {
    let Some(value) = value else {
        out.extend_from_slice(NULL);
        return;
    };
    // Copied a run at a time between the bytes to escape: pushed one byte at a time, this was
    // the largest share of cfaudit's CPU after compression (the raw events are most of a row).
    let bytes = value.as_bytes();
    let mut copied = 0;
    for (at, &byte) in bytes.iter().enumerate() {
        let escaped: &[u8] = match byte {
            b'\\' => b"\\\\",
            b'\t' => b"\\t",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            _ => continue,
        };
        out.extend_from_slice(&bytes[copied..at]);
        out.extend_from_slice(escaped);
        copied = at + 1;
    }
    out.extend_from_slice(&bytes[copied..]);
}

/// Microseconds as the INSERT's binding counts them (a different value would be another key):
/// since 2000-01-01, truncated toward zero, so a time before 2000 rounds up; UTC.
fn time(out: &mut Vec<u8>, at: DateTime<Utc>) {
    let epoch = DateTime::<Utc>::from_timestamp(POSTGRES_EPOCH, 0).expect("a valid time");
    let at = (at - epoch)
        .num_microseconds()
        .map_or(at, |micros| epoch + chrono::Duration::microseconds(micros));
    write!(out, "{}", at.format_with_items(TIME_FORMAT.iter())).expect("writing to a Vec");
}

/// The text of a `timestamptz`, parsed once: `format` with the string parses it at every call,
/// two per row (a sixth of the row's encoding in a profile).
static TIME_FORMAT: std::sync::LazyLock<Vec<chrono::format::Item<'static>>> =
    std::sync::LazyLock::new(|| {
        chrono::format::StrftimeItems::new("%Y-%m-%d %H:%M:%S%.6f+00")
            .parse_to_owned()
            .expect("a valid format")
    });

/// 2000-01-01T00:00:00Z in Unix seconds, PostgreSQL's epoch.
const POSTGRES_EPOCH: i64 = 946_684_800;

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use cfaudit_actors::{ApiVersion, EventDetail};
    use chrono::TimeZone;

    use super::*;

    fn row() -> AuditRow {
        AuditRow {
            event_id: "id\\1".into(),
            timestamp: Utc.with_ymd_and_hms(2026, 5, 1, 10, 0, 0).unwrap()
                + chrono::Duration::nanoseconds(123_456_789),
            account_id: "acc".into(),
            api_version: ApiVersion::V2,
            actor_email: Some("\ta\tb\nc\rd\\".into()),
            actor_type: None,
            action_type: Some("login".into()),
            action_result: None,
            resource_type: None,
            resource_id: Some("\\N".into()),
            ip_address: Some("2001:db8::1".parse().unwrap()),
            metadata: None,
            detail: EventDetail {
                zone_name: Some("example.com".into()),
                raw_status_code: Some(200),
                ..EventDetail::default()
            },
            raw_event: Arc::from("{\"a\":\"x\\\\y\"}"),
            ingestion_time: Utc.with_ymd_and_hms(1999, 12, 31, 23, 59, 58).unwrap()
                + chrono::Duration::nanoseconds(999),
        }
    }

    #[test]
    fn a_row_is_one_line_of_escaped_fields_in_the_columns_order() {
        let mut out = Vec::new();
        encode_row(&row(), &mut out);
        let line = String::from_utf8(out).unwrap();
        let fields: Vec<&str> = line.strip_suffix('\n').unwrap().split('\t').collect();
        let columns: Vec<&str> = audit_columns!().split(", ").collect();
        assert_eq!(fields.len(), columns.len());
        let at = |name: &str| fields[columns.iter().position(|c| *c == name).unwrap()];
        assert_eq!(at("event_id"), "id\\\\1");
        // Truncated, not rounded: 123,456,789 ns is 123,456 µs.
        assert_eq!(at("timestamp"), "2026-05-01 10:00:00.123456+00");
        assert_eq!(at("actor_email"), "\\ta\\tb\\nc\\rd\\\\");
        assert_eq!(at("actor_type"), "\\N");
        // Data that reads like NULL is escaped into text.
        assert_eq!(at("resource_id"), "\\\\N");
        assert_eq!(at("ip_address"), "2001:db8::1");
        assert_eq!(at("raw_event"), "{\"a\":\"x\\\\\\\\y\"}");
        // Before 2000 the binding's truncation toward zero rounds up.
        assert_eq!(at("ingestion_time"), "1999-12-31 23:59:58.000001+00");
        assert_eq!(at("api_version"), "v2");
        assert_eq!(at("zone_name"), "example.com");
        assert_eq!(at("raw_status_code"), "200");
    }

    #[test]
    fn the_columns_are_the_core_ones_then_the_details_then_the_status_code() {
        let columns: Vec<&str> = audit_columns!().split(", ").collect();
        let details: Vec<&str> = DETAIL_TEXT.iter().map(|(name, _, _)| *name).collect();
        assert_eq!(columns[14..27], details[..]);
        assert_eq!(columns[27], "raw_status_code");
    }
}
