//! Random histories against the reference model (explicit time), compared after every step:
//! results, notifications, events, durable state and every key's FIFO queue; the engine's
//! `check_invariants` and the model's own rule checks (no conflicting holders, semaphores
//! within their limit, tokens strictly increasing, every waiter answered exactly once and
//! none left grantable) run after every step, and at the end every wait is run out.

mod common;

use common::model::{Harness, op_strategy};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: common::cases(2000), ..ProptestConfig::default() })]

    #[test]
    fn engine_matches_model(ops in proptest::collection::vec(op_strategy(3), 1..80)) {
        let mut h = Harness::new();
        for op in &ops {
            h.apply(op);
        }
        h.drain();
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: common::cases(200), ..ProptestConfig::default() })]

    /// Long histories: many leases come and go, queues build up and drain.
    #[test]
    fn engine_matches_model_long_histories(ops in proptest::collection::vec(op_strategy(3), 300..600)) {
        let mut h = Harness::new();
        for op in &ops {
            h.apply(op);
        }
        h.drain();
    }
}

/// The generator must actually exercise the interesting paths (waits, timeouts, deadlocks,
/// lock-delay), or the model test proves little.
#[test]
fn generator_covers_interesting_cases() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let strat = proptest::collection::vec(op_strategy(3), 1..80);
    let (mut grants, mut queued, mut timeouts, mut deadlocks) = (0, 0, 0, 0);
    for _ in 0..200 {
        let ops = strat.new_tree(&mut runner).unwrap().current();
        let mut h = Harness::new();
        for op in &ops {
            h.apply(op);
        }
        let st = h.engine.stats();
        grants += st.grants_total;
        timeouts += st.timeouts_total;
        deadlocks += st.deadlocks_total;
        queued += h.waiters.len();
        h.drain();
    }
    assert!(grants > 1_000, "grants {grants}");
    assert!(queued > 300, "queued {queued}");
    assert!(timeouts > 50, "timeouts {timeouts}");
    assert!(deadlocks > 3, "deadlocks {deadlocks}");
}
