//! A fast hasher for the engine's own ids.
//!
//! Lease ids are 128 random bits drawn by the host and waiter ids are engine counters, so
//! neither can be chosen by a client to collide: SipHash's protection against hash flooding
//! is not needed for them, and a multiply-fold hash is several times cheaper. Maps keyed by
//! client-chosen strings (lock keys, idempotency keys) keep the standard `RandomState`.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

/// Folds the written integers into one word with a multiplicative mix.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct IdHasher(u64);

const K: u64 = 0x9E37_79B9_7F4A_7C15;

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        // Spread the high bits down too (hashbrown uses the top 7 bits as a tag).
        self.0 ^ (self.0 >> 29)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(K);
    }

    fn write_u128(&mut self, n: u128) {
        // Truncation intended: the two halves are mixed in separately.
        #[allow(clippy::cast_possible_truncation)]
        let (lo, hi) = (n as u64, (n >> 64) as u64);
        self.write_u64(lo);
        self.write_u64(hi);
    }
}

pub(crate) type IdBuild = BuildHasherDefault<IdHasher>;
pub(crate) type IdMap<K, V> = HashMap<K, V, IdBuild>;
pub(crate) type IdSet<K> = HashSet<K, IdBuild>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::BuildHasher;

    #[test]
    fn sequential_ids_spread() {
        let b = IdBuild::default();
        let tags: HashSet<u64> = (0u64..1000).map(|i| b.hash_one(i) >> 57).collect();
        assert!(tags.len() > 64, "top bits must vary: {}", tags.len());
    }
}
