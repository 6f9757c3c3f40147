//! Node identity.
//!
//! A node's id is the name it is known by on the ring and in every version
//! vector, so it must be stable across restarts and short enough to be
//! repeated in every stored clock. Ids are validated once, where they enter
//! the system (command line, join messages), and trusted afterwards.

use std::fmt;

use crate::error::InvalidInput;

/// The longest id accepted anywhere, in bytes (node names and actor ids).
pub const NODE_ID_MAX_BYTES: usize = 64;
/// The longest name a node may be started with: leaves room for the
/// `.epoch` suffix of its actor id and the `.k` of its per-key actors
/// (40 + 9 + 9 = 58 bytes).
pub const NODE_NAME_MAX_BYTES: usize = 40;

/// The name of one ringkv node, e.g. `n1`.
///
/// Invariant: 1..=64 bytes of `[A-Za-z0-9._-]`.
#[derive(
    Clone, PartialEq, Eq, PartialOrd, Ord, Hash, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
#[rkyv(derive(Debug))]
pub struct NodeId(String);

impl NodeId {
    /// Validates `id` and wraps it.
    pub fn new(id: impl Into<String>) -> Result<Self, InvalidInput> {
        let id = id.into();
        if id.is_empty() {
            return Err(InvalidInput::new("node id is empty"));
        }
        if id.len() > NODE_ID_MAX_BYTES {
            return Err(InvalidInput::new(format!(
                "node id is {} bytes long; the limit is {NODE_ID_MAX_BYTES}",
                id.len()
            )));
        }
        if let Some(bad) = id
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return Err(InvalidInput::new(format!(
                "node id {id:?} contains {bad:?}; use letters, digits, '.', '_' or '-'"
            )));
        }
        Ok(NodeId(id))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The actor id this node mints version-vector dots under during one
    /// *epoch* of its data: `name.epoch` in hex.
    ///
    /// A node's dots are unique only while it remembers every dot it minted.
    /// A node whose data dir was wiped, or that may have lost the tail of an
    /// unsynced WAL, starts a new epoch, so its new dots can never collide
    /// with dots it minted before (the scheme Riak uses for vnode ids). Keys
    /// get per-key actors of the epoch, `name.epoch.k` (Riak's key epochs;
    /// see `ReplicaService` in the coordinator).
    pub fn actor(&self, epoch: u32) -> NodeId {
        debug_assert!(self.0.len() <= NODE_NAME_MAX_BYTES);
        NodeId(format!("{}.{epoch:08x}", self.0))
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl std::str::FromStr for NodeId {
    type Err = InvalidInput;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        NodeId::new(s)
    }
}

impl ArchivedNodeId {
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_names_and_rejects_the_rest() {
        assert!(NodeId::new("n1").is_ok());
        assert!(NodeId::new("eu-west.a_1").is_ok());
        assert!(NodeId::new("").unwrap_err().to_string().contains("empty"));
        assert!(NodeId::new("a b").unwrap_err().to_string().contains("' '"));
        assert!(NodeId::new("x".repeat(65))
            .unwrap_err()
            .to_string()
            .contains("65 bytes"));
    }
}
