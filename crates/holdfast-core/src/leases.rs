//! Leases and the locks they hold.
//!
//! A lease owns its held locks (the per-grant facts: kind, fencing token, count, times); the key
//! table only lists which leases hold a key. Both are laid out for memory (W3 in
//! `docs/benchmarks.md`): a held lock shares its key's text with the key table, a lease names
//! its holder by a slot in the holder-name table, and their sizes are asserted below.

use std::hash::BuildHasher;
use std::num::NonZeroU32;
use std::sync::Arc;

use crate::idhash::IdBuild;
pub(crate) use crate::slab::Slot;
use crate::slab::{IndexedSlab, Keyed};
use crate::types::{HeldLockView, LeaseId, LeaseRecord, LeaseView, LockKind, TimeMs, WaiterId};

/// A [`LockKind`] in 8 bytes instead of 12: the variant and a semaphore's limit share one
/// word (limits are at most [`crate::limits::SEMAPHORE_LIMIT_MAX`], below 2^30), never zero,
/// so an enum around a held lock needs no tag of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PackedKind {
    /// 1 exclusive, 2 shared, `limit << 2 | 3` semaphore.
    variant_limit: NonZeroU32,
    /// A semaphore grant's permits (0 otherwise).
    permits: u32,
}

impl PackedKind {
    const EXCLUSIVE: NonZeroU32 = NonZeroU32::MIN;
    const SHARED: NonZeroU32 = NonZeroU32::MIN.saturating_add(1);

    fn new(kind: LockKind) -> Self {
        const _: () = assert!(crate::limits::SEMAPHORE_LIMIT_MAX < 1 << 30);
        match kind {
            LockKind::Exclusive => PackedKind {
                variant_limit: Self::EXCLUSIVE,
                permits: 0,
            },
            LockKind::Shared => PackedKind {
                variant_limit: Self::SHARED,
                permits: 0,
            },
            LockKind::Semaphore { limit, permits } => {
                // Every path that makes a kind checked the limit (requests and restored
                // records alike); a larger one is clamped rather than wrapped.
                let limit = limit.min(crate::limits::SEMAPHORE_LIMIT_MAX);
                PackedKind {
                    variant_limit: NonZeroU32::MIN.saturating_add((limit << 2 | 3) - 1),
                    permits,
                }
            }
        }
    }

    fn get(self) -> LockKind {
        match self.variant_limit.get() {
            1 => LockKind::Exclusive,
            2 => LockKind::Shared,
            v => LockKind::Semaphore {
                limit: v >> 2,
                permits: self.permits,
            },
        }
    }
}

/// One lock held by a lease (48 bytes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct HeldLock {
    pub key: Arc<str>,
    kind: PackedKind,
    pub fencing_token: u64,
    pub count: u32,
    /// At most [`crate::limits::LOCK_DELAY_MS_MAX`] (60 s).
    lock_delay_ms: u32,
    pub acquired_at_ms: TimeMs,
}

impl HeldLock {
    pub fn new(
        key: Arc<str>,
        kind: LockKind,
        fencing_token: u64,
        acquired_at_ms: TimeMs,
        lock_delay_ms: u64,
    ) -> Self {
        const _: () = assert!(crate::limits::LOCK_DELAY_MS_MAX <= u32::MAX as u64);
        HeldLock {
            key,
            kind: PackedKind::new(kind),
            fencing_token,
            count: 1,
            // Checked against LOCK_DELAY_MS_MAX by every path that makes a lock.
            lock_delay_ms: u32::try_from(lock_delay_ms).unwrap_or(u32::MAX),
            acquired_at_ms,
        }
    }

    pub fn kind(&self) -> LockKind {
        self.kind.get()
    }

    pub fn set_kind(&mut self, kind: LockKind) {
        self.kind = PackedKind::new(kind);
    }

    pub fn lock_delay_ms(&self) -> u64 {
        u64::from(self.lock_delay_ms)
    }

    pub fn view(&self) -> HeldLockView {
        HeldLockView {
            // Not `to_string()`: through `Display` it would go by the formatter.
            key: String::from(&*self.key),
            kind: self.kind(),
            fencing_token: self.fencing_token,
            count: self.count,
            acquired_at_ms: self.acquired_at_ms,
            lock_delay_ms: self.lock_delay_ms(),
        }
    }

    pub fn from_record(v: HeldLockView) -> Self {
        let mut h = HeldLock::new(
            v.key.into(),
            v.kind,
            v.fencing_token,
            v.acquired_at_ms,
            v.lock_delay_ms,
        );
        h.count = v.count;
        h
    }
}

/// Where a lease's holder name sits in `Engine::holder_names` (a type of its own, so that a
/// slot is never shown as a name).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct HolderSlot(pub Slot);

/// A lease's held locks, sorted by key. Most leases hold one lock: it is kept inline, where a
/// vector would add a heap block (a 64-byte allocation per lease) beside its 24 bytes. None or
/// several are a boxed slice (an empty one allocates nothing). Two variants, so the held
/// lock's one spare value (the key pointer's null) tells them apart and the enum is as large
/// as one held lock; a lease's set of locks changes rarely, so reallocating it is cheap.
#[derive(Clone, Debug)]
pub(crate) enum HeldLocks {
    One(HeldLock),
    /// None, or two or more.
    Many(Box<[HeldLock]>),
}

impl Default for HeldLocks {
    fn default() -> Self {
        HeldLocks::Many(Box::default())
    }
}

impl HeldLocks {
    pub fn none() -> Self {
        HeldLocks::default()
    }

    pub fn from_vec(mut v: Vec<HeldLock>) -> Self {
        match v.pop() {
            Some(h) if v.is_empty() => HeldLocks::One(h),
            Some(h) => {
                v.push(h);
                HeldLocks::Many(v.into_boxed_slice())
            }
            None => HeldLocks::none(),
        }
    }

    /// Insert at `i` (as `Vec::insert`).
    pub fn insert(&mut self, i: usize, h: HeldLock) {
        if self.is_empty() {
            *self = HeldLocks::One(h);
            return;
        }
        let old = std::mem::take(self).into_vec();
        // Sized exactly: `Vec::insert` would double the block, then shrinking it to a boxed
        // slice would copy it again.
        let mut v = Vec::with_capacity(old.len() + 1);
        let mut old = old.into_iter();
        v.extend(old.by_ref().take(i));
        v.push(h);
        v.extend(old);
        *self = HeldLocks::from_vec(v);
    }

    /// Remove the lock at `i` (as `Vec::remove`: `i` must be in range).
    pub fn remove(&mut self, i: usize) -> HeldLock {
        let mut v = std::mem::take(self).into_vec();
        let h = v.remove(i);
        *self = HeldLocks::from_vec(v);
        h
    }

    fn into_vec(self) -> Vec<HeldLock> {
        match self {
            HeldLocks::One(h) => vec![h],
            HeldLocks::Many(v) => v.into_vec(),
        }
    }
}

impl std::ops::Deref for HeldLocks {
    type Target = [HeldLock];
    fn deref(&self) -> &[HeldLock] {
        match self {
            HeldLocks::One(h) => std::slice::from_ref(h),
            HeldLocks::Many(v) => v,
        }
    }
}

impl std::ops::DerefMut for HeldLocks {
    fn deref_mut(&mut self) -> &mut [HeldLock] {
        match self {
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
    /// The holder name's slot in `Engine::holder_names`, where the leases of one holder share
    /// the text (`Engine::intern_holder`, `Engine::holder_of`).
    pub holder: HolderSlot,
    /// At most [`crate::limits::LEASE_TTL_MS_MAX`] (30 days), so 32 bits; never 0 (TTLs are at
    /// least [`crate::limits::LEASE_TTL_MS_MIN`]), which gives `Option<Lease>` in the slab a
    /// spare value instead of a tag word.
    ttl_ms: NonZeroU32,
    /// This lease's place in the [`LeaseTable`]'s expiry heap.
    expiry_pos: u32,
    /// Changed only through [`LeaseTable::set_expiry`], which keeps the heap in order.
    expires_at_ms: TimeMs,
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
        holder: HolderSlot,
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
            ttl_ms: ttl_32(ttl_ms),
            expiry_pos: 0,
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

    pub fn ttl_ms(&self) -> u64 {
        u64::from(self.ttl_ms.get())
    }

    pub fn expires_at_ms(&self) -> TimeMs {
        self.expires_at_ms
    }

    /// The expiry order: time, then id (timers at one instant fire in id order).
    fn expiry_key(&self) -> (TimeMs, u64, u64) {
        (self.expires_at_ms, self.id_hi, self.id_lo)
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

    /// The lease as the API shows it; `holder` is its holder name.
    pub fn view(&self, holder: &str) -> LeaseView {
        LeaseView {
            lease_id: self.id(),
            holder: holder.to_owned(),
            ttl_ms: self.ttl_ms(),
            expires_at_ms: self.expires_at_ms,
            created_at_ms: self.created_at_ms,
            reason: self.reason().map(str::to_owned),
            metadata: self.metadata().map(str::to_owned),
            owner: self.owner().map(str::to_owned),
            locks: self.locks.iter().map(HeldLock::view).collect(),
        }
    }

    /// The lease as it is stored; `holder` is its holder name.
    pub fn record(&self, holder: &str) -> LeaseRecord {
        let v = self.view(holder);
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

// The sizes the memory figures rest on (W3, `benches/engine.rs`): a change that grows them
// should be a decision, not an accident.
#[cfg(target_pointer_width = "64")]
const _: () = {
    assert!(std::mem::size_of::<HeldLock>() == 48);
    assert!(std::mem::size_of::<HeldLocks>() == 48);
    assert!(std::mem::size_of::<Option<Lease>>() == 112);
};

/// A TTL in the lease's 32-bit field. Every path that sets a TTL validated it against
/// [`crate::limits::LEASE_TTL_MS_MIN`] and [`crate::limits::LEASE_TTL_MS_MAX`] first;
/// clamping keeps a bad value in range anyway.
fn ttl_32(ttl_ms: u64) -> NonZeroU32 {
    const _: () = assert!(crate::limits::LEASE_TTL_MS_MAX <= u32::MAX as u64);
    NonZeroU32::new(u32::try_from(ttl_ms).unwrap_or(u32::MAX)).unwrap_or(NonZeroU32::MIN)
}

/// A lease id's high and low halves.
pub(crate) fn split_id(id: LeaseId) -> (u64, u64) {
    // Truncation intended: the two halves of the id.
    #[allow(clippy::cast_possible_truncation)]
    ((id.0 >> 64) as u64, id.0 as u64)
}

impl Keyed for Lease {
    fn key_hash(&self, hasher: &impl BuildHasher) -> u64 {
        hasher.hash_one(self.id().0)
    }
}

/// The live leases: an [`IndexedSlab`] of leases found by id (hashed with the engine's id
/// hasher), and the leases in expiry order. Other structures (key holders) refer to a lease
/// by its 4-byte slot instead of its 16-byte id.
///
/// The expiry heap holds bare slots too and reads the expiry time and id from the slab: a
/// heap entry is 4 bytes instead of a 24-byte ordered-set entry in B-tree nodes that
/// ascending inserts leave about half full (with the 4-byte index entries, ≈ 70 bytes less
/// per lease).
#[derive(Clone, Debug, Default)]
pub(crate) struct LeaseTable {
    leases: IndexedSlab<Lease, IdBuild>,
    /// Slots of the live leases as a binary min-heap on (expiry time, id); every lease
    /// knows its position (`Lease::expiry_pos`).
    expiry: Vec<Slot>,
}

impl LeaseTable {
    pub fn len(&self) -> usize {
        self.leases.len()
    }

    /// Reserve room for `additional` more leases (a hint: fails quietly).
    pub fn try_reserve(&mut self, additional: usize) {
        self.leases.try_reserve(additional);
        let _ = self.expiry.try_reserve(additional);
    }

    pub fn slot_of(&self, id: LeaseId) -> Option<Slot> {
        let hash = self.leases.hasher().hash_one(id.0);
        self.leases.find(hash, |l| l.id() == id)
    }

    pub fn contains_key(&self, id: &LeaseId) -> bool {
        self.slot_of(*id).is_some()
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
        self.leases.get(slot)
    }

    pub fn at_mut(&mut self, slot: Slot) -> Option<&mut Lease> {
        self.leases.get_mut(slot)
    }

    /// Add a lease whose id is not in the table (the caller checked); returns its slot.
    pub fn insert(&mut self, lease: Lease) -> Slot {
        debug_assert!(!self.contains_key(&lease.id()), "lease inserted twice");
        let slot = self.leases.insert(lease);
        self.expiry.push(slot);
        self.sift_up(self.expiry.len() - 1);
        slot
    }

    /// Remove a lease; returns the slot it had (now free) and the lease.
    pub fn remove(&mut self, id: &LeaseId) -> Option<(Slot, Lease)> {
        let hash = self.leases.hasher().hash_one(id.0);
        let (slot, lease) = self.leases.remove_where(hash, |l| l.id() == *id)?;
        // Its heap entry now names a free slot; the heap reads only the other entries' keys.
        self.heap_remove(lease.expiry_pos as usize, lease.expiry_key());
        Some((slot, lease))
    }

    /// Set a lease's TTL and expiry time, and move it to its place in the expiry order.
    pub fn set_expiry(&mut self, slot: Slot, ttl_ms: u64, expires_at_ms: TimeMs) {
        let Some(lease) = self.at_mut(slot) else {
            return;
        };
        lease.ttl_ms = ttl_32(ttl_ms);
        let earlier = expires_at_ms < lease.expires_at_ms;
        lease.expires_at_ms = expires_at_ms;
        let pos = lease.expiry_pos as usize;
        if earlier {
            self.sift_up(pos);
        } else {
            self.sift_down(pos);
        }
    }

    /// The lease that expires first (ties: lowest id), with its expiry time.
    pub fn first_expiry(&self) -> Option<(TimeMs, LeaseId)> {
        let lease = self.at(*self.expiry.first()?)?;
        Some((lease.expires_at_ms, lease.id()))
    }

    /// The expiry order key of the lease in `slot` (a slot in the heap is always in use).
    fn key_at(&self, slot: Slot) -> (TimeMs, u64, u64) {
        self.at(slot)
            .map_or((TimeMs::MAX, u64::MAX, u64::MAX), Lease::expiry_key)
    }

    /// Put `slot` at heap position `pos` and tell its lease.
    fn place(&mut self, pos: usize, slot: Slot) {
        self.expiry[pos] = slot;
        if let Some(l) = self.at_mut(slot) {
            // Positions are below the number of slots, which fits a `u32` (see `insert`).
            #[allow(clippy::cast_possible_truncation)]
            let pos = pos as u32;
            l.expiry_pos = pos;
        }
    }

    fn sift_up(&mut self, mut pos: usize) {
        let slot = self.expiry[pos];
        let key = self.key_at(slot);
        while pos > 0 {
            let parent = (pos - 1) / 2;
            let up = self.expiry[parent];
            if self.key_at(up) <= key {
                break;
            }
            self.place(pos, up);
            pos = parent;
        }
        self.place(pos, slot);
    }

    fn sift_down(&mut self, mut pos: usize) {
        let n = self.expiry.len();
        let slot = self.expiry[pos];
        let key = self.key_at(slot);
        loop {
            let left = 2 * pos + 1;
            if left >= n {
                break;
            }
            let right = left + 1;
            let mut child = left;
            let mut child_key = self.key_at(self.expiry[left]);
            if right < n {
                let right_key = self.key_at(self.expiry[right]);
                if right_key < child_key {
                    child = right;
                    child_key = right_key;
                }
            }
            if key <= child_key {
                break;
            }
            self.place(pos, self.expiry[child]);
            pos = child;
        }
        self.place(pos, slot);
    }

    /// Take the entry at heap position `pos` out; `removed_key` was its expiry key.
    fn heap_remove(&mut self, pos: usize, removed_key: (TimeMs, u64, u64)) {
        let Some(last) = self.expiry.pop() else {
            return;
        };
        if pos < self.expiry.len() {
            self.place(pos, last);
            if self.key_at(last) < removed_key {
                self.sift_up(pos);
            } else {
                self.sift_down(pos);
            }
        }
    }

    /// Live leases with their slots, in slot order (not a meaningful order).
    pub fn iter(&self) -> impl Iterator<Item = (Slot, &Lease)> {
        self.leases.iter()
    }

    /// The table's own consistency: the slab's, every lease found by its id at its slot, and
    /// the expiry heap holding every live lease once, in heap order, at the position the
    /// lease records.
    pub fn check(&self) -> Result<(), String> {
        self.leases.check()?;
        for (slot, lease) in self.iter() {
            let id = lease.id();
            if self.slot_of(id) != Some(slot) {
                return Err(format!("lease {id} in slot {slot} is not indexed there"));
            }
            if self.expiry.get(lease.expiry_pos as usize) != Some(&slot) {
                return Err(format!(
                    "lease {id} in slot {slot} is not at its expiry heap position {}",
                    lease.expiry_pos
                ));
            }
        }
        if self.leases.len() != self.expiry.len() {
            return Err(format!(
                "{} leases but {} expiry heap entries",
                self.leases.len(),
                self.expiry.len()
            ));
        }
        for (pos, slot) in self.expiry.iter().enumerate().skip(1) {
            let parent = self.expiry[(pos - 1) / 2];
            if self.key_at(parent) > self.key_at(*slot) {
                return Err(format!(
                    "expiry heap out of order at position {pos} (slot {slot} under slot {parent})"
                ));
            }
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
        Lease::new(LeaseId(id), HolderSlot(0), 1, 2, 0, HeldLocks::none(), None)
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
        /// Every kind a request or a record can carry comes back from its packed form.
        #[test]
        fn packed_kinds_round_trip(
            variant in 0u8..3,
            limit in 1u32..=crate::limits::SEMAPHORE_LIMIT_MAX,
            permits_share in 0.0f64..=1.0,
        ) {
            // Permits in 1..=limit.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let permits = ((f64::from(limit) * permits_share) as u32).clamp(1, limit);
            let kind = match variant {
                0 => LockKind::Exclusive,
                1 => LockKind::Shared,
                _ => LockKind::Semaphore { limit, permits },
            };
            prop_assert_eq!(PackedKind::new(kind).get(), kind);
        }
    }

    fn lease_expiring(id: u128, at: TimeMs) -> Lease {
        Lease::new(
            LeaseId(id),
            HolderSlot(0),
            1,
            at,
            0,
            HeldLocks::none(),
            None,
        )
    }

    #[test]
    fn expiry_order_is_time_then_id_and_follows_renewals() {
        let mut t = LeaseTable::default();
        for (id, at) in [(5, 30), (4, 10), (9, 10), (1, 20)] {
            t.insert(lease_expiring(id, at));
        }
        assert_eq!(t.first_expiry(), Some((10, LeaseId(4))));
        let slot = t.slot_of(LeaseId(4)).unwrap();
        t.set_expiry(slot, 7, 40);
        assert_eq!(t.first_expiry(), Some((10, LeaseId(9))));
        assert_eq!(t.get(&LeaseId(4)).map(Lease::ttl_ms), Some(7));
        t.remove(&LeaseId(9)).unwrap();
        assert_eq!(t.first_expiry(), Some((20, LeaseId(1))));
        let slot = t.slot_of(LeaseId(5)).unwrap();
        t.set_expiry(slot, 1, 20);
        assert_eq!(
            t.first_expiry(),
            Some((20, LeaseId(1))),
            "ties go to the lower id"
        );
        t.remove(&LeaseId(1)).unwrap();
        assert_eq!(t.first_expiry(), Some((20, LeaseId(5))));
        t.check().unwrap();
    }

    /// One step of a random history: insert (id, expiry), remove id, or move id's expiry.
    #[derive(Clone, Debug)]
    enum Op {
        Insert(u128, TimeMs),
        Remove(u128),
        Renew(u128, TimeMs),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u128..40, 0u64..50).prop_map(|(id, at)| Op::Insert(id, at)),
            (0u128..40).prop_map(Op::Remove),
            (0u128..40, 0u64..50).prop_map(|(id, at)| Op::Renew(id, at)),
        ]
    }

    proptest! {
        /// Random inserts, removes and expiry changes agree with a plain map (slots, and the
        /// first expiry as the smallest (time, id)), and the table stays consistent.
        #[test]
        fn table_matches_a_map(ops in proptest::collection::vec(op(), 0..300)) {
            let mut t = LeaseTable::default();
            let mut model: HashMap<u128, (Slot, TimeMs)> = HashMap::new();
            // Spread ids over both halves.
            let spread = |raw: u128| raw.wrapping_mul(0x9E37_79B9_7F4A_7C15_0000_0000_0000_0001) ^ raw;
            for op in ops {
                match op {
                    Op::Insert(raw, at) => {
                        let id = spread(raw);
                        if model.contains_key(&id) {
                            continue;
                        }
                        let slot = t.insert(lease_expiring(id, at));
                        prop_assert!(!model.values().any(|(s, _)| *s == slot), "slot {} handed out twice", slot);
                        model.insert(id, (slot, at));
                    }
                    Op::Remove(raw) => {
                        let id = spread(raw);
                        let got = t.remove(&LeaseId(id)).map(|(s, l)| (s, l.id()));
                        prop_assert_eq!(got, model.remove(&id).map(|(s, _)| (s, LeaseId(id))));
                    }
                    Op::Renew(raw, at) => {
                        let id = spread(raw);
                        if let Some((slot, old)) = model.get_mut(&id) {
                            t.set_expiry(*slot, 1, at);
                            *old = at;
                        }
                    }
                }
                t.check().map_err(TestCaseError::fail)?;
                prop_assert_eq!(t.len(), model.len());
                for (id, (slot, at)) in &model {
                    prop_assert_eq!(t.slot_of(LeaseId(*id)), Some(*slot));
                    prop_assert_eq!(t.at(*slot).map(|l| (l.id(), l.expires_at_ms())), Some((LeaseId(*id), *at)));
                }
                let first = model.iter().map(|(id, (_, at))| (*at, LeaseId(*id))).min();
                prop_assert_eq!(t.first_expiry(), first);
            }
        }
    }
}
