//! # holdfast-api: the HTTP/JSON wire types
//!
//! The request and response bodies of the `/v1` API, shared by the server (which derives its
//! OpenAPI document from them) and the client. Nothing here does I/O. Field names carry units
//! (`ttl_ms`, `expires_at_ms`). Times are Unix epoch milliseconds.
//!
//! Every error body is an [`ErrorBody`] whose `error` is one of the stable [`ErrorCode`]s; the
//! table [`ErrorCode::ALL`] with [`ErrorCode::http_status`] is the single source of truth.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

pub mod wire;

/// Default server address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7390";
/// Default address of the wire protocol ([`wire`]): the HTTP port + 1.
pub const DEFAULT_WIRE_LISTEN: &str = "127.0.0.1:7391";

/// Stable error codes. The string form (snake_case) is part of the API.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// No-wait request refused: the lock is held (details: `key`, `holders`).
    LockHeld,
    /// The wait ran out (details: `key`, `holders`).
    WaitTimeout,
    /// Waiting would deadlock; the requester is the victim (details: `key`, `cycle`).
    Deadlock,
    /// The key is in use with another mode or semaphore limit.
    LimitMismatch,
    /// Unknown, released or expired lease.
    LeaseNotFound,
    /// The lease does not hold that key, or no one does.
    LockNotFound,
    /// Same idempotency key, different request.
    FingerprintMismatch,
    /// Another execution of this idempotency key is in progress.
    InProgress,
    /// No such idempotency record (or not in progress under the given lease).
    IdempotencyNotFound,
    /// Malformed or invalid input (details: `field`).
    InvalidRequest,
    /// Missing or wrong bearer token.
    Unauthorized,
    /// The token may not do this (role or key prefix).
    Forbidden,
    /// No such route.
    NotFound,
    /// Method not allowed on this route.
    MethodNotAllowed,
    /// Body too large.
    PayloadTooLarge,
    /// The server is at a limit; retry after `Retry-After`.
    Overloaded,
    /// A bug: the server failed to do what it should have. Never expected.
    Internal,
}

impl ErrorCode {
    /// Every code, for documentation and tests.
    pub const ALL: [ErrorCode; 17] = [
        ErrorCode::LockHeld,
        ErrorCode::WaitTimeout,
        ErrorCode::Deadlock,
        ErrorCode::LimitMismatch,
        ErrorCode::LeaseNotFound,
        ErrorCode::LockNotFound,
        ErrorCode::FingerprintMismatch,
        ErrorCode::InProgress,
        ErrorCode::IdempotencyNotFound,
        ErrorCode::InvalidRequest,
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::NotFound,
        ErrorCode::MethodNotAllowed,
        ErrorCode::PayloadTooLarge,
        ErrorCode::Overloaded,
        ErrorCode::Internal,
    ];

    /// The HTTP status that carries this code.
    #[must_use]
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::LockHeld
            | ErrorCode::WaitTimeout
            | ErrorCode::Deadlock
            | ErrorCode::LimitMismatch
            | ErrorCode::InProgress => 409,
            ErrorCode::LeaseNotFound
            | ErrorCode::LockNotFound
            | ErrorCode::IdempotencyNotFound
            | ErrorCode::NotFound => 404,
            ErrorCode::FingerprintMismatch => 422,
            ErrorCode::InvalidRequest => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::Forbidden => 403,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::PayloadTooLarge => 413,
            ErrorCode::Overloaded => 503,
            ErrorCode::Internal => 500,
        }
    }

    /// The snake_case string form.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::LockHeld => "lock_held",
            ErrorCode::WaitTimeout => "wait_timeout",
            ErrorCode::Deadlock => "deadlock",
            ErrorCode::LimitMismatch => "limit_mismatch",
            ErrorCode::LeaseNotFound => "lease_not_found",
            ErrorCode::LockNotFound => "lock_not_found",
            ErrorCode::FingerprintMismatch => "fingerprint_mismatch",
            ErrorCode::InProgress => "in_progress",
            ErrorCode::IdempotencyNotFound => "idempotency_not_found",
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::Internal => "internal",
        }
    }
}

/// Every error response: `{"error": code, "message": "...", ...details}`.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// Stable code.
    pub error: ErrorCode,
    /// Human-readable explanation naming the field/key and the reason.
    pub message: String,
    /// For `invalid_request`: the offending field (`locks[0].key`, `ttl_ms`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// For lock refusals: the key concerned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// For `lock_held` / `wait_timeout`: who holds the key.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub holders: Vec<HolderInfo>,
    /// For `deadlock`: the cycle of holders, starting and ending with the requester.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cycle: Vec<String>,
    /// For `lock_held` during lock-delay: until when the key is held back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delayed_until_ms: Option<u64>,
    /// For `overloaded` and `in_progress`: seconds to wait (also in `Retry-After`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_s: Option<u64>,
}

impl ErrorBody {
    /// A body with only code and message.
    #[must_use]
    pub fn new(error: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            error,
            message: message.into(),
            field: None,
            key: None,
            holders: Vec::new(),
            cycle: Vec::new(),
            delayed_until_ms: None,
            retry_after_s: None,
        }
    }
}

/// Lock mode on the wire.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum LockMode {
    /// One holder.
    #[default]
    Exclusive,
    /// Readers.
    Shared,
    /// Counting semaphore (`limit` and `permits` apply).
    Semaphore,
}

/// One lock in a request.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LockRequest {
    /// Key, 1..=512 bytes of UTF-8, no control characters. `/` separates namespaces.
    pub key: String,
    /// Mode; default `exclusive`. Giving `limit` implies `semaphore`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<LockMode>,
    /// Semaphore size (all users of the key must agree).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    /// Permits to take, 1..=limit (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permits: Option<u32>,
    /// Hold the key back this long after an involuntary loss (0..=60000, default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock_delay_ms: Option<u64>,
}

impl LockRequest {
    /// An exclusive lock on `key`.
    #[must_use]
    pub fn exclusive(key: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            mode: None,
            limit: None,
            permits: None,
            lock_delay_ms: None,
        }
    }
}

/// The compact JSON text of a metadata object: how the engine stores it (and checks its size)
/// and how the compact wire bodies carry it.
#[must_use]
pub fn metadata_text(metadata: &serde_json::Map<String, serde_json::Value>) -> String {
    // A map of JSON values always serializes.
    serde_json::to_string(metadata).unwrap_or_default()
}

/// `POST /v1/leases`: create a lease holding these locks, atomically.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateLeaseRequest {
    /// Who holds it, 1..=256 bytes.
    pub holder: String,
    /// Lease TTL, 1000..=2592000000 (default 30000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_ms: Option<u64>,
    /// 0 (default) = fail at once if held; up to 60000 = wait in the FIFO queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_ms: Option<u64>,
    /// Why (shown to others).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Any JSON object up to 4 KiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
    /// Default true: the same holder re-acquiring joins its existing grant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reentrant: Option<bool>,
    /// At least one lock; all granted together or none.
    pub locks: Vec<LockRequest>,
}

/// `POST /v1/leases/{id}/locks`: add locks to a lease (deadlock-checked).
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddLocksRequest {
    /// 0 (default) = no-wait; up to 60000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_ms: Option<u64>,
    /// The locks to add.
    pub locks: Vec<LockRequest>,
}

/// `POST /v1/leases/{id}/renew`.
#[derive(Clone, PartialEq, Eq, Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RenewRequest {
    /// New TTL from now; default: the lease's current TTL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_ms: Option<u64>,
}

/// One lock held by a lease.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize, ToSchema)]
pub struct HeldLock {
    /// Key.
    pub key: String,
    /// Mode.
    pub mode: LockMode,
    /// Semaphore limit, for semaphores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    /// Permits held, for semaphores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permits: Option<u32>,
    /// Strictly increasing across all grants of the service; pass it to the storage you guard.
    pub fencing_token: u64,
    /// Reentrant hold count.
    pub count: u32,
    /// When first granted.
    pub acquired_at_ms: u64,
}

/// A lease as its creator (or an admin) sees it.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize, ToSchema)]
pub struct LeaseResponse {
    /// The capability to renew and release: keep it secret.
    pub lease_id: String,
    /// Holder.
    pub holder: String,
    /// TTL in force.
    pub ttl_ms: u64,
    /// Expiry unless renewed (server clock, epoch ms).
    pub expires_at_ms: u64,
    /// Remaining TTL at the time of the response.
    pub remaining_ms: u64,
    /// Reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Metadata.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
    /// All locks the lease holds.
    pub locks: Vec<HeldLock>,
}

/// A holder of a key, as listings and refusals show it (no lease id unless admin/owner).
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize, ToSchema)]
pub struct HolderInfo {
    /// Holder.
    pub holder: String,
    /// Mode.
    pub mode: LockMode,
    /// Permits, for semaphores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permits: Option<u32>,
    /// Since when.
    pub since_ms: u64,
    /// Lease expiry.
    pub expires_at_ms: u64,
    /// Reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Fencing token.
    pub fencing_token: u64,
    /// Reentrant count.
    pub count: u32,
    /// Lease id: present only for admins and the lease's creator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_id: Option<String>,
}

/// A queued request.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize, ToSchema)]
pub struct WaiterInfo {
    /// Holder.
    pub holder: String,
    /// Mode asked.
    pub mode: LockMode,
    /// Since when.
    pub since_ms: u64,
    /// Gives up at.
    pub deadline_ms: u64,
}

/// One key in a listing.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize, ToSchema)]
pub struct LockState {
    /// Key.
    pub key: String,
    /// Semaphore limit if the key is a semaphore.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    /// Holders.
    pub holders: Vec<HolderInfo>,
    /// Waiters in FIFO order.
    pub waiters: Vec<WaiterInfo>,
    /// Lock-delay end, if in lock-delay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delayed_until_ms: Option<u64>,
}

/// `GET /v1/locks`.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize, ToSchema)]
pub struct LockList {
    /// Keys in key order.
    pub locks: Vec<LockState>,
}

/// `POST /v1/admin/locks/{key}/release` and `POST /v1/admin/leases/{id}/release`.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ForceReleaseRequest {
    /// Required: recorded in the audit log and event stream.
    pub reason: String,
}

/// Answer to a force release.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize, ToSchema)]
pub struct ForceReleaseResponse {
    /// Holders that lost the lock(s).
    pub released: Vec<HolderInfo>,
}

/// `POST /v1/fencing/check`.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FencingCheckRequest {
    /// Key.
    pub key: String,
    /// Token presented by a would-be writer.
    pub fencing_token: u64,
}

/// Answer to a fencing check.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize, ToSchema)]
pub struct FencingCheckResponse {
    /// True if the token is a current grant of the key.
    pub current: bool,
    /// Tokens of the current holders.
    pub current_tokens: Vec<u64>,
}

/// `POST /v1/idempotency/{key}`: begin.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IdempotencyBeginRequest {
    /// Digest of the request (same key + different fingerprint = 422).
    pub fingerprint: String,
    /// Executor name.
    pub holder: String,
    /// Executor lease TTL (default 30000); the record frees itself if it expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_ms: Option<u64>,
    /// How long a completed record is kept (default 24 h).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record_ttl_ms: Option<u64>,
    /// Wait for an in-progress twin up to this long (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_ms: Option<u64>,
}

/// Idempotency record states.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum IdempotencyStateName {
    /// The caller owns the execution (201).
    Started,
    /// Another execution is running (409).
    InProgress,
    /// Done; `result` is the stored outcome (200, `Idempotent-Replayed: true`).
    Completed,
}

/// A stored result.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize, ToSchema)]
pub struct IdempotencyResultBody {
    /// Status of the original execution.
    pub status: u16,
    /// Headers subset.
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    /// Body (≤ 1 MiB).
    #[serde(default)]
    pub body: String,
}

/// Answer to begin / read.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize, ToSchema)]
pub struct IdempotencyResponse {
    /// Key.
    pub key: String,
    /// State.
    pub state: IdempotencyStateName,
    /// For `started`: the executor lease (needed to complete or abort).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_id: Option<String>,
    /// For `in_progress`: who executes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder: Option<String>,
    /// For `in_progress`/`started`: executor lease expiry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<u64>,
    /// For `completed`: the stored result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<IdempotencyResultBody>,
}

/// `PUT /v1/idempotency/{key}`: complete.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IdempotencyCompleteRequest {
    /// The lease from `started`.
    pub lease_id: String,
    /// What to replay to duplicates.
    pub result: IdempotencyResultBody,
}

/// `DELETE /v1/idempotency/{key}`: abort.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IdempotencyAbortRequest {
    /// The lease from `started`.
    pub lease_id: String,
}

/// `GET /v1/stats`.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize, ToSchema)]
pub struct StatsResponse {
    /// Keys held.
    pub active_locks: u64,
    /// Live leases.
    pub leases: u64,
    /// Queued requests.
    pub waiters: u64,
    /// Idempotency records.
    pub idempotency_records: u64,
    /// Grants since start.
    pub grants_total: u64,
    /// Voluntary releases since start.
    pub releases_total: u64,
    /// Wait timeouts since start.
    pub timeouts_total: u64,
    /// Deadlock refusals since start.
    pub deadlocks_total: u64,
    /// Lease expirations since start.
    pub expirations_total: u64,
    /// Admin force releases since start.
    pub force_releases_total: u64,
    /// Wait time percentiles (ms) of granted waits: p50, p90, p99, max.
    pub wait_ms: Percentiles,
    /// Hold time percentiles (ms) of released locks.
    pub hold_ms: Percentiles,
    /// Durability mode of the server.
    pub durability: String,
    /// Seconds since start.
    pub uptime_s: u64,
}

/// Latency summary.
#[derive(Clone, PartialEq, Debug, Default, Serialize, Deserialize, ToSchema)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 90th.
    pub p90: f64,
    /// 99th.
    pub p99: f64,
    /// Max.
    pub max: f64,
    /// Samples.
    pub count: u64,
}

/// One event of `GET /v1/events` (the SSE `data:`; the SSE `id:` is `seq`, the SSE `event:` is `kind`).
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize, ToSchema)]
pub struct EventBody {
    /// Sequence number (resume with `Last-Event-ID`).
    pub seq: u64,
    /// `granted`, `released`, `expired`, `force_released`, `timed_out`, `deadlock`, `renewed`.
    pub kind: String,
    /// When (epoch ms).
    pub at_ms: u64,
    /// Key, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Holder.
    pub holder: String,
    /// Mode, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<LockMode>,
    /// Fencing token, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fencing_token: Option<u64>,
    /// Force-release reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The SSE event `missed` of `GET /v1/events`: a resume (`Last-Event-ID`) asked for events
/// older than the server's buffer (or from before a restart). Its SSE `id:` is `to_seq`, so
/// resuming after it continues with the oldest event still available.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize, ToSchema)]
pub struct EventsMissedBody {
    /// Always `missed`.
    pub kind: String,
    /// First sequence number that can no longer be delivered.
    pub from_seq: u64,
    /// Last sequence number that can no longer be delivered.
    pub to_seq: u64,
    /// Explanation.
    pub message: String,
}
