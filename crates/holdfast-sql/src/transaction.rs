//! `transaction`: run a closure in a transaction at a chosen isolation level, retrying the whole
//! closure on deadlocks and serialization failures (and, by default, lock refusals), with
//! exponential backoff and full jitter, bounded attempts and total time, a timeout, savepoints,
//! rollback on every error path and on panic, and metrics.
//!
//! ```no_run
//! # async fn demo(pool: sqlx::PgPool) -> Result<(), holdfast_sql::SqlLockError> {
//! use holdfast_sql::transaction::{transaction, TxOptions, IsolationLevel};
//! let opts = TxOptions::default().isolation(IsolationLevel::Serializable);
//! let n: i64 = transaction(&pool, &opts, |conn| Box::pin(async move {
//!     let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM stock").fetch_one(&mut *conn).await?;
//!     Ok::<_, holdfast_sql::SqlLockError>(n)
//! })).await?;
//! # Ok(()) }
//! ```

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use serde::Serialize;
use sqlx::{
    AssertSqlSafe, Connection, Database, Executor, MySql, Pool, Postgres, Sqlite, Transaction,
};

use crate::classify::{Classify, Conflict, classify_sqlx};
use crate::error::SqlLockError;
use crate::retry::{RetryPolicy, Sleeper, make_rng, tokio_sleeper};

/// Transaction isolation level.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IsolationLevel {
    /// READ UNCOMMITTED.
    ReadUncommitted,
    /// READ COMMITTED.
    ReadCommitted,
    /// REPEATABLE READ.
    RepeatableRead,
    /// SERIALIZABLE.
    Serializable,
}

impl IsolationLevel {
    /// The SQL words.
    #[must_use]
    pub fn as_sql(self) -> &'static str {
        match self {
            Self::ReadUncommitted => "READ UNCOMMITTED",
            Self::ReadCommitted => "READ COMMITTED",
            Self::RepeatableRead => "REPEATABLE READ",
            Self::Serializable => "SERIALIZABLE",
        }
    }
}

/// How [`transaction`] runs.
#[derive(Clone, Debug)]
pub struct TxOptions {
    /// Isolation level; `None` is the database default (PostgreSQL READ COMMITTED, InnoDB
    /// REPEATABLE READ). Ignored on SQLite, whose transactions are always serializable.
    pub isolation: Option<IsolationLevel>,
    /// Start a read-only transaction (PostgreSQL, MySQL/MariaDB).
    pub read_only: bool,
    /// Retry policy for conflicts (default [`RetryPolicy::transaction_default`]).
    pub retry: RetryPolicy,
    /// Retry lock refusals (NOWAIT failures, lock wait timeouts) as well as deadlocks,
    /// serialization failures and SQLite busy (default true: seed 004's NOWAIT-and-retry).
    pub retry_lock_refusals: bool,
    /// Bound on one attempt (begin, body and commit); on expiry the attempt is rolled back and
    /// [`SqlLockError::Timeout`] returned (not retried). On PostgreSQL the same bound is also
    /// set as the transaction's `statement_timeout`, so the server gives up too.
    pub timeout: Option<Duration>,
    /// SQLite only: `BEGIN IMMEDIATE` (take the write lock at the start, so writers queue on the
    /// busy timeout instead of failing at their first write).
    pub sqlite_immediate: bool,
    /// Where counters and durations go.
    pub metrics: Option<Arc<TxMetrics>>,
    /// How the retry loop sleeps.
    pub sleeper: Arc<dyn Sleeper>,
    /// Seed of the jitter (tests); `None` seeds from the OS.
    pub rng_seed: Option<u64>,
}

impl Default for TxOptions {
    fn default() -> Self {
        Self {
            isolation: None,
            read_only: false,
            retry: RetryPolicy::transaction_default(),
            retry_lock_refusals: true,
            timeout: None,
            sqlite_immediate: false,
            metrics: None,
            sleeper: tokio_sleeper(),
            rng_seed: None,
        }
    }
}

impl TxOptions {
    /// Builder: isolation level.
    #[must_use]
    pub fn isolation(mut self, level: IsolationLevel) -> Self {
        self.isolation = Some(level);
        self
    }
    /// Builder: retry policy ([`RetryPolicy::no_wait`] disables retrying).
    #[must_use]
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }
    /// Builder: per-attempt timeout.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }
    /// Builder: metrics sink.
    #[must_use]
    pub fn metrics(mut self, metrics: Arc<TxMetrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }
    /// Builder: read-only transaction.
    #[must_use]
    pub fn read_only(mut self) -> Self {
        self.read_only = true;
        self
    }
    /// Builder: SQLite `BEGIN IMMEDIATE`.
    #[must_use]
    pub fn sqlite_immediate(mut self) -> Self {
        self.sqlite_immediate = true;
        self
    }
    /// Builder: whether lock refusals are retried.
    #[must_use]
    pub fn retry_lock_refusals(mut self, yes: bool) -> Self {
        self.retry_lock_refusals = yes;
        self
    }
    /// Builder: sleeper.
    #[must_use]
    pub fn sleeper(mut self, sleeper: Arc<dyn Sleeper>) -> Self {
        self.sleeper = sleeper;
        self
    }

    fn retries(&self, conflict: Conflict) -> bool {
        !conflict.is_lock_refusal() || self.retry_lock_refusals
    }
}

/// Counters and durations of transactions, shared between calls (put one `Arc` in every
/// [`TxOptions`] you want counted, and export [`TxMetrics::snapshot`] to your metrics system).
#[derive(Debug, Default)]
pub struct TxMetrics {
    transactions: AtomicU64,
    committed: AtomicU64,
    failed: AtomicU64,
    attempts: AtomicU64,
    retries: AtomicU64,
    deadlocks: AtomicU64,
    serialization_failures: AtomicU64,
    lock_timeouts: AtomicU64,
    lock_not_available: AtomicU64,
    busy: AtomicU64,
    timeouts: AtomicU64,
    panics: AtomicU64,
    total_micros: AtomicU64,
    max_micros: AtomicU64,
}

/// A point-in-time copy of [`TxMetrics`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TxMetricsSnapshot {
    /// Calls of [`transaction`].
    pub transactions: u64,
    /// Calls that committed.
    pub committed: u64,
    /// Calls that returned an error (or panicked).
    pub failed: u64,
    /// Attempts (a call with two retries counts three).
    pub attempts: u64,
    /// Retries (attempts after the first).
    pub retries: u64,
    /// Deadlocks seen.
    pub deadlocks: u64,
    /// Serialization failures seen.
    pub serialization_failures: u64,
    /// Lock wait timeouts seen.
    pub lock_timeouts: u64,
    /// NOWAIT refusals seen.
    pub lock_not_available: u64,
    /// SQLite busy/locked seen.
    pub busy: u64,
    /// Attempts that ran out of time.
    pub timeouts: u64,
    /// Closures that panicked.
    pub panics: u64,
    /// Sum of call durations, microseconds.
    pub total_micros: u64,
    /// Longest call, microseconds.
    pub max_micros: u64,
}

impl TxMetrics {
    /// A fresh, shareable set of counters.
    #[must_use]
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Copy the counters.
    #[must_use]
    pub fn snapshot(&self) -> TxMetricsSnapshot {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        TxMetricsSnapshot {
            transactions: l(&self.transactions),
            committed: l(&self.committed),
            failed: l(&self.failed),
            attempts: l(&self.attempts),
            retries: l(&self.retries),
            deadlocks: l(&self.deadlocks),
            serialization_failures: l(&self.serialization_failures),
            lock_timeouts: l(&self.lock_timeouts),
            lock_not_available: l(&self.lock_not_available),
            busy: l(&self.busy),
            timeouts: l(&self.timeouts),
            panics: l(&self.panics),
            total_micros: l(&self.total_micros),
            max_micros: l(&self.max_micros),
        }
    }

    fn record(&self, report: &TxReport) {
        let add = |a: &AtomicU64, n: u64| a.fetch_add(n, Ordering::Relaxed);
        add(&self.transactions, 1);
        add(
            if report.committed {
                &self.committed
            } else {
                &self.failed
            },
            1,
        );
        add(&self.attempts, u64::from(report.attempts));
        add(&self.retries, u64::from(report.attempts.saturating_sub(1)));
        for c in &report.conflicts {
            add(
                match c {
                    Conflict::Deadlock => &self.deadlocks,
                    Conflict::Serialization => &self.serialization_failures,
                    Conflict::LockTimeout => &self.lock_timeouts,
                    Conflict::LockNotAvailable => &self.lock_not_available,
                    Conflict::Busy => &self.busy,
                },
                1,
            );
        }
        if report.timed_out {
            add(&self.timeouts, 1);
        }
        if report.panicked {
            add(&self.panics, 1);
        }
        let micros = u64::try_from(report.duration.as_micros()).unwrap_or(u64::MAX);
        add(&self.total_micros, micros);
        self.max_micros.fetch_max(micros, Ordering::Relaxed);
    }
}

/// What one call of [`transaction_with_report`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TxReport {
    /// Attempts made.
    pub attempts: u32,
    /// The conflict of every failed attempt, in order.
    pub conflicts: Vec<Conflict>,
    /// True if the last attempt committed.
    pub committed: bool,
    /// True if an attempt timed out.
    pub timed_out: bool,
    /// True if the closure panicked (the panic is resumed after the rollback).
    pub panicked: bool,
    /// Wall time of the whole call.
    pub duration: Duration,
}

/// A database [`transaction`] can run on: how to begin at an isolation level.
pub trait TxBackend: Database {
    /// Begin a transaction on `conn` as `opts` says.
    fn begin_tx<'c>(
        conn: &'c mut <Self as Database>::Connection,
        opts: &TxOptions,
    ) -> BoxFuture<'c, Result<Transaction<'c, Self>, sqlx::Error>>;
}

impl TxBackend for Postgres {
    fn begin_tx<'c>(
        conn: &'c mut sqlx::PgConnection,
        opts: &TxOptions,
    ) -> BoxFuture<'c, Result<Transaction<'c, Self>, sqlx::Error>> {
        let mut begin = "BEGIN".to_owned();
        if let Some(level) = opts.isolation {
            begin.push_str(" ISOLATION LEVEL ");
            begin.push_str(level.as_sql());
        }
        if opts.read_only {
            begin.push_str(" READ ONLY");
        }
        let timeout = opts.timeout;
        Box::pin(async move {
            let mut tx = conn.begin_with(AssertSqlSafe(begin)).await?;
            if let Some(t) = timeout {
                let ms = t.as_millis().max(1).to_string();
                sqlx::query("SELECT set_config('statement_timeout', $1, true)")
                    .bind(ms)
                    .execute(&mut *tx)
                    .await?;
            }
            Ok(tx)
        })
    }
}

impl TxBackend for MySql {
    fn begin_tx<'c>(
        conn: &'c mut sqlx::MySqlConnection,
        opts: &TxOptions,
    ) -> BoxFuture<'c, Result<Transaction<'c, Self>, sqlx::Error>> {
        let isolation = opts.isolation;
        let read_only = opts.read_only;
        Box::pin(async move {
            if let Some(level) = isolation {
                // Applies to the next transaction of this session only.
                conn.execute(AssertSqlSafe(format!(
                    "SET TRANSACTION ISOLATION LEVEL {}",
                    level.as_sql()
                )))
                .await?;
            }
            if read_only {
                conn.begin_with("START TRANSACTION READ ONLY").await
            } else {
                conn.begin().await
            }
        })
    }
}

impl TxBackend for Sqlite {
    fn begin_tx<'c>(
        conn: &'c mut sqlx::SqliteConnection,
        opts: &TxOptions,
    ) -> BoxFuture<'c, Result<Transaction<'c, Self>, sqlx::Error>> {
        let immediate = opts.sqlite_immediate;
        Box::pin(async move {
            if immediate {
                conn.begin_with("BEGIN IMMEDIATE").await
            } else {
                conn.begin().await
            }
        })
    }
}

/// Run `body` in a transaction of a connection from `pool`, commit if it returns `Ok`, roll back
/// if it returns `Err` or panics, and retry the whole body (in a fresh transaction) when the
/// failure is a conflict ([`Classify`]) the options retry. The body must therefore be safe to run
/// more than once: keep side effects outside the database out of it.
///
/// # Errors
/// The body's error (the last one, if retries ran out), a begin/commit error converted through
/// [`SqlLockError`], or [`SqlLockError::Timeout`].
pub async fn transaction<DB, T, E, F>(pool: &Pool<DB>, opts: &TxOptions, body: F) -> Result<T, E>
where
    DB: TxBackend,
    T: Send,
    E: From<SqlLockError> + Classify + Send,
    F: for<'c> FnMut(&'c mut <DB as Database>::Connection) -> BoxFuture<'c, Result<T, E>> + Send,
{
    transaction_with_report(pool, opts, body).await.0
}

/// [`transaction`], also returning what happened (attempts, conflicts, duration).
pub async fn transaction_with_report<DB, T, E, F>(
    pool: &Pool<DB>,
    opts: &TxOptions,
    mut body: F,
) -> (Result<T, E>, TxReport)
where
    DB: TxBackend,
    T: Send,
    E: From<SqlLockError> + Classify + Send,
    F: for<'c> FnMut(&'c mut <DB as Database>::Connection) -> BoxFuture<'c, Result<T, E>> + Send,
{
    let start = tokio::time::Instant::now();
    let mut report = TxReport::default();
    let mut rng = make_rng(opts.rng_seed);
    let attempts = opts.retry.effective_attempts();
    let mut n = 0u32;
    let result = loop {
        n += 1;
        report.attempts = n;
        let error = match attempt(pool, opts, &mut body).await {
            Ok(v) => break Ok(v),
            Err(Failure::Timeout(t)) => {
                report.timed_out = true;
                break Err(E::from(SqlLockError::Timeout(t)));
            }
            Err(Failure::Panic(payload)) => {
                report.panicked = true;
                finish(opts, &mut report, start, false);
                std::panic::resume_unwind(payload);
            }
            Err(Failure::Error(e)) => e,
        };
        let Some(conflict) = error.conflict() else {
            break Err(error);
        };
        report.conflicts.push(conflict);
        if !opts.retries(conflict) {
            break Err(error);
        }
        let elapsed = start.elapsed();
        if n >= attempts {
            tracing::warn!(
                attempts = n,
                ?elapsed,
                conflict = conflict.as_str(),
                "transaction gave up: attempts exhausted"
            );
            break Err(error);
        }
        let delay = opts.retry.delay(n - 1, &mut rng);
        if opts
            .retry
            .max_total
            .is_some_and(|max| elapsed + delay > max)
        {
            tracing::warn!(
                attempts = n,
                ?elapsed,
                conflict = conflict.as_str(),
                "transaction gave up: total time exhausted"
            );
            break Err(error);
        }
        tracing::debug!(
            attempt = n,
            attempts,
            ?delay,
            conflict = conflict.as_str(),
            "transaction conflict; retrying"
        );
        opts.sleeper.sleep(delay).await;
    };
    finish(opts, &mut report, start, result.is_ok());
    (result, report)
}

fn finish(opts: &TxOptions, report: &mut TxReport, start: tokio::time::Instant, committed: bool) {
    report.duration = start.elapsed();
    report.committed = committed;
    if let Some(m) = &opts.metrics {
        m.record(report);
    }
}

enum Failure<E> {
    Error(E),
    Timeout(Duration),
    Panic(Box<dyn std::any::Any + Send>),
}

async fn attempt<DB, T, E, F>(
    pool: &Pool<DB>,
    opts: &TxOptions,
    body: &mut F,
) -> Result<T, Failure<E>>
where
    DB: TxBackend,
    E: From<SqlLockError> + Classify,
    F: for<'c> FnMut(&'c mut <DB as Database>::Connection) -> BoxFuture<'c, Result<T, E>>,
{
    let mut conn = pool
        .acquire()
        .await
        .map_err(|e| Failure::Error(E::from(SqlLockError::Sql(e))))?;
    let (result, discard) = attempt_on::<DB, T, E, F>(&mut conn, opts, body).await;
    if discard {
        // Never return a session in an unknown state to the pool; closing it also makes the
        // server abort whatever transaction it still has.
        conn.close_on_drop();
    }
    result
}

/// One attempt on `conn`; the flag says the connection must not be reused.
async fn attempt_on<DB, T, E, F>(
    conn: &mut <DB as Database>::Connection,
    opts: &TxOptions,
    body: &mut F,
) -> (Result<T, Failure<E>>, bool)
where
    DB: TxBackend,
    E: From<SqlLockError> + Classify,
    F: for<'c> FnMut(&'c mut <DB as Database>::Connection) -> BoxFuture<'c, Result<T, E>>,
{
    let sql = |e: sqlx::Error| Failure::Error(E::from(SqlLockError::Sql(e)));
    let timed_out = || Failure::Timeout(opts.timeout.unwrap_or_default());
    // The timeout covers begin, body and commit of this attempt.
    let deadline = opts.timeout.map(|t| tokio::time::Instant::now() + t);
    let begin = DB::begin_tx(conn, opts);
    let begun = match deadline {
        Some(d) => tokio::time::timeout_at(d, begin).await.ok(),
        None => Some(begin.await),
    };
    let mut tx = match begun {
        None => return (Err(timed_out()), true),
        Some(Err(e)) => return (Err(sql(e)), false),
        Some(Ok(tx)) => tx,
    };
    let run = AssertUnwindSafe(async {
        let fut = body(&mut tx);
        match deadline {
            Some(d) => tokio::time::timeout_at(d, fut).await.ok(),
            None => Some(fut.await),
        }
    })
    .catch_unwind();
    let result = match run.await {
        Err(payload) => {
            let ok = rolled_back(tx).await;
            return (Err(Failure::Panic(payload)), !ok);
        }
        Ok(None) => {
            // The statement in flight may still be waiting inside the server: bound the
            // rollback (it releases the locks at once when it works) and never reuse the
            // session, whose state (session variables set half-way) is unknown.
            let _ = tokio::time::timeout(Duration::from_secs(1), rolled_back(tx)).await;
            return (Err(timed_out()), true);
        }
        Ok(Some(r)) => r,
    };
    match result {
        Ok(v) => {
            let commit = tx.commit();
            let committed = match deadline {
                Some(d) => tokio::time::timeout_at(d, commit).await.ok(),
                None => Some(commit.await),
            };
            match committed {
                Some(Ok(())) => (Ok(v), false),
                Some(Err(e)) => {
                    let discard = classify_sqlx(&e).is_none();
                    (Err(sql(e)), discard)
                }
                // Unknown whether the commit happened: never reuse this session.
                None => (Err(timed_out()), true),
            }
        }
        Err(e) => {
            let ok = rolled_back(tx).await;
            if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
                // Failed after the deadline (e.g. PostgreSQL's statement_timeout, 57014): that
                // is the transaction timeout.
                return (Err(timed_out()), true);
            }
            (Err(Failure::Error(e)), !ok)
        }
    }
}

/// Roll back; false (after logging) if that failed.
async fn rolled_back<DB: Database>(tx: Transaction<'_, DB>) -> bool {
    match tx.rollback().await {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(error = %e, "rollback failed; the connection is closed and the server aborts the transaction");
            false
        }
    }
}

/// Run `body` inside a savepoint of the transaction `conn` is in: release it if `body` returns
/// `Ok`, roll back to it if `body` returns `Err` or panics (the outer transaction goes on).
/// Savepoints nest.
///
/// # Errors
/// `body`'s error, or a savepoint statement's error.
pub async fn savepoint<DB, T, E, F>(
    conn: &mut <DB as Database>::Connection,
    body: F,
) -> Result<T, E>
where
    DB: Database,
    E: From<SqlLockError>,
    F: for<'c> FnOnce(&'c mut <DB as Database>::Connection) -> BoxFuture<'c, Result<T, E>>,
{
    let mut sp = Connection::begin(conn)
        .await
        .map_err(|e| E::from(SqlLockError::Sql(e)))?;
    let outcome = AssertUnwindSafe(body(&mut sp)).catch_unwind().await;
    match outcome {
        Ok(Ok(v)) => {
            sp.commit()
                .await
                .map_err(|e| E::from(SqlLockError::Sql(e)))?;
            Ok(v)
        }
        Ok(Err(e)) => {
            sp.rollback()
                .await
                .map_err(|e| E::from(SqlLockError::Sql(e)))?;
            Err(e)
        }
        Err(payload) => {
            rolled_back(sp).await;
            std::panic::resume_unwind(payload)
        }
    }
}
