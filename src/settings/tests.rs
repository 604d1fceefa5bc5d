use super::*;

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn the_original_env_names_work() {
    let settings = Settings::load_from(
        None,
        env(&[
            ("CLOUDFLARE_API_TOKEN", "tok"),
            ("CLOUDFLARE_ACCOUNT_ID", "abc123"),
            ("POLL_INTERVAL_SECONDS", "15"),
            ("CLOUDFLARE_PER_PAGE", "250"),
            ("CLOUDFLARE_DIRECTION", "desc"),
            ("CLOUDFLARE_SINCE_SAFETY_LAG_SECONDS", "30"),
            ("CLOUDFLARE_HIDE_USER_LOGS", "true"),
            ("CLOUDFLARE_REQUEST_TIMEOUT_SECONDS", "9"),
            ("INITIAL_CHECKPOINT", "2026-01-02"),
            ("RETRY_INITIAL_MILLIS", "250"),
            ("PATH", "/usr/bin"),
        ]),
    )
    .unwrap();
    let cloudflare = &settings.cloudflare;
    assert_eq!(cloudflare.api_token.as_ref().unwrap().expose(), "tok");
    assert_eq!(cloudflare.account_id.as_deref(), Some("abc123"));
    assert_eq!(settings.sweep.poll_interval, Duration::from_secs(15));
    assert_eq!(cloudflare.per_page, 250);
    assert_eq!(cloudflare.direction, Direction::Desc);
    assert_eq!(settings.sweep.safety_lag, Duration::from_secs(30));
    assert!(cloudflare.hide_user_logs);
    assert_eq!(cloudflare.request_timeout, Duration::from_secs(9));
    assert_eq!(settings.pipeline.retry_initial, Duration::from_millis(250));
    assert_eq!(
        settings.sweep.initial_checkpoint.unwrap().to_rfc3339(),
        "2026-01-02T00:00:00+00:00"
    );
    assert_eq!(settings.cloudflare.require_accounts().unwrap(), ["abc123"]);
}

#[test]
fn every_setting_has_one_flat_name_in_one_section() {
    let all: Vec<&str> = names().collect();
    let mut unique = all.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), all.len(), "{all:?}");
    // The original spec's names are among them.
    for name in [
        "cloudflare_api_token",
        "cloudflare_account_id",
        "poll_interval_seconds",
        "cloudflare_per_page",
        "cloudflare_direction",
        "cloudflare_since_safety_lag_seconds",
        "cloudflare_hide_user_logs",
        "cloudflare_request_timeout_seconds",
        "initial_checkpoint",
    ] {
        assert!(all.contains(&name), "{name}");
    }
    assert_eq!(section_of("poll_interval_seconds"), Some("sweep"));
    assert_eq!(
        section_of("storage_options"),
        None,
        "not a setting of its own"
    );
}

#[test]
fn env_overrides_file_overrides_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("cfaudit.toml");
    std::fs::write(
        &file,
        "poll_interval_seconds = 7\ncloudflare_per_page = 10\nlog_format = \"json\"\n",
    )
    .unwrap();
    let settings = Settings::load_from(Some(&file), env(&[("CLOUDFLARE_PER_PAGE", "20")])).unwrap();
    assert_eq!(settings.sweep.poll_interval, Duration::from_secs(7));
    assert_eq!(settings.cloudflare.per_page, 20);
    assert_eq!(settings.service.log_format, LogFormat::Json);
    assert_eq!(settings.sweep.safety_lag, Duration::from_secs(120));
}

#[test]
fn a_file_that_names_no_setting_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("cfaudit.toml");
    std::fs::write(&file, "poll_interval_secs = 7\n").unwrap();
    let error = Settings::load_from(Some(&file), env(&[])).unwrap_err();
    assert_eq!(error.key, "CFAUDIT_CONFIG");
    assert!(error.problem.contains("poll_interval_secs"), "{error}");
    std::fs::write(&file, "poll_interval_seconds = \"soon\"\n").unwrap();
    let error = Settings::load_from(Some(&file), env(&[])).unwrap_err();
    assert_eq!(error.key, "POLL_INTERVAL_SECONDS", "{error}");
}

#[test]
fn bad_values_name_the_key_and_the_fix() {
    let cases = [
        ("POLL_INTERVAL_SECONDS", "soon"),
        ("RETRY_INITIAL_MILLIS", "-1"),
        ("CLOUDFLARE_PER_PAGE", "5000"),
        ("CLOUDFLARE_DIRECTION", "sideways"),
        ("CLOUDFLARE_HIDE_USER_LOGS", "maybe"),
        ("INITIAL_CHECKPOINT", "last tuesday"),
        ("METRICS_ADDR", "nowhere"),
        ("LOG_FORMAT", "xml"),
    ];
    for (name, value) in cases {
        let error = Settings::load_from(None, env(&[(name, value)])).unwrap_err();
        assert_eq!(error.key, name, "{error}");
        assert!(error.to_string().contains("Fix: "), "{error}");
        assert!(
            !error.fix.contains("see the Configuration section"),
            "{name}: a specific fix: {error}"
        );
    }
}

#[test]
fn settings_that_cannot_work_are_refused_by_name() {
    for name in [
        "POLL_INTERVAL_SECONDS",
        "MAX_PAGES_PER_SWEEP",
        "ACK_TIMEOUT_SECONDS",
        "SINK_TIMEOUT_SECONDS",
        "MAX_INFLIGHT_BATCHES",
        "ONCE_MAX_ATTEMPTS",
        "CLOUDFLARE_MAX_RETRY_AFTER_SECONDS",
        "CLOUDFLARE_REQUEST_TIMEOUT_SECONDS",
        "RETRY_INITIAL_MILLIS",
        "RETRY_MAX_SECONDS",
    ] {
        let error = Settings::load_from(None, env(&[(name, "0")])).unwrap_err();
        assert_eq!(error.key, name, "{error}");
        assert!(error.fix.contains("1 or more"), "{error}");
    }
    let error =
        Settings::load_from(None, env(&[("CLOUDFLARE_MAX_RESPONSE_BYTES", "100")])).unwrap_err();
    assert_eq!(error.key, "CLOUDFLARE_MAX_RESPONSE_BYTES");
}

#[test]
fn a_budget_above_cloudflares_limit_is_allowed_but_warned_about() {
    let settings = Settings::load_from(None, env(&[])).unwrap();
    assert!(
        settings.warnings().is_empty(),
        "the defaults stay below the limit"
    );
    let settings =
        Settings::load_from(None, env(&[("CLOUDFLARE_REQUESTS_PER_5_MINUTES", "5000")])).unwrap();
    let warnings = settings.warnings();
    assert_eq!(warnings.len(), 1);
    assert!(
        warnings[0].contains("5 minutes") && warnings[0].contains("1200"),
        "{warnings:?}"
    );
}

#[test]
fn missing_credentials_are_named() {
    let settings = Settings::load_from(None, env(&[("CLOUDFLARE_ACCOUNT_ID", "abc")])).unwrap();
    let error = settings.cloudflare.require_accounts().unwrap_err();
    assert_eq!(error.key, "CLOUDFLARE_API_TOKEN");
    let settings = Settings::load_from(None, env(&[("CLOUDFLARE_API_TOKEN", "t")])).unwrap();
    assert_eq!(
        settings.cloudflare.require_accounts().unwrap_err().key,
        "CLOUDFLARE_ACCOUNT_ID"
    );
}

/// Several accounts: the list, the single one beside it (the union, in order, once each), and
/// a bad entry named with the variable that holds it.
#[test]
fn account_lists_are_read_checked_and_joined() {
    let load = |vars: &[(&str, &str)]| {
        let mut all = vec![("CLOUDFLARE_API_TOKEN", "t")];
        all.extend_from_slice(vars);
        Settings::load_from(None, env(&all))
    };
    let settings = load(&[
        ("CLOUDFLARE_ACCOUNT_ID", "aaa1"),
        ("CLOUDFLARE_ACCOUNT_IDS", " bbb2, aaa1 ,ccc3,"),
    ])
    .unwrap();
    assert_eq!(
        settings.cloudflare.require_accounts().unwrap(),
        ["aaa1", "bbb2", "ccc3"]
    );
    let settings = load(&[("CLOUDFLARE_ACCOUNT_IDS", "bbb2")]).unwrap();
    assert_eq!(settings.cloudflare.require_accounts().unwrap(), ["bbb2"]);
    for (bad, problem) in [("bbb2,not-an-id", "not-an-id"), ("bbb2,bbb2", "twice")] {
        let error = load(&[("CLOUDFLARE_ACCOUNT_IDS", bad)]).unwrap_err();
        assert_eq!(error.key, "CLOUDFLARE_ACCOUNT_IDS", "{error}");
        assert!(error.to_string().contains(problem), "{error}");
    }
    let error = load(&[("CLOUDFLARE_ACCOUNT_IDS", " , ")])
        .unwrap()
        .cloudflare
        .require_accounts()
        .unwrap_err();
    assert_eq!(error.key, "CLOUDFLARE_ACCOUNT_ID");
    assert!(error.fix.contains("CLOUDFLARE_ACCOUNT_IDS"), "{error}");
}

/// Several tokens: each entry's accounts or `*`, read from a file with comments and blank
/// lines; the main token beside them or not at all; an account named for two tokens, a bad
/// entry and a main token with no account refused by name, never showing a token.
#[test]
fn several_tokens_each_with_its_accounts() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens");
    std::fs::write(
        &file,
        "# finance\nsecret-one = aaa1, bbb2\n\nsecret-two=*\n",
    )
    .unwrap();
    let settings = Settings::load_from(
        None,
        env(&[
            ("CLOUDFLARE_API_TOKEN", "secret-main"),
            ("CLOUDFLARE_ACCOUNT_ID", "ccc3"),
            ("CLOUDFLARE_API_TOKENS_FILE", file.to_str().unwrap()),
        ]),
    )
    .unwrap();
    let tokens = settings.cloudflare.tokens().unwrap();
    let seen: Vec<(&str, Vec<String>, bool)> = tokens
        .iter()
        .map(|t| (t.label.as_str(), t.listed.clone(), t.discover))
        .collect();
    assert_eq!(
        seen,
        [
            ("api_token", vec!["ccc3".to_owned()], false),
            (
                "api_tokens.1",
                vec!["aaa1".to_owned(), "bbb2".to_owned()],
                false
            ),
            ("api_tokens.2", vec![], true),
        ]
    );
    assert!(matches!(&tokens[1].credential, Credential::Token(t) if t.expose() == "secret-one"));
    assert_eq!(
        settings.cloudflare.require_accounts().unwrap(),
        ["ccc3", "aaa1", "bbb2"]
    );
    let debug = format!("{settings:?} {tokens:?}");
    assert!(!debug.contains("secret-"), "{debug}");

    // Without the main token: only the list's.
    let alone = Settings::load_from(None, env(&[("CLOUDFLARE_API_TOKENS", "secret-one=aaa1")]))
        .unwrap()
        .cloudflare
        .tokens()
        .unwrap();
    assert_eq!(alone.len(), 1);
    assert_eq!(alone[0].label, "api_tokens.1");

    let refused = |vars: &[(&str, &str)]| -> ConfigError {
        match Settings::load_from(None, env(vars)) {
            Err(error) => error,
            Ok(settings) => settings.cloudflare.tokens().unwrap_err(),
        }
    };
    for (tokens, key, problem) in [
        (
            "secret-one=aaa1;secret-two=bbb2,aaa1",
            "CLOUDFLARE_API_TOKENS",
            "aaa1 is named for two tokens",
        ),
        ("secret-one", "CLOUDFLARE_API_TOKENS", "entry 1 has no `=`"),
        (
            "secret-one=aaa1;secret-two=",
            "CLOUDFLARE_API_TOKENS",
            "entry 2 names no account",
        ),
        (
            "secret-one=aaa1;secret-two=x-y",
            "CLOUDFLARE_API_TOKENS",
            "entry 2: \"x-y\" is not an account id",
        ),
        (
            "secret-one=aaa1;secret-one=bbb2",
            "CLOUDFLARE_API_TOKENS",
            "repeats the token",
        ),
    ] {
        let error = refused(&[("CLOUDFLARE_API_TOKENS", tokens)]);
        assert_eq!(error.key, key, "{error}");
        assert!(error.to_string().contains(problem), "{error}");
        assert!(!error.to_string().contains("secret-"), "{error}");
    }
    let error = refused(&[
        ("CLOUDFLARE_API_TOKEN", "secret-main"),
        ("CLOUDFLARE_API_TOKENS", "secret-one=aaa1"),
    ]);
    assert_eq!(error.key, "CLOUDFLARE_API_TOKEN", "{error}");
    assert!(error.problem.contains("no account"), "{error}");
    let error = refused(&[
        ("CLOUDFLARE_API_TOKEN", "secret-main"),
        ("CLOUDFLARE_ACCOUNT_ID", "aaa1"),
        ("CLOUDFLARE_API_TOKENS", "secret-one=aaa1"),
    ]);
    assert!(
        error.problem.contains("api_token and api_tokens.1"),
        "{error}"
    );
}

#[test]
fn secrets_from_files_and_never_in_debug() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    std::fs::write(&file, "s3cr3t-token\n").unwrap();
    let settings = Settings::load_from(
        None,
        env(&[
            ("CLOUDFLARE_API_TOKEN_FILE", file.to_str().unwrap()),
            ("AWS_SECRET_ACCESS_KEY", "s3cr3t-key"),
        ]),
    )
    .unwrap();
    assert_eq!(
        settings.cloudflare.api_token.as_ref().unwrap().expose(),
        "s3cr3t-token"
    );
    let debug = format!("{settings:?}");
    assert!(!debug.contains("s3cr3t"), "{debug}");
}

#[test]
fn the_pipeline_is_given_the_settings() {
    let settings = Settings::load_from(
        None,
        env(&[
            ("POLL_INTERVAL_SECONDS", "15"),
            ("CLOUDFLARE_SINCE_SAFETY_LAG_SECONDS", "30"),
            ("CLOUDFLARE_MAX_RETRY_AFTER_SECONDS", "45"),
            ("RETRY_INITIAL_MILLIS", "250"),
            ("RETRY_MAX_SECONDS", "9"),
            ("ACK_TIMEOUT_SECONDS", "11"),
            ("SINK_TIMEOUT_SECONDS", "12"),
            ("MAX_PAGES_PER_SWEEP", "13"),
            ("ONCE_MAX_ATTEMPTS", "3"),
        ]),
    )
    .unwrap();
    let poller = settings.poller("acc", ApiVersion::V1, None, None, true);
    assert_eq!(poller.poll_interval, Duration::from_secs(15));
    assert_eq!(poller.safety_lag, Duration::from_secs(30));
    assert_eq!(poller.max_server_wait, Duration::from_secs(45));
    assert_eq!(poller.max_pages_per_sweep, 13);
    assert_eq!(poller.once, Some(3));
    assert_eq!(
        poller.backoff,
        Backoff {
            initial: Duration::from_millis(250),
            max: Duration::from_secs(9)
        }
    );
    assert_eq!(
        settings
            .poller("acc", ApiVersion::V1, None, None, false)
            .once,
        None
    );
    let checkpointer = settings.checkpointer("acc", ApiVersion::V1, "acc", 7);
    assert_eq!(checkpointer.ack_timeout, Duration::from_secs(11));
    assert_eq!(checkpointer.sink_timeout, Duration::from_secs(12));
    assert_eq!(checkpointer.lease, 7);
}
