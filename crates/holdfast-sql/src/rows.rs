//! Row locks: lock a set of rows of a table by key, `FOR UPDATE` or `FOR SHARE`, always in
//! ascending key order (one statement per key, so the order does not depend on a query plan):
//! two callers locking overlapping sets cannot deadlock on them. `NOWAIT`, `SKIP LOCKED` or a
//! lock timeout; "could not lock" is [`SqlLockError::RowsLocked`], recognised by SQLSTATE 55P03
//! (PostgreSQL) or error number 3572 / 1205 (MySQL / MariaDB), never by message.
//!
//! Call these inside a transaction ([`crate::transaction::transaction`]): the locks last until it
//! ends. In a retried transaction a `RowsLocked` error is a conflict, so NOWAIT-and-retry
//! (seed 004) is just `RowLock::new(..).nowait()` inside `transaction`.
//!
//! Database notes:
//! - MariaDB reports NOWAIT failures as error 1205 (lock wait timeout), not MySQL 8's 3572; both
//!   are classified. MariaDB has no `FOR SHARE`: shared locks use `LOCK IN SHARE MODE` there
//!   (detected from `VERSION()`). `SKIP LOCKED` needs MariaDB 10.6+ / MySQL 8.0+.
//! - A MySQL/MariaDB lock timeout is whole seconds (`innodb_lock_wait_timeout`, at least 1 s),
//!   set for the statements of this call and restored afterwards; PostgreSQL's is milliseconds
//!   (`lock_timeout`, local to the transaction, restored afterwards).
//! - SQLite has no row locks: these functions return [`SqlLockError::Unsupported`]. SQLite
//!   serializes writers on the whole database; use `TxOptions::sqlite_immediate()`.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sqlx::{AssertSqlSafe, MySqlConnection, PgConnection, SqliteConnection};

use crate::classify::{Conflict, classify_sqlx};
use crate::error::{Result, SqlLockError};
use crate::sql::Dialect;

/// The key of a row: an integer or a string.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RowKey {
    /// An integer key.
    Int(i64),
    /// A text key.
    Text(String),
}

impl fmt::Display for RowKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Int(i) => write!(f, "{i}"),
            Self::Text(s) => f.write_str(s),
        }
    }
}

impl From<i64> for RowKey {
    fn from(v: i64) -> Self {
        Self::Int(v)
    }
}
impl From<i32> for RowKey {
    fn from(v: i32) -> Self {
        Self::Int(i64::from(v))
    }
}
impl From<&str> for RowKey {
    fn from(v: &str) -> Self {
        Self::Text(v.to_owned())
    }
}
impl From<String> for RowKey {
    fn from(v: String) -> Self {
        Self::Text(v)
    }
}

/// Exclusive or shared row lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum RowLockMode {
    /// `FOR UPDATE`.
    #[default]
    Update,
    /// `FOR SHARE` (`LOCK IN SHARE MODE` on MariaDB).
    Share,
}

/// What to do when a row is locked by someone else.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum RowLockWait {
    /// Wait as long as the database's default lock timeout allows.
    #[default]
    Wait,
    /// Fail at once with [`SqlLockError::RowsLocked`].
    NoWait,
    /// Skip locked rows: they are reported in [`LockedRows::not_locked`].
    SkipLocked,
    /// Wait at most this long, then fail with [`SqlLockError::RowsLocked`].
    Timeout(Duration),
}

/// Which rows to lock and how.
#[derive(Clone, Debug)]
pub struct RowLock {
    table: String,
    key_column: String,
    mode: RowLockMode,
    wait: RowLockWait,
}

impl RowLock {
    /// Lock rows of `table` (a plain identifier, optionally `schema.table`) by `key_column`,
    /// `FOR UPDATE`, waiting.
    #[must_use]
    pub fn new(table: &str, key_column: &str) -> Self {
        Self {
            table: table.to_owned(),
            key_column: key_column.to_owned(),
            mode: RowLockMode::Update,
            wait: RowLockWait::Wait,
        }
    }
    /// Builder: shared locks.
    #[must_use]
    pub fn share(mut self) -> Self {
        self.mode = RowLockMode::Share;
        self
    }
    /// Builder: mode.
    #[must_use]
    pub fn mode(mut self, mode: RowLockMode) -> Self {
        self.mode = mode;
        self
    }
    /// Builder: NOWAIT.
    #[must_use]
    pub fn nowait(mut self) -> Self {
        self.wait = RowLockWait::NoWait;
        self
    }
    /// Builder: SKIP LOCKED.
    #[must_use]
    pub fn skip_locked(mut self) -> Self {
        self.wait = RowLockWait::SkipLocked;
        self
    }
    /// Builder: lock timeout.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.wait = RowLockWait::Timeout(timeout);
        self
    }
    /// Builder: wait behaviour.
    #[must_use]
    pub fn wait(mut self, wait: RowLockWait) -> Self {
        self.wait = wait;
        self
    }

    fn statement(&self, dialect: Dialect, mariadb: bool) -> Result<String> {
        let table = dialect.quote(&self.table)?;
        let column = dialect.quote(&self.key_column)?;
        let mut sql = format!(
            "SELECT 1 FROM {table} WHERE {column} = {}",
            dialect.placeholder(1)
        );
        sql.push_str(match (self.mode, mariadb) {
            (RowLockMode::Update, _) => " FOR UPDATE",
            (RowLockMode::Share, true) => " LOCK IN SHARE MODE",
            (RowLockMode::Share, false) => " FOR SHARE",
        });
        match self.wait {
            RowLockWait::NoWait => sql.push_str(" NOWAIT"),
            RowLockWait::SkipLocked => sql.push_str(" SKIP LOCKED"),
            RowLockWait::Wait | RowLockWait::Timeout(_) => {}
        }
        Ok(sql)
    }

    fn refused(&self, keys: usize, e: sqlx::Error) -> SqlLockError {
        match classify_sqlx(&e) {
            Some(conflict) if conflict.is_lock_refusal() => SqlLockError::RowsLocked {
                table: self.table.clone(),
                keys,
                // MariaDB reports a NOWAIT refusal as a lock wait timeout (1205); we know better.
                conflict: if self.wait == RowLockWait::NoWait {
                    Conflict::LockNotAvailable
                } else {
                    conflict
                },
                source: e,
            },
            _ => SqlLockError::Sql(e),
        }
    }
}

/// The outcome of locking a set of rows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LockedRows {
    /// Keys whose rows are now locked, ascending.
    pub locked: Vec<RowKey>,
    /// Keys with no row (or, with SKIP LOCKED, whose row was locked by someone else), ascending.
    pub not_locked: Vec<RowKey>,
}

fn sorted_keys<K: Into<RowKey>>(keys: impl IntoIterator<Item = K>) -> Vec<RowKey> {
    let mut keys: Vec<RowKey> = keys.into_iter().map(Into::into).collect();
    keys.sort();
    keys.dedup();
    keys
}

macro_rules! lock_rows_impl {
    ($(#[$doc:meta])* $name:ident, $conn:ty, $dialect:expr) => {
        $(#[$doc])*
        ///
        /// # Errors
        /// [`SqlLockError::RowsLocked`] when NOWAIT or the timeout refused a row; a deadlock or
        /// other database error as [`SqlLockError::Sql`]; [`SqlLockError::InvalidIdentifier`].
        pub async fn $name<K: Into<RowKey>>(
            conn: &mut $conn,
            spec: &RowLock,
            keys: impl IntoIterator<Item = K>,
        ) -> Result<LockedRows> {
            const DIALECT: Dialect = $dialect;
            let keys = sorted_keys(keys);
            let mariadb = DIALECT == Dialect::MySql
                && spec.mode == RowLockMode::Share
                && {
                    let (v,): (String,) = sqlx::query_as("SELECT CAST(VERSION() AS CHAR)").fetch_one(&mut *conn).await?;
                    v.contains("MariaDB")
                };
            let sql = spec.statement(DIALECT, mariadb)?;
            // Lock timeout: set, remember the previous value, restore afterwards.
            let previous: Option<String> = match spec.wait {
                RowLockWait::Timeout(t) => Some(match DIALECT {
                    Dialect::Postgres => {
                        let (p,): (String,) = sqlx::query_as("SELECT current_setting('lock_timeout')").fetch_one(&mut *conn).await?;
                        sqlx::query("SELECT set_config('lock_timeout', $1, true)")
                            .bind(t.as_millis().max(1).to_string())
                            .execute(&mut *conn)
                            .await?;
                        p
                    }
                    _ => {
                        let (p,): (i64,) = sqlx::query_as("SELECT CAST(@@SESSION.innodb_lock_wait_timeout AS SIGNED)").fetch_one(&mut *conn).await?;
                        let secs = i64::try_from(t.as_secs()).unwrap_or(i64::MAX / 2) + i64::from(t.subsec_nanos() > 0);
                        sqlx::query("SET SESSION innodb_lock_wait_timeout = ?").bind(secs.max(1)).execute(&mut *conn).await?;
                        p.to_string()
                    }
                }),
                _ => None,
            };
            let mut out = LockedRows::default();
            let mut failure = None;
            for key in keys.iter() {
                let q = sqlx::query(AssertSqlSafe(sql.as_str()));
                let q = match key {
                    RowKey::Int(i) => q.bind(*i),
                    RowKey::Text(s) => q.bind(s.clone()),
                };
                match q.fetch_optional(&mut *conn).await {
                    Ok(Some(_)) => out.locked.push(key.clone()),
                    Ok(None) => out.not_locked.push(key.clone()),
                    Err(e) => {
                        failure = Some(spec.refused(keys.len(), e));
                        break;
                    }
                }
            }
            if let Some(p) = previous {
                let restored = match DIALECT {
                    // After an error the PostgreSQL transaction is aborted and the SET LOCAL
                    // dies with it.
                    Dialect::Postgres if failure.is_some() => Ok(()),
                    Dialect::Postgres => sqlx::query("SELECT set_config('lock_timeout', $1, true)").bind(p).execute(&mut *conn).await.map(|_| ()),
                    _ => match p.parse::<i64>() {
                        Ok(secs) => sqlx::query("SET SESSION innodb_lock_wait_timeout = ?").bind(secs).execute(&mut *conn).await.map(|_| ()),
                        Err(_) => Ok(()),
                    },
                };
                if let Err(e) = restored {
                    if failure.is_none() {
                        failure = Some(SqlLockError::Sql(e));
                    }
                }
            }
            match failure {
                Some(e) => Err(e),
                None => Ok(out),
            }
        }
    };
}

lock_rows_impl!(
    /// Lock rows on PostgreSQL, in ascending key order.
    lock_rows_pg, PgConnection, Dialect::Postgres
);
lock_rows_impl!(
    /// Lock rows on MySQL / MariaDB, in ascending key order.
    lock_rows_mysql, MySqlConnection, Dialect::MySql
);

/// SQLite has no row locks.
///
/// # Errors
/// Always [`SqlLockError::Unsupported`]: SQLite locks the whole database for writing; use
/// `TxOptions::sqlite_immediate()` so writers serialize at `BEGIN`.
#[allow(clippy::unused_async)]
pub async fn lock_rows_sqlite<K: Into<RowKey>>(
    _conn: &mut SqliteConnection,
    _spec: &RowLock,
    _keys: impl IntoIterator<Item = K>,
) -> Result<LockedRows> {
    Err(SqlLockError::Unsupported {
        feature: "row locks",
        database: "SQLite",
        why: "SQLite locks the whole database for writing; use TxOptions::sqlite_immediate() to serialize writers",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_sorted_and_deduplicated() {
        assert_eq!(
            sorted_keys([3i64, 1, 2, 3]),
            vec![RowKey::Int(1), RowKey::Int(2), RowKey::Int(3)]
        );
        assert_eq!(
            sorted_keys(["b", "a"]),
            vec![RowKey::from("a"), RowKey::from("b")]
        );
    }

    #[test]
    fn statements() {
        let s = RowLock::new("stock", "id").nowait();
        assert_eq!(
            s.statement(Dialect::Postgres, false).unwrap(),
            "SELECT 1 FROM \"stock\" WHERE \"id\" = $1 FOR UPDATE NOWAIT"
        );
        let s = RowLock::new("stock", "id").share().skip_locked();
        assert_eq!(
            s.statement(Dialect::MySql, true).unwrap(),
            "SELECT 1 FROM `stock` WHERE `id` = ? LOCK IN SHARE MODE SKIP LOCKED"
        );
        assert_eq!(
            s.statement(Dialect::MySql, false).unwrap(),
            "SELECT 1 FROM `stock` WHERE `id` = ? FOR SHARE SKIP LOCKED"
        );
        assert!(
            RowLock::new("stock; drop", "id")
                .statement(Dialect::Postgres, false)
                .is_err()
        );
    }
}
