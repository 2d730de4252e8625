//! Error responses. Every error leaves the server as an [`ErrorBody`] JSON with the status of
//! its [`ErrorCode`]; [`from_lock_error`] is the one place that maps an engine refusal to a
//! code, status and details.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use holdfast_api::{ErrorBody, ErrorCode, HolderInfo};
use holdfast_core::LockError;

use crate::convert::holder_info;

/// Seconds a client is told to wait after `overloaded`.
pub const OVERLOADED_RETRY_AFTER_S: u64 = 1;

/// An error answer.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// The body (its `error` decides the status). Boxed: errors travel in `Result`s.
    pub body: Box<ErrorBody>,
    /// Extra JSON members merged into the body (e.g. the idempotency `in_progress` answer
    /// also carries the `IdempotencyResponse` fields).
    pub extra: Option<Box<serde_json::Map<String, serde_json::Value>>>,
}

impl ApiError {
    /// Code and message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            body: Box::new(ErrorBody::new(code, message)),
            extra: None,
        }
    }

    /// `400 invalid_request` naming the field.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        let field = field.into();
        let mut e = Self::new(ErrorCode::InvalidRequest, message);
        if !field.is_empty() {
            e.body.field = Some(field);
        }
        e
    }

    /// `401 unauthorized`.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unauthorized, message)
    }

    /// `403 forbidden`.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Forbidden, message)
    }

    /// `503 overloaded` with `Retry-After`.
    pub fn overloaded(message: impl Into<String>) -> Self {
        let mut e = Self::new(ErrorCode::Overloaded, message);
        e.body.retry_after_s = Some(OVERLOADED_RETRY_AFTER_S);
        e
    }

    /// `500 internal` (a bug).
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, message)
    }

    /// Set the `key` detail.
    #[must_use]
    pub fn with_key(mut self, key: &str) -> Self {
        self.body.key = Some(key.to_owned());
        self
    }

    /// The HTTP status.
    #[must_use]
    pub fn status(&self) -> StatusCode {
        StatusCode::from_u16(self.body.error.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }
}

impl From<LockError> for ApiError {
    fn from(e: LockError) -> Self {
        from_lock_error(&e)
    }
}

/// THE mapping of engine refusals to error codes, statuses (via [`ErrorCode::http_status`])
/// and details. Holders in refusals never carry lease ids.
#[must_use]
pub fn from_lock_error(e: &LockError) -> ApiError {
    let message = e.to_string();
    let holders = |hs: &[holdfast_core::HolderSummary]| -> Vec<HolderInfo> {
        hs.iter().map(|h| holder_info(h, None)).collect()
    };
    match e {
        LockError::Invalid { field, .. } => ApiError::invalid(field.clone(), message),
        LockError::LockHeld {
            key,
            holders: hs,
            delayed_until_ms,
        } => {
            let mut a = ApiError::new(ErrorCode::LockHeld, message).with_key(key);
            a.body.holders = holders(hs);
            a.body.delayed_until_ms = *delayed_until_ms;
            a
        }
        LockError::WaitTimeout { key, holders: hs } => {
            let mut a = ApiError::new(ErrorCode::WaitTimeout, message).with_key(key);
            a.body.holders = holders(hs);
            a
        }
        LockError::Deadlock { key, cycle } => {
            let mut a = ApiError::new(ErrorCode::Deadlock, message).with_key(key);
            a.body.cycle.clone_from(cycle);
            a
        }
        LockError::LimitMismatch { key, .. } => {
            ApiError::new(ErrorCode::LimitMismatch, message).with_key(key)
        }
        LockError::LeaseNotFound { .. } => ApiError::new(ErrorCode::LeaseNotFound, message),
        LockError::LockNotHeld { key } | LockError::LockNotFound { key } => {
            ApiError::new(ErrorCode::LockNotFound, message).with_key(key)
        }
        LockError::FingerprintMismatch { key } => {
            ApiError::new(ErrorCode::FingerprintMismatch, message).with_key(key)
        }
        LockError::IdempotencyNotFound { key } => {
            ApiError::new(ErrorCode::IdempotencyNotFound, message).with_key(key)
        }
        LockError::Overloaded { .. } => ApiError::overloaded(message),
        // Only reaches a client whose wait was cancelled by the server itself (shutdown).
        LockError::Cancelled => {
            ApiError::overloaded("the wait was cancelled (server shutting down)")
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let mut value = serde_json::to_value(&self.body).unwrap_or_else(|_| serde_json::json!({}));
        if let (Some(extra), Some(obj)) = (self.extra, value.as_object_mut()) {
            for (k, v) in *extra {
                obj.entry(k).or_insert(v);
            }
        }
        let mut response = (status, axum::Json(value)).into_response();
        let headers = response.headers_mut();
        if let Some(s) = self.body.retry_after_s
            && let Ok(v) = HeaderValue::from_str(&s.to_string())
        {
            headers.insert(header::RETRY_AFTER, v);
        }
        if self.body.error == ErrorCode::Unauthorized {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}
