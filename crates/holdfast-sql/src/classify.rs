//! Recognising deadlocks, serialization failures, lock timeouts and "could not lock" by
//! SQLSTATE and error number, never by message text.
//!
//! | database | code | class |
//! |---|---|---|
//! | PostgreSQL | SQLSTATE `40P01` | [`Conflict::Deadlock`] |
//! | PostgreSQL | SQLSTATE `40001` | [`Conflict::Serialization`] |
//! | PostgreSQL | SQLSTATE `55P03` | [`Conflict::LockNotAvailable`] (NOWAIT, `lock_timeout`) |
//! | MySQL / MariaDB | error 1213 (`ER_LOCK_DEADLOCK`) | [`Conflict::Deadlock`] |
//! | MySQL / MariaDB | error 1205 (`ER_LOCK_WAIT_TIMEOUT`) | [`Conflict::LockTimeout`] (MariaDB also reports NOWAIT this way) |
//! | MySQL 8 | error 3572 (`ER_LOCK_NOWAIT`) | [`Conflict::LockNotAvailable`] |
//! | MySQL / MariaDB | SQLSTATE `40001` with another number | [`Conflict::Serialization`] |
//! | SQLite | `SQLITE_BUSY` (5) and its extended codes (261, 517, 773) | [`Conflict::Busy`] |
//! | SQLite | `SQLITE_LOCKED` (6) and its extended codes (262, 518) | [`Conflict::Busy`] |

use serde::{Deserialize, Serialize};

/// Why a statement or transaction failed because of concurrency (and may succeed if retried).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Conflict {
    /// The database chose this transaction as a deadlock victim (PG 40P01, MySQL 1213).
    Deadlock,
    /// A serialization failure under REPEATABLE READ / SERIALIZABLE (PG 40001).
    Serialization,
    /// A lock wait timed out (MySQL/MariaDB 1205; on MariaDB also NOWAIT).
    LockTimeout,
    /// A lock was not available at once (PG 55P03, MySQL 3572).
    LockNotAvailable,
    /// SQLite reported the database busy or locked.
    Busy,
}

impl Conflict {
    /// A short stable name (`deadlock`, `serialization`, ...), for metrics labels.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Deadlock => "deadlock",
            Self::Serialization => "serialization",
            Self::LockTimeout => "lock_timeout",
            Self::LockNotAvailable => "lock_not_available",
            Self::Busy => "busy",
        }
    }

    /// True for "the lock was not obtained" (NOWAIT or lock timeout), as opposed to a deadlock
    /// or serialization failure.
    #[must_use]
    pub fn is_lock_refusal(self) -> bool {
        matches!(self, Self::LockTimeout | Self::LockNotAvailable)
    }
}

/// Errors that can tell whether they are a concurrency conflict worth retrying.
///
/// Implemented for [`sqlx::Error`] and [`crate::SqlLockError`]; implement it for the error type
/// of your transaction closures (usually by delegating to the wrapped database error).
pub trait Classify {
    /// The conflict this error represents, or `None` if it is not one.
    fn conflict(&self) -> Option<Conflict>;

    /// True for an optimistic-concurrency conflict ([`crate::SqlLockError::VersionConflict`]),
    /// which [`crate::optimistic::retry_on_conflict`] retries.
    fn is_version_conflict(&self) -> bool {
        false
    }
}

impl Classify for sqlx::Error {
    fn conflict(&self) -> Option<Conflict> {
        classify_sqlx(self)
    }
}

/// MySQL / MariaDB `ER_LOCK_WAIT_TIMEOUT`.
pub const MYSQL_LOCK_WAIT_TIMEOUT: u16 = 1205;
/// MySQL / MariaDB `ER_LOCK_DEADLOCK`.
pub const MYSQL_LOCK_DEADLOCK: u16 = 1213;
/// MySQL 8 `ER_LOCK_NOWAIT`.
pub const MYSQL_LOCK_NOWAIT: u16 = 3572;

/// Classify a sqlx error by SQLSTATE (PostgreSQL), error number (MySQL/MariaDB) or result code
/// (SQLite).
#[must_use]
pub fn classify_sqlx(error: &sqlx::Error) -> Option<Conflict> {
    let sqlx::Error::Database(db) = error else {
        return None;
    };
    if let Some(my) = db.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>() {
        return classify_mysql(my.number(), my.code());
    }
    if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
        return db
            .code()
            .and_then(|c| c.parse::<i32>().ok())
            .and_then(classify_sqlite);
    }
    if db
        .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
        .is_some()
    {
        return db.code().and_then(|c| classify_sqlstate(&c));
    }
    None
}

/// Classify a PostgreSQL SQLSTATE.
#[must_use]
pub fn classify_sqlstate(sqlstate: &str) -> Option<Conflict> {
    match sqlstate {
        "40P01" => Some(Conflict::Deadlock),
        "40001" => Some(Conflict::Serialization),
        "55P03" => Some(Conflict::LockNotAvailable),
        _ => None,
    }
}

/// Classify a MySQL / MariaDB error number (with its SQLSTATE as a fallback for `40001`).
#[must_use]
pub fn classify_mysql(number: u16, sqlstate: Option<&str>) -> Option<Conflict> {
    match number {
        MYSQL_LOCK_DEADLOCK => Some(Conflict::Deadlock),
        MYSQL_LOCK_WAIT_TIMEOUT => Some(Conflict::LockTimeout),
        MYSQL_LOCK_NOWAIT => Some(Conflict::LockNotAvailable),
        _ if sqlstate == Some("40001") => Some(Conflict::Serialization),
        _ => None,
    }
}

/// Classify an SQLite (extended) result code.
#[must_use]
pub fn classify_sqlite(code: i32) -> Option<Conflict> {
    // The primary result code is the low byte of the extended one.
    match code & 0xff {
        5 | 6 => Some(Conflict::Busy),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates() {
        assert_eq!(classify_sqlstate("40P01"), Some(Conflict::Deadlock));
        assert_eq!(classify_sqlstate("40001"), Some(Conflict::Serialization));
        assert_eq!(classify_sqlstate("55P03"), Some(Conflict::LockNotAvailable));
        assert_eq!(classify_sqlstate("23505"), None);
    }

    #[test]
    fn mysql_numbers() {
        assert_eq!(
            classify_mysql(1213, Some("40001")),
            Some(Conflict::Deadlock)
        );
        assert_eq!(
            classify_mysql(1205, Some("HY000")),
            Some(Conflict::LockTimeout)
        );
        assert_eq!(
            classify_mysql(3572, Some("HY000")),
            Some(Conflict::LockNotAvailable)
        );
        assert_eq!(classify_mysql(1062, Some("23000")), None);
        assert_eq!(
            classify_mysql(9999, Some("40001")),
            Some(Conflict::Serialization)
        );
    }

    #[test]
    fn sqlite_codes() {
        for c in [5, 261, 517, 773, 6, 262, 518] {
            assert_eq!(classify_sqlite(c), Some(Conflict::Busy), "{c}");
        }
        assert_eq!(classify_sqlite(19), None);
        assert_eq!(classify_sqlite(2067), None);
    }

    #[test]
    fn non_database_errors_are_not_conflicts() {
        assert_eq!(classify_sqlx(&sqlx::Error::RowNotFound), None);
        assert_eq!(classify_sqlx(&sqlx::Error::PoolTimedOut), None);
    }
}
