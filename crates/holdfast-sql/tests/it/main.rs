//! Integration tests of holdfast-sql against the real PostgreSQL and MariaDB/MySQL (and SQLite).
//!
//! `HOLDFAST_TEST_POSTGRES_URL` / `HOLDFAST_TEST_MYSQL_URL` choose the servers; under `CI=true`
//! an unreachable server fails the tests, elsewhere they print `skipped: ...` and pass.

mod common;
mod scenarios;
mod sqlite;
