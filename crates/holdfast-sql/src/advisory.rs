//! Advisory / named locks: PostgreSQL `pg_advisory_lock` (session and transaction level, shared,
//! try) and MySQL/MariaDB `GET_LOCK` / `RELEASE_LOCK` / `IS_USED_LOCK`, behind one guard type
//! and the retry policy of holdfast-client (attempts, doubling delay with full jitter, no-wait
//! when the delay is zero).
//!
//! Names: PostgreSQL keys are 64-bit; a name becomes the first 8 bytes of its SHA-256
//! ([`pg_key`]), stable across processes, versions and platforms. MySQL/MariaDB names longer than
//! 64 characters (MySQL's limit) become their first 47 characters, `#`, and 16 hex digits of
//! their SHA-256 ([`mysql_lock_name`]); shorter names are used as they are.
//!
//! A session-level lock lives as long as the database session that took it, so the guard owns
//! that connection. [`AdvisoryGuard::check`] asks the database whether the lock is still held and
//! reports [`SqlLockError::AdvisoryLost`] if the session died or the lock was released behind the
//! guard's back; [`AdvisoryGuard::release`] reports the same if there was nothing left to
//! release. Dropping a guard without releasing closes its connection, which releases the lock
//! in the server.
//!
//! Both databases make session locks reentrant per session (a second acquisition on the same
//! session stacks and needs its own release); two guards never share a session here, so two
//! guards for one name exclude each other.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use sqlx::pool::PoolConnection;
use sqlx::{Database, MySql, MySqlConnection, PgConnection, Pool, Postgres};

use crate::error::{Result, SqlLockError};
use crate::retry::{RetryPolicy, Sleeper, make_rng, tokio_sleeper};

/// The stable 64-bit PostgreSQL advisory key of a name: the first 8 bytes of SHA-256(name),
/// big-endian, as `i64`.
#[must_use]
pub fn pg_key(name: &str) -> i64 {
    let digest = Sha256::digest(name.as_bytes());
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(bytes)
}

/// The MySQL/MariaDB lock name used for `name`: itself if at most 64 characters, else its first
/// 47 characters, `#`, and the first 16 hex digits of SHA-256(name) (64 characters in all).
#[must_use]
pub fn mysql_lock_name(name: &str) -> String {
    if name.chars().count() <= 64 {
        return name.to_owned();
    }
    let digest = Sha256::digest(name.as_bytes());
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    let prefix: String = name.chars().take(47).collect();
    format!("{prefix}#{hex}")
}

/// Lock mode of an advisory lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum AdvisoryMode {
    /// One holder at a time.
    #[default]
    Exclusive,
    /// Many shared holders, excluding exclusive ones (PostgreSQL only).
    Shared,
}

/// How [`lock`] tries.
#[derive(Clone, Debug)]
pub struct AdvisoryOptions {
    /// Attempts and delays between them; [`RetryPolicy::no_wait`] fails at once if held.
    pub retry: RetryPolicy,
    /// How long one attempt waits inside the database (PostgreSQL `lock_timeout`, MySQL
    /// `GET_LOCK` timeout); zero: a try (`pg_try_advisory_lock`, `GET_LOCK(name, 0)`).
    pub wait: Duration,
    /// Exclusive or shared.
    pub mode: AdvisoryMode,
    /// How the retry loop sleeps.
    pub sleeper: Arc<dyn Sleeper>,
    /// Seed of the jitter (tests).
    pub rng_seed: Option<u64>,
}

impl Default for AdvisoryOptions {
    /// Seed 000's policy (10 attempts from 30 s), tries without waiting in the database.
    fn default() -> Self {
        Self {
            retry: RetryPolicy::default(),
            wait: Duration::ZERO,
            mode: AdvisoryMode::Exclusive,
            sleeper: tokio_sleeper(),
            rng_seed: None,
        }
    }
}

impl AdvisoryOptions {
    /// One try, fail at once if held.
    #[must_use]
    pub fn no_wait() -> Self {
        Self {
            retry: RetryPolicy::no_wait(),
            ..Self::default()
        }
    }
    /// Builder: retry policy.
    #[must_use]
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }
    /// Builder: in-database wait per attempt.
    #[must_use]
    pub fn wait(mut self, wait: Duration) -> Self {
        self.wait = wait;
        self
    }
    /// Builder: shared mode.
    #[must_use]
    pub fn shared(mut self) -> Self {
        self.mode = AdvisoryMode::Shared;
        self
    }
}

/// A database with session-level named locks.
pub trait AdvisoryBackend: Database {
    /// The database's form of a lock name.
    type Key: Clone + Send + Sync + std::fmt::Debug;
    /// Map a name to the database's key.
    fn key_for(name: &str) -> Self::Key;
    /// One attempt; `Ok(false)` when held by someone else.
    fn try_lock<'a>(
        conn: &'a mut Self::Connection,
        key: &'a Self::Key,
        wait: Duration,
        mode: AdvisoryMode,
    ) -> impl Future<Output = Result<bool>> + Send + 'a;
    /// Who holds the key, if the database says.
    fn holder<'a>(
        conn: &'a mut Self::Connection,
        key: &'a Self::Key,
    ) -> impl Future<Output = Result<Option<String>>> + Send + 'a;
    /// Whether this session holds the key.
    fn is_held<'a>(
        conn: &'a mut Self::Connection,
        key: &'a Self::Key,
        mode: AdvisoryMode,
    ) -> impl Future<Output = Result<bool>> + Send + 'a;
    /// Release once; `Ok(false)` when this session did not hold it.
    fn unlock<'a>(
        conn: &'a mut Self::Connection,
        key: &'a Self::Key,
        mode: AdvisoryMode,
    ) -> impl Future<Output = Result<bool>> + Send + 'a;
}

fn pg_key_halves(key: i64) -> (i64, i64) {
    // pg_locks shows a bigint advisory key as classid = high 32 bits, objid = low 32 bits,
    // objsubid = 1. The casts reinterpret the bits on purpose.
    #[allow(clippy::cast_sign_loss)]
    let k = key as u64;
    #[allow(clippy::cast_possible_wrap)]
    ((k >> 32) as i64, (k & 0xffff_ffff) as i64)
}

// Written out (not `async fn`) so the `Send` bound of the trait is visible.
#[allow(clippy::manual_async_fn)]
impl AdvisoryBackend for Postgres {
    type Key = i64;

    fn key_for(name: &str) -> i64 {
        pg_key(name)
    }

    fn try_lock<'a>(
        conn: &'a mut PgConnection,
        key: &'a i64,
        wait: Duration,
        mode: AdvisoryMode,
    ) -> impl Future<Output = Result<bool>> + Send + 'a {
        async move {
            let shared = mode == AdvisoryMode::Shared;
            if wait.is_zero() {
                let sql = if shared {
                    "SELECT pg_try_advisory_lock_shared($1)"
                } else {
                    "SELECT pg_try_advisory_lock($1)"
                };
                let (ok,): (bool,) = sqlx::query_as(sql).bind(*key).fetch_one(&mut *conn).await?;
                return Ok(ok);
            }
            let (previous,): (String,) = sqlx::query_as("SELECT current_setting('lock_timeout')")
                .fetch_one(&mut *conn)
                .await?;
            let ms = wait.as_millis().max(1).to_string();
            sqlx::query("SELECT set_config('lock_timeout', $1, false)")
                .bind(ms)
                .execute(&mut *conn)
                .await?;
            let sql = if shared {
                "SELECT pg_advisory_lock_shared($1)::text"
            } else {
                "SELECT pg_advisory_lock($1)::text"
            };
            let r = sqlx::query(sql).bind(*key).execute(&mut *conn).await;
            sqlx::query("SELECT set_config('lock_timeout', $1, false)")
                .bind(previous)
                .execute(&mut *conn)
                .await?;
            match r {
                Ok(_) => Ok(true),
                Err(e)
                    if crate::classify::classify_sqlx(&e)
                        .is_some_and(crate::Conflict::is_lock_refusal) =>
                {
                    Ok(false)
                }
                Err(e) => Err(e.into()),
            }
        }
    }

    fn holder<'a>(
        conn: &'a mut PgConnection,
        key: &'a i64,
    ) -> impl Future<Output = Result<Option<String>>> + Send + 'a {
        async move {
            let (hi, lo) = pg_key_halves(*key);
            let rows: Vec<(i32, String, Option<String>)> = sqlx::query_as(
                "SELECT l.pid, l.mode, a.application_name FROM pg_locks l \
                 LEFT JOIN pg_stat_activity a ON a.pid = l.pid \
                 WHERE l.locktype = 'advisory' AND l.classid::bigint = $1 AND l.objid::bigint = $2 \
                 AND l.objsubid = 1 AND l.granted ORDER BY l.pid",
            )
            .bind(hi)
            .bind(lo)
            .fetch_all(&mut *conn)
            .await?;
            if rows.is_empty() {
                return Ok(None);
            }
            let list: Vec<String> = rows
                .into_iter()
                .map(|(pid, mode, app)| match app.filter(|a| !a.is_empty()) {
                    Some(app) => format!("backend pid {pid} ({app}, {mode})"),
                    None => format!("backend pid {pid} ({mode})"),
                })
                .collect();
            Ok(Some(list.join(", ")))
        }
    }

    fn is_held<'a>(
        conn: &'a mut PgConnection,
        key: &'a i64,
        mode: AdvisoryMode,
    ) -> impl Future<Output = Result<bool>> + Send + 'a {
        async move {
            let (hi, lo) = pg_key_halves(*key);
            let lock_mode = if mode == AdvisoryMode::Shared {
                "ShareLock"
            } else {
                "ExclusiveLock"
            };
            let (held,): (bool,) = sqlx::query_as(
                "SELECT EXISTS(SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid() \
                 AND classid::bigint = $1 AND objid::bigint = $2 AND objsubid = 1 AND mode = $3 AND granted)",
            )
            .bind(hi)
            .bind(lo)
            .bind(lock_mode)
            .fetch_one(&mut *conn)
            .await?;
            Ok(held)
        }
    }

    fn unlock<'a>(
        conn: &'a mut PgConnection,
        key: &'a i64,
        mode: AdvisoryMode,
    ) -> impl Future<Output = Result<bool>> + Send + 'a {
        async move {
            let sql = if mode == AdvisoryMode::Shared {
                "SELECT pg_advisory_unlock_shared($1)"
            } else {
                "SELECT pg_advisory_unlock($1)"
            };
            // An unlock of a lock not held is a WARNING and `false`, not an error.
            let (ok,): (bool,) = sqlx::query_as(sql).bind(*key).fetch_one(&mut *conn).await?;
            Ok(ok)
        }
    }
}

// Written out (not `async fn`) so the `Send` bound of the trait is visible.
#[allow(clippy::manual_async_fn)]
impl AdvisoryBackend for MySql {
    type Key = String;

    fn key_for(name: &str) -> String {
        mysql_lock_name(name)
    }

    fn try_lock<'a>(
        conn: &'a mut MySqlConnection,
        key: &'a String,
        wait: Duration,
        mode: AdvisoryMode,
    ) -> impl Future<Output = Result<bool>> + Send + 'a {
        async move {
            if mode == AdvisoryMode::Shared {
                return Err(SqlLockError::Unsupported {
                    feature: "shared advisory locks",
                    database: "MySQL/MariaDB",
                    why: "GET_LOCK has no shared mode; use PostgreSQL or an exclusive lock",
                });
            }
            // 1: acquired; 0: timed out (held elsewhere); NULL: an error (e.g. killed).
            let (r,): (Option<i64>,) = sqlx::query_as("SELECT CAST(GET_LOCK(?, ?) AS SIGNED)")
                .bind(key)
                .bind(wait.as_secs_f64())
                .fetch_one(&mut *conn)
                .await?;
            Ok(r == Some(1))
        }
    }

    fn holder<'a>(
        conn: &'a mut MySqlConnection,
        key: &'a String,
    ) -> impl Future<Output = Result<Option<String>>> + Send + 'a {
        async move {
            let (id,): (Option<i64>,) = sqlx::query_as("SELECT CAST(IS_USED_LOCK(?) AS SIGNED)")
                .bind(key)
                .fetch_one(&mut *conn)
                .await?;
            let Some(id) = id else { return Ok(None) };
            let who: Option<(String, String)> = sqlx::query_as(
                "SELECT CAST(USER AS CHAR), CAST(HOST AS CHAR) FROM information_schema.PROCESSLIST WHERE ID = ?",
            )
            .bind(id)
            .fetch_optional(&mut *conn)
            .await
            .unwrap_or(None);
            Ok(Some(match who {
                Some((user, host)) => format!("connection {id} ({user}@{host})"),
                None => format!("connection {id}"),
            }))
        }
    }

    fn is_held<'a>(
        conn: &'a mut MySqlConnection,
        key: &'a String,
        _mode: AdvisoryMode,
    ) -> impl Future<Output = Result<bool>> + Send + 'a {
        async move {
            let (held,): (Option<i64>,) =
                sqlx::query_as("SELECT CAST(IS_USED_LOCK(?) = CONNECTION_ID() AS SIGNED)")
                    .bind(key)
                    .fetch_one(&mut *conn)
                    .await?;
            Ok(held == Some(1))
        }
    }

    fn unlock<'a>(
        conn: &'a mut MySqlConnection,
        key: &'a String,
        _mode: AdvisoryMode,
    ) -> impl Future<Output = Result<bool>> + Send + 'a {
        async move {
            // 1: released; 0: held by another session; NULL: not held by anyone.
            let (r,): (Option<i64>,) = sqlx::query_as("SELECT CAST(RELEASE_LOCK(?) AS SIGNED)")
                .bind(key)
                .fetch_one(&mut *conn)
                .await?;
            Ok(r == Some(1))
        }
    }
}

/// A held session-level advisory lock. It owns the connection that holds the lock; use
/// [`AdvisoryGuard::connection`] to work on that session. Release with
/// [`AdvisoryGuard::release`]; dropping the guard closes the connection, which releases the lock.
#[derive(Debug)]
pub struct AdvisoryGuard<DB: AdvisoryBackend> {
    conn: Option<PoolConnection<DB>>,
    name: String,
    key: DB::Key,
    mode: AdvisoryMode,
    attempts: u32,
}

impl<DB: AdvisoryBackend> AdvisoryGuard<DB> {
    /// The name the lock was taken under.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The database key (PostgreSQL `i64`, MySQL name).
    #[must_use]
    pub fn key(&self) -> &DB::Key {
        &self.key
    }

    /// Attempts it took to acquire.
    #[must_use]
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// The session holding the lock (for work that must happen under it on the same session).
    ///
    /// # Errors
    /// [`SqlLockError::AdvisoryLost`] if the guard no longer has a connection.
    pub fn connection(&mut self) -> Result<&mut DB::Connection> {
        let lost = self.lost();
        match self.conn.as_mut() {
            Some(c) => Ok(&mut **c),
            None => Err(lost),
        }
    }

    fn lost(&self) -> SqlLockError {
        SqlLockError::AdvisoryLost {
            key: self.name.clone(),
        }
    }

    /// Ask the database whether this session still holds the lock.
    ///
    /// # Errors
    /// [`SqlLockError::AdvisoryLost`] if it does not, or the session is gone.
    pub async fn check(&mut self) -> Result<()> {
        let lost = self.lost();
        let Some(conn) = self.conn.as_mut() else {
            return Err(lost);
        };
        match DB::is_held(&mut **conn, &self.key, self.mode).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(lost),
            Err(e) => {
                tracing::warn!(key = %self.name, error = %e, "advisory lock session failed; lock lost");
                if let Some(c) = self.conn.as_mut() {
                    c.close_on_drop();
                }
                self.conn = None;
                Err(lost)
            }
        }
    }

    /// Release the lock and return the connection to the pool.
    ///
    /// # Errors
    /// [`SqlLockError::AdvisoryLost`] if the lock was no longer held by this session (it was
    /// lost with its connection, or released elsewhere).
    pub async fn release(mut self) -> Result<()> {
        let lost = self.lost();
        let Some(mut conn) = self.conn.take() else {
            return Err(lost);
        };
        match DB::unlock(&mut *conn, &self.key, self.mode).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(lost),
            Err(e) => {
                tracing::warn!(key = %self.name, error = %e, "advisory unlock failed; lock lost");
                conn.close_on_drop();
                Err(lost)
            }
        }
    }
}

impl<DB: AdvisoryBackend> Drop for AdvisoryGuard<DB> {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.as_mut() {
            // Closing the session releases its locks in the server; a pooled session would
            // keep holding them.
            conn.close_on_drop();
        }
    }
}

/// Acquire the session-level advisory lock `name` on a connection from `pool`, retrying as
/// `opts` says.
///
/// # Errors
/// [`SqlLockError::AdvisoryHeld`] (naming the holder when the database tells) when the retry
/// policy gave up, or a database error.
pub async fn lock<DB: AdvisoryBackend>(
    pool: &Pool<DB>,
    name: &str,
    opts: &AdvisoryOptions,
) -> Result<AdvisoryGuard<DB>> {
    let key = DB::key_for(name);
    let mut conn = pool.acquire().await?;
    let start = tokio::time::Instant::now();
    let mut rng = make_rng(opts.rng_seed);
    let attempts = opts.retry.effective_attempts();
    let mut n = 0;
    loop {
        n += 1;
        if DB::try_lock(&mut conn, &key, opts.wait, opts.mode).await? {
            return Ok(AdvisoryGuard {
                conn: Some(conn),
                name: name.to_owned(),
                key,
                mode: opts.mode,
                attempts: n,
            });
        }
        let elapsed = start.elapsed();
        let delay = opts.retry.delay(n - 1, &mut rng);
        let out_of_time = opts
            .retry
            .max_total
            .is_some_and(|max| elapsed + delay > max);
        if n >= attempts || out_of_time {
            let holder = DB::holder(&mut conn, &key).await.unwrap_or(None);
            return Err(SqlLockError::AdvisoryHeld {
                key: name.to_owned(),
                holder,
                attempts: n,
                waited: elapsed,
            });
        }
        tracing::info!(
            key = name,
            attempt = n,
            attempts,
            ?delay,
            "advisory lock held; retrying"
        );
        opts.sleeper.sleep(delay).await;
    }
}

/// Who holds the advisory lock `name` right now (`None`: nobody).
///
/// # Errors
/// A database error.
pub async fn holder<DB: AdvisoryBackend>(pool: &Pool<DB>, name: &str) -> Result<Option<String>> {
    let mut conn = pool.acquire().await?;
    DB::holder(&mut conn, &DB::key_for(name)).await
}

/// PostgreSQL transaction-level advisory lock: wait for it; released at commit or rollback.
///
/// # Errors
/// A database error (a deadlock among advisory waiters is 40P01, retried by
/// [`crate::transaction::transaction`]).
pub async fn pg_xact_lock(conn: &mut PgConnection, name: &str, mode: AdvisoryMode) -> Result<()> {
    let sql = if mode == AdvisoryMode::Shared {
        "SELECT pg_advisory_xact_lock_shared($1)::text"
    } else {
        "SELECT pg_advisory_xact_lock($1)::text"
    };
    sqlx::query(sql).bind(pg_key(name)).execute(conn).await?;
    Ok(())
}

/// PostgreSQL transaction-level advisory lock, without waiting: `Ok(false)` if held elsewhere.
///
/// # Errors
/// A database error.
pub async fn pg_try_xact_lock(
    conn: &mut PgConnection,
    name: &str,
    mode: AdvisoryMode,
) -> Result<bool> {
    let sql = if mode == AdvisoryMode::Shared {
        "SELECT pg_try_advisory_xact_lock_shared($1)"
    } else {
        "SELECT pg_try_advisory_xact_lock($1)"
    };
    let (ok,): (bool,) = sqlx::query_as(sql)
        .bind(pg_key(name))
        .fetch_one(conn)
        .await?;
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pg_keys_are_stable() {
        // SHA-256("vocab_import/RXNORM")[..8], pinned so the mapping never changes silently.
        assert_eq!(pg_key("a"), pg_key("a"));
        assert_ne!(pg_key("a"), pg_key("b"));
        assert_eq!(
            pg_key(""),
            i64::from_be_bytes([0xe3, 0xb0, 0xc4, 0x42, 0x98, 0xfc, 0x1c, 0x14])
        );
    }

    #[test]
    fn long_mysql_names_are_hashed_to_64_chars() {
        assert_eq!(mysql_lock_name("short"), "short");
        let exact: String = "x".repeat(64);
        assert_eq!(mysql_lock_name(&exact), exact);
        let long = format!("{}{}", "y".repeat(60), "-tail-1");
        let other = format!("{}{}", "y".repeat(60), "-tail-2");
        let (a, b) = (mysql_lock_name(&long), mysql_lock_name(&other));
        assert_eq!(a.chars().count(), 64);
        assert_ne!(a, b);
        assert!(a.starts_with(&"y".repeat(47)));
        let wide = "é".repeat(70);
        assert_eq!(mysql_lock_name(&wide).chars().count(), 64);
    }

    #[test]
    fn key_halves() {
        assert_eq!(pg_key_halves(-1), (0xffff_ffff, 0xffff_ffff));
        assert_eq!(pg_key_halves(0x0000_0001_0000_0002), (1, 2));
    }
}
