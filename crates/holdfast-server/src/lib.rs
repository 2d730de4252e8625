//! # holdfast-server: the lock service
//!
//! The [`holdfast_core::Engine`] behind an HTTP/JSON API (`/v1`, described by
//! `/v1/openapi.json`), with durable storage in an embedded redb database, long-poll waits,
//! a resumable event stream (SSE), Prometheus metrics and bearer-token auth. `holdfast serve`
//! runs it through [`serve_blocking`]; tests and benchmarks run it in-process with [`start`].
//!
//! ## What it guarantees
//! - **A grant (and every other change) is acknowledged only after the commit containing it is
//!   durable** (`sync` mode). Concurrent requests share one commit and one fsync (group
//!   commit): the engine host applies a batch of commands, commits their changes once, and
//!   only then answers them.
//! - After a crash and restart on the same data directory, every acknowledged grant, renewal,
//!   release and idempotency result is present; leases keep their expiry extended by a grace
//!   period; fencing tokens keep increasing. Unacknowledged state may be absent, never
//!   half-applied (one redb transaction per batch).
//! - A corrupt or unreadable data directory stops startup with a message naming what is
//!   wrong; it is never reset. A store failure while running is fail-stop.
//! - A waiter whose client disconnects leaves the queue; a grant that cannot be delivered is
//!   released at once.
//! - Every error is a JSON [`holdfast_api::ErrorBody`] with a stable code; a `5xx` other than
//!   `503 overloaded` is a bug (panics are caught and answered `500 internal`).
//!
//! ## What it must not do
//! It contains no lock logic (that is holdfast-core's), and nothing but the engine host thread
//! touches the engine or the store.
//!
//! ## Code map
//! - [`config`]: flags, environment, config file, defaults; [`ServerConfig`] is the single
//!   source of truth.
//! - [`store`]: the redb tables and the one-transaction-per-batch commit.
//! - [`actor`]: the engine host thread (batching, group commit, replies after commit).
//! - [`http`]: the router and one module per API area; [`error`]: the one mapping of engine
//!   refusals to codes; [`auth`]: tokens and rules; [`events`]: the SSE buffer;
//!   [`metrics`]: Prometheus and percentiles.

pub mod actor;
pub mod auth;
pub mod clock;
pub mod config;
pub mod convert;
pub mod error;
pub mod events;
pub mod http;
pub mod memory;
pub mod metrics;
pub mod store;
pub mod wal;
pub mod wire;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use holdfast_core::Engine;
use tokio::sync::watch;

pub use actor::ServerCounters;
pub use config::{Durability, ServeArgs, ServerConfig};

use crate::actor::{EngineHandle, HostParts};
use crate::auth::Authenticator;
use crate::clock::Clock;
use crate::events::EventHub;
use crate::http::AppState;
use crate::store::Store;

/// Errors that stop the server from starting.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Invalid configuration.
    #[error("configuration: {0}")]
    Config(String),
    /// Open mode on a non-loopback address without `--allow-insecure-bind`.
    #[error(
        "refusing to listen on {0} with no tokens configured: anyone who can reach it could take and release locks. \
         Configure [[tokens]] in the --config file, listen on 127.0.0.1, or pass --allow-insecure-bind"
    )]
    InsecureBind(SocketAddr),
    /// The listen socket could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The data directory could not be opened or read.
    #[error("data directory {dir}: {source}")]
    Store {
        /// The directory.
        dir: std::path::PathBuf,
        /// Why.
        source: store::StoreError,
    },
    /// The stored state is inconsistent.
    #[error(
        "data directory {dir}: {source}; refusing to start (the data is not reset automatically)"
    )]
    Restore {
        /// The directory.
        dir: std::path::PathBuf,
        /// Why.
        source: holdfast_core::RestoreError,
    },
    /// Runtime or thread setup failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// A server running in this process (see [`start`]).
pub struct RunningServer {
    /// The bound address (the real port when the config asked for port 0).
    pub addr: SocketAddr,
    /// The bound wire-protocol address, if enabled.
    pub wire_addr: Option<SocketAddr>,
    counters: Arc<ServerCounters>,
    state: Arc<AppState>,
    shutdown_tx: watch::Sender<bool>,
    server_task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    wire_task: Option<tokio::task::JoinHandle<()>>,
    host_thread: Option<std::thread::JoinHandle<()>>,
    engine: EngineHandle,
}

impl std::fmt::Debug for RunningServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningServer")
            .field("addr", &self.addr)
            .field("wire_addr", &self.wire_addr)
            .finish_non_exhaustive()
    }
}

impl RunningServer {
    /// `http://ADDR`.
    #[must_use]
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Store commits and fsyncs so far (group commit shows as fewer fsyncs than requests).
    #[must_use]
    pub fn counters(&self) -> &ServerCounters {
        &self.counters
    }

    fn signal_stop(&self) {
        self.state.ready.store(false, Ordering::SeqCst);
        let _ = self.shutdown_tx.send(true);
        // Queued waiters are answered `overloaded` and the last batch is committed.
        self.engine.shutdown();
    }

    /// Stop gracefully: end event streams, answer queued waiters, finish in-flight requests
    /// (at most 10 s), commit and close the store.
    pub async fn shutdown(mut self) {
        self.signal_stop();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        if let Some(task) = self.server_task.take() {
            let abort = task.abort_handle();
            if tokio::time::timeout_at(deadline, task).await.is_err() {
                abort.abort();
            }
        }
        if let Some(task) = self.wire_task.take() {
            let abort = task.abort_handle();
            if tokio::time::timeout_at(deadline, task).await.is_err() {
                abort.abort();
            }
        }
        if let Some(thread) = self.host_thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        if self.host_thread.is_some() {
            self.state.ready.store(false, Ordering::SeqCst);
            let _ = self.shutdown_tx.send(true);
            self.engine.shutdown();
        }
    }
}

/// Start a server in this process: open and recover the store, start the engine host, bind
/// `config.listen` (port 0 picks a free port: read [`RunningServer::addr`]) and serve until
/// [`RunningServer::shutdown`]. Must be called within a multi-threaded tokio runtime.
///
/// # Errors
/// Invalid config, insecure bind, unusable data directory, bind failure.
pub async fn start(config: ServerConfig) -> Result<RunningServer, ServeError> {
    config.validate()?;
    let addr = config.listen_addr()?;
    let _ = metrics::prometheus();
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })?;
    let addr = listener.local_addr()?;
    let wire_listener = match config.wire_addr()? {
        Some(wire_addr) => Some(tokio::net::TcpListener::bind(wire_addr).await.map_err(
            |source| ServeError::Bind {
                addr: wire_addr,
                source,
            },
        )?),
        None => None,
    };
    let wire_addr = wire_listener
        .as_ref()
        .map(tokio::net::TcpListener::local_addr)
        .transpose()?;

    let clock = Clock::new();
    let recovery_started = Instant::now();
    let (engine, store, state_summary) = open_engine(&config, &clock).await?;
    let recovery_ms = recovery_started.elapsed().as_millis();

    let hub = Arc::new(EventHub::new(
        config::EVENT_BUFFER_MAX,
        state_summary.event_seq_next,
    ));
    let counters = Arc::new(ServerCounters::default());
    let (engine_handle, host_thread) = actor::spawn(HostParts {
        engine,
        store,
        durability: config.durability,
        async_flush_ms: config.async_flush_ms,
        clock,
        hub: Arc::clone(&hub),
        counters: Arc::clone(&counters),
        exit_on_store_failure: config.exit_on_store_failure,
        queue_max: config.limits.command_queue_max,
        leases_per_token_max: config.limits.leases_per_token_max,
        waiters_total_max: config.limits.waiters_total_max,
    })?;

    let auth = Authenticator::new(&config.tokens);
    let auth_mode = if auth.is_open() {
        "open (no tokens: every caller is admin; loopback only unless --allow-insecure-bind)"
            .to_owned()
    } else {
        format!("bearer tokens ({} configured)", config.tokens.len())
    };
    if auth.is_open() && !addr.ip().is_loopback() {
        tracing::warn!(%addr, "listening on a non-loopback address with NO authentication (--allow-insecure-bind)");
    }
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let state = Arc::new(AppState {
        engine: engine_handle.clone(),
        auth,
        hub,
        config: config.clone(),
        shutdown: shutdown_rx.clone(),
        ready: AtomicBool::new(false),
        event_streams: std::sync::atomic::AtomicUsize::new(0),
    });
    let app = http::router(Arc::clone(&state));
    let wire_task = wire_listener.map(|listener| {
        tokio::spawn(wire::serve(
            listener,
            Arc::clone(&state),
            shutdown_rx.clone(),
        ))
    });
    tokio::spawn(metrics::upkeep(shutdown_rx.clone()));
    let mut stop = shutdown_rx;
    let server_task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stop.wait_for(|v| *v).await;
            })
            .await
    });
    state.ready.store(true, Ordering::SeqCst);
    tracing::info!(
        listen = %addr,
        wire = %wire_addr.map_or_else(|| "off".to_owned(), |a| a.to_string()),
        durability = config.durability.as_str(),
        data_dir = %config.data_dir.display(),
        auth = %auth_mode,
        recovered_leases = state_summary.leases,
        recovered_idempotency_records = state_summary.idempotency,
        recovery_ms = u64::try_from(recovery_ms).unwrap_or(u64::MAX),
        "holdfast server started"
    );
    Ok(RunningServer {
        addr,
        wire_addr,
        wire_task,
        counters,
        state,
        shutdown_tx,
        server_task: Some(server_task),
        host_thread: Some(host_thread),
        engine: engine_handle,
    })
}

struct Summary {
    leases: usize,
    idempotency: usize,
    event_seq_next: u64,
}

async fn open_engine(
    config: &ServerConfig,
    clock: &Clock,
) -> Result<(Engine, Option<Store>, Summary), ServeError> {
    let limits = config.limits.engine.clone();
    if config.durability == Durability::Memory {
        return Ok((
            Engine::new(limits),
            None,
            Summary {
                leases: 0,
                idempotency: 0,
                event_seq_next: 1,
            },
        ));
    }
    let dir = config.data_dir.clone();
    let durability = config.durability;
    let grace = config.restart_grace_ms;
    let clock = *clock;
    // redb is synchronous: open and read on a blocking thread.
    tokio::task::spawn_blocking(move || {
        let store_err = |source| ServeError::Store {
            dir: dir.clone(),
            source,
        };
        let mut store = Store::open(&dir, durability).map_err(store_err)?;
        let restore_err = |source| ServeError::Restore {
            dir: dir.clone(),
            source,
        };
        // Each lease record goes into the engine as it is read: the records are never all
        // in memory at once beside the engine's own state.
        let now = clock.now_ms();
        let mut leases = 0usize;
        let (restorer, rest) = store
            .load_with(
                |h| {
                    holdfast_core::Restorer::new(
                        limits,
                        h.fencing_next,
                        h.event_seq_next,
                        now,
                        grace,
                        h.leases,
                    )
                },
                |r, record| {
                    leases += 1;
                    r.add_lease(record)
                },
            )
            .map_err(store_err)?
            .map_err(restore_err)?;
        let summary = Summary {
            leases,
            idempotency: rest.idempotency.len(),
            event_seq_next: rest.event_seq_next,
        };
        let engine = restorer
            .finish(rest.idempotency, rest.lock_delays)
            .map_err(restore_err)?;
        // The segments read and the records decoded are freed: give their pages back.
        memory::release_free_memory();
        Ok((engine, Some(store), summary))
    })
    .await
    .map_err(|e| ServeError::Io(std::io::Error::other(e)))?
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("HOLDFAST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// Run `holdfast serve`: build a runtime, start the server, print `listening on http://ADDR`
/// as the first line on stdout, and serve until SIGTERM or ctrl-c, then shut down gracefully.
///
/// # Errors
/// Anything that stops the server from starting (see [`ServeError`]).
pub fn serve_blocking(args: ServeArgs) -> Result<(), ServeError> {
    init_tracing();
    let config = ServerConfig::from_args(&args)?;
    let workers = match args.worker_threads {
        Some(0) => {
            return Err(ServeError::Config(
                "--worker-threads must be at least 1".to_owned(),
            ));
        }
        Some(n) => n,
        None => default_worker_threads(config.durability),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let server = start(config).await?;
        {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "listening on http://{}", server.addr);
            if let Some(wire) = server.wire_addr {
                let _ = writeln!(out, "wire protocol on {wire}");
            }
            let _ = out.flush();
        }
        wait_for_signal().await;
        tracing::info!("shutting down");
        server.shutdown().await;
        Ok(())
    })
}

/// With a store, one thread fewer than the CPUs, at least one: the engine host thread, through
/// which every request passes, keeps a core of its own (on a 2-CPU machine a second connection
/// thread only added cross-thread wake-ups: W1 served ~20 % more pairs/s with one). In memory
/// mode the connection threads apply lease commands themselves (`actor.rs`), so they get every
/// CPU.
fn default_worker_threads(durability: Durability) -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    match durability {
        Durability::Memory => cpus,
        Durability::Sync | Durability::Async => cpus.saturating_sub(1).max(1),
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
