//! [`AppError`]: every way a clinic request can fail, and — in [`AppError::status`] and
//! [`AppError::code`], the one place — which HTTP status and stable error code each maps to.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use holdfast_client::ClientError;
use holdfast_sql::{Classify, Conflict, SqlLockError};
use serde_json::{Value, json};

/// A failed clinic request.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// No such row.
    #[error("{what} {id} not found")]
    NotFound {
        /// Kind of thing (`doctor`, `appointment`, …).
        what: &'static str,
        /// Its id.
        id: i64,
    },
    /// The request body or a parameter is invalid.
    #[error("invalid {field}: {message}")]
    Invalid {
        /// The offending field.
        field: &'static str,
        /// Why.
        message: String,
    },
    /// A required header is missing or not valid UTF-8.
    #[error("missing or invalid header {0}")]
    MissingHeader(&'static str),
    /// The doctor already has an active appointment at that time (seed 001's double booking).
    #[error("doctor {doctor_id} already has an appointment at {scheduled_at}")]
    SlotTaken {
        /// The doctor.
        doctor_id: i64,
        /// The slot.
        scheduled_at: String,
    },
    /// The doctor is not accepting appointments.
    #[error("doctor {0} is inactive")]
    DoctorInactive(i64),
    /// A status change that the transition table does not allow.
    #[error("invalid status transition {from} -> {to}")]
    InvalidTransition {
        /// Current status.
        from: String,
        /// Requested status.
        to: String,
    },
    /// The actor may not do this (wrong role, or not this appointment's doctor/patient).
    #[error("{0}")]
    Forbidden(String),
    /// The one-per-appointment thing (prescription, rating) already exists.
    #[error("{what} for appointment {appointment_id} already exists")]
    AlreadyExists {
        /// `prescription` or `rating`.
        what: &'static str,
        /// The appointment.
        appointment_id: i64,
    },
    /// The appointment is not in the state this needs.
    #[error("appointment {appointment_id} is {status}; {needed}")]
    WrongAppointmentState {
        /// The appointment.
        appointment_id: i64,
        /// Its status.
        status: String,
        /// What is needed.
        needed: &'static str,
    },
    /// Seed 002: the record is being edited by someone else (HTTP 412).
    #[error("{object} is locked by {holder}")]
    RecordLocked {
        /// `patient/42`.
        object: String,
        /// The other editor.
        holder: String,
        /// Their reason.
        reason: Option<String>,
        /// When their lock expires (RFC 3339).
        expires_at: Option<String>,
    },
    /// A release by someone who does not hold the lock.
    #[error("{object} is not locked by {holder}")]
    NotHolder {
        /// `patient/42`.
        object: String,
        /// Who tried.
        holder: String,
    },
    /// Seed 004: not enough stock.
    #[error("shortage: requested {requested}, available {available}")]
    Shortage {
        /// Units asked for.
        requested: i64,
        /// Units in stock.
        available: i64,
    },
    /// A lock (in the database or the lock service) could not be had within the policy.
    #[error("busy: {0}")]
    Busy(String),
    /// Seed 000: an import of this code type is running and this request did not (or could no
    /// longer) wait.
    #[error("failed to acquire the import lock for {code_type}: {detail}")]
    ImportBusy {
        /// The code type.
        code_type: String,
        /// Who holds it, attempts, time waited.
        detail: String,
        /// The current holders' names.
        holders: Vec<String>,
    },
    /// Seed 003: the swap is not in the state the operation needs (already rolled back).
    #[error("swap {swap_id} is {status}")]
    SwapState {
        /// The swap.
        swap_id: i64,
        /// Its status.
        status: String,
    },
    /// A fenced write was refused: a newer lock holder already wrote this row.
    #[error("stale lock: {0}")]
    StaleFence(String),
    /// The same idempotency key was used for a different request.
    #[error("idempotency key {0} was used with a different request")]
    FingerprintMismatch(String),
    /// Another execution with this idempotency key is still running.
    #[error("idempotency key {0} is being executed")]
    InProgress(String),
    /// The lock service is needed but not configured or not reachable.
    #[error("lock service unavailable: {0}")]
    LockServiceUnavailable(String),
    /// Any other lock-service error.
    #[error("lock service: {0}")]
    LockService(ClientError),
    /// A database error that is not a conflict.
    #[error("database: {0}")]
    Db(SqlLockError),
}

impl From<SqlLockError> for AppError {
    fn from(e: SqlLockError) -> Self {
        // Conflicts (deadlocks, NOWAIT refusals, ...) stay `Db` so that `Classify` lets the
        // transaction retry them; once retries run out they answer 503 `busy`.
        match e {
            SqlLockError::Timeout(t) => Self::Busy(format!("transaction timed out after {t:?}")),
            e => Self::Db(e),
        }
    }
}

impl From<sqlx::Error> for AppError {
    fn from(e: sqlx::Error) -> Self {
        Self::Db(SqlLockError::Sql(e))
    }
}

impl From<ClientError> for AppError {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::FingerprintMismatch { key } => Self::FingerprintMismatch(key),
            ClientError::InProgress { key, .. } => Self::InProgress(key),
            ClientError::Unreachable { .. } | ClientError::Overloaded { .. } => {
                Self::LockServiceUnavailable(e.to_string())
            }
            ClientError::Held { .. }
            | ClientError::Timeout { .. }
            | ClientError::Deadlock { .. } => Self::Busy(e.to_string()),
            e => Self::LockService(e),
        }
    }
}

impl Classify for AppError {
    fn conflict(&self) -> Option<Conflict> {
        match self {
            Self::Db(e) => e.conflict(),
            _ => None,
        }
    }
}

impl AppError {
    /// The HTTP status of this error.
    #[must_use]
    pub fn status(&self) -> StatusCode {
        match self {
            Self::NotFound { .. } => StatusCode::NOT_FOUND,
            Self::Invalid { .. } | Self::MissingHeader(_) => StatusCode::BAD_REQUEST,
            Self::SlotTaken { .. }
            | Self::DoctorInactive(_)
            | Self::AlreadyExists { .. }
            | Self::NotHolder { .. }
            | Self::Shortage { .. }
            | Self::ImportBusy { .. }
            | Self::SwapState { .. }
            | Self::StaleFence(_)
            | Self::InProgress(_) => StatusCode::CONFLICT,
            Self::InvalidTransition { .. }
            | Self::WrongAppointmentState { .. }
            | Self::FingerprintMismatch(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::RecordLocked { .. } => StatusCode::PRECONDITION_FAILED,
            Self::Busy(_) | Self::LockServiceUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::LockService(_) => StatusCode::BAD_GATEWAY,
            Self::Db(e) if e.conflict().is_some() => StatusCode::SERVICE_UNAVAILABLE,
            Self::Db(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable error code of this error.
    #[must_use]
    pub fn code(&self) -> &'static str {
        match self {
            Self::NotFound { .. } => "not_found",
            Self::Invalid { .. } => "invalid_request",
            Self::MissingHeader(_) => "missing_header",
            Self::SlotTaken { .. } => "slot_taken",
            Self::DoctorInactive(_) => "doctor_inactive",
            Self::InvalidTransition { .. } => "invalid_transition",
            Self::Forbidden(_) => "forbidden",
            Self::AlreadyExists { .. } => "already_exists",
            Self::WrongAppointmentState { .. } => "wrong_appointment_state",
            Self::RecordLocked { .. } => "record_locked",
            Self::NotHolder { .. } => "not_holder",
            Self::Shortage { .. } => "shortage",
            Self::Busy(_) => "busy",
            Self::Db(e) if e.conflict().is_some() => "busy",
            Self::ImportBusy { .. } => "import_in_progress",
            Self::SwapState { .. } => "swap_state",
            Self::StaleFence(_) => "stale_lock",
            Self::FingerprintMismatch(_) => "fingerprint_mismatch",
            Self::InProgress(_) => "in_progress",
            Self::LockServiceUnavailable(_) => "lock_service_unavailable",
            Self::LockService(_) => "lock_service_error",
            Self::Db(_) => "database_error",
        }
    }

    fn details(&self) -> Value {
        match self {
            Self::SlotTaken {
                doctor_id,
                scheduled_at,
            } => json!({"doctor_id": doctor_id, "scheduled_at": scheduled_at}),
            Self::InvalidTransition { from, to } => json!({"from": from, "to": to}),
            Self::RecordLocked {
                holder,
                reason,
                expires_at,
                ..
            } => {
                json!({"holder": holder, "reason": reason, "expires_at": expires_at})
            }
            Self::Shortage {
                requested,
                available,
            } => json!({"requested": requested, "available": available}),
            Self::ImportBusy {
                code_type, holders, ..
            } => json!({"code_type": code_type, "holders": holders}),
            Self::SwapState { swap_id, status } => json!({"swap_id": swap_id, "status": status}),
            Self::Invalid { field, .. } => json!({"field": field}),
            _ => json!({}),
        }
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(error = %self, code = self.code(), "request failed");
        }
        let mut body = self.details();
        if let Value::Object(map) = &mut body {
            map.insert("error".to_owned(), Value::from(self.code()));
            map.insert("message".to_owned(), Value::from(self.to_string()));
        }
        let mut response = (status, axum::Json(body)).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_and_codes() {
        let cases: Vec<(AppError, u16, &str)> = vec![
            (
                AppError::SlotTaken {
                    doctor_id: 1,
                    scheduled_at: "t".into(),
                },
                409,
                "slot_taken",
            ),
            (
                AppError::InvalidTransition {
                    from: "pending".into(),
                    to: "completed".into(),
                },
                422,
                "invalid_transition",
            ),
            (
                AppError::RecordLocked {
                    object: "patient/1".into(),
                    holder: "a".into(),
                    reason: None,
                    expires_at: None,
                },
                412,
                "record_locked",
            ),
            (
                AppError::Shortage {
                    requested: 100,
                    available: 0,
                },
                409,
                "shortage",
            ),
            (
                AppError::FingerprintMismatch("k".into()),
                422,
                "fingerprint_mismatch",
            ),
            (AppError::Busy("x".into()), 503, "busy"),
            (
                AppError::Db(SqlLockError::Sql(sqlx::Error::RowNotFound)),
                500,
                "database_error",
            ),
        ];
        for (error, status, code) in cases {
            assert_eq!(
                (error.status().as_u16(), error.code()),
                (status, code),
                "{error}"
            );
        }
    }

    #[test]
    fn the_body_carries_code_message_and_details() {
        let response = AppError::Shortage {
            requested: 100,
            available: 20,
        }
        .into_response();
        assert_eq!(response.status(), StatusCode::CONFLICT);
        let busy = AppError::Busy("x".into()).into_response();
        assert_eq!(
            busy.headers()
                .get(header::RETRY_AFTER)
                .map(|v| v.as_bytes()),
            Some(&b"1"[..])
        );
    }
}
