//! The engine host: the one owner of the [`Engine`] and the [`Store`], on its own OS thread.
//!
//! HTTP handlers send [`Command`]s over a channel whose depth is bounded by a counter (a full
//! queue answers `overloaded`). The loop:
//!
//! 1. wait for a command or the engine's next deadline (or the `async` flush deadline);
//! 2. drain more commands, up to [`BATCH_COMMANDS_MAX`];
//! 3. `tick(now)`, then apply every command, collecting the replies (not sending them);
//! 4. take the engine's notifications (answers for queued requests) and its changes, and
//!    write the changes in ONE store commit: one fsync covers the whole batch (group commit);
//! 5. only after that commit: send the replies and notifications, publish the events.
//!
//! A reply that cannot be delivered because its handler is gone (client disconnected) and that
//! carries a grant is undone at once (`undo_grant`; an idempotency start is aborted), and the
//! undo is committed like any other change: a grant that cannot be delivered is never leaked.
//! A handler dropped while its request is queued sends [`Command::Cancel`], which removes the
//! waiter from the engine's queue.
//!
//! **Memory mode runs the hot path inline.** With no store there is no commit to share, so
//! batching buys nothing and the channel hop to the host thread (a wake-up there and another
//! back) was most of a request's cost. With `durability = memory` the lease commands
//! ([`Command::inline`]) are applied by the calling thread itself under the host's mutex: the
//! same `tick` → `apply` → deliver sequence, one command at a time. The host thread then only
//! fires timers (woken by [`Command::Wake`] when an inline command set an earlier deadline) and
//! serves the heavier admin commands. Either way the host's state is only ever touched under
//! its mutex, so the engine still sees one totally ordered history.
//!
//! A store failure is fail-stop: nothing of the failed batch is acknowledged; the process
//! exits (or, in tests, the host stops and every later request is answered `overloaded`). The
//! disk is the truth; a restart recovers from it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use holdfast_api::{HolderInfo, LockState, StatsResponse};
use holdfast_core::{
    AcquireOutcome, AcquireRequest, ChangeSet, Engine, FencingCheck, Grant, IdempotencyBegin,
    IdempotencyOutcome, IdempotencyRecord, IdempotencyResult, LeaseId, LeaseTarget, LeaseView,
    LockError, LockFilter, WaitOutcome, WaiterId,
};
use tokio::sync::oneshot;

use crate::auth::Principal;
use crate::clock::Clock;
use crate::config::{BATCH_COMMANDS_MAX, Durability};
use crate::convert::{holder_info, lock_state};
use crate::error::ApiError;
use crate::events::EventHub;
use crate::metrics::{self as m, Latencies};
use crate::store::{Store, SyncHooks};

/// Reply channel of a command.
pub type Reply<T> = oneshot::Sender<Result<T, ApiError>>;

/// Who may act on a lease: `None` = anyone (admin), `Some(owner)` = only leases created by it.
pub type OwnerCheck = Option<Option<String>>;

/// A request to the engine host.
pub enum Command {
    /// Acquire (new lease or more locks on an existing one); may queue.
    Acquire {
        /// The request.
        request: AcquireRequest,
        /// Owner check for `LeaseTarget::Existing`.
        owner_check: OwnerCheck,
        /// Handler's id, for [`Command::Cancel`].
        request_id: u64,
        /// Answer.
        reply: Reply<Grant>,
    },
    /// Renew a lease.
    Renew {
        /// Lease.
        lease_id: LeaseId,
        /// New TTL.
        ttl_ms: Option<u64>,
        /// Owner check.
        owner_check: OwnerCheck,
        /// Answer.
        reply: Reply<LeaseView>,
    },
    /// Release a lease.
    ReleaseLease {
        /// Lease.
        lease_id: LeaseId,
        /// Owner check.
        owner_check: OwnerCheck,
        /// Answer.
        reply: Reply<LeaseView>,
    },
    /// Release one lock of a lease.
    ReleaseLock {
        /// Lease.
        lease_id: LeaseId,
        /// Key.
        key: String,
        /// Owner check.
        owner_check: OwnerCheck,
        /// Answer.
        reply: Reply<LeaseView>,
    },
    /// Admin: force-release a key.
    ForceReleaseLock {
        /// Key.
        key: String,
        /// Why.
        reason: String,
        /// Admin's token name (for the log).
        admin: Option<String>,
        /// Answer: the holders that lost the key, as they were.
        reply: Reply<Vec<HolderInfo>>,
    },
    /// Admin: force-release a lease.
    ForceReleaseLease {
        /// Lease.
        lease_id: LeaseId,
        /// Why.
        reason: String,
        /// Admin's token name (for the log).
        admin: Option<String>,
        /// Answer: the lease as it was before.
        reply: Reply<LeaseView>,
    },
    /// Read a lease.
    GetLease {
        /// Lease.
        lease_id: LeaseId,
        /// Owner check.
        owner_check: OwnerCheck,
        /// Answer.
        reply: Reply<LeaseView>,
    },
    /// One key, as the viewer may see it.
    LockInfo {
        /// Key.
        key: String,
        /// Viewer.
        viewer: Principal,
        /// Answer.
        reply: Reply<Option<LockState>>,
    },
    /// Listing, as the viewer may see it (keys outside its prefixes omitted).
    ListLocks {
        /// Filter.
        filter: LockFilter,
        /// Viewer.
        viewer: Principal,
        /// Answer.
        reply: Reply<Vec<LockState>>,
    },
    /// Sequencer check.
    Fencing {
        /// Key.
        key: String,
        /// Token.
        fencing_token: u64,
        /// Answer.
        reply: Reply<FencingCheck>,
    },
    /// Stats.
    Stats {
        /// Answer.
        reply: Reply<StatsResponse>,
    },
    /// Idempotency begin; may queue.
    IdemBegin {
        /// The request.
        begin: IdempotencyBegin,
        /// Handler's id, for [`Command::Cancel`].
        request_id: u64,
        /// Answer.
        reply: Reply<IdempotencyOutcome>,
    },
    /// Idempotency complete.
    IdemComplete {
        /// Key.
        key: String,
        /// Executor lease.
        lease_id: LeaseId,
        /// Result.
        result: IdempotencyResult,
        /// Owner check on the executor lease.
        owner_check: OwnerCheck,
        /// Answer.
        reply: Reply<IdempotencyRecord>,
    },
    /// Idempotency abort.
    IdemAbort {
        /// Key.
        key: String,
        /// Executor lease.
        lease_id: LeaseId,
        /// Owner check on the executor lease.
        owner_check: OwnerCheck,
        /// Answer.
        reply: Reply<()>,
    },
    /// Idempotency read: the record and, when in progress, its executor lease (if visible).
    IdemGet {
        /// Key.
        key: String,
        /// Answer.
        reply: Reply<Option<(IdempotencyRecord, Option<LeaseView>)>>,
    },
    /// The handler of request `request_id` went away: leave the queue.
    Cancel {
        /// The handler's id.
        request_id: u64,
    },
    /// Stop: fail queued requests, commit, exit.
    Shutdown,
    /// Inline mode: an inline command set a deadline earlier than the one the host thread
    /// sleeps until; recompute it.
    Wake,
    /// A grant reached its handler's reply channel, but the handler was dropped (client gone)
    /// before taking it: undo it.
    UndoGrant {
        /// The grant.
        grant: Grant,
    },
    /// Like [`Command::UndoGrant`] for an idempotency execution's lease (`Started`): release it
    /// (the engine frees the record for the next executor).
    ReleaseOrphanLease {
        /// The executor lease.
        lease_id: LeaseId,
    },
}

/// An answer that may hold something for its requester (a grant, an idempotency execution).
/// If the requester's handler is dropped after the answer reached its reply channel but before
/// it took it, [`EngineHandle::call_waiting`] asks the host to undo it, so it is not held until
/// its TTL runs out.
pub trait Undoable: Send + Sized + 'static {
    /// The command that undoes this answer, if it holds anything.
    fn undo(self) -> Option<Command>;
}

impl Undoable for Grant {
    fn undo(self) -> Option<Command> {
        Some(Command::UndoGrant { grant: self })
    }
}

impl Undoable for IdempotencyOutcome {
    fn undo(self) -> Option<Command> {
        match self {
            IdempotencyOutcome::Started(lease) => Some(Command::ReleaseOrphanLease {
                lease_id: lease.lease_id,
            }),
            _ => None,
        }
    }
}

impl Command {
    /// Cancel, Shutdown, Wake and the undos bypass the queue bound (they must never be
    /// refused).
    fn counted(&self) -> bool {
        !matches!(
            self,
            Command::Cancel { .. }
                | Command::Shutdown
                | Command::Wake
                | Command::UndoGrant { .. }
                | Command::ReleaseOrphanLease { .. }
        )
    }

    /// In memory mode, applied by the calling thread (cheap, bounded work). The rest (listings,
    /// admin force-releases, shutdown) go through the host thread, so a large listing never
    /// runs on a connection thread.
    fn inline(&self) -> bool {
        matches!(
            self,
            Command::Acquire { .. }
                | Command::Renew { .. }
                | Command::ReleaseLease { .. }
                | Command::ReleaseLock { .. }
                | Command::GetLease { .. }
                | Command::LockInfo { .. }
                | Command::Fencing { .. }
                | Command::Stats { .. }
                | Command::IdemBegin { .. }
                | Command::IdemComplete { .. }
                | Command::IdemAbort { .. }
                | Command::IdemGet { .. }
                | Command::Cancel { .. }
                | Command::UndoGrant { .. }
                | Command::ReleaseOrphanLease { .. }
        )
    }
}

/// Counters of one server (for tests and the benchmark).
#[derive(Debug, Default)]
pub struct ServerCounters {
    /// Store commits.
    pub commits: AtomicU64,
    /// Durable (fsynced) store commits.
    pub fsyncs: AtomicU64,
    /// Commands applied.
    pub commands: AtomicU64,
}

/// The handlers' side: send commands, await answers.
#[derive(Clone)]
pub struct EngineHandle {
    /// Shared by the clones; the syncer thread holds it weakly (to send undos), so the host
    /// still sees the channel close when the last handle is dropped.
    tx: Arc<Sender<Command>>,
    queued: Arc<AtomicUsize>,
    queue_max: usize,
    next_request_id: Arc<AtomicU64>,
    /// Set when the host stopped after a store failure.
    pub failed: Arc<AtomicBool>,
    /// The server clock.
    pub clock: Clock,
    /// Memory mode: the host, for commands applied by the calling thread.
    inline: Option<Arc<Mutex<Host>>>,
}

impl EngineHandle {
    fn send(&self, cmd: Command) -> Result<(), ApiError> {
        if let Some(host) = &self.inline
            && cmd.inline()
        {
            let wake = lock_host(host).ok_or_else(stopping)?.apply_inline(cmd)?;
            if wake {
                // Cannot fail while this handle holds a sender; a stopped host needs no wake.
                let _ = self.tx.send(Command::Wake);
            }
            return Ok(());
        }
        if cmd.counted() && self.queued.fetch_add(1, Ordering::AcqRel) >= self.queue_max {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(ApiError::overloaded(format!(
                "too many requests waiting for the engine (limit {})",
                self.queue_max
            )));
        }
        let counted = cmd.counted();
        self.tx.send(cmd).map_err(|_| {
            if counted {
                self.queued.fetch_sub(1, Ordering::AcqRel);
            }
            stopping()
        })
    }

    /// Ask the host to stop (answers queued waiters, commits, exits). Never refused.
    pub fn shutdown(&self) {
        let _ = self.tx.send(Command::Shutdown);
    }

    /// Send a command built around a reply channel and await the answer.
    ///
    /// # Errors
    /// The command's refusal; `overloaded` if the queue is full or the host stopped.
    pub async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, ApiError> {
        let (tx, rx) = oneshot::channel();
        self.send(make(tx))?;
        rx.await.map_err(|_| stopping())?
    }

    /// Like [`EngineHandle::call`] for requests that may queue: if the returned future is
    /// dropped before the answer (client disconnected), the waiter is cancelled, and an answer
    /// that already reached the reply channel is undone ([`Undoable`]). Waits at most
    /// `wait_ms` plus a margin (the engine times waiters out itself; this is a backstop).
    ///
    /// # Errors
    /// As [`EngineHandle::call`].
    pub async fn call_waiting<T: Undoable>(
        &self,
        wait_ms: u64,
        make: impl FnOnce(u64, Reply<T>) -> Command,
    ) -> Result<T, ApiError> {
        let request_id = self.next_request_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.send(make(request_id, tx))?;
        let mut guard = CancelOnDrop {
            handle: self,
            request_id,
            rx,
            armed: true,
        };
        let backstop = Duration::from_millis(wait_ms.saturating_add(30_000));
        let answer = tokio::time::timeout(backstop, &mut guard.rx).await;
        match answer {
            Ok(Ok(result)) => {
                guard.armed = false;
                result
            }
            Ok(Err(_)) => {
                guard.armed = false;
                Err(stopping())
            }
            Err(_) => Err(ApiError::overloaded("the engine did not answer in time")),
        }
    }
}

fn stopping() -> ApiError {
    ApiError::overloaded("the server is shutting down or stopped")
}

/// The host, unless a panic while it was held poisoned it: then the host counts as stopped
/// (as a panicked host thread did before inline mode), never as consistent.
fn lock_host(host: &Mutex<Host>) -> Option<MutexGuard<'_, Host>> {
    host.lock().ok()
}

struct CancelOnDrop<'a, T: Undoable> {
    handle: &'a EngineHandle,
    request_id: u64,
    rx: oneshot::Receiver<Result<T, ApiError>>,
    armed: bool,
}

impl<T: Undoable> Drop for CancelOnDrop<'_, T> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let _ = self.handle.send(Command::Cancel {
            request_id: self.request_id,
        });
        // If the answer was already sent, the cancel found no waiter: take the answer and undo
        // it. Closing first makes any later send fail, and the host undoes a failed delivery
        // itself, so nothing slips between the two.
        self.rx.close();
        if let Ok(Ok(answer)) = self.rx.try_recv()
            && let Some(undo) = answer.undo()
        {
            let _ = self.handle.send(undo);
        }
    }
}

/// A reply held until the batch's commit.
enum Delivery {
    /// A grant (undone if undeliverable).
    Grant(Reply<Grant>, Result<Grant, ApiError>),
    /// An idempotency answer (a `Started` is aborted if undeliverable).
    Idem(
        Reply<IdempotencyOutcome>,
        String,
        Result<IdempotencyOutcome, ApiError>,
    ),
    /// Anything else.
    Other(Box<dyn FnOnce() + Send>),
}

/// An answer nobody took, which must be undone.
enum Undelivered {
    Grant(Grant),
    /// An idempotency execution that was started for a caller who is gone.
    Started {
        key: String,
        lease_id: LeaseId,
    },
}

impl Delivery {
    /// Send the reply; what the receiver no longer took and must be undone, if anything. The
    /// host undoes it at once (memory mode), the syncer thread through an undo command.
    fn send(self) -> Option<Undelivered> {
        match self {
            Delivery::Grant(reply, value) => match reply.send(value) {
                Err(Ok(grant)) => Some(Undelivered::Grant(grant)),
                _ => None,
            },
            Delivery::Idem(reply, key, value) => match reply.send(value) {
                Err(Ok(IdempotencyOutcome::Started(lease))) => Some(Undelivered::Started {
                    key,
                    lease_id: lease.lease_id,
                }),
                _ => None,
            },
            Delivery::Other(f) => {
                f();
                None
            }
        }
    }
}

fn other<T: Send + 'static>(reply: Reply<T>, value: Result<T, ApiError>) -> Delivery {
    Delivery::Other(Box::new(move || {
        let _ = reply.send(value);
    }))
}

enum Pending {
    Lock(Reply<Grant>),
    Idem(Reply<IdempotencyOutcome>, String),
}

/// Everything the host owns (behind one mutex: the host thread's and, in memory mode, the
/// connection threads' way in).
pub struct Host {
    engine: Engine,
    store: Option<Store>,
    durability: Durability,
    async_flush: Duration,
    /// When the host thread will wake next (`None`: only for a command), as it computed under
    /// the mutex before sleeping. Inline commands compare their new deadline with it.
    scheduled_wake: Option<Instant>,
    /// Set once the host stopped (shutdown or store failure): inline commands are refused.
    stopped: bool,
    queued: Arc<AtomicUsize>,
    clock: Clock,
    hub: Arc<EventHub>,
    counters: Arc<ServerCounters>,
    failed: Arc<AtomicBool>,
    exit_on_store_failure: bool,
    /// For undoing a grant whose delivery failed on the syncer thread.
    undo_tx: Weak<Sender<Command>>,
    pending: HashMap<WaiterId, (u64, Pending)>,
    by_request: HashMap<u64, WaiterId>,
    /// Owner of every live lease created under a token (absent: no owner), and live leases
    /// per owner (for the per-token quota).
    owners: HashMap<LeaseId, Option<String>>,
    owner_counts: HashMap<String, u64>,
    leases_per_token_max: u64,
    waiters_total_max: usize,
    latencies: Latencies,
    started: Instant,
    gauges_at: Option<Instant>,
}

/// Everything needed to start the host.
pub struct HostParts {
    /// The restored engine.
    pub engine: Engine,
    /// The store (`None` in memory mode).
    pub store: Option<Store>,
    /// Mode.
    pub durability: Durability,
    /// Async flush bound.
    pub async_flush_ms: u64,
    /// Clock.
    pub clock: Clock,
    /// Event hub.
    pub hub: Arc<EventHub>,
    /// Counters.
    pub counters: Arc<ServerCounters>,
    /// Exit the process on store failure.
    pub exit_on_store_failure: bool,
    /// Queue bound.
    pub queue_max: usize,
    /// Per-token lease quota.
    pub leases_per_token_max: u64,
    /// Bound on queued requests over all keys.
    pub waiters_total_max: usize,
}

/// Start the host thread.
///
/// # Errors
/// The thread could not be spawned.
pub fn spawn(parts: HostParts) -> std::io::Result<(EngineHandle, std::thread::JoinHandle<()>)> {
    let (tx, rx) = crossbeam_channel::unbounded();
    let tx = Arc::new(tx);
    let queued = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicBool::new(false));
    // Only leases created under a token are tracked (open mode: none): no per-lease cost
    // at restart or while a lease is held.
    let mut owners = HashMap::new();
    let mut owner_counts: HashMap<String, u64> = HashMap::new();
    for (lease_id, owner) in parts.engine.lease_owners() {
        if let Some(owner) = owner {
            *owner_counts.entry(owner.to_owned()).or_default() += 1;
            owners.insert(lease_id, Some(owner.to_owned()));
        }
    }
    let inline_mode = parts.store.is_none();
    let mut store = parts.store;
    if let Some(store) = &mut store {
        let counters = Arc::clone(&parts.counters);
        let failed = Arc::clone(&failed);
        let exit_on_failure = parts.exit_on_store_failure;
        store
            .start_syncer(SyncHooks {
                on_sync: Box::new(move || {
                    metrics::counter!(m::FSYNCS).increment(1);
                    counters.fsyncs.fetch_add(1, Ordering::Relaxed);
                }),
                on_failure: Box::new(move |error| {
                    tracing::error!(
                        error,
                        "log sync failed: stopping (fail-stop); restart recovers from the last durable commit"
                    );
                    failed.store(true, Ordering::SeqCst);
                    if exit_on_failure {
                        std::process::exit(70);
                    }
                }),
            })
            .map_err(std::io::Error::other)?;
    }
    let host = Host {
        engine: parts.engine,
        store,
        durability: parts.durability,
        async_flush: Duration::from_millis(parts.async_flush_ms),
        scheduled_wake: None,
        stopped: false,
        queued: Arc::clone(&queued),
        clock: parts.clock,
        hub: parts.hub,
        counters: parts.counters,
        failed: Arc::clone(&failed),
        exit_on_store_failure: parts.exit_on_store_failure,
        undo_tx: Arc::downgrade(&tx),
        pending: HashMap::new(),
        by_request: HashMap::new(),
        owners,
        owner_counts,
        leases_per_token_max: parts.leases_per_token_max,
        waiters_total_max: parts.waiters_total_max,
        latencies: Latencies::new(),
        started: Instant::now(),
        gauges_at: None,
    };
    let host = Arc::new(Mutex::new(host));
    let handle = EngineHandle {
        tx,
        queued,
        queue_max: parts.queue_max,
        next_request_id: Arc::new(AtomicU64::new(1)),
        failed,
        clock: parts.clock,
        inline: inline_mode.then(|| Arc::clone(&host)),
    };
    let thread = std::thread::Builder::new()
        .name("holdfast-engine".to_owned())
        .spawn(move || run(&host, &rx))?;
    Ok((handle, thread))
}

/// The host thread: wait for commands or the next deadline, apply them in batches.
fn run(host: &Mutex<Host>, rx: &Receiver<Command>) {
    loop {
        let wake = {
            let Some(mut host) = lock_host(host) else {
                return;
            };
            let wake = host.next_wake();
            host.scheduled_wake = wake;
            wake
        };
        let first = match wake {
            Some(at) => rx.recv_deadline(at),
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        let mut batch = Vec::new();
        match first {
            Ok(cmd) => batch.push(cmd),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                if let Some(mut host) = lock_host(host) {
                    host.stop();
                }
                return;
            }
        }
        while batch.len() < BATCH_COMMANDS_MAX {
            match rx.try_recv() {
                Ok(cmd) => batch.push(cmd),
                Err(_) => break,
            }
        }
        // With nothing else waiting, the host may sync this batch itself (`Store::commit`).
        let queue_empty = rx.is_empty();
        let Some(mut host) = lock_host(host) else {
            return;
        };
        if !host.run_batch(batch, queue_empty) {
            return;
        }
    }
}

impl Host {
    /// Apply one batch from the channel and commit it (`queue_empty`: no command was left in
    /// the channel, see [`Store::commit`]). Returns false once the host stopped.
    fn run_batch(&mut self, batch: Vec<Command>, queue_empty: bool) -> bool {
        let counted = batch.iter().filter(|c| c.counted()).count();
        self.queued.fetch_sub(counted, Ordering::AcqRel);
        self.counters
            .commands
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        if !batch.is_empty() {
            metrics::histogram!(m::BATCH_COMMANDS).record(batch.len() as f64);
        }
        let now = self.clock.now_ms();
        self.engine.tick(now);
        let mut deliveries = Vec::with_capacity(batch.len());
        let mut shutdown = false;
        for cmd in batch {
            if matches!(cmd, Command::Shutdown) {
                shutdown = true;
                continue;
            }
            self.apply(cmd, now, &mut deliveries);
        }
        if shutdown {
            self.fail_pending(now);
        }
        if !self.commit_and_deliver(now, deliveries, queue_empty) {
            return false;
        }
        if let Some(store) = &mut self.store
            && store
                .unsynced_since()
                .is_some_and(|t| t.elapsed() >= self.async_flush)
        {
            match store.flush() {
                Ok(_) => {
                    self.counters.fsyncs.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!(m::FSYNCS).increment(1);
                }
                Err(e) => {
                    self.store_failed(&e.to_string());
                    return false;
                }
            }
        }
        self.update_gauges();
        if shutdown {
            self.stop();
            return false;
        }
        true
    }

    /// Memory mode: apply one command now, on the calling thread (see the module docs).
    /// Returns whether the host thread must recompute its wake-up (an earlier deadline).
    fn apply_inline(&mut self, cmd: Command) -> Result<bool, ApiError> {
        if self.stopped {
            return Err(stopping());
        }
        let now = self.clock.now_ms();
        self.engine.tick(now);
        let mut deliveries = Vec::with_capacity(1);
        self.apply(cmd, now, &mut deliveries);
        self.counters.commands.fetch_add(1, Ordering::Relaxed);
        if !self.commit_and_deliver(now, deliveries, false) {
            return Ok(false);
        }
        self.update_gauges();
        let next = self.next_wake();
        let earlier = next.is_some_and(|n| self.scheduled_wake.is_none_or(|s| n < s));
        if earlier {
            self.scheduled_wake = next;
        }
        Ok(earlier)
    }

    fn next_wake(&self) -> Option<Instant> {
        let engine = self
            .engine
            .next_deadline_ms()
            .map(|ms| self.clock.instant_at(ms));
        let flush = self
            .store
            .as_ref()
            .and_then(Store::unsynced_since)
            .map(|t| t + self.async_flush);
        match (engine, flush) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn update_gauges(&mut self) {
        if self
            .gauges_at
            .is_some_and(|t| t.elapsed() < Duration::from_millis(500))
        {
            return;
        }
        self.gauges_at = Some(Instant::now());
        let s = self.engine.stats();
        #[allow(clippy::cast_precision_loss)]
        {
            metrics::gauge!(m::ACTIVE_LOCKS).set(s.active_locks as f64);
            metrics::gauge!(m::LEASES).set(s.leases as f64);
            metrics::gauge!(m::WAITERS).set(s.waiters as f64);
        }
    }

    fn check_owner(&self, lease_id: LeaseId, owner_check: &OwnerCheck) -> Result<(), ApiError> {
        if let Some(owner) = owner_check {
            let ok = self
                .engine
                .lease(lease_id)
                .is_some_and(|l| &l.owner == owner);
            if !ok {
                return Err(LockError::LeaseNotFound { lease_id }.into());
            }
        }
        Ok(())
    }

    /// Refuse a request that may queue when the total of queued requests is at its bound.
    fn check_waiters(&self, wait_ms: u64) -> Result<(), ApiError> {
        if wait_ms > 0 && self.pending.len() >= self.waiters_total_max {
            return Err(ApiError::overloaded(format!(
                "too many queued requests (limit waiters_total_max = {})",
                self.waiters_total_max
            )));
        }
        Ok(())
    }

    fn check_quota(&self, owner: Option<&String>) -> Result<(), ApiError> {
        let Some(owner) = owner else { return Ok(()) };
        let n = self.owner_counts.get(owner).copied().unwrap_or(0);
        if n >= self.leases_per_token_max {
            return Err(ApiError::overloaded(format!(
                "token {owner} holds {n} leases (limit leases_per_token_max = {}); release some first",
                self.leases_per_token_max
            )));
        }
        Ok(())
    }

    #[allow(clippy::too_many_lines)]
    fn apply(&mut self, cmd: Command, now: u64, out: &mut Vec<Delivery>) {
        match cmd {
            Command::Acquire {
                request,
                owner_check,
                request_id,
                reply,
            } => {
                let checked =
                    self.check_waiters(request.wait_ms)
                        .and_then(|()| match &request.target {
                            LeaseTarget::Existing(id) => self.check_owner(*id, &owner_check),
                            LeaseTarget::New(new) => self.check_quota(new.owner.as_ref()),
                        });
                if let Err(e) = checked {
                    out.push(Delivery::Grant(reply, Err(e)));
                    return;
                }
                match self.engine.acquire(now, request) {
                    Ok(AcquireOutcome::Granted(grant)) => {
                        out.push(Delivery::Grant(reply, Ok(grant)))
                    }
                    Ok(AcquireOutcome::Queued(waiter)) => {
                        self.by_request.insert(request_id, waiter);
                        self.pending
                            .insert(waiter, (request_id, Pending::Lock(reply)));
                    }
                    Err(e) => out.push(Delivery::Grant(reply, Err(e.into()))),
                }
            }
            Command::Renew {
                lease_id,
                ttl_ms,
                owner_check,
                reply,
            } => {
                let r = self
                    .check_owner(lease_id, &owner_check)
                    .and_then(|()| self.engine.renew(now, lease_id, ttl_ms).map_err(Into::into));
                out.push(other(reply, r));
            }
            Command::ReleaseLease {
                lease_id,
                owner_check,
                reply,
            } => {
                let r = self
                    .check_owner(lease_id, &owner_check)
                    .and_then(|()| self.engine.release_lease(now, lease_id).map_err(Into::into));
                out.push(other(reply, r));
            }
            Command::ReleaseLock {
                lease_id,
                key,
                owner_check,
                reply,
            } => {
                let r = self.check_owner(lease_id, &owner_check).and_then(|()| {
                    self.engine
                        .release_lock(now, lease_id, &key)
                        .map_err(Into::into)
                });
                out.push(other(reply, r));
            }
            Command::ForceReleaseLock {
                key,
                reason,
                admin,
                reply,
            } => {
                let before: Vec<HolderInfo> = self
                    .engine
                    .lock_info(&key)
                    .map(|info| {
                        info.holders
                            .iter()
                            .map(|(id, h)| holder_info(h, Some(*id)))
                            .collect()
                    })
                    .unwrap_or_default();
                let r = self
                    .engine
                    .force_release_lock(now, &key, &reason)
                    .map_err(ApiError::from)
                    .map(|_| before);
                if let Ok(lost) = &r {
                    let holders: Vec<&str> = lost.iter().map(|l| l.holder.as_str()).collect();
                    tracing::info!(
                        admin = admin.as_deref().unwrap_or("(open mode)"),
                        key = %key,
                        reason = %reason,
                        ?holders,
                        "admin force release of lock"
                    );
                }
                out.push(other(reply, r));
            }
            Command::ForceReleaseLease {
                lease_id,
                reason,
                admin,
                reply,
            } => {
                let before = self.engine.lease(lease_id);
                let r = self
                    .engine
                    .force_release_lease(now, lease_id, &reason)
                    .map_err(ApiError::from)
                    .map(|after| before.unwrap_or(after));
                if let Ok(lease) = &r {
                    let keys: Vec<&str> = lease.locks.iter().map(|l| l.key.as_str()).collect();
                    tracing::info!(
                        admin = admin.as_deref().unwrap_or("(open mode)"),
                        holder = %lease.holder,
                        reason = %reason,
                        ?keys,
                        "admin force release of lease"
                    );
                }
                out.push(other(reply, r));
            }
            Command::GetLease {
                lease_id,
                owner_check,
                reply,
            } => {
                let r = self.check_owner(lease_id, &owner_check).and_then(|()| {
                    self.engine
                        .lease(lease_id)
                        .ok_or_else(|| LockError::LeaseNotFound { lease_id }.into())
                });
                out.push(other(reply, r));
            }
            Command::LockInfo { key, viewer, reply } => {
                let r = self
                    .engine
                    .lock_info(&key)
                    .map(|info| self.view(&info, &viewer));
                out.push(other(reply, Ok(r)));
            }
            Command::ListLocks {
                filter,
                viewer,
                reply,
            } => {
                let r = self
                    .engine
                    .list_locks(&filter)
                    .iter()
                    .filter(|info| viewer.may_access(&info.key))
                    .map(|info| self.view(info, &viewer))
                    .collect();
                out.push(other(reply, Ok(r)));
            }
            Command::Fencing {
                key,
                fencing_token,
                reply,
            } => {
                out.push(other(
                    reply,
                    Ok(self.engine.check_fencing(&key, fencing_token)),
                ));
            }
            Command::Stats { reply } => {
                let s = self.engine.stats();
                let r = StatsResponse {
                    active_locks: s.active_locks,
                    leases: s.leases,
                    waiters: s.waiters,
                    idempotency_records: s.idempotency_records,
                    grants_total: s.grants_total,
                    releases_total: s.releases_total,
                    timeouts_total: s.timeouts_total,
                    deadlocks_total: s.deadlocks_total,
                    expirations_total: s.expirations_total,
                    force_releases_total: s.force_releases_total,
                    wait_ms: self.latencies.wait(),
                    hold_ms: self.latencies.hold(),
                    durability: self.durability.as_str().to_owned(),
                    uptime_s: self.started.elapsed().as_secs(),
                };
                out.push(other(reply, Ok(r)));
            }
            Command::IdemBegin {
                begin,
                request_id,
                reply,
            } => {
                if let Err(e) = self
                    .check_waiters(begin.wait_ms)
                    .and_then(|()| self.check_quota(begin.lease.owner.as_ref()))
                {
                    out.push(Delivery::Idem(reply, begin.key, Err(e)));
                    return;
                }
                let key = begin.key.clone();
                match self.engine.idempotency_begin(now, begin) {
                    Ok(IdempotencyOutcome::Queued(waiter)) => {
                        self.by_request.insert(request_id, waiter);
                        self.pending
                            .insert(waiter, (request_id, Pending::Idem(reply, key)));
                    }
                    Ok(outcome) => out.push(Delivery::Idem(reply, key, Ok(outcome))),
                    Err(e) => out.push(Delivery::Idem(reply, key, Err(e.into()))),
                }
            }
            Command::IdemComplete {
                key,
                lease_id,
                result,
                owner_check,
                reply,
            } => {
                let r = self.check_owner(lease_id, &owner_check).and_then(|()| {
                    self.engine
                        .idempotency_complete(now, &key, lease_id, result)
                        .map_err(Into::into)
                });
                out.push(other(reply, r));
            }
            Command::IdemAbort {
                key,
                lease_id,
                owner_check,
                reply,
            } => {
                let r = self.check_owner(lease_id, &owner_check).and_then(|()| {
                    self.engine
                        .idempotency_abort(now, &key, lease_id)
                        .map_err(Into::into)
                });
                out.push(other(reply, r));
            }
            Command::IdemGet { key, reply } => {
                let r = self.engine.idempotency_get(&key).map(|rec| {
                    let lease = match &rec.state {
                        holdfast_core::IdempotencyState::InProgress { lease_id } => {
                            self.engine.lease(*lease_id)
                        }
                        holdfast_core::IdempotencyState::Completed(_) => None,
                    };
                    (rec, lease)
                });
                out.push(other(reply, Ok(r)));
            }
            Command::Cancel { request_id } => {
                if let Some(waiter) = self.by_request.remove(&request_id)
                    && self.engine.cancel_wait(now, waiter)
                {
                    self.pending.remove(&waiter);
                }
                // If cancel_wait found nothing, an answer is already on its way; its delivery
                // will fail and be undone.
            }
            Command::UndoGrant { grant } => self.engine.undo_grant(now, &grant),
            Command::ReleaseOrphanLease { lease_id } => {
                // Gone already (expired, force-released) is fine: nothing is held.
                let _ = self.engine.release_lease(now, lease_id);
            }
            Command::Shutdown | Command::Wake => {}
        }
    }

    fn view(&self, info: &holdfast_core::LockInfo, viewer: &Principal) -> LockState {
        lock_state(info, |id| {
            viewer.is_admin()
                || self
                    .owners
                    .get(&id)
                    .is_some_and(|o| o.is_some() && *o == viewer.name)
        })
    }

    /// Answer every queued request with a cancellation (shutdown).
    fn fail_pending(&mut self, now: u64) {
        for (waiter, (_, pending)) in std::mem::take(&mut self.pending) {
            self.engine.cancel_wait(now, waiter);
            let e = ApiError::from(LockError::Cancelled);
            match pending {
                Pending::Lock(reply) => {
                    let _ = reply.send(Err(e));
                }
                Pending::Idem(reply, _) => {
                    let _ = reply.send(Err(e));
                }
            }
        }
        self.by_request.clear();
    }

    fn track_owners(&mut self, changes: &ChangeSet) {
        for (id, record) in &changes.leases {
            let state = record.as_ref().map(|r| r.owner.as_deref());
            track_owner(&mut self.owners, &mut self.owner_counts, *id, state);
        }
    }

    /// Commit the engine's changes, then deliver. Repeats while undoing undeliverable grants
    /// produces new changes. Returns false if the host must stop (store failure).
    /// `queue_empty`: nothing waits in the host's queue (the host may sync the batch itself).
    fn commit_and_deliver(
        &mut self,
        now: u64,
        mut deliveries: Vec<Delivery>,
        queue_empty: bool,
    ) -> bool {
        loop {
            for note in self.engine.take_notifications() {
                let Some((request_id, pending)) = self.pending.remove(&note.waiter) else {
                    // Cancelled concurrently: the engine already forgot it, or nobody waits.
                    if let WaitOutcome::Granted(grant) = &note.outcome {
                        self.engine.undo_grant(now, grant);
                    }
                    continue;
                };
                self.by_request.remove(&request_id);
                match (pending, note.outcome) {
                    (Pending::Lock(reply), WaitOutcome::Granted(grant)) => {
                        deliveries.push(Delivery::Grant(reply, Ok(grant)));
                    }
                    (Pending::Lock(reply), WaitOutcome::Failed(e)) => {
                        deliveries.push(Delivery::Grant(reply, Err(e.into())));
                    }
                    (Pending::Idem(reply, key), WaitOutcome::Idempotency(outcome)) => {
                        deliveries.push(Delivery::Idem(reply, key, Ok(outcome)));
                    }
                    (Pending::Idem(reply, key), WaitOutcome::Failed(e)) => {
                        deliveries.push(Delivery::Idem(reply, key, Err(e.into())));
                    }
                    (Pending::Lock(reply), WaitOutcome::Idempotency(_)) => {
                        deliveries.push(Delivery::Grant(
                            reply,
                            Err(ApiError::internal("lock waiter got an idempotency answer")),
                        ));
                    }
                    (Pending::Idem(reply, key), WaitOutcome::Granted(grant)) => {
                        self.engine.undo_grant(now, &grant);
                        deliveries.push(Delivery::Idem(
                            reply,
                            key,
                            Err(ApiError::internal("idempotency waiter got a lock grant")),
                        ));
                    }
                }
            }
            let changes = if self.store.is_some() {
                self.engine.take_changes()
            } else {
                // Nothing is persisted: skip building the change records.
                let (owners, counts) = (&mut self.owners, &mut self.owner_counts);
                self.engine
                    .discard_changes(|id, state| track_owner(owners, counts, id, state));
                ChangeSet::default()
            };
            if self.store.is_some() {
                let events = self.engine.take_events();
                log_events(&mut self.latencies, &events);
                // Replies and events go out once the batch is durable: with the syncer thread,
                // after this returns; a failed delivery then comes back as an undo command.
                self.track_owners(&changes);
                let Some(store) = &mut self.store else {
                    return false;
                };
                let hub = Arc::clone(&self.hub);
                let undo = self.undo_tx.clone();
                let batch = std::mem::take(&mut deliveries);
                let started = Instant::now();
                let then = Box::new(move || {
                    hub.publish(events);
                    deliver_later(batch, &undo);
                });
                match store.commit(&changes, then, queue_empty) {
                    Ok(info) => {
                        if !changes.is_empty() {
                            metrics::histogram!(m::COMMIT_SECONDS)
                                .record(started.elapsed().as_secs_f64());
                            metrics::counter!(m::COMMITS).increment(1);
                            self.counters.commits.fetch_add(1, Ordering::Relaxed);
                        }
                        if info.synced {
                            metrics::counter!(m::FSYNCS).increment(1);
                            self.counters.fsyncs.fetch_add(1, Ordering::Relaxed);
                        }
                        return true;
                    }
                    Err(e) => {
                        self.store_failed(&e.to_string());
                        return false;
                    }
                }
            }
            {
                // Drained in place: the engine's event buffer keeps its capacity.
                let events = self.engine.drain_events();
                log_events(&mut self.latencies, events.as_slice());
                self.hub.publish(events);
            }
            if deliveries.is_empty() {
                return true;
            }
            let mut undone = false;
            for d in deliveries.drain(..) {
                match d.send() {
                    None => {}
                    Some(Undelivered::Grant(grant)) => {
                        self.engine.undo_grant(now, &grant);
                        undone = true;
                    }
                    Some(Undelivered::Started { key, lease_id }) => {
                        let _ = self.engine.idempotency_abort(now, &key, lease_id);
                        undone = true;
                    }
                }
            }
            if !undone {
                return true;
            }
        }
    }

    fn store_failed(&mut self, error: &str) {
        tracing::error!(
            error,
            "store commit failed: stopping (fail-stop); restart recovers from the last durable commit"
        );
        self.failed.store(true, Ordering::SeqCst);
        self.stopped = true;
        if self.exit_on_store_failure {
            std::process::exit(70);
        }
        // Drop every queued request unanswered: nothing of this batch was acknowledged.
        self.pending.clear();
        self.by_request.clear();
    }

    fn stop(&mut self) {
        self.stopped = true;
        let now = self.clock.now_ms();
        self.fail_pending(now);
        let _ = self.commit_and_deliver(now, Vec::new(), false);
        if let Some(store) = &mut self.store
            && let Err(e) = store.flush()
        {
            tracing::error!(error = %e, "final flush failed");
        }
        tracing::info!("engine host stopped");
    }
}

/// Send a durable batch's replies (on the syncer thread, or on the host when nothing waits for
/// a sync). A reply nobody takes any more is undone through the host's queue, like the undo of
/// a dropped handler ([`CancelOnDrop`]).
fn deliver_later(deliveries: Vec<Delivery>, undo: &Weak<Sender<Command>>) {
    for d in deliveries {
        let command = match d.send() {
            None => None,
            Some(Undelivered::Grant(grant)) => Some(Command::UndoGrant { grant }),
            Some(Undelivered::Started { lease_id, .. }) => {
                Some(Command::ReleaseOrphanLease { lease_id })
            }
        };
        if let Some(command) = command
            && let Some(tx) = undo.upgrade()
        {
            // A closed queue means the host stopped: a restart recovers the state anyway.
            let _ = tx.send(command);
        }
    }
}

/// Keep the per-owner lease counts (quota checks) up to date with one touched lease: `state`
/// is `Some(owner)` if the lease lives, `None` if it is gone.
fn track_owner(
    owners: &mut HashMap<LeaseId, Option<String>>,
    owner_counts: &mut HashMap<String, u64>,
    id: LeaseId,
    state: Option<Option<&str>>,
) {
    match state {
        Some(Some(o)) => {
            if let std::collections::hash_map::Entry::Vacant(slot) = owners.entry(id) {
                *owner_counts.entry(o.to_owned()).or_default() += 1;
                slot.insert(Some(o.to_owned()));
            }
        }
        Some(None) => {}
        // Open mode tracks nothing: skip hashing the id of every released lease.
        None if owners.is_empty() => {}
        None => {
            if let Some(Some(o)) = owners.remove(&id)
                && let Some(n) = owner_counts.get_mut(&o)
            {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    owner_counts.remove(&o);
                }
            }
        }
    }
}

/// Latency statistics and log lines for a batch's events.
fn log_events(latencies: &mut Latencies, events: &[holdfast_core::Event]) {
    for e in events {
        latencies.record(e);
        match &e.kind {
            holdfast_core::EventKind::Expired => tracing::info!(
                key = e.key.as_deref().unwrap_or(""),
                holder = %e.holder,
                fencing_token = e.fencing_token,
                "lease expired: lock lost"
            ),
            holdfast_core::EventKind::Deadlock => tracing::info!(
                key = e.key.as_deref().unwrap_or(""),
                holder = %e.holder,
                "deadlock: request refused (requester is the victim)"
            ),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    //! The hand-off between the host and a dropped handler, made deterministic: the answer is
    //! put in the reply channel, then the handler's future is dropped without being polled
    //! again (what hyper does when it reads the client's EOF before polling the handler).

    use std::future::Future;
    use std::pin::Pin;
    use std::task::{Context, Poll, Waker};

    use holdfast_core::{Limits, LockKind, LockSpec, NewLease};

    use super::*;

    fn host(durability: Durability, dir: &std::path::Path) -> EngineHandle {
        let store = (durability != Durability::Memory).then(|| {
            let mut store = Store::open(dir, durability).expect("open store");
            store.load().expect("load store");
            store
        });
        let (handle, _thread) = spawn(HostParts {
            engine: Engine::new(Limits::default()),
            store,
            durability,
            async_flush_ms: 10,
            clock: Clock::new(),
            hub: Arc::new(EventHub::new(100, 1)),
            counters: Arc::new(ServerCounters::default()),
            exit_on_store_failure: false,
            queue_max: 1_000,
            leases_per_token_max: 1_000,
            waiters_total_max: 1_000,
        })
        .expect("spawn host");
        handle
    }

    fn acquire(holder: &str, key: &str, wait_ms: u64) -> AcquireRequest {
        AcquireRequest {
            target: LeaseTarget::New(NewLease {
                lease_id: LeaseId(rand::random()),
                holder: holder.to_owned(),
                ttl_ms: 60_000,
                reason: None,
                metadata: None,
                owner: None,
            }),
            locks: vec![LockSpec {
                key: key.to_owned(),
                kind: LockKind::Exclusive,
                lock_delay_ms: 0,
            }],
            wait_ms,
            reentrant: true,
        }
    }

    async fn stats(h: &EngineHandle) -> StatsResponse {
        h.call(|reply| Command::Stats { reply }).await.unwrap()
    }

    /// Polls `check` until it holds (the host may apply an undo on its own thread).
    async fn eventually(h: &EngineHandle, what: &str, check: impl Fn(&StatsResponse) -> bool) {
        for _ in 0..500 {
            if check(&stats(h).await) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("never true: {what}; stats: {:?}", stats(h).await);
    }

    /// A handler's `call_waiting` for key `k`.
    fn take_k<'h>(
        h: &'h EngineHandle,
        holder: &'static str,
        wait_ms: u64,
    ) -> impl Future<Output = Result<Grant, ApiError>> + 'h {
        h.call_waiting(wait_ms, move |request_id, reply| Command::Acquire {
            request: acquire(holder, "k", wait_ms),
            owner_check: None,
            request_id,
            reply,
        })
    }

    /// alice holds `k`; bob's request is queued behind her, its handler polled once and then
    /// left alone (the caller drops it when the test needs).
    async fn alice_holds_and_bob_waits(
        h: &EngineHandle,
    ) -> (
        Grant,
        Pin<Box<impl Future<Output = Result<Grant, ApiError>> + '_>>,
    ) {
        let first = take_k(h, "alice", 0).await.unwrap();
        let mut waiter = Box::pin(take_k(h, "bob", 60_000));
        let mut cx = Context::from_waker(Waker::noop());
        assert!(matches!(waiter.as_mut().poll(&mut cx), Poll::Pending));
        eventually(h, "bob queued", |s| s.waiters == 1).await;
        (first, waiter)
    }

    async fn grant_in_the_channel_of_a_dropped_handler_is_undone(durability: Durability) {
        let dir = tempfile::tempdir().unwrap();
        let h = host(durability, dir.path());
        let (first, waiter) = alice_holds_and_bob_waits(&h).await;
        h.call(|reply| Command::ReleaseLease {
            lease_id: first.lease.lease_id,
            owner_check: None,
            reply,
        })
        .await
        .unwrap();
        // The host delivers a batch's answers before it takes the next batch: once this
        // answer is back, bob's grant sits in his reply channel.
        let s = stats(&h).await;
        assert_eq!(
            (s.active_locks, s.waiters),
            (1, 0),
            "bob was granted: {s:?}"
        );
        drop(waiter);
        eventually(&h, "the undelivered grant is released", |s| {
            s.active_locks == 0 && s.leases == 0
        })
        .await;
        // The key is free for the next caller at once.
        assert!(take_k(&h, "carol", 0).await.is_ok());
        h.shutdown();
    }

    #[tokio::test]
    async fn memory_mode_undoes_a_grant_its_handler_never_took() {
        grant_in_the_channel_of_a_dropped_handler_is_undone(Durability::Memory).await;
    }

    #[tokio::test]
    async fn sync_mode_undoes_a_grant_its_handler_never_took() {
        grant_in_the_channel_of_a_dropped_handler_is_undone(Durability::Sync).await;
    }

    #[tokio::test]
    async fn a_dropped_waiter_that_was_not_granted_leaves_the_queue() {
        let dir = tempfile::tempdir().unwrap();
        let h = host(Durability::Sync, dir.path());
        let (_, waiter) = alice_holds_and_bob_waits(&h).await;
        drop(waiter);
        eventually(&h, "bob left the queue, alice still holds", |s| {
            s.waiters == 0 && s.active_locks == 1 && s.leases == 1
        })
        .await;
        h.shutdown();
    }
}
