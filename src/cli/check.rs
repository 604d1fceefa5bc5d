//! `cfaudit check`: is everything cfaudit needs reachable and usable? One PASS/FAIL line per
//! dependency, each failure with its likely fix. Never prints a secret.

use std::sync::Arc;

use cfaudit_actors::{AuditSource, Direction, Metrics, PageRequest, SourceError};
use chrono::Utc;

use crate::settings::Settings;
use crate::sinks::lake::ParquetLake;
use crate::sinks::postgres::{redacted_url, Postgres, MIGRATOR};
use crate::sources::cloudflare::CloudflareClient;

/// One checked dependency.
pub struct Check {
    pub name: &'static str,
    pub outcome: Result<String, String>,
}

impl std::fmt::Display for Check {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.outcome {
            Ok(detail) => write!(f, "PASS  {}: {detail}", self.name),
            Err(problem) => write!(f, "FAIL  {}: {problem}", self.name),
        }
    }
}

/// Runs every check; all run even when an earlier one fails.
pub async fn run_checks(config: &Settings) -> Vec<Check> {
    vec![
        Check {
            name: "configuration",
            outcome: check_config(config),
        },
        Check {
            name: "database",
            outcome: check_database(config).await,
        },
        Check {
            name: "object store",
            outcome: check_object_store(config).await,
        },
        Check {
            name: "Cloudflare API",
            outcome: check_api(config).await,
        },
    ]
}

fn check_config(config: &Settings) -> Result<String, String> {
    let tokens = config.cloudflare.tokens().map_err(|e| e.to_string())?;
    let accounts: Vec<&str> = tokens
        .iter()
        .flat_map(|t| t.listed.iter().map(String::as_str))
        .chain(tokens.iter().filter(|t| t.discover).map(|t| {
            if t.label == "api_token" {
                "every account of the token"
            } else {
                "every account of another token"
            }
        }))
        .collect();
    Ok(format!(
        "{} {} ({} token{}), API {}, Parquet {}",
        if accounts.len() == 1 {
            "account"
        } else {
            "accounts"
        },
        accounts.join(", "),
        tokens.len(),
        if tokens.len() == 1 { "" } else { "s" },
        config.cloudflare.api_base_url,
        config.lake.parquet_url
    ))
}

async fn check_database(config: &Settings) -> Result<String, String> {
    let postgres = Postgres::connect(&config.database.url, 1, None)
        .await
        .map_err(|e| format!("{e:#}. Fix: start the database or correct DATABASE_URL"))?;
    let (version, applied) = postgres
        .version_and_migrations()
        .await
        .map_err(|e| e.to_string())?;
    let known = MIGRATOR.iter().count();
    let timescale = match postgres.timescale_state().await {
        Ok(Some(state)) => state.to_string(),
        Ok(None) => "plain PostgreSQL (no TimescaleDB)".to_owned(),
        Err(error) => format!("TimescaleDB state unreadable: {error}"),
    };
    let detail = format!(
        "PostgreSQL {version} at {}; migrations {applied} of {known} applied; {timescale}",
        redacted_url(config.database.url.expose()),
    );
    if (applied as usize) < known {
        return Err(format!(
            "{detail}. Fix: run `cfaudit migrate` (or start `cfaudit run`, which migrates)"
        ));
    }
    Ok(detail)
}

async fn check_object_store(config: &Settings) -> Result<String, String> {
    let lake = ParquetLake::open(&config.lake)
        .map_err(|e| format!("{e:#}. Fix: correct PARQUET_URL and the AWS_* settings"))?;
    lake.probe()
        .await
        .map(|where_| format!("wrote, read back and deleted a probe object in {where_}"))
        .map_err(|e| {
            format!("{e}. Fix: check the endpoint, the bucket and the credentials' write access")
        })
}

async fn check_api(config: &Settings) -> Result<String, String> {
    let tokens = config.cloudflare.tokens().map_err(|e| e.to_string())?;
    let mut clients = Vec::new();
    for token in &tokens {
        let client = CloudflareClient::new(&config.cloudflare, token, Metrics::new())
            .map_err(|e| format!("{e:#}"))?;
        let client: Arc<dyn AuditSource> = Arc::new(client);
        for account_id in &token.listed {
            clients.push((account_id, token.label.as_str(), client.clone()));
        }
    }
    let now = Utc::now();
    let mut read = Vec::new();
    let mut refused = Vec::new();
    // Each account and each configured API once: a token may read one and not the other.
    for (account_id, token, client) in &clients {
        for &api_version in &config.cloudflare.api_versions.0 {
            let request = PageRequest {
                account_id: account_id.to_string(),
                api_version,
                since: now - chrono::Duration::days(1),
                before: now,
                direction: Direction::Desc,
                page: 1,
                per_page: 1,
                cursor: None,
                hide_user_logs: config.cloudflare.hide_user_logs,
            };
            match client.fetch_page(&request).await {
                Ok(events) => read.push(format!(
                    "{account_id} {api_version}: {} event(s) in the last day's first page",
                    events.len()
                )),
                Err(SourceError::Auth(reason)) => refused.push(format!(
                    "{account_id} {api_version}: {reason}. Fix: give token {token} 'Account Settings: Read' \
                     for account {account_id}, or remove the account from the configuration"
                )),
                Err(other) => {
                    return Err(format!(
                        "{account_id} {api_version}: {other}. Fix: check CLOUDFLARE_API_BASE_URL and the network"
                    ))
                }
            }
        }
    }
    if !refused.is_empty() {
        return Err(refused.join("; "));
    }
    Ok(format!(
        "the token can read the audit logs ({})",
        read.join("; ")
    ))
}
