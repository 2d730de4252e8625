//! The engine. (Contract stub: the implementation replaces the bodies.)

use crate::error::{LockError, RestoreError};
use crate::limits::Limits;
use crate::types::{
    AcquireOutcome, AcquireRequest, ChangeSet, DurableState, Event, FencingCheck, Grant,
    IdempotencyBegin, IdempotencyOutcome, IdempotencyRecord, IdempotencyResult, LeaseId,
    LeaseView, LockFilter, LockInfo, Notification, Stats, TimeMs, WaiterId,
};

/// The lock engine. See the crate documentation for its invariants.
#[derive(Debug, Default)]
pub struct Engine {
    limits: Limits,
}

#[allow(unused_variables, clippy::unused_self, clippy::needless_pass_by_value)]
impl Engine {
    /// An empty engine with these limits.
    #[must_use]
    pub fn new(limits: Limits) -> Self {
        Self { limits }
    }

    /// Rebuild from durable state. Every lease's expiry is extended to at least
    /// `now_ms + grace_ms` so living clients can renew after a restart. Fails if the state
    /// breaks an invariant (conflicting holders, tokens at or above `fencing_next`, ...).
    pub fn restore(
        limits: Limits,
        state: DurableState,
        now_ms: TimeMs,
        grace_ms: u64,
    ) -> Result<Self, RestoreError> {
        unimplemented!()
    }

    /// The complete durable state (for snapshots and tests).
    #[must_use]
    pub fn durable_state(&self) -> DurableState {
        unimplemented!()
    }

    /// The limits in force.
    #[must_use]
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Acquire locks atomically: grant now, refuse, or queue (`wait_ms > 0`).
    pub fn acquire(
        &mut self,
        now_ms: TimeMs,
        request: AcquireRequest,
    ) -> Result<AcquireOutcome, LockError> {
        unimplemented!()
    }

    /// Remove a queued request (its client went away). Returns false if it is not queued
    /// (already answered). A queued request that was granted but whose answer could not be
    /// delivered is undone with [`Engine::undo_grant`] instead.
    pub fn cancel_wait(&mut self, now_ms: TimeMs, waiter: WaiterId) -> bool {
        unimplemented!()
    }

    /// Undo a grant that could not be delivered: release the lease it created, or release
    /// each key it joined once.
    pub fn undo_grant(&mut self, now_ms: TimeMs, grant: &Grant) {
        unimplemented!()
    }

    /// Extend a lease (and all its locks) to `now_ms + ttl_ms` (`None`: its current TTL).
    pub fn renew(
        &mut self,
        now_ms: TimeMs,
        lease_id: LeaseId,
        ttl_ms: Option<u64>,
    ) -> Result<LeaseView, LockError> {
        unimplemented!()
    }

    /// Release a lease and all its locks. Returns the lease as it was.
    pub fn release_lease(
        &mut self,
        now_ms: TimeMs,
        lease_id: LeaseId,
    ) -> Result<LeaseView, LockError> {
        unimplemented!()
    }

    /// Release one lock of a lease: decrements its reentrant count, frees it at zero. Returns
    /// the lease after the release (it lives on, possibly holding nothing).
    pub fn release_lock(
        &mut self,
        now_ms: TimeMs,
        lease_id: LeaseId,
        key: &str,
    ) -> Result<LeaseView, LockError> {
        unimplemented!()
    }

    /// Admin: free a key from all its holders (whole count), applying lock-delay.
    /// Returns the holders that lost it.
    pub fn force_release_lock(
        &mut self,
        now_ms: TimeMs,
        key: &str,
        reason: &str,
    ) -> Result<Vec<LeaseView>, LockError> {
        unimplemented!()
    }

    /// Admin: release a whole lease involuntarily (lock-delay applies).
    pub fn force_release_lease(
        &mut self,
        now_ms: TimeMs,
        lease_id: LeaseId,
        reason: &str,
    ) -> Result<LeaseView, LockError> {
        unimplemented!()
    }

    /// Apply everything due by `now_ms`: lease expiries, wait timeouts, lock-delay ends,
    /// idempotency record expiry.
    pub fn tick(&mut self, now_ms: TimeMs) {
        unimplemented!()
    }

    /// The earliest time at which [`Engine::tick`] has something to do.
    #[must_use]
    pub fn next_deadline_ms(&self) -> Option<TimeMs> {
        unimplemented!()
    }

    /// Answers for queued requests produced since the last call.
    pub fn take_notifications(&mut self) -> Vec<Notification> {
        unimplemented!()
    }

    /// Events produced since the last call, in sequence order.
    pub fn take_events(&mut self) -> Vec<Event> {
        unimplemented!()
    }

    /// Durable changes since the last call.
    pub fn take_changes(&mut self) -> ChangeSet {
        unimplemented!()
    }

    /// A lease, if live at `now_ms` (does not apply expiries).
    #[must_use]
    pub fn lease(&self, lease_id: LeaseId) -> Option<LeaseView> {
        unimplemented!()
    }

    /// One key's holders, waiters and lock-delay; `None` if the key is entirely free.
    #[must_use]
    pub fn lock_info(&self, key: &str) -> Option<LockInfo> {
        unimplemented!()
    }

    /// Keys with holders or waiters, in key order, filtered.
    #[must_use]
    pub fn list_locks(&self, filter: &LockFilter) -> Vec<LockInfo> {
        unimplemented!()
    }

    /// Sequencer check: is `fencing_token` a current grant of `key`?
    #[must_use]
    pub fn check_fencing(&self, key: &str, fencing_token: u64) -> FencingCheck {
        unimplemented!()
    }

    /// Counters and gauges.
    #[must_use]
    pub fn stats(&self) -> Stats {
        unimplemented!()
    }

    /// Begin an idempotent execution.
    pub fn idempotency_begin(
        &mut self,
        now_ms: TimeMs,
        request: IdempotencyBegin,
    ) -> Result<IdempotencyOutcome, LockError> {
        unimplemented!()
    }

    /// Store the result of an execution this lease started; releases the executor's lease
    /// and answers waiting twins with `Completed`.
    pub fn idempotency_complete(
        &mut self,
        now_ms: TimeMs,
        key: &str,
        lease_id: LeaseId,
        result: IdempotencyResult,
    ) -> Result<IdempotencyRecord, LockError> {
        unimplemented!()
    }

    /// Abandon an execution: the key becomes free for a retry (a waiting twin may start).
    pub fn idempotency_abort(
        &mut self,
        now_ms: TimeMs,
        key: &str,
        lease_id: LeaseId,
    ) -> Result<(), LockError> {
        unimplemented!()
    }

    /// Read a record.
    #[must_use]
    pub fn idempotency_get(&self, key: &str) -> Option<IdempotencyRecord> {
        unimplemented!()
    }

    /// Check every invariant; `Err` describes the first broken one.
    pub fn check_invariants(&self) -> Result<(), String> {
        unimplemented!()
    }
}
