//! # holdfast-sql: locking inside the application's own database
//!
//! For Rust applications on [sqlx]: what seeds 001 (booking with `lockForUpdate` and deadlock
//! retry), 002 (pessimistic offline lock table), 003 (retried transactions, savepoints,
//! idempotency) and 004 (FIFO stock with `FOR UPDATE NOWAIT`) wrote by hand, done once.
//! PostgreSQL and MySQL/MariaDB are first-class; SQLite is supported where the database allows.
//!
//! | module | what | PostgreSQL | MySQL / MariaDB | SQLite |
//! |---|---|---|---|---|
//! | [`transaction`](mod@transaction) | retried transactions, isolation, timeout, savepoints, metrics | yes | yes | yes (always serializable; busy retried) |
//! | [`advisory`] | named locks with a guard and the client's retry policy | `pg_advisory_lock` family | `GET_LOCK` | no (no such locks) |
//! | [`rows`] | row locks in deterministic order, NOWAIT / SKIP LOCKED / timeout | yes | yes | no (database-level locking only) |
//! | [`optimistic`] | versioned updates, typed conflicts, retry helper | yes | yes | yes |
//! | [`offline`] | Fowler's pessimistic offline lock table | yes | yes | yes |
//! | [`idempotency`] | idempotency records (started / in progress / completed / mismatch) | yes | yes | yes |
//!
//! ## Guarantees
//!
//! - **Classification by code, never by message**: deadlocks, serialization failures, lock
//!   timeouts and NOWAIT refusals are recognised by SQLSTATE (PostgreSQL), error number
//!   (MySQL/MariaDB) or result code (SQLite); see [`classify`].
//! - **Retried transactions are all-or-nothing per attempt**: every attempt runs in its own
//!   transaction; any error, timeout or panic rolls it back before the next attempt or before
//!   the error (or panic) reaches the caller. The closure must not have effects outside the
//!   database that cannot be repeated.
//! - **Row locks are taken in ascending key order**, one key per statement, so two callers
//!   locking overlapping sets through this crate cannot deadlock on those rows.
//! - **Advisory locks are owned by their session**: the guard owns the connection; a lock lost
//!   with its connection is reported ([`SqlLockError::AdvisoryLost`]) by `check` and `release`,
//!   never silently ignored; dropping a guard closes its connection, releasing the lock.
//! - **Offline locks**: an object is never held by two holders at once (primary key plus single
//!   conditional statements), also under concurrency.
//! - **Idempotency**: exactly one concurrent `begin` per key gets `Started`.
//! - No `unwrap` in library code; every refusal is a typed [`SqlLockError`] variant.
//!
//! ## Not guaranteed
//!
//! - Session-level advisory locks and offline locks are not fencing: a holder that lost its lock
//!   (connection killed, offline lock expired) is told when it next checks, not interrupted.
//! - Expiry of offline locks and idempotency leases uses the application's clock ([`sql::Clock`]).

#![warn(missing_docs)]

pub mod advisory;
pub mod classify;
pub mod error;
pub mod idempotency;
pub mod offline;
pub mod optimistic;
pub mod retry;
pub mod rows;
pub mod sql;
pub mod transaction;

pub use classify::{Classify, Conflict};
pub use error::{Result, SqlLockError};
pub use retry::RetryPolicy;
pub use sql::Dialect;
pub use transaction::{IsolationLevel, TxMetrics, TxOptions, savepoint, transaction};
