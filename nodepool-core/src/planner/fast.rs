//! A fast, non-cryptographic hasher for the planner's many small lookups
//! (labels, ids, node indices): the default SipHash showed up as a tenth
//! of a planning pass. Keys here are not attacker-controlled in a way that
//! could hurt (a slow pass at worst), and the maps live for one pass.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

/// The FxHash algorithm (as used by rustc).
#[derive(Default, Clone, Copy)]
pub struct FxHasher {
    hash: u64,
}

const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl FxHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.hash = (self.hash.rotate_left(5) ^ word).wrapping_mul(SEED);
    }
}

impl Hasher for FxHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut rest = bytes;
        while let Some((word, tail)) = rest.split_first_chunk::<8>() {
            self.add(u64::from_le_bytes(*word));
            rest = tail;
        }
        // The last 1-7 bytes as one word, read in at most two overlapping
        // loads (a copy of a variable-length tail is a call to memcpy, and
        // most keys here are short strings).
        let n = rest.len();
        if n >= 4 {
            let lo = u64::from(u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]));
            let hi = u64::from(u32::from_le_bytes([
                rest[n - 4],
                rest[n - 3],
                rest[n - 2],
                rest[n - 1],
            ]));
            self.add(lo | hi << 32);
        } else if n > 0 {
            let w = u64::from(rest[0]) | u64::from(rest[n / 2]) << 8 | u64::from(rest[n - 1]) << 16;
            self.add(w);
        }
    }

    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }

    #[inline]
    fn write_u32(&mut self, i: u32) {
        self.add(u64::from(i));
    }

    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }

    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }

    #[inline]
    fn finish(&self) -> u64 {
        self.hash
    }
}

/// Whether two byte strings are equal, comparing short ones in registers:
/// `==` on slices calls `memcmp`, and a call per key comparison was a sixth
/// of a planning pass (names and labels are mostly under 16 bytes).
#[inline]
pub fn bytes_eq(a: &[u8], b: &[u8]) -> bool {
    let n = a.len();
    if n != b.len() {
        return false;
    }
    match n {
        0 => true,
        1..=3 => a.iter().zip(b).all(|(x, y)| x == y),
        4..=7 => {
            a.first_chunk::<4>() == b.first_chunk::<4>()
                && a.last_chunk::<4>() == b.last_chunk::<4>()
        }
        8..=16 => {
            a.first_chunk::<8>() == b.first_chunk::<8>()
                && a.last_chunk::<8>() == b.last_chunk::<8>()
        }
        _ => a == b,
    }
}

/// A string map key that compares with [`bytes_eq`] and hashes like `str`.
#[derive(Clone, Copy, Debug)]
pub struct Key<'a>(pub &'a str);

impl PartialEq for Key<'_> {
    #[inline]
    fn eq(&self, o: &Self) -> bool {
        bytes_eq(self.0.as_bytes(), o.0.as_bytes())
    }
}

impl Eq for Key<'_> {}

impl std::hash::Hash for Key<'_> {
    #[inline]
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.0.hash(h);
    }
}

/// A `HashMap` with [`FxHasher`].
pub type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;
/// A `HashSet` with [`FxHasher`].
pub type FastSet<K> = HashSet<K, BuildHasherDefault<FxHasher>>;

#[cfg(test)]
mod tests {
    use super::{FxHasher, bytes_eq};
    use std::hash::Hasher;

    #[test]
    fn short_strings_compare_like_slices() {
        let words: Vec<Vec<u8>> = (0..=20)
            .flat_map(|len| {
                let base: Vec<u8> = (0..len as u8).map(|b| b'a' + b % 26).collect();
                let mut variants = vec![base.clone()];
                for i in 0..len {
                    let mut v = base.clone();
                    v[i] = b'#';
                    variants.push(v);
                }
                variants
            })
            .collect();
        for a in &words {
            for b in &words {
                assert_eq!(bytes_eq(a, b), a == b, "{a:?} {b:?}");
            }
        }
    }

    fn hash(bytes: &[u8]) -> u64 {
        let mut h = FxHasher::default();
        h.write(bytes);
        h.finish()
    }

    #[test]
    fn every_byte_counts() {
        // Flipping any byte of keys of every length up to 24 changes the hash.
        for len in 1..=24 {
            let key: Vec<u8> = (0..len as u8)
                .map(|b| b.wrapping_mul(37).wrapping_add(1))
                .collect();
            for i in 0..len {
                let mut other = key.clone();
                other[i] ^= 0x5a;
                assert_ne!(hash(&key), hash(&other), "len {len} byte {i}");
            }
        }
    }
}
