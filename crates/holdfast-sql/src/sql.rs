//! Small pieces shared by the per-database implementations: the dialect, identifier checking
//! and quoting, and the clock used for expiry.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use chrono::{DateTime, Utc};

use crate::error::{Result, SqlLockError};

/// The SQL dialect of a database.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dialect {
    /// PostgreSQL.
    Postgres,
    /// MySQL or MariaDB.
    MySql,
    /// SQLite.
    Sqlite,
}

impl Dialect {
    /// The database's name, for messages.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Postgres => "PostgreSQL",
            Self::MySql => "MySQL/MariaDB",
            Self::Sqlite => "SQLite",
        }
    }

    /// The `n`-th (1-based) bind placeholder: `$n` on PostgreSQL, `?` elsewhere.
    #[must_use]
    pub fn placeholder(self, n: usize) -> String {
        match self {
            Self::Postgres => format!("${n}"),
            Self::MySql | Self::Sqlite => "?".to_owned(),
        }
    }

    /// Quote a checked identifier (optionally `schema.name`).
    ///
    /// # Errors
    /// [`SqlLockError::InvalidIdentifier`] unless every part is `[A-Za-z_][A-Za-z0-9_]*`
    /// (at most 64 characters).
    pub fn quote(self, ident: &str) -> Result<String> {
        let q = match self {
            Self::MySql => '`',
            Self::Postgres | Self::Sqlite => '"',
        };
        let mut out = String::with_capacity(ident.len() + 4);
        for (i, part) in ident.split('.').enumerate() {
            if !is_plain_identifier(part) || i > 1 {
                return Err(SqlLockError::InvalidIdentifier(ident.to_owned()));
            }
            if i > 0 {
                out.push('.');
            }
            out.push(q);
            out.push_str(part);
            out.push(q);
        }
        Ok(out)
    }
}

impl fmt::Display for Dialect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// True for `[A-Za-z_][A-Za-z0-9_]*` of at most 64 characters.
#[must_use]
pub fn is_plain_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && s.len() <= 64
}

/// Where expiry times come from: milliseconds since the Unix epoch.
///
/// Offline locks and idempotency records judge expiry by the application's clock (the servers of
/// one application should be NTP-synchronised); tests inject a [`ManualClock`].
pub trait Clock: Send + Sync + fmt::Debug {
    /// Now, in milliseconds since the Unix epoch.
    fn now_ms(&self) -> i64;
}

/// The system clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        Utc::now().timestamp_millis()
    }
}

/// A clock that only moves when told to (for tests).
#[derive(Debug, Default)]
pub struct ManualClock(AtomicI64);

impl ManualClock {
    /// A clock at `start_ms`.
    #[must_use]
    pub fn new(start_ms: i64) -> Arc<Self> {
        Arc::new(Self(AtomicI64::new(start_ms)))
    }

    /// Move the clock forward by `ms`.
    pub fn advance_ms(&self, ms: i64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// Milliseconds since the epoch as a UTC time (`None` if out of range).
#[must_use]
pub fn ms_to_datetime(ms: i64) -> Option<DateTime<Utc>> {
    DateTime::<Utc>::from_timestamp_millis(ms)
}

/// A duration in whole milliseconds, saturating.
#[must_use]
pub fn duration_ms(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(Dialect::Postgres.quote("stock").unwrap(), "\"stock\"");
        assert_eq!(Dialect::MySql.quote("app.stock").unwrap(), "`app`.`stock`");
        assert!(Dialect::Sqlite.quote("a;drop").is_err());
        assert!(Dialect::Sqlite.quote("a.b.c").is_err());
        assert!(Dialect::Sqlite.quote("1abc").is_err());
        assert!(Dialect::Sqlite.quote("").is_err());
        assert!(Dialect::Sqlite.quote("a\"b").is_err());
    }

    #[test]
    fn placeholders() {
        assert_eq!(Dialect::Postgres.placeholder(3), "$3");
        assert_eq!(Dialect::MySql.placeholder(3), "?");
    }
}

/// Rewrite `?` placeholders as `$1, $2, ...` for PostgreSQL; unchanged for the others.
/// (The statements of this crate never contain `?` inside literals.)
#[must_use]
pub fn numbered(dialect: Dialect, sql: &str) -> String {
    if dialect != Dialect::Postgres {
        return sql.to_owned();
    }
    let mut out = String::with_capacity(sql.len() + 8);
    let mut n = 0;
    for c in sql.chars() {
        if c == '?' {
            n += 1;
            out.push('$');
            out.push_str(&n.to_string());
        } else {
            out.push(c);
        }
    }
    out
}

/// A random 128-bit token, hex.
#[must_use]
pub fn random_token() -> String {
    let v: u128 = rand::random();
    format!("{v:032x}")
}

#[cfg(test)]
mod numbered_tests {
    use super::*;

    #[test]
    fn numbers_placeholders_for_postgres_only() {
        assert_eq!(
            numbered(Dialect::Postgres, "a = ? AND b = ?"),
            "a = $1 AND b = $2"
        );
        assert_eq!(numbered(Dialect::MySql, "a = ?"), "a = ?");
        assert_eq!(random_token().len(), 32);
    }
}
