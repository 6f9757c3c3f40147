//! Merkle trees for anti-entropy (Dynamo §4.7).
//!
//! Two replicas find which keys they disagree on by comparing hash trees top
//! down: equal roots mean equal key sets (with overwhelming probability), and
//! only branches whose hashes differ are opened, so the cost of a comparison
//! follows the number of differences, not the number of keys.
//!
//! The tree here has a fixed shape: keys fall into `2^leaf_bits` leaves by
//! the top bits of their stable hash, and every inner node has
//! [`FANOUT`] children. A leaf's hash is the XOR of the [`item_hash`]es of its
//! keys. XOR is order-independent and its own inverse, so a write updates
//! the tree in O(depth) from the key's old and new item hashes, with no scan
//! ([`MerkleTree::replace`]). Inner nodes hash their children in order
//! rather than XOR them, so two differing leaves can never cancel out above
//! them.
//!
//! [`MerkleTree::differing_leaves`] is the descent as a pure function over
//! two trees. The network protocol runs the same steps one level at a time
//! ([`MerkleTree::level_hashes`], [`MerkleTree::differing_children`]). Once
//! the differing leaves are known, both sides list `(key, item hash)` for
//! them, and [`differing_keys`] compares the lists.
//!
//! Invariant: a tree's hashes are exactly those a fresh tree built from the
//! same `(key, item hash)` set would have, whatever order the inserts,
//! replacements and removals came in. Property tests check it, and that the
//! diff finds exactly the keys that differ.

use std::collections::BTreeMap;

use ringkv_core::hash::{stable_hash64, StableHasher};
use std::hash::Hasher;

/// Children per inner node, as a power of two.
pub const FANOUT_BITS: u32 = 4;
/// Children per inner node.
pub const FANOUT: usize = 1 << FANOUT_BITS;
/// The default number of leaves, as a power of two: 65,536 leaves keep about
/// 15 keys per leaf at a million keys, so a repair of a few keys lists few.
pub const DEFAULT_LEAF_BITS: u32 = 16;

/// The hash of one key at one version. `version` is any digest of the
/// stored value that two replicas holding the same version agree on (the
/// hash of its canonical encoding). Never 0 for a real item, so a key that
/// is present always changes its leaf.
pub fn item_hash(key: &[u8], version: u64) -> u64 {
    // The hash of `len ++ key ++ version`; for keys that fit, in one call on
    // a copy, which is twice as fast as feeding a streaming hasher three
    // pieces (every write pays for this; the result is the same).
    const INLINE_KEY_BYTES: usize = 240;
    if key.len() <= INLINE_KEY_BYTES {
        let mut bytes = [0u8; INLINE_KEY_BYTES + 16];
        let end = key.len() + 16;
        bytes[..8].copy_from_slice(&(key.len() as u64).to_le_bytes());
        bytes[8..end - 8].copy_from_slice(key);
        bytes[end - 8..end].copy_from_slice(&version.to_le_bytes());
        return stable_hash64(&bytes[..end]) | 1;
    }
    let mut h = StableHasher::default();
    h.write(&(key.len() as u64).to_le_bytes());
    h.write(key);
    h.write(&version.to_le_bytes());
    h.finish() | 1
}

/// An inner node's hash: the stable hash of its children's hashes, in order,
/// as little-endian bytes (one call on a copy: a streaming hasher fed one
/// child at a time gives the same hash ten times slower, and every write
/// pays for `depth` of these per peer tree).
fn combine(children: &[u64]) -> u64 {
    let mut bytes = [0u8; FANOUT * 8];
    for (chunk, child) in bytes.chunks_exact_mut(8).zip(children) {
        chunk.copy_from_slice(&child.to_le_bytes());
    }
    stable_hash64(&bytes[..children.len() * 8])
}

/// A key's leaf in a tree of `2^leaf_bits` leaves.
pub fn leaf_of(key: &[u8], leaf_bits: u32) -> usize {
    if leaf_bits == 0 {
        return 0;
    }
    (stable_hash64(key) >> (64 - leaf_bits)) as usize
}

/// A hash tree over a set of `(key, item hash)` pairs. See the module docs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MerkleTree {
    leaf_bits: u32,
    /// `levels[0]` is the root (one hash), the last level the leaves.
    levels: Vec<Vec<u64>>,
    /// Items in the tree.
    len: u64,
}

/// Why a tree could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MerkleError {
    #[error("leaf_bits must be a multiple of {FANOUT_BITS} between 0 and 24, not {leaf_bits}")]
    BadShape { leaf_bits: u32 },
}

impl MerkleTree {
    /// An empty tree with `2^leaf_bits` leaves.
    pub fn new(leaf_bits: u32) -> Result<Self, MerkleError> {
        if !leaf_bits.is_multiple_of(FANOUT_BITS) || leaf_bits > 24 {
            return Err(MerkleError::BadShape { leaf_bits });
        }
        let depth = (leaf_bits / FANOUT_BITS) as usize;
        let levels = (0..=depth)
            .map(|level| vec![0u64; 1 << (level as u32 * FANOUT_BITS)])
            .collect();
        let mut tree = MerkleTree {
            leaf_bits,
            levels,
            len: 0,
        };
        for level in (0..depth).rev() {
            for i in 0..tree.levels[level].len() {
                tree.levels[level][i] = tree.combine(level + 1, i);
            }
        }
        Ok(tree)
    }

    pub fn leaf_bits(&self) -> u32 {
        self.leaf_bits
    }

    /// Levels below the root.
    pub fn depth(&self) -> usize {
        self.levels.len() - 1
    }

    pub fn root(&self) -> u64 {
        self.levels[0][0]
    }

    /// Items in the tree.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Leaves holding at least one item (an empty leaf hashes to 0, and a
    /// full one to 0 only by a 2^-64 chance).
    pub fn occupied_leaves(&self) -> u64 {
        let leaves = self.levels.last().expect("a tree has a leaf level");
        leaves.iter().filter(|hash| **hash != 0).count() as u64
    }

    /// Records that `key` changed from `old` to `new` item hash (`None`:
    /// absent). Every write, delete, hint delivery and repair calls this.
    pub fn replace(&mut self, key: &[u8], old: Option<u64>, new: Option<u64>) {
        let delta = old.unwrap_or(0) ^ new.unwrap_or(0);
        match (old, new) {
            (None, Some(_)) => self.len += 1,
            (Some(_), None) => self.len = self.len.saturating_sub(1),
            _ => {}
        }
        if delta == 0 {
            return;
        }
        let depth = self.depth();
        let mut index = leaf_of(key, self.leaf_bits);
        self.levels[depth][index] ^= delta;
        for level in (0..depth).rev() {
            index >>= FANOUT_BITS;
            self.levels[level][index] = self.combine(level + 1, index);
        }
    }

    /// Folds in changes gathered apart from the tree: `leaf_xor[i]` is the
    /// XOR of the item hashes added to and removed from leaf `i`, and
    /// `len_change` the items added less those removed. A leaf is the XOR
    /// of its items, so the result is the tree the changes would give one
    /// by one, in any order relative to the tree's own items. Only the
    /// inner nodes above a changed leaf are hashed again.
    pub fn apply_leaf_changes(&mut self, leaf_xor: &[u64], len_change: i64) {
        let depth = self.depth();
        debug_assert_eq!(
            leaf_xor.len(),
            self.levels[depth].len(),
            "one delta per leaf"
        );
        let mut dirty: Vec<usize> = Vec::new();
        for (i, (leaf, xor)) in self.levels[depth].iter_mut().zip(leaf_xor).enumerate() {
            if *xor != 0 {
                *leaf ^= xor;
                dirty.push(i);
            }
        }
        for level in (0..depth).rev() {
            for index in &mut dirty {
                *index >>= FANOUT_BITS;
            }
            // Still ascending, so equal parents are neighbours.
            dirty.dedup();
            for &index in &dirty {
                self.levels[level][index] = self.combine(level + 1, index);
            }
        }
        self.len = self.len.checked_add_signed(len_change).unwrap_or_else(|| {
            debug_assert!(
                false,
                "{len_change} items folded into a tree of {}",
                self.len
            );
            0
        });
    }

    /// Adds a key that was absent.
    pub fn insert(&mut self, key: &[u8], item: u64) {
        self.replace(key, None, Some(item));
    }

    /// The hash of inner node `parent` from its children at `child_level`.
    fn combine(&self, child_level: usize, parent: usize) -> u64 {
        combine(&self.levels[child_level][parent * FANOUT..(parent + 1) * FANOUT])
    }

    /// The hashes of nodes `indexes` at `level` (what one side sends the
    /// other during a descent).
    pub fn level_hashes(&self, level: usize, indexes: &[usize]) -> Vec<u64> {
        indexes
            .iter()
            .map(|i| {
                self.levels
                    .get(level)
                    .and_then(|l| l.get(*i))
                    .copied()
                    .unwrap_or(0)
            })
            .collect()
    }

    /// Given the other side's hashes of the children of `parents` (at
    /// `level` + 1, [`FANOUT`] per parent, in order), the children whose
    /// hashes differ from ours: the next step down.
    pub fn differing_children(
        &self,
        level: usize,
        parents: &[usize],
        theirs: &[u64],
    ) -> Vec<usize> {
        let mut out = Vec::new();
        for (p, parent) in parents.iter().enumerate() {
            for c in 0..FANOUT {
                let child = parent * FANOUT + c;
                let mine = self.levels[level + 1][child];
                if theirs.get(p * FANOUT + c) != Some(&mine) {
                    out.push(child);
                }
            }
        }
        out
    }

    /// The children of `parents`, in order (the indexes whose hashes the
    /// other side is asked for).
    pub fn children_of(parents: &[usize]) -> Vec<usize> {
        parents
            .iter()
            .flat_map(|p| (p * FANOUT)..((p + 1) * FANOUT))
            .collect()
    }

    /// The leaves where `self` and `other` differ, found by descending only
    /// into differing branches. Both trees must have the same shape.
    pub fn differing_leaves(&self, other: &MerkleTree) -> Vec<usize> {
        assert_eq!(self.leaf_bits, other.leaf_bits, "trees of different shapes");
        if self.root() == other.root() {
            return Vec::new();
        }
        let mut frontier = vec![0usize];
        for level in 0..self.depth() {
            let children = MerkleTree::children_of(&frontier);
            let theirs = other.level_hashes(level + 1, &children);
            frontier = self.differing_children(level, &frontier, &theirs);
        }
        frontier
    }
}

/// The keys whose item hashes differ between two listings of the same
/// leaves, or that only one side has.
pub fn differing_keys(mine: &[(Vec<u8>, u64)], theirs: &[(Vec<u8>, u64)]) -> Vec<Vec<u8>> {
    let mut both: BTreeMap<&[u8], (Option<u64>, Option<u64>)> = BTreeMap::new();
    for (k, h) in mine {
        both.entry(k).or_default().0 = Some(*h);
    }
    for (k, h) in theirs {
        both.entry(k).or_default().1 = Some(*h);
    }
    both.into_iter()
        .filter(|(_, (a, b))| a != b)
        .map(|(k, _)| k.to_vec())
        .collect()
}

#[cfg(test)]
mod tests;
