//! The Grafana dashboards, checked without Grafana (it cannot be installed here): every
//! panel's SQL runs against a real PostgreSQL holding data written by cfaudit, and every
//! PromQL expression runs against a real Prometheus (Debian's package) that scraped a running
//! cfaudit with the project's own scrape config and alert rules. Each must run without error
//! and return data. Only the Grafana macros and variables substituted below may be used, so
//! a dashboard cannot depend on something this test does not exercise.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::common::*;
use cfaudit_emulator::DEMO_ACCOUNT;
use serde_json::Value;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const POSTGRES_UID: &str = "cfaudit-postgres";
const PROMETHEUS_UID: &str = "cfaudit-prometheus";

fn dashboard(name: &str) -> Value {
    let path = Path::new(ROOT).join("grafana/dashboards").join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn dashboards() -> Vec<(String, Value)> {
    let mut all: Vec<(String, Value)> =
        std::fs::read_dir(Path::new(ROOT).join("grafana/dashboards"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".json"))
            .map(|n| (n.clone(), dashboard(&n)))
            .collect();
    all.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(all.len(), 2, "pipeline health and audit activity");
    all
}

/// `(dashboard, panel title, query)` of every target on a datasource `uid`; panels and
/// variables alike.
fn queries(uid: &str) -> Vec<(String, String, String)> {
    let mut found = Vec::new();
    for (file, d) in dashboards() {
        for panel in d["panels"].as_array().unwrap() {
            let title = panel["title"].as_str().unwrap().to_owned();
            for target in panel["targets"].as_array().unwrap() {
                let source = &target["datasource"]["uid"];
                let source = if source.is_null() {
                    &panel["datasource"]["uid"]
                } else {
                    source
                };
                if source == uid {
                    let query = target["rawSql"].as_str().or(target["expr"].as_str());
                    found.push((file.clone(), title.clone(), query.unwrap().to_owned()));
                }
            }
        }
        for variable in d["templating"]["list"].as_array().unwrap() {
            if variable["datasource"]["uid"] == uid {
                let query = variable["query"].as_str().unwrap().to_owned();
                found.push((
                    file.clone(),
                    format!("variable {}", variable["name"]),
                    query,
                ));
            }
        }
    }
    found
}

#[test]
fn every_panel_is_well_formed_and_on_a_provisioned_datasource() {
    let provisioned = std::fs::read_to_string(
        Path::new(ROOT).join("grafana/provisioning/datasources/datasources.yml"),
    )
    .unwrap();
    let provisioned: Value = serde_yaml_ng::from_str(&provisioned).unwrap();
    let uids: Vec<&str> = provisioned["datasources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["uid"].as_str().unwrap())
        .collect();
    assert_eq!(uids, [POSTGRES_UID, PROMETHEUS_UID]);
    let provider = std::fs::read_to_string(
        Path::new(ROOT).join("grafana/provisioning/dashboards/dashboards.yml"),
    )
    .unwrap();
    assert!(provider.contains("path: /var/lib/grafana/dashboards"));

    let mut dashboard_uids = Vec::new();
    for (file, d) in dashboards() {
        dashboard_uids.push(d["uid"].as_str().unwrap().to_owned());
        let mut ids = Vec::new();
        for panel in d["panels"].as_array().unwrap() {
            let title = panel["title"].as_str().unwrap_or_default();
            assert!(!title.is_empty(), "{file}: a panel without a title");
            assert_ne!(
                panel["type"], "row",
                "{file}: rows hide panels from this test"
            );
            assert!(panel["gridPos"].is_object(), "{file}: {title}: no gridPos");
            ids.push(panel["id"].as_u64().unwrap());
            let uid = panel["datasource"]["uid"].as_str().unwrap();
            assert!(
                uids.contains(&uid),
                "{file}: {title}: unknown datasource {uid}"
            );
            let targets = panel["targets"].as_array().unwrap();
            assert!(!targets.is_empty(), "{file}: {title}: no query");
            for target in targets {
                assert!(target["refId"].is_string(), "{file}: {title}");
                assert!(
                    target["rawSql"].is_string() || target["expr"].is_string(),
                    "{file}: {title}: neither rawSql nor expr"
                );
            }
        }
        let unique: std::collections::BTreeSet<_> = ids.iter().collect();
        assert_eq!(unique.len(), ids.len(), "{file}: panel ids repeat");
    }
    dashboard_uids.sort();
    assert_eq!(
        dashboard_uids,
        ["cfaudit-audit-activity", "cfaudit-pipeline-health"]
    );
}

/// Grafana's PostgreSQL macros and the `account` and `version` variables, as Grafana expands
/// them for the last 60 days and "All" (or one account, one version).
fn expand_sql(sql: &str, account: &str, version: &str) -> String {
    let (from, to) = ("now() - interval '60 days'", "now()");
    let mut out = String::new();
    let mut rest = sql;
    while let Some(at) = rest.find("$__timeFilter(") {
        out.push_str(&rest[..at]);
        let after = &rest[at + "$__timeFilter(".len()..];
        let close = after.find(')').unwrap();
        out.push_str(&format!("{} BETWEEN {from} AND {to}", &after[..close]));
        rest = &after[close + 1..];
    }
    out.push_str(rest);
    // `${account:regex}`: the pipeline dashboard's Prometheus variable in SQL, as a regex
    // (`.*` for "All").
    let regex = match account {
        "'%'" => ".*".to_owned(),
        quoted => quoted.trim_matches('\'').to_owned(),
    };
    let out = out
        .replace("$__timeFrom()", from)
        .replace("$__timeTo()", to)
        .replace("${account:regex}", &regex)
        .replace("$account", account)
        .replace("$version", version);
    assert!(
        !out.contains('$'),
        "a macro or variable this test does not know: {sql}"
    );
    out
}

/// The `version` variable's "All" and one version, as Grafana expands them.
const ALL_VERSIONS: &str = "'v1','v2'";
const V2: &str = "'v2'";

/// The test data of the panel tests: both API versions (v2 has the logins and products),
/// dead letters included, for their panel.
fn panel_data() -> cfaudit_emulator::EmulatorConfig {
    let mut config = emulator_config(3_000);
    config.v2_events = Some(2_000);
    config.invalid_every = 97;
    config
}

/// The panel tests' harness collects both versions.
fn both_versions(mut h: Harness) -> Harness {
    h.set("CLOUDFLARE_API_VERSIONS", "v1,v2");
    h
}

#[actix_rt::test]
async fn every_panel_sql_runs_on_real_data_and_returns_rows() {
    every_panel_sql_returns_rows(both_versions(Harness::new(panel_data()).await)).await;
}

/// On TimescaleDB the aggregates are continuous aggregates, not views.
#[actix_rt::test]
async fn every_panel_sql_runs_on_timescaledb_and_returns_rows() {
    let test = "every_panel_sql_runs_on_timescaledb_and_returns_rows";
    if let Some(h) = Harness::on_timescale(test, panel_data()).await {
        every_panel_sql_returns_rows(both_versions(h)).await;
    }
}

async fn every_panel_sql_returns_rows(h: Harness) {
    run_once(h.config()).await.unwrap();
    let pool = h.db.pool().await;
    let sql = queries(POSTGRES_UID);
    assert!(sql.len() >= 10, "{sql:?}");
    let mut report = Vec::new();
    let one_account = format!("'{DEMO_ACCOUNT}'");
    for (account, version) in [
        ("'%'", ALL_VERSIONS),
        (one_account.as_str(), ALL_VERSIONS),
        (one_account.as_str(), V2),
    ] {
        for (file, title, query) in &sql {
            let expanded = expand_sql(query, account, version);
            let rows = sqlx::raw_sql(sqlx::AssertSqlSafe(expanded.clone()))
                .fetch_all(&pool)
                .await
                .unwrap_or_else(|e| panic!("{file}: {title}: {e}\n{expanded}"));
            assert!(!rows.is_empty(), "{file}: {title}: no rows\n{expanded}");
            report.push(format!("{title} ({version}): {} rows", rows.len()));
        }
    }
    println!("{}", report.join("\n"));
    pool.close().await;
    h.finish().await;
}

/// The rows a panel's query returns over the test's range for the `version` variable's value,
/// each column as text.
async fn panel_rows(pool: &sqlx::PgPool, title: &str, version: &str) -> Vec<Vec<String>> {
    use sqlx::Row;
    let (_, _, query) = queries(POSTGRES_UID)
        .into_iter()
        .find(|(_, t, _)| t == title)
        .unwrap_or_else(|| panic!("no panel {title:?}"));
    let expanded = expand_sql(&query, &format!("'{DEMO_ACCOUNT}'"), version);
    let rows = sqlx::raw_sql(sqlx::AssertSqlSafe(expanded.clone()))
        .fetch_all(pool)
        .await
        .unwrap_or_else(|e| panic!("{title}: {e}\n{expanded}"));
    rows.iter()
        .map(|row| {
            (0..row.columns().len())
                .map(|i| {
                    row.try_get::<i64, _>(i)
                        .map(|v| v.to_string())
                        .or_else(|_| row.try_get::<String, _>(i))
                        .unwrap_or_default()
                })
                .collect()
        })
        .collect()
}

/// The panels show what the test data holds, counted here from the emulator's events by the
/// API facts (not through cfaudit's mapping): totals, failures, distinct actors and IPs, the
/// breakdown by action type, and the dead letters.
#[actix_rt::test]
async fn panels_show_the_counts_of_the_test_data() {
    panels_show_the_counts(both_versions(Harness::new(panel_data()).await)).await;
}

/// The same on TimescaleDB: its continuous aggregates agree with the data after a backfill.
#[actix_rt::test]
async fn panels_show_the_counts_of_the_test_data_on_timescaledb() {
    let test = "panels_show_the_counts_of_the_test_data_on_timescaledb";
    if let Some(h) = Harness::on_timescale(test, panel_data()).await {
        panels_show_the_counts(both_versions(h)).await;
    }
}

async fn panels_show_the_counts(h: Harness) {
    use std::collections::{BTreeMap, BTreeSet};
    run_once(h.config()).await.unwrap();
    let mut events = h.emu.emulator.events();
    let v2_events = h.emu.emulator.events_v2();
    events.extend(v2_events.iter().cloned());
    let oldest = events.iter().map(|e| e.when).min().unwrap();
    assert!(
        oldest > chrono::Utc::now() - chrono::Duration::days(59),
        "the panels' range of 60 days must hold every event"
    );
    let truth: Vec<_> = events
        .iter()
        .filter_map(|e| expected_row(&e.json))
        .collect();
    let unreadable = events.len() - truth.len();
    assert!(unreadable > 0 && truth.len() > 4_000, "{unreadable}");
    let text = |row: &BTreeMap<&str, Value>, column: &str| row[column].as_str().map(str::to_owned);
    let v2 = |row: &&BTreeMap<&str, Value>| text(row, "api_version").as_deref() == Some("v2");
    // An actor as the panels name one: the e-mail, or the type in brackets.
    let actor_of = |r: &BTreeMap<&str, Value>| {
        text(r, "actor_email").unwrap_or_else(|| {
            format!(
                "({})",
                text(r, "actor_type").unwrap_or_else(|| "unknown".into())
            )
        })
    };
    let v2_rows = truth.iter().filter(v2).count();
    assert!(v2_rows > 1_500 && v2_rows < truth.len(), "{v2_rows}");
    // v2's products and logins, from the events as received (`resource.product`,
    // `action.type` login), not from the columns the mapping fills.
    let mut by_product: BTreeMap<String, u64> = BTreeMap::new();
    let mut logins: BTreeMap<(String, String), (u64, u64)> = BTreeMap::new();
    for r in truth.iter().filter(v2) {
        let raw = &r["raw_event"];
        let product = raw["resource"]["product"].as_str().unwrap_or("(none)");
        *by_product.entry(product.to_owned()).or_default() += 1;
        if raw["action"]["type"] == "login" {
            let key = (actor_of(r), text(r, "ip_address").unwrap_or_default());
            let entry = logins.entry(key).or_default();
            entry.0 += 1;
            entry.1 += u64::from(raw["action"]["result"] == "failure");
        }
    }
    let all_logins: u64 = logins.values().map(|(all, _)| all).sum();
    let failed_logins: u64 = logins.values().map(|(_, failed)| failed).sum();
    assert!(by_product.len() > 2 && failed_logins > 0, "{by_product:?}");
    let failed = truth
        .iter()
        .filter(|r| {
            matches!(
                text(r, "action_result").as_deref(),
                Some("false" | "failure")
            )
        })
        .count();
    let actors: BTreeSet<String> = truth.iter().map(&actor_of).collect();
    let ips: BTreeSet<String> = truth.iter().filter_map(|r| text(r, "ip_address")).collect();
    let mut by_action: BTreeMap<String, u64> = BTreeMap::new();
    for r in &truth {
        *by_action
            .entry(text(r, "action_type").unwrap_or_else(|| "(none)".into()))
            .or_default() += 1;
    }
    assert!(failed > 0 && actors.len() > 1 && ips.len() > 1 && by_action.len() > 1);
    assert!(by_action.len() <= 20, "the panel shows 20 action types");

    let pool = h.db.pool().await;
    let one = |rows: Vec<Vec<String>>| rows[0][0].clone();
    assert_eq!(
        one(panel_rows(&pool, "Events", ALL_VERSIONS).await),
        truth.len().to_string()
    );
    assert_eq!(
        one(panel_rows(&pool, "Failed events", ALL_VERSIONS).await),
        failed.to_string()
    );
    assert_eq!(
        one(panel_rows(&pool, "Distinct actors", ALL_VERSIONS).await),
        actors.len().to_string()
    );
    assert_eq!(
        one(panel_rows(&pool, "Distinct IP addresses", ALL_VERSIONS).await),
        ips.len().to_string()
    );
    let shown: BTreeMap<String, u64> = panel_rows(&pool, "Activity by action type", ALL_VERSIONS)
        .await
        .into_iter()
        .map(|row| (row[0].clone(), row[1].parse().unwrap()))
        .collect();
    assert_eq!(shown, by_action);
    assert_eq!(
        one(panel_rows(&pool, "Events", V2).await),
        v2_rows.to_string(),
        "the version variable selects one version's events"
    );
    let shown: BTreeMap<String, u64> = panel_rows(&pool, "Activity by product", V2)
        .await
        .into_iter()
        .map(|row| (row[0].clone(), row[1].parse().unwrap()))
        .collect();
    assert_eq!(shown, by_product);
    let shown: BTreeMap<(String, String), (u64, u64)> =
        panel_rows(&pool, "Logins by actor and IP address", V2)
            .await
            .into_iter()
            .map(|row| {
                (
                    (row[0].clone(), row[1].clone()),
                    (row[2].parse().unwrap(), row[3].parse().unwrap()),
                )
            })
            .collect();
    // The table shows the 50 pairs with the most failed (then all) logins, each as counted
    // here; which of equally ranked pairs make the cut depends on the database's collation.
    assert_eq!(shown.len(), logins.len().min(50));
    for (pair, counts) in &shown {
        assert_eq!(logins.get(pair), Some(counts), "{pair:?}");
    }
    let ranked = |counts: Vec<(u64, u64)>| {
        let mut ranks: Vec<(u64, u64)> = counts.into_iter().map(|(a, f)| (f, a)).collect();
        ranks.sort_unstable_by(|a, b| b.cmp(a));
        ranks.truncate(50);
        ranks
    };
    assert_eq!(
        ranked(shown.values().copied().collect()),
        ranked(logins.values().copied().collect()),
        "the most failed logins first"
    );
    // Top actors, top addresses, actors with failures: every row shown is the truth for its
    // actor or address (events, failures, distinct addresses or actors), and they are the
    // busiest (most failing) ones.
    let is_failed = |r: &BTreeMap<&str, Value>| {
        matches!(
            text(r, "action_result").as_deref(),
            Some("false" | "failure")
        )
    };
    type Tally = (u64, u64, BTreeSet<String>, BTreeSet<String>);
    let mut by_actor: BTreeMap<String, Tally> = BTreeMap::new();
    let mut by_ip: BTreeMap<String, Tally> = BTreeMap::new();
    // An actor's distinct types (the panel lists them comma-separated, in the database's
    // collation order: the database sorts the expected list too).
    let mut actor_types: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for r in &truth {
        let failed = is_failed(r);
        let ip = text(r, "ip_address");
        actor_types
            .entry(actor_of(r))
            .or_default()
            .insert(text(r, "actor_type").unwrap_or_else(|| "unknown".into()));
        let actor = by_actor.entry(actor_of(r)).or_default();
        actor.0 += 1;
        actor.1 += u64::from(failed);
        if let Some(ip) = &ip {
            actor.2.insert(ip.clone());
            if failed {
                actor.3.insert(ip.clone());
            }
            let address = by_ip.entry(ip.clone()).or_default();
            address.0 += 1;
            address.1 += u64::from(failed);
            if let Some(email) = text(r, "actor_email") {
                address.2.insert(email);
            }
        }
    }
    let top = |counts: Vec<u64>| {
        let mut counts = counts;
        counts.sort_unstable_by(|a, b| b.cmp(a));
        counts.truncate(20);
        counts
    };
    let number = |row: &[String], i: usize| row[i].parse::<u64>().unwrap();
    let shown = panel_rows(&pool, "Top actors", ALL_VERSIONS).await;
    for row in &shown {
        let (events, failed, ips, _) = &by_actor[&row[0]];
        let types: String =
            sqlx::query_scalar("SELECT string_agg(t, ', ' ORDER BY t) FROM unnest($1::text[]) t")
                .bind(actor_types[&row[0]].iter().collect::<Vec<_>>())
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!(
            (&row[1], number(row, 2), number(row, 3), number(row, 4)),
            (&types, *events, *failed, ips.len() as u64),
            "top actor {}",
            row[0]
        );
    }
    assert_eq!(
        shown.iter().map(|row| number(row, 2)).collect::<Vec<_>>(),
        top(by_actor.values().map(|t| t.0).collect()),
        "the busiest actors"
    );
    let shown = panel_rows(&pool, "Top IP addresses", ALL_VERSIONS).await;
    for row in &shown {
        let (events, failed, actors, _) = &by_ip[&row[0]];
        assert_eq!(
            (number(row, 1), number(row, 2), number(row, 3)),
            (*events, *failed, actors.len() as u64),
            "top address {}",
            row[0]
        );
    }
    assert_eq!(
        shown.iter().map(|row| number(row, 1)).collect::<Vec<_>>(),
        top(by_ip.values().map(|t| t.0).collect()),
        "the busiest addresses"
    );
    let shown = panel_rows(&pool, "Actors with failed actions", ALL_VERSIONS).await;
    for row in &shown {
        let (events, failed, _, failing_ips) = &by_actor[&row[0]];
        assert_eq!(
            (number(row, 1), number(row, 2), number(row, 4)),
            (*failed, *events, failing_ips.len() as u64),
            "failing actor {}",
            row[0]
        );
    }
    assert_eq!(
        shown.iter().map(|row| number(row, 1)).collect::<Vec<_>>(),
        top(by_actor.values().map(|t| t.1).filter(|&f| f > 0).collect()),
        "the most failing actors"
    );
    let per_hour = panel_rows(&pool, "Logins per hour", V2).await;
    let column = |i: usize| -> u64 {
        per_hour
            .iter()
            .map(|row| row[i].parse::<u64>().unwrap())
            .sum()
    };
    assert_eq!(
        (column(1) + column(2), column(2)),
        (all_logins, failed_logins)
    );
    assert_eq!(
        panel_rows(&pool, "Latest dead letters (PostgreSQL)", ALL_VERSIONS)
            .await
            .len(),
        unreadable.min(50)
    );
    // Ownership: the replica holding a stream now (a lease session of this test), and a
    // stream nobody collects.
    let postgres = cfaudit::sinks::postgres::Postgres::connect(&secret(&h.db.url), 2, None)
        .await
        .unwrap();
    let session = cfaudit::sinks::postgres::LeaseSession::open(&postgres, "panel-replica")
        .await
        .unwrap();
    let lease = session.try_lease(DEMO_ACCOUNT).await.unwrap().unwrap();
    let streams = panel_rows(&pool, "Stream ownership and lag (PostgreSQL)", ALL_VERSIONS).await;
    let owners: BTreeMap<String, String> = streams
        .iter()
        .map(|row| (row[1].clone(), row[2].clone()))
        .collect();
    assert_eq!(
        owners,
        BTreeMap::from([
            (DEMO_ACCOUNT.to_owned(), "panel-replica".to_owned()),
            (format!("{DEMO_ACCOUNT}.v2"), "not collected".to_owned()),
        ])
    );
    for row in &streams {
        assert_eq!(row[0], DEMO_ACCOUNT);
        assert!(row[4].parse::<i64>().unwrap() >= 0, "lag of {row:?}");
    }
    lease.release().await;
    session.close().await;
    postgres.pool().close().await;
    println!(
        "panels: {} events ({v2_rows} v2, {} products, {failed_logins} failed logins), {failed} failed, {} actors, {} IPs, {} action types, {unreadable} dead letters",
        truth.len(),
        by_product.len(),
        actors.len(),
        ips.len(),
        by_action.len()
    );
    pool.close().await;
    h.finish().await;
}

/// A real Prometheus, scraping with the project's config (target and interval changed for
/// the test) and loading its alert rules.
struct Prometheus {
    child: std::process::Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(target: &str) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let project = Path::new(ROOT).join("grafana/prometheus");
        let config = std::fs::read_to_string(project.join("prometheus.yml")).unwrap();
        let replace = |text: String, from: &str, to: &str| {
            assert!(text.contains(from), "prometheus.yml no longer has {from}");
            text.replace(from, to)
        };
        let discovery =
            "dns_sd_configs:\n      - names: [\"cfaudit\"]\n        type: A\n        port: 9464";
        let config = replace(
            config,
            discovery,
            &format!("static_configs:\n      - targets: [\"{target}\"]"),
        );
        let config = replace(config, "        refresh_interval: 15s\n", "");
        let config = replace(config, "scrape_interval: 15s", "scrape_interval: 1s");
        let rules = project.join("alerts.yml");
        let config = replace(config, "- alerts.yml", &format!("- {}", rules.display()));
        let file = dir.path().join("prometheus.yml");
        std::fs::write(&file, config).unwrap();
        let port = free_port();
        let child = std::process::Command::new(prometheus_binary())
            .arg(format!("--config.file={}", file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("prometheus.log")).unwrap())
            .spawn()
            .expect("run prometheus (tests/support/ensure-tools.sh installs it)");
        Prometheus {
            child,
            url: format!("http://127.0.0.1:{port}"),
            _dir: dir,
        }
    }

    async fn query(&self, expr: &str) -> Value {
        let response = reqwest::Client::new()
            .get(format!("{}/api/v1/query", self.url))
            .query(&[("query", expr)])
            .send()
            .await
            .unwrap();
        response.json().await.unwrap()
    }

    /// The number of series or samples an expression returns; panics on an error.
    async fn results(&self, expr: &str) -> usize {
        let answer = self.query(expr).await;
        assert_eq!(answer["status"], "success", "{expr}: {answer}");
        answer["data"]["result"].as_array().map_or(0, Vec::len)
    }

    async fn wait_for(&self, expr: &str) {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let ready = reqwest::get(format!("{}/-/ready", self.url)).await;
            if ready.is_ok_and(|r| r.status().is_success()) && self.results(expr).await > 0 {
                return;
            }
            assert!(Instant::now() < deadline, "no {expr} after 90 s");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn prometheus_binary() -> PathBuf {
    std::env::var_os("PROMETHEUS_BIN").map_or_else(|| "prometheus".into(), PathBuf::from)
}

fn expand_promql(expr: &str, account: &str) -> String {
    let out = expr
        .replace("$__rate_interval", "1m")
        .replace("$account", account);
    assert!(
        !out.contains('$'),
        "a variable this test does not know: {expr}"
    );
    out
}

#[actix_rt::test]
async fn every_panel_promql_runs_against_a_real_prometheus_and_returns_data() {
    let mut config = emulator_config(3_000);
    config.invalid_every = 97; // dead letters
    config.faults.fault_429_every = 13; // 429s and retries
    config.faults.retry_after_seconds = 1;
    config.live_per_second = 5.0; // something to do at every sweep
    let h = Harness::new(config).await;
    h.emu.emulator.start_live();
    let mut env = h.env.clone();
    let port = free_port();
    set(&mut env, "METRICS_ADDR", &format!("127.0.0.1:{port}"));
    set(&mut env, "POLL_INTERVAL_SECONDS", "1");
    set(&mut env, "CLOUDFLARE_PER_PAGE", "200");
    let service = cfaudit(&["run"], &env);
    let prometheus = Prometheus::start(&format!("127.0.0.1:{port}"));

    // Long enough for a sweep to commit and for rates over 1 m to have several samples.
    prometheus
        .wait_for("cfaudit_last_successful_sweep_timestamp_seconds")
        .await;
    // The series above exist from the start (at 0); the lag only after a first commit, which
    // a loaded machine may not have reached yet.
    prometheus.wait_for("cfaudit_checkpoint_lag_seconds").await;
    prometheus
        .wait_for("cfaudit_api_rate_limited_total > 0")
        .await;
    prometheus
        .wait_for("cfaudit_events_dead_lettered_total > 0")
        .await;
    tokio::time::sleep(Duration::from_secs(5)).await;

    let exprs = queries(PROMETHEUS_UID);
    assert!(exprs.len() >= 10, "{exprs:?}");
    let mut report = Vec::new();
    for account in [".*", DEMO_ACCOUNT] {
        for (file, title, expr) in &exprs {
            if title.starts_with("variable") {
                let expanded = expand_promql(expr, account);
                let (metric, label) = expanded
                    .strip_prefix("label_values(")
                    .and_then(|e| e.strip_suffix(')'))
                    .and_then(|e| e.split_once(", "))
                    .unwrap_or_else(|| panic!("{file}: {title}: only label_values(m, l): {expr}"));
                let values = prometheus
                    .query(&format!("count by ({label}) ({metric})"))
                    .await;
                assert!(
                    !values["data"]["result"].as_array().unwrap().is_empty(),
                    "{file}: {title}: {values}"
                );
                continue;
            }
            let expanded = expand_promql(expr, account);
            let n = prometheus.results(&expanded).await;
            assert!(n > 0, "{file}: {title}: no data for {expanded}");
            report.push(format!("{title}: {n} series"));
        }
    }
    println!("{}", report.join("\n"));
    // The alert rules loaded in a real Prometheus, not only in promtool.
    let rules: Value = reqwest::get(format!("{}/api/v1/rules", prometheus.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let loaded = rules["data"]["groups"][0]["rules"]
        .as_array()
        .map_or(0, Vec::len);
    assert!(loaded >= 5, "{rules}");
    drop(prometheus);
    signal(&service, "-TERM");
    assert!(finish(service).await.success);
    h.finish().await;
}
