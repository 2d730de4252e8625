//! A map from client-chosen text (lock keys, holder names) to a value, with the text stored
//! once and shared (`Arc<str>`) with whoever else needs it (held locks, events).
//!
//! A [`Slab`] of (text, value) and an index of bare slots hashed by the text. A
//! `HashMap<Arc<str>, V>` kept the entries in the hash table itself, where its load factor
//! multiplies them (≈ 75 bytes per key for a 40-byte key state), and each doubling left a
//! block half the size of the table behind in the allocator; here the index is 4 bytes per
//! entry and the entries sit in fixed chunks. An entry's slot is stable while it lives, so
//! a lease can name its holder by a 4-byte slot.
//!
//! The text is chosen by clients, so the hash is the standard keyed SipHash
//! (`RandomState`), which resists collision flooding.

use std::hash::{BuildHasher as _, RandomState};
use std::sync::Arc;

use hashbrown::HashTable;

use crate::slab::{Slab, Slot};

#[derive(Clone, Debug)]
pub(crate) struct TextMap<V> {
    slab: Slab<(Arc<str>, V)>,
    index: HashTable<Slot>,
    hasher: RandomState,
}

impl<V> Default for TextMap<V> {
    fn default() -> Self {
        TextMap {
            slab: Slab::default(),
            index: HashTable::new(),
            hasher: RandomState::new(),
        }
    }
}

/// The hash of the text in `slot` (for the index's rehashing).
fn rehash<V>(slab: &Slab<(Arc<str>, V)>, hasher: &RandomState, slot: Slot) -> u64 {
    slab.get(slot).map_or(0, |(t, _)| hasher.hash_one(&**t))
}

impl<V> TextMap<V> {
    /// Reserve room for `additional` more entries (a hint: fails quietly).
    pub fn try_reserve(&mut self, additional: usize) {
        let (slab, hasher) = (&self.slab, &self.hasher);
        let _ = self
            .index
            .try_reserve(additional, |s| rehash(slab, hasher, *s));
        self.slab.try_reserve(additional);
    }

    pub fn slot_of(&self, text: &str) -> Option<Slot> {
        let slab = &self.slab;
        self.index
            .find(self.hasher.hash_one(text), |s| {
                slab.get(*s).is_some_and(|(t, _)| &**t == text)
            })
            .copied()
    }

    /// The entry in `slot`, if the slot is in use.
    pub fn at(&self, slot: Slot) -> Option<(&Arc<str>, &V)> {
        self.slab.get(slot).map(|(t, v)| (t, v))
    }

    pub fn at_mut(&mut self, slot: Slot) -> Option<&mut V> {
        self.slab.get_mut(slot).map(|(_, v)| v)
    }

    pub fn get(&self, text: &str) -> Option<&V> {
        self.at(self.slot_of(text)?).map(|(_, v)| v)
    }

    pub fn get_mut(&mut self, text: &str) -> Option<&mut V> {
        let slot = self.slot_of(text)?;
        self.at_mut(slot)
    }

    /// The shared text and the value.
    pub fn get_key_value(&self, text: &str) -> Option<(&Arc<str>, &V)> {
        self.at(self.slot_of(text)?)
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

    /// The value of `text`, added as [`TextMap::slot_or_insert_with`] does if absent; true if
    /// it was added.
    pub fn get_or_insert_with(
        &mut self,
        text: &str,
        new: impl FnOnce() -> (Arc<str>, V),
    ) -> (&mut V, bool) {
        let (slot, added) = self.slot_or_insert_with(text, new);
        let value = self
            .at_mut(slot)
            .unwrap_or_else(|| unreachable!("slot {slot} was found or filled just now"));
        (value, added)
    }

    /// Add text that is not in the map (the caller checked); returns its slot.
    pub fn insert(&mut self, text: Arc<str>, value: V) -> Slot {
        debug_assert!(self.slot_of(&text).is_none(), "text inserted twice");
        let hash = self.hasher.hash_one(&*text);
        let slot = self.slab.insert((text, value));
        let (slab, hasher) = (&self.slab, &self.hasher);
        self.index
            .insert_unique(hash, slot, |s| rehash(slab, hasher, *s));
        slot
    }

    pub fn remove(&mut self, text: &str) -> Option<V> {
        let slot = self.slot_of(text)?;
        self.remove_at(slot).map(|(_, v)| v)
    }

    /// Remove the entry in `slot`.
    pub fn remove_at(&mut self, slot: Slot) -> Option<(Arc<str>, V)> {
        let hash = self.hasher.hash_one(&*self.slab.get(slot)?.0);
        if let Ok(entry) = self.index.find_entry(hash, |s| *s == slot) {
            entry.remove();
        }
        self.slab.remove(slot)
    }

    /// Entries in no meaningful order.
    pub fn iter(&self) -> impl Iterator<Item = (&Arc<str>, &V)> {
        self.slab.iter().map(|(_, (t, v))| (t, v))
    }

    /// The map's own consistency (the slab's, every text indexed at its slot), and each
    /// value's by `value_ok`.
    pub fn check(&self, value_ok: impl Fn(&V) -> Result<(), String>) -> Result<(), String> {
        self.slab.check()?;
        if self.index.len() != self.slab.len() {
            return Err(format!(
                "{} entries but {} index entries",
                self.slab.len(),
                self.index.len()
            ));
        }
        for (slot, (text, value)) in self.slab.iter() {
            if self.slot_of(text) != Some(slot) {
                return Err(format!("{text} in slot {slot} is not indexed there"));
            }
            value_ok(value).map_err(|why| format!("{text}: {why}"))?;
        }
        Ok(())
    }
}
