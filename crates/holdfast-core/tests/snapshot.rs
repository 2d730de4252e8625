//! Snapshot and restore: `restore(durable_state(s))` behaves exactly like `s`.
//!
//! A random history (locks and idempotency records) builds a state; waiters are cancelled
//! (they are not durable); the state is snapshotted and restored; then the same random
//! operations run on the original and the restored engine, and every answer, notification,
//! event and durable state must be identical (waiter ids are compared by order of issue,
//! since a restarted engine numbers its waiters afresh).

mod common;

use common::model::{Harness, KEYS, Op, op_strategy, to_specs};
use common::*;
use holdfast_core::*;
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum SOp {
    Lock(Op),
    Begin { key: usize, fp: bool, wait: u64 },
    Complete { key: usize },
    Abort { key: usize },
}

fn sop_strategy() -> impl Strategy<Value = SOp> {
    prop_oneof![
        8 => op_strategy(3).prop_map(SOp::Lock),
        2 => (0usize..3, proptest::bool::weighted(0.2), prop_oneof![Just(0u64), 100u64..3_000])
            .prop_map(|(key, fp, wait)| SOp::Begin { key, fp, wait }),
        1 => (0usize..3).prop_map(|key| SOp::Complete { key }),
        1 => (0usize..3).prop_map(|key| SOp::Abort { key }),
    ]
}

const IDEM_KEYS: [&str; 3] = ["req-1", "req-2", "req-3"];

/// One engine and the ids it handed out.
struct Runner {
    e: Engine,
    now: u64,
    next_lease: u128,
    leases: Vec<LeaseId>,
    waiters: Vec<WaiterId>,
    grants: Vec<Grant>,
}

impl Runner {
    fn widx(&self, w: WaiterId) -> usize {
        self.waiters
            .iter()
            .position(|x| *x == w)
            .unwrap_or(usize::MAX)
    }

    fn lease(&self, i: usize) -> LeaseId {
        if self.leases.is_empty() {
            LeaseId(999_999)
        } else {
            self.leases[i % self.leases.len()]
        }
    }

    fn new_lease(&mut self, holder: &str, ttl: u64) -> NewLease {
        let id = LeaseId(self.next_lease);
        self.next_lease += 1;
        NewLease {
            lease_id: id,
            holder: holder.to_owned(),
            ttl_ms: ttl,
            reason: None,
            metadata: Some("{\"job\":1}".into()),
            owner: None,
        }
    }

    /// Apply one operation; return everything observable, with waiter ids normalised.
    fn apply(&mut self, op: &SOp) -> String {
        let now = self.now;
        let result = match op {
            SOp::Lock(Op::AcquireNew {
                holder,
                locks,
                wait,
                reentrant,
                ttl,
                ..
            }) => {
                let nl = self.new_lease(["alice", "bob", "carol"][*holder], *ttl);
                let r = self.e.acquire(
                    now,
                    AcquireRequest {
                        target: LeaseTarget::New(nl),
                        locks: to_specs(locks),
                        wait_ms: *wait,
                        reentrant: *reentrant,
                    },
                );
                self.acquired(r)
            }
            SOp::Lock(Op::AcquireExisting { lease, locks, wait }) => {
                let r = self.e.acquire(
                    now,
                    AcquireRequest {
                        target: LeaseTarget::Existing(self.lease(*lease)),
                        locks: to_specs(locks),
                        wait_ms: *wait,
                        reentrant: true,
                    },
                );
                self.acquired(r)
            }
            SOp::Lock(Op::ReleaseLock { lease, key }) => {
                format!(
                    "{:?}",
                    self.e.release_lock(now, self.lease(*lease), KEYS[*key])
                )
            }
            SOp::Lock(Op::ReleaseLease { lease }) => {
                format!("{:?}", self.e.release_lease(now, self.lease(*lease)))
            }
            SOp::Lock(Op::Renew { lease, ttl }) => {
                format!("{:?}", self.e.renew(now, self.lease(*lease), *ttl))
            }
            SOp::Lock(Op::ForceLock { key }) => {
                format!("{:?}", self.e.force_release_lock(now, KEYS[*key], "ops"))
            }
            SOp::Lock(Op::ForceLease { lease }) => {
                format!(
                    "{:?}",
                    self.e.force_release_lease(now, self.lease(*lease), "ops")
                )
            }
            SOp::Lock(Op::Cancel { waiter }) => {
                if self.waiters.is_empty() {
                    String::new()
                } else {
                    let w = self.waiters[waiter % self.waiters.len()];
                    format!("{:?}", self.e.cancel_wait(now, w))
                }
            }
            SOp::Lock(Op::Undo { grant }) => {
                if !self.grants.is_empty() {
                    let g = self.grants.remove(grant % self.grants.len());
                    self.e.undo_grant(now, &g);
                }
                String::new()
            }
            SOp::Lock(Op::Advance { ms }) => {
                self.now += ms;
                self.e.tick(self.now);
                String::new()
            }
            SOp::Begin { key, fp, wait } => {
                let lease = self.new_lease("exec", 3_000);
                let r = self.e.idempotency_begin(
                    now,
                    IdempotencyBegin {
                        key: IDEM_KEYS[*key].into(),
                        fingerprint: if *fp { "other" } else { "fp" }.into(),
                        lease,
                        record_ttl_ms: 5_000,
                        wait_ms: *wait,
                    },
                );
                match r {
                    Ok(IdempotencyOutcome::Queued(w)) => {
                        self.waiters.push(w);
                        format!("queued {}", self.widx(w))
                    }
                    Ok(IdempotencyOutcome::Started(v)) => {
                        self.leases.push(v.lease_id);
                        format!("started {v:?}")
                    }
                    other => format!("{other:?}"),
                }
            }
            SOp::Complete { key } | SOp::Abort { key } => {
                let executor = match self.e.idempotency_get(IDEM_KEYS[*key]).map(|r| r.state) {
                    Some(IdempotencyState::InProgress { lease_id }) => lease_id,
                    _ => LeaseId(424_242),
                };
                if matches!(op, SOp::Complete { .. }) {
                    let res = IdempotencyResult {
                        status: 200,
                        headers: vec![("etag".into(), "x".into())],
                        body: "ok".into(),
                    };
                    format!(
                        "{:?}",
                        self.e
                            .idempotency_complete(now, IDEM_KEYS[*key], executor, res)
                    )
                } else {
                    format!(
                        "{:?}",
                        self.e.idempotency_abort(now, IDEM_KEYS[*key], executor)
                    )
                }
            }
        };
        self.e.check_invariants().unwrap();
        let notes: Vec<(usize, WaitOutcome)> = self
            .e
            .take_notifications()
            .into_iter()
            .map(|n| {
                match &n.outcome {
                    WaitOutcome::Granted(g) => {
                        if g.created_lease {
                            self.leases.push(g.lease.lease_id);
                        }
                        self.grants.push(g.clone());
                    }
                    WaitOutcome::Idempotency(IdempotencyOutcome::Started(v)) => {
                        self.leases.push(v.lease_id);
                    }
                    _ => {}
                }
                (self.widx(n.waiter), n.outcome)
            })
            .collect();
        let events = self.e.take_events();
        let changes = self.e.take_changes();
        format!(
            "{result}\n{notes:?}\n{events:?}\n{changes:?}\n{:?}\n{:?}",
            self.e.durable_state(),
            self.e.next_deadline_ms()
        )
    }

    fn acquired(&mut self, r: Result<AcquireOutcome, LockError>) -> String {
        match r {
            Ok(AcquireOutcome::Queued(w)) => {
                self.waiters.push(w);
                format!("queued {}", self.widx(w))
            }
            Ok(AcquireOutcome::Granted(g)) => {
                if g.created_lease {
                    self.leases.push(g.lease.lease_id);
                }
                self.grants.push(g.clone());
                format!("{g:?}")
            }
            Err(e) => format!("{e:?}"),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: common::cases(800), ..ProptestConfig::default() })]

    #[test]
    fn restore_of_snapshot_behaves_the_same(
        prefix in proptest::collection::vec(sop_strategy(), 0..50),
        suffix in proptest::collection::vec(sop_strategy(), 1..50),
    ) {
        // Build a random state.
        let mut a = Runner {
            e: Engine::default(),
            now: 0,
            next_lease: 1,
            leases: vec![],
            waiters: vec![],
            grants: vec![],
        };
        for op in &prefix {
            a.apply(op);
        }
        // Waiters are not durable: cancel them on the original.
        for w in a.waiters.clone() {
            a.e.cancel_wait(a.now, w);
        }
        let _ = a.e.take_notifications();
        let _ = a.e.take_events();
        let _ = a.e.take_changes();
        a.e.check_invariants().unwrap();

        let state = a.e.durable_state();
        let restored = Engine::restore(Limits::default(), state.clone(), a.now, 0).unwrap();
        prop_assert_eq!(restored.durable_state(), state.clone(), "round trip");
        let mut b = Runner {
            e: restored,
            now: a.now,
            next_lease: a.next_lease,
            leases: a.leases.clone(),
            waiters: vec![],
            grants: a.grants.clone(),
        };
        // Normalise waiter numbering: both start counting from here.
        a.waiters.clear();
        prop_assert_eq!(a.e.take_changes(), b.e.take_changes());
        for op in &suffix {
            let x = a.apply(op);
            let y = b.apply(op);
            prop_assert_eq!(x, y, "after {:?}", op);
        }
    }
}

#[test]
fn restore_extends_leases_by_grace_and_keeps_counters() {
    let mut h = Harness::new();
    h.apply(&Op::AcquireNew {
        holder: 0,
        owner: false,
        locks: vec![(0, 0, true)],
        wait: 0,
        reentrant: true,
        ttl: 2_000,
    });
    let st = h.engine.durable_state();
    let mut e = Engine::restore(Limits::default(), st.clone(), 1_500, 10_000).unwrap();
    let l = e.lease(LeaseId(1)).unwrap();
    assert_eq!(l.expires_at_ms, 11_500, "extended to now + grace");
    let cs = e.take_changes();
    assert!(
        cs.leases[&LeaseId(1)].is_some(),
        "the extension is persisted"
    );
    // Tokens continue above every restored token.
    let g = granted(acq(&mut e, 1_600, req_new(7, "z", vec![x("k1")], 0)));
    assert_eq!(g.granted[0].fencing_token, st.fencing_next);
    let ev = e.take_events();
    assert_eq!(ev[0].seq, st.event_seq_next, "event sequence continues");
}

#[test]
fn restore_refuses_inconsistent_states() {
    let mut e = Engine::default();
    granted(acq(
        &mut e,
        0,
        req_new(1, "a", vec![x("k"), sem("s", 2, 2)], 0),
    ));
    granted(acq(&mut e, 0, req_new(2, "b", vec![x("j")], 0)));
    e.idempotency_begin(
        0,
        IdempotencyBegin {
            key: "i".into(),
            fingerprint: "f".into(),
            lease: new_lease(3, "exec", 5_000),
            record_ttl_ms: 1_000,
            wait_ms: 0,
        },
    )
    .unwrap();
    let good = e.durable_state();
    assert!(Engine::restore(Limits::default(), good.clone(), 0, 0).is_ok());
    let bad = |f: &dyn Fn(&mut DurableState)| {
        let mut s = good.clone();
        f(&mut s);
        Engine::restore(Limits::default(), s, 0, 0).unwrap_err()
    };
    // Two exclusive holders.
    let err = bad(&|s| {
        let k = s.leases[0]
            .locks
            .iter()
            .find(|l| l.key == "k")
            .unwrap()
            .clone();
        s.leases[1].locks.push(HeldLockView {
            fencing_token: 99,
            ..k
        });
        s.fencing_next = 100;
    });
    assert!(err.0.contains("conflicting"), "{err}");
    // Semaphore over its limit.
    let err = bad(&|s| {
        let k = s.leases[0]
            .locks
            .iter()
            .find(|l| l.key == "s")
            .unwrap()
            .clone();
        s.leases[1].locks.push(HeldLockView {
            fencing_token: 99,
            ..k
        });
        s.fencing_next = 100;
    });
    assert!(err.0.contains("conflicting"), "{err}");
    // Token not below fencing_next.
    let err = bad(&|s| s.fencing_next = 1);
    assert!(err.0.contains("fencing token"), "{err}");
    // Duplicate token.
    let err = bad(&|s| {
        let t = s.leases[0].locks[0].fencing_token;
        s.leases[1].locks[0].fencing_token = t;
    });
    assert!(err.0.contains("two grants"), "{err}");
    // Count zero.
    let err = bad(&|s| s.leases[0].locks[0].count = 0);
    assert!(err.0.contains("count 0"), "{err}");
    // Duplicate lease, missing executor lease.
    let err = bad(&|s| {
        let l = s.leases[0].clone();
        s.leases.push(l);
    });
    assert!(err.0.contains("twice"), "{err}");
    let err = bad(&|s| s.leases.retain(|l| l.lease_id != LeaseId(3)));
    assert!(err.0.contains("missing lease"), "{err}");
    // Semaphore limits disagree.
    let err = bad(&|s| {
        s.leases[1].locks.push(HeldLockView {
            key: "s".into(),
            kind: LockKind::Semaphore {
                limit: 3,
                permits: 1,
            },
            fencing_token: 99,
            count: 1,
            acquired_at_ms: 0,
            lock_delay_ms: 0,
        });
        s.fencing_next = 100;
    });
    assert!(err.0.contains("different modes"), "{err}");
    // Values past the engine's maxima (its compact in-memory form relies on them).
    let err = bad(&|s| s.leases[0].ttl_ms = limits::LEASE_TTL_MS_MAX + 1);
    assert!(err.0.contains("ttl_ms"), "{err}");
    let err = bad(&|s| s.leases[0].ttl_ms = 0);
    assert!(err.0.contains("ttl_ms"), "{err}");
    let err = bad(&|s| s.leases[0].locks[0].lock_delay_ms = limits::LOCK_DELAY_MS_MAX + 1);
    assert!(err.0.contains("lock_delay_ms"), "{err}");
    let err = bad(&|s| {
        let big = limits::SEMAPHORE_LIMIT_MAX + 1;
        for l in &mut s.leases[0].locks {
            if l.key == "s" {
                l.kind = LockKind::Semaphore {
                    limit: big,
                    permits: 2,
                };
            }
        }
    });
    assert!(err.0.contains("limit"), "{err}");
    // At the maxima, every value comes back exactly.
    let mut edge = good.clone();
    edge.leases[0].ttl_ms = limits::LEASE_TTL_MS_MAX;
    for l in &mut edge.leases[0].locks {
        l.lock_delay_ms = limits::LOCK_DELAY_MS_MAX;
        if l.key == "s" {
            l.kind = LockKind::Semaphore {
                limit: limits::SEMAPHORE_LIMIT_MAX,
                permits: limits::SEMAPHORE_LIMIT_MAX,
            };
        }
    }
    let restored = Engine::restore(Limits::default(), edge.clone(), 0, 0).unwrap();
    assert_eq!(restored.durable_state().leases, edge.leases);
}

#[test]
fn restore_puts_shared_holders_in_grant_order_whatever_the_record_order() {
    let shared = |token: u64| HeldLockView {
        key: "k".into(),
        kind: LockKind::Shared,
        fencing_token: token,
        count: 1,
        acquired_at_ms: 0,
        lock_delay_ms: 0,
    };
    let lease = |id: u128, token: u64| LeaseRecord {
        lease_id: LeaseId(id),
        holder: format!("h{id}"),
        ttl_ms: 60_000,
        expires_at_ms: 60_000,
        created_at_ms: 0,
        reason: None,
        metadata: None,
        owner: None,
        locks: vec![shared(token)],
    };
    // Records arrive in lease-id order, which is not the grant order.
    let state = DurableState {
        fencing_next: 10,
        event_seq_next: 1,
        leases: vec![lease(1, 7), lease(2, 3), lease(3, 5), lease(4, 9)],
        idempotency: vec![],
        lock_delays: vec![],
    };
    let e = Engine::restore(Limits::default(), state, 0, 0).unwrap();
    e.check_invariants().unwrap();
    let tokens: Vec<u64> = e
        .lock_info("k")
        .unwrap()
        .holders
        .iter()
        .map(|(_, h)| h.fencing_token)
        .collect();
    assert_eq!(tokens, vec![3, 5, 7, 9]);
}
