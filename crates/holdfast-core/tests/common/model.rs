//! A small, obviously-correct reference model of the lock rules, and a driver that runs the
//! same random operations against the model and the engine and compares everything after
//! every step.
//!
//! The model keeps plain lists and recomputes every decision from scratch by brute force:
//! grantability by walking all earlier waiters, the wait-for graph by enumerating every
//! edge and taking its transitive closure. It shares no code with the engine.
#![allow(
    dead_code,
    clippy::too_many_arguments,
    clippy::type_complexity,
    clippy::new_without_default
)]

use std::collections::{BTreeMap, BTreeSet};

use holdfast_core::*;
use proptest::prelude::*;

// ---------------------------------------------------------------------------------------
// The model.
// ---------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
pub struct MHeld {
    pub kind: LockKind,
    pub token: u64,
    pub count: u32,
    pub acquired: u64,
    pub delay: u64,
}

#[derive(Clone, Debug)]
pub struct MLease {
    pub id: LeaseId,
    pub holder: String,
    pub owner: Option<String>,
    pub metadata: Option<String>,
    pub ttl: u64,
    pub expires: u64,
    pub created: u64,
    pub reason: Option<String>,
    pub locks: BTreeMap<String, MHeld>,
}

#[derive(Clone, Debug)]
pub enum MTarget {
    New(NewLease),
    Lease(LeaseId),
}

#[derive(Clone, Debug)]
pub struct MWaiter {
    pub id: WaiterId,
    pub target: MTarget,
    pub join: Option<(u64, Option<String>)>,
    pub holder: String,
    pub locks: Vec<LockSpec>,
    pub since: u64,
    pub deadline: u64,
}

impl MWaiter {
    fn lease(&self) -> Option<LeaseId> {
        match self.target {
            MTarget::New(_) => None,
            MTarget::Lease(id) => Some(id),
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct Model {
    pub now: u64,
    pub fencing_next: u64,
    pub seq_next: u64,
    pub leases: BTreeMap<LeaseId, MLease>,
    /// Arrival order.
    pub waiters: Vec<MWaiter>,
    pub delays: BTreeMap<String, u64>,
    pub notes: Vec<Notification>,
    pub events: Vec<Event>,
    pub max_token: u64,
}

fn family(kind: LockKind) -> Option<u32> {
    match kind {
        LockKind::Semaphore { limit, .. } => Some(limit),
        _ => None,
    }
}

/// Does `want` fit beside all of `others` (kinds of holders and earlier requests)?
fn fits(others: &[LockKind], want: LockKind) -> bool {
    match want {
        LockKind::Exclusive => others.is_empty(),
        LockKind::Shared => others.iter().all(|k| *k != LockKind::Exclusive),
        LockKind::Semaphore { limit, permits } => {
            let used: u64 = others
                .iter()
                .map(|k| match k {
                    LockKind::Semaphore { permits, .. } => u64::from(*permits),
                    _ => u64::from(limit) + 1,
                })
                .sum();
            used + u64::from(permits) <= u64::from(limit)
        }
    }
}

fn pair_conflict(a: LockKind, b: LockKind) -> bool {
    matches!(
        (a, b),
        (LockKind::Exclusive, LockKind::Exclusive | LockKind::Shared)
            | (LockKind::Shared, LockKind::Exclusive)
    )
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum GNode {
    Lease(LeaseId),
    Waiter(usize),
    New,
}

impl Model {
    pub fn new() -> Self {
        Model {
            fencing_next: 1,
            seq_next: 1,
            ..Model::default()
        }
    }

    fn emit(
        &mut self,
        at: u64,
        kind: EventKind,
        key: Option<&str>,
        holder: &str,
        lock_kind: Option<LockKind>,
        token: Option<u64>,
        held: Option<u64>,
        waited: Option<u64>,
    ) {
        self.events.push(Event {
            seq: self.seq_next,
            at_ms: at,
            kind,
            key: key.map(Into::into),
            holder: holder.into(),
            lock_kind,
            fencing_token: token,
            held_ms: held,
            waited_ms: waited,
        });
        self.seq_next += 1;
    }

    /// Holders of a key in grant (token) order.
    fn holders(&self, key: &str) -> Vec<(LeaseId, MHeld)> {
        let mut v: Vec<(LeaseId, MHeld)> = self
            .leases
            .values()
            .filter_map(|l| l.locks.get(key).map(|h| (l.id, h.clone())))
            .collect();
        v.sort_by_key(|(_, h)| h.token);
        v
    }

    fn summaries(&self, key: &str) -> Vec<HolderSummary> {
        self.holders(key)
            .into_iter()
            .map(|(id, h)| {
                let l = &self.leases[&id];
                HolderSummary {
                    holder: l.holder.clone(),
                    kind: h.kind,
                    since_ms: h.acquired,
                    expires_at_ms: l.expires,
                    reason: l.reason.clone(),
                    fencing_token: h.token,
                    count: h.count,
                }
            })
            .collect()
    }

    /// What a request of lease `own` needs on a key (None: count + 1 only).
    fn demand(&self, own: Option<LeaseId>, spec: &LockSpec) -> Option<LockKind> {
        let held = own
            .and_then(|id| self.leases.get(&id))
            .and_then(|l| l.locks.get(&spec.key));
        match held {
            None => Some(spec.kind),
            Some(h) => match (h.kind, spec.kind) {
                (LockKind::Shared, LockKind::Exclusive) => Some(LockKind::Exclusive),
                (LockKind::Exclusive, _) | (LockKind::Shared, LockKind::Shared) => None,
                (LockKind::Semaphore { .. }, LockKind::Semaphore { .. }) => None,
                _ => Some(spec.kind),
            },
        }
    }

    fn waiter_demand(&self, w: &MWaiter, key: &str) -> Option<LockKind> {
        let spec = w.locks.iter().find(|s| s.key == key)?;
        self.demand(w.lease(), spec)
    }

    /// Holders other than `own`, and the requests queued before index `before`.
    fn others(
        &self,
        own: Option<LeaseId>,
        key: &str,
        before: usize,
    ) -> (Vec<(LeaseId, LockKind)>, Vec<(usize, LockKind)>) {
        let hs = self
            .holders(key)
            .into_iter()
            .filter(|(id, _)| Some(*id) != own)
            .map(|(id, h)| (id, h.kind))
            .collect();
        let ws = self.waiters[..before]
            .iter()
            .enumerate()
            .filter_map(|(i, w)| self.waiter_demand(w, key).map(|d| (i, d)))
            .collect();
        (hs, ws)
    }

    fn admits(&self, own: Option<LeaseId>, spec: &LockSpec, before: usize, _t: u64) -> bool {
        let Some(d) = self.demand(own, spec) else {
            return true;
        };
        if self.delays.contains_key(&spec.key) {
            return false;
        }
        let (hs, ws) = self.others(own, &spec.key, before);
        let all: Vec<LockKind> = hs
            .iter()
            .map(|x| x.1)
            .chain(ws.iter().map(|x| x.1))
            .collect();
        fits(&all, d)
    }

    fn first_blocked(
        &self,
        own: Option<LeaseId>,
        locks: &[LockSpec],
        before: usize,
        t: u64,
    ) -> Option<usize> {
        locks.iter().position(|s| !self.admits(own, s, before, t))
    }

    // ----- wait-for graph, brute force -----

    fn edges_of_request(
        &self,
        own: Option<LeaseId>,
        locks: &[LockSpec],
        before: usize,
    ) -> Vec<GNode> {
        let mut out = Vec::new();
        for spec in locks {
            let Some(d) = self.demand(own, spec) else {
                continue;
            };
            let (hs, ws) = self.others(own, &spec.key, before);
            if family(d).is_some() {
                let all: Vec<LockKind> = hs
                    .iter()
                    .map(|x| x.1)
                    .chain(ws.iter().map(|x| x.1))
                    .collect();
                if !fits(&all, d) {
                    out.extend(hs.iter().map(|x| GNode::Lease(x.0)));
                    out.extend(ws.iter().map(|x| GNode::Waiter(x.0)));
                }
            } else {
                out.extend(
                    hs.iter()
                        .filter(|x| pair_conflict(d, x.1))
                        .map(|x| GNode::Lease(x.0)),
                );
                out.extend(
                    ws.iter()
                        .filter(|x| pair_conflict(d, x.1))
                        .map(|x| GNode::Waiter(x.0)),
                );
            }
        }
        out
    }

    /// Every edge of the wait-for graph, plus the edges of a hypothetical new request.
    fn graph(&self, new_req: Option<(LeaseId, &[LockSpec])>) -> BTreeMap<GNode, BTreeSet<GNode>> {
        let mut g: BTreeMap<GNode, BTreeSet<GNode>> = BTreeMap::new();
        for (i, w) in self.waiters.iter().enumerate() {
            g.entry(GNode::Waiter(i))
                .or_default()
                .extend(self.edges_of_request(w.lease(), &w.locks, i));
            if let Some(id) = w.lease() {
                g.entry(GNode::Lease(id))
                    .or_default()
                    .insert(GNode::Waiter(i));
            }
        }
        if let Some((id, locks)) = new_req {
            g.entry(GNode::New)
                .or_default()
                .extend(self.edges_of_request(Some(id), locks, self.waiters.len()));
            g.entry(GNode::Lease(id)).or_default().insert(GNode::New);
        }
        g
    }

    /// Brute force: is `node` on a cycle? (transitive closure by repeated expansion)
    fn on_cycle(g: &BTreeMap<GNode, BTreeSet<GNode>>, node: GNode) -> bool {
        let mut reach: BTreeSet<GNode> = g.get(&node).cloned().unwrap_or_default();
        loop {
            let mut next = reach.clone();
            for n in &reach {
                if let Some(s) = g.get(n) {
                    next.extend(s.iter().copied());
                }
            }
            if next.len() == reach.len() {
                break;
            }
            reach = next;
        }
        reach.contains(&node)
    }

    // ----- state changes -----

    fn lease_view(&self, id: LeaseId) -> LeaseView {
        let l = &self.leases[&id];
        LeaseView {
            lease_id: id,
            holder: l.holder.clone(),
            ttl_ms: l.ttl,
            expires_at_ms: l.expires,
            created_at_ms: l.created,
            reason: l.reason.clone(),
            metadata: l.metadata.clone(),
            owner: l.owner.clone(),
            locks: l.locks.iter().map(|(k, h)| held_view(k, h)).collect(),
        }
    }

    fn do_grant(
        &mut self,
        t: u64,
        target: MTarget,
        locks: &[LockSpec],
        join: Option<(u64, Option<String>)>,
        since: Option<u64>,
    ) -> Result<Grant, LockError> {
        let (id, created) = match target {
            MTarget::New(nl) => {
                if self.leases.contains_key(&nl.lease_id) {
                    return Err(LockError::Invalid {
                        field: "lease_id".into(),
                        reason: "a lease with this id already exists".into(),
                    });
                }
                self.leases.insert(
                    nl.lease_id,
                    MLease {
                        id: nl.lease_id,
                        holder: nl.holder.clone(),
                        owner: nl.owner.clone(),
                        metadata: nl.metadata.clone(),
                        ttl: nl.ttl_ms,
                        expires: t + nl.ttl_ms,
                        created: t,
                        reason: nl.reason.clone(),
                        locks: BTreeMap::new(),
                    },
                );
                (nl.lease_id, true)
            }
            MTarget::Lease(id) => {
                if !self.leases.contains_key(&id) {
                    return Err(LockError::LeaseNotFound { lease_id: id });
                }
                (id, false)
            }
        };
        if let Some((ttl, reason)) = join {
            let l = self.leases.get_mut(&id).unwrap();
            l.ttl = ttl;
            l.expires = t + ttl;
            if reason.is_some() {
                l.reason = reason;
            }
        }
        let mut granted = Vec::new();
        for spec in locks {
            let l = self.leases.get_mut(&id).unwrap();
            let holder = l.holder.clone();
            let h = match l.locks.get_mut(&spec.key) {
                Some(h) => {
                    h.count += 1;
                    if h.kind == LockKind::Shared && spec.kind == LockKind::Exclusive {
                        h.kind = LockKind::Exclusive;
                        h.token = self.fencing_next;
                        self.fencing_next += 1;
                    }
                    h.clone()
                }
                None => {
                    let h = MHeld {
                        kind: spec.kind,
                        token: self.fencing_next,
                        count: 1,
                        acquired: t,
                        delay: spec.lock_delay_ms,
                    };
                    self.fencing_next += 1;
                    l.locks.insert(spec.key.clone(), h.clone());
                    h
                }
            };
            // Tokens strictly increasing over all grants.
            if h.token > self.max_token {
                self.max_token = h.token;
            }
            self.emit(
                t,
                EventKind::Granted,
                Some(&spec.key),
                &holder,
                Some(h.kind),
                Some(h.token),
                None,
                since.map(|s| t - s),
            );
            granted.push(held_view(&spec.key, &h));
        }
        Ok(Grant {
            lease: self.lease_view(id),
            granted,
            created_lease: created,
        })
    }

    /// Grant every grantable waiter (arrival order), until none is grantable.
    fn grant_pass(&mut self, t: u64) {
        loop {
            let ready: Vec<usize> = (0..self.waiters.len())
                .filter(|&i| {
                    let w = &self.waiters[i];
                    self.first_blocked(w.lease(), &w.locks, i, t).is_none()
                })
                .collect();
            if ready.is_empty() {
                return;
            }
            // FIFO: each is compatible with every request queued before it (by construction
            // of `admits`); remove them all, then grant in arrival order.
            let mut taken = Vec::new();
            for i in ready.into_iter().rev() {
                taken.push(self.waiters.remove(i));
            }
            taken.reverse();
            for w in taken {
                let out = match self.do_grant(
                    t,
                    w.target.clone(),
                    &w.locks,
                    w.join.clone(),
                    Some(w.since),
                ) {
                    Ok(g) => WaitOutcome::Granted(g),
                    Err(e) => WaitOutcome::Failed(e),
                };
                self.notes.push(Notification {
                    waiter: w.id,
                    outcome: out,
                });
            }
        }
    }

    fn remove_waiter_by_id(&mut self, id: WaiterId) -> Option<MWaiter> {
        let i = self.waiters.iter().position(|w| w.id == id)?;
        Some(self.waiters.remove(i))
    }

    fn set_delay(&mut self, key: &str, until: u64) {
        let e = self.delays.entry(key.to_owned()).or_insert(0);
        *e = (*e).max(until);
    }

    /// Remove a lease: events per lock in key order, lock-delay if involuntary, its queued
    /// request fails.
    fn remove_lease(&mut self, id: LeaseId, t: u64, how: &EventKind) -> Option<MLease> {
        let l = self.leases.remove(&id)?;
        for (k, h) in &l.locks {
            self.emit(
                t,
                how.clone(),
                Some(k),
                &l.holder,
                Some(h.kind),
                Some(h.token),
                Some(t - h.acquired),
                None,
            );
            if *how != EventKind::Released && h.delay > 0 {
                self.set_delay(k, t + h.delay);
            }
        }
        if let Some(i) = self.waiters.iter().position(|w| w.lease() == Some(id)) {
            let w = self.waiters.remove(i);
            self.notes.push(Notification {
                waiter: w.id,
                outcome: WaitOutcome::Failed(LockError::LeaseNotFound { lease_id: id }),
            });
        }
        Some(l)
    }

    /// After lease `id` lost `key`: its queued request naming the key fails if it is now on
    /// a cycle.
    fn recheck(&mut self, id: LeaseId, key: &str, t: u64) {
        let Some(i) = self.waiters.iter().position(|w| w.lease() == Some(id)) else {
            return;
        };
        let Some(spec) = self.waiters[i].locks.iter().find(|s| s.key == key).cloned() else {
            return;
        };
        let g = self.graph(None);
        if Self::on_cycle(&g, GNode::Waiter(i)) {
            let w = self.waiters.remove(i);
            self.emit(
                t,
                EventKind::Deadlock,
                Some(key),
                &w.holder,
                Some(spec.kind),
                None,
                None,
                None,
            );
            self.notes.push(Notification {
                waiter: w.id,
                outcome: WaitOutcome::Failed(LockError::Deadlock {
                    key: key.to_owned(),
                    cycle: vec![],
                }),
            });
        }
    }

    /// Apply every timer due by `now`, one at a time in (time, kind, id) order.
    pub fn advance(&mut self, now: u64) -> u64 {
        let now = now.max(self.now);
        loop {
            let lease = self.leases.values().map(|l| (l.expires, l.id)).min();
            let delay = self.delays.iter().map(|(k, t)| (*t, k.clone())).min();
            let waiter = self.waiters.iter().map(|w| (w.deadline, w.id)).min();
            let mut best: Option<(u64, u8)> = None;
            for c in [
                lease.map(|x| (x.0, 0u8)),
                delay.as_ref().map(|x| (x.0, 1)),
                waiter.map(|x| (x.0, 3)),
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
                    self.remove_lease(id, t, &EventKind::Expired);
                }
                1 => {
                    let k = delay.unwrap().1;
                    self.delays.remove(&k);
                }
                _ => {
                    let id = waiter.unwrap().1;
                    let i = self.waiters.iter().position(|w| w.id == id).unwrap();
                    let w = self.waiters[i].clone();
                    let b = self.first_blocked(w.lease(), &w.locks, i, t).unwrap_or(0);
                    let key = w.locks[b].key.clone();
                    let holders = self.summaries(&key);
                    self.waiters.remove(i);
                    self.emit(
                        t,
                        EventKind::TimedOut,
                        Some(&w.locks[0].key),
                        &w.holder,
                        Some(w.locks[0].kind),
                        None,
                        None,
                        Some(t - w.since),
                    );
                    self.notes.push(Notification {
                        waiter: id,
                        outcome: WaitOutcome::Failed(LockError::WaitTimeout { key, holders }),
                    });
                }
            }
            self.grant_pass(t);
        }
        self.now = now;
        now
    }

    // ----- operations -----

    /// `engine_waiter` is the id the engine assigned if it queued the request.
    pub fn acquire(
        &mut self,
        now: u64,
        req: &AcquireRequest,
        engine_waiter: Option<WaiterId>,
    ) -> Result<AcquireOutcome, LockError> {
        let now = self.advance(now);
        let out = self.acquire_inner(now, req, engine_waiter);
        self.grant_pass(now);
        out
    }

    fn acquire_inner(
        &mut self,
        now: u64,
        req: &AcquireRequest,
        engine_waiter: Option<WaiterId>,
    ) -> Result<AcquireOutcome, LockError> {
        let (target, join) = match &req.target {
            LeaseTarget::New(nl) => {
                let mut join = None;
                if req.reentrant {
                    'outer: for spec in &req.locks {
                        for (id, _) in self.holders(&spec.key) {
                            let l = &self.leases[&id];
                            if l.holder == nl.holder && l.owner == nl.owner {
                                join = Some(id);
                                break 'outer;
                            }
                        }
                    }
                }
                (join, join.map(|_| (nl.ttl_ms, nl.reason.clone())))
            }
            LeaseTarget::Existing(id) => {
                if !self.leases.contains_key(id) {
                    return Err(LockError::LeaseNotFound { lease_id: *id });
                }
                (Some(*id), None)
            }
        };
        for (i, spec) in req.locks.iter().enumerate() {
            let hs = self.holders(&spec.key);
            let existing = hs.first().map(|(_, h)| h.kind).or_else(|| {
                self.waiters
                    .iter()
                    .find_map(|w| w.locks.iter().find(|s| s.key == spec.key).map(|s| s.kind))
            });
            if let Some(ex) = existing
                && family(ex) != family(spec.kind)
            {
                return Err(LockError::LimitMismatch {
                    key: spec.key.clone(),
                    existing: ex,
                    requested: spec.kind,
                });
            }
            if let Some(h) = target.and_then(|id| self.leases[&id].locks.get(&spec.key))
                && let (
                    LockKind::Semaphore { permits: a, .. },
                    LockKind::Semaphore { permits: b, .. },
                ) = (h.kind, spec.kind)
                && a != b
            {
                return Err(LockError::Invalid {
                    field: format!("locks[{i}].kind.permits"),
                    reason: String::new(),
                });
            }
        }
        let n = self.waiters.len();
        let Some(b) = self.first_blocked(target, &req.locks, n, now) else {
            let t = match (&req.target, target) {
                (_, Some(id)) => MTarget::Lease(id),
                (LeaseTarget::New(nl), None) => MTarget::New(nl.clone()),
                (LeaseTarget::Existing(id), None) => MTarget::Lease(*id),
            };
            return self
                .do_grant(now, t, &req.locks, join, None)
                .map(AcquireOutcome::Granted);
        };
        let key = req.locks[b].key.clone();
        if req.wait_ms == 0 {
            return Err(LockError::LockHeld {
                holders: self.summaries(&key),
                delayed_until_ms: self.delays.get(&key).copied().filter(|d| *d > now),
                key,
            });
        }
        if let Some(id) = target
            && self.waiters.iter().any(|w| w.lease() == Some(id))
        {
            return Err(LockError::Overloaded {
                what: "queued requests of this lease".into(),
                limit: 1,
            });
        }
        let holder = match &req.target {
            LeaseTarget::New(nl) => nl.holder.clone(),
            LeaseTarget::Existing(id) => self.leases[id].holder.clone(),
        };
        if let Some(id) = target {
            let g = self.graph(Some((id, &req.locks)));
            if Self::on_cycle(&g, GNode::New) {
                self.emit(
                    now,
                    EventKind::Deadlock,
                    Some(&key),
                    &holder,
                    Some(req.locks[b].kind),
                    None,
                    None,
                    None,
                );
                return Err(LockError::Deadlock { key, cycle: vec![] });
            }
        }
        let id = engine_waiter.expect("the model queues a request the engine did not queue");
        let t = match (&req.target, target) {
            (_, Some(lid)) => MTarget::Lease(lid),
            (LeaseTarget::New(nl), None) => MTarget::New(nl.clone()),
            (LeaseTarget::Existing(lid), None) => MTarget::Lease(*lid),
        };
        self.waiters.push(MWaiter {
            id,
            target: t,
            join,
            holder,
            locks: req.locks.clone(),
            since: now,
            deadline: now + req.wait_ms,
        });
        Ok(AcquireOutcome::Queued(id))
    }

    fn release_one(&mut self, t: u64, id: LeaseId, key: &str) -> Result<(), LockError> {
        let l = self
            .leases
            .get_mut(&id)
            .ok_or(LockError::LeaseNotFound { lease_id: id })?;
        let h = l.locks.get_mut(key).ok_or(LockError::LockNotHeld {
            key: key.to_owned(),
        })?;
        if h.count > 1 {
            h.count -= 1;
            return Ok(());
        }
        let h = l.locks.remove(key).unwrap();
        let holder = l.holder.clone();
        self.emit(
            t,
            EventKind::Released,
            Some(key),
            &holder,
            Some(h.kind),
            Some(h.token),
            Some(t - h.acquired),
            None,
        );
        self.recheck(id, key, t);
        Ok(())
    }

    pub fn release_lock(
        &mut self,
        now: u64,
        id: LeaseId,
        key: &str,
    ) -> Result<LeaseView, LockError> {
        let now = self.advance(now);
        let r = self.release_one(now, id, key);
        self.grant_pass(now);
        r.map(|()| self.lease_view(id))
    }

    pub fn release_lease(&mut self, now: u64, id: LeaseId) -> Result<LeaseView, LockError> {
        let now = self.advance(now);
        if !self.leases.contains_key(&id) {
            return Err(LockError::LeaseNotFound { lease_id: id });
        }
        let view = self.lease_view(id);
        self.remove_lease(id, now, &EventKind::Released);
        self.grant_pass(now);
        Ok(view)
    }

    pub fn renew(
        &mut self,
        now: u64,
        id: LeaseId,
        ttl: Option<u64>,
    ) -> Result<LeaseView, LockError> {
        let now = self.advance(now);
        let l = self
            .leases
            .get_mut(&id)
            .ok_or(LockError::LeaseNotFound { lease_id: id })?;
        l.ttl = ttl.unwrap_or(l.ttl);
        l.expires = now + l.ttl;
        let holder = l.holder.clone();
        self.emit(
            now,
            EventKind::Renewed,
            None,
            &holder,
            None,
            None,
            None,
            None,
        );
        Ok(self.lease_view(id))
    }

    pub fn force_release_lock(
        &mut self,
        now: u64,
        key: &str,
        reason: &str,
    ) -> Result<Vec<LeaseView>, LockError> {
        let now = self.advance(now);
        let hs = self.holders(key);
        if hs.is_empty() {
            return Err(LockError::LockNotFound {
                key: key.to_owned(),
            });
        }
        let mut out = Vec::new();
        for (id, h) in hs {
            let l = self.leases.get_mut(&id).unwrap();
            l.locks.remove(key);
            let holder = l.holder.clone();
            self.emit(
                now,
                EventKind::ForceReleased {
                    reason: reason.to_owned(),
                },
                Some(key),
                &holder,
                Some(h.kind),
                Some(h.token),
                Some(now - h.acquired),
                None,
            );
            if h.delay > 0 {
                self.set_delay(key, now + h.delay);
            }
            self.recheck(id, key, now);
            out.push(self.lease_view(id));
        }
        self.grant_pass(now);
        Ok(out)
    }

    pub fn force_release_lease(
        &mut self,
        now: u64,
        id: LeaseId,
        reason: &str,
    ) -> Result<LeaseView, LockError> {
        let now = self.advance(now);
        if !self.leases.contains_key(&id) {
            return Err(LockError::LeaseNotFound { lease_id: id });
        }
        let view = self.lease_view(id);
        self.remove_lease(
            id,
            now,
            &EventKind::ForceReleased {
                reason: reason.to_owned(),
            },
        );
        self.grant_pass(now);
        Ok(view)
    }

    pub fn cancel(&mut self, now: u64, w: WaiterId) -> bool {
        let now = self.advance(now);
        let found = self.remove_waiter_by_id(w).is_some();
        self.grant_pass(now);
        found
    }

    pub fn undo(&mut self, now: u64, g: &Grant) {
        let now = self.advance(now);
        if g.created_lease {
            self.remove_lease(g.lease.lease_id, now, &EventKind::Released);
        } else {
            for h in &g.granted {
                let _ = self.release_one(now, g.lease.lease_id, &h.key);
            }
        }
        self.grant_pass(now);
    }

    pub fn durable(&self) -> DurableState {
        DurableState {
            fencing_next: self.fencing_next,
            event_seq_next: self.seq_next,
            leases: self
                .leases
                .keys()
                .map(|id| {
                    let v = self.lease_view(*id);
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
                })
                .collect(),
            idempotency: vec![],
            lock_delays: self.delays.iter().map(|(k, v)| (k.clone(), *v)).collect(),
        }
    }

    /// The rules, checked on the model's own state.
    pub fn check_rules(&self) {
        let keys: BTreeSet<&String> = self.leases.values().flat_map(|l| l.locks.keys()).collect();
        for k in keys {
            let kinds: Vec<LockKind> = self.holders(k).iter().map(|(_, h)| h.kind).collect();
            for (i, kind) in kinds.iter().enumerate() {
                let mut others = kinds.clone();
                others.remove(i);
                assert!(
                    fits(&others, *kind),
                    "conflicting holders on {k}: {kinds:?}"
                );
            }
        }
        for l in self.leases.values() {
            assert!(l.expires > self.now, "lease {:?} should have expired", l.id);
            for h in l.locks.values() {
                assert!(h.count >= 1);
                assert!(h.token < self.fencing_next);
            }
        }
        for (i, w) in self.waiters.iter().enumerate() {
            assert!(
                w.deadline > self.now,
                "waiter {:?} should have timed out",
                w.id
            );
            assert!(
                self.first_blocked(w.lease(), &w.locks, i, self.now)
                    .is_some(),
                "waiter {:?} is grantable but waiting",
                w.id
            );
        }
    }
}

pub fn held_view(k: &str, h: &MHeld) -> HeldLockView {
    HeldLockView {
        key: k.to_owned(),
        kind: h.kind,
        fencing_token: h.token,
        count: h.count,
        acquired_at_ms: h.acquired,
        lock_delay_ms: h.delay,
    }
}

// ---------------------------------------------------------------------------------------
// Random operations.
// ---------------------------------------------------------------------------------------

pub const KEYS: [&str; 5] = ["k0", "k1", "k2", "k3", "s0"];
const HOLDERS: [&str; 3] = ["alice", "bob", "carol"];

#[derive(Clone, Debug)]
pub enum Op {
    AcquireNew {
        holder: usize,
        owner: bool,
        locks: Vec<(usize, u8, bool)>,
        wait: u64,
        reentrant: bool,
        ttl: u64,
    },
    AcquireExisting {
        lease: usize,
        locks: Vec<(usize, u8, bool)>,
        wait: u64,
    },
    ReleaseLock {
        lease: usize,
        key: usize,
    },
    ReleaseLease {
        lease: usize,
    },
    Renew {
        lease: usize,
        ttl: Option<u64>,
    },
    ForceLock {
        key: usize,
    },
    ForceLease {
        lease: usize,
    },
    Cancel {
        waiter: usize,
    },
    Undo {
        grant: usize,
    },
    Advance {
        ms: u64,
    },
}

fn locks_strategy() -> impl Strategy<Value = Vec<(usize, u8, bool)>> {
    proptest::collection::vec((0usize..5, 0u8..20, proptest::bool::weighted(0.2)), 1..=3)
}

fn wait_strategy() -> impl Strategy<Value = u64> {
    prop_oneof![1 => Just(0u64), 3 => 100u64..3_000]
}

/// Operations; `incremental_weight` tilts the mix towards incremental acquisition (for the
/// deadlock suite).
pub fn op_strategy(incremental_weight: u32) -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0usize..3, proptest::bool::weighted(0.2), locks_strategy(), wait_strategy(), proptest::bool::weighted(0.8), 1_000u64..5_000)
            .prop_map(|(holder, owner, locks, wait, reentrant, ttl)| Op::AcquireNew { holder, owner, locks, wait, reentrant, ttl }),
        incremental_weight => (0usize..64, locks_strategy(), wait_strategy())
            .prop_map(|(lease, locks, wait)| Op::AcquireExisting { lease, locks, wait }),
        2 => (0usize..64, 0usize..5).prop_map(|(lease, key)| Op::ReleaseLock { lease, key }),
        2 => (0usize..64).prop_map(|lease| Op::ReleaseLease { lease }),
        2 => (0usize..64, proptest::option::of(1_000u64..5_000)).prop_map(|(lease, ttl)| Op::Renew { lease, ttl }),
        1 => (0usize..5).prop_map(|key| Op::ForceLock { key }),
        1 => (0usize..64).prop_map(|lease| Op::ForceLease { lease }),
        1 => (0usize..64).prop_map(|waiter| Op::Cancel { waiter }),
        1 => (0usize..64).prop_map(|grant| Op::Undo { grant }),
        4 => (1u64..2_500).prop_map(|ms| Op::Advance { ms }),
    ]
}

pub fn to_specs(locks: &[(usize, u8, bool)]) -> Vec<LockSpec> {
    let mut seen = BTreeSet::new();
    locks
        .iter()
        .filter(|(k, _, _)| seen.insert(*k))
        .map(|&(k, sel, delay)| {
            let kind = if KEYS[k].starts_with('s') {
                // Mostly limit 3; sometimes 2 (limit mismatch).
                let limit = if sel == 0 { 2 } else { 3 };
                LockKind::Semaphore {
                    limit,
                    permits: 1 + u32::from(sel % 2),
                }
            } else {
                match sel {
                    0..=9 => LockKind::Exclusive,
                    10..=18 => LockKind::Shared,
                    _ => LockKind::Semaphore {
                        limit: 3,
                        permits: 1,
                    },
                }
            };
            LockSpec {
                key: KEYS[k].to_owned(),
                kind,
                lock_delay_ms: if delay { 300 } else { 0 },
            }
        })
        .collect()
}

/// Normalise for comparison: deadlock cycles are compared by their ends only (the engine
/// reports one path, the model only decides that one exists); invalid reasons are free text.
fn norm_err(e: &LockError) -> LockError {
    match e {
        LockError::Deadlock { key, .. } => LockError::Deadlock {
            key: key.clone(),
            cycle: vec![],
        },
        LockError::Invalid { field, .. } => LockError::Invalid {
            field: field.clone(),
            reason: String::new(),
        },
        other => other.clone(),
    }
}

fn norm_notes(notes: &[Notification]) -> Vec<Notification> {
    notes
        .iter()
        .map(|n| Notification {
            waiter: n.waiter,
            outcome: match &n.outcome {
                WaitOutcome::Failed(e) => WaitOutcome::Failed(norm_err(e)),
                o => o.clone(),
            },
        })
        .collect()
}

/// Checks on a reported deadlock cycle: it starts and ends with the requester's holder and
/// names at least one other participant.
fn check_cycle(e: &LockError, holder: &str) {
    if let LockError::Deadlock { cycle, .. } = e {
        assert!(cycle.len() >= 3, "cycle too short: {cycle:?}");
        assert_eq!(cycle.first().map(String::as_str), Some(holder));
        assert_eq!(cycle.last().map(String::as_str), Some(holder));
    }
}

/// Runs operations against engine and model, comparing after every step.
pub struct Harness {
    pub engine: Engine,
    pub model: Model,
    pub now: u64,
    pub next_lease: u128,
    pub leases: Vec<LeaseId>,
    pub waiters: Vec<WaiterId>,
    pub grants: Vec<Grant>,
    /// Waiters that were answered (or cancelled); each exactly once.
    pub answered: BTreeSet<WaiterId>,
    pub deadlocks: u64,
    pub max_token: u64,
    pub seen_tokens: BTreeSet<u64>,
}

impl Harness {
    pub fn new() -> Self {
        Harness {
            engine: Engine::default(),
            model: Model::new(),
            now: 0,
            next_lease: 1,
            leases: vec![],
            waiters: vec![],
            grants: vec![],
            answered: BTreeSet::new(),
            deadlocks: 0,
            max_token: 0,
            seen_tokens: BTreeSet::new(),
        }
    }

    /// One of the 64 most recent leases (older ones are mostly gone in long histories).
    fn pick_lease(&self, i: usize) -> LeaseId {
        let n = self.leases.len();
        if n == 0 {
            LeaseId(999_999)
        } else {
            self.leases[n - 1 - i % n]
        }
    }

    fn note_grant(&mut self, g: &Grant) {
        if g.created_lease {
            self.leases.push(g.lease.lease_id);
        }
        self.grants.push(g.clone());
    }

    fn acquire(&mut self, req: AcquireRequest) {
        let holder = match &req.target {
            LeaseTarget::New(nl) => nl.holder.clone(),
            LeaseTarget::Existing(id) => {
                self.engine.lease(*id).map(|l| l.holder).unwrap_or_default()
            }
        };
        let got = self.engine.acquire(self.now, req.clone());
        let w = match &got {
            Ok(AcquireOutcome::Queued(w)) => Some(*w),
            _ => None,
        };
        let want = self.model.acquire(self.now, &req, w);
        match (&got, &want) {
            (Err(a), Err(b)) => {
                assert_eq!(norm_err(a), norm_err(b), "acquire {req:?}");
                check_cycle(a, &holder);
                if matches!(a, LockError::Deadlock { .. }) {
                    self.deadlocks += 1;
                }
            }
            _ => assert_eq!(got, want, "acquire {req:?}"),
        }
        match got {
            Ok(AcquireOutcome::Granted(g)) => self.note_grant(&g),
            Ok(AcquireOutcome::Queued(w)) => self.waiters.push(w),
            Err(_) => {}
        }
    }

    pub fn apply(&mut self, op: &Op) {
        match op {
            Op::AcquireNew {
                holder,
                owner,
                locks,
                wait,
                reentrant,
                ttl,
            } => {
                let id = LeaseId(self.next_lease);
                self.next_lease += 1;
                let req = AcquireRequest {
                    target: LeaseTarget::New(NewLease {
                        lease_id: id,
                        holder: HOLDERS[*holder].to_owned(),
                        ttl_ms: *ttl,
                        reason: Some(format!("r{}", id.0)),
                        metadata: None,
                        owner: owner.then(|| "token-b".to_owned()),
                    }),
                    locks: to_specs(locks),
                    wait_ms: *wait,
                    reentrant: *reentrant,
                };
                self.acquire(req);
            }
            Op::AcquireExisting { lease, locks, wait } => {
                let req = AcquireRequest {
                    target: LeaseTarget::Existing(self.pick_lease(*lease)),
                    locks: to_specs(locks),
                    wait_ms: *wait,
                    reentrant: true,
                };
                self.acquire(req);
            }
            Op::ReleaseLock { lease, key } => {
                let id = self.pick_lease(*lease);
                let a = self.engine.release_lock(self.now, id, KEYS[*key]);
                let b = self.model.release_lock(self.now, id, KEYS[*key]);
                assert_eq!(a, b, "release_lock");
            }
            Op::ReleaseLease { lease } => {
                let id = self.pick_lease(*lease);
                let a = self.engine.release_lease(self.now, id);
                let b = self.model.release_lease(self.now, id);
                assert_eq!(a, b, "release_lease");
            }
            Op::Renew { lease, ttl } => {
                let id = self.pick_lease(*lease);
                let a = self.engine.renew(self.now, id, *ttl);
                let b = self.model.renew(self.now, id, *ttl);
                assert_eq!(a, b, "renew");
            }
            Op::ForceLock { key } => {
                let a = self
                    .engine
                    .force_release_lock(self.now, KEYS[*key], "admin");
                let b = self.model.force_release_lock(self.now, KEYS[*key], "admin");
                assert_eq!(a, b, "force_release_lock");
            }
            Op::ForceLease { lease } => {
                let id = self.pick_lease(*lease);
                let a = self.engine.force_release_lease(self.now, id, "admin");
                let b = self.model.force_release_lease(self.now, id, "admin");
                assert_eq!(a, b, "force_release_lease");
            }
            Op::Cancel { waiter } => {
                if !self.waiters.is_empty() {
                    let n = self.waiters.len();
                    let w = self.waiters[n - 1 - waiter % n];
                    let a = self.engine.cancel_wait(self.now, w);
                    let b = self.model.cancel(self.now, w);
                    assert_eq!(a, b, "cancel_wait");
                    if a {
                        assert!(self.answered.insert(w), "cancelled an answered waiter");
                    }
                }
            }
            Op::Undo { grant } => {
                if !self.grants.is_empty() {
                    let n = self.grants.len();
                    let g = self.grants.remove(n - 1 - grant % n);
                    self.engine.undo_grant(self.now, &g);
                    self.model.undo(self.now, &g);
                }
            }
            Op::Advance { ms } => {
                self.now += ms;
                self.engine.tick(self.now);
                self.model.advance(self.now);
            }
        }
        self.compare();
    }

    /// Everything observable must agree.
    pub fn compare(&mut self) {
        self.engine
            .check_invariants()
            .unwrap_or_else(|e| panic!("engine invariant: {e}"));
        self.model.check_rules();
        let notes = self.engine.take_notifications();
        let model_notes = std::mem::take(&mut self.model.notes);
        assert_eq!(
            norm_notes(&notes),
            norm_notes(&model_notes),
            "notifications"
        );
        for n in &notes {
            assert!(
                self.answered.insert(n.waiter),
                "waiter {:?} answered twice",
                n.waiter
            );
            match &n.outcome {
                WaitOutcome::Granted(g) => self.note_grant(g),
                WaitOutcome::Failed(e @ LockError::Deadlock { .. }) => {
                    let holder = self
                        .model
                        .events
                        .iter()
                        .rev()
                        .find(|ev| ev.kind == EventKind::Deadlock)
                        .map(|ev| ev.holder.clone())
                        .unwrap_or_default();
                    check_cycle(e, &holder);
                }
                _ => {}
            }
        }
        let events = self.engine.take_events();
        let model_events = std::mem::take(&mut self.model.events);
        assert_eq!(events, model_events, "events");
        // Tokens strictly increasing: every token first seen in a Granted event is above all
        // earlier ones.
        check_tokens(&events, &mut self.max_token, &mut self.seen_tokens);
        assert_eq!(
            self.engine.durable_state(),
            self.model.durable(),
            "durable state"
        );
        for key in KEYS {
            let waiters: Vec<(String, LockKind)> = self
                .engine
                .lock_info(key)
                .map(|i| i.waiters.into_iter().map(|w| (w.holder, w.kind)).collect())
                .unwrap_or_default();
            let model_waiters: Vec<(String, LockKind)> = self
                .model
                .waiters
                .iter()
                .filter_map(|w| {
                    w.locks
                        .iter()
                        .find(|s| s.key == key)
                        .map(|s| (w.holder.clone(), s.kind))
                })
                .collect();
            assert_eq!(waiters, model_waiters, "FIFO queue of {key}");
        }
        let st = self.engine.stats();
        assert_eq!(st.leases, self.model.leases.len() as u64);
        assert_eq!(st.waiters, self.model.waiters.len() as u64);
        let _ = self.engine.take_changes();
    }

    /// Let every wait run out: every waiter must have been answered exactly once.
    pub fn drain(&mut self) {
        self.now += 100_000;
        self.engine.tick(self.now);
        self.model.advance(self.now);
        self.compare();
        assert_eq!(self.engine.stats().waiters, 0);
        for w in &self.waiters {
            assert!(self.answered.contains(w), "waiter {w:?} never answered");
        }
        assert!(self.engine.next_deadline_ms().is_none_or(|t| t > self.now));
    }
}

/// Tokens issued by grants, in event order, must be strictly increasing when new.
pub fn check_tokens(events: &[Event], max_seen: &mut u64, seen: &mut BTreeSet<u64>) {
    for ev in events {
        if ev.kind == EventKind::Granted
            && let Some(t) = ev.fencing_token
            && seen.insert(t)
        {
            assert!(t > *max_seen, "token {t} not above {max_seen}");
            *max_seen = t;
        }
    }
}
