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

/// A lease's held locks, sorted by key. Most leases hold one lock: it is kept inline, where a
/// vector would add a heap block (a 64-byte allocation per lease) beside its 24 bytes.
#[derive(Clone, Debug, Default)]
pub(crate) enum HeldLocks {
    #[default]
    None,
    One(HeldLock),
    /// Two or more.
    Many(Vec<HeldLock>),
}

impl HeldLocks {
    pub fn from_vec(mut v: Vec<HeldLock>) -> Self {
        match v.len() {
            0 => HeldLocks::None,
            1 => v.pop().map_or(HeldLocks::None, HeldLocks::One),
            _ => HeldLocks::Many(v),
        }
    }

    /// Insert at `i` (as `Vec::insert`).
    pub fn insert(&mut self, i: usize, h: HeldLock) {
        *self = match std::mem::take(self) {
            HeldLocks::None => HeldLocks::One(h),
            HeldLocks::One(a) => {
                let mut v = Vec::with_capacity(2);
                v.push(a);
                v.insert(i, h);
                HeldLocks::Many(v)
            }
            HeldLocks::Many(mut v) => {
                v.insert(i, h);
                HeldLocks::Many(v)
            }
        };
    }

    /// Remove the lock at `i` (as `Vec::remove`: `i` must be in range).
    pub fn remove(&mut self, i: usize) -> HeldLock {
        match std::mem::take(self) {
            HeldLocks::None => panic!("HeldLocks::remove({i}) on no locks"),
            HeldLocks::One(a) => {
                assert!(i == 0, "HeldLocks::remove({i}) on one lock");
                a
            }
            HeldLocks::Many(mut v) => {
                let h = v.remove(i);
                *self = HeldLocks::from_vec(v);
                h
            }
        }
    }
}

impl std::ops::Deref for HeldLocks {
    type Target = [HeldLock];
    fn deref(&self) -> &[HeldLock] {
        match self {
            HeldLocks::None => &[],
            HeldLocks::One(h) => std::slice::from_ref(h),
            HeldLocks::Many(v) => v,
        }
    }
}

impl std::ops::DerefMut for HeldLocks {
    fn deref_mut(&mut self) -> &mut [HeldLock] {
        match self {
            HeldLocks::None => &mut [],
            HeldLocks::One(h) => std::slice::from_mut(h),
            HeldLocks::Many(v) => v,
        }
    }
}

impl<'a> IntoIterator for &'a HeldLocks {
    type Item = &'a HeldLock;
    type IntoIter = std::slice::Iter<'a, HeldLock>;
    fn into_iter(self) -> Self::IntoIter {
        self.iter()
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
    pub locks: HeldLocks,
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
        locks: HeldLocks,
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

/// Leases per slab chunk (128 KiB chunks at 128 bytes per lease).
const CHUNK_SLOTS: usize = 1024;

/// The chunk and the place in it of a slot.
fn chunk_of(slot: Slot) -> (usize, usize) {
    let slot = slot as usize;
    (slot / CHUNK_SLOTS, slot % CHUNK_SLOTS)
}

/// Where a live lease sits in the [`LeaseTable`]. Valid while that lease lives; the slot is
/// reused by a later lease once it is removed, so an index holding a slot (key holders) must
/// drop it when the lease loses the key.
pub(crate) type Slot = u32;

/// The live leases: a slab of leases addressed by [`Slot`] plus an index from lease id to
/// slot. Other structures (key holders) refer to a lease by its 4-byte slot instead of its
/// 16-byte id, and a lease lives in a dense vector instead of a hash table bucket (a hash
/// table's load factor multiplies the size of every entry).
///
/// The slab is a list of fixed-size chunks rather than one vector: a vector doubles by
/// copying into a new block, and the old blocks stay in the process's heap (each as large as
/// all leases before it), which showed as ~20 % more resident memory per lease. A chunk is
/// allocated once at its full capacity and never moves.
#[derive(Clone, Debug, Default)]
pub(crate) struct LeaseTable {
    chunks: Vec<Vec<Option<Lease>>>,
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
        let _ = self.chunks.try_reserve(additional / CHUNK_SLOTS + 1);
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
        let (c, i) = chunk_of(slot);
        self.chunks.get(c)?.get(i)?.as_ref()
    }

    pub fn at_mut(&mut self, slot: Slot) -> Option<&mut Lease> {
        let (c, i) = chunk_of(slot);
        self.chunks.get_mut(c)?.get_mut(i)?.as_mut()
    }

    /// Add a lease whose id is not in the table (the caller checked); returns its slot.
    pub fn insert(&mut self, lease: Lease) -> Slot {
        let key = IdKey::from(lease.id());
        debug_assert!(!self.index.contains_key(&key), "lease inserted twice");
        let slot = match self.free.pop() {
            Some(slot) => {
                let (c, i) = chunk_of(slot);
                self.chunks[c][i] = Some(lease);
                slot
            }
            None => {
                if self.chunks.last().is_none_or(|c| c.len() == CHUNK_SLOTS) {
                    self.chunks.push(Vec::with_capacity(CHUNK_SLOTS));
                }
                let c = self.chunks.len() - 1;
                let chunk = &mut self.chunks[c];
                chunk.push(Some(lease));
                // More than 4 billion live leases cannot fit in memory long before this.
                #[allow(clippy::cast_possible_truncation)]
                let slot = (c * CHUNK_SLOTS + chunk.len() - 1) as Slot;
                slot
            }
        };
        self.index.insert(key, slot);
        slot
    }

    /// Remove a lease; returns the slot it had (now free) and the lease.
    pub fn remove(&mut self, id: &LeaseId) -> Option<(Slot, Lease)> {
        let slot = self.index.remove(&IdKey::from(*id))?;
        let (c, i) = chunk_of(slot);
        let lease = self.chunks.get_mut(c)?.get_mut(i)?.take()?;
        self.free.push(slot);
        Some((slot, lease))
    }

    /// Live leases with their slots, in slot order (not a meaningful order).
    pub fn iter(&self) -> impl Iterator<Item = (Slot, &Lease)> {
        self.chunks
            .iter()
            .flatten()
            .enumerate()
            .filter_map(|(i, l)| {
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
        let slots: usize = self.chunks.iter().map(Vec::len).sum();
        if free.len() + used != slots {
            return Err(format!(
                "{} free + {used} used slots != {slots} slots",
                free.len()
            ));
        }
        if let Some((c, _)) = self.chunks.iter().enumerate().find(|(c, chunk)| {
            chunk.capacity() != CHUNK_SLOTS
                || (*c + 1 < self.chunks.len() && chunk.len() != CHUNK_SLOTS)
        }) {
            return Err(format!("lease chunk {c} is not full-sized or not full"));
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
        Lease::new(LeaseId(id), "h".into(), 1, 2, 0, HeldLocks::None, None)
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

    #[test]
    fn slots_span_chunks() {
        let mut t = LeaseTable::default();
        let n = 2 * CHUNK_SLOTS as u128 + 5;
        for id in 0..n {
            assert_eq!(u128::from(t.insert(lease(id))), id);
        }
        t.check().unwrap();
        // Free slots in every chunk; they are reused before the slab grows.
        for id in (0..n).step_by(7) {
            t.remove(&LeaseId(id)).unwrap();
        }
        t.check().unwrap();
        let freed = n.div_ceil(7);
        for id in n..n + freed {
            assert!(
                u128::from(t.insert(lease(id))) < n,
                "a freed slot is reused"
            );
        }
        assert_eq!(
            u128::from(t.insert(lease(n + freed))),
            n,
            "then the slab grows"
        );
        t.check().unwrap();
        for (slot, l) in t.iter() {
            assert_eq!(t.slot_of(l.id()), Some(slot));
        }
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
