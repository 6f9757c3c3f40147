//! The Merkle trees a replica keeps for anti-entropy (Dynamo §4.7): one per
//! peer, over exactly the keys both should hold.
//!
//! Two replicas must compare only keys they share, or every key one holds
//! and the other does not own would look like a difference. So node A keeps,
//! for each peer B, a [`MerkleTree`] over the keys whose preference list
//! holds both A and B, and B keeps the mirror tree for A. When both hold the
//! same versions of those keys the two trees are equal, whatever order the
//! writes came in.
//!
//! The trees change with every stored version: the replica calls
//! [`ReplicaTrees::changed`] (through [`ChangeObserver`]) under the key's
//! lock, with the old and new clock, so a key's updates reach its trees in
//! the order they reached the store. After a restart or a membership change
//! the trees are rebuilt from a scan of the store ([`ReplicaTrees::rebuild`]).
//!
//! Not yet done: the exchange between nodes, and wiring into the node.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use ringkv_core::dvv::Clock;
use ringkv_core::hash::stable_hash64;
use ringkv_core::wire::encode_clock;
use ringkv_core::NodeId;
use ringkv_ring::Ring;

use crate::merkle::{item_hash, MerkleError, MerkleTree};

/// A digest of a stored version that two replicas holding the same clock
/// agree on: clocks are canonical (entries sorted, values in dot order), so
/// equal clocks encode to equal bytes.
pub fn version_digest(clock: &Clock) -> u64 {
    stable_hash64(&encode_clock(clock))
}

/// Told of every change to a stored key, under the key's lock.
pub trait ChangeObserver: Send + Sync {
    fn changed(&self, key: &[u8], old: Option<&Clock>, new: &Clock);
}

/// One node's per-peer trees. See the module docs.
pub struct ReplicaTrees {
    me: NodeId,
    leaf_bits: u32,
    /// Held shared by every change and exclusively by a rebuild, so no
    /// change lands in trees a rebuild is about to replace.
    rebuild_lock: RwLock<()>,
    ring: RwLock<Arc<Ring>>,
    trees: RwLock<HashMap<NodeId, Mutex<MerkleTree>>>,
}

impl ReplicaTrees {
    /// Empty trees for `me`'s peers on `ring`: right only for an empty
    /// store. A node with data must [`rebuild`](Self::rebuild) from it
    /// before the first change is reported.
    pub fn new(me: NodeId, ring: Arc<Ring>, leaf_bits: u32) -> Result<Self, MerkleError> {
        MerkleTree::new(leaf_bits)?;
        let trees = ReplicaTrees {
            me,
            leaf_bits,
            rebuild_lock: RwLock::new(()),
            ring: RwLock::new(ring.clone()),
            trees: RwLock::new(HashMap::new()),
        };
        trees.rebuild(ring, std::iter::empty());
        Ok(trees)
    }

    /// The peers that hold `key` with this node (none if this node does not).
    fn sharing(&self, key: &[u8]) -> Vec<NodeId> {
        let ring = self.ring.read().unwrap_or_else(|p| p.into_inner()).clone();
        let replicas = ring.preference_list(key).replicas;
        if !replicas.contains(&self.me) {
            return Vec::new();
        }
        replicas.into_iter().filter(|n| *n != self.me).collect()
    }

    /// Replaces the ring and rebuilds every tree from `items`, the store's
    /// whole content. Keys this node does not replicate are skipped.
    ///
    /// Changes reported meanwhile wait for the rebuild (so none lands in
    /// trees about to be replaced), which blocks writes for its duration;
    /// the scan must not itself wait on the store's key locks. A rebuild
    /// that lets writes through (log and replay) comes with the node wiring.
    pub fn rebuild(&self, ring: Arc<Ring>, items: impl Iterator<Item = (Vec<u8>, Clock)>) {
        let _exclusive = self.rebuild_lock.write().unwrap_or_else(|p| p.into_inner());
        *self.ring.write().unwrap_or_else(|p| p.into_inner()) = ring;
        let mut fresh: HashMap<NodeId, MerkleTree> = HashMap::new();
        for (key, clock) in items {
            let item = item_hash(&key, version_digest(&clock));
            for peer in self.sharing(&key) {
                fresh
                    .entry(peer)
                    .or_insert_with(|| MerkleTree::new(self.leaf_bits).expect("shape checked"))
                    .insert(&key, item);
            }
        }
        *self.trees.write().unwrap_or_else(|p| p.into_inner()) = fresh
            .into_iter()
            .map(|(peer, tree)| (peer, Mutex::new(tree)))
            .collect();
    }

    /// A copy of the tree kept for `peer` (an empty one if no key is shared yet).
    pub fn tree_for(&self, peer: &NodeId) -> MerkleTree {
        let trees = self.trees.read().unwrap_or_else(|p| p.into_inner());
        match trees.get(peer) {
            Some(tree) => tree.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            None => MerkleTree::new(self.leaf_bits).expect("shape checked"),
        }
    }
}

impl ChangeObserver for ReplicaTrees {
    fn changed(&self, key: &[u8], old: Option<&Clock>, new: &Clock) {
        let _shared = self.rebuild_lock.read().unwrap_or_else(|p| p.into_inner());
        let peers = self.sharing(key);
        if peers.is_empty() {
            return;
        }
        let old = old.map(|c| item_hash(key, version_digest(c)));
        let new = Some(item_hash(key, version_digest(new)));
        for peer in peers {
            // A peer's first shared key creates its tree.
            if !self
                .trees
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .contains_key(&peer)
            {
                self.trees
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .entry(peer.clone())
                    .or_insert_with(|| {
                        Mutex::new(MerkleTree::new(self.leaf_bits).expect("shape checked"))
                    });
            }
            let trees = self.trees.read().unwrap_or_else(|p| p.into_inner());
            if let Some(tree) = trees.get(&peer) {
                tree.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .replace(key, old, new);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merkle::leaf_of;
    use crate::test_support::{n, write};

    fn ring(nodes: usize) -> Arc<Ring> {
        Arc::new(Ring::new((1..=nodes).map(|i| (n(&format!("n{i}")), 16)), 3).unwrap())
    }

    #[test]
    fn mirror_trees_agree_and_a_missed_write_shows_in_one_leaf() {
        let ring = ring(5);
        let trees: Vec<ReplicaTrees> = (1..=5)
            .map(|i| ReplicaTrees::new(n(&format!("n{i}")), ring.clone(), 8).unwrap())
            .collect();
        // Every replica of every key stores the same version.
        for k in 0..200 {
            let key = format!("k{k}").into_bytes();
            let clock = write("n1", &format!("v{k}"));
            for r in ring.preference_list(&key).replicas {
                let i: usize = r.as_str()[1..].parse().unwrap();
                trees[i - 1].changed(&key, None, &clock);
            }
        }
        for a in 0..5 {
            for b in 0..5 {
                if a != b {
                    let (na, nb) = (n(&format!("n{}", a + 1)), n(&format!("n{}", b + 1)));
                    assert_eq!(
                        trees[a].tree_for(&nb),
                        trees[b].tree_for(&na),
                        "n{} and n{} agree",
                        a + 1,
                        b + 1
                    );
                }
            }
        }
        // One replica misses an overwrite of one key.
        let key = b"k7".to_vec();
        let replicas = ring.preference_list(&key).replicas;
        let (old, new) = (write("n1", "v7"), write("n2", "w"));
        let mut merged = old.clone();
        merged.sync(&new);
        let idx = |r: &NodeId| r.as_str()[1..].parse::<usize>().unwrap() - 1;
        for r in &replicas[..2] {
            trees[idx(r)].changed(&key, Some(&old), &merged);
        }
        let (a, c) = (&replicas[0], &replicas[2]);
        let diff = trees[idx(a)]
            .tree_for(c)
            .differing_leaves(&trees[idx(c)].tree_for(a));
        assert_eq!(diff, [leaf_of(&key, 8)]);
        let (a, b) = (&replicas[0], &replicas[1]);
        assert!(trees[idx(a)]
            .tree_for(b)
            .differing_leaves(&trees[idx(b)].tree_for(a))
            .is_empty());
    }

    #[test]
    fn a_rebuild_equals_incremental_maintenance_and_skips_keys_not_replicated() {
        let ring = ring(5);
        let me = n("n1");
        let live = ReplicaTrees::new(me.clone(), ring.clone(), 8).unwrap();
        let mut store = Vec::new();
        for k in 0..300 {
            let key = format!("k{k}").into_bytes();
            let clock = write("n2", "v");
            live.changed(&key, None, &clock);
            store.push((key, clock));
        }
        let rebuilt = ReplicaTrees::new(me, ring.clone(), 8).unwrap();
        rebuilt.rebuild(ring, store.into_iter());
        for peer in ["n2", "n3", "n4", "n5"] {
            let tree = rebuilt.tree_for(&n(peer));
            assert_eq!(tree, live.tree_for(&n(peer)));
            assert!(!tree.is_empty() && tree.len() < 300, "only shared keys");
        }
    }
}
