//! SQLite: what the database allows (transactions with busy retry, savepoints, optimistic
//! updates, offline locks, idempotency) and what it does not (row locks, advisory locks).

use std::sync::Arc;
use std::time::Duration;

use holdfast_sql::idempotency::{Begin, Idempotency};
use holdfast_sql::offline::OfflineLocks;
use holdfast_sql::optimistic::{SqlValue, Versioned, update_versioned_sqlite};
use holdfast_sql::retry::{Jitter, RetryPolicy};
use holdfast_sql::rows::{RowLock, lock_rows_sqlite};
use holdfast_sql::transaction::{TxMetrics, TxOptions, transaction, transaction_with_report};
use holdfast_sql::{Classify, Conflict, SqlLockError, savepoint};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions};
use tokio::sync::Notify;

use crate::common::SignalSleeper;

/// A database file under the temp directory, deleted on drop.
struct TempDb(std::path::PathBuf);

impl TempDb {
    fn new() -> Self {
        let r: u64 = rand::random();
        Self(std::env::temp_dir().join(format!(
            "holdfast-sql-test-{}-{r:016x}.db",
            std::process::id()
        )))
    }
}

impl Drop for TempDb {
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm", "-journal"] {
            let mut p = self.0.clone().into_os_string();
            p.push(suffix);
            let _ = std::fs::remove_file(p);
        }
    }
}

async fn file_pool(db: &TempDb, busy: Duration, max: u32) -> SqlitePool {
    let opts = SqliteConnectOptions::new()
        .filename(&db.0)
        .create_if_missing(true)
        .busy_timeout(busy);
    SqlitePoolOptions::new()
        .max_connections(max)
        .connect_with(opts)
        .await
        .unwrap()
}

/// A writer blocked by another connection's write transaction gets SQLITE_BUSY (classified by
/// result code); the wrapper retries it once the other commits.
#[tokio::test]
async fn busy_is_classified_and_retried() {
    let dir = TempDb::new();
    let pool = file_pool(&dir, Duration::ZERO, 3).await;
    sqlx::query("CREATE TABLE t (id INTEGER PRIMARY KEY, v INTEGER NOT NULL)")
        .execute(&pool)
        .await
        .unwrap();

    let mut holder = pool.begin_with("BEGIN IMMEDIATE").await.unwrap();
    sqlx::query("INSERT INTO t (id, v) VALUES (1, 1)")
        .execute(&mut *holder)
        .await
        .unwrap();

    // Without retry: busy, typed.
    let no_retry = TxOptions::default()
        .sqlite_immediate()
        .retry(RetryPolicy::no_wait());
    let r: Result<(), SqlLockError> = transaction(&pool, &no_retry, |conn| {
        Box::pin(async move {
            sqlx::query("INSERT INTO t (id, v) VALUES (2, 2)")
                .execute(&mut *conn)
                .await?;
            Ok(())
        })
    })
    .await;
    assert_eq!(r.unwrap_err().conflict(), Some(Conflict::Busy));

    // With retry: the first sleep lets the holder commit.
    let notify = Arc::new(Notify::new());
    let n2 = notify.clone();
    let releaser = tokio::spawn(async move {
        n2.notified().await;
        holder.commit().await.unwrap();
    });
    let metrics = TxMetrics::new();
    let opts = TxOptions::default()
        .sqlite_immediate()
        .retry(RetryPolicy {
            jitter: Jitter::None,
            ..RetryPolicy::new(50, Duration::from_millis(1))
        })
        .sleeper(Arc::new(SignalSleeper(notify)))
        .metrics(metrics.clone());
    let (r, report) = transaction_with_report(&pool, &opts, |conn| {
        Box::pin(async move {
            sqlx::query("INSERT INTO t (id, v) VALUES (2, 2)")
                .execute(&mut *conn)
                .await?;
            Ok::<_, SqlLockError>(())
        })
    })
    .await;
    r.unwrap();
    releaser.await.unwrap();
    assert!(!report.conflicts.is_empty());
    assert!(
        report.conflicts.iter().all(|c| *c == Conflict::Busy),
        "{report:?}"
    );
    assert_eq!(
        metrics.snapshot().busy,
        u64::try_from(report.conflicts.len()).unwrap()
    );
    let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM t")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(n, 2);
}

#[tokio::test]
async fn savepoints_and_rollback() {
    let pool = SqlitePoolOptions::new()
        .max_connections(1)
        .connect("sqlite::memory:")
        .await
        .unwrap();
    sqlx::query("CREATE TABLE t (id INTEGER PRIMARY KEY)")
        .execute(&pool)
        .await
        .unwrap();
    let r: Result<(), SqlLockError> = transaction(&pool, &TxOptions::default(), |conn| {
        Box::pin(async move {
            sqlx::query("INSERT INTO t (id) VALUES (1)")
                .execute(&mut *conn)
                .await?;
            let inner: Result<(), SqlLockError> =
                savepoint::<sqlx::Sqlite, _, _, _>(&mut *conn, |c| {
                    Box::pin(async move {
                        sqlx::query("INSERT INTO t (id) VALUES (2)")
                            .execute(&mut *c)
                            .await?;
                        sqlx::query("INSERT INTO t (id) VALUES (1)")
                            .execute(&mut *c)
                            .await?; // duplicate
                        Ok(())
                    })
                })
                .await;
            assert!(inner.is_err());
            Ok(())
        })
    })
    .await;
    r.unwrap();
    let ids: Vec<(i64,)> = sqlx::query_as("SELECT id FROM t ORDER BY id")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(ids, vec![(1,)]);

    let r: Result<(), SqlLockError> = transaction(&pool, &TxOptions::default(), |conn| {
        Box::pin(async move {
            sqlx::query("INSERT INTO t (id) VALUES (5)")
                .execute(&mut *conn)
                .await?;
            Err(SqlLockError::InvalidArgument("business rule".into()))
        })
    })
    .await;
    assert!(r.is_err());
    let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM t")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(n, 1, "rolled back");
}

#[tokio::test]
async fn row_locks_are_unsupported_and_say_why() {
    let pool = SqlitePoolOptions::new()
        .max_connections(1)
        .connect("sqlite::memory:")
        .await
        .unwrap();
    let mut conn = pool.acquire().await.unwrap();
    let err = lock_rows_sqlite(&mut conn, &RowLock::new("t", "id"), [1i64])
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        SqlLockError::Unsupported {
            database: "SQLite",
            ..
        }
    ));
    assert!(err.to_string().contains("sqlite_immediate"));
}

#[tokio::test]
async fn optimistic_conflict_on_sqlite() {
    let pool = SqlitePoolOptions::new()
        .max_connections(1)
        .connect("sqlite::memory:")
        .await
        .unwrap();
    sqlx::query(
        "CREATE TABLE doc (id INTEGER PRIMARY KEY, title TEXT NOT NULL, version INTEGER NOT NULL)",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query("INSERT INTO doc VALUES (1, 'a', 1)")
        .execute(&pool)
        .await
        .unwrap();
    let spec = Versioned::new("doc", "id", "version");
    let mut conn = pool.acquire().await.unwrap();
    assert_eq!(
        update_versioned_sqlite(&mut conn, &spec, 1i64, 1, &[("title", SqlValue::from("b"))])
            .await
            .unwrap(),
        2
    );
    let err = update_versioned_sqlite(&mut conn, &spec, 1i64, 1, &[("title", SqlValue::from("c"))])
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            SqlLockError::VersionConflict {
                expected: 1,
                actual: Some(2),
                ..
            }
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn offline_locks_and_idempotency_on_sqlite() {
    let dir = TempDb::new();
    let pool = file_pool(&dir, Duration::from_secs(10), 8).await;
    let locks = OfflineLocks::new(pool.clone());
    locks.migrate().await.unwrap();
    locks
        .acquire("Patient", "1", "a", Some("editing"), None)
        .await
        .unwrap();
    assert_eq!(
        locks
            .acquire("Patient", "1", "a", None, None)
            .await
            .unwrap()
            .hold_count,
        2
    );
    let err = locks
        .acquire("Patient", "1", "b", None, None)
        .await
        .unwrap_err();
    assert!(matches!(err, SqlLockError::OfflineLockHeld { ref holder, .. } if holder == "a"));

    // Concurrent acquirers: one winner.
    let tasks: Vec<_> = (0..10)
        .map(|i| {
            let locks = locks.clone();
            tokio::spawn(async move {
                locks
                    .acquire("Patient", "2", &format!("u{i}"), None, None)
                    .await
                    .is_ok()
            })
        })
        .collect();
    let mut winners = 0;
    for t in tasks {
        winners += usize::from(t.await.unwrap());
    }
    assert_eq!(winners, 1);

    let idem = Idempotency::new(pool.clone());
    idem.migrate().await.unwrap();
    let Begin::Started(e) = idem.begin("k", "fp").await.unwrap() else {
        panic!()
    };
    assert!(matches!(
        idem.begin("k", "fp").await.unwrap(),
        Begin::InProgress { .. }
    ));
    assert_eq!(
        idem.begin("k", "other").await.unwrap(),
        Begin::FingerprintMismatch
    );
    idem.complete(&e, "ok").await.unwrap();
    assert_eq!(
        idem.begin("k", "fp").await.unwrap(),
        Begin::Completed {
            result: "ok".into()
        }
    );
}
