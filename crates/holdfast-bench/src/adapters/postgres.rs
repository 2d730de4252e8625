//! PostgreSQL session-level advisory locks: `pg_advisory_lock(bigint)` waits in the server
//! (bounded by `lock_timeout`), `pg_try_advisory_lock` is the no-wait form,
//! `pg_advisory_unlock` releases. Keys are mapped to `bigint` with FNV-1a.

use std::time::Duration;

use anyhow::Context as _;
use sqlx::{Connection as _, PgConnection};

use crate::adapter::{Durability, LockConn, LockSystem, fnv1a64};

/// SQLSTATE `lock_not_available`: the `lock_timeout` ran out.
const LOCK_NOT_AVAILABLE: &str = "55P03";

/// A PostgreSQL server.
pub struct PostgresSystem {
    url: String,
}

impl PostgresSystem {
    /// Reaches PostgreSQL at `url` (`postgres://postgres@127.0.0.1:5433/test`).
    #[must_use]
    pub fn new(url: &str) -> Self {
        Self {
            url: url.to_owned(),
        }
    }
}

impl LockSystem for PostgresSystem {
    type Conn = PostgresConn;

    fn name(&self) -> &str {
        "postgres"
    }

    /// Advisory locks live in the shared lock table and are never written to the WAL.
    fn durability(&self) -> Durability {
        Durability::MemoryOnly
    }

    async fn connect(&self) -> anyhow::Result<PostgresConn> {
        let conn = tokio::time::timeout(Duration::from_secs(10), PgConnection::connect(&self.url))
            .await
            .context("connect to postgres: timed out")?
            .context("connect to postgres")?;
        Ok(PostgresConn {
            conn,
            lock_timeout_ms: None,
        })
    }
}

/// One PostgreSQL session.
pub struct PostgresConn {
    conn: PgConnection,
    /// The `lock_timeout` currently set on the session, to avoid re-sending it per acquire.
    lock_timeout_ms: Option<u128>,
}

impl LockConn for PostgresConn {
    type Token = i64;

    async fn acquire(&mut self, key: &str, wait: Option<Duration>) -> anyhow::Result<Option<i64>> {
        let id = fnv1a64(key);
        let wait_ms = wait.map_or(0, |wait| wait.as_millis());
        if wait_ms == 0 {
            let granted: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                .bind(id)
                .fetch_one(&mut self.conn)
                .await
                .context("pg_try_advisory_lock")?;
            return Ok(granted.then_some(id));
        }
        if self.lock_timeout_ms != Some(wait_ms) {
            // `SET` takes no bind parameters; `set_config` does (session scope: false).
            sqlx::query("SELECT set_config('lock_timeout', $1, false)")
                .bind(wait_ms.to_string())
                .execute(&mut self.conn)
                .await
                .context("SET lock_timeout")?;
            self.lock_timeout_ms = Some(wait_ms);
        }
        match sqlx::query("SELECT pg_advisory_lock($1)")
            .bind(id)
            .execute(&mut self.conn)
            .await
        {
            Ok(_) => Ok(Some(id)),
            Err(sqlx::Error::Database(err))
                if err.code().as_deref() == Some(LOCK_NOT_AVAILABLE) =>
            {
                Ok(None)
            }
            Err(err) => Err(err).context("pg_advisory_lock"),
        }
    }

    async fn release(&mut self, key: &str, token: i64) -> anyhow::Result<()> {
        let released: bool = sqlx::query_scalar("SELECT pg_advisory_unlock($1)")
            .bind(token)
            .fetch_one(&mut self.conn)
            .await
            .context("pg_advisory_unlock")?;
        anyhow::ensure!(
            released,
            "pg_advisory_unlock({key}): this session did not hold it"
        );
        Ok(())
    }
}
