//! A raw event of either API version → [`AuditRow`]. Pure and total: every input yields a row
//! or a dead-letter reason, never a panic.

use std::borrow::Cow;
use std::sync::Arc;

use chrono::{DateTime, SubsecRound, Utc};
use serde_json::{Map, Value};

use crate::event::{ApiVersion, AuditRow, DeadLetter, EventDetail};

/// Why an event could not be mapped. The text lands in the dead-letter table.
pub type Rejection = String;

/// Maps one raw event of `version`. `account_id` is the account of the request path. The core
/// columns mean the same for both versions and are read from fields of the same names; only
/// the event's time, the actor's address field and the detail columns differ.
pub fn map_event(
    version: ApiVersion,
    raw: &str,
    account_id: &str,
    ingestion_time: DateTime<Utc>,
) -> Result<AuditRow, Rejection> {
    let (raw, event) = parse(raw)?;
    let event_id = event_id(&event)?;
    let (time, time_field, ip_field) = match version {
        ApiVersion::V1 => (event.get("when"), "`when`", "ip"),
        ApiVersion::V2 => (
            event.get("action").and_then(|a| a.get("time")),
            "`action.time`",
            "ip_address",
        ),
    };
    let timestamp = match time {
        Some(Value::String(time)) => parse_when(time)?,
        None | Some(Value::Null) => return Err(format!("{time_field} is missing")),
        Some(other) => {
            return Err(format!(
                "{time_field} is {} instead of a string",
                kind(other)
            ))
        }
    };
    let (metadata, detail) = match version {
        ApiVersion::V1 => (
            event
                .get("metadata")
                .filter(|m| !m.is_null())
                .map(Value::to_string),
            detail_v1(&event),
        ),
        ApiVersion::V2 => (None, detail_v2(&event)),
    };
    Ok(AuditRow {
        event_id,
        timestamp,
        account_id: account_id.to_owned(),
        api_version: version,
        actor_email: text_at(&event, "actor", "email"),
        actor_type: text_at(&event, "actor", "type"),
        action_type: text_at(&event, "action", "type"),
        action_result: text_at(&event, "action", "result"),
        resource_type: text_at(&event, "resource", "type"),
        resource_id: text_at(&event, "resource", "id"),
        ip_address: text_at(&event, "actor", ip_field).and_then(|ip| ip.trim().parse().ok()),
        metadata,
        detail,
        raw_event: Arc::from(raw.as_ref()),
        ingestion_time,
    })
}

/// Maps one raw v1 event. `account_id` is the account of the request path.
pub fn map_v1(
    raw: &str,
    account_id: &str,
    ingestion_time: DateTime<Utc>,
) -> Result<AuditRow, Rejection> {
    map_event(ApiVersion::V1, raw, account_id, ingestion_time)
}

/// Maps one raw v2 event. `account_id` is the account of the request path.
pub fn map_v2(
    raw: &str,
    account_id: &str,
    ingestion_time: DateTime<Utc>,
) -> Result<AuditRow, Rejection> {
    map_event(ApiVersion::V2, raw, account_id, ingestion_time)
}

/// v1 fills the detail columns it has: the actor's id and `metadata.zone_name`.
fn detail_v1(event: &Map<String, Value>) -> EventDetail {
    let zone_name = match event.get("metadata").and_then(|m| m.get("zone_name")) {
        Some(Value::String(name)) if !name.is_empty() => Some(name.clone()),
        _ => None,
    };
    EventDetail {
        actor_id: text_at(event, "actor", "id"),
        zone_name,
        ..EventDetail::default()
    }
}

/// v2 fills every detail column the event has; `raw.status_code` comes as a number or a string.
fn detail_v2(event: &Map<String, Value>) -> EventDetail {
    let raw_status_code = match event.get("raw").and_then(|r| r.get("status_code")) {
        Some(Value::Number(n)) => n.as_i64().and_then(|n| i32::try_from(n).ok()),
        Some(Value::String(s)) => s.trim().parse().ok(),
        _ => None,
    };
    EventDetail {
        actor_id: text_at(event, "actor", "id"),
        actor_context: text_at(event, "actor", "context"),
        actor_token_id: text_at(event, "actor", "token_id"),
        actor_token_name: text_at(event, "actor", "token_name"),
        action_description: text_at(event, "action", "description"),
        resource_product: text_at(event, "resource", "product"),
        resource_scope: text_at(event, "resource", "scope"),
        zone_id: text_at(event, "zone", "id"),
        zone_name: text_at(event, "zone", "name"),
        raw_method: text_at(event, "raw", "method"),
        raw_uri: text_at(event, "raw", "uri"),
        raw_status_code,
        raw_cf_ray_id: text_at(event, "raw", "cf_ray_id"),
        raw_user_agent: text_at(event, "raw", "user_agent"),
    }
}

/// The event as text PostgreSQL can hold and as a JSON object. PostgreSQL can store a NUL
/// character neither in TEXT nor in JSONB: it is kept as the six characters `\u0000`, never
/// dropped (an audit event must not vanish for its text).
fn parse(raw: &str) -> Result<(Cow<'_, str>, Map<String, Value>), Rejection> {
    let raw = escape_nul(raw);
    let event: Value =
        serde_json::from_str(&raw).map_err(|e| format!("event is not valid JSON: {e}"))?;
    match event {
        Value::Object(event) => Ok((raw, event)),
        other => Err(format!("event is not a JSON object but {}", kind(&other))),
    }
}

fn event_id(event: &Map<String, Value>) -> Result<String, Rejection> {
    match event.get("id") {
        Some(Value::String(id)) if !id.trim().is_empty() => Ok(id.clone()),
        Some(Value::String(_)) => Err("`id` is empty".into()),
        None | Some(Value::Null) => Err("`id` is missing".into()),
        Some(other) => Err(format!("`id` is {} instead of a string", kind(other))),
    }
}

/// The event with every real NUL (the JSON escape `\u0000`, not the text `\\u0000`) written
/// as the text `\u0000`; unchanged (and not copied) when it has none.
pub fn escape_nul(raw: &str) -> Cow<'_, str> {
    let is_nul = |at: usize| {
        // The `\` at `at` starts an escape only after an even number of backslashes.
        raw.as_bytes()[..at]
            .iter()
            .rev()
            .take_while(|&&b| b == b'\\')
            .count()
            % 2
            == 0
    };
    static NUL_ESCAPE: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\\u0000"));
    let nuls: Vec<usize> = NUL_ESCAPE
        .find_iter(raw.as_bytes())
        .filter(|&at| is_nul(at))
        .collect();
    if nuls.is_empty() {
        return Cow::Borrowed(raw);
    }
    let mut escaped = String::with_capacity(raw.len() + nuls.len());
    let mut copied = 0;
    for at in nuls {
        escaped.push_str(&raw[copied..at]);
        escaped.push('\\');
        copied = at;
    }
    escaped.push_str(&raw[copied..]);
    Cow::Owned(escaped)
}

/// The time of a raw event of `version` (v1 `when`, v2 `action.time`), if it has a usable
/// one: what the Poller pages and checkpoints by. Read without mapping the event.
pub fn event_time(version: ApiVersion, raw: &str) -> Option<DateTime<Utc>> {
    #[derive(serde::Deserialize)]
    struct When {
        when: Option<Value>,
    }
    #[derive(serde::Deserialize)]
    struct Action {
        action: Option<Time>,
    }
    #[derive(serde::Deserialize)]
    struct Time {
        time: Option<Value>,
    }
    let time = match version {
        ApiVersion::V1 => {
            if let Some(when) = trailing_when(raw) {
                return parse_when(when).ok();
            }
            serde_json::from_str::<When>(raw).ok()?.when?
        }
        ApiVersion::V2 => serde_json::from_str::<Action>(raw).ok()?.action?.time?,
    };
    match time {
        Value::String(time) => parse_when(&time).ok(),
        _ => None,
    }
}

/// The `when` of an event whose last member it is, as the API writes events, found without
/// reading the whole event (every event of every page is asked); `None` when the event is
/// not written so. `raw` is valid JSON, so a `"when":"` after `{` or `,` is a key; a value
/// followed by nothing but the closing brace of the text belongs to the outermost object.
fn trailing_when(raw: &str) -> Option<&str> {
    const KEY: &[u8] = b"\"when\":\"";
    let body = raw
        .trim_end()
        .strip_suffix('}')?
        .trim_end()
        .strip_suffix('"')?;
    let at = memchr::memmem::rfind(body.as_bytes(), KEY)?;
    let is_key = body.as_bytes()[..at]
        .iter()
        .rev()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|&b| b == b'{' || b == b',');
    let value = &body[at + KEY.len()..];
    (is_key && !value.contains(['"', '\\'])).then_some(value)
}

/// Maps one event, turning a rejection into a [`DeadLetter`].
pub fn map_or_dead_letter(
    version: ApiVersion,
    raw: &str,
    account_id: &str,
    now: DateTime<Utc>,
) -> Result<AuditRow, DeadLetter> {
    map_event(version, raw, account_id, now).map_err(|reason| DeadLetter {
        account_id: account_id.to_owned(),
        reason,
        raw_event: raw.as_bytes().to_vec(),
        first_seen: now,
    })
}

/// RFC 3339 with 0–9 fractional digits and any offset → UTC, truncated to microseconds.
pub fn parse_when(when: &str) -> Result<DateTime<Utc>, Rejection> {
    DateTime::parse_from_rfc3339(when.trim())
        .map(|t| t.with_timezone(&Utc).trunc_subsecs(6))
        .map_err(|e| format!("`when` {when:?} is not an RFC 3339 timestamp: {e}"))
}

/// A nested scalar as text: strings as given, booleans and numbers in their JSON spelling
/// (`action.result: true` → `"true"`), objects and arrays as compact JSON, null → `None`.
fn text_at(event: &Map<String, Value>, object: &str, field: &str) -> Option<String> {
    match event.get(object)?.get(field)? {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shortcut answers only where it must agree with reading the whole event.
    #[test]
    fn a_trailing_when_is_read_like_the_whole_event() {
        let t = "2026-05-01T00:00:00Z";
        let cases = [
            (format!(r#"{{"id":"a","when":"{t}"}}"#), Some(t)),
            (format!("{{\"id\":\"a\" ,\n \"when\":\"{t}\" }}\n"), Some(t)),
            (format!(r#"{{"when":"{t}"}}"#), Some(t)),
            // not the event's own `when`, or not written last: read in full
            (format!(r#"{{"id":"a","x":{{"when":"{t}"}}}}"#), None),
            (format!(r#"{{"when":"{t}","id":"a"}}"#), None),
            (format!(r#"{{"id":"a","x\"when":"{t}"}}"#), None),
            (format!(r#"{{"id":"a","meta":"\"when\":\"{t}"}}"#), None),
            (format!(r#"{{"id":"a","when":"{t}\u0041"}}"#), None),
            (format!(r#"{{"id":"a","when": "{t}"}}"#), None),
        ];
        for (raw, expected) in &cases {
            assert_eq!(trailing_when(raw), *expected, "{raw}");
            let full: serde_json::Value = serde_json::from_str(raw).unwrap();
            let by_parse = full["when"].as_str().and_then(|w| parse_when(w).ok());
            assert_eq!(event_time(ApiVersion::V1, raw), by_parse, "{raw}");
        }
    }

    #[test]
    fn a_v2_event_is_timed_by_its_action() {
        let raw = r#"{"id":"a","when":"2020-01-01T00:00:00Z","action":{"type":"create","time":"2026-05-01T00:00:00.5Z"}}"#;
        assert_eq!(
            event_time(ApiVersion::V2, raw),
            parse_when("2026-05-01T00:00:00.5Z").ok()
        );
        assert_eq!(
            event_time(ApiVersion::V1, raw),
            parse_when("2020-01-01T00:00:00Z").ok()
        );
        assert_eq!(
            event_time(ApiVersion::V2, r#"{"id":"a","action":{}}"#),
            None
        );
        assert_eq!(
            event_time(ApiVersion::V2, r#"{"id":"a","action":{"time":7}}"#),
            None
        );
    }
}
