//! v1 event → [`AuditRow`]. Pure and total: every input yields a row or a
//! dead-letter reason, never a panic.

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::Arc;

use chrono::{DateTime, SubsecRound, Utc};
use serde_json::Value;

use crate::event::{AuditRow, DeadLetter};

/// Why an event could not be mapped. The text lands in the dead-letter table.
pub type Rejection = String;

/// Maps one raw v1 event. `account_id` is the account of the request path.
pub fn map_v1(
    raw: &str,
    account_id: &str,
    ingestion_time: DateTime<Utc>,
) -> Result<AuditRow, Rejection> {
    // PostgreSQL can store a NUL character neither in TEXT nor in JSONB: it is kept as the
    // six characters `\u0000`, never dropped (an audit event must not vanish for its text).
    let raw = escape_nul(raw);
    let raw = raw.as_ref();
    let event: Value =
        serde_json::from_str(raw).map_err(|e| format!("event is not valid JSON: {e}"))?;
    let Value::Object(_) = &event else {
        return Err(format!("event is not a JSON object but {}", kind(&event)));
    };
    let event_id = match event.get("id") {
        Some(Value::String(id)) if !id.trim().is_empty() => id.clone(),
        Some(Value::String(_)) => return Err("`id` is empty".into()),
        None | Some(Value::Null) => return Err("`id` is missing".into()),
        Some(other) => return Err(format!("`id` is {} instead of a string", kind(other))),
    };
    let timestamp = match event.get("when") {
        Some(Value::String(when)) => parse_when(when)?,
        None | Some(Value::Null) => return Err("`when` is missing".into()),
        Some(other) => return Err(format!("`when` is {} instead of a string", kind(other))),
    };
    let metadata = match event.get("metadata") {
        None | Some(Value::Null) => None,
        Some(value) => Some(value.to_string()),
    };
    Ok(AuditRow {
        event_id,
        timestamp,
        account_id: account_id.to_owned(),
        actor_email: text_at(&event, "actor", "email"),
        actor_type: text_at(&event, "actor", "type"),
        action_type: text_at(&event, "action", "type"),
        action_result: text_at(&event, "action", "result"),
        resource_type: text_at(&event, "resource", "type"),
        resource_id: text_at(&event, "resource", "id"),
        ip_address: text_at(&event, "actor", "ip").and_then(|ip| ip.trim().parse::<IpAddr>().ok()),
        metadata,
        raw_event: Arc::from(raw),
        ingestion_time,
    })
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

/// Maps one event, turning a rejection into a [`DeadLetter`].
pub fn map_or_dead_letter(
    raw: &str,
    account_id: &str,
    now: DateTime<Utc>,
) -> Result<AuditRow, DeadLetter> {
    map_v1(raw, account_id, now).map_err(|reason| DeadLetter {
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
fn text_at(event: &Value, object: &str, field: &str) -> Option<String> {
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
