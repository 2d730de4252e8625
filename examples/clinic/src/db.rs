//! The clinic's database: one of SQLite (the embedded default), PostgreSQL or MariaDB, chosen by
//! the URL, behind one [`Store`].
//!
//! Every query is written once, with `?` placeholders and `{p}` for the table prefix, and runs
//! on whichever database is configured: [`on_db!`] expands a block once per database with the
//! concrete pool type, so each expansion is ordinary, fully typed sqlx code, and
//! [`Store::sql`] turns the template into that database's SQL (`$1, $2, …` on PostgreSQL).
//!
//! Portability rules the queries follow: integers are `BIGINT` (decoded as `i64` everywhere),
//! no booleans, no `SUM` (MariaDB answers `DECIMAL`), new ids come from `INSERT … RETURNING id`
//! (PostgreSQL, SQLite ≥ 3.35, MariaDB ≥ 10.5; MySQL 8 lacks it and is not supported).
//!
//! There are deliberately **no unique constraints** on "one booking per slot", "one
//! prescription per appointment" and the like: the point of this application is that the
//! locking alone keeps those invariants, and each scenario has a control test that switches the
//! locking off and shows the invariant break. A production schema would add them as a second
//! line of defence.

use std::str::FromStr;
use std::time::Duration;

use futures::future::BoxFuture;
use holdfast_sql::SqlLockError;
use holdfast_sql::rows::{LockedRows, RowKey, RowLock, lock_rows_mysql, lock_rows_pg};
use holdfast_sql::sql::Dialect;
use holdfast_sql::transaction::{IsolationLevel, TxOptions};
use sqlx::mysql::{MySqlConnectOptions, MySqlPoolOptions};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
use sqlx::{
    AssertSqlSafe, MySqlConnection, MySqlPool, PgConnection, PgPool, SqliteConnection, SqlitePool,
};

/// Connections per pool unless configured otherwise.
pub const POOL_CONNECTIONS_MAX_DEFAULT: u32 = 10;
/// How long a request waits for a pooled connection before failing.
pub const POOL_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long SQLite waits for the database write lock before reporting "busy".
pub const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest table prefix (the offline-lock table name must stay within 48 characters).
pub const TABLE_PREFIX_BYTES_MAX: usize = 24;

/// A connection pool of one of the supported databases.
#[derive(Clone, Debug)]
pub enum Db {
    /// SQLite (embedded default).
    Sqlite(SqlitePool),
    /// PostgreSQL.
    Postgres(PgPool),
    /// MariaDB (≥ 10.5).
    MySql(MySqlPool),
}

/// Run `$body` with `$pool` bound to the concrete pool of `$db` (expanded once per database).
#[macro_export]
macro_rules! on_db {
    ($db:expr, $pool:ident => $body:expr) => {
        match $db {
            $crate::db::Db::Sqlite($pool) => $body,
            $crate::db::Db::Postgres($pool) => $body,
            $crate::db::Db::MySql($pool) => $body,
        }
    };
}

/// Errors opening the database.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The URL's scheme is not one of `sqlite:`, `postgres:`/`postgresql:`, `mysql:`/`mariadb:`.
    #[error("unsupported database URL {0:?}: use sqlite://…, postgres://… or mysql://… (MariaDB)")]
    UnsupportedUrl(String),
    /// The table prefix is not a short plain identifier.
    #[error(
        "invalid table prefix {0:?}: 0..={TABLE_PREFIX_BYTES_MAX} ASCII letters, digits or '_'"
    )]
    InvalidPrefix(String),
    /// The driver refused the URL or the connection.
    #[error("cannot connect to the database: {0}")]
    Sql(#[from] sqlx::Error),
}

/// The database plus the prefix of the clinic's table names.
#[derive(Clone, Debug)]
pub struct Store {
    /// The pool.
    pub db: Db,
    prefix: String,
}

impl Store {
    /// Open `url` with at most `max_connections` pooled connections and tables named
    /// `{prefix}doctors`, `{prefix}patients`, ….
    ///
    /// # Errors
    /// [`ConnectError`].
    pub async fn connect(
        url: &str,
        prefix: &str,
        max_connections: u32,
    ) -> Result<Self, ConnectError> {
        let db = if url.starts_with("sqlite:") {
            let options = SqliteConnectOptions::from_str(url)?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .busy_timeout(SQLITE_BUSY_TIMEOUT);
            Db::Sqlite(
                SqlitePoolOptions::new()
                    .max_connections(max_connections)
                    .acquire_timeout(POOL_ACQUIRE_TIMEOUT)
                    .connect_with(options)
                    .await?,
            )
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            let options = PgConnectOptions::from_str(url)?;
            Db::Postgres(
                PgPoolOptions::new()
                    .max_connections(max_connections)
                    .acquire_timeout(POOL_ACQUIRE_TIMEOUT)
                    .connect_with(options)
                    .await?,
            )
        } else if url.starts_with("mysql:") || url.starts_with("mariadb:") {
            let url = url
                .strip_prefix("mariadb:")
                .map_or_else(|| url.to_owned(), |rest| format!("mysql:{rest}"));
            let options = MySqlConnectOptions::from_str(&url)?;
            Db::MySql(
                MySqlPoolOptions::new()
                    .max_connections(max_connections)
                    .acquire_timeout(POOL_ACQUIRE_TIMEOUT)
                    .connect_with(options)
                    .await?,
            )
        } else {
            return Err(ConnectError::UnsupportedUrl(url.to_owned()));
        };
        Self::new(db, prefix)
    }

    /// Wrap an open pool.
    ///
    /// # Errors
    /// [`ConnectError::InvalidPrefix`].
    pub fn new(db: Db, prefix: &str) -> Result<Self, ConnectError> {
        let plain = prefix.len() <= TABLE_PREFIX_BYTES_MAX
            && prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !plain {
            return Err(ConnectError::InvalidPrefix(prefix.to_owned()));
        }
        Ok(Self {
            db,
            prefix: prefix.to_owned(),
        })
    }

    /// The SQL dialect of the configured database.
    #[must_use]
    pub fn dialect(&self) -> Dialect {
        match self.db {
            Db::Sqlite(_) => Dialect::Sqlite,
            Db::Postgres(_) => Dialect::Postgres,
            Db::MySql(_) => Dialect::MySql,
        }
    }

    /// The table prefix.
    #[must_use]
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// A table's full name.
    #[must_use]
    pub fn table(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// Turn a template into this database's SQL: `{p}` becomes the table prefix, `{for_update}`
    /// becomes ` FOR UPDATE` (nothing on SQLite, which has no row locks), and on PostgreSQL the
    /// `?` placeholders are numbered. Templates are constants of this crate; the prefix is a
    /// checked identifier, so the result is safe to execute.
    #[must_use]
    pub fn sql(&self, template: &str) -> AssertSqlSafe<String> {
        let for_update = if self.dialect() == Dialect::Sqlite {
            ""
        } else {
            " FOR UPDATE"
        };
        let text = template
            .replace("{p}", &self.prefix)
            .replace("{for_update}", for_update);
        AssertSqlSafe(number_placeholders(self.dialect(), &text))
    }

    /// Transaction options of every protected operation: READ COMMITTED (each statement sees the
    /// latest committed rows once its locks are granted; InnoDB's default REPEATABLE READ would
    /// read an older snapshot), `BEGIN IMMEDIATE` on SQLite (writers queue at the start instead of
    /// failing at their first write), bounded retries of deadlocks and lock refusals, and a
    /// per-attempt timeout.
    #[must_use]
    pub fn tx_options(&self, retry: holdfast_sql::retry::RetryPolicy) -> TxOptions {
        TxOptions::default()
            .isolation(IsolationLevel::ReadCommitted)
            .sqlite_immediate()
            .retry(retry)
            .timeout(Duration::from_secs(30))
    }

    /// Close the pool.
    pub async fn close(&self) {
        on_db!(&self.db, pool => pool.close().await);
    }
}

fn number_placeholders(dialect: Dialect, sql: &str) -> String {
    if dialect != Dialect::Postgres {
        return sql.to_owned();
    }
    let mut out = String::with_capacity(sql.len() + 16);
    let mut n = 0u32;
    for c in sql.chars() {
        if c == '?' {
            n += 1;
            out.push('$');
            out.push_str(&n.to_string());
        } else {
            out.push(c);
        }
    }
    out
}

/// Row locking on each database's connection type, so code expanded by [`on_db!`] can lock rows
/// without knowing which database it runs on.
pub trait RowLocking: Send {
    /// Lock the rows of `spec`'s table with these keys, in ascending key order (holdfast-sql's
    /// deterministic order, so two callers locking overlapping sets cannot deadlock). On SQLite
    /// this is a no-op: the transaction began with `BEGIN IMMEDIATE` and already holds the
    /// database's single write lock.
    fn lock_rows<'a>(
        &'a mut self,
        spec: &'a RowLock,
        keys: Vec<i64>,
    ) -> BoxFuture<'a, Result<LockedRows, SqlLockError>>;
}

impl RowLocking for PgConnection {
    fn lock_rows<'a>(
        &'a mut self,
        spec: &'a RowLock,
        keys: Vec<i64>,
    ) -> BoxFuture<'a, Result<LockedRows, SqlLockError>> {
        Box::pin(lock_rows_pg(self, spec, keys))
    }
}

impl RowLocking for MySqlConnection {
    fn lock_rows<'a>(
        &'a mut self,
        spec: &'a RowLock,
        keys: Vec<i64>,
    ) -> BoxFuture<'a, Result<LockedRows, SqlLockError>> {
        Box::pin(lock_rows_mysql(self, spec, keys))
    }
}

impl RowLocking for SqliteConnection {
    fn lock_rows<'a>(
        &'a mut self,
        _spec: &'a RowLock,
        keys: Vec<i64>,
    ) -> BoxFuture<'a, Result<LockedRows, SqlLockError>> {
        let mut locked: Vec<RowKey> = keys.into_iter().map(RowKey::from).collect();
        locked.sort();
        locked.dedup();
        Box::pin(async move {
            Ok(LockedRows {
                locked,
                not_locked: Vec::new(),
            })
        })
    }
}

/// The clinic's tables, in creation order. `{id}` is the dialect's auto-increment key.
const TABLES: &[(&str, &str)] = &[
    (
        "doctors",
        "id {id}, name VARCHAR(255) NOT NULL, active BIGINT NOT NULL DEFAULT 1",
    ),
    (
        "patients",
        "id {id}, name VARCHAR(255) NOT NULL, notes TEXT NOT NULL",
    ),
    (
        "appointments",
        "id {id}, doctor_id BIGINT NOT NULL, patient_id BIGINT NOT NULL, scheduled_at VARCHAR(64) NOT NULL, \
         kind VARCHAR(64) NOT NULL, reason VARCHAR(255) NULL, status VARCHAR(32) NOT NULL",
    ),
    (
        "appointment_events",
        "id {id}, appointment_id BIGINT NOT NULL, from_status VARCHAR(32) NOT NULL, to_status VARCHAR(32) NOT NULL, \
         actor_role VARCHAR(32) NOT NULL",
    ),
    (
        "prescriptions",
        "id {id}, appointment_id BIGINT NOT NULL, doctor_id BIGINT NOT NULL, medications TEXT NOT NULL",
    ),
    (
        "ratings",
        "id {id}, appointment_id BIGINT NOT NULL, patient_id BIGINT NOT NULL, score BIGINT NOT NULL, comment TEXT NULL",
    ),
    (
        "vocab_codes",
        "id {id}, code_type VARCHAR(32) NOT NULL, code VARCHAR(64) NOT NULL, description VARCHAR(255) NOT NULL, import_id BIGINT NOT NULL",
    ),
    (
        "vocab_imports",
        "id {id}, code_type VARCHAR(32) NOT NULL, row_count BIGINT NOT NULL, fencing_token BIGINT NOT NULL, holder VARCHAR(255) NOT NULL",
    ),
    (
        "assignments",
        "id {id}, block_date VARCHAR(32) NOT NULL, person VARCHAR(255) NOT NULL, fence BIGINT NOT NULL DEFAULT 0",
    ),
    (
        "swaps",
        "id {id}, source_id BIGINT NOT NULL, target_id BIGINT NOT NULL, source_person VARCHAR(255) NOT NULL, \
         target_person VARCHAR(255) NOT NULL, status VARCHAR(32) NOT NULL",
    ),
    (
        "swap_events",
        "id {id}, swap_id BIGINT NOT NULL, action VARCHAR(32) NOT NULL",
    ),
    (
        "products",
        "id {id}, sku VARCHAR(64) NOT NULL, name VARCHAR(255) NOT NULL",
    ),
    (
        "layers",
        "id {id}, product_id BIGINT NOT NULL, qty BIGINT NOT NULL, remaining BIGINT NOT NULL, unit_cost BIGINT NOT NULL",
    ),
    (
        "sales",
        "id {id}, product_id BIGINT NOT NULL, qty BIGINT NOT NULL, total_cost BIGINT NOT NULL",
    ),
    (
        "sale_lines",
        "id {id}, sale_id BIGINT NOT NULL, layer_id BIGINT NOT NULL, qty BIGINT NOT NULL, unit_cost BIGINT NOT NULL",
    ),
];

/// Secondary indexes (`CREATE INDEX IF NOT EXISTS`: PostgreSQL, SQLite, MariaDB).
const INDEXES: &[(&str, &str, &str)] = &[
    ("appointments", "slot", "doctor_id, scheduled_at"),
    ("appointment_events", "appointment", "appointment_id"),
    ("prescriptions", "appointment", "appointment_id"),
    ("ratings", "appointment", "appointment_id"),
    ("vocab_codes", "type", "code_type"),
    ("swap_events", "swap", "swap_id"),
    ("layers", "product", "product_id, id"),
];

/// The name of the offline-lock table (holdfast-sql's, with the clinic's prefix).
#[must_use]
pub fn offline_lock_table(store: &Store) -> String {
    store.table("offline_locks")
}

/// Create the tables (idempotent).
///
/// # Errors
/// A database error.
pub async fn migrate(store: &Store) -> Result<(), SqlLockError> {
    let id = match store.dialect() {
        Dialect::Postgres => "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
        Dialect::MySql => "BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY",
        Dialect::Sqlite => "INTEGER PRIMARY KEY AUTOINCREMENT",
    };
    let mut statements = Vec::new();
    for (name, columns) in TABLES {
        let engine = if store.dialect() == Dialect::MySql {
            " ENGINE=InnoDB"
        } else {
            ""
        };
        statements.push(format!(
            "CREATE TABLE IF NOT EXISTS {{p}}{name} ({}){engine}",
            columns.replace("{id}", id)
        ));
    }
    for (table, suffix, columns) in INDEXES {
        statements.push(format!(
            "CREATE INDEX IF NOT EXISTS {{p}}{table}_{suffix} ON {{p}}{table} ({columns})"
        ));
    }
    for statement in &statements {
        let sql = store.sql(statement);
        on_db!(&store.db, pool => sqlx::query(sql).execute(pool).await.map(|_| ()))?;
    }
    let table = offline_lock_table(store);
    on_db!(&store.db, pool => holdfast_sql::offline::OfflineLocks::new(pool.clone()).with_table(&table)?.migrate().await)?;
    Ok(())
}

/// Drop every table of this prefix (tests clean up after themselves with this).
///
/// # Errors
/// A database error.
pub async fn drop_tables(store: &Store) -> Result<(), SqlLockError> {
    let mut names: Vec<String> = TABLES.iter().map(|(name, _)| store.table(name)).collect();
    names.push(offline_lock_table(store));
    for name in names {
        let sql = AssertSqlSafe(format!("DROP TABLE IF EXISTS {name}"));
        on_db!(&store.db, pool => sqlx::query(sql).execute(pool).await.map(|_| ()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_numbered_on_postgres_only() {
        assert_eq!(
            number_placeholders(Dialect::Postgres, "a = ? AND b = ?"),
            "a = $1 AND b = $2"
        );
        assert_eq!(number_placeholders(Dialect::MySql, "a = ?"), "a = ?");
        assert_eq!(number_placeholders(Dialect::Sqlite, "a = ?"), "a = ?");
    }
}
