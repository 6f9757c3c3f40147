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
//! the order they reached the store. After a restart or a change of
//! placement (see [`ReplicaTrees::is_current_for`]) the trees are rebuilt
//! from a scan of a store snapshot while writes go on
//! ([`ReplicaTrees::begin_rebuild`], [`build`](ReplicaTrees::build),
//! [`finish_rebuild`](ReplicaTrees::finish_rebuild)). The snapshot is taken
//! while no change is half done, and every change made after it is also
//! folded into the rebuild's *leaf deltas*: per peer, the XOR of the item
//! hashes each change adds to and removes from each leaf. A leaf's hash is
//! the XOR of its items, so the scanned trees with the deltas folded in are
//! exactly the trees of the store at the swap, in whatever order the scan
//! and the changes interleaved. The deltas cost one array of leaves per
//! peer, however many keys change during the scan: a long scan under heavy
//! writes finishes like a short one. Until the first rebuild is done the
//! trees are not [ready](ReplicaTrees::is_ready) and take no part in an
//! exchange.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};

use ringkv_core::dvv::Clock;
use ringkv_core::hash::stable_hash64;
use ringkv_core::long_wait::{self, LongWait};
use ringkv_core::wire::encode_clock;
use ringkv_core::NodeId;
use ringkv_ring::Ring;

use crate::merkle::{item_hash, leaf_of, MerkleError, MerkleTree};

/// A rebuild could not finish: none was under way for the scanned trees'
/// ring (it was abandoned, or begun for another placement).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no Merkle tree rebuild for this placement is under way (it was abandoned, or begun for another ring)")]
pub struct NoRebuildUnderWay;

/// A digest of a stored version that two replicas holding the same clock
/// agree on: clocks are canonical (entries sorted, values in dot order), so
/// equal clocks encode to equal bytes.
pub fn version_digest(clock: &Clock) -> u64 {
    stable_hash64(&encode_clock(clock))
}

/// Held by a replica from just before it stores a change until it has
/// reported it, so that a rebuild never takes its snapshot or swaps its
/// trees in while a change is stored but not yet reported (see
/// [`ReplicaTrees::begin_rebuild`] and [`ReplicaTrees::finish_rebuild`]).
pub struct ChangeGuard<'a>(#[allow(dead_code)] Option<RwLockReadGuard<'a, ()>>);

impl ChangeGuard<'_> {
    /// A guard that guards nothing, for observers without rebuilds.
    pub fn none() -> Self {
        ChangeGuard(None)
    }
}

/// Told of every change to a stored key, under the key's lock.
pub trait ChangeObserver: Send + Sync {
    /// Called before the store is written; the guard is dropped after
    /// [`changed`](Self::changed). Blocking for long (a rebuild waits for
    /// a change held up by a write stall) goes through `wait`.
    fn begin_change(&self, wait: LongWait<'_>) -> ChangeGuard<'_> {
        let _ = wait;
        ChangeGuard::none()
    }
    /// `new` is `None` when the key was removed (a collected tombstone).
    fn changed(&self, key: &[u8], old: Option<&Clock>, new: Option<&Clock>);
    /// The key's stored version, which did not decode, was set aside and
    /// the key removed. `digest` is the [`version_digest`] its stored bytes
    /// had (the one encoding of a clock, so what a tree built from a scan
    /// holds for them; one kept up to date since an earlier scan holds the
    /// digest of the bytes as written, and is left with a stale item, which
    /// only makes its leaf look different until the next rebuild). There
    /// is no clock to pass: that is the point.
    fn set_aside(&self, key: &[u8], digest: u64) {
        let _ = (key, digest);
    }
}

/// The changes made to one peer's keys since a rebuild's snapshot.
struct LeafDeltas {
    /// Per leaf, the XOR of the item hashes added and removed.
    xor: Vec<u64>,
    /// Items added less items removed.
    len_change: i64,
}

/// A rebuild under way: the placement it builds for, and the changes made
/// since its snapshot, folded by leaf per peer.
struct Building {
    ring: Arc<Ring>,
    deltas: HashMap<NodeId, LeafDeltas>,
}

/// Trees built from a scan, waiting for [`ReplicaTrees::finish_rebuild`].
pub struct FreshTrees {
    ring: Arc<Ring>,
    trees: HashMap<NodeId, MerkleTree>,
}

/// One node's per-peer trees. See the module docs.
pub struct ReplicaTrees {
    me: NodeId,
    leaf_bits: u32,
    /// Held shared by every change (from before its store write until it is
    /// reported) and exclusively while a rebuild takes its snapshot or swaps
    /// its trees in, so that no change is half done at either.
    rebuild_lock: RwLock<()>,
    ring: RwLock<Arc<Ring>>,
    trees: RwLock<HashMap<NodeId, Mutex<MerkleTree>>>,
    /// The rebuild under way, if any.
    building: Mutex<Option<Building>>,
    /// Whether the trees cover the whole store (false until the first
    /// rebuild finishes, and during any rebuild).
    ready: std::sync::atomic::AtomicBool,
    /// The tree of a peer with no shared key, built once.
    empty: MerkleTree,
}

impl ReplicaTrees {
    /// Empty trees for `me`'s peers on `ring`, not [ready](Self::is_ready)
    /// until a rebuild from the store finishes.
    pub fn new(me: NodeId, ring: Arc<Ring>, leaf_bits: u32) -> Result<Self, MerkleError> {
        let empty = MerkleTree::new(leaf_bits)?;
        Ok(ReplicaTrees {
            empty,
            me,
            leaf_bits,
            rebuild_lock: RwLock::new(()),
            ring: RwLock::new(ring),
            trees: RwLock::new(HashMap::new()),
            building: Mutex::new(None),
            ready: std::sync::atomic::AtomicBool::new(false),
        })
    }

    pub fn me(&self) -> &NodeId {
        &self.me
    }

    pub fn leaf_bits(&self) -> u32 {
        self.leaf_bits
    }

    /// Whether the trees cover every stored key, so an exchange may trust them.
    pub fn is_ready(&self) -> bool {
        self.ready.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The ring the trees are partitioned by.
    pub fn ring(&self) -> Arc<Ring> {
        self.ring.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Whether the trees are ready and partitioned as `ring` places keys,
    /// so a rebuild for it would change nothing. A new cluster record that
    /// only moves a member to another address gives such a ring; rebuilding
    /// would just take the trees out of service for the scan.
    pub fn is_current_for(&self, ring: &Ring) -> bool {
        self.is_ready() && *self.ring() == *ring
    }

    /// The peers that hold `key` with this node on `ring` (none if this node does not).
    fn sharing_on(&self, ring: &Ring, key: &[u8]) -> Vec<NodeId> {
        let replicas = ring.replicas_of(key);
        if !replicas.contains(&self.me) {
            return Vec::new();
        }
        replicas.into_iter().filter(|n| *n != self.me).collect()
    }

    /// Whether this node and `peer` both replicate `key` on the current ring.
    pub fn shares_with(&self, key: &[u8], peer: &NodeId) -> bool {
        self.sharing_on(&self.ring(), key).contains(peer)
    }

    /// Every other node on the ring (the peers an exchange round visits).
    pub fn peers(&self) -> Vec<NodeId> {
        self.ring()
            .nodes()
            .into_iter()
            .filter(|n| *n != self.me)
            .collect()
    }

    /// Starts a rebuild for `ring`: takes the trees out of service, calls
    /// `snapshot` (to take the store snapshot the scan will read) while no
    /// change is half done, and from then on folds every change into the
    /// rebuild's leaf deltas. Returns what `snapshot` returned.
    pub fn begin_rebuild<S>(&self, ring: Arc<Ring>, snapshot: impl FnOnce() -> S) -> S {
        let _exclusive = self.rebuild_lock.write().unwrap_or_else(|p| p.into_inner());
        self.ready
            .store(false, std::sync::atomic::Ordering::Release);
        *self.building.lock().unwrap_or_else(|p| p.into_inner()) = Some(Building {
            ring,
            deltas: HashMap::new(),
        });
        snapshot()
    }

    /// Builds trees for `ring` from `(key, version digest)` pairs: the
    /// scan of a store snapshot. Keys this node does not replicate are
    /// skipped. Takes no lock; writes go on meanwhile.
    pub fn build(
        &self,
        ring: Arc<Ring>,
        items: impl Iterator<Item = (Vec<u8>, u64)>,
    ) -> FreshTrees {
        let mut trees: HashMap<NodeId, MerkleTree> = HashMap::new();
        for (key, digest) in items {
            let item = item_hash(&key, digest);
            for peer in self.sharing_on(&ring, &key) {
                trees
                    .entry(peer)
                    .or_insert_with(|| self.empty.clone())
                    .insert(&key, item);
            }
        }
        FreshTrees { ring, trees }
    }

    /// Swaps `fresh` in, the scan of the snapshot taken by
    /// [`begin_rebuild`](Self::begin_rebuild), with every change made since
    /// the snapshot folded in.
    ///
    /// Changes must wait while the trees are swapped, so that none is half
    /// done ([`ChangeGuard`]). So the deltas are folded in twice: those
    /// gathered during the scan with writes going on, then, with writes
    /// waiting, only those made during that first fold.
    ///
    /// Fails if no rebuild for `fresh`'s ring is under way; it then
    /// installs nothing and ends any other rebuild, which the trees that
    /// were to finish it do not belong to.
    pub fn finish_rebuild(&self, mut fresh: FreshTrees) -> Result<(), NoRebuildUnderWay> {
        let finished = self
            .fold_deltas_so_far(&mut fresh)
            .and_then(|()| self.swap_in(fresh));
        if finished.is_err() {
            self.abandon_rebuild();
        }
        finished
    }

    /// The first step of [`finish_rebuild`](Self::finish_rebuild): folds
    /// the deltas gathered so far into `fresh`, with writes going on.
    fn fold_deltas_so_far(&self, fresh: &mut FreshTrees) -> Result<(), NoRebuildUnderWay> {
        let so_far = match self
            .building
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
        {
            Some(building) if *building.ring == *fresh.ring => std::mem::take(&mut building.deltas),
            _ => return Err(NoRebuildUnderWay),
        };
        self.fold(fresh, so_far);
        Ok(())
    }

    /// The last step of [`finish_rebuild`](Self::finish_rebuild): with
    /// writes waiting, folds the deltas gathered since the first step into
    /// `fresh` and installs it.
    fn swap_in(&self, mut fresh: FreshTrees) -> Result<(), NoRebuildUnderWay> {
        let _exclusive = self.rebuild_lock.write().unwrap_or_else(|p| p.into_inner());
        let building = {
            let mut building = self.building.lock().unwrap_or_else(|p| p.into_inner());
            match building.take() {
                Some(b) if *b.ring == *fresh.ring => b,
                other => {
                    *building = other;
                    return Err(NoRebuildUnderWay);
                }
            }
        };
        self.fold(&mut fresh, building.deltas);
        self.install(fresh);
        Ok(())
    }

    /// Folds leaf deltas into scanned trees.
    fn fold(&self, fresh: &mut FreshTrees, deltas: HashMap<NodeId, LeafDeltas>) {
        for (peer, delta) in deltas {
            fresh
                .trees
                .entry(peer)
                .or_insert_with(|| self.empty.clone())
                .apply_leaf_changes(&delta.xor, delta.len_change);
        }
    }

    /// Abandons a rebuild (its scan failed); the trees stay not ready.
    pub fn abandon_rebuild(&self) {
        let building = {
            let _exclusive = self.rebuild_lock.write().unwrap_or_else(|p| p.into_inner());
            self.building
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take()
        };
        // Writes go on before the deltas are freed.
        drop(building);
    }

    /// Rebuilds from `items`, the store's whole content, with changes
    /// waiting throughout: for stores that cannot take a snapshot (the
    /// in-memory one of tests and the simulator).
    pub fn rebuild(&self, ring: Arc<Ring>, items: impl Iterator<Item = (Vec<u8>, Clock)>) {
        let _exclusive = self.rebuild_lock.write().unwrap_or_else(|p| p.into_inner());
        let fresh = self.build(ring, items.map(|(k, c)| (k, version_digest(&c))));
        self.install(fresh);
    }

    /// Puts `fresh` in place and marks the trees ready. The caller holds
    /// `rebuild_lock` exclusively.
    fn install(&self, fresh: FreshTrees) {
        *self.ring.write().unwrap_or_else(|p| p.into_inner()) = fresh.ring;
        *self.trees.write().unwrap_or_else(|p| p.into_inner()) = fresh
            .trees
            .into_iter()
            .map(|(peer, tree)| (peer, Mutex::new(tree)))
            .collect();
        self.ready.store(true, std::sync::atomic::Ordering::Release);
    }

    /// A copy of the tree kept for `peer` (an empty one if no key is shared yet).
    pub fn tree_for(&self, peer: &NodeId) -> MerkleTree {
        let trees = self.trees.read().unwrap_or_else(|p| p.into_inner());
        match trees.get(peer) {
            Some(tree) => tree.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            None => self.empty.clone(),
        }
    }

    /// The hashes of `indexes` at `level` of `peer`'s tree, without copying it.
    pub fn hashes(&self, peer: &NodeId, level: usize, indexes: &[usize]) -> Vec<u64> {
        let trees = self.trees.read().unwrap_or_else(|p| p.into_inner());
        match trees.get(peer) {
            Some(tree) => tree
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .level_hashes(level, indexes),
            None => self.empty.level_hashes(level, indexes),
        }
    }

    /// Keys in `peer`'s tree, and the leaves they occupy.
    pub fn shared_keys_and_leaves(&self, peer: &NodeId) -> (u64, u64) {
        let trees = self.trees.read().unwrap_or_else(|p| p.into_inner());
        trees.get(peer).map_or((0, 0), |t| {
            let tree = t.lock().unwrap_or_else(|p| p.into_inner());
            (tree.len(), tree.occupied_leaves())
        })
    }

    /// Folds a change into the rebuild under way, if any. `old` and `new`
    /// are item hashes.
    fn fold_into_rebuild(&self, key: &[u8], old: Option<u64>, new: Option<u64>) {
        let xor = old.unwrap_or(0) ^ new.unwrap_or(0);
        let len_change = i64::from(new.is_some()) - i64::from(old.is_some());
        if xor == 0 && len_change == 0 {
            return;
        }
        let mut building = self.building.lock().unwrap_or_else(|p| p.into_inner());
        let Some(building) = building.as_mut() else {
            return;
        };
        let leaf = leaf_of(key, self.leaf_bits);
        for peer in self.sharing_on(&building.ring, key) {
            let delta = building.deltas.entry(peer).or_insert_with(|| LeafDeltas {
                xor: vec![0; 1 << self.leaf_bits],
                len_change: 0,
            });
            delta.xor[leaf] ^= xor;
            delta.len_change += len_change;
        }
    }

    /// Peers whose leaf deltas the rebuild under way holds (tests).
    #[cfg(test)]
    fn peers_with_deltas(&self) -> usize {
        self.building
            .lock()
            .unwrap()
            .as_ref()
            .map_or(0, |b| b.deltas.len())
    }
}

impl ChangeObserver for ReplicaTrees {
    fn begin_change(&self, wait: LongWait<'_>) -> ChangeGuard<'_> {
        // A rebuild waiting for a change under way (a write that may be
        // stalled) bars new ones: wait for it the long way.
        ChangeGuard(Some(long_wait::read(&self.rebuild_lock, wait)))
    }

    fn changed(&self, key: &[u8], old: Option<&Clock>, new: Option<&Clock>) {
        let old = old.map(|c| item_hash(key, version_digest(c)));
        let new = new.map(|c| item_hash(key, version_digest(c)));
        self.replace_item(key, old, new);
    }

    fn set_aside(&self, key: &[u8], digest: u64) {
        self.replace_item(key, Some(item_hash(key, digest)), None);
    }
}

impl ReplicaTrees {
    /// Replaces `key`'s item hash `old` by `new` (`None`: no item) in the
    /// trees of the peers that share the key, and in the rebuild under way.
    fn replace_item(&self, key: &[u8], old: Option<u64>, new: Option<u64>) {
        self.fold_into_rebuild(key, old, new);
        let peers = self.sharing_on(&self.ring(), key);
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
                    .or_insert_with(|| Mutex::new(self.empty.clone()));
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
    use std::collections::BTreeMap;

    use super::*;
    use crate::test_support::{n, write};

    fn ring(nodes: usize) -> Arc<Ring> {
        Arc::new(Ring::new((1..=nodes).map(|i| (n(&format!("n{i}")), 16)), 3).unwrap())
    }

    #[test]
    fn trees_are_current_only_once_ready_and_for_the_same_placement() {
        let trees = ReplicaTrees::new(n("n1"), ring(5), crate::merkle::DEFAULT_LEAF_BITS).unwrap();
        assert!(
            !trees.is_current_for(&ring(5)),
            "not ready before a rebuild"
        );
        trees.rebuild(ring(5), std::iter::empty());
        assert!(trees.is_current_for(&ring(5)), "an equal ring, built anew");
        assert!(!trees.is_current_for(&ring(4)));
        trees.begin_rebuild(ring(5), || {
            assert!(
                trees.rebuild_lock.try_read().is_err(),
                "no change can be under way while the snapshot is taken"
            );
        });
        assert!(!trees.is_current_for(&ring(5)), "a rebuild under way");
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
            for r in ring.replicas_of(&key) {
                let i: usize = r.as_str()[1..].parse().unwrap();
                trees[i - 1].changed(&key, None, Some(&clock));
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
        let replicas = ring.replicas_of(&key);
        let (old, new) = (write("n1", "v7"), write("n2", "w"));
        let mut merged = old.clone();
        merged.sync(&new);
        let idx = |r: &NodeId| r.as_str()[1..].parse::<usize>().unwrap() - 1;
        for r in &replicas[..2] {
            trees[idx(r)].changed(&key, Some(&old), Some(&merged));
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

    /// Stores `value` (`None`: removes) under `key` in `store` and reports
    /// it to `trees` under a change guard, as a replica does.
    fn store_and_report(
        trees: &ReplicaTrees,
        store: &Mutex<BTreeMap<Vec<u8>, Clock>>,
        key: &[u8],
        value: Option<Clock>,
    ) {
        let _guard = trees.begin_change(&|wait| wait());
        let mut store = store.lock().unwrap();
        let old = match &value {
            Some(clock) => store.insert(key.to_vec(), clock.clone()),
            None => store.remove(key),
        };
        trees.changed(key, old.as_ref(), value.as_ref());
    }

    /// Trees built from scratch from `store` on `ring`.
    fn from_scratch(ring: &Arc<Ring>, store: &Mutex<BTreeMap<Vec<u8>, Clock>>) -> ReplicaTrees {
        let trees = ReplicaTrees::new(n("n1"), ring.clone(), 8).unwrap();
        trees.rebuild(ring.clone(), store.lock().unwrap().clone().into_iter());
        trees
    }

    proptest::proptest! {
        /// Writes and removals interleaved anywhere with the scan of the
        /// snapshot, or made after it: the rebuilt trees equal trees built
        /// from the final store, for the same placement or a new one.
        #[test]
        fn a_rebuild_under_writes_equals_one_of_the_final_store(
            initial in proptest::collection::btree_map(0u8..40, 0u8..4, 0..40),
            // (scanned items before the change, key, new version or removal)
            changes in proptest::collection::vec((0usize..48, 0u8..40, proptest::option::of(0u8..4)), 0..120),
            nodes_after in proptest::sample::select(vec![4usize, 5]),
        ) {
            let key = |k: u8| format!("k{k:02}").into_bytes();
            let version = |v: u8| write("n2", &format!("v{v}"));
            let trees = ReplicaTrees::new(n("n1"), ring(5), 8).unwrap();
            let store: Mutex<BTreeMap<Vec<u8>, Clock>> = Mutex::new(BTreeMap::new());
            for (k, v) in &initial {
                store_and_report(&trees, &store, &key(*k), Some(version(*v)));
            }
            let target = ring(nodes_after);
            let snapshot = trees.begin_rebuild(target.clone(), || store.lock().unwrap().clone());
            let mut changes = changes;
            changes.sort_by_key(|(at, _, _)| *at);
            let mut changes = changes.into_iter().peekable();
            let items = snapshot.iter().enumerate().map(|(scanned, (k, clock))| {
                while let Some((_, k, v)) = changes.next_if(|(at, _, _)| *at <= scanned) {
                    store_and_report(&trees, &store, &key(k), v.map(version));
                }
                (k.clone(), version_digest(clock))
            });
            let fresh = trees.build(target.clone(), items);
            for (_, k, v) in changes {
                store_and_report(&trees, &store, &key(k), v.map(version));
            }
            trees.finish_rebuild(fresh).unwrap();
            proptest::prop_assert!(trees.is_ready());
            let expected = from_scratch(&target, &store);
            for peer in target.nodes() {
                proptest::prop_assert_eq!(trees.tree_for(&peer), expected.tree_for(&peer));
            }
        }
    }

    /// A version set aside as corrupt leaves the trees by its stored
    /// bytes' digest (there is no clock), as if the key had been removed:
    /// with a rebuild under way too, the result equals trees built from
    /// the store without the key.
    #[test]
    fn a_version_set_aside_leaves_the_trees_as_a_removal_does() {
        let ring = ring(3);
        let store: Mutex<BTreeMap<Vec<u8>, Clock>> = Mutex::new(BTreeMap::new());
        let trees = from_scratch(&ring, &store);
        for k in ["a", "b", "c"] {
            store_and_report(&trees, &store, k.as_bytes(), Some(write("n2", k)));
        }
        let snapshot = trees.begin_rebuild(ring.clone(), || store.lock().unwrap().clone());
        let fresh = trees.build(
            ring.clone(),
            snapshot.iter().map(|(k, c)| (k.clone(), version_digest(c))),
        );
        let gone = store.lock().unwrap().remove(&b"b"[..]).unwrap();
        trees.set_aside(b"b", version_digest(&gone));
        trees.finish_rebuild(fresh).unwrap();
        let expected = from_scratch(&ring, &store);
        for peer in ring.nodes().into_iter().filter(|p| *p != n("n1")) {
            assert_eq!(trees.tree_for(&peer), expected.tree_for(&peer), "{peer}");
        }
    }

    /// However many distinct keys change during the scan, the rebuild keeps
    /// one array of leaf deltas per peer, and finishes.
    #[test]
    fn a_scan_overlapping_many_changed_keys_keeps_one_delta_per_peer_and_finishes() {
        let ring = ring(3);
        let trees = ReplicaTrees::new(n("n1"), ring.clone(), 8).unwrap();
        let store: Mutex<BTreeMap<Vec<u8>, Clock>> = Mutex::new(BTreeMap::new());
        let snapshot = trees.begin_rebuild(ring.clone(), || store.lock().unwrap().clone());
        let fresh = trees.build(
            ring.clone(),
            snapshot.iter().map(|(k, c)| (k.clone(), version_digest(c))),
        );
        for k in 0..20_000 {
            let value = write("n2", &format!("v{k}"));
            store_and_report(&trees, &store, format!("k{k:05}").as_bytes(), Some(value));
        }
        assert_eq!(trees.peers_with_deltas(), 2, "n2 and n3");
        trees.finish_rebuild(fresh).unwrap();
        assert_eq!(trees.peers_with_deltas(), 0);
        let expected = from_scratch(&ring, &store);
        for peer in ["n2", "n3"] {
            let tree = trees.tree_for(&n(peer));
            assert_eq!(tree.len(), 20_000, "every key is on all three nodes");
            assert_eq!(tree, expected.tree_for(&n(peer)));
        }
    }

    /// Writes made while the finish folds the scan's deltas in, before it
    /// swaps the trees, are folded in at the swap.
    #[test]
    fn writes_during_the_finish_are_folded_in_at_the_swap() {
        let ring = ring(3);
        let trees = ReplicaTrees::new(n("n1"), ring.clone(), 8).unwrap();
        let store: Mutex<BTreeMap<Vec<u8>, Clock>> = Mutex::new(BTreeMap::new());
        let key = |k: usize| format!("k{k:03}").into_bytes();
        for k in 0..100 {
            store_and_report(&trees, &store, &key(k), Some(write("n2", "v0")));
        }
        let snapshot = trees.begin_rebuild(ring.clone(), || store.lock().unwrap().clone());
        let mut fresh = trees.build(
            ring.clone(),
            snapshot.iter().map(|(k, c)| (k.clone(), version_digest(c))),
        );
        for k in 0..50 {
            store_and_report(&trees, &store, &key(k), Some(write("n2", "v1")));
        }
        trees.fold_deltas_so_far(&mut fresh).unwrap();
        for k in 25..75 {
            let value = (k % 2 == 0).then(|| write("n2", "v2"));
            store_and_report(&trees, &store, &key(k), value);
        }
        trees.swap_in(fresh).unwrap();
        let expected = from_scratch(&ring, &store);
        for peer in ["n2", "n3"] {
            assert_eq!(trees.tree_for(&n(peer)), expected.tree_for(&n(peer)));
        }
    }

    /// A rebuild abandoned, or finished with trees for another placement
    /// than it began with, installs nothing, leaves the trees not ready and
    /// folds no more changes.
    #[test]
    fn a_rebuild_abandoned_or_for_another_ring_installs_nothing() {
        let trees = ReplicaTrees::new(n("n1"), ring(3), 8).unwrap();
        let store: Mutex<BTreeMap<Vec<u8>, Clock>> = Mutex::new(BTreeMap::new());
        let change = |k: &str| store_and_report(&trees, &store, k.as_bytes(), Some(write("n2", k)));

        trees.begin_rebuild(ring(3), || ());
        let fresh = trees.build(ring(4), std::iter::empty());
        assert_eq!(trees.finish_rebuild(fresh), Err(NoRebuildUnderWay));
        assert!(!trees.is_ready());
        change("a");
        assert_eq!(trees.peers_with_deltas(), 0, "the failed finish ended it");

        trees.begin_rebuild(ring(3), || ());
        let fresh = trees.build(ring(3), std::iter::empty());
        trees.abandon_rebuild();
        change("b");
        assert_eq!(trees.peers_with_deltas(), 0, "no rebuild under way");
        assert_eq!(trees.finish_rebuild(fresh), Err(NoRebuildUnderWay));
        assert!(!trees.is_ready());

        // Another rebuild began between the two folds: the swap refuses
        // the first one's trees and leaves the other under way.
        trees.begin_rebuild(ring(3), || ());
        let mut fresh = trees.build(ring(3), std::iter::empty());
        trees.fold_deltas_so_far(&mut fresh).unwrap();
        trees.begin_rebuild(ring(4), || ());
        assert_eq!(trees.swap_in(fresh), Err(NoRebuildUnderWay));
        assert!(!trees.is_ready());
        let under_way = trees
            .building
            .lock()
            .unwrap()
            .as_ref()
            .map(|b| b.ring.clone());
        assert_eq!(under_way, Some(ring(4)), "the other rebuild goes on");
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
            live.changed(&key, None, Some(&clock));
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
