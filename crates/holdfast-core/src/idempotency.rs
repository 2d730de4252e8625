//! Idempotency records: one execution per idempotency key, its result replayed to twins.
//!
//! A record is `InProgress` under an executor lease (created by `begin`, holding no locks) or
//! `Completed` with a stored result until `expires_at_ms`. Twins that arrive while it is in
//! progress either get `InProgress` at once or wait in the record's FIFO queue. When the
//! execution ends without a result (abort, executor lease released or expired) the record is
//! deleted and the first waiting twin becomes the new executor.

use std::collections::VecDeque;

use crate::engine::{Engine, Removal};
use crate::error::LockError;
use crate::types::{
    IdempotencyBegin, IdempotencyOutcome, IdempotencyRecord, IdempotencyResult, IdempotencyState,
    LeaseId, NewLease, TimeMs, WaitOutcome, WaiterId,
};
use crate::validate;

/// A record and the twins waiting for its outcome.
#[derive(Clone, Debug)]
pub(crate) struct IdemEntry {
    pub record: IdempotencyRecord,
    /// Waiting twins in arrival order.
    pub waiters: VecDeque<WaiterId>,
}

/// A twin waiting for an in-progress execution.
#[derive(Clone, Debug)]
pub(crate) struct IdemWaiter {
    pub key: Box<str>,
    /// The lease it executes under if it is promoted to executor.
    pub lease: NewLease,
    pub fingerprint: String,
    pub record_ttl_ms: u64,
    pub deadline_ms: TimeMs,
}

impl Engine {
    pub(crate) fn idem_begin_at(
        &mut self,
        now: TimeMs,
        req: IdempotencyBegin,
    ) -> Result<IdempotencyOutcome, LockError> {
        validate::idempotency_begin(&req, &self.limits)?;
        let Some(entry) = self.idem.get(req.key.as_str()) else {
            let view = self.start_execution(
                now,
                req.key.as_str().into(),
                req.lease,
                req.fingerprint,
                req.record_ttl_ms,
                VecDeque::new(),
            )?;
            return Ok(IdempotencyOutcome::Started(view));
        };
        if entry.record.fingerprint != req.fingerprint {
            return Ok(IdempotencyOutcome::FingerprintMismatch);
        }
        let executor = match &entry.record.state {
            IdempotencyState::Completed(result) => {
                return Ok(IdempotencyOutcome::Completed(result.clone()));
            }
            IdempotencyState::InProgress { lease_id } => *lease_id,
        };
        if req.wait_ms == 0 {
            let lease = self.leases.get(&executor);
            return Ok(IdempotencyOutcome::InProgress {
                holder: lease
                    .map(|l| self.holder_of(l).to_string())
                    .unwrap_or_default(),
                expires_at_ms: lease.map_or(now, crate::leases::Lease::expires_at_ms),
            });
        }
        if entry.waiters.len() >= self.limits.waiters_per_key_max {
            return Err(LockError::Overloaded {
                what: format!("waiters on idempotency key {}", req.key),
                limit: self.limits.waiters_per_key_max as u64,
            });
        }
        let id = WaiterId(self.next_waiter_id);
        self.next_waiter_id += 1;
        let deadline_ms = now.saturating_add(req.wait_ms);
        self.waiter_timers.insert((deadline_ms, id));
        if let Some(entry) = self.idem.get_mut(req.key.as_str()) {
            entry.waiters.push_back(id);
        }
        self.idem_waiters.insert(
            id,
            IdemWaiter {
                key: req.key.as_str().into(),
                lease: req.lease,
                fingerprint: req.fingerprint,
                record_ttl_ms: req.record_ttl_ms,
                deadline_ms,
            },
        );
        Ok(IdempotencyOutcome::Queued(id))
    }

    /// Create the executor lease and the in-progress record.
    fn start_execution(
        &mut self,
        t: TimeMs,
        key: Box<str>,
        lease: NewLease,
        fingerprint: String,
        record_ttl_ms: u64,
        waiters: VecDeque<WaiterId>,
    ) -> Result<crate::types::LeaseView, LockError> {
        let lease_id = self.create_lease(lease, t, Some(key.clone()))?;
        let record = IdempotencyRecord {
            key: key.to_string(),
            fingerprint,
            state: IdempotencyState::InProgress { lease_id },
            created_at_ms: t,
            record_ttl_ms,
            expires_at_ms: None,
        };
        self.idem.insert(key.clone(), IdemEntry { record, waiters });
        self.dirty.idempotency.insert(key);
        Ok(self.lease_view_of(lease_id))
    }

    /// The in-progress record `key` executed by `lease_id`, else `IdempotencyNotFound`.
    fn executing_entry(&self, key: &str, lease_id: LeaseId) -> Result<(), LockError> {
        match self.idem.get(key).map(|e| &e.record.state) {
            Some(IdempotencyState::InProgress { lease_id: l }) if *l == lease_id => Ok(()),
            _ => Err(LockError::IdempotencyNotFound {
                key: key.to_owned(),
            }),
        }
    }

    pub(crate) fn idem_complete_at(
        &mut self,
        now: TimeMs,
        key: &str,
        lease_id: LeaseId,
        result: IdempotencyResult,
    ) -> Result<IdempotencyRecord, LockError> {
        validate::idempotency_result(&result)?;
        self.executing_entry(key, lease_id)?;
        let Some(entry) = self.idem.get_mut(key) else {
            return Err(LockError::IdempotencyNotFound {
                key: key.to_owned(),
            });
        };
        let expires_at_ms = now.saturating_add(entry.record.record_ttl_ms);
        entry.record.state = IdempotencyState::Completed(result.clone());
        entry.record.expires_at_ms = Some(expires_at_ms);
        let record = entry.record.clone();
        let waiters = std::mem::take(&mut entry.waiters);
        self.idem_timers.insert((expires_at_ms, key.into()));
        self.dirty.idempotency.insert(key.into());
        if let Some(l) = self.leases.get_mut(&lease_id) {
            l.set_executing(None);
        }
        self.remove_lease(lease_id, now, &Removal::Released);
        for w in waiters {
            if let Some(iw) = self.idem_waiters.remove(&w) {
                self.waiter_timers.remove(&(iw.deadline_ms, w));
                self.notify(
                    w,
                    WaitOutcome::Idempotency(IdempotencyOutcome::Completed(result.clone())),
                );
            }
        }
        Ok(record)
    }

    pub(crate) fn idem_abort_at(
        &mut self,
        now: TimeMs,
        key: &str,
        lease_id: LeaseId,
    ) -> Result<(), LockError> {
        self.executing_entry(key, lease_id)?;
        if let Some(l) = self.leases.get_mut(&lease_id) {
            l.set_executing(None);
        }
        self.idem_executor_gone(key, lease_id, now);
        self.remove_lease(lease_id, now, &Removal::Released);
        Ok(())
    }

    /// The execution of `key` by `lease_id` ended without a result: delete the record and
    /// promote the first waiting twin (if any) to executor.
    pub(crate) fn idem_executor_gone(&mut self, key: &str, lease_id: LeaseId, t: TimeMs) {
        if self.executing_entry(key, lease_id).is_err() {
            return;
        }
        let Some(entry) = self.idem.remove(key) else {
            return;
        };
        self.dirty.idempotency.insert(key.into());
        let mut waiters = entry.waiters;
        while let Some(w) = waiters.pop_front() {
            let Some(iw) = self.idem_waiters.remove(&w) else {
                continue;
            };
            self.waiter_timers.remove(&(iw.deadline_ms, w));
            if self.leases.contains_key(&iw.lease.lease_id) {
                self.notify(
                    w,
                    WaitOutcome::Failed(validate::invalid(
                        "lease_id",
                        "a lease with this id already exists",
                    )),
                );
                continue;
            }
            let started = self.start_execution(
                t,
                key.into(),
                iw.lease,
                iw.fingerprint,
                iw.record_ttl_ms,
                std::mem::take(&mut waiters),
            );
            let outcome = match started {
                Ok(view) => WaitOutcome::Idempotency(IdempotencyOutcome::Started(view)),
                Err(e) => WaitOutcome::Failed(e),
            };
            self.notify(w, outcome);
            return;
        }
    }

    /// Remove an idempotency waiter from its record's queue and the timers.
    pub(crate) fn remove_idem_waiter(&mut self, w: WaiterId) -> Option<IdemWaiter> {
        let iw = self.idem_waiters.remove(&w)?;
        self.waiter_timers.remove(&(iw.deadline_ms, w));
        if let Some(entry) = self.idem.get_mut(&iw.key) {
            entry.waiters.retain(|x| *x != w);
        }
        Some(iw)
    }

    pub(crate) fn idem_time_out(&mut self, w: WaiterId, _t: TimeMs) {
        if let Some(iw) = self.remove_idem_waiter(w) {
            self.counters.timeouts += 1;
            self.notify(
                w,
                WaitOutcome::Failed(LockError::WaitTimeout {
                    key: iw.key.to_string(),
                    holders: Vec::new(),
                }),
            );
        }
    }
}
