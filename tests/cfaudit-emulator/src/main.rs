//! `cfaudit-emulator`: serves the Cloudflare audit-log API emulator until SIGTERM or Ctrl-C
//! (the demo, the benchmark and docker-compose's demo profile run it).

use std::process::ExitCode;

use cfaudit_emulator::{Cli, Emulator, EmulatorConfig};
use clap::Parser;

#[actix_web::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match serve(Cli::parse().config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::from(1)
        }
    }
}

async fn serve(config: EmulatorConfig) -> std::io::Result<()> {
    let emulator = Emulator::new(config.clone());
    let (addr, server) = emulator.serve()?;
    emulator.start_live();
    tracing::info!(%addr, events = config.events, account = %config.account_id, "emulator listening");
    println!("emulator: http://{addr}/client/v4");
    let handle = server.handle();
    actix_rt::spawn(server);
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = terminate.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    handle.stop(true).await;
    Ok(())
}
