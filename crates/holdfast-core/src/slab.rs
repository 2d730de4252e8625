//! A slab of values addressed by a `u32` slot, in fixed-size chunks.
//!
//! The engine's big tables (leases, keys) keep their values here and index them with a hash
//! table of bare slots: a hash table's load factor then multiplies 4 bytes per entry instead
//! of the whole value, and other structures refer to a value by its 4-byte slot.
//!
//! The slab is a list of fixed-size chunks rather than one vector: a vector doubles by
//! copying into a new block, and the old blocks stay in the process's heap (each as large as
//! all values before it), which showed as ~20 % more resident memory per lease. A chunk is
//! allocated once at its full capacity and never moves.

use std::hash::BuildHasher;

use hashbrown::HashTable;

/// Where a value sits in a [`Slab`]. Valid while that value lives; the slot is reused by a
/// later value once it is removed, so an index holding a slot must drop it with the value.
pub(crate) type Slot = u32;

/// Bytes per chunk: a power of two, which allocators serve without rounding up (a chunk of
/// 1,024 leases of 112 bytes was rounded up to 128 KiB, wasting 8 bytes per lease).
const CHUNK_BYTES: usize = 128 * 1024;

#[derive(Clone, Debug)]
pub(crate) struct Slab<T> {
    chunks: Vec<Vec<Option<T>>>,
    /// Empty slots, reused last-freed first.
    free: Vec<Slot>,
    /// Slots in use.
    len: usize,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Slab {
            chunks: Vec::new(),
            free: Vec::new(),
            len: 0,
        }
    }
}

impl<T> Slab<T> {
    /// Values per chunk.
    const CHUNK_SLOTS: usize = {
        let slots = CHUNK_BYTES / std::mem::size_of::<Option<T>>();
        assert!(slots > 0, "a value larger than a chunk");
        slots
    };

    /// The chunk and the place in it of a slot.
    fn chunk_of(slot: Slot) -> (usize, usize) {
        let slot = slot as usize;
        (slot / Self::CHUNK_SLOTS, slot % Self::CHUNK_SLOTS)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Reserve room in the chunk list for `additional` more values (a hint: fails quietly).
    pub fn try_reserve(&mut self, additional: usize) {
        let _ = self.chunks.try_reserve(additional / Self::CHUNK_SLOTS + 1);
    }

    /// The value in `slot`, if the slot is in use.
    pub fn get(&self, slot: Slot) -> Option<&T> {
        let (c, i) = Self::chunk_of(slot);
        self.chunks.get(c)?.get(i)?.as_ref()
    }

    pub fn get_mut(&mut self, slot: Slot) -> Option<&mut T> {
        let (c, i) = Self::chunk_of(slot);
        self.chunks.get_mut(c)?.get_mut(i)?.as_mut()
    }

    /// Store a value; returns its slot (a freed one if there is one).
    pub fn insert(&mut self, value: T) -> Slot {
        self.len += 1;
        if let Some(slot) = self.free.pop() {
            let (c, i) = Self::chunk_of(slot);
            self.chunks[c][i] = Some(value);
            return slot;
        }
        if self
            .chunks
            .last()
            .is_none_or(|c| c.len() == Self::CHUNK_SLOTS)
        {
            self.chunks.push(Vec::with_capacity(Self::CHUNK_SLOTS));
        }
        let c = self.chunks.len() - 1;
        let chunk = &mut self.chunks[c];
        chunk.push(Some(value));
        // More than 4 billion live values cannot fit in memory long before this.
        #[allow(clippy::cast_possible_truncation)]
        let slot = (c * Self::CHUNK_SLOTS + chunk.len() - 1) as Slot;
        slot
    }

    /// Take the value out of `slot` (which becomes free).
    pub fn remove(&mut self, slot: Slot) -> Option<T> {
        let (c, i) = Self::chunk_of(slot);
        let value = self.chunks.get_mut(c)?.get_mut(i)?.take()?;
        self.free.push(slot);
        self.len -= 1;
        Some(value)
    }

    /// Values with their slots, in slot order.
    pub fn iter(&self) -> impl Iterator<Item = (Slot, &T)> {
        self.chunks
            .iter()
            .flatten()
            .enumerate()
            .filter_map(|(i, v)| {
                // Slots are numbered by `u32` (see `insert`).
                #[allow(clippy::cast_possible_truncation)]
                v.as_ref().map(|v| (i as Slot, v))
            })
    }

    /// The slab's own consistency: the free list holds exactly the empty slots, the count
    /// of used slots is right, and every chunk but the last is full at its fixed capacity.
    pub fn check(&self) -> Result<(), String> {
        let used = self.iter().count();
        if used != self.len {
            return Err(format!("{used} used slots but a count of {}", self.len));
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
            chunk.capacity() != Self::CHUNK_SLOTS
                || (*c + 1 < self.chunks.len() && chunk.len() != Self::CHUNK_SLOTS)
        }) {
            return Err(format!("chunk {c} is not full-sized or not full"));
        }
        if let Some(s) = free.iter().find(|s| self.get(**s).is_some()) {
            return Err(format!("slot {s} is in the free list but in use"));
        }
        Ok(())
    }
}

/// A value that an [`IndexedSlab`] can find by the key it carries.
pub(crate) trait Keyed {
    /// The hash of the value's key with `hasher` (the same hash a lookup computes).
    fn key_hash(&self, hasher: &impl BuildHasher) -> u64;
}

/// A [`Slab`] whose values are found by the key they carry, through a `hashbrown` index of
/// bare slots: the key is read from the slab, so an index entry is 4 bytes and the table's
/// load factor multiplies only those (the lease table: 4 instead of 24 bytes per entry; the
/// key table: instead of a 56-byte key state entry).
#[derive(Clone, Debug)]
pub(crate) struct IndexedSlab<T, S> {
    slab: Slab<T>,
    index: HashTable<Slot>,
    hasher: S,
}

impl<T, S: Default> Default for IndexedSlab<T, S> {
    fn default() -> Self {
        IndexedSlab {
            slab: Slab::default(),
            index: HashTable::new(),
            hasher: S::default(),
        }
    }
}

impl<T: Keyed, S: BuildHasher> IndexedSlab<T, S> {
    pub fn len(&self) -> usize {
        self.slab.len()
    }

    pub fn hasher(&self) -> &S {
        &self.hasher
    }

    /// Reserve room for `additional` more values (a hint: fails quietly).
    pub fn try_reserve(&mut self, additional: usize) {
        let (slab, hasher) = (&self.slab, &self.hasher);
        let _ = self
            .index
            .try_reserve(additional, |s| rehash(slab, hasher, *s));
        self.slab.try_reserve(additional);
    }

    /// The slot of the value whose key hashes to `hash` and for which `is` holds.
    pub fn find(&self, hash: u64, is: impl Fn(&T) -> bool) -> Option<Slot> {
        self.index
            .find(hash, |s| self.slab.get(*s).is_some_and(&is))
            .copied()
    }

    pub fn get(&self, slot: Slot) -> Option<&T> {
        self.slab.get(slot)
    }

    pub fn get_mut(&mut self, slot: Slot) -> Option<&mut T> {
        self.slab.get_mut(slot)
    }

    /// Add a value whose key is not in the table (the caller checked); returns its slot.
    pub fn insert(&mut self, value: T) -> Slot {
        let hash = value.key_hash(&self.hasher);
        let slot = self.slab.insert(value);
        let (slab, hasher) = (&self.slab, &self.hasher);
        self.index
            .insert_unique(hash, slot, |s| rehash(slab, hasher, *s));
        slot
    }

    /// Take out the value whose key hashes to `hash` and for which `is` holds (one probe of
    /// the index); returns the slot it had and the value.
    pub fn remove_where(&mut self, hash: u64, is: impl Fn(&T) -> bool) -> Option<(Slot, T)> {
        let slab = &self.slab;
        let entry = self
            .index
            .find_entry(hash, |s| slab.get(*s).is_some_and(&is))
            .ok()?;
        let (slot, _) = entry.remove();
        Some((slot, self.slab.remove(slot)?))
    }

    /// Take the value out of `slot`.
    pub fn remove(&mut self, slot: Slot) -> Option<T> {
        let hash = self.slab.get(slot)?.key_hash(&self.hasher);
        if let Ok(entry) = self.index.find_entry(hash, |s| *s == slot) {
            entry.remove();
        }
        self.slab.remove(slot)
    }

    /// Values with their slots, in slot order.
    pub fn iter(&self) -> impl Iterator<Item = (Slot, &T)> {
        self.slab.iter()
    }

    /// The slab's consistency, and every value indexed at its slot under its key's hash.
    /// (Finding each value by its key, which also rules out two values with one key, is the
    /// owner's check: it knows what a key is.)
    pub fn check(&self) -> Result<(), String> {
        self.slab.check()?;
        if self.index.len() != self.slab.len() {
            return Err(format!(
                "{} values but {} index entries",
                self.slab.len(),
                self.index.len()
            ));
        }
        for (slot, value) in self.slab.iter() {
            let hash = value.key_hash(&self.hasher);
            if self.index.find(hash, |s| *s == slot).is_none() {
                return Err(format!("slot {slot} is not indexed under its key"));
            }
        }
        Ok(())
    }
}

/// The key hash of the value in `slot` (for the index's rehashing).
fn rehash<T: Keyed>(slab: &Slab<T>, hasher: &impl BuildHasher, slot: Slot) -> u64 {
    slab.get(slot).map_or(0, |v| v.key_hash(hasher))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn freed_slots_are_reused_before_the_slab_grows_across_chunks() {
        let mut s = Slab::default();
        let n = 2 * Slab::<usize>::CHUNK_SLOTS + 5;
        for v in 0..n {
            assert_eq!(s.insert(v) as usize, v);
        }
        s.check().unwrap();
        for slot in (0..n).step_by(7) {
            #[allow(clippy::cast_possible_truncation)]
            let slot = slot as Slot;
            assert_eq!(s.remove(slot), Some(slot as usize));
            assert_eq!(s.remove(slot), None, "a slot is freed once");
        }
        s.check().unwrap();
        let freed = n.div_ceil(7);
        assert_eq!(s.len(), n - freed);
        for v in 0..freed {
            assert!((s.insert(n + v) as usize) < n, "a freed slot is reused");
        }
        assert_eq!(s.insert(0) as usize, n, "then the slab grows");
        s.check().unwrap();
        for (slot, v) in s.iter() {
            assert_eq!(s.get(slot), Some(v));
        }
    }
}
