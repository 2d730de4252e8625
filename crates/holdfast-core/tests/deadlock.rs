//! Deadlock detection: scenarios, and random wait-for graphs built through the engine (many
//! incremental acquisitions on few keys) where every refusal or queueing is checked against
//! the reference model's brute-force cycle search (transitive closure over every edge):
//! no missed cycle, no false alarm. `src/deadlock.rs` also checks the DFS against a
//! Floyd–Warshall closure on arbitrary random digraphs.

mod common;

use common::model::{Harness, op_strategy};
use common::*;
use holdfast_core::*;
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: common::cases(1500), ..ProptestConfig::default() })]

    #[test]
    fn deadlock_detection_matches_brute_force(ops in proptest::collection::vec(op_strategy(12), 1..70)) {
        let mut h = Harness::new();
        for op in &ops {
            h.apply(op);
        }
        h.drain();
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: common::cases(150), ..ProptestConfig::default() })]

    /// Long incremental-heavy histories: queues and wait-for graphs grow deep.
    #[test]
    fn deadlock_detection_long_histories(ops in proptest::collection::vec(op_strategy(12), 200..400)) {
        let mut h = Harness::new();
        for op in &ops {
            h.apply(op);
        }
        h.drain();
    }
}

#[test]
fn random_graphs_produce_deadlocks() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let strat = proptest::collection::vec(op_strategy(12), 1..70);
    let mut deadlocks = 0;
    let mut queued_incremental = 0;
    for _ in 0..150 {
        let ops = strat.new_tree(&mut runner).unwrap().current();
        let mut h = Harness::new();
        for op in &ops {
            h.apply(op);
        }
        deadlocks += h.engine.stats().deadlocks_total;
        queued_incremental += h.waiters.len();
        h.drain();
    }
    assert!(
        deadlocks >= 20,
        "only {deadlocks} deadlocks: the generator is too tame"
    );
    assert!(queued_incremental > 100);
}

#[test]
fn three_party_cycle() {
    let mut e = Engine::default();
    for (i, k) in ["a", "b", "c"].iter().enumerate() {
        granted(acq(
            &mut e,
            0,
            req_new(i as u128 + 1, &format!("h{i}"), vec![x(k)], 0),
        ));
    }
    queued(acq(&mut e, 1, req_existing(1, vec![x("b")], 5_000)));
    queued(acq(&mut e, 1, req_existing(2, vec![x("c")], 5_000)));
    match acq(&mut e, 1, req_existing(3, vec![x("a")], 5_000)) {
        Err(LockError::Deadlock { key, cycle }) => {
            assert_eq!(key, "a");
            assert_eq!(cycle, vec!["h2", "h0", "h1", "h2"]);
        }
        other => panic!("{other:?}"),
    }
}

/// A cycle through queue order: B's shared request is compatible with A's shared hold but
/// must wait behind W's exclusive request, which waits for A.
#[test]
fn cycle_through_a_queued_new_lease() {
    let mut e = Engine::default();
    granted(acq(&mut e, 0, req_new(1, "A", vec![s("k1")], 0)));
    granted(acq(&mut e, 0, req_new(2, "B", vec![x("k2")], 0)));
    queued(acq(&mut e, 1, req_new(3, "W", vec![x("k1")], 5_000)));
    queued(acq(&mut e, 2, req_existing(1, vec![x("k2")], 5_000)));
    match acq(&mut e, 3, req_existing(2, vec![s("k1")], 5_000)) {
        Err(LockError::Deadlock { cycle, .. }) => assert_eq!(cycle, vec!["B", "W", "A", "B"]),
        other => panic!("{other:?}"),
    }
}

/// No false alarm: waiting for a lease that waits for someone else is fine.
#[test]
fn chain_is_not_a_cycle() {
    let mut e = Engine::default();
    granted(acq(&mut e, 0, req_new(1, "A", vec![x("a")], 0)));
    granted(acq(&mut e, 0, req_new(2, "B", vec![x("b")], 0)));
    granted(acq(&mut e, 0, req_new(3, "C", vec![x("c")], 0)));
    queued(acq(&mut e, 1, req_existing(1, vec![x("b")], 5_000)));
    queued(acq(&mut e, 1, req_existing(2, vec![x("c")], 5_000)));
    assert_eq!(e.stats().deadlocks_total, 0);
}

#[test]
fn semaphore_cycle() {
    let mut e = Engine::default();
    granted(acq(
        &mut e,
        0,
        req_new(1, "A", vec![sem("s", 2, 1), x("a")], 0),
    ));
    granted(acq(&mut e, 0, req_new(2, "B", vec![sem("s", 2, 1)], 0)));
    // B waits for A's exclusive lock.
    queued(acq(&mut e, 1, req_existing(2, vec![x("a")], 5_000)));
    // A asking for the permits B holds closes the cycle (A needs 2 more? no: same key, so
    // ask a second semaphore key held full by B).
    granted(acq(&mut e, 1, req_new(3, "C", vec![sem("t", 1, 1)], 0)));
    e.release_lease(2, lid(3)).unwrap();
    e.take_notifications();
    assert!(matches!(
        acq(&mut e, 3, req_existing(2, vec![sem("t", 1, 1)], 0)),
        Err(LockError::Overloaded { .. }) | Ok(AcquireOutcome::Granted(_))
    ));
    match acq(&mut e, 4, req_existing(1, vec![sem("t", 1, 1)], 5_000)) {
        Err(LockError::Deadlock { cycle, .. }) => assert_eq!(cycle, vec!["A", "B", "A"]),
        other => panic!("{other:?}"),
    }
}

/// A lease whose queued request names a key it holds (count + 1 there) loses that key to a
/// force release: its request now needs the key afresh, behind a waiter that waits for it.
#[test]
fn force_release_can_expose_a_cycle() {
    let mut e = Engine::default();
    granted(acq(&mut e, 0, req_new(1, "A", vec![x("k"), x("k3")], 0)));
    granted(acq(&mut e, 0, req_new(2, "B", vec![x("k2")], 0)));
    let q = queued(acq(
        &mut e,
        1,
        req_new(3, "Q", vec![x("k"), x("k3")], 5_000),
    ));
    let wa = queued(acq(
        &mut e,
        2,
        req_existing(1, vec![x("k"), x("k2")], 5_000),
    ));
    e.force_release_lock(3, "k", "ops").unwrap();
    e.check_invariants().unwrap();
    let notes = e.take_notifications();
    assert!(matches!(
        outcome_of(&notes, wa),
        WaitOutcome::Failed(LockError::Deadlock { .. })
    ));
    assert!(
        notes.iter().all(|n| n.waiter != q),
        "Q still waits for A's k3"
    );
}
