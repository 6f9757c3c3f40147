use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use super::*;

type Items = BTreeMap<Vec<u8>, u64>;

fn build(items: &Items, leaf_bits: u32) -> MerkleTree {
    let mut t = MerkleTree::new(leaf_bits).unwrap();
    for (k, v) in items {
        t.insert(k, item_hash(k, *v));
    }
    t
}

/// What one side lists for the given leaves.
fn listing(items: &Items, leaves: &BTreeSet<usize>, leaf_bits: u32) -> Vec<(Vec<u8>, u64)> {
    items
        .iter()
        .filter(|(k, _)| leaves.contains(&leaf_of(k, leaf_bits)))
        .map(|(k, v)| (k.clone(), item_hash(k, *v)))
        .collect()
}

/// The whole exchange between two sides, as the network runs it.
fn exchange(a: &Items, b: &Items, leaf_bits: u32) -> BTreeSet<Vec<u8>> {
    let (ta, tb) = (build(a, leaf_bits), build(b, leaf_bits));
    let leaves: BTreeSet<usize> = ta.differing_leaves(&tb).into_iter().collect();
    differing_keys(
        &listing(a, &leaves, leaf_bits),
        &listing(b, &leaves, leaf_bits),
    )
    .into_iter()
    .collect()
}

fn truth(a: &Items, b: &Items) -> BTreeSet<Vec<u8>> {
    a.keys()
        .chain(b.keys())
        .filter(|k| a.get(*k) != b.get(*k))
        .cloned()
        .collect()
}

#[test]
fn shapes_are_checked() {
    assert!(MerkleTree::new(16).is_ok());
    assert_eq!(
        MerkleTree::new(6),
        Err(MerkleError::BadShape { leaf_bits: 6 })
    );
    assert!(MerkleTree::new(28).is_err());
    let t = MerkleTree::new(8).unwrap();
    assert_eq!(t.depth(), 2);
    assert_eq!(t, MerkleTree::new(8).unwrap(), "empty trees are equal");
}

/// The hashes as first defined, fed to a streaming hasher piece by piece:
/// nodes compare trees, so the fast forms must give exactly these.
fn item_hash_streamed(key: &[u8], version: u64) -> u64 {
    let mut h = StableHasher::default();
    h.write(&(key.len() as u64).to_le_bytes());
    h.write(key);
    h.write(&version.to_le_bytes());
    h.finish() | 1
}

fn combine_streamed(children: &[u64]) -> u64 {
    let mut h = StableHasher::default();
    for c in children {
        h.write(&c.to_le_bytes());
    }
    h.finish()
}

#[test]
fn the_hashes_are_those_of_their_streamed_definition() {
    for len in 0..600usize {
        let key: Vec<u8> = (0..len).map(|i| (i * 31 + len) as u8).collect();
        let version = 0x0123_4567_89ab_cdef ^ len as u64;
        assert_eq!(
            item_hash(&key, version),
            item_hash_streamed(&key, version),
            "{len}"
        );
    }
    let children: Vec<u64> = (0..FANOUT as u64)
        .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15))
        .collect();
    assert_eq!(combine(&children), combine_streamed(&children));
    assert_eq!(combine(&[0; FANOUT]), combine_streamed(&[0; FANOUT]));
}

#[test]
fn identical_sets_need_no_descent_and_one_change_opens_one_leaf() {
    let items: Items = (0..1000u32)
        .map(|i| (format!("k{i}").into_bytes(), u64::from(i)))
        .collect();
    let a = build(&items, 16);
    let mut b = build(&items, 16);
    assert_eq!(a.root(), b.root());
    assert!(a.differing_leaves(&b).is_empty());
    b.replace(b"k7", Some(item_hash(b"k7", 7)), Some(item_hash(b"k7", 8)));
    assert_eq!(a.differing_leaves(&b), [leaf_of(b"k7", 16)]);
    b.replace(b"k7", Some(item_hash(b"k7", 8)), Some(item_hash(b"k7", 7)));
    assert_eq!(a, b, "undoing the change restores the tree exactly");
}

fn items(universe: u8) -> impl Strategy<Value = Items> {
    prop::collection::btree_map(
        (0..universe).prop_map(|k| vec![k]),
        0u64..3,
        0..universe as usize,
    )
}

proptest! {
    /// Merkle diff finds exactly the differing keys (issue 4, acceptance 4),
    /// with few leaves so that many keys share one.
    #[test]
    fn the_diff_finds_exactly_the_differing_keys(a in items(64), b in items(64), bits in prop::sample::select(vec![0u32, 4, 8])) {
        prop_assert_eq!(exchange(&a, &b, bits), truth(&a, &b));
    }

    /// A tree maintained incrementally through any sequence of writes equals
    /// one built from scratch from the final state.
    #[test]
    fn incremental_updates_match_a_rebuild(ops in prop::collection::vec((0u8..32, prop::option::of(0u64..4)), 0..200)) {
        let mut state: Items = BTreeMap::new();
        let mut tree = MerkleTree::new(8).unwrap();
        for (k, v) in ops {
            let key = vec![k];
            let old = state.get(&key).map(|o| item_hash(&key, *o));
            let new = v.map(|v| item_hash(&key, v));
            tree.replace(&key, old, new);
            match v {
                Some(v) => { state.insert(key, v); }
                None => { state.remove(&key); }
            }
        }
        prop_assert_eq!(&tree, &build(&state, 8));
        prop_assert_eq!(tree.len(), state.len() as u64);
    }

    /// A snapshot's tree with the later writes folded in as leaf deltas
    /// (what a rebuild does) equals one built from the final state, with
    /// any number of leaves, and whichever writes fall on keys the
    /// snapshot held.
    #[test]
    fn leaf_deltas_folded_into_a_snapshot_match_a_rebuild(
        snapshot in items(32),
        ops in prop::collection::vec((0u8..32, prop::option::of(0u64..4)), 0..200),
        bits in prop::sample::select(vec![0u32, 4, 8]),
    ) {
        let mut tree = build(&snapshot, bits);
        let mut state = snapshot;
        let mut xor = vec![0u64; 1 << bits];
        let mut len_change = 0i64;
        for (k, v) in ops {
            let key = vec![k];
            let old = state.get(&key).map(|o| item_hash(&key, *o));
            let new = v.map(|v| item_hash(&key, v));
            xor[leaf_of(&key, bits)] ^= old.unwrap_or(0) ^ new.unwrap_or(0);
            len_change += i64::from(new.is_some()) - i64::from(old.is_some());
            match v {
                Some(v) => { state.insert(key, v); }
                None => { state.remove(&key); }
            }
        }
        tree.apply_leaf_changes(&xor, len_change);
        prop_assert_eq!(&tree, &build(&state, bits));
        prop_assert_eq!(tree.len(), state.len() as u64);
    }
}
