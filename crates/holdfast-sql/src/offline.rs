//! Offline locks (Fowler's Pessimistic Offline Lock, seed 002) in the application's own
//! database: a lock table keyed by (object type, object id), one holder per object, reentrant per
//! holder (a hold count), with a reason and an optional expiry; release, release-all-for-holder,
//! listing and sweeping of expired rows.
//!
//! Safety rests on the table's primary key: an object has at most one row, and every change of
//! holder is a single conditional statement (insert if absent; take over only if expired), so
//! two holders never hold the same object at once, also under concurrency, on every database.
//!
//! Expiry is judged by the application's [`Clock`] (milliseconds since the epoch; keep the
//! application servers' clocks synchronised). An expired row no longer counts as held: it is
//! taken over by the next acquirer, hidden from [`OfflineLocks::list`] and deleted by
//! [`OfflineLocks::sweep_expired`].
//!
//! The table is created by [`OfflineLocks::migrate`] (idempotent), or by the SQL files in
//! `crates/holdfast-sql/migrations/{postgres,mysql,sqlite}/` for the default table name.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{AssertSqlSafe, Database, MySql, Pool, Postgres, Sqlite};

use crate::error::{Result, SqlLockError};
use crate::sql::{
    Clock, Dialect, SystemClock, duration_ms, is_plain_identifier, ms_to_datetime, numbered,
};

/// The default table name.
pub const DEFAULT_TABLE: &str = "holdfast_offline_locks";

/// The statements that create the offline lock table `table` (idempotent).
///
/// # Errors
/// [`SqlLockError::InvalidIdentifier`] for a bad table name.
pub fn ddl(dialect: Dialect, table: &str) -> Result<Vec<String>> {
    if !is_plain_identifier(table) || table.len() > 48 {
        return Err(SqlLockError::InvalidIdentifier(table.to_owned()));
    }
    let columns = "    object_type VARCHAR(100) NOT NULL,\n    object_id VARCHAR(255) NOT NULL,\n    holder VARCHAR(255) NOT NULL,\n    reason VARCHAR(255) NULL,\n    hold_count BIGINT NOT NULL,\n    acquired_at_ms BIGINT NOT NULL,\n    updated_at_ms BIGINT NOT NULL,\n    expires_at_ms BIGINT NULL,\n    PRIMARY KEY (object_type, object_id)";
    Ok(match dialect {
        Dialect::MySql => vec![format!(
            "CREATE TABLE IF NOT EXISTS {table} (\n{columns},\n    KEY {table}_holder (holder),\n    KEY {table}_expires (expires_at_ms)\n) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4"
        )],
        Dialect::Postgres | Dialect::Sqlite => vec![
            format!("CREATE TABLE IF NOT EXISTS {table} (\n{columns}\n)"),
            format!("CREATE INDEX IF NOT EXISTS {table}_holder ON {table} (holder)"),
            format!("CREATE INDEX IF NOT EXISTS {table}_expires ON {table} (expires_at_ms)"),
        ],
    })
}

/// One held offline lock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OfflineLock {
    /// Kind of object (`Patient`).
    pub object_type: String,
    /// Id of the object.
    pub object_id: String,
    /// Who holds it (a user, a session).
    pub holder: String,
    /// Why (`editing`).
    pub reason: Option<String>,
    /// How many times the holder acquired it without releasing.
    pub hold_count: i64,
    /// When the current holder first acquired it.
    pub acquired_at: Option<DateTime<Utc>>,
    /// Last acquisition or release.
    pub updated_at: Option<DateTime<Utc>>,
    /// When it expires (`None`: never).
    pub expires_at: Option<DateTime<Utc>>,
}

type LockRow = (
    String,
    String,
    String,
    Option<String>,
    i64,
    i64,
    i64,
    Option<i64>,
);

impl From<LockRow> for OfflineLock {
    fn from(r: LockRow) -> Self {
        Self {
            object_type: r.0,
            object_id: r.1,
            holder: r.2,
            reason: r.3,
            hold_count: r.4,
            acquired_at: ms_to_datetime(r.5),
            updated_at: ms_to_datetime(r.6),
            expires_at: r.7.and_then(ms_to_datetime),
        }
    }
}

/// The offline lock table of one database.
#[derive(Debug)]
pub struct OfflineLocks<DB: Database> {
    pool: Pool<DB>,
    table: String,
    clock: Arc<dyn Clock>,
}

impl<DB: Database> Clone for OfflineLocks<DB> {
    fn clone(&self) -> Self {
        Self {
            pool: self.pool.clone(),
            table: self.table.clone(),
            clock: self.clock.clone(),
        }
    }
}

impl<DB: Database> OfflineLocks<DB> {
    /// The table [`DEFAULT_TABLE`] in `pool`'s database, with the system clock.
    #[must_use]
    pub fn new(pool: Pool<DB>) -> Self {
        Self {
            pool,
            table: DEFAULT_TABLE.to_owned(),
            clock: Arc::new(SystemClock),
        }
    }

    /// Use another table name (a plain identifier of at most 48 characters).
    ///
    /// # Errors
    /// [`SqlLockError::InvalidIdentifier`].
    pub fn with_table(mut self, table: &str) -> Result<Self> {
        if !is_plain_identifier(table) || table.len() > 48 {
            return Err(SqlLockError::InvalidIdentifier(table.to_owned()));
        }
        table.clone_into(&mut self.table);
        Ok(self)
    }

    /// Use another clock (tests).
    #[must_use]
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// The table name.
    #[must_use]
    pub fn table(&self) -> &str {
        &self.table
    }

    fn check(object_type: &str, object_id: &str, holder: &str, reason: Option<&str>) -> Result<()> {
        let bad = |what: &str, max: usize| {
            SqlLockError::InvalidArgument(format!("{what} must be 1..={max} bytes"))
        };
        if object_type.is_empty() || object_type.len() > 100 {
            return Err(bad("object_type", 100));
        }
        if object_id.is_empty() || object_id.len() > 255 {
            return Err(bad("object_id", 255));
        }
        if holder.is_empty() || holder.len() > 255 {
            return Err(bad("holder", 255));
        }
        if reason.is_some_and(|r| r.len() > 255) {
            return Err(bad("reason", 255));
        }
        Ok(())
    }
}

const COLUMNS: &str = "object_type, object_id, holder, reason, hold_count, acquired_at_ms, updated_at_ms, expires_at_ms";

/// Inside a retry loop: a concurrency conflict of one statement (e.g. an InnoDB deadlock between
/// concurrent inserts of one key) backs off briefly and starts the loop body again; any other
/// error is returned.
macro_rules! or_retry {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(e) => {
                let e: SqlLockError = e.into();
                if crate::classify::Classify::conflict(&e).is_some() {
                    let ms: u64 = rand::random_range(1..=20);
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    continue;
                }
                return Err(e);
            }
        }
    };
}

macro_rules! offline_impl {
    ($db:ty, $dialect:expr) => {
        impl OfflineLocks<$db> {
            const DIALECT: Dialect = $dialect;

            fn q(&self, sql: &str) -> AssertSqlSafe<String> {
                AssertSqlSafe(numbered(Self::DIALECT, &sql.replace("{t}", &self.table)))
            }

            /// Create the table and its indexes if they do not exist.
            ///
            /// # Errors
            /// A database error.
            pub async fn migrate(&self) -> Result<()> {
                for stmt in ddl(Self::DIALECT, &self.table)? {
                    sqlx::query(AssertSqlSafe(stmt)).execute(&self.pool).await?;
                }
                Ok(())
            }

            /// Drop the table (tests, uninstall).
            ///
            /// # Errors
            /// A database error.
            pub async fn drop_table(&self) -> Result<()> {
                sqlx::query(self.q("DROP TABLE IF EXISTS {t}")).execute(&self.pool).await?;
                Ok(())
            }

            /// Acquire `object_type/object_id` for `holder`: granted if free, expired, or already
            /// held by `holder` (reentrant: the hold count goes up, the reason and the expiry are
            /// refreshed). `ttl` `None` never expires.
            ///
            /// # Errors
            /// [`SqlLockError::OfflineLockHeld`] naming the current holder, its reason and expiry;
            /// [`SqlLockError::InvalidArgument`]; a database error.
            pub async fn acquire(
                &self,
                object_type: &str,
                object_id: &str,
                holder: &str,
                reason: Option<&str>,
                ttl: Option<Duration>,
            ) -> Result<OfflineLock> {
                Self::check(object_type, object_id, holder, reason)?;
                for _ in 0..20 {
                    let now = self.clock.now_ms();
                    let expires = ttl.map(|t| now.saturating_add(duration_ms(t)));
                    // 1. Insert if absent.
                    let insert = match Self::DIALECT {
                        Dialect::MySql => format!("INSERT INTO {{t}} ({COLUMNS}) VALUES (?, ?, ?, ?, 1, ?, ?, ?)"),
                        _ => format!("INSERT INTO {{t}} ({COLUMNS}) VALUES (?, ?, ?, ?, 1, ?, ?, ?) ON CONFLICT (object_type, object_id) DO NOTHING"),
                    };
                    let inserted = sqlx::query(self.q(&insert))
                        .bind(object_type)
                        .bind(object_id)
                        .bind(holder)
                        .bind(reason)
                        .bind(now)
                        .bind(now)
                        .bind(expires)
                        .execute(&self.pool)
                        .await;
                    let inserted = match inserted {
                        Ok(r) => r.rows_affected() == 1,
                        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => false,
                        Err(e) => or_retry!(Err::<bool, _>(e)),
                    };
                    if !inserted {
                        // 2. Reenter (same holder, not expired) or take over an expired row.
                        // MySQL evaluates SET left to right, so `holder` is assigned last.
                        let updated = or_retry!(sqlx::query(self.q(
                            "UPDATE {t} SET \
                             hold_count = CASE WHEN holder = ? AND (expires_at_ms IS NULL OR expires_at_ms > ?) THEN hold_count + 1 ELSE 1 END, \
                             acquired_at_ms = CASE WHEN holder = ? AND (expires_at_ms IS NULL OR expires_at_ms > ?) THEN acquired_at_ms ELSE ? END, \
                             reason = ?, expires_at_ms = ?, updated_at_ms = ?, holder = ? \
                             WHERE object_type = ? AND object_id = ? AND (holder = ? OR (expires_at_ms IS NOT NULL AND expires_at_ms <= ?))",
                        ))
                        .bind(holder)
                        .bind(now)
                        .bind(holder)
                        .bind(now)
                        .bind(now)
                        .bind(reason)
                        .bind(expires)
                        .bind(now)
                        .bind(holder)
                        .bind(object_type)
                        .bind(object_id)
                        .bind(holder)
                        .bind(now)
                        .execute(&self.pool)
                        .await)
                        .rows_affected();
                        if updated == 0 {
                            // 3. Held by someone else (or released in between: try again).
                            match or_retry!(self.row(object_type, object_id).await) {
                                Some(l) if l.holder != holder => {
                                    return Err(SqlLockError::OfflineLockHeld {
                                        object_type: l.object_type,
                                        object_id: l.object_id,
                                        holder: l.holder,
                                        reason: l.reason,
                                        expires_at: l.expires_at,
                                    });
                                }
                                _ => continue,
                            }
                        }
                    }
                    if let Some(l) = or_retry!(self.row(object_type, object_id).await) {
                        if l.holder == holder {
                            return Ok(l);
                        }
                    }
                }
                Err(SqlLockError::InvalidArgument(format!(
                    "offline lock {object_type}/{object_id} changed hands too often to acquire"
                )))
            }

            async fn row(&self, object_type: &str, object_id: &str) -> Result<Option<OfflineLock>> {
                let row: Option<LockRow> =
                    sqlx::query_as(self.q(&format!("SELECT {COLUMNS} FROM {{t}} WHERE object_type = ? AND object_id = ?")))
                        .bind(object_type)
                        .bind(object_id)
                        .fetch_optional(&self.pool)
                        .await?;
                Ok(row.map(OfflineLock::from))
            }

            /// The lock on `object_type/object_id`, if held and not expired.
            ///
            /// # Errors
            /// A database error.
            pub async fn get(&self, object_type: &str, object_id: &str) -> Result<Option<OfflineLock>> {
                let now = self.clock.now_ms();
                let now_dt = ms_to_datetime(now);
                Ok(self.row(object_type, object_id).await?.filter(|l| l.expires_at.is_none_or(|e| Some(e) > now_dt)))
            }

            /// Release one hold of `holder` on `object_type/object_id`; returns the holds left
            /// (0: the object is free).
            ///
            /// # Errors
            /// [`SqlLockError::NotHolder`] if `holder` does not hold it; a database error.
            pub async fn release(&self, object_type: &str, object_id: &str, holder: &str) -> Result<i64> {
                let now = self.clock.now_ms();
                let decremented = sqlx::query(self.q(
                    "UPDATE {t} SET hold_count = hold_count - 1, updated_at_ms = ? \
                     WHERE object_type = ? AND object_id = ? AND holder = ? AND hold_count > 1",
                ))
                .bind(now)
                .bind(object_type)
                .bind(object_id)
                .bind(holder)
                .execute(&self.pool)
                .await?
                .rows_affected();
                if decremented == 1 {
                    return Ok(self.row(object_type, object_id).await?.filter(|l| l.holder == holder).map_or(0, |l| l.hold_count));
                }
                let deleted = sqlx::query(self.q("DELETE FROM {t} WHERE object_type = ? AND object_id = ? AND holder = ? AND hold_count <= 1"))
                    .bind(object_type)
                    .bind(object_id)
                    .bind(holder)
                    .execute(&self.pool)
                    .await?
                    .rows_affected();
                if deleted == 1 {
                    Ok(0)
                } else {
                    Err(SqlLockError::NotHolder {
                        object_type: object_type.to_owned(),
                        object_id: object_id.to_owned(),
                        holder: holder.to_owned(),
                    })
                }
            }

            /// Release every lock of `holder` (e.g. at logout); returns how many objects were freed.
            ///
            /// # Errors
            /// A database error.
            pub async fn release_all(&self, holder: &str) -> Result<u64> {
                Ok(sqlx::query(self.q("DELETE FROM {t} WHERE holder = ?")).bind(holder).execute(&self.pool).await?.rows_affected())
            }

            /// Free an object whoever holds it (administrators); returns whether it was held.
            ///
            /// # Errors
            /// A database error.
            pub async fn force_release(&self, object_type: &str, object_id: &str) -> Result<bool> {
                let n = sqlx::query(self.q("DELETE FROM {t} WHERE object_type = ? AND object_id = ?"))
                    .bind(object_type)
                    .bind(object_id)
                    .execute(&self.pool)
                    .await?
                    .rows_affected();
                Ok(n > 0)
            }

            /// The locks held now (expired ones left out), of one holder or of all, ordered by
            /// object type and id.
            ///
            /// # Errors
            /// A database error.
            pub async fn list(&self, holder: Option<&str>) -> Result<Vec<OfflineLock>> {
                let now = self.clock.now_ms();
                let rows: Vec<LockRow> = sqlx::query_as(self.q(&format!(
                    "SELECT {COLUMNS} FROM {{t}} WHERE (expires_at_ms IS NULL OR expires_at_ms > ?) \
                     AND (? IS NULL OR holder = ?) ORDER BY object_type, object_id"
                )))
                .bind(now)
                .bind(holder)
                .bind(holder)
                .fetch_all(&self.pool)
                .await?;
                Ok(rows.into_iter().map(OfflineLock::from).collect())
            }

            /// Delete expired rows; returns how many.
            ///
            /// # Errors
            /// A database error.
            pub async fn sweep_expired(&self) -> Result<u64> {
                let now = self.clock.now_ms();
                Ok(sqlx::query(self.q("DELETE FROM {t} WHERE expires_at_ms IS NOT NULL AND expires_at_ms <= ?"))
                    .bind(now)
                    .execute(&self.pool)
                    .await?
                    .rows_affected())
            }
        }
    };
}

offline_impl!(Postgres, Dialect::Postgres);
offline_impl!(MySql, Dialect::MySql);
offline_impl!(Sqlite, Dialect::Sqlite);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ddl_rejects_bad_names_and_names_indexes_after_the_table() {
        assert!(ddl(Dialect::Postgres, "x; drop").is_err());
        let s = ddl(Dialect::MySql, "locks").unwrap();
        assert_eq!(s.len(), 1);
        assert!(s[0].contains("KEY locks_holder (holder)"));
        assert_eq!(ddl(Dialect::Sqlite, "locks").unwrap().len(), 3);
    }

    #[test]
    fn shipped_migrations_match_the_generated_ddl() {
        for (dialect, file) in [
            (
                Dialect::Postgres,
                include_str!("../migrations/postgres/0001_holdfast_offline_locks.sql"),
            ),
            (
                Dialect::MySql,
                include_str!("../migrations/mysql/0001_holdfast_offline_locks.sql"),
            ),
            (
                Dialect::Sqlite,
                include_str!("../migrations/sqlite/0001_holdfast_offline_locks.sql"),
            ),
        ] {
            let generated: String = ddl(dialect, DEFAULT_TABLE)
                .unwrap()
                .iter()
                .map(|s| format!("{s};\n"))
                .collect();
            assert_eq!(file.trim(), generated.trim(), "{dialect}");
        }
    }
}
