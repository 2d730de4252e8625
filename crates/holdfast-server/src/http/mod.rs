//! The HTTP/JSON API: one module per area, the router, and the extractors that turn every
//! malformed input into a JSON `4xx` (never axum's plain-text defaults).

pub mod admin;
pub mod events;
pub mod fencing;
pub mod idempotency;
pub mod leases;
pub mod locks;
pub mod openapi;
pub mod ops;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, MatchedPath, Request, State};
use axum::handler::Handler as _;
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use holdfast_api::ErrorCode;
use holdfast_core::LeaseId;
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tower_http::catch_panic::CatchPanicLayer;

use crate::actor::EngineHandle;
use crate::auth::{Authenticator, Principal};
use crate::config::{IDEMPOTENCY_BODY_BYTES_MAX, ServerConfig};
use crate::error::ApiError;
use crate::events::EventHub;

/// Shared state of all handlers.
pub struct AppState {
    /// The engine host.
    pub engine: EngineHandle,
    /// Tokens.
    pub auth: Authenticator,
    /// Events.
    pub hub: Arc<EventHub>,
    /// Configuration.
    pub config: ServerConfig,
    /// Becomes true when the server starts shutting down (ends event streams).
    pub shutdown: watch::Receiver<bool>,
    /// False while shutting down.
    pub ready: AtomicBool,
    /// Open event streams.
    pub event_streams: std::sync::atomic::AtomicUsize,
}

/// Handler state.
pub type Shared = State<Arc<AppState>>;

impl FromRequestParts<Arc<AppState>> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, ApiError> {
        state.auth.authenticate(&parts.headers)
    }
}

/// A JSON body; errors name the field (`locks[0].mode`) and are `400 invalid_request`, a body
/// over the limit is `413 payload_too_large`.
pub struct ApiJson<T>(pub T);

/// Like [`ApiJson`], but an empty body means `T::default()`.
pub struct OptionalJson<T>(pub T);

fn body_rejection(r: &axum::extract::rejection::BytesRejection) -> ApiError {
    if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(
            ErrorCode::PayloadTooLarge,
            "request body is larger than the limit of this route",
        )
    } else {
        ApiError::invalid("", format!("cannot read request body: {}", r.body_text()))
    }
}

pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    // The common case first: tracking the path allocates a segment per field, which made up
    // half of decoding. A body that fails is decoded again, with the path, to name the field.
    if let Ok(value) = serde_json::from_slice(bytes) {
        return Ok(value);
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.inner().to_string();
        // serde names missing/unknown fields only in the message: `missing field `holder``.
        let named = ["missing field `", "unknown field `"].iter().find_map(|p| {
            inner
                .strip_prefix(p)
                .and_then(|rest| rest.split('`').next())
                .map(str::to_owned)
        });
        let field = match (path.as_str(), named) {
            (".", Some(n)) => n,
            (".", None) => String::new(),
            (p, Some(n)) if p == n || p.ends_with(&format!(".{n}")) => p.to_owned(),
            (p, Some(n)) => format!("{p}.{n}"),
            (p, None) => p.to_owned(),
        };
        let message = if field.is_empty() {
            format!("invalid JSON body: {inner}")
        } else {
            format!("invalid JSON body at `{field}`: {inner}")
        };
        ApiError::invalid(field, message)
    })?;
    de.end()
        .map_err(|e| ApiError::invalid("", format!("invalid JSON body: {e}")))?;
    Ok(value)
}

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|r| body_rejection(&r))?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(ApiError::invalid("", "a JSON body is required"));
        }
        decode(&bytes).map(ApiJson)
    }
}

impl<T: DeserializeOwned + Default, S: Send + Sync> FromRequest<S> for OptionalJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|r| body_rejection(&r))?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(OptionalJson(T::default()));
        }
        decode(&bytes).map(OptionalJson)
    }
}

/// Path parameters; a malformed one is `400 invalid_request`.
pub struct ApiPath<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| ApiPath(p.0))
            .map_err(|r| ApiError::invalid("path", format!("invalid path: {}", r.body_text())))
    }
}

/// Query parameters; malformed ones are `400 invalid_request`.
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| ApiQuery(q.0))
            .map_err(|r| ApiError::invalid("query", format!("invalid query: {}", r.body_text())))
    }
}

/// Parse a lease id from a path.
///
/// # Errors
/// `400 invalid_request` naming `lease_id`.
pub fn parse_lease_id(s: &str) -> Result<LeaseId, ApiError> {
    s.parse::<LeaseId>()
        .map_err(|e| ApiError::invalid("lease_id", format!("invalid lease id {s:?}: {e}")))
}

/// A fresh lease id: 128 bits from the OS-seeded thread RNG.
#[must_use]
pub fn new_lease_id() -> LeaseId {
    LeaseId(rand::random::<u128>())
}

/// The matched route template, carried from the routing layer to the metrics layer.
#[derive(Clone)]
struct RouteLabel(String);

async fn tag_route(matched: Option<MatchedPath>, req: Request, next: Next) -> Response {
    let mut response = next.run(req).await;
    if let Some(m) = matched {
        response
            .extensions_mut()
            .insert(RouteLabel(m.as_str().to_owned()));
    }
    response
}

async fn observe(req: Request, next: Next) -> Response {
    let method = req.method().as_str().to_owned();
    let response = next.run(req).await;
    let route = response
        .extensions()
        .get::<RouteLabel>()
        .map_or_else(|| "unmatched".to_owned(), |r| r.0.clone());
    if response.status().is_server_error() && response.status() != StatusCode::SERVICE_UNAVAILABLE {
        tracing::error!(%route, %method, status = response.status().as_u16(), "request failed with a server error (bug)");
    }
    let status = response.status().as_u16().to_string();
    metrics::counter!(crate::metrics::HTTP_REQUESTS, "route" => route, "method" => method, "status" => status)
        .increment(1);
    response
}

async fn not_found(req: Request) -> ApiError {
    ApiError::new(
        ErrorCode::NotFound,
        format!(
            "no route {} {} (see /v1/openapi.json)",
            req.method(),
            req.uri().path()
        ),
    )
}

async fn method_not_allowed(req: Request) -> ApiError {
    ApiError::new(
        ErrorCode::MethodNotAllowed,
        format!(
            "method {} is not allowed on {} (see /v1/openapi.json)",
            req.method(),
            req.uri().path()
        ),
    )
}

fn panic_response(err: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let detail = err
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| err.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_default();
    tracing::error!(panic = %detail, "handler panicked (bug)");
    ApiError::internal("internal error (a bug); the request was not completed").into_response()
}

/// The complete router.
pub fn router(state: Arc<AppState>) -> Router {
    let body_max = state.config.limits.request_body_bytes_max;
    Router::new()
        .route("/v1/leases", post(leases::create_lease))
        .route(
            "/v1/leases/{id}",
            get(leases::get_lease).delete(leases::release_lease),
        )
        .route("/v1/leases/{id}/locks", post(leases::add_locks))
        .route(
            "/v1/leases/{id}/locks/{*key}",
            axum::routing::delete(leases::release_lock),
        )
        .route("/v1/leases/{id}/renew", post(leases::renew))
        .route("/v1/locks", get(locks::list_locks))
        .route("/v1/locks/{*key}", get(locks::get_lock))
        .route(
            "/v1/admin/locks/{*key_and_action}",
            post(admin::force_release_lock),
        )
        .route(
            "/v1/admin/leases/{id}/release",
            post(admin::force_release_lease),
        )
        .route(
            "/v1/idempotency/{*key}",
            get(idempotency::read)
                .post(idempotency::begin)
                .put(idempotency::complete.layer(DefaultBodyLimit::max(
                    IDEMPOTENCY_BODY_BYTES_MAX.max(body_max),
                )))
                .delete(idempotency::abort),
        )
        .route("/v1/fencing/check", post(fencing::check))
        .route("/v1/events", get(events::stream))
        .route("/v1/stats", get(ops::stats))
        .route("/v1/openapi.json", get(openapi::document))
        .route("/metrics", get(ops::metrics))
        .route("/", get(ops::dashboard))
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(not_found)
        .route_layer(middleware::from_fn(tag_route))
        .layer(DefaultBodyLimit::max(body_max))
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(middleware::from_fn(observe))
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt as _;

    #[tokio::test]
    async fn a_panicking_handler_answers_500_internal_json() {
        async fn boom() -> &'static str {
            panic!("bug")
        }
        let app = Router::new()
            .route("/boom", get(boom))
            .layer(CatchPanicLayer::custom(panic_response));
        let response = app
            .oneshot(
                Request::builder()
                    .uri("/boom")
                    .body(axum::body::Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .unwrap();
        let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(body["error"], "internal");
        assert!(body["message"].is_string());
    }

    #[test]
    fn json_errors_name_nested_fields() {
        let e =
            decode::<holdfast_api::CreateLeaseRequest>(br#"{"holder":"h","locks":[{"key":1}]}"#)
                .err()
                .unwrap();
        assert_eq!(e.body.field.as_deref(), Some("locks[0].key"));
        let e = decode::<holdfast_api::CreateLeaseRequest>(br#"{"holder":"h","locks":[{}]}"#)
            .err()
            .unwrap();
        assert_eq!(e.body.field.as_deref(), Some("locks[0].key"));
        let e =
            decode::<holdfast_api::CreateLeaseRequest>(br#"{"holder":"h","locks":[]} trailing"#)
                .err()
                .unwrap();
        assert_eq!(e.body.error, ErrorCode::InvalidRequest);
    }
}
