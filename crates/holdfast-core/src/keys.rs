//! Per-key state: who holds the key, who waits for it (FIFO), lock-delay; and the
//! compatibility arithmetic shared by grants, queue scans and deadlock detection.

use std::collections::VecDeque;

use crate::slab::Slot;
use crate::textmap::TextMap;
use crate::types::{LeaseId, LockKind, LockSpec, NewLease, TimeMs, WaiterId};

/// How a key is used while it is in use: the exclusive/shared family, or a semaphore with
/// a fixed limit. Fixed while the key has holders or waiters (`LimitMismatch` otherwise).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Family {
    ReadWrite,
    Semaphore(u32),
}

impl Family {
    pub fn of(kind: LockKind) -> Family {
        match kind {
            LockKind::Exclusive | LockKind::Shared => Family::ReadWrite,
            LockKind::Semaphore { limit, .. } => Family::Semaphore(limit),
        }
    }
}

/// Sum of what a set of grants or requests uses on one key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Usage {
    pub exclusive: u32,
    pub shared: u32,
    pub permits: u64,
}

impl Usage {
    pub fn add(&mut self, kind: LockKind) {
        match kind {
            LockKind::Exclusive => self.exclusive += 1,
            LockKind::Shared => self.shared += 1,
            LockKind::Semaphore { permits, .. } => self.permits += u64::from(permits),
        }
    }

    pub fn sub(&mut self, kind: LockKind) {
        match kind {
            LockKind::Exclusive => self.exclusive -= 1,
            LockKind::Shared => self.shared -= 1,
            LockKind::Semaphore { permits, .. } => self.permits -= u64::from(permits),
        }
    }

    pub fn with(mut self, other: Usage) -> Usage {
        self.exclusive += other.exclusive;
        self.shared += other.shared;
        self.permits += other.permits;
        self
    }

    /// Can `kind` be added on top of this usage?
    pub fn admits(&self, kind: LockKind) -> bool {
        match kind {
            LockKind::Exclusive => self.exclusive == 0 && self.shared == 0 && self.permits == 0,
            LockKind::Shared => self.exclusive == 0,
            LockKind::Semaphore { limit, permits } => {
                self.permits + u64::from(permits) <= u64::from(limit)
            }
        }
    }

    /// True if no request of this family can be added (a queue scan may stop here).
    pub fn full(&self, family: Family) -> bool {
        match family {
            Family::ReadWrite => self.exclusive > 0,
            Family::Semaphore(limit) => self.permits >= u64::from(limit),
        }
    }
}

/// Two single grants/requests conflict (used for the wait-for graph of exclusive/shared keys).
pub(crate) fn conflicts(a: LockKind, b: LockKind) -> bool {
    matches!(
        (a, b),
        (LockKind::Exclusive, LockKind::Exclusive | LockKind::Shared)
            | (LockKind::Shared, LockKind::Exclusive)
    )
}

static EMPTY_QUEUE: VecDeque<WaiterId> = VecDeque::new();

/// `KeyState::one` when the key has not exactly one holder.
const NOT_ONE: Slot = Slot::MAX;

/// The rare parts of a key: several holders, its wait queue, its lock-delay end.
#[derive(Clone, Debug, Default)]
struct KeyRare {
    /// Every holder when there are two or more (else empty), in grant order.
    holders: Vec<Slot>,
    /// Queued lock requests naming this key, in arrival order (ascending id).
    waiters: VecDeque<WaiterId>,
    /// Lock-delay: no new grants before this time.
    delayed_until_ms: Option<TimeMs>,
}

impl KeyRare {
    fn is_empty(&self) -> bool {
        self.holders.is_empty() && self.waiters.is_empty() && self.delayed_until_ms.is_none()
    }
}

/// A key's family and what its holders use together, in 12 bytes (a `Family` and a `Usage`
/// side by side took 24, in every key's state).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct KeyUsage {
    /// 0: the exclusive/shared family; n > 0: a semaphore of limit n (limits are >= 1).
    limit: u32,
    /// Exclusive holders (exclusive/shared family; 0 for a semaphore).
    exclusive: u32,
    /// Shared holders (exclusive/shared family), or permits held (semaphore: at most the
    /// limit, so a `u32` is exact).
    shared_or_permits: u32,
}

impl KeyUsage {
    fn new(family: Family) -> Self {
        KeyUsage {
            limit: match family {
                Family::ReadWrite => 0,
                Family::Semaphore(limit) => {
                    debug_assert!(limit > 0, "semaphore limit 0");
                    limit
                }
            },
            exclusive: 0,
            shared_or_permits: 0,
        }
    }

    fn family(self) -> Family {
        match self.limit {
            0 => Family::ReadWrite,
            limit => Family::Semaphore(limit),
        }
    }

    fn usage(self) -> Usage {
        match self.limit {
            0 => Usage {
                exclusive: self.exclusive,
                shared: self.shared_or_permits,
                permits: 0,
            },
            _ => Usage {
                exclusive: 0,
                shared: 0,
                permits: u64::from(self.shared_or_permits),
            },
        }
    }

    fn add(&mut self, kind: LockKind) {
        match kind {
            LockKind::Exclusive => self.exclusive += 1,
            LockKind::Shared => self.shared_or_permits += 1,
            LockKind::Semaphore { permits, .. } => self.shared_or_permits += permits,
        }
    }

    fn sub(&mut self, kind: LockKind) {
        match kind {
            LockKind::Exclusive => self.exclusive -= 1,
            LockKind::Shared => self.shared_or_permits -= 1,
            LockKind::Semaphore { permits, .. } => self.shared_or_permits -= permits,
        }
    }
}

/// One key in use, in 24 bytes: most keys have one holder, no waiter and no lock-delay, so
/// that holder's slot is inline and everything else sits in one box that is absent when
/// empty (an inline holder list and queue took 40 bytes per key).
#[derive(Clone, Debug)]
pub(crate) struct KeyState {
    /// The family, and what the holders use together: see the accessors.
    usage: KeyUsage,
    /// The holder when there is exactly one, else [`NOT_ONE`].
    one: Slot,
    /// Several holders, waiters, lock-delay; `None` when the key has none of them.
    rare: Option<Box<KeyRare>>,
}

impl KeyState {
    pub fn new(family: Family) -> Self {
        KeyState {
            usage: KeyUsage::new(family),
            one: NOT_ONE,
            rare: None,
        }
    }

    /// Holding leases (their lease-table slots) in grant order (ascending fencing token).
    pub fn holders(&self) -> &[Slot] {
        if self.one != NOT_ONE {
            std::slice::from_ref(&self.one)
        } else {
            self.rare.as_deref().map_or(&[], |r| &r.holders)
        }
    }

    /// Add a holder after the others.
    pub fn add_holder(&mut self, slot: Slot) {
        if self.holders().is_empty() {
            self.one = slot;
            return;
        }
        let rare = self.rare.get_or_insert_with(Box::default);
        if self.one != NOT_ONE {
            rare.holders.push(std::mem::replace(&mut self.one, NOT_ONE));
        }
        rare.holders.push(slot);
    }

    /// Remove a holder; false if it was not one.
    pub fn remove_holder(&mut self, slot: Slot) -> bool {
        if self.one != NOT_ONE {
            let found = self.one == slot;
            if found {
                self.one = NOT_ONE;
            }
            return found;
        }
        let Some(rare) = &mut self.rare else {
            return false;
        };
        let Some(pos) = rare.holders.iter().position(|x| *x == slot) else {
            return false;
        };
        rare.holders.remove(pos);
        if rare.holders.len() == 1 {
            self.one = rare.holders[0];
            rare.holders = Vec::new();
        }
        self.tidy();
        true
    }

    /// Replace the holders (the same set, put in grant order).
    pub fn set_holders(&mut self, slots: Vec<Slot>) {
        self.one = NOT_ONE;
        if let Some(rare) = &mut self.rare {
            rare.holders = Vec::new();
        }
        for slot in slots {
            self.add_holder(slot);
        }
        self.tidy();
    }

    /// Queued lock requests naming this key, in arrival order.
    pub fn waiters(&self) -> std::collections::vec_deque::Iter<'_, WaiterId> {
        self.rare
            .as_deref()
            .map_or(&EMPTY_QUEUE, |r| &r.waiters)
            .iter()
    }

    pub fn waiter_count(&self) -> usize {
        self.rare.as_ref().map_or(0, |r| r.waiters.len())
    }

    /// Append (ids are issued in increasing order, so the queue stays sorted).
    pub fn push_waiter(&mut self, w: WaiterId) {
        self.rare
            .get_or_insert_with(Box::default)
            .waiters
            .push_back(w);
    }

    pub fn has_waiter(&self, w: WaiterId) -> bool {
        self.rare
            .as_ref()
            .is_some_and(|r| r.waiters.binary_search(&w).is_ok())
    }

    pub fn remove_waiter(&mut self, w: WaiterId) {
        if let Some(r) = &mut self.rare
            && let Ok(i) = r.waiters.binary_search(&w)
        {
            r.waiters.remove(i);
        }
        self.tidy();
    }

    /// The representation's own rules: one holder is inline, several are all in the box,
    /// and an empty box is not kept.
    pub fn check_layout(&self) -> Result<(), String> {
        if let Some(r) = &self.rare {
            if r.is_empty() {
                return Err("an empty box of rare parts is kept".to_owned());
            }
            if r.holders.len() == 1 {
                return Err("a single holder is in the box".to_owned());
            }
            if self.one != NOT_ONE && !r.holders.is_empty() {
                return Err("holders both inline and in the box".to_owned());
            }
        }
        Ok(())
    }

    /// Drop the box of rare parts once it holds nothing.
    fn tidy(&mut self) {
        if self.rare.as_ref().is_some_and(|r| r.is_empty()) {
            self.rare = None;
        }
    }

    /// How the key is used while it is in use (fixed while it has holders or waiters).
    pub fn family(&self) -> Family {
        self.usage.family()
    }

    /// Change the family of a key that is not in use (its holders use nothing).
    pub fn set_family(&mut self, family: Family) {
        debug_assert_eq!(
            self.held(),
            Usage::default(),
            "family changed under holders"
        );
        self.usage = KeyUsage::new(family);
    }

    /// What the holders use together.
    pub fn held(&self) -> Usage {
        self.usage.usage()
    }

    /// A holder of `kind` was added.
    pub fn held_add(&mut self, kind: LockKind) {
        self.usage.add(kind);
    }

    /// A holder of `kind` left.
    pub fn held_sub(&mut self, kind: LockKind) {
        self.usage.sub(kind);
    }

    /// Lock-delay: no new grants before this time.
    pub fn delayed_until_ms(&self) -> Option<TimeMs> {
        self.rare.as_ref().and_then(|r| r.delayed_until_ms)
    }

    pub fn set_delayed_until_ms(&mut self, until: Option<TimeMs>) {
        match until {
            Some(_) => self.rare.get_or_insert_with(Box::default).delayed_until_ms = until,
            None => {
                if let Some(r) = &mut self.rare {
                    r.delayed_until_ms = None;
                }
                self.tidy();
            }
        }
    }

    /// Held or queued: the family is fixed.
    pub fn in_use(&self) -> bool {
        !self.holders().is_empty() || self.waiter_count() > 0
    }

    pub fn is_empty(&self) -> bool {
        !self.in_use() && self.delayed_until_ms().is_none()
    }

    /// In lock-delay: no new grants. A delay lasts until its timer fires (timers due at
    /// one instant fire one by one, each followed by the grants it enables).
    pub fn delayed(&self) -> bool {
        self.delayed_until_ms().is_some()
    }
}

/// Which lease a queued lock request is for.
#[derive(Clone, Debug)]
pub(crate) enum WaitTarget {
    /// Creates this lease when granted.
    New(NewLease),
    /// Adds to this lease (incremental acquisition or reentrant join).
    Lease(LeaseId),
}

/// A queued lock request.
#[derive(Clone, Debug)]
pub(crate) struct LockWaiter {
    pub target: WaitTarget,
    /// Reentrant join: refresh the lease's TTL (and reason, if given) on grant.
    pub join: Option<(u64, Option<String>)>,
    pub holder: Box<str>,
    pub locks: Vec<LockSpec>,
    pub since_ms: TimeMs,
    pub deadline_ms: TimeMs,
}

impl LockWaiter {
    pub fn target_lease(&self) -> Option<LeaseId> {
        match self.target {
            WaitTarget::New(_) => None,
            WaitTarget::Lease(id) => Some(id),
        }
    }
}

#[cfg(target_pointer_width = "64")]
const _: () = assert!(std::mem::size_of::<KeyState>() == 24);

/// The keys in use, by their text (shared with the leases holding them and with events).
pub(crate) type KeyTable = TextMap<KeyState>;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    proptest! {
        /// Random adds and removes agree with a plain map (each key's state is told apart by
        /// its semaphore limit), and the table stays consistent.
        #[test]
        fn key_table_matches_a_map(ops in proptest::collection::vec((any::<bool>(), 0u32..30, 1u32..5), 0..300)) {
            let mut t = KeyTable::default();
            let mut model: HashMap<String, u32> = HashMap::new();
            for (add, k, limit) in ops {
                let key = format!("k/{k}");
                if add {
                    let (_, ks, added) = t.get_or_insert_with(&key, || {
                        (key.as_str().into(), KeyState::new(Family::Semaphore(limit)))
                    });
                    prop_assert_eq!(added, !model.contains_key(&key));
                    let expected = *model.entry(key.clone()).or_insert(limit);
                    prop_assert_eq!(ks.family(), Family::Semaphore(expected));
                } else {
                    let got = t.remove(&key).map(|ks| ks.family());
                    prop_assert_eq!(got, model.remove(&key).map(Family::Semaphore));
                }
                t.check(KeyState::check_layout).map_err(TestCaseError::fail)?;
                prop_assert_eq!(t.iter().count(), model.len());
                for (key, limit) in &model {
                    let (text, ks) = t.slot_of(key).and_then(|s| t.at(s)).unwrap();
                    prop_assert_eq!(&**text, key.as_str());
                    prop_assert_eq!(ks.family(), Family::Semaphore(*limit));
                }
            }
        }
    }
}
