//! Operations: stats, Prometheus metrics, liveness and readiness. `/metrics`, `/healthz` and
//! `/readyz` need no token; `/v1/stats` needs any valid token.

use std::sync::atomic::Ordering;

use axum::Json;
use axum::http::header;
use axum::response::IntoResponse;
use holdfast_api::{ErrorBody, StatsResponse};

use super::Shared;
use crate::actor::Command;
use crate::auth::Principal;
use crate::error::ApiError;

/// Counters, gauges and wait/hold percentiles of this server.
#[utoipa::path(
    get, path = "/v1/stats", tag = "ops",
    responses((status = 200, body = StatsResponse), (status = 401, body = ErrorBody))
)]
pub async fn stats(state: Shared, _principal: Principal) -> Result<Json<StatsResponse>, ApiError> {
    state
        .engine
        .call(|reply| Command::Stats { reply })
        .await
        .map(Json)
}

/// Prometheus text format.
#[utoipa::path(
    get, path = "/metrics", tag = "ops",
    responses((status = 200, description = "Prometheus text exposition format", body = String, content_type = "text/plain"))
)]
pub async fn metrics() -> impl IntoResponse {
    let handle = crate::metrics::prometheus();
    handle.run_upkeep();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        handle.render(),
    )
}

/// Liveness: the process answers.
#[utoipa::path(
    get, path = "/healthz", tag = "ops",
    responses((status = 200, description = "`{\"status\":\"ok\"}`"))
)]
pub async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

/// Readiness: the engine host is running and the server is not shutting down.
#[utoipa::path(
    get, path = "/readyz", tag = "ops",
    responses(
        (status = 200, description = "`{\"status\":\"ready\"}`"),
        (status = 503, description = "overloaded: stopping or the store failed", body = ErrorBody),
    )
)]
pub async fn readyz(state: Shared) -> Result<Json<serde_json::Value>, ApiError> {
    if state.engine.failed.load(Ordering::SeqCst) {
        return Err(ApiError::overloaded(
            "the store failed; the server is stopping",
        ));
    }
    if !state.ready.load(Ordering::SeqCst) {
        return Err(ApiError::overloaded(
            "the server is starting or shutting down",
        ));
    }
    // The engine host answers (not stuck).
    state.engine.call(|reply| Command::Stats { reply }).await?;
    Ok(Json(serde_json::json!({"status": "ready"})))
}

/// The dashboard page (static HTML calling this API; a token can be entered in the page).
#[utoipa::path(
    get, path = "/", tag = "ops",
    responses((status = 200, description = "HTML dashboard", body = String, content_type = "text/html"))
)]
pub async fn dashboard() -> impl IntoResponse {
    axum::response::Html(include_str!("../../assets/dashboard.html"))
}
