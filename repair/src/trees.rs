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
//! [`finish_rebuild`](ReplicaTrees::finish_rebuild)): keys changed during the
//! scan are remembered, and corrected from the snapshot's and the current
//! version when the new trees are swapped in. Until the first rebuild is done
//! the trees are not [ready](ReplicaTrees::is_ready) and take no part in an
//! exchange.
//!
//! Remembering changed keys costs memory in proportion to the distinct keys
//! written while the scan runs, so it is capped
//! ([`DEFAULT_TOUCHED_MAX_BYTES`]): a rebuild that would remember more stops
//! remembering at the cap, is marked overrun ([`ReplicaTrees::is_overrun`],
//! so the scan can stop early), and its finish fails with
//! [`RebuildOverrun`]; the caller may try again later.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use ringkv_core::dvv::Clock;
use ringkv_core::hash::stable_hash64;
use ringkv_core::wire::encode_clock;
use ringkv_core::NodeId;
use ringkv_ring::Ring;

use crate::merkle::{item_hash, MerkleError, MerkleTree};

/// How many bytes of changed keys a rebuild may remember while it scans:
/// about a million keys of 30 bytes. A scan that overlaps more writes than
/// that is abandoned and retried rather than allowed to grow without bound.
pub const DEFAULT_TOUCHED_MAX_BYTES: usize = 64 * 1024 * 1024;

/// What remembering one changed key costs besides its bytes (the set's
/// slot and the `Vec` header), so that many short keys count too.
const TOUCHED_KEY_OVERHEAD_BYTES: usize = 48;

/// Changed keys a rebuild corrects while writes wait, at most (unless its
/// catch-up rounds run out): see [`ReplicaTrees::finish_rebuild`].
pub const SWAP_KEYS_MAX: usize = 1024;
/// Rounds of correcting changed keys with writes going on, at most, before
/// the rest is corrected while they wait: under writes faster than the
/// corrections, rounds would not shrink.
const CATCH_UP_ROUNDS_MAX: usize = 8;

/// A rebuild abandoned because more keys changed during its scan than it
/// may remember.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "at least {changed_keys} keys changed during the Merkle tree rebuild, more than \
     the {max_bytes} bytes of keys it may remember"
)]
pub struct RebuildOverrun {
    pub changed_keys: usize,
    pub max_bytes: usize,
}

/// The keys changed since a rebuild began, as far as it remembers them.
enum Touched {
    /// No rebuild under way.
    Idle,
    /// A rebuild under way: the keys changed so far and what they cost.
    Recording {
        keys: HashSet<Vec<u8>>,
        bytes: usize,
    },
    /// Past the cap (when `changed_keys` distinct keys had changed): no
    /// more keys are remembered and the rebuild cannot finish. The keys
    /// already remembered are kept (bounded by the cap) until the rebuild
    /// ends, to be freed by the rebuild's thread outside the locks: freeing
    /// a million keys here would stall the write that passed the cap.
    Overrun {
        changed_keys: usize,
        remembered: HashSet<Vec<u8>>,
    },
}

/// A digest of a stored version that two replicas holding the same clock
/// agree on: clocks are canonical (entries sorted, values in dot order), so
/// equal clocks encode to equal bytes.
pub fn version_digest(clock: &Clock) -> u64 {
    stable_hash64(&encode_clock(clock))
}

/// Held by a replica from just before it stores a change until it has
/// reported it, so that a rebuild never sees a change stored but not yet
/// reported (see [`ReplicaTrees::finish_rebuild`]).
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
    /// [`changed`](Self::changed).
    fn begin_change(&self) -> ChangeGuard<'_> {
        ChangeGuard::none()
    }
    /// `new` is `None` when the key was removed (a collected tombstone).
    fn changed(&self, key: &[u8], old: Option<&Clock>, new: Option<&Clock>);
}

/// Ends the record of changed keys when dropped armed: a catch-up round of
/// [`ReplicaTrees::finish_rebuild`] that fails or unwinds must not leave
/// writes recording for a rebuild that will not finish.
struct StopRecordingOnDrop<'a> {
    trees: &'a ReplicaTrees,
    armed: bool,
}

impl Drop for StopRecordingOnDrop<'_> {
    fn drop(&mut self) {
        if self.armed {
            let touched = std::mem::replace(
                &mut *self.trees.touched.lock().unwrap_or_else(|p| p.into_inner()),
                Touched::Idle,
            );
            drop(touched);
        }
    }
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
    /// reported) and exclusively while a rebuild swaps its trees in.
    rebuild_lock: RwLock<()>,
    ring: RwLock<Arc<Ring>>,
    trees: RwLock<HashMap<NodeId, Mutex<MerkleTree>>>,
    /// While a rebuild scans: the keys changed since it began.
    touched: Mutex<Touched>,
    /// The most bytes of changed keys one rebuild remembers.
    touched_max_bytes: usize,
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
            touched: Mutex::new(Touched::Idle),
            touched_max_bytes: DEFAULT_TOUCHED_MAX_BYTES,
            ready: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Caps the bytes of changed keys a rebuild remembers (default
    /// [`DEFAULT_TOUCHED_MAX_BYTES`]).
    pub fn with_touched_max_bytes(mut self, max_bytes: usize) -> Self {
        self.touched_max_bytes = max_bytes;
        self
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

    /// Starts a rebuild: from now on, changed keys are remembered so that
    /// [`finish_rebuild`](Self::finish_rebuild) can correct what the scan saw.
    /// Call before taking the store snapshot the scan reads.
    pub fn begin_rebuild(&self) {
        let _exclusive = self.rebuild_lock.write().unwrap_or_else(|p| p.into_inner());
        self.ready
            .store(false, std::sync::atomic::Ordering::Release);
        *self.touched.lock().unwrap_or_else(|p| p.into_inner()) = Touched::Recording {
            keys: HashSet::new(),
            bytes: 0,
        };
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

    /// Swaps `fresh` in, after correcting every key changed since
    /// [`begin_rebuild`](Self::begin_rebuild): `versions(key)` returns the
    /// key's digest in the scanned snapshot and its digest now.
    ///
    /// Changes must wait while the last keys are corrected and the trees
    /// swapped, so that none is half done ([`ChangeGuard`]). A long scan
    /// under heavy writes can leave hundreds of thousands of changed keys,
    /// whose two reads each would stall every write for seconds; so while
    /// more than [`SWAP_KEYS_MAX`] changed, they are corrected with writes
    /// going on, the changes meanwhile recorded for the next round (each
    /// key from the digest the fresh trees hold for it by then), and only
    /// the last few under the exclusive hold.
    ///
    /// If `versions` fails the rebuild is abandoned (the trees stay not
    /// ready) and the error returned: a guessed version would corrupt a tree.
    /// So it is if more keys changed than it could remember
    /// ([`RebuildOverrun`]).
    pub fn finish_rebuild<E: From<RebuildOverrun>>(
        &self,
        mut fresh: FreshTrees,
        versions: impl Fn(&[u8]) -> Result<(Option<u64>, Option<u64>), E>,
    ) -> Result<(), E> {
        // The digest the fresh trees hold for each key corrected in an
        // earlier round, and what those keys cost to remember.
        let mut applied: HashMap<Vec<u8>, Option<u64>> = HashMap::new();
        let mut applied_bytes = 0;
        for round in 0.. {
            let (exclusive, touched) = self.end_touched();
            let keys = match touched {
                Touched::Recording { keys, .. } => keys,
                Touched::Overrun {
                    changed_keys,
                    remembered,
                } => {
                    // Writes go on before the keys are freed.
                    drop(exclusive);
                    drop(remembered);
                    return Err(RebuildOverrun {
                        changed_keys,
                        max_bytes: self.touched_max_bytes,
                    }
                    .into());
                }
                Touched::Idle => {
                    debug_assert!(false, "finish_rebuild without begin_rebuild");
                    HashSet::new()
                }
            };
            let last = keys.len() <= SWAP_KEYS_MAX || round >= CATCH_UP_ROUNDS_MAX;
            let exclusive = if last {
                Some(exclusive)
            } else {
                // The keys corrected so far count against the cap too (each
                // once, however often it comes back), so that all the rounds
                // together remember at most that much.
                applied_bytes += keys
                    .iter()
                    .filter(|k| !applied.contains_key(*k))
                    .map(|k| k.len() + TOUCHED_KEY_OVERHEAD_BYTES)
                    .sum::<usize>();
                *self.touched.lock().unwrap_or_else(|p| p.into_inner()) = Touched::Recording {
                    keys: HashSet::new(),
                    bytes: applied_bytes,
                };
                drop(exclusive);
                None
            };
            // Should `versions` fail or panic with writes going on, they
            // must stop recording for a rebuild that will not finish.
            let mut unfinished = StopRecordingOnDrop {
                trees: self,
                armed: exclusive.is_none(),
            };
            for key in keys {
                let (scanned, now) = versions(&key)?;
                let held = applied.get(&key).copied().unwrap_or(scanned);
                let (held, now_hash) = (
                    held.map(|d| item_hash(&key, d)),
                    now.map(|d| item_hash(&key, d)),
                );
                for peer in self.sharing_on(&fresh.ring, &key) {
                    fresh
                        .trees
                        .entry(peer)
                        .or_insert_with(|| self.empty.clone())
                        .replace(&key, held, now_hash);
                }
                if !last {
                    applied.insert(key, now);
                }
            }
            unfinished.armed = false;
            if last {
                self.install(fresh);
                return Ok(());
            }
        }
        unreachable!("the rounds end with the last")
    }

    /// Abandons a rebuild (its scan failed); the trees stay not ready.
    pub fn abandon_rebuild(&self) {
        let (exclusive, touched) = self.end_touched();
        // Writes go on before the remembered keys are freed.
        drop(exclusive);
        drop(touched);
    }

    /// Ends the record of changed keys, returning it with the exclusive
    /// hold on changes that the caller releases before freeing it.
    fn end_touched(&self) -> (RwLockWriteGuard<'_, ()>, Touched) {
        let exclusive = self.rebuild_lock.write().unwrap_or_else(|p| p.into_inner());
        let touched = std::mem::replace(
            &mut *self.touched.lock().unwrap_or_else(|p| p.into_inner()),
            Touched::Idle,
        );
        (exclusive, touched)
    }

    /// Whether the rebuild under way has passed its cap of remembered keys,
    /// so that its finish will fail: a scan may stop early.
    pub fn is_overrun(&self) -> bool {
        matches!(
            *self.touched.lock().unwrap_or_else(|p| p.into_inner()),
            Touched::Overrun { .. }
        )
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

    /// Remembers `key` for the rebuild under way, if any; past the cap,
    /// marks the rebuild overrun and remembers no more.
    fn remember_touched(&self, key: &[u8]) {
        let mut touched = self.touched.lock().unwrap_or_else(|p| p.into_inner());
        let Touched::Recording { keys, bytes } = &mut *touched else {
            return;
        };
        if keys.contains(key) {
            return;
        }
        *bytes += key.len() + TOUCHED_KEY_OVERHEAD_BYTES;
        if *bytes <= self.touched_max_bytes {
            keys.insert(key.to_vec());
            return;
        }
        let changed_keys = keys.len() + 1;
        let remembered = std::mem::take(keys);
        *touched = Touched::Overrun {
            changed_keys,
            remembered,
        };
    }

    /// Keys the rebuild under way remembers and will correct (tests).
    #[cfg(test)]
    fn remembered_keys(&self) -> usize {
        match &*self.touched.lock().unwrap() {
            Touched::Recording { keys, .. } => keys.len(),
            _ => 0,
        }
    }
}

impl ChangeObserver for ReplicaTrees {
    fn begin_change(&self) -> ChangeGuard<'_> {
        ChangeGuard(Some(
            self.rebuild_lock.read().unwrap_or_else(|p| p.into_inner()),
        ))
    }

    fn changed(&self, key: &[u8], old: Option<&Clock>, new: Option<&Clock>) {
        self.remember_touched(key);
        let peers = self.sharing_on(&self.ring(), key);
        if peers.is_empty() {
            return;
        }
        let old = old.map(|c| item_hash(key, version_digest(c)));
        let new = new.map(|c| item_hash(key, version_digest(c)));
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
    use super::*;
    use crate::merkle::leaf_of;
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
        trees.begin_rebuild();
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

    /// A scan that overlaps more changed keys than the cap allows is
    /// abandoned the moment it passes the cap, its keys forgotten at once;
    /// the retry, with fewer changes, finishes and matches incremental
    /// maintenance.
    #[test]
    fn a_rebuild_that_must_remember_too_many_changes_is_abandoned_then_retried() {
        let ring = ring(3);
        let me = n("n1");
        // Room for ten 3-byte keys.
        let cap = 10 * (3 + TOUCHED_KEY_OVERHEAD_BYTES);
        let trees = ReplicaTrees::new(me.clone(), ring.clone(), 8)
            .unwrap()
            .with_touched_max_bytes(cap);
        let clock = write("n2", "v");
        let key = |k: usize| format!("k{k:02}").into_bytes();

        trees.begin_rebuild();
        let fresh = trees.build(ring.clone(), std::iter::empty());
        for k in 0..10 {
            trees.changed(&key(k), None, Some(&clock));
        }
        trees.changed(&key(0), Some(&clock), Some(&clock));
        assert_eq!(
            trees.remembered_keys(),
            10,
            "a key changed twice counts once"
        );
        assert!(!trees.is_overrun());
        trees.changed(&key(10), None, Some(&clock));
        assert!(trees.is_overrun(), "over the cap");
        trees.changed(&key(11), None, Some(&clock));
        let overrun = trees
            .finish_rebuild(fresh, |_| Ok::<_, RebuildOverrun>((None, None)))
            .unwrap_err();
        assert_eq!(
            overrun,
            RebuildOverrun {
                changed_keys: 11,
                max_bytes: cap
            }
        );
        assert!(!trees.is_ready(), "an overrun rebuild installs nothing");
        assert!(!trees.is_overrun(), "the next rebuild starts afresh");

        // The retry scans keys 0..=10 and sees one more change meanwhile.
        trees.begin_rebuild();
        let digest = version_digest(&clock);
        let fresh = trees.build(ring.clone(), (0..=10).map(|k| (key(k), digest)));
        trees.changed(&key(11), None, Some(&clock));
        trees
            .finish_rebuild(fresh, |k| {
                assert_eq!(k, key(11), "only the key changed during the scan");
                Ok::<_, RebuildOverrun>((None, Some(digest)))
            })
            .unwrap();
        assert!(trees.is_ready());
        let live = ReplicaTrees::new(me, ring.clone(), 8).unwrap();
        for k in 0..=11 {
            live.changed(&key(k), None, Some(&clock));
        }
        for peer in ["n2", "n3"] {
            assert_eq!(trees.tree_for(&n(peer)), live.tree_for(&n(peer)));
            assert_eq!(trees.tree_for(&n(peer)).len(), 12);
        }
    }

    /// Many keys changed during the scan: the first rounds correct them
    /// with writes going on (a writer may take its change guard), changes
    /// made meanwhile are corrected in a later round from the digest the
    /// fresh trees hold by then, and the result equals trees maintained
    /// write by write.
    #[test]
    fn many_changed_keys_are_corrected_with_writes_going_on() {
        let ring = ring(3);
        let me = n("n1");
        let key = |k: usize| format!("k{k:05}").into_bytes();
        let (v1, v2, v3) = (write("n2", "v1"), write("n2", "v2"), write("n2", "v3"));
        let trees = ReplicaTrees::new(me.clone(), ring.clone(), 8).unwrap();
        let live = ReplicaTrees::new(me, ring.clone(), 8).unwrap();
        let keys = 3 * SWAP_KEYS_MAX;
        // The snapshot: every key at v1.
        let snapshot: HashMap<Vec<u8>, Clock> = (0..keys).map(|k| (key(k), v1.clone())).collect();
        for (k, clock) in &snapshot {
            live.changed(k, None, Some(clock));
        }
        trees.begin_rebuild();
        let fresh = trees.build(
            ring.clone(),
            snapshot.iter().map(|(k, c)| (k.clone(), version_digest(c))),
        );
        // During the scan every key is rewritten to v2.
        let store = Mutex::new(HashMap::new());
        for k in 0..keys {
            store.lock().unwrap().insert(key(k), v2.clone());
            trees.changed(&key(k), Some(&v1), Some(&v2));
            live.changed(&key(k), Some(&v1), Some(&v2));
        }
        let free_rounds = std::sync::atomic::AtomicUsize::new(0);
        trees
            .finish_rebuild(fresh, |k| {
                if trees.rebuild_lock.try_read().is_ok() {
                    free_rounds.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    // A write made now, to a key of this round: corrected
                    // again in the next one.
                    if k == key(7).as_slice() {
                        let _guard = trees.begin_change();
                        store.lock().unwrap().insert(key(7), v3.clone());
                        trees.changed(&key(7), Some(&v2), Some(&v3));
                        live.changed(&key(7), Some(&v2), Some(&v3));
                    }
                }
                let now = store.lock().unwrap().get(k).map(version_digest);
                Ok::<_, RebuildOverrun>((snapshot.get(k).map(version_digest), now))
            })
            .unwrap();
        assert_eq!(
            free_rounds.into_inner(),
            keys,
            "the first round ran with writes going on"
        );
        assert!(trees.is_ready());
        for peer in ["n2", "n3"] {
            assert_eq!(trees.tree_for(&n(peer)), live.tree_for(&n(peer)));
        }
    }

    /// A hot set rewritten during every round: the rounds run out and the
    /// last corrects the set under the exclusive hold. The keys counted
    /// against the cap are counted once, so the rebuild fits a cap of a
    /// few times the set and finishes, equal to trees maintained write by
    /// write.
    #[test]
    fn a_hot_set_rewritten_every_round_still_finishes_within_the_cap() {
        let ring = ring(3);
        let me = n("n1");
        let key = |k: usize| format!("k{k:05}").into_bytes();
        let hot = 2 * SWAP_KEYS_MAX;
        let per_key = key(0).len() + TOUCHED_KEY_OVERHEAD_BYTES;
        let trees = ReplicaTrees::new(me.clone(), ring.clone(), 8)
            .unwrap()
            .with_touched_max_bytes(hot * per_key * 5 / 2);
        let live = ReplicaTrees::new(me, ring.clone(), 8).unwrap();
        let (v1, v2, v3) = (write("n2", "v1"), write("n2", "v2"), write("n2", "v3"));
        let store = Mutex::new(HashMap::new());
        for k in 0..hot {
            store.lock().unwrap().insert(key(k), v1.clone());
            live.changed(&key(k), None, Some(&v1));
        }
        trees.begin_rebuild();
        let fresh = trees.build(
            ring.clone(),
            (0..hot).map(|k| (key(k), version_digest(&v1))),
        );
        let rewrite = |k: &[u8]| {
            let _guard = trees.begin_change();
            let mut store = store.lock().unwrap();
            let old = store[k].clone();
            let new = if old == v2 { v3.clone() } else { v2.clone() };
            store.insert(k.to_vec(), new.clone());
            trees.changed(k, Some(&old), Some(&new));
            live.changed(k, Some(&old), Some(&new));
        };
        for k in 0..hot {
            rewrite(&key(k));
        }
        let rounds_with_writes = std::sync::atomic::AtomicUsize::new(0);
        trees
            .finish_rebuild(fresh, |k| {
                if trees.rebuild_lock.try_read().is_ok() {
                    rounds_with_writes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    rewrite(k);
                }
                let now = store.lock().unwrap().get(k).map(version_digest);
                Ok::<_, RebuildOverrun>((Some(version_digest(&v1)), now))
            })
            .expect("within the cap");
        assert_eq!(
            rounds_with_writes.into_inner(),
            CATCH_UP_ROUNDS_MAX * hot,
            "every round but the last ran with writes going on"
        );
        for peer in ["n2", "n3"] {
            assert_eq!(trees.tree_for(&n(peer)), live.tree_for(&n(peer)));
        }
    }

    /// A catch-up round that fails (shutdown stops it, or a read fails) or
    /// panics leaves the trees not ready and writes no longer recording.
    #[test]
    fn a_catch_up_round_that_fails_or_panics_stops_the_recording() {
        let ring = ring(3);
        let key = |k: usize| format!("k{k:05}").into_bytes();
        let clock = write("n2", "v");
        let start = |trees: &ReplicaTrees| {
            trees.begin_rebuild();
            let fresh = trees.build(ring.clone(), std::iter::empty());
            for k in 0..2 * SWAP_KEYS_MAX {
                trees.changed(&key(k), None, Some(&clock));
            }
            fresh
        };
        let recording = |trees: &ReplicaTrees| {
            trees.changed(b"later", None, Some(&clock));
            trees.remembered_keys() > 0
        };

        let trees = ReplicaTrees::new(n("n1"), ring.clone(), 8).unwrap();
        let fresh = start(&trees);
        let stopped = trees.finish_rebuild(fresh, |_| {
            assert!(trees.rebuild_lock.try_read().is_ok(), "a catch-up round");
            Err(RebuildOverrun {
                changed_keys: 0,
                max_bytes: 0,
            })
        });
        assert!(stopped.is_err());
        assert!(!trees.is_ready());
        assert!(!recording(&trees), "the record ended with the rebuild");

        let trees = ReplicaTrees::new(n("n1"), ring.clone(), 8).unwrap();
        let fresh = start(&trees);
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            trees.finish_rebuild(fresh, |_| -> Result<_, RebuildOverrun> {
                panic!("a read that panics")
            })
        }));
        assert!(panicked.is_err());
        assert!(!trees.is_ready());
        assert!(!recording(&trees), "the record ended with the rebuild");
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
