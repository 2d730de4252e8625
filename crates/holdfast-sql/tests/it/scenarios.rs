//! The scenario tests, written once and instantiated for PostgreSQL and for MySQL/MariaDB.

macro_rules! scenarios {
    (
        mod $m:ident;
        db = $db:ty;
        pool = $pool:path;
        dialect = $dialect:expr;
        lock_rows = $lock_rows:path;
        update_versioned = $update_versioned:path;
        current_version = $current_version:path;
        serial = $serial:literal;
        signed = $signed:literal;
        kill = $kill:path;
        session_id = $session_id:path;
    ) => {
        mod $m {
            use std::sync::Arc;
            use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
            use std::time::Duration;

            use holdfast_sql::advisory::{self, AdvisoryGuard, AdvisoryOptions};
            use holdfast_sql::idempotency::{Begin, Idempotency, IdempotencyTtl};
            use holdfast_sql::offline::OfflineLocks;
            use holdfast_sql::optimistic::{Versioned, retry_on_conflict, SqlValue};
            use holdfast_sql::retry::{Jitter, RetryPolicy, TokioSleeper};
            use holdfast_sql::rows::{RowLock, RowKey};
            use holdfast_sql::sql::{Dialect, ManualClock};
            use holdfast_sql::transaction::{TxMetrics, TxOptions, IsolationLevel, transaction, transaction_with_report};
            use holdfast_sql::{Classify, Conflict, SqlLockError, savepoint};
            use sqlx::{AssertSqlSafe, Pool};
            use tokio::sync::Barrier;

            use crate::common::{AppErr, RecordingSleeper, cleanup, q, unique};
            use crate::require;

            type Db = $db;
            const D: Dialect = $dialect;

            async fn exec(pool: &Pool<Db>, sql: &str) {
                sqlx::query(q(D, sql)).execute(pool).await.unwrap();
            }

            async fn scalar(pool: &Pool<Db>, sql: &str) -> i64 {
                let (v,): (i64,) = sqlx::query_as(q(D, sql)).fetch_one(pool).await.unwrap();
                v
            }

            async fn drop_table(pool: &Pool<Db>, t: &str) {
                exec(pool, &format!("DROP TABLE IF EXISTS {t}")).await;
            }

            fn fast_retry(attempts: u32) -> RetryPolicy {
                RetryPolicy {
                    attempts,
                    initial_delay: Duration::from_millis(5),
                    multiplier: 2.0,
                    max_delay: Duration::from_millis(200),
                    max_total: Some(Duration::from_secs(120)),
                    jitter: Jitter::Full,
                }
            }

            /// Two transactions lock the same two rows in opposite orders: the database reports a
            /// deadlock; without retry one of them fails with it; with retry both commit.
            #[tokio::test]
            async fn deadlock_is_reported_and_retried_to_the_correct_state() {
                let (pool, _slot) = require!($pool("deadlock", 6));
                let t = unique("deadlock");
                let _cleanup = cleanup(D, &[&t]);
                exec(&pool, &format!("CREATE TABLE {t} (id BIGINT PRIMARY KEY, v BIGINT NOT NULL)")).await;
                exec(&pool, &format!("INSERT INTO {t} (id, v) VALUES (1, 0), (2, 0)")).await;

                async fn run(pool: &Pool<Db>, t: &str, opts: &TxOptions) -> Vec<Result<(), AppErr>> {
                    let barrier = Arc::new(Barrier::new(2));
                    let mut tasks = Vec::new();
                    for (first, second) in [(1i64, 2i64), (2, 1)] {
                        let (pool, t, opts, barrier) = (pool.clone(), t.to_owned(), opts.clone(), barrier.clone());
                        tasks.push(tokio::spawn(async move {
                            let attempts = Arc::new(AtomicU32::new(0));
                            transaction(&pool, &opts, |conn| {
                                let (t, barrier, attempts) = (t.clone(), barrier.clone(), attempts.clone());
                                Box::pin(async move {
                                    let upd = format!("UPDATE {t} SET v = v + 1 WHERE id = ?");
                                    sqlx::query(q(D, &upd)).bind(first).execute(&mut *conn).await?;
                                    if attempts.fetch_add(1, Ordering::SeqCst) == 0 {
                                        // Both hold their first row before asking for the second.
                                        barrier.wait().await;
                                    }
                                    sqlx::query(q(D, &upd)).bind(second).execute(&mut *conn).await?;
                                    Ok::<_, AppErr>(())
                                })
                            })
                            .await
                        }));
                    }
                    let mut out = Vec::new();
                    for t in tasks {
                        out.push(t.await.unwrap());
                    }
                    out
                }

                // Without retry: exactly one is the deadlock victim, classified by code.
                let no_retry = TxOptions::default().retry(RetryPolicy::no_wait());
                let results = run(&pool, &t, &no_retry).await;
                let failed: Vec<&AppErr> = results.iter().filter_map(|r| r.as_ref().err()).collect();
                assert_eq!(failed.len(), 1, "{results:?}");
                assert_eq!(failed[0].conflict(), Some(Conflict::Deadlock), "{failed:?}");
                let after_one = scalar(&pool, &format!("SELECT CAST(SUM(v) AS {}) FROM {t}", $signed)).await;
                assert_eq!(after_one, 2, "the victim rolled back completely");

                // With retry: both commit; each adds 1 to both rows (on top of the 1 of phase one).
                let metrics = TxMetrics::new();
                let opts = TxOptions::default().retry(fast_retry(10)).metrics(metrics.clone());
                let results = run(&pool, &t, &opts).await;
                assert!(results.iter().all(Result::is_ok), "{results:?}");
                assert_eq!(scalar(&pool, &format!("SELECT v FROM {t} WHERE id = 1")).await, 3);
                assert_eq!(scalar(&pool, &format!("SELECT v FROM {t} WHERE id = 2")).await, 3);
                let m = metrics.snapshot();
                assert_eq!(m.transactions, 2);
                assert_eq!(m.committed, 2);
                assert!(m.deadlocks >= 1, "{m:?}");
                assert!(m.retries >= 1, "{m:?}");
                assert_eq!(m.attempts, 2 + m.retries);
                drop_table(&pool, &t).await;
            }

            async fn increments(pool: &Pool<Db>, t: &str, opts: &TxOptions, n: usize) -> Vec<Result<(), AppErr>> {
                let barrier = Arc::new(Barrier::new(n));
                let mut tasks = Vec::new();
                for _ in 0..n {
                    let (pool, t, opts, barrier) = (pool.clone(), t.to_owned(), opts.clone(), barrier.clone());
                    tasks.push(tokio::spawn(async move {
                        let attempts = Arc::new(AtomicU32::new(0));
                        transaction(&pool, &opts, |conn| {
                            let (t, barrier, attempts) = (t.clone(), barrier.clone(), attempts.clone());
                            Box::pin(async move {
                                let (v,): (i64,) = sqlx::query_as(q(D, &format!("SELECT v FROM {t} WHERE id = 1")))
                                    .fetch_one(&mut *conn)
                                    .await?;
                                if attempts.fetch_add(1, Ordering::SeqCst) == 0 {
                                    barrier.wait().await; // everyone has read before anyone writes
                                }
                                sqlx::query(q(D, &format!("UPDATE {t} SET v = ? WHERE id = 1")))
                                    .bind(v + 1)
                                    .execute(&mut *conn)
                                    .await?;
                                Ok::<_, AppErr>(())
                            })
                        })
                        .await
                    }));
                }
                let mut out = Vec::new();
                for t in tasks {
                    out.push(t.await.unwrap());
                }
                out
            }

            /// Read-modify-write under SERIALIZABLE: the database refuses the interleaving
            /// (PostgreSQL 40001; InnoDB turns the reads into shared locks and reports a deadlock,
            /// 1213), the wrapper retries, and no increment is lost. Under READ COMMITTED the
            /// same code loses updates, which proves the isolation level matters.
            #[tokio::test]
            async fn serialization_failures_are_retried_to_a_correct_result() {
                let (pool, _slot) = require!($pool("serializable", 6));
                let t = unique("serial");
                let _cleanup = cleanup(D, &[&t]);
                exec(&pool, &format!("CREATE TABLE {t} (id BIGINT PRIMARY KEY, v BIGINT NOT NULL)")).await;
                exec(&pool, &format!("INSERT INTO {t} (id, v) VALUES (1, 0)")).await;

                // The anomaly: lost update.
                let rc = TxOptions::default().isolation(IsolationLevel::ReadCommitted);
                let r = increments(&pool, &t, &rc, 2).await;
                assert!(r.iter().all(Result::is_ok), "{r:?}");
                assert_eq!(scalar(&pool, &format!("SELECT v FROM {t} WHERE id = 1")).await, 1, "lost update expected without serializability");

                // SERIALIZABLE without retry: one fails with a classified conflict.
                exec(&pool, &format!("UPDATE {t} SET v = 0 WHERE id = 1")).await;
                let ser = TxOptions::default().isolation(IsolationLevel::Serializable);
                let r = increments(&pool, &t, &ser.clone().retry(RetryPolicy::no_wait()), 2).await;
                let failed: Vec<&AppErr> = r.iter().filter_map(|r| r.as_ref().err()).collect();
                assert_eq!(failed.len(), 1, "{r:?}");
                assert!(matches!(failed[0].conflict(), Some(Conflict::Serialization | Conflict::Deadlock)), "{failed:?}");

                // SERIALIZABLE with retry: every increment lands.
                exec(&pool, &format!("UPDATE {t} SET v = 0 WHERE id = 1")).await;
                let metrics = TxMetrics::new();
                let r = increments(&pool, &t, &ser.retry(fast_retry(20)).metrics(metrics.clone()), 3).await;
                assert!(r.iter().all(Result::is_ok), "{r:?}");
                assert_eq!(scalar(&pool, &format!("SELECT v FROM {t} WHERE id = 1")).await, 3);
                let m = metrics.snapshot();
                assert!(m.serialization_failures + m.deadlocks >= 1, "{m:?}");
                assert_eq!(m.committed, 3);
                drop_table(&pool, &t).await;
            }

            #[derive(Clone, Copy, Debug, PartialEq)]
            enum Strategy {
                NoWaitAndRetry,
                Wait,
                NoLocking,
            }

            /// Seed 004: 5 consumers take 100 each from FIFO layers holding 300.
            async fn fifo(strategy: Strategy) {
                let (pool, _slot) = require!($pool("fifo", 8));
                let layers = unique("layers");
                let sales = unique("sales");
                let _cleanup = cleanup(D, &[&layers, &sales]);
                exec(&pool, &format!("CREATE TABLE {layers} (id BIGINT PRIMARY KEY, remaining BIGINT NOT NULL)")).await;
                exec(&pool, &format!("CREATE TABLE {sales} (id {}, qty BIGINT NOT NULL)", $serial)).await;
                exec(&pool, &format!("INSERT INTO {layers} (id, remaining) VALUES (1, 100), (2, 120), (3, 80)")).await;

                let opts = TxOptions::default()
                    .isolation(IsolationLevel::ReadCommitted)
                    .retry(fast_retry(200));
                let barrier = Arc::new(Barrier::new(5));
                let mut tasks = Vec::new();
                for _ in 0..5 {
                    let (pool, layers, sales, opts, barrier) = (pool.clone(), layers.clone(), sales.clone(), opts.clone(), barrier.clone());
                    tasks.push(tokio::spawn(async move {
                        let attempts = Arc::new(AtomicU32::new(0));
                        transaction(&pool, &opts, |conn| {
                            let (layers, sales, barrier, attempts) = (layers.clone(), sales.clone(), barrier.clone(), attempts.clone());
                            Box::pin(async move {
                                let want = 100i64;
                                let candidates: Vec<(i64,)> = sqlx::query_as(q(D, &format!(
                                    "SELECT id FROM {layers} WHERE remaining > 0 ORDER BY id"
                                )))
                                .fetch_all(&mut *conn)
                                .await?;
                                let ids: Vec<i64> = candidates.into_iter().map(|(id,)| id).collect();
                                let spec = match strategy {
                                    Strategy::NoWaitAndRetry => Some(RowLock::new(&layers, "id").nowait()),
                                    Strategy::Wait => Some(RowLock::new(&layers, "id")),
                                    Strategy::NoLocking => None,
                                };
                                if let Some(spec) = spec {
                                    $lock_rows(&mut *conn, &spec, ids.iter().copied()).await?;
                                }
                                // Current quantities (READ COMMITTED: fresh after locking).
                                let rows: Vec<(i64, i64)> = sqlx::query_as(q(D, &format!(
                                    "SELECT id, remaining FROM {layers} WHERE remaining > 0 ORDER BY id"
                                )))
                                .fetch_all(&mut *conn)
                                .await?;
                                if strategy == Strategy::NoLocking && attempts.fetch_add(1, Ordering::SeqCst) == 0 {
                                    barrier.wait().await; // everyone has read the stock
                                }
                                let total: i64 = rows.iter().map(|(_, r)| r).sum();
                                if total < want {
                                    return Err(AppErr::Shortage);
                                }
                                let mut left = want;
                                for (id, remaining) in rows {
                                    if left == 0 {
                                        break;
                                    }
                                    let take = left.min(remaining);
                                    // Absolute write of what was read, like the hand-written code.
                                    sqlx::query(q(D, &format!("UPDATE {layers} SET remaining = ? WHERE id = ?")))
                                        .bind(remaining - take)
                                        .bind(id)
                                        .execute(&mut *conn)
                                        .await?;
                                    left -= take;
                                }
                                sqlx::query(q(D, &format!("INSERT INTO {sales} (qty) VALUES (?)"))).bind(want).execute(&mut *conn).await?;
                                Ok(())
                            })
                        })
                        .await
                    }));
                }
                let mut ok = 0;
                let mut shortage = 0;
                for t in tasks {
                    match t.await.unwrap() {
                        Ok(()) => ok += 1,
                        Err(AppErr::Shortage) => shortage += 1,
                        Err(e) => panic!("{strategy:?}: unexpected {e:?}"),
                    }
                }
                let min = scalar(&pool, &format!("SELECT MIN(remaining) FROM {layers}")).await;
                let left = scalar(&pool, &format!("SELECT CAST(SUM(remaining) AS {}) FROM {layers}", $signed)).await;
                let sold = scalar(&pool, &format!("SELECT CAST(COALESCE(SUM(qty), 0) AS {}) FROM {sales}", $signed)).await;
                drop_table(&pool, &layers).await;
                drop_table(&pool, &sales).await;
                if strategy == Strategy::NoLocking {
                    // The anomaly the locking prevents: more sold than there was.
                    assert!(ok > 3, "expected overselling without locks, got {ok} successes");
                    assert_ne!(left + sold, 300, "without locks the sum is not conserved");
                } else {
                    assert_eq!((ok, shortage), (3, 2), "{strategy:?}");
                    assert!(min >= 0, "a layer went negative: {min}");
                    assert_eq!(left, 0);
                    assert_eq!(left + sold, 300, "sum conserved");
                }
            }

            #[tokio::test]
            async fn fifo_nowait_and_retry_gives_three_sales_and_two_shortages() {
                fifo(Strategy::NoWaitAndRetry).await;
            }

            #[tokio::test]
            async fn fifo_waiting_locks_give_three_sales_and_two_shortages() {
                fifo(Strategy::Wait).await;
            }

            #[tokio::test]
            async fn fifo_without_locking_oversells() {
                fifo(Strategy::NoLocking).await;
            }

            async fn book(pool: Pool<Db>, doctors: String, appts: String, lock: bool, barrier: Option<Arc<Barrier>>, patient: i64) -> Result<(), AppErr> {
                let opts = TxOptions::default().isolation(IsolationLevel::ReadCommitted).retry(fast_retry(50));
                let attempts = Arc::new(AtomicU32::new(0));
                transaction(&pool, &opts, |conn| {
                    let (doctors, appts, barrier, attempts) = (doctors.clone(), appts.clone(), barrier.clone(), attempts.clone());
                    Box::pin(async move {
                        if lock {
                            // Seed 001's sequence: lock the doctor, then check the slot.
                            let locked = $lock_rows(&mut *conn, &RowLock::new(&doctors, "id"), [1i64]).await?;
                            assert_eq!(locked.locked, vec![RowKey::Int(1)]);
                        }
                        let (taken,): (i64,) = sqlx::query_as(q(D, &format!("SELECT COUNT(*) FROM {appts} WHERE doctor_id = 1 AND slot = ?")))
                            .bind("2024-01-20 10:00")
                            .fetch_one(&mut *conn)
                            .await?;
                        if let Some(b) = &barrier {
                            if attempts.fetch_add(1, Ordering::SeqCst) == 0 {
                                b.wait().await;
                            }
                        }
                        if taken > 0 {
                            return Err(AppErr::Booked);
                        }
                        sqlx::query(q(D, &format!("INSERT INTO {appts} (doctor_id, patient_id, slot) VALUES (1, ?, ?)")))
                            .bind(patient)
                            .bind("2024-01-20 10:00")
                            .execute(&mut *conn)
                            .await?;
                        Ok(())
                    })
                })
                .await
            }

            /// Seed 001: 50 concurrent bookings of one doctor's slot: exactly one booked. The same
            /// code without the lock double-books (5 requests that all read before writing).
            #[tokio::test]
            async fn fifty_concurrent_bookings_of_one_slot_book_exactly_one() {
                let (pool, _slot) = require!($pool("booking", 10));
                let doctors = unique("doctors");
                let appts = unique("appts");
                let _cleanup = cleanup(D, &[&doctors, &appts]);
                exec(&pool, &format!("CREATE TABLE {doctors} (id BIGINT PRIMARY KEY, active BIGINT NOT NULL)")).await;
                exec(&pool, &format!("INSERT INTO {doctors} (id, active) VALUES (1, 1)")).await;
                exec(&pool, &format!("CREATE TABLE {appts} (id {}, doctor_id BIGINT NOT NULL, patient_id BIGINT NOT NULL, slot VARCHAR(32) NOT NULL)", $serial)).await;

                let tasks: Vec<_> = (0..50)
                    .map(|p| tokio::spawn(book(pool.clone(), doctors.clone(), appts.clone(), true, None, p)))
                    .collect();
                let mut booked = 0;
                let mut refused = 0;
                for t in tasks {
                    match t.await.unwrap() {
                        Ok(()) => booked += 1,
                        Err(AppErr::Booked) => refused += 1,
                        Err(e) => panic!("unexpected {e:?}"),
                    }
                }
                assert_eq!((booked, refused), (1, 49));
                assert_eq!(scalar(&pool, &format!("SELECT COUNT(*) FROM {appts}")).await, 1);

                // Without the lock: double booking.
                exec(&pool, &format!("DELETE FROM {appts}")).await;
                let barrier = Arc::new(Barrier::new(5));
                let tasks: Vec<_> = (0..5)
                    .map(|p| tokio::spawn(book(pool.clone(), doctors.clone(), appts.clone(), false, Some(barrier.clone()), p)))
                    .collect();
                for t in tasks {
                    let _ = t.await.unwrap();
                }
                assert!(scalar(&pool, &format!("SELECT COUNT(*) FROM {appts}")).await > 1, "expected double booking without the lock");
                drop_table(&pool, &doctors).await;
                drop_table(&pool, &appts).await;
            }

            /// NOWAIT, lock timeout and SKIP LOCKED against a row held by another transaction,
            /// refused with the typed error.
            #[tokio::test]
            async fn row_lock_refusals_are_typed() {
                let (pool, _slot) = require!($pool("rowlocks", 4));
                let t = unique("rows");
                let _cleanup = cleanup(D, &[&t]);
                exec(&pool, &format!("CREATE TABLE {t} (id BIGINT PRIMARY KEY, v BIGINT NOT NULL)")).await;
                exec(&pool, &format!("INSERT INTO {t} (id, v) VALUES (1, 0), (2, 0), (3, 0)")).await;

                let mut holder = pool.begin().await.unwrap();
                let held = $lock_rows(&mut *holder, &RowLock::new(&t, "id"), [2i64]).await.unwrap();
                assert_eq!(held.locked, vec![RowKey::Int(2)]);

                for spec in [RowLock::new(&t, "id").nowait(), RowLock::new(&t, "id").timeout(Duration::from_millis(300))] {
                    let mut other = pool.begin().await.unwrap();
                    let err = $lock_rows(&mut *other, &spec, [3i64, 2, 1]).await.unwrap_err();
                    match &err {
                        SqlLockError::RowsLocked { table, keys, conflict, .. } => {
                            assert_eq!(table, &t);
                            assert_eq!(*keys, 3);
                            assert!(conflict.is_lock_refusal(), "{conflict:?}");
                        }
                        e => panic!("expected RowsLocked, got {e:?}"),
                    }
                    assert!(err.conflict().is_some_and(Conflict::is_lock_refusal));
                    other.rollback().await.unwrap();
                }
                // The session's lock wait timeout is restored after a timeout lock (MySQL).
                let mut other = pool.begin().await.unwrap();
                let skipped = $lock_rows(&mut *other, &RowLock::new(&t, "id").skip_locked(), [1i64, 2, 3, 4]).await.unwrap();
                assert_eq!(skipped.locked, vec![RowKey::Int(1), RowKey::Int(3)]);
                assert_eq!(skipped.not_locked, vec![RowKey::Int(2), RowKey::Int(4)]);
                other.rollback().await.unwrap();

                // Shared locks coexist with shared locks, not with an exclusive one.
                holder.rollback().await.unwrap();
                let mut s1 = pool.begin().await.unwrap();
                let mut s2 = pool.begin().await.unwrap();
                $lock_rows(&mut *s1, &RowLock::new(&t, "id").share(), [1i64]).await.unwrap();
                $lock_rows(&mut *s2, &RowLock::new(&t, "id").share().nowait(), [1i64]).await.unwrap();
                let mut x = pool.begin().await.unwrap();
                let err = $lock_rows(&mut *x, &RowLock::new(&t, "id").nowait(), [1i64]).await.unwrap_err();
                assert!(matches!(err, SqlLockError::RowsLocked { .. }), "{err:?}");
                x.rollback().await.unwrap();
                s1.rollback().await.unwrap();
                s2.rollback().await.unwrap();

                assert!(matches!(
                    $lock_rows(&mut *pool.acquire().await.unwrap(), &RowLock::new("x; DROP TABLE y", "id"), [1i64]).await,
                    Err(SqlLockError::InvalidIdentifier(_))
                ));
                drop_table(&pool, &t).await;
            }

            /// NOWAIT-and-retry, deterministically: a row is held; the transaction's NOWAIT lock
            /// is refused with the typed error, the wrapper backs off (and the holder commits
            /// exactly then), and the retry succeeds.
            #[tokio::test]
            async fn nowait_refusal_is_retried_by_the_transaction() {
                let (pool, _slot) = require!($pool("nowait_retry", 4));
                let t = unique("nowait");
                let _cleanup = cleanup(D, &[&t]);
                exec(&pool, &format!("CREATE TABLE {t} (id BIGINT PRIMARY KEY, v BIGINT NOT NULL)")).await;
                exec(&pool, &format!("INSERT INTO {t} (id, v) VALUES (1, 0)")).await;
                let mut holder = pool.begin().await.unwrap();
                $lock_rows(&mut *holder, &RowLock::new(&t, "id"), [1i64]).await.unwrap();
                sqlx::query(q(D, &format!("UPDATE {t} SET v = 10 WHERE id = 1"))).execute(&mut *holder).await.unwrap();

                let notify = Arc::new(tokio::sync::Notify::new());
                let n2 = notify.clone();
                let releaser = tokio::spawn(async move {
                    n2.notified().await;
                    holder.commit().await.unwrap();
                });
                let opts = TxOptions::default()
                    .isolation(IsolationLevel::ReadCommitted)
                    .retry(fast_retry(100))
                    .sleeper(Arc::new(crate::common::SignalSleeper(notify)));
                let (r, report) = transaction_with_report(&pool, &opts, |conn| {
                    let t = t.clone();
                    Box::pin(async move {
                        $lock_rows(&mut *conn, &RowLock::new(&t, "id").nowait(), [1i64]).await?;
                        sqlx::query(q(D, &format!("UPDATE {t} SET v = v + 1 WHERE id = 1"))).execute(&mut *conn).await?;
                        Ok::<_, SqlLockError>(())
                    })
                })
                .await;
                r.unwrap();
                releaser.await.unwrap();
                assert_eq!(report.conflicts.first(), Some(&Conflict::LockNotAvailable), "{report:?}");
                assert!(report.attempts >= 2);
                assert_eq!(scalar(&pool, &format!("SELECT v FROM {t} WHERE id = 1")).await, 11);

                // With lock refusals not retried, the typed error reaches the caller.
                let mut holder = pool.begin().await.unwrap();
                $lock_rows(&mut *holder, &RowLock::new(&t, "id"), [1i64]).await.unwrap();
                let r: Result<(), SqlLockError> = transaction(&pool, &TxOptions::default().retry_lock_refusals(false), |conn| {
                    let t = t.clone();
                    Box::pin(async move {
                        $lock_rows(&mut *conn, &RowLock::new(&t, "id").nowait(), [1i64]).await?;
                        Ok(())
                    })
                })
                .await;
                assert!(matches!(r, Err(SqlLockError::RowsLocked { conflict: Conflict::LockNotAvailable, .. })), "{r:?}");
                holder.rollback().await.unwrap();
                drop_table(&pool, &t).await;
            }

            /// Rollback on error, on panic and on timeout; nested savepoints.
            #[tokio::test]
            async fn rollback_paths_and_savepoints() {
                let (pool, _slot) = require!($pool("rollback", 4));
                let t = unique("tx");
                let _cleanup = cleanup(D, &[&t]);
                exec(&pool, &format!("CREATE TABLE {t} (id BIGINT PRIMARY KEY)")).await;
                let metrics = TxMetrics::new();
                let opts = TxOptions::default().metrics(metrics.clone());
                let insert = format!("INSERT INTO {t} (id) VALUES (?)");

                // Business error: rolled back, not retried.
                let r: Result<(), AppErr> = transaction(&pool, &opts, |conn| {
                    let insert = insert.clone();
                    Box::pin(async move {
                        sqlx::query(q(D, &insert)).bind(1i64).execute(&mut *conn).await?;
                        Err(AppErr::Booked)
                    })
                })
                .await;
                assert!(matches!(r, Err(AppErr::Booked)));

                // Panic: rolled back, then the panic reaches the caller.
                let (p2, o2, i2) = (pool.clone(), opts.clone(), insert.clone());
                let joined = tokio::spawn(async move {
                    let _: Result<(), AppErr> = transaction(&p2, &o2, |conn| {
                        let insert = i2.clone();
                        Box::pin(async move {
                            sqlx::query(q(D, &insert)).bind(2i64).execute(&mut *conn).await?;
                            panic!("boom");
                        })
                    })
                    .await;
                })
                .await;
                assert!(joined.unwrap_err().is_panic());

                // Timeout: rolled back, reported as Timeout.
                let slow = opts.clone().timeout(Duration::from_secs(1));
                let r: Result<(), AppErr> = transaction(&pool, &slow, |conn| {
                    let insert = insert.clone();
                    Box::pin(async move {
                        sqlx::query(q(D, &insert)).bind(3i64).execute(&mut *conn).await?;
                        tokio::time::sleep(Duration::from_secs(30)).await;
                        Ok(())
                    })
                })
                .await;
                assert!(matches!(r, Err(AppErr::Db(SqlLockError::Timeout(_)))), "{r:?}");
                assert_eq!(scalar(&pool, &format!("SELECT COUNT(*) FROM {t}")).await, 0, "nothing committed");

                // Savepoints: the inner failure rolls back only the inner work; they nest.
                let (r, report) = transaction_with_report(&pool, &opts, |conn| {
                    let insert = insert.clone();
                    Box::pin(async move {
                        sqlx::query(q(D, &insert)).bind(10i64).execute(&mut *conn).await?;
                        let inner: Result<(), AppErr> = savepoint::<Db, _, _, _>(&mut *conn, |c| {
                            let insert = insert.clone();
                            Box::pin(async move {
                                sqlx::query(q(D, &insert)).bind(11i64).execute(&mut *c).await?;
                                let deeper: Result<(), AppErr> = savepoint::<Db, _, _, _>(&mut *c, |c2| {
                                    let insert = insert.clone();
                                    Box::pin(async move {
                                        sqlx::query(q(D, &insert)).bind(12i64).execute(&mut *c2).await?;
                                        Ok(())
                                    })
                                })
                                .await;
                                deeper?;
                                // Duplicate key: fails the inner savepoint.
                                sqlx::query(q(D, &insert)).bind(10i64).execute(&mut *c).await?;
                                Ok(())
                            })
                        })
                        .await;
                        assert!(inner.is_err());
                        sqlx::query(q(D, &insert)).bind(13i64).execute(&mut *conn).await?;
                        Ok::<_, AppErr>(())
                    })
                })
                .await;
                r.unwrap();
                assert_eq!(report.attempts, 1);
                let ids: Vec<(i64,)> = sqlx::query_as(q(D, &format!("SELECT id FROM {t} ORDER BY id"))).fetch_all(&pool).await.unwrap();
                assert_eq!(ids, vec![(10,), (13,)]);
                let m = metrics.snapshot();
                assert_eq!((m.transactions, m.committed, m.failed, m.panics, m.timeouts), (4, 1, 3, 1, 1), "{m:?}");
                drop_table(&pool, &t).await;
            }

            /// A statement stuck in the server past the transaction timeout: the attempt ends
            /// with Timeout, its work is rolled back, and the pool keeps working.
            #[tokio::test]
            async fn timeout_interrupts_a_stuck_statement() {
                let (pool, _slot) = require!($pool("stuck", 3));
                let t = unique("stuck");
                let _cleanup = cleanup(D, &[&t]);
                exec(&pool, &format!("CREATE TABLE {t} (id BIGINT PRIMARY KEY)")).await;
                let opts = TxOptions::default().timeout(Duration::from_millis(500));
                let (r, report) = transaction_with_report(&pool, &opts, |conn| {
                    let t = t.clone();
                    Box::pin(async move {
                        sqlx::query(q(D, &format!("INSERT INTO {t} (id) VALUES (1)"))).execute(&mut *conn).await?;
                        let sleep = match D {
                            Dialect::Postgres => "SELECT pg_sleep(3)::text",
                            _ => "SELECT CAST(SLEEP(3) AS CHAR)",
                        };
                        sqlx::query(sleep).execute(&mut *conn).await?;
                        Ok::<_, SqlLockError>(())
                    })
                })
                .await;
                assert!(matches!(r, Err(SqlLockError::Timeout(_))), "{r:?}");
                assert!(report.timed_out);
                assert_eq!(report.attempts, 1, "timeouts are not retried");
                assert_eq!(scalar(&pool, &format!("SELECT COUNT(*) FROM {t}")).await, 0);
                drop_table(&pool, &t).await;
            }

            async fn session_of(guard: &mut AdvisoryGuard<Db>) -> i64 {
                $session_id(guard.connection().unwrap()).await
            }

            /// Advisory locks across connections: held, no-wait refusal naming the holder, retry
            /// policy, release, lost when the connection is killed, released on drop.
            #[tokio::test]
            async fn advisory_locks_across_connections() {
                let (pool, _slot) = require!($pool("advisory", 8));
                let name = unique("vocab_import/RXNORM");
                let mut a = advisory::lock(&pool, &name, &AdvisoryOptions::no_wait()).await.unwrap();
                a.check().await.unwrap();
                assert_eq!(a.attempts(), 1);

                // No-wait refusal, naming the holder.
                let err = advisory::lock(&pool, &name, &AdvisoryOptions::no_wait()).await.unwrap_err();
                match &err {
                    SqlLockError::AdvisoryHeld { key, holder, attempts, .. } => {
                        assert_eq!(key, &name);
                        assert_eq!(*attempts, 1);
                        let sid = session_of(&mut a).await;
                        assert!(holder.as_deref().is_some_and(|h| h.contains(&sid.to_string())), "{holder:?} should name {sid}");
                    }
                    e => panic!("{e:?}"),
                }
                assert!(advisory::holder(&pool, &name).await.unwrap().is_some());

                // The retry policy: 3 attempts, 2 sleeps growing under full jitter ceilings.
                let sleeper = RecordingSleeper::default();
                let opts = AdvisoryOptions {
                    retry: RetryPolicy { jitter: Jitter::None, ..RetryPolicy::new(3, Duration::from_millis(10)) },
                    sleeper: Arc::new(sleeper.clone()),
                    ..AdvisoryOptions::default()
                };
                let err = advisory::lock(&pool, &name, &opts).await.unwrap_err();
                assert!(matches!(err, SqlLockError::AdvisoryHeld { attempts: 3, .. }), "{err:?}");
                assert_eq!(sleeper.sleeps(), vec![Duration::from_millis(10), Duration::from_millis(20)]);

                // In-database wait that times out is a refusal too.
                let err = advisory::lock(&pool, &name, &AdvisoryOptions::no_wait().wait(Duration::from_millis(200))).await.unwrap_err();
                assert!(matches!(err, SqlLockError::AdvisoryHeld { .. }), "{err:?}");

                // Release; then someone else gets it.
                a.release().await.unwrap();
                let mut b = advisory::lock(&pool, &name, &AdvisoryOptions::no_wait()).await.unwrap();

                // Lost with its connection: kill b's session from another connection.
                let sid = session_of(&mut b).await;
                $kill(&pool, sid).await;
                let lost = b.check().await.unwrap_err();
                assert!(matches!(&lost, SqlLockError::AdvisoryLost { key } if key == &name), "{lost:?}");
                assert!(matches!(b.release().await, Err(SqlLockError::AdvisoryLost { .. })));
                let c = advisory::lock(&pool, &name, &AdvisoryOptions::no_wait().retry(fast_retry(50))).await.unwrap();

                // Dropping a guard closes its session, which frees the lock.
                drop(c);
                let d = advisory::lock(&pool, &name, &AdvisoryOptions::no_wait().retry(fast_retry(50))).await.unwrap();
                d.release().await.unwrap();

                // Names over 64 characters (MySQL's limit): hashed, and still exclusive.
                let long = format!("{name}/{}", "x".repeat(100));
                let g = advisory::lock(&pool, &long, &AdvisoryOptions::no_wait()).await.unwrap();
                assert!(matches!(
                    advisory::lock(&pool, &long, &AdvisoryOptions::no_wait()).await,
                    Err(SqlLockError::AdvisoryHeld { .. })
                ));
                let other = advisory::lock(&pool, &format!("{long}-other"), &AdvisoryOptions::no_wait()).await.unwrap();
                other.release().await.unwrap();
                g.release().await.unwrap();

                // Different names do not interfere.
                let e = advisory::lock(&pool, &format!("{name}-a"), &AdvisoryOptions::no_wait()).await.unwrap();
                let f = advisory::lock(&pool, &format!("{name}-b"), &AdvisoryOptions::no_wait()).await.unwrap();
                e.release().await.unwrap();
                f.release().await.unwrap();
            }

            /// Offline locks: reentrancy, refusal naming the holder, expiry, release-all, sweep.
            #[tokio::test]
            async fn offline_locks_reentrancy_refusal_expiry() {
                let (pool, _slot) = require!($pool("offline", 4));
                let clock = ManualClock::new(1_700_000_000_000);
                let locks = OfflineLocks::<Db>::new(pool.clone()).with_table(&unique("offline")).unwrap().with_clock(clock.clone());
                let _cleanup = cleanup(D, &[locks.table()]);
                locks.migrate().await.unwrap();
                locks.migrate().await.unwrap(); // idempotent

                let l = locks.acquire("Patient", "42", "Dr_Green", Some("editing"), Some(Duration::from_secs(600))).await.unwrap();
                assert_eq!((l.holder.as_str(), l.hold_count, l.reason.as_deref()), ("Dr_Green", 1, Some("editing")));
                let l = locks.acquire("Patient", "42", "Dr_Green", Some("prescribing"), Some(Duration::from_secs(600))).await.unwrap();
                assert_eq!(l.hold_count, 2, "reentrant");
                assert_eq!(l.reason.as_deref(), Some("prescribing"));

                let err = locks.acquire("Patient", "42", "Dr_House", Some("editing"), None).await.unwrap_err();
                match &err {
                    SqlLockError::OfflineLockHeld { object_type, object_id, holder, reason, expires_at } => {
                        assert_eq!((object_type.as_str(), object_id.as_str(), holder.as_str()), ("Patient", "42", "Dr_Green"));
                        assert_eq!(reason.as_deref(), Some("prescribing"));
                        assert!(expires_at.is_some());
                    }
                    e => panic!("{e:?}"),
                }
                assert!(err.to_string().contains("Dr_Green"));
                assert!(matches!(locks.release("Patient", "42", "Dr_House").await, Err(SqlLockError::NotHolder { .. })));

                assert_eq!(locks.release("Patient", "42", "Dr_Green").await.unwrap(), 1);
                assert!(locks.acquire("Patient", "42", "Dr_House", None, None).await.is_err(), "still held once");
                assert_eq!(locks.release("Patient", "42", "Dr_Green").await.unwrap(), 0);
                let h = locks.acquire("Patient", "42", "Dr_House", None, Some(Duration::from_secs(60))).await.unwrap();
                assert_eq!(h.hold_count, 1);

                // Expiry: after the TTL another holder takes over; list hides expired rows.
                locks.acquire("Patient", "43", "Dr_House", None, None).await.unwrap();
                clock.advance_ms(61_000);
                assert_eq!(locks.list(Some("Dr_House")).await.unwrap().len(), 1, "only the non-expiring one");
                assert!(locks.get("Patient", "42").await.unwrap().is_none());
                let g = locks.acquire("Patient", "42", "Dr_Green", None, Some(Duration::from_secs(10))).await.unwrap();
                assert_eq!((g.holder.as_str(), g.hold_count), ("Dr_Green", 1));
                clock.advance_ms(11_000);
                assert_eq!(locks.sweep_expired().await.unwrap(), 1);
                assert_eq!(locks.list(None).await.unwrap().len(), 1);

                locks.acquire("Invoice", "7", "Dr_House", None, None).await.unwrap();
                assert_eq!(locks.release_all("Dr_House").await.unwrap(), 2);
                assert!(locks.list(None).await.unwrap().is_empty());
                assert!(locks.acquire("", "1", "x", None, None).await.is_err());
                locks.drop_table().await.unwrap();
            }

            /// Offline locks under concurrency: never two holders of one object at once.
            #[tokio::test]
            async fn offline_locks_concurrent_acquirers() {
                let (pool, _slot) = require!($pool("offline_conc", 10));
                let locks = OfflineLocks::<Db>::new(pool.clone()).with_table(&unique("offline_c")).unwrap();
                let _cleanup = cleanup(D, &[locks.table()]);
                locks.migrate().await.unwrap();

                // 20 holders race for one object: exactly one wins.
                let tasks: Vec<_> = (0..20)
                    .map(|i| {
                        let locks = locks.clone();
                        tokio::spawn(async move { locks.acquire("Patient", "1", &format!("user-{i}"), None, None).await })
                    })
                    .collect();
                let mut winners = 0;
                for t in tasks {
                    match t.await.unwrap() {
                        Ok(_) => winners += 1,
                        Err(SqlLockError::OfflineLockHeld { .. }) => {}
                        Err(e) => panic!("{e:?}"),
                    }
                }
                assert_eq!(winners, 1);

                // Many rounds on two objects: the in-memory occupancy never sees two holders.
                let occupied: Arc<[AtomicUsize; 2]> = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
                let grants = Arc::new(AtomicUsize::new(0));
                let tasks: Vec<_> = (0..8)
                    .map(|i| {
                        let (locks, occupied, grants) = (locks.clone(), occupied.clone(), grants.clone());
                        tokio::spawn(async move {
                            for round in 0..15 {
                                let obj = (i + round) % 2;
                                let holder = format!("worker-{i}");
                                if locks.acquire("Order", &obj.to_string(), &holder, None, None).await.is_ok() {
                                    assert_eq!(occupied[obj].fetch_add(1, Ordering::SeqCst), 0, "two holders at once");
                                    grants.fetch_add(1, Ordering::SeqCst);
                                    tokio::task::yield_now().await;
                                    occupied[obj].fetch_sub(1, Ordering::SeqCst);
                                    assert_eq!(locks.release("Order", &obj.to_string(), &holder).await.unwrap(), 0);
                                }
                            }
                        })
                    })
                    .collect();
                for t in tasks {
                    t.await.unwrap();
                }
                assert!(grants.load(Ordering::SeqCst) > 0);
                locks.drop_table().await.unwrap();
            }

            /// Optimistic concurrency: a stale version is a typed conflict; the retry helper
            /// reloads and reapplies until every concurrent increment lands.
            #[tokio::test]
            async fn optimistic_conflict_detected_and_retried() {
                let (pool, _slot) = require!($pool("optimistic", 8));
                let t = unique("docs");
                let _cleanup = cleanup(D, &[&t]);
                exec(&pool, &format!("CREATE TABLE {t} (id BIGINT PRIMARY KEY, title VARCHAR(100) NOT NULL, n BIGINT NOT NULL, version BIGINT NOT NULL)")).await;
                exec(&pool, &format!("INSERT INTO {t} (id, title, n, version) VALUES (1, 'a', 0, 1)")).await;
                let spec = Versioned::new(&t, "id", "version");
                let mut conn = pool.acquire().await.unwrap();

                assert_eq!($update_versioned(&mut *conn, &spec, 1i64, 1, &[("title", SqlValue::from("b"))]).await.unwrap(), 2);
                let err = $update_versioned(&mut *conn, &spec, 1i64, 1, &[("title", SqlValue::from("c"))]).await.unwrap_err();
                assert!(matches!(&err, SqlLockError::VersionConflict { expected: 1, actual: Some(2), .. }), "{err:?}");
                assert!(err.is_version_conflict());
                let err = $update_versioned(&mut *conn, &spec, 99i64, 1, &[("title", SqlValue::from("c"))]).await.unwrap_err();
                assert!(matches!(&err, SqlLockError::VersionConflict { actual: None, .. }), "{err:?}");
                assert_eq!($current_version(&mut *conn, &spec, 1i64).await.unwrap(), Some(2));
                drop(conn);

                // 6 concurrent read-modify-write increments with retry: none lost.
                let conflicts = Arc::new(AtomicU32::new(0));
                let barrier = Arc::new(Barrier::new(6));
                let tasks: Vec<_> = (0..6)
                    .map(|_| {
                        let (pool, spec, t, conflicts, barrier) = (pool.clone(), spec.clone(), t.clone(), conflicts.clone(), barrier.clone());
                        tokio::spawn(async move {
                            retry_on_conflict(&fast_retry(50), &TokioSleeper, |attempt| {
                                let (pool, spec, t, conflicts, barrier) = (pool.clone(), spec.clone(), t.clone(), conflicts.clone(), barrier.clone());
                                async move {
                                    let mut conn = pool.acquire().await?;
                                    let (n, v): (i64, i64) = sqlx::query_as(q(D, &format!("SELECT n, version FROM {t} WHERE id = 1"))).fetch_one(&mut *conn).await?;
                                    if attempt == 1 {
                                        barrier.wait().await; // all read the same version
                                    }
                                    let r = $update_versioned(&mut *conn, &spec, 1i64, v, &[("n", SqlValue::Int(n + 1))]).await;
                                    if matches!(r, Err(SqlLockError::VersionConflict { .. })) {
                                        conflicts.fetch_add(1, Ordering::SeqCst);
                                    }
                                    r
                                }
                            })
                            .await
                        })
                    })
                    .collect();
                for task in tasks {
                    task.await.unwrap().unwrap();
                }
                assert_eq!(scalar(&pool, &format!("SELECT n FROM {t} WHERE id = 1")).await, 6);
                assert_eq!(scalar(&pool, &format!("SELECT version FROM {t} WHERE id = 1")).await, 8);
                assert!(conflicts.load(Ordering::SeqCst) >= 5, "all but one conflict on the first round");
                drop_table(&pool, &t).await;
            }

            /// Idempotency states, expiry and lease loss.
            #[tokio::test]
            async fn idempotency_states() {
                let (pool, _slot) = require!($pool("idem", 12));
                let clock = ManualClock::new(1_700_000_000_000);
                let idem = Idempotency::<Db>::new(pool.clone())
                    .with_table(&unique("idem")).unwrap()
                    .with_clock(clock.clone())
                    .with_ttl(IdempotencyTtl { record: Duration::from_secs(3600), lease: Duration::from_secs(30) });
                let _cleanup = cleanup(D, &[idem.table()]);
                idem.migrate().await.unwrap();

                // 10 concurrent begins: exactly one started.
                let tasks: Vec<_> = (0..10)
                    .map(|_| {
                        let idem = idem.clone();
                        tokio::spawn(async move { idem.begin("swap-1", "fp-a").await.unwrap() })
                    })
                    .collect();
                let mut started = Vec::new();
                for t in tasks {
                    match t.await.unwrap() {
                        Begin::Started(e) => started.push(e),
                        Begin::InProgress { lease_until } => assert!(lease_until.is_some()),
                        other => panic!("{other:?}"),
                    }
                }
                assert_eq!(started.len(), 1);
                let exec = started.pop().unwrap();
                assert_eq!(idem.begin("swap-1", "fp-b").await.unwrap(), Begin::FingerprintMismatch);
                // A waiter polls while the execution is in progress and gets the outcome.
                let waiter = {
                    let idem = idem.clone();
                    tokio::spawn(async move { idem.begin_or_wait("swap-1", "fp-a", &fast_retry(10_000), &TokioSleeper).await.unwrap() })
                };
                idem.complete(&exec, r#"{"status":201}"#).await.unwrap();
                assert_eq!(waiter.await.unwrap(), Begin::Completed { result: r#"{"status":201}"#.into() });
                assert_eq!(idem.begin("swap-1", "fp-a").await.unwrap(), Begin::Completed { result: r#"{"status":201}"#.into() });
                assert!(matches!(idem.complete(&exec, "again").await, Err(SqlLockError::IdempotencyNotOwner { .. })));

                // Abort frees the key.
                let Begin::Started(e2) = idem.begin("swap-2", "fp").await.unwrap() else { panic!() };
                idem.abort(&e2).await.unwrap();
                let Begin::Started(e3) = idem.begin("swap-2", "fp").await.unwrap() else { panic!() };

                // The executor's lease runs out: the key is free; the old executor lost it.
                clock.advance_ms(31_000);
                let Begin::Started(e4) = idem.begin("swap-2", "fp").await.unwrap() else { panic!("lease expired") };
                assert!(matches!(idem.complete(&e3, "late").await, Err(SqlLockError::IdempotencyNotOwner { .. })));
                let mut e4 = e4;
                idem.renew(&mut e4).await.unwrap();
                idem.complete(&e4, "done").await.unwrap();

                // The record expires after its TTL.
                clock.advance_ms(3_601_000);
                assert!(matches!(idem.begin("swap-1", "fp-b").await.unwrap(), Begin::Started(_)));
                assert!(idem.sweep_expired().await.unwrap() >= 1);
                idem.drop_table().await.unwrap();
            }

            /// Seed 003: a schedule swap requested 8 times concurrently (client retries) runs
            /// exactly once; every request gets the same result. The completion is written in
            /// the transaction that does the swap.
            #[tokio::test]
            async fn swap_executes_exactly_once_under_concurrent_retries() {
                let (pool, _slot) = require!($pool("swap", 10));
                let idem = Idempotency::<Db>::new(pool.clone()).with_table(&unique("idem_swap")).unwrap();
                idem.migrate().await.unwrap();
                let t = unique("assign");
                let _cleanup = cleanup(D, &[&t, idem.table()]);
                exec(&pool, &format!("CREATE TABLE {t} (id BIGINT PRIMARY KEY, person VARCHAR(20) NOT NULL, swaps BIGINT NOT NULL)")).await;
                exec(&pool, &format!("INSERT INTO {t} (id, person, swaps) VALUES (1, 'alice', 0), (2, 'bob', 0)")).await;

                let tasks: Vec<_> = (0..8)
                    .map(|_| {
                        let (pool, idem, t) = (pool.clone(), idem.clone(), t.clone());
                        tokio::spawn(async move {
                            loop {
                                match idem.begin("swap-week-12", "alice<->bob").await.unwrap() {
                                    Begin::Completed { result } => return result,
                                    Begin::InProgress { .. } => tokio::time::sleep(Duration::from_millis(20)).await,
                                    Begin::FingerprintMismatch => panic!("same request"),
                                    Begin::Started(exec) => {
                                        let r: Result<String, SqlLockError> = transaction(&pool, &TxOptions::default(), |conn| {
                                            let (idem, t, exec) = (idem.clone(), t.clone(), exec.clone());
                                            Box::pin(async move {
                                                $lock_rows(&mut *conn, &RowLock::new(&t, "id"), [1i64, 2]).await?;
                                                sqlx::query(q(D, &format!(
                                                    "UPDATE {t} SET person = CASE WHEN person = 'alice' THEN 'bob' ELSE 'alice' END, swaps = swaps + 1"
                                                ))).execute(&mut *conn).await?;
                                                let result = "swapped".to_owned();
                                                idem.complete_in(&mut *conn, &exec, &result).await?;
                                                Ok(result)
                                            })
                                        })
                                        .await;
                                        match r {
                                            Ok(result) => return result,
                                            Err(e) => {
                                                idem.abort(&exec).await.ok();
                                                panic!("{e:?}");
                                            }
                                        }
                                    }
                                }
                            }
                        })
                    })
                    .collect();
                for task in tasks {
                    assert_eq!(task.await.unwrap(), "swapped");
                }
                assert_eq!(scalar(&pool, &format!("SELECT swaps FROM {t} WHERE id = 1")).await, 1, "executed exactly once");
                let (p,): (String,) = sqlx::query_as(q(D, &format!("SELECT person FROM {t} WHERE id = 1"))).fetch_one(&pool).await.unwrap();
                assert_eq!(p, "bob");
                drop_table(&pool, &t).await;
                idem.drop_table().await.unwrap();
            }

            #[allow(dead_code)]
            fn _uses(_: AssertSqlSafe<String>) {}
        }
    };
}

/// PostgreSQL-only advisory features: transaction-level and shared locks.
mod pg_only {
    use holdfast_sql::SqlLockError;
    use holdfast_sql::advisory::{
        self, AdvisoryMode, AdvisoryOptions, pg_try_xact_lock, pg_xact_lock,
    };

    use crate::common::{pg, unique};
    use crate::require;

    #[tokio::test]
    async fn transaction_level_advisory_locks_end_with_the_transaction() {
        let (pool, _slot) = require!(pg("xact_advisory", 4));
        let name = unique("xact");
        let mut tx1 = pool.begin().await.unwrap();
        pg_xact_lock(&mut tx1, &name, AdvisoryMode::Exclusive)
            .await
            .unwrap();
        let mut tx2 = pool.begin().await.unwrap();
        assert!(
            !pg_try_xact_lock(&mut tx2, &name, AdvisoryMode::Exclusive)
                .await
                .unwrap()
        );
        assert!(
            !pg_try_xact_lock(&mut tx2, &name, AdvisoryMode::Shared)
                .await
                .unwrap()
        );
        // Same key space as session locks.
        assert!(
            advisory::lock(&pool, &name, &AdvisoryOptions::no_wait())
                .await
                .is_err()
        );
        tx1.commit().await.unwrap();
        assert!(
            pg_try_xact_lock(&mut tx2, &name, AdvisoryMode::Exclusive)
                .await
                .unwrap()
        );
        tx2.rollback().await.unwrap();
        let g = advisory::lock(&pool, &name, &AdvisoryOptions::no_wait())
            .await
            .unwrap();
        g.release().await.unwrap();
    }

    #[tokio::test]
    async fn shared_advisory_locks_coexist_and_exclude_exclusive() {
        let (pool, _slot) = require!(pg("shared_advisory", 6));
        let name = unique("shared");
        let mut a = advisory::lock(&pool, &name, &AdvisoryOptions::no_wait().shared())
            .await
            .unwrap();
        let b = advisory::lock(&pool, &name, &AdvisoryOptions::no_wait().shared())
            .await
            .unwrap();
        a.check().await.unwrap();
        let err = advisory::lock(&pool, &name, &AdvisoryOptions::no_wait())
            .await
            .unwrap_err();
        match err {
            SqlLockError::AdvisoryHeld {
                holder: Some(h), ..
            } => assert_eq!(h.matches("backend pid").count(), 2, "{h}"),
            e => panic!("{e:?}"),
        }
        a.release().await.unwrap();
        assert!(
            advisory::lock(&pool, &name, &AdvisoryOptions::no_wait())
                .await
                .is_err(),
            "b still shares it"
        );
        b.release().await.unwrap();
        let x = advisory::lock(&pool, &name, &AdvisoryOptions::no_wait())
            .await
            .unwrap();
        x.release().await.unwrap();
    }
}

/// MySQL/MariaDB-only: `GET_LOCK` has no shared mode, said as a typed error.
mod mysql_only {
    use holdfast_sql::SqlLockError;
    use holdfast_sql::advisory::{self, AdvisoryOptions};

    use crate::common::{mysql, unique};
    use crate::require;

    #[tokio::test]
    async fn shared_named_locks_are_unsupported() {
        let (pool, _slot) = require!(mysql("shared_named", 2));
        let err = advisory::lock(&pool, &unique("s"), &AdvisoryOptions::no_wait().shared())
            .await
            .unwrap_err();
        assert!(matches!(err, SqlLockError::Unsupported { .. }), "{err:?}");
    }
}

mod pg_support {
    use sqlx::{PgConnection, PgPool};

    pub async fn kill(pool: &PgPool, pid: i64) {
        let (ok,): (bool,) = sqlx::query_as("SELECT pg_terminate_backend($1::int)")
            .bind(pid)
            .fetch_one(pool)
            .await
            .unwrap();
        assert!(ok);
    }

    pub async fn session_id(conn: &mut PgConnection) -> i64 {
        let (pid,): (i32,) = sqlx::query_as("SELECT pg_backend_pid()")
            .fetch_one(conn)
            .await
            .unwrap();
        i64::from(pid)
    }
}

mod mysql_support {
    use sqlx::{AssertSqlSafe, MySqlConnection, MySqlPool};

    pub async fn kill(pool: &MySqlPool, id: i64) {
        sqlx::raw_sql(AssertSqlSafe(format!("KILL {id}")))
            .execute(pool)
            .await
            .unwrap();
    }

    pub async fn session_id(conn: &mut MySqlConnection) -> i64 {
        let (id,): (i64,) = sqlx::query_as("SELECT CAST(CONNECTION_ID() AS SIGNED)")
            .fetch_one(conn)
            .await
            .unwrap();
        id
    }
}

scenarios! {
    mod postgres;
    db = sqlx::Postgres;
    pool = crate::common::pg;
    dialect = Dialect::Postgres;
    lock_rows = holdfast_sql::rows::lock_rows_pg;
    update_versioned = holdfast_sql::optimistic::update_versioned_pg;
    current_version = holdfast_sql::optimistic::current_version_pg;
    serial = "BIGSERIAL PRIMARY KEY";
    signed = "BIGINT";
    kill = crate::scenarios::pg_support::kill;
    session_id = crate::scenarios::pg_support::session_id;
}

scenarios! {
    mod mysql;
    db = sqlx::MySql;
    pool = crate::common::mysql;
    dialect = Dialect::MySql;
    lock_rows = holdfast_sql::rows::lock_rows_mysql;
    update_versioned = holdfast_sql::optimistic::update_versioned_mysql;
    current_version = holdfast_sql::optimistic::current_version_mysql;
    serial = "BIGINT AUTO_INCREMENT PRIMARY KEY";
    signed = "SIGNED";
    kill = crate::scenarios::mysql_support::kill;
    session_id = crate::scenarios::mysql_support::session_id;
}
