//! One test (or a few) per rule of spec section 3, driven with explicit time.

mod common;

use common::*;
use holdfast_core::*;

// ----- leases, acquire, renew, release, expiry -----

#[test]
fn acquire_release_basic() {
    let mut e = Engine::default();
    let g = granted(acq(&mut e, 0, req_new(1, "alice", vec![x("a")], 0)));
    assert!(g.created_lease);
    assert_eq!(g.lease.lease_id, lid(1));
    assert_eq!(g.lease.expires_at_ms, 10_000);
    assert_eq!(g.granted[0].fencing_token, 1);
    assert_eq!(g.granted[0].count, 1);
    assert_eq!(e.stats().active_locks, 1);
    let v = e.release_lock(5, lid(1), "a").unwrap();
    e.check_invariants().unwrap();
    assert!(v.locks.is_empty(), "lease lives on without locks");
    assert!(e.lease(lid(1)).is_some());
    assert!(e.lock_info("a").is_none());
    assert_eq!(
        e.release_lock(5, lid(1), "a"),
        Err(LockError::LockNotHeld { key: "a".into() })
    );
    e.release_lease(6, lid(1)).unwrap();
    assert!(e.lease(lid(1)).is_none());
    assert_eq!(
        e.release_lease(6, lid(1)),
        Err(LockError::LeaseNotFound { lease_id: lid(1) })
    );
    let kinds: Vec<_> = e.take_events().into_iter().map(|ev| ev.kind).collect();
    assert_eq!(kinds, vec![EventKind::Granted, EventKind::Released]);
}

/// Seed 002: the same holder re-acquires; another holder is refused with who and why.
#[test]
fn seed_002_pessimistic_offline_lock() {
    let mut e = Engine::default();
    let mut nl = new_lease(1, "Dr_Green", 30_000);
    nl.reason = Some("editing".into());
    let r = AcquireRequest {
        target: LeaseTarget::New(nl.clone()),
        locks: vec![x("clinic/patient/298486374")],
        wait_ms: 0,
        reentrant: true,
    };
    let g1 = granted(acq(&mut e, 0, r.clone()));
    // A different holder is refused, and told who holds it and why.
    let mut other = r.clone();
    other.target = LeaseTarget::New(NewLease {
        lease_id: lid(2),
        holder: "lock holder 2".into(),
        ..nl.clone()
    });
    match acq(&mut e, 10, other) {
        Err(LockError::LockHeld {
            key,
            holders,
            delayed_until_ms,
        }) => {
            assert_eq!(key, "clinic/patient/298486374");
            assert_eq!(holders.len(), 1);
            assert_eq!(holders[0].holder, "Dr_Green");
            assert_eq!(holders[0].reason.as_deref(), Some("editing"));
            assert_eq!(holders[0].fencing_token, g1.granted[0].fencing_token);
            assert_eq!(delayed_until_ms, None);
        }
        other => panic!("expected LockHeld, got {other:?}"),
    }
    // The same holder re-acquires (a later web request, new random id): joins the lease.
    let mut again = r.clone();
    let mut nl3 = nl.clone();
    nl3.lease_id = lid(3);
    nl3.reason = Some("saving".into());
    again.target = LeaseTarget::New(nl3);
    let g2 = granted(acq(&mut e, 1_000, again));
    assert!(!g2.created_lease);
    assert_eq!(
        g2.lease.lease_id,
        lid(1),
        "answers with the existing lease id"
    );
    assert_eq!(g2.granted[0].count, 2);
    assert_eq!(g2.granted[0].fencing_token, g1.granted[0].fencing_token);
    assert_eq!(g2.lease.expires_at_ms, 31_000, "TTL refreshed");
    assert_eq!(
        g2.lease.reason.as_deref(),
        Some("saving"),
        "reason refreshed"
    );
    assert!(e.lease(lid(3)).is_none());
    // Releases decrement; at zero the lock is free.
    e.release_lock(2_000, lid(1), "clinic/patient/298486374")
        .unwrap();
    assert_eq!(holders_of(&e, "clinic/patient/298486374"), vec!["Dr_Green"]);
    e.release_lock(2_000, lid(1), "clinic/patient/298486374")
        .unwrap();
    assert!(e.lock_info("clinic/patient/298486374").is_none());
    e.check_invariants().unwrap();
}

#[test]
fn reentrant_false_conflicts_with_self() {
    let mut e = Engine::default();
    granted(acq(&mut e, 0, req_new(1, "a", vec![x("k")], 0)));
    let mut r = req_new(2, "a", vec![x("k")], 0);
    r.reentrant = false;
    assert!(matches!(acq(&mut e, 0, r), Err(LockError::LockHeld { .. })));
}

#[test]
fn renew_and_expiry() {
    let mut e = Engine::default();
    granted(acq(&mut e, 0, req_new(1, "a", vec![x("k")], 0)));
    assert_eq!(e.next_deadline_ms(), Some(10_000));
    let v = e.renew(5_000, lid(1), None).unwrap();
    assert_eq!(v.expires_at_ms, 15_000);
    let v = e.renew(6_000, lid(1), Some(2_000)).unwrap();
    assert_eq!(v.expires_at_ms, 8_000);
    assert_eq!(v.ttl_ms, 2_000);
    assert!(matches!(
        e.renew(6_000, lid(1), Some(10)),
        Err(LockError::Invalid { .. })
    ));
    tick(&mut e, 7_999);
    assert!(e.lease(lid(1)).is_some());
    tick(&mut e, 8_000);
    assert!(e.lease(lid(1)).is_none(), "expires_at <= now is expired");
    assert!(e.lock_info("k").is_none());
    assert_eq!(
        e.renew(8_001, lid(1), None),
        Err(LockError::LeaseNotFound { lease_id: lid(1) })
    );
    let evs = e.take_events();
    assert!(
        evs.iter()
            .any(|ev| ev.kind == EventKind::Expired && ev.at_ms == 8_000)
    );
    assert!(evs.iter().any(|ev| ev.kind == EventKind::Renewed));
    assert_eq!(e.stats().expirations_total, 1);
}

// ----- modes -----

#[test]
fn shared_and_exclusive() {
    let mut e = Engine::default();
    granted(acq(&mut e, 0, req_new(1, "a", vec![s("k")], 0)));
    granted(acq(&mut e, 0, req_new(2, "b", vec![s("k")], 0)));
    match acq(&mut e, 0, req_new(3, "c", vec![x("k")], 0)) {
        Err(LockError::LockHeld { holders, .. }) => assert_eq!(holders.len(), 2),
        other => panic!("{other:?}"),
    }
}

#[test]
fn semaphore_limits() {
    let mut e = Engine::default();
    granted(acq(&mut e, 0, req_new(1, "a", vec![sem("k", 3, 2)], 0)));
    granted(acq(&mut e, 0, req_new(2, "b", vec![sem("k", 3, 1)], 0)));
    assert!(matches!(
        acq(&mut e, 0, req_new(3, "c", vec![sem("k", 3, 1)], 0)),
        Err(LockError::LockHeld { .. })
    ));
    assert!(matches!(
        acq(&mut e, 0, req_new(4, "d", vec![sem("k", 4, 1)], 0)),
        Err(LockError::LimitMismatch { .. })
    ));
    assert!(matches!(
        acq(&mut e, 0, req_new(5, "e", vec![x("k")], 0)),
        Err(LockError::LimitMismatch { .. })
    ));
    e.release_lease(1, lid(1)).unwrap();
    granted(acq(&mut e, 1, req_new(3, "c", vec![sem("k", 3, 2)], 0)));
}

// ----- FIFO, waiting -----

#[test]
fn fifo_no_barging_and_reader_batch() {
    let mut e = Engine::default();
    granted(acq(&mut e, 0, req_new(1, "w1", vec![x("k")], 0)));
    let r1 = queued(acq(&mut e, 1, req_new(2, "r1", vec![s("k")], 5_000)));
    let r2 = queued(acq(&mut e, 2, req_new(3, "r2", vec![s("k")], 5_000)));
    let w2 = queued(acq(&mut e, 3, req_new(4, "w2", vec![x("k")], 5_000)));
    let r3 = queued(acq(&mut e, 4, req_new(5, "r3", vec![s("k")], 5_000)));
    e.release_lease(10, lid(1)).unwrap();
    e.check_invariants().unwrap();
    let notes = e.take_notifications();
    assert_eq!(
        notes.len(),
        2,
        "the two readers at the head are granted together"
    );
    assert!(matches!(outcome_of(&notes, r1), WaitOutcome::Granted(_)));
    assert!(matches!(outcome_of(&notes, r2), WaitOutcome::Granted(_)));
    // r3 must not barge past the queued writer.
    assert_eq!(holders_of(&e, "k"), vec!["r1", "r2"]);
    e.release_lease(20, lid(2)).unwrap();
    e.release_lease(21, lid(3)).unwrap();
    let notes = e.take_notifications();
    assert!(matches!(outcome_of(&notes, w2), WaitOutcome::Granted(_)));
    assert_eq!(notes.len(), 1);
    e.release_lease(30, lid(4)).unwrap();
    let notes = e.take_notifications();
    match outcome_of(&notes, r3) {
        WaitOutcome::Granted(g) => assert_eq!(g.lease.created_at_ms, 30),
        other => panic!("{other:?}"),
    }
    // Events carry waited_ms.
    let evs = e.take_events();
    let last_grant = evs
        .iter()
        .rev()
        .find(|ev| ev.kind == EventKind::Granted)
        .unwrap();
    assert_eq!(last_grant.waited_ms, Some(26));
}

#[test]
fn wait_timeout_and_cancel() {
    let mut e = Engine::default();
    granted(acq(&mut e, 0, req_new(1, "a", vec![x("k")], 0)));
    let w = queued(acq(&mut e, 0, req_new(2, "b", vec![x("k")], 1_000)));
    let w2 = queued(acq(&mut e, 0, req_new(3, "c", vec![x("k")], 5_000)));
    assert_eq!(e.next_deadline_ms(), Some(1_000));
    tick(&mut e, 1_000);
    let notes = e.take_notifications();
    match outcome_of(&notes, w) {
        WaitOutcome::Failed(LockError::WaitTimeout { key, holders }) => {
            assert_eq!(key, "k");
            assert_eq!(holders[0].holder, "a");
        }
        other => panic!("{other:?}"),
    }
    assert!(e.cancel_wait(1_001, w2));
    assert!(!e.cancel_wait(1_001, w2));
    e.check_invariants().unwrap();
    e.release_lease(1_002, lid(1)).unwrap();
    assert!(
        e.take_notifications().is_empty(),
        "a cancelled waiter is never granted"
    );
    assert!(e.lease(lid(3)).is_none());
    assert_eq!(e.stats().timeouts_total, 1);
}

#[test]
fn undo_grant_releases() {
    let mut e = Engine::default();
    granted(acq(&mut e, 0, req_new(1, "a", vec![x("k")], 0)));
    let w = queued(acq(&mut e, 0, req_new(2, "b", vec![x("k")], 1_000)));
    e.release_lease(1, lid(1)).unwrap();
    let notes = e.take_notifications();
    let WaitOutcome::Granted(g) = outcome_of(&notes, w) else {
        panic!()
    };
    e.undo_grant(2, &g);
    e.check_invariants().unwrap();
    assert!(e.lease(lid(2)).is_none());
    assert!(e.lock_info("k").is_none());
}

#[test]
fn multi_key_all_or_nothing() {
    let mut e = Engine::default();
    granted(acq(&mut e, 0, req_new(1, "a", vec![x("k2")], 0)));
    match acq(&mut e, 0, req_new(2, "b", vec![x("k1"), x("k2")], 0)) {
        Err(LockError::LockHeld { key, .. }) => assert_eq!(key, "k2"),
        other => panic!("{other:?}"),
    }
    assert!(e.lock_info("k1").is_none(), "nothing granted");
    let w = queued(acq(
        &mut e,
        0,
        req_new(2, "b", vec![x("k1"), x("k2")], 1_000),
    ));
    // k1 is queued-for: a later request on k1 alone waits behind it (arrival order).
    let w3 = queued(acq(&mut e, 1, req_new(3, "c", vec![x("k1")], 1_000)));
    e.release_lease(2, lid(1)).unwrap();
    let notes = e.take_notifications();
    assert!(matches!(outcome_of(&notes, w), WaitOutcome::Granted(_)));
    assert!(notes.iter().all(|n| n.waiter != w3));
}

// ----- fencing -----

#[test]
fn fencing_tokens_increase_and_check() {
    let mut e = Engine::default();
    let g1 = granted(acq(&mut e, 0, req_new(1, "a", vec![x("k"), x("j")], 0)));
    let t1 = g1.granted[0].fencing_token;
    let t2 = g1.granted[1].fencing_token;
    assert!(t2 > t1);
    assert!(e.check_fencing("k", t1).current);
    e.release_lease(1, lid(1)).unwrap();
    let g2 = granted(acq(&mut e, 2, req_new(2, "b", vec![x("k")], 0)));
    assert!(g2.granted[0].fencing_token > t2);
    let c = e.check_fencing("k", t1);
    assert!(!c.current);
    assert_eq!(c.current_tokens, vec![g2.granted[0].fencing_token]);
    assert_eq!(e.stats().fencing_next, g2.granted[0].fencing_token + 1);
}

// ----- incremental acquisition, deadlock, upgrade -----

#[test]
fn incremental_and_deadlock() {
    let mut e = Engine::default();
    granted(acq(&mut e, 0, req_new(1, "a", vec![x("k1")], 0)));
    granted(acq(&mut e, 0, req_new(2, "b", vec![x("k2")], 0)));
    let wa = queued(acq(&mut e, 1, req_existing(1, vec![x("k2")], 5_000)));
    match acq(&mut e, 2, req_existing(2, vec![x("k1")], 5_000)) {
        Err(LockError::Deadlock { key, cycle }) => {
            assert_eq!(key, "k1");
            assert_eq!(cycle, vec!["b", "a", "b"]);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(e.stats().deadlocks_total, 1);
    assert!(
        e.take_events()
            .iter()
            .any(|ev| ev.kind == EventKind::Deadlock)
    );
    e.release_lease(3, lid(2)).unwrap();
    let notes = e.take_notifications();
    match outcome_of(&notes, wa) {
        WaitOutcome::Granted(g) => {
            assert!(!g.created_lease);
            assert_eq!(g.lease.locks.len(), 2);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn upgrade_shared_to_exclusive() {
    let mut e = Engine::default();
    let g = granted(acq(&mut e, 0, req_new(1, "a", vec![s("k")], 0)));
    granted(acq(&mut e, 0, req_new(2, "b", vec![s("k")], 0)));
    let wa = queued(acq(&mut e, 1, req_existing(1, vec![x("k")], 5_000)));
    // b upgrading too closes a cycle: b is the victim.
    assert!(matches!(
        acq(&mut e, 2, req_existing(2, vec![x("k")], 5_000)),
        Err(LockError::Deadlock { .. })
    ));
    e.release_lease(3, lid(2)).unwrap();
    let notes = e.take_notifications();
    match outcome_of(&notes, wa) {
        WaitOutcome::Granted(g2) => {
            assert_eq!(g2.granted[0].kind, LockKind::Exclusive);
            assert!(g2.granted[0].fencing_token > g.granted[0].fencing_token);
        }
        other => panic!("{other:?}"),
    }
}

// ----- force release and lock-delay -----

#[test]
fn force_release_and_lock_delay() {
    let mut e = Engine::default();
    let mut r = req_new(1, "a", vec![x("k")], 0);
    r.locks[0].lock_delay_ms = 500;
    granted(acq(&mut e, 0, r.clone()));
    r.reentrant = true;
    granted(acq(&mut e, 0, r));
    assert!(matches!(
        e.force_release_lock(1, "k", ""),
        Err(LockError::Invalid { .. })
    ));
    assert!(matches!(
        e.force_release_lock(1, "nope", "x"),
        Err(LockError::LockNotFound { .. })
    ));
    let lost = e.force_release_lock(10, "k", "stuck").unwrap();
    e.check_invariants().unwrap();
    assert_eq!(lost.len(), 1);
    assert!(
        lost[0].locks.is_empty(),
        "whole count released, lease lives on"
    );
    match acq(&mut e, 11, req_new(2, "b", vec![x("k")], 0)) {
        Err(LockError::LockHeld {
            holders,
            delayed_until_ms,
            ..
        }) => {
            assert!(holders.is_empty());
            assert_eq!(delayed_until_ms, Some(510));
        }
        other => panic!("{other:?}"),
    }
    let w = queued(acq(&mut e, 12, req_new(2, "b", vec![x("k")], 1_000)));
    assert_eq!(e.next_deadline_ms(), Some(510));
    tick(&mut e, 509);
    assert!(e.take_notifications().is_empty());
    tick(&mut e, 510);
    assert!(matches!(
        outcome_of(&e.take_notifications(), w),
        WaitOutcome::Granted(_)
    ));
    assert!(
        e.take_events()
            .iter()
            .any(|ev| matches!(&ev.kind, EventKind::ForceReleased { reason } if reason == "stuck"))
    );
    // force_release_lease
    let v = e.force_release_lease(600, lid(2), "admin").unwrap();
    assert_eq!(v.locks.len(), 1);
    assert!(e.lease(lid(2)).is_none());
    assert!(
        e.lock_info("k").is_none(),
        "no delay configured: the key is free"
    );
}

#[test]
fn voluntary_release_has_no_lock_delay() {
    let mut e = Engine::default();
    let mut r = req_new(1, "a", vec![x("k")], 0);
    r.locks[0].lock_delay_ms = 500;
    granted(acq(&mut e, 0, r));
    e.release_lease(1, lid(1)).unwrap();
    granted(acq(&mut e, 2, req_new(2, "b", vec![x("k")], 0)));
}

// ----- validation -----

#[test]
fn validation_refusals() {
    let mut e = Engine::default();
    let bad = |e: &mut Engine, r: AcquireRequest, field: &str| match e.acquire(0, r) {
        Err(LockError::Invalid { field: f, .. }) => assert_eq!(f, field),
        other => panic!("expected invalid {field}, got {other:?}"),
    };
    bad(&mut e, req_new(1, "a", vec![x("")], 0), "locks[0].key");
    bad(
        &mut e,
        req_new(1, "a", vec![x("ok"), x("a\u{7}")], 0),
        "locks[1].key",
    );
    bad(
        &mut e,
        req_new(1, "a", vec![x(&"k".repeat(513))], 0),
        "locks[0].key",
    );
    bad(
        &mut e,
        req_new(1, "a", vec![x("k"), x("k")], 0),
        "locks[1].key",
    );
    bad(&mut e, req_new(1, "a", vec![], 0), "locks");
    bad(&mut e, req_new(1, "", vec![x("k")], 0), "holder");
    bad(&mut e, req_new(1, "a", vec![x("k")], 60_001), "wait_ms");
    bad(
        &mut e,
        req_new(1, "a", vec![sem("k", 2, 3)], 0),
        "locks[0].kind.permits",
    );
    let mut r = req_new(1, "a", vec![x("k")], 0);
    if let LeaseTarget::New(nl) = &mut r.target {
        nl.ttl_ms = 999;
    }
    bad(&mut e, r, "ttl_ms");
    let mut r = req_new(1, "a", vec![x("k")], 0);
    if let LeaseTarget::New(nl) = &mut r.target {
        nl.metadata = Some("[1]".into());
    }
    bad(&mut e, r, "metadata");
    let mut r = req_new(1, "a", vec![x("k")], 0);
    r.locks[0].lock_delay_ms = 60_001;
    bad(&mut e, r, "locks[0].lock_delay_ms");
    e.check_invariants().unwrap();
    assert_eq!(e.stats().leases, 0);
}

// ----- idempotency -----

fn begin(key: &str, fp: &str, id: u128, wait_ms: u64) -> IdempotencyBegin {
    IdempotencyBegin {
        key: key.into(),
        fingerprint: fp.into(),
        lease: new_lease(id, "exec", 10_000),
        record_ttl_ms: 60_000,
        wait_ms,
    }
}

fn result(body: &str) -> IdempotencyResult {
    IdempotencyResult {
        status: 201,
        headers: vec![],
        body: body.into(),
    }
}

#[test]
fn idempotency_lifecycle() {
    let mut e = Engine::default();
    let IdempotencyOutcome::Started(v) = e.idempotency_begin(0, begin("i", "f", 1, 0)).unwrap()
    else {
        panic!()
    };
    e.check_invariants().unwrap();
    assert_eq!(v.lease_id, lid(1));
    assert_eq!(
        e.idempotency_begin(1, begin("i", "g", 2, 0)).unwrap(),
        IdempotencyOutcome::FingerprintMismatch
    );
    assert_eq!(
        e.idempotency_begin(1, begin("i", "f", 2, 0)).unwrap(),
        IdempotencyOutcome::InProgress {
            holder: "exec".into(),
            expires_at_ms: 10_000
        }
    );
    let IdempotencyOutcome::Queued(w) = e.idempotency_begin(2, begin("i", "f", 3, 5_000)).unwrap()
    else {
        panic!()
    };
    assert!(matches!(
        e.idempotency_complete(3, "i", lid(9), result("x")),
        Err(LockError::IdempotencyNotFound { .. })
    ));
    let rec = e
        .idempotency_complete(3, "i", lid(1), result("done"))
        .unwrap();
    e.check_invariants().unwrap();
    assert_eq!(rec.expires_at_ms, Some(60_003));
    assert!(e.lease(lid(1)).is_none(), "executor lease released");
    match outcome_of(&e.take_notifications(), w) {
        WaitOutcome::Idempotency(IdempotencyOutcome::Completed(r)) => assert_eq!(r.body, "done"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        e.idempotency_begin(4, begin("i", "f", 4, 0)).unwrap(),
        IdempotencyOutcome::Completed(result("done"))
    );
    tick(&mut e, 60_003);
    assert!(e.idempotency_get("i").is_none());
}

#[test]
fn idempotency_abort_and_executor_expiry_promote_waiter() {
    let mut e = Engine::default();
    e.idempotency_begin(0, begin("i", "f", 1, 0)).unwrap();
    let IdempotencyOutcome::Queued(w2) =
        e.idempotency_begin(1, begin("i", "f", 2, 30_000)).unwrap()
    else {
        panic!()
    };
    let IdempotencyOutcome::Queued(w3) =
        e.idempotency_begin(1, begin("i", "f", 3, 30_000)).unwrap()
    else {
        panic!()
    };
    e.idempotency_abort(2, "i", lid(1)).unwrap();
    e.check_invariants().unwrap();
    match outcome_of(&e.take_notifications(), w2) {
        WaitOutcome::Idempotency(IdempotencyOutcome::Started(v)) => assert_eq!(v.lease_id, lid(2)),
        other => panic!("{other:?}"),
    }
    // The new executor's lease expires: w3 takes over.
    tick(&mut e, 10_002);
    match outcome_of(&e.take_notifications(), w3) {
        WaitOutcome::Idempotency(IdempotencyOutcome::Started(v)) => {
            assert_eq!(v.lease_id, lid(3));
            assert_eq!(v.created_at_ms, 10_002);
        }
        other => panic!("{other:?}"),
    }
    // Its lease expiring with no waiters frees the key.
    tick(&mut e, 20_002);
    assert!(e.idempotency_get("i").is_none());
    assert!(matches!(
        e.idempotency_begin(20_003, begin("i", "f", 4, 0)).unwrap(),
        IdempotencyOutcome::Started(_)
    ));
}

// ----- durable changes, listing, stats -----

#[test]
fn changes_track_durable_state() {
    let mut e = Engine::default();
    granted(acq(&mut e, 0, req_new(1, "a", vec![x("k")], 0)));
    let cs = e.take_changes();
    assert_eq!(cs.fencing_next, Some(2));
    assert!(cs.leases.get(&lid(1)).unwrap().is_some());
    assert!(e.take_changes().is_empty());
    e.renew(1, lid(1), None).unwrap();
    let cs = e.take_changes();
    assert_eq!(
        cs.leases
            .get(&lid(1))
            .unwrap()
            .as_ref()
            .unwrap()
            .expires_at_ms,
        10_001
    );
    e.release_lease(2, lid(1)).unwrap();
    let cs = e.take_changes();
    assert_eq!(cs.leases.get(&lid(1)), Some(&None));
}

#[test]
fn discarded_changes_report_each_lease_once_and_leave_nothing_to_take() {
    let mut e = Engine::default();
    let mut owned = req_new(2, "b", vec![x("k2")], 0);
    if let LeaseTarget::New(nl) = &mut owned.target {
        nl.owner = Some("tok-1".to_owned());
    }
    granted(acq(&mut e, 0, req_new(1, "a", vec![x("k1")], 0)));
    granted(acq(&mut e, 0, owned));
    e.renew(1, lid(1), None).unwrap();
    let mut seen = Vec::new();
    e.discard_changes(|id, state| seen.push((id, state.map(|o| o.map(str::to_owned)))));
    seen.sort();
    assert_eq!(
        seen,
        vec![
            (lid(1), Some(None)),
            (lid(2), Some(Some("tok-1".to_owned())))
        ]
    );
    // Nothing left over for a later take: counters and leases were consumed.
    assert!(e.take_changes().is_empty());
    e.release_lease(2, lid(2)).unwrap();
    let mut seen = Vec::new();
    e.discard_changes(|id, state| seen.push((id, state.is_some())));
    assert_eq!(seen, vec![(lid(2), false)]);
    assert!(e.take_changes().is_empty());
}

#[test]
fn listing_by_prefix_and_holder() {
    let mut e = Engine::default();
    granted(acq(
        &mut e,
        0,
        req_new(1, "alice", vec![x("p/1"), x("q/1")], 0),
    ));
    granted(acq(&mut e, 0, req_new(2, "bob", vec![x("p/2")], 0)));
    queued(acq(&mut e, 0, req_new(3, "carol", vec![x("p/2")], 1_000)));
    let all = e.list_locks(&LockFilter::default());
    let keys: Vec<_> = all.iter().map(|i| i.key.as_str()).collect();
    assert_eq!(keys, vec!["p/1", "p/2", "q/1"]);
    let p = e.list_locks(&LockFilter {
        prefix: Some("p/".into()),
        holder: None,
    });
    assert_eq!(p.len(), 2);
    assert_eq!(p[1].waiters[0].holder, "carol");
    let a = e.list_locks(&LockFilter {
        prefix: None,
        holder: Some("alice".into()),
    });
    assert_eq!(a.len(), 2);
    let st = e.stats();
    assert_eq!(st.active_locks, 3);
    assert_eq!(st.leases, 2);
    assert_eq!(st.waiters, 1);
}

#[test]
fn snapshot_restore_simple() {
    let mut e = Engine::default();
    granted(acq(&mut e, 0, req_new(1, "a", vec![x("k"), s("s")], 0)));
    granted(acq(&mut e, 0, req_new(2, "b", vec![s("s")], 0)));
    e.idempotency_begin(0, begin("i", "f", 3, 0)).unwrap();
    let st = e.durable_state();
    let r = Engine::restore(Limits::default(), st.clone(), 100, 20_000).unwrap();
    r.check_invariants().unwrap();
    let mut st2 = r.durable_state();
    assert_eq!(st2.fencing_next, st.fencing_next);
    assert!(st2.leases.iter().all(|l| l.expires_at_ms == 20_100));
    for l in &mut st2.leases {
        l.expires_at_ms = 10_000;
    }
    assert_eq!(st2, st);
    // An inconsistent state is refused.
    let mut bad = st.clone();
    bad.fencing_next = 2;
    assert!(Engine::restore(Limits::default(), bad, 0, 0).is_err());
    let mut bad = st;
    let dup = bad.leases[0].locks[0].clone();
    bad.leases[1].locks.push(dup);
    assert!(Engine::restore(Limits::default(), bad, 0, 0).is_err());
}

// ----- more rules -----

#[test]
fn limit_mismatch_names_existing_kind() {
    let mut e = Engine::default();
    granted(acq(&mut e, 0, req_new(1, "a", vec![sem("k", 3, 1)], 0)));
    assert_eq!(
        acq(&mut e, 0, req_new(2, "b", vec![sem("k", 5, 1)], 0)),
        Err(LockError::LimitMismatch {
            key: "k".into(),
            existing: LockKind::Semaphore {
                limit: 3,
                permits: 1
            },
            requested: LockKind::Semaphore {
                limit: 5,
                permits: 1
            },
        })
    );
    // Exclusive and shared on one key are not a mismatch; a queued request fixes the family.
    granted(acq(&mut e, 0, req_new(3, "c", vec![x("m")], 0)));
    queued(acq(&mut e, 0, req_new(4, "d", vec![s("m")], 1_000)));
    e.release_lease(1, lid(3)).unwrap();
    e.release_lease(1, lid(4)).unwrap();
    // Once free, the key can be used as a semaphore.
    granted(acq(&mut e, 2, req_new(5, "e", vec![sem("m", 2, 2)], 0)));
}

#[test]
fn semaphore_waiters_granted_together_when_they_fit() {
    let mut e = Engine::default();
    granted(acq(&mut e, 0, req_new(1, "a", vec![sem("k", 4, 4)], 0)));
    let w1 = queued(acq(&mut e, 0, req_new(2, "b", vec![sem("k", 4, 2)], 1_000)));
    let w2 = queued(acq(&mut e, 0, req_new(3, "c", vec![sem("k", 4, 2)], 1_000)));
    let w3 = queued(acq(&mut e, 0, req_new(4, "d", vec![sem("k", 4, 1)], 1_000)));
    e.release_lease(1, lid(1)).unwrap();
    let notes = e.take_notifications();
    assert!(matches!(outcome_of(&notes, w1), WaitOutcome::Granted(_)));
    assert!(matches!(outcome_of(&notes, w2), WaitOutcome::Granted(_)));
    assert!(notes.iter().all(|n| n.waiter != w3), "no room left for d");
    e.check_invariants().unwrap();
}

#[test]
fn waiters_per_key_limit_and_one_queued_request_per_lease() {
    let limits = Limits {
        waiters_per_key_max: 2,
        ..Limits::default()
    };
    let mut e = Engine::new(limits);
    granted(acq(&mut e, 0, req_new(1, "a", vec![x("k"), x("j")], 0)));
    queued(acq(&mut e, 0, req_new(2, "b", vec![x("k")], 1_000)));
    queued(acq(&mut e, 0, req_new(3, "c", vec![x("k")], 1_000)));
    assert_eq!(
        acq(&mut e, 0, req_new(4, "d", vec![x("k")], 1_000)),
        Err(LockError::Overloaded {
            what: "waiters on key k".into(),
            limit: 2
        })
    );
    granted(acq(&mut e, 0, req_new(5, "e", vec![x("m")], 0)));
    queued(acq(&mut e, 0, req_existing(5, vec![x("j")], 1_000)));
    assert!(matches!(
        acq(&mut e, 0, req_existing(5, vec![x("j2"), x("j")], 1_000)),
        Err(LockError::Overloaded { limit: 1, .. })
    ));
    // A request that needs no wait is fine even with one queued.
    granted(acq(&mut e, 0, req_existing(5, vec![x("free")], 1_000)));
}

#[test]
fn reentrant_join_acquires_new_keys_and_upgrades() {
    let mut e = Engine::default();
    let g = granted(acq(&mut e, 0, req_new(1, "web", vec![s("a")], 0)));
    // Joins lease 1: `a` upgraded (new token), `b` acquired.
    let g2 = granted(acq(&mut e, 10, req_new(2, "web", vec![x("a"), x("b")], 0)));
    assert!(!g2.created_lease);
    assert_eq!(g2.lease.lease_id, lid(1));
    assert_eq!(g2.granted[0].kind, LockKind::Exclusive);
    assert!(g2.granted[0].fencing_token > g.granted[0].fencing_token);
    assert_eq!(g2.granted[0].count, 2);
    assert_eq!(g2.granted[1].count, 1);
    assert_eq!(g2.lease.locks.len(), 2);
    // Holding exclusive, asking shared: count + 1, still exclusive.
    let g3 = granted(acq(&mut e, 20, req_existing(1, vec![s("a")], 0)));
    assert_eq!(g3.granted[0].kind, LockKind::Exclusive);
    assert_eq!(g3.granted[0].count, 3);
    // Undo of a joined grant releases each key once.
    e.undo_grant(30, &g3);
    assert_eq!(e.lease(lid(1)).unwrap().locks[0].count, 2);
    // Every join emits a Granted event.
    let granted_events = e
        .take_events()
        .into_iter()
        .filter(|ev| ev.kind == EventKind::Granted)
        .count();
    assert_eq!(granted_events, 4);
}

#[test]
fn reentrant_join_needs_the_same_owner() {
    let mut e = Engine::default();
    let mut r = req_new(1, "web", vec![x("a")], 0);
    if let LeaseTarget::New(nl) = &mut r.target {
        nl.owner = Some("token-1".into());
    }
    granted(acq(&mut e, 0, r));
    let mut r = req_new(2, "web", vec![x("a")], 0);
    if let LeaseTarget::New(nl) = &mut r.target {
        nl.owner = Some("token-2".into());
    }
    assert!(matches!(acq(&mut e, 0, r), Err(LockError::LockHeld { .. })));
}

#[test]
fn reentrant_semaphore_needs_same_permits() {
    let mut e = Engine::default();
    granted(acq(&mut e, 0, req_new(1, "a", vec![sem("k", 3, 1)], 0)));
    let g = granted(acq(&mut e, 0, req_new(2, "a", vec![sem("k", 3, 1)], 0)));
    assert_eq!(g.granted[0].count, 2);
    assert!(matches!(
        acq(&mut e, 0, req_new(3, "a", vec![sem("k", 3, 2)], 0)),
        Err(LockError::Invalid { .. })
    ));
}

#[test]
fn expiry_fails_the_leases_waiter_and_applies_lock_delay() {
    let mut e = Engine::default();
    let mut r = req_new(1, "a", vec![x("k")], 0);
    r.locks[0].lock_delay_ms = 1_000;
    granted(acq(&mut e, 0, r));
    granted(acq(&mut e, 0, req_new(2, "b", vec![x("j")], 0)));
    let w = queued(acq(&mut e, 0, req_existing(1, vec![x("j")], 20_000)));
    tick(&mut e, 10_000);
    let notes = e.take_notifications();
    assert_eq!(
        outcome_of(&notes, w),
        WaitOutcome::Failed(LockError::LeaseNotFound { lease_id: lid(1) })
    );
    let info = e.lock_info("k").unwrap();
    assert_eq!(info.delayed_until_ms, Some(11_000));
    assert!(info.holders.is_empty());
    let cs = e.take_changes();
    assert_eq!(cs.lock_delays.get("k"), Some(&Some(11_000)));
    assert_eq!(
        e.next_deadline_ms(),
        Some(11_000),
        "both leases expired at 10 000"
    );
    tick(&mut e, 11_000);
    assert!(e.lock_info("k").is_none());
    assert_eq!(e.take_changes().lock_delays.get("k"), Some(&None));
}

#[test]
fn multi_key_waiters_in_opposite_order_do_not_deadlock() {
    let mut e = Engine::default();
    granted(acq(&mut e, 0, req_new(1, "a", vec![x("p"), x("q")], 0)));
    let w1 = queued(acq(&mut e, 0, req_new(2, "b", vec![x("p"), x("q")], 5_000)));
    let w2 = queued(acq(&mut e, 0, req_new(3, "c", vec![x("q"), x("p")], 5_000)));
    e.release_lease(1, lid(1)).unwrap();
    assert!(matches!(
        outcome_of(&e.take_notifications(), w1),
        WaitOutcome::Granted(_)
    ));
    e.release_lease(2, lid(2)).unwrap();
    assert!(matches!(
        outcome_of(&e.take_notifications(), w2),
        WaitOutcome::Granted(_)
    ));
}

#[test]
fn lease_id_collision_is_refused() {
    let mut e = Engine::default();
    granted(acq(&mut e, 0, req_new(1, "a", vec![x("k")], 0)));
    match acq(&mut e, 0, req_new(1, "b", vec![x("j")], 0)) {
        Err(LockError::Invalid { field, .. }) => assert_eq!(field, "lease_id"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn events_have_increasing_sequence_numbers() {
    let mut e = Engine::default();
    granted(acq(&mut e, 0, req_new(1, "a", vec![x("k"), x("j")], 0)));
    e.renew(1, lid(1), None).unwrap();
    e.release_lease(2, lid(1)).unwrap();
    let evs = e.take_events();
    assert_eq!(evs.len(), 5);
    for w in evs.windows(2) {
        assert!(w[0].seq < w[1].seq);
    }
    let renewed = evs.iter().find(|ev| ev.kind == EventKind::Renewed).unwrap();
    assert_eq!(renewed.key, None);
    let released: Vec<_> = evs
        .iter()
        .filter(|ev| ev.kind == EventKind::Released)
        .collect();
    assert_eq!(released[0].held_ms, Some(2));
    assert_eq!(e.take_changes().event_seq_next, Some(6));
    let st = e.stats();
    assert_eq!((st.grants_total, st.releases_total), (2, 2));
}

#[test]
fn time_never_goes_backwards() {
    let mut e = Engine::default();
    granted(acq(&mut e, 5_000, req_new(1, "a", vec![x("k")], 0)));
    // An earlier `now` is treated as the latest time seen.
    let v = e.renew(10, lid(1), None).unwrap();
    assert_eq!(v.expires_at_ms, 15_000);
    e.check_invariants().unwrap();
}

#[test]
fn check_fencing_unknown_key() {
    let e = Engine::default();
    let c = e.check_fencing("nothing", 1);
    assert!(!c.current);
    assert!(c.current_tokens.is_empty());
}

#[test]
fn idempotency_waiter_timeout_cancel_and_validation() {
    let mut e = Engine::default();
    e.idempotency_begin(0, begin("i", "f", 1, 0)).unwrap();
    let IdempotencyOutcome::Queued(w1) = e.idempotency_begin(0, begin("i", "f", 2, 1_000)).unwrap()
    else {
        panic!()
    };
    let IdempotencyOutcome::Queued(w2) = e.idempotency_begin(0, begin("i", "f", 3, 5_000)).unwrap()
    else {
        panic!()
    };
    assert_eq!(e.stats().waiters, 2);
    tick(&mut e, 1_000);
    assert_eq!(
        outcome_of(&e.take_notifications(), w1),
        WaitOutcome::Failed(LockError::WaitTimeout {
            key: "i".into(),
            holders: vec![]
        })
    );
    assert!(e.cancel_wait(1_001, w2));
    e.check_invariants().unwrap();
    e.idempotency_abort(1_002, "i", lid(1)).unwrap();
    assert!(e.take_notifications().is_empty());
    assert!(e.idempotency_get("i").is_none());
    // Validation.
    let mut b = begin("i", "", 4, 0);
    assert!(matches!(
        e.idempotency_begin(1_003, b.clone()),
        Err(LockError::Invalid { .. })
    ));
    b.fingerprint = "f".into();
    e.idempotency_begin(1_003, b).unwrap();
    let bad = IdempotencyResult {
        status: 42,
        headers: vec![],
        body: String::new(),
    };
    match e.idempotency_complete(1_004, "i", lid(4), bad) {
        Err(LockError::Invalid { field, .. }) => assert_eq!(field, "result.status"),
        other => panic!("{other:?}"),
    }
    // Completed with another fingerprint is a mismatch.
    e.idempotency_complete(1_005, "i", lid(4), result("r"))
        .unwrap();
    assert_eq!(
        e.idempotency_begin(1_006, begin("i", "other", 5, 0))
            .unwrap(),
        IdempotencyOutcome::FingerprintMismatch
    );
    let cs = e.take_changes();
    assert!(cs.idempotency["i"].is_some());
}

#[test]
fn executor_lease_released_frees_the_record() {
    let mut e = Engine::default();
    e.idempotency_begin(0, begin("i", "f", 1, 0)).unwrap();
    e.release_lease(1, lid(1)).unwrap();
    assert!(e.idempotency_get("i").is_none());
    assert!(matches!(
        e.idempotency_begin(2, begin("i", "f", 2, 0)).unwrap(),
        IdempotencyOutcome::Started(_)
    ));
}

#[test]
fn engine_is_send_for_the_server_actor() {
    fn assert_send<T: Send + 'static>() {}
    assert_send::<Engine>();
}

#[test]
fn lock_info_shows_holders_waiters_times_and_delay() {
    let mut e = Engine::default();
    let mut r = req_new(1, "a", vec![s("k")], 0);
    r.locks[0].lock_delay_ms = 100;
    if let LeaseTarget::New(nl) = &mut r.target {
        nl.reason = Some("report".into());
    }
    let g = granted(acq(&mut e, 5, r));
    queued(acq(&mut e, 7, req_new(2, "b", vec![x("k")], 1_000)));
    let info = e.lock_info("k").unwrap();
    assert_eq!(info.holders[0].0, lid(1));
    let h = &info.holders[0].1;
    assert_eq!(
        (h.since_ms, h.expires_at_ms, h.fencing_token, h.count),
        (5, 10_005, g.granted[0].fencing_token, 1)
    );
    assert_eq!(h.reason.as_deref(), Some("report"));
    let w = &info.waiters[0];
    assert_eq!(
        (w.holder.as_str(), w.kind, w.since_ms, w.deadline_ms),
        ("b", LockKind::Exclusive, 7, 1_007)
    );
    // Force release: b is held back by the lock-delay, and the listing shows it.
    e.force_release_lock(10, "k", "stuck reader").unwrap();
    let info = e.lock_info("k").unwrap();
    assert_eq!(info.delayed_until_ms, Some(110));
    assert_eq!(info.waiters.len(), 1);
    assert_eq!(e.list_locks(&LockFilter::default()).len(), 1);
    tick(&mut e, 110);
    assert_eq!(holders_of(&e, "k"), vec!["b"]);
}

#[test]
fn executor_lease_can_hold_locks_and_complete_releases_them() {
    let mut e = Engine::default();
    let IdempotencyOutcome::Started(v) = e.idempotency_begin(0, begin("i", "f", 1, 0)).unwrap()
    else {
        panic!()
    };
    assert!(
        v.locks.is_empty(),
        "the executor lease starts with no locks"
    );
    granted(acq(&mut e, 1, req_existing(1, vec![x("schedule/42")], 0)));
    let w = queued(acq(
        &mut e,
        2,
        req_new(2, "other", vec![x("schedule/42")], 5_000),
    ));
    e.idempotency_complete(3, "i", lid(1), result("swapped"))
        .unwrap();
    e.check_invariants().unwrap();
    assert!(matches!(
        outcome_of(&e.take_notifications(), w),
        WaitOutcome::Granted(_)
    ));
    assert!(
        e.take_events()
            .iter()
            .any(|ev| ev.kind == EventKind::Released && ev.key.as_deref() == Some("schedule/42"))
    );
}

#[test]
fn restore_later_without_grace_expires_stale_leases() {
    let mut e = Engine::default();
    let mut r = req_new(1, "a", vec![x("k")], 0);
    r.locks[0].lock_delay_ms = 500;
    granted(acq(&mut e, 0, r));
    let st = e.durable_state();
    let mut r = Engine::restore(Limits::default(), st, 20_000, 0).unwrap();
    r.check_invariants().unwrap();
    assert!(r.lease(lid(1)).is_none());
    assert!(
        r.take_events()
            .iter()
            .any(|ev| ev.kind == EventKind::Expired)
    );
    assert_eq!(r.take_changes().leases.get(&lid(1)), Some(&None));
}
