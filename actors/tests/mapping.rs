//! The v1 mapping against every event shape the v1 API is known to send.

use cfaudit_actors::mapping::{escape_nul, map_v1, parse_when};
use chrono::{DateTime, TimeZone, Utc};
use serde_json::{json, Value};

const ACCOUNT: &str = "01a7362d577a6c3019a474fd6f485823";

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap()
}

/// An ordinary v1 event, with `change` applied.
fn event(change: impl FnOnce(&mut Value)) -> String {
    let mut e = json!({
        "id": "d5b0f326-1232-4452-8858-1089bd7168ef",
        "action": {"type": "change_setting", "result": true, "info": "free text"},
        "actor": {"email": "a@b.c", "id": "f6b5", "ip": "198.41.129.166", "type": "user"},
        "interface": "API",
        "metadata": {"name": "security_level", "value": "high", "zone_name": "example.com"},
        "newValue": "low", "oldValue": "high",
        "owner": {"id": "023e105f4ecef8ad9ca31a8372d0c353"},
        "resource": {"id": "023e105f", "type": "zone"},
        "when": "2017-04-26T17:31:07Z"
    });
    change(&mut e);
    e.to_string()
}

fn map(raw: &str) -> cfaudit_actors::AuditRow {
    map_v1(raw, ACCOUNT, now()).unwrap_or_else(|e| panic!("{raw} was rejected: {e}"))
}

#[test]
fn base_event_maps_every_column() {
    let raw = event(|_| {});
    let row = map(&raw);
    assert_eq!(row.event_id, "d5b0f326-1232-4452-8858-1089bd7168ef");
    assert_eq!(
        row.timestamp,
        Utc.with_ymd_and_hms(2017, 4, 26, 17, 31, 7).unwrap()
    );
    assert_eq!(row.account_id, ACCOUNT);
    assert_eq!(row.actor_email.as_deref(), Some("a@b.c"));
    assert_eq!(row.actor_type.as_deref(), Some("user"));
    assert_eq!(row.action_type.as_deref(), Some("change_setting"));
    assert_eq!(row.action_result.as_deref(), Some("true"));
    assert_eq!(row.resource_type.as_deref(), Some("zone"));
    assert_eq!(row.resource_id.as_deref(), Some("023e105f"));
    assert_eq!(row.ip_address, Some("198.41.129.166".parse().unwrap()));
    let metadata: Value = serde_json::from_str(row.metadata.as_deref().unwrap()).unwrap();
    assert_eq!(metadata["zone_name"], "example.com");
    assert_eq!(&*row.raw_event, raw.as_str());
    assert_eq!(row.ingestion_time, now());
}

#[test]
fn case_01_system_actor_without_email_or_ip() {
    let row = map(&event(|e| {
        e["actor"] = json!({"id": "1", "type": "system"})
    }));
    assert_eq!(row.actor_type.as_deref(), Some("system"));
    assert_eq!(row.actor_email, None);
    assert_eq!(row.ip_address, None);
}

#[test]
fn case_02_ipv6_full_and_compressed() {
    for ip in [
        "2a02:cf40:add:4002:91f2:a9b2:e09a:6fc6",
        "1b11:a1b2:12b1:12a::11a:1b",
    ] {
        let row = map(&event(|e| e["actor"]["ip"] = json!(ip)));
        assert_eq!(row.ip_address, Some(ip.parse().unwrap()));
    }
}

#[test]
fn case_03_ip_and_email_missing_empty_or_null() {
    let missing = map(&event(|e| {
        e["actor"].as_object_mut().unwrap().remove("ip");
        e["actor"].as_object_mut().unwrap().remove("email");
    }));
    assert_eq!((missing.ip_address, missing.actor_email), (None, None));
    let empty = map(&event(|e| e["actor"]["ip"] = json!("")));
    assert_eq!(empty.ip_address, None);
    let null = map(&event(|e| {
        e["actor"]["ip"] = Value::Null;
        e["actor"]["email"] = Value::Null;
    }));
    assert_eq!((null.ip_address, null.actor_email), (None, None));
    let garbage = map(&event(|e| e["actor"]["ip"] = json!("not-an-ip")));
    assert_eq!(garbage.ip_address, None);
    assert!(
        garbage.raw_event.contains("not-an-ip"),
        "raw keeps the original"
    );
}

#[test]
fn case_04_actor_types_are_open_strings() {
    for t in ["user", "admin", "Cloudflare", "system", "robot"] {
        assert_eq!(
            map(&event(|e| e["actor"]["type"] = json!(t)))
                .actor_type
                .as_deref(),
            Some(t)
        );
    }
}

#[test]
fn case_05_emails_kept_as_given() {
    for email in ["zoë@exämple.com", "a+b@example.com", "ALICE@EXAMPLE.COM"] {
        let row = map(&event(|e| e["actor"]["email"] = json!(email)));
        assert_eq!(row.actor_email.as_deref(), Some(email));
    }
}

#[test]
fn case_06_metadata_shapes() {
    let meta = |v: Option<Value>| {
        map(&event(|e| match v {
            Some(v) => e["metadata"] = v,
            None => {
                e.as_object_mut().unwrap().remove("metadata");
            }
        }))
        .metadata
    };
    assert_eq!(meta(Some(json!({}))).as_deref(), Some("{}"));
    assert_eq!(meta(Some(Value::Null)), None);
    assert_eq!(meta(None), None);
    assert_eq!(meta(Some(json!("text"))).as_deref(), Some("\"text\""));
    assert_eq!(meta(Some(json!(42))).as_deref(), Some("42"));
    assert_eq!(meta(Some(json!([1, 2]))).as_deref(), Some("[1,2]"));
    let nested = meta(Some(json!({"value": true, "ttl": 1}))).unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(&nested).unwrap(),
        json!({"value": true, "ttl": 1})
    );
}

#[test]
fn case_07_and_08_values_survive_in_raw() {
    let huge = "x".repeat(1 << 20);
    for value in [
        json!(""),
        json!("null"),
        Value::Null,
        json!("{\"a\":1}"),
        json!(huge),
    ] {
        let raw = event(|e| {
            e["newValue"] = value.clone();
            e["oldValueJson"] = json!({"content": value, "nested": {"a": [1, 2, {"b": null}]}});
            e["newValueJson"] = json!(["not", "an", "object"]);
        });
        let row = map(&raw);
        assert_eq!(&*row.raw_event, raw.as_str());
    }
    let missing = map(&event(|e| {
        let o = e.as_object_mut().unwrap();
        o.remove("newValue");
        o.remove("oldValue");
    }));
    assert_eq!(missing.event_id, "d5b0f326-1232-4452-8858-1089bd7168ef");
}

#[test]
fn case_09_action_variants() {
    let no_info = map(&event(|e| {
        e["action"].as_object_mut().unwrap().remove("info");
    }));
    assert_eq!(no_info.action_type.as_deref(), Some("change_setting"));
    assert_eq!(
        map(&event(|e| e["action"]["result"] = json!(false)))
            .action_result
            .as_deref(),
        Some("false")
    );
    assert_eq!(
        map(&event(|e| e["action"]["type"] = json!("API_key_view")))
            .action_type
            .as_deref(),
        Some("API_key_view")
    );
}

#[test]
fn case_10_interface_variants() {
    for interface in [json!(""), json!("UI"), json!("API")] {
        let raw = event(|e| e["interface"] = interface.clone());
        assert_eq!(&*map(&raw).raw_event, raw.as_str());
    }
    map(&event(|e| {
        e.as_object_mut().unwrap().remove("interface");
    }));
}

#[test]
fn case_11_when_precisions_and_offsets() {
    let base = Utc.with_ymd_and_hms(2017, 4, 26, 17, 31, 7).unwrap();
    let micros = |us: i64| base + chrono::Duration::microseconds(us);
    let cases = [
        ("2017-04-26T17:31:07Z", micros(0)),
        ("2017-04-26T17:31:07.752Z", micros(752_000)),
        ("2017-04-26T17:31:07.87573Z", micros(875_730)),
        ("2017-04-26T17:31:07.214209Z", micros(214_209)),
        ("2017-04-26T17:31:07.214209999Z", micros(214_209)),
        ("2017-04-26T17:31:07+00:00", micros(0)),
        ("2017-04-26T23:01:07+05:30", micros(0)),
    ];
    for (when, expected) in cases {
        assert_eq!(
            map(&event(|e| e["when"] = json!(when))).timestamp,
            expected,
            "{when}"
        );
        assert_eq!(parse_when(when).unwrap(), expected);
    }
    for bad in [
        json!("yesterday"),
        json!(""),
        json!(1493227867),
        Value::Null,
    ] {
        let reason = map_v1(&event(|e| e["when"] = bad.clone()), ACCOUNT, now()).unwrap_err();
        assert!(reason.contains("`when`"), "{reason}");
    }
}

#[test]
fn case_14_resource_ids_kept_as_text() {
    for (id, t) in [
        ("10715065315", "DNS_record"),
        (
            "c6b5b0e1d24bfc6aab0e3e0b5f0fd9e3c6b5b0e1d24bfc6aab0e3e0b5f0fd9e3",
            "api_key",
        ),
        ("8d3396e8-c903-5a66-9421-000000000000", "d1.database"),
    ] {
        let row = map(&event(|e| e["resource"] = json!({"id": id, "type": t})));
        assert_eq!(
            (row.resource_id.as_deref(), row.resource_type.as_deref()),
            (Some(id), Some(t))
        );
    }
    let numeric = map(&event(|e| e["resource"]["id"] = json!(10715065315u64)));
    assert_eq!(numeric.resource_id.as_deref(), Some("10715065315"));
}

#[test]
fn case_15_owner_missing_or_empty() {
    map(&event(|e| {
        e.as_object_mut().unwrap().remove("owner");
    }));
    map(&event(|e| e["owner"]["id"] = json!("")));
}

#[test]
fn case_16_unknown_keys_kept_in_raw() {
    let raw = event(|e| e["foo"] = json!({"bar": [1, "two"]}));
    assert!(map(&raw)
        .raw_event
        .contains("\"foo\":{\"bar\":[1,\"two\"]}"));
}

#[test]
fn unusable_events_are_rejected_with_a_reason() {
    let cases = [
        (
            event(|e| {
                e.as_object_mut().unwrap().remove("id");
            }),
            "`id` is missing",
        ),
        (event(|e| e["id"] = json!("")), "`id` is empty"),
        (event(|e| e["id"] = json!(7)), "`id` is a number"),
        ("[1,2]".to_owned(), "not a JSON object"),
        ("{\"id\":".to_owned(), "not valid JSON"),
        (
            event(|e| e["metadata"] = json!("x"))
                .replace("\"x\"", &format!("{}1{}", "[".repeat(200), "]".repeat(200))),
            "recursion limit",
        ),
    ];
    for (raw, expected) in cases {
        let reason = map_v1(&raw, ACCOUNT, now()).unwrap_err();
        assert!(reason.contains(expected), "{raw}: {reason}");
    }
}

/// The text `\u0000` (six characters a member can type into a token name) is ordinary text;
/// only a real NUL is special, and even then the event is stored, with the NUL written as that
/// text, never dead-lettered.
#[test]
fn nul_text_is_text_and_a_real_nul_is_kept_as_text() {
    let text = event(|e| e["metadata"] = json!({"token_name": "prod\\u0000hidden"}));
    assert!(text.contains(r#""prod\\u0000hidden""#), "{text}");
    let row = map(&text);
    assert_eq!(
        row.raw_event.as_ref(),
        text,
        "nothing to escape: the raw event as received"
    );
    assert_eq!(
        row.metadata.as_deref(),
        Some(r#"{"token_name":"prod\\u0000hidden"}"#)
    );

    let real = event(|e| e["actor"]["email"] = json!("a\u{0}b"));
    assert!(real.contains(r#""a\u0000b""#), "{real}");
    let row = map(&real);
    assert_eq!(row.actor_email.as_deref(), Some(r"a\u0000b"));
    assert!(!row.raw_event.contains('\0'));
    assert!(
        row.raw_event.contains(r#""a\\u0000b""#),
        "{}",
        row.raw_event
    );

    // Backslashes before it count: an escaped backslash then a real NUL, and two escaped
    // backslashes then the text `u0000`.
    assert_eq!(escape_nul(r#""\\\u0000""#), r#""\\\\u0000""#);
    assert_eq!(escape_nul(r#""\\\\u0000""#), r#""\\\\u0000""#);
}
