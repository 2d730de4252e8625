//! Leases and the locks they hold.
//!
//! A lease owns its held locks (the per-grant facts: kind, fencing token, count, times); the key
//! table only lists which leases hold a key. Strings are boxed (`Box<str>`, 16 bytes) to keep a
//! held lock small.

use std::sync::Arc;

use crate::types::{HeldLockView, LeaseId, LeaseRecord, LeaseView, LockKind, TimeMs, WaiterId};

/// One lock held by a lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct HeldLock {
    pub key: Arc<str>,
    pub kind: LockKind,
    pub fencing_token: u64,
    pub count: u32,
    pub acquired_at_ms: TimeMs,
    pub lock_delay_ms: u64,
}

impl HeldLock {
    pub fn view(&self) -> HeldLockView {
        HeldLockView {
            key: self.key.to_string(),
            kind: self.kind,
            fencing_token: self.fencing_token,
            count: self.count,
            acquired_at_ms: self.acquired_at_ms,
            lock_delay_ms: self.lock_delay_ms,
        }
    }

    pub fn from_record(v: HeldLockView) -> Self {
        HeldLock {
            key: v.key.into(),
            kind: v.kind,
            fencing_token: v.fencing_token,
            count: v.count,
            acquired_at_ms: v.acquired_at_ms,
            lock_delay_ms: v.lock_delay_ms,
        }
    }
}

/// A live lease.
#[derive(Clone, Debug)]
pub(crate) struct Lease {
    // No copy of the id: the lease table's key is the id (16 bytes per lease saved).
    /// Interned: the leases of one holder share the text (`Engine::intern_holder`).
    pub holder: Arc<str>,
    pub ttl_ms: u64,
    pub expires_at_ms: TimeMs,
    pub created_at_ms: TimeMs,
    /// Held locks, sorted by key (binary search; listings need key order anyway).
    pub locks: Vec<HeldLock>,
    /// The lease's one queued lock request (incremental or reentrant join), if any;
    /// 0 = none (waiter ids start at 1; 8 bytes instead of 16 for an `Option`).
    pending_raw: u64,
    /// Rarely set fields, boxed so a plain lease stays small.
    pub extra: Option<Box<LeaseExtra>>,
}

/// The optional parts of a lease.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct LeaseExtra {
    pub reason: Option<Box<str>>,
    pub metadata: Option<Box<str>>,
    pub owner: Option<Box<str>>,
    /// The idempotency record this lease is executing, if any.
    pub executing: Option<Box<str>>,
}

impl LeaseExtra {
    /// `None` if every field is empty.
    pub fn boxed(self) -> Option<Box<LeaseExtra>> {
        (self != LeaseExtra::default()).then(|| Box::new(self))
    }
}

impl Lease {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        holder: Arc<str>,
        ttl_ms: u64,
        expires_at_ms: TimeMs,
        created_at_ms: TimeMs,
        locks: Vec<HeldLock>,
        extra: Option<Box<LeaseExtra>>,
    ) -> Self {
        Lease {
            holder,
            ttl_ms,
            expires_at_ms,
            created_at_ms,
            locks,
            pending_raw: 0,
            extra,
        }
    }

    pub fn pending(&self) -> Option<WaiterId> {
        (self.pending_raw != 0).then_some(WaiterId(self.pending_raw))
    }

    pub fn set_pending(&mut self, w: Option<WaiterId>) {
        self.pending_raw = w.map_or(0, |w| w.0);
    }

    pub fn reason(&self) -> Option<&str> {
        self.extra.as_ref().and_then(|x| x.reason.as_deref())
    }

    pub fn metadata(&self) -> Option<&str> {
        self.extra.as_ref().and_then(|x| x.metadata.as_deref())
    }

    pub fn owner(&self) -> Option<&str> {
        self.extra.as_ref().and_then(|x| x.owner.as_deref())
    }

    pub fn executing(&self) -> Option<&str> {
        self.extra.as_ref().and_then(|x| x.executing.as_deref())
    }

    fn update_extra(&mut self, f: impl FnOnce(&mut LeaseExtra)) {
        let mut x = self.extra.take().map(|b| *b).unwrap_or_default();
        f(&mut x);
        self.extra = x.boxed();
    }

    pub fn set_reason(&mut self, reason: Option<Box<str>>) {
        self.update_extra(|x| x.reason = reason);
    }

    pub fn set_executing(&mut self, key: Option<Box<str>>) {
        self.update_extra(|x| x.executing = key);
    }

    pub fn lock(&self, key: &str) -> Option<&HeldLock> {
        self.locks
            .binary_search_by(|l| (*l.key).cmp(key))
            .ok()
            .map(|i| &self.locks[i])
    }

    pub fn lock_index(&self, key: &str) -> Result<usize, usize> {
        self.locks.binary_search_by(|l| (*l.key).cmp(key))
    }

    pub fn view(&self, id: LeaseId) -> LeaseView {
        LeaseView {
            lease_id: id,
            holder: self.holder.to_string(),
            ttl_ms: self.ttl_ms,
            expires_at_ms: self.expires_at_ms,
            created_at_ms: self.created_at_ms,
            reason: self.reason().map(str::to_owned),
            metadata: self.metadata().map(str::to_owned),
            owner: self.owner().map(str::to_owned),
            locks: self.locks.iter().map(HeldLock::view).collect(),
        }
    }

    pub fn record(&self, id: LeaseId) -> LeaseRecord {
        let v = self.view(id);
        LeaseRecord {
            lease_id: v.lease_id,
            holder: v.holder,
            ttl_ms: v.ttl_ms,
            expires_at_ms: v.expires_at_ms,
            created_at_ms: v.created_at_ms,
            reason: v.reason,
            metadata: v.metadata,
            owner: v.owner,
            locks: v.locks,
        }
    }
}
