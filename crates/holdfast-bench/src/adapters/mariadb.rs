//! MariaDB named locks: `GET_LOCK(name, timeout_s)` waits in the server (timeout 0 is the
//! no-wait form), `RELEASE_LOCK(name)` releases. A session may hold many named locks.

use std::time::Duration;

use anyhow::Context as _;
use sqlx::{Connection as _, MySqlConnection};

use crate::adapter::{Durability, LockConn, LockSystem};

/// A MariaDB (or MySQL) server.
pub struct MariaDbSystem {
    url: String,
}

impl MariaDbSystem {
    /// Reaches MariaDB at `url` (`mysql://root@127.0.0.1:3307/test`).
    #[must_use]
    pub fn new(url: &str) -> Self {
        Self {
            url: url.to_owned(),
        }
    }
}

impl LockSystem for MariaDbSystem {
    type Conn = MariaDbConn;

    fn name(&self) -> &str {
        "mariadb"
    }

    /// Named locks are held by the session in the metadata-lock subsystem, never on disk.
    fn durability(&self) -> Durability {
        Durability::MemoryOnly
    }

    async fn connect(&self) -> anyhow::Result<MariaDbConn> {
        let conn =
            tokio::time::timeout(Duration::from_secs(10), MySqlConnection::connect(&self.url))
                .await
                .context("connect to mariadb: timed out")?
                .context("connect to mariadb")?;
        Ok(MariaDbConn { conn })
    }
}

/// One MariaDB session.
pub struct MariaDbConn {
    conn: MySqlConnection,
}

impl LockConn for MariaDbConn {
    type Token = ();

    async fn acquire(&mut self, key: &str, wait: Option<Duration>) -> anyhow::Result<Option<()>> {
        let timeout_s = wait.map_or(0.0, |wait| wait.as_secs_f64());
        // 1 = granted, 0 = timed out, NULL = error (e.g. killed).
        let granted: Option<i64> = sqlx::query_scalar("SELECT GET_LOCK(?, ?)")
            .bind(key)
            .bind(timeout_s)
            .fetch_one(&mut self.conn)
            .await
            .context("GET_LOCK")?;
        match granted {
            Some(1) => Ok(Some(())),
            Some(_) => Ok(None),
            None => anyhow::bail!("GET_LOCK({key}) returned NULL"),
        }
    }

    async fn release(&mut self, key: &str, (): ()) -> anyhow::Result<()> {
        let released: Option<i64> = sqlx::query_scalar("SELECT RELEASE_LOCK(?)")
            .bind(key)
            .fetch_one(&mut self.conn)
            .await
            .context("RELEASE_LOCK")?;
        anyhow::ensure!(
            released == Some(1),
            "RELEASE_LOCK({key}) returned {released:?}"
        );
        Ok(())
    }
}
