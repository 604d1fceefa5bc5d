//! A raw event of either API version → [`AuditRow`]. Pure and total: every input yields a row
//! or a dead-letter reason, never a panic.

use std::borrow::Cow;
use std::sync::Arc;

use chrono::{DateTime, SubsecRound, Utc};
use serde_json::Value;

use read::{kind, Event, Scalar};

use crate::event::{ApiVersion, AuditRow, DeadLetter, EventDetail};

/// Why an event could not be mapped. The text lands in the dead-letter table.
pub type Rejection = String;

mod read;

/// Maps one raw event of `version`. `account_id` is the account of the request path. The core
/// columns mean the same for both versions and are read from fields of the same names; only
/// the event's time, the actor's address field and the detail columns differ.
pub fn map_event(
    version: ApiVersion,
    raw: &str,
    account_id: &str,
    ingestion_time: DateTime<Utc>,
) -> Result<AuditRow, Rejection> {
    let raw = escape_nul(raw);
    let mut event = match read::event(version, &raw) {
        Ok(Ok(event)) => event,
        Ok(Err(kind)) => return Err(format!("event is not a JSON object but {kind}")),
        Err(e) => return Err(format!("event is not valid JSON: {e}")),
    };
    let event_id = match event.id.take() {
        Some(Scalar::Text(id)) if !id.trim().is_empty() => id.into_owned(),
        Some(Scalar::Text(_)) => return Err("`id` is empty".into()),
        None | Some(Scalar::Null) => return Err("`id` is missing".into()),
        Some(Scalar::Other(other)) => {
            return Err(format!("`id` is {} instead of a string", kind(&other)))
        }
    };
    let (time, time_field, ip_field) = match version {
        ApiVersion::V1 => (event.when.take(), "`when`", "ip"),
        ApiVersion::V2 => (event.action.take("time"), "`action.time`", "ip_address"),
    };
    let timestamp = match time {
        Some(Scalar::Text(time)) => parse_when(&time)?,
        None | Some(Scalar::Null) => return Err(format!("{time_field} is missing")),
        Some(Scalar::Other(other)) => {
            return Err(format!(
                "{time_field} is {} instead of a string",
                kind(&other)
            ))
        }
    };
    let (metadata, detail) = match version {
        ApiVersion::V1 => {
            let metadata = event.metadata.take().filter(|m| !m.is_null());
            let detail = detail_v1(&mut event, metadata.as_ref());
            (metadata.as_ref().map(Value::to_string), detail)
        }
        ApiVersion::V2 => (None, detail_v2(&mut event)),
    };
    Ok(AuditRow {
        event_id,
        timestamp,
        account_id: account_id.to_owned(),
        api_version: version,
        actor_email: event.actor.text("email"),
        actor_type: event.actor.text("type"),
        action_type: event.action.text("type"),
        action_result: event.action.text("result"),
        resource_type: event.resource.text("type"),
        resource_id: event.resource.text("id"),
        ip_address: event
            .actor
            .text(ip_field)
            .and_then(|ip| ip.trim().parse().ok()),
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
fn detail_v1(event: &mut Event, metadata: Option<&Value>) -> EventDetail {
    let zone_name = match metadata.and_then(|m| m.get("zone_name")) {
        Some(Value::String(name)) if !name.is_empty() => Some(name.clone()),
        _ => None,
    };
    EventDetail {
        actor_id: event.actor.text("id"),
        zone_name,
        ..EventDetail::default()
    }
}

/// v2 fills every detail column the event has; `raw.status_code` comes as a number or a string.
fn detail_v2(event: &mut Event) -> EventDetail {
    let raw_status_code = match event.raw.take("status_code") {
        Some(Scalar::Other(Value::Number(n))) => n.as_i64().and_then(|n| i32::try_from(n).ok()),
        Some(Scalar::Text(s)) => s.trim().parse().ok(),
        _ => None,
    };
    EventDetail {
        actor_id: event.actor.text("id"),
        actor_context: event.actor.text("context"),
        actor_token_id: event.actor.text("token_id"),
        actor_token_name: event.actor.text("token_name"),
        action_description: event.action.text("description"),
        resource_product: event.resource.text("product"),
        resource_scope: event.resource.text("scope"),
        zone_id: event.zone.text("id"),
        zone_name: event.zone.text("name"),
        raw_method: event.raw.text("method"),
        raw_uri: event.raw.text("uri"),
        raw_status_code,
        raw_cf_ray_id: event.raw.text("cf_ray_id"),
        raw_user_agent: event.raw.text("user_agent"),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The mapping as it was before [`read`]: the whole event parsed into a `Value` tree and
    /// looked up. The oracle the reading is compared with.
    mod by_tree {
        use serde_json::{Map, Value};

        use super::super::read::kind;
        use super::super::{escape_nul, parse_when, Rejection};
        use crate::event::{ApiVersion, AuditRow, EventDetail};

        pub fn map_event(version: ApiVersion, raw: &str) -> Result<AuditRow, Rejection> {
            let raw = escape_nul(raw);
            let event: Map<String, Value> = match serde_json::from_str(&raw) {
                Ok(Value::Object(event)) => event,
                Ok(other) => {
                    return Err(format!("event is not a JSON object but {}", kind(&other)))
                }
                Err(e) => return Err(format!("event is not valid JSON: {e}")),
            };
            let event_id = match event.get("id") {
                Some(Value::String(id)) if !id.trim().is_empty() => id.clone(),
                Some(Value::String(_)) => return Err("`id` is empty".into()),
                None | Some(Value::Null) => return Err("`id` is missing".into()),
                Some(other) => return Err(format!("`id` is {} instead of a string", kind(other))),
            };
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
            let text = |object: &str, field: &str| match event.get(object)?.get(field)? {
                Value::Null => None,
                Value::String(s) => Some(s.clone()),
                other => Some(other.to_string()),
            };
            let (metadata, detail) = match version {
                ApiVersion::V1 => (
                    event
                        .get("metadata")
                        .filter(|m| !m.is_null())
                        .map(Value::to_string),
                    EventDetail {
                        actor_id: text("actor", "id"),
                        zone_name: match event.get("metadata").and_then(|m| m.get("zone_name")) {
                            Some(Value::String(name)) if !name.is_empty() => Some(name.clone()),
                            _ => None,
                        },
                        ..EventDetail::default()
                    },
                ),
                ApiVersion::V2 => (
                    None,
                    EventDetail {
                        actor_id: text("actor", "id"),
                        actor_context: text("actor", "context"),
                        actor_token_id: text("actor", "token_id"),
                        actor_token_name: text("actor", "token_name"),
                        action_description: text("action", "description"),
                        resource_product: text("resource", "product"),
                        resource_scope: text("resource", "scope"),
                        zone_id: text("zone", "id"),
                        zone_name: text("zone", "name"),
                        raw_method: text("raw", "method"),
                        raw_uri: text("raw", "uri"),
                        raw_status_code: match event.get("raw").and_then(|r| r.get("status_code")) {
                            Some(Value::Number(n)) => {
                                n.as_i64().and_then(|n| i32::try_from(n).ok())
                            }
                            Some(Value::String(s)) => s.trim().parse().ok(),
                            _ => None,
                        },
                        raw_cf_ray_id: text("raw", "cf_ray_id"),
                        raw_user_agent: text("raw", "user_agent"),
                    },
                ),
            };
            Ok(AuditRow {
                event_id,
                timestamp,
                account_id: "acc".into(),
                api_version: version,
                actor_email: text("actor", "email"),
                actor_type: text("actor", "type"),
                action_type: text("action", "type"),
                action_result: text("action", "result"),
                resource_type: text("resource", "type"),
                resource_id: text("resource", "id"),
                ip_address: text("actor", ip_field).and_then(|ip| ip.trim().parse().ok()),
                metadata,
                detail,
                raw_event: std::sync::Arc::from(raw.as_ref()),
                ingestion_time: chrono::DateTime::UNIX_EPOCH,
            })
        }
    }

    fn agree(raw: &str) {
        for version in [ApiVersion::V1, ApiVersion::V2] {
            let read = map_event(version, raw, "acc", chrono::DateTime::UNIX_EPOCH);
            assert_eq!(read, by_tree::map_event(version, raw), "{version} {raw}");
        }
    }

    /// Texts chosen to tell the two apart: members given twice, objects that are not, values
    /// of every kind where text is expected, escapes the tree refuses, numbers out of range.
    #[test]
    fn reading_the_members_maps_as_the_whole_tree_does() {
        let t = "2026-05-01T00:00:00Z";
        let cases = [
            format!(r#"{{"id":"a","when":"{t}","action":{{"time":"{t}","type":"create"}}}}"#),
            format!(
                r#"{{"id":"a","when":"{t}","actor":{{"email":"x@y","email":"z@y"}},"actor":{{"type":"user"}}}}"#
            ),
            format!(
                r#"{{"id":"a","when":"{t}","actor":{{"email":"x@y","type":"user","email":"z@y"}}}}"#
            ),
            format!(
                r#"{{"id":"a","when":"{t}","actor":{{"email":"x@y"}},"actor":7,"action":{{"time":"{t}"}}}}"#
            ),
            format!(
                r#"{{"id":"a","when":"{t}","actor":["email","x"],"action":[{{"time":"{t}"}}]}}"#
            ),
            format!(
                r#"{{"id":"a","when":"{t}","action":{{"time":"{t}","result":true,"type":12.50}}}}"#
            ),
            format!(
                r#"{{"id":"a","when":"{t}","action":{{"time":"{t}","result":{{"b":1,"a":[1,2.0,1e2]}}}}}}"#
            ),
            format!(
                r#"{{"id":"a","when":"{t}","action":{{"time":"{t}"}},"raw":{{"status_code":" 404 "}}}}"#
            ),
            format!(
                r#"{{"id":"a","when":"{t}","action":{{"time":"{t}"}},"raw":{{"status_code":4294967296}}}}"#
            ),
            format!(
                r#"{{"id":"a","when":"{t}","action":{{"time":"{t}"}},"raw":{{"status_code":200.0}}}}"#
            ),
            format!(
                r#"{{"id":"a","when":"{t}","metadata":{{"zone_name":"z","b":1,"a":2,"b":3}}}}"#
            ),
            format!(r#"{{"id":"a","when":"{t}","metadata":{{"zone_name":"z"}},"metadata":null}}"#),
            format!(r#"{{"id":"a","when":"{t}","metadata":"text","zone":{{"name":"n"}}}}"#),
            format!(r#"{{"id":"a\u0000b","when":"{t}","actor":{{"email":"\u00e9\"\\\/"}}}}"#),
            format!(r#"{{"id":"a","when":"{t}","other":"\ud800"}}"#),
            format!(r#"{{"id":"a","when":"{t}","other":{{"deep":["\udc00"]}}}}"#),
            format!(r#"{{"id":"a","when":"{t}","other":"\ud83d\ude00"}}"#),
            format!(r#"{{"id":"a","when":"{t}","other":1e400}}"#),
            format!(r#"{{"id":"a","when":"{t}","other":-1e-400,"more":18446744073709551616}}"#),
            format!(r#"{{"id":"a","when":"{t}","other":01}}"#),
            format!(r#"{{"id":"a","when":"{t}"}} x"#),
            format!(r#"{{"id":"a","when":"{t}",}}"#),
            format!(r#"{{"id":"a","when":"{t}","id":"b"}}"#),
            format!(r#"{{"id":" ","when":"{t}"}}"#),
            format!(r#"{{"id":{{"x":1}},"when":"{t}"}}"#),
            format!(r#"{{"id":null,"when":"{t}"}}"#),
            r#"{"id":"a","when":null,"action":{"time":null}}"#.into(),
            r#"{"id":"a","when":5,"action":{"time":false}}"#.into(),
            format!(r#"{{"id":"a","when":"{t}","action":"{t}"}}"#),
            format!(r#"{{"id":"a","when":"yesterday","action":{{"time":"{t}"}}}}"#),
            format!(
                r#"{{"id":"a","when":"{t}","actor":{{"ip":" 10.0.0.1 ","ip_address":"::1"}}}}"#
            ),
            format!(
                r#"{{"id":"a","when":"{t}","a{}":{{"nested":{}}}}}"#,
                "b",
                "[".repeat(140)
            ),
            format!(
                r#"{{"id":"a","when":"{t}","x":{}{}}}"#,
                "[".repeat(120),
                "]".repeat(120)
            ),
            // escaped member names are the same names
            format!(
                r#"{{"\u0069d":"a","when":"{t}","actor":{{"\u0065mail":"x@y","type":"user"}}}}"#
            ),
            format!(
                r#"{{"id":"a","when":"{t}","action":{{"ti\u006de":"{t}"}},"raw":{{"status_\u0063ode":500}}}}"#
            ),
            // nesting up to serde_json's limit (128 levels) and one past it, in the values
            // that are kept as well as in skipped ones
            nested(
                &format!(r#"{{"id":"a","when":"{t}","action":{{"time":"{t}","result":"#),
                125,
            ),
            nested(
                &format!(r#"{{"id":"a","when":"{t}","action":{{"time":"{t}","result":"#),
                126,
            ),
            nested(
                &format!(r#"{{"id":"a","when":"{t}","actor":{{"email":"#),
                126,
            ),
            nested(
                &format!(r#"{{"id":"a","when":"{t}","actor":{{"email":"#),
                127,
            ),
            nested(&format!(r#"{{"id":"a","when":"{t}","metadata":"#), 126),
            nested(&format!(r#"{{"id":"a","when":"{t}","metadata":"#), 127),
            nested(&format!(r#"{{"id":"a","when":"{t}","metadata":"#), 128),
            nested(&format!(r#"{{"id":"a","when":"{t}","other":"#), 127),
            nested(&format!(r#"{{"id":"a","when":"{t}","other":"#), 128),
            r#"[1,2]"#.into(),
            r#""text""#.into(),
            "null".into(),
            "12".into(),
            "".into(),
            "{".into(),
        ];
        for raw in &cases {
            agree(raw);
        }
        // the limit is reached in both directions, so the cases above test it
        let deepest = |prefix: &str, depth| {
            map_v1(&nested(prefix, depth), "acc", chrono::DateTime::UNIX_EPOCH)
        };
        let metadata = format!(r#"{{"id":"a","when":"{t}","metadata":"#);
        assert!(deepest(&metadata, 126).is_ok());
        assert!(deepest(&metadata, 128).is_err());
    }

    /// `prefix` (which opens as many objects as it leaves open) and `depth` arrays nested in
    /// one another, every object and array closed.
    fn nested(prefix: &str, depth: usize) -> String {
        let open = prefix.matches('{').count() - prefix.matches('}').count();
        format!(
            "{prefix}{}{}{}",
            "[".repeat(depth),
            "]".repeat(depth),
            "}".repeat(open)
        )
    }

    /// The one text the two read differently: serde_json's tree takes the member named by its
    /// private raw-value token for a whole JSON text to parse in place of the object. Here it
    /// is a member like any other.
    #[test]
    fn serde_jsons_private_token_is_an_ordinary_member() {
        let raw = r#"{"$serde_json::private::RawValue":"{\"id\":\"b\"}","id":"a","when":"2026-05-01T00:00:00Z"}"#;
        let row = map_v1(raw, "acc", chrono::DateTime::UNIX_EPOCH).unwrap();
        assert_eq!(row.event_id, "a");
        assert_ne!(by_tree::map_event(ApiVersion::V1, raw).ok(), Some(row));
    }

    /// Seeded random events, mostly well formed, mixing every kind of value into every
    /// member the mapping reads.
    #[test]
    fn random_events_map_as_the_whole_tree_does() {
        use rand::rngs::StdRng;
        use rand::seq::SliceRandom;
        use rand::{Rng, SeedableRng};

        fn string(rng: &mut StdRng) -> String {
            const PARTS: [&str; 14] = [
                "a",
                "x@example.com",
                " ",
                "10.0.0.1",
                "2026-05-01T00:00:00Z",
                "\\\"",
                "\\\\",
                "\\u0041",
                "\\u0000",
                "\\ud83d\\ude00",
                "\\ud800",
                "\\n",
                "é",
                "2001:db8::1",
            ];
            let parts = rng.random_range(0..4);
            let text: String = (0..parts)
                .map(|_| PARTS[rng.random_range(0..PARTS.len())])
                .collect();
            format!("\"{text}\"")
        }
        fn value(rng: &mut StdRng, depth: u32) -> String {
            match rng.random_range(0..if depth > 2 { 6 } else { 8 }) {
                0 => "null".into(),
                1 => ["true", "false"][rng.random_range(0..2)].into(),
                2 => [
                    "0",
                    "-7",
                    "404",
                    "2147483648",
                    "18446744073709551615",
                    "1.5",
                    "1e2",
                    "-0.0",
                    "1e400",
                ][rng.random_range(0..9)]
                .into(),
                3..=5 => string(rng),
                6 => object(
                    rng,
                    depth + 1,
                    &[
                        "email",
                        "type",
                        "id",
                        "time",
                        "status_code",
                        "zone_name",
                        "z",
                    ],
                ),
                _ => {
                    let n = rng.random_range(0..3);
                    let items: Vec<String> = (0..n).map(|_| value(rng, depth + 1)).collect();
                    format!("[{}]", items.join(","))
                }
            }
        }
        fn object(rng: &mut StdRng, depth: u32, names: &[&str]) -> String {
            let n = rng.random_range(0..6);
            let members: Vec<String> = (0..n)
                .map(|_| {
                    let name = names[rng.random_range(0..names.len())];
                    format!("\"{name}\":{}", value(rng, depth))
                })
                .collect();
            format!("{{{}}}", members.join(","))
        }
        fn member(rng: &mut StdRng, name: &str) -> String {
            let value = match name {
                "id" if rng.random_bool(0.8) => format!("\"e{}\"", rng.random_range(0..1000)),
                "when" if rng.random_bool(0.8) => "\"2026-05-01T10:00:00.123456789+02:00\"".into(),
                "actor" | "action" | "resource" | "zone" | "raw" | "metadata"
                    if rng.random_bool(0.85) =>
                {
                    let mut names: Vec<&str> = read::ACTOR
                        .iter()
                        .chain(read::ACTION)
                        .chain(read::RESOURCE)
                        .chain(read::ZONE)
                        .chain(read::RAW)
                        .copied()
                        .collect();
                    names.extend(["zone_name", "other"]);
                    let mut object = object(rng, 1, &names);
                    if name == "action" && rng.random_bool(0.8) {
                        object.insert_str(1, "\"time\":\"2026-05-01T00:00:00Z\",");
                        object = object.replace(",}", "}");
                    }
                    object
                }
                _ => value(rng, 1),
            };
            format!("\"{name}\":{value}")
        }
        const TOP: [&str; 10] = [
            "id", "when", "metadata", "actor", "action", "resource", "zone", "raw", "other", "id",
        ];
        let mut rng = StdRng::seed_from_u64(14);
        let mut mapped = 0;
        for _ in 0..20_000 {
            let n = rng.random_range(2..9);
            let mut members: Vec<String> = vec![member(&mut rng, "id"), member(&mut rng, "when")];
            for _ in 0..n {
                let name = TOP[rng.random_range(0..TOP.len())];
                members.push(member(&mut rng, name));
            }
            members.shuffle(&mut rng);
            let mut raw = format!("{{{}}}", members.join(","));
            if rng.random_bool(0.02) {
                let mut at = rng.random_range(0..raw.len());
                while !raw.is_char_boundary(at) {
                    at -= 1;
                }
                raw.truncate(at);
            }
            agree(&raw);
            mapped +=
                map_event(ApiVersion::V2, &raw, "acc", chrono::DateTime::UNIX_EPOCH).is_ok() as u32;
        }
        // The generator must reach rows, not only rejections (about one v2 event in ten).
        assert!(mapped > 1_000, "{mapped} of 20,000 random v2 events mapped");
    }

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
