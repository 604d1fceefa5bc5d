//! The v2 mapping against every event shape the v2 API is known to send (the edge cases of
//! the API facts, 19–25), and the columns both versions fill alike.

use cfaudit_actors::mapping::{map_event, map_v1, map_v2};
use cfaudit_actors::ApiVersion;
use chrono::{DateTime, TimeZone, Utc};
use serde_json::{json, Value};

const ACCOUNT: &str = "01a7362d577a6c3019a474fd6f485823";

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 6, 1, 0, 0, 0).unwrap()
}

/// An ordinary v2 event, with `change` applied.
fn event(change: impl FnOnce(&mut Value)) -> String {
    let mut e = json!({
        "id": "023e105f4ecef8ad9ca31a8372d0c353",
        "account": {"id": ACCOUNT, "name": "Example Account"},
        "action": {"description": "Add Member", "result": "success",
                   "time": "2026-04-26T17:31:07.123Z", "type": "create"},
        "actor": {"id": "f6b5", "context": "api_token", "email": "alice@example.com",
                  "ip_address": "198.41.129.166", "token_id": "tok-1", "token_name": "ci",
                  "type": "user"},
        "raw": {"cf_ray_id": "8e9b1c60ef9e1c9a", "method": "POST", "status_code": 200,
                "uri": "/accounts/x/members", "user_agent": "Mozilla/5.0"},
        "resource": {"id": "r-1", "product": "members", "request": {"a": 1},
                     "response": {}, "scope": "accounts", "type": "member"},
        "zone": {"id": "z-1", "name": "example.com"}
    });
    change(&mut e);
    e.to_string()
}

fn map(raw: &str) -> cfaudit_actors::AuditRow {
    map_v2(raw, ACCOUNT, now()).unwrap_or_else(|e| panic!("{raw} was rejected: {e}"))
}

#[test]
fn base_event_maps_every_column() {
    let raw = event(|_| {});
    let row = map(&raw);
    assert_eq!(row.api_version, ApiVersion::V2);
    assert_eq!(row.event_id, "023e105f4ecef8ad9ca31a8372d0c353");
    assert_eq!(
        row.timestamp,
        Utc.with_ymd_and_hms(2026, 4, 26, 17, 31, 7).unwrap() + chrono::Duration::milliseconds(123)
    );
    assert_eq!(row.account_id, ACCOUNT);
    assert_eq!(row.actor_email.as_deref(), Some("alice@example.com"));
    assert_eq!(row.actor_type.as_deref(), Some("user"));
    assert_eq!(row.action_type.as_deref(), Some("create"));
    assert_eq!(row.action_result.as_deref(), Some("success"));
    assert_eq!(row.resource_type.as_deref(), Some("member"));
    assert_eq!(row.resource_id.as_deref(), Some("r-1"));
    assert_eq!(row.ip_address, Some("198.41.129.166".parse().unwrap()));
    assert_eq!(row.metadata, None);
    let d = &row.detail;
    assert_eq!(d.actor_id.as_deref(), Some("f6b5"));
    assert_eq!(d.actor_context.as_deref(), Some("api_token"));
    assert_eq!(d.actor_token_id.as_deref(), Some("tok-1"));
    assert_eq!(d.actor_token_name.as_deref(), Some("ci"));
    assert_eq!(d.action_description.as_deref(), Some("Add Member"));
    assert_eq!(d.resource_product.as_deref(), Some("members"));
    assert_eq!(d.resource_scope.as_deref(), Some("accounts"));
    assert_eq!(d.zone_id.as_deref(), Some("z-1"));
    assert_eq!(d.zone_name.as_deref(), Some("example.com"));
    assert_eq!(d.raw_method.as_deref(), Some("POST"));
    assert_eq!(d.raw_uri.as_deref(), Some("/accounts/x/members"));
    assert_eq!(d.raw_status_code, Some(200));
    assert_eq!(d.raw_cf_ray_id.as_deref(), Some("8e9b1c60ef9e1c9a"));
    assert_eq!(d.raw_user_agent.as_deref(), Some("Mozilla/5.0"));
    assert_eq!(&*row.raw_event, raw.as_str(), "the event as received");
    assert_eq!(
        map_event(ApiVersion::V2, &raw, ACCOUNT, now()).unwrap(),
        row
    );
}

/// Case 20: the result as sent, fractional seconds kept to the microsecond.
#[test]
fn case_20_results_and_fractional_times() {
    for result in ["success", "failure", ""] {
        let row = map(&event(|e| e["action"]["result"] = json!(result)));
        assert_eq!(row.action_result.as_deref(), Some(result));
    }
    let row = map(&event(|e| {
        e["action"]["time"] = json!("2026-04-26T17:31:07.123456789Z")
    }));
    assert_eq!(
        row.timestamp,
        Utc.with_ymd_and_hms(2026, 4, 26, 17, 31, 7).unwrap()
            + chrono::Duration::microseconds(123_456)
    );
    let row = map(&event(|e| {
        e["action"]["time"] = json!("2026-04-26T19:31:07+02:00")
    }));
    assert_eq!(
        row.timestamp,
        Utc.with_ymd_and_hms(2026, 4, 26, 17, 31, 7).unwrap()
    );
}

/// Case 21: actor types and contexts are open strings; token fields only where sent.
#[test]
fn case_21_open_actor_types_and_contexts() {
    for actor_type in [
        "cloudflare_admin",
        "Cloudflare_admin",
        "cloudflare-admin",
        "system",
        "robot",
    ] {
        let row = map(&event(|e| e["actor"]["type"] = json!(actor_type)));
        assert_eq!(row.actor_type.as_deref(), Some(actor_type));
    }
    let row = map(&event(
        |e| e["actor"] = json!({"id": "u", "context": "dash", "type": "user", "email": "a@b.c"}),
    ));
    assert_eq!(row.detail.actor_context.as_deref(), Some("dash"));
    assert_eq!(row.detail.actor_token_id, None);
    assert_eq!(row.detail.actor_token_name, None);
    assert_eq!(row.ip_address, None);
}

/// Case 22: `resource.scope` as a string or as JSON; request and response stay in the raw
/// event only; an extra `resource.value` is kept there too.
#[test]
fn case_22_resource_scope_string_or_json() {
    let row = map(&event(|e| {
        e["resource"]["scope"] = json!({"id": "z", "type": "zones"})
    }));
    let scope: Value = serde_json::from_str(row.detail.resource_scope.as_deref().unwrap()).unwrap();
    assert_eq!(scope, json!({"id": "z", "type": "zones"}));
    let raw = event(|e| {
        e["resource"]["request"] = Value::Null;
        e["resource"]["value"] = json!({"big": [1, 2, 3]});
    });
    let row = map(&raw);
    assert_eq!(row.detail.resource_scope.as_deref(), Some("accounts"));
    assert!(row.raw_event.contains("\"value\""));
}

/// Case 23: an account-level event has no zone (missing, or `{}`).
#[test]
fn case_23_no_zone() {
    for zone in [None, Some(json!({}))] {
        let row = map(&event(|e| match &zone {
            None => {
                e.as_object_mut().unwrap().remove("zone");
            }
            Some(z) => e["zone"] = z.clone(),
        }));
        assert_eq!(row.detail.zone_id, None);
        assert_eq!(row.detail.zone_name, None);
    }
}

/// Case 24: the status code as a number or a numeric string; unicode and control
/// characters in the user agent kept as sent.
#[test]
fn case_24_status_code_and_user_agent() {
    let row = map(&event(|e| e["raw"]["status_code"] = json!("404")));
    assert_eq!(row.detail.raw_status_code, Some(404));
    let row = map(&event(|e| e["raw"]["status_code"] = json!("teapot")));
    assert_eq!(row.detail.raw_status_code, None);
    let row = map(&event(|e| {
        e["raw"]["status_code"] = json!(99_999_999_999_i64)
    }));
    assert_eq!(
        row.detail.raw_status_code, None,
        "out of range, not wrapped"
    );
    let row = map(&event(|e| e["raw"]["user_agent"] = json!("zoë\tbot\u{1}")));
    assert_eq!(row.detail.raw_user_agent.as_deref(), Some("zoë\tbot\u{1}"));
}

/// An event without an id or a usable `action.time` is refused with the reason, never a panic.
#[test]
fn events_without_id_or_time_are_refused_by_name() {
    let cases = [
        (event(|e| e["id"] = Value::Null), "`id` is missing"),
        (event(|e| e["id"] = json!(" ")), "`id` is empty"),
        (
            event(|e| {
                e["action"].as_object_mut().unwrap().remove("time");
            }),
            "`action.time` is missing",
        ),
        (
            event(|e| e["action"]["time"] = json!(17)),
            "`action.time` is a number",
        ),
        (
            event(|e| e["action"]["time"] = json!("yesterday")),
            "not an RFC 3339",
        ),
        (
            event(|e| e["action"] = Value::Null),
            "`action.time` is missing",
        ),
        ("[1]".to_owned(), "not a JSON object"),
    ];
    for (raw, reason) in cases {
        let error = map_v2(&raw, ACCOUNT, now()).unwrap_err();
        assert!(error.contains(reason), "{raw}: {error}");
    }
}

/// A v1 event fills the columns v1 has too: its actor id, and the zone its metadata names.
#[test]
fn v1_fills_the_columns_both_versions_have() {
    let raw = json!({
        "id": "d5b0f326", "when": "2026-04-26T17:31:07Z",
        "actor": {"id": "f6b5", "email": "a@b.c", "ip": "::1", "type": "user"},
        "metadata": {"zone_name": "example.com"}
    })
    .to_string();
    let row = map_v1(&raw, ACCOUNT, now()).unwrap();
    assert_eq!(row.api_version, ApiVersion::V1);
    assert_eq!(row.detail.actor_id.as_deref(), Some("f6b5"));
    assert_eq!(row.detail.zone_name.as_deref(), Some("example.com"));
    assert_eq!(row.detail.actor_context, None);
    let row = map_v1(
        &json!({"id": "x", "when": "2026-04-26T17:31:07Z", "metadata": {"zone_name": 3}})
            .to_string(),
        ACCOUNT,
        now(),
    )
    .unwrap();
    assert_eq!(row.detail.zone_name, None, "not a name");
}
