//! Shared test helpers: database pools (skip or fail when unreachable), unique names, SQL text.

#![allow(dead_code)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use holdfast_sql::retry::{SleepFuture, Sleeper};
use holdfast_sql::sql::{Dialect, numbered};
use holdfast_sql::{Classify, Conflict, SqlLockError};
use sqlx::AssertSqlSafe;
use sqlx::mysql::{MySqlPool, MySqlPoolOptions};
use sqlx::postgres::{PgPool, PgPoolOptions};

/// Default of `HOLDFAST_TEST_POSTGRES_URL`.
pub const PG_DEFAULT: &str = "postgres://postgres@127.0.0.1:5432/test";
/// Default of `HOLDFAST_TEST_MYSQL_URL`.
pub const MYSQL_DEFAULT: &str = "mysql://root@127.0.0.1:3306/test";

/// Under `CI=true` a missing database fails the test; elsewhere it is skipped with a message.
pub fn unavailable(test: &str, what: &str, url: &str, error: &dyn std::fmt::Display) {
    let ci = std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1");
    let msg = format!("{what} at {url} is unreachable: {error}");
    assert!(
        !ci,
        "{test}: {msg} (CI=true: a missing database is a failure)"
    );
    eprintln!("skipped: {test}: {msg}");
}

fn url(var: &str, default: &str) -> String {
    std::env::var(var)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_owned())
}

/// Probe `url` with one connection (at most 10 s), so an unreachable server is reported at once
/// instead of after the pool's acquire timeout.
async fn probe<C: sqlx::Connection>(url: &str) -> Result<(), String> {
    match tokio::time::timeout(Duration::from_secs(10), C::connect(url)).await {
        Ok(Ok(conn)) => {
            let _ = conn.close().await;
            Ok(())
        }
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer within 10 s".to_owned()),
    }
}

/// At most this many database tests run at once in this binary, whatever the number of test
/// threads, so the servers' connection limits (PostgreSQL's default 100) are never reached.
static DB_SLOTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(4);

/// A slot among [`DB_SLOTS`], held for the duration of a test.
pub type Slot = tokio::sync::SemaphorePermit<'static>;

async fn slot() -> Slot {
    DB_SLOTS
        .acquire()
        .await
        .expect("the semaphore is never closed")
}

/// A PostgreSQL pool of `max` connections and a test slot, or `None` (after skipping) if
/// unreachable.
pub async fn pg(test: &str, max: u32) -> Option<(PgPool, Slot)> {
    let slot = slot().await;
    let url = url("HOLDFAST_TEST_POSTGRES_URL", PG_DEFAULT);
    let connected = match probe::<sqlx::PgConnection>(&url).await {
        Ok(()) => PgPoolOptions::new()
            .max_connections(max)
            .acquire_timeout(Duration::from_secs(60))
            .connect(&url)
            .await
            .map_err(|e| e.to_string()),
        Err(e) => Err(e),
    };
    match connected {
        Ok(p) => Some((p, slot)),
        Err(e) => {
            unavailable(&format!("postgres::{test}"), "PostgreSQL", &url, &e);
            None
        }
    }
}

/// A MySQL/MariaDB pool of `max` connections and a test slot, or `None` (after skipping) if
/// unreachable.
pub async fn mysql(test: &str, max: u32) -> Option<(MySqlPool, Slot)> {
    let slot = slot().await;
    let url = url("HOLDFAST_TEST_MYSQL_URL", MYSQL_DEFAULT);
    let connected = match probe::<sqlx::MySqlConnection>(&url).await {
        Ok(()) => MySqlPoolOptions::new()
            .max_connections(max)
            .acquire_timeout(Duration::from_secs(60))
            .connect(&url)
            .await
            .map_err(|e| e.to_string()),
        Err(e) => Err(e),
    };
    match connected {
        Ok(p) => Some((p, slot)),
        Err(e) => {
            unavailable(&format!("mysql::{test}"), "MySQL/MariaDB", &url, &e);
            None
        }
    }
}

/// `prefix` plus a random suffix: a table name no other test (or rerun) uses.
pub fn unique(prefix: &str) -> String {
    let r: u32 = rand::random();
    format!("hfsql_{prefix}_{r:08x}")
}

/// SQL text with `?` placeholders, numbered for PostgreSQL.
pub fn q(dialect: Dialect, sql: &str) -> AssertSqlSafe<String> {
    AssertSqlSafe(numbered(dialect, sql))
}

/// The error type of the scenario closures: business refusals plus the crate's errors.
#[derive(Debug)]
pub enum AppErr {
    /// Not enough stock.
    Shortage,
    /// The slot is taken.
    Booked,
    /// A locking or database error.
    Db(SqlLockError),
}

impl From<SqlLockError> for AppErr {
    fn from(e: SqlLockError) -> Self {
        Self::Db(e)
    }
}

impl From<sqlx::Error> for AppErr {
    fn from(e: sqlx::Error) -> Self {
        Self::Db(SqlLockError::Sql(e))
    }
}

impl Classify for AppErr {
    fn conflict(&self) -> Option<Conflict> {
        match self {
            Self::Db(e) => e.conflict(),
            _ => None,
        }
    }
}

/// Records sleeps and returns at once (retry delays checked without wall time).
#[derive(Debug, Default, Clone)]
pub struct RecordingSleeper(pub Arc<Mutex<Vec<Duration>>>);

impl Sleeper for RecordingSleeper {
    fn sleep(&self, duration: Duration) -> SleepFuture {
        self.0.lock().unwrap().push(duration);
        Box::pin(tokio::time::sleep(Duration::from_millis(1)))
    }
}

impl RecordingSleeper {
    /// The recorded sleeps.
    pub fn sleeps(&self) -> Vec<Duration> {
        self.0.lock().unwrap().clone()
    }
}

/// Unwraps a pool or returns from the test (skipped).
#[macro_export]
macro_rules! require {
    ($e:expr) => {
        match $e.await {
            Some(p) => p,
            None => return,
        }
    };
}

/// Tells `notify` at every sleep (so a test can release a lock exactly when the retry loop
/// backs off), then sleeps briefly.
#[derive(Debug)]
pub struct SignalSleeper(pub Arc<tokio::sync::Notify>);

impl Sleeper for SignalSleeper {
    fn sleep(&self, _d: Duration) -> SleepFuture {
        self.0.notify_one();
        Box::pin(tokio::time::sleep(Duration::from_millis(5)))
    }
}

/// Drops the named tables if the test panics before its own cleanup (on a fresh connection in a
/// helper thread, since the test's runtime is unwinding), so failed runs leave nothing behind.
pub struct Cleanup {
    dialect: Dialect,
    tables: Vec<String>,
}

/// A [`Cleanup`] for `tables` of the database of `dialect`.
pub fn cleanup(dialect: Dialect, tables: &[&str]) -> Cleanup {
    Cleanup {
        dialect,
        tables: tables.iter().map(|t| (*t).to_owned()).collect(),
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let (dialect, tables) = (self.dialect, std::mem::take(&mut self.tables));
        let worker = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                use sqlx::Connection;
                let drop_all = |tables: Vec<String>| {
                    tables
                        .into_iter()
                        .map(|t| format!("DROP TABLE IF EXISTS {t}"))
                };
                match dialect {
                    Dialect::Postgres => {
                        if let Ok(mut c) = sqlx::PgConnection::connect(&url(
                            "HOLDFAST_TEST_POSTGRES_URL",
                            PG_DEFAULT,
                        ))
                        .await
                        {
                            for stmt in drop_all(tables) {
                                let _ = sqlx::raw_sql(AssertSqlSafe(stmt)).execute(&mut c).await;
                            }
                        }
                    }
                    Dialect::MySql => {
                        if let Ok(mut c) = sqlx::MySqlConnection::connect(&url(
                            "HOLDFAST_TEST_MYSQL_URL",
                            MYSQL_DEFAULT,
                        ))
                        .await
                        {
                            for stmt in drop_all(tables) {
                                let _ = sqlx::raw_sql(AssertSqlSafe(stmt)).execute(&mut c).await;
                            }
                        }
                    }
                    Dialect::Sqlite => {}
                }
            });
        });
        let _ = worker.join();
    }
}
