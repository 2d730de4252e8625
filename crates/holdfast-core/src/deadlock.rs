//! Deadlock detection on the wait-for graph.
//!
//! Nodes are leases and queued lock requests. Edges:
//! - a lease waits for its one queued request (a lease has at most one, see
//!   [`crate::Engine::acquire`]), because its holder will not release while it waits;
//! - a queued request waits, on every key where it is not grantable, for each holder lease
//!   whose grant conflicts with it (its own lease excluded: an upgrade waits for the others
//!   only) and for each request queued before it that conflicts (FIFO grants that one
//!   first). On a semaphore key, conflicts are not pairwise: if the request does not fit, it
//!   waits for every other holder and every earlier request on the key.
//!
//! Queue-order edges always point to earlier arrivals, so every cycle passes through a lease.
//! A new request of lease `A` closes a cycle exactly when a path leads from the request back
//! to `A`; that is checked before the request is queued. Grants only turn edges to a request
//! into edges to its lease, whose pending request is then gone, so a grant never closes a
//! cycle; releases, expiries and timeouts only remove edges. The one other way a queued
//! request gains edges is its lease losing a key the request counted on (the lease's own
//! release, or an admin's force release): the request then needs that key afresh, so it is
//! re-checked at that moment for any cycle through itself (requests queued after it may now
//! point at it). Checking at these two moments therefore finds every cycle.

use std::collections::{HashMap, HashSet};
use std::hash::Hash;

use crate::engine::{Engine, demand};
use crate::keys::{Family, Usage, conflicts};
use crate::leases::Lease;
use crate::types::{LeaseId, LockSpec, WaiterId};

/// A node of the wait-for graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Node {
    Lease(LeaseId),
    Waiter(WaiterId),
}

/// Depth-first search for a path from any of `starts` to `target`. Returns the path
/// (first element one of `starts`, last element `target`), or `None`.
pub(crate) fn find_path<N, F>(starts: &[N], target: N, mut successors: F) -> Option<Vec<N>>
where
    N: Copy + Eq + Hash,
    F: FnMut(N) -> Vec<N>,
{
    let mut parent: HashMap<N, Option<N>> = HashMap::new();
    let mut stack: Vec<N> = Vec::new();
    for &s in starts.iter().rev() {
        if let std::collections::hash_map::Entry::Vacant(e) = parent.entry(s) {
            e.insert(None);
            stack.push(s);
        }
    }
    let mut expanded: HashSet<N> = HashSet::new();
    while let Some(n) = stack.pop() {
        if n == target {
            let mut path = vec![n];
            let mut cur = n;
            while let Some(Some(p)) = parent.get(&cur) {
                path.push(*p);
                cur = *p;
            }
            path.reverse();
            return Some(path);
        }
        if !expanded.insert(n) {
            continue;
        }
        for s in successors(n).into_iter().rev() {
            if let std::collections::hash_map::Entry::Vacant(e) = parent.entry(s) {
                e.insert(Some(n));
                stack.push(s);
            }
        }
    }
    None
}

impl Engine {
    /// Whom a request (of lease `own`, for `locks`) waits for, counting as "ahead of it" the
    /// queued requests with an id below `before` (`None`: the whole queue, for a request
    /// about to be queued).
    pub(crate) fn request_blockers(
        &self,
        own: Option<LeaseId>,
        locks: &[LockSpec],
        before: Option<WaiterId>,
    ) -> Vec<Node> {
        let own_lease = own.and_then(|id| self.leases.get(&id));
        let mut out = Vec::new();
        for spec in locks {
            let Some(ks) = self.keys.get(spec.key.as_str()) else {
                continue;
            };
            let held_own = own_lease.and_then(|l| l.lock(&spec.key));
            let Some(d) = demand(held_own, spec.kind) else {
                continue;
            };
            let ahead: Vec<(WaiterId, crate::types::LockKind)> = ks
                .waiters()
                .take_while(|w| before.is_none_or(|b| **w < b))
                .filter_map(|w| {
                    let waiter = self.waiters.get(w)?;
                    self.waiter_demand(waiter, &spec.key).map(|k| (*w, k))
                })
                .collect();
            let others = ks.holders().iter().filter_map(|h| {
                let lease = self.leases.at(*h)?;
                let id = lease.id();
                if Some(id) == own {
                    return None;
                }
                Some((id, lease.lock(&spec.key)?.kind()))
            });
            match ks.family() {
                Family::ReadWrite => {
                    for (h, kind) in others {
                        if conflicts(d, kind) {
                            out.push(Node::Lease(h));
                        }
                    }
                    for (w, kind) in ahead {
                        if conflicts(d, kind) {
                            out.push(Node::Waiter(w));
                        }
                    }
                }
                Family::Semaphore(_) => {
                    let mut usage = Usage::default();
                    let others: Vec<_> = others.collect();
                    for (_, k) in &others {
                        usage.add(*k);
                    }
                    for (_, k) in &ahead {
                        usage.add(*k);
                    }
                    if !usage.admits(d) {
                        out.extend(others.iter().map(|(h, _)| Node::Lease(*h)));
                        out.extend(ahead.iter().map(|(w, _)| Node::Waiter(*w)));
                    }
                }
            }
        }
        out
    }

    /// The successors of a node in the wait-for graph.
    pub(crate) fn wait_for_successors(&self, node: Node) -> Vec<Node> {
        match node {
            Node::Lease(id) => self
                .leases
                .get(&id)
                .and_then(Lease::pending)
                .map(Node::Waiter)
                .into_iter()
                .collect(),
            Node::Waiter(w) => match self.waiters.get(&w) {
                Some(waiter) => {
                    self.request_blockers(waiter.target_lease(), &waiter.locks, Some(w))
                }
                None => Vec::new(),
            },
        }
    }

    /// If lease `requester` queueing a request for `locks` would close a cycle, the cycle as
    /// holder names, starting and ending with the requester's holder.
    pub(crate) fn find_deadlock(
        &self,
        requester: LeaseId,
        locks: &[LockSpec],
    ) -> Option<Vec<String>> {
        let starts = self.request_blockers(Some(requester), locks, None);
        self.cycle_back_to(requester, &starts, Node::Lease(requester))
    }

    /// A path from `starts` back to `target` (lease `requester` or its queued request), as
    /// holder names (requester first and last).
    pub(crate) fn cycle_back_to(
        &self,
        requester: LeaseId,
        starts: &[Node],
        target: Node,
    ) -> Option<Vec<String>> {
        let path = find_path(starts, target, |n| self.wait_for_successors(n))?;
        let name_of_lease = |id: LeaseId| {
            self.leases
                .get(&id)
                .map_or_else(|| id.to_string(), |l| self.holder_of(l).to_string())
        };
        let mut cycle = vec![name_of_lease(requester)];
        let mut prev: Option<Node> = None;
        for n in path {
            match n {
                Node::Lease(id) => cycle.push(name_of_lease(id)),
                Node::Waiter(w) => {
                    if let Some(waiter) = self.waiters.get(&w) {
                        let follows_own_lease = matches!(
                            (prev, waiter.target_lease()),
                            (Some(Node::Lease(p)), Some(t)) if p == t
                        );
                        if !follows_own_lease {
                            cycle.push(waiter.holder.to_string());
                        }
                    }
                }
            }
            prev = Some(n);
        }
        Some(cycle)
    }

    /// Lease `id` lost `key` while its queued request names it (a release of its own, or an
    /// admin's force release): the request now needs the key afresh, which adds edges and
    /// may close a cycle. If it does, the request fails with `Deadlock` now rather than
    /// waiting for its timeout.
    pub(crate) fn recheck_pending(&mut self, id: LeaseId, key: &str, t: crate::types::TimeMs) {
        let Some(w) = self.leases.get(&id).and_then(Lease::pending) else {
            return;
        };
        let Some(waiter) = self.waiters.get(&w) else {
            return;
        };
        let Some(spec) = waiter.locks.iter().find(|s| s.key == key) else {
            return;
        };
        let kind = spec.kind;
        // Unlike a new request, a queued one also has requests queued after it pointing at
        // it, so look for any cycle through the request itself, not only through its lease.
        let starts = self.wait_for_successors(Node::Waiter(w));
        let Some(cycle) = self.cycle_back_to(id, &starts, Node::Waiter(w)) else {
            return;
        };
        let holder = waiter.holder.to_string();
        self.remove_waiter(w);
        self.counters.deadlocks += 1;
        self.emit(
            t,
            crate::types::EventKind::Deadlock,
            Some(key.into()),
            holder.into(),
            Some(kind),
            None,
            None,
            None,
        );
        self.notify(
            w,
            crate::types::WaitOutcome::Failed(crate::error::LockError::Deadlock {
                key: key.to_owned(),
                cycle,
            }),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::find_path;
    use proptest::prelude::*;

    /// Brute force: transitive closure by Floyd–Warshall.
    fn reachable(n: usize, edges: &[(usize, usize)]) -> Vec<Vec<bool>> {
        let mut r = vec![vec![false; n]; n];
        for &(a, b) in edges {
            r[a][b] = true;
        }
        for k in 0..n {
            for i in 0..n {
                for j in 0..n {
                    if r[i][k] && r[k][j] {
                        r[i][j] = true;
                    }
                }
            }
        }
        r
    }

    #[allow(clippy::needless_range_loop)]
    mod prop {
        use super::*;
        proptest! {
            #![proptest_config(ProptestConfig::with_cases(300))]
            /// On random digraphs, "is there a cycle through `v`" by DFS agrees with the
            /// brute-force closure, and every reported path is a real cycle.
            #[test]
            fn dfs_matches_brute_force(n in 1usize..9, raw in proptest::collection::vec((0usize..9, 0usize..9), 0..30)) {
                let edges: Vec<(usize, usize)> = raw.into_iter().map(|(a, b)| (a % n, b % n)).collect();
                let succ = |v: usize| -> Vec<usize> {
                    edges.iter().filter(|(a, _)| *a == v).map(|(_, b)| *b).collect()
                };
                let closure = reachable(n, &edges);
                for v in 0..n {
                    let starts = succ(v);
                    let found = find_path(&starts, v, succ);
                    prop_assert_eq!(found.is_some(), closure[v][v], "vertex {}", v);
                    if let Some(path) = found {
                        prop_assert_eq!(*path.last().unwrap(), v);
                        prop_assert!(edges.contains(&(v, path[0])));
                        for w in path.windows(2) {
                            prop_assert!(edges.contains(&(w[0], w[1])));
                        }
                    }
                }
            }
        }
    }
}
