//! The one error type of the crate.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::classify::{Classify, Conflict, classify_sqlx};

/// Everything that can go wrong in holdfast-sql, each refusal typed and carrying what the caller
/// needs to report it (the key, the holder, the versions), never a string to match on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SqlLockError {
    /// A database or driver error (including deadlocks and serialization failures, which
    /// [`Classify`] recognises by SQLSTATE / error number).
    #[error("database error: {0}")]
    Sql(#[from] sqlx::Error),

    /// Rows could not be locked: NOWAIT found one locked (PostgreSQL 55P03, MySQL 3572,
    /// MariaDB 1205) or the lock timeout expired.
    #[error("could not lock {keys} row(s) of {table}: {conflict:?}")]
    RowsLocked {
        /// The table.
        table: String,
        /// How many keys were requested.
        keys: usize,
        /// What the database reported (lock not available or lock timeout).
        conflict: Conflict,
        /// The database error.
        #[source]
        source: sqlx::Error,
    },

    /// An advisory / named lock is held by someone else (after the retry policy gave up).
    #[error("failed to acquire advisory lock {key} after {attempts} attempt(s) ({waited:?}){}",
        holder.as_ref().map(|h| format!(": held by {h}")).unwrap_or_default())]
    AdvisoryHeld {
        /// The lock name as the caller gave it.
        key: String,
        /// Who holds it, if the database tells (a PostgreSQL backend pid, a MySQL connection id).
        holder: Option<String>,
        /// Attempts made.
        attempts: u32,
        /// Total time spent trying.
        waited: Duration,
    },

    /// An advisory lock this process believed it held is gone (its connection was closed or
    /// killed, or it was released behind the guard's back).
    #[error(
        "advisory lock {key} was lost (its database session ended or it was released elsewhere)"
    )]
    AdvisoryLost {
        /// The lock name.
        key: String,
    },

    /// An offline lock is held by another holder.
    #[error("{object_type}/{object_id} is locked by {holder}{}{}",
        reason.as_ref().map(|r| format!(" ({r})")).unwrap_or_default(),
        expires_at.map(|t| format!(" until {t}")).unwrap_or_default())]
    OfflineLockHeld {
        /// Kind of object (`Patient`).
        object_type: String,
        /// Id of the object.
        object_id: String,
        /// The current holder.
        holder: String,
        /// Why they hold it.
        reason: Option<String>,
        /// When their hold expires, if ever.
        expires_at: Option<DateTime<Utc>>,
    },

    /// A release named a holder that does not hold the object.
    #[error("{object_type}/{object_id} is not held by {holder}")]
    NotHolder {
        /// Kind of object.
        object_type: String,
        /// Id of the object.
        object_id: String,
        /// The holder that tried to release.
        holder: String,
    },

    /// Optimistic concurrency: the row moved on since it was read.
    #[error("version conflict on {table} {key}: expected version {expected}, found {}",
        actual.map(|v| v.to_string()).unwrap_or_else(|| "no row".to_owned()))]
    VersionConflict {
        /// The table.
        table: String,
        /// The row's key, rendered.
        key: String,
        /// The version the caller read.
        expected: i64,
        /// The version now in the table (`None`: the row was deleted).
        actual: Option<i64>,
    },

    /// No row has this key.
    #[error("no row {key} in {table}")]
    NotFound {
        /// The table.
        table: String,
        /// The key, rendered.
        key: String,
    },

    /// An idempotency record is no longer owned by this executor (its lease expired and
    /// someone else took over, or it was completed or aborted).
    #[error("idempotency key {key} is not (or no longer) owned by this executor")]
    IdempotencyNotOwner {
        /// The idempotency key.
        key: String,
    },

    /// The transaction ran longer than its timeout; it was rolled back.
    #[error("transaction timed out after {0:?} and was rolled back")]
    Timeout(Duration),

    /// A table or column name that is not a plain SQL identifier.
    #[error("invalid SQL identifier {0:?}")]
    InvalidIdentifier(String),

    /// An argument outside its allowed range.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// The database cannot do this (e.g. row locks on SQLite).
    #[error("{feature} is not supported on {database}: {why}")]
    Unsupported {
        /// The feature.
        feature: &'static str,
        /// The database.
        database: &'static str,
        /// Why, and what to use instead.
        why: &'static str,
    },
}

impl Classify for SqlLockError {
    fn conflict(&self) -> Option<Conflict> {
        match self {
            Self::Sql(e) => classify_sqlx(e),
            Self::RowsLocked { conflict, .. } => Some(*conflict),
            _ => None,
        }
    }

    fn is_version_conflict(&self) -> bool {
        matches!(self, Self::VersionConflict { .. })
    }
}

/// Result alias of the crate.
pub type Result<T, E = SqlLockError> = std::result::Result<T, E>;
