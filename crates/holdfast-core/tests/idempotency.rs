//! Idempotency records against a small reference model with explicit time: begin (started /
//! in progress / completed / fingerprint mismatch / queued), complete, abort, executor lease
//! released, renewed or expired, waiters timing out or cancelled, records expiring. After
//! every step the answers, notifications and records must agree, the engine's invariants
//! hold, and at most one execution per key is in progress.

mod common;

use std::collections::{BTreeMap, VecDeque};

use holdfast_core::*;
use proptest::prelude::*;

const KEYS: [&str; 2] = ["pay-1", "pay-2"];

#[derive(Clone, Debug)]
enum Op {
    Begin {
        key: usize,
        other_fp: bool,
        wait: u64,
        ttl: u64,
    },
    Complete {
        key: usize,
    },
    Abort {
        key: usize,
    },
    ReleaseExecutor {
        key: usize,
    },
    RenewExecutor {
        key: usize,
    },
    Cancel {
        waiter: usize,
    },
    Advance {
        ms: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0usize..2, proptest::bool::weighted(0.15), prop_oneof![Just(0u64), 100u64..4_000], 1_000u64..4_000)
            .prop_map(|(key, other_fp, wait, ttl)| Op::Begin { key, other_fp, wait, ttl }),
        2 => (0usize..2).prop_map(|key| Op::Complete { key }),
        1 => (0usize..2).prop_map(|key| Op::Abort { key }),
        1 => (0usize..2).prop_map(|key| Op::ReleaseExecutor { key }),
        1 => (0usize..2).prop_map(|key| Op::RenewExecutor { key }),
        1 => (0usize..16).prop_map(|waiter| Op::Cancel { waiter }),
        3 => (1u64..3_000).prop_map(|ms| Op::Advance { ms }),
    ]
}

#[derive(Clone, Debug)]
struct MWaiter {
    id: WaiterId,
    lease: NewLease,
    fp: String,
    deadline: u64,
}

#[derive(Clone, Debug)]
enum MState {
    Running {
        lease: LeaseId,
    },
    Done {
        result: IdempotencyResult,
        expires: u64,
    },
}

#[derive(Clone, Debug)]
struct MRec {
    fp: String,
    state: MState,
    created: u64,
    ttl: u64,
    waiters: VecDeque<MWaiter>,
}

#[derive(Default)]
struct Model {
    now: u64,
    records: BTreeMap<String, MRec>,
    /// Executor leases: id -> (lease, expires).
    leases: BTreeMap<LeaseId, (NewLease, u64, u64)>,
    notes: Vec<Notification>,
}

const RECORD_TTL_MS: u64 = 2_500;

fn view(nl: &NewLease, created: u64, expires: u64, ttl: u64) -> LeaseView {
    LeaseView {
        lease_id: nl.lease_id,
        holder: nl.holder.clone(),
        ttl_ms: ttl,
        expires_at_ms: expires,
        created_at_ms: created,
        reason: nl.reason.clone(),
        metadata: nl.metadata.clone(),
        owner: nl.owner.clone(),
        locks: vec![],
    }
}

impl Model {
    fn start(
        &mut self,
        t: u64,
        key: &str,
        nl: NewLease,
        fp: String,
        waiters: VecDeque<MWaiter>,
    ) -> LeaseView {
        self.leases
            .insert(nl.lease_id, (nl.clone(), t, t + nl.ttl_ms));
        self.records.insert(
            key.to_owned(),
            MRec {
                fp,
                state: MState::Running { lease: nl.lease_id },
                created: t,
                ttl: RECORD_TTL_MS,
                waiters,
            },
        );
        view(&nl, t, t + nl.ttl_ms, nl.ttl_ms)
    }

    /// The execution ended without a result: delete, promote the first waiter.
    fn executor_gone(&mut self, t: u64, key: &str) {
        let Some(rec) = self.records.remove(key) else {
            return;
        };
        if let MState::Running { lease } = rec.state {
            self.leases.remove(&lease);
        }
        let mut waiters = rec.waiters;
        if let Some(w) = waiters.pop_front() {
            let v = self.start(t, key, w.lease.clone(), w.fp.clone(), waiters);
            self.notes.push(Notification {
                waiter: w.id,
                outcome: WaitOutcome::Idempotency(IdempotencyOutcome::Started(v)),
            });
        }
    }

    fn advance(&mut self, now: u64) {
        loop {
            let lease = self.leases.iter().map(|(id, l)| (l.2, *id)).min();
            let rec = self
                .records
                .iter()
                .filter_map(|(k, r)| match r.state {
                    MState::Done { expires, .. } => Some((expires, k.clone())),
                    MState::Running { .. } => None,
                })
                .min();
            let waiter = self
                .records
                .iter()
                .flat_map(|(k, r)| r.waiters.iter().map(move |w| (w.deadline, w.id, k.clone())))
                .min();
            let mut best: Option<(u64, u8)> = None;
            for c in [
                lease.map(|x| (x.0, 0u8)),
                rec.as_ref().map(|x| (x.0, 2)),
                waiter.as_ref().map(|x| (x.0, 3)),
            ]
            .into_iter()
            .flatten()
            {
                if best.is_none_or(|b| c < b) {
                    best = Some(c);
                }
            }
            let Some((t, rank)) = best else { break };
            if t > now {
                break;
            }
            match rank {
                0 => {
                    let id = lease.unwrap().1;
                    let key = self
                        .records
                        .iter()
                        .find(|(_, r)| matches!(r.state, MState::Running { lease } if lease == id))
                        .map(|(k, _)| k.clone())
                        .unwrap();
                    self.executor_gone(t, &key);
                }
                2 => {
                    self.records.remove(&rec.unwrap().1);
                }
                _ => {
                    let (_, id, key) = waiter.unwrap();
                    self.records
                        .get_mut(&key)
                        .unwrap()
                        .waiters
                        .retain(|w| w.id != id);
                    self.notes.push(Notification {
                        waiter: id,
                        outcome: WaitOutcome::Failed(LockError::WaitTimeout {
                            key,
                            holders: vec![],
                        }),
                    });
                }
            }
        }
        self.now = now;
    }

    fn executor(&self, key: &str) -> Option<LeaseId> {
        match self.records.get(key)?.state {
            MState::Running { lease } => Some(lease),
            MState::Done { .. } => None,
        }
    }

    fn records(&self) -> Vec<IdempotencyRecord> {
        self.records
            .iter()
            .map(|(k, r)| IdempotencyRecord {
                key: k.clone(),
                fingerprint: r.fp.clone(),
                state: match &r.state {
                    MState::Running { lease } => IdempotencyState::InProgress { lease_id: *lease },
                    MState::Done { result, .. } => IdempotencyState::Completed(result.clone()),
                },
                created_at_ms: r.created,
                record_ttl_ms: r.ttl,
                expires_at_ms: match r.state {
                    MState::Done { expires, .. } => Some(expires),
                    MState::Running { .. } => None,
                },
            })
            .collect()
    }
}

fn run(ops: &[Op]) {
    let mut e = Engine::default();
    let mut m = Model::default();
    let mut now = 0u64;
    let mut next_id = 1u128;
    let mut waiters: Vec<WaiterId> = vec![];
    for (step, op) in ops.iter().enumerate() {
        match op {
            Op::Begin {
                key,
                other_fp,
                wait,
                ttl,
            } => {
                let key = KEYS[*key];
                let nl = NewLease {
                    lease_id: LeaseId(next_id),
                    holder: format!("exec-{next_id}"),
                    ttl_ms: *ttl,
                    reason: None,
                    metadata: None,
                    owner: Some("svc".into()),
                };
                next_id += 1;
                let fp = if *other_fp { "fp-b" } else { "fp-a" }.to_owned();
                let got = e.idempotency_begin(
                    now,
                    IdempotencyBegin {
                        key: key.into(),
                        fingerprint: fp.clone(),
                        lease: nl.clone(),
                        record_ttl_ms: RECORD_TTL_MS,
                        wait_ms: *wait,
                    },
                );
                m.advance(now);
                let want = match m.records.get(key) {
                    None => IdempotencyOutcome::Started(m.start(now, key, nl, fp, VecDeque::new())),
                    Some(r) if r.fp != fp => IdempotencyOutcome::FingerprintMismatch,
                    Some(MRec {
                        state: MState::Done { result, .. },
                        ..
                    }) => IdempotencyOutcome::Completed(result.clone()),
                    Some(MRec {
                        state: MState::Running { lease },
                        ..
                    }) if *wait == 0 => {
                        let (l, _, exp) = &m.leases[lease];
                        IdempotencyOutcome::InProgress {
                            holder: l.holder.clone(),
                            expires_at_ms: *exp,
                        }
                    }
                    Some(_) => {
                        let Ok(IdempotencyOutcome::Queued(w)) = got else {
                            panic!("step {step}: expected queued, got {got:?}")
                        };
                        waiters.push(w);
                        m.records.get_mut(key).unwrap().waiters.push_back(MWaiter {
                            id: w,
                            lease: nl,
                            fp,
                            deadline: now + wait,
                        });
                        IdempotencyOutcome::Queued(w)
                    }
                };
                assert_eq!(got, Ok(want), "step {step}: begin");
            }
            Op::Complete { key }
            | Op::Abort { key }
            | Op::ReleaseExecutor { key }
            | Op::RenewExecutor { key } => {
                let key = KEYS[*key];
                m.advance(now);
                let exec = m.executor(key);
                let lease = exec.unwrap_or(LeaseId(777));
                match op {
                    Op::Complete { .. } => {
                        let result = IdempotencyResult {
                            status: 201,
                            headers: vec![],
                            body: format!("done at {now}"),
                        };
                        let got = e
                            .idempotency_complete(now, key, lease, result.clone())
                            .map(|r| r.state);
                        if exec.is_some() {
                            assert_eq!(
                                got,
                                Ok(IdempotencyState::Completed(result.clone())),
                                "step {step}"
                            );
                            let rec = m.records.get_mut(key).unwrap();
                            rec.state = MState::Done {
                                result: result.clone(),
                                expires: now + rec.ttl,
                            };
                            m.leases.remove(&lease);
                            for w in std::mem::take(&mut rec.waiters) {
                                m.notes.push(Notification {
                                    waiter: w.id,
                                    outcome: WaitOutcome::Idempotency(
                                        IdempotencyOutcome::Completed(result.clone()),
                                    ),
                                });
                            }
                        } else {
                            assert_eq!(
                                got,
                                Err(LockError::IdempotencyNotFound { key: key.into() }),
                                "step {step}"
                            );
                        }
                    }
                    Op::Abort { .. } => {
                        let got = e.idempotency_abort(now, key, lease);
                        if exec.is_some() {
                            assert_eq!(got, Ok(()), "step {step}");
                            m.executor_gone(now, key);
                        } else {
                            assert!(got.is_err(), "step {step}");
                        }
                    }
                    Op::ReleaseExecutor { .. } => {
                        let got = e.release_lease(now, lease);
                        assert_eq!(got.is_ok(), exec.is_some(), "step {step}");
                        if exec.is_some() {
                            m.executor_gone(now, key);
                        }
                    }
                    _ => {
                        let got = e.renew(now, lease, None);
                        assert_eq!(got.is_ok(), exec.is_some(), "step {step}");
                        if let Some(l) = m.leases.get_mut(&lease) {
                            l.2 = now + l.0.ttl_ms;
                        }
                    }
                }
            }
            Op::Cancel { waiter } => {
                if !waiters.is_empty() {
                    let w = waiters[waiter % waiters.len()];
                    let got = e.cancel_wait(now, w);
                    m.advance(now);
                    let mut found = false;
                    for r in m.records.values_mut() {
                        let before = r.waiters.len();
                        r.waiters.retain(|x| x.id != w);
                        found |= r.waiters.len() != before;
                    }
                    assert_eq!(got, found, "step {step}: cancel");
                }
            }
            Op::Advance { ms } => {
                now += ms;
                e.tick(now);
                m.advance(now);
            }
        }
        e.check_invariants()
            .unwrap_or_else(|err| panic!("step {step}: {err}"));
        assert_eq!(
            e.take_notifications(),
            std::mem::take(&mut m.notes),
            "step {step}: notifications"
        );
        assert_eq!(
            e.durable_state().idempotency,
            m.records(),
            "step {step}: records"
        );
        for key in KEYS {
            // At most one execution per key, under a live lease.
            if let Some(IdempotencyState::InProgress { lease_id }) =
                e.idempotency_get(key).map(|r| r.state)
            {
                assert!(e.lease(lease_id).is_some());
            }
        }
        assert_eq!(e.stats().leases as usize, m.leases.len());
    }
    // Every wait ends.
    now += 100_000;
    e.tick(now);
    m.advance(now);
    assert_eq!(e.take_notifications(), std::mem::take(&mut m.notes));
    assert_eq!(e.stats().waiters, 0);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: common::cases(1500), ..ProptestConfig::default() })]

    #[test]
    fn idempotency_matches_model(ops in proptest::collection::vec(op(), 1..60)) {
        run(&ops);
    }
}
