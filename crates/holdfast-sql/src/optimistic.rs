//! Optimistic concurrency: update a row only if its version column still has the value the
//! caller read, bumping it; otherwise a typed [`SqlLockError::VersionConflict`] carrying the
//! expected and the actual version. [`retry_on_conflict`] reloads and reapplies.
//!
//! Works on PostgreSQL, MySQL/MariaDB and SQLite alike.

use std::future::Future;

use serde::{Deserialize, Serialize};
use sqlx::{AssertSqlSafe, MySqlConnection, PgConnection, SqliteConnection};

use crate::classify::Classify;
use crate::error::{Result, SqlLockError};
use crate::retry::{RetryPolicy, Sleeper, make_rng};
use crate::rows::RowKey;
use crate::sql::Dialect;

/// A value to write in a versioned update.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum SqlValue {
    /// SQL NULL.
    Null,
    /// A boolean.
    Bool(bool),
    /// A 64-bit integer.
    Int(i64),
    /// A double.
    Float(f64),
    /// Text.
    Text(String),
}

impl From<i64> for SqlValue {
    fn from(v: i64) -> Self {
        Self::Int(v)
    }
}
impl From<&str> for SqlValue {
    fn from(v: &str) -> Self {
        Self::Text(v.to_owned())
    }
}
impl From<String> for SqlValue {
    fn from(v: String) -> Self {
        Self::Text(v)
    }
}
impl From<bool> for SqlValue {
    fn from(v: bool) -> Self {
        Self::Bool(v)
    }
}
impl From<f64> for SqlValue {
    fn from(v: f64) -> Self {
        Self::Float(v)
    }
}

/// A table with a key column and an integer version column.
#[derive(Clone, Debug)]
pub struct Versioned {
    table: String,
    key_column: String,
    version_column: String,
}

impl Versioned {
    /// `table` keyed by `key_column`, versioned by `version_column` (all plain identifiers).
    #[must_use]
    pub fn new(table: &str, key_column: &str, version_column: &str) -> Self {
        Self {
            table: table.to_owned(),
            key_column: key_column.to_owned(),
            version_column: version_column.to_owned(),
        }
    }

    fn update_sql(&self, dialect: Dialect, columns: &[&str]) -> Result<String> {
        if columns.is_empty() {
            return Err(SqlLockError::InvalidArgument(
                "a versioned update needs at least one column".into(),
            ));
        }
        let version = dialect.quote(&self.version_column)?;
        let mut sets = Vec::with_capacity(columns.len() + 1);
        for (i, c) in columns.iter().enumerate() {
            let c = dialect.quote(c)?;
            if c == version {
                return Err(SqlLockError::InvalidArgument(
                    "the version column is bumped by the update itself".into(),
                ));
            }
            sets.push(format!("{c} = {}", dialect.placeholder(i + 1)));
        }
        sets.push(format!("{version} = {version} + 1"));
        let n = columns.len();
        Ok(format!(
            "UPDATE {} SET {} WHERE {} = {} AND {version} = {}",
            dialect.quote(&self.table)?,
            sets.join(", "),
            dialect.quote(&self.key_column)?,
            dialect.placeholder(n + 1),
            dialect.placeholder(n + 2),
        ))
    }

    fn version_sql(&self, dialect: Dialect) -> Result<String> {
        Ok(format!(
            "SELECT {} FROM {} WHERE {} = {}",
            dialect.quote(&self.version_column)?,
            dialect.quote(&self.table)?,
            dialect.quote(&self.key_column)?,
            dialect.placeholder(1)
        ))
    }
}

macro_rules! optimistic_impl {
    ($update:ident, $version:ident, $conn:ty, $dialect:expr, $dbname:literal) => {
        #[doc = concat!("Versioned update on ", $dbname, ": set `values` on the row `key` if its version is still `expected`, and bump the version. Returns the new version.")]
        ///
        /// # Errors
        /// [`SqlLockError::VersionConflict`] if the row moved on (or is gone); a database error.
        pub async fn $update(
            conn: &mut $conn,
            spec: &Versioned,
            key: impl Into<RowKey>,
            expected: i64,
            values: &[(&str, SqlValue)],
        ) -> Result<i64> {
            const DIALECT: Dialect = $dialect;
            let key = key.into();
            let columns: Vec<&str> = values.iter().map(|(c, _)| *c).collect();
            let sql = spec.update_sql(DIALECT, &columns)?;
            let mut q = sqlx::query(AssertSqlSafe(sql));
            for (_, v) in values {
                q = match v {
                    SqlValue::Null => q.bind(Option::<String>::None),
                    SqlValue::Bool(b) => q.bind(*b),
                    SqlValue::Int(i) => q.bind(*i),
                    SqlValue::Float(f) => q.bind(*f),
                    SqlValue::Text(s) => q.bind(s.clone()),
                };
            }
            q = match &key {
                RowKey::Int(i) => q.bind(*i),
                RowKey::Text(s) => q.bind(s.clone()),
            };
            let done = q.bind(expected).execute(&mut *conn).await?.rows_affected();
            if done == 1 {
                return Ok(expected + 1);
            }
            let actual = $version(conn, spec, key.clone()).await?;
            Err(SqlLockError::VersionConflict { table: spec.table.clone(), key: key.to_string(), expected, actual })
        }

        #[doc = concat!("The current version of row `key` on ", $dbname, " (`None`: no such row).")]
        ///
        /// # Errors
        /// A database error.
        pub async fn $version(conn: &mut $conn, spec: &Versioned, key: impl Into<RowKey>) -> Result<Option<i64>> {
            let q = sqlx::query_as::<_, (i64,)>(AssertSqlSafe(spec.version_sql($dialect)?));
            let q = match key.into() {
                RowKey::Int(i) => q.bind(i),
                RowKey::Text(s) => q.bind(s),
            };
            Ok(q.fetch_optional(conn).await?.map(|(v,)| v))
        }
    };
}

optimistic_impl!(
    update_versioned_pg,
    current_version_pg,
    PgConnection,
    Dialect::Postgres,
    "PostgreSQL"
);
optimistic_impl!(
    update_versioned_mysql,
    current_version_mysql,
    MySqlConnection,
    Dialect::MySql,
    "MySQL/MariaDB"
);
optimistic_impl!(
    update_versioned_sqlite,
    current_version_sqlite,
    SqliteConnection,
    Dialect::Sqlite,
    "SQLite"
);

/// Run `attempt` (given the 1-based attempt number; it should reload the row, recompute and
/// write with a versioned update) until it does not fail with a version conflict, at most
/// `policy.attempts` times, sleeping with backoff and jitter between attempts.
///
/// # Errors
/// The last error: a version conflict if attempts ran out, or any other error at once.
pub async fn retry_on_conflict<T, E, F, Fut>(
    policy: &RetryPolicy,
    sleeper: &dyn Sleeper,
    mut attempt: F,
) -> Result<T, E>
where
    E: Classify,
    F: FnMut(u32) -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut rng = make_rng(None);
    let attempts = policy.effective_attempts();
    let start = tokio::time::Instant::now();
    let mut n = 0;
    loop {
        n += 1;
        match attempt(n).await {
            Ok(v) => return Ok(v),
            Err(e) if e.is_version_conflict() && n < attempts => {
                let delay = policy.delay(n - 1, &mut rng);
                if policy
                    .max_total
                    .is_some_and(|max| start.elapsed() + delay > max)
                {
                    return Err(e);
                }
                tracing::debug!(
                    attempt = n,
                    ?delay,
                    "version conflict; reloading and retrying"
                );
                sleeper.sleep(delay).await;
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn update_statement() {
        let v = Versioned::new("doc", "id", "version");
        assert_eq!(
            v.update_sql(Dialect::Postgres, &["title", "body"]).unwrap(),
            "UPDATE \"doc\" SET \"title\" = $1, \"body\" = $2, \"version\" = \"version\" + 1 WHERE \"id\" = $3 AND \"version\" = $4"
        );
        assert!(v.update_sql(Dialect::MySql, &[]).is_err());
        assert!(v.update_sql(Dialect::MySql, &["version"]).is_err());
    }
}
