//! The engine: the public API and the lock machinery (grants, queues, expiry, events).
//!
//! Idempotency records live in `idempotency.rs`, restore and snapshots in `snapshot.rs`,
//! the invariant checker in `invariants.rs`, deadlock detection in `deadlock.rs`.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, LazyLock};

use crate::error::{LockError, RestoreError};
use crate::idempotency::{IdemEntry, IdemWaiter};
use crate::idhash::{IdMap, IdSet};
use crate::keys::{Family, KeyState, KeyTable, LockWaiter, Usage, WaitTarget};
use crate::leases::{HeldLock, HeldLocks, HolderSlot, Lease, LeaseExtra, LeaseTable, Slot};
use crate::limits::Limits;
use crate::textmap::TextMap;
use crate::types::{
    AcquireOutcome, AcquireRequest, ChangeSet, DurableState, Event, EventKind, FencingCheck, Grant,
    HeldLockView, HolderSummary, IdempotencyBegin, IdempotencyOutcome, IdempotencyRecord,
    IdempotencyResult, LeaseId, LeaseTarget, LeaseView, LockFilter, LockInfo, LockKind, LockSpec,
    NewLease, Notification, Stats, TimeMs, WaitOutcome, WaiterId, WaiterSummary,
};
use crate::validate;

/// What a request needs on a key, given what its own lease already holds there.
/// `None`: the lease already holds the key in a kind that covers the request, so the request
/// only increments the hold count there and never waits or blocks anyone on that key.
/// A shared holder asking for exclusive is an upgrade: it needs `Exclusive` (its own shared
/// grant does not count against it).
pub(crate) fn demand(held: Option<&HeldLock>, want: LockKind) -> Option<LockKind> {
    let Some(h) = held else { return Some(want) };
    match (h.kind(), want) {
        (LockKind::Shared, LockKind::Exclusive) => Some(LockKind::Exclusive),
        (LockKind::Exclusive, LockKind::Exclusive | LockKind::Shared)
        | (LockKind::Shared, LockKind::Shared)
        | (LockKind::Semaphore { .. }, LockKind::Semaphore { .. }) => None,
        _ => Some(want),
    }
}

/// How a lease leaves.
#[derive(Clone, Debug)]
pub(crate) enum Removal {
    Released,
    Expired,
    Forced(String),
}

/// Which lease a grant goes to.
pub(crate) enum GrantTarget {
    New(NewLease),
    Lease(LeaseId),
}

/// `discard_changes` keeps the dirty-lease set's buffer up to this capacity.
const DIRTY_LEASES_KEPT_CAPACITY: usize = 64;

/// Durable records touched since the last `take_changes`.
#[derive(Debug, Default)]
pub(crate) struct Dirty {
    pub leases: IdSet<LeaseId>,
    pub idempotency: HashSet<Box<str>>,
    pub lock_delays: HashSet<Box<str>>,
    pub fencing_taken: u64,
    pub seq_taken: u64,
}

/// Counters reported by `stats` (not durable: they restart at zero).
#[derive(Debug, Default, Clone)]
pub(crate) struct Counters {
    pub grants: u64,
    pub releases: u64,
    pub timeouts: u64,
    pub deadlocks: u64,
    pub expirations: u64,
    pub force_releases: u64,
}

/// The lock engine. See the crate documentation for its invariants.
#[derive(Debug)]
pub struct Engine {
    pub(crate) limits: Limits,
    /// The latest time seen; time never goes backwards inside the engine.
    pub(crate) now_ms: TimeMs,
    pub(crate) fencing_next: u64,
    pub(crate) event_seq_next: u64,
    pub(crate) next_waiter_id: u64,
    pub(crate) leases: LeaseTable,
    pub(crate) keys: KeyTable,
    /// Holder names of live leases, each stored once and shared by its leases (and by
    /// events), with the number of live leases using it.
    pub(crate) holder_names: TextMap<u32>,
    pub(crate) waiters: IdMap<WaiterId, LockWaiter>,
    pub(crate) idem: HashMap<Box<str>, IdemEntry>,
    pub(crate) idem_waiters: IdMap<WaiterId, IdemWaiter>,
    /// Timers, one ordered set per kind (lease expiry: the lease table's heap); ties at one
    /// instant fire in the order lease expiry, lock-delay end, idempotency record expiry,
    /// wait timeout.
    pub(crate) delay_timers: BTreeSet<(TimeMs, Box<str>)>,
    pub(crate) idem_timers: BTreeSet<(TimeMs, Box<str>)>,
    pub(crate) waiter_timers: BTreeSet<(TimeMs, WaiterId)>,
    /// Keys whose queues must be re-examined (holders left, a waiter left, a delay ended).
    pub(crate) worklist: Vec<Box<str>>,
    pub(crate) notifications: Vec<Notification>,
    pub(crate) events: Vec<Event>,
    pub(crate) dirty: Dirty,
    pub(crate) counters: Counters,
    /// Keys with at least one holder.
    pub(crate) held_keys: u64,
}

impl Default for Engine {
    fn default() -> Self {
        Engine::new(Limits::default())
    }
}

impl Engine {
    /// An empty engine with these limits.
    #[must_use]
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            now_ms: 0,
            fencing_next: 1,
            event_seq_next: 1,
            next_waiter_id: 1,
            leases: LeaseTable::default(),
            keys: KeyTable::default(),
            holder_names: TextMap::default(),
            waiters: IdMap::default(),
            idem: HashMap::new(),
            idem_waiters: IdMap::default(),
            delay_timers: BTreeSet::new(),
            idem_timers: BTreeSet::new(),
            waiter_timers: BTreeSet::new(),
            worklist: Vec::new(),
            notifications: Vec::new(),
            events: Vec::new(),
            dirty: Dirty {
                fencing_taken: 1,
                seq_taken: 1,
                ..Dirty::default()
            },
            counters: Counters::default(),
            held_keys: 0,
        }
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
        crate::snapshot::restore(limits, state, now_ms, grace_ms)
    }

    /// Every live lease's id and owner credential, without copying the state (the host counts
    /// leases per token from it at start).
    pub fn lease_owners(&self) -> impl Iterator<Item = (LeaseId, Option<&str>)> + '_ {
        self.leases
            .iter()
            .map(|(_, lease)| (lease.id(), lease.owner()))
    }

    /// The number of live leases.
    #[must_use]
    pub fn lease_count(&self) -> usize {
        self.leases.len()
    }

    /// The complete durable state (for snapshots and tests).
    #[must_use]
    pub fn durable_state(&self) -> DurableState {
        crate::snapshot::durable_state(self)
    }

    /// The limits in force.
    #[must_use]
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Acquire locks atomically: grant now, refuse, or queue (`wait_ms > 0`).
    ///
    /// - Granted at once only if, on every key, the request is compatible with the holders and
    ///   with every queued request (no barging) and the key is not in lock-delay; otherwise
    ///   `LockHeld` (no-wait) or queued on every key it names.
    /// - `LeaseTarget::New` with `reentrant`: if a lease of the same holder *and the same
    ///   owner credential* holds one of the keys, the request joins that lease: keys it holds
    ///   get count + 1 (same token), others are acquired into it; its TTL and reason (if given)
    ///   are refreshed and `created_lease` is false.
    /// - On a lease's own keys (join or `Existing`): held exclusive covers a shared request;
    ///   held shared + exclusive requested is an upgrade (waits for the other holders; on grant
    ///   the lock becomes exclusive under a new fencing token, count + 1); a semaphore must be
    ///   re-requested with the same permits (`Invalid` otherwise).
    /// - A lease (existing, or the one a reentrant request joins) has at most one queued
    ///   request at a time: a second one that would have to wait is refused with `Overloaded`
    ///   (a lease waits for one thing at a time, like a database session; this keeps deadlock
    ///   detection at enqueue time complete). A request that would close a wait-for cycle is
    ///   refused with `Deadlock`.
    pub fn acquire(
        &mut self,
        now_ms: TimeMs,
        request: AcquireRequest,
    ) -> Result<AcquireOutcome, LockError> {
        let now = self.advance(now_ms);
        let out = self.acquire_at(now, request);
        self.run_grants(now);
        out
    }

    /// Remove a queued request (its client went away). Returns false if it is not queued
    /// (already answered). A queued request that was granted but whose answer could not be
    /// delivered is undone with [`Engine::undo_grant`] instead.
    pub fn cancel_wait(&mut self, now_ms: TimeMs, waiter: WaiterId) -> bool {
        let now = self.advance(now_ms);
        let found = if self.waiters.contains_key(&waiter) {
            self.remove_waiter(waiter);
            true
        } else {
            self.remove_idem_waiter(waiter).is_some()
        };
        self.run_grants(now);
        found
    }

    /// Undo a grant that could not be delivered: release the lease it created, or release
    /// each key it joined once.
    pub fn undo_grant(&mut self, now_ms: TimeMs, grant: &Grant) {
        let now = self.advance(now_ms);
        let id = grant.lease.lease_id;
        if grant.created_lease {
            self.remove_lease(id, now, &Removal::Released);
        } else {
            for g in &grant.granted {
                let _ = self.release_one(now, id, &g.key);
            }
        }
        self.run_grants(now);
    }

    /// Extend a lease (and all its locks) to `now_ms + ttl_ms` (`None`: its current TTL).
    pub fn renew(
        &mut self,
        now_ms: TimeMs,
        lease_id: LeaseId,
        ttl_ms: Option<u64>,
    ) -> Result<LeaseView, LockError> {
        let now = self.advance(now_ms);
        if let Some(ttl) = ttl_ms {
            validate::ttl_ms("ttl_ms", ttl, &self.limits)?;
        }
        let Some(lease) = self.leases.get(&lease_id) else {
            return Err(LockError::LeaseNotFound { lease_id });
        };
        let ttl = ttl_ms.unwrap_or(lease.ttl_ms());
        let holder = Arc::clone(self.holder_of(lease));
        self.set_expiry(lease_id, ttl, now);
        self.emit(
            now,
            EventKind::Renewed,
            None,
            holder,
            None,
            None,
            None,
            None,
        );
        Ok(self.lease_view_of(lease_id))
    }

    /// Release a lease and all its locks. Returns the lease as it was.
    pub fn release_lease(
        &mut self,
        now_ms: TimeMs,
        lease_id: LeaseId,
    ) -> Result<LeaseView, LockError> {
        let now = self.advance(now_ms);
        let lease = self
            .remove_lease(lease_id, now, &Removal::Released)
            .ok_or(LockError::LeaseNotFound { lease_id })?;
        self.run_grants(now);
        Ok(lease.0.view(&lease.1))
    }

    /// Release one lock of a lease: decrements its reentrant count, frees it at zero. Returns
    /// the lease after the release (it lives on, possibly holding nothing).
    pub fn release_lock(
        &mut self,
        now_ms: TimeMs,
        lease_id: LeaseId,
        key: &str,
    ) -> Result<LeaseView, LockError> {
        let now = self.advance(now_ms);
        let out = self.release_one(now, lease_id, key);
        self.run_grants(now);
        out.map(|()| self.lease_view_of(lease_id))
    }

    /// Admin: free a key from all its holders (whole count), applying lock-delay.
    /// Returns the holders that lost it (their leases after the loss; they live on).
    pub fn force_release_lock(
        &mut self,
        now_ms: TimeMs,
        key: &str,
        reason: &str,
    ) -> Result<Vec<LeaseView>, LockError> {
        let now = self.advance(now_ms);
        validate::admin_reason(reason)?;
        let holders = match self.keys.get(key) {
            Some(ks) if !ks.holders().is_empty() => ks.holders().to_vec(),
            _ => {
                return Err(LockError::LockNotFound {
                    key: key.to_owned(),
                });
            }
        };
        self.counters.force_releases += 1;
        let mut out = Vec::with_capacity(holders.len());
        for slot in holders {
            let Some(id) = self.leases.at(slot).map(Lease::id) else {
                continue;
            };
            if let Some(held) = self.take_lock(id, key) {
                let holder = self
                    .leases
                    .get(&id)
                    .map_or_else(|| Arc::from(""), |l| Arc::clone(self.holder_of(l)));
                self.dirty.leases.insert(id);
                self.after_unhold(now, &holder, &held, &Removal::Forced(reason.to_owned()));
                self.recheck_pending(id, key, now);
                out.push(self.lease_view_of(id));
            }
        }
        self.run_grants(now);
        Ok(out)
    }

    /// Admin: release a whole lease involuntarily (lock-delay applies).
    pub fn force_release_lease(
        &mut self,
        now_ms: TimeMs,
        lease_id: LeaseId,
        reason: &str,
    ) -> Result<LeaseView, LockError> {
        let now = self.advance(now_ms);
        validate::admin_reason(reason)?;
        if !self.leases.contains_key(&lease_id) {
            return Err(LockError::LeaseNotFound { lease_id });
        }
        self.counters.force_releases += 1;
        let lease = self
            .remove_lease(lease_id, now, &Removal::Forced(reason.to_owned()))
            .ok_or(LockError::LeaseNotFound { lease_id })?;
        self.run_grants(now);
        Ok(lease.0.view(&lease.1))
    }

    /// Apply everything due by `now_ms`: lease expiries, wait timeouts, lock-delay ends,
    /// idempotency record expiry.
    pub fn tick(&mut self, now_ms: TimeMs) {
        let now = self.advance(now_ms);
        self.run_grants(now);
    }

    /// The earliest time at which [`Engine::tick`] has something to do.
    #[must_use]
    pub fn next_deadline_ms(&self) -> Option<TimeMs> {
        self.next_due().map(|(t, _)| t)
    }

    /// Answers for queued requests produced since the last call.
    pub fn take_notifications(&mut self) -> Vec<Notification> {
        std::mem::take(&mut self.notifications)
    }

    /// Events produced since the last call, in sequence order.
    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    /// The events since the last call, drained in place: unlike [`Engine::take_events`], the
    /// buffer keeps its capacity, so a host that publishes them at once allocates nothing.
    pub fn drain_events(&mut self) -> std::vec::Drain<'_, Event> {
        self.events.drain(..)
    }

    /// Forget the durable changes since the last call without building their records, for a
    /// host that persists nothing (building a [`ChangeSet`] copies every touched lease). Calls
    /// `touched` once per lease changed since the last call, with its owner (`Some(owner)`) if
    /// it lives, `None` if it is gone.
    pub fn discard_changes(&mut self, mut touched: impl FnMut(LeaseId, Option<Option<&str>>)) {
        let mut leases = std::mem::take(&mut self.dirty.leases);
        self.dirty = Dirty {
            fencing_taken: self.fencing_next,
            seq_taken: self.event_seq_next,
            ..Dirty::default()
        };
        for id in leases.drain() {
            touched(id, self.leases.get(&id).map(Lease::owner));
        }
        // The emptied lease set goes back, so that the next command does not allocate one
        // again; unless a burst made it large, since emptying walks every bucket.
        if leases.capacity() <= DIRTY_LEASES_KEPT_CAPACITY {
            self.dirty.leases = leases;
        }
    }

    /// Durable changes since the last call.
    pub fn take_changes(&mut self) -> ChangeSet {
        let dirty = std::mem::take(&mut self.dirty);
        let mut cs = ChangeSet::default();
        if self.fencing_next != dirty.fencing_taken {
            cs.fencing_next = Some(self.fencing_next);
        }
        if self.event_seq_next != dirty.seq_taken {
            cs.event_seq_next = Some(self.event_seq_next);
        }
        self.dirty.fencing_taken = self.fencing_next;
        self.dirty.seq_taken = self.event_seq_next;
        // Sort the (small) ids first so the records are never moved by a sort.
        let mut ids: Vec<LeaseId> = dirty.leases.into_iter().collect();
        ids.sort_unstable();
        cs.leases = ids
            .into_iter()
            .map(|id| {
                let record = self.leases.get(&id).map(|l| l.record(self.holder_of(l)));
                (id, record)
            })
            .collect::<BTreeMap<_, _>>();
        let mut keys: Vec<Box<str>> = dirty.idempotency.into_iter().collect();
        keys.sort_unstable();
        cs.idempotency = keys
            .into_iter()
            .map(|k| {
                let rec = self.idem.get(&k).map(|e| e.record.clone());
                (k.into_string(), rec)
            })
            .collect();
        let mut keys: Vec<Box<str>> = dirty.lock_delays.into_iter().collect();
        keys.sort_unstable();
        cs.lock_delays = keys
            .into_iter()
            .map(|k| {
                let d = self.keys.get(&k).and_then(|ks| ks.delayed_until_ms());
                (k.into_string(), d)
            })
            .collect();
        cs
    }

    /// A lease, if live at `now_ms` (does not apply expiries).
    #[must_use]
    pub fn lease(&self, lease_id: LeaseId) -> Option<LeaseView> {
        self.leases
            .get(&lease_id)
            .map(|l| l.view(self.holder_of(l)))
    }

    /// One key's holders, waiters and lock-delay; `None` if the key is entirely free.
    #[must_use]
    pub fn lock_info(&self, key: &str) -> Option<LockInfo> {
        let ks = self.keys.get(key)?;
        let holders = ks
            .holders()
            .iter()
            .filter_map(|slot| {
                let lease = self.leases.at(*slot)?;
                Some((
                    lease.id(),
                    holder_summary(lease, self.holder_of(lease), lease.lock(key)?),
                ))
            })
            .collect();
        let waiters = ks
            .waiters()
            .filter_map(|w| {
                let waiter = self.waiters.get(w)?;
                let spec = waiter.locks.iter().find(|s| s.key == key)?;
                Some(WaiterSummary {
                    holder: waiter.holder.to_string(),
                    kind: spec.kind,
                    since_ms: waiter.since_ms,
                    deadline_ms: waiter.deadline_ms,
                })
            })
            .collect();
        Some(LockInfo {
            key: key.to_owned(),
            holders,
            waiters,
            delayed_until_ms: ks.delayed_until_ms(),
        })
    }

    /// Keys with holders, waiters or lock-delay, in key order, filtered.
    #[must_use]
    pub fn list_locks(&self, filter: &LockFilter) -> Vec<LockInfo> {
        let mut keys: Vec<&str> = self
            .keys
            .iter()
            .filter(|(k, _)| filter.prefix.as_deref().is_none_or(|p| k.starts_with(p)))
            .filter(|(_, ks)| {
                filter.holder.as_deref().is_none_or(|h| {
                    ks.holders().iter().any(|s| {
                        self.leases
                            .at(*s)
                            .is_some_and(|l| &**self.holder_of(l) == h)
                    })
                })
            })
            .map(|(k, _)| &**k)
            .collect();
        keys.sort_unstable();
        keys.into_iter().filter_map(|k| self.lock_info(k)).collect()
    }

    /// Sequencer check: is `fencing_token` a current grant of `key`?
    #[must_use]
    pub fn check_fencing(&self, key: &str, fencing_token: u64) -> FencingCheck {
        let current_tokens: Vec<u64> = self
            .keys
            .get(key)
            .map(|ks| {
                ks.holders()
                    .iter()
                    .filter_map(|s| Some(self.leases.at(*s)?.lock(key)?.fencing_token))
                    .collect()
            })
            .unwrap_or_default();
        FencingCheck {
            current: current_tokens.contains(&fencing_token),
            current_tokens,
        }
    }

    /// Counters and gauges.
    #[must_use]
    pub fn stats(&self) -> Stats {
        Stats {
            active_locks: self.held_keys,
            leases: self.leases.len() as u64,
            waiters: (self.waiters.len() + self.idem_waiters.len()) as u64,
            idempotency_records: self.idem.len() as u64,
            grants_total: self.counters.grants,
            releases_total: self.counters.releases,
            timeouts_total: self.counters.timeouts,
            deadlocks_total: self.counters.deadlocks,
            expirations_total: self.counters.expirations,
            force_releases_total: self.counters.force_releases,
            fencing_next: self.fencing_next,
        }
    }

    /// Begin an idempotent execution.
    pub fn idempotency_begin(
        &mut self,
        now_ms: TimeMs,
        request: IdempotencyBegin,
    ) -> Result<IdempotencyOutcome, LockError> {
        let now = self.advance(now_ms);
        let out = self.idem_begin_at(now, request);
        self.run_grants(now);
        out
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
        let now = self.advance(now_ms);
        let out = self.idem_complete_at(now, key, lease_id, result);
        self.run_grants(now);
        out
    }

    /// Abandon an execution: the key becomes free for a retry (a waiting twin may start).
    pub fn idempotency_abort(
        &mut self,
        now_ms: TimeMs,
        key: &str,
        lease_id: LeaseId,
    ) -> Result<(), LockError> {
        let now = self.advance(now_ms);
        let out = self.idem_abort_at(now, key, lease_id);
        self.run_grants(now);
        out
    }

    /// Read a record.
    #[must_use]
    pub fn idempotency_get(&self, key: &str) -> Option<IdempotencyRecord> {
        self.idem.get(key).map(|e| e.record.clone())
    }

    /// Check every invariant; `Err` describes the first broken one.
    pub fn check_invariants(&self) -> Result<(), String> {
        crate::invariants::check(self)
    }
}

/// How a holder looks in refusals and listings.
pub(crate) fn holder_summary(lease: &Lease, holder: &str, held: &HeldLock) -> HolderSummary {
    HolderSummary {
        holder: holder.to_owned(),
        kind: held.kind(),
        since_ms: held.acquired_at_ms,
        expires_at_ms: lease.expires_at_ms(),
        reason: lease.reason().map(str::to_owned),
        fencing_token: held.fencing_token,
        count: held.count,
    }
}

// ---------------------------------------------------------------------------------------
// Internal machinery.
// ---------------------------------------------------------------------------------------

impl Engine {
    // ----- time -----

    /// The next timer: (time, rank) with rank 0 lease expiry, 1 lock-delay end,
    /// 2 idempotency record expiry, 3 wait timeout.
    pub(crate) fn next_due(&self) -> Option<(TimeMs, u8)> {
        let candidates = [
            self.leases.first_expiry().map(|(t, _)| (t, 0u8)),
            self.delay_timers.first().map(|(t, _)| (*t, 1u8)),
            self.idem_timers.first().map(|(t, _)| (*t, 2u8)),
            self.waiter_timers.first().map(|(t, _)| (*t, 3u8)),
        ];
        candidates.into_iter().flatten().min()
    }

    /// Apply every timer due by `now` in time order (each at its own instant, so the result
    /// does not depend on how often the host ticks). Returns the effective now.
    pub(crate) fn advance(&mut self, now_ms: TimeMs) -> TimeMs {
        let now = now_ms.max(self.now_ms);
        while let Some((t, rank)) = self.next_due() {
            if t > now {
                break;
            }
            match rank {
                0 => {
                    if let Some((_, id)) = self.leases.first_expiry()
                        && self.remove_lease(id, t, &Removal::Expired).is_some()
                    {
                        self.counters.expirations += 1;
                    }
                }
                1 => {
                    if let Some((_, key)) = self.delay_timers.pop_first()
                        && let Some(ks) = self.keys.get_mut(&key)
                    {
                        ks.set_delayed_until_ms(None);
                        self.dirty.lock_delays.insert(key.clone());
                        self.settle_key(&key);
                    }
                }
                2 => {
                    if let Some((_, key)) = self.idem_timers.pop_first() {
                        self.idem.remove(&key);
                        self.dirty.idempotency.insert(key);
                    }
                }
                _ => {
                    if let Some(&(_, w)) = self.waiter_timers.first() {
                        self.time_out(w, t);
                        // time_out deletes the timer entry; make sure a stale one goes too.
                        self.waiter_timers.remove(&(t, w));
                    }
                }
            }
            self.run_grants(t);
        }
        self.now_ms = now;
        now
    }

    fn set_expiry(&mut self, id: LeaseId, ttl_ms: u64, now: TimeMs) {
        if let Some(slot) = self.leases.slot_of(id) {
            self.leases
                .set_expiry(slot, ttl_ms, now.saturating_add(ttl_ms));
            self.dirty.leases.insert(id);
        }
    }

    // ----- events and notifications -----

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn emit(
        &mut self,
        at_ms: TimeMs,
        kind: EventKind,
        key: Option<Arc<str>>,
        holder: Arc<str>,
        lock_kind: Option<LockKind>,
        fencing_token: Option<u64>,
        held_ms: Option<u64>,
        waited_ms: Option<u64>,
    ) {
        let seq = self.event_seq_next;
        self.event_seq_next += 1;
        self.events.push(Event {
            seq,
            at_ms,
            kind,
            key,
            holder,
            lock_kind,
            fencing_token,
            held_ms,
            waited_ms,
        });
    }

    pub(crate) fn notify(&mut self, waiter: WaiterId, outcome: WaitOutcome) {
        self.notifications.push(Notification { waiter, outcome });
    }

    pub(crate) fn lease_view_of(&self, id: LeaseId) -> LeaseView {
        self.leases
            .get(&id)
            .map_or_else(|| empty_view(id), |l| l.view(self.holder_of(l)))
    }

    // ----- demand and grantability -----

    /// What queued request `w` needs on `key` (`None`: nothing that can block).
    pub(crate) fn waiter_demand(&self, w: &LockWaiter, key: &str) -> Option<LockKind> {
        let spec = w.locks.iter().find(|s| s.key == key)?;
        let held = w
            .target_lease()
            .and_then(|id| self.leases.get(&id))
            .and_then(|l| l.lock(key));
        demand(held, spec.kind)
    }

    /// What the queued requests ahead of `before` (all of them if `None`) need on a key.
    fn queue_usage(&self, ks: &KeyState, key: &str, before: Option<WaiterId>) -> Usage {
        let mut u = Usage::default();
        for w in ks.waiters() {
            if before.is_some_and(|b| *w >= b) {
                break;
            }
            if let Some(d) = self.waiters.get(w).and_then(|x| self.waiter_demand(x, key)) {
                u.add(d);
            }
        }
        u
    }

    /// Can a request of lease `own` get `spec` now, given the requests queued before
    /// `before` (`None`: the whole queue)?
    fn key_admits(&self, own: Option<&Lease>, spec: &LockSpec, before: Option<WaiterId>) -> bool {
        let held = own.and_then(|l| l.lock(&spec.key));
        let Some(d) = demand(held, spec.kind) else {
            return true;
        };
        let Some(ks) = self.keys.get(spec.key.as_str()) else {
            return true;
        };
        if ks.delayed() {
            return false;
        }
        let mut holders = ks.held();
        if let Some(h) = held {
            holders.sub(h.kind());
        }
        holders
            .with(self.queue_usage(ks, &spec.key, before))
            .admits(d)
    }

    /// The first key (in request order) on which the request cannot be granted now.
    fn first_blocked<'a>(
        &self,
        own: Option<LeaseId>,
        locks: &'a [LockSpec],
        before: Option<WaiterId>,
    ) -> Option<&'a LockSpec> {
        let own = own.and_then(|id| self.leases.get(&id));
        locks.iter().find(|s| !self.key_admits(own, s, before))
    }

    fn holder_summaries(&self, key: &str) -> Vec<HolderSummary> {
        self.keys
            .get(key)
            .map(|ks| {
                ks.holders()
                    .iter()
                    .filter_map(|s| {
                        let lease = self.leases.at(*s)?;
                        Some(holder_summary(
                            lease,
                            self.holder_of(lease),
                            lease.lock(key)?,
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// How a key in use is used now (for `LimitMismatch`): a holder's kind, else a waiter's.
    fn existing_kind(&self, key: &str, ks: &KeyState) -> Option<LockKind> {
        ks.holders()
            .iter()
            .find_map(|s| Some(self.leases.at(*s)?.lock(key)?.kind()))
            .or_else(|| {
                ks.waiters().find_map(|w| {
                    let waiter = self.waiters.get(w)?;
                    Some(waiter.locks.iter().find(|s| s.key == key)?.kind)
                })
            })
    }

    // ----- acquire -----

    /// The holder's lease a reentrant request joins: one of the holder's leases (same owner
    /// credential) that holds one of the requested keys, first in request order.
    fn find_join(&self, nl: &NewLease, locks: &[LockSpec]) -> Option<LeaseId> {
        // A holder with no live lease has no slot, and nothing to join.
        let holder = HolderSlot(self.holder_names.slot_of(&nl.holder)?);
        locks.iter().find_map(|spec| {
            let ks = self.keys.get(spec.key.as_str())?;
            ks.holders().iter().find_map(|s| {
                self.leases
                    .at(*s)
                    .filter(|l| l.holder == holder && l.owner() == nl.owner.as_deref())
                    .map(Lease::id)
            })
        })
    }

    fn acquire_at(
        &mut self,
        now: TimeMs,
        request: AcquireRequest,
    ) -> Result<AcquireOutcome, LockError> {
        validate::locks(&request.locks, &self.limits)?;
        validate::wait_ms(request.wait_ms, &self.limits)?;
        let (target, join) = match &request.target {
            LeaseTarget::New(nl) => {
                validate::new_lease(nl, &self.limits)?;
                let join = if request.reentrant {
                    self.find_join(nl, &request.locks)
                } else {
                    None
                };
                match join {
                    Some(id) => (Some(id), Some((nl.ttl_ms, nl.reason.clone()))),
                    None => (None, None),
                }
            }
            LeaseTarget::Existing(id) => {
                if !self.leases.contains_key(id) {
                    return Err(LockError::LeaseNotFound { lease_id: *id });
                }
                (Some(*id), None)
            }
        };
        let own = target.and_then(|id| self.leases.get(&id));
        for (i, spec) in request.locks.iter().enumerate() {
            if let Some(ks) = self.keys.get(spec.key.as_str())
                && ks.in_use()
                && ks.family() != Family::of(spec.kind)
            {
                return Err(LockError::LimitMismatch {
                    key: spec.key.clone(),
                    existing: self.existing_kind(&spec.key, ks).unwrap_or(spec.kind),
                    requested: spec.kind,
                });
            }
            if let Some(h) = own.and_then(|l| l.lock(&spec.key))
                && let (
                    LockKind::Semaphore { permits: have, .. },
                    LockKind::Semaphore { permits: want, .. },
                ) = (h.kind(), spec.kind)
                && have != want
            {
                return Err(validate::invalid(
                    format!("locks[{i}].kind.permits"),
                    format!(
                        "the lease already holds {have} permits of {}; a reentrant request must ask for the same number",
                        spec.key
                    ),
                ));
            }
        }

        let Some(blocked) = self.first_blocked(target, &request.locks, None) else {
            let grant_target = match (target, request.target) {
                (Some(id), _) => GrantTarget::Lease(id),
                (None, LeaseTarget::New(nl)) => GrantTarget::New(nl),
                (None, LeaseTarget::Existing(id)) => GrantTarget::Lease(id),
            };
            return self
                .do_grant(now, grant_target, &request.locks, join, None)
                .map(AcquireOutcome::Granted);
        };
        let blocked_key = blocked.key.clone();
        let blocked_kind = blocked.kind;
        if request.wait_ms == 0 {
            let delayed_until_ms = self
                .keys
                .get(blocked_key.as_str())
                .and_then(|ks| ks.delayed_until_ms())
                .filter(|d| *d > now);
            return Err(LockError::LockHeld {
                holders: self.holder_summaries(&blocked_key),
                key: blocked_key,
                delayed_until_ms,
            });
        }
        if let Some(id) = target
            && self.leases.get(&id).is_some_and(|l| l.pending().is_some())
        {
            return Err(LockError::Overloaded {
                what: "queued requests of this lease".to_owned(),
                limit: 1,
            });
        }
        for spec in &request.locks {
            if let Some(ks) = self.keys.get(spec.key.as_str())
                && ks.waiter_count() >= self.limits.waiters_per_key_max
            {
                return Err(LockError::Overloaded {
                    what: format!("waiters on key {}", spec.key),
                    limit: self.limits.waiters_per_key_max as u64,
                });
            }
        }
        let holder = match (&request.target, target) {
            (LeaseTarget::New(nl), _) => nl.holder.clone(),
            (LeaseTarget::Existing(_), Some(id)) => self
                .leases
                .get(&id)
                .map(|l| self.holder_of(l).to_string())
                .unwrap_or_default(),
            (LeaseTarget::Existing(id), None) => {
                return Err(LockError::LeaseNotFound { lease_id: *id });
            }
        };
        if let Some(id) = target
            && let Some(cycle) = self.find_deadlock(id, &request.locks)
        {
            self.counters.deadlocks += 1;
            self.emit(
                now,
                EventKind::Deadlock,
                Some(blocked_key.as_str().into()),
                holder.as_str().into(),
                Some(blocked_kind),
                None,
                None,
                None,
            );
            return Err(LockError::Deadlock {
                key: blocked_key,
                cycle,
            });
        }

        // Queue on every key the request names, in arrival order.
        let id = WaiterId(self.next_waiter_id);
        self.next_waiter_id += 1;
        for spec in &request.locks {
            let family = Family::of(spec.kind);
            let (_, ks, _) = self.keys.get_or_insert_with(&spec.key, || {
                (spec.key.as_str().into(), KeyState::new(family))
            });
            if !ks.in_use() {
                ks.set_family(family);
            }
            ks.push_waiter(id);
        }
        let deadline_ms = now.saturating_add(request.wait_ms);
        self.waiter_timers.insert((deadline_ms, id));
        if let Some(lid) = target
            && let Some(l) = self.leases.get_mut(&lid)
        {
            l.set_pending(Some(id));
        }
        let wait_target = match (target, request.target) {
            (Some(lid), _) => WaitTarget::Lease(lid),
            (None, LeaseTarget::New(nl)) => WaitTarget::New(nl),
            (None, LeaseTarget::Existing(lid)) => WaitTarget::Lease(lid),
        };
        self.waiters.insert(
            id,
            LockWaiter {
                target: wait_target,
                join,
                holder: holder.into(),
                locks: request.locks,
                since_ms: now,
                deadline_ms,
            },
        );
        Ok(AcquireOutcome::Queued(id))
    }

    /// Create a lease that holds nothing yet.
    /// Takes the request's strings by value: no copies.
    pub(crate) fn create_lease(
        &mut self,
        nl: NewLease,
        t: TimeMs,
        executing: Option<Box<str>>,
    ) -> Result<LeaseId, LockError> {
        if self.leases.contains_key(&nl.lease_id) {
            return Err(validate::invalid(
                "lease_id",
                "a lease with this id already exists",
            ));
        }
        let expires_at_ms = t.saturating_add(nl.ttl_ms);
        let extra = LeaseExtra {
            reason: nl.reason.map(String::into_boxed_str),
            metadata: nl.metadata.map(String::into_boxed_str),
            owner: nl.owner.map(String::into_boxed_str),
            executing,
        }
        .boxed();
        let holder = self.intern_holder(nl.holder);
        self.leases.insert(Lease::new(
            nl.lease_id,
            holder,
            nl.ttl_ms,
            expires_at_ms,
            t,
            HeldLocks::none(),
            extra,
        ));
        self.dirty.leases.insert(nl.lease_id);
        Ok(nl.lease_id)
    }

    /// Grant every lock of a request (the caller checked it is grantable).
    fn do_grant(
        &mut self,
        t: TimeMs,
        target: GrantTarget,
        locks: &[LockSpec],
        join: Option<(u64, Option<String>)>,
        since: Option<TimeMs>,
    ) -> Result<Grant, LockError> {
        let (id, created_lease) = match target {
            GrantTarget::New(nl) => (self.create_lease(nl, t, None)?, true),
            GrantTarget::Lease(id) => {
                if !self.leases.contains_key(&id) {
                    return Err(LockError::LeaseNotFound { lease_id: id });
                }
                (id, false)
            }
        };
        if let Some((ttl_ms, reason)) = join {
            self.set_expiry(id, ttl_ms, t);
            if let Some(r) = reason
                && let Some(l) = self.leases.get_mut(&id)
            {
                l.set_reason(Some(r.into()));
            }
        }
        let waited_ms = since.map(|s| t.saturating_sub(s));
        let mut granted = Vec::with_capacity(locks.len());
        for spec in locks {
            granted.push(self.grant_one(t, id, spec, waited_ms));
        }
        self.dirty.leases.insert(id);
        Ok(Grant {
            lease: self.lease_view_of(id),
            granted,
            created_lease,
        })
    }

    fn grant_one(
        &mut self,
        t: TimeMs,
        id: LeaseId,
        spec: &LockSpec,
        waited_ms: Option<u64>,
    ) -> HeldLockView {
        let slot = self.leases.slot_of(id);
        let Some((slot, lease)) = slot.and_then(|s| self.leases.at_mut(s).map(|l| (s, l))) else {
            // Unreachable: `do_grant` checked the lease exists. Answer "nothing held"
            // rather than panic in library code.
            return HeldLockView {
                key: spec.key.clone(),
                kind: spec.kind,
                fencing_token: 0,
                count: 0,
                acquired_at_ms: t,
                lock_delay_ms: spec.lock_delay_ms,
            };
        };
        let view = match lease.lock_index(&spec.key) {
            Ok(i) => {
                let h = &mut lease.locks[i];
                h.count += 1;
                if h.kind() == LockKind::Shared && spec.kind == LockKind::Exclusive {
                    // Upgrade: the grant becomes exclusive under a new fencing token and moves
                    // to the end of the key's grant order.
                    h.set_kind(LockKind::Exclusive);
                    h.fencing_token = self.fencing_next;
                    self.fencing_next += 1;
                    if let Some(ks) = self.keys.get_mut(spec.key.as_str()) {
                        ks.held_sub(LockKind::Shared);
                        ks.held_add(LockKind::Exclusive);
                        ks.remove_holder(slot);
                        ks.add_holder(slot);
                    }
                }
                h.view()
            }
            Err(i) => {
                // The held lock shares the key's text with the key table (one lookup finds
                // or adds the key).
                let family = Family::of(spec.kind);
                let (key, ks, _) = self.keys.get_or_insert_with(&spec.key, || {
                    (spec.key.as_str().into(), KeyState::new(family))
                });
                if !ks.in_use() {
                    ks.set_family(family);
                }
                ks.add_holder(slot);
                ks.held_add(spec.kind);
                if ks.holders().len() == 1 {
                    self.held_keys += 1;
                }
                let h = HeldLock::new(
                    Arc::clone(key),
                    spec.kind,
                    self.fencing_next,
                    t,
                    spec.lock_delay_ms,
                );
                self.fencing_next += 1;
                let view = h.view();
                lease.locks.insert(i, h);
                view
            }
        };
        let holder = Arc::clone(holder_name(&self.holder_names, lease.holder));
        let key = lease.lock(&spec.key).map(|h| Arc::clone(&h.key));
        self.counters.grants += 1;
        self.emit(
            t,
            EventKind::Granted,
            key,
            holder,
            Some(view.kind),
            Some(view.fencing_token),
            None,
            waited_ms,
        );
        view
    }

    // ----- queue scans -----

    /// Grant every queued request that has become grantable.
    ///
    /// Grants are confluent: granting a grantable request never makes another request
    /// grantable or ungrantable (it was already counted, as an earlier waiter or as a
    /// compatible later one; see `ARCHITECTURE.md`). So one pass collects every grantable request
    /// of the keys that changed, and they are granted together in arrival order, which fixes
    /// the order of fencing tokens, events and notifications.
    pub(crate) fn run_grants(&mut self, t: TimeMs) {
        while !self.worklist.is_empty() {
            let mut keys = std::mem::take(&mut self.worklist);
            keys.sort_unstable();
            keys.dedup();
            let mut ready = BTreeSet::new();
            for key in &keys {
                self.scan_key(key, &mut ready);
            }
            for w in ready {
                self.grant_waiter(w, t);
            }
        }
    }

    /// Collect the grantable requests queued on `key`, walking the queue from its head and
    /// stopping once the requests ahead leave no room for any later one.
    fn scan_key(&self, key: &str, ready: &mut BTreeSet<WaiterId>) {
        let Some(ks) = self.keys.get(key) else { return };
        if ks.waiter_count() == 0 || ks.delayed() {
            return;
        }
        let mut ahead = Usage::default();
        for &w in ks.waiters() {
            let Some(waiter) = self.waiters.get(&w) else {
                continue;
            };
            let own = waiter.target_lease().and_then(|id| self.leases.get(&id));
            let Some(spec) = waiter.locks.iter().find(|s| s.key == key) else {
                continue;
            };
            let held = own.and_then(|l| l.lock(key));
            let d = demand(held, spec.kind);
            let here = d.is_none_or(|d| {
                let mut holders = ks.held();
                if let Some(h) = held {
                    holders.sub(h.kind());
                }
                holders.with(ahead).admits(d)
            });
            if here
                && waiter
                    .locks
                    .iter()
                    .filter(|s| s.key != key)
                    .all(|s| self.key_admits(own, s, Some(w)))
            {
                ready.insert(w);
            }
            if let Some(d) = d {
                ahead.add(d);
                if ahead.full(ks.family()) {
                    break;
                }
            }
        }
    }

    fn grant_waiter(&mut self, w: WaiterId, t: TimeMs) {
        let Some(waiter) = self.remove_waiter_quietly(w) else {
            return;
        };
        let target = match waiter.target {
            WaitTarget::New(nl) => GrantTarget::New(nl),
            WaitTarget::Lease(id) => GrantTarget::Lease(id),
        };
        let outcome =
            match self.do_grant(t, target, &waiter.locks, waiter.join, Some(waiter.since_ms)) {
                Ok(g) => WaitOutcome::Granted(g),
                Err(e) => {
                    // Nothing was granted: the requests behind it may now go.
                    for spec in &waiter.locks {
                        self.settle_key(&spec.key);
                    }
                    WaitOutcome::Failed(e)
                }
            };
        self.notify(w, outcome);
    }

    /// Take a lock waiter out of every queue and index; the keys it leaves are re-examined.
    pub(crate) fn remove_waiter(&mut self, w: WaiterId) -> Option<LockWaiter> {
        let waiter = self.remove_waiter_quietly(w)?;
        for spec in &waiter.locks {
            self.settle_key(&spec.key);
        }
        Some(waiter)
    }

    /// Take a lock waiter out of every queue and index, without waking anyone (it is being
    /// granted, and a grant never enables another request). Empty keys are kept for the
    /// grant that follows; `gc_key` runs later.
    fn remove_waiter_quietly(&mut self, w: WaiterId) -> Option<LockWaiter> {
        let waiter = self.waiters.remove(&w)?;
        self.waiter_timers.remove(&(waiter.deadline_ms, w));
        for spec in &waiter.locks {
            if let Some(ks) = self.keys.get_mut(spec.key.as_str()) {
                ks.remove_waiter(w);
            }
        }
        if let Some(id) = waiter.target_lease()
            && let Some(l) = self.leases.get_mut(&id)
            && l.pending() == Some(w)
        {
            l.set_pending(None);
        }
        Some(waiter)
    }

    fn time_out(&mut self, w: WaiterId, t: TimeMs) {
        if self.waiters.contains_key(&w) {
            let (key, first_key, kind, holder, since) = {
                let Some(waiter) = self.waiters.get(&w) else {
                    return;
                };
                let blocked = self
                    .first_blocked(waiter.target_lease(), &waiter.locks, Some(w))
                    .unwrap_or(&waiter.locks[0]);
                (
                    blocked.key.clone(),
                    waiter.locks[0].key.clone(),
                    waiter.locks[0].kind,
                    waiter.holder.to_string(),
                    waiter.since_ms,
                )
            };
            let holders = self.holder_summaries(&key);
            self.remove_waiter(w);
            self.counters.timeouts += 1;
            self.emit(
                t,
                EventKind::TimedOut,
                Some(first_key.into()),
                holder.into(),
                Some(kind),
                None,
                None,
                Some(t.saturating_sub(since)),
            );
            self.notify(
                w,
                WaitOutcome::Failed(LockError::WaitTimeout { key, holders }),
            );
        } else {
            self.idem_time_out(w, t);
        }
    }

    // ----- releases -----

    /// Detach a lock from a lease and from the key's holders (no events, no delay).
    fn take_lock(&mut self, id: LeaseId, key: &str) -> Option<HeldLock> {
        let slot = self.leases.slot_of(id)?;
        let lease = self.leases.at_mut(slot)?;
        let i = lease.lock_index(key).ok()?;
        let held = lease.locks.remove(i);
        self.unhold(slot, &held);
        Some(held)
    }

    /// Remove a lease from a key's holders.
    fn unhold(&mut self, slot: Slot, held: &HeldLock) {
        if let Some(ks) = self.keys.get_mut(&held.key)
            && ks.remove_holder(slot)
        {
            ks.held_sub(held.kind());
            if ks.holders().is_empty() {
                self.held_keys -= 1;
            }
        }
    }

    /// Event, lock-delay and queue wake-up after a lock left its holder.
    fn after_unhold(&mut self, t: TimeMs, holder: &Arc<str>, held: &HeldLock, how: &Removal) {
        let kind = match how {
            Removal::Released => {
                self.counters.releases += 1;
                EventKind::Released
            }
            Removal::Expired => EventKind::Expired,
            Removal::Forced(reason) => EventKind::ForceReleased {
                reason: reason.clone(),
            },
        };
        self.emit(
            t,
            kind,
            Some(Arc::clone(&held.key)),
            Arc::clone(holder),
            Some(held.kind()),
            Some(held.fencing_token),
            Some(t.saturating_sub(held.acquired_at_ms)),
            None,
        );
        if !matches!(how, Removal::Released) && held.lock_delay_ms() > 0 {
            self.set_delay(&held.key, t.saturating_add(held.lock_delay_ms()));
        }
        self.settle_key(&held.key);
    }

    /// After a key lost a holder, waiter or delay: drop it if nothing is left, else have the
    /// next grant pass re-examine its queue (if it has one).
    pub(crate) fn settle_key(&mut self, key: &str) {
        match self.keys.get(key) {
            Some(ks) if ks.is_empty() => {
                self.keys.remove(key);
            }
            Some(ks) if ks.waiter_count() > 0 => self.worklist.push(key.into()),
            _ => {}
        }
    }

    fn set_delay(&mut self, key: &str, until: TimeMs) {
        if let Some(ks) = self.keys.get_mut(key) {
            let old = ks.delayed_until_ms();
            if old.is_some_and(|o| o >= until) {
                return;
            }
            if let Some(o) = old {
                self.delay_timers.remove(&(o, Box::from(key)));
            }
            ks.set_delayed_until_ms(Some(until));
            self.delay_timers.insert((until, key.into()));
            self.dirty.lock_delays.insert(key.into());
        }
    }

    /// Release one hold of `key` by a lease (voluntary).
    fn release_one(&mut self, t: TimeMs, id: LeaseId, key: &str) -> Result<(), LockError> {
        let slot = self
            .leases
            .slot_of(id)
            .ok_or(LockError::LeaseNotFound { lease_id: id })?;
        let lease = self
            .leases
            .at_mut(slot)
            .ok_or(LockError::LeaseNotFound { lease_id: id })?;
        let i = lease.lock_index(key).map_err(|_| LockError::LockNotHeld {
            key: key.to_owned(),
        })?;
        self.dirty.leases.insert(id);
        if lease.locks[i].count > 1 {
            lease.locks[i].count -= 1;
            return Ok(());
        }
        let held = lease.locks.remove(i);
        let holder = Arc::clone(holder_name(&self.holder_names, lease.holder));
        self.unhold(slot, &held);
        self.after_unhold(t, &holder, &held, &Removal::Released);
        self.recheck_pending(id, key, t);
        Ok(())
    }

    /// The slot of a holder name (stored once however many leases it has), for a new lease:
    /// counts one more lease using it.
    pub(crate) fn intern_holder(&mut self, name: String) -> HolderSlot {
        let (slot, _) = self
            .holder_names
            .slot_or_insert_with(&name, || (Arc::from(name.as_str()), 0));
        if let Some(leases) = self.holder_names.at_mut(slot) {
            *leases += 1;
        }
        HolderSlot(slot)
    }

    /// A lease's holder name.
    pub(crate) fn holder_of(&self, lease: &Lease) -> &Arc<str> {
        holder_name(&self.holder_names, lease.holder)
    }

    /// Remove a lease with all its locks; its queued request fails; an idempotency
    /// execution it ran returns to free. Returns the lease and its holder name.
    pub(crate) fn remove_lease(
        &mut self,
        id: LeaseId,
        t: TimeMs,
        how: &Removal,
    ) -> Option<(Lease, Arc<str>)> {
        let (slot, lease) = self.leases.remove(&id)?;
        let holder = Arc::clone(self.holder_of(&lease));
        // The name is dropped from the table with its last lease.
        if let Some(leases) = self.holder_names.at_mut(lease.holder.0) {
            *leases -= 1;
            if *leases == 0 {
                self.holder_names.remove_at(lease.holder.0);
            }
        }
        self.dirty.leases.insert(id);
        for held in &lease.locks {
            self.unhold(slot, held);
            self.after_unhold(t, &holder, held, how);
        }
        if let Some(w) = lease.pending() {
            self.remove_waiter(w);
            self.notify(
                w,
                WaitOutcome::Failed(LockError::LeaseNotFound { lease_id: id }),
            );
        }
        if let Some(key) = lease.executing() {
            self.idem_executor_gone(key, id, t);
        }
        Some((lease, holder))
    }
}

/// The holder name in `slot` of the holder table (every live lease's holder is there; a
/// free function so that it borrows only the table, beside a lease borrowed mutably).
pub(crate) fn holder_name(names: &TextMap<u32>, slot: HolderSlot) -> &Arc<str> {
    static NO_HOLDER: LazyLock<Arc<str>> = LazyLock::new(|| Arc::from(""));
    names.at(slot.0).map_or(&*NO_HOLDER, |(name, _)| name)
}

fn empty_view(id: LeaseId) -> LeaseView {
    LeaseView {
        lease_id: id,
        holder: String::new(),
        ttl_ms: 0,
        expires_at_ms: 0,
        created_at_ms: 0,
        reason: None,
        metadata: None,
        owner: None,
        locks: Vec::new(),
    }
}
