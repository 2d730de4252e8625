//! `check_invariants`: every rule of the crate documentation plus the consistency of the
//! internal indexes, recomputed from scratch (O(state); for tests and simulation).

use std::collections::{HashMap, HashSet};

use crate::engine::{Engine, demand};
use crate::keys::{Family, Usage, WaitTarget};
use crate::types::{IdempotencyState, LockKind};

macro_rules! ensure {
    ($cond:expr, $($arg:tt)+) => {
        if !$cond {
            return Err(format!($($arg)+));
        }
    };
}

pub(crate) fn check(e: &Engine) -> Result<(), String> {
    let now = e.now_ms;
    ensure!(e.fencing_next >= 1, "fencing_next is 0");
    ensure!(e.event_seq_next >= 1, "event_seq_next is 0");
    for ev in &e.events {
        ensure!(
            ev.seq < e.event_seq_next,
            "event seq {} not below next",
            ev.seq
        );
    }
    for w in e.events.windows(2) {
        ensure!(w[0].seq < w[1].seq, "event seq not increasing");
    }

    // Leases and their locks.
    let mut tokens = HashSet::new();
    let mut held_locks = 0usize;
    e.leases.check()?;
    e.keys.check(crate::keys::KeyState::check_layout)?;
    for (slot, lease) in e.leases.iter() {
        let id = &lease.id();
        // Its expiry timer is its place in the lease table's heap (`leases.check` above).
        ensure!(
            lease.expires_at_ms() > now,
            "lease {id} expired at {} but still live at {now}",
            lease.expires_at_ms()
        );
        for w in lease.locks.windows(2) {
            ensure!(w[0].key < w[1].key, "lease {id} locks not sorted/unique");
        }
        for h in &lease.locks {
            held_locks += 1;
            ensure!(h.count >= 1, "lease {id} holds {} with count 0", h.key);
            ensure!(
                h.fencing_token >= 1 && h.fencing_token < e.fencing_next,
                "lease {id} token {} of {} not below fencing_next {}",
                h.fencing_token,
                h.key,
                e.fencing_next
            );
            ensure!(
                tokens.insert(h.fencing_token),
                "fencing token {} issued twice",
                h.fencing_token
            );
            let ks = e
                .keys
                .get(&h.key)
                .ok_or_else(|| format!("lease {id} holds {} missing from the key table", h.key))?;
            ensure!(
                ks.holders().iter().filter(|x| **x == slot).count() == 1,
                "key {} does not list lease {id} exactly once",
                h.key
            );
        }
        if let Some(w) = lease.pending() {
            let waiter = e
                .waiters
                .get(&w)
                .ok_or_else(|| format!("lease {id} pending waiter {w:?} missing"))?;
            ensure!(
                waiter.target_lease() == Some(*id),
                "lease {id} pending waiter {w:?} is for another lease"
            );
        }
        if let Some(k) = lease.executing() {
            let entry = e
                .idem
                .get(k)
                .ok_or_else(|| format!("lease {id} executes missing record {k}"))?;
            ensure!(
                entry.record.state == IdempotencyState::InProgress { lease_id: *id },
                "lease {id} executes {k} but the record is not in progress under it"
            );
        }
    }
    e.holder_names.check(|_| Ok(()))?;
    let mut leases_per_name: HashMap<&str, u32> = HashMap::new();
    for (_, lease) in e.leases.iter() {
        let id = lease.id();
        let Some((name, _)) = e.holder_names.at(lease.holder.0) else {
            return Err(format!(
                "lease {id} names holder slot {} with no name",
                lease.holder.0
            ));
        };
        *leases_per_name.entry(name).or_default() += 1;
    }
    for (name, &count) in e.holder_names.iter() {
        ensure!(
            leases_per_name.get(&**name) == Some(&count),
            "holder name {name} counts {count} leases, {} live",
            leases_per_name.get(&**name).copied().unwrap_or(0)
        );
    }

    // Keys.
    let mut holder_entries = 0usize;
    let mut held_keys = 0u64;
    let mut delays = 0usize;
    for (key, ks) in e.keys.iter() {
        ensure!(!ks.is_empty(), "key {key} is empty but kept");
        if !ks.holders().is_empty() {
            held_keys += 1;
        }
        let mut usage = Usage::default();
        let mut last_token = 0u64;
        for slot in ks.holders().iter() {
            let lease = e
                .leases
                .at(*slot)
                .ok_or_else(|| format!("key {key} held by empty lease slot {slot}"))?;
            let id = lease.id();
            let h = lease
                .lock(key)
                .ok_or_else(|| format!("key {key} lists lease {id} which does not hold it"))?;
            ensure!(
                h.fencing_token > last_token,
                "key {key} holders not in grant (token) order"
            );
            last_token = h.fencing_token;
            ensure!(
                Family::of(h.kind()) == ks.family(),
                "key {key} holder kind {:?} does not match family {:?}",
                h.kind(),
                ks.family()
            );
            usage.add(h.kind());
            holder_entries += 1;
        }
        ensure!(
            usage == ks.held(),
            "key {key} usage {:?} != recomputed {usage:?}",
            ks.held()
        );
        match ks.family() {
            Family::ReadWrite => {
                ensure!(usage.exclusive <= 1, "key {key} has two exclusive holders");
                ensure!(
                    usage.exclusive == 0 || usage.shared == 0,
                    "key {key} has shared holders beside an exclusive holder"
                );
            }
            Family::Semaphore(limit) => {
                ensure!(
                    usage.permits <= u64::from(limit),
                    "key {key} semaphore over its limit: {} > {limit}",
                    usage.permits
                );
            }
        }
        if let Some(d) = ks.delayed_until_ms() {
            delays += 1;
            ensure!(d > now, "key {key} delay until {d} not ended at {now}");
            ensure!(
                e.delay_timers.contains(&(d, Box::from(&**key))),
                "key {key} delay has no timer"
            );
        }
        let mut last = None;
        for w in ks.waiters() {
            ensure!(last < Some(*w), "key {key} queue not in arrival order");
            last = Some(*w);
            let waiter = e
                .waiters
                .get(w)
                .ok_or_else(|| format!("key {key} queues missing waiter {w:?}"))?;
            let spec = waiter
                .locks
                .iter()
                .find(|s| *s.key == **key)
                .ok_or_else(|| format!("key {key} queues waiter {w:?} that does not name it"))?;
            ensure!(
                Family::of(spec.kind) == ks.family(),
                "key {key} waiter {w:?} kind does not match the key's family"
            );
        }
    }
    ensure!(
        held_keys == e.held_keys,
        "held_keys counter {} != {held_keys}",
        e.held_keys
    );
    ensure!(
        holder_entries == held_locks,
        "key table holder entries != held locks"
    );
    ensure!(
        delays == e.delay_timers.len(),
        "delay timers do not match delays"
    );

    // Lock waiters.
    let mut pending_leases = HashSet::new();
    for (w, waiter) in &e.waiters {
        ensure!(
            e.waiter_timers.contains(&(waiter.deadline_ms, *w)),
            "waiter {w:?} has no timer"
        );
        ensure!(waiter.deadline_ms > now, "waiter {w:?} past its deadline");
        for spec in &waiter.locks {
            let ks = e
                .keys
                .get(spec.key.as_str())
                .ok_or_else(|| format!("waiter {w:?} key {} missing", spec.key))?;
            ensure!(
                ks.has_waiter(*w),
                "waiter {w:?} not in the queue of {}",
                spec.key
            );
        }
        if let WaitTarget::Lease(id) = waiter.target {
            let lease = e
                .leases
                .get(&id)
                .ok_or_else(|| format!("waiter {w:?} for missing lease {id}"))?;
            ensure!(
                lease.pending() == Some(*w),
                "lease {id} does not point to its waiter"
            );
            ensure!(
                pending_leases.insert(id),
                "lease {id} has two queued requests"
            );
        }
        // No lost wake-up: a queued request is not grantable.
        let own = waiter.target_lease().and_then(|id| e.leases.get(&id));
        let grantable = waiter.locks.iter().all(|spec| {
            let held = own.and_then(|l| l.lock(&spec.key));
            let Some(d) = demand(held, spec.kind) else {
                return true;
            };
            let Some(ks) = e.keys.get(spec.key.as_str()) else {
                return true;
            };
            if ks.delayed() {
                return false;
            }
            let mut u = ks.held();
            if let Some(h) = held {
                u.sub(h.kind());
            }
            for q in ks.waiters().take_while(|q| **q < *w) {
                if let Some(x) = e.waiters.get(q)
                    && let Some(k) = e.waiter_demand(x, &spec.key)
                {
                    u.add(k);
                }
            }
            u.admits(d)
        });
        ensure!(!grantable, "waiter {w:?} is grantable but still queued");
        let _ = LockKind::Exclusive;
    }

    // Idempotency.
    let mut idem_timers = 0usize;
    for (key, entry) in &e.idem {
        ensure!(
            *entry.record.key == **key,
            "record {key} indexed under another key"
        );
        match &entry.record.state {
            IdempotencyState::InProgress { lease_id } => {
                let lease = e
                    .leases
                    .get(lease_id)
                    .ok_or_else(|| format!("record {key} executor lease missing"))?;
                ensure!(
                    lease.executing() == Some(&**key),
                    "record {key} executor lease does not point back"
                );
            }
            IdempotencyState::Completed(_) => {
                ensure!(
                    entry.waiters.is_empty(),
                    "completed record {key} has waiters"
                );
                let exp = entry
                    .record
                    .expires_at_ms
                    .ok_or_else(|| format!("completed record {key} without expiry"))?;
                ensure!(exp > now, "record {key} expired but kept");
                ensure!(
                    e.idem_timers.contains(&(exp, key.clone())),
                    "record {key} has no expiry timer"
                );
                idem_timers += 1;
            }
        }
        for w in &entry.waiters {
            let iw = e
                .idem_waiters
                .get(w)
                .ok_or_else(|| format!("record {key} queues missing waiter {w:?}"))?;
            ensure!(
                *iw.key == **key,
                "idempotency waiter {w:?} on the wrong key"
            );
        }
    }
    ensure!(
        idem_timers == e.idem_timers.len(),
        "idempotency timers do not match"
    );
    for (w, iw) in &e.idem_waiters {
        ensure!(
            e.idem.get(&iw.key).is_some_and(|x| x.waiters.contains(w)),
            "idempotency waiter {w:?} not queued on its record"
        );
        ensure!(
            e.waiter_timers.contains(&(iw.deadline_ms, *w)),
            "idempotency waiter {w:?} has no timer"
        );
    }
    ensure!(
        e.waiter_timers.len() == e.waiters.len() + e.idem_waiters.len(),
        "waiter timers do not match waiters"
    );
    if let Some(t) = e.next_due() {
        ensure!(
            t.0 > now,
            "a timer at {} is due but not applied at {now}",
            t.0
        );
    }
    Ok(())
}
