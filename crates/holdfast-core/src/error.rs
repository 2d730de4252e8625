//! Typed refusals. Each variant carries what a caller needs to explain it; the server maps
//! each to one stable error code and HTTP status in exactly one place.

use crate::types::{HolderSummary, LeaseId, LockKind};

/// Why the engine refused a request.
#[derive(Clone, PartialEq, Eq, Debug, thiserror::Error)]
pub enum LockError {
    /// Input failed validation. `field` names it (`key`, `locks[2].key`, `ttl_ms`, ...).
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// The offending field.
        field: String,
        /// Why it is invalid.
        reason: String,
    },
    /// No-wait request refused because the key is held (or queued ahead, or in lock-delay).
    #[error("lock {key} is held")]
    LockHeld {
        /// The first key that could not be granted.
        key: String,
        /// Its current holders.
        holders: Vec<HolderSummary>,
        /// If the key is in lock-delay, until when.
        delayed_until_ms: Option<u64>,
    },
    /// The wait ran out.
    #[error("timed out waiting for lock {key}")]
    WaitTimeout {
        /// A key that was still not grantable.
        key: String,
        /// Its holders at the time.
        holders: Vec<HolderSummary>,
    },
    /// Waiting would close a cycle in the wait-for graph; the requester is the victim.
    #[error("deadlock: waiting for {key} would close a cycle")]
    Deadlock {
        /// The key the requester asked for.
        key: String,
        /// The cycle as holder names, starting and ending with the requester.
        cycle: Vec<String>,
    },
    /// The key is in use with a different kind or semaphore limit.
    #[error("lock {key} is in use with a different mode or limit")]
    LimitMismatch {
        /// The key.
        key: String,
        /// How it is in use now.
        existing: LockKind,
        /// What was requested.
        requested: LockKind,
    },
    /// Unknown, released or expired lease.
    #[error("lease {lease_id} not found (released or expired)")]
    LeaseNotFound {
        /// The lease asked for.
        lease_id: LeaseId,
    },
    /// The lease does not hold that key.
    #[error("lease does not hold lock {key}")]
    LockNotHeld {
        /// The key.
        key: String,
    },
    /// No lock on that key at all (admin force release of a free key).
    #[error("lock {key} is not held by anyone")]
    LockNotFound {
        /// The key.
        key: String,
    },
    /// Same idempotency key, different request.
    #[error("idempotency key {key} was used with a different request")]
    FingerprintMismatch {
        /// The key.
        key: String,
    },
    /// No idempotency record under that key (or not in progress under that lease).
    #[error("no idempotency record {key} in progress under this lease")]
    IdempotencyNotFound {
        /// The key.
        key: String,
    },
    /// A queue or table is full; retry later.
    #[error("too many {what} (limit {limit})")]
    Overloaded {
        /// What is full (`waiters on key K`, ...).
        what: String,
        /// The limit.
        limit: u64,
    },
    /// The waiter was cancelled (its client went away).
    #[error("wait cancelled")]
    Cancelled,
}

/// Durable state handed to [`crate::Engine::restore`] is inconsistent.
#[derive(Clone, PartialEq, Eq, Debug, thiserror::Error)]
#[error("durable state is inconsistent: {0}")]
pub struct RestoreError(pub String);
