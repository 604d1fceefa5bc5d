//! The emulator is ours and held to the real API's behaviour: routing, auth and its error bodies,
//! the window and paging rules, filters, rate limiting and fault knobs.

use std::time::Duration;

use crate::common::*;
use cfaudit_emulator::{EmulatorConfig, DEMO_ACCOUNT, DEMO_TOKEN};
use reqwest::StatusCode;
use serde_json::{json, Value};

struct Api {
    http: reqwest::Client,
    base: String,
}

impl Api {
    fn new(config: EmulatorConfig) -> (Api, RunningEmulator) {
        let emu = spawn_emulator(config);
        (
            Api {
                http: reqwest::Client::new(),
                base: emu.base_url.clone(),
            },
            emu,
        )
    }

    async fn get(
        &self,
        path: &str,
        query: &[(&str, &str)],
    ) -> (StatusCode, reqwest::header::HeaderMap, Value) {
        self.raw(
            self.http
                .get(format!("{}{path}", self.base))
                .query(query)
                .bearer_auth(DEMO_TOKEN),
        )
        .await
    }

    async fn logs(&self, query: &[(&str, &str)]) -> (StatusCode, Value) {
        let (status, _, body) = self
            .get(&format!("/accounts/{DEMO_ACCOUNT}/audit_logs"), query)
            .await;
        (status, body)
    }

    async fn raw(
        &self,
        request: reqwest::RequestBuilder,
    ) -> (StatusCode, reqwest::header::HeaderMap, Value) {
        let response = request.send().await.unwrap();
        let (status, headers) = (response.status(), response.headers().clone());
        let text = response.text().await.unwrap();
        (
            status,
            headers,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }
}

fn ids(body: &Value) -> Vec<String> {
    body["result"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap_or("").to_owned())
        .collect()
}

fn error_code(body: &Value) -> i64 {
    body["errors"][0]["code"].as_i64().unwrap()
}

#[actix_web::test]
async fn success_envelope_has_no_result_info_and_desc_is_the_default() {
    let (api, emu) = Api::new(emulator_config(300));
    let (status, body) = api.logs(&[]).await;
    assert_eq!(status, 200);
    assert_eq!(body["success"], true);
    assert_eq!(body["errors"], json!([]));
    assert_eq!(body["messages"], json!([]));
    assert!(body.get("result_info").is_none());
    assert_eq!(ids(&body).len(), 100, "per_page defaults to 100");
    let newest = emu.emulator.events().last().unwrap().id.clone();
    assert_eq!(ids(&body)[0], newest, "direction defaults to desc");
}

#[actix_web::test]
async fn since_is_inclusive_before_exclusive_and_pages_cover_the_window_once() {
    let (api, emu) = Api::new(emulator_config(500));
    let events = emu.emulator.events();
    let since = events[100].when;
    let before = events[400].when;
    let window: Vec<String> = events
        .iter()
        .filter(|e| e.when >= since && e.when < before)
        .map(|e| e.id.clone())
        .collect();
    let mut seen = Vec::new();
    for page in 1.. {
        let page = page.to_string();
        let (status, body) = api
            .logs(&[
                ("since", &since.to_rfc3339()),
                ("before", &before.to_rfc3339()),
                ("direction", "asc"),
                ("per_page", "37"),
                ("page", &page),
            ])
            .await;
        assert_eq!(status, 200);
        let got = ids(&body);
        seen.extend(got.iter().cloned());
        if got.len() < 37 {
            break;
        }
    }
    assert_eq!(
        seen, window,
        "asc by (when, id), since inclusive, before exclusive"
    );
}

#[actix_web::test]
async fn date_only_bounds_and_bad_parameters() {
    let (api, _emu) = Api::new(emulator_config(50));
    assert_eq!(
        api.logs(&[("since", "2000-01-01"), ("before", "2999-01-01")])
            .await
            .0,
        200
    );
    for (key, value) in [
        ("since", "yesterday"),
        ("before", "1/2/2026"),
        ("per_page", "1001"),
        ("per_page", "0"),
        ("page", "x"),
        ("direction", "up"),
        ("actor.ip", "300.1.1.1"),
    ] {
        let (status, body) = api.logs(&[(key, value)]).await;
        assert_eq!(status, 400, "{key}={value}");
        assert_eq!(body["success"], false);
        assert_eq!(body["result"], Value::Null);
    }
}

#[actix_web::test]
async fn past_the_last_page_is_empty_or_400_when_configured() {
    let mut config = emulator_config(200);
    let (api, _emu) = Api::new(config.clone());
    let (status, body) = api.logs(&[("per_page", "100"), ("page", "3")]).await;
    assert_eq!((status, ids(&body).len()), (StatusCode::OK, 0));
    config.past_end_400 = true;
    let (api, _emu) = Api::new(config);
    let (status, _) = api.logs(&[("per_page", "100"), ("page", "3")]).await;
    assert_eq!(
        status, 400,
        "the PostHog case: 400 after an exactly full page"
    );
}

#[actix_web::test]
async fn filters_work_as_documented() {
    let (api, emu) = Api::new(emulator_config(2_000));
    let events = emu.emulator.events();
    let parsed: Vec<Value> = events
        .iter()
        .map(|e| serde_json::from_slice(&e.json).unwrap())
        .collect();
    let count = |f: &dyn Fn(&Value) -> bool| parsed.iter().filter(|e| f(e)).count();
    let all = [("per_page", "1000"), ("direction", "asc")];
    let fetch_all = |extra: Vec<(&'static str, String)>| {
        let api = &api;
        async move {
            let mut total = Vec::new();
            for page in 1.. {
                let page = page.to_string();
                let mut q: Vec<(&str, &str)> = all.to_vec();
                q.push(("page", &page));
                for (k, v) in &extra {
                    q.push((k, v));
                }
                let (_, body) = api.logs(&q).await;
                let got = body["result"].as_array().unwrap().clone();
                let n = got.len();
                total.extend(got);
                if n < 1000 {
                    break;
                }
            }
            total
        }
    };
    let by_type = fetch_all(vec![("action.type", "login".into())]).await;
    assert_eq!(by_type.len(), count(&|e| e["action"]["type"] == "login"));
    let by_email = fetch_all(vec![("actor.email", "ALICE@example.com".into())]).await;
    assert_eq!(
        by_email.len(),
        count(&|e| e["actor"]["email"]
            .as_str()
            .is_some_and(|m| m.eq_ignore_ascii_case("alice@example.com")))
    );
    assert!(!by_email.is_empty());
    let by_cidr = fetch_all(vec![("actor.ip", "198.51.100.0/25".into())]).await;
    let in_cidr = |e: &Value| {
        e["actor"]["ip"]
            .as_str()
            .and_then(|ip| ip.parse::<std::net::Ipv4Addr>().ok())
            .is_some_and(|ip| ip.octets()[..3] == [198, 51, 100] && ip.octets()[3] < 128)
    };
    assert_eq!(by_cidr.len(), count(&in_cidr));
    let v6 = fetch_all(vec![("actor.ip", "2a02:cf40::/32".into())]).await;
    assert!(
        !v6.is_empty()
            && v6
                .iter()
                .all(|e| e["actor"]["ip"].as_str().unwrap().starts_with("2a02:cf40:"))
    );
    let hidden = fetch_all(vec![("hide_user_logs", "true".into())]).await;
    assert_eq!(hidden.len(), count(&|e| e["resource"]["type"] != "user"));
    let zone = fetch_all(vec![("zone.name", "zone3.example.com".into())]).await;
    assert_eq!(
        zone.len(),
        count(&|e| e["metadata"]["zone_name"] == "zone3.example.com")
    );
    let one = fetch_all(vec![("id", events[7].id.clone())]).await;
    assert_eq!(one.len(), 1);
}

#[actix_web::test]
async fn authentication_failures_have_the_documented_bodies() {
    let (api, _emu) = Api::new(emulator_config(10));
    let url = format!("{}/accounts/{DEMO_ACCOUNT}/audit_logs", api.base);
    let cases = [
        (api.http.get(&url), 400, 6003, Some(6111)),
        (
            api.http.get(&url).header("Authorization", "Bearer"),
            400,
            6003,
            Some(6111),
        ),
        (
            api.http.get(&url).header("Authorization", "Token abc"),
            400,
            6003,
            Some(6111),
        ),
        (
            api.http.get(&url).bearer_auth("not-the-token"),
            401,
            9109,
            None,
        ),
        (
            api.http
                .get(&url)
                .header("X-Auth-Email", "a@b.c")
                .header("X-Auth-Key", "short"),
            400,
            6003,
            Some(6103),
        ),
        (
            api.http
                .get(format!(
                    "{}/accounts/ffffffffffffffffffffffffffffffff/audit_logs",
                    api.base
                ))
                .bearer_auth(DEMO_TOKEN),
            403,
            10000,
            None,
        ),
    ];
    for (request, status, code, chain) in cases {
        let (got_status, _, body) = api.raw(request).await;
        assert_eq!(got_status.as_u16(), status, "{body}");
        assert_eq!(body["success"], false);
        assert_eq!(body["result"], Value::Null);
        assert_eq!(body["messages"], json!([]));
        assert_eq!(error_code(&body), code);
        if let Some(chain) = chain {
            assert_eq!(body["errors"][0]["error_chain"][0]["code"], chain);
        }
    }
}

#[actix_web::test]
async fn unknown_routes_and_methods() {
    let (api, _emu) = Api::new(emulator_config(10));
    let (status, _, body) = api.get("/nope", &[]).await;
    assert_eq!((status.as_u16(), error_code(&body)), (404, 7003));
    let (status, _, body) = api
        .raw(
            api.http
                .post(format!("{}/accounts/{DEMO_ACCOUNT}/audit_logs", api.base))
                .bearer_auth(DEMO_TOKEN),
        )
        .await;
    assert_eq!(status, 405, "{body}");
    let (status, _, _) = api.get("/user/audit_logs", &[]).await;
    assert_eq!(status, 200);
}

#[actix_web::test]
async fn rate_limit_window_and_lockout() {
    let mut config = emulator_config(10);
    config.rate_limit = 3;
    config.lockout_seconds = 2;
    let (api, _emu) = Api::new(config);
    let path = format!("/accounts/{DEMO_ACCOUNT}/audit_logs");
    let (_, headers, _) = api.get(&path, &[]).await;
    assert_eq!(headers["ratelimit"], "\"default\";r=2;t=300");
    assert_eq!(headers["ratelimit-policy"], "\"default\";q=3;w=300");
    api.get(&path, &[]).await;
    api.get(&path, &[]).await;
    let (status, headers, body) = api.get(&path, &[]).await;
    assert_eq!(status, 429);
    assert_eq!(error_code(&body), 971);
    assert_eq!(headers["retry-after"], "2");
    // Every request during the lockout is refused too.
    assert_eq!(api.get(&path, &[]).await.0, 429);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(api.get(&path, &[]).await.0, 200, "the lockout ends");
}

#[actix_web::test]
async fn fault_knobs() {
    let mut config = emulator_config(10);
    config.faults.fault_5xx_every = 2;
    config.faults.fault_truncate_every = 3;
    config.faults.fault_429_every = 5;
    config.faults.retry_after_seconds = 7;
    config.faults.fault_success_false_every = 7;
    config.errors_null = true;
    config.result_info = true;
    let (api, _emu) = Api::new(config);
    let mut seen = Vec::new();
    for _ in 0..10 {
        let (status, headers, body) = api
            .get(&format!("/accounts/{DEMO_ACCOUNT}/audit_logs"), &[])
            .await;
        seen.push(match (status.as_u16(), &body) {
            (429, _) => {
                assert_eq!(headers["retry-after"], "7");
                "429"
            }
            (s, _) if s >= 500 => "5xx",
            (200, Value::String(_)) => "truncated",
            (200, b) if b["success"] == false => "success_false",
            (200, b) => {
                assert_eq!(b["errors"], Value::Null);
                assert_eq!(b["result_info"], json!({"page": 1, "per_page": 100}));
                "ok"
            }
            other => panic!("{other:?}"),
        });
    }
    // Request 10 is both a 5xx and a 429 turn: 429 wins.
    assert_eq!(
        seen,
        [
            "ok",
            "5xx",
            "truncated",
            "5xx",
            "429",
            "5xx",
            "success_false",
            "5xx",
            "truncated",
            "429"
        ]
    );
}

#[actix_web::test]
async fn events_cover_the_edge_shapes_and_are_deterministic() {
    let events = cfaudit_emulator::generate(&{
        let mut c = emulator_config(3_000);
        c.end = Some("2026-06-01T00:00:00Z".parse().unwrap());
        c
    });
    let again = cfaudit_emulator::generate(&{
        let mut c = emulator_config(3_000);
        c.end = Some("2026-06-01T00:00:00Z".parse().unwrap());
        c
    });
    assert_eq!(events, again, "same seed, same events");
    let whens: Vec<&str> = events
        .iter()
        .map(|(_, e)| e["when"].as_str().unwrap())
        .collect();
    let fraction_digits = |w: &str| {
        w.split('.')
            .nth(1)
            .map(|f| f.trim_end_matches('Z').len())
            .unwrap_or(0)
    };
    for digits in [0, 3, 5, 6, 9] {
        assert!(
            whens
                .iter()
                .any(|w| w.ends_with('Z') && fraction_digits(w) == digits),
            "{digits} fractional digits"
        );
    }
    assert!(whens.iter().any(|w| w.ends_with("+05:30")));
    assert!(whens.iter().any(|w| w.ends_with("+00:00")));
    let has = |f: &dyn Fn(&Value) -> bool| events.iter().any(|(_, e)| f(e));
    assert!(has(&|e| e["actor"] == json!({"id": "1", "type": "system"})));
    assert!(has(&|e| e["metadata"].is_number()));
    assert!(has(&|e| e.get("metadata").is_none()));
    assert!(has(&|e| e["newValueJson"].is_object()));
    assert!(has(&|e| e.get("foo").is_some()));
    assert!(has(&|e| e["actor"]["email"] == "zoë@exämple.com"));
    let equal_neighbours = events.windows(2).filter(|w| w[0].0 == w[1].0).count();
    assert!(
        equal_neighbours > 300,
        "bursts of identical `when`: {equal_neighbours}"
    );
}

#[actix_web::test]
async fn a_reset_cuts_the_body_in_the_middle() {
    let mut config = emulator_config(500);
    config.faults.fault_reset_every = 1;
    let (api, _emu) = Api::new(config);
    let response = api
        .http
        .get(format!("{}/accounts/{DEMO_ACCOUNT}/audit_logs", api.base))
        .bearer_auth(DEMO_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "the status line and headers arrive");
    assert!(response.text().await.is_err(), "the body must break off");
}

#[actix_web::test]
async fn the_repeat_fault_serves_the_previous_answer_again_and_is_counted() {
    let mut config = emulator_config(10);
    config.faults.fault_repeat_every = 2;
    let (api, emu) = Api::new(config);
    let (_, first) = api.logs(&[("per_page", "3")]).await;
    let (_, repeated) = api.logs(&[("per_page", "3"), ("page", "2")]).await;
    let (_, second) = api.logs(&[("per_page", "3"), ("page", "2")]).await;
    assert_eq!(repeated, first);
    assert_ne!(second, first);
    assert_eq!(second["result"].as_array().unwrap().len(), 3);
    assert_eq!(
        emu.emulator.faults_injected()["fault_repeat_every"],
        1,
        "{:?}",
        emu.emulator.faults_injected()
    );
}

/// The emulator's health check, for real: `cfaudit healthcheck` against the emulator's
/// `/healthz` on the port the compose file gives both.
#[actix_rt::test]
async fn the_emulator_answers_the_health_check_it_is_given() {
    let mut config = crate::common::emulator_config(10);
    config.listen = format!("127.0.0.1:{}", crate::common::free_port())
        .parse()
        .unwrap();
    let running = crate::common::spawn_emulator(config);
    let addr = running.base_url.split('/').nth(2).unwrap().to_owned();
    let env = vec![("METRICS_ADDR".to_owned(), addr.clone())];
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let check = crate::common::finish(crate::common::cfaudit(&["healthcheck"], &env)).await;
        if check.success {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "unhealthy: {}",
            check.stderr
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    running.handle.stop(true).await;
}

/// Several accounts on one token: each with a data set of its own, listed by `/accounts` page
/// by page with the one the token may not read; a deleted account answers as the API does for
/// an identifier that no longer exists.
#[actix_web::test]
async fn accounts_are_listed_page_by_page_and_each_serves_its_own_events() {
    let mut config = emulator_config(50);
    config.extra_accounts = 2;
    config.no_access_account = Some("feedfacefeedfacefeedfacefeedface".into());
    config.deleted_account = Some("deadbeefdeadbeefdeadbeefdeadbeef".into());
    let (api, emu) = Api::new(config);
    let readable = emu.emulator.accounts();
    assert_eq!(readable.len(), 3);
    let mut listed = Vec::new();
    for page in ["1", "2"] {
        let (status, _, body) = api
            .get("/accounts", &[("page", page), ("per_page", "3")])
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["result_info"]["total_count"], 4, "{body}");
        assert_eq!(body["result_info"]["total_pages"], 2, "{body}");
        for account in body["result"].as_array().unwrap() {
            listed.push(account["id"].as_str().unwrap().to_owned());
        }
    }
    let mut wanted = readable.clone();
    wanted.push("feedfacefeedfacefeedfacefeedface".into());
    assert_eq!(listed, wanted, "the deleted account is not listed");
    let (status, _, _) = api.get("/accounts", &[("per_page", "51")]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    let mut seen = std::collections::BTreeSet::new();
    for account in &readable {
        let (status, _, body) = api
            .get(
                &format!("/accounts/{account}/audit_logs"),
                &[("per_page", "1000"), ("since", "2000-01-01")],
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let ids: Vec<String> = body["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["id"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(ids.len(), 50, "{account}");
        for id in ids {
            assert!(
                seen.insert(id),
                "{account}: an id of another account's data set"
            );
        }
    }
    let (status, _, body) = api
        .get("/accounts/feedfacefeedfacefeedfacefeedface/audit_logs", &[])
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(body["errors"][0]["code"], 10000, "{body}");
    let (status, _, body) = api
        .get("/accounts/deadbeefdeadbeefdeadbeefdeadbeef/logs/audit", &[])
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["errors"][0]["code"], 7003, "{body}");
}
