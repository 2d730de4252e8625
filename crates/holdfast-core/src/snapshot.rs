//! Durable state out (`durable_state`) and back in (`restore`), with validation of what comes
//! back: a corrupted or hand-edited state is refused rather than served.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::engine::Engine;
use crate::error::RestoreError;
use crate::idempotency::IdemEntry;
use crate::keys::{Family, KeyState};
use crate::leases::{HeldLock, HeldLocks, Lease, LeaseExtra, Slot};
use crate::limits::{LEASE_TTL_MS_MAX, LOCK_DELAY_MS_MAX, Limits, SEMAPHORE_LIMIT_MAX};
use crate::types::{
    DurableState, IdempotencyRecord, IdempotencyState, LeaseRecord, LockKind, TimeMs,
};

pub(crate) fn durable_state(e: &Engine) -> DurableState {
    let mut leases: Vec<_> = e
        .leases
        .iter()
        .map(|(_, l)| l.record(e.holder_of(l)))
        .collect();
    leases.sort_by_key(|l| l.lease_id);
    let mut idempotency: Vec<_> = e.idem.values().map(|x| x.record.clone()).collect();
    idempotency.sort_by(|a, b| a.key.cmp(&b.key));
    let mut lock_delays: Vec<(String, TimeMs)> = e
        .keys
        .iter()
        .filter_map(|(k, ks)| ks.delayed_until_ms().map(|d| (k.to_string(), d)))
        .collect();
    lock_delays.sort();
    DurableState {
        fencing_next: e.fencing_next,
        event_seq_next: e.event_seq_next,
        leases,
        idempotency,
        lock_delays,
    }
}

fn err(msg: impl Into<String>) -> RestoreError {
    RestoreError(msg.into())
}

/// Builds an engine from durable state one lease record at a time, so a caller reading
/// records from disk never holds them all in memory at once: [`Restorer::new`] with the
/// counters, [`Restorer::add_lease`] for every lease, then [`Restorer::finish`]. Each record is
/// validated as it arrives; what cannot be checked record by record (duplicate tokens, grant
/// order of keys with several holders) is checked by `finish`.
#[derive(Debug)]
pub struct Restorer {
    e: Engine,
    fencing_next: u64,
    floor: TimeMs,
    now_ms: TimeMs,
    tokens: Vec<u64>,
    /// Keys with more than one holder: their holders are put in grant order by `finish`.
    shared_keys: Vec<Arc<str>>,
}

impl Restorer {
    /// Start a restore with the durable counters; `leases` (a hint) sizes the tables.
    /// Every lease's expiry will be extended to at least `now_ms + grace_ms`.
    ///
    /// # Errors
    /// A counter is 0.
    pub fn new(
        limits: Limits,
        fencing_next: u64,
        event_seq_next: u64,
        now_ms: TimeMs,
        grace_ms: u64,
        leases: usize,
    ) -> Result<Self, RestoreError> {
        let mut e = Engine::new(limits);
        if fencing_next == 0 {
            return Err(err("fencing_next is 0; tokens start at 1"));
        }
        if event_seq_next == 0 {
            return Err(err("event_seq_next is 0; sequence numbers start at 1"));
        }
        e.fencing_next = fencing_next;
        e.event_seq_next = event_seq_next;
        e.dirty.fencing_taken = fencing_next;
        e.dirty.seq_taken = event_seq_next;
        // Sized up front: a million leases must not rehash their way up. Only a hint: if
        // the memory cannot be had now, the tables grow as records arrive.
        e.leases.try_reserve(leases);
        e.keys.try_reserve(leases);
        let mut tokens = Vec::new();
        let _ = tokens.try_reserve(leases);
        Ok(Restorer {
            e,
            fencing_next,
            floor: now_ms.saturating_add(grace_ms),
            now_ms,
            tokens,
            shared_keys: Vec::new(),
        })
    }

    /// Add one lease with its locks (into the lease table, the key table and the timers).
    ///
    /// # Errors
    /// The record is inconsistent (in itself or with the leases added before it).
    pub fn add_lease(&mut self, rec: LeaseRecord) -> Result<(), RestoreError> {
        let id = rec.lease_id;
        if rec.holder.is_empty() {
            return Err(err(format!("lease {id} has an empty holder")));
        }
        // Bounds that every request is held to, and that the compact in-memory form relies
        // on (a TTL and a lock-delay in 32 bits, a semaphore limit in 30).
        if !(1..=LEASE_TTL_MS_MAX).contains(&rec.ttl_ms) {
            return Err(err(format!(
                "lease {id} has ttl_ms {}, not in 1..={LEASE_TTL_MS_MAX}",
                rec.ttl_ms
            )));
        }
        for h in &rec.locks {
            if h.lock_delay_ms > LOCK_DELAY_MS_MAX {
                return Err(err(format!(
                    "lease {id} holds {} with lock_delay_ms {} above {LOCK_DELAY_MS_MAX}",
                    h.key, h.lock_delay_ms
                )));
            }
            if let LockKind::Semaphore { limit, .. } = h.kind
                && limit > SEMAPHORE_LIMIT_MAX
            {
                return Err(err(format!(
                    "lease {id} holds semaphore {} with limit {limit} above {SEMAPHORE_LIMIT_MAX}",
                    h.key
                )));
            }
        }
        let mut locks: Vec<HeldLock> = rec.locks.into_iter().map(HeldLock::from_record).collect();
        // Records are written in key order; sorting is only needed for a hand-made state.
        if !locks.is_sorted_by(|a, b| a.key <= b.key) {
            locks.sort_by(|a, b| a.key.cmp(&b.key));
        }
        for w in locks.windows(2) {
            if w[0].key == w[1].key {
                return Err(err(format!("lease {id} holds key {} twice", w[0].key)));
            }
        }
        if self.e.leases.contains_key(&id) {
            return Err(err(format!("lease {id} appears twice")));
        }
        for h in &locks {
            if h.count == 0 {
                return Err(err(format!("lease {id} holds {} with count 0", h.key)));
            }
            if h.fencing_token == 0 || h.fencing_token >= self.fencing_next {
                return Err(err(format!(
                    "lease {id} holds {} with fencing token {}, not in 1..{}",
                    h.key, h.fencing_token, self.fencing_next
                )));
            }
            if let LockKind::Semaphore { limit, permits } = h.kind()
                && (limit == 0 || permits == 0 || permits > limit)
            {
                return Err(err(format!(
                    "lease {id} holds semaphore {} with {permits} of {limit} permits",
                    h.key
                )));
            }
        }
        let expires_at_ms = rec.expires_at_ms.max(self.floor);
        if expires_at_ms != rec.expires_at_ms {
            self.e.dirty.leases.insert(id);
        }
        let holder = self.e.intern_holder(rec.holder);
        // The key table refers to the lease by its slot, so the lease goes in first. A
        // restorer that returned an error is not usable any more (`finish` consumes it after
        // success only), so a half-added lease does no harm.
        let slot = self.e.leases.insert(Lease::new(
            id,
            holder,
            rec.ttl_ms,
            expires_at_ms,
            rec.created_at_ms,
            HeldLocks::from_vec(locks),
            LeaseExtra {
                reason: rec.reason.map(Into::into),
                metadata: rec.metadata.map(Into::into),
                owner: rec.owner.map(Into::into),
                executing: None,
            }
            .boxed(),
        ));
        let Restorer {
            e,
            tokens,
            shared_keys,
            ..
        } = self;
        let Some(lease) = e.leases.at(slot) else {
            return Err(err("internal: added lease vanished"));
        };
        for h in &lease.locks {
            tokens.push(h.fencing_token);
            let family = Family::of(h.kind());
            let (_, ks, added) = e
                .keys
                .get_or_insert_with(&h.key, || (Arc::clone(&h.key), KeyState::new(family)));
            if added {
                e.held_keys += 1;
            } else {
                if ks.family() != family {
                    return Err(err(format!(
                        "key {} is held with different modes or semaphore limits",
                        h.key
                    )));
                }
                if ks.holders().len() == 1 {
                    shared_keys.push(Arc::clone(&h.key));
                }
            }
            ks.add_holder(slot);
            ks.held_add(h.kind());
            // Usage only grows while holders are added, so a conflict now is a conflict in
            // the whole state.
            let ok = match ks.family() {
                Family::ReadWrite => {
                    ks.held().exclusive == 0 || (ks.held().exclusive == 1 && ks.held().shared == 0)
                }
                Family::Semaphore(limit) => ks.held().permits <= u64::from(limit),
            };
            if !ok {
                return Err(err(format!("key {} has conflicting holders", h.key)));
            }
        }
        Ok(())
    }

    /// Add the idempotency records and lock-delays, check what spans records, and fire
    /// whatever is due at `now_ms`.
    ///
    /// # Errors
    /// The state is inconsistent.
    pub fn finish(
        self,
        idempotency: Vec<IdempotencyRecord>,
        lock_delays: Vec<(String, TimeMs)>,
    ) -> Result<Engine, RestoreError> {
        let Restorer {
            mut e,
            now_ms,
            mut tokens,
            shared_keys,
            ..
        } = self;
        tokens.sort_unstable();
        if let Some(w) = tokens.windows(2).find(|w| w[0] == w[1]) {
            return Err(err(format!(
                "fencing token {} is issued to two grants",
                w[0]
            )));
        }
        drop(tokens);

        // Holders in grant order (ascending token) where a key has several.
        for key in shared_keys {
            let Some(ks) = e.keys.get_mut(&key) else {
                return Err(err("internal: shared key vanished"));
            };
            let mut hs: Vec<(u64, Slot)> = Vec::with_capacity(ks.holders().len());
            for slot in ks.holders().iter() {
                let token = e
                    .leases
                    .at(*slot)
                    .and_then(|l| l.lock(&key))
                    .map(|h| h.fencing_token)
                    .ok_or_else(|| err("internal: holder vanished"))?;
                hs.push((token, *slot));
            }
            hs.sort_unstable();
            ks.set_holders(hs.into_iter().map(|(_, slot)| slot).collect());
        }

        for (key, until) in lock_delays {
            let (_, ks, _) = e.keys.get_or_insert_with(&key, || {
                (key.as_str().into(), KeyState::new(Family::ReadWrite))
            });
            if ks.delayed_until_ms().is_some() {
                return Err(err(format!("key {key} has two lock-delays")));
            }
            ks.set_delayed_until_ms(Some(until));
            e.delay_timers.insert((until, key.into()));
        }

        for rec in idempotency {
            if e.idem.contains_key(rec.key.as_str()) {
                return Err(err(format!("idempotency record {} appears twice", rec.key)));
            }
            match &rec.state {
                IdempotencyState::InProgress { lease_id } => {
                    let Some(l) = e.leases.get_mut(lease_id) else {
                        return Err(err(format!(
                            "idempotency record {} is in progress under a missing lease",
                            rec.key
                        )));
                    };
                    if l.executing().is_some() {
                        return Err(err(format!(
                            "lease {lease_id} executes two idempotency records"
                        )));
                    }
                    l.set_executing(Some(rec.key.as_str().into()));
                }
                IdempotencyState::Completed(_) => {
                    let Some(exp) = rec.expires_at_ms else {
                        return Err(err(format!(
                            "completed idempotency record {} has no expiry",
                            rec.key
                        )));
                    };
                    e.idem_timers.insert((exp, rec.key.as_str().into()));
                }
            }
            e.idem.insert(
                rec.key.as_str().into(),
                IdemEntry {
                    record: rec,
                    waiters: VecDeque::new(),
                },
            );
        }

        e.advance(now_ms);
        e.run_grants(now_ms);
        // Every rule about the *data* is checked above, record by record; the full recomputation
        // of the engine's indexes checks this function's own construction, which the tests (debug
        // builds) do on every restore. In release it was the largest part of a restart (a million
        // leases: ~30 % of the time), so it is left to the tests.
        #[cfg(debug_assertions)]
        e.check_invariants().map_err(err)?;
        Ok(e)
    }
}

pub(crate) fn restore(
    limits: Limits,
    state: DurableState,
    now_ms: TimeMs,
    grace_ms: u64,
) -> Result<Engine, RestoreError> {
    let mut r = Restorer::new(
        limits,
        state.fencing_next,
        state.event_seq_next,
        now_ms,
        grace_ms,
        state.leases.len(),
    )?;
    for rec in state.leases {
        r.add_lease(rec)?;
    }
    r.finish(state.idempotency, state.lock_delays)
}
