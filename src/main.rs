use std::path::PathBuf;
use std::process::ExitCode;

use cfaudit_actors::ApiVersion;
use chrono::{DateTime, Utc};
use clap::{Parser, Subcommand};

use cfaudit::app::{run, RunOptions};
use cfaudit::settings::Settings;
use cfaudit::sinks::postgres::Postgres;

/// Lands Cloudflare audit logs exactly once in PostgreSQL/TimescaleDB and Parquet.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// TOML configuration file (settings in the environment override it).
    #[arg(long, global = true, env = "CFAUDIT_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service: poll, write both sinks, commit; until SIGTERM/SIGINT.
    Run {
        /// One sweep up to now, commit, print the counts and exit (non-zero on failure).
        #[arg(long)]
        once: bool,
        /// Do not apply database migrations at start.
        #[arg(long)]
        no_migrate: bool,
    },
    /// Collect an explicit range of the past, [--since, --until), then exit (resumable).
    ///
    /// Resumable: the same command again continues where it stopped; a finished range is not
    /// fetched again. It may run beside the service; a range overlapping the service's or
    /// another backfill's is refused. Progress: a bar on a terminal, log lines otherwise.
    /// Prints a JSON line of counts. Exit 0 when the range is complete, 1 on failure or
    /// interruption, 2 for a bad range or configuration.
    Backfill {
        /// Start of the range, inclusive: RFC 3339 (2026-01-31T06:00:00Z) or a date (midnight UTC).
        #[arg(long, value_parser = time_arg)]
        since: DateTime<Utc>,
        /// End of the range, exclusive. Default: where the live service's collection starts
        /// (or now, if the service never ran).
        #[arg(long, value_parser = time_arg)]
        until: Option<DateTime<Utc>>,
        /// The API to read, v1 or v2 (each has backfills of its own). Default: the one
        /// CLOUDFLARE_API_VERSIONS names; required when it names both.
        #[arg(long, value_parser = version_arg)]
        api_version: Option<ApiVersion>,
        /// The account to backfill. Default: the one configured; required when several are.
        #[arg(long)]
        account: Option<String>,
    },
    /// Create the database if missing and apply the migrations.
    Migrate,
    /// Per account: checkpoint and lag, last sweep, rows in each sink, pending files, backfills.
    ///
    /// Read from the database and the object store, so it works with the service stopped.
    /// Shows the checkpoint and its lag, where collection starts, the last successful sweep
    /// and commit, rows in PostgreSQL and Parquet, dead letters, unpublished and staged files,
    /// and each backfill's range and state. Exit 1 when the database is unreachable.
    Status {
        /// One JSON document instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Rebuild audit_logs from the Parquet dataset, exactly once; prints a JSON line of counts.
    ///
    /// Every row goes through the pipeline's idempotent insert: into an empty, partial or full
    /// table, each event ends up once (a row already there takes the file's ingestion_time).
    Replay,
    /// Check configuration, database, object store and API token: one PASS/FAIL line each;
    /// exit 0 when all pass, 1 otherwise.
    Check,
    /// Probe the running service's /healthz on METRICS_ADDR (for container health checks):
    /// exit 0 when it answers 200, 1 otherwise.
    Healthcheck,
}

/// glibc gives threads that allocate at once heaps of their own (arenas), up to eight per core,
/// and keeps what a batch freed in each of them: a backfill's resident memory was about three
/// times what it held live. Two arenas keep it near that (`make bench`). `MALLOC_ARENA_MAX` in
/// the environment still decides where it is set.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only changes a malloc parameter; called before the threads that
        // would use more arenas start.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

/// Exit codes: 0 success, 1 runtime failure, 2 configuration error.
#[actix_web::main]
async fn main() -> ExitCode {
    limit_malloc_arenas();
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    let cli = Cli::parse();
    let config = match Settings::load(cli.config.as_deref()) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("{error}");
            return ExitCode::from(2);
        }
    };
    cfaudit::telemetry::init(config.service.log_format);
    let result = match cli.command {
        Command::Run { once, no_migrate } => run(
            config,
            RunOptions {
                once,
                skip_migrations: no_migrate,
            },
        )
        .await
        .map(|summaries| {
            // One line per account.
            for summary in summaries {
                println!("{}", serde_json::to_string(&summary).expect("plain data"));
            }
        }),
        Command::Backfill {
            since,
            until,
            api_version,
            account,
        } => {
            cfaudit::cli::backfill::backfill(config, since, until, api_version, account.as_deref())
                .await
                .map(|summary| {
                    println!("{}", serde_json::to_string(&summary).expect("plain data"));
                })
        }
        Command::Migrate => migrate(&config).await,
        Command::Status { json } => cfaudit::cli::status::status(&config).await.map(|status| {
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&status).expect("plain data")
                );
            } else {
                println!("{status}");
            }
        }),
        Command::Replay => cfaudit::cli::replay::replay(&config).await.map(|summary| {
            println!("{}", serde_json::to_string(&summary).expect("plain data"));
        }),
        Command::Check => {
            let checks = cfaudit::cli::check::run_checks(&config).await;
            for check in &checks {
                println!("{check}");
            }
            let failed = checks.iter().filter(|c| c.outcome.is_err()).count();
            if failed > 0 {
                eprintln!("{failed} of {} checks failed", checks.len());
                return ExitCode::from(1);
            }
            Ok(())
        }
        Command::Healthcheck => healthcheck(&config).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            eprintln!("error: {error:#}");
            ExitCode::from(
                if error
                    .downcast_ref::<cfaudit::settings::ConfigError>()
                    .is_some()
                {
                    2
                } else {
                    1
                },
            )
        }
    }
}

fn version_arg(value: &str) -> Result<ApiVersion, String> {
    ApiVersion::parse(value).ok_or_else(|| "use v1 or v2".into())
}

fn time_arg(value: &str) -> Result<DateTime<Utc>, String> {
    cfaudit::settings::parse_time(value).ok_or_else(|| {
        "neither an RFC 3339 time nor a date; use e.g. 2026-01-31T00:00:00Z or 2026-01-31".into()
    })
}

async fn healthcheck(config: &Settings) -> anyhow::Result<()> {
    let mut addr = config.service.metrics_addr;
    if addr.ip().is_unspecified() {
        // Listening on all interfaces: ask over loopback.
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let response = reqwest::Client::new()
        .get(format!("http://{addr}/healthz"))
        .timeout(std::time::Duration::from_secs(3))
        .send()
        .await?;
    anyhow::ensure!(
        response.status().is_success(),
        "/healthz answered {}",
        response.status()
    );
    Ok(())
}

async fn migrate(config: &Settings) -> anyhow::Result<()> {
    Postgres::create_database_if_missing(&config.database.url).await?;
    let postgres = Postgres::connect(&config.database.url, 1, None).await?;
    postgres.migrate().await?;
    cfaudit::app::apply_policies(&postgres, &config.database).await?;
    tracing::info!("migrations applied");
    Ok(())
}
