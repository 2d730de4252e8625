//! Shared helpers for the engine's integration tests.
#![allow(dead_code)]

pub mod model;

use holdfast_core::*;

pub fn lid(n: u128) -> LeaseId {
    LeaseId(n)
}

pub fn new_lease(id: u128, holder: &str, ttl_ms: u64) -> NewLease {
    NewLease {
        lease_id: LeaseId(id),
        holder: holder.to_owned(),
        ttl_ms,
        reason: None,
        metadata: None,
        owner: None,
    }
}

pub fn spec(key: &str, kind: LockKind) -> LockSpec {
    LockSpec {
        key: key.to_owned(),
        kind,
        lock_delay_ms: 0,
    }
}

pub fn x(key: &str) -> LockSpec {
    spec(key, LockKind::Exclusive)
}

pub fn s(key: &str) -> LockSpec {
    spec(key, LockKind::Shared)
}

pub fn sem(key: &str, limit: u32, permits: u32) -> LockSpec {
    spec(key, LockKind::Semaphore { limit, permits })
}

pub fn req_new(id: u128, holder: &str, locks: Vec<LockSpec>, wait_ms: u64) -> AcquireRequest {
    AcquireRequest {
        target: LeaseTarget::New(new_lease(id, holder, 10_000)),
        locks,
        wait_ms,
        reentrant: true,
    }
}

pub fn req_existing(id: u128, locks: Vec<LockSpec>, wait_ms: u64) -> AcquireRequest {
    AcquireRequest {
        target: LeaseTarget::Existing(LeaseId(id)),
        locks,
        wait_ms,
        reentrant: true,
    }
}

/// Acquire and check invariants.
pub fn acq(e: &mut Engine, now: u64, r: AcquireRequest) -> Result<AcquireOutcome, LockError> {
    let out = e.acquire(now, r);
    e.check_invariants().unwrap();
    out
}

pub fn granted(out: Result<AcquireOutcome, LockError>) -> Grant {
    match out {
        Ok(AcquireOutcome::Granted(g)) => g,
        other => panic!("expected a grant, got {other:?}"),
    }
}

pub fn queued(out: Result<AcquireOutcome, LockError>) -> WaiterId {
    match out {
        Ok(AcquireOutcome::Queued(w)) => w,
        other => panic!("expected queued, got {other:?}"),
    }
}

pub fn tick(e: &mut Engine, now: u64) {
    e.tick(now);
    e.check_invariants().unwrap();
}

/// The one notification for `w` among those pending (panics if absent).
pub fn outcome_of(notes: &[Notification], w: WaiterId) -> WaitOutcome {
    notes
        .iter()
        .find(|n| n.waiter == w)
        .map(|n| n.outcome.clone())
        .unwrap_or_else(|| panic!("no notification for {w:?} in {notes:?}"))
}

pub fn holders_of(e: &Engine, key: &str) -> Vec<String> {
    e.lock_info(key)
        .map(|i| i.holders.into_iter().map(|(_, h)| h.holder).collect())
        .unwrap_or_default()
}

/// Proptest case count: `default`, or `HOLDFAST_PROPTEST_CASES` for long soak runs.
pub fn cases(default: u32) -> u32 {
    std::env::var("HOLDFAST_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
