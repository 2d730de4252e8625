//! Durable state out (`durable_state`) and back in (`restore`), with validation of what comes
//! back: a corrupted or hand-edited state is refused rather than served.

use std::collections::{HashMap, HashSet, VecDeque};

use crate::engine::Engine;
use crate::error::RestoreError;
use crate::idempotency::IdemEntry;
use crate::keys::{Family, KeyState};
use crate::leases::{HeldLock, Lease, LeaseExtra};
use crate::limits::Limits;
use crate::types::{DurableState, IdempotencyState, LeaseId, LockKind, TimeMs};

pub(crate) fn durable_state(e: &Engine) -> DurableState {
    let mut leases: Vec<_> = e.leases.values().map(Lease::record).collect();
    leases.sort_by_key(|l| l.lease_id);
    let mut idempotency: Vec<_> = e.idem.values().map(|x| x.record.clone()).collect();
    idempotency.sort_by(|a, b| a.key.cmp(&b.key));
    let mut lock_delays: Vec<(String, TimeMs)> = e
        .keys
        .iter()
        .filter_map(|(k, ks)| ks.delayed_until_ms.map(|d| (k.to_string(), d)))
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

pub(crate) fn restore(
    limits: Limits,
    state: DurableState,
    now_ms: TimeMs,
    grace_ms: u64,
) -> Result<Engine, RestoreError> {
    let mut e = Engine::new(limits);
    if state.fencing_next == 0 {
        return Err(err("fencing_next is 0; tokens start at 1"));
    }
    if state.event_seq_next == 0 {
        return Err(err("event_seq_next is 0; sequence numbers start at 1"));
    }
    e.fencing_next = state.fencing_next;
    e.event_seq_next = state.event_seq_next;
    e.dirty.fencing_taken = state.fencing_next;
    e.dirty.seq_taken = state.event_seq_next;
    let floor = now_ms.saturating_add(grace_ms);

    let mut tokens: HashSet<u64> = HashSet::new();
    // key -> (holder lease, token) to order holders by grant order.
    let mut holders: HashMap<std::sync::Arc<str>, Vec<(u64, LeaseId)>> = HashMap::new();
    for rec in state.leases {
        let id = rec.lease_id;
        if e.leases.contains_key(&id) {
            return Err(err(format!("lease {id} appears twice")));
        }
        if rec.holder.is_empty() {
            return Err(err(format!("lease {id} has an empty holder")));
        }
        let mut locks: Vec<HeldLock> = rec.locks.iter().map(HeldLock::from_view).collect();
        locks.sort_by(|a, b| a.key.cmp(&b.key));
        for w in locks.windows(2) {
            if w[0].key == w[1].key {
                return Err(err(format!("lease {id} holds key {} twice", w[0].key)));
            }
        }
        for h in &locks {
            if h.count == 0 {
                return Err(err(format!("lease {id} holds {} with count 0", h.key)));
            }
            if h.fencing_token == 0 || h.fencing_token >= state.fencing_next {
                return Err(err(format!(
                    "lease {id} holds {} with fencing token {}, not in 1..{}",
                    h.key, h.fencing_token, state.fencing_next
                )));
            }
            if !tokens.insert(h.fencing_token) {
                return Err(err(format!(
                    "fencing token {} is issued to two grants",
                    h.fencing_token
                )));
            }
            if let LockKind::Semaphore { limit, permits } = h.kind
                && (limit == 0 || permits == 0 || permits > limit)
            {
                return Err(err(format!(
                    "lease {id} holds semaphore {} with {permits} of {limit} permits",
                    h.key
                )));
            }
            holders
                .entry(h.key.clone())
                .or_default()
                .push((h.fencing_token, id));
        }
        let expires_at_ms = rec.expires_at_ms.max(floor);
        if expires_at_ms != rec.expires_at_ms {
            e.dirty.leases.insert(id);
        }
        e.lease_timers.insert((expires_at_ms, id));
        e.leases.insert(
            id,
            Lease::new(
                id,
                rec.holder.into(),
                rec.ttl_ms,
                expires_at_ms,
                rec.created_at_ms,
                locks,
                LeaseExtra {
                    reason: rec.reason.map(Into::into),
                    metadata: rec.metadata.map(Into::into),
                    owner: rec.owner.map(Into::into),
                    executing: None,
                }
                .boxed(),
            ),
        );
    }

    let mut keys: Vec<_> = holders.into_iter().collect();
    keys.sort();
    for (key, mut hs) in keys {
        hs.sort();
        let mut ks: Option<KeyState> = None;
        for (_, id) in &hs {
            let kind = e
                .leases
                .get(id)
                .and_then(|l| l.lock(&key))
                .map(|h| h.kind)
                .ok_or_else(|| err("internal: holder vanished"))?;
            let ks = ks.get_or_insert_with(|| KeyState::new(Family::of(kind)));
            if ks.family != Family::of(kind) {
                return Err(err(format!(
                    "key {key} is held with different modes or semaphore limits"
                )));
            }
            ks.holders.push(*id);
            ks.held.add(kind);
        }
        if let Some(ks) = ks {
            let ok = match ks.family {
                Family::ReadWrite => {
                    ks.held.exclusive == 0 || (ks.held.exclusive == 1 && ks.held.shared == 0)
                }
                Family::Semaphore(limit) => ks.held.permits <= u64::from(limit),
            };
            if !ok {
                return Err(err(format!("key {key} has conflicting holders")));
            }
            e.held_keys += 1;
            e.keys.insert(key, ks);
        }
    }

    for (key, until) in state.lock_delays {
        let ks = e
            .keys
            .entry(key.as_str().into())
            .or_insert_with(|| KeyState::new(Family::ReadWrite));
        if ks.delayed_until_ms.is_some() {
            return Err(err(format!("key {key} has two lock-delays")));
        }
        ks.delayed_until_ms = Some(until);
        e.delay_timers.insert((until, key.into()));
    }

    for rec in state.idempotency {
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
    e.check_invariants().map_err(err)?;
    Ok(e)
}
