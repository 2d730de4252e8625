//! The one interface every benchmarked lock service is driven through.
//!
//! A [`LockSystem`] is a running service plus how to reach it; [`LockSystem::connect`] opens one
//! client with its own connection (every benchmark client gets its own, so no system profits
//! from multiplexing that the others cannot use). A [`LockConn`] acquires and releases named
//! exclusive locks.

use std::future::Future;
use std::time::Duration;

use serde::Serialize;

/// Time-to-live given to every lock that supports one (Redis `PX`, etcd lease, holdfast lease).
/// Long enough that nothing expires during a run (W3/W4 hold locks for minutes) and that
/// holdfast-client's guards (which renew every third of the TTL) never renew during one, so
/// neither expiry nor renewal traffic enters a measurement.
pub const LOCK_TTL: Duration = Duration::from_secs(3_600);

/// Exponential backoff of a Redis client waiting for a held key: first retry after this…
pub const REDIS_BACKOFF_INITIAL: Duration = Duration::from_millis(1);
/// …doubling up to this cap.
pub const REDIS_BACKOFF_MAX: Duration = Duration::from_millis(50);

/// What an acknowledged grant survives: every table row names its system's class.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Durability {
    /// Lock state lives in memory only; a server restart forgets every lock.
    MemoryOnly,
    /// Changes are written at once and fsynced in the background at a bounded interval: a crash
    /// loses the last interval's acknowledged changes.
    AsyncFsync,
    /// Every acknowledged change is on disk before the reply, one fsync per change.
    FsyncPerChange,
    /// Every acknowledged change is on disk before the reply; concurrent changes share one fsync.
    GroupCommit,
}

impl Durability {
    /// The label used in tables.
    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Durability::MemoryOnly => "memory only",
            Durability::AsyncFsync => "async fsync",
            Durability::FsyncPerChange => "fsync per change",
            Durability::GroupCommit => "group commit",
        }
    }
}

/// A lock service under test.
pub trait LockSystem: Send + Sync + 'static {
    /// One client connection.
    type Conn: LockConn;

    /// Short name used in tables and JSON (`redis`, `postgres`, `holdfast-sync`, ...).
    fn name(&self) -> &str;

    /// What an acknowledged grant survives.
    fn durability(&self) -> Durability;

    /// Opens one client with its own connection.
    fn connect(&self) -> impl Future<Output = anyhow::Result<Self::Conn>> + Send;
}

/// One client of a [`LockSystem`], owning its connection.
pub trait LockConn: Send + 'static {
    /// Proof of a grant, needed to release it (a random owner token, a lease id, ...).
    type Token: Send + 'static;

    /// Acquires `key` exclusively. `wait: None` means no-wait (fail at once if held);
    /// `Some(d)` waits up to `d`. `Ok(None)` means not granted (held, or the wait ran out);
    /// `Err` means the system failed.
    fn acquire(
        &mut self,
        key: &str,
        wait: Option<Duration>,
    ) -> impl Future<Output = anyhow::Result<Option<Self::Token>>> + Send;

    /// Releases a grant made by [`LockConn::acquire`] on this connection.
    fn release(
        &mut self,
        key: &str,
        token: Self::Token,
    ) -> impl Future<Output = anyhow::Result<()>> + Send;

    /// Forgets a grant without releasing it and without anything releasing it later (W4
    /// kills the server under its grants). By default the token is simply dropped.
    fn abandon(token: Self::Token) {
        drop(token);
    }
}

/// A random owner token (128 bits, hex), unique per grant.
#[must_use]
pub fn random_token() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// FNV-1a 64-bit: a stable key → `bigint` mapping for PostgreSQL advisory locks (std's hasher
/// is not specified to be stable across releases).
#[must_use]
pub fn fnv1a64(key: &str) -> i64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in key.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    i64::from_ne_bytes(hash.to_ne_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_is_stable_and_spreads() {
        assert_eq!(
            fnv1a64(""),
            i64::from_ne_bytes(0xcbf2_9ce4_8422_2325_u64.to_ne_bytes())
        );
        assert_ne!(fnv1a64("a"), fnv1a64("b"));
        assert_eq!(fnv1a64("hfb/w1/0"), fnv1a64("hfb/w1/0"));
    }

    #[test]
    fn tokens_differ() {
        assert_ne!(random_token(), random_token());
        assert_eq!(random_token().len(), 32);
    }
}
