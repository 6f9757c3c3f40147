//! Placement: which nodes hold a key (Dynamo §4.2, §4.3).
//!
//! Nodes sit on a consistent-hash ring as *virtual nodes* (several positions
//! per node, so load spreads evenly and a joining or leaving node takes or
//! gives a little from everyone). A key's **preference list** is the first N
//! distinct nodes the ring yields for it; the nodes after those are its
//! **fallbacks**, in order, for the sloppy quorum to use when a preferred node
//! is down.
//!
//! The ring is [`consistent_hash_ring`]'s. Its candidate walk visits a key's
//! nodes by re-hashing the key position, skipping nodes already chosen, so the
//! order is a pure function of the key and the member set.
//!
//! ## Architecture invariant
//! This crate does no I/O, spawns nothing and reads no clock. Placement must
//! be identical on every node, across restarts and across builds: keys and
//! node ids are hashed as raw bytes with [`ringkv_core::hash`]'s stable hash,
//! never through `std::hash::Hash` of a Rust type, and golden tests pin the
//! result.

use std::hash::{BuildHasher, Hash, Hasher};

use ringkv_core::hash::StableHasher;
pub use ringkv_core::wire::{REPLICAS_MAX, VNODES_MAX};
use ringkv_core::NodeId;

/// The default number of virtual nodes per node.
pub const DEFAULT_VNODES: u32 = 64;

/// Errors building a ring.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    #[error("replication factor N must be at least 1")]
    ZeroReplicas,
    #[error("node {node} has 0 virtual nodes; it would own no keys")]
    ZeroVnodes { node: NodeId },
    #[error("node {node} appears twice in the member list")]
    DuplicateNode { node: NodeId },
    #[error("replication factor N = {replicas} is above the limit of {REPLICAS_MAX}")]
    TooManyReplicas { replicas: usize },
    #[error("node {node} has {vnodes} virtual nodes, above the limit of {VNODES_MAX}")]
    TooManyVnodes { node: NodeId, vnodes: u32 },
}

/// The nodes responsible for one key, in ring order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreferenceList {
    /// The first `min(N, members)` distinct nodes: the key's replicas.
    pub replicas: Vec<NodeId>,
    /// The next distinct nodes of the key's walk, in the order the sloppy
    /// quorum should try them: every other member, up to
    /// `max(N, FALLBACKS_MIN)`.
    pub fallbacks: Vec<NodeId>,
}

/// A key's fallbacks number at least this many (when the cluster has the
/// members), and N when that is more: a stand-in for every owner, and
/// more to try when some of those are down too.
///
/// Not every member: each further node of the walk costs more than the one
/// before (the walk skips the virtual nodes of those already taken), and
/// a preference list is computed for every request. With 1,000 members of
/// 64 virtual nodes, listing them all took 0.3 ms a key.
pub const FALLBACKS_MIN: usize = 16;

impl PreferenceList {
    pub fn contains(&self, node: &NodeId) -> bool {
        self.replicas.contains(node)
    }
}

/// A ring of virtual nodes with a replication factor.
///
/// Two rings are equal when they have the same members with the same
/// virtual node counts, and the same N; equal rings place every key alike.
/// (Placement depends on nothing else; members' addresses are not part of
/// a ring.)
#[derive(Clone)]
pub struct Ring {
    inner: consistent_hash_ring::Ring<RingNode, BuildStableHasher>,
    replicas: usize,
    /// The members and their virtual node counts, sorted: what placement
    /// depends on, for equality.
    members: Vec<(NodeId, u32)>,
}

impl PartialEq for Ring {
    fn eq(&self, other: &Self) -> bool {
        self.replicas == other.replicas && self.members == other.members
    }
}

impl Eq for Ring {}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("nodes", &self.inner.len())
            .field("vnodes", &self.inner.vnodes())
            .field("replicas", &self.replicas)
            .finish()
    }
}

impl Ring {
    /// Builds a ring of `members` (node, virtual node count) replicating each
    /// key `replicas` times.
    pub fn new(
        members: impl IntoIterator<Item = (NodeId, u32)>,
        replicas: usize,
    ) -> Result<Self, RingError> {
        if replicas == 0 {
            return Err(RingError::ZeroReplicas);
        }
        if replicas > REPLICAS_MAX as usize {
            return Err(RingError::TooManyReplicas { replicas });
        }
        let mut inner = consistent_hash_ring::RingBuilder::new(BuildStableHasher).build();
        let mut placed = Vec::new();
        for (node, vnodes) in members {
            if vnodes == 0 {
                return Err(RingError::ZeroVnodes { node });
            }
            if vnodes > VNODES_MAX {
                return Err(RingError::TooManyVnodes { node, vnodes });
            }
            if !inner.insert_weight(RingNode(node.clone()), vnodes as usize) {
                return Err(RingError::DuplicateNode { node });
            }
            placed.push((node, vnodes));
        }
        placed.sort();
        Ok(Ring {
            inner,
            replicas,
            members: placed,
        })
    }

    /// A digest of what placement depends on (members, their virtual node
    /// counts, N): equal rings have equal fingerprints, and two nodes whose
    /// fingerprints differ may place a key differently.
    pub fn fingerprint(&self) -> u64 {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&(self.replicas as u64).to_le_bytes());
        for (node, vnodes) in &self.members {
            bytes.extend_from_slice(&(node.as_str().len() as u64).to_le_bytes());
            bytes.extend_from_slice(node.as_str().as_bytes());
            bytes.extend_from_slice(&vnodes.to_le_bytes());
        }
        ringkv_core::hash::stable_hash64(&bytes)
    }

    /// The replication factor N.
    pub fn replicas(&self) -> usize {
        self.replicas
    }

    /// The number of distinct nodes.
    pub fn len(&self) -> usize {
        self.inner.len()
    }

    pub fn is_empty(&self) -> bool {
        self.inner.is_empty()
    }

    /// The key's whole walk of the ring: every member once, replicas
    /// first. Lazy, since each further node costs more than the one before
    /// (see [`FALLBACKS_MIN`]).
    pub fn walk<'a>(&'a self, key: &'a [u8]) -> impl Iterator<Item = &'a NodeId> + 'a {
        self.inner.replicas(RingKey(key)).map(|n| &n.0)
    }

    /// The key's N replicas alone: the start of its [`Ring::walk`], without
    /// the fallbacks [`Ring::preference_list`] also walks to (for callers
    /// that ask of every key, such as tree updates and scans).
    pub fn replicas_of(&self, key: &[u8]) -> Vec<NodeId> {
        self.walk(key).take(self.replicas).cloned().collect()
    }

    /// Whether `node` is one of the key's N replicas: [`Ring::replicas_of`]
    /// without building the list, for checks made of every key scanned.
    pub fn is_replica(&self, key: &[u8], node: &NodeId) -> bool {
        self.walk(key).take(self.replicas).any(|n| n == node)
    }

    /// The key's replicas and fallbacks: the start of its [`Ring::walk`].
    pub fn preference_list(&self, key: &[u8]) -> PreferenceList {
        let mut all = self.walk(key).cloned();
        let replicas: Vec<NodeId> = all.by_ref().take(self.replicas).collect();
        PreferenceList {
            replicas,
            fallbacks: all.take(self.replicas.max(FALLBACKS_MIN)).collect(),
        }
    }

    /// Whether `node` is on the ring.
    pub fn has_node(&self, node: &NodeId) -> bool {
        self.members.iter().any(|(member, _)| member == node)
    }

    /// The members and their virtual node counts, sorted by id: with
    /// [`Ring::replicas`], all a ring is built from (`Ring::new` of them
    /// gives an equal ring).
    pub fn members(&self) -> &[(NodeId, u32)] {
        &self.members
    }

    /// Every node on the ring, sorted by id.
    pub fn nodes(&self) -> Vec<NodeId> {
        self.members.iter().map(|(node, _)| node.clone()).collect()
    }

    /// The first node of the key's preference list.
    pub fn primary(&self, key: &[u8]) -> Option<&NodeId> {
        self.inner.try_get(RingKey(key)).map(|n| &n.0)
    }
}

/// A node on the ring, hashed as the raw bytes of its id.
#[derive(Clone, PartialEq, Eq)]
struct RingNode(NodeId);

impl Hash for RingNode {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write(self.0.as_str().as_bytes());
    }
}

/// A key, hashed as its raw bytes.
struct RingKey<'a>(&'a [u8]);

impl Hash for RingKey<'_> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write(self.0);
    }
}

/// Gives the ring the stable hasher instead of the default FNV, whose integer
/// hashing follows the host's endianness.
#[derive(Clone, Copy, Default)]
struct BuildStableHasher;

impl BuildHasher for BuildStableHasher {
    type Hasher = StableHasher;
    fn build_hasher(&self) -> StableHasher {
        StableHasher::default()
    }
}

#[cfg(test)]
mod tests;
