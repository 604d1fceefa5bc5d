//! Many accounts in one service: each collected as streams of its own, exactly once, attributed
//! to its account in both sinks; an account the token may not read and a deleted account are
//! reported and stop none of the others.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use crate::common::*;
use cfaudit_emulator::DEMO_TOKEN;
use serde_json::Value;

/// An account the token is a member of, without the right to read its audit logs.
const NO_ACCESS: &str = "feedfacefeedfacefeedfacefeedface";
/// An account that no longer exists.
const DELETED: &str = "deadbeefdeadbeefdeadbeefdeadbeef";

/// An emulator with four readable accounts (of `events` each) and the two failing ones; the
/// harness configured with all six.
async fn six_accounts(events: usize) -> (Harness, Vec<String>) {
    let mut config = emulator_config(events);
    config.extra_accounts = 3;
    config.no_access_account = Some(NO_ACCESS.into());
    config.deleted_account = Some(DELETED.into());
    let mut h = Harness::new(config).await;
    let readable = h.emu.emulator.accounts();
    assert_eq!(readable.len(), 4);
    let mut all = readable.clone();
    all.extend([NO_ACCESS.to_owned(), DELETED.to_owned()]);
    h.set("CLOUDFLARE_ACCOUNT_IDS", &all.join(","));
    (h, readable)
}

/// Each account's valid event ids.
fn expected_by_account(h: &Harness, accounts: &[String]) -> BTreeMap<String, BTreeSet<String>> {
    accounts
        .iter()
        .map(|a| (a.clone(), valid_ids_of(&h.emu.emulator, a)))
        .collect()
}

/// Both sinks hold every account's events once, each row attributed to its account.
async fn assert_exact_by_account(h: &Harness, expected: &BTreeMap<String, BTreeSet<String>>) {
    let all: BTreeSet<String> = expected.values().flatten().cloned().collect();
    assert_eq!(
        all.len(),
        expected.values().map(BTreeSet::len).sum::<usize>(),
        "the accounts' data sets share no id"
    );
    h.assert_exact_ids(&all).await;
    let pool = h.db.pool().await;
    let rows: Vec<(String, String)> = sqlx::query_as("SELECT event_id, account_id FROM audit_logs")
        .fetch_all(&pool)
        .await
        .unwrap();
    pool.close().await;
    let parquet = parquet_rows(&h.lake, &h.reader_env);
    for (id, account) in rows {
        let owner = expected
            .iter()
            .find(|(_, ids)| ids.contains(&id))
            .map(|(a, _)| a)
            .unwrap();
        assert_eq!(&account, owner, "postgres: {id} attributed to its account");
        assert_eq!(
            parquet[&id]["account_id"],
            Value::String(owner.clone()),
            "parquet: {id} attributed to its account"
        );
    }
}

#[actix_web::test]
async fn run_once_collects_every_readable_account_and_names_the_failing_ones() {
    let (h, readable) = six_accounts(3_000).await;
    let error = format!("{:#}", run_once_all(h.config()).await.unwrap_err());
    assert!(error.contains("2 of 6 streams failed"), "{error}");
    assert!(
        error.contains(NO_ACCESS) && error.contains("10000"),
        "the account without access is named with the API's code: {error}"
    );
    assert!(
        error.contains(DELETED) && error.contains("7003"),
        "the deleted account is named with the API's code: {error}"
    );
    let expected = expected_by_account(&h, &readable);
    assert_exact_by_account(&h, &expected).await;
    // Again with the failing accounts removed: nothing new, every account's summary.
    let mut again = h.config();
    again.cloudflare.account_ids = Some(cfaudit::settings::AccountIds(readable.clone()));
    let summaries = run_once_all(again).await.unwrap();
    assert_eq!(summaries.len(), 4);
    for summary in &summaries {
        let own = expected[&summary.account_id].len() as i64;
        assert_eq!(summary.rows_in_postgres, own, "{summary:?}");
        assert_eq!(summary.parquet_rows, own, "{summary:?}");
    }
    assert_exact_by_account(&h, &expected).await;
    h.finish().await;
}

#[actix_web::test]
async fn the_service_collects_every_readable_account_and_reports_the_failing_ones() {
    let (mut h, readable) = six_accounts(2_000).await;
    let addr = format!("127.0.0.1:{}", free_port());
    h.set("METRICS_ADDR", &addr);
    h.set("POLL_INTERVAL_SECONDS", "1");
    h.set("CFAUDIT_REPLICA_NAME", "only");
    let expected = expected_by_account(&h, &readable);
    let total: usize = expected.values().map(BTreeSet::len).sum();
    let child = cfaudit(&["run"], &h.env);
    let pool = h.db.pool().await;
    wait_for_rows(&pool, total as i64).await;

    // Both failing accounts are named by /readyz, none of the readable ones.
    let deadline = Instant::now() + Duration::from_secs(30);
    let problems = loop {
        if let Some((503, body)) = readyz(&addr).await {
            let problems = body["problems"].to_string();
            if problems.contains(NO_ACCESS) && problems.contains(DELETED) {
                break problems;
            }
        }
        assert!(
            Instant::now() < deadline,
            "/readyz never named both failing accounts"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for account in &readable {
        assert!(
            !problems.contains(account.as_str()),
            "{account}: {problems}"
        );
    }
    let metrics = scrape(&addr).await;
    for (account, failed) in readable
        .iter()
        .map(|a| (a.as_str(), 0.0))
        .chain([(NO_ACCESS, 1.0), (DELETED, 1.0)])
    {
        let series = format!("cfaudit_auth_failed{{account=\"{account}\",api_version=\"v1\"}}");
        assert_eq!(metric(&metrics, &series), failed, "{series}");
    }
    // `status` shows each stream and the replica collecting it.
    let status = finish(cfaudit(&["status"], &h.env)).await;
    assert!(status.success, "{}", status.stderr);
    for account in readable
        .iter()
        .map(String::as_str)
        .chain([NO_ACCESS, DELETED])
    {
        assert!(
            status
                .stdout
                .contains(&format!("stream          {account} collected by only")),
            "{account}: {}",
            status.stdout
        );
    }
    assert!(
        status.stdout.contains("replicas        1 running: only"),
        "{}",
        status.stdout
    );

    signal(&child, "-TERM");
    let stopped = finish(child).await;
    assert!(stopped.success, "{}", stopped.stderr);
    pool.close().await;
    assert_exact_by_account(&h, &expected).await;
    h.finish().await;
}

/// Discovery: every account the token is a member of is collected (the one it may not read is
/// named), with none configured.
#[actix_web::test]
async fn discovery_collects_every_account_the_token_lists() {
    let (mut h, readable) = six_accounts(500).await;
    h.set("CLOUDFLARE_ACCOUNT_IDS", "");
    h.env.retain(|(k, _)| k != "CLOUDFLARE_ACCOUNT_ID");
    h.set("CLOUDFLARE_DISCOVER_ACCOUNTS", "true");
    let error = format!("{:#}", run_once_all(h.config()).await.unwrap_err());
    assert!(
        error.contains("1 of 5 streams failed"),
        "the deleted account is not listed: {error}"
    );
    assert!(error.contains(NO_ACCESS), "{error}");
    assert_exact_by_account(&h, &expected_by_account(&h, &readable)).await;
    h.finish().await;
}

/// `GET /accounts` that serves its first page for every page number ends after the repeat,
/// never in a loop through the request budget.
#[actix_web::test]
async fn an_accounts_listing_that_repeats_its_pages_ends() {
    let mut config = emulator_config(1);
    config.extra_accounts = 59;
    config.accounts_ignore_page = true;
    let h = Harness::new(config).await;
    let mut settings = h.config();
    settings.cloudflare.discover_accounts = true;
    let token = settings.cloudflare.tokens().unwrap().remove(0);
    let client = cfaudit::sources::cloudflare::CloudflareClient::new(
        &settings.cloudflare,
        &token,
        cfaudit_actors::Metrics::new(),
    )
    .unwrap();
    let listed = client.list_accounts().await.unwrap();
    // Without the repeat check the listing would read 200 pages and fail.
    assert_eq!(listed.len(), 50, "the first page, once");
    h.finish().await;
}

/// One request budget, shared fairly: while one account works through a backlog that takes
/// most of the budget for a minute, the live sweeps of the others keep their pace (each sweep
/// within two poll intervals of the one before).
#[actix_web::test]
async fn a_backlog_on_one_account_does_not_hold_back_the_others_live_sweeps() {
    const POLL_SECONDS: i64 = 3;
    let mut config = emulator_config(6_000);
    config.extra_accounts = 2;
    config.extra_account_events = Some(20);
    let mut h = Harness::new(config).await;
    let accounts = h.emu.emulator.accounts();
    h.set("CLOUDFLARE_ACCOUNT_IDS", &accounts.join(","));
    h.set("POLL_INTERVAL_SECONDS", &POLL_SECONDS.to_string());
    h.set("CLOUDFLARE_PER_PAGE", "100");
    // 3 requests a second. A quiet account's live poll costs 2 (its first page is confirmed
    // by a second answer), a third of the budget for the two of them at this poll interval;
    // the first account's 60 pages take about 30 s of the rest. At 2 a second the quiet
    // sweeps came 6 s apart, at the very limit.
    h.set("CLOUDFLARE_REQUESTS_PER_5_MINUTES", "900");
    h.set("CLOUDFLARE_REQUEST_BURST", "1");
    h.set("METRICS_ADDR", &format!("127.0.0.1:{}", free_port()));
    cfaudit(&["migrate"], &h.env).wait().await.unwrap();
    let child = cfaudit(&["run"], &h.env);
    let pool = h.db.pool().await;
    let backlog = valid_ids_of(&h.emu.emulator, &accounts[0]).len() as i64;
    // Each quiet account's sweep times, sampled while the backlog lasts.
    let mut sweeps: BTreeMap<String, BTreeSet<chrono::DateTime<chrono::Utc>>> = BTreeMap::new();
    let started = Instant::now();
    loop {
        let rows: Vec<(String, Option<chrono::DateTime<chrono::Utc>>)> =
            sqlx::query_as("SELECT account_id, last_sweep_at FROM cfaudit_checkpoints")
                .fetch_all(&pool)
                .await
                .unwrap();
        for (account, at) in rows {
            if account != accounts[0] {
                sweeps.entry(account).or_default().extend(at);
            }
        }
        let (done,): (i64,) =
            sqlx::query_as("SELECT count(*) FROM audit_logs WHERE account_id = $1")
                .bind(&accounts[0])
                .fetch_one(&pool)
                .await
                .unwrap();
        if done >= backlog {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(240),
            "the backlog took over 240 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let backlog_took = started.elapsed();
    signal(&child, "-TERM");
    assert!(finish(child).await.success);
    pool.close().await;
    assert!(
        backlog_took > Duration::from_secs(15),
        "a backlog long enough: {backlog_took:?}"
    );
    assert_eq!(sweeps.len(), 2, "{sweeps:?}");
    for (account, times) in &sweeps {
        let times: Vec<_> = times.iter().collect();
        assert!(
            times.len() as u64 >= backlog_took.as_secs() / (2 * POLL_SECONDS as u64),
            "{account}: {} sweeps in {backlog_took:?}",
            times.len()
        );
        let widest = times.windows(2).map(|w| *w[1] - *w[0]).max().unwrap();
        assert!(
            widest <= chrono::Duration::seconds(2 * POLL_SECONDS),
            "{account}: {widest} between two sweeps while another account's backlog ran"
        );
        eprintln!(
            "{account}: {} sweeps, at most {widest} apart, during {backlog_took:?}",
            times.len()
        );
    }
}

/// Two tokens that share no account: each account is collected with its own token (the
/// emulator refuses an account to the other token), both discovered through their own
/// `/accounts`, each token's requests within its own rate-limit window; exactly once.
#[actix_web::test]
async fn two_tokens_each_collect_their_own_accounts() {
    const SECOND: &str = "second-token-not-a-secret";
    let mut config = emulator_config(2_000);
    config.extra_accounts = 3;
    config.second_token = Some(SECOND.into());
    config.second_token_accounts = 2;
    let mut h = Harness::new(config).await;
    let accounts = h.emu.emulator.accounts();
    let (first, second) = accounts.split_at(2);
    h.set("CLOUDFLARE_DISCOVER_ACCOUNTS", "true");
    h.set(
        "CLOUDFLARE_API_TOKENS",
        &format!("# the second\n{SECOND}=*"),
    );
    let expected = expected_by_account(&h, &accounts);

    let summaries = run_once_all(h.config()).await.unwrap();
    let collected: BTreeSet<String> = summaries.iter().map(|s| s.account_id.clone()).collect();
    assert_eq!(collected, accounts.iter().cloned().collect());
    assert_exact_by_account(&h, &expected).await;

    // Every audit-log request went out with the token of its account, and none was refused.
    let mut by_token: BTreeMap<String, usize> = BTreeMap::new();
    for request in h.emu.emulator.request_log() {
        let Some(account) = request
            .path
            .strip_prefix("/client/v4/accounts/")
            .and_then(|rest| rest.split('/').next())
        else {
            continue;
        };
        let authorization = request
            .auth_headers
            .iter()
            .find(|(name, _)| name == "authorization")
            .map(|(_, value)| value.clone())
            .unwrap_or_default();
        let token = if second.iter().any(|a| a == account) {
            SECOND
        } else {
            assert!(first.iter().any(|a| a == account), "{account} is known");
            DEMO_TOKEN
        };
        assert_eq!(authorization, format!("Bearer {token}"), "{}", request.path);
        assert_eq!(request.status, 200, "{}", request.path);
        *by_token.entry(token.to_owned()).or_default() += 1;
    }
    assert_eq!(by_token.len(), 2, "both tokens were used: {by_token:?}");

    // Again: nothing new.
    run_once_all(h.config()).await.unwrap();
    assert_exact_by_account(&h, &expected).await;
    h.finish().await;
}
