//! Idempotency records in the application's own database, with the states of the holdfast
//! service's records: [`Begin::Started`] (the caller owns execution, under a lease),
//! [`Begin::InProgress`] (someone else is executing), [`Begin::Completed`] (the stored result,
//! for replay) and [`Begin::FingerprintMismatch`] (same key, different request); results are kept
//! until the record's expiry; [`Idempotency::abort`] frees the key for a retry; when an
//! executor's lease runs out before it completes, the key is free again.
//!
//! To execute exactly once, write the completion in the same transaction as the work:
//! [`Idempotency::complete_in`] takes the transaction's connection, so the effect and the
//! "completed" record commit (or roll back) together (seed 003's swap executor).

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{
    AssertSqlSafe, Database, MySql, MySqlConnection, PgConnection, Pool, Postgres, Sqlite,
    SqliteConnection,
};

use crate::error::{Result, SqlLockError};
use crate::retry::{RetryPolicy, Sleeper, make_rng};
use crate::sql::{
    Clock, Dialect, SystemClock, duration_ms, is_plain_identifier, ms_to_datetime, numbered,
    random_token,
};

/// The default table name.
pub const DEFAULT_TABLE: &str = "holdfast_idempotency";

/// The statements that create the idempotency table `table` (idempotent).
///
/// # Errors
/// [`SqlLockError::InvalidIdentifier`] for a bad table name.
pub fn ddl(dialect: Dialect, table: &str) -> Result<Vec<String>> {
    if !is_plain_identifier(table) || table.len() > 48 {
        return Err(SqlLockError::InvalidIdentifier(table.to_owned()));
    }
    let columns = "    idem_key VARCHAR(255) NOT NULL PRIMARY KEY,\n    fingerprint VARCHAR(255) NOT NULL,\n    state VARCHAR(20) NOT NULL,\n    owner_token VARCHAR(64) NULL,\n    result_body TEXT NULL,\n    created_at_ms BIGINT NOT NULL,\n    lease_until_ms BIGINT NULL,\n    expires_at_ms BIGINT NOT NULL";
    Ok(match dialect {
        Dialect::MySql => vec![format!(
            "CREATE TABLE IF NOT EXISTS {table} (\n{columns},\n    KEY {table}_expires (expires_at_ms)\n) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4"
        )],
        Dialect::Postgres | Dialect::Sqlite => vec![
            format!("CREATE TABLE IF NOT EXISTS {table} (\n{columns}\n)"),
            format!("CREATE INDEX IF NOT EXISTS {table}_expires ON {table} (expires_at_ms)"),
        ],
    })
}

/// The right to execute the request of an idempotency key (from [`Begin::Started`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Execution {
    /// The idempotency key.
    pub key: String,
    /// The owner token (proves ownership when completing or aborting).
    pub token: String,
    /// When the executor's lease ends unless renewed.
    pub lease_until: Option<DateTime<Utc>>,
}

/// The answer of [`Idempotency::begin`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Begin {
    /// The caller owns execution: do the work, then complete (or abort).
    Started(Execution),
    /// Someone else is executing; try again later (their lease ends at `lease_until`).
    InProgress {
        /// When the current executor's lease ends.
        lease_until: Option<DateTime<Utc>>,
    },
    /// Already done: replay the stored result.
    Completed {
        /// The stored result.
        result: String,
    },
    /// The key was used for a different request.
    FingerprintMismatch,
}

/// How long records and leases last.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdempotencyTtl {
    /// How long a record (and a completed result) is kept (default 24 h).
    pub record: Duration,
    /// How long an executor owns the key before it is free again (default 30 s).
    pub lease: Duration,
}

impl Default for IdempotencyTtl {
    fn default() -> Self {
        Self {
            record: Duration::from_secs(24 * 3600),
            lease: Duration::from_secs(30),
        }
    }
}

/// The idempotency table of one database.
#[derive(Debug)]
pub struct Idempotency<DB: Database> {
    pool: Pool<DB>,
    table: String,
    clock: Arc<dyn Clock>,
    ttl: IdempotencyTtl,
}

impl<DB: Database> Clone for Idempotency<DB> {
    fn clone(&self) -> Self {
        Self {
            pool: self.pool.clone(),
            table: self.table.clone(),
            clock: self.clock.clone(),
            ttl: self.ttl,
        }
    }
}

impl<DB: Database> Idempotency<DB> {
    /// The table [`DEFAULT_TABLE`], system clock, default TTLs.
    #[must_use]
    pub fn new(pool: Pool<DB>) -> Self {
        Self {
            pool,
            table: DEFAULT_TABLE.to_owned(),
            clock: Arc::new(SystemClock),
            ttl: IdempotencyTtl::default(),
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

    /// Use other TTLs.
    #[must_use]
    pub fn with_ttl(mut self, ttl: IdempotencyTtl) -> Self {
        self.ttl = ttl;
        self
    }

    fn check(key: &str, fingerprint: &str) -> Result<()> {
        if key.is_empty() || key.len() > 255 || fingerprint.len() > 255 {
            return Err(SqlLockError::InvalidArgument(
                "idempotency key must be 1..=255 bytes, fingerprint at most 255".into(),
            ));
        }
        Ok(())
    }
}

type IdemRow = (String, String, Option<String>, Option<i64>);

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

macro_rules! idempotency_impl {
    ($db:ty, $conn:ty, $dialect:expr) => {
        impl Idempotency<$db> {
            const DIALECT: Dialect = $dialect;

            fn q(&self, sql: &str) -> AssertSqlSafe<String> {
                AssertSqlSafe(numbered(Self::DIALECT, &sql.replace("{t}", &self.table)))
            }

            /// Create the table if it does not exist.
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

            /// Begin a request with idempotency `key` and request `fingerprint` (e.g. a hash of
            /// the body): exactly one concurrent caller gets [`Begin::Started`].
            ///
            /// # Errors
            /// [`SqlLockError::InvalidArgument`]; a database error.
            pub async fn begin(&self, key: &str, fingerprint: &str) -> Result<Begin> {
                Self::check(key, fingerprint)?;
                for _ in 0..20 {
                    let now = self.clock.now_ms();
                    let token = random_token();
                    let lease_until = now.saturating_add(duration_ms(self.ttl.lease));
                    let expires = now.saturating_add(duration_ms(self.ttl.record));
                    let insert = match Self::DIALECT {
                        Dialect::MySql => "INSERT INTO {t} (idem_key, fingerprint, state, owner_token, result_body, created_at_ms, lease_until_ms, expires_at_ms) VALUES (?, ?, 'in_progress', ?, NULL, ?, ?, ?)",
                        _ => "INSERT INTO {t} (idem_key, fingerprint, state, owner_token, result_body, created_at_ms, lease_until_ms, expires_at_ms) VALUES (?, ?, 'in_progress', ?, NULL, ?, ?, ?) ON CONFLICT (idem_key) DO NOTHING",
                    };
                    let inserted = sqlx::query(self.q(insert))
                        .bind(key)
                        .bind(fingerprint)
                        .bind(&token)
                        .bind(now)
                        .bind(lease_until)
                        .bind(expires)
                        .execute(&self.pool)
                        .await;
                    let mut started = match inserted {
                        Ok(r) => r.rows_affected() == 1,
                        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => false,
                        Err(e) => or_retry!(Err::<bool, _>(e)),
                    };
                    if !started {
                        // Take over an expired record, or one whose executor's lease ran out.
                        started = or_retry!(sqlx::query(self.q(
                            "UPDATE {t} SET fingerprint = ?, state = 'in_progress', owner_token = ?, result_body = NULL, \
                             created_at_ms = ?, lease_until_ms = ?, expires_at_ms = ? \
                             WHERE idem_key = ? AND (expires_at_ms <= ? OR (state = 'in_progress' AND lease_until_ms <= ?))",
                        ))
                        .bind(fingerprint)
                        .bind(&token)
                        .bind(now)
                        .bind(lease_until)
                        .bind(expires)
                        .bind(key)
                        .bind(now)
                        .bind(now)
                        .execute(&self.pool)
                        .await)
                        .rows_affected()
                            == 1;
                    }
                    if started {
                        return Ok(Begin::Started(Execution {
                            key: key.to_owned(),
                            token,
                            lease_until: ms_to_datetime(lease_until),
                        }));
                    }
                    let row: Option<(String, String, Option<String>, Option<i64>)> = or_retry!(sqlx::query_as(self.q(
                        "SELECT fingerprint, state, result_body, lease_until_ms FROM {t} WHERE idem_key = ?",
                    ))
                    .bind(key)
                    .fetch_optional(&self.pool)
                    .await);
                    let Some((stored_fp, state, result, lease)): Option<IdemRow> = row else { continue };
                    if stored_fp != fingerprint {
                        return Ok(Begin::FingerprintMismatch);
                    }
                    return Ok(match (state.as_str(), result) {
                        ("completed", Some(result)) => Begin::Completed { result },
                        ("completed", None) => Begin::Completed { result: String::new() },
                        _ => Begin::InProgress { lease_until: lease.and_then(ms_to_datetime) },
                    });
                }
                Err(SqlLockError::InvalidArgument(format!("idempotency key {key} changed state too often to begin")))
            }

            /// [`Self::begin`], waiting while someone else executes: while the answer is
            /// [`Begin::InProgress`], sleep as `policy` says and ask again. Returns the first
            /// other answer, or the last `InProgress` when the policy gives up.
            ///
            /// # Errors
            /// As [`Self::begin`].
            pub async fn begin_or_wait(
                &self,
                key: &str,
                fingerprint: &str,
                policy: &RetryPolicy,
                sleeper: &dyn Sleeper,
            ) -> Result<Begin> {
                let mut rng = make_rng(None);
                let attempts = policy.effective_attempts();
                let start = tokio::time::Instant::now();
                let mut n = 0;
                loop {
                    n += 1;
                    let answer = self.begin(key, fingerprint).await?;
                    if !matches!(answer, Begin::InProgress { .. }) || n >= attempts {
                        return Ok(answer);
                    }
                    let delay = policy.delay(n - 1, &mut rng);
                    if policy.max_total.is_some_and(|max| start.elapsed() + delay > max) {
                        return Ok(answer);
                    }
                    sleeper.sleep(delay).await;
                }
            }

            /// Store `result` and mark the record completed (until the record TTL), on a
            /// connection from the pool.
            ///
            /// # Errors
            /// [`SqlLockError::IdempotencyNotOwner`] if the execution lost the key; a database
            /// error.
            pub async fn complete(&self, execution: &Execution, result: &str) -> Result<()> {
                let mut conn = self.pool.acquire().await?;
                self.complete_in(&mut conn, execution, result).await
            }

            /// [`Self::complete`] on `conn`, typically the transaction that did the work, so the
            /// work and the completion commit together.
            ///
            /// # Errors
            /// [`SqlLockError::IdempotencyNotOwner`]; a database error.
            pub async fn complete_in(&self, conn: &mut $conn, execution: &Execution, result: &str) -> Result<()> {
                let now = self.clock.now_ms();
                let n = sqlx::query(self.q(
                    "UPDATE {t} SET state = 'completed', result_body = ?, owner_token = NULL, lease_until_ms = NULL, expires_at_ms = ? \
                     WHERE idem_key = ? AND owner_token = ? AND state = 'in_progress'",
                ))
                .bind(result)
                .bind(now.saturating_add(duration_ms(self.ttl.record)))
                .bind(&execution.key)
                .bind(&execution.token)
                .execute(&mut *conn)
                .await?
                .rows_affected();
                if n == 1 { Ok(()) } else { Err(SqlLockError::IdempotencyNotOwner { key: execution.key.clone() }) }
            }

            /// Give the key up without a result (the work failed): the next caller starts.
            ///
            /// # Errors
            /// [`SqlLockError::IdempotencyNotOwner`]; a database error.
            pub async fn abort(&self, execution: &Execution) -> Result<()> {
                let n = sqlx::query(self.q("DELETE FROM {t} WHERE idem_key = ? AND owner_token = ? AND state = 'in_progress'"))
                    .bind(&execution.key)
                    .bind(&execution.token)
                    .execute(&self.pool)
                    .await?
                    .rows_affected();
                if n == 1 { Ok(()) } else { Err(SqlLockError::IdempotencyNotOwner { key: execution.key.clone() }) }
            }

            /// Extend the executor's lease by the lease TTL from now.
            ///
            /// # Errors
            /// [`SqlLockError::IdempotencyNotOwner`]; a database error.
            pub async fn renew(&self, execution: &mut Execution) -> Result<()> {
                let until = self.clock.now_ms().saturating_add(duration_ms(self.ttl.lease));
                let n = sqlx::query(self.q("UPDATE {t} SET lease_until_ms = ? WHERE idem_key = ? AND owner_token = ? AND state = 'in_progress'"))
                    .bind(until)
                    .bind(&execution.key)
                    .bind(&execution.token)
                    .execute(&self.pool)
                    .await?
                    .rows_affected();
                if n == 1 {
                    execution.lease_until = ms_to_datetime(until);
                    Ok(())
                } else {
                    Err(SqlLockError::IdempotencyNotOwner { key: execution.key.clone() })
                }
            }

            /// Delete expired records; returns how many.
            ///
            /// # Errors
            /// A database error.
            pub async fn sweep_expired(&self) -> Result<u64> {
                Ok(sqlx::query(self.q("DELETE FROM {t} WHERE expires_at_ms <= ?"))
                    .bind(self.clock.now_ms())
                    .execute(&self.pool)
                    .await?
                    .rows_affected())
            }
        }
    };
}

idempotency_impl!(Postgres, PgConnection, Dialect::Postgres);
idempotency_impl!(MySql, MySqlConnection, Dialect::MySql);
idempotency_impl!(Sqlite, SqliteConnection, Dialect::Sqlite);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_migrations_match_the_generated_ddl() {
        for (dialect, file) in [
            (
                Dialect::Postgres,
                include_str!("../migrations/postgres/0002_holdfast_idempotency.sql"),
            ),
            (
                Dialect::MySql,
                include_str!("../migrations/mysql/0002_holdfast_idempotency.sql"),
            ),
            (
                Dialect::Sqlite,
                include_str!("../migrations/sqlite/0002_holdfast_idempotency.sql"),
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
