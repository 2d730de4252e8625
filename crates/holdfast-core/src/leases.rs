//! Leases and the locks they hold.
//!
//! A lease owns its held locks (the per-grant facts: kind, fencing token, count, times); the key
//! table only lists which leases hold a key. Strings are boxed (`Box<str>`, 16 bytes) to keep a
//! held lock small.

use std::sync::Arc;

use crate::idhash::IdMap;
use crate::types::{HeldLockView, LeaseId, LeaseRecord, LeaseView, LockKind, TimeMs, WaiterId};

/// One lock held by a lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct HeldLock {
    pub key: Arc<str>,
    pub kind: LockKind,
    pub fencing_token: u64,
    pub count: u32,
    pub acquired_at_ms: TimeMs,
    pub lock_delay_ms: u64,
}

impl HeldLock {
    pub fn view(&self) -> HeldLockView {
        HeldLockView {
            key: self.key.to_string(),
            kind: self.kind,
            fencing_token: self.fencing_token,
            count: self.count,
            acquired_at_ms: self.acquired_at_ms,
            lock_delay_ms: self.lock_delay_ms,
        }
    }

    pub fn from_record(v: HeldLockView) -> Self {
        HeldLock {
            key: v.key.into(),
            kind: v.kind,
            fencing_token: v.fencing_token,
            count: v.count,
            acquired_at_ms: v.acquired_at_ms,
            lock_delay_ms: v.lock_delay_ms,
        }
    }
}

/// A live lease.
#[derive(Clone, Debug)]
pub(crate) struct Lease {
    /// The id as two halves: a `u128` field would align the whole lease to 16 bytes.
    id_hi: u64,
    id_lo: u64,
    /// Interned: the leases of one holder share the text (`Engine::intern_holder`).
    pub holder: Arc<str>,
    pub ttl_ms: u64,
    pub expires_at_ms: TimeMs,
    pub created_at_ms: TimeMs,
    /// Held locks, sorted by key (binary search; listings need key order anyway).
    pub locks: Vec<HeldLock>,
    /// The lease's one queued lock request (incremental or reentrant join), if any;
    /// 0 = none (waiter ids start at 1; 8 bytes instead of 16 for an `Option`).
    pending_raw: u64,
    /// Rarely set fields, boxed so a plain lease stays small.
    pub extra: Option<Box<LeaseExtra>>,
}

/// The optional parts of a lease.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct LeaseExtra {
    pub reason: Option<Box<str>>,
    pub metadata: Option<Box<str>>,
    pub owner: Option<Box<str>>,
    /// The idempotency record this lease is executing, if any.
    pub executing: Option<Box<str>>,
}

impl LeaseExtra {
    /// `None` if every field is empty.
    pub fn boxed(self) -> Option<Box<LeaseExtra>> {
        (self != LeaseExtra::default()).then(|| Box::new(self))
    }
}

impl Lease {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: LeaseId,
        holder: Arc<str>,
        ttl_ms: u64,
        expires_at_ms: TimeMs,
        created_at_ms: TimeMs,
        locks: Vec<HeldLock>,
        extra: Option<Box<LeaseExtra>>,
    ) -> Self {
        let (id_hi, id_lo) = split_id(id);
        Lease {
            id_hi,
            id_lo,
            holder,
            ttl_ms,
            expires_at_ms,
            created_at_ms,
            locks,
            pending_raw: 0,
            extra,
        }
    }

    pub fn id(&self) -> LeaseId {
        LeaseId((u128::from(self.id_hi) << 64) | u128::from(self.id_lo))
    }

    pub fn pending(&self) -> Option<WaiterId> {
        (self.pending_raw != 0).then_some(WaiterId(self.pending_raw))
    }

    pub fn set_pending(&mut self, w: Option<WaiterId>) {
        self.pending_raw = w.map_or(0, |w| w.0);
    }

    pub fn reason(&self) -> Option<&str> {
        self.extra.as_ref().and_then(|x| x.reason.as_deref())
    }

    pub fn metadata(&self) -> Option<&str> {
        self.extra.as_ref().and_then(|x| x.metadata.as_deref())
    }

    pub fn owner(&self) -> Option<&str> {
        self.extra.as_ref().and_then(|x| x.owner.as_deref())
    }

    pub fn executing(&self) -> Option<&str> {
        self.extra.as_ref().and_then(|x| x.executing.as_deref())
    }

    fn update_extra(&mut self, f: impl FnOnce(&mut LeaseExtra)) {
        let mut x = self.extra.take().map(|b| *b).unwrap_or_default();
        f(&mut x);
        self.extra = x.boxed();
    }

    pub fn set_reason(&mut self, reason: Option<Box<str>>) {
        self.update_extra(|x| x.reason = reason);
    }

    pub fn set_executing(&mut self, key: Option<Box<str>>) {
        self.update_extra(|x| x.executing = key);
    }

    pub fn lock(&self, key: &str) -> Option<&HeldLock> {
        self.locks
            .binary_search_by(|l| (*l.key).cmp(key))
            .ok()
            .map(|i| &self.locks[i])
    }

    pub fn lock_index(&self, key: &str) -> Result<usize, usize> {
        self.locks.binary_search_by(|l| (*l.key).cmp(key))
    }

    pub fn view(&self) -> LeaseView {
        LeaseView {
            lease_id: self.id(),
            holder: self.holder.to_string(),
            ttl_ms: self.ttl_ms,
            expires_at_ms: self.expires_at_ms,
            created_at_ms: self.created_at_ms,
            reason: self.reason().map(str::to_owned),
            metadata: self.metadata().map(str::to_owned),
            owner: self.owner().map(str::to_owned),
            locks: self.locks.iter().map(HeldLock::view).collect(),
        }
    }

    pub fn record(&self) -> LeaseRecord {
        let v = self.view();
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
    }
}

/// A lease id's high and low halves.
pub(crate) fn split_id(id: LeaseId) -> (u64, u64) {
    // Truncation intended: the two halves of the id.
    #[allow(clippy::cast_possible_truncation)]
    ((id.0 >> 64) as u64, id.0 as u64)
}

/// A lease id as the key of the slot index: two `u64`s, so an index entry is 24 bytes
/// (a `u128` key would pad it to 32).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct IdKey(u64, u64);

impl From<LeaseId> for IdKey {
    fn from(id: LeaseId) -> Self {
        let (hi, lo) = split_id(id);
        IdKey(hi, lo)
    }
}

/// Where a live lease sits in the [`LeaseTable`]. Valid while that lease lives; the slot is
/// reused by a later lease once it is removed, so an index holding a slot (key holders) must
/// drop it when the lease loses the key.
pub(crate) type Slot = u32;

/// The live leases: a slab of leases addressed by [`Slot`] plus an index from lease id to
/// slot. Other structures (key holders) refer to a lease by its 4-byte slot instead of its
/// 16-byte id, and a lease lives in a dense vector instead of a hash table bucket (a hash
/// table's load factor multiplies the size of every entry).
#[derive(Clone, Debug, Default)]
pub(crate) struct LeaseTable {
    slots: Vec<Option<Lease>>,
    /// Empty slots, reused last-freed first.
    free: Vec<Slot>,
    index: IdMap<IdKey, Slot>,
}

impl LeaseTable {
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Reserve room for `additional` more leases (a hint: fails quietly).
    pub fn try_reserve(&mut self, additional: usize) {
        let _ = self.index.try_reserve(additional);
        let _ = self.slots.try_reserve(additional);
    }

    pub fn slot_of(&self, id: LeaseId) -> Option<Slot> {
        self.index.get(&IdKey::from(id)).copied()
    }

    pub fn contains_key(&self, id: &LeaseId) -> bool {
        self.index.contains_key(&IdKey::from(*id))
    }

    pub fn get(&self, id: &LeaseId) -> Option<&Lease> {
        self.at(self.slot_of(*id)?)
    }

    pub fn get_mut(&mut self, id: &LeaseId) -> Option<&mut Lease> {
        let slot = self.slot_of(*id)?;
        self.at_mut(slot)
    }

    /// The lease in `slot`, if the slot is in use.
    pub fn at(&self, slot: Slot) -> Option<&Lease> {
        self.slots.get(slot as usize)?.as_ref()
    }

    pub fn at_mut(&mut self, slot: Slot) -> Option<&mut Lease> {
        self.slots.get_mut(slot as usize)?.as_mut()
    }

    /// Add a lease whose id is not in the table (the caller checked); returns its slot.
    pub fn insert(&mut self, lease: Lease) -> Slot {
        let key = IdKey::from(lease.id());
        debug_assert!(!self.index.contains_key(&key), "lease inserted twice");
        let slot = match self.free.pop() {
            Some(slot) => {
                self.slots[slot as usize] = Some(lease);
                slot
            }
            None => {
                // More than 4 billion live leases cannot fit in memory long before this.
                #[allow(clippy::cast_possible_truncation)]
                let slot = self.slots.len() as Slot;
                self.slots.push(Some(lease));
                slot
            }
        };
        self.index.insert(key, slot);
        slot
    }

    /// Remove a lease; returns the slot it had (now free) and the lease.
    pub fn remove(&mut self, id: &LeaseId) -> Option<(Slot, Lease)> {
        let slot = self.index.remove(&IdKey::from(*id))?;
        let lease = self.slots.get_mut(slot as usize)?.take()?;
        self.free.push(slot);
        Some((slot, lease))
    }

    /// Live leases with their slots, in slot order (not a meaningful order).
    pub fn iter(&self) -> impl Iterator<Item = (Slot, &Lease)> {
        self.slots.iter().enumerate().filter_map(|(i, l)| {
            // Slots are numbered by `u32` (see `insert`).
            #[allow(clippy::cast_possible_truncation)]
            l.as_ref().map(|l| (i as Slot, l))
        })
    }

    /// The table's own consistency: every used slot is indexed under its lease's id, every
    /// index entry points to a used slot, and the free list holds exactly the empty slots.
    pub fn check(&self) -> Result<(), String> {
        let mut used = 0usize;
        for (slot, lease) in self.iter() {
            used += 1;
            let id = lease.id();
            if self.slot_of(id) != Some(slot) {
                return Err(format!("lease {id} in slot {slot} is not indexed there"));
            }
        }
        if used != self.index.len() {
            return Err(format!(
                "{used} used slots but {} indexed leases",
                self.index.len()
            ));
        }
        let mut free = self.free.clone();
        free.sort_unstable();
        free.dedup();
        if free.len() != self.free.len() {
            return Err("a slot is twice in the free list".to_owned());
        }
        if free.len() + used != self.slots.len() {
            return Err(format!(
                "{} free + {used} used slots != {} slots",
                free.len(),
                self.slots.len()
            ));
        }
        if let Some(s) = free.iter().find(|s| self.at(**s).is_some()) {
            return Err(format!("slot {s} is in the free list but in use"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn lease(id: u128) -> Lease {
        Lease::new(LeaseId(id), "h".into(), 1, 2, 0, Vec::new(), None)
    }

    #[test]
    fn freed_slots_are_reused_and_lookups_follow() {
        let mut t = LeaseTable::default();
        let a = t.insert(lease(1));
        let b = t.insert(lease(2 << 64));
        let c = t.insert(lease(3));
        assert_eq!((a, b, c), (0, 1, 2));
        let (freed, l) = t.remove(&LeaseId(2 << 64)).unwrap();
        assert_eq!((freed, l.id()), (b, LeaseId(2 << 64)));
        assert!(t.at(b).is_none());
        assert!(t.get(&LeaseId(2 << 64)).is_none());
        assert_eq!(t.insert(lease(4)), b, "the freed slot is reused");
        assert_eq!(t.get(&LeaseId(4)).map(Lease::id), Some(LeaseId(4)));
        assert_eq!(t.at(b).map(Lease::id), Some(LeaseId(4)));
        assert_eq!(t.slot_of(LeaseId(3)), Some(c));
        assert_eq!(t.len(), 3);
        t.check().unwrap();
    }

    proptest! {
        /// Random inserts and removes agree with a plain map, and the table stays consistent.
        #[test]
        fn table_matches_a_map(ops in proptest::collection::vec((any::<bool>(), 0u128..40), 0..300)) {
            let mut t = LeaseTable::default();
            let mut model: HashMap<u128, Slot> = HashMap::new();
            for (insert, raw) in ops {
                // Spread ids over both halves.
                let id = raw.wrapping_mul(0x9E37_79B9_7F4A_7C15_0000_0000_0000_0001) ^ raw;
                if insert && !model.contains_key(&id) {
                    let slot = t.insert(lease(id));
                    prop_assert!(!model.values().any(|s| *s == slot), "slot {} handed out twice", slot);
                    model.insert(id, slot);
                } else if !insert {
                    let got = t.remove(&LeaseId(id)).map(|(s, l)| (s, l.id()));
                    prop_assert_eq!(got, model.remove(&id).map(|s| (s, LeaseId(id))));
                }
                t.check().map_err(TestCaseError::fail)?;
                prop_assert_eq!(t.len(), model.len());
                for (id, slot) in &model {
                    prop_assert_eq!(t.slot_of(LeaseId(*id)), Some(*slot));
                    prop_assert_eq!(t.at(*slot).map(Lease::id), Some(LeaseId(*id)));
                }
            }
        }
    }
}
