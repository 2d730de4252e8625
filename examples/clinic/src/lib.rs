//! # clinic: the seed scenarios of holdfast, reproduced with holdfast
//!
//! A small clinic service (axum over sqlx; SQLite by default, PostgreSQL or MariaDB when
//! configured) in which every concurrency problem of the seeds is solved with holdfast:
//!
//! | scenario | seed | protection | module |
//! |---|---|---|---|
//! | appointment booking, no double booking | 001 | row locks in a fixed order in a retried transaction (holdfast-sql) | [`appointments`] |
//! | status transitions by role | 001 | row lock on the appointment, transition table | [`appointments`] |
//! | one prescription / one rating per appointment | 001 | row lock on the appointment | [`appointments`] |
//! | editing a patient record over several requests | 002 | offline lock table (holdfast-sql), 412 for another holder | [`patients`] |
//! | vocabulary import per code type | 000 | holdfast lock `clinic/vocab_import/{TYPE}` with wait / no-wait (or a database named lock) | [`vocab`] |
//! | schedule swap and its rollback, exactly once | 003 | holdfast idempotency records + multi-key lock + fencing tokens | [`swaps`] |
//! | FIFO stock consumption | 004 | `FOR UPDATE NOWAIT` on the layers, retried (holdfast-sql) | [`stock`] |
//!
//! ## What it guarantees
//! With [`Locking::On`] (the only mode the binary runs): no two active appointments of a doctor
//! share a slot; a status changes only along the transition table; an appointment has at most
//! one prescription and one rating; one editor at a time per patient record; one import at a
//! time per code type; a swap request executes once per idempotency key and a swap is rolled
//! back at most once; no FIFO layer's remaining quantity goes negative.
//!
//! [`Locking::Off`] exists for the control tests only: it runs the same code without the
//! protection, so each test can show the anomaly the protection prevents. [`Hooks`] let a test
//! pause requests between their read and their write to make those races deterministic.
//!
//! ## What it must not do
//! No lock logic of its own: database locking is holdfast-sql's, service locking and
//! idempotency are the holdfast server's (through holdfast-client).

#![warn(missing_docs)]

pub mod appointments;
pub mod db;
pub mod error;
pub mod patients;
pub mod stock;
pub mod swaps;
pub mod vocab;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::{delete, get, post};
use futures::future::BoxFuture;
use holdfast_client::Client;

pub use db::{Db, Store};
pub use error::AppError;

/// Whether the protections are on. The binary always runs [`Locking::On`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Locking {
    /// Every scenario is protected.
    #[default]
    On,
    /// Control mode for tests: the same reads and writes with no locks, no transactions and no
    /// idempotency. Never use it for real data.
    Off,
}

/// A point in a request where a test hook runs (between a read and the write that depends on
/// it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HookPoint {
    /// Booking: the slot was checked and found free.
    BookingChecked,
    /// Status change: the current status was read.
    StatusRead,
    /// Prescription: checked that none exists.
    PrescriptionChecked,
    /// Rating: checked that none exists.
    RatingChecked,
    /// Vocabulary import: started (under the lock, if on).
    VocabStarted,
    /// Vocabulary import: the old codes were deleted.
    VocabCleared,
    /// Vocabulary import: finished (still under the lock, if on).
    VocabFinished,
    /// Swap: the assignments were read.
    SwapRead,
    /// Swap rollback: the swap's status was read.
    RollbackRead,
    /// Sale: the FIFO layers were read.
    StockRead,
}

/// A test hook: called with the point and a subject (the code type, the appointment id, …).
pub type HookFn = Arc<dyn Fn(HookPoint, String) -> BoxFuture<'static, ()> + Send + Sync>;

/// Test hooks (none in production).
#[derive(Clone, Default)]
pub struct Hooks(Option<HookFn>);

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Hooks(set)"
        } else {
            "Hooks(none)"
        })
    }
}

impl Hooks {
    /// Hooks calling `f`.
    #[must_use]
    pub fn new(f: HookFn) -> Self {
        Self(Some(f))
    }

    /// Run the hook of `point`, if any.
    pub async fn at(&self, point: HookPoint, subject: impl std::fmt::Display) {
        if let Some(f) = &self.0 {
            f(point, subject.to_string()).await;
        }
    }
}

/// Where the vocabulary import's per-code-type lock lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ImportLock {
    /// The holdfast server (`clinic/vocab_import/{TYPE}`): lease with renewal, fencing token,
    /// visible in `holdfast locks`, freed when the lease expires.
    #[default]
    Service,
    /// The database's named locks through holdfast-sql (PostgreSQL advisory locks, MariaDB
    /// `GET_LOCK` — the seed's own mechanism): freed when the session ends. Not on SQLite.
    Database,
}

/// Tunables, with the defaults of [`Config::default`].
#[derive(Clone, Debug)]
pub struct Config {
    /// Retry policy of protected database transactions (deadlocks, serialization failures,
    /// NOWAIT refusals): 50 attempts from 5 ms doubling to at most 200 ms, 30 s in all.
    pub tx_retry: holdfast_sql::retry::RetryPolicy,
    /// Seed 004's `lock_strategy`: `true` locks FIFO layers with NOWAIT and retries the
    /// transaction, `false` waits for the lock.
    pub stock_nowait: bool,
    /// Seed 002: how long an offline lock on a patient record lasts unless released [15 min].
    pub record_lock_ttl: Duration,
    /// Seed 000: how long an import waits for another import of its code type [60 s].
    pub import_wait: Duration,
    /// Where the import lock lives [the holdfast server].
    pub import_lock: ImportLock,
    /// TTL of the import lock's lease, renewed while the import runs [30 s].
    pub lock_ttl: Duration,
    /// Seed 003: how long a duplicate swap request waits for its running twin [30 s].
    pub idempotency_wait: Duration,
    /// How long a swap waits for the assignments' locks [10 s].
    pub swap_lock_wait: Duration,
    /// This instance's name in lock holders (`clinic@host`).
    pub instance: String,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            tx_retry: holdfast_sql::retry::RetryPolicy {
                attempts: 50,
                initial_delay: Duration::from_millis(5),
                multiplier: 2.0,
                max_delay: Duration::from_millis(200),
                max_total: Some(Duration::from_secs(30)),
                jitter: holdfast_sql::retry::Jitter::Full,
            },
            stock_nowait: true,
            record_lock_ttl: Duration::from_secs(15 * 60),
            import_wait: Duration::from_secs(60),
            import_lock: ImportLock::Service,
            lock_ttl: Duration::from_secs(30),
            idempotency_wait: Duration::from_secs(30),
            swap_lock_wait: Duration::from_secs(10),
            instance: format!("clinic/{}", holdfast_client::default_holder()),
        }
    }
}

/// Everything a request handler needs.
#[derive(Debug)]
pub struct AppState {
    /// The database.
    pub store: Store,
    /// The lock service (seed 000 and 003 scenarios need it; the others do not).
    pub holdfast: Option<Client>,
    /// Tunables.
    pub config: Config,
    /// Protections on (always, outside control tests) or off.
    pub locking: Locking,
    /// Test hooks.
    pub hooks: Hooks,
    /// Counters of the protected transactions (attempts, retries, deadlocks, NOWAIT refusals),
    /// served at `GET /stats`.
    pub tx_metrics: Arc<holdfast_sql::transaction::TxMetrics>,
}

impl AppState {
    /// State with protections on and no hooks.
    #[must_use]
    pub fn new(store: Store, holdfast: Option<Client>, config: Config) -> Self {
        Self {
            store,
            holdfast,
            config,
            locking: Locking::On,
            hooks: Hooks::default(),
            tx_metrics: holdfast_sql::transaction::TxMetrics::new(),
        }
    }

    /// The lock service client, or [`AppError::LockServiceUnavailable`].
    ///
    /// # Errors
    /// When no holdfast URL is configured.
    pub fn lock_service(&self) -> Result<&Client, AppError> {
        self.holdfast.as_ref().ok_or_else(|| {
            AppError::LockServiceUnavailable("no holdfast server configured".to_owned())
        })
    }
}

/// Shared state of the router.
pub type SharedState = Arc<AppState>;

/// Create the clinic's tables (idempotent).
///
/// # Errors
/// A database error.
pub async fn migrate(store: &Store) -> Result<(), AppError> {
    db::migrate(store).await.map_err(AppError::from)
}

/// The HTTP API (see the README for every route and its statuses).
pub fn router(state: SharedState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/stats", get(stats))
        .route("/doctors", post(appointments::create_doctor))
        .route("/patients", post(patients::create_patient))
        .route(
            "/patients/{id}",
            get(patients::get_patient).put(patients::update_patient),
        )
        .route(
            "/patients/{id}/lock",
            post(patients::lock_patient).delete(patients::unlock_patient),
        )
        .route("/record-locks", get(patients::list_locks))
        .route(
            "/admin/patients/{id}/lock",
            delete(patients::force_unlock_patient),
        )
        .route("/appointments", post(appointments::book))
        .route("/appointments/{id}", get(appointments::get_appointment))
        .route(
            "/appointments/{id}/status",
            post(appointments::change_status),
        )
        .route(
            "/appointments/{id}/prescription",
            post(appointments::prescribe),
        )
        .route("/appointments/{id}/rating", post(appointments::rate))
        .route("/vocabulary/{code_type}/imports", post(vocab::import))
        .route("/vocabulary/{code_type}", get(vocab::codes))
        .route("/assignments", post(swaps::create_assignment))
        .route("/assignments/{id}", get(swaps::get_assignment))
        .route("/swaps", post(swaps::execute))
        .route("/swaps/{id}", get(swaps::get_swap))
        .route("/swaps/{id}/rollback", post(swaps::rollback))
        .route("/products", post(stock::create_product))
        .route("/products/{id}/receipts", post(stock::receive))
        .route("/products/{id}/sales", post(stock::sell))
        .route("/products/{id}/layers", get(stock::layers))
        .with_state(state)
}

/// `GET /stats`: counters of the protected transactions.
async fn stats(
    axum::extract::State(state): axum::extract::State<SharedState>,
) -> axum::Json<serde_json::Value> {
    axum::Json(serde_json::json!({ "transactions": state.tx_metrics.snapshot() }))
}

/// The value of header `name`, if present and UTF-8.
pub(crate) fn header<'a>(
    headers: &'a axum::http::HeaderMap,
    name: &'static str,
) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
}

/// What the scenario steps need, owned so a retried transaction can run them again.
#[derive(Clone, Debug)]
pub(crate) struct Ctx {
    pub(crate) store: Store,
    pub(crate) hooks: Hooks,
    /// Take the row locks (protections on).
    pub(crate) lock: bool,
}

impl Ctx {
    pub(crate) fn new(state: &AppState) -> Self {
        Self {
            store: state.store.clone(),
            hooks: state.hooks.clone(),
            lock: state.locking == Locking::On,
        }
    }
}

/// Run the steps `$method` of a scenario (a method of the module's steps trait, implemented for
/// every database's connection type) with `$input`: protected, in a transaction retried on
/// deadlocks and lock refusals; unprotected (control mode), on one connection in autocommit.
macro_rules! run_steps {
    ($state:expr, $method:ident, $input:expr) => {{
        let state: &$crate::AppState = $state;
        let ctx = $crate::Ctx::new(state);
        let input = $input;
        let opts = state.store.tx_options(state.config.tx_retry.clone()).metrics(state.tx_metrics.clone());
        $crate::on_db!(&state.store.db, pool => match state.locking {
            $crate::Locking::On => {
                holdfast_sql::transaction::transaction(pool, &opts, |conn| {
                    let ctx = ctx.clone();
                    let input = input.clone();
                    Box::pin(async move { conn.$method(&ctx, &input).await })
                })
                .await
            }
            $crate::Locking::Off => match pool.acquire().await {
                Ok(mut conn) => conn.$method(&ctx, &input).await,
                Err(e) => Err($crate::AppError::from(e)),
            },
        })
    }};
}
pub(crate) use run_steps;
