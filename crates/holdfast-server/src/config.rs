//! Configuration: command-line flags and environment variables ([`ServeArgs`]), an optional
//! TOML file ([`FileConfig`]), and the merged result ([`ServerConfig`]), which is the single
//! source of truth the rest of the server reads.
//!
//! Precedence: flag or `HOLDFAST_*` environment variable > config file > built-in default.
//!
//! ```toml
//! listen = "127.0.0.1:7390"          # default
//! wire_listen = "127.0.0.1:7391"     # default: listen's port + 1 ("off" disables)
//! data_dir = "./holdfast-data"       # default
//! durability = "sync"                # sync | async | memory
//! restart_grace_ms = 10000
//! async_flush_ms = 100
//! allow_insecure_bind = false
//!
//! [limits]                           # every field optional; defaults shown
//! key_bytes_max = 512                # may only lower holdfast-core's limits
//! holder_bytes_max = 256
//! metadata_bytes_max = 4096
//! locks_per_request_max = 64
//! waiters_per_key_max = 10000
//! leases_per_token_max = 10000
//! request_body_bytes_max = 65536
//! command_queue_max = 10000
//! waiters_total_max = 100000         # queued requests over all keys
//! event_streams_max = 1000           # open GET /v1/events streams
//! wire_connections_max = 10000      # open wire-protocol connections
//!
//! [[tokens]]
//! name = "ops"
//! role = "admin"                     # admin | client | reader
//! sha256 = "<hex of sha256(secret)>" # never the secret itself
//! prefixes = ["clinic/"]             # optional; absent = every key
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use holdfast_core::Limits;
use holdfast_core::limits as core_limits;
use serde::Deserialize;

use crate::ServeError;

/// Default listen address.
pub const LISTEN_DEFAULT: &str = holdfast_api::DEFAULT_LISTEN;
/// Default data directory.
pub const DATA_DIR_DEFAULT: &str = "./holdfast-data";
/// Default grace added to every lease's expiry at restart, so living clients can renew.
pub const RESTART_GRACE_MS_DEFAULT: u64 = 10_000;
/// Default bound on how long an `async` commit stays unsynced.
pub const ASYNC_FLUSH_MS_DEFAULT: u64 = 100;
/// Default most leases one token may hold at once.
pub const LEASES_PER_TOKEN_MAX_DEFAULT: u64 = 10_000;
/// Default largest request body, in bytes (idempotency results get [`IDEMPOTENCY_BODY_BYTES_MAX`]).
pub const REQUEST_BODY_BYTES_MAX_DEFAULT: usize = 64 * 1024;
/// Largest body of `PUT /v1/idempotency/{key}`: a 1 MiB result plus JSON escaping slack.
pub const IDEMPOTENCY_BODY_BYTES_MAX: usize =
    2 * core_limits::IDEMPOTENCY_RESULT_BODY_BYTES_MAX + 64 * 1024;
/// Default most commands waiting for the engine; beyond it requests get `overloaded`.
pub const COMMAND_QUEUE_MAX_DEFAULT: usize = 10_000;
/// Default most queued requests over all keys together.
pub const WAITERS_TOTAL_MAX_DEFAULT: usize = 100_000;
/// Default most open `GET /v1/events` streams.
pub const EVENT_STREAMS_MAX_DEFAULT: usize = 1_000;
/// Most commands the engine host applies in one batch (one store commit).
pub const BATCH_COMMANDS_MAX: usize = 1_024;
/// Default most open wire-protocol connections.
pub const WIRE_CONNECTIONS_MAX_DEFAULT: usize = 10_000;
/// Events kept for `Last-Event-ID` resumption.
pub const EVENT_BUFFER_MAX: usize = 10_000;

/// How changes reach the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Every acknowledged change is fsynced before its reply (group commit).
    Sync,
    /// Changes are committed before the reply but fsynced in the background at most
    /// `async_flush_ms` later; a crash may lose the last interval.
    Async,
    /// Nothing is persisted.
    Memory,
}

impl Durability {
    /// `sync`, `async` or `memory`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Durability::Sync => "sync",
            Durability::Async => "async",
            Durability::Memory => "memory",
        }
    }
}

/// Arguments of `holdfast serve`. Every flag can also come from its `HOLDFAST_*` environment
/// variable or from the config file; defaults are listed in each flag's help.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ServeArgs {
    /// Address to listen on [default: 127.0.0.1:7390]. Port 0 picks a free port; the bound
    /// address is printed on stdout as `listening on http://ADDR`.
    #[arg(long, env = "HOLDFAST_LISTEN")]
    pub listen: Option<String>,
    /// Address of the wire protocol (a compact framed protocol for acquire, renew and release
    /// on one TCP connection; see docs/wire.md) [default: the --listen port + 1, i.e.
    /// 127.0.0.1:7391; port 0 when --listen has port 0]. `off` disables it. The bound address
    /// is printed on stdout as `wire protocol on ADDR`.
    #[arg(long, env = "HOLDFAST_WIRE_LISTEN")]
    pub wire_listen: Option<String>,
    /// Threads serving connections (HTTP and wire) [default: CPUs - 1, at least 1: the engine
    /// host thread, which makes every lock decision, keeps a core of its own].
    #[arg(long, env = "HOLDFAST_WORKER_THREADS")]
    pub worker_threads: Option<usize>,
    /// Directory of the embedded database [default: ./holdfast-data].
    #[arg(long, env = "HOLDFAST_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// sync: fsync before every reply (group commit); async: fsync in the background;
    /// memory: nothing persisted [default: sync].
    #[arg(long, env = "HOLDFAST_DURABILITY", value_enum)]
    pub durability: Option<Durability>,
    /// TOML config file (tokens, limits, and any of these flags).
    #[arg(long, env = "HOLDFAST_CONFIG")]
    pub config: Option<PathBuf>,
    /// Grace added to every lease's expiry at restart [default: 10000].
    #[arg(long, env = "HOLDFAST_RESTART_GRACE_MS")]
    pub restart_grace_ms: Option<u64>,
    /// Longest time an `async` commit stays unsynced [default: 100].
    #[arg(long, env = "HOLDFAST_ASYNC_FLUSH_MS")]
    pub async_flush_ms: Option<u64>,
    /// Allow listening on a non-loopback address with no tokens configured (everyone is admin).
    #[arg(long, env = "HOLDFAST_ALLOW_INSECURE_BIND")]
    pub allow_insecure_bind: bool,
    /// Most queued requests per key [default: 10000].
    #[arg(long, env = "HOLDFAST_WAITERS_PER_KEY_MAX")]
    pub waiters_per_key_max: Option<usize>,
    /// Most live leases per token [default: 10000].
    #[arg(long, env = "HOLDFAST_LEASES_PER_TOKEN_MAX")]
    pub leases_per_token_max: Option<u64>,
    /// Most locks in one request [default: 64].
    #[arg(long, env = "HOLDFAST_LOCKS_PER_REQUEST_MAX")]
    pub locks_per_request_max: Option<usize>,
    /// Longest key in bytes [default: 512].
    #[arg(long, env = "HOLDFAST_KEY_BYTES_MAX")]
    pub key_bytes_max: Option<usize>,
}

/// A token role.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything, including force release and other tokens' leases.
    Admin,
    /// Leases, locks and idempotency records on its prefixes; reads.
    Client,
    /// `GET` only (on its prefixes).
    Reader,
}

/// One `[[tokens]]` entry of the config file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Name, recorded as the owner of the leases the token creates.
    pub name: String,
    /// Role.
    pub role: Role,
    /// Hex SHA-256 digest of the secret (`printf %s SECRET | sha256sum`).
    pub sha256: String,
    /// Key prefixes the token may touch; absent = every key.
    #[serde(default)]
    pub prefixes: Option<Vec<String>>,
}

/// `[limits]` of the config file; every field optional.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// See [`ServerLimits`].
    pub key_bytes_max: Option<usize>,
    /// See [`ServerLimits`].
    pub holder_bytes_max: Option<usize>,
    /// See [`ServerLimits`].
    pub metadata_bytes_max: Option<usize>,
    /// See [`ServerLimits`].
    pub locks_per_request_max: Option<usize>,
    /// See [`ServerLimits`].
    pub waiters_per_key_max: Option<usize>,
    /// See [`ServerLimits`].
    pub leases_per_token_max: Option<u64>,
    /// See [`ServerLimits`].
    pub request_body_bytes_max: Option<usize>,
    /// See [`ServerLimits`].
    pub command_queue_max: Option<usize>,
    /// See [`ServerLimits`].
    pub waiters_total_max: Option<usize>,
    /// See [`ServerLimits`].
    pub event_streams_max: Option<usize>,
    /// See [`ServerLimits`].
    pub wire_connections_max: Option<usize>,
}

/// The TOML config file.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// See [`ServeArgs::listen`].
    pub listen: Option<String>,
    /// See [`ServeArgs::wire_listen`].
    pub wire_listen: Option<String>,
    /// See [`ServeArgs::data_dir`].
    pub data_dir: Option<PathBuf>,
    /// See [`ServeArgs::durability`].
    pub durability: Option<Durability>,
    /// See [`ServeArgs::restart_grace_ms`].
    pub restart_grace_ms: Option<u64>,
    /// See [`ServeArgs::async_flush_ms`].
    pub async_flush_ms: Option<u64>,
    /// See [`ServeArgs::allow_insecure_bind`].
    pub allow_insecure_bind: Option<bool>,
    /// Limits.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Bearer tokens. None = open mode (loopback only unless forced).
    #[serde(default)]
    pub tokens: Vec<TokenConfig>,
}

/// Limits of the server: the engine's [`Limits`] plus those only the front end knows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerLimits {
    /// Limits handed to the engine (may only be lowered from holdfast-core's constants).
    pub engine: Limits,
    /// Most live leases created by one token (not applied in open mode, where no token exists).
    pub leases_per_token_max: u64,
    /// Largest request body, bytes (idempotency completion: [`IDEMPOTENCY_BODY_BYTES_MAX`]).
    pub request_body_bytes_max: usize,
    /// Most commands waiting for the engine host before `overloaded`.
    pub command_queue_max: usize,
    /// Most queued (long-polling) requests over all keys before `overloaded`.
    pub waiters_total_max: usize,
    /// Most open event streams before `overloaded`.
    pub event_streams_max: usize,
    /// Most open wire-protocol connections (more are answered `overloaded` and closed).
    pub wire_connections_max: usize,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            engine: Limits::default(),
            leases_per_token_max: LEASES_PER_TOKEN_MAX_DEFAULT,
            request_body_bytes_max: REQUEST_BODY_BYTES_MAX_DEFAULT,
            command_queue_max: COMMAND_QUEUE_MAX_DEFAULT,
            waiters_total_max: WAITERS_TOTAL_MAX_DEFAULT,
            event_streams_max: EVENT_STREAMS_MAX_DEFAULT,
            wire_connections_max: WIRE_CONNECTIONS_MAX_DEFAULT,
        }
    }
}

/// Everything a server needs to run: the single source of truth, with the defaults of the
/// `*_DEFAULT` constants of this module.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Where to listen (`127.0.0.1:0` picks a free port).
    pub listen: String,
    /// Where the wire protocol listens; `None` = not at all.
    pub wire_listen: Option<String>,
    /// Directory of `holdfast.redb` (unused with [`Durability::Memory`]).
    pub data_dir: PathBuf,
    /// Durability mode.
    pub durability: Durability,
    /// Grace added to lease expiries at restart.
    pub restart_grace_ms: u64,
    /// Bound on unsynced time in `async` mode.
    pub async_flush_ms: u64,
    /// Allow a non-loopback listen address with no tokens.
    pub allow_insecure_bind: bool,
    /// Limits.
    pub limits: ServerLimits,
    /// Tokens; empty = open mode (everyone is admin).
    pub tokens: Vec<TokenConfig>,
    /// On a store commit failure, exit the process (true for `holdfast serve`). When false
    /// (tests), the engine host stops and every later request answers `overloaded`.
    pub exit_on_store_failure: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: LISTEN_DEFAULT.to_owned(),
            wire_listen: Some(holdfast_api::DEFAULT_WIRE_LISTEN.to_owned()),
            data_dir: PathBuf::from(DATA_DIR_DEFAULT),
            durability: Durability::Sync,
            restart_grace_ms: RESTART_GRACE_MS_DEFAULT,
            async_flush_ms: ASYNC_FLUSH_MS_DEFAULT,
            allow_insecure_bind: false,
            limits: ServerLimits::default(),
            tokens: Vec::new(),
            exit_on_store_failure: false,
        }
    }
}

impl ServerConfig {
    /// An in-memory server on `127.0.0.1:0` with default limits and no tokens (for tests).
    #[must_use]
    pub fn ephemeral_memory() -> Self {
        Self {
            listen: "127.0.0.1:0".to_owned(),
            wire_listen: Some("127.0.0.1:0".to_owned()),
            durability: Durability::Memory,
            ..Self::default()
        }
    }

    /// A `sync` server on `127.0.0.1:0` keeping its data in `data_dir` (for tests).
    #[must_use]
    pub fn ephemeral_sync(data_dir: &Path) -> Self {
        Self {
            listen: "127.0.0.1:0".to_owned(),
            wire_listen: Some("127.0.0.1:0".to_owned()),
            data_dir: data_dir.to_path_buf(),
            durability: Durability::Sync,
            ..Self::default()
        }
    }

    /// Merge flags/environment, the config file they name, and defaults.
    ///
    /// # Errors
    /// An unreadable or invalid config file, or an invalid limit.
    pub fn from_args(args: &ServeArgs) -> Result<Self, ServeError> {
        let file = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    ServeError::Config(format!("cannot read config file {}: {e}", path.display()))
                })?;
                toml::from_str::<FileConfig>(&text).map_err(|e| {
                    ServeError::Config(format!("invalid config file {}: {e}", path.display()))
                })?
            }
            None => FileConfig::default(),
        };
        let d = ServerLimits::default();
        let fl = &file.limits;
        let engine = Limits {
            key_bytes_max: args
                .key_bytes_max
                .or(fl.key_bytes_max)
                .unwrap_or(d.engine.key_bytes_max),
            holder_bytes_max: fl.holder_bytes_max.unwrap_or(d.engine.holder_bytes_max),
            metadata_bytes_max: fl.metadata_bytes_max.unwrap_or(d.engine.metadata_bytes_max),
            locks_per_request_max: args
                .locks_per_request_max
                .or(fl.locks_per_request_max)
                .unwrap_or(d.engine.locks_per_request_max),
            waiters_per_key_max: args
                .waiters_per_key_max
                .or(fl.waiters_per_key_max)
                .unwrap_or(d.engine.waiters_per_key_max),
            wait_ms_max: d.engine.wait_ms_max,
            lease_ttl_ms_max: d.engine.lease_ttl_ms_max,
        };
        let listen = args
            .listen
            .clone()
            .or(file.listen)
            .unwrap_or_else(|| LISTEN_DEFAULT.to_owned());
        let wire_listen = match args.wire_listen.clone().or(file.wire_listen) {
            Some(w) if w.eq_ignore_ascii_case("off") || w.eq_ignore_ascii_case("none") => None,
            Some(w) => Some(w),
            None => Some(wire_beside(&listen)?),
        };
        let config = Self {
            listen,
            wire_listen,
            data_dir: args
                .data_dir
                .clone()
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from(DATA_DIR_DEFAULT)),
            durability: args
                .durability
                .or(file.durability)
                .unwrap_or(Durability::Sync),
            restart_grace_ms: args
                .restart_grace_ms
                .or(file.restart_grace_ms)
                .unwrap_or(RESTART_GRACE_MS_DEFAULT),
            async_flush_ms: args
                .async_flush_ms
                .or(file.async_flush_ms)
                .unwrap_or(ASYNC_FLUSH_MS_DEFAULT),
            allow_insecure_bind: args.allow_insecure_bind
                || file.allow_insecure_bind.unwrap_or(false),
            limits: ServerLimits {
                engine,
                leases_per_token_max: args
                    .leases_per_token_max
                    .or(fl.leases_per_token_max)
                    .unwrap_or(d.leases_per_token_max),
                request_body_bytes_max: fl
                    .request_body_bytes_max
                    .unwrap_or(d.request_body_bytes_max),
                command_queue_max: fl.command_queue_max.unwrap_or(d.command_queue_max),
                waiters_total_max: fl.waiters_total_max.unwrap_or(d.waiters_total_max),
                event_streams_max: fl.event_streams_max.unwrap_or(d.event_streams_max),
                wire_connections_max: fl.wire_connections_max.unwrap_or(d.wire_connections_max),
            },
            tokens: file.tokens,
            exit_on_store_failure: true,
        };
        config.validate()?;
        Ok(config)
    }

    /// Check limits and tokens.
    ///
    /// # Errors
    /// A limit above the engine's design limit or zero, a malformed token.
    pub fn validate(&self) -> Result<(), ServeError> {
        let e = &self.limits.engine;
        let d = Limits::default();
        let checks: [(&str, u64, u64); 5] = [
            (
                "key_bytes_max",
                e.key_bytes_max as u64,
                d.key_bytes_max as u64,
            ),
            (
                "holder_bytes_max",
                e.holder_bytes_max as u64,
                d.holder_bytes_max as u64,
            ),
            (
                "metadata_bytes_max",
                e.metadata_bytes_max as u64,
                d.metadata_bytes_max as u64,
            ),
            (
                "locks_per_request_max",
                e.locks_per_request_max as u64,
                d.locks_per_request_max as u64,
            ),
            (
                "waiters_per_key_max",
                e.waiters_per_key_max as u64,
                d.waiters_per_key_max as u64,
            ),
        ];
        for (name, value, max) in checks {
            if value == 0 || value > max {
                return Err(ServeError::Config(format!(
                    "limit {name} must be 1..={max}, got {value}"
                )));
            }
        }
        if self.limits.leases_per_token_max == 0
            || self.limits.request_body_bytes_max < 1024
            || self.limits.command_queue_max == 0
            || self.limits.waiters_total_max == 0
            || self.limits.event_streams_max == 0
            || self.limits.wire_connections_max == 0
        {
            return Err(ServeError::Config(
                "limits leases_per_token_max, command_queue_max, waiters_total_max, event_streams_max and wire_connections_max must be positive, request_body_bytes_max at least 1024".to_owned(),
            ));
        }
        if self.async_flush_ms == 0 {
            return Err(ServeError::Config(
                "async_flush_ms must be positive".to_owned(),
            ));
        }
        let mut names = std::collections::BTreeSet::new();
        for token in &self.tokens {
            if token.name.is_empty() || !names.insert(token.name.as_str()) {
                return Err(ServeError::Config(format!(
                    "token names must be non-empty and unique (token {:?})",
                    token.name
                )));
            }
            let ok = hex::decode(&token.sha256)
                .map(|b| b.len() == 32)
                .unwrap_or(false);
            if !ok {
                return Err(ServeError::Config(format!(
                    "token {}: sha256 must be 64 hex digits (the SHA-256 of the secret)",
                    token.name
                )));
            }
        }
        Ok(())
    }

    /// Resolve the listen address and refuse a non-loopback one in open mode unless forced.
    ///
    /// # Errors
    /// Unresolvable address, or insecure bind.
    pub fn listen_addr(&self) -> Result<SocketAddr, ServeError> {
        self.resolve("listen", &self.listen)
    }

    /// Resolve the wire-protocol address (`None` when disabled), with the same loopback rule.
    ///
    /// # Errors
    /// Unresolvable address, or insecure bind.
    pub fn wire_addr(&self) -> Result<Option<SocketAddr>, ServeError> {
        self.wire_listen
            .as_deref()
            .map(|w| self.resolve("wire_listen", w))
            .transpose()
    }

    fn resolve(&self, what: &str, text: &str) -> Result<SocketAddr, ServeError> {
        use std::net::ToSocketAddrs;
        let addr = text
            .to_socket_addrs()
            .map_err(|e| ServeError::Config(format!("invalid {what} address {text:?}: {e}")))?
            .next()
            .ok_or_else(|| {
                ServeError::Config(format!("{what} address {text:?} resolves to nothing"))
            })?;
        if self.tokens.is_empty() && !addr.ip().is_loopback() && !self.allow_insecure_bind {
            return Err(ServeError::InsecureBind(addr));
        }
        Ok(addr)
    }
}

/// The default wire address: the HTTP listen address with its port + 1 (port 0 stays 0).
fn wire_beside(listen: &str) -> Result<String, ServeError> {
    let bad = || {
        ServeError::Config(format!(
            "cannot derive the wire-protocol address from listen address {listen:?}; set --wire-listen ADDR or --wire-listen off"
        ))
    };
    let (host, port) = listen.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    let wire_port = if port == 0 {
        0
    } else {
        port.checked_add(1).ok_or_else(bad)?
    };
    Ok(format!("{host}:{wire_port}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_flags_and_defaults_merge() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("holdfast.toml");
        std::fs::write(
            &path,
            format!(
                r#"
listen = "127.0.0.1:9999"
durability = "async"
restart_grace_ms = 5000

[limits]
waiters_per_key_max = 100
leases_per_token_max = 7

[[tokens]]
name = "ops"
role = "admin"
sha256 = "{}"

[[tokens]]
name = "clinic"
role = "client"
sha256 = "{}"
prefixes = ["clinic/"]
"#,
                crate::auth::hash_secret("a"),
                crate::auth::hash_secret("b")
            ),
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(path.clone()),
            listen: Some("127.0.0.1:0".into()),
            ..ServeArgs::default()
        };
        let c = ServerConfig::from_args(&args).unwrap();
        assert_eq!(c.listen, "127.0.0.1:0", "flag beats file");
        assert_eq!(c.durability, Durability::Async, "file beats default");
        assert_eq!(c.restart_grace_ms, 5000);
        assert_eq!(c.async_flush_ms, ASYNC_FLUSH_MS_DEFAULT);
        assert_eq!(c.data_dir, PathBuf::from(DATA_DIR_DEFAULT));
        assert_eq!(c.limits.engine.waiters_per_key_max, 100);
        assert_eq!(c.limits.leases_per_token_max, 7);
        assert_eq!(c.tokens.len(), 2);
        assert_eq!(
            c.tokens[1].prefixes.as_deref(),
            Some(&["clinic/".to_owned()][..])
        );

        let defaults = ServerConfig::from_args(&ServeArgs::default()).unwrap();
        assert_eq!(defaults.listen, "127.0.0.1:7390");
        assert_eq!(defaults.wire_listen.as_deref(), Some("127.0.0.1:7391"));
        assert_eq!(defaults.durability, Durability::Sync);
    }

    #[test]
    fn the_wire_address_follows_listen_unless_set_or_off() {
        let with = |listen: &str, wire: Option<&str>| {
            ServerConfig::from_args(&ServeArgs {
                listen: Some(listen.into()),
                wire_listen: wire.map(Into::into),
                ..ServeArgs::default()
            })
        };
        let c = with("127.0.0.1:9000", None).unwrap();
        assert_eq!(c.wire_listen.as_deref(), Some("127.0.0.1:9001"));
        let c = with("127.0.0.1:0", None).unwrap();
        assert_eq!(c.wire_listen.as_deref(), Some("127.0.0.1:0"));
        let c = with("[::1]:7390", None).unwrap();
        assert_eq!(c.wire_listen.as_deref(), Some("[::1]:7391"));
        let c = with("127.0.0.1:9000", Some("off")).unwrap();
        assert_eq!(c.wire_listen, None);
        assert_eq!(c.wire_addr().unwrap(), None);
        let c = with("127.0.0.1:9000", Some("127.0.0.1:1234")).unwrap();
        assert_eq!(c.wire_listen.as_deref(), Some("127.0.0.1:1234"));
        let err = with("127.0.0.1:65535", None).unwrap_err().to_string();
        assert!(err.contains("--wire-listen"), "{err}");
        // Open mode refuses a non-loopback wire address like the HTTP one.
        let c = with("127.0.0.1:9000", Some("0.0.0.0:9001")).unwrap();
        assert!(matches!(c.wire_addr(), Err(ServeError::InsecureBind(_))));
    }

    #[test]
    fn invalid_configs_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.toml");
        std::fs::write(
            &path,
            "[[tokens]]\nname = \"x\"\nrole = \"admin\"\nsha256 = \"plaintext\"\n",
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(path),
            ..ServeArgs::default()
        };
        assert!(
            ServerConfig::from_args(&args)
                .unwrap_err()
                .to_string()
                .contains("sha256")
        );
        let args = ServeArgs {
            key_bytes_max: Some(100_000),
            ..ServeArgs::default()
        };
        assert!(
            ServerConfig::from_args(&args).is_err(),
            "limits may only be lowered"
        );
        let c = ServerConfig {
            listen: "0.0.0.0:0".into(),
            ..ServerConfig::default()
        };
        assert!(matches!(c.listen_addr(), Err(ServeError::InsecureBind(_))));
    }
}
