//! A map from client-chosen text (lock keys, holder names) to a value, with the text stored
//! once and shared (`Arc<str>`) with whoever else needs it (held locks, events).
//!
//! The entries sit in an [`IndexedSlab`] (fixed chunks behind an index of 4-byte slots). A
//! `HashMap<Arc<str>, V>` kept the entries in the hash table itself, where its load factor
//! multiplies them (≈ 75 bytes per key for a 40-byte key state), and each doubling left a
//! block half the size of the table behind in the allocator. An entry's slot is stable while
//! it lives, so a lease can name its holder by a 4-byte slot.
//!
//! The text is chosen by clients, so the hash is the standard keyed SipHash
//! (`RandomState`), which resists collision flooding.

use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;

use crate::slab::{IndexedSlab, Keyed, Slot};

/// One entry: the shared text and its value.
type Entry<V> = (Arc<str>, V);

impl<V> Keyed for Entry<V> {
    fn key_hash(&self, hasher: &impl BuildHasher) -> u64 {
        hasher.hash_one(&*self.0)
    }
}

#[derive(Clone, Debug)]
pub(crate) struct TextMap<V> {
    entries: IndexedSlab<Entry<V>, RandomState>,
}

impl<V> Default for TextMap<V> {
    fn default() -> Self {
        TextMap {
            entries: IndexedSlab::default(),
        }
    }
}

impl<V> TextMap<V> {
    /// Reserve room for `additional` more entries (a hint: fails quietly).
    pub fn try_reserve(&mut self, additional: usize) {
        self.entries.try_reserve(additional);
    }

    pub fn slot_of(&self, text: &str) -> Option<Slot> {
        let hash = self.entries.hasher().hash_one(text);
        self.entries.find(hash, |(t, _)| &**t == text)
    }

    /// The entry in `slot`, if the slot is in use.
    pub fn at(&self, slot: Slot) -> Option<(&Arc<str>, &V)> {
        self.entries.get(slot).map(|(t, v)| (t, v))
    }

    pub fn at_mut(&mut self, slot: Slot) -> Option<&mut V> {
        self.entries.get_mut(slot).map(|(_, v)| v)
    }

    pub fn get(&self, text: &str) -> Option<&V> {
        self.at(self.slot_of(text)?).map(|(_, v)| v)
    }

    pub fn get_mut(&mut self, text: &str) -> Option<&mut V> {
        let slot = self.slot_of(text)?;
        self.at_mut(slot)
    }

    /// The slot of `text`; if it is absent, `new()` gives its shared text (equal to `text`)
    /// and its value. True if it was added.
    pub fn slot_or_insert_with(
        &mut self,
        text: &str,
        new: impl FnOnce() -> (Arc<str>, V),
    ) -> (Slot, bool) {
        if let Some(slot) = self.slot_of(text) {
            return (slot, false);
        }
        let (shared, value) = new();
        debug_assert_eq!(&*shared, text);
        (self.insert(shared, value), true)
    }

    /// The shared text and the value of `text`, added as [`TextMap::slot_or_insert_with`]
    /// does if absent; true if it was added.
    pub fn get_or_insert_with(
        &mut self,
        text: &str,
        new: impl FnOnce() -> (Arc<str>, V),
    ) -> (&Arc<str>, &mut V, bool) {
        let (slot, added) = self.slot_or_insert_with(text, new);
        let (shared, value) = self
            .entries
            .get_mut(slot)
            .unwrap_or_else(|| unreachable!("slot {slot} was found or filled just now"));
        (shared, value, added)
    }

    /// Add text that is not in the map (the caller checked); returns its slot.
    pub fn insert(&mut self, text: Arc<str>, value: V) -> Slot {
        debug_assert!(self.slot_of(&text).is_none(), "text inserted twice");
        self.entries.insert((text, value))
    }

    pub fn remove(&mut self, text: &str) -> Option<V> {
        let hash = self.entries.hasher().hash_one(text);
        let (_, (_, value)) = self.entries.remove_where(hash, |(t, _)| &**t == text)?;
        Some(value)
    }

    /// Remove the entry in `slot`.
    pub fn remove_at(&mut self, slot: Slot) -> Option<(Arc<str>, V)> {
        self.entries.remove(slot)
    }

    /// Entries in no meaningful order.
    pub fn iter(&self) -> impl Iterator<Item = (&Arc<str>, &V)> {
        self.entries.iter().map(|(_, (t, v))| (t, v))
    }

    /// The map's own consistency (every text found at its slot), and each value's by
    /// `value_ok`.
    pub fn check(&self, value_ok: impl Fn(&V) -> Result<(), String>) -> Result<(), String> {
        self.entries.check()?;
        for (slot, (text, value)) in self.entries.iter() {
            if self.slot_of(text) != Some(slot) {
                return Err(format!("{text} in slot {slot} is not indexed there"));
            }
            value_ok(value).map_err(|why| format!("{text}: {why}"))?;
        }
        Ok(())
    }
}
