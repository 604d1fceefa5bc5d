//! Audit Logs v2 (`/accounts/{id}/logs/audit`): its own data set, cursor paging in a window
//! that `since` and `before` (both required) fix, the array filters and their `.not` twins.
//!
//! The cursor is opaque to clients: the (time, id) of the last event served and a digest of
//! the query it belongs to. It resumes strictly after that event, so events that arrive or
//! expire between pages never shift it; a cursor of another query, or garbage, is a 400.

use std::hash::{Hash, Hasher};

use chrono::{DateTime, SecondsFormat, SubsecRound, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::{last_param, parse_bound, uuid_from, EmulatorConfig, Failure, StoredEvent};

/// The filters v2 takes (each also as `<name>.not`, and as `<name>[]`), with where the value
/// sits in an event.
const FILTERS: &[(&str, &str, &str)] = &[
    ("id", "", "id"),
    ("account_name", "account", "name"),
    ("action_result", "action", "result"),
    ("action_type", "action", "type"),
    ("actor_context", "actor", "context"),
    ("actor_email", "actor", "email"),
    ("actor_id", "actor", "id"),
    ("actor_ip_address", "actor", "ip_address"),
    ("actor_token_id", "actor", "token_id"),
    ("actor_token_name", "actor", "token_name"),
    ("actor_type", "actor", "type"),
    ("raw_cf_ray_id", "raw", "cf_ray_id"),
    ("raw_method", "raw", "method"),
    ("raw_status_code", "raw", "status_code"),
    ("raw_uri", "raw", "uri"),
    ("resource_id", "resource", "id"),
    ("resource_product", "resource", "product"),
    ("resource_scope", "resource", "scope"),
    ("resource_type", "resource", "type"),
    ("zone_id", "zone", "id"),
    ("zone_name", "zone", "name"),
];

/// The filterable values of a v2 event, by filter name.
pub(crate) fn fields(value: &Value) -> Vec<(&'static str, String)> {
    FILTERS
        .iter()
        .filter_map(|(name, object, field)| {
            let v = if object.is_empty() {
                value.get(field)
            } else {
                value.get(object).and_then(|o| o.get(field))
            }?;
            let text = match v {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                _ => return None,
            };
            Some((*name, text))
        })
        .collect()
}

/// Indexes a raw v2 event at its `action.time`, or at `fallback` when that does not parse.
pub fn stored(value: &Value, fallback: DateTime<Utc>) -> StoredEvent {
    let mut event = StoredEvent::raw(
        value
            .get("action")
            .and_then(|a| a.get("time"))
            .and_then(Value::as_str)
            .and_then(|w| DateTime::parse_from_rfc3339(w).ok())
            .map(|w| w.with_timezone(&Utc))
            .unwrap_or(fallback),
        value.get("id").and_then(Value::as_str).unwrap_or(""),
        value.to_string().into_bytes(),
    );
    event.fields = fields(value);
    event
}

/// The v2 data set: as many events as v1's unless told otherwise, over the same span, with
/// ids and shapes of their own.
pub fn generate(config: &EmulatorConfig) -> Vec<(DateTime<Utc>, Value)> {
    let count = config.v2_events.unwrap_or(config.events);
    let mut rng = StdRng::seed_from_u64(config.seed ^ 0x5632_0000);
    let end = config
        .end
        .unwrap_or_else(|| Utc::now().trunc_subsecs(0) - chrono::Duration::hours(1));
    let span_micros = (config.days * 86_400e6) as i64;
    let start = end - chrono::Duration::microseconds(span_micros);
    let n = count.max(1) as i64;
    let mut time = start;
    let mut events = Vec::with_capacity(count);
    for i in 0..count {
        // A quarter of events share the previous one's exact time: runs across page ends.
        if i == 0 || rng.random_range(0..4) > 0 {
            let gap = rng.random_range(0..=(2 * span_micros / n).max(1));
            let precision = [0, 3, 6, 6][i % 4];
            time = (time + chrono::Duration::microseconds(gap))
                .min(end)
                .trunc_subsecs(precision);
        }
        events.push((time, event(i, time, &mut rng, config)));
    }
    events
}

/// One v2 event in a shape chosen by its index: ordinary, logins and failed logins, and the
/// shapes the API is known to send (edge cases 19–25 of the API facts).
pub fn event(i: usize, time: DateTime<Utc>, rng: &mut StdRng, config: &EmulatorConfig) -> Value {
    const ACTIONS: &[(&str, &str, &str)] = &[
        ("create", "members", "Add Member"),
        ("update", "dns_records", "Update DNS Record"),
        ("delete", "dns_records", "Delete DNS Record"),
        ("login", "login", "Login"),
        ("create", "api_tokens", "Create API Token"),
        ("update", "zone_settings", "Change Zone Setting"),
    ];
    const CONTEXTS: &[&str] = &["dash", "api_token", "api_key", "oauth", "origin_ca_key"];
    const EMAILS: &[&str] = &[
        "alice@example.com",
        "bob@example.com",
        "zoë@exämple.com",
        "OPS@EXAMPLE.COM",
    ];
    let (action, product, description) = ACTIONS[rng.random_range(0..ACTIONS.len())];
    let context = CONTEXTS[rng.random_range(0..CONTEXTS.len())];
    let failed = rng.random_bool(if action == "login" { 0.3 } else { 0.05 });
    let id = uuid_from(rng).replace('-', "");
    let ip = if rng.random_bool(0.8) {
        format!("203.0.113.{}", rng.random_range(1..255))
    } else {
        format!("2001:db8::{:x}", rng.random_range(1..0xffff))
    };
    let zone = i % 5;
    let mut e = json!({
        "id": id,
        "account": {"id": config.account_id, "name": "Demo Account"},
        "action": {"description": description, "result": if failed { "failure" } else { "success" },
                   "time": time.to_rfc3339_opts(SecondsFormat::AutoSi, true), "type": action},
        "actor": {"id": format!("{:032x}", rng.random::<u128>()), "context": context,
                  "email": EMAILS[rng.random_range(0..EMAILS.len())], "ip_address": ip, "type": "user"},
        "raw": {"cf_ray_id": format!("{:016x}", rng.random::<u64>()),
                "method": if action == "delete" { "DELETE" } else { "POST" },
                "status_code": if failed { 403 } else { 200 },
                "uri": format!("/client/v4/accounts/{}/{product}", config.account_id),
                "user_agent": "Mozilla/5.0 (X11; Linux x86_64)"},
        "resource": {"id": format!("{:032x}", rng.random::<u128>()), "product": product,
                     "request": {"name": format!("r{i}")}, "response": {}, "scope": "accounts",
                     "type": product},
        "zone": {"id": format!("{zone:032x}"), "name": format!("zone{zone}.example.com")}
    });
    if matches!(context, "api_token" | "oauth") {
        e["actor"]["token_id"] = json!(format!("{:032x}", rng.random::<u128>()));
        e["actor"]["token_name"] = json!(format!("token-{}", i % 3));
    }
    match i % 23 {
        1 => {
            e["actor"]["type"] =
                json!(["cloudflare_admin", "Cloudflare_admin", "system", "robot"][i % 4])
        }
        2 => e["actor"]["context"] = json!(["api", "unknown"][i % 2]),
        3 => e["resource"]["scope"] = json!({"id": format!("{zone:032x}"), "type": "zones"}),
        4 => {
            e.as_object_mut().unwrap().remove("zone");
        }
        5 => e["zone"] = json!({}),
        6 => e["raw"]["status_code"] = json!("200"),
        7 => e["raw"]["user_agent"] = json!("zoë\u{1}agent"),
        8 => e["action"]["result"] = json!(""),
        9 => e["resource"]["value"] = json!({"big": [1, 2, 3]}),
        10 => {
            e["resource"]["request"] = Value::Null;
            e["resource"].as_object_mut().unwrap().remove("response");
        }
        11 => e["actor"]["ip_address"] = json!("2a02:cf40:add:4002:91f2:a9b2:e09a:6fc6"),
        12 => e["unknown_key"] = json!({"kept": true}),
        _ => {}
    }
    if config.invalid_every > 0 && i % config.invalid_every == config.invalid_every - 1 {
        if i.is_multiple_of(2) {
            e.as_object_mut().unwrap().remove("id");
        } else {
            e["action"]["time"] = json!("not-a-time");
        }
    }
    e
}

/// What a cursor stands for: after this event, in this query.
fn cursor(time: DateTime<Utc>, id: &str, query: u64) -> String {
    format!("{}|{id}|{query:x}", time.timestamp_micros())
        .bytes()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn parse_cursor(text: &str) -> Option<(DateTime<Utc>, String, u64)> {
    let bytes = (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    let text = String::from_utf8(bytes).ok()?;
    let mut parts = text.splitn(3, '|');
    let micros = parts.next()?.parse().ok()?;
    let id = parts.next()?.to_owned();
    let query = u64::from_str_radix(parts.next()?, 16).ok()?;
    Some((DateTime::from_timestamp_micros(micros)?, id, query))
}

/// The success body for one v2 page, or a 400 failure for a bad parameter or cursor.
pub(crate) fn page_body(
    query: &[(String, String)],
    events: &[StoredEvent],
    config: &EmulatorConfig,
) -> Result<Vec<u8>, Failure> {
    let param = |name: &str| last_param(query, name);
    let bound = |name: &str| -> Result<DateTime<Utc>, Failure> {
        let value =
            param(name).ok_or_else(|| Failure::bad_request(format!("{name} is required")))?;
        parse_bound(value).ok_or_else(|| {
            Failure::bad_request(format!("{name} must be a date or an RFC 3339 time"))
        })
    };
    let (since, before) = (bound("since")?, bound("before")?);
    let limit = match param("limit") {
        None => 100,
        Some(v) => v
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=1000).contains(n))
            .ok_or_else(|| Failure::bad_request("limit must be from 1 to 1000".into()))?,
    };
    let take = limit.min(config.v2_page_cap.max(1));
    let desc = match param("direction") {
        None | Some("desc") => true,
        Some("asc") => false,
        Some(other) => {
            return Err(Failure::bad_request(format!(
                "direction {other:?} must be asc or desc"
            )))
        }
    };
    // Filters: repeated keys (or `name[]`), any value matches; `.not`: none may.
    let mut wanted: Vec<(&str, bool, Vec<&str>)> = Vec::new();
    for (name, _, _) in FILTERS {
        for negated in [false, true] {
            let key = if negated {
                format!("{name}.not")
            } else {
                (*name).to_owned()
            };
            let values: Vec<&str> = query
                .iter()
                .filter(|(k, _)| *k == key || *k == format!("{key}[]"))
                .map(|(_, v)| v.as_str())
                .collect();
            if !values.is_empty() {
                wanted.push((name, negated, values));
            }
        }
    }
    let query_id = {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        (since, before, desc, &wanted).hash(&mut hasher);
        hasher.finish()
    };
    let after = match param("cursor") {
        None | Some("") => None,
        Some(text) => match parse_cursor(text) {
            Some((time, id, q)) if q == query_id => Some((time, id)),
            Some(_) => {
                return Err(Failure::bad_request(
                    "the cursor belongs to another query".into(),
                ))
            }
            None => return Err(Failure::bad_request("invalid cursor".into())),
        },
    };
    let retention = Utc::now() - chrono::Duration::days(548);
    let matches = |e: &&StoredEvent| {
        let value_of = |name: &str| e.fields.iter().find(|(n, _)| *n == name).map(|(_, v)| v);
        let in_window = e.when >= since.max(retention)
            && !(config.v2_since_exclusive && e.when == since)
            && if config.before_inclusive {
                e.when <= before
            } else {
                e.when < before
            };
        in_window
            && wanted.iter().all(|(name, negated, values)| {
                let hit = value_of(name).is_some_and(|v| {
                    values.iter().any(|w| {
                        if *name == "actor_email" {
                            w.eq_ignore_ascii_case(v)
                        } else {
                            w == v
                        }
                    })
                });
                hit != *negated
            })
    };
    // The store is sorted by (time, id): only the part past the cursor is looked at.
    let window = {
        let lower = events.partition_point(|e| e.when < since.max(retention));
        let upper = events.partition_point(|e| e.when <= before);
        &events[lower..upper.max(lower)]
    };
    let window = match (&after, desc) {
        (None, _) => window,
        (Some((time, id)), false) => {
            &window[window.partition_point(|e| (e.when, &e.id) <= (*time, id))..]
        }
        (Some((time, id)), true) => {
            &window[..window.partition_point(|e| (e.when, &e.id) < (*time, id))]
        }
    };
    let mut selected: Vec<&StoredEvent> = Vec::with_capacity(take + 1);
    let candidates: Box<dyn Iterator<Item = &StoredEvent>> = if desc {
        Box::new(window.iter().rev())
    } else {
        Box::new(window.iter())
    };
    for event in candidates.filter(matches) {
        selected.push(event);
        if selected.len() > take {
            break;
        }
    }
    let more = selected.len() > take;
    selected.truncate(take);
    let next = more
        .then(|| selected.last().map(|e| cursor(e.when, &e.id, query_id)))
        .flatten();
    let mut body =
        Vec::with_capacity(selected.iter().map(|e| e.json.len() + 1).sum::<usize>() + 256);
    body.extend_from_slice(b"{\"success\":true,\"errors\":[],\"result\":[");
    for (i, event) in selected.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(&event.json);
    }
    let count = if config.v2_count_number {
        selected.len().to_string()
    } else {
        format!("\"{}\"", selected.len())
    };
    let cursor_json = match (&next, config.v2_cursors_after) {
        (Some(c), false) => format!(",\"cursor\":\"{c}\""),
        (Some(c), true) => format!(",\"cursors\":{{\"after\":\"{c}\"}}"),
        (None, _) if config.v2_empty_cursor => ",\"cursor\":\"\"".to_owned(),
        (None, _) => String::new(),
    };
    body.extend_from_slice(
        format!("],\"result_info\":{{\"count\":{count}{cursor_json}}}}}").as_bytes(),
    );
    Ok(body)
}
