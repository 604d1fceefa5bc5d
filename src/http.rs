//! `/metrics` (Prometheus text), `/healthz` (process alive) and `/readyz` (database reachable,
//! a recent successful sweep, no account stopped by an authentication error).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use actix_web::{web, App, HttpResponse, HttpServer};
use cfaudit_actors::Metrics;
use chrono::Utc;
use prometheus::{Encoder, TextEncoder};
use serde_json::json;

pub struct HealthState {
    pub metrics: Arc<Metrics>,
    /// A pool of its own: connections belong to the runtime that opens them, and this server
    /// runs on its own worker thread.
    pub database: sqlx::PgPool,
    /// A sweep older than this makes the service not ready.
    pub max_sweep_age: Duration,
    pub started: chrono::DateTime<Utc>,
}

pub fn serve(
    addr: SocketAddr,
    state: HealthState,
) -> std::io::Result<(SocketAddr, actix_web::dev::Server)> {
    let state = web::Data::new(state);
    let server = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .route("/metrics", web::get().to(metrics))
            .route("/healthz", web::get().to(healthz))
            .route("/readyz", web::get().to(readyz))
    })
    .workers(1)
    .disable_signals()
    .bind(addr)?;
    let bound = server.addrs()[0];
    Ok((bound, server.run()))
}

async fn metrics(state: web::Data<HealthState>) -> HttpResponse {
    state.metrics.refresh_lag(Utc::now());
    let mut buffer = Vec::new();
    match TextEncoder::new().encode(&state.metrics.registry.gather(), &mut buffer) {
        Ok(()) => HttpResponse::Ok()
            .content_type(prometheus::TEXT_FORMAT)
            .body(buffer),
        Err(e) => HttpResponse::InternalServerError().body(e.to_string()),
    }
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

async fn readyz(state: web::Data<HealthState>) -> HttpResponse {
    let mut problems = Vec::new();
    if !crate::sinks::postgres::answers(&state.database).await {
        problems.push("database unreachable".to_owned());
    }
    for (source, reason) in state.metrics.health.auth_failures.lock().unwrap().iter() {
        problems.push(format!(
            "account {source}: polling stopped by an authentication error: {reason}"
        ));
    }
    for (source, reason) in state.metrics.health.sink_failures.lock().unwrap().iter() {
        problems.push(format!(
            "account {source}: retrying from the checkpoint after: {reason}"
        ));
    }
    let now = Utc::now();
    let max_age = chrono::Duration::from_std(state.max_sweep_age).unwrap_or_default();
    let sweeps = state
        .metrics
        .health
        .last_successful_sweep
        .lock()
        .unwrap()
        .clone();
    let last_sweep = sweeps.values().max().copied();
    match last_sweep {
        Some(at) if now - at > max_age => problems.push(format!("no successful sweep since {at}")),
        None if now - state.started > max_age => {
            problems.push("no successful sweep yet".to_owned())
        }
        _ => {}
    }
    let body = json!({"ready": problems.is_empty(), "problems": problems, "last_successful_sweep": last_sweep});
    if problems.is_empty() {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}
